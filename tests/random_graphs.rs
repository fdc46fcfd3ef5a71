//! Random programs through the whole plan compiler: `proptest` builds small graphs from a
//! vocabulary of ops (elementwise ops and broadcasts, functions inside their domains, linear
//! layers with bias and relu, products of two computed tensors in every transpose,
//! reductions, softmax, layer, RMS and group norm, transposes and permutes, dropout, narrows,
//! concatenations, reshapes, cross-entropy, MSE and BCE losses, convolutions (depthwise, transposed, strided, padded,
//! dilated), pooling (2 x 2 and padded 3 x 3, strides 1 and 2), resizing, batch
//! norm, LSTM, GRU and RNN layers (one starting from another's final state, with lengths or
//! not, over time-major or swapped sequences; linear layers over sequences), attention (masked,
//! with dropout, over heads, tokens or packed projections), embedding lookups; f16 inputs a
//! quarter of the time), asks for some of their nodes and,
//! half the time, for the gradients of a random projection of them with respect to every
//! input; the GPU plan (every rewrite of `exec::lower` and `exec::fuse` that applies:
//! epilogues, kept products, operand dropout, row sums, strided operands, a layer norm's
//! backward in one kernel, ..), its outputs poisoned with NaN, must give what the CPU reference
//! gives. A quarter of the programs run instead as two training steps (their weights f32
//! parameters, cast to f16 in an f16 program as mixed precision does; SGD with momentum,
//! weight decay or clipping, Adam or AdamW, with dynamic loss scaling in mixed precision:
//! in-place updates, grouped optimizer kernels) compared by their losses and parameters. The runner's seed is fixed, so
//! CI sees the same cases every run; `PROPTEST_CASES` asks for more and `KILN_PROPTEST_SEED`
//! (a number) for other ones (a failure prints the shrunk program).

mod common;

