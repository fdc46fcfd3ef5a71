//! MNIST digits from IDX files, raw or gzip-compressed.
//!
//! The IDX format is a big-endian header followed by the raw bytes:
//!
//! - images (`*-images-idx3-ubyte`): magic `0x00000803`, then the image count, the rows and the
//!   columns as `u32`, then `count * rows * cols` pixels, one byte each, row-major;
//! - labels (`*-labels-idx1-ubyte`): magic `0x00000801`, then the label count as `u32`, then one
//!   byte per label, a digit 0-9.
//!
//! A file is decompressed when it starts with the gzip magic bytes `1f 8b`, whatever its name.
//! Pixels become `f32` in `[0, 1]` (`byte / 255`), and [`Mnist::batch`] gathers digits into the
//! `(B, 1, 28, 28)` image and `(B,)` label tensors a CNN takes:
//!
//! ```no_run
//! # fn main() -> kiln::Result<()> {
//! use kiln::data::mnist::{self, Split};
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
//! let train = mnist::load_split(&dir, Split::Train)?.limit(1000);
//! let (x, y) = train.batch(&[0, 1, 2, 3]);
//! assert_eq!(x.dims(), &[4, 1, 28, 28]);
//! assert_eq!(y.dims(), &[4]);
//! # Ok(()) }
//! ```
//!
//! Malformed files (bad magic, truncated or trailing data, bad gzip, a label above 9, sizes that
//! overflow) are [`Error::Data`] errors that name the file and say what was expected and what
//! was found; files that cannot be read are [`Error::Io`].

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (MNIST images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (MNIST labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A set of MNIST digits in host memory: `n` images of `rows x cols` pixels and their labels.
///
/// The fields are consistent by construction ([`load`], [`load_split`], [`Mnist::limit`]):
/// `images.len() == n * rows * cols` and `labels.len() == n`.
#[derive(Clone, PartialEq)]
pub struct Mnist {
    /// The pixels, shape `(N, 28, 28)` (generally `(n, rows, cols)`), row-major, each
    /// `byte / 255` in `[0, 1]` (0 = background, 1 = full ink).
    pub images: Vec<f32>,
    /// The class of each image, shape `(N,)`, a digit 0-9.
    pub labels: Vec<u8>,
    /// Number of digits `N`.
    pub n: usize,
    /// Rows per image (28 for MNIST).
    pub rows: usize,
    /// Columns per image (28 for MNIST).
    pub cols: usize,
}

impl fmt::Debug for Mnist {
    /// A summary (the sizes), not the millions of pixels.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mnist")
            .field("n", &self.n)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("images", &format_args!("[f32; {}]", self.images.len()))
            .field("labels", &format_args!("[u8; {}]", self.labels.len()))
            .finish()
    }
}

impl Mnist {
    /// Gathers the digits at `indices` (in that order, repeats allowed) into an image tensor of
    /// shape `(B, 1, rows, cols)` — `(B, 1, 28, 28)` for MNIST — and a label tensor of shape
    /// `(B,)` holding each class index as an `f32` (`3.0` for a 3), where `B = indices.len()`.
    ///
    /// # Panics
    ///
    /// When an index is `>= self.n`; indices come from the caller, not from a file.
    pub fn batch(&self, indices: &[usize]) -> (Tensor, Tensor) {
        let px = self.rows * self.cols;
        let mut x = Tensor::zeros([indices.len(), 1, self.rows, self.cols]);
        let mut y = Tensor::zeros([indices.len()]);
        for (k, &i) in indices.iter().enumerate() {
            assert!(
                i < self.n,
                "Mnist::batch: index {i} is out of range for {} digits",
                self.n
            );
            x.data_mut()[k * px..(k + 1) * px].copy_from_slice(&self.images[i * px..(i + 1) * px]);
            y.data_mut()[k] = f32::from(self.labels[i]);
        }
        (x, y)
    }

    /// The first `n` digits (all of them when there are fewer), e.g. for a quick run.
    pub fn limit(mut self, n: usize) -> Mnist {
        let n = n.min(self.n);
        self.images.truncate(n * self.rows * self.cols);
        self.images.shrink_to_fit();
        self.labels.truncate(n);
        self.labels.shrink_to_fit();
        self.n = n;
        self
    }
}

/// Which half of MNIST to load with [`load_split`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`.
    Train,
    /// `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`.
    Test,
}

