//! Indexing and scan ops as torch's: `gather`, `index_select`, `cumsum`, and the reductions
//! composed from graph ops (`logsumexp`, `var`, `std`) with `detach`: values worked by hand
//! from torch's definitions, the GPU against the CPU reference (outputs poisoned with NaN
//! first) on awkward shapes, and gradient checks against central differences.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::ops::{TOL_ELEMENTWISE, TOL_REDUCTION};
use kiln::{DType, Graph, Tensor};

fn t(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), v.to_vec()).unwrap()
}

/// Runs `outs` on every device (poisoned first) and compares with `want` exactly.
fn exact(g: &Graph, outs: &[kiln::NodeId], feeds: &[(&str, &Tensor)], want: &[Vec<f32>]) {
    common::expect_values(g, outs, feeds, want, (0.0, 0.0));
}

/// torch.gather and torch.index_select on a (2, 3) matrix, values worked by hand; an index
/// smaller than x off the axis reads that corner; an index outside [0, K) gives NaN.
#[test]
fn gather_and_index_select_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [2, 3]);
    let xs = t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // torch.gather(x, 1, [[2, 0], [1, 1]]) = [[3, 1], [5, 5]]
    let i1 = g.input("i1", [2, 2]);
    let i1s = t(&[2, 2], &[2.0, 0.0, 1.0, 1.0]);
    // torch.gather(x, 0, [[1, 0, 1]]) = [[4, 2, 6]]
    let i0 = g.input("i0", [1, 3]);
    let i0s = t(&[1, 3], &[1.0, 0.0, 1.0]);
    // an index narrower than x off the axis reads x's first columns:
    // torch.gather(x, 0, [[1], [0]]) = [[4], [1]]
    let ic = g.input("ic", [2, 1]);
    let ics = t(&[2, 1], &[1.0, 0.0]);
    // torch.index_select(x, 1, [2, 2, 0]) = [[3, 3, 1], [6, 6, 4]]
    let is = g.input("is", [3]);
    let iss = t(&[3], &[2.0, 2.0, 0.0]);
    // out of range (3), negative, fractional: NaN
    let bad = g.input("bad", [3]);
    let bads = t(&[3], &[3.0, -1.0, 0.5]);
    let outs = [
        g.gather(x, 1, i1).unwrap(),
        g.gather(x, 0, i0).unwrap(),
        g.gather(x, 0, ic).unwrap(),
        g.index_select(x, 1, is).unwrap(),
        g.index_select(x, -1, bad).unwrap(),
    ];
    assert_eq!(g.shape(outs[2]).dims(), &[2, 1]);
    assert_eq!(g.shape(outs[3]).dims(), &[2, 3]);
    let nan = f32::NAN;
    let want = [
        vec![3.0, 1.0, 5.0, 5.0],
        vec![4.0, 2.0, 6.0],
        vec![4.0, 1.0],
        vec![3.0, 3.0, 1.0, 6.0, 6.0, 4.0],
        vec![nan; 6],
    ];
    let feeds = [
        ("x", &xs),
        ("i1", &i1s),
        ("i0", &i0s),
        ("ic", &ics),
        ("is", &iss),
        ("bad", &bads),
    ];
    exact(&g, &outs, &feeds, &want);
    // the gradient adds into the picked elements: index_select [2, 2, 0] of ones gives
    // [[1, 0, 2], [1, 0, 2]]; gather(x, 1, [[2, 0], [1, 1]]) gives [[1, 0, 1], [0, 2, 0]]
    let l1 = g.sum_all(outs[3]).unwrap();
    let l2 = g.sum_all(outs[0]).unwrap();
    let d1 = g.grad(l1, &[x]).unwrap()[0];
    let d2 = g.grad(l2, &[x]).unwrap()[0];
    let want = [
        vec![1.0, 0.0, 2.0, 1.0, 0.0, 2.0],
        vec![1.0, 0.0, 1.0, 0.0, 2.0, 0.0],
    ];
    exact(&g, &[d1, d2], &feeds, &want);
    // shape errors name the op and the shapes
    let i3 = g.input("i3", [1, 4]);
    let i2d = g.input("i2d", [2, 2]);
    let half = g.cast(i1, DType::F16).unwrap();
    for (name, err) in [
        ("gather", g.gather(x, 0, i3).unwrap_err()),
        ("gather", g.gather(x, 1, is).unwrap_err()),
        ("gather", g.gather(x, 2, i1).unwrap_err()),
        ("index_select", g.index_select(x, 0, i2d).unwrap_err()),
        ("gather", g.gather(x, 1, half).unwrap_err()),
    ] {
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// Gather and index select along every axis of awkward shapes (primes, 1), repeated and
/// out-of-range indices, the GPU against the CPU; gradient checks of both, and of the
/// gradient's own gradient (a gather again).
#[test]
fn gather_on_awkward_shapes_with_gradients() {
    let shape = [3usize, 7, 5];
    let xs = rand(&shape, 11);
    for axis in 0..3 {
        let g = Graph::new();
        let x = g.input("x", shape);
        let k = shape[axis];
        // an index of 4 along the axis (more than some axes hold: repeats), one less off it
        // where the axis allows (a corner)
        let mut idims = shape;
        idims[axis] = 4;
        if axis != 1 {
            idims[1] = 6;
        }
        let n: usize = idims.iter().product();
        let ids: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) % k) as f32).collect();
        let ids = t(&idims, &ids);
        let sel: Vec<f32> = (0..9).map(|i| ((i * 5 + 1) % k) as f32).collect();
        let sel = t(&[9], &sel);
        let index = g.input("index", idims);
        let select = g.input("select", [9]);
        let a = g.gather(x, axis as isize, index).unwrap();
        let b = g.index_select(x, axis as isize, select).unwrap();
        let feeds = [("x", &xs), ("index", &ids), ("select", &sel)];
        let what = format!("axis {axis}");
        check_gpu_vs_cpu(&what, &g, &[a, b], &feeds, TOL_ELEMENTWISE);
        let loss = g
            .add(random_projection(&g, a, 1), random_projection(&g, b, 2))
            .unwrap();
        gradcheck(&what, &g, loss, &[("x", x)], &feeds, 30, TOL_REDUCTION);
        // the gradient's gradient, with respect to the incoming gradient: a gather
        let dy = g.input("dy", g.shape(a));
        let dys = rand(g.shape(a).dims(), 5);
        let inner = g.sum_all(g.mul(a, dy).unwrap()).unwrap();
        let dx = g.grad(inner, &[x]).unwrap()[0];
        let outer = random_projection(&g, dx, 3);
        let feeds = [("x", &xs), ("index", &ids), ("select", &sel), ("dy", &dys)];
        gradcheck(&what, &g, outer, &[("dy", dy)], &feeds, 30, TOL_REDUCTION);
    }
    // f16 tensors (the indices stay f32)
    let g = Graph::new();
    let x = g.input("x", shape);
    let index = g.input("index", [5]);
    let ids = t(&[5], &[6.0, 0.0, 6.0, 3.0, 2.0]);
    let h = g.cast(x, DType::F16).unwrap();
    let y = g.index_select(h, 1, index).unwrap();
    let loss = g
        .sum_all(g.cast(g.square(y).unwrap(), DType::F32).unwrap())
        .unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    let out = g.cast(y, DType::F32).unwrap();
    check_gpu_vs_cpu(
        "f16",
        &g,
        &[out, dx],
        &[("x", &xs), ("index", &ids)],
        (1e-3, 1e-2),
    );
}

