//! Seeded parameter initialisation with PyTorch's defaults (Kaiming-uniform for Linear and Conv
//! weights and their biases) and torch.nn.init's other schemes on request: Xavier and Kaiming,
//! uniform or normal, normal and truncated normal (ViT's), orthogonal (recurrent weights). The
//! values follow the same distributions as torch's, not the same draws.

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

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

    /// Normal values `N(mean, std^2)` (`torch.nn.init.normal_`).
    pub fn normal(&mut self, shape: impl Into<Shape>, mean: f32, std: f32) -> Tensor {
        let shape = shape.into();
        let data = (0..shape.numel())
            .map(|_| mean + std * self.standard_normal())
            .collect();
        Tensor::new(shape, data).expect("numel matches")
    }

    /// Kaiming (He) normal for ReLU networks (`kaiming_normal_`, fan in): `N(0, 2 / fan_in)`.
    pub fn kaiming_normal(&mut self, shape: impl Into<Shape>, fan_in: usize) -> Tensor {
        self.normal(shape, 0.0, (2.0 / fan_in.max(1) as f32).sqrt())
    }

    /// Xavier (Glorot) normal (`xavier_normal_`): `N(0, 2 / (fan_in + fan_out))`.
    pub fn xavier_normal(
        &mut self,
        shape: impl Into<Shape>,
        fan_in: usize,
        fan_out: usize,
    ) -> Tensor {
        self.normal(shape, 0.0, (2.0 / (fan_in + fan_out).max(1) as f32).sqrt())
    }

    /// `N(mean, std^2)` truncated to `[a, b]` (`trunc_normal_`, ViT's weights with `std =
    /// 0.02, a = -2, b = 2`): draws outside are drawn again. `a < b`, and the interval must
    /// hold some of the distribution (within 6 standard deviations of the mean), or the
    /// values are clamped into it.
    pub fn trunc_normal(
        &mut self,
        shape: impl Into<Shape>,
        mean: f32,
        std: f32,
        (a, b): (f32, f32),
    ) -> Tensor {
        let shape = shape.into();
        let reachable = a < b && a <= mean + 6.0 * std && b >= mean - 6.0 * std;
        let data = (0..shape.numel())
            .map(|_| {
                for _ in 0..1000 {
                    let v = mean + std * self.standard_normal();
                    if reachable && (a..=b).contains(&v) {
                        return v;
                    }
                }
                (mean + std * self.standard_normal()).clamp(a.min(b), b.max(a))
            })
            .collect();
        Tensor::new(shape, data).expect("numel matches")
    }

    /// A (semi-)orthogonal matrix (`orthogonal_(gain)`), `(rows, cols..)` flattened to `rows x
    /// cols`: the orthonormal rows (or columns, whichever are fewer) of a normal matrix, by
    /// Gram-Schmidt in f64 (the Q of its QR factorisation with R's diagonal positive, as
    /// torch's sign fix makes it: uniformly distributed), times `gain`.
    pub fn orthogonal(&mut self, shape: impl Into<Shape>, gain: f32) -> Tensor {
        let shape = shape.into();
        let rows = shape.dims().first().copied().unwrap_or(1);
        let cols = shape.numel() / rows.max(1);
        // orthonormalise the shorter side: vectors of length `len`, `count` of them
        let (count, len) = (rows.min(cols), rows.max(cols));
        let mut q: Vec<Vec<f64>> = Vec::with_capacity(count);
        while q.len() < count {
            let mut v: Vec<f64> = (0..len).map(|_| self.standard_normal() as f64).collect();
            for u in &q {
                let d: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(x, &e)| *x -= d * e);
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            // a draw (almost) in the span of the others is drawn again
            if norm > 1e-6 {
                q.push(v.into_iter().map(|x| x / norm).collect());
            }
        }
        let data = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let v = if rows <= cols { q[r][c] } else { q[c][r] };
                (v * gain as f64) as f32
            })
            .collect();
        Tensor::new(shape, data).expect("numel matches")
    }

    /// One standard normal draw.
    fn standard_normal(&mut self) -> f32 {
        StandardNormal.sample(&mut self.rng)
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