impl Split {
    /// The file names (without `.gz`) of the images and the labels.
    fn file_names(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Reads an IDX image file: returns `(pixels, n, rows, cols)` with the pixels row-major in
/// shape `(n, rows, cols)`, each `byte / 255` in `[0, 1]`.
pub fn read_images(path: &Path) -> Result<(Vec<f32>, usize, usize, usize)> {
    let bytes = read_file(path)?;
    let (dims, data) = parse_idx(path, &bytes, "images", IMAGES_MAGIC, 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(data_err(
            path,
            format!("images of {rows}x{cols} pixels are empty"),
        ));
    }
    let pixels = data.iter().map(|&b| f32::from(b) / 255.0).collect();
    Ok((pixels, n, rows, cols))
}

/// Reads an IDX label file: one class per digit, each 0-9.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_file(path)?;
    let (_, data) = parse_idx(path, &bytes, "labels", LABELS_MAGIC, 1)?;
    if let Some((i, &v)) = data.iter().enumerate().find(|&(_, &v)| v > 9) {
        return Err(data_err(path, format!("label {i} is {v}, not a digit 0-9")));
    }
    Ok(data.to_vec())
}

/// Reads an image file and its label file; errors when their counts differ.
pub fn load(images: &Path, labels: &Path) -> Result<Mnist> {
    let (pixels, n, rows, cols) = read_images(images)?;
    let labels_v = read_labels(labels)?;
    if labels_v.len() != n {
        return Err(data_err(
            labels,
            format!(
                "{} labels, but {} holds {n} images",
                labels_v.len(),
                images.display()
            ),
        ));
    }
    Ok(Mnist {
        images: pixels,
        labels: labels_v,
        n,
        rows,
        cols,
    })
}

/// Loads the training or the test digits from `dir`, which holds the standard file names, each
/// raw or with `.gz` (the raw one is taken when both are there). A missing file is an
/// [`Error::Io`] of kind `NotFound` that lists the names looked for.
pub fn load_split(dir: &Path, split: Split) -> Result<Mnist> {
    let (images, labels) = split.file_names();
    let images = find(dir, images, split, "images")?;
    let labels = find(dir, labels, split, "labels")?;
    load(&images, &labels)
}

/// `dir/stem` if it is a file, else `dir/stem.gz`, else a `NotFound` error naming both.
fn find(dir: &Path, stem: &str, split: Split, what: &str) -> Result<PathBuf> {
    let raw = dir.join(stem);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{stem}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let note = if dir.is_dir() {
        ""
    } else {
        " (the directory does not exist)"
    };
    Err(Error::Io {
        path: dir.display().to_string(),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no MNIST {} {what}: looked for {stem} and {stem}.gz{note}",
                split.name()
            ),
        ),
    })
}

fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The bytes of a file, decompressed when it starts with the gzip magic.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    if !raw.starts_with(&GZIP_MAGIC) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .map_err(|e| {
            data_err(
                path,
                format!(
                    "bad gzip data ({} compressed bytes, {} decompressed before the error): {e}",
                    raw.len(),
                    out.len()
                ),
            )
        })?;
    Ok(out)
}

/// Describes a magic number found where another was expected.
fn describe_magic(m: u32) -> &'static str {
    match m {
        IMAGES_MAGIC => " (an IDX image file)",
        LABELS_MAGIC => " (an IDX label file)",
        _ if m >> 16 != 0 => " (not an IDX file)",
        _ => "",
    }
}

