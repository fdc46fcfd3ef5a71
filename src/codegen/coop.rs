//! The tensor-core GEMM: products computed with f16 inputs and f32 accumulation through
//! cooperative matrices (`enable wgpu_cooperative_matrix;`, 16x16x16 f16 -> f32), used for f16
//! graphs, and for f32 graphs when the device's matmul precision is `Precision::Medium` (as
//! PyTorch's `torch.set_float32_matmul_precision("medium")`), where the adapter offers that
//! matrix shape with 32-wide subgroups. Plain products and implicit-GEMM convolutions
//! ([`Operands`]: forward, weight gradient, input gradient) alike; bindings stored as
//! [`Storage`] says.
//!
//! A workgroup of 128 threads (four subgroups, 2 x 2) computes a 128 x 128 output tile (or of
//! 256 threads, 2 x 4, a 128 x 256 one), each subgroup a 64 x 64 block as 4 x 4 accumulators.
//! Both operand tiles are staged through workgroup memory 32 or 64 deep, converted to f16 on
//! the way (bounds-checked, zero-filled, so any M, N, K and either transpose work; read as
//! vec4s where an operand's contiguous axis is a multiple of 4, [`vec_operands`]); each
//! subgroup loads its 4 A and 4 B fragments from there per 16 of K. [`CoopConfig`] says how:
//! the tile's width, the staging depth, rows padded against memory-bank conflicts, and the next
//! step's loads issued before this step's products (register prefetch, optionally into a second
//! buffer); `KILN_GEMM=tune` and `kiln-bench --sweep` time them on the adapter. If the
//! adapter's default fails the device's check, the plain form is checked and used instead. The
//! epilogue passes each accumulator through a per-subgroup 16 x 16 f32 staging tile so that
//! the bias, relu, a fused elementwise epilogue (the plan's `MatMulEpilogue`) and edge checks
//! apply per element.
//!
//! [`Cores::Emulated`] writes the same kernel with the four cooperative-matrix operations
//! (`coopLoadT`, `coopMultiplyAdd`, `coopStoreT`, the subgroup builtins) replaced by plain WGSL
//! over virtual 32-lane subgroups (`lid / 32`), the rest the same text (its epilogue a loop
//! reading the accumulators straight rather than unrolled through the staging tile, which the
//! emulation does without): slow, but it runs on any adapter with SHADER_F16, so the staging,
//! gathers, batch bases and epilogue are tested on lavapipe (`KILN_EMULATE_TENSOR_CORES=1`,
//! tests/tensor_cores.rs). Only the hardware's fragment layout and the driver's translation
//! remain for a GPU to show.
//!
//! Inputs are rounded to f16 (10-bit mantissa, |x| <= 65504): results differ from f32 by about
//! `sqrt(K) * 2^-11` relative to the operands' scale. The device checks the kernel once against
//! the CPU reference before using it (`Device::set_matmul_precision`, or the first plan with an
//! f16 product).

use std::fmt::Write;

use super::elementwise::Epilogue;
use super::{load, narrow, widen, Generated, Storage};
use crate::ops::conv::ColGeometry;
use crate::ops::matmul::{Bias, MatMul, ProductDims};
use crate::ops::{groups, KernelSpec};
use crate::tensor::DType;

/// Output rows of one workgroup's tile (its columns: 128, or 256 for [`CoopConfig::wide`]).
pub const TILE: usize = 128;
/// Threads per workgroup of the narrowest configuration: four 32-wide subgroups (eight for
/// [`CoopConfig::wide`]).
pub const THREADS: u32 = 128;
/// Bytes of workgroup memory the least demanding configuration ([`CoopConfig::PLAIN`]) needs.
pub const WORKGROUP_BYTES: u32 = CoopConfig::PLAIN.workgroup_bytes();

/// One configuration of the tensor-core kernel (its tile 128 x 128 on four subgroups, or
/// 128 x 256 on eight where `wide`). [`CoopConfig::choose`] picks one per adapter; `KILN_COOP` or
/// `Device::set_coop_config` fixes one; `KILN_GEMM=tune` times them per product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CoopConfig {
    /// Depth of one staging step through K: 32, or 64 (half the barriers, twice the memory).
    pub bk: u32,
    /// Rows of both staged tiles padded by 8 halves (16 bytes). Unpadded, the b tile's rows
    /// (256 bytes) all start in the same memory bank and the a tile's (64 or 128 bytes) in two
    /// or one, so the 16 rows a fragment load reads collide; padded, each row of 8 starts 16
    /// bytes further round the banks.
    pub pad: bool,
    /// The next step's operands loaded into registers before this step's products and stored
    /// after them, so that the global loads' latency hides behind the matrix work.
    pub prefetch: bool,
    /// With `prefetch`: two buffers of each tile, the registers stored into the one not being
    /// read (one barrier per step instead of two).
    pub double_buffer: bool,
    /// A 128 x 256 tile on eight subgroups (2 x 4) instead of 128 x 128 on four: a quarter
    /// less operand traffic per product from L2 (what bounds a 128 x 128 tile on an H100 once
    /// the tensor cores are fed: about 4.6 TB/s at 300 TFLOP/s with f16 operands).
    pub wide: bool,
}

