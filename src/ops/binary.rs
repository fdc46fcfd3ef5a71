//! Elementwise ops of two tensors with NumPy/PyTorch broadcasting: add, sub, mul, div, maximum,
//! minimum. Kernel: `shaders/binary.wgsl`.

use super::{groups, pad_left, KernelSpec, MAX_RANK};
use crate::error::{shape_err, Error, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Which elementwise function of two operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Maximum,
    Minimum,
    /// `1` where `a >= b`, else `0` (masks for max/min gradients).
    GreaterEqual,
    /// `1` where `a == b`, else `0`.
    Equal,
    /// `a * (b > 0)`: relu's backward from `dy` and the input `x`.
    ReluGrad,
    /// `a * b * (1 - b)`: sigmoid's backward from `dy` and the output `y`.
    SigmoidGrad,
    /// `a * (1 - b^2)`: tanh's backward from `dy` and the output `y`.
    TanhGrad,
    /// `a * gelu'(b)`: exact GELU's backward from `dy` and the input `x`.
    GeluGrad,
    /// `a` where `b != 0`, else exactly `0` (whatever `a` holds, inf and NaN included): the
    /// half of `where_cond` and `masked_fill` that keeps one side.
    KeepWhere,
}

impl BinaryOp {
    /// Name in errors and reports.
    pub fn name(&self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::GreaterEqual => "greater_equal",
            BinaryOp::Equal => "equal",
            BinaryOp::ReluGrad => "relu_grad",
            BinaryOp::SigmoidGrad => "sigmoid_grad",
            BinaryOp::TanhGrad => "tanh_grad",
            BinaryOp::GeluGrad => "gelu_grad",
            BinaryOp::KeepWhere => "keep_where",
        }
    }

    /// The selector `OP` in binary.wgsl (also the argument of `binary_op` in generated fused
    /// kernels).
    pub(crate) fn code(&self) -> u32 {
        match self {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
            BinaryOp::Maximum => 4,
            BinaryOp::Minimum => 5,
            BinaryOp::GreaterEqual => 6,
            BinaryOp::Equal => 7,
            BinaryOp::ReluGrad => 8,
            BinaryOp::SigmoidGrad => 9,
            BinaryOp::TanhGrad => 10,
            BinaryOp::GeluGrad => 11,
            BinaryOp::KeepWhere => 12,
        }
    }

    /// The function in f64.
    pub fn eval(&self, x: f64, y: f64) -> f64 {
        match self {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Maximum => x.max(y),
            BinaryOp::Minimum => x.min(y),
            BinaryOp::GreaterEqual => (x >= y) as u8 as f64,
            BinaryOp::Equal => (x == y) as u8 as f64,
            BinaryOp::ReluGrad => {
                if y > 0.0 {
                    x
                } else {
                    0.0
                }
            }
            BinaryOp::SigmoidGrad => x * y * (1.0 - y),
            BinaryOp::TanhGrad => x * (1.0 - y * y),
            BinaryOp::GeluGrad => {
                let cdf = 0.5 * (1.0 + libm::erf(y / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * y * y).exp() / (2.0 * std::f64::consts::PI).sqrt();
                x * (cdf + y * pdf)
            }
            BinaryOp::KeepWhere => {
                if y != 0.0 {
                    x
                } else {
                    0.0
                }
            }
        }
    }

    /// Shape rule: the broadcast of both shapes (axes aligned on the right; extents equal or 1).
    pub fn infer(&self, a: &Shape, b: &Shape) -> Result<Shape> {
        broadcast_shapes(self.name(), a, b)
    }

    /// CPU reference.
    pub fn cpu(&self, a: &Tensor, b: &Tensor, out: &Shape) -> Tensor {
        let sa = broadcast_strides(a.shape(), out);
        let sb = broadcast_strides(b.shape(), out);
        let dims = out.dims();
        let mut data = Vec::with_capacity(out.numel());
        let mut coord = vec![0usize; dims.len()];
        for _ in 0..out.numel() {
            let ia: usize = coord.iter().zip(&sa).map(|(c, s)| c * s).sum();
            let ib: usize = coord.iter().zip(&sb).map(|(c, s)| c * s).sum();
            data.push(self.eval(a.data()[ia] as f64, b.data()[ib] as f64) as f32);
            // advance the row-major coordinate
            for ax in (0..dims.len()).rev() {
                coord[ax] += 1;
                if coord[ax] < dims[ax] {
                    break;
                }
                coord[ax] = 0;
            }
        }
        Tensor::new(out.clone(), data).expect("broadcast shape")
    }

    /// Kernel: one thread per output element, operands read through broadcast strides.
    pub fn kernel(&self, a: &Shape, b: &Shape, out: &Shape) -> KernelSpec {
        let (d, sa) = pad_left(out.dims(), &broadcast_strides(a, out));
        let (_, sb) = pad_left(out.dims(), &broadcast_strides(b, out));
        let mut constants = vec![("N", out.numel() as f64), ("OP", self.code() as f64)];
        const DN: [&str; MAX_RANK] = ["D0", "D1", "D2", "D3", "D4", "D5"];
        const AN: [&str; MAX_RANK] = ["SA0", "SA1", "SA2", "SA3", "SA4", "SA5"];
        const BN: [&str; MAX_RANK] = ["SB0", "SB1", "SB2", "SB3", "SB4", "SB5"];
        for i in 0..MAX_RANK {
            if i > 0 {
                constants.push((DN[i], d[i] as f64));
            }
            constants.push((AN[i], sa[i] as f64));
            constants.push((BN[i], sb[i] as f64));
        }
        KernelSpec {
            family: "binary",
            entry: "main",
            constants,
            workgroups: groups(out.numel(), 256),
        }
    }
}

