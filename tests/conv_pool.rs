//! Convolution and pooling (NCHW, PyTorch semantics): the CPU reference against direct loops and
//! hand-worked examples, GPU against the CPU reference on random and awkward shapes (every GPU
//! buffer poisoned with NaN first), gradient checks, adjointness of the backward ops, shape errors.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::ops::conv::{ColGeometry, Conv2dOpts, ConvTranspose2dOpts};
use kiln::ops::pool::Pool2d;
use kiln::ops::{TOL_ELEMENTWISE, TOL_REDUCTION};
use kiln::{DType, Device, Error, Graph, NodeId, Tensor};

type Pair = (usize, usize);

fn opts(stride: Pair, padding: Pair, dilation: Pair) -> Conv2dOpts {
    Conv2dOpts {
        stride,
        padding,
        dilation,
    }
}

/// Runs `outputs` on the CPU reference.
fn cpu_run(g: &Graph, outputs: &[NodeId], feeds: &[(&str, &Tensor)]) -> Vec<Tensor> {
    let mut plan = Device::cpu().compile(g, outputs).expect("cpu compile");
    plan.run(feeds).expect("cpu run")
}

/// conv2d as torch defines it, in direct loops (f64), independent of im2col.
fn naive_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, o: Conv2dOpts) -> Tensor {
    naive_grouped_conv(x, w, b, o, 1)
}