impl CoopConfig {
    /// 32 deep, unpadded, load-then-compute: the first form of the kernel.
    pub const PLAIN: CoopConfig = CoopConfig {
        bk: 32,
        pad: false,
        prefetch: false,
        double_buffer: false,
        wide: false,
    };

    /// Output columns of one workgroup's tile: 128, or 256 wide.
    pub const fn tile_n(&self) -> u32 {
        if self.wide {
            256
        } else {
            128
        }
    }

    /// Threads per workgroup (one per column of the tile): 128, or 256 wide.
    pub const fn threads(&self) -> u32 {
        self.tile_n()
    }

    /// Subgroups (64 x 64 blocks) across the tile's columns: 2, or 4 wide.
    const fn subgroup_cols(&self) -> u32 {
        self.tile_n() / 64
    }

    /// Row stride of the staged a tile (`As[m * a_stride + k]`), in halves.
    pub const fn a_stride(&self) -> u32 {
        self.bk + if self.pad { 8 } else { 0 }
    }

    /// Row stride of the staged b tile (`Bs[k * b_stride + n]`), in halves.
    pub const fn b_stride(&self) -> u32 {
        self.tile_n() + if self.pad { 8 } else { 0 }
    }

    /// Halves of one buffer of the a and the b tile.
    const fn tile_halves(&self) -> (u32, u32) {
        (TILE as u32 * self.a_stride(), self.bk * self.b_stride())
    }

    /// Buffers of each tile: 2 double-buffered, else 1.
    const fn stages(&self) -> u32 {
        if self.double_buffer {
            2
        } else {
            1
        }
    }

    /// Bytes of workgroup memory: the f16 tiles and one f32 16x16 staging tile per subgroup.
    pub const fn workgroup_bytes(&self) -> u32 {
        self.tile_bytes() + self.threads() / 32 * 256 * 4
    }

    /// Bytes of workgroup memory of the f16 tiles alone (all the emulated kernel has).
    const fn tile_bytes(&self) -> u32 {
        let (a, b) = self.tile_halves();
        self.stages() * (a + b) * 2
    }

    /// Whether the configuration is well formed and fits the adapter's workgroup memory (as
    /// the kernel runs there: tensor cores or emulated).
    pub fn fits(&self, target: &super::Target) -> bool {
        let bytes = if target.coop_emulated {
            self.tile_bytes()
        } else {
            self.workgroup_bytes()
        };
        (self.bk == 32 || self.bk == 64)
            && (self.prefetch || !self.double_buffer)
            && bytes <= target.workgroup_storage
            && self.threads() <= target.max_invocations
    }

    /// Every well-formed configuration that fits the adapter.
    pub fn all(target: &super::Target) -> Vec<CoopConfig> {
        let mut v = Vec::new();
        for wide in [false, true] {
            for bk in [32, 64] {
                for pad in [false, true] {
                    for (prefetch, double_buffer) in [(false, false), (true, false), (true, true)] {
                        let c = CoopConfig {
                            bk,
                            pad,
                            prefetch,
                            double_buffer,
                            wide,
                        };
                        if c.fits(target) {
                            v.push(c);
                        }
                    }
                }
            }
        }
        v
    }

    /// The configuration plans use unless one was fixed or tuned: the first that fits of
    /// padded and double-buffered 32 deep (what fast GEMMs do: conflict-free fragment loads,
    /// global loads in flight during the products, one barrier per step), padded with register
    /// prefetch 64 or 32 deep, padded, plain.
    pub fn choose(target: &super::Target) -> CoopConfig {
        let pad = CoopConfig {
            pad: true,
            ..CoopConfig::PLAIN
        };
        let pf = CoopConfig {
            prefetch: true,
            ..pad
        };
        [
            CoopConfig {
                double_buffer: true,
                ..pf
            },
            CoopConfig { bk: 64, ..pf },
            pf,
            pad,
        ]
        .into_iter()
        .find(|c| c.fits(target))
        .unwrap_or(CoopConfig::PLAIN)
    }

    /// The form `KILN_COOP` takes and the kernel's label shows, e.g. `bk32/pad/db`,
    /// `bk32/wide/pad/pf`.
    pub fn describe(&self) -> String {
        format!(
            "bk{}{}{}{}",
            self.bk,
            if self.wide { "/wide" } else { "" },
            if self.pad { "/pad" } else { "" },
            if self.double_buffer {
                "/db"
            } else if self.prefetch {
                "/pf"
            } else {
                ""
            }
        )
    }

    /// Parses [`CoopConfig::describe`]'s form (not checking that it fits an adapter).
    pub fn parse(s: &str) -> Option<CoopConfig> {
        let mut parts = s.trim().split('/');
        let bk = parts.next()?.strip_prefix("bk")?.parse().ok()?;
        let mut c = CoopConfig {
            bk,
            ..CoopConfig::PLAIN
        };
        for p in parts {
            match p {
                "pad" => c.pad = true,
                "wide" => c.wide = true,
                "pf" => c.prefetch = true,
                "db" => (c.prefetch, c.double_buffer) = (true, true),
                _ => return None,
            }
        }
        (bk == 32 || bk == 64).then_some(c)
    }
}

