//! f16 graphs: tensors stored as IEEE half floats on the GPU (`Graph::input_as`, `Graph::cast`),
//! computed in f32 and rounded when stored, against the CPU reference (which rounds every f16
//! node's value the same way) at f16 tolerance, outputs poisoned with NaN first: casts (odd
//! lengths, values between f16 steps), every elementwise op (fused and not), products on awkward
//! shapes (transposes, batches, bias, relu, vec4 and scalar paths, every GEMM policy), reductions
//! and layout ops, fused chains, epilogues and prologues; gradients of a mixed-precision network
//! against the f32 network's; `verify`; and the errors for ops that take f32 only.

mod common;

use common::{assert_close, check_on, rand, refs};
use kiln::ops::matmul::Bias;
use kiln::ops::TOL_F16;
use kiln::{DType, Device, Graph, NodeId, Tensor};

/// A device of its own (fusion and the GEMM policy are set per device), or `None` where
/// `common::gpu` skips.
fn device(fusion: bool) -> Option<Device> {
    common::gpu()?;
    let dev = Device::gpu().expect("a GPU adapter");
    dev.set_fusion(fusion);
    Some(dev)
}

/// `common::check_on`, giving the plan's dispatch count.
fn check(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    f: &[(String, Tensor)],
    tol: (f64, f64),
) -> usize {
    check_on(dev, what, g, outputs, f, tol).dispatches
}

#[test]
fn casts_round_to_f16_and_back() {
    // values between f16 steps, beyond its range, subnormal in f16, and an odd count (the
    // buffer is padded to whole words)
    let data = vec![
        1.0,
        1.0 + 1.0 / 4096.0,
        -2.6093,
        65504.0,
        1e6,
        -1e-6,
        3.0e-5,
        0.1,
        -0.0,
    ];
    let n = data.len();
    let x = Tensor::new([n], data.clone()).unwrap();
    let f = vec![("x".to_string(), x)];
    let g = Graph::new();
    let xi = g.input("x", [n]);
    let h = g.cast(xi, DType::F16).unwrap();
    assert_eq!(g.dtype(h), DType::F16);
    let back = g.cast(h, DType::F32).unwrap();
    assert_eq!(
        g.cast(back, DType::F32).unwrap(),
        back,
        "a cast to its own type is a no-op"
    );
    // the CPU reference rounds as `half` does
    let want: Vec<f32> = data
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    let cpu = Device::cpu()
        .compile(&g, &[h, back])
        .unwrap()
        .run(&refs(&f))
        .unwrap();
    assert_eq!(cpu[0].data(), &want[..]);
    assert_eq!(cpu[1].data(), &want[..]);
    assert!(cpu[0].data()[4].is_infinite(), "1e6 overflows f16");
    let Some(dev) = device(true) else { return };
    // f16 outputs read back (h) and f32 ones (back), both exact
    check(&dev, "cast", &g, &[h, back], &f, (0.0, 0.0));
    // an f16 input is rounded on upload, and read back as it is stored
    let g = Graph::new();
    let xh = g.input_as("x", [n], DType::F16);
    let y = g.cast(xh, DType::F32).unwrap();
    let got = dev.compile(&g, &[xh, y]).unwrap().run(&refs(&f)).unwrap();
    assert_eq!(got[0].data(), &want[..]);
    assert_eq!(got[1].data(), &want[..]);
}

/// Every elementwise op on f16 tensors, broadcasting, each op alone and the chain fused.
#[test]
fn elementwise_ops_in_f16() {
    for fusion in [false, true] {
        let Some(dev) = device(fusion) else { return };
        let g = Graph::new();
        let (a, b, c) = (
            g.input_as("a", [3, 7, 5], DType::F16),
            g.input_as("b", [7, 1], DType::F16),
            g.input_as("c", [5], DType::F16),
        );
        let mut outs = vec![
            g.add(a, b).unwrap(),
            g.sub(a, c).unwrap(),
            g.mul(a, b).unwrap(),
            g.div(a, g.add_scalar(g.abs(c).unwrap(), 0.5).unwrap())
                .unwrap(),
            g.maximum(a, c).unwrap(),
            g.minimum(b, a).unwrap(),
        ];
        for op in [
            Graph::neg,
            Graph::exp,
            Graph::relu,
            Graph::sigmoid,
            Graph::tanh,
            Graph::gelu,
            Graph::abs,
            Graph::square,
            Graph::sign,
            Graph::softplus,
            Graph::silu,
            Graph::selu,
            Graph::relu6,
            Graph::hardsigmoid,
            Graph::hardswish,
            Graph::mish,
            Graph::gelu_tanh,
            Graph::log_sigmoid,
            Graph::softsign,
            Graph::sin,
            Graph::cos,
            Graph::erf,
            Graph::expm1,
            Graph::floor,
            Graph::round,
        ] {
            outs.push(op(&g, a).unwrap());
        }
        let pos = g.add_scalar(g.abs(a).unwrap(), 0.25).unwrap();
        outs.push(g.log(pos).unwrap());
        outs.push(g.sqrt(pos).unwrap());
        outs.push(g.rsqrt(pos).unwrap());
        outs.push(g.log1p(pos).unwrap());
        outs.push(g.pow_scalar(pos, 1.5).unwrap());
        outs.push(g.rdiv_scalar(pos, 2.0).unwrap());
        outs.push(g.mul_scalar(a, 3.0).unwrap());
        // a chain: one kernel with fusion on
        let chain = g
            .tanh(g.mul(g.add(a, b).unwrap(), c).unwrap())
            .and_then(|v| g.add_scalar(v, 1.0))
            .unwrap();
        for &o in &outs {
            assert_eq!(g.dtype(o), DType::F16);
        }
        let f = vec![
            ("a".to_string(), rand(&[3, 7, 5], 1)),
            ("b".to_string(), rand(&[7, 1], 2)),
            ("c".to_string(), rand(&[5], 3)),
        ];
        check(
            &dev,
            &format!("elementwise, fusion {fusion}"),
            &g,
            &outs,
            &f,
            TOL_F16,
        );
        let dispatches = check(&dev, "chain", &g, &[chain], &f, TOL_F16);
        assert_eq!(dispatches, if fusion { 1 } else { 4 }, "fusion {fusion}");
    }
}

