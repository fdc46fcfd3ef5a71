//! Elementwise fusion in the plan compiler (`exec::fuse`, `codegen::elementwise`): fused chains
//! against the CPU reference (outputs poisoned with NaN first) on awkward shapes, broadcasting
//! inputs, shared inputs, scalar ops and transcendental chains; targets in the middle of a chain
//! survive; chains around a matmul and through views; and the dispatch counts with fusion on and
//! off (`Device::set_fusion`).

mod common;

use common::{assert_close, check_gpu_vs_cpu, check_on, rand, refs};
use kiln::ops::TOL_ELEMENTWISE;
use kiln::{Device, Graph, NodeId, Tensor};

/// A device of its own with fusion on (it is switched per device, and KILN_FUSE=0 may have
/// turned it off), or `None` where `common::gpu` skips.
fn device() -> Option<Device> {
    common::gpu()?;
    let dev = Device::gpu().expect("a GPU adapter");
    dev.set_fusion(true);
    Some(dev)
}

/// Feeds named `x0, x1, ..` of these shapes, seeded per input.
fn feeds(shapes: &[&[usize]]) -> Vec<(String, Tensor)> {
    shapes
        .iter()
        .enumerate()
        .map(|(k, s)| (format!("x{k}"), rand(s, 100 + k as u64)))
        .collect()
}

/// `relu(tanh(x * 1.5 + bias) * x)`: five ops, a broadcast bias and `x` read twice.
fn five_ops(g: &Graph, shape: &[usize]) -> NodeId {
    let x = g.input("x0", shape);
    let b = g.input("x1", [*shape.last().unwrap()]);
    let h = g.mul_scalar(x, 1.5).unwrap();
    let h = g.add(h, b).unwrap();
    let h = g.tanh(h).unwrap();
    let h = g.mul(h, x).unwrap();
    g.relu(h).unwrap()
}

#[test]
fn five_op_chain_is_one_dispatch_and_five_without_fusion() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let y = five_ops(&g, &[37, 29]);
    let f = feeds(&[&[37, 29], &[29]]);
    assert!(dev.fusion());
    let on = check_on(&dev, "fused", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(on.dispatches, 1, "{on}");
    assert_eq!(on.nodes, 3, "two inputs and the fused node: {on}");
    assert_eq!(on.buffers, 1, "no intermediate is stored: {on}");
    dev.set_fusion(false);
    assert!(!dev.fusion());
    let off = check_on(&dev, "unfused", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(off.dispatches, 5, "{off}");
    assert_eq!(off.nodes, 7, "{off}");
    dev.set_fusion(true);
    assert_eq!(dev.compile(&g, &[y]).unwrap().info().dispatches, 1);
}

#[test]
fn awkward_shapes() {
    for shape in [
        &[1][..],
        &[1, 1],
        &[7],
        &[257],
        &[3, 17, 5],
        &[2, 3, 5, 7, 11],
        &[1, 13, 1],
    ] {
        let g = Graph::new();
        let y = five_ops(&g, shape);
        let f = feeds(&[shape, &[*shape.last().unwrap()]]);
        check_gpu_vs_cpu(&format!("{shape:?}"), &g, &[y], &refs(&f), TOL_ELEMENTWISE);
    }
}

#[test]
fn broadcasting_inputs() {
    // (output shape, the other operand's shapes): a row bias, a column, a scalar, an outer
    // product whose inputs are both smaller than the result, a middle axis
    let cases: [(&[usize], &[&[usize]]); 5] = [
        (&[19, 23], &[&[23], &[19, 1], &[1]]),
        (&[4, 6], &[&[4, 1], &[1, 6], &[6]]),
        (&[5, 3, 7], &[&[3, 1], &[5, 1, 7], &[1, 1, 1]]),
        (
            &[2, 1, 3, 1, 5, 2],
            &[&[3, 1, 1, 2], &[2, 1, 1, 1, 5, 1], &[2]],
        ),
        (&[300], &[&[1], &[300], &[1]]),
    ];
    for (out, others) in cases {
        let g = Graph::new();
        let mut shapes: Vec<&[usize]> = vec![out];
        shapes.extend(others);
        // the first input broadcasts too where it is smaller than the result
        let x = g.input("x0", out);
        let (a, b, c) = (
            g.input("x1", others[0]),
            g.input("x2", others[1]),
            g.input("x3", others[2]),
        );
        let h = g.mul(g.add(a, b).unwrap(), c).unwrap();
        let h = g.sub(g.sigmoid(h).unwrap(), x).unwrap();
        let y = g.maximum(h, g.neg(c).unwrap()).unwrap();
        let f = feeds(&shapes);
        check_gpu_vs_cpu(
            &format!("{out:?} {others:?}"),
            &g,
            &[y],
            &refs(&f),
            TOL_ELEMENTWISE,
        );
    }
    // an interior node smaller than the result: exp of a bias [N], then added to [M, N]
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [6, 10]);
    let b = g.input("x1", [10]);
    let y = g
        .tanh(
            g.add(x, g.exp(g.mul_scalar(b, 0.5).unwrap()).unwrap())
                .unwrap(),
        )
        .unwrap();
    let f = feeds(&[&[6, 10], &[10]]);
    let info = check_on(&dev, "small interior", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 1, "{info}");
}

#[test]
fn shared_inputs() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [11, 7]);
    // x * x + x, and silu(x) = x * sigmoid(x): x is bound once per kernel
    let sq = g.add(g.mul(x, x).unwrap(), x).unwrap();
    let silu = g.mul(x, g.sigmoid(x).unwrap()).unwrap();
    let y = g.sub(sq, silu).unwrap();
    let f = feeds(&[&[11, 7]]);
    let info = check_on(&dev, "shared", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 1, "{info}");
}

#[test]
fn scalar_ops() {
    let g = Graph::new();
    let x = g.input("x0", [5, 41]);
    // positive operands for pow and the reciprocal
    let p = g.add_scalar(g.abs(x).unwrap(), 0.25).unwrap();
    let h = g.pow_scalar(p, 1.5).unwrap();
    let h = g.add(h, g.rdiv_scalar(p, 0.1).unwrap()).unwrap();
    let h = g.div_scalar(h, 3.0).unwrap();
    let h = g.rsub_scalar(h, 1.0 / 3.0).unwrap();
    let h = g.mul_scalar(h, -1e-3).unwrap();
    let h = g.add(h, g.sqrt(p).unwrap()).unwrap();
    let h = g.add(h, g.log(p).unwrap()).unwrap();
    let h = g.add(h, g.square(g.sign(x).unwrap()).unwrap()).unwrap();
    let y = g.softplus(h).unwrap();
    let f = feeds(&[&[5, 41]]);
    check_gpu_vs_cpu("scalar ops", &g, &[y], &refs(&f), TOL_ELEMENTWISE);
}

