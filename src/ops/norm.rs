//! Batch, layer and group normalization, as `torch.nn.functional.batch_norm`, `layer_norm` and
//! `group_norm` (instance normalization is the last with a group per channel).
//! Kernels: `shaders/norm.wgsl`.
//!
//! Both view their input as `(OUTER, GROUPS, INNER)` and normalize each group (a batch norm's
//! channel of `(N, C, S)`, a layer norm's row of `(1, R, D)`) with its own statistics:
//! [`GroupStats`] (mean and biased variance, two passes over the group, a few threads per
//! small group and a workgroup per large one: [`threads_per_group`]) and [`Normalize`] (`xhat = (x - mean) / sqrt(var + eps)`, elementwise; PyTorch's
//! training-mode gradient through the group's own statistics).
//!
//! - Batch norm (training): the per-channel scale and shift are inside `Normalize`; its
//!   backward is [`GroupSums`] (per channel `sum(dy)` and `sum(dy xhat)`: the bias's and the
//!   weight's gradients) and an elementwise input gradient. [`RunningUpdate`] moves both
//!   running statistics in place in one kernel, which the plan compiler folds into the kernel
//!   that computes the statistics. Forward 2 kernels (statistics, normalization; channels of
//!   more than 16,384 elements: statistics per block of 8,192 and their [`MergeStats`], 3),
//!   backward 2; the sums' rows are padded ([`sums_row`]) so that both
//!   parameters' gradients are views of them. Composed from graph ops the step took about
//!   five times the dispatches. In evaluation it is elementwise, `(x - running_mean) / sqrt(running_var + eps)
//!   * weight + bias`: one fused kernel with what follows.
//! - Layer norm: the per-feature scale and shift are inside `Normalize` too (indexed by the
//!   INNER position); its backward is [`GroupSums`] per feature (column sums of `dy` and `dy
//!   xhat`: the bias's and the weight's gradients, one kernel) and the weighted
//!   [`NormalizeBackward`] (`dxhat = dy * weight` inside the per-row reduction). Forward 2
//!   kernels, backward 2; as broadcast graph ops the scale and shift took a kernel forward
//!   and three backward. The column sums take a thread per feature and 4 lanes over the rows,
//!   in blocks of 512 rows beyond 1,024 (the plan compiler's split, then a sum).
//! - Group norm: scale and shift are broadcast graph ops in the input's own shape (fused with
//!   what follows, a relu), and `Normalize`'s backward is one kernel per group
//!   ([`NormalizeBackward`]): `rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`.
//!
//! f16 tensors are read and written as stored (the kernels' f16 variants, `norm_f16`, from the
//! storage block of `shaders/norm.wgsl`) and everything is computed in f32; statistics, sums,
//! weights and running averages stay f32 (as cuDNN's batch norm under `torch.autocast`), the
//! output and the input's gradient follow the input's type.
//!
//! One workgroup per group is PyTorch's classic NCHW layout too; a few large groups (a batch
//! norm of 64 channels over (64, 56, 56)) would leave most of a big GPU idle, so the plan
//! compiler splits their statistics and parameter gradients into blocks
//! (`exec::lower::split_group_reductions`: 64 workgroups become 1,600; untimed: no GPU yet).
//!
//! Batch normalization of `x (N, C, *)` over every axis but 1:
//!
//! ```text
//! mean = mean(x)   var = mean((x - mean)^2)   (biased, per channel)
//! y = (x - mean) / sqrt(var + eps) * weight + bias
//! training: running_mean = (1 - momentum) running_mean + momentum mean
//!           running_var  = (1 - momentum) running_var  + momentum var n / (n - 1)   (n = N * |*|)
//! evaluation: mean and var are the running ones
//! ```
//!
//! Layer normalization of `x (*, D1 .. Dk)` over its last `k` axes, per leading index, with
//! `weight` and `bias` of shape `(D1 .. Dk)`. Group normalization of `x (N, C, *)` per sample and
//! group of `C / G` channels (`(1, N G, C / G * |*|)`), with per-channel `weight` and `bias`;
//! instance normalization is `G = C`.

use super::{groups, KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{DType, Shape, Tensor};

/// In-place exponential moving averages of one or two parameters (`running_0`, `running_1`,
/// each `(C)`) towards the rows of `value` (`(C)` for one, `(2, C)` for two):
/// `running_j = (1 - momentum) * running_j + momentum * scales[j] * value[j]`. Inputs
/// `[value, running_0, (running_1)]`, the parameters (f32) written in place; the node's value is
/// `running_0` (no buffer of its own). A batch norm moves its running mean (scale 1) and
/// running variance (scale `n / (n - 1)`: PyTorch keeps the unbiased one) from its
/// [`GroupStats`] in one kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningUpdate {
    pub momentum: f32,
    /// Parameters moved: 1 or 2.
    pub rows: usize,
    pub scales: [f32; 2],
}

impl RunningUpdate {
    /// CPU reference in f32, the kernel's arithmetic in its order: the new value of each
    /// parameter.
    pub fn cpu(&self, value: &Tensor, running: &[&Tensor]) -> Vec<Tensor> {
        let m = self.momentum;
        running
            .iter()
            .enumerate()
            .map(|(j, r)| {
                let c = r.numel();
                let row = &value.data()[j * c..(j + 1) * c];
                let data = r
                    .data()
                    .iter()
                    .zip(row)
                    .map(|(&r, &v)| (1.0 - m) * r + m * (self.scales[j] * v))
                    .collect();
                Tensor::new(r.shape().clone(), data).expect("same shape")
            })
            .collect()
    }

    /// Kernel: one thread per element of a parameter, each updating every row.
    pub fn kernel(&self, c: usize) -> KernelSpec {
        let mut constants = vec![("N", c as f64)];
        constants.extend(self.constants());
        KernelSpec {
            family: "norm",
            entry: if self.rows == 2 {
                "running_update2"
            } else {
                "running_update"
            },
            constants,
            workgroups: groups(c, 256),
        }
    }

