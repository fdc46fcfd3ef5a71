//! The GPU side of a plan: buffers assigned by liveness, a pipeline and bind group per kernel,
//! and `run` = one encoder, one compute pass, one submit, only the requested readbacks.

use std::collections::HashMap;
use std::sync::Arc;

use super::liveness::{assign_slots, lifetimes, storage_bytes, storage_offset, storage_root};
use super::lower;
use super::profile::{self, OpTiming, Profiler};
use super::PlanInfo;
use crate::device::{BindingMode, Device, GemmPolicy};
use crate::error::{Error, Result};
use crate::graph::{Node, NodeId};
use crate::ops::{Init, Op};
use crate::tensor::{DType, Shape, Tensor};

/// Largest workgroup count of one dispatch dimension (WebGPU's default limit).
const MAX_GROUPS_PER_DIM: u64 = 65_535;

/// Folds a linear workgroup count into a grid with at most 65,535 per dimension; kernels recover
/// the linear index as `wid.y * num_workgroups.x + wid.x` and skip the overshoot.
pub fn fold_workgroups(total: u64, limit: u64) -> Result<(u32, u32, u32)> {
    let limit = limit.clamp(1, MAX_GROUPS_PER_DIM);
    if total <= limit {
        return Ok((total.max(1) as u32, 1, 1));
    }
    let y = total.div_ceil(limit);
    if y > limit {
        return Err(Error::TooLarge {
            what: format!("a dispatch of {total} workgroups"),
            bytes: total,
            limit: limit * limit,
        });
    }
    Ok((limit as u32, y as u32, 1))
}

struct Step {
    node: NodeId,
    label: String,
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: (u32, u32, u32),
    /// `Some(n)`: dispatched n times with the step index at dynamic offsets `k * step_align`.
    repeat: Option<u32>,
    /// `(flops, bytes)` for the profiler.
    cost: (f64, f64),
}

/// Where a requested output lives; its staging buffer is at the same index of `GpuPlan::staging`.
struct Readback {
    buffer: Arc<wgpu::Buffer>,
    /// Bytes into `buffer` (a view of part of it).
    offset: u64,
    shape: Shape,
    dtype: DType,
}

pub(crate) struct GpuPlan {
    device: Device,
    steps: Vec<Step>,
    /// input name -> its buffer and element type
    inputs: HashMap<String, (Arc<wgpu::Buffer>, DType)>,
    readbacks: Vec<Readback>,
    /// mappable copies of the outputs, with their sizes (made once, mapped every run)
    staging: Vec<(wgpu::Buffer, u64)>,
    /// buffers the plan writes, for `poison`
    slots: Vec<(Arc<wgpu::Buffer>, u64)>,
    pub(crate) info: PlanInfo,
    profiler: Option<Profiler>,
    pub(crate) last_profile: Vec<OpTiming>,
    /// Kept alive for the bind groups of recurrent kernels.
    _step_buffer: Option<wgpu::Buffer>,
    step_align: u32,
}

/// A kernel choice a plan makes regardless of the device's settings (`exec::tune` timing
/// candidates).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Forced {
    /// This GEMM policy.
    Gemm(GemmPolicy),
    /// This tensor-core configuration (GEMMs chosen automatically).
    Coop(crate::codegen::coop::CoopConfig),
}

