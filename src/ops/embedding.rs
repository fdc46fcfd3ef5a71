//! Embedding lookup (`torch.nn.functional.embedding`) and its weight gradient.
//! Kernel: `shaders/embedding.wgsl`.
//!
//! `Embedding`: inputs `indices` (any shape, whole numbers stored as f32) and `weight (V, E)` ->
//! `(indices.., E)`. An index that is not an integer in `[0, V)` gives a row of NaN.
//! `EmbeddingBackward`: `indices`, `dy (indices.., E)` -> `dW (V, E)`, each weight row the sum of
//! the `dy` rows whose index names it, summed in index order (deterministic, no atomics: a
//! workgroup per row and 256 columns scans the indices for that row, then reads only its `dy`
//! rows; `V * ceil(E / 256) * N` index reads, where a thread per weight looping over every
//! index took `V * E * N`; for a large table the plan compiler lists each row's occurrences
//! first, [`EmbeddingRows`], and the gradient reads that list: `N + V * E` reads). Indices take
//! no gradient.

use super::{groups, KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Row lookup of a `(V, E)` table. With `padding_idx` (torch's, in `[0, V)`), that row takes no
/// gradient: its indices are left out of the table's gradient (the lookup still reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Embedding {
    pub padding_idx: Option<i32>,
}

/// The gradient of [`Embedding`] for its table. With `repeat` > 1 (made by the plan compiler,
/// `exec::lower::batch_sums_into_embedding_backward`), `dy` holds `repeat` blocks of the
/// indices' rows, `(repeat, indices.., E)`, and each block adds in: the gradient of a lookup
/// broadcast over a batch (a transformer's positions) without the batch's sum first. With
/// `sorted` (made by the plan compiler, `exec::lower::sorted_embedding_backward`), input 0 is
/// the [`EmbeddingRows`] of the indices, `(V + N)`, and each row reads its occurrences from
/// that list instead of scanning the indices: the same sums in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EmbeddingBackward {
    pub repeat: usize,
    pub sorted: bool,
}

impl Default for EmbeddingBackward {
    fn default() -> Self {
        EmbeddingBackward {
            repeat: 1,
            sorted: false,
        }
    }
}

/// Each row's occurrences among `indices` (`N` elements, any shape) for a table of `rows` rows,
/// for [`EmbeddingBackward`] `sorted`: `(V + N)` whole numbers stored as f32, first each row's
/// end in the list, then the list: the positions of the valid indices ordered by row, in index
/// order within a row (a stable counting sort), `-1` after them. Row `v`'s positions are
/// `list[ends[v - 1] .. ends[v]]` (`ends[-1] = 0`). Made by the plan compiler where scanning the
/// indices for every row would be the gradient's main work ([`sorts_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EmbeddingRows {
    pub rows: usize,
}

/// Workgroups of the scanning gradient (`V * ceil(E / 256)`, each reading every index) from
/// which a table's gradient lists each row's occurrences first ([`EmbeddingRows`]). Both
/// passes over the indices take a time proportional to `N` per workgroup (the list's one
/// workgroup about three times the scan's: 256 comparisons per chunk of indices against a
/// prefix sum's barriers), but the scan takes it once per wave of workgroups the GPU holds at
/// once (about a thousand of 256 threads on an H100: 132 SMs of 8), so beyond a few waves the
/// list wins by the number of waves: 50 for a 50k-token vocabulary. On lavapipe the list wins
/// at every size measured (`kiln-bench --only embedding`: 8192 rows, 2048 lookups, 458 -> 7
/// ms).
pub const SORTED_ROWS_MIN_WORKGROUPS: usize = 4096;

/// Whether a table's gradient of `v` rows of `e` from `n` lookups lists its rows first: from
/// [`SORTED_ROWS_MIN_WORKGROUPS`], where the list's whole numbers are exact in f32 (`v + n`
/// below 2^24).
pub fn sorts_rows(v: usize, e: usize, n: usize) -> bool {
    v.saturating_mul(e.div_ceil(256)) >= SORTED_ROWS_MIN_WORKGROUPS && v + n < 1 << 24
}

/// The row named by index `x`, or `None` if it is not an integer in `[0, v)`.
fn row_of(x: f32, v: usize) -> Option<usize> {
    (x >= 0.0 && x < v as f32 && x.fract() == 0.0).then_some(x as usize)
}

fn constants(n: usize, v: usize, e: usize) -> Vec<(&'static str, f64)> {
    vec![("N", n as f64), ("V", v as f64), ("E", e as f64)]
}

impl Embedding {
    /// Shape rule: `indices (..)`, `weight (V, E)` -> `(.., E)`.
    pub fn infer(indices: &Shape, weight: &Shape) -> Result<Shape> {
        if weight.rank() != 2 {
            return Err(shape_err(
                "embedding",
                format!("indices {indices} and weight {weight}: expected a weight (V, E)"),
            ));
        }
        let mut d = indices.dims().to_vec();
        d.push(weight.dims()[1]);
        Ok(Shape(d))
    }

