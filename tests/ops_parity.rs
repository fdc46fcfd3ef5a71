//! GPU equals the CPU reference for every op, on random and awkward shapes (1, primes,
//! non-multiples of the 64x64 matmul tile and of the 256-thread elementwise workgroup), with every
//! GPU buffer poisoned with NaN before the run.

mod common;

use common::{check_gpu_vs_cpu, rand};
use kiln::ops::{TOL_ELEMENTWISE, TOL_REDUCTION};
use kiln::{Device, Graph, NodeId, Tensor};

#[test]
fn matmul_plain_and_awkward_shapes() {
    // (M, K, N): unit sizes, primes, tile-size neighbours, a skinny and a wide case
    for &(m, k, n) in &[
        (1, 1, 1),
        (1, 7, 1),
        (3, 5, 7),
        (13, 17, 19),
        (64, 64, 64),
        (65, 63, 67),
        (128, 3, 1),
        (2, 200, 129),
    ] {
        let g = Graph::new();
        let a = g.input("a", [m, k]);
        let b = g.input("b", [k, n]);
        let y = g.matmul(a, b).unwrap();
        let (ta, tb) = (rand(&[m, k], 1), rand(&[k, n], 2));
        check_gpu_vs_cpu(
            &format!("matmul {m}x{k}x{n}"),
            &g,
            &[y],
            &[("a", &ta), ("b", &tb)],
            TOL_REDUCTION,
        );
    }
}

#[test]
fn matmul_transposed_operands() {
    for &(ta_flag, tb_flag) in &[(true, false), (false, true), (true, true)] {
        let (m, k, n) = (37, 23, 71);
        let sa = if ta_flag { [k, m] } else { [m, k] };
        let sb = if tb_flag { [n, k] } else { [k, n] };
        let g = Graph::new();
        let a = g.input("a", sa);
        let b = g.input("b", sb);
        let y = g.matmul_t(a, b, ta_flag, tb_flag).unwrap();
        assert_eq!(g.shape(y).dims(), &[m, n]);
        let (xa, xb) = (rand(&sa, 3), rand(&sb, 4));
        check_gpu_vs_cpu(
            &format!("matmul ta={ta_flag} tb={tb_flag}"),
            &g,
            &[y],
            &[("a", &xa), ("b", &xb)],
            TOL_REDUCTION,
        );
    }
}

