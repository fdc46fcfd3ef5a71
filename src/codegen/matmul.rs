//! The register-tiled GEMM family: one WGSL module per configuration (workgroup tile `BM x BN`,
//! depth step `BK`, per-thread tile `TM x TN`, vec4 or scalar global loads per operand, split-K),
//! generated with every register index a constant. [`choose`] picks the configuration for a
//! product on an adapter; shapes and batch strides stay `override` constants.
//!
//! Each workgroup computes one `BM x BN` output tile (of one batch, and with split-K of one slice
//! of K): both operand tiles go through workgroup memory `BK` deep, k-major, as vec4 rows; each
//! thread keeps `TM x TN` results in `TM * TN / 4` vec4 registers. A thread's rows are `TM / 4`
//! groups of 4 spaced `4 * BM / TM` apart (likewise its columns), so neighbouring threads read
//! neighbouring vec4s of workgroup memory.

use std::fmt::Write;

use super::elementwise::Epilogue;
use super::{load, load4, narrow, Generated, Storage, Target};
use crate::ops::conv::ColGeometry;
use crate::ops::matmul::{Bias, MatMul, OperandRows, ProductDims};
use crate::ops::{groups, KernelSpec};
use crate::tensor::DType;

/// One configuration of the generated GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// Output rows per workgroup.
    pub bm: u32,
    /// Output columns per workgroup.
    pub bn: u32,
    /// Depth of one step through K.
    pub bk: u32,
    /// Output rows per thread (4 or 8).
    pub tm: u32,
    /// Output columns per thread (4 or 8).
    pub tn: u32,
    /// Slices K is cut into (1: no split); each slice writes partial sums that a second kernel adds.
    pub split: u32,
    /// Fetch the next step's tiles into registers while multiplying the current ones (one
    /// workgroup-memory buffer; the global loads' latency hides behind the arithmetic).
    pub prefetch: bool,
    /// With `prefetch`: two workgroup-memory buffers, the registers stored into the one not
    /// being multiplied, so that a step needs one barrier instead of two (twice the memory).
    pub double_buffer: bool,
}

/// The tilings [`choose`] considers, as `(BM, BN, TM, TN)`, largest first. The 512-thread ones
/// (128x256, 256x128) need an adapter that allows them (an H100 does, WebGPU's defaults do not);
/// 64x256 and 256x64 keep 8x8 results per thread where one extent is 64 (a convolution with 64
/// filters).
pub const TILINGS: &[(u32, u32, u32, u32)] = &[
    (128, 256, 8, 8),
    (256, 128, 8, 8),
    (128, 128, 8, 8),
    (64, 256, 8, 8),
    (256, 64, 8, 8),
    (64, 128, 4, 8),
    (128, 64, 8, 4),
    (64, 64, 4, 4),
    (32, 64, 4, 4),
    (64, 32, 4, 4),
    (32, 32, 4, 4),
    (16, 64, 4, 4),
    (64, 16, 4, 4),
    (32, 16, 4, 4),
    (16, 32, 4, 4),
    (16, 16, 4, 4),
];

/// The smallest configuration: 16 threads and 2 KiB of workgroup memory, within every WebGPU
/// adapter's limits (f16 products take it where the model finds nothing larger).
pub const SMALLEST: GemmConfig = GemmConfig {
    bm: 16,
    bn: 16,
    bk: 16,
    tm: 4,
    tn: 4,
    split: 1,
    prefetch: false,
    double_buffer: false,
};

/// A slice of K is at least this deep, so that split-K's partial sums stay cheap next to the product.
const MIN_SLICE: usize = 256;

impl GemmConfig {
    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Bytes of workgroup memory the two operand tiles take (twice that double-buffered).
    pub fn workgroup_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn) * if self.double_buffer { 2 } else { 1 }
    }

    /// Whether this configuration is well formed and fits `target`.
    pub fn fits(&self, target: &Target) -> bool {
        let t = self.threads();
        matches!(self.tm, 4 | 8)
            && matches!(self.tn, 4 | 8)
            && self.bk.is_multiple_of(4)
            && self.bk > 0
            && self.bm.is_multiple_of(self.tm)
            && self.bn.is_multiple_of(self.tn)
            && self.split >= 1
            && (self.prefetch || !self.double_buffer)
            && t <= target.max_invocations
            && t <= target.max_workgroup_x
            && self.workgroup_bytes() <= target.workgroup_storage
            // every thread loads the same number of vec4s of each tile
            && (self.bm * self.bk).is_multiple_of(4 * t)
            && (self.bn * self.bk).is_multiple_of(4 * t)
    }

    /// `BMxBNxBK/TMxTN[/splitS][/pf|/db]`, as in debug dumps and `KILN_GEMM` (`db`: register
    /// prefetch into a second workgroup-memory buffer).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}x{}x{}/{}x{}",
            self.bm, self.bn, self.bk, self.tm, self.tn
        );
        if self.split > 1 {
            let _ = write!(s, "/split{}", self.split);
        }
        if self.double_buffer {
            s.push_str("/db");
        } else if self.prefetch {
            s.push_str("/pf");
        }
        s
    }

    /// Parses [`GemmConfig::describe`]'s form (`/splitS` optional).
    pub fn parse(s: &str) -> Option<GemmConfig> {
        let mut parts = s.trim().split('/');
        let tile: Vec<u32> = parts
            .next()?
            .split('x')
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let thread: Vec<u32> = parts
            .next()?
            .split('x')
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let (mut split, mut prefetch, mut double_buffer) = (1, false, false);
        for p in parts {
            match p {
                "pf" => prefetch = true,
                "db" => (prefetch, double_buffer) = (true, true),
                _ => split = p.strip_prefix("split")?.parse().ok()?,
            }
        }
        match (tile.as_slice(), thread.as_slice()) {
            (&[bm, bn, bk], &[tm, tn]) => Some(GemmConfig {
                bm,
                bn,
                bk,
                tm,
                tn,
                split,
                prefetch,
                double_buffer,
            }),
            _ => None,
        }
    }

    /// K extent of one slice: a multiple of `bk`.
    pub fn chunk(&self, k: usize) -> usize {
        let per = k.div_ceil(self.split as usize).max(1);
        per.div_ceil(self.bk as usize) * self.bk as usize
    }

    /// The slices actually used for depth `k` (the last ones may be empty otherwise).
    pub fn slices(&self, k: usize) -> u32 {
        k.div_ceil(self.chunk(k)).max(1) as u32
    }
}

/// The configuration for an `M x N x K` product over `batch` matrices on `target`.
///
/// Model: the adapter runs `parallel_workgroups * 256` threads at once. A tiling that keeps
/// less than half of them busy cuts K into slices (split-K, each slice at least 256 deep) until
/// it fills the adapter; then it takes `waves = ceil(tiles * slices * threads / capacity)` rounds.
/// In each round a thread spends, per step of K, `TM*TN` multiply-adds, `(TM+TN)/4` vec4 reads
/// of workgroup memory (weighed 2) and its share `(BM+BN)/threads` of the tile's global loads
/// (weighed 8), over the depth of its slice. The cheapest tiling wins; ties go to less padding,
/// then to the larger tile. Workgroups narrower than a subgroup are not considered.
pub fn choose(m: usize, n: usize, k: usize, batch: usize, target: &Target) -> Option<GemmConfig> {
    ranked(m, n, k, batch, target).into_iter().next()
}

