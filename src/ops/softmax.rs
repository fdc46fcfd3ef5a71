//! Softmax and log-softmax along one axis, numerically stable (max subtracted first), as
//! `torch.softmax` / `torch.log_softmax`. Kernel: `shaders/softmax.wgsl`.

use super::reduce::split_at_axis;
use super::KernelSpec;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Softmax (or log-softmax when `log`) over `axis` (already resolved to be non-negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Softmax {
    pub axis: usize,
    pub log: bool,
}

impl Softmax {
    /// Name in errors and reports.
    pub fn name(&self) -> &'static str {
        if self.log {
            "log_softmax"
        } else {
            "softmax"
        }
    }

    /// CPU reference in f64.
    pub fn cpu(&self, a: &Tensor) -> Tensor {
        let (outer, len, inner) = split_at_axis(a.shape(), self.axis);
        let mut data = vec![0f32; a.numel()];
        for o in 0..outer {
            for i in 0..inner {
                let idx = |j: usize| (o * len + j) * inner + i;
                let m = (0..len)
                    .map(|j| a.data()[idx(j)] as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..len).map(|j| (a.data()[idx(j)] as f64 - m).exp()).sum();
                for j in 0..len {
                    let x = a.data()[idx(j)] as f64 - m;
                    data[idx(j)] = if self.log { x - s.ln() } else { x.exp() / s } as f32;
                }
            }
        }
        Tensor::new(a.shape().clone(), data).expect("same shape")
    }

    /// Kernel: one workgroup per row along the axis.
    pub fn kernel(&self, a: &Shape) -> KernelSpec {
        let (outer, len, inner) = split_at_axis(a, self.axis);
        KernelSpec {
            family: "softmax",
            entry: "main",
            constants: vec![
                ("LEN", len as f64),
                ("INNER", inner as f64),
                ("ROWS", (outer * inner) as f64),
                ("LOG", self.log as u32 as f64),
            ],
            workgroups: (outer * inner) as u64,
        }
    }
}

impl Softmax {
    /// Backward from the output `y`: softmax `y (dy - sum(dy y))`, log-softmax
    /// `dy - exp(y) sum(dy)`, sums along the axis.
    pub fn backward(&self, g: &Graph, y: NodeId, dy: NodeId) -> Result<NodeId> {
        let axis = self.axis as isize;
        if self.log {
            let s = g.sum(dy, axis, true)?;
            g.sub(dy, g.mul(g.exp(y)?, s)?)
        } else {
            let s = g.sum(g.mul(dy, y)?, axis, true)?;
            g.mul(y, g.sub(dy, s)?)
        }
    }
}

/// Shape of softmax output: unchanged.
pub fn infer(a: &Shape) -> Shape {
    a.clone()
}