#[test]
fn matmul_batched_and_broadcast() {
    let cases: &[(&[usize], &[usize], bool, bool)] = &[
        (&[3, 5, 7], &[3, 7, 2], false, false),       // same batch
        (&[4, 9, 6], &[6, 5], false, false),          // weight broadcast over the batch
        (&[2, 1, 5, 3], &[1, 3, 3, 4], false, false), // both broadcast
        (&[2, 3, 6, 5], &[2, 3, 4, 6], true, true),
        (&[5, 8], &[3, 8, 2], false, false), // the matrix broadcast on the left
    ];
    for (i, &(sa, sb, ta, tb)) in cases.iter().enumerate() {
        let g = Graph::new();
        let a = g.input("a", sa);
        let b = g.input("b", sb);
        let y = g.matmul_t(a, b, ta, tb).unwrap();
        let (xa, xb) = (rand(sa, 10 + i as u64), rand(sb, 20 + i as u64));
        check_gpu_vs_cpu(
            &format!("batched matmul {sa:?} x {sb:?}"),
            &g,
            &[y],
            &[("a", &xa), ("b", &xb)],
            TOL_REDUCTION,
        );
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: &[(&[usize], &[usize])] = &[
        (&[1], &[1]),
        (&[257], &[257]),
        (&[7, 13], &[13]),
        (&[7, 1], &[1, 13]),
        (&[2, 3, 5, 7], &[3, 1, 7]),
        (&[1], &[4, 3]),
        (&[2, 1, 3, 1, 5, 1], &[1, 2, 1, 4, 1, 3]),
    ];
    for (i, &(sa, sb)) in shapes.iter().enumerate() {
        let g = Graph::new();
        let a = g.input("a", sa);
        let b = g.input("b", sb);
        let outs = vec![
            g.add(a, b).unwrap(),
            g.sub(a, b).unwrap(),
            g.mul(a, b).unwrap(),
            g.maximum(a, b).unwrap(),
            g.minimum(a, b).unwrap(),
        ];
        let xa = rand(sa, 30 + i as u64);
        let xb = rand(sb, 40 + i as u64);
        check_gpu_vs_cpu(
            &format!("binary {sa:?} {sb:?}"),
            &g,
            &outs,
            &[("a", &xa), ("b", &xb)],
            TOL_ELEMENTWISE,
        );
        // division away from zero
        let g = Graph::new();
        let a = g.input("a", sa);
        let b = g.input("b", sb);
        let d = g.div(a, b).unwrap();
        let xb = Tensor::rand_uniform(sb.to_vec(), 0.5, 2.0, 50 + i as u64);
        check_gpu_vs_cpu(
            &format!("div {sa:?} {sb:?}"),
            &g,
            &[d],
            &[("a", &xa), ("b", &xb)],
            TOL_ELEMENTWISE,
        );
    }
}

#[test]
fn unary_and_scalar_ops() {
    for &shape in &[&[1usize][..], &[255], &[3, 257], &[2, 3, 5, 7]] {
        let n: usize = shape.iter().product();
        let g = Graph::new();
        let x = g.input("x", shape);
        let p = g.input("p", shape); // positive, for log / sqrt / pow
        let outs = vec![
            g.neg(x).unwrap(),
            g.exp(x).unwrap(),
            g.relu(x).unwrap(),
            g.sigmoid(x).unwrap(),
            g.tanh(x).unwrap(),
            g.gelu(x).unwrap(),
            g.abs(x).unwrap(),
            g.square(x).unwrap(),
            g.sign(x).unwrap(),
            g.softplus(x).unwrap(),
            g.silu(x).unwrap(),
            g.add_scalar(x, 0.5).unwrap(),
            g.mul_scalar(x, -3.0).unwrap(),
            g.rsub_scalar(x, 1.0).unwrap(),
            g.div_scalar(x, 7.0).unwrap(),
            g.log(p).unwrap(),
            g.sqrt(p).unwrap(),
            g.rdiv_scalar(p, 2.0).unwrap(),
            g.pow_scalar(p, 1.5).unwrap(),
            g.leaky_relu(x, 0.01).unwrap(),
            g.leaky_relu(x, -1.5).unwrap(),
            g.elu(x, 1.0).unwrap(),
            g.selu(x).unwrap(),
            g.clamp(x, -2.0, 3.5).unwrap(),
            g.clamp(x, 1.0, -1.0).unwrap(),
            g.relu6(g.mul_scalar(x, 1.5).unwrap()).unwrap(),
            g.hardsigmoid(x).unwrap(),
            g.hardswish(x).unwrap(),
            g.mish(x).unwrap(),
            g.gelu_tanh(x).unwrap(),
            g.log_sigmoid(x).unwrap(),
            g.softsign(x).unwrap(),
            g.sin(x).unwrap(),
            g.cos(x).unwrap(),
            g.erf(x).unwrap(),
            g.expm1(x).unwrap(),
            g.floor(x).unwrap(),
            g.ceil(x).unwrap(),
            g.round(x).unwrap(),
            g.trunc(x).unwrap(),
            g.rsqrt(p).unwrap(),
            g.reciprocal(p).unwrap(),
            // log1p over (-0.98, 9)
            g.log1p(g.add_scalar(p, -0.99).unwrap()).unwrap(),
        ];
        // values over a wide range, including large magnitudes for the saturating functions
        let xs = Tensor::rand_uniform(shape.to_vec(), -6.0, 6.0, n as u64);
        let ps = Tensor::rand_uniform(shape.to_vec(), 0.01, 10.0, n as u64 + 1);
        check_gpu_vs_cpu(
            &format!("unary {shape:?}"),
            &g,
            &outs,
            &[("x", &xs), ("p", &ps)],
            TOL_ELEMENTWISE,
        );
    }
}

/// torch's values, worked by hand from its formulas (`F.elu(torch.tensor(-1e-6))` and so on),
/// on both backends, and the gradients at the kinks, where torch picks a side.
#[test]
fn activations_match_torch() {
    let g = Graph::new();
    let x = g.input("x", [8]);
    let xs = Tensor::new([8], vec![-1e-6, -1.0, 1.0, -3.0, 3.0, 0.0, 6.0, -2.0]).unwrap();
    let at = |v: f32| xs.data().iter().position(|&e| e == v).unwrap();
    // (name, node, [(input, torch's value)])
    type Case<'a> = (&'a str, NodeId, Vec<(f32, f32)>);
    let cases: Vec<Case> = vec![
        // expm1 keeps tiny negative inputs exact, where exp(x) - 1 would be 5% off
        (
            "elu",
            g.elu(x, 1.0).unwrap(),
            vec![(-1e-6, -9.999_995e-7), (-1.0, -0.632_120_6)],
        ),
        (
            "selu",
            g.selu(x).unwrap(),
            vec![(-1.0, -1.111_330_7), (1.0, 1.050_701)],
        ),
        (
            "mish",
            g.mish(x).unwrap(),
            vec![(1.0, 0.865_098_4), (-1.0, -0.303_401_7)],
        ),
        (
            "hardswish",
            g.hardswish(x).unwrap(),
            vec![(1.0, 0.666_666_7), (-3.0, 0.0), (3.0, 3.0)],
        ),
        (
            "hardsigmoid",
            g.hardsigmoid(x).unwrap(),
            vec![(1.0, 0.666_666_7), (-1.0, 0.333_333_34)],
        ),
        (
            "leaky_relu",
            g.leaky_relu(x, 0.2).unwrap(),
            vec![(-2.0, -0.4), (1.0, 1.0)],
        ),
        (
            "relu6",
            g.relu6(x).unwrap(),
            vec![(6.0, 6.0), (-1.0, 0.0), (3.0, 3.0)],
        ),
    ];
    // gradients of the sum: at a kink, torch's side (clamp passes its bounds, hardtanh and
    // relu6 do not, hardswish at -3 takes the middle piece, ELU and leaky relu at 0 the left)
    let grad = |y: NodeId| g.grad(g.sum_all(y).unwrap(), &[x]).unwrap()[0];
    let grads: Vec<Case> = vec![
        (
            "clamp",
            grad(g.clamp(x, -1.0, 3.0).unwrap()),
            vec![(-1.0, 1.0), (3.0, 1.0), (-2.0, 0.0)],
        ),
        (
            "hardtanh",
            grad(g.hardtanh(x, -1.0, 3.0).unwrap()),
            vec![(-1.0, 0.0), (3.0, 0.0), (1.0, 1.0)],
        ),
        (
            "relu6",
            grad(g.relu6(x).unwrap()),
            vec![(0.0, 0.0), (6.0, 0.0), (3.0, 1.0)],
        ),
        (
            "hardswish",
            grad(g.hardswish(x).unwrap()),
            vec![(-3.0, -0.5), (3.0, 1.5), (1.0, 5.0 / 6.0)],
        ),
        (
            "hardsigmoid",
            grad(g.hardsigmoid(x).unwrap()),
            vec![(-3.0, 0.0), (3.0, 0.0), (1.0, 1.0 / 6.0)],
        ),
        (
            "elu",
            grad(g.elu(x, 0.5).unwrap()),
            vec![(0.0, 0.5), (1.0, 1.0), (-1.0, 0.183_939_72)],
        ),
        (
            "leaky_relu",
            grad(g.leaky_relu(x, 0.2).unwrap()),
            vec![(0.0, 0.2), (1.0, 1.0)],
        ),
        (
            "mish",
            grad(g.mish(x).unwrap()),
            vec![(1.0, 1.049_036_3), (0.0, 0.6)],
        ),
    ];
    let all: Vec<_> = cases.iter().chain(&grads).collect();
    let outs: Vec<NodeId> = all.iter().map(|c| c.1).collect();
    let mut devices = vec![("cpu", Device::cpu())];
    devices.extend(common::gpu().map(|d| ("gpu", d)));
    for (where_, dev) in devices {
        let got = dev.compile(&g, &outs).unwrap().run(&[("x", &xs)]).unwrap();
        for ((name, _, want), t) in all.iter().zip(&got) {
            for &(v, w) in want {
                let y = t.data()[at(v)];
                assert!(
                    // relative, so that the tiny ELU value counts
                    (y - w).abs() <= 1e-5 * w.abs().max(1e-3),
                    "{name}({v}) on the {where_}: {y}, torch {w}"
                );
            }
        }
    }
}

