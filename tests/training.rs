//! Training: losses, dropout and the fused optimizer kernels on the GPU against the CPU reference;
//! the update rules against torch.optim's textbook formulas; a training step is one plan whose
//! loss goes down; schedules.

mod common;

use common::{assert_close, check_gpu_vs_cpu, gpu, gradcheck, rand};
use kiln::nn::{GradScaler, Init, Linear, Optimizer, Schedule, TrainStep};
use kiln::ops::TOL_REDUCTION;
use kiln::{Device, Graph, Tensor};

#[test]
fn cross_entropy_matches_and_differentiates() {
    let g = Graph::new();
    let x = g.input("x", [7, 5]);
    let y = g.input("y", [7]);
    let loss = g.cross_entropy(x, y).unwrap();
    let labels = Tensor::new([7], vec![0., 4., 2., 2., 1., 3., 0.]).unwrap();
    let logits = Tensor::rand_uniform(vec![7, 5], -3.0, 3.0, 1);
    check_gpu_vs_cpu(
        "cross_entropy",
        &g,
        &[loss],
        &[("x", &logits), ("y", &labels)],
        TOL_REDUCTION,
    );
    gradcheck(
        "cross_entropy",
        &g,
        loss,
        &[("x", x)],
        &[("x", &logits), ("y", &labels)],
        35,
        TOL_REDUCTION,
    );
    // the same as log_softmax + pick, and stable for huge logits
    let big = Tensor::new([7, 5], (0..35).map(|i| (i as f32 - 17.0) * 100.0).collect()).unwrap();
    let mut plan = Device::cpu().compile(&g, &[loss]).unwrap();
    let v = plan.run(&[("x", &big), ("y", &labels)]).unwrap()[0].data()[0];
    assert!(v.is_finite(), "{v}");
    // a label out of range gives NaN rather than a wrong number
    let bad = Tensor::new([7], vec![0., 5., 2., 2., 1., 3., 0.]).unwrap();
    assert!(plan.run(&[("x", &logits), ("y", &bad)]).unwrap()[0].data()[0].is_nan());
    if let Some(dev) = gpu() {
        let mut p = dev.compile(&g, &[loss]).unwrap();
        assert!(p.run(&[("x", &logits), ("y", &bad)]).unwrap()[0].data()[0].is_nan());
    }
}

/// Cross-entropy over many logits (a language model's tokens times its vocabulary) runs a few
/// threads per row over the whole GPU, then a mean; its gradient too for rows of more than 16
/// classes. Loss and gradient against the CPU reference (outputs poisoned with NaN) on rows of
/// a prime 40,009 classes (a workgroup per row), 600 rows of 500 (rows past the last in the
/// last workgroup) and a batch of rows of 37 (the one-workgroup loss, the per-row gradient);
/// f16 logits; a bad label is NaN in the loss and in its row's gradient only. Small f32 losses
/// (13 x 37, 300 x 10: threads folding two rows, 1 x 1) compute their gradient in the loss's
/// kernel (`CrossEntropy::with_grad`), and so do larger ones (256 x 97 too) in their row
/// kernel (`CrossEntropyRows::with_grad`): no backward kernel (f16 ones only where products alone
/// read the gradient, not a cast as here: `tests/f16.rs`). Rows whose logits rise along the row
/// to 400 (each one a new maximum: the one-pass statistics rescale at every step, and an
/// exponential taken without the maximum would overflow) as the f64 reference.
#[test]
fn cross_entropy_over_large_vocabularies_runs_per_row() {
    let Some(dev) = gpu() else { return };
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    for (n, c, dtype) in [
        (5usize, 70_001usize, kiln::DType::F32),
        (7, 40_009, kiln::DType::F32),
        (256, 97, kiln::DType::F32),
        (256, 97, kiln::DType::F16),
        (600, 500, kiln::DType::F32),
        (13, 37, kiln::DType::F32),
        (300, 10, kiln::DType::F32),
        (1, 1, kiln::DType::F32),
        (600, 500, kiln::DType::F16),
        (13, 37, kiln::DType::F16),
    ] {
        if dtype == kiln::DType::F16 && !half {
            continue;
        }
        let what = format!("cross_entropy ({n}, {c}) {dtype}");
        let g = Graph::new();
        let x = g.input_as("x", [n, c], dtype);
        let y = g.input("y", [n]);
        let loss = g.cross_entropy(x, y).unwrap();
        let dx = g
            .cast(g.grad(loss, &[x]).unwrap()[0], kiln::DType::F32)
            .unwrap();
        let logits = match c {
            70_001 => Tensor::new(
                [n, c],
                (0..n * c)
                    .map(|k| (k % c) as f32 * 0.01 - 300.0 + (k / c) as f32)
                    .collect(),
            )
            .unwrap(),
            _ => Tensor::rand_uniform(vec![n, c], -4.0, 4.0, 5),
        };
        let labels: Vec<f32> = (0..n).map(|i| ((i * 7919) % c) as f32).collect();
        let feeds = [
            ("x".to_string(), logits.clone()),
            ("y".to_string(), Tensor::new([n], labels.clone()).unwrap()),
        ];
        let tol = match dtype {
            kiln::DType::F16 => kiln::ops::TOL_F16,
            _ => TOL_REDUCTION,
        };
        let plan = common::check_plan(&dev, &what, &g, &[loss, dx], &feeds, tol);
        let rows = plan
            .kernels()
            .iter()
            .any(|k| k.contains("cross_entropy_rows"));
        // (in training beyond what one workgroup computes with its gradient too, where the
        // row kernel can compute it: f32 here, the f16 gradient being cast)
        let mid = n * c > kiln::ops::loss::WITH_GRAD_MAX && dtype == kiln::DType::F32;
        assert_eq!(
            rows,
            n * c > kiln::ops::loss::ONE_WORKGROUP_MAX || mid,
            "{what}"
        );
        let with_loss =
            dtype == kiln::DType::F32 && (n * c <= kiln::ops::loss::WITH_GRAD_MAX || rows);
        let backward = common::count_op(&plan.kernels(), "cross_entropy_backward");
        assert_eq!(
            backward,
            !with_loss as usize,
            "{what}: {:#?}",
            plan.kernels()
        );
        // a label out of range: the loss and that row's gradient are NaN, the others not
        let mut bad = labels;
        bad[n / 2] = c as f32;
        if n == 1 {
            continue;
        }
        let mut plan = dev.compile(&g, &[loss, dx]).unwrap();
        let out = plan
            .run(&[("x", &logits), ("y", &Tensor::new([n], bad).unwrap())])
            .unwrap();
        assert!(out[0].data()[0].is_nan(), "{what}");
        let row = |i: usize| &out[1].data()[i * c..(i + 1) * c];
        assert!(row(n / 2).iter().all(|v| v.is_nan()), "{what}");
        assert!(row(0).iter().all(|v| v.is_finite()), "{what}");
    }
}