/// Whether the kernel runs on tensor cores or emulates them (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cores {
    /// Cooperative-matrix operations, on the adapter's matrix units.
    Tensor,
    /// The same kernel with those operations in plain WGSL (a test path).
    Emulated,
}

impl Cores {
    /// What a target runs: emulated where `KILN_EMULATE_TENSOR_CORES=1` enabled it.
    pub fn of(target: &super::Target) -> Cores {
        if target.coop_emulated {
            Cores::Emulated
        } else {
            Cores::Tensor
        }
    }
}

/// Whether the tensor-core kernel is worth it for a product: enough rows, columns and depth to
/// fill at least a good part of its 128 x 128 tile.
pub fn applies(d: &ProductDims) -> bool {
    d.m >= 64 && d.n >= 64 && d.k >= 32
}

/// How the tensor-core kernel reads its operands and stores its result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Operands {
    /// `a` and `b` are matrices (with batch strides), the result `[batch.., M, N]`.
    Matrices,
    /// A convolution as an implicit GEMM: `b` is an NCHW image read as its column matrix
    /// `im2col(b)` (`codegen::matmul::cols_fn`); with `nchw = Some(HW)` the result `[M, N*HW]`
    /// is stored as the image `[N, M, HW]`.
    Im2col {
        geom: ColGeometry,
        nchw: Option<usize>,
    },
    /// A convolution's input gradient as one implicit GEMM (`codegen::matmul::dgrad_kernel`):
    /// `a` is the weight, `b` the output gradient, the result the image gradient in NCHW.
    Dgrad(ColGeometry),
}

/// The launch of `mm` as the tensor-core kernel, operands, bias and result stored as `storage`
/// says (a `DType` for all alike; f32 operands are rounded to f16 when staged, f16 ones staged
/// as they are).
pub fn kernel(
    mm: &MatMul,
    d: &ProductDims,
    storage: impl Into<Storage>,
    cores: Cores,
    cfg: CoopConfig,
) -> Generated {
    kernel_with(mm, d, storage, Operands::Matrices, cores, None, cfg)
}

/// [`kernel`] reading and storing as `operands` says (implicit-GEMM convolutions), with a fused
/// elementwise `epilogue` after the bias and relu (plain products only; see
/// `codegen::elementwise::epilogue`: its inputs bind after the bias, the output after them).
pub fn kernel_with(
    mm: &MatMul,
    d: &ProductDims,
    storage: impl Into<Storage>,
    operands: Operands,
    cores: Cores,
    epilogue: Option<&Epilogue>,
    cfg: CoopConfig,
) -> Generated {
    let storage = storage.into();
    let batch = d.batch.numel();
    let tiles_m = groups(d.m, TILE);
    let tiles_n = groups(d.n, cfg.tile_n() as usize);
    let total = tiles_m * tiles_n * batch as u64;
    let mut constants = vec![
        ("M", d.m as f64),
        ("N", d.n as f64),
        ("K", d.k as f64),
        ("TILES_M", tiles_m as f64),
        ("TILES_N", tiles_n as f64),
        ("TOTAL", total as f64),
    ];
    constants.extend(d.batch_constants());
    let vec = vec_operands(mm, d, operands);
    let key = format!(
        "coop16{}{}{}{}{},{}",
        super::matmul::product_flags(mm),
        storage.describe(),
        if vec[0] { ",va" } else { "" },
        if vec[1] { ",vb" } else { "" },
        if cores == Cores::Emulated {
            ",emulated"
        } else {
            ""
        },
        cfg.describe()
    );
    let src = wgsl_with(mm, storage, operands, cores, epilogue, vec, cfg);
    let key = match (operands, epilogue) {
        (Operands::Matrices, None) => key,
        // the program (its dataflow, scalars and shapes) is in the text
        (_, Some(e)) => format!(
            "{key},epilogue[{}@{:016x}]",
            e.describe,
            super::elementwise::fnv1a(src.as_bytes())
        ),
        // the geometry is in the text
        _ => format!(
            "{key},conv@{:016x}",
            super::elementwise::fnv1a(src.as_bytes())
        ),
    };
    Generated {
        spec: KernelSpec {
            family: "matmul_coop",
            entry: "main",
            constants,
            workgroups: total,
        },
        key,
        wgsl: src.into(),
    }
}

/// Which operands the staging reads as `vec4`s: those read as plain matrices (`a` of a
/// convolution too, the weight) whose contiguous axis is a multiple of 4, so that every vec4 of a
/// row lies inside it (batch strides are multiples of that axis).
pub fn vec_operands(mm: &MatMul, d: &ProductDims, operands: Operands) -> [bool; 2] {
    let a_axis = if mm.trans_a { d.m } else { d.k };
    let b_axis = if mm.trans_b { d.k } else { d.n };
    [
        !matches!(operands, Operands::Dgrad(_)) && a_axis % 4 == 0,
        operands == Operands::Matrices && b_axis % 4 == 0,
    ]
}

