//! The plan executor: buffer reuse, pipeline caching across plans, parameters kept on the device,
//! only requested outputs read back, reshape without a copy, input validation, repeated runs.

mod common;

use common::{assert_close, gpu, rand};
use kiln::{DType, Device, Error, Graph, Tensor};

/// A chain of 12 elementwise ops on [64, 64]: liveness needs two buffers, not twelve.
fn chain() -> (Graph, kiln::NodeId) {
    let g = Graph::new();
    let mut h = g.input("x", [64, 64]);
    for i in 0..12 {
        h = if i % 2 == 0 {
            g.tanh(h).unwrap()
        } else {
            g.mul_scalar(h, 1.5).unwrap()
        };
    }
    (g, h)
}

#[test]
fn buffers_are_reused_across_lifetimes() {
    if gpu().is_none() {
        return;
    }
    // fusion would make the chain one kernel: this is about liveness, so a device without it
    let dev = Device::gpu().unwrap();
    dev.set_fusion(false);
    let (g, y) = chain();
    let plan = dev.compile(&g, &[y]).unwrap();
    let info = plan.info();
    assert_eq!(info.dispatches, 12);
    assert_eq!(info.buffers, 2, "{info}");
    // input + 2 buffers instead of input + 12 tensors
    assert_eq!(info.peak_bytes, 3 * 64 * 64 * 4, "{info}");
    assert_eq!(info.tensor_bytes, 13 * 64 * 64 * 4, "{info}");
    // fused (the default), the chain is one kernel and its one output the only computed tensor
    dev.set_fusion(true);
    let info = dev.compile(&g, &[y]).unwrap().info();
    assert_eq!(info.dispatches, 1, "{info}");
    assert_eq!(info.buffers, 1, "{info}");
    assert_eq!(info.peak_bytes, 2 * 64 * 64 * 4, "{info}");
    assert_eq!(info.tensor_bytes, 2 * 64 * 64 * 4, "{info}");
}

#[test]
fn pipelines_are_cached_across_plans() {
    let Some(dev) = gpu() else { return };
    let (g, y) = chain();
    dev.compile(&g, &[y]).unwrap();
    let before = dev.pipeline_count();
    let (g2, y2) = chain();
    dev.compile(&g2, &[y2]).unwrap();
    assert_eq!(
        dev.pipeline_count(),
        before,
        "the same kernels at the same shapes compile once"
    );
}

#[test]
fn runs_many_times_with_new_inputs() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [9, 5]);
    let w = g.param_init("runs.w", rand(&[5, 4], 1));
    let y = g.softmax(g.matmul(x, w).unwrap(), -1).unwrap();
    let mut plan = dev.compile(&g, &[y]).unwrap();
    let cpu = Device::cpu();
    cpu.set_param("runs.w", &dev.param("runs.w").unwrap())
        .unwrap();
    let mut reference = cpu.compile(&g, &[y]).unwrap();
    for seed in 0..4 {
        let xs = rand(&[9, 5], 100 + seed);
        let got = plan.run(&[("x", &xs)]).unwrap();
        let want = reference.run(&[("x", &xs)]).unwrap();
        assert_close("run", &got[0], &want[0], 1e-5, 1e-4);
    }
}

#[test]
fn parameters_stay_on_the_device_and_are_shared_by_plans() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let w = g.param("shared.w", [3, 2]);
    let x = g.input("x", [1, 3]);
    let y = g.matmul(x, w).unwrap();
    let mut p1 = dev.compile(&g, &[y]).unwrap();
    let ones = Tensor::full([1, 3], 1.0);
    assert_eq!(
        p1.run(&[("x", &ones)]).unwrap()[0].data(),
        &[0.0, 0.0],
        "zero-initialised"
    );
    // a second plan (another batch size) sees the same parameter
    let g2 = Graph::new();
    let w2 = g2.param("shared.w", [3, 2]);
    let x2 = g2.input("x", [2, 3]);
    let y2 = g2.matmul(x2, w2).unwrap();
    let mut p2 = dev.compile(&g2, &[y2]).unwrap();
    dev.set_param(
        "shared.w",
        &Tensor::new([3, 2], vec![1., 2., 3., 4., 5., 6.]).unwrap(),
    )
    .unwrap();
    assert_eq!(p1.run(&[("x", &ones)]).unwrap()[0].data(), &[9.0, 12.0]);
    assert_eq!(
        p2.run(&[("x", &Tensor::full([2, 3], 1.0))]).unwrap()[0].data(),
        &[9.0, 12.0, 9.0, 12.0]
    );
    assert_eq!(
        dev.param("shared.w").unwrap().data(),
        &[1., 2., 3., 4., 5., 6.]
    );
    assert!(matches!(
        dev.set_param("shared.w", &Tensor::zeros([2])),
        Err(Error::Param(_))
    ));
    assert!(matches!(dev.param("nope"), Err(Error::Param(_))));
}

