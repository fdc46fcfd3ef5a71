//! `cargo bench --bench matmul`: square f32 matmuls, GPU plan against the CPU reference.
//! Criterion's throughput is set to the FLOP count (2 n^3), so its "elem/s" reads as FLOP/s
//! (e.g. "1.2 Gelem/s" = 1.2 GFLOP/s). Sizes 64..1024; up to 4096 on a hardware GPU. The CPU
//! reference (plain loops, f64 accumulation) stops at 256 to keep the run short.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::{Device, Graph, Tensor};

fn plan_for(dev: &Device, n: usize) -> kiln::Result<(kiln::Plan, Tensor, Tensor)> {
    let g = Graph::new();
    let a = g.input("a", [n, n]);
    let b = g.input("b", [n, n]);
    let y = g.matmul(a, b)?;
    let plan = dev.compile(&g, &[y])?;
    Ok((
        plan,
        Tensor::rand_uniform([n, n], -1.0, 1.0, 1),
        Tensor::rand_uniform([n, n], -1.0, 1.0, 2),
    ))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    let gpu = Device::gpu().ok();
    let hardware = gpu
        .as_ref()
        .and_then(|d| d.adapter())
        .map(|a| a.device_type != "Cpu")
        .unwrap_or(false);
    let mut sizes = vec![64, 128, 256, 512, 1024];
    if hardware {
        sizes.extend([2048, 4096]);
    }
    for &n in &sizes {
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        if let Some(dev) = &gpu {
            let (mut plan, a, b) = plan_for(dev, n).expect("gpu plan");
            group.bench_with_input(BenchmarkId::new("gpu", n), &n, |bench, _| {
                bench.iter(|| plan.run(&[("a", &a), ("b", &b)]).expect("gpu run"))
            });
        }
        if n <= 256 {
            let (mut plan, a, b) = plan_for(&Device::cpu(), n).expect("cpu plan");
            group.bench_with_input(BenchmarkId::new("cpu", n), &n, |bench, _| {
                bench.iter(|| plan.run(&[("a", &a), ("b", &b)]).expect("cpu run"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