/// Every configuration [`choose`] considers for the product that fits `target`, best first by
/// its model (the candidates `GemmPolicy::Tune` times on the adapter).
pub fn ranked(m: usize, n: usize, k: usize, batch: usize, target: &Target) -> Vec<GemmConfig> {
    let capacity = target.parallel_workgroups.max(1) as u64 * 256;
    let mut all: Vec<(GemmConfig, f64, u64)> = Vec::new();
    for &(bm, bn, tm, tn) in TILINGS {
        let bk = if 4 * 16 * (bm + bn) <= target.workgroup_storage {
            16
        } else {
            8
        };
        let mut cfg = GemmConfig {
            bm,
            bn,
            bk,
            tm,
            tn,
            split: 1,
            prefetch: false,
            double_buffer: false,
        };
        if !cfg.fits(target) || cfg.threads() < target.subgroup_size {
            continue;
        }
        let threads = cfg.threads() as u64;
        let tiles = groups(m, bm as usize) * groups(n, bn as usize) * batch as u64;
        let busy = (tiles * threads).min(capacity);
        if 2 * busy < capacity && k >= 2 * MIN_SLICE {
            let want = capacity.div_ceil(busy) as usize;
            cfg.split = want.min(k / MIN_SLICE).max(1) as u32;
            cfg.split = cfg.slices(k);
        }
        let padded = tiles * (bm * bn) as u64;
        let waves = (tiles * cfg.split as u64 * threads).div_ceil(capacity);
        let per_step = (tm * tn) as f64
            + 2.0 * (tm + tn) as f64 / 4.0
            + 8.0 * (bm + bn) as f64 / threads as f64;
        let time = waves as f64 * per_step * cfg.chunk(k) as f64;
        all.push((cfg, time, padded));
    }
    // cheapest first; ties: less padding, then the larger tile
    all.sort_by(|(a, at, ap), (b, bt, bp)| {
        at.total_cmp(bt)
            .then(ap.cmp(bp))
            .then((b.bm * b.bn).cmp(&(a.bm * a.bn)))
    });
    all.into_iter().map(|(c, _, _)| c).collect()
}

/// The launch of `mm` with configuration `cfg`: its WGSL and constants. With `cfg.split > 1` the
/// kernel writes partial sums `[split, batch.., M, N]` and leaves bias and relu to the sum.
pub fn kernel(mm: &MatMul, d: &ProductDims, cfg: &GemmConfig) -> Generated {
    kernel_with(mm, d, cfg, None, None, None, DType::F32)
}

/// [`kernel`], with `b` read as `im2col(x)` of this geometry straight from the image `x`
/// (implicit GEMM: the column matrix is never stored). `d` describes the product with the
/// column matrix `[C*kh*kw, N*Ho*Wo]` as `b`. With `nchw = Some(HW)` the result `[M, N*HW]`
/// is stored as `[N, M, HW]` (a convolution's output in NCHW, without a permute after it; or
/// a product whose epilogue reads it so transposed, `MatMulEpilogue::transposed_store`), the
/// epilogue seeing each result at the index it is stored at.
/// `storage` gives the storage types of the operands, bias and result (f16: loads widen to f32,
/// the products accumulate in f32, stores round; no split-K); a `DType` converts for all alike.
pub fn kernel_with(
    mm: &MatMul,
    d: &ProductDims,
    cfg: &GemmConfig,
    im2col: Option<ColGeometry>,
    nchw: Option<usize>,
    epilogue: Option<&Epilogue>,
    storage: impl Into<Storage>,
) -> Generated {
    let storage = storage.into();
    let batch = d.batch.numel();
    let split = cfg.slices(d.k);
    let tiles_m = groups(d.m, cfg.bm as usize);
    let tiles_n = groups(d.n, cfg.bn as usize);
    let total = tiles_m * tiles_n * batch as u64 * split as u64;
    let mut layout = Layout::of(mm, d, split > 1);
    layout.storage = storage;
    assert!(
        storage == Storage::all(DType::F32) || split == 1,
        "f16 products are not split along K"
    );
    if let Some(g) = im2col {
        layout.im2col = Some(g);
        layout.vec_b = false;
    }
    if nchw.is_some() {
        layout.nchw = nchw;
        layout.vec_out = false;
    }
    assert!(
        !layout.row_sums || (batch == 1 && nchw.is_none()),
        "row sums of unbatched products stored as [M, N] only"
    );
    let mut constants = vec![
        ("M", d.m as f64),
        ("N", d.n as f64),
        ("K", d.k as f64),
        ("TILES_M", tiles_m as f64),
        ("TILES_N", tiles_n as f64),
        ("TOTAL", total as f64),
        ("SPLIT", split as f64),
        ("KCHUNK", cfg.chunk(d.k) as f64),
        ("BATCH", batch as f64),
    ];
    constants.extend(d.batch_constants());
    for (drop, name) in [(mm.drop_a, "A"), (mm.drop_b, "B")] {
        constants.extend(drop.iter().flat_map(|d| d.constants(name)));
    }
    if layout.row_sums {
        // each slice's region: its product, then (aligned) its row sums
        constants.push((
            "RS_OFF",
            crate::ops::matmul::row_sums_offset(d.m, d.n) as f64,
        ));
        constants.push((
            "OSTRIDE",
            crate::ops::matmul::with_row_sums_len(d.m, d.n) as f64,
        ));
    }
    let src = wgsl_with(cfg, &layout, epilogue);
    let key = match epilogue {
        // the program's dataflow, scalars and shapes are in the text
        Some(e) => format!(
            "{}{},epilogue[{}@{:016x}]",
            cfg.describe(),
            layout.describe(),
            e.describe,
            super::elementwise::fnv1a(src.as_bytes())
        ),
        None => format!("{}{}", cfg.describe(), layout.describe()),
    };
    Generated {
        spec: KernelSpec {
            family: "matmul_gen",
            entry: "main",
            constants,
            workgroups: total,
        },
        wgsl: src.into(),
        key,
    }
}

/// What besides the tiling shapes the code: transposes, vec4 access, the epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub trans_a: bool,
    pub trans_b: bool,
    /// `a`'s contiguous axis is a multiple of 4: bind it as vec4.
    pub vec_a: bool,
    pub vec_b: bool,
    /// N is a multiple of 4: store vec4s.
    pub vec_out: bool,
    pub bias: Bias,
    pub relu: bool,
    /// Write split-K partial sums (no epilogue).
    pub partial: bool,
    /// `b` is an NCHW image read as its column matrix `im2col(b)` (implicit-GEMM convolution).
    pub im2col: Option<ColGeometry>,
    /// The input gradient of a convolution of this geometry as one implicit GEMM (see
    /// [`dgrad_kernel`]): `a` is the weight `[O, C*kh*kw]`, `b` the output gradient
    /// `[O, N*Ho*Wo]`, and the result is stored as the image `[N, C, H, W]`.
    pub dgrad: Option<ColGeometry>,
    /// Store the result `[M, N*HW]` as the image `[N, M, HW]` (this HW): a convolution's output
    /// or input gradient straight in NCHW. Scalar stores.
    pub nchw: Option<usize>,
    /// Also write the row sums of `op(a)` over K past the result (`MatMul::row_sums`): the
    /// workgroups of the first tile column add up their `a` tiles as they go. Unbatched.
    pub row_sums: bool,
    /// Storage types of `a`, `b`, the bias and the result (arithmetic is f32 either way).
    pub storage: Storage,
    /// Operand `a` (`b`) is read through inverted dropout (`MatMul::drop_a`, `drop_b`): each
    /// loaded element is kept (and scaled) or zeroed by the hash of its index in the operand,
    /// as `shaders/dropout.wgsl` would have stored it.
    pub drop_a: bool,
    pub drop_b: bool,
    /// Operand `a` (`b`) is read from rows of a larger tensor (`MatMul::rows_a`, `rows_b`):
    /// the element at row `r` (along the operand's other axis) and position `c` of its
    /// contiguous axis is at `offset + r * ld + c`. Unbatched products only.
    pub rows_a: Option<OperandRows>,
    pub rows_b: Option<OperandRows>,
}

impl Layout {
    pub fn of(mm: &MatMul, d: &ProductDims, partial: bool) -> Layout {
        let a_contig = if mm.trans_a { d.m } else { d.k };
        let b_contig = if mm.trans_b { d.k } else { d.n };
        // vec4 loads of strided rows need every row to start on a multiple of 4 too
        let aligned = |rows: Option<OperandRows>| {
            rows.is_none_or(|r| r.ld.is_multiple_of(4) && r.offset.is_multiple_of(4))
        };
        Layout {
            trans_a: mm.trans_a,
            trans_b: mm.trans_b,
            vec_a: a_contig % 4 == 0 && aligned(mm.rows_a),
            vec_b: b_contig % 4 == 0 && aligned(mm.rows_b),
            vec_out: d.n.is_multiple_of(4),
            bias: if partial { Bias::None } else { mm.bias },
            relu: mm.relu && !partial,
            partial,
            im2col: None,
            dgrad: None,
            nchw: None,
            row_sums: mm.row_sums,
            storage: Storage::all(DType::F32),
            drop_a: mm.drop_a.is_some(),
            drop_b: mm.drop_b.is_some(),
            rows_a: mm.rows_a,
            rows_b: mm.rows_b,
        }
    }

