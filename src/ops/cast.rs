//! Cast: a tensor's values as another element type (f32 <-> f16). Shape rule: the input's shape.
//! CPU twin: the values rounded to the new type. Backward: the gradient cast back to the input's
//! type (so an f32 parameter used in f16 gets an f32 gradient, as under PyTorch's autocast).
//!
//! Kernel: generated (`codegen::elementwise::cast_kernel`) rather than in `shaders/`, since
//! a module that declares f16 storage needs `enable f16;` and would not compile on adapters
//! without SHADER_F16.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{DType, Tensor};

/// Converts to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    pub to: DType,
}

impl Cast {
    /// CPU reference: each value rounded to what `to` holds.
    pub fn cpu(&self, x: &Tensor) -> Tensor {
        x.clone().rounded(self.to)
    }

    /// The input's gradient: `dy` cast back to the input's type `from`.
    pub fn backward(&self, g: &Graph, from: DType, dy: NodeId) -> Result<NodeId> {
        g.cast(dy, from)
    }
}
