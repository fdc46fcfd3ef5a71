//! The generated GEMM family (`codegen::matmul`): every tiling, forced through
//! `Device::set_gemm_policy`, against the CPU reference on awkward shapes (1, primes, shapes off
//! the tile and off vec4 alignment), transposed and batched operands, fused epilogues, and split-K
//! (forced and chosen). Outputs are poisoned with NaN first, so a skipped element fails.

mod common;

use common::{assert_close, check_plan, rand};
use kiln::codegen::matmul::{choose, GemmConfig, TILINGS};
use kiln::codegen::Target;
use kiln::ops::matmul::Bias;
use kiln::ops::TOL_REDUCTION;
use kiln::{Device, GemmPolicy, Graph, Tensor};

/// A device of its own (the policy is per device), or `None` where `common::gpu` skips.
fn device() -> Option<Device> {
    common::gpu()?;
    Some(Device::gpu().expect("a GPU adapter"))
}

/// One product `relu?(op(a) op(b) + bias?)` on `dev` against the CPU reference.
#[allow(clippy::too_many_arguments)]
fn check(
    dev: &Device,
    what: &str,
    sa: &[usize],
    sb: &[usize],
    ta: bool,
    tb: bool,
    bias: Bias,
    relu: bool,
) -> kiln::PlanInfo {
    check_with(dev, what, sa, sb, ta, tb, bias, relu, TOL_REDUCTION)
}

/// [`check`] at tolerance `tol` (atol, rtol).
#[allow(clippy::too_many_arguments)]
fn check_with(
    dev: &Device,
    what: &str,
    sa: &[usize],
    sb: &[usize],
    ta: bool,
    tb: bool,
    bias: Bias,
    relu: bool,
    tol: (f64, f64),
) -> kiln::PlanInfo {
    let g = Graph::new();
    let a = g.input("a", sa);
    let b = g.input("b", sb);
    let shape = g.shape(g.matmul_t(a, b, ta, tb).unwrap());
    let (m, n) = (
        shape.dims()[shape.rank() - 2],
        shape.dims()[shape.rank() - 1],
    );
    let blen = if bias == Bias::Rows { m } else { n };
    let c = g.input("c", [blen]);
    let fused = (bias != Bias::None).then_some((c, bias));
    let y = g.matmul_fused(a, b, ta, tb, fused, relu).unwrap();
    let feeds = [
        ("a", rand(sa, 11)),
        ("b", rand(sb, 12)),
        ("c", rand(&[blen], 13)),
    ];
    let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(k, v)| (*k, v)).collect();
    let mut plan = dev
        .compile(&g, &[y])
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    plan.poison(f32::NAN);
    let got = plan.run(&refs).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = Device::cpu().compile(&g, &[y]).unwrap().run(&refs).unwrap();
    assert_close(what, &got[0], &want[0], tol.0, tol.1);
    plan.info()
}

#[test]
fn every_tiling_on_awkward_shapes() {
    let Some(dev) = device() else { return };
    let target = dev.target().unwrap();
    let shapes: &[(usize, usize, usize)] = &[(1, 1, 1), (7, 5, 13), (33, 70, 17), (64, 32, 70)];
    // plain, register prefetch, prefetch into a second workgroup buffer (K up to 70: several
    // steps through both buffers)
    let variants = [(false, false), (true, false), (true, true)];
    for (&(bm, bn, tm, tn), (prefetch, double_buffer)) in TILINGS
        .iter()
        .flat_map(|t| variants.iter().map(move |&v| (t, v)))
    {
        let cfg = GemmConfig {
            bm,
            bn,
            bk: 16,
            tm,
            tn,
            split: 1,
            prefetch,
            double_buffer,
        };
        if !cfg.fits(&target) {
            assert!(dev.set_gemm_policy(GemmPolicy::Fixed(cfg)).is_err());
            continue;
        }
        dev.set_gemm_policy(GemmPolicy::Fixed(cfg)).unwrap();
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            // cycle transposes, epilogues and alignment over the shapes
            let (ta, tb) = (i % 2 == 1, i / 2 % 2 == 1);
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            let bias = [Bias::None, Bias::Rows, Bias::Cols][i % 3];
            let what = format!("{} {m}x{n}x{k} ta={ta} tb={tb} {bias:?}", cfg.describe());
            check(&dev, &what, &sa, &sb, ta, tb, bias, i % 2 == 0);
        }
    }
}

