//! Elementwise functions of one tensor: neg, exp, log, sqrt, relu, sigmoid, tanh, gelu, abs,
//! square, the scalar ops (x + s, x * s, s - x, x / s, s / x, x^s), torch's other activations
//! (leaky relu, ELU, clamp and hardtanh, hardsigmoid, hardswish, mish) and the derivatives their
//! backward rules multiply by. Kernel: `shaders/unary.wgsl`.

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
    /// `x` where `x > 0`, else `slope * x` (`torch.nn.LeakyReLU(negative_slope)`).
    LeakyRelu(f32),
    /// `x` where `x > 0`, else `alpha * (exp(x) - 1)` (`torch.nn.ELU(alpha)`; `exp(x) - 1` as
    /// `expm1`, exact near 0).
    Elu(f32),
    /// `min(max(x, lo), hi)` (`torch.clamp`): the gradient passes where `lo <= x <= hi`.
    Clamp(f32, f32),
    /// `min(max(x, lo), hi)` (`torch.nn.Hardtanh`; ReLU6 is `(0, 6)`): the gradient passes where
    /// `lo < x < hi`, as torch's hardtanh_backward.
    Hardtanh(f32, f32),
    /// `min(max(x + 3, 0), 6) / 6` (`torch.nn.Hardsigmoid`).
    Hardsigmoid,
    /// `x * min(max(x + 3, 0), 6) / 6` (`torch.nn.Hardswish`, MobileNetV3's).
    Hardswish,
    /// `x * tanh(softplus(x))` (`torch.nn.Mish`).
    Mish,
    /// Leaky relu's derivative: 1 where the operand is `> 0`, else `slope`. Its backward reads it
    /// from the output where `slope >= 0` (the output is `> 0` exactly where the input is).
    LeakyReluDeriv(f32),
    /// ELU's derivative from its output `y` (`alpha >= 0`): 1 where `y > 0`, else `y + alpha`
    /// (`alpha * exp(x)`), as torch's elu_backward from the result.
    EluDeriv(f32),
    /// 1 where `lo <= x <= hi`, else 0 (clamp's gradient mask).
    ClampMask(f32, f32),
    /// 1 where `lo < x < hi`, else 0 (hardtanh's and hardsigmoid's gradient mask).
    HardtanhMask(f32, f32),
    /// Hardswish's derivative: 0 below -3, `x / 3 + 0.5` up to 3, then 1 (torch's).
    HardswishDeriv,
    /// Mish's derivative, `t + x sigmoid(x) (1 - t^2)` with `t = tanh(softplus(x))` (torch's).
    MishDeriv,
    /// The identity without a gradient (`torch.Tensor.detach`): what flows through it is a
    /// constant to autodiff. Fused into its readers like any elementwise op.
    Detach,
    /// `sin(x)`
    Sin,
    /// `cos(x)`
    Cos,
    /// `1 / sqrt(x)` (`torch.rsqrt`).
    Rsqrt,
    /// `log(1 + x)`, exact near 0 (`torch.log1p`).
    Log1p,
    /// `exp(x) - 1`, exact near 0 (`torch.expm1`).
    Expm1,
    /// Rounding down (`torch.floor`): no gradient (zero, as torch's).
    Floor,
    /// Rounding up (`torch.ceil`): no gradient.
    Ceil,
    /// Rounding to the nearest whole number, halves to even (`torch.round`): no gradient.
    Round,
    /// Rounding toward zero (`torch.trunc`): no gradient.
    Trunc,
    /// GELU's tanh approximation, `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`
    /// (`torch.nn.GELU(approximate="tanh")`, GPT-2's).
    GeluTanh,
    /// [`UnaryOp::GeluTanh`]'s derivative, in torch's form.
    GeluTanhDeriv,
    /// `log(sigmoid(x))`, stable for large `|x|` (`torch.nn.LogSigmoid`).
    LogSigmoid,
    /// The error function (`torch.erf`).
    Erf,
    /// `x / (1 + |x|)` (`torch.nn.Softsign`).
    Softsign,
    /// 1 where `x` is NaN, else 0 (`torch.isnan`), read from the bits; no gradient.
    IsNan,
    /// 1 where `x` is infinite, else 0 (`torch.isinf`); no gradient.
    IsInf,
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
            UnaryOp::LeakyRelu(_) => "leaky_relu",
            UnaryOp::Elu(_) => "elu",
            UnaryOp::Clamp(..) => "clamp",
            UnaryOp::Hardtanh(..) => "hardtanh",
            UnaryOp::Hardsigmoid => "hardsigmoid",
            UnaryOp::Hardswish => "hardswish",
            UnaryOp::Mish => "mish",
            UnaryOp::LeakyReluDeriv(_) => "leaky_relu_deriv",
            UnaryOp::EluDeriv(_) => "elu_deriv",
            UnaryOp::ClampMask(..) => "clamp_mask",
            UnaryOp::HardtanhMask(..) => "hardtanh_mask",
            UnaryOp::HardswishDeriv => "hardswish_deriv",
            UnaryOp::MishDeriv => "mish_deriv",
            UnaryOp::Detach => "detach",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Log1p => "log1p",
            UnaryOp::Expm1 => "expm1",
            UnaryOp::Floor => "floor",
            UnaryOp::Ceil => "ceil",
            UnaryOp::Round => "round",
            UnaryOp::Trunc => "trunc",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::GeluTanhDeriv => "gelu_tanh_deriv",
            UnaryOp::LogSigmoid => "log_sigmoid",
            UnaryOp::Erf => "erf",
            UnaryOp::Softsign => "softsign",
            UnaryOp::IsNan => "isnan",
            UnaryOp::IsInf => "isinf",
        }
    }

    /// The selector `OP` in unary.wgsl and the scalars `ALPHA` and `BETA` (also the arguments
    /// of `unary_op` in generated fused kernels).
    pub(crate) fn code(&self) -> (u32, f32, f32) {
        let (op, alpha) = match *self {
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
            UnaryOp::LeakyRelu(s) => (19, s),
            UnaryOp::Elu(a) => (20, a),
            UnaryOp::Clamp(lo, hi) => return (21, lo, hi),
            // the same function as clamp; only the backward differs
            UnaryOp::Hardtanh(lo, hi) => return (21, lo, hi),
            UnaryOp::Hardsigmoid => (22, 0.0),
            UnaryOp::Hardswish => (23, 0.0),
            UnaryOp::Mish => (24, 0.0),
            UnaryOp::LeakyReluDeriv(s) => (25, s),
            UnaryOp::EluDeriv(a) => (26, a),
            UnaryOp::ClampMask(lo, hi) => return (27, lo, hi),
            UnaryOp::HardtanhMask(lo, hi) => return (28, lo, hi),
            UnaryOp::HardswishDeriv => (29, 0.0),
            UnaryOp::MishDeriv => (30, 0.0),
            UnaryOp::Detach => (31, 0.0),
            UnaryOp::Sin => (32, 0.0),
            UnaryOp::Cos => (33, 0.0),
            UnaryOp::Rsqrt => (34, 0.0),
            UnaryOp::Log1p => (35, 0.0),
            UnaryOp::Expm1 => (36, 0.0),
            UnaryOp::Floor => (37, 0.0),
            UnaryOp::Ceil => (38, 0.0),
            UnaryOp::Round => (39, 0.0),
            UnaryOp::Trunc => (40, 0.0),
            UnaryOp::GeluTanh => (41, 0.0),
            UnaryOp::GeluTanhDeriv => (42, 0.0),
            UnaryOp::LogSigmoid => (43, 0.0),
            UnaryOp::Erf => (44, 0.0),
            UnaryOp::Softsign => (45, 0.0),
            UnaryOp::IsNan => (46, 0.0),
            UnaryOp::IsInf => (47, 0.0),
        };
        (op, alpha, 0.0)
    }

    /// The scalar operands (of the scalar ops, a leaky relu's slope, clamp's bounds..), in order.
    pub fn scalars(&self) -> Vec<f32> {
        match *self {
            UnaryOp::AddScalar(s)
            | UnaryOp::MulScalar(s)
            | UnaryOp::RSubScalar(s)
            | UnaryOp::DivScalar(s)
            | UnaryOp::RDivScalar(s)
            | UnaryOp::PowScalar(s)
            | UnaryOp::LeakyRelu(s)
            | UnaryOp::Elu(s)
            | UnaryOp::LeakyReluDeriv(s)
            | UnaryOp::EluDeriv(s) => vec![s],
            UnaryOp::Clamp(lo, hi)
            | UnaryOp::Hardtanh(lo, hi)
            | UnaryOp::ClampMask(lo, hi)
            | UnaryOp::HardtanhMask(lo, hi) => vec![lo, hi],
            _ => vec![],
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
            UnaryOp::Softplus => softplus(x),
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
            UnaryOp::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    x * s as f64
                }
            }
            UnaryOp::Elu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a as f64 * x.exp_m1()
                }
            }
            UnaryOp::Clamp(lo, hi) | UnaryOp::Hardtanh(lo, hi) => x.max(lo as f64).min(hi as f64),
            UnaryOp::Hardsigmoid => (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Hardswish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
            UnaryOp::Mish => x * softplus(x).tanh(),
            UnaryOp::LeakyReluDeriv(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s as f64
                }
            }
            UnaryOp::EluDeriv(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    x + a as f64
                }
            }
            UnaryOp::ClampMask(lo, hi) => (lo as f64 <= x && x <= hi as f64) as u8 as f64,
            UnaryOp::HardtanhMask(lo, hi) => ((lo as f64) < x && x < hi as f64) as u8 as f64,
            UnaryOp::HardswishDeriv => {
                if x < -3.0 {
                    0.0
                } else if x <= 3.0 {
                    x / 3.0 + 0.5
                } else {
                    1.0
                }
            }
            UnaryOp::MishDeriv => {
                let t = softplus(x).tanh();
                let s = 1.0 / (1.0 + (-x).exp());
                t + x * s * (1.0 - t * t)
            }
            UnaryOp::Detach => x,
            UnaryOp::Sin => x.sin(),
            UnaryOp::Cos => x.cos(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Log1p => x.ln_1p(),
            UnaryOp::Expm1 => x.exp_m1(),
            UnaryOp::Floor => x.floor(),
            UnaryOp::Ceil => x.ceil(),
            UnaryOp::Round => x.round_ties_even(),
            UnaryOp::Trunc => x.trunc(),
            UnaryOp::GeluTanh => 0.5 * x * (1.0 + gelu_tanh_inner(x).tanh()),
            UnaryOp::GeluTanhDeriv => {
                let t = gelu_tanh_inner(x).tanh();
                0.5 * (1.0 + t)
                    + 0.5 * x * (1.0 - t * t) * GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x * x)
            }
            UnaryOp::LogSigmoid => -softplus(-x),
            UnaryOp::Erf => libm::erf(x),
            UnaryOp::Softsign => x / (1.0 + x.abs()),
            UnaryOp::IsNan => x.is_nan() as u8 as f64,
            UnaryOp::IsInf => x.is_infinite() as u8 as f64,
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
        let (op, alpha, beta) = self.code();
        KernelSpec {
            family: "unary",
            entry: "main",
            constants: vec![
                ("N", out.numel() as f64),
                ("OP", op as f64),
                ("ALPHA", alpha as f64),
                ("BETA", beta as f64),
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
            // each backward is dy times a derivative op, which the plan compiler fuses with the
            // multiplication (and the chain around it) into one kernel
            UnaryOp::LeakyRelu(s) => {
                // from the output where it has the input's sign, so the input need not be kept
                let from = if s >= 0.0 { y } else { x };
                g.mul(dy, g.unary(UnaryOp::LeakyReluDeriv(s), from)?)
            }
            UnaryOp::Elu(a) if a >= 0.0 => g.mul(dy, g.unary(UnaryOp::EluDeriv(a), y)?),
            // a negative alpha makes the output positive on both sides: alpha exp(min(x, 0))
            // where x <= 0, from the input (exp(min(x, 0)) stays finite where the mask drops it)
            UnaryOp::Elu(a) => {
                let step = g.unary(UnaryOp::LeakyReluDeriv(0.0), x)?;
                let below = g.mul_scalar(g.exp(g.neg(g.relu(g.neg(x)?)?)?)?, a)?;
                let slope = g.add(step, g.mul(g.rsub_scalar(step, 1.0)?, below)?)?;
                g.mul(dy, slope)
            }
            UnaryOp::Clamp(lo, hi) => g.mul(dy, g.unary(UnaryOp::ClampMask(lo, hi), x)?),
            UnaryOp::Hardtanh(lo, hi) => g.mul(dy, g.unary(UnaryOp::HardtanhMask(lo, hi), x)?),
            UnaryOp::Hardsigmoid => g.mul(
                dy,
                g.div_scalar(g.unary(UnaryOp::HardtanhMask(-3.0, 3.0), x)?, 6.0)?,
            ),
            UnaryOp::Hardswish => g.mul(dy, g.unary(UnaryOp::HardswishDeriv, x)?),
            UnaryOp::Mish => g.mul(dy, g.unary(UnaryOp::MishDeriv, x)?),
            // piecewise constant: no gradient
            UnaryOp::LeakyReluDeriv(_) | UnaryOp::ClampMask(..) | UnaryOp::HardtanhMask(..) => {
                g.mul_scalar(dy, 0.0)
            }
            // d/dy of (1 where y > 0, else y + alpha): 1 where y <= 0
            UnaryOp::EluDeriv(_) => g.mul(
                dy,
                g.rsub_scalar(g.unary(UnaryOp::LeakyReluDeriv(0.0), x)?, 1.0)?,
            ),
            // torch's hardswish double backward: 1/3 strictly inside (-3, 3)
            UnaryOp::HardswishDeriv => g.mul(
                dy,
                g.div_scalar(g.unary(UnaryOp::HardtanhMask(-3.0, 3.0), x)?, 3.0)?,
            ),
            UnaryOp::MishDeriv => Err(crate::error::Error::Unsupported(
                "second-order gradients through mish".into(),
            )),
            UnaryOp::Detach => Err(crate::error::Error::Unsupported(
                "gradients through detach (Op::backward gives none)".into(),
            )),
            UnaryOp::Sin => g.mul(dy, g.cos(x)?),
            UnaryOp::Cos => g.mul(dy, g.neg(g.sin(x)?)?),
            // d x^(-1/2) = -y^3 / 2, from the output as torch's
            UnaryOp::Rsqrt => g.mul(dy, g.mul_scalar(g.mul(y, g.square(y)?)?, -0.5)?),
            UnaryOp::Log1p => g.div(dy, g.add_scalar(x, 1.0)?),
            UnaryOp::Expm1 => g.mul(dy, g.add_scalar(y, 1.0)?),
            // piecewise constant: zero, as torch's (not the Dirac at the steps)
            UnaryOp::Floor
            | UnaryOp::Ceil
            | UnaryOp::Round
            | UnaryOp::Trunc
            | UnaryOp::IsNan
            | UnaryOp::IsInf => g.mul_scalar(dy, 0.0),
            UnaryOp::GeluTanh => g.mul(dy, g.unary(UnaryOp::GeluTanhDeriv, x)?),
            UnaryOp::GeluTanhDeriv => Err(crate::error::Error::Unsupported(
                "second-order gradients through gelu's tanh approximation".into(),
            )),
            // d log(sigmoid(x)) = 1 - sigmoid(x) = sigmoid(-x)
            UnaryOp::LogSigmoid => g.mul(dy, g.sigmoid(g.neg(x)?)?),
            // 2 / sqrt(pi) exp(-x^2)
            UnaryOp::Erf => g.mul(
                dy,
                g.mul_scalar(
                    g.exp(g.neg(g.square(x)?)?)?,
                    std::f32::consts::FRAC_2_SQRT_PI,
                )?,
            ),
            // 1 / (1 + |x|)^2
            UnaryOp::Softsign => g.div(dy, g.square(g.add_scalar(g.abs(x)?, 1.0)?)?),
        }
    }
}

/// `sqrt(2 / pi)` and `0.044715`: GELU's tanh approximation (torch's `kBeta` and `kKappa`).
const GELU_BETA: f64 = 0.797_884_560_802_865_4;
const GELU_KAPPA: f64 = 0.044715;

/// The argument of the tanh in GELU's tanh approximation.
fn gelu_tanh_inner(x: f64) -> f64 {
    GELU_BETA * (x + GELU_KAPPA * x * x * x)
}

/// `log(1 + exp(x))`, stable for large `|x|`.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}