impl BinaryOp {
    /// Backward: the gradients for `a` and `b` from `dy` (each summed back to its operand's shape
    /// over broadcast axes), given the operands and the output `y`.
    pub fn backward(
        &self,
        g: &Graph,
        a: NodeId,
        b: NodeId,
        y: NodeId,
        dy: NodeId,
    ) -> Result<[Option<NodeId>; 2]> {
        let (da, db) = match self {
            BinaryOp::Add => (dy, dy),
            BinaryOp::Sub => (dy, g.neg(dy)?),
            BinaryOp::Mul => (g.mul(dy, b)?, g.mul(dy, a)?),
            // d(a / b)/db = -a / b^2 = -y / b
            BinaryOp::Div => (g.div(dy, b)?, g.neg(g.div(g.mul(dy, y)?, b)?)?),
            // ties send the gradient to `a`, as the mask a >= b does
            BinaryOp::Maximum | BinaryOp::Minimum => {
                let mask = if *self == BinaryOp::Maximum {
                    g.binary(BinaryOp::GreaterEqual, a, b)?
                } else {
                    g.binary(BinaryOp::GreaterEqual, b, a)?
                };
                let to_a = g.mul(dy, mask)?;
                (to_a, g.sub(dy, to_a)?)
            }
            BinaryOp::GreaterEqual | BinaryOp::Equal => return Ok([None, None]),
            // the kept side's gradient, kept where it was; none for the mask
            BinaryOp::KeepWhere => {
                return Ok([
                    Some(g.sum_to(g.binary(BinaryOp::KeepWhere, dy, b)?, &g.shape(a))?),
                    None,
                ])
            }
            BinaryOp::ReluGrad => {
                return Ok([
                    Some(g.sum_to(g.binary(BinaryOp::ReluGrad, dy, b)?, &g.shape(a))?),
                    None,
                ])
            }
            BinaryOp::SigmoidGrad | BinaryOp::TanhGrad | BinaryOp::GeluGrad => {
                return Err(Error::Unsupported(format!(
                    "second-order gradients through {}",
                    self.name()
                )))
            }
        };
        Ok([
            Some(g.sum_to(da, &g.shape(a))?),
            Some(g.sum_to(db, &g.shape(b))?),
        ])
    }
}

/// The broadcast of two shapes, or a shape error naming `op` and both shapes.
pub fn broadcast_shapes(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = vec![0; r];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.rank() >= r {
            a.dims()[i + a.rank() - r]
        } else {
            1
        };
        let db = if i + b.rank() >= r {
            b.dims()[i + b.rank() - r]
        } else {
            1
        };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => {
                return Err(shape_err(
                    op,
                    format!(
                    "{a} and {b} do not broadcast: axis {i} of the result has extents {x} and {y}"
                ),
                ))
            }
        };
    }
    if r > MAX_RANK {
        return Err(shape_err(
            op,
            format!("{a} and {b}: rank {r} is above the supported {MAX_RANK}"),
        ));
    }
    Ok(Shape(out))
}

/// Element strides of `s` when broadcast to `out` (0 on axes where `s` has extent 1 or is absent).
pub fn broadcast_strides(s: &Shape, out: &Shape) -> Vec<usize> {
    let own = s.strides();
    let off = out.rank() - s.rank();
    (0..out.rank())
        .map(|i| {
            if i < off || s.dims()[i - off] == 1 {
                0
            } else {
                own[i - off]
            }
        })
        .collect()
}
