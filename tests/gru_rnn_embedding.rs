//! GRU and vanilla tanh RNN layers (fused per-step kernels, fused backward through time, recurrent
//! weight and bias gradients) and the embedding lookup: GPU against the CPU reference (forward
//! and every gradient, h0 included), gradient checks against central differences, masks, both
//! directions, hand-computed steps, NaN rows for bad indices, shape errors.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::{Device, Graph, NodeId, Tensor};

const TOL: (f64, f64) = (1e-5, 1e-4);

#[derive(Clone, Copy, Debug)]
enum Cell {
    Gru,
    Rnn,
}

type Feeds = Vec<(&'static str, Tensor)>;

/// A GRU or RNN layer over (T, B, I) with hidden H; returns the graph, a scalar loss over both
/// outputs and the nodes to differentiate, fed as inputs so central differences can perturb them.
fn layer_graph(
    cell: Cell,
    t: usize,
    b: usize,
    i: usize,
    h: usize,
    reverse: bool,
    with_lengths: bool,
) -> (Graph, NodeId, Vec<(&'static str, NodeId)>, Feeds) {
    let gh = match cell {
        Cell::Gru => 3 * h,
        Cell::Rnn => h,
    };
    let g = Graph::new();
    let x = g.input("x", [t, b, i]);
    let w_ih = g.input("w_ih", [gh, i]);
    let w_hh = g.input("w_hh", [gh, h]);
    let b_ih = g.input("b_ih", [gh]);
    let b_hh = g.input("b_hh", [gh]);
    let h0 = g.input("h0", [b, h]);
    let lengths = with_lengths.then(|| g.input("len", [b]));
    let (hs, hn) = match cell {
        Cell::Gru => g.gru_layer(x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse),
        Cell::Rnn => g.rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse),
    }
    .unwrap();
    assert_eq!(g.shape(hs).dims(), [t, b, h]);
    assert_eq!(g.shape(hn).dims(), [b, h]);
    let l1 = random_projection(&g, hs, 1);
    let l2 = random_projection(&g, hn, 2);
    let loss = g.add(l1, l2).unwrap();
    let wrt = vec![
        ("x", x),
        ("w_ih", w_ih),
        ("w_hh", w_hh),
        ("b_ih", b_ih),
        ("b_hh", b_hh),
        ("h0", h0),
    ];
    let mut feeds = vec![
        ("x", rand(&[t, b, i], 10)),
        ("w_ih", Tensor::rand_uniform(vec![gh, i], -0.5, 0.5, 11)),
        ("w_hh", Tensor::rand_uniform(vec![gh, h], -0.5, 0.5, 12)),
        ("b_ih", rand(&[gh], 13)),
        ("b_hh", rand(&[gh], 14)),
        ("h0", rand(&[b, h], 15)),
    ];
    if with_lengths {
        // one full sequence, one short one, one of length 1 (cycled over the batch)
        let l: Vec<f32> = (0..b)
            .map(|k| [t, (t / 2).max(1), 1][k % 3] as f32)
            .collect();
        feeds.push(("len", Tensor::new([b], l).unwrap()));
    }
    (g, loss, wrt, feeds)
}

const SHAPES: &[(usize, usize, usize, usize, bool, bool)] = &[
    (1, 1, 1, 1, false, false),
    (5, 3, 4, 7, false, false),
    (4, 2, 3, 5, true, false),
    (6, 3, 2, 3, false, true),
    (7, 5, 3, 2, true, true),
    (3, 5, 3, 53, false, false), // B * H = 265: more than one 256-thread workgroup per step
    (2, 3, 2, 37, true, true),   // 3H * (H + 1) > 256 weight-gradient entries, masked, reverse
    (2, 6, 2, 256, true, true),  // H = 256: whole-sequence with WebGPU's default limits
];

fn check_layer(cell: Cell) {
    let limit = common::sequence_limit();
    let edges = [
        (2, 8, 2, limit, false, true), // the largest whole-sequence kernels (if 2 groups fill it)
        (2, 2, 2, limit + 4, true, true), // beyond them: per-step kernels both ways
    ];
    for &(t, b, i, h, reverse, lengths) in SHAPES.iter().chain(&edges) {
        let what = format!("{cell:?} T={t} B={b} I={i} H={h} reverse={reverse} lengths={lengths}");
        let (g, loss, wrt, feeds) = layer_graph(cell, t, b, i, h, reverse, lengths);
        let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, v)| (*n, v)).collect();
        // f32 sums over hundreds of cells per step: the absolute error grows with H
        let tol = if h > 256 { (1e-4, TOL.1) } else { TOL };
        check_gpu_vs_cpu(&what, &g, &[loss], &refs, tol);
        gradcheck(
            &what,
            &g,
            loss,
            &wrt,
            &refs,
            if h > 10 { 6 } else { 12 },
            tol,
        );
    }
}

