//! Fused softmax cross-entropy with integer class labels (mean over the batch), as
//! `torch.nn.functional.cross_entropy(logits, labels)`, and its backward kernel.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropy {
    pub with_grad: bool,
}

/// `logits (N, C)`, `labels (N)`, `dy (1)` -> `dlogits (N, C)`. With `written`: input 3 is the
/// [`CrossEntropy`] node whose kernel wrote it (a view, no kernel of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropyBackward {
    pub written: bool,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CrossEntropyRows {
    pub with_grad: bool,
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

/// The loss of each row in f64: `lse - logit[label]`, NaN for a bad label.
fn row_losses(logits: &Tensor, labels: &Tensor) -> Vec<f64> {
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    (0..n)
        .map(|i| {
            let row = &logits.data()[i * c..(i + 1) * c];
            let m = row
                .iter()
                .map(|&v| v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            match class_of(labels.data()[i], c) {
                Some(k) => lse - row[k] as f64,
                None => f64::NAN,
            }
        })
        .collect()
}

impl CrossEntropyRows {
    /// CPU reference in f64.
    pub fn cpu(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        let data = row_losses(logits, labels)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        Tensor::new([logits.dims()[0]], data).expect("a loss per row")
    }

    /// Kernel: [`rows_threads`] threads per row (`cross_entropy_rows`, or with the gradient
    /// `cross_entropy_rows_with_grad`).
    pub fn kernel(&self, logits: &Shape) -> KernelSpec {
        if !self.with_grad {
            return rows_kernel("cross_entropy_rows", logits);
        }
        let mut k = rows_kernel("cross_entropy_rows_with_grad", logits);
        k.constants
            .push(("GRAD_OFF", grad_offset(logits.dims()[0]) as f64));
        k
    }

    /// Elements its kernel writes past the losses: the gradient at [`grad_offset`], with it.
    pub fn scratch(&self, logits: &Shape) -> usize {
        let n = logits.dims()[0];
        match self.with_grad {
            true => grad_offset(n) - n + logits.numel(),
            false => 0,
        }
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
        let losses = row_losses(logits, labels);
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
                super::Op::CrossEntropyBackward(CrossEntropyBackward::default()),
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
        let scale = dy.data()[0] as f64 / n as f64;
        let mut out = vec![0f32; n * c];
        for i in 0..n {
            let row: Vec<f64> = logits.data()[i * c..(i + 1) * c]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            let k = class_of(labels.data()[i], c);
            for j in 0..c {
                let p = (row[j] - m).exp() / s;
                let onehot = if Some(j) == k { 1.0 } else { 0.0 };
                out[i * c + j] = if k.is_some() {
                    ((p - onehot) * scale) as f32
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
            return rows_kernel("cross_entropy_backward_rows", logits);
        }
        KernelSpec {
            family: "loss",
            entry: "cross_entropy_backward",
            constants: vec![
                ("N", logits.dims()[0] as f64),
                ("C", logits.dims()[1] as f64),
            ],
            workgroups: groups(logits.dims()[0], 256),
        }
    }
}
