//! Scaled dot-product attention: the fused kernel (outputs poisoned with NaN) and the CPU
//! reference against an independent f64 implementation of torch's formula on awkward shapes
//! (one query, one key, primes, more rows than a workgroup's block, more keys than a tile,
//! Lq != Lk), causal and additive masks (broadcast, key padding, a mask the kernel cannot fold),
//! f16, heads too wide for the kernel; gradients against central differences; multi-head
//! attention and the transformer encoder layer against their formulas; a training step; errors.

mod common;

use common::{
    assert_close, check_formula, check_gpu_vs_cpu, gpu, gradcheck, rand, random_projection,
};
use kiln::ops::{TOL_F16, TOL_REDUCTION};
use kiln::{DType, Device, Error, Graph, NodeId, Tensor};

/// torch's `scaled_dot_product_attention` in f64: `q (*, Lq, D)`, `k (*, Lk, D)`, `v (*, Lk,
/// Dv)`, `mask` as a function of (slice, i, j) (its broadcast done by the caller).
fn sdpa_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskFn<'_>,
    causal: bool,
    scale: f64,
) -> Tensor {
    let (r, qd, kd, vd) = (q.dims().len(), q.dims(), k.dims(), v.dims());
    let (lq, d, lk, dv) = (qd[r - 2], qd[r - 1], kd[r - 2], vd[r - 1]);
    let slices = q.numel() / (lq * d);
    let mut out = Vec::new();
    for b in 0..slices {
        for i in 0..lq {
            let s: Vec<f64> = (0..lk)
                .map(|j| {
                    if causal && j > i {
                        return f64::NEG_INFINITY;
                    }
                    let dot: f64 = (0..d)
                        .map(|c| {
                            q.data()[(b * lq + i) * d + c] as f64
                                * k.data()[(b * lk + j) * d + c] as f64
                        })
                        .sum();
                    dot * scale + mask(b, i, j)
                })
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|&x| (x - mx).exp()).collect();
            let total: f64 = e.iter().sum();
            for c in 0..dv {
                let acc: f64 = (0..lk)
                    .map(|j| e[j] * v.data()[(b * lk + j) * dv + c] as f64)
                    .sum();
                out.push((acc / total) as f32);
            }
        }
    }
    let mut dims = qd.to_vec();
    dims[r - 1] = dv;
    Tensor::new(dims, out).unwrap()
}

/// A mask's value at (slice, query, key).
type MaskFn<'a> = dyn Fn(usize, usize, usize) -> f64 + 'a;

fn no_mask(_: usize, _: usize, _: usize) -> f64 {
    0.0
}

/// `(q, k, v)` shapes: leading axes, Lq, Lk, D, Dv.
fn shapes(lead: &[usize], lq: usize, lk: usize, d: usize, dv: usize) -> [Vec<usize>; 3] {
    let with = |a: usize, b: usize| [lead, &[a, b]].concat();
    [with(lq, d), with(lk, d), with(lk, dv)]
}

const CASES: &[(&[usize], usize, usize, usize, usize)] = &[
    (&[2, 3], 5, 7, 8, 6),    // batch and heads, Lq != Lk, Dv != D
    (&[1, 1], 1, 1, 1, 1),    // one query, one key
    (&[3], 17, 17, 13, 13),   // (N, L, E), primes
    (&[2, 2], 37, 41, 20, 9), // more rows than a block, more keys than a tile
    (&[], 4, 3, 5, 5),        // no leading axes
    (&[1, 2], 3, 70, 4, 4),   // few queries over many keys (decoding)
];

#[test]
fn attention_matches_torch_formula() {
    for &(lead, lq, lk, d, dv) in CASES {
        for causal in [false, true] {
            let [qs, ks, vs] = shapes(lead, lq, lk, d, dv);
            let g = Graph::new();
            let (q, k, v) = (
                g.input("q", qs.clone()),
                g.input("k", ks.clone()),
                g.input("v", vs.clone()),
            );
            let y = g.attention(q, k, v, None, causal, None).unwrap();
            let (tq, tk, tv) = (rand(&qs, 1), rand(&ks, 2), rand(&vs, 3));
            let want = sdpa_ref(&tq, &tk, &tv, &no_mask, causal, 1.0 / (d as f64).sqrt());
            let what = format!("attention {qs:?} {ks:?} {vs:?} causal {causal}");
            check_formula(
                &what,
                &g,
                y,
                &[("q", &tq), ("k", &tk), ("v", &tv)],
                &want,
                TOL_REDUCTION,
            );
        }
    }
}

/// One fused kernel forward, whatever the mask.
#[test]
fn attention_is_one_kernel() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let [qs, ks, vs] = shapes(&[2, 4], 9, 9, 8, 8);
    let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
    let m = g.input("m", [9, 9]);
    let y = g.attention(q, k, v, Some(m), true, Some(0.5)).unwrap();
    let plan = dev.compile(&g, &[y]).unwrap();
    assert_eq!(plan.kernels().len(), 1, "{:?}", plan.kernels());
    assert!(
        plan.kernels()[0].contains("attention"),
        "{:?}",
        plan.kernels()
    );
}

#[test]
fn attention_masks_broadcast_as_torch() {
    let (b, h, lq, lk, d) = (2, 3, 6, 5, 4);
    let [qs, ks, vs] = shapes(&[b, h], lq, lk, d, d);
    let (tq, tk, tv) = (rand(&qs, 4), rand(&ks, 5), rand(&vs, 6));
    // (Lq, Lk); key padding (B, 1, 1, Lk) with -inf; a full (B, H, Lq, Lk); per head (H, 1, Lk)
    let full = rand(&[b, h, lq, lk], 7);
    let mut padding = Tensor::zeros([b, 1, 1, lk]);
    padding.data_mut()[lk - 1] = f32::NEG_INFINITY; // sample 0 hides its last key
    padding.data_mut()[lk + 3] = f32::NEG_INFINITY; // sample 1 its fourth
    let per_head = rand(&[h, 1, lk], 8);
    let square = rand(&[lq, lk], 9);
    let cases: Vec<(&str, Tensor, Box<MaskFn<'_>>)> = vec![
        (
            "(Lq, Lk)",
            square.clone(),
            Box::new(|_, i, j| square.data()[i * lk + j] as f64),
        ),
        (
            "key padding",
            padding.clone(),
            Box::new(|s, _, j| padding.data()[(s / h) * lk + j] as f64),
        ),
        (
            "full",
            full.clone(),
            Box::new(|s, i, j| full.data()[(s * lq + i) * lk + j] as f64),
        ),
        (
            "per head",
            per_head.clone(),
            Box::new(|s, _, j| per_head.data()[(s % h) * lk + j] as f64),
        ),
    ];
    for (name, m, f) in &cases {
        for causal in [false, true] {
            let g = Graph::new();
            let (q, k, v) = (
                g.input("q", qs.clone()),
                g.input("k", ks.clone()),
                g.input("v", vs.clone()),
            );
            let mask = g.input("m", m.dims().to_vec());
            let y = g.attention(q, k, v, Some(mask), causal, Some(0.7)).unwrap();
            let want = sdpa_ref(&tq, &tk, &tv, f.as_ref(), causal, 0.7);
            let feeds = [("q", &tq), ("k", &tk), ("v", &tv), ("m", m)];
            check_formula(
                &format!("mask {name} causal {causal}"),
                &g,
                y,
                &feeds,
                &want,
                TOL_REDUCTION,
            );
        }
    }
}

