//! The device: adapter choice (KILN_BACKEND, KILN_ADAPTER), the features and limits requested, the
//! parameter store that keeps trained tensors on the device across runs, and the pipeline cache
//! shared by every plan compiled on it.

use crate::codegen::coop::CoopConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

/// Optional adapter features kiln asks for when the adapter has them.
pub const WANTED_FEATURES: wgpu::Features = wgpu::Features::SHADER_F16
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::TIMESTAMP_QUERY)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::PIPELINE_CACHE)
    .union(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);

/// Which backend a [`Device`] computes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// A wgpu adapter (Vulkan, Metal, DX12 or GL).
    Gpu,
    /// The CPU reference backend.
    Cpu,
}

/// A handle to where plans run. Cheap to clone; clones share parameters and pipelines.
#[derive(Clone)]
pub struct Device {
    pub(crate) inner: Arc<DeviceInner>,
}

pub(crate) struct DeviceInner {
    pub(crate) gpu: Option<GpuContext>,
    /// Host copies of parameters on the CPU backend, each with the type it is stored as (its
    /// values rounded to it); on the GPU they live in `GpuContext::params`.
    pub(crate) cpu_params: Mutex<HashMap<String, (Tensor, DType)>>,
}

/// A parameter's GPU storage: f32, or f16 for state a graph declares so (a key/value cache,
/// [`crate::Graph::param_init_as`]).
pub(crate) struct GpuParam {
    pub(crate) shape: Shape,
    pub(crate) dtype: DType,
    pub(crate) buffer: Arc<wgpu::Buffer>,
}

/// Everything kiln holds of a wgpu device.
pub(crate) struct GpuContext {
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) features: wgpu::Features,
    pub(crate) limits: wgpu::Limits,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) params: Mutex<HashMap<String, GpuParam>>,
    /// Shader modules by file stem, or by generator and configuration for generated WGSL.
    modules: Mutex<HashMap<String, wgpu::ShaderModule>>,
    /// What kernel generators tailor their code to.
    pub(crate) target: crate::codegen::Target,
    /// How plans pick matmul kernels (KILN_GEMM, `Device::set_gemm_policy`).
    pub(crate) gemm_policy: Mutex<GemmPolicy>,
    /// Whether plans fuse elementwise chains (KILN_FUSE=0 turns it off, `Device::set_fusion`).
    pub(crate) fusion: std::sync::atomic::AtomicBool,
    /// How f32 products may be computed (KILN_MATMUL_PRECISION, `Device::set_matmul_precision`).
    pub(crate) precision: Mutex<Precision>,
    /// The tensor-core kernel's check against the CPU reference on this adapter.
    pub(crate) coop_check: Mutex<CoopCheck>,
    /// Signalled when a tensor-core check ends.
    pub(crate) coop_checked: std::sync::Condvar,
    /// GEMM configurations timed on this adapter, by product extents (`exec::tune`).
    pub(crate) tuned: Mutex<HashMap<String, crate::codegen::matmul::GemmConfig>>,
    /// The tensor-core kernel's configuration if one was fixed (KILN_COOP,
    /// `Device::set_coop_config`).
    pub(crate) coop_config: Mutex<Option<CoopConfig>>,
    /// Tensor-core configurations timed on this adapter (`exec::tune`), by `coop_tune_key`.
    pub(crate) coop_tuned: Mutex<HashMap<String, CoopConfig>>,
    /// The configuration products use when none is fixed or tuned: `CoopConfig::choose`, or
    /// `CoopConfig::PLAIN` if that failed the device's check.
    pub(crate) coop_default: Mutex<CoopConfig>,
    /// Where that table persists (beside the pipeline cache), if there is a cache folder.
    tune_file: Option<std::path::PathBuf>,
    /// The driver's compiled-pipeline cache and the file it persists to (PIPELINE_CACHE adapters).
    disk_cache: Option<DiskCache>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    layouts: Mutex<HashMap<BindingMode, (wgpu::BindGroupLayout, wgpu::PipelineLayout)>>,
    /// Set by the device-lost callback.
    pub(crate) lost: Arc<Mutex<Option<String>>>,
    /// The last error no error scope caught (wgpu would otherwise panic on it).
    pub(crate) uncaptured: Arc<Mutex<Option<String>>>,
    pub(crate) debug: bool,
    /// KILN_PROFILE=1: every plan times its ops and prints them after each run.
    pub(crate) profile_env: bool,
}

/// How plans compiled from now on pick their matmul kernels. `KILN_GEMM` sets it for a process:
/// `auto`, `tune`, `portable`, or a configuration such as `64x64x16/4x4` or `32x32x16/4x4/split4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPolicy {
    /// The generated family, configuration chosen per shape and adapter (`codegen::matmul::choose`).
    #[default]
    Auto,
    /// The generated family, each product's configuration timed on the adapter the first time
    /// its extents appear (`exec::tune`) and remembered in the cache folder.
    Tune,
    /// The portable 64x64 kernel of `shaders/matmul.wgsl` for every product.
    Portable,
    /// This generated configuration for every product (benchmarks and tests); its split-K
    /// applies where K is deep enough to cut.
    Fixed(crate::codegen::matmul::GemmConfig),
}

impl GemmPolicy {
    /// Parses KILN_GEMM's forms.
    pub fn parse(s: &str) -> Result<GemmPolicy> {
        match s.trim() {
            "auto" => Ok(GemmPolicy::Auto),
            "tune" => Ok(GemmPolicy::Tune),
            "portable" => Ok(GemmPolicy::Portable),
            other => crate::codegen::matmul::GemmConfig::parse(other)
                .map(GemmPolicy::Fixed)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "KILN_GEMM={other:?}: expected auto, tune, portable or BMxBNxBK/TMxTN[/splitS][/pf|/db]"
                    ))
                }),
        }
    }
}

/// How f32 matrix products may be computed, as PyTorch's `torch.set_float32_matmul_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 inputs and accumulation (the default).
    #[default]
    Highest,
    /// Products large enough to gain (M, N >= 64, K >= 32) may round their inputs to f16 and
    /// accumulate in f32 on tensor cores (cooperative matrices), where the adapter offers 16x16x16
    /// f16 matrices with 32-wide subgroups; results then differ from f32 by about `sqrt(K) *
    /// 2^-11` of the operands' scale, and inputs beyond f16's range (65504) overflow. Elsewhere
    /// the same as `Highest`.
    Medium,
}