/// torch's `ignore_index`, `label_smoothing` and `reduction`: hand-worked values of torch's
/// formulas on both backends; the loss per row and its backward (a gradient per row) on the GPU
/// against the CPU reference for each reduction, rows of few classes (a thread per row) and of
/// many (threads per row), f16 logits; gradient checks; a batch of ignored rows is NaN as
/// torch's; bad options are errors; without options it is the plain fused loss.
#[test]
fn cross_entropy_options_as_torch() {
    use kiln::graph::{CrossEntropyOpts, Reduction};
    let opts = |ignore: Option<i64>, e: f32, reduction: Reduction| CrossEntropyOpts {
        ignore_index: ignore,
        label_smoothing: e,
        reduction,
        weight: None,
    };
    // rows [1, 2, 3] -> 2, [0.5, -1, 4] ignored, [2, 0, 1] -> 0, [-1, 3, 0.5] -> 1
    let g = Graph::new();
    let x = g.input("x", [4, 3]);
    let y = g.input("y", [4]);
    let logits = Tensor::new(
        [4, 3],
        vec![1., 2., 3., 0.5, -1., 4., 2., 0., 1., -1., 3., 0.5],
    )
    .unwrap();
    let labels = Tensor::new([4], vec![2., -100., 0., 1.]).unwrap();
    let cases = [
        (opts(Some(-100), 0.1, Reduction::Mean), vec![0.442_517_64]),
        (opts(Some(-100), 0.1, Reduction::Sum), vec![1.327_552_9]),
        (
            opts(Some(-100), 0.1, Reduction::None),
            vec![0.507_605_96, 0.0, 0.507_605_96, 0.312_341],
        ),
        (opts(Some(-100), 0.0, Reduction::Mean), vec![0.303_628_75]),
    ];
    let outs: Vec<_> = cases
        .iter()
        .map(|(o, _)| g.cross_entropy_with(x, y, *o).unwrap())
        .collect();
    let devices = common::devices();
    for dev in &devices {
        let got = dev
            .compile(&g, &outs)
            .unwrap()
            .run(&[("x", &logits), ("y", &labels)])
            .unwrap();
        for ((o, want), t) in cases.iter().zip(&got) {
            let want = Tensor::new([want.len()], want.clone()).unwrap();
            assert_close(&format!("{o:?}"), t, &want, 1e-6, 1e-5);
        }
        // every row ignored: the mean is 0 / 0, as torch's
        let all = Tensor::full([4], -100.0);
        let got = dev
            .compile(&g, &outs[..1])
            .unwrap()
            .run(&[("x", &logits), ("y", &all)])
            .unwrap();
        assert!(got[0].data()[0].is_nan());
    }

    // GPU against CPU, loss and gradient, every reduction, few and many classes, f16 logits
    for (n, c, dtype) in [
        (9usize, 7usize, kiln::DType::F32),
        (37, 101, kiln::DType::F32),
        (37, 101, kiln::DType::F16),
        // beyond what one workgroup computes with its gradient: the row kernel with it
        (300, 97, kiln::DType::F32),
    ] {
        let Some(dev) = gpu() else { break };
        if dtype == kiln::DType::F16 && !dev.features().contains(wgpu::Features::SHADER_F16) {
            continue;
        }
        let g = Graph::new();
        let x = g.input_as("x", [n, c], dtype);
        let y = g.input("y", [n]);
        let mut outs = Vec::new();
        for o in [
            opts(Some(3), 0.0, Reduction::Mean),
            opts(None, 0.2, Reduction::Mean),
            opts(Some(3), 0.05, Reduction::Sum),
            opts(Some(3), 0.3, Reduction::None),
        ] {
            let loss = g.cross_entropy_with(x, y, o).unwrap();
            // a weighted sum, so that each row's gradient differs (a gradient per row), and
            // the mean's or sum's own (one value for every row)
            let l = common::random_projection(&g, loss, n as u64);
            for l in [l, loss] {
                if g.shape(l).numel() == 1 {
                    let dx = g.grad(l, &[x]).unwrap()[0];
                    outs.push(g.cast(dx, kiln::DType::F32).unwrap());
                }
            }
            outs.push(loss);
        }
        let labels: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) % c) as f32).collect();
        assert!(labels.contains(&3.0));
        let feeds = [
            (
                "x".to_string(),
                Tensor::rand_uniform(vec![n, c], -4.0, 4.0, 6),
            ),
            ("y".to_string(), Tensor::new([n], labels).unwrap()),
        ];
        let tol = match dtype {
            kiln::DType::F16 => kiln::ops::TOL_F16,
            _ => TOL_REDUCTION,
        };
        common::check_plan(&dev, &format!("({n}, {c}) {dtype}"), &g, &outs, &feeds, tol);
    }

    // gradient checks (ignored rows get none): the backward reading the gradient of the mean
    // over the rows kept, of the sum, of the plain mean
    for o in [
        opts(Some(1), 0.15, Reduction::Mean),
        opts(None, 0.4, Reduction::Sum),
        opts(None, 0.25, Reduction::Mean),
    ] {
        let g = Graph::new();
        let x = g.input("x", [6, 4]);
        let y = g.input("y", [6]);
        let loss = g.cross_entropy_with(x, y, o).unwrap();
        let labels = Tensor::new([6], vec![0., 1., 3., 2., 1., 3.]).unwrap();
        gradcheck(
            &format!("{o:?}"),
            &g,
            loss,
            &[("x", x)],
            &[
                ("x", &Tensor::rand_uniform(vec![6, 4], -3.0, 3.0, 2)),
                ("y", &labels),
            ],
            24,
            TOL_REDUCTION,
        );
    }

    // class weights: torch's values (worked by hand from its formulas), both backends,
    // gradient checks, a bad label NaN
    let g = Graph::new();
    let (x, y) = (g.input("x", [3, 3]), g.input("y", [3]));
    let w = g.input("w", [3]);
    let xv = Tensor::new([3, 3], vec![1., 2., 3., 0.5, -1., 4., 2., 0., 1.]).unwrap();
    let (yv, wv) = (
        Tensor::new([3], vec![2., 1., 0.]).unwrap(),
        Tensor::new([3], vec![0.2, 1.0, 3.0]).unwrap(),
    );
    let feeds = [("x", &xv), ("y", &yv), ("w", &wv)];
    let weighted = |ignore, reduction| CrossEntropyOpts {
        weight: Some(w),
        ..opts(ignore, 0.1, reduction)
    };
    let cases = [
        (weighted(None, Reduction::Mean), vec![1.483_116_3]),
        (weighted(None, Reduction::Sum), vec![6.229_088_5]),
        (weighted(Some(1), Reduction::Mean), vec![0.469_177_56]),
        (
            weighted(Some(1), Reduction::None),
            vec![1.204_267_6, 0.0, 0.297_100_6],
        ),
    ];
    let outs: Vec<_> = cases
        .iter()
        .map(|(o, _)| g.cross_entropy_with(x, y, *o).unwrap())
        .collect();
    for dev in &devices {
        let got = dev.compile(&g, &outs).unwrap().run(&feeds).unwrap();
        for ((o, want), t) in cases.iter().zip(&got) {
            let want = Tensor::new([want.len()], want.clone()).unwrap();
            assert_close(&format!("{o:?}"), t, &want, 1e-6, 1e-5);
        }
        let bad = Tensor::new([3], vec![2., 5., 0.]).unwrap();
        let fs = [feeds[0], ("y", &bad), feeds[2]];
        let got = dev.compile(&g, &outs[..1]).unwrap().run(&fs).unwrap();
        assert!(got[0].data()[0].is_nan(), "a label out of range");
    }
    for (k, (o, _)) in cases.iter().enumerate().take(3) {
        gradcheck(
            &format!("{o:?}"),
            &g,
            outs[k],
            &[("x", x)],
            &feeds,
            9,
            TOL_REDUCTION,
        );
    }
    let err = g
        .cross_entropy_with(
            x,
            y,
            CrossEntropyOpts {
                weight: Some(g.input("w4", [4])),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");

    // errors name the op and the option
    let g = Graph::new();
    let (x, y) = (g.input("x", [2, 3]), g.input("y", [2]));
    let err = g
        .cross_entropy_with(x, y, opts(None, 1.5, Reduction::Mean))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cross_entropy") && err.contains("label_smoothing"),
        "{err}"
    );
    let err = g
        .cross_entropy_with(x, y, opts(Some(1 << 30), 0.0, Reduction::Mean))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ignore_index"), "{err}");
    // over more logits than one workgroup computes with its gradient, the row kernel computes
    // both (the loss and its own gradient alone, so that it does), reading `dy` as the
    // backward would: smoothing alone (the mean's), the mean over the rows kept (`dy` over
    // their count, computed from the labels before the loss: 2 kernels more), the sum's, and a
    // weighted sum of the losses per row (a gradient per row, `dy` times the weights first)
    if let Some(dev) = gpu() {
        let row_w = Tensor::rand_uniform(vec![300], 0.0, 2.0, 8);
        let cases: [(CrossEntropyOpts, usize); 4] = [
            (opts(None, 0.2, Reduction::Mean), 2),
            (opts(Some(3), 0.1, Reduction::Mean), 4),
            (opts(Some(3), 0.0, Reduction::Sum), 2),
            (opts(None, 0.0, Reduction::None), 3),
        ];
        // (and the square of a loss: its gradient needs the loss, so the backward stays a
        // kernel of its own)
        let squared = (opts(Some(3), 0.0, Reduction::Mean), 6);
        for (case, (o, kernels)) in cases.into_iter().chain([squared]).enumerate() {
            let g = Graph::new();
            let (x, y) = (g.input("x", [300, 97]), g.input("y", [300]));
            let mut loss = g.cross_entropy_with(x, y, o).unwrap();
            if o.reduction == Reduction::None {
                let w = g.constant(row_w.clone());
                loss = g.sum_all(g.mul(loss, w).unwrap()).unwrap();
            }
            if case == 4 {
                loss = g.square(loss).unwrap();
            }
            let dx = g.grad(loss, &[x]).unwrap()[0];
            let labels = (0..300).map(|i| ((i * 7 + 3) % 97) as f32).collect();
            let feeds = [
                (
                    "x".to_string(),
                    Tensor::rand_uniform(vec![300, 97], -4.0, 4.0, 6),
                ),
                ("y".to_string(), Tensor::new([300], labels).unwrap()),
            ];
            let what = format!("rows {o:?}");
            let plan = common::check_plan(&dev, &what, &g, &[loss, dx], &feeds, TOL_REDUCTION);
            let k = plan.kernels();
            assert_eq!(k.len(), kernels, "{what}: {k:#?}");
            let separate = (case == 4) as usize;
            assert_eq!(
                common::count_op(&k, "cross_entropy_backward"),
                separate,
                "{what}"
            );
        }
    }
    // class weights in the row kernel, with smoothing and ignored rows, f32 and f16 logits:
    // many classes (the loss and its gradient in one kernel) and few under a square (the
    // gradient needs the loss: the thread-per-row backward)
    if let Some(dev) = gpu() {
        for (n, c, squared) in [(300usize, 97usize, false), (40, 7, true)] {
            for dtype in [kiln::DType::F32, kiln::DType::F16] {
                let g = Graph::new();
                let (x, y) = (g.input("x", [n, c]), g.input("y", [n]));
                let w = g.input("w", [c]);
                let xh = g.cast(x, dtype).unwrap();
                let o = CrossEntropyOpts {
                    weight: Some(w),
                    ..opts(Some(3), 0.2, Reduction::Mean)
                };
                let mut loss = g.cross_entropy_with(xh, y, o).unwrap();
                if squared {
                    loss = g.square(loss).unwrap();
                }
                let dx = g
                    .cast(g.grad(loss, &[x]).unwrap()[0], kiln::DType::F32)
                    .unwrap();
                let labels = (0..n).map(|i| ((i * 7 + 3) % c) as f32).collect();
                let feeds = [
                    (
                        "x".to_string(),
                        Tensor::rand_uniform(vec![n, c], -4.0, 4.0, 6),
                    ),
                    ("y".to_string(), Tensor::new([n], labels).unwrap()),
                    ("w".to_string(), Tensor::rand_uniform(vec![c], 0.1, 2.0, 7)),
                ];
                let tol = match dtype {
                    kiln::DType::F16 => kiln::ops::TOL_F16,
                    _ => TOL_REDUCTION,
                };
                let what = format!("weighted ({n}, {c}) {dtype}");
                let plan = common::check_plan(&dev, &what, &g, &[loss, dx], &feeds, tol);
                let k = plan.kernels();
                assert_eq!(common::count_op(&k, "log_softmax"), 0, "{what}: {k:#?}");
            }
        }
    }
    // without options, and with smoothing alone: the fused loss, one kernel with its gradient
    if let Some(dev) = gpu() {
        for e in [0.0, 0.1] {
            let loss = g
                .cross_entropy_with(x, y, opts(None, e, Reduction::Mean))
                .unwrap();
            let dx = g.grad(loss, &[x]).unwrap()[0];
            let plan = dev.compile(&g, &[loss, dx]).unwrap();
            assert_eq!(plan.kernels().len(), 1, "{:?}", plan.kernels());
        }
    }
}

