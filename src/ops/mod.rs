//! Op families. Each family keeps, side by side, its shape rule, its CPU reference (the "twin" the
//! GPU is checked against) and the binding of its WGSL kernel (`shaders/<family>.wgsl`).

pub mod attention;
pub mod binary;
pub mod cast;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod fused;
pub mod gru;
pub mod index;
pub mod layout;
pub mod loss;
pub mod lstm;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;
pub mod resize;
pub mod softmax;
pub mod unary;

use std::sync::Arc;

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{DType, Shape, Tensor};

/// The WGSL source of every op family, by file stem; the executor compiles from here and a test
/// validates every entry with naga.
pub const SHADERS: &[(&str, &str)] = &[
    ("attention", include_str!("../../shaders/attention.wgsl")),
    ("binary", include_str!("../../shaders/binary.wgsl")),
    ("conv", include_str!("../../shaders/conv.wgsl")),
    ("dropout", include_str!("../../shaders/dropout.wgsl")),
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("gru", include_str!("../../shaders/gru.wgsl")),
    ("index", include_str!("../../shaders/index.wgsl")),
    ("layout", include_str!("../../shaders/layout.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("lstm", include_str!("../../shaders/lstm.wgsl")),
    ("matmul", include_str!("../../shaders/matmul.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    ("optim", include_str!("../../shaders/optim.wgsl")),
    ("pool", include_str!("../../shaders/pool.wgsl")),
    ("reduce", include_str!("../../shaders/reduce.wgsl")),
    ("resize", include_str!("../../shaders/resize.wgsl")),
    ("softmax", include_str!("../../shaders/softmax.wgsl")),
    ("unary", include_str!("../../shaders/unary.wgsl")),
];

/// Looks up a family's WGSL.
pub fn shader_source(family: &str) -> Option<&'static str> {
    SHADERS.iter().find(|(f, _)| *f == family).map(|(_, s)| *s)
}

/// Where a parameter's first value comes from when the device has none under its name yet.
#[derive(Debug, Clone)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// Exactly this tensor (its shape must match the parameter's).
    Value(Arc<Tensor>),
}

/// One node's operation. Sources (`Input`, `Param`, `Const`) have no kernel; `Reshape` is a view
/// that shares its input's storage.
#[derive(Debug, Clone)]
pub enum Op {
    /// A tensor fed by `Plan::run`, by name.
    Input {
        name: String,
    },
    /// A trainable tensor that lives on the device across runs, by name.
    Param {
        name: String,
        init: Init,
    },
    /// A constant uploaded once when the plan is compiled.
    Const {
        value: Arc<Tensor>,
    },
    MatMul(matmul::MatMul),
    /// Split-K partial products `[S, batch.., M, N]` (made by the plan compiler).
    MatMulPartial(matmul::MatMulPartial),
    /// The split-K partials summed, with the product's bias and relu.
    SplitKSum(matmul::SplitKSum),
    /// A product's row sums of `op(a)`, written by its kernel: a view (made by the plan compiler).
    RowSums(matmul::RowSums),
    /// A product with a fused elementwise program as its epilogue (made by the plan compiler).
    MatMulEpilogue(matmul::MatMulEpilogue),
    /// A product reading `im2col(x)` straight from the image (made by the plan compiler).
    ImplicitGemm(conv::ImplicitGemm),
    /// A convolution's input gradient as one implicit GEMM (made by the plan compiler).
    ImplicitDgrad(conv::ImplicitDgrad),
    Unary(unary::UnaryOp),
    Binary(binary::BinaryOp),
    /// The input's values as another element type.
    Cast(cast::Cast),
    /// A chain of unary and binary ops run as one generated kernel (made by the plan compiler).
    Fused(fused::Fused),
    Softmax(softmax::Softmax),
    Reduce(reduce::Reduce),
    /// A reduction of a fused elementwise program's result (made by the plan compiler).
    ReducePrologue(reduce::ReducePrologue),
    Permute(layout::Permute),
    /// Broadcast to the node's (larger) shape.
    Expand(layout::Expand),
    /// Narrow, pad or concat along one axis.
    AxisCopy(layout::AxisCopy),
    /// Same elements, another shape: no kernel, no copy.
    Reshape,
    /// Receptive fields of an NCHW image as columns [N, C*kh*kw, Ho*Wo] (conv2d = matmul on these).
    Im2col(conv::Im2col),
    /// The adjoint of `Im2col`: columns summed back onto the image [N, C, H, W].
    Col2im(conv::Col2im),
    /// A convolution in groups, its input or its weight gradient (direct kernels).
    GroupedConv2d(conv::GroupedConv2d),
    MaxPool2d(pool::Pool2d),
    AvgPool2d(pool::Pool2d),
    /// Inputs `x` and `dy`: each input element gathers `dy` of every window whose argmax it is.
    MaxPool2dBackward(pool::Pool2d),
    /// A max-pooling backward times a relu's gradient mask, maybe stored as a convolution's
    /// `[C, N*H*W]` (made by the plan compiler; see `ops::pool::MaxPoolReluBackward`).
    MaxPoolReluBackward(pool::MaxPoolReluBackward),
    /// Input `dy`: each input element gathers `dy / (kh*kw)` of every window covering it.
    AvgPool2dBackward(pool::AvgPool2dBackward),
    /// Adaptive average pooling to a given size (see `ops::pool::AdaptiveAvgPool2d`).
    AdaptiveAvgPool2d(pool::AdaptiveAvgPool2d),
    /// Its adjoint, from the pooled gradient back to `(N, C, H, W)`.
    AdaptiveAvgPool2dBackward(pool::AdaptiveAvgPool2d),
    /// Adaptive max pooling to a given size, the windows of `ops::pool::AdaptivePool2d`.
    AdaptiveMaxPool2d(pool::AdaptivePool2d),
    /// Its gradient for the input: inputs `x`, `dy`.
    AdaptiveMaxPool2dBackward(pool::AdaptivePool2d),
    /// Nearest or bilinear resizing of `(N, C, H, W)` images (see `ops::resize`).
    Resize2d(resize::Resize2d),
    /// Elements picked by index along an axis: `torch.gather`, `torch.index_select` (see
    /// `ops::index::Gather`).
    Gather(index::Gather),
    /// The gradient of a gather for its input (see `ops::index::GatherBackward`).
    GatherBackward(index::GatherBackward),
    /// The cumulative sum along an axis (see `ops::index::Cumsum`).
    Cumsum(index::Cumsum),
    /// The positions of each row's largest (or smallest) elements (see `ops::index::TopK`).
    TopK(index::TopK),
    /// A row sort's first pass: sorted blocks (see `ops::index::SortBlocks`).
    SortBlocks(index::SortBlocks),
    /// A row sort's merge pass (see `ops::index::MergeRuns`).
    MergeRuns(index::MergeRuns),
    /// Its adjoint, from the resized images' gradient back to `(N, C, H, W)`.
    Resize2dBackward(resize::Resize2d),
    /// Fused softmax cross-entropy of logits `(N, C)` and class labels `(N)`, mean over N.
    CrossEntropy(loss::CrossEntropy),
    /// One LSTM layer's recurrence (see `ops::lstm`).
    LstmForward(lstm::LstmForward),
    LstmBackward(lstm::LstmBackward),
    /// One GRU layer's recurrence (see `ops::gru`).
    GruForward(gru::GruForward),
    GruBackward(gru::GruBackward),
    /// One vanilla tanh RNN layer's recurrence (see `ops::gru`).
    RnnForward(gru::RnnForward),
    RnnBackward(gru::RnnBackward),
    /// Rows of a table `(V, E)` (input 1) by index (input 0).
    Embedding(embedding::Embedding),
    /// Inputs `indices` and `dy`: the table's gradient `(V, E)`.
    EmbeddingBackward(embedding::EmbeddingBackward),
    /// Input `indices`: each table row's occurrences, `(V + N)` (made by the plan compiler;
    /// see `ops::embedding::EmbeddingRows`).
    EmbeddingRows(embedding::EmbeddingRows),
    /// Seeded inverted dropout of input 0; input 1 is the `[1]` seed.
    Dropout(dropout::Dropout),
    /// Its gradient for the logits, from logits, labels and the loss gradient.
    CrossEntropyBackward(loss::CrossEntropyBackward),
    /// Inputs logits and labels: each row's loss, `(N)` (made by the plan compiler; see
    /// `ops::loss::CrossEntropyRows`).
    CrossEntropyRows(loss::CrossEntropyRows),
    /// An in-place optimizer update of a parameter and its state (no buffer of its own).
    OptimStep(optim::OptimStep),
    /// Dynamic loss scaling between the backward pass and the updates: inputs hyper, the
    /// scaled gradients' sum of squares and the scaler's state (a parameter, written in place);
    /// its value is the hyper vector the updates read (see `ops::optim::ScalerStep`).
    ScalerStep(optim::ScalerStep),
    /// Gradient accumulation into input 1 (a parameter) in place (no buffer of its own; see
    /// `ops::optim::Accumulate`).
    Accumulate(optim::Accumulate),
    /// Several accumulations as one kernel (made by the plan compiler; see
    /// `ops::optim::AccumulateGroup`).
    AccumulateGroup(optim::AccumulateGroup),
    /// An exponential moving average of an updated parameter into input 2 (a parameter) in
    /// place (see `ops::optim::EmaUpdate`).
    EmaUpdate(optim::EmaUpdate),
    /// Several moving averages as one kernel (made by the plan compiler; see
    /// `ops::optim::EmaGroup`).
    EmaGroup(optim::EmaGroup),
    /// Several parameters' updates as one kernel (made by the plan compiler).
    OptimGroup(optim::OptimGroup),
    /// Partial sums of squares of several tensors (see `ops::reduce::SumSquares`).
    SumSquares(reduce::SumSquares),
    /// A running average (input 1, a parameter) moved towards input 0 in place (batch norm's
    /// running statistics; see `ops::norm`).
    RunningUpdate(norm::RunningUpdate),
    /// The mean and variance of each group of `(OUTER, GROUPS, INNER)`: `(2, GROUPS)`.
    GroupStats(norm::GroupStats),
    /// Each group's mean and variance from a split `GroupStats`' blocks (input 0, `(BLOCKS, 2,
    /// GROUPS)`): `(2, GROUPS)` (made by the plan compiler; see `ops::norm::MergeStats`).
    MergeStats(norm::MergeStats),
    /// A normalization that computes its statistics itself and writes them past its output:
    /// inputs `[x, (weight, bias)]` (made by the plan compiler from `GroupStats` and `Normalize`).
    NormalizeStats(norm::NormalizeStats),
    /// The statistics a `NormalizeStats` (input 0) wrote: a view; input 1 is `x`, which the CPU
    /// reference reduces (made by the plan compiler).
    StatsOf(norm::GroupStats),
    /// Inputs `x` and its group statistics: `x` normalized (see `ops::norm::Normalize`).
    Normalize(norm::Normalize),
    /// Inputs `dxhat`, `xhat` and the statistics: the normalization's gradient for `x`.
    NormalizeBackward(norm::NormalizeBackward),
    /// Inputs `dy`, `x` and its statistics: per group `sum(dy)` and `sum(dy * xhat)`, `(2, G)`.
    GroupSums(norm::GroupSums),
    /// Inputs `dy`, `x`, its statistics, the weight and their `GroupSums`: the affine
    /// normalization's gradient for `x`, elementwise.
    NormalizeAffineBackward(norm::NormalizeBackward),
    /// Rows written in place into a cache parameter (input 2) at a fed position (see
    /// `ops::layout::WriteRows`).
    WriteRows(layout::WriteRows),
    /// Scaled dot-product attention of inputs `q`, `k`, `v`, an additive mask and a dropout seed
    /// (see `ops::attention`).
    Attention(attention::Attention),
    /// One kernel of its backward (see `ops::attention::GradPart`).
    AttentionGrad(attention::AttentionGrad),
    /// The wrapped op's value (its inputs, its CPU reference), written by the kernel of a later
    /// node that takes this one as its last input, bound read_write, instead of by a kernel of
    /// its own (made by the plan compiler: a layer norm's parameter sums by its input
    /// gradient's kernel, `exec::lower::sums_in_normalize_backward`; a product by the kernel of
    /// the epilogue it feeds, `exec::lower::fuse_matmul_epilogue`).
    Written(Box<Op>),
}

/// A specialised kernel launch: which WGSL entry point, with which override constants, over how many
/// workgroups. Bindings are always the node's inputs (read) followed by its output (read_write).
#[derive(Debug, Clone)]
pub struct KernelSpec {
    /// Shader file stem in `shaders/`.
    pub family: &'static str,
    /// Entry point.
    pub entry: &'static str,
    /// Pipeline-overridable constants that bake in shapes and op selectors.
    pub constants: Vec<(&'static str, f64)>,
    /// Total workgroups; the executor folds counts above 65,535 into a 2-D grid.
    pub workgroups: u64,
}

/// Comparison tolerance `(atol, rtol)` of a GPU result against the CPU reference.
pub type Tolerance = (f64, f64);

/// Elementwise tolerance from the brief: rtol 1e-5.
pub const TOL_ELEMENTWISE: Tolerance = (1e-6, 1e-5);
/// Reductions and matmul in f32: rtol 1e-4.
pub const TOL_REDUCTION: Tolerance = (1e-5, 1e-4);
/// Anything stored in f16 (10-bit mantissa): rtol 1e-2.
pub const TOL_F16: Tolerance = (1e-3, 1e-2);

impl Op {
    /// Inputs that this op's f16 kernel (a storage-block variant) may read stored as f32,
    /// rounding each element to f16 on load, by input index and binding name: the recurrent
    /// weight, and the GRU's and RNN's recurrent bias, a grouped convolution's operands, whose
    /// casts of mixed precision's f32 parameters (and inputs) the plan compiler folds in
    /// (`exec::lower::fold_operand_casts`).
    pub fn rounded_f16_inputs(&self) -> &'static [(usize, &'static str)] {
        match self {
            Op::LstmForward(_) | Op::LstmBackward(_) => &[(1, "whh")],
            Op::GruForward(_) | Op::GruBackward(_) | Op::RnnForward(_) | Op::RnnBackward(_) => {
                &[(1, "whh"), (2, "bhh")]
            }
            // both operands: a convolution's f32 weight, or its input cast once for the
            // forward and the weight gradient
            Op::GroupedConv2d(_) => &[(0, "src"), (1, "opnd"), (2, "bias")],
            _ => &[],
        }
    }

    /// Short op name used in shape errors, debug dumps and verify reports.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Written(op) => op.name(),
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::MatMul(_) => "matmul",
            Op::MatMulPartial(_) => "matmul_partial",
            Op::SplitKSum(_) => "splitk_sum",
            Op::RowSums(_) => "row_sums",
            Op::MatMulEpilogue(_) => "matmul_epilogue",
            Op::ImplicitGemm(_) => "implicit_gemm",
            Op::ImplicitDgrad(_) => "implicit_dgrad",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Cast(_) => "cast",
            Op::Fused(_) => "fused",
            Op::Softmax(s) => s.name(),
            Op::Reduce(r) => r.name(),
            Op::ReducePrologue(r) => r.reduce.name(),
            Op::Permute(_) => "permute",
            Op::Expand(_) => "expand",
            Op::AxisCopy(a) => a.name(),
            Op::Reshape => "reshape",
            Op::Im2col(_) => "im2col",
            Op::Col2im(_) => "col2im",
            Op::GroupedConv2d(c) => c.name(),
            Op::MaxPool2d(_) => "max_pool2d",
            Op::AvgPool2d(_) => "avg_pool2d",
            Op::MaxPool2dBackward(_) => "max_pool2d_backward",
            Op::MaxPoolReluBackward(_) => "max_pool2d_backward_relu",
            Op::AvgPool2dBackward(_) => "avg_pool2d_backward",
            Op::AdaptiveAvgPool2d(_) => "adaptive_avg_pool2d",
            Op::AdaptiveAvgPool2dBackward(_) => "adaptive_avg_pool2d_backward",
            Op::AdaptiveMaxPool2d(_) => "adaptive_max_pool2d",
            Op::AdaptiveMaxPool2dBackward(_) => "adaptive_max_pool2d_backward",
            Op::Resize2d(_) => "interpolate",
            Op::Resize2dBackward(_) => "interpolate_backward",
            Op::Gather(g) if g.select => "index_select",
            Op::Gather(_) => "gather",
            Op::GatherBackward(_) => "gather_backward",
            Op::Cumsum(_) => "cumsum",
            Op::TopK(_) => "topk",
            Op::SortBlocks(_) => "sort_blocks",
            Op::MergeRuns(_) => "merge_runs",
            Op::CrossEntropy(_) => "cross_entropy",
            Op::LstmForward(_) => "lstm",
            Op::LstmBackward(_) => "lstm_backward",
            Op::GruForward(_) => "gru",
            Op::GruBackward(_) => "gru_backward",
            Op::RnnForward(_) => "rnn",
            Op::RnnBackward(_) => "rnn_backward",
            Op::Embedding(_) => "embedding",
            Op::EmbeddingBackward(_) => "embedding_backward",
            Op::EmbeddingRows(_) => "embedding_rows",
            Op::Dropout(_) => "dropout",
            Op::CrossEntropyBackward(_) => "cross_entropy_backward",
            Op::CrossEntropyRows(_) => "cross_entropy_rows",
            Op::OptimStep(o) => o.name(),
            Op::ScalerStep(_) => "grad_scaler",
            Op::Accumulate(_) => "accumulate",
            Op::AccumulateGroup(_) => "accumulate_group",
            Op::EmaUpdate(_) => "ema_update",
            Op::EmaGroup(_) => "ema_group",
            Op::OptimGroup(o) => o.name(),
            Op::SumSquares(_) => "sum_squares",
            Op::RunningUpdate(_) => "running_update",
            Op::GroupStats(_) => "group_stats",
            Op::MergeStats(_) => "merge_stats",
            Op::NormalizeStats(_) => "normalize",
            Op::StatsOf(_) => "group_stats",
            Op::Normalize(_) => "normalize",
            Op::NormalizeBackward(n) if n.sums => "normalize_backward_sums",
            Op::NormalizeBackward(_) => "normalize_backward",
            Op::GroupSums(s) => s.name(),
            Op::NormalizeAffineBackward(_) => "normalize_affine_backward",
            Op::Attention(_) => "attention",
            Op::AttentionGrad(a) => a.entry(),
            Op::WriteRows(_) => "write_rows",
        }
    }

    /// For nodes without storage of their own, the input whose storage they use (`inputs` are
    /// the input shapes, `out` its own, `dtype` its element type): a reshape views its input, a
    /// narrow that keeps a
    /// contiguous run of its input's memory views it too ([`layout::AxisCopy::view_offset`]), an optimizer update writes its
    /// parameter (input 3) in place, packed attention's dq kernel writes into the gradient its
    /// dk/dv kernel made (input 8; [`attention::AttentionGrad::in_place`]).
    pub fn view_of(&self, inputs: &[&Shape], out: &Shape, dtype: DType) -> Option<usize> {
        match self {
            Op::Reshape => Some(0),
            Op::AxisCopy(a) if a.strided || a.view_offset(inputs[0], out, dtype).is_some() => {
                Some(0)
            }
            Op::OptimStep(_) => Some(3),
            Op::Accumulate(_) => Some(1),
            Op::AccumulateGroup(a) => Some(2 * a.members - 1),
            Op::EmaUpdate(_) => Some(2),
            Op::EmaGroup(e) => Some(2 * e.members),
            Op::OptimGroup(o) => Some(o.param(o.members - 1)),
            Op::RunningUpdate(_) => Some(1),
            Op::WriteRows(_) => Some(2),
            Op::AttentionGrad(a) if a.in_place() => Some(8),
            Op::SumSquares(s) if s.chained => Some(inputs.len() - 1),
            Op::RowSums(_) | Op::StatsOf(_) => Some(0),
            Op::Permute(p) if p.in_place => Some(0),
            Op::CrossEntropyBackward(c) if c.written => Some(3),
            _ => None,
        }
    }

    /// Elements a kernel writes past its output (`out`), in room the plan adds to the node's
    /// buffer: attention's log-sum-exps for its backward ([`attention::Attention::lse`]), a
    /// product's row sums ([`matmul::MatMul::row_sums`]).
    pub fn scratch(&self, inputs: &[&Shape], out: &Shape) -> usize {
        let dims = |mm: &matmul::MatMul, b: &Shape| mm.dims(inputs[0], b).ok();
        match self {
            Op::Attention(a) => a.scratch(inputs[0], inputs[1], inputs[2]),
            Op::MatMul(mm) => dims(mm, inputs[1]).map_or(0, |d| mm.scratch(&d, 1)),
            Op::MatMulPartial(p) => dims(&p.product, inputs[1])
                .map_or(0, |d| p.product.scratch(&d, p.config.slices(d.k) as usize)),
            Op::SplitKSum(s) => s.scratch(out),
            Op::CrossEntropy(c) => c.scratch(inputs[0]),
            Op::CrossEntropyRows(c) => c.scratch(inputs[0]),
            Op::NormalizeStats(s) if s.stats => {
                // the groups of x (OUTER, GROUPS, INNER): the node's own shape may be another of
                // as many elements (a relu fused in takes the relu's)
                let groups = inputs[0].dims()[1];
                norm::stats_offset(out.numel()) - out.numel() + 2 * groups
            }
            Op::ImplicitGemm(c) => {
                let cols = c.cols_shape(inputs[1]);
                let slices = match c.partial {
                    Some(_) => out.dims()[0],
                    None => 1,
                };
                dims(&c.product, &cols).map_or(0, |d| c.product.scratch(&d, slices))
            }
            _ => 0,
        }
    }

    /// Where a view ([`Self::view_of`]) starts in its input's storage, in elements: a narrow of
    /// a contiguous run ([`layout::AxisCopy::view_offset`]); 0 for the other views.
    pub fn view_offset(&self, inputs: &[&Shape], out: &Shape, dtype: DType) -> usize {
        match self {
            // a strided one is bound as its input: its readers add the offset
            Op::AxisCopy(a) if a.strided => 0,
            Op::AxisCopy(a) => a.view_offset(inputs[0], out, dtype).unwrap_or(0),
            Op::RowSums(r) => r.offset(inputs[0]),
            Op::StatsOf(_) => norm::stats_offset(inputs[0].numel()),
            // past the mean, or past each row's loss
            Op::CrossEntropyBackward(c) if c.written => loss::grad_offset(inputs[3].numel()),
            _ => 0,
        }
    }

    /// How a kernel binds this node's inputs: inputs from the returned index on are bound
    /// read_write (updated in place), and whether the node's own output is bound after them.
    pub fn binding_mode(&self, n_inputs: usize) -> (usize, bool) {
        match self {
            Op::OptimStep(_) => (3, false),
            // the scaler's state, then the hyper vector it writes
            Op::ScalerStep(_) => (2, true),
            Op::Accumulate(_) => (1, false),
            Op::AccumulateGroup(a) => (a.members, false),
            Op::EmaUpdate(_) => (2, false),
            Op::EmaGroup(e) => (1 + e.members, false),
            Op::OptimGroup(o) => (o.param(0), false),
            Op::RunningUpdate(_) => (1, false),
            // statistics that also move running ones (in place)
            Op::GroupStats(norm::GroupStats {
                running: Some(_), ..
            })
            | Op::MergeStats(norm::MergeStats {
                running: Some(_), ..
            }) => (1, true),
            Op::NormalizeStats(norm::NormalizeStats {
                running: Some(_), ..
            }) => (n_inputs - 2, true),
            Op::WriteRows(_) => (2, false),
            Op::AttentionGrad(a) if a.in_place() => (8, false),
            Op::SumSquares(s) if s.chained => (n_inputs - 1, false),
            // the parameter gradients it writes besides its output
            Op::NormalizeBackward(n) if n.sums => (n_inputs - 1, true),
            // the product it stores besides its epilogue's result
            Op::MatMulEpilogue(e) if e.keep => (n_inputs - 1, true),
            _ => (n_inputs, true),
        }
    }

    /// Work of this op for the profiler: `(flops, bytes)`. FLOPs are counted for matmul-like
    /// ops (multiply-adds count 2); the rest report bytes moved (each input and output once).
    pub fn cost(&self, inputs: &[&Shape], out: &Shape) -> (f64, f64) {
        let bytes = 4.0 * (inputs.iter().map(|s| s.numel()).sum::<usize>() + out.numel()) as f64;
        let flops = match self {
            Op::ImplicitGemm(c) => {
                let cols = c.cols_shape(inputs[1]);
                let k = if c.product.trans_b {
                    cols.dims()[1]
                } else {
                    cols.dims()[0]
                };
                let per_slice = match c.partial {
                    Some(_) => out.numel() / out.dims()[0],
                    None => out.numel(),
                };
                2.0 * per_slice as f64 * k as f64
            }
            Op::ImplicitDgrad(c) => {
                let d = c.dims(inputs[0], out);
                2.0 * (d.m * d.n * d.k) as f64
            }
            Op::GroupedConv2d(c) => c.flops(inputs[0].dims()[0]),
            Op::MatMulEpilogue(e) => {
                let a = inputs[0].dims();
                let k = if e.product.trans_a {
                    a[a.len() - 2]
                } else {
                    a[a.len() - 1]
                };
                2.0 * out.numel() as f64 * k as f64
            }
            Op::MatMulPartial(p) => {
                let a = inputs[0].dims();
                let k = if p.product.trans_a {
                    a[a.len() - 2]
                } else {
                    a[a.len() - 1]
                };
                2.0 * (out.numel() / out.dims()[0]) as f64 * k as f64
            }
            Op::MatMul(m) => {
                let a = inputs[0].dims();
                let k = if m.trans_a {
                    a[a.len() - 2]
                } else {
                    a[a.len() - 1]
                };
                2.0 * out.numel() as f64 * k as f64
            }
            Op::LstmForward(_) | Op::LstmBackward(_) => {
                // the recurrent products: T * B * 4H * H multiply-adds
                let p = inputs[0].dims();
                let (t, b) = (p[0], p[1]);
                let h = if let Op::LstmForward(_) = self {
                    p[2] / 4
                } else {
                    p[2] / 6
                };
                2.0 * (t * b * 4 * h * h) as f64
            }
            Op::Attention(a) => {
                // the scores and the weighted sum: (D + Dv) multiply-adds per attended pair
                // (causal: key j <= query i only)
                let (q, k, v) = a.logical(inputs[0], inputs[1], inputs[2]);
                let macs = q.dims()[q.rank() - 1] + v.dims()[v.rank() - 1];
                2.0 * (attention::attended_pairs(&q, &k, a.causal) * macs) as f64
            }
            Op::AttentionGrad(a) => {
                let (q, k, v) = a.attention.logical(inputs[0], inputs[1], inputs[2]);
                let macs = a.macs_per_pair(q.dims()[q.rank() - 1], v.dims()[v.rank() - 1]);
                let pairs = attention::attended_pairs(&q, &k, a.attention.causal);
                2.0 * (pairs * macs) as f64
            }
            Op::GruForward(_) | Op::GruBackward(_) | Op::RnnForward(_) | Op::RnnBackward(_) => {
                // the recurrent products: T * B * GH * H multiply-adds (G = 3 for the GRU, 1 for
                // the RNN); input 0 is xw (T, B, GH) forward, the packed state (5H or H) otherwise
                let p = inputs[0].dims();
                let (t, b) = (p[0], p[1]);
                let gru = matches!(self, Op::GruForward(_) | Op::GruBackward(_));
                let fwd = matches!(self, Op::GruForward(_) | Op::RnnForward(_));
                let (g, h) = match (gru, fwd) {
                    (true, true) => (3, p[2] / 3),
                    (true, false) => (3, p[2] / 5),
                    (false, _) => (1, p[2]),
                };
                2.0 * (t * b * g * h * h) as f64
            }
            _ => 0.0,
        };
        (flops, bytes)
    }

    /// For recurrent kernels: how many times the kernel is dispatched in a row on `target` (each
    /// dispatch reads its index from a step uniform at binding 0); `None` for single-dispatch
    /// kernels.
    pub fn repeat(&self, inputs: &[&Shape], target: &crate::codegen::Target) -> Option<u32> {
        self.is_recurrent().then(|| {
            // inputs: xw (or P) first, [T, B, ..], w_hh (G*H, H) second
            let (t, b, h) = (
                inputs[0].dims()[0],
                inputs[0].dims()[1],
                inputs[1].dims()[1],
            );
            let backward = matches!(
                self,
                Op::LstmBackward(_) | Op::GruBackward(_) | Op::RnnBackward(_)
            );
            lstm::recurrent_dispatches((t, b, h), backward, target)
        })
    }

    /// True for the recurrences (LSTM, GRU, RNN; forward and backward), whose input 1 is `w_hh`
    /// and input 4 the f32 lengths.
    pub fn is_recurrent(&self) -> bool {
        matches!(
            self,
            Op::LstmForward(_)
                | Op::LstmBackward(_)
                | Op::GruForward(_)
                | Op::GruBackward(_)
                | Op::RnnForward(_)
                | Op::RnnBackward(_)
        )
    }

    /// True for nodes whose value is given rather than computed.
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Const { .. })
    }

    /// The CPU reference: computes this op from its input values. Sources are not evaluated here.
    pub fn cpu_forward(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        match self {
            Op::Written(op) => op.cpu_forward(inputs, out),
            Op::MatMul(m) => m.cpu_node(inputs, out),
            Op::MatMulPartial(p) => p.cpu(inputs, out),
            Op::SplitKSum(s) => s.cpu(inputs[0], inputs.get(1).copied(), out),
            Op::RowSums(r) => r.cpu(inputs, out),
            Op::MatMulEpilogue(e) => e.cpu(inputs, out),
            Op::ImplicitGemm(c) => c.cpu(inputs, out),
            Op::ImplicitDgrad(c) => c.cpu(inputs, out),
            Op::Unary(u) => u.cpu(inputs[0]),
            Op::Binary(b) => b.cpu(inputs[0], inputs[1], out),
            Op::Cast(c) => c.cpu(inputs[0]),
            Op::Fused(f) => f.cpu(inputs, out),
            Op::Softmax(s) => s.cpu(inputs[0]),
            Op::Reduce(r) => r.cpu(inputs[0], out),
            Op::ReducePrologue(r) => r.cpu(inputs, out),
            Op::Permute(p) => p.cpu(inputs[0], out),
            Op::Expand(e) => e.cpu(inputs[0], out),
            Op::AxisCopy(a) => a.cpu(inputs, out),
            Op::Reshape => Tensor::new(out.clone(), inputs[0].data().to_vec())
                .expect("reshape keeps the element count"),
            Op::Im2col(c) => c.0.im2col_cpu(inputs[0], out),
            Op::Col2im(c) => c.0.col2im_cpu(inputs[0], out),
            Op::GroupedConv2d(c) => c.cpu(inputs, out),
            Op::MaxPool2d(p) => p.max_cpu(inputs[0], out),
            Op::AvgPool2d(p) => p.avg_cpu(inputs[0], out),
            Op::MaxPool2dBackward(p) => p.max_backward_cpu(inputs[0], inputs[1], out),
            Op::MaxPoolReluBackward(p) => p.cpu(inputs[0], inputs[1], out),
            Op::AvgPool2dBackward(p) => p.cpu(inputs[0], out),
            Op::AdaptiveAvgPool2d(p) => p.cpu(inputs[0], out),
            Op::AdaptiveAvgPool2dBackward(p) => p.backward_cpu(inputs[0], out),
            Op::AdaptiveMaxPool2d(p) => p.max_cpu(inputs[0], out),
            Op::AdaptiveMaxPool2dBackward(p) => p.max_backward_cpu(inputs[0], inputs[1], out),
            Op::Resize2d(r) => r.cpu(inputs[0], out),
            Op::Resize2dBackward(r) => r.backward_cpu(inputs[0], out),
            Op::Gather(g) => g.cpu(inputs[0], inputs[1], out),
            Op::GatherBackward(g) => g.cpu(inputs[0], inputs[1], out),
            Op::Cumsum(c) => c.cpu(inputs[0]),
            Op::TopK(t) => t.cpu(inputs[0], out),
            Op::SortBlocks(s) => s.cpu(inputs[0], out),
            Op::MergeRuns(m) => m.cpu(inputs[0], out),
            Op::CrossEntropy(c) => c.cpu(inputs[0], inputs[1]),
            Op::LstmForward(l) => l.cpu(inputs, out),
            Op::LstmBackward(l) => l.cpu(inputs, out),
            Op::GruForward(l) => l.cpu(inputs, out),
            Op::GruBackward(l) => l.cpu(inputs, out),
            Op::RnnForward(l) => l.cpu(inputs, out),
            Op::RnnBackward(l) => l.cpu(inputs, out),
            Op::Embedding(e) => e.cpu(inputs[0], inputs[1], out),
            Op::EmbeddingBackward(e) => e.cpu(inputs[0], inputs[1], out),
            Op::EmbeddingRows(e) => e.cpu(inputs[0]),
            Op::Dropout(d) => d.cpu(inputs[0], inputs[1]),
            Op::CrossEntropyBackward(c) => c.cpu(inputs[0], inputs[1], inputs[2]),
            Op::CrossEntropyRows(c) => c.cpu(inputs[0], inputs[1]),
            Op::OptimStep(o) => o.cpu_update(inputs).swap_remove(0),
            Op::ScalerStep(s) => s.cpu(inputs[0], inputs[1], inputs[2]).0,
            Op::Accumulate(a) => a.cpu(inputs[0], inputs[1]),
            Op::AccumulateGroup(a) => a.cpu(inputs).swap_remove(a.members - 1),
            Op::EmaUpdate(e) => e.cpu(inputs[0], inputs[1], inputs[2]),
            Op::EmaGroup(e) => e.cpu(inputs).swap_remove(e.members - 1),
            Op::OptimGroup(o) => {
                let mut last = o.cpu_update(inputs).pop().expect("a group has members");
                last.swap_remove(0)
            }
            Op::SumSquares(s) => s.cpu(inputs, out),
            Op::RunningUpdate(r) => r.cpu(inputs[0], &inputs[1..]).swap_remove(0),
            Op::GroupStats(s) => s.cpu(inputs[0]),
            Op::MergeStats(s) => s.cpu(inputs[0]),
            Op::NormalizeStats(n) => n
                .cpu(inputs)
                .reshape(out.clone())
                .expect("as many elements"),
            Op::StatsOf(s) => s.cpu(inputs[1]),
            // (of the input's shape; a fused relu's node may have another of the same size)
            Op::Normalize(n) => n
                .cpu(
                    inputs[0],
                    inputs[1],
                    n.affine.then(|| (inputs[2], inputs[3])),
                )
                .reshape(out.clone())
                .expect("as many elements"),
            Op::GroupSums(s) => s.cpu(inputs[0], inputs[1], inputs[2]),
            Op::NormalizeAffineBackward(n) => n
                .affine_cpu(inputs)
                .reshape(out.clone())
                .expect("as many elements"),
            Op::NormalizeBackward(n) => n.cpu(inputs, out),
            Op::Attention(a) => a.cpu(inputs, out),
            Op::AttentionGrad(a) => a.cpu(inputs, out),
            Op::WriteRows(w) => w.cpu(inputs[0], inputs[1], inputs[2]),
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => {
                unreachable!("source nodes are not evaluated")
            }
        }
    }

    /// The GPU kernel for this op at these shapes on `target`; `None` for sources and views.
    pub fn kernel(
        &self,
        inputs: &[&Shape],
        out: &Shape,
        target: &crate::codegen::Target,
    ) -> Option<KernelSpec> {
        match self {
            Op::MatMul(m) => Some(m.kernel(inputs[0], inputs[1], out)),
            // generated: see `Op::generated_kernel`
            Op::MatMulPartial(p) => Some(p.kernel(inputs[0], inputs[1]).spec),
            Op::SplitKSum(s) => Some(s.kernel(inputs[0], out)),
            // generated for the adapter only: see `exec::lower::select`
            Op::ImplicitGemm(_)
            | Op::ImplicitDgrad(_)
            | Op::MatMulEpilogue(_)
            | Op::ReducePrologue(_)
            | Op::OptimGroup(_)
            | Op::AccumulateGroup(_)
            | Op::EmaGroup(_)
            | Op::SumSquares(_)
            | Op::Cast(_) => None,
            Op::Unary(u) => Some(u.kernel(out)),
            Op::Binary(b) => Some(b.kernel(inputs[0], inputs[1], out)),
            // generated as well
            Op::Fused(f) => {
                Some(crate::codegen::elementwise::kernel(f, inputs, out, DType::F32).spec)
            }
            Op::Softmax(s) => Some(s.kernel(inputs[0])),
            Op::Reduce(r) => Some(r.kernel(inputs[0])),
            // read in place by its readers: a view
            Op::Permute(p) if p.in_place => None,
            Op::Permute(p) => Some(p.kernel(inputs[0], out)),
            Op::Expand(e) => Some(e.kernel(inputs[0], out)),
            // a contiguous run of its input's memory: a view (`exec::lower::select` tells them
            // by their element type first; this is the rule for any type)
            Op::AxisCopy(a) if a.strided || a.view_offset(inputs[0], out, DType::F16).is_some() => {
                None
            }
            // written by its product's kernel: a view
            Op::RowSums(_) => None,
            Op::AxisCopy(a) => Some(a.kernel(inputs, out)),
            Op::Im2col(c) => Some(c.0.im2col_kernel(inputs[0], out)),
            Op::Col2im(c) => Some(c.0.col2im_kernel(inputs[0], out)),
            Op::GroupedConv2d(c) => Some(c.kernel(inputs, out)),
            Op::MaxPool2d(p) => Some(p.kernel("max_pool", inputs[0], out)),
            Op::AvgPool2d(p) => Some(p.kernel("avg_pool", inputs[0], out)),
            Op::MaxPool2dBackward(p) => Some(p.max_backward_kernel(inputs[0])),
            Op::MaxPoolReluBackward(p) => Some(p.kernel(inputs[0])),
            Op::AvgPool2dBackward(p) => Some(p.kernel(out)),
            Op::AdaptiveAvgPool2d(p) => Some(p.kernel(inputs[0], out)),
            Op::AdaptiveAvgPool2dBackward(p) => Some(p.backward_kernel(out)),
            Op::AdaptiveMaxPool2d(p) => Some(p.max_kernel(inputs[0], false)),
            Op::AdaptiveMaxPool2dBackward(p) => Some(p.max_kernel(inputs[0], true)),
            Op::Resize2d(r) => Some(r.kernel(inputs[0], out)),
            Op::Resize2dBackward(r) => Some(r.backward_kernel(out)),
            Op::Gather(g) => Some(g.kernel(inputs[0], out)),
            Op::GatherBackward(g) => Some(g.kernel(inputs[1], out)),
            Op::Cumsum(c) => Some(c.kernel(out)),
            Op::TopK(t) => Some(t.kernel(inputs[0])),
            Op::SortBlocks(s) => Some(s.kernel(inputs[0])),
            Op::MergeRuns(m) => Some(m.kernel(inputs[0])),
            Op::CrossEntropy(c) => Some(c.kernel(inputs[0])),
            Op::LstmForward(l) => Some(l.kernel(out, target)),
            Op::LstmBackward(l) => Some(l.kernel(inputs[0], target)),
            Op::GruForward(l) => Some(l.kernel(out, target)),
            Op::GruBackward(l) => Some(l.kernel(inputs[0], target)),
            Op::RnnForward(l) => Some(l.kernel(out, target)),
            Op::RnnBackward(l) => Some(l.kernel(inputs[0], target)),
            Op::Embedding(e) => Some(e.kernel(inputs[0], inputs[1])),
            Op::EmbeddingBackward(e) => Some(e.kernel(inputs[0], out)),
            Op::EmbeddingRows(e) => Some(e.kernel(inputs[0])),
            Op::Dropout(d) => Some(d.kernel(out.numel())),
            // written by the loss's kernel: a view
            Op::CrossEntropyBackward(c) if c.written => None,
            Op::CrossEntropyBackward(c) => Some(c.kernel(inputs[0])),
            Op::CrossEntropyRows(c) => Some(c.kernel(inputs[0])),
            Op::OptimStep(o) => Some(o.kernel(out)),
            Op::ScalerStep(s) => Some(s.kernel()),
            Op::Accumulate(a) => Some(a.kernel(out.numel())),
            Op::EmaUpdate(e) => Some(e.kernel(out.numel())),
            Op::RunningUpdate(r) => Some(r.kernel(out.numel())),
            Op::GroupStats(s) => Some(s.kernel(inputs[0])),
            Op::MergeStats(s) => Some(s.kernel(inputs[0])),
            Op::NormalizeStats(n) => Some(n.kernel(inputs[0])),
            // written by its normalization's kernel: a view
            Op::StatsOf(_) => None,
            Op::Normalize(n) => Some(n.kernel(inputs[0])),
            Op::NormalizeBackward(n) => {
                Some(n.kernel(inputs[0], n.sums.then(|| inputs[inputs.len() - 1])))
            }
            Op::GroupSums(s) => Some(s.kernel(inputs[0])),
            // written by the kernel of the node that reads it
            Op::Written(_) => None,
            Op::NormalizeAffineBackward(n) => Some(n.affine_kernel(inputs[0], inputs[4])),
            Op::Attention(a) => Some(a.kernel(inputs, target)),
            Op::AttentionGrad(a) => Some(a.kernel(inputs, target)),
            Op::WriteRows(w) => Some(w.kernel(inputs[0], inputs[2])),
            Op::Reshape | Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => None,
        }
    }

    /// The backward rule: given the node's inputs `x`, its output `y` and the gradient `dy` of a
    /// scalar loss with respect to `y`, adds to `g` the nodes that compute the gradient for each
    /// input (`None` where an input takes none, as labels or masks).
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        y: NodeId,
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        Ok(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => vec![],
            Op::MatMul(m) => m.backward(g, x, y, dy)?,
            Op::Unary(unary::UnaryOp::Detach) => vec![None],
            Op::Unary(u) => vec![Some(u.backward(g, x[0], y, dy)?)],
            Op::Binary(b) => b.backward(g, x[0], x[1], y, dy)?.to_vec(),
            Op::Cast(c) => vec![Some(c.backward(g, g.dtype(x[0]), dy)?)],
            Op::Softmax(s) => vec![Some(s.backward(g, y, dy)?)],
            Op::Reduce(r) => vec![r.backward(g, x[0], y, dy)?],
            Op::Permute(p) => vec![Some(p.backward(g, dy)?)],
            Op::Expand(_) => vec![Some(g.sum_to(dy, &g.shape(x[0]))?)],
            Op::AxisCopy(a) => a.backward(g, x, dy)?,
            Op::Reshape => {
                let dims: Vec<isize> = g.shape(x[0]).dims().iter().map(|&d| d as isize).collect();
                vec![Some(g.reshape(dy, &dims)?)]
            }
            Op::Im2col(c) => vec![Some(c.backward(g, dy)?)],
            Op::Col2im(c) => vec![Some(c.backward(g, dy)?)],
            Op::GroupedConv2d(c) => c.backward(g, x, y, dy)?,
            Op::MaxPool2d(p) => vec![Some(p.max_backward(g, x[0], dy)?)],
            Op::AvgPool2d(p) => vec![Some(p.avg_backward(g, x[0], dy)?)],
            Op::MaxPool2dBackward(_) | Op::MaxPoolReluBackward(_) => {
                return Err(pool::max_backward_backward())
            }
            Op::AttentionGrad(a) => {
                return Err(crate::error::Error::Unsupported(format!(
                    "the second derivative of attention (backward of {})",
                    a.entry()
                )))
            }
            Op::AvgPool2dBackward(p) => vec![Some(p.backward(g, dy)?)],
            Op::AdaptiveAvgPool2d(p) => vec![Some(g.adaptive_avg_pool2d_backward(dy, *p)?)],
            Op::AdaptiveAvgPool2dBackward(p) => vec![Some(g.adaptive_avg_pool2d(dy, p.output)?)],
            Op::AdaptiveMaxPool2d(p) => {
                let shape = g.shape(x[0]);
                let back = g.push_op(Op::AdaptiveMaxPool2dBackward(*p), vec![x[0], dy], shape)?;
                vec![Some(back)]
            }
            Op::AdaptiveMaxPool2dBackward(_) => return Err(pool::max_backward_backward()),
            Op::Resize2d(r) => vec![Some(r.backward(g, dy)?)],
            Op::Resize2dBackward(r) => vec![Some(r.backward_backward(g, dy)?)],
            Op::Gather(i) => i.backward(g, x, dy)?,
            Op::GatherBackward(i) => i.backward(g, x, dy)?,
            Op::Cumsum(c) => vec![Some(c.backward(g, dy)?)],
            // positions: constant almost everywhere
            Op::TopK(_) | Op::SortBlocks(_) | Op::MergeRuns(_) => vec![None],
            Op::CrossEntropy(c) => c.backward(g, x[0], x[1], dy)?.to_vec(),
            Op::CrossEntropyRows(c) if !c.with_grad => c.backward(g, x[0], x[1], dy)?.to_vec(),
            Op::LstmForward(l) => l.backward(g, x, y, dy)?,
            Op::GruForward(l) => l.backward(g, x, y, dy)?,
            Op::RnnForward(l) => l.backward(g, x, y, dy)?,
            Op::Embedding(e) => e.backward(g, x, dy)?,
            Op::Dropout(d) => vec![Some(d.backward(g, x[1], dy)?), None],
            Op::SumSquares(s) => s.backward(g, x, dy)?,
            Op::GroupStats(s) => vec![Some(s.backward(g, x[0], y, dy)?)],
            Op::Normalize(n) => n.backward(g, x, y, dy)?,
            Op::Attention(a) => a.backward(g, x, y, dy)?,
            Op::CrossEntropyBackward(_)
            | Op::CrossEntropyRows(_)
            | Op::MatMulPartial(_)
            | Op::SplitKSum(_)
            | Op::RowSums(_)
            | Op::NormalizeStats(_)
            | Op::StatsOf(_)
            | Op::MergeStats(_)
            | Op::MatMulEpilogue(_)
            | Op::ReducePrologue(_)
            | Op::ImplicitGemm(_)
            | Op::ImplicitDgrad(_)
            | Op::Fused(_)
            | Op::OptimStep(_)
            | Op::OptimGroup(_)
            | Op::ScalerStep(_)
            | Op::Accumulate(_)
            | Op::AccumulateGroup(_)
            | Op::EmaUpdate(_)
            | Op::EmaGroup(_)
            | Op::RunningUpdate(_)
            | Op::WriteRows(_)
            | Op::NormalizeBackward(_)
            | Op::GroupSums(_)
            | Op::NormalizeAffineBackward(_)
            | Op::LstmBackward(_)
            | Op::GruBackward(_)
            | Op::RnnBackward(_)
            | Op::EmbeddingBackward(_)
            | Op::EmbeddingRows(_)
            | Op::Written(_) => {
                return Err(crate::error::Error::Unsupported(format!(
                    "gradients through {}",
                    self.name()
                )))
            }
        })
    }

    /// The element type of this op's result given its inputs' types, or an error naming the op:
    /// casts give their target type; products, convolutions, pooling, elementwise ops, softmax,
    /// reductions and layout ops take and give one type (f32 or f16, all inputs alike); dropout
    /// gives its input's (its seed is f32); cross-entropy takes f16 logits (f32 labels) and gives
    /// an f32 loss, its backward the logits' type; the embedding lookup and its gradient take f32
    /// indices and give the table's (dy's) type; recurrences take one type (f32 or f16) but for
    /// their f32 lengths; every other op takes f32 only.
    pub fn result_dtype(&self, inputs: &[DType]) -> Result<DType> {
        let first = inputs.first().copied().unwrap_or_default();
        let err = |why: String| Err(crate::error::shape_err(self.name(), why));
        match self {
            Op::Written(op) => op.result_dtype(inputs),
            Op::Cast(c) => Ok(c.to),
            Op::MatMul(_)
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Reduce(_)
            | Op::Permute(_)
            | Op::Expand(_)
            | Op::Reshape
            | Op::Fused(_)
            | Op::MatMulEpilogue(_)
            | Op::ReducePrologue(_)
            | Op::Im2col(_)
            | Op::Col2im(_)
            | Op::GroupedConv2d(_)
            | Op::ImplicitGemm(_)
            | Op::ImplicitDgrad(_)
            | Op::MaxPool2d(_)
            | Op::AvgPool2d(_)
            | Op::MaxPool2dBackward(_)
            | Op::MaxPoolReluBackward(_)
            | Op::AvgPool2dBackward(_)
            | Op::AdaptiveAvgPool2d(_)
            | Op::AdaptiveAvgPool2dBackward(_)
            | Op::AdaptiveMaxPool2d(_)
            | Op::AdaptiveMaxPool2dBackward(_)
            | Op::Resize2d(_)
            | Op::Resize2dBackward(_)
            | Op::Cumsum(_)
            | Op::Softmax(_)
            | Op::AxisCopy(_) => match inputs.iter().find(|&&d| d != first) {
                Some(other) => err(format!(
                    "its inputs must have one element type, got {first} and {other}; cast one \
                     (Graph::cast)"
                )),
                None => Ok(first),
            },
            // indices f32; x (its gradient: dy) f16 or f32
            Op::Gather(_) if inputs[1] == DType::F32 => Ok(first),
            Op::GatherBackward(_) if first == DType::F32 => Ok(inputs[1]),
            // positions of an f32 or f16 tensor's elements
            Op::TopK(_) | Op::SortBlocks(_) => Ok(DType::F32),
            Op::MergeRuns(_) if first == DType::F32 => Ok(DType::F32),
            // the seed is a whole number: f32
            Op::Dropout(_) if inputs.get(1) == Some(&DType::F32) => Ok(first),
            // f16 logits: the loss (a mean over the batch) stays f32, the logits' gradient
            // follows the logits; labels and the loss's gradient are f32
            Op::CrossEntropy(_) | Op::CrossEntropyRows(_)
                if inputs[1..].iter().all(|&d| d == DType::F32) =>
            {
                Ok(DType::F32)
            }
            Op::CrossEntropyBackward(_) if inputs[1..].iter().all(|&d| d == DType::F32) => {
                Ok(first)
            }
            // indices f32; the table (its gradient: dy) f16 or f32
            Op::Embedding(_) | Op::EmbeddingBackward(_) if first == DType::F32 => Ok(inputs[1]),
            Op::EmbeddingRows(_) if first == DType::F32 => Ok(DType::F32),
            // f32 or f16 tensors (read as stored), an f32 sum
            Op::SumSquares(_) => Ok(DType::F32),
            // the value and the cache in one type (f32 or f16), the position f32
            Op::WriteRows(_) => {
                if inputs[2] != first || inputs[1] != DType::F32 {
                    return err(format!(
                        "value and cache must have one element type and the position f32, got \
                         {first}, {} and {}",
                        inputs[2], inputs[1]
                    ));
                }
                Ok(first)
            }
            // q, k and v in one type (f32 or f16), the additive mask f32
            Op::Attention(_) => {
                if let Some(k) = (1..3).find(|&k| inputs[k] != first) {
                    return err(format!(
                        "q, k and v must have one element type, got {first} and {} (input {k})",
                        inputs[k]
                    ));
                }
                if let Some(k) = (3..5).find(|&k| inputs[k] != DType::F32) {
                    return err(format!(
                        "its mask and dropout seed must be f32, input {k} is {}",
                        inputs[k]
                    ));
                }
                Ok(first)
            }
            // as attention's, then y and dy in q's type too and the statistics f32; the
            // statistics come out f32, the gradients in q's type
            Op::AttentionGrad(a) => {
                let expect = |k: usize| match k {
                    3 | 4 | 7 => DType::F32,
                    _ => first,
                };
                if let Some(k) = (1..inputs.len()).find(|&k| inputs[k] != expect(k)) {
                    return err(format!(
                        "input {k} must be {} (q is {first}), got {}",
                        expect(k),
                        inputs[k]
                    ));
                }
                Ok(match a.part {
                    attention::GradPart::Stats => DType::F32,
                    _ => first,
                })
            }
            // recurrences: input 4 is the lengths (f32), the others share one type
            // normalization: the tensors (input 0, and 1 where it is one too) in one type, f32
            // or f16; statistics, weights, sums f32; statistics and sums come out f32
            Op::GroupStats(_)
            | Op::Normalize(_)
            | Op::NormalizeBackward(_)
            | Op::GroupSums(_)
            | Op::NormalizeAffineBackward(_) => {
                let tensors = match self {
                    Op::GroupStats(_) | Op::Normalize(_) => 1,
                    _ => 2,
                };
                if let Some(k) = (1..tensors).find(|&k| inputs[k] != first) {
                    return err(format!(
                        "its tensors must have one element type, got {first} and {} (input {k})",
                        inputs[k]
                    ));
                }
                if let Some(k) = (tensors..inputs.len()).find(|&k| inputs[k] != DType::F32) {
                    return err(format!(
                        "its statistics and parameters must be f32, input {k} is {}",
                        inputs[k]
                    ));
                }
                match self {
                    Op::GroupStats(_) | Op::GroupSums(_) => Ok(DType::F32),
                    _ => Ok(first),
                }
            }
            _ if self.is_recurrent() => {
                let mut others = inputs.iter().enumerate().filter(|&(k, _)| k != 4);
                match others.find(|&(_, &d)| d != first) {
                    Some((k, other)) => err(format!(
                        "its inputs (but the f32 lengths) must have one element type, got \
                         {first} and {other} (input {k}); cast one (Graph::cast)"
                    )),
                    None if inputs.get(4).is_some_and(|&d| d != DType::F32) => {
                        err("its lengths must be f32".into())
                    }
                    None => Ok(first),
                }
            }
            _ => match inputs.iter().position(|&d| d != DType::F32) {
                Some(k) => err(format!(
                    "it takes f32 tensors only, input {k} is {}; cast it to f32 first \
                     (Graph::cast)",
                    inputs[k]
                )),
                None => Ok(DType::F32),
            },
        }
    }

    /// How closely the GPU must match the CPU reference for this op alone.
    pub fn tolerance(&self) -> Tolerance {
        match self {
            Op::Written(op) => op.tolerance(),
            Op::MatMul(_)
            | Op::MatMulPartial(_)
            | Op::SplitKSum(_)
            | Op::RowSums(_)
            | Op::MatMulEpilogue(_)
            | Op::ReducePrologue(_)
            | Op::ImplicitGemm(_)
            | Op::ImplicitDgrad(_)
            | Op::Reduce(_)
            | Op::SumSquares(_)
            | Op::GroupStats(_)
            | Op::MergeStats(_)
            | Op::NormalizeStats(_)
            | Op::StatsOf(_)
            | Op::NormalizeBackward(_)
            | Op::GroupSums(_)
            | Op::Softmax(_)
            | Op::CrossEntropy(_)
            | Op::CrossEntropyBackward(_)
            | Op::CrossEntropyRows(_)
            | Op::LstmForward(_)
            | Op::LstmBackward(_)
            | Op::Attention(_)
            | Op::AttentionGrad(_) => TOL_REDUCTION,
            Op::GruForward(_)
            | Op::GruBackward(_)
            | Op::RnnForward(_)
            | Op::RnnBackward(_)
            | Op::EmbeddingBackward(_) => TOL_REDUCTION,
            // sums of a few terms, in another order than the reference
            Op::Im2col(_)
            | Op::Col2im(_)
            | Op::GroupedConv2d(_)
            | Op::AvgPool2d(_)
            | Op::MaxPool2dBackward(_)
            | Op::MaxPoolReluBackward(_)
            | Op::AvgPool2dBackward(_)
            | Op::AdaptiveAvgPool2d(_)
            | Op::AdaptiveAvgPool2dBackward(_)
            | Op::AdaptiveMaxPool2d(_)
            | Op::AdaptiveMaxPool2dBackward(_)
            | Op::Resize2dBackward(_)
            | Op::GatherBackward(_)
            | Op::Cumsum(_) => TOL_REDUCTION,
            _ => TOL_ELEMENTWISE,
        }
    }
}