/// The WGSL for one combination of transposes, epilogue and storage type (scalar loads).
pub fn wgsl(mm: &MatMul, storage: impl Into<Storage>, cores: Cores, cfg: CoopConfig) -> String {
    wgsl_with(
        mm,
        storage,
        Operands::Matrices,
        cores,
        None,
        [false; 2],
        cfg,
    )
}

/// [`wgsl`] reading and storing as `operands` says, with an optional fused `epilogue` (plain
/// products only: it reads its other inputs at the result's index `obase + row * N + col`),
/// `a` and `b` bound and staged as vec4s where `vec` says (see [`vec_operands`]), staged as
/// `cfg` says.
pub fn wgsl_with(
    mm: &MatMul,
    storage: impl Into<Storage>,
    operands: Operands,
    cores: Cores,
    epilogue: Option<&Epilogue>,
    vec: [bool; 2],
    cfg: CoopConfig,
) -> String {
    assert!(
        epilogue.is_none() || operands == Operands::Matrices,
        "the tensor-core kernel fuses epilogues into plain products only"
    );
    assert!(
        (!vec[0] || !matches!(operands, Operands::Dgrad(_)))
            && (!vec[1] || operands == Operands::Matrices),
        "gathered operands are read as scalars"
    );
    let (tile, tile_n, threads) = (TILE as u32, cfg.tile_n(), cfg.threads());
    let (subgroups, sg_cols) = (threads / 32, cfg.subgroup_cols());
    let bk = cfg.bk;
    let (sta, stb) = (cfg.a_stride(), cfg.b_stride());
    let (asz, bsz) = cfg.tile_halves();
    let emulated = cores == Cores::Emulated;
    let st = storage.into();
    let dt = st.out;
    let (sa, sb, sbias) = (st.a, st.b, st.bias);
    let mut s = String::new();
    let va = if vec[0] { " as vec4s" } else { "" };
    let vb = if vec[1] { " as vec4s" } else { "" };
    let first_extra = if mm.bias == Bias::None { 2 } else { 3 };
    let out_binding = first_extra + epilogue.map_or(0, |e| e.extra);
    let _ = writeln!(
        s,
        "// matmul_coop.wgsl: generated by src/codegen/coop.rs (transposes a={} b={}, bias {:?}, relu {}).
//
// out[z] = relu?(op(a[z]) x op(b[z]) + bias?) with f16 inputs and f32 accumulation on tensor
// cores: cooperative 16x16x16 matrices, operands staged through workgroup memory as f16.
//
// Bindings (group 0):
//   0  a     storage, read        [batch.., M, K] (transposed: [batch.., K, M]), {sa}{va}
//   1  b     storage, read        [batch.., K, N] (transposed: [batch.., N, K]), {sb}{vb}{}
//   {out_binding}  out   storage, read_write  [batch.., M, N], {dt}
// Overrides: M, N, K; TILES_M/N = ceil(M / 128), ceil(N / {tile_n}); batch shape BD1..BD3 and
//            operand strides SA*/SB* as in matmul.wgsl; TOTAL = TILES_M * TILES_N * batch.
// Dispatch: TOTAL workgroups of {threads} threads ({subgroups} 32-wide subgroups; the host only picks
//           this kernel where the adapter's subgroups are exactly 32 wide), folded into
//           (x <= 65535, y). Workgroup w computes the 128x{tile_n} tile (w / TILES_N % TILES_M,
//           w % TILES_N) of batch w / (TILES_M * TILES_N); subgroup s the 64x64 block
//           (s / {sg_cols}, s % {sg_cols}) of it.
// Configuration {cfgd}: tiles staged {bk} deep through K, rows {pad};
// {pipe}.
{}
enable f16;
{}",
        mm.trans_a,
        mm.trans_b,
        mm.bias,
        mm.relu,
        if mm.bias == Bias::None {
            ""
        } else {
            "\n//   2  bias  storage, read        [M] or [N], same type"
        },
        if emulated {
            "// EMULATED (src/codegen/coop.rs, Cores::Emulated): the cooperative-matrix operations are
// the emu_* functions below, over virtual 32-lane subgroups; a test path, not a fast one.
"
        } else {
            ""
        },
        if emulated {
            ""
        } else {
            "enable wgpu_cooperative_matrix;\n"
        },
        cfgd = cfg.describe(),
        pad = if cfg.pad {
            "padded by 8 halves against memory-bank conflicts"
        } else {
            "unpadded"
        },
        pipe = if cfg.double_buffer {
            "the next step's operands loaded into registers during this step's products and stored\n// into the other of two buffers (one barrier per step)"
        } else if cfg.prefetch {
            "the next step's operands loaded into registers during this step's products"
        } else {
            "each step loads, then multiplies"
        },
    );
    if let Some(e) = epilogue {
        let _ = writeln!(
            s,
            "// Epilogue: the fused elementwise ops [{}] on each result (after bias and relu), their
//   other inputs at bindings {first_extra}..{out_binding} (storage, read), read at the result's
//   element index; the output moves to binding {out_binding}.
",
            e.describe
        );
    }
    s.push_str(&super::overrides(&[
        "M", "N", "K", "TILES_M", "TILES_N", "TOTAL", "BD1", "BD2", "BD3", "SA0", "SA1", "SA2",
        "SA3", "SB0", "SB1", "SB2", "SB3",
    ]));
    let batch_bases = super::BATCH_BASES;
    // a convolution's gathers (they read `a` and `b`) and NCHW store index
    let (conv_fns, nchw) = match operands {
        Operands::Matrices => (String::new(), None),
        Operands::Im2col { geom, nchw } => (super::matmul::cols_fn(geom, sb, dt), nchw),
        Operands::Dgrad(geom) => (
            super::matmul::dgrad_fns(geom, sa, sb, dt),
            Some(geom.image.0 * geom.image.1),
        ),
    };
    let nchw_fn = nchw
        .map(|hw| {
            format!(
                "
// where element [r, (n, p)] of the [M, N*{hw}] result lives in the image [N, M, {hw}]
fn nchw_index(r: u32, q: u32) -> u32 {{
    return ((q / {hw}u) * M + r) * {hw}u + q % {hw}u;
}}
"
            )
        })
        .unwrap_or_default();
    if operands != Operands::Matrices {
        let _ = writeln!(
            s,
            "// Implicit GEMM ({operands:?}): the operands are gathered by the functions below
// (as in src/codegen/matmul.rs), the result stored {}.",
            if nchw.is_some() {
                "as an NCHW image (nchw_index)"
            } else {
                "as [M, N]"
            }
        );
    }
    s.push('\n');
    s.push_str(&super::matmul::product_bindings(
        st,
        [vec[0], vec[1], false],
        mm.bias != Bias::None,
        epilogue,
        out_binding,
    ));
    let _ = writeln!(
        s,
        "{conv_fns}{nchw_fn}{epi_fns}
// As[m * {sta} + k] = op(a)[row0 + m, k0 + k]; Bs[k * {stb} + n] = op(b)[k0 + k, col0 + n]{halves}
var<workgroup> As: array<f16, {as_all}>;
var<workgroup> Bs: array<f16, {bs_all}>;
{cs_decl}{emu_fns}
@compute @workgroup_size({threads})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,{builtins}
) {{{lanes}
    let w = wid.y * nwg.x + wid.x;
    if w >= TOTAL {{
        return;
    }}
    let tn = w % TILES_N;
    let tm = (w / TILES_N) % TILES_M;
    let z = w / (TILES_N * TILES_M);
{batch_bases}    let obase = z * M * N;
    let row0 = tm * {tile}u;
    let col0 = tn * {tile_n}u;
    let wm = sid / {sg_cols}u;
    let wn = sid % {sg_cols}u;
",
        emu_fns = if emulated {
            emulation_fns(cfg)
        } else {
            String::new()
        },
        epi_fns = epilogue.map_or(String::new(), |e| e.functions.clone()),
        halves = if cfg.double_buffer {
            format!("\n// (two buffers: step s through K uses As[(s % 2) * {asz} ..], Bs[(s % 2) * {bsz} ..])")
        } else {
            String::new()
        },
        as_all = asz * cfg.stages(),
        cs_decl = if emulated {
            String::new()
        } else {
            format!(
                "// one 16x16 f32 tile per subgroup for the epilogue\nvar<workgroup> Cs: array<f32, {}>;\n",
                subgroups * 256
            )
        },
        bs_all = bsz * cfg.stages(),
        builtins = if emulated {
            ""
        } else {
            "
    @builtin(subgroup_id) sid: u32,
    @builtin(subgroup_invocation_id) lane: u32,"
        },
        lanes = if emulated {
            "
    // virtual 32-lane subgroups
    let sid = lid / 32u;
    let lane = lid % 32u;"
        } else {
            ""
        },
    );
    // the accumulators start from a zeroed staging tile (a load, as cooperative matrices are
    // made everywhere, rather than a null constant of the matrix type)
    if emulated {
        // accumulator (i, j) is acc[(4 i + j) * 8 ..][..8], zeroed as declared; the
        // emulation needs no staging tile for it (4 KiB of workgroup memory left for the
        // operand tiles: lavapipe's 32 KiB then hold the double-buffered configuration)
        let _ = writeln!(s, "    var acc: array<f32, 128>;");
    } else {
        let _ = writeln!(
            s,
            "    let cs = sid * 256u;
    for (var q = 0u; q < 8u; q = q + 1u) {{
        Cs[cs + lane + q * 32u] = 0.0;
    }}
    workgroupBarrier();"
        );
        for i in 0..4 {
            for j in 0..4 {
                let _ = writeln!(
                    s,
                    "    var c{i}{j} = coopLoadT<coop_mat16x16<f32, C>>(&Cs[cs], 16u);"
                );
            }
        }
    }
    // a thread's staged column of b is the same at every step through K (b not transposed:
    // element lid + l * threads of the tile is column lid, as there are as many threads as
    // columns): its part of the gather, once
    match operands {
        Operands::Im2col { .. } if !mm.trans_b => {
            let _ = writeln!(s, "    let pcol = cols_p(col0 + lid);");
        }
        Operands::Dgrad(_) => {
            let _ = writeln!(s, "    let pcol = dy_q(col0 + lid);");
        }
        _ => {}
    }
    // staging: 128 (b: the tile's width) x BK elements of each tile, as scalars or vec4s where
    // the operand's contiguous axis allows, consecutive threads on consecutive addresses
    let (stage_a, stage_b) = (Staged::a(mm, operands, sa), Staged::b(mm, operands, sb));
    let stage = |s: &mut String, phase: Phase, k: &str, offs: [&str; 2]| {
        stage_a.write(s, vec[0], cfg, phase, k, offs[0]);
        stage_b.write(s, vec[1], cfg, phase, k, offs[1]);
    };
    // one step's products from the buffers at these offsets
    let products = |s: &mut String, ao: &str, bo: &str| {
        if emulated {
            let _ = writeln!(
                s,
                "        for (var kk = 0u; kk < {bk}u; kk = kk + 16u) {{
            for (var ij = 0u; ij < 16u; ij = ij + 1u) {{
                let ia = {ao} + (wm * 64u + (ij / 4u) * 16u) * {sta}u + kk;
                let ib = {bo} + kk * {stb}u + wn * 64u + (ij % 4u) * 16u;
                emu_multiply_add(&acc, ij * 8u, ia, ib, lane);
            }}
        }}"
            );
            return;
        }
        for kk in (0..bk).step_by(16) {
            // naga needs every coopLoad index bound to a `let`
            for i in 0..4 {
                let _ = writeln!(
                    s,
                    "        let ia{kk}_{i} = {ao} + (wm * 64u + {}u) * {sta}u + {kk}u;
        let fa{kk}_{i} = coopLoadT<coop_mat16x16<f16, A>>(&As[ia{kk}_{i}], {sta}u);",
                    i * 16
                );
            }
            for j in 0..4 {
                let _ = writeln!(
                    s,
                    "        let ib{kk}_{j} = {bo} + {kk}u * {stb}u + wn * 64u + {}u;
        let fb{kk}_{j} = coopLoadT<coop_mat16x16<f16, B>>(&Bs[ib{kk}_{j}], {stb}u);",
                    j * 16
                );
            }
            for i in 0..4 {
                for j in 0..4 {
                    let _ = writeln!(
                        s,
                        "        c{i}{j} = coopMultiplyAdd(fa{kk}_{i}, fb{kk}_{j}, c{i}{j});"
                    );
                }
            }
        }
    };
    let next = format!("k0 + {bk}u");
    if cfg.prefetch {
        // the registers, and the first step's operands in them
        stage(&mut s, Phase::Declare, "", ["", ""]);
        stage(&mut s, Phase::Load, "0u", ["", ""]);
    }
    if cfg.double_buffer {
        stage(&mut s, Phase::Store, "", ["0u", "0u"]);
        let _ = writeln!(
            s,
            "    workgroupBarrier();
    for (var k0 = 0u; k0 < K; k0 = k0 + {bk}u) {{
        // this step's buffers, and the other ones, which the next step's operands go to
        let ao = (k0 / {bk}u) % 2u * {asz}u;
        let bo = (k0 / {bk}u) % 2u * {bsz}u;
        let an = {asz}u - ao;
        let bn = {bsz}u - bo;"
        );
        stage(&mut s, Phase::Load, &next, ["", ""]);
        products(&mut s, "ao", "bo");
        stage(&mut s, Phase::Store, "", ["an", "bn"]);
    } else if cfg.prefetch {
        let _ = writeln!(s, "    for (var k0 = 0u; k0 < K; k0 = k0 + {bk}u) {{");
        stage(&mut s, Phase::Store, "", ["0u", "0u"]);
        let _ = writeln!(s, "        workgroupBarrier();");
        stage(&mut s, Phase::Load, &next, ["", ""]);
        products(&mut s, "0u", "0u");
    } else {
        let _ = writeln!(s, "    for (var k0 = 0u; k0 < K; k0 = k0 + {bk}u) {{");
        stage(&mut s, Phase::Both, "k0", ["0u", "0u"]);
        let _ = writeln!(s, "        workgroupBarrier();");
        products(&mut s, "0u", "0u");
    }
    let _ = writeln!(s, "        workgroupBarrier();\n    }}");
    // epilogue through the staging tile, one accumulator at a time: unrolled on tensor cores;
    // a loop over the accumulators, reading them straight, when emulated (the same text with
    // the offsets computed, so that lavapipe compiles one loop rather than 16)
    let block = |store_c: Option<&str>, value: &str, ri: &str, ci: &str| {
        let (before, after) = match store_c {
            Some(st) => (
                format!("    {st}\n    workgroupBarrier();\n"),
                "\n    workgroupBarrier();",
            ),
            None => (String::new(), ""),
        };
        format!(
            "{before}    for (var q = 0u; q < 8u; q = q + 1u) {{
        let e = lane + q * 32u;
        let row = row0 + wm * 64u + {ri} + e / 16u;
        let col = col0 + wn * 64u + {ci} + e % 16u;
        if row < M && col < N {{
            let o = {at};
            var v = {value};{bias}{relu}{epi}
            out[o] = {store};
        }}
    }}{after}",
            bias = match mm.bias {
                Bias::None => String::new(),
                Bias::Rows => format!(
                    "\n            v = v + {};",
                    load(sbias, dt, "bias[row]".into())
                ),
                Bias::Cols => format!(
                    "\n            v = v + {};",
                    load(sbias, dt, "bias[col]".into())
                ),
            },
            store = narrow(dt, "v"),
            at = if nchw.is_some() {
                "nchw_index(row, col)"
            } else {
                "obase + row * N + col"
            },
            epi = if epilogue.is_some() {
                "\n            v = epilogue(v, o);"
            } else {
                ""
            },
            relu = if mm.relu {
                "\n            v = max(v, 0.0);"
            } else {
                ""
            },
        )
    };
    if emulated {
        let body = block(None, "acc[ij * 8u + q]", "ij / 4u * 16u", "ij % 4u * 16u");
        let _ = writeln!(
            s,
            "    for (var ij = 0u; ij < 16u; ij = ij + 1u) {{\n{}\n    }}",
            body.replace("\n", "\n    ").replacen("    ", "        ", 1)
        );
    } else {
        for i in 0..4 {
            for j in 0..4 {
                let _ = writeln!(
                    s,
                    "{}",
                    block(
                        Some(&format!("coopStoreT(c{i}{j}, &Cs[cs], 16u);")),
                        "Cs[cs + e]",
                        &format!("{}u", i * 16),
                        &format!("{}u", j * 16),
                    )
                );
            }
        }
    }
    let _ = writeln!(s, "}}");
    s
}

