//! Scaled dot-product attention, as `torch.nn.functional.scaled_dot_product_attention`.
//! Kernel: `shaders/attention.wgsl`.
//!
//! ```text
//! q (*, Lq, D), k (*, Lk, D), v (*, Lk, Dv)  ->  (*, Lq, Dv)
//! s = q k^T * scale + mask        (scale 1 / sqrt(D) by default; mask additive, f32,
//!                                  broadcastable to (*, Lq, Lk))
//! causal: s_ij = -inf for j > i   (top-left aligned, torch's is_causal)
//! out = dropout(softmax(s, -1)) v  (dropout_p > 0 in training graphs)
//! ```
//!
//! Forward: one kernel in one pass over the keys with an online softmax (FlashAttention): the
//! `(Lq, Lk)` scores are never stored, so memory stays linear in the sequence length. Each
//! workgroup owns a block of query rows of one `(batch, head)` slice; tile sizes are chosen per
//! adapter from its workgroup memory ([`tiles`]). Heads wider than [`MAX_HEAD_DIM`] compose the
//! same formula from graph ops (products and a softmax).
//!
//! Backward (FlashAttention-2's, [`AttentionGrad`]): three kernels that recompute the scores
//! tile by tile and never store `(Lq, Lk)` either, so training memory stays linear in the
//! sequence length too: `attention_stats` (per query row, the log-sum-exp `lse` of its scores
//! and `delta = dy . y`), `attention_dkv` (a workgroup per block of keys, over all queries:
//! `p = exp(s - lse)`, `dv = p^T dy`, `ds = p (dy v^T - delta) * scale`, `dk = ds^T q`) and
//! `attention_dq` (a workgroup per block of queries: `dq = ds k`); dq has a kernel of its own
//! because WGSL has no float atomics to accumulate it from the key blocks. In f32 plans the
//! forward kernel writes `lse` too (past its output, [`Attention::lse`]), so the statistics
//! kernel computes only `delta`. Heads wider than
//! [`MAX_BACKWARD_HEAD_DIM`] (whose tiles would not fit WebGPU's default 16 KiB of workgroup
//! memory) take the same formula from graph ops and GEMMs, which store the probabilities. The
//! mask takes no gradient. Dropout of the probabilities is the graph's counter-based dropout
//! (`ops::dropout`): the kernels drop element `(slice, i, j)` as the dropout op drops that
//! element of `(*, Lq, Lk)` with the same seed and salt, so the backward pass recomputes the
//! forward's mask instead of storing it.
//!
//! Layouts ([`Layout`]): `q`, `k` and `v` as `(*, L, D)` slices; self-attention's packed
//! projection `qkv (N, L, 3, H, D)` (the in-projection's output `(N, L, 3E)`, viewed) read
//! straight by the kernels, with the output written as `(N, L, H, D)` (the out-projection's
//! input `(N, L, E)`, viewed) and the gradient as one `(N, L, 3, H, D)` tensor; or separate
//! `(N, L, H, D)` operands (cross-attention's projections, viewed). Multi-head attention then
//! needs no permutes and copies of heads around the kernels, forward or backward.
//!
//! f16 `q`, `k`, `v` are read and written as stored (the kernel's f16 variant, `attention_f16`)
//! and computed in f32; the mask stays f32.

use super::binary::broadcast_strides;
use super::dropout::Dropout;
use super::softmax::Softmax;
use super::{KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{DType, Shape, Tensor};

const OP: &str = "attention";

/// Widest head (`D` and `Dv`) the fused kernel takes: its smallest tiles then fit WebGPU's
/// default 16 KiB of workgroup memory. Wider heads compose the formula from graph ops.
pub const MAX_HEAD_DIM: usize = 256;

/// Widest head (`D` and `Dv`) whose gradients take the fused backward kernels: their smallest
/// tiles then fit WebGPU's default 16 KiB of workgroup memory. Wider heads compose them.
pub const MAX_BACKWARD_HEAD_DIM: usize = 128;

/// How attention's operands are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// `q (*, Lq, D)`, `k (*, Lk, D)`, `v (*, Lk, Dv)` -> `(*, Lq, Dv)`: each slice (a batch
    /// and head) contiguous.
    #[default]
    Heads,
    /// Self-attention's projections as one tensor `qkv (N, L, 3, H, D)` (q, k, v in torch's
    /// order), bound as all three inputs -> `(N, L, H, D)`; its gradient is one `(N, L, 3, H,
    /// D)` tensor. The slices are strided: `(N, H, L, D)` as the `Heads` layout sees them.
    Packed,
    /// `q (N, Lq, H, D)`, `k (N, Lk, H, D)`, `v (N, Lk, H, Dv)` -> `(N, Lq, H, Dv)`, as
    /// FlashAttention's `flash_attn_func` takes them: each projection's `(N, L, E)` output
    /// viewed, so cross-attention needs no permutes of heads either. Gradients in the same
    /// layouts (dk and dv one after the other in one tensor, as for `Heads`).
    Tokens,
}

/// The `Heads` shape `(N, H, L, D)` of a `Tokens` operand `(N, L, H, D)` (and back).
fn swap_heads(s: &Shape) -> Shape {
    let d = s.dims();
    Shape(vec![d[0], d[2], d[1], d[3]])
}

/// Attention of `q`, `k`, `v`, an additive mask and the dropout seed (inputs 0 to 4; the mask
/// and the seed a `[1]` zero where `masked` is false and `dropout` is `None`; with
/// [`Layout::Packed`] inputs 0 to 2 are one node).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    pub scale: f32,
    pub causal: bool,
    pub masked: bool,
    /// Dropout of the probabilities (its `p` and `salt`).
    pub dropout: Option<Dropout>,
    pub layout: Layout,
    /// The forward kernel also writes each query row's log-sum-exp past its output (in room
    /// the plan adds to its buffer: [`Attention::scratch`]), and the statistics kernel of the
    /// backward reads it there instead of recomputing the scores. Set by the plan compiler
    /// (`exec::lower::attention_lse`, f32 graphs); the CPU twins recompute.
    pub lse: bool,
}

/// The `Heads` shape `(N, H, L, D)` of a packed `qkv (N, L, 3, H, D)`.
fn unpacked_shape(qkv: &Shape) -> Shape {
    let d = qkv.dims();
    Shape(vec![d[0], d[3], d[1], d[4]])
}

/// Element offsets of an operand's rows: row `i` of slice `bh` starts at `off + (bh / nh) * sn
/// + (bh % nh) * sh + i * sr` (the shader's `q_at` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Strided {
    off: usize,
    sn: usize,
    sh: usize,
    sr: usize,
}