#[test]
fn batched_broadcast_and_vec4_layouts() {
    let Some(dev) = device() else { return };
    for policy in [
        "64x64x16/4x4",
        "32x32x8/4x4/pf",
        "16x64x16/4x4",
        "128x128x8/8x8/pf",
    ] {
        dev.set_gemm_policy(GemmPolicy::parse(policy).unwrap())
            .unwrap();
        for &(sa, sb, ta, tb) in &[
            (&[3usize, 8, 12][..], &[12usize, 20][..], false, false),
            (&[2, 1, 12, 8][..], &[3, 12, 4][..], true, false),
            (&[2, 5, 16][..], &[2, 24, 16][..], false, true),
            (&[4, 9, 6][..], &[4, 7, 9][..], true, true),
        ] {
            let what = format!("{policy} {sa:?} x {sb:?} ta={ta} tb={tb}");
            check(&dev, &what, sa, sb, ta, tb, Bias::None, false);
        }
    }
}

#[test]
fn split_k_forced_and_chosen() {
    let Some(dev) = device() else { return };
    // forced: 3 slices of a deep product, each epilogue, transposes, off-alignment K
    dev.set_gemm_policy(GemmPolicy::parse("32x32x16/4x4/split3").unwrap())
        .unwrap();
    for &(m, n, k, ta, tb, bias, relu) in &[
        (5, 7, 100, false, false, Bias::None, false),
        (33, 9, 301, true, false, Bias::Rows, true),
        (16, 40, 96, false, true, Bias::Cols, true),
        (3, 3, 1000, true, true, Bias::Cols, false),
    ] {
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        let what = format!("split3 {m}x{n}x{k} ta={ta} tb={tb} {bias:?} relu={relu}");
        let info = check(&dev, &what, &sa, &sb, ta, tb, bias, relu);
        assert_eq!(
            info.dispatches, 2,
            "{what}: partial products, then their sum"
        );
    }
    // too shallow to cut: one dispatch
    let info = check(
        &dev,
        "split3 K=8",
        &[4, 8],
        &[8, 4],
        false,
        false,
        Bias::None,
        false,
    );
    assert_eq!(info.dispatches, 1);

    // chosen: a small, deep product on this adapter splits K by itself
    dev.set_gemm_policy(GemmPolicy::Auto).unwrap();
    let target = dev.target().unwrap();
    // (16 rows: more than the skinny-product kernel takes)
    let (m, n, k) = (16, 12, 4096);
    let cfg = choose(m, n, k, 1, &target).unwrap();
    assert!(cfg.split > 1, "{} for {m}x{n}x{k}", cfg.describe());
    let info = check(
        &dev,
        "auto split",
        &[m, k],
        &[k, n],
        false,
        false,
        Bias::Cols,
        true,
    );
    assert_eq!(info.dispatches, 2);
}

#[test]
fn portable_kernel_still_matches() {
    let Some(dev) = device() else { return };
    dev.set_gemm_policy(GemmPolicy::Portable).unwrap();
    check(
        &dev,
        "portable",
        &[65, 9],
        &[9, 70],
        false,
        false,
        Bias::Rows,
        true,
    );
    check(
        &dev,
        "portable t",
        &[9, 13],
        &[5, 9],
        true,
        true,
        Bias::None,
        false,
    );
}