#[test]
fn gru_forward_and_gradients_match_the_reference() {
    check_layer(Cell::Gru);
}

#[test]
fn rnn_forward_and_gradients_match_the_reference() {
    check_layer(Cell::Rnn);
}

/// Every output of the layer itself (all h and final h), not only a loss, GPU against CPU.
#[test]
fn layer_outputs_match_the_reference() {
    for cell in [Cell::Gru, Cell::Rnn] {
        for &(t, b, i, h, reverse, lengths) in
            &[(4, 3, 2, 5, false, true), (4, 3, 2, 5, true, true)]
        {
            let gh = match cell {
                Cell::Gru => 3 * h,
                Cell::Rnn => h,
            };
            let g = Graph::new();
            let x = g.input("x", [t, b, i]);
            let c =
                |s: &[usize], seed| g.constant(Tensor::rand_uniform(s.to_vec(), -0.5, 0.5, seed));
            let (w_ih, w_hh, b_ih, b_hh, h0) = (
                c(&[gh, i], 1),
                c(&[gh, h], 2),
                c(&[gh], 3),
                c(&[gh], 4),
                c(&[b, h], 5),
            );
            let len = lengths.then(|| g.constant(Tensor::new([b], vec![4.0, 2.0, 1.0]).unwrap()));
            let (hs, hn) = match cell {
                Cell::Gru => g.gru_layer(x, w_ih, w_hh, b_ih, b_hh, h0, len, reverse),
                Cell::Rnn => g.rnn_layer(x, w_ih, w_hh, b_ih, b_hh, h0, len, reverse),
            }
            .unwrap();
            let xv = rand(&[t, b, i], 6);
            check_gpu_vs_cpu(
                &format!("{cell:?} outputs reverse={reverse}"),
                &g,
                &[hs, hn],
                &[("x", &xv)],
                TOL,
            );
            // padding carries the state: the final h of the sequence of length 1 is h at its
            // only real step
            let out = Device::cpu()
                .compile(&g, &[hs, hn])
                .unwrap()
                .run(&[("x", &xv)])
                .unwrap();
            // (time 0 is its only real step, in either direction)
            for j in 0..h {
                assert_eq!(out[1].data()[2 * h + j], out[0].data()[2 * h + j]);
            }
        }
    }
}

#[test]
fn gru_matches_hand_computed_step() {
    // T = 1, B = 1, I = 1, H = 1
    let g = Graph::new();
    let x = g.input("x", [1, 1, 1]);
    let c = |v: Vec<f32>, s: &[usize]| g.constant(Tensor::new(s.to_vec(), v).unwrap());
    let (wi, wh) = ([0.1, 0.2, 0.3], [0.5, -0.5, 0.25]);
    let (bi, bh) = ([0.05, -0.1, 0.15], [-0.2, 0.3, 0.4]);
    let w_ih = c(wi.to_vec(), &[3, 1]);
    let w_hh = c(wh.to_vec(), &[3, 1]);
    let b_ih = c(bi.to_vec(), &[3]);
    let b_hh = c(bh.to_vec(), &[3]);
    let h0 = c(vec![0.3], &[1, 1]);
    let (hs, hn) = g
        .gru_layer(x, w_ih, w_hh, b_ih, b_hh, h0, None, false)
        .unwrap();
    let xv = Tensor::full([1, 1, 1], 2.0);
    let mut plan = Device::cpu().compile(&g, &[hs, hn]).unwrap();
    let out = plan.run(&[("x", &xv)]).unwrap();
    let s = |v: f64| 1.0 / (1.0 + (-v).exp());
    let (x, h) = (2.0f64, 0.3f64);
    let r = s(wi[0] as f64 * x + bi[0] as f64 + wh[0] as f64 * h + bh[0] as f64);
    let z = s(wi[1] as f64 * x + bi[1] as f64 + wh[1] as f64 * h + bh[1] as f64);
    let n = (wi[2] as f64 * x + bi[2] as f64 + r * (wh[2] as f64 * h + bh[2] as f64)).tanh();
    let want = (1.0 - z) * n + z * h;
    assert!(
        (out[0].data()[0] as f64 - want).abs() < 1e-6,
        "{out:?} vs {want}"
    );
    assert!((out[1].data()[0] as f64 - want).abs() < 1e-6);
    check_gpu_vs_cpu("gru hand step", &g, &[hs, hn], &[("x", &xv)], TOL);
}