    /// Bindings of the operands' dropout seeds (one per dropped operand, after the bias).
    fn seeds(&self) -> usize {
        self.drop_a as usize + self.drop_b as usize
    }

    fn describe(&self) -> String {
        let f = |on: bool, s: &str| if on { s.to_string() } else { String::new() };
        // a convolution's geometry, as far as it shapes the code
        let geom = |kind: &str, g: Option<ColGeometry>| match g {
            Some(g) => format!(
                ",{kind}[c{} {}x{} k{}x{} s{:?} p{:?} d{:?}]",
                g.channels,
                g.image.0,
                g.image.1,
                g.kernel.0,
                g.kernel.1,
                g.opts.stride,
                g.opts.padding,
                g.opts.dilation
            ),
            None => String::new(),
        };
        let (im2col, dgrad) = (geom("im2col", self.im2col), geom("dgrad", self.dgrad));
        let nchw = self.nchw.map(|hw| format!(",nchw{hw}")).unwrap_or_default();
        let half = self.storage.describe();
        let rows = |r: Option<OperandRows>, o: &str| match r {
            Some(OperandRows {
                ld,
                offset,
                swap: Some((p, q)),
            }) => format!(",rows_{o}[{ld}+{offset},swap{p}x{q}]"),
            Some(r) => format!(",rows_{o}[{}+{}]", r.ld, r.offset),
            None => String::new(),
        };
        let (rows_a, rows_b) = (rows(self.rows_a, "a"), rows(self.rows_b, "b"));
        format!(
            "{}{}{}{}{}{}{}{}{}{}{}{rows_a}{rows_b}{im2col}{dgrad}{nchw}{half}",
            f(self.trans_a, ",ta"),
            f(self.trans_b, ",tb"),
            f(self.vec_a, ",va"),
            f(self.vec_b, ",vb"),
            f(self.vec_out, ",vo"),
            match self.bias {
                Bias::None => "",
                Bias::Rows => ",bias_rows",
                Bias::Cols => ",bias_cols",
            },
            f(self.relu, ",relu"),
            f(self.partial, ",partial"),
            f(self.row_sums, ",row_sums"),
            f(self.drop_a, ",drop_a"),
            f(self.drop_b, ",drop_b"),
        )
    }
}

/// Which operand tile a load fills and how its memory is laid out.
struct TileLoad {
    /// `a` or `b`.
    operand: &'static str,
    /// `As` or `Bs`.
    shared: &'static str,
    /// The tile's non-K extent as a WGSL name (`M` or `N`) and its size (`BM` or `BN`).
    ext_name: &'static str,
    ext: u32,
    /// The tile's first row (`row0`) or column (`col0`).
    origin: &'static str,
    /// K is the operand's contiguous axis.
    k_contiguous: bool,
    /// Load vec4s along the contiguous axis.
    vec: bool,
    /// Read through WGSL functions instead of the operand's memory:
    /// `Some(Gather { ... })` (see [`Gather`]).
    gather: Option<Gather>,
    /// The operand's storage type and the result's (see `codegen::load`).
    stored: DType,
    result: DType,
    /// Rows of a larger tensor (`Layout::rows_a`): the row length and first element replace
    /// the operand's own.
    rows: Option<OperandRows>,
    /// Read through the operand's dropout (`keep_{operand}`, `keep4_{operand}` with the key
    /// `key_{operand}`).
    drop: bool,
}

/// An operand read by index functions: `at(part_k, part_g)` (or `at(part_g, part_k)` when
/// `!k_first`) with each index's part from its own function; the tile row or column `g` of a
/// thread's load is fixed for the whole loop over K, so its part is computed once, before it.
#[derive(Clone, Copy)]
struct Gather {
    /// Part of the K index.
    k_part: &'static str,
    /// Part of the row / column index.
    g_part: &'static str,
    at: &'static str,
    k_first: bool,
}

/// Which part of a tile load to emit: both (through a local), or, with prefetching, the global
/// loads into the registers `r{operand}{l}` for the step at `kn`, or their stores into
/// workgroup memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Both,
    Fetch,
    Stash,
}

/// One operand tile's loads into workgroup memory, unrolled: the same count per thread.
/// `off` is a WGSL offset (a `let` in scope, with ` + `) into the workgroup tile where the
/// stores of [`Phase::Stash`] go (double buffering), or empty.
fn emit_tile_load(s: &mut String, tile: &TileLoad, cfg: &GemmConfig, phase: Phase, off: &str) {
    let TileLoad {
        operand,
        shared,
        ext_name,
        ext,
        origin,
        k_contiguous,
        vec,
        gather,
        stored,
        result,
        drop,
        rows,
    } = *tile;
    let t = cfg.threads();
    let bk = cfg.bk;
    let ext4 = ext / 4;
    let per = if vec { 4 } else { 1 };
    let n_loads = ext * bk / (per * t);
    let base = format!("{operand}base");
    for l in 0..n_loads {
        let e = format!("(lid + {}u)", l * t);
        let _ = writeln!(s, "        {{");
        match (k_contiguous, vec) {
            (true, true) => {
                let _ = writeln!(
                    s,
                    "            let x = {e} / {q}u;\n            let kk = ({e} % {q}u) * 4u;",
                    q = bk / 4
                );
            }
            (true, false) => {
                let _ = writeln!(
                    s,
                    "            let x = {e} / {bk}u;\n            let kk = {e} % {bk}u;"
                );
            }
            (false, true) => {
                let _ = writeln!(
                    s,
                    "            let kk = {e} / {ext4}u;\n            let x = ({e} % {ext4}u) * 4u;"
                );
            }
            (false, false) => {
                let _ = writeln!(
                    s,
                    "            let kk = {e} / {ext}u;\n            let x = {e} % {ext}u;"
                );
            }
        }
        let k_origin = if phase == Phase::Fetch { "kn" } else { "k0" };
        let _ = writeln!(
            s,
            "            let g = {origin} + x;\n            let k = {k_origin} + kk;"
        );
        let (v, decl) = match phase {
            Phase::Both => ("v".to_string(), "var v"),
            _ => (format!("r{operand}{l}"), ""),
        };
        // the binding's row of the operand's storage row `x` (swapped leading axes: see
        // `OperandRows::swap`)
        let row = |x: &str| match rows.and_then(|r| r.swap) {
            Some((p, q)) => format!("(({x} % {p}u) * {q}u + {x} / {p}u)"),
            None => x.to_string(),
        };
        let index = match (rows, k_contiguous) {
            (Some(r), true) => format!("{base} + {}u + {} * {}u + k", r.offset, row("g"), r.ld),
            (Some(r), false) => format!("{base} + {}u + {} * {}u + g", r.offset, row("k"), r.ld),
            (None, true) => format!("{base} + g * K + k"),
            (None, false) => format!("{base} + k * {ext_name} + g"),
        };
        let read = match gather {
            Some(Gather {
                k_part,
                at,
                k_first,
                ..
            }) => {
                let (kp, gp) = (format!("{k_part}(k)"), format!("g{operand}{l}"));
                if k_first {
                    format!("{at}({kp}, {gp})")
                } else {
                    format!("{at}({gp}, {kp})")
                }
            }
            None => load(stored, result, format!("{operand}[{index}]")),
        };
        let assign = if decl.is_empty() {
            v.clone()
        } else {
            decl.to_string()
        };
        if phase != Phase::Stash {
            let (zero, mut load) = if vec {
                (
                    "vec4<f32>(0.0)",
                    load4(stored, result, format!("{operand}[({index}) / 4u]")),
                )
            } else {
                ("0.0", read.clone())
            };
            if drop {
                // the four elements of a vec4 are consecutive in the operand's storage; an f16
                // operand's masked values are rounded to f16 as the dropout kernel stores them
                let keep = if vec { "keep4" } else { "keep" };
                load = format!("{load} * {keep}_{operand}({index}, key_{operand})");
                if stored == DType::F16 {
                    load = load4_or_1(vec, DType::F32, DType::F16, load);
                }
            }
            let _ = writeln!(
                s,
                "            {assign} = {zero};\n            if g < {ext_name} && k < kend {{ {v} = {load}; }}"
            );
        }
        if phase != Phase::Fetch {
            if vec && k_contiguous {
                // four k values of one row: a column of the k-major tile
                for q in 0..4 {
                    let c = ["x", "y", "z", "w"][q];
                    let _ = writeln!(
                        s,
                        "            {shared}[{off}(kk + {q}u) * {ext4}u + x / 4u][x % 4u] = {v}.{c};"
                    );
                }
            } else if vec {
                let _ = writeln!(s, "            {shared}[{off}kk * {ext4}u + x / 4u] = {v};");
            } else {
                let _ = writeln!(
                    s,
                    "            {shared}[{off}kk * {ext4}u + x / 4u][x % 4u] = {v};"
                );
            }
        }
        let _ = writeln!(s, "        }}");
    }
}

