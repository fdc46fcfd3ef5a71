//! `cargo bench --bench conv`: conv2d forward and backward (input and weight gradients), GPU plan
//! against the CPU reference. Throughput is the FLOP count, so criterion's "elem/s" reads as
//! FLOP/s. Shapes: the MNIST CNN's second layer at batch 64 (32 -> 64 channels, 13x13, 3x3) and,
//! on a hardware GPU, the issue-6 target (batch 64, 64 -> 64 channels, 56x56, 3x3).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::graph::Conv2dOpts;
use kiln::{Device, Graph, Tensor};

/// (N, C, H, W, O, k)
type ConvShape = (usize, usize, usize, usize, usize, usize);

fn plans(dev: &Device, s: ConvShape) -> kiln::Result<(kiln::Plan, kiln::Plan, Tensor, Tensor)> {
    let (n, c, h, w, o, k) = s;
    let g = Graph::new();
    let x = g.input("x", [n, c, h, w]);
    let wt = g.input("w", [o, c, k, k]);
    let y = g.conv2d(x, wt, None, Conv2dOpts::default())?;
    let loss = g.sum_all(y)?;
    let grads = g.grad(loss, &[x, wt])?;
    let fwd = dev.compile(&g, &[y])?;
    let bwd = dev.compile(&g, &grads)?;
    Ok((
        fwd,
        bwd,
        Tensor::rand_uniform([n, c, h, w], -1.0, 1.0, 1),
        Tensor::rand_uniform([o, c, k, k], -1.0, 1.0, 2),
    ))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv2d");
    group.sample_size(10);
    let gpu = Device::gpu().ok();
    let hardware = gpu
        .as_ref()
        .and_then(|d| d.adapter())
        .map(|a| a.device_type != "Cpu")
        .unwrap_or(false);
    let mut shapes: Vec<ConvShape> = vec![(64, 32, 13, 13, 64, 3)];
    if hardware {
        shapes.push((64, 64, 56, 56, 64, 3));
    }
    for s in shapes {
        let (n, ch, h, w, o, k) = s;
        let flops = 2 * (n * o * (h - k + 1) * (w - k + 1) * ch * k * k) as u64;
        let label = format!("{n}x{ch}x{h}x{w}->{o}");
        let mut devs: Vec<(&str, Device)> = gpu.iter().map(|d| ("gpu", d.clone())).collect();
        devs.push(("cpu", Device::cpu()));
        for (name, dev) in devs {
            let (mut fwd, mut bwd, x, wt) = plans(&dev, s).expect("conv plans");
            group.throughput(Throughput::Elements(flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name} forward"), &label),
                &s,
                |b, _| b.iter(|| fwd.run(&[("x", &x), ("w", &wt)]).expect("run")),
            );
            // input and weight gradients: twice the forward's work
            group.throughput(Throughput::Elements(2 * flops));
            group.bench_with_input(
                BenchmarkId::new(format!("{name} backward"), &label),
                &s,
                |b, _| b.iter(|| bwd.run(&[("x", &x), ("w", &wt)]).expect("run")),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