#[test]
fn rnn_matches_hand_computed_steps() {
    // T = 2, B = 1, I = 1, H = 1
    let g = Graph::new();
    let x = g.input("x", [2, 1, 1]);
    let c = |v: f32, s: &[usize]| g.constant(Tensor::full(s.to_vec(), v));
    let (hs, hn) = g
        .rnn_layer(
            x,
            c(0.7, &[1, 1]),
            c(-0.4, &[1, 1]),
            c(0.1, &[1]),
            c(0.2, &[1]),
            c(0.5, &[1, 1]),
            None,
            false,
        )
        .unwrap();
    let xv = Tensor::new([2, 1, 1], vec![1.5, -0.5]).unwrap();
    let out = Device::cpu()
        .compile(&g, &[hs, hn])
        .unwrap()
        .run(&[("x", &xv)])
        .unwrap();
    let h1 = (0.7f64 * 1.5 + 0.1 - 0.4 * 0.5 + 0.2).tanh();
    let h2 = (0.7f64 * -0.5 + 0.1 - 0.4 * h1 + 0.2).tanh();
    assert!((out[0].data()[0] as f64 - h1).abs() < 1e-6);
    assert!((out[0].data()[1] as f64 - h2).abs() < 1e-6);
    assert!((out[1].data()[0] as f64 - h2).abs() < 1e-6);
    check_gpu_vs_cpu("rnn hand steps", &g, &[hs, hn], &[("x", &xv)], TOL);
}

/// An embedding graph: indices `idx` (fed), weight `w` (fed), loss = random projection.
fn embedding_graph(idx_shape: &[usize], v: usize, e: usize) -> (Graph, NodeId, NodeId, NodeId) {
    let g = Graph::new();
    let idx = g.input("idx", idx_shape.to_vec());
    let w = g.input("w", [v, e]);
    let y = g.embedding(idx, w).unwrap();
    let mut want = idx_shape.to_vec();
    want.push(e);
    assert_eq!(g.shape(y).dims(), want.as_slice());
    let loss = random_projection(&g, y, 7);
    (g, y, w, loss)
}

#[test]
fn embedding_matches_the_reference_with_repeated_indices() {
    for &(ref shape, v, e) in &[
        (vec![1usize], 1usize, 1usize),
        (vec![3, 4], 5, 3),     // 12 indices into 5 rows: repeats
        (vec![2, 3, 5], 7, 13), // rank 3, primes
        (vec![40, 9], 11, 29),  // more than 256 threads both ways
        (vec![600], 7, 300),    // more than a chunk of indices, more than 256 columns
    ] {
        let what = format!("embedding {shape:?} V={v} E={e}");
        let (g, y, w, loss) = embedding_graph(shape, v, e);
        let n: usize = shape.iter().product();
        // indices cycle through the rows (repeats whenever n > v), row v - 1 never used when n < v
        let idx = Tensor::new(
            shape.clone(),
            (0..n).map(|k| ((k * 3 + 1) % v) as f32).collect(),
        )
        .unwrap();
        let wv = rand(&[v, e], 8);
        let feeds = [("idx", &idx), ("w", &wv)];
        check_gpu_vs_cpu(&what, &g, &[y, loss], &feeds, TOL);
        gradcheck(&what, &g, loss, &[("w", w)], &feeds, 24, TOL);
        // the CPU forward is an exact copy of the rows
        let out = Device::cpu()
            .compile(&g, &[y])
            .unwrap()
            .run(&feeds)
            .unwrap();
        for k in 0..n {
            let r = idx.data()[k] as usize;
            assert_eq!(
                &out[0].data()[k * e..(k + 1) * e],
                &wv.data()[r * e..(r + 1) * e]
            );
        }
    }
}

