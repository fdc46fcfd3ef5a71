//! The one error type of kiln: every public entry point returns `Result<_, kiln::Error>`.

use thiserror::Error;

/// Everything that can go wrong in kiln, from a bad shape to a lost GPU.
#[derive(Debug, Error)]
pub enum Error {
    /// A graph-building call got shapes that do not fit; the message names the op and the shapes,
    /// e.g. `matmul: [3, 4] x [5, 6]: inner dimensions 4 and 5 differ`.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// No GPU adapter could be found (or the one asked for through KILN_BACKEND / KILN_ADAPTER).
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The adapter refused to give a device, or the device reported a validation error.
    #[error("GPU device error: {0}")]
    Device(String),
    /// The device was lost (driver reset, removed GPU); plans compiled on it can no longer run.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// A GPU allocation failed.
    #[error("GPU out of memory while allocating {what} ({bytes} bytes)")]
    OutOfMemory { what: String, bytes: u64 },
    /// A tensor is larger than the adapter can bind in one storage buffer.
    #[error("tensor {what} needs {bytes} bytes, more than the adapter's limit of {limit} bytes per buffer")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
    },
    /// `Plan::run` was given an input the graph does not have, lacks one, or got a wrong shape.
    #[error("input error: {0}")]
    Input(String),
    /// A named parameter is missing or has the wrong shape.
    #[error("parameter error: {0}")]
    Param(String),
    /// A host tensor was built from data that does not match its shape.
    #[error("tensor error: {0}")]
    Tensor(String),
    /// Something the engine does not support (yet), named precisely.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A data file (e.g. an MNIST IDX file) is malformed: bad magic, truncated, bad gzip, bad
    /// values; the message says what was expected and what was found.
    #[error("bad data file {path}: {msg}")]
    Data { path: String, msg: String },
    /// A checkpoint (safetensors file) is malformed or does not fit: not safetensors, truncated,
    /// a header that lies about sizes, a missing tensor, an unsupported dtype, a shape that differs
    /// from the device's parameter; the message names the tensor and what was found.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a [`Error::Shape`] from an op name and a formatted message.
pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Shape {
        op,
        msg: msg.into(),
    }
}