/// A mask whose leading axes do not fold into (outer, head) strides is expanded to the scores'
/// shape first: same result.
#[test]
fn attention_mask_that_does_not_fold() {
    let [qs, ks, vs] = shapes(&[2, 3, 2], 4, 5, 3, 3);
    let (tq, tk, tv) = (rand(&qs, 10), rand(&ks, 11), rand(&vs, 12));
    let tm = rand(&[2, 1, 2, 4, 5], 13);
    let g = Graph::new();
    let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
    let m = g.input("m", [2, 1, 2, 4, 5]);
    let y = g.attention(q, k, v, Some(m), false, None).unwrap();
    let f = |s: usize, i: usize, j: usize| {
        let (b, hh) = (s / 6, s % 2);
        tm.data()[((b * 2 + hh) * 4 + i) * 5 + j] as f64
    };
    let want = sdpa_ref(&tq, &tk, &tv, &f, false, 1.0 / 3f64.sqrt());
    check_formula(
        "unfolded mask",
        &g,
        y,
        &[("q", &tq), ("k", &tk), ("v", &tv), ("m", &tm)],
        &want,
        TOL_REDUCTION,
    );
}

/// Heads wider than the kernel takes compose the formula from products and a softmax.
#[test]
fn attention_wide_heads_compose() {
    let d = kiln::ops::attention::MAX_HEAD_DIM + 3;
    let [qs, ks, vs] = shapes(&[2], 3, 4, d, 5);
    let (tq, tk, tv) = (rand(&qs, 14), rand(&ks, 15), rand(&vs, 16));
    let g = Graph::new();
    let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
    let y = g.attention(q, k, v, None, true, None).unwrap();
    let want = sdpa_ref(&tq, &tk, &tv, &no_mask, true, 1.0 / (d as f64).sqrt());
    check_formula(
        "wide heads",
        &g,
        y,
        &[("q", &tq), ("k", &tk), ("v", &tv)],
        &want,
        TOL_REDUCTION,
    );
}

#[test]
fn attention_gradients_match_central_differences() {
    for (causal, masked) in [(false, false), (true, false), (true, true)] {
        let [qs, ks, vs] = shapes(&[2, 1], 5, 4, 3, 2);
        let (tq, tk, tv) = (rand(&qs, 17), rand(&ks, 18), rand(&vs, 19));
        let tm = rand(&[5, 4], 20);
        let g = Graph::new();
        let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
        let m = g.input("m", [5, 4]);
        let y = g
            .attention(q, k, v, masked.then_some(m), causal, None)
            .unwrap();
        let loss = random_projection(&g, y, 21);
        let mut feeds = vec![("q", &tq), ("k", &tk), ("v", &tv)];
        if masked {
            feeds.push(("m", &tm));
        }
        gradcheck(
            &format!("attention causal {causal} masked {masked}"),
            &g,
            loss,
            &[("q", q), ("k", k), ("v", v)],
            &feeds,
            40,
            TOL_REDUCTION,
        );
    }
}

/// f16 q, k, v: read and written as half floats, computed in f32; gradients too.
#[test]
fn attention_f16() {
    let Some(dev) = gpu() else { return };
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("NOTICE: adapter without SHADER_F16; f16 attention skipped");
        return;
    }
    let [qs, ks, vs] = shapes(&[2, 2], 19, 23, 8, 8);
    let (tq, tk, tv) = (rand(&qs, 22), rand(&ks, 23), rand(&vs, 24));
    let g = Graph::new();
    let q = g.input_as("q", qs, DType::F16);
    let k = g.input_as("k", ks, DType::F16);
    let v = g.input_as("v", vs, DType::F16);
    let y = g.attention(q, k, v, None, true, None).unwrap();
    assert_eq!(g.dtype(y), DType::F16);
    let loss = g.sum_all(g.cast(y, DType::F32).unwrap()).unwrap();
    let grads = g.grad(loss, &[q, k, v]).unwrap();
    let mut outs = vec![y];
    outs.extend(grads);
    check_gpu_vs_cpu(
        "attention f16",
        &g,
        &outs,
        &[("q", &tq), ("k", &tk), ("v", &tv)],
        TOL_F16,
    );
}

#[test]
fn attention_shape_errors_name_the_op() {
    let g = Graph::new();
    let q = g.input("q", [2, 5, 4]);
    let k = g.input("k", [2, 6, 3]);
    let v = g.input("v", [2, 6, 4]);
    let k2 = g.input("k2", [2, 6, 4]);
    let v2 = g.input("v2", [2, 7, 4]);
    let m = g.input("m", [3, 6]);
    // packed (N, L, 3, H, D) and tokens (N, L, H, D) operands of the wrong shapes
    let (qkv4, qkv2) = (
        g.input("qkv4", [2, 5, 3, 4]),
        g.input("qkv2", [2, 5, 2, 1, 4]),
    );
    let (tq, tk) = (g.input("tq", [2, 5, 1, 4]), g.input("tk", [2, 6, 2, 4]));
    for (what, r) in [
        ("packed rank", g.attention_packed(qkv4, None, false, None)),
        ("packed 2", g.attention_packed(qkv2, None, false, None)),
        (
            "tokens rank",
            g.attention_tokens(tq, k2, k2, None, false, None, None),
        ),
        (
            "tokens heads",
            g.attention_tokens(tq, tk, tk, None, false, None, None),
        ),
        ("D", g.attention(q, k, v, None, false, None)),
        ("Lk", g.attention(q, k2, v2, None, false, None)),
        ("mask", g.attention(q, k2, v, Some(m), false, None)),
        ("scale", g.attention(q, k2, v, None, false, Some(f32::NAN))),
    ] {
        match r {
            Err(Error::Shape { op, msg }) => assert_eq!(op, "attention", "{what}: {msg}"),
            other => panic!("{what}: expected a shape error, got {other:?}"),
        }
    }
    let _ = (assert_close, Device::cpu);
}

// ---- layers: nn::MultiheadAttention, nn::TransformerEncoderLayer ----

/// `x (rows, in) W^T + b` in f64 for `W [out, in]`.
fn linear_ref(x: &[f64], w: &Tensor, b: &Tensor) -> Vec<f64> {
    let (o, i) = (w.dims()[0], w.dims()[1]);
    x.chunks(i)
        .flat_map(|row| {
            (0..o).map(move |r| {
                b.data()[r] as f64
                    + (0..i)
                        .map(|c| row[c] * w.data()[r * i + c] as f64)
                        .sum::<f64>()
            })
        })
        .collect()
}

/// Rows of `w` from `from`, `n` of them.
fn rows(w: &Tensor, from: usize, n: usize) -> Tensor {
    let c: usize = w.dims()[1..].iter().product();
    let mut dims = w.dims().to_vec();
    dims[0] = n;
    Tensor::new(dims, w.data()[from * c..(from + n) * c].to_vec()).unwrap()
}

