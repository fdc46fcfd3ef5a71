//! Verify mode: run a graph on the GPU and on the CPU reference and report, node by node, how far
//! the GPU is from the reference, and the first node that diverges beyond its tolerance.
//!
//! Two errors per node: the *end-to-end* error against the CPU evaluation of the whole graph (what
//! a user sees), and the *local* error against the CPU op applied to the GPU's own inputs (which
//! blames the node that introduced a divergence, not the nodes that inherit it).
//!
//! Reading every node back keeps the plan compiler from rewriting any of them, so the outputs are
//! then also computed by the plan `compile` builds for them alone (implicit-GEMM convolutions,
//! split-K, fused elementwise kernels) and compared with the node-by-node run.

use std::collections::HashMap;

use crate::cpu::evaluate;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::exec::liveness::reachable;
use crate::graph::{Graph, NodeId};
use crate::ops::{Op, Tolerance};
use crate::tensor::{max_violation, Shape, Tensor};

/// One node's comparison.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub node: NodeId,
    pub op: &'static str,
    pub shape: Shape,
    /// Largest `|gpu - cpu|` against the CPU evaluation of the whole graph.
    pub max_abs_err: f64,
    /// Largest `|gpu - cpu| / |cpu|` over elements with `|cpu| > 1e-12`.
    pub max_rel_err: f64,
    /// Worst `|gpu - ref| / (atol + rtol |ref|)` against the CPU op on the GPU's inputs (<= 1 passes).
    pub local_violation: f64,
    /// `(atol, rtol)` of this op.
    pub tolerance: Tolerance,
    pub ok: bool,
}

/// Computed nodes of `order` whose storage a later node writes in place (an input it binds
/// read_write), so that reading them after the run gives the later node's value.
fn overwritten(nodes: &[crate::graph::Node], order: &[NodeId]) -> Vec<NodeId> {
    use crate::exec::liveness::{storage_root, view_of};
    let mut found = Vec::new();
    for (at, &y) in order.iter().enumerate() {
        let n = &nodes[y.0];
        let Some(k) = view_of(nodes, y) else { continue };
        if n.op.binding_mode(n.inputs.len()).0 > k {
            continue; // a view that does not write (a reshape)
        }
        let root = storage_root(nodes, n.inputs[k]);
        found.extend(
            order[..at]
                .iter()
                .copied()
                .filter(|&z| !nodes[z.0].op.is_source() && storage_root(nodes, z) == root),
        );
    }
    found.sort();
    found.dedup();
    found
}

/// The result of [`Device::verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Every computed node, in execution order.
    pub nodes: Vec<NodeReport>,
    /// The first node beyond its tolerance, if any.
    pub first_divergent: Option<NodeId>,
    /// The requested outputs as the plan compiled for them alone computes them (lowered: fused,
    /// implicit GEMM, split-K), against the node-by-node GPU run (`local_violation`, at the op's
    /// tolerance but no tighter than matmul's) and the CPU (`max_abs_err`, `max_rel_err`).
    pub plan_outputs: Vec<NodeReport>,
}

impl VerifyReport {
    /// True when every node, and every output of the compiled plan, is within tolerance.
    pub fn ok(&self) -> bool {
        self.first_divergent.is_none() && self.plan_outputs.iter().all(|r| r.ok)
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>5}  {:<12} {:<18} {:>11} {:>11} {:>9}  ok",
            "node", "op", "shape", "max abs", "max rel", "local"
        )?;
        for r in &self.nodes {
            writeln!(
                f,
                "{:>5}  {:<12} {:<18} {:>11.3e} {:>11.3e} {:>9.3}  {}",
                r.node.0,
                r.op,
                r.shape.to_string(),
                r.max_abs_err,
                r.max_rel_err,
                r.local_violation,
                if r.ok { "yes" } else { "NO" }
            )?;
        }
        match self.first_divergent {
            Some(id) => writeln!(f, "first node beyond tolerance: {}", id.0)?,
            None => writeln!(f, "all nodes within tolerance")?,
        }
        writeln!(
            f,
            "outputs of the plan compiled for them (lowered), against the run above:"
        )?;
        for r in &self.plan_outputs {
            writeln!(
                f,
                "{:>5}  {:<12} {:<18} {:>11.3e} {:>11.3e} {:>9.3}  {}",
                r.node.0,
                r.op,
                r.shape.to_string(),
                r.max_abs_err,
                r.max_rel_err,
                r.local_violation,
                if r.ok { "yes" } else { "NO" }
            )?;
        }
        Ok(())
    }
}

/// A node's tolerance: its op's, widened to f16's where it reads or writes f16 (a GPU and the
/// reference may round a value to opposite sides of an f16 step).
fn own_tolerance(nodes: &[crate::graph::Node], id: NodeId) -> Tolerance {
    use crate::tensor::DType;
    let n = &nodes[id.0];
    let own = n.op.tolerance();
    let half = n.dtype == DType::F16 || n.inputs.iter().any(|i| nodes[i.0].dtype == DType::F16);
    if half {
        (
            own.0.max(crate::ops::TOL_F16.0),
            own.1.max(crate::ops::TOL_F16.1),
        )
    } else {
        own
    }
}

fn errors(gpu: &[f32], cpu: &[f32]) -> (f64, f64) {
    let mut abs = 0f64;
    let mut rel = 0f64;
    for (&g, &c) in gpu.iter().zip(cpu) {
        let d = (g as f64 - c as f64).abs();
        let d = if d.is_nan() && !(g.is_nan() && c.is_nan()) {
            f64::INFINITY
        } else if d.is_nan() {
            0.0
        } else {
            d
        };
        abs = abs.max(d);
        if (c as f64).abs() > 1e-12 {
            rel = rel.max(d / (c as f64).abs());
        }
    }
    (abs, rel)
}

