//! Checkpoints (`kiln::nn::checkpoint`): safetensors files with PyTorch-style names round-trip bit
//! for bit, load what torch's `safetensors.torch.save_file` writes, and turn every bad file into a
//! `kiln::Error` that names the file and the tensor, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kiln::nn::checkpoint;
use kiln::{Device, Error, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-checkpoint-{test}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// f32 values that a lossy path would change: NaNs with payloads and signs, signed zeros,
/// subnormals, infinities, extremes.
fn special_values() -> Vec<f32> {
    [
        0x7fc0_0000u32, // quiet NaN
        0x7fc0_1234,    // quiet NaN with a payload
        0xffc0_0001,    // negative NaN with a payload
        0x7f80_0001,    // signalling NaN
        0x8000_0000,    // -0.0
        0x0000_0000,    // +0.0
        0x0000_0001,    // smallest subnormal
        0x807f_ffff,    // largest negative subnormal
        0x7f80_0000,    // +inf
        0xff80_0000,    // -inf
        0x7f7f_ffff,    // f32::MAX
        0x0080_0000,    // f32::MIN_POSITIVE
    ]
    .into_iter()
    .map(f32::from_bits)
    .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.data().iter().map(|v| v.to_bits()).collect()
}

/// Asserts that `got` has the shape and the exact bits of `want`.
fn assert_bits(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    assert_eq!(bits(got), bits(want), "{what}: bits differ");
}

/// The parameters of a small MLP with Adam state, as a torch `state_dict` would name them.
fn mlp_params() -> Vec<(&'static str, Tensor)> {
    vec![
        ("fc1.weight", Tensor::new([4, 3], special_values()).unwrap()),
        (
            "fc1.bias",
            Tensor::new([4], vec![1.5, -0.0, f32::from_bits(3), f32::NAN]).unwrap(),
        ),
        ("fc2.weight", Tensor::rand_uniform([2, 4], -1.0, 1.0, 7)),
        ("fc2.bias", Tensor::scalar(-2.25).reshape([1]).unwrap()),
        ("step", Tensor::scalar(42.0)),
        (
            "optim.fc1.weight.exp_avg",
            Tensor::rand_uniform([4, 3], -1e-3, 1e-3, 8),
        ),
        (
            "optim.fc1.weight.exp_avg_sq",
            Tensor::rand_uniform([4, 3], 0.0, 1e-6, 9),
        ),
    ]
}

fn device_with(params: &[(&str, Tensor)]) -> Device {
    let dev = Device::cpu();
    for (name, t) in params {
        dev.set_param(name, t).unwrap();
    }
    dev
}

/// The message of an `Error::Checkpoint`, or a panic naming what came instead.
fn checkpoint_msg<T: std::fmt::Debug>(r: kiln::Result<T>) -> String {
    match r {
        Err(e @ Error::Checkpoint { .. }) => e.to_string(),
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

/// A safetensors file as torch's `save_file` lays it out, from (name, dtype, shape, LE bytes).
fn torch_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn save_all_then_load_all_round_trips_bit_for_bit() {
    let dir = TempDir::new("roundtrip-all");
    let params = mlp_params();
    let dev = device_with(&params);
    let path = dir.file("model.safetensors");
    checkpoint::save_all(&dev, &path).unwrap();

    let fresh = Device::cpu();
    let names = checkpoint::load_all(&fresh, &path).unwrap();
    let mut want: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(fresh.param_names(), want);
    for (name, t) in &params {
        assert_bits(name, &fresh.param(name).unwrap(), t);
    }

    // read gives the same tensors, sorted by name, without a device
    let read = checkpoint::read(&path).unwrap();
    let read_names: Vec<&str> = read.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(read_names, want);
    for (name, t) in &read {
        let (_, orig) = params.iter().find(|(n, _)| n == name).unwrap();
        assert_bits(name, t, orig);
    }

    // no temporary file is left beside the checkpoint
    let left: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model.safetensors")]);
}

#[test]
fn save_names_then_load_names_into_existing_parameters() {
    let dir = TempDir::new("roundtrip-names");
    let dev = device_with(&mlp_params());
    let path = dir.file("fc1.safetensors");
    checkpoint::save(&dev, &["fc1.weight", "fc1.bias", "fc1.weight"], &path).unwrap();
    let st_bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&st_bytes).unwrap();
    let mut names = st.names();
    names.sort_unstable();
    assert_eq!(names, ["fc1.bias", "fc1.weight"]);

    // a device that already holds the parameters, with other values, of the same shapes
    let other = Device::cpu();
    other
        .set_param("fc1.weight", &Tensor::zeros([4, 3]))
        .unwrap();
    other.set_param("fc1.bias", &Tensor::zeros([4])).unwrap();
    checkpoint::load(&other, &path, &["fc1.weight", "fc1.bias"]).unwrap();
    for name in ["fc1.weight", "fc1.bias"] {
        assert_bits(name, &other.param(name).unwrap(), &dev.param(name).unwrap());
    }

    // overwriting an existing checkpoint replaces it whole
    dev.set_param("fc1.bias", &Tensor::full([4], 9.0)).unwrap();
    checkpoint::save(&dev, &["fc1.bias"], &path).unwrap();
    let read = checkpoint::read(&path).unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].0, "fc1.bias");
    assert_eq!(read[0].1.data(), &[9.0; 4]);
}

