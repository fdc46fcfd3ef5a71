//! Every shaders/*.wgsl file parses and validates with naga, and opens with its header comment.
//! Needs no GPU.

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
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{stem}.wgsl: {}", e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{stem}.wgsl: {}", e.emit_to_string(&src)));
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
    use kiln::ops::matmul::Bias;
    let validate = |what: &str, src: &str| {
        assert!(src.starts_with("// matmul_gen.wgsl"), "{what}: header");
        assert!(
            src.contains("Bindings") && src.contains("Dispatch"),
            "{what}: header tables"
        );
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{what}: {}\n{src}", e.emit_to_string(src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
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
        for bk in [8, 16] {
            let cfg = GemmConfig {
                bm,
                bn,
                bk,
                tm,
                tn,
                split: 1,
            };
            for bits in 0..32u32 {
                let bit = |i: u32| bits & (1 << i) != 0;
                let partial = bit(4) && bit(3);
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
                    // every fifth scalar-b layout reads b as an image (implicit-GEMM conv)
                    im2col: (!bit(3) && bits % 5 == 0).then_some(geom),
                    dgrad: None,
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
        };
        let d = kiln::ops::conv::ImplicitDgrad { geom }.dims(
            &kiln::Shape(vec![5, geom.rows()]),
            &kiln::Shape(vec![2, 3, 7, 9]),
        );
        let src = &*kiln::codegen::matmul::dgrad_kernel(geom, &d, &cfg).wgsl;
        validate(&format!("dgrad {}", cfg.describe()), src);
        count += 1;
    }
    assert!(count >= 500);
}
