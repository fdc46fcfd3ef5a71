//! Fused elementwise kernels: one WGSL module per fused program (`ops::fused::Fused`) at its
//! shapes. One thread computes one output element: it loads each input once through that input's
//! broadcast strides (baked in as constants, so the driver folds the index arithmetic), runs the
//! program's steps in registers and stores the result; the chain's intermediates never touch
//! memory.
//!
//! The op formulas are not restated here: `unary_op`, `binary_op` and `erf_approx` are copied
//! verbatim from `shaders/unary.wgsl` and `shaders/binary.wgsl` (the text between their
//! `// shared: begin` / `// shared: end` markers) and called with constant op codes, which the
//! driver folds into straight-line code. Scalar operands are printed as exact f32 literals.

use std::fmt::Write;

use super::{narrow, widen, Generated};
use crate::ops::binary::broadcast_strides;
use crate::ops::fused::{Fused, Operand, PermutedRead, StepOp};
use crate::ops::{groups, shader_source, KernelSpec};
use crate::tensor::{DType, Shape};

/// Threads per workgroup (one output element each).
const WG: usize = 256;

/// Most inputs of a fused kernel: WebGPU guarantees 8 storage buffers per shader stage, one of
/// which is the output.
pub const MAX_INPUTS: usize = 7;

/// The launch and module of a fused program whose inputs have shapes `inputs` and whose result
/// has shape `out` (every input broadcasts to `out`), every binding stored as `dtype` (the
/// program computes in f32 either way).
pub fn kernel(f: &Fused, inputs: &[&Shape], out: &Shape, dtype: DType) -> Generated {
    kernel_as(f, inputs, out, dtype, dtype)
}

/// [`kernel`] with the inputs stored as `from` and the output as `to` (a program ending in a
/// cast, `exec::fuse::fuse_casts`).
pub fn kernel_from(f: &Fused, inputs: &[&Shape], out: &Shape, from: DType, to: DType) -> Generated {
    kernel_as(f, inputs, out, from, to)
}

/// A cast of a tensor of `shape` from `from` to `to` (one element per thread).
pub fn cast_kernel(shape: &Shape, from: DType, to: DType) -> Generated {
    kernel_as(&Fused::identity(), &[shape], shape, from, to)
}

/// A copy of `x` (shape `x`) into `out` by a program without steps: a transpose where
/// `permuted` says so, a broadcast where `x` has fewer elements (`Graph::expand`).
pub fn copy_kernel(
    x: &Shape,
    out: &Shape,
    permuted: Option<PermutedRead>,
    from: DType,
    to: DType,
) -> Generated {
    let f = Fused {
        steps: Vec::new(),
        permuted: permuted.into_iter().collect(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    kernel_as(&f, &[x], out, from, to)
}

fn kernel_as(f: &Fused, inputs: &[&Shape], out: &Shape, from: DType, to: DType) -> Generated {
    let src = wgsl_as(f, inputs, out, from, to);
    // The op list says what was fused (labels, KILN_DEBUG); the hash of the text tells apart
    // programs with the same ops but other dataflow, scalars or shapes, which are baked in.
    let key = format!("{}@{:016x}", f.describe(), fnv1a(src.as_bytes()));
    Generated {
        spec: KernelSpec {
            family: "fused",
            entry: "main",
            constants: Vec::new(),
            workgroups: groups(out.numel(), WG),
        },
        key,
        wgsl: src.into(),
    }
}

/// The text between `// shared: begin <name>` and `// shared: end <name>` in a family's shader.
pub(crate) fn shared(family: &str, name: &str) -> &'static str {
    let src = shader_source(family).expect("a registered shader family");
    let begin = format!("// shared: begin {name}\n");
    let end = format!("// shared: end {name}\n");
    let a = src
        .find(&begin)
        .unwrap_or_else(|| panic!("shaders/{family}.wgsl lacks the marker {begin:?}"))
        + begin.len();
    let b = a + src[a..]
        .find(&end)
        .unwrap_or_else(|| panic!("shaders/{family}.wgsl lacks the marker {end:?}"));
    &src[a..b]
}

/// An exact WGSL f32 expression for `v`: Rust's shortest round-trip decimal with the `f` suffix
/// (parsed straight to f32, no double rounding), or the bit pattern where no literal exists.
fn f32_literal(v: f32) -> String {
    if v.is_finite() {
        format!("{v:?}f")
    } else {
        format!("bitcast<f32>({:#010x}u)", v.to_bits())
    }
}

/// The op functions a program's steps call: `unary_op`, `binary_op` (and `erf_approx`), and
/// `dropout_op` where a step drops elements, copied from their shaders.
fn op_functions(f: &Fused) -> String {
    let mut s = String::new();
    s.push_str(shared("unary", "unary_op"));
    s.push('\n');
    s.push_str(shared("binary", "binary_op"));
    if f.has_dropout() {
        s.push('\n');
        s.push_str(shared("dropout", "dropout_op"));
    }
    s
}

/// 64-bit FNV-1a: a stable hash for module keys.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One step of the program as the header shows it: `v2 = add_scalar(v1, 0.5)`.
fn show_step(k: usize, op: &StepOp, args: &[Operand]) -> String {
    let mut parts: Vec<String> = args
        .iter()
        .map(|a| match a {
            Operand::Input(i) => format!("x{i}"),
            Operand::Step(j) => format!("v{j}"),
        })
        .collect();
    if let StepOp::Unary(u) = op {
        parts.extend(u.scalars().iter().map(|s| format!("{s:?}")));
    }
    format!("v{k} = {}({})", op.name(), parts.join(", "))
}

/// The WGSL of a fused program at these shapes, every binding stored as `dtype`.
pub fn wgsl(f: &Fused, inputs: &[&Shape], out: &Shape, dtype: DType) -> String {
    wgsl_as(f, inputs, out, dtype, dtype)
}

/// `enable f16;` where a module declares f16 storage (it must precede every declaration).
fn enable(types: &[DType]) -> &'static str {
    if types.contains(&DType::F16) {
        "enable f16;\n"
    } else {
        ""
    }
}