/// A parameter declared f16 (`Graph::param_init_as`, a decoding cache) is stored, set and read
/// back as f16 on the GPU and on the CPU backend; a plan declaring it in another type is an
/// error, as one of another shape is.
#[test]
fn f16_parameters_keep_their_type() {
    let mut devices = vec![Device::cpu()];
    devices.extend(gpu().filter(|d| d.features().contains(wgpu::Features::SHADER_F16)));
    for dev in devices {
        let what = dev.describe();
        let third = Tensor::new([3], vec![1.0 / 3.0, 70000.0, -2.5]).unwrap();
        let g = Graph::new();
        let state = g.param_init_as("half.state", third.clone(), DType::F16);
        assert_eq!(g.dtype(state), DType::F16);
        let x = g.input_as("x", [3], DType::F16);
        let y = g.add(state, x).unwrap();
        let mut plan = dev.compile(&g, &[y]).unwrap();
        let stored = third.clone().rounded(DType::F16);
        assert_eq!(
            dev.param("half.state").unwrap().data(),
            stored.data(),
            "{what}"
        );
        assert_eq!(
            stored.data()[1],
            f32::INFINITY,
            "70000 is past f16's largest"
        );
        let zeros = Tensor::zeros([3]);
        let got = plan.run(&[("x", &zeros)]).unwrap().remove(0);
        assert_eq!(got.data(), stored.data(), "{what}");
        // set_param rounds to the type the device holds
        dev.set_param(
            "half.state",
            &Tensor::new([3], vec![0.1, 2.0, 1e-8]).unwrap(),
        )
        .unwrap();
        let want = Tensor::new([3], vec![0.1, 2.0, 1e-8])
            .unwrap()
            .rounded(DType::F16);
        assert_eq!(
            dev.param("half.state").unwrap().data(),
            want.data(),
            "{what}"
        );
        assert_eq!(
            plan.run(&[("x", &zeros)]).unwrap()[0].data(),
            want.data(),
            "{what}"
        );
        // the same name declared f32, or f16 of another shape
        let g = Graph::new();
        let w = g
            .exp(g.param_init("half.state", Tensor::zeros([3])))
            .unwrap();
        assert!(
            matches!(dev.compile(&g, &[w]), Err(Error::Param(_))),
            "{what}"
        );
        let g = Graph::new();
        let w = g.param_init_as("half.state", Tensor::zeros([4]), DType::F16);
        let w = g.exp(w).unwrap();
        assert!(
            matches!(dev.compile(&g, &[w]), Err(Error::Param(_))),
            "{what}"
        );
    }
}

#[test]
fn only_requested_outputs_come_back_and_reshape_is_free() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [4, 6]);
    let r = g.reshape(x, &[2, 12]).unwrap();
    let e = g.exp(r).unwrap();
    let r2 = g.reshape(e, &[24]).unwrap();
    let s = g.sum(r2, 0, false).unwrap();
    let plan = dev.compile(&g, &[s]).unwrap();
    // reshapes launch no kernel, and the exp runs inside the sum's loads
    assert_eq!(plan.info().dispatches, 1);
    let mut plan2 = dev.compile(&g, &[r2, s]).unwrap();
    assert_eq!(
        plan2.info().dispatches,
        2,
        "the exp is requested: its own kernel"
    );
    let xs = rand(&[4, 6], 3);
    let out = plan2.run(&[("x", &xs)]).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].dims(), &[24]);
    let want: Vec<f32> = xs.data().iter().map(|v| v.exp()).collect();
    assert_close(
        "exp through views",
        &out[0],
        &Tensor::new([24], want).unwrap(),
        1e-6,
        1e-5,
    );
}

#[test]
fn outputs_may_be_sources_or_views_of_sources() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [2, 3]);
    let r = g.reshape(x, &[3, 2]).unwrap();
    let mut plan = dev.compile(&g, &[x, r]).unwrap();
    let xs = rand(&[2, 3], 4);
    let out = plan.run(&[("x", &xs)]).unwrap();
    assert_eq!(out[0].data(), xs.data());
    assert_eq!(out[1].data(), xs.data());
    assert_eq!(out[1].dims(), &[3, 2]);
}