/// [`load4`] for a vec4, else [`load`].
fn load4_or_1(vec: bool, stored: DType, result: DType, x: String) -> String {
    if vec {
        load4(stored, result, x)
    } else {
        load(stored, result, x)
    }
}

/// For gathered operands: each load's fixed row or column part, `g{operand}{l}`, before the loop.
fn emit_gather_parts(s: &mut String, tile: &TileLoad, cfg: &GemmConfig) {
    let Some(gather) = tile.gather else {
        return;
    };
    let t = cfg.threads();
    let n_loads = tile.ext * cfg.bk / t;
    for l in 0..n_loads {
        let e = format!("(lid + {}u)", l * t);
        let x = if tile.k_contiguous {
            format!("{e} / {}u", cfg.bk)
        } else {
            format!("{e} % {}u", tile.ext)
        };
        let _ = writeln!(
            s,
            "    let g{}{l} = {}({} + {x});",
            tile.operand, gather.g_part, tile.origin
        );
    }
}

/// `cols(r, p)`: element `[r, p]` of `im2col(b)` for this geometry, zero in the padding (the
/// indexing of conv.wgsl's `im2col`, with the geometry as literals).
/// `b` (the image) is stored as `stored`, the result as `result` (see `codegen::load`).
pub(crate) fn cols_fn(g: ColGeometry, stored: DType, result: DType) -> String {
    let (ho, wo) = g.out_hw();
    let o = g.opts;
    format!(
        "
// element [r, p] of im2col(b): r = (c * KH + i) * KW + j, p = (n * HO + oh) * WO + ow, split in
// the part of r and the part of p, so that a thread decomposes its fixed row or column once
// (before the loop over K) and only the other index per load
fn cols_r(r: u32) -> vec3<i32> {{
    let j = r % {kw}u;
    let i = (r / {kw}u) % {kh}u;
    let c = r / {khkw}u;
    return vec3<i32>(i32(c * {hw}u), i32(i * {dh}u), i32(j * {dw}u));
}}

fn cols_p(p: u32) -> vec3<i32> {{
    let ow = p % {wo}u;
    let oh = (p / {wo}u) % {ho}u;
    let n = p / {howo}u;
    return vec3<i32>(i32(n * {chw}u), i32(oh * {sh}u) - {ph}, i32(ow * {sw}u) - {pw});
}}

fn cols_at(pr: vec3<i32>, pp: vec3<i32>) -> f32 {{
    let ih = pp.y + pr.y;
    let iw = pp.z + pr.z;
    if ih < 0 || iw < 0 || ih >= {h} || iw >= {w} {{
        return 0.0;
    }}
    return {load};
}}
",
        load = load(
            stored,
            result,
            "b[u32(pp.x + pr.x + ih * {w} + iw)]".replace("{w}", &g.image.1.to_string())
        ),
        kh = g.kernel.0,
        kw = g.kernel.1,
        khkw = g.kernel.0 * g.kernel.1,
        ho = ho,
        wo = wo,
        howo = ho * wo,
        sh = o.stride.0,
        sw = o.stride.1,
        dh = o.dilation.0,
        dw = o.dilation.1,
        ph = o.padding.0,
        pw = o.padding.1,
        h = g.image.0,
        w = g.image.1,
        hw = g.image.0 * g.image.1,
        chw = g.channels * g.image.0 * g.image.1,
    )
}

/// The gathers and the store index of the implicit input gradient (see [`Layout::dgrad`]).
/// `a` (the weight) is stored as `sa`, `b` (the output gradient) as `sb`, the result as `result`.
pub(crate) fn dgrad_fns(g: ColGeometry, sa: DType, sb: DType, result: DType) -> String {
    let (ho, wo) = g.out_hw();
    let o = g.opts;
    let (kh, kw) = g.kernel;
    format!(
        "
// a[c, (o, i, j)] = w[o, c, i, j], w stored [O, C*kh*kw]
fn weight_at(c: u32, k: u32) -> f32 {{
    return {weight};
}}

// b[(o, i, j), (n, h, w)] = dy[o, n, oh, ow] where the window (oh, ow) puts tap (i, j) on
// (h, w); zero where no window does (stride gaps, borders)
// (split as `cols` is: the part of k, the part of q, the element from both)
fn dy_k(k: u32) -> vec3<i32> {{
    let o = k / {khkw}u;
    let i = (k / {kw}u) % {kh}u;
    let j = k % {kw}u;
    return vec3<i32>(i32(o * ((N / {hw}u) * {howo}u)), i32(i * {dh}u), i32(j * {dw}u));
}}

fn dy_q(q: u32) -> vec3<i32> {{
    let w = q % {w}u;
    let h = (q / {w}u) % {h}u;
    let n = q / {hw}u;
    return vec3<i32>(i32(n * {howo}u), i32(h) + {ph}, i32(w) + {pw});
}}

fn dy_at(pk: vec3<i32>, pq: vec3<i32>) -> f32 {{
    let th = pq.y - pk.y;
    let tw = pq.z - pk.z;
    if th < 0 || tw < 0 {{
        return 0.0;
    }}
    let oh = u32(th) / {sh}u;
    let ow = u32(tw) / {sw}u;
    if u32(th) % {sh}u != 0u || u32(tw) % {sw}u != 0u || oh >= {ho}u || ow >= {wo}u {{
        return 0.0;
    }}
    return {dy};
}}
",
        weight = load(
            sa,
            result,
            format!(
                "a[(k / {khkw}u) * {rows}u + c * {khkw}u + k % {khkw}u]",
                khkw = kh * kw,
                rows = g.rows()
            )
        ),
        dy = load(
            sb,
            result,
            format!("b[u32(pk.x + pq.x) + oh * {}u + ow]", wo)
        ),
        khkw = kh * kw,
        h = g.image.0,
        w = g.image.1,
        hw = g.image.0 * g.image.1,
        howo = ho * wo,
        ph = o.padding.0,
        pw = o.padding.1,
        sh = o.stride.0,
        sw = o.stride.1,
        dh = o.dilation.0,
        dw = o.dilation.1,
    )
}

/// The input gradient `dx [batch, C, H, W]` of a convolution of geometry `geom` from the weight
/// `w [O, C*kh*kw]` and the output gradient `dy [O, batch*Ho*Wo]`, as one implicit GEMM with
/// configuration `cfg` (no split-K): what `col2im(w^T x dy)` computes, without the column matrix.
/// `storage`: the storage types of the weight (`a`), `dy` (`b`) and `dx`.
pub fn dgrad_kernel(
    geom: ColGeometry,
    d: &ProductDims,
    cfg: &GemmConfig,
    storage: impl Into<Storage>,
) -> Generated {
    dgrad_kernel_with(&MatMul::default(), geom, d, cfg, storage)
}

/// [`dgrad_kernel`] with `mm`'s per-row (channel) bias, bound third, and relu in the store: a
/// transposed convolution's forward with its bias.
pub fn dgrad_kernel_with(
    mm: &MatMul,
    geom: ColGeometry,
    d: &ProductDims,
    cfg: &GemmConfig,
    storage: impl Into<Storage>,
) -> Generated {
    let storage = storage.into();
    let mut cfg = *cfg;
    cfg.split = 1;
    let mm = MatMul {
        bias: mm.bias,
        relu: mm.relu,
        ..MatMul::default()
    };
    let mut g = kernel_with(&mm, d, &cfg, None, None, None, storage);
    let mut lay = Layout::of(&mm, d, false);
    lay.storage = storage;
    lay.vec_a = false;
    lay.vec_b = false;
    lay.vec_out = false;
    lay.dgrad = Some(geom);
    lay.nchw = Some(geom.image.0 * geom.image.1);
    g.key = format!("{}{}", cfg.describe(), lay.describe());
    g.wgsl = wgsl(&cfg, &lay).into();
    g
}