/// torch's values for the math functions where they differ from the naive formula (`log1p` and
/// `expm1` near 0, `log_sigmoid` far out) or pick a side (`round` to even, `floor`, `trunc` of
/// negatives), on both backends, and their gradients (zero for the roundings).
#[test]
fn math_functions_match_torch() {
    let g = Graph::new();
    let x = g.input("x", [10]);
    let v = vec![1e-7, -1e-7, 0.5, 1.5, 2.5, -0.5, -2.5, -1.7, 30.0, -30.0];
    let xs = Tensor::new([10], v.clone()).unwrap();
    // (name, node, torch's values at each input)
    let grad = |y: NodeId| g.grad(g.sum_all(y).unwrap(), &[x]).unwrap()[0];
    type Case<'a> = (&'a str, NodeId, Vec<(usize, f64)>);
    let cases: Vec<Case> = vec![
        (
            "log1p",
            g.log1p(x).unwrap(),
            vec![
                (0, 9.999999616860996e-8),
                (1, -1.000000061686102e-7),
                (2, 0.4054651081081644),
            ],
        ),
        (
            "expm1",
            g.expm1(x).unwrap(),
            vec![
                (0, 1.0000000616861003e-7),
                (1, -9.999999616860979e-8),
                (6, -0.9179150013761013),
            ],
        ),
        (
            "round",
            g.round(x).unwrap(),
            vec![(2, 0.0), (3, 2.0), (4, 2.0), (5, 0.0), (6, -2.0), (7, -2.0)],
        ),
        (
            "floor",
            g.floor(x).unwrap(),
            vec![(1, -1.0), (7, -2.0), (3, 1.0)],
        ),
        (
            "ceil",
            g.ceil(x).unwrap(),
            vec![(0, 1.0), (7, -1.0), (5, 0.0)],
        ),
        ("trunc", g.trunc(x).unwrap(), vec![(7, -1.0), (3, 1.0)]),
        (
            "log_sigmoid",
            g.log_sigmoid(x).unwrap(),
            vec![
                (8, -9.357622968839737e-14),
                (9, -30.000000000000092),
                (2, -0.47407698418010663),
            ],
        ),
        (
            "gelu_tanh",
            g.gelu_tanh(x).unwrap(),
            vec![
                (2, 0.34571400982514394),
                (7, -0.07589409892160355),
                (8, 30.0),
            ],
        ),
        (
            "softsign",
            g.softsign(x).unwrap(),
            vec![(7, -0.6296296361706056), (8, 0.967741935483871)],
        ),
        (
            "erf",
            g.erf(x).unwrap(),
            vec![(2, 0.5204998778130465), (7, -0.9837904615810698)],
        ),
        (
            "round'",
            grad(g.round(x).unwrap()),
            vec![(2, 0.0), (4, 0.0), (7, 0.0)],
        ),
        (
            "floor'",
            grad(g.floor(x).unwrap()),
            vec![(3, 0.0), (8, 0.0)],
        ),
        (
            "gelu_tanh'",
            grad(g.gelu_tanh(x).unwrap()),
            vec![(2, 0.8673699035346424), (7, -0.1159146275361514)],
        ),
        (
            "log_sigmoid'",
            grad(g.log_sigmoid(x).unwrap()),
            vec![(2, 0.3775406687981454), (9, 0.9999999999999065)],
        ),
        (
            "rsqrt'",
            grad(g.rsqrt(x).unwrap()),
            vec![(3, -0.2721655269759087), (4, -0.12649110640673517)],
        ),
    ];
    let outs: Vec<NodeId> = cases.iter().map(|c| c.1).collect();
    let mut devices = vec![("cpu", Device::cpu())];
    devices.extend(common::gpu().map(|d| ("gpu", d)));
    for (where_, dev) in devices {
        let got = dev.compile(&g, &outs).unwrap().run(&[("x", &xs)]).unwrap();
        for ((name, _, want), t) in cases.iter().zip(&got) {
            for &(i, w) in want {
                let y = t.data()[i] as f64;
                assert!(
                    (y - w).abs() <= 1e-6 * w.abs().max(1e-7),
                    "{name}({}) on the {where_}: {y}, torch {w}",
                    v[i]
                );
            }
        }
    }
}