/// torch's multi-head attention (batch first) in f64 from its state_dict tensors `p`:
/// `q (N, L, E)`, `kv (N, S, E)` for key and value.
fn mha_ref(
    p: &dyn Fn(&str) -> Tensor,
    heads: usize,
    xq: &[f64],
    xkv: &[f64],
    (n, l, s, e): (usize, usize, usize, usize),
    mask: &dyn Fn(usize, usize, usize, usize) -> f64,
    causal: bool,
) -> Vec<f64> {
    let (w, b) = (p("in_proj_weight"), p("in_proj_bias"));
    let q = linear_ref(xq, &rows(&w, 0, e), &rows(&b, 0, e));
    let k = linear_ref(xkv, &rows(&w, e, e), &rows(&b, e, e));
    let v = linear_ref(xkv, &rows(&w, 2 * e, e), &rows(&b, 2 * e, e));
    let hd = e / heads;
    let mut o = vec![0f64; n * l * e];
    for b in 0..n {
        for h in 0..heads {
            for i in 0..l {
                let sc: Vec<f64> = (0..s)
                    .map(|j| {
                        if causal && j > i {
                            return f64::NEG_INFINITY;
                        }
                        let dot: f64 = (0..hd)
                            .map(|c| {
                                q[(b * l + i) * e + h * hd + c] * k[(b * s + j) * e + h * hd + c]
                            })
                            .sum();
                        dot / (hd as f64).sqrt() + mask(b, h, i, j)
                    })
                    .collect();
                let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = sc.iter().map(|&x| (x - mx).exp()).collect();
                let total: f64 = ex.iter().sum();
                for c in 0..hd {
                    o[(b * l + i) * e + h * hd + c] = (0..s)
                        .map(|j| ex[j] * v[(b * s + j) * e + h * hd + c])
                        .sum::<f64>()
                        / total;
                }
            }
        }
    }
    linear_ref(&o, &p("out_proj.weight"), &p("out_proj.bias"))
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.data().iter().map(|&x| x as f64).collect()
}

fn tensor(dims: &[usize], v: &[f64]) -> Tensor {
    Tensor::new(dims.to_vec(), v.iter().map(|&x| x as f32).collect()).unwrap()
}

/// Random values for every parameter of `names` on `dev` (biases too: the defaults are zeros),
/// shaped by `g`'s parameter nodes after a compile.
/// Runs `y` on `dev` (CPU) with the named parameters set to random values (seeded), after a
/// first compile has created them.
fn run_with_random_params(
    dev: &Device,
    g: &Graph,
    y: NodeId,
    names: &[String],
    seed: u64,
    feeds: &[(&str, &Tensor)],
) -> Tensor {
    dev.compile(g, &[y]).unwrap();
    randomize(dev, names, seed);
    dev.compile(g, &[y]).unwrap().run(feeds).unwrap().remove(0)
}

fn randomize(dev: &Device, names: &[String], seed: u64) {
    for (k, name) in names.iter().enumerate() {
        let shape = dev.param(name).unwrap().dims().to_vec();
        let mut t = rand(&shape, seed + k as u64);
        t.data_mut().iter_mut().for_each(|v| *v *= 0.5);
        dev.set_param(name, &t).unwrap();
    }
}

#[test]
fn multihead_attention_matches_torch_formula() {
    use kiln::nn::{Init, MultiheadAttention};
    let (n, l, s, e, h) = (2, 5, 4, 12, 3);
    let mha = MultiheadAttention::new("mha", e, h, &mut Init::new(0)).unwrap();
    let names = mha.param_names();
    assert_eq!(
        names,
        [
            "mha.in_proj_weight",
            "mha.in_proj_bias",
            "mha.out_proj.weight",
            "mha.out_proj.bias"
        ]
    );
    let xq = rand(&[n, l, e], 30);
    let xkv = rand(&[n, s, e], 31);
    for (self_attention, causal, masked) in [
        (true, true, false),
        (false, false, true),
        (true, false, true),
    ] {
        let g = Graph::new();
        let q = g.input("q", [n, l, e]);
        let kv = if self_attention {
            q
        } else {
            g.input("kv", [n, s, e])
        };
        let m = g.input("m", [n, 1, 1, if self_attention { l } else { s }]);
        let (y, params) = mha
            .apply(&g, q, kv, kv, masked.then_some(m), causal, false)
            .unwrap();
        assert_eq!(params.len(), 4);
        let cpu = Device::cpu();
        let sk = if self_attention { l } else { s };
        let mut pad = Tensor::zeros([n, 1, 1, sk]);
        pad.data_mut()[sk + 2] = f32::NEG_INFINITY;
        let mut feeds = vec![("q", &xq)];
        if !self_attention {
            feeds.push(("kv", &xkv));
        }
        if masked {
            feeds.push(("m", &pad));
        }
        let got = run_with_random_params(&cpu, &g, y, &names, 40, &feeds);
        let p = |k: &str| cpu.param(&format!("mha.{k}")).unwrap();
        let kv_data = if self_attention {
            to_f64(&xq)
        } else {
            to_f64(&xkv)
        };
        let mask = |b: usize, _: usize, _: usize, j: usize| {
            if masked {
                pad.data()[b * sk + j] as f64
            } else {
                0.0
            }
        };
        let want = mha_ref(&p, h, &to_f64(&xq), &kv_data, (n, l, sk, e), &mask, causal);
        let what = format!("mha self {self_attention} causal {causal} masked {masked}");
        assert_close(&what, &got, &tensor(&[n, l, e], &want), 1e-5, 1e-4);
        check_gpu_vs_cpu(&what, &g, &[y], &feeds, TOL_REDUCTION);
    }
}

/// torch's layer norm over the last axis (weight and bias given) in f64.
/// A transformer layer's feed-forward block in f64: `linear2(act(linear1(v)))`, from its
/// parameters `p`.
fn ffn_ref(p: &dyn Fn(&str) -> Tensor, v: &[f64], act: impl Fn(f64) -> f64) -> Vec<f64> {
    let hidden: Vec<f64> = linear_ref(v, &p("linear1.weight"), &p("linear1.bias"))
        .into_iter()
        .map(act)
        .collect();
    linear_ref(&hidden, &p("linear2.weight"), &p("linear2.bias"))
}

/// The layer norm `<k>` (width `e`) of a transformer layer in f64.
fn norm_ref(p: &dyn Fn(&str) -> Tensor, k: &str, e: usize, v: &[f64]) -> Vec<f64> {
    layer_norm_rows(v, e, &p(&format!("{k}.weight")), &p(&format!("{k}.bias")))
}

/// `a + b` elementwise.
fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn layer_norm_rows(x: &[f64], e: usize, w: &Tensor, b: &Tensor) -> Vec<f64> {
    x.chunks(e)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / e as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e as f64;
            (0..e).map(move |j| {
                (row[j] - mean) / (var + 1e-5).sqrt() * w.data()[j] as f64 + b.data()[j] as f64
            })
        })
        .collect()
}

#[test]
fn transformer_encoder_layer_matches_torch_formula() {
    use kiln::nn::{Init, TransformerEncoderLayer};
    let (n, l, e, h, ff) = (2, 6, 8, 2, 16);
    let x = rand(&[n, l, e], 50);
    for norm_first in [false, true] {
        let mut layer = TransformerEncoderLayer::new("encf", e, h, ff, &mut Init::new(1)).unwrap();
        layer.norm_first = norm_first;
        let names = layer.param_names();
        assert_eq!(names.len(), 12);
        assert_eq!(names[0], "encf.self_attn.in_proj_weight");
        assert!(names.contains(&"encf.norm2.bias".to_string()));
        let g = Graph::new();
        let xi = g.input("x", [n, l, e]);
        // a training graph with dropout 0 computes what the evaluation graph does
        let layer = layer.with_dropout(0.0);
        let (y, params) = layer.apply(&g, xi, None, true, true).unwrap();
        assert_eq!(params.len(), 12);
        let cpu = Device::cpu();
        let got = run_with_random_params(&cpu, &g, y, &names, 60, &[("x", &x)]);
        let p = |k: &str| cpu.param(&format!("encf.{k}")).unwrap();
        let sa = |k: &str| p(&format!("self_attn.{k}"));
        let attend = |v: &[f64]| mha_ref(&sa, h, v, v, (n, l, l, e), &|_, _, _, _| 0.0, true);
        let ffn = |v: &[f64]| ffn_ref(&p, v, |z| z.max(0.0));
        let norm = |k: &str, v: &[f64]| norm_ref(&p, k, e, v);
        let xv = to_f64(&x);
        let want = if norm_first {
            let x1 = add(&xv, &attend(&norm("norm1", &xv)));
            add(&x1, &ffn(&norm("norm2", &x1)))
        } else {
            let x1 = norm("norm1", &add(&xv, &attend(&xv)));
            norm("norm2", &add(&x1, &ffn(&x1)))
        };
        let what = format!("encoder layer norm_first {norm_first}");
        assert_close(&what, &got, &tensor(&[n, l, e], &want), 1e-5, 1e-4);
        check_gpu_vs_cpu(&what, &g, &[y], &[("x", &x)], TOL_REDUCTION);
    }
}