impl GpuPlan {
    /// Compiles `order` so that `run` reads back `outputs`; `targets` (the outputs and the
    /// effects) are the nodes whose values the plan must produce, which fusion keeps.
    pub(crate) fn compile(
        device: Device,
        mut nodes: Vec<Node>,
        mut order: Vec<NodeId>,
        outputs: &[NodeId],
        targets: &[NodeId],
        forced: Option<Forced>,
    ) -> Result<GpuPlan> {
        let ctx = device
            .gpu_ctx()
            .ok_or_else(|| Error::Device("not a GPU device".into()))?;
        let policy = match forced {
            Some(Forced::Gemm(p)) => p,
            Some(Forced::Coop(_)) => GemmPolicy::Auto,
            None => *ctx.gemm_policy.lock().expect("policy lock"),
        };
        if policy == GemmPolicy::Tune {
            super::tune::tune_products(&device, &nodes, &order)?;
        }
        let tuned = ctx.tuned.lock().expect("tune lock").clone();
        let coop_tuned = ctx.coop_tuned.lock().expect("tune lock").clone();
        let coop_fixed = match forced {
            Some(Forced::Coop(c)) => Some(c),
            _ => *ctx.coop_config.lock().expect("coop lock"),
        };
        let coop_default = *ctx.coop_default.lock().expect("coop lock");
        let f16_products = order
            .iter()
            .any(|id| matches!(nodes[id.0].op, Op::MatMul(_)) && nodes[id.0].dtype == DType::F16);
        if f16_products {
            // the tensor-core kernel is checked once before f16 products use it; a failed check
            // leaves them on the tiled kernels (and was logged)
            let _ = device.check_tensor_cores_once();
        }
        let ch = lower::Choice {
            target: &ctx.target,
            policy,
            coop: ctx.coop_active(),
            coop_f16: ctx.coop_f16_active(),
            coop_fixed,
            coop_default,
            tuned: &tuned,
            coop_tuned: &coop_tuned,
        };
        let fusion = ctx.fusion.load(std::sync::atomic::Ordering::Relaxed);
        lower::lower(&mut nodes, &mut order, outputs, targets, &ch, fusion);
        if let Some(id) = order.iter().find(|id| nodes[id.0].dtype == DType::F16) {
            if !ctx.features.contains(wgpu::Features::SHADER_F16) {
                return Err(Error::Unsupported(format!(
                    "node {} ({}) is f16, but {} lacks SHADER_F16: keep the graph in f32",
                    id.0,
                    nodes[id.0].op.name(),
                    ctx.info.name
                )));
            }
        }
        let bytes_of = |id: NodeId| nodes[id.0].dtype.buffer_bytes(nodes[id.0].shape.numel());
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;

        let mut storage: HashMap<NodeId, Arc<wgpu::Buffer>> = HashMap::new();
        let mut inputs = HashMap::new();
        let mut info = PlanInfo {
            nodes: order.len(),
            ..Default::default()
        };

        // sources: inputs get their own buffer, constants are uploaded now, parameters live on the device
        for &id in &order {
            let n = &nodes[id.0];
            let buf = match &n.op {
                Op::Input { name } => {
                    let b = Arc::new(ctx.create_buffer(
                        &format!("input {name}"),
                        bytes_of(id),
                        usage,
                    )?);
                    inputs.insert(name.clone(), (b.clone(), n.dtype));
                    b
                }
                Op::Const { value } => {
                    let b =
                        ctx.create_buffer(&format!("const node {}", id.0), bytes_of(id), usage)?;
                    ctx.queue.write_buffer(&b, 0, &value.to_bytes(n.dtype));
                    Arc::new(b)
                }
                Op::Param { name, init } => {
                    ctx.param_buffer(name, &n.shape, n.dtype, || match init {
                        Init::Zeros => Tensor::zeros(n.shape.clone()),
                        Init::Value(t) => (**t).clone(),
                    })?
                }
                _ => continue,
            };
            info.peak_bytes += bytes_of(id);
            info.tensor_bytes += bytes_of(id);
            storage.insert(id, buf);
        }

        // computed tensors share buffers where their lifetimes allow
        let lives = lifetimes(&nodes, &order, outputs);
        let plain: Vec<_> = lives.iter().map(|(_, l)| *l).collect();
        let assignment = assign_slots(&plain);
        let mut slots = Vec::new();
        for (s, &bytes) in assignment.slot_bytes.iter().enumerate() {
            let b = Arc::new(ctx.create_buffer(&format!("slot {s}"), bytes, usage)?);
            slots.push((b, bytes));
        }
        for (i, (id, l)) in lives.iter().enumerate() {
            storage.insert(*id, slots[assignment.slot_of[i]].0.clone());
            info.tensor_bytes += l.bytes;
        }
        info.buffers = slots.len();
        info.peak_bytes += assignment.slot_bytes.iter().sum::<u64>();

        // recurrent kernels read their step index from one uniform buffer at dynamic offsets
        let step_align = ctx.limits.min_uniform_buffer_offset_alignment.max(16) as u64;
        let max_repeat = order
            .iter()
            .filter_map(|id| {
                let n = &nodes[id.0];
                let shapes: Vec<&Shape> = n.inputs.iter().map(|i| &nodes[i.0].shape).collect();
                n.op.repeat(&shapes, &ctx.target)
            })
            .max()
            .unwrap_or(0) as u64;
        let step_buffer = if max_repeat > 0 {
            let b = ctx.create_buffer(
                "step indices",
                max_repeat * step_align,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            )?;
            let mut words = vec![0u32; (max_repeat * step_align / 4) as usize];
            for k in 0..max_repeat {
                words[(k * step_align / 4) as usize] = k as u32;
            }
            ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(&words));
            Some(b)
        } else {
            None
        };

