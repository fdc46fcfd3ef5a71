//! Picking elements by index along an axis, as `torch.gather(x, axis, index)` and
//! `torch.index_select(x, axis, index)`, its adjoint (`scatter_add_` / `index_add_` into zeros:
//! the gradient), the cumulative sum along an axis (`torch.cumsum`), and the positions of each
//! row's largest elements (`torch.topk`, `torch.sort`: [`TopK`]'s passes for a few, else a
//! sort of the rows, [`SortBlocks`] then [`MergeRuns`]).
//! Kernels: `shaders/index.wgsl`.
//!
//! Indices are whole numbers stored as f32 (as class labels and embedding indices); one that is
//! not an integer in `[0, K)` gives NaN, and adds nowhere in the gradient. Around the axis a
//! tensor is `(outer, K, inner)`: `x` has `K` along it, the indices and the output `J`.

use super::reduce::split_at_axis;
use super::{groups, KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// `x`, `index` -> the elements of `x` the index names along `axis`. Gather (`select` false):
/// `index` has `x`'s rank and extents but along `axis` (`J` there), and so has the output:
/// `out[.., j, ..] = x[.., index[.., j, ..], ..]`. Index select (`select` true): `index (J)`,
/// the output is `x`'s shape with `J` along `axis`: `out[.., j, ..] = x[.., index[j], ..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gather {
    pub axis: usize,
    pub select: bool,
}

/// The gradient of [`Gather`] for `x`: `index`, `dy` (the gather's output shape) -> `dx` of
/// `x`'s shape, each element the sum of the `dy` elements whose index names it, in index
/// order. `k` is `x`'s extent along the axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GatherBackward {
    pub gather: Gather,
    pub k: usize,
}

/// The cumulative sum along `axis` (`torch.cumsum`), or with `reverse` from the end (its
/// backward: `dx[k] = dy[k] + .. + dy[K - 1]`). Accumulated in f32 on the GPU, in f64 on the
/// CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cumsum {
    pub axis: usize,
    pub reverse: bool,
}

/// The position `x` names among `k`, if it is a whole number in `[0, k)`.
fn position(x: f32, k: usize) -> Option<usize> {
    (x >= 0.0 && x < k as f32 && x.fract() == 0.0).then_some(x as usize)
}

impl Gather {
    fn name(&self) -> &'static str {
        match self.select {
            true => "index_select",
            false => "gather",
        }
    }

    /// Shape rule: see [`Gather`]; the axis must be in range (checked by the graph).
    pub fn infer(&self, x: &Shape, index: &Shape) -> Result<Shape> {
        let (op, ax) = (self.name(), self.axis);
        let bad = |why: &str| {
            Err(shape_err(
                op,
                format!("x {x} and index {index} (axis {ax}): {why}"),
            ))
        };
        if ax >= x.rank() {
            return bad("the axis is out of range");
        }
        if self.select {
            if index.rank() != 1 {
                return bad("expected a 1-D index");
            }
            let mut d = x.dims().to_vec();
            d[ax] = index.dims()[0];
            return Ok(Shape(d));
        }
        if index.rank() != x.rank() {
            return bad("expected an index of x's rank");
        }
        let differs = (0..x.rank()).any(|d| d != ax && index.dims()[d] != x.dims()[d]);
        if differs {
            return bad("the index must match x's extents off the axis");
        }
        Ok(index.clone())
    }

    /// `(outer, K, J, inner)` of a gather from `x` to `out`.
    fn extents(&self, x: &Shape, out: &Shape) -> (usize, usize, usize, usize) {
        let (outer, k, inner) = split_at_axis(x, self.axis);
        (outer, k, out.dims()[self.axis], inner)
    }

    /// Where output element `(o, j, i)` finds its index.
    fn id_at(&self, (o, j, i): (usize, usize, usize), jn: usize, inner: usize) -> usize {
        match self.select {
            true => j,
            false => (o * jn + j) * inner + i,
        }
    }

    /// CPU reference.
    pub fn cpu(&self, x: &Tensor, index: &Tensor, out: &Shape) -> Tensor {
        let (outer, k, jn, inner) = self.extents(x.shape(), out);
        let (xs, ids) = (x.data(), index.data());
        let mut y = Vec::with_capacity(out.numel());
        for o in 0..outer {
            for j in 0..jn {
                for i in 0..inner {
                    let v = ids[self.id_at((o, j, i), jn, inner)];
                    y.push(match position(v, k) {
                        Some(p) => xs[(o * k + p) * inner + i],
                        None => f32::NAN,
                    });
                }
            }
        }
        Tensor::new(out.clone(), y).expect("the gather's shape")
    }

    /// Kernel: one thread per output element.
    pub fn kernel(&self, x: &Shape, out: &Shape) -> KernelSpec {
        let (outer, k, j, inner) = self.extents(x, out);
        KernelSpec {
            family: "index",
            entry: "gather",
            constants: vec![
                ("OUTER", outer as f64),
                ("K", k as f64),
                ("J", j as f64),
                ("INNER", inner as f64),
                ("SELECT", self.select as u8 as f64),
            ],
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Backward: `dx` from [`GatherBackward`]; none for the index.
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        let shape = g.shape(x[0]);
        let back = GatherBackward {
            gather: *self,
            k: shape.dims()[self.axis],
        };
        let dx = g.push_op(Op::GatherBackward(back), vec![x[1], dy], shape)?;
        Ok(vec![Some(dx), None])
    }
}

