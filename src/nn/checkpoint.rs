//! Checkpoints: device parameters saved to and loaded from [safetensors] files under
//! PyTorch-style names (`"fc1.weight"`, `"fc1.bias"`, `"optim.fc1.weight.exp_avg"`).
//!
//! The layout is the one `safetensors.torch.save_file(model.state_dict(), path)` writes: a
//! little-endian u64 header length, a JSON header giving each tensor's dtype, shape (row-major,
//! PyTorch order) and byte range, then the raw little-endian data. So a torch `state_dict` saved
//! that way loads into the same kiln architecture, and a kiln checkpoint loads into torch with
//! `safetensors.torch.load_file`.
//!
//! kiln writes F32 only. It reads F32, and converts F16 and BF16 to f32, and integer tensors
//! (I8 to I64, U8 to U64: a batch norm's `num_batches_tracked` counter) whose every value f32
//! holds exactly; any other dtype, or an integer beyond 2^24, is an error. A file that is not valid safetensors (garbage, truncated, empty, a header whose sizes
//! do not add up) is an [`Error::Checkpoint`] naming the file and what the safetensors parser
//! reported; a file that cannot be opened or written is an [`Error::Io`].
//!
//! ```no_run
//! # fn main() -> kiln::Result<()> {
//! use std::path::Path;
//! let dev = kiln::Device::cpu();
//! dev.set_param("fc1.weight", &kiln::Tensor::zeros([4, 3]))?;
//! dev.set_param("fc1.bias", &kiln::Tensor::zeros([4]))?;
//! kiln::nn::checkpoint::save(&dev, &["fc1.weight", "fc1.bias"], Path::new("model.safetensors"))?;
//!
//! let fresh = kiln::Device::cpu();
//! kiln::nn::checkpoint::load(&fresh, Path::new("model.safetensors"), &["fc1.weight", "fc1.bias"])?;
//! # Ok(()) }
//! ```
//!
//! [safetensors]: https://huggingface.co/docs/safetensors

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// How many of a file's tensor names an error about a missing tensor lists.
const LISTED_NAMES: usize = 20;

/// Writes the named parameters of `dev` to a safetensors file at `path`, each as an F32 tensor
/// with its shape, under the name given (e.g. `"fc1.weight"`).
///
/// The file is written to a temporary file in the same directory, flushed to disk, then renamed
/// over `path`, so a crash leaves either the old file or the new one, never half of one. A name
/// given twice is written once.
///
/// Errors: [`Error::Param`] when the device has no parameter of a given name, [`Error::Io`] when
/// the file cannot be written.
pub fn save(dev: &Device, names: &[&str], path: &Path) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for &name in names {
        if !tensors.contains_key(name) {
            tensors.insert(name.to_string(), dev.param(name)?);
        }
    }
    write_file(&tensors, path)
}

/// Writes every parameter of `dev` ([`Device::param_names`]) to a safetensors file at `path`,
/// optimizer state stored as parameters (e.g. `"optim.fc1.weight.exp_avg"`) included; see
/// [`save`].
pub fn save_all(dev: &Device, path: &Path) -> Result<()> {
    let names = dev.param_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    save(dev, &names, path)
}

/// Reads the safetensors file at `path` and sets each named parameter on `dev`
/// ([`Device::set_param`]), creating the ones the device does not hold yet.
///
/// Every named tensor must be in the file, and be F32, F16 or BF16 (the last two converted to
/// f32), or integers that f32 holds exactly; these are checked for all names before any parameter is set. A parameter the device
/// already holds keeps its shape: a tensor of another shape is an error naming the tensor and
/// both shapes, and the parameters named before it have then already been set.
///
/// Errors: [`Error::Io`] when the file cannot be read; [`Error::Checkpoint`] when it is not
/// valid safetensors, lacks a named tensor (the message lists what the file has), holds one of
/// an unsupported dtype, or of a shape that differs from the device's parameter.
pub fn load(dev: &Device, path: &Path, names: &[&str]) -> Result<()> {
    let bytes = read_bytes(path)?;
    let st = parse(path, &bytes)?;
    let mut tensors = Vec::with_capacity(names.len());
    for &name in names {
        let view = st.tensor(name).map_err(|_| missing(path, &st, name))?;
        tensors.push((name, decode(path, name, &view)?));
    }
    set_all(dev, path, tensors.iter().map(|(n, t)| (*n, t)))
}

/// Loads every tensor of the safetensors file at `path` onto `dev` (see [`load`]) and returns
/// their names, sorted.
pub fn load_all(dev: &Device, path: &Path) -> Result<Vec<String>> {
    let tensors = read(path)?;
    let names = tensors.iter().map(|(n, _)| n.clone()).collect();
    set_all(dev, path, tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
    Ok(names)
}

/// The tensors of the safetensors file at `path`, sorted by name, without a device. F16, BF16 and
/// integer tensors are converted to f32 (see [`load`]); other dtypes are an error. Errors as for
/// [`load`].
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = read_bytes(path)?;
    let st = parse(path, &bytes)?;
    let mut out = st
        .iter()
        .map(|(name, view)| Ok((name.to_string(), decode(path, name, &view)?)))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A checkpoint error about `path`.
fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// An I/O error about `path`.
fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The whole file.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_err(path, e))
}