    /// The update's override constants (shared with the statistics kernels that make it).
    fn constants(&self) -> [(&'static str, f64); 3] {
        [
            ("MOMENTUM", self.momentum as f64),
            ("SCALE0", self.scales[0] as f64),
            ("SCALE1", self.scales[1] as f64),
        ]
    }
}

/// Adds the running averages of `running` (1 or 2 parameter nodes of one shape `(C)`) towards
/// the rows of `value` (`(C)`, or `(2, C)` for two) to `g`, run in place by every plan that
/// computes `value` (see [`Graph::running_update`]).
pub(crate) fn running_update(
    g: &Graph,
    running: &[NodeId],
    value: NodeId,
    momentum: f32,
    scales: &[f32],
) -> Result<NodeId> {
    const OP: &str = "running_update";
    let vs = g.check_id(OP, value)?;
    if running.is_empty() || running.len() > 2 || scales.len() != running.len() {
        return Err(shape_err(
            OP,
            format!(
                "one or two running tensors with a scale each, got {} and {} scales",
                running.len(),
                scales.len()
            ),
        ));
    }
    let rs = g.check_id(OP, running[0])?;
    for &r in running {
        if !g.is_param(r) {
            return Err(shape_err(OP, "the running tensors must be parameter nodes"));
        }
        let s = g.check_id(OP, r)?;
        if s != rs {
            return Err(shape_err(
                OP,
                format!("running tensors {rs} and {s} differ"),
            ));
        }
    }
    let want = if running.len() == 1 {
        rs.clone()
    } else {
        Shape::from(vec![2, rs.numel()])
    };
    if vs != want && !(running.len() == 1 && vs.numel() == rs.numel() && vs.rank() == 1) {
        return Err(shape_err(
            OP,
            format!(
                "value {vs} for {} running tensor(s) {rs}: it must be {want}",
                running.len()
            ),
        ));
    }
    if !(0.0..=1.0).contains(&momentum) {
        return Err(shape_err(
            OP,
            format!("momentum must be in [0, 1], got {momentum}"),
        ));
    }
    let mut sc = [1.0f32; 2];
    sc[..scales.len()].copy_from_slice(scales);
    let mut inputs = vec![value];
    inputs.extend_from_slice(running);
    let id = g.push_op(
        Op::RunningUpdate(RunningUpdate {
            momentum,
            rows: running.len(),
            scales: sc,
        }),
        inputs,
        rs,
    )?;
    g.register_update(id);
    Ok(id)
}

/// Each group's mean and biased variance (divided by the group's size, from the squared
/// deviations: two passes) of `x (OUTER, GROUPS, INNER)`: output `(2, GROUPS)`, the means in
/// row 0 and the variances in row 1. With `blocks > 1` (made by the plan compiler,
/// `exec::lower::split_group_stats`): the mean and biased variance of each of `blocks` blocks
/// of [`GroupStats::block_len`] elements of every group, `(blocks, 2, GROUPS)`, for
/// [`MergeStats`] to combine. With `running` (whole groups only, made by the plan compiler,
/// `exec::lower::running_update_in_stats`): inputs `[x, running_0, running_1]`, and the kernel
/// also moves both running statistics towards the ones it computed, in place, as that
/// [`RunningUpdate`] (two rows) would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupStats {
    pub blocks: usize,
    pub running: Option<RunningUpdate>,
}

/// Elements of each group that one block of `group_stats` takes where the plan compiler splits
/// them: beyond twice this many, a batch norm's channels (a workgroup each) would be too few
/// workgroups for a large GPU (64 channels of `(64, 56, 56)`: 64 workgroups, split 1,600).
pub const GROUP_STATS_BLOCK_LEN: usize = 8192;

/// Combines the per-block means and variances of a split [`GroupStats`] (`(BLOCKS, 2,
/// GROUPS)`, blocks of `ceil(count / BLOCKS)` elements, the last shorter) into each group's
/// mean and biased variance over its `count` elements, `(2, GROUPS)`, as Chan et al.'s
/// pairwise update: `mean = sum(n_b mean_b) / n`, `var = sum(n_b (var_b + (mean_b - mean)^2)) /
/// n`; the squared deviations stay measured from each block's own mean, so no large sums of
/// squares cancel. With `running`, inputs `[partial, running_0, running_1]` and the running
/// statistics move in place as in [`GroupStats`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeStats {
    /// Elements of each group (`OUTER * INNER`).
    pub count: usize,
    pub running: Option<RunningUpdate>,
}

impl MergeStats {
    /// Elements of block `b` of `blocks`.
    fn block_count(&self, blocks: usize, b: usize) -> usize {
        let len = self.count.div_ceil(blocks);
        self.count.saturating_sub(b * len).min(len)
    }

    /// CPU reference in f64 from the blocks' f32 statistics `(BLOCKS, 2, GROUPS)`.
    pub fn cpu(&self, partial: &Tensor) -> Tensor {
        let (blocks, groups) = (partial.dims()[0], partial.dims()[2]);
        let p = partial.data();
        let n = self.count as f64;
        let mut data = vec![0f32; 2 * groups];
        for g in 0..groups {
            let nb = |b: usize| self.block_count(blocks, b) as f64;
            let mean = (0..blocks)
                .map(|b| nb(b) * p[b * 2 * groups + g] as f64)
                .sum::<f64>()
                / n;
            let m2 = (0..blocks)
                .map(|b| {
                    let d = p[b * 2 * groups + g] as f64 - mean;
                    nb(b) * (p[(b * 2 + 1) * groups + g] as f64 + d * d)
                })
                .sum::<f64>();
            data[g] = mean as f32;
            data[groups + g] = (m2 / n) as f32;
        }
        Tensor::new([2, groups], data).expect("two rows of one value per group")
    }

    /// Kernel: one thread per group, each over the blocks; `partial` is `(BLOCKS, 2, GROUPS)`.
    pub fn kernel(&self, partial: &Shape) -> KernelSpec {
        let (blocks, groups) = (partial.dims()[0], partial.dims()[2]);
        let mut constants = vec![
            ("GROUPS", groups as f64),
            ("BLOCKS", blocks as f64),
            ("BLOCK_LEN", self.count.div_ceil(blocks) as f64),
            ("N", self.count as f64),
        ];
        constants.extend(self.running.iter().flat_map(|r| r.constants()));
        KernelSpec {
            family: "norm",
            entry: match self.running {
                Some(_) => "merge_stats_running",
                None => "merge_stats",
            },
            constants,
            workgroups: super::groups(groups, 256),
        }
    }
}

/// How a `norm.wgsl` kernel covers its tensor.
enum Grid {
    /// [`threads_per_group`] threads per group (reductions).
    PerGroup,
    /// One thread per element.
    PerElement,
}

/// A `norm.wgsl` kernel over a tensor `x (OUTER, GROUPS, INNER)`: the view's extents (and
/// `eps`) as override constants.
fn group_kernel(entry: &'static str, x: &Shape, eps: Option<f32>, grid: Grid) -> KernelSpec {
    let (outer, groups, inner) = split3(x);
    let mut constants = vec![
        ("OUTER", outer as f64),
        ("GROUPS", groups as f64),
        ("INNER", inner as f64),
    ];
    constants.extend(eps.map(|e| ("EPS", e as f64)));
    let workgroups = match grid {
        Grid::PerGroup => {
            let tpg = threads_per_group(outer * inner);
            constants.push(("TPG", tpg as f64));
            super::groups(groups * tpg, 256)
        }
        Grid::PerElement => super::groups(x.numel(), 256),
    };
    KernelSpec {
        family: "norm",
        entry,
        constants,
        workgroups,
    }
}

