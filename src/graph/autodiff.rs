//! Reverse-mode automatic differentiation: `grad` appends to the graph the nodes that compute the
//! gradient of a scalar loss with respect to any nodes (usually parameters). Each op's backward
//! rule lives beside its forward in `ops/<family>.rs` and is built from graph ops, so gradients
//! run through the same planner, kernels and CPU reference as everything else.

use std::collections::HashMap;

use super::{Graph, NodeId};
use crate::error::{shape_err, Result};
use crate::tensor::Tensor;

impl Graph {
    /// Gradients of `loss` (one element) with respect to each of `wrt`, as new nodes in this
    /// graph, in the same order. A node `loss` does not depend on gets a zero gradient.
    pub fn grad(&self, loss: NodeId, wrt: &[NodeId]) -> Result<Vec<NodeId>> {
        self.grad_with_seed(loss, None, wrt)
    }

    /// [`Graph::grad`] of `seed * loss`: the backward pass starts from `seed` (a node of the
    /// loss's shape, f32) instead of 1, read where the loss's gradient is read (dynamic loss
    /// scaling's scale, without a kernel that multiplies the loss by it); `None` is 1.
    pub fn grad_with_seed(
        &self,
        loss: NodeId,
        seed: Option<NodeId>,
        wrt: &[NodeId],
    ) -> Result<Vec<NodeId>> {
        let n_fwd = loss.0 + 1;
        let loss_shape = self.check_id("grad", loss)?;
        if loss_shape.numel() != 1 {
            return Err(shape_err(
                "grad",
                format!("the loss must have one element, its shape is {loss_shape}"),
            ));
        }
        for &w in wrt {
            self.check_id("grad", w)?;
        }
        if let Some(s) = seed {
            let shape = self.check_id("grad", s)?;
            if shape != loss_shape {
                return Err(shape_err(
                    "grad",
                    format!("the seed's shape {shape} is not the loss's {loss_shape}"),
                ));
            }
        }
        let fwd = self.nodes.borrow()[..n_fwd].to_vec();
        // nodes on a path from some `wrt` to the loss
        let mut depends = vec![false; n_fwd];
        for &w in wrt {
            if w.0 < n_fwd {
                depends[w.0] = true;
            }
        }
        for i in 0..n_fwd {
            if fwd[i].inputs.iter().any(|x| depends[x.0]) {
                depends[i] = true;
            }
        }
        let mut grads: HashMap<usize, NodeId> = HashMap::new();
        if depends[loss.0] {
            let seed = seed.unwrap_or_else(|| self.constant(Tensor::full(loss_shape, 1.0)));
            grads.insert(loss.0, self.cast(seed, self.dtype(loss))?);
        }
        for i in (0..n_fwd).rev() {
            let Some(&dy) = grads.get(&i) else { continue };
            let node = &fwd[i];
            if node.op.is_source() {
                continue;
            }
            let dxs = node.op.backward(self, &node.inputs, NodeId(i), dy)?;
            for (x, dx) in node.inputs.iter().zip(dxs) {
                let Some(dx) = dx else { continue };
                if !depends[x.0] {
                    continue;
                }
                let total = match grads.get(&x.0) {
                    Some(&prev) => self.add(prev, dx)?,
                    None => dx,
                };
                grads.insert(x.0, total);
            }
        }
        wrt.iter()
            .map(|w| match grads.get(&w.0) {
                Some(&g) => Ok(g),
                None => self.cast(self.constant(Tensor::zeros(self.shape(*w))), self.dtype(*w)),
            })
            .collect()
    }
}