/// Parses the file's bytes; any malformation is an [`Error::Checkpoint`] with the parser's words.
fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        ckpt_err(
            path,
            format!("not a valid safetensors file ({} bytes): {e}", bytes.len()),
        )
    })
}

/// The error for a tensor `name` the file lacks, listing (up to [`LISTED_NAMES`]) what it has.
fn missing(path: &Path, st: &SafeTensors<'_>, name: &str) -> Error {
    let mut have = st.names();
    have.sort_unstable();
    let listed: Vec<String> = have
        .iter()
        .take(LISTED_NAMES)
        .map(|n| format!("{n:?}"))
        .collect();
    let more = have.len().saturating_sub(LISTED_NAMES);
    let list = match (have.len(), more) {
        (0, _) => "it holds no tensors".to_string(),
        (_, 0) => format!("it holds {}: {}", have.len(), listed.join(", ")),
        _ => format!(
            "it holds {}: {}, and {more} more",
            have.len(),
            listed.join(", ")
        ),
    };
    ckpt_err(path, format!("no tensor named {name:?}; {list}"))
}

/// Converts a stored tensor to a host f32 tensor: F32 as is, F16 and BF16 widened, integers
/// converted where f32 holds them exactly.
fn decode(path: &Path, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    let bytes = view.data();
    if let Some(ints) = integers(view.dtype(), bytes) {
        let data = ints
            .map(|v| {
                if v.unsigned_abs() <= 1 << 24 {
                    Ok(v as f32)
                } else {
                    Err(ckpt_err(
                        path,
                        format!(
                            "tensor {name:?} ({:?}) holds {v}, which f32 does not hold exactly",
                            view.dtype()
                        ),
                    ))
                }
            })
            .collect::<Result<Vec<f32>>>()?;
        return Tensor::new(view.shape().to_vec(), data)
            .map_err(|e| ckpt_err(path, format!("tensor {name:?}: {e}")));
    }
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        other => {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor {name:?} has dtype {other:?}; kiln loads F32, F16, BF16 and integer \
                     tensors only"
                ),
            ))
        }
    };
    Tensor::new(view.shape().to_vec(), data)
        .map_err(|e| ckpt_err(path, format!("tensor {name:?}: {e}")))
}

/// The values of an integer tensor's little-endian bytes (U64 values beyond i64 saturate, which
/// the exactness check then rejects), or `None` for other dtypes.
fn integers(dtype: Dtype, bytes: &[u8]) -> Option<Box<dyn Iterator<Item = i64> + '_>> {
    fn le<const W: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
        bytes
            .chunks_exact(W)
            .map(|b| b.try_into().expect("chunks of W bytes"))
    }
    Some(match dtype {
        Dtype::I8 => Box::new(bytes.iter().map(|&b| b as i8 as i64)),
        Dtype::U8 => Box::new(bytes.iter().map(|&b| b as i64)),
        Dtype::I16 => Box::new(le::<2>(bytes).map(|b| i16::from_le_bytes(b) as i64)),
        Dtype::U16 => Box::new(le::<2>(bytes).map(|b| u16::from_le_bytes(b) as i64)),
        Dtype::I32 => Box::new(le::<4>(bytes).map(|b| i32::from_le_bytes(b) as i64)),
        Dtype::U32 => Box::new(le::<4>(bytes).map(|b| u32::from_le_bytes(b) as i64)),
        Dtype::I64 => Box::new(le::<8>(bytes).map(i64::from_le_bytes)),
        Dtype::U64 => Box::new(
            le::<8>(bytes).map(|b| i64::try_from(u64::from_le_bytes(b)).unwrap_or(i64::MAX)),
        ),
        _ => return None,
    })
}

/// Sets each tensor as a parameter of `dev`; a shape mismatch names the tensor and both shapes.
fn set_all<'n>(
    dev: &Device,
    path: &Path,
    tensors: impl IntoIterator<Item = (&'n str, &'n Tensor)>,
) -> Result<()> {
    for (name, t) in tensors {
        dev.set_param(name, t).map_err(|e| match e {
            Error::Param(msg) => ckpt_err(
                path,
                format!(
                    "tensor {name:?} has shape {} in the file, which does not fit the device's \
                     parameter ({msg})",
                    t.shape()
                ),
            ),
            other => other,
        })?;
    }
    Ok(())
}

/// A host tensor as a safetensors F32 view: its elements as little-endian bytes.
struct F32View<'a>(&'a Tensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(self.0.as_bytes())
        } else {
            Cow::Owned(self.0.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.0.numel() * 4
    }
}

/// Serializes `tensors` and writes them to `path` through a temporary file in the same directory.
fn write_file(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n, F32View(t))), None)
        .map_err(|e| ckpt_err(path, format!("cannot serialize: {e}")))?;
    let tmp = temp_path(path)?;
    let written = write_synced(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_err(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(path);
    Ok(())
}

/// A fresh temporary name beside `path`: `.<file name>.tmp-<pid>-<n>`.
fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file = path.file_name().ok_or_else(|| {
        io_err(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file);
    tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Creates `tmp` (never overwriting), writes `bytes` and flushes them to disk.
fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| io_err(tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(tmp, e))?;
    f.sync_all().map_err(|e| io_err(tmp, e))
}

/// Flushes the rename to disk by syncing the directory (best effort; a no-op where directories
/// cannot be opened, e.g. Windows).
fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
