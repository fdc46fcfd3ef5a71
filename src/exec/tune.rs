//! Autotuning of the generated GEMM (`KILN_GEMM=tune`, `GemmPolicy::Tune`): the first time a
//! plan holds a product of some extents (M, N, K, batch), the best few configurations by the
//! model of `codegen::matmul::ranked` (split-K included where the model splits), each plain,
//! with register prefetching and with prefetching into a second workgroup buffer, are compiled
//! and timed on
//! the adapter, with timestamp queries where it has them (else wall clock), and the fastest is
//! kept for the device and in a file beside the pipeline cache, so later processes skip the
//! timing. WebGPU does not tell how many compute units an adapter has or how its memory behaves;
//! timing is how a configuration gets matched to an H100 and a laptop GPU alike.

use std::time::Instant;

use super::gpu::GpuPlan;
use super::liveness::reachable;
use super::lower::tune_key;
use crate::codegen::matmul::{ranked, GemmConfig};
use crate::device::{Device, GemmPolicy};
use crate::error::{Error, Result};
use crate::graph::{Graph, Node, NodeId};
use crate::ops::Op;
use crate::tensor::Tensor;

/// Configurations timed per product (the model's best three tilings, each plain, prefetching
/// and double-buffered).
pub const CANDIDATES: usize = 9;

/// Timed runs per configuration (after one warm-up); the median counts.
const RUNS: usize = 3;

/// Tunes every product of `order` the device has no configuration for yet.
pub(crate) fn tune_products(device: &Device, nodes: &[Node], order: &[NodeId]) -> Result<()> {
    let ctx = device
        .gpu_ctx()
        .ok_or_else(|| Error::Device("not a GPU device".into()))?;
    let mut learned = false;
    for &id in order {
        let Op::MatMul(mm) = &nodes[id.0].op else {
            continue;
        };
        let n = &nodes[id.0];
        let d = mm.dims(&nodes[n.inputs[0].0].shape, &nodes[n.inputs[1].0].shape)?;
        let key = tune_key(&d);
        if ctx.tuned.lock().expect("tune lock").contains_key(&key) {
            continue;
        }
        let best = fastest(device, d.m, d.n, d.k, d.batch.numel())?;
        if ctx.debug {
            eprintln!("[kiln] tuned {key}: {}", best.describe());
        }
        ctx.tuned.lock().expect("tune lock").insert(key, best);
        learned = true;
    }
    if learned {
        if let Err(e) = ctx.save_tuned() {
            log::warn!("kiln: could not save the GEMM tuning table: {e}");
        }
    }
    Ok(())
}

/// Times the leading candidates for an `M x N x K` product over `batch` matrices.
fn fastest(device: &Device, m: usize, n: usize, k: usize, batch: usize) -> Result<GemmConfig> {
    let ctx = device
        .gpu_ctx()
        .ok_or_else(|| Error::Device("not a GPU device".into()))?;
    // the model's leading tilings, each plain, with register prefetching, and prefetching into
    // a second workgroup buffer (where the memory allows)
    let target = &ctx.target;
    let candidates: Vec<GemmConfig> = ranked(m, n, k, batch, target)
        .into_iter()
        .take(CANDIDATES / 3)
        .flat_map(|c| {
            [
                c,
                GemmConfig {
                    prefetch: true,
                    ..c
                },
                GemmConfig {
                    prefetch: true,
                    double_buffer: true,
                    ..c
                },
            ]
        })
        .filter(|c| c.fits(target))
        .collect();
    let Some(&first) = candidates.first() else {
        return Err(Error::Unsupported(format!(
            "no GEMM configuration fits {} for {m}x{n}x{k}",
            ctx.info.name
        )));
    };
    if candidates.len() == 1 {
        return Ok(first);
    }
    let g = Graph::new();
    let (sa, sb) = if batch > 1 {
        (vec![batch, m, k], vec![batch, k, n])
    } else {
        (vec![m, k], vec![k, n])
    };
    let a = g.input("a", sa.clone());
    let b = g.input("b", sb.clone());
    let y = g.matmul(a, b)?;
    // read back one element: the product is what gets timed
    let probe = g.narrow(g.narrow(y, -1, 0, 1)?, -2, 0, 1)?;
    let nodes = g.nodes();
    let order = reachable(&nodes, &[probe]);
    let ta = Tensor::rand_uniform(sa, -1.0, 1.0, 1);
    let tb = Tensor::rand_uniform(sb, -1.0, 1.0, 2);
    let feeds = [("a", &ta), ("b", &tb)];
    let mut best = (f64::INFINITY, first);
    for c in candidates {
        let mut plan = GpuPlan::compile(
            device.clone(),
            nodes.clone(),
            order.clone(),
            &[probe],
            &[probe],
            Some(GemmPolicy::Fixed(c)),
        )?;
        let timed = plan.set_profiling(true).is_ok();
        plan.run(&feeds, true)?;
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            plan.run(&feeds, true)?;
            times.push(if timed {
                plan.last_profile.iter().map(|t| t.seconds).sum()
            } else {
                start.elapsed().as_secs_f64()
            });
        }
        times.sort_by(|x, y| x.total_cmp(y));
        let t = times[RUNS / 2];
        if ctx.debug {
            eprintln!(
                "[kiln] tune {m}x{n}x{k}b{batch} {}: {:.1} us",
                c.describe(),
                t * 1e6
            );
        }
        if t < best.0 {
            best = (t, c);
        }
    }
    Ok(best.1)
}