/// Which part of one step's staging [`Staged::write`] emits.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Load and store through a local (no prefetching).
    Both,
    /// Declare the prefetch registers (before the loop over K).
    Declare,
    /// Load into the registers.
    Load,
    /// Store the registers into the tile.
    Store,
}

/// One operand's staging into its workgroup tile: `a` into `As[m * SA + k]`, `b` into
/// `Bs[k * SB + n]` (f16; SA, SB the configuration's row strides), for one step through K.
struct Staged {
    /// The binding (`a`, `b`) and its tile (`As`, `Bs`).
    name: char,
    /// The operand's other index: `m` for `a`, `n` for `b`.
    outer: char,
    /// Whether K is its contiguous axis (`a` as is, `b` transposed).
    k_contiguous: bool,
    /// Its storage type.
    dtype: DType,
    /// The scalar load of element (outer, k) where it is gathered (convolutions), else `None`.
    gather: Option<String>,
}

impl Staged {
    fn a(mm: &MatMul, operands: Operands, dtype: DType) -> Staged {
        Staged {
            name: 'a',
            outer: 'm',
            k_contiguous: !mm.trans_a,
            dtype,
            gather: matches!(operands, Operands::Dgrad(_)).then(|| "weight_at(m, k)".into()),
        }
    }

    fn b(mm: &MatMul, operands: Operands, dtype: DType) -> Staged {
        Staged {
            name: 'b',
            outer: 'n',
            k_contiguous: mm.trans_b,
            dtype,
            gather: match operands {
                Operands::Matrices => None,
                Operands::Im2col { .. } if mm.trans_b => {
                    Some("cols_at(cols_r(n), cols_p(k))".into())
                }
                Operands::Im2col { .. } => Some("cols_at(cols_r(k), pcol)".into()),
                Operands::Dgrad(_) => Some("dy_at(dy_k(k), pcol)".into()),
            },
        }
    }

