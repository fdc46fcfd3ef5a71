//! `torch.nn.functional`'s compositions (`src/graph/functional.rs`): padding by reflection,
//! replication and wrapping, pixel shuffles, norms, normalization, cosine similarity,
//! distances and the losses built on them, against torch's values worked by hand on every
//! device (outputs poisoned), the GPU against the CPU on awkward shapes, and gradient checks.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::graph::PadMode;
use kiln::ops::TOL_REDUCTION;
use kiln::{Graph, NodeId, Tensor};

fn t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), v.to_vec()).unwrap()
}

/// Runs `outs` on every device (poisoned first) and compares with `want` at rtol 1e-6.
fn close(g: &Graph, outs: &[NodeId], feeds: &[(&str, &Tensor)], want: &[Vec<f32>]) {
    common::expect_values(g, outs, feeds, want, (1e-6, 1e-6));
}

/// torch.nn.functional.pad's reflect, replicate and circular modes, and pixel (un)shuffle.
#[test]
fn padding_modes_and_pixel_shuffle_as_torch() {
    let g = Graph::new();
    let v = g.input("v", [3]);
    let m = g.input("m", [1, 1, 2, 3]);
    let p = g.input("p", [1, 4, 1, 2]);
    let shuffled = g.pixel_shuffle(p, 2).unwrap();
    let outs = [
        g.pad_with(v, &[(2, 1)], PadMode::Reflect).unwrap(),
        g.pad_with(v, &[(2, 1)], PadMode::Replicate).unwrap(),
        g.pad_with(v, &[(2, 1)], PadMode::Circular).unwrap(),
        g.pad_with(v, &[(1, 0)], PadMode::Constant(-1.0)).unwrap(),
        // (left, right) of the last axis, then (top, bottom)
        g.pad_with(m, &[(1, 1), (1, 0)], PadMode::Reflect).unwrap(),
        shuffled,
        g.pixel_unshuffle(shuffled, 2).unwrap(),
    ];
    assert_eq!(g.shape(outs[4]).dims(), &[1, 1, 3, 5]);
    assert_eq!(g.shape(shuffled).dims(), &[1, 1, 2, 4]);
    let ps: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let want = [
        vec![3., 2., 1., 2., 3., 2.],
        vec![1., 1., 1., 2., 3., 3.],
        vec![2., 3., 1., 2., 3., 1.],
        vec![-1., 1., 2., 3.],
        vec![5., 4., 5., 6., 5., 2., 1., 2., 3., 2., 5., 4., 5., 6., 5.],
        vec![0., 2., 1., 3., 4., 6., 5., 7.],
        ps.clone(),
    ];
    let feeds = [
        ("v", &t(&[3], &[1., 2., 3.])),
        ("m", &t(&[1, 1, 2, 3], &[1., 2., 3., 4., 5., 6.])),
        ("p", &t(&[1, 4, 1, 2], &ps)),
    ];
    close(&g, &outs, &feeds, &want);
    // torch's limits: a reflection smaller than its axis, a wrap no larger, no negative pads
    for (pads, mode) in [
        ((3, 0), PadMode::Reflect),
        ((0, 4), PadMode::Circular),
        ((-1, 0), PadMode::Replicate),
    ] {
        let e = g.pad_with(v, &[pads], mode).unwrap_err().to_string();
        assert!(e.contains("pad") && e.contains("[3]"), "{e}");
    }
    // nn::Act::PixelShuffle in a Sequential is the same op
    let seq = kiln::nn::Sequential::new().act(kiln::nn::Act::PixelShuffle(2));
    let (s, _) = seq.apply(&g, p, false).unwrap();
    assert_eq!(g.shape(s).dims(), &[1, 1, 2, 4]);
    close(&g, &[s], &feeds, &want[5..6]);
    assert!(g.pixel_shuffle(m, 2).is_err());
    assert!(g.pixel_unshuffle(m, 2).is_err());
}

