//! `torch.nn.functional`'s compositions of graph ops, each as torch computes it: one-hot
//! labels, triangles, tiling, `einsum`, padding by reflection, replication or wrapping, PReLU,
//! GLU, pixel shuffles, norms, normalization, cosine similarity and distances, buckets, NaN
//! checks, k-th values and medians, and the losses built from them (binary cross-entropy on
//! probabilities, margin ranking, triplet margin, soft margin, hinge and cosine embedding,
//! Poisson and Gaussian NLL). Their kernels are the ops they compose (the plan compiler fuses
//! the elementwise ones); their gradients come from autodiff.

use super::{Graph, NodeId};
use crate::error::{shape_err, Result};
use crate::tensor::{Shape, Tensor};

/// How [`Graph::pad_with`] fills the border (`torch.nn.functional.pad`'s `mode`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PadMode {
    /// A constant value (`mode="constant"`, [`Graph::pad`]).
    Constant(f32),
    /// The mirror image without the edge (`"reflect"`: `[a, b, c]` padded by 2 on the left
    /// is `[c, b, a, b, c]`); each pad smaller than its axis.
    Reflect,
    /// The edge repeated (`"replicate"`).
    Replicate,
    /// The other end of the axis (`"circular"`, wrapping); each pad at most its axis.
    Circular,
}

impl PadMode {
    /// The source position of output position `o` along an axis of `d` padded by `before`,
    /// or `None` where the mode cannot reach it.
    fn source(&self, o: isize, before: isize, d: isize) -> Option<isize> {
        let s = o - before;
        let src = match self {
            PadMode::Constant(_) => s,
            PadMode::Reflect if s < 0 => -s,
            PadMode::Reflect if s >= d => 2 * (d - 1) - s,
            PadMode::Reflect => s,
            PadMode::Replicate => s.clamp(0, d - 1),
            PadMode::Circular => s.rem_euclid(d),
        };
        (0..d).contains(&src).then_some(src)
    }
}

impl Graph {
    /// `torch.nn.functional.one_hot(labels, classes)` as f32: `labels (..)` (whole numbers
    /// stored as f32) -> `(.., classes)`, 1 at each label's class, else 0 (all zeros for a label
    /// outside `[0, classes)`, where torch raises). One comparison kernel; no gradient.
    pub fn one_hot(&self, labels: NodeId, classes: usize) -> Result<NodeId> {
        const OP: &str = "one_hot";
        let s = self.check_id(OP, labels)?;
        if classes == 0 {
            return Err(shape_err(OP, format!("labels {s}: expected classes >= 1")));
        }
        let mut dims = s.dims().to_vec();
        dims.push(1);
        let col = self.reshape(labels, &self.dims_isize(Shape(dims)))?;
        let classes_row = Tensor::new([classes], (0..classes).map(|c| c as f32).collect())?;
        self.eq(col, self.constant(classes_row))
    }

    /// `torch.tril(a, diagonal)`: the elements of the last two axes' matrices on and below the
    /// `diagonal`-th diagonal (0 the main one, positive above it), zeros elsewhere; one fused
    /// kernel (a constant mask), the gradient masked the same way.
    pub fn tril(&self, a: NodeId, diagonal: isize) -> Result<NodeId> {
        self.triangle("tril", a, |r, c| c - r <= diagonal)
    }

    /// `torch.triu(a, diagonal)`: on and above the `diagonal`-th diagonal, as [`Graph::tril`].
    pub fn triu(&self, a: NodeId, diagonal: isize) -> Result<NodeId> {
        self.triangle("triu", a, |r, c| c - r >= diagonal)
    }

    /// `a` where `keep(row, column)` over its last two axes, else exactly 0.
    fn triangle(
        &self,
        op: &'static str,
        a: NodeId,
        keep: impl Fn(isize, isize) -> bool,
    ) -> Result<NodeId> {
        let s = self.check_id(op, a)?;
        if s.rank() < 2 {
            return Err(shape_err(op, format!("a {s}: expected rank >= 2")));
        }
        let (r, c) = (s.dims()[s.rank() - 2], s.dims()[s.rank() - 1]);
        let drop: Vec<f32> = (0..r * c)
            .map(|i| (!keep((i / c) as isize, (i % c) as isize)) as u8 as f32)
            .collect();
        let mask = self.constant(Tensor::new([r, c], drop)?);
        self.masked_fill(a, mask, 0.0)
    }