        // one pipeline and one bind group per kernel
        let mut steps = Vec::new();
        for &id in &order {
            let n = &nodes[id.0];
            let in_shapes: Vec<&Shape> = n.inputs.iter().map(|i| &nodes[i.0].shape).collect();
            let in_dtypes: Vec<DType> = n.inputs.iter().map(|i| nodes[i.0].dtype).collect();
            let Some((spec, generated)) =
                lower::select(&n.op, &in_shapes, &in_dtypes, &n.shape, n.dtype, &ch)
            else {
                continue;
            };
            let (rw_from, output) = n.op.binding_mode(n.inputs.len());
            let repeat = n.op.repeat(&in_shapes, &ctx.target);
            let mode = BindingMode {
                n_inputs: n.inputs.len(),
                rw_from,
                output,
                step: repeat.is_some(),
            };
            let pipeline = ctx.pipeline(
                spec.family,
                spec.entry,
                &spec.constants,
                mode,
                generated.as_ref(),
            )?;
            let (layout, _) = ctx.layout(mode);
            let own = output.then_some(id);
            let bound: Vec<NodeId> = n.inputs.iter().copied().chain(own).collect();
            // the tensor a strided narrow on `t`'s view chain reads the rows of
            let strided_source = |mut t: NodeId| loop {
                if let Op::AxisCopy(c) = nodes[t.0].op {
                    if c.strided {
                        return Some(nodes[t.0].inputs[0]);
                    }
                }
                match super::liveness::view_of(&nodes, t) {
                    Some(k) => t = nodes[t.0].inputs[k],
                    None => return None,
                }
            };
            let shift = repeat.is_some() as u32;
            let mut entries: Vec<wgpu::BindGroupEntry> = bound
                .iter()
                .enumerate()
                .map(|(b, &t)| {
                    let root = storage_root(&nodes, t);
                    // a computed node bound as itself includes the scratch its kernel writes;
                    // a strided narrow (or a reshape of one) is bound as the tensor whose rows
                    // its readers read
                    let bytes = match (root == t && !nodes[t.0].op.is_source(), strided_source(t)) {
                        (true, _) => storage_bytes(&nodes, t),
                        (false, Some(x)) => bytes_of(x),
                        (false, None) => bytes_of(t),
                    };
                    wgpu::BindGroupEntry {
                        binding: b as u32 + shift,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &storage[&root],
                            offset: storage_offset(&nodes, t),
                            size: wgpu::BufferSize::new(bytes),
                        }),
                    }
                })
                .collect();
            if let (Some(_), Some(sb)) = (repeat, &step_buffer) {
                entries.insert(
                    0,
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: sb,
                            offset: 0,
                            size: wgpu::BufferSize::new(16),
                        }),
                    },
                );
            }
            // f16 nodes say so (f32 is the default)
            let shape = match n.dtype {
                DType::F32 => n.shape.to_string(),
                other => format!("{} {other}", n.shape),
            };
            let name = match &n.op {
                Op::AxisCopy(a) => a.label(in_shapes[0], &n.shape),
                op => op.name(),
            };
            let label = match &generated {
                Some(g) => format!("node {} {name} {shape} [{}]", id.0, g.key),
                None => format!("node {} {name} {shape}", id.0),
            };
            let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&label),
                layout: &layout,
                entries: &entries,
            });
            let groups = fold_workgroups(
                spec.workgroups,
                ctx.limits.max_compute_workgroups_per_dimension as u64,
            )?;
            steps.push(Step {
                node: id,
                label,
                pipeline,
                bind_group,
                groups,
                repeat,
                cost: n.op.cost(&in_shapes, &n.shape),
            });
        }
        info.dispatches = steps.iter().map(|s| s.repeat.unwrap_or(1) as usize).sum();

        // staging buffers for the requested outputs only
        let (mut readbacks, mut staging_bufs) = (Vec::new(), Vec::new());
        for (k, &o) in outputs.iter().enumerate() {
            let bytes = bytes_of(o);
            let staging = ctx.create_buffer(
                &format!("output {k} staging"),
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            readbacks.push(Readback {
                buffer: storage[&storage_root(&nodes, o)].clone(),
                offset: storage_offset(&nodes, o),
                shape: nodes[o.0].shape.clone(),
                dtype: nodes[o.0].dtype,
            });
            staging_bufs.push((staging, bytes));
        }

        if ctx.debug {
            eprintln!("[kiln] plan on {}: {info}", ctx.info.name);
            for s in &steps {
                let slot = lives
                    .iter()
                    .position(|(id, _)| *id == s.node)
                    .map(|i| assignment.slot_of[i]);
                eprintln!(
                    "[kiln]   {:<40} grid {:?} -> slot {:?}",
                    s.label, s.groups, slot
                );
            }
        }
        Ok(GpuPlan {
            device,
            steps,
            inputs,
            readbacks,
            staging: staging_bufs,
            slots,
            info,
            _step_buffer: step_buffer,
            step_align: step_align as u32,
            profiler: None,
            last_profile: Vec::new(),
        }
        .with_env_profiling())
    }

    pub(crate) fn run(&mut self, given: &[(&str, &Tensor)], readback: bool) -> Result<Vec<Tensor>> {
        let ctx = self
            .device
            .gpu_ctx()
            .ok_or_else(|| Error::Device("not a GPU device".into()))?;
        ctx.check_health()?;
        for (name, t) in given {
            // inputs the outputs do not depend on have no buffer and are ignored
            if let Some((b, dtype)) = self.inputs.get(*name) {
                ctx.queue.write_buffer(b, 0, &t.to_bytes(*dtype));
            }
        }
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kiln plan run"),
            });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("kiln plan"),
                timestamp_writes: None,
            });
            for (i, s) in self.steps.iter().enumerate() {
                let timed = self.profiler.as_ref().filter(|p| (i as u32) < p.steps);
                if let Some(p) = timed {
                    pass.write_timestamp(&p.query_set, 2 * i as u32);
                }
                pass.set_pipeline(&s.pipeline);
                match s.repeat {
                    None => {
                        pass.set_bind_group(0, &s.bind_group, &[]);
                        pass.dispatch_workgroups(s.groups.0, s.groups.1, s.groups.2);
                    }
                    Some(n) => {
                        for k in 0..n {
                            pass.set_bind_group(0, &s.bind_group, &[k * self.step_align]);
                            pass.dispatch_workgroups(s.groups.0, s.groups.1, s.groups.2);
                        }
                    }
                }
                if let Some(p) = timed {
                    pass.write_timestamp(&p.query_set, 2 * i as u32 + 1);
                }
            }
        }
        if let Some(p) = &self.profiler {
            p.resolve(&mut enc);
        }
        if readback {
            for (r, (s, bytes)) in self.readbacks.iter().zip(&self.staging) {
                enc.copy_buffer_to_buffer(&r.buffer, r.offset, s, 0, *bytes);
            }
        }
        ctx.queue.submit([enc.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!("running a plan: {e}")));
        }
        if let Some(p) = &self.profiler {
            let secs = p.read(ctx)?;
            self.last_profile = self
                .steps
                .iter()
                .zip(secs)
                .map(|(s, seconds)| OpTiming {
                    label: s.label.clone(),
                    seconds,
                    flops: s.cost.0,
                    bytes: s.cost.1,
                })
                .collect();
            if ctx.profile_env {
                eprintln!(
                    "[kiln profile] {}\n{}",
                    ctx.info.name,
                    profile::table(&self.last_profile)
                );
            }
        }
        if !readback {
            // let finished work retire without waiting for this submission
            let _ = ctx.device.poll(wgpu::PollType::Poll);
            return Ok(Vec::new());
        }
        let data = ctx.map_and_read_bytes(&self.staging)?;
        data.into_iter()
            .zip(&self.readbacks)
            .map(|(d, r)| Tensor::from_bytes(r.shape.clone(), r.dtype, &d))
            .collect()
    }

    fn with_env_profiling(mut self) -> Self {
        if self
            .device
            .gpu_ctx()
            .map(|c| c.profile_env)
            .unwrap_or(false)
        {
            if let Err(e) = self.set_profiling(true) {
                log::warn!("KILN_PROFILE=1: {e}");
            }
        }
        self
    }

    pub(crate) fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.profiler = match (on, self.device.gpu_ctx()) {
            (true, Some(ctx)) => Some(Profiler::new(ctx, self.steps.len())?),
            _ => None,
        };
        Ok(())
    }

    pub(crate) fn kernel_labels(&self) -> Vec<&str> {
        self.steps.iter().map(|s| s.label.as_str()).collect()
    }

    pub(crate) fn poison(&mut self, value: f32) {
        if let Some(ctx) = self.device.gpu_ctx() {
            // a NaN whose two halves are f16 NaNs as well, so that f16 tensors sharing the
            // slots are poisoned too
            let word = if value.is_nan() {
                f32::from_bits(0x7fc0_7fc0)
            } else {
                value
            };
            for (b, bytes) in &self.slots {
                let fill = vec![word; (*bytes / 4) as usize];
                ctx.queue.write_buffer(b, 0, bytemuck::cast_slice(&fill));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_large_grids() {
        assert_eq!(fold_workgroups(10, 65_535).unwrap(), (10, 1, 1));
        assert_eq!(fold_workgroups(65_535, 65_535).unwrap(), (65_535, 1, 1));
        let (x, y, _) = fold_workgroups(70_000, 65_535).unwrap();
        assert!(x as u64 * y as u64 >= 70_000);
        assert!(fold_workgroups(65_535 * 65_535 + 1, 65_535).is_err());
    }
}