#[test]
fn transcendental_chains() {
    let g = Graph::new();
    let x = g.input("x0", [3, 97]);
    let a = g
        .gelu(
            g.tanh(g.mul_scalar(g.sigmoid(x).unwrap(), 3.0).unwrap())
                .unwrap(),
        )
        .unwrap();
    let b = g
        .sigmoid(g.gelu(g.mul_scalar(x, 4.0).unwrap()).unwrap())
        .unwrap();
    let c = g
        .tanh(g.exp(g.neg(g.abs(x).unwrap()).unwrap()).unwrap())
        .unwrap();
    let y = g.add(g.mul(a, b).unwrap(), c).unwrap();
    let f = feeds(&[&[3, 97]]);
    check_gpu_vs_cpu("gelu sigmoid tanh", &g, &[y], &refs(&f), TOL_ELEMENTWISE);
}

#[test]
fn a_requested_middle_node_is_kept() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [9, 31]);
    let m = g.tanh(g.mul_scalar(x, 2.0).unwrap()).unwrap();
    let y = g.relu(g.add_scalar(m, -0.25).unwrap()).unwrap();
    let f = feeds(&[&[9, 31]]);
    // both orders of the outputs; the middle node ends one group and reads into the next
    for outs in [[y, m], [m, y]] {
        let info = check_on(&dev, "middle output", &g, &outs, &f, TOL_ELEMENTWISE);
        assert_eq!(info.dispatches, 2, "{info}");
    }
    // a node read by two chains that meet is computed once inside their one kernel
    let z = g.sub(y, g.exp(m).unwrap()).unwrap();
    let info = check_on(&dev, "two readers", &g, &[z], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 1, "{info}");
    // .. but stored by its own where a node outside the chains reads it too
    let s = g.sum(m, 1, false).unwrap();
    let info = check_on(&dev, "an outside reader", &g, &[z, s], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 3, "{info}");
}

#[test]
fn chains_around_a_matmul() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [13, 24]);
    let b = g.input("x1", [24]);
    let w = g.input("x2", [24, 17]);
    let h = g
        .relu(g.add(g.mul_scalar(x, 0.5).unwrap(), b).unwrap())
        .unwrap();
    let mm = g.matmul(h, w).unwrap();
    let y = g.mul_scalar(g.sigmoid(mm).unwrap(), 2.0).unwrap();
    let f = feeds(&[&[13, 24], &[24], &[24, 17]]);
    let tol = kiln::ops::TOL_REDUCTION;
    let info = check_on(&dev, "around a matmul", &g, &[y], &f, tol);
    // the chain after the product runs in its epilogue
    assert_eq!(info.dispatches, 2, "fused, matmul + epilogue: {info}");
    dev.set_gemm_policy(kiln::GemmPolicy::Portable).unwrap();
    let info = check_on(&dev, "around a portable matmul", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 3, "fused, matmul, fused: {info}");
}

/// A product whose only reader is an elementwise chain (or op) of its shape runs the chain in
/// its epilogue: after its own bias and relu, with broadcast inputs, transposed and batched
/// operands, vec4 and scalar stores; storing the product too when something else reads it.
#[test]
fn products_take_elementwise_epilogues() {
    use kiln::ops::matmul::Bias;
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    // [M, N] = [13, 20] (vec4 stores) and [13, 17] (scalar), bias and relu first
    for n in [20usize, 17] {
        let g = Graph::new();
        let a = g.input("x0", [13, 9]);
        let w = g.input("x1", [n, 9]);
        let bias = g.input("x2", [n]);
        let rows = g.input("x3", [13, 1]);
        let y = g
            .matmul_fused(a, w, false, true, Some((bias, Bias::Cols)), true)
            .unwrap();
        let z = g
            .gelu(g.mul(g.add_scalar(y, 0.25).unwrap(), rows).unwrap())
            .unwrap();
        let f = feeds(&[&[13, 9], &[n, 9], &[n], &[13, 1]]);
        let info = check_on(&dev, &format!("epilogue n={n}"), &g, &[z], &f, tol);
        assert_eq!(info.dispatches, 1, "{info}");
        // a single op after the product, the product as its second operand
        let u = g.sub(rows, y).unwrap();
        let info = check_on(&dev, "single op", &g, &[u], &f, tol);
        assert_eq!(info.dispatches, 1, "{info}");
        // read twice by one chain: still one reader, one kernel
        let v = g.add(g.exp(y).unwrap(), y).unwrap();
        let info = check_on(&dev, "read twice by a chain", &g, &[v], &f, tol);
        assert_eq!(info.dispatches, 1, "{info}");
        // read by the chain and a sum after it: the epilogue's kernel stores the product too
        let total = g.sum(y, 1, false).unwrap();
        let info = check_on(&dev, "two readers", &g, &[v, total], &f, tol);
        assert_eq!(info.dispatches, 2, "{info}");
    }
    // batched, transposed, broadcast batch
    let g = Graph::new();
    let a = g.input("x0", [3, 8, 5]);
    let b = g.input("x1", [6, 8]);
    let c = g.input("x2", [3, 1, 6]);
    let y = g.matmul_t(a, b, true, true).unwrap();
    let z = g
        .tanh(
            g.div(y, g.add_scalar(g.abs(c).unwrap(), 1.0).unwrap())
                .unwrap(),
        )
        .unwrap();
    let f = feeds(&[&[3, 8, 5], &[6, 8], &[3, 1, 6]]);
    let info = check_on(&dev, "batched epilogue", &g, &[z], &f, tol);
    assert_eq!(
        info.dispatches, 1,
        "the whole chain, c's part included, in the epilogue: {info}"
    );
    // a linear layer on (B, L, E) is one [B*L, E] product read through a reshape: a residual
    // add and a broadcast (L, N) operand still run in its epilogue
    for n in [8usize, 7] {
        let g = Graph::new();
        let lin = kiln::nn::Linear::new(&format!("lin{n}"), 5, n, &mut kiln::nn::Init::new(3));
        let x = g.input("x0", [3, 4, 5]);
        let res = g.input("x1", [3, 4, n]);
        let pos = g.input("x2", [4, n]);
        let (y, _) = lin.apply(&g, x).unwrap();
        let z = g.add(g.add(y, res).unwrap(), pos).unwrap();
        let f = feeds(&[&[3, 4, 5], &[3, 4, n], &[4, n]]);
        let info = check_on(
            &dev,
            &format!("linear on (B, L, E), N {n}"),
            &g,
            &[z],
            &f,
            tol,
        );
        assert_eq!(info.dispatches, 1, "{info}");
    }
}

