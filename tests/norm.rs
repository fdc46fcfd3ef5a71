//! Normalization: batch norm (training and evaluation, running statistics moved in place) and
//! layer norm, on the GPU (outputs poisoned with NaN) and the CPU reference, against an
//! independent f64 implementation of PyTorch's formulas on awkward shapes (one image, one
//! position, primes); gradients against central differences; the layers' state_dict names, a
//! training step that moves the running statistics in its one submission, and the errors.

mod common;

use common::{
    assert_close, check_formula, check_gpu_vs_cpu, check_plan, count_op, gpu, gradcheck, rand,
    random_projection,
};
use kiln::nn::{BatchNorm, GroupNorm, LayerNorm, Optimizer, Sequential, TrainStep};
use kiln::ops::norm::RunningStats;
use kiln::ops::{TOL_F16, TOL_REDUCTION};
use kiln::{DType, Device, Error, Graph, Tensor};

const EPS: f32 = 1e-5;

/// PyTorch's batch norm in f64: the normalized `x (N, C, *)` and each channel's batch mean and
/// biased variance.
fn batch_norm_ref(
    x: &Tensor,
    w: &[f32],
    b: &[f32],
    stats: Option<(&[f32], &[f32])>,
) -> (Tensor, Vec<f64>, Vec<f64>) {
    let d = x.dims();
    let (n, c) = (d[0], d[1]);
    let s: usize = d[2..].iter().product();
    let at = |i: usize, ch: usize, j: usize| x.data()[(i * c + ch) * s + j] as f64;
    let mut y = vec![0f32; x.numel()];
    let (mut means, mut vars) = (vec![0f64; c], vec![0f64; c]);
    for ch in 0..c {
        let all: Vec<f64> = (0..n)
            .flat_map(|i| (0..s).map(move |j| (i, j)))
            .map(|(i, j)| at(i, ch, j))
            .collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64;
        means[ch] = mean;
        vars[ch] = var;
        let (m, v) = match stats {
            Some((rm, rv)) => (rm[ch] as f64, rv[ch] as f64),
            None => (mean, var),
        };
        for i in 0..n {
            for j in 0..s {
                let xh = (at(i, ch, j) - m) / (v + EPS as f64).sqrt();
                y[(i * c + ch) * s + j] = (xh * w[ch] as f64 + b[ch] as f64) as f32;
            }
        }
    }
    (Tensor::new(d.to_vec(), y).unwrap(), means, vars)
}

/// PyTorch's layer norm in f64 over the last `k` axes.
fn layer_norm_ref(x: &Tensor, k: usize, w: &[f32], b: &[f32]) -> Tensor {
    let d = x.dims();
    let len: usize = d[d.len() - k..].iter().product();
    let mut y = vec![0f32; x.numel()];
    for (row, out) in x.data().chunks(len).zip(y.chunks_mut(len)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
        for (j, (&v, o)) in row.iter().zip(out.iter_mut()).enumerate() {
            let xh = (v as f64 - mean) / (var + EPS as f64).sqrt();
            *o = (xh * w[j] as f64 + b[j] as f64) as f32;
        }
    }
    Tensor::new(d.to_vec(), y).unwrap()
}

/// Values with a per-channel offset and spread, so that normalization has work to do.
fn skewed(shape: &[usize], seed: u64) -> Tensor {
    let mut t = rand(shape, seed);
    let c = shape[1];
    let s: usize = shape[2..].iter().product();
    for (k, v) in t.data_mut().iter_mut().enumerate() {
        let ch = (k / s) % c;
        *v = *v * (1.0 + ch as f32) + 3.0 * ch as f32 - 2.0;
    }
    t
}

const SHAPES: &[&[usize]] = &[
    &[7, 3],           // BatchNorm1d on (N, C)
    &[5, 3, 4],        // BatchNorm1d on (N, C, L)
    &[2, 3, 5, 7],     // BatchNorm2d
    &[1, 4, 3, 3],     // one image
    &[6, 5, 1, 1],     // one position
    &[3, 2, 2, 3, 2],  // BatchNorm3d
    &[2, 2, 48, 48],   // channels of 4,608: statistics in a kernel of their own
    &[1, 2, 131, 131], // channels of 17,161: statistics of 3 blocks (the last shorter), merged
];

#[test]
fn batch_norm_training_matches_the_formula_and_moves_running_stats() {
    for (k, &shape) in SHAPES.iter().enumerate() {
        let c = shape[1];
        let x = skewed(shape, k as u64);
        let w = rand(&[c], 10 + k as u64);
        let b = rand(&[c], 20 + k as u64);
        let (want, means, vars) = batch_norm_ref(&x, w.data(), b.data(), None);
        let count = x.numel() / c;
        let momentum = 0.25f32;
        // running statistics after one step from (0.5, 2.0), PyTorch's update
        let rm0 = 0.5f32;
        let rv0 = 2.0f32;
        let running_mean: Vec<f32> = means
            .iter()
            .map(|&m| ((1.0 - momentum as f64) * rm0 as f64 + momentum as f64 * m) as f32)
            .collect();
        let running_var: Vec<f32> = vars
            .iter()
            .map(|&v| {
                let unbiased = v * count as f64 / (count as f64 - 1.0);
                ((1.0 - momentum as f64) * rv0 as f64 + momentum as f64 * unbiased) as f32
            })
            .collect();

        let devices: Vec<(&str, Device)> = std::iter::once(("cpu", Device::cpu()))
            .chain(gpu().map(|_| ("gpu", Device::gpu().expect("a GPU adapter"))))
            .collect();
        for (which, dev) in devices {
            let what = format!("batch_norm {shape:?} on the {which}");
            let g = Graph::new();
            let xi = g.input("x", shape.to_vec());
            let (wi, bi) = (g.input("w", [c]), g.input("b", [c]));
            let stats = RunningStats {
                mean: g.param_init("bn.running_mean", Tensor::full([c], rm0)),
                var: g.param_init("bn.running_var", Tensor::full([c], rv0)),
                momentum,
            };
            let y = g
                .batch_norm(xi, Some((wi, bi)), Some(stats), true, EPS)
                .unwrap();
            // the plan asks for y only: the running statistics move all the same
            let mut plan = dev.compile(&g, &[y]).unwrap();
            plan.poison(f32::NAN);
            let got = plan
                .run(&[("x", &x), ("w", &w), ("b", &b)])
                .unwrap()
                .remove(0);
            assert_close(&what, &got, &want, 1e-5, 1e-4);
            if which == "gpu" {
                // more than 16,384 elements per channel: blocks of statistics, then a merge;
                // more than 4,096: a statistics kernel of its own, else the normalization's;
                // whichever computes the statistics moves the running ones too
                let k: Vec<String> = plan.kernels().iter().map(|k| k.to_string()).collect();
                let (merged, separate) = ((count > 16384) as usize, (count > 4096) as usize);
                assert_eq!(count_op(&k, "merge_stats"), merged, "{what}: {k:#?}");
                assert_eq!(count_op(&k, "group_stats"), separate, "{what}: {k:#?}");
                assert_eq!(count_op(&k, "running_update"), 0, "{what}: {k:#?}");
            }
            let rm = dev.param("bn.running_mean").unwrap();
            let rv = dev.param("bn.running_var").unwrap();
            assert_close(
                &format!("{what}: running_mean"),
                &rm,
                &Tensor::new([c], running_mean.clone()).unwrap(),
                1e-6,
                1e-5,
            );
            assert_close(
                &format!("{what}: running_var"),
                &rv,
                &Tensor::new([c], running_var.clone()).unwrap(),
                1e-6,
                1e-4,
            );
        }
    }
}