/// Threads that reduce a group of `count` elements: about 4 elements each, a power of two up
/// to the whole workgroup (256). A layer norm's row of 64 takes 16 threads (16 rows per
/// workgroup), not a workgroup whose threads mostly idle through its barriers; a batch norm's
/// channel takes all 256.
pub fn threads_per_group(count: usize) -> usize {
    count.div_ceil(4).next_power_of_two().clamp(1, 256)
}

/// `(outer, groups, inner)` of a rank-3 shape.
fn split3(s: &Shape) -> (usize, usize, usize) {
    let d = s.dims();
    (d[0], d[1], d[2])
}

/// The values of group `g` of a `(OUTER, GROUPS, INNER)` tensor with their indices, as f64.
fn group(t: &Tensor, g: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
    let (outer, groups, inner) = split3(t.shape());
    (0..outer).flat_map(move |o| {
        (0..inner).map(move |i| {
            let k = (o * groups + g) * inner + i;
            (k, t.data()[k] as f64)
        })
    })
}

/// `1 / sqrt(var + eps)` in f64.
fn rstd(var: f32, eps: f32) -> f64 {
    1.0 / (var as f64 + eps as f64).sqrt()
}

impl GroupStats {
    /// The statistics of whole groups, `(2, GROUPS)`, as the graph builds them.
    pub const WHOLE: GroupStats = GroupStats {
        blocks: 1,
        running: None,
    };

    /// Elements of each group that one block takes (the last block's may be fewer).
    pub fn block_len(&self, x: &Shape) -> usize {
        let (outer, _, inner) = split3(x);
        (outer * inner).div_ceil(self.blocks.max(1))
    }

    /// CPU reference in f64 (each block's statistics where `blocks > 1`).
    pub fn cpu(&self, x: &Tensor) -> Tensor {
        let groups = x.dims()[1];
        let blocks = self.blocks.max(1);
        let len = self.block_len(x.shape());
        let mut data = vec![0f32; blocks * 2 * groups];
        for g in 0..groups {
            let values: Vec<f64> = group(x, g).map(|(_, v)| v).collect();
            for (b, block) in values.chunks(len).enumerate() {
                let n = block.len() as f64;
                let mean = block.iter().sum::<f64>() / n;
                let var = block.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                data[b * 2 * groups + g] = mean as f32;
                data[(b * 2 + 1) * groups + g] = var as f32;
            }
        }
        let shape = match blocks {
            1 => vec![2, groups],
            b => vec![b, 2, groups],
        };
        Tensor::new(shape, data).expect("two rows of one value per group and block")
    }

    /// Kernel: [`threads_per_group`] threads per group (and block).
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        if let Some(r) = self.running {
            let mut k = group_kernel("group_stats_running", x, None, Grid::PerGroup);
            k.constants.extend(r.constants());
            return k;
        }
        if self.blocks <= 1 {
            return group_kernel("group_stats", x, None, Grid::PerGroup);
        }
        let len = self.block_len(x);
        let mut k = group_kernel("group_stats", x, None, Grid::PerGroup);
        let tpg = threads_per_group(len);
        let groups = split3(x).1;
        if let Some(c) = k.constants.iter_mut().find(|c| c.0 == "TPG") {
            c.1 = tpg as f64;
        }
        k.workgroups = super::groups(groups * tpg, 256) * self.blocks as u64;
        k.constants.push(("BLOCKS", self.blocks as f64));
        k.constants.push(("BLOCK_LEN", len as f64));
        k
    }

    /// Backward: the mean spreads `dmean / n` over its group, the variance gives
    /// `dvar 2 (x - mean) / n`; `stats` is the node's output.
    pub fn backward(&self, g: &Graph, x: NodeId, stats: NodeId, dy: NodeId) -> Result<NodeId> {
        let shape = g.shape(x);
        let (outer, groups, inner) = split3(&shape);
        let n = (outer * inner) as f32;
        let row = |t: NodeId, k: usize| -> Result<NodeId> {
            g.reshape(g.narrow(t, 0, k, 1)?, &[1, groups as isize, 1])
        };
        let dmean = g.expand(g.mul_scalar(row(dy, 0)?, 1.0 / n)?, &shape)?;
        // in f32 (the statistics' type), the result in x's
        let centered = g.sub(g.cast(x, DType::F32)?, row(stats, 0)?)?;
        let dvar = g.mul(centered, g.mul_scalar(row(dy, 1)?, 2.0 / n)?)?;
        g.cast(g.add(dmean, dvar)?, g.dtype(x))
    }
}

/// Where `Op::NormalizeStats` writes the statistics `(2, GROUPS)` past its `numel` results: the
/// next multiple of [`VIEW_ALIGN`](super::layout::VIEW_ALIGN) elements, so that they are a
/// view at an aligned offset (`Op::StatsOf`).
pub fn stats_offset(numel: usize) -> usize {
    numel.next_multiple_of(super::layout::VIEW_ALIGN)
}

/// Whether a normalization of `x (OUTER, GROUPS, INNER)` computes its statistics inside its own
/// kernel (`Op::NormalizeStats`, made by the plan compiler): groups of at most 4096 elements
/// (a layer norm's rows), whose [`threads_per_group`] threads then also normalize them, at most
/// 16 elements each. Larger groups (a batch norm's channels) keep one thread per element.
pub fn stats_inside(x: &Shape) -> bool {
    let (outer, _, inner) = split3(x);
    outer * inner <= 4096
}

/// A [`Normalize`] of small groups that computes their statistics itself and, with `stats`,
/// writes them past its output, at [`stats_offset`] (made by the plan compiler,
/// `exec::lower::stats_inside_normalization`; `Op::StatsOf` views them): inputs `[x, (weight,
/// bias)]`. With `running` (affine only, `exec::lower::running_update_in_stats`): also
/// `[running_0, running_1]`, moved in place towards the statistics as that [`RunningUpdate`]
/// (two rows) would.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizeStats {
    pub norm: Normalize,
    pub running: Option<RunningUpdate>,
    /// The statistics are written past the output for `Op::StatsOf` to view; without, nothing
    /// else reads them (inference) and they stay in the kernel, so the output may be f16
    /// (f32 statistics cannot follow f16 elements in one binding).
    pub stats: bool,
}

impl NormalizeStats {
    /// CPU reference in f64 (the output; the statistics are `Op::StatsOf`'s).
    pub fn cpu(&self, inputs: &[&Tensor]) -> Tensor {
        let stats = GroupStats::WHOLE.cpu(inputs[0]);
        let affine = self.norm.affine.then(|| (inputs[1], inputs[2]));
        self.norm.cpu(inputs[0], &stats, affine)
    }