/// The layer's gradient for its input against central differences (dropout 0), post-norm and
/// pre-norm, GPU against CPU. GELU, not relu: a hidden unit within the step of its kink breaks
/// central differences.
#[test]
fn transformer_encoder_layer_gradients() {
    use kiln::nn::{FeedForwardAct, Init, TransformerEncoderLayer};
    for norm_first in [false, true] {
        let mut layer = TransformerEncoderLayer::new("enc", 8, 2, 12, &mut Init::new(2))
            .unwrap()
            .with_dropout(0.0);
        layer.activation = FeedForwardAct::Gelu;
        layer.norm_first = norm_first;
        let g = Graph::new();
        let x = g.input("x", [2, 3, 8]);
        let (y, _) = layer.apply(&g, x, None, true, true).unwrap();
        let loss = random_projection(&g, y, 70);
        let xv = rand(&[2, 3, 8], 71);
        let what = format!("encoder layer norm_first {norm_first}");
        gradcheck(
            &what,
            &g,
            loss,
            &[("x", x)],
            &[("x", &xv)],
            48,
            TOL_REDUCTION,
        );
    }
}

/// A two-layer causal transformer learns to copy each token's predecessor (a task attention
/// solves and a per-position network cannot): the loss falls from ln(V) to near 0, on the GPU
/// with dropout on and one submission per step.
#[test]
fn transformer_learns_to_copy_the_previous_token() {
    use kiln::nn::{Embedding, Init, Layer, Linear, Optimizer, TrainStep};
    let Some(dev) = gpu() else { return };
    let (n, l, vocab, e) = (16, 8, 7, 16);
    let mut init = Init::new(3);
    let tok = Embedding::new("tok", vocab, e, &mut init);
    let pos = Embedding::new("pos", l, e, &mut init);
    let layers = pre_norm_layers("layers", e, 2, 0.05, &mut init);
    let head = Linear::new("head", e, vocab, &mut init);
    let g = Graph::new();
    let x = g.input("x", [n, l]);
    let positions = g.input("positions", [l]);
    let target = g.input("target", [n * l]);
    let mut params = Vec::new();
    let (t, p) = tok.apply_layer(&g, x, true).unwrap();
    params.extend(p);
    let (ps, p) = pos.apply_layer(&g, positions, true).unwrap();
    params.extend(p);
    let mut h = g.add(t, ps).unwrap();
    for layer in &layers {
        let (y, p) = layer.apply(&g, h, None, true, true).unwrap();
        params.extend(p);
        h = y;
    }
    let (logits, p) = head
        .apply(&g, g.reshape(h, &[(n * l) as isize, e as isize]).unwrap())
        .unwrap();
    params.extend(p);
    let loss = g.cross_entropy(logits, target).unwrap();
    let mut step = TrainStep::new(&dev, &g, loss, &params, Optimizer::adam(1e-2), 0).unwrap();
    let pos_v = Tensor::new([l], (0..l).map(|i| i as f32).collect()).unwrap();
    let mut rng = Init::new(4);
    let mut first = None;
    let mut last = 0.0;
    for it in 0..150 {
        let seq: Vec<f32> = (0..n * l)
            .map(|_| (rng.next_u32() % vocab as u32) as f32)
            .collect();
        // target at position i is the token at i - 1 (position 0: itself)
        let tgt: Vec<f32> = (0..n * l)
            .map(|k| if k % l == 0 { seq[k] } else { seq[k - 1] })
            .collect();
        let (xs, ts) = (
            Tensor::new([n, l], seq).unwrap(),
            Tensor::new([n * l], tgt).unwrap(),
        );
        let want = it % 10 == 0 || it == 149;
        if let Some(v) = step
            .step(&[("x", &xs), ("positions", &pos_v), ("target", &ts)], want)
            .unwrap()
        {
            first.get_or_insert(v);
            last = v;
        }
    }
    let first = first.unwrap();
    assert!(first > 1.5, "starts near ln(7) = 1.95, got {first}");
    assert!(last < 0.3, "the loss fell from {first} to {last} only");
}