/// The choice on an H100-like target: big products get the largest tile, small deep ones split K,
/// skinny ones get narrow tiles. (Pure logic; no GPU.)
#[test]
fn choices_on_a_discrete_gpu() {
    let t = Target::discrete();
    let big = choose(4096, 4096, 4096, 1, &t).unwrap();
    assert_eq!((big.bm, big.bn, big.split), (128, 128, 1));
    // the MNIST CNN's conv2 weight gradient: [64, 288] summed over 64*14*14 positions
    let dw = choose(64, 288, 12_544, 1, &t).unwrap();
    assert!(dw.split > 4, "{}", dw.describe());
    assert!(dw.chunk(12_544) >= 256);
    // one row (batch-1 inference): no 128-row tile, K cut to fill the adapter
    let row = choose(1, 1000, 4096, 1, &t).unwrap();
    assert!(row.bm <= 64 && row.split > 1, "{}", row.describe());
    for cfg in [big, dw, row] {
        assert!(cfg.fits(&t));
        assert_eq!(GemmConfig::parse(&cfg.describe()), Some(cfg));
    }
    let pf = GemmConfig::parse("128x64x8/8x4/split3/pf").unwrap();
    assert!(pf.prefetch && pf.split == 3 && pf.bk == 8);
    assert_eq!(GemmConfig::parse(&pf.describe()), Some(pf));
    assert!(GemmPolicy::parse("64x64x16").is_err());
    assert!(GemmPolicy::parse("64x64x16/4x4/fast").is_err());
    assert!(GemmPolicy::parse("auto").is_ok());
}

/// Convolutions whose column matrix has only products as readers run as implicit GEMMs: the
/// forward and the weight gradient read the image, no `im2col` dispatch remains, and the results
/// (output and every gradient, split-K included) match the CPU reference.
#[test]
fn implicit_gemm_convolutions() {
    use kiln::ops::conv::Conv2dOpts;
    let Some(dev) = device() else { return };
    // (input shape, output channels, kernel, options)
    type Case = ([usize; 4], usize, (usize, usize), Conv2dOpts);
    let cases: &[Case] = &[
        (
            [2, 3, 7, 9],
            5,
            (3, 2),
            Conv2dOpts {
                stride: (2, 1),
                padding: (1, 0),
                dilation: (1, 2),
            },
        ),
        ([1, 1, 5, 5], 1, (1, 1), Conv2dOpts::default()),
        (
            [3, 4, 8, 8],
            6,
            (3, 3),
            Conv2dOpts {
                padding: (1, 1),
                ..Default::default()
            },
        ),
    ];
    // the forced configuration cuts the weight gradient's K (N*Ho*Wo) in two: implicit split-K
    for policy in ["auto", "16x64x16/4x4/split2", "32x32x16/4x4/split2/pf"] {
        dev.set_gemm_policy(GemmPolicy::parse(policy).unwrap())
            .unwrap();
        for &(xs, o, k, opts) in cases {
            let what = format!("{policy} conv {xs:?} -> {o} k{k:?} {opts:?}");
            let g = Graph::new();
            let x = g.input("x", xs);
            let w = g.input("w", [o, xs[1], k.0, k.1]);
            let b = g.input("b", [o]);
            let y = g.conv2d_fused(x, w, Some(b), opts, true).unwrap();
            let loss = common::random_projection(&g, y, 5);
            let grads = g.grad(loss, &[x, w, b]).unwrap();
            let feeds = [
                ("x", rand(&xs, 1)),
                ("w", rand(&[o, xs[1], k.0, k.1], 2)),
                ("b", rand(&[o], 3)),
            ];
            let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(n, v)| (*n, v)).collect();
            let mut outs = vec![y];
            outs.extend(&grads);
            let mut plan = dev.compile(&g, &outs).unwrap();
            plan.poison(f32::NAN);
            let got = plan.run(&refs).unwrap();
            let want = Device::cpu()
                .compile(&g, &outs)
                .unwrap()
                .run(&refs)
                .unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{what} output {i}"), a, b, 1e-4, 1e-3);
            }
            // forward alone: the product reads the image (no im2col), then the NCHW permute
            let mut fwd = dev.compile(&g, &[y]).unwrap();
            let got = fwd.run(&refs).unwrap();
            assert_close(&what, &got[0], &want[0], 1e-4, 1e-3);
            assert!(
                fwd.info().dispatches <= 3,
                "{what}: {} dispatches",
                fwd.info().dispatches
            );
        }
    }
    // dispatches of a plan under the portable and the automatic policy
    let count = |g: &Graph, outs: &[kiln::NodeId]| {
        dev.set_gemm_policy(GemmPolicy::Portable).unwrap();
        let portable = dev.compile(g, outs).unwrap().info().dispatches;
        dev.set_gemm_policy(GemmPolicy::Auto).unwrap();
        (portable, dev.compile(g, outs).unwrap().info().dispatches)
    };
    for (padding, implicit_dx) in [((1, 1), true), ((0, 0), false)] {
        let g = Graph::new();
        let x = g.input("x", [2, 3, 6, 6]);
        let w = g.input("w", [4, 3, 3, 3]);
        let opts = Conv2dOpts {
            padding,
            ..Default::default()
        };
        let y = g.conv2d(x, w, None, opts).unwrap();
        // inference: the product reads the image and stores NCHW (no im2col, no permute)
        let (portable, implicit) = count(&g, &[y]);
        assert_eq!(portable, implicit + 2, "im2col and the permute are gone");
        assert_eq!(implicit, 1);
        // gradients: the weight gradient reads the image; the input gradient is one implicit
        // GEMM (no w^T x dy product, no col2im) where padding keeps its zero taps few: an
        // unpadded 3x3 on 6x6 would multiply 36 positions for 16 outputs, so it stays explicit
        let l = g.sum_all(y).unwrap();
        let grads = g.grad(l, &[x, w]).unwrap();
        let (portable, implicit) = count(&g, &grads);
        let gone = if implicit_dx { 2 } else { 1 };
        assert_eq!(portable, implicit + gone, "padding {padding:?}");
    }
}

