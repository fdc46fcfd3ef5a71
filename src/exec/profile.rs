//! Per-op GPU profiler from timestamp queries written inside the compute pass
//! (TIMESTAMP_QUERY_INSIDE_PASSES). `KILN_PROFILE=1` turns it on for every plan and prints, after
//! each run, every op's time, its share of the plan, and its achieved GFLOP/s (matmul-like ops) or
//! GB/s (the rest); `Plan::set_profiling` does the same from code and `Plan::profile` returns the
//! last run's timings.

use crate::device::GpuContext;
use crate::error::{Error, Result};

/// One op's measured time in the last profiled run.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTiming {
    /// `node <id> <op> <shape>`.
    pub label: String,
    pub seconds: f64,
    /// Floating-point operations the op performs (0 for data movement).
    pub flops: f64,
    /// Bytes it reads and writes, at least once each.
    pub bytes: f64,
}

impl OpTiming {
    /// Achieved rate: GFLOP/s for compute-bound ops, else GB/s, with its unit.
    pub fn rate(&self) -> (f64, &'static str) {
        let s = self.seconds.max(1e-12);
        if self.flops > 0.0 {
            (self.flops / s / 1e9, "GFLOP/s")
        } else {
            (self.bytes / s / 1e9, "GB/s")
        }
    }
}

/// Formats timings as the table `KILN_PROFILE=1` prints.
pub fn table(timings: &[OpTiming]) -> String {
    let total: f64 = timings.iter().map(|t| t.seconds).sum();
    let mut s = format!(
        "{:<48} {:>10} {:>7} {:>14}\n",
        "op", "time", "share", "rate"
    );
    for t in timings {
        let (r, unit) = t.rate();
        s += &format!(
            "{:<48} {:>8.1}us {:>6.1}% {:>8.2} {unit}\n",
            t.label,
            t.seconds * 1e6,
            100.0 * t.seconds / total.max(1e-12),
            r
        );
    }
    s += &format!(
        "{:<48} {:>8.1}us\n",
        "total (GPU time of the ops)",
        total * 1e6
    );
    s
}

/// Timestamp queries around each step of a plan.
pub(crate) struct Profiler {
    pub(crate) query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Steps measured (the first `steps` of the plan; 2 queries each).
    pub(crate) steps: u32,
    period_ns: f64,
}

impl Profiler {
    pub(crate) fn new(ctx: &GpuContext, n_steps: usize) -> Result<Profiler> {
        if !ctx
            .features
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
        {
            return Err(Error::Unsupported(format!(
                "profiling needs TIMESTAMP_QUERY_INSIDE_PASSES, which {} lacks",
                ctx.info.name
            )));
        }
        let steps = (n_steps as u32).clamp(1, wgpu::QUERY_SET_MAX_QUERIES / 2);
        let query_set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kiln profile timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: steps * 2,
        });
        let bytes = steps as u64 * 16;
        let resolve = ctx.create_buffer(
            "profile resolve",
            bytes,
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let staging = ctx.create_buffer(
            "profile staging",
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        Ok(Profiler {
            query_set,
            resolve,
            staging,
            steps,
            period_ns: ctx.queue.get_timestamp_period() as f64,
        })
    }

    /// Records the copy of the timestamps (after the compute pass).
    pub(crate) fn resolve(&self, enc: &mut wgpu::CommandEncoder) {
        enc.resolve_query_set(&self.query_set, 0..self.steps * 2, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.staging, 0, self.steps as u64 * 16);
    }

    /// Reads the timestamps of a finished submission: seconds per step.
    pub(crate) fn read(&self, ctx: &GpuContext) -> Result<Vec<f64>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(format!("waiting for the GPU: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Device("profile readback never completed".into()))?
            .map_err(|e| Error::Device(format!("mapping profile timestamps: {e}")))?;
        let view = self
            .staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device(format!("{e:?}")))?;
        let ticks: Vec<u64> = bytemuck::cast_slice::<u8, u64>(&view).to_vec();
        drop(view);
        self.staging.unmap();
        Ok(ticks
            .chunks(2)
            .map(|c| c[1].saturating_sub(c[0]) as f64 * self.period_ns * 1e-9)
            .collect())
    }
}