#[test]
fn batch_norm_evaluation_uses_the_running_statistics() {
    for (k, &shape) in SHAPES.iter().enumerate() {
        let c = shape[1];
        let x = skewed(shape, 30 + k as u64);
        let (w, b) = (rand(&[c], 40), rand(&[c], 41));
        let rm = rand(&[c], 42);
        let rv = Tensor::rand_uniform(vec![c], 0.5, 3.0, 43);
        let (want, _, _) = batch_norm_ref(&x, w.data(), b.data(), Some((rm.data(), rv.data())));
        let g = Graph::new();
        let xi = g.input("x", shape.to_vec());
        let stats = RunningStats {
            mean: g.param_init(&format!("eval{k}.running_mean"), rm.clone()),
            var: g.param_init(&format!("eval{k}.running_var"), rv.clone()),
            momentum: 0.1,
        };
        let (wi, bi) = (g.input("w", [c]), g.input("b", [c]));
        let y = g
            .batch_norm(xi, Some((wi, bi)), Some(stats), false, EPS)
            .unwrap();
        assert!(g.state_updates().is_empty(), "evaluation moves nothing");
        let feeds = [("x", &x), ("w", &w), ("b", &b)];
        check_formula(
            &format!("eval {shape:?}"),
            &g,
            y,
            &feeds,
            &want,
            (1e-6, 1e-5),
        );
    }
}

#[test]
fn layer_norm_matches_the_formula() {
    let cases: &[(&[usize], usize)] = &[
        (&[4, 10], 1),
        (&[3, 7, 13], 1),
        (&[2, 3, 5, 4], 2),
        (&[1, 1, 257], 1), // one row longer than a workgroup
        (&[5, 1], 1),      // one value per row: zero variance
        (&[6, 2, 3], 3),   // every axis
    ];
    for (k, &(shape, normalized)) in cases.iter().enumerate() {
        let tail = &shape[shape.len() - normalized..];
        let len: usize = tail.iter().product();
        let x = Tensor::rand_uniform(shape.to_vec(), -3.0, 5.0, k as u64);
        let (w, b) = (rand(tail, 50 + k as u64), rand(tail, 60 + k as u64));
        let want = layer_norm_ref(&x, normalized, w.data(), b.data());
        assert_eq!(w.numel(), len);
        let g = Graph::new();
        let xi = g.input("x", shape.to_vec());
        let (wi, bi) = (g.input("w", tail.to_vec()), g.input("b", tail.to_vec()));
        let y = g.layer_norm(xi, normalized, Some((wi, bi)), EPS).unwrap();
        let feeds = [("x", &x), ("w", &w), ("b", &b)];
        check_formula(
            &format!("layer_norm {shape:?} over {normalized}"),
            &g,
            y,
            &feeds,
            &want,
            (1e-5, 1e-5),
        );
    }
}

