//! The tensor-core GEMM: products computed with f16 inputs and f32 accumulation through
//! cooperative matrices (`enable wgpu_cooperative_matrix;`, 16x16x16 f16 -> f32), used for f16
//! graphs, and for f32 graphs when the device's matmul precision is `Precision::Medium` (as
//! PyTorch's `torch.set_float32_matmul_precision("medium")`), where the adapter offers that
//! matrix shape with 32-wide subgroups. Plain products and implicit-GEMM convolutions
//! ([`Operands`]: forward, weight gradient, input gradient) alike; bindings stored as
//! [`Storage`] says.
//!
//! A workgroup of 128 threads (four subgroups, 2 x 2) computes a 128 x 128 output tile, each
//! subgroup a 64 x 64 block as 4 x 4 accumulators. Both operand tiles are staged through
//! workgroup memory 32 deep, converted to f16 on the way (bounds-checked, zero-filled, so any
//! M, N, K and either transpose work; read as vec4s where an operand's contiguous axis is a
//! multiple of 4, [`vec_operands`]); each subgroup loads its 4 A and 4 B fragments from there
//! per 16 of K. The epilogue passes each accumulator through a per-subgroup 16 x 16 f32 staging
//! tile so that the bias, relu, a fused elementwise epilogue (the plan's `MatMulEpilogue`) and
//! edge checks apply per element.
//!
//! [`Cores::Emulated`] writes the same kernel with the four cooperative-matrix operations
//! (`coopLoadT`, `coopMultiplyAdd`, `coopStoreT`, the subgroup builtins) replaced by plain WGSL
//! over virtual 32-lane subgroups (`lid / 32`), the rest the same text (its epilogue a loop
//! over the accumulators rather than unrolled): slow, but it runs on
//! any adapter with SHADER_F16, so the staging, gathers, batch bases and epilogue are tested on
//! lavapipe (`KILN_EMULATE_TENSOR_CORES=1`, tests/tensor_cores.rs). Only the hardware's
//! fragment layout and the driver's translation remain for a GPU to show.
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

/// Output tile of one workgroup (square).
pub const TILE: usize = 128;
/// Threads per workgroup: four 32-wide subgroups.
pub const THREADS: u32 = 128;
/// Depth of one staging step through K.
const BK: u32 = 32;
/// Bytes of workgroup memory: both f16 tiles and four f32 16x16 staging tiles.
pub const WORKGROUP_BYTES: u32 = 2 * (TILE as u32 * BK * 2) + 4 * 256 * 4;

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
) -> Generated {
    kernel_with(mm, d, storage, Operands::Matrices, cores, None)
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
) -> Generated {
    let storage = storage.into();
    let batch = d.batch.numel();
    let tiles_m = groups(d.m, TILE);
    let tiles_n = groups(d.n, TILE);
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
        "coop16{}{}{}{}{}",
        super::matmul::product_flags(mm),
        storage.describe(),
        if vec[0] { ",va" } else { "" },
        if vec[1] { ",vb" } else { "" },
        if cores == Cores::Emulated {
            ",emulated"
        } else {
            ""
        }
    );
    let src = wgsl_with(mm, storage, operands, cores, epilogue, vec);
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
pub fn wgsl(mm: &MatMul, storage: impl Into<Storage>, cores: Cores) -> String {
    wgsl_with(mm, storage, Operands::Matrices, cores, None, [false; 2])
}