/// Dropout of the probabilities: the fused kernel (and its CPU twin) drops exactly what the
/// graph's dropout op drops from the composed `softmax(q k^T * scale)` with the same seed and
/// salt (the mask the backward pass recomputes); gradients against central differences.
/// The attention formula from graph ops (products, a softmax, dropout): `qkv` of shapes
/// `(*, L, D)`, an f32 mask broadcastable to the scores.
fn composed_attention(
    g: &Graph,
    [q, k, v]: [NodeId; 3],
    mask: Option<NodeId>,
    causal: bool,
    scale: f32,
    dropout: Option<(f32, NodeId, u32)>,
) -> NodeId {
    let mut scores = g
        .mul_scalar(g.matmul_t(q, k, false, true).unwrap(), scale)
        .unwrap();
    if let Some(m) = mask {
        scores = g.add(scores, m).unwrap();
    }
    if causal {
        let dims = g.shape(scores).dims().to_vec();
        let (lq, lk) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let data = (0..lq * lk)
            .map(|e| {
                if e % lk > e / lk {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let above = g.constant(Tensor::new([lq, lk], data).unwrap());
        scores = g.add(scores, above).unwrap();
    }
    let mut p = g.softmax(scores, -1).unwrap();
    if let Some((pr, seed, salt)) = dropout {
        p = g.dropout(p, pr, seed, salt).unwrap();
    }
    g.matmul(p, v).unwrap()
}

/// The fused backward's three kernels (statistics, dk and dv, dq) give the gradients of the
/// formula composed from graph ops, on the forward's awkward shapes, causal or not, with a mask
/// and dropout, and at the widest head they take; wider heads compose their backward.
#[test]
fn attention_backward_matches_the_composed_formula() {
    let widest = kiln::ops::attention::MAX_BACKWARD_HEAD_DIM;
    let mut cases: Vec<_> = CASES
        .iter()
        .map(|&(lead, lq, lk, d, dv)| (lead, lq, lk, d, dv, false))
        .collect();
    cases.push((&[2, 3], 37, 41, 20, 9, true)); // a mask and dropout
    cases.push((&[1], 6, 5, widest, widest, false));
    cases.push((&[1], 6, 5, widest + 1, 3, false)); // composed
    let seed = Tensor::new([1], vec![4242.0]).unwrap();
    for (n, &(lead, lq, lk, d, dv, extras)) in cases.iter().enumerate() {
        for causal in [false, true] {
            let [qs, ks, vs] = shapes(lead, lq, lk, d, dv);
            let (tq, tk, tv) = (rand(&qs, 90), rand(&ks, 91), rand(&vs, 92));
            let tm = rand(&[lq, lk], 93);
            let g = Graph::new();
            let (q, k, v) = (
                g.input("q", qs.clone()),
                g.input("k", ks.clone()),
                g.input("v", vs.clone()),
            );
            let (m, s) = (g.input("m", [lq, lk]), g.input("seed", [1]));
            let (mask, drop) = match extras {
                true => (Some(m), Some((0.25, s, 5))),
                false => (None, None),
            };
            let scale = 0.3;
            let fused = match drop {
                Some((p, s, salt)) => {
                    g.attention_dropout(q, k, v, mask, causal, Some(scale), p, s, salt)
                }
                None => g.attention(q, k, v, mask, causal, Some(scale)),
            }
            .unwrap();
            let composed = composed_attention(&g, [q, k, v], mask, causal, scale, drop);
            let grads = |y| g.grad(random_projection(&g, y, 94), &[q, k, v]).unwrap();
            let (got, want) = (grads(fused), grads(composed));
            let feeds = [
                ("q", &tq),
                ("k", &tk),
                ("v", &tv),
                ("m", &tm),
                ("seed", &seed),
            ];
            let feeds = if extras { &feeds[..] } else { &feeds[..3] };
            let reference = Device::cpu()
                .compile(&g, &want)
                .unwrap()
                .run(feeds)
                .unwrap();
            for (name, (&gn, r)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&reference)) {
                let what = format!("case {n} {qs:?} {ks:?} {vs:?} causal {causal}: {name}");
                check_formula(&what, &g, gn, feeds, r, TOL_REDUCTION);
            }
            if let Some(dev) = gpu() {
                let plan = dev.compile(&g, &got).unwrap();
                let fused_kernels = plan
                    .kernels()
                    .iter()
                    .filter(|l| l.contains("attention_"))
                    .count();
                let expect = if d.max(dv) <= widest { 3 } else { 0 };
                assert_eq!(fused_kernels, expect, "case {n}: {:?}", plan.kernels());
            }
        }
    }
}

/// The fused backward never stores the `(L, L)` scores: a training step's plan for causal
/// attention over 256 positions allocates less than one score matrix, where the composed
/// backward stores several.
#[test]
fn attention_backward_memory_is_linear_in_the_sequence() {
    let Some(dev) = gpu() else { return };
    let [qs, ks, vs] = shapes(&[2], 256, 256, 16, 16);
    let peak = |fused: bool| {
        let g = Graph::new();
        let (q, k, v) = (
            g.input("q", qs.clone()),
            g.input("k", ks.clone()),
            g.input("v", vs.clone()),
        );
        let y = match fused {
            true => g.attention(q, k, v, None, true, None).unwrap(),
            false => composed_attention(&g, [q, k, v], None, true, 0.25, None),
        };
        let loss = g.sum_all(y).unwrap();
        let grads = g.grad(loss, &[q, k, v]).unwrap();
        dev.compile(&g, &grads).unwrap().info().peak_bytes
    };
    let scores = (2 * 256 * 256 * 4) as u64;
    let (fused, composed) = (peak(true), peak(false));
    assert!(
        fused < scores,
        "fused backward: {fused} bytes, one score matrix {scores}"
    );
    assert!(composed > 2 * scores, "composed backward: {composed} bytes");
}

#[test]
fn attention_dropout_matches_composed_dropout() {
    let [qs, ks, vs] = shapes(&[2, 3], 9, 11, 5, 4);
    let (tq, tk, tv) = (rand(&qs, 80), rand(&ks, 81), rand(&vs, 82));
    let seed = Tensor::new([1], vec![12345.0]).unwrap();
    for causal in [false, true] {
        let g = Graph::new();
        let (q, k, v) = (
            g.input("q", qs.clone()),
            g.input("k", ks.clone()),
            g.input("v", vs.clone()),
        );
        let s = g.input("seed", [1]);
        let y = g
            .attention_dropout(q, k, v, None, causal, Some(0.4), 0.3, s, 77)
            .unwrap();
        let composed = composed_attention(&g, [q, k, v], None, causal, 0.4, Some((0.3, s, 77)));
        let feeds = [("q", &tq), ("k", &tk), ("v", &tv), ("seed", &seed)];
        let want = Device::cpu()
            .compile(&g, &[composed])
            .unwrap()
            .run(&feeds)
            .unwrap()
            .remove(0);
        let what = format!("attention dropout causal {causal}");
        check_formula(&what, &g, y, &feeds, &want, TOL_REDUCTION);
        let dropped = {
            let plain = g.attention(q, k, v, None, causal, Some(0.4)).unwrap();
            let out = Device::cpu()
                .compile(&g, &[plain])
                .unwrap()
                .run(&feeds)
                .unwrap()
                .remove(0);
            out.data() != want.data()
        };
        assert!(dropped, "{what}: dropout changed nothing");
        let loss = random_projection(&g, y, 83);
        gradcheck(
            &what,
            &g,
            loss,
            &[("q", q), ("k", k), ("v", v)],
            &feeds,
            30,
            TOL_REDUCTION,
        );
    }
}

/// `verify` runs a transformer layer's forward and gradients (dropout on, a key padding mask)
/// node by node on the GPU and the CPU reference and finds no divergence; a batch of one
/// window takes the fused kernel with many query blocks.
#[test]
fn verify_finds_no_divergence_in_a_transformer_layer() {
    use kiln::nn::{dropout_seed, Init, TransformerEncoderLayer};
    let Some(dev) = gpu() else { return };
    let layer = TransformerEncoderLayer::new("venc", 16, 4, 32, &mut Init::new(5)).unwrap();
    let g = Graph::new();
    let x = g.input("x", [2, 37, 16]);
    let m = g.input("m", [2, 1, 1, 37]);
    let (y, params) = layer.apply(&g, x, Some(m), false, true).unwrap();
    assert!(g.find_input(kiln::nn::layers::DROPOUT_SEED) == Some(dropout_seed(&g)));
    let loss = random_projection(&g, y, 90);
    let grads = g.grad(loss, &params).unwrap();
    let mut outs = vec![loss];
    outs.extend(grads);
    let mask = kiln::nn::padding_mask(&[37, 30], 37); // the second window is 30 long
    assert_eq!(mask.data()[37 + 29], 0.0);
    assert_eq!(mask.data()[37 + 30], f32::NEG_INFINITY);
    let xv = rand(&[2, 37, 16], 91);
    let seed = Tensor::new([1], vec![7.0]).unwrap();
    let feeds = [("x", &xv), ("m", &mask), ("dropout.seed", &seed)];
    let report = dev.verify(&g, &outs, &feeds).unwrap();
    assert!(report.ok(), "{report}");
}

/// A transformer layer's weights go through a safetensors checkpoint under torch's names and
/// give the same outputs on another device (the CPU reference) after loading.
#[test]
fn transformer_layer_checkpoint_round_trip() {
    use kiln::nn::{checkpoint, Init, TransformerEncoderLayer};
    let layer = TransformerEncoderLayer::new("ckpt.enc", 8, 2, 16, &mut Init::new(6)).unwrap();
    let build = |g: &Graph| {
        let x = g.input("x", [2, 5, 8]);
        layer.apply(g, x, None, true, false).unwrap().0
    };
    let dev = Device::cpu();
    let g = Graph::new();
    let y = build(&g);
    let names = layer.param_names();
    let xv = rand(&[2, 5, 8], 101);
    let want = run_with_random_params(&dev, &g, y, &names, 100, &[("x", &xv)]);
    let path = std::env::temp_dir().join(format!("kiln-enc-{}.safetensors", std::process::id()));
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    checkpoint::save(&dev, &refs, &path).unwrap();
    let stored: Vec<String> = checkpoint::read(&path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for torch_name in [
        "ckpt.enc.self_attn.in_proj_weight",
        "ckpt.enc.self_attn.in_proj_bias",
        "ckpt.enc.self_attn.out_proj.weight",
        "ckpt.enc.linear1.weight",
        "ckpt.enc.linear2.bias",
        "ckpt.enc.norm1.weight",
        "ckpt.enc.norm2.bias",
    ] {
        assert!(
            stored.iter().any(|s| s == torch_name),
            "{torch_name} in {stored:?}"
        );
    }
    let other = Device::cpu();
    checkpoint::load(&other, &path, &refs).unwrap();
    let g2 = Graph::new();
    let y2 = build(&g2);
    let got = other
        .compile(&g2, &[y2])
        .unwrap()
        .run(&[("x", &xv)])
        .unwrap()
        .remove(0);
    assert_close("after loading", &got, &want, 0.0, 0.0);
    let _ = std::fs::remove_file(&path);
}

/// Multi-head attention and a transformer layer on f16 activations (f32 parameters cast in
/// the graph, as under autocast): GPU against the CPU reference, gradients too.
#[test]
fn transformer_layer_f16() {
    use kiln::nn::{Init, TransformerEncoderLayer};
    let Some(dev) = gpu() else { return };
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("NOTICE: adapter without SHADER_F16; f16 transformer skipped");
        return;
    }
    let layer = TransformerEncoderLayer::new("h.enc", 16, 4, 32, &mut Init::new(7))
        .unwrap()
        .with_dropout(0.0);
    let g = Graph::new();
    let x = g.input_as("x", [2, 9, 16], DType::F16);
    let (y, params) = layer.apply(&g, x, None, true, true).unwrap();
    assert_eq!(g.dtype(y), DType::F16);
    let loss = g.sum_all(g.cast(y, DType::F32).unwrap()).unwrap();
    let grads = g.grad(loss, &params).unwrap();
    let mut outs = vec![y];
    outs.extend(grads);
    let xv = rand(&[2, 9, 16], 110);
    // parameter gradients are sums over 18 rows of f16 products (each rounded to 2^-11 of its
    // size, about 1) that cancel to totals near 0.05: absolute error, not relative, bounds them
    check_gpu_vs_cpu(
        "transformer f16",
        &g,
        &outs,
        &[("x", &xv)],
        (1e-2, TOL_F16.1),
    );
}

/// Decoding with a key/value cache: a prefill of 3 tokens, then one token per run, gives each
/// position what the whole sequence's causal forward gives (two pre-norm layers, each with its
/// own cache), on the CPU reference and on the GPU, with heads of 4 features and of 160 (wider
/// than the backward kernels take: decoding still reads the caches as they are, no permutes);
/// `write_rows` alone against its formula.
#[test]
fn cached_decoding_matches_the_causal_forward() {
    use kiln::nn::{decode_mask, Init};
    for (e, heads) in [(16usize, 4usize), (320, 2)] {
        let (n, l, max_len) = (2, 7, 9);
        let mut init = Init::new(8);
        let layers = pre_norm_layers(&format!("cached{e}x{heads}"), e, heads, 0.0, &mut init);
        let xs = rand(&[n, l, e], 120);
        let full = {
            let g = Graph::new();
            let mut h = g.input("x", [n, l, e]);
            for t in &layers {
                h = t.apply(&g, h, None, true, false).unwrap().0;
            }
            (g, h)
        };
        let step_graph = |s: usize| {
            let g = Graph::new();
            let mut h = g.input("x", [n, s, e]);
            let pos = g.input("pos", [1]);
            let mask = g.input("mask", [s, max_len]);
            for t in &layers {
                h = t.apply_cached(&g, h, pos, max_len, mask).unwrap().0;
            }
            (g, h)
        };
        let devices = common::devices();
        for dev in devices {
            let want = dev
                .compile(&full.0, &[full.1])
                .unwrap()
                .run(&[("x", &xs)])
                .unwrap()
                .remove(0);
            let (g3, y3) = step_graph(3);
            let (g1, y1) = step_graph(1);
            let mut prefill = dev.compile(&g3, &[y3]).unwrap();
            let mut step = dev.compile(&g1, &[y1]).unwrap();
            let permutes = step
                .kernels()
                .iter()
                .filter(|k| k.contains("permute"))
                .count();
            assert_eq!(permutes, 0, "heads of {}: {:?}", e / heads, step.kernels());
            let rows = |from: usize, s: usize, t: &Tensor| -> Tensor {
                let mut d = Vec::new();
                for b in 0..n {
                    d.extend_from_slice(&t.data()[(b * l + from) * e..(b * l + from + s) * e]);
                }
                Tensor::new([n, s, e], d).unwrap()
            };
            let run = |plan: &mut kiln::Plan, from: usize, s: usize| {
                let pos = Tensor::new([1], vec![from as f32]).unwrap();
                let mask = decode_mask(from, s, max_len);
                let x = rows(from, s, &xs);
                let got = plan
                    .run(&[("x", &x), ("pos", &pos), ("mask", &mask)])
                    .unwrap()
                    .remove(0);
                let what = format!("{} positions {from}..{}", dev.describe(), from + s);
                assert_close(&what, &got, &rows(from, s, &want), 1e-5, 1e-4);
            };
            run(&mut prefill, 0, 3);
            for p in 3..l {
                run(&mut step, p, 1);
            }
        }
    }

    // write_rows: rows at the position, rows past the cache's end dropped
    let g = Graph::new();
    let cache = g.param_init("wr.cache", Tensor::full([2, 4, 3], 9.0));
    let value = g.input("v", [2, 2, 3]);
    let pos = g.input("p", [1]);
    let y = g.write_rows(cache, value, pos).unwrap();
    let v = rand(&[2, 2, 3], 121);
    let p = Tensor::new([1], vec![3.0]).unwrap();
    let mut want = vec![9.0f32; 24];
    want[9..12].copy_from_slice(&v.data()[0..3]);
    want[21..24].copy_from_slice(&v.data()[6..9]);
    let want = Tensor::new([2, 4, 3], want).unwrap();
    check_formula(
        "write_rows",
        &g,
        y,
        &[("v", &v), ("p", &p)],
        &want,
        (0.0, 0.0),
    );
}

/// Two pre-norm encoder layers `<prefix>.0`, `<prefix>.1` of width `e` (feed-forward 32).
fn pre_norm_layers(
    prefix: &str,
    e: usize,
    heads: usize,
    dropout: f32,
    init: &mut kiln::nn::Init,
) -> Vec<kiln::nn::TransformerEncoderLayer> {
    (0..2)
        .map(|i| {
            let name = format!("{prefix}.{i}");
            let mut t = kiln::nn::TransformerEncoderLayer::new(&name, e, heads, 32, init)
                .unwrap()
                .with_dropout(dropout);
            t.norm_first = true;
            t
        })
        .collect()
}

/// Decoding an f16 network: the caches hold the keys and values in f16 (the step plan casts
/// nothing, and its layer norms compute their statistics inside the normalization); one token
/// per run matches the f16 causal forward within f16's tolerance.
#[test]
fn cached_decoding_in_f16() {
    use kiln::nn::{decode_mask, Init};
    let Some(dev) = gpu() else { return };
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("NOTICE: adapter without SHADER_F16; f16 decoding skipped");
        return;
    }
    let (l, e) = (5, 8);
    let layers = pre_norm_layers("dec16", e, 2, 0.0, &mut Init::new(9));
    let xs = rand(&[1, l, e], 130);
    let g = Graph::new();
    let mut h = g.input_as("x", [1, l, e], DType::F16);
    for t in &layers {
        h = t.apply(&g, h, None, true, false).unwrap().0;
    }
    let want = dev
        .compile(&g, &[h])
        .unwrap()
        .run(&[("x", &xs)])
        .unwrap()
        .remove(0);
    let g = Graph::new();
    let mut h = g.input_as("x", [1, 1, e], DType::F16);
    let (pos, mask) = (g.input("pos", [1]), g.input("mask", [1, l]));
    for t in &layers {
        h = t.apply_cached(&g, h, pos, l, mask).unwrap().0;
    }
    let mut step = dev.compile(&g, &[h]).unwrap();
    let kernels = step.kernels();
    for op in ["cast", "group_stats"] {
        assert_eq!(common::count_op(&kernels, op), 0, "{op} in {kernels:#?}");
    }
    for p in 0..l {
        let x = Tensor::new([1, 1, e], xs.data()[p * e..(p + 1) * e].to_vec()).unwrap();
        let position = Tensor::new([1], vec![p as f32]).unwrap();
        let mask = decode_mask(p, 1, l);
        let feeds = [("x", &x), ("pos", &position), ("mask", &mask)];
        let got = step.run(&feeds).unwrap().remove(0);
        let row = Tensor::new([1, 1, e], want.data()[p * e..(p + 1) * e].to_vec()).unwrap();
        assert_close(&format!("f16 position {p}"), &got, &row, 2e-2, TOL_F16.1);
    }
    // the keys of every position, as f16 holds them
    let keys = dev.param("dec16.1.self_attn.k_cache").unwrap();
    assert_eq!(keys.dims(), &[1, l, e]);
    assert!(keys.data().iter().all(|&v| v == DType::F16.round(v)));
    assert!((0..l).all(|p| keys.data()[p * e..(p + 1) * e].iter().any(|&v| v != 0.0)));
}

/// The decoder layer (self-attention, cross-attention to a memory, feed-forward) against
/// torch's formula, post-norm and pre-norm, with a causal target and a memory padding mask;
/// gradients for the target and the memory against central differences.
#[test]
fn transformer_decoder_layer_matches_torch_formula() {
    use kiln::nn::{FeedForwardAct, Init, TransformerDecoderLayer};
    let (n, t, s, e, h, ff) = (2, 5, 4, 8, 2, 12);
    let tgt = rand(&[n, t, e], 140);
    let mem = rand(&[n, s, e], 141);
    let mut pad = Tensor::zeros([n, 1, 1, s]);
    pad.data_mut()[s + 3] = f32::NEG_INFINITY; // the second memory is 3 long
    for norm_first in [false, true] {
        let mut layer = TransformerDecoderLayer::new("decf", e, h, ff, &mut Init::new(10))
            .unwrap()
            .with_dropout(0.0);
        layer.norm_first = norm_first;
        layer.activation = FeedForwardAct::Gelu;
        let names = layer.param_names();
        assert_eq!(names.len(), 18);
        assert!(names.contains(&"decf.multihead_attn.in_proj_weight".to_string()));
        assert!(names.contains(&"decf.norm3.bias".to_string()));
        let g = Graph::new();
        let (ti, mi) = (g.input("t", [n, t, e]), g.input("m", [n, s, e]));
        let pm = g.input("pad", [n, 1, 1, s]);
        let (y, params) = layer.apply(&g, ti, mi, None, true, Some(pm), true).unwrap();
        assert_eq!(params.len(), 18);
        let feeds = [("t", &tgt), ("m", &mem), ("pad", &pad)];
        let cpu = Device::cpu();
        let got = run_with_random_params(&cpu, &g, y, &names, 150, &feeds);
        let p = |k: &str| cpu.param(&format!("decf.{k}")).unwrap();
        let sa = |k: &str| p(&format!("self_attn.{k}"));
        let ca = |k: &str| p(&format!("multihead_attn.{k}"));
        let no_mask = |_: usize, _: usize, _: usize, _: usize| 0.0;
        let pad_mask = |b: usize, _: usize, _: usize, j: usize| pad.data()[b * s + j] as f64;
        let memv = to_f64(&mem);
        let self_attend = |v: &[f64]| mha_ref(&sa, h, v, v, (n, t, t, e), &no_mask, true);
        let cross = |v: &[f64]| mha_ref(&ca, h, v, &memv, (n, t, s, e), &pad_mask, false);
        let gelu = |z: f64| 0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2));
        let ffn = |v: &[f64]| ffn_ref(&p, v, gelu);
        let norm = |k: &str, v: &[f64]| norm_ref(&p, k, e, v);
        let xv = to_f64(&tgt);
        let want = if norm_first {
            let x1 = add(&xv, &self_attend(&norm("norm1", &xv)));
            let x2 = add(&x1, &cross(&norm("norm2", &x1)));
            add(&x2, &ffn(&norm("norm3", &x2)))
        } else {
            let x1 = norm("norm1", &add(&xv, &self_attend(&xv)));
            let x2 = norm("norm2", &add(&x1, &cross(&x1)));
            norm("norm3", &add(&x2, &ffn(&x2)))
        };
        let what = format!("decoder layer norm_first {norm_first}");
        assert_close(&what, &got, &tensor(&[n, t, e], &want), 1e-5, 1e-4);
        check_gpu_vs_cpu(&what, &g, &[y], &feeds, TOL_REDUCTION);
        let loss = random_projection(&g, y, 151);
        let wrt = [("t", ti), ("m", mi)];
        gradcheck(&what, &g, loss, &wrt, &feeds, 24, TOL_REDUCTION);
    }
}

