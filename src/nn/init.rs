//! Seeded parameter initialisation with PyTorch's defaults (Kaiming-uniform for Linear and Conv
//! weights and their biases) and Xavier/Kaiming schemes on request.

use rand::{Rng, SeedableRng};

use crate::tensor::{Shape, Tensor};

/// A seeded source of initial values: the same seed gives the same parameters.
#[derive(Debug, Clone)]
pub struct Init {
    rng: rand::rngs::StdRng,
}

impl Init {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Init {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    /// Uniform values in `[-bound, bound)`.
    pub fn uniform(&mut self, shape: impl Into<Shape>, bound: f32) -> Tensor {
        let shape = shape.into();
        let data = (0..shape.numel())
            .map(|_| self.rng.random_range(-bound..bound))
            .collect();
        Tensor::new(shape, data).expect("numel matches")
    }

    /// PyTorch's default for Linear/Conv weights and biases: `kaiming_uniform_(a = sqrt 5)`,
    /// i.e. `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn torch_default(&mut self, shape: impl Into<Shape>, fan_in: usize) -> Tensor {
        self.uniform(shape, 1.0 / (fan_in.max(1) as f32).sqrt())
    }

    /// Kaiming (He) uniform for ReLU networks: `U(-b, b)`, `b = sqrt(6 / fan_in)`.
    pub fn kaiming_uniform(&mut self, shape: impl Into<Shape>, fan_in: usize) -> Tensor {
        self.uniform(shape, (6.0 / fan_in.max(1) as f32).sqrt())
    }

    /// Xavier (Glorot) uniform: `U(-b, b)`, `b = sqrt(6 / (fan_in + fan_out))`.
    pub fn xavier_uniform(
        &mut self,
        shape: impl Into<Shape>,
        fan_in: usize,
        fan_out: usize,
    ) -> Tensor {
        self.uniform(shape, (6.0 / (fan_in + fan_out).max(1) as f32).sqrt())
    }

    /// A whole number for a dropout seed or a shuffle.
    pub fn next_u32(&mut self) -> u32 {
        self.rng.random()
    }

    /// A permutation of `0..n` (Fisher-Yates), for shuffling a data set each epoch.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.rng.random_range(0..=i);
            v.swap(i, j);
        }
        v
    }
}