/// `(slices, Lq, Lk, D, Dv)` of checked shapes.
fn extents(q: &Shape, k: &Shape, v: &Shape) -> (usize, usize, usize, usize, usize) {
    let r = q.rank();
    let (lq, d) = (q.dims()[r - 2], q.dims()[r - 1]);
    let (lk, dv) = (k.dims()[r - 2], v.dims()[r - 1]);
    (q.numel() / (lq * d), lq, lk, d, dv)
}

/// The full score shape `(*, Lq, Lk)` of checked `q` and `k`.
fn score_shape(q: &Shape, k: &Shape) -> Shape {
    let r = q.rank();
    let mut dims = q.dims().to_vec();
    dims[r - 1] = k.dims()[r - 2];
    Shape(dims)
}

/// Shape rule: `q (*, Lq, D)`, `k (*, Lk, D)`, `v (*, Lk, Dv)` with the same leading axes, and a
/// mask broadcastable to `(*, Lq, Lk)` -> `(*, Lq, Dv)`.
pub fn infer(q: &Shape, k: &Shape, v: &Shape, mask: Option<&Shape>) -> Result<Shape> {
    let r = q.rank();
    let err = |why: &str| Err(shape_err(OP, format!("q {q}, k {k}, v {v}: {why}")));
    if r < 2 || k.rank() != r || v.rank() != r {
        return err("expected q (*, Lq, D), k (*, Lk, D) and v (*, Lk, Dv) of one rank >= 2");
    }
    if k.dims()[..r - 2] != q.dims()[..r - 2] || v.dims()[..r - 2] != q.dims()[..r - 2] {
        return err("their leading axes differ");
    }
    if k.dims()[r - 1] != q.dims()[r - 1] {
        return err("q and k have different feature sizes D");
    }
    if v.dims()[r - 2] != k.dims()[r - 2] {
        return err("k and v have different numbers of keys Lk");
    }
    if let Some(m) = mask {
        let full = score_shape(q, k);
        let fits = m.rank() <= r
            && m.dims()
                .iter()
                .zip(&full.dims()[r - m.rank()..])
                .all(|(&a, &b)| a == b || a == 1);
        if !fits {
            return Err(shape_err(
                OP,
                format!("mask {m} does not broadcast to the scores {full}"),
            ));
        }
    }
    let mut out = q.dims().to_vec();
    out[r - 1] = v.dims()[r - 1];
    Ok(Shape(out))
}

/// The mask's element strides as the kernel reads them: `(heads, outer, head, row, col)`, with
/// slice `bh` at `(bh / heads) * outer + (bh % heads) * head`. `None` where the mask's leading
/// axes do not fold that way (the graph then expands the mask to the scores' shape).
fn mask_strides(q: &Shape, k: &Shape, mask: &Shape) -> Option<[usize; 5]> {
    let full = score_shape(q, k);
    let s = broadcast_strides(mask, &full);
    let r = full.rank();
    let (row, col) = (s[r - 2], s[r - 1]);
    if r == 2 {
        return Some([1, 0, 0, row, col]);
    }
    let lead = &full.dims()[..r - 2];
    let (heads, head) = (lead[lead.len() - 1], s[r - 3]);
    let outer = if r >= 4 { s[r - 4] } else { 0 };
    // every outer axis must step by `outer` times the extents after it (or all be broadcast)
    let mut step = outer;
    for ax in (0..lead.len() - 1).rev() {
        if s[ax] != step {
            return None;
        }
        step *= lead[ax];
    }
    Some([heads, outer, head, row, col])
}

/// Bytes of workgroup memory the kernel takes with tiles `(bq, bk)` for `(D, Dv)`.
pub fn tile_bytes((bq, bk): (usize, usize), d: usize, dv: usize) -> usize {
    let dv4 = dv.div_ceil(4) * 4;
    4 * (bq * d + bk * d.max(dv4) + bk * bq + bq * dv4 + 3 * bq)
}

/// Query rows per workgroup and keys per tile (multiples of 4: the kernel's blocks) for
/// `(Lq, Lk, D, Dv)` on an adapter with `workgroup_storage` bytes of workgroup memory: the
/// largest of a fixed list that fits, each capped at the sequence's next power of two (at least
/// 4).
pub fn tiles(lq: usize, lk: usize, d: usize, dv: usize, workgroup_storage: u32) -> (usize, usize) {
    pick_tiles(lq, lk, |t| {
        tile_bytes(t, d, dv) <= workgroup_storage as usize
    })
}

/// The first of a fixed list of tiles `(rows, keys)`, each capped at the sequence's next power
/// of two (at least 4), that `fits`; `(4, 4)` where none does.
fn pick_tiles(lq: usize, lk: usize, fits: impl Fn((usize, usize)) -> bool) -> (usize, usize) {
    const CANDIDATES: [(usize, usize); 7] = [
        (32, 32),
        (16, 32),
        (16, 16),
        (8, 16),
        (8, 8),
        (4, 8),
        (4, 4),
    ];
    CANDIDATES
        .iter()
        .map(|&(bq, bk)| {
            (
                bq.min(lq.next_power_of_two().max(4)),
                bk.min(lk.next_power_of_two().max(4)),
            )
        })
        .find(|&t| fits(t))
        .unwrap_or((4, 4))
}

/// Which kernel of the fused backward a node runs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradPart {
    /// `(2, slices, Lq)` f32: each query row's log-sum-exp, then `delta = dy . y`.
    Stats,
    /// `[dk | dv]` flat: `(slices, Lk, D)` then `(slices, Lk, Dv)`.
    KeyValue,
    /// `dq`, shaped as `q`.
    Query,
}

/// One kernel of attention's fused backward. Inputs: `q`, `k`, `v`, the mask and the seed (as
/// the forward's), its output `y` and that output's gradient `dy`; `KeyValue` and `Query` also
/// take the `Stats` node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionGrad {
    pub attention: Attention,
    pub part: GradPart,
}

/// Workgroup bytes of a backward kernel with tiles `(bq, bk)` (as the shader's header says).
pub fn grad_tile_bytes(part: GradPart, (bq, bk): (usize, usize), d: usize, dv: usize) -> usize {
    let (d4, dv4, k4) = (d.div_ceil(4), dv.div_ceil(4), bk / 4);
    match part {
        GradPart::Stats => 16 * (bq * d4 + bk * d4 + bq * k4) + 12 * bq,
        GradPart::Query => 16 * (2 * bq * d4 + bq * dv4 + bk * d4 + bk * dv4 + bq * k4) + 8 * bq,
        GradPart::KeyValue => {
            16 * (bq * d4 + bq * dv4 + 2 * bk * d4 + 2 * bk * dv4 + 2 * bq * k4) + 8 * bq
        }
    }
}