/// L1, Huber, smooth L1, NLL and KL divergence: torch's values worked by hand from its
/// formulas, on both backends; gradient checks; the GPU against the CPU reference; each loss one
/// kernel (its elementwise chain inside the reduction's loads); errors.
#[test]
fn regression_nll_and_kl_losses_as_torch() {
    let g = Graph::new();
    let (p, t) = (g.input("p", [4]), g.input("t", [4]));
    let (lp, y) = (g.input("lp", [2, 3]), g.input("y", [2]));
    let (kx, kt) = (g.input("kx", [2, 2]), g.input("kt", [2, 2]));
    // d = [0.5, -1, 2, 2.5]; log-probabilities picked -3 and -0.5
    let feeds = [
        ("p", Tensor::new([4], vec![0.5, -1.0, 2.0, 3.0]).unwrap()),
        ("t", Tensor::new([4], vec![0.0, 0.0, 0.0, 0.5]).unwrap()),
        (
            "lp",
            Tensor::new([2, 3], vec![-1., -2., -3., -0.5, -1.5, -2.5]).unwrap(),
        ),
        ("y", Tensor::new([2], vec![2., 0.]).unwrap()),
        (
            "kx",
            Tensor::new([2, 2], vec![-1.0, -0.5, -2.0, -0.1]).unwrap(),
        ),
        ("kt", Tensor::new([2, 2], vec![0.0, 1.0, 0.3, 0.7]).unwrap()),
    ];
    let log_kt = g.log(g.add_scalar(kt, 1e-3).unwrap()).unwrap();
    let cases = [
        ("l1", g.l1_loss(p, t).unwrap(), 1.5),
        ("huber", g.huber_loss(p, t, 1.0).unwrap(), 1.031_25),
        ("smooth_l1", g.smooth_l1_loss(p, t, 2.0).unwrap(), 0.703_125),
        (
            "smooth_l1 beta 0",
            g.smooth_l1_loss(p, t, 0.0).unwrap(),
            1.5,
        ),
        ("nll", g.nll_loss(lp, y, None).unwrap(), 1.75),
        ("nll ignoring 0", g.nll_loss(lp, y, Some(0)).unwrap(), 3.0),
        // 0 log 0 = 0; (1 (0 + 0.5) + 0.3 (ln 0.3 + 2) + 0.7 (ln 0.7 + 0.1)) / 2
        ("kl_div", g.kl_div(kx, kt, false).unwrap(), 0.279_567_86),
    ];
    let outs: Vec<_> = cases.iter().map(|c| c.1).collect();
    let f: Vec<(String, Tensor)> = feeds.into_iter().map(|(n, v)| (n.into(), v)).collect();
    let devices = common::devices();
    for dev in &devices {
        let got = dev
            .compile(&g, &outs)
            .unwrap()
            .run(&common::refs(&f))
            .unwrap();
        for ((name, _, want), v) in cases.iter().zip(&got) {
            let v = v.data()[0];
            assert!(
                (v - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                "{name}: {v}, torch {want}"
            );
        }
    }
    // log_target: the same divergence from log-probabilities (of a target shifted off 0)
    let shifted = g.add_scalar(kt, 1e-3).unwrap();
    let both = [
        g.kl_div(kx, shifted, false).unwrap(),
        g.kl_div(kx, log_kt, true).unwrap(),
    ];
    let got = Device::cpu()
        .compile(&g, &both)
        .unwrap()
        .run(&common::refs(&f))
        .unwrap();
    assert_close("kl_div log_target", &got[1], &got[0], 1e-6, 1e-5);

    // gradients against central differences, and the GPU against the CPU
    let pv = Tensor::rand_uniform(vec![4], -3.0, 3.0, 8);
    let tv = Tensor::rand_uniform(vec![4], -3.0, 3.0, 9);
    for (name, loss) in [
        ("l1", cases[0].1),
        ("huber", cases[1].1),
        ("smooth_l1", cases[2].1),
    ] {
        gradcheck(
            name,
            &g,
            loss,
            &[("p", p), ("t", t)],
            &[("p", &pv), ("t", &tv)],
            4,
            TOL_REDUCTION,
        );
    }
    let lpv = Tensor::rand_uniform(vec![2, 3], -3.0, 0.0, 10);
    let yv = Tensor::new([2], vec![1., 0.]).unwrap();
    for (name, loss) in [("nll", cases[4].1), ("nll ignoring 0", cases[5].1)] {
        gradcheck(
            name,
            &g,
            loss,
            &[("lp", lp)],
            &[("lp", &lpv), ("y", &yv)],
            6,
            TOL_REDUCTION,
        );
    }
    let ktv = Tensor::new([2, 2], vec![0.0, 1.0, 0.4, 0.6]).unwrap();
    let kxv = Tensor::rand_uniform(vec![2, 2], -2.0, 0.0, 11);
    gradcheck(
        "kl_div",
        &g,
        cases[6].1,
        &[("kx", kx)],
        &[("kx", &kxv), ("kt", &ktv)],
        4,
        TOL_REDUCTION,
    );
    // one kernel each in the forward (the elementwise DAG inside the reduction's loads), but
    // the mean over kept rows: their mask, the sum of the picks, the count and the division
    if let Some(dev) = gpu() {
        for (name, loss, _) in &cases {
            let plan = dev.compile(&g, &[*loss]).unwrap();
            let want = if name.contains("ignoring") { 3 } else { 1 };
            assert_eq!(plan.kernels().len(), want, "{name}: {:?}", plan.kernels());
        }
    }

    // errors name the loss
    for (name, err) in [
        ("l1_loss", g.l1_loss(p, lp).unwrap_err()),
        ("huber_loss", g.huber_loss(p, t, 0.0).unwrap_err()),
        ("smooth_l1_loss", g.smooth_l1_loss(p, t, -1.0).unwrap_err()),
        ("nll_loss", g.nll_loss(lp, p, None).unwrap_err()),
        ("kl_div", g.kl_div(kx, p, false).unwrap_err()),
    ] {
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn mse_and_bce_losses() {
    let g = Graph::new();
    let a = g.input("a", [4, 3]);
    let b = g.input("b", [4, 3]);
    let mse = g.mse_loss(a, b).unwrap();
    let bce = g.bce_with_logits(a, b).unwrap();
    let av = Tensor::rand_uniform(vec![4, 3], -30.0, 30.0, 2);
    let bv = Tensor::rand_uniform(vec![4, 3], 0.0, 1.0, 3);
    check_gpu_vs_cpu(
        "losses",
        &g,
        &[mse, bce],
        &[("a", &av), ("b", &bv)],
        TOL_REDUCTION,
    );
    let small = rand(&[4, 3], 4);
    gradcheck(
        "bce",
        &g,
        bce,
        &[("a", a)],
        &[("a", &small), ("b", &bv)],
        12,
        TOL_REDUCTION,
    );
    gradcheck(
        "mse",
        &g,
        mse,
        &[("a", a), ("b", b)],
        &[("a", &small), ("b", &bv)],
        12,
        TOL_REDUCTION,
    );
    // reference values: bce(0, 1) = ln 2
    let mut plan = Device::cpu().compile(&g, &[bce]).unwrap();
    let v = plan
        .run(&[
            ("a", &Tensor::zeros([4, 3])),
            ("b", &Tensor::full([4, 3], 1.0)),
        ])
        .unwrap();
    assert!((v[0].data()[0] - std::f32::consts::LN_2).abs() < 1e-6);
}

#[test]
fn dropout_masks_agree_bit_for_bit() {
    let g = Graph::new();
    let x = g.input("x", [3000]);
    let d = kiln::nn::dropout(&g, x, 0.3, 1).unwrap();
    let xv = Tensor::full([3000], 1.0);
    let seed = Tensor::full([1], 12345.0);
    check_gpu_vs_cpu(
        "dropout",
        &g,
        &[d],
        &[("x", &xv), ("dropout.seed", &seed)],
        (0.0, 0.0),
    );
    let mut plan = Device::cpu().compile(&g, &[d]).unwrap();
    let out = plan.run(&[("x", &xv), ("dropout.seed", &seed)]).unwrap();
    let dropped = out[0].data().iter().filter(|&&v| v == 0.0).count();
    assert!(
        (800..1000).contains(&dropped),
        "dropped {dropped} of 3000 at p = 0.3"
    );
    assert!(out[0]
        .data()
        .iter()
        .all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));
    // another seed, another mask; the backward uses the forward's mask
    let other = plan
        .run(&[("x", &xv), ("dropout.seed", &Tensor::full([1], 7.0))])
        .unwrap();
    assert_ne!(out[0].data(), other[0].data());
    let loss = common::random_projection(&g, d, 5);
    gradcheck(
        "dropout",
        &g,
        loss,
        &[("x", x)],
        &[("x", &rand(&[3000], 6)), ("dropout.seed", &seed)],
        30,
        TOL_REDUCTION,
    );
}

/// A tiny regression model trained for a few steps with `opt` on `dev`; returns the parameters.
fn train_tiny(dev: &Device, opt: Optimizer, steps: usize) -> Vec<Tensor> {
    train_tiny_kernels(dev, opt, steps).0
}

/// The tiny regression model's training step on `dev` (inputs `x (8, 5)`, targets `t (8, 3)`;
/// `fc1`, `fc2` seeded alike every time).
fn tiny_step(dev: &Device, opt: Optimizer) -> TrainStep {
    tiny_step_accumulating(dev, opt, 8, 1)
}

/// [`tiny_step`] on batches of `b` rows, stepping every `k` of them (gradient accumulation).
fn tiny_step_accumulating(dev: &Device, opt: Optimizer, b: usize, k: usize) -> TrainStep {
    let g = Graph::new();
    let x = g.input("x", [b, 5]);
    let t = g.input("t", [b, 3]);
    let mut init = Init::new(1);
    let fc1 = Linear::new("fc1", 5, 6, &mut init);
    let fc2 = Linear::new("fc2", 6, 3, &mut init);
    let (h, p1) = fc1.apply(&g, x).unwrap();
    let (y, p2) = fc2.apply(&g, g.tanh(h).unwrap()).unwrap();
    let loss = g.mse_loss(y, t).unwrap();
    let params: Vec<_> = p1.iter().chain(&p2).copied().collect();
    TrainStep::with_accumulation(dev, &g, loss, &params, opt, 0, k).unwrap()
}

/// [`train_tiny`], and the kernels of its step's plan.
fn train_tiny_kernels(dev: &Device, opt: Optimizer, steps: usize) -> (Vec<Tensor>, Vec<String>) {
    let mut step = tiny_step(dev, opt);
    for i in 0..steps {
        let xv = rand(&[8, 5], 100 + i as u64);
        let tv = rand(&[8, 3], 200 + i as u64);
        step.step(&[("x", &xv), ("t", &tv)], i % 2 == 0).unwrap();
    }
    let kernels = step
        .plan()
        .kernels()
        .iter()
        .map(|k| k.to_string())
        .collect();
    let params = [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "optim.fc1.weight.exp_avg",
    ]
    .iter()
    .filter_map(|n| dev.param(n).ok())
    .collect();
    (params, kernels)
}

/// Gradient clipping's coefficient is computed by the update kernels themselves from the sum
/// of squares' partial sums (no reduction kernel between them), clipping or not (a norm far
/// above the gradients'), for every rule: parameters and states after a few steps against the
/// CPU reference's separate reduction and updates.
#[test]
fn clipping_scales_are_computed_by_the_updates() {
    if gpu().is_none() {
        return;
    }
    for max_norm in [0.05f32, 1e3] {
        let opts = [
            Optimizer::sgd(0.1),
            Optimizer::sgd_momentum(0.05, 0.9, true).weight_decay(1e-2),
            Optimizer::adam(1e-2),
            Optimizer::adamw(1e-2, 0.1),
        ];
        for opt in opts {
            let opt = opt.clip_grad_norm(max_norm);
            let what = format!("{:?}, max norm {max_norm}", opt.rule);
            let (a, kernels) = train_tiny_kernels(&Device::gpu().unwrap(), opt.clone(), 4);
            let b = train_tiny(&Device::cpu(), opt, 4);
            for (x, y) in a.iter().zip(&b) {
                assert_close(&what, x, y, 1e-5, 1e-4);
            }
            assert_eq!(
                common::count_op(&kernels, "sum_squares"),
                1,
                "{what}: {kernels:#?}"
            );
            let scale = kernels.iter().filter(|k| k.contains("reduce,epilogue"));
            assert_eq!(scale.count(), 0, "{what}: {kernels:#?}");
        }
    }
}

#[test]
fn optimizer_steps_match_between_gpu_and_cpu() {
    let Some(dev0) = gpu() else { return };
    let _ = dev0;
    let opts = [
        Optimizer::sgd(0.1),
        Optimizer::sgd_momentum(0.05, 0.9, false)
            .weight_decay(1e-2)
            .dampening(0.1),
        Optimizer::sgd_momentum(0.05, 0.9, true),
        Optimizer::adam(1e-2).weight_decay(1e-3).clip_grad_norm(0.5),
        Optimizer::adamw(1e-2, 0.1)
            .schedule(Schedule::Cosine {
                t_max: 5,
                eta_min: 1e-3,
            })
            .warmup(2),
        Optimizer::rmsprop(1e-2),
        Optimizer::rmsprop(1e-2)
            .momentum(0.9)
            .centered(true)
            .weight_decay(1e-2),
        Optimizer::rmsprop(1e-2).centered(true).clip_grad_norm(0.5),
        Optimizer::rmsprop(1e-2).momentum(0.5),
        Optimizer::adagrad(0.1).adagrad_options(0.01, 0.1),
        Optimizer::adam(1e-2).clip_grad_value(0.05),
    ];
    for opt in opts {
        // fresh devices: parameters start from the same seeded init on both
        let gdev = Device::gpu().unwrap();
        let cdev = Device::cpu();
        let a = train_tiny(&gdev, opt.clone(), 6);
        let b = train_tiny(&cdev, opt.clone(), 6);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_close(&format!("{:?}", opt.rule), x, y, 1e-5, 1e-4);
        }
    }
}

/// A step's parameter updates run as multi-tensor kernels (as many parameters per kernel as the
/// adapter's storage-buffer limit allows), and give what the CPU reference's one update per
/// parameter gives: every parameter and both Adam states of a 12-parameter network.
#[test]
fn updates_of_many_parameters_are_one_kernel() {
    let Some(dev0) = gpu() else { return };
    let limit = dev0
        .limits()
        .expect("a GPU")
        .max_storage_buffers_per_shader_stage as usize;
    let run = |dev: &Device| -> (Vec<Tensor>, Vec<String>) {
        let g = Graph::new();
        let x = g.input("x", [4, 3]);
        let mut init = Init::new(5);
        let mut h = x;
        let mut params = Vec::new();
        for l in 0..6 {
            let fc = Linear::new(&format!("fc{l}"), 3, 3, &mut init);
            let (y, p) = fc.apply(&g, h).unwrap();
            h = g.tanh(y).unwrap();
            params.extend(p);
        }
        let loss = g.mean_all(g.square(h).unwrap()).unwrap();
        let mut step = TrainStep::new(dev, &g, loss, &params, Optimizer::adam(1e-2), 0).unwrap();
        let mut labels = Vec::new();
        for i in 0..3 {
            let xv = rand(&[4, 3], 300 + i);
            let profiling = i == 2 && step.plan_mut().set_profiling(true).is_ok();
            step.step(&[("x", &xv)], false).unwrap();
            if profiling {
                labels = step
                    .plan_mut()
                    .profile()
                    .iter()
                    .map(|t| t.label.clone())
                    .collect();
            }
        }
        let mut values = Vec::new();
        for l in 0..6 {
            for p in ["weight", "bias"] {
                let name = format!("fc{l}.{p}");
                values.push(dev.param(&name).unwrap());
                for s in ["exp_avg", "exp_avg_sq"] {
                    values.push(dev.param(&format!("optim.{name}.{s}")).unwrap());
                }
            }
        }
        (values, labels)
    };
    let (got, labels) = run(&Device::gpu().unwrap());
    let (want, _) = run(&Device::cpu());
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("parameter or state {k}"), a, b, 1e-5, 1e-4);
    }
    let timed = dev0
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
    assert_eq!(!labels.is_empty(), timed, "profiled where the adapter can");
    if timed {
        // Adam binds 4 buffers per parameter besides hyper and scale
        let per = (limit - 2) / 4;
        let groups = labels.iter().filter(|l| l.contains("adam_group")).count();
        assert_eq!(groups, 12usize.div_ceil(per), "{labels:?}");
        assert!(
            !labels.iter().any(|l| l.contains(" adam ")),
            "no update runs alone: {labels:?}"
        );
    }
}

