//! `kiln-bench`: a fixed benchmark suite run on the GPU and on the CPU reference, printed as a
//! table with the GPU/CPU ratio and written as JSON.
//!
//!     kiln-bench [--json PATH] [--quick] [--no-cpu] [--only SUBSTRING]...
//!     kiln-bench --sweep N [--quick]      # every GEMM (and tensor-core) configuration on an N^3 product
//!
//! Cases: square f32 matmuls (256, 1024; 4096 on a hardware GPU), conv2d forward (batch 64,
//! 32 -> 64 channels, 13x13, 3x3; and the issue-6 shape, batch 64, 64 -> 64, 56x56, on a hardware
//! GPU), a depthwise 3x3 convolution forward and backward (batch 16, 32 channels, 28x28; 64 x
//! 256 x 56x56 on a hardware GPU), relu over 16M floats, the MNIST CNN training step (batch 64, Adam; also with batch norms) and an LSTM training
//! step (batch 64, 32 steps, hidden 128), and a chain of five elementwise ops (the plan compiler's
//! fusion); with SHADER_F16 also f16 matmuls, chain and conv, and the two training steps in
//! mixed precision; causal attention forward, and forward with backward (batch 2, 4 heads, 128
//! tokens, head 64; and 8 x 16 heads x 1024 tokens on a hardware GPU, also f16) and a GPT-style transformer training step
//! (2 layers of width 64, 16 windows of 64 tokens; 4 x 512 over 32 x 256 on a hardware GPU).
//! Operands of the kernel cases live on the device (as weights do). Each case is compiled
//! once, warmed up, then timed two ways: "per run" is wall clock per run that waits for the GPU (a
//! readback of one small output), submission and synchronisation included; "kernels" is the GPU
//! time of the plan's ops from timestamp queries (where the adapter has
//! TIMESTAMP_QUERY_INSIDE_PASSES). The CPU reference is skipped where it would take minutes
//! (marked "-"). `KILN_GEMM` picks the matmul kernels (see `kiln::GemmPolicy`).

use std::time::{Duration, Instant};

use clap::Parser;
use kiln::graph::Conv2dOpts;
use kiln::nn::{
    Embedding, Init, Layer, LayerNorm, Linear, Lstm, Optimizer, TrainStep, TransformerEncoderLayer,
};
use kiln::{Device, Graph, Plan, Tensor};

#[derive(Parser, Debug)]
#[command(about = "kiln's benchmark suite: GPU against the CPU reference")]
struct Args {
    /// Write the results as JSON here
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Fewer repetitions
    #[arg(long)]
    quick: bool,
    /// Skip the CPU reference
    #[arg(long)]
    no_cpu: bool,
    /// Run only the cases whose name contains one of these (repeatable), e.g. `--only matmul`
    #[arg(long)]
    only: Vec<String>,
    /// Instead of the suite: time an N x N x N matmul with every GEMM configuration that fits
    /// the adapter (each tiling, BK 8 and 16, plain, prefetching, double-buffered), and an f16
    /// one with every tensor-core configuration where the adapter has them, best first
    #[arg(long, value_name = "N")]
    sweep: Option<usize>,
}