impl GatherBackward {
    /// CPU reference: the sums in index order, in f64.
    pub fn cpu(&self, index: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let gather = self.gather;
        let (outer, k, jn, inner) = gather.extents(out, dy.shape());
        let (ids, d) = (index.data(), dy.data());
        let mut acc = vec![0f64; out.numel()];
        for o in 0..outer {
            for j in 0..jn {
                for i in 0..inner {
                    let v = ids[gather.id_at((o, j, i), jn, inner)];
                    if let Some(p) = position(v, k) {
                        acc[(o * k + p) * inner + i] += d[(o * jn + j) * inner + i] as f64;
                    }
                }
            }
        }
        let data = acc.into_iter().map(|v| v as f32).collect();
        Tensor::new(out.clone(), data).expect("x's shape")
    }

    /// Kernel: one thread per `dx` element, looping over its `J` candidates.
    pub fn kernel(&self, dy: &Shape, out: &Shape) -> KernelSpec {
        let mut k = self.gather.kernel(out, dy);
        k.entry = "gather_backward";
        k.workgroups = groups(out.numel(), 256);
        k
    }

    /// Backward: the gradient of `dy` is the gather of the incoming gradient (the index takes
    /// none).
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        let shape = g.shape(x[1]);
        let ddy = g.push_op(Op::Gather(self.gather), vec![dy, x[0]], shape)?;
        Ok(vec![None, Some(ddy)])
    }
}

impl Cumsum {
    /// CPU reference, accumulated in f64.
    pub fn cpu(&self, x: &Tensor) -> Tensor {
        let (outer, k, inner) = split_at_axis(x.shape(), self.axis);
        let xs = x.data();
        let mut y = vec![0f32; xs.len()];
        for o in 0..outer {
            for i in 0..inner {
                let mut acc = 0f64;
                for s in 0..k {
                    let p = if self.reverse { k - 1 - s } else { s };
                    let at = (o * k + p) * inner + i;
                    acc += xs[at] as f64;
                    y[at] = acc as f32;
                }
            }
        }
        Tensor::new(x.shape().clone(), y).expect("x's shape")
    }

    /// Kernel: a workgroup per row where the axis is the last (a scan in workgroup memory),
    /// else a thread per line.
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let (outer, k, inner) = split_at_axis(x, self.axis);
        let (entry, workgroups) = match inner {
            1 => ("cumsum_rows", outer as u64),
            _ => ("cumsum_lines", groups(outer * inner, 256)),
        };
        KernelSpec {
            family: "index",
            entry,
            constants: vec![
                ("OUTER", outer as f64),
                ("K", k as f64),
                ("INNER", inner as f64),
                ("REVERSE", self.reverse as u8 as f64),
            ],
            workgroups,
        }
    }

    /// Backward: the cumulative sum of the gradient from the other end.
    pub fn backward(&self, g: &Graph, dy: NodeId) -> Result<NodeId> {
        let back = Cumsum {
            reverse: !self.reverse,
            ..*self
        };
        g.push_op(Op::Cumsum(back), vec![dy], g.shape(dy))
    }
}