/// Where the tensor-core kernel stands on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CoopCheck {
    Unchecked,
    /// Its check is running on this thread: plans the check compiles use it; other threads
    /// wait for the verdict before they use it (`check_tensor_cores_once`).
    Checking(std::thread::ThreadId),
    Passed,
    /// It disagreed with the CPU reference (why): products stay in f32.
    Failed(String),
}

/// A kernel's bindings: `n_inputs` storage buffers, those from index `rw_from` on read_write (updated
/// in place), the rest read-only; then, if `output`, one read_write output at binding `n_inputs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BindingMode {
    pub(crate) n_inputs: usize,
    pub(crate) rw_from: usize,
    pub(crate) output: bool,
    /// A kernel dispatched several times in a row (a recurrence over time steps) gets the step
    /// index as a uniform `vec4<u32>` at binding 0 with a dynamic offset; the storage bindings
    /// then start at 1.
    pub(crate) step: bool,
}

/// How the adapter was chosen, for `Device::describe` and the `info` example.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

fn summary(info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
    }
}

/// Parses KILN_BACKEND into wgpu backends; `Ok(None)` means the CPU reference backend.
fn backends_from_env() -> Result<Option<wgpu::Backends>> {
    match std::env::var("KILN_BACKEND")
        .ok()
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("") | Some("auto") | Some("gpu") => Ok(Some(wgpu::Backends::all())),
        Some("cpu") => Ok(None),
        Some("vulkan") => Ok(Some(wgpu::Backends::VULKAN)),
        Some("metal") => Ok(Some(wgpu::Backends::METAL)),
        Some("dx12") => Ok(Some(wgpu::Backends::DX12)),
        Some("gl") => Ok(Some(wgpu::Backends::GL)),
        Some(other) => Err(Error::NoAdapter(format!(
            "KILN_BACKEND={other:?} is not one of vulkan, metal, dx12, gl, cpu"
        ))),
    }
}

/// Lists every adapter wgpu can see on the given backends.
pub fn enumerate_adapters(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    pollster::block_on(instance.enumerate_adapters(backends))
}

/// Ranks adapters: discrete before integrated before virtual before software; native APIs
/// (Vulkan, Metal, DX12) before GL, the last resort.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = if info.backend == wgpu::Backend::Gl {
        1
    } else {
        0
    };
    (api, ty)
}

impl Device {
    /// The best device: KILN_BACKEND picks the API (`vulkan|metal|dx12|gl|cpu`, default any GPU),
    /// `KILN_ADAPTER=<substring>` picks an adapter by name; otherwise the highest-performance adapter.
    pub fn new() -> Result<Device> {
        match backends_from_env()? {
            None => Ok(Device::cpu()),
            Some(b) => Device::gpu_on(b, std::env::var("KILN_ADAPTER").ok().as_deref()),
        }
    }

    /// A GPU device whatever KILN_BACKEND says (KILN_ADAPTER still applies); an error if none.
    pub fn gpu() -> Result<Device> {
        let b = backends_from_env()?.unwrap_or(wgpu::Backends::all());
        Device::gpu_on(b, std::env::var("KILN_ADAPTER").ok().as_deref())
    }