/// `--sweep N`: every fitting configuration of the tensor-core kernel (f16) and of the
/// generated GEMM (f32) on an `n`^3 product, by GPU kernel time (wall clock where the adapter
/// cannot time inside a pass).
fn sweep(gpu: &Device, n: usize, reps: usize) -> kiln::Result<()> {
    use kiln::codegen::matmul::{GemmConfig, TILINGS};
    let target = gpu
        .target()
        .ok_or_else(|| kiln::Error::Device("not a GPU".into()))?;
    let mut results = Vec::new();
    // first (the least known) the tensor-core kernel's configurations on an f16 product, where
    // the adapter has it; each passes the device's check when fixed, or is reported and skipped
    if target.coop_f16 {
        for c in kiln::codegen::coop::CoopConfig::all(&target) {
            let name = format!("tensor cores {}", c.describe());
            if let Err(e) = gpu.set_coop_config(Some(c)) {
                println!("{name:<28} skipped: {e}");
                continue;
            }
            let mut case = matmul_as(gpu, n, "", kiln::DType::F16)?;
            let wall = time(&mut case, reps, Duration::from_secs(10))?;
            let t = case.kernel_seconds(reps.min(5))?.unwrap_or(wall);
            let rate = case.work / t / 1e9;
            println!("{name:<28} {rate:>10.2} GFLOP/s (f16)");
            results.push((rate, name));
        }
        if let Err(e) = gpu.set_coop_config(None) {
            println!("tensor cores, default configuration: {e}");
        }
    }
    for &(bm, bn, tm, tn) in TILINGS {
        for bk in [8, 16] {
            for (prefetch, double_buffer) in [(false, false), (true, false), (true, true)] {
                let cfg = GemmConfig {
                    bm,
                    bn,
                    bk,
                    tm,
                    tn,
                    split: 1,
                    prefetch,
                    double_buffer,
                };
                if !cfg.fits(&target) {
                    continue;
                }
                gpu.set_gemm_policy(kiln::GemmPolicy::Fixed(cfg))?;
                let mut case = matmul(gpu, n)?;
                let wall = time(&mut case, reps, Duration::from_secs(10))?;
                let t = case.kernel_seconds(reps.min(5))?.unwrap_or(wall);
                let rate = case.work / t / 1e9;
                println!("{:<28} {rate:>10.2} GFLOP/s", cfg.describe());
                results.push((rate, cfg.describe()));
            }
        }
    }
    gpu.set_gemm_policy(kiln::GemmPolicy::Auto)?;
    results.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("best for {n}^3:");
    for (rate, name) in results.iter().take(5) {
        println!("  {name:<28} {rate:>10.2} GFLOP/s");
    }
    Ok(())
}

/// What a case runs: a plan with its feeds, or a training step.
enum Runner {
    Plan(Plan, Vec<(String, Tensor)>),
    Train(Box<TrainStep>, Vec<(String, Tensor)>),
}

/// A compiled case: its runner, its work per run and the unit of its rate.
struct Case {
    name: String,
    /// FLOPs (or bytes, or images) per run.
    work: f64,
    unit: &'static str,
    runner: Runner,
    /// Count only the kernels whose profiler label contains this (f16 cases: the casts of their
    /// f32-resident operands are not the work measured).
    kernels: Option<&'static str>,
}

impl Case {
    /// One run, waiting for its (small) result.
    fn run(&mut self) -> kiln::Result<()> {
        match &mut self.runner {
            Runner::Plan(p, feeds) => {
                let f: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
                p.run(&f).map(|_| ())
            }
            Runner::Train(step, feeds) => {
                let f: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
                step.step(&f, true).map(|_| ())
            }
        }
    }

    fn plan_mut(&mut self) -> &mut Plan {
        match &mut self.runner {
            Runner::Plan(p, _) => p,
            Runner::Train(s, _) => s.plan_mut(),
        }
    }

    /// GPU time of the ops of one run from timestamp queries (median of a few runs), or `None`
    /// where the adapter cannot time inside a pass.
    fn kernel_seconds(&mut self, reps: usize) -> kiln::Result<Option<f64>> {
        if self.plan_mut().set_profiling(true).is_err() {
            return Ok(None);
        }
        let mut times = Vec::new();
        for _ in 0..reps.max(1) {
            self.run()?;
            let only = self.kernels;
            times.push(
                self.plan_mut()
                    .profile()
                    .iter()
                    .filter(|t| only.is_none_or(|o| t.label.contains(o)))
                    .map(|t| t.seconds)
                    .sum::<f64>(),
            );
        }
        self.plan_mut().set_profiling(false)?;
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(Some(times[times.len() / 2]))
    }
}

fn plan_case(
    name: String,
    work: f64,
    unit: &'static str,
    plan: Plan,
    feeds: Vec<(String, Tensor)>,
) -> Case {
    Case {
        name,
        work,
        unit,
        runner: Runner::Plan(plan, feeds),
        kernels: None,
    }
}

/// A parameter holding `value` on the device: operands that stay on the GPU between runs, as
/// weights do, so that a run times the kernels rather than host uploads.
fn resident(dev: &Device, g: &Graph, name: &str, value: Tensor) -> kiln::Result<kiln::NodeId> {
    dev.set_param(name, &value)?;
    Ok(g.param(name, value.shape().clone()))
}

/// An operand of `shape` resident in f32 (as weights are) and, for an f16 case, cast in the
/// plan (f16 cases count only their main kernels: see [`Case::kernels`]).
fn operand(
    dev: &Device,
    g: &Graph,
    name: &str,
    value: Tensor,
    dtype: kiln::DType,
) -> kiln::Result<kiln::NodeId> {
    g.cast(resident(dev, g, name, value)?, dtype)
}

