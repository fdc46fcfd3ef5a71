//! Every shaders/*.wgsl file parses and validates with naga, and opens with its header comment;
//! so do sweeps of every generator's output (GEMM configurations, fused elementwise programs).
//! Needs no GPU.

/// Parses and validates `src` with naga (every capability on), naming `what` on failure.
fn validate_wgsl(what: &str, src: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{what}: {}\n{src}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    module
}

#[test]
fn every_shader_is_valid_wgsl() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("shaders/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let src = std::fs::read_to_string(&path).expect("readable");
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("utf-8 name");
        assert!(
            src.starts_with(&format!("// {stem}.wgsl")),
            "{stem}.wgsl must open with a header comment naming the file"
        );
        assert!(
            src.contains("Bindings"),
            "{stem}.wgsl: the header must table its bindings"
        );
        assert!(
            src.contains("Dispatch"),
            "{stem}.wgsl: the header must state its dispatch geometry"
        );
        validate_wgsl(&format!("{stem}.wgsl"), &src);
        // the engine compiles the same text it finds here
        assert_eq!(
            kiln::ops::shader_source(stem),
            Some(src.as_str()),
            "{stem}.wgsl is not registered in ops::SHADERS"
        );
        count += 1;
    }
    assert_eq!(
        count,
        kiln::ops::SHADERS.len(),
        "every registered shader has a file"
    );
}

/// Every generated GEMM configuration `choose` can pick (and each layout: transposes, vec4 or
/// scalar access, epilogues, split-K partials) validates with naga.
#[test]
fn every_generated_matmul_is_valid_wgsl() {
    use kiln::codegen::matmul::{wgsl, GemmConfig, Layout, TILINGS};
    use kiln::ops::matmul::{Bias, OperandRows};
    let validate = |what: &str, src: &str| {
        assert!(src.starts_with("// matmul_gen.wgsl"), "{what}: header");
        assert!(
            src.contains("Bindings") && src.contains("Dispatch"),
            "{what}: header tables"
        );
        validate_wgsl(what, src);
    };
    let geom = kiln::ops::conv::ColGeometry {
        channels: 3,
        image: (7, 9),
        kernel: (3, 2),
        opts: kiln::ops::conv::Conv2dOpts {
            stride: (2, 1),
            padding: (1, 0),
            dilation: (1, 2),
        },
    };
    let mut count = 0;
    for &(bm, bn, tm, tn) in TILINGS {
        // 8 deep: plain; 16 deep: plain, register prefetch, and prefetch into a second buffer
        let variants = [
            (8, false, false),
            (16, false, false),
            (16, true, false),
            (16, true, true),
        ];
        for (bk, prefetch, double_buffer) in variants {
            let cfg = GemmConfig {
                bm,
                bn,
                bk,
                tm,
                tn,
                split: 1,
                prefetch,
                double_buffer,
            };
            for bits in 0..32u32 {
                let bit = |i: u32| bits & (1 << i) != 0;
                let partial = bit(4) && bit(3);
                let nchw = !bit(4) && bits % 7 == 3;
                // every fifth scalar-b layout reads b as an image (implicit-GEMM conv)
                let im2col = (!bit(3) && bits % 5 == 0).then_some(geom);
                let lay = Layout {
                    trans_a: bit(0),
                    trans_b: bit(1),
                    vec_a: bit(2),
                    vec_b: bit(3),
                    vec_out: bit(4),
                    bias: if partial {
                        Bias::None
                    } else {
                        [Bias::None, Bias::Rows, Bias::Cols][(bits % 3) as usize]
                    },
                    relu: !partial && bit(2),
                    partial,
                    im2col,
                    dgrad: None,
                    // some store the result as an NCHW image
                    nchw: nchw.then_some(9),
                    // bias gradients' row sums beside products without a bias, stored [M, N]
                    row_sums: bits % 3 == 0 && !nchw,
                    storage: kiln::DType::F32.into(),
                    // operands read through a dropout (not an image read as its columns)
                    drop_a: bits % 4 == 2 || bits % 9 == 0,
                    drop_b: bits % 3 == 1 && im2col.is_none(),
                    // operands read from rows of a larger tensor, vec4-aligned or not, some
                    // with their leading axes swapped
                    rows_a: (bits % 5 == 1).then_some(OperandRows {
                        ld: if bit(2) { 132 } else { 131 },
                        offset: if bit(2) { 4 } else { 3 },
                        swap: bit(4).then_some((7, 9)),
                    }),
                    rows_b: (bits % 6 == 2 && im2col.is_none()).then_some(OperandRows {
                        ld: if bit(3) { 68 } else { 67 },
                        offset: if bit(3) { 64 } else { 1 },
                        swap: bit(1).then_some((5, 3)),
                    }),
                };
                // f16 storage where the layout allows it (not split-K partial sums); some with
                // f32 operands read rounded (folded casts of parameters)
                let half = kiln::DType::F16;
                let lay = match lay.partial {
                    false if bits % 2 == 1 => Layout {
                        storage: kiln::codegen::Storage {
                            a: if bits % 4 == 1 {
                                kiln::DType::F32
                            } else {
                                half
                            },
                            b: if bits % 8 == 3 {
                                kiln::DType::F32
                            } else {
                                half
                            },
                            bias: if bits % 3 == 1 {
                                kiln::DType::F32
                            } else {
                                half
                            },
                            out: half,
                        },
                        ..lay
                    },
                    _ => lay,
                };
                validate(&format!("{} {lay:?}", cfg.describe()), &wgsl(&cfg, &lay));
                count += 1;
            }
        }
    }
    // the implicit input gradient of every tiling
    for &(bm, bn, tm, tn) in TILINGS {
        let cfg = GemmConfig {
            bm,
            bn,
            bk: 16,
            tm,
            tn,
            split: 1,
            prefetch: bm == bn,
            double_buffer: bm == bn && bm <= 32,
        };
        let d = kiln::ops::conv::ImplicitDgrad {
            geom,
            bias: false,
            relu: false,
        }
        .dims(
            &kiln::Shape(vec![5, geom.rows()]),
            &kiln::Shape(vec![2, 3, 7, 9]),
        );
        // f16 storage on every other tiling
        let dtype = [kiln::DType::F32, kiln::DType::F16][count % 2];
        let src = &*kiln::codegen::matmul::dgrad_kernel(geom, &d, &cfg, dtype).wgsl;
        validate(&format!("dgrad {}", cfg.describe()), src);
        count += 1;
    }
    assert!(count >= 500);
}