/// Shape rule of an op taking `(N, C, from)` images to `(N, C, to)` (a resize, an adaptive
/// pooling, or their adjoints): `x`, the operand `what` names in errors ("input", "gradient"),
/// must be such images, and every extent positive.
pub(crate) fn image_to(
    op: &'static str,
    what: &str,
    x: &Shape,
    from: (usize, usize),
    to: (usize, usize),
) -> Result<Shape> {
    let d = x.dims();
    if x.rank() != 4 || (d[2], d[3]) != from {
        return Err(crate::error::shape_err(
            op,
            format!("{what} {x}: expected (N, C, {}, {})", from.0, from.1),
        ));
    }
    if [from.0, from.1, to.0, to.1].contains(&0) {
        return Err(crate::error::shape_err(
            op,
            format!(
                "{what} {x} to {}x{}: the extents must be positive",
                to.0, to.1
            ),
        ));
    }
    Ok(Shape(vec![d[0], d[1], to.0, to.1]))
}

/// Workgroups needed to cover `n` items with `per` items per workgroup.
pub(crate) fn groups(n: usize, per: usize) -> u64 {
    n.div_ceil(per) as u64
}

/// Highest rank the strided kernels (broadcasting binary ops, permute) take.
pub const MAX_RANK: usize = 6;

/// Pads `dims` and `strides` on the left to exactly [`MAX_RANK`] entries (extent 1, stride 0).
pub(crate) fn pad_left(
    dims: &[usize],
    strides: &[usize],
) -> ([usize; MAX_RANK], [usize; MAX_RANK]) {
    let mut d = [1usize; MAX_RANK];
    let mut s = [0usize; MAX_RANK];
    let off = MAX_RANK - dims.len();
    d[off..].copy_from_slice(dims);
    s[off..].copy_from_slice(strides);
    (d, s)
}
