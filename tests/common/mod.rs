//! Shared test helpers: the GPU device (or a visible skip), seeded data, closeness checks.
#![allow(dead_code)]

use std::sync::OnceLock;

use kiln::{Device, Graph, NodeId, Tensor};

/// The GPU device shared by a test binary, or `None` with a visible notice when there is none.
/// With KILN_REQUIRE_GPU=1 a missing adapter fails the test instead.
pub fn gpu() -> Option<Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    match DEV.get_or_init(|| Device::gpu().map_err(|e| e.to_string())) {
        Ok(d) => Some(d.clone()),
        Err(e) => {
            if std::env::var("KILN_REQUIRE_GPU")
                .map(|v| v == "1")
                .unwrap_or(false)
            {
                panic!("KILN_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("NOTICE: no GPU adapter ({e}); GPU checks skipped, CPU checks only");
            None
        }
    }
}

/// The largest hidden size the shared GPU runs as whole-sequence recurrent kernels
/// (`kiln::ops::lstm::sequence_limit`; 256, WebGPU's default, without a GPU): tests put one
/// case at it and one just above it, on the per-step kernels.
pub fn sequence_limit() -> usize {
    gpu()
        .and_then(|d| d.target())
        .map_or(256, |t| kiln::ops::lstm::sequence_limit(&t))
}

/// Uniform values in [-1, 1) from a seed.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape.to_vec(), -1.0, 1.0, seed)
}

/// The CPU reference, then the GPU where there is one (its test then runs on both).
#[allow(dead_code)] // not every test binary asks
pub fn devices() -> Vec<Device> {
    let mut d = vec![Device::cpu()];
    d.extend(gpu());
    d
}

/// A kind of device by name, and how to make a fresh one.
pub type FreshDevice = (&'static str, fn() -> Device);

/// How to make a fresh device of each kind [`devices`] lists (`"cpu"`, then `"gpu"` where there
/// is one), for tests whose parameters must start anew on every run.
#[allow(dead_code)] // not every test binary asks
pub fn fresh_devices() -> Vec<FreshDevice> {
    let mut d: Vec<FreshDevice> = vec![("cpu", Device::cpu)];
    if gpu().is_some() {
        d.push(("gpu", || Device::gpu().expect("a GPU was found")));
    }
    d
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise, naming the first offending element.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    let (worst, i) = kiln::tensor::max_violation(a.data(), b.data(), atol, rtol);
    assert!(
        worst <= 1.0,
        "{what}: element {i} is {} but the reference is {} (|diff| = {:e}, atol {atol:e}, rtol {rtol:e})",
        a.data()[i],
        b.data()[i],
        (a.data()[i] - b.data()[i]).abs()
    );
}

/// Runs `outputs` of `g` on the GPU (outputs poisoned with NaN first) and on the CPU reference with
/// the same feeds and parameters, and checks every output within `(atol, rtol)`.
pub fn check_gpu_vs_cpu(
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    feeds: &[(&str, &Tensor)],
    tol: (f64, f64),
) {
    let Some(dev) = gpu() else { return };
    let mut plan = dev
        .compile(g, outputs)
        .unwrap_or_else(|e| panic!("{what}: compile: {e}"));
    plan.poison(f32::NAN);
    let got = plan
        .run(feeds)
        .unwrap_or_else(|e| panic!("{what}: run: {e}"));
    let cpu = Device::cpu();
    // the CPU device gets the GPU's parameter values
    for name in dev.param_names() {
        cpu.set_param(&name, &dev.param(&name).expect("param readback"))
            .expect("set param");
    }
    let mut reference = cpu.compile(g, outputs).expect("cpu compile");
    let want = reference.run(feeds).expect("cpu run");
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{what} output {k}"), a, b, tol.0, tol.1);
    }
}

/// A scalar loss that weighs every element of `y` by a fixed random value, so that every element's
/// gradient is distinct and non-trivial: `sum(y * R)`.
pub fn random_projection(g: &Graph, y: NodeId, seed: u64) -> NodeId {
    let r = Tensor::rand_uniform(g.shape(y), -1.0, 1.0, seed);
    let c = g.constant(r);
    g.sum_all(g.mul(y, c).expect("same shape")).expect("scalar")
}