#[test]
fn names_dtype_shapes_and_bytes_are_stored_as_torch_expects() {
    let dir = TempDir::new("layout");
    let params = mlp_params();
    let dev = device_with(&params);
    let path = dir.file("model.safetensors");
    checkpoint::save(&dev, &["fc1.weight", "fc1.bias", "step"], &path).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort_unstable();
    assert_eq!(names, ["fc1.bias", "fc1.weight", "step"]);
    for (name, shape) in [
        ("fc1.weight", &[4usize, 3][..]),
        ("fc1.bias", &[4][..]),
        ("step", &[][..]),
    ] {
        let v = st.tensor(name).unwrap();
        assert_eq!(v.dtype(), Dtype::F32, "{name}");
        assert_eq!(v.shape(), shape, "{name}");
        let (_, t) = params.iter().find(|(n, _)| *n == name).unwrap();
        assert_eq!(v.data(), le_f32(t.data()).as_slice(), "{name}: bytes");
    }
}

#[test]
fn a_torch_state_dict_file_with_f16_and_bf16_loads() {
    let dir = TempDir::new("torch");
    let path = dir.file("torch.safetensors");
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let b = [0.5f32, -0.0, 1e-40, f32::INFINITY];
    let h: Vec<f32> = vec![1.0, -2.5, 0.375, 65504.0, -0.0, 2f32.powi(-24)];
    let h_bytes: Vec<u8> = h
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    let bf: Vec<f32> = vec![1.0, -3.0e38, 0.0078125];
    let bf_bytes: Vec<u8> = bf
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    torch_file(
        &path,
        &[
            ("fc1.weight", Dtype::F32, vec![4, 3], le_f32(&w)),
            ("fc1.bias", Dtype::F32, vec![4], le_f32(&b)),
            ("emb.weight", Dtype::F16, vec![2, 3], h_bytes),
            ("head.weight", Dtype::BF16, vec![3], bf_bytes),
        ],
    );

    let dev = Device::cpu();
    checkpoint::load(&dev, &path, &["fc1.weight", "fc1.bias", "emb.weight"]).unwrap();
    assert_eq!(dev.param_names(), ["emb.weight", "fc1.bias", "fc1.weight"]);
    assert_bits(
        "fc1.weight",
        &dev.param("fc1.weight").unwrap(),
        &Tensor::new([4, 3], w).unwrap(),
    );
    assert_bits(
        "fc1.bias",
        &dev.param("fc1.bias").unwrap(),
        &Tensor::new([4], b.to_vec()).unwrap(),
    );
    // every f16 value above is exact in f16, so widening gives it back exactly
    assert_bits(
        "emb.weight",
        &dev.param("emb.weight").unwrap(),
        &Tensor::new([2, 3], h).unwrap(),
    );

    let all = Device::cpu();
    let names = checkpoint::load_all(&all, &path).unwrap();
    assert_eq!(
        names,
        ["emb.weight", "fc1.bias", "fc1.weight", "head.weight"]
    );
    let head = all.param("head.weight").unwrap();
    assert_eq!(head.dims(), &[3]);
    let want: Vec<f32> = bf
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(
        bits(&head),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn a_missing_tensor_is_named_with_what_the_file_has() {
    let dir = TempDir::new("missing-tensor");
    let path = dir.file("model.safetensors");
    checkpoint::save_all(&device_with(&mlp_params()), &path).unwrap();
    let dev = Device::cpu();
    let msg = checkpoint_msg(checkpoint::load(&dev, &path, &["fc1.weight", "fc3.weight"]));
    assert!(msg.contains("\"fc3.weight\""), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("\"fc1.bias\"") && msg.contains("\"optim.fc1.weight.exp_avg\""),
        "the message lists the file's tensors: {msg}"
    );
    // nothing was set: names are checked before any parameter is
    assert!(dev.param_names().is_empty());

    // a file with many tensors lists 20 of them and counts the rest
    let many: Vec<(String, Tensor)> = (0..25)
        .map(|i| (format!("layer{i:02}.weight"), Tensor::full([2], i as f32)))
        .collect();
    let big = device_with(
        &many
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect::<Vec<_>>(),
    );
    let path = dir.file("many.safetensors");
    checkpoint::save_all(&big, &path).unwrap();
    let msg = checkpoint_msg(checkpoint::load(&Device::cpu(), &path, &["nope"]));
    assert!(msg.contains("\"nope\""), "{msg}");
    assert!(msg.contains("\"layer19.weight\""), "{msg}");
    assert!(!msg.contains("\"layer20.weight\""), "{msg}");
    assert!(msg.contains("5 more"), "{msg}");
}

#[test]
fn a_shape_that_differs_from_the_device_parameter_names_both_shapes() {
    let dir = TempDir::new("wrong-shape");
    let path = dir.file("model.safetensors");
    checkpoint::save_all(&device_with(&mlp_params()), &path).unwrap();
    let dev = Device::cpu();
    dev.set_param("fc1.weight", &Tensor::zeros([3, 4])).unwrap();
    let msg = checkpoint_msg(checkpoint::load(&dev, &path, &["fc1.weight"]));
    assert!(msg.contains("fc1.weight"), "{msg}");
    assert!(msg.contains("[4, 3]") && msg.contains("[3, 4]"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    // the device keeps its parameter as it was
    assert_eq!(dev.param("fc1.weight").unwrap(), Tensor::zeros([3, 4]));

    let msg = checkpoint_msg(checkpoint::load_all(&dev, &path));
    assert!(
        msg.contains("fc1.weight") && msg.contains("[3, 4]"),
        "{msg}"
    );
}

#[test]
fn integer_tensors_load_where_f32_holds_them_and_other_dtypes_are_named() {
    let dir = TempDir::new("dtype");
    // a torch batch norm's state_dict: num_batches_tracked is a 0-d I64 counter
    let path = dir.file("torch.safetensors");
    let i64s = |v: &[i64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    torch_file(
        &path,
        &[
            ("bn.weight", Dtype::F32, vec![2], le_f32(&[1.0, 2.0])),
            ("bn.num_batches_tracked", Dtype::I64, vec![], i64s(&[3])),
            (
                "ids",
                Dtype::I32,
                vec![3],
                [7i32, -1, 1 << 24]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            ("mask", Dtype::U8, vec![2], vec![0, 255]),
        ],
    );
    let dev = Device::cpu();
    let names = checkpoint::load_all(&dev, &path).unwrap();
    assert_eq!(names.len(), 4);
    assert_eq!(dev.param("bn.num_batches_tracked").unwrap().data(), &[3.0]);
    assert_eq!(dev.param("ids").unwrap().data(), &[7.0, -1.0, 16777216.0]);
    assert_eq!(dev.param("mask").unwrap().data(), &[0.0, 255.0]);

    // an integer f32 would round, and a dtype kiln does not convert, are named
    let big = dir.file("big.safetensors");
    torch_file(
        &big,
        &[
            ("fc1.weight", Dtype::F32, vec![2], le_f32(&[1.0, 2.0])),
            ("steps", Dtype::I64, vec![2], i64s(&[3, (1 << 24) + 1])),
            ("flags", Dtype::BOOL, vec![1], vec![1]),
        ],
    );
    checkpoint::load(&Device::cpu(), &big, &["fc1.weight"]).unwrap();
    for (r, name, part) in [
        (
            checkpoint::load(&Device::cpu(), &big, &["steps"]).map(|_| ()),
            "steps",
            "16777217",
        ),
        (
            checkpoint::load(&Device::cpu(), &big, &["flags"]).map(|_| ()),
            "flags",
            "BOOL",
        ),
    ] {
        let msg = checkpoint_msg(r);
        assert!(msg.contains(name) && msg.contains(part), "{msg}");
    }
    // reading the whole file stops at the first of the two
    for r in [
        checkpoint::read(&big).map(|_| ()),
        checkpoint::load_all(&Device::cpu(), &big).map(|_| ()),
    ] {
        let msg = checkpoint_msg(r);
        assert!(
            msg.contains("\"steps\"") || msg.contains("\"flags\""),
            "{msg}"
        );
    }
}

#[test]
fn bad_files_are_checkpoint_errors_naming_the_file() {
    let dir = TempDir::new("bad-files");
    let good = dir.file("good.safetensors");
    checkpoint::save_all(&device_with(&mlp_params()), &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let mut lying_len = bytes.clone();
    lying_len[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());

    // a header whose shape needs 48 bytes but whose offsets give 40, with 40 bytes of data
    let header = br#"{"fc1.weight":{"dtype":"F32","shape":[4,3],"data_offsets":[0,40]}}"#;
    let mut lying_shape = (header.len() as u64).to_le_bytes().to_vec();
    lying_shape.extend_from_slice(header);
    lying_shape.extend_from_slice(&[0u8; 40]);

    // a header that promises more data than the file holds
    let header = br#"{"fc1.weight":{"dtype":"F32","shape":[4,3],"data_offsets":[0,48]}}"#;
    let mut short_data = (header.len() as u64).to_le_bytes().to_vec();
    short_data.extend_from_slice(header);
    short_data.extend_from_slice(&[0u8; 20]);

    let garbage: Vec<u8> = (0..1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", garbage),
        ("text", b"this is not a checkpoint at all".to_vec()),
        ("cut-data", bytes[..bytes.len() - 5].to_vec()),
        ("cut-header", bytes[..8 + header_len / 2].to_vec()),
        ("cut-length", bytes[..5].to_vec()),
        ("trailing", [bytes.clone(), vec![0u8; 3]].concat()),
        ("lying-length", lying_len),
        ("lying-shape", lying_shape),
        ("short-data", short_data),
        ("huge-length", u64::MAX.to_le_bytes().to_vec()),
    ];
    for (what, data) in cases {
        let path = dir.file(&format!("{what}.safetensors"));
        std::fs::write(&path, &data).unwrap();
        let shown = path.display().to_string();
        for r in [
            checkpoint::read(&path).map(|_| ()),
            checkpoint::load(&Device::cpu(), &path, &["fc1.weight"]),
            checkpoint::load_all(&Device::cpu(), &path).map(|_| ()),
        ] {
            let msg = checkpoint_msg(r);
            assert!(msg.contains(&shown), "{what}: {msg}");
            assert!(msg.contains("safetensors"), "{what}: {msg}");
        }
    }
}

#[test]
fn missing_files_and_unwritable_paths_are_io_errors() {
    let dir = TempDir::new("io");
    let path = dir.file("nope.safetensors");
    let is_io = |r: kiln::Result<()>, what: &str| match r {
        Err(e @ Error::Io { .. }) => {
            assert!(e.to_string().contains("nope"), "{what}: {e}");
        }
        other => panic!("{what}: expected Error::Io, got {other:?}"),
    };
    is_io(checkpoint::read(&path).map(|_| ()), "read");
    is_io(
        checkpoint::load(&Device::cpu(), &path, &["fc1.weight"]),
        "load",
    );
    is_io(
        checkpoint::load_all(&Device::cpu(), &path).map(|_| ()),
        "load_all",
    );
    let dev = device_with(&mlp_params());
    is_io(
        checkpoint::save_all(&dev, &dir.file("nope/model.safetensors")),
        "save into a missing directory",
    );
    // a parameter the device lacks cannot be saved
    match checkpoint::save(&dev, &["fc9.weight"], &dir.file("x.safetensors")) {
        Err(e @ Error::Param(_)) => assert!(e.to_string().contains("fc9.weight"), "{e}"),
        other => panic!("expected Error::Param, got {other:?}"),
    }
    assert!(!dir.file("x.safetensors").exists());
}

#[test]
fn gpu_round_trip() {
    let dev = match Device::gpu() {
        Ok(d) => d,
        Err(e) => {
            if std::env::var("KILN_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("KILN_REQUIRE_GPU=1 but no GPU adapter: {e}");
            }
            eprintln!("NOTICE: no GPU adapter ({e}); checkpoint GPU round trip skipped");
            return;
        }
    };
    let dir = TempDir::new("gpu");
    let params = mlp_params();
    for (name, t) in &params {
        dev.set_param(name, t).unwrap();
    }
    let path = dir.file("gpu.safetensors");
    checkpoint::save_all(&dev, &path).unwrap();

    // GPU -> file -> fresh GPU device, bit for bit
    let fresh = Device::gpu().unwrap();
    checkpoint::load_all(&fresh, &path).unwrap();
    for (name, t) in &params {
        assert_bits(name, &fresh.param(name).unwrap(), t);
    }
    // and into existing GPU parameters, and onto the CPU backend
    fresh
        .set_param("fc1.weight", &Tensor::zeros([4, 3]))
        .unwrap();
    checkpoint::load(&fresh, &path, &["fc1.weight"]).unwrap();
    assert_bits(
        "fc1.weight",
        &fresh.param("fc1.weight").unwrap(),
        &params[0].1,
    );
    let cpu = Device::cpu();
    checkpoint::load_all(&cpu, &path).unwrap();
    for (name, t) in &params {
        assert_bits(name, &cpu.param(name).unwrap(), t);
    }
}