/// `Precision::Medium`: on adapters with the tensor-core path (cooperative matrices) products
/// run with f16 inputs and match the CPU within f16 tolerance, on ragged shapes, both transposes,
/// batches and epilogues; elsewhere (lavapipe) nothing changes and results stay f32-exact.
#[test]
fn medium_precision_products() {
    use kiln::Precision;
    let Some(dev) = device() else { return };
    dev.set_matmul_precision(Precision::Medium).unwrap();
    let tensor_cores = dev.tensor_cores();
    let target = dev.target().unwrap();
    assert_eq!(tensor_cores, target.coop_f16);
    let tol = if tensor_cores {
        (2e-2, 2e-2)
    } else {
        TOL_REDUCTION
    };
    for &(sa, sb, ta, tb, bias, relu) in &[
        (
            &[64usize, 32][..],
            &[32usize, 64][..],
            false,
            false,
            Bias::None,
            false,
        ),
        (
            &[200, 77][..],
            &[77, 129][..],
            false,
            false,
            Bias::Cols,
            true,
        ),
        (
            &[3, 90, 65][..],
            &[3, 150, 90][..],
            true,
            true,
            Bias::Rows,
            false,
        ),
        (
            &[2, 1, 70, 100][..],
            &[3, 100, 66][..],
            false,
            false,
            Bias::None,
            true,
        ),
    ] {
        let what = format!("medium precision {sa:?} x {sb:?} (tensor cores: {tensor_cores})");
        check_with(&dev, &what, sa, sb, ta, tb, bias, relu, tol);
    }
    dev.set_matmul_precision(Precision::Highest).unwrap();
    assert!(!dev.tensor_cores());
}

/// `GemmPolicy::Tune` times candidate configurations on the adapter the first time a product's
/// extents appear, computes correctly with the winner, and remembers it in the cache folder for
/// the next device (process).
#[test]
fn tuning_times_candidates_and_remembers_the_winner() {
    if common::gpu().is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kiln-tune-test-{}", std::process::id()));
    std::env::set_var("KILN_CACHE_DIR", &dir);
    let dev = Device::gpu().unwrap();
    dev.set_gemm_policy(GemmPolicy::Tune).unwrap();
    assert_eq!(dev.tuned_gemm(33, 70, 600, 1), None);
    check(
        &dev,
        "tuned",
        &[33, 600],
        &[600, 70],
        false,
        false,
        Bias::Cols,
        true,
    );
    let won = dev
        .tuned_gemm(33, 70, 600, 1)
        .expect("tuned on first compile");
    assert!(won.fits(&dev.target().unwrap()));
    let table = std::fs::read_to_string(
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.to_string_lossy().contains("gemm-tune-"))
            .expect("the tuning table is saved"),
    )
    .unwrap();
    assert!(
        table.contains(&format!("33x70x600b1 {}", won.describe())),
        "{table}"
    );
    // a new device (as a new process would) starts from the saved table
    let again = Device::gpu().unwrap();
    assert_eq!(again.tuned_gemm(33, 70, 600, 1), Some(won));
    std::fs::remove_dir_all(&dir).ok();
}

