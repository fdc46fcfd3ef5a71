//! The symbolic graph: inputs, parameters, constants and ops, with shapes inferred (and shape
//! errors raised) as each node is added. Nodes are only appended, so index order is a
//! topological order.
//!
//! Builder methods take `&self` (the node list sits in a `RefCell`) so that calls nest:
//! `g.softmax(g.matmul(x, w)?, -1)?`.

mod autodiff;
mod functional;

use std::cell::RefCell;
use std::sync::Arc;

use crate::error::{shape_err, Error, Result};
use crate::ops::binary::BinaryOp;
use crate::ops::layout::{reshape_infer, Permute};
use crate::ops::matmul::MatMul;
use crate::ops::reduce::{Reduce, ReduceKind};
use crate::ops::softmax::Softmax;
use crate::ops::unary::UnaryOp;
use crate::ops::{Init, Op};
use crate::tensor::{DType, Shape, Tensor};

pub use crate::ops::conv::Conv2dOpts;
pub use crate::ops::loss::{CrossEntropyOpts, Reduction};
pub use functional::PadMode;

/// A handle to a node of a [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// One node: its op, its inputs, and its (inferred) output shape and element type.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
    pub dtype: DType,
}

/// A computation graph under construction.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: RefCell<Vec<Node>>,
    /// In-place state updates (running statistics) that run with every plan computing their
    /// value; see [`Graph::running_update`].
    updates: RefCell<Vec<NodeId>>,
}

impl Clone for Graph {
    fn clone(&self) -> Self {
        Graph {
            nodes: RefCell::new(self.nodes.borrow().clone()),
            updates: RefCell::new(self.updates.borrow().clone()),
        }
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// True when the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the node list (what plans compile from).
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.borrow().clone()
    }

    /// The shape of a node. Panics only on a `NodeId` from another graph.
    pub fn shape(&self, id: NodeId) -> Shape {
        self.nodes.borrow()[id.0].shape.clone()
    }

    /// The element type of a node. Panics only on a `NodeId` from another graph.
    pub fn dtype(&self, id: NodeId) -> DType {
        self.nodes.borrow()[id.0].dtype
    }

    /// Appends a node whose shape the caller has already checked (for backward rules); its
    /// element type follows from its inputs' (`Op::result_dtype`).
    pub(crate) fn push_op(&self, op: Op, inputs: Vec<NodeId>, shape: Shape) -> Result<NodeId> {
        self.push(op, inputs, shape)
    }

    fn push(&self, op: Op, inputs: Vec<NodeId>, shape: Shape) -> Result<NodeId> {
        let dtypes: Vec<DType> = {
            let nodes = self.nodes.borrow();
            inputs.iter().map(|i| nodes[i.0].dtype).collect()
        };
        let dtype = op.result_dtype(&dtypes)?;
        Ok(self.push_typed(op, inputs, shape, dtype))
    }