#[test]
fn normalization_gradients() {
    // batch norm in training mode: the gradient flows through the batch statistics
    for (k, shape) in [vec![5usize, 3], vec![3, 2, 3, 2], vec![1, 3, 2, 3]]
        .into_iter()
        .enumerate()
    {
        let c = shape[1];
        let g = Graph::new();
        let x = g.input("x", shape.clone());
        let (w, b) = (g.input("w", [c]), g.input("b", [c]));
        let stats = RunningStats {
            mean: g.param(&format!("grad{k}.running_mean"), [c]),
            var: g.param_init(&format!("grad{k}.running_var"), Tensor::full([c], 1.0)),
            momentum: 0.1,
        };
        let y = g
            .batch_norm(x, Some((w, b)), Some(stats), true, EPS)
            .unwrap();
        let loss = random_projection(&g, g.tanh(y).unwrap(), 70 + k as u64);
        let (xv, wv, bv) = (skewed(&shape, k as u64), rand(&[c], 1), rand(&[c], 2));
        gradcheck(
            &format!("batch_norm {shape:?}"),
            &g,
            loss,
            &[("x", x), ("w", w), ("b", b)],
            &[("x", &xv), ("w", &wv), ("b", &bv)],
            36,
            TOL_REDUCTION,
        );
    }
    // evaluation mode: an affine map of x
    let g = Graph::new();
    let x = g.input("x", [4, 3, 2]);
    let stats = RunningStats {
        mean: g.param_init("ev.running_mean", rand(&[3], 5)),
        var: g.param_init("ev.running_var", Tensor::full([3], 0.7)),
        momentum: 0.1,
    };
    let y = g.batch_norm(x, None, Some(stats), false, EPS).unwrap();
    let loss = random_projection(&g, g.square(y).unwrap(), 80);
    let xv = rand(&[4, 3, 2], 6);
    gradcheck(
        "batch_norm eval",
        &g,
        loss,
        &[("x", x)],
        &[("x", &xv)],
        24,
        TOL_REDUCTION,
    );
    // layer norm
    for (k, (shape, normalized)) in [(vec![3usize, 7], 1usize), (vec![2, 3, 4], 2)]
        .into_iter()
        .enumerate()
    {
        let tail = shape[shape.len() - normalized..].to_vec();
        let g = Graph::new();
        let x = g.input("x", shape.clone());
        let (w, b) = (g.input("w", tail.clone()), g.input("b", tail.clone()));
        let y = g.layer_norm(x, normalized, Some((w, b)), EPS).unwrap();
        let loss = random_projection(&g, g.tanh(y).unwrap(), 90 + k as u64);
        let (xv, wv, bv) = (rand(&shape, 7), rand(&tail, 8), rand(&tail, 9));
        gradcheck(
            &format!("layer_norm {shape:?}"),
            &g,
            loss,
            &[("x", x), ("w", w), ("b", b)],
            &[("x", &xv), ("w", &wv), ("b", &bv)],
            36,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn f16_inputs_normalize_in_f32() {
    let Some(dev) = gpu() else { return };
    let shape = [4usize, 3, 5, 5];
    let x = skewed(&shape, 3);
    let g = Graph::new();
    let xi = g.input_as("x", shape.to_vec(), DType::F16);
    let stats = RunningStats {
        mean: g.param("h.running_mean", [3]),
        var: g.param_init("h.running_var", Tensor::full([3], 1.0)),
        momentum: 0.1,
    };
    let y = g.batch_norm(xi, None, Some(stats), true, EPS).unwrap();
    let z = g.layer_norm(xi, 2, None, EPS).unwrap();
    assert_eq!((g.dtype(y), g.dtype(z)), (DType::F16, DType::F16));
    let mut plan = dev.compile(&g, &[y, z]).unwrap();
    plan.poison(f32::NAN);
    let got = plan.run(&[("x", &x)]).unwrap();
    let xr = x.rounded(DType::F16);
    let ones = vec![1f32; 25];
    let zeros = vec![0f32; 25];
    let (want_y, _, _) = batch_norm_ref(&xr, &ones[..3], &zeros[..3], None);
    let want_z = layer_norm_ref(&xr, 2, &ones, &zeros);
    assert_close(
        "f16 batch_norm",
        &got[0],
        &want_y.rounded(DType::F16),
        TOL_F16.0,
        TOL_F16.1,
    );
    assert_close(
        "f16 layer_norm",
        &got[1],
        &want_z.rounded(DType::F16),
        TOL_F16.0,
        TOL_F16.1,
    );
}

#[test]
fn f16_training_and_evaluation_match_the_cpu() {
    let Some(_) = gpu() else { return };
    // mixed precision: f16 activations, f32 parameters, running statistics and loss; the
    // kernels read and write f16 tensors as stored
    let shape = [4usize, 3, 5, 5];
    let g = Graph::new();
    let xi = g.input_as("x", shape.to_vec(), DType::F16);
    let (w, b) = (
        g.param_init("h16.weight", rand(&[3], 1)),
        g.param_init("h16.bias", rand(&[3], 2)),
    );
    let stats = RunningStats {
        mean: g.param("h16.running_mean", [3]),
        var: g.param_init("h16.running_var", Tensor::full([3], 1.0)),
        momentum: 0.1,
    };
    let y = g
        .batch_norm(xi, Some((w, b)), Some(stats), true, EPS)
        .unwrap();
    let (gw, gb) = (
        g.param_init("g16.weight", rand(&[3], 3)),
        g.param_init("g16.bias", rand(&[3], 4)),
    );
    let z = g
        .group_norm(g.relu(y).unwrap(), 3, Some((gw, gb)), EPS)
        .unwrap();
    assert_eq!((g.dtype(y), g.dtype(z)), (DType::F16, DType::F16));
    let loss = random_projection(&g, g.cast(z, DType::F32).unwrap(), 5);
    let grads = g.grad(loss, &[xi, w, b, gw, gb]).unwrap();
    assert_eq!(g.dtype(grads[0]), DType::F16);
    assert!(grads[1..].iter().all(|&p| g.dtype(p) == DType::F32));
    let x = skewed(&shape, 6).rounded(DType::F16);
    let mut outs = vec![loss, z];
    outs.extend(&grads);
    check_gpu_vs_cpu("f16 batch and group norm", &g, &outs, &[("x", &x)], TOL_F16);

    // evaluation: the running statistics in f32, the arithmetic on f16 tensors
    let g = Graph::new();
    let xi = g.input_as("x", shape.to_vec(), DType::F16);
    let stats = RunningStats {
        mean: g.param_init("e16.running_mean", rand(&[3], 7)),
        var: g.param_init(
            "e16.running_var",
            Tensor::rand_uniform(vec![3], 0.5, 2.0, 8),
        ),
        momentum: 0.1,
    };
    let (w, b) = (rand(&[3], 9), rand(&[3], 10));
    let (wi, bi) = (
        g.param_init("e16.weight", w.clone()),
        g.param_init("e16.bias", b.clone()),
    );
    let y = g
        .batch_norm(xi, Some((wi, bi)), Some(stats), false, EPS)
        .unwrap();
    assert_eq!(g.dtype(y), DType::F16);
    let dev = gpu().unwrap();
    let got = dev.compile(&g, &[y]).unwrap().run(&[("x", &x)]).unwrap();
    let (rm, rv) = (
        dev.param("e16.running_mean").unwrap(),
        dev.param("e16.running_var").unwrap(),
    );
    let (want, _, _) = batch_norm_ref(&x, w.data(), b.data(), Some((rm.data(), rv.data())));
    assert_close(
        "f16 evaluation",
        &got[0],
        &want.rounded(DType::F16),
        TOL_F16.0,
        TOL_F16.1,
    );
}

/// A small CNN with batch norm: conv -> bn -> relu -> flatten -> linear.
fn bn_model() -> Sequential {
    let mut init = kiln::nn::Init::new(0);
    let o = kiln::graph::Conv2dOpts::default();
    Sequential::new()
        .layer(kiln::nn::Conv2d::new("conv", 2, 4, (3, 3), o, &mut init))
        .layer(BatchNorm::new("bn", 4))
        .act(kiln::nn::Act::Relu)
        .act(kiln::nn::Act::Flatten)
        .layer(LayerNorm::new("ln", &[4 * 3 * 3]))
        .layer(kiln::nn::Linear::new("fc", 4 * 3 * 3, 3, &mut init))
}

#[test]
fn layers_train_in_one_step_and_evaluate_with_running_statistics() {
    let model = bn_model();
    assert_eq!(
        model.param_names(),
        [
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "ln.weight",
            "ln.bias",
            "fc.weight",
            "fc.bias"
        ]
    );
    let x = rand(&[6, 2, 5, 5], 11);
    let labels = Tensor::new([6], vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]).unwrap();
    let mut results = Vec::new();
    let devices: Vec<Device> = std::iter::once(Device::cpu())
        .chain(gpu().map(|_| Device::gpu().expect("a GPU adapter")))
        .collect();
    for dev in devices {
        let g = Graph::new();
        let xi = g.input("x", [6, 2, 5, 5]);
        let li = g.input("labels", [6]);
        let (logits, params) = model.apply(&g, xi, true).unwrap();
        assert_eq!(params.len(), 8, "running statistics are not trained");
        let loss = g.cross_entropy(logits, li).unwrap();
        let mut step = TrainStep::new(&dev, &g, loss, &params, Optimizer::sgd(0.1), 0).unwrap();
        let mut losses = Vec::new();
        for _ in 0..5 {
            let l = step.step(&[("x", &x), ("labels", &labels)], true).unwrap();
            losses.push(l.unwrap());
        }
        assert!(
            losses[4] < losses[0],
            "training lowers the loss: {losses:?}"
        );
        if !step.plan().kernels().is_empty() {
            // the batch norm: the normalization with scale and shift (computing its
            // statistics itself, groups this small, and moving the running averages), their
            // per-channel gradient sums and the input's gradient, one kernel each; the layer
            // norm: normalization (with its statistics), its gradients (one kernel: the
            // input's and its parameters' sums)
            let labels = step.plan().kernels();
            let count = |name: &str| count_op(&labels, name);
            for (name, want) in [
                ("group_stats", 0),
                ("normalize", 2),
                ("group_sums", 1),
                ("normalize_affine_backward", 1),
                ("normalize_backward_sums", 1),
                ("normalize_backward", 0),
                ("inner_sums", 0),
                ("running_update", 0),
            ] {
                assert_eq!(count(name), want, "{name} in {labels:#?}");
            }
        }
        // five steps from (0, 1): running_mean = (1 - 0.9^5) * (the batch means, which move
        // as the conv trains), so it is well away from 0 and the variance from 1
        let rm = dev.param("bn.running_mean").unwrap();
        let rv = dev.param("bn.running_var").unwrap();
        assert!(rm.data().iter().any(|v| v.abs() > 1e-3), "{rm:?}");
        assert!(rv.data().iter().all(|v| (v - 1.0).abs() > 1e-4), "{rv:?}");

        // an evaluation graph reads the running statistics and moves nothing
        let ge = Graph::new();
        let xe = ge.input("x", [6, 2, 5, 5]);
        let (le, _) = model.apply(&ge, xe, false).unwrap();
        assert!(ge.state_updates().is_empty());
        let mut eval = dev.compile(&ge, &[le]).unwrap();
        let out = eval.run(&[("x", &x)]).unwrap().remove(0);
        let again = eval.run(&[("x", &x)]).unwrap().remove(0);
        assert_eq!(out.data(), again.data(), "evaluation is repeatable");
        assert_eq!(dev.param("bn.running_mean").unwrap().data(), rm.data());
        results.push((losses, out, rm, rv));
    }
    if let [(lc, oc, mc, vc), (lg, og, mg, vg)] = &results[..] {
        for (a, b) in lg.iter().zip(lc) {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-3 * b.abs(),
                "losses {lg:?} vs {lc:?}"
            );
        }
        assert_close("running_mean gpu vs cpu", mg, mc, 1e-5, 1e-3);
        assert_close("running_var gpu vs cpu", vg, vc, 1e-5, 1e-3);
        assert_close("eval logits gpu vs cpu", og, oc, 1e-4, 1e-3);
    }
}

#[test]
fn normalization_errors_name_the_op() {
    let g = Graph::new();
    let x = g.input("x", [4, 3, 2]);
    let rm = g.param("rm", [3]);
    let rv = g.param("rv", [3]);
    let stats = RunningStats {
        mean: rm,
        var: rv,
        momentum: 0.1,
    };
    let shape_error = |r: kiln::Result<kiln::NodeId>, op: &str, part: &str| match r {
        Err(Error::Shape { op: o, msg }) => {
            assert_eq!(o, op, "{msg}");
            assert!(msg.contains(part), "{op}: {msg:?} lacks {part:?}");
        }
        other => panic!("{op}: expected a shape error, got {other:?}"),
    };
    let w4 = g.input("w4", [4]);
    shape_error(
        g.batch_norm(x, Some((w4, w4)), None, true, EPS),
        "batch_norm",
        "weight [4] must be [3]",
    );
    shape_error(
        g.batch_norm(x, None, None, false, EPS),
        "batch_norm",
        "running statistics",
    );
    let one = g.input("one", [1, 3]);
    shape_error(
        g.batch_norm(one, None, Some(stats), true, EPS),
        "batch_norm",
        "more than one value per channel",
    );
    let flat = g.input("flat", [5]);
    shape_error(
        g.batch_norm(flat, None, None, true, EPS),
        "batch_norm",
        "at least 2 axes",
    );
    shape_error(g.batch_norm(x, None, Some(stats), true, 0.0), "norm", "eps");
    shape_error(g.layer_norm(x, 4, None, EPS), "layer_norm", "last 4 axes");
    let w2 = g.input("w2", [3, 3]);
    shape_error(
        g.layer_norm(x, 2, Some((w2, w2)), EPS),
        "layer_norm",
        "must be [3, 2]",
    );
    let v = g.input("v", [3]);
    shape_error(
        g.running_update(&[v], v, 0.1, &[1.0]),
        "running_update",
        "parameter",
    );
    shape_error(
        g.running_update(&[rm], v, 1.5, &[1.0]),
        "running_update",
        "momentum",
    );
    let long = g.input("long", [4]);
    shape_error(
        g.running_update(&[rm], long, 0.1, &[1.0]),
        "running_update",
        "must be [3]",
    );
    shape_error(
        g.running_update(&[rm, rv], v, 0.1, &[1.0, 1.0]),
        "running_update",
        "must be [2, 3]",
    );
    shape_error(
        g.running_update(&[rm, rv], v, 0.1, &[1.0]),
        "running_update",
        "a scale each",
    );
    // one running average of a plain vector, run by the plan that computes its value
    let m = g.mean(x, 0, false).unwrap(); // (3, 2)
    let m = g.mean(m, 1, false).unwrap(); // (3)
    let r = g.param("r", [3]);
    g.running_update(&[r], m, 0.5, &[2.0]).unwrap();
    let dev = Device::cpu();
    let xv = rand(&[4, 3, 2], 1);
    let mut plan = dev.compile(&g, &[m]).unwrap();
    let mv = plan.run(&[("x", &xv)]).unwrap().remove(0);
    let rv_now = dev.param("r").unwrap();
    for (a, b) in rv_now.data().iter().zip(mv.data()) {
        assert!(
            (a - b).abs() < 1e-6,
            "0.5 * 0 + 0.5 * 2 * m = m: {a} vs {b}"
        );
    }
    let ln = LayerNorm::new("ln", &[5]);
    assert!(ln.apply(&g, x).is_err(), "x does not end in (5)");
    shape_error(
        g.group_norm(x, 2, None, EPS),
        "group_norm",
        "do not split into 2 groups",
    );
    shape_error(g.group_norm(x, 0, None, EPS), "group_norm", "0 groups");
    shape_error(
        g.group_norm(flat, 1, None, EPS),
        "group_norm",
        "at least 2 axes",
    );
    shape_error(
        g.group_norm(x, 3, Some((w4, w4)), EPS),
        "group_norm",
        "weight [4] must be [3]",
    );
}

#[test]
fn verify_finds_no_divergence_in_a_batch_norm_step() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [5, 3, 4, 3]);
    let model = Sequential::new()
        .layer(BatchNorm::new("vbn", 3))
        .act(kiln::nn::Act::Relu)
        .act(kiln::nn::Act::Flatten)
        .layer(LayerNorm::new("vln", &[36]));
    let (y, params) = model.apply(&g, x, true).unwrap();
    let loss = random_projection(&g, y, 5);
    let grads = g.grad(loss, &params).unwrap();
    let xv = skewed(&[5, 3, 4, 3], 9);
    let mut outs = vec![loss];
    outs.extend(grads);
    let report = dev.verify(&g, &outs, &[("x", &xv)]).unwrap();
    assert!(report.ok(), "{report}");
}

