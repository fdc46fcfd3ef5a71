//! Fused softmax cross-entropy with integer class labels (mean over the batch), as
//! `torch.nn.functional.cross_entropy(logits, labels)`, and its backward kernel. With torch's
//! `ignore_index` or `label_smoothing` ([`RowOptions`]), or another reduction, the loss is a
//! [`CrossEntropyRows`] (a loss per row) under graph ops that reduce it, and its backward takes a
//! gradient per row.
//! Kernel: `shaders/loss.wgsl`. MSE and binary cross-entropy with logits are compositions of
//! graph ops (see `Graph::mse_loss`, `Graph::bce_with_logits`).
//!
//! Small losses (a classifier's batch) take one workgroup, whose threads each fold whole rows;
//! large ones (a language model's tokens over its vocabulary: more than [`ONE_WORKGROUP_MAX`]
//! logits) run as [`CrossEntropyRows`], [`rows_threads`] threads per row, and a mean (made by
//! the plan compiler: `exec::lower::split_cross_entropy`). The backward gives each row
//! [`rows_threads`] threads too, so that a row of 50,000 classes is not one thread's loop.

use super::{groups, KernelSpec};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// `logits (N, C)`, `labels (N)` (class indices as f32) -> mean loss `(1)`. With `with_grad`
/// (made by the plan compiler, `exec::lower::gradient_with_cross_entropy`): input 2 is the
/// loss's gradient `dy (1)`, and the kernel also writes the logits' gradient past the loss, at
/// [`GRAD_OFF`], which the [`CrossEntropyBackward`] node then views.
/// `opts` may smooth the labels (`label_smoothing`), not ignore any (the mean's count is `N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropy {
    pub with_grad: bool,
    pub opts: RowOptions,
}

/// `logits (N, C)`, `labels (N)`, `dy (1)` -> `dlogits (N, C)`. With `written`: input 3 is the
/// [`CrossEntropy`] node whose kernel wrote it (a view, no kernel of its own). The backward of
/// a [`CrossEntropyRows`] has its options and reads `dy` as [`LossGrad`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropyBackward {
    pub written: bool,
    pub opts: RowOptions,
    pub dy: LossGrad,
}

/// How a cross-entropy backward reads the loss's gradient `dy` (the override `DY_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LossGrad {
    /// `dy (1)` of the mean: each row's share is `dy / N`.
    #[default]
    Mean,
    /// `dy (N)`: a share per row (the loss per row's backward).
    PerRow,
    /// `dy (1)`, every row's share (a sum's gradient, or a mean's over the rows kept, read
    /// once rather than expanded by a kernel).
    Shared,
}

/// How a loss reduces its rows (torch's `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// The mean over the rows (not ignored): `(1)`.
    #[default]
    Mean,
    /// The sum over the rows: `(1)`.
    Sum,
    /// A loss per row: `(N)`.
    None,
}

/// torch's keyword arguments of `cross_entropy` ([`Graph::cross_entropy_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CrossEntropyOpts {
    /// Rows whose label is this value add nothing to the loss or the gradient, nor to the
    /// mean's count (a padding token's id; torch's default, -100, only matters where labels
    /// hold it).
    pub ignore_index: Option<i64>,
    /// Smoothing `e` in `[0, 1]`: the target `(1 - e) onehot + e / C`.
    pub label_smoothing: f32,
    pub reduction: Reduction,
    /// Class weights `(C)` (torch's `weight`, f32): a row's loss weighs `weight[label]` (its
    /// smoothing term each class by its own), the mean divides by the kept rows' weights.
    pub weight: Option<NodeId>,
}

/// torch's `ignore_index` and `label_smoothing` for a loss per row ([`CrossEntropyRows`]):
/// a row whose label is `ignore_index` has loss 0 and gradient 0; with smoothing `e` a row's
/// loss is `(1 - e) (lse - x[label]) + e (lse - mean(x))`, the cross-entropy against the target
/// `(1 - e) onehot + e / C`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RowOptions {
    /// The label value whose rows are ignored.
    pub ignore_index: Option<i32>,
    /// `label_smoothing` as f32 bits (a hashable key).
    pub smoothing_bits: u32,
    /// Class weights (torch's `weight`): the labels input is `(N + C)`, the `N` labels then the
    /// `C` weights, and a row's loss is `(1 - e) w[y] (lse - x[y]) + e / C sum_c w[c] (lse -
    /// x[c])` (its gradient for class `j`: `p_j ((1 - e) w[y] + e W / C) - (1 - e) w[y]
    /// [j = y] - e w[j] / C`, `W` the weights' sum).
    pub weighted: bool,
}