/// A product's transposes, bias and relu as kernel keys name them: `,ta,tb,bias_rows,relu`.
pub(crate) fn product_flags(mm: &MatMul) -> String {
    let bias = match mm.bias {
        Bias::None => "",
        Bias::Rows => ",bias_rows",
        Bias::Cols => ",bias_cols",
    };
    format!(
        "{}{}{bias}{}",
        if mm.trans_a { ",ta" } else { "" },
        if mm.trans_b { ",tb" } else { "" },
        if mm.relu { ",relu" } else { "" }
    )
}

/// The bindings of a product kernel, in kiln's order: `a` (0), `b` (1), the bias (2, where
/// there is one), an epilogue's inputs, then the output at `out_binding`; each an array of its
/// storage type (`vec4` where `vec` says so: a, b, out).
pub(crate) fn product_bindings(
    st: Storage,
    vec: [bool; 3],
    bias: bool,
    epilogue: Option<&Epilogue>,
    out_binding: usize,
) -> String {
    let ty = |d: DType, v: bool| {
        if v {
            format!("vec4<{d}>")
        } else {
            d.to_string()
        }
    };
    let mut s = format!(
        "@group(0) @binding(0) var<storage, read> a: array<{}>;
@group(0) @binding(1) var<storage, read> b: array<{}>;
",
        ty(st.a, vec[0]),
        ty(st.b, vec[1])
    );
    if bias {
        let _ = writeln!(
            s,
            "@group(0) @binding(2) var<storage, read> bias: array<{}>;",
            st.bias
        );
    }
    if let Some(e) = epilogue {
        s.push_str(&e.bindings);
    }
    let _ = writeln!(
        s,
        "@group(0) @binding({out_binding}) var<storage, read_write> out: array<{}>;",
        ty(st.out, vec[2])
    );
    s
}

/// The WGSL of one configuration.
pub fn wgsl(cfg: &GemmConfig, lay: &Layout) -> String {
    wgsl_with(cfg, lay, None)
}

