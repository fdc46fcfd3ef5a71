//! Autotuning of the generated GEMM (`KILN_GEMM=tune`, `GemmPolicy::Tune`): the first time a
//! plan holds a product of some extents (M, N, K, batch), the best few configurations by the
//! model of `codegen::matmul::ranked` (split-K included where the model splits), each plain,
//! with register prefetching and with prefetching into a second workgroup buffer, are compiled
//! and timed on
//! the adapter, with timestamp queries where it has them (else wall clock), and the fastest is
//! kept for the device and in a file beside the pipeline cache, so later processes skip the
//! timing. WebGPU does not tell how many compute units an adapter has or how its memory behaves;
//! timing is how a configuration gets matched to an H100 and a laptop GPU alike.
//!
//! Products on the tensor-core kernel (f16 ones, and f32 ones at `Precision::Medium`) time
//! every `CoopConfig` that fits instead, unless one is fixed (`KILN_COOP`); each candidate's
//! result must match the default configuration's (which passed the device's check) or it is
//! dropped.

use std::time::Instant;

use super::gpu::{Forced, GpuPlan};
use super::liveness::reachable;
use super::lower::{coop_tune_key, tune_key};
use crate::codegen::coop::CoopConfig;
use crate::codegen::matmul::{ranked, GemmConfig};
use crate::device::{CoopCheck, Device, GemmPolicy};
use crate::error::{Error, Result};
use crate::graph::{Graph, Node, NodeId};
use crate::ops::matmul::ProductDims;
use crate::ops::Op;
use crate::tensor::DType;
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
    // the device's own check compiles plans too: its products stay as they are
    let checking = matches!(
        *ctx.coop_check.lock().expect("check lock"),
        CoopCheck::Checking(_)
    );
    for &id in order {
        let Op::MatMul(mm) = &nodes[id.0].op else {
            continue;
        };
        let n = &nodes[id.0];
        let d = mm.dims(&nodes[n.inputs[0].0].shape, &nodes[n.inputs[1].0].shape)?;
        let half = n.dtype == DType::F16;
        if half && !checking {
            // f16 products use the tensor-core kernel once it passed (a failure was logged)
            let _ = device.check_tensor_cores_once();
        }
        let on_tensor_cores = crate::codegen::coop::applies(&d)
            && if half {
                ctx.coop_f16_active()
            } else {
                ctx.coop_active()
            };
        if on_tensor_cores {
            let key = coop_tune_key(&d, n.dtype);
            if checking
                || ctx.coop_config.lock().expect("coop lock").is_some()
                || ctx.coop_tuned.lock().expect("tune lock").contains_key(&key)
            {
                continue;
            }
            let best = fastest_coop(device, &d, n.dtype)?;
            if ctx.debug {
                eprintln!("[kiln] tuned {key}: {}", best.describe());
            }
            ctx.coop_tuned.lock().expect("tune lock").insert(key, best);
            learned = true;
            continue;
        }
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
    let (g, y, [ta, tb]) = product(m, n, k, batch, DType::F32)?;
    // read back one element: the product is what gets timed
    let probe = g.narrow(g.narrow(y, -1, 0, 1)?, -2, 0, 1)?;
    let nodes = g.nodes();
    let order = reachable(&nodes, &[probe]);
    let feeds = [("a", &ta), ("b", &tb)];
    let mut best = (f64::INFINITY, first);
    for c in candidates {
        let forced = Forced::Gemm(GemmPolicy::Fixed(c));
        let mut plan = compile_forced(device, &nodes, &order, probe, forced)?;
        plan.run(&feeds, true)?;
        let what = format!("{m}x{n}x{k}b{batch} {}", c.describe());
        let t = median_time(&mut plan, &feeds, ctx.debug.then_some(what))?;
        if t < best.0 {
            best = (t, c);
        }
    }
    Ok(best.1)
}