    /// The CPU reference backend: plain loops, f64 accumulation; always available.
    pub fn cpu() -> Device {
        Device {
            inner: Arc::new(DeviceInner {
                gpu: None,
                cpu_params: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A GPU device on `backends`, the adapter whose name contains `adapter_filter` if given.
    pub fn gpu_on(backends: wgpu::Backends, adapter_filter: Option<&str>) -> Result<Device> {
        // GL is the last resort: only asked when no native API (Vulkan, Metal, DX12) has an adapter
        let primary = backends & wgpu::Backends::PRIMARY;
        let mut adapters = if primary.is_empty() {
            Vec::new()
        } else {
            enumerate_adapters(primary)
        };
        if adapters.is_empty() && backends.contains(wgpu::Backends::GL) {
            adapters = enumerate_adapters(wgpu::Backends::GL);
        }
        if let Some(f) = adapter_filter.filter(|f| !f.is_empty()) {
            let fl = f.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&fl));
            if adapters.is_empty() {
                return Err(Error::NoAdapter(format!(
                    "no adapter name contains KILN_ADAPTER={f:?}"
                )));
            }
        }
        adapters.sort_by_key(|a| rank(&a.get_info()));
        let adapter = adapters.into_iter().next().ok_or_else(|| {
            Error::NoAdapter(format!(
                "wgpu found no adapter on {backends:?} (on Linux without a GPU, install Mesa's lavapipe: \
                 apt-get install mesa-vulkan-drivers; or use KILN_BACKEND=cpu)"
            ))
        })?;
        let ctx = GpuContext::new(adapter)?;
        let dev = Device {
            inner: Arc::new(DeviceInner {
                gpu: Some(ctx),
                cpu_params: Mutex::new(HashMap::new()),
            }),
        };
        match std::env::var("KILN_MATMUL_PRECISION").as_deref() {
            Ok("medium") => {
                if let Err(e) = dev.set_matmul_precision(Precision::Medium) {
                    log::warn!("KILN_MATMUL_PRECISION=medium: {e}");
                }
            }
            Ok("highest") | Ok("") | Err(_) => {}
            Ok(other) => {
                return Err(Error::Input(format!(
                    "KILN_MATMUL_PRECISION={other:?}: expected highest or medium"
                )))
            }
        }
        Ok(dev)
    }

    /// Which backend this device computes on.
    pub fn kind(&self) -> BackendKind {
        if self.inner.gpu.is_some() {
            BackendKind::Gpu
        } else {
            BackendKind::Cpu
        }
    }

    /// The chosen adapter (`None` on the CPU backend).
    pub fn adapter(&self) -> Option<AdapterSummary> {
        self.inner.gpu.as_ref().map(|g| summary(&g.info))
    }

    /// The optional features that were requested and granted.
    pub fn features(&self) -> wgpu::Features {
        self.inner
            .gpu
            .as_ref()
            .map(|g| g.features)
            .unwrap_or(wgpu::Features::empty())
    }

    /// The device limits (the adapter's own).
    pub fn limits(&self) -> Option<wgpu::Limits> {
        self.inner.gpu.as_ref().map(|g| g.limits.clone())
    }

    /// One line naming the backend and adapter.
    pub fn describe(&self) -> String {
        match &self.inner.gpu {
            Some(g) => format!(
                "{} ({:?}, {:?})",
                g.info.name, g.info.backend, g.info.device_type
            ),
            None => "CPU reference backend".to_string(),
        }
    }

    pub(crate) fn gpu_ctx(&self) -> Option<&GpuContext> {
        self.inner.gpu.as_ref()
    }

    /// Sets (creating an f32 one if needed) the parameter `name` on the device. An existing
    /// parameter keeps its shape and type: a tensor of another shape is an error, the values
    /// are rounded to an f16 parameter's type ([`crate::Graph::param_init_as`]).
    pub fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        match &self.inner.gpu {
            Some(g) => g.set_param(name, value),
            None => {
                let mut p = self.inner.cpu_params.lock().expect("param lock");
                let dtype = match p.get(name) {
                    Some((old, _)) if old.shape() != value.shape() => {
                        return Err(Error::Param(format!(
                            "{name}: has shape {}, cannot set a tensor of shape {}",
                            old.shape(),
                            value.shape()
                        )));
                    }
                    Some((_, dtype)) => *dtype,
                    None => DType::F32,
                };
                p.insert(name.to_string(), (value.clone().rounded(dtype), dtype));
                Ok(())
            }
        }
    }

    /// Makes sure the CPU backend holds parameter `name` as `shape` and `dtype`, creating it from
    /// `init` (rounded to `dtype`) when it does not: the CPU twin of the GPU's `param_buffer`.
    pub(crate) fn declare_cpu_param(
        &self,
        name: &str,
        shape: &Shape,
        dtype: DType,
        init: impl FnOnce() -> Tensor,
    ) -> Result<()> {
        let mut p = self.inner.cpu_params.lock().expect("param lock");
        match p.get(name) {
            Some((t, d)) if t.shape() != shape || *d != dtype => Err(Error::Param(format!(
                "{name}: the device holds {d} {}, the graph declares {dtype} {shape}",
                t.shape()
            ))),
            Some(_) => Ok(()),
            None => {
                p.insert(name.to_string(), (init().rounded(dtype), dtype));
                Ok(())
            }
        }
    }

    /// Reads the parameter `name` back to the host (an f16 one widened to f32).
    pub fn param(&self, name: &str) -> Result<Tensor> {
        match &self.inner.gpu {
            Some(g) => g.read_param(name),
            None => self
                .inner
                .cpu_params
                .lock()
                .expect("param lock")
                .get(name)
                .map(|(t, _)| t.clone())
                .ok_or_else(|| Error::Param(format!("no parameter named {name:?}"))),
        }
    }

    /// Names of every parameter on the device, sorted.
    pub fn param_names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.inner.gpu {
            Some(g) => g
                .params
                .lock()
                .expect("param lock")
                .keys()
                .cloned()
                .collect(),
            None => self
                .inner
                .cpu_params
                .lock()
                .expect("param lock")
                .keys()
                .cloned()
                .collect(),
        };
        v.sort();
        v
    }