/// Norms, normalize, cosine similarity, pairwise distance, and the binary cross-entropy on
/// probabilities (saturated ones included), margin ranking and triplet margin losses, with
/// the gradients torch gives.
#[test]
fn norms_similarities_and_losses_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [2, 2]);
    let a = g.input("a", [3]);
    let b = g.input("b", [3]);
    let z = g.input("z", [3]);
    let probs = g.input("probs", [4]);
    let y = g.input("y", [4]);
    let bce = g.binary_cross_entropy(probs, y).unwrap();
    let dbce = g.grad(bce, &[probs]).unwrap()[0];
    let ra = g.input("ra", [3]);
    let rb = g.input("rb", [3]);
    let ry = g.input("ry", [3]);
    let (an, po, ne) = (
        g.input("an", [1, 2]),
        g.input("po", [1, 2]),
        g.input("ne", [1, 2]),
    );
    let outs = [
        g.normalize(x, 2.0, 1, 1e-12).unwrap(),
        g.norm(x, 1.0, 1, false).unwrap(),
        g.norm(x, 3.0, 1, false).unwrap(),
        g.cosine_similarity(a, b, 0, 1e-8).unwrap(),
        g.cosine_similarity(a, z, 0, 1e-8).unwrap(),
        bce,
        dbce,
        g.margin_ranking_loss(ra, rb, ry, 0.5).unwrap(),
        g.triplet_margin_loss(an, po, ne, 1.0, 2.0, 1e-6).unwrap(),
        g.pairwise_distance(an, po, 2.0, 1e-6).unwrap(),
    ];
    let want = [
        vec![0.6, 0.8, 0.0, 0.0],
        vec![7.0, 0.0],
        vec![4.497_941_4, 0.0],
        vec![0.974_631_85],
        vec![0.0],
        vec![50.098_26],
        // (p - y) / (p (1 - p)) / N; 0 where the log is clamped (p = 0 and 1)
        vec![1.0 / 3.0, -0.277_777_8, 0.0, 0.0],
        vec![2.0 / 3.0],
        vec![4.999_999_6],
        vec![4.999_998_6],
    ];
    let feeds = [
        ("x", &t(&[2, 2], &[3., 4., 0., 0.])),
        ("a", &t(&[3], &[1., 2., 3.])),
        ("b", &t(&[3], &[4., 5., 6.])),
        ("z", &t(&[3], &[0., 0., 0.])),
        ("probs", &t(&[4], &[0.25, 0.9, 0.0, 1.0])),
        ("y", &t(&[4], &[0., 1., 1., 0.])),
        ("ra", &t(&[3], &[1., 2., 3.])),
        ("rb", &t(&[3], &[2., 2., 1.])),
        ("ry", &t(&[3], &[1., -1., 1.])),
        ("an", &t(&[1, 2], &[0., 0.])),
        ("po", &t(&[1, 2], &[3., 4.])),
        ("ne", &t(&[1, 2], &[0., 1.])),
    ];
    close(&g, &outs, &feeds, &want);
    assert!(g.norm(x, 0.0, 1, false).is_err());
}