/// `steps` steps of torch.optim.SGD (lr 0.1, momentum 0.9, dampening 0, Nesterov, weight
/// decay 0.1) on the loss `0.5 |p|^2` (whose gradient is `p`) from `p0`, in f64: the formulas
/// of torch.optim's documentation.
fn textbook_sgd(p0: [f64; 3], steps: usize) -> [f64; 3] {
    let (lr, mu, wd) = (0.1, 0.9, 0.1);
    let mut p = p0;
    let mut b = [0f64; 3];
    for t in 0..steps {
        for i in 0..3 {
            let g = p[i] + wd * p[i];
            b[i] = if t == 0 { g } else { mu * b[i] + g };
            p[i] -= lr * (g + mu * b[i]);
        }
    }
    p
}

/// [`textbook_sgd`] for torch.optim.Adam (AdamW where `decoupled`): lr 0.1, betas (0.9,
/// 0.999), eps 1e-8, weight decay `wd`.
fn textbook_adam(p0: [f64; 3], steps: i32, wd: f64, decoupled: bool) -> [f64; 3] {
    let (lr, b1, b2, eps) = (0.1, 0.9f64, 0.999f64, 1e-8);
    let mut p = p0;
    let (mut m, mut v) = ([0f64; 3], [0f64; 3]);
    for t in 1..=steps {
        for i in 0..3 {
            let mut g = p[i];
            if decoupled {
                p[i] *= 1.0 - lr * wd;
            } else {
                g += wd * p[i];
            }
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    p
}

/// [`textbook_sgd`] for torch.optim.RMSprop: lr 0.01, alpha 0.9, eps 1e-8, weight decay 0.1,
/// momentum `mu` (0: none), `centered`.
fn textbook_rmsprop(p0: [f64; 3], steps: usize, mu: f64, centered: bool) -> [f64; 3] {
    let (lr, alpha, eps, wd) = (0.01, 0.9, 1e-8, 0.1);
    let mut p = p0;
    let (mut sq, mut buf, mut ga) = ([0f64; 3], [0f64; 3], [0f64; 3]);
    for _ in 0..steps {
        for i in 0..3 {
            let g = p[i] + wd * p[i];
            sq[i] = alpha * sq[i] + (1.0 - alpha) * g * g;
            let mut v = sq[i];
            if centered {
                ga[i] = alpha * ga[i] + (1.0 - alpha) * g;
                v -= ga[i] * ga[i];
            }
            let avg = v.sqrt() + eps;
            if mu > 0.0 {
                buf[i] = mu * buf[i] + g / avg;
                p[i] -= lr * buf[i];
            } else {
                p[i] -= lr * g / avg;
            }
        }
    }
    p
}

/// [`textbook_sgd`] for torch.optim.Adagrad: lr 0.1, lr_decay 0.1, weight decay 0.05,
/// initial_accumulator_value 0.1, eps 1e-10.
fn textbook_adagrad(p0: [f64; 3], steps: usize) -> [f64; 3] {
    let (lr, decay, wd, eps) = (0.1, 0.1, 0.05, 1e-10);
    let mut p = p0;
    let mut sum = [0.1f64; 3];
    for t in 0..steps {
        let clr = lr / (1.0 + t as f64 * decay);
        for i in 0..3 {
            let g = p[i] + wd * p[i];
            sum[i] += g * g;
            p[i] -= clr * g / (sum[i].sqrt() + eps);
        }
    }
    p
}

#[test]
fn update_rules_follow_torch_optim() {
    // one parameter vector, gradient of 0.5 * |p|^2 is p itself: compare 3 steps with the
    // textbook formulas of torch.optim's documentation, in f64
    let p0 = [0.5f64, -1.0, 2.0];
    let run_on = |dev: Device, opt: Optimizer| -> Vec<f32> {
        let g = Graph::new();
        let p = g.param_init(
            "p",
            Tensor::new([3], p0.iter().map(|&v| v as f32).collect()).unwrap(),
        );
        let loss = g
            .mul_scalar(g.sum_all(g.square(p).unwrap()).unwrap(), 0.5)
            .unwrap();
        let mut step = TrainStep::new(&dev, &g, loss, &[p], opt, 0).unwrap();
        for _ in 0..3 {
            step.step(&[], false).unwrap();
        }
        dev.param("p").unwrap().into_data()
    };
    let run = |opt: Optimizer| run_on(Device::cpu(), opt);
    let p = textbook_sgd(p0, 3);
    let got = run(Optimizer::sgd_momentum(0.1, 0.9, true).weight_decay(0.1));
    for i in 0..3 {
        assert!((got[i] as f64 - p[i]).abs() < 1e-6, "sgd: {got:?} vs {p:?}");
    }
    // Adam and AdamW, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.01
    for decoupled in [false, true] {
        let p = textbook_adam(p0, 3, 0.01, decoupled);
        let opt = if decoupled {
            Optimizer::adamw(0.1, 0.01)
        } else {
            Optimizer::adam(0.1).weight_decay(0.01)
        };
        let got = run(opt);
        for i in 0..3 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-5,
                "adam decoupled={decoupled}: {got:?} vs {p:?}"
            );
        }
    }
    // RMSprop in its four forms and Adagrad, on both backends (one parameter: the update's own
    // kernel on the GPU, not a group's)
    let mut devices = vec![Device::cpu as fn() -> Device];
    if gpu().is_some() {
        devices.push(|| Device::gpu().unwrap());
    }
    for dev in devices {
        for (mu, centered) in [(0.0, false), (0.5, false), (0.0, true), (0.5, true)] {
            let p = textbook_rmsprop(p0, 3, mu, centered);
            let opt = Optimizer::rmsprop(0.01)
                .alpha(0.9)
                .weight_decay(0.1)
                .momentum(mu as f32)
                .centered(centered);
            let got = run_on(dev(), opt);
            for i in 0..3 {
                let near = (got[i] as f64 - p[i]).abs() < 1e-5;
                assert!(
                    near,
                    "rmsprop mu={mu} centered={centered}: {got:?} vs {p:?}"
                );
            }
        }
        // clip_grad_value_(0.8) before SGD, with and without loss scaling (which unscales
        // first: the bound is the unscaled gradients')
        let mut p = p0;
        for _ in 0..3 {
            p = p.map(|v| v - 0.1 * v.clamp(-0.8, 0.8));
        }
        for scaled in [false, true] {
            let mut opt = Optimizer::sgd(0.1).clip_grad_value(0.8);
            if scaled {
                opt = opt.grad_scaler(GradScaler::default());
            }
            let got = run_on(dev(), opt);
            for i in 0..3 {
                let near = (got[i] as f64 - p[i]).abs() < 1e-6;
                assert!(near, "clip_grad_value scaled={scaled}: {got:?} vs {p:?}");
            }
        }
        let p = textbook_adagrad(p0, 3);
        let opt = Optimizer::adagrad(0.1)
            .adagrad_options(0.1, 0.1)
            .weight_decay(0.05);
        let got = run_on(dev(), opt);
        for i in 0..3 {
            assert!(
                (got[i] as f64 - p[i]).abs() < 1e-5,
                "adagrad: {got:?} vs {p:?}"
            );
        }
    }
}