    /// Kernel: [`threads_per_group`] threads per group, which compute the group's statistics,
    /// write them at [`stats_offset`] past the output (with `stats`) and normalize its
    /// elements.
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let entry = match (self.norm.affine, self.running.is_some()) {
            (true, true) => "stats_normalize_affine_running",
            (true, false) => "stats_normalize_affine",
            (false, _) => "stats_normalize",
        };
        let mut k = group_kernel(entry, x, Some(self.norm.eps), Grid::PerGroup);
        if self.stats {
            k.constants
                .push(("STATS_OFF", stats_offset(x.numel()) as f64));
        } else {
            k.constants.push(("WRITE_STATS", 0.0));
        }
        if self.norm.affine && self.norm.inner {
            k.constants.push(("AFFINE_INNER", 1.0));
        }
        if self.norm.relu {
            k.constants.push(("RELU", 1.0));
        }
        k.constants
            .extend(self.running.iter().flat_map(|r| r.constants()));
        k
    }
}

/// `xhat = (x - mean[g]) / sqrt(var[g] + eps)` of `x (OUTER, GROUPS, INNER)` with `stats`
/// `(2, GROUPS)` that are `x`'s own [`GroupStats`]; with `affine`, `y = xhat * weight[g] +
/// bias[g]` (inputs `[x, stats, weight, bias]`, each `(GROUPS)`: a batch norm's per-channel
/// scale and shift), or with `inner` too `y = xhat * weight[i] + bias[i]` by the element's
/// INNER position `i` (each `(INNER)`: a layer norm's per-feature scale and shift). Its
/// backward differentiates through the statistics (the gradient for `x` includes their
/// dependence on `x`) and gives none to `stats`. Built by [`batch_norm`] (training),
/// [`layer_norm`] and [`group_norm`] only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalize {
    pub eps: f32,
    pub affine: bool,
    /// The affine parameters index the INNER position, not the group.
    pub inner: bool,
    /// A relu after it, in the same kernel (made by the plan compiler:
    /// `exec::lower::relu_into_normalize`, a batch norm's conv-BN-ReLU).
    pub relu: bool,
}

impl Normalize {
    /// CPU reference in f64; `affine` is `Some((weight, bias))` for the affine form.
    pub fn cpu(&self, x: &Tensor, stats: &Tensor, affine: Option<(&Tensor, &Tensor)>) -> Tensor {
        let (_, groups, inner) = split3(x.shape());
        let data = x
            .data()
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                let g = (k / inner) % groups;
                let r = rstd(stats.data()[groups + g], self.eps);
                let xhat = (v as f64 - stats.data()[g] as f64) * r;
                let a = if self.inner { k % inner } else { g };
                let y = match affine {
                    Some((w, b)) => (xhat * w.data()[a] as f64 + b.data()[a] as f64) as f32,
                    None => xhat as f32,
                };
                if self.relu {
                    y.max(0.0)
                } else {
                    y
                }
            })
            .collect();
        Tensor::new(x.shape().clone(), data).expect("same shape")
    }

    /// Kernel: one thread per element.
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let mut k = group_kernel(
            if self.affine {
                "normalize_affine"
            } else {
                "normalize"
            },
            x,
            Some(self.eps),
            Grid::PerElement,
        );
        if self.affine && self.inner {
            k.constants.push(("AFFINE_INNER", 1.0));
        }
        if self.relu {
            k.constants.push(("RELU", 1.0));
        }
        k
    }

    /// Backward. Without affine: [`NormalizeBackward`] of `dy`, the output `xhat` and the
    /// statistics, for `x`. With: [`GroupSums`] of `dy` and `xhat` (recomputed from `x`) per
    /// group, which are the bias's and the weight's gradients, then
    /// `Op::NormalizeAffineBackward` ([`NormalizeBackward::affine_cpu`]) for `x`,
    /// elementwise. With `inner`: [`GroupSums`] per INNER position (the parameters'
    /// gradients) and the weighted [`NormalizeBackward`] for `x` (its reductions per group
    /// need `dy * weight`, not sums the parameters' gradients share). None for the statistics
    /// (their dependence on `x` is in the gradient for `x`).
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        y: NodeId,
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        let shape = g.shape(y);
        if !self.affine {
            let op = NormalizeBackward {
                eps: self.eps,
                weighted: false,
                residual: false,
                channels_first: false,
                sums: false,
            };
            let dx = g.push_op(Op::NormalizeBackward(op), vec![dy, y, x[1]], shape)?;
            return Ok(vec![Some(dx), None]);
        }
        let (groups, inner) = (shape.dims()[1], shape.dims()[2]);
        let per = if self.inner { inner } else { groups };
        let sums = g.push_op(
            Op::GroupSums(GroupSums {
                eps: self.eps,
                inner: self.inner,
                blocks: 1,
            }),
            vec![dy, x[0], x[1]],
            Shape::from(vec![2, sums_row(per)]),
        )?;
        let dx = if self.inner {
            let op = NormalizeBackward {
                eps: self.eps,
                weighted: true,
                residual: false,
                channels_first: false,
                sums: false,
            };
            g.push_op(Op::NormalizeBackward(op), vec![dy, x[0], x[1], x[2]], shape)?
        } else {
            let op = NormalizeBackward {
                eps: self.eps,
                weighted: false,
                residual: false,
                channels_first: false,
                sums: false,
            };
            g.push_op(
                Op::NormalizeAffineBackward(op),
                vec![dy, x[0], x[1], x[2], sums],
                shape,
            )?
        };
        // both rows are views (the second starts at an aligned offset)
        let row = |k: usize| {
            let r = g.narrow(g.narrow(sums, 0, k, 1)?, 1, 0, per)?;
            g.reshape(r, &[per as isize])
        };
        Ok(vec![Some(dx), None, Some(row(1)?), Some(row(0)?)])
    }
}

/// The length of [`GroupSums`]' rows for `per` sums: a multiple of
/// [`super::layout::VIEW_ALIGN`], so that the second row (a parameter's gradient) is a view.
pub fn sums_row(per: usize) -> usize {
    per.next_multiple_of(super::layout::VIEW_ALIGN)
}