/// [`wgsl`] with a fused elementwise epilogue after the bias and relu (see
/// `codegen::elementwise::epilogue`); its inputs bind after the bias, the output after them.
pub fn wgsl_with(cfg: &GemmConfig, lay: &Layout, epilogue: Option<&Epilogue>) -> String {
    let (bm, bn, bk, tm, tn) = (cfg.bm, cfg.bn, cfg.bk, cfg.tm, cfg.tn);
    let t = cfg.threads();
    let tx_count = bn / tn;
    let (rq, cq) = (tm / 4, tn / 4);
    let (row_gap, col_gap) = (bm / rq, bn / cq);
    let st = lay.storage;
    let dt = st.out;
    // workgroup-memory buffers per operand tile
    let stages = if cfg.double_buffer { 2 } else { 1 };
    let ty_ = |v: bool| {
        if v {
            format!("vec4<{dt}>")
        } else {
            dt.to_string()
        }
    };
    let first_seed = if lay.bias == Bias::None { 2 } else { 3 };
    let first_extra = first_seed + lay.seeds();
    let out_binding = first_extra + epilogue.map_or(0, |e| e.extra);
    let mut s = String::new();
    let bias_desc = match lay.bias {
        Bias::None => "none",
        Bias::Rows => "per row [M]",
        Bias::Cols => "per column [N]",
    };
    let _ = writeln!(
        s,
        "// matmul_gen.wgsl: generated by src/codegen/matmul.rs, configuration {} {:?}.
//
// out[z] = relu?(op(a[z]) x op(b[z]) + bias?) with op = identity or transpose; with split-K
// (SPLIT > 1) each workgroup sums one slice of K into partial sums that matmul.wgsl's
// `splitk_sum` adds up with the epilogue.
//
// Bindings (group 0):
//   0  a     storage, read        [batch.., M, K] (transposed: [batch.., K, M]) as {}
//   1  b     storage, read        [batch.., K, N] (transposed: [batch.., N, K]) as {}{}
//   {}  out   storage, read_write  {} as {}
// Overrides: M, N, K; TILES_M/N = ceil(M / {bm}), ceil(N / {bn}); SPLIT slices of KCHUNK;
//            BATCH matrices, batch shape BD0..BD3 and operand strides SA*/SB* as in matmul.wgsl;
//            TOTAL = TILES_M * TILES_N * SPLIT * BATCH. Bias: {bias_desc}; relu: {}.
// Dispatch: TOTAL workgroups of {t} threads, folded by the host into (x <= 65535, y); workgroup w
//           computes tile (w / TILES_N % TILES_M, w % TILES_N) of slice w / (TILES_M * TILES_N)
//           % SPLIT of batch w / (TILES_M * TILES_N * SPLIT); thread (lid % {tx_count},
//           lid / {tx_count}) holds {tm}x{tn} results in vec4 registers.
",
        cfg.describe(),
        lay,
        ty_(lay.vec_a),
        ty_(lay.vec_b),
        if lay.bias == Bias::None {
            ""
        } else {
            "\n//   2  bias  storage, read        [M] or [N]"
        },
        out_binding,
        if lay.partial {
            "[SPLIT, batch.., M, N] partial sums"
        } else {
            "[batch.., M, N]"
        },
        ty_(lay.vec_out),
        lay.relu,
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
    if lay.seeds() > 0 {
        let dropped: Vec<&str> = [(lay.drop_a, "a"), (lay.drop_b, "b")]
            .iter()
            .filter(|p| p.0)
            .map(|p| p.1)
            .collect();
        let _ = writeln!(
            s,
            "// Dropout: {} read through inverted dropout as loaded (the masked tensor is never
//   stored): element i kept, times DROP_*_SCALE, where dropout_hash(i ^ key) >= DROP_*_THRESHOLD,
//   key from the seed (binding {first_seed}.., [1], f32, one per dropped operand in order) and
//   DROP_*_SALT, as shaders/dropout.wgsl; i is the element's index in the operand's storage.
",
            dropped.join(" and ")
        );
    }
    for (rows, name) in [(lay.rows_a, "a"), (lay.rows_b, "b")] {
        if let Some(OperandRows {
            swap: Some((p, q)), ..
        }) = rows
        {
            let _ = writeln!(
                s,
                "// Swapped rows: {name}'s rows are those of a ({p}, {q}, ..) tensor with its two leading
//   axes swapped, read in place (never permuted): {name}'s row r is the binding's row
//   (r % {p}) * {q} + r / {p}.
"
            );
        }
        if let Some(r) = rows {
            let _ = writeln!(
                s,
                "// Strided rows: {name} is part of each row of a larger tensor (a narrow of its last axis,
//   never copied): the binding holds rows of {} elements and {name}'s rows start at element {}
//   of each.
",
                r.ld, r.offset
            );
        }
    }
    if lay.row_sums {
        let _ = writeln!(
            s,
            "// Row sums: the workgroups of tile column 0 also add up op(a)'s rows over their slice of
//   K from the a tiles in workgroup memory (thread i < {bm4} holds rows 4i..4i+3 of the tile
//   as a vec4) and store them at RS_OFF + row of their slice's region; each slice's region
//   (product, then row sums) is OSTRIDE elements long.
",
            bm4 = bm / 4
        );
    }
    if let Some(g) = lay.dgrad {
        let _ = writeln!(
            s,
            "// Implicit GEMM, input gradient of a convolution: dx[n, c, h, w] = sum over (o, i, j) of
//   w[o, c, i, j] * dy[o, n, oh, ow] where oh * SH = h + PH - i * DH (likewise ow), so M = C = {},
//   N = batch * H * W ({} x {}), K = O * kh * kw; a = w [O, C*kh*kw] (read by `weight_at`),
//   b = dy [O, batch*Ho*Wo] (read by `dy_at`), out = dx [batch, C, H, W] (`nchw_index`).
//   Kernel {:?}, stride {:?}, padding {:?}, dilation {:?}.
",
            g.channels, g.image.0, g.image.1, g.kernel, g.opts.stride, g.opts.padding, g.opts.dilation
        );
    }
    if let Some(g) = lay.im2col {
        let _ = writeln!(
            s,
            "// Implicit GEMM: b is an image [N, {}, {}, {}] read as its column matrix im2col(b)
//   [C*kh*kw, N*Ho*Wo] (kernel {:?}, stride {:?}, padding {:?}, dilation {:?}) by `cols`.
",
            g.channels,
            g.image.0,
            g.image.1,
            g.kernel,
            g.opts.stride,
            g.opts.padding,
            g.opts.dilation
        );
    }
    if [st.a, st.b, st.bias, st.out].contains(&DType::F16) {
        s.push_str("enable f16;\n\n");
    }
    let mut names = vec![
        "M", "N", "K", "TILES_M", "TILES_N", "TOTAL", "SPLIT", "KCHUNK", "BATCH", "BD1", "BD2",
        "BD3", "SA0", "SA1", "SA2", "SA3", "SB0", "SB1", "SB2", "SB3",
    ];
    if lay.row_sums {
        names.extend(["RS_OFF", "OSTRIDE"]);
    }
    s.push_str(&super::overrides(&names));
    let mut drop_fns = String::new();
    let mut drop_keys = String::new();
    let dropped = [(lay.drop_a, "a", "A"), (lay.drop_b, "b", "B")];
    for (slot, &(_, x, up)) in (first_seed..).zip(dropped.iter().filter(|p| p.0)) {
        let _ = write!(
            drop_fns,
            "
@group(0) @binding({slot}) var<storage, read> seed_{x}: array<f32>;
override DROP_{up}_THRESHOLD: u32 = 0u;
override DROP_{up}_SCALE: f32 = 1.0;
override DROP_{up}_SALT: u32 = 0u;
// element i of {x} kept (its scale) or dropped (0) under key
fn keep_{x}(i: u32, key: u32) -> f32 {{
    return select(0.0, DROP_{up}_SCALE, dropout_hash(i ^ key) >= DROP_{up}_THRESHOLD);
}}
fn keep4_{x}(i: u32, key: u32) -> vec4<f32> {{
    return vec4<f32>(keep_{x}(i, key), keep_{x}(i + 1u, key), keep_{x}(i + 2u, key), keep_{x}(i + 3u, key));
}}
"
        );
        let _ = writeln!(
            drop_keys,
            "    let key_{x} = dropout_hash(u32(seed_{x}[0]) ^ dropout_hash(DROP_{up}_SALT));"
        );
    }
    // the hash, unless an epilogue that drops elements brought it already
    let hashed = epilogue.is_some_and(|e| e.functions.contains("fn dropout_hash"));
    if lay.seeds() > 0 && !hashed {
        drop_fns.push_str(super::elementwise::shared("dropout", "dropout_op"));
    }
    // where this slice's (and batch's) results start
    let obase = if lay.row_sums {
        "slice * OSTRIDE"
    } else {
        "(slice * BATCH + z) * M * N"
    };
    let batch_bases = super::BATCH_BASES;
    s.push('\n');
    s.push_str(&product_bindings(
        st,
        [lay.vec_a, lay.vec_b, lay.vec_out],
        lay.bias != Bias::None,
        epilogue,
        out_binding,
    ));
    let _ = writeln!(
        s,
        "
{cols_fn}
// k-major tiles: As[kk * {bm4} + i / 4][i % 4] = op(a)[row0 + i, k0 + kk], Bs likewise for op(b)
var<workgroup> As: array<vec4<f32>, {}>;
var<workgroup> Bs: array<vec4<f32>, {}>;
{epilogue_fns}{drop_fns}
@compute @workgroup_size({t})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {{
    let w = wid.y * nwg.x + wid.x;
    if w >= TOTAL {{
        return;
    }}
    let tn = w % TILES_N;
    let tm = (w / TILES_N) % TILES_M;
    let slice = (w / (TILES_N * TILES_M)) % SPLIT;
    let z = w / (TILES_N * TILES_M * SPLIT);
{batch_bases}    let obase = {obase};
    let kbegin = slice * KCHUNK;
    let kend = min(K, kbegin + KCHUNK);
    let row0 = tm * {bm}u;
    let col0 = tn * {bn}u;
    let tx = lid % {tx_count}u;
    let ty = lid / {tx_count}u;
{drop_keys}",
        bk * bm / 4 * stages,
        bk * bn / 4 * stages,
        bm4 = bm / 4,
        epilogue_fns = epilogue.map(|e| e.functions.as_str()).unwrap_or(""),
        cols_fn = lay
            .im2col
            .map(|g| cols_fn(g, st.b, dt))
            .or(lay.dgrad.map(|g| dgrad_fns(g, st.a, st.b, dt)))
            .unwrap_or_default()
            + &lay
                .nchw
                .map(|hw| format!(
                    "
// where element [r, (n, p)] of the [M, N*{hw}] result lives in the image [N, M, {hw}]
fn nchw_index(r: u32, q: u32) -> u32 {{
    return ((q / {hw}u) * M + r) * {hw}u + q % {hw}u;
}}
"
                ))
                .unwrap_or_default(),
    );
    for i in 0..tm {
        for j in 0..cq {
            let _ = writeln!(s, "    var acc{i}_{j} = vec4<f32>(0.0);");
        }
    }
    // row sums: thread lid holds the tile's vec4 row groups lid, lid + t, ..
    let groups = bm / 4;
    let parts = groups.div_ceil(t);
    if lay.row_sums {
        for p in 0..parts {
            let _ = writeln!(s, "    var rsum{p} = vec4<f32>(0.0);");
        }
    }
    if cfg.prefetch {
        // registers for the next step's tiles: its global loads are in flight during this
        // step's multiply-adds
        for (tile, ext) in [("a", bm), ("b", bn)] {
            let vec = if tile == "a" {
                lay.vec_a && lay.dgrad.is_none()
            } else {
                lay.vec_b && lay.im2col.is_none() && lay.dgrad.is_none()
            };
            let per = if vec { 4 } else { 1 };
            for l in 0..ext * bk / (per * cfg.threads()) {
                let ty = if vec { "vec4<f32>" } else { "f32" };
                let _ = writeln!(s, "    var r{tile}{l}: {ty};");
            }
        }
    }
    let _ = writeln!(
        s,
        "    for (var k0 = kbegin; k0 < kend; k0 = k0 + {bk}u) {{"
    );
    let a_tile = TileLoad {
        operand: "a",
        shared: "As",
        ext_name: "M",
        ext: bm,
        origin: "row0",
        k_contiguous: !lay.trans_a,
        vec: lay.vec_a && lay.dgrad.is_none(),
        stored: st.a,
        result: dt,
        drop: lay.drop_a,
        rows: lay.rows_a,
        gather: lay.dgrad.map(|_| Gather {
            k_part: "u32",
            g_part: "u32",
            at: "weight_at",
            k_first: false,
        }),
    };
    let b_tile = TileLoad {
        operand: "b",
        shared: "Bs",
        ext_name: "N",
        ext: bn,
        origin: "col0",
        k_contiguous: lay.trans_b,
        vec: lay.vec_b && lay.im2col.is_none() && lay.dgrad.is_none(),
        stored: st.b,
        result: dt,
        drop: lay.drop_b,
        rows: lay.rows_b,
        // the column matrix [C*kh*kw, N*Ho*Wo] is op(b) itself, or its transpose when k runs
        // along its columns
        gather: match (lay.im2col, lay.dgrad, lay.trans_b) {
            // op(b)[k, g] = cols[k, g]: k is the row r
            (Some(_), _, false) => Some(Gather {
                k_part: "cols_r",
                g_part: "cols_p",
                at: "cols_at",
                k_first: true,
            }),
            // op(b)[k, g] = cols[g, k]: g is the row r
            (Some(_), _, true) => Some(Gather {
                k_part: "cols_p",
                g_part: "cols_r",
                at: "cols_at",
                k_first: false,
            }),
            (_, Some(_), _) => Some(Gather {
                k_part: "dy_k",
                g_part: "dy_q",
                at: "dy_at",
                k_first: true,
            }),
            _ => None,
        },
    };
    // before the loop over K: the gathered operands' fixed index parts, then with prefetching
    // the first step's tiles (each step then fetches the next)
    let loop_head = s
        .rfind("    for (var k0")
        .expect("the loop was just written");
    let mut before = String::new();
    emit_gather_parts(&mut before, &a_tile, cfg);
    emit_gather_parts(&mut before, &b_tile, cfg);
    s.insert_str(loop_head, &before);
    if cfg.prefetch {
        let loop_head = s
            .rfind("    for (var k0")
            .expect("the loop was just written");
        let mut prologue =
            String::from("    {\n        let k0 = kbegin;\n        let kn = kbegin;\n");
        emit_tile_load(&mut prologue, &a_tile, cfg, Phase::Fetch, "");
        emit_tile_load(&mut prologue, &b_tile, cfg, Phase::Fetch, "");
        emit_tile_load(&mut prologue, &a_tile, cfg, Phase::Stash, "");
        emit_tile_load(&mut prologue, &b_tile, cfg, Phase::Stash, "");
        prologue.push_str("    }\n    workgroupBarrier();\n");
        s.insert_str(loop_head, &prologue);
        if cfg.double_buffer {
            // step i multiplies buffer i % 2 and stores the next tiles into the other one
            let _ = writeln!(
                s,
                "        let cur = ((k0 - kbegin) / {bk}u) % 2u;
        let ca = cur * {asz}u;
        let cb = cur * {bsz}u;
        let na = {asz}u - ca;
        let nb = {bsz}u - cb;",
                asz = bk * bm / 4,
                bsz = bk * bn / 4
            );
        }
        let _ = writeln!(s, "        let kn = k0 + {bk}u;");
        emit_tile_load(&mut s, &a_tile, cfg, Phase::Fetch, "");
        emit_tile_load(&mut s, &b_tile, cfg, Phase::Fetch, "");
    } else {
        emit_tile_load(&mut s, &a_tile, cfg, Phase::Both, "");
        emit_tile_load(&mut s, &b_tile, cfg, Phase::Both, "");
        let _ = writeln!(s, "        workgroupBarrier();");
    }
    let (ca, cb) = if cfg.double_buffer {
        ("ca + ", "cb + ")
    } else {
        ("", "")
    };
    if lay.row_sums {
        // this step's a tile is in As (the multiply-adds below read it too)
        let _ = writeln!(s, "        if tn == 0u {{");
        for p in 0..parts {
            let terms: Vec<String> = (0..bk)
                .map(|kk| format!("As[{ca}{}u + lid]", kk * groups + p * t))
                .collect();
            let _ = writeln!(
                s,
                "            if lid + {}u < {groups}u {{
                rsum{p} = rsum{p} + {};
            }}",
                p * t,
                terms.join(" + ")
            );
        }
        let _ = writeln!(s, "        }}");
    }
    for kk in 0..bk {
        for q in 0..rq {
            let _ = writeln!(
                s,
                "        let a{kk}_{q} = As[{ca}{}u + ty];",
                kk * bm / 4 + q * row_gap / 4
            );
        }
        for j in 0..cq {
            let _ = writeln!(
                s,
                "        let b{kk}_{j} = Bs[{cb}{}u + tx];",
                kk * bn / 4 + j * col_gap / 4
            );
        }
        for i in 0..tm {
            let comp = ["x", "y", "z", "w"][(i % 4) as usize];
            for j in 0..cq {
                let _ = writeln!(
                    s,
                    "        acc{i}_{j} = fma(vec4<f32>(a{kk}_{}.{comp}), b{kk}_{j}, acc{i}_{j});",
                    i / 4
                );
            }
        }
    }
    if cfg.double_buffer {
        // the other buffer: nobody reads it until after the barrier
        emit_tile_load(&mut s, &a_tile, cfg, Phase::Stash, "na + ");
        emit_tile_load(&mut s, &b_tile, cfg, Phase::Stash, "nb + ");
        let _ = writeln!(s, "        workgroupBarrier();");
    } else {
        let _ = writeln!(s, "        workgroupBarrier();");
        if cfg.prefetch {
            emit_tile_load(&mut s, &a_tile, cfg, Phase::Stash, "");
            emit_tile_load(&mut s, &b_tile, cfg, Phase::Stash, "");
            let _ = writeln!(s, "        workgroupBarrier();");
        }
    }
    let _ = writeln!(s, "    }}");
    if lay.row_sums {
        // rows past M are the tile's zero padding, inside the region's M rounded up to 4
        let _ = writeln!(s, "    if tn == 0u {{");
        for p in 0..parts {
            let at = format!("obase + RS_OFF + row0 + (lid + {}u) * 4u", p * t);
            let store = if lay.vec_out {
                format!(
                    "out[({at}) / 4u] = {};",
                    if dt == DType::F16 {
                        format!("vec4<f16>(rsum{p})")
                    } else {
                        format!("rsum{p}")
                    }
                )
            } else {
                ["x", "y", "z", "w"]
                    .iter()
                    .enumerate()
                    .map(|(q, c)| {
                        format!(
                            "out[{at} + {q}u] = {};",
                            narrow(dt, &format!("rsum{p}.{c}"))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n            ")
            };
            let _ = writeln!(
                s,
                "        if lid + {pt}u < {groups}u && row0 + (lid + {pt}u) * 4u < M {{
            {store}
        }}",
                pt = p * t
            );
        }
        let _ = writeln!(s, "    }}");
    }
    // stores with the epilogue
    for i in 0..tm {
        let row = format!("row0 + {}u + ty * 4u", (i / 4) * row_gap + i % 4);
        for j in 0..cq {
            let col = format!("col0 + {}u + tx * 4u", j * col_gap);
            let _ = writeln!(s, "    {{\n        let r = {row};\n        let c = {col};");
            let mut v = format!("acc{i}_{j}");
            match lay.bias {
                Bias::None => {}
                Bias::Rows => {
                    let _ = writeln!(
                        s,
                        "        let bv = vec4<f32>({});",
                        load(st.bias, dt, "bias[min(r, M - 1u)]".into())
                    );
                    v = format!("({v} + bv)");
                }
                Bias::Cols => {
                    let at = |c: &str| load(st.bias, dt, format!("bias[min({c}, N - 1u)]"));
                    let _ = writeln!(
                        s,
                        "        let bv = vec4<f32>({}, {}, {}, {});",
                        at("c"),
                        at("c + 1u"),
                        at("c + 2u"),
                        at("c + 3u")
                    );
                    v = format!("({v} + bv)");
                }
            }
            if lay.relu {
                v = format!("max({v}, vec4<f32>(0.0))");
            }
            let _ = writeln!(s, "        let y = {v};");
            if lay.nchw.is_some() {
                // an epilogue sees each result at the index it is stored at
                let e = |comp: &str, col: &str| match epilogue {
                    Some(_) => narrow(dt, &format!("epilogue(y.{comp}, nchw_index(r, {col}))")),
                    None => narrow(dt, &format!("y.{comp}")),
                };
                let _ = writeln!(
                    s,
                    "        if r < M {{
            if c < N {{ out[nchw_index(r, c)] = {}; }}
            if c + 1u < N {{ out[nchw_index(r, c + 1u)] = {}; }}
            if c + 2u < N {{ out[nchw_index(r, c + 2u)] = {}; }}
            if c + 3u < N {{ out[nchw_index(r, c + 3u)] = {}; }}
        }}",
                    e("x", "c"),
                    e("y", "c + 1u"),
                    e("z", "c + 2u"),
                    e("w", "c + 3u")
                );
            } else if lay.vec_out && epilogue.is_some() {
                let _ = writeln!(
                    s,
                    "        if r < M && c < N {{
            let o = obase + r * N + c;
            out[o / 4u] = vec4<{dt}>(vec4<f32>(epilogue(y.x, o), epilogue(y.y, o + 1u), epilogue(y.z, o + 2u), epilogue(y.w, o + 3u)));
        }}"
                );
            } else if lay.vec_out {
                let _ = writeln!(
                    s,
                    "        if r < M && c < N {{ out[(obase + r * N + c) / 4u] = {}; }}",
                    if dt == DType::F16 {
                        "vec4<f16>(y)"
                    } else {
                        "y"
                    }
                );
            } else {
                let e = |comp: &str, off: &str| {
                    let v = match epilogue {
                        Some(_) => format!("epilogue(y.{comp}, o{off})"),
                        None => format!("y.{comp}"),
                    };
                    narrow(dt, &v)
                };
                let _ = writeln!(
                    s,
                    "        if r < M {{
            let o = obase + r * N + c;
            if c < N {{ out[o] = {}; }}
            if c + 1u < N {{ out[o + 1u] = {}; }}
            if c + 2u < N {{ out[o + 2u] = {}; }}
            if c + 3u < N {{ out[o + 3u] = {}; }}
        }}",
                    e("x", ""),
                    e("y", " + 1u"),
                    e("z", " + 2u"),
                    e("w", " + 3u")
                );
            }
            let _ = writeln!(s, "    }}");
        }
    }
    let _ = writeln!(s, "}}");
    s
}