impl RowOptions {
    /// torch's `label_smoothing`.
    pub fn smoothing(&self) -> f32 {
        f32::from_bits(self.smoothing_bits)
    }

    /// The kernels' overrides for these options.
    fn constants(&self) -> [(&'static str, f64); 4] {
        [
            ("IGNORE_ON", self.ignore_index.is_some() as u8 as f64),
            ("IGNORE", self.ignore_index.unwrap_or(0) as f64),
            ("SMOOTHING", self.smoothing() as f64),
            ("WEIGHTED", self.weighted as u8 as f64),
        ]
    }

    /// The class weights among a weighted loss's labels input (`N` labels, then them), or none.
    fn weights<'a>(&self, labels: &'a Tensor, n: usize) -> &'a [f32] {
        match self.weighted {
            true => &labels.data()[n..],
            false => &[],
        }
    }

    /// Whether the row of label `l` is ignored.
    fn ignores(&self, l: f32) -> bool {
        self.ignore_index.is_some_and(|i| l == i as f32)
    }

    /// The loss of one row in f64 from its log-sum-exp: NaN for a bad label, 0 when ignored;
    /// `w` the class weights where weighted (else empty).
    fn row_loss(&self, row: &[f32], lse: f64, label: f32, w: &[f32]) -> f64 {
        if self.ignores(label) {
            return 0.0;
        }
        let Some(k) = class_of(label, row.len()) else {
            return f64::NAN;
        };
        let e = self.smoothing() as f64;
        if !w.is_empty() {
            let c = row.len() as f64;
            let all: f64 = (0..row.len())
                .map(|j| w[j] as f64 * (lse - row[j] as f64))
                .sum();
            return (1.0 - e) * w[k] as f64 * (lse - row[k] as f64) + e / c * all;
        }
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
        (1.0 - e) * (lse - row[k] as f64) + e * (lse - mean)
    }
}

/// Where the one-workgroup loss kernel that also computes the gradient writes it past the
/// loss: an aligned offset, so that the gradient is a view every adapter binds.
pub const GRAD_OFF: usize = super::layout::VIEW_ALIGN;

/// Logits of the losses whose one workgroup also computes their gradient (beyond them the
/// gradient's own kernel, over the whole GPU, is faster than a dispatch saved).
pub const WITH_GRAD_MAX: usize = 1 << 14;

/// Each row's cross-entropy loss: `logits (N, C)`, `labels (N)` -> `(N)` (made by the plan
/// compiler from a [`CrossEntropy`] too large for one workgroup; a mean follows). With
/// `with_grad` (made by the plan compiler, `exec::lower::gradient_with_cross_entropy`): input
/// 2 is the loss's gradient `dy (1)`, and the kernel also writes the logits' gradient (f32)
/// past the losses, at [`grad_offset`]`(N)`, which the [`CrossEntropyBackward`] node views:
/// each row read twice (its statistics, its gradient), where the two kernels read it three
/// times.
/// Built by [`Graph::cross_entropy_with`] for torch's options ([`RowOptions`]; never
/// `with_grad` then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropyRows {
    pub with_grad: bool,
    pub opts: RowOptions,
    /// With `with_grad`: how the kernel reads the loss's gradient `dy`, as the backward whose
    /// gradient it computes would ([`CrossEntropyBackward::dy`]: a mean's, a sum's or a mean
    /// over the kept rows' one value, or one per row).
    pub dy: LossGrad,
}

/// Where a loss kernel that also computes the gradient writes it past `loss_len` losses (one
/// mean, or a loss per row): the next aligned offset, so that the gradient is a view.
pub fn grad_offset(loss_len: usize) -> usize {
    loss_len.next_multiple_of(super::layout::VIEW_ALIGN)
}

/// Logits that the one-workgroup [`CrossEntropy`] kernel takes: beyond them the loss runs
/// a row per few threads over the whole GPU ([`CrossEntropyRows`]), then a mean.
pub const ONE_WORKGROUP_MAX: usize = 1 << 18;