/// Tiles `(BQ, BK)` of a backward kernel on an adapter with `workgroup_storage` bytes.
pub fn grad_tiles(
    part: GradPart,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    workgroup_storage: u32,
) -> (usize, usize) {
    pick_tiles(lq, lk, |t| {
        grad_tile_bytes(part, t, d, dv) <= workgroup_storage as usize
    })
}

/// Part `which` of `t (N, L, parts, H, W)` (or `(N, L, H, W)` where `parts` is 1) as a
/// contiguous `(N, H, L, W)` tensor: the packed layout's operands for the CPU twins.
fn tokens_to_heads(t: &Tensor, parts: usize, which: usize) -> Tensor {
    let d = t.dims();
    let (n, l, h, w) = (d[0], d[1], d[d.len() - 2], d[d.len() - 1]);
    let mut out = vec![0f32; n * h * l * w];
    for b in 0..n {
        for i in 0..l {
            for hh in 0..h {
                let from = (((b * l + i) * parts + which) * h + hh) * w;
                let to = ((b * h + hh) * l + i) * w;
                out[to..to + w].copy_from_slice(&t.data()[from..from + w]);
            }
        }
    }
    Tensor::new([n, h, l, w], out).expect("unpacked shape")
}

/// Writes `src`, contiguous `(N, H, L, W)` as `heads` says, into part `which` of `dst (N, L,
/// parts, H, W)`: the inverse of [`tokens_to_heads`].
fn heads_into_tokens(src: &[f32], heads: &Shape, dst: &mut [f32], parts: usize, which: usize) {
    let d = heads.dims();
    let (n, h, l, w) = (d[0], d[1], d[2], d[3]);
    for b in 0..n {
        for i in 0..l {
            for hh in 0..h {
                let to = (((b * l + i) * parts + which) * h + hh) * w;
                let from = ((b * h + hh) * l + i) * w;
                dst[to..to + w].copy_from_slice(&src[from..from + w]);
            }
        }
    }
}

/// Scores of one query row in f64: `q[i] . k[j] * scale + mask`, `-inf` where causal hides a
/// key. `x` are the op's inputs (q, k, v, mask, ...), `strides` the mask's (None: no mask).
fn scores_row(
    a: &Attention,
    x: &[&Tensor],
    strides: Option<[usize; 5]>,
    b: usize,
    i: usize,
    s: &mut [f64],
) {
    let (q, k, m) = (x[0], x[1], x[3]);
    let (_, lq, lk, d, _) = extents(q.shape(), k.shape(), x[2].shape());
    let qi = &q.data()[(b * lq + i) * d..][..d];
    for (j, sj) in s.iter_mut().enumerate() {
        let kj = &k.data()[(b * lk + j) * d..][..d];
        let dot: f64 = qi.iter().zip(kj).map(|(&u, &w)| u as f64 * w as f64).sum();
        *sj = dot * a.scale as f64;
        if let Some([heads, outer, head, row, col]) = strides {
            let at = (b / heads) * outer + (b % heads) * head + i * row + j * col;
            *sj += m.data()[at] as f64;
        }
        if a.causal && j > i {
            *sj = f64::NEG_INFINITY;
        }
    }
}

impl Attention {
    /// `q`, `k` and `v` as the `Heads` layout's `(*, L, D)` slices, from the stored inputs'
    /// shapes.
    pub fn logical(&self, q: &Shape, k: &Shape, v: &Shape) -> (Shape, Shape, Shape) {
        match self.layout {
            Layout::Heads => (q.clone(), k.clone(), v.clone()),
            Layout::Packed => {
                let s = unpacked_shape(q);
                (s.clone(), s.clone(), s)
            }
            Layout::Tokens => (swap_heads(q), swap_heads(k), swap_heads(v)),
        }
    }

    /// Elements the forward kernel writes past its output: each query row's log-sum-exp where
    /// [`Attention::lse`] is set.
    pub fn scratch(&self, q: &Shape, k: &Shape, v: &Shape) -> usize {
        let (q, k, v) = self.logical(q, k, v);
        let (bh, lq, ..) = extents(&q, &k, &v);
        if self.lse {
            bh * lq
        } else {
            0
        }
    }

    /// `q`, `k` and `v` of the inputs as contiguous `(N, H, L, D)` tensors (the CPU twins of the
    /// packed and tokens layouts compute on them).
    fn unpacked(&self, inputs: &[&Tensor]) -> [Tensor; 3] {
        match self.layout {
            Layout::Packed => [0, 1, 2].map(|i| tokens_to_heads(inputs[0], 3, i)),
            _ => [0, 1, 2].map(|i| tokens_to_heads(inputs[i], 1, 0)),
        }
    }

    /// This attention on the `Heads` layout (the CPU twins compute on it).
    fn on_heads(&self) -> Attention {
        Attention {
            layout: Layout::Heads,
            ..*self
        }
    }

    /// The heads per batch element the layout's strides step over, then where the rows of q,
    /// k, v and the output (also y and dy) start, and where dq, dk and dv are written (q's, k's
    /// and v's strides from these offsets): `(nh, [q, k, v, out], [dq, dk, dv])`.
    fn operand_layouts(
        &self,
        q: &Shape,
        k: &Shape,
        v: &Shape,
    ) -> (usize, [Strided; 4], [usize; 3]) {
        let (q, k, v) = self.logical(q, k, v);
        let (bh, lq, lk, d, dv) = extents(&q, &k, &v);
        let rows = |l: usize, w: usize, off: usize| Strided {
            off,
            sn: l * w,
            sh: 0,
            sr: w,
        };
        match self.layout {
            Layout::Heads => (
                1,
                [
                    rows(lq, d, 0),
                    rows(lk, d, 0),
                    rows(lk, dv, 0),
                    rows(lq, dv, 0),
                ],
                [0, 0, bh * lk * d],
            ),
            Layout::Packed => {
                let (h, l) = (q.dims()[1], lq);
                let part = |off: usize, width: usize| Strided {
                    off,
                    sn: l * width * h,
                    sh: d,
                    sr: width * h,
                };
                let (hd, qkv) = (h * d, 3 * h * d);
                let packed = |off: usize| Strided {
                    sr: qkv,
                    sn: l * qkv,
                    ..part(off, d)
                };
                (
                    h,
                    [packed(0), packed(hd), packed(2 * hd), part(0, d)],
                    [0, hd, 2 * hd],
                )
            }
            Layout::Tokens => {
                let h = q.dims()[1];
                let tokens = |l: usize, w: usize| Strided {
                    off: 0,
                    sn: l * h * w,
                    sh: w,
                    sr: h * w,
                };
                (
                    h,
                    [tokens(lq, d), tokens(lk, d), tokens(lk, dv), tokens(lq, dv)],
                    [0, 0, bh * lk * d],
                )
            }
        }
    }