/// Gradient check: the CPU reference gradients of `loss` with respect to the inputs `wrt` (input
/// nodes, by name in `feeds`) against central differences `(L(x + h) - L(x - h)) / 2h` computed by
/// the CPU reference (f64 accumulation), at up to `max_elems` elements per input; then the GPU
/// gradients against the CPU gradients (tolerance `gpu_tol`).
pub fn gradcheck(
    what: &str,
    g: &Graph,
    loss: NodeId,
    wrt: &[(&str, NodeId)],
    feeds: &[(&str, &Tensor)],
    max_elems: usize,
    gpu_tol: (f64, f64),
) {
    let ids: Vec<NodeId> = wrt.iter().map(|(_, id)| *id).collect();
    let grads = g
        .grad(loss, &ids)
        .unwrap_or_else(|e| panic!("{what}: grad: {e}"));
    let cpu = Device::cpu();
    let mut outs = vec![loss];
    outs.extend(&grads);
    let mut plan = cpu.compile(g, &outs).expect("cpu compile");
    let analytic = plan.run(feeds).expect("cpu run");
    let mut loss_plan = cpu.compile(g, &[loss]).expect("cpu compile");
    let h = 1e-2f32;
    for (k, (name, _)) in wrt.iter().enumerate() {
        let base = feeds.iter().find(|(n, _)| n == name).expect("wrt is fed").1;
        let n = base.numel();
        let step = n.div_ceil(max_elems).max(1);
        for i in (0..n).step_by(step) {
            let mut eval = |delta: f32| -> f64 {
                let mut t = base.clone();
                t.data_mut()[i] += delta;
                let fs: Vec<(&str, &Tensor)> = feeds
                    .iter()
                    .map(|(nm, v)| if nm == name { (*nm, &t) } else { (*nm, *v) })
                    .collect();
                // the plan borrows feeds only for the call
                let out = loss_plan.run(&fs).expect("loss run");
                out[0].data()[0] as f64
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            let an = analytic[1 + k].data()[i] as f64;
            let ok = (fd - an).abs() <= 2e-3 + 2e-2 * fd.abs();
            assert!(
                ok,
                "{what}: d loss / d {name}[{i}]: backward gives {an}, central differences {fd}"
            );
        }
    }
    check_gpu_vs_cpu(&format!("{what} gradients"), g, &grads, feeds, gpu_tol);
}

/// Named feeds as `Plan::run` takes them.
pub fn refs(f: &[(String, Tensor)]) -> Vec<(&str, &Tensor)> {
    f.iter().map(|(k, v)| (k.as_str(), v)).collect()
}

/// Runs `outputs` on `dev` (poisoned with NaN first) and on the CPU reference with the same
/// feeds, checks every output within `tol`, and returns the plan's info.
pub fn check_on(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    f: &[(String, Tensor)],
    tol: (f64, f64),
) -> kiln::PlanInfo {
    check_plan(dev, what, g, outputs, f, tol).info()
}

/// [`check_on`], returning the plan (its info, its kernels).
pub fn check_plan(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    f: &[(String, Tensor)],
    tol: (f64, f64),
) -> kiln::Plan {
    let (plan, got, want) = run_on_both(dev, what, g, outputs, f);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{what} output {k}"), a, b, tol.0, tol.1);
    }
    plan
}

/// [`check_plan`] with each output's `atol` scaled by its largest reference magnitude (at
/// least 1): in f16, a sum whose terms cancel keeps the rounding error of its largest terms,
/// whatever its own size, so an element near 0 of a tensor of large values is held to the
/// tensor's scale, not its own.
pub fn check_plan_scaled(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    f: &[(String, Tensor)],
    tol: (f64, f64),
) {
    let (_, got, want) = run_on_both(dev, what, g, outputs, f);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        let scale = b.data().iter().fold(1f64, |m, &v| m.max(v.abs() as f64));
        assert_close(&format!("{what} output {k}"), a, b, tol.0 * scale, tol.1);
    }
}