/// Most rows a product may have to run as a GEMV ([`gemv_kernel`]).
pub const GEMV_MAX_ROWS: usize = 8;

/// Whether the skinny-product kernel serves a product of `d` on `target`: at most
/// [`GEMV_MAX_ROWS`] rows (batch-1 inference, a decoder step), where a tiled kernel would spend
/// most of its tile on padding.
pub fn gemv_applies(d: &ProductDims, target: &Target) -> bool {
    d.m <= GEMV_MAX_ROWS
        && target.max_invocations >= 256
        && target.max_workgroup_x >= 256
        && target.workgroup_storage >= (GEMV_MAX_ROWS * 256 * 4) as u32
}

/// The skinny-product kernel: each workgroup of 256 threads computes a few columns of all (at
/// most 8) rows, its threads splitting K and adding their partial sums in workgroup memory.
/// With `b` transposed (a Linear layer's `[out, in]` weight) 32 threads walk each column's
/// contiguous K (8 columns per workgroup); otherwise 64 neighbouring columns are read together,
/// K split 4 ways. Rows are unrolled (one register each). Bias, relu and a fused epilogue apply
/// as in the tiled family.
/// `storage`: the bindings' storage types (a `DType` for all alike).
pub fn gemv_kernel(
    mm: &MatMul,
    d: &ProductDims,
    epilogue: Option<&Epilogue>,
    storage: impl Into<Storage>,
) -> Generated {
    let storage = storage.into();
    let cols = if mm.trans_b { 8 } else { 64 };
    let batch = d.batch.numel();
    let col_groups = groups(d.n, cols);
    let total = col_groups * batch as u64;
    let mut constants = vec![
        ("M", d.m as f64),
        ("N", d.n as f64),
        ("K", d.k as f64),
        ("TILES_N", col_groups as f64),
        ("TOTAL", total as f64),
    ];
    constants.extend(d.batch_constants());
    let src = gemv_wgsl(mm, d.m, epilogue, storage);
    let key = format!(
        "gemv{}x{cols}{}{}{}",
        d.m,
        storage.describe(),
        product_flags(mm),
        match epilogue {
            Some(e) => format!(
                ",epilogue[{}@{:016x}]",
                e.describe,
                super::elementwise::fnv1a(src.as_bytes())
            ),
            None => String::new(),
        }
    );
    Generated {
        spec: KernelSpec {
            family: "matmul_gemv",
            entry: "main",
            constants,
            workgroups: total,
        },
        key,
        wgsl: src.into(),
    }
}