#[test]
fn bad_inputs_are_errors() {
    // the same checks on both backends
    let mut devs = vec![Device::cpu()];
    devs.extend(gpu());
    for dev in devs {
        let g = Graph::new();
        let x = g.input("x", [2, 2]);
        let unused = g.input("labels", [2]);
        let y = g.relu(x).unwrap();
        let _ = unused;
        let mut plan = dev.compile(&g, &[y]).unwrap();
        let ok = Tensor::zeros([2, 2]);
        let e = plan.run(&[]).unwrap_err();
        assert!(e.to_string().contains("\"x\" is missing"), "{e}");
        let e = plan.run(&[("x", &Tensor::zeros([4]))]).unwrap_err();
        assert!(
            e.to_string().contains("must have shape [2, 2], got [4]"),
            "{e}"
        );
        let e = plan.run(&[("x", &ok), ("y", &ok)]).unwrap_err();
        assert!(e.to_string().contains("no input \"y\""), "{e}");
        let e = plan.run(&[("x", &ok), ("x", &ok)]).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        // an input of the graph that these outputs do not need is accepted and ignored
        plan.run(&[("x", &ok), ("labels", &Tensor::zeros([2]))])
            .unwrap();
    }
}

#[test]
fn oversize_tensors_are_errors() {
    let Some(dev) = gpu() else { return };
    let limit = dev.limits().unwrap().max_storage_buffer_binding_size;
    let n = (limit / 4 + 1) as usize;
    let g = Graph::new();
    let x = g.input("x", [n, 2]);
    let y = g.relu(x).unwrap();
    assert!(matches!(dev.compile(&g, &[y]), Err(Error::TooLarge { .. })));
}

#[test]
fn cpu_backend_runs_plans() {
    let dev = Device::cpu();
    let g = Graph::new();
    let x = g.input("x", [2, 2]);
    let w = g.param_init("cpu.w", Tensor::new([2, 2], vec![1., 2., 3., 4.]).unwrap());
    let y = g.matmul(x, w).unwrap();
    let mut plan = dev.compile(&g, &[y]).unwrap();
    let out = plan
        .run(&[("x", &Tensor::new([2, 2], vec![1., 0., 0., 1.]).unwrap())])
        .unwrap();
    assert_eq!(out[0].data(), &[1., 2., 3., 4.]);
}

#[test]
fn profiler_times_every_op() {
    let Some(dev) = gpu() else { return };
    if !dev
        .features()
        .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    {
        eprintln!("NOTICE: no TIMESTAMP_QUERY_INSIDE_PASSES; profiler test skipped");
        return;
    }
    let g = Graph::new();
    let a = g.input("a", [64, 64]);
    let mm = g.matmul(a, a).unwrap();
    // of the input, not the product: its own kernel (not the product's epilogue)
    let y = g.relu(a).unwrap();
    let mut plan = dev.compile(&g, &[mm, y]).unwrap();
    assert!(plan.profile().is_empty());
    plan.set_profiling(true).unwrap();
    plan.run(&[("a", &rand(&[64, 64], 1))]).unwrap();
    let prof = plan.profile();
    assert_eq!(prof.len(), 2);
    assert!(prof[0].label.contains("matmul") && prof[0].flops == 2.0 * 64.0 * 64.0 * 64.0);
    assert!(
        prof[1].label.contains("relu")
            && prof[1].flops == 0.0
            && prof[1].bytes == 2.0 * 64.0 * 64.0 * 4.0
    );
    assert!(prof
        .iter()
        .all(|t| t.seconds >= 0.0 && t.seconds.is_finite()));
    let table = kiln::exec::profile::table(prof);
    assert!(
        table.contains("GFLOP/s") && table.contains("GB/s"),
        "{table}"
    );
}

#[test]
fn pipeline_cache_persists_to_disk() {
    let Some(dev) = gpu() else { return };
    if !dev.features().contains(wgpu::Features::PIPELINE_CACHE) {
        eprintln!("NOTICE: no PIPELINE_CACHE; pipeline cache test skipped");
        return;
    }
    let (g, y) = chain();
    dev.compile(&g, &[y]).unwrap();
    match dev.save_pipeline_cache().unwrap() {
        // KILN_PIPELINE_CACHE=0 or no cache folder
        None => eprintln!("NOTICE: pipeline cache turned off"),
        Some(path) => {
            let bytes = std::fs::metadata(&path).unwrap().len();
            assert!(bytes > 0, "{} is empty", path.display());
            // a second device starts from that file and still computes correctly
            let dev2 = Device::gpu().unwrap();
            let mut plan = dev2.compile(&g, &[y]).unwrap();
            let out = plan.run(&[("x", &Tensor::zeros([64, 64]))]).unwrap();
            assert!(out[0].data().iter().all(|&v| v == 0.0));
        }
    }
}

