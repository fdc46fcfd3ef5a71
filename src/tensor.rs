//! Host tensors, shapes and dtypes, and the helpers that move them between host and GPU layouts.

use crate::error::{Error, Result};

/// Element type of a graph node's values. Host [`Tensor`]s always hold f32; an f16 node stores
/// IEEE half floats on the GPU (the adapter needs SHADER_F16) and its kernels compute in f32,
/// rounding each stored result to f16 (as PyTorch's CUDA kernels do for `torch.half`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    #[default]
    F32,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }

    /// `f32` or `f16`, as WGSL names the scalar.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }

    /// `v` as this type stores it, back in f32 (f16: rounded to nearest even, overflow to inf).
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
        }
    }

    /// Bytes of a buffer holding `numel` elements: rounded up to 4, as WebGPU sizes storage
    /// bindings and copies in whole words.
    pub fn buffer_bytes(self, numel: usize) -> u64 {
        ((numel * self.size()) as u64).div_ceil(4) * 4
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A shape: the extent of each axis, outermost first (row-major, PyTorch order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// Number of elements (1 for a scalar of rank 0).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// The axis extents.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.0[i + 1];
        }
        s
    }
    /// Resolves a possibly negative axis (`-1` = last) against this shape.
    pub fn axis(&self, op: &'static str, axis: isize) -> Result<usize> {
        let r = self.rank() as isize;
        let a = if axis < 0 { axis + r } else { axis };
        if a < 0 || a >= r {
            return Err(crate::error::shape_err(
                op,
                format!("axis {axis} is out of range for shape {self}"),
            ));
        }
        Ok(a as usize)
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

/// A dense f32 tensor in host memory, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Shape,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor from a shape and row-major data; errors when the lengths differ.
    pub fn new(shape: impl Into<Shape>, data: Vec<f32>) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::Tensor(format!(
                "shape {shape} holds {} elements but {} were given",
                shape.numel(),
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }
    /// A tensor filled with one value.
    pub fn full(shape: impl Into<Shape>, value: f32) -> Self {
        let shape = shape.into();
        let data = vec![value; shape.numel()];
        Tensor { shape, data }
    }
    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Self {
        Self::full(shape, 0.0)
    }
    /// A scalar (rank 0).
    pub fn scalar(v: f32) -> Self {
        Tensor {
            shape: Shape(vec![]),
            data: vec![v],
        }
    }
    /// Uniform random values in `[lo, hi)` from a seeded generator (reproducible).
    pub fn rand_uniform(shape: impl Into<Shape>, lo: f32, hi: f32, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let shape = shape.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let data = (0..shape.numel())
            .map(|_| rng.random_range(lo..hi))
            .collect();
        Tensor { shape, data }
    }
    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    /// The axis extents.
    pub fn dims(&self) -> &[usize] {
        &self.shape.0
    }
    /// The row-major elements.
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    /// Mutable access to the elements.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    /// Consumes the tensor, giving its elements.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// The same elements under another shape with as many elements.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Self> {
        Tensor::new(shape, self.data)
    }
    /// The elements as f16 bits, for f16 uploads.
    pub fn to_f16(&self) -> Vec<half::f16> {
        self.data.iter().map(|&v| half::f16::from_f32(v)).collect()
    }
    /// The bytes of the f32 elements, as uploaded to the GPU.
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.data)
    }
    /// The elements stored as `dtype`, padded with zeros to whole 4-byte words
    /// ([`DType::buffer_bytes`]).
    pub fn to_bytes(&self, dtype: DType) -> std::borrow::Cow<'_, [u8]> {
        match dtype {
            DType::F32 => std::borrow::Cow::Borrowed(self.as_bytes()),
            DType::F16 => {
                let mut halves = self.to_f16();
                if halves.len() % 2 == 1 {
                    halves.push(half::f16::ZERO);
                }
                std::borrow::Cow::Owned(bytemuck::cast_slice(&halves).to_vec())
            }
        }
    }
    /// A tensor of `shape` from `bytes` holding its elements as `dtype` (trailing padding
    /// ignored); errors when there are too few bytes.
    pub fn from_bytes(shape: impl Into<Shape>, dtype: DType, bytes: &[u8]) -> Result<Self> {
        let shape = shape.into();
        let n = shape.numel();
        if bytes.len() < n * dtype.size() {
            return Err(Error::Tensor(format!(
                "{} bytes cannot hold {n} {dtype} elements",
                bytes.len()
            )));
        }
        let data = match dtype {
            DType::F32 => bytes[..n * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => bytes[..n * 2]
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        Tensor::new(shape, data)
    }
    /// The elements rounded to what `dtype` can hold (f16: nearest even).
    pub fn rounded(mut self, dtype: DType) -> Self {
        if dtype != DType::F32 {
            self.data.iter_mut().for_each(|v| *v = dtype.round(*v));
        }
        self
    }
}

/// Closeness test used across kiln: `|a - b| <= atol + rtol * |b|` for every element, NaN never close.
/// Returns the worst ratio `|a - b| / (atol + rtol * |b|)` (<= 1 means close) and its index.
pub fn max_violation(a: &[f32], b: &[f32], atol: f64, rtol: f64) -> (f64, usize) {
    let mut worst = (0.0f64, 0usize);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (x as f64, y as f64);
        let r = if x.is_nan() || y.is_nan() {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else if x == y {
            0.0 // also covers equal infinities
        } else {
            (x - y).abs() / (atol + rtol * y.abs())
        };
        if r > worst.0 || (r.is_nan() && !worst.0.is_nan()) {
            worst = (r, i);
        }
    }
    worst
}