/// torch.cumsum: values by hand, the GPU against the CPU along each axis (rows longer than a
/// workgroup's 256, lines across the inner axis, extents of 1), gradient checks (the cumsum of
/// the gradient from the other end).
#[test]
fn cumsum_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [2, 4]);
    let xs = t(&[2, 4], &[1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.25, 2.0]);
    let outs = [g.cumsum(x, 1).unwrap(), g.cumsum(x, 0).unwrap()];
    let want = [
        vec![1.0, 3.0, 6.0, 10.0, -1.0, -0.5, -0.25, 1.75],
        vec![1.0, 2.0, 3.0, 4.0, 0.0, 2.5, 3.25, 6.0],
    ];
    exact(&g, &outs, &[("x", &xs)], &want);
    // d/dx of sum(w * cumsum(x)) along the row: w's sums from the end
    let w = g.constant(t(&[2, 4], &[1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 1.0]));
    let loss = g.sum_all(g.mul(outs[0], w).unwrap()).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    exact(
        &g,
        &[dx],
        &[("x", &xs)],
        &[vec![10.0, 9.0, 7.0, 4.0, 1.0, 1.0, 1.0, 1.0]],
    );
    for (shape, axis) in [
        (vec![3, 601], 1),
        (vec![1, 1], 0),
        (vec![4, 37, 3], 1),
        (vec![4, 37, 3], 0),
        (vec![5, 2, 257], -1),
    ] {
        let g = Graph::new();
        let x = g.input("x", shape.clone());
        let xs = rand(&shape, 4);
        let y = g.cumsum(x, axis).unwrap();
        let what = format!("{shape:?} axis {axis}");
        check_gpu_vs_cpu(&what, &g, &[y], &[("x", &xs)], TOL_REDUCTION);
        let loss = random_projection(&g, y, 9);
        gradcheck(
            &what,
            &g,
            loss,
            &[("x", x)],
            &[("x", &xs)],
            20,
            TOL_REDUCTION,
        );
    }
}