/// Dropout is a step of fused chains, epilogues and prologues (its mask keyed by the element
/// index, as the dropout kernel keys it): at the chain's own shape only; bit for bit the CPU
/// reference's mask.
#[test]
fn dropout_fuses_at_the_programs_shape() {
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    let seed = Tensor::new([1], vec![1234.0]).unwrap();
    let g = Graph::new();
    let x = g.input("x0", [6, 37]);
    let res = g.input("x1", [6, 37]);
    let w = g.input("x2", [37, 37]);
    let s = g.input("seed", [1]);
    let mut f = feeds(&[&[6, 37], &[6, 37], &[37, 37]]);
    f.push(("seed".into(), seed));
    // residual block: add(dropout(relu(x)), res): one kernel
    let y = g
        .add(g.dropout(g.relu(x).unwrap(), 0.3, s, 11).unwrap(), res)
        .unwrap();
    let info = check_on(&dev, "chain", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 1, "{info}");
    // after a product: matmul -> dropout -> add in the product's epilogue
    let z = g
        .add(g.dropout(g.matmul(x, w).unwrap(), 0.5, s, 12).unwrap(), res)
        .unwrap();
    let info = check_on(&dev, "epilogue", &g, &[z], &f, tol);
    assert_eq!(info.dispatches, 1, "{info}");
    // before a reduction: sum(dropout(x) * x) as its prologue
    let t = g
        .sum(
            g.mul(g.dropout(x, 0.2, s, 13).unwrap(), x).unwrap(),
            1,
            false,
        )
        .unwrap();
    let info = check_on(&dev, "prologue", &g, &[t], &f, tol);
    assert_eq!(info.dispatches, 1, "{info}");
    // at a broadcast shape smaller than the chain's: its own kernel
    let row = g.input("x3", [37]);
    let b = g.mul(g.dropout(row, 0.4, s, 14).unwrap(), res).unwrap();
    f.push(("x3".into(), rand(&[37], 5)));
    let info = check_on(&dev, "broadcast dropout", &g, &[b], &f, tol);
    assert_eq!(info.dispatches, 2, "{info}");
    // after a convolution stored as NCHW straight from its GEMM: the mask of the NCHW element
    let img = g.input("x4", [2, 3, 5, 5]);
    let k = g.input("x5", [4, 3, 3, 3]);
    let c = g
        .conv2d(img, k, None, kiln::graph::Conv2dOpts::default())
        .unwrap();
    let d = g
        .add_scalar(g.dropout(c, 0.5, s, 15).unwrap(), 1.0)
        .unwrap();
    f.push(("x4".into(), rand(&[2, 3, 5, 5], 6)));
    f.push(("x5".into(), rand(&[4, 3, 3, 3], 7)));
    check_on(&dev, "dropout after a convolution", &g, &[d], &f, tol);
}

/// In f16 graphs too: the fused kernel stores f16 (or the f32 of a cast after it) and reads the
/// f32 seed as f32; an f32 chain computing the seed stays out of the f16 program.
#[test]
fn dropout_fuses_in_f16_graphs() {
    let Some(dev) = device() else { return };
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("NOTICE: adapter without SHADER_F16; f16 dropout fusion skipped");
        return;
    }
    let f16 = kiln::DType::F16;
    let g = Graph::new();
    let x = g.input_as("x0", [6, 37], f16);
    let res = g.input_as("x1", [6, 37], f16);
    let w = g.input_as("x2", [37, 37], f16);
    let s = g.input("seed", [1]);
    let mut f = feeds(&[&[6, 37], &[6, 37], &[37, 37]]);
    f.push(("seed".into(), Tensor::new([1], vec![4321.0]).unwrap()));
    let as_f32 = |y| g.cast(y, kiln::DType::F32).unwrap();
    let y = g
        .add(g.dropout(g.relu(x).unwrap(), 0.3, s, 11).unwrap(), res)
        .unwrap();
    let info = check_on(&dev, "f16 chain", &g, &[as_f32(y)], &f, kiln::ops::TOL_F16);
    assert_eq!(
        info.dispatches, 1,
        "the chain storing its cast to f32: {info}"
    );
    let z = g
        .add(g.dropout(g.matmul(x, w).unwrap(), 0.5, s, 12).unwrap(), res)
        .unwrap();
    check_on(
        &dev,
        "f16 epilogue",
        &g,
        &[as_f32(z)],
        &f,
        kiln::ops::TOL_F16,
    );
    // the seed computed by an f32 op: its own kernel, then the f16 chain
    let s2 = g.add_scalar(s, 1.0).unwrap();
    let u = g.add(g.dropout(x, 0.2, s2, 13).unwrap(), res).unwrap();
    check_on(
        &dev,
        "f16 chain, computed seed",
        &g,
        &[as_f32(u)],
        &f,
        kiln::ops::TOL_F16,
    );
}

/// A reshape of a chain's element count is read through: the chain before it and after it run
/// as one kernel (dropout keyed by the shared element index; inputs broadcast at the shape
/// their step has, on either side of the reshape), and a product read through
/// reshapes takes the whole program as its epilogue (a linear layer's gradient on (B, L, E):
/// dropout's mask on (B, L, F), relu's on [B*L, F]).
#[test]
fn full_size_reshapes_are_read_through() {
    let Some(dev) = device() else { return };
    let seed = Tensor::new([1], vec![77.0]).unwrap();
    let g = Graph::new();
    let x = g.input("x0", [6, 35]);
    let y = g.input("x1", [210]);
    let s = g.input("seed", [1]);
    let mut f = feeds(&[&[6, 35], &[210]]);
    f.push(("seed".into(), seed));
    let h = g.reshape(g.mul_scalar(x, 1.5).unwrap(), &[3, 70]).unwrap();
    let h = g.dropout(h, 0.3, s, 5).unwrap();
    let z = g
        .mul(g.reshape(g.exp(h).unwrap(), &[210]).unwrap(), y)
        .unwrap();
    let info = check_on(&dev, "chain", &g, &[z], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 1, "{info}");

    // operands broadcast before the reshape broadcast at the shape they meet there, (8, 2),
    // not the output's (16, 1): a (1, 2) row, a value computed from it (exp, broadcast into
    // the add) and a (1, 1) read both before and after the reshape (a max's gradient over a
    // reshaped tensor divides by a (1, 2) count so; found by tests/random_graphs.rs)
    let g = Graph::new();
    let x = g.input("x0", [8, 2]);
    let c = g.input("x1", [1, 2]);
    let s = g.input("x2", [1, 1]);
    let y = g.input("x3", [16, 1]);
    let f = feeds(&[&[8, 2], &[1, 2], &[1, 1], &[16, 1]]);
    let h = g.add(
        g.div(x, g.add_scalar(g.abs(c).unwrap(), 1.0).unwrap())
            .unwrap(),
        g.exp(c).unwrap(),
    );
    let h = g.mul(h.unwrap(), s).unwrap();
    let z = g
        .mul(g.reshape(h, &[16, 1]).unwrap(), g.add(y, s).unwrap())
        .unwrap();
    let info = check_on(
        &dev,
        "broadcasts before a reshape",
        &g,
        &[z],
        &f,
        TOL_ELEMENTWISE,
    );
    assert_eq!(info.dispatches, 1, "{info}");

    let tol = kiln::ops::TOL_REDUCTION;
    for (b, l, e, n) in [
        (2usize, 3usize, 5usize, 8usize),
        (3, 7, 9, 13),
        (1, 1, 1, 1),
    ] {
        let g = Graph::new();
        let dy = g.input("x0", [b * l, e]);
        let w = g.input("x1", [e, n]);
        let act = g.input("x2", [b * l, n]);
        let s = g.input("seed", [1]);
        let mut f = feeds(&[&[b * l, e], &[e, n], &[b * l, n]]);
        f.push(("seed".into(), Tensor::new([1], vec![91.0]).unwrap()));
        let dh = g
            .reshape(
                g.matmul(dy, w).unwrap(),
                &[b as isize, l as isize, n as isize],
            )
            .unwrap();
        let dh = g.dropout(dh, 0.25, s, 9).unwrap();
        let dh = g.reshape(dh, &[(b * l) as isize, n as isize]).unwrap();
        let da = g
            .binary(kiln::ops::binary::BinaryOp::ReluGrad, dh, act)
            .unwrap();
        let what = format!("epilogue through reshapes, {b}x{l}x{n}");
        let info = check_on(&dev, &what, &g, &[da], &f, tol);
        assert_eq!(info.dispatches, 1, "{what}: {info}");
    }
}