/// f16 products on awkward shapes: every transpose, ragged tiles, vec4 and scalar paths,
/// batches with broadcasting, bias along rows and columns with relu.
#[test]
fn products_in_f16() {
    let Some(dev) = device(true) else { return };
    /// `a`'s shape, `b`'s, whether each is transposed, and what the case is.
    type Case<'a> = (&'a [usize], &'a [usize], bool, bool, &'a str);
    let cases: &[Case] = &[
        (&[1, 1], &[1, 1], false, false, "1x1x1"),
        (&[7, 13], &[13, 5], false, false, "primes"),
        (&[17, 33], &[65, 17], true, true, "both transposed"),
        (&[64, 64], &[64, 64], false, false, "vec4"),
        (&[36, 20], &[36, 44], true, false, "a transposed, vec4"),
        (
            &[2, 3, 9, 12],
            &[12, 16],
            false,
            false,
            "batched, broadcast b",
        ),
        (
            &[3, 5, 8],
            &[3, 11, 8],
            false,
            true,
            "batched, b transposed",
        ),
        (&[130, 67], &[67, 129], false, false, "past 128 tiles"),
        // skinny: the GEMV kernel (batch-1 inference)
        (&[1, 40], &[40, 33], false, false, "one row"),
        (&[3, 64], &[50, 64], false, true, "three rows, b transposed"),
    ];
    for (k, &(sa, sb, ta, tb, what)) in cases.iter().enumerate() {
        let g = Graph::new();
        let a = g.input_as("a", sa, DType::F16);
        let b = g.input_as("b", sb, DType::F16);
        let y = g.matmul_t(a, b, ta, tb).unwrap();
        assert_eq!(g.dtype(y), DType::F16);
        let f = vec![
            ("a".to_string(), rand(sa, 10 + k as u64)),
            ("b".to_string(), rand(sb, 20 + k as u64)),
        ];
        check(&dev, what, &g, &[y], &f, TOL_F16);
    }
    // bias and relu in the product's epilogue
    for (bias, len) in [(Bias::Rows, 19), (Bias::Cols, 23)] {
        let g = Graph::new();
        let a = g.input_as("a", [19, 30], DType::F16);
        let b = g.input_as("b", [30, 23], DType::F16);
        let c = g.input_as("c", [len], DType::F16);
        let y = g
            .matmul_fused(a, b, false, false, Some((c, bias)), true)
            .unwrap();
        let f = vec![
            ("a".to_string(), rand(&[19, 30], 31)),
            ("b".to_string(), rand(&[30, 23], 32)),
            ("c".to_string(), rand(&[len], 33)),
        ];
        check(&dev, &format!("bias {bias:?}, relu"), &g, &[y], &f, TOL_F16);
    }
    // every GEMM policy gives f16 products a generated kernel (the portable shader is f32)
    for policy in ["portable", "32x32x8/4x4", "tune"] {
        let dev = device(true).unwrap();
        dev.set_gemm_policy(kiln::GemmPolicy::parse(policy).unwrap())
            .unwrap();
        let g = Graph::new();
        let a = g.input_as("a", [24, 40], DType::F16);
        let b = g.input_as("b", [40, 36], DType::F16);
        let y = g.matmul(a, b).unwrap();
        let f = vec![
            ("a".to_string(), rand(&[24, 40], 41)),
            ("b".to_string(), rand(&[40, 36], 42)),
        ];
        check(&dev, policy, &g, &[y], &f, TOL_F16);
    }
}

/// Reductions, transposes, broadcasts and reshapes of f16 tensors.
#[test]
fn reductions_and_layout_in_f16() {
    let Some(dev) = device(false) else { return };
    let g = Graph::new();
    let x = g.input_as("x", [4, 37, 6], DType::F16);
    let outs = vec![
        g.sum(x, 1, false).unwrap(),
        g.mean(x, 0, true).unwrap(),
        g.max(x, 2, false).unwrap(),
        g.sum_all(x).unwrap(),
        g.permute(x, &[2, 0, 1]).unwrap(),
        g.transpose(x, 0, 1).unwrap(),
        g.expand(g.sum(x, 0, true).unwrap(), &kiln::Shape(vec![3, 4, 37, 6]))
            .unwrap(),
        g.reshape(g.transpose(x, 1, 2).unwrap(), &[24, -1]).unwrap(),
    ];
    for &o in &outs {
        assert_eq!(g.dtype(o), DType::F16);
    }
    let f = vec![("x".to_string(), rand(&[4, 37, 6], 7))];
    // sums of 37 f16 values rounded once, in another order than the reference
    check(&dev, "reductions and layout", &g, &outs, &f, TOL_F16);
}

/// With fusion on, f16 chains fuse into products (epilogue) and reductions (prologue), and
/// transposes fold into fused reads, as in f32.
#[test]
fn fusion_in_f16() {
    let Some(dev) = device(true) else { return };
    let g = Graph::new();
    let x = g.input_as("x", [33, 20], DType::F16);
    let w = g.input_as("w", [20, 28], DType::F16);
    let b = g.input_as("b", [28], DType::F16);
    // gelu(x w + b): one generated GEMM with the epilogue
    let y = g.gelu(g.add(g.matmul(x, w).unwrap(), b).unwrap()).unwrap();
    let f = vec![
        ("x".to_string(), rand(&[33, 20], 51)),
        ("w".to_string(), rand(&[20, 28], 52)),
        ("b".to_string(), rand(&[28], 53)),
    ];
    assert_eq!(check(&dev, "epilogue", &g, &[y], &f, TOL_F16), 1);
    // sum((x - 0.5)^2): one reduction with its prologue
    let s = g
        .sum_all(g.square(g.add_scalar(x, -0.5).unwrap()).unwrap())
        .unwrap();
    assert_eq!(check(&dev, "prologue", &g, &[s], &f, TOL_F16), 1);
    // transpose(x) * 2 + 1: the transpose read inside the fused kernel
    let t = g
        .add_scalar(
            g.mul_scalar(g.transpose(x, 0, 1).unwrap(), 2.0).unwrap(),
            1.0,
        )
        .unwrap();
    assert_eq!(check(&dev, "folded transpose", &g, &[t], &f, TOL_F16), 1);
}