/// logsumexp, var and std as torch's: values by hand (torch.logsumexp([1, 2, 3]) =
/// 3.4076059; an all -inf row gives -inf, one holding inf gives inf; var([1, 2, 3, 4]) = 5/3
/// unbiased, 1.25 with correction 0); GPU against CPU and gradient checks; `detach` stops the
/// gradient and costs no kernel where it fuses.
#[test]
fn logsumexp_var_std_and_detach() {
    let g = Graph::new();
    let x = g.input("x", [3, 4]);
    let inf = f32::INFINITY;
    let xs = t(
        &[3, 4],
        &[
            1.0, 2.0, 3.0, 4.0, -inf, -inf, -inf, -inf, 0.0, inf, 1.0, -inf,
        ],
    );
    let lse = g.logsumexp(x, 1, false).unwrap();
    assert_eq!(g.shape(lse).dims(), &[3]);
    let v = g.input("v", [1, 4]);
    let vs = t(&[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let outs = [
        lse,
        g.var(v, 1, 1, false).unwrap(),
        g.var(v, -1, 0, true).unwrap(),
        g.std(v, 1, 0, false).unwrap(),
    ];
    assert_eq!(g.shape(outs[2]).dims(), &[1, 1]);
    let want_lse = (1..=4).map(|v| (v as f64).exp()).sum::<f64>().ln() as f32;
    for dev in common::devices() {
        let mut plan = dev.compile(&g, &outs).unwrap();
        plan.poison(f32::NAN);
        let got = plan.run(&[("x", &xs), ("v", &vs)]).unwrap();
        let l = got[0].data();
        assert!((l[0] - want_lse).abs() < 1e-6, "{l:?}");
        assert_eq!((l[1], l[2]), (-inf, inf), "{l:?}");
        assert!((got[1].data()[0] - 5.0 / 3.0).abs() < 1e-6);
        assert!((got[2].data()[0] - 1.25).abs() < 1e-6);
        assert!((got[3].data()[0] - 1.25f32.sqrt()).abs() < 1e-6);
    }
    // random values on awkward shapes, every axis, keepdim both ways
    let shape = [5usize, 3, 7];
    let xs = rand(&shape, 21);
    for axis in 0..3isize {
        for keepdim in [false, true] {
            let g = Graph::new();
            let x = g.input("x", shape);
            let outs = [
                g.logsumexp(x, axis, keepdim).unwrap(),
                g.var(x, axis, 1, keepdim).unwrap(),
                g.std(x, axis, 0, keepdim).unwrap(),
            ];
            let what = format!("axis {axis} keepdim {keepdim}");
            check_gpu_vs_cpu(&what, &g, &outs, &[("x", &xs)], TOL_REDUCTION);
            let loss = outs
                .iter()
                .enumerate()
                .map(|(k, &o)| random_projection(&g, o, k as u64))
                .reduce(|a, b| g.add(a, b).unwrap())
                .unwrap();
            gradcheck(
                &what,
                &g,
                loss,
                &[("x", x)],
                &[("x", &xs)],
                30,
                TOL_REDUCTION,
            );
        }
    }
    // d/dx sum(x * detach(x)) = detach(x): x, not 2x; the detach fuses into the product
    let g = Graph::new();
    let x = g.input("x", [6]);
    let xs = rand(&[6], 3);
    let loss = g.sum_all(g.mul(x, g.detach(x).unwrap()).unwrap()).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    exact(&g, &[dx], &[("x", &xs)], &[xs.data().to_vec()]);
    if let Some(dev) = common::gpu() {
        let plan = dev.compile(&g, &[loss]).unwrap();
        let kernels: Vec<String> = plan.kernels().iter().map(|k| k.to_string()).collect();
        assert_eq!(common::count_op(&kernels, "detach"), 0, "{kernels:#?}");
    }
}

/// torch.topk and torch.sort: values and positions worked by hand (ties take the lower
/// position, NaN sorts above every number), along the last axis and another; the GPU against
/// the CPU on rows longer than a workgroup, f16 values; the values' gradient goes to the
/// picked elements; k out of range is an error.
#[test]
fn topk_and_sort_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [2, 5]);
    let nan = f32::NAN;
    let xs = t(
        &[2, 5],
        &[3.0, 1.0, 4.0, 1.0, 5.0, 2.0, nan, -1.0, 2.0, 0.0],
    );
    let (v3, i3) = g.topk(x, 3, -1, true).unwrap();
    let (v2, i2) = g.topk(x, 2, 1, false).unwrap();
    let (sv, si) = g.sort(x, -1, false).unwrap();
    // along axis 0: the larger of each column
    let (c1, ci) = g.topk(x, 1, 0, true).unwrap();
    assert_eq!(g.shape(c1).dims(), &[1, 5]);
    let want = [
        vec![5.0, 4.0, 3.0, nan, 2.0, 2.0],
        vec![4.0, 2.0, 0.0, 1.0, 0.0, 3.0],
        vec![1.0, 1.0, -1.0, 0.0],
        vec![1.0, 3.0, 2.0, 4.0],
        vec![1.0, 1.0, 3.0, 4.0, 5.0, -1.0, 0.0, 2.0, 2.0, nan],
        vec![1.0, 3.0, 0.0, 2.0, 4.0, 2.0, 4.0, 0.0, 3.0, 1.0],
        vec![3.0, nan, 4.0, 2.0, 5.0],
        vec![0.0, 1.0, 0.0, 1.0, 0.0],
    ];
    let outs = [v3, i3, v2, i2, sv, si, c1, ci];
    exact(&g, &outs, &[("x", &xs)], &want);
    // the values' gradient: dy at the picked positions, 0 elsewhere
    let loss = g.sum_all(v2).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    let want = vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0];
    exact(&g, &[dx], &[("x", &xs)], &[want]);
    for k in [0, 6] {
        let err = g.topk(x, k, -1, true).unwrap_err().to_string();
        assert!(err.contains("topk") && err.contains("k ="), "{err}");
    }
    // rows longer than a workgroup, repeated values (ties), f16
    for (shape, k) in [(vec![3, 700], 9), (vec![4, 1, 37], 37), (vec![1, 1], 1)] {
        let g = Graph::new();
        let x = g.input("x", shape.clone());
        let n: usize = shape.iter().product();
        // values on a coarse grid: many ties
        let xs = t(
            &shape,
            &(0..n)
                .map(|i| ((i * 37) % 23) as f32 - 11.0)
                .collect::<Vec<_>>(),
        );
        let (v, i) = g.topk(x, k, -1, true).unwrap();
        let (sv, si) = g.sort(x, -1, false).unwrap();
        let h = g.cast(x, DType::F16).unwrap();
        let (hv, hi) = g.topk(h, k, -1, false).unwrap();
        let hv = g.cast(hv, DType::F32).unwrap();
        let what = format!("{shape:?} k {k}");
        check_gpu_vs_cpu(
            &what,
            &g,
            &[v, i, sv, si, hv, hi],
            &[("x", &xs)],
            (0.0, 0.0),
        );
        // distinct values: central differences do not change which elements are picked
        let loss = random_projection(&g, v, 3);
        let xr = common::spread(&shape);
        gradcheck(
            &what,
            &g,
            loss,
            &[("x", x)],
            &[("x", &xr)],
            20,
            TOL_REDUCTION,
        );
    }
}

