//! f16 variants of hand-written kernels. A shader family whose global reads and writes all go
//! through `ld_<name>(i) -> f32` / `st_<name>(i, v: f32)` functions, declared with its bindings
//! between `// generated: begin storage` and `// generated: end storage` (conv, pool, resize, index, softmax,
//! dropout, layout, loss, embedding, lstm, gru, norm,
//! attention), gets its f16 variant here: the same file with
//! that block rewritten so every binding is `array<f16>`, loads widen to f32 and stores round to
//! f16, and `enable f16;` in front. A declaration marked `// always f32` (dropout's seed, class
//! labels, indices, sequence lengths, normalization statistics and parameters) is kept as it is,
//! and so is one the plan compiler binds to an f32 tensor whose cast to f16 it folded in, and the
//! results where it folded in their cast to f32 ([`f16_wgsl_with`]: each element rounded to f16
//! on load or before it is stored, the value the cast held). The kernels' arithmetic is
//! untouched: f16 tensors compute in f32.

use super::Generated;
use crate::ops::{shader_source, KernelSpec};

/// The f16 family name of a family with a storage block, or `None` for the others.
pub fn f16_family(family: &str) -> Option<&'static str> {
    match family {
        "conv" => Some("conv_f16"),
        "pool" => Some("pool_f16"),
        "resize" => Some("resize_f16"),
        "index" => Some("index_f16"),
        "softmax" => Some("softmax_f16"),
        "dropout" => Some("dropout_f16"),
        "layout" => Some("layout_f16"),
        "loss" => Some("loss_f16"),
        "embedding" => Some("embedding_f16"),
        "lstm" => Some("lstm_f16"),
        "gru" => Some("gru_f16"),
        "norm" => Some("norm_f16"),
        "attention" => Some("attention_f16"),
        _ => None,
    }
}

/// The f16 variant of `family`'s WGSL. Panics where the family has no storage block (a bug:
/// [`f16_family`] names the ones that have).
pub fn f16_wgsl(family: &str) -> String {
    f16_wgsl_with(family, &[], false)
}

/// [`f16_wgsl`] with the bindings named in `rounded` stored as f32 and rounded to f16 on load
/// (`ld_<name>` gives `f32(f16(x))`: where the plan compiler folded a cast of an f32 tensor
/// into the kernel, `Op::rounded_f16_inputs`), and with `f32_results` every result (each
/// `read_write` binding not marked `// always f32`) stored as f32, rounded to f16 first
/// (`st_<name>` stores `f32(f16(v))`: where the plan compiler folded the cast of the result to
/// f32 into the kernel, `exec::lower::casts_into_producers`).
pub fn f16_wgsl_with(family: &str, rounded: &[&str], f32_results: bool) -> String {
    let src = shader_source(family).expect("a registered shader family");
    let begin = "// generated: begin storage\n";
    let end = "// generated: end storage\n";
    let a = src
        .find(begin)
        .unwrap_or_else(|| panic!("shaders/{family}.wgsl has no storage block"))
        + begin.len();
    let b = a + src[a..].find(end).expect("the storage block ends");
    let mut block = String::new();
    // the element type each declared binding keeps (f32: `always f32`, rounded or wide)
    let mut stored_f32: Vec<&str> = Vec::new();
    for line in src[a..b].lines() {
        // `fn st_<name>_f32(..)`: a store at f32 precision (statistics past a result), which
        // an f16 binding rounds
        if let Some(rest) = line.strip_prefix("fn st_") {
            if let Some((name, _)) = rest.split_once("_f32(") {
                let v = if stored_f32.contains(&name) {
                    "v"
                } else {
                    "f16(v)"
                };
                block.push_str(&format!(
                    "fn st_{name}_f32(i: u32, v: f32) {{ {name}[i] = {v}; }}\n"
                ));
            }
            continue;
        }
        // `@group(0) @binding(k) var<storage, ACCESS> NAME: array<f32>;`
        if line.starts_with("@group") && line.ends_with("// always f32") {
            if let Some(name) = line
                .split(": array<f32>")
                .next()
                .and_then(|d| d.rsplit(' ').next())
            {
                stored_f32.push(name);
            }
            block.push_str(line);
            block.push('\n');
        } else if let Some(decl) = line.strip_suffix(": array<f32>;") {
            let name = decl
                .rsplit(' ')
                .next()
                .expect("a declaration names its variable");
            if rounded.contains(&name) {
                assert!(
                    !decl.contains("read_write"),
                    "{name}: only inputs are rounded"
                );
                block.push_str(line);
                block.push_str(" // f32, rounded to f16 on load (a folded cast)\n");
                block.push_str(&format!(
                    "fn ld_{name}(i: u32) -> f32 {{ return f32(f16({name}[i])); }}\n"
                ));
                continue;
            }
            if f32_results && decl.contains("read_write") {
                stored_f32.push(name);
                block.push_str(line);
                block.push_str(" // f32, rounded to f16 before it is stored (a folded cast)\n");
                block.push_str(&format!(
                    "fn ld_{name}(i: u32) -> f32 {{ return {name}[i]; }}\n"
                ));
                block.push_str(&format!(
                    "fn st_{name}(i: u32, v: f32) {{ {name}[i] = f32(f16(v)); }}\n"
                ));
                continue;
            }
            block.push_str(decl);
            block.push_str(": array<f16>;\n");
            block.push_str(&format!(
                "fn ld_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}\n"
            ));
            if decl.contains("read_write") {
                block.push_str(&format!(
                    "fn st_{name}(i: u32, v: f32) {{ {name}[i] = f16(v); }}\n"
                ));
            }
        }
    }
    // the header comment stays first; `enable` must precede every declaration
    let first_decl = src
        .find("\noverride ")
        .or_else(|| src.find("\nconst "))
        .map_or(0, |i| i + 1);
    format!(
        "{}enable f16;\n\n{}{block}{}",
        &src[..first_decl],
        &src[first_decl..a],
        &src[b..]
    )
}

/// `spec` (a kernel of a family with a storage block) as its f16 variant, the bindings named in
/// `rounded` read as f32 and rounded on load, and with `f32_results` its results stored as
/// f32 ([`f16_wgsl_with`]).
pub fn f16_kernel(spec: KernelSpec, rounded: &[&str], f32_results: bool) -> Generated {
    let family = f16_family(spec.family)
        .unwrap_or_else(|| panic!("shaders/{}.wgsl has no f16 variant", spec.family));
    let wgsl = f16_wgsl_with(spec.family, rounded, f32_results);
    let mut key = match rounded {
        [] => "f16".to_string(),
        names => format!("f16,round[{}]", names.join(",")),
    };
    if f32_results {
        key.push_str(",f32out");
    }
    Generated {
        spec: KernelSpec { family, ..spec },
        key,
        wgsl: wgsl.into(),
    }
}