/// The WGSL of the skinny-product kernel for `rows` rows, bindings stored as `storage` says.
pub fn gemv_wgsl(
    mm: &MatMul,
    rows: usize,
    epilogue: Option<&Epilogue>,
    storage: impl Into<Storage>,
) -> String {
    let st = storage.into();
    let dt = st.out;
    let (cols, lanes) = if mm.trans_b { (8u32, 32u32) } else { (64, 4) };
    let first_extra = if mm.bias == Bias::None { 2 } else { 3 };
    let out_binding = first_extra + epilogue.map_or(0, |e| e.extra);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// matmul_gemv.wgsl: generated by src/codegen/matmul.rs: the skinny product ({rows} rows) of
// out[z] = relu?(op(a[z]) x op(b[z]) + bias?){}, op = identity or transpose (a: {}, b: {}).
//
// Bindings (group 0):
//   0  a     storage, read        [batch.., M, K] (transposed: [batch.., K, M])
//   1  b     storage, read        [batch.., K, N] (transposed: [batch.., N, K]){}
//   {out_binding}  out   storage, read_write  [batch.., M, N]
// Overrides: M (= {rows}), N, K; TILES_N = ceil(N / {cols}); batch shape BD1..BD3 and operand strides
//            SA*/SB* as in matmul.wgsl; TOTAL = TILES_N * batch.
// Dispatch: TOTAL workgroups of 256 threads, folded into (x <= 65535, y). Workgroup w computes
//           columns {cols} * (w % TILES_N) .. of batch w / TILES_N for all rows; its threads are
//           {cols} columns x {lanes} lanes, each lane summing every {lanes}th k; the lanes' sums meet
//           in workgroup memory and the first lane of each column stores.
",
        if epilogue.is_some() {
            " then the fused epilogue"
        } else {
            ""
        },
        mm.trans_a,
        mm.trans_b,
        if mm.bias == Bias::None {
            String::new()
        } else {
            "\n//   2  bias  storage, read        [M] or [N]".to_string()
        },
    );
    if let Some(e) = epilogue {
        let _ = writeln!(
            s,
            "// Epilogue: the fused elementwise ops [{}], other inputs at bindings {first_extra}.., read at
//   the result's element index.
",
            e.describe
        );
    }
    if [st.a, st.b, st.bias, st.out].contains(&DType::F16) {
        s.push_str("enable f16;\n\n");
    }
    s.push_str(&super::overrides(&[
        "M", "N", "K", "TILES_N", "TOTAL", "BD1", "BD2", "BD3", "SA0", "SA1", "SA2", "SA3", "SB0",
        "SB1", "SB2", "SB3",
    ]));
    let batch_bases = super::BATCH_BASES;
    s.push('\n');
    s.push_str(&product_bindings(
        st,
        [false; 3],
        mm.bias != Bias::None,
        epilogue,
        out_binding,
    ));
    let _ = writeln!(
        s,
        "
// red[m * 256 + thread]: each thread's partial sum of row m
var<workgroup> red: array<f32, {}>;
{}
@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {{
    let w = wid.y * nwg.x + wid.x;
    if w >= TOTAL {{
        return;
    }}
    let z = w / TILES_N;
{batch_bases}    let obase = z * M * N;",
        rows * 256,
        epilogue.map(|e| e.functions.as_str()).unwrap_or(""),
    );
    if mm.trans_b {
        let _ = writeln!(
            s,
            "    let lane = lid % {lanes}u;\n    let c = lid / {lanes}u;"
        );
    } else {
        let _ = writeln!(
            s,
            "    let c = lid % {cols}u;\n    let lane = lid / {cols}u;"
        );
    }
    let _ = writeln!(s, "    let n = (w % TILES_N) * {cols}u + c;");
    for m in 0..rows {
        let _ = writeln!(s, "    var acc{m} = 0.0;");
    }
    let b_read = load(
        st.b,
        dt,
        if mm.trans_b {
            "b[bbase + n * K + k]"
        } else {
            "b[bbase + k * N + n]"
        }
        .into(),
    );
    let _ = writeln!(
        s,
        "    if n < N {{
        for (var k = lane; k < K; k = k + {lanes}u) {{
            let bv = {b_read};"
    );
    for m in 0..rows {
        let a_read = if mm.trans_a {
            load(st.a, dt, format!("a[abase + k * M + {m}u]"))
        } else {
            load(st.a, dt, format!("a[abase + {m}u * K + k]"))
        };
        let _ = writeln!(s, "            acc{m} = fma({a_read}, bv, acc{m});");
    }
    let _ = writeln!(s, "        }}\n    }}");
    for m in 0..rows {
        let _ = writeln!(s, "    red[{}u + lid] = acc{m};", m * 256);
    }
    let _ = writeln!(
        s,
        "    workgroupBarrier();\n    if lane != 0u || n >= N {{\n        return;\n    }}"
    );
    // the lanes of column c: c * lanes + l (trans_b) or l * cols + c
    let lane_index = if mm.trans_b {
        format!("c * {lanes}u + l")
    } else {
        format!("l * {cols}u + c")
    };
    for m in 0..rows {
        let bias = match mm.bias {
            Bias::None => String::new(),
            Bias::Rows => format!(" + {}", load(st.bias, dt, format!("bias[{m}u]"))),
            Bias::Cols => format!(" + {}", load(st.bias, dt, "bias[n]".into())),
        };
        let mut v = format!("sum{m}{bias}");
        if mm.relu {
            v = format!("max({v}, 0.0)");
        }
        let o = format!("obase + {m}u * N + n");
        if epilogue.is_some() {
            v = format!("epilogue({v}, {o})");
        }
        let _ = writeln!(
            s,
            "    var sum{m} = 0.0;
    for (var l = 0u; l < {lanes}u; l = l + 1u) {{
        sum{m} = sum{m} + red[{}u + {lane_index}];
    }}
    out[{o}] = {};",
            m * 256,
            narrow(dt, &v)
        );
    }
    let _ = writeln!(s, "}}");
    s
}