/// Rows of every width share workgroups (a few threads per small row, `threads_per_group`):
/// one to many rows per workgroup, widths that are not multiples of the threads, a last
/// workgroup with rows past the end; statistics and gradients against the CPU reference, with
/// and without the per-feature scale and shift (inside the normalization: its gradients from
/// column sums in the input gradient's kernel, several workgroups of 64 columns for the wide
/// rows).
#[test]
fn layer_norm_rows_share_workgroups() {
    for width in [1usize, 3, 5, 13, 64, 100, 513, 1500] {
        for rows in [1usize, 7, 300] {
            for affine in [false, true] {
                let seed = (width + rows) as u64;
                let x = Tensor::rand_uniform(vec![rows, width], -3.0, 5.0, seed);
                let (w, b) = match affine {
                    true => (rand(&[width], seed + 1), rand(&[width], seed + 2)),
                    false => (Tensor::full([width], 1.0), Tensor::zeros([width])),
                };
                let want = layer_norm_ref(&x, 1, w.data(), b.data());
                let g = Graph::new();
                let xi = g.input("x", [rows, width]);
                let (wi, bi) = (g.input("w", [width]), g.input("b", [width]));
                let params = affine.then_some((wi, bi));
                let y = g.layer_norm(xi, 1, params, EPS).unwrap();
                let what = format!("layer_norm of {rows} rows of {width}, affine {affine}");
                let feeds = [("x", &x), ("w", &w), ("b", &b)];
                let feeds = if affine { &feeds[..] } else { &feeds[..1] };
                check_formula(&what, &g, y, feeds, &want, (1e-5, 1e-5));
                let loss = random_projection(&g, y, 7);
                let wrt = if affine { vec![xi, wi, bi] } else { vec![xi] };
                let grads = g.grad(loss, &wrt).unwrap();
                check_gpu_vs_cpu(&what, &g, &grads, feeds, TOL_REDUCTION);
                if let (Some(dev), true) = (gpu(), affine) {
                    // statistics and the affine normalization; the input's gradient with the
                    // column sums (besides the projection's gradient): no separate scale and
                    // shift, forward or backward
                    let plan = dev.compile(&g, &[&[y], &grads[..]].concat()).unwrap();
                    let k = plan.kernels();
                    let count = |s: &str| k.iter().filter(|l| l.contains(s)).count();
                    assert_eq!(count("normalize "), 1, "{what}: {k:?}");
                    // the rows' statistics inside the normalization's kernel
                    assert_eq!(count("group_stats"), 0, "{what}: {k:?}");
                    assert_eq!(count("normalize_backward_sums"), 1, "{what}: {k:?}");
                    assert_eq!(count("normalize_backward "), 0, "{what}: {k:?}");
                    assert_eq!(count("inner_sums"), 0, "{what}: {k:?}");
                    // (the projection's gradient, its weights times the loss's broadcast
                    // gradient, may be a kernel of its own: `fused [..] [mul@..]`)
                    let fused = k
                        .iter()
                        .filter(|l| l.contains("fused") && !l.contains("[mul@"));
                    // (by the op's name: a fused kernel's hash may hold "add")
                    let by_op = |op: &str| common::count_op(&k, op);
                    assert_eq!(by_op("sum") + fused.count() + by_op("add"), 0, "{k:?}");
                }
            }
        }
    }
}