/// Per group of `dy` and `x (OUTER, GROUPS, INNER)` with `x`'s statistics `(2, GROUPS)`:
/// `sum(dy)` (row 0) and `sum(dy * xhat)` (row 1), `xhat` recomputed from `x`: the affine
/// normalization's bias and weight gradients, and what its input gradient needs. With `inner`,
/// the same sums per INNER position over every group: a layer norm's. Rows of [`sums_row`]
/// (zeros after the sums): `(2, sums_row(GROUPS or INNER))`. With `blocks > 1` (made by the
/// plan compiler, `exec::lower::split_group_reductions`): the partial sums of each of `blocks`
/// blocks of [`GroupSums::block_len`] rows (with `inner`) or elements of every group,
/// `(blocks, 2, sums_row(..))`, for a reduction to add up. As `Op::Written` (a layer norm's,
/// made by the plan compiler: `exec::lower::sums_in_normalize_backward`), no kernel of its
/// own: the weighted [`NormalizeBackward`] of the same `dy`, `x` and statistics writes the sums
/// in workgroups after its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupSums {
    pub eps: f32,
    pub inner: bool,
    pub blocks: usize,
}

/// Rows of a layer norm's gradient that one block of `inner_sums` takes where the plan compiler
/// splits them ([`GroupSums::blocks`]): beyond twice this many rows the sums of a row of few
/// features (ceil(features / 64) workgroups) would leave a large GPU mostly idle.
pub const INNER_SUMS_BLOCK_ROWS: usize = 512;

/// Elements of each group that one block of `group_sums` takes where the plan compiler splits
/// them: beyond twice this many, a batch norm's channels (a workgroup each) would be too few
/// workgroups for a large GPU.
pub const GROUP_SUMS_BLOCK_LEN: usize = 8192;

impl GroupSums {
    /// The kernel's name, as plans and profiles show it.
    pub fn name(&self) -> &'static str {
        if self.inner {
            "inner_sums"
        } else {
            "group_sums"
        }
    }

    /// What one block of the split kernel takes: rows of `dy` with `inner`, else elements of
    /// each group.
    pub fn block_len(&self, dy: &Shape) -> usize {
        let (outer, groups, inner) = split3(dy);
        let total = if self.inner {
            outer * groups
        } else {
            outer * inner
        };
        total.div_ceil(self.blocks.max(1))
    }

    /// CPU reference in f64 (each block's partial sums where `blocks > 1`).
    pub fn cpu(&self, dy: &Tensor, x: &Tensor, stats: &Tensor) -> Tensor {
        if self.inner {
            let (_, groups, inner) = split3(dy.shape());
            let row = sums_row(inner);
            let per_block = self.block_len(dy.shape());
            let mut acc = vec![0f64; self.blocks * 2 * row];
            for (k, (&d, &v)) in dy.data().iter().zip(x.data()).enumerate() {
                let (g, c) = ((k / inner) % groups, k % inner);
                let at = (k / inner) / per_block * 2 * row + c;
                let r = rstd(stats.data()[groups + g], self.eps);
                acc[at] += d as f64;
                acc[at + row] += d as f64 * (v as f64 - stats.data()[g] as f64) * r;
            }
            let data = acc.into_iter().map(|s| s as f32).collect();
            let shape = match self.blocks {
                1 => vec![2, row],
                b => vec![b, 2, row],
            };
            return Tensor::new(shape, data).expect("two rows of sums per block");
        }
        let groups = dy.dims()[1];
        let row = sums_row(groups);
        let per_block = self.block_len(dy.shape());
        let mut acc = vec![0f64; self.blocks * 2 * row];
        for g in 0..groups {
            let (mean, r) = (
                stats.data()[g] as f64,
                rstd(stats.data()[groups + g], self.eps),
            );
            for (e, ((_, d), (_, v))) in group(dy, g).zip(group(x, g)).enumerate() {
                let at = e / per_block * 2 * row + g;
                acc[at] += d;
                acc[at + row] += d * (v - mean) * r;
            }
        }
        let data = acc.into_iter().map(|s| s as f32).collect();
        let shape = match self.blocks {
            1 => vec![2, row],
            b => vec![b, 2, row],
        };
        Tensor::new(shape, data).expect("two rows of sums per block")
    }

    /// Kernel: [`threads_per_group`] threads per group (and the padding's groups); with
    /// `inner`, a workgroup per 64 positions of a row and block of rows (as `Op::Written`, the
    /// workgroups [`NormalizeBackward::kernel`] adds).
    pub fn kernel(&self, dy: &Shape) -> KernelSpec {
        let (_, groups, inner) = split3(dy);
        if self.inner {
            let row = sums_row(inner);
            let mut k = group_kernel("inner_sums", dy, Some(self.eps), Grid::PerElement);
            k.workgroups = super::groups(row, 64) * self.blocks.max(1) as u64;
            k.constants.push(("SUMS_ROW", row as f64));
            self.block_constants(dy, &mut k);
            return k;
        }
        let row = sums_row(groups);
        let mut k = group_kernel("group_sums", dy, Some(self.eps), Grid::PerGroup);
        let tpg = threads_per_group(split3(dy).0 * inner);
        k.workgroups = super::groups(row * tpg, 256) * self.blocks.max(1) as u64;
        k.constants.push(("SUMS_ROW", row as f64));
        self.block_constants(dy, &mut k);
        k
    }

    /// The split kernel's `BLOCKS` and `BLOCK_LEN`, where there are blocks.
    fn block_constants(&self, dy: &Shape, k: &mut KernelSpec) {
        if self.blocks > 1 {
            k.constants.push(("BLOCKS", self.blocks as f64));
            k.constants.push(("BLOCK_LEN", self.block_len(dy) as f64));
        }
    }
}

/// The gradient of [`Normalize`] for `x`, through the group's statistics: inputs `dxhat`,
/// `xhat` (`(OUTER, GROUPS, INNER)`) and the statistics `(2, GROUPS)`;
/// `dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat))`, `rstd = 1 / sqrt(var + eps)`,
/// reduced by [`threads_per_group`] threads per group. As `Op::NormalizeAffineBackward`, the affine form's, elementwise:
/// inputs `dy`, `x`, the statistics, `weight` and the [`GroupSums`] of `dy`;
/// `dx = weight rstd (dy - sum(dy) / n - xhat sum(dy xhat) / n)`. `weighted` (a layer norm's
/// per-feature scale): inputs `dy`, `x`, the statistics and `weight (INNER)`, `dxhat = dy *
/// weight[i]` and `xhat` recomputed from `x`, reduced per group as the plain form. `residual`
/// (weighted only, made by the plan compiler): a fifth input `res` of as many elements is added
/// to `dx` (the gradient that reaches a layer norm's input through the residual connection
/// around it), so that the sum is not a kernel of its own. `channels_first` (the affine form,
/// made by the plan compiler: `exec::lower::channels_first_normalize_backward`): `dx` is stored
/// as `(GROUPS, OUTER, INNER)`, the layout a convolution's backward reads its output gradient
/// in, without a permute after it. `sums` (weighted only, made by the plan compiler:
/// `exec::lower::sums_in_normalize_backward`): a last input, the [`GroupSums`] (`inner`, as
/// `Op::Written`) of the same `dy`, `x` and statistics, which this kernel writes in
/// workgroups after its own (bound read_write): a layer norm's backward in one kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizeBackward {
    pub eps: f32,
    pub weighted: bool,
    pub residual: bool,
    pub channels_first: bool,
    pub sums: bool,
}