/// The GPU against the CPU on awkward shapes, and gradient checks through every padding mode,
/// the shuffles, normalize, cosine similarity and the losses.
#[test]
fn functional_gradients() {
    let g = Graph::new();
    let x = g.input("x", [2, 3, 5, 7]);
    let v = g.input("v", [3, 7]);
    let w = g.input("w", [3, 7]);
    let u = g.input("u", [3, 7]);
    let ys = g.input("ys", [3, 7]);
    let xs = rand(&[2, 3, 5, 7], 1);
    let (vs, ws, us) = (rand(&[3, 7], 2), rand(&[3, 7], 3), rand(&[3, 7], 4));
    // targets in [0, 1] and probabilities inside (0, 1)
    let yv = t(
        &[3, 7],
        &(0..21).map(|i| (i % 5) as f32 / 4.0).collect::<Vec<_>>(),
    );
    let probs = g.sigmoid(v).unwrap();
    let sign = g.input("sign", [3, 7]);
    let sv = t(
        &[3, 7],
        &(0..21)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect::<Vec<_>>(),
    );
    let pieces = [
        g.pad_with(x, &[(2, 3), (4, 1)], PadMode::Reflect).unwrap(),
        g.pad_with(x, &[(3, 0), (0, 2)], PadMode::Replicate)
            .unwrap(),
        g.pad_with(x, &[(7, 2)], PadMode::Circular).unwrap(),
        g.pixel_shuffle(g.reshape(x, &[1, 6, 5, 7]).unwrap(), 1)
            .unwrap(),
        g.pixel_unshuffle(g.narrow(x, 3, 0, 6).unwrap(), 1).unwrap(),
        g.normalize(v, 2.0, 1, 1e-12).unwrap(),
        g.normalize(v, 1.5, 0, 1e-12).unwrap(),
        g.cosine_similarity(v, w, 1, 1e-8).unwrap(),
        g.pairwise_distance(v, w, 2.0, 1e-6).unwrap(),
        g.binary_cross_entropy(probs, ys).unwrap(),
        g.margin_ranking_loss(v, w, sign, 0.3).unwrap(),
        g.triplet_margin_loss(v, w, u, 0.7, 2.0, 1e-6).unwrap(),
    ];
    let feeds = [
        ("x", &xs),
        ("v", &vs),
        ("w", &ws),
        ("u", &us),
        ("ys", &yv),
        ("sign", &sv),
    ];
    check_gpu_vs_cpu("functional", &g, &pieces, &feeds, TOL_REDUCTION);
    let mut loss = random_projection(&g, pieces[0], 10);
    for (k, &p) in pieces.iter().enumerate().skip(1) {
        loss = g
            .add(loss, random_projection(&g, p, 10 + k as u64))
            .unwrap();
    }
    let wrt = [("x", x), ("v", v), ("w", w), ("u", u)];
    gradcheck("functional", &g, loss, &wrt, &feeds, 40, TOL_REDUCTION);
    // a 2-pixel shuffle's gradient is the unshuffle of the incoming one
    let g = Graph::new();
    let x = g.input("x", [2, 8, 3, 5]);
    let y = g.pixel_shuffle(x, 2).unwrap();
    let dy = g.input("dy", [2, 2, 6, 10]);
    let dx = g
        .grad(g.sum_all(g.mul(y, dy).unwrap()).unwrap(), &[x])
        .unwrap()[0];
    let back = g.pixel_unshuffle(dy, 2).unwrap();
    let (xv, dyv) = (rand(&[2, 8, 3, 5], 5), rand(&[2, 2, 6, 10], 6));
    for dev in common::devices() {
        let out = dev
            .compile(&g, &[dx, back])
            .unwrap()
            .run(&[("x", &xv), ("dy", &dyv)])
            .unwrap();
        common::assert_close("shuffle gradient", &out[0], &out[1], 0.0, 0.0);
    }
}