/// Dynamic loss scaling as `torch.amp.GradScaler`: a first step whose scaled gradients
/// overflow is skipped (parameters and states untouched, the optimizer's step count not
/// advanced, the scale backed off), the steps after it unscale exactly (a power-of-two scale)
/// and take torch.optim's updates with bias corrections of the steps taken, and the scale grows
/// after `growth_interval` steps in a row: SGD with Nesterov momentum and Adam on the CPU
/// reference against the textbook formulas, and the GPU against the CPU reference (parameters,
/// states and the scaler's state), with and without clipping (which reads the unscaled norm).
#[test]
fn loss_scaling_skips_overflowing_steps_as_grad_scaler() {
    let p0 = [0.5f64, -1.0, 2.0];
    let scaler = GradScaler {
        // 2 * 2^127 overflows f32: the first step is skipped, the next ones scale by 2^27
        init_scale: 2f32.powi(127),
        growth_factor: 2.0,
        backoff_factor: 2f32.powi(-100),
        growth_interval: 2,
    };
    // loss 0.5 (|p|^2 + |q|^2) (gradients p and q, both starting at p0: one grouped update
    // kernel) for 4 steps; the parameters, their states and the scaler's state
    let run = |dev: &Device, opt: Optimizer| -> Vec<Tensor> {
        let g = Graph::new();
        let start = Tensor::new([3], p0.iter().map(|&v| v as f32).collect()).unwrap();
        let (p, q) = (g.param_init("p", start.clone()), g.param_init("q", start));
        let half_square = |t| g.mul_scalar(g.sum_all(g.square(t)?)?, 0.5);
        let loss = g
            .add(half_square(p).unwrap(), half_square(q).unwrap())
            .unwrap();
        let mut step = TrainStep::new(dev, &g, loss, &[p, q], opt, 0).unwrap();
        for k in 0..4 {
            let l = step.step(&[], true).unwrap().unwrap();
            // the loss read back is the model's, not the scaled one
            assert!(l.is_finite() && l < 6.0, "step {k}: loss {l}");
        }
        [
            "optim.grad_scaler.p",
            "p",
            "q",
            "optim.p.momentum_buffer",
            "optim.q.exp_avg",
        ]
        .iter()
        .filter_map(|n| dev.param(n).ok())
        .collect()
    };
    // after: one skip (2^127 -> 2^27), three steps taken, a growth after two of them
    let state = [2f32.powi(28), 1.0, 3.0];
    let (sgd, adam) = (textbook_sgd(p0, 3), textbook_adam(p0, 3, 0.0, false));
    let cases = [
        (
            Optimizer::sgd_momentum(0.1, 0.9, true).weight_decay(0.1),
            Some(sgd),
        ),
        (Optimizer::adam(0.1), Some(adam)),
        // clipped to a norm of 0.1 (of the unscaled gradients, about 2.3): no textbook twin
        (Optimizer::adam(0.1).clip_grad_norm(0.1), None),
    ];
    for (opt, want) in cases {
        let opt = opt.grad_scaler(scaler);
        let what = format!("{:?} clip {:?}", opt.rule, opt.clip_norm);
        let cpu = run(&Device::cpu(), opt.clone());
        assert_eq!(&cpu[0].data()[..3], state, "{what}: scaler state");
        if let Some(want) = want {
            for got in [cpu[1].data(), cpu[2].data()] {
                for i in 0..3 {
                    let near = (got[i] as f64 - want[i]).abs() < 1e-5;
                    assert!(near, "{what}: {got:?} vs {want:?}");
                }
            }
        }
        if gpu().is_none() {
            continue;
        }
        let gpu_run = run(&Device::gpu().unwrap(), opt);
        assert_eq!(gpu_run.len(), cpu.len(), "{what}");
        for (a, b) in gpu_run.iter().zip(&cpu) {
            assert_close(&what, a, b, 1e-6, 1e-5);
        }
    }
}

/// Loss scaling costs two kernels a step: the gradients' sum of squares (partial sums) and the
/// scaler's one thread, which adds the partial sums up itself (no reduction kernel between
/// them) and clips too where asked; the updates stay grouped, the backward pass reads the
/// scale where it reads the loss's gradient (no kernel multiplies by it). The tiny model's parameters and
/// Adam states against the CPU reference.
#[test]
fn loss_scaling_is_two_kernels_more() {
    let Some(dev) = gpu() else { return };
    let _ = dev;
    let scaler = GradScaler {
        init_scale: 256.0,
        growth_interval: 2,
        ..Default::default()
    };
    let count = |opt: Optimizer| train_tiny_kernels(&Device::gpu().unwrap(), opt, 4).1.len();
    let plain = count(Optimizer::adam(1e-2));
    for clip in [None, Some(0.05)] {
        let mut opt = Optimizer::adam(1e-2).grad_scaler(scaler);
        if let Some(c) = clip {
            opt = opt.clip_grad_norm(c);
        }
        let what = format!("clip {clip:?}");
        let (a, kernels) = train_tiny_kernels(&Device::gpu().unwrap(), opt.clone(), 4);
        let b = train_tiny(&Device::cpu(), opt, 4);
        for (x, y) in a.iter().zip(&b) {
            assert_close(&what, x, y, 1e-5, 1e-4);
        }
        assert_eq!(kernels.len(), plain + 2, "{what}: {kernels:#?}");
        assert_eq!(common::count_op(&kernels, "grad_scaler"), 1, "{what}");
        assert_eq!(common::count_op(&kernels, "sum_squares"), 1, "{what}");
    }
    // a classifier's small cross-entropy still computes its logits' gradient itself, from the
    // scale (a view of the scaler's state) rather than 1
    let classifier = |opt: Optimizer| {
        let dev = Device::gpu().unwrap();
        let g = Graph::new();
        let x = g.input("x", [8, 5]);
        let labels = g.input("labels", [8]);
        let fc = Linear::new("fc", 5, 4, &mut Init::new(3));
        let (logits, params) = fc.apply(&g, x).unwrap();
        let loss = g.cross_entropy(logits, labels).unwrap();
        let step = TrainStep::new(&dev, &g, loss, &params, opt, 0).unwrap();
        let kernels: Vec<String> = step
            .plan()
            .kernels()
            .iter()
            .map(|k| k.to_string())
            .collect();
        kernels
    };
    let plain = classifier(Optimizer::adam(1e-2));
    let scaled = classifier(Optimizer::adam(1e-2).grad_scaler(scaler));
    assert_eq!(scaled.len(), plain.len() + 2, "{scaled:#?}");
    assert_eq!(
        common::count_op(&scaled, "cross_entropy_backward"),
        0,
        "{scaled:#?}"
    );
}

/// Adam under `OneCycleLR`'s cycled `beta1` takes its bias correction from this step's `beta1`
/// (`1 - beta1^t`, as torch's) whether the scaler counts the steps or the host does: with a
/// power-of-two scale that never overflows, scaled and unscaled training agree, on the CPU
/// reference and on the GPU. (The running sum a fixed `beta1` keeps gives 0.392 at the third
/// step where torch's power gives 0.386.)
#[test]
fn loss_scaling_keeps_a_cycled_beta1s_bias_correction() {
    let scaler = GradScaler {
        init_scale: 1024.0,
        growth_interval: 1000,
        ..Default::default()
    };
    // a fresh device for each run: the parameters live on it
    for (kind, dev) in common::fresh_devices() {
        for adamw in [false, true] {
            let base = || {
                match adamw {
                    false => Optimizer::adam(1e-2),
                    true => Optimizer::adamw(1e-2, 0.1),
                }
                .schedule(Schedule::one_cycle(8))
            };
            let plain = train_tiny(&dev(), base(), 6);
            let scaled = train_tiny(&dev(), base().grad_scaler(scaler), 6);
            for (x, y) in scaled.iter().zip(&plain) {
                assert_close(&format!("{kind}, adamw {adamw}"), x, y, 1e-6, 1e-5);
            }
        }
    }
}