/// Products of at most 8 rows run on the skinny-product (GEMV) kernel: every transpose, batches,
/// bias and relu, a fused epilogue, awkward K and N; more rows go back to the tiles.
#[test]
fn skinny_products_use_the_gemv_kernel() {
    let Some(dev) = device() else { return };
    dev.set_gemm_policy(GemmPolicy::Auto).unwrap();
    let profiled = dev
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
    for &(m, k, n, ta, tb, bias, relu) in &[
        (1usize, 1usize, 1usize, false, false, Bias::None, false),
        (1, 300, 70, false, true, Bias::Cols, true),
        (3, 37, 13, true, false, Bias::Rows, false),
        (8, 64, 129, true, true, Bias::Cols, false),
        (5, 257, 9, false, false, Bias::None, true),
    ] {
        let sa = if ta { [k, m] } else { [m, k] };
        let sb = if tb { [n, k] } else { [k, n] };
        let what = format!("gemv {m}x{k}x{n} ta={ta} tb={tb} {bias:?} relu={relu}");
        let info = check(&dev, &what, &sa, &sb, ta, tb, bias, relu);
        assert_eq!(info.dispatches, 1, "{what}");
    }
    // batched with broadcast, and a chain in the epilogue
    let g = Graph::new();
    let a = g.input("a", [2, 3, 1, 40]);
    let w = g.input("w", [3, 40, 11]);
    let c = g.input("c", [11]);
    let y = g.matmul(a, w).unwrap();
    let z = g.tanh(g.add(y, c).unwrap()).unwrap();
    let feeds = [
        ("a", rand(&[2, 3, 1, 40], 1)),
        ("w", rand(&[3, 40, 11], 2)),
        ("c", rand(&[11], 3)),
    ];
    let refs: Vec<(&str, &Tensor)> = feeds.iter().map(|(k, v)| (*k, v)).collect();
    let mut plan = dev.compile(&g, &[z]).unwrap();
    plan.poison(f32::NAN);
    if profiled {
        plan.set_profiling(true).unwrap();
    }
    let got = plan.run(&refs).unwrap();
    let want = Device::cpu().compile(&g, &[z]).unwrap().run(&refs).unwrap();
    assert_close("batched gemv + epilogue", &got[0], &want[0], 1e-5, 1e-4);
    assert_eq!(plan.info().dispatches, 1);
    if profiled {
        let label = &plan.profile()[0].label;
        assert!(
            label.contains("gemv1") && label.contains("epilogue[add,tanh"),
            "{label}"
        );
    }
}

/// Whether a plan dispatches a kernel of op `op` (labels read `node <id> <op> <shape> ..`).
fn runs_op(plan: &kiln::Plan, op: &str) -> bool {
    common::count_op(&plan.kernels(), op) > 0
}