/// More (batch, head) slices than one grid axis holds (65,535 workgroups): the grid folds into
/// two dimensions and every slice is still computed once.
#[test]
fn attention_over_many_slices_folds_its_grid() {
    let [qs, ks, vs] = shapes(&[70_000], 1, 2, 3, 2);
    let (tq, tk, tv) = (rand(&qs, 160), rand(&ks, 161), rand(&vs, 162));
    let g = Graph::new();
    let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
    let y = g.attention(q, k, v, None, false, None).unwrap();
    let want = sdpa_ref(&tq, &tk, &tv, &no_mask, false, 1.0 / 3f64.sqrt());
    let feeds = [("q", &tq), ("k", &tk), ("v", &tv)];
    check_formula("70,000 slices", &g, y, &feeds, &want, TOL_REDUCTION);
}

/// The packed layout (`Graph::attention_packed`, qkv `(N, L, 3, H, D)` -> `(N, L, H, D)`) gives
/// what attention of the heads split by graph ops gives (permute, narrow, attention, permute
/// back), forward and gradient, causal or not, on awkward shapes (one position, one head, one
/// feature, primes, more positions than a tile), with a mask and dropout, and at the widest head
/// the backward kernels take; a wider head runs the packed forward kernel and a backward
/// unpacked by graph ops, one wider than the forward kernel takes is unpacked for both. Its
/// training plan has the four attention kernels and no copies of heads.
#[test]
fn packed_attention_matches_split_heads() {
    let widest = kiln::ops::attention::MAX_BACKWARD_HEAD_DIM;
    let cases: &[(usize, usize, usize, usize, bool)] = &[
        (1, 1, 1, 1, false),
        (2, 7, 3, 5, false),
        (1, 37, 2, 13, true), // a mask and dropout
        (2, 70, 1, 8, false),
        (1, 6, 1, widest, false),
        (1, 5, 2, widest + 1, false), // the backward unpacked by graph ops
        (1, 3, 1, 257, false),        // unpacked by graph ops
    ];
    let seed = Tensor::new([1], vec![77.0]).unwrap();
    for (n, &(b, l, h, d, extras)) in cases.iter().enumerate() {
        for causal in [false, true] {
            let shape = [b, l, 3, h, d];
            let (tqkv, tm) = (rand(&shape, 60 + n as u64), rand(&[l, l], 61));
            let g = Graph::new();
            let qkv = g.input("qkv", shape);
            let (m, s) = (g.input("m", [l, l]), g.input("seed", [1]));
            let (mask, drop) = match extras {
                true => (Some(m), Some((0.2, s, 9))),
                false => (None, None),
            };
            let scale = Some(0.4);
            let packed = match drop {
                Some((p, s, salt)) => {
                    g.attention_packed_dropout(qkv, mask, causal, scale, p, s, salt)
                }
                None => g.attention_packed(qkv, mask, causal, scale),
            }
            .unwrap();
            let heads = g.permute(qkv, &[2, 0, 3, 1, 4]).unwrap();
            let dims = [b as isize, h as isize, l as isize, d as isize];
            let part = |i| g.reshape(g.narrow(heads, 0, i, 1).unwrap(), &dims).unwrap();
            let (q, k, v) = (part(0), part(1), part(2));
            let split = match drop {
                Some((p, s, salt)) => g.attention_dropout(q, k, v, mask, causal, scale, p, s, salt),
                None => g.attention(q, k, v, mask, causal, scale),
            };
            let split = g.permute(split.unwrap(), &[0, 2, 1, 3]).unwrap();
            assert_eq!(g.shape(packed), g.shape(split));
            let grad = |y| g.grad(random_projection(&g, y, 62), &[qkv]).unwrap()[0];
            let (dgot, dwant) = (grad(packed), grad(split));
            let feeds = [("qkv", &tqkv), ("m", &tm), ("seed", &seed)];
            let feeds = if extras { &feeds[..] } else { &feeds[..1] };
            let want = Device::cpu()
                .compile(&g, &[split, dwant])
                .unwrap()
                .run(feeds)
                .unwrap();
            let what = format!("case {n} {shape:?} causal {causal}");
            check_formula(
                &format!("{what}: y"),
                &g,
                packed,
                feeds,
                &want[0],
                TOL_REDUCTION,
            );
            check_formula(
                &format!("{what}: dqkv"),
                &g,
                dgot,
                feeds,
                &want[1],
                TOL_REDUCTION,
            );
            if let Some(dev) = gpu() {
                let plan = dev.compile(&g, &[packed, dgot]).unwrap();
                let kernels = plan.kernels();
                let count = |s: &str| kernels.iter().filter(|l| l.contains(s)).count();
                if d <= widest {
                    assert_eq!(count(" attention"), 4, "case {n}: {kernels:?}");
                    let copies = count("permute") + count("narrow") + count(" pad");
                    assert_eq!(copies, 0, "case {n}: {kernels:?}");
                } else {
                    assert_eq!(count("attention_"), 0, "case {n}: {kernels:?}");
                    // the forward kernel where it takes the head, reading the packed layout
                    let fused = usize::from(d <= kiln::ops::attention::MAX_HEAD_DIM);
                    assert_eq!(count(" attention ["), fused, "case {n}: {kernels:?}");
                }
            }
        }
    }
}

