//! Elementwise functions of one tensor: neg, exp, log, sqrt, relu, sigmoid, tanh, gelu, abs,
//! square, and the scalar ops (x + s, x * s, s - x, x / s, s / x, x^s). Kernel: `shaders/unary.wgsl`.

use super::binary::BinaryOp;
use super::{groups, KernelSpec};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// A function applied to every element. Scalar variants carry their scalar operand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Relu,
    Sigmoid,
    Tanh,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.GELU()`.
    Gelu,
    /// `x + s`
    AddScalar(f32),
    /// `x * s`
    MulScalar(f32),
    /// `s - x`
    RSubScalar(f32),
    /// `x / s`
    DivScalar(f32),
    /// `s / x`
    RDivScalar(f32),
    /// `x ^ s`
    PowScalar(f32),
    Abs,
    Square,
    /// -1, 0 or 1.
    Sign,
    /// `log(1 + exp(x))`, computed stably as `max(x, 0) + log(1 + exp(-|x|))`.
    Softplus,
    /// `x * sigmoid(x)` (`torch.nn.SiLU`, swish).
    Silu,
}

impl UnaryOp {
    /// Name in errors and reports.
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Relu => "relu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Gelu => "gelu",
            UnaryOp::AddScalar(_) => "add_scalar",
            UnaryOp::MulScalar(_) => "mul_scalar",
            UnaryOp::RSubScalar(_) => "rsub_scalar",
            UnaryOp::DivScalar(_) => "div_scalar",
            UnaryOp::RDivScalar(_) => "rdiv_scalar",
            UnaryOp::PowScalar(_) => "pow_scalar",
            UnaryOp::Abs => "abs",
            UnaryOp::Square => "square",
            UnaryOp::Sign => "sign",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Silu => "silu",
        }
    }

    /// The selector `OP` in unary.wgsl, and the scalar `ALPHA` (also the arguments of
    /// `unary_op` in generated fused kernels).
    pub(crate) fn code(&self) -> (u32, f32) {
        match *self {
            UnaryOp::Neg => (0, 0.0),
            UnaryOp::Exp => (1, 0.0),
            UnaryOp::Log => (2, 0.0),
            UnaryOp::Sqrt => (3, 0.0),
            UnaryOp::Relu => (4, 0.0),
            UnaryOp::Sigmoid => (5, 0.0),
            UnaryOp::Tanh => (6, 0.0),
            UnaryOp::Gelu => (7, 0.0),
            UnaryOp::AddScalar(s) => (8, s),
            UnaryOp::MulScalar(s) => (9, s),
            UnaryOp::RSubScalar(s) => (10, s),
            UnaryOp::DivScalar(s) => (11, s),
            UnaryOp::RDivScalar(s) => (12, s),
            UnaryOp::PowScalar(s) => (13, s),
            UnaryOp::Abs => (14, 0.0),
            UnaryOp::Square => (15, 0.0),
            UnaryOp::Sign => (16, 0.0),
            UnaryOp::Softplus => (17, 0.0),
            UnaryOp::Silu => (18, 0.0),
        }
    }

    /// The scalar operand of the scalar ops.
    pub fn scalar(&self) -> Option<f32> {
        match *self {
            UnaryOp::AddScalar(s)
            | UnaryOp::MulScalar(s)
            | UnaryOp::RSubScalar(s)
            | UnaryOp::DivScalar(s)
            | UnaryOp::RDivScalar(s)
            | UnaryOp::PowScalar(s) => Some(s),
            _ => None,
        }
    }

    /// The function in f64, the reference the kernel is held to.
    pub fn eval(&self, x: f64) -> f64 {
        match *self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            UnaryOp::AddScalar(s) => x + s as f64,
            UnaryOp::MulScalar(s) => x * s as f64,
            UnaryOp::RSubScalar(s) => s as f64 - x,
            UnaryOp::DivScalar(s) => x / s as f64,
            UnaryOp::RDivScalar(s) => s as f64 / x,
            UnaryOp::PowScalar(s) => x.powf(s as f64),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Square => x * x,
            UnaryOp::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
            UnaryOp::Silu => x / (1.0 + (-x).exp()),
            UnaryOp::Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
        }
    }

    /// CPU reference.
    pub fn cpu(&self, a: &Tensor) -> Tensor {
        let data = a
            .data()
            .iter()
            .map(|&x| self.eval(x as f64) as f32)
            .collect();
        Tensor::new(a.shape().clone(), data).expect("same element count")
    }

    /// Kernel: one thread per element.
    pub fn kernel(&self, out: &Shape) -> KernelSpec {
        let (op, alpha) = self.code();
        KernelSpec {
            family: "unary",
            entry: "main",
            constants: vec![
                ("N", out.numel() as f64),
                ("OP", op as f64),
                ("ALPHA", alpha as f64),
            ],
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Backward: the gradient for `x` from `dy`, given the input `x` and output `y`.
    pub fn backward(&self, g: &Graph, x: NodeId, y: NodeId, dy: NodeId) -> Result<NodeId> {
        match *self {
            UnaryOp::Neg => g.neg(dy),
            UnaryOp::Exp => g.mul(dy, y),
            UnaryOp::Log => g.div(dy, x),
            UnaryOp::Sqrt => g.div(dy, g.mul_scalar(y, 2.0)?),
            // from the output, as PyTorch's threshold_backward (y > 0 exactly where x > 0): the
            // input then need not be stored, and a chain ending in relu fuses whole
            UnaryOp::Relu => g.binary(BinaryOp::ReluGrad, dy, y),
            UnaryOp::Sigmoid => g.binary(BinaryOp::SigmoidGrad, dy, y),
            UnaryOp::Tanh => g.binary(BinaryOp::TanhGrad, dy, y),
            UnaryOp::Gelu => g.binary(BinaryOp::GeluGrad, dy, x),
            UnaryOp::AddScalar(_) => Ok(dy),
            UnaryOp::MulScalar(s) => g.mul_scalar(dy, s),
            UnaryOp::RSubScalar(_) => g.neg(dy),
            UnaryOp::DivScalar(s) => g.div_scalar(dy, s),
            // d(s / x) = -s / x^2 = -y / x
            UnaryOp::RDivScalar(_) => g.mul(dy, g.neg(g.div(y, x)?)?),
            UnaryOp::PowScalar(s) => g.mul(dy, g.mul_scalar(g.pow_scalar(x, s - 1.0)?, s)?),
            UnaryOp::Abs => g.mul(dy, g.sign(x)?),
            UnaryOp::Square => g.mul(dy, g.mul_scalar(x, 2.0)?),
            UnaryOp::Sign => g.mul_scalar(dy, 0.0),
            UnaryOp::Softplus => g.mul(dy, g.sigmoid(x)?),
            // d(x s) = s + x s (1 - s) = s (1 + x - y), s = sigmoid(x): one fused kernel
            UnaryOp::Silu => {
                let s = g.sigmoid(x)?;
                g.mul(dy, g.mul(s, g.add_scalar(g.sub(x, y)?, 1.0)?)?)
            }
        }
    }
}
