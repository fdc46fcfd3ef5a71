//! Inverted dropout with a counter-based, seeded mask (no mask is stored: the backward pass
//! recomputes it from the same seed). Kernel: `shaders/dropout.wgsl`; the plan compiler also
//! fuses it as a step of elementwise chains, product epilogues and reduction prologues
//! (`dropout_op`, the mask keyed by the element index, so only at the fused program's own
//! shape; the seed read as f32 in kernels storing f16).

use super::{groups, KernelSpec};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::Tensor;

/// Drops each element with probability `p` and scales the kept ones by `1 / (1 - p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    /// Distinguishes the dropout layers that share one seed input.
    pub salt: u32,
}

/// lowbias32, as in dropout.wgsl.
pub(crate) fn hash(v: u32) -> u32 {
    let mut h = v;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846ca68b);
    h ^= h >> 16;
    h
}

impl Dropout {
    /// Elements whose hash is below this are dropped.
    pub(crate) fn threshold(&self) -> u32 {
        (self.p as f64 * 4294967296.0).min(4294967295.0) as u32
    }

    /// The kept elements' factor, `1 / (1 - p)`.
    pub(crate) fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether element `i` of a tensor is kept under `seed`, as the kernels decide.
    pub(crate) fn keeps(&self, seed: f32) -> impl Fn(usize) -> bool {
        let key = hash((seed as u32) ^ hash(self.salt));
        let t = self.threshold();
        move |i| hash(i as u32 ^ key) >= t
    }

    /// CPU reference: the same integer hash, so the masks agree bit for bit.
    pub fn cpu(&self, x: &Tensor, seed: &Tensor) -> Tensor {
        let keep = self.keeps(seed.data()[0]);
        let s = self.scale();
        let data = x
            .data()
            .iter()
            .enumerate()
            .map(|(i, &v)| if keep(i) { v * s } else { 0.0 })
            .collect();
        Tensor::new(x.shape().clone(), data).expect("same shape")
    }

    /// Kernel: one thread per element.
    pub fn kernel(&self, n: usize) -> KernelSpec {
        KernelSpec {
            family: "dropout",
            entry: "main",
            constants: vec![
                ("N", n as f64),
                ("THRESHOLD", self.threshold() as f64),
                ("SCALE", self.scale() as f64),
                ("SALT", self.salt as f64),
            ],
            workgroups: groups(n, 256),
        }
    }

    /// Backward: the same mask and scale applied to the gradient.
    pub fn backward(&self, g: &Graph, seed: NodeId, dy: NodeId) -> Result<NodeId> {
        let shape = g.shape(dy);
        g.push_op(super::Op::Dropout(*self), vec![dy, seed], shape)
    }
}
