//! Rust-generated WGSL, in one place. Kernels whose *code* (not only their constants) depends on
//! the shape and the adapter live here: the register-tiled GEMM family (`matmul`), with tile sizes
//! chosen per adapter and per shape and its register tile unrolled with constant indices (loop-
//! indexed local arrays ran 50x slower on an H100 under naga's bounds checks). Shapes still enter
//! through `override` constants, so one generated module serves every shape of its configuration.
//! And fused elementwise chains (`elementwise`): one module per program and shapes, made of the
//! unary and binary shaders' own op functions. The tensor-core GEMM (`coop`), multi-tensor
//! optimizer updates (`optim`), and the f16 variants of hand-written shaders (`storage`).
//! Every generator takes the storage types of its bindings (f32 or f16; arithmetic is f32):
//! `load`, `narrow` and [`Storage`] say how values are read and written.
//!
//! tests/wgsl.rs validates a sweep of every generator's output with naga, without a GPU.

pub mod coop;
pub mod elementwise;
pub mod matmul;
pub mod optim;
pub mod reduce_group;
pub mod storage;

use std::sync::Arc;

use crate::ops::KernelSpec;
use crate::tensor::DType;

/// What a generator needs to know of the adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Smallest subgroup (warp, wave) the adapter runs: 32 on NVIDIA, 8 on lavapipe.
    pub subgroup_size: u32,
    /// Bytes of workgroup memory a kernel may use.
    pub workgroup_storage: u32,
    /// Most invocations in one workgroup.
    pub max_invocations: u32,
    /// Most invocations along x.
    pub max_workgroup_x: u32,
    /// About how many workgroups the adapter runs at once; sizes tiles and split-K so that a
    /// product fills the machine. WebGPU does not tell the number of compute units, so this is a
    /// guess from the device type (a discrete GPU: 2 workgroups on each of ~128 units; a
    /// software adapter: the host's cores).
    pub parallel_workgroups: u32,
    /// Cooperative 16x16x16 f16 matrices with f32 accumulation, 32-wide subgroups and room for
    /// the tensor-core kernel (`codegen::coop`).
    pub coop_f16: bool,
    /// The tensor-core kernel runs with its cooperative-matrix operations emulated in plain WGSL
    /// (`KILN_EMULATE_TENSOR_CORES=1` on an adapter without them; `coop::Cores::Emulated`): a test
    /// path, set together with `coop_f16`.
    pub coop_emulated: bool,
    /// Storage buffers one kernel may bind (multi-tensor optimizer updates: `codegen::optim`).
    pub max_storage_buffers: u32,
}

impl Target {
    /// The target of a wgpu adapter with these limits.
    pub fn new(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Target {
        let parallel_workgroups = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => 256,
            wgpu::DeviceType::IntegratedGpu | wgpu::DeviceType::VirtualGpu => 64,
            // a software adapter (lavapipe) runs about one workgroup per host core at a time
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => {
                std::thread::available_parallelism().map_or(4, |n| n.get() as u32)
            }
        };
        Target {
            subgroup_size: info.subgroup_min_size.max(1),
            workgroup_storage: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroup_x: limits.max_compute_workgroup_size_x,
            parallel_workgroups,
            coop_f16: false,
            coop_emulated: false,
            // a bind group holds them all
            max_storage_buffers: limits
                .max_storage_buffers_per_shader_stage
                .min(limits.max_bindings_per_bind_group),
        }
    }

    /// WebGPU's default limits on a discrete GPU with 32-wide subgroups (as an H100 reports).
    pub fn discrete() -> Target {
        Target {
            subgroup_size: 32,
            workgroup_storage: 16_384,
            max_invocations: 256,
            max_workgroup_x: 256,
            parallel_workgroups: 256,
            coop_f16: false,
            coop_emulated: false,
            max_storage_buffers: 8,
        }
    }
}