/// torch's order, written out independently of the engine: `(value, position)` pairs, larger
/// first (smaller without `largest`), NaN above every number, the lower position among equals.
fn torch_order(row: &[f32], largest: bool) -> Vec<usize> {
    let mut pos: Vec<usize> = (0..row.len()).collect();
    pos.sort_by(|&i, &j| {
        let (a, b) = (row[i], row[j]);
        let by_value = match (a.is_nan(), b.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            _ => a.partial_cmp(&b).unwrap(),
        };
        let by_value = if largest {
            by_value.reverse()
        } else {
            by_value
        };
        by_value.then(i.cmp(&j))
    });
    pos
}

/// Rows longer than a sort block (1024): sorted blocks, then merges of sorted runs (a partial
/// last block and run, NaN, infinities and many ties), and many short rows sharing
/// workgroups, against a sort written out here, on every device with outputs poisoned; `topk`
/// past the passes' k the same way; the count of merge kernels.
#[test]
fn sort_of_long_rows_in_blocks_and_merges() {
    // (short rows share a workgroup: 32 rows of 20 in each, the last one part full)
    for shape in [
        vec![3usize, 2500],
        vec![2, 4097],
        vec![1, 1025],
        vec![5, 9],
        vec![100, 20],
        vec![37, 9],
    ] {
        let c = shape[1];
        let n: usize = shape.iter().product();
        let xs: Vec<f32> = (0..n)
            .map(|i| match i % 97 {
                5 => f32::NAN,
                7 => f32::INFINITY,
                9 => f32::NEG_INFINITY,
                _ => ((i * 37) % 23) as f32 - 11.0,
            })
            .collect();
        let g = Graph::new();
        let x = g.input("x", shape.clone());
        let (sv, si) = g.sort(x, -1, false).unwrap();
        let (dv, di) = g.sort(x, -1, true).unwrap();
        let k = 20.min(c);
        let (tv, ti) = g.topk(x, k, -1, true).unwrap();
        let mut want = vec![Vec::new(); 6];
        for row in xs.chunks(c) {
            for (w, largest, take) in [(0, false, c), (2, true, c), (4, true, k)] {
                let order = torch_order(row, largest);
                want[w].extend(order[..take].iter().map(|&p| row[p]));
                want[w + 1].extend(order[..take].iter().map(|&p| p as f32));
            }
        }
        let outs = [sv, si, dv, di, tv, ti];
        exact(&g, &outs, &[("x", &t(&shape, &xs))], &want);
        if let Some(dev) = common::gpu() {
            let plan = dev.compile(&g, &[si]).unwrap();
            let merges = c.div_ceil(1024).next_power_of_two().trailing_zeros() as usize;
            assert_eq!(
                common::count_op(&plan.kernels(), "merge_runs"),
                merges,
                "{shape:?}: {:?}",
                plan.kernels()
            );
        }
    }
}