/// Threads per row of the row kernels (the rows variant of the backward, [`CrossEntropyRows`]):
/// about 8 classes each, a power of two up to a workgroup (256).
pub fn rows_threads(classes: usize) -> usize {
    classes.div_ceil(8).next_power_of_two().clamp(1, 256)
}

/// The row kernels' overrides and grid for `logits (N, C)`.
fn rows_kernel(entry: &'static str, logits: &Shape) -> KernelSpec {
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    let tpr = rows_threads(c);
    KernelSpec {
        family: "loss",
        entry,
        constants: vec![("N", n as f64), ("C", c as f64), ("TPR", tpr as f64)],
        workgroups: groups(n * tpr, 256),
    }
}

/// Adds the overrides of a loss per row's options and of how its gradient reads `dy`, where
/// they are not the plain loss's (whose kernels stay the pipelines they were).
fn with_options(mut k: KernelSpec, opts: RowOptions, dy: LossGrad) -> KernelSpec {
    if opts != RowOptions::default() {
        k.constants.extend(opts.constants());
    }
    match dy {
        LossGrad::Mean => {}
        LossGrad::PerRow => k.constants.push(("DY_MODE", 1.0)),
        LossGrad::Shared => k.constants.push(("DY_MODE", 2.0)),
    }
    k
}