impl NormalizeBackward {
    /// CPU reference of the affine form in f64.
    pub fn affine_cpu(&self, inputs: &[&Tensor]) -> Tensor {
        let [dy, x, stats, w, sums] = inputs else {
            unreachable!("five inputs")
        };
        let (outer, groups, inner) = split3(dy.shape());
        let dx = self.affine_cpu_nchw(dy, x, stats, w, sums);
        if !self.channels_first {
            return dx;
        }
        let data = (0..dx.numel())
            .map(|k| {
                // element k of (GROUPS, OUTER, INNER) is (o, g, i) of dx
                let (g, o, i) = (k / (outer * inner), (k / inner) % outer, k % inner);
                dx.data()[(o * groups + g) * inner + i]
            })
            .collect();
        Tensor::new([groups, outer, inner], data).expect("as many elements")
    }

    /// [`Self::affine_cpu`] in `dy`'s layout.
    fn affine_cpu_nchw(
        &self,
        dy: &Tensor,
        x: &Tensor,
        stats: &Tensor,
        w: &Tensor,
        sums: &Tensor,
    ) -> Tensor {
        let (outer, groups, inner) = split3(dy.shape());
        let n = (outer * inner) as f64;
        let data = dy
            .data()
            .iter()
            .zip(x.data())
            .enumerate()
            .map(|(k, (&d, &v))| {
                let g = (k / inner) % groups;
                let r = rstd(stats.data()[groups + g], self.eps);
                let xhat = (v as f64 - stats.data()[g] as f64) * r;
                let row = sums.dims()[1];
                let (s0, s1) = (sums.data()[g] as f64, sums.data()[row + g] as f64);
                (w.data()[g] as f64 * r * (d as f64 - s0 / n - xhat * s1 / n)) as f32
            })
            .collect();
        Tensor::new(dy.shape().clone(), data).expect("same shape")
    }

    /// Kernel of the affine form: one thread per element; `sums` is the [`GroupSums`] input's
    /// shape.
    pub fn affine_kernel(&self, dy: &Shape, sums: &Shape) -> KernelSpec {
        let mut k = group_kernel(
            "normalize_affine_backward",
            dy,
            Some(self.eps),
            Grid::PerElement,
        );
        k.constants.push(("SUMS_ROW", sums.dims()[1] as f64));
        if self.channels_first {
            k.constants.push(("CHANNELS_FIRST", 1.0));
        }
        k
    }

    /// CPU reference in f64: `inputs` are `[dxhat, xhat, stats]`, or weighted `[dy, x, stats,
    /// weight]` (and `res` with `residual`); the result has the shape `out`.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let (a, b, stats) = (inputs[0], inputs[1], inputs[2]);
        let (_, groups, inner) = split3(a.shape());
        let n = (a.numel() / groups) as f64;
        // dxhat and xhat of element k (in f64 where the weighted form computes them)
        let at = |k: usize, g: usize| -> (f64, f64) {
            let (d, v) = (a.data()[k] as f64, b.data()[k] as f64);
            if !self.weighted {
                return (d, v);
            }
            let r = rstd(stats.data()[groups + g], self.eps);
            let w = inputs[3].data()[k % inner] as f64;
            (d * w, (v - stats.data()[g] as f64) * r)
        };
        let mut dx = vec![0f32; a.numel()];
        for g in 0..groups {
            let (mut s1, mut s2) = (0f64, 0f64);
            for (k, _) in group(a, g) {
                let (d, h) = at(k, g);
                s1 += d;
                s2 += d * h;
            }
            let r = rstd(stats.data()[groups + g], self.eps);
            for (k, _) in group(a, g) {
                let (d, h) = at(k, g);
                dx[k] = (r * (d - s1 / n - h * s2 / n)) as f32;
            }
        }
        if self.residual {
            // f32 addition, as the kernel adds
            for (v, r) in dx.iter_mut().zip(inputs[4].data()) {
                *v += r;
            }
        }
        Tensor::new(out.clone(), dx).expect("same element count")
    }

    /// Kernel: [`threads_per_group`] threads per group; with `sums` (the shape of the
    /// [`GroupSums`] input: `(2, ..)`, or `(BLOCKS, 2, ..)` split), then `inner_sums`'
    /// workgroups and constants.
    pub fn kernel(&self, dxhat: &Shape, sums: Option<&Shape>) -> KernelSpec {
        let entry = match (self.weighted, self.residual, sums.is_some()) {
            (true, true, true) => "normalize_weighted_backward_add_sums",
            (true, false, true) => "normalize_weighted_backward_sums",
            (true, true, false) => "normalize_weighted_backward_add",
            (true, false, false) => "normalize_weighted_backward",
            _ => "normalize_backward",
        };
        let mut k = group_kernel(entry, dxhat, Some(self.eps), Grid::PerGroup);
        if let Some(shape) = sums {
            let s = GroupSums {
                eps: self.eps,
                inner: true,
                blocks: if shape.rank() == 3 {
                    shape.dims()[0]
                } else {
                    1
                },
            };
            let columns = s.kernel(dxhat);
            k.workgroups += columns.workgroups;
            for c in columns.constants {
                if !k.constants.iter().any(|(name, _)| *name == c.0) {
                    k.constants.push(c);
                }
            }
        }
        k
    }
}

/// `x (OUTER, GROUPS, INNER)` (f32) normalized by its own group statistics (then scaled and
/// shifted per group by `affine`), and those statistics `(2, GROUPS)` (means, biased
/// variances).
fn normalize_by_groups(
    g: &Graph,
    x: NodeId,
    eps: f32,
    affine: Option<(NodeId, NodeId)>,
    inner: bool,
) -> Result<(NodeId, NodeId)> {
    check_eps(eps)?;
    let groups = g.shape(x).dims()[1];
    let stats = g.push_op(
        Op::GroupStats(GroupStats::WHOLE),
        vec![x],
        Shape::from(vec![2, groups]),
    )?;
    let mut inputs = vec![x, stats];
    inputs.extend(affine.iter().flat_map(|&(w, b)| [w, b]));
    let op = Op::Normalize(Normalize {
        eps,
        affine: affine.is_some(),
        inner,
        relu: false,
    });
    let y = g.push_op(op, inputs, g.shape(x))?;
    Ok((y, stats))
}