/// Training resumes from `checkpoint::save_all` as if uninterrupted, loss scaling included: the
/// scaler's state (its scale, growth tracker and the steps taken, which Adam's bias
/// corrections count) is a parameter saved with the others. Three steps, a checkpoint, a fresh
/// device, three more (the scale grows on the way) against six in a row, bit for bit, on the
/// CPU reference and on the GPU.
#[test]
fn training_resumes_from_a_checkpoint_with_loss_scaling() {
    use kiln::nn::checkpoint;
    let scaler = GradScaler {
        init_scale: 1024.0,
        growth_interval: 2,
        ..Default::default()
    };
    let opt = || Optimizer::adam(1e-2).grad_scaler(scaler);
    // the tiny regression model's step on `dev`, its optimizer having taken `taken` steps
    let build = |dev: &Device, taken: u64| {
        let mut o = opt();
        o.set_steps(taken);
        tiny_step(dev, o)
    };
    let steps = |step: &mut TrainStep, range: std::ops::Range<u64>| {
        for i in range {
            let xv = rand(&[8, 5], 100 + i);
            let tv = rand(&[8, 3], 200 + i);
            step.step(&[("x", &xv), ("t", &tv)], false).unwrap();
        }
    };
    let path = std::env::temp_dir().join(format!("kiln_resume_{}.safetensors", std::process::id()));
    let mut devices: Vec<fn() -> Device> = vec![Device::cpu];
    if gpu().is_some() {
        devices.push(|| Device::gpu().unwrap());
    }
    for make in devices {
        let whole = make();
        let mut step = build(&whole, 0);
        steps(&mut step, 0..6);
        let state = step.scaler_state().unwrap().unwrap();
        assert_eq!((state.scale, state.steps_taken), (8192.0, 6), "{state:?}");

        let first = make();
        steps(&mut build(&first, 0), 0..3);
        checkpoint::save_all(&first, &path).unwrap();
        let resumed = make();
        let names = checkpoint::load_all(&resumed, &path).unwrap();
        assert!(
            names.iter().any(|n| n.starts_with("optim.grad_scaler.")),
            "{names:?}"
        );
        steps(&mut build(&resumed, 3), 3..6);
        for name in &names {
            let (a, b) = (whole.param(name).unwrap(), resumed.param(name).unwrap());
            assert_eq!(a.data(), b.data(), "{:?}: {name}", whole.kind());
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Gradient accumulation: `k` micro-batches of `8 / k` rows per optimizer step train as batches
/// of 8 do (a mean loss: the micro-batches' gradients divided by `k` and summed), for SGD with
/// momentum, Adam with clipping (the sum's norm) and Adam with loss scaling (the scaler checks
/// the sum), on the CPU reference and the GPU: parameters after three optimizer steps, and the
/// step counts.
#[test]
fn gradient_accumulation_trains_as_the_whole_batch() {
    let build = tiny_step_accumulating;
    let opts = [
        Optimizer::sgd_momentum(0.1, 0.9, false),
        Optimizer::adam(1e-2).clip_grad_norm(0.1),
        Optimizer::adam(1e-2).grad_scaler(GradScaler::default()),
    ];
    let mut devices: Vec<fn() -> Device> = vec![Device::cpu];
    if gpu().is_some() {
        devices.push(|| Device::gpu().unwrap());
    }
    let names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
    for make in devices {
        for opt in &opts {
            let (xs, ts) = (rand(&[3 * 8, 5], 7), rand(&[3 * 8, 3], 8));
            let rows = |t: &Tensor, from: usize, n: usize, w: usize| {
                Tensor::new([n, w], t.data()[from * w..(from + n) * w].to_vec()).unwrap()
            };
            let whole = make();
            let mut step = build(&whole, opt.clone(), 8, 1);
            for s in 0..3 {
                let (x, t) = (rows(&xs, 8 * s, 8, 5), rows(&ts, 8 * s, 8, 3));
                step.step(&[("x", &x), ("t", &t)], false).unwrap();
            }
            for k in [2, 4] {
                let what = format!("{:?} {:?}, {k} micro-batches", whole.kind(), opt.rule);
                let dev = make();
                let mut micro = build(&dev, opt.clone(), 8 / k, k);
                for m in 0..3 * k {
                    let n = 8 / k;
                    let (x, t) = (rows(&xs, n * m, n, 5), rows(&ts, n * m, n, 3));
                    let loss = micro.step(&[("x", &x), ("t", &t)], true).unwrap().unwrap();
                    assert!(loss.is_finite(), "{what}: micro-batch {m}: loss {loss}");
                }
                assert_eq!(micro.optimizer().steps(), 3, "{what}");
                // on the GPU a micro-batch's four accumulations are one kernel, the last's too,
                // whose updates read the sums: one kernel more than a step without accumulation
                assert_eq!(micro.micro_plans().len(), (k - 1).min(2), "{what}");
                let on_gpu = dev.kind() != kiln::BackendKind::Cpu;
                if on_gpu {
                    let (last, plain) = (micro.plan().kernels(), step.plan().kernels());
                    assert_eq!(last.len(), plain.len() + 1, "{what}: {last:?}");
                }
                let plans = micro.micro_plans().iter().chain([micro.plan()]);
                for plan in plans.filter(|_| on_gpu) {
                    let kernels = plan.kernels();
                    let count = |op| common::count_op(&kernels, op);
                    assert_eq!(count("accumulate_group"), 1, "{what}: {kernels:?}");
                    assert_eq!(count("accumulate"), 0, "{what}: {kernels:?}");
                }
                if let Some(s) = micro.scaler_state().unwrap() {
                    assert_eq!(s.steps_taken, 3, "{what}: {s:?}");
                }
                for name in names {
                    let (a, b) = (dev.param(name).unwrap(), whole.param(name).unwrap());
                    assert_close(&format!("{what}: {name}"), &a, &b, 1e-6, 1e-5);
                }
            }
        }
    }
    // no micro-batch at all is an error
    let g = Graph::new();
    let p = g.param_init("accumulate.p", Tensor::full([2], 1.0));
    let loss = g.sum_all(g.square(p).unwrap()).unwrap();
    let none =
        TrainStep::with_accumulation(&Device::cpu(), &g, loss, &[p], Optimizer::sgd(0.1), 0, 0);
    assert!(none.is_err());
}

/// A grad scaler that could not scale (torch's checks) is an error when the step is built.
#[test]
fn bad_grad_scalers_are_errors() {
    let bad = [
        GradScaler {
            init_scale: 0.0,
            ..Default::default()
        },
        GradScaler {
            init_scale: f32::INFINITY,
            ..Default::default()
        },
        GradScaler {
            growth_factor: 1.0,
            ..Default::default()
        },
        GradScaler {
            backoff_factor: 1.0,
            ..Default::default()
        },
        GradScaler {
            growth_interval: 0,
            ..Default::default()
        },
    ];
    for scaler in bad {
        let g = Graph::new();
        let p = g.param_init("bad_scaler.p", Tensor::full([2], 1.0));
        let loss = g.sum_all(g.square(p).unwrap()).unwrap();
        let opt = Optimizer::sgd(0.1).grad_scaler(scaler);
        let err = TrainStep::new(&Device::cpu(), &g, loss, &[p], opt, 0)
            .err()
            .unwrap_or_else(|| panic!("{scaler:?} was accepted"));
        assert!(err.to_string().contains("grad scaler"), "{err}");
    }
}

/// What loss scaling is for: a mixed-precision model whose f16 gradients are below f16's
/// smallest subnormal (about 6e-8) learns nothing without it (they flush to zero) and learns
/// what f32 would with it (scaled by 2^16 they are representable, and unscaled in f32), on the
/// GPU and on the CPU reference (which rounds f16 values as f16 storage does).
#[test]
fn loss_scaling_keeps_small_f16_gradients() {
    let x = [0.5f32, -0.75, 1.0, 0.25];
    let run = |dev: &Device, scaled: bool| -> Vec<f32> {
        let g = Graph::new();
        let w = g.param_init("w", Tensor::full([4], 1.0));
        let xs = g.constant(Tensor::new([4], x.to_vec()).unwrap());
        let half = |t| g.cast(t, kiln::DType::F16).unwrap();
        let y = g.mul(half(w), half(xs)).unwrap();
        let y = g.cast(y, kiln::DType::F32).unwrap();
        // d loss / d y = 1e-9 everywhere: zero in f16
        let loss = g.mul_scalar(g.sum_all(y).unwrap(), 1e-9).unwrap();
        let mut opt = Optimizer::sgd(1e6);
        if scaled {
            opt = opt.grad_scaler(GradScaler::default());
        }
        let mut step = TrainStep::new(dev, &g, loss, &[w], opt, 0).unwrap();
        step.step(&[], false).unwrap();
        dev.param("w").unwrap().into_data()
    };
    let mut devices = vec![Device::cpu()];
    if let Some(dev) = gpu() {
        if dev.features().contains(wgpu::Features::SHADER_F16) {
            devices.push(Device::gpu().unwrap());
        } else {
            eprintln!("NOTICE: adapter without SHADER_F16; f16 loss scaling on the CPU only");
        }
    }
    for dev in devices {
        let what = format!("{:?}", dev.kind());
        assert_eq!(run(&dev, false), vec![1.0; 4], "{what}: unscaled");
        // w - lr * 1e-9 * x, the gradient 1e-9 * 2^16 and its product with x rounded to f16
        // (0.05% each)
        let got = run(&dev, true);
        for i in 0..4 {
            let want = 1.0 - 1e6 * 1e-9 * x[i] as f64;
            assert!(
                (got[i] as f64 - want).abs() < 3e-6,
                "{what}: scaled: {got:?}, want 1 - 1e-3 x"
            );
        }
    }
}

#[test]
fn a_training_step_is_one_plan_and_the_loss_goes_down() {
    let Some(dev) = gpu() else { return };
    // a small CNN on random data with fixed labels: the loss must fall
    let g = Graph::new();
    let x = g.input("x", [16, 1, 8, 8]);
    let y = g.input("y", [16]);
    let mut init = Init::new(3);
    let conv = kiln::nn::Conv2d::new("conv1", 1, 4, (3, 3), Default::default(), &mut init);
    let fc = Linear::new("fc", 4 * 3 * 3, 3, &mut init);
    let (h, pc) = conv.apply(&g, x).unwrap();
    let h = g
        .max_pool2d(g.relu(h).unwrap(), (2, 2), (2, 2), (0, 0))
        .unwrap();
    let (logits, pf) = fc.apply(&g, g.flatten(h).unwrap()).unwrap();
    let loss = g.cross_entropy(logits, y).unwrap();
    let params: Vec<_> = pc.iter().chain(&pf).copied().collect();
    let mut step = TrainStep::new(&dev, &g, loss, &params, Optimizer::adam(1e-2), 0).unwrap();
    let info = step.plan().info();
    assert!(
        info.dispatches > 10,
        "forward, backward and update in one plan: {info}"
    );
    let xv = rand(&[16, 1, 8, 8], 9);
    let yv = Tensor::new([16], (0..16).map(|i| (i % 3) as f32).collect()).unwrap();
    let first = step.step(&[("x", &xv), ("y", &yv)], true).unwrap().unwrap();
    for _ in 0..40 {
        step.step(&[("x", &xv), ("y", &yv)], false).unwrap();
    }
    let last = step.step(&[("x", &xv), ("y", &yv)], true).unwrap().unwrap();
    assert!(last < first * 0.5, "loss {first} -> {last}");
}

#[test]
fn schedules() {
    let o = Optimizer::sgd(1.0).schedule(Schedule::Step {
        step_size: 2,
        gamma: 0.5,
    });
    assert_eq!(
        (0..5).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [1.0, 1.0, 0.5, 0.5, 0.25]
    );
    let o = Optimizer::sgd(1.0).schedule(Schedule::Cosine {
        t_max: 4,
        eta_min: 0.0,
    });
    assert!((o.lr_at(2) - 0.5).abs() < 1e-6 && o.lr_at(4).abs() < 1e-6 && o.lr_at(0) == 1.0);
    let o = Optimizer::sgd(1.0).warmup(4);
    assert_eq!(
        (0..5).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [0.25, 0.5, 0.75, 1.0, 1.0]
    );
    // LinearLR(start_factor 1, end_factor 0, total_iters 4) and ExponentialLR(gamma 0.5)
    let o = Optimizer::sgd(2.0).schedule(Schedule::Linear {
        start_factor: 1.0,
        end_factor: 0.0,
        total_iters: 4,
    });
    assert_eq!(
        (0..6).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    );
    // MultiStepLR(milestones [2, 4, 4], gamma 0.1): the repeated milestone counts twice, as
    // torch's Counter; PolynomialLR(total_iters 4, power 2)
    let o = Optimizer::sgd(1.0).schedule(Schedule::MultiStep {
        milestones: vec![4, 2, 4],
        gamma: 0.1,
    });
    let lr: Vec<f32> = (0..6).map(|t| o.lr_at(t)).collect();
    let want = [1.0, 1.0, 0.1, 0.1, 0.001, 0.001];
    assert!(
        lr.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-6 * b),
        "{lr:?}"
    );
    let o = Optimizer::sgd(1.0).schedule(Schedule::Polynomial {
        total_iters: 4,
        power: 2.0,
    });
    assert_eq!(
        (0..6).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    );
    let o = Optimizer::sgd(2.0).schedule(Schedule::Exponential { gamma: 0.5 });
    assert_eq!(
        (0..4).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [2.0, 1.0, 0.5, 0.25]
    );
    // warmup then linear decay (the usual transformer schedule)
    let o = Optimizer::sgd(1.0).warmup(2).schedule(Schedule::Linear {
        start_factor: 1.0,
        end_factor: 0.5,
        total_iters: 4,
    });
    assert_eq!(
        (0..5).map(|t| o.lr_at(t)).collect::<Vec<_>>(),
        [0.5, 0.875, 0.75, 0.625, 0.5]
    );
    // CosineAnnealingWarmRestarts(T_0 2, T_mult 2): restarts at steps 2 and 6
    let o = Optimizer::sgd(1.0).schedule(Schedule::CosineWarmRestarts {
        t_0: 2,
        t_mult: 2,
        eta_min: 0.0,
    });
    let want = [1.0, 0.5, 1.0, 0.853_553_4, 0.5, 0.146_446_6, 1.0];
    for (t, w) in want.iter().enumerate() {
        assert!(
            (o.lr_at(t as u64) - w).abs() < 1e-6,
            "step {t}: {}",
            o.lr_at(t as u64)
        );
    }
    // OneCycleLR(max_lr 1, total_steps 10): up from 0.04 over steps 0..2, down to 4e-6 at 9;
    // the momentum (SGD's, Adam's beta1) the other way between 0.95 and 0.85
    let sched = Schedule::one_cycle(10);
    let mut sgd = Optimizer::sgd(1.0).schedule(sched.clone());
    let mut adam = Optimizer::adam(1.0).schedule(sched);
    let lr3 = 4e-6 + (1.0 - 4e-6) / 2.0 * ((std::f64::consts::PI / 7.0).cos() + 1.0);
    let want = [
        (0, 0.04, 0.95),
        (1, 0.52, 0.9),
        (2, 1.0, 0.85),
        (3, lr3, 0.0),
        (9, 4e-6, 0.95),
    ];
    for (t, lr, m) in want {
        assert!(
            (sgd.lr_at(t) as f64 - lr).abs() < 1e-6,
            "step {t}: {}",
            sgd.lr_at(t)
        );
        if m > 0.0 {
            assert!(
                (sgd.momentum_at(t).unwrap() - m as f32).abs() < 1e-6,
                "step {t}"
            );
        }
    }
    // a OneCycle over no steps would make the learning rate NaN: an error at build time
    let g = Graph::new();
    let p = g.param_init("p", Tensor::full([2], 1.0));
    let loss = g.sum_all(g.square(p).unwrap()).unwrap();
    let err = Optimizer::sgd(1.0)
        .schedule(Schedule::one_cycle(0))
        .minimize(&g, loss, &[p])
        .unwrap_err();
    assert!(err.to_string().contains("total_steps"), "{err}");
    for t in 0..3 {
        let (hs, ha) = (sgd.next_hyper(), adam.next_hyper());
        let m = sgd.momentum_at(t).unwrap();
        // the hyper vector's momentum (2) and beta1 (5)
        assert_eq!((hs.data()[2], ha.data()[5]), (m, m), "step {t}");
    }
}

#[test]
fn cnn_training_steps_match_between_gpu_and_cpu() {
    use kiln::nn::{Act, Conv2d, Sequential};
    if gpu().is_none() {
        return;
    }
    let build = || {
        let mut init = Init::new(5);
        Sequential::new()
            .layer(Conv2d::new(
                "conv1",
                1,
                3,
                (3, 3),
                Default::default(),
                &mut init,
            ))
            .act(Act::Relu)
            .act(Act::MaxPool(2))
            .act(Act::Flatten)
            .act(Act::Dropout(0.25, 1))
            .layer(Linear::new("fc", 3 * 3 * 3, 4, &mut init))
    };
    let run = |dev: &Device| -> Vec<Tensor> {
        let model = build();
        let g = Graph::new();
        let x = g.input("x", [4, 1, 8, 8]);
        let y = g.input("y", [4]);
        let (logits, params) = model.apply(&g, x, true).unwrap();
        let loss = g.cross_entropy(logits, y).unwrap();
        let mut step = TrainStep::new(dev, &g, loss, &params, Optimizer::adam(1e-2), 7).unwrap();
        let yv = Tensor::new([4], vec![0., 1., 2., 3.]).unwrap();
        for i in 0..3 {
            step.step(&[("x", &rand(&[4, 1, 8, 8], 40 + i)), ("y", &yv)], false)
                .unwrap();
        }
        model
            .param_names()
            .iter()
            .map(|n| dev.param(n).unwrap())
            .collect()
    };
    let a = run(&Device::gpu().unwrap());
    let b = run(&Device::cpu());
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert_close("cnn step", x, y, 1e-5, 1e-3);
    }
}

/// `Plateau` as torch's `ReduceLROnPlateau`: reductions after `patience` evaluations without a
/// relative improvement of `threshold`, `cooldown` evaluations ignored after each, never below
/// `min_lr` (a reduction to it that changes nothing reports none); max mode; a bad factor or a
/// NaN metric is an error; the rate it sets reaches a training step's next update.
#[test]
fn plateau_reduces_as_torch() {
    use kiln::nn::{Plateau, PlateauMode};
    let mut opt = Optimizer::sgd(1.0);
    let mut p = Plateau::new(PlateauMode::Min)
        .factor(0.5)
        .patience(2)
        .cooldown(1)
        .threshold(0.01, false)
        .min_lr(0.2);
    // (metric, reduced, lr after), worked from torch's step()
    let seq = [
        (1.0, false, 1.0),
        (0.995, false, 1.0), // not below 1 * (1 - 0.01)
        (0.98, false, 1.0),
        (0.98, false, 1.0),
        (0.98, false, 1.0),
        (0.98, true, 0.5),  // three bad in a row > patience 2
        (0.98, false, 0.5), // cooldown
        (0.98, false, 0.5),
        (0.98, false, 0.5),
        (0.98, true, 0.25),
        (0.98, false, 0.25),
        (0.98, false, 0.25),
        (0.98, false, 0.25),
        (0.98, true, 0.2), // max(0.125, min_lr)
        (0.98, false, 0.2),
        (0.98, false, 0.2),
        (0.98, false, 0.2),
        (0.98, false, 0.2), // already at min_lr
    ];
    for (k, (m, reduced, lr)) in seq.into_iter().enumerate() {
        assert_eq!(p.step(m, &mut opt).unwrap(), reduced, "evaluation {k}");
        assert_eq!(opt.lr, lr, "evaluation {k}");
    }
    assert_eq!(p.best(), 0.98);
    // (the mode set on the field: the first metric is the best whatever the mode)
    let mut q = Plateau::default().patience(0);
    q.mode = PlateauMode::Max;
    let mut opt = Optimizer::adam(1e-3);
    assert!(!q.step(0.5, &mut opt).unwrap());
    assert!(!q.step(0.6, &mut opt).unwrap());
    assert!(q.step(0.6, &mut opt).unwrap());
    assert!((opt.lr - 1e-4).abs() < 1e-10);
    let mut bad = Plateau::default().factor(1.0);
    assert!(bad
        .step(1.0, &mut opt)
        .unwrap_err()
        .to_string()
        .contains("factor"));
    assert!(q.step(f64::NAN, &mut opt).is_err());
    // through a training step: its next update uses the reduced rate (plain SGD from the same
    // parameters: the change of a parameter is lr times the same gradient)
    for (kind, fresh) in common::fresh_devices() {
        let first_change = |reduce: bool| {
            let dev = fresh();
            let mut step = tiny_step(&dev, Optimizer::sgd(0.1));
            if reduce {
                let mut p = Plateau::default().patience(0).factor(0.5);
                p.step(1.0, step.optimizer_mut()).unwrap();
                assert!(p.step(1.0, step.optimizer_mut()).unwrap());
                assert_eq!(step.optimizer().lr, 0.05);
            }
            let before = dev.param("fc2.weight").unwrap();
            let (xv, tv) = (rand(&[8, 5], 1), rand(&[8, 3], 2));
            step.step(&[("x", &xv), ("t", &tv)], true).unwrap();
            let after = dev.param("fc2.weight").unwrap();
            let back = if reduce { 2.0 } else { 1.0 };
            let change = before.data().iter().zip(after.data());
            Tensor::new([18], change.map(|(b, a)| (b - a) * back).collect()).unwrap()
        };
        // halving the rate halves every change (doubled back here)
        assert_close(kind, &first_change(true), &first_change(false), 1e-7, 1e-4);
    }
}

/// `Optimizer::ema` as torch's `AveragedModel` with `get_ema_multi_avg_fn(0.9)`: after the
/// first step each average is the parameter, then `ema + 0.1 (p - ema)` after each; checked
/// against the parameters read after every step, on both backends, with SGD and with Adam
/// under loss scaling; the averages of all four parameters are one kernel; a decay outside
/// [0, 1] is an error.
#[test]
fn ema_averages_as_torch() {
    let names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
    for (kind, fresh) in common::fresh_devices() {
        for scaled in [false, true] {
            let dev = fresh();
            let opt = match scaled {
                false => Optimizer::sgd(0.1).ema(0.9),
                true => Optimizer::adam(1e-2)
                    .grad_scaler(GradScaler::default())
                    .ema(0.9),
            };
            let mut step = tiny_step(&dev, opt);
            let mut want: Vec<Tensor> = Vec::new();
            for i in 0..4 {
                let (xv, tv) = (rand(&[8, 5], 10 + i), rand(&[8, 3], 20 + i));
                step.step(&[("x", &xv), ("t", &tv)], true).unwrap();
                for (k, name) in names.iter().enumerate() {
                    let p = dev.param(name).unwrap();
                    if i == 0 {
                        want.push(p);
                        continue;
                    }
                    let e = &want[k];
                    let data = e
                        .data()
                        .iter()
                        .zip(p.data())
                        .map(|(&e, &p)| e + 0.1 * (p - e))
                        .collect();
                    want[k] = Tensor::new(p.shape().clone(), data).unwrap();
                }
                for (k, name) in names.iter().enumerate() {
                    let got = dev.param(&Optimizer::ema_name(name)).unwrap();
                    let what = format!("{kind}, scaled {scaled}, step {i}, {name}");
                    assert_close(&what, &got, &want[k], 1e-7, 1e-5);
                }
            }
            if kind == "gpu" {
                let kernels: Vec<String> = step
                    .plan()
                    .kernels()
                    .iter()
                    .map(|k| k.to_string())
                    .collect();
                assert_eq!(common::count_op(&kernels, "ema_group"), 1, "{kernels:#?}");
                assert_eq!(common::count_op(&kernels, "ema_update"), 0, "{kernels:#?}");
            }
        }
    }
    // one parameter: its own kernel (`ema_update`), p = 1 - 0.5 * 2 p each step: 0.5, 0.25
    for dev in common::devices() {
        let g = Graph::new();
        let p = g.param_init("p", Tensor::full([3], 1.0));
        let loss = g.sum_all(g.square(p).unwrap()).unwrap();
        let mut step =
            TrainStep::new(&dev, &g, loss, &[p], Optimizer::sgd(0.25).ema(0.5), 0).unwrap();
        for _ in 0..2 {
            step.step(&[], false).unwrap();
        }
        // the average: 0.5 after the first step, then 0.5 + 0.5 (0.25 - 0.5)
        let got = dev.param(&Optimizer::ema_name("p")).unwrap();
        assert_eq!(got.data(), &[0.375; 3]);
    }
    let g = Graph::new();
    let p = g.param_init("p", Tensor::full([2], 1.0));
    let loss = g.sum_all(g.square(p).unwrap()).unwrap();
    let err = Optimizer::sgd(1.0)
        .ema(1.5)
        .minimize(&g, loss, &[p])
        .unwrap_err();
    assert!(err.to_string().contains("decay"), "{err}");
}

/// torch's K-dimensional cross-entropy, `logits (N, C, d1, d2)` against `labels (N, d1, d2)`
/// (a segmentation's per-pixel classes, `ignore_index` 255 as its void label): the loss of
/// each position, as the 2-D loss of the rows made by hand, every reduction, on both
/// backends; gradient checks; labels of another shape are an error.
#[test]
fn cross_entropy_over_positions_as_torch() {
    use kiln::graph::{CrossEntropyOpts, Reduction};
    let (n, c, h, w) = (2usize, 3usize, 4usize, 5usize);
    let g = Graph::new();
    let x = g.input("x", [n, c, h, w]);
    let y = g.input("y", [n, h, w]);
    let rows = g
        .reshape(g.permute(x, &[0, 2, 3, 1]).unwrap(), &[-1, c as isize])
        .unwrap();
    let flat = g.reshape(y, &[-1]).unwrap();
    let xv = Tensor::rand_uniform(vec![n, c, h, w], -3.0, 3.0, 4);
    let labels: Vec<f32> = (0..n * h * w)
        .map(|i| if i % 7 == 3 { 255.0 } else { (i % c) as f32 })
        .collect();
    // the plain loss has no void label: its own labels, all valid
    let valid: Vec<f32> = labels
        .iter()
        .map(|&l| if l == 255.0 { 1.0 } else { l })
        .collect();
    let yv = Tensor::new([n, h, w], labels).unwrap();
    let vv = Tensor::new([n, h, w], valid).unwrap();
    let v = g.input("v", [n, h, w]);
    let feeds = [("x", &xv), ("y", &yv), ("v", &vv)];
    let flat_v = g.reshape(v, &[-1]).unwrap();
    let mut outs = vec![
        g.cross_entropy(x, v).unwrap(),
        g.cross_entropy(rows, flat_v).unwrap(),
    ];
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let o = CrossEntropyOpts {
            ignore_index: Some(255),
            label_smoothing: 0.1,
            reduction,
            weight: None,
        };
        let a = g.cross_entropy_with(x, y, o).unwrap();
        let b = g.cross_entropy_with(rows, flat, o).unwrap();
        if reduction == Reduction::None {
            assert_eq!(g.shape(a).dims(), &[n, h, w]);
            outs.extend([g.reshape(a, &[-1]).unwrap(), b]);
        } else {
            outs.extend([a, b]);
        }
    }
    for dev in common::devices() {
        let got = dev.compile(&g, &outs).unwrap().run(&feeds).unwrap();
        for k in (0..outs.len()).step_by(2) {
            assert!(got[k].data().iter().all(|v| v.is_finite()), "output {k}");
            assert_close(&format!("output {k}"), &got[k], &got[k + 1], 1e-6, 1e-5);
        }
    }
    // the mean over the positions kept: central differences
    let o = CrossEntropyOpts {
        ignore_index: Some(255),
        ..Default::default()
    };
    let loss = g.cross_entropy_with(x, y, o).unwrap();
    gradcheck(
        "positions",
        &g,
        loss,
        &[("x", x)],
        &feeds,
        40,
        TOL_REDUCTION,
    );
    let bad = g.input("bad", [n, w, h]);
    let err = g.cross_entropy(x, bad).unwrap_err().to_string();
    assert!(
        err.contains("cross_entropy") && err.contains("class axis"),
        "{err}"
    );
}