/// The tokens layout (`Graph::attention_tokens`, `(N, L, H, D)` operands, as FlashAttention's
/// `flash_attn_func`) gives what attention of the permuted heads gives, forward and gradients,
/// with Lq != Lk and Dv != D, causal or not, a mask and dropout, and a head too wide for the
/// backward kernels (the forward kernel reads the layout, the backward is permuted by graph
/// ops); its training plan permutes nothing.
#[test]
fn tokens_attention_matches_permuted_heads() {
    let widest = kiln::ops::attention::MAX_BACKWARD_HEAD_DIM;
    let cases: &[(usize, usize, usize, usize, usize, usize, bool)] = &[
        (1, 1, 1, 1, 1, 1, false),
        (2, 7, 11, 3, 5, 4, false),
        (1, 37, 20, 2, 13, 9, true), // a mask and dropout
        (2, 5, 70, 1, 8, 8, false),
        (1, 3, 4, 2, widest + 1, 3, false), // the backward permuted by graph ops
    ];
    let seed = Tensor::new([1], vec![78.0]).unwrap();
    for (n, &(b, lq, lk, h, d, dv, extras)) in cases.iter().enumerate() {
        for causal in [false, true] {
            let (qs, ks, vs) = ([b, lq, h, d], [b, lk, h, d], [b, lk, h, dv]);
            let t = n as u64;
            let (tq, tk, tv) = (rand(&qs, 30 + t), rand(&ks, 31 + t), rand(&vs, 32 + t));
            let tm = rand(&[lq, lk], 33);
            let g = Graph::new();
            let (q, k, v) = (g.input("q", qs), g.input("k", ks), g.input("v", vs));
            let (m, s) = (g.input("m", [lq, lk]), g.input("seed", [1]));
            let (mask, drop) = match extras {
                true => (Some(m), Some((0.3, s, 4))),
                false => (None, None),
            };
            let scale = Some(0.35);
            let tokens = g
                .attention_tokens(q, k, v, mask, causal, scale, drop)
                .unwrap();
            let heads = |x| g.permute(x, &[0, 2, 1, 3]).unwrap();
            let permuted = match drop {
                Some((p, s, salt)) => g.attention_dropout(
                    heads(q),
                    heads(k),
                    heads(v),
                    mask,
                    causal,
                    scale,
                    p,
                    s,
                    salt,
                ),
                None => g.attention(heads(q), heads(k), heads(v), mask, causal, scale),
            };
            let permuted = heads(permuted.unwrap());
            assert_eq!(g.shape(tokens).dims(), &[b, lq, h, dv]);
            let grads = |y| g.grad(random_projection(&g, y, 34), &[q, k, v]).unwrap();
            let (got, want) = (grads(tokens), grads(permuted));
            let feeds = [
                ("q", &tq),
                ("k", &tk),
                ("v", &tv),
                ("m", &tm),
                ("seed", &seed),
            ];
            let feeds = if extras { &feeds[..] } else { &feeds[..3] };
            let mut outs = vec![permuted];
            outs.extend(&want);
            let reference = Device::cpu()
                .compile(&g, &outs)
                .unwrap()
                .run(feeds)
                .unwrap();
            let what = format!("case {n} q {qs:?} k {ks:?} v {vs:?} causal {causal}");
            check_formula(
                &format!("{what}: y"),
                &g,
                tokens,
                feeds,
                &reference[0],
                TOL_REDUCTION,
            );
            for (name, (&gn, r)) in ["dq", "dk", "dv"]
                .iter()
                .zip(got.iter().zip(&reference[1..]))
            {
                check_formula(&format!("{what}: {name}"), &g, gn, feeds, r, TOL_REDUCTION);
            }
            if let Some(dev) = gpu() {
                let mut outs = vec![tokens];
                outs.extend(&got);
                let plan = dev.compile(&g, &outs).unwrap();
                let kernels = plan.kernels();
                let count = |s: &str| kernels.iter().filter(|l| l.contains(s)).count();
                if d <= widest {
                    assert_eq!(count(" attention"), 4, "case {n}: {kernels:?}");
                    assert_eq!(count("permute"), 0, "case {n}: {kernels:?}");
                } else {
                    assert_eq!(count("attention_"), 0, "case {n}: {kernels:?}");
                }
            }
        }
    }
}