/// The running statistics of a batch normalization and how they move:
/// `running_mean`, `running_var` (parameter nodes of shape `(C)`) and `momentum`
/// (PyTorch's default 0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunningStats {
    pub mean: NodeId,
    pub var: NodeId,
    pub momentum: f32,
}

/// Batch normalization of `x (N, C, *)` (rank 2 or more) per channel (axis 1), as
/// `torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
/// momentum, eps)`. `affine` is `(weight, bias)`, each `(C)`. With `training`, the batch's
/// statistics normalize and, where `running` is given, update it in place; without, `running`
/// (required) normalizes. Errors name `batch_norm` and the shapes.
pub fn batch_norm(
    g: &Graph,
    x: NodeId,
    affine: Option<(NodeId, NodeId)>,
    running: Option<RunningStats>,
    training: bool,
    eps: f32,
) -> Result<NodeId> {
    const OP: &str = "batch_norm";
    let (shape, n, c) = batch_channels(g, OP, x)?;
    let dims = shape.dims().to_vec();
    let s: usize = dims[2..].iter().product();
    let params = affine_named(affine).chain(
        running
            .iter()
            .flat_map(|r| [("running_mean", r.mean), ("running_var", r.var)]),
    );
    check_shapes(g, OP, params, &Shape::from(vec![c]), &shape)?;
    if !training && running.is_none() {
        return Err(shape_err(
            OP,
            "evaluation mode normalizes with running statistics: none were given",
        ));
    }
    if training && n * s < 2 {
        return Err(shape_err(
            OP,
            format!("training needs more than one value per channel, input {shape}"),
        ));
    }
    // f16 inputs are read as stored (the kernels compute in f32); the output keeps x's type
    let dt = g.dtype(x);
    // per-channel values broadcast against x's own shape (1, C, 1, ..), in x's type: the
    // elementwise evaluation form stays in x's shape, so it fuses with what reads the output
    let mut per_channel_dims = vec![1isize; dims.len()];
    per_channel_dims[1] = c as isize;
    let per_channel = |t: NodeId| g.cast(g.reshape(t, &per_channel_dims)?, dt);
    let y = if training {
        // the scale and shift inside the normalization: their gradients are its per-channel
        // sums, one kernel with what the input's gradient needs
        let xr = g.reshape(x, &[n as isize, c as isize, s as isize])?;
        let (y, stats) = normalize_by_groups(g, xr, eps, affine, false)?;
        if let Some(r) = running {
            let count = (n * s) as f32;
            let scales = [1.0, count / (count - 1.0)];
            running_update(g, &[r.mean, r.var], stats, r.momentum, &scales)?;
        }
        let back: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
        g.reshape(y, &back)?
    } else {
        check_eps(eps)?;
        let r = running.expect("checked above");
        // 1 / sqrt(running_var + eps) in f32, then in x's type
        let var = g.reshape(r.var, &per_channel_dims)?;
        let rstd = g.cast(g.pow_scalar(g.add_scalar(var, eps)?, -0.5)?, dt)?;
        let y = g.mul(g.sub(x, per_channel(r.mean)?)?, rstd)?;
        match affine {
            Some((w, b)) => g.add(g.mul(y, per_channel(w)?)?, per_channel(b)?)?,
            None => y,
        }
    };
    Ok(y)
}

/// Layer normalization of `x` over its last `normalized` axes, as
/// `torch.nn.functional.layer_norm(x, x.shape[-normalized:], weight, bias, eps)`: each leading
/// index's `D = prod(last axes)` values get mean 0 and (biased) variance 1, then `weight` and
/// `bias` (shaped like those axes) scale and shift them.
pub fn layer_norm(
    g: &Graph,
    x: NodeId,
    normalized: usize,
    affine: Option<(NodeId, NodeId)>,
    eps: f32,
) -> Result<NodeId> {
    const OP: &str = "layer_norm";
    let (shape, lead) = trailing_axes(g, OP, x, normalized)?;
    let dims = shape.dims().to_vec();
    let norm_shape = Shape::from(dims[lead..].to_vec());
    check_shapes(g, OP, affine_named(affine), &norm_shape, &shape)?;
    let rows: usize = dims[..lead].iter().product();
    let d: usize = dims[lead..].iter().product();
    let xr = g.reshape(x, &[1, rows as isize, d as isize])?;
    // the scale and shift inside the normalization (f32, per feature): one kernel forward, and
    // their gradients from one kernel of column sums
    let flat = |t: NodeId| g.reshape(g.cast(t, DType::F32)?, &[d as isize]);
    let affine = match affine {
        Some((w, b)) => Some((flat(w)?, flat(b)?)),
        None => None,
    };
    let (y, _) = normalize_by_groups(g, xr, eps, affine, true)?;
    let back: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
    g.reshape(y, &back)
}

/// Root-mean-square normalization of `x` over its last `normalized` axes, as
/// `torch.nn.functional.rms_norm(x, shape, weight, eps)`: `x / sqrt(mean(x^2) + eps) * weight`
/// (`weight` shaped like those axes; `eps` `None` is torch's default, the machine epsilon of
/// `x`'s type). Composed from graph ops, which the plan compiler runs as two kernels (the mean
/// of squares as a reduction with its prologue, then one fused elementwise kernel with the
/// weight) and differentiates as any composition.
pub fn rms_norm(
    g: &Graph,
    x: NodeId,
    normalized: usize,
    weight: Option<NodeId>,
    eps: Option<f32>,
) -> Result<NodeId> {
    const OP: &str = "rms_norm";
    let (shape, lead) = trailing_axes(g, OP, x, normalized)?;
    let dims = shape.dims().to_vec();
    let norm_shape = Shape::from(dims[lead..].to_vec());
    check_shapes(
        g,
        OP,
        weight.map(|w| ("weight", w)).into_iter(),
        &norm_shape,
        &shape,
    )?;
    let dt = g.dtype(x);
    let eps = eps.unwrap_or(match dt {
        DType::F16 => half::f16::EPSILON.to_f32(),
        _ => f32::EPSILON,
    });
    check_eps(eps)?;
    let rows: usize = dims[..lead].iter().product();
    let d: usize = dims[lead..].iter().product();
    let xr = g.reshape(x, &[rows as isize, d as isize])?;
    let ms = g.mean(g.square(xr)?, -1, true)?;
    let mut y = g.mul(xr, g.rdiv_scalar(g.sqrt(g.add_scalar(ms, eps)?)?, 1.0)?)?;
    // the weight before the reshape back, so that one kernel computes the whole row
    if let Some(w) = weight {
        y = g.mul(y, g.reshape(g.cast(w, dt)?, &[d as isize])?)?;
    }
    let back: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
    g.reshape(y, &back)
}

