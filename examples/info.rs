//! Prints every adapter wgpu can see, the one kiln picks (KILN_BACKEND / KILN_ADAPTER apply),
//! its granted features, what kiln's kernel generators see of it, and its limits.
//!
//! Expected: on a machine without a GPU but with Mesa's lavapipe, an adapter named like
//! "llvmpipe (LLVM 15.0.6, 256 bits)" on Vulkan, device type Cpu, chosen.

fn main() -> kiln::Result<()> {
    env_logger::init();
    println!("adapters:");
    for a in kiln::device::enumerate_adapters(wgpu::Backends::all()) {
        let i = a.get_info();
        println!(
            "  - {} | {:?} | {:?} | driver {} {} | subgroup {}..{}",
            i.name,
            i.backend,
            i.device_type,
            i.driver,
            i.driver_info,
            i.subgroup_min_size,
            i.subgroup_max_size
        );
    }
    let dev = match kiln::Device::new() {
        Ok(d) => d,
        Err(e) => {
            println!(
                "no GPU device: {e}\nthe CPU reference backend (KILN_BACKEND=cpu) still works"
            );
            return Ok(());
        }
    };
    println!("chosen: {}", dev.describe());
    if let Some(a) = dev.adapter() {
        println!("  driver: {}", a.driver);
    }
    println!(
        "optional features kiln asked for: {:?}",
        kiln::device::WANTED_FEATURES
    );
    println!("granted: {:?}", dev.features());
    if let Some(t) = dev.target() {
        println!(
            "kernel target: subgroup {}, {} B workgroup memory, {} invocations, ~{} workgroups at once, tensor cores (16x16x16 f16): {}",
            t.subgroup_size, t.workgroup_storage, t.max_invocations, t.parallel_workgroups,
            if t.coop_emulated { "emulated" } else if t.coop_f16 { "true" } else { "false" }
        );
        if let Some(c) = kiln::codegen::matmul::choose(4096, 4096, 4096, 1, &t) {
            println!("GEMM for 4096^3 by the model: {}", c.describe());
        }
        if t.coop_f16 {
            let fitting = kiln::codegen::coop::CoopConfig::all(&t);
            println!(
                "tensor-core configuration by default: {} ({} of 24 fit)",
                kiln::codegen::coop::CoopConfig::choose(&t).describe(),
                fitting.len()
            );
        }
    }
    if let Some(l) = dev.limits() {
        println!("limits: {l:#?}");
    }
    Ok(())
}
