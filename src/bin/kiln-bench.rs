//! `kiln-bench`: a fixed benchmark suite run on the GPU and on the CPU reference, printed as a
//! table with the GPU/CPU ratio and written as JSON.
//!
//!     kiln-bench [--json PATH] [--quick] [--no-cpu]
//!
//! Cases: square f32 matmuls (256, 1024; 4096 on a hardware GPU), conv2d forward (batch 64,
//! 32 -> 64 channels, 13x13, 3x3; and the issue-6 shape, batch 64, 64 -> 64, 56x56, on a hardware
//! GPU), relu over 16M floats, the MNIST CNN training step (batch 64, Adam) and an LSTM training
//! step (batch 64, 32 steps, hidden 128). Each case is compiled once, warmed up, then timed over
//! repeated runs that each wait for the GPU (a readback of one small output), so the times are
//! end-to-end wall clock per run, submission and synchronisation included. The CPU reference is
//! skipped where it would take minutes (marked "-").

use std::time::{Duration, Instant};

use clap::Parser;
use kiln::graph::Conv2dOpts;
use kiln::nn::{Init, Linear, Lstm, Optimizer, TrainStep};
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
}

/// A compiled case: a closure running it once (waiting for the result), its work, its unit.
struct Case {
    name: String,
    /// FLOPs (or bytes for memory-bound cases) per run.
    work: f64,
    unit: &'static str,
    run: Box<dyn FnMut() -> kiln::Result<()>>,
}

fn plan_case(
    name: String,
    work: f64,
    unit: &'static str,
    mut plan: Plan,
    feeds: Vec<(String, Tensor)>,
) -> Case {
    Case {
        name,
        work,
        unit,
        run: Box::new(move || {
            let f: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
            plan.run(&f).map(|_| ())
        }),
    }
}

fn matmul(dev: &Device, n: usize) -> kiln::Result<Case> {
    let g = Graph::new();
    let a = g.input("a", [n, n]);
    let b = g.input("b", [n, n]);
    // read back one element only: the sum of a row would add work, so take a 1x1 slice
    let y = g.matmul(a, b)?;
    let probe = g.narrow(g.narrow(y, 0, 0, 1)?, 1, 0, 1)?;
    let plan = dev.compile(&g, &[probe])?;
    let feeds = vec![
        ("a".into(), Tensor::rand_uniform([n, n], -1.0, 1.0, 1)),
        ("b".into(), Tensor::rand_uniform([n, n], -1.0, 1.0, 2)),
    ];
    Ok(plan_case(
        format!("matmul {n}^3"),
        2.0 * (n as f64).powi(3),
        "GFLOP/s",
        plan,
        feeds,
    ))
}

fn conv(dev: &Device, (n, c, h, o): (usize, usize, usize, usize)) -> kiln::Result<Case> {
    let g = Graph::new();
    let x = g.input("x", [n, c, h, h]);
    let w = g.input("w", [o, c, 3, 3]);
    let y = g.conv2d(
        x,
        w,
        None,
        Conv2dOpts {
            padding: (1, 1),
            ..Default::default()
        },
    )?;
    let probe = g.narrow(g.flatten(y)?, 1, 0, 1)?;
    let plan = dev.compile(&g, &[probe])?;
    let flops = 2.0 * (n * o * h * h * c * 9) as f64;
    let feeds = vec![
        ("x".into(), Tensor::rand_uniform([n, c, h, h], -1.0, 1.0, 3)),
        ("w".into(), Tensor::rand_uniform([o, c, 3, 3], -0.1, 0.1, 4)),
    ];
    Ok(plan_case(
        format!("conv2d fwd {n}x{c}x{h}x{h} -> {o}, 3x3"),
        flops,
        "GFLOP/s",
        plan,
        feeds,
    ))
}

fn relu(dev: &Device, n: usize) -> kiln::Result<Case> {
    let g = Graph::new();
    let x = g.input("x", [n]);
    let probe = g.narrow(g.relu(x)?, 0, 0, 1)?;
    let plan = dev.compile(&g, &[probe])?;
    // the input upload is part of a run: count it with the kernel's read and write
    let feeds = vec![("x".into(), Tensor::rand_uniform([n], -1.0, 1.0, 5))];
    Ok(plan_case(
        format!("relu {}M floats (incl. upload)", n >> 20),
        12.0 * n as f64,
        "GB/s",
        plan,
        feeds,
    ))
}