/// Group normalization of `x (N, C, *)` as `torch.nn.functional.group_norm(x, num_groups,
/// weight, bias, eps)`: the channels split into `num_groups` groups of `C / num_groups`, each
/// sample's group normalized by its own mean and biased variance, then a per-channel `weight` and
/// `bias` (`(C)`). `num_groups = C` is instance normalization (`InstanceNorm*d` without running
/// statistics), `num_groups = 1` a layer norm over `(C, *)` with per-channel scale.
pub fn group_norm(
    g: &Graph,
    x: NodeId,
    num_groups: usize,
    affine: Option<(NodeId, NodeId)>,
    eps: f32,
) -> Result<NodeId> {
    const OP: &str = "group_norm";
    let (shape, n, c) = batch_channels(g, OP, x)?;
    let dims = shape.dims().to_vec();
    if num_groups == 0 || c % num_groups != 0 {
        return Err(shape_err(
            OP,
            format!("{c} channels of input {shape} do not split into {num_groups} groups"),
        ));
    }
    check_shapes(g, OP, affine_named(affine), &Shape::from(vec![c]), &shape)?;
    let per_group = shape.numel() / (n * num_groups);
    let dt = g.dtype(x);
    let xr = g.reshape(x, &[1, (n * num_groups) as isize, per_group as isize])?;
    let (xhat, _) = normalize_by_groups(g, xr, eps, None, false)?;
    let back: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
    let mut y = g.reshape(xhat, &back)?;
    if let Some((w, b)) = affine {
        let mut per_channel = vec![1isize; dims.len()];
        per_channel[1] = c as isize;
        let param = |t: NodeId| g.cast(g.reshape(t, &per_channel)?, dt);
        y = g.add(g.mul(y, param(w)?)?, param(b)?)?;
    }
    Ok(y)
}

/// The shape of `x (N, C, *)`, `N` and `C`; an error naming `op` for fewer than 2 axes.
fn batch_channels(g: &Graph, op: &'static str, x: NodeId) -> Result<(Shape, usize, usize)> {
    let shape = g.check_id(op, x)?;
    match *shape.dims() {
        [n, c, ..] => Ok((shape.clone(), n, c)),
        _ => Err(shape_err(
            op,
            format!("input {shape} needs at least 2 axes (N, C, *)"),
        )),
    }
}

/// `("weight", w), ("bias", b)` of an affine pair.
/// `x`'s shape and the number of its leading axes, where its last `normalized` axes (1 to its
/// rank) are normalized; else a shape error naming `op`.
fn trailing_axes(
    g: &Graph,
    op: &'static str,
    x: NodeId,
    normalized: usize,
) -> Result<(Shape, usize)> {
    let shape = g.check_id(op, x)?;
    let rank = shape.rank();
    if normalized == 0 || normalized > rank {
        return Err(shape_err(
            op,
            format!("cannot normalize the last {normalized} axes of {shape} (1 to {rank} allowed)"),
        ));
    }
    Ok((shape, rank - normalized))
}

fn affine_named(affine: Option<(NodeId, NodeId)>) -> impl Iterator<Item = (&'static str, NodeId)> {
    affine
        .into_iter()
        .flat_map(|(w, b)| [("weight", w), ("bias", b)])
}

/// Each named parameter must have the shape `want`; the error names it, both shapes and the
/// input's.
fn check_shapes(
    g: &Graph,
    op: &'static str,
    named: impl Iterator<Item = (&'static str, NodeId)>,
    want: &Shape,
    input: &Shape,
) -> Result<()> {
    for (what, id) in named {
        let sh = g.check_id(op, id)?;
        if &sh != want {
            return Err(shape_err(
                op,
                format!("{what} {sh} must be {want} for input {input}"),
            ));
        }
    }
    Ok(())
}

/// `eps` must be positive (a zero variance would divide by zero).
fn check_eps(eps: f32) -> Result<()> {
    if eps > 0.0 {
        Ok(())
    } else {
        Err(shape_err(
            "norm",
            format!("eps must be positive, got {eps}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The statistics' own backward (used where a gradient reaches them other than through
    /// `Normalize`) against central differences, on the CPU reference.
    #[test]
    fn group_stats_gradient() {
        use crate::Device;
        let g = Graph::new();
        let x = g.input("x", [3, 2, 4]);
        let stats = g
            .push_op(
                Op::GroupStats(GroupStats::WHOLE),
                vec![x],
                Shape::from(vec![2, 2]),
            )
            .unwrap();
        let w = g.constant(Tensor::new([2, 2], vec![0.3, -1.2, 0.7, 2.0]).unwrap());
        let loss = g.sum_all(g.mul(stats, w).unwrap()).unwrap();
        let dx = g.grad(loss, &[x]).unwrap()[0];
        let xv = Tensor::rand_uniform(vec![3, 2, 4], -1.0, 1.0, 3);
        let dev = Device::cpu();
        let analytic = dev.compile(&g, &[dx]).unwrap().run(&[("x", &xv)]).unwrap();
        let mut plan = dev.compile(&g, &[loss]).unwrap();
        let h = 1e-2f32;
        for i in 0..xv.numel() {
            let mut eval = |d: f32| {
                let mut t = xv.clone();
                t.data_mut()[i] += d;
                plan.run(&[("x", &t)]).unwrap()[0].data()[0] as f64
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            let an = analytic[0].data()[i] as f64;
            assert!(
                (fd - an).abs() <= 1e-3 + 1e-2 * fd.abs(),
                "x[{i}]: {an} vs {fd}"
            );
        }
    }

    #[test]
    fn running_update_moves_by_momentum() {
        let r = RunningUpdate {
            momentum: 0.1,
            rows: 2,
            scales: [1.0, 2.0],
        };
        let value = Tensor::new([2, 2], vec![5.0, 6.0, 1.0, -3.0]).unwrap();
        let mean = Tensor::new([2], vec![0.0, 1.0]).unwrap();
        let var = Tensor::new([2], vec![10.0, 0.0]).unwrap();
        let out = r.cpu(&value, &[&mean, &var]);
        // 0.9 * 0 + 0.1 * 5 = 0.5; 0.9 * 1 + 0.1 * 6 = 1.5
        assert!((out[0].data()[0] - 0.5).abs() < 1e-6 && (out[0].data()[1] - 1.5).abs() < 1e-6);
        // 0.9 * 10 + 0.1 * 2 * 1 = 9.2; 0.9 * 0 + 0.1 * 2 * -3 = -0.6
        assert!((out[1].data()[0] - 9.2).abs() < 1e-6 && (out[1].data()[1] + 0.6).abs() < 1e-6);
    }
}