#[test]
fn embedding_gradient_sums_repeated_rows() {
    // indices [1, 1, 0, 1] into a 3-row table with dy = 1 everywhere: dW rows 1, 3, 0 (counts)
    let g = Graph::new();
    let idx = g.input("idx", [4]);
    let w = g.input("w", [3, 2]);
    let y = g.embedding(idx, w).unwrap();
    let loss = g.sum_all(y).unwrap();
    let dw = g.grad(loss, &[w]).unwrap()[0];
    let idxv = Tensor::new([4], vec![1.0, 1.0, 0.0, 1.0]).unwrap();
    let wv = rand(&[3, 2], 3);
    let feeds = [("idx", &idxv), ("w", &wv)];
    let out = Device::cpu()
        .compile(&g, &[dw])
        .unwrap()
        .run(&feeds)
        .unwrap();
    assert_eq!(out[0].data(), &[1.0, 1.0, 3.0, 3.0, 0.0, 0.0]);
    check_gpu_vs_cpu("embedding repeated gradient", &g, &[dw], &feeds, TOL);
}

/// A lookup broadcast over a batch (a transformer's positions `[L]` added to every sequence's
/// tokens `[B, L, E]`): the table's gradient kernel adds the batch's blocks itself
/// (`EmbeddingBackward::repeat`), no sum kernel before it; both tables' gradients as the CPU
/// reference's, at batches of 1, 3 and more than a workgroup of rows, a position table longer
/// than the sequence, and repeated positions. A batch sum also requested keeps its kernel.
#[test]
fn broadcast_lookup_gradients_sum_the_batch_in_the_gather() {
    let Some(dev) = common::gpu() else { return };
    for &(b, l, v, e, repeats) in &[
        (1usize, 5usize, 7usize, 3usize, false),
        (3, 4, 6, 5, false),
        (300, 2, 2, 3, false),
        (2, 6, 4, 9, true),
    ] {
        let what = format!("positions B={b} L={l} V={v} E={e}");
        let g = Graph::new();
        let ids = g.input("ids", [b, l]);
        let pos = g.input("pos", [l]);
        let tok = g.input("tok", [11, e]);
        let table = g.input("table", [v, e]);
        let y = g
            .add(
                g.embedding(ids, tok).unwrap(),
                g.embedding(pos, table).unwrap(),
            )
            .unwrap();
        let loss = random_projection(&g, y, 9);
        let grads = g.grad(loss, &[tok, table]).unwrap();
        let positions: Vec<f32> = (0..l)
            .map(|k| if repeats { (k % 3) as f32 } else { k as f32 })
            .collect();
        let feeds = vec![
            (
                "ids".to_string(),
                Tensor::new([b, l], (0..b * l).map(|k| (k * 7 % 11) as f32).collect()).unwrap(),
            ),
            ("pos".to_string(), Tensor::new([l], positions).unwrap()),
            ("tok".to_string(), rand(&[11, e], 10)),
            ("table".to_string(), rand(&[v, e], 11)),
        ];
        let plan = common::check_plan(&dev, &what, &g, &grads, &feeds, TOL);
        let kernels = plan.kernels();
        assert_eq!(common::count_op(&kernels, "sum"), 0, "{what}: {kernels:#?}");
        assert_eq!(
            common::count_op(&kernels, "embedding_backward"),
            2,
            "{what}: {kernels:#?}"
        );
    }
}

#[test]
fn embedding_bad_index_gives_a_nan_row() {
    let (v, e) = (4, 3);
    let g = Graph::new();
    let idx = g.input("idx", [6]);
    let w = g.input("w", [v, e]);
    let y = g.embedding(idx, w).unwrap();
    // good, non-integer, negative, == V, huge, good
    let idxv = Tensor::new([6], vec![2.0, 1.5, -1.0, 4.0, 1e9, 3.0]).unwrap();
    let wv = rand(&[v, e], 4);
    let feeds = [("idx", &idxv), ("w", &wv)];
    let check = |out: &Tensor, who: &str| {
        for k in 0..6 {
            let row = &out.data()[k * e..(k + 1) * e];
            if [0, 5].contains(&k) {
                let r = idxv.data()[k] as usize;
                assert_eq!(row, &wv.data()[r * e..(r + 1) * e], "{who}: row {k}");
            } else {
                assert!(row.iter().all(|x| x.is_nan()), "{who}: row {k} is {row:?}");
            }
        }
    };
    let cpu = Device::cpu()
        .compile(&g, &[y])
        .unwrap()
        .run(&feeds)
        .unwrap();
    check(&cpu[0], "cpu");
    if let Some(dev) = common::gpu() {
        let mut plan = dev.compile(&g, &[y]).unwrap();
        let out = plan.run(&feeds).unwrap();
        check(&out[0], "gpu");
    }
    // a bad index contributes to no row of the gradient
    let loss = g.sum_all(y).unwrap();
    let dw = g.grad(loss, &[w]).unwrap()[0];
    let out = Device::cpu()
        .compile(&g, &[dw])
        .unwrap()
        .run(&feeds)
        .unwrap();
    assert_eq!(
        out[0].data(),
        &[0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1., 1.]
    );
    check_gpu_vs_cpu("embedding bad-index gradient", &g, &[dw], &feeds, TOL);
}