/// Casts of f32 tensors to f16 cost no kernel of their own where one elementwise kernel reads
/// them (`fuse::fold_casts`: rounded on load) or a transpose is their only reader
/// (`fuse::programs_into_permutes`), and a transpose runs the chain it alone reads. Compared
/// exactly where the result is f32 (a missed rounding would show), else at f16 tolerance.
#[test]
fn casts_and_chains_fold_into_their_readers() {
    let Some(dev) = device(true) else { return };
    let exact = (0.0, 1e-7);
    let g = Graph::new();
    let x = g.input("x", [7, 5]);
    let y = g.input_as("y", [7, 5], DType::F16);
    let b = g.input("b", [5]);
    let f = vec![
        ("x".to_string(), rand(&[7, 5], 61)),
        ("y".to_string(), rand(&[7, 5], 62)),
        ("b".to_string(), rand(&[5], 63)),
    ];
    let half = |v: NodeId| g.cast(v, DType::F16).unwrap();
    let cases: Vec<(&str, NodeId, (f64, f64))> = vec![
        // the only value read rounded, the result cast back to f32: one kernel, exact
        (
            "f32(relu(f16(x)))",
            g.cast(g.relu(half(x)).unwrap(), DType::F32).unwrap(),
            exact,
        ),
        // beside f16 values, broadcast (a bias)
        ("y + f16(b)", g.add(y, half(b)).unwrap(), TOL_F16),
        (
            "f16(x) * y + f16(b)",
            {
                let m = g.mul(half(x), y).unwrap();
                g.add(m, half(b)).unwrap()
            },
            TOL_F16,
        ),
        // a transpose of a cast, both ways (exact: no arithmetic)
        ("f16(x)^T", g.transpose(half(x), 0, 1).unwrap(), exact),
        (
            "f32(y)^T",
            g.transpose(g.cast(y, DType::F32).unwrap(), 0, 1).unwrap(),
            exact,
        ),
        // a transpose of a chain of two inputs, f16
        (
            "(f16(x) * y + 1)^T",
            g.transpose(g.add_scalar(g.mul(half(x), y).unwrap(), 1.0).unwrap(), 0, 1)
                .unwrap(),
            TOL_F16,
        ),
    ];
    for (what, out, tol) in cases {
        let plan = common::check_plan(&dev, what, &g, &[out], &f, tol);
        assert_eq!(plan.info().dispatches, 1, "{what}: {:#?}", plan.kernels());
    }
    // a cast also read by another kernel stays (one rounding, stored once)
    let c = half(x);
    let two = [g.add(c, y).unwrap(), g.transpose(c, 0, 1).unwrap()];
    let plan = common::check_plan(&dev, "shared cast", &g, &two, &f, TOL_F16);
    assert_eq!(
        common::count_op(&plan.kernels(), "cast"),
        1,
        "{:#?}",
        plan.kernels()
    );
    assert_eq!(plan.info().dispatches, 3, "{:#?}", plan.kernels());
}

/// A two-layer network whose products and activations run in f16 from f32 parameters (cast in,
/// cast out, loss in f32, as under autocast): its gradients are f32 and agree with the f32
/// network's to f16 precision, on the CPU reference and on the GPU; `verify` passes.
#[test]
fn mixed_precision_gradients() {
    let net = |half: bool| {
        let g = Graph::new();
        let x = g.input("x", [16, 12]);
        let t = g.input("t", [16, 5]);
        let w1 = g.param_init("w1", Tensor::rand_uniform([12, 24], -0.5, 0.5, 61));
        let b1 = g.param_init("b1", Tensor::rand_uniform([24], -0.5, 0.5, 62));
        let w2 = g.param_init("w2", Tensor::rand_uniform([24, 5], -0.5, 0.5, 63));
        let dt = if half { DType::F16 } else { DType::F32 };
        let c = |v: NodeId| g.cast(v, dt).unwrap();
        let h = g
            .relu(g.add(g.matmul(c(x), c(w1)).unwrap(), c(b1)).unwrap())
            .unwrap();
        let y = g.matmul(h, c(w2)).unwrap();
        let loss = g.mse_loss(g.cast(y, DType::F32).unwrap(), t).unwrap();
        let grads = g.grad(loss, &[w1, b1, w2]).unwrap();
        for &d in &grads {
            assert_eq!(g.dtype(d), DType::F32, "parameters' gradients are f32");
        }
        let mut outs = vec![loss];
        outs.extend(grads);
        (g, outs)
    };
    let f = vec![
        ("x".to_string(), rand(&[16, 12], 64)),
        ("t".to_string(), rand(&[16, 5], 65)),
    ];
    let (g32, o32) = net(false);
    let (g16, o16) = net(true);
    let want = Device::cpu()
        .compile(&g32, &o32)
        .unwrap()
        .run(&refs(&f))
        .unwrap();
    let cpu16 = Device::cpu()
        .compile(&g16, &o16)
        .unwrap()
        .run(&refs(&f))
        .unwrap();
    for (k, (a, b)) in cpu16.iter().zip(&want).enumerate() {
        assert_close(&format!("f16 network vs f32, output {k}"), a, b, 5e-3, 3e-2);
    }
    for fusion in [false, true] {
        let Some(dev) = device(fusion) else { return };
        check(
            &dev,
            &format!("mixed precision, fusion {fusion}"),
            &g16,
            &o16,
            &f,
            (1e-3, 2e-2),
        );
        let report = dev.verify(&g16, &o16, &refs(&f)).unwrap();
        assert!(report.ok(), "{report}");
    }
}

/// f16 convolutions (implicit GEMMs; strided, padded, dilated; bias and relu) and pooling,
/// forward and backward, against the CPU reference, with every GEMM policy (the portable one
/// keeps explicit im2col / col2im kernels: their f16 variants).
#[test]
fn convolutions_and_pooling_in_f16() {
    use kiln::graph::Conv2dOpts;
    let cases = [
        (
            (2, 3, 9, 7),
            5,
            (3, 3),
            Conv2dOpts {
                padding: (1, 1),
                ..Default::default()
            },
        ),
        (
            (1, 2, 11, 10),
            4,
            (3, 2),
            Conv2dOpts {
                stride: (2, 1),
                padding: (1, 0),
                dilation: (1, 2),
            },
        ),
        ((3, 1, 6, 6), 7, (1, 1), Conv2dOpts::default()),
        // stride gaps: the input gradient runs as a product and the f16 col2im kernel
        (
            (1, 2, 9, 9),
            3,
            (3, 3),
            Conv2dOpts {
                stride: (2, 2),
                ..Default::default()
            },
        ),
    ];
    for policy in ["auto", "portable"] {
        let dev = match device(true) {
            Some(d) => d,
            None => return,
        };
        dev.set_gemm_policy(kiln::GemmPolicy::parse(policy).unwrap())
            .unwrap();
        for (k, &((n, c, h, w), o, kernel, opts)) in cases.iter().enumerate() {
            let g = Graph::new();
            let x = g.input_as("x", [n, c, h, w], DType::F16);
            let wt = g.input_as("w", [o, c, kernel.0, kernel.1], DType::F16);
            let b = g.input_as("b", [o], DType::F16);
            let y = g.conv2d_fused(x, wt, Some(b), opts, k == 0).unwrap();
            assert_eq!(g.dtype(y), DType::F16);
            let pooled = g.max_pool2d(y, (2, 2), (2, 2), (0, 0)).unwrap();
            let avg = g.avg_pool2d(y, (2, 2), (1, 1), (1, 1)).unwrap();
            // uneven windows: the adaptive kernels' f16 variants
            let adaptive = g.adaptive_avg_pool2d(y, (3, 2)).unwrap();
            let loss = g
                .add(
                    g.add(
                        g.sum_all(g.mul(pooled, pooled).unwrap()).unwrap(),
                        g.sum_all(avg).unwrap(),
                    )
                    .unwrap(),
                    g.sum_all(g.square(adaptive).unwrap()).unwrap(),
                )
                .unwrap();
            let grads = g.grad(loss, &[x, wt, b]).unwrap();
            // a requested column matrix runs the f16 variant of the explicit im2col kernel
            let cols = g.im2col(x, kernel, opts).unwrap();
            let mut outs = vec![y, pooled, avg, adaptive, cols];
            outs.extend(&grads);
            for &o in &outs {
                assert_eq!(g.dtype(o), DType::F16);
            }
            let f = vec![
                ("x".to_string(), rand(&[n, c, h, w], 80 + k as u64)),
                (
                    "w".to_string(),
                    rand(&[o, c, kernel.0, kernel.1], 90 + k as u64),
                ),
                ("b".to_string(), rand(&[o], 100 + k as u64)),
            ];
            // gradients sum many f16 products: f16 tolerance with a little more headroom
            check(
                &dev,
                &format!("{policy} case {k}"),
                &g,
                &outs,
                &f,
                (2e-3, 2e-2),
            );
        }
    }
}