fn cnn_step(dev: &Device) -> kiln::Result<Case> {
    let model = kiln::models::mnist_cnn(0);
    let g = Graph::new();
    let x = g.input("x", [64, 1, 28, 28]);
    let y = g.input("y", [64]);
    let (logits, params) = model.apply(&g, x, true)?;
    let loss = g.cross_entropy(logits, y)?;
    let mut step = TrainStep::new(dev, &g, loss, &params, Optimizer::adam(1e-3), 0)?;
    let xs = Tensor::rand_uniform([64, 1, 28, 28], 0.0, 1.0, 6);
    let ys = Tensor::new([64], (0..64).map(|i| (i % 10) as f32).collect())?;
    Ok(Case {
        name: "mnist_cnn train step, batch 64".into(),
        work: 64.0,
        unit: "images/s",
        run: Box::new(move || step.step(&[("x", &xs), ("y", &ys)], true).map(|_| ())),
    })
}

fn lstm_step(dev: &Device, hidden: usize) -> kiln::Result<Case> {
    let (t, b, i) = (32, 64, 32);
    let mut init = Init::new(0);
    let lstm = Lstm::new("lstm", i, hidden, 1, false, &mut init);
    let head = Linear::new("head", hidden, 10, &mut init);
    let g = Graph::new();
    let x = g.input("x", [t, b, i]);
    let y = g.input("y", [b]);
    let out = lstm.apply(&g, x, None, None)?;
    let hn = g.reshape(out.h_n, &[b as isize, hidden as isize])?;
    let (logits, hp) = head.apply(&g, hn)?;
    let loss = g.cross_entropy(logits, y)?;
    let mut params = out.params.clone();
    params.extend(hp);
    let mut step = TrainStep::new(
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
        name: format!("lstm train step, batch 64, 32 steps, hidden {hidden}"),
        work: 1.0,
        unit: "steps/s",
        run: Box::new(move || step.step(&[("x", &xs), ("y", &ys)], true).map(|_| ())),
    })
}

/// Median seconds per run after a warm-up, within a time budget.
fn time(case: &mut Case, reps: usize, budget: Duration) -> kiln::Result<f64> {
    (case.run)()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < reps && (times.is_empty() || start.elapsed() < budget) {
        let t = Instant::now();
        (case.run)()?;
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
    v.push(Some(conv(dev, (64, 32, 13, 64))?));
    v.push(if hardware && !cpu {
        Some(conv(dev, (64, 64, 56, 64))?)
    } else {
        None
    });
    v.push(Some(relu(dev, 16 << 20)?));
    v.push(Some(cnn_step(dev)?));
    v.push(Some(lstm_step(dev, 128)?));
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
    let mut gpu_cases = cases(&gpu, hardware, false)?;
    let mut cpu_cases = if args.no_cpu {
        Vec::new()
    } else {
        cases(&Device::cpu(), false, true)?
    };
    let mut rows = Vec::new();
    println!(
        "{:<52} {:>14} {:>14} {:>10}",
        "case", "GPU", "CPU", "GPU/CPU"
    );
    for (k, slot) in gpu_cases.iter_mut().enumerate() {
        let Some(g) = slot.as_mut() else {
            continue;
        };
        let tg = time(g, reps, budget)?;
        let rate = |t: f64, c: &Case| c.work / t / if c.unit.starts_with('G') { 1e9 } else { 1.0 };
        let rg = rate(tg, g);
        // the CPU reference gets fewer repetitions: it is the slow side
        let tc = match cpu_cases.get_mut(k).and_then(|c| c.as_mut()) {
            Some(c) if !c.name.contains("1024") && !c.name.contains("16M") => {
                Some(time(c, 3, budget)?)
            }
            _ => None,
        };
        let rc = tc.map(|t| rate(t, g));
        println!(
            "{:<52} {:>7.2} {:<6} {:>14} {:>10}",
            g.name,
            rg,
            g.unit,
            rc.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".into()),
            rc.map(|r| format!("{:.1}x", rg / r))
                .unwrap_or_else(|| "-".into())
        );
        rows.push(serde_json::json!({
            "case": g.name, "unit": g.unit, "gpu": rg, "gpu_seconds": tg, "cpu": rc, "cpu_seconds": tc,
        }));
    }
    if let Some(path) = args.json {
        let doc =
            serde_json::json!({ "gpu": gpu.describe(), "hardware": hardware, "results": rows });
        let json = serde_json::to_string_pretty(&doc).expect("plain JSON values");
        std::fs::write(&path, json).map_err(|e| kiln::Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