#[test]
fn extreme_values_stay_finite() {
    let g = Graph::new();
    let x = g.input("x", [6]);
    let outs = vec![
        g.sigmoid(x).unwrap(),
        g.tanh(x).unwrap(),
        g.softmax(x, -1).unwrap(),
        g.log_softmax(x, 0).unwrap(),
        g.elu(x, 1.0).unwrap(),
        g.mish(x).unwrap(),
        g.hardswish(x).unwrap(),
        g.leaky_relu(x, 0.01).unwrap(),
        g.gelu_tanh(x).unwrap(),
        g.log_sigmoid(x).unwrap(),
        g.softsign(x).unwrap(),
        g.erf(x).unwrap(),
    ];
    let xs = Tensor::new([6], vec![-1000.0, -90.0, -20.0, 0.0, 20.0, 1000.0]).unwrap();
    check_gpu_vs_cpu("extremes", &g, &outs, &[("x", &xs)], TOL_REDUCTION);
}

#[test]
fn softmax_and_log_softmax_over_any_axis() {
    for &(shape, axis) in &[
        (&[1usize][..], -1isize),
        (&[7][..], 0),
        (&[5, 10][..], -1),
        (&[3, 129][..], 1),
        (&[4, 6, 5][..], 1),
        (&[2, 3, 7][..], 0),
    ] {
        let g = Graph::new();
        let x = g.input("x", shape);
        let s = g.softmax(x, axis).unwrap();
        let l = g.log_softmax(x, axis).unwrap();
        let xs = Tensor::rand_uniform(shape.to_vec(), -10.0, 10.0, 7);
        check_gpu_vs_cpu(
            &format!("softmax {shape:?} axis {axis}"),
            &g,
            &[s, l],
            &[("x", &xs)],
            TOL_REDUCTION,
        );
    }
}

#[test]
fn reductions_over_each_axis() {
    for &(shape, axis, keep) in &[
        (&[1usize][..], 0isize, false),
        (&[300][..], 0, true),
        (&[7, 13][..], 0, false),
        (&[7, 13][..], 1, true),
        (&[3, 5, 67][..], 1, false),
        (&[2, 3, 5, 7][..], -1, false),
        (&[2, 1000][..], 1, false),
    ] {
        let g = Graph::new();
        let x = g.input("x", shape);
        let outs = vec![
            g.sum(x, axis, keep).unwrap(),
            g.mean(x, axis, keep).unwrap(),
            g.max(x, axis, keep).unwrap(),
            g.min(x, axis, keep).unwrap(),
        ];
        let xs = rand(shape, 99);
        check_gpu_vs_cpu(
            &format!("reduce {shape:?} axis {axis}"),
            &g,
            &outs,
            &[("x", &xs)],
            TOL_REDUCTION,
        );
        // indices exactly, on values of few levels so that ties are common: the first wins
        let idx = vec![
            g.argmax(x, axis, keep).unwrap(),
            g.argmin(x, axis, keep).unwrap(),
        ];
        let coarse: Vec<f32> = xs.data().iter().map(|v| (v * 3.0).round()).collect();
        let coarse = Tensor::new(shape, coarse).unwrap();
        for (what, v) in [("random", &xs), ("tied", &coarse)] {
            check_gpu_vs_cpu(
                &format!("argmax {what} {shape:?} axis {axis}"),
                &g,
                &idx,
                &[("x", v)],
                (0.0, 0.0),
            );
        }
    }
}