/// A small CNN in mixed precision (`nn::Conv2d` and `nn::Linear` follow their f16 input):
/// its f32 parameter gradients agree with the f32 network's within f16 precision.
#[test]
fn mixed_precision_cnn_gradients() {
    use kiln::graph::Conv2dOpts;
    use kiln::nn::{Conv2d, Init, Linear};
    let net = |dt: DType| {
        let g = Graph::new();
        let x = g.input("x", [4, 1, 8, 8]);
        let labels = g.input("y", [4]);
        let mut init = Init::new(9);
        let conv = Conv2d::new(
            "conv",
            1,
            6,
            (3, 3),
            Conv2dOpts {
                padding: (1, 1),
                ..Default::default()
            },
            &mut init,
        );
        let fc = Linear::new("fc", 6 * 4 * 4, 10, &mut init);
        let (h, pc) = conv.apply_relu(&g, g.cast(x, dt).unwrap()).unwrap();
        let h = g.max_pool2d(h, (2, 2), (2, 2), (0, 0)).unwrap();
        let (logits, pf) = fc.apply(&g, g.flatten(h).unwrap()).unwrap();
        // f16 logits straight into the loss (computed in f32, the loss f32)
        let loss = g.cross_entropy(logits, labels).unwrap();
        assert_eq!(g.dtype(loss), DType::F32);
        let params: Vec<NodeId> = pc.iter().chain(&pf).copied().collect();
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &params).unwrap());
        (g, outs)
    };
    let f = vec![
        (
            "x".to_string(),
            Tensor::rand_uniform([4, 1, 8, 8], 0.0, 1.0, 5),
        ),
        (
            "y".to_string(),
            Tensor::new([4], vec![3.0, 1.0, 7.0, 0.0]).unwrap(),
        ),
    ];
    let (g32, o32) = net(DType::F32);
    let (g16, o16) = net(DType::F16);
    let want = Device::cpu()
        .compile(&g32, &o32)
        .unwrap()
        .run(&refs(&f))
        .unwrap();
    let cpu16 = Device::cpu()
        .compile(&g16, &o16)
        .unwrap()
        .run(&refs(&f))
        .unwrap();
    for (k, (a, b)) in cpu16.iter().zip(&want).enumerate() {
        assert_close(&format!("f16 CNN vs f32, output {k}"), a, b, 5e-3, 3e-2);
    }
    let Some(dev) = device(true) else { return };
    check(&dev, "mixed-precision CNN", &g16, &o16, &f, (1e-3, 2e-2));
    let report = dev.verify(&g16, &o16, &refs(&f)).unwrap();
    assert!(report.ok(), "{report}");
}

/// A MobileNet block in mixed precision: a depthwise 3x3 convolution (`groups = C`, the direct
/// grouped kernels' f16 variants), relu, a pointwise 1x1 convolution, then a decoder's
/// transposed convolutions (dense: a product and col2im; in groups: the grouped kernels); its
/// f32 parameter gradients agree with the f32 block's within f16 precision, the GPU with the
/// CPU reference.
#[test]
fn mixed_precision_depthwise_block() {
    use kiln::graph::Conv2dOpts;
    use kiln::nn::{Conv2d, ConvTranspose2d, Init};
    use kiln::ops::conv::ConvTranspose2dOpts;
    let net = |dt: DType| {
        let g = Graph::new();
        let x = g.input("x", [2, 6, 7, 7]);
        let mut init = Init::new(4);
        let pad = Conv2dOpts {
            padding: (1, 1),
            ..Default::default()
        };
        let dw = Conv2d::grouped("dw", 6, 12, (3, 3), pad, 6, &mut init).unwrap();
        let pw = Conv2d::new("pw", 12, 5, (1, 1), Default::default(), &mut init);
        let (h, p1) = dw.apply_relu(&g, g.cast(x, dt).unwrap()).unwrap();
        assert_eq!(g.dtype(h), dt);
        let (y, p2) = pw.apply(&g, h).unwrap();
        let up = ConvTranspose2dOpts {
            stride: (2, 2),
            padding: (1, 1),
            output_padding: (1, 1),
            ..Default::default()
        };
        let t1 = ConvTranspose2d::new("t1", 5, 4, (3, 3), up, 1, &mut init).unwrap();
        let t2 = ConvTranspose2d::new("t2", 4, 4, (2, 2), up, 2, &mut init).unwrap();
        let (y, p3) = t1.apply(&g, y).unwrap();
        let (y, p4) = t2.apply(&g, g.relu(y).unwrap()).unwrap();
        assert_eq!(g.shape(y).dims(), &[2, 4, 27, 27]);
        let y = g.cast(y, DType::F32).unwrap();
        let loss = g.mean_all(g.mul(y, y).unwrap()).unwrap();
        let params: Vec<NodeId> = [p1, p2, p3, p4].concat();
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &params).unwrap());
        (g, outs)
    };
    let f = vec![("x".to_string(), rand(&[2, 6, 7, 7], 12))];
    let (g32, o32) = net(DType::F32);
    let (g16, o16) = net(DType::F16);
    let run =
        |g: &Graph, o: &[NodeId]| Device::cpu().compile(g, o).unwrap().run(&refs(&f)).unwrap();
    let (want, cpu16) = (run(&g32, &o32), run(&g16, &o16));
    for (k, (a, b)) in cpu16.iter().zip(&want).enumerate() {
        assert_close(
            &format!("f16 depthwise block vs f32, output {k}"),
            a,
            b,
            5e-3,
            3e-2,
        );
    }
    let Some(dev) = device(true) else { return };
    check(
        &dev,
        "mixed-precision depthwise block",
        &g16,
        &o16,
        &f,
        (1e-3, 2e-2),
    );
    check(
        &dev,
        "f32 depthwise block",
        &g32,
        &o32,
        &f,
        kiln::ops::TOL_REDUCTION,
    );
}