/// A narrow that keeps a prefix of its input's memory (start 0, every axis before it of
/// extent one) is a view: no kernel, the consumer binds the front of the input's buffer; other
/// narrows and concatenations copy. Values as the CPU reference, read back directly too.
#[test]
fn prefix_narrows_are_views() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [1, 5, 3]);
    let prefix = g.narrow(x, 1, 0, 2).unwrap(); // the first 6 elements
    let y = g.relu(prefix).unwrap();
    let inner = g.narrow(x, 2, 0, 2).unwrap(); // strided: a copy
    let joined = g.concat(&[prefix, x], 1).unwrap(); // reads the view, copies
    let f = rand(&[1, 5, 3], 3);
    let feeds = [("x", &f)];
    for (outs, dispatches) in [
        (vec![y], 1),
        (vec![prefix], 0),
        (vec![inner], 1),
        (vec![joined], 1),
    ] {
        check_views("prefix view", &dev, &g, &outs, dispatches, &feeds);
    }
}

/// Compiles `outs` (its buffers poisoned with NaN), checks its dispatch count and that its
/// values are the CPU reference's.
fn check_views(
    what: &str,
    dev: &Device,
    g: &Graph,
    outs: &[kiln::NodeId],
    dispatches: usize,
    feeds: &[(&str, &Tensor)],
) {
    let mut plan = dev.compile(g, outs).unwrap();
    plan.poison(f32::NAN);
    assert_eq!(plan.info().dispatches, dispatches, "{what}: {outs:?}");
    let got = plan.run(feeds).unwrap();
    let want = Device::cpu().compile(g, outs).unwrap().run(feeds).unwrap();
    for (a, b) in got.iter().zip(&want) {
        assert_close(what, a, b, 0.0, 1e-6);
    }
}

/// A narrow of a contiguous run starting at a multiple of 256 bytes (a binding offset every
/// adapter takes: 64 f32 elements, 128 f16) is a view too: of an input and of a computed
/// tensor, read by a kernel and read back directly, in f32 and f16; one at an unaligned offset
/// copies.
#[test]
fn aligned_narrows_are_views() {
    let Some(dev) = gpu() else { return };
    for dtype in [DType::F32, DType::F16] {
        if dtype == DType::F16 && !dev.features().contains(wgpu::Features::SHADER_F16) {
            continue;
        }
        let g = Graph::new();
        let x = g.cast(g.input("x", [3, 128]), dtype).unwrap();
        let rows = g.narrow(x, 0, 1, 2).unwrap(); // elements 128 .. 384
        let y = g.relu(rows).unwrap();
        let z = g.exp(x).unwrap();
        let last = g
            .narrow(g.reshape(z, &[384]).unwrap(), 0, 256, 128)
            .unwrap();
        let w = g.cast(g.input("w", [3, 100]), dtype).unwrap();
        let unaligned = g.narrow(w, 0, 1, 1).unwrap(); // at element 100: a copy
                                                       // at element 64: 256 bytes of f32 (a view), 128 of f16 (a copy)
        let v = g.cast(g.input("v", [2, 64]), dtype).unwrap();
        let second = g.narrow(v, 0, 1, 1).unwrap();
        let (fx, fw, fv) = (rand(&[3, 128], 4), rand(&[3, 100], 5), rand(&[2, 64], 6));
        let feeds = [("x", &fx), ("w", &fw), ("v", &fv)];
        // the casts are kernels in f16 graphs, but where one elementwise kernel alone reads
        // them (`exp` rounds x on load)
        let cast = usize::from(dtype == DType::F16);
        for (outs, dispatches) in [
            (vec![rows], cast),
            (vec![y], cast + 1),
            (vec![last], 1),
            (vec![y, last, rows], cast + 2),
            (vec![unaligned], cast + 1),
            (vec![second], cast + cast),
        ] {
            check_views(
                &format!("{dtype} view"),
                &dev,
                &g,
                &outs,
                dispatches,
                &feeds,
            );
        }
    }
}