    fn push_typed(&self, op: Op, inputs: Vec<NodeId>, shape: Shape, dtype: DType) -> NodeId {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node {
            op,
            inputs,
            shape,
            dtype,
        });
        NodeId(nodes.len() - 1)
    }

    /// The in-place state updates of this graph ([`Graph::running_update`]), in creation order.
    pub fn state_updates(&self) -> Vec<NodeId> {
        self.updates.borrow().clone()
    }

    /// Records an in-place state update that plans computing its value run too.
    pub(crate) fn register_update(&self, id: NodeId) {
        self.updates.borrow_mut().push(id);
    }

    /// `(s, d)` where every element of `id` is `s / d`, `s` a one-element node: an expand of one
    /// (a sum's backward; `d` 1) or its division by a scalar (a mean's), seen through reshapes.
    /// Kernels that can read `s` for every element need not have it expanded.
    pub(crate) fn expanded_scalar(&self, id: NodeId) -> Option<(NodeId, f32)> {
        let nodes = self.nodes.borrow();
        let mut n = nodes.get(id.0)?;
        let mut d = 1.0;
        loop {
            match n.op {
                Op::Reshape => n = &nodes[n.inputs[0].0],
                Op::Unary(UnaryOp::DivScalar(s)) if d == 1.0 => {
                    d = s;
                    n = &nodes[n.inputs[0].0];
                }
                _ => break,
            }
        }
        let from = *n.inputs.first()?;
        (matches!(n.op, Op::Expand(_)) && nodes[from.0].shape.numel() == 1).then_some((from, d))
    }

    /// True when `id` is a parameter node of this graph.
    pub(crate) fn is_param(&self, id: NodeId) -> bool {
        self.nodes
            .borrow()
            .get(id.0)
            .is_some_and(|n| matches!(n.op, Op::Param { .. }))
    }

    pub(crate) fn check_id(&self, op: &'static str, id: NodeId) -> Result<Shape> {
        self.nodes
            .borrow()
            .get(id.0)
            .map(|n| n.shape.clone())
            .ok_or_else(|| shape_err(op, format!("node {} is not in this graph", id.0)))
    }

    /// A named input of shape `shape`, fed to every `Plan::run`. Zero-sized extents are not allowed
    /// and surface as an error when the plan is compiled.
    pub fn input(&self, name: &str, shape: impl Into<Shape>) -> NodeId {
        self.input_as(name, shape, DType::F32)
    }

    /// A named input stored as `dtype` on the GPU: `Plan::run` takes it as an f32 tensor and
    /// rounds its values to `dtype` on upload (f16 needs an adapter with SHADER_F16).
    pub fn input_as(&self, name: &str, shape: impl Into<Shape>, dtype: DType) -> NodeId {
        self.push_typed(
            Op::Input {
                name: name.to_string(),
            },
            vec![],
            shape.into(),
            dtype,
        )
    }

    /// `x`'s values as `to` (f32 <-> f16; a no-op when `x` already is `to`). f16 nodes store
    /// half floats and compute in f32: products, convolutions, pooling, elementwise ops,
    /// softmax, dropout, reductions and layout ops take f16, cross-entropy f16 logits (an f32
    /// loss), the embedding lookup an f16 table and the recurrent layers f16 throughout (f32
    /// lengths); MSE and BCE cast f16 operands to f32 themselves (as PyTorch's autocast runs
    /// losses in f32); the optimizer updates take f32.
    pub fn cast(&self, x: NodeId, to: DType) -> Result<NodeId> {
        let shape = self.check_id("cast", x)?;
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.push(Op::Cast(crate::ops::cast::Cast { to }), vec![x], shape)
    }

    /// A named trainable parameter, zero-initialised unless the device already holds a value under
    /// this name (see `Device::set_param`). Parameters (and constants) are f32; an f16 network
    /// casts them ([`Graph::cast`]), which the plan compiler folds into the products reading them.
    pub fn param(&self, name: &str, shape: impl Into<Shape>) -> NodeId {
        let shape = shape.into();
        if let Some(id) = self.declared_param(name, &shape, DType::F32) {
            return id;
        }
        self.push_typed(
            Op::Param {
                name: name.to_string(),
                init: Init::Zeros,
            },
            vec![],
            shape,
            DType::F32,
        )
    }

    /// The node of parameter `name` where this graph declares it already with this shape and
    /// type: a module applied twice shares its weights (their gradients add up), as a torch
    /// module called twice does (the first declaration's initial value counts). One declared
    /// with another shape or type is kept apart, and compiling names the clash.
    fn declared_param(&self, name: &str, shape: &Shape, dtype: DType) -> Option<NodeId> {
        let nodes = self.nodes.borrow();
        nodes
            .iter()
            .position(|n| {
                matches!(&n.op, Op::Param { name: m, .. } if m == name)
                    && &n.shape == shape
                    && n.dtype == dtype
            })
            .map(NodeId)
    }

    /// A named trainable parameter whose first value is `init` (unless the device already holds one).
    pub fn param_init(&self, name: &str, init: Tensor) -> NodeId {
        self.param_init_as(name, init, DType::F32)
    }

    /// A named parameter stored as `dtype` on the device, first `init` rounded to it: state kept
    /// between runs in the activations' type, such as an f16 key/value cache
    /// ([`crate::nn::MultiheadAttention::apply_cached`]). [`crate::Device::param`] reads it back
    /// widened to f32, [`crate::Device::set_param`] rounds what it writes; a plan declaring a
    /// parameter the device holds in another type is an error. Optimizers update f32 parameters
    /// only.
    pub fn param_init_as(&self, name: &str, init: Tensor, dtype: DType) -> NodeId {
        let shape = init.shape().clone();
        if let Some(id) = self.declared_param(name, &shape, dtype) {
            return id;
        }
        self.push_typed(
            Op::Param {
                name: name.to_string(),
                init: Init::Value(Arc::new(init)),
            },
            vec![],
            shape,
            dtype,
        )
    }

    /// A constant `(1)` holding `v`, which broadcasts against any shape (a threshold, a fill).
    pub fn scalar(&self, v: f32) -> NodeId {
        self.constant(Tensor::full([1], v))
    }

    /// A constant, uploaded once when a plan is compiled.
    pub fn constant(&self, value: Tensor) -> NodeId {
        let shape = value.shape().clone();
        self.push_typed(
            Op::Const {
                value: Arc::new(value),
            },
            vec![],
            shape,
            DType::F32,
        )
    }

    // ---- matmul ----

    /// Matrix product `[.., M, K] x [.., K, N] -> [.., M, N]` with broadcast batch axes.
    pub fn matmul(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.matmul_t(a, b, false, false)
    }

    /// Matrix product with either operand's last two axes transposed (`a^T b`, `a b^T`, ..).
    pub fn matmul_t(&self, a: NodeId, b: NodeId, trans_a: bool, trans_b: bool) -> Result<NodeId> {
        self.matmul_fused(a, b, trans_a, trans_b, None, false)
    }

    /// `relu?(op(a) op(b) + bias?)` as one kernel: the bias (`[M]` along rows or `[N]` along
    /// columns of the result, broadcast over batch axes) and the relu run in the matmul's
    /// epilogue instead of as kernels of their own. A batched `a` (not transposed) times a
    /// matrix `b` (a linear layer on `(B, L, E)`) is built as one `[B*L, E]` product between
    /// two reshapes (views).
    pub fn matmul_fused(
        &self,
        a: NodeId,
        b: NodeId,
        trans_a: bool,
        trans_b: bool,
        bias: Option<(NodeId, crate::ops::matmul::Bias)>,
        relu: bool,
    ) -> Result<NodeId> {
        let (sa, sb) = (self.check_id("matmul", a)?, self.check_id("matmul", b)?);
        let kind = bias.map(|(_, k)| k).unwrap_or_default();
        let m = MatMul {
            trans_a,
            trans_b,
            bias: kind,
            relu,
            ..Default::default()
        };
        let shape = m.infer(&sa, &sb)?;
        if !trans_a && sa.rank() > 2 && sb.rank() == 2 && kind != crate::ops::matmul::Bias::Rows {
            // a batched `a` times a shared matrix (a linear layer on `(B, L, E)`) is one product
            // over all B * L rows: one GEMM with M = B * L, whose backward computes b's
            // gradient as one product too instead of B products summed
            let rows = self.reshape(a, &[-1, sa.dims()[sa.rank() - 1] as isize])?;
            let y = self.matmul_fused(rows, b, false, trans_b, bias, relu)?;
            let dims: Vec<isize> = shape.dims().iter().map(|&d| d as isize).collect();
            return self.reshape(y, &dims);
        }
        let mut inputs = vec![a, b];
        if let Some((bn, _)) = bias {
            m.check_bias(&shape, &self.check_id("matmul", bn)?)?;
            if kind != crate::ops::matmul::Bias::None {
                inputs.push(bn);
            }
        }
        self.push(Op::MatMul(m), inputs, shape)
    }

    // ---- elementwise ----

    /// Applies an elementwise function of two operands, broadcasting.
    pub fn binary(&self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId> {
        let (sa, sb) = (self.check_id(op.name(), a)?, self.check_id(op.name(), b)?);
        let shape = op.infer(&sa, &sb)?;
        self.push(Op::Binary(op), vec![a, b], shape)
    }

    /// `a + b`, broadcasting.
    pub fn add(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Add, a, b)
    }
    /// `a - b`, broadcasting.
    pub fn sub(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Sub, a, b)
    }
    /// `a * b`, broadcasting.
    pub fn mul(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Mul, a, b)
    }
    /// `a / b`, broadcasting.
    pub fn div(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Div, a, b)
    }
    /// Elementwise maximum, broadcasting.
    pub fn maximum(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Maximum, a, b)
    }
    /// Elementwise minimum, broadcasting.
    pub fn minimum(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Minimum, a, b)
    }

    /// Applies an elementwise function.
    pub fn unary(&self, op: UnaryOp, a: NodeId) -> Result<NodeId> {
        let shape = self.check_id(op.name(), a)?;
        for s in op.scalars() {
            // the scalar is baked into the kernel, and pipeline constants must be finite
            if !s.is_finite() {
                return Err(shape_err(
                    op.name(),
                    format!("the scalar operand must be finite, got {s}"),
                ));
            }
        }
        self.push(Op::Unary(op), vec![a], shape)
    }

    /// `-a`
    pub fn neg(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Neg, a)
    }
    /// `exp(a)`
    pub fn exp(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Exp, a)
    }
    /// Natural logarithm.
    pub fn log(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Log, a)
    }
    /// Square root.
    pub fn sqrt(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Sqrt, a)
    }
    /// `max(a, 0)`
    pub fn relu(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Relu, a)
    }
    /// `1 / (1 + exp(-a))`
    pub fn sigmoid(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Sigmoid, a)
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Tanh, a)
    }
    /// Exact GELU (`torch.nn.GELU()`).
    pub fn gelu(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Gelu, a)
    }
    /// `|a|`
    pub fn abs(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Abs, a)
    }
    /// `a * a`
    pub fn square(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Square, a)
    }
    /// -1, 0 or 1 by the sign of `a`.
    pub fn sign(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Sign, a)
    }
    /// `a + s`
    pub fn add_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::AddScalar(s), a)
    }
    /// `a * s`
    pub fn mul_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::MulScalar(s), a)
    }
    /// `s - a`
    pub fn rsub_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::RSubScalar(s), a)
    }
    /// `a / s`
    pub fn div_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::DivScalar(s), a)
    }
    /// `s / a`
    pub fn rdiv_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::RDivScalar(s), a)
    }
    /// `a ^ s`
    pub fn pow_scalar(&self, a: NodeId, s: f32) -> Result<NodeId> {
        self.unary(UnaryOp::PowScalar(s), a)
    }

    /// `a * sigmoid(a)` (SiLU, swish; `torch.nn.functional.silu`).
    pub fn silu(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Silu, a)
    }

    /// `log(1 + exp(x))`, computed stably.
    pub fn softplus(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Softplus, a)
    }

    /// `a` where `a > 0`, else `slope * a` (`torch.nn.functional.leaky_relu`; torch's default
    /// slope is 0.01, DCGAN's discriminator uses 0.2).
    pub fn leaky_relu(&self, a: NodeId, slope: f32) -> Result<NodeId> {
        self.unary(UnaryOp::LeakyRelu(slope), a)
    }

    /// `a` where `a > 0`, else `alpha * (exp(a) - 1)` (`torch.nn.functional.elu`).
    pub fn elu(&self, a: NodeId, alpha: f32) -> Result<NodeId> {
        self.unary(UnaryOp::Elu(alpha), a)
    }

    /// `scale * elu(a, alpha)` with SELU's constants (`torch.nn.functional.selu`): one ELU and
    /// a scale, fused into one kernel.
    pub fn selu(&self, a: NodeId) -> Result<NodeId> {
        const ALPHA: f32 = 1.673_263_2;
        const SCALE: f32 = 1.050_701;
        self.mul_scalar(self.elu(a, ALPHA)?, SCALE)
    }

    /// `min(max(a, lo), hi)` (`torch.clamp`): the gradient passes where `lo <= a <= hi`. Where
    /// `lo > hi` every element is `hi`, as torch's.
    pub fn clamp(&self, a: NodeId, lo: f32, hi: f32) -> Result<NodeId> {
        self.unary(UnaryOp::Clamp(lo, hi), a)
    }

    /// `min(max(a, lo), hi)` as `torch.nn.functional.hardtanh`: the gradient passes strictly
    /// inside `(lo, hi)`, as torch's.
    pub fn hardtanh(&self, a: NodeId, lo: f32, hi: f32) -> Result<NodeId> {
        self.unary(UnaryOp::Hardtanh(lo, hi), a)
    }

    /// `min(max(a, 0), 6)` (`torch.nn.functional.relu6`, MobileNetV2's): `hardtanh(a, 0, 6)`.
    pub fn relu6(&self, a: NodeId) -> Result<NodeId> {
        self.hardtanh(a, 0.0, 6.0)
    }

    /// `relu6(a + 3) / 6` (`torch.nn.functional.hardsigmoid`).
    pub fn hardsigmoid(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Hardsigmoid, a)
    }

    /// `a * relu6(a + 3) / 6` (`torch.nn.functional.hardswish`, MobileNetV3's).
    pub fn hardswish(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Hardswish, a)
    }

    /// `a * tanh(softplus(a))` (`torch.nn.functional.mish`).
    pub fn mish(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Mish, a)
    }

    /// GELU's tanh approximation, `0.5 a (1 + tanh(sqrt(2 / pi) (a + 0.044715 a^3)))`
    /// (`torch.nn.functional.gelu(a, approximate="tanh")`, GPT-2's).
    pub fn gelu_tanh(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::GeluTanh, a)
    }

    /// `log(sigmoid(a))` (`torch.nn.functional.logsigmoid`), stable for large `|a|`.
    pub fn log_sigmoid(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::LogSigmoid, a)
    }

    /// `a / (1 + |a|)` (`torch.nn.functional.softsign`).
    pub fn softsign(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Softsign, a)
    }

    /// `sin(a)`
    pub fn sin(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Sin, a)
    }

    /// `cos(a)`
    pub fn cos(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Cos, a)
    }

    /// `1 / sqrt(a)` (`torch.rsqrt`).
    pub fn rsqrt(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Rsqrt, a)
    }

    /// `1 / a` (`torch.reciprocal`).
    pub fn reciprocal(&self, a: NodeId) -> Result<NodeId> {
        self.rdiv_scalar(a, 1.0)
    }

    /// `log(1 + a)`, exact for small `a` (`torch.log1p`).
    pub fn log1p(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Log1p, a)
    }

    /// `exp(a) - 1`, exact for small `a` (`torch.expm1`).
    pub fn expm1(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Expm1, a)
    }

    /// The error function (`torch.erf`; absolute error below 1.5e-7 on the GPU).
    pub fn erf(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Erf, a)
    }

    /// Rounding down (`torch.floor`); its gradient is zero, as torch's.
    pub fn floor(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Floor, a)
    }

    /// Rounding up (`torch.ceil`); its gradient is zero.
    pub fn ceil(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Ceil, a)
    }

    /// Rounding to the nearest whole number, halves to even (`torch.round`); its gradient is
    /// zero.
    pub fn round(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Round, a)
    }

    /// Rounding toward zero (`torch.trunc`); its gradient is zero.
    pub fn trunc(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Trunc, a)
    }

    /// Seeded inverted dropout (training mode): zeroes each element with probability `p` and
    /// scales the rest by `1 / (1 - p)`. `seed` is a `[1]` input holding a whole number, fed with
    /// a new value every step; `salt` tells apart dropout layers sharing that seed. Build the
    /// evaluation graph without dropout (or with `p = 0`).
    pub fn dropout(&self, x: NodeId, p: f32, seed: NodeId, salt: u32) -> Result<NodeId> {
        let shape = self.check_id("dropout", x)?;
        let ss = self.check_id("dropout", seed)?;
        if !(0.0..1.0).contains(&p) {
            return Err(shape_err(
                "dropout",
                format!("p must be in [0, 1), got {p}"),
            ));
        }
        if ss.numel() != 1 {
            return Err(shape_err(
                "dropout",
                format!("the seed must have one element, its shape is {ss}"),
            ));
        }
        self.push(
            Op::Dropout(crate::ops::dropout::Dropout { p, salt }),
            vec![x, seed],
            shape,
        )
    }

    /// The input node named `name`, if the graph has one.
    pub fn find_input(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .borrow()
            .iter()
            .position(|n| matches!(&n.op, Op::Input { name: m } if m == name))
            .map(NodeId)
    }

    /// The parameter node named `name`, if the graph has one.
    pub fn find_param(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .borrow()
            .iter()
            .position(|n| matches!(&n.op, Op::Param { name: m, .. } if m == name))
            .map(NodeId)
    }

    // ---- losses (PyTorch semantics, mean reduction) ----

    /// Softmax cross-entropy of `logits (N, C)` against integer class `labels (N)` stored as f32,
    /// mean over the batch, fused and numerically stable (`torch.nn.functional.cross_entropy`).
    /// A label outside `[0, C)` or not an integer makes the loss NaN. f16 logits are read as
    /// stored and the loss computed in f32 (an f32 loss; the logits' gradient is f16).
    /// As torch's, `logits (N, C, d1, ..)` against `labels (N, d1, ..)` (a segmentation's
    /// per-pixel classes) is the loss of every position: the class axis is moved last (one
    /// transpose) and the positions are rows.
    pub fn cross_entropy(&self, logits: NodeId, labels: NodeId) -> Result<NodeId> {
        if let Some((l, y, _)) = self.positions_as_rows(logits, labels)? {
            return self.cross_entropy(l, y);
        }
        let (sl, sy) = (
            self.check_id("cross_entropy", logits)?,
            self.check_id("cross_entropy", labels)?,
        );
        let shape = crate::ops::loss::CrossEntropy::infer(&sl, &sy)?;
        self.push(
            Op::CrossEntropy(crate::ops::loss::CrossEntropy::default()),
            vec![logits, labels],
            shape,
        )
    }

    /// Cross-entropy with torch's options (`torch.nn.functional.cross_entropy(logits, labels,
    /// weight=.., ignore_index=.., label_smoothing=.., reduction=..)`): `(1)` for the mean and the sum,
    /// `(N)` for [`Reduction::None`]. The mean is over the rows not ignored (NaN where every row
    /// is, as torch's). Without options it is [`Graph::cross_entropy`] (one fused kernel,
    /// the gradient in it in training); with them a loss per row
    /// ([`crate::ops::loss::CrossEntropyRows`]) reduced by graph ops, whose backward takes
    /// each row's share of the gradient; class weights are read by the same kernels, after
    /// the labels (the weights take no gradient, as torch's).
    pub fn cross_entropy_with(
        &self,
        logits: NodeId,
        labels: NodeId,
        opts: CrossEntropyOpts,
    ) -> Result<NodeId> {
        use crate::ops::loss::{CrossEntropy, CrossEntropyRows, RowOptions};
        const OP: &str = "cross_entropy";
        if let Some((l, y, positions)) = self.positions_as_rows(logits, labels)? {
            let loss = self.cross_entropy_with(l, y, opts)?;
            return match opts.reduction {
                // a loss per position, in the labels' shape
                Reduction::None => self.reshape(loss, &self.dims_isize(Shape(positions))),
                _ => Ok(loss),
            };
        }
        let (sl, sy) = (self.check_id(OP, logits)?, self.check_id(OP, labels)?);
        CrossEntropy::infer(&sl, &sy)?;
        let e = opts.label_smoothing;
        if !(0.0..=1.0).contains(&e) {
            return Err(shape_err(
                OP,
                format!("label_smoothing must be in [0, 1], got {e}"),
            ));
        }
        let ignore_index = label_index(OP, opts.ignore_index)?;
        if let Some(w) = opts.weight {
            return self.weighted_cross_entropy(logits, labels, w, ignore_index, e, opts.reduction);
        }
        let plain = ignore_index.is_none() && e == 0.0;
        match opts.reduction {
            Reduction::Mean if plain => return self.cross_entropy(logits, labels),
            // smoothing alone: the fused loss, its gradient in its kernel in training
            Reduction::Mean if ignore_index.is_none() => {
                let fused = CrossEntropy {
                    with_grad: false,
                    opts: RowOptions {
                        ignore_index: None,
                        smoothing_bits: e.to_bits(),
                        weighted: false,
                    },
                };
                return self.push(
                    Op::CrossEntropy(fused),
                    vec![logits, labels],
                    Shape(vec![1]),
                );
            }
            _ => {}
        }
        let rows_op = CrossEntropyRows {
            with_grad: false,
            opts: RowOptions {
                ignore_index,
                smoothing_bits: e.to_bits(),
                weighted: false,
            },
            ..Default::default()
        };
        let rows = self.push(
            Op::CrossEntropyRows(rows_op),
            vec![logits, labels],
            Shape(vec![sl.dims()[0]]),
        )?;
        match (opts.reduction, ignore_index) {
            (Reduction::None, _) => Ok(rows),
            (Reduction::Sum, _) => self.sum_all(rows),
            (Reduction::Mean, None) => self.mean_all(rows),
            (Reduction::Mean, Some(i)) => {
                let kept = self.sum_all(self.kept_labels(labels, i)?)?;
                self.div(self.sum_all(rows)?, kept)
            }
        }
    }

    /// torch's K-dimensional cross-entropy: `logits (N, C, d1, ..)` and `labels (N, d1, ..)` as
    /// `(N * d1 * .., C)` rows (the class axis moved last) and their labels, with the labels'
    /// shape; `None` for other shapes (the 2-D loss's own checks follow).
    fn positions_as_rows(
        &self,
        logits: NodeId,
        labels: NodeId,
    ) -> Result<Option<(NodeId, NodeId, Vec<usize>)>> {
        let (sl, sy) = (
            self.check_id("cross_entropy", logits)?,
            self.check_id("cross_entropy", labels)?,
        );
        let r = sl.rank();
        let mut positions = sl.dims().to_vec();
        if r < 3 {
            return Ok(None);
        }
        let c = positions.remove(1);
        if sy.dims() != positions.as_slice() {
            return Err(shape_err(
                "cross_entropy",
                format!(
                    "logits {sl} and labels {sy}: expected labels {} (the logits without their \
                     class axis)",
                    Shape(positions)
                ),
            ));
        }
        let mut order: Vec<usize> = vec![0];
        order.extend(2..r);
        order.push(1);
        let rows = self.reshape(self.permute(logits, &order)?, &[-1, c as isize])?;
        Ok(Some((rows, self.reshape(labels, &[-1])?, positions)))
    }

    /// Cross-entropy with class weights `w (C)`: the loss per row
    /// ([`crate::ops::loss::CrossEntropyRows`] with [`crate::ops::loss::RowOptions::weighted`],
    /// its labels input the labels followed by the weights) `(1 - e) w[y] (lse - x[y]) + e / C
    /// sum_c w[c] (lse - x[c])`, 0 where ignored, NaN for a label outside `[0, C)`; the mean
    /// divides by the kept rows' `w[y]` (torch's `nll_loss` and label-smoothing
    /// normalization). The weights take no gradient (as torch's).
    fn weighted_cross_entropy(
        &self,
        logits: NodeId,
        labels: NodeId,
        w: NodeId,
        ignore_index: Option<i32>,
        e: f32,
        reduction: Reduction,
    ) -> Result<NodeId> {
        use crate::ops::loss::{CrossEntropyRows, RowOptions};
        const OP: &str = "cross_entropy";
        let (n, c) = {
            let s = self.shape(logits);
            (s.dims()[0], s.dims()[1])
        };
        let sw = self.check_id(OP, w)?;
        if sw.dims() != [c] || self.dtype(w) != DType::F32 {
            return Err(shape_err(
                OP,
                format!(
                    "weight {sw} ({}): expected f32 ({c}), a weight per class",
                    self.dtype(w)
                ),
            ));
        }
        let rows_op = CrossEntropyRows {
            opts: RowOptions {
                ignore_index,
                smoothing_bits: e.to_bits(),
                weighted: true,
            },
            ..Default::default()
        };
        let packed = self.concat(&[labels, w], 0)?;
        let rows = self.push(
            Op::CrossEntropyRows(rows_op),
            vec![logits, packed],
            Shape(vec![n]),
        )?;
        match reduction {
            Reduction::None => Ok(rows),
            Reduction::Sum => self.sum_all(rows),
            Reduction::Mean => {
                // the kept rows' weights (an ignored label picks row 0, then counts 0; one out
                // of range picks NaN, as its loss)
                let picked = match ignore_index {
                    None => self.index_select(w, 0, labels)?,
                    Some(i) => {
                        let kept = self.kept_labels(labels, i)?;
                        let zero = self.scalar(0.0);
                        let safe = self.where_cond(kept, labels, zero)?;
                        self.mul(self.index_select(w, 0, safe)?, kept)?
                    }
                };
                self.div(self.sum_all(rows)?, self.sum_all(picked)?)
            }
        }
    }

    /// Mean squared error (`torch.nn.functional.mse_loss`), shape `[1]`. f16 operands are cast
    /// to f32 first (as autocast runs losses in f32): the loss is f32, the gradient of an f16
    /// prediction f16.
    pub fn mse_loss(&self, pred: NodeId, target: NodeId) -> Result<NodeId> {
        let (pred, target) = self.regression_operands("mse_loss", pred, target)?;
        self.mean_all(self.square(self.sub(pred, target)?)?)
    }

    /// The prediction and target of a regression loss, both cast to f32 (as autocast runs
    /// losses in f32), after checking that their shapes agree.
    fn regression_operands(
        &self,
        op: &'static str,
        pred: NodeId,
        target: NodeId,
    ) -> Result<(NodeId, NodeId)> {
        let (a, b) = (self.check_id(op, pred)?, self.check_id(op, target)?);
        if a != b {
            return Err(shape_err(
                op,
                format!("prediction {a} and target {b} differ"),
            ));
        }
        Ok((self.cast(pred, DType::F32)?, self.cast(target, DType::F32)?))
    }

    /// Mean absolute error (`torch.nn.functional.l1_loss`), shape `[1]`: one kernel (the
    /// difference inside the mean's loads); the gradient at a zero difference is 0, as torch's.
    pub fn l1_loss(&self, pred: NodeId, target: NodeId) -> Result<NodeId> {
        let (pred, target) = self.regression_operands("l1_loss", pred, target)?;
        self.mean_all(self.abs(self.sub(pred, target)?)?)
    }

    /// Huber loss (`torch.nn.functional.huber_loss(pred, target, delta=..)`), mean, shape
    /// `[1]`: `0.5 d^2` where `|d| < delta`, else `delta (|d| - 0.5 delta)`, computed as
    /// `m (|d| - 0.5 m)` with `m = min(|d|, delta)`, one elementwise chain inside the mean.
    pub fn huber_loss(&self, pred: NodeId, target: NodeId, delta: f32) -> Result<NodeId> {
        self.huber_mean("huber_loss", pred, target, delta, 1.0)
    }

    /// Smooth L1 loss (`torch.nn.functional.smooth_l1_loss(pred, target, beta=..)`), mean,
    /// shape `[1]`: the Huber loss with `delta = beta` divided by `beta`; `beta = 0` is
    /// [`Graph::l1_loss`], as torch's.
    pub fn smooth_l1_loss(&self, pred: NodeId, target: NodeId, beta: f32) -> Result<NodeId> {
        if beta == 0.0 {
            self.regression_operands("smooth_l1_loss", pred, target)?;
            return self.l1_loss(pred, target);
        }
        self.huber_mean("smooth_l1_loss", pred, target, beta, 1.0 / beta)
    }

    /// `scale * mean(m (|d| - 0.5 m))`, `m = min(|d|, delta)`: Huber's and smooth L1's loss.
    fn huber_mean(
        &self,
        op: &'static str,
        pred: NodeId,
        target: NodeId,
        delta: f32,
        scale: f32,
    ) -> Result<NodeId> {
        if !(delta > 0.0 && delta.is_finite()) {
            return Err(shape_err(
                op,
                format!("delta (beta) must be positive and finite, got {delta}"),
            ));
        }
        let (pred, target) = self.regression_operands(op, pred, target)?;
        let a = self.abs(self.sub(pred, target)?)?;
        let m = self.clamp(a, 0.0, delta)?;
        let h = self.mul(m, self.sub(a, self.mul_scalar(m, 0.5)?)?)?;
        let h = if scale == 1.0 {
            h
        } else {
            self.mul_scalar(h, scale)?
        };
        self.mean_all(h)
    }

    /// Negative log-likelihood of class labels (`torch.nn.functional.nll_loss(log_probs,
    /// labels, ignore_index=..)`): `-mean(log_probs[i, labels[i]])` over `log_probs (N, C)` and
    /// `labels (N)` (class indices as f32), the mean over the rows not ignored, shape `[1]`.
    /// The pick is a comparison of each label with the class indices, inside the sum's loads
    /// (one kernel; its gradient one fused kernel). A label outside `[0, C)` picks nothing.
    pub fn nll_loss(
        &self,
        log_probs: NodeId,
        labels: NodeId,
        ignore_index: Option<i64>,
    ) -> Result<NodeId> {
        const OP: &str = "nll_loss";
        let (sl, sy) = (self.check_id(OP, log_probs)?, self.check_id(OP, labels)?);
        if sl.rank() != 2 || sy.dims() != [sl.dims()[0]] {
            return Err(shape_err(
                OP,
                format!("log_probs {sl} and labels {sy}: expected log_probs (N, C) and labels (N)"),
            ));
        }
        let (n, c) = (sl.dims()[0], sl.dims()[1]);
        let ignore_index = label_index(OP, ignore_index)?;
        let log_probs = self.cast(log_probs, DType::F32)?;
        let (column, onehot) = self.class_onehot(labels, n, c)?;
        match ignore_index {
            // the scale inside the sum's program, so that the loss stays one kernel
            None => self.sum_all(self.mul(log_probs, self.mul_scalar(onehot, -1.0 / n as f32)?)?),
            Some(i) => {
                let kept = self.kept_labels(column, i)?;
                let picked = self.sum_all(self.mul(self.mul(log_probs, onehot)?, kept)?)?;
                self.neg(self.div(picked, self.sum_all(kept)?)?)
            }
        }
    }

    /// `labels (N)` as a column `(N, 1)` and its one-hot rows `(N, C)` (1 where the label is
    /// the class index; a label outside `[0, C)` has none): the class-label losses' pick.
    fn class_onehot(&self, labels: NodeId, n: usize, c: usize) -> Result<(NodeId, NodeId)> {
        let classes = self.constant(Tensor::new([1, c], (0..c).map(|k| k as f32).collect())?);
        let column = self.reshape(labels, &[n as isize, 1])?;
        Ok((column, self.binary(BinaryOp::Equal, column, classes)?))
    }

    /// 1 where a label is not `ignore`, 0 where it is (a mask with both bounds equal), in the
    /// labels' shape: the rows a class-label loss keeps.
    fn kept_labels(&self, labels: NodeId, ignore: i32) -> Result<NodeId> {
        let i = ignore as f32;
        self.rsub_scalar(self.unary(UnaryOp::ClampMask(i, i), labels)?, 1.0)
    }

    /// Kullback-Leibler divergence (`torch.nn.functional.kl_div(input, target,
    /// reduction="batchmean", log_target=..)`): `sum(target (log target - input)) / N` over
    /// `input` (log-probabilities) and `target` of the same shape, `N` the first extent, shape
    /// `[1]`. A zero target adds 0 (torch's `xlogy`); with `log_target` the target is given as
    /// log-probabilities, `sum(exp(t) (t - input)) / N`.
    pub fn kl_div(&self, input: NodeId, target: NodeId, log_target: bool) -> Result<NodeId> {
        let (x, t) = self.regression_operands("kl_div", input, target)?;
        let n = self.shape(x).dims().first().copied().unwrap_or(1).max(1);
        let terms = if log_target {
            self.mul(self.exp(t)?, self.sub(t, x)?)?
        } else {
            // t log t with 0 log 0 = 0: the logarithm of max(t, smallest normal) stays finite,
            // and a zero t multiplies it away
            let log_t = self.log(self.clamp(t, f32::MIN_POSITIVE, f32::MAX)?)?;
            self.mul(t, self.sub(log_t, x)?)?
        };
        // each term divided by N inside the sum's program: one kernel
        self.sum_all(self.div_scalar(terms, n as f32)?)
    }

    /// Binary cross-entropy on logits (`binary_cross_entropy_with_logits`), mean, shape `[1]`:
    /// `softplus(x) - x y`, stable for any logit. f16 operands are cast to f32 first, as in
    /// [`Graph::mse_loss`].
    pub fn bce_with_logits(&self, logits: NodeId, target: NodeId) -> Result<NodeId> {
        let (a, b) = (
            self.check_id("bce_with_logits", logits)?,
            self.check_id("bce_with_logits", target)?,
        );
        if a != b {
            return Err(shape_err(
                "bce_with_logits",
                format!("logits {a} and target {b} differ"),
            ));
        }
        let (logits, target) = (
            self.cast(logits, DType::F32)?,
            self.cast(target, DType::F32)?,
        );
        self.mean_all(self.sub(self.softplus(logits)?, self.mul(logits, target)?)?)
    }

    /// Gradient accumulation: `acc := (first ? 0 : acc) + scale * grad` in place on `acc` (an
    /// f32 parameter of `grad`'s shape); returns the node (its value is `acc` after). Used by
    /// `nn::TrainStep::with_accumulation`.
    pub fn accumulate(&self, acc: NodeId, grad: NodeId, first: bool, scale: f32) -> Result<NodeId> {
        const OP: &str = "accumulate";
        let (a, g) = (self.check_id(OP, acc)?, self.check_id(OP, grad)?);
        if a != g {
            return Err(shape_err(
                OP,
                format!("accumulator {a} and gradient {g} differ"),
            ));
        }
        if !self.is_param(acc) {
            return Err(shape_err(OP, "the accumulator must be a parameter node"));
        }
        let op = Op::Accumulate(crate::ops::optim::Accumulate { first, scale });
        self.push(op, vec![grad, acc], a)
    }

    /// An exponential moving average of the updated parameter `p` into the parameter `ema`, in
    /// place (`ops::optim::EmaUpdate`: a copy on the step `hyper` flags as the first, then
    /// `ema + (1 - decay) (p - ema)`). Used by `nn::Optimizer::ema`.
    pub fn ema_update(&self, hyper: NodeId, p: NodeId, ema: NodeId, decay: f32) -> Result<NodeId> {
        const OP: &str = "ema_update";
        let (sh, sp, se) = (
            self.check_id(OP, hyper)?,
            self.check_id(OP, p)?,
            self.check_id(OP, ema)?,
        );
        if sp != se || sh.dims() != [crate::ops::optim::HYPER_LEN] {
            return Err(shape_err(
                OP,
                format!("hyper {sh}, parameter {sp} and average {se}: expected a hyper vector and one shape"),
            ));
        }
        if !self.is_param(ema) {
            return Err(shape_err(OP, "the average must be a parameter node"));
        }
        if !(0.0..=1.0).contains(&decay) {
            return Err(shape_err(
                OP,
                format!("decay must be in [0, 1], got {decay}"),
            ));
        }
        let op = Op::EmaUpdate(crate::ops::optim::EmaUpdate { decay });
        self.push(op, vec![hyper, p, ema], se)
    }

    /// Dynamic loss scaling's step between the backward pass and the updates
    /// (`ops::optim::ScalerStep`): from `hyper` (16), `sumsq` (`[1]`, the scaled gradients'
    /// sum of squares) and `state` (a parameter of [`crate::ops::optim::SCALER_STATE_LEN`],
    /// updated in place), the hyper vector the updates read. Used by `nn::Optimizer`.
    pub fn grad_scaler(
        &self,
        step: crate::ops::optim::ScalerStep,
        hyper: NodeId,
        sumsq: NodeId,
        state: NodeId,
    ) -> Result<NodeId> {
        use crate::ops::optim::{HYPER_LEN, SCALER_STATE_LEN};
        const OP: &str = "grad_scaler";
        let (h, s, st) = (
            self.check_id(OP, hyper)?,
            self.check_id(OP, sumsq)?,
            self.check_id(OP, state)?,
        );
        if h.dims() != [HYPER_LEN] || s.numel() != 1 || st.dims() != [SCALER_STATE_LEN] {
            return Err(shape_err(
                OP,
                format!(
                    "hyper [{HYPER_LEN}], a sum of squares of one element and a state \
                     [{SCALER_STATE_LEN}], got {h}, {s} and {st}"
                ),
            ));
        }
        if !self.is_param(state) {
            return Err(shape_err(OP, "the scaler's state must be a parameter node"));
        }
        self.push(Op::ScalerStep(step), vec![hyper, sumsq, state], h)
    }

    /// An in-place optimizer update of `param` (a parameter node) from `grad`: `hyper` is the
    /// per-step input (see `ops::optim::Hyper`), `scale` a `[1]` gradient scale, `states` the
    /// optimizer's state parameters. Used by `nn::Optimizer`.
    pub fn optim_step(
        &self,
        kind: crate::ops::optim::OptimKind,
        hyper: NodeId,
        scale: NodeId,
        grad: NodeId,
        param: NodeId,
        states: &[NodeId],
    ) -> Result<NodeId> {
        let shape = self.check_id("optim_step", param)?;
        let is_param = |id: NodeId| matches!(self.nodes.borrow()[id.0].op, Op::Param { .. });
        if !is_param(param)
            || !states.iter().all(|&s| is_param(s))
            || states.len() != kind.n_states()
        {
            return Err(shape_err(
                "optim_step",
                "the parameter and its states must be parameter nodes",
            ));
        }
        for &t in std::iter::once(&grad).chain(states) {
            let st = self.check_id("optim_step", t)?;
            if st != shape {
                return Err(shape_err(
                    "optim_step",
                    format!("parameter {shape} and tensor {st} differ"),
                ));
            }
        }
        let mut inputs = vec![hyper, scale, grad, param];
        inputs.extend(states);
        self.push(
            Op::OptimStep(crate::ops::optim::OptimStep { kind }),
            inputs,
            shape,
        )
    }

    // ---- normalization (ops::norm) ----

    /// Batch normalization of `x (N, C, *)` per channel, as `torch.nn.functional.batch_norm`:
    /// `affine` is `(weight, bias)`, each `(C)`; with `training` the batch's statistics normalize
    /// and update `running` in place (every plan that computes this node runs the update), else
    /// the running statistics normalize. See [`crate::ops::norm`].
    pub fn batch_norm(
        &self,
        x: NodeId,
        affine: Option<(NodeId, NodeId)>,
        running: Option<crate::ops::norm::RunningStats>,
        training: bool,
        eps: f32,
    ) -> Result<NodeId> {
        crate::ops::norm::batch_norm(self, x, affine, running, training, eps)
    }

    /// Layer normalization of `x` over its last `normalized` axes, as
    /// `torch.nn.functional.layer_norm`; `affine` is `(weight, bias)` shaped like those axes.
    pub fn layer_norm(
        &self,
        x: NodeId,
        normalized: usize,
        affine: Option<(NodeId, NodeId)>,
        eps: f32,
    ) -> Result<NodeId> {
        crate::ops::norm::layer_norm(self, x, normalized, affine, eps)
    }

    /// Root-mean-square normalization of `x` over its last `normalized` axes, as
    /// `torch.nn.functional.rms_norm`: `x / sqrt(mean(x^2) + eps) * weight`, `weight` shaped
    /// like those axes, `eps` `None` for torch's default (the machine epsilon of `x`'s type).
    pub fn rms_norm(
        &self,
        x: NodeId,
        normalized: usize,
        weight: Option<NodeId>,
        eps: Option<f32>,
    ) -> Result<NodeId> {
        crate::ops::norm::rms_norm(self, x, normalized, weight, eps)
    }

    /// Group normalization of `x (N, C, *)` over groups of `C / num_groups` channels per
    /// sample, as `torch.nn.functional.group_norm`; `affine` is `(weight, bias)`, each `(C)`.
    /// `num_groups = C` is instance normalization.
    pub fn group_norm(
        &self,
        x: NodeId,
        num_groups: usize,
        affine: Option<(NodeId, NodeId)>,
        eps: f32,
    ) -> Result<NodeId> {
        crate::ops::norm::group_norm(self, x, num_groups, affine, eps)
    }

    /// `running[j] := (1 - momentum) * running[j] + momentum * scales[j] * value[j]`, in place on
    /// one or two parameters `running` (f32, of one shape `(C)`), from `value` `(C)` (one) or
    /// `(2, C)` (two: a row each). The update is a state update of the graph
    /// ([`Graph::state_updates`]): every plan that computes `value` runs it after `value`,
    /// whether or not it is asked for, as PyTorch's training-mode forward updates a batch norm's
    /// running statistics. Returns the node (its value is `running[0]`).
    pub fn running_update(
        &self,
        running: &[NodeId],
        value: NodeId,
        momentum: f32,
        scales: &[f32],
    ) -> Result<NodeId> {
        crate::ops::norm::running_update(self, running, value, momentum, scales)
    }

    // ---- attention (ops::attention) ----

    /// Scaled dot-product attention, as `torch.nn.functional.scaled_dot_product_attention`:
    /// `softmax(q k^T * scale + mask, -1) v` for `q (*, Lq, D)`, `k (*, Lk, D)`, `v (*, Lk, Dv)`
    /// with the same leading axes (batch, heads) -> `(*, Lq, Dv)`. `mask` is added to the scores
    /// (f32, broadcastable to `(*, Lq, Lk)`; `-inf` hides a key); `causal` hides keys after the
    /// query (`j > i`, top-left aligned as torch's `is_causal`); `scale` defaults to
    /// `1 / sqrt(D)`. One fused kernel forward (the scores are never stored); see
    /// [`crate::ops::attention`].
    pub fn attention(
        &self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        scale: Option<f32>,
    ) -> Result<NodeId> {
        crate::ops::attention::attention(self, q, k, v, mask, causal, scale, None)
    }

    /// [`Graph::attention`] with dropout of the probabilities (torch's `dropout_p`): each is
    /// dropped with probability `p`, the kept ones scaled by `1 / (1 - p)`, with the counter-based
    /// mask of [`Graph::dropout`] (`seed` a `[1]` input fed a new whole number each step,
    /// `salt` distinct per dropout site). Still one kernel forward; the backward pass recomputes
    /// the mask.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_dropout(
        &self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        scale: Option<f32>,
        p: f32,
        seed: NodeId,
        salt: u32,
    ) -> Result<NodeId> {
        let dropout = Some((p, seed, salt));
        crate::ops::attention::attention(self, q, k, v, mask, causal, scale, dropout)
    }

    /// Self-attention of packed projections `qkv (N, L, 3, H, D)` -> `(N, L, H, D)`: q, k and v
    /// of every position side by side, as a `(N, L, 3E)` in-projection's output viewed (torch's
    /// `in_proj_weight` order). The same as [`Graph::attention`] of the heads `(N, H, L, D)` with
    /// the output permuted back to `(N, L, H, D)`, but the kernels read and write the packed
    /// layout, so multi-head attention needs no permutes or copies of its heads, and the
    /// gradient is one `(N, L, 3, H, D)` tensor. The mask broadcasts to `(N, H, L, L)`.
    pub fn attention_packed(
        &self,
        qkv: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        scale: Option<f32>,
    ) -> Result<NodeId> {
        crate::ops::attention::attention_packed(self, qkv, mask, causal, scale, None)
    }

    /// Attention of `q (N, Lq, H, D)`, `k (N, Lk, H, D)`, `v (N, Lk, H, Dv)` -> `(N, Lq, H, Dv)`
    /// (the layout FlashAttention's `flash_attn_func` takes): [`Graph::attention`] of the heads
    /// `(N, H, L, D)` with the output permuted back, but the kernels read and write this layout,
    /// so projections `(N, L, E)` viewed as `(N, L, H, E / H)` need no permutes (cross-attention).
    /// `dropout` as [`Graph::attention_dropout`]'s `(p, seed, salt)`. The mask broadcasts to
    /// `(N, H, Lq, Lk)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_tokens(
        &self,
        q: NodeId,
        k: NodeId,
        v: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        scale: Option<f32>,
        dropout: Option<(f32, NodeId, u32)>,
    ) -> Result<NodeId> {
        crate::ops::attention::attention_tokens(self, q, k, v, mask, causal, scale, dropout)
    }

    /// [`Graph::attention_packed`] with dropout of the probabilities, as
    /// [`Graph::attention_dropout`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_packed_dropout(
        &self,
        qkv: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        scale: Option<f32>,
        p: f32,
        seed: NodeId,
        salt: u32,
    ) -> Result<NodeId> {
        let dropout = Some((p, seed, salt));
        crate::ops::attention::attention_packed(self, qkv, mask, causal, scale, dropout)
    }

    /// Writes the rows of `value (*, n, W)` in place into the parameter `cache (*, T, W)` at
    /// rows `position .. position + n` (`position` a `[1]` node, fed a whole number each run;
    /// rows past `T` are dropped) and returns the cache after the write: read this node, not
    /// `cache`, to see the new rows. A key/value cache for decoding (see
    /// [`crate::nn::MultiheadAttention::apply_cached`]).
    pub fn write_rows(&self, cache: NodeId, value: NodeId, position: NodeId) -> Result<NodeId> {
        const OP: &str = "write_rows";
        let (vs, ps, cs) = (
            self.check_id(OP, value)?,
            self.check_id(OP, position)?,
            self.check_id(OP, cache)?,
        );
        if !self.is_param(cache) {
            return Err(shape_err(OP, "the cache must be a parameter node"));
        }
        let shape = crate::ops::layout::WriteRows::infer(&vs, &ps, &cs)?;
        self.push(
            Op::WriteRows(crate::ops::layout::WriteRows),
            vec![value, position, cache],
            shape,
        )
    }

    // ---- softmax and reductions ----

    /// Softmax along `axis` (negative counts from the end: -1 is the last axis).
    pub fn softmax(&self, a: NodeId, axis: isize) -> Result<NodeId> {
        self.softmax_impl(a, axis, false)
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, a: NodeId, axis: isize) -> Result<NodeId> {
        self.softmax_impl(a, axis, true)
    }

    fn softmax_impl(&self, a: NodeId, axis: isize, log: bool) -> Result<NodeId> {
        let name = if log { "log_softmax" } else { "softmax" };
        let s = self.check_id(name, a)?;
        let axis = s.axis(name, axis)?;
        let shape = crate::ops::softmax::infer(&s);
        self.push(Op::Softmax(Softmax { axis, log }), vec![a], shape)
    }

    fn reduce(&self, kind: ReduceKind, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        let probe = Reduce {
            kind,
            axis: 0,
            keepdim,
        };
        let s = self.check_id(probe.name(), a)?;
        let r = Reduce {
            kind,
            axis: s.axis(probe.name(), axis)?,
            keepdim,
        };
        let shape = r.infer(&s)?;
        self.push(Op::Reduce(r), vec![a], shape)
    }

    /// Sum over `axis`; `keepdim` keeps it with extent 1.
    pub fn sum(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        self.reduce(ReduceKind::Sum, a, axis, keepdim)
    }
    /// Mean over `axis`.
    pub fn mean(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        self.reduce(ReduceKind::Mean, a, axis, keepdim)
    }
    /// Maximum over `axis`.
    pub fn max(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        self.reduce(ReduceKind::Max, a, axis, keepdim)
    }
    /// Minimum over `axis` (`torch.amin`).
    pub fn min(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        self.reduce(ReduceKind::Min, a, axis, keepdim)
    }
    /// The index of the maximum over `axis` (`torch.argmax`; the first on ties), as an f32
    /// whole number (indices are f32 in kiln, as labels are); no gradient. A classifier's
    /// predictions: `argmax(logits, 1, false)`, its accuracy `mean_all(eq(.., labels))`,
    /// without reading the logits back.
    pub fn argmax(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        let a = self.cast(a, DType::F32)?;
        self.reduce(ReduceKind::ArgMax, a, axis, keepdim)
    }
    /// The index of the minimum over `axis` (`torch.argmin`), as [`Graph::argmax`].
    pub fn argmin(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        let a = self.cast(a, DType::F32)?;
        self.reduce(ReduceKind::ArgMin, a, axis, keepdim)
    }

    /// `on_true` where `cond` is nonzero, else `on_false` (`torch.where`, broadcasting all
    /// three): each side kept exactly where chosen (an inf or NaN on the other side does not
    /// leak), one fused kernel; the gradient goes to the side chosen, none to `cond`.
    pub fn where_cond(&self, cond: NodeId, on_true: NodeId, on_false: NodeId) -> Result<NodeId> {
        const OP: &str = "where_cond";
        let (sc, st, sf) = (
            self.check_id(OP, cond)?,
            self.check_id(OP, on_true)?,
            self.check_id(OP, on_false)?,
        );
        let both = crate::ops::binary::broadcast_shapes(OP, &st, &sf)?;
        crate::ops::binary::broadcast_shapes(OP, &sc, &both)?;
        let t = self.binary(BinaryOp::KeepWhere, on_true, cond)?;
        let zero = self.scalar(0.0);
        let f = self.binary(BinaryOp::KeepWhere, on_false, self.eq(cond, zero)?)?;
        self.add(t, f)
    }

    /// `value` where `mask` is nonzero, else `a` (`Tensor.masked_fill`; `value` may be
    /// infinite: `-inf` hides attention scores), one fused kernel; the gradient flows where
    /// `a` is kept.
    pub fn masked_fill(&self, a: NodeId, mask: NodeId, value: f32) -> Result<NodeId> {
        let fill = self.scalar(value);
        self.where_cond(mask, fill, a)
    }

    /// `1` where `a == b`, else `0` (broadcasting; `torch.eq` as f32); no gradient.
    pub fn eq(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::Equal, a, b)
    }
    /// `1` where `a != b`, else `0`, as [`Graph::eq`].
    pub fn ne(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.rsub_scalar(self.eq(a, b)?, 1.0)
    }
    /// `1` where `a >= b`, else `0`, as [`Graph::eq`].
    pub fn ge(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::GreaterEqual, a, b)
    }
    /// `1` where `a <= b`, else `0`, as [`Graph::eq`].
    pub fn le(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.binary(BinaryOp::GreaterEqual, b, a)
    }
    /// `1` where `a > b`, else `0`, as [`Graph::eq`].
    pub fn gt(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.rsub_scalar(self.le(a, b)?, 1.0)
    }
    /// `1` where `a < b`, else `0`, as [`Graph::eq`].
    pub fn lt(&self, a: NodeId, b: NodeId) -> Result<NodeId> {
        self.rsub_scalar(self.ge(a, b)?, 1.0)
    }
    /// Sum of every element, as a tensor of shape `[1]`.
    pub fn sum_all(&self, a: NodeId) -> Result<NodeId> {
        let flat = self.reshape(a, &[-1])?;
        self.sum(flat, 0, true)
    }
    /// Sum of the squares of every element of every tensor in `xs` (f32, any shapes), shape
    /// `[1]`: the squared global L2 norm that gradient clipping takes. One multi-tensor kernel
    /// per 7 tensors writes partial sums into one buffer (`ops::reduce::SumSquares`; a plan
    /// merges them as far as the adapter's storage-buffer limit allows:
    /// `exec::lower::merge_sum_squares`), one reduction adds them, instead of a reduction per
    /// tensor. Differentiable (`2 x` for each tensor), so it also
    /// serves as an L2 penalty in a loss.
    pub fn sum_squares(&self, xs: &[NodeId]) -> Result<NodeId> {
        if xs.is_empty() {
            return Err(shape_err("sum_squares", "no tensors"));
        }
        use crate::ops::reduce::{SumSquares, SUM_SQUARES_MEMBERS};
        let shapes = xs
            .iter()
            .map(|&x| self.check_id("sum_squares", x))
            .collect::<Result<Vec<_>>>()?;
        let total = SumSquares::partials(&shapes);
        let (mut offset, mut prev) = (0, None);
        for (members, part) in xs
            .chunks(SUM_SQUARES_MEMBERS)
            .zip(shapes.chunks(SUM_SQUARES_MEMBERS))
        {
            let op = SumSquares {
                offset,
                total,
                chained: prev.is_some(),
            };
            let shape = op.infer(part)?;
            let inputs = members.iter().copied().chain(prev).collect();
            prev = Some(self.push(Op::SumSquares(op), inputs, shape)?);
            offset += SumSquares::partials(part);
        }
        self.sum_all(prev.expect("at least one tensor"))
    }

    /// Mean of every element, as a tensor of shape `[1]`.
    pub fn mean_all(&self, a: NodeId) -> Result<NodeId> {
        let flat = self.reshape(a, &[-1])?;
        self.mean(flat, 0, true)
    }

    /// `a` as a constant to autodiff (`torch.Tensor.detach`): the same values, and no
    /// gradient flows back through it. Fused into its readers (a kernel only where it stands
    /// alone).
    pub fn detach(&self, a: NodeId) -> Result<NodeId> {
        self.unary(UnaryOp::Detach, a)
    }

    /// `log(sum(exp(a)))` over `axis` (`torch.logsumexp`), stable: the maximum is subtracted
    /// first (detached: the gradient is exactly `softmax(a)`). A slice of `-inf` gives `-inf`
    /// and one holding `+inf` gives `+inf`, as torch's.
    pub fn logsumexp(&self, a: NodeId, axis: isize, keepdim: bool) -> Result<NodeId> {
        let m = self.detach(self.max(a, axis, true)?)?;
        // an infinite maximum is replaced by 0 (torch's), so that inf - inf is not NaN
        let inf = self.scalar(f32::INFINITY);
        let zero = self.scalar(0.0);
        let m = self.where_cond(self.eq(self.abs(m)?, inf)?, zero, m)?;
        let s = self.sum(self.exp(self.sub(a, m)?)?, axis, keepdim)?;
        let m = match keepdim {
            true => m,
            false => self.reshape(m, &self.dims_isize(self.shape(s)))?,
        };
        self.add(self.log(s)?, m)
    }

    /// The variance over `axis` (`torch.var(a, axis, correction=..)`): the sum of squared
    /// deviations from the mean divided by `max(n - correction, 0)` (1: Bessel's unbiased
    /// estimate, torch's default; 0: the population's). Composed of a mean, one fused
    /// elementwise pass and a sum.
    pub fn var(&self, a: NodeId, axis: isize, correction: usize, keepdim: bool) -> Result<NodeId> {
        let s = self.check_id("var", a)?;
        let n = s.dims()[s.axis("var", axis)?];
        let d = self.sub(a, self.mean(a, axis, true)?)?;
        let sq = self.sum(self.square(d)?, axis, keepdim)?;
        self.div_scalar(sq, n.saturating_sub(correction) as f32)
    }

    /// The standard deviation over `axis`: the square root of [`Graph::var`].
    pub fn std(&self, a: NodeId, axis: isize, correction: usize, keepdim: bool) -> Result<NodeId> {
        self.sqrt(self.var(a, axis, correction, keepdim)?)
    }

    /// `dims` as a reshape's target.
    fn dims_isize(&self, s: Shape) -> Vec<isize> {
        s.dims().iter().map(|&d| d as isize).collect()
    }

    // ---- indexing ----

    /// `torch.gather(a, axis, index)`: `index` (whole numbers stored as f32) has `a`'s rank,
    /// and along the other axes extents no larger than `a`'s (`a` is narrowed to them, the
    /// corner torch reads); the result has `index`'s shape, `out[.., j, ..] = a[.., index[..,
    /// j, ..], ..]` along `axis`. An index outside `[0, K)` gives NaN. The gradient adds each
    /// output's into the element it picked (`scatter_add_`), deterministic; none for `index`.
    /// One kernel, one thread per output element.
    pub fn gather(&self, a: NodeId, axis: isize, index: NodeId) -> Result<NodeId> {
        use crate::ops::index::Gather;
        const OP: &str = "gather";
        let (sa, si) = (self.check_id(OP, a)?, self.check_id(OP, index)?);
        let ax = sa.axis(OP, axis)?;
        let mut x = a;
        if si.rank() == sa.rank() {
            for d in (0..sa.rank()).filter(|&d| d != ax && si.dims()[d] < sa.dims()[d]) {
                x = self.narrow(x, d as isize, 0, si.dims()[d])?;
            }
        }
        let op = Gather {
            axis: ax,
            select: false,
        };
        let shape = op.infer(&self.shape(x), &si)?;
        self.push(Op::Gather(op), vec![x, index], shape)
    }

    /// `torch.index_select(a, axis, index)`: `index (J)` (whole numbers stored as f32); the
    /// result is `a`'s shape with `J` along `axis`, `out[.., j, ..] = a[.., index[j], ..]`. An
    /// index outside `[0, K)` gives NaN. The gradient adds each slice's into the one it picked
    /// (`index_add_`), deterministic; none for `index`.
    pub fn index_select(&self, a: NodeId, axis: isize, index: NodeId) -> Result<NodeId> {
        use crate::ops::index::Gather;
        const OP: &str = "index_select";
        let (sa, si) = (self.check_id(OP, a)?, self.check_id(OP, index)?);
        let op = Gather {
            axis: sa.axis(OP, axis)?,
            select: true,
        };
        let shape = op.infer(&sa, &si)?;
        self.push(Op::Gather(op), vec![a, index], shape)
    }

    /// `torch.scatter_add(a, axis, index, src)`: `a` plus each element of `src` added into the
    /// element its index names along `axis`, `out[.., index[.., j, ..], ..] += src[.., j, ..]`.
    /// `index` (whole numbers stored as f32) has `a`'s rank, extents no larger than `src`'s
    /// (only that corner of `src` is read, as torch's) and, off the axis, no larger than `a`'s.
    /// An index outside `[0, K)` adds nowhere (torch raises), and its source's gradient is NaN,
    /// as [`Graph::gather`]'s value there. Deterministic: each output element sums its
    /// sources in index order (one thread per element, no atomics), the kernel of
    /// [`Graph::gather`]'s gradient. The gradient for `a` is the incoming one, for `src` its
    /// gather by `index`; none for `index`.
    pub fn scatter_add(
        &self,
        a: NodeId,
        axis: isize,
        index: NodeId,
        src: NodeId,
    ) -> Result<NodeId> {
        use crate::ops::index::{Gather, GatherBackward};
        const OP: &str = "scatter_add";
        let (sa, si, ss) = (
            self.check_id(OP, a)?,
            self.check_id(OP, index)?,
            self.check_id(OP, src)?,
        );
        let ax = sa.axis(OP, axis)?;
        let fits = si.rank() == sa.rank()
            && ss.rank() == sa.rank()
            && (0..sa.rank())
                .all(|d| si.dims()[d] <= ss.dims()[d] && (d == ax || si.dims()[d] <= sa.dims()[d]));
        if !fits {
            return Err(shape_err(
                OP,
                format!(
                    "a {sa}, index {si}, src {ss} (axis {ax}): expected one rank, an index no \
                     larger than src, and no larger than a off the axis"
                ),
            ));
        }
        let mut s = src;
        for d in (0..ss.rank()).filter(|&d| si.dims()[d] < ss.dims()[d]) {
            s = self.narrow(s, d as isize, 0, si.dims()[d])?;
        }
        // the scatter into a's extent along the axis and the index's off it, padded with zeros
        // to a's shape where the index is narrower
        let mut dims = si.dims().to_vec();
        dims[ax] = sa.dims()[ax];
        let back = GatherBackward {
            gather: Gather {
                axis: ax,
                select: false,
            },
            k: sa.dims()[ax],
        };
        let mut added = self.push(
            Op::GatherBackward(back),
            vec![index, s],
            Shape(dims.clone()),
        )?;
        if dims != sa.dims() {
            let pads: Vec<(isize, isize)> = (0..sa.rank())
                .rev()
                .map(|d| (0, (sa.dims()[d] - dims[d]) as isize))
                .collect();
            added = self.pad(added, &pads, 0.0)?;
        }
        self.add(a, added)
    }

    /// `torch.index_add(a, axis, index, src)`: `a` plus each slice of `src` along `axis` added
    /// into the slice its index names, `out[.., index[j], ..] += src[.., j, ..]`. `index (J)`
    /// holds whole numbers stored as f32 and `src` is `a`'s shape with `J` along the axis (scale
    /// it for torch's `alpha`). An index outside `[0, K)` adds nowhere (its slice's gradient is
    /// NaN). Deterministic, as
    /// [`Graph::scatter_add`]: the kernel of [`Graph::index_select`]'s gradient. The gradient
    /// for `a` is the incoming one, for `src` its `index_select` by `index`.
    pub fn index_add(&self, a: NodeId, axis: isize, index: NodeId, src: NodeId) -> Result<NodeId> {
        use crate::ops::index::{Gather, GatherBackward};
        const OP: &str = "index_add";
        let (sa, si, ss) = (
            self.check_id(OP, a)?,
            self.check_id(OP, index)?,
            self.check_id(OP, src)?,
        );
        let gather = Gather {
            axis: sa.axis(OP, axis)?,
            select: true,
        };
        // src must be what index_select(a, axis, index) would give
        if gather.infer(&sa, &si).ok().as_ref() != Some(&ss) {
            return Err(shape_err(
                OP,
                format!(
                    "a {sa}, index {si}, src {ss} (axis {}): expected a 1-D index and src of \
                     a's shape with the index's length along the axis",
                    gather.axis
                ),
            ));
        }
        let back = GatherBackward {
            gather,
            k: sa.dims()[gather.axis],
        };
        let added = self.push(Op::GatherBackward(back), vec![index, src], sa)?;
        self.add(a, added)
    }

    /// The `k` largest elements along `axis` (smallest without `largest`) and their positions
    /// (`torch.topk(a, k, axis, largest, sorted=True)`): `(values, indices)`, both of `a`'s
    /// shape with `k` along `axis`, in order (NaN above every number, as torch sorts it; among
    /// equal values the lower position first). The indices are whole numbers as f32 without a gradient; the
    /// values are a gather of them, so their gradient goes to the picked elements. The
    /// positions: for `k` up to [`crate::ops::index::TOPK_PASSES_MAX`] (top-5 accuracy, a
    /// sampler's few best) one kernel of `k` passes over each row (a workgroup per row); past
    /// it a sort of the rows: blocks of up to 1024 sorted by a bitonic network in workgroup
    /// memory (one kernel), then `ceil(log2(C / 1024))` merge kernels, each placing every
    /// element by a binary search in the run it merges with. One more kernel for the values.
    pub fn topk(
        &self,
        a: NodeId,
        k: usize,
        axis: isize,
        largest: bool,
    ) -> Result<(NodeId, NodeId)> {
        let s = self.check_id("topk", a)?;
        let ax = s.axis("topk", axis)?;
        let last = s.rank() - 1;
        // along the last axis; another one is moved there and back
        let x = match ax == last {
            true => a,
            false => self.transpose(a, ax as isize, last as isize)?,
        };
        let indices = self.topk_positions(x, k, largest)?;
        let values = self.gather(x, -1, indices)?;
        match ax == last {
            true => Ok((values, indices)),
            false => Ok((
                self.transpose(values, ax as isize, last as isize)?,
                self.transpose(indices, ax as isize, last as isize)?,
            )),
        }
    }

    /// The positions of the `k` first elements of each row of `x (.., C)` in top-k order:
    /// `k` passes over the row for a few ([`crate::ops::index::TOPK_PASSES_MAX`]), else a sort
    /// of the rows (sorted blocks, then merges of sorted runs: `log2(C / 1024)` of them past
    /// 1024).
    fn topk_positions(&self, x: NodeId, k: usize, largest: bool) -> Result<NodeId> {
        use crate::ops::index::{MergeRuns, SortBlocks, TopK, TOPK_PASSES_MAX};
        let op = TopK { k, largest };
        let s = self.shape(x);
        let shape = op.infer(&s)?;
        let c = s.dims()[s.rank() - 1];
        // positions are stored as f32, exact up to 2^24
        if c > 1 << 24 {
            return Err(shape_err(
                "topk",
                format!("x {s}: rows of at most 2^24 elements"),
            ));
        }
        if k <= TOPK_PASSES_MAX {
            return self.push(Op::TopK(op), vec![x], shape);
        }
        let (block, runs) = SortBlocks::plan(c);
        let mut pairs_dims = s.dims().to_vec();
        pairs_dims.push(2);
        let pairs = Shape(pairs_dims);
        let last = runs.is_empty();
        let first = SortBlocks {
            largest,
            block,
            k: last.then_some(k),
        };
        let first_shape = if last { shape.clone() } else { pairs.clone() };
        let mut p = self.push(Op::SortBlocks(first), vec![x], first_shape)?;
        for (i, &run) in runs.iter().enumerate() {
            let last = i + 1 == runs.len();
            let merge = MergeRuns {
                largest,
                run,
                k: last.then_some(k),
            };
            let to = if last { shape.clone() } else { pairs.clone() };
            p = self.push(Op::MergeRuns(merge), vec![p], to)?;
        }
        Ok(p)
    }

    /// `torch.sort(a, axis, descending, stable=True)`: `(values, indices)` along `axis`, equal
    /// values in their order (NaN last ascending, first descending). [`Graph::topk`] of every
    /// element: a bitonic sort of blocks of 1024 and `ceil(log2(C / 1024))` merge passes (a
    /// row of 50,000, a vocabulary, in 7 kernels); rows of up to 2^24.
    pub fn sort(&self, a: NodeId, axis: isize, descending: bool) -> Result<(NodeId, NodeId)> {
        let s = self.check_id("sort", a)?;
        let c = s.dims()[s.axis("sort", axis)?];
        self.topk(a, c, axis, descending)
    }

    /// The cumulative sum along `axis` (`torch.cumsum`): `out[.., k, ..] = a[.., 0, ..] + .. +
    /// a[.., k, ..]`. Its gradient is the cumulative sum of `dy` from the other end. One kernel
    /// (a workgroup scan per row where `axis` is the last).
    pub fn cumsum(&self, a: NodeId, axis: isize) -> Result<NodeId> {
        let s = self.check_id("cumsum", a)?;
        let op = crate::ops::index::Cumsum {
            axis: s.axis("cumsum", axis)?,
            reverse: false,
        };
        self.push(Op::Cumsum(op), vec![a], s)
    }

    // ---- layout ----

    /// Reorders axes: output axis `i` is input axis `perm[i]`.
    pub fn permute(&self, a: NodeId, perm: &[usize]) -> Result<NodeId> {
        let s = self.check_id("permute", a)?;
        let p = Permute {
            perm: perm.to_vec(),
            in_place: false,
        };
        let shape = p.infer(&s)?;
        self.push(Op::Permute(p), vec![a], shape)
    }

    /// Swaps two axes (negative counts from the end).
    pub fn transpose(&self, a: NodeId, ax0: isize, ax1: isize) -> Result<NodeId> {
        let s = self.check_id("transpose", a)?;
        let (i, j) = (s.axis("transpose", ax0)?, s.axis("transpose", ax1)?);
        let mut perm: Vec<usize> = (0..s.rank()).collect();
        perm.swap(i, j);
        self.permute(a, &perm)
    }

    /// The same elements under another shape (one extent may be -1); no copy is made.
    pub fn reshape(&self, a: NodeId, shape: &[isize]) -> Result<NodeId> {
        let s = self.check_id("reshape", a)?;
        let shape = reshape_infer(&s, shape)?;
        self.push(Op::Reshape, vec![a], shape)
    }

    /// Broadcasts `a` to `shape` (axes aligned on the right; extents equal or 1), copying.
    pub fn expand(&self, a: NodeId, shape: &Shape) -> Result<NodeId> {
        let s = self.check_id("expand", a)?;
        let b = crate::ops::binary::broadcast_shapes("expand", &s, shape)?;
        if &b != shape {
            return Err(shape_err("expand", format!("{s} cannot expand to {shape}")));
        }
        if &s == shape {
            return Ok(a);
        }
        self.push(
            Op::Expand(crate::ops::layout::Expand),
            vec![a],
            shape.clone(),
        )
    }

    /// Sums `a` over the axes along which `shape` was broadcast to `a`'s shape (the adjoint of
    /// broadcasting), giving a tensor of `shape`.
    pub fn sum_to(&self, a: NodeId, shape: &Shape) -> Result<NodeId> {
        let s = self.check_id("sum_to", a)?;
        if &s == shape {
            return Ok(a);
        }
        let b = crate::ops::binary::broadcast_shapes("sum_to", &s, shape)?;
        if b != s {
            return Err(shape_err(
                "sum_to",
                format!("{s} is not a broadcast of {shape}"),
            ));
        }
        // adjacent axes that are all summed (or all kept) merge into one, so that a bias's
        // gradient of (N, C, H, W) is two reductions, not three; extent-1 axes join either
        let lead = s.rank() - shape.rank();
        let mut runs: Vec<(usize, bool)> = Vec::new(); // (extent, summed)
        for ax in 0..s.rank() {
            let d = s.dims()[ax];
            let target = if ax < lead {
                1
            } else {
                shape.dims()[ax - lead]
            };
            let summed = d != target;
            match runs.last_mut() {
                Some((e, r)) if *r == summed || d == 1 => *e *= d,
                Some((e, r)) if *e == 1 => (*e, *r) = (d, summed),
                _ => runs.push((d, summed)),
            }
        }
        let merged: Vec<isize> = runs.iter().map(|&(e, _)| e as isize).collect();
        let mut h = if merged.len() < s.rank() {
            self.reshape(a, &merged)?
        } else {
            a
        };
        for (ax, &(_, summed)) in runs.iter().enumerate().rev() {
            if summed {
                h = self.sum(h, ax as isize, true)?;
            }
        }
        let dims: Vec<isize> = shape.dims().iter().map(|&d| d as isize).collect();
        if dims.is_empty() {
            return self.reshape(h, &[]);
        }
        self.reshape(h, &dims)
    }

    /// The slice `start..start + len` of axis `axis` (negative axis counts from the end).
    pub fn narrow(&self, a: NodeId, axis: isize, start: usize, len: usize) -> Result<NodeId> {
        let s = self.check_id("narrow", a)?;
        let ax = s.axis("narrow", axis)?;
        if len == 0 || start + len > s.dims()[ax] {
            return Err(shape_err(
                "narrow",
                format!(
                    "{s}: {start}..{} is outside axis {ax} of extent {}",
                    start + len,
                    s.dims()[ax]
                ),
            ));
        }
        self.narrow_raw(a, ax, -(start as isize), len)
    }

    /// An axis copy of `len` positions starting where input position 0 lands at `a_start`
    /// (negative for a slice, positive for padding), zeros elsewhere.
    pub(crate) fn narrow_raw(
        &self,
        a: NodeId,
        axis: usize,
        a_start: isize,
        len: usize,
    ) -> Result<NodeId> {
        let mut d = self.check_id("narrow", a)?.0;
        if d[axis] == len && a_start == 0 {
            return Ok(a);
        }
        d[axis] = len;
        let op = crate::ops::layout::AxisCopy {
            axis,
            a_start,
            b_start: None,
            strided: false,
        };
        self.push(Op::AxisCopy(op), vec![a], Shape(d))
    }

    /// Concatenates tensors along `axis`; all other extents must agree.
    pub fn concat(&self, xs: &[NodeId], axis: isize) -> Result<NodeId> {
        let first = *xs
            .first()
            .ok_or_else(|| shape_err("concat", "no tensors to concatenate"))?;
        let s0 = self.check_id("concat", first)?;
        let ax = s0.axis("concat", axis)?;
        let mut acc = first;
        for &x in &xs[1..] {
            let (sa, sb) = (self.shape(acc), self.check_id("concat", x)?);
            let mut ra = sa.0.clone();
            let mut rb = sb.0.clone();
            if ra.len() != rb.len() || {
                ra[ax] = 0;
                rb[ax] = 0;
                ra != rb
            } {
                return Err(shape_err(
                    "concat",
                    format!("{sa} and {sb} differ outside axis {ax}"),
                ));
            }
            let mut d = sa.0.clone();
            d[ax] += sb.dims()[ax];
            let op = crate::ops::layout::AxisCopy {
                axis: ax,
                a_start: 0,
                b_start: Some(sa.dims()[ax] as isize),
                strided: false,
            };
            acc = self.push(Op::AxisCopy(op), vec![acc, x], Shape(d))?;
        }
        Ok(acc)
    }

    /// Stacks tensors of one shape along a new axis `axis` (`torch.stack`): each viewed with an
    /// extent-1 axis there, then concatenated.
    pub fn stack(&self, xs: &[NodeId], axis: isize) -> Result<NodeId> {
        let first = *xs
            .first()
            .ok_or_else(|| shape_err("stack", "no tensors to stack"))?;
        let s0 = self.check_id("stack", first)?;
        // the new axis may come after the last: axes of the result, rank + 1 of them
        let rank = s0.rank() as isize + 1;
        if axis < -rank || axis >= rank {
            return Err(shape_err(
                "stack",
                format!("axis {axis} is outside the result's rank {rank}"),
            ));
        }
        let ax = axis.rem_euclid(rank) as usize;
        let mut views = Vec::with_capacity(xs.len());
        for &x in xs {
            let s = self.check_id("stack", x)?;
            if s != s0 {
                return Err(shape_err("stack", format!("{s0} and {s} differ")));
            }
            let mut d: Vec<isize> = s.dims().iter().map(|&e| e as isize).collect();
            d.insert(ax, 1);
            views.push(self.reshape(x, &d)?);
        }
        self.concat(&views, ax as isize)
    }

    /// Splits `a` along `axis` into pieces of `sizes` (`torch.split` with a list; they must add
    /// up to the axis's extent): narrows, views where they start at a multiple of 256 bytes.
    pub fn split(&self, a: NodeId, axis: isize, sizes: &[usize]) -> Result<Vec<NodeId>> {
        let s = self.check_id("split", a)?;
        let ax = s.axis("split", axis)?;
        let total: usize = sizes.iter().sum();
        if total != s.dims()[ax] || sizes.contains(&0) {
            return Err(shape_err(
                "split",
                format!(
                    "{s}: sizes {sizes:?} must be positive and add up to axis {ax}'s extent {}",
                    s.dims()[ax]
                ),
            ));
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &len in sizes {
            out.push(self.narrow(a, ax as isize, start, len)?);
            start += len;
        }
        Ok(out)
    }

    /// Constant padding (`torch.nn.functional.pad(a, pads, value=value)`): `pads[k]` is
    /// `(before, after)` for the k-th axis from the last, as torch's flat `(left, right, top,
    /// bottom, ..)`; a negative amount crops. Each padded axis is one copy with zeros around
    /// (`value` added before and after it, two elementwise steps that fuse with their
    /// neighbours: `pad(a - v) + v`); the gradient is the inner window's.
    pub fn pad(&self, a: NodeId, pads: &[(isize, isize)], value: f32) -> Result<NodeId> {
        let s = self.check_id("pad", a)?;
        if pads.len() > s.rank() {
            return Err(shape_err(
                "pad",
                format!("{} axis pairs for {s} of rank {}", pads.len(), s.rank()),
            ));
        }
        if !value.is_finite() {
            return Err(shape_err(
                "pad",
                format!("the value must be finite, got {value}"),
            ));
        }
        let shifted = value != 0.0 && pads.iter().any(|&(b, e)| b > 0 || e > 0);
        let mut x = if shifted {
            self.add_scalar(a, -value)?
        } else {
            a
        };
        for (k, &(before, after)) in pads.iter().enumerate() {
            let ax = s.rank() - 1 - k;
            let extent = self.shape(x).dims()[ax] as isize;
            let len = extent + before + after;
            if len <= 0 {
                return Err(shape_err(
                    "pad",
                    format!("{s}: padding ({before}, {after}) leaves axis {ax} empty"),
                ));
            }
            x = self.narrow_raw(x, ax, before, len as usize)?;
        }
        if shifted {
            x = self.add_scalar(x, value)?;
        }
        Ok(x)
    }

    /// One LSTM layer over a sequence, PyTorch gates (i, f, g, o): `x (T, B, I)`, `w_ih [4H, I]`,
    /// `w_hh [4H, H]`, `b_ih`, `b_hh [4H]`, `h0`, `c0 (B, H)`; `lengths (B)` (whole numbers in
    /// `[1, T]`, `None` = all `T`) makes steps past a sequence's end carry its state. `reverse`
    /// runs from the last step to the first (the backward half of a bidirectional LSTM).
    /// Returns `(all h_t (T, B, H), final h (B, H), final c (B, H))`: the input projection of every
    /// step is one matmul, the recurrence one fused kernel per step.
    #[allow(clippy::too_many_arguments)]
    pub fn lstm_layer(
        &self,
        x: NodeId,
        w_ih: NodeId,
        w_hh: NodeId,
        b_ih: NodeId,
        b_hh: NodeId,
        h0: NodeId,
        c0: NodeId,
        lengths: Option<NodeId>,
        reverse: bool,
    ) -> Result<(NodeId, NodeId, NodeId)> {
        let xs = self.check_id("lstm", x)?;
        let ws = self.check_id("lstm", w_ih)?;
        if xs.rank() != 3 || ws.rank() != 2 || ws.dims()[1] != xs.dims()[2] || ws.dims()[0] % 4 != 0
        {
            return Err(shape_err(
                "lstm",
                format!("input {xs} and weight_ih {ws}: expected (T, B, I) and [4H, I]"),
            ));
        }
        let (t, b, i) = (xs.dims()[0], xs.dims()[1], xs.dims()[2]);
        let h4 = ws.dims()[0];
        let flat = self.reshape(x, &[(t * b) as isize, i as isize])?;
        let proj = self.add(
            self.add(self.matmul_t(flat, w_ih, false, true)?, b_ih)?,
            b_hh,
        )?;
        let xw = self.reshape(proj, &[t as isize, b as isize, h4 as isize])?;
        let lengths = match lengths {
            Some(l) => l,
            None => self.constant(crate::tensor::Tensor::full([b], t as f32)),
        };
        let shape = crate::ops::lstm::LstmForward::infer(
            &self.shape(xw),
            &self.check_id("lstm", w_hh)?,
            &self.check_id("lstm", h0)?,
            &self.check_id("lstm", c0)?,
            &self.check_id("lstm", lengths)?,
        )?;
        let h = h4 / 4;
        // the step kernel reads w_hh^T [H, 4H]: neighbouring threads (hidden units) then read
        // neighbouring weights; one small transpose per run instead of strided reads every step
        let w_hh_t = self.permute(w_hh, &[1, 0])?;
        let p = self.push(
            Op::LstmForward(crate::ops::lstm::LstmForward {
                reverse,
                state: Default::default(),
            }),
            vec![xw, w_hh, h0, c0, lengths, w_hh_t],
            shape,
        )?;
        let hs = self.narrow(p, 2, 0, h)?;
        // the last step processed holds the final state (padding carried it there)
        let last = self.narrow(p, 0, if reverse { 0 } else { t - 1 }, 1)?;
        let h_n = self.reshape(self.narrow(last, 2, 0, h)?, &[b as isize, h as isize])?;
        let c_n = self.reshape(self.narrow(last, 2, h, h)?, &[b as isize, h as isize])?;
        Ok((hs, h_n, c_n))
    }

    /// Flattens all axes after the first: `(N, ..) -> (N, prod(..))`.
    pub fn flatten(&self, a: NodeId) -> Result<NodeId> {
        let s = self.check_id("flatten", a)?;
        if s.rank() == 0 {
            return Err(shape_err("flatten", "a scalar has no batch axis"));
        }
        self.reshape(a, &[s.dims()[0] as isize, -1])
    }

    // ---- convolution and pooling ----

    /// 2-D convolution of `x` [N, C, H, W] with `w` [O, C, kh, kw] and an optional `bias` `[O]`
    /// (`torch.nn.functional.conv2d`, groups = 1; [`Graph::conv2d_grouped`] for more), giving
    /// [N, O, Ho, Wo] with
    /// `Ho = (H + 2*ph - dh*(kh - 1) - 1) / sh + 1`. Built as `im2col`, a matmul with the weight
    /// viewed as [O, C*kh*kw] (the bias added in its epilogue), a reshape and a permute, so that
    /// its gradients follow from those ops.
    pub fn conv2d(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        opts: Conv2dOpts,
    ) -> Result<NodeId> {
        self.conv2d_fused(x, w, bias, opts, false)
    }

    /// `conv2d` followed by relu when `relu`, with the bias and the relu fused into the matmul.
    pub fn conv2d_fused(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        opts: Conv2dOpts,
        relu: bool,
    ) -> Result<NodeId> {
        let sx = self.check_id("conv2d", x)?;
        let sw = self.check_id("conv2d", w)?;
        let sb = match bias {
            Some(b) => Some(self.check_id("conv2d", b)?),
            None => None,
        };
        let geom = crate::ops::conv::conv2d_geometry(&sx, &sw, sb.as_ref(), opts)?;
        let (n, o) = (sx.dims()[0] as isize, sw.dims()[0] as isize);
        let (ho, wo) = geom.out_hw();
        let cols = self.push(
            Op::Im2col(crate::ops::conv::Im2col(geom)),
            vec![x],
            geom.cols_shape(sx.dims()[0]),
        )?;
        let w2 = self.reshape(w, &[o, geom.rows() as isize])?;
        // bias per output channel (a row of [O, N*Ho*Wo]) and relu in the matmul's epilogue
        let rows_bias = bias.map(|b| (b, crate::ops::matmul::Bias::Rows));
        let y = self.matmul_fused(w2, cols, false, false, rows_bias, relu)?;
        // [O, N*Ho*Wo] -> (N, O, Ho, Wo)
        let y = self.reshape(y, &[o, n, (ho * wo) as isize])?;
        self.reshape(
            self.permute(y, &[1, 0, 2])?,
            &[n, o, ho as isize, wo as isize],
        )
    }

    /// Convolution of `x [N, C, H, W]` with `w [O, C/groups, kh, kw]` in `groups` groups
    /// (`torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)`), giving
    /// `[N, O, Ho, Wo]`: `groups = C` is a depthwise convolution. One group runs as
    /// [`Graph::conv2d`] (an implicit GEMM); more run direct kernels
    /// ([`crate::ops::conv::GroupedConv2d`]) that add the bias themselves.
    pub fn conv2d_grouped(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        opts: Conv2dOpts,
        groups: usize,
    ) -> Result<NodeId> {
        self.conv2d_grouped_fused(x, w, bias, opts, groups, false)
    }

    /// `conv2d_grouped` followed by relu when `relu`, the bias and the relu in the
    /// convolution's kernel.
    pub fn conv2d_grouped_fused(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        opts: Conv2dOpts,
        groups: usize,
        relu: bool,
    ) -> Result<NodeId> {
        if groups == 1 {
            return self.conv2d_fused(x, w, bias, opts, relu);
        }
        let sx = self.check_id("conv2d", x)?;
        let sw = self.check_id("conv2d", w)?;
        let sb = match bias {
            Some(b) => Some(self.check_id("conv2d", b)?),
            None => None,
        };
        let conv = crate::ops::conv::GroupedConv2d {
            relu,
            ..crate::ops::conv::GroupedConv2d::new(&sx, &sw, sb.as_ref(), opts, groups)?
        };
        self.grouped_conv_pass(conv, x, w, bias)
    }

    /// 1-D convolution of `x (N, C, L)` with `w (O, C/groups, k)` (`torch.nn.functional.conv1d`
    /// with `stride`, `padding`, `dilation`, `groups`), giving `(N, O, Lo)`, `Lo = (L + 2p -
    /// d(k - 1) - 1) / s + 1`: the 2-D convolution of `(N, C, 1, L)` images with a `1 x k` kernel
    /// (views: no copies), so it runs the same kernels (implicit GEMMs, grouped ones in groups).
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<NodeId> {
        let (x4, w4) = (self.as_rows("conv1d", x)?, self.as_rows("conv1d", w)?);
        let opts = Conv2dOpts {
            stride: (1, stride),
            padding: (0, padding),
            dilation: (1, dilation),
        };
        let y = self
            .conv2d_grouped(x4, w4, bias, opts, groups)
            .map_err(|e| as_1d("conv1d", e))?;
        self.rows_back(y)
    }

    /// The transposed 1-D convolution of `x (N, Cin, L)` with `w (Cin, Cout/groups, k)`
    /// (`torch.nn.functional.conv_transpose1d`), giving `(N, Cout, Lo)`, `Lo = (L - 1)s - 2p +
    /// d(k - 1) + output_padding + 1`: [`Graph::conv_transpose2d`] of `(N, Cin, 1, L)`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose1d(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        stride: usize,
        padding: usize,
        output_padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<NodeId> {
        let op = "conv_transpose1d";
        let (x4, w4) = (self.as_rows(op, x)?, self.as_rows(op, w)?);
        let opts = crate::ops::conv::ConvTranspose2dOpts {
            stride: (1, stride),
            padding: (0, padding),
            output_padding: (0, output_padding),
            dilation: (1, dilation),
        };
        let y = self
            .conv_transpose2d(x4, w4, bias, opts, groups)
            .map_err(|e| as_1d(op, e))?;
        self.rows_back(y)
    }

    /// 1-D max (`max`) or average pooling of `x (N, C, L)` (`max_pool1d` / `avg_pool1d`, floor
    /// mode; average pooling counts the padding): 2-D pooling of `(N, C, 1, L)` with a `1 x
    /// kernel` window.
    pub fn pool1d(
        &self,
        max: bool,
        x: NodeId,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<NodeId> {
        let op = if max { "max_pool1d" } else { "avg_pool1d" };
        let x4 = self.as_rows(op, x)?;
        let y = self
            .pool2d(max, x4, (1, kernel), (1, stride), (0, padding))
            .map_err(|e| as_1d(op, e))?;
        self.rows_back(y)
    }

    /// `(A, B, L)` viewed as `(A, B, 1, L)` (a 1-D op's operand as a 2-D op's); `op` names the
    /// caller in errors.
    fn as_rows(&self, op: &'static str, x: NodeId) -> Result<NodeId> {
        let s = self.check_id(op, x)?;
        if s.rank() != 3 {
            return Err(shape_err(
                op,
                format!("operand {s}: expected rank 3 ((N, C, L) or (O, C, k))"),
            ));
        }
        let d = s.dims();
        self.reshape(x, &[d[0] as isize, d[1] as isize, 1, d[2] as isize])
    }

    /// `(N, C, 1, L)` back to `(N, C, L)`.
    fn rows_back(&self, y: NodeId) -> Result<NodeId> {
        let d = self.shape(y);
        let d = d.dims();
        self.reshape(y, &[d[0] as isize, d[1] as isize, d[3] as isize])
    }

    /// The transposed convolution of `x [N, Cin, H, W]` with `w [Cin, Cout/groups, kh, kw]`
    /// (`torch.nn.functional.conv_transpose2d`; the gradient of a convolution for its input),
    /// giving `[N, Cout, Ho, Wo]`, `Ho = (H - 1)*sh - 2*ph + dh*(kh - 1) + oph + 1`: a stride
    /// of 2 doubles the extents (`ConvTranspose2d(.., 4, stride=2, padding=1)`, a decoder's
    /// upsampling). The output padding must be smaller than the stride. One group runs as
    /// `col2im(w^T x)`, one product (one implicit GEMM where the output is not much larger
    /// than the input's extents times the stride) and its gradients as a convolution's; more
    /// run the grouped direct kernels.
    pub fn conv_transpose2d(
        &self,
        x: NodeId,
        w: NodeId,
        bias: Option<NodeId>,
        opts: crate::ops::conv::ConvTranspose2dOpts,
        groups: usize,
    ) -> Result<NodeId> {
        let op = "conv_transpose2d";
        let (sx, sw) = (self.check_id(op, x)?, self.check_id(op, w)?);
        let sb = match bias {
            Some(b) => Some(self.check_id(op, b)?),
            None => None,
        };
        let conv =
            crate::ops::conv::conv_transpose2d_geometry(&sx, &sw, sb.as_ref(), opts, groups)?;
        let d = |v: usize| v as isize;
        let (n, cin, hw) = (
            d(sx.dims()[0]),
            d(sx.dims()[1]),
            d(sx.dims()[2] * sx.dims()[3]),
        );
        let y = if groups == 1 {
            // [N, Cin, H*W] -> [Cin, N*H*W], the layout a convolution's output gradient has
            let x2 = self.reshape(
                self.permute(self.reshape(x, &[n, cin, hw])?, &[1, 0, 2])?,
                &[cin, n * hw],
            )?;
            let (kh, kw) = conv.geom.kernel;
            let w2 = self.reshape(w, &[cin, d(conv.geom.channels * kh * kw)])?;
            self.col2im(self.matmul_t(w2, x2, true, false)?, conv.geom)?
        } else {
            self.grouped_conv_pass(conv, x, w, None)?
        };
        match bias {
            Some(b) => {
                let b = self.reshape(b, &[d(conv.geom.channels), 1, 1])?;
                self.add(y, b)
            }
            None => Ok(y),
        }
    }

    /// One pass of a grouped convolution (`conv.pass`: the forward, or the input or weight
    /// gradient) of the operands `a` and `b` (see [`crate::ops::conv::ConvPass`]), and a
    /// forward's `bias` `[O]`.
    pub fn grouped_conv_pass(
        &self,
        conv: crate::ops::conv::GroupedConv2d,
        a: NodeId,
        b: NodeId,
        bias: Option<NodeId>,
    ) -> Result<NodeId> {
        let sa = self.check_id(conv.name(), a)?;
        let sb = self.check_id(conv.name(), b)?;
        let sbias = match bias {
            Some(c) => Some(self.check_id(conv.name(), c)?),
            None => None,
        };
        let shape = conv.infer(&sa, &sb, sbias.as_ref())?;
        let inputs = [a, b].into_iter().chain(bias).collect();
        self.push(Op::GroupedConv2d(conv), inputs, shape)
    }

    /// The receptive fields of `x` [N, C, H, W] for a `kernel` (kh, kw) as columns
    /// [C*kh*kw, N*Ho*Wo] (row `(c*kh + i)*kw + j`, column `(n*Ho + oh)*Wo + ow`; zero in the padding),
    /// as `torch.nn.functional.unfold`.
    pub fn im2col(&self, x: NodeId, kernel: (usize, usize), opts: Conv2dOpts) -> Result<NodeId> {
        let sx = self.check_id("im2col", x)?;
        let geom = crate::ops::conv::ColGeometry::new("im2col", &sx, kernel, opts)?;
        let shape = geom.cols_shape(sx.dims()[0]);
        self.push(Op::Im2col(crate::ops::conv::Im2col(geom)), vec![x], shape)
    }

    /// The adjoint of [`Graph::im2col`] (`torch.nn.functional.fold`): columns [C*kh*kw, N*Ho*Wo]
    /// summed back onto the image [N, C, H, W] that `geom` describes.
    pub fn col2im(&self, cols: NodeId, geom: crate::ops::conv::ColGeometry) -> Result<NodeId> {
        let sc = self.check_id("col2im", cols)?;
        let shape = geom.col2im_infer(&sc)?;
        self.push(
            Op::Col2im(crate::ops::conv::Col2im(geom)),
            vec![cols],
            shape,
        )
    }

    fn pool2d(
        &self,
        max: bool,
        x: NodeId,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<NodeId> {
        let p = crate::ops::pool::Pool2d::new(kernel, stride, padding);
        self.pool2d_with(max, x, p)
    }

    fn pool2d_with(&self, max: bool, x: NodeId, p: crate::ops::pool::Pool2d) -> Result<NodeId> {
        let name = if max { "max_pool2d" } else { "avg_pool2d" };
        let sx = self.check_id(name, x)?;
        let shape = p.infer(name, &sx)?;
        let op = if max {
            Op::MaxPool2d(p)
        } else {
            Op::AvgPool2d(p)
        };
        self.push(op, vec![x], shape)
    }

    /// 2-D max pooling of `x` [N, C, H, W] (`torch.nn.functional.max_pool2d`, floor mode): the
    /// padding is ignored and may be at most half the kernel.
    pub fn max_pool2d(
        &self,
        x: NodeId,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<NodeId> {
        self.pool2d(true, x, kernel, stride, padding)
    }

    /// 2-D average pooling of `x` [N, C, H, W] (`torch.nn.functional.avg_pool2d`, floor mode,
    /// `count_include_pad=True`): every window divides by kh*kw; padding at most half the kernel.
    pub fn avg_pool2d(
        &self,
        x: NodeId,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<NodeId> {
        self.pool2d(false, x, kernel, stride, padding)
    }

    /// 2-D max pooling with torch's options ([`crate::ops::pool::Pool2d`]: `ceil_mode`), as
    /// `torch.nn.functional.max_pool2d(x, kernel, stride, padding, ceil_mode=..)`.
    pub fn max_pool2d_with(&self, x: NodeId, pool: crate::ops::pool::Pool2d) -> Result<NodeId> {
        self.pool2d_with(true, x, pool)
    }

    /// 2-D average pooling with torch's options ([`crate::ops::pool::Pool2d`]: `ceil_mode`,
    /// `count_include_pad`), as `torch.nn.functional.avg_pool2d(x, kernel, stride, padding,
    /// ceil_mode=.., count_include_pad=..)`.
    pub fn avg_pool2d_with(&self, x: NodeId, pool: crate::ops::pool::Pool2d) -> Result<NodeId> {
        self.pool2d_with(false, x, pool)
    }

    /// The gradient of `max_pool2d(x)` for its input, from `dy` (the pooled shape).
    pub fn max_pool2d_backward(
        &self,
        x: NodeId,
        dy: NodeId,
        pool: crate::ops::pool::Pool2d,
    ) -> Result<NodeId> {
        let name = "max_pool2d_backward";
        let (sx, sd) = (self.check_id(name, x)?, self.check_id(name, dy)?);
        pool.check_dy(name, &sx, &sd)?;
        self.push(Op::MaxPool2dBackward(pool), vec![x, dy], sx)
    }

    /// The gradient of `avg_pool2d` for an input of extents `input` (H, W), from `dy`.
    pub fn avg_pool2d_backward(
        &self,
        dy: NodeId,
        input: (usize, usize),
        pool: crate::ops::pool::Pool2d,
    ) -> Result<NodeId> {
        let sd = self.check_id("avg_pool2d_backward", dy)?;
        let op = crate::ops::pool::AvgPool2dBackward { pool, input };
        let shape = op.infer(&sd)?;
        self.push(Op::AvgPool2dBackward(op), vec![dy], shape)
    }

    /// The shape of `x`, checked to be images `(N, C, H, W)`, and their extents (H, W); `op`
    /// names the caller in errors.
    fn image(&self, op: &'static str, x: NodeId) -> Result<(Shape, (usize, usize))> {
        let s = self.check_id(op, x)?;
        if s.rank() != 4 {
            return Err(shape_err(
                op,
                format!("input {s}: expected rank 4 (N, C, H, W)"),
            ));
        }
        let hw = (s.dims()[2], s.dims()[3]);
        Ok((s, hw))
    }

    /// Adaptive average pooling of `x (N, C, H, W)` to `size` (Ho, Wo)
    /// (`torch.nn.functional.adaptive_avg_pool2d`): output `(oh, ow)` is the mean of rows
    /// `floor(oh*H/Ho) .. ceil((oh+1)*H/Ho)` and the columns likewise; `(1, 1)` is global
    /// average pooling (a ResNet's head), `(7, 7)` VGG's.
    pub fn adaptive_avg_pool2d(&self, x: NodeId, size: (usize, usize)) -> Result<NodeId> {
        let (sx, input) = self.image("adaptive_avg_pool2d", x)?;
        let p = crate::ops::pool::AdaptiveAvgPool2d {
            input,
            output: size,
        };
        let shape = p.infer(&sx)?;
        self.push(Op::AdaptiveAvgPool2d(p), vec![x], shape)
    }

    /// Adaptive max pooling of `x (N, C, H, W)` to `size` (Ho, Wo)
    /// (`torch.nn.functional.adaptive_max_pool2d`): the windows of
    /// [`Graph::adaptive_avg_pool2d`], each's first maximum in row-major order (as
    /// [`Graph::max_pool2d`]'s); the gradient goes to that element, gathered per input element
    /// from the windows that hold it (one kernel, deterministic).
    pub fn adaptive_max_pool2d(&self, x: NodeId, size: (usize, usize)) -> Result<NodeId> {
        let (sx, input) = self.image("adaptive_max_pool2d", x)?;
        let p = crate::ops::pool::AdaptivePool2d {
            input,
            output: size,
        };
        let shape = p.infer_as("adaptive_max_pool2d", &sx)?;
        self.push(Op::AdaptiveMaxPool2d(p), vec![x], shape)
    }

    /// The gradient of [`Graph::adaptive_avg_pool2d`] for its input, from `dy (N, C, Ho, Wo)`.
    pub fn adaptive_avg_pool2d_backward(
        &self,
        dy: NodeId,
        pool: crate::ops::pool::AdaptiveAvgPool2d,
    ) -> Result<NodeId> {
        let sd = self.check_id("adaptive_avg_pool2d_backward", dy)?;
        let shape = pool.infer_backward(&sd)?;
        self.push(Op::AdaptiveAvgPool2dBackward(pool), vec![dy], shape)
    }

    /// `x (N, C, H, W)` resized to `size` (Ho, Wo) (`torch.nn.functional.interpolate(x,
    /// size=size, mode=..)`): nearest, or bilinear with or without `align_corners`; a U-Net's
    /// or a feature pyramid's upsampling, f16 too.
    pub fn interpolate(
        &self,
        x: NodeId,
        size: (usize, usize),
        mode: crate::ops::resize::ResizeMode,
    ) -> Result<NodeId> {
        let (sx, input) = self.image("interpolate", x)?;
        let r = crate::ops::resize::Resize2d {
            mode,
            input,
            output: size,
            scale_factor: None,
        };
        let shape = r.infer(&sx)?;
        self.push(Op::Resize2d(r), vec![x], shape)
    }

    /// `x (N, C, H, W)` resized by `scale_factor` (sh, sw) (`torch.nn.functional.interpolate(x,
    /// scale_factor=.., mode=..)`): the output is `(floor(H sh), floor(W sw))` and, without
    /// `align_corners`, the sampling follows the factor (`1 / s`), as torch's, which for a
    /// factor like 1.7 picks other pixels than the size alone would.
    pub fn interpolate_scale(
        &self,
        x: NodeId,
        scale_factor: (f64, f64),
        mode: crate::ops::resize::ResizeMode,
    ) -> Result<NodeId> {
        let (sx, (h, w)) = self.image("interpolate", x)?;
        let (sh, sw) = scale_factor;
        let out = |len: usize, s: f64| (len as f64 * s).floor();
        let (ho, wo) = (out(h, sh), out(w, sw));
        if !(sh > 0.0 && sw > 0.0 && ho >= 1.0 && wo >= 1.0 && ho < 1e9 && wo < 1e9) {
            return Err(shape_err(
                "interpolate",
                format!("input {sx}: scale_factor {scale_factor:?} gives no image"),
            ));
        }
        let r = crate::ops::resize::Resize2d {
            mode,
            input: (h, w),
            output: (ho as usize, wo as usize),
            scale_factor: Some((sh.to_bits(), sw.to_bits())),
        };
        let shape = r.infer(&sx)?;
        self.push(Op::Resize2d(r), vec![x], shape)
    }

    /// The gradient of [`Graph::interpolate`] for its input, from `dy (N, C, Ho, Wo)`.
    pub fn interpolate_backward(
        &self,
        dy: NodeId,
        resize: crate::ops::resize::Resize2d,
    ) -> Result<NodeId> {
        let sd = self.check_id("interpolate_backward", dy)?;
        let shape = resize.infer_backward(&sd)?;
        self.push(Op::Resize2dBackward(resize), vec![dy], shape)
    }

    // ---- GRU, RNN, embedding ----

    /// One GRU layer over a sequence, PyTorch gates (r, z, n): `x (T, B, I)`, `w_ih [3H, I]`,
    /// `w_hh [3H, H]`, `b_ih`, `b_hh [3H]`, `h0 (B, H)`; `lengths (B)` (whole numbers in `[0, T]`,
    /// `None` = all `T`) makes steps past a sequence's end carry its state. `reverse` runs from the
    /// last step to the first. `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z` likewise,
    /// `n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))`, `h' = (1 − z) ⊙ n + z ⊙ h`.
    /// Returns `(all h_t (T, B, H), final h (B, H))`: the input projection of every step is one
    /// matmul, the recurrence one fused kernel per step.
    #[allow(clippy::too_many_arguments)]
    pub fn gru_layer(
        &self,
        x: NodeId,
        w_ih: NodeId,
        w_hh: NodeId,
        b_ih: NodeId,
        b_hh: NodeId,
        h0: NodeId,
        lengths: Option<NodeId>,
        reverse: bool,
    ) -> Result<(NodeId, NodeId)> {
        use crate::ops::gru::Cell;
        self.recurrent_layer(Cell::Gru, x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse)
    }

    /// One vanilla RNN layer with tanh (`torch.nn.RNN`): `x (T, B, I)`, `w_ih [H, I]`,
    /// `w_hh [H, H]`, `b_ih`, `b_hh [H]`, `h0 (B, H)`, `lengths` and `reverse` as in
    /// [`Graph::gru_layer`]; `h' = tanh(W_ih x + b_ih + W_hh h + b_hh)`.
    /// Returns `(all h_t (T, B, H), final h (B, H))`.
    #[allow(clippy::too_many_arguments)]
    pub fn rnn_layer(
        &self,
        x: NodeId,
        w_ih: NodeId,
        w_hh: NodeId,
        b_ih: NodeId,
        b_hh: NodeId,
        h0: NodeId,
        lengths: Option<NodeId>,
        reverse: bool,
    ) -> Result<(NodeId, NodeId)> {
        use crate::ops::gru::Cell;
        self.recurrent_layer(Cell::Rnn, x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse)
    }

    #[allow(clippy::too_many_arguments)]
    fn recurrent_layer(
        &self,
        cell: crate::ops::gru::Cell,
        x: NodeId,
        w_ih: NodeId,
        w_hh: NodeId,
        b_ih: NodeId,
        b_hh: NodeId,
        h0: NodeId,
        lengths: Option<NodeId>,
        reverse: bool,
    ) -> Result<(NodeId, NodeId)> {
        let name = cell.name();
        let gates = cell.gates();
        let xs = self.check_id(name, x)?;
        let ws = self.check_id(name, w_ih)?;
        let bs = self.check_id(name, b_ih)?;
        if xs.rank() != 3
            || ws.rank() != 2
            || ws.dims()[1] != xs.dims()[2]
            || ws.dims()[0] % gates != 0
            || bs.dims() != [ws.dims()[0]]
        {
            let g = if gates == 1 { "H" } else { "3H" };
            return Err(shape_err(
                name,
                format!(
                    "input {xs}, weight_ih {ws} and bias_ih {bs}: expected (T, B, I), [{g}, I] and [{g}]"
                ),
            ));
        }
        let (t, b, i) = (xs.dims()[0], xs.dims()[1], xs.dims()[2]);
        let gh = ws.dims()[0];
        let h = gh / gates;
        let flat = self.reshape(x, &[(t * b) as isize, i as isize])?;
        let proj = self.add(self.matmul_t(flat, w_ih, false, true)?, b_ih)?;
        let xw = self.reshape(proj, &[t as isize, b as isize, gh as isize])?;
        let lengths = match lengths {
            Some(l) => l,
            None => self.constant(Tensor::full([b], t as f32)),
        };
        let shape = crate::ops::gru::infer(
            cell,
            &self.shape(xw),
            &self.check_id(name, w_hh)?,
            &self.check_id(name, b_hh)?,
            &self.check_id(name, h0)?,
            &self.check_id(name, lengths)?,
        )?;
        // the step kernel reads w_hh^T [H, G*H] (coalesced), as the LSTM's does
        let w_hh_t = self.permute(w_hh, &[1, 0])?;
        let p = self.push(
            cell.forward_op(reverse),
            vec![xw, w_hh, b_hh, h0, lengths, w_hh_t],
            shape,
        )?;
        let hs = self.narrow(p, 2, 0, h)?;
        // the last step processed holds the final state (padding carried it there); cut from
        // the states, not from `hs`, so that h_n alone needs no copy of every step
        let last = self.narrow(p, 0, if reverse { 0 } else { t - 1 }, 1)?;
        let h_n = self.reshape(self.narrow(last, 2, 0, h)?, &[b as isize, h as isize])?;
        Ok((hs, h_n))
    }

    /// Embedding lookup (`torch.nn.functional.embedding`): `indices` of any shape holding whole
    /// numbers as f32, `weight (V, E)` -> `(indices.., E)`. An index that is not an integer in
    /// `[0, V)` gives a row of NaN. The weight's gradient comes from a dedicated gather kernel;
    /// the indices take none. An f16 `weight` gives f16 rows (the gradient summed in f32,
    /// stored f16); the indices are f32.
    pub fn embedding(&self, indices: NodeId, weight: NodeId) -> Result<NodeId> {
        let si = self.check_id("embedding", indices)?;
        let sw = self.check_id("embedding", weight)?;
        let shape = crate::ops::embedding::Embedding::infer(&si, &sw)?;
        self.push(
            Op::Embedding(crate::ops::embedding::Embedding::default()),
            vec![indices, weight],
            shape,
        )
    }

    /// [`Graph::embedding`] with torch's `padding_idx`: row `padding_idx` of the table (negative:
    /// counted from the end) takes no gradient, the padding tokens' lookups adding nothing to
    /// it (an error where it is not a row).
    pub fn embedding_padded(
        &self,
        indices: NodeId,
        weight: NodeId,
        padding_idx: i64,
    ) -> Result<NodeId> {
        use crate::ops::embedding::Embedding;
        let si = self.check_id("embedding", indices)?;
        let sw = self.check_id("embedding", weight)?;
        let shape = Embedding::infer(&si, &sw)?;
        let v = sw.dims()[0] as i64;
        let p = if padding_idx < 0 {
            padding_idx + v
        } else {
            padding_idx
        };
        if !(0..v).contains(&p) {
            return Err(shape_err(
                "embedding",
                format!("padding_idx {padding_idx} is not a row of weight {sw}"),
            ));
        }
        let op = Embedding {
            padding_idx: Some(p as i32),
        };
        self.push(Op::Embedding(op), vec![indices, weight], shape)
    }
}

/// A class-label loss's `ignore_index` as the f32 labels can hold it: beyond 2^24 an index
/// could not be told from its neighbours.
fn label_index(op: &'static str, ignore: Option<i64>) -> Result<Option<i32>> {
    match ignore {
        Some(i) if i.unsigned_abs() > 1 << 24 => Err(shape_err(
            op,
            format!("ignore_index {i} is beyond the f32 labels' exact integers (2^24)"),
        )),
        i => Ok(i.map(|i| i as i32)),
    }
}

/// Validates that a node list is well formed for compilation: names unique per kind, shapes
/// non-empty. Returns the error a user should see.
pub(crate) fn validate(nodes: &[Node], outputs: &[NodeId]) -> Result<()> {
    use std::collections::HashMap;
    let mut inputs: HashMap<&str, usize> = HashMap::new();
    let mut params: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.shape.numel() == 0 {
            return Err(shape_err(
                n.op.name(),
                format!("node {i} has the zero-sized shape {}", n.shape),
            ));
        }
        match &n.op {
            Op::Input { name } => {
                if let Some(j) = inputs.insert(name, i) {
                    return Err(Error::Input(format!(
                        "input {name:?} is declared twice (nodes {j} and {i})"
                    )));
                }
            }
            Op::Param { name, init } => {
                if let Init::Value(t) = init {
                    if t.shape() != &n.shape {
                        return Err(Error::Param(format!(
                            "{name}: initial value {} for shape {}",
                            t.shape(),
                            n.shape
                        )));
                    }
                }
                if let Some(j) = params.insert(name, i) {
                    return Err(Error::Param(format!(
                        "parameter {name:?} is declared twice with different shapes or types \
                         (nodes {j}: {} {}, and {i}: {} {})",
                        nodes[j].shape, nodes[j].dtype, n.shape, n.dtype
                    )));
                }
            }
            _ => {}
        }
    }
    for o in outputs {
        if o.0 >= nodes.len() {
            return Err(Error::Input(format!(
                "output node {} is not in the graph",
                o.0
            )));
        }
    }
    Ok(())
}

/// A 2-D op's shape error as the 1-D op `op` that ran it (its operands viewed as
/// `(N, C, 1, L)`, as the message's shapes show).
fn as_1d(op: &'static str, e: crate::Error) -> crate::Error {
    match e {
        crate::Error::Shape { op: inner, msg } => {
            shape_err(op, format!("{msg} (as {inner} of (N, C, 1, L) views)"))
        }
        other => other,
    }
}
