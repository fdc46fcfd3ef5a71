//! `cargo bench --bench lstm`: one LSTM training step, GPU plan against the CPU reference.
//! The step: batch 64, 32 time steps, input 32, hidden 128 or 512, a Linear head to 10 classes on
//! the last hidden state, cross-entropy, backward through time and Adam, compiled as one
//! `TrainStep` (one submission per step, the loss read back). Criterion's throughput is one element
//! per iteration, so its "elem/s" reads as training steps per second; the ids are
//! `lstm_train_step/{gpu,cpu}/h{H}`. The CPU reference (plain loops, f64 accumulation) runs hidden
//! 128 only, to keep the run short.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::nn::{Init, Linear, Lstm, Optimizer, TrainStep};
use kiln::{Device, Graph, Tensor};
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const STEPS: usize = 32;
const INPUT: usize = 32;
const CLASSES: usize = 10;

/// A compiled training step for hidden size `h` on `dev`, and one batch for it.
fn step_for(dev: &Device, h: usize) -> kiln::Result<(TrainStep, Tensor, Tensor)> {
    let mut init = Init::new(0);
    let lstm = Lstm::new(&format!("bench_h{h}.lstm"), INPUT, h, 1, false, &mut init);
    let fc = Linear::new(&format!("bench_h{h}.fc"), h, CLASSES, &mut init);
    let g = Graph::new();
    let x = g.input("x", [STEPS, BATCH, INPUT]);
    let y = g.input("y", [BATCH]);
    let out = lstm.apply(&g, x, None, None)?;
    let last = g.reshape(out.h_n, &[BATCH as isize, h as isize])?;
    let (logits, pf) = fc.apply(&g, last)?;
    let loss = g.cross_entropy(logits, y)?;
    let mut params = out.params;
    params.extend(pf);
    let step = TrainStep::new(
        dev,
        &g,
        loss,
        &params,
        Optimizer::adam(1e-3).clip_grad_norm(1.0),
        0,
    )?;
    let xs = Tensor::rand_uniform([STEPS, BATCH, INPUT], -1.0, 1.0, 1);
    let labels: Vec<f32> = (0..BATCH).map(|i| (i % CLASSES) as f32).collect();
    let ys = Tensor::new([BATCH], labels)?;
    Ok((step, xs, ys))
}

/// Runs `iters` steps and returns steps per second (the last loss read back, so the time covers
/// the device's work).
fn steps_per_second(step: &mut TrainStep, x: &Tensor, y: &Tensor, iters: u64) -> f64 {
    let t0 = Instant::now();
    for i in 0..iters {
        step.step(&[("x", x), ("y", y)], i + 1 == iters)
            .expect("training step");
    }
    iters as f64 / t0.elapsed().as_secs_f64()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("lstm_train_step");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    let gpu = Device::gpu().ok();
    if gpu.is_none() {
        println!("NOTICE: no GPU adapter; only the CPU reference is measured");
    }
    let cpu = Device::cpu();
    for h in [128, 512] {
        let mut runs: Vec<(&str, &Device)> = Vec::new();
        if let Some(dev) = &gpu {
            runs.push(("gpu", dev));
        }
        if h <= 128 {
            runs.push(("cpu", &cpu));
        }
        for (name, dev) in runs {
            let (mut step, x, y) = step_for(dev, h).expect("training step plan");
            let rate = steps_per_second(&mut step, &x, &y, 2);
            println!(
                "lstm_train_step/{name}/h{h}: {rate:.2} steps/s (batch {BATCH}, {STEPS} steps, \
                 input {INPUT}, hidden {h}; 2 steps timed before criterion)"
            );
            group.bench_with_input(BenchmarkId::new(name, format!("h{h}")), &h, |b, _| {
                b.iter(|| {
                    step.step(&[("x", &x), ("y", &y)], true)
                        .expect("training step")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