/// Ops without f16 kernels refuse f16 inputs at build time, naming the op and the type; mixed
/// operand types are refused; the CPU backend runs f16 graphs too.
#[test]
fn f16_errors_name_the_op() {
    let g = Graph::new();
    let x = g.input_as("x", [2, 3], DType::F16);
    let y = g.input("y", [2, 3]);
    let labels = g.input("labels", [2]);
    // labels are f32 (f16 logits are fine)
    let labels16 = g.input_as("labels16", [2], DType::F16);
    let e = g.cross_entropy(x, labels16).unwrap_err().to_string();
    assert!(
        e.contains("cross_entropy") && e.contains("f16") && e.contains("cast"),
        "{e}"
    );
    let e = g.add(x, y).unwrap_err().to_string();
    assert!(
        e.contains("add") && e.contains("f16") && e.contains("f32"),
        "{e}"
    );
    // a convolution's operands must agree
    let img = g.input_as("img", [1, 1, 4, 4], DType::F16);
    let w = g.input("w", [1, 1, 3, 3]);
    assert!(g.conv2d(img, w, None, Default::default()).is_err());
    // embedding indices are f32 (an f16 table is fine)
    let table = g.input_as("table", [5, 3], DType::F16);
    let e = g.embedding(labels16, table).unwrap_err().to_string();
    assert!(e.contains("embedding") && e.contains("f16"), "{e}");
    assert_eq!(g.dtype(g.embedding(labels, table).unwrap()), DType::F16);
    // MSE and BCE cast an f16 operand to f32 themselves
    assert_eq!(g.dtype(g.mse_loss(x, y).unwrap()), DType::F32);
    assert_eq!(g.dtype(g.bce_with_logits(x, y).unwrap()), DType::F32);
    // f16 logits, f32 labels: an f32 loss
    let loss = g.cross_entropy(x, labels).unwrap();
    assert_eq!(g.dtype(loss), DType::F32);
    let out = Device::cpu()
        .compile(&g, &[loss])
        .unwrap()
        .run(&[
            ("x", &rand(&[2, 3], 1)),
            ("labels", &Tensor::new([2], vec![0.0, 2.0]).unwrap()),
        ])
        .unwrap();
    assert_eq!(out[0].numel(), 1);
}

/// Softmax and log-softmax (any axis), dropout (its seed f32) and narrow / pad / concat on f16
/// tensors, forward and backward, against the CPU reference.
#[test]
fn softmax_dropout_and_axis_copies_in_f16() {
    let Some(dev) = device(true) else { return };
    let g = Graph::new();
    let x = g.input_as("x", [3, 37, 5], DType::F16);
    let z = g.input_as("z", [3, 4, 5], DType::F16);
    let seed = g.input("seed", [1]);
    let sm = g.softmax(x, 1).unwrap();
    let lsm = g.log_softmax(x, -1).unwrap();
    let dropped = g.dropout(x, 0.3, seed, 7).unwrap();
    let cut = g.narrow(x, 1, 3, 11).unwrap();
    let joined = g.concat(&[cut, z], 1).unwrap();
    let outs = [sm, lsm, dropped, cut, joined];
    for &o in &outs {
        assert_eq!(g.dtype(o), DType::F16);
    }
    let r = g.constant(Tensor::rand_uniform([3, 37, 5], -1.0, 1.0, 3));
    let r = g.cast(r, DType::F16).unwrap();
    let loss = [sm, lsm, dropped]
        .iter()
        .map(|&o| g.sum_all(g.mul(o, r).unwrap()).unwrap())
        .chain([g.sum_all(g.square(joined).unwrap()).unwrap()])
        .reduce(|a, b| g.add(a, b).unwrap())
        .unwrap();
    let grads = g.grad(loss, &[x, z]).unwrap();
    let mut all: Vec<NodeId> = outs.to_vec();
    all.extend(&grads);
    let f = vec![
        (
            "x".to_string(),
            Tensor::rand_uniform([3, 37, 5], -3.0, 3.0, 1),
        ),
        ("z".to_string(), rand(&[3, 4, 5], 2)),
        ("seed".to_string(), Tensor::new([1], vec![1234.0]).unwrap()),
    ];
    check(
        &dev,
        "softmax, dropout, axis copies",
        &g,
        &all,
        &f,
        (2e-3, 2e-2),
    );
}

/// An f16 embedding table: the lookup gives f16 rows (a NaN row for a bad index), and its
/// gradient, summed in f32 over repeated indices, is f16; against the CPU reference, through a
/// cast from an f32 table as mixed-precision models hold it.
#[test]
fn embedding_in_f16() {
    let Some(dev) = device(true) else { return };
    let g = Graph::new();
    let idx = g.input("idx", [2, 9]);
    let table = g.input("table", [13, 7]);
    let rows = g
        .embedding(idx, g.cast(table, DType::F16).unwrap())
        .unwrap();
    assert_eq!(g.dtype(rows), DType::F16);
    let r = g.cast(
        g.constant(Tensor::rand_uniform([2, 9, 7], -1.0, 1.0, 4)),
        DType::F16,
    );
    let loss = g.sum_all(g.mul(rows, r.unwrap()).unwrap()).unwrap();
    let grads = g.grad(loss, &[table]).unwrap();
    assert_eq!(g.dtype(grads[0]), DType::F32, "back through the cast");
    let mut all = vec![rows, loss];
    all.extend(&grads);
    // repeated indices (3 and 12 several times), the last row, index 0
    let picks = [3.0, 12.0, 0.0, 3.0, 5.0, 12.0, 3.0, 7.0, 1.0];
    let f = vec![
        (
            "idx".to_string(),
            Tensor::new(
                [2, 9],
                picks.iter().chain(picks.iter().rev()).copied().collect(),
            )
            .unwrap(),
        ),
        ("table".to_string(), rand(&[13, 7], 5)),
    ];
    check(&dev, "f16 embedding", &g, &all, &f, (2e-3, 2e-2));
    // a bad index gives a NaN row in f16 too
    let bad = vec![
        (
            "idx".to_string(),
            Tensor::new([2, 9], vec![13.0; 18]).unwrap(),
        ),
        ("table".to_string(), rand(&[13, 7], 5)),
    ];
    let out = dev.compile(&g, &[rows]).unwrap().run(&refs(&bad)).unwrap();
    assert!(out[0].data().iter().all(|v| v.is_nan()));
}