/// The positions of the `k` largest (or, without `largest`, smallest) elements of each row of
/// `x (.., C)`, in order: `(.., k)` whole numbers as f32, no gradient (`torch.topk`'s indices;
/// its values are a gather of them). The order is strict: NaN above every number (first
/// with `largest`, last without, as torch sorts it), the lower position first among equal
/// values, so the result is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopK {
    pub k: usize,
    pub largest: bool,
}

/// Whether `(a, ia)` comes before `(b, ib)` in top-k order: the larger value first (the
/// smaller without `largest`), NaN above every number, the lower position first among equals.
fn before(largest: bool, (a, ia): (f32, usize), (b, ib): (f32, usize)) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => ia < ib,
        (true, false) => largest,
        (false, true) => !largest,
        _ if a == b => ia < ib,
        _ => (a > b) == largest,
    }
}

/// `(value, position)` pairs sorted in top-k order (a strict total order: positions differ).
fn sort_pairs(largest: bool, pairs: &mut [(f32, usize)]) {
    pairs.sort_by(|&a, &b| match before(largest, a, b) {
        true => std::cmp::Ordering::Less,
        false => std::cmp::Ordering::Greater,
    });
}

/// Up to this `k`, [`crate::Graph::topk`] makes `k` passes over each row ([`TopK`]); past it,
/// it sorts the rows ([`SortBlocks`], then [`MergeRuns`]), whose cost does not grow with `k`.
pub const TOPK_PASSES_MAX: usize = 8;

/// The largest block [`SortBlocks`] sorts in workgroup memory (`sort_v`, `sort_p` in
/// index.wgsl: 8 KiB).
pub const SORT_BLOCK_MAX: usize = 1024;

/// The first pass of a row sort in top-k order ([`TopK`]'s, for any `k`): `x (.., C)` ->
/// `(.., C, 2)` pairs `(value, position)` (positions as f32), each block of `block` elements
/// (a power of two, at most [`SORT_BLOCK_MAX`]) sorted, by a bitonic network in workgroup
/// memory; or, where one block holds the row (`k` set), the first `k` positions `(.., k)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SortBlocks {
    pub largest: bool,
    pub block: usize,
    pub k: Option<usize>,
}

/// A merge pass of a row sort: `(.., C, 2)` pairs sorted in runs of `run` -> sorted in runs of
/// `2 run` (each element's place is its place in its run plus the count of the other run's
/// elements before it: a binary search); or, on the last pass (`k` set), the first `k`
/// positions `(.., k)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MergeRuns {
    pub largest: bool,
    pub run: usize,
    pub k: Option<usize>,
}

/// Rows and `C` of a tensor `(.., C)` (of pairs: `(.., C, 2)`).
fn rows_of(x: &Shape, pairs: bool) -> (usize, usize) {
    let d = x.dims();
    let c = d[d.len() - 1 - pairs as usize];
    (x.numel() / c / (1 + pairs as usize), c)
}

/// The sorted runs of `run` elements of each row of `(value, position)` pairs, written as pairs
/// or (`k` set) as the first `k` positions of each row.
fn sorted_runs(
    largest: bool,
    rows: Vec<Vec<(f32, usize)>>,
    run: usize,
    k: Option<usize>,
) -> Vec<f32> {
    let mut out = Vec::new();
    for mut row in rows {
        for chunk in row.chunks_mut(run) {
            sort_pairs(largest, chunk);
        }
        match k {
            Some(k) => out.extend(row[..k].iter().map(|&(_, p)| p as f32)),
            None => out.extend(row.iter().flat_map(|&(v, p)| [v, p as f32])),
        }
    }
    out
}

/// The kernel of a sort pass over `rows` rows of `c`.
fn sort_kernel(
    entry: &'static str,
    rows: usize,
    c: usize,
    k: Option<usize>,
    largest: bool,
) -> KernelSpec {
    KernelSpec {
        family: "index",
        entry,
        constants: vec![
            ("OUTER", rows as f64),
            ("K", c as f64),
            ("J", k.unwrap_or(c) as f64),
            ("LARGEST", largest as u8 as f64),
        ],
        workgroups: 0,
    }
}