    /// The mask's strides as the kernels read them (`None` without a mask); `q` and `k` as
    /// [`Self::logical`] gives them.
    fn strides(&self, q: &Shape, k: &Shape, m: &Shape) -> Option<[usize; 5]> {
        self.masked
            .then(|| mask_strides(q, k, m).expect("folded by the graph"))
    }

    /// The dropout factor of element `(b, i, j)` of the scores: `1 / (1 - p)` or 0 (1 without
    /// dropout); `seed` is the seed input.
    fn keep_factor(&self, seed: &Tensor) -> impl Fn(usize) -> f64 {
        let keeps = self
            .dropout
            .map(|d| (d.keeps(seed.data()[0]), d.scale() as f64));
        move |e| match &keeps {
            Some((keep, scale)) if keep(e) => *scale,
            Some(_) => 0.0,
            None => 1.0,
        }
    }

    /// CPU reference in f64: the formula row by row, the whole softmax at once (packed
    /// operands unpacked first).
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        if self.layout != Layout::Heads {
            let [q, k, v] = self.unpacked(inputs);
            let logical = infer(q.shape(), k.shape(), v.shape(), None).expect("checked shapes");
            let y = self
                .on_heads()
                .cpu(&[&q, &k, &v, inputs[3], inputs[4]], &logical);
            let mut data = vec![0f32; out.numel()];
            heads_into_tokens(y.data(), &logical, &mut data, 1, 0);
            return Tensor::new(out.clone(), data).expect("attention shape");
        }
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        let (bh, lq, lk, _, dv) = extents(q.shape(), k.shape(), v.shape());
        let kept = self.keep_factor(inputs[4]);
        let strides = self.strides(q.shape(), k.shape(), inputs[3].shape());
        let mut y = vec![0f32; out.numel()];
        let mut s = vec![0f64; lk];
        for b in 0..bh {
            for i in 0..lq {
                scores_row(self, inputs, strides, b, i, &mut s);
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = s.iter().map(|&x| (x - mx).exp()).sum();
                for c in 0..dv {
                    let acc: f64 = (0..lk)
                        .map(|j| {
                            (s[j] - mx).exp()
                                * kept((b * lq + i) * lk + j)
                                * v.data()[(b * lk + j) * dv + c] as f64
                        })
                        .sum();
                    y[(b * lq + i) * dv + c] = (acc / total) as f32;
                }
            }
        }
        Tensor::new(out.clone(), y).expect("attention shape")
    }

    /// The override constants every attention kernel takes, with tiles `(bq, bk)`.
    fn constants(&self, inputs: &[&Shape], (bq, bk): (usize, usize)) -> Vec<(&'static str, f64)> {
        let (q, k, v) = self.logical(inputs[0], inputs[1], inputs[2]);
        let (bh, lq, lk, d, dv) = extents(&q, &k, &v);
        let [heads, outer, head, row, col] =
            self.strides(&q, &k, inputs[3]).unwrap_or([1, 0, 0, 0, 0]);
        let (nh, [sq, sk, sv, so], [gq, gk, gv]) =
            self.operand_layouts(inputs[0], inputs[1], inputs[2]);
        let mut c = vec![
            ("BH", bh as f64),
            ("LQ", lq as f64),
            ("LK", lk as f64),
            ("D", d as f64),
            ("DV", dv as f64),
            ("SCALE", self.scale as f64),
            ("CAUSAL", self.causal as u32 as f64),
            ("HAS_MASK", self.masked as u32 as f64),
            ("HEADS", heads as f64),
            ("MS_OUTER", outer as f64),
            ("MS_HEAD", head as f64),
            ("MS_ROW", row as f64),
            ("MS_COL", col as f64),
            ("HAS_DROPOUT", self.dropout.is_some() as u32 as f64),
            (
                "DROP_THRESHOLD",
                self.dropout.map_or(0.0, |d| d.threshold() as f64),
            ),
            ("DROP_SCALE", self.dropout.map_or(1.0, |d| d.scale() as f64)),
            ("DROP_SALT", self.dropout.map_or(0.0, |d| d.salt as f64)),
            ("BQ", bq as f64),
            ("BK", bk as f64),
            ("NH", nh as f64),
            ("GQ_OFF", gq as f64),
            ("GK_OFF", gk as f64),
            ("GV_OFF", gv as f64),
            ("ZERO_DQ", (self.layout == Layout::Packed) as u32 as f64),
            ("LSE_OFF", (bh * lq * dv) as f64),
            ("O_SN", so.sn as f64),
            ("O_SH", so.sh as f64),
            ("O_SR", so.sr as f64),
        ];
        for (names, s) in [
            (["Q_OFF", "Q_SN", "Q_SH", "Q_SR"], sq),
            (["K_OFF", "K_SN", "K_SH", "K_SR"], sk),
            (["V_OFF", "V_SN", "V_SH", "V_SR"], sv),
        ] {
            c.extend(
                names
                    .into_iter()
                    .zip([s.off, s.sn, s.sh, s.sr].map(|x| x as f64)),
            );
        }
        c
    }

    /// Kernel: `shaders/attention.wgsl`, tiles sized for `target`.
    pub fn kernel(&self, inputs: &[&Shape], target: &crate::codegen::Target) -> KernelSpec {
        let (q, k, v) = self.logical(inputs[0], inputs[1], inputs[2]);
        let (bh, lq, lk, d, dv) = extents(&q, &k, &v);
        let t = tiles(lq, lk, d, dv, target.workgroup_storage);
        let mut constants = self.constants(inputs, t);
        constants.push(("WRITE_LSE", self.lse as u32 as f64));
        KernelSpec {
            family: "attention",
            entry: "attention",
            constants,
            workgroups: (bh * lq.div_ceil(t.0)) as u64,
        }
    }

    /// Gradients for `q`, `k`, `v` (none for the mask and the seed) given the inputs `x`, the
    /// output `y` and its gradient `dy`: the fused kernels (see the module docs), or graph ops
    /// for heads wider than [`MAX_BACKWARD_HEAD_DIM`].
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        y: NodeId,
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        let stored = [g.shape(x[0]), g.shape(x[1]), g.shape(x[2])];
        let (qs, ks, vs) = self.logical(&stored[0], &stored[1], &stored[2]);
        let (bh, _, lk, d, dv) = extents(&qs, &ks, &vs);
        if d > MAX_BACKWARD_HEAD_DIM || dv > MAX_BACKWARD_HEAD_DIM {
            return match self.layout {
                Layout::Heads => self.composed_backward(g, x, dy),
                _ => self.unpacked_backward(g, x, dy),
            };
        }
        let grad = |part, extra: Option<NodeId>, shape: Shape| {
            let mut inputs = x.to_vec();
            inputs.extend([y, dy]);
            inputs.extend(extra);
            let op = AttentionGrad {
                attention: *self,
                part,
            };
            g.push_op(Op::AttentionGrad(op), inputs, shape)
        };
        let lq = qs.dims()[qs.rank() - 2];
        let stats = grad(GradPart::Stats, None, Shape(vec![2, bh, lq]))?;
        if self.layout == Layout::Packed {
            // dk and dv into their parts of one (N, L, 3, H, D) tensor (dq's part zeroed), then
            // dq written into it in place
            let [packed, ..] = stored;
            let kv = grad(GradPart::KeyValue, Some(stats), packed.clone())?;
            let mut inputs = x.to_vec();
            inputs.extend([y, dy, stats, kv]);
            let op = AttentionGrad {
                attention: *self,
                part: GradPart::Query,
            };
            let dqkv = g.push_op(Op::AttentionGrad(op), inputs, packed)?;
            return Ok(vec![Some(dqkv), None, None, None, None]);
        }
        // dk and dv one after the other in one tensor, each in its operand's layout
        let [qs, ks, vs] = stored;
        let (nk, nv) = (bh * lk * d, bh * lk * dv);
        let kv = grad(GradPart::KeyValue, Some(stats), Shape(vec![nk + nv]))?;
        let as_shape = |s: &Shape| s.dims().iter().map(|&e| e as isize).collect::<Vec<_>>();
        let dk = g.reshape(g.narrow(kv, 0, 0, nk)?, &as_shape(&ks))?;
        let dv = g.reshape(g.narrow(kv, 0, nk, nv)?, &as_shape(&vs))?;
        let dq = grad(GradPart::Query, Some(stats), qs)?;
        Ok(vec![Some(dq), Some(dk), Some(dv), None, None])
    }

    /// The backward from graph ops: the probabilities recomputed from `q` and `k`, then GEMMs
    /// (`dv = p^T dy`, `dp = dy v^T`, `ds = p (dp - sum(dp p)) * scale`, `dq = ds k`,
    /// `dk = ds^T q`); stores `(*, Lq, Lk)`.
    /// The backward of the packed and tokens layouts for heads wider than the kernels take:
    /// the operands and `dy` permuted into the heads layout by graph ops, the composed backward
    /// there, its gradients permuted back (the packed one's parts into one `(N, L, 3, H, D)`).
    /// Only training pays for the permutes; the forward reads the layout as it is.
    fn unpacked_backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        // (N, L, H, D) <-> (N, H, L, D)
        let swap = |t: NodeId| g.permute(t, &[0, 2, 1, 3]);
        let heads = self.on_heads();
        if self.layout == Layout::Tokens {
            let ops = [swap(x[0])?, swap(x[1])?, swap(x[2])?, x[3], x[4]];
            return heads
                .composed_backward(g, &ops, swap(dy)?)?
                .into_iter()
                .map(|d| d.map(swap).transpose())
                .collect();
        }
        // packed: (N, L, 3, H, D) -> (3, N, H, L, D), split; the gradients stacked back
        let split = g.permute(x[0], &[2, 0, 3, 1, 4])?;
        let d = g.shape(split).dims().to_vec();
        let part = |i: usize| {
            let dims: Vec<isize> = d[1..].iter().map(|&e| e as isize).collect();
            g.reshape(g.narrow(split, 0, i, 1)?, &dims)
        };
        let ops = [part(0)?, part(1)?, part(2)?, x[3], x[4]];
        let grads = heads.composed_backward(g, &ops, swap(dy)?)?;
        let one: Vec<isize> = d.iter().map(|&e| e as isize).skip(1).collect();
        let one: Vec<isize> = std::iter::once(1).chain(one).collect();
        let parts = grads[..3]
            .iter()
            .map(|&gr| g.reshape(gr.expect("q, k and v have gradients"), &one))
            .collect::<Result<Vec<_>>>()?;
        let dqkv = g.permute(g.concat(&parts, 0)?, &[1, 3, 0, 2, 4])?;
        Ok(vec![Some(dqkv), None, None, None, None])
    }

    fn composed_backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        let (q, k, v, seed) = (x[0], x[1], x[2], x[4]);
        let mask = self.masked.then_some(x[3]);
        let p = probabilities(g, q, k, mask, self.causal, self.scale)?;
        // the forward's mask, recomputed: on p for dv, on the gradient for dp
        let (pd, dp) = match self.dropout {
            Some(d) => (
                g.dropout(p, d.p, seed, d.salt)?,
                d.backward(g, seed, g.matmul_t(dy, v, false, true)?)?,
            ),
            None => (p, g.matmul_t(dy, v, false, true)?),
        };
        let dv = g.matmul_t(pd, dy, true, false)?;
        let last = g.shape(p).rank() - 1;
        let ds = Softmax {
            axis: last,
            log: false,
        }
        .backward(g, p, dp)?;
        let ds = g.mul_scalar(ds, self.scale)?;
        let dq = g.matmul(ds, k)?;
        let dk = g.matmul_t(ds, q, true, false)?;
        Ok(vec![Some(dq), Some(dk), Some(dv), None, None])
    }
}

