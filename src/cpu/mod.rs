//! The CPU reference backend: runs a graph node by node with each op family's CPU twin
//! (`ops::<family>::cpu`), plain loops with f64 accumulation. It is what every GPU result is
//! checked against, and a backend of its own (`KILN_BACKEND=cpu`).

use std::collections::HashMap;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::PlanInfo;
use crate::graph::{Node, NodeId};
use crate::ops::norm::{GroupStats, MergeStats, NormalizeStats};
use crate::ops::{Init, Op};
use crate::tensor::Tensor;

/// Evaluates `order` (a topological order). `source` gives the value of each input, parameter
/// and constant node; `store` receives the new value of every parameter an optimizer update or
/// running average writes (by name), as the GPU writes them in place. Returns every evaluated
/// node's value, indexed by node.
pub fn evaluate(
    nodes: &[Node],
    order: &[NodeId],
    mut source: impl FnMut(NodeId, &Node) -> Result<Tensor>,
    mut store: impl FnMut(&str, Tensor) -> Result<()>,
) -> Result<Vec<Option<Tensor>>> {
    let mut values: Vec<Option<Tensor>> = vec![None; nodes.len()];
    for &id in order {
        let n = &nodes[id.0];
        let v = if n.op.is_source() {
            let t = source(id, n)?;
            if t.shape() != &n.shape {
                return Err(Error::Input(format!(
                    "{} node {} needs shape {}, got {}",
                    n.op.name(),
                    id.0,
                    n.shape,
                    t.shape()
                )));
            }
            t
        } else {
            let ins: Vec<&Tensor> = n
                .inputs
                .iter()
                .map(|i| values[i.0].as_ref().expect("inputs precede their users"))
                .collect();
            match &n.op {
                Op::OptimStep(o) => {
                    let mut updated = o.cpu_update(&ins);
                    // inputs 3.. are the parameter and its states, in the order `cpu_update` returns them
                    for (k, t) in updated.iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[3 + k].0].op {
                            store(name, t.clone())?;
                        }
                    }
                    updated.swap_remove(0)
                }
                Op::OptimGroup(o) => {
                    // the group's value: its last member's parameter (`Op::view_of`)
                    let mut last = None;
                    for (j, updated) in o.cpu_update(&ins).into_iter().enumerate() {
                        let p = o.param(j);
                        for (k, t) in updated.into_iter().enumerate() {
                            if let Op::Param { name, .. } = &nodes[n.inputs[p + k].0].op {
                                store(name, t.clone())?;
                            }
                            if k == 0 {
                                last = Some(t);
                            }
                        }
                    }
                    last.expect("a group has members")
                }
                Op::ScalerStep(s) => {
                    let (hyper, state) = s.cpu(ins[0], ins[1], ins[2]);
                    if let Op::Param { name, .. } = &nodes[n.inputs[2].0].op {
                        store(name, state)?;
                    }
                    hyper
                }
                Op::AccumulateGroup(a) => {
                    let mut last = None;
                    for (j, updated) in a.cpu(&ins).into_iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[a.members + j].0].op {
                            store(name, updated.clone())?;
                        }
                        last = Some(updated);
                    }
                    last.expect("a group has members")
                }
                Op::EmaUpdate(e) => {
                    let updated = e.cpu(ins[0], ins[1], ins[2]);
                    if let Op::Param { name, .. } = &nodes[n.inputs[2].0].op {
                        store(name, updated.clone())?;
                    }
                    updated
                }
                Op::EmaGroup(e) => {
                    let mut last = None;
                    for (j, updated) in e.cpu(&ins).into_iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[1 + e.members + j].0].op {
                            store(name, updated.clone())?;
                        }
                        last = Some(updated);
                    }
                    last.expect("a group has members")
                }
                Op::Accumulate(a) => {
                    let updated = a.cpu(ins[0], ins[1]);
                    if let Op::Param { name, .. } = &nodes[n.inputs[1].0].op {
                        store(name, updated.clone())?;
                    }
                    updated
                }
                Op::WriteRows(w) => {
                    let updated = w.cpu(ins[0], ins[1], ins[2]);
                    if let Op::Param { name, .. } = &nodes[n.inputs[2].0].op {
                        store(name, updated.clone())?;
                    }
                    updated
                }
                Op::RunningUpdate(r) => {
                    let mut updated = r.cpu(ins[0], &ins[1..]);
                    for (k, t) in updated.iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[1 + k].0].op {
                            store(name, t.clone())?;
                        }
                    }
                    updated.swap_remove(0)
                }
                // statistics whose kernel also moves the running ones
                Op::GroupStats(GroupStats {
                    running: Some(r), ..
                })
                | Op::MergeStats(MergeStats {
                    running: Some(r), ..
                }) => {
                    let stats = n.op.cpu_forward(&ins[..1], &n.shape);
                    for (k, t) in r.cpu(&stats, &ins[1..]).into_iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[1 + k].0].op {
                            store(name, t)?;
                        }
                    }
                    stats
                }
                // a normalization whose kernel also moves running statistics (the last two
                // inputs) towards the ones it computes
                Op::NormalizeStats(NormalizeStats {
                    running: Some(r), ..
                }) => {
                    let stats = GroupStats::WHOLE.cpu(ins[0]);
                    let at = ins.len() - 2;
                    for (k, t) in r.cpu(&stats, &ins[at..]).into_iter().enumerate() {
                        if let Op::Param { name, .. } = &nodes[n.inputs[at + k].0].op {
                            store(name, t)?;
                        }
                    }
                    n.op.cpu_forward(&ins, &n.shape)
                }
                _ => n.op.cpu_forward(&ins, &n.shape),
            }
        };
        // an f16 node holds what f16 storage holds
        values[id.0] = Some(v.rounded(n.dtype));
    }
    Ok(values)
}