/// Recurrent layers on f16 inputs (`nn::Recurrent` casts its f32 parameters and states, as
/// `Linear` does): LSTM, GRU and RNN, bidirectional, with lengths, on the whole-sequence
/// kernels and (H beyond the adapter's `sequence_limit`) the per-step ones; outputs and
/// parameter gradients against the CPU
/// reference (which rounds each f16 node the same way) within f16 precision.
#[test]
fn recurrent_layers_in_f16() {
    use kiln::nn::{Init, Recurrent};
    let Some(dev) = device(true) else { return };
    let beyond = common::sequence_limit() + 4;
    for &(t, b, i, h, bidir) in &[(5, 3, 4, 6, true), (3, 2, 3, beyond, false)] {
        for cell in ["lstm", "gru", "rnn"] {
            let g = Graph::new();
            let x = g.input("x", [t, b, i]);
            let len = g.input("len", [b]);
            let mut init = Init::new(21);
            // parameters live on the device by name: one name per cell and size
            let name = format!("{cell}{h}");
            let layer = match cell {
                "lstm" => Recurrent::new(&name, i, h, 1, bidir, &mut init),
                "gru" => Recurrent::gru(&name, i, h, 1, bidir, &mut init),
                _ => Recurrent::rnn(&name, i, h, 1, bidir, &mut init),
            };
            let out = layer
                .apply(&g, g.cast(x, DType::F16).unwrap(), None, Some(len))
                .unwrap();
            assert_eq!(g.dtype(out.output), DType::F16, "{cell}: follows its input");
            let r = g.constant(Tensor::rand_uniform(
                g.shape(out.output).dims().to_vec(),
                -1.0,
                1.0,
                8,
            ));
            let y = g.cast(out.output, DType::F32).unwrap();
            let loss = g
                .add(
                    g.sum_all(g.mul(y, r).unwrap()).unwrap(),
                    g.sum_all(g.cast(out.h_n, DType::F32).unwrap()).unwrap(),
                )
                .unwrap();
            let mut all = vec![out.output, out.h_n, loss];
            all.extend(g.grad(loss, &out.params).unwrap());
            let lengths: Vec<f32> = (0..b).map(|k| [t, 1, t - 1][k % 3] as f32).collect();
            let f = vec![
                ("x".to_string(), rand(&[t, b, i], 22)),
                ("len".to_string(), Tensor::new([b], lengths).unwrap()),
            ];
            let plan = common::check_plan(
                &dev,
                &format!("f16 {cell} T={t} B={b} H={h}"),
                &g,
                &all,
                &f,
                (3e-3, 3e-2),
            );
            // the parameters are read as the f32 tensors they are, rounded on load: the biases
            // by the input projection's epilogue (`fuse::fold_casts`) or the recurrence's
            // kernels (the GRU's and RNN's b_hh), the recurrent weight by those kernels and
            // its transpose (`Op::rounded_f16_inputs`): no cast kernel of theirs
            let gates = g.shape(out.params[2]).numel();
            let kernels = plan.kernels();
            for cast in [
                format!("cast [{gates}] f16"),
                format!("cast [{gates}, {h}] f16"),
            ] {
                assert!(
                    !kernels.iter().any(|k| k.contains(&cast)),
                    "{cell}: {kernels:#?}"
                );
            }
        }
    }
}

/// Mixed-precision training: `Linear` layers follow their input's type (f32 parameters cast to
/// f16 in the graph), the loss is taken in f32, and a training step (one plan, SGD) lowers the
/// loss on the GPU as on the CPU reference, step for step within f16 precision.
#[test]
fn mixed_precision_training_steps() {
    use kiln::nn::{Init, Linear, Optimizer, TrainStep};
    let train = |dev: &Device| -> Vec<f32> {
        let g = Graph::new();
        let x = g.input("x", [32, 8]);
        let t = g.input("t", [32, 4]);
        let mut init = Init::new(3);
        let fc1 = Linear::new("fc1", 8, 16, &mut init);
        let fc2 = Linear::new("fc2", 16, 4, &mut init);
        let (h, p1) = fc1.apply_relu(&g, g.cast(x, DType::F16).unwrap()).unwrap();
        assert_eq!(g.dtype(h), DType::F16, "the layer follows its input");
        let (y, p2) = fc2.apply(&g, h).unwrap();
        // an f16 prediction against an f32 target: the loss casts it (autocast's f32 losses)
        let loss = g.mse_loss(y, t).unwrap();
        assert_eq!(g.dtype(loss), DType::F32);
        let params: Vec<NodeId> = p1.iter().chain(&p2).copied().collect();
        // clipping far above the gradients' norm: the same steps, plus the norm's kernel
        let opt = Optimizer::sgd(0.2).clip_grad_norm(1e3);
        let mut step = TrainStep::new(dev, &g, loss, &params, opt, 0).unwrap();
        // a fixed target map: t = tanh(x A)
        let xv = rand(&[32, 8], 71);
        let a = rand(&[8, 4], 72);
        let tv = Tensor::new(
            [32, 4],
            (0..32 * 4)
                .map(|e| {
                    let (i, j) = (e / 4, e % 4);
                    let s: f32 = (0..8)
                        .map(|k| xv.data()[i * 8 + k] * a.data()[k * 4 + j])
                        .sum();
                    s.tanh()
                })
                .collect(),
        )
        .unwrap();
        let losses = (0..30)
            .map(|_| {
                step.step(&[("x", &xv), ("t", &tv)], true)
                    .unwrap()
                    .expect("the loss was asked for")
            })
            .collect();
        if dev
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        {
            // what is left of the casts: the prediction to f32 and its gradient back to f16
            // (the bias gradient's sum reads it). The products read x, the parameters and that
            // gradient in f32 and round on load; the parameter gradients' casts back to f32
            // fold into the (multi-tensor) update and the clipping norm's sum of squares,
            // which read them as f16.
            step.plan_mut().set_profiling(true).unwrap();
            step.step(&[("x", &xv), ("t", &tv)], false).unwrap();
            let labels: Vec<String> = step
                .plan_mut()
                .profile()
                .iter()
                .map(|t| t.label.clone())
                .collect();
            let casts = labels.iter().filter(|l| l.contains(" cast ")).count();
            assert_eq!(casts, 2, "{labels:#?}");
            assert!(labels.iter().any(|l| l.contains("a32")), "{labels:#?}");
            assert!(
                labels.iter().any(|l| l.contains("sgd_group")),
                "{labels:#?}"
            );
            assert!(
                labels.iter().any(|l| l.contains("sum_squares")),
                "{labels:#?}"
            );
        }
        losses
    };
    let want = train(&Device::cpu());
    assert!(
        want[29] < 0.6 * want[0],
        "the loss goes down: {} -> {}",
        want[0],
        want[29]
    );
    let Some(dev) = device(true) else { return };
    let got = train(&dev);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 + 2e-2 * b.abs(),
            "step {k}: loss {a} on the GPU, {b} on the CPU"
        );
    }
}