#[test]
fn views_end_a_group() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [4, 6]);
    let r = g
        .reshape(g.exp(g.neg(x).unwrap()).unwrap(), &[2, 12])
        .unwrap();
    let b = g.input("x1", [12]);
    let y = g.mul(g.add(r, b).unwrap(), r).unwrap();
    let f = feeds(&[&[4, 6], &[12]]);
    let info = check_on(&dev, "through a reshape", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(
        info.dispatches, 2,
        "neg+exp, then add+mul on the view: {info}"
    );
}

#[test]
fn many_inputs_split_into_several_kernels() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let n = 12;
    let xs: Vec<NodeId> = (0..n).map(|k| g.input(&format!("x{k}"), [3, 5])).collect();
    let mut h = xs[0];
    for &x in &xs[1..] {
        h = g.tanh(g.add(h, x).unwrap()).unwrap();
    }
    let shapes: Vec<&[usize]> = vec![&[3, 5]; n];
    let f = feeds(&shapes);
    let info = check_on(&dev, "twelve inputs", &g, &[h], &f, TOL_ELEMENTWISE);
    assert!(
        (2..=3).contains(&info.dispatches),
        "at most 7 inputs per kernel: {info}"
    );
}

#[test]
fn gradients_and_training_steps_fuse_correctly() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [8, 12]);
    let t = g.input("x1", [8, 5]);
    let w = g.param_init("fusion.w", rand(&[12, 5], 7));
    let b = g.param_init("fusion.b", rand(&[5], 8));
    let h = g.add(g.matmul(x, w).unwrap(), b).unwrap();
    let pred = g.mul(g.tanh(h).unwrap(), g.sigmoid(h).unwrap()).unwrap();
    let loss = g.mse_loss(pred, t).unwrap();
    let grads = g.grad(loss, &[w, b]).unwrap();
    let f = feeds(&[&[8, 12], &[8, 5]]);
    let mut outs = vec![loss];
    outs.extend(&grads);
    check_gpu_vs_cpu("gradients", &g, &outs, &refs(&f), kiln::ops::TOL_REDUCTION);
    let fused = dev.compile(&g, &outs).unwrap().info();
    let plain = {
        let d = Device::gpu().unwrap();
        d.set_fusion(false);
        d.compile(&g, &outs).unwrap().info()
    };
    assert!(
        fused.dispatches < plain.dispatches,
        "fused {fused} vs unfused {plain}"
    );
}

#[test]
fn reads_stay_before_in_place_updates() {
    use kiln::ops::optim::{Hyper, OptimKind};
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let w0 = rand(&[6], 21);
    let w = g.param_init("w", w0.clone());
    let hyper = g.input("hyper", [kiln::ops::optim::HYPER_LEN]);
    let scale = g.constant(Tensor::full([1], 1.0));
    let grad = g.input("grad", [6]);
    // `a` reads w before the update, `y` (built after it) reads `a`: fusing them would move the
    // read of w after the in-place write
    let a = g.mul_scalar(w, 2.0).unwrap();
    let step = g
        .optim_step(OptimKind::Sgd, hyper, scale, grad, w, &[])
        .unwrap();
    let y = g.add_scalar(a, 1.0).unwrap();
    let mut plan = dev.compile_with(&g, &[y], &[step]).unwrap();
    let h = Hyper {
        lr: 0.5,
        ..Default::default()
    }
    .to_tensor();
    let got = plan
        .run(&[("hyper", &h), ("grad", &Tensor::full([6], 1.0))])
        .unwrap();
    let want: Vec<f32> = w0.data().iter().map(|v| v * 2.0 + 1.0).collect();
    assert_close(
        "the old w",
        &got[0],
        &Tensor::new([6], want).unwrap(),
        1e-6,
        1e-6,
    );
    let updated: Vec<f32> = w0.data().iter().map(|v| v - 0.5).collect();
    assert_close(
        "the update",
        &dev.param("w").unwrap(),
        &Tensor::new([6], updated).unwrap(),
        1e-6,
        1e-6,
    );
}

/// Transposes (`permute`, with reshapes around it) that only an elementwise kernel reads fold
/// into that kernel's loads: the permute's copy leaves the plan.
/// Elementwise kernels broadcast what an expand would copy for them (`fuse::fold_expands`): a
/// mean's gradient (an MSE loss's), a unary step and a dropout straight on a broadcast input
/// (the CPU twin expands it first), a binary one; an expand also requested, or read through a
/// reshape that is no broadcast, keeps its kernel. Against the CPU reference, outputs poisoned
/// with NaN.
#[test]
fn expands_fold_into_elementwise_kernels() {
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    // an MSE loss and its gradient: the mean's backward expands a single value
    let g = Graph::new();
    let x = g.input("x0", [8, 3]);
    let t = g.input("x1", [8, 3]);
    let loss = g.mse_loss(x, t).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    let f = feeds(&[&[8, 3], &[8, 3]]);
    let plan = common::check_plan(&dev, "mse gradient", &g, &[loss, dx], &f, tol);
    let kernels = plan.kernels();
    assert_eq!(common::count_op(&kernels, "expand"), 0, "{kernels:#?}");
    // the difference (which both read), the loss, its gradient
    assert_eq!(plan.info().dispatches, 3, "{kernels:#?}");
    // at the node's shape: unary, binary, dropout (keyed by the element index)
    let g = Graph::new();
    let x = g.input("x0", [4, 1, 5]);
    let y = g.input("x1", [4, 3, 5]);
    let s = g.input("seed", [1]);
    let wide = kiln::Shape(vec![4, 3, 5]);
    let e = |g: &Graph| g.expand(x, &wide).unwrap();
    let u = g.tanh(e(&g)).unwrap();
    let b = g.sub(y, e(&g)).unwrap();
    let d = g
        .mul_scalar(g.dropout(e(&g), 0.4, s, 3).unwrap(), 2.0)
        .unwrap();
    let mut f = feeds(&[&[4, 1, 5], &[4, 3, 5]]);
    f.push(("seed".into(), Tensor::new([1], vec![99.0]).unwrap()));
    for (what, out) in [("unary", u), ("binary", b), ("dropout", d)] {
        let info = check_on(&dev, what, &g, &[out], &f, TOL_ELEMENTWISE);
        assert_eq!(info.dispatches, 1, "{what}: {info}");
    }
    // the expand requested too; read through a reshape that is no broadcast
    let ex = e(&g);
    let info = check_on(
        &dev,
        "requested",
        &g,
        &[g.exp(ex).unwrap(), ex],
        &f,
        TOL_ELEMENTWISE,
    );
    assert_eq!(info.dispatches, 2, "{info}");
    let flat = g.reshape(e(&g), &[12, 5]).unwrap();
    let z = g.add(flat, g.reshape(y, &[12, 5]).unwrap()).unwrap();
    let info = check_on(&dev, "through a reshape", &g, &[z], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 2, "{info}");
}