/// torch.nn.init's distributions: means and standard deviations of large draws, the truncated
/// normal inside its bounds, orthogonal rows or columns (W W^T = I, or W^T W), and a seed
/// giving the same values again.
#[test]
fn initialisers_follow_torchs_distributions() {
    use kiln::nn::Init;
    let stats = |t: &Tensor| {
        let n = t.numel() as f64;
        let mean = t.data().iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = t
            .data()
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var.sqrt())
    };
    let mut init = Init::new(7);
    for (t, mean, std) in [
        (init.normal([200, 300], 1.5, 0.5), 1.5, 0.5),
        (
            init.kaiming_normal([200, 300], 300),
            0.0,
            (2.0f64 / 300.0).sqrt(),
        ),
        (
            init.xavier_normal([200, 300], 300, 200),
            0.0,
            (2.0f64 / 500.0).sqrt(),
        ),
    ] {
        let (m, s) = stats(&t);
        assert!(
            (m - mean).abs() < 0.01 * std.max(1.0) && (s / std - 1.0).abs() < 0.01,
            "{m} {s}"
        );
    }
    // ViT's trunc_normal_(std=0.02, a=-2, b=2) is all of N(0, 0.02^2); a tight one stays inside
    let t = init.trunc_normal([100_000], 0.0, 1.0, (-0.5, 1.0));
    assert!(t.data().iter().all(|&v| (-0.5..=1.0).contains(&v)));
    // the mean of N(0, 1) truncated to [-0.5, 1]: (phi(-0.5) - phi(1)) / (Phi(1) - Phi(-0.5))
    let (m, _) = stats(&t);
    assert!((m - 0.206_6).abs() < 0.01, "{m}");
    let (m, s) = stats(&init.trunc_normal([100_000], 0.0, 0.02, (-2.0, 2.0)));
    assert!(m.abs() < 1e-3 && (s / 0.02 - 1.0).abs() < 0.02, "{m} {s}");
    for (rows, cols) in [(8, 32), (32, 8), (16, 16)] {
        let w = init.orthogonal([rows, cols], 2.0);
        let at = |r: usize, c: usize| w.data()[r * cols + c] as f64;
        // the Gram matrix of the shorter side is gain^2 I
        let (count, len) = (rows.min(cols), rows.max(cols));
        for i in 0..count {
            for j in 0..count {
                let dot: f64 = (0..len)
                    .map(|k| match rows <= cols {
                        true => at(i, k) * at(j, k),
                        false => at(k, i) * at(k, j),
                    })
                    .sum();
                let want = if i == j { 4.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "{rows}x{cols} ({i}, {j}): {dot}");
            }
        }
    }
    let (a, b) = (
        Init::new(3).normal([5], 0.0, 1.0),
        Init::new(3).normal([5], 0.0, 1.0),
    );
    assert_eq!(a.data(), b.data());
}