#[test]
fn seventy_thousand_rows() {
    // 70,000 rows of 3, 256 to a workgroup (a grid folded into two dimensions once took a
    // workgroup per row; now only groups of 513 or more elements take a workgroup each)
    let g = Graph::new();
    let x = g.input("x", [70_000, 3]);
    let y = g.layer_norm(x, 1, None, EPS).unwrap();
    let xv = Tensor::rand_uniform(vec![70_000, 3], -2.0, 2.0, 4);
    let want = layer_norm_ref(&xv, 1, &[1.0; 3], &[0.0; 3]);
    check_formula("70,000 rows", &g, y, &[("x", &xv)], &want, (1e-5, 1e-5));
}

/// PyTorch's group norm in f64: `x (N, C, *)`, `groups` groups of channels, per-channel affine.
fn group_norm_ref(x: &Tensor, groups: usize, w: &[f32], b: &[f32]) -> Tensor {
    let d = x.dims();
    let (n, c) = (d[0], d[1]);
    let s: usize = d[2..].iter().product();
    let len = c / groups * s;
    let mut y = vec![0f32; x.numel()];
    for (k, (chunk, out)) in x.data().chunks(len).zip(y.chunks_mut(len)).enumerate() {
        assert!(k < n * groups);
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = chunk
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / len as f64;
        for (j, (&v, o)) in chunk.iter().zip(out.iter_mut()).enumerate() {
            let ch = (k % groups) * (c / groups) + j / s;
            let xh = (v as f64 - mean) / (var + EPS as f64).sqrt();
            *o = (xh * w[ch] as f64 + b[ch] as f64) as f32;
        }
    }
    Tensor::new(d.to_vec(), y).unwrap()
}