/// [`wgsl`] reading and storing as `operands` says, with an optional fused `epilogue` (plain
/// products only: it reads its other inputs at the result's index `obase + row * N + col`),
/// `a` and `b` bound and staged as vec4s where `vec` says (see [`vec_operands`]).
pub fn wgsl_with(
    mm: &MatMul,
    storage: impl Into<Storage>,
    operands: Operands,
    cores: Cores,
    epilogue: Option<&Epilogue>,
    vec: [bool; 2],
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
    let tile = TILE as u32;
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
// Overrides: M, N, K; TILES_M/N = ceil(M / 128), ceil(N / 128); batch shape BD1..BD3 and operand
//            strides SA*/SB* as in matmul.wgsl; TOTAL = TILES_M * TILES_N * batch.
// Dispatch: TOTAL workgroups of 128 threads (four 32-wide subgroups; the host only picks this
//           kernel where the adapter's subgroups are exactly 32 wide), folded into (x <= 65535, y).
//           Workgroup w computes the 128x128 tile (w / TILES_N % TILES_M, w % TILES_N) of batch
//           w / (TILES_M * TILES_N); subgroup s the 64x64 block (s / 2, s % 2) of it.
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
// As[m * {BK} + k] = op(a)[row0 + m, k0 + k]; Bs[k * {tile} + n] = op(b)[k0 + k, col0 + n]
var<workgroup> As: array<f16, {asz}>;
var<workgroup> Bs: array<f16, {bsz}>;
// one 16x16 f32 tile per subgroup for the epilogue
var<workgroup> Cs: array<f32, 1024>;
{emu_fns}
@compute @workgroup_size({THREADS})
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
    let col0 = tn * {tile}u;
    let wm = sid / 2u;
    let wn = sid % 2u;
",
        emu_fns = if emulated {
            emulation_fns()
        } else {
            String::new()
        },
        epi_fns = epilogue.map_or(String::new(), |e| e.functions.clone()),
        asz = tile * BK,
        bsz = tile * BK,
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
    let _ = writeln!(
        s,
        "    let cs = sid * 256u;
    for (var q = 0u; q < 8u; q = q + 1u) {{
        Cs[cs + lane + q * 32u] = 0.0;
    }}
    workgroupBarrier();"
    );
    if emulated {
        // accumulator (i, j) is acc[(4 i + j) * 8 ..][..8]; one loop keeps the code small
        let _ = writeln!(
            s,
            "    var acc: array<f32, 128>;
    for (var ij = 0u; ij < 16u; ij = ij + 1u) {{
        emu_load_c(&acc, ij * 8u, cs, lane);
    }}"
        );
    } else {
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
    // element lid + l * 128 of the tile is column lid): its part of the gather, once
    match operands {
        Operands::Im2col { .. } if !mm.trans_b => {
            let _ = writeln!(s, "    let pcol = cols_p(col0 + lid);");
        }
        Operands::Dgrad(_) => {
            let _ = writeln!(s, "    let pcol = dy_q(col0 + lid);");
        }
        _ => {}
    }
    let _ = writeln!(s, "    for (var k0 = 0u; k0 < K; k0 = k0 + {BK}u) {{");
    // staging loads: 4096 elements of each tile, 32 per thread (8 vec4s where the operand's
    // contiguous axis allows), consecutive threads on consecutive addresses of the operand
    Staged::a(mm, operands, sa).write(&mut s, vec[0]);
    Staged::b(mm, operands, sb).write(&mut s, vec[1]);
    let _ = writeln!(s, "        workgroupBarrier();");
    if emulated {
        let _ = writeln!(
            s,
            "        for (var kk = 0u; kk < {BK}u; kk = kk + 16u) {{
            for (var ij = 0u; ij < 16u; ij = ij + 1u) {{
                let ia = (wm * 64u + (ij / 4u) * 16u) * {BK}u + kk;
                let ib = kk * {tile}u + wn * 64u + (ij % 4u) * 16u;
                emu_multiply_add(&acc, ij * 8u, ia, ib, lane);
            }}
        }}"
        );
    }
    for kk in (0..BK).step_by(16).filter(|_| !emulated) {
        // naga needs every coopLoad index bound to a `let`
        for i in 0..4 {
            let _ = writeln!(
                s,
                "        let ia{kk}_{i} = (wm * 64u + {}u) * {BK}u + {kk}u;
        let fa{kk}_{i} = coopLoadT<coop_mat16x16<f16, A>>(&As[ia{kk}_{i}], {BK}u);",
                i * 16
            );
        }
        for j in 0..4 {
            let _ = writeln!(
                s,
                "        let ib{kk}_{j} = {kk}u * {tile}u + wn * 64u + {}u;
        let fb{kk}_{j} = coopLoadT<coop_mat16x16<f16, B>>(&Bs[ib{kk}_{j}], {tile}u);",
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
    let _ = writeln!(s, "        workgroupBarrier();\n    }}");
    // epilogue through the staging tile, one accumulator at a time: unrolled on tensor cores;
    // a loop over the accumulators when emulated (the same text with the offsets computed, so
    // that lavapipe compiles 2 barriers rather than 32)
    let block = |store_c: &str, ri: &str, ci: &str| {
        format!(
            "    {store_c}
    workgroupBarrier();
    for (var q = 0u; q < 8u; q = q + 1u) {{
        let e = lane + q * 32u;
        let row = row0 + wm * 64u + {ri} + e / 16u;
        let col = col0 + wn * 64u + {ci} + e % 16u;
        if row < M && col < N {{
            let o = {at};
            var v = Cs[cs + e];{bias}{relu}{epi}
            out[o] = {store};
        }}
    }}
    workgroupBarrier();",
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
        let body = block(
            "emu_store_c(&acc, ij * 8u, cs, lane);",
            "ij / 4u * 16u",
            "ij % 4u * 16u",
        );
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
                        &format!("coopStoreT(c{i}{j}, &Cs[cs], 16u);"),
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

/// One operand's staging into its workgroup tile: `a` into `As[m * BK + k]`, `b` into
/// `Bs[k * TILE + n]` (f16), for one step through K.
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

    /// Where element (outer, k) of the tile lives in its workgroup array.
    fn tile_at(&self, outer: &str, k: &str) -> String {
        if self.name == 'a' {
            format!("As[({outer}) * {BK}u + {k}]")
        } else {
            format!("Bs[({k}) * {TILE}u + {outer}]")
        }
    }

    /// The staging code: 4,096 elements, 32 scalars per thread, or 8 vec4s where `vec` (along
    /// the contiguous axis); consecutive threads on consecutive addresses of the operand.
    fn write(&self, s: &mut String, vec: bool) {
        let tile = TILE as u32;
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
        for l in 0..tile * BK / width / THREADS {
            let e = format!("(lid + {}u)", l * THREADS);
            // the tile index along the contiguous axis runs fastest
            let along = |n: u32| match width {
                1 => format!("{e} % {n}u"),
                _ => format!("{e} % {}u * {width}u", n / width),
            };
            let across = |n: u32| format!("{e} / {}u", n / width);
            let (outer_, k_) = if self.k_contiguous {
                (across(BK), along(BK))
            } else {
                (along(tile), across(tile))
            };
            let (zero, load, stores) = if vec {
                let stores: String = ["x", "y", "z", "w"]
                    .iter()
                    .enumerate()
                    .map(|(c, comp)| {
                        let at = if self.k_contiguous {
                            self.tile_at(&format!("{o}{o}"), &format!("kk + {c}u"))
                        } else {
                            self.tile_at(&format!("{o}{o} + {c}u"), "kk")
                        };
                        format!("\n            {at} = v.{comp};")
                    })
                    .collect();
                (
                    "vec4<f16>()".to_string(),
                    format!("vec4<f16>({name}[({index}) / 4u])"),
                    stores,
                )
            } else {
                let load = match &self.gather {
                    Some(g) => g.clone(),
                    None => widen(self.dtype, format!("{name}[{index}]")),
                };
                let at = self.tile_at(&format!("{o}{o}"), "kk");
                (
                    "0.0".to_string(),
                    load,
                    format!("\n            {at} = f16(v);"),
                )
            };
            let _ = writeln!(
                s,
                "        {{
            let {o}{o} = {outer_};
            let kk = {k_};
            let {o} = {origin} + {o}{o};
            let k = k0 + kk;
            var v = {zero};
            if {o} < {extent} && k < K {{ v = {load}; }}{stores}
        }}"
            );
        }
    }
}

/// The cooperative-matrix operations of [`Cores::Emulated`]: a 16 x 16 matrix of a subgroup is
/// 8 values per lane (element e = lane + 32 q at row e / 16, column e % 16; a thread's 16
/// accumulators are one array), an A or B fragment read where the kernel loads it from
/// (`As` / `Bs`);
/// products of f16 values are exact in f32, as on tensor cores.
fn emulation_fns() -> String {
    format!(
        "
// coopLoadT of accumulator acc[c..c + 8] from Cs (row-major, 16 wide)
fn emu_load_c(acc: ptr<function, array<f32, 128>>, c: u32, at: u32, lane: u32) {{
    for (var q = 0u; q < 8u; q = q + 1u) {{
        (*acc)[c + q] = Cs[at + lane + q * 32u];
    }}
}}

// coopStoreT of accumulator acc[c..c + 8] to Cs
fn emu_store_c(acc: ptr<function, array<f32, 128>>, c: u32, at: u32, lane: u32) {{
    for (var q = 0u; q < 8u; q = q + 1u) {{
        Cs[at + lane + q * 32u] = (*acc)[c + q];
    }}
}}

// acc[c..c + 8] = coopMultiplyAdd(the A fragment at As[ia] (stride {BK}), the B fragment at
// Bs[ib] (stride {TILE}), acc[c..c + 8])
fn emu_multiply_add(acc: ptr<function, array<f32, 128>>, c: u32, ia: u32, ib: u32, lane: u32) {{
    for (var q = 0u; q < 8u; q = q + 1u) {{
        let e = lane + q * 32u;
        let r = e / 16u;
        let n = e % 16u;
        var v = (*acc)[c + q];
        for (var k = 0u; k < 16u; k = k + 1u) {{
            v = v + f32(As[ia + r * {BK}u + k]) * f32(Bs[ib + k * {TILE}u + n]);
        }}
        (*acc)[c + q] = v;
    }}
}}
"
    )
}
