//! Lowering for one GPU: before buffers are planned, products too small to fill the adapter but
//! deep in K become a split-K pair (partial products, then their sum with the epilogue), and
//! chains of elementwise ops become one fused node (`exec::fuse`); then each node gets its
//! kernel, generated for the adapter (`codegen`) or from `shaders/`.
//! Node ids of the graph keep their meaning: a rewritten node still computes the same tensor.

use crate::codegen::elementwise;
use crate::codegen::matmul::{self as gemm, GemmConfig};
use crate::codegen::{Generated, Target};
use crate::device::GemmPolicy;
use crate::graph::{Node, NodeId};
use crate::ops::matmul::{MatMul, MatMulPartial, ProductDims, SplitKSum};
use crate::ops::{KernelSpec, Op};
use crate::tensor::Shape;

/// The generated GEMM configuration for a product, or `None` for the portable kernel.
pub(crate) fn gemm_config(
    d: &ProductDims,
    target: &Target,
    policy: GemmPolicy,
) -> Option<GemmConfig> {
    match policy {
        GemmPolicy::Portable => None,
        GemmPolicy::Auto => gemm::choose(d.m, d.n, d.k, d.batch.numel(), target),
        GemmPolicy::Fixed(c) => c.fits(target).then_some(c),
    }
}

/// Rewrites every product whose configuration splits K into `MatMulPartial` (a new node, placed
/// just before it in `order`) and `SplitKSum` (the node itself, same id and shape).
pub(crate) fn split_k(
    nodes: &mut Vec<Node>,
    order: &mut Vec<NodeId>,
    target: &Target,
    policy: GemmPolicy,
) {
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let n = &nodes[id.0];
        let Op::MatMul(mm) = n.op else {
            i += 1;
            continue;
        };
        let (a, b) = (n.inputs[0], n.inputs[1]);
        let Ok(d) = mm.dims(&nodes[a.0].shape, &nodes[b.0].shape) else {
            i += 1;
            continue;
        };
        let cfg = match gemm_config(&d, target, policy) {
            Some(c) if c.split > 1 && c.slices(d.k) > 1 => c,
            _ => {
                i += 1;
                continue;
            }
        };
        let partial = MatMulPartial {
            product: MatMul {
                trans_a: mm.trans_a,
                trans_b: mm.trans_b,
                ..Default::default()
            },
            config: cfg,
        };
        let Ok(shape) = partial.infer(&nodes[a.0].shape, &nodes[b.0].shape) else {
            i += 1;
            continue;
        };
        let pid = NodeId(nodes.len());
        nodes.push(Node {
            op: Op::MatMulPartial(partial),
            inputs: vec![a, b],
            shape,
        });
        let node = &mut nodes[id.0];
        let bias = node.inputs.get(2).copied();
        node.op = Op::SplitKSum(SplitKSum {
            bias: mm.bias,
            relu: mm.relu,
        });
        node.inputs = std::iter::once(pid).chain(bias).collect();
        order.insert(i, pid);
        i += 2;
    }
}

/// The kernel of a node on this adapter: generated where a generator covers it, else the op's
/// kernel from `shaders/`; `None` for sources and views.
pub(crate) fn select(
    op: &Op,
    inputs: &[&Shape],
    out: &Shape,
    target: &Target,
    policy: GemmPolicy,
) -> Option<(KernelSpec, Option<Generated>)> {
    match op {
        Op::MatMul(mm) => {
            let d = mm
                .dims(inputs[0], inputs[1])
                .expect("shape checked at build time");
            match gemm_config(&d, target, policy) {
                Some(mut cfg) => {
                    cfg.split = 1;
                    let g = gemm::kernel(mm, &d, &cfg);
                    Some((g.spec.clone(), Some(g)))
                }
                None => op.kernel(inputs, out).map(|k| (k, None)),
            }
        }
        Op::MatMulPartial(p) => {
            let g = p.kernel(inputs[0], inputs[1]);
            Some((g.spec.clone(), Some(g)))
        }
        Op::Fused(f) => {
            let g = elementwise::kernel(f, inputs, out);
            Some((g.spec.clone(), Some(g)))
        }
        _ => op.kernel(inputs, out).map(|k| (k, None)),
    }
}