/// torch.scatter_add, index_add, one_hot, tril/triu, repeat and repeat_interleave: torch's
/// documented examples, worked by hand, on every device with outputs poisoned.
#[test]
fn scatter_add_index_add_and_layout_helpers_as_torch() {
    let g = Graph::new();
    // torch.zeros(3, 5).scatter_add(0, index, torch.ones(2, 5)) with
    // index = [[0, 1, 2, 0, 0], [0, 1, 2, 2, 2]]: [[2,0,0,1,1],[0,2,0,0,0],[0,0,2,1,1]];
    // with the first row of it alone: [[1,0,0,1,1],[0,1,0,0,0],[0,0,1,0,0]]
    let zeros = g.input("zeros", [3, 5]);
    let ones = g.input("ones", [2, 5]);
    let i2 = g.input("i2", [2, 5]);
    let i1 = g.input("i1", [1, 5]);
    // an index narrower than a off the axis: along axis 1, index [[4, 4], [0, 1]] of (2, 2)
    // into (3, 5) adds ones[0, :2] at (0, 4) twice and ones[1, :2] at (1, 0), (1, 1)
    let ic = g.input("ic", [2, 2]);
    // torch.ones(5, 3).index_add_(0, [0, 4, 2], [[1,2,3],[4,5,6],[7,8,9]])
    let x53 = g.input("x53", [5, 3]);
    let sel = g.input("sel", [3]);
    let t33 = g.input("t33", [3, 3]);
    // one_hot(arange(5) % 3, 3); a label out of range (3) gives a zero row
    let labels = g.input("labels", [6]);
    let m = g.input("m", [3, 4]);
    let v = g.input("v", [3]);
    let p = g.input("p", [2, 2]);
    let outs = [
        g.scatter_add(zeros, 0, i2, ones).unwrap(),
        g.scatter_add(zeros, 0, i1, ones).unwrap(),
        g.scatter_add(zeros, 1, ic, ones).unwrap(),
        g.index_add(x53, 0, sel, t33).unwrap(),
        g.one_hot(labels, 3).unwrap(),
        g.tril(m, 0).unwrap(),
        g.tril(m, -1).unwrap(),
        g.triu(m, 1).unwrap(),
        g.repeat(v, &[2, 2]).unwrap(),
        g.repeat_interleave(p, 2, 0).unwrap(),
        g.repeat_interleave(p, 2, 1).unwrap(),
    ];
    assert_eq!(g.shape(outs[4]).dims(), &[6, 3]);
    assert_eq!(g.shape(outs[8]).dims(), &[2, 6]);
    assert_eq!(g.shape(outs[9]).dims(), &[4, 2]);
    assert_eq!(g.shape(outs[10]).dims(), &[2, 4]);
    let ms: Vec<f32> = (1..=12).map(|i| i as f32).collect();
    let want = [
        vec![2., 0., 0., 1., 1., 0., 2., 0., 0., 0., 0., 0., 2., 1., 1.],
        vec![1., 0., 0., 1., 1., 0., 1., 0., 0., 0., 0., 0., 1., 0., 0.],
        vec![0., 0., 0., 0., 2., 1., 1., 0., 0., 0., 0., 0., 0., 0., 0.],
        vec![2., 3., 4., 1., 1., 1., 8., 9., 10., 1., 1., 1., 5., 6., 7.],
        vec![
            1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 0., 0., 0., 1., 0., 0., 0., 0.,
        ],
        vec![1., 0., 0., 0., 5., 6., 0., 0., 9., 10., 11., 0.],
        vec![0., 0., 0., 0., 5., 0., 0., 0., 9., 10., 0., 0.],
        vec![0., 2., 3., 4., 0., 0., 7., 8., 0., 0., 0., 12.],
        vec![1., 2., 3., 1., 2., 3., 1., 2., 3., 1., 2., 3.],
        vec![1., 2., 1., 2., 3., 4., 3., 4.],
        vec![1., 1., 2., 2., 3., 3., 4., 4.],
    ];
    let feeds = [
        ("zeros", &t(&[3, 5], &[0.0; 15])),
        ("ones", &t(&[2, 5], &[1.0; 10])),
        ("i2", &t(&[2, 5], &[0., 1., 2., 0., 0., 0., 1., 2., 2., 2.])),
        ("i1", &t(&[1, 5], &[0., 1., 2., 0., 0.])),
        ("ic", &t(&[2, 2], &[4., 4., 0., 1.])),
        ("x53", &t(&[5, 3], &[1.0; 15])),
        ("sel", &t(&[3], &[0., 4., 2.])),
        ("t33", &t(&[3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.])),
        ("labels", &t(&[6], &[0., 1., 2., 0., 1., 3.])),
        ("m", &t(&[3, 4], &ms)),
        ("v", &t(&[3], &[1., 2., 3.])),
        ("p", &t(&[2, 2], &[1., 2., 3., 4.])),
    ];
    exact(&g, &outs, &feeds, &want);
    // an index out of range adds nowhere, and its source's gradient is NaN (torch raises)
    let a = g.input("a", [3]);
    let bad = g.input("bad", [3]);
    let src = g.input("src", [3]);
    let y = g.scatter_add(a, 0, bad, src).unwrap();
    let dsrc = g.grad(g.sum_all(y).unwrap(), &[src]).unwrap()[0];
    let feeds = [
        ("a", &t(&[3], &[1., 2., 3.])),
        ("bad", &t(&[3], &[2., 3., -1.])),
        ("src", &t(&[3], &[10., 20., 30.])),
    ];
    let nan = f32::NAN;
    exact(
        &g,
        &[y, dsrc],
        &feeds,
        &[vec![1., 2., 13.], vec![1., nan, nan]],
    );
    // tril keeps an inf below the diagonal and drops one above it to exactly 0
    let inf = g.input("inf", [2, 2]);
    let infs = t(&[2, 2], &[1.0, f32::INFINITY, f32::NEG_INFINITY, 2.0]);
    let lo = g.tril(inf, 0).unwrap();
    exact(
        &g,
        &[lo],
        &[("inf", &infs)],
        &[vec![1.0, 0.0, f32::NEG_INFINITY, 2.0]],
    );
}