/// The gradient of two narrows of one tensor (a sequence model's final `h` and `c` out of its
/// recurrence's states) sums two pads: where their ranges do not overlap, one two-input copy
/// (zeros around) instead of two pads and an add; overlapping ones still add. Along the last
/// axis and a middle one, adjacent and with a gap.
#[test]
fn disjoint_pads_sum_as_one_copy() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [3, 10, 4]);
    let f = feeds(&[&[3, 10, 4]]);
    let weighted = |axis: isize, start: usize, len: usize, seed: u64| {
        let part = g.narrow(x, axis, start, len).unwrap();
        let r = g.constant(rand(g.shape(part).dims(), seed));
        g.sum_all(g.mul(part, r).unwrap()).unwrap()
    };
    // (copies: concat, or pad and add kernels)
    for (what, (a, b), one) in [
        ("last axis, adjacent", ((2, 0, 2), (2, 2, 2)), true),
        ("middle axis, a gap", ((1, 1, 3), (1, 6, 2)), true),
        ("overlapping", ((1, 1, 4), (1, 3, 4)), false),
    ] {
        let loss = g
            .add(weighted(a.0, a.1, a.2, 1), weighted(b.0, b.1, b.2, 2))
            .unwrap();
        let dx = g.grad(loss, &[x]).unwrap()[0];
        let plan = common::check_plan(&dev, what, &g, &[dx], &f, TOL_ELEMENTWISE);
        let kernels = plan.kernels();
        let count = |op: &str| common::count_op(&kernels, op);
        let copies = (count("concat"), count("pad"), count("add"));
        let want = if one { (1, 0, 0) } else { (0, 2, 1) };
        assert_eq!(copies, want, "{what}: {kernels:#?}");
    }
}

#[test]
fn transposes_fold_into_elementwise_kernels() {
    let Some(dev) = device() else { return };
    let g = Graph::new();
    let x = g.input("x0", [4, 6, 5]);
    let y = g.relu(g.permute(x, &[1, 0, 2]).unwrap()).unwrap();
    let f = feeds(&[&[4, 6, 5]]);
    let info = check_on(&dev, "relu(permute)", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 1, "{info}");

    // the conv-backward idiom: NCHW -> [C, N*HW] through reshape, permute, reshape, then a mask
    let g = Graph::new();
    let x = g.input("x0", [2, 3, 4, 5]);
    let m = g.input("x1", [3, 40]);
    let t = g.reshape(x, &[2, 3, 20]).unwrap();
    let t = g
        .reshape(g.permute(t, &[1, 0, 2]).unwrap(), &[3, 40])
        .unwrap();
    let y = g
        .binary(kiln::ops::binary::BinaryOp::ReluGrad, t, m)
        .unwrap();
    let z = g.mul_scalar(y, 3.0).unwrap();
    let f = feeds(&[&[2, 3, 4, 5], &[3, 40]]);
    let info = check_on(
        &dev,
        "relu_grad(reshape(permute))",
        &g,
        &[z],
        &f,
        TOL_ELEMENTWISE,
    );
    assert_eq!(info.dispatches, 1, "{info}");
    // a 4-axis permutation with extents of 1, and both operands permuted
    let g = Graph::new();
    let a = g.input("x0", [3, 1, 7, 2]);
    let b = g.input("x1", [2, 7, 1, 3]);
    let pa = g.permute(a, &[3, 2, 1, 0]).unwrap();
    let y = g.sub(pa, b).unwrap();
    let pb = g.permute(y, &[2, 0, 3, 1]).unwrap();
    let z = g.exp(pb).unwrap();
    let f = feeds(&[&[3, 1, 7, 2], &[2, 7, 1, 3]]);
    let info = check_on(&dev, "4-d permutes", &g, &[z], &f, TOL_ELEMENTWISE);
    assert_eq!(
        info.dispatches, 2,
        "sub with a folded permute, exp with another: {info}"
    );

    // a permute with a second reader keeps its copy
    let g = Graph::new();
    let x = g.input("x0", [4, 6]);
    let p = g.permute(x, &[1, 0]).unwrap();
    let y = g
        .add(g.relu(p).unwrap(), g.sum(p, 0, true).unwrap())
        .unwrap();
    let f = feeds(&[&[4, 6]]);
    let info = check_on(&dev, "two readers", &g, &[y], &f, TOL_ELEMENTWISE);
    assert_eq!(info.dispatches, 3, "permute, sum, fused relu+add: {info}");
}

/// Reductions compute their input's elementwise program in their loads: sum of squares, a mean
/// squared error, a max over a broadcast product (the `columns` entry), a transposed input.
#[test]
fn reductions_take_elementwise_prologues() {
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    // sum(x * x) over each axis (one dispatch each)
    for axis in 0..3 {
        let g = Graph::new();
        let x = g.input("x0", [5, 70, 3]);
        let y = g.sum(g.square(x).unwrap(), axis, false).unwrap();
        let f = feeds(&[&[5, 70, 3]]);
        let info = check_on(
            &dev,
            &format!("sum of squares axis {axis}"),
            &g,
            &[y],
            &f,
            tol,
        );
        assert_eq!(info.dispatches, 1, "axis {axis}: {info}");
    }
    // mean((a - b)^2): the fused sub+square, then the mean, one kernel
    let g = Graph::new();
    let a = g.input("x0", [33, 7]);
    let b = g.input("x1", [33, 7]);
    let y = g.mse_loss(a, b).unwrap();
    let f = feeds(&[&[33, 7], &[33, 7]]);
    let info = check_on(&dev, "mse", &g, &[y], &f, tol);
    assert_eq!(
        info.dispatches, 1,
        "through the flattening reshape too: {info}"
    );
    // max over a batch axis of relu(x) * c, c broadcast: wide rows take the `columns` entry
    let g = Graph::new();
    let x = g.input("x0", [9, 130]);
    let c = g.input("x1", [130]);
    let y = g
        .max(g.mul(g.relu(x).unwrap(), c).unwrap(), 0, true)
        .unwrap();
    let f = feeds(&[&[9, 130], &[130]]);
    let info = check_on(&dev, "max of a product", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 1, "{info}");
    // a transposed input: the permute folds into the square, the square into the sum
    let g = Graph::new();
    let x = g.input("x0", [6, 11]);
    let y = g
        .sum(g.square(g.permute(x, &[1, 0]).unwrap()).unwrap(), 1, false)
        .unwrap();
    let f = feeds(&[&[6, 11]]);
    let info = check_on(&dev, "sum of squares of a transpose", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 1, "{info}");
    // the program's value also requested: it keeps its own kernel
    let g = Graph::new();
    let x = g.input("x0", [4, 9]);
    let s = g.square(x).unwrap();
    let y = g.sum(s, 1, false).unwrap();
    let f = feeds(&[&[4, 9]]);
    let info = check_on(&dev, "requested program", &g, &[y, s], &f, tol);
    assert_eq!(info.dispatches, 2, "{info}");
}

