//! The tensor-core GEMM (`src/codegen/coop.rs`) run on an adapter without cooperative matrices,
//! through its emulated form: this test binary sets `KILN_EMULATE_TENSOR_CORES=1` before making
//! its device, so the kernel's staging, gathers, batch strides and epilogue run everywhere the
//! real one would (medium-precision f32 products, f16 graphs, convolutions and their gradients),
//! checked against the CPU reference at f16 tolerance with outputs poisoned by NaN. Only the
//! matrix instructions themselves (and the driver's translation) need a GPU with them.

mod common;

use common::rand;
use kiln::device::Precision;
use kiln::graph::Conv2dOpts;
use kiln::ops::matmul::Bias;
use kiln::{DType, Device, Graph, NodeId, Tensor};

/// The shared device with the emulated tensor-core kernel on (every test here goes through this
/// before anything reads the environment), checked once at medium precision.
fn emulated() -> Option<Device> {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| std::env::set_var("KILN_EMULATE_TENSOR_CORES", "1"));
    let dev = common::gpu()?;
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("NOTICE: the adapter lacks SHADER_F16; the tensor-core kernel is not emulated");
        return None;
    }
    // the device's own check (products off the tile edges, transposes, f16 storage, convolutions
    // and an input gradient against the CPU) must pass for the kernel to be used at all
    dev.set_matmul_precision(Precision::Medium)
        .expect("the emulated tensor-core kernel passes the device's check");
    assert!(dev.tensor_cores());
    Some(dev)
}

/// `common::check_plan`, giving the plan's kernels (and checking that every tensor-core one is
/// the emulated kernel).
fn check(
    dev: &Device,
    what: &str,
    g: &Graph,
    outputs: &[NodeId],
    feeds: &[(String, Tensor)],
    tol: (f64, f64),
) -> Vec<String> {
    let plan = common::check_plan(dev, what, g, outputs, feeds, tol);
    let kernels: Vec<String> = plan.kernels().iter().map(|l| l.to_string()).collect();
    assert!(
        kernels
            .iter()
            .filter(|l| l.contains("[coop16"))
            .all(|l| l.contains("emulated")),
        "{what}: {kernels:#?}"
    );
    kernels
}

/// How many of `kernels` are the tensor-core GEMM.
fn coop_count(kernels: &[String]) -> usize {
    kernels.iter().filter(|l| l.contains("[coop16")).count()
}

/// f16 rounding of the operands: about sqrt(K) * 2^-11 of the operands' scale.
const F16_TOL: (f64, f64) = (2e-2, 1e-2);

#[test]
fn products_at_medium_precision() {
    let Some(dev) = emulated() else { return };
    let g = Graph::new();
    // every transpose, bias on rows and on columns, relu, edges off the 128 tile and the 32 depth
    let mut outputs = Vec::new();
    let mut feeds = Vec::new();
    // (the first four odd-sized, read as scalars; the next four with every extent a multiple of 4,
    // read as vec4s)
    let transposes = [(false, false), (true, false), (false, true), (true, true)];
    for (k, (ta, tb)) in transposes.into_iter().chain(transposes).enumerate() {
        let (m, n, kd) = if k < 4 {
            (129 + k, 67 + 3 * k, 33 + 5 * k)
        } else {
            (132, 68 + 4 * k, 36)
        };
        let a_shape = if ta { [kd, m] } else { [m, kd] };
        let b_shape = if tb { [n, kd] } else { [kd, n] };
        let a = g.input(&format!("a{k}"), a_shape);
        let b = g.input(&format!("b{k}"), b_shape);
        let (bias, len) = if k % 2 == 0 {
            (Bias::Cols, n)
        } else {
            (Bias::Rows, m)
        };
        let c = g.input(&format!("c{k}"), [len]);
        outputs.push(
            g.matmul_fused(a, b, ta, tb, Some((c, bias)), k >= 2)
                .unwrap(),
        );
        feeds.push((format!("a{k}"), rand(&a_shape, 10 + k as u64)));
        feeds.push((format!("b{k}"), rand(&b_shape, 20 + k as u64)));
        feeds.push((format!("c{k}"), rand(&[len], 30 + k as u64)));
    }
    // a batched product broadcasting its right operand over the leading batch dimension
    let a = g.input("ba", [2, 3, 65, 40]);
    let b = g.input("bb", [3, 40, 131]);
    outputs.push(g.matmul(a, b).unwrap());
    feeds.push(("ba".into(), rand(&[2, 3, 65, 40], 40)));
    feeds.push(("bb".into(), rand(&[3, 40, 131], 41)));
    let kernels = check(&dev, "products", &g, &outputs, &feeds, F16_TOL);
    assert_eq!(coop_count(&kernels), 9, "{kernels:#?}");
    let vec4 = kernels.iter().filter(|l| l.contains(",va,vb")).count();
    assert!(vec4 >= 4, "{kernels:#?}");
}