/// One element of `y` as f32: what a case reads back (cut first, a view of `y`'s front, so that
/// an f16 case casts one value, not the whole tensor).
fn probe(g: &Graph, y: kiln::NodeId) -> kiln::Result<kiln::NodeId> {
    let first = g.narrow(g.reshape(y, &[-1])?, 0, 0, 1)?;
    g.cast(first, kiln::DType::F32)
}

/// " (f16 graph)" for f16 cases, with the kernels they count.
fn half_case(mut case: Case, dtype: kiln::DType, kernels: &'static str) -> Case {
    if dtype == kiln::DType::F16 {
        case.name.push_str(" (f16 graph)");
        case.kernels = Some(kernels);
    }
    case
}

fn matmul(dev: &Device, n: usize) -> kiln::Result<Case> {
    matmul_as(dev, n, "", kiln::DType::F32)
}

/// An `n`^3 product of `dtype` operands (f16: on tensor cores where the adapter has them, else
/// the tiled kernels with f16 loads; the kernel column times the product alone).
fn matmul_as(dev: &Device, n: usize, note: &str, dtype: kiln::DType) -> kiln::Result<Case> {
    let g = Graph::new();
    let a = operand(
        dev,
        &g,
        &format!("bench.mm{n}.a"),
        Tensor::rand_uniform([n, n], -1.0, 1.0, 1),
        dtype,
    )?;
    let b = operand(
        dev,
        &g,
        &format!("bench.mm{n}.b"),
        Tensor::rand_uniform([n, n], -1.0, 1.0, 2),
        dtype,
    )?;
    let y = g.matmul(a, b)?;
    let plan = dev.compile(&g, &[probe(&g, y)?])?;
    let case = plan_case(
        format!("matmul {n}^3{note}"),
        2.0 * (n as f64).powi(3),
        "GFLOP/s",
        plan,
        Vec::new(),
    );
    Ok(half_case(case, dtype, "matmul"))
}

/// A 3x3 padded convolution of a batch `n` of `c`-channel `h`x`h` images to `o` channels.
fn conv(
    dev: &Device,
    (n, c, h, o): (usize, usize, usize, usize),
    dtype: kiln::DType,
) -> kiln::Result<Case> {
    let g = Graph::new();
    let tag = format!("bench.conv{n}x{c}x{h}x{o}");
    let x = operand(
        dev,
        &g,
        &format!("{tag}.x"),
        Tensor::rand_uniform([n, c, h, h], -1.0, 1.0, 3),
        dtype,
    )?;
    let w = operand(
        dev,
        &g,
        &format!("{tag}.w"),
        Tensor::rand_uniform([o, c, 3, 3], -0.1, 0.1, 4),
        dtype,
    )?;
    let y = g.conv2d(
        x,
        w,
        None,
        Conv2dOpts {
            padding: (1, 1),
            ..Default::default()
        },
    )?;
    let plan = dev.compile(&g, &[probe(&g, y)?])?;
    let case = plan_case(
        format!("conv2d fwd {n}x{c}x{h}x{h} -> {o}, 3x3"),
        2.0 * (n * o * h * h * c * 9) as f64,
        "GFLOP/s",
        plan,
        Vec::new(),
    );
    Ok(half_case(case, dtype, "implicit_gemm"))
}

/// A depthwise 3x3 padded convolution (`groups = c`, MobileNet's) of a batch `n` of `c`-channel
/// `h`x`h` images, forward and both gradients (of `sum(y * r)`): the grouped direct kernels.
fn depthwise(dev: &Device, (n, c, h): (usize, usize, usize)) -> kiln::Result<Case> {
    let g = Graph::new();
    let tag = format!("bench.dw{n}x{c}x{h}");
    let x = resident(
        dev,
        &g,
        &format!("{tag}.x"),
        Tensor::rand_uniform([n, c, h, h], -1.0, 1.0, 3),
    )?;
    let w = resident(
        dev,
        &g,
        &format!("{tag}.w"),
        Tensor::rand_uniform([c, 1, 3, 3], -0.3, 0.3, 4),
    )?;
    let r = resident(
        dev,
        &g,
        &format!("{tag}.r"),
        Tensor::rand_uniform([n, c, h, h], -1.0, 1.0, 5),
    )?;
    let pad = Conv2dOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let y = g.conv2d_grouped(x, w, None, pad, c)?;
    let grads = g.grad(g.sum_all(g.mul(y, r)?)?, &[x, w])?;
    let outs = [probe(&g, y)?, probe(&g, grads[0])?, probe(&g, grads[1])?];
    let plan = dev.compile(&g, &outs)?;
    Ok(plan_case(
        format!("depthwise conv2d fwd+bwd {n}x{c}x{h}x{h}, 3x3"),
        3.0 * 2.0 * (n * c * h * h * 9) as f64,
        "GFLOP/s",
        plan,
        Vec::new(),
    ))
}