/// Checks the magic and reads `ndims` big-endian `u32` sizes, then returns them and exactly the
/// `product(sizes)` data bytes that follow; a short or long file is an error.
fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    kind: &str,
    magic: u32,
    ndims: usize,
) -> Result<(Vec<usize>, &'a [u8])> {
    let be_u32 =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(data_err(
            path,
            format!(
                "truncated {kind} header: expected {header_len} bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let found = be_u32(0);
    if found != magic {
        return Err(data_err(
            path,
            format!(
                "bad magic for {kind}: expected 0x{magic:08x}, found 0x{found:08x}{}",
                describe_magic(found)
            ),
        ));
    }
    if bytes.len() < header_len {
        return Err(data_err(
            path,
            format!(
                "truncated {kind} header: expected {header_len} bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    for d in 0..ndims {
        let v = be_u32(4 + 4 * d);
        let v = usize::try_from(v)
            .map_err(|_| data_err(path, format!("{kind} size {v} does not fit in usize")))?;
        dims.push(v);
    }
    let len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            data_err(
                path,
                format!("{kind} sizes {dims:?} overflow: their product does not fit in usize"),
            )
        })?;
    let data = &bytes[header_len..];
    if data.len() < len {
        return Err(data_err(
            path,
            format!(
                "truncated {kind}: the header {dims:?} needs {len} data bytes \
                 ({} with the header), found {} ({} with the header)",
                header_len.saturating_add(len),
                data.len(),
                bytes.len()
            ),
        ));
    }
    if data.len() > len {
        return Err(data_err(
            path,
            format!(
                "{} bytes after the {kind} data: the header {dims:?} declares {len} data bytes \
                 ({} with the header), found {} ({} with the header)",
                data.len() - len,
                header_len + len,
                data.len(),
                bytes.len()
            ),
        ));
    }
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("kiln-mnist-unit-{}-{name}-{k}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).expect("write temp file");
            p
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).expect("gzip");
        e.finish().expect("gzip")
    }

    fn data_msg(r: Result<impl fmt::Debug>) -> String {
        match r {
            Err(e @ Error::Data { .. }) => e.to_string(),
            other => panic!("expected Error::Data, got {other:?}"),
        }
    }

    #[test]
    fn pixels_scale_to_unit_interval() {
        let t = TempDir::new("scale");
        let p = t.write("img", &idx(IMAGES_MAGIC, &[1, 2, 2], &[0, 255, 51, 128]));
        let (px, n, rows, cols) = read_images(&p).unwrap();
        assert_eq!((n, rows, cols), (1, 2, 2));
        assert_eq!(px, vec![0.0, 1.0, 0.2, 128.0 / 255.0]);
    }

    #[test]
    fn gzip_is_detected_by_magic_not_name() {
        let t = TempDir::new("detect");
        let raw = idx(LABELS_MAGIC, &[3], &[7, 0, 9]);
        let a = t.write("labels.gz", &raw); // raw bytes, misleading name
        let b = t.write("labels", &gzip(&raw)); // gzip bytes, no .gz
        assert_eq!(read_labels(&a).unwrap(), vec![7, 0, 9]);
        assert_eq!(read_labels(&b).unwrap(), vec![7, 0, 9]);
    }

    #[test]
    fn empty_set_is_fine() {
        let t = TempDir::new("empty");
        let i = t.write("i", &idx(IMAGES_MAGIC, &[0, 28, 28], &[]));
        let l = t.write("l", &idx(LABELS_MAGIC, &[0], &[]));
        let m = load(&i, &l).unwrap();
        assert_eq!((m.n, m.rows, m.cols), (0, 28, 28));
        let (x, y) = m.batch(&[]);
        assert_eq!(x.dims(), &[0, 1, 28, 28]);
        assert_eq!(y.dims(), &[0]);
    }

    #[test]
    fn short_header_and_zero_size_images() {
        let t = TempDir::new("header");
        let p = t.write("a", &[0, 0, 8]);
        let m = data_msg(read_images(&p));
        assert!(m.contains("expected 16 bytes, found 3"), "{m}");
        let p = t.write("b", &idx(IMAGES_MAGIC, &[5, 28], &[]));
        let m = data_msg(read_images(&p));
        assert!(m.contains("expected 16 bytes, found 12"), "{m}");
        let p = t.write("c", &idx(IMAGES_MAGIC, &[5, 0, 28], &[]));
        let m = data_msg(read_images(&p));
        assert!(m.contains("0x28"), "{m}");
    }

    #[test]
    fn magic_is_described() {
        let t = TempDir::new("magic");
        let p = t.write("a", &idx(0x4d5a_9000, &[1], &[1]));
        let m = data_msg(read_labels(&p));
        assert!(
            m.contains("expected 0x00000801, found 0x4d5a9000 (not an IDX file)"),
            "{m}"
        );
        let p = t.write("b", &idx(IMAGES_MAGIC, &[1, 1, 1], &[1]));
        let m = data_msg(read_labels(&p));
        assert!(m.contains("found 0x00000803 (an IDX image file)"), "{m}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let t = TempDir::new("trailing");
        let p = t.write("l", &idx(LABELS_MAGIC, &[2], &[1, 2, 3, 4]));
        let m = data_msg(read_labels(&p));
        assert!(m.contains("2 bytes after the labels data"), "{m}");
        assert!(m.contains("declares 2 data bytes"), "{m}");
    }

    #[test]
    fn overflowing_sizes_are_an_error() {
        let t = TempDir::new("overflow");
        let p = t.write(
            "i",
            &idx(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[0; 8]),
        );
        let m = data_msg(read_images(&p));
        assert!(m.contains("overflow"), "{m}");
        if usize::BITS < 64 {
            return;
        }
        // Sizes that multiply fine but far exceed the file are a truncation, not an allocation.
        let p = t.write(
            "j",
            &idx(IMAGES_MAGIC, &[1 << 20, 1 << 10, 1 << 10], &[0; 8]),
        );
        let m = data_msg(read_images(&p));
        assert!(m.contains("needs 1099511627776 data bytes"), "{m}");
        assert!(m.contains("found 8"), "{m}");
    }

    #[test]
    fn corrupt_gzip_is_a_data_error() {
        let t = TempDir::new("gzip");
        let raw = idx(LABELS_MAGIC, &[4], &[1, 2, 3, 4]);
        let gz = gzip(&raw);

        // The gzip magic followed by garbage.
        let p = t.write("garbage", &[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(data_msg(read_labels(&p)).contains("bad gzip"));

        // A stream cut in half.
        let p = t.write("cut", &gz[..gz.len() / 2]);
        assert!(data_msg(read_labels(&p)).contains("bad gzip"));

        // A wrong CRC in the trailer.
        let mut bad = gz.clone();
        let n = bad.len();
        bad[n - 8] ^= 0xff;
        let p = t.write("crc", &bad);
        assert!(data_msg(read_labels(&p)).contains("bad gzip"));

        // A decompressed payload that is itself truncated says so, after decompression.
        let p = t.write("short", &gzip(&raw[..raw.len() - 1]));
        let m = data_msg(read_labels(&p));
        assert!(m.contains("needs 4 data bytes"), "{m}");
        assert!(m.contains("found 3"), "{m}");
    }

    #[test]
    fn missing_file_is_io() {
        let t = TempDir::new("missing");
        match read_images(&t.0.join("nope")) {
            Err(Error::Io { path, source }) => {
                assert!(path.ends_with("nope"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
    }

    #[test]
    fn batch_and_limit() {
        let m = Mnist {
            images: (0..3 * 4).map(|v| v as f32).collect(),
            labels: vec![5, 6, 7],
            n: 3,
            rows: 2,
            cols: 2,
        };
        let (x, y) = m.batch(&[2, 0, 2]);
        assert_eq!(x.dims(), &[3, 1, 2, 2]);
        assert_eq!(
            x.data(),
            &[8., 9., 10., 11., 0., 1., 2., 3., 8., 9., 10., 11.]
        );
        assert_eq!(y.data(), &[7., 5., 7.]);
        let dbg = format!("{m:?}");
        assert!(dbg.contains("[f32; 12]"), "{dbg}");
        let l = m.clone().limit(2);
        assert_eq!(
            (l.n, l.images.len(), l.labels.as_slice()),
            (2, 8, &[5u8, 6][..])
        );
        assert_eq!(m.clone().limit(10), m);
    }

    #[test]
    #[should_panic(expected = "index 3 is out of range for 3 digits")]
    fn batch_index_out_of_range_panics() {
        let m = Mnist {
            images: vec![0.0; 3],
            labels: vec![0; 3],
            n: 3,
            rows: 1,
            cols: 1,
        };
        let _ = m.batch(&[3]);
    }
}