#[test]
fn convolution_gradients_at_medium_precision() {
    let Some(dev) = emulated() else { return };
    let g = Graph::new();
    let (n, c, h, w, o) = (3, 64, 12, 10, 70);
    let x = g.input("x", [n, c, h, w]);
    let k = g.input("k", [o, c, 3, 3]);
    let bias = g.input("bias", [o]);
    let opts = Conv2dOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let y = g.conv2d(x, k, Some(bias), opts).unwrap();
    // no relu: f16 rounding would flip the sign of outputs near 0 and with it their gradients
    let loss = common::random_projection(&g, y, 7);
    let grads = g.grad(loss, &[x, k, bias]).unwrap();
    let feeds = vec![
        ("x".to_string(), rand(&[n, c, h, w], 1)),
        (
            "k".to_string(),
            Tensor::rand_uniform([o, c, 3, 3], -0.3, 0.3, 2),
        ),
        ("bias".to_string(), rand(&[o], 3)),
    ];
    let mut outputs = vec![y];
    outputs.extend(&grads);
    let kernels = check(&dev, "conv2d", &g, &outputs, &feeds, (3e-2, 1e-2));
    // forward (M = 70, N = 360, K = 576), weight gradient (70 x 576 x 360), input gradient
    // (64 x 360 x 630)
    assert_eq!(coop_count(&kernels), 3, "{kernels:#?}");
}

#[test]
fn f16_graphs_use_the_kernel() {
    let Some(dev) = emulated() else { return };
    let g = Graph::new();
    let a = g.input_as("a", [100, 90], DType::F16);
    let b = g.input_as("b", [90, 150], DType::F16);
    let y = g.matmul(a, b).unwrap();
    let x = g.input_as("x", [2, 6, 9, 11], DType::F16);
    let k = g.input_as("k", [66, 6, 3, 3], DType::F16);
    let conv = g
        .conv2d(
            x,
            k,
            None,
            Conv2dOpts {
                padding: (1, 1),
                ..Default::default()
            },
        )
        .unwrap();
    let outputs = [
        g.cast(y, DType::F32).unwrap(),
        g.cast(conv, DType::F32).unwrap(),
    ];
    let feeds = vec![
        ("a".to_string(), rand(&[100, 90], 1)),
        ("b".to_string(), rand(&[90, 150], 2)),
        ("x".to_string(), rand(&[2, 6, 9, 11], 3)),
        (
            "k".to_string(),
            Tensor::rand_uniform([66, 6, 3, 3], -0.3, 0.3, 4),
        ),
    ];
    let kernels = check(&dev, "f16 graph", &g, &outputs, &feeds, F16_TOL);
    assert_eq!(coop_count(&kernels), 2, "{kernels:#?}");
}