/// `relu(x * s + t) * u - x` over `n` values of `dtype`: five elementwise ops the plan compiler
/// may fuse; bytes counted as one read of each input and one write (what a fused kernel moves).
fn chain(dev: &Device, n: usize, dtype: kiln::DType) -> kiln::Result<Case> {
    let g = Graph::new();
    let tag = format!("bench.chain{n}");
    let t = |k: u64| {
        operand(
            dev,
            &g,
            &format!("{tag}.{k}"),
            Tensor::rand_uniform([n], -1.0, 1.0, 10 + k),
            dtype,
        )
    };
    let (x, s, b, u) = (t(0)?, t(1)?, t(2)?, t(3)?);
    let y = g.sub(g.mul(g.relu(g.add(g.mul(x, s)?, b)?)?, u)?, x)?;
    let plan = dev.compile(&g, &[probe(&g, y)?])?;
    let case = plan_case(
        format!("elementwise chain (5 ops) {}M values", n >> 20),
        5.0 * (dtype.size() * n) as f64,
        "GB/s",
        plan,
        Vec::new(),
    );
    Ok(half_case(case, dtype, "fused"))
}

fn relu(dev: &Device, n: usize) -> kiln::Result<Case> {
    let g = Graph::new();
    let x = resident(
        dev,
        &g,
        &format!("bench.relu{n}"),
        Tensor::rand_uniform([n], -1.0, 1.0, 5),
    )?;
    let probe = g.narrow(g.relu(x)?, 0, 0, 1)?;
    let plan = dev.compile(&g, &[probe])?;
    Ok(plan_case(
        format!("relu {}M floats", n >> 20),
        8.0 * n as f64,
        "GB/s",
        plan,
        Vec::new(),
    ))
}

/// The MNIST CNN's training step at batch 64 (Adam); with `dtype` f16 in mixed precision (the
/// layers on f16 activations, loss and update in f32); with `batch_norm`, the CNN with a batch
/// norm after each convolution (`models::mnist_cnn_bn`).
fn cnn_step(dev: &Device, dtype: kiln::DType, batch_norm: bool) -> kiln::Result<Case> {
    let model = if batch_norm {
        kiln::models::mnist_cnn_bn(0)
    } else {
        kiln::models::mnist_cnn(0)
    };
    let g = Graph::new();
    let x = g.input("x", [64, 1, 28, 28]);
    let y = g.input("y", [64]);
    let (logits, params) = model.apply(&g, g.cast(x, dtype)?, true)?;
    let loss = g.cross_entropy(logits, y)?; // f16 logits: the loss computes in f32
    let step = TrainStep::new(dev, &g, loss, &params, Optimizer::adam(1e-3), 0)?;
    let xs = Tensor::rand_uniform([64, 1, 28, 28], 0.0, 1.0, 6);
    let ys = Tensor::new([64], (0..64).map(|i| (i % 10) as f32).collect())?;
    let note = if dtype == kiln::DType::F16 {
        " (mixed f16)"
    } else {
        ""
    };
    Ok(Case {
        name: format!(
            "mnist_cnn{} train step, batch 64{note}",
            if batch_norm { "_bn" } else { "" }
        ),
        work: 64.0,
        unit: "images/s",
        runner: Runner::Train(Box::new(step), vec![("x".into(), xs), ("y".into(), ys)]),
        kernels: None,
    })
}