/// A bias gradient beside its weight gradient comes out of the weight gradient's kernel
/// (`MatMul::row_sums`, written past the product and read as a view): a linear layer's (the sum
/// of dy's rows beside `dy^T x`) and a convolution's (dy's columns beside `dy x cols^T`, an
/// implicit GEMM), through plain, prefetching, double-buffered and split-K kernels and in f16,
/// on awkward shapes; outputs poisoned with NaN, against the CPU reference.
#[test]
fn bias_gradients_come_from_the_weight_gradients_kernel() {
    use kiln::{DType, Shape};
    let Some(dev) = device() else { return };
    let f16 = dev.features().contains(wgpu::Features::SHADER_F16);
    for policy in [
        "auto",
        "64x64x16/4x4",
        "32x32x8/4x4/pf",
        "64x64x16/4x4/db",
        "128x128x8/8x8/pf",
        "32x32x16/4x4/split3",
    ] {
        dev.set_gemm_policy(GemmPolicy::parse(policy).unwrap())
            .unwrap();
        for dtype in [DType::F32, DType::F16] {
            // f16 products are not split; `auto` may pick tensor cores or the skinny kernel
            if dtype == DType::F16 && (!f16 || policy.contains("split")) {
                continue;
            }
            let tol = match dtype {
                DType::F16 => kiln::ops::TOL_F16,
                _ => TOL_REDUCTION,
            };
            for &(t, i, o) in &[
                (1usize, 1usize, 1usize),
                (7, 5, 13),
                (70, 33, 17),
                (300, 8, 12),
            ] {
                let what = format!("{policy} {dtype} linear T={t} in={i} out={o}");
                let g = Graph::new();
                let x = g.input_as("x", [t, i], dtype);
                let dy = g.input_as("dy", [t, o], dtype);
                let dw = g.matmul_t(dy, x, true, false).unwrap();
                let db = g.sum_to(dy, &Shape(vec![o])).unwrap();
                let feeds = [
                    ("x".to_string(), rand(&[t, i], 3)),
                    ("dy".to_string(), rand(&[t, o], 4)),
                ];
                let outs = [
                    g.cast(dw, DType::F32).unwrap(),
                    g.cast(db, DType::F32).unwrap(),
                ];
                let outs = if dtype == DType::F32 { [dw, db] } else { outs };
                let plan = check_plan(&dev, &what, &g, &outs, &feeds, tol);
                let tiled = plan
                    .kernels()
                    .iter()
                    .any(|k| k.contains("matmul") && k.contains("row_sums"));
                // (one row: the sum is a reshape)
                assert!(
                    tiled || policy == "auto" || t == 1,
                    "{what}: {:?}",
                    plan.kernels()
                );
                if tiled {
                    assert!(!runs_op(&plan, "sum"), "{what}: {:?}", plan.kernels());
                }
                if policy.contains("split") && t >= 70 {
                    // the slices carry their row sums; their sum adds both up
                    assert!(runs_op(&plan, "splitk_sum"), "{what}: {:?}", plan.kernels());
                    assert_eq!(plan.info().dispatches, 2, "{what}");
                }
            }
        }
        // a convolution's weight and bias gradients: one implicit GEMM (and a sum of its
        // split-K slices)
        for &(n, c, hw, oc, pad) in &[(2usize, 3usize, 7usize, 5usize, 1usize), (3, 1, 9, 4, 0)] {
            let what = format!("{policy} conv N={n} C={c} {hw}x{hw} O={oc} pad={pad}");
            let g = Graph::new();
            let x = g.input("x", [n, c, hw, hw]);
            let w = g.input("w", [oc, c, 3, 3]);
            let b = g.input("b", [oc]);
            let opts = kiln::graph::Conv2dOpts {
                padding: (pad, pad),
                ..Default::default()
            };
            let y = g.conv2d(x, w, Some(b), opts).unwrap();
            let loss = common::random_projection(&g, y, 9);
            let grads = g.grad(loss, &[w, b]).unwrap();
            let feeds = [
                ("x".to_string(), rand(&[n, c, hw, hw], 5)),
                ("w".to_string(), rand(&[oc, c, 3, 3], 6)),
                ("b".to_string(), rand(&[oc], 7)),
            ];
            let plan = check_plan(&dev, &what, &g, &grads, &feeds, TOL_REDUCTION);
            if policy != "auto" {
                assert!(!runs_op(&plan, "sum"), "{what}: {:?}", plan.kernels());
            }
        }
    }
}