/// Where an f16 result of a hand-written kernel is read only by its cast to f32 (a layer norm's
/// input gradient flowing back to f32 embeddings, a softmax's), the kernel stores it as f32,
/// rounded to f16 first (`exec::lower::casts_into_producers`): no cast kernel, values exactly
/// the cast's (compared exactly, so a missed rounding would show). A result also read in f16
/// keeps its cast.
#[test]
fn casts_to_f32_fold_into_their_producers() {
    let Some(dev) = device(true) else { return };
    let exact = (0.0, 1e-7);
    let g = Graph::new();
    let x = g.input("x", [6, 16]);
    let w = g.input("w", [6, 16]);
    let x16 = g.cast(x, DType::F16).unwrap();
    let y = g.layer_norm(x16, 1, None, 1e-5).unwrap();
    let loss = g
        .sum_all(g.mul(g.cast(y, DType::F32).unwrap(), w).unwrap())
        .unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    // a residual connection around an affine norm (f32 parameters): its gradient added inside
    // the norm's backward
    let affine = (g.input("gamma", [16]), g.input("beta", [16]));
    let h = g
        .add(x16, g.layer_norm(x16, 1, Some(affine), 1e-5).unwrap())
        .unwrap();
    let loss2 = g
        .sum_all(g.mul(g.cast(h, DType::F32).unwrap(), w).unwrap())
        .unwrap();
    let dx2 = g.grad(loss2, &[x]).unwrap()[0];
    let s = g.softmax(x16, -1).unwrap();
    let s32 = g.cast(s, DType::F32).unwrap();
    let f = vec![
        ("x".to_string(), rand(&[6, 16], 95)),
        ("w".to_string(), rand(&[6, 16], 96)),
        ("gamma".to_string(), rand(&[16], 97)),
        ("beta".to_string(), rand(&[16], 98)),
    ];
    // (x's own cast to f16 stays: several kernels read it)
    // (the residual's gradient is added before the one rounding, not after a first: f16
    // tolerance there)
    for (what, outs, producer, tol) in [
        ("layer norm gradient", vec![dx], "normalize_backward", exact),
        ("with a residual", vec![dx2], "normalize_backward", TOL_F16),
        ("softmax", vec![s32], "softmax", exact),
    ] {
        let plan = common::check_plan(&dev, what, &g, &outs, &f, tol);
        let kernels = plan.kernels();
        assert_eq!(
            common::count_op(&kernels, "cast"),
            1,
            "{what}: {kernels:#?}"
        );
        let f32out = |k: &&str| k.contains(producer) && k.contains("f32out");
        assert!(kernels.iter().any(f32out), "{what}: {kernels:#?}");
    }
    let plan = common::check_plan(&dev, "also f16", &g, &[s32, s], &f, exact);
    assert_eq!(
        common::count_op(&plan.kernels(), "cast"),
        2,
        "{:#?}",
        plan.kernels()
    );
    // a transpose and a broadcast of an f16 input read only by casts to f32: their copies read
    // f16 and store f32 (a copy that read the f16 input as f32 was found by
    // tests/random_graphs.rs)
    for (rows, cols) in [(1usize, 1usize), (5, 3)] {
        let g = Graph::new();
        let x = g.input_as("x", [rows, cols], DType::F16);
        let t = g.cast(g.transpose(x, 0, 1).unwrap(), DType::F32).unwrap();
        let e = g
            .expand(x, &kiln::Shape::from(vec![2, rows, cols]))
            .unwrap();
        let e = g.cast(e, DType::F32).unwrap();
        let f = vec![("x".to_string(), rand(&[rows, cols], 99))];
        let plan = common::check_plan(&dev, "transpose, expand", &g, &[t, e], &f, exact);
        let kernels = plan.kernels();
        assert_eq!(common::count_op(&kernels, "cast"), 0, "{kernels:#?}");
    }
}

/// An f16 layer norm in training whose result products alone read (a pre-norm block's
/// projection and its weight gradient) computes its statistics itself and keeps them, in f32,
/// past its result, which it then stores as f32 (rounded to f16 first; the products round it
/// on load): no statistics kernel. Values and gradients as the CPU reference's; a result an
/// elementwise op reads too keeps the statistics' kernel.
#[test]
fn f16_layer_norm_statistics_inside_in_training() {
    let Some(dev) = device(true) else { return };
    let g = Graph::new();
    let x = g.input("x", [12, 32]);
    let w = g.input_as("w", [32, 24], DType::F16);
    let affine = (g.input("gamma", [32]), g.input("beta", [32]));
    let r = g.input("r", [12, 24]);
    let x16 = g.cast(x, DType::F16).unwrap();
    let y = g.layer_norm(x16, 1, Some(affine), 1e-5).unwrap();
    let head = |y: NodeId| {
        let p = g.cast(g.matmul(y, w).unwrap(), DType::F32).unwrap();
        g.sum_all(g.mul(p, r).unwrap()).unwrap()
    };
    let f = vec![
        ("x".to_string(), rand(&[12, 32], 101)),
        ("w".to_string(), rand(&[32, 24], 102)),
        ("gamma".to_string(), rand(&[32], 103)),
        ("beta".to_string(), rand(&[32], 104)),
        ("r".to_string(), rand(&[12, 24], 105)),
    ];
    let loss = head(y);
    // the same block with the norm's result also through a relu beside the product
    let loss2 = g
        .add(
            loss,
            g.sum_all(g.cast(g.relu(y).unwrap(), DType::F32).unwrap())
                .unwrap(),
        )
        .unwrap();
    for (what, loss, stats) in [("products alone", loss, 0), ("a relu too", loss2, 1)] {
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &[x, affine.0, affine.1]).unwrap());
        let dw = g.grad(loss, &[w]).unwrap()[0];
        outs.push(g.cast(dw, DType::F32).unwrap());
        let plan = common::check_plan(&dev, what, &g, &outs, &f, (3e-3, 3e-2));
        let kernels = plan.kernels();
        assert_eq!(
            common::count_op(&kernels, "group_stats"),
            stats,
            "{what}: {kernels:#?}"
        );
        let wide = kernels
            .iter()
            .any(|k| k.contains("normalize [") && k.contains("f32out"));
        assert_eq!(wide, stats == 0, "{what}: {kernels:#?}");
    }
}