/// scatter_add and index_add on awkward shapes along each axis (repeated indices, a narrow
/// index), GPU against CPU, and gradient checks for `a` and `src`; repeat,
/// repeat_interleave and tril gradients; shape errors.
#[test]
fn scatter_add_and_index_add_gradients() {
    let shape = [3usize, 7, 5];
    for axis in 0..3 {
        let g = Graph::new();
        let a = g.input("a", shape);
        let k = shape[axis];
        let mut idims = shape;
        idims[axis] = 4;
        if axis != 1 {
            idims[1] = 6; // narrower than a off the axis
        }
        let mut sdims = idims;
        sdims[0] += 1; // src larger than the index: only its corner is read
        let n: usize = idims.iter().product();
        let ids: Vec<f32> = (0..n).map(|i| ((i * 7 + 3) % k) as f32).collect();
        let ids = t(&idims, &ids);
        let mut seldims = shape;
        seldims[axis] = 9;
        let sel: Vec<f32> = (0..9).map(|i| ((i * 5 + 1) % k) as f32).collect();
        let sel = t(&[9], &sel);
        let index = g.input("index", idims);
        let select = g.input("select", [9]);
        let src = g.input("src", sdims);
        let rows = g.input("rows", seldims);
        let s = g.scatter_add(a, axis as isize, index, src).unwrap();
        let ia = g.index_add(a, axis as isize, select, rows).unwrap();
        let (as_, ss, rs) = (rand(&shape, 1), rand(&sdims, 2), rand(&seldims, 3));
        let feeds = [
            ("a", &as_),
            ("index", &ids),
            ("select", &sel),
            ("src", &ss),
            ("rows", &rs),
        ];
        let what = format!("axis {axis}");
        check_gpu_vs_cpu(&what, &g, &[s, ia], &feeds, TOL_ELEMENTWISE);
        let loss = g
            .add(random_projection(&g, s, 4), random_projection(&g, ia, 5))
            .unwrap();
        let wrt = [("a", a), ("src", src), ("rows", rows)];
        gradcheck(&what, &g, loss, &wrt, &feeds, 30, TOL_REDUCTION);
    }
    // repeat, repeat_interleave and tril: their gradients sum the copies, mask the triangle
    let g = Graph::new();
    let x = g.input("x", [3, 4]);
    let r = g.repeat(x, &[2, 1, 3]).unwrap();
    let ri = g.repeat_interleave(x, 3, 1).unwrap();
    let tr = g.triu(x, -1).unwrap();
    let loss = g
        .add(
            g.add(random_projection(&g, r, 6), random_projection(&g, ri, 7))
                .unwrap(),
            random_projection(&g, tr, 8),
        )
        .unwrap();
    let xs = rand(&[3, 4], 9);
    gradcheck(
        "repeat",
        &g,
        loss,
        &[("x", x)],
        &[("x", &xs)],
        12,
        TOL_REDUCTION,
    );
    // shape errors name the op and the shapes
    let g = Graph::new();
    let a = g.input("a", [3, 4]);
    let i = g.input("i", [2, 5]);
    let s = g.input("s", [2, 5]);
    let e = g.scatter_add(a, 0, i, s).unwrap_err().to_string();
    assert!(e.contains("scatter_add") && e.contains("[2, 5]"), "{e}");
    let j = g.input("j", [2]);
    let e = g.index_add(a, 0, j, a).unwrap_err().to_string();
    assert!(e.contains("index_add") && e.contains("[3, 4]"), "{e}");
    assert!(g
        .repeat(a, &[2])
        .unwrap_err()
        .to_string()
        .contains("repeat"));
    assert!(g.tril(j, 0).unwrap_err().to_string().contains("tril"));
    assert!(g.one_hot(j, 0).unwrap_err().to_string().contains("one_hot"));
}
