//! MNIST IDX reader: round trips through raw and gzipped files, every kind of bad file, and the
//! digits bundled in `data/mnist`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::data::mnist::{self, Mnist, Split, IMAGES_MAGIC, LABELS_MAGIC};
use kiln::Error;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kiln-mnist-idx-{}-{name}-{k}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
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
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// Three 2x3 images with pixels 0, 10, 20, ... 170 (and 255 for the last), labels 3, 0, 9.
fn tiny() -> (Vec<u8>, Vec<u8>) {
    let mut px: Vec<u8> = (0..18).map(|i| i * 10).collect();
    px[17] = 255;
    (
        idx(IMAGES_MAGIC, &[3, 2, 3], &px),
        idx(LABELS_MAGIC, &[3], &[3, 0, 9]),
    )
}

fn check_tiny(m: &Mnist) {
    assert_eq!((m.n, m.rows, m.cols), (3, 2, 3));
    assert_eq!(m.labels, vec![3, 0, 9]);
    assert_eq!(m.images.len(), 18);
    for (i, &v) in m.images.iter().take(17).enumerate() {
        assert_eq!(v, (i * 10) as f32 / 255.0, "pixel {i}");
    }
    assert_eq!(m.images[17], 1.0);
}

/// The message of an `Error::Data`, or a panic naming what came instead.
fn data_msg<T: std::fmt::Debug>(r: kiln::Result<T>) -> String {
    match r {
        Err(e @ Error::Data { .. }) => e.to_string(),
        other => panic!("expected Error::Data, got {other:?}"),
    }
}

#[test]
fn round_trip_raw_and_gzip() {
    let t = TempDir::new("roundtrip");
    let (img, lab) = tiny();
    let raw = mnist::load(&t.write("i", &img), &t.write("l", &lab)).unwrap();
    check_tiny(&raw);
    let gz = mnist::load(&t.write("i.gz", &gzip(&img)), &t.write("l.gz", &gzip(&lab))).unwrap();
    assert_eq!(gz, raw);
    // Mixed: raw images, gzipped labels.
    let mixed = mnist::load(&t.path().join("i"), &t.path().join("l.gz")).unwrap();
    assert_eq!(mixed, raw);

    let (px, n, rows, cols) = mnist::read_images(&t.path().join("i.gz")).unwrap();
    assert_eq!((px.len(), n, rows, cols), (18, 3, 2, 3));
    assert_eq!(
        mnist::read_labels(&t.path().join("l.gz")).unwrap(),
        vec![3, 0, 9]
    );

    let (x, y) = raw.batch(&[2, 0]);
    assert_eq!(x.dims(), &[2, 1, 2, 3]);
    assert_eq!(&x.data()[..6], &raw.images[12..18]);
    assert_eq!(&x.data()[6..], &raw.images[..6]);
    assert_eq!(y.dims(), &[2]);
    assert_eq!(y.data(), &[9.0, 3.0]);

    let first = raw.limit(1);
    assert_eq!(
        (first.n, first.images.len(), first.labels.clone()),
        (1, 6, vec![3])
    );
}

#[test]
fn load_split_finds_raw_and_gzip_names() {
    let t = TempDir::new("split");
    let (img, lab) = tiny();
    t.write("train-images-idx3-ubyte.gz", &gzip(&img));
    t.write("train-labels-idx1-ubyte", &lab);
    t.write("t10k-images-idx3-ubyte", &img);
    t.write("t10k-labels-idx1-ubyte.gz", &gzip(&lab));
    check_tiny(&mnist::load_split(t.path(), Split::Train).unwrap());
    check_tiny(&mnist::load_split(t.path(), Split::Test).unwrap());

    // With both names present the uncompressed file wins: make the .gz one differ.
    let one_img = idx(IMAGES_MAGIC, &[1, 1, 1], &[0]);
    let one_lab = idx(LABELS_MAGIC, &[1], &[5]);
    t.write("t10k-images-idx3-ubyte", &one_img);
    t.write("t10k-images-idx3-ubyte.gz", &gzip(&img));
    t.write("t10k-labels-idx1-ubyte", &one_lab);
    let m = mnist::load_split(t.path(), Split::Test).unwrap();
    assert_eq!((m.n, m.rows, m.cols, m.labels.clone()), (1, 1, 1, vec![5]));
}

