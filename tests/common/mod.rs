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

/// Uniform values in [-1, 1) from a seed.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape.to_vec(), -1.0, 1.0, seed)
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