/// An LSTM training step (batch 64, 32 steps, Adam with clipping); with `dtype` f16 in mixed
/// precision (LSTM and head on f16 activations and states, loss and update in f32).
fn lstm_step(dev: &Device, hidden: usize, dtype: kiln::DType) -> kiln::Result<Case> {
    let (t, b, i) = (32, 64, 32);
    let mut init = Init::new(0);
    let lstm = Lstm::new("lstm", i, hidden, 1, false, &mut init);
    let head = Linear::new("head", hidden, 10, &mut init);
    let g = Graph::new();
    let x = g.input("x", [t, b, i]);
    let y = g.input("y", [b]);
    let out = lstm.apply(&g, g.cast(x, dtype)?, None, None)?;
    let hn = g.reshape(out.h_n, &[b as isize, hidden as isize])?;
    let (logits, hp) = head.apply(&g, hn)?;
    let loss = g.cross_entropy(logits, y)?;
    let mut params = out.params.clone();
    params.extend(hp);
    let step = TrainStep::new(
        dev,
        &g,
        loss,
        &params,
        Optimizer::adam(1e-3).clip_grad_norm(1.0),
        0,
    )?;
    let xs = Tensor::rand_uniform([t, b, i], -1.0, 1.0, 7);
    let ys = Tensor::new([b], (0..b).map(|k| (k % 10) as f32).collect())?;
    Ok(Case {
        name: format!(
            "lstm train step, batch 64, 32 steps, hidden {hidden}{}",
            if dtype == kiln::DType::F16 {
                " (mixed f16)"
            } else {
                ""
            }
        ),
        work: 1.0,
        unit: "steps/s",
        runner: Runner::Train(Box::new(step), vec![("x".into(), xs), ("y".into(), ys)]),
        kernels: None,
    })
}

/// Causal self-attention (`Graph::attention`, the fused kernel) over `(b, h, l, d)` operands
/// resident on the device, forward or (`backward`) forward and gradients; FLOPs counted as
/// performed (the causal half of the score matrix: `2 b h l^2 d` forward, as FlashAttention's
/// benchmarks count).
fn attention(
    dev: &Device,
    (b, h, l, d): (usize, usize, usize, usize),
    dtype: kiln::DType,
    backward: bool,
) -> kiln::Result<Case> {
    let g = Graph::new();
    let tag = format!("bench.attn{b}x{h}x{l}x{d}");
    let t = |k: u64| {
        operand(
            dev,
            &g,
            &format!("{tag}.{k}"),
            Tensor::rand_uniform([b, h, l, d], -1.0, 1.0, 20 + k),
            dtype,
        )
    };
    let (q, k, v) = (t(0)?, t(1)?, t(2)?);
    let y = g.attention(q, k, v, None, true, None)?;
    if !backward {
        let plan = dev.compile(&g, &[probe(&g, y)?])?;
        let case = plan_case(
            format!("causal attention {b}x{h}x{l}x{d}"),
            2.0 * (b * h * l * l * d) as f64,
            "GFLOP/s",
            plan,
            Vec::new(),
        );
        return Ok(half_case(case, dtype, "attention"));
    }
    // y and the gradients of sum(y), as a training step needs them (a backward that
    // recomputes the probabilities would not need y); FLOPs as FlashAttention counts them, the
    // backward 2.5 times the forward
    let loss = g.sum_all(g.cast(y, kiln::DType::F32)?)?;
    let mut outputs = vec![y];
    outputs.extend(g.grad(loss, &[q, k, v])?);
    let probes = outputs
        .iter()
        .map(|&d| probe(&g, d))
        .collect::<kiln::Result<Vec<_>>>()?;
    let plan = dev.compile(&g, &probes)?;
    let case = plan_case(
        format!("causal attention forward + backward {b}x{h}x{l}x{d}"),
        3.5 * 2.0 * (b * h * l * l * d) as f64,
        "GFLOP/s",
        plan,
        Vec::new(),
    );
    Ok(half_case(case, dtype, "attention"))
}