#[test]
fn load_split_missing_files() {
    let t = TempDir::new("missing");
    let err = mnist::load_split(t.path(), Split::Train).unwrap_err();
    let msg = err.to_string();
    match &err {
        Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    assert!(
        msg.contains("train-images-idx3-ubyte and train-images-idx3-ubyte.gz"),
        "{msg}"
    );

    // Images there, labels missing: the labels' names are listed.
    let (img, _) = tiny();
    t.write("t10k-images-idx3-ubyte", &img);
    let msg = mnist::load_split(t.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("t10k-labels-idx1-ubyte and t10k-labels-idx1-ubyte.gz"),
        "{msg}"
    );

    let msg = mnist::load_split(&t.path().join("no-such-dir"), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn bad_magic() {
    let t = TempDir::new("magic");
    let (img, lab) = tiny();
    // Each file handed to the other reader, raw and gzipped.
    for (name, bytes) in [("lab", lab.clone()), ("lab.gz", gzip(&lab))] {
        let p = t.write(name, &bytes);
        let m = data_msg(mnist::read_images(&p));
        assert!(m.contains("expected 0x00000803, found 0x00000801"), "{m}");
        assert!(m.contains(name), "{m}");
    }
    for (name, bytes) in [("img", img.clone()), ("img.gz", gzip(&img))] {
        let p = t.write(name, &bytes);
        let m = data_msg(mnist::read_labels(&p));
        assert!(m.contains("expected 0x00000801, found 0x00000803"), "{m}");
    }
}

#[test]
fn truncated_images() {
    let t = TempDir::new("trunc-img");
    let (img, lab) = tiny();
    let l = t.write("l", &lab);
    let cut = &img[..img.len() - 5]; // 13 of the 18 pixels
    for (name, bytes) in [("i", cut.to_vec()), ("i.gz", gzip(cut))] {
        let p = t.write(name, &bytes);
        let m = data_msg(mnist::read_images(&p));
        assert!(m.contains("truncated images"), "{m}");
        assert!(m.contains("needs 18 data bytes"), "{m}");
        assert!(m.contains("found 13"), "{m}");
        data_msg(mnist::load(&p, &l));
    }
    // Cut inside the header.
    let p = t.write("h", &img[..10]);
    let m = data_msg(mnist::read_images(&p));
    assert!(m.contains("expected 16 bytes, found 10"), "{m}");
}

#[test]
fn truncated_labels() {
    let t = TempDir::new("trunc-lab");
    let (_, lab) = tiny();
    let cut = &lab[..lab.len() - 1];
    for (name, bytes) in [("l", cut.to_vec()), ("l.gz", gzip(cut))] {
        let p = t.write(name, &bytes);
        let m = data_msg(mnist::read_labels(&p));
        assert!(m.contains("truncated labels"), "{m}");
        assert!(m.contains("needs 3 data bytes"), "{m}");
        assert!(m.contains("found 2"), "{m}");
    }
    let p = t.write("empty", &[]);
    let m = data_msg(mnist::read_labels(&p));
    assert!(m.contains("expected 8 bytes, found 0"), "{m}");
}

#[test]
fn label_count_mismatch() {
    let t = TempDir::new("count");
    let (img, _) = tiny();
    let i = t.write("i", &img);
    let l = t.write("l", &idx(LABELS_MAGIC, &[2], &[1, 2]));
    let m = data_msg(mnist::load(&i, &l));
    assert!(m.contains("2 labels"), "{m}");
    assert!(m.contains("3 images"), "{m}");
}

#[test]
fn label_value_ten() {
    let t = TempDir::new("ten");
    let lab = idx(LABELS_MAGIC, &[4], &[0, 9, 10, 3]);
    for (name, bytes) in [("l", lab.clone()), ("l.gz", gzip(&lab))] {
        let p = t.write(name, &bytes);
        let m = data_msg(mnist::read_labels(&p));
        assert!(m.contains("label 2 is 10"), "{m}");
    }
}

#[test]
fn bundled_digits() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    for (split, n) in [(Split::Train, 8000), (Split::Test, 1000)] {
        let m = mnist::load_split(&dir, split).unwrap();
        assert_eq!(m.n, n, "{split:?}");
        assert_eq!((m.rows, m.cols), (28, 28), "{split:?}");
        assert_eq!(m.images.len(), n * 28 * 28);
        assert_eq!(m.labels.len(), n);
        assert!(
            m.images.iter().all(|&p| (0.0..=1.0).contains(&p)),
            "{split:?}: a pixel outside [0, 1]"
        );
        // Real digits: some ink and some background.
        assert!(m.images.contains(&0.0) && m.images.iter().any(|&p| p > 0.5));
        let mut seen = [0usize; 10];
        for &l in &m.labels {
            seen[l as usize] += 1;
        }
        assert!(
            seen.iter().all(|&c| c > 0),
            "{split:?}: class counts {seen:?}"
        );

        let (x, y) = m.batch(&[0, 1, 2]);
        assert_eq!(x.dims(), &[3, 1, 28, 28]);
        assert_eq!(y.dims(), &[3]);
        assert_eq!(x.data(), &m.images[..3 * 784]);
        for k in 0..3 {
            assert_eq!(y.data()[k], f32::from(m.labels[k]));
        }
    }
}