fn err_text<T: std::fmt::Debug>(r: kiln::Result<T>) -> String {
    r.expect_err("a shape error").to_string()
}

#[test]
fn shape_errors_name_the_op_and_shapes() {
    let g = Graph::new();
    let x = g.input("x", [4, 2, 3]);
    let w_ih = g.input("w_ih", [15, 3]); // 3H with H = 5
    let w_hh = g.input("w_hh", [15, 5]);
    let b = g.input("b", [15]);
    let h0 = g.input("h0", [2, 5]);
    let bad_wih = g.input("bad_wih", [14, 3]);
    let bad_whh = g.input("bad_whh", [15, 4]);
    let bad_b = g.input("bad_b", [5]);
    let bad_h0 = g.input("bad_h0", [3, 5]);
    let bad_len = g.input("bad_len", [3]);
    let ok = g.gru_layer(x, w_ih, w_hh, b, b, h0, None, false);
    assert!(ok.is_ok());

    let e = err_text(g.gru_layer(x, bad_wih, w_hh, b, b, h0, None, false));
    assert!(e.contains("gru") && e.contains("[14, 3]"), "{e}");
    let e = err_text(g.gru_layer(x, w_ih, bad_whh, b, b, h0, None, false));
    assert!(e.contains("gru") && e.contains("[15, 4]"), "{e}");
    let e = err_text(g.gru_layer(x, w_ih, w_hh, bad_b, b, h0, None, false));
    assert!(e.contains("gru") && e.contains("[5]"), "{e}");
    let e = err_text(g.gru_layer(x, w_ih, w_hh, b, bad_b, h0, None, false));
    assert!(e.contains("gru") && e.contains("[5]"), "{e}");
    let e = err_text(g.gru_layer(x, w_ih, w_hh, b, b, bad_h0, None, false));
    assert!(e.contains("gru") && e.contains("[3, 5]"), "{e}");
    let e = err_text(g.gru_layer(x, w_ih, w_hh, b, b, h0, Some(bad_len), false));
    assert!(e.contains("gru") && e.contains("[3]"), "{e}");
    let e = err_text(g.gru_layer(h0, w_ih, w_hh, b, b, h0, None, false));
    assert!(e.contains("gru") && e.contains("[2, 5]"), "{e}");

    // RNN: H = 5 means w_ih [5, 3]
    let r_wih = g.input("r_wih", [5, 3]);
    let r_whh = g.input("r_whh", [5, 5]);
    let r_b = g.input("r_b", [5]);
    assert!(g
        .rnn_layer(x, r_wih, r_whh, r_b, r_b, h0, None, true)
        .is_ok());
    let e = err_text(g.rnn_layer(x, r_wih, w_hh, r_b, r_b, h0, None, false));
    assert!(e.contains("rnn") && e.contains("[15, 5]"), "{e}");
    let e = err_text(g.rnn_layer(x, w_ih, r_whh, r_b, r_b, h0, None, false));
    assert!(e.contains("rnn") && e.contains("[15, 3]"), "{e}");
    let e = err_text(g.rnn_layer(x, r_wih, r_whh, r_b, b, h0, None, false));
    assert!(e.contains("rnn") && e.contains("[15]"), "{e}");

    // embedding: the table must be (V, E)
    let idx = g.input("idx", [2, 3]);
    let e = err_text(g.embedding(idx, r_b));
    assert!(
        e.contains("embedding") && e.contains("[5]") && e.contains("[2, 3]"),
        "{e}"
    );
    assert!(g.embedding(idx, w_hh).is_ok());
}