    /// `a.repeat(*reps)` (`torch.Tensor.repeat`, numpy's `tile`): `a` tiled `reps[i]` times
    /// along axis `i`; `reps` may be longer than `a`'s rank (leading axes added). A broadcast
    /// and a reshape (one copy kernel); the gradient sums the tiles.
    pub fn repeat(&self, a: NodeId, reps: &[usize]) -> Result<NodeId> {
        const OP: &str = "repeat";
        let s = self.check_id(OP, a)?;
        if reps.len() < s.rank() || reps.contains(&0) {
            return Err(shape_err(
                OP,
                format!("a {s} by {reps:?}: expected one count >= 1 per axis at least"),
            ));
        }
        let lead = reps.len() - s.rank();
        let dims: Vec<usize> = std::iter::repeat_n(1, lead)
            .chain(s.dims().iter().copied())
            .collect();
        // (r0, d0, r1, d1, ..): each axis behind its count, broadcast along the counts
        let mut split = Vec::new();
        let mut wide = Vec::new();
        let mut out = Vec::new();
        for (&r, &d) in reps.iter().zip(&dims) {
            split.extend([1, d as isize]);
            wide.extend([r, d]);
            out.push((r * d) as isize);
        }
        let x = self.reshape(a, &split)?;
        let x = self.expand(x, &Shape(wide))?;
        self.reshape(x, &out)
    }

    /// `torch.repeat_interleave(a, repeats, axis)` with one count: each slice along `axis`
    /// repeated `repeats` times in place (`[a, b]` -> `[a, a, b, b]`). A broadcast and a
    /// reshape; the gradient sums the copies.
    pub fn repeat_interleave(&self, a: NodeId, repeats: usize, axis: isize) -> Result<NodeId> {
        const OP: &str = "repeat_interleave";
        let s = self.check_id(OP, a)?;
        let ax = s.axis(OP, axis)?;
        if repeats == 0 {
            return Err(shape_err(OP, format!("a {s}: expected repeats >= 1")));
        }
        let mut with = s.dims().to_vec();
        with.insert(ax + 1, 1);
        let x = self.reshape(a, &self.dims_isize(Shape(with.clone())))?;
        with[ax + 1] = repeats;
        let x = self.expand(x, &Shape(with))?;
        let mut out = s.dims().to_vec();
        out[ax] *= repeats;
        self.reshape(x, &self.dims_isize(Shape(out)))
    }

    /// `torch.nn.functional.pad(a, pads, mode)`: `pads` as torch's (pairs from the last axis
    /// backwards, `(before, after)`), the border filled as `mode` says. The constant mode is
    /// [`Graph::pad`]; the others are one [`Graph::index_select`] per padded axis with the
    /// source positions as a constant (their gradient adds each border element back into the
    /// one it copies, deterministically). Pads are non-negative; reflection needs each smaller
    /// than its axis and wrapping at most its axis, as torch's.
    pub fn pad_with(&self, a: NodeId, pads: &[(isize, isize)], mode: PadMode) -> Result<NodeId> {
        const OP: &str = "pad";
        if let PadMode::Constant(v) = mode {
            return self.pad(a, pads, v);
        }
        let s = self.check_id(OP, a)?;
        if pads.len() > s.rank() {
            return Err(shape_err(
                OP,
                format!("{} axis pairs for {s} of rank {}", pads.len(), s.rank()),
            ));
        }
        let mut x = a;
        for (k, &(before, after)) in pads.iter().enumerate() {
            let axis = s.rank() - 1 - k;
            let d = s.dims()[axis] as isize;
            if before == 0 && after == 0 {
                continue;
            }
            let len = d + before + after;
            let limit = match mode {
                PadMode::Reflect => d - 1,
                PadMode::Circular => d,
                _ => isize::MAX,
            };
            let fits = (0..=limit).contains(&before) && (0..=limit).contains(&after);
            let src: Option<Vec<f32>> = fits
                .then(|| {
                    (0..len)
                        .map(|o| mode.source(o, before, d).map(|p| p as f32))
                        .collect()
                })
                .flatten();
            let Some(src) = src else {
                return Err(shape_err(
                    OP,
                    format!(
                        "{mode:?} padding ({before}, {after}) of axis {axis} of {s}: expected \
                         non-negative pads{}",
                        match mode {
                            PadMode::Reflect => " smaller than the axis",
                            PadMode::Circular => " no larger than the axis",
                            _ => "",
                        }
                    ),
                ));
            };
            let index = self.constant(Tensor::new([len as usize], src)?);
            x = self.index_select(x, axis as isize, index)?;
        }
        Ok(x)
    }