/// Reductions apply their only reader's elementwise program to each result before storing it
/// (`fuse::fuse_reduce_epilogue`): a sum of `exp(x)` over each axis then `sqrt(v) * w + 1` with
/// `w` broadcast (the exp in the loads too: prologue and epilogue in one kernel), a masked
/// mean's `sum(x * m) / sum(m)`, a max then relu, gradient clipping's scale from a sum of squares (the epilogue
/// reading a constant); one kernel each, against the CPU reference. A result something else
/// reads, or that is an output, keeps its own kernel.
#[test]
fn reductions_store_through_elementwise_epilogues() {
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    for axis in 0..3 {
        let g = Graph::new();
        let x = g.input("x0", [5, 70, 3]);
        let s = g.sum(g.exp(x).unwrap(), axis, false).unwrap();
        let d = g.shape(s).dims().to_vec();
        let w = g.input("x1", [*d.last().unwrap()]);
        let y = g
            .add_scalar(g.mul(g.sqrt(s).unwrap(), w).unwrap(), 1.0)
            .unwrap();
        let f = feeds(&[&[5, 70, 3], &[*d.last().unwrap()]]);
        let info = check_on(&dev, &format!("sum axis {axis}, then"), &g, &[y], &f, tol);
        // the exp inside the loads (a prologue), the sum, the rest before the store
        assert_eq!(info.dispatches, 1, "axis {axis}: {info}");
        let g = Graph::new();
        let x = g.input("x0", [5, 70, 3]);
        let y = g.relu(g.max(x, axis, true).unwrap()).unwrap();
        let f = feeds(&[&[5, 70, 3]]);
        let info = check_on(&dev, &format!("max axis {axis}, relu"), &g, &[y], &f, tol);
        assert_eq!(info.dispatches, 1, "axis {axis}: {info}");
    }
    // sum(x * m) / sum(m): the count's sum, then the other through both programs
    let g = Graph::new();
    let (x, m) = (g.input("x0", [6, 50]), g.input("x1", [6, 50]));
    let count = g.sum(m, 1, true).unwrap();
    let y = g
        .div(g.sum(g.mul(x, m).unwrap(), 1, true).unwrap(), count)
        .unwrap();
    let f = feeds(&[&[6, 50], &[6, 50]]);
    let info = check_on(&dev, "masked mean", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 2, "{info}");
    // gradient clipping's coefficient min(1, 0.5 / (sqrt(sum of squares) + 1e-6))
    let g = Graph::new();
    let a = g.input("x0", [300, 30]);
    let b = g.input("x1", [77]);
    let norm = g.sqrt(g.sum_squares(&[a, b]).unwrap()).unwrap();
    let coef = g
        .rdiv_scalar(g.add_scalar(norm, 1e-6).unwrap(), 0.5)
        .unwrap();
    let y = g.minimum(coef, g.constant(Tensor::full([1], 1.0))).unwrap();
    let f = feeds(&[&[300, 30], &[77]]);
    let info = check_on(&dev, "clipping coefficient", &g, &[y], &f, tol);
    assert_eq!(
        info.dispatches, 2,
        "partial sums, then their sum and the rest: {info}"
    );
    // the sum also an output, or read twice: it keeps its kernel
    let g = Graph::new();
    let x = g.input("x0", [4, 9]);
    let s = g.sum(x, 1, false).unwrap();
    let y = g.sqrt(s).unwrap();
    let f = feeds(&[&[4, 9]]);
    let info = check_on(&dev, "requested sum", &g, &[y, s], &f, tol);
    assert_eq!(info.dispatches, 2, "{info}");
    let g = Graph::new();
    let x = g.input("x0", [4, 9]);
    let s = g.sum(x, 1, false).unwrap();
    let y = g.add(g.sqrt(s).unwrap(), g.exp(s).unwrap()).unwrap();
    let z = g.mul(s, s).unwrap();
    let info = check_on(&dev, "sum read twice", &g, &[y, z], &f, tol);
    assert_eq!(info.dispatches, 3, "{info}");
}

/// A product read through a transpose of its rows and (groups of) columns stores its results
/// transposed and runs the reader's program there as its epilogue: `relu(transpose(a b))`
/// (square and not), and a linear layer's input gradient `[N, C*HW]` going back into a
/// convolution's `[C, N, HW]` layout through a relu's gradient (the MNIST CNN's flatten), f32
/// and f16, odd sizes (scalar stores past vec4 tiles); other transposes (of a batched
/// product, of the column groups) stay a product and a fused kernel. Against the CPU
/// reference, outputs poisoned with NaN.
#[test]
fn products_store_transposed_for_their_epilogue() {
    let Some(dev) = device() else { return };
    let tol = kiln::ops::TOL_REDUCTION;
    for (m, n) in [(12usize, 12usize), (13, 7)] {
        let g = Graph::new();
        let a = g.input("x0", [m, 5]);
        let b = g.input("x1", [5, n]);
        let y = g
            .relu(g.permute(g.matmul(a, b).unwrap(), &[1, 0]).unwrap())
            .unwrap();
        let f = feeds(&[&[m, 5], &[5, n]]);
        let what = format!("relu(transpose(a b)), [{m}, {n}]");
        let info = check_on(&dev, &what, &g, &[y], &f, tol);
        assert_eq!(info.dispatches, 1, "{what}: {info}");
    }
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    for dtype in [kiln::DType::F32, kiln::DType::F16] {
        if dtype == kiln::DType::F16 && !half {
            eprintln!("NOTICE: adapter without SHADER_F16; f16 transposed stores skipped");
            continue;
        }
        let tol = if half && dtype == kiln::DType::F16 {
            kiln::ops::TOL_F16
        } else {
            tol
        };
        // (N, C, HW) = (9, 3, 7): dy [9, 11] times w [11, 21], back to [3, 9, 7] where the
        // forward's relu output y lives
        let g = Graph::new();
        let dy = g.input_as("x0", [9, 11], dtype);
        let w = g.input_as("x1", [11, 21], dtype);
        let y = g.input_as("x2", [3, 9, 7], dtype);
        let dx = g.matmul(dy, w).unwrap();
        let back = g
            .permute(g.reshape(dx, &[9, 3, 7]).unwrap(), &[1, 0, 2])
            .unwrap();
        let dz = g
            .binary(kiln::ops::binary::BinaryOp::ReluGrad, back, y)
            .unwrap();
        let out = g.cast(dz, kiln::DType::F32).unwrap();
        let f = feeds(&[&[9, 11], &[11, 21], &[3, 9, 7]]);
        let what = format!("relu gradient through a flatten, {dtype}");
        let plan = common::check_plan(&dev, &what, &g, &[out], &f, tol);
        let kernels = plan.kernels();
        // (f16: then the cast to f32, which only elementwise kernels take in)
        let casts = usize::from(dtype == kiln::DType::F16);
        assert_eq!(plan.info().dispatches, 1 + casts, "{what}: {kernels:#?}");
        assert_eq!(
            common::count_op(&kernels, "matmul_epilogue"),
            1,
            "{kernels:#?}"
        );
        // the column groups transposed instead: a product, then the chain reading it so
        let other = g
            .permute(g.reshape(dx, &[9, 3, 7]).unwrap(), &[0, 2, 1])
            .unwrap();
        let z = g.cast(g.relu(other).unwrap(), kiln::DType::F32).unwrap();
        let what = format!("relu of [N, HW, C], {dtype}");
        let info = check_on(&dev, &what, &g, &[z], &f, tol);
        assert_eq!(info.dispatches, 2, "{what}: {info}");
    }
    // a batched product transposed within each matrix: no transposed store
    let g = Graph::new();
    let a = g.input("x0", [2, 6, 5]);
    let b = g.input("x1", [2, 5, 9]);
    let y = g
        .relu(g.permute(g.matmul(a, b).unwrap(), &[0, 2, 1]).unwrap())
        .unwrap();
    let f = feeds(&[&[2, 6, 5], &[2, 5, 9]]);
    let info = check_on(&dev, "batched", &g, &[y], &f, tol);
    assert_eq!(info.dispatches, 2, "{info}");
}