/// Where the loss reads only the final h, or every h, of a GRU's or an RNN's state, the
/// backward kernel reads that gradient as its window of the packed state's: no pad kernels;
/// and the recurrent weight's gradient reads its gate gradients and the states each step
/// started from out of the backward's packed gradient: no concat kernels. The loss and every
/// gradient against the CPU reference (outputs poisoned with NaN), both directions, with and
/// without lengths, whole-sequence and per-step kernels.
#[test]
fn gradients_of_part_of_the_state_need_no_pads() {
    let Some(dev) = common::gpu() else { return };
    let limit = common::sequence_limit();
    for cell in [Cell::Gru, Cell::Rnn] {
        for &(t, b, i, h, reverse, lengths) in &[
            (5usize, 3usize, 4usize, 7usize, false, false),
            (4, 2, 3, 5, true, true),
            (1, 1, 1, 1, false, false),
            (3, 2, 2, limit + 4, false, true),
        ] {
            for last in [true, false] {
                let what = format!(
                    "{cell:?} T={t} B={b} H={h} reverse={reverse} lengths={lengths}, last {last}"
                );
                let (g, _, wrt, feeds) = layer_graph(cell, t, b, i, h, reverse, lengths);
                let w: Vec<NodeId> = wrt.iter().map(|(_, id)| *id).collect();
                // a second layer over the same inputs (the first reads "len")
                let len = lengths.then(|| g.input("len2", [b]));
                let (hs, hn) = match cell {
                    Cell::Gru => g.gru_layer(w[0], w[1], w[2], w[3], w[4], w[5], len, reverse),
                    Cell::Rnn => g.rnn_layer(w[0], w[1], w[2], w[3], w[4], w[5], len, reverse),
                }
                .unwrap();
                let loss = random_projection(&g, if last { hn } else { hs }, 7);
                let mut outs = vec![loss];
                outs.extend(g.grad(loss, &w).unwrap());
                let f = common::owned_feeds(&feeds, "len", "len2");
                let tol = if h > 256 { (1e-4, TOL.1) } else { TOL };
                let plan = common::check_plan(&dev, &what, &g, &outs, &f, tol);
                let kernels = plan.kernels();
                assert_eq!(common::count_op(&kernels, "pad"), 0, "{what}: {kernels:#?}");
                assert_eq!(
                    common::count_op(&kernels, "concat"),
                    0,
                    "{what}: {kernels:#?}"
                );
            }
        }
    }
}

/// Token ids for `n` lookups into `v` rows: a quarter of them row 7 (runs of one row longer
/// than a workgroup's chunk of indices), the rest spread over the table, with invalid ones
/// (negative, fractional, `v`, NaN) that add to no row.
fn skewed_ids(n: usize, v: usize, seed: u64) -> Vec<f32> {
    let spread = Tensor::rand_uniform([n], 0.0, v as f32, seed);
    (0..n)
        .map(|k| match k % 97 {
            13 => -1.0,
            29 => 2.5,
            41 => v as f32,
            53 => f32::NAN,
            _ if k % 4 == 0 => 7.0,
            _ => spread.data()[k].floor(),
        })
        .collect()
}

/// The table's gradient as the kernels must sum it: each row's `dy` rows added in f32, in
/// index order (each index's `repeat` blocks in order), from zero.
fn in_order_sums(ids: &[f32], dy: &[f32], v: usize, e: usize, repeat: usize) -> Vec<f32> {
    let n = ids.len();
    let mut dw = vec![0f32; v * e];
    for (i, &x) in ids.iter().enumerate() {
        if !(x >= 0.0 && x < v as f32 && x.fract() == 0.0) {
            continue;
        }
        let r = x as usize;
        for b in 0..repeat {
            for c in 0..e {
                dw[r * e + c] += dy[(b * n + i) * e + c];
            }
        }
    }
    dw
}