    /// `torch.nn.functional.prelu(a, weight)`: `a` where `a > 0`, else `weight * a`, with
    /// `weight (1)` shared or `(C)` one per channel (axis 1 of `a (N, C, ..)`, or the last axis
    /// of a `(C)` vector). One fused kernel; the gradient for `a` is 1 or the slope (the slope
    /// at 0, as torch's), for the weight the sum of `a * dy` where `a <= 0`.
    pub fn prelu(&self, a: NodeId, weight: NodeId) -> Result<NodeId> {
        const OP: &str = "prelu";
        let (s, sw) = (self.check_id(OP, a)?, self.check_id(OP, weight)?);
        let c = sw.numel();
        let channels = match s.rank() {
            0 => 1,
            1 => s.dims()[0],
            _ => s.dims()[1],
        };
        if sw.rank() != 1 || (c != 1 && c != channels) {
            return Err(shape_err(
                OP,
                format!("input {s} and weight {sw}: expected a weight of 1 or {channels} values"),
            ));
        }
        // the weight along axis 1: (C, 1, ..) against (N, C, ..)
        let w = match (c, s.rank()) {
            (1, _) | (_, 0..=1) => weight,
            (_, r) => {
                let mut dims = vec![c as isize];
                dims.extend(std::iter::repeat_n(1, r - 2));
                self.reshape(weight, &dims)?
            }
        };
        let w = self.cast(w, self.dtype(a))?;
        let positive = self.gt(a, self.scalar(0.0))?;
        self.where_cond(positive, a, self.mul(w, a)?)
    }

    /// 1 where `a` is NaN, else 0 (`torch.isnan` as f32), from the bits; no gradient.
    pub fn isnan(&self, a: NodeId) -> Result<NodeId> {
        self.unary(crate::ops::unary::UnaryOp::IsNan, a)
    }

    /// 1 where `a` is infinite, else 0 (`torch.isinf` as f32); no gradient.
    pub fn isinf(&self, a: NodeId) -> Result<NodeId> {
        self.unary(crate::ops::unary::UnaryOp::IsInf, a)
    }

    /// 1 where `a` is finite, else 0 (`torch.isfinite` as f32); no gradient.
    pub fn isfinite(&self, a: NodeId) -> Result<NodeId> {
        self.rsub_scalar(self.add(self.isnan(a)?, self.isinf(a)?)?, 1.0)
    }

    /// `torch.nan_to_num(a, nan, posinf, neginf)`: NaN, +inf and -inf replaced (torch's
    /// defaults: 0 and the largest and lowest finite f32); the gradient passes where `a` is
    /// finite. One fused kernel.
    pub fn nan_to_num(&self, a: NodeId, nan: f32, posinf: f32, neginf: f32) -> Result<NodeId> {
        let y = self.masked_fill(a, self.isnan(a)?, nan)?;
        let inf = self.isinf(a)?;
        let positive = self.mul(inf, self.gt(a, self.scalar(0.0))?)?;
        let y = self.masked_fill(y, positive, posinf)?;
        let negative = self.sub(inf, positive)?;
        self.masked_fill(y, negative, neginf)
    }

    /// `torch.kthvalue(a, k, axis)`: the `k`-th smallest element along `axis` (1-based) and its
    /// position, `(values, indices)` with the axis removed (`keepdim` keeps it as 1). NaN
    /// counts as the largest, as torch sorts it. [`Graph::topk`] of the `k` smallest, then the
    /// last of them.
    pub fn kthvalue(
        &self,
        a: NodeId,
        k: usize,
        axis: isize,
        keepdim: bool,
    ) -> Result<(NodeId, NodeId)> {
        let s = self.check_id("kthvalue", a)?;
        let ax = s.axis("kthvalue", axis)?;
        let (v, i) = self.topk(a, k, ax as isize, false)?;
        let last = |x: NodeId| -> Result<NodeId> {
            let x = self.narrow(x, ax as isize, k - 1, 1)?;
            match keepdim {
                true => Ok(x),
                false => self.squeeze_axis(x, ax),
            }
        };
        Ok((last(v)?, last(i)?))
    }