/// A GPT-style transformer's training step (AdamW, clipping): token and position embeddings,
/// `layers` pre-norm encoder layers of width `e` with `e / 64` heads (at least 1) and causal
/// self-attention, a layer norm and a vocabulary head; `batch` windows of `seq` tokens.
fn transformer_step(
    dev: &Device,
    (layers, e, seq, batch): (usize, usize, usize, usize),
) -> kiln::Result<Case> {
    let vocab = 96;
    let mut init = Init::new(0);
    let tok = Embedding::new("bench.tok", vocab, e, &mut init);
    let pos = Embedding::new("bench.pos", seq, e, &mut init);
    let g = Graph::new();
    let x = g.input("x", [batch, seq]);
    let positions = g.input("positions", [seq]);
    let y = g.input("y", [batch * seq]);
    let (t, mut params) = tok.apply_layer(&g, x, true)?;
    let (p, pp) = pos.apply_layer(&g, positions, true)?;
    params.extend(pp);
    let mut h = g.add(t, p)?;
    for i in 0..layers {
        let mut layer = TransformerEncoderLayer::new(
            &format!("bench.layers.{i}"),
            e,
            (e / 64).max(1),
            4 * e,
            &mut init,
        )?;
        layer.norm_first = true;
        let (out, lp) = layer.apply(&g, h, None, true, true)?;
        params.extend(lp);
        h = out;
    }
    let (h, lp) = LayerNorm::new("bench.ln_f", &[e]).apply(&g, h)?;
    params.extend(lp);
    let flat = g.reshape(h, &[(batch * seq) as isize, e as isize])?;
    let (logits, lp) = Linear::new("bench.head", e, vocab, &mut init).apply(&g, flat)?;
    params.extend(lp);
    let loss = g.cross_entropy(logits, y)?;
    let step = TrainStep::new(
        dev,
        &g,
        loss,
        &params,
        Optimizer::adamw(3e-4, 0.01).clip_grad_norm(1.0),
        0,
    )?;
    let ids = |seed| {
        Tensor::new(
            [batch * seq],
            Tensor::rand_uniform([batch * seq], 0.0, vocab as f32, seed)
                .data()
                .iter()
                .map(|v| v.floor())
                .collect(),
        )
    };
    let xs = ids(8)?.reshape([batch, seq])?;
    let feeds = vec![
        ("x".into(), xs),
        (
            "positions".into(),
            Tensor::new([seq], (0..seq).map(|i| i as f32).collect())?,
        ),
        ("y".into(), ids(9)?),
    ];
    Ok(Case {
        name: format!("transformer train step, {layers}x{e}, {batch}x{seq} tokens"),
        work: 1.0,
        unit: "steps/s",
        runner: Runner::Train(Box::new(step), feeds),
        kernels: None,
    })
}

/// A table's gradient from `n` lookups of a `(v, e)` embedding (a language model's token
/// table): the gradient of `sum(embedding(ids, table) * w)`, `w` resident; only the gradient
/// kernels count (`embedding*`), bytes as `dy` read once and the table's gradient written once.
fn embedding_grad(dev: &Device, (v, e, n): (usize, usize, usize)) -> kiln::Result<Case> {
    let g = Graph::new();
    let tag = format!("bench.emb{v}x{e}x{n}");
    let table = resident(dev, &g, &format!("{tag}.table"), Tensor::zeros([v, e]))?;
    let w = resident(
        dev,
        &g,
        &format!("{tag}.w"),
        Tensor::rand_uniform([n, e], -1.0, 1.0, 30),
    )?;
    let ids = g.input("ids", [n]);
    let loss = g.sum_all(g.mul(g.embedding(ids, table)?, w)?)?;
    let dw = g.grad(loss, &[table])?[0];
    let plan = dev.compile(&g, &[probe(&g, dw)?])?;
    // token ids drawn uniformly over the table (a trained model's are skewed: rarer rows)
    let ids_value = Tensor::new(
        [n],
        Tensor::rand_uniform([n], 0.0, v as f32, 31)
            .data()
            .iter()
            .map(|x| x.floor())
            .collect(),
    )?;
    let mut case = plan_case(
        format!("embedding gradient {v}x{e}, {n} lookups"),
        4.0 * (n * e + v * e) as f64,
        "GB/s",
        plan,
        vec![("ids".into(), ids_value)],
    );
    case.kernels = Some("embedding");
    Ok(case)
}

/// A language model's loss over `c` classes for `n` tokens and its logits' gradient, as a
/// training step runs them (one kernel: `CrossEntropyRows::with_grad`); bytes as the logits
/// read once and their gradient written once.
fn cross_entropy_grad(dev: &Device, (n, c): (usize, usize)) -> kiln::Result<Case> {
    let g = Graph::new();
    let logits = resident(
        dev,
        &g,
        &format!("bench.ce{n}x{c}"),
        Tensor::rand_uniform([n, c], -4.0, 4.0, 32),
    )?;
    let labels = g.input("labels", [n]);
    let loss = g.cross_entropy(logits, labels)?;
    let dx = g.grad(loss, &[logits])?[0];
    let plan = dev.compile(&g, &[loss, probe(&g, dx)?])?;
    let labels_value = Tensor::new([n], (0..n).map(|i| (i * 7919 % c) as f32).collect())?;
    Ok(plan_case(
        format!("cross-entropy + gradient {n}x{c}"),
        8.0 * (n * c) as f64,
        "GB/s",
        plan,
        vec![("labels".into(), labels_value)],
    ))
}