impl AttentionGrad {
    /// The kernel's name, as plans and profiles show it.
    pub fn entry(&self) -> &'static str {
        match self.part {
            GradPart::Stats => "attention_stats",
            GradPart::KeyValue => "attention_dkv",
            GradPart::Query => "attention_dq",
        }
    }

    /// CPU reference in f64, query row by query row; `KeyValue` and `Query` read `lse` and
    /// `delta` from their stats input, as the kernels do.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        if self.attention.layout != Layout::Heads {
            return self.packed_cpu(inputs, out);
        }
        let a = &self.attention;
        let (q, k, v, y, dy) = (inputs[0], inputs[1], inputs[2], inputs[5], inputs[6]);
        let (bh, lq, lk, d, dv) = extents(q.shape(), k.shape(), v.shape());
        let kept = a.keep_factor(inputs[4]);
        let strides = a.strides(q.shape(), k.shape(), inputs[3].shape());
        let scale = a.scale as f64;
        let f = |t: &Tensor, at: usize| t.data()[at] as f64;
        let mut o = vec![0f64; out.numel()];
        let mut s = vec![0f64; lk];
        for b in 0..bh {
            for i in 0..lq {
                scores_row(a, inputs, strides, b, i, &mut s);
                let row = b * lq + i;
                let (lse, delta) = match self.part {
                    GradPart::Stats => {
                        let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = s.iter().map(|&x| (x - mx).exp()).sum();
                        o[row] = mx + sum.ln();
                        o[bh * lq + row] = (0..dv)
                            .map(|c| f(dy, row * dv + c) * f(y, row * dv + c))
                            .sum();
                        continue;
                    }
                    _ => (f(inputs[7], row), f(inputs[7], bh * lq + row)),
                };
                for (j, &sj) in s.iter().enumerate() {
                    let p = (sj - lse).exp();
                    let keep = kept(row * lk + j);
                    let key = b * lk + j;
                    let dp: f64 = (0..dv)
                        .map(|c| f(dy, row * dv + c) * f(v, key * dv + c))
                        .sum();
                    let ds = p * (dp * keep - delta) * scale;
                    for c in 0..d {
                        match self.part {
                            GradPart::KeyValue => o[key * d + c] += ds * f(q, row * d + c),
                            _ => o[row * d + c] += ds * f(k, key * d + c),
                        }
                    }
                    if self.part == GradPart::KeyValue {
                        for c in 0..dv {
                            o[bh * lk * d + key * dv + c] += p * keep * f(dy, row * dv + c);
                        }
                    }
                }
            }
        }
        let o = o.into_iter().map(|e| e as f32).collect();
        Tensor::new(out.clone(), o).expect("attention gradient shape")
    }

    /// [`Self::cpu`] of packed or tokens operands: unpacked, computed on the `Heads` layout and
    /// laid out again (packed `KeyValue`: dq's part zero; packed `Query`: dq written into a copy
    /// of input 8; tokens `KeyValue`: dk then dv, each as its operand).
    fn packed_cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let [q, k, v] = self.attention.unpacked(inputs);
        let (y, dy) = (
            tokens_to_heads(inputs[5], 1, 0),
            tokens_to_heads(inputs[6], 1, 0),
        );
        let heads = AttentionGrad {
            attention: self.attention.on_heads(),
            part: self.part,
        };
        let mut x = vec![&q, &k, &v, inputs[3], inputs[4], &y, &dy];
        x.extend(inputs.get(7).copied());
        let logical = q.shape();
        let tokens = self.attention.layout == Layout::Tokens;
        let data = match self.part {
            GradPart::Stats => return heads.cpu(&x, out),
            GradPart::KeyValue if tokens => {
                let flat = heads.cpu(&x, &Shape(vec![k.numel() + v.numel()]));
                let (dk, dv) = flat.data().split_at(k.numel());
                let mut data = vec![0f32; out.numel()];
                let (to_k, to_v) = data.split_at_mut(k.numel());
                heads_into_tokens(dk, k.shape(), to_k, 1, 0);
                heads_into_tokens(dv, v.shape(), to_v, 1, 0);
                data
            }
            GradPart::Query if tokens => {
                let dq = heads.cpu(&x, logical);
                let mut data = vec![0f32; out.numel()];
                heads_into_tokens(dq.data(), logical, &mut data, 1, 0);
                data
            }
            GradPart::KeyValue => {
                let flat = heads.cpu(&x, &Shape(vec![2 * q.numel()]));
                let (dk, dv) = flat.data().split_at(q.numel());
                let mut data = vec![0f32; out.numel()];
                heads_into_tokens(dk, logical, &mut data, 3, 1);
                heads_into_tokens(dv, logical, &mut data, 3, 2);
                data
            }
            GradPart::Query => {
                let dq = heads.cpu(&x, logical);
                let mut data = inputs[8].data().to_vec();
                heads_into_tokens(dq.data(), logical, &mut data, 3, 0);
                data
            }
        };
        Tensor::new(out.clone(), data).expect("attention gradient shape")
    }

    /// Whether the kernel writes its result into its last input (packed `dq`, written into
    /// the `(N, L, 3, H, D)` gradient `attention_dkv` made) rather than a tensor of its own.
    pub fn in_place(&self) -> bool {
        self.attention.layout == Layout::Packed && self.part == GradPart::Query
    }

    /// Kernel: `shaders/attention.wgsl`'s backward entries, tiles sized for `target`.
    pub fn kernel(&self, inputs: &[&Shape], target: &crate::codegen::Target) -> KernelSpec {
        let (q, k, v) = self.attention.logical(inputs[0], inputs[1], inputs[2]);
        let (bh, lq, lk, d, dv) = extents(&q, &k, &v);
        let t = grad_tiles(self.part, lq, lk, d, dv, target.workgroup_storage);
        let blocks = match self.part {
            GradPart::KeyValue => lk.div_ceil(t.1),
            _ => lq.div_ceil(t.0),
        };
        let mut constants = self.attention.constants(inputs, t);
        let given = self.attention.lse && self.part == GradPart::Stats;
        constants.push(("LSE_GIVEN", given as u32 as f64));
        KernelSpec {
            family: "attention",
            entry: self.entry(),
            constants,
            workgroups: (bh * blocks) as u64,
        }
    }

    /// Multiply-adds per attended pair: the scores (D) for the statistics (none where the
    /// forward wrote the log-sum-exps); with the scores, `dy v^T` (Dv), `dv` (Dv) and `dk` (D)
    /// for keys and values; `dy v^T` and `dq` for queries.
    pub fn macs_per_pair(&self, d: usize, dv: usize) -> usize {
        match self.part {
            GradPart::Stats if self.attention.lse => 0,
            GradPart::Stats => d,
            GradPart::KeyValue => 2 * (d + dv),
            GradPart::Query => 2 * d + dv,
        }
    }
}

