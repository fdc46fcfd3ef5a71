//! Data sets read from disk into host memory, ready to become [`Tensor`](crate::Tensor) batches.
//!
//! - [`mnist`]: MNIST digits in IDX files, raw or gzip-compressed (the bundled `data/mnist`).
//!
//! Malformed files are [`Error::Data`](crate::Error::Data) errors naming the file and what was
//! expected and found; files that cannot be read are [`Error::Io`](crate::Error::Io).

pub mod mnist;