/// A descending sort of each of `rows` rows of `c` (a sampler's vocabulary for top-p), its
/// positions read back as one probe: bitonic blocks of 1024, then merge passes. Rate: the
/// elements sorted per second.
fn sort_rows(dev: &Device, (rows, c): (usize, usize)) -> kiln::Result<Case> {
    let g = Graph::new();
    let x = resident(
        dev,
        &g,
        &format!("bench.sort{rows}x{c}"),
        Tensor::rand_uniform([rows, c], -4.0, 4.0, 40),
    )?;
    let (_, positions) = g.sort(x, -1, true)?;
    let plan = dev.compile(&g, &[probe(&g, positions)?])?;
    Ok(plan_case(
        format!("sort {rows}x{c}"),
        (rows * c) as f64,
        "elements/s",
        plan,
        Vec::new(),
    ))
}

/// Median seconds per run after a warm-up, within a time budget.
fn time(case: &mut Case, reps: usize, budget: Duration) -> kiln::Result<f64> {
    case.run()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < reps && (times.is_empty() || start.elapsed() < budget) {
        let t = Instant::now();
        case.run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn cases(dev: &Device, hardware: bool, cpu: bool) -> kiln::Result<Vec<Option<Case>>> {
    // the CPU reference is plain loops: keep it to what finishes in seconds
    let mut v = vec![Some(matmul(dev, 256)?), Some(matmul(dev, 1024)?)];
    v.push(if hardware && !cpu {
        Some(matmul(dev, 4096)?)
    } else {
        None
    });
    // f32 products with f16 inputs on tensor cores, where the adapter has them (two entries
    // either way: the GPU and CPU lists stay aligned). On a device of their own: a kernel that
    // took the device down would not take the rest of the suite with it.
    let mut tc = [None, None];
    if hardware && !cpu && dev.target().is_some_and(|t| t.coop_f16) {
        let tc_dev = Device::gpu()?;
        match tc_dev.set_matmul_precision(kiln::Precision::Medium) {
            Ok(()) => {
                let tc_case = |n| matmul_as(&tc_dev, n, " (f16 tensor cores)", kiln::DType::F32);
                tc = [tc_case(4096).ok(), tc_case(8192).ok()];
            }
            Err(e) => eprintln!("tensor cores skipped: {e}"),
        }
    }
    v.extend(tc);
    v.push(Some(conv(dev, (64, 32, 13, 64), kiln::DType::F32)?));
    v.push(if hardware && !cpu {
        Some(conv(dev, (64, 64, 56, 64), kiln::DType::F32)?)
    } else {
        None
    });
    v.push(Some(depthwise(dev, (16, 32, 28))?));
    v.push(if hardware && !cpu {
        Some(depthwise(dev, (64, 256, 56))?)
    } else {
        None
    });
    v.push(Some(relu(dev, 16 << 20)?));
    v.push(if hardware && !cpu {
        Some(relu(dev, 64 << 20)?)
    } else {
        None
    });
    let f16 = kiln::DType::F16;
    v.push(Some(chain(
        dev,
        if hardware { 64 << 20 } else { 4 << 20 },
        kiln::DType::F32,
    )?));
    // f16 graphs, on adapters with SHADER_F16 (GPU only: the entries stay aligned)
    let half = !cpu && dev.features().contains(wgpu::Features::SHADER_F16);
    let big = if hardware { 64 << 20 } else { 4 << 20 };
    let conv_shape = if hardware {
        (64, 64, 56, 64)
    } else {
        (64, 32, 13, 64)
    };
    v.push(half.then(|| matmul_as(dev, 1024, "", f16).ok()).flatten());
    for n in [4096, 8192] {
        v.push(
            (half && hardware)
                .then(|| matmul_as(dev, n, "", f16).ok())
                .flatten(),
        );
    }
    v.push(half.then(|| chain(dev, big, f16).ok()).flatten());
    v.push(half.then(|| conv(dev, conv_shape, f16).ok()).flatten());
    v.push(half.then(|| cnn_step(dev, f16, false).ok()).flatten());
    v.push(half.then(|| lstm_step(dev, 128, f16).ok()).flatten());
    v.push(Some(cnn_step(dev, kiln::DType::F32, false)?));
    v.push(Some(cnn_step(dev, kiln::DType::F32, true)?));
    v.push(Some(lstm_step(dev, 128, kiln::DType::F32)?));
    for backward in [false, true] {
        v.push(Some(attention(
            dev,
            (2, 4, 128, 64),
            kiln::DType::F32,
            backward,
        )?));
        v.push(if hardware && !cpu {
            Some(attention(
                dev,
                (8, 16, 1024, 64),
                kiln::DType::F32,
                backward,
            )?)
        } else {
            None
        });
        v.push(
            (half && hardware)
                .then(|| attention(dev, (8, 16, 1024, 64), f16, backward).ok())
                .flatten(),
        );
    }
    v.push(Some(cross_entropy_grad(dev, (1024, 8192))?));
    v.push(if hardware && !cpu {
        Some(cross_entropy_grad(dev, (4096, 50257))?)
    } else {
        None
    });
    v.push(Some(embedding_grad(dev, (8192, 64, 2048))?));
    v.push(if hardware && !cpu {
        Some(embedding_grad(dev, (50257, 768, 8192))?)
    } else {
        None
    });
    v.push(Some(sort_rows(dev, (16, 4096))?));
    v.push(if hardware && !cpu {
        Some(sort_rows(dev, (64, 50257))?)
    } else {
        None
    });
    v.push(Some(transformer_step(dev, (2, 64, 64, 16))?));
    v.push(if hardware && !cpu {
        Some(transformer_step(dev, (4, 512, 256, 32))?)
    } else {
        None
    });
    Ok(v)
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("kiln-bench: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> kiln::Result<()> {
    let gpu = Device::gpu()?;
    let hardware = gpu
        .adapter()
        .map(|a| a.device_type != "Cpu")
        .unwrap_or(false);
    println!("GPU: {}", gpu.describe());
    let (reps, budget) = if args.quick {
        (5, Duration::from_secs(5))
    } else {
        (20, Duration::from_secs(20))
    };
    if let Some(n) = args.sweep {
        return sweep(&gpu, n, reps);
    }
    let mut gpu_cases = cases(&gpu, hardware, false)?;
    let mut cpu_cases = if args.no_cpu {
        Vec::new()
    } else {
        cases(&Device::cpu(), false, true)?
    };
    let mut rows = Vec::new();
    println!(
        "{:<44} {:>20} {:>20} {:>14} {:>9}",
        "case", "GPU (per run)", "GPU (kernels)", "CPU", "GPU/CPU"
    );
    for (k, slot) in gpu_cases.iter_mut().enumerate() {
        let Some(g) = slot.as_mut() else {
            continue;
        };
        if !args.only.is_empty() && !args.only.iter().any(|o| g.name.contains(o.as_str())) {
            continue;
        }
        // a case that fails (out of memory, a lost device) is reported and skipped
        let tg = match time(g, reps, budget) {
            Ok(t) => t,
            Err(e) => {
                println!("{:<44} error: {e}", g.name);
                continue;
            }
        };
        let tk = g.kernel_seconds(reps.min(5)).unwrap_or(None);
        let rate = |t: f64, c: &Case| c.work / t / if c.unit.starts_with('G') { 1e9 } else { 1.0 };
        let rg = rate(tg, g);
        let rk = tk.map(|t| rate(t, g));
        // the CPU reference gets fewer repetitions: it is the slow side
        let tc = match cpu_cases.get_mut(k).and_then(|c| c.as_mut()) {
            Some(c) if !c.name.contains("1024") && !c.name.contains("16M") => {
                Some(time(c, 3, budget)?)
            }
            _ => None,
        };
        let rc = tc.map(|t| rate(t, g));
        println!(
            "{:<44} {:>10.2} {:<9} {:>10} {:<9} {:>14} {:>9}",
            g.name,
            rg,
            g.unit,
            rk.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into()),
            if rk.is_some() { g.unit } else { "" },
            rc.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into()),
            rc.map(|r| format!("{:.1}x", rg / r))
                .unwrap_or_else(|| "-".into())
        );
        rows.push(serde_json::json!({
            "case": g.name, "unit": g.unit, "gpu": rg, "gpu_seconds": tg,
            "gpu_kernels": rk, "gpu_kernel_seconds": tk, "cpu": rc, "cpu_seconds": tc,
        }));
    }
    if let Some(path) = args.json {
        let doc = serde_json::json!({
            "gpu": gpu.describe(), "hardware": hardware,
            "gemm": std::env::var("KILN_GEMM").unwrap_or_else(|_| "auto".into()),
            "results": rows,
        });
        let json = serde_json::to_string_pretty(&doc).expect("plain JSON values");
        std::fs::write(&path, json).map_err(|e| kiln::Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