    /// Where element (outer, k) of the tile lives in its workgroup array, `stride` its row
    /// stride, `off` the buffer's offset.
    fn tile_at(&self, outer: &str, k: &str, stride: u32, off: &str) -> String {
        if self.name == 'a' {
            format!("As[{off} + ({outer}) * {stride}u + {k}]")
        } else {
            format!("Bs[{off} + ({k}) * {stride}u + {outer}]")
        }
    }

    /// The staging code of `phase` for a tile `cfg.bk` deep with rows as `cfg` strides them:
    /// 128 (or, for b, `cfg.tile_n()`) x `bk` elements, as scalars, or as vec4s where `vec`
    /// (along the contiguous axis); consecutive threads on consecutive addresses of the
    /// operand. Loads read step `k` (its first index), stores go to the buffer at offset `off`.
    fn write(&self, s: &mut String, vec: bool, cfg: CoopConfig, phase: Phase, k: &str, off: &str) {
        let (bk, threads) = (cfg.bk, cfg.threads());
        // the tile's extent along the operand's other index, and its row stride
        let (tile, stride) = if self.name == 'a' {
            (TILE as u32, cfg.a_stride())
        } else {
            (cfg.tile_n(), cfg.b_stride())
        };
        let (name, o) = (self.name, self.outer);
        let (extent, origin) = if name == 'a' {
            ("M", "row0")
        } else {
            ("N", "col0")
        };
        let index = if self.k_contiguous {
            format!("{name}base + {o} * K + k")
        } else {
            format!("{name}base + k * {extent} + {o}")
        };
        let width = if vec { 4 } else { 1 };
        for l in 0..tile * bk / width / threads {
            // the prefetch register of this load
            let reg = format!("p{name}{l}");
            if phase == Phase::Declare {
                let ty = if vec { "vec4<f16>" } else { "f16" };
                let _ = writeln!(s, "    var {reg}: {ty};");
                continue;
            }
            let e = format!("(lid + {}u)", l * threads);
            // the tile index along the contiguous axis runs fastest
            let along = |n: u32| match width {
                1 => format!("{e} % {n}u"),
                _ => format!("{e} % {}u * {width}u", n / width),
            };
            let across = |n: u32| format!("{e} / {}u", n / width);
            let (outer_, k_) = if self.k_contiguous {
                (across(bk), along(bk))
            } else {
                (along(tile), across(tile))
            };
            // the value stored: the local `v` (converted to f16), or the register
            let value = if phase == Phase::Both {
                "v"
            } else {
                reg.as_str()
            };
            let stores: String = if vec {
                ["x", "y", "z", "w"]
                    .iter()
                    .enumerate()
                    .map(|(c, comp)| {
                        let at = if self.k_contiguous {
                            self.tile_at(&format!("{o}{o}"), &format!("kk + {c}u"), stride, off)
                        } else {
                            self.tile_at(&format!("{o}{o} + {c}u"), "kk", stride, off)
                        };
                        format!("\n            {at} = {value}.{comp};")
                    })
                    .collect()
            } else {
                let at = self.tile_at(&format!("{o}{o}"), "kk", stride, off);
                let v = if phase == Phase::Both {
                    "f16(v)".to_string()
                } else {
                    reg.clone()
                };
                format!("\n            {at} = {v};")
            };
            let (zero, load) = if vec {
                (
                    "vec4<f16>()".to_string(),
                    format!("vec4<f16>({name}[({index}) / 4u])"),
                )
            } else {
                let load = match &self.gather {
                    Some(g) => g.clone(),
                    None => widen(self.dtype, format!("{name}[{index}]")),
                };
                ("0.0".to_string(), load)
            };
            let body = match phase {
                Phase::Both => format!(
                    "
            let {o} = {origin} + {o}{o};
            let k = {k} + kk;
            var v = {zero};
            if {o} < {extent} && k < K {{ v = {load}; }}{stores}"
                ),
                Phase::Load => {
                    let (zero, load) = if vec {
                        (zero, load)
                    } else {
                        ("f16(0.0)".to_string(), format!("f16({load})"))
                    };
                    format!(
                        "
            let {o} = {origin} + {o}{o};
            let k = {k} + kk;
            {reg} = {zero};
            if {o} < {extent} && k < K {{ {reg} = {load}; }}"
                    )
                }
                Phase::Store => stores,
                Phase::Declare => unreachable!("declared above"),
            };
            let _ = writeln!(
                s,
                "        {{
            let {o}{o} = {outer_};
            let kk = {k_};{body}
        }}"
            );
        }
    }
}