/// An f16 classifier's small cross-entropy computes its gradient in the loss's kernel, stored in
/// f32 past the loss, where products alone read that gradient (they round it to f16 on load):
/// no backward kernel, values as the CPU reference's (which stores the gradient in f16). A
/// gradient also requested keeps its own f16 kernel.
#[test]
fn f16_classifier_gradients_come_with_the_loss() {
    let Some(dev) = device(true) else { return };
    let g = Graph::new();
    let h = g.input_as("h", [13, 8], DType::F16);
    let w = g.input_as("w", [8, 37], DType::F16);
    let y = g.input("y", [13]);
    let logits = g.matmul(h, w).unwrap();
    let loss = g.cross_entropy(logits, y).unwrap();
    let grads = g.grad(loss, &[h, w, logits]).unwrap();
    let f32s: Vec<NodeId> = grads
        .iter()
        .map(|&d| g.cast(d, DType::F32).unwrap())
        .collect();
    let labels: Vec<f32> = (0..13).map(|i| ((i * 7) % 37) as f32).collect();
    let f = vec![
        ("h".to_string(), rand(&[13, 8], 91)),
        ("w".to_string(), rand(&[8, 37], 92)),
        ("y".to_string(), Tensor::new([13], labels).unwrap()),
    ];
    for (what, outs, backward) in [
        ("products alone", vec![loss, f32s[0], f32s[1]], 0),
        (
            "gradient requested",
            vec![loss, f32s[0], f32s[1], f32s[2]],
            1,
        ),
    ] {
        let plan = common::check_plan(&dev, what, &g, &outs, &f, TOL_F16);
        let kernels = plan.kernels();
        assert_eq!(
            common::count_op(&kernels, "cross_entropy_backward"),
            backward,
            "{what}: {kernels:#?}"
        );
    }
}

/// A mixed-precision LSTM classifier (f16 layer and head, f32 loss; Adam with clipping) trains
/// step for step as on the CPU reference, with no cast kernel: the biases are rounded on load
/// by the input projection's epilogue, the recurrent weight by the recurrence's kernels and its
/// transpose, and the biases' shared f16 gradient is read by the update itself.
#[test]
fn mixed_precision_lstm_training_steps() {
    use kiln::nn::{Init, Linear, Lstm, Optimizer, TrainStep};
    let (t, b, i, h) = (5, 12, 3, 6);
    let train = |dev: &Device| -> (Vec<f32>, Vec<String>) {
        let mut init = Init::new(5);
        let lstm = Lstm::new("lstm", i, h, 1, false, &mut init);
        // (ten classes, more rows than the skinny-product kernel takes: the head's weight
        // gradient runs on the tiled kernel, which sums the bias gradient as it goes)
        let head = Linear::new("head", h, 10, &mut init);
        let g = Graph::new();
        let x = g.input("x", [t, b, i]);
        let y = g.input("y", [b]);
        let out = lstm
            .apply(&g, g.cast(x, DType::F16).unwrap(), None, None)
            .unwrap();
        let hn = g.reshape(out.h_n, &[b as isize, h as isize]).unwrap();
        let (logits, hp) = head.apply(&g, hn).unwrap();
        let loss = g.cross_entropy(logits, y).unwrap();
        let mut params = out.params.clone();
        params.extend(hp);
        let opt = Optimizer::adam(0.05).clip_grad_norm(1.0);
        let mut step = TrainStep::new(dev, &g, loss, &params, opt, 0).unwrap();
        let xs = rand(&[t, b, i], 81);
        let ys = Tensor::new([b], (0..b).map(|k| (k % 10) as f32).collect()).unwrap();
        let losses = (0..8)
            .map(|_| {
                step.step(&[("x", &xs), ("y", &ys)], true)
                    .unwrap()
                    .expect("the loss was asked for")
            })
            .collect();
        let kernels = step
            .plan_mut()
            .kernels()
            .iter()
            .map(|k| k.to_string())
            .collect();
        (losses, kernels)
    };
    let (want, _) = train(&Device::cpu());
    assert!(want[7] < want[0], "the loss goes down: {want:?}");
    let Some(dev) = device(true) else { return };
    let (got, kernels) = train(&dev);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 2e-3 + 2e-2 * b.abs(),
            "step {k}: loss {a} on the GPU, {b} on the CPU"
        );
    }
    assert!(
        !kernels.iter().any(|k| k.contains(" cast ")),
        "{kernels:#?}"
    );
    // the loss's kernel computes its gradient (f32, rounded by the products that read it)
    assert_eq!(
        common::count_op(&kernels, "cross_entropy_backward"),
        0,
        "{kernels:#?}"
    );
    let transpose = format!("fused [{h}, {}] f16", 4 * h);
    assert!(
        kernels.iter().any(|k| k.contains(&transpose)),
        "{kernels:#?}"
    );
}

/// The gradient of a cast is the gradient cast back (straight through the rounding): checked
/// against central differences on values and steps f16 holds exactly (multiples of 1/64 below
/// 2), where rounding changes nothing, on the CPU reference; the GPU gives the same gradient.
#[test]
fn cast_gradients_match_central_differences() {
    let g = Graph::new();
    let x = g.input("x", [7]);
    let r = g.constant(Tensor::new([7], vec![0.5, -1.25, 2.0, 0.75, -0.5, 1.5, -2.0]).unwrap());
    let y = g.cast(g.cast(x, DType::F16).unwrap(), DType::F32).unwrap();
    let loss = g.sum_all(g.mul(g.square(y).unwrap(), r).unwrap()).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    assert_eq!(g.dtype(dx), DType::F32);
    let xs: Vec<f32> = (0..7).map(|i| (i as f32 - 3.0) * 9.0 / 64.0).collect();
    let xv = Tensor::new([7], xs.clone()).unwrap();
    let cpu = Device::cpu();
    let analytic = cpu.compile(&g, &[dx]).unwrap().run(&[("x", &xv)]).unwrap();
    let mut loss_plan = cpu.compile(&g, &[loss]).unwrap();
    let h = 1.0 / 64.0;
    for i in 0..7 {
        let mut eval = |d: f32| {
            let mut t = xs.clone();
            t[i] += d;
            let t = Tensor::new([7], t).unwrap();
            loss_plan.run(&[("x", &t)]).unwrap()[0].data()[0] as f64
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
        let an = analytic[0].data()[i] as f64;
        assert!(
            (fd - an).abs() <= 1e-4 + 1e-4 * fd.abs(),
            "x[{i}]: {an} vs {fd}"
        );
    }
    let Some(dev) = device(true) else { return };
    let got = dev.compile(&g, &[dx]).unwrap().run(&[("x", &xv)]).unwrap();
    assert_close("cast gradient", &got[0], &analytic[0], 1e-6, 1e-5);
}