/// `outputs` run on `dev` (poisoned with NaN first) and on the CPU reference with the same
/// feeds: the plan, its results and the reference's.
fn run_on_both(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    f: &[(String, Tensor)],
) -> (kiln::Plan, Vec<Tensor>, Vec<Tensor>) {
    let mut plan = dev
        .compile(g, outputs)
        .unwrap_or_else(|e| panic!("{what}: compile: {e}"));
    plan.poison(f32::NAN);
    let got = plan
        .run(&refs(f))
        .unwrap_or_else(|e| panic!("{what}: run: {e}"));
    let want = Device::cpu()
        .compile(g, outputs)
        .unwrap()
        .run(&refs(f))
        .unwrap();
    (plan, got, want)
}

/// Runs `y` on the CPU reference against the formula's `want` (within `tol`), then on the GPU
/// (outputs poisoned with NaN) against the CPU reference.
pub fn check_formula(
    what: &str,
    g: &Graph,
    y: NodeId,
    feeds: &[(&str, &Tensor)],
    want: &Tensor,
    tol: (f64, f64),
) {
    let cpu = Device::cpu().compile(g, &[y]).unwrap().run(feeds).unwrap();
    assert_close(&format!("{what} on the cpu"), &cpu[0], want, tol.0, tol.1);
    check_gpu_vs_cpu(what, g, &[y], feeds, kiln::ops::TOL_REDUCTION);
}

/// Kernels of op `op` among a plan's labels (`node <id> <op> <shape> ..`, `Plan::kernels`).
pub fn count_op<S: AsRef<str>>(kernels: &[S], op: &str) -> usize {
    kernels
        .iter()
        .filter(|k| k.as_ref().split_whitespace().nth(2) == Some(op))
        .count()
}

/// Feeds owned by name, with `alias` a copy of the feed named `name` where there is one (a
/// second layer of a graph reading its own input of the same value).
pub fn owned_feeds(feeds: &[(&str, Tensor)], name: &str, alias: &str) -> Vec<(String, Tensor)> {
    let mut f: Vec<(String, Tensor)> = feeds
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect();
    if let Some((_, v)) = feeds.iter().find(|(n, _)| *n == name) {
        f.push((alias.to_string(), v.clone()));
    }
    f
}

/// `<a, b>` in f64: adjoint identities (`<f(x), z> = <x, f^T(z)>`) compare two of these.
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(p, q)| f64::from(*p) * f64::from(*q))
        .sum()
}

/// Runs `outs` on every device ([`devices`]; outputs poisoned with NaN first) and compares
/// each with `want` within `|a - b| <= atol + rtol |b|` (NaN matching NaN; `(0, 0)`: exactly),
/// naming where an output first differs.
pub fn expect_values(
    g: &Graph,
    outs: &[NodeId],
    feeds: &[(&str, &Tensor)],
    want: &[Vec<f32>],
    (atol, rtol): (f64, f64),
) {
    for dev in devices() {
        let mut plan = dev.compile(g, outs).unwrap();
        plan.poison(f32::NAN);
        let got = plan.run(feeds).unwrap();
        for (k, (t, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(t.numel(), w.len(), "output {k}: {:?}", t.shape());
            let first = t.data().iter().zip(w).position(|(&a, &b)| {
                let near = (a as f64 - b as f64).abs() <= atol + rtol * (b as f64).abs();
                !(a == b || near || (a.is_nan() && b.is_nan()))
            });
            if let Some(i) = first {
                // the whole tensors where they are short, else where they first differ
                let at = |v: &[f32]| format!("{:?}", &v[i.saturating_sub(3)..(i + 4).min(v.len())]);
                let whole = match w.len() <= 32 {
                    true => format!(" ({:?} != {w:?})", t.data()),
                    false => String::new(),
                };
                panic!(
                    "output {k} differs at {i}: {} where {} is wanted{whole}",
                    at(t.data()),
                    at(w)
                );
            }
        }
    }
}

/// Values 0.05 apart, all distinct, over `shape` (a permutation of `0..n` scaled; 101 is
/// prime, so it must not divide `n`): central differences of step 0.01 then never change which
/// element a maximum, a top-k or a pooling window picks.
pub fn spread(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    assert!(!n.is_multiple_of(101), "101 must not divide {n}");
    let v = (0..n).map(|i| ((i * 101 + 11) % n) as f32 * 0.05).collect();
    Tensor::new(shape.to_vec(), v).unwrap()
}