    /// Writes the driver's pipeline cache to disk now (it is also written when the device is
    /// dropped), so that the next process compiles kiln's kernels faster. Returns the file, or
    /// `None` where the adapter has no PIPELINE_CACHE or `KILN_PIPELINE_CACHE=0` turned it off.
    /// The folder is `KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn save_pipeline_cache(&self) -> Result<Option<std::path::PathBuf>> {
        match self.inner.gpu.as_ref().and_then(|g| g.disk_cache.as_ref()) {
            Some(c) => c.save().map(Some),
            None => Ok(None),
        }
    }

    /// Sets how plans compiled from now on pick matmul kernels (see [`GemmPolicy`]); an error
    /// for a fixed configuration this adapter cannot run. No effect on the CPU backend.
    pub fn set_gemm_policy(&self, policy: GemmPolicy) -> Result<()> {
        if let Some(g) = &self.inner.gpu {
            if let GemmPolicy::Fixed(c) = policy {
                if !c.fits(&g.target) {
                    return Err(Error::Unsupported(format!(
                        "GEMM configuration {} on {}: it needs {} threads and {} bytes of \
                         workgroup memory (the adapter allows {} and {})",
                        c.describe(),
                        g.info.name,
                        c.threads(),
                        c.workgroup_bytes(),
                        g.target.max_invocations,
                        g.target.workgroup_storage
                    )));
                }
            }
            *g.gemm_policy.lock().expect("policy lock") = policy;
        }
        Ok(())
    }

    /// Sets how f32 products of plans compiled from now on may be computed (see [`Precision`];
    /// `KILN_MATMUL_PRECISION=medium` starts a process with `Medium`). The first time `Medium`
    /// is set on an adapter that has the tensor-core path, kiln runs that kernel once against the
    /// CPU reference (bias, relu, ragged edges); if it disagrees, products stay in f32 and this
    /// returns the error. On other adapters, and on the CPU backend, `Medium` computes as
    /// `Highest`: see [`Device::tensor_cores`].
    pub fn set_matmul_precision(&self, precision: Precision) -> Result<()> {
        let Some(g) = &self.inner.gpu else {
            return Ok(());
        };
        *g.precision.lock().expect("precision lock") = precision;
        if precision != Precision::Medium {
            return Ok(());
        }
        self.check_tensor_cores_once()
    }

    /// On an adapter with the tensor-core path, checks it the first time (see
    /// [`Device::set_matmul_precision`]; f16 products use it too) and errors if it failed; a
    /// no-op elsewhere.
    pub(crate) fn check_tensor_cores_once(&self) -> Result<()> {
        let Some(g) = &self.inner.gpu else {
            return Ok(());
        };
        if !g.target.coop_f16 {
            return Ok(());
        }
        let me = std::thread::current().id();
        let mut state = g.coop_check.lock().expect("check lock");
        loop {
            match &*state {
                CoopCheck::Passed => return Ok(()),
                CoopCheck::Checking(id) if *id == me => return Ok(()),
                CoopCheck::Failed(why) => return Err(Error::Unsupported(why.clone())),
                // another thread is checking: its verdict holds for this one too
                CoopCheck::Checking(_) => {
                    state = g.coop_checked.wait(state).expect("check lock");
                }
                CoopCheck::Unchecked => break,
            }
        }
        *state = CoopCheck::Checking(me);
        drop(state);
        // the check runs f32 products at medium precision, whatever was asked for; the asked
        // precision and the verdict are restored / recorded even if the check panics, so that
        // no thread waits forever
        struct Verdict<'a> {
            ctx: &'a GpuContext,
            asked: Precision,
            next: Option<CoopCheck>,
        }
        impl Drop for Verdict<'_> {
            fn drop(&mut self) {
                if let Ok(mut p) = self.ctx.precision.lock() {
                    *p = self.asked;
                }
                let next = self
                    .next
                    .take()
                    .unwrap_or_else(|| CoopCheck::Failed("the tensor-core check panicked".into()));
                if let Ok(mut s) = self.ctx.coop_check.lock() {
                    *s = next;
                }
                self.ctx.coop_checked.notify_all();
            }
        }
        let asked = std::mem::replace(
            &mut *g.precision.lock().expect("precision lock"),
            Precision::Medium,
        );
        let mut verdict_guard = Verdict {
            ctx: g,
            asked,
            next: None,
        };
        let mut verdict = self.check_tensor_cores();
        // the adapter's default configuration failed but none was fixed: the first form of the
        // kernel (unpadded, load then multiply) may still pass, and is then the default
        let default = *g.coop_default.lock().expect("coop lock");
        if let Err(e) = &verdict {
            if g.coop_config.lock().expect("coop lock").is_none() && default != CoopConfig::PLAIN {
                log::warn!(
                    "kiln: the tensor-core matmul on {} failed its check in configuration {} \
                     ({e}); trying {}",
                    g.info.name,
                    default.describe(),
                    CoopConfig::PLAIN.describe()
                );
                *g.coop_default.lock().expect("coop lock") = CoopConfig::PLAIN;
                verdict = self.check_tensor_cores();
            }
        }
        let next = match &verdict {
            Ok(()) => CoopCheck::Passed,
            Err(e) => CoopCheck::Failed(format!(
                "the tensor-core matmul on {} failed its check: {e}",
                g.info.name
            )),
        };
        if let CoopCheck::Failed(why) = &next {
            log::warn!("kiln: {why}; products stay off tensor cores");
        }
        verdict_guard.next = Some(next.clone());
        drop(verdict_guard);
        match next {
            CoopCheck::Failed(why) => Err(Error::Unsupported(why)),
            _ => Ok(()),
        }
    }

    /// Whether f32 products of plans compiled now may run on tensor cores (medium precision set,
    /// the adapter able, the kernel checked).
    pub fn tensor_cores(&self) -> bool {
        self.inner.gpu.as_ref().is_some_and(|g| g.coop_active())
    }

    /// Runs the tensor-core kernel on a product off its tile edges (with bias and relu), on one
    /// with a fused elementwise epilogue, on transposed batched ones (operands read as scalars,
    /// and as vec4s), on an f16 one (f16 storage), and on convolutions (an implicit GEMM storing
    /// NCHW with bias and relu, in f32 and in f16, an input gradient and a weight gradient),
    /// against the CPU reference at f16 tolerance.
    fn check_tensor_cores(&self) -> Result<()> {
        use crate::ops::matmul::Bias;
        use crate::tensor::DType;
        let g = crate::Graph::new();
        let a = g.input("a", [131, 70]);
        let b = g.input("b", [70, 197]);
        let c = g.input("c", [197]);
        let y = g.matmul_fused(a, b, false, false, Some((c, Bias::Cols)), true)?;
        let at = g.input("at", [2, 45, 67]);
        let bt = g.input("bt", [2, 129, 45]);
        let yt = g.matmul_t(at, bt, true, true)?;
        let ah = g.input_as("ah", [96, 80], DType::F16);
        let bh = g.input_as("bh", [80, 130], DType::F16);
        let ch = g.input_as("ch", [96], DType::F16);
        let yh = g.matmul_fused(ah, bh, false, false, Some((ch, Bias::Rows)), false)?;
        let pad = crate::graph::Conv2dOpts {
            padding: (1, 1),
            ..Default::default()
        };
        let x = g.input("x", [2, 5, 9, 11]);
        let w = g.input("w", [66, 5, 3, 3]);
        let bw = g.input("bw", [66]);
        let yc = g.conv2d_fused(x, w, Some(bw), pad, true)?;
        let yc16 = g.conv2d_fused(
            g.cast(x, DType::F16)?,
            g.cast(w, DType::F16)?,
            Some(g.cast(bw, DType::F16)?),
            pad,
            true,
        )?;
        let x2 = g.input("x2", [2, 64, 6, 6]);
        let w2 = g.input("w2", [8, 64, 3, 3]);
        let y2 = g.conv2d(x2, w2, None, pad)?;
        let dx2 = g.grad(g.sum_all(g.square(y2)?)?, &[x2])?[0];
        let x3 = g.input("x3", [2, 8, 10, 10]);
        let w3 = g.input("w3", [64, 8, 3, 3]);
        let y3 = g.conv2d(x3, w3, None, pad)?;
        let dw3 = g.grad(g.sum_all(g.square(y3)?)?, &[w3])?[0];
        // an elementwise epilogue fused into the product
        let s = g.input("s", [131, 197]);
        let ye = g.sigmoid(g.mul(g.matmul(a, b)?, s)?)?;
        // extents that are multiples of 4: the operands are staged as vec4s
        let av = g.input("av", [2, 36, 132]);
        let bv = g.input("bv", [2, 68, 36]);
        let yv = g.matmul_t(av, bv, true, true)?;
        let feeds = [
            ("a", Tensor::rand_uniform([131, 70], -1.0, 1.0, 1)),
            ("b", Tensor::rand_uniform([70, 197], -1.0, 1.0, 2)),
            ("c", Tensor::rand_uniform([197], -1.0, 1.0, 3)),
            ("at", Tensor::rand_uniform([2, 45, 67], -1.0, 1.0, 4)),
            ("bt", Tensor::rand_uniform([2, 129, 45], -1.0, 1.0, 5)),
            ("ah", Tensor::rand_uniform([96, 80], -1.0, 1.0, 6)),
            ("bh", Tensor::rand_uniform([80, 130], -1.0, 1.0, 7)),
            ("ch", Tensor::rand_uniform([96], -1.0, 1.0, 8)),
            ("x", Tensor::rand_uniform([2, 5, 9, 11], -1.0, 1.0, 9)),
            ("w", Tensor::rand_uniform([66, 5, 3, 3], -0.5, 0.5, 10)),
            ("bw", Tensor::rand_uniform([66], -1.0, 1.0, 11)),
            ("x2", Tensor::rand_uniform([2, 64, 6, 6], -1.0, 1.0, 12)),
            ("w2", Tensor::rand_uniform([8, 64, 3, 3], -0.2, 0.2, 13)),
            ("x3", Tensor::rand_uniform([2, 8, 10, 10], -1.0, 1.0, 14)),
            ("w3", Tensor::rand_uniform([64, 8, 3, 3], -0.3, 0.3, 15)),
            ("s", Tensor::rand_uniform([131, 197], -1.0, 1.0, 16)),
            ("av", Tensor::rand_uniform([2, 36, 132], -1.0, 1.0, 17)),
            ("bv", Tensor::rand_uniform([2, 68, 36], -1.0, 1.0, 18)),
        ];
        let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, t)| (*n, t)).collect();
        let outputs = [y, yt, yh, yc, yc16, dx2, dw3, ye, yv];
        let mut plan = self.compile(&g, &outputs)?;
        plan.poison(f32::NAN);
        let got = plan.run(&refs)?;
        let want = Device::cpu().compile(&g, &outputs)?.run(&refs)?;
        for (k, (x, r)) in got.iter().zip(&want).enumerate() {
            let (worst, i) = crate::tensor::max_violation(x.data(), r.data(), 2e-2, 2e-2);
            if worst > 1.0 {
                return Err(Error::Device(format!(
                    "output {k}: element {i} is {} but the reference is {}",
                    x.data()[i],
                    r.data()[i]
                )));
            }
        }
        Ok(())
    }

    /// Turns elementwise fusion on or off for plans compiled from now on (on by default;
    /// `KILN_FUSE=0` starts a process with it off). Off, every unary and binary node is its own
    /// kernel, as when comparing against or debugging the fused kernels. No effect on the CPU
    /// backend.
    pub fn set_fusion(&self, on: bool) {
        if let Some(g) = &self.inner.gpu {
            g.fusion.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether plans compiled now fuse elementwise chains (false on the CPU backend).
    pub fn fusion(&self) -> bool {
        self.inner
            .gpu
            .as_ref()
            .is_some_and(|g| g.fusion.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The GEMM configuration tuned on this adapter for an `M x N x K` product over `batch`
    /// matrices (`GemmPolicy::Tune`), if one was timed here or loaded from the cache folder.
    pub fn tuned_gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
    ) -> Option<crate::codegen::matmul::GemmConfig> {
        let g = self.inner.gpu.as_ref()?;
        let key = format!("{m}x{n}x{k}b{batch}");
        g.tuned.lock().expect("tune lock").get(&key).copied()
    }

    /// The tensor-core configuration tuned on this adapter for an `M x N x K` product over
    /// `batch` matrices with operands stored as `dtype` (`GemmPolicy::Tune`), if one was timed
    /// here or loaded from the cache folder.
    pub fn tuned_coop(
        &self,
        m: usize,
        n: usize,
        k: usize,
        batch: usize,
        dtype: crate::tensor::DType,
    ) -> Option<CoopConfig> {
        let g = self.inner.gpu.as_ref()?;
        let key = crate::exec::lower::coop_key(m, n, k, batch, dtype);
        g.coop_tuned.lock().expect("tune lock").get(&key).copied()
    }

    /// Fixes the tensor-core kernel's configuration for plans compiled from now on (`None`:
    /// tuned or chosen per adapter again; `KILN_COOP` sets it for a process). On an adapter
    /// with the tensor-core path the kernel is checked again against the CPU reference in that
    /// configuration (see [`Device::set_matmul_precision`]): an error if it disagrees (products
    /// then stay off tensor cores) or if the configuration does not fit the adapter. No effect
    /// on other adapters and the CPU backend.
    pub fn set_coop_config(&self, config: Option<CoopConfig>) -> Result<()> {
        let Some(g) = &self.inner.gpu else {
            return Ok(());
        };
        if !g.target.coop_f16 {
            return Ok(());
        }
        if let Some(c) = config.filter(|c| !c.fits(&g.target)) {
            return Err(Error::Unsupported(format!(
                "tensor-core configuration {} on {}: it needs {} bytes of workgroup memory (the \
                 adapter allows {})",
                c.describe(),
                g.info.name,
                c.workgroup_bytes(),
                g.target.workgroup_storage
            )));
        }
        *g.coop_config.lock().expect("coop lock") = config;
        if config.is_none() {
            // the adapter's choice again (even if it had fallen back to the plain form)
            *g.coop_default.lock().expect("coop lock") = CoopConfig::choose(&g.target);
        }
        {
            let mut state = g.coop_check.lock().expect("check lock");
            // a check in progress on another thread finishes in the configuration it started in
            while matches!(&*state, CoopCheck::Checking(id) if *id != std::thread::current().id()) {
                state = g.coop_checked.wait(state).expect("check lock");
            }
            *state = CoopCheck::Unchecked;
        }
        self.check_tensor_cores_once()
    }

    /// The tensor-core kernel's configuration fixed on this device, if any (see
    /// [`Device::set_coop_config`]).
    pub fn coop_config(&self) -> Option<CoopConfig> {
        self.inner
            .gpu
            .as_ref()
            .and_then(|g| *g.coop_config.lock().expect("coop lock"))
    }

    /// The adapter facts kernel generators use (`None` on the CPU backend).
    pub fn target(&self) -> Option<crate::codegen::Target> {
        self.inner.gpu.as_ref().map(|g| g.target.clone())
    }

    /// Number of distinct compiled pipelines (kernel + specialisation) cached on this device.
    pub fn pipeline_count(&self) -> usize {
        self.inner
            .gpu
            .as_ref()
            .map(|g| g.pipelines.lock().expect("pipeline lock").len())
            .unwrap_or(0)
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.describe())
    }
}

impl GpuContext {
    fn new(adapter: wgpu::Adapter) -> Result<GpuContext> {
        let info = adapter.get_info();
        let features = adapter.features() & WANTED_FEATURES;
        let limits = adapter.limits();
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: required by wgpu to request the experimental cooperative-matrix feature; kiln
            // only uses it in kernels validated against the adapter's reported matrix shapes.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln device"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Device(format!("{} refused a device: {e}", info.name)))?;
        let lost = Arc::new(Mutex::new(None));
        let lost2 = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost2.lock() {
                *l = Some(format!("{reason:?}: {msg}"));
            }
        });
        let uncaptured = Arc::new(Mutex::new(None));
        let unc2 = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("wgpu: {e}");
            if let Ok(mut u) = unc2.lock() {
                *u = Some(e.to_string());
            }
        }));
        let debug = std::env::var("KILN_DEBUG")
            .map(|v| v == "1")
            .unwrap_or(false);
        log::info!(
            "kiln: using {} ({:?}), features {features:?}",
            info.name,
            info.backend
        );
        let disk_cache = DiskCache::open(&device, &info, features);
        let mut target = crate::codegen::Target::new(&info, &limits);
        let gemm_policy = match std::env::var("KILN_GEMM") {
            Ok(v) if !v.is_empty() => GemmPolicy::parse(&v)?,
            _ => GemmPolicy::Auto,
        };
        let fusion = std::env::var("KILN_FUSE").map(|v| v != "0").unwrap_or(true);
        let coop_config = match std::env::var("KILN_COOP") {
            Ok(v) if !v.is_empty() => Some(CoopConfig::parse(&v).ok_or_else(|| {
                Error::Input(format!(
                    "KILN_COOP={v:?}: expected bk32 or bk64, then optionally /pad, then /pf or /db"
                ))
            })?),
            _ => None,
        };
        let tune_file = DiskCache::dir().map(|d| {
            let id: String = format!("{} {} {:?}", info.name, info.driver_info, info.backend)
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            d.join(format!("gemm-tune-{id}.txt"))
        });
        target.coop_f16 = features.contains(
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
                | wgpu::Features::SHADER_F16
                | wgpu::Features::SUBGROUP,
        ) && info.subgroup_min_size == 32
            && info.subgroup_max_size == 32
            && limits.max_compute_workgroup_storage_size >= crate::codegen::coop::WORKGROUP_BYTES
            && limits.max_compute_invocations_per_workgroup >= crate::codegen::coop::THREADS
            && adapter.cooperative_matrix_properties().iter().any(|p| {
                (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            });
        // a test path: the same kernel with its matrix operations in plain WGSL, on adapters
        // without cooperative matrices (lavapipe), to check its data movement there
        if !target.coop_f16 && std::env::var("KILN_EMULATE_TENSOR_CORES").is_ok_and(|v| v == "1") {
            if features.contains(wgpu::Features::SHADER_F16)
                && limits.max_compute_workgroup_storage_size
                    >= crate::codegen::coop::WORKGROUP_BYTES
                && limits.max_compute_invocations_per_workgroup >= crate::codegen::coop::THREADS
            {
                log::warn!(
                    "kiln: KILN_EMULATE_TENSOR_CORES=1: the tensor-core kernel runs emulated on {} (slow)",
                    info.name
                );
                target.coop_f16 = true;
                target.coop_emulated = true;
            } else {
                log::warn!(
                    "kiln: KILN_EMULATE_TENSOR_CORES=1 ignored: {} lacks SHADER_F16 or the \
                     workgroup size/memory the kernel needs",
                    info.name
                );
            }
        }
        if let Some(c) = coop_config.filter(|c| target.coop_f16 && !c.fits(&target)) {
            log::warn!(
                "kiln: KILN_COOP={} ignored: it needs {} bytes of workgroup memory, {} has {}",
                c.describe(),
                c.workgroup_bytes(),
                info.name,
                target.workgroup_storage
            );
        }
        let coop_default = CoopConfig::choose(&target);
        Ok(GpuContext {
            disk_cache,
            info,
            features,
            limits,
            device,
            queue,
            params: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            target,
            gemm_policy: Mutex::new(gemm_policy),
            fusion: std::sync::atomic::AtomicBool::new(fusion),
            precision: Mutex::new(Precision::Highest),
            coop_check: Mutex::new(CoopCheck::Unchecked),
            coop_checked: std::sync::Condvar::new(),
            tuned: Mutex::new(load_tuned(tune_file.as_deref())),
            coop_config: Mutex::new(coop_config),
            coop_tuned: Mutex::new(load_coop_tuned(tune_file.as_deref())),
            coop_default: Mutex::new(coop_default),
            tune_file,
            pipelines: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            lost,
            uncaptured,
            debug,
            profile_env: std::env::var("KILN_PROFILE")
                .map(|v| v == "1")
                .unwrap_or(false),
        })
    }

    /// Writes the tuning table (`key config` per line) through a temporary file.
    pub(crate) fn save_tuned(&self) -> Result<()> {
        let Some(path) = &self.tune_file else {
            return Ok(());
        };
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            source: e,
        };
        let mut lines: Vec<String> = self
            .tuned
            .lock()
            .expect("tune lock")
            .iter()
            .map(|(k, c)| format!("{k} {}", c.describe()))
            .collect();
        lines.extend(
            self.coop_tuned
                .lock()
                .expect("tune lock")
                .iter()
                .map(|(k, c)| format!("{k} {}", c.describe())),
        );
        lines.sort();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, lines.join("\n") + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Whether f16 products may run on the tensor-core kernel now: the adapter able and the
    /// kernel checked (or being checked on this thread).
    pub(crate) fn coop_f16_active(&self) -> bool {
        self.target.coop_f16 && self.coop_usable()
    }

    /// The kernel passed its check, or this thread is running that check.
    fn coop_usable(&self) -> bool {
        match &*self.coop_check.lock().expect("check lock") {
            CoopCheck::Passed => true,
            CoopCheck::Checking(id) => *id == std::thread::current().id(),
            _ => false,
        }
    }

    /// Whether products may run on the tensor-core kernel now: medium precision asked for, the
    /// adapter able, and the kernel checked (it runs during the check itself, on that thread).
    pub(crate) fn coop_active(&self) -> bool {
        self.target.coop_f16
            && *self.precision.lock().expect("precision lock") == Precision::Medium
            && self.coop_usable()
    }

    /// Errors if the device was lost or an uncaught GPU error happened since the last check.
    pub(crate) fn check_health(&self) -> Result<()> {
        if let Some(l) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(Error::DeviceLost(l));
        }
        if let Some(u) = self.uncaptured.lock().ok().and_then(|mut u| u.take()) {
            return Err(Error::Device(u));
        }
        Ok(())
    }

    /// Largest buffer a kernel can bind.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Creates a storage buffer, turning allocation failures into errors.
    pub(crate) fn create_buffer(
        &self,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let limit = self.max_binding();
        if bytes > limit && usage.contains(wgpu::BufferUsages::STORAGE) {
            return Err(Error::TooLarge {
                what: label.to_string(),
                bytes,
                limit,
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4),
            usage,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory {
                what: format!("{label}: {e}"),
                bytes,
            });
        }
        Ok(buf)
    }

    /// Writes `value` into parameter `name` as the parameter stores it, creating an f32 one when
    /// the device has none.
    fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let params = self.params.lock().expect("param lock");
        if let Some(p) = params.get(name) {
            if &p.shape != value.shape() {
                return Err(Error::Param(format!(
                    "{name}: has shape {}, cannot set a tensor of shape {}",
                    p.shape,
                    value.shape()
                )));
            }
            self.queue
                .write_buffer(&p.buffer, 0, &value.to_bytes(p.dtype));
            return Ok(());
        }
        drop(params);
        self.create_param(name, value, DType::F32).map(|_| ())
    }

    /// A new parameter `name` holding `value` stored as `dtype`.
    fn create_param(&self, name: &str, value: &Tensor, dtype: DType) -> Result<Arc<wgpu::Buffer>> {
        let buffer = Arc::new(self.create_buffer(
            &format!("param {name}"),
            dtype.buffer_bytes(value.numel()),
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        )?);
        self.queue.write_buffer(&buffer, 0, &value.to_bytes(dtype));
        self.params.lock().expect("param lock").insert(
            name.to_string(),
            GpuParam {
                shape: value.shape().clone(),
                dtype,
                buffer: buffer.clone(),
            },
        );
        Ok(buffer)
    }

    /// The buffer of parameter `name` (stored as `dtype`), created from `init` when the device
    /// has none yet; one of another shape or type is an error.
    pub(crate) fn param_buffer(
        &self,
        name: &str,
        shape: &Shape,
        dtype: DType,
        init: impl FnOnce() -> Tensor,
    ) -> Result<Arc<wgpu::Buffer>> {
        {
            let params = self.params.lock().expect("param lock");
            if let Some(p) = params.get(name) {
                if &p.shape != shape || p.dtype != dtype {
                    return Err(Error::Param(format!(
                        "{name}: the device holds {} {}, the graph declares {dtype} {shape}",
                        p.dtype, p.shape
                    )));
                }
                return Ok(p.buffer.clone());
            }
        }
        self.create_param(name, &init(), dtype)
    }

    fn read_param(&self, name: &str) -> Result<Tensor> {
        let (shape, dtype, buffer) = {
            let params = self.params.lock().expect("param lock");
            let p = params
                .get(name)
                .ok_or_else(|| Error::Param(format!("no parameter named {name:?}")))?;
            (p.shape.clone(), p.dtype, p.buffer.clone())
        };
        let bytes = dtype.buffer_bytes(shape.numel());
        let staging = self.read_buffers(&[(&buffer, 0, bytes)])?;
        let data = self.map_and_read_bytes(&staging)?.pop().unwrap_or_default();
        Tensor::from_bytes(shape, dtype, &data)
    }

    /// Copies byte ranges of buffers into staging buffers in one submission; read them with
    /// [`Self::map_and_read_bytes`].
    pub(crate) fn read_buffers(
        &self,
        ranges: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<(wgpu::Buffer, u64)>> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kiln readback"),
            });
        let mut staging = Vec::new();
        for (i, (buf, off, bytes)) in ranges.iter().enumerate() {
            let s = self.create_buffer(
                &format!("readback staging {i}"),
                *bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )?;
            enc.copy_buffer_to_buffer(buf, *off, &s, 0, *bytes);
            staging.push((s, *bytes));
        }
        self.queue.submit([enc.finish()]);
        Ok(staging)
    }

    /// Maps staging buffers (already filled by a submitted copy) and reads their bytes.
    pub(crate) fn map_and_read_bytes(
        &self,
        staging: &[(wgpu::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, (s, bytes)) in staging.iter().enumerate() {
            let tx = tx.clone();
            s.map_async(wgpu::MapMode::Read, 0..*bytes, move |r| {
                let _ = tx.send((i, r));
            });
        }
        drop(tx);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost(format!("waiting for the GPU: {e}")))?;
        for _ in 0..staging.len() {
            let (i, r) = rx
                .recv()
                .map_err(|_| Error::Device("a readback never completed".into()))?;
            r.map_err(|e| Error::Device(format!("mapping readback {i}: {e}")))?;
        }
        let mut out = Vec::with_capacity(staging.len());
        for (s, bytes) in staging {
            let view = s
                .get_mapped_range(0..*bytes)
                .map_err(|e| Error::Device(format!("reading a mapped buffer: {e:?}")))?;
            out.push(view.to_vec());
            drop(view);
            s.unmap();
        }
        self.check_health()?;
        Ok(out)
    }

    /// The bind-group layout and pipeline layout for kernels binding buffers as `mode` says.
    pub(crate) fn layout(
        &self,
        mode: BindingMode,
    ) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
        let mut layouts = self.layouts.lock().expect("layout lock");
        let n_bindings = mode.n_inputs + mode.output as usize;
        layouts
            .entry(mode)
            .or_insert_with(|| {
                let shift = mode.step as u32;
                let mut entries: Vec<wgpu::BindGroupLayoutEntry> = (0..n_bindings)
                    .map(|i| wgpu::BindGroupLayoutEntry {
                        binding: i as u32 + shift,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage {
                                read_only: i < mode.rw_from.min(mode.n_inputs),
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                if mode.step {
                    entries.insert(
                        0,
                        wgpu::BindGroupLayoutEntry {
                            binding: 0,
                            visibility: wgpu::ShaderStages::COMPUTE,
                            ty: wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: true,
                                min_binding_size: wgpu::BufferSize::new(16),
                            },
                            count: None,
                        },
                    );
                }
                let label = format!("kiln layout {mode:?}");
                let bgl = self
                    .device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&label),
                        entries: &entries,
                    });
                let pl = self
                    .device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(&label),
                        bind_group_layouts: &[Some(&bgl)],
                        immediate_size: 0,
                    });
                (bgl, pl)
            })
            .clone()
    }

    /// The compute pipeline for a family's entry point with these override constants, compiled
    /// once per device and shared by every plan.
    pub(crate) fn pipeline(
        &self,
        family: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        mode: BindingMode,
        generated: Option<&crate::codegen::Generated>,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let module_key = match generated {
            Some(g) => format!("{family}[{}]", g.key),
            None => family.to_string(),
        };
        let key = format!("{module_key}:{entry}:{constants:?}:{mode:?}");
        if let Some(p) = self.pipelines.lock().expect("pipeline lock").get(&key) {
            return Ok(p.clone());
        }
        let source: &str = match generated {
            Some(g) => &g.wgsl,
            None => crate::ops::shader_source(family)
                .ok_or_else(|| Error::Unsupported(format!("no shader family {family:?}")))?,
        };
        let module = {
            let mut modules = self.modules.lock().expect("module lock");
            if !modules.contains_key(&module_key) {
                if self.debug {
                    eprintln!("[kiln] compiling {module_key}:\n{source}");
                }
                let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
                let m = self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(&module_key),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    });
                if let Some(e) = pollster::block_on(scope.pop()) {
                    return Err(Error::Device(format!("compiling {module_key}: {e}")));
                }
                modules.insert(module_key.clone(), m);
            }
            modules[&module_key].clone()
        };
        if self.debug {
            eprintln!("[kiln] pipeline {family}::{entry} constants {constants:?}");
        }
        let (_, layout) = self.layout(mode);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&key),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: self.disk_cache.as_ref().map(|c| &c.cache),
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!("compiling {key}: {e}")));
        }
        if let Some(c) = &self.disk_cache {
            c.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let pipeline = Arc::new(pipeline);
        self.pipelines
            .lock()
            .expect("pipeline lock")
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }
}

