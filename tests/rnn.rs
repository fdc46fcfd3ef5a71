//! Recurrent layers: the fused LSTM kernels against the CPU reference (forward and every gradient,
//! h0 and c0 included), gradient checks against central differences, masks, both directions.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::{Device, Graph, Tensor};

const TOL: (f64, f64) = (1e-5, 1e-4);

/// An LSTM layer over (T, B, I) with hidden H; returns the graph, a scalar loss over all outputs
/// and the nodes to differentiate, fed as inputs so central differences can perturb them.
type Case = (
    Graph,
    kiln::NodeId,
    Vec<(&'static str, kiln::NodeId)>,
    Vec<(&'static str, Tensor)>,
);

fn lstm_graph(t: usize, b: usize, i: usize, h: usize, reverse: bool, with_lengths: bool) -> Case {
    let g = Graph::new();
    let x = g.input("x", [t, b, i]);
    let w_ih = g.input("w_ih", [4 * h, i]);
    let w_hh = g.input("w_hh", [4 * h, h]);
    let b_ih = g.input("b_ih", [4 * h]);
    let b_hh = g.input("b_hh", [4 * h]);
    let h0 = g.input("h0", [b, h]);
    let c0 = g.input("c0", [b, h]);
    let lengths = with_lengths.then(|| g.input("len", [b]));
    let (hs, hn, cn) = g
        .lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
        .unwrap();
    let l1 = random_projection(&g, hs, 1);
    let l2 = random_projection(&g, hn, 2);
    let l3 = random_projection(&g, cn, 3);
    let loss = g.add(g.add(l1, l2).unwrap(), l3).unwrap();
    let wrt = vec![
        ("x", x),
        ("w_ih", w_ih),
        ("w_hh", w_hh),
        ("b_ih", b_ih),
        ("b_hh", b_hh),
        ("h0", h0),
        ("c0", c0),
    ];
    let mut feeds = vec![
        ("x", rand(&[t, b, i], 10)),
        ("w_ih", Tensor::rand_uniform(vec![4 * h, i], -0.5, 0.5, 11)),
        ("w_hh", Tensor::rand_uniform(vec![4 * h, h], -0.5, 0.5, 12)),
        ("b_ih", rand(&[4 * h], 13)),
        ("b_hh", rand(&[4 * h], 14)),
        ("h0", rand(&[b, h], 15)),
        ("c0", rand(&[b, h], 16)),
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

#[test]
fn lstm_forward_and_gradients_match_the_reference() {
    let limit = common::sequence_limit();
    for &(t, b, i, h, reverse, lengths) in &[
        (1, 1, 1, 1, false, false),
        (5, 3, 4, 6, false, false),
        (4, 2, 3, 5, true, false),
        (6, 3, 2, 3, false, true),
        (6, 4, 3, 2, true, true),
        (3, 7, 5, 67, false, false), // more than 256 threads per step
        (2, 5, 3, 256, true, true),  // H = 256: whole-sequence with WebGPU's default limits
        // the adapter's largest whole-sequence kernels (where 2 workgroups fill it: lavapipe)
        (2, 8, 2, limit, true, true),
        (2, 2, 2, limit + 4, false, true), // beyond them: per-step kernels both ways
    ] {
        let what = format!("lstm T={t} B={b} I={i} H={h} reverse={reverse} lengths={lengths}");
        let (g, loss, wrt, feeds) = lstm_graph(t, b, i, h, reverse, lengths);
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
fn lstm_matches_hand_computed_step() {
    // T = 1, B = 1, I = 1, H = 1: every gate pre-activation is w x + u h0 + b
    let g = Graph::new();
    let x = g.input("x", [1, 1, 1]);
    let c = |v: Vec<f32>, s: &[usize]| g.constant(Tensor::new(s.to_vec(), v).unwrap());
    let w_ih = c(vec![0.1, 0.2, 0.3, 0.4], &[4, 1]);
    let w_hh = c(vec![0.5, -0.5, 0.25, -0.25], &[4, 1]);
    let zero = c(vec![0.0; 4], &[4]);
    let h0 = c(vec![0.3], &[1, 1]);
    let c0 = c(vec![-0.2], &[1, 1]);
    let (hs, _, cn) = g
        .lstm_layer(x, w_ih, w_hh, zero, zero, h0, c0, None, false)
        .unwrap();
    let mut plan = kiln::Device::cpu().compile(&g, &[hs, cn]).unwrap();
    let out = plan.run(&[("x", &Tensor::full([1, 1, 1], 2.0))]).unwrap();
    let s = |v: f64| 1.0 / (1.0 + (-v).exp());
    let a = |k: usize| [0.1, 0.2, 0.3, 0.4][k] * 2.0 + [0.5, -0.5, 0.25, -0.25][k] * 0.3;
    let cc = s(a(1)) * -0.2 + s(a(0)) * a(2).tanh();
    let hh = s(a(3)) * cc.tanh();
    assert!((out[0].data()[0] as f64 - hh).abs() < 1e-6);
    assert!((out[1].data()[0] as f64 - cc).abs() < 1e-6);
}

#[test]
fn stacked_bidirectional_lstm_module() {
    use kiln::nn::{Init, Lstm};
    let lstm = Lstm::new("lstm", 3, 4, 2, true, &mut Init::new(1));
    let names = lstm.param_names();
    assert_eq!(names.len(), 16);
    assert_eq!(names[0], "lstm.weight_ih_l0");
    assert_eq!(names[4], "lstm.weight_ih_l0_reverse");
    assert_eq!(names[9], "lstm.weight_hh_l1");
    let g = Graph::new();
    let x = g.input("x", [5, 2, 3]);
    let h0 = g.input("h0", [4, 2, 4]);
    let c0 = g.input("c0", [4, 2, 4]);
    let len = g.input("len", [2]);
    let out = lstm.apply(&g, x, Some((h0, c0)), Some(len)).unwrap();
    assert_eq!(g.shape(out.output).dims(), &[5, 2, 8]);
    assert_eq!(g.shape(out.h_n).dims(), &[4, 2, 4]);
    let loss = g
        .add(
            g.add(
                random_projection(&g, out.output, 1),
                random_projection(&g, out.h_n, 2),
            )
            .unwrap(),
            random_projection(&g, out.c_n, 3),
        )
        .unwrap();
    let feeds = [
        ("x", rand(&[5, 2, 3], 4)),
        ("h0", rand(&[4, 2, 4], 5)),
        ("c0", rand(&[4, 2, 4], 6)),
        ("len", Tensor::new([2], vec![5.0, 3.0]).unwrap()),
    ];
    let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, v)| (*n, v)).collect();
    check_gpu_vs_cpu(
        "stacked lstm",
        &g,
        &[out.output, out.h_n, out.c_n],
        &refs,
        TOL,
    );
    gradcheck(
        "stacked lstm",
        &g,
        loss,
        &[("x", x), ("h0", h0), ("c0", c0)],
        &refs,
        10,
        TOL,
    );
}

#[test]
fn gru_rnn_and_embedding_modules() {
    use kiln::nn::{Embedding, Init, Layer, Recurrent};
    let mut init = Init::new(2);
    let emb = Embedding::new("emb", 7, 3, &mut init);
    let gru = Recurrent::gru("gru", 3, 4, 2, true, &mut init);
    let rnn = Recurrent::rnn("rnn", 8, 5, 1, false, &mut init);
    assert_eq!(gru.param_names()[1], "gru.weight_hh_l0");
    assert_eq!(emb.param_names(), ["emb.weight"]);
    let g = Graph::new();
    let idx = g.input("idx", [4, 2]);
    let (e, _) = emb.apply_layer(&g, idx, false).unwrap(); // (T, B, E)
    let out = gru.apply(&g, e, None, None).unwrap();
    assert_eq!(g.shape(out.output).dims(), &[4, 2, 8]);
    assert_eq!(g.shape(out.h_n).dims(), &[4, 2, 4]);
    let (y, _) = rnn.apply_layer(&g, out.output, false).unwrap();
    assert_eq!(g.shape(y).dims(), &[4, 2, 5]);
    let idx_v = Tensor::new([4, 2], vec![0., 6., 3., 3., 1., 2., 5., 4.]).unwrap();
    check_gpu_vs_cpu(
        "emb -> gru -> rnn",
        &g,
        &[y, out.h_n],
        &[("idx", &idx_v)],
        TOL,
    );
}

/// Dispatches of the plan for an LSTM layer's loss and every gradient.
fn lstm_step_dispatches(dev: &kiln::Device, t: usize, h: usize) -> usize {
    lstm_step_plan(dev, t, h).info().dispatches
}

/// Dispatches of the recurrent kernels (forward and backward; whole-sequence kernels once,
/// per-step ones once per step) of that plan: its dispatches but the other kernels' one each.
fn lstm_kernels(dev: &kiln::Device, t: usize, h: usize) -> usize {
    let plan = lstm_step_plan(dev, t, h);
    let others = plan
        .kernels()
        .iter()
        .filter(|k| {
            !k.split_whitespace()
                .nth(2)
                .is_some_and(|op| op.starts_with("lstm"))
        })
        .count();
    plan.info().dispatches - others
}

/// The plan for an LSTM layer's loss and every gradient.
fn lstm_step_plan(dev: &kiln::Device, t: usize, h: usize) -> kiln::Plan {
    let (g, loss, wrt, _) = lstm_graph(t, 3, 2, h, false, true);
    let ids: Vec<kiln::NodeId> = wrt.iter().map(|(_, id)| *id).collect();
    let mut outs = vec![loss];
    outs.extend(g.grad(loss, &ids).unwrap());
    dev.compile(&g, &outs).unwrap()
}

#[test]
fn whole_sequence_kernels_dispatch_once_per_layer() {
    let Some(dev) = common::gpu() else { return };
    // H <= 128: forward and backward each run all steps in one dispatch, whatever T (at T 9
    // the last step's hidden state would start at element 128 of the outputs, an aligned
    // offset: a view instead of a copy, one dispatch fewer; a narrow that only products read
    // is read in place where every such product runs tiled, which the sequence's length may
    // change: one dispatch either way)
    let (short, long) = (
        lstm_step_dispatches(&dev, 2, 8),
        lstm_step_dispatches(&dev, 7, 8),
    );
    assert!(short.abs_diff(long) <= 1, "{short} and {long} dispatches");
    // so beyond WebGPU's 256 where the adapter allows and the batch fills it (give or take a
    // weight gradient's matmul splitting K over the longer sequence)
    let limit = common::sequence_limit();
    let target = dev.target().expect("a GPU");
    let more = lstm_kernels(&dev, 9, 260) - lstm_kernels(&dev, 2, 260);
    if kiln::ops::lstm::whole_sequence(3, 260, &target) {
        assert_eq!(more, 0);
    } else {
        assert!(more >= 2 * (9 - 2), "{more}");
    }
    // beyond the limit: one kernel per step forward, one per step plus one backward
    let h = limit + 4;
    let more = lstm_kernels(&dev, 9, h) - lstm_kernels(&dev, 2, h);
    assert!(more >= 2 * (9 - 2), "{more}");
}

/// Where the loss reads only part of an LSTM's state (the final h, as a classifier does; the
/// final c; every h), the backward kernel reads that part's gradient as its window of the
/// packed state's gradient: no pad kernels; the loss and every gradient against the CPU
/// reference (outputs poisoned with NaN), both directions, with and without lengths, on
/// whole-sequence and per-step kernels.
#[test]
fn gradients_of_part_of_the_state_need_no_pads() {
    let Some(dev) = common::gpu() else { return };
    let limit = common::sequence_limit();
    for &(t, b, i, h, reverse, lengths) in &[
        (5usize, 3usize, 4usize, 6usize, false, false),
        (4, 2, 3, 5, true, true),
        (1, 1, 1, 1, false, false),
        (3, 2, 2, limit + 4, false, true),
    ] {
        for part in ["h_n", "c_n", "hs"] {
            let what =
                format!("lstm T={t} B={b} H={h} reverse={reverse} lengths={lengths}: {part}");
            let (g, _, wrt, feeds) = lstm_graph(t, b, i, h, reverse, lengths);
            let x = wrt[0].1;
            let (w_ih, w_hh, b_ih, b_hh, h0, c0) =
                (wrt[1].1, wrt[2].1, wrt[3].1, wrt[4].1, wrt[5].1, wrt[6].1);
            // lstm_graph's layer reads "len"; this one its own copy
            let len = lengths.then(|| g.input("len2", [b]));
            let (hs, hn, cn) = g
                .lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, len, reverse)
                .unwrap();
            let read = match part {
                "h_n" => hn,
                "c_n" => cn,
                _ => hs,
            };
            let loss = random_projection(&g, read, 7);
            let ids: Vec<kiln::NodeId> = wrt.iter().map(|(_, id)| *id).collect();
            let mut outs = vec![loss];
            outs.extend(g.grad(loss, &ids).unwrap());
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

/// An encoder-decoder (seq2seq): a decoder starting from its encoder's final state reads it in
/// place from the encoder's packed states (`ops::lstm::InitialState`), forward and backward, so
/// no narrow kernel copies it, and the encoder's backward reads the decoder's `dh0` (and `dc0`,
/// adjacent: one window) in place from the decoder's backward (`DpWindow::rows`); LSTM (`h` and `c`), GRU and RNN, the
/// encoder in both directions and with lengths; the loss and every gradient (both layers'
/// weights, the inputs) against the CPU reference, outputs poisoned with NaN. (B * H a multiple
/// of 64 here: the encoder's last step is then a view of its states; elsewhere that step is
/// copied, the narrow of its columns still read in place.)
#[test]
fn decoders_read_their_encoders_final_state_in_place() {
    let Some(dev) = common::gpu() else { return };
    let (t1, t2, b, i, h) = (5usize, 4usize, 8usize, 4usize, 8usize);
    for cell in ["lstm", "gru", "rnn"] {
        for (reverse, lengths) in [(false, false), (true, false), (false, true)] {
            let what = format!("{cell} encoder reverse={reverse} lengths={lengths}");
            let gates = match cell {
                "lstm" => 4,
                "gru" => 3,
                _ => 1,
            };
            let g = Graph::new();
            let mut feeds: Vec<(String, Tensor)> = Vec::new();
            let mut input = |name: String, shape: Vec<usize>, seed: u64| {
                feeds.push((
                    name.clone(),
                    Tensor::rand_uniform(shape.clone(), -0.5, 0.5, seed),
                ));
                g.input(&name, shape)
            };
            let x = input("x".into(), vec![t1, b, i], 1);
            let y = input("y".into(), vec![t2, b, i], 2);
            let mut weights = |layer: &str, seed: u64| {
                [
                    input(format!("{layer}.w_ih"), vec![gates * h, i], seed),
                    input(format!("{layer}.w_hh"), vec![gates * h, h], seed + 1),
                    input(format!("{layer}.b_ih"), vec![gates * h], seed + 2),
                    input(format!("{layer}.b_hh"), vec![gates * h], seed + 3),
                ]
            };
            let enc = weights("enc", 10);
            let dec = weights("dec", 20);
            let zeros = g.constant(Tensor::zeros([b, h]));
            let len = lengths.then(|| {
                let l = (0..b).map(|k| [5.0, 2.0, 1.0][k % 3]).collect();
                g.constant(Tensor::new([b], l).unwrap())
            });
            let out = match cell {
                "lstm" => {
                    let (_, hn, cn) = g
                        .lstm_layer(
                            x, enc[0], enc[1], enc[2], enc[3], zeros, zeros, len, reverse,
                        )
                        .unwrap();
                    g.lstm_layer(y, dec[0], dec[1], dec[2], dec[3], hn, cn, None, false)
                        .unwrap()
                        .0
                }
                _ => {
                    let layer = |x, w: &[kiln::NodeId; 4], h0, len, reverse| match cell {
                        "gru" => g.gru_layer(x, w[0], w[1], w[2], w[3], h0, len, reverse),
                        _ => g.rnn_layer(x, w[0], w[1], w[2], w[3], h0, len, reverse),
                    };
                    let (_, hn) = layer(x, &enc, zeros, len, reverse).unwrap();
                    layer(y, &dec, hn, None, false).unwrap().0
                }
            };
            let loss = random_projection(&g, out, 3);
            let mut wrt = vec![x, y];
            wrt.extend(enc);
            wrt.extend(dec);
            let mut outs = vec![loss];
            outs.extend(g.grad(loss, &wrt).unwrap());
            let plan = common::check_plan(&dev, &what, &g, &outs, &feeds, TOL);
            let kernels = plan.kernels();
            // (the decoder's `hs`, which the loss reads, is a narrow of its own)
            let backward = kernels
                .iter()
                .position(|k| k.contains("_backward"))
                .unwrap_or(kernels.len());
            let state = format!("narrow [1, {b}, {h}]");
            assert!(
                !kernels[..backward].iter().any(|k| k.contains(&state)),
                "{what}: {kernels:#?}"
            );
            // and the decoder's `dh0` (`| dc0`) goes back into the encoder's backward, read in
            // place as its state gradient's window: no narrow, pad or concat of it
            let copies = ["narrow", "pad", "concat"]
                .map(|c| format!("{c} [1, {b}, "))
                .map(|c| kernels.iter().filter(|k| k.contains(&c)).count());
            assert_eq!(copies, [0, 0, 0], "{what}: {kernels:#?}");
        }
    }
}

/// A batch-first sequence `(B, T, I)` swapped to time-major for an LSTM, and its output swapped
/// back for a per-step classifier: the products read both swaps' rows in place
/// (`OperandRows::swap`: the input projection and its weight gradient, the classifier and its
/// weight gradient; 12 classes: more rows than the skinny-product kernel, which reads its
/// operands plainly, takes), so no permute kernel copies either in the forward pass, nor the
/// output's gradient for the recurrence's backward (`DpWindow::rows`); the loss and every
/// gradient (the
/// input's too) against the CPU reference, outputs poisoned with NaN, at rows of 6 (scalar
/// loads) and 8 (vec4 loads), and a long sequence whose weight gradient splits K.
#[test]
fn batch_first_sequences_are_read_in_place() {
    let Some(dev) = common::gpu() else { return };
    for &(b, t, i, h) in &[
        (5usize, 7usize, 6usize, 5usize),
        (8, 3, 8, 4),
        (16, 64, 8, 8),
    ] {
        let what = format!("batch-first B={b} T={t} I={i} H={h}");
        let g = Graph::new();
        let x = g.input("x", [b, t, i]);
        let w = |name: &str, shape: &[usize]| g.input(name, shape.to_vec());
        let (w_ih, w_hh, b_ih, b_hh) = (
            w("w_ih", &[4 * h, i]),
            w("w_hh", &[4 * h, h]),
            w("b_ih", &[4 * h]),
            w("b_hh", &[4 * h]),
        );
        let fc = w("fc", &[12, h]);
        let zeros = g.constant(Tensor::zeros([b, h]));
        let time_major = g.permute(x, &[1, 0, 2]).unwrap();
        let (hs, _, _) = g
            .lstm_layer(
                time_major, w_ih, w_hh, b_ih, b_hh, zeros, zeros, None, false,
            )
            .unwrap();
        let batch_major = g.permute(hs, &[1, 0, 2]).unwrap();
        let rows = g
            .reshape(batch_major, &[(b * t) as isize, h as isize])
            .unwrap();
        let logits = g.matmul_t(rows, fc, false, true).unwrap();
        let loss = random_projection(&g, logits, 4);
        let wrt = [x, w_ih, w_hh, b_ih, b_hh, fc];
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &wrt).unwrap());
        let feeds: Vec<(String, Tensor)> = [
            ("x", vec![b, t, i]),
            ("w_ih", vec![4 * h, i]),
            ("w_hh", vec![4 * h, h]),
            ("b_ih", vec![4 * h]),
            ("b_hh", vec![4 * h]),
            ("fc", vec![12, h]),
        ]
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            (
                n.to_string(),
                Tensor::rand_uniform(s, -0.5, 0.5, 30 + k as u64),
            )
        })
        .collect();
        let plan = common::check_plan(&dev, &what, &g, &outs, &feeds, TOL);
        let kernels = plan.kernels();
        // (the backward pass, after the loss's sum, swaps the gradients back: the input's,
        // asked for, and the output's, which the recurrence's backward reads)
        let forward = kernels
            .iter()
            .position(|k| k.contains(" sum [1]"))
            .unwrap_or(kernels.len());
        for swapped in [
            format!("permute [{t}, {b}, {i}]"),
            format!("permute [{b}, {t}, {h}]"),
        ] {
            assert!(
                !kernels[..forward].iter().any(|k| k.contains(&swapped)),
                "{what}: {swapped}: {kernels:#?}"
            );
        }
        let reads = kernels.iter().filter(|k| k.contains(",swap")).count();
        assert!(reads >= 3, "{what}: {kernels:#?}");
        // nor in the backward pass for the output's gradient, which the recurrence's backward
        // reads swapped (the input's gradient, asked for batch-first, is swapped back)
        let dp = format!("permute [{t}, {b}, {h}]");
        assert!(
            !kernels.iter().any(|k| k.contains(&dp)),
            "{what}: {kernels:#?}"
        );
    }
}

/// `batch_first` modules (torch's `batch_first=True`): a stacked bidirectional LSTM and a GRU
/// over `(B, T, I)` give exactly the time-major module's outputs swapped (CPU reference), their
/// `h_n` unchanged; on the GPU a classifier over every step trains on them as on the CPU (every
/// gradient), and a bad input shape names the batch-first layout.
#[test]
fn batch_first_modules_are_time_major_ones_swapped() {
    use kiln::nn::{Init, Recurrent};
    let (b, t, i, h) = (3usize, 5usize, 4usize, 6usize);
    let x_bf = rand(&[b, t, i], 7);
    let swap = |v: &Tensor, d: [usize; 3]| {
        let mut out = vec![0f32; v.numel()];
        for (k, &e) in v.data().iter().enumerate() {
            let (p, q, r) = (k / (d[1] * d[2]), (k / d[2]) % d[1], k % d[2]);
            out[(q * d[0] + p) * d[2] + r] = e;
        }
        Tensor::new([d[1], d[0], d[2]], out).unwrap()
    };
    let modules = [
        Recurrent::new("bf_lstm", i, h, 2, true, &mut Init::new(3)),
        Recurrent::gru("bf_gru", i, h, 1, false, &mut Init::new(4)),
    ];
    for module in modules {
        let what = format!("{:?} batch first", module.cell);
        let run = |m: &Recurrent, x: &Tensor| {
            let g = Graph::new();
            let xi = g.input("x", x.dims().to_vec());
            let out = m.apply(&g, xi, None, None).unwrap();
            Device::cpu()
                .compile(&g, &[out.output, out.h_n])
                .unwrap()
                .run(&[("x", x)])
                .unwrap()
        };
        let bf = module.clone().with_batch_first(true);
        let tm = run(&module, &swap(&x_bf, [b, t, i]));
        let got = run(&bf, &x_bf);
        let d = tm[0].dims().to_vec();
        assert_eq!(
            got[0].data(),
            swap(&tm[0], [d[0], d[1], d[2]]).data(),
            "{what}"
        );
        assert_eq!(got[1].data(), tm[1].data(), "{what}: h_n");
        // a classifier over every step, all gradients, on the GPU
        let Some(dev) = common::gpu() else { continue };
        let g = Graph::new();
        let x = g.input("x", [b, t, i]);
        let out = bf.apply(&g, x, None, None).unwrap();
        let width = g.shape(out.output).dims()[2];
        let fc = g.input("fc", [12, width]);
        let rows = g
            .reshape(out.output, &[(b * t) as isize, width as isize])
            .unwrap();
        let loss = random_projection(&g, g.matmul_t(rows, fc, false, true).unwrap(), 8);
        let mut outs = vec![loss];
        let mut wrt = vec![x, fc];
        wrt.extend(&out.params);
        outs.extend(g.grad(loss, &wrt).unwrap());
        let feeds = vec![
            ("x".to_string(), x_bf.clone()),
            ("fc".to_string(), rand(&[12, width], 9)),
        ];
        common::check_plan(&dev, &what, &g, &outs, &feeds, TOL);
        let bad = Graph::new();
        let e = bf
            .apply(&bad, bad.input("x", [b, t, i + 1]), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(B, T, 4)"), "{what}: {e}");
    }
}

/// torch's `dropout` between stacked layers: in training graphs only, on every layer's outputs
/// but the last (a salt per layer), the same on the GPU and the CPU, with gradients through the
/// masks; the evaluation graph is the network without it.
#[test]
fn stacked_lstm_dropout_between_layers() {
    use kiln::nn::{Init, Layer, Lstm};
    let lstm = Lstm::new("dlstm", 3, 4, 3, false, &mut Init::new(2)).with_dropout(0.5);
    let g = Graph::new();
    let x = g.input("x", [5, 2, 3]);
    let train = lstm.apply_train(&g, x, None, None, true).unwrap();
    let eval = lstm.apply(&g, x, None, None).unwrap();
    let (layer, _) = lstm.apply_layer(&g, x, true).unwrap();
    let nodes = format!("{:?}", g.nodes());
    assert_eq!(
        nodes.matches("Dropout(").count(),
        2 * 2,
        "two per training graph"
    );
    let seed = Tensor::new([1], vec![77.0]).unwrap();
    let xv = rand(&[5, 2, 3], 9);
    let feeds = [("x", &xv), ("dropout.seed", &seed)];
    check_gpu_vs_cpu(
        "lstm dropout",
        &g,
        &[train.output, eval.output, layer],
        &feeds,
        TOL,
    );
    let got = Device::cpu()
        .compile(&g, &[train.output, eval.output, layer])
        .unwrap()
        .run(&feeds)
        .unwrap();
    assert_ne!(
        got[0].data(),
        got[1].data(),
        "dropout changes the training output"
    );
    assert_eq!(
        got[0].data(),
        got[2].data(),
        "Layer::apply_layer in training drops out"
    );
    let loss = random_projection(&g, train.output, 4);
    gradcheck("lstm dropout", &g, loss, &[("x", x)], &feeds, 15, TOL);
}