/// conv2d in `groups` groups as torch defines it, in direct loops (f64).
fn naive_grouped_conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    o: Conv2dOpts,
    groups: usize,
) -> Tensor {
    let [n, xc, h, wd] = x.dims().try_into().unwrap();
    let [oc, c, kh, kw] = w.dims().try_into().unwrap();
    let og = oc / groups;
    let ho = (h + 2 * o.padding.0 - o.dilation.0 * (kh - 1) - 1) / o.stride.0 + 1;
    let wo = (wd + 2 * o.padding.1 - o.dilation.1 * (kw - 1) - 1) / o.stride.1 + 1;
    let mut out = Vec::new();
    for bn in 0..n {
        for f in 0..oc {
            for oh in 0..ho {
                for ow in 0..wo {
                    let mut acc = b.map_or(0.0, |b| b.data()[f] as f64);
                    for ch in 0..c {
                        let xch = f / og * c + ch;
                        for i in 0..kh {
                            for j in 0..kw {
                                let ih = (oh * o.stride.0 + i * o.dilation.0) as isize
                                    - o.padding.0 as isize;
                                let iw = (ow * o.stride.1 + j * o.dilation.1) as isize
                                    - o.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                    continue;
                                }
                                let xv = x.data()
                                    [((bn * xc + xch) * h + ih as usize) * wd + iw as usize];
                                let wv = w.data()[((f * c + ch) * kh + i) * kw + j];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out.push(acc as f32);
                }
            }
        }
    }
    Tensor::new(vec![n, oc, ho, wo], out).unwrap()
}

/// (N, C, H, W), (O, kh, kw), stride, padding, dilation, bias.
type ConvCase = ([usize; 4], [usize; 3], Pair, Pair, Pair, bool);

const CONV_CASES: &[ConvCase] = &[
    ([2, 3, 8, 8], [4, 3, 3], (1, 1), (0, 0), (1, 1), true),
    ([1, 1, 7, 5], [1, 1, 1], (1, 1), (0, 0), (1, 1), false), // 1x1 kernel, batch 1, channels 1
    ([2, 3, 11, 13], [5, 3, 3], (2, 2), (1, 1), (1, 1), true), // primes, stride 2 with padding
    ([1, 2, 9, 7], [3, 3, 2], (1, 1), (2, 1), (2, 2), false), // dilation 2
    ([3, 2, 5, 5], [3, 5, 5], (1, 1), (0, 0), (1, 1), true),  // kernel as large as the input
    ([1, 3, 4, 4], [2, 6, 6], (1, 1), (1, 1), (1, 1), true),  // as large as the padded input
    ([2, 3, 10, 17], [7, 2, 5], (3, 2), (1, 2), (1, 3), true), // everything asymmetric
    ([1, 5, 9, 9], [3, 1, 1], (2, 2), (0, 0), (1, 1), true),  // 1x1 kernel, stride 2
    ([1, 1, 1, 1], [1, 1, 1], (1, 1), (0, 0), (1, 1), true),  // a single pixel
    ([2, 8, 16, 16], [67, 3, 3], (1, 1), (1, 1), (1, 1), true), // past the 64x64 matmul tile
];

#[test]
fn conv2d_reference_matches_direct_loops() {
    for (k, &(xs, [oc, kh, kw], s, p, d, bias)) in CONV_CASES.iter().enumerate() {
        let o = opts(s, p, d);
        let ws = [oc, xs[1], kh, kw];
        let (xv, wv, bv) = (
            rand(&xs, 100 + k as u64),
            rand(&ws, 200 + k as u64),
            rand(&[oc], 300 + k as u64),
        );
        let g = Graph::new();
        let x = g.input("x", xs);
        let w = g.input("w", ws);
        let b = g.input("b", [oc]);
        let y = g.conv2d(x, w, bias.then_some(b), o).unwrap();
        let got = cpu_run(&g, &[y], &[("x", &xv), ("w", &wv), ("b", &bv)]);
        let want = naive_conv(&xv, &wv, bias.then_some(&bv), o);
        common::assert_close(&format!("conv2d case {k}"), &got[0], &want, 1e-5, 1e-5);
    }
}

#[test]
fn conv2d_gpu_matches_cpu() {
    for (k, &(xs, [oc, kh, kw], s, p, d, bias)) in CONV_CASES.iter().enumerate() {
        let o = opts(s, p, d);
        let ws = [oc, xs[1], kh, kw];
        let g = Graph::new();
        let x = g.input("x", xs);
        let w = g.input("w", ws);
        let b = g.input("b", [oc]);
        let y = g.conv2d(x, w, bias.then_some(b), o).unwrap();
        // the columns on their own, too
        let cols = g.im2col(x, (kh, kw), o).unwrap();
        let (xv, wv, bv) = (
            rand(&xs, 400 + k as u64),
            rand(&ws, 500 + k as u64),
            rand(&[oc], 600 + k as u64),
        );
        check_gpu_vs_cpu(
            &format!("conv2d x {xs:?} w {ws:?} {o:?} bias {bias}"),
            &g,
            &[y, cols],
            &[("x", &xv), ("w", &wv), ("b", &bv)],
            TOL_REDUCTION,
        );
    }
}

#[test]
fn col2im_gpu_matches_cpu_and_is_the_adjoint_of_im2col() {
    for (k, &(xs, [_, kh, kw], s, p, d, _)) in CONV_CASES.iter().enumerate() {
        let o = opts(s, p, d);
        let g = Graph::new();
        let x = g.input("x", xs);
        let sx = g.shape(x);
        let geom = ColGeometry::new("test", &sx, (kh, kw), o).unwrap();
        let cs = geom.cols_shape(xs[0]);
        let c = g.input("c", cs.clone());
        let img = g.col2im(c, geom).unwrap();
        let cols = g.im2col(x, (kh, kw), o).unwrap();
        let (xv, cv) = (rand(&xs, 700 + k as u64), rand(cs.dims(), 800 + k as u64));
        let feeds = [("x", &xv), ("c", &cv)];
        check_gpu_vs_cpu(
            &format!("col2im {xs:?} kernel {kh}x{kw} {o:?}"),
            &g,
            &[img],
            &feeds,
            TOL_REDUCTION,
        );
        // <im2col(x), c> == <x, col2im(c)>
        let out = cpu_run(&g, &[cols, img], &feeds);
        let (lhs, rhs) = (common::dot(&out[0], &cv), common::dot(&xv, &out[1]));
        assert!(
            (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
            "case {k}: <im2col(x), c> = {lhs}, <x, col2im(c)> = {rhs}"
        );
    }
}

#[test]
fn conv2d_gradients() {
    let cases: &[ConvCase] = &[
        ([2, 2, 5, 6], [3, 3, 3], (2, 1), (1, 1), (1, 2), true),
        ([1, 3, 4, 4], [2, 2, 2], (1, 1), (0, 0), (1, 1), true),
        ([2, 1, 6, 5], [2, 3, 1], (1, 2), (1, 0), (2, 1), true),
    ];
    for (k, &(xs, [oc, kh, kw], s, p, d, _)) in cases.iter().enumerate() {
        let o = opts(s, p, d);
        let ws = [oc, xs[1], kh, kw];
        let g = Graph::new();
        let x = g.input("x", xs);
        let w = g.input("w", ws);
        let b = g.input("b", [oc]);
        let y = g.conv2d(x, w, Some(b), o).unwrap();
        let loss = random_projection(&g, y, 900 + k as u64);
        let (xv, wv, bv) = (
            rand(&xs, 910 + k as u64),
            rand(&ws, 920 + k as u64),
            rand(&[oc], 930 + k as u64),
        );
        gradcheck(
            &format!("conv2d x {xs:?} w {ws:?} {o:?}"),
            &g,
            loss,
            &[("x", x), ("w", w), ("b", b)],
            &[("x", &xv), ("w", &wv), ("b", &bv)],
            24,
            TOL_REDUCTION,
        );
    }
}

/// (N, C, H, W), (O, kh, kw), groups, stride, padding, dilation.
type GroupedCase = ([usize; 4], [usize; 3], usize, Pair, Pair, Pair);

const GROUPED_CASES: &[GroupedCase] = &[
    ([2, 4, 7, 6], [4, 3, 3], 4, (1, 1), (1, 1), (1, 1)), // depthwise 3x3, padded
    ([1, 3, 9, 8], [6, 3, 3], 3, (2, 2), (1, 1), (1, 1)), // depthwise, multiplier 2, stride 2
    ([2, 6, 5, 7], [4, 2, 3], 2, (1, 2), (0, 1), (1, 1)), // 2 groups of 3 -> 2 channels
    ([1, 6, 11, 5], [9, 3, 2], 3, (2, 1), (2, 1), (2, 2)), // 3 groups, dilated, asymmetric
    ([3, 5, 4, 4], [5, 1, 1], 5, (1, 1), (0, 0), (1, 1)), // pointwise per channel
    ([1, 2, 1, 1], [2, 1, 1], 2, (1, 1), (0, 0), (1, 1)), // a single pixel
    ([2, 8, 13, 17], [8, 5, 5], 8, (1, 1), (2, 2), (1, 1)), // more than one workgroup
];

/// A convolution case's graph, its nodes `[x, w, b, y]` and their feeds.
type Built = (Graph, [NodeId; 4], Vec<(String, Tensor)>);

/// `y` and the gradients of a random projection of it for `x`, `w` and `b`, on the GPU
/// against the CPU reference (outputs poisoned with NaN).
fn forward_and_gradients_match(what: &str, (g, [x, w, b, y], feeds): Built, seed: u64) {
    let loss = random_projection(&g, y, seed);
    let mut outs = vec![y];
    outs.extend(g.grad(loss, &[x, w, b]).unwrap());
    check_gpu_vs_cpu(what, &g, &outs, &common::refs(&feeds), TOL_REDUCTION);
}

/// The gradients of a random projection of `y` for `x`, `w` and `b` against central
/// differences (at up to `max_elems` elements each), then on the GPU.
fn gradients_match_differences(
    what: &str,
    (g, [x, w, b, y], feeds): Built,
    seed: u64,
    max_elems: usize,
) {
    let loss = random_projection(&g, y, seed);
    let wrt = [("x", x), ("w", w), ("b", b)];
    gradcheck(
        what,
        &g,
        loss,
        &wrt,
        &common::refs(&feeds),
        max_elems,
        TOL_REDUCTION,
    );
}

/// The case's convolution, with a bias or not, with its relu in the kernel or not.
fn grouped_graph(case: &GroupedCase, bias: bool, relu: bool) -> Built {
    let &(xs, [oc, kh, kw], groups, s, p, d) = case;
    let ws = [oc, xs[1] / groups, kh, kw];
    let g = Graph::new();
    let x = g.input("x", xs);
    let w = g.input("w", ws);
    let b = g.input("b", [oc]);
    let y = g
        .conv2d_grouped_fused(x, w, bias.then_some(b), opts(s, p, d), groups, relu)
        .unwrap();
    let seed = (xs.iter().product::<usize>() * 31 + oc) as u64;
    let feeds = vec![
        ("x".to_string(), rand(&xs, seed)),
        ("w".to_string(), rand(&ws, seed + 1)),
        ("b".to_string(), rand(&[oc], seed + 2)),
    ];
    (g, [x, w, b, y], feeds)
}

#[test]
fn grouped_conv2d_reference_matches_direct_loops() {
    for (k, case) in GROUPED_CASES.iter().enumerate() {
        let (g, [_, _, _, y], feeds) = grouped_graph(case, true, false);
        let (gr, [_, _, _, yr], _) = grouped_graph(case, true, true);
        let relu = cpu_run(&gr, &[yr], &common::refs(&feeds));
        let got = cpu_run(&g, &[y], &common::refs(&feeds));
        let &(_, _, groups, s, p, d) = case;
        let want = naive_grouped_conv(
            &feeds[0].1,
            &feeds[1].1,
            Some(&feeds[2].1),
            opts(s, p, d),
            groups,
        );
        common::assert_close(
            &format!("grouped conv2d case {k}"),
            &got[0],
            &want,
            1e-5,
            1e-5,
        );
        let positive = want.data().iter().map(|v| v.max(0.0)).collect();
        let want_relu = Tensor::new(want.shape().clone(), positive).unwrap();
        let what = format!("grouped conv2d with relu, case {k}");
        common::assert_close(&what, &relu[0], &want_relu, 1e-5, 1e-5);
    }
}

/// The forward, and the input and weight gradients of a random projection of it, on the GPU
/// against the CPU reference (outputs poisoned with NaN): every pass's kernel.
#[test]
fn grouped_conv2d_gpu_matches_cpu() {
    for (k, case) in GROUPED_CASES.iter().enumerate() {
        let built = grouped_graph(case, k % 2 == 0, k % 3 != 1);
        forward_and_gradients_match(&format!("grouped conv2d {case:?}"), built, 40 + k as u64);
    }
}

#[test]
fn grouped_conv2d_gradients() {
    for (k, case) in GROUPED_CASES.iter().take(4).enumerate() {
        let built = grouped_graph(case, true, false);
        gradients_match_differences(
            &format!("grouped conv2d {case:?}"),
            built,
            60 + k as u64,
            24,
        );
    }
}

/// The input and weight gradients' own gradients (each pass is the others' adjoint): a loss of
/// both gradients, checked against central differences.
#[test]
fn grouped_conv2d_second_derivatives() {
    for (k, case) in GROUPED_CASES.iter().take(3).enumerate() {
        let (g, [x, w, _, y], feeds) = grouped_graph(case, false, false);
        let loss = random_projection(&g, g.square(y).unwrap(), 70 + k as u64);
        let d = g.grad(loss, &[x, w]).unwrap();
        let (px, pw) = (
            random_projection(&g, d[0], 80 + k as u64),
            random_projection(&g, d[1], 90 + k as u64),
        );
        let loss2 = g.add(px, pw).unwrap();
        gradcheck(
            &format!("grouped conv2d second derivative {case:?}"),
            &g,
            loss2,
            &[("x", x), ("w", w)],
            &common::refs(&feeds),
            16,
            TOL_REDUCTION,
        );
    }
}

/// A depthwise convolution equals the dense convolution (an implicit GEMM) with the
/// block-diagonal weight that zeroes every other channel: two independent paths, on the GPU.
#[test]
fn depthwise_conv2d_equals_the_block_diagonal_dense_one() {
    let Some(dev) = common::gpu() else { return };
    let (n, c, m, h, wd) = (2, 5, 2, 9, 8);
    let o = opts((2, 1), (1, 1), (1, 2));
    let (xv, wv) = (rand(&[n, c, h, wd], 5), rand(&[c * m, 1, 3, 3], 6));
    let mut dense = vec![0f32; c * m * c * 9];
    for f in 0..c * m {
        let ch = f / m;
        dense[(f * c + ch) * 9..(f * c + ch + 1) * 9]
            .copy_from_slice(&wv.data()[f * 9..(f + 1) * 9]);
    }
    let dense = Tensor::new(vec![c * m, c, 3, 3], dense).unwrap();
    let g = Graph::new();
    let x = g.input("x", [n, c, h, wd]);
    let wg = g.input("wg", [c * m, 1, 3, 3]);
    let wd_ = g.input("wd", [c * m, c, 3, 3]);
    let yg = g.conv2d_grouped(x, wg, None, o, c).unwrap();
    let yd = g.conv2d(x, wd_, None, o).unwrap();
    let mut plan = dev.compile(&g, &[yg, yd]).unwrap();
    plan.poison(f32::NAN);
    let out = plan
        .run(&[("x", &xv), ("wg", &wv), ("wd", &dense)])
        .unwrap();
    common::assert_close("depthwise against dense", &out[0], &out[1], 1e-5, 1e-4);
}

#[test]
fn grouped_conv2d_shape_errors() {
    let g = Graph::new();
    let x = g.input("x", [1, 6, 8, 8]);
    let d = Conv2dOpts::default();
    let w = g.input("w", [4, 3, 3, 3]);
    let m = shape_msg(g.conv2d_grouped(x, w, None, d, 4).unwrap_err());
    assert!(
        m.contains("the groups must divide the input channels 6 and the output channels 4"),
        "{m}"
    );
    let w2 = g.input("w2", [4, 2, 3, 3]);
    let m = shape_msg(g.conv2d_grouped(x, w2, None, d, 2).unwrap_err());
    assert!(
        m.contains("the weight must have 3 = 6 / 2 input channels, it has 2"),
        "{m}"
    );
    assert!(shape_msg(g.conv2d_grouped(x, w, None, d, 0).unwrap_err()).contains("must divide"));
    let y = g.conv2d_grouped(x, w, None, d, 2).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 4, 6, 6]);
    let b = g.input("b", [3]);
    let m = shape_msg(g.conv2d_grouped(x, w, Some(b), d, 2).unwrap_err());
    assert!(m.contains("the bias must have shape [4]"), "{m}");
    let mut init = kiln::nn::Init::new(0);
    let e = kiln::nn::Conv2d::grouped("c", 6, 4, (3, 3), d, 4, &mut init).unwrap_err();
    assert!(shape_msg(e).contains("4 groups must divide the input channels 6"));
}

/// `conv_transpose2d` as torch defines it, in direct loops (f64): every input pixel spreads its
/// value times the kernel over the output (scatter), cropped by the padding.
fn naive_conv_transpose(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    o: ConvTranspose2dOpts,
    groups: usize,
) -> Tensor {
    let [n, cin, h, wd] = x.dims().try_into().unwrap();
    let [_, og, kh, kw] = w.dims().try_into().unwrap();
    let (cout, cg) = (og * groups, cin / groups);
    let ho =
        (h - 1) * o.stride.0 + o.dilation.0 * (kh - 1) + o.output_padding.0 + 1 - 2 * o.padding.0;
    let wo =
        (wd - 1) * o.stride.1 + o.dilation.1 * (kw - 1) + o.output_padding.1 + 1 - 2 * o.padding.1;
    let mut acc = vec![0f64; n * cout * ho * wo];
    for bn in 0..n {
        for ci in 0..cin {
            for ih in 0..h {
                for iw in 0..wd {
                    let xv = x.data()[((bn * cin + ci) * h + ih) * wd + iw] as f64;
                    for f in 0..og {
                        let co = ci / cg * og + f;
                        for i in 0..kh {
                            for j in 0..kw {
                                let oh = (ih * o.stride.0 + i * o.dilation.0) as isize
                                    - o.padding.0 as isize;
                                let ow = (iw * o.stride.1 + j * o.dilation.1) as isize
                                    - o.padding.1 as isize;
                                if oh < 0 || ow < 0 || oh >= ho as isize || ow >= wo as isize {
                                    continue;
                                }
                                let wv = w.data()[((ci * og + f) * kh + i) * kw + j] as f64;
                                acc[((bn * cout + co) * ho + oh as usize) * wo + ow as usize] +=
                                    xv * wv;
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(b) = b {
        for (k, v) in acc.iter_mut().enumerate() {
            *v += b.data()[k / (ho * wo) % cout] as f64;
        }
    }
    Tensor::new(
        vec![n, cout, ho, wo],
        acc.into_iter().map(|v| v as f32).collect(),
    )
    .unwrap()
}

/// (N, Cin, H, W), (Cout, kh, kw), groups, stride, padding, output padding, dilation.
type TransposedCase = ([usize; 4], [usize; 3], usize, Pair, Pair, Pair, Pair);

const TRANSPOSED_CASES: &[TransposedCase] = &[
    ([2, 3, 4, 4], [2, 4, 4], 1, (2, 2), (1, 1), (0, 0), (1, 1)), // DCGAN's upsampling: 4 -> 8
    ([1, 2, 5, 3], [3, 3, 3], 1, (1, 1), (0, 0), (0, 0), (1, 1)), // stride 1: an implicit GEMM
    ([2, 4, 3, 5], [5, 3, 2], 1, (2, 3), (1, 0), (1, 2), (1, 1)), // output padding, asymmetric
    ([1, 3, 4, 4], [4, 3, 3], 1, (2, 2), (2, 1), (1, 0), (2, 1)), // dilated
    ([2, 4, 3, 3], [6, 3, 3], 2, (2, 2), (1, 1), (1, 1), (1, 1)), // 2 groups
    ([1, 3, 5, 4], [3, 2, 2], 3, (2, 2), (0, 0), (0, 0), (1, 1)), // depthwise upsampling
    ([1, 1, 1, 1], [1, 1, 1], 1, (1, 1), (0, 0), (0, 0), (1, 1)), // a single pixel
    ([2, 9, 8, 7], [67, 3, 3], 1, (1, 1), (1, 1), (0, 0), (1, 1)), // past the 64x64 tile
];

fn transposed_graph(case: &TransposedCase, bias: bool) -> Built {
    let &(xs, [oc, kh, kw], groups, stride, padding, output_padding, dilation) = case;
    let ws = [xs[1], oc / groups, kh, kw];
    let o = ConvTranspose2dOpts {
        stride,
        padding,
        output_padding,
        dilation,
    };
    let g = Graph::new();
    let x = g.input("x", xs);
    let w = g.input("w", ws);
    let b = g.input("b", [oc]);
    let y = g
        .conv_transpose2d(x, w, bias.then_some(b), o, groups)
        .unwrap();
    let seed = (xs.iter().product::<usize>() * 17 + oc) as u64;
    let feeds = vec![
        ("x".to_string(), rand(&xs, seed)),
        ("w".to_string(), rand(&ws, seed + 1)),
        ("b".to_string(), rand(&[oc], seed + 2)),
    ];
    (g, [x, w, b, y], feeds)
}

#[test]
fn conv_transpose2d_reference_matches_direct_loops() {
    for (k, case) in TRANSPOSED_CASES.iter().enumerate() {
        let (g, [_, _, _, y], feeds) = transposed_graph(case, true);
        let got = cpu_run(&g, &[y], &common::refs(&feeds));
        let &(_, _, groups, stride, padding, output_padding, dilation) = case;
        let o = ConvTranspose2dOpts {
            stride,
            padding,
            output_padding,
            dilation,
        };
        let want = naive_conv_transpose(&feeds[0].1, &feeds[1].1, Some(&feeds[2].1), o, groups);
        common::assert_close(
            &format!("conv_transpose2d case {k}"),
            &got[0],
            &want,
            1e-5,
            1e-5,
        );
    }
}

/// A transposed convolution is the adjoint of the convolution with the same weight and
/// geometry: `<conv2d(z, w), x> = <z, conv_transpose2d(x, w)>` (groups included).
#[test]
fn conv_transpose2d_is_the_adjoint_of_conv2d() {
    for (k, case) in TRANSPOSED_CASES.iter().enumerate() {
        let (g, [x, w, _, y], feeds) = transposed_graph(case, false);
        let &(_, _, groups, s, p, _, d) = case;
        let z = g.input("z", g.shape(y));
        let cz = g.conv2d_grouped(z, w, None, opts(s, p, d), groups).unwrap();
        assert_eq!(g.shape(cz), g.shape(x), "case {k}");
        let zv = rand(g.shape(y).dims(), 3 + k as u64);
        let mut f = common::refs(&feeds);
        f.push(("z", &zv));
        let out = cpu_run(&g, &[y, cz], &f);
        let (lhs, rhs) = (common::dot(&out[1], &feeds[0].1), common::dot(&zv, &out[0]));
        assert!(
            (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
            "case {k}: {lhs} vs {rhs}"
        );
    }
}

/// The forward and every gradient on the GPU against the CPU reference (outputs poisoned with
/// NaN): the dense product and col2im (or the implicit GEMM), the grouped kernels.
#[test]
fn conv_transpose2d_gpu_matches_cpu() {
    for (k, case) in TRANSPOSED_CASES.iter().enumerate() {
        let built = transposed_graph(case, k % 2 == 0);
        forward_and_gradients_match(&format!("conv_transpose2d {case:?}"), built, 20 + k as u64);
    }
}

/// A transposed convolution's bias and a relu after it run in its implicit GEMM's store (a
/// decoder layer in one kernel): f32 and f16, the forward and every gradient against the CPU
/// reference with outputs poisoned; with fusion off they stay kernels of their own.
#[test]
fn conv_transpose2d_bias_and_relu_in_the_gemm() {
    let Some(dev) = common::gpu() else { return };
    // (where the implicit form would multiply many zeros, a small unpadded image, the product
    // and col2im run, and the bias after them)
    for (case, dtype) in [
        (TRANSPOSED_CASES[0], DType::F32),
        (TRANSPOSED_CASES[7], DType::F32),
        (TRANSPOSED_CASES[0], DType::F16),
    ] {
        if dtype == DType::F16 && !dev.features().contains(wgpu::Features::SHADER_F16) {
            continue;
        }
        let (g, [x, w, b, _], feeds) = transposed_graph(&case, true);
        let &(_, _, groups, stride, padding, output_padding, dilation) = &case;
        let o = ConvTranspose2dOpts {
            stride,
            padding,
            output_padding,
            dilation,
        };
        let cast = |v| g.cast(v, dtype).unwrap();
        let y = g
            .conv_transpose2d(cast(x), cast(w), Some(cast(b)), o, groups)
            .unwrap();
        let y = g.cast(g.relu(y).unwrap(), DType::F32).unwrap();
        let loss = common::random_projection(&g, y, 5);
        let mut outs = vec![y];
        outs.extend(g.grad(loss, &[x, w, b]).unwrap());
        let what = format!("{case:?} {dtype:?}");
        let tol = match dtype {
            DType::F16 => (1e-2, 1e-2),
            _ => TOL_REDUCTION,
        };
        common::check_plan(&dev, &what, &g, &outs, &feeds, tol);
        let forward = dev.compile(&g, &[y]).unwrap();
        let labels = forward.kernels();
        let gemm = labels.iter().find(|l| l.contains("implicit_dgrad"));
        assert!(
            gemm.is_some_and(|l| l.contains("bias_rows,relu")),
            "{what}: {labels:#?}"
        );
        // nothing elementwise after it in the forward
        assert!(
            !labels
                .iter()
                .any(|l| l.contains("fused") || l.contains(" add ")),
            "{what}: {labels:#?}"
        );
    }
    // fusion off: the bias and the relu are kernels of their own
    let dev = Device::gpu().unwrap();
    dev.set_fusion(false);
    let (g, [_, _, _, y], _) = transposed_graph(&TRANSPOSED_CASES[0], true);
    let y = g.relu(y).unwrap();
    let labels = dev.compile(&g, &[y]).unwrap().kernels().join("\n");
    assert!(
        labels.contains(" add ") && labels.contains(" relu ") && !labels.contains("bias_rows"),
        "{labels}"
    );
}

#[test]
fn conv_transpose2d_gradients() {
    for (k, case) in TRANSPOSED_CASES.iter().take(6).enumerate() {
        let built = transposed_graph(case, true);
        gradients_match_differences(
            &format!("conv_transpose2d {case:?}"),
            built,
            30 + k as u64,
            16,
        );
    }
}

#[test]
fn conv_transpose2d_shape_errors() {
    let g = Graph::new();
    let x = g.input("x", [1, 4, 5, 5]);
    let d = ConvTranspose2dOpts::default();
    let w = g.input("w", [4, 3, 3, 3]);
    let y = g.conv_transpose2d(x, w, None, d, 1).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 3, 7, 7]);
    let up = ConvTranspose2dOpts {
        stride: (2, 2),
        padding: (1, 1),
        output_padding: (1, 0),
        ..d
    };
    let y = g.conv_transpose2d(x, w, None, up, 1).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 3, 10, 9]);
    let wrong = g.input("wrong", [3, 3, 3, 3]);
    let m = shape_msg(g.conv_transpose2d(x, wrong, None, d, 1).unwrap_err());
    assert!(
        m.starts_with("conv_transpose2d: input [1, 4, 5, 5], weight [3, 3, 3, 3]"),
        "{m}"
    );
    assert!(
        m.contains("the weight must have 4 input channels, it has 3"),
        "{m}"
    );
    let m = shape_msg(g.conv_transpose2d(x, w, None, d, 3).unwrap_err());
    assert!(
        m.contains("the groups must divide the input channels 4"),
        "{m}"
    );
    let bad = ConvTranspose2dOpts {
        output_padding: (1, 1),
        ..d
    };
    let m = shape_msg(g.conv_transpose2d(x, w, None, bad, 1).unwrap_err());
    assert!(
        m.contains("output padding (1, 1) must be smaller than the stride (1, 1)"),
        "{m}"
    );
    let crop = ConvTranspose2dOpts {
        padding: (4, 0),
        ..d
    };
    let m = shape_msg(g.conv_transpose2d(x, w, None, crop, 1).unwrap_err());
    assert!(m.contains("leaves no output"), "{m}");
    let empty = g.input("empty", [1, 4, 0, 5]);
    let m = shape_msg(g.conv_transpose2d(empty, w, None, d, 1).unwrap_err());
    assert!(m.contains("the input's extents must be positive"), "{m}");
    let b = g.input("b", [4]);
    let m = shape_msg(g.conv_transpose2d(x, w, Some(b), d, 1).unwrap_err());
    assert!(m.contains("the bias must have shape [3]"), "{m}");
    let mut init = kiln::nn::Init::new(0);
    let e = kiln::nn::ConvTranspose2d::new("t", 4, 6, (2, 2), d, 4, &mut init).unwrap_err();
    assert!(shape_msg(e)
        .contains("4 groups must divide the input channels 4 and the output channels 6"));
}

/// torch: `F.adaptive_avg_pool2d(torch.arange(25.).view(1, 1, 5, 5), 3)`: windows of rows
/// 0-1, 1-3, 3-4 (5 into 3), the columns likewise.
#[test]
fn adaptive_avg_pool_matches_torch() {
    let x = Tensor::new([1, 1, 5, 5], (0..25).map(|v| v as f32).collect()).unwrap();
    let g = Graph::new();
    let xi = g.input("x", [1, 1, 5, 5]);
    let y = g.adaptive_avg_pool2d(xi, (3, 3)).unwrap();
    let global = g.adaptive_avg_pool2d(xi, (1, 1)).unwrap();
    let out = cpu_run(&g, &[y, global], &[("x", &x)]);
    let want = Tensor::new(
        [1, 1, 3, 3],
        vec![3.0, 4.5, 6.0, 10.5, 12.0, 13.5, 18.0, 19.5, 21.0],
    )
    .unwrap();
    common::assert_close("5 -> 3", &out[0], &want, 1e-6, 1e-6);
    assert_eq!(out[1].data(), &[12.0]);
}

/// (N, C, H, W), output size: divisible, uneven, growing (windows overlap), global.
const ADAPTIVE_CASES: &[([usize; 4], Pair)] = &[
    ([2, 3, 8, 8], (4, 4)),
    ([1, 2, 7, 10], (3, 4)),
    ([2, 1, 3, 2], (5, 7)),
    ([3, 4, 9, 11], (1, 1)),
    ([1, 8, 29, 31], (7, 7)),
];

/// The forward and its gradient on the GPU against the CPU reference, the gradient against
/// central differences, the backward's own gradient (the forward), and the adjoint identity.
#[test]
fn adaptive_avg_pool_gpu_gradients_and_adjoint() {
    for (k, &(xs, size)) in ADAPTIVE_CASES.iter().enumerate() {
        let g = Graph::new();
        let x = g.input("x", xs);
        let y = g.adaptive_avg_pool2d(x, size).unwrap();
        let dx = g
            .grad(random_projection(&g, y, 90 + k as u64), &[x])
            .unwrap()[0];
        let loss = g
            .add(
                random_projection(&g, g.square(y).unwrap(), 91),
                random_projection(&g, g.square(dx).unwrap(), 92),
            )
            .unwrap();
        let xv = rand(&xs, 93 + k as u64);
        check_gpu_vs_cpu(
            &format!("adaptive_avg_pool2d {xs:?} -> {size:?}"),
            &g,
            &[y, dx],
            &[("x", &xv)],
            TOL_REDUCTION,
        );
        gradcheck(
            &format!("adaptive_avg_pool2d {xs:?} -> {size:?}"),
            &g,
            loss,
            &[("x", x)],
            &[("x", &xv)],
            16,
            TOL_REDUCTION,
        );
        // <pool(x), z> = <x, pool_backward(z)>
        let z = g.input("z", g.shape(y));
        let p = kiln::ops::pool::AdaptiveAvgPool2d {
            input: (xs[2], xs[3]),
            output: size,
        };
        let back = g.adaptive_avg_pool2d_backward(z, p).unwrap();
        let zv = rand(g.shape(y).dims(), 94);
        let out = cpu_run(&g, &[y, back], &[("x", &xv), ("z", &zv)]);
        let (lhs, rhs) = (common::dot(&out[0], &zv), common::dot(&xv, &out[1]));
        assert!(
            (lhs - rhs).abs() <= 1e-5 * (1.0 + lhs.abs()),
            "{xs:?}: {lhs} vs {rhs}"
        );
    }
    let g = Graph::new();
    let x = g.input("x", [1, 2, 4]);
    let e = g.adaptive_avg_pool2d(x, (2, 2)).unwrap_err();
    assert!(shape_msg(e).contains("adaptive_avg_pool2d: input [1, 2, 4]: expected rank 4"));
    let x = g.input("x4", [1, 2, 4, 4]);
    let e = g.adaptive_avg_pool2d(x, (2, 0)).unwrap_err();
    assert!(shape_msg(e).contains("the extents must be positive"));
}

/// conv1d as torch defines it, in direct loops (f64).
fn naive_conv1d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    (s, p, d): (usize, usize, usize),
    groups: usize,
) -> Tensor {
    let [n, c, l] = x.dims().try_into().unwrap();
    let [o, cg, k] = w.dims().try_into().unwrap();
    let lo = (l + 2 * p - d * (k - 1) - 1) / s + 1;
    let og = o / groups;
    let mut out = Vec::new();
    for bn in 0..n {
        for f in 0..o {
            for t in 0..lo {
                let mut acc = b.data()[f] as f64;
                for ci in 0..cg {
                    let ch = f / og * cg + ci;
                    for j in 0..k {
                        let at = (t * s + j * d) as isize - p as isize;
                        if at >= 0 && (at as usize) < l {
                            acc += x.data()[(bn * c + ch) * l + at as usize] as f64
                                * w.data()[(f * cg + ci) * k + j] as f64;
                        }
                    }
                }
                out.push(acc as f32);
            }
        }
    }
    Tensor::new(vec![n, o, lo], out).unwrap()
}

/// (N, C, L), (O, k), (stride, padding, dilation), groups.
type Case1d = ([usize; 3], [usize; 2], (usize, usize, usize), usize);

/// 1-D convolutions (dense and grouped, strided, padded, dilated), transposed ones and pooling
/// as the 2-D ops of `(N, C, 1, L)` views: direct loops, the GPU against the CPU reference with
/// gradients, `nn::Conv1d`, shape errors named for the 1-D op.
#[test]
fn one_dimensional_convolutions_and_pooling() {
    let cases: &[Case1d] = &[
        ([2, 3, 17], [4, 3], (1, 1, 1), 1),
        ([1, 4, 23], [8, 5], (2, 2, 2), 4), // depthwise, multiplier 2
        ([3, 6, 9], [4, 2], (3, 0, 1), 2),
        ([2, 8, 300], [16, 3], (1, 1, 1), 1), // past the 64-wide tiles
    ];
    for (k, &(xs, [o, kw], geom, groups)) in cases.iter().enumerate() {
        let ws = [o, xs[1] / groups, kw];
        let g = Graph::new();
        let x = g.input("x", xs);
        let w = g.input("w", ws);
        let b = g.input("b", [o]);
        let (s, p, d) = geom;
        let y = g.conv1d(x, w, Some(b), s, p, d, groups).unwrap();
        let (xv, wv, bv) = (
            rand(&xs, 400 + k as u64),
            rand(&ws, 410 + k as u64),
            rand(&[o], 420),
        );
        let want = naive_conv1d(&xv, &wv, &bv, geom, groups);
        let feeds = [("x", &xv), ("w", &wv), ("b", &bv)];
        let got = cpu_run(&g, &[y], &feeds);
        common::assert_close(&format!("conv1d case {k}"), &got[0], &want, 1e-5, 1e-5);
        // transposed back with the same weight, then pooled both ways
        let t = g
            .conv_transpose1d(y, w, None, s, p, (s > 1) as usize, d, groups)
            .unwrap();
        let mp = g.pool1d(true, y, 2, 2, 0).unwrap();
        let ap = g.pool1d(false, t, 3, 1, 1).unwrap();
        let loss = random_projection(
            &g,
            g.add(g.sum_all(mp).unwrap(), g.mean_all(ap).unwrap())
                .unwrap(),
            430,
        );
        let mut outs = vec![y, t, mp, ap];
        outs.extend(g.grad(loss, &[x, w, b]).unwrap());
        check_gpu_vs_cpu(&format!("1-D case {k}"), &g, &outs, &feeds, TOL_REDUCTION);
    }
    // the layer: torch's names and shapes
    let mut init = kiln::nn::Init::new(0);
    let layer = kiln::nn::Conv1d::new("c", 6, 4, 3, (1, 1, 1), 2, &mut init).unwrap();
    assert_eq!(layer.param_names(), ["c.weight", "c.bias"]);
    let g = Graph::new();
    let x = g.input("x", [2, 6, 10]);
    let (y, [w, _]) = layer.apply(&g, x).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 4, 10]);
    assert_eq!(g.shape(w).dims(), &[4, 3, 3]);
    // errors name the 1-D op
    let e = g
        .conv1d(x, g.input("w2", [4, 5, 3]), None, 1, 0, 1, 1)
        .unwrap_err();
    let m = shape_msg(e);
    assert!(
        m.starts_with("conv1d: ") && m.contains("input channels 6 and 5 differ"),
        "{m}"
    );
    let e = g
        .conv1d(g.input("x2", [2, 6]), w, None, 1, 0, 1, 2)
        .unwrap_err();
    assert!(shape_msg(e).contains("conv1d: operand [2, 6]: expected rank 3"));
    let e = g.pool1d(true, x, 2, 1, 2).unwrap_err();
    assert!(shape_msg(e).starts_with("max_pool1d: "));
}

/// (N, C, H, W), kernel, stride, padding.
type PoolCase = ([usize; 4], Pair, Pair, Pair);

const POOL_CASES: &[PoolCase] = &[
    ([2, 3, 8, 8], (2, 2), (2, 2), (0, 0)),
    ([1, 1, 7, 9], (3, 3), (2, 2), (1, 1)), // odd sizes, padding
    ([2, 2, 11, 5], (3, 2), (1, 2), (1, 1)), // stride != kernel, asymmetric
    ([1, 3, 5, 5], (5, 5), (1, 1), (2, 2)), // padding of half the kernel
    ([3, 1, 13, 13], (2, 2), (3, 3), (0, 0)), // stride > kernel: skipped inputs
    ([1, 2, 6, 7], (4, 3), (1, 1), (2, 1)),
    ([1, 1, 3, 3], (3, 3), (1, 1), (0, 0)), // one window, the whole input
    ([2, 4, 23, 19], (3, 3), (2, 2), (1, 1)), // more than one 256-thread workgroup
];

#[test]
fn pooling_gpu_matches_cpu() {
    for (k, &(xs, kernel, stride, padding)) in POOL_CASES.iter().enumerate() {
        let g = Graph::new();
        let x = g.input("x", xs);
        let ym = g.max_pool2d(x, kernel, stride, padding).unwrap();
        let ya = g.avg_pool2d(x, kernel, stride, padding).unwrap();
        let ys = g.shape(ym);
        let dy = g.input("dy", ys.clone());
        let pool = Pool2d::new(kernel, stride, padding);
        let dxm = g.max_pool2d_backward(x, dy, pool).unwrap();
        let dxa = g.avg_pool2d_backward(dy, (xs[2], xs[3]), pool).unwrap();
        let (xv, dyv) = (rand(&xs, 1000 + k as u64), rand(ys.dims(), 1100 + k as u64));
        let what = format!("pool {xs:?} kernel {kernel:?} stride {stride:?} padding {padding:?}");
        let feeds = [("x", &xv), ("dy", &dyv)];
        check_gpu_vs_cpu(&format!("{what} max"), &g, &[ym], &feeds, TOL_ELEMENTWISE);
        check_gpu_vs_cpu(
            &format!("{what} avg and backward"),
            &g,
            &[ya, dxm, dxa],
            &feeds,
            TOL_REDUCTION,
        );
        // the backward ops are the adjoints: <max(x)', dy> sums to <dy> over the windows, and
        // <avg_pool(x), dy> == <x, avg_pool2d_backward(dy)>
        let out = cpu_run(&g, &[ya, dxm, dxa], &feeds);
        let sum = |a: &Tensor| -> f64 { a.data().iter().map(|&v| v as f64).sum() };
        let (lhs, rhs) = (common::dot(&out[0], &dyv), common::dot(&xv, &out[2]));
        assert!(
            (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
            "{what}: avg adjoint {lhs} vs {rhs}"
        );
        assert!(
            (sum(&out[1]) - sum(&dyv)).abs() <= 1e-4,
            "{what}: max backward loses gradient"
        );
    }
}

#[test]
fn pooling_hand_worked_examples() {
    // 4x4 ramp, 2x2 windows, stride 2
    let g = Graph::new();
    let x = g.input("x", [1, 1, 4, 4]);
    let m = g.max_pool2d(x, (2, 2), (2, 2), (0, 0)).unwrap();
    let a = g.avg_pool2d(x, (2, 2), (2, 2), (0, 0)).unwrap();
    let ramp = Tensor::new(vec![1, 1, 4, 4], (1..=16).map(|v| v as f32).collect()).unwrap();
    let out = cpu_run(&g, &[m, a], &[("x", &ramp)]);
    assert_eq!(out[0].data(), &[6.0, 8.0, 14.0, 16.0]);
    assert_eq!(out[1].data(), &[3.5, 5.5, 11.5, 13.5]);
    check_gpu_vs_cpu("ramp pools", &g, &[m, a], &[("x", &ramp)], TOL_ELEMENTWISE);

    // average pooling counts the padding; max pooling ignores it (all inputs negative)
    let g = Graph::new();
    let x = g.input("x", [1, 1, 2, 2]);
    let a = g.avg_pool2d(x, (2, 2), (1, 1), (1, 1)).unwrap();
    let m = g.max_pool2d(x, (2, 2), (1, 1), (1, 1)).unwrap();
    let ones = Tensor::full([1, 1, 2, 2], -1.0);
    let out = cpu_run(&g, &[a, m], &[("x", &ones)]);
    assert_eq!(g.shape(a).dims(), &[1, 1, 3, 3]);
    assert_eq!(
        out[0].data(),
        &[-0.25, -0.5, -0.25, -0.5, -1.0, -0.5, -0.25, -0.5, -0.25]
    );
    assert_eq!(out[1].data(), &[-1.0; 9]);
    check_gpu_vs_cpu(
        "padded pools",
        &g,
        &[a, m],
        &[("x", &ones)],
        TOL_ELEMENTWISE,
    );

    // ties: the first maximum in row-major window order takes the gradient (as torch)
    let g = Graph::new();
    let x = g.input("x", [1, 1, 3, 3]);
    let y = g.max_pool2d(x, (2, 2), (1, 1), (0, 0)).unwrap();
    let loss = g.sum_all(y).unwrap();
    let dx = g.grad(loss, &[x]).unwrap()[0];
    let flat = Tensor::zeros([1, 1, 3, 3]);
    let out = cpu_run(&g, &[dx], &[("x", &flat)]);
    assert_eq!(
        out[0].data(),
        &[1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    check_gpu_vs_cpu("max pool ties", &g, &[dx], &[("x", &flat)], TOL_ELEMENTWISE);
}

/// The values `0.1 * k` for k in 0..n, shuffled by a seed: distinct, 0.1 apart, so no finite
/// difference step of 1e-2 changes a window's argmax.
fn spaced_permutation(shape: &[usize], seed: u64) -> Tensor {
    let keys = Tensor::rand_uniform(shape.to_vec(), 0.0, 1.0, seed);
    let mut order: Vec<usize> = (0..keys.numel()).collect();
    order.sort_by(|&a, &b| keys.data()[a].total_cmp(&keys.data()[b]));
    let mut data = vec![0f32; keys.numel()];
    for (rank, &i) in order.iter().enumerate() {
        data[i] = 0.1 * rank as f32 - 2.0;
    }
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// torch's `ceil_mode` and `count_include_pad=False`, values from torch's pooling loops (an
/// independent rewrite of `avg_pool2d`'s and `max_pool2d`'s CPU kernels), on every device with
/// outputs poisoned, GPU against CPU on awkward shapes, and gradient checks through the
/// per-window divisors.
#[test]
fn pooling_ceil_mode_and_count_include_pad_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [1, 1, 6, 6]);
    let pool = Pool2d::new((3, 3), (2, 2), (1, 1)).ceil_mode(true);
    let outs = [
        g.avg_pool2d_with(x, pool).unwrap(),
        g.avg_pool2d_with(x, pool.count_include_pad(false)).unwrap(),
        g.max_pool2d_with(x, pool).unwrap(),
        // floor mode drops the partial last window
        g.max_pool2d(x, (3, 3), (2, 2), (1, 1)).unwrap(),
    ];
    assert_eq!(g.shape(outs[0]).dims(), &[1, 1, 4, 4]);
    assert_eq!(g.shape(outs[3]).dims(), &[1, 1, 3, 3]);
    let want: [Vec<f32>; 4] = [
        vec![
            1.555_555_6,
            3.333_333_3,
            4.666_666_7,
            2.666_666_7,
            8.333_333,
            14.0,
            16.0,
            8.5,
            16.333_334,
            26.0,
            28.0,
            14.5,
            10.166_667,
            16.0,
            17.0,
            8.75,
        ],
        vec![
            3.5, 5.0, 7.0, 8.0, 12.5, 14.0, 16.0, 17.0, 24.5, 26.0, 28.0, 29.0, 30.5, 32.0, 34.0,
            35.0,
        ],
        vec![
            7., 9., 11., 11., 19., 21., 23., 23., 31., 33., 35., 35., 31., 33., 35., 35.,
        ],
        vec![7., 9., 11., 19., 21., 23., 31., 33., 35.],
    ];
    let xs = Tensor::new(vec![1, 1, 6, 6], (0..36).map(|i| i as f32).collect()).unwrap();
    let mut devices = vec![Device::cpu()];
    devices.extend(common::gpu());
    for dev in devices {
        let mut plan = dev.compile(&g, &outs).unwrap();
        plan.poison(f32::NAN);
        let got = plan.run(&[("x", &xs)]).unwrap();
        for (k, (t, w)) in got.iter().zip(&want).enumerate() {
            for (i, (&a, &b)) in t.data().iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "output {k}[{i}]: {a}, torch {b}"
                );
            }
        }
    }
    // awkward shapes, both modes and divisors, and gradients through them
    for (xs, kernel, stride, padding) in [
        ([2, 3, 8, 6], (3, 3), (2, 2), (1, 0)),
        ([1, 2, 7, 10], (2, 3), (3, 2), (0, 1)),
        ([1, 1, 4, 4], (3, 3), (3, 3), (1, 0)),
    ] {
        for count in [true, false] {
            let g = Graph::new();
            let x = g.input("x", xs);
            let p = Pool2d::new(kernel, stride, padding)
                .ceil_mode(true)
                .count_include_pad(count);
            let ya = g.avg_pool2d_with(x, p).unwrap();
            let ym = g.max_pool2d_with(x, p).unwrap();
            // each case has a partial last window that floor mode drops
            let floor = g.max_pool2d(x, kernel, stride, padding).unwrap();
            assert_ne!(g.shape(ym), g.shape(floor));
            // distinct values: central differences do not change a window's maximum
            let xv = common::spread(&xs);
            let what = format!("{xs:?} {kernel:?} {stride:?} {padding:?} count_pad {count}");
            check_gpu_vs_cpu(&what, &g, &[ya, ym], &[("x", &xv)], TOL_REDUCTION);
            let loss = g
                .add(random_projection(&g, ya, 1), random_projection(&g, ym, 2))
                .unwrap();
            gradcheck(
                &what,
                &g,
                loss,
                &[("x", x)],
                &[("x", &xv)],
                30,
                TOL_REDUCTION,
            );
        }
    }
}

#[test]
fn pooling_gradients() {
    let cases: &[PoolCase] = &[
        ([2, 2, 5, 5], (3, 3), (2, 2), (1, 1)),
        ([1, 2, 4, 6], (2, 3), (1, 2), (1, 1)),
        ([1, 1, 7, 5], (2, 2), (3, 2), (0, 0)),
    ];
    for (k, &(xs, kernel, stride, padding)) in cases.iter().enumerate() {
        let what = format!("{xs:?} kernel {kernel:?} stride {stride:?} padding {padding:?}");
        let g = Graph::new();
        let x = g.input("x", xs);
        let y = g.max_pool2d(x, kernel, stride, padding).unwrap();
        let loss = random_projection(&g, y, 1200 + k as u64);
        let xv = spaced_permutation(&xs, 1300 + k as u64);
        gradcheck(
            &format!("max_pool2d {what}"),
            &g,
            loss,
            &[("x", x)],
            &[("x", &xv)],
            40,
            TOL_REDUCTION,
        );

        let g = Graph::new();
        let x = g.input("x", xs);
        let y = g.avg_pool2d(x, kernel, stride, padding).unwrap();
        let loss = random_projection(&g, y, 1400 + k as u64);
        gradcheck(
            &format!("avg_pool2d {what}"),
            &g,
            loss,
            &[("x", x)],
            &[("x", &rand(&xs, 1500 + k as u64))],
            40,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn small_cnn_gradients_gpu_matches_cpu() {
    // conv -> relu -> max pool -> conv (stride 2, padding) -> avg pool -> loss
    let g = Graph::new();
    let x = g.input("x", [2, 1, 12, 12]);
    let w1 = g.input("w1", [4, 1, 3, 3]);
    let b1 = g.input("b1", [4]);
    let w2 = g.input("w2", [3, 4, 3, 3]);
    let h = g
        .relu(g.conv2d(x, w1, Some(b1), Conv2dOpts::default()).unwrap())
        .unwrap();
    let h = g.max_pool2d(h, (2, 2), (2, 2), (0, 0)).unwrap();
    let h = g.conv2d(h, w2, None, opts((2, 2), (1, 1), (1, 1))).unwrap();
    let y = g.avg_pool2d(h, (2, 2), (1, 1), (1, 1)).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 3, 4, 4]);
    let loss = random_projection(&g, y, 1600);
    let grads = g.grad(loss, &[x, w1, b1, w2]).unwrap();
    let (xv, w1v, b1v, w2v) = (
        rand(&[2, 1, 12, 12], 1601),
        rand(&[4, 1, 3, 3], 1602),
        rand(&[4], 1603),
        rand(&[3, 4, 3, 3], 1604),
    );
    let mut outs = vec![loss];
    outs.extend(grads);
    check_gpu_vs_cpu(
        "small cnn",
        &g,
        &outs,
        &[("x", &xv), ("w1", &w1v), ("b1", &b1v), ("w2", &w2v)],
        TOL_REDUCTION,
    );
}

#[test]
fn second_derivative_through_max_pool_is_refused() {
    let g = Graph::new();
    let x = g.input("x", [1, 1, 4, 4]);
    let y = g.max_pool2d(x, (2, 2), (2, 2), (0, 0)).unwrap();
    let dx = g
        .grad(g.sum_all(g.square(y).unwrap()).unwrap(), &[x])
        .unwrap()[0];
    let e = g.grad(g.sum_all(dx).unwrap(), &[x]).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    // average pooling's backward is linear and has its own backward
    let y = g.avg_pool2d(x, (2, 2), (1, 1), (1, 1)).unwrap();
    let dx = g
        .grad(g.sum_all(g.square(y).unwrap()).unwrap(), &[x])
        .unwrap()[0];
    assert!(g
        .grad(g.sum_all(g.square(dx).unwrap()).unwrap(), &[x])
        .is_ok());
}

fn shape_msg(e: Error) -> String {
    assert!(
        matches!(e, Error::Shape { .. }),
        "expected a shape error, got {e:?}"
    );
    e.to_string()
}

#[test]
fn conv2d_shape_errors() {
    let g = Graph::new();
    let x = g.input("x", [1, 3, 8, 8]);
    let w = g.input("w", [4, 2, 3, 3]);
    let d = Conv2dOpts::default();
    assert_eq!(
        shape_msg(g.conv2d(x, w, None, d).unwrap_err()),
        "conv2d: input [1, 3, 8, 8] and weight [4, 2, 3, 3]: input channels 3 and 2 differ"
    );
    let small = g.input("small", [1, 1, 3, 3]);
    let big = g.input("big", [1, 1, 5, 5]);
    let m = shape_msg(g.conv2d(small, big, None, d).unwrap_err());
    assert!(
        m.starts_with("conv2d: input [1, 1, 3, 3] and weight [1, 1, 5, 5]"),
        "{m}"
    );
    assert!(m.contains("larger than the padded input 3x3"), "{m}");
    // padding makes it fit; dilation makes it too large again
    assert!(g
        .conv2d(small, big, None, opts((1, 1), (1, 1), (1, 1)))
        .is_ok());
    let w3 = g.input("w3", [1, 1, 3, 3]);
    let m = shape_msg(
        g.conv2d(small, w3, None, opts((1, 1), (0, 0), (2, 1)))
            .unwrap_err(),
    );
    assert!(m.contains("kernel 3x3 (dilated 5x3)"), "{m}");
    for bad in [opts((0, 1), (0, 0), (1, 1)), opts((1, 1), (0, 0), (1, 0))] {
        let m = shape_msg(g.conv2d(small, w3, None, bad).unwrap_err());
        assert!(m.contains("must be positive"), "{m}");
    }
    let w4 = g.input("w4", [4, 3, 3, 3]);
    let b3 = g.input("b3", [3]);
    assert_eq!(
        shape_msg(g.conv2d(x, w4, Some(b3), d).unwrap_err()),
        "conv2d: weight [4, 3, 3, 3] and bias [3]: the bias must have shape [4]"
    );
    let b2d = g.input("b2d", [4, 1]);
    assert!(shape_msg(g.conv2d(x, w4, Some(b2d), d).unwrap_err()).contains("must have shape [4]"));
    let x3 = g.input("x3", [3, 8, 8]);
    let m = shape_msg(g.conv2d(x3, w4, None, d).unwrap_err());
    assert!(m.contains("input must have rank 4"), "{m}");
    let wr = g.input("wr", [4, 3, 9]);
    let m = shape_msg(g.conv2d(x, wr, None, d).unwrap_err());
    assert!(m.contains("weight must have rank 4"), "{m}");
    // the output shape
    let y = g.conv2d(x, w4, None, opts((2, 3), (1, 2), (1, 2))).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 4, 4, 3]);
    // col2im checks its columns against its geometry
    let geom = ColGeometry::new("test", &g.shape(x), (3, 3), d).unwrap();
    let wrong = g.input("cols", [27, 35]);
    let m = shape_msg(g.col2im(wrong, geom).unwrap_err());
    assert!(
        m.starts_with("col2im: columns [27, 35]") && m.contains("[27, 36]"),
        "{m}"
    );
}

#[test]
fn pooling_shape_errors() {
    let g = Graph::new();
    let x = g.input("x", [1, 2, 6, 6]);
    let m = shape_msg(g.max_pool2d(x, (3, 3), (1, 1), (2, 1)).unwrap_err());
    assert!(
        m.starts_with("max_pool2d: input [1, 2, 6, 6], kernel (3, 3)")
            && m.contains("padding must be at most half the kernel"),
        "{m}"
    );
    let m = shape_msg(g.avg_pool2d(x, (7, 2), (1, 1), (0, 0)).unwrap_err());
    assert!(
        m.starts_with("avg_pool2d:") && m.contains("larger than the padded input 6x6"),
        "{m}"
    );
    let m = shape_msg(g.avg_pool2d(x, (2, 2), (0, 1), (0, 0)).unwrap_err());
    assert!(m.contains("must be positive"), "{m}");
    let v = g.input("v", [2, 6, 6]);
    let m = shape_msg(g.max_pool2d(v, (2, 2), (2, 2), (0, 0)).unwrap_err());
    assert!(m.contains("rank 4"), "{m}");
    // floor mode: 6 + 2 - 3 = 5, / 2 = 2, + 1 = 3
    let y = g.max_pool2d(x, (3, 3), (2, 2), (1, 1)).unwrap();
    assert_eq!(g.shape(y).dims(), &[1, 2, 3, 3]);
    let pool = Pool2d::new((3, 3), (2, 2), (1, 1));
    let m = shape_msg(g.max_pool2d_backward(x, x, pool).unwrap_err());
    assert!(
        m.contains("pools to [1, 2, 3, 3], the gradient has shape [1, 2, 6, 6]"),
        "{m}"
    );
}

/// (x, output channels, pool kernel, stride, padding, a convolution first)
type ReluPoolCase = ([usize; 4], usize, Pair, Pair, Pair, bool);

/// A relu's gradient mask after a max-pooling backward runs inside the pooling backward: after
/// a convolution with a fused relu (the mask's result stored straight in the convolution's
/// `[C, N*H*W]` GEMM layout) and after a plain relu (NCHW), with windows that overlap, pad and
/// leave elements out; no `relu_grad` or plain `max_pool2d_backward` kernel is left. The loss
/// and every gradient against the CPU reference (outputs poisoned with NaN), f32 and f16.
#[test]
fn relu_masks_run_inside_the_max_pooling_backward() {
    let Some(dev) = common::gpu() else { return };
    let half = dev.features().contains(wgpu::Features::SHADER_F16);
    for dtype in [kiln::DType::F32, kiln::DType::F16] {
        if dtype == kiln::DType::F16 && !half {
            continue;
        }
        let tol = match dtype {
            kiln::DType::F16 => kiln::ops::TOL_F16,
            _ => TOL_REDUCTION,
        };
        let cases: &[ReluPoolCase] = &[
            ([2, 3, 11, 11], 5, (2, 2), (2, 2), (0, 0), true),
            ([3, 2, 9, 7], 4, (3, 3), (2, 2), (1, 1), true),
            ([2, 3, 7, 9], 3, (2, 3), (1, 2), (1, 1), false),
            ([1, 1, 6, 6], 1, (2, 2), (2, 2), (0, 0), false),
        ];
        for (k, &(xs, o, kernel, stride, padding, conv)) in cases.iter().enumerate() {
            let what = format!("{xs:?} conv {conv} pool {kernel:?} {stride:?} {padding:?} {dtype}");
            let g = Graph::new();
            let x = g.input_as("x", xs, dtype);
            let w = g.input("w", [o, xs[1], 3, 3]);
            let b = g.input("b", [o]);
            let h = if conv {
                let (w16, b16) = (g.cast(w, dtype).unwrap(), g.cast(b, dtype).unwrap());
                g.conv2d_fused(x, w16, Some(b16), opts((1, 1), (1, 1), (1, 1)), true)
                    .unwrap()
            } else {
                g.relu(x).unwrap()
            };
            let y = g.max_pool2d(h, kernel, stride, padding).unwrap();
            let loss = random_projection(&g, g.cast(y, kiln::DType::F32).unwrap(), 1700 + k as u64);
            let wrt = if conv { vec![x, w, b] } else { vec![x] };
            let mut outs = vec![loss];
            outs.extend(g.grad(loss, &wrt).unwrap());
            let outs: Vec<NodeId> = outs
                .into_iter()
                .map(|t| g.cast(t, kiln::DType::F32).unwrap())
                .collect();
            let feeds = [
                ("x".to_string(), spaced_permutation(&xs, 1710 + k as u64)),
                ("w".to_string(), rand(&[o, xs[1], 3, 3], 1720 + k as u64)),
                ("b".to_string(), rand(&[o], 1730 + k as u64)),
            ];
            let feeds: Vec<(String, Tensor)> = if conv {
                feeds.to_vec()
            } else {
                feeds[..1].to_vec()
            };
            let plan = common::check_plan(&dev, &what, &g, &outs, &feeds, tol);
            let kernels = plan.kernels();
            let count = |op: &str| common::count_op(&kernels, op);
            assert_eq!(count("max_pool2d_backward_relu"), 1, "{what}: {kernels:#?}");
            assert_eq!(count("max_pool2d_backward"), 0, "{what}: {kernels:#?}");
            let masks = kernels.iter().filter(|k| k.contains("relu_grad")).count();
            assert_eq!(masks, 0, "{what}: {kernels:#?}");
        }
    }
}

/// torch.nn.functional.adaptive_max_pool2d: the adaptive windows' first maxima (torch's values
/// for uneven, overlapping windows, and ties), the gradient at each window's argmax; the GPU
/// against the CPU on awkward shapes (outputs poisoned), gradient checks, `Act::AdaptiveMaxPool`.
#[test]
fn adaptive_max_pool_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [1, 1, 5, 5]);
    let y = g.adaptive_max_pool2d(x, (3, 2)).unwrap();
    let dx = g.grad(g.sum_all(y).unwrap(), &[x]).unwrap()[0];
    let ones_at =
        |at: &[usize]| -> Vec<f32> { (0..25).map(|i| at.contains(&i) as u8 as f32).collect() };
    let ramp = Tensor::new(vec![1, 1, 5, 5], (0..25).map(|i| i as f32).collect()).unwrap();
    let flat = Tensor::new(vec![1, 1, 5, 5], vec![1.0; 25]).unwrap();
    // rows {0,1}, {1,2,3}, {3,4}; columns {0,1,2}, {2,3,4}: each window's last element, or
    // with every value equal its first
    common::expect_values(
        &g,
        &[y, dx],
        &[("x", &ramp)],
        &[
            vec![7., 9., 17., 19., 22., 24.],
            ones_at(&[7, 9, 17, 19, 22, 24]),
        ],
        (0.0, 0.0),
    );
    common::expect_values(
        &g,
        &[y, dx],
        &[("x", &flat)],
        &[vec![1.0; 6], ones_at(&[0, 2, 5, 7, 15, 17])],
        (0.0, 0.0),
    );
    let m = shape_msg(
        g.adaptive_max_pool2d(g.input("v", [5, 5]), (2, 2))
            .unwrap_err(),
    );
    assert!(m.starts_with("adaptive_max_pool2d"), "{m}");
    for (xs, size) in [
        ([2, 3, 7, 9], (3, 4)),
        ([1, 2, 5, 4], (7, 6)),
        ([2, 2, 6, 6], (1, 1)),
    ] {
        let g = Graph::new();
        let x = g.input("x", xs);
        let y = g.adaptive_max_pool2d(x, size).unwrap();
        let seq = kiln::nn::Sequential::new().act(kiln::nn::Act::AdaptiveMaxPool(size.0, size.1));
        let (ys, _) = seq.apply(&g, x, false).unwrap();
        // distinct values: central differences do not change a window's maximum
        let xv = common::spread(&xs);
        let loss = random_projection(&g, y, 3);
        let dx = g.grad(loss, &[x]).unwrap()[0];
        let what = format!("{xs:?} -> {size:?}");
        check_gpu_vs_cpu(&what, &g, &[y, ys, dx], &[("x", &xv)], TOL_ELEMENTWISE);
        gradcheck(
            &what,
            &g,
            loss,
            &[("x", x)],
            &[("x", &xv)],
            30,
            TOL_REDUCTION,
        );
    }
}