/// The tuning table saved by `GpuContext::save_tuned`; lines that do not parse are skipped (a
/// table from another kiln version is only a hint).
fn load_tuned(
    path: Option<&std::path::Path>,
) -> HashMap<String, crate::codegen::matmul::GemmConfig> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let (k, c) = l.split_once(' ')?;
            Some((k.to_string(), crate::codegen::matmul::GemmConfig::parse(c)?))
        })
        .collect()
}

/// The tensor-core lines (`coop:` keys) of the tuning table.
fn load_coop_tuned(path: Option<&std::path::Path>) -> HashMap<String, CoopConfig> {
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let (k, c) = l.split_once(' ')?;
            k.starts_with("coop:")
                .then(|| Some((k.to_string(), CoopConfig::parse(c)?)))?
        })
        .collect()
}

/// The driver's pipeline cache, loaded from and saved to a file keyed by adapter and driver.
pub(crate) struct DiskCache {
    cache: wgpu::PipelineCache,
    path: std::path::PathBuf,
    /// Pipelines were compiled since the last save.
    dirty: std::sync::atomic::AtomicBool,
}

impl DiskCache {
    fn dir() -> Option<std::path::PathBuf> {
        if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
            return Some(d.into());
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(std::path::PathBuf::from(d).join("kiln"));
        }
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache").join("kiln"))
    }

    fn open(
        device: &wgpu::Device,
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
    ) -> Option<DiskCache> {
        if !features.contains(wgpu::Features::PIPELINE_CACHE)
            || std::env::var("KILN_PIPELINE_CACHE").is_ok_and(|v| v == "0")
        {
            return None;
        }
        let path = Self::dir()?.join(wgpu::util::pipeline_cache_key(info)?);
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is only ever what `PipelineCache::get_data` of an adapter with this
        // cache key wrote (the key names adapter, driver and wgpu's cache version); wgpu checks
        // its header and, with `fallback`, starts an empty cache when the data does not fit.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("kiln pipeline cache"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Writes the cache through a temporary file, so a crash never leaves a torn one.
    fn save(&self) -> Result<std::path::PathBuf> {
        let io = |e: std::io::Error| Error::Io {
            path: self.path.display().to_string(),
            source: e,
        };
        if let Some(data) = self.cache.get_data() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let tmp = self
                .path
                .with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, data).map_err(io)?;
            std::fs::rename(&tmp, &self.path).map_err(io)?;
        }
        self.dirty
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(self.path.clone())
    }
}

impl Drop for GpuContext {
    fn drop(&mut self) {
        if let Some(c) = &self.disk_cache {
            if c.dirty.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = c.save() {
                    log::warn!("kiln: could not save the pipeline cache: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor-core check's graph passes on whatever kernels the adapter runs (tensor cores
    /// or not): a failure on an H100 then means the tensor-core kernel, not the check.
    #[test]
    fn the_tensor_core_check_passes_on_any_adapter() {
        let dev = match Device::gpu() {
            Ok(d) => d,
            Err(e) if std::env::var("KILN_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
                panic!("KILN_REQUIRE_GPU=1 but no GPU adapter: {e}")
            }
            Err(e) => {
                eprintln!("NOTICE: no GPU adapter ({e}); the tensor-core check is not run");
                return;
            }
        };
        dev.check_tensor_cores().unwrap();
    }
}