use kiln::{DType, Graph, NodeId, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// One step of a program; each names its operands by index into the values made so far (modulo
/// their count) and is skipped where their shapes do not fit.
#[derive(Debug, Clone)]
enum Step {
    /// relu, tanh, sigmoid, gelu, silu, softplus, abs, neg, leaky relu, ELU, hardswish, mish,
    /// relu6, square, gelu's tanh approximation, log sigmoid, sin or softsign.
    Unary(u8, u8),
    /// log, sqrt, `p^1.5` or `2 / p` of `p = |x| + 0.5` (inside their domains), or
    /// `exp(tanh(x))`.
    Domain(u8, u8),
    /// add, sub, mul, maximum, minimum of two values of one shape, or one broadcast over the
    /// other, or `x / (|y| + 0.5)`.
    Binary(u8, u8, u8),
    /// `x * s`, `x + s`, `s - x` or `x / s` with `s` in [-2, 2) (0 read as 0.5).
    Scalar(u8, u8, i8),
    /// `x W^T + b` (or `x W`), a new input `W` with one of a few widths, relu or not.
    Linear {
        src: u8,
        width: u8,
        bias: bool,
        relu: bool,
        trans: bool,
    },
    /// The product of two values, transposed as their shapes allow.
    Product(u8, u8),
    /// sum, mean, max, min, logsumexp, or var (the population's, or unbiased over more than
    /// one element) over an axis, kept or not.
    Reduce(u8, u8, bool, bool),
    /// the sum or mean of all of a value's elements (a `[1]`).
    ReduceAll(u8, bool),
    /// softmax or log-softmax over the last axis.
    Softmax(u8, bool),
    /// layer norm over the last axis, with weight and bias inputs or not; eps 0.1, so that a
    /// row of rounding noise (the sums of a normalized row, say) is not scaled up to values of
    /// its own.
    LayerNorm(u8, bool),
    /// RMS norm over the last axis, with a weight input or not; eps 0.1 (as the layer norm's).
    RmsNorm(u8, bool),
    /// group norm of an image, its channels in 1, 2 or `C` groups (as many as divide them),
    /// with weight and bias inputs or not; eps 0.1.
    GroupNorm(u8, u8, bool),
    Transpose(u8),
    /// one of the five other orders of a 3-D value's axes (a 2-D value `(R, C)` read as
    /// `(R, p, C / p)`, `p` the least prime factor of `C`).
    Permute(u8, u8),
    /// dropout with p = 0.3 and this salt.
    Dropout(u8, u8),
    /// a narrow of either axis: start and length as fractions of 256.
    Narrow(u8, bool, u8, u8),
    /// two values joined along an axis.
    Concat(u8, u8, bool),
    /// a reshape of `(R, C)` to `(R * C / d, d)`, `d` one of C's multiples or divisors.
    Reshape(u8, u8),
    /// the cross-entropy of `(N, C)` logits with a new input of labels (valid ones: a bad label
    /// makes the loss NaN, which WGSL need not carry through a product with 0), plain or with
    /// torch's options (kind 1 to 4: ignored rows and smoothing, a sum, a loss per row, class
    /// weights).
    CrossEntropy(u8, u8),
    /// a regression loss of a value against a new input of targets (kind 0 to 4: MSE, binary
    /// cross-entropy of logits against targets in [0, 1], L1, Huber, smooth L1).
    Regression(u8, u8),
    /// a 2-D convolution of an image (a 2-D value is one image of one channel) with a new
    /// weight input: out channels (`channels` 0 to 2: 1, 3 or 8; 3 and 4: depthwise, in as
    /// many groups as channels, with channel multiplier 1 or 2; 5 and 6: transposed, to 3
    /// channels or depthwise, a stride of 2 with an output padding of `pad`), kernel 1 to 3
    /// with dilation 1 (`kernel` 1 to 3) or 2 (4 to 6), stride 1 or 2, padding 0 or 1, bias,
    /// relu.
    Conv {
        src: u8,
        channels: u8,
        kernel: u8,
        stride2: bool,
        pad: bool,
        bias: bool,
        relu: bool,
    },
    /// max or average pooling of an image: 2 x 2 with stride 2 or 1, or 3 x 3 padded by 1 with
    /// stride 2 or 1.
    Pool(u8, bool, u8),
    /// a resize of an image (`interpolate`): nearest, bilinear or bilinear with aligned
    /// corners (`mode` % 3), to twice its extents, to one more row and half the columns, or
    /// to one pixel (`mode` / 3 = 0, 1, 2); or (`mode` / 3 = 3) its adaptive average pooling
    /// to two thirds of the rows and a third of the columns (uneven windows).
    Resize(u8, u8),
    /// a training batch norm of an image, with weight and bias inputs or not.
    BatchNorm(u8, bool),
    /// an LSTM, GRU or RNN layer over a value `(T * B, I)` read as `(T, B, I)` (B one of its
    /// rows' divisors), forward or reversed, of hidden size 1, 3 or 8, starting from the last
    /// value of shape `(B, H)` where there is one (an encoder's final state), else from a new
    /// input: its states, final `h` (and `c`) all become values.
    Recurrent {
        src: u8,
        kind: u8,
        hidden: u8,
        batch: u8,
        reverse: bool,
    },
    /// attention of a value's rows over another's (keys and values), causal or not, with an
    /// additive mask input (some keys hidden by -inf, never the first) or not, dropout of the
    /// probabilities (p = 0.2) or not; the operands `(L, E)` as they are, as one sequence of
    /// two heads `(1, L, 2, E / 2)` (`attention_tokens`), or a value `(L, 3E)` as packed
    /// projections `(1, L, 3, 1, E)` of self-attention (`attention_packed`).
    Attention {
        q: u8,
        kv: u8,
        causal: bool,
        mask: bool,
        dropout: bool,
        layout: u8,
    },
    /// an embedding lookup of a new `(V, E)` table input by a new input of valid indices, as
    /// many as a value has rows, added to that value where it has E columns; V is 1, 5, 70 or
    /// 5,000 (whose gradient lists each row's occurrences first: `sorted_embedding_backward`).
    Embedding(u8, u8),
    /// a gather along the last axis or the first (a new input of valid indices, repeats among
    /// them, a few more or fewer than the axis holds), an index select along either, a
    /// cumulative sum along either, or the values of a top-k along either (the largest or the
    /// smallest; its positions are left out: near a tie the two backends' roundings may pick
    /// different ones).
    Index(u8, u8, u8),
    /// a `torch.nn.functional` composition (`src/graph/functional.rs`, kind 0 to 7):
    /// normalize along the last axis, PReLU with a new input of slopes (per channel: axis 1),
    /// a reflecting pad of the last axis (replicating where it has one element), GLU over an
    /// even last axis, `einsum("ij,kj->ik")` of a matrix with itself, a scatter-add of the
    /// value into itself along the last axis (a new input of valid indices), cosine
    /// similarity with its square along the last axis, a repeat along the first axis.
    Functional(u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    let i = any::<u8>;
    prop_oneof![
        3 => (0u8..18, i()).prop_map(|(k, s)| Step::Unary(k, s)),
        1 => (0u8..5, i()).prop_map(|(k, s)| Step::Domain(k, s)),
        3 => (0u8..6, i(), i()).prop_map(|(k, a, b)| Step::Binary(k, a, b)),
        1 => (0u8..4, i(), -4i8..4).prop_map(|(k, s, v)| Step::Scalar(k, s, v)),
        3 => (i(), 0u8..6, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(src, width, bias, relu, trans)| Step::Linear { src, width, bias, relu, trans }
        ),
        2 => (i(), i()).prop_map(|(a, b)| Step::Product(a, b)),
        2 => (0u8..7, i(), any::<bool>(), any::<bool>())
            .prop_map(|(k, s, axis, keep)| Step::Reduce(k, s, axis, keep)),
        1 => (i(), any::<bool>()).prop_map(|(s, mean)| Step::ReduceAll(s, mean)),
        1 => (i(), any::<bool>()).prop_map(|(s, log)| Step::Softmax(s, log)),
        2 => (i(), any::<bool>()).prop_map(|(s, affine)| Step::LayerNorm(s, affine)),
        1 => (i(), any::<bool>()).prop_map(|(s, weight)| Step::RmsNorm(s, weight)),
        1 => (i(), 0u8..3, any::<bool>()).prop_map(|(s, k, affine)| Step::GroupNorm(s, k, affine)),
        1 => i().prop_map(Step::Transpose),
        1 => (i(), 0u8..5).prop_map(|(s, k)| Step::Permute(s, k)),
        1 => (i(), i()).prop_map(|(s, salt)| Step::Dropout(s, salt)),
        1 => (i(), any::<bool>(), i(), i()).prop_map(|(s, a, st, l)| Step::Narrow(s, a, st, l)),
        1 => (i(), i(), any::<bool>()).prop_map(|(a, b, axis)| Step::Concat(a, b, axis)),
        1 => (i(), i()).prop_map(|(a, d)| Step::Reshape(a, d)),
        1 => (i(), 0u8..5).prop_map(|(s, k)| Step::CrossEntropy(s, k)),
        1 => (i(), 0u8..5).prop_map(|(s, k)| Step::Regression(s, k)),
        2 => (i(), 0u8..7, 1u8..7, any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(src, channels, kernel, stride2, pad, bias, relu)| Step::Conv {
                src,
                channels,
                kernel,
                stride2,
                pad,
                bias,
                relu,
            }),
        1 => (i(), any::<bool>(), 0u8..4).prop_map(|(s, max, k)| Step::Pool(s, max, k)),
        1 => (i(), 0u8..12).prop_map(|(s, mode)| Step::Resize(s, mode)),
        1 => (i(), any::<bool>()).prop_map(|(s, affine)| Step::BatchNorm(s, affine)),
        2 => (i(), 0u8..3, 0u8..3, i(), any::<bool>()).prop_map(
            |(src, kind, hidden, batch, reverse)| Step::Recurrent {
                src,
                kind,
                hidden,
                batch,
                reverse,
            }
        ),
        2 => (i(), i(), any::<bool>(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(
            |(q, kv, causal, mask, dropout, layout)| Step::Attention {
                q,
                kv,
                causal,
                mask,
                dropout,
                layout,
            }
        ),
        1 => (i(), 0u8..4).prop_map(|(s, v)| Step::Embedding(s, v)),
        1 => (i(), 0u8..8, i()).prop_map(|(s, k, salt)| Step::Index(s, k, salt)),
        1 => (0u8..8, i()).prop_map(|(k, s)| Step::Functional(k, s)),
    ]
}

/// Extents of inputs and weights: 1, primes, a tile's 64 and others around the kernels' tiles.
const DIMS: [usize; 8] = [1, 3, 4, 5, 8, 13, 16, 64];

/// A rare extent of an input's rows: deep enough that a linear layer's weight gradient (a
/// product over the rows) splits along K (`exec::lower::split_k`), and prime.
const DEEP: usize = 1031;

/// A program: its inputs' shapes, its steps, which values it asks for (indices, modulo),
/// whether it asks for the gradients too, whether its inputs are f16 (where the adapter
/// has SHADER_F16; its outputs are cast to f32) and whether it is a training step (its
/// weights f32 parameters) with one of six optimizers.
#[derive(Debug, Clone)]
struct Program {
    inputs: Vec<(usize, usize)>,
    steps: Vec<Step>,
    outputs: Vec<u8>,
    gradients: bool,
    half: bool,
    train: Option<u8>,
}

fn program() -> impl Strategy<Value = Program> {
    let dim = || (0..DIMS.len()).prop_map(|k| DIMS[k]);
    let rows = || prop_oneof![15 => dim(), 1 => Just(DEEP)];
    (
        prop::collection::vec((rows(), dim()), 1..3),
        prop::collection::vec(step(), 1..9),
        prop::collection::vec(any::<u8>(), 1..3),
        any::<bool>(),
        prop::bool::weighted(0.25),
        prop::option::weighted(0.25, 0u8..6),
    )
        .prop_map(|(inputs, steps, outputs, gradients, half, train)| Program {
            inputs,
            steps,
            outputs,
            gradients,
            half,
            train,
        })
}

/// `x` as an image `(N, C, H, W)`: itself where it is one, one image of one channel where it is
/// 2-D (a reshape), else itself (the step is then skipped).
fn image(g: &Graph, x: NodeId) -> NodeId {
    let d = g.shape(x).dims().to_vec();
    match d.len() {
        2 => g
            .reshape(x, &[1, 1, d[0] as isize, d[1] as isize])
            .unwrap_or(x),
        _ => x,
    }
}

/// The graph of a program: what it asks for, and its feeds.
struct Built {
    g: Graph,
    outputs: Vec<NodeId>,
    feeds: Vec<(String, Tensor)>,
    /// In a training step: the loss, the parameters (the weights, named `<train>w<k>`, their
    /// initial values among `feeds`).
    loss: Option<NodeId>,
    params: Vec<NodeId>,
}

/// The graph of `p`, its values f16 with `half`; with `train` (a prefix for the parameters'
/// names, unique per device) its weights are parameters and it asks for a loss only.
fn build(p: &Program, half: bool, train: Option<&str>) -> Built {
    let g = Graph::new();
    let dtype = if half { DType::F16 } else { DType::F32 };
    let mut feeds: Vec<(String, Tensor)> = Vec::new();
    let mut inputs: Vec<NodeId> = Vec::new();
    // a new weight (of the program's type, or f32: normalization parameters): an input, or in
    // a training step a parameter
    // (values in [-scale, scale))
    let input_scaled =
        |g: &Graph, feeds: &mut Vec<(String, Tensor)>, shape: &[usize], t: DType, scale: f32| {
            let mut value = common::rand(shape, 1 + feeds.len() as u64);
            value.data_mut().iter_mut().for_each(|v| *v *= scale);
            let (name, id) = match train {
                // mixed precision: f32 parameters, cast to the program's type where it is f16
                Some(prefix) => {
                    let name = format!("{prefix}w{}", feeds.len());
                    let p = g.param_init(&name, value.clone());
                    let id = match t {
                        DType::F32 => p,
                        _ => g.cast(p, t).expect("a parameter casts"),
                    };
                    (name, id)
                }
                None => {
                    let name = format!("in{}", feeds.len());
                    (name.clone(), g.input_as(&name, shape, t))
                }
            };
            feeds.push((name, value));
            id
        };
    let input_as = |g: &Graph, feeds: &mut Vec<(String, Tensor)>, shape: &[usize], t: DType| {
        input_scaled(g, feeds, shape, t, 1.0)
    };
    let input = |g: &Graph, feeds: &mut Vec<(String, Tensor)>, shape: &[usize]| {
        input_as(g, feeds, shape, dtype)
    };
    for &(r, c) in &p.inputs {
        let name = format!("in{}", feeds.len());
        let value = common::rand(&[r, c], 1 + feeds.len() as u64);
        inputs.push(g.input_as(&name, [r, c], dtype));
        feeds.push((name, value));
    }
    let seed = g.input("seed", [1]);
    feeds.push(("seed".into(), Tensor::new([1], vec![1234.0]).unwrap()));
    let mut vals: Vec<NodeId> = inputs.clone();
    let dims = |id: NodeId| g.shape(id).dims().to_vec();
    for s in &p.steps {
        let pick = |k: u8| vals[k as usize % vals.len()];
        let made = match *s {
            Step::Unary(k, a) => {
                let x = pick(a);
                match k {
                    0 => g.relu(x),
                    1 => g.tanh(x),
                    2 => g.sigmoid(x),
                    3 => g.gelu(x),
                    4 => g.silu(x),
                    5 => g.softplus(x),
                    6 => g.abs(x),
                    7 => g.neg(x),
                    8 => g.leaky_relu(x, 0.2),
                    9 => g.elu(x, 1.0),
                    10 => g.hardswish(x),
                    11 => g.mish(x),
                    12 => g.relu6(x),
                    14 => g.gelu_tanh(x),
                    15 => g.log_sigmoid(x),
                    16 => g.sin(x),
                    17 => g.softsign(x),
                    _ => g.square(x),
                }
                .ok()
            }
            Step::Domain(k, a) => {
                let x = pick(a);
                let p = || g.add_scalar(g.abs(x)?, 0.5);
                match k {
                    0 => p().and_then(|p| g.log(p)),
                    1 => p().and_then(|p| g.sqrt(p)),
                    2 => p().and_then(|p| g.pow_scalar(p, 1.5)),
                    3 => p().and_then(|p| g.rdiv_scalar(p, 2.0)),
                    _ => g.tanh(x).and_then(|t| g.exp(t)),
                }
                .ok()
            }
            Step::Binary(k, a, b) => {
                let (x, y) = (pick(a), pick(b));
                let (dx, dy) = (dims(x), dims(y));
                // one shape, or y broadcast over x (a kept reduction's (R, 1) or (1, C))
                let fits =
                    dx.len() == dy.len() && dx.iter().zip(&dy).all(|(p, q)| p == q || *q == 1);
                fits.then(|| match k {
                    0 => g.add(x, y),
                    1 => g.sub(x, y),
                    2 => g.mul(x, y),
                    3 => g.maximum(x, y),
                    4 => g.minimum(x, y),
                    _ => g.div(x, g.add_scalar(g.abs(y)?, 0.5)?),
                })
                .and_then(|r| r.ok())
            }
            Step::Scalar(k, a, v) => {
                let v = if v == 0 { 0.5 } else { v as f32 / 2.0 };
                match k {
                    0 => g.mul_scalar(pick(a), v),
                    1 => g.add_scalar(pick(a), v),
                    2 => g.rsub_scalar(pick(a), v),
                    _ => g.div_scalar(pick(a), v),
                }
                .ok()
            }
            Step::Linear {
                src,
                width,
                bias,
                relu,
                trans,
            } => {
                // a sequence (A, B, I) as its rows (A * B, I), as nn::Linear reads one
                let x = pick(src);
                let d = dims(x);
                matches!(d.len(), 2 | 3).then_some(()).and_then(|_| {
                    let i = d[d.len() - 1];
                    let rows = g.reshape(x, &[-1, i as isize]).ok()?;
                    let n = [1, 3, 8, 13, 16, 64][width as usize % 6];
                    let w_shape = if trans { [n, i] } else { [i, n] };
                    let w = input(&g, &mut feeds, &w_shape);
                    inputs.push(w);
                    let b = bias.then(|| {
                        let b = input(&g, &mut feeds, &[n]);
                        inputs.push(b);
                        (b, kiln::ops::matmul::Bias::Cols)
                    });
                    let y = g.matmul_fused(rows, w, false, trans, b, relu).ok()?;
                    let mut out: Vec<isize> = d.iter().map(|&e| e as isize).collect();
                    *out.last_mut()? = n as isize;
                    g.reshape(y, &out).ok()
                })
            }
            Step::Product(a, b) => {
                let (x, y) = (pick(a), pick(b));
                let (dx, dy) = (dims(x), dims(y));
                if dx.len() != 2 || dy.len() != 2 {
                    None
                } else if dx[1] == dy[0] {
                    g.matmul_t(x, y, false, false).ok()
                } else if dx[1] == dy[1] {
                    g.matmul_t(x, y, false, true).ok()
                } else if dx[0] == dy[0] {
                    g.matmul_t(x, y, true, false).ok()
                } else {
                    None
                }
            }
            Step::Reduce(k, a, axis, keep) => {
                let x = pick(a);
                let axis = if axis { -1 } else { 0 };
                match k {
                    0 => g.sum(x, axis, keep),
                    1 => g.mean(x, axis, keep),
                    2 => g.max(x, axis, keep),
                    3 => g.min(x, axis, keep),
                    4 => g.logsumexp(x, axis, keep),
                    5 => g.var(x, axis, 0, keep),
                    // (unbiased over more than one element, over one it would be 0 / 0; std
                    // is left out: its gradient at a constant slice is 0 * inf)
                    _ => {
                        let d = dims(x);
                        let n = if axis == 0 { d.first() } else { d.last() };
                        match n {
                            Some(&n) if n > 1 => g.var(x, axis, 1, keep),
                            _ => g.var(x, axis, 0, keep),
                        }
                    }
                }
                .ok()
            }
            Step::ReduceAll(a, mean) => match mean {
                true => g.mean_all(pick(a)),
                false => g.sum_all(pick(a)),
            }
            .ok(),
            Step::Softmax(a, log) => match log {
                true => g.log_softmax(pick(a), -1),
                false => g.softmax(pick(a), -1),
            }
            .ok(),
            Step::LayerNorm(a, affine) => {
                let x = pick(a);
                let width = *dims(x).last().unwrap_or(&1);
                let params = affine.then(|| {
                    let w = input_as(&g, &mut feeds, &[width], DType::F32);
                    let b = input_as(&g, &mut feeds, &[width], DType::F32);
                    inputs.extend([w, b]);
                    (w, b)
                });
                g.layer_norm(x, 1, params, 0.1).ok()
            }
            Step::RmsNorm(a, weighted) => {
                let x = pick(a);
                let width = *dims(x).last().unwrap_or(&1);
                let w = weighted.then(|| {
                    let w = input_as(&g, &mut feeds, &[width], DType::F32);
                    inputs.push(w);
                    w
                });
                g.rms_norm(x, 1, w, Some(0.1)).ok()
            }
            Step::GroupNorm(a, k, affine) => {
                let x = image(&g, pick(a));
                let d = dims(x);
                (d.len() == 4).then_some(()).and_then(|_| {
                    let c = d[1];
                    let groups = [1, 2, c][k as usize % 3];
                    if !c.is_multiple_of(groups) {
                        return None;
                    }
                    let params = affine.then(|| {
                        let w = input_as(&g, &mut feeds, &[c], DType::F32);
                        let b = input_as(&g, &mut feeds, &[c], DType::F32);
                        inputs.extend([w, b]);
                        (w, b)
                    });
                    g.group_norm(x, groups, params, 0.1).ok()
                })
            }
            Step::Permute(a, k) => {
                // a 2-D value (R, C) as (R, p, C / p), p the least prime factor of C
                let x = pick(a);
                let d = dims(x);
                let x = match d.len() {
                    2 => {
                        let p = (2..=d[1]).find(|p| d[1].is_multiple_of(*p)).unwrap_or(1);
                        let three = [d[0] as isize, p as isize, (d[1] / p) as isize];
                        g.reshape(x, &three).unwrap_or(x)
                    }
                    _ => x,
                };
                let perms = [[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
                (dims(x).len() == 3)
                    .then(|| g.permute(x, &perms[k as usize % 5]).ok())
                    .flatten()
            }
            // (a sequence's two leading axes: time-major to batch-first and back)
            Step::Transpose(a) => {
                let x = pick(a);
                matches!(dims(x).len(), 2 | 3)
                    .then(|| g.transpose(x, 0, 1).ok())
                    .flatten()
            }
            Step::Dropout(a, salt) => g.dropout(pick(a), 0.3, seed, salt as u32).ok(),
            Step::Narrow(a, last, start, len) => {
                let x = pick(a);
                let d = dims(x);
                (!d.is_empty()).then_some(()).and_then(|_| {
                    let axis = if last { d.len() - 1 } else { 0 };
                    let n = d[axis];
                    let start = start as usize * n / 256;
                    let len = (len as usize * (n - start) / 256).max(1);
                    g.narrow(x, axis as isize, start, len).ok()
                })
            }
            Step::Concat(a, b, last) => {
                let (x, y) = (pick(a), pick(b));
                let (dx, dy) = (dims(x), dims(y));
                let axis = if last { dx.len().max(1) - 1 } else { 0 };
                let fits =
                    dx.len() == dy.len() && (0..dx.len()).all(|k| k == axis || dx[k] == dy[k]);
                fits.then(|| g.concat(&[x, y], axis as isize).ok())
                    .flatten()
            }
            Step::Reshape(a, k) => {
                let x = pick(a);
                let n: usize = dims(x).iter().product();
                let widths: Vec<usize> = (1..=n).filter(|d| n.is_multiple_of(*d)).collect();
                let d = widths[k as usize % widths.len()];
                g.reshape(x, &[(n / d) as isize, d as isize]).ok()
            }
            Step::Conv {
                src,
                channels,
                kernel,
                stride2,
                pad,
                bias,
                relu,
            } => {
                let x = image(&g, pick(src));
                let d = dims(x);
                let (k, dilation) = (1 + (kernel as usize - 1) % 3, 1 + (kernel as usize - 1) / 3);
                let reach = dilation * (k - 1) + 1;
                let pad = pad as usize;
                let fits = d.len() == 4 && d[2] + 2 * pad >= reach && d[3] + 2 * pad >= reach;
                fits.then_some(()).and_then(|_| {
                    let (o, groups) = match channels {
                        3 | 6 => (d[1], d[1]),
                        4 => (2 * d[1], d[1]),
                        5 => (3, 1),
                        c => ([1, 3, 8][c as usize % 3], 1),
                    };
                    let transposed = channels >= 5;
                    let ws = match transposed {
                        true => [d[1], o / groups, k, k],
                        false => [o, d[1] / groups, k, k],
                    };
                    let w = input(&g, &mut feeds, &ws);
                    inputs.push(w);
                    let b = bias.then(|| {
                        let b = input(&g, &mut feeds, &[o]);
                        inputs.push(b);
                        b
                    });
                    let s = 1 + stride2 as usize;
                    let opts = kiln::ops::conv::Conv2dOpts {
                        stride: (s, s),
                        padding: (pad, pad),
                        dilation: (dilation, dilation),
                    };
                    let t = kiln::ops::conv::ConvTranspose2dOpts {
                        stride: opts.stride,
                        padding: opts.padding,
                        output_padding: ((s - 1) * pad, (s - 1) * pad), // below the stride
                        dilation: opts.dilation,
                    };
                    let relu_of = |y| if relu { g.relu(y) } else { Ok(y) };
                    match (transposed, groups) {
                        (true, _) => g
                            .conv_transpose2d(x, w, b, t, groups)
                            .and_then(relu_of)
                            .ok(),
                        (false, 1) => g.conv2d_fused(x, w, b, opts, relu).ok(),
                        (false, _) => g.conv2d_grouped_fused(x, w, b, opts, groups, relu).ok(),
                    }
                })
            }
            Step::Resize(a, mode) => {
                use kiln::ops::resize::ResizeMode;
                let x = image(&g, pick(a));
                let d = dims(x);
                let m = [
                    ResizeMode::Nearest,
                    ResizeMode::Bilinear {
                        align_corners: false,
                    },
                    ResizeMode::Bilinear {
                        align_corners: true,
                    },
                ][mode as usize % 3];
                (d.len() == 4)
                    .then(|| {
                        let size = match mode / 3 {
                            0 => (2 * d[2], 2 * d[3]),
                            1 => (d[2] + 1, d[3].div_ceil(2)),
                            3 => ((2 * d[2] / 3).max(1), 1 + d[3] / 3),
                            _ => (1, 1),
                        };
                        match mode / 3 {
                            3 => g.adaptive_avg_pool2d(x, size).ok(),
                            _ => g.interpolate(x, size, m).ok(),
                        }
                    })
                    .flatten()
            }
            Step::Pool(a, max, geometry) => {
                let x = image(&g, pick(a));
                let d = dims(x);
                let (k, s, p) = [(2, 2, 0), (2, 1, 0), (3, 2, 1), (3, 1, 1)][geometry as usize % 4];
                (d.len() == 4 && d[2] + 2 * p >= k && d[3] + 2 * p >= k)
                    .then(|| match max {
                        true => g.max_pool2d(x, (k, k), (s, s), (p, p)).ok(),
                        false => g.avg_pool2d(x, (k, k), (s, s), (p, p)).ok(),
                    })
                    .flatten()
            }
            Step::BatchNorm(a, affine) => {
                let x = image(&g, pick(a));
                let d = dims(x);
                (d.len() == 4).then_some(()).and_then(|_| {
                    let params = affine.then(|| {
                        let w = input_as(&g, &mut feeds, &[d[1]], DType::F32);
                        let b = input_as(&g, &mut feeds, &[d[1]], DType::F32);
                        inputs.extend([w, b]);
                        (w, b)
                    });
                    g.batch_norm(x, params, None, true, 0.1).ok()
                })
            }
            Step::Recurrent {
                src,
                kind,
                hidden,
                batch,
                reverse,
            } => {
                // a sequence (T, B, I) as it is (a batch-first one swapped back by a transpose
                // step), or rows (T * B, I) read so
                let x = pick(src);
                let d = dims(x);
                matches!(d.len(), 2 | 3).then_some(()).and_then(|_| {
                    let (r, i) = match d.len() {
                        3 => (d[0] * d[1], d[2]),
                        _ => (d[0], d[1]),
                    };
                    let batches: Vec<usize> = (1..=r).filter(|b| r.is_multiple_of(*b)).collect();
                    let b = match d.len() {
                        3 => d[1],
                        _ => batches[batch as usize % batches.len()],
                    };
                    let t = r / b;
                    let h = [1, 3, 8][hidden as usize % 3];
                    let gates = [4, 3, 1][kind as usize % 3];
                    let x3 = g.reshape(x, &[t as isize, b as isize, i as isize]).ok()?;
                    // every other layer with lengths: each sequence's own, in [1, T]
                    let lengths = (batch % 2 == 1).then(|| {
                        let name = format!("len{}", feeds.len());
                        let l = (0..b).map(|k| (1 + (k * 3 + 1) % t) as f32).collect();
                        feeds.push((name.clone(), Tensor::new([b], l).unwrap()));
                        g.input(&name, [b])
                    });
                    // the next parameter's values in [-scale, scale)
                    let scale = std::cell::Cell::new(1.0);
                    let mut param = |shape: &[usize]| {
                        let p = input_scaled(&g, &mut feeds, shape, dtype, scale.replace(1.0));
                        inputs.push(p);
                        p
                    };
                    let w_ih = param(&[gates * h, i]);
                    // the recurrent weight as torch initializes it, in [-1/sqrt(H), 1/sqrt(H)):
                    // a contracting recurrence (in [-1, 1) a long one is chaotic, and its
                    // gradients' rounding noise grows over a thousand steps)
                    scale.set(1.0 / (h as f32).sqrt());
                    let w_hh = param(&[gates * h, h]);
                    let (b_ih, b_hh) = (param(&[gates * h]), param(&[gates * h]));
                    // an earlier value of the state's shape, else a new input
                    let state =
                        |g: &Graph, vals: &[NodeId], param: &mut dyn FnMut(&[usize]) -> NodeId| {
                            vals.iter()
                                .rev()
                                .copied()
                                .find(|&v| g.shape(v).dims() == [b, h] && g.dtype(v) == dtype)
                                .unwrap_or_else(|| param(&[b, h]))
                        };
                    let h0 = state(&g, &vals, &mut param);
                    let made = match kind % 3 {
                        0 => {
                            let c0 = param(&[b, h]);
                            let (all, hn, cn) = g
                                .lstm_layer(x3, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
                                .ok()?;
                            vec![hn, cn, all]
                        }
                        1 => {
                            let (all, hn) = g
                                .gru_layer(x3, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse)
                                .ok()?;
                            vec![hn, all]
                        }
                        _ => {
                            let (all, hn) = g
                                .rnn_layer(x3, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse)
                                .ok()?;
                            vec![hn, all]
                        }
                    };
                    // the states (T, B, H) and as rows (the last value)
                    let (&all, finals) = made.split_last()?;
                    vals.extend(finals);
                    vals.push(all);
                    g.reshape(all, &[r as isize, h as isize]).ok()
                })
            }
            Step::Attention {
                q,
                kv,
                causal,
                mask,
                dropout,
                layout,
            } => {
                let (q, kv) = (pick(q), pick(kv));
                let (dq, dk) = (dims(q), dims(kv));
                let packed = layout % 3 == 2;
                let fits = match packed {
                    true => dq.len() == 2 && dq[1] % 3 == 0,
                    false => {
                        dq.len() == 2
                            && dk.len() == 2
                            && dq[1] == dk[1]
                            && (layout % 3 == 0 || dq[1] % 2 == 0)
                    }
                };
                fits.then_some(()).and_then(|_| {
                    let (lq, lk) = (dq[0], if packed { dq[0] } else { dk[0] });
                    let mask = mask.then(|| {
                        let name = format!("in{}", feeds.len());
                        let mut m = common::rand(&[lq, lk], 90 + feeds.len() as u64);
                        for (k, e) in m.data_mut().iter_mut().enumerate() {
                            if k % lk != 0 && k % 3 == 1 {
                                *e = f32::NEG_INFINITY;
                            }
                        }
                        feeds.push((name.clone(), m));
                        g.input(&name, [lq, lk])
                    });
                    let drop = dropout.then_some((0.2, seed, 7));
                    let y = match layout % 3 {
                        0 => match drop {
                            Some((p, s, salt)) => {
                                g.attention_dropout(q, kv, kv, mask, causal, None, p, s, salt)
                            }
                            None => g.attention(q, kv, kv, mask, causal, None),
                        },
                        1 => {
                            let heads = |t: NodeId, l: usize| {
                                g.reshape(t, &[1, l as isize, 2, (dq[1] / 2) as isize])
                            };
                            let (q4, kv4) = (heads(q, lq).ok()?, heads(kv, lk).ok()?);
                            g.attention_tokens(q4, kv4, kv4, mask, causal, None, drop)
                        }
                        _ => {
                            let e = (dq[1] / 3) as isize;
                            let qkv = g.reshape(q, &[1, lq as isize, 3, 1, e]).ok()?;
                            match drop {
                                Some((p, s, salt)) => {
                                    g.attention_packed_dropout(qkv, mask, causal, None, p, s, salt)
                                }
                                None => g.attention_packed(qkv, mask, causal, None),
                            }
                        }
                    }
                    .ok()?;
                    g.reshape(y, &[lq as isize, -1]).ok()
                })
            }
            Step::Embedding(a, rows) => {
                let x = pick(a);
                let d = dims(x);
                (d.len() == 2).then_some(()).and_then(|_| {
                    let (n, e) = (d[0], d[1]);
                    let v = [1, 5, 70, 5000][rows as usize % 4];
                    let table = input(&g, &mut feeds, &[v, e]);
                    inputs.push(table);
                    let name = format!("in{}", feeds.len());
                    let ids = (0..n).map(|k| ((k * 5 + 2) % v) as f32).collect();
                    feeds.push((name.clone(), Tensor::new([n], ids).unwrap()));
                    let looked = g.embedding(g.input(&name, [n]), table).ok()?;
                    g.add(looked, x).ok()
                })
            }
            Step::Index(a, kind, salt) => {
                let x = pick(a);
                let d = dims(x);
                let axis = if kind % 2 == 0 { d.len().max(1) - 1 } else { 0 };
                (!d.is_empty()).then_some(()).and_then(|_| {
                    let k = d[axis];
                    let j = (k + salt as usize % 5).saturating_sub(2).max(1);
                    let pos = |n: usize| -> Vec<f32> {
                        (0..n)
                            .map(|m| ((m * 7 + salt as usize) % k) as f32)
                            .collect()
                    };
                    let name = format!("in{}", feeds.len());
                    match kind / 2 {
                        0 => {
                            let mut id = d.clone();
                            id[axis] = j;
                            let n = id.iter().product();
                            feeds.push((name.clone(), Tensor::new(id.clone(), pos(n)).unwrap()));
                            g.gather(x, axis as isize, g.input(&name, id)).ok()
                        }
                        1 => {
                            feeds.push((name.clone(), Tensor::new([j], pos(j)).unwrap()));
                            g.index_select(x, axis as isize, g.input(&name, [j])).ok()
                        }
                        2 => g.cumsum(x, axis as isize).ok(),
                        _ => {
                            let largest = salt % 2 == 0;
                            g.topk(x, j.min(k), axis as isize, largest)
                                .ok()
                                .map(|(v, _)| v)
                        }
                    }
                })
            }
            Step::Functional(kind, a) => {
                let x = pick(a);
                let d = dims(x);
                let last = d.len().max(1) - 1;
                let k = d.get(last).copied().unwrap_or(1);
                let name = format!("in{}", feeds.len());
                match kind {
                    0 => g.normalize(x, 2.0, -1, 1e-12).ok(),
                    1 => {
                        let c = if d.len() >= 2 { d[1] } else { 1 };
                        let slopes = (0..c).map(|i| 0.1 + 0.05 * (i % 5) as f32).collect();
                        feeds.push((name.clone(), Tensor::new([c], slopes).unwrap()));
                        g.prelu(x, g.input(&name, [c])).ok()
                    }
                    2 => {
                        let mode = match k {
                            1 => kiln::graph::PadMode::Replicate,
                            _ => kiln::graph::PadMode::Reflect,
                        };
                        g.pad_with(x, &[(1, 1)], mode).ok()
                    }
                    3 => (k % 2 == 0).then(|| g.glu(x, -1).ok()).flatten(),
                    4 => (d.len() == 2)
                        .then(|| g.einsum("ij,kj->ik", &[x, x]).ok())
                        .flatten(),
                    5 => {
                        let n: usize = d.iter().product();
                        let ids = (0..n).map(|m| ((m * 5 + 1) % k) as f32).collect();
                        feeds.push((name.clone(), Tensor::new(d.clone(), ids).unwrap()));
                        g.scatter_add(x, -1, g.input(&name, d.clone()), x).ok()
                    }
                    6 => g
                        .square(x)
                        .and_then(|s| g.cosine_similarity(x, s, -1, 1e-8))
                        .ok(),
                    _ => {
                        let mut reps = vec![1; d.len()];
                        if let Some(r) = reps.first_mut() {
                            *r = 2;
                        }
                        g.repeat(x, &reps).ok()
                    }
                }
            }
            Step::CrossEntropy(a, kind) => {
                let x = pick(a);
                let d = dims(x);
                (d.len() == 2).then_some(()).and_then(|_| {
                    use kiln::graph::{CrossEntropyOpts, Reduction};
                    let (n, c) = (d[0], d[1]);
                    let name = format!("in{}", feeds.len());
                    let labels = (0..n).map(|k| ((k * 7 + 3) % c) as f32).collect();
                    feeds.push((name.clone(), Tensor::new([n], labels).unwrap()));
                    let labels = g.input(&name, [n]);
                    // torch's options: padding rows (label 3), smoothing, other reductions,
                    // class weights
                    let opts = |ignore, e, reduction| CrossEntropyOpts {
                        ignore_index: ignore,
                        label_smoothing: e,
                        reduction,
                        weight: None,
                    };
                    let o = match kind {
                        0 => return g.cross_entropy(x, labels).ok(),
                        1 => opts(Some(3), 0.1, Reduction::Mean),
                        2 => opts(None, 0.2, Reduction::Sum),
                        3 => opts(Some(3), 0.0, Reduction::None),
                        _ => {
                            let wname = format!("in{}", feeds.len());
                            let w = (0..c).map(|k| 0.5 + (k % 3) as f32).collect();
                            feeds.push((wname.clone(), Tensor::new([c], w).unwrap()));
                            CrossEntropyOpts {
                                weight: Some(g.input(&wname, [c])),
                                ..opts(Some(3), 0.1, Reduction::Mean)
                            }
                        }
                    };
                    g.cross_entropy_with(x, labels, o).ok()
                })
            }
            Step::Regression(a, kind) => {
                let x = pick(a);
                let d = dims(x);
                let name = format!("in{}", feeds.len());
                let mut t = common::rand(&d, 70 + feeds.len() as u64);
                if kind == 1 {
                    t.data_mut().iter_mut().for_each(|e| *e = (*e + 1.0) / 2.0);
                }
                feeds.push((name.clone(), t));
                let t = g.input_as(&name, &d[..], g.dtype(x));
                match kind {
                    0 => g.mse_loss(x, t),
                    1 => g.bce_with_logits(x, t),
                    2 => g.l1_loss(x, t),
                    3 => g.huber_loss(x, t, 0.5),
                    _ => g.smooth_l1_loss(x, t, 0.3),
                }
                .ok()
            }
        };
        if let Some(v) = made {
            vals.push(v);
        }
    }
    // the last value and the others asked for, each once
    let mut outputs = vec![*vals.last().expect("the inputs at least")];
    for &k in &p.outputs {
        let v = vals[k as usize % vals.len()];
        if !outputs.contains(&v) {
            outputs.push(v);
        }
    }
    let params: Vec<NodeId> = (0..g.len())
        .map(NodeId)
        .filter(|&i| matches!(g.nodes()[i.0].op, kiln::ops::Op::Param { .. }))
        .collect();
    let mut train_loss = None;
    if p.gradients || train.is_some() {
        // a random projection of each output, summed: gradients for every input. A training
        // step's is the mean, so that a step stays small on large outputs: the sum over a deep
        // input's rows moves the weights of a long recurrence into saturation in one step,
        // where the next step's gradients are rounding noise amplified (1 - tanh^2 of states
        // near 1, through a thousand steps)
        let mut loss: Option<NodeId> = None;
        for (k, &y) in outputs.iter().enumerate() {
            let r = g.constant(common::rand(&dims(y), 50 + k as u64));
            let y = g.cast(y, DType::F32).unwrap();
            let term = match train {
                Some(_) => g.mean_all(g.mul(y, r).unwrap()).unwrap(),
                None => g.sum_all(g.mul(y, r).unwrap()).unwrap(),
            };
            loss = Some(match loss {
                Some(l) => g.add(l, term).unwrap(),
                None => term,
            });
        }
        let loss = loss.expect("one output at least");
        if train.is_some() {
            train_loss = Some(loss);
        } else {
            let grads = g.grad(loss, &inputs).unwrap();
            outputs.push(loss);
            outputs.extend(grads);
        }
    }
    // compared in f32
    let outputs = outputs
        .into_iter()
        .map(|y| g.cast(y, DType::F32).unwrap())
        .collect();
    Built {
        g,
        outputs,
        feeds,
        loss: train_loss,
        params,
    }
}

/// Random programs and their gradients give on the GPU what they give on the CPU reference.
#[test]
fn random_programs_match_the_cpu_reference() {
    let Some(dev) = common::gpu() else { return };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    // a fixed seed unless KILN_PROPTEST_SEED gives another (a number)
    let rng = match std::env::var("KILN_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(seed) => {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
        }
        None => TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let f16 = dev.features().contains(wgpu::Features::SHADER_F16);
    // parameters live on the device: each training program names its own
    let steps = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&program(), |p| {
        let half = p.half && f16;
        if let Some(opt) = p.train {
            let k = steps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            training_steps_match(&dev, &p, half, opt, &format!("t{k}_"));
            return Ok(());
        }
        let b = build(&p, half, None);
        // composed ops: each within TOL_REDUCTION (TOL_F16) of the reference, more for what
        // several of them compound; the absolute part at each output's scale (a long sum that
        // cancels keeps its largest terms' rounding: a normalization's gradient after products
        // of products over a thousand terms, in f32 too)
        let tol = if half { (1e-2, 3e-2) } else { (1e-4, 1e-3) };
        common::check_plan_scaled(&dev, &format!("{p:?}"), &b.g, &b.outputs, &b.feeds, tol);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Two training steps of program `p` (its weights parameters named from `prefix`, SGD plain,
/// with momentum, Nesterov with weight decay, with gradient clipping, Adam or AdamW by `opt`;
/// with dynamic loss scaling in mixed precision; every other one accumulating two micro-batches
/// per step) on `dev` and
/// on the CPU reference: the same losses and the same parameters after.
fn training_steps_match(dev: &kiln::Device, p: &Program, half: bool, opt: u8, prefix: &str) {
    use kiln::nn::{Optimizer, TrainStep};
    // a graph per device (the optimizer's state nodes are the graph's own)
    let b = build(p, half, Some(prefix));
    if b.loss.is_none() || b.params.is_empty() {
        return;
    }
    // Adam's eps is large enough that a gradient of rounding noise alone (whose sign may
    // differ between backends) moves its parameter by little: at torch's 1e-8, Adam's
    // first step moves every parameter by the learning rate, in the gradient's sign
    let optimizer = match opt % 6 {
        0 => Optimizer::sgd(0.05),
        1 => Optimizer::sgd_momentum(0.05, 0.9, false),
        2 => Optimizer::sgd_momentum(0.05, 0.9, true).weight_decay(0.01),
        3 => Optimizer::sgd(0.05).clip_grad_norm(0.5),
        4 => Optimizer::adam(0.01).eps(1e-3),
        _ => Optimizer::adamw(0.01, 0.1).betas(0.8, 0.99).eps(1e-3),
    };
    // dynamic loss scaling in mixed precision (and with AdamW in f32), its scale growing every
    // step: scaled f16 gradients, the scaler's kernel, unscaling in grouped updates
    let optimizer = match half || opt % 6 == 5 {
        true => optimizer.grad_scaler(kiln::nn::GradScaler {
            init_scale: 1024.0,
            growth_interval: 1,
            ..Default::default()
        }),
        false => optimizer,
    };
    let data: Vec<(&str, &Tensor)> = b
        .feeds
        .iter()
        .filter(|(n, _)| !n.starts_with(prefix))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let names: Vec<&str> = b
        .feeds
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(n, _)| n.as_str())
        .collect();
    let what = format!("{p:?} training step");
    // every other optimizer accumulates two micro-batches (the same ones) per step
    let micro = 1 + opt as usize % 2;
    let mut runs = Vec::new();
    for d in [dev.clone(), kiln::Device::cpu()] {
        let b = build(p, half, Some(prefix));
        let loss = b.loss.expect("built as above");
        let mut step =
            TrainStep::with_accumulation(&d, &b.g, loss, &b.params, optimizer.clone(), 0, micro)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut losses = Vec::new();
        for _ in 0..2 * micro {
            let l = step
                .step(&data, true)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            losses.push(Tensor::new([1], vec![l.unwrap_or(f32::NAN)]).unwrap());
        }
        let params: Vec<Tensor> = names.iter().map(|n| d.param(n).unwrap()).collect();
        runs.push((losses, params));
    }
    let tol = if half { (1e-2, 3e-2) } else { (1e-4, 1e-3) };
    let (gpu, cpu) = (&runs[0], &runs[1]);
    for (k, (a, b)) in gpu.0.iter().zip(&cpu.0).enumerate() {
        common::assert_close(&format!("{what}: loss {k}"), a, b, tol.0, tol.1);
    }
    for (n, (a, b)) in names.iter().zip(gpu.1.iter().zip(&cpu.1)) {
        common::assert_close(&format!("{what}: {n} after two steps"), a, b, tol.0, tol.1);
    }
}
