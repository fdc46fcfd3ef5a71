//! Plans: `compile(graph)` fixes the order, lifetimes, buffers, pipelines and bind groups once;
//! `run(plan)` then records one encoder, submits once and reads back only the requested outputs.

pub(crate) mod fuse;
pub mod gpu;
pub mod liveness;
pub(crate) mod lower;
pub mod profile;
pub(crate) mod tune;

use crate::cpu::CpuPlan;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// What a compiled plan holds, for reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanInfo {
    /// Nodes the plan evaluates (those the outputs depend on).
    pub nodes: usize,
    /// Kernel launches per run.
    pub dispatches: usize,
    /// Buffers that hold intermediate and output tensors after reuse.
    pub buffers: usize,
    /// Bytes the plan allocates: reused buffers, inputs, constants and parameters.
    pub peak_bytes: u64,
    /// Bytes all of its tensors would take with a buffer each (views excluded).
    pub tensor_bytes: u64,
}

impl std::fmt::Display for PlanInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} nodes, {} dispatches, {} reused buffers, peak {} bytes (all tensors: {} bytes)",
            self.nodes, self.dispatches, self.buffers, self.peak_bytes, self.tensor_bytes
        )
    }
}

enum Backend {
    Gpu(Box<gpu::GpuPlan>),
    Cpu(CpuPlan),
}

/// A graph compiled for one device: run it many times with new inputs.
pub struct Plan {
    backend: Backend,
    /// Inputs the outputs depend on: `run` needs each of them.
    inputs: Vec<(String, Shape)>,
    /// Every input of the graph: others may be given to `run` and are then ignored.
    graph_inputs: Vec<(String, Shape)>,
    outputs: Vec<NodeId>,
}

impl Device {
    /// Compiles `graph` so that `run` computes `outputs`. Done once; pipelines are cached on the
    /// device and shared with other plans.
    pub fn compile(&self, graph: &Graph, outputs: &[NodeId]) -> Result<Plan> {
        self.compile_with(graph, outputs, &[])
    }

    /// Compiles `graph` so that `run` computes and reads back `outputs`, and also runs `effects`
    /// (nodes such as optimizer updates whose work is writing parameters in place) without
    /// reading them back, and the graph's state updates whose value the plan computes (a
    /// training-mode batch norm's running statistics: [`Graph::running_update`]). `Plan::step`
    /// runs it reading nothing back.
    pub fn compile_with(
        &self,
        graph: &Graph,
        outputs: &[NodeId],
        effects: &[NodeId],
    ) -> Result<Plan> {
        let nodes = graph.nodes();
        crate::graph::validate(&nodes, outputs)?;
        crate::graph::validate(&nodes, effects)?;
        if outputs.is_empty() && effects.is_empty() {
            return Err(Error::Input("a plan needs at least one output".into()));
        }
        let mut targets: Vec<NodeId> = outputs.iter().chain(effects).copied().collect();
        let mut order = liveness::reachable(&nodes, &targets);
        // state updates (running statistics) run with every plan that computes their value (seen
        // through views such as reshapes, which only the update may read)
        let computed: std::collections::HashSet<NodeId> = order.iter().copied().collect();
        let updates: Vec<NodeId> = graph
            .state_updates()
            .into_iter()
            .filter(|&u| {
                let value = liveness::storage_root(&nodes, nodes[u.0].inputs[0]);
                computed.contains(&value) && !targets.contains(&u)
            })
            .collect();
        if !updates.is_empty() {
            targets.extend(updates);
            order = liveness::reachable(&nodes, &targets);
        }
        let input_of = |id: &NodeId| match &nodes[id.0].op {
            crate::ops::Op::Input { name } => Some((name.clone(), nodes[id.0].shape.clone())),
            _ => None,
        };
        let inputs = order.iter().filter_map(input_of).collect();
        let all: Vec<NodeId> = (0..nodes.len()).map(NodeId).collect();
        let graph_inputs = all.iter().filter_map(input_of).collect();
        let backend = match self.gpu_ctx() {
            Some(_) => Backend::Gpu(Box::new(gpu::GpuPlan::compile(
                self.clone(),
                nodes,
                order,
                outputs,
                &targets,
                None,
            )?)),
            None => Backend::Cpu(CpuPlan::compile(self.clone(), nodes, order, outputs)?),
        };
        Ok(Plan {
            backend,
            inputs,
            graph_inputs,
            outputs: outputs.to_vec(),
        })
    }
}