/// torch.nn.functional.prelu with a shared slope and one per channel (values and the slope's
/// gradient at 0, torch's), gradient checks for the input and the weight, and `nn::PRelu`'s
/// state_dict name and initial slope.
#[test]
fn prelu_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [1, 2, 3]);
    let per = g.input("per", [2]);
    let one = g.input("one", [1]);
    let yp = g.prelu(x, per).unwrap();
    let y1 = g.prelu(x, one).unwrap();
    let dx = g.grad(g.sum_all(yp).unwrap(), &[x]).unwrap()[0];
    let dw = g.grad(g.sum_all(yp).unwrap(), &[per]).unwrap()[0];
    let feeds = [
        ("x", &t(&[1, 2, 3], &[-2., 3., 0., 0.5, -1., -4.])),
        ("per", &t(&[2], &[0.25, 0.1])),
        ("one", &t(&[1], &[0.25])),
    ];
    let want = [
        vec![-0.5, 3., 0., 0.5, -0.1, -0.4],
        vec![-0.5, 3., 0., 0.5, -0.25, -1.],
        // the slope at 0, as torch's
        vec![0.25, 1., 0.25, 1., 0.1, 0.1],
        vec![-2., -5.],
    ];
    close(&g, &[yp, y1, dx, dw], &feeds, &want);
    let g = Graph::new();
    let x = g.input("x", [3, 4, 5]);
    let w = g.input("w", [4]);
    let loss = random_projection(&g, g.prelu(x, w).unwrap(), 3);
    // away from the kink at 0, which central differences of step 0.01 would straddle
    let xv = rand(&[3, 4, 5], 1);
    let xv = t(
        &[3, 4, 5],
        &xv.data()
            .iter()
            .map(|&v| v + 0.1 * v.signum())
            .collect::<Vec<_>>(),
    );
    let wv = rand(&[4], 2);
    let feeds = [("x", &xv), ("w", &wv)];
    gradcheck(
        "prelu",
        &g,
        loss,
        &[("x", x), ("w", w)],
        &feeds,
        30,
        TOL_REDUCTION,
    );
    let e = g.prelu(x, g.input("bad", [3])).unwrap_err().to_string();
    assert!(e.contains("prelu") && e.contains("[3, 4, 5]"), "{e}");
    let layer = kiln::nn::PRelu::new("act", 4, 0.25);
    assert_eq!(layer.param_names(), ["act.weight"]);
    let (y, wn) = layer.apply(&g, x).unwrap();
    assert_eq!(g.shape(y).dims(), &[3, 4, 5]);
    assert_eq!(g.shape(wn).dims(), &[4]);
}

