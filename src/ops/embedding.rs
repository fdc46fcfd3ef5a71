//! Embedding lookup (`torch.nn.functional.embedding`) and its weight gradient.
//! Kernel: `shaders/embedding.wgsl`.
//!
//! `Embedding`: inputs `indices` (any shape, whole numbers stored as f32) and `weight (V, E)` ->
//! `(indices.., E)`. An index that is not an integer in `[0, V)` gives a row of NaN.
//! `EmbeddingBackward`: `indices`, `dy (indices.., E)` -> `dW (V, E)`, each weight row the sum of
//! the `dy` rows whose index names it, summed in index order (deterministic, no atomics: a
//! workgroup per row and 256 columns scans the indices for that row, then reads only its `dy`
//! rows; `V * ceil(E / 256) * N` index reads, where a thread per weight looping over every
//! index took `V * E * N`). Indices take no gradient.

use super::{groups, KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Row lookup of a `(V, E)` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Embedding;

/// The gradient of [`Embedding`] for its table. With `repeat` > 1 (made by the plan compiler,
/// `exec::lower::batch_sums_into_embedding_backward`), `dy` holds `repeat` blocks of the
/// indices' rows, `(repeat, indices.., E)`, and each block adds in: the gradient of a lookup
/// broadcast over a batch (a transformer's positions) without the batch's sum first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EmbeddingBackward {
    pub repeat: usize,
}

impl Default for EmbeddingBackward {
    fn default() -> Self {
        EmbeddingBackward { repeat: 1 }
    }
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

    /// Backward: `dW` from the dedicated gather kernel; none for the indices.
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        let dw = g.push_op(
            Op::EmbeddingBackward(EmbeddingBackward::default()),
            vec![x[0], dy],
            g.shape(x[1]),
        )?;
        Ok(vec![None, Some(dw)])
    }
}

impl EmbeddingBackward {
    /// CPU reference, f64 accumulation in index order (each index's blocks in order).
    pub fn cpu(&self, indices: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let (v, e) = (out.dims()[0], out.dims()[1]);
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

    /// Kernel: a workgroup per row and 256 columns, scanning the indices for that row's
    /// occurrences (see `shaders/embedding.wgsl`).
    pub fn kernel(&self, indices: &Shape, out: &Shape) -> KernelSpec {
        let (n, v, e) = (indices.numel(), out.dims()[0], out.dims()[1]);
        let mut constants = constants(n, v, e);
        constants.push(("REPEAT", self.repeat as f64));
        KernelSpec {
            family: "embedding",
            entry: "embedding_backward",
            constants,
            workgroups: (v * e.div_ceil(256)) as u64,
        }
    }
}