/// Generated fused elementwise kernels validate with naga: every unary op (scalar operands
/// included, awkward ones too), every binary op, broadcasting inputs of every kind, a shared
/// input, and the most inputs a fused kernel takes.
#[test]
fn every_generated_fused_kernel_is_valid_wgsl() {
    use kiln::codegen::elementwise::{kernel, kernel_from, MAX_INPUTS};
    use kiln::ops::binary::BinaryOp;
    use kiln::ops::fused::{Fused, GatheredRead, Operand, Step, StepOp};
    use kiln::ops::unary::UnaryOp;
    use kiln::tensor::Shape;
    let validate = |what: &str, f: &Fused, inputs: &[&[usize]], out: &[usize]| {
        let shapes: Vec<Shape> = inputs.iter().map(|d| Shape(d.to_vec())).collect();
        let refs: Vec<&Shape> = shapes.iter().collect();
        // f16 storage too: the same program with f16 loads and stores
        let half = kernel(f, &refs, &Shape(out.to_vec()), kiln::DType::F16);
        validate_wgsl(&format!("{what} (f16)"), &half.wgsl);
        let g = kernel(f, &refs, &Shape(out.to_vec()), kiln::DType::F32);
        let src: &str = &g.wgsl;
        assert!(src.starts_with("// fused.wgsl"), "{what}: header");
        assert!(
            src.contains("Bindings") && src.contains("Dispatch"),
            "{what}: header tables"
        );
        assert!(
            g.key.starts_with(&f.describe()),
            "{what}: the key {} names the ops",
            g.key
        );
        validate_wgsl(what, src);
    };
    let step = |op: StepOp, args: &[Operand], shape: &[usize]| Step {
        op,
        args: args.to_vec(),
        shape: Shape(shape.to_vec()),
    };
    use Operand::{Input as I, Step as S};

    // every unary op after a binary one, so that each program has two steps
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Relu,
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Gelu,
        UnaryOp::AddScalar(0.5),
        UnaryOp::MulScalar(-1e-7),
        UnaryOp::RSubScalar(3.0e38),
        UnaryOp::DivScalar(1e-40),
        UnaryOp::RDivScalar(-0.0),
        UnaryOp::PowScalar(1.0 / 3.0),
        UnaryOp::Abs,
        UnaryOp::Square,
        UnaryOp::Sign,
        UnaryOp::Softplus,
        UnaryOp::Silu,
        UnaryOp::LeakyRelu(0.01),
        UnaryOp::Elu(1.0),
        UnaryOp::Clamp(-1.0, 6.0),
        UnaryOp::Hardtanh(0.0, 6.0),
        UnaryOp::Hardsigmoid,
        UnaryOp::Hardswish,
        UnaryOp::Mish,
        UnaryOp::LeakyReluDeriv(0.2),
        UnaryOp::EluDeriv(1.0),
        UnaryOp::ClampMask(-1.0, 1.0),
        UnaryOp::HardtanhMask(-3.0, 3.0),
        UnaryOp::HardswishDeriv,
        UnaryOp::MishDeriv,
        UnaryOp::Detach,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Rsqrt,
        UnaryOp::Log1p,
        UnaryOp::Expm1,
        UnaryOp::Floor,
        UnaryOp::Ceil,
        UnaryOp::Round,
        UnaryOp::Trunc,
        UnaryOp::GeluTanh,
        UnaryOp::GeluTanhDeriv,
        UnaryOp::LogSigmoid,
        UnaryOp::Erf,
        UnaryOp::Softsign,
        UnaryOp::IsNan,
        UnaryOp::IsInf,
    ];
    for u in unary {
        let f = Fused {
            steps: vec![
                step(StepOp::Binary(BinaryOp::Add), &[I(0), I(1)], &[7, 3]),
                step(StepOp::Unary(u), &[S(0)], &[7, 3]),
            ],
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        };
        validate(&format!("{u:?}"), &f, &[&[7, 3], &[7, 3]], &[7, 3]);
    }
    let binary = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::GreaterEqual,
        BinaryOp::Equal,
        BinaryOp::ReluGrad,
        BinaryOp::SigmoidGrad,
        BinaryOp::TanhGrad,
        BinaryOp::GeluGrad,
        BinaryOp::KeepWhere,
    ];
    // broadcasts: bias [N] over [M, N], a column [M, 1], a scalar [1], rank 6 with 1-extents
    let layouts: [(&[usize], &[usize], &[usize]); 5] = [
        (&[5, 11], &[11], &[5, 11]),
        (&[5, 11], &[5, 1], &[5, 11]),
        (&[1], &[13], &[13]),
        (&[2, 1, 3, 1, 5, 2], &[3, 1, 1], &[2, 1, 3, 1, 5, 2]),
        (&[4, 1], &[1, 6], &[4, 6]),
    ];
    for (k, b) in binary.into_iter().enumerate() {
        let (sa, sb, out) = layouts[k % layouts.len()];
        let f = Fused {
            steps: vec![
                step(StepOp::Binary(b), &[I(0), I(1)], out),
                step(StepOp::Unary(UnaryOp::Relu), &[S(0)], out),
            ],
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        };
        validate(&format!("{b:?} {sa:?} {sb:?}"), &f, &[sa, sb], out);
    }
    // dropout between two ops, its seed a broadcast [1]
    let drop = kiln::ops::dropout::Dropout { p: 0.25, salt: 9 };
    let f = Fused {
        steps: vec![
            step(StepOp::Unary(UnaryOp::Relu), &[I(0)], &[4, 6]),
            step(StepOp::Dropout(drop), &[S(0), I(1)], &[4, 6]),
            step(StepOp::Binary(BinaryOp::Add), &[S(1), I(2)], &[4, 6]),
        ],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    validate("dropout", &f, &[&[4, 6], &[1], &[4, 6]], &[4, 6]);
    // a shared input (x * x + x), then the most inputs one kernel takes, each broadcast its own way
    let f = Fused {
        steps: vec![
            step(StepOp::Binary(BinaryOp::Mul), &[I(0), I(0)], &[9]),
            step(StepOp::Binary(BinaryOp::Add), &[S(0), I(0)], &[9]),
        ],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    validate("x * x + x", &f, &[&[9]], &[9]);
    let mut steps = vec![step(
        StepOp::Binary(BinaryOp::Add),
        &[I(0), I(1)],
        &[3, 4, 5],
    )];
    for k in 2..MAX_INPUTS {
        steps.push(step(
            StepOp::Binary(BinaryOp::Mul),
            &[S(k - 2), I(k)],
            &[3, 4, 5],
        ));
    }
    let ins: [&[usize]; MAX_INPUTS] = [
        &[3, 4, 5],
        &[5],
        &[4, 1],
        &[3, 1, 1],
        &[1],
        &[3, 4, 5],
        &[1, 4, 5],
    ];
    validate(
        "seven inputs",
        &Fused {
            steps,
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        },
        &ins,
        &[3, 4, 5],
    );
    // folded lookups: token rows (3, 5, 13) and position rows (5, 13) broadcast over the batch,
    // a bias; and a lookup of one row from a one-row table; f32 tables stored as f16 results
    let lookup = |input: usize, indices: usize, rows: usize, shape: &[usize]| GatheredRead {
        input,
        indices,
        rows,
        width: *shape.last().unwrap(),
        shape: Shape(shape.to_vec()),
    };
    let f = Fused {
        steps: vec![
            step(StepOp::Binary(BinaryOp::Add), &[I(0), I(1)], &[3, 5, 13]),
            step(StepOp::Binary(BinaryOp::Add), &[S(0), I(2)], &[3, 5, 13]),
        ],
        permuted: Vec::new(),
        gathered: vec![lookup(0, 3, 7, &[3, 5, 13]), lookup(1, 4, 5, &[5, 13])],
        rounded: Vec::new(),
    };
    let ins: [&[usize]; 5] = [&[7, 13], &[5, 13], &[13], &[3, 5], &[5]];
    validate("token and position lookups", &f, &ins, &[3, 5, 13]);
    let shapes: Vec<Shape> = ins.iter().map(|d| Shape(d.to_vec())).collect();
    let refs: Vec<&Shape> = shapes.iter().collect();
    let out = Shape(vec![3, 5, 13]);
    let mixed = kernel_from(&f, &refs, &out, kiln::DType::F32, kiln::DType::F16);
    validate_wgsl("lookups stored as f16", &mixed.wgsl);
    let f = Fused {
        steps: vec![step(StepOp::Unary(UnaryOp::Relu), &[I(0)], &[1, 4])],
        permuted: Vec::new(),
        gathered: vec![lookup(0, 1, 1, &[1, 4])],
        rounded: Vec::new(),
    };
    validate("a one-row table", &f, &[&[1, 4], &[1]], &[1, 4]);
    // folded casts: f32 inputs rounded to f16 on load beside f16 ones (a broadcast bias, one
    // read through a transpose), stored as f16 and as f32; and a program of rounded inputs alone
    let f = Fused {
        steps: vec![
            step(StepOp::Binary(BinaryOp::Mul), &[I(0), I(1)], &[6, 4]),
            step(StepOp::Binary(BinaryOp::Add), &[S(0), I(2)], &[6, 4]),
        ],
        permuted: vec![kiln::ops::fused::PermutedRead {
            input: 1,
            in_dims: vec![4, 6],
            perm: vec![1, 0],
            shape: Shape(vec![6, 4]),
        }],
        gathered: Vec::new(),
        rounded: vec![1, 2],
    };
    let shapes = [Shape(vec![6, 4]), Shape(vec![4, 6]), Shape(vec![4])];
    let refs: Vec<&Shape> = shapes.iter().collect();
    let out = Shape(vec![6, 4]);
    for to in [kiln::DType::F16, kiln::DType::F32] {
        let k = kernel_from(&f, &refs, &out, kiln::DType::F16, to);
        assert!(k.wgsl.contains("f32(f16(x2["), "{}", k.wgsl);
        validate_wgsl(&format!("rounded inputs stored as {to:?}"), &k.wgsl);
    }
    let f = Fused {
        steps: vec![step(StepOp::Unary(UnaryOp::Relu), &[I(0)], &[5])],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: vec![0],
    };
    let five = Shape(vec![5]);
    let k = kernel_from(&f, &[&five], &five, kiln::DType::F16, kiln::DType::F32);
    validate_wgsl("a rounded input alone", &k.wgsl);
}

/// Every well-formed configuration of the tensor-core kernel, whatever memory it needs.
fn every_coop_config() -> Vec<kiln::codegen::coop::CoopConfig> {
    let roomy = kiln::codegen::Target {
        workgroup_storage: 1 << 20,
        ..kiln::codegen::Target::discrete()
    };
    let all = kiln::codegen::coop::CoopConfig::all(&roomy);
    assert_eq!(all.len(), 24, "128/256 wide x bk 32/64 x pad x plain/pf/db");
    all
}

/// The tensor-core GEMM (cooperative matrices) validates with naga for every transpose and
/// epilogue, and as implicit-GEMM convolutions (forward with NCHW store, weight gradient, input
/// gradient), in f32 and f16, in every configuration; so does its emulated form. (Running the
/// real one needs an adapter with EXPERIMENTAL_COOPERATIVE_MATRIX.)
#[test]
fn every_coop_matmul_is_valid_wgsl() {
    use kiln::codegen::coop::{CoopConfig, Cores, Operands};
    use kiln::ops::conv::{ColGeometry, Conv2dOpts};
    use kiln::ops::matmul::{Bias, MatMul};
    let geom = ColGeometry {
        channels: 5,
        image: (9, 11),
        kernel: (3, 3),
        opts: Conv2dOpts {
            stride: (2, 1),
            padding: (1, 1),
            dilation: (1, 2),
        },
    };
    let mut cases = Vec::new();
    for bits in 0..16u32 {
        let mm = MatMul {
            trans_a: bits & 1 != 0,
            trans_b: bits & 2 != 0,
            bias: [Bias::None, Bias::Rows, Bias::Cols][(bits % 3) as usize],
            relu: bits & 4 != 0,
            ..Default::default()
        };
        let dtype = [kiln::DType::F32, kiln::DType::F16][(bits / 8) as usize];
        cases.push((mm, dtype, Operands::Matrices));
        if !mm.trans_a {
            // forward (b = image) and weight gradient (b = image, transposed)
            let nchw = (!mm.trans_b).then_some(geom.out_hw().0 * geom.out_hw().1);
            cases.push((mm, dtype, Operands::Im2col { geom, nchw }));
        }
    }
    for dtype in [kiln::DType::F32, kiln::DType::F16] {
        let dgrad = MatMul {
            trans_a: true,
            ..Default::default()
        };
        cases.push((dgrad, dtype, Operands::Dgrad(geom)));
    }
    let mut cases: Vec<(MatMul, kiln::codegen::Storage, Operands)> = cases
        .into_iter()
        .map(|(mm, d, o)| (mm, d.into(), o))
        .collect();
    // an f16 product reading an f32 weight and bias (folded casts)
    let mixed = kiln::codegen::Storage {
        a: kiln::DType::F32,
        bias: kiln::DType::F32,
        ..kiln::DType::F16.into()
    };
    let biased = MatMul {
        bias: Bias::Rows,
        ..Default::default()
    };
    cases.push((biased, mixed, Operands::Matrices));
    cases.push((
        biased,
        mixed,
        Operands::Im2col {
            geom,
            nchw: Some(15),
        },
    ));
    for (mm, dtype, operands) in cases {
        let generate = |cores, vec, cfg| {
            kiln::codegen::coop::wgsl_with(&mm, dtype, operands, cores, None, vec, cfg)
        };
        // the emulated form (tests/tensor_cores.rs runs it) is the same kernel but for the
        // matrix operations
        // vec4 staging loads where the operands are read as matrices (the tests' products are
        // too small to check the real kernel's vec4 path: it is the emulated one's too)
        let vec = [
            !matches!(operands, Operands::Dgrad(_)),
            operands == Operands::Matrices,
        ];
        // each configuration with one of the staging variants, in turn (the scalar one below)
        let variants = [vec, [vec[0], false], [false, vec[1]]];
        for (i, cfg) in every_coop_config().into_iter().enumerate() {
            let v = variants[i % 3];
            let src = generate(Cores::Tensor, v, cfg);
            assert_eq!(src.contains("vec4<f16>(a["), v[0]);
            assert_eq!(src.contains("vec4<f16>(b["), v[1]);
            validate_wgsl(
                &format!("{mm:?} {dtype:?} {operands:?} vec {v:?} {}", cfg.describe()),
                &src,
            );
        }
        for cfg in every_coop_config() {
            let emulated = generate(Cores::Emulated, [false; 2], cfg);
            assert!(!emulated.contains("coop_mat16x16") && !emulated.contains("enable wgpu_coop"));
            validate_wgsl(
                &format!("emulated {mm:?} {dtype:?} {operands:?} {}", cfg.describe()),
                &emulated,
            );
            let src = generate(Cores::Tensor, [false; 2], cfg);
            // every line of the real kernel missing from the emulated one is a matrix operation
            // (or an unrolled offset)
            let emulated_lines: std::collections::HashSet<&str> =
                emulated.lines().map(str::trim).collect();
            for line in src.lines().filter(|l| !emulated_lines.contains(l.trim())) {
                assert!(
                    line.contains("coop")
                        || line.contains("@builtin(subgroup_")
                        // the emulation reads its accumulators without the staging tile
                        || line.contains("Cs")
                        || line.contains("let cs = ")
                        || line.contains("16x16 f32 tile per subgroup")
                        || line.trim_start().starts_with("let ia")
                        || line.trim_start().starts_with("let ib")
                        // the epilogue is a loop over the accumulators there, not unrolled
                        || line.trim_start().starts_with("let row = ")
                        || line.trim_start().starts_with("let col = "),
                    "{mm:?} {}: the emulated kernel lacks {line:?}",
                    cfg.describe()
                );
            }
        }
        let src = generate(Cores::Tensor, [false; 2], CoopConfig::PLAIN);
        assert!(src.starts_with("// matmul_coop.wgsl"));
        assert!(src.contains("Bindings") && src.contains("Dispatch"));
        let module = validate_wgsl(&format!("{mm:?} {dtype:?} {operands:?}"), &src);
        // and it translates to SPIR-V, the form the Vulkan driver gets
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap();
        let (module, info) = naga::back::pipeline_constants::process_overrides(
            &module,
            &info,
            None,
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{mm:?}: overrides: {e}"));
        naga::back::spv::write_vec(&module, &info, &Default::default(), None)
            .unwrap_or_else(|e| panic!("{mm:?}: SPIR-V: {e}"));
    }
}

/// A generated GEMM with a fused elementwise epilogue (broadcast input, unary after binary)
/// validates with naga, with vec4 and scalar stores, with and without a bias; so does the
/// tensor-core GEMM with it.
#[test]
fn generated_matmul_with_an_epilogue_is_valid_wgsl() {
    use kiln::codegen::coop::Cores;
    use kiln::codegen::elementwise::epilogue;
    use kiln::codegen::matmul::{wgsl_with, GemmConfig, Layout};
    use kiln::ops::binary::BinaryOp;
    use kiln::ops::fused::{Fused, Operand, Step, StepOp};
    use kiln::ops::matmul::{Bias, OperandRows};
    use kiln::ops::unary::UnaryOp;
    use kiln::Shape;
    let out = Shape(vec![12, 20]);
    let program = Fused {
        steps: vec![
            Step {
                op: StepOp::Binary(BinaryOp::Add),
                args: vec![Operand::Input(1), Operand::Input(0)],
                shape: out.clone(),
            },
            Step {
                op: StepOp::Unary(UnaryOp::Gelu),
                args: vec![Operand::Step(0)],
                shape: out.clone(),
            },
        ],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    let row = Shape(vec![20]);
    let cfg = GemmConfig::parse("64x64x16/4x4").unwrap();
    for (vec_out, bias, dtype, nchw) in [
        (true, Bias::None, kiln::DType::F32, None),
        (false, Bias::Rows, kiln::DType::F32, None),
        (true, Bias::Cols, kiln::DType::F16, None),
        (false, Bias::None, kiln::DType::F16, None),
        // stored transposed (`MatMulEpilogue::transposed_store`), the epilogue there
        (false, Bias::None, kiln::DType::F32, Some(5)),
        (false, Bias::Rows, kiln::DType::F16, Some(1)),
    ] {
        // a reads through a dropout where the result is vec4: its seed binds after the bias
        let first = if bias == Bias::None { 2 } else { 3 } + vec_out as usize;
        // the product kept too where it is stored in place (`MatMulEpilogue::keep`)
        let keep = nchw.is_none().then_some(dtype);
        let epi = epilogue(&program, 1, &[&row, &out], &out, first, dtype, keep);
        let lay = Layout {
            trans_a: false,
            trans_b: true,
            vec_a: true,
            vec_b: true,
            vec_out,
            bias,
            relu: true,
            partial: false,
            im2col: None,
            dgrad: None,
            nchw,
            row_sums: false,
            storage: dtype.into(),
            drop_a: vec_out,
            drop_b: false,
            rows_a: None,
            rows_b: (!vec_out).then_some(OperandRows {
                ld: 96,
                offset: 8,
                swap: None,
            }),
        };
        let src = wgsl_with(&cfg, &lay, Some(&epi));
        validate_wgsl(
            &format!("epilogue, vec_out={vec_out}, {bias:?}, {nchw:?}"),
            &src,
        );
        let ops = if keep.is_some() {
            "keep,add,gelu"
        } else {
            "add,gelu"
        };
        assert!(src.contains(&format!("Epilogue: the fused elementwise ops [{ops}]")));
        assert_eq!(
            src.contains("epilogue(y.x, nchw_index(r, c))"),
            nchw.is_some()
        );
        // the kept product binds after the epilogue's input, the output after it
        assert_eq!(
            src.contains(&format!(
                "@binding({}) var<storage, read_write> kept: array<{dtype}>",
                first + 1
            )),
            keep.is_some()
        );
        assert_eq!(
            src.contains(&format!("kept[i] = {dtype}(v);")),
            keep.is_some()
        );
        // the tensor-core kernel takes the same epilogue (and its emulated form; no dropout)
        let first = if bias == Bias::None { 2 } else { 3 };
        let epi = epilogue(&program, 1, &[&row, &out], &out, first, dtype, keep);
        let mm = kiln::ops::matmul::MatMul {
            trans_a: false,
            trans_b: true,
            bias,
            relu: true,
            ..Default::default()
        };
        for cores in [Cores::Tensor, Cores::Emulated] {
            let src = kiln::codegen::coop::wgsl_with(
                &mm,
                dtype,
                kiln::codegen::coop::Operands::Matrices,
                cores,
                Some(&epi),
                [true; 2],
                kiln::codegen::coop::CoopConfig {
                    bk: 64,
                    pad: true,
                    prefetch: true,
                    double_buffer: false,
                    wide: true,
                },
            );
            validate_wgsl(
                &format!("coop epilogue, {bias:?} {dtype:?} {cores:?}"),
                &src,
            );
            assert!(src.contains(&format!("Epilogue: the fused elementwise ops [{ops}]")));
            assert!(src.contains("v = epilogue(v, o);"));
        }
    }
}

/// The skinny-product (GEMV) kernel validates with naga for every row count, transpose and
/// epilogue.
#[test]
fn every_gemv_is_valid_wgsl() {
    use kiln::codegen::matmul::{gemv_wgsl, GEMV_MAX_ROWS};
    use kiln::ops::matmul::{Bias, MatMul};
    for rows in 1..=GEMV_MAX_ROWS {
        for bits in 0..8u32 {
            let mm = MatMul {
                trans_a: bits & 1 != 0,
                trans_b: bits & 2 != 0,
                bias: [Bias::None, Bias::Rows, Bias::Cols][(bits + rows as u32) as usize % 3],
                relu: bits & 4 != 0,
                ..Default::default()
            };
            // f32, f16, and f16 reading an f32 weight (a folded cast)
            let storage = match bits % 3 {
                0 => kiln::DType::F32.into(),
                1 => kiln::DType::F16.into(),
                _ => kiln::codegen::Storage {
                    b: kiln::DType::F32,
                    ..kiln::DType::F16.into()
                },
            };
            let src = gemv_wgsl(&mm, rows, None, storage);
            assert!(src.starts_with("// matmul_gemv.wgsl"));
            assert!(src.contains("Bindings") && src.contains("Dispatch"));
            validate_wgsl(&format!("{rows} {mm:?}"), &src);
        }
    }
}

/// Reductions with a fused prologue (reduce.wgsl with its `load` generated) validate with naga.
#[test]
fn reductions_with_prologues_are_valid_wgsl() {
    use kiln::codegen::elementwise::{epilogue, reduce_with_epilogue, reduce_with_prologue};
    use kiln::ops::binary::BinaryOp;
    use kiln::ops::fused::{Fused, Operand, Step, StepOp};
    use kiln::ops::reduce::{Reduce, ReduceKind};
    use kiln::ops::unary::UnaryOp;
    use kiln::Shape;
    let x = Shape(vec![5, 70, 3]);
    let program = Fused {
        steps: vec![
            Step {
                op: StepOp::Binary(BinaryOp::Sub),
                args: vec![Operand::Input(0), Operand::Input(1)],
                shape: x.clone(),
            },
            Step {
                op: StepOp::Unary(UnaryOp::Square),
                args: vec![Operand::Step(0)],
                shape: x.clone(),
            },
        ],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    let col = Shape(vec![5, 1, 3]);
    for (axis, kind) in [
        (0, ReduceKind::Sum),
        (1, ReduceKind::Mean),
        (2, ReduceKind::Max),
    ] {
        let r = Reduce {
            kind,
            axis,
            keepdim: false,
        };
        for dtype in [kiln::DType::F32, kiln::DType::F16] {
            let g = reduce_with_prologue(&program, &[&x, &col], &x, r.kernel(&x), dtype);
            let src = &*g.wgsl;
            assert!(src.starts_with("// reduce_fused.wgsl"));
            validate_wgsl(&format!("{kind:?} over axis {axis}, {dtype}"), src);
        }
        // a plain f16 reduction: the program without steps
        let plain = Fused::identity();
        let g = reduce_with_prologue(&plain, &[&x], &x, r.kernel(&x), kiln::DType::F16);
        validate_wgsl(&format!("plain f16 {kind:?}"), &g.wgsl);
        // each result through `sqrt(v) * w + 1` before its store, w broadcast over the
        // result's first axis
        let out = r.infer(&x).unwrap();
        let w = Shape(vec![*out.dims().last().unwrap()]);
        let epi_program = Fused {
            steps: vec![
                Step {
                    op: StepOp::Unary(UnaryOp::Sqrt),
                    args: vec![Operand::Input(1)],
                    shape: out.clone(),
                },
                Step {
                    op: StepOp::Binary(BinaryOp::Mul),
                    args: vec![Operand::Step(0), Operand::Input(0)],
                    shape: out.clone(),
                },
                Step {
                    op: StepOp::Unary(UnaryOp::AddScalar(1.0)),
                    args: vec![Operand::Step(1)],
                    shape: out.clone(),
                },
            ],
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        };
        let epi = epilogue(
            &epi_program,
            1,
            &[&w, &out],
            &out,
            1,
            kiln::DType::F32,
            None,
        );
        let g = reduce_with_epilogue(&x, r.kernel(&x), &epi);
        assert!(g.wgsl.starts_with("// reduce_epilogue.wgsl"));
        validate_wgsl(
            &format!("{kind:?} over axis {axis} with an epilogue"),
            &g.wgsl,
        );
    }
}

/// Multi-tensor optimizer kernels (`codegen::optim`) validate with naga for every update rule,
/// one member and many, and reuse optim.wgsl's per-element functions.
/// The generated multi-tensor sums of squares validate with naga, one workgroup per chunk, as
/// the first node of a chain (zeroing the rest of the buffer) and as a later one.
#[test]
fn every_sum_of_squares_is_valid_wgsl() {
    use kiln::codegen::reduce_group::sum_squares_kernel;
    use kiln::ops::reduce::SumSquares;
    for sizes in [vec![1usize], vec![4096, 4097, 1, 300, 70_000, 3, 8191]] {
        // all f32, or every other member f16 (a mixed-precision gradient read as stored)
        let dtypes: Vec<kiln::DType> = (0..sizes.len())
            .map(|j| {
                if j % 2 == 1 {
                    kiln::DType::F16
                } else {
                    kiln::DType::F32
                }
            })
            .collect();
        let expected: u64 = sizes.iter().map(|&n| n.div_ceil(4096) as u64).sum();
        for (offset, chained) in [(0, false), (5, true)] {
            let op = SumSquares {
                offset,
                total: offset + expected as usize + 3,
                chained,
            };
            let g = sum_squares_kernel(&op, &sizes, &dtypes);
            assert!(g.wgsl.starts_with("// sum_squares.wgsl"));
            validate_wgsl(&format!("sum_squares {sizes:?} {op:?}"), &g.wgsl);
            assert_eq!(g.spec.workgroups, expected);
        }
    }
}

/// Optimizer groups of every kind over one and several parameters (f16 gradients among them),
/// reading their scale or computing it from partial sums (through clipping's epilogue, whose
/// other input binds after them, or plain).
#[test]
fn every_optimizer_group_is_valid_wgsl() {
    use kiln::codegen::optim::Scale;
    use kiln::ops::binary::BinaryOp;
    use kiln::ops::fused::{Fused, Operand, Step, StepOp};
    use kiln::ops::optim::{OptimGroup, OptimKind};
    use kiln::ops::unary::UnaryOp;
    let one = kiln::Shape(vec![1]);
    // min(sqrt(sum), limit)
    let clip = Fused {
        steps: vec![
            Step {
                op: StepOp::Unary(UnaryOp::Sqrt),
                args: vec![Operand::Input(0)],
                shape: one.clone(),
            },
            Step {
                op: StepOp::Binary(BinaryOp::Minimum),
                args: vec![Operand::Step(0), Operand::Input(1)],
                shape: one.clone(),
            },
        ],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    let epilogue = kiln::codegen::elementwise::epilogue(
        &clip,
        0,
        &[&one, &one],
        &one,
        2,
        kiln::DType::F32,
        None,
    );
    let kinds = [
        OptimKind::Sgd,
        OptimKind::SgdMomentum { nesterov: true },
        OptimKind::Adam { decoupled: false },
        OptimKind::Adam { decoupled: true },
        OptimKind::Rmsprop {
            centered: false,
            momentum: false,
        },
        OptimKind::Rmsprop {
            centered: true,
            momentum: false,
        },
        OptimKind::Rmsprop {
            centered: false,
            momentum: true,
        },
        OptimKind::Rmsprop {
            centered: true,
            momentum: true,
        },
        OptimKind::Adagrad,
    ];
    for kind in kinds {
        for sizes in [vec![7usize], vec![1, 300, 256, 70_000, 3]] {
            let group = OptimGroup::new(kind, sizes.len());
            // the first gradient f16 (a folded mixed-precision cast) in the larger groups
            let grads: Vec<kiln::DType> = (0..sizes.len())
                .map(|j| {
                    if j == 0 && sizes.len() > 1 {
                        kiln::DType::F16
                    } else {
                        kiln::DType::F32
                    }
                })
                .collect();
            let scales = [
                Scale::Read,
                Scale::Sum {
                    partials: 24,
                    epilogue: Some(&epilogue),
                },
                Scale::Sum {
                    partials: 1,
                    epilogue: None,
                },
            ];
            for scale in scales {
                let mut group = group.clone();
                if let Scale::Sum {
                    epilogue: Some(e), ..
                } = scale
                {
                    group.scale_inputs = 1 + e.extra;
                }
                let g = kiln::codegen::optim::group_kernel(&group, &sizes, &grads, scale);
                assert!(g.wgsl.starts_with("// optim_group.wgsl"));
                assert!(g.wgsl.contains("fn adam_update"), "the shared functions");
                let what = format!(
                    "{kind:?} {sizes:?}, scale summed: {}",
                    g.wgsl.contains("sum = sum + scale[k]")
                );
                validate_wgsl(&what, &g.wgsl);
                let expected: u64 = sizes.iter().map(|&n| n.div_ceil(256) as u64).sum();
                assert_eq!(g.spec.workgroups, expected);
            }
        }
    }
}

/// Multi-tensor gradient accumulations, a cycle's first (writing) and later (adding), over one
/// and several tensors, f16 gradients among them; the scale exactly as given.
#[test]
fn every_accumulate_group_is_valid_wgsl() {
    use kiln::ops::optim::AccumulateGroup;
    for first in [true, false] {
        for sizes in [vec![5usize], vec![1, 300, 256, 70_000, 3]] {
            let group = AccumulateGroup {
                members: sizes.len(),
                first,
                scale: 1.0 / 3.0,
            };
            let grads: Vec<kiln::DType> = (0..sizes.len())
                .map(|j| match j {
                    1 => kiln::DType::F16,
                    _ => kiln::DType::F32,
                })
                .collect();
            let g = kiln::codegen::optim::accumulate_group(&group, &sizes, &grads);
            validate_wgsl(
                &format!("accumulate group {sizes:?} first {first}"),
                &g.wgsl,
            );
            assert!(g.wgsl.contains(&format!("{}u", (1.0f32 / 3.0).to_bits())));
            assert_eq!(g.wgsl.contains("acc0[i] + "), !first);
            let expected: u64 = sizes.iter().map(|&n| n.div_ceil(256) as u64).sum();
            assert_eq!(g.spec.workgroups, expected);
        }
    }
}

/// Multi-tensor moving averages over one and several tensors; the weight (1 - decay) exactly
/// as computed.
#[test]
fn every_ema_group_is_valid_wgsl() {
    use kiln::ops::optim::EmaGroup;
    for sizes in [vec![5usize], vec![1, 300, 256, 70_000, 3]] {
        let group = EmaGroup {
            members: sizes.len(),
            decay: 0.999,
        };
        let g = kiln::codegen::optim::ema_group(&group, &sizes);
        validate_wgsl(&format!("ema group {sizes:?}"), &g.wgsl);
        assert!(g.wgsl.contains(&format!("{}u", (1.0f32 - 0.999).to_bits())));
        let expected: u64 = sizes.iter().map(|&n| n.div_ceil(256) as u64).sum();
        assert_eq!(g.spec.workgroups, expected);
    }
}

/// The f16 variants of the hand-written kernels with a storage block (conv, pool, softmax,
/// dropout, layout, loss, embedding, lstm, gru, norm, attention) validate with naga; dropout's
/// seed, the loss's labels, embedding indices, normalization statistics and attention masks
/// stay f32.
#[test]
fn f16_variants_of_shaders_are_valid_wgsl() {
    use kiln::codegen::storage::{f16_family, f16_wgsl};
    for family in [
        "conv",
        "pool",
        "resize",
        "index",
        "softmax",
        "dropout",
        "layout",
        "loss",
        "embedding",
        "lstm",
        "gru",
        "norm",
        "attention",
    ] {
        assert!(f16_family(family).is_some());
        let src = f16_wgsl(family);
        assert!(
            src.starts_with(&format!("// {family}.wgsl")),
            "the header stays first"
        );
        assert!(src.contains("enable f16;") && src.contains("array<f16>"));
        validate_wgsl(&format!("{family} (f16)"), &src);
        // results stored as f32, rounded to f16 first (a folded cast after the kernel)
        let wide = kiln::codegen::storage::f16_wgsl_with(family, &[], true);
        assert!(wide.contains("= f32(f16(v));"), "{family}");
        validate_wgsl(&format!("{family} (f16, f32 results)"), &wide);
    }
    assert!(f16_wgsl("dropout").contains("seed: array<f32>; // always f32"));
    assert!(f16_wgsl("loss").contains("labels: array<f32>; // always f32"));
    assert!(f16_wgsl("norm").contains("stats: array<f32>; // always f32"));
    assert!(f16_wgsl("attention").contains("mask: array<f32>; // always f32"));
    // recurrences reading their f32 weight (and bias) rounded on load: a folded cast
    for (family, rounded) in [("lstm", &["whh"][..]), ("gru", &["whh", "bhh"][..])] {
        let src = kiln::codegen::storage::f16_wgsl_with(family, rounded, false);
        for name in rounded {
            assert!(
                src.contains(&format!("{name}: array<f32>;"))
                    && src.contains(&format!("return f32(f16({name}[i]));")),
                "{family}: {name}"
            );
        }
        validate_wgsl(&format!("{family} (f16, {rounded:?} rounded)"), &src);
    }
    assert!(
        f16_family("matmul").is_none(),
        "generated per shape instead"
    );
}

/// Which tensor-core configurations fit where: 14 of 24 in an H100's 48 KiB of workgroup
/// memory (default `bk32/pad/db`), 11 in lavapipe's 32 KiB when emulated (no epilogue tile;
/// default `bk32/pad/pf`); every form reads back as itself.
#[test]
fn coop_configurations_fit_as_documented() {
    use kiln::codegen::coop::CoopConfig;
    use kiln::codegen::Target;
    let h100 = Target {
        workgroup_storage: 48 << 10,
        max_invocations: 1024,
        ..Target::discrete()
    };
    assert_eq!(CoopConfig::all(&h100).len(), 14);
    assert_eq!(CoopConfig::choose(&h100).describe(), "bk32/pad/db");
    let lavapipe = Target {
        workgroup_storage: 32 << 10,
        max_invocations: 1024,
        coop_emulated: true,
        ..Target::discrete()
    };
    assert_eq!(CoopConfig::all(&lavapipe).len(), 11);
    assert_eq!(CoopConfig::choose(&lavapipe).describe(), "bk32/pad/pf");
    // WebGPU's default 16 KiB: none fits, and the plain form is what a failed choice falls to
    assert_eq!(CoopConfig::all(&Target::discrete()).len(), 0);
    for c in every_coop_config() {
        assert_eq!(
            CoopConfig::parse(&c.describe()),
            Some(c),
            "{}",
            c.describe()
        );
    }
    for bad in ["bk16", "bk32/db/x", "32/pad", ""] {
        assert_eq!(CoopConfig::parse(bad), None, "{bad}");
    }
}