/// Large tables (a language model's vocabulary: `ops::embedding::sorts_rows`) list each row's
/// lookups first (`embedding_rows`, a stable counting sort in one workgroup) and their gradient
/// reads that list: the same f32 sums in the same order as the scan small tables take, checked
/// bit for bit against in-order sums (an unstable list or a lost lookup changes them), at widths
/// of 1 (256 rows per workgroup), 100 (2, threads left over), 64 (4) and 300 (two workgroups per
/// row), lookups not a multiple of 256, runs of one row across chunks and invalid ids; plus a
/// small table that keeps the scan, the same sums. Outputs poisoned with NaN first.
#[test]
fn large_table_gradients_list_each_rows_lookups_first() {
    let Some(dev) = common::gpu() else { return };
    for &(v, e, ref shape, sorted) in &[
        (5000usize, 64usize, vec![1000usize], true),
        (4099, 1, vec![2000], true),
        (4111, 100, vec![10, 150], true),
        (2100, 300, vec![2100], true),
        (40, 5, vec![700], false),
    ] {
        let what = format!("table gradient V={v} E={e} ids {shape:?}");
        let n: usize = shape.iter().product();
        assert_eq!(kiln::ops::embedding::sorts_rows(v, e, n), sorted, "{what}");
        let g = Graph::new();
        let idx = g.input("idx", shape.clone());
        let w = g.input("w", [v, e]);
        let mut ys = shape.clone();
        ys.push(e);
        // dy = r exactly (the gradient of sum(y * r)), of many magnitudes so that the order of
        // the sums shows in their last bits
        let r = Tensor::new(
            ys.clone(),
            rand(&[n * e], 5)
                .data()
                .iter()
                .enumerate()
                .map(|(k, x)| x * 10f32.powi((k % 3) as i32 - 1))
                .collect(),
        )
        .unwrap();
        let y = g.embedding(idx, w).unwrap();
        let loss = g.sum_all(g.mul(y, g.constant(r.clone())).unwrap()).unwrap();
        let dw = g.grad(loss, &[w]).unwrap()[0];
        let ids = skewed_ids(n, v, 6);
        let feeds = vec![
            (
                "idx".to_string(),
                Tensor::new(shape.clone(), ids.clone()).unwrap(),
            ),
            ("w".to_string(), Tensor::zeros([v, e])),
        ];
        let mut plan = common::check_plan(&dev, &what, &g, &[dw], &feeds, TOL);
        let kernels = plan.kernels();
        assert_eq!(
            common::count_op(&kernels, "embedding_rows"),
            usize::from(sorted),
            "{what}: {kernels:#?}"
        );
        plan.poison(f32::NAN);
        let got = plan.run(&common::refs(&feeds)).unwrap();
        let want = in_order_sums(&ids, r.data(), v, e, 1);
        let diff = got[0]
            .data()
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(diff, None, "{what}: first element summed differently");
    }
}

/// Lists of large tables' rows combine with the plan's other forms of the gradient: two tables
/// of one size looked up by the same ids share one list; a large position table broadcast over
/// a batch (`EmbeddingBackward::repeat`) reads its list and sums the batch; an f16 table's
/// gradient (f16 `dy` and result) reads the same f32 list. All against the CPU reference.
#[test]
fn large_table_lists_are_shared_and_work_with_batches_and_f16() {
    let Some(dev) = common::gpu() else { return };
    let (v, e, n) = (4500usize, 8usize, 1200usize);
    let ids = Tensor::new([n], skewed_ids(n, v, 7)).unwrap();

    // two tables, one list
    let g = Graph::new();
    let idx = g.input("idx", [n]);
    let (a, b) = (g.input("a", [v, e]), g.input("b", [v, e]));
    let y = g
        .mul(g.embedding(idx, a).unwrap(), g.embedding(idx, b).unwrap())
        .unwrap();
    let loss = random_projection(&g, y, 8);
    let grads = g.grad(loss, &[a, b]).unwrap();
    let feeds = vec![
        ("idx".to_string(), ids.clone()),
        ("a".to_string(), rand(&[v, e], 9)),
        ("b".to_string(), rand(&[v, e], 10)),
    ];
    let plan = common::check_plan(&dev, "two tables", &g, &grads, &feeds, TOL);
    let kernels = plan.kernels();
    assert_eq!(
        common::count_op(&kernels, "embedding_rows"),
        1,
        "{kernels:#?}"
    );
    assert_eq!(
        common::count_op(&kernels, "embedding_backward"),
        2,
        "{kernels:#?}"
    );

    // positions broadcast over a batch of 3
    let g = Graph::new();
    let pos = g.input("pos", [n]);
    let table = g.input("table", [v, e]);
    let x = g.input("x", [3, n, e]);
    let y = g.add(x, g.embedding(pos, table).unwrap()).unwrap();
    let loss = random_projection(&g, y, 11);
    let dw = g.grad(loss, &[table]).unwrap()[0];
    let feeds = vec![
        ("pos".to_string(), ids.clone()),
        ("table".to_string(), rand(&[v, e], 12)),
        ("x".to_string(), rand(&[3, n, e], 13)),
    ];
    let plan = common::check_plan(&dev, "broadcast positions", &g, &[dw], &feeds, TOL);
    let kernels = plan.kernels();
    assert_eq!(
        common::count_op(&kernels, "embedding_rows"),
        1,
        "{kernels:#?}"
    );
    assert_eq!(common::count_op(&kernels, "sum"), 0, "{kernels:#?}");

    // an f16 table
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    let g = Graph::new();
    let idx = g.input("idx", [n]);
    let w = g.input("w", [v, e]);
    let y = g
        .embedding(idx, g.cast(w, kiln::DType::F16).unwrap())
        .unwrap();
    let loss = random_projection(&g, g.cast(y, kiln::DType::F32).unwrap(), 14);
    let dw = g.grad(loss, &[w]).unwrap()[0];
    let feeds = vec![
        ("idx".to_string(), ids),
        ("w".to_string(), rand(&[v, e], 15)),
    ];
    let plan = common::check_plan(&dev, "f16 table", &g, &[dw], &feeds, kiln::ops::TOL_F16);
    let kernels = plan.kernels();
    assert_eq!(
        common::count_op(&kernels, "embedding_rows"),
        1,
        "{kernels:#?}"
    );
}