/// einsum written out as loops over every assignment of the indices (f64), for the test.
fn naive_einsum(spec: &str, ops: &[(&[usize], &Tensor)]) -> Vec<f32> {
    let (lhs, out) = spec.split_once("->").unwrap();
    let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.chars().collect()).collect();
    let out: Vec<char> = out.chars().collect();
    let mut ext: Vec<(char, usize)> = Vec::new();
    for (t, (dims, _)) in terms.iter().zip(ops) {
        for (k, &c) in t.iter().enumerate() {
            if !ext.iter().any(|e| e.0 == c) {
                ext.push((c, dims[k]));
            }
        }
    }
    let dim = |c: char| ext.iter().find(|e| e.0 == c).unwrap().1;
    let n_out: usize = out.iter().map(|&c| dim(c)).product();
    let mut acc = vec![0f64; n_out.max(1)];
    let total: usize = ext.iter().map(|e| e.1).product();
    for mut flat in 0..total {
        let mut val = vec![0usize; ext.len()];
        for (i, e) in ext.iter().enumerate().rev() {
            val[i] = flat % e.1;
            flat /= e.1;
        }
        let at = |c: char| val[ext.iter().position(|e| e.0 == c).unwrap()];
        let mut p = 1f64;
        for (t, (dims, x)) in terms.iter().zip(ops) {
            let mut off = 0;
            for (k, &c) in t.iter().enumerate() {
                off = off * dims[k] + at(c);
            }
            p *= x.data()[off] as f64;
        }
        let mut o = 0;
        for &c in &out {
            o = o * dim(c) + at(c);
        }
        acc[o] += p;
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// torch.einsum's common forms against loops over the indices, on every device with outputs
/// poisoned; gradient checks through a product and a single-operand reduction; the implicit
/// output; errors for what it does not take.
#[test]
fn einsum_as_loops() {
    let cases: &[(&str, &[usize], &[usize])] = &[
        ("ij,jk->ik", &[3, 5], &[5, 4]),
        ("bij,bjk->bik", &[2, 3, 5], &[2, 5, 4]),
        ("bhqd,bhkd->bhqk", &[2, 3, 4, 5], &[2, 3, 6, 5]),
        ("bhqk,bhkd->bqhd", &[2, 3, 4, 6], &[2, 3, 6, 5]),
        ("i,j->ij", &[3], &[4]),
        ("ij,ij->i", &[3, 4], &[3, 4]),
        ("i,i->", &[7], &[7]),
        ("bij,jk->bki", &[2, 3, 5], &[5, 4]),
        ("ijk,kl->jl", &[3, 4, 5], &[5, 2]),
        ("ji,jk->ik", &[5, 3], &[5, 4]),
    ];
    for (k, &(spec, da, db)) in cases.iter().enumerate() {
        let g = Graph::new();
        let a = g.input("a", da.to_vec());
        let b = g.input("b", db.to_vec());
        let y = g.einsum(spec, &[a, b]).unwrap();
        let (av, bv) = (rand(da, 10 + k as u64), rand(db, 20 + k as u64));
        let want = naive_einsum(spec, &[(da, &av), (db, &bv)]);
        for dev in common::devices() {
            let mut plan = dev.compile(&g, &[y]).unwrap();
            plan.poison(f32::NAN);
            let got = plan.run(&[("a", &av), ("b", &bv)]).unwrap();
            let w = Tensor::new(g.shape(y), want.clone()).unwrap();
            common::assert_close(spec, &got[0], &w, 1e-5, 1e-4);
        }
    }
    for (spec, d) in [
        ("ij->ji", &[3usize, 4][..]),
        ("ijk->ki", &[2, 3, 4]),
        ("ij->", &[3, 4]),
    ] {
        let g = Graph::new();
        let a = g.input("a", d.to_vec());
        let y = g.einsum(spec, &[a]).unwrap();
        let av = rand(d, 3);
        let want = Tensor::new(g.shape(y), naive_einsum(spec, &[(d, &av)])).unwrap();
        for dev in common::devices() {
            let got = dev.compile(&g, &[y]).unwrap().run(&[("a", &av)]).unwrap();
            common::assert_close(spec, &got[0], &want, 1e-5, 1e-4);
        }
    }
    // attention's scores and a linear layer's product are one matmul kernel each: the
    // operands already lie as the product reads them (the keys transposed)
    if let Some(dev) = common::gpu() {
        for (spec, da, db) in [
            ("bhqd,bhkd->bhqk", [2, 3, 4, 5], [2, 3, 6, 5]),
            ("bhqk,bhkd->bhqd", [2, 3, 4, 6], [2, 3, 6, 5]),
        ] {
            let g = Graph::new();
            let y = g
                .einsum(spec, &[g.input("a", da), g.input("b", db)])
                .unwrap();
            let kernels = dev.compile(&g, &[y]).unwrap().kernels().len();
            assert_eq!(kernels, 1, "{spec}");
        }
    }
    // torch's implicit output: the indices that appear once, alphabetically
    let g = Graph::new();
    let a = g.input("a", [3, 5]);
    let b = g.input("b", [5, 4]);
    assert_eq!(g.shape(g.einsum("ij,jk", &[a, b]).unwrap()).dims(), &[3, 4]);
    assert_eq!(
        g.shape(g.einsum("kj,ji", &[b, g.input("c", [4, 3])]).unwrap())
            .dims(),
        &[3, 5],
        "\"ik\", alphabetical"
    );
    // gradients through the products' permutes and the sums
    let g = Graph::new();
    let a = g.input("a", [2, 3, 4]);
    let b = g.input("b", [4, 2, 5]);
    let y = g.einsum("bij,jbk->kib", &[a, b]).unwrap();
    let s = g.einsum("bij->j", &[a]).unwrap();
    let loss = g
        .add(random_projection(&g, y, 1), random_projection(&g, s, 2))
        .unwrap();
    let (av, bv) = (rand(&[2, 3, 4], 3), rand(&[4, 2, 5], 4));
    let feeds = [("a", &av), ("b", &bv)];
    gradcheck(
        "einsum",
        &g,
        loss,
        &[("a", a), ("b", b)],
        &feeds,
        30,
        TOL_REDUCTION,
    );
    for (spec, ops) in [
        ("ii->i", vec![a]),
        ("ij,jk,kl->il", vec![a, a, a]),
        ("bij,bjk->bik", vec![a, a]),
        ("bij->bz", vec![a]),
        ("...ij->ij", vec![a]),
    ] {
        let e = g.einsum(spec, &ops).unwrap_err().to_string();
        assert!(e.contains("einsum"), "{spec}: {e}");
    }
}

/// torch.isnan / isinf / isfinite, nan_to_num, kthvalue and median (NaN counting as the
/// largest, and median's NaN propagation), by hand on every device with outputs poisoned;
/// the median's gradient goes to the picked element; a row longer than the passes' k sorts.
#[test]
fn nan_checks_kthvalue_and_median_as_torch() {
    let nan = f32::NAN;
    let (inf, max, min) = (f32::INFINITY, f32::MAX, f32::MIN);
    let g = Graph::new();
    let v = g.input("v", [5]);
    let x = g.input("x", [2, 5]);
    let (k2, k2i) = g.kthvalue(x, 2, 1, false).unwrap();
    let (k5, k5i) = g.kthvalue(x, 5, -1, true).unwrap();
    let (m, mi) = g.median(x, 1, false).unwrap();
    let (m0, m0i) = g.median(x, 0, false).unwrap();
    assert_eq!(g.shape(k5).dims(), &[2, 1]);
    let dx = g.grad(g.sum_all(m).unwrap(), &[x]).unwrap()[0];
    let outs = [
        g.isnan(v).unwrap(),
        g.isinf(v).unwrap(),
        g.isfinite(v).unwrap(),
        g.nan_to_num(v, 0.0, max, min).unwrap(),
        g.nan_to_num(v, -1.0, 9.0, -9.0).unwrap(),
        k2,
        k2i,
        k5,
        k5i,
        m,
        mi,
        m0,
        m0i,
        dx,
    ];
    let want = [
        vec![1., 0., 0., 0., 0.],
        vec![0., 1., 1., 0., 0.],
        vec![0., 0., 0., 1., 1.],
        vec![0., max, min, 0., 1.5],
        vec![-1., 9., -9., 0., 1.5],
        vec![1., 0.],
        vec![3., 4.],
        vec![5., nan],
        vec![4., 1.],
        // row 1 holds a NaN: NaN at its position
        vec![3., nan],
        vec![0., 1.],
        // columns of two: the smaller; column 1 holds a NaN
        vec![2., nan, -1., 1., 0.],
        vec![1., 1., 1., 0., 1.],
        vec![1., 0., 0., 0., 0., 0., 1., 0., 0., 0.],
    ];
    let feeds = [
        ("v", &t(&[5], &[nan, inf, -inf, 0., 1.5])),
        (
            "x",
            &t(&[2, 5], &[3., 1., 4., 1., 5., 2., nan, -1., 2., 0.]),
        ),
    ];
    close(&g, &outs, &feeds, &want);
    // rows longer than the passes' k: the sort, against one written here
    let g = Graph::new();
    let x = g.input("x", [3, 21]);
    let (kv, ki) = g.kthvalue(x, 13, 1, false).unwrap();
    let (mv, _) = g.median(x, 1, false).unwrap();
    let xs: Vec<f32> = (0..63).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
    let (mut want_k, mut want_i, mut want_m) = (Vec::new(), Vec::new(), Vec::new());
    for row in xs.chunks(21) {
        let mut p: Vec<usize> = (0..21).collect();
        p.sort_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
        want_k.push(row[p[12]]);
        want_i.push(p[12] as f32);
        want_m.push(row[p[10]]);
    }
    close(
        &g,
        &[kv, ki, mv],
        &[("x", &t(&[3, 21], &xs))],
        &[want_k, want_i, want_m],
    );
}

/// glu and torch's remaining losses (soft margin, multilabel soft margin, hinge embedding,
/// cosine embedding, Poisson and Gaussian NLL) against their formulas worked by hand, the
/// Gaussian's variance gradient through torch's clamp, and gradient checks.
#[test]
fn glu_and_more_losses_as_torch() {
    let g = Graph::new();
    let a = g.input("a", [4]);
    let x = g.input("x", [3]);
    let y = g.input("y", [3]);
    let x2 = g.input("x2", [2, 2]);
    let y2 = g.input("y2", [2, 2]);
    let (ea, eb, eb2, ey) = (
        g.input("ea", [2, 2]),
        g.input("eb", [2, 2]),
        g.input("eb2", [2, 2]),
        g.input("ey", [2]),
    );
    let (px, pl, pt) = (g.input("px", [3]), g.input("pl", [3]), g.input("pt", [3]));
    let (gx, gt, gv) = (g.input("gx", [3]), g.input("gt", [3]), g.input("gv", [3]));
    let gauss = g.gaussian_nll_loss(gx, gt, gv, false).unwrap();
    let dvar = g.grad(gauss, &[gv]).unwrap()[0];
    let outs = [
        g.glu(a, 0).unwrap(),
        g.soft_margin_loss(x, y).unwrap(),
        g.hinge_embedding_loss(x, y, 1.0).unwrap(),
        g.multilabel_soft_margin_loss(x2, y2).unwrap(),
        g.cosine_embedding_loss(ea, eb, ey, 0.5).unwrap(),
        g.cosine_embedding_loss(ea, eb2, ey, 0.5).unwrap(),
        g.poisson_nll_loss(px, pt, true, false).unwrap(),
        g.poisson_nll_loss(pl, pt, false, false).unwrap(),
        g.poisson_nll_loss(px, pt, true, true).unwrap(),
        gauss,
        g.gaussian_nll_loss(gx, gt, gv, true).unwrap(),
        dvar,
    ];
    let want = [
        vec![0.952_574_1, 0.035_972_42],
        vec![0.971_422_2],
        vec![0.833_333_3],
        vec![0.901_853_5],
        vec![0.1],
        vec![0.347_345_9],
        vec![0.968_552_3],
        vec![0.871_235_2],
        vec![1.556_579_4],
        vec![-2.135_918_4],
        vec![-1.216_979_9],
        vec![0.166_666_67, 166_666.67, 0.041_666_668],
    ];
    let feeds = [
        ("a", &t(&[4], &[1., 2., 3., -4.])),
        ("x", &t(&[3], &[0.5, -1., 2.])),
        ("y", &t(&[3], &[1., -1., -1.])),
        ("x2", &t(&[2, 2], &[0.5, -1., 2., 0.])),
        ("y2", &t(&[2, 2], &[1., 0., 0., 1.])),
        ("ea", &t(&[2, 2], &[1., 2., 3., 4.])),
        ("eb", &t(&[2, 2], &[2., 1., -3., -4.])),
        ("eb2", &t(&[2, 2], &[2., 1., 3., 5.])),
        ("ey", &t(&[2], &[1., -1.])),
        ("px", &t(&[3], &[0.5, -1., 2.])),
        ("pl", &t(&[3], &[0.5, 1.5, 2.])),
        ("pt", &t(&[3], &[1., 0., 3.])),
        ("gx", &t(&[3], &[1., 2., 3.])),
        ("gt", &t(&[3], &[1.5, 2., 2.])),
        ("gv", &t(&[3], &[0.5, 1e-8, 2.])),
    ];
    common::expect_values(&g, &outs, &feeds, &want, (1e-5, 1e-5));
    assert!(g.glu(x, 0).unwrap_err().to_string().contains("odd"));
    // gradients through each
    let g = Graph::new();
    let (u, v) = (g.input("u", [3, 6]), g.input("v", [3, 6]));
    let sign = g.input("sign", [3, 6]);
    let rows = g.input("rows", [3]);
    let var = g.input("var", [3, 1]);
    let loss = [
        random_projection(&g, g.glu(u, 1).unwrap(), 1),
        g.soft_margin_loss(u, sign).unwrap(),
        g.hinge_embedding_loss(u, sign, 0.7).unwrap(),
        g.cosine_embedding_loss(u, v, rows, 0.1).unwrap(),
        g.poisson_nll_loss(u, g.abs(v).unwrap(), true, true)
            .unwrap(),
        g.gaussian_nll_loss(u, v, var, false).unwrap(),
    ]
    .into_iter()
    .reduce(|s, l| g.add(s, l).unwrap())
    .unwrap();
    let pm = |n: usize| {
        (0..n)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect::<Vec<f32>>()
    };
    let (uv, vv) = (rand(&[3, 6], 5), rand(&[3, 6], 6));
    let (sv, rv) = (t(&[3, 6], &pm(18)), t(&[3], &[1., -1., -1.]));
    let varv = t(&[3, 1], &[0.5, 1.2, 2.0]);
    let feeds = [
        ("u", &uv),
        ("v", &vv),
        ("sign", &sv),
        ("rows", &rv),
        ("var", &varv),
    ];
    check_gpu_vs_cpu("losses", &g, &[loss], &feeds, TOL_REDUCTION);
    let wrt = [("u", u), ("v", v), ("var", var)];
    gradcheck("losses", &g, loss, &wrt, &feeds, 30, TOL_REDUCTION);
}

/// torch.cdist (the matrix form for p = 2, with a 0 gradient at a row against itself; pairwise
/// norms for other p) against distances written out here, and torch.bucketize both ways.
#[test]
fn cdist_and_bucketize_as_torch() {
    let g = Graph::new();
    let a = g.input("a", [2, 3, 4]);
    let b = g.input("b", [2, 5, 4]);
    let d2 = g.cdist(a, b, 2.0).unwrap();
    let d1 = g.cdist(a, b, 1.0).unwrap();
    let dself = g.cdist(a, a, 2.0).unwrap();
    let (av, bv) = (rand(&[2, 3, 4], 1), rand(&[2, 5, 4], 2));
    let dist = |p: f64| -> Vec<f32> {
        let mut out = Vec::new();
        for n in 0..2 {
            for i in 0..3 {
                for j in 0..5 {
                    let s: f64 = (0..4)
                        .map(|k| {
                            let x = av.data()[(n * 3 + i) * 4 + k] as f64;
                            let y = bv.data()[(n * 5 + j) * 4 + k] as f64;
                            (x - y).abs().powf(p)
                        })
                        .sum();
                    out.push(s.powf(1.0 / p) as f32);
                }
            }
        }
        out
    };
    let feeds = [("a", &av), ("b", &bv)];
    common::expect_values(&g, &[d2, d1], &feeds, &[dist(2.0), dist(1.0)], (1e-5, 1e-5));
    // a row against itself: distance 0 and a finite gradient (torch's 0 there)
    let dx = g.grad(g.sum_all(dself).unwrap(), &[a]).unwrap()[0];
    for dev in common::devices() {
        let out = dev.compile(&g, &[dself, dx]).unwrap().run(&feeds).unwrap();
        for i in 0..3 {
            assert!(out[0].data()[i * 3 + i].abs() < 1e-3, "{:?}", out[0].data());
        }
        assert!(
            out[1].data().iter().all(|v| v.is_finite()),
            "{:?}",
            out[1].data()
        );
    }
    let loss = random_projection(&g, g.add(d2, d1).unwrap(), 3);
    gradcheck(
        "cdist",
        &g,
        loss,
        &[("a", a), ("b", b)],
        &feeds,
        24,
        TOL_REDUCTION,
    );
    // torch.bucketize([[3, 6, 9], [0, 10, 5]], [1, 3, 5, 7, 9]): the boundaries below each,
    // [[1, 3, 4], [0, 5, 2]]; right=True those at or below, [[2, 3, 5], [0, 5, 3]]
    let g = Graph::new();
    let x = g.input("x", [2, 3]);
    let bounds = g.input("bounds", [5]);
    let outs = [
        g.bucketize(x, bounds, false).unwrap(),
        g.bucketize(x, bounds, true).unwrap(),
    ];
    let feeds = [
        ("x", &t(&[2, 3], &[3., 6., 9., 0., 10., 5.])),
        ("bounds", &t(&[5], &[1., 3., 5., 7., 9.])),
    ];
    let want = [vec![1., 3., 4., 0., 5., 2.], vec![2., 3., 5., 0., 5., 3.]];
    common::expect_values(&g, &outs, &feeds, &want, (0.0, 0.0));
    assert!(g
        .cdist(x, bounds, 2.0)
        .unwrap_err()
        .to_string()
        .contains("cdist"));
}