/// A transposed convolution's bias and relu in the tensor-core kernel's store (an f16 decoder
/// layer: the implicit input-gradient GEMM with a per-channel bias), forward and gradients.
#[test]
fn transposed_convolution_with_bias_and_relu() {
    let Some(dev) = emulated() else { return };
    let g = Graph::new();
    let x = g.input("x", [2, 64, 8, 8]);
    let w = g.input("w", [64, 72, 4, 4]);
    let b = g.input("b", [72]);
    let h = |v| g.cast(v, DType::F16).unwrap();
    let opts = kiln::ops::conv::ConvTranspose2dOpts {
        stride: (2, 2),
        padding: (1, 1),
        ..Default::default()
    };
    let y = g.conv_transpose2d(h(x), h(w), Some(h(b)), opts, 1).unwrap();
    let y = g.cast(g.relu(y).unwrap(), DType::F32).unwrap();
    let feeds = vec![
        ("x".to_string(), rand(&[2, 64, 8, 8], 1)),
        (
            "w".to_string(),
            Tensor::rand_uniform([64, 72, 4, 4], -0.3, 0.3, 2),
        ),
        ("b".to_string(), rand(&[72], 3)),
    ];
    let kernels = check(&dev, "transposed conv", &g, &[y], &feeds, F16_TOL);
    let gemm: Vec<&String> = kernels
        .iter()
        .filter(|l| l.contains("implicit_dgrad"))
        .collect();
    assert!(
        gemm.len() == 1 && gemm[0].contains("[coop16") && gemm[0].contains("bias_rows,relu"),
        "{kernels:#?}"
    );
    assert!(!kernels.iter().any(|l| l.contains("fused")), "{kernels:#?}");
}

#[test]
fn products_with_fused_epilogues() {
    let Some(dev) = emulated() else { return };
    // y = gelu(a b + r) * s: the elementwise ops after the product run in its kernel, in f32 at
    // medium precision and in an f16 graph
    for dtype in [DType::F32, DType::F16] {
        let g = Graph::new();
        let a = g.input_as("a", [130, 40], dtype);
        let b = g.input_as("b", [70, 40], dtype);
        let r = g.input_as("r", [70], dtype);
        let s = g.input_as("s", [130, 70], dtype);
        let p = g.matmul_t(a, b, false, true).unwrap();
        let y = g.mul(g.gelu(g.add(p, r).unwrap()).unwrap(), s).unwrap();
        let y = g.cast(y, DType::F32).unwrap();
        let feeds = vec![
            ("a".to_string(), rand(&[130, 40], 1)),
            ("b".to_string(), rand(&[70, 40], 2)),
            ("r".to_string(), rand(&[70], 3)),
            ("s".to_string(), rand(&[130, 70], 4)),
        ];
        let kernels = check(
            &dev,
            &format!("{dtype:?} epilogue"),
            &g,
            &[y],
            &feeds,
            F16_TOL,
        );
        let fused: Vec<&String> = kernels
            .iter()
            .filter(|l| l.contains("[coop16") && l.contains("epilogue["))
            .collect();
        assert_eq!(fused.len(), 1, "{kernels:#?}");
        // nothing else but the f16 result's cast to f32
        assert_eq!(
            kernels.len(),
            1 + (dtype == DType::F16) as usize,
            "{kernels:#?}"
        );
    }
}

/// Threads that ask for medium precision at once on a fresh device: one runs the tensor-core
/// check, the others wait for its verdict (rather than use the kernel unchecked) and all get
/// it, without a deadlock.
#[test]
fn concurrent_checks_share_one_verdict() {
    if emulated().is_none() {
        return;
    }
    // a device of its own, not checked yet
    let dev = Device::gpu().expect("a GPU adapter");
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                dev.set_matmul_precision(Precision::Medium)
                    .map(|()| dev.tensor_cores())
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().expect("no panic").expect("the check passes"));
    }
}