    /// CPU reference.
    pub fn cpu(&self, indices: &Tensor, weight: &Tensor, out: &Shape) -> Tensor {
        let (v, e) = (weight.dims()[0], weight.dims()[1]);
        let w = weight.data();
        let mut y = Vec::with_capacity(out.numel());
        for &x in indices.data() {
            match row_of(x, v) {
                Some(r) => y.extend_from_slice(&w[r * e..(r + 1) * e]),
                None => y.extend(std::iter::repeat_n(f32::NAN, e)),
            }
        }
        Tensor::new(out.clone(), y).expect("embedding shape")
    }

    /// Kernel: one thread per output element.
    pub fn kernel(&self, indices: &Shape, weight: &Shape) -> KernelSpec {
        let (n, v, e) = (indices.numel(), weight.dims()[0], weight.dims()[1]);
        KernelSpec {
            family: "embedding",
            entry: "embedding",
            constants: constants(n, v, e),
            workgroups: groups(n * e, 256),
        }
    }

    /// Backward: `dW` from the dedicated gather kernel (the padding row's indices made -1
    /// first, which name no row); none for the indices.
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        let indices = match self.padding_idx {
            None => x[0],
            Some(p) => {
                let pad = g.constant(Tensor::full([1], p as f32));
                let none = g.constant(Tensor::full([1], -1.0));
                g.where_cond(g.eq(x[0], pad)?, none, x[0])?
            }
        };
        let dw = g.push_op(
            Op::EmbeddingBackward(EmbeddingBackward::default()),
            vec![indices, dy],
            g.shape(x[1]),
        )?;
        Ok(vec![None, Some(dw)])
    }
}

impl EmbeddingRows {
    /// CPU reference: the ends, then the stable list.
    pub fn cpu(&self, indices: &Tensor) -> Tensor {
        let v = self.rows;
        let mut lists = vec![Vec::new(); v];
        for (i, &x) in indices.data().iter().enumerate() {
            if let Some(r) = row_of(x, v) {
                lists[r].push(i as f32);
            }
        }
        let mut out = Vec::with_capacity(v + indices.numel());
        let mut end = 0;
        for l in &lists {
            end += l.len();
            out.push(end as f32);
        }
        out.extend(lists.into_iter().flatten());
        out.resize(v + indices.numel(), -1.0);
        Tensor::new([out.len()], out).expect("V + N entries")
    }

    /// Kernel: one workgroup (see `shaders/embedding.wgsl`).
    pub fn kernel(&self, indices: &Shape) -> KernelSpec {
        KernelSpec {
            family: "embedding",
            entry: "embedding_rows",
            constants: constants(indices.numel(), self.rows, 1),
            workgroups: 1,
        }
    }
}

impl EmbeddingBackward {
    /// CPU reference, f64 accumulation in index order (each index's blocks in order); `sorted`:
    /// in the order the list of input 0 gives.
    pub fn cpu(&self, indices: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let (v, e) = (out.dims()[0], out.dims()[1]);
        if self.sorted {
            return self.sorted_cpu(indices, dy, out);
        }
        let n = indices.numel();
        let mut dw = vec![0f64; v * e];
        for (i, &x) in indices.data().iter().enumerate() {
            if let Some(r) = row_of(x, v) {
                for b in 0..self.repeat {
                    let row = (b * n + i) * e;
                    for (acc, &d) in dw[r * e..(r + 1) * e]
                        .iter_mut()
                        .zip(&dy.data()[row..row + e])
                    {
                        *acc += d as f64;
                    }
                }
            }
        }
        Tensor::new(out.clone(), dw.into_iter().map(|x| x as f32).collect()).expect("table shape")
    }

    /// [`Self::cpu`] reading the rows' occurrences from [`EmbeddingRows`]' list (`rows`).
    fn sorted_cpu(&self, rows: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let (v, e) = (out.dims()[0], out.dims()[1]);
        let (ends, list) = rows.data().split_at(v);
        let n = list.len();
        let mut dw = vec![0f64; v * e];
        let mut start = 0;
        for (r, &end) in ends.iter().enumerate() {
            let end = end as usize;
            for &i in &list[start..end] {
                for b in 0..self.repeat {
                    let row = (b * n + i as usize) * e;
                    for (acc, &d) in dw[r * e..(r + 1) * e]
                        .iter_mut()
                        .zip(&dy.data()[row..row + e])
                    {
                        *acc += d as f64;
                    }
                }
            }
            start = end;
        }
        Tensor::new(out.clone(), dw.into_iter().map(|x| x as f32).collect()).expect("table shape")
    }

    /// Kernel: a workgroup per row and 256 columns, scanning the indices for that row's
    /// occurrences, or with `sorted` reading them from the list (see
    /// `shaders/embedding.wgsl`).
    pub fn kernel(&self, indices: &Shape, out: &Shape) -> KernelSpec {
        let (v, e) = (out.dims()[0], out.dims()[1]);
        // (sorted: input 0 is the ends, then the list of the N lookups)
        let n = indices.numel() - if self.sorted { v } else { 0 };
        let mut constants = constants(n, v, e);
        constants.push(("REPEAT", self.repeat as f64));
        KernelSpec {
            family: "embedding",
            entry: if self.sorted {
                "embedding_backward_sorted"
            } else {
                "embedding_backward"
            },
            constants,
            workgroups: match 256 / e {
                per if self.sorted && per > 1 => v.div_ceil(per),
                _ => v * e.div_ceil(256),
            } as u64,
        }
    }
}