#[test]
fn group_and_instance_norm_match_the_formula() {
    let cases: &[(&[usize], usize)] = &[
        (&[2, 6, 5], 3),
        (&[3, 4, 3, 3], 2),
        (&[1, 5, 7, 1], 5), // instance norm
        (&[4, 3], 1),       // one group, no spatial axes
        (&[2, 4, 17, 19], 4),
    ];
    for (k, &(shape, groups)) in cases.iter().enumerate() {
        let c = shape[1];
        let x = skewed(shape, 100 + k as u64);
        let (w, b) = (rand(&[c], 1), rand(&[c], 2));
        let want = group_norm_ref(&x, groups, w.data(), b.data());
        let g = Graph::new();
        let xi = g.input("x", shape.to_vec());
        let (wi, bi) = (g.input("w", [c]), g.input("b", [c]));
        let y = g.group_norm(xi, groups, Some((wi, bi)), EPS).unwrap();
        let feeds = [("x", &x), ("w", &w), ("b", &b)];
        check_formula(
            &format!("group_norm {shape:?} in {groups} groups"),
            &g,
            y,
            &feeds,
            &want,
            (1e-5, 1e-5),
        );
    }
    // the layers: GroupNorm's names; InstanceNorm has none and normalizes each channel
    let g = Graph::new();
    let x = g.input("x", [2, 4, 3, 3]);
    let gn = GroupNorm::new("gn", 2, 4);
    assert_eq!(gn.param_names(), ["gn.weight", "gn.bias"]);
    let (_, p) = gn.apply(&g, x).unwrap();
    assert_eq!(p.len(), 2);
    let inst = GroupNorm::instance("in", 4);
    assert!(inst.param_names().is_empty());
    let (y, p) = inst.apply(&g, x).unwrap();
    assert!(p.is_empty());
    let xv = skewed(&[2, 4, 3, 3], 7);
    let got = Device::cpu()
        .compile(&g, &[y])
        .unwrap()
        .run(&[("x", &xv)])
        .unwrap();
    let want = group_norm_ref(&xv, 4, &[1.0; 4], &[0.0; 4]);
    assert_close("instance norm", &got[0], &want, 1e-5, 1e-5);
    assert!(
        GroupNorm::new("bad", 2, 6).apply(&g, x).is_err(),
        "4 channels, not 6"
    );

    // gradients through each sample's group statistics
    let g = Graph::new();
    let x = g.input("x", [2, 4, 3, 2]);
    let (w, b) = (g.input("w", [4]), g.input("b", [4]));
    let y = g.group_norm(x, 2, Some((w, b)), EPS).unwrap();
    let loss = random_projection(&g, g.tanh(y).unwrap(), 3);
    let (xv, wv, bv) = (skewed(&[2, 4, 3, 2], 4), rand(&[4], 5), rand(&[4], 6));
    gradcheck(
        "group_norm",
        &g,
        loss,
        &[("x", x), ("w", w), ("b", b)],
        &[("x", &xv), ("w", &wv), ("b", &bv)],
        36,
        TOL_REDUCTION,
    );
}