impl Device {
    /// Runs `graph` (the part `outputs` needs) on this GPU device and on the CPU reference with the
    /// same inputs and the device's parameter values, and compares every node.
    pub fn verify(
        &self,
        graph: &Graph,
        outputs: &[NodeId],
        inputs: &[(&str, &Tensor)],
    ) -> Result<VerifyReport> {
        self.verify_with(graph, outputs, inputs, None)
    }

    /// [`Device::verify`] with one tolerance for every node instead of each op's own.
    pub fn verify_with(
        &self,
        graph: &Graph,
        outputs: &[NodeId],
        inputs: &[(&str, &Tensor)],
        tolerance: Option<Tolerance>,
    ) -> Result<VerifyReport> {
        if self.gpu_ctx().is_none() {
            return Err(Error::Unsupported(
                "verify compares a GPU device with the CPU reference; this is the CPU device"
                    .into(),
            ));
        }
        let nodes = graph.nodes();
        crate::graph::validate(&nodes, outputs)?;
        let order = reachable(&nodes, outputs);
        let computed: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|id| !nodes[id.0].op.is_source())
            .collect();
        // parameters as they are before the run (an optimizer update in the graph changes them);
        // compiling first creates any the device does not hold yet
        let mut plan = self.compile(graph, &computed)?;
        let mut params: HashMap<String, Tensor> = HashMap::new();
        for &id in &order {
            if let Op::Param { name, .. } = &nodes[id.0].op {
                params.insert(name.clone(), self.param(name)?);
            }
        }
        // every computed node is an output of the GPU plan, so every value comes back
        let mut gpu_vals: HashMap<NodeId, Tensor> =
            computed.iter().copied().zip(plan.run(inputs)?).collect();
        // a node a later one writes in place (packed attention's dq into the dk/dv node) comes
        // back as written: its own value comes from a plan that stops at it, from the same
        // parameters
        for id in overwritten(&nodes, &order) {
            for (name, t) in &params {
                self.set_param(name, t)?;
            }
            let value = self.compile(graph, &[id])?.run(inputs)?;
            gpu_vals.extend(value.into_iter().map(|t| (id, t)));
        }

        let feeds: HashMap<&str, &Tensor> = inputs.iter().copied().collect();
        let cpu_vals = evaluate(
            &nodes,
            &order,
            |_, n| match &n.op {
                Op::Input { name } => feeds
                    .get(name.as_str())
                    .map(|t| (*t).clone())
                    .ok_or_else(|| Error::Input(format!("input {name:?} is missing"))),
                Op::Param { name, .. } => params
                    .get(name)
                    .cloned()
                    .ok_or_else(|| Error::Param(format!("no parameter named {name:?}"))),
                Op::Const { value } => Ok((**value).clone()),
                _ => unreachable!("only sources are fed"),
            },
            |_, _| Ok(()),
        )?;

        let mut reports = Vec::new();
        let mut first = None;
        for &id in &computed {
            let n = &nodes[id.0];
            let g = &gpu_vals[&id];
            let c = cpu_vals[id.0].as_ref().expect("evaluated");
            let (max_abs_err, max_rel_err) = errors(g.data(), c.data());
            // the CPU op applied to the GPU's own inputs
            let ins: Vec<Tensor> = n
                .inputs
                .iter()
                .map(|i| {
                    gpu_vals
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| cpu_vals[i.0].clone().expect("evaluated"))
                })
                .collect();
            let refs: Vec<&Tensor> = ins.iter().collect();
            let local = n.op.cpu_forward(&refs, &n.shape).rounded(n.dtype);
            let tol = tolerance.unwrap_or_else(|| own_tolerance(&nodes, id));
            let (violation, _) = max_violation(g.data(), local.data(), tol.0, tol.1);
            let ok = violation <= 1.0;
            if !ok && first.is_none() {
                first = Some(id);
            }
            reports.push(NodeReport {
                node: id,
                op: n.op.name(),
                shape: n.shape.clone(),
                max_abs_err,
                max_rel_err,
                local_violation: violation,
                tolerance: tol,
                ok,
            });
        }

        // the plan as compiled for the outputs alone, from the same parameters
        for (name, t) in &params {
            self.set_param(name, t)?;
        }
        let mut lowered = self.compile(graph, outputs)?;
        let got = lowered.run(inputs)?;
        let mut plan_outputs = Vec::new();
        for (&id, g) in outputs.iter().zip(&got) {
            let n = &nodes[id.0];
            let (Some(run), Some(c)) = (gpu_vals.get(&id), cpu_vals[id.0].as_ref()) else {
                continue;
            };
            let (max_abs_err, max_rel_err) = errors(g.data(), c.data());
            let own = own_tolerance(&nodes, id);
            let tol = tolerance.unwrap_or((
                own.0.max(crate::ops::TOL_REDUCTION.0),
                own.1.max(crate::ops::TOL_REDUCTION.1),
            ));
            let (violation, _) = max_violation(g.data(), run.data(), tol.0, tol.1);
            plan_outputs.push(NodeReport {
                node: id,
                op: n.op.name(),
                shape: n.shape.clone(),
                max_abs_err,
                max_rel_err,
                local_violation: violation,
                tolerance: tol,
                ok: violation <= 1.0,
            });
        }
        Ok(VerifyReport {
            nodes: reports,
            first_divergent: first,
            plan_outputs,
        })
    }
}