/// A dropout that only products read is applied by the products as they load their operand:
/// a feed-forward block's between its two linear layers (forward: the second layer's product
/// and its weight gradient's), and a residual block's `x + dropout(linear(x))` gradient before
/// the layer's weight and input gradient products (the bias gradient's row sums through it
/// too). No dropout kernel in the training graph; the outputs and every gradient against the
/// CPU reference (outputs poisoned with NaN), in f32 and f16 (the residual block: f16 rounding
/// moves a relu's pre-activations across its kink), on shapes whose K runs are multiples of 4
/// (vec4 loads) and not, prime ones, and weight gradients split along K (partial products
/// reading both operands through dropouts, with the bias gradient's row sums).
#[test]
fn products_apply_the_dropout_only_they_read() {
    use kiln::ops::matmul::Bias;
    let Some(dev) = device() else { return };
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    let f32_ = kiln::DType::F32;
    for (dtype, feed_forward) in [(f32_, true), (f32_, false), (kiln::DType::F16, false)] {
        if dtype == kiln::DType::F16 && !half {
            eprintln!("NOTICE: adapter without SHADER_F16; f16 operand dropout skipped");
            continue;
        }
        let tol = match dtype {
            kiln::DType::F16 => kiln::ops::TOL_F16,
            _ => kiln::ops::TOL_REDUCTION,
        };
        for (b, l, e, h) in [
            (2usize, 9usize, 12usize, 20usize),
            (3, 11, 13, 17),
            (2, 16, 16, 64),
            // weight gradients over 2,048 rows of 12 and 20 features: split along K
            (4, 512, 12, 20),
        ] {
            let block = if feed_forward {
                "feed-forward"
            } else {
                "residual"
            };
            let what = format!("{block} ({b}, {l}, {e}) -> {h}, {dtype}");
            let g = Graph::new();
            let x = g.input_as("x0", [b, l, e], dtype);
            let w1 = g.input("x1", [h, e]);
            let b1 = g.input("x2", [h]);
            let w2 = g.input("x3", [e, h]);
            let b2 = g.input("x4", [e]);
            let s = g.input("seed", [1]);
            let cast = |t| g.cast(t, dtype).unwrap();
            let linear = |x, w, b, relu| {
                let bias = Some((cast(b), Bias::Cols));
                g.matmul_fused(x, cast(w), false, true, bias, relu).unwrap()
            };
            let y = if feed_forward {
                // a transformer's: x + dropout(linear2(dropout(relu(linear1(x))))), the second
                // product reading its operand through one dropout and storing through another
                let hid = g.dropout(linear(x, w1, b1, true), 0.3, s, 21).unwrap();
                let z = g.dropout(linear(hid, w2, b2, false), 0.2, s, 23).unwrap();
                g.add(x, z).unwrap()
            } else {
                // the dropout is part of linear2's epilogue forward; its gradient is a dropout
                // of dy (which the residual connection reads too) that only products read
                let hid = linear(x, w1, b1, false);
                let z = g.dropout(linear(hid, w2, b2, false), 0.3, s, 22).unwrap();
                g.add(x, z).unwrap()
            };
            let y = g.cast(y, f32_).unwrap();
            let loss = common::random_projection(&g, y, 3);
            let grads = g.grad(loss, &[x, w1, b1, w2, b2]).unwrap();
            let mut outs = vec![y];
            outs.extend(grads.iter().map(|&d| g.cast(d, f32_).unwrap()));
            let mut f = feeds(&[&[b, l, e], &[h, e], &[h], &[e, h], &[e]]);
            f.push(("seed".into(), Tensor::new([1], vec![321.0]).unwrap()));
            let plan = common::check_plan(&dev, &what, &g, &outs, &f, tol);
            let kernels = plan.kernels();
            let count = |op: &str| common::count_op(&kernels, op);
            assert_eq!(count("dropout"), 0, "{what}: {kernels:#?}");
            let masked = kernels.iter().filter(|k| k.contains("drop_")).count();
            assert!(masked >= 2, "{what}: {kernels:#?}");
            if !feed_forward {
                // linear2's weight gradient reads the masked dy and sums it for the bias
                let both = |k: &str| k.contains("drop_a") && k.contains("row_sums");
                assert!(kernels.iter().any(|k| both(k)), "{what}: {kernels:#?}");
                let sums = count("sum");
                assert_eq!(sums, 0, "{what}: bias gradients as row sums: {kernels:#?}");
            }
        }
    }
}