/// RMS normalization (`torch.nn.RMSNorm`) against its formula in f64 over one and two trailing
/// axes, torch's default eps; two kernels forward; gradients against central differences; f16.
#[test]
fn rms_norm_matches_torch_formula() {
    use kiln::nn::RmsNorm;
    for (shape, k) in [
        (&[4usize, 7][..], 1usize),
        (&[2, 3, 5, 4][..], 2),
        (&[1, 257][..], 1),
    ] {
        let x = skewed_rows(shape, 11);
        let d: usize = shape[shape.len() - k..].iter().product();
        let w = rand(&shape[shape.len() - k..], 12);
        let g = Graph::new();
        let xi = g.input("x", shape.to_vec());
        let wi = g.input("w", shape[shape.len() - k..].to_vec());
        let y = g.rms_norm(xi, k, Some(wi), None).unwrap();
        let want: Vec<f32> = x
            .data()
            .chunks(d)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (ms + f32::EPSILON as f64).sqrt();
                row.iter()
                    .zip(w.data())
                    .map(move |(&v, &wj)| (v as f64 * r * wj as f64) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let want = Tensor::new(shape.to_vec(), want).unwrap();
        let feeds = [("x", &x), ("w", &w)];
        check_formula(
            &format!("rms_norm {shape:?}"),
            &g,
            y,
            &feeds,
            &want,
            TOL_REDUCTION,
        );
        let loss = random_projection(&g, y, 13);
        gradcheck(
            &format!("rms_norm {shape:?}"),
            &g,
            loss,
            &[("x", xi), ("w", wi)],
            &feeds,
            40,
            TOL_REDUCTION,
        );
    }
    let layer = RmsNorm::new("rms", &[8]);
    assert_eq!(layer.param_names(), ["rms.weight"]);
    let g = Graph::new();
    let x = g.input("x", [3, 8]);
    let (y, params) = layer.apply(&g, x).unwrap();
    assert_eq!(params.len(), 1);
    if let Some(dev) = gpu() {
        let plan = dev.compile(&g, &[y]).unwrap();
        assert_eq!(plan.kernels().len(), 2, "{:?}", plan.kernels());
        if dev.features().contains(wgpu::Features::SHADER_F16) {
            let g = Graph::new();
            let xh = g.input_as("x", [3, 8], DType::F16);
            let (yh, _) = layer.apply(&g, xh).unwrap();
            assert_eq!(g.dtype(yh), DType::F16);
            let xv = rand(&[3, 8], 14);
            check_gpu_vs_cpu("rms_norm f16", &g, &[yh], &[("x", &xv)], TOL_F16);
        }
    }
    match layer.apply(&g, g.input("bad", [3, 7])) {
        Err(Error::Shape { op, .. }) => assert_eq!(op, "rms_norm"),
        other => panic!("expected a shape error, got {other:?}"),
    }
}

/// Rows with their own offset and spread.
fn skewed_rows(shape: &[usize], seed: u64) -> Tensor {
    let mut t = rand(shape, seed);
    let last = shape[shape.len() - 1];
    for (k, v) in t.data_mut().iter_mut().enumerate() {
        let row = (k / last) as f32;
        *v = *v * (1.0 + row * 0.5) + 0.3 * row;
    }
    t
}

/// Element types the GPU tests of f16 activations run in: f32, and f16 where the adapter has it.
fn activation_types(dev: &Device) -> Vec<DType> {
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    [DType::F32, DType::F16]
        .into_iter()
        .filter(|&d| d == DType::F32 || half)
        .collect()
}

/// The gradients of `loss` for `wrt` (cast to f32) on `dev`, outputs poisoned with NaN, against
/// the CPU reference at the tolerance of activations of `dtype`; the plan's kernel labels.
fn check_gradients(
    dev: &Device,
    what: &str,
    g: &Graph,
    loss: kiln::NodeId,
    wrt: &[kiln::NodeId],
    feeds: &[(String, Tensor)],
    dtype: DType,
) -> Vec<String> {
    let grads = g.grad(loss, wrt).unwrap();
    let outs: Vec<_> = grads
        .iter()
        .map(|&d| g.cast(d, DType::F32).unwrap())
        .collect();
    let tol = if dtype == DType::F16 {
        TOL_F16
    } else {
        TOL_REDUCTION
    };
    let plan = check_plan(dev, what, g, &outs, feeds, tol);
    plan.kernels().iter().map(|k| k.to_string()).collect()
}

/// A pre-norm residual block `x + f(layer_norm(x))`: the layer norm's input gradient and the
/// one through the residual connection add up inside the layer norm's backward kernel (no
/// `add` kernel), which also sums the parameters' gradients (no `inner_sums` kernel), in f32
/// and f16, on rows of 1, 13 and 64 features, reached through a reshape of the (B, L, E)
/// tensor; against the CPU reference, outputs poisoned with NaN.
#[test]
fn residual_gradients_add_inside_the_layer_norm_backward() {
    let Some(dev) = gpu() else { return };
    for dtype in activation_types(&dev) {
        for (b, l, e) in [(2usize, 3usize, 13usize), (1, 1, 1), (3, 5, 64)] {
            let what = format!("residual block ({b}, {l}, {e}) {dtype}");
            let g = Graph::new();
            let x = g.input_as("x", [b, l, e], dtype);
            let (w, bias) = (g.input("w", [e]), g.input("b", [e]));
            let h = g.layer_norm(x, 1, Some((w, bias)), EPS).unwrap();
            let h = g.tanh(g.mul_scalar(h, 0.5).unwrap()).unwrap();
            let y = g.add(x, h).unwrap();
            let loss = random_projection(&g, g.cast(y, DType::F32).unwrap(), 3);
            let feeds = [
                ("x".to_string(), rand(&[b, l, e], 4)),
                ("w".to_string(), rand(&[e], 5)),
                ("b".to_string(), rand(&[e], 6)),
            ];
            let k = check_gradients(&dev, &what, &g, loss, &[x, w, bias], &feeds, dtype);
            assert_eq!(count_op(&k, "normalize_backward_sums"), 1, "{what}: {k:#?}");
            assert_eq!(count_op(&k, "inner_sums"), 0, "{what}: {k:#?}");
            assert_eq!(count_op(&k, "add"), 0, "{what}: {k:#?}");
        }
    }
}

/// A layer norm over more than 1,024 rows sums its parameters' gradients in blocks of 512 rows
/// (each block its own workgroups and partial sums, after the input gradient's in its kernel),
/// then adds the blocks up: the gradients of x, weight and bias against the CPU reference (f32
/// and f16 activations), and the plan's kernels.
#[test]
fn layer_norm_parameter_gradients_over_many_rows() {
    let Some(dev) = gpu() else { return };
    for dtype in activation_types(&dev) {
        for (rows, width) in [(1025usize, 13usize), (3000, 70)] {
            let what = format!("layer norm of {rows} rows of {width}, {dtype}");
            let g = Graph::new();
            let x = g.input_as("x", [rows, width], dtype);
            let (w, b) = (g.input("w", [width]), g.input("b", [width]));
            let y = g.layer_norm(x, 1, Some((w, b)), EPS).unwrap();
            let loss = random_projection(&g, g.cast(y, DType::F32).unwrap(), 8);
            let feeds = [
                ("x".to_string(), rand(&[rows, width], 1)),
                ("w".to_string(), rand(&[width], 2)),
                ("b".to_string(), rand(&[width], 3)),
            ];
            let k = check_gradients(&dev, &what, &g, loss, &[x, w, b], &feeds, dtype);
            assert_eq!(count_op(&k, "inner_sums"), 0, "{what}: {k:#?}");
            assert_eq!(count_op(&k, "normalize_backward_sums"), 1, "{what}: {k:#?}");
            // the blocks' partial sums (split: the plan has a sum of them), added up after the
            // kernel that wrote them
            let at = |name: &str| {
                k.iter()
                    .position(|s| s.split_whitespace().nth(2) == Some(name))
            };
            assert_eq!(count_op(&k, "sum"), 1, "{what}: {k:#?}");
            assert!(
                at("normalize_backward_sums") < at("sum"),
                "{what}: blocks of 512 rows: {k:#?}"
            );
        }
    }
}

/// A batch norm whose channels hold more than 16,384 elements computes its statistics and sums
/// its parameters' gradients in blocks of up to 8,192 elements of every channel, then merges
/// the blocks' statistics and adds their sums up: the gradients of x, weight and bias against
/// the CPU reference (f32 and f16 activations), and the plan's kernels.
#[test]
fn batch_norm_parameter_gradients_over_large_channels() {
    let Some(dev) = gpu() else { return };
    for dtype in activation_types(&dev) {
        let shape = [2usize, 3, 100, 99];
        let what = format!("batch norm {shape:?}, {dtype}");
        let g = Graph::new();
        let x = g.input_as("x", shape, dtype);
        let (w, b) = (g.input("w", [3]), g.input("b", [3]));
        let y = g.batch_norm(x, Some((w, b)), None, true, EPS).unwrap();
        let loss = random_projection(&g, g.cast(y, DType::F32).unwrap(), 9);
        let feeds = [
            ("x".to_string(), skewed(&shape, 1)),
            ("w".to_string(), rand(&[3], 2)),
            ("b".to_string(), rand(&[3], 3)),
        ];
        let k = check_gradients(&dev, &what, &g, loss, &[x, w, b], &feeds, dtype);
        // 19,800 elements per channel: 3 blocks
        assert!(
            k.iter()
                .any(|s| s.contains("group_sums") && s.contains("[3, 2, 128]")),
            "{what}: {k:#?}"
        );
        assert!(
            k.iter()
                .any(|s| s.contains("group_stats") && s.contains("[3, 2, 3]")),
            "{what}: {k:#?}"
        );
        assert_eq!(count_op(&k, "merge_stats"), 1, "{what}: {k:#?}");
    }
}

/// conv-BN-ReLU: the relu after a batch norm runs in the normalization's kernel (statistics of
/// their own: small channels; in blocks: large ones; inside the normalization: a few hundred
/// elements; through the reshape back to NCHW), in training (the running statistics moving,
/// the statistics viewed past the fused output by the backward) and in evaluation; after a
/// convolution, the batch norm's input gradient is stored channels first for the
/// convolution's backward (no permute); f32 and f16 activations; a normalization something
/// else reads too keeps its relu kernel. Outputs,
/// gradients and running statistics against the CPU reference, outputs poisoned with NaN.
#[test]
fn batch_norm_relu_is_one_kernel() {
    let Some(dev) = gpu() else { return };
    for dtype in activation_types(&dev) {
        for shape in [[4usize, 3, 5, 7], [2, 3, 100, 99], [3, 2, 1, 1]] {
            for train in [true, false] {
                let what = format!("bn-relu {shape:?}, {dtype}, train {train}");
                let g = Graph::new();
                let x = g.input_as("x", shape, dtype);
                let (w, b) = (g.input("w", [shape[1]]), g.input("b", [shape[1]]));
                // names of their own: a training plan moves them on the device
                let c = shape[1];
                let name = format!("bnr.{}.{}.{}", shape[2], dtype, train);
                let running = RunningStats {
                    mean: g.param_init(&format!("{name}.mean"), rand(&[c], 4)),
                    var: g.param_init(
                        &format!("{name}.var"),
                        Tensor::rand_uniform(vec![c], 0.5, 3.0, 5),
                    ),
                    momentum: 0.1,
                };
                let y = g
                    .batch_norm(x, Some((w, b)), Some(running), train, EPS)
                    .unwrap();
                let y = g.cast(g.relu(y).unwrap(), DType::F32).unwrap();
                let feeds = [
                    ("x".to_string(), skewed(&shape, 1)),
                    ("w".to_string(), rand(&[shape[1]], 2)),
                    ("b".to_string(), rand(&[shape[1]], 3)),
                ];
                let tol = if dtype == DType::F16 {
                    TOL_F16
                } else {
                    TOL_REDUCTION
                };
                let mut outs = vec![y];
                if train {
                    let loss = random_projection(&g, y, 9);
                    let grads = g.grad(loss, &[x, w, b]).unwrap();
                    outs.extend(grads.iter().map(|&d| g.cast(d, DType::F32).unwrap()));
                }
                let plan = check_plan(&dev, &what, &g, &outs, &feeds, tol);
                let k: Vec<String> = plan.kernels().iter().map(|s| s.to_string()).collect();
                assert_eq!(count_op(&k, "relu"), 0, "{what}: {k:#?}");
            }
        }
        // after a convolution (training): the input gradient stored channels first for the
        // convolution's backward, no permute
        let g = Graph::new();
        let x = g.input_as("x", [3, 2, 7, 6], dtype);
        let cw = g.cast(g.input("cw", [4, 2, 3, 3]), dtype).unwrap();
        let h = g
            .conv2d_fused(x, cw, None, kiln::ops::conv::Conv2dOpts::default(), false)
            .unwrap();
        let (w, b) = (g.input("w", [4]), g.input("b", [4]));
        let y = g.batch_norm(h, Some((w, b)), None, true, EPS).unwrap();
        let y = g.cast(g.relu(y).unwrap(), DType::F32).unwrap();
        let loss = random_projection(&g, y, 10);
        let grads = g.grad(loss, &[x, w, b]).unwrap();
        let mut outs = vec![y];
        outs.extend(grads.iter().map(|&d| g.cast(d, DType::F32).unwrap()));
        let feeds = [
            ("x".to_string(), skewed(&[3, 2, 7, 6], 6)),
            ("cw".to_string(), rand(&[4, 2, 3, 3], 7)),
            ("w".to_string(), rand(&[4], 8)),
            ("b".to_string(), rand(&[4], 9)),
        ];
        let tol = if dtype == DType::F16 {
            TOL_F16
        } else {
            TOL_REDUCTION
        };
        let what = format!("conv-bn-relu, {dtype}");
        let plan = check_plan(&dev, &what, &g, &outs, &feeds, tol);
        let k: Vec<String> = plan.kernels().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            count_op(&k, "relu") + count_op(&k, "permute"),
            0,
            "{what}: {k:#?}"
        );
        // the normalization requested too: its relu stays a kernel
        let g = Graph::new();
        let x = g.input_as("x", [4, 3, 5, 7], dtype);
        let (w, b) = (g.input("w", [3]), g.input("b", [3]));
        let y = g.batch_norm(x, Some((w, b)), None, true, EPS).unwrap();
        let r = g.relu(y).unwrap();
        let outs = [
            g.cast(r, DType::F32).unwrap(),
            g.cast(y, DType::F32).unwrap(),
        ];
        let feeds = [
            ("x".to_string(), skewed(&[4, 3, 5, 7], 1)),
            ("w".to_string(), rand(&[3], 2)),
            ("b".to_string(), rand(&[3], 3)),
        ];
        let plan = check_plan(&dev, "also requested", &g, &outs, &feeds, TOL_F16);
        let k: Vec<String> = plan.kernels().iter().map(|s| s.to_string()).collect();
        // (its own kernel, or fused with the cast after it)
        let relus = k.iter().filter(|s| s.contains("relu")).count();
        assert_eq!(relus, 1, "{k:#?}");
    }
}