/// `pad` as torch's `F.pad` (pairs from the last axis, negative amounts crop, a constant value),
/// `stack` and `split`: values against direct loops on both backends (GPU outputs poisoned),
/// gradients against central differences, errors.
#[test]
fn pad_stack_and_split() {
    let g = Graph::new();
    let x = g.input("x", [2, 3, 4]);
    let xs = rand(&[2, 3, 4], 7);
    let padded = g.pad(x, &[(1, 2), (0, -1)], 0.5).unwrap();
    let cropped = g.pad(x, &[(-1, -1)], 0.0).unwrap();
    let zeros = g.pad(x, &[(0, 0), (2, 0), (1, 1)], 0.0).unwrap();
    let stacked = g.stack(&[x, g.neg(x).unwrap()], -1).unwrap();
    let parts = g.split(x, 2, &[1, 3]).unwrap();
    let outs = [padded, cropped, zeros, stacked, parts[0], parts[1]];
    assert_eq!(g.shape(padded).dims(), &[2, 2, 7]);
    assert_eq!(g.shape(cropped).dims(), &[2, 3, 2]);
    assert_eq!(g.shape(zeros).dims(), &[4, 5, 4]);
    assert_eq!(g.shape(stacked).dims(), &[2, 3, 4, 2]);
    let at = |i: usize, j: usize, k: usize| xs.data()[(i * 3 + j) * 4 + k];
    // direct loops
    let mut want: Vec<Vec<f32>> = vec![Vec::new(); 6];
    for i in 0..2 {
        for j in 0..2 {
            for k in 0..7 {
                let inside = (1..5).contains(&k);
                want[0].push(if inside { at(i, j, k - 1) } else { 0.5 });
            }
        }
    }
    for i in 0..2 {
        for j in 0..3 {
            want[1].extend((1..3).map(|k| at(i, j, k)));
        }
    }
    for i in 0..4 {
        for j in 0..5 {
            for k in 0..4 {
                let inside = (1..3).contains(&i) && j >= 2;
                want[2].push(if inside { at(i - 1, j - 2, k) } else { 0.0 });
            }
        }
    }
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                want[3].extend([at(i, j, k), -at(i, j, k)]);
                if k == 0 {
                    want[4].push(at(i, j, k));
                } else {
                    want[5].push(at(i, j, k));
                }
            }
        }
    }
    let devices = common::devices();
    for dev in devices {
        let mut plan = dev.compile(&g, &outs).unwrap();
        plan.poison(f32::NAN);
        let got = plan.run(&[("x", &xs)]).unwrap();
        for (k, (t, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(t.data(), &w[..], "output {k}");
        }
    }
    let loss = common::random_projection(
        &g,
        g.concat(
            &[
                g.reshape(padded, &[-1]).unwrap(),
                g.reshape(stacked, &[-1]).unwrap(),
            ],
            0,
        )
        .unwrap(),
        3,
    );
    common::gradcheck(
        "pad and stack",
        &g,
        loss,
        &[("x", x)],
        &[("x", &xs)],
        24,
        TOL_REDUCTION,
    );
    for (name, err) in [
        ("pad", g.pad(x, &[(0, 0); 4], 0.0).unwrap_err()),
        ("pad", g.pad(x, &[(-2, -2)], 0.0).unwrap_err()),
        ("stack", g.stack(&[x, parts[1]], 0).unwrap_err()),
        ("split", g.split(x, 1, &[1, 1]).unwrap_err()),
    ] {
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// The activations as `nn::Act` steps of a `Sequential` give what the graph ops give.
#[test]
fn activations_in_sequential() {
    use kiln::nn::{Act, Sequential};
    let acts = [
        Act::LeakyRelu(0.2),
        Act::AvgPool(2),
        Act::Elu(0.5),
        Act::Selu,
        Act::Relu6,
        Act::Hardsigmoid,
        Act::Hardswish,
        Act::Mish,
    ];
    let g = Graph::new();
    let x = g.input("x", [2, 3, 4, 6]);
    let seq = acts.iter().fold(Sequential::new(), |s, &a| s.act(a));
    let (y, params) = seq.apply(&g, x, true).unwrap();
    assert!(params.is_empty());
    let mut h = g.leaky_relu(x, 0.2).unwrap();
    h = g.avg_pool2d(h, (2, 2), (2, 2), (0, 0)).unwrap();
    h = g.elu(h, 0.5).unwrap();
    h = g.selu(h).unwrap();
    h = g.relu6(h).unwrap();
    h = g.hardsigmoid(h).unwrap();
    h = g.hardswish(h).unwrap();
    h = g.mish(h).unwrap();
    let xv = Tensor::rand_uniform(vec![2, 3, 4, 6], -4.0, 4.0, 12);
    for dev in common::devices() {
        let got = dev
            .compile(&g, &[y, h])
            .unwrap()
            .run(&[("x", &xv)])
            .unwrap();
        assert_eq!(got[0].data(), got[1].data());
        assert_eq!(got[0].dims(), &[2, 3, 2, 3]);
    }
}

/// `where_cond` as `torch.where` (broadcasting all three, infinities on the side not chosen
/// kept out) and `masked_fill` with `-inf`: values on both backends, one kernel, gradients to
/// the side chosen.
#[test]
fn where_and_masked_fill() {
    let g = Graph::new();
    let c = g.input("c", [2, 1, 3]);
    let a = g.input("a", [4, 3]);
    let b = g.input("b", [3]);
    let y = g.where_cond(c, a, b).unwrap();
    let filled = g.masked_fill(a, g.reshape(c, &[2, 3]).unwrap(), f32::NEG_INFINITY);
    assert!(filled.is_err(), "[4, 3] and [2, 3] do not broadcast");
    let m = g.input("m", [4, 1]);
    let filled = g.masked_fill(a, m, f32::NEG_INFINITY).unwrap();
    let cv = Tensor::new([2, 1, 3], vec![1., 0., 2., 0., 0., -1.]).unwrap();
    let mut av = rand(&[4, 3], 3);
    av.data_mut()[4] = f32::INFINITY; // chosen against: must not leak
    let bv = Tensor::new([3], vec![f32::NAN, 5.0, 6.0]).unwrap();
    let mv = Tensor::new([4, 1], vec![0., 1., 0., 1.]).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 4, 3]);
    let mut want_y = Vec::new();
    for i in 0..2 {
        for r in 0..4 {
            for k in 0..3 {
                let on = cv.data()[i * 3 + k] != 0.0;
                want_y.push(if on {
                    av.data()[r * 3 + k]
                } else {
                    bv.data()[k]
                });
            }
        }
    }
    let want_f: Vec<f32> = (0..12)
        .map(|e| {
            if mv.data()[e / 3] != 0.0 {
                f32::NEG_INFINITY
            } else {
                av.data()[e]
            }
        })
        .collect();
    let feeds = [("c", &cv), ("a", &av), ("b", &bv), ("m", &mv)];
    let same = |x: &[f32], w: &[f32]| {
        x.iter()
            .zip(w)
            .all(|(p, q)| p == q || p.is_nan() && q.is_nan())
    };
    let devices = common::devices();
    for (k, dev) in devices.into_iter().enumerate() {
        let mut plan = dev.compile(&g, &[y, filled]).unwrap();
        plan.poison(f32::NAN);
        let got = plan.run(&feeds).unwrap();
        assert!(same(got[0].data(), &want_y), "{:?}", got[0].data());
        assert!(same(got[1].data(), &want_f), "{:?}", got[1].data());
        // one kernel on the GPU (the CPU reference, device 0, runs none)
        let one = dev.compile(&g, &[y]).unwrap();
        assert_eq!(one.kernels().len(), (k > 0) as usize, "{:?}", one.kernels());
    }
    // gradients: a's where chosen (summed over the broadcast axis), b's elsewhere
    let g = Graph::new();
    let (c, a, b) = (
        g.input("c", [2, 1, 3]),
        g.input("a", [4, 3]),
        g.input("b", [3]),
    );
    let loss = common::random_projection(&g, g.where_cond(c, a, b).unwrap(), 4);
    let (av, bv) = (rand(&[4, 3], 5), rand(&[3], 6));
    common::gradcheck(
        "where_cond",
        &g,
        loss,
        &[("a", a), ("b", b)],
        &[("c", &cv), ("a", &av), ("b", &bv)],
        12,
        TOL_REDUCTION,
    );
}