/// The cooperative-matrix operation of [`Cores::Emulated`]: a 16 x 16 matrix of a subgroup is
/// 8 values per lane (element e = lane + 32 q at row e / 16, column e % 16; a thread's 16
/// accumulators are one array, read straight by the epilogue), an A or B fragment read where
/// the kernel loads it from (`As` / `Bs`, rows as `cfg` strides them);
/// products of f16 values are exact in f32, as on tensor cores.
fn emulation_fns(cfg: CoopConfig) -> String {
    let (sta, stb) = (cfg.a_stride(), cfg.b_stride());
    format!(
        "
// acc[c..c + 8] = coopMultiplyAdd(the A fragment at As[ia] (stride {sta}), the B fragment at
// Bs[ib] (stride {stb}), acc[c..c + 8])
fn emu_multiply_add(acc: ptr<function, array<f32, 128>>, c: u32, ia: u32, ib: u32, lane: u32) {{
    for (var q = 0u; q < 8u; q = q + 1u) {{
        let e = lane + q * 32u;
        let r = e / 16u;
        let n = e % 16u;
        var v = (*acc)[c + q];
        for (var k = 0u; k < 16u; k = k + 1u) {{
            v = v + f32(As[ia + r * {sta}u + k]) * f32(Bs[ib + k * {stb}u + n]);
        }}
        (*acc)[c + q] = v;
    }}
}}
"
    )
}