/// [`wgsl`] with inputs stored as `from` and the output as `to`.
fn wgsl_as(f: &Fused, inputs: &[&Shape], out: &Shape, from: DType, to: DType) -> String {
    let n = out.numel();
    let n_in = inputs.len();
    let reads = input_reads(f, inputs, out);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "// fused.wgsl: generated by src/codegen/elementwise.rs: the elementwise ops [{}] as one kernel.
//
// out[i] = the program below at output element i. Each input is read once, through its broadcast
// strides (baked into the index expressions); the intermediates stay in registers.",
        f.describe()
    );
    for (k, st) in f.steps.iter().enumerate() {
        let _ = writeln!(s, "//   {}", show_step(k, &st.op, &st.args));
    }
    let _ = writeln!(s, "//\n// Bindings (group 0):");
    for (k, (shape, at)) in inputs.iter().zip(&reads).enumerate() {
        let strided: Vec<String> = at
            .iter()
            .filter_map(|r| {
                let st = r.strides.as_ref()?;
                Some(match r.shape == *out {
                    true => format!("element strides {st:?} per output axis"),
                    false => format!(
                        "element strides {st:?} per axis of {} (a reshape read through)",
                        r.shape
                    ),
                })
            })
            .collect();
        let st = (!strided.is_empty()).then(|| strided.join(", "));
        let how = match (f.permuted_read(k), f.gathered_read(k), st) {
            (Some(p), _, _) => format!(
                "read as permute({:?}, {:?}) (a folded transpose)",
                p.in_dims, p.perm
            ),
            (None, Some(g), _) => format!(
                "a table read as embedding(x{}, x{k}) {} (a folded lookup)",
                g.indices, g.shape
            ),
            (None, None, _) if f.only_indices(k) => "indices of a folded lookup".to_string(),
            (None, None, _) if f.rounds(k) => "rounded to f16 on load (a folded cast)".to_string(),
            (None, None, None) => "contiguous".to_string(),
            (None, None, Some(st)) => st,
        };
        let _ = writeln!(
            s,
            "//   {k}  x{k}   storage, read        {shape} {} input, {how}",
            f.input_dtype(k, from)
        );
    }
    let _ = writeln!(
        s,
        "//   {n_in}  out  storage, read_write  {out} {to} output, contiguous
// Dispatch: ceil(N / {WG}) workgroups of {WG} threads, folded by the host into (x <= 65535, y);
//           one element per thread; threads past N return.
// unary_op and erf_approx are copied from shaders/unary.wgsl, binary_op from shaders/binary.wgsl.
// Values are computed in f32 whatever the storage type.

{}const N: u32 = {n}u;
const WG: u32 = {WG}u;
",
        enable(&[from, to])
    );
    for k in 0..n_in {
        let _ = writeln!(
            s,
            "@group(0) @binding({k}) var<storage, read> x{k}: array<{}>;",
            f.input_dtype(k, from)
        );
    }
    let _ = writeln!(
        s,
        "@group(0) @binding({n_in}) var<storage, read_write> out: array<{to}>;\n"
    );
    s.push_str(&op_functions(f));
    let _ = writeln!(
        s,
        "
@compute @workgroup_size({WG})
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {{
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {{
        return;
    }}"
    );
    let load = |k: usize, index: &str| load_input(f, k, from, format!("x{k}[{index}]"));
    let (body, result) = program_body(f, inputs, out, &load);
    s.push_str(&body);
    let _ = writeln!(s, "    out[i] = {};\n}}", narrow(to, &result));
    s
}

/// Input `k`'s element `x` as the f32 value the program computes with, in a kernel whose values
/// are stored as `dtype`: widened, or rounded to f16 first where the input is read through a
/// folded cast (`Fused::rounded`).
fn load_input(f: &Fused, k: usize, dtype: DType, x: String) -> String {
    if f.rounds(k) {
        super::load(DType::F32, dtype, x)
    } else {
        widen(f.input_dtype(k, dtype), x)
    }
}

/// The statements computing a fused program at output element `i` (a `u32` in scope), each input
/// `k` read as `load(k, index)`: coordinates where broadcast inputs need them, one load per
/// input, one `let` per step. Returns the statements and the name of the result.
fn program_body(
    f: &Fused,
    inputs: &[&Shape],
    out: &Shape,
    load: &dyn Fn(usize, &str) -> String,
) -> (String, String) {
    let reads = input_reads(f, inputs, out);
    // the shapes broadcast inputs are read at (the output's first), each with its coordinates'
    // names: c<axis>, c<t>_<axis> for the t-th other shape
    let mut spaces: Vec<&Shape> = vec![out];
    for r in reads.iter().flatten().filter(|r| r.strides.is_some()) {
        if !spaces.contains(&&r.shape) {
            spaces.push(&r.shape);
        }
    }
    let coord = |t: usize, ax: usize| match t {
        0 => format!("c{ax}"),
        t => format!("c{t}_{ax}"),
    };
    let mut s = String::new();
    for (t, space) in spaces.iter().enumerate() {
        let dims = space.dims();
        // coordinates are needed from the innermost axis out to the outermost one a broadcast
        // input moves along (axes of extent 1 have coordinate 0 and are skipped)
        let outermost = reads
            .iter()
            .flatten()
            .filter(|r| r.shape == **space)
            .filter_map(|r| r.strides.as_ref())
            .filter_map(|st| (0..dims.len()).find(|&ax| st[ax] != 0 && dims[ax] > 1))
            .min();
        let Some(outer) = outermost else {
            continue;
        };
        let (r, what) = match t {
            0 => ("r".to_string(), "output coordinates".to_string()),
            t => (
                format!("r{t}"),
                format!("coordinates in {space} (a reshape read through)"),
            ),
        };
        let _ = writeln!(
            s,
            "    // {what}, innermost axis first, out to axis {outer}\n    var {r} = i;"
        );
        for ax in (outer..dims.len()).rev() {
            if dims[ax] == 1 {
                continue;
            }
            let c = coord(t, ax);
            if ax == outer {
                let _ = writeln!(s, "    let {c} = {r} % {}u;", dims[ax]);
            } else {
                let _ = writeln!(s, "    let {c} = {r} % {0}u; {r} = {r} / {0}u;", dims[ax]);
            }
        }
    }
    // input k's value as read at shape `shape`: a<k>, or a<k>_<q> for its q-th read shape
    let value = |k: usize, shape: &Shape| -> String {
        let q = reads[k].iter().position(|r| r.shape == *shape).unwrap_or(0);
        match reads[k].len() {
            1 => format!("a{k}"),
            _ => format!("a{k}_{q}"),
        }
    };
    for (k, at) in reads.iter().enumerate() {
        if f.only_indices(k) {
            continue;
        }
        for r in at {
            let a = value(k, &r.shape);
            let t = spaces.iter().position(|sp| **sp == r.shape).unwrap_or(0);
            let dims = r.shape.dims();
            let index = match (&r.strides, f.permuted_read(k)) {
                (_, Some(p)) => permuted_index(p),
                (None, None) => "i".to_string(),
                (Some(st), None) => {
                    let terms: Vec<String> = (0..dims.len())
                        .filter(|&ax| st[ax] != 0 && dims[ax] > 1)
                        .map(|ax| match st[ax] {
                            1 => coord(t, ax),
                            m => format!("{} * {m}u", coord(t, ax)),
                        })
                        .collect();
                    if terms.is_empty() {
                        "0u".to_string()
                    } else {
                        terms.join(" + ")
                    }
                }
            };
            read_input(&mut s, f, k, &a, &index, load);
        }
    }
    let operand = |a: &Operand, shape: &Shape| match a {
        Operand::Input(i) => value(*i, shape),
        Operand::Step(j) => format!("v{j}"),
    };
    let space = step_spaces(f, out);
    for (k, st) in f.steps.iter().enumerate() {
        let call = match st.op {
            StepOp::Unary(u) => {
                let (op, alpha, beta) = u.code();
                format!(
                    "unary_op({op}u, {}, {}, {})",
                    operand(&st.args[0], space[k]),
                    f32_literal(alpha),
                    f32_literal(beta)
                )
            }
            StepOp::Binary(b) => format!(
                "binary_op({}u, {}, {})",
                b.code(),
                operand(&st.args[0], space[k]),
                operand(&st.args[1], space[k])
            ),
            // keyed by the element index: the fuser keeps dropout at the program's shape
            StepOp::Dropout(d) => format!(
                "dropout_op({}, {}, i, {}u, {}, {}u)",
                operand(&st.args[0], space[k]),
                operand(&st.args[1], space[k]),
                d.threshold(),
                f32_literal(d.scale()),
                d.salt
            ),
        };
        let _ = writeln!(s, "    let v{k} = {call};");
    }
    // a program without steps copies its input
    let result = match f.steps.len() {
        0 => "a0".to_string(),
        n => format!("v{}", n - 1),
    };
    (s, result)
}

/// The statement reading input `k` into `a` at `index`: `load(k, index)`, or for a folded
/// lookup the table's row its index names (NaN where it names none).
fn read_input(
    s: &mut String,
    f: &Fused,
    k: usize,
    a: &str,
    index: &str,
    load: &dyn Fn(usize, &str) -> String,
) {
    match f.gathered_read(k) {
        // embedding.wgsl's lookup of the lookup's element m: the index clamped before the
        // read, NaN where it names no row (made at run time: a constant NaN is a
        // shader-creation error in WGSL)
        Some(g) => {
            let (w, rows) = (g.width, g.rows);
            let _ = writeln!(
                s,
                "    let m{a} = {index};
    let q{a} = {};
    let ok{a} = q{a} >= 0.0 && q{a} < {rows}.0 && q{a} == floor(q{a});
    let {a} = select({}, {}, ok{a});",
                load(g.indices, &format!("m{a} / {w}u")),
                format_args!("bitcast<f32>(0x7fc00000u | (m{a} & 0u))"),
                load(
                    k,
                    &format!(
                        "min(u32(select(0.0, q{a}, ok{a})), {}u) * {w}u + m{a} % {w}u",
                        rows - 1
                    )
                ),
            );
        }
        None => {
            let _ = writeln!(s, "    let {a} = {};", load(k, index));
        }
    }
}

/// The shape each step is computed at per output element: its own where it has the output's
/// element count (a reshape read through may make it another than the output's), else (a
/// value broadcast into a later step) its reader's, which its shape broadcasts to (the fuser
/// reads through full-size reshapes only).
fn step_spaces<'a>(f: &'a Fused, out: &'a Shape) -> Vec<&'a Shape> {
    let mut space: Vec<&Shape> = vec![out; f.steps.len()];
    for j in (0..f.steps.len()).rev() {
        space[j] = if f.steps[j].shape.numel() == out.numel() {
            &f.steps[j].shape
        } else {
            (j + 1..f.steps.len())
                .find(|&r| f.steps[r].args.contains(&Operand::Step(j)))
                .map_or(out, |r| space[r])
        };
    }
    space
}

/// One way a program reads an input: at `shape`, the shape of the steps reading it (a reshape
/// read through gives the steps before it a shape of their own, in the output's element
/// order), with its element strides per axis of that shape (0 where it broadcasts), `None`
/// where it has as many elements (read at the element's index) or is a folded lookup's indices.
struct InputRead {
    shape: Shape,
    strides: Option<Vec<usize>>,
}

/// Each input's reads, one per shape its steps read it at (the output's where none does: a
/// program without steps, a folded lookup's indices); a folded lookup broadcasts the lookup's
/// shape, not its table's.
fn input_reads(f: &Fused, inputs: &[&Shape], out: &Shape) -> Vec<Vec<InputRead>> {
    let space = step_spaces(f, out);
    (0..inputs.len())
        .map(|k| {
            let seen = f.gathered_read(k).map_or(inputs[k], |g| &g.shape);
            let mut shapes: Vec<&Shape> = Vec::new();
            for (st, &at) in f.steps.iter().zip(&space) {
                if st.args.contains(&Operand::Input(k)) && !shapes.contains(&at) {
                    shapes.push(at);
                }
            }
            if shapes.is_empty() {
                shapes.push(out);
            }
            shapes
                .into_iter()
                .map(|shape| InputRead {
                    shape: shape.clone(),
                    strides: (seen.numel() != shape.numel() && !f.only_indices(k))
                        .then(|| broadcast_strides(seen, shape)),
                })
                .collect()
        })
        .collect()
}

/// The input element a folded transpose reads for element `i`: `i`'s coordinates in the
/// permuted extents, each times its stride in the input (constants).
fn permuted_index(p: &PermutedRead) -> String {
    let (dims, strides) = (p.out_dims(), p.strides());
    let mut terms = Vec::new();
    let mut inner = 1usize;
    for j in (0..dims.len()).rev() {
        if dims[j] > 1 {
            let coord = if j == 0 {
                format!("(i / {inner}u)")
            } else {
                format!("((i / {inner}u) % {}u)", dims[j])
            };
            terms.push(format!("{coord} * {}u", strides[j]));
        }
        inner *= dims[j];
    }
    if terms.is_empty() {
        "0u".to_string()
    } else {
        terms.join(" + ")
    }
}

/// A fused program as a GEMM epilogue (`codegen::matmul`): input `product` of the program is
/// the product's value `v`, the others are read from their own bindings, from
/// `first_binding` on, at the product's output element `i`.
#[derive(Debug, Clone)]
pub struct Epilogue {
    /// Binding declarations of the other inputs.
    pub bindings: String,
    /// `fn epilogue(v: f32, i: u32) -> f32` and the op functions it calls.
    pub functions: String,
    /// What it computes, for labels: `add,gelu` (`keep,add,gelu` where it keeps the product).
    pub describe: String,
    /// Bindings it takes (the program's inputs but the product, and the kept product's).
    pub extra: usize,
}

/// The epilogue of `f` after a product giving its input `product`; `inputs` are the shapes of
/// all of the program's inputs, `out` the product's (and the program's) shape; the other inputs
/// are stored as `dtype`. With `keep` (its element type), the epilogue also stores the product's
/// value at each element it sees into a binding after the program's inputs (`kept`,
/// read_write): a product that other nodes read too, written by the epilogue's kernel
/// (`ops::matmul::MatMulEpilogue::keep`).
pub fn epilogue(
    f: &Fused,
    product: usize,
    inputs: &[&Shape],
    out: &Shape,
    first_binding: usize,
    dtype: DType,
    keep: Option<DType>,
) -> Epilogue {
    let mut bindings = String::new();
    for (slot, k) in (first_binding..).zip((0..inputs.len()).filter(|&k| k != product)) {
        let _ = writeln!(
            bindings,
            "@group(0) @binding({slot}) var<storage, read> e{k}: array<{}>;",
            f.input_dtype(k, dtype)
        );
    }
    // a kept product is stored, and the program reads it, in its own type (f16 rounds)
    let (param, store_kept) = match keep {
        Some(t) => {
            let _ = writeln!(
                bindings,
                "@group(0) @binding({}) var<storage, read_write> kept: array<{t}>;",
                first_binding + inputs.len() - 1
            );
            (
                "product",
                format!("    let v = f32({t}(product));\n    kept[i] = {t}(v);\n"),
            )
        }
        None => ("v", String::new()),
    };
    let load = |k: usize, index: &str| {
        if k == product {
            "v".to_string()
        } else {
            load_input(f, k, dtype, format!("e{k}[{index}]"))
        }
    };
    let (body, result) = program_body(f, inputs, out, &load);
    let mut functions = String::new();
    functions.push_str(&op_functions(f));
    let _ = writeln!(
        functions,
        "
// the fused elementwise ops [{}] on the product's element i (value v){}
fn epilogue({param}: f32, i: u32) -> f32 {{
{store_kept}{body}    return {result};
}}",
        f.describe(),
        if keep.is_some() {
            ", the product kept"
        } else {
            ""
        }
    );
    Epilogue {
        bindings,
        functions,
        describe: match keep {
            Some(_) => format!("keep,{}", f.describe()),
            None => f.describe(),
        },
        extra: inputs.len() - 1 + keep.is_some() as usize,
    }
}

/// `shaders/reduce.wgsl` storing each result through an epilogue (`ops::reduce::ReduceEpilogue`,
/// built by [`epilogue`] with its other inputs from binding 1): binding 0 is the f32 tensor
/// reduced (`x`), the epilogue's inputs follow, the output after them. `spec` is the plain
/// reduction's launch, which does not change.
pub fn reduce_with_epilogue(x: &Shape, spec: KernelSpec, epi: &Epilogue) -> Generated {
    let base = shader_source("reduce").expect("reduce.wgsl is registered");
    let bindings = format!(
        "@group(0) @binding(0) var<storage, read> a: array<f32>;\n{}@group(0) @binding({}) var<storage, read_write> out: array<f32>;\n",
        epi.bindings,
        1 + epi.extra
    );
    let store = format!(
        "{}\nfn store(i: u32, v: f32) {{\n    out[i] = epilogue(v, i);\n}}\n",
        epi.functions
    );
    let mut src = format!(
        "// reduce_epilogue.wgsl: generated by src/codegen/elementwise.rs from shaders/reduce.wgsl:
// the reduction of {x} (binding 0), each result then through the fused elementwise ops [{}]
// (their other inputs at bindings 1..{}) before it is stored at binding {} (f32 throughout).
//
",
        epi.describe,
        1 + epi.extra,
        1 + epi.extra
    );
    src.push_str(&replace_block(
        &replace_block(base, "bindings", &bindings),
        "store",
        &store,
    ));
    reduce_module(src, &format!("reduce,epilogue[{}]", epi.describe), spec)
}

/// `shaders/reduce.wgsl` with both a prologue and an epilogue: every input value computed by the
/// fused program `f` (its inputs `inputs` at bindings 0.., result of shape `x`), each result
/// stored through `epi` (built by [`epilogue`] with its other inputs from binding
/// `inputs.len()`), the output after them; f32 throughout. `epi_program` is the epilogue's
/// program, whose op functions the prologue's already define (WGSL takes each function once).
pub fn reduce_with_prologue_and_epilogue(
    f: &Fused,
    inputs: &[&Shape],
    x: &Shape,
    spec: KernelSpec,
    epi_program: &Fused,
    epi: &Epilogue,
) -> Generated {
    let base = shader_source("reduce").expect("reduce.wgsl is registered");
    let mut bindings = prologue_bindings(f, inputs.len(), DType::F32);
    bindings.push_str(&epi.bindings);
    let _ = writeln!(
        bindings,
        "@group(0) @binding({}) var<storage, read_write> out: array<f32>;",
        inputs.len() + epi.extra
    );
    let mut functions = op_functions(f);
    if epi_program.has_dropout() && !f.has_dropout() {
        functions.push('\n');
        functions.push_str(shared("dropout", "dropout_op"));
    }
    let epi_fn = epi
        .functions
        .strip_prefix(op_functions(epi_program).as_str())
        .expect("an epilogue's functions open with its op functions");
    functions.push_str(&load_function(f, inputs, x, DType::F32));
    let store =
        format!("{epi_fn}\nfn store(i: u32, v: f32) {{\n    out[i] = epilogue(v, i);\n}}\n");
    let describe = format!("{},epilogue[{}]", f.describe(), epi.describe);
    let mut src = format!(
        "// reduce_fused.wgsl: generated by src/codegen/elementwise.rs from shaders/reduce.wgsl: the
// reduction of the fused elementwise ops [{}] (inputs at bindings 0..{}), each result then
// through the fused elementwise ops [{}] (their other inputs at bindings {}..{}) before it is
// stored at binding {} (f32 throughout).
//
",
        f.describe(),
        inputs.len(),
        epi.describe,
        inputs.len(),
        inputs.len() + epi.extra,
        inputs.len() + epi.extra
    );
    src.push_str(enable(&[DType::F32]));
    src.push_str(&replace_block(
        &replace_block(
            &replace_block(base, "bindings", &bindings),
            "load",
            &functions,
        ),
        "store",
        &store,
    ));
    reduce_module(src, &describe, spec)
}

/// A reduction prologue's input bindings: `x0..` at 0.., stored as `dtype` (or as `f` reads
/// each).
fn prologue_bindings(f: &Fused, inputs: usize, dtype: DType) -> String {
    let mut bindings = String::new();
    for k in 0..inputs {
        let _ = writeln!(
            bindings,
            "@group(0) @binding({k}) var<storage, read> x{k}: array<{}>;",
            f.input_dtype(k, dtype)
        );
    }
    bindings
}

/// A reduction prologue's `fn load(i)`: the fused program `f` (inputs of shapes `inputs` at
/// bindings `x0..`, stored as `dtype`) at element `i` of the reduced tensor of shape `x`.
fn load_function(f: &Fused, inputs: &[&Shape], x: &Shape, dtype: DType) -> String {
    let load = |k: usize, index: &str| load_input(f, k, dtype, format!("x{k}[{index}]"));
    let (body, result) = program_body(f, inputs, x, &load);
    format!(
        "
// the fused elementwise ops [{}] at element i of the reduced tensor {x}
fn load(i: u32) -> f32 {{
{body}    return {result};
}}
",
        f.describe()
    )
}

/// A generated variant of `shaders/reduce.wgsl` (`src`), keyed by what it fuses (`describe`)
/// and the hash of its text, launched as the plain reduction (`spec`) is.
fn reduce_module(src: String, describe: &str, spec: KernelSpec) -> Generated {
    let key = format!("{describe}@{:016x}", fnv1a(src.as_bytes()));
    Generated {
        spec: KernelSpec {
            family: "reduce_fused",
            ..spec
        },
        key,
        wgsl: src.into(),
    }
}

/// Replaces the text between `// generated: begin {name}` and `// generated: end {name}`.
fn replace_block(src: &str, name: &str, with: &str) -> String {
    let begin = format!("// generated: begin {name}\n");
    let end = format!("// generated: end {name}\n");
    let a = src
        .find(&begin)
        .unwrap_or_else(|| panic!("a shader lacks the marker {begin:?}"))
        + begin.len();
    let b = a + src[a..]
        .find(&end)
        .unwrap_or_else(|| panic!("a shader lacks the marker {end:?}"));
    format!("{}{with}{}", &src[..a], &src[b..])
}

/// `shaders/reduce.wgsl` with every input value computed by the fused program `f` (inputs of
/// shapes `inputs`, result of shape `x`, the tensor reduced) instead of read: its `load` becomes
/// the program at that element, its inputs bind at 0.., the output after them. `spec` is the
/// plain reduction's launch (entry, constants, workgroups), which does not change. Every
/// binding is stored as `dtype` (a program without steps: a plain reduction of that type).
pub fn reduce_with_prologue(
    f: &Fused,
    inputs: &[&Shape],
    x: &Shape,
    spec: KernelSpec,
    dtype: DType,
) -> Generated {
    let base = shader_source("reduce").expect("reduce.wgsl is registered");
    let mut bindings = prologue_bindings(f, inputs.len(), dtype);
    let _ = writeln!(
        bindings,
        "@group(0) @binding({}) var<storage, read_write> out: array<{dtype}>;",
        inputs.len()
    );
    let mut prologue = op_functions(f);
    prologue.push_str(&load_function(f, inputs, x, dtype));
    let store = format!(
        "fn store(i: u32, v: f32) {{\n    out[i] = {};\n}}\n",
        narrow(dtype, "v")
    );
    let mut src = format!(
        "// reduce_fused.wgsl: generated by src/codegen/elementwise.rs from shaders/reduce.wgsl: the
// reduction of the fused elementwise ops [{}]; bindings 0..{} are the program's inputs, {} the
// output, stored as {dtype} (computed in f32).
//
",
        f.describe(),
        inputs.len(),
        inputs.len()
    );
    // `enable` must precede the module's declarations
    src.push_str(enable(&[dtype]));
    src.push_str(&replace_block(
        &replace_block(
            &replace_block(base, "bindings", &bindings),
            "load",
            &prologue,
        ),
        "store",
        &store,
    ));
    reduce_module(src, &f.describe(), spec)
}