/// A plan of `order` reading back `out`, with the kernel choice `forced` (a candidate).
fn compile_forced(
    device: &Device,
    nodes: &[Node],
    order: &[NodeId],
    out: NodeId,
    forced: Forced,
) -> Result<GpuPlan> {
    GpuPlan::compile(
        device.clone(),
        nodes.to_vec(),
        order.to_vec(),
        &[out],
        &[out],
        Some(forced),
    )
}

/// An `M x N x K` product over `batch` matrices with operands stored as `dtype`: the graph
/// (inputs `a`, `b`), its result, and random operands to feed.
fn product(
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    dtype: DType,
) -> Result<(Graph, NodeId, [Tensor; 2])> {
    let g = Graph::new();
    let (sa, sb) = if batch > 1 {
        (vec![batch, m, k], vec![batch, k, n])
    } else {
        (vec![m, k], vec![k, n])
    };
    let a = g.input_as("a", sa.clone(), dtype);
    let b = g.input_as("b", sb.clone(), dtype);
    let y = g.matmul(a, b)?;
    let ta = Tensor::rand_uniform(sa, -1.0, 1.0, 1);
    let tb = Tensor::rand_uniform(sb, -1.0, 1.0, 2);
    Ok((g, y, [ta, tb]))
}

/// The median of [`RUNS`] runs of `plan` (after a warm-up the caller did): GPU time from
/// timestamp queries where the adapter has them, else wall clock with the outputs read back;
/// printed after `debug` (`KILN_DEBUG=1`) where given.
fn median_time(
    plan: &mut GpuPlan,
    feeds: &[(&str, &Tensor)],
    debug: Option<String>,
) -> Result<f64> {
    let timed = plan.set_profiling(true).is_ok();
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        plan.run(feeds, !timed)?;
        times.push(if timed {
            plan.last_profile.iter().map(|t| t.seconds).sum()
        } else {
            start.elapsed().as_secs_f64()
        });
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let t = times[RUNS / 2];
    if let Some(what) = debug {
        eprintln!("[kiln] tune {what}: {:.1} us", t * 1e6);
    }
    Ok(t)
}

/// Times every tensor-core configuration that fits on the product `d` with operands stored
/// as `dtype`; the default configuration's result is the reference the others must match
/// (at f16 tolerance) to count.
fn fastest_coop(device: &Device, d: &ProductDims, dtype: DType) -> Result<CoopConfig> {
    let ctx = device
        .gpu_ctx()
        .ok_or_else(|| Error::Device("not a GPU device".into()))?;
    let first = *ctx.coop_default.lock().expect("coop lock");
    let mut candidates = CoopConfig::all(&ctx.target);
    candidates.retain(|&c| c != first);
    candidates.insert(0, first);
    let (m, n, k, batch) = (d.m, d.n, d.k, d.batch.numel());
    let (g, y, [ta, tb]) = product(m, n, k, batch, dtype)?;
    let nodes = g.nodes();
    let order = reachable(&nodes, &[y]);
    let feeds = [("a", &ta), ("b", &tb)];
    let mut reference: Option<Tensor> = None;
    let mut best = (f64::INFINITY, first);
    for c in candidates {
        let mut plan = compile_forced(device, &nodes, &order, y, Forced::Coop(c))?;
        let out = plan.run(&feeds, true)?.remove(0);
        match &reference {
            None => reference = Some(out),
            Some(r) => {
                let (worst, i) = crate::tensor::max_violation(out.data(), r.data(), 1e-2, 1e-2);
                if worst > 1.0 {
                    log::warn!(
                        "kiln: tensor-core configuration {} gave {} at element {i} of a \
                         {m}x{n}x{k} product where {} gave {}: not used",
                        c.describe(),
                        out.data()[i],
                        first.describe(),
                        r.data()[i]
                    );
                    continue;
                }
            }
        }
        let what = format!("coop {m}x{n}x{k}b{batch} {}", c.describe());
        let t = median_time(&mut plan, &feeds, ctx.debug.then_some(what))?;
        if t < best.0 {
            best = (t, c);
        }
    }
    Ok(best.1)
}