/// `override` declarations for a generated kernel's shape constants: `1u` defaults, `0u` for the
/// operand batch strides `SA*`/`SB*` (which broadcast when 0).
pub(crate) fn overrides(names: &[&str]) -> String {
    names
        .iter()
        .map(|c| {
            let init = if c.starts_with("SA") || c.starts_with("SB") {
                "0u"
            } else {
                "1u"
            };
            format!("override {c}: u32 = {init};\n")
        })
        .collect()
}

/// WGSL computing `abase` and `bbase`, the operands' element offsets for the batch index `z` (in
/// scope), from the batch overrides of `ops::matmul::ProductDims::batch_constants`.
pub(crate) const BATCH_BASES: &str = "    var r = z;
    let b3 = r % BD3; r = r / BD3;
    let b2 = r % BD2; r = r / BD2;
    let b1 = r % BD1;
    let b0 = r / BD1;
    let abase = b0 * SA0 + b1 * SA1 + b2 * SA2 + b3 * SA3;
    let bbase = b0 * SB0 + b1 * SB1 + b2 * SB2 + b3 * SB3;
";

/// A kernel launch whose WGSL was generated: `spec.family` names the generator, `key` tells its
/// module apart from the generator's other modules.
#[derive(Debug, Clone)]
pub struct Generated {
    pub spec: KernelSpec,
    /// Distinguishes this module among its generator's (the configuration, in words).
    pub key: String,
    pub wgsl: Arc<str>,
}

/// `x` (an element of a binding stored as `dtype`) as f32.
pub(crate) fn widen(dtype: DType, x: String) -> String {
    match dtype {
        DType::F32 => x,
        DType::F16 => format!("f32({x})"),
    }
}

/// The f32 value `v` as a binding of `dtype` stores it.
pub(crate) fn narrow(dtype: DType, v: &str) -> String {
    match dtype {
        DType::F32 => v.to_string(),
        DType::F16 => format!("f16({v})"),
    }
}

/// An operand element `x` stored as `stored`, as the f32 value a kernel whose result is stored
/// as `result` computes with: f16 widened; an f32 operand of an f16 kernel rounded to f16 first
/// (a cast the plan compiler folded into the load: the same value the cast would store).
pub(crate) fn load(stored: DType, result: DType, x: String) -> String {
    match (stored, result) {
        (DType::F16, _) => format!("f32({x})"),
        (DType::F32, DType::F16) => format!("f32(f16({x}))"),
        (DType::F32, DType::F32) => x,
    }
}

/// [`load`] for a vec4.
pub(crate) fn load4(stored: DType, result: DType, x: String) -> String {
    match (stored, result) {
        (DType::F16, _) => format!("vec4<f32>({x})"),
        (DType::F32, DType::F16) => format!("vec4<f32>(vec4<f16>({x}))"),
        (DType::F32, DType::F32) => x,
    }
}

/// Storage types of a product's bindings: operands `a` and `b`, the bias, and the result (with
/// any epilogue inputs). Arithmetic is f32; an f32 operand of an f16 result is read rounded to
/// f16 (see `load`): a cast of a parameter folded into the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Storage {
    pub a: DType,
    pub b: DType,
    pub bias: DType,
    pub out: DType,
}

impl Storage {
    /// Every binding stored as `dtype`.
    pub fn all(dtype: DType) -> Storage {
        Storage {
            a: dtype,
            b: dtype,
            bias: dtype,
            out: dtype,
        }
    }

    /// `,f16` and marks for operands stored otherwise (`,a32`), for kernel keys.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.out == DType::F16 {
            s.push_str(",f16");
        }
        for (name, d) in [("a", self.a), ("b", self.b), ("bias", self.bias)] {
            if d != self.out {
                s.push_str(&format!(",{name}{}", &d.name()[1..]));
            }
        }
        s
    }
}

impl From<DType> for Storage {
    fn from(d: DType) -> Storage {
        Storage::all(d)
    }
}