/// The kernel's configurations (see `CoopConfig::all`) pass the device's check when fixed
/// (`Device::set_coop_config`: products off the tile edges, transposes, f16 storage, fused
/// epilogues, convolutions and both their gradients, against the CPU), and then compute
/// products spanning several steps through K with a ragged last one and more than one 256-wide
/// tile, scalar and vec4 staging, as the CPU does. The other tests run the adapter's default
/// (lavapipe: `bk32/pad/pf`); this one double buffering (`bk32/db`), 64-deep steps (`bk64/pf`)
/// and the 128 x 256 tile (`bk32/wide/pad/pf`), or, with `KILN_TEST_ALL_COOP=1`, all that fit
/// (lavapipe: 11 of 24; emulated kernels compile slowly: minutes).
#[test]
fn configurations_match_the_cpu() {
    use kiln::codegen::coop::CoopConfig;
    if emulated().is_none() {
        return;
    }
    // a device of its own: fixing a configuration re-runs the check
    let dev = Device::gpu().expect("a GPU adapter");
    dev.set_matmul_precision(Precision::Medium)
        .expect("the default configuration passes");
    let target = dev.target().expect("a GPU");
    let fitting = CoopConfig::all(&target);
    // lavapipe's 32 KiB of workgroup memory hold 11 of the 24
    assert!(fitting.len() >= 11, "{fitting:?}");
    let configs: Vec<CoopConfig> = if std::env::var("KILN_TEST_ALL_COOP").is_ok_and(|v| v == "1") {
        fitting.clone()
    } else {
        ["bk32/db", "bk64/pf", "bk32/wide/pad/pf"]
            .iter()
            .map(|s| CoopConfig::parse(s).expect("a configuration"))
            .inspect(|c| assert!(fitting.contains(c), "{c:?} fits lavapipe"))
            .collect()
    };
    let g = Graph::new();
    // K = 230: 8 steps of 32 (4 of 64), the last ragged; 300 columns: two 256-wide tiles; a
    // read as scalars (odd K), b as vec4s; then both transposed and batched, as vec4s
    let a = g.input("a", [131, 230]);
    let b = g.input("b", [230, 300]);
    let at = g.input("at", [2, 228, 132]);
    let bt = g.input("bt", [2, 68, 228]);
    let outputs = [
        g.matmul(a, b).unwrap(),
        g.matmul_t(at, bt, true, true).unwrap(),
    ];
    let feeds = vec![
        ("a".to_string(), rand(&[131, 230], 1)),
        ("b".to_string(), rand(&[230, 300], 2)),
        ("at".to_string(), rand(&[2, 228, 132], 3)),
        ("bt".to_string(), rand(&[2, 68, 228], 4)),
    ];
    for &c in &configs {
        let name = c.describe();
        dev.set_coop_config(Some(c))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(dev.coop_config(), Some(c));
        let kernels = check(&dev, &name, &g, &outputs, &feeds, F16_TOL);
        // the configuration is one of the comma-separated parts of the kernel's key
        let ours = kernels
            .iter()
            .filter(|l| l.contains("[coop16") && l.split([',', '[', ']']).any(|p| p == name))
            .count();
        assert_eq!(ours, 2, "{name}: {kernels:#?}");
    }
    // one that does not fit is refused with the reason, and changes nothing
    let roomy = CoopConfig::parse("bk64/pad/db").expect("a configuration");
    assert!(!fitting.contains(&roomy));
    let err = dev.set_coop_config(Some(roomy)).unwrap_err().to_string();
    assert!(
        err.contains("bk64/pad/db") && err.contains("workgroup memory"),
        "{err}"
    );
    assert_eq!(dev.coop_config(), configs.last().copied());
    // and back to the adapter's default
    dev.set_coop_config(None).expect("the default passes");
    assert_eq!(dev.coop_config(), None);
}

/// `GemmPolicy::Tune` times the tensor-core configurations (not the tiled GEMM's) for a product
/// that runs on tensor cores, checks each against the default's result, and the plan then uses
/// the winner.
#[test]
fn tuning_picks_a_tensor_core_configuration() {
    if emulated().is_none() {
        return;
    }
    let dev = Device::gpu().expect("a GPU adapter");
    dev.set_gemm_policy(kiln::GemmPolicy::Tune).unwrap();
    let g = Graph::new();
    let a = g.input_as("a", [97, 72], DType::F16);
    let b = g.input_as("b", [72, 66], DType::F16);
    let y = g.cast(g.matmul(a, b).unwrap(), DType::F32).unwrap();
    let feeds = vec![
        ("a".to_string(), rand(&[97, 72], 1)),
        ("b".to_string(), rand(&[72, 66], 2)),
    ];
    let kernels = check(&dev, "tuned f16 product", &g, &[y], &feeds, F16_TOL);
    let best = dev
        .tuned_coop(97, 66, 72, 1, DType::F16)
        .expect("a tuned tensor-core configuration");
    assert!(
        kernels.iter().any(
            |l| l.contains("[coop16") && l.split([',', '[', ']']).any(|p| p == best.describe())
        ),
        "{best:?}: {kernels:#?}"
    );
}