/// torch's `padding_idx`: the lookup still reads the padding row, but its indices add nothing
/// to the table's gradient (the other rows' sums as without), on both backends and for a
/// large table whose gradient lists each row's occurrences first; `nn::Embedding` starts that
/// row at zeros and it stays so through training; a negative index counts from the end; one
/// out of range is an error.
#[test]
fn embedding_padding_idx_as_torch() {
    use kiln::nn::{Embedding, Init, Layer, Optimizer, TrainStep};
    for (v, e, n, pad) in [(5usize, 3usize, 8usize, 0i64), (5000, 4, 300, -2)] {
        let g = Graph::new();
        let idx = g.input("idx", [n]);
        let w = g.input("w", [v, e]);
        let y = g.embedding_padded(idx, w, pad).unwrap();
        let loss = random_projection(&g, y, 4);
        let dw = g.grad(loss, &[w]).unwrap()[0];
        let p = if pad < 0 {
            (v as i64 + pad) as usize
        } else {
            pad as usize
        };
        // the padding row among the indices, repeated
        let ids: Vec<f32> = (0..n)
            .map(|i| if i % 3 == 0 { p } else { (i * 7 + 1) % v } as f32)
            .collect();
        let ids = Tensor::new([n], ids).unwrap();
        let wv = rand(&[v, e], 6);
        let feeds = [("idx", &ids), ("w", &wv)];
        let what = format!("{v} rows, padding {pad}");
        check_gpu_vs_cpu(&what, &g, &[y, dw], &feeds, kiln::ops::TOL_REDUCTION);
        // against the plain lookup's gradient with the padding row zeroed
        let plain = g.embedding(idx, w).unwrap();
        let dplain = g.grad(random_projection(&g, plain, 4), &[w]).unwrap()[0];
        for dev in common::devices() {
            let out = dev
                .compile(&g, &[y, plain, dw, dplain])
                .unwrap()
                .run(&feeds)
                .unwrap();
            assert_eq!(
                out[0].data(),
                out[1].data(),
                "{what}: the lookup reads the row"
            );
            for r in 0..v {
                let (a, b) = (
                    &out[2].data()[r * e..(r + 1) * e],
                    &out[3].data()[r * e..(r + 1) * e],
                );
                match r == p {
                    true => assert!(a.iter().all(|&x| x == 0.0), "{what}: row {r} {a:?}"),
                    false => assert_eq!(a, b, "{what}: row {r}"),
                }
            }
        }
    }
    // nn::Embedding: a zero padding row that training leaves alone
    for dev in common::devices() {
        let g = Graph::new();
        let idx = g.input("idx", [6]);
        let layer = Embedding::new("emb", 4, 3, &mut Init::new(1)).padding_idx(-1);
        let (y, params) = layer.apply_layer(&g, idx, true).unwrap();
        let loss = g.sum_all(g.square(y).unwrap()).unwrap();
        let mut step = TrainStep::new(&dev, &g, loss, &params, Optimizer::sgd(0.1), 0).unwrap();
        let ids = Tensor::new([6], vec![3., 0., 3., 1., 2., 3.]).unwrap();
        for _ in 0..3 {
            step.step(&[("idx", &ids)], false).unwrap();
        }
        let w = dev.param("emb.weight").unwrap();
        assert_eq!(&w.data()[9..12], &[0.0; 3]);
        assert!(w.data()[..9].iter().all(|&x| x != 0.0));
    }
    let g = Graph::new();
    let (idx, w) = (g.input("idx", [2]), g.input("w", [4, 3]));
    for bad in [4, -5] {
        let err = g.embedding_padded(idx, w, bad).unwrap_err().to_string();
        assert!(err.contains("padding_idx"), "{err}");
    }
}