/// A layer norm followed by relu in training: the relu runs in the normalization's kernel,
/// which also keeps the rows' statistics past its result for the backward; the room for them
/// counts the rows (13), not the node's last extent (3, the relu's shape: a buffer too small
/// for the statistics was found by tests/random_graphs.rs). Gradients against the CPU
/// reference, outputs poisoned with NaN.
#[test]
fn layer_norm_then_relu_keeps_its_rows_statistics() {
    let Some(dev) = gpu() else { return };
    for (rows, width) in [(13usize, 3usize), (4, 1), (2, 64)] {
        let what = format!("layer norm then relu, {rows} x {width}");
        let g = Graph::new();
        let x = g.input("x", [rows, width]);
        let (w, b) = (g.input("w", [width]), g.input("b", [width]));
        let y = g
            .relu(g.layer_norm(x, 1, Some((w, b)), EPS).unwrap())
            .unwrap();
        let loss = random_projection(&g, y, 4);
        let feeds = [
            ("x".to_string(), rand(&[rows, width], 5)),
            ("w".to_string(), rand(&[width], 6)),
            ("b".to_string(), rand(&[width], 7)),
        ];
        let k = check_gradients(&dev, &what, &g, loss, &[x, w, b], &feeds, DType::F32);
        assert_eq!(count_op(&k, "group_stats"), 0, "{what}: {k:#?}");
    }
}