/// Query-key pairs attended in `(*, Lq, D)` x `(*, Lk, D)`: all of them, or the causal
/// triangle.
pub fn attended_pairs(q: &Shape, k: &Shape, causal: bool) -> usize {
    let (q, k) = (q.dims(), k.dims());
    let (lq, lk) = (q[q.len() - 2], k[k.len() - 2]);
    let slices = q[..q.len() - 2].iter().product::<usize>();
    let per_slice: usize = if causal {
        (0..lq).map(|i| (i + 1).min(lk)).sum()
    } else {
        lq * lk
    };
    slices * per_slice
}

/// `softmax(q k^T * scale + mask (+ causal -inf above the diagonal), -1)` from graph ops, in
/// `q`'s element type.
fn probabilities(
    g: &Graph,
    q: NodeId,
    k: NodeId,
    mask: Option<NodeId>,
    causal: bool,
    scale: f32,
) -> Result<NodeId> {
    // f32 masks in the scores' type (a cast to the same type adds nothing)
    let as_scores = |m: NodeId| g.cast(m, g.dtype(q));
    let mut s = g.mul_scalar(g.matmul_t(q, k, false, true)?, scale)?;
    if let Some(m) = mask {
        s = g.add(s, as_scores(m)?)?;
    }
    if causal {
        let full = g.shape(s);
        let r = full.rank();
        let (lq, lk) = (full.dims()[r - 2], full.dims()[r - 1]);
        let data = (0..lq * lk)
            .map(|e| {
                if e % lk > e / lk {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let above = g.constant(Tensor::new([lq, lk], data)?);
        s = g.add(s, as_scores(above)?)?;
    }
    g.softmax(s, -1)
}

/// Self-attention of a packed `qkv (N, L, 3, H, D)` -> `(N, L, H, D)` (see [`Layout::Packed`]);
/// the graph entry point. Heads wider than the forward kernel takes ([`MAX_HEAD_DIM`]) are
/// unpacked into `(N, H, L, D)` operands by graph ops (and the output packed back); heads wider
/// than the backward kernels take are unpacked by the backward rule only.
pub(crate) fn attention_packed(
    g: &Graph,
    qkv: NodeId,
    mask: Option<NodeId>,
    causal: bool,
    scale: Option<f32>,
    dropout: Option<(f32, NodeId, u32)>,
) -> Result<NodeId> {
    let s = g.check_id(OP, qkv)?;
    if s.rank() != 5 || s.dims()[2] != 3 {
        return Err(shape_err(
            OP,
            format!("packed qkv {s}: expected (N, L, 3, H, D)"),
        ));
    }
    if s.dims()[4] <= MAX_HEAD_DIM {
        return attention_with(g, [qkv; 3], mask, causal, scale, dropout, Layout::Packed);
    }
    let heads = g.permute(qkv, &[2, 0, 3, 1, 4])?;
    let logical = unpacked_shape(&s);
    let dims: Vec<isize> = logical.dims().iter().map(|&d| d as isize).collect();
    let part = |i: usize| g.reshape(g.narrow(heads, 0, i, 1)?, &dims);
    let ops = [part(0)?, part(1)?, part(2)?];
    let y = attention_with(g, ops, mask, causal, scale, dropout, Layout::Heads)?;
    g.permute(y, &[0, 2, 1, 3])
}

/// Attention of `q (N, Lq, H, D)`, `k (N, Lk, H, D)`, `v (N, Lk, H, Dv)` -> `(N, Lq, H, Dv)`
/// (see [`Layout::Tokens`]); the graph entry point. Heads wider than the forward kernel takes
/// are permuted into `(N, H, L, D)` operands by graph ops (and the output back); heads wider
/// than the backward kernels take are permuted by the backward rule only (decoding through
/// `(N, max_len, H, D)` caches copies nothing).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_tokens(
    g: &Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: Option<NodeId>,
    causal: bool,
    scale: Option<f32>,
    dropout: Option<(f32, NodeId, u32)>,
) -> Result<NodeId> {
    let shapes = [g.check_id(OP, q)?, g.check_id(OP, k)?, g.check_id(OP, v)?];
    if let Some(s) = shapes.iter().find(|s| s.rank() != 4) {
        return Err(shape_err(
            OP,
            format!("{s}: expected q (N, Lq, H, D), k (N, Lk, H, D), v (N, Lk, H, Dv)"),
        ));
    }
    let widest = shapes[0].dims()[3].max(shapes[2].dims()[3]);
    if widest <= MAX_HEAD_DIM {
        return attention_with(g, [q, k, v], mask, causal, scale, dropout, Layout::Tokens);
    }
    let heads = |t: NodeId| g.permute(t, &[0, 2, 1, 3]);
    let ops = [heads(q)?, heads(k)?, heads(v)?];
    let y = attention_with(g, ops, mask, causal, scale, dropout, Layout::Heads)?;
    g.permute(y, &[0, 2, 1, 3])
}

/// Scaled dot-product attention (see the module docs); the graph entry point. `dropout` is the
/// probabilities' dropout: its probability, the seed node and the salt.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    g: &Graph,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: Option<NodeId>,
    causal: bool,
    scale: Option<f32>,
    dropout: Option<(f32, NodeId, u32)>,
) -> Result<NodeId> {
    attention_with(g, [q, k, v], mask, causal, scale, dropout, Layout::Heads)
}

/// [`attention`] of operands stored as `layout` says (packed: `[qkv; 3]`).
fn attention_with(
    g: &Graph,
    [q, k, v]: [NodeId; 3],
    mask: Option<NodeId>,
    causal: bool,
    scale: Option<f32>,
    dropout: Option<(f32, NodeId, u32)>,
    layout: Layout,
) -> Result<NodeId> {
    let (qs, ks, vs) = (g.check_id(OP, q)?, g.check_id(OP, k)?, g.check_id(OP, v)?);
    let stored = qs.clone();
    let (qs, ks, vs) = match layout {
        Layout::Heads => (qs, ks, vs),
        Layout::Packed => {
            let s = unpacked_shape(&qs);
            (s.clone(), s.clone(), s)
        }
        Layout::Tokens => (swap_heads(&qs), swap_heads(&ks), swap_heads(&vs)),
    };
    let ms = mask.map(|m| g.check_id(OP, m)).transpose()?;
    let mut out = infer(&qs, &ks, &vs, ms.as_ref())?;
    match layout {
        Layout::Heads => {}
        Layout::Packed => {
            let d = stored.dims();
            out = Shape(vec![d[0], d[1], d[3], d[4]]);
        }
        Layout::Tokens => out = swap_heads(&out),
    }
    if let Some(m) = mask {
        if g.dtype(m) != DType::F32 {
            return Err(shape_err(
                OP,
                format!("the mask must be f32 (additive scores), got {}", g.dtype(m)),
            ));
        }
    }
    let (_, _, _, d, dv) = extents(&qs, &ks, &vs);
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !scale.is_finite() {
        return Err(shape_err(OP, format!("scale {scale} is not finite")));
    }
    if let Some((p, seed, _)) = dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(shape_err(
                OP,
                format!("dropout p must be in [0, 1), got {p}"),
            ));
        }
        let s = g.check_id(OP, seed)?;
        if s.numel() != 1 || g.dtype(seed) != DType::F32 {
            return Err(shape_err(
                OP,
                format!("the dropout seed must be one f32 element, got {s}"),
            ));
        }
    }
    if d > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
        let mut p = probabilities(g, q, k, mask, causal, scale)?;
        if let Some((pr, seed, salt)) = dropout {
            p = g.dropout(p, pr, seed, salt)?;
        }
        return g.matmul(p, v);
    }
    let zero = || g.constant(Tensor::zeros([1]));
    let mask = match (mask, &ms) {
        (Some(m), Some(s)) if mask_strides(&qs, &ks, s).is_some() => m,
        (Some(m), _) => g.expand(m, &score_shape(&qs, &ks))?,
        (None, _) => zero(),
    };
    let seed = dropout.map_or_else(zero, |(_, seed, _)| seed);
    let op = Attention {
        scale,
        causal,
        masked: ms.is_some(),
        dropout: dropout.map(|(p, _, salt)| Dropout { p, salt }),
        layout,
        lse: false,
    };
    g.push_op(Op::Attention(op), vec![q, k, v, mask, seed], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiles fit the workgroup memory they are chosen for, down to WebGPU's default 16 KiB
    /// at the widest head, are whole 4 x 4 blocks and never exceed the sequence's next power of
    /// two (at least 4).
    #[test]
    fn tiles_fit_the_adapter() {
        for limit in [16384u32, 32768, 49152] {
            for (d, dv) in [(1, 1), (8, 8), (64, 64), (13, 200), (128, 128), (256, 256)] {
                let t = tiles(1000, 1000, d, dv, limit);
                assert!(
                    tile_bytes(t, d, dv) <= limit as usize,
                    "{t:?}: D {d}, Dv {dv}"
                );
                assert!(
                    t.0.is_multiple_of(4) && t.1.is_multiple_of(4),
                    "{t:?}: whole 4 x 4 blocks"
                );
            }
        }
        assert_eq!(tiles(1000, 1000, 64, 64, 49152), (32, 32));
        assert_eq!(
            tiles(1, 1000, 64, 64, 49152),
            (4, 32),
            "one query: one row block"
        );
        assert_eq!(tiles(5, 3, 64, 64, 49152), (8, 4));
    }

    /// The backward kernels' tiles fit the workgroup memory they are chosen for, down to WebGPU's
    /// default 16 KiB at the widest head they take, and are whole 4 x 4 blocks.
    #[test]
    fn grad_tiles_fit_the_adapter() {
        let widest = MAX_BACKWARD_HEAD_DIM;
        for part in [GradPart::Stats, GradPart::KeyValue, GradPart::Query] {
            assert!(grad_tile_bytes(part, (4, 4), widest, widest) <= 16384);
            for limit in [16384u32, 32768, 49152] {
                for (d, dv) in [(1, 1), (8, 8), (64, 64), (13, 100), (widest, widest)] {
                    let t = grad_tiles(part, 1000, 1000, d, dv, limit);
                    assert!(
                        grad_tile_bytes(part, t, d, dv) <= limit as usize,
                        "{part:?} {t:?}: D {d}, Dv {dv}"
                    );
                    assert!(t.0.is_multiple_of(4) && t.1.is_multiple_of(4));
                }
            }
        }
        // head 64 on 48 KiB: 32 x 32 tiles for the statistics and dq, 16 queries x 32 keys
        // for dk and dv (their accumulators take the room)
        assert_eq!(
            grad_tiles(GradPart::Stats, 1000, 1000, 64, 64, 49152),
            (32, 32)
        );
        assert_eq!(
            grad_tiles(GradPart::Query, 1000, 1000, 64, 64, 49152),
            (32, 32)
        );
        assert_eq!(
            grad_tiles(GradPart::KeyValue, 1000, 1000, 64, 64, 49152),
            (16, 32)
        );
    }

    /// The profiler counts the pairs attended: all of them, or the causal triangle.
    #[test]
    fn cost_counts_attended_pairs() {
        let (q, k, v) = (
            Shape(vec![2, 4, 8]),
            Shape(vec![2, 6, 8]),
            Shape(vec![2, 6, 3]),
        );
        let out = Shape(vec![2, 4, 3]);
        let one = Shape(vec![1]);
        let shapes = [&q, &k, &v, &one, &one];
        let op = |causal| {
            Op::Attention(Attention {
                scale: 1.0,
                causal,
                masked: false,
                dropout: None,
                layout: Layout::Heads,
                lse: false,
            })
        };
        // 2 slices x (8 + 3) multiply-adds per pair
        assert_eq!(op(false).cost(&shapes, &out).0, 2.0 * 24.0 * 22.0);
        assert_eq!(op(true).cost(&shapes, &out).0, 2.0 * 10.0 * 22.0);
        let grad = |part| {
            let attention = Attention {
                scale: 1.0,
                causal: true,
                masked: false,
                dropout: None,
                layout: Layout::Heads,
                lse: false,
            };
            Op::AttentionGrad(AttentionGrad { attention, part })
        };
        // 20 pairs x 2 flops x the scores (8 multiply-adds); with dy v^T (3), dv (3) and dk
        // (8); with dy v^T and dq (8)
        let cost = |part| grad(part).cost(&shapes, &out).0;
        assert_eq!(cost(GradPart::Stats), 20.0 * 2.0 * 8.0);
        assert_eq!(cost(GradPart::KeyValue), 20.0 * 2.0 * 22.0);
        assert_eq!(cost(GradPart::Query), 20.0 * 2.0 * 19.0);
    }

    /// Masks whose leading axes fold into (outer, head) strides, and one that does not.
    #[test]
    fn mask_strides_fold_leading_axes() {
        let (q, k) = (Shape(vec![2, 3, 4, 5]), Shape(vec![2, 3, 6, 5]));
        let s = |d: &[usize]| mask_strides(&q, &k, &Shape(d.to_vec()));
        assert_eq!(s(&[4, 6]), Some([3, 0, 0, 6, 1]));
        assert_eq!(s(&[2, 1, 1, 6]), Some([3, 6, 0, 0, 1]));
        assert_eq!(s(&[3, 4, 6]), Some([3, 0, 24, 6, 1]));
        assert_eq!(s(&[2, 3, 4, 6]), Some([3, 72, 24, 6, 1]));
        let (q5, k5) = (Shape(vec![2, 3, 2, 4, 5]), Shape(vec![2, 3, 2, 6, 5]));
        assert_eq!(mask_strides(&q5, &k5, &Shape(vec![2, 1, 2, 4, 6])), None);
        assert_eq!(
            mask_strides(&q5, &k5, &Shape(vec![2, 3, 1, 4, 6])),
            Some([2, 24, 0, 6, 1])
        );
    }
}