/// The value a parameter starts from.
pub(crate) fn initial_value(n: &Node, init: &Init) -> Tensor {
    match init {
        Init::Zeros => Tensor::zeros(n.shape.clone()),
        Init::Value(t) => (**t).clone(),
    }
}

/// A plan on the CPU reference backend.
pub(crate) struct CpuPlan {
    device: Device,
    nodes: Vec<Node>,
    order: Vec<NodeId>,
    outputs: Vec<NodeId>,
    pub(crate) info: PlanInfo,
}

impl CpuPlan {
    pub(crate) fn compile(
        device: Device,
        nodes: Vec<Node>,
        order: Vec<NodeId>,
        outputs: &[NodeId],
    ) -> Result<CpuPlan> {
        // parameters exist (and keep their shapes) from compile time on, as on the GPU
        for &id in &order {
            if let Op::Param { name, init } = &nodes[id.0].op {
                let n = &nodes[id.0];
                device.declare_cpu_param(name, &n.shape, n.dtype, || initial_value(n, init))?;
            }
        }
        let bytes: u64 = order
            .iter()
            .filter(|id| !matches!(nodes[id.0].op, Op::Reshape))
            .map(|id| nodes[id.0].dtype.buffer_bytes(nodes[id.0].shape.numel()))
            .sum();
        let info = PlanInfo {
            nodes: order.len(),
            dispatches: 0,
            buffers: 0,
            peak_bytes: bytes,
            tensor_bytes: bytes,
        };
        Ok(CpuPlan {
            device,
            nodes,
            order,
            outputs: outputs.to_vec(),
            info,
        })
    }

    pub(crate) fn run(&mut self, given: &[(&str, &Tensor)], readback: bool) -> Result<Vec<Tensor>> {
        let feeds: HashMap<&str, &Tensor> = given.iter().copied().collect();
        let device = &self.device;
        let values = evaluate(
            &self.nodes,
            &self.order,
            |_, n| match &n.op {
                Op::Input { name } => feeds
                    .get(name.as_str())
                    .map(|t| (*t).clone())
                    .ok_or_else(|| Error::Input(format!("input {name:?} is missing"))),
                Op::Param { name, .. } => device.param(name),
                Op::Const { value } => Ok((**value).clone()),
                _ => unreachable!("only sources are fed"),
            },
            |name, t| device.set_param(name, &t),
        )?;
        if !readback {
            return Ok(Vec::new());
        }
        Ok(self
            .outputs
            .iter()
            .map(|o| values[o.0].clone().expect("outputs are evaluated"))
            .collect())
    }
}