    /// `torch.median(a, axis)`: the lower median along `axis` (the `(C + 1) / 2`-th smallest)
    /// and its position; a row holding NaN gives NaN and the position of its first NaN, as
    /// torch's (`nanmedian` would skip them).
    pub fn median(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<(NodeId, NodeId)> {
        let s = self.check_id("median", a)?;
        let ax = s.axis("median", axis)?;
        let c = s.dims()[ax];
        let (v, i) = self.kthvalue(a, c.div_ceil(2), ax as isize, keepdim)?;
        // the largest in top-k order is the first NaN where there is one
        let (top, top_i) = self.topk(a, 1, ax as isize, true)?;
        let (top, top_i) = match keepdim {
            true => (top, top_i),
            false => (self.squeeze_axis(top, ax)?, self.squeeze_axis(top_i, ax)?),
        };
        let nan = self.isnan(top)?;
        Ok((
            self.where_cond(nan, top, v)?,
            self.where_cond(nan, top_i, i)?,
        ))
    }

    /// `x` without its axis `ax` (of extent 1); a rank-1 `x` becomes `(1)`.
    fn squeeze_axis(&self, x: NodeId, ax: usize) -> Result<NodeId> {
        let mut d: Vec<isize> = self.dims_isize(self.shape(x));
        if d.len() > 1 {
            d.remove(ax);
        }
        self.reshape(x, &d)
    }

    /// `torch.einsum(spec, operands)` for one or two operands: `"bij,bjk->bik"`, `"bhqd,bhkd->
    /// bhqk"`, `"i,j->ij"`, `"ij->ji"`, `"ij->"`, or without `->` torch's implicit output (the
    /// indices that appear once, in alphabetical order). Letters are indices; an index that
    /// appears in one operand only and not in the output is summed first. Two operands become
    /// one batched [`Graph::matmul_t`] (indices in both operands and the output: batch; in both
    /// but not the output: contracted) between permutes and reshapes that are skipped where the
    /// operands already lie in that order. Not supported (an error): more than two operands,
    /// an index repeated within an operand (a diagonal), `...`.
    pub fn einsum(&self, spec: &str, operands: &[NodeId]) -> Result<NodeId> {
        const OP: &str = "einsum";
        let bad = |why: String| Err(shape_err(OP, format!("{spec:?}: {why}")));
        let (lhs, out) = match spec.split_once("->") {
            Some((l, o)) => (l, Some(o.trim())),
            None => (spec, None),
        };
        let terms: Vec<Vec<char>> = lhs.split(',').map(|t| t.trim().chars().collect()).collect();
        if terms.len() != operands.len() || !(1..=2).contains(&terms.len()) {
            return bad(format!(
                "{} terms for {} operands: one or two of each",
                terms.len(),
                operands.len()
            ));
        }
        let shapes: Vec<Shape> = operands
            .iter()
            .map(|&o| self.check_id(OP, o))
            .collect::<Result<_>>()?;
        // each index's extent, checked across the operands
        let mut extent: Vec<(char, usize)> = Vec::new();
        for (t, s) in terms.iter().zip(&shapes) {
            if t.len() != s.rank() || t.iter().any(|c| !c.is_ascii_alphabetic()) {
                return bad(format!(
                    "term {:?} for an operand {s}",
                    t.iter().collect::<String>()
                ));
            }
            for (k, &c) in t.iter().enumerate() {
                if t[..k].contains(&c) {
                    return bad(format!(
                        "index {c:?} repeats within an operand (a diagonal)"
                    ));
                }
                match extent.iter().find(|e| e.0 == c) {
                    Some(&(_, d)) if d != s.dims()[k] => {
                        return bad(format!("index {c:?} is {d} and {}", s.dims()[k]));
                    }
                    Some(_) => {}
                    None => extent.push((c, s.dims()[k])),
                }
            }
        }
        let count = |c: char| terms.iter().filter(|t| t.contains(&c)).count();
        let out: Vec<char> = match out {
            Some(o) => o.chars().collect(),
            None => {
                let mut once: Vec<char> = extent
                    .iter()
                    .map(|e| e.0)
                    .filter(|&c| count(c) == 1)
                    .collect();
                once.sort_unstable();
                once
            }
        };
        for (k, &c) in out.iter().enumerate() {
            if out[..k].contains(&c) || !extent.iter().any(|e| e.0 == c) {
                return bad(format!(
                    "output index {c:?} repeats or names no input index"
                ));
            }
        }
        let dim = |c: char| extent.iter().find(|e| e.0 == c).map_or(1, |e| e.1);
        // sum what one operand alone has and the output lacks
        let mut ops: Vec<(NodeId, Vec<char>)> = Vec::new();
        for (&o, t) in operands.iter().zip(&terms) {
            let (mut x, mut t) = (o, t.clone());
            while let Some(k) = t.iter().position(|&c| count(c) == 1 && !out.contains(&c)) {
                x = self.sum(x, k as isize, false)?;
                t.remove(k);
            }
            ops.push((x, t));
        }
        // `x` with its indices `from` put in the order `to`
        let arrange = |x: NodeId, from: &[char], to: &[char]| -> Result<NodeId> {
            let perm: Vec<usize> = to
                .iter()
                .map(|c| from.iter().position(|f| f == c).expect("an index of x"))
                .collect();
            match perm.iter().enumerate().all(|(i, &p)| i == p) {
                true => Ok(x),
                false => self.permute(x, &perm),
            }
        };
        let size = |idx: &[char]| idx.iter().map(|&c| dim(c)).product::<usize>() as isize;
        let dims_of = |idx: &[char]| idx.iter().map(|&c| dim(c) as isize).collect::<Vec<_>>();
        let (y, y_idx) = if ops.len() == 1 {
            let (x, t) = ops.remove(0);
            (x, t)
        } else {
            let (b, tb) = ops.pop().expect("two operands");
            let (a, ta) = ops.pop().expect("two operands");
            let of = |t: &[char], keep: &dyn Fn(char) -> bool| -> Vec<char> {
                t.iter().copied().filter(|&c| keep(c)).collect()
            };
            let batch = of(&ta, &|c| tb.contains(&c) && out.contains(&c));
            let contract = of(&ta, &|c| tb.contains(&c) && !out.contains(&c));
            let left = of(&ta, &|c| !tb.contains(&c));
            let right = of(&tb, &|c| !ta.contains(&c));
            let cat = |parts: &[&[char]]| parts.concat();
            // each operand as [batch, rows, cols], transposed where that is its own order
            let a_plain = cat(&[&batch, &left, &contract]);
            let a_trans = cat(&[&batch, &contract, &left]);
            let trans_a = a_plain != ta && a_trans == ta;
            let b_plain = cat(&[&batch, &contract, &right]);
            let b_trans = cat(&[&batch, &right, &contract]);
            let trans_b = b_plain != tb && b_trans == tb;
            let (nb, nl, nk, nr) = (size(&batch), size(&left), size(&contract), size(&right));
            let a3 = match trans_a {
                true => self.reshape(arrange(a, &ta, &a_trans)?, &[nb, nk, nl])?,
                false => self.reshape(arrange(a, &ta, &a_plain)?, &[nb, nl, nk])?,
            };
            let b3 = match trans_b {
                true => self.reshape(arrange(b, &tb, &b_trans)?, &[nb, nr, nk])?,
                false => self.reshape(arrange(b, &tb, &b_plain)?, &[nb, nk, nr])?,
            };
            let y = self.matmul_t(a3, b3, trans_a, trans_b)?;
            let idx = cat(&[&batch, &left, &right]);
            match idx.is_empty() {
                true => (self.reshape(y, &[1])?, idx),
                false => (self.reshape(y, &dims_of(&idx))?, idx),
            }
        };
        // the output's order, then its shape (a scalar output is `(1)`)
        let y = arrange(y, &y_idx, &out)?;
        match out.is_empty() {
            true => self.reshape(y, &[1]),
            false => Ok(y),
        }
    }

    /// `torch.nn.functional.pixel_shuffle(a, r)`: `(N, C r^2, H, W)` -> `(N, C, H r, W r)`,
    /// output pixel `(h r + i, w r + j)` of channel `c` from input channel `c r^2 + i r + j`
    /// (a sub-pixel convolution's upsampling). A reshape, a permute and a reshape: one copy.
    pub fn pixel_shuffle(&self, a: NodeId, r: usize) -> Result<NodeId> {
        const OP: &str = "pixel_shuffle";
        let s = self.check_id(OP, a)?;
        let d = s.dims();
        if s.rank() != 4 || r == 0 || d[1] % (r * r) != 0 {
            return Err(shape_err(
                OP,
                format!("input {s} by {r}: expected (N, C r^2, H, W) with r >= 1"),
            ));
        }
        let (n, c, h, w, r) = (d[0], d[1] / (r * r), d[2], d[3], r);
        let x = self.reshape(a, &self.dims_isize(Shape(vec![n, c, r, r, h, w])))?;
        let x = self.permute(x, &[0, 1, 4, 2, 5, 3])?;
        self.reshape(x, &self.dims_isize(Shape(vec![n, c, h * r, w * r])))
    }

    /// `torch.nn.functional.pixel_unshuffle(a, r)`: the inverse of [`Graph::pixel_shuffle`],
    /// `(N, C, H r, W r)` -> `(N, C r^2, H, W)`.
    pub fn pixel_unshuffle(&self, a: NodeId, r: usize) -> Result<NodeId> {
        const OP: &str = "pixel_unshuffle";
        let s = self.check_id(OP, a)?;
        let d = s.dims();
        if s.rank() != 4 || r == 0 || d[2] % r != 0 || d[3] % r != 0 {
            return Err(shape_err(
                OP,
                format!("input {s} by {r}: expected (N, C, H r, W r) with r >= 1"),
            ));
        }
        let (n, c, h, w) = (d[0], d[1], d[2] / r, d[3] / r);
        let x = self.reshape(a, &self.dims_isize(Shape(vec![n, c, h, r, w, r])))?;
        let x = self.permute(x, &[0, 1, 3, 5, 2, 4])?;
        self.reshape(x, &self.dims_isize(Shape(vec![n, c * r * r, h, w])))
    }

    /// The `p`-norm over `axis` (`torch.linalg.vector_norm(a, p, axis, keepdim)`), `p > 0`:
    /// `sqrt(sum(a^2))` for 2, `sum(|a|)` for 1, else `sum(|a|^p)^(1/p)`. One reduction kernel
    /// with the powers in its loads and the root in its store.
    pub fn norm(&self, a: NodeId, p: f32, axis: isize, keepdim: bool) -> Result<NodeId> {
        if !(p > 0.0 && p.is_finite()) {
            return Err(shape_err(
                "norm",
                format!("p must be positive and finite, got {p}"),
            ));
        }
        if p == 2.0 {
            return self.sqrt(self.sum(self.square(a)?, axis, keepdim)?);
        }
        if p == 1.0 {
            return self.sum(self.abs(a)?, axis, keepdim);
        }
        let powered = self.pow_scalar(self.abs(a)?, p)?;
        self.pow_scalar(self.sum(powered, axis, keepdim)?, 1.0 / p)
    }

    /// `torch.nn.functional.normalize(a, p, axis, eps)`: `a / max(||a||_p, eps)` over `axis`
    /// (torch's defaults: `p = 2`, `axis = 1`, `eps = 1e-12`).
    pub fn normalize(&self, a: NodeId, p: f32, axis: isize, eps: f32) -> Result<NodeId> {
        let n = self.norm(a, p, axis, true)?;
        self.div(a, self.clamp(n, eps, f32::MAX)?)
    }

    /// `torch.nn.functional.cosine_similarity(a, b, axis, eps)`: `sum(a b) / (max(||a||, eps)
    /// max(||b||, eps))` over `axis`, `a` and `b` broadcast together (torch's default `eps`:
    /// 1e-8).
    pub fn cosine_similarity(&self, a: NodeId, b: NodeId, axis: isize, eps: f32) -> Result<NodeId> {
        let na = self.clamp(self.norm(a, 2.0, axis, false)?, eps, f32::MAX)?;
        let nb = self.clamp(self.norm(b, 2.0, axis, false)?, eps, f32::MAX)?;
        self.div(self.sum(self.mul(a, b)?, axis, false)?, self.mul(na, nb)?)
    }

    /// `torch.nn.functional.pairwise_distance(a, b, p, eps)`: `||a - b + eps||_p` over the
    /// last axis (torch's defaults: `p = 2`, `eps = 1e-6`).
    pub fn pairwise_distance(&self, a: NodeId, b: NodeId, p: f32, eps: f32) -> Result<NodeId> {
        self.norm(self.add_scalar(self.sub(a, b)?, eps)?, p, -1, false)
    }

    /// `torch.cdist(a, b, p)`: the `p`-norm distances between the rows of `a (.., P, M)` and
    /// those of `b (.., R, M)`, `(.., P, R)`. For `p = 2` torch's matrix form,
    /// `sqrt(max(|a|^2 + |b|^2 - 2 a b^T, 0))` (one product), whose gradient at a distance of 0
    /// (a row against itself) is 0, as torch's; for other `p` the differences of every pair,
    /// broadcast, and their norm.
    pub fn cdist(&self, a: NodeId, b: NodeId, p: f32) -> Result<NodeId> {
        const OP: &str = "cdist";
        let (sa, sb) = (self.check_id(OP, a)?, self.check_id(OP, b)?);
        let (ra, rb) = (sa.rank(), sb.rank());
        if ra < 2 || ra != rb || sa.dims()[ra - 1] != sb.dims()[rb - 1] {
            return Err(shape_err(
                OP,
                format!("a {sa} and b {sb}: expected (.., P, M) and (.., R, M)"),
            ));
        }
        if p == 2.0 {
            let na = self.sum(self.square(a)?, -1, true)?;
            let nb = self.transpose(self.sum(self.square(b)?, -1, true)?, -1, -2)?;
            let ab = self.matmul_t(a, b, false, true)?;
            let d2 = self.sub(self.add(na, nb)?, self.mul_scalar(ab, 2.0)?)?;
            // the root differentiated only where the squared distance is positive: elsewhere
            // it reads 1 under a mask, so no 1 / 0 reaches the gradient
            let positive = self.gt(d2, self.scalar(0.0))?;
            let safe = self.where_cond(positive, d2, self.scalar(1.0))?;
            return self.where_cond(positive, self.sqrt(safe)?, self.scalar(0.0));
        }
        // (.., P, 1, M) - (.., 1, R, M)
        let mut da = self.dims_isize(sa.clone());
        da.insert(ra - 1, 1);
        let mut db = self.dims_isize(sb.clone());
        db.insert(rb - 2, 1);
        let diff = self.sub(self.reshape(a, &da)?, self.reshape(b, &db)?)?;
        self.norm(diff, p, -1, false)
    }

    /// `torch.bucketize(x, boundaries, right)`: for each element of `x` the index of its bucket
    /// among the increasing `boundaries (B)`, as f32: the count of boundaries below it (`right`:
    /// at or below it), so `b[i - 1] < x <= b[i]` gives `i`. One reduction kernel with the
    /// comparisons in its loads; no gradient.
    pub fn bucketize(&self, x: NodeId, boundaries: NodeId, right: bool) -> Result<NodeId> {
        const OP: &str = "bucketize";
        let (sx, sb) = (self.check_id(OP, x)?, self.check_id(OP, boundaries)?);
        if sb.rank() != 1 {
            return Err(shape_err(OP, format!("boundaries {sb}: expected one axis")));
        }
        let mut d = self.dims_isize(sx);
        d.push(1);
        let column = self.reshape(x, &d)?;
        let below = match right {
            true => self.le(boundaries, column)?,
            false => self.lt(boundaries, column)?,
        };
        self.sum(below, -1, false)
    }

    /// Binary cross-entropy on probabilities (`torch.nn.functional.binary_cross_entropy`),
    /// mean, shape `[1]`: `-(y log(p) + (1 - y) log(1 - p))` with each log clamped at -100 as
    /// torch's, so a saturated probability gives 100, not inf. The gradient is torch's,
    /// `(p - y) / (p (1 - p))`, where `p` and `1 - p` exceed 1e-12; within 1e-12 of 0 or 1 a
    /// log's gradient is 0 (torch divides by `max(p (1 - p), 1e-12)` instead), so that it
    /// stays finite. Prefer [`Graph::bce_with_logits`] on logits, which never saturates. f16
    /// operands are cast to f32 first.
    pub fn binary_cross_entropy(&self, probs: NodeId, target: NodeId) -> Result<NodeId> {
        let (p, y) = self.regression_operands("binary_cross_entropy", probs, target)?;
        let log_p = self.clamped_log(p)?;
        let log_q = self.clamped_log(self.rsub_scalar(p, 1.0)?)?;
        // y log p + (1 - y) log q = y (log p - log q) + log q
        let ll = self.add(self.mul(y, self.sub(log_p, log_q)?)?, log_q)?;
        self.neg(self.mean_all(ll)?)
    }

    /// `max(log(v), -100)` (torch's clamped log), differentiated only where `v > 1e-12`: below,
    /// the value is detached, so no `0 / 0` reaches the gradient where `v` is 0.
    fn clamped_log(&self, v: NodeId) -> Result<NodeId> {
        const SMALL: f32 = 1e-12;
        let ok = self.gt(v, self.scalar(SMALL))?;
        // v where it is differentiated, 1 elsewhere (a log of 1 with gradient 0)
        let safe = self.where_cond(ok, v, self.scalar(1.0))?;
        let small = self.detach(self.clamp(self.log(v)?, -100.0, f32::MAX)?)?;
        self.where_cond(ok, self.log(safe)?, small)
    }

    /// `torch.nn.functional.glu(a, axis)`: the first half of `a` along `axis` times the sigmoid
    /// of the second (an even extent). One fused kernel.
    pub fn glu(&self, a: NodeId, axis: isize) -> Result<NodeId> {
        let s = self.check_id("glu", a)?;
        let ax = s.axis("glu", axis)?;
        let d = s.dims()[ax];
        if d % 2 != 0 {
            return Err(shape_err(
                "glu",
                format!("input {s}: axis {ax} has the odd extent {d}"),
            ));
        }
        let halves = self.split(a, ax as isize, &[d / 2, d / 2])?;
        self.mul(halves[0], self.sigmoid(halves[1])?)
    }

    /// `torch.nn.functional.soft_margin_loss(x, y)`: `mean(log(1 + exp(-y x)))`, `y` of -1 and 1.
    pub fn soft_margin_loss(&self, x: NodeId, y: NodeId) -> Result<NodeId> {
        let (x, y) = self.regression_operands("soft_margin_loss", x, y)?;
        self.mean_all(self.softplus(self.neg(self.mul(y, x)?)?)?)
    }

    /// `torch.nn.functional.multilabel_soft_margin_loss(x, y)` over `(N, C)`: the mean over
    /// the classes and the rows of `-(y log sigmoid(x) + (1 - y) log sigmoid(-x))`, which is
    /// [`Graph::bce_with_logits`].
    pub fn multilabel_soft_margin_loss(&self, x: NodeId, y: NodeId) -> Result<NodeId> {
        let s = self.check_id("multilabel_soft_margin_loss", x)?;
        if s.rank() != 2 {
            return Err(shape_err(
                "multilabel_soft_margin_loss",
                format!("input {s}: expected (N, C)"),
            ));
        }
        self.bce_with_logits(x, y)
    }

    /// `torch.nn.functional.hinge_embedding_loss(x, y, margin)`: the mean of `x` where `y` is
    /// 1 and `max(0, margin - x)` where it is -1.
    pub fn hinge_embedding_loss(&self, x: NodeId, y: NodeId, margin: f32) -> Result<NodeId> {
        let (x, y) = self.regression_operands("hinge_embedding_loss", x, y)?;
        let similar = self.eq(y, self.scalar(1.0))?;
        let apart = self.relu(self.rsub_scalar(x, margin)?)?;
        self.mean_all(self.where_cond(similar, x, apart)?)
    }

    /// `torch.nn.functional.cosine_embedding_loss(a, b, y, margin)` over rows `(N, D)`: with
    /// torch's `cos = sum(a b) / sqrt((sum(a^2) + 1e-12) (sum(b^2) + 1e-12))` per row, the mean
    /// of `1 - cos` where `y` is 1 and `max(0, cos - margin)` where it is -1.
    pub fn cosine_embedding_loss(
        &self,
        a: NodeId,
        b: NodeId,
        y: NodeId,
        margin: f32,
    ) -> Result<NodeId> {
        let (a, b) = self.regression_operands("cosine_embedding_loss", a, b)?;
        let sq = |v: NodeId| self.add_scalar(self.sum(self.square(v)?, -1, false)?, 1e-12);
        let mag = self.sqrt(self.mul(sq(a)?, sq(b)?)?)?;
        let cos = self.div(self.sum(self.mul(a, b)?, -1, false)?, mag)?;
        let similar = self.eq(y, self.scalar(1.0))?;
        let apart = self.relu(self.add_scalar(cos, -margin)?)?;
        self.mean_all(self.where_cond(similar, self.rsub_scalar(cos, 1.0)?, apart)?)
    }

    /// `torch.nn.functional.poisson_nll_loss(x, target, log_input, full, eps=1e-8)`, mean:
    /// `exp(x) - target x` with `log_input`, else `x - target log(x + eps)`; with `full` the
    /// Stirling term `target log(target) - target + log(2 pi target) / 2` where `target > 1`.
    pub fn poisson_nll_loss(
        &self,
        x: NodeId,
        target: NodeId,
        log_input: bool,
        full: bool,
    ) -> Result<NodeId> {
        let (x, t) = self.regression_operands("poisson_nll_loss", x, target)?;
        let mut loss = match log_input {
            true => self.sub(self.exp(x)?, self.mul(t, x)?)?,
            false => self.sub(x, self.mul(t, self.log(self.add_scalar(x, 1e-8)?)?)?)?,
        };
        if full {
            // over target > 1 only: elsewhere the log reads 1 (the term is masked anyway)
            let big = self.gt(t, self.scalar(1.0))?;
            let safe = self.where_cond(big, t, self.scalar(1.0))?;
            let two_pi = 2.0 * std::f32::consts::PI;
            let stirling = self.add(
                self.sub(self.mul(safe, self.log(safe)?)?, safe)?,
                self.mul_scalar(self.log(self.mul_scalar(safe, two_pi)?)?, 0.5)?,
            )?;
            loss = self.add(loss, self.mul(big, stirling)?)?;
        }
        self.mean_all(loss)
    }

    /// `torch.nn.functional.gaussian_nll_loss(x, target, var, full, eps=1e-6)`, mean:
    /// `(log(var) + (x - target)^2 / var) / 2`, plus `log(2 pi) / 2` with `full`; `var`
    /// broadcasts against `x` (one per element, or per row as `(N, 1)`), its values clamped to
    /// at least `eps` with the gradient passing as though they were not, as torch's.
    pub fn gaussian_nll_loss(
        &self,
        x: NodeId,
        target: NodeId,
        var: NodeId,
        full: bool,
    ) -> Result<NodeId> {
        let (x, t) = self.regression_operands("gaussian_nll_loss", x, target)?;
        let var = self.cast(var, crate::tensor::DType::F32)?;
        let clamped = self.clamp(var, 1e-6, f32::MAX)?;
        let v = self.add(var, self.detach(self.sub(clamped, var)?)?)?;
        let d = self.sub(x, t)?;
        let loss = self.add(self.log(v)?, self.div(self.square(d)?, v)?)?;
        let loss = self.mul_scalar(loss, 0.5)?;
        let loss = match full {
            true => self.add_scalar(loss, 0.5 * (2.0 * std::f32::consts::PI).ln())?,
            false => loss,
        };
        self.mean_all(loss)
    }

    /// `torch.nn.functional.margin_ranking_loss(a, b, y, margin)`: `mean(max(0, -y (a - b) +
    /// margin))`, `y` of 1 where `a` should rank higher and -1 where `b` should.
    pub fn margin_ranking_loss(
        &self,
        a: NodeId,
        b: NodeId,
        y: NodeId,
        margin: f32,
    ) -> Result<NodeId> {
        let (a, b) = self.regression_operands("margin_ranking_loss", a, b)?;
        let d = self.mul(self.neg(y)?, self.sub(a, b)?)?;
        self.mean_all(self.relu(self.add_scalar(d, margin)?)?)
    }

    /// `torch.nn.functional.triplet_margin_loss(anchor, positive, negative, margin, p, eps,
    /// swap=False)`: `mean(max(d(anchor, positive) - d(anchor, negative) + margin, 0))` with
    /// `d` [`Graph::pairwise_distance`] over the last axis (torch's defaults: `margin = 1`,
    /// `p = 2`, `eps = 1e-6`).
    pub fn triplet_margin_loss(
        &self,
        anchor: NodeId,
        positive: NodeId,
        negative: NodeId,
        margin: f32,
        p: f32,
        eps: f32,
    ) -> Result<NodeId> {
        let dp = self.pairwise_distance(anchor, positive, p, eps)?;
        let dn = self.pairwise_distance(anchor, negative, p, eps)?;
        self.mean_all(self.relu(self.add_scalar(self.sub(dp, dn)?, margin)?)?)
    }
}