impl Plan {
    /// Runs the plan: `inputs` gives every graph input by name; returns the outputs in the order
    /// they were asked for at compile time.
    pub fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Vec<Tensor>> {
        self.check_inputs(inputs)?;
        match &mut self.backend {
            Backend::Gpu(p) => p.run(inputs, true),
            Backend::Cpu(p) => p.run(inputs, true),
        }
    }

    /// Runs the plan and reads nothing back: one submission (a training step that does not need
    /// its loss this time). GPU errors surface here or at the next run.
    pub fn step(&mut self, inputs: &[(&str, &Tensor)]) -> Result<()> {
        self.check_inputs(inputs)?;
        match &mut self.backend {
            Backend::Gpu(p) => p.run(inputs, false).map(|_| ()),
            Backend::Cpu(p) => p.run(inputs, false).map(|_| ()),
        }
    }

    fn check_inputs(&self, given: &[(&str, &Tensor)]) -> Result<()> {
        for (i, (name, t)) in given.iter().enumerate() {
            let Some((_, shape)) = self.graph_inputs.iter().find(|(n, _)| n == name) else {
                let known: Vec<&str> = self.graph_inputs.iter().map(|(n, _)| n.as_str()).collect();
                return Err(Error::Input(format!(
                    "the plan has no input {name:?} (its inputs: {known:?})"
                )));
            };
            if t.shape() != shape {
                return Err(Error::Input(format!(
                    "input {name:?} must have shape {shape}, got {}",
                    t.shape()
                )));
            }
            if given[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Input(format!("input {name:?} is given twice")));
            }
        }
        for (name, _) in &self.inputs {
            if !given.iter().any(|(n, _)| n == name) {
                return Err(Error::Input(format!("input {name:?} is missing")));
            }
        }
        Ok(())
    }

    /// Buffers, dispatches and memory of the plan.
    pub fn info(&self) -> PlanInfo {
        match &self.backend {
            Backend::Gpu(p) => p.info.clone(),
            Backend::Cpu(p) => p.info.clone(),
        }
    }

    /// The kernels one run dispatches, in order, by label: `node <id> <op> <shape>`, with the
    /// generated kernel's key in brackets (`[coop16...]` for the tensor-core GEMM, `[gemv...]`,
    /// ...); a per-step recurrent kernel appears once (`info().dispatches` counts its steps).
    /// Empty on the CPU backend.
    pub fn kernels(&self) -> Vec<&str> {
        match &self.backend {
            Backend::Gpu(p) => p.kernel_labels(),
            Backend::Cpu(_) => Vec::new(),
        }
    }

    /// The graph inputs the plan needs, with their shapes.
    pub fn inputs(&self) -> &[(String, Shape)] {
        &self.inputs
    }

    /// The nodes `run` returns, in order.
    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }

    /// Turns per-op GPU timing on or off for this plan (`KILN_PROFILE=1` turns it on for all);
    /// an error where the adapter lacks TIMESTAMP_QUERY_INSIDE_PASSES. A no-op on the CPU.
    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        match &mut self.backend {
            Backend::Gpu(p) => p.set_profiling(on),
            Backend::Cpu(_) => Ok(()),
        }
    }

    /// Each op's GPU time in the last profiled run, in plan order (empty when not profiling).
    pub fn profile(&self) -> &[profile::OpTiming] {
        match &self.backend {
            Backend::Gpu(p) => &p.last_profile,
            Backend::Cpu(_) => &[],
        }
    }

    /// Fills every buffer the plan writes (intermediates and outputs) with `value`, so that a
    /// kernel that skips an element is caught by the result (tests poison with NaN).
    pub fn poison(&mut self, value: f32) {
        if let Backend::Gpu(p) = &mut self.backend {
            p.poison(value);
        }
    }
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("info", &self.info())
            .finish()
    }
}