/// torch's argmax and argmin (the first index on ties), comparisons as 0/1 masks, and a
/// classifier's accuracy on the device: the argmax's kernel stores the comparison with the
/// labels (an epilogue), one more kernel takes the mean.
#[test]
fn argmax_comparisons_and_accuracy() {
    let g = Graph::new();
    let x = g.input("x", [3, 4]);
    let y = g.input("y", [3]);
    let xs = Tensor::new(
        [3, 4],
        vec![1., 5., 5., 0., -2., -7., 3., -7., 2., 2., 2., 2.],
    )
    .unwrap();
    let ys = Tensor::new([3], vec![1., 2., 3.]).unwrap();
    let pred = g.argmax(x, 1, false).unwrap();
    let accuracy = g.mean_all(g.eq(pred, y).unwrap()).unwrap();
    let a = g.reshape(g.narrow(x, 1, 0, 1).unwrap(), &[3]).unwrap();
    let b = g.reshape(g.narrow(x, 1, 1, 1).unwrap(), &[3]).unwrap();
    let outs = vec![
        pred,
        g.argmin(x, 1, true).unwrap(),
        g.argmax(x, 0, false).unwrap(),
        accuracy,
        g.eq(a, b).unwrap(),
        g.ne(a, b).unwrap(),
        g.ge(a, b).unwrap(),
        g.gt(a, b).unwrap(),
        g.le(a, b).unwrap(),
        g.lt(a, b).unwrap(),
    ];
    // a = [1, -2, 2], b = [5, -7, 2]
    let want: Vec<Vec<f32>> = vec![
        vec![1., 2., 0.],
        vec![3., 1., 0.],
        vec![2., 0., 0., 2.],
        vec![2.0 / 3.0],
        vec![0., 0., 1.],
        vec![1., 1., 0.],
        vec![0., 1., 1.],
        vec![0., 1., 0.],
        vec![1., 0., 1.],
        vec![1., 0., 0.],
    ];
    let mut devices = vec![("cpu", Device::cpu())];
    devices.extend(common::gpu().map(|d| ("gpu", d)));
    for (where_, dev) in devices {
        let got = dev
            .compile(&g, &outs)
            .unwrap()
            .run(&[("x", &xs), ("y", &ys)])
            .unwrap();
        for (k, (t, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(t.data(), &w[..], "output {k} on the {where_}");
        }
        if where_ == "gpu" {
            let plan = dev.compile(&g, &[accuracy]).unwrap();
            assert_eq!(plan.kernels().len(), 2, "{:?}", plan.kernels());
        }
    }
    // no gradient through an index or a comparison; min's gradient goes to the minima
    let loss = g
        .add(
            g.sum_all(pred).unwrap(),
            g.sum_all(g.min(x, 1, false).unwrap()).unwrap(),
        )
        .unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    let got = Device::cpu()
        .compile(&g, &[dx])
        .unwrap()
        .run(&[("x", &xs)])
        .unwrap();
    let want = [0., 0., 0., 1., 0., 0.5, 0., 0.5, 0.25, 0.25, 0.25, 0.25];
    assert_eq!(got[0].data(), &want[..]);
}

/// The multi-tensor sum of squares (gradient clipping's squared norm): partial sums per chunk
/// of 4096 elements and their total, on one tensor and on 7 to 40, with sizes around the chunk;
/// the total equals the per-tensor composition. The graph chains a node per 7 tensors; a plan
/// runs as many per kernel as the adapter binds (all writing one buffer of partial sums).
/// Lengths of the chained sum-of-squares gradient check's tensors: 2 to 10 by name.
fn j_len(name: &str) -> usize {
    name[1..].parse::<usize>().expect("t<j>") + 2
}

#[test]
fn sum_of_squares_of_many_tensors() {
    let sizes: [&[usize]; 9] = [
        &[1],
        &[4096],
        &[4097],
        &[3, 37],
        &[2, 5000],
        &[256],
        &[7, 11, 13],
        &[1, 4095],
        &[9000],
    ];
    for n in [1, 7, 9, 16, 40] {
        let g = Graph::new();
        let xs: Vec<kiln::NodeId> = (0..n)
            .map(|j| g.input(&format!("x{j}"), sizes[j % 9]))
            .collect();
        let total = g.sum_squares(&xs).unwrap();
        assert_eq!(g.shape(total).dims(), [1]);
        let composed = xs
            .iter()
            .map(|&x| g.sum_all(g.square(x).unwrap()).unwrap())
            .reduce(|a, b| g.add(a, b).unwrap())
            .unwrap();
        // the partial sums themselves: the node the total reduces
        let values: Vec<Tensor> = (0..n).map(|j| rand(sizes[j % 9], 40 + j as u64)).collect();
        let names: Vec<String> = (0..n).map(|j| format!("x{j}")).collect();
        let feeds: Vec<(&str, &Tensor)> = names.iter().map(|s| s.as_str()).zip(&values).collect();
        check_gpu_vs_cpu(
            &format!("sum_squares of {n}"),
            &g,
            &[total, composed],
            &feeds,
            TOL_REDUCTION,
        );
        let out = kiln::Device::cpu()
            .compile(&g, &[total, composed])
            .unwrap()
            .run(&feeds)
            .unwrap();
        let (a, b) = (out[0].data()[0] as f64, out[1].data()[0] as f64);
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{a} vs {b}");
        if let Some(dev) = common::gpu() {
            // a kernel per as many tensors as the adapter binds beside the partial sums (7 at
            // WebGPU's minimum, at most 64), and one reduction
            let limit = dev
                .limits()
                .expect("a GPU")
                .max_storage_buffers_per_shader_stage as usize;
            let per = (limit - 1).clamp(7, 64);
            let plan = dev.compile(&g, &[total]).unwrap();
            assert_eq!(plan.info().dispatches, n.div_ceil(per) + 1, "{n} tensors");
            let report = dev.verify(&g, &[total], &feeds).unwrap();
            assert!(report.ok(), "{report}");
        }
    }
    // its gradient (2 x, through the chunks: a member of two) against central differences, on
    // small values so that the f32 loss resolves the differences; every element (the second
    // chunk holds one)
    let g = Graph::new();
    let xs = [
        g.input("a", [3]),
        g.input("b", [4097]),
        g.input("c", [2, 5]),
    ];
    let total = g.sum_squares(&xs).unwrap();
    let vals = [
        Tensor::rand_uniform([3], -0.01, 0.01, 51),
        Tensor::rand_uniform([4097], -0.01, 0.01, 52),
        Tensor::rand_uniform([2, 5], -0.01, 0.01, 53),
    ];
    let feeds = [("a", &vals[0]), ("b", &vals[1]), ("c", &vals[2])];
    let wrt = [("a", xs[0]), ("b", xs[1]), ("c", xs[2])];
    common::gradcheck("sum_squares", &g, total, &wrt, &feeds, 4097, TOL_REDUCTION);
    // and through a chain of nodes (9 tensors: two)
    let g = Graph::new();
    let names: Vec<String> = (0..9).map(|j| format!("t{j}")).collect();
    let xs: Vec<kiln::NodeId> = names.iter().map(|n| g.input(n, [j_len(n)])).collect();
    let total = g.sum_squares(&xs).unwrap();
    let vals: Vec<Tensor> = names
        .iter()
        .enumerate()
        .map(|(j, n)| Tensor::rand_uniform([j_len(n)], -0.01, 0.01, 70 + j as u64))
        .collect();
    let feeds: Vec<(&str, &Tensor)> = names.iter().map(|s| s.as_str()).zip(&vals).collect();
    let wrt: Vec<(&str, kiln::NodeId)> = names.iter().map(|s| s.as_str()).zip(xs).collect();
    common::gradcheck(
        "sum_squares chain",
        &g,
        total,
        &wrt,
        &feeds,
        64,
        TOL_REDUCTION,
    );
    // an empty list is refused, naming the op
    let g = Graph::new();
    assert!(g
        .sum_squares(&[])
        .unwrap_err()
        .to_string()
        .contains("sum_squares"));
    // f16 tensors are read as stored (next to f32 ones), the sum is f32
    let h = g.input_as("h", [5000], kiln::DType::F16);
    let f = g.input("f", [37]);
    let total = g.sum_squares(&[h, f]).unwrap();
    assert_eq!(g.dtype(total), kiln::DType::F32);
    let (hv, fv) = (rand(&[5000], 61).rounded(kiln::DType::F16), rand(&[37], 62));
    check_gpu_vs_cpu(
        "sum_squares of f16 and f32",
        &g,
        &[total],
        &[("h", &hv), ("f", &fv)],
        TOL_REDUCTION,
    );
}

#[test]
fn permute_transpose_reshape() {
    let g = Graph::new();
    let x = g.input("x", [2, 3, 5, 7]);
    let p = g.permute(x, &[3, 1, 0, 2]).unwrap();
    let t = g.transpose(x, 0, -1).unwrap();
    let r = g.reshape(x, &[6, -1]).unwrap();
    let rt = g.transpose(r, 0, 1).unwrap();
    let f = g.flatten(p).unwrap();
    let xs = rand(&[2, 3, 5, 7], 5);
    // a pure copy must match exactly
    check_gpu_vs_cpu("layout", &g, &[p, t, r, rt, f], &[("x", &xs)], (0.0, 0.0));
    for &shape in &[
        &[1usize, 1][..],
        &[1, 9][..],
        &[65, 3][..],
        &[2, 1, 3, 1, 2, 1][..],
    ] {
        let g = Graph::new();
        let x = g.input("x", shape);
        let rev: Vec<usize> = (0..shape.len()).rev().collect();
        let y = g.permute(x, &rev).unwrap();
        check_gpu_vs_cpu(
            &format!("permute {shape:?}"),
            &g,
            &[y],
            &[("x", &rand(shape, 6))],
            (0.0, 0.0),
        );
    }
}

#[test]
fn grids_wider_than_65535_workgroups() {
    // reduce and softmax launch one workgroup per row: 70,001 rows
    let g = Graph::new();
    let x = g.input("x", [70_001, 3]);
    let s = g.sum(x, -1, false).unwrap();
    let sm = g.softmax(x, -1).unwrap();
    let xs = rand(&[70_001, 3], 8);
    check_gpu_vs_cpu("70,001 rows", &g, &[s, sm], &[("x", &xs)], TOL_REDUCTION);
    // elementwise: 256 * 65,535 + 1000 elements need a second grid row
    let n = 256 * 65_535 + 1000;
    let g = Graph::new();
    let x = g.input("x", [n]);
    let y = g.relu(x).unwrap();
    let xs = rand(&[n], 9);
    check_gpu_vs_cpu("16.8M relu", &g, &[y], &[("x", &xs)], TOL_ELEMENTWISE);
    // matmul: 1 x 1 output tiles over a batch of 70,000
    let g = Graph::new();
    let a = g.input("a", [70_000, 1, 2]);
    let b = g.input("b", [70_000, 2, 1]);
    let y = g.matmul(a, b).unwrap();
    check_gpu_vs_cpu(
        "70,000 batched matmuls",
        &g,
        &[y],
        &[
            ("a", &rand(&[70_000, 1, 2], 10)),
            ("b", &rand(&[70_000, 2, 1], 11)),
        ],
        TOL_REDUCTION,
    );
}

#[test]
fn a_small_network_end_to_end() {
    // x -> linear -> gelu -> linear -> log_softmax, with parameters and constants
    let g = Graph::new();
    let x = g.input("x", [5, 11]);
    let w1 = g.param_init("fc1.weight", rand(&[13, 11], 1));
    let b1 = g.param_init("fc1.bias", rand(&[13], 2));
    let w2 = g.param_init("fc2.weight", rand(&[3, 13], 3));
    let c = g.constant(Tensor::full([3], 0.25));
    let h = g
        .gelu(g.add(g.matmul_t(x, w1, false, true).unwrap(), b1).unwrap())
        .unwrap();
    let o = g.add(g.matmul_t(h, w2, false, true).unwrap(), c).unwrap();
    let y = g.log_softmax(o, -1).unwrap();
    let m = g.mean_all(y).unwrap();
    check_gpu_vs_cpu(
        "mlp",
        &g,
        &[y, m],
        &[("x", &rand(&[5, 11], 4))],
        TOL_REDUCTION,
    );
}

#[test]
fn narrow_and_concat() {
    let g = Graph::new();
    let a = g.input("a", [3, 5, 7]);
    let b = g.input("b", [3, 2, 7]);
    let n0 = g.narrow(a, 0, 1, 2).unwrap();
    let n1 = g.narrow(a, 1, 2, 3).unwrap();
    let n2 = g.narrow(a, -1, 6, 1).unwrap();
    let c = g.concat(&[a, b, a], 1).unwrap();
    assert_eq!(g.shape(c).dims(), &[3, 12, 7]);
    let c0 = g.concat(&[n0, n0], 0).unwrap();
    check_gpu_vs_cpu(
        "narrow/concat",
        &g,
        &[n0, n1, n2, c, c0],
        &[("a", &rand(&[3, 5, 7], 1)), ("b", &rand(&[3, 2, 7], 2))],
        (0.0, 0.0),
    );
    // the values land where they should
    let mut plan = kiln::Device::cpu().compile(&g, &[n1, c]).unwrap();
    let av = rand(&[3, 5, 7], 1);
    let out = plan
        .run(&[("a", &av), ("b", &rand(&[3, 2, 7], 2))])
        .unwrap();
    assert_eq!(out[0].data()[0], av.data()[2 * 7]);
    assert_eq!(out[1].data()[7 * 7], av.data()[0]);
    assert!(g.narrow(a, 1, 4, 2).is_err());
    assert!(g.concat(&[a, g.input("z", [3, 5, 6])], 1).is_err());
}

#[test]
fn matmul_with_fused_bias_and_relu() {
    use kiln::ops::matmul::Bias;
    for &(sa, sb, ta, tb, bias, relu) in &[
        (
            &[5usize, 7][..],
            &[7usize, 3][..],
            false,
            false,
            Bias::Cols,
            true,
        ),
        (&[65, 9][..], &[9, 70][..], false, false, Bias::Rows, true),
        (&[4, 13, 6][..], &[5, 6][..], false, true, Bias::Cols, false),
        (
            &[2, 8, 3][..],
            &[2, 8, 11][..],
            true,
            false,
            Bias::Rows,
            false,
        ),
        (&[1, 1][..], &[1, 1][..], false, false, Bias::None, true),
    ] {
        let g = Graph::new();
        let a = g.input("a", sa);
        let b = g.input("b", sb);
        let plain = g.matmul_t(a, b, ta, tb).unwrap();
        let out = g.shape(plain);
        let (m, n) = (out.dims()[out.rank() - 2], out.dims()[out.rank() - 1]);
        let blen = if bias == Bias::Rows { m } else { n };
        let c = g.input("c", [blen]);
        let y = g.matmul_fused(a, b, ta, tb, Some((c, bias)), relu).unwrap();
        let feeds = [
            ("a", rand(sa, 1)),
            ("b", rand(sb, 2)),
            ("c", rand(&[blen], 3)),
        ];
        let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(k, v)| (*k, v)).collect();
        check_gpu_vs_cpu(
            &format!("fused {sa:?} {sb:?} {bias:?} relu={relu}"),
            &g,
            &[y],
            &refs,
            TOL_REDUCTION,
        );
        // against the unfused composition on the CPU
        let cb = if bias == Bias::Rows {
            g.reshape(c, &[m as isize, 1]).unwrap()
        } else {
            c
        };
        let mut z = if bias == Bias::None {
            plain
        } else {
            g.add(plain, cb).unwrap()
        };
        if relu {
            z = g.relu(z).unwrap();
        }
        let mut cpu = kiln::Device::cpu().compile(&g, &[y, z]).unwrap();
        let out = cpu.run(&refs).unwrap();
        common::assert_close("fused vs composed", &out[0], &out[1], 1e-6, 1e-5);
    }
}