impl SortBlocks {
    /// The passes that sort rows of `c` for the first `k`: this pass's block, then the merges'
    /// runs (each twice the last) until one run holds the row.
    pub fn plan(c: usize) -> (usize, Vec<usize>) {
        let block = c.next_power_of_two().clamp(2, SORT_BLOCK_MAX);
        let mut runs = Vec::new();
        let mut run = block;
        while run < c {
            runs.push(run);
            run *= 2;
        }
        (block, runs)
    }

    /// CPU reference.
    pub fn cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let (_, c) = rows_of(x.shape(), false);
        let rows = x
            .data()
            .chunks(c)
            .map(|r| r.iter().copied().zip(0..c).collect())
            .collect();
        let data = sorted_runs(self.largest, rows, self.block, self.k);
        Tensor::new(out.clone(), data).expect("the sort's shape")
    }

    /// Kernel: a workgroup per [`SORT_BLOCK_MAX`] / `block` blocks (short rows share one).
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let (rows, c) = rows_of(x, false);
        let entry = match self.k {
            Some(_) => "sort_blocks_last",
            None => "sort_blocks",
        };
        let mut k = sort_kernel(entry, rows, c, self.k, self.largest);
        k.constants.push(("BLOCK", self.block as f64));
        let per_workgroup = SORT_BLOCK_MAX / self.block;
        k.workgroups = (rows * c.div_ceil(self.block)).div_ceil(per_workgroup) as u64;
        k
    }
}

impl MergeRuns {
    /// CPU reference: the runs of `2 run` sorted (a merge of two sorted runs, the order being
    /// strict).
    pub fn cpu(&self, runs: &Tensor, out: &Shape) -> Tensor {
        let (_, c) = rows_of(runs.shape(), true);
        let rows = runs
            .data()
            .chunks(2 * c)
            .map(|r| r.chunks(2).map(|p| (p[0], p[1] as usize)).collect())
            .collect();
        let data = sorted_runs(self.largest, rows, 2 * self.run, self.k);
        Tensor::new(out.clone(), data).expect("the sort's shape")
    }

    /// Kernel: a thread per element.
    pub fn kernel(&self, runs: &Shape) -> KernelSpec {
        let (rows, c) = rows_of(runs, true);
        let entry = match self.k {
            Some(_) => "merge_runs_last",
            None => "merge_runs",
        };
        let mut k = sort_kernel(entry, rows, c, self.k, self.largest);
        k.constants.push(("RUN", self.run as f64));
        k.workgroups = groups(rows * c, 256);
        k
    }
}

impl TopK {
    /// Shape rule: `x (.., C)` with `1 <= k <= C` -> `(.., k)`.
    pub fn infer(&self, x: &Shape) -> Result<Shape> {
        let c = x.dims().last().copied().unwrap_or(0);
        if self.k == 0 || self.k > c {
            return Err(shape_err(
                "topk",
                format!("k = {} of x {x}: expected 1 <= k <= {c}", self.k),
            ));
        }
        let mut d = x.dims().to_vec();
        *d.last_mut().expect("a rank of at least 1") = self.k;
        Ok(Shape(d))
    }

    /// CPU reference: each row's positions sorted in top-k order, the first `k`.
    pub fn cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let c = *x.dims().last().expect("a rank of at least 1");
        let mut picks = Vec::with_capacity(out.numel());
        for row in x.data().chunks(c) {
            let mut pos: Vec<(f32, usize)> = row.iter().copied().zip(0..c).collect();
            sort_pairs(self.largest, &mut pos);
            picks.extend(pos[..self.k].iter().map(|&(_, p)| p as f32));
        }
        Tensor::new(out.clone(), picks).expect("the picks' shape")
    }

    /// Kernel: a workgroup per row, `k` rounds of a pass over it and a tree.
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let c = *x.dims().last().expect("a rank of at least 1");
        let rows = x.numel() / c;
        KernelSpec {
            family: "index",
            entry: "topk",
            constants: vec![
                ("OUTER", rows as f64),
                ("K", c as f64),
                ("J", self.k as f64),
                ("LARGEST", self.largest as u8 as f64),
            ],
            workgroups: rows as u64,
        }
    }
}