/// The loss of each row in f64: `lse - logit[label]`, NaN for a bad label (with options: as
/// [`RowOptions`] says).
fn row_losses(logits: &Tensor, labels: &Tensor, opts: RowOptions) -> Vec<f64> {
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    (0..n)
        .map(|i| {
            let row = &logits.data()[i * c..(i + 1) * c];
            let m = row
                .iter()
                .map(|&v| v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            opts.row_loss(row, lse, labels.data()[i], opts.weights(labels, n))
        })
        .collect()
}

impl CrossEntropyRows {
    /// CPU reference in f64.
    pub fn cpu(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        let data = row_losses(logits, labels, self.opts)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Tensor::new([logits.dims()[0]], data).expect("a loss per row")
    }

    /// Kernel: [`rows_threads`] threads per row (`cross_entropy_rows`, or with the gradient
    /// `cross_entropy_rows_with_grad`).
    pub fn kernel(&self, logits: &Shape) -> KernelSpec {
        let k = match self.with_grad {
            false => rows_kernel("cross_entropy_rows", logits),
            true => {
                let mut k = rows_kernel("cross_entropy_rows_with_grad", logits);
                k.constants
                    .push(("GRAD_OFF", grad_offset(logits.dims()[0]) as f64));
                k
            }
        };
        // (the options shape the gradient it computes with them too)
        with_options(k, self.opts, self.dy)
    }

    /// Elements its kernel writes past the losses: the gradient at [`grad_offset`], with it.
    pub fn scratch(&self, logits: &Shape) -> usize {
        let n = logits.dims()[0];
        match self.with_grad {
            true => grad_offset(n) - n + logits.numel(),
            false => 0,
        }
    }

    /// Backward: the logits' gradient from a gradient per row; labels take none.
    pub fn backward(
        &self,
        g: &Graph,
        logits: NodeId,
        labels: NodeId,
        dy: NodeId,
    ) -> Result<[Option<NodeId>; 2]> {
        // a sum's or a mean's gradient is one value for every row: read once rather than
        // expanded (and divided) by a kernel
        let n = g.shape(logits).dims()[0] as f32;
        let (dy, mode) = match g.expanded_scalar(dy) {
            Some((s, 1.0)) => (s, LossGrad::Shared),
            Some((s, d)) if d == n => (s, LossGrad::Mean),
            _ => (dy, LossGrad::PerRow),
        };
        let backward = CrossEntropyBackward {
            written: false,
            opts: self.opts,
            dy: mode,
        };
        Ok([
            Some(g.push_op(
                super::Op::CrossEntropyBackward(backward),
                vec![logits, labels, dy],
                g.shape(logits),
            )?),
            None,
        ])
    }
}

/// The class of label `l`, or `None` if it is not an integer in `[0, c)` (the loss is then NaN).
fn class_of(l: f32, c: usize) -> Option<usize> {
    (l >= 0.0 && (l as usize) < c && l.fract() == 0.0).then_some(l as usize)
}

impl CrossEntropy {
    /// Shape rule.
    pub fn infer(logits: &Shape, labels: &Shape) -> Result<Shape> {
        if logits.rank() != 2 || labels.rank() != 1 || labels.dims()[0] != logits.dims()[0] {
            return Err(shape_err(
                "cross_entropy",
                format!(
                    "logits {logits} and labels {labels}: expected logits (N, C) and labels (N)"
                ),
            ));
        }
        Ok(Shape(vec![1]))
    }

    /// CPU reference in f64.
    pub fn cpu(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        let losses = row_losses(logits, labels, self.opts);
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        Tensor::new([1], vec![mean as f32]).expect("scalar")
    }

    /// Kernel: one workgroup for the whole batch (`cross_entropy`, or with the gradient
    /// `cross_entropy_with_grad`).
    pub fn kernel(&self, logits: &Shape) -> KernelSpec {
        let mut constants = vec![
            ("N", logits.dims()[0] as f64),
            ("C", logits.dims()[1] as f64),
        ];
        if self.with_grad {
            constants.push(("GRAD_OFF", GRAD_OFF as f64));
        }
        if self.opts != RowOptions::default() {
            constants.extend(self.opts.constants());
        }
        KernelSpec {
            family: "loss",
            entry: if self.with_grad {
                "cross_entropy_with_grad"
            } else {
                "cross_entropy"
            },
            constants,
            workgroups: 1,
        }
    }

    /// Elements its kernel writes past the loss: the gradient at [`GRAD_OFF`], with it.
    pub fn scratch(&self, logits: &Shape) -> usize {
        match self.with_grad {
            true => GRAD_OFF - 1 + logits.numel(),
            false => 0,
        }
    }

    /// Backward: the fused gradient kernel for the logits; labels take none.
    pub fn backward(
        &self,
        g: &Graph,
        logits: NodeId,
        labels: NodeId,
        dy: NodeId,
    ) -> Result<[Option<NodeId>; 2]> {
        let shape = g.shape(logits);
        Ok([
            Some(g.push_op(
                super::Op::CrossEntropyBackward(CrossEntropyBackward {
                    opts: self.opts,
                    ..Default::default()
                }),
                vec![logits, labels, dy],
                shape,
            )?),
            None,
        ])
    }
}

impl CrossEntropyBackward {
    /// CPU reference in f64.
    pub fn cpu(&self, logits: &Tensor, labels: &Tensor, dy: &Tensor) -> Tensor {
        let (n, c) = (logits.dims()[0], logits.dims()[1]);
        let opts = self.opts;
        let (e, mut out) = (opts.smoothing() as f64, vec![0f32; n * c]);
        let w = opts.weights(labels, n);
        let weight = |j: usize| w.get(j).map_or(1.0, |&v| v as f64);
        let total: f64 = (0..c).map(weight).sum();
        for i in 0..n {
            let row: Vec<f64> = logits.data()[i * c..(i + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            let scale = match self.dy {
                LossGrad::PerRow => dy.data()[i] as f64,
                LossGrad::Shared => dy.data()[0] as f64,
                LossGrad::Mean => dy.data()[0] as f64 / n as f64,
            };
            if opts.ignores(labels.data()[i]) {
                continue;
            }
            let k = class_of(labels.data()[i], c);
            // unweighted: p - ((1 - e) onehot + e / C)
            let wy = k.map_or(1.0, weight);
            let coef = (1.0 - e) * wy + e * total / c as f64;
            for j in 0..c {
                let p = (row[j] - m).exp() / s;
                let onehot = if Some(j) == k { 1.0 } else { 0.0 };
                let target = (1.0 - e) * wy * onehot + e * weight(j) / c as f64;
                out[i * c + j] = if k.is_some() {
                    ((p * coef - target) * scale) as f32
                } else {
                    f32::NAN
                };
            }
        }
        Tensor::new(logits.shape().clone(), out).expect("logits shape")
    }

    /// Kernel: one thread per row.
    pub fn kernel(&self, logits: &Shape) -> KernelSpec {
        // rows of up to 16 classes: a thread each; longer ones: rows_threads per row
        if logits.dims()[1] > 16 {
            let k = rows_kernel("cross_entropy_backward_rows", logits);
            return with_options(k, self.opts, self.dy);
        }
        let k = KernelSpec {
            family: "loss",
            entry: "cross_entropy_backward",
            constants: vec![
                ("N", logits.dims()[0] as f64),
                ("C", logits.dims()[1] as f64),
            ],
            workgroups: groups(logits.dims()[0], 256),
        };
        with_options(k, self.opts, self.dy)
    }
}