/// Products read a narrow of a tensor's last axis in place from its rows (`MatMul::rows_a`,
/// `rows_b`, `exec::lower::strided_operands`) when only products read it: as `a` and `b`,
/// transposed or not, through reshapes, with a bias gradient's row sums, vec4-aligned rows and
/// not, through plain, prefetching and split-K kernels and in f16; no narrow kernel runs, and
/// every output matches the CPU reference (poisoned with NaN first). A narrow something else
/// reads keeps its kernel.
#[test]
fn products_read_narrowed_rows_in_place() {
    use kiln::{DType, Shape};
    let Some(dev) = device() else { return };
    let f16 = dev.features().contains(wgpu::Features::SHADER_F16);
    for policy in ["32x32x8/4x4/pf", "32x32x16/4x4/split3"] {
        dev.set_gemm_policy(GemmPolicy::parse(policy).unwrap())
            .unwrap();
        for dtype in [DType::F32, DType::F16] {
            if dtype == DType::F16 && (!f16 || policy.contains("split")) {
                continue;
            }
            let tol = match dtype {
                DType::F16 => kiln::ops::TOL_F16,
                _ => TOL_REDUCTION,
            };
            // (rows of the narrowed tensor, its last axis, the narrow's start and width)
            for (case, &(t, r, l, start, w)) in [
                (3usize, 7usize, 13usize, 3usize, 7usize),
                (2, 50, 16, 4, 8),
                (1, 33, 20, 0, 12),
            ]
            .iter()
            .enumerate()
            {
                for shared in [false, true] {
                    if shared && case > 0 {
                        continue;
                    }
                    let what =
                        format!("{policy} {dtype} ({t}, {r}, {l})[{start}..+{w}] shared {shared}");
                    let g = Graph::new();
                    let x = g.input_as("x", [t, r, l], dtype);
                    let part = g.narrow(x, 2, start, w).unwrap();
                    let rows = g.reshape(part, &[(t * r) as isize, w as isize]).unwrap();
                    let wt = g.input_as("w", [w, 6], dtype);
                    let bias = g.input_as("bias", [6], dtype);
                    let dy = g.input_as("dy", [t * r, 5], dtype);
                    let left = g.input_as("left", [9, t * r], dtype);
                    let right = g.input_as("right", [11, w], dtype);
                    let prods = [
                        // a, plain: (T*R, w) x (w, 6) + bias
                        g.matmul_fused(rows, wt, false, false, Some((bias, Bias::Cols)), true)
                            .unwrap(),
                        // a, transposed: rows^T x dy, and its row sums (a bias gradient)
                        g.matmul_t(rows, dy, true, false).unwrap(),
                        g.sum_to(rows, &Shape(vec![w])).unwrap(),
                        // b, plain and transposed
                        g.matmul(left, rows).unwrap(),
                        g.matmul_t(right, rows, false, true).unwrap(),
                    ];
                    let mut outs: Vec<_> = match dtype {
                        DType::F32 => prods.to_vec(),
                        _ => prods
                            .iter()
                            .map(|&o| g.cast(o, DType::F32).unwrap())
                            .collect(),
                    };
                    if shared {
                        outs.push(g.exp(part).unwrap());
                    }
                    let feeds = [
                        ("x".to_string(), rand(&[t, r, l], 11)),
                        ("w".to_string(), rand(&[w, 6], 12)),
                        ("bias".to_string(), rand(&[6], 13)),
                        ("dy".to_string(), rand(&[t * r, 5], 14)),
                        ("left".to_string(), rand(&[9, t * r], 15)),
                        ("right".to_string(), rand(&[11, w], 16)),
                    ];
                    let plan = check_plan(&dev, &what, &g, &outs, &feeds, tol);
                    let kernels = plan.kernels();
                    let strided = kernels.iter().filter(|k| k.contains("rows_")).count();
                    if shared {
                        assert!(runs_op(&plan, "narrow"), "{what}: {kernels:#?}");
                        assert_eq!(strided, 0, "{what}: {kernels:#?}");
                    } else {
                        assert!(!runs_op(&plan, "narrow"), "{what}: {kernels:#?}");
                        assert!(strided >= 4, "{what}: {kernels:#?}");
                    }
                }
            }
        }
    }
}