/// Embedding lookups that only an elementwise kernel reads run inside it
/// (`fuse::fold_embeddings`), and a cast of an elementwise result is stored by its kernel
/// (`fuse::fuse_casts`): a transformer's token plus position embeddings, scaled and cast to
/// f16 (or kept f32), are one kernel; bad indices (negative, fractional, past the table) give
/// the lookup's NaN rows; a lookup that is also an output keeps its kernel; an f16 chain cast
/// back to f32 is one kernel too.
#[test]
fn embedding_lookups_and_casts_run_inside_elementwise_kernels() {
    use kiln::DType;
    let Some(dev) = device() else { return };
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    let (b, l, v, e) = (3, 5, 7, 13);
    let mut dtypes = vec![DType::F32];
    if half {
        dtypes.push(DType::F16);
    }
    let mut ids: Vec<f32> = (0..b * l).map(|k| (k * 3 % v) as f32).collect();
    (ids[1], ids[7], ids[12]) = (-1.0, 2.5, v as f32);
    let feeds = vec![
        ("ids".to_string(), Tensor::new([b, l], ids).unwrap()),
        (
            "positions".to_string(),
            Tensor::new([l], (0..l).map(|p| p as f32).collect()).unwrap(),
        ),
    ];
    for &dtype in &dtypes {
        for shared in [false, true] {
            let what = format!("{dtype} lookups, shared {shared}");
            let g = Graph::new();
            let tok = g.param_init("fold.tok", rand(&[v, e], 5));
            let pos = g.param_init("fold.pos", rand(&[l, e], 6));
            let te = g.embedding(g.input("ids", [b, l]), tok).unwrap();
            let pe = g.embedding(g.input("positions", [l]), pos).unwrap();
            let x = g.mul_scalar(g.add(te, pe).unwrap(), 0.5).unwrap();
            let y = g.cast(x, dtype).unwrap();
            let outs = if shared { vec![y, te] } else { vec![y] };
            let tol = match dtype {
                DType::F32 => TOL_ELEMENTWISE,
                DType::F16 => kiln::ops::TOL_F16,
            };
            let plan = common::check_plan(&dev, &what, &g, &outs, &feeds, tol);
            let kernels = plan.kernels();
            let count = |op: &str| common::count_op(&kernels, op);
            assert_eq!(count("embedding"), shared as usize, "{what}: {kernels:#?}");
            assert_eq!(count("cast") + count("add"), 0, "{what}: {kernels:#?}");
            assert_eq!(plan.info().dispatches, 1 + shared as usize, "{what}");
        }
    }
    if half {
        // f16 activations cast back to f32 by their own kernel
        let g = Graph::new();
        let h = g.input_as("h", [b, l, e], DType::F16);
        let y = g.mul_scalar(g.relu(h).unwrap(), 2.0).unwrap();
        let y = g.cast(y, DType::F32).unwrap();
        let f = vec![("h".to_string(), rand(&[b, l, e], 7))];
        let plan = common::check_plan(&dev, "f16 to f32", &g, &[y], &f, kiln::ops::TOL_F16);
        assert_eq!(plan.info().dispatches, 1, "{:#?}", plan.kernels());
    }
}

/// A product that other nodes read besides the elementwise program after it (a feed-forward
/// layer's pre-activation, which GELU's gradient reads; a product asked for as an output) is
/// stored by the kernel running the program as its epilogue (`MatMulEpilogue::keep`): one
/// kernel for `gelu(x W^T + b)` then dropout, the forward through a reshape of `(B, L, E)` as
/// a transformer's, on the tiled kernel (scalar and vec4 stores) and the GEMV (one row), f32
/// and f16; the result, the pre-activation and the gradients against the CPU reference,
/// outputs poisoned with NaN.
#[test]
fn products_keep_what_other_nodes_read() {
    let Some(dev) = device() else { return };
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    let f16 = kiln::DType::F16;
    for dtype in [kiln::DType::F32, f16] {
        if dtype == f16 && !half {
            eprintln!("NOTICE: adapter without SHADER_F16; f16 kept products skipped");
            continue;
        }
        let tol = match dtype {
            kiln::DType::F32 => kiln::ops::TOL_REDUCTION,
            _ => kiln::ops::TOL_F16,
        };
        for (b, l, e, h) in [
            (2usize, 3usize, 5usize, 7usize),
            (2, 4, 8, 16),
            (1, 1, 6, 9),
        ] {
            let what = format!("({b}, {l}, {e}) -> {h}, {dtype}");
            let g = Graph::new();
            let x = g.input_as("x0", [b, l, e], dtype);
            let w = g.input_as("x1", [h, e], dtype);
            let bias = g.input_as("x2", [h], dtype);
            let s = g.input("seed", [1]);
            let mut f = feeds(&[&[b, l, e], &[h, e], &[h]]);
            f.push(("seed".into(), Tensor::new([1], vec![5.0]).unwrap()));
            let rows = g.reshape(x, &[(b * l) as isize, e as isize]).unwrap();
            let bias_cols = Some((bias, kiln::ops::matmul::Bias::Cols));
            let u = g
                .matmul_fused(rows, w, false, true, bias_cols, false)
                .unwrap();
            let u3 = g.reshape(u, &[b as isize, l as isize, h as isize]).unwrap();
            let y = g.dropout(g.gelu(u3).unwrap(), 0.25, s, 3).unwrap();
            let as_f32 = |v| g.cast(v, kiln::DType::F32).unwrap();
            // a random projection (a square would square f16's rounding into the gradients)
            let r = g.constant(rand(&[b, l, h], 9));
            let loss = g.sum_all(g.mul(as_f32(y), r).unwrap()).unwrap();
            let grads = g.grad(loss, &[x, w, bias]).unwrap();
            let mut outs = vec![as_f32(y)];
            outs.extend(grads.iter().map(|&d| as_f32(d)));
            let plan = common::check_plan(&dev, &what, &g, &outs, &f, tol);
            let k = plan.kernels();
            let kept = k
                .iter()
                .filter(|s| s.contains("epilogue[keep,gelu,dropout"));
            assert_eq!(kept.count(), 1, "{what}: {k:#?}");
            // no kernel of its own for the activation (the gradient's epilogue reads the
            // kept pre-activation)
            let gelu = |s: &&&str| s.split(['[', ',', '@']).any(|op| op == "gelu");
            let alone = k.iter().filter(|s| s.contains("fused")).filter(gelu);
            assert_eq!(alone.count(), 0, "{what}: {k:#?}");
            // a program reading the product directly and through reshapes too: the product
            // keeps its own kernel (binding its buffer twice, once to write it, is invalid;
            // found by tests/random_graphs.rs)
            let back = g.reshape(
                g.reshape(u, &[-1]).unwrap(),
                &[(b * l) as isize, h as isize],
            );
            let twice = g.mul(g.gelu(u).unwrap(), back.unwrap()).unwrap();
            common::check_plan(&dev, &what, &g, &[as_f32(twice), as_f32(u)], &f, tol);
            // the product and its activation both asked for: one kernel stores both
            let both = [as_f32(u), as_f32(g.gelu(u).unwrap())];
            let plan = common::check_plan(&dev, &what, &g, &both, &f, tol);
            let k = plan.kernels();
            let products = k.iter().filter(|s| s.contains("matmul"));
            assert_eq!(products.count(), 1, "{what}: {k:#?}");
            assert!(
                k.iter().any(|s| s.contains("epilogue[keep,")),
                "{what}: {k:#?}"
            );
        }
    }
}
