//! Lowering for one GPU: rewrites of the plan's nodes before buffers are planned, then each
//! node's kernel. [`lower`] runs the rewrites in this order:
//! 0. [`common_subexpressions`]: a node computing what an earlier one computes (the same op on
//!    the same inputs: autodiff gives an LSTM's two biases one gradient, summed twice) reads that
//!    one instead; [`merge_sum_squares`]: a sum of squares over many tensors takes as few
//!    kernels as the adapter's storage-buffer limit allows;
//! 1. [`implicit_col2im`]: `col2im(w^T x dy)` (a convolution's input gradient) as one implicit GEMM;
//!    [`row_sums_in_products`]: a bias gradient, the sum of the operand a weight gradient's
//!    product reads, comes out of that product's kernel; [`batch_sums_into_embedding_backward`]:
//!    a lookup broadcast over a batch sums the batch inside its table's gradient kernel, and
//!    [`sorted_embedding_backward`] a large table's lists each row's lookups first;
//!    [`stats_inside_normalization`]: a layer
//!    norm computes its row statistics inside its normalization's kernel (f32, or in inference
//!    f16 too);
//!    [`residual_into_normalize_backward`]: a layer norm's input gradient adds the residual
//!    connection's; [`split_group_reductions`]: normalization statistics and parameter
//!    gradients over large groups (a batch norm's channels) or many rows (a layer norm's) are
//!    reduced in blocks, then merged or added up; [`running_update_in_stats`]: the kernel that
//!    computes a batch norm's statistics moves its running ones; [`pads_into_lstm_backward`]:
//!    a recurrence's backward reads the padded part of its state gradient as a window (two
//!    adjacent narrows padded and summed are one, [`adjacent_narrows_into_one_pad`]), and
//!    [`disjoint_pads_into_one_copy`] two pads it sums as one copy;
//!    [`split_cross_entropy`]: a loss over more logits than one workgroup should fold runs per
//!    row over the GPU, then a mean; [`gradient_with_cross_entropy`]: a small one, or one per
//!    row, computes its gradient too (what that gradient needs from the labels alone, a mean
//!    over the rows kept, moving before it: [`hoistable`]); [`relu_into_normalize`]: a batch norm's relu runs in its kernel, and
//!    [`channels_first_normalize_backward`] its input gradient is stored in the layout the
//!    convolution before it reads;
//! 2. [`split_k`]: products too small to fill the adapter but deep in K become partial products
//!    and their sum with the epilogue;
//! 3. [`implicit_im2col`]: products reading `im2col(x)` read the image instead;
//! 4. [`nchw_conv_output`]: forward convolutions store NCHW from the GEMM (in training the relu
//!    mask reads that through a transpose step 5 folds); [`fold_operand_casts`]: f16 products
//!    read f32 operands cast to f16 (mixed precision's parameters) themselves;
//! 5. with fusion on (`exec::fuse`): elementwise chains become one node, transposes fold into
//!    them and run the chains they alone read (`fuse::programs_into_permutes`), reductions take
//!    their input's chain as a prologue, chains of f16 values read f32 tensors that a cast only
//!    rounds for them (`fuse::fold_casts`), and products their reader's chain as an epilogue
//!    ([`fuse_matmul_epilogue`]); products apply a dropout only they read as
//!    they load the operand ([`dropout_into_products`]), and a narrow of rows only they read
//!    in place ([`strided_operands`]); a max-pooling backward applies the
//!    relu mask after it ([`relu_mask_into_max_pool_backward`]); elementwise kernels do the
//!    embedding lookups only they read and store a cast of their result
//!    (`fuse::fold_embeddings`, `fuse::fuse_casts`; hand-written kernels their result's cast to
//!    f32, [`casts_into_producers`]), and broadcast what an expand only copies for them
//!    (`fuse::fold_expands`);
//! 6. [`group_accumulations`], [`group_optimizer_updates`], [`group_ema_updates`]: a
//!    micro-batch's gradient accumulations, a step's parameter updates and their moving
//!    averages become one kernel each (or a few, as the adapter's storage-buffer limit allows);
//! 7. [`sums_in_normalize_backward`]: a layer norm's input gradient kernel also sums its
//!    parameters' gradients.
//!
//! [`select`] then gives each node its kernel, generated for the adapter (`codegen`) or from
//! `shaders/`. Node ids keep their meaning: a rewritten node still computes the same tensor, and
//! no rewrite moves a read past an in-place update ([`written_between`]).

use super::liveness::storage_root;
use std::collections::HashMap;

use crate::codegen::coop::CoopConfig;
use crate::codegen::elementwise;
use crate::codegen::matmul::{self as gemm, GemmConfig};
use crate::codegen::{Generated, Target};
use crate::device::GemmPolicy;
use crate::graph::{Node, NodeId};
use crate::ops::conv::{ImplicitDgrad, ImplicitGemm};
use crate::ops::fused::{Fused, Operand, PermutedRead, Step, StepOp};
use crate::ops::matmul::{MatMul, MatMulEpilogue, MatMulPartial, ProductDims, SplitKSum};
use crate::ops::{KernelSpec, Op};
use crate::tensor::{DType, Shape};

/// What kernel choices depend on for one plan: the adapter, the GEMM policy, whether the
/// tensor-core kernel may run (for f32 products: medium precision; for f16 ones: the adapter
/// has it and it passed its check) and in which configuration if one was fixed, and the
/// configurations tuned on this adapter.
pub(crate) struct Choice<'a> {
    pub target: &'a Target,
    pub policy: GemmPolicy,
    pub coop: bool,
    pub coop_f16: bool,
    pub coop_fixed: Option<CoopConfig>,
    pub coop_default: CoopConfig,
    pub tuned: &'a HashMap<String, GemmConfig>,
    pub coop_tuned: &'a HashMap<String, CoopConfig>,
}

/// The key of a product in the tuning table: its extents and batch.
pub(crate) fn tune_key(d: &ProductDims) -> String {
    format!("{}x{}x{}b{}", d.m, d.n, d.k, d.batch.numel())
}

/// The key of a tensor-core product in the tuning table: `coop:`, its extents and batch, and
/// `,f16` where its operands are stored as f16 (f32 ones are converted while staged).
pub(crate) fn coop_tune_key(d: &ProductDims, dtype: DType) -> String {
    coop_key(d.m, d.n, d.k, d.batch.numel(), dtype)
}

/// [`coop_tune_key`] from the extents.
pub(crate) fn coop_key(m: usize, n: usize, k: usize, batch: usize, dtype: DType) -> String {
    let half = if dtype == DType::F16 { ",f16" } else { "" };
    format!("coop:{m}x{n}x{k}b{batch}{half}")
}

/// The tensor-core kernel's configuration for a product: the one fixed on the device, else
/// the one tuned for its extents, else the device's default (`CoopConfig::choose`, unless that
/// failed the device's check).
pub(crate) fn coop_config(d: &ProductDims, ch: &Choice, dtype: DType) -> CoopConfig {
    // (a tuning file's entry is only as good as the adapter it was written on)
    ch.coop_fixed
        .into_iter()
        .chain(ch.coop_tuned.get(&coop_tune_key(d, dtype)).copied())
        .find(|c| c.fits(ch.target))
        .unwrap_or(ch.coop_default)
}

/// Every rewrite, in the order the module documentation gives (the fusion ones only with
/// `fusion` on).
pub(crate) fn lower(
    nodes: &mut Vec<Node>,
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
    targets: &[NodeId],
    ch: &Choice,
    fusion: bool,
) {
    fold_constant_casts(nodes, order, targets);
    common_subexpressions(nodes, order, targets);
    merge_sum_squares(
        nodes,
        order,
        targets,
        ch.target.max_storage_buffers as usize,
    );
    attention_lse(nodes, order);
    implicit_col2im(nodes, order, targets, ch);
    if fusion {
        bias_into_implicit_dgrad(nodes, order, targets);
    }
    row_sums_in_products(nodes, order, ch);
    batch_sums_into_embedding_backward(nodes, order, targets);
    sorted_embedding_backward(nodes, order);
    stats_inside_normalization(nodes, order, targets);
    residual_into_normalize_backward(nodes, order, targets);
    split_group_reductions(nodes, order);
    running_update_in_stats(nodes, order, outputs);
    split_cross_entropy(nodes, order, targets);
    gradient_with_cross_entropy(nodes, order, targets);
    adjacent_narrows_into_one_pad(nodes, order, targets);
    pads_into_lstm_backward(nodes, order, targets);
    disjoint_pads_into_one_copy(nodes, order, targets);
    relu_into_normalize(nodes, order, targets);
    channels_first_normalize_backward(nodes, order, targets);
    split_k(nodes, order, ch);
    implicit_im2col(nodes, order, targets, ch);
    nchw_conv_output(nodes, order, targets);
    fold_operand_casts(nodes, order, targets);
    if fusion {
        super::fuse::fuse_elementwise(nodes, order, targets);
        super::fuse::fold_permutes(nodes, order, targets);
        super::fuse::programs_into_permutes(nodes, order, targets);
        super::fuse::fuse_reduce_prologue(nodes, order, targets);
        super::fuse::fuse_reduce_epilogue(nodes, order, targets);
        super::fuse::fold_casts(nodes, order, targets);
        fuse_matmul_epilogue(nodes, order, targets, ch);
        dropout_into_products(nodes, order, targets, ch);
        strided_operands(nodes, order, targets, ch);
        swapped_operands(nodes, order, targets, ch);
        relu_mask_into_max_pool_backward(nodes, order, targets);
        super::fuse::fold_embeddings(nodes, order, targets);
        super::fuse::fuse_casts(nodes, order, targets);
        casts_into_producers(nodes, order, targets, ch);
        super::fuse::fold_expands(nodes, order, targets);
    }
    group_accumulations(
        nodes,
        order,
        outputs,
        ch.target.max_storage_buffers as usize,
    );
    group_optimizer_updates(
        nodes,
        order,
        outputs,
        ch.target.max_storage_buffers as usize,
    );
    group_ema_updates(
        nodes,
        order,
        outputs,
        ch.target.max_storage_buffers as usize,
    );
    partials_into_grad_scaler(nodes, order, outputs);
    sums_in_normalize_backward(nodes, order);
}

/// Whether the in-place update `m` (a member of a multi-tensor kernel to run at position `q` of
/// `order`) cannot move there: a node between reads `m` or the storage of `own` (what `m`
/// writes), or writes the storage of `read` (what it reads).
fn moved_past(
    nodes: &[Node],
    order: &[NodeId],
    m: NodeId,
    q: usize,
    own: &[NodeId],
    read: NodeId,
) -> bool {
    let Some(p) = order.iter().position(|&o| o == m) else {
        return true;
    };
    if p >= q {
        return false;
    }
    let own: Vec<NodeId> = own.iter().map(|&i| storage_root(nodes, i)).collect();
    order[p + 1..q].iter().any(|r| {
        nodes[r.0]
            .inputs
            .iter()
            .any(|&i| i == m || own.contains(&storage_root(nodes, i)))
    }) || written_between(nodes, order, read, p, q)
}

/// Merges a step's moving averages (`EmaUpdate` nodes sharing `decay`) into `EmaGroup` nodes,
/// as [`group_accumulations`] does the accumulations: one dispatch for every parameter, or for
/// as many as `max_bindings` storage buffers allow (two each, and the hyper vector). Each
/// group takes the place (and id) of its last member; the others become views of their
/// averages just after it where something reads them. A member read back, whose average a
/// node before the group's place touches, or whose parameter one writes, stays as it is.
pub(crate) fn group_ema_updates(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
    max_bindings: usize,
) {
    use crate::ops::optim::EmaGroup;
    // (decay's bits, members in order)
    let mut buckets: Vec<(u32, Vec<NodeId>)> = Vec::new();
    for &id in order.iter() {
        let Op::EmaUpdate(e) = nodes[id.0].op else {
            continue;
        };
        if outputs.contains(&id) {
            continue;
        }
        let key = e.decay.to_bits();
        match buckets.iter_mut().find(|b| b.0 == key) {
            Some(b) => b.1.push(id),
            None => buckets.push((key, vec![id])),
        }
    }
    let per = (max_bindings.saturating_sub(1) / 2).min(MAX_GROUP_MEMBERS);
    if per < 2 {
        return;
    }
    let at = |order: &[NodeId], id: NodeId| order.iter().position(|&o| o == id);
    for (bits, members) in buckets {
        for chunk in members.chunks(per) {
            let Some(&last) = chunk.last() else { continue };
            let Some(q) = at(order, last) else { continue };
            let hyper = nodes[last.0].inputs[0];
            let kept: Vec<NodeId> = chunk
                .iter()
                .copied()
                .filter(|&m| {
                    let ins = &nodes[m.0].inputs;
                    ins[0] == hyper && !moved_past(nodes, order, m, q, &ins[2..], ins[1])
                })
                .collect();
            if kept.len() < 2 {
                continue;
            }
            let host = *kept.last().expect("at least two members");
            let mut inputs = vec![hyper];
            inputs.extend(kept.iter().map(|m| nodes[m.0].inputs[1]));
            inputs.extend(kept.iter().map(|m| nodes[m.0].inputs[2]));
            nodes[host.0].op = Op::EmaGroup(EmaGroup {
                members: kept.len(),
                decay: f32::from_bits(bits),
            });
            nodes[host.0].inputs = inputs;
            // the others: views of their averages
            members_as_views(nodes, order, &kept, 2, &[]);
        }
    }
}

/// Merges a micro-batch's gradient accumulations (`Accumulate` nodes sharing `first` and
/// `scale`) into `AccumulateGroup` nodes, as [`group_optimizer_updates`] does the updates: one
/// dispatch for every parameter, or for as many as `max_bindings` storage buffers allow (two
/// each). Each group takes the place (and id) of its last member; the other members become
/// views of their accumulators placed just after it, for their readers (a cycle's last
/// micro-batch: the updates read the sums). Accumulations read back stay as they are, and so
/// does a member whose accumulator some node between it and the group's place touches, whose
/// gradient one writes, or that a node before that place reads.
pub(crate) fn group_accumulations(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
    max_bindings: usize,
) {
    use crate::ops::optim::AccumulateGroup;
    // (first, scale's bits, members in order)
    let mut buckets: Vec<(bool, u32, Vec<NodeId>)> = Vec::new();
    for &id in order.iter() {
        let Op::Accumulate(a) = nodes[id.0].op else {
            continue;
        };
        if outputs.contains(&id) {
            continue;
        }
        let key = (a.first, a.scale.to_bits());
        match buckets.iter_mut().find(|b| (b.0, b.1) == key) {
            Some(b) => b.2.push(id),
            None => buckets.push((key.0, key.1, vec![id])),
        }
    }
    let per = (max_bindings / 2).min(MAX_GROUP_MEMBERS);
    if per < 2 {
        return;
    }
    let at = |order: &[NodeId], id: NodeId| order.iter().position(|&o| o == id);
    for (first, bits, members) in buckets {
        for chunk in members.chunks(per) {
            let Some(&last) = chunk.last() else { continue };
            let Some(q) = at(order, last) else { continue };
            let kept: Vec<NodeId> = chunk
                .iter()
                .copied()
                .filter(|&m| {
                    !moved_past(
                        nodes,
                        order,
                        m,
                        q,
                        &nodes[m.0].inputs[1..],
                        nodes[m.0].inputs[0],
                    )
                })
                .collect();
            if kept.len() < 2 {
                continue;
            }
            let host = *kept.last().expect("at least two members");
            let mut inputs: Vec<NodeId> = kept.iter().map(|m| nodes[m.0].inputs[0]).collect();
            inputs.extend(kept.iter().map(|m| nodes[m.0].inputs[1]));
            nodes[host.0].op = Op::AccumulateGroup(AccumulateGroup {
                members: kept.len(),
                first,
                scale: f32::from_bits(bits),
            });
            nodes[host.0].inputs = inputs;
            // the others: views of their accumulators
            members_as_views(nodes, order, &kept, 1, &[]);
        }
    }
}

/// After a group of in-place updates took the place (and id) of `kept`'s last member: the
/// other members that something reads become views of what they updated (their input
/// `storage`) placed just after the group, the rest leave `order`, and so do the nodes of
/// `gone` (what the group reads itself instead).
fn members_as_views(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    kept: &[NodeId],
    storage: usize,
    gone: &[NodeId],
) {
    let Some((&host, others)) = kept.split_last() else {
        return;
    };
    let read: Vec<NodeId> = others
        .iter()
        .copied()
        .filter(|&m| readers(nodes, order, m) > 0)
        .collect();
    for &m in &read {
        let updated = nodes[m.0].inputs[storage];
        nodes[m.0].op = Op::Reshape;
        nodes[m.0].inputs = vec![updated];
    }
    order.retain(|id| !(others.contains(id) || gone.contains(id)));
    if let Some(q) = order.iter().position(|&o| o == host) {
        order.splice(q + 1..q + 1, read);
    }
}

/// Where dynamic loss scaling's kernel reads the gradients' sum of squares from the small
/// reduction of its partial sums (`Graph::sum_squares`), it reads the partial sums and adds them
/// up itself (`ScalerStep::partials`), and the reduction's kernel goes once nothing else reads
/// its result: one dispatch fewer per training step, as the update kernels do for clipping
/// ([`group_optimizer_updates`]).
pub(crate) fn partials_into_grad_scaler(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
) {
    let scalers: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|id| matches!(nodes[id.0].op, Op::ScalerStep(s) if s.partials == 0))
        .collect();
    for id in scalers {
        let sum = nodes[id.0].inputs[1];
        let whole = |shape: &crate::tensor::Shape| {
            shape.numel() <= MAX_SCALE_PARTIALS && nodes[sum.0].shape.numel() == 1
        };
        let partials = match &nodes[sum.0].op {
            Op::Reduce(r)
                if r.kind == crate::ops::reduce::ReduceKind::Sum
                    && whole(&nodes[nodes[sum.0].inputs[0].0].shape)
                    && nodes[sum.0].dtype == DType::F32
                    && !outputs.contains(&sum) =>
            {
                nodes[nodes[sum.0].inputs[0].0].shape.numel()
            }
            Op::ReducePrologue(r)
                if r.program.steps.is_empty()
                    && r.epilogue.is_none()
                    && r.reduce.kind == crate::ops::reduce::ReduceKind::Sum
                    && r.input_shape.numel() <= MAX_SCALE_PARTIALS
                    && nodes[sum.0].inputs.len() == 1
                    && nodes[sum.0].dtype == DType::F32
                    && !outputs.contains(&sum) =>
            {
                r.input_shape.numel()
            }
            _ => continue,
        };
        let source = nodes[sum.0].inputs[0];
        let (Some(p), Some(q)) = (
            order.iter().position(|&o| o == sum),
            order.iter().position(|&o| o == id),
        ) else {
            continue;
        };
        if nodes[source.0].dtype != DType::F32 || written_between(nodes, order, source, p, q) {
            continue;
        }
        let Op::ScalerStep(mut s) = nodes[id.0].op else {
            continue;
        };
        s.partials = partials;
        nodes[id.0].op = Op::ScalerStep(s);
        nodes[id.0].inputs[1] = source;
        if readers(nodes, order, sum) == 0 {
            order.retain(|&o| o != sum);
        }
    }
}

/// Where attention's backward statistics kernel reads the forward node of the same operands
/// (f32), the forward writes each row's log-sum-exp past its output and the statistics kernel
/// reads it there ([`crate::ops::attention::Attention::lse`]) rather than recomputing the
/// scores: an eighth of the backward's work. (f16 graphs would store it in f16.)
pub(crate) fn attention_lse(nodes: &mut [Node], order: &[NodeId]) {
    for &id in order {
        let Op::AttentionGrad(mut grad) = nodes[id.0].op else {
            continue;
        };
        let forward = nodes[id.0].inputs[5];
        let Op::Attention(mut a) = nodes[forward.0].op else {
            continue;
        };
        let same = a == grad.attention
            && nodes[forward.0].inputs[..5] == nodes[id.0].inputs[..5]
            && nodes[forward.0].dtype == DType::F32
            && order.contains(&forward);
        if grad.part != crate::ops::attention::GradPart::Stats || !same {
            continue;
        }
        a.lse = true;
        grad.attention.lse = true;
        nodes[forward.0].op = Op::Attention(a);
        nodes[id.0].op = Op::AttentionGrad(grad);
    }
}

/// A cast of a constant becomes a constant of the cast's type (rounded now, uploaded once): a
/// mixed-precision recurrent layer's zero state costs no kernel. Constants nothing reads any
/// more are dropped.
pub(crate) fn fold_constant_casts(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    let mut folded = false;
    for &id in order.iter() {
        let Op::Cast(c) = nodes[id.0].op else {
            continue;
        };
        let Op::Const { value } = &nodes[nodes[id.0].inputs[0].0].op else {
            continue;
        };
        let value = std::sync::Arc::new((**value).clone().rounded(c.to));
        nodes[id.0].op = Op::Const { value };
        nodes[id.0].inputs.clear();
        folded = true;
    }
    if folded {
        let read: std::collections::HashSet<NodeId> = order
            .iter()
            .flat_map(|r| nodes[r.0].inputs.iter().copied())
            .collect();
        order.retain(|id| {
            !matches!(nodes[id.0].op, Op::Const { .. }) || targets.contains(id) || read.contains(id)
        });
    }
}

/// Where an f16 product (or implicit-GEMM convolution) reads an operand or its bias as
/// `cast(x, f16)` of an f32 `x`, possibly through a reshape (a convolution's weight), lets the
/// product read `x` and round it on load (`codegen::load`: the value the cast stores), and drops
/// the cast where nothing else reads it: mixed precision's f32 parameters then cost no kernel
/// of their own. A recurrence's f16 kernels read its recurrent weight (and the GRU's and RNN's
/// recurrent bias) so too (`Op::rounded_f16_inputs`); the weight's transpose for the forward
/// then runs the cast itself (`fuse::programs_into_permutes`). Reads move from the cast's step
/// to the reader's, so no in-place update of `x` may lie between ([`written_between`]).
/// Likewise a sum of squares (gradient clipping's norm) reads `cast(g, f32)` of an f16 `g` as
/// `g` itself (widening is exact), so the gradients' casts of a mixed-precision step can fold
/// into the optimizer's update kernels.
pub(crate) fn fold_operand_casts(
    nodes: &mut Vec<Node>,
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let at = |order: &[NodeId], id: NodeId| order.iter().position(|&o| o == id);
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let n = &nodes[id.0];
        if let Op::SumSquares(_) = n.op {
            for k in 0..n.inputs.len() {
                let cast = nodes[id.0].inputs[k];
                let Op::Cast(c) = nodes[cast.0].op else {
                    continue;
                };
                let g16 = nodes[cast.0].inputs[0];
                let from = at(order, cast);
                if c.to == DType::F32
                    && nodes[g16.0].dtype == DType::F16
                    && !targets.contains(&cast)
                    && from.is_some_and(|f| !written_between(nodes, order, g16, f, i))
                {
                    nodes[id.0].inputs[k] = g16;
                }
            }
            i += 1;
            continue;
        }
        // the operand slots: a, b and the bias where there is one; a recurrence's weight (and
        // recurrent bias)
        let slots: Vec<usize> = match n.op {
            Op::MatMul(_) | Op::ImplicitGemm(_) | Op::ImplicitDgrad(_) => {
                (0..n.inputs.len()).collect()
            }
            // (an optional input, as a grouped convolution's bias, where the node has it)
            _ => {
                n.op.rounded_f16_inputs()
                    .iter()
                    .map(|&(k, _)| k)
                    .filter(|&k| k < n.inputs.len())
                    .collect()
            }
        };
        if n.dtype != DType::F16 {
            i += 1;
            continue;
        }
        for k in slots {
            let operand = nodes[id.0].inputs[k];
            // cast(x) or reshape(cast(x))
            let (cast, view) = match nodes[operand.0].op {
                Op::Reshape => (nodes[operand.0].inputs[0], Some(operand)),
                _ => (operand, None),
            };
            let Op::Cast(c) = nodes[cast.0].op else {
                continue;
            };
            let x = nodes[cast.0].inputs[0];
            if c.to != DType::F16 || nodes[x.0].dtype != DType::F32 || targets.contains(&cast) {
                continue;
            }
            let Some(from) = at(order, cast) else {
                continue;
            };
            if written_between(nodes, order, x, from, i) {
                continue;
            }
            let source = match view {
                None => x,
                Some(v) => {
                    // the same reshape of x itself (a view: no kernel)
                    let r = NodeId(nodes.len());
                    nodes.push(Node {
                        op: Op::Reshape,
                        inputs: vec![x],
                        shape: nodes[v.0].shape.clone(),
                        dtype: DType::F32,
                    });
                    order.insert(i, r);
                    i += 1;
                    r
                }
            };
            nodes[id.0].inputs[k] = source;
        }
        i += 1;
    }
    // casts (and their views) nothing reads any more
    loop {
        let unread: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|&c| {
                let n = &nodes[c.0];
                let dead_kind = matches!(n.op, Op::Cast(_))
                    || (matches!(n.op, Op::Reshape) && n.dtype == DType::F16);
                dead_kind
                    && !targets.contains(&c)
                    && !order.iter().any(|r| nodes[r.0].inputs.contains(&c))
            })
            .collect();
        if unread.is_empty() {
            break;
        }
        order.retain(|id| !unread.contains(id));
    }
}

/// Drops every node of `order` that computes exactly what an earlier node computes (the same op
/// with the same parameters, on the same inputs, of the same shape and type), pointing its
/// readers at the earlier one; in order, so that whole duplicated chains collapse. Sources,
/// in-place updates and targets (whose own storage is asked for) stay, and so does a node whose
/// inputs an in-place update writes between the two (the same op would read other values).
pub(crate) fn common_subexpressions(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut seen: HashMap<String, (NodeId, usize)> = HashMap::new();
    let mut same: HashMap<NodeId, NodeId> = HashMap::new();
    for pos in 0..order.len() {
        let id = order[pos];
        // read what duplicates stood for
        for x in nodes[id.0].inputs.iter_mut() {
            if let Some(&first) = same.get(x) {
                *x = first;
            }
        }
        let n = &nodes[id.0];
        let (rw_from, _) = n.op.binding_mode(n.inputs.len());
        if n.op.is_source() || rw_from < n.inputs.len() {
            continue;
        }
        // the op's parameters are all in its Debug form (no tensors: sources are skipped)
        let key = format!("{:?}|{:?}|{}|{}", n.op, n.inputs, n.shape, n.dtype);
        match seen.get(&key) {
            Some(&(first, at))
                if !targets.contains(&id)
                    && !n
                        .inputs
                        .iter()
                        .any(|&x| written_between(nodes, order, x, at, pos)) =>
            {
                same.insert(id, first);
            }
            Some(_) => {}
            None => {
                seen.insert(key, (id, pos));
            }
        }
    }
    order.retain(|id| !same.contains_key(id));
}

/// Most tensors one sum-of-squares kernel reads after [`merge_sum_squares`] (its WGSL has a
/// branch per tensor).
const MAX_SUM_SQUARES_MEMBERS: usize = 64;

/// Where the adapter binds more storage buffers than WebGPU's minimum of 8, re-cuts a sum of
/// squares' chain of `SumSquares` nodes (made 7 tensors per node by `Graph::sum_squares`, to run
/// anywhere) into as few nodes as it allows: gradient clipping's norm over a transformer's
/// parameters in one or two kernels instead of one per 7. The links keep their order (the
/// partial sums land where they did) and run where the chain's last one ran, which every
/// tensor is ready for; the last keeps its id (what the reduction reads).
pub(crate) fn merge_sum_squares(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    max_bindings: usize,
) {
    use crate::ops::reduce::{SumSquares, SUM_SQUARES_MEMBERS};
    // members per node: the output (or the previous link, written in place) takes a binding
    let per = max_bindings.saturating_sub(1).min(MAX_SUM_SQUARES_MEMBERS);
    if per <= SUM_SQUARES_MEMBERS {
        return;
    }
    let continued = |nodes: &[Node], order: &[NodeId], id: NodeId| {
        order.iter().any(|&r| {
            matches!(nodes[r.0].op, Op::SumSquares(s) if s.chained)
                && nodes[r.0].inputs.last() == Some(&id)
        })
    };
    let ends: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| matches!(nodes[id.0].op, Op::SumSquares(_)) && !continued(nodes, order, id))
        .collect();
    for end in ends {
        // the chain, first link first
        let mut chain = vec![end];
        while let Op::SumSquares(SumSquares { chained: true, .. }) = nodes[chain[0].0].op {
            let prev = *nodes[chain[0].0].inputs.last().expect("the previous link");
            chain.insert(0, prev);
        }
        let links = &chain[..chain.len() - 1];
        if chain.len() < 2
            || links
                .iter()
                .any(|&c| targets.contains(&c) || readers(nodes, order, c) != 1)
        {
            continue;
        }
        let Some(end_pos) = order.iter().position(|&o| o == end) else {
            continue;
        };
        // each link's tensors, read where the chain ends instead of where the link ran
        let mut members = Vec::new();
        let mut moved = false;
        for &c in &chain {
            let Op::SumSquares(s) = nodes[c.0].op else {
                unreachable!("a link of the chain")
            };
            let at = order.iter().position(|&o| o == c).unwrap_or(end_pos);
            for &m in &nodes[c.0].inputs[..s.members(nodes[c.0].inputs.len())] {
                moved |= at < end_pos && written_between(nodes, order, m, at, end_pos);
                members.push(m);
            }
        }
        let Op::SumSquares(last) = nodes[end.0].op else {
            continue;
        };
        let parts: Vec<Vec<NodeId>> = members.chunks(per).map(|p| p.to_vec()).collect();
        if moved || parts.len() >= chain.len() {
            continue;
        }
        let mut ids = chain[..parts.len() - 1].to_vec();
        ids.push(end);
        let (mut offset, mut prev) = (0, None);
        for (part, &id) in parts.iter().zip(&ids) {
            let shapes: Vec<Shape> = part.iter().map(|m| nodes[m.0].shape.clone()).collect();
            nodes[id.0].op = Op::SumSquares(SumSquares {
                offset,
                total: last.total,
                chained: prev.is_some(),
            });
            nodes[id.0].inputs = part.iter().copied().chain(prev).collect();
            offset += SumSquares::partials(&shapes);
            prev = Some(id);
        }
        order.retain(|id| id == &end || !chain.contains(id));
        let at = order.iter().position(|&o| o == end).unwrap_or(0);
        order.splice(at..at, ids[..ids.len() - 1].iter().copied());
    }
}

/// Most parameters one multi-tensor update kernel takes (its WGSL has a branch per parameter;
/// beyond this, more kernels are cheaper than one huge module to compile).
const MAX_GROUP_MEMBERS: usize = 64;

/// Merges the optimizer updates of `order` that share their kind, `hyper` and `scale` (a
/// training step's) into `OptimGroup` nodes: one dispatch for every parameter, or for as many
/// as `max_bindings` storage buffers allow. Updates read back (`outputs`) stay as they are; each
/// group takes the place (and id) of its last member (its value is that member's parameter),
/// the others read later (moving averages) become views of their parameters placed just after
/// it, and a member whose parameter, states or gradient some node between it and that place
/// touches, or that one reads, stays alone.
pub(crate) fn group_optimizer_updates(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
    max_bindings: usize,
) {
    use crate::ops::optim::{OptimGroup, OptimKind};
    // (kind, hyper, scale, members in order)
    let mut buckets: Vec<(OptimKind, NodeId, NodeId, Vec<NodeId>)> = Vec::new();
    for &id in order.iter() {
        let n = &nodes[id.0];
        let Op::OptimStep(step) = n.op else {
            continue;
        };
        if outputs.contains(&id) {
            continue;
        }
        let key = (step.kind, n.inputs[0], n.inputs[1]);
        match buckets.iter_mut().find(|b| (b.0, b.1, b.2) == key) {
            Some(b) => b.3.push(id),
            None => buckets.push((key.0, key.1, key.2, vec![id])),
        }
    }
    let at = |order: &[NodeId], id: NodeId| order.iter().position(|&o| o == id);
    let mut computed_scales = Vec::new();
    for (kind, hyper, scale, members) in buckets {
        // a scale that a small reduction makes (gradient clipping's coefficient from the partial
        // sums of squares) is computed by the group's threads: each adds up the partial sums
        // itself, and the reduction's kernel goes once nothing else reads its result
        let scale_from = match &nodes[scale.0].op {
            Op::ReducePrologue(r)
                if r.program.steps.is_empty()
                    && r.reduce.kind == crate::ops::reduce::ReduceKind::Sum
                    && r.input_shape.numel() <= MAX_SCALE_PARTIALS
                    && nodes[scale.0].shape.numel() == 1
                    && nodes[scale.0].dtype == DType::F32
                    && nodes[scale.0]
                        .inputs
                        .iter()
                        .all(|&i| nodes[i.0].dtype == DType::F32)
                    && !outputs.contains(&scale) =>
            {
                Some(r.clone())
            }
            _ => None,
        };
        let scale_inputs: Vec<NodeId> = match scale_from {
            Some(_) => nodes[scale.0].inputs.clone(),
            None => vec![scale],
        };
        let per = (max_bindings.saturating_sub(1 + scale_inputs.len()) / (2 + kind.n_states()))
            .min(MAX_GROUP_MEMBERS);
        if per < 2 {
            continue;
        }
        for chunk in members.chunks(per) {
            let Some(&last) = chunk.last() else { continue };
            let Some(q) = at(order, last) else { continue };
            // the members' storage, which no node between a member and the group may touch
            let kept: Vec<NodeId> = chunk
                .iter()
                .copied()
                .filter(|&m| {
                    !moved_past(
                        nodes,
                        order,
                        m,
                        q,
                        &nodes[m.0].inputs[3..],
                        nodes[m.0].inputs[2],
                    )
                })
                .collect();
            if kept.len() < 2 {
                continue;
            }
            // what makes the scale must hold the same values where the group runs
            let scale_pos = at(order, scale).unwrap_or(0);
            let computed = scale_from.is_some()
                && !scale_inputs
                    .iter()
                    .any(|&i| written_between(nodes, order, i, scale_pos, q));
            let group = OptimGroup {
                kind,
                members: kept.len(),
                scale_inputs: if computed { scale_inputs.len() } else { 1 },
                scale_from: if computed { scale_from.clone() } else { None },
            };
            // a gradient cast from f16 (mixed precision) that only this group's updates read
            // (an LSTM's two biases share one gradient) is read as f16 by the group itself:
            // the cast's kernel goes
            let mut casts = Vec::new();
            let grads: Vec<NodeId> = kept
                .iter()
                .map(|m| {
                    let grad = nodes[m.0].inputs[2];
                    let half = match nodes[grad.0].op {
                        Op::Cast(c) if c.to == DType::F32 => Some(nodes[grad.0].inputs[0]),
                        _ => None,
                    };
                    let others = order
                        .iter()
                        .any(|r| !kept.contains(r) && nodes[r.0].inputs.contains(&grad));
                    match half {
                        Some(h)
                            if nodes[h.0].dtype == DType::F16
                                && !others
                                && !outputs.contains(&grad)
                                && at(order, grad)
                                    .is_some_and(|p| !written_between(nodes, order, h, p, q)) =>
                        {
                            casts.push(grad);
                            h
                        }
                        _ => grad,
                    }
                })
                .collect();
            let mut inputs = vec![hyper];
            if computed {
                inputs.extend(&scale_inputs);
                computed_scales.push(scale);
            } else {
                inputs.push(scale);
            }
            inputs.extend(grads);
            for m in &kept {
                inputs.extend_from_slice(&nodes[m.0].inputs[3..]);
            }
            let host = *kept.last().expect("at least two members");
            nodes[host.0].op = Op::OptimGroup(group);
            nodes[host.0].inputs = inputs;
            // the others read after the group (moving averages of the new values): views of
            // their parameters (the group's own value is the last's); the casts it reads
            // through go
            members_as_views(nodes, order, &kept, 3, &casts);
        }
    }
    for scale in computed_scales {
        if readers(nodes, order, scale) == 0 {
            order.retain(|&id| id != scale);
        }
    }
}

/// Where the only reader of an f16 result of a hand-written kernel with a storage block (a layer
/// norm's input gradient, an attention's) is its cast to f32 (mixed precision's gradients
/// going back to f32 embeddings), the kernel stores the result as f32 itself, each value
/// rounded to f16 first (the value the cast reads: `codegen::storage::f16_wgsl_with`), and the
/// cast's kernel goes: the producer (and the reshapes between) become f32 and the cast a view
/// of them. Not for views, layout copies (whose being a view depends on the element size),
/// in-place updates or kernels that write past their result.
pub(crate) fn casts_into_producers(
    nodes: &mut [Node],
    order: &[NodeId],
    targets: &[NodeId],
    ch: &Choice,
) {
    for &c in order {
        let Op::Cast(cast) = nodes[c.0].op else {
            continue;
        };
        let (views, p) = under_reshapes(nodes, nodes[c.0].inputs[0]);
        let pn = &nodes[p.0];
        let shapes: Vec<&Shape> = pn.inputs.iter().map(|i| &nodes[i.0].shape).collect();
        let storage_block = pn
            .op
            .kernel(&shapes, &pn.shape, ch.target)
            .is_some_and(|k| crate::codegen::storage::f16_family(k.family).is_some());
        if cast.to != DType::F32
            || pn.dtype != DType::F16
            || !storage_block
            || matches!(pn.op, Op::AxisCopy(_))
            || pn.op.view_of(&shapes, &pn.shape, pn.dtype).is_some()
            || pn.op.binding_mode(pn.inputs.len()).0 < pn.inputs.len()
            || pn.op.scratch(&shapes, &pn.shape) != 0
            || !pn.inputs.iter().any(|i| nodes[i.0].dtype == DType::F16)
            || views
                .iter()
                .chain([&p])
                .any(|&v| targets.contains(&v) || readers(nodes, order, v) != 1)
        {
            continue;
        }
        for v in views.into_iter().chain([p]) {
            nodes[v.0].dtype = DType::F32;
        }
        nodes[c.0].op = Op::Reshape;
    }
}

/// Most partial sums an optimizer group adds up itself for its gradient scale
/// (`OptimGroup::scale_from`): every thread reads them all, so only a few (a sum of squares
/// has one per 4,096 gradient elements: 16 M parameters).
const MAX_SCALE_PARTIALS: usize = 4096;

/// The generated GEMM configuration for a product, or `None` for the portable kernel.
pub(crate) fn gemm_config(d: &ProductDims, ch: &Choice) -> Option<GemmConfig> {
    match ch.policy {
        GemmPolicy::Portable => None,
        GemmPolicy::Auto => gemm::choose(d.m, d.n, d.k, d.batch.numel(), ch.target),
        GemmPolicy::Tune => match ch.tuned.get(&tune_key(d)) {
            Some(c) if c.fits(ch.target) => Some(*c),
            _ => gemm::choose(d.m, d.n, d.k, d.batch.numel(), ch.target),
        },
        GemmPolicy::Fixed(c) => c.fits(ch.target).then_some(c),
    }
}

/// Whether a product runs on the tensor-core kernel: the device allows f16 inputs
/// (`Precision::Medium`, checked on this adapter), kernels are chosen automatically, and the
/// product is large enough.
pub(crate) fn uses_coop(d: &ProductDims, ch: &Choice) -> bool {
    ch.coop
        && matches!(ch.policy, GemmPolicy::Auto | GemmPolicy::Tune)
        && crate::codegen::coop::applies(d)
}

/// Whether a product runs on the skinny-product kernel (`codegen::matmul::gemv_kernel`): at
/// most 8 rows, kernels chosen automatically, not on tensor cores.
pub(crate) fn uses_gemv(d: &ProductDims, ch: &Choice) -> bool {
    matches!(ch.policy, GemmPolicy::Auto | GemmPolicy::Tune)
        && !uses_coop(d, ch)
        && gemm::gemv_applies(d, ch.target)
}

/// Whether a product of `d` computing `dtype` from operands of `in_dtypes` runs on the generated
/// tiled kernel, as [`select`] and `select_f16` decide (not on tensor cores, not on the
/// skinny-product kernel, not on the portable one).
fn runs_tiled(d: &ProductDims, dtype: DType, in_dtypes: &[DType], ch: &Choice) -> bool {
    if dtype == DType::F16 || in_dtypes.contains(&DType::F16) {
        let coop = ch.coop_f16 && crate::codegen::coop::applies(d);
        !coop && !uses_gemv(d, ch)
    } else {
        !uses_coop(d, ch) && !uses_gemv(d, ch) && gemm_config(d, ch).is_some()
    }
}

/// Where a `sum` reduces the operand `a` of a product along the product's K axis (a bias
/// gradient next to its weight gradient: `db = sum(dy, rows)` beside `dW = dy^T x` of a linear
/// layer, `sum(dy, columns)` beside `dy x cols^T` of a convolution), the product's kernel writes
/// those row sums of `op(a)` past its result (`MatMul::row_sums`) and the sum becomes a view of
/// them (`RowSums`): one kernel and one pass over `dy` fewer per layer. Only for unbatched
/// products on the generated tiled kernel whose sum is read after them.
pub(crate) fn row_sums_in_products(nodes: &mut [Node], order: &mut Vec<NodeId>, ch: &Choice) {
    use crate::ops::matmul::{Bias, RowSums};
    use crate::ops::reduce::ReduceKind;
    let mut moves: Vec<(NodeId, NodeId)> = Vec::new();
    for s_pos in 0..order.len() {
        let s = order[s_pos];
        let Op::Reduce(r) = nodes[s.0].op else {
            continue;
        };
        let x = nodes[s.0].inputs[0];
        if r.kind != ReduceKind::Sum || nodes[x.0].shape.rank() != 2 || r.axis > 1 {
            continue;
        }
        // a product reading x as `a`, with K along the reduced axis: op(a) = x^T for axis 0
        let product = order.iter().enumerate().find(|&(_, &p)| {
            let n = &nodes[p.0];
            matches!(n.op, Op::MatMul(mm) if mm.bias == Bias::None
                && !mm.relu
                && !mm.row_sums
                && mm.trans_a == (r.axis == 0))
                && n.inputs.len() == 2
                && n.inputs[0] == x
                && nodes[n.inputs[1].0].shape.rank() == 2
                && n.dtype == nodes[s.0].dtype
        });
        let Some((p_pos, &p)) = product else {
            continue;
        };
        let Op::MatMul(mm) = nodes[p.0].op else {
            continue;
        };
        let b = nodes[p.0].inputs[1];
        let Ok(d) = mm.dims(&nodes[x.0].shape, &nodes[b.0].shape) else {
            continue;
        };
        let in_dtypes = [nodes[x.0].dtype, nodes[b.0].dtype];
        // the sum is now ready when the product is: every reader must come later, and x must
        // not change in between
        let read_before = order[..=p_pos]
            .iter()
            .any(|&o| nodes[o.0].inputs.contains(&s));
        if read_before
            || !runs_tiled(&d, nodes[p.0].dtype, &in_dtypes, ch)
            || written_between(nodes, order, x, s_pos.min(p_pos), s_pos.max(p_pos))
        {
            continue;
        }
        nodes[p.0].op = Op::MatMul(MatMul {
            row_sums: true,
            ..mm
        });
        let n = &mut nodes[s.0];
        n.op = Op::RowSums(RowSums(r, None));
        n.inputs = vec![p, x];
        moves.push((s, p));
    }
    place_after(order, &moves);
}

/// The reshapes `x` is made of (`x` first, when it is one) and the node under them: what a
/// rewrite that sees through views of the same elements reaches.
pub(crate) fn under_reshapes(nodes: &[Node], mut x: NodeId) -> (Vec<NodeId>, NodeId) {
    let mut views = Vec::new();
    while let Op::Reshape = nodes[x.0].op {
        views.push(x);
        x = nodes[x.0].inputs[0];
    }
    (views, x)
}

/// The nodes of `order` that read `v`, each counted once per node.
pub(crate) fn readers(nodes: &[Node], order: &[NodeId], v: NodeId) -> usize {
    order
        .iter()
        .filter(|r| nodes[r.0].inputs.contains(&v))
        .count()
}

/// What reads `v` among `order`, looking through reshapes (and reshapes of those): the reshapes,
/// and the `(reader, input)` pairs of the other readers.
fn reads_through_reshapes(
    nodes: &[Node],
    order: &[NodeId],
    v: NodeId,
) -> (Vec<NodeId>, Vec<(NodeId, usize)>) {
    let reads = |v: NodeId| -> Vec<(NodeId, usize)> {
        order
            .iter()
            .flat_map(|&r| {
                let ins = &nodes[r.0].inputs;
                (0..ins.len())
                    .filter(move |&k| ins[k] == v)
                    .map(move |k| (r, k))
            })
            .collect()
    };
    let (mut views, mut uses) = (Vec::new(), Vec::new());
    let mut pending = reads(v);
    while let Some((r, k)) = pending.pop() {
        if matches!(nodes[r.0].op, Op::Reshape) {
            views.push(r);
            pending.extend(reads(r));
        } else {
            uses.push((r, k));
        }
    }
    (views, uses)
}

/// Moves each `(view, writer)`'s view right after its writer in `order`: a view of what a
/// kernel writes past its output is ready only once that kernel ran.
fn place_after(order: &mut Vec<NodeId>, moves: &[(NodeId, NodeId)]) {
    for &(view, writer) in moves {
        order.retain(|&o| o != view);
        let at = order
            .iter()
            .position(|&o| o == writer)
            .map_or(order.len(), |i| i + 1);
        order.insert(at, view);
    }
}

/// Where a normalization reads the `GroupStats` of its own input and its groups are small
/// (`norm::stats_inside`: a layer norm's rows), its kernel computes them itself
/// (`Op::NormalizeStats`): one kernel and one pass over `x` fewer. Statistics something else
/// reads (the backward's kernels) are written past its output in f32, and the statistics node
/// becomes a view of them (`Op::StatsOf`); ones nothing else reads (inference, f32 or f16) stay
/// in the kernel and their node goes. An f16 normalization whose statistics are read so stores
/// its result as f32 (rounded to f16 first, `codegen::storage::f16_wgsl_with`) where products
/// alone read that result (a pre-norm transformer's projections and their weight gradients),
/// which round it on load, and it is small (`F32_NORM_MAX` elements: the wider store costs
/// less than the statistics' kernel).
pub(crate) fn stats_inside_normalization(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut moves: Vec<(NodeId, NodeId)> = Vec::new();
    let mut unread: Vec<NodeId> = Vec::new();
    for y_pos in 0..order.len() {
        let y = order[y_pos];
        let Op::Normalize(norm) = nodes[y.0].op else {
            continue;
        };
        if norm.relu {
            continue;
        }
        let (x, stats) = (nodes[y.0].inputs[0], nodes[y.0].inputs[1]);
        let read_before = order[..y_pos]
            .iter()
            .any(|&o| nodes[o.0].inputs.contains(&stats));
        let read_elsewhere = targets.contains(&stats)
            || order
                .iter()
                .any(|&o| o != y && nodes[o.0].inputs.contains(&stats));
        let f32 = nodes[y.0].dtype == DType::F32 && nodes[x.0].dtype == DType::F32;
        // an f16 result read by products alone (directly or through reshapes) can be stored f32
        let widened = match read_elsewhere && !f32 {
            true => f32_for_products(nodes, order, targets, y, stats),
            false => None,
        };
        if !matches!(nodes[stats.0].op, Op::GroupStats(s) if s == crate::ops::norm::GroupStats::WHOLE)
            || nodes[stats.0].inputs[0] != x
            || (read_elsewhere && !f32 && widened.is_none())
            || !crate::ops::norm::stats_inside(&nodes[x.0].shape)
            || read_before
        {
            continue;
        }
        let s_pos = order.iter().position(|&o| o == stats).unwrap_or(y_pos);
        if written_between(nodes, order, x, s_pos, y_pos) {
            continue;
        }
        for v in widened.into_iter().flatten() {
            nodes[v.0].dtype = DType::F32;
        }
        let n = &mut nodes[y.0];
        n.op = Op::NormalizeStats(crate::ops::norm::NormalizeStats {
            norm,
            running: None,
            stats: read_elsewhere,
        });
        n.inputs.remove(1);
        if read_elsewhere {
            let s = &mut nodes[stats.0];
            s.op = Op::StatsOf(crate::ops::norm::GroupStats::WHOLE);
            s.inputs = vec![y, x];
            moves.push((stats, y));
        } else {
            unread.push(stats);
        }
    }
    order.retain(|o| !unread.contains(o));
    place_after(order, &moves);
}

/// Most elements of an f16 normalization's result that [`stats_inside_normalization`] stores as
/// f32 (4 MB) to keep its statistics past it.
const F32_NORM_MAX: usize = 1 << 20;

/// Where f16 products alone read the f16 node `y` (directly or through reshapes) but for
/// `except`, and neither `y` nor those reshapes is a target, and `y` has at most
/// [`F32_NORM_MAX`] elements: `y` and the reshapes, which may then be stored as f32 (the
/// products round them on load).
fn f32_for_products(
    nodes: &[Node],
    order: &[NodeId],
    targets: &[NodeId],
    y: NodeId,
    except: NodeId,
) -> Option<Vec<NodeId>> {
    if nodes[y.0].dtype != DType::F16 || nodes[y.0].shape.numel() > F32_NORM_MAX {
        return None;
    }
    let mut found = vec![y];
    let mut k = 0;
    while k < found.len() {
        let v = found[k];
        if targets.contains(&v) {
            return None;
        }
        for &r in order {
            if r == except || !nodes[r.0].inputs.contains(&v) {
                continue;
            }
            match nodes[r.0].op {
                Op::Reshape => found.push(r),
                Op::MatMul(_) if nodes[r.0].dtype == DType::F16 => {}
                _ => return None,
            }
        }
        k += 1;
    }
    Some(found)
}

/// Input `p` of the `add` node `id`, if it is a pad of the add's shape and type along one
/// axis (a single-input `AxisCopy` placing its source inside) that nothing else reads and
/// nobody asked for: `(axis, position, extent, source)`.
fn sole_pad(
    nodes: &[Node],
    order: &[NodeId],
    targets: &[NodeId],
    id: NodeId,
    p: NodeId,
) -> Option<(usize, isize, isize, NodeId)> {
    use crate::ops::layout::AxisCopy;
    let Op::AxisCopy(AxisCopy {
        axis,
        a_start,
        b_start: None,
        strided: false,
    }) = nodes[p.0].op
    else {
        return None;
    };
    let (out, src) = (&nodes[id.0].shape, nodes[p.0].inputs[0]);
    let extent = nodes[src.0].shape.dims()[axis] as isize;
    let fits = nodes[p.0].shape == *out
        && a_start >= 0
        && a_start + extent <= out.dims()[axis] as isize
        && nodes[src.0].dtype == nodes[id.0].dtype
        && !targets.contains(&p)
        && readers(nodes, order, p) == 1;
    fits.then_some((axis, a_start, extent, src))
}

/// One side of [`adjacent_narrows_into_one_pad`]: a pad at `at` along `axis` of the narrow of
/// `tensor` from `start`, `extent` long, made of `nodes` (the pad, reshapes, the narrow).
struct PaddedNarrow {
    at: isize,
    start: isize,
    extent: isize,
    tensor: NodeId,
    axis: usize,
    nodes: Vec<NodeId>,
}

/// Where an `add` sums two pads of its own shape along one axis of two narrows of one tensor
/// along that axis (possibly through reshapes that come back to the narrow's shape), adjacent
/// in the tensor and placed side by side by the pads in the same order, and nothing else reads
/// them (the gradients of an encoder's final `h` and `c`: its decoder's `dh0 | dc0`, cut from
/// the decoder's backward and padded back into the encoder's states), the add becomes one pad
/// of one narrow of both: two copies and a sum fewer. Before [`pads_into_lstm_backward`],
/// which then reads that narrow as its window (and [`strided_operands`] the window in place).
pub(crate) fn adjacent_narrows_into_one_pad(
    nodes: &mut Vec<Node>,
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::binary::BinaryOp;
    use crate::ops::layout::AxisCopy;
    let single = |axis: usize, a_start: isize| AxisCopy {
        axis,
        a_start,
        b_start: None,
        strided: false,
    };
    let mut dropped = Vec::new();
    let mut pos = 0;
    while pos < order.len() {
        let id = order[pos];
        pos += 1;
        if !matches!(nodes[id.0].op, Op::Binary(BinaryOp::Add)) || nodes[id.0].inputs.len() != 2 {
            continue;
        }
        let part = |p: NodeId| {
            let (axis, at, extent, src) = sole_pad(nodes, order, targets, id, p)?;
            // the narrow under reshapes back to its own shape
            let (mut chain, n) = under_reshapes(nodes, src);
            let Op::AxisCopy(cut) = nodes[n.0].op else {
                return None;
            };
            let tensor = nodes[n.0].inputs[0];
            chain.extend([p, n]);
            let fits = cut == single(axis, cut.a_start)
                && cut.a_start <= 0
                && nodes[n.0].shape == nodes[src.0].shape
                && nodes[tensor.0].shape.rank() == nodes[n.0].shape.rank()
                && -cut.a_start + extent <= nodes[tensor.0].shape.dims()[axis] as isize
                && chain
                    .iter()
                    .all(|&c| !targets.contains(&c) && readers(nodes, order, c) == 1);
            fits.then_some(PaddedNarrow {
                at,
                start: -cut.a_start,
                extent,
                tensor,
                axis,
                nodes: chain,
            })
        };
        let (Some(a), Some(b)) = (part(nodes[id.0].inputs[0]), part(nodes[id.0].inputs[1])) else {
            continue;
        };
        let (a, b) = if a.at <= b.at { (a, b) } else { (b, a) };
        let first = |c: &[NodeId]| {
            c.iter()
                .filter_map(|n| order.iter().position(|o| o == n))
                .min()
                .unwrap_or(pos)
        };
        let from = first(&a.nodes).min(first(&b.nodes));
        if a.tensor != b.tensor
            || a.axis != b.axis
            || a.at + a.extent != b.at
            || a.start + a.extent != b.start
            || written_between(nodes, order, a.tensor, from, pos - 1)
        {
            continue;
        }
        let mut dims = nodes[a.tensor.0].shape.dims().to_vec();
        dims[a.axis] = (a.extent + b.extent) as usize;
        let both = NodeId(nodes.len());
        nodes.push(Node {
            op: Op::AxisCopy(single(a.axis, -a.start)),
            inputs: vec![a.tensor],
            shape: Shape(dims),
            dtype: nodes[id.0].dtype,
        });
        let n = &mut nodes[id.0];
        n.op = Op::AxisCopy(single(a.axis, a.at));
        n.inputs = vec![both];
        order.insert(pos - 1, both);
        pos += 1;
        dropped.extend(a.nodes);
        dropped.extend(b.nodes);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where an `add` sums two pads of its own shape along one axis whose copied ranges do not
/// overlap (the gradients of two narrows of one tensor: a sequence model's final `h` and `c`
/// taken from its recurrence's states), and nothing else reads the pads, the add becomes one
/// two-input copy (`AxisCopy` with `b_start`: each range from its source, zeros around): one
/// kernel where there were three. After [`pads_into_lstm_backward`], which takes single pads.
pub(crate) fn disjoint_pads_into_one_copy(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::binary::BinaryOp;
    use crate::ops::layout::AxisCopy;
    let mut dropped = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        if !matches!(nodes[id.0].op, Op::Binary(BinaryOp::Add)) || nodes[id.0].inputs.len() != 2 {
            continue;
        }
        let pad = |p: NodeId| sole_pad(nodes, order, targets, id, p);
        let (p, q) = (nodes[id.0].inputs[0], nodes[id.0].inputs[1]);
        let (Some(a), Some(b)) = (pad(p), pad(q)) else {
            continue;
        };
        let disjoint = a.1 + a.2 <= b.1 || b.1 + b.2 <= a.1;
        let at = |n: NodeId| order.iter().position(|&o| o == n).unwrap_or(pos);
        if p == q
            || a.0 != b.0
            || !disjoint
            || written_between(nodes, order, a.3, at(p), pos)
            || written_between(nodes, order, b.3, at(q), pos)
        {
            continue;
        }
        let n = &mut nodes[id.0];
        n.op = Op::AxisCopy(AxisCopy {
            axis: a.0,
            a_start: a.1,
            b_start: Some(b.1),
            strided: false,
        });
        n.inputs = vec![a.3, b.3];
        dropped.extend([p, q]);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a table's gradient (`EmbeddingBackward`) reads, possibly through reshapes, the sum over
/// the leading axis of `g` (`(B, M)`, `M` the gradient rows' elements: a lookup broadcast over a
/// batch, a transformer's positions) and nothing else reads that sum, the gradient kernel reads
/// `g` itself and adds its `B` blocks in (`EmbeddingBackward::repeat`): the sum's kernel and a
/// pass go.
pub(crate) fn batch_sums_into_embedding_backward(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::embedding::EmbeddingBackward;
    use crate::ops::reduce::{Reduce, ReduceKind};
    let mut dropped = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let Op::EmbeddingBackward(
            e @ EmbeddingBackward {
                repeat: 1,
                sorted: false,
            },
        ) = nodes[id.0].op
        else {
            continue;
        };
        let dy = nodes[id.0].inputs[1];
        let (mut chain, s) = under_reshapes(nodes, dy);
        let Op::Reduce(Reduce {
            kind: ReduceKind::Sum,
            axis: 0,
            ..
        }) = nodes[s.0].op
        else {
            continue;
        };
        let (_, g) = under_reshapes(nodes, nodes[s.0].inputs[0]);
        let summed = &nodes[nodes[s.0].inputs[0].0].shape;
        let batch = summed.dims()[0];
        let s_pos = order.iter().position(|&o| o == s).unwrap_or(pos);
        chain.push(s);
        if summed.rank() != 2
            || summed.dims()[1] != nodes[dy.0].shape.numel()
            || nodes[g.0].dtype != nodes[dy.0].dtype
            || chain
                .iter()
                .any(|&c| targets.contains(&c) || readers(nodes, order, c) != 1)
            || written_between(nodes, order, g, s_pos, pos)
        {
            continue;
        }
        // the summed tensor (`g` or a reshape of it: a view)
        let source = nodes[s.0].inputs[0];
        let n = &mut nodes[id.0];
        n.op = Op::EmbeddingBackward(EmbeddingBackward { repeat: batch, ..e });
        n.inputs[1] = source;
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a table's gradient (`EmbeddingBackward`) would scan many indices for many rows
/// (`ops::embedding::sorts_rows`: a language model's vocabulary), an `EmbeddingRows` node
/// lists each row's occurrences first and the gradient reads that list
/// (`EmbeddingBackward::sorted`): one small kernel more, and the gradient's work goes from
/// `V * ceil(E / 256) * N` index reads to `N + V * E`. Gradients of tables of one size from
/// the same indices share one list.
pub(crate) fn sorted_embedding_backward(nodes: &mut Vec<Node>, order: &mut Vec<NodeId>) {
    use crate::ops::embedding::{sorts_rows, EmbeddingBackward, EmbeddingRows};
    let mut lists: HashMap<(NodeId, usize), NodeId> = HashMap::new();
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let n = &nodes[id.0];
        let Op::EmbeddingBackward(e @ EmbeddingBackward { sorted: false, .. }) = n.op else {
            i += 1;
            continue;
        };
        let (v, width) = (n.shape.dims()[0], n.shape.dims()[1]);
        let indices = n.inputs[0];
        let lookups = nodes[indices.0].shape.numel();
        if !sorts_rows(v, width, lookups) {
            i += 1;
            continue;
        }
        let list = match lists.get(&(indices, v)) {
            Some(&l) => l,
            None => {
                let l = NodeId(nodes.len());
                nodes.push(Node {
                    op: Op::EmbeddingRows(EmbeddingRows { rows: v }),
                    inputs: vec![indices],
                    shape: Shape(vec![v + lookups]),
                    dtype: DType::F32,
                });
                order.insert(i, l);
                i += 1;
                lists.insert((indices, v), l);
                l
            }
        };
        let n = &mut nodes[id.0];
        n.op = Op::EmbeddingBackward(EmbeddingBackward { sorted: true, ..e });
        n.inputs[0] = list;
        i += 1;
    }
}

/// Where a layer norm's input gradient (`NormalizeBackward`, weighted), possibly through
/// reshapes, is one operand of an `add` of as many elements and nothing else reads it (the
/// gradient of a residual block `x + f(layer_norm(x))` meeting the one that skips the block),
/// the add becomes that kernel with the other operand added to its output
/// (`NormalizeBackward::residual`): one kernel and one pass fewer per layer norm.
pub(crate) fn residual_into_normalize_backward(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::binary::BinaryOp;
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let a = order[pos];
        if !matches!(nodes[a.0].op, Op::Binary(BinaryOp::Add)) || nodes[a.0].inputs.len() != 2 {
            continue;
        }
        let numel = nodes[a.0].shape.numel();
        let found = (0..2).find_map(|k| {
            let (u, v) = (nodes[a.0].inputs[k], nodes[a.0].inputs[1 - k]);
            // the gradient under its reshapes, each read by nothing else
            let (chain, nb) = under_reshapes(nodes, u);
            let sole = |n: NodeId| !targets.contains(&n) && readers(nodes, order, n) == 1;
            let fits = matches!(nodes[nb.0].op, Op::NormalizeBackward(o) if o.weighted && !o.residual)
                && nodes[nb.0].shape.numel() == numel
                && nodes[v.0].shape.numel() == numel
                && u != v
                && nodes[v.0].dtype == nodes[a.0].dtype
                && nodes[nb.0].dtype == nodes[a.0].dtype
                && sole(nb)
                && chain.iter().all(|&c| sole(c));
            fits.then_some((nb, v, chain))
        });
        let Some((nb, v, chain)) = found else {
            continue;
        };
        // the gradient's reads move from its own step to the add's
        let nb_pos = order.iter().position(|&o| o == nb).unwrap_or(pos);
        if nodes[nb.0]
            .inputs
            .iter()
            .any(|&i| written_between(nodes, order, i, nb_pos, pos))
        {
            continue;
        }
        let Op::NormalizeBackward(o) = nodes[nb.0].op else {
            continue;
        };
        let mut inputs = nodes[nb.0].inputs.clone();
        inputs.push(v);
        let n = &mut nodes[a.0];
        n.op = Op::NormalizeBackward(crate::ops::norm::NormalizeBackward {
            residual: true,
            ..o
        });
        n.inputs = inputs;
        dropped.push(nb);
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a layer norm's parameter gradients (`GroupSums`, `inner`, whole or in blocks) and its
/// input gradient (the weighted `NormalizeBackward`, with or without a residual) read the same
/// `dy`, `x` and statistics, one kernel computes both: the input gradient's writes the sums
/// in workgroups after its own (`NormalizeBackward::sums`, the sums node its last input, bound
/// read_write) and the sums node keeps its storage but no kernel (`Op::Written`):
/// one dispatch fewer per layer norm in training, and the two reductions side by side on the
/// GPU. The sums node moves to just before the kernel, and what reads it there (its views, the
/// blocks' reduction) to just after. Run last: no later pass may move a reader before it.
pub(crate) fn sums_in_normalize_backward(nodes: &mut [Node], order: &mut Vec<NodeId>) {
    let mut i = 0;
    while i < order.len() {
        let nb = order[i];
        i += 1;
        let Op::NormalizeBackward(o) = nodes[nb.0].op else {
            continue;
        };
        if !o.weighted || o.sums {
            continue;
        }
        let operands = &nodes[nb.0].inputs[..3];
        let Some(s_pos) = order.iter().position(|&s| {
            matches!(nodes[s.0].op, Op::GroupSums(g) if g.inner && g.eps == o.eps)
                && nodes[s.0].inputs == operands
        }) else {
            continue;
        };
        let (s, nb_pos) = (order[s_pos], i - 1);
        if operands
            .iter()
            .any(|&x| written_between(nodes, order, x, s_pos, nb_pos))
        {
            continue;
        }
        // what reads the sums before the kernel moves after it
        let Some(after) = readers_to_move(nodes, order, s, s_pos, nb_pos)
            .filter(|after| !after.iter().any(|r| nodes[nb.0].inputs.contains(r)))
        else {
            continue;
        };
        i = written_at(order, s, &after, nb);
        let sums = std::mem::replace(&mut nodes[s.0].op, Op::Reshape);
        nodes[s.0].op = Op::Written(Box::new(sums));
        let n = &mut nodes[nb.0];
        n.op = Op::NormalizeBackward(crate::ops::norm::NormalizeBackward { sums: true, ..o });
        n.inputs.push(s);
    }
}

/// The nodes of `order` strictly between positions `from` and `to` that read `v` or read what
/// does, in order: what must move after the node at `to` where a rewrite has that node write
/// `v` (`Op::Written`). `None` where one of them writes in place (its effect would move) or
/// reads what a node before `to` writes in place.
fn readers_to_move(
    nodes: &[Node],
    order: &[NodeId],
    v: NodeId,
    from: usize,
    to: usize,
) -> Option<Vec<NodeId>> {
    let mut after: Vec<NodeId> = Vec::new();
    for (r_pos, &r) in order.iter().enumerate().take(to).skip(from + 1) {
        let n = &nodes[r.0];
        if !n.inputs.iter().any(|x| *x == v || after.contains(x)) {
            continue;
        }
        let pure = n.op.binding_mode(n.inputs.len()) == (n.inputs.len(), true);
        if !pure
            || n.inputs
                .iter()
                .any(|&x| written_between(nodes, order, x, r_pos, to))
        {
            return None;
        }
        after.push(r);
    }
    Some(after)
}

/// Places `v` (which `writer` writes) just before `writer` and `after` (its readers found by
/// [`readers_to_move`]) just after, in their order; returns the position past them.
fn written_at(order: &mut Vec<NodeId>, v: NodeId, after: &[NodeId], writer: NodeId) -> usize {
    order.retain(|o| *o != v && !after.contains(o));
    let at = order
        .iter()
        .position(|&o| o == writer)
        .unwrap_or(order.len());
    order.insert(at, v);
    order.splice(at + 2..at + 2, after.iter().copied());
    at + 2 + after.len()
}

/// Where a normalization's reductions over large groups would leave a large GPU mostly idle,
/// each block of a group gets its own workgroups and results (a new node, placed before the
/// node) and the node itself combines them (same id and shape):
///
/// - parameter gradients (`GroupSums`) over more than twice `norm::INNER_SUMS_BLOCK_ROWS` rows
///   (a layer norm's, per feature: `ceil(features / 64)` workgroups) or each group's more than
///   twice `norm::GROUP_SUMS_BLOCK_LEN` elements (a batch norm's, a workgroup per channel): the
///   blocks' partial sums, added by a reduction;
/// - statistics (`GroupStats`) of groups of more than twice `norm::GROUP_STATS_BLOCK_LEN`
///   elements (a batch norm's channels): each block's mean and variance, merged by
///   `MergeStats`.
pub(crate) fn split_group_reductions(nodes: &mut Vec<Node>, order: &mut Vec<NodeId>) {
    use crate::ops::norm::{
        GroupStats, GroupSums, MergeStats, GROUP_STATS_BLOCK_LEN, GROUP_SUMS_BLOCK_LEN,
        INNER_SUMS_BLOCK_ROWS,
    };
    use crate::ops::reduce::{Reduce, ReduceKind};
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let n = &nodes[id.0];
        // (OUTER, GROUPS, INNER) of the reduced tensor
        let d = match n.op {
            Op::GroupSums(_) | Op::GroupStats(_) => nodes[n.inputs[0].0].shape.dims().to_vec(),
            _ => Vec::new(),
        };
        // elements (rows) per group and per block
        let split = match n.op {
            _ if d.len() != 3 => None,
            Op::GroupSums(s) if s.blocks == 1 && s.inner => {
                Some((d[0] * d[1], INNER_SUMS_BLOCK_ROWS))
            }
            Op::GroupSums(s) if s.blocks == 1 => Some((d[0] * d[2], GROUP_SUMS_BLOCK_LEN)),
            Op::GroupStats(s) if s == GroupStats::WHOLE => {
                Some((d[0] * d[2], GROUP_STATS_BLOCK_LEN))
            }
            _ => None,
        };
        let Some((len, block)) = split.filter(|&(len, block)| len > 2 * block) else {
            i += 1;
            continue;
        };
        let blocks = len.div_ceil(block);
        let (partial, combine) = match n.op {
            Op::GroupSums(sums) => (
                Op::GroupSums(GroupSums { blocks, ..sums }),
                Op::Reduce(Reduce {
                    kind: ReduceKind::Sum,
                    axis: 0,
                    keepdim: false,
                }),
            ),
            _ => (
                Op::GroupStats(GroupStats {
                    blocks,
                    running: None,
                }),
                Op::MergeStats(MergeStats {
                    count: len,
                    running: None,
                }),
            ),
        };
        let mut shape = vec![blocks];
        shape.extend(n.shape.dims());
        let pid = NodeId(nodes.len());
        nodes.push(Node {
            op: partial,
            inputs: nodes[id.0].inputs.clone(),
            shape: Shape(shape),
            dtype: nodes[id.0].dtype,
        });
        let node = &mut nodes[id.0];
        node.op = combine;
        node.inputs = vec![pid];
        order.insert(i, pid);
        i += 2;
    }
}

/// Where a running-statistics update (`RunningUpdate`, two rows: a batch norm's mean and
/// variance) reads the statistics of a `GroupStats` kernel of whole groups, a `MergeStats`
/// (which `split_group_reductions` made) or an affine `NormalizeStats` (through `StatsOf`),
/// that kernel moves the running statistics itself as it computes the statistics
/// (`running`: the parameters bound read_write after its other inputs) and the update's
/// kernel goes: one dispatch fewer per batch norm in training. Not where the update's value is
/// read or asked for, or where a node between the two touches the running statistics.
pub(crate) fn running_update_in_stats(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    outputs: &[NodeId],
) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let u = order[pos];
        let Op::RunningUpdate(r) = nodes[u.0].op else {
            continue;
        };
        // the kernel that computes the statistics
        let mut stats = nodes[u.0].inputs[0];
        if matches!(nodes[stats.0].op, Op::StatsOf(_)) {
            stats = nodes[stats.0].inputs[0];
        }
        let fits = match nodes[stats.0].op {
            Op::GroupStats(s) => s == crate::ops::norm::GroupStats::WHOLE,
            Op::MergeStats(m) => m.running.is_none(),
            Op::NormalizeStats(n) => n.norm.affine && n.running.is_none(),
            _ => false,
        };
        let read = order.iter().any(|o| nodes[o.0].inputs.contains(&u));
        if r.rows != 2 || !fits || outputs.contains(&u) || read {
            continue;
        }
        let Some(s_pos) = order.iter().position(|&o| o == stats) else {
            continue;
        };
        // the running statistics: nothing between may read or write them
        let running: Vec<NodeId> = nodes[u.0].inputs[1..]
            .iter()
            .map(|&i| storage_root(nodes, i))
            .collect();
        let touched = order[s_pos + 1..pos].iter().any(|o| {
            nodes[o.0]
                .inputs
                .iter()
                .any(|&i| running.contains(&storage_root(nodes, i)))
        });
        if touched {
            continue;
        }
        let extra = nodes[u.0].inputs[1..].to_vec();
        let n = &mut nodes[stats.0];
        match &mut n.op {
            Op::GroupStats(s) => s.running = Some(r),
            Op::MergeStats(m) => m.running = Some(r),
            Op::NormalizeStats(s) => s.running = Some(r),
            _ => continue,
        }
        n.inputs.extend(extra);
        dropped.push(u);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a recurrence's backward (LSTM, GRU, RNN) reads a gradient of its packed state that pads
/// (along the steps or the columns) made from a smaller tensor (a classifier reading an LSTM's
/// last `h`: `[1, B, H]` padded to `[1, B, 6H]`, then to `[T, B, 6H]`), the kernel reads that
/// tensor as its window of the gradient (`LstmBackward::dp_window`, zeros around it) and the
/// pads go: up to two kernels and a `[T, B, 6H]` tensor of mostly zeros written and read per
/// training step.
pub(crate) fn pads_into_lstm_backward(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::lstm::DpWindow;
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let l = order[pos];
        let window = match nodes[l.0].op {
            Op::LstmBackward(b) => b.dp_window,
            Op::GruBackward(b) => b.dp_window,
            Op::RnnBackward(b) => b.dp_window,
            _ => continue,
        };
        let p = nodes[nodes[l.0].inputs[0].0].shape.dims().to_vec();
        if window.is_some() || p.len() != 3 {
            continue;
        }
        let mut win = DpWindow {
            t0: 0,
            steps: p[0],
            c0: 0,
            width: p[2],
            rows: None,
        };
        let mut d = nodes[l.0].inputs[5];
        let mut chain = Vec::new();
        while let Op::AxisCopy(a) = nodes[d.0].op {
            let src = nodes[d.0].inputs[0];
            let s = nodes[src.0].shape.dims();
            let sole = !targets.contains(&d) && readers(nodes, order, d) == 1;
            if a.b_start.is_some() || a.a_start < 0 || s.len() != 3 || s[1] != p[1] || !sole {
                break;
            }
            let (start, len) = (a.a_start as usize, s[a.axis]);
            match a.axis {
                0 if start + len <= win.steps => {
                    win.t0 += start;
                    win.steps = len;
                }
                2 if start + len <= win.width => {
                    win.c0 += start;
                    win.width = len;
                }
                _ => break,
            }
            chain.push(d);
            d = src;
        }
        let Some(&first) = chain.last() else {
            continue;
        };
        // the window's tensor is read at the backward's step instead of the first pad's
        let from = order.iter().position(|&o| o == first).unwrap_or(pos);
        if written_between(nodes, order, d, from, pos) {
            continue;
        }
        let n = &mut nodes[l.0];
        match &mut n.op {
            Op::LstmBackward(b) => b.dp_window = Some(win),
            Op::GruBackward(b) => b.dp_window = Some(win),
            Op::RnnBackward(b) => b.dp_window = Some(win),
            _ => continue,
        }
        n.inputs[5] = d;
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a cross-entropy loss has more logits than its one-workgroup kernel should fold
/// (`loss::ONE_WORKGROUP_MAX`: a language model's tokens times its vocabulary), or in training
/// more than that kernel computes with its gradient (`loss::WITH_GRAD_MAX`, where
/// [`gradient_with_cross_entropy`] will have the row kernel compute it instead), each row's loss
/// runs on a few threads of its own over the whole GPU (`CrossEntropyRows`, a new node placed
/// before it) and the node itself becomes their mean (a reduction, same id and shape).
pub(crate) fn split_cross_entropy(
    nodes: &mut Vec<Node>,
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::loss::{CrossEntropy, CrossEntropyRows, ONE_WORKGROUP_MAX, WITH_GRAD_MAX};
    use crate::ops::reduce::{Reduce, ReduceKind};
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let Op::CrossEntropy(CrossEntropy { opts, .. }) = nodes[id.0].op else {
            i += 1;
            continue;
        };
        let (logits, labels) = (nodes[id.0].inputs[0], nodes[id.0].inputs[1]);
        let numel = nodes[logits.0].shape.numel();
        // in training, beyond what one workgroup computes with its gradient: the row kernel
        // with the gradient and a mean, as many kernels as the loss and its backward but
        // over the whole GPU, reading the logits twice rather than five times
        let training = numel > WITH_GRAD_MAX
            && gradient_for_loss_kernel(nodes, order, targets, i, (logits, labels), opts).is_some();
        if numel <= ONE_WORKGROUP_MAX && !training {
            i += 1;
            continue;
        }
        let rows = nodes[nodes[id.0].inputs[0].0].shape.dims()[0];
        let rid = NodeId(nodes.len());
        nodes.push(Node {
            op: Op::CrossEntropyRows(CrossEntropyRows {
                with_grad: false,
                opts,
                ..Default::default()
            }),
            inputs: nodes[id.0].inputs.clone(),
            shape: Shape(vec![rows]),
            dtype: DType::F32,
        });
        let node = &mut nodes[id.0];
        node.op = Op::Reduce(Reduce {
            kind: ReduceKind::Mean,
            axis: 0,
            keepdim: true,
        });
        node.inputs = vec![rid];
        order.insert(i, rid);
        i += 2;
    }
}

/// `id` and what it views, down to a source (input, parameter, constant), the source first,
/// where `id` is a source or a chain of reshapes and narrows viewing one: no kernels, so they
/// may be placed anywhere before their readers.
fn views_of_source(nodes: &[Node], id: NodeId) -> Option<Vec<NodeId>> {
    let mut chain = vec![id];
    let mut cur = id;
    while !nodes[cur.0].op.is_source() {
        if !matches!(nodes[cur.0].op, Op::Reshape | Op::AxisCopy(_)) {
            return None;
        }
        cur = nodes[cur.0].inputs[super::liveness::view_of(nodes, cur)?];
        chain.push(cur);
    }
    chain.reverse();
    Some(chain)
}

/// The nodes `order` lists after `order[l_pos]` that `dy` needs (`dy` itself included), in
/// their order, where they may all run before that node instead: none of them needs it or
/// writes in place, and nothing listed between writes what they read. A source (or a view
/// of one: dynamic loss scaling's scale) is bound before any kernel runs wherever `order`
/// lists it; a computed gradient (the mean over the rows kept of a cross-entropy with
/// `ignore_index`: `dy` over their count, from the labels alone) moves with its inputs.
fn hoistable(nodes: &[Node], order: &[NodeId], l_pos: usize, dy: NodeId) -> Option<Vec<NodeId>> {
    let l = order[l_pos];
    let at = |n: NodeId| order.iter().position(|&o| o == n);
    let mut need: Vec<(usize, NodeId)> = Vec::new();
    let mut stack = vec![dy];
    while let Some(n) = stack.pop() {
        if n == l {
            return None;
        }
        match at(n) {
            Some(p) if p > l_pos && !need.iter().any(|&(_, m)| m == n) => {
                need.push((p, n));
                stack.extend(nodes[n.0].inputs.iter().copied());
            }
            _ => {}
        }
    }
    need.sort();
    let movable = need.iter().all(|&(p, n)| {
        let node = &nodes[n.0];
        let in_place = node.op.binding_mode(node.inputs.len()).0 < node.inputs.len();
        let source = views_of_source(nodes, n).is_some();
        source
            || !in_place
                && node
                    .inputs
                    .iter()
                    .all(|&x| !written_between(nodes, order, x, l_pos, p))
    });
    movable.then(|| need.into_iter().map(|(_, n)| n).collect())
}

/// The backward node of the cross-entropy at `order[l_pos]` of `(logits, labels)` whose
/// gradient that loss's kernel can write instead ([`gradient_with_cross_entropy`]), with the
/// nodes its loss gradient needs that must move before the loss ([`hoistable`]): one reading
/// the same logits and labels with the same options, reading a mean's gradient (or, for the
/// loss per row, any), with its loss gradient computable before the loss, the logits and
/// labels not written in between, and for f16 logits read by products alone (they round the
/// f32 gradient the kernel stores as they load it) and not asked for.
fn gradient_for_loss_kernel(
    nodes: &[Node],
    order: &[NodeId],
    targets: &[NodeId],
    l_pos: usize,
    (logits, labels): (NodeId, NodeId),
    opts: crate::ops::loss::RowOptions,
) -> Option<(NodeId, Vec<NodeId>)> {
    use crate::ops::loss::{CrossEntropyBackward, LossGrad};
    let rows = matches!(nodes[order[l_pos].0].op, Op::CrossEntropyRows(_));
    let at = |n: NodeId| order.iter().position(|&o| o == n);
    let d = order.iter().copied().find(|&d| {
        matches!(
            nodes[d.0].op,
            Op::CrossEntropyBackward(CrossEntropyBackward {
                written: false,
                opts: o,
                dy,
            }) if o == opts && (rows || dy == LossGrad::Mean)
        ) && nodes[d.0].inputs[..2] == [logits, labels]
    })?;
    let half = nodes[d.0].dtype == DType::F16;
    // (a bias gradient's row sums, a view of its product, name `d` for the CPU twin)
    let products_alone = order.iter().all(|r| {
        !nodes[r.0].inputs.contains(&d)
            || matches!(nodes[r.0].op, Op::MatMul(_) | Op::RowSums(_))
                && nodes[r.0].dtype == DType::F16
    });
    if half && (targets.contains(&d) || !products_alone) {
        return None;
    }
    let d_pos = at(d).unwrap_or(l_pos);
    let written = [logits, labels]
        .iter()
        .any(|&x| written_between(nodes, order, x, l_pos, d_pos));
    if d_pos < l_pos || written {
        return None;
    }
    let hoist = hoistable(nodes, order, l_pos, nodes[d.0].inputs[2])?;
    Some((d, hoist))
}

/// Where a training step's cross-entropy is small enough for one workgroup to compute its
/// gradient too (`loss::WITH_GRAD_MAX` logits), or runs per row (`CrossEntropyRows`, which
/// [`split_cross_entropy`] made, or with torch's options `Graph::cross_entropy_with`), and its
/// backward node reads the same logits and labels with a loss gradient computable before the
/// loss (a constant, an input, a scale, the count of the rows kept), the loss's kernel writes
/// the gradient past the loss (`CrossEntropy::with_grad`, `CrossEntropyRows::with_grad`, which
/// reads `dy` as the backward did) and the backward node becomes a view of it
/// (`CrossEntropyBackward::written`): a classifier's step runs one kernel fewer, a language
/// model's reads its logits twice rather than three times (the row statistics once). The
/// kernel stores the f32 loss and so the gradient in f32: f16 logits take this only where
/// products alone read their gradient (no target), which then round it to f16 as they load it
/// (the value an f16 gradient holds).
pub(crate) fn gradient_with_cross_entropy(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::loss::{CrossEntropy, CrossEntropyBackward, CrossEntropyRows, WITH_GRAD_MAX};
    let mut moves: Vec<(NodeId, NodeId)> = Vec::new();
    let mut l_pos = 0;
    while l_pos < order.len() {
        let l = order[l_pos];
        l_pos += 1;
        let (opts, rows) = match nodes[l.0].op {
            Op::CrossEntropy(CrossEntropy {
                with_grad: false,
                opts,
            }) => (opts, false),
            Op::CrossEntropyRows(CrossEntropyRows {
                with_grad: false,
                opts,
                ..
            }) => (opts, true),
            _ => continue,
        };
        let (logits, labels) = (nodes[l.0].inputs[0], nodes[l.0].inputs[1]);
        if !rows && nodes[logits.0].shape.numel() > WITH_GRAD_MAX {
            continue;
        }
        let Some((d, hoist)) =
            gradient_for_loss_kernel(nodes, order, targets, l_pos - 1, (logits, labels), opts)
        else {
            continue;
        };
        let Op::CrossEntropyBackward(back) = nodes[d.0].op else {
            continue;
        };
        let dy = nodes[d.0].inputs[2];
        nodes[l.0].op = match rows {
            true => Op::CrossEntropyRows(CrossEntropyRows {
                with_grad: true,
                opts,
                dy: back.dy,
            }),
            false => Op::CrossEntropy(CrossEntropy {
                with_grad: true,
                opts,
            }),
        };
        nodes[l.0].inputs.push(dy);
        nodes[d.0].op = Op::CrossEntropyBackward(CrossEntropyBackward {
            written: true,
            ..back
        });
        nodes[d.0].inputs.push(l);
        nodes[d.0].dtype = DType::F32;
        moves.push((d, l));
        // what the loss's gradient needs runs before the loss, in order: inputs precede
        // their readers
        order.retain(|o| !hoist.contains(o));
        let at = order.iter().position(|&o| o == l).unwrap_or(0);
        l_pos = at + hoist.len() + 1;
        order.splice(at..at, hoist);
    }
    place_after(order, &moves);
}

/// Rewrites every product whose configuration splits K into `MatMulPartial` (a new node, placed
/// just before it in `order`) and `SplitKSum` (the node itself, same id and shape).
pub(crate) fn split_k(nodes: &mut Vec<Node>, order: &mut Vec<NodeId>, ch: &Choice) {
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        let n = &nodes[id.0];
        let Op::MatMul(mm) = n.op else {
            i += 1;
            continue;
        };
        if n.dtype != DType::F32 {
            // f16 products run whole (the partial sums would be f32 tensors of their own)
            i += 1;
            continue;
        }
        let (a, b) = (n.inputs[0], n.inputs[1]);
        let Ok(d) = mm.dims(&nodes[a.0].shape, &nodes[b.0].shape) else {
            i += 1;
            continue;
        };
        let cfg = match gemm_config(&d, ch) {
            Some(c)
                if c.split > 1 && c.slices(d.k) > 1 && !uses_coop(&d, ch) && !uses_gemv(&d, ch) =>
            {
                c
            }
            _ => {
                i += 1;
                continue;
            }
        };
        let partial = MatMulPartial {
            product: MatMul {
                trans_a: mm.trans_a,
                trans_b: mm.trans_b,
                row_sums: mm.row_sums,
                ..Default::default()
            },
            config: cfg,
        };
        let Ok(shape) = partial.infer(&nodes[a.0].shape, &nodes[b.0].shape) else {
            i += 1;
            continue;
        };
        let pid = NodeId(nodes.len());
        nodes.push(Node {
            op: Op::MatMulPartial(partial),
            inputs: vec![a, b],
            shape,
            dtype: nodes[id.0].dtype,
        });
        let node = &mut nodes[id.0];
        let bias = node.inputs.get(2).copied();
        node.op = Op::SplitKSum(SplitKSum {
            bias: mm.bias,
            relu: mm.relu,
            row_sums: mm.row_sums,
        });
        node.inputs = std::iter::once(pid).chain(bias).collect();
        order.insert(i, pid);
        i += 2;
    }
}

/// A relu that is a normalization's only reader (conv-BN-ReLU) runs in the normalization's
/// kernel (`Normalize::relu`): one kernel and one pass over the activations fewer per layer. The
/// relu's node takes the fused op (its readers, a max pooling and its backward's mask, read the
/// same values) and the normalization's node goes. Batch norms (`Normalize`, statistics of
/// their own); a layer norm computing its statistics inside (`NormalizeStats`) keeps its relu.
pub(crate) fn relu_into_normalize(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    use crate::ops::norm::{Normalize, NormalizeStats};
    use crate::ops::unary::UnaryOp;
    let mut dropped = Vec::new();
    let mut moves: Vec<(NodeId, NodeId)> = Vec::new();
    for r_pos in 0..order.len() {
        let r = order[r_pos];
        if !matches!(nodes[r.0].op, Op::Unary(UnaryOp::Relu)) {
            continue;
        }
        // the normalization, or a reshape of it (a batch norm's (N, C, H*W) back to NCHW)
        let (mut chain, y) = under_reshapes(nodes, nodes[r.0].inputs[0]);
        chain.push(y);
        let fused = match &nodes[y.0].op {
            Op::Normalize(n) if !n.relu => Op::Normalize(Normalize { relu: true, ..*n }),
            Op::NormalizeStats(s) if !s.norm.relu => Op::NormalizeStats(NormalizeStats {
                norm: Normalize {
                    relu: true,
                    ..s.norm
                },
                ..*s
            }),
            _ => continue,
        };
        let Some(y_pos) = order.iter().position(|&o| o == y) else {
            continue;
        };
        // statistics written past the normalization's output are viewed from the relu's now
        let views: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|&v| matches!(nodes[v.0].op, Op::StatsOf(_)) && nodes[v.0].inputs[0] == y)
            .collect();
        let inputs = nodes[y.0].inputs.clone();
        // (nothing may read those statistics before the relu's step)
        let read_early = views.iter().any(|&v| {
            order[..=r_pos]
                .iter()
                .any(|o| nodes[o.0].inputs.contains(&v))
        });
        if read_early
            || chain.iter().any(|&c| {
                let others = if c == y { views.len() } else { 0 };
                targets.contains(&c) || readers(nodes, order, c) != 1 + others
            })
            || nodes[y.0].dtype != nodes[r.0].dtype
            || inputs
                .iter()
                .any(|&i| written_between(nodes, order, i, y_pos, r_pos))
        {
            continue;
        }
        nodes[r.0].op = fused;
        nodes[r.0].inputs = inputs;
        for &v in &views {
            nodes[v.0].inputs[0] = r;
            moves.push((v, r));
        }
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
    place_after(order, &moves);
}

/// A batch norm's input gradient that only a transpose to channels first reads (`(N, C, HW)`
/// to `(C, N, HW)`: the layout a convolution's backward reads its output gradient in) is stored
/// so by its kernel (`NormalizeBackward::channels_first`): the transpose's node takes the
/// gradient's op (its readers read the same values), the gradient's node and the reshapes
/// between go. One kernel and one pass over the gradient fewer per conv-BN layer.
pub(crate) fn channels_first_normalize_backward(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut dropped = Vec::new();
    for p_pos in 0..order.len() {
        let p = order[p_pos];
        let Op::Permute(perm) = &nodes[p.0].op else {
            continue;
        };
        if perm.perm != [1, 0, 2] {
            continue;
        }
        let (mut chain, d) = under_reshapes(nodes, nodes[p.0].inputs[0]);
        chain.push(d);
        let Op::NormalizeAffineBackward(nb) = nodes[d.0].op else {
            continue;
        };
        let Some(d_pos) = order.iter().position(|&o| o == d) else {
            continue;
        };
        // the transpose's input must be the gradient's (OUTER, GROUPS, INNER) itself
        let dy = &nodes[nodes[d.0].inputs[0].0].shape;
        let through = &nodes[nodes[p.0].inputs[0].0].shape;
        let inputs = nodes[d.0].inputs.clone();
        if nb.channels_first
            || through.dims() != dy.dims()
            || chain
                .iter()
                .any(|&c| targets.contains(&c) || readers(nodes, order, c) != 1)
            || inputs
                .iter()
                .any(|&i| written_between(nodes, order, i, d_pos, p_pos))
        {
            continue;
        }
        nodes[p.0].op = Op::NormalizeAffineBackward(crate::ops::norm::NormalizeBackward {
            channels_first: true,
            ..nb
        });
        nodes[p.0].inputs = inputs;
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Whether a node of `order` strictly between positions `from` and `to` writes the storage of
/// `read` in place (an optimizer update): a rewrite that moves a read of `read` from `from` to
/// `to` must not cross one.
pub(crate) fn written_between(
    nodes: &[Node],
    order: &[NodeId],
    read: NodeId,
    from: usize,
    to: usize,
) -> bool {
    let root = storage_root(nodes, read);
    order[from.min(to) + 1..from.max(to)].iter().any(|id| {
        let n = &nodes[id.0];
        let (rw_from, _) = n.op.binding_mode(n.inputs.len());
        n.inputs[rw_from..]
            .iter()
            .any(|&i| storage_root(nodes, i) == root)
    })
}

/// Where every reader of an `im2col` node is a product taking it as `b` (the forward convolution,
/// the weight gradient), lets those products read the image instead (`ImplicitGemm`) and drops the
/// column matrix from the plan. Products of the portable kernel keep their columns.
pub(crate) fn implicit_im2col(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    ch: &Choice,
) {
    let mut dropped = Vec::new();
    for &id in order.iter() {
        let Op::Im2col(im) = nodes[id.0].op else {
            continue;
        };
        if targets.contains(&id) {
            continue;
        }
        let readers: Vec<NodeId> = order
            .iter()
            .copied()
            .filter(|r| nodes[r.0].inputs.contains(&id))
            .collect();
        // the readers will read the image at their own step rather than at im2col's
        let x = nodes[id.0].inputs[0];
        let at = |n: NodeId| order.iter().position(|&o| o == n).unwrap_or(0);
        if readers
            .iter()
            .any(|&r| written_between(nodes, order, x, at(id), at(r)))
        {
            continue;
        }
        let rewritable = |r: &NodeId| {
            let n = &nodes[r.0];
            let as_b_only = n.inputs[1] == id && n.inputs[0] != id;
            match &n.op {
                Op::MatMulPartial(_) => as_b_only,
                // f16 products always run generated kernels (`gemm_config_f16`)
                Op::MatMul(mm) => {
                    as_b_only
                        && mm
                            .dims(&nodes[n.inputs[0].0].shape, &nodes[id.0].shape)
                            .ok()
                            .is_some_and(|d| n.dtype == DType::F16 || gemm_config(&d, ch).is_some())
                }
                _ => false,
            }
        };
        if readers.is_empty() || !readers.iter().all(rewritable) {
            continue;
        }
        for r in readers {
            let n = &mut nodes[r.0];
            let (product, partial) = match n.op {
                Op::MatMul(mm) => (mm, None),
                Op::MatMulPartial(p) => (p.product, Some(p.config)),
                _ => unreachable!("checked above"),
            };
            n.op = Op::ImplicitGemm(ImplicitGemm {
                product,
                geom: im.0,
                partial,
                nchw: false,
            });
            n.inputs[1] = x;
        }
        dropped.push(id);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Storage buffers a kernel may bind: WebGPU's guaranteed minimum per shader stage.
const MAX_STORAGE_BINDINGS: usize = 8;

/// Where a product's only reader is an elementwise node of the product's element count (a fused
/// chain or a single unary or binary op, reading the product or reshapes that are the product's
/// only readers: the same elements in the same order), runs that program in the product's
/// epilogue (`MatMulEpilogue`) and drops the product's own store and load. Runs after
/// elementwise fusion, on products that kept the generated kernel (not split, not on tensor
/// cores). A program reading the product transposed as `[M, B, HW] -> [B, M, HW]` (a folded
/// permute) takes it too where the product runs tiled: the kernel stores each result at its
/// transposed place (`MatMulEpilogue::transposed_store`). Where other nodes read the product
/// too, all of them after the program (a GELU's gradient reading its pre-activation), the
/// kernel stores the product as well (`MatMulEpilogue::keep`; the product's node becomes
/// `Op::Written`, placed with its reshapes just before the kernel): one kernel and one pass
/// over the product fewer.
pub(crate) fn fuse_matmul_epilogue(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    ch: &Choice,
) {
    let mut dropped = Vec::new();
    // kept products, each to go just before its epilogue's kernel, and their readers before
    // that kernel, to go just after it
    let mut kept: Vec<(NodeId, Vec<NodeId>, NodeId)> = Vec::new();
    // nodes a rewrite here changed or moves
    let mut rewritten: Vec<NodeId> = Vec::new();
    for (pos, &id) in order.iter().enumerate() {
        let n = &nodes[id.0];
        let Some(program) = super::fuse::program_of(n) else {
            continue;
        };
        let readers = |y: NodeId| readers(nodes, order, y);
        // the product, read as it is or through reshapes (same element order: a linear layer
        // on (B, L, E) runs as one [B*L, E] product), each read by nothing else
        let product = |y: NodeId| {
            let (views, p) = under_reshapes(nodes, y);
            // what lies under the first view (`y`'s own readers are checked with it)
            let mut under = views
                .iter()
                .skip(1)
                .copied()
                .chain(views.first().map(|_| p));
            let alone = under.all(|v| !targets.contains(&v) && readers(v) == 1);
            (alone && matches!(nodes[p.0].op, Op::MatMul(_))).then_some((p, views))
        };
        let dims = |p: NodeId| match nodes[p.0].op {
            Op::MatMul(mm) => mm
                .dims(
                    &nodes[nodes[p.0].inputs[0].0].shape,
                    &nodes[nodes[p.0].inputs[1].0].shape,
                )
                .ok(),
            _ => None,
        };
        // not through a folded transpose (the epilogue sees each result at the index it is
        // stored at), unless the generated kernel can store the product so transposed
        let read_in_place = |j: usize, p: NodeId| match program.permuted_read(j) {
            None => true,
            Some(t) => {
                let (Op::MatMul(mm), Some(d)) = (&nodes[p.0].op, dims(p)) else {
                    return false;
                };
                let hw = t.in_dims.get(2).copied().unwrap_or(1);
                let in_dtypes =
                    [nodes[p.0].inputs[0], nodes[p.0].inputs[1]].map(|i| nodes[i.0].dtype);
                matches!(t.perm.as_slice(), [1, 0] | [1, 0, 2])
                    && t.in_dims[0] == d.m
                    && t.in_dims[1] * hw == d.n
                    && d.batch.numel() == 1
                    && !mm.row_sums
                    && runs_tiled(&d, nodes[p.0].dtype, &in_dtypes, ch)
            }
        };
        let fits = |j: usize, y: NodeId| {
            under_reshapes_of_product(nodes, y).is_some_and(|(p, _)| read_in_place(j, p))
                && nodes[y.0].shape.numel() == n.shape.numel()
                && n.inputs.iter().filter(|&&i| i == y).count() == 1
        };
        // (not a product an earlier rewrite here moves: it would come back)
        let alone = |y: NodeId| {
            product(y).is_some_and(|(p, views)| {
                !rewritten.contains(&p) && !views.iter().any(|v| rewritten.contains(v))
            }) && !targets.contains(&y)
                && readers(y) == 1
        };
        // else a product the kernel also stores: not transposed, no row sums past it; what
        // reads it before this node (its reshapes, ..) moves after it, unless that was
        // rewritten here already or this node reads it
        let moving = |j: usize, y: NodeId| {
            let (p, _) = under_reshapes_of_product(nodes, y)?;
            let y_pos = order.iter().position(|&o| o == p)?;
            let after = readers_to_move(nodes, order, p, y_pos, pos)?;
            // (the program reading the product through another input too would bind its
            // storage twice, once read_write)
            let once = n
                .inputs
                .iter()
                .enumerate()
                .all(|(i, &x)| i == j || under_reshapes(nodes, x).1 != p);
            let clear = once
                && program.permuted_read(j).is_none()
                && matches!(nodes[p.0].op, Op::MatMul(mm) if !mm.row_sums)
                && !after
                    .iter()
                    .any(|r| rewritten.contains(r) || (*r != y && n.inputs.contains(r)));
            clear.then_some(after)
        };
        let inputs = n.inputs.iter().copied().enumerate();
        let Some((k, kept_readers)) = inputs
            .clone()
            .find(|&(j, y)| fits(j, y) && alone(y))
            .map(|(j, _)| (j, None))
            .or_else(|| {
                inputs.clone().find_map(|(j, y)| {
                    fits(j, y)
                        .then(|| moving(j, y))
                        .flatten()
                        .map(|a| (j, Some(a)))
                })
            })
        else {
            continue;
        };
        let keep = kept_readers.is_some();
        let Some((y, view)) = under_reshapes_of_product(nodes, n.inputs[k]) else {
            continue;
        };
        let (&Op::MatMul(mm), Some(d)) = (&nodes[y.0].op, dims(y)) else {
            continue;
        };
        let product_inputs = nodes[y.0].inputs.clone();
        let extras: Vec<NodeId> = n
            .inputs
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != k)
            .map(|(_, &i)| i)
            .collect();
        let y_pos = order.iter().position(|&o| o == y).unwrap_or(pos);
        // the product's reads move from its own step to this node's
        let moved = product_inputs
            .iter()
            .any(|&i| written_between(nodes, order, i, y_pos, pos));
        let half = nodes[y.0].dtype == DType::F16;
        let coop = if half {
            ch.coop_f16 && crate::codegen::coop::applies(&d)
        } else {
            uses_coop(&d, ch)
        };
        if (!half && !coop && gemm_config(&d, ch).is_none())
            || product_inputs.len() + extras.len() + 1 + keep as usize > MAX_STORAGE_BINDINGS
            || moved
        {
            continue;
        }
        let node = &mut nodes[id.0];
        node.op = Op::MatMulEpilogue(MatMulEpilogue {
            product: mm,
            program,
            product_input: k,
            keep,
        });
        node.inputs = product_inputs.into_iter().chain(extras).collect();
        rewritten.push(id);
        match kept_readers {
            Some(after) => {
                node.inputs.push(y);
                nodes[y.0].op = Op::Written(Box::new(Op::MatMul(mm)));
                rewritten.extend(after.iter().copied().chain([y]));
                kept.push((y, after, id));
            }
            None => {
                dropped.push(y);
                dropped.extend(view);
            }
        }
    }
    order.retain(|id| !dropped.contains(id));
    for (p, after, writer) in kept {
        written_at(order, p, &after, writer);
    }
}

/// The product under `y`'s reshapes (`y` itself or what they view) and those reshapes, where
/// it is a `MatMul`.
fn under_reshapes_of_product(nodes: &[Node], y: NodeId) -> Option<(NodeId, Vec<NodeId>)> {
    let (views, p) = under_reshapes(nodes, y);
    matches!(nodes[p.0].op, Op::MatMul(_)).then_some((p, views))
}

/// Where only products read a narrow of a tensor's last axis that is no view (an LSTM's last
/// `h` out of its `[T, B, 6H]` states, its gate gradients out of the backward's), directly or
/// through reshapes that keep that axis last, each product reads its operand in place from the
/// tensor's rows (`MatMul::rows_a`, `rows_b`) and the narrow becomes a view of the tensor
/// (`AxisCopy::strided`): a kernel and a copy fewer. Only unbatched products on the generated
/// tiled kernel (`runs_tiled`), whose tile loads take the rows' stride; a bias gradient's
/// `RowSums` of the narrow reads the product's sums; a recurrence's kernels read their initial
/// state so too (`ops::lstm::InitialState`: a decoder starting from its encoder's last `h` and
/// `c`, forward and backward), and a recurrence's backward its state gradient's window
/// (`DpWindow::rows`: the decoder's `dh0 | dc0` going back into the encoder).
pub(crate) fn strided_operands(
    nodes: &mut [Node],
    order: &mut [NodeId],
    targets: &[NodeId],
    ch: &Choice,
) {
    use crate::ops::matmul::OperandRows;
    for pos in 0..order.len() {
        let nw = order[pos];
        let Op::AxisCopy(copy) = nodes[nw.0].op else {
            continue;
        };
        let x = nodes[nw.0].inputs[0];
        let (xs, out) = (&nodes[x.0].shape, &nodes[nw.0].shape);
        let last = xs.rank() - 1;
        let Ok(start) = usize::try_from(-copy.a_start) else {
            continue;
        };
        let width = out.dims()[last];
        let x_strided = matches!(nodes[x.0].op, Op::AxisCopy(c) if c.strided);
        if copy.b_start.is_some()
            || copy.strided
            || copy.axis != last
            || start + width > xs.dims()[last]
            || copy.view_offset(xs, out, nodes[nw.0].dtype).is_some()
            || targets.contains(&nw)
            || x_strided
        {
            continue;
        }
        let rows = OperandRows {
            ld: xs.dims()[last] as u32,
            offset: start as u32,
            swap: None,
        };
        // through reshapes of reshapes (`h_n` of (1, B, H) as (B, H))
        let (views, uses) = reads_through_reshapes(nodes, order, nw);
        let fits = |(r, k): (NodeId, usize)| {
            let at = order.iter().position(|&o| o == r).unwrap_or(pos);
            !written_between(nodes, order, x, pos, at)
                && match &nodes[r.0].op {
                    Op::MatMul(_) | Op::MatMulEpilogue(_) | Op::MatMulPartial(_) => {
                        plain_tiled_operand(nodes, r, k, width, ch)
                    }
                    Op::RowSums(_) => k == 1,
                    op => {
                        initial_state_input(op, k).is_some()
                            || dp_window(op, k).is_some_and(|w| w.width == width)
                    }
                }
        };
        let views_fit = views
            .iter()
            .all(|v| !targets.contains(v) && nodes[v.0].shape.dims().last() == Some(&width));
        if uses.is_empty() || !views_fit || !uses.iter().all(|&u| fits(u)) {
            continue;
        }
        for (r, k) in uses {
            read_rows_in_place(&mut nodes[r.0].op, k, rows);
        }
        if let Op::AxisCopy(c) = &mut nodes[nw.0].op {
            c.strided = true;
        }
    }
}

/// Input `k` of a node that [`strided_operands`] or [`swapped_operands`] found able to read its
/// rows elsewhere (a product's operand, a recurrence's initial state or state gradient window)
/// reads them from `rows`.
fn read_rows_in_place(op: &mut Op, k: usize, rows: crate::ops::matmul::OperandRows) {
    let c0 = initial_state_input(op, k);
    if let Some(mm) = product_of_mut(op) {
        match k {
            0 => mm.rows_a = Some(rows),
            _ => mm.rows_b = Some(rows),
        }
    } else if let Some(w) = dp_window_mut(op, k) {
        w.rows = Some(rows);
    } else if let (Some(state), Some(c0)) = (initial_state_mut(op), c0) {
        match c0 {
            true => state.c0 = Some(rows),
            false => state.h0 = Some(rows),
        }
    }
}

/// The product of a product node (`MatMul`, `MatMulEpilogue`, `MatMulPartial`).
fn product_of(op: &Op) -> Option<&MatMul> {
    match op {
        Op::MatMul(mm) => Some(mm),
        Op::MatMulEpilogue(e) => Some(&e.product),
        Op::MatMulPartial(p) => Some(&p.product),
        _ => None,
    }
}

/// [`product_of`], to change it.
fn product_of_mut(op: &mut Op) -> Option<&mut MatMul> {
    match op {
        Op::MatMul(mm) => Some(mm),
        Op::MatMulEpilogue(e) => Some(&mut e.product),
        Op::MatMulPartial(p) => Some(&mut p.product),
        _ => None,
    }
}

/// Whether input `k` of product node `r` is an operand whose contiguous axis has `width`
/// elements, read plainly (no dropout, no rows of another tensor yet) by an unbatched product
/// on the generated tiled kernel (`runs_tiled`), whose tile loads can take rows elsewhere.
fn plain_tiled_operand(nodes: &[Node], r: NodeId, k: usize, width: usize, ch: &Choice) -> bool {
    let Some(mm) = product_of(&nodes[r.0].op) else {
        return false;
    };
    let plain = match k {
        0 => mm.drop_a.is_none() && mm.rows_a.is_none(),
        1 => mm.drop_b.is_none() && mm.rows_b.is_none(),
        _ => false,
    };
    let ins = &nodes[r.0].inputs;
    let dtypes = [nodes[ins[0].0].dtype, nodes[ins[1].0].dtype];
    plain
        && nodes[ins[k].0].shape.dims().last() == Some(&width)
        && mm
            .dims(&nodes[ins[0].0].shape, &nodes[ins[1].0].shape)
            .is_ok_and(|d| d.batch.numel() == 1 && runs_tiled(&d, nodes[r.0].dtype, &dtypes, ch))
}

/// Where only products read a swap of a tensor's two leading axes (`permute` of `(P, Q, ..)`
/// by `[1, 0, ..]`: a batch-first sequence `(B, T, I)` turned time-major for a recurrence's
/// input projection and its weight gradient, or a recurrence's output turned back), through
/// reshapes that keep its last axis, each product reads its operand's rows in place
/// (`OperandRows::swap`) and the permute becomes a view (`Permute::in_place`): a kernel and a
/// copy of the sequence fewer. Products as [`strided_operands`] takes them; a recurrence's
/// backward reads the window of its state gradient so too (`DpWindow::rows`: the gradient of
/// a batch-first output).
pub(crate) fn swapped_operands(
    nodes: &mut [Node],
    order: &mut [NodeId],
    targets: &[NodeId],
    ch: &Choice,
) {
    use crate::ops::matmul::OperandRows;
    for pos in 0..order.len() {
        let id = order[pos];
        let Op::Permute(perm) = &nodes[id.0].op else {
            continue;
        };
        let x = nodes[id.0].inputs[0];
        let dims = nodes[x.0].shape.dims().to_vec();
        let rank = dims.len();
        let swap = rank >= 3
            && perm.perm[..2] == [1, 0]
            && perm.perm[2..].iter().copied().eq(2..rank)
            && !perm.in_place;
        // (views whose readers read them in place themselves cannot be read so twice)
        let x_in_place = match &nodes[x.0].op {
            Op::AxisCopy(c) => c.strided,
            Op::Permute(p) => p.in_place,
            _ => false,
        };
        if !swap || x_in_place || targets.contains(&id) {
            continue;
        }
        let width: usize = dims[2..].iter().product();
        let (views, uses) = reads_through_reshapes(nodes, order, id);
        let views_fit = views
            .iter()
            .all(|v| !targets.contains(v) && nodes[v.0].shape.dims().last() == Some(&width));
        let fits = |&(r, k): &(NodeId, usize)| {
            let at = order.iter().position(|&o| o == r).unwrap_or(pos);
            // (a window's rows are (step, batch row) pairs: the swapped tensor's own shape)
            let reads = plain_tiled_operand(nodes, r, k, width, ch)
                || dp_window(&nodes[r.0].op, k).is_some_and(|w| w.width == width)
                    && nodes[nodes[r.0].inputs[k].0].shape == nodes[id.0].shape;
            !written_between(nodes, order, x, pos, at)
                && reads
                && nodes[nodes[r.0].inputs[k].0].shape.numel() == nodes[id.0].shape.numel()
        };
        if uses.is_empty() || !views_fit || !uses.iter().all(fits) {
            continue;
        }
        let rows = OperandRows {
            ld: width as u32,
            offset: 0,
            swap: Some((dims[0] as u32, dims[1] as u32)),
        };
        for (r, k) in uses {
            read_rows_in_place(&mut nodes[r.0].op, k, rows);
        }
        if let Op::Permute(p) = &mut nodes[id.0].op {
            p.in_place = true;
        }
    }
}

/// Whether input `k` of a recurrence (LSTM, GRU, RNN, forward or backward) is its initial `c0`
/// (`Some(true)`) or `h0` (`Some(false)`), which its kernels can read from a wider tensor's rows
/// (`ops::lstm::InitialState`); `None` for other inputs and ops.
fn initial_state_input(op: &Op, k: usize) -> Option<bool> {
    match (op, k) {
        (Op::LstmForward(_) | Op::LstmBackward(_), 2) => Some(false),
        (Op::LstmForward(_) | Op::LstmBackward(_), 3) => Some(true),
        (Op::GruForward(_) | Op::GruBackward(_) | Op::RnnForward(_) | Op::RnnBackward(_), 3) => {
            Some(false)
        }
        _ => None,
    }
}

/// The window of a recurrence's backward (`ops::lstm::DpWindow`) where input `k` is the tensor
/// it reads as that window (the state gradient, input 5) and its rows are not read in place yet.
fn dp_window(op: &Op, k: usize) -> Option<&crate::ops::lstm::DpWindow> {
    let w = match op {
        Op::LstmBackward(l) => l.dp_window.as_ref(),
        Op::GruBackward(l) => l.dp_window.as_ref(),
        Op::RnnBackward(l) => l.dp_window.as_ref(),
        _ => None,
    };
    w.filter(|w| k == 5 && w.rows.is_none())
}

/// [`dp_window`], to change it.
fn dp_window_mut(op: &mut Op, k: usize) -> Option<&mut crate::ops::lstm::DpWindow> {
    let w = match op {
        Op::LstmBackward(l) => l.dp_window.as_mut(),
        Op::GruBackward(l) => l.dp_window.as_mut(),
        Op::RnnBackward(l) => l.dp_window.as_mut(),
        _ => None,
    };
    w.filter(|w| k == 5 && w.rows.is_none())
}

/// A recurrence's [`crate::ops::lstm::InitialState`].
fn initial_state_mut(op: &mut Op) -> Option<&mut crate::ops::lstm::InitialState> {
    match op {
        Op::LstmForward(l) => Some(&mut l.state),
        Op::LstmBackward(l) => Some(&mut l.state),
        Op::GruForward(l) => Some(&mut l.state),
        Op::GruBackward(l) => Some(&mut l.state),
        Op::RnnForward(l) => Some(&mut l.state),
        Op::RnnBackward(l) => Some(&mut l.state),
        _ => None,
    }
}

/// Where only products read a dropout's result as an operand (directly or through reshapes of
/// its size; a bias gradient's `RowSums` of it too), each product applies the dropout itself as
/// it loads the operand (`MatMul::drop_a`, `drop_b`, the seed an input of its own) and the
/// dropout's kernel goes: a transformer's feed-forward dropout before its second product
/// (forward) and the gradients masked before the output projections' products (backward), one
/// kernel and a tensor's store and loads each. Only where every such product runs on the
/// generated tiled kernel (`runs_tiled`), whose tile loads apply it.
pub(crate) fn dropout_into_products(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    ch: &Choice,
) {
    use crate::ops::matmul::{Bias, OperandDropout};
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let dn = order[pos];
        let Op::Dropout(dr) = nodes[dn.0].op else {
            continue;
        };
        let (x, seed) = (nodes[dn.0].inputs[0], nodes[dn.0].inputs[1]);
        if targets.contains(&dn) || nodes[x.0].dtype != nodes[dn.0].dtype {
            continue;
        }
        let (views, uses) = reads_through_reshapes(nodes, order, dn);
        // a product's operand, free of a dropout of its own, on the tiled kernel
        let operand = |mm: &MatMul, k: usize, r: NodeId| {
            let free = match k {
                0 => mm.drop_a.is_none(),
                1 => mm.drop_b.is_none(),
                _ => false,
            };
            let ins = &nodes[r.0].inputs;
            let dtypes = [nodes[ins[0].0].dtype, nodes[ins[1].0].dtype];
            free && mm
                .dims(&nodes[ins[0].0].shape, &nodes[ins[1].0].shape)
                .is_ok_and(|d| runs_tiled(&d, nodes[r.0].dtype, &dtypes, ch))
        };
        let fits = |(r, k): (NodeId, usize)| {
            let at = order.iter().position(|&o| o == r).unwrap_or(pos);
            let moved = written_between(nodes, order, x, pos, at)
                || written_between(nodes, order, seed, pos, at);
            !moved
                && match &nodes[r.0].op {
                    Op::MatMul(mm) => operand(mm, k, r),
                    Op::MatMulEpilogue(e) => operand(&e.product, k, r),
                    Op::MatMulPartial(p) => k < 2 && operand(&p.product, k, r),
                    Op::RowSums(s) => k == 1 && s.1.is_none(),
                    _ => false,
                }
        };
        let views_free = views.iter().all(|v| !targets.contains(v));
        if uses.is_empty() || !views_free || !uses.iter().all(|&u| fits(u)) {
            continue;
        }
        let drop = Some(OperandDropout::of(&dr));
        for &v in &views {
            // (a reshape of a reshape keeps reading its reshape)
            if nodes[v.0].inputs[0] == dn {
                nodes[v.0].inputs[0] = x;
            }
        }
        for (r, k) in uses {
            let n = &mut nodes[r.0];
            if n.inputs[k] == dn {
                n.inputs[k] = x;
            }
            // the seed after the product's operands and bias, a's before b's
            let set = |mm: &mut MatMul| {
                let at =
                    2 + (mm.bias != Bias::None) as usize + (k == 1 && mm.drop_a.is_some()) as usize;
                match k {
                    0 => mm.drop_a = drop,
                    _ => mm.drop_b = drop,
                }
                at
            };
            let at = match &mut n.op {
                Op::MatMul(mm) => set(mm),
                Op::MatMulEpilogue(e) => set(&mut e.product),
                Op::MatMulPartial(p) => set(&mut p.product),
                Op::RowSums(s) => {
                    s.1 = drop;
                    n.inputs.len()
                }
                _ => unreachable!("checked above"),
            };
            n.inputs.insert(at, seed);
        }
        dropped.push(dn);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a `relu_grad` (alone, or a fused program's only step) masks a max-pooling backward's
/// result by the pooling's input (a relu's output), both read as they are or both through the
/// transpose `[N, C, H*W] -> [C, N, H*W]` (into a convolution's GEMM layout), and nothing else
/// reads the backward's result, the pooling backward applies the mask and stores that layout
/// itself (`MaxPoolReluBackward`): one kernel and a pass over a conv-relu-pool block's largest
/// gradient fewer.
pub(crate) fn relu_mask_into_max_pool_backward(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::binary::BinaryOp;
    use crate::ops::fused::{Operand, StepOp};
    use crate::ops::pool::MaxPoolReluBackward;
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let f = order[pos];
        // a fused program, or a lone relu_grad as one
        let Some(prog) = super::fuse::program_of(&nodes[f.0]) else {
            continue;
        };
        let [step] = &prog.steps[..] else {
            continue;
        };
        let (gi, ai) = match step.args[..] {
            [Operand::Input(g), Operand::Input(a)] if g != a => (g, a),
            _ => continue,
        };
        if step.op != StepOp::Binary(BinaryOp::ReluGrad) || nodes[f.0].inputs.len() != 2 {
            continue;
        }
        let (chain, p) = under_reshapes(nodes, nodes[f.0].inputs[gi]);
        let Op::MaxPool2dBackward(pool) = nodes[p.0].op else {
            continue;
        };
        let (x, dy) = (nodes[p.0].inputs[0], nodes[p.0].inputs[1]);
        let d = nodes[x.0].shape.dims().to_vec();
        let sole = |v: NodeId| !targets.contains(&v) && readers(nodes, order, v) == 1;
        if under_reshapes(nodes, nodes[f.0].inputs[ai]).1 != under_reshapes(nodes, x).1
            || d.len() != 4
            || step.shape.numel() != nodes[x.0].shape.numel()
            || nodes[f.0].shape.numel() != nodes[x.0].shape.numel()
            || nodes[f.0].dtype != nodes[p.0].dtype
            || !sole(p)
            || !chain.iter().all(|&c| sole(c))
        {
            continue;
        }
        // both reads plain, or both through [N, C, HW] -> [C, N, HW]
        let read = |k: usize| prog.permuted.iter().find(|r| r.input == k);
        let conv_layout = |r: &crate::ops::fused::PermutedRead| {
            r.in_dims == [d[0], d[1], d[2] * d[3]] && r.perm == [1, 0, 2]
        };
        let cn = match (read(gi), read(ai)) {
            (None, None) => false,
            (Some(a), Some(b)) if conv_layout(a) && conv_layout(b) => true,
            _ => continue,
        };
        let p_pos = order.iter().position(|&o| o == p).unwrap_or(pos);
        if written_between(nodes, order, x, p_pos, pos)
            || written_between(nodes, order, dy, p_pos, pos)
        {
            continue;
        }
        let n = &mut nodes[f.0];
        n.op = Op::MaxPoolReluBackward(MaxPoolReluBackward { pool, cn });
        n.inputs = vec![x, dy];
        dropped.push(p);
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a forward convolution's implicit GEMM `y [O, N*Ho*Wo]` is read through
/// `permute(reshape(y, [O, N, Ho*Wo]), [1, 0, 2])`, lets the GEMM store `[N, O, Ho*Wo]` itself in
/// place of the permute, and drops the permute's copy. Inference reads `y` only so; in training
/// the backward pass's relu mask reads `y` too: such elementwise readers then read the NCHW
/// result through the inverse transpose (a new permute that `fuse::fold_permutes` folds into
/// their kernels), so the forward permute goes either way.
pub(crate) fn nchw_conv_output(nodes: &mut Vec<Node>, order: &mut Vec<NodeId>, targets: &[NodeId]) {
    let mut dropped = Vec::new();
    let readers = |nodes: &[Node], order: &[NodeId], id: NodeId| -> Vec<NodeId> {
        order
            .iter()
            .copied()
            .filter(|r| nodes[r.0].inputs.contains(&id))
            .collect()
    };
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        i += 1;
        let n = &nodes[id.0];
        let Op::Permute(p) = &n.op else {
            continue;
        };
        if p.perm != [1, 0, 2] {
            continue;
        }
        let v = n.inputs[0];
        if !matches!(nodes[v.0].op, Op::Reshape) {
            continue;
        }
        let y = nodes[v.0].inputs[0];
        let Op::ImplicitGemm(c) = nodes[y.0].op else {
            continue;
        };
        let (ho, wo) = c.geom.out_hw();
        let ys = nodes[y.0].shape.clone();
        let conv_output = c.partial.is_none()
            && !c.nchw
            && !c.product.trans_a
            && !c.product.trans_b
            && ys.rank() == 2
            && nodes[v.0].shape.dims() == [ys.dims()[0], ys.dims()[1] / (ho * wo), ho * wo];
        let others: Vec<NodeId> = readers(nodes, order, y)
            .into_iter()
            .filter(|&r| r != v)
            .collect();
        // the other readers must be elementwise kernels of y's shape, after the permute
        let at = |order: &[NodeId], x: NodeId| order.iter().position(|&o| o == x);
        let foldable = others.iter().all(|&r| {
            matches!(nodes[r.0].op, Op::Unary(_) | Op::Binary(_))
                && nodes[r.0].shape == ys
                && at(order, r) > at(order, id)
        });
        if !conv_output
            || targets.contains(&y)
            || targets.contains(&v)
            || !foldable
            || readers(nodes, order, v).len() != 1
        {
            continue;
        }
        let inputs = nodes[y.0].inputs.clone();
        let dtype = nodes[y.0].dtype;
        let nchw_shape = nodes[id.0].shape.clone();
        let node = &mut nodes[id.0];
        node.op = Op::ImplicitGemm(ImplicitGemm { nchw: true, ..c });
        node.inputs = inputs;
        dropped.extend([y, v]);
        if !others.is_empty() {
            // y for the other readers: permute(NCHW, [1, 0, 2]) reshaped to [O, N*Ho*Wo]
            let d = nchw_shape.dims();
            let pm = NodeId(nodes.len());
            nodes.push(Node {
                op: Op::Permute(crate::ops::layout::Permute {
                    perm: vec![1, 0, 2],
                    in_place: false,
                }),
                inputs: vec![id],
                shape: Shape(vec![d[1], d[0], d[2]]),
                dtype,
            });
            let rs = NodeId(nodes.len());
            nodes.push(Node {
                op: Op::Reshape,
                inputs: vec![pm],
                shape: ys.clone(),
                dtype,
            });
            order.splice(i..i, [pm, rs]);
            i += 2;
            for r in others {
                for x in nodes[r.0].inputs.iter_mut() {
                    if *x == y {
                        *x = rs;
                    }
                }
            }
        }
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a `col2im` sums up the product `w^T x dy` (a convolution's input gradient) and nothing
/// else reads that product, runs both as one implicit GEMM (`ImplicitDgrad`) and drops the product
/// from the plan, unless the implicit form would multiply many more zeros (stride > 1, or an
/// unpadded convolution on a small image). Runs before `split_k`, which would otherwise cut the
/// product.
pub(crate) fn implicit_col2im(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    ch: &Choice,
) {
    let mut dropped = Vec::new();
    for &id in order.iter() {
        let Op::Col2im(c) = nodes[id.0].op else {
            continue;
        };
        let prod = nodes[id.0].inputs[0];
        let Op::MatMul(mm) = nodes[prod.0].op else {
            continue;
        };
        if mm != ImplicitDgrad::product() || targets.contains(&prod) {
            continue;
        }
        let readers = order
            .iter()
            .filter(|r| nodes[r.0].inputs.contains(&prod))
            .count();
        let dgrad = ImplicitDgrad {
            geom: c.0,
            bias: false,
            relu: false,
        };
        let (w, dy) = (nodes[prod.0].inputs[0], nodes[prod.0].inputs[1]);
        let d = dgrad.dims(&nodes[w.0].shape, &nodes[id.0].shape);
        // the weight and dy will be read at col2im's step rather than at the product's
        let at = |n: NodeId| order.iter().position(|&o| o == n).unwrap_or(0);
        let moved = [w, dy]
            .iter()
            .any(|&r| written_between(nodes, order, r, at(prod), at(id)));
        // the implicit form multiplies over every input position and tap, zeros included (the
        // border of an unpadded convolution, stride gaps); the explicit one over output
        // positions only: take it only where that costs at most a quarter more
        let (ho, wo) = c.0.out_hw();
        let (s0, s1) = c.0.opts.stride;
        let wasted = (c.0.image.0 * c.0.image.1) as f64 / (ho * wo * s0 * s1).max(1) as f64;
        let generated = nodes[id.0].dtype == DType::F16 || gemm_config(&d, ch).is_some();
        if readers != 1 || moved || wasted > 1.25 || !generated {
            continue;
        }
        let n = &mut nodes[id.0];
        n.op = Op::ImplicitDgrad(dgrad);
        n.inputs = vec![w, dy];
        dropped.push(prod);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Where a per-channel bias is added to an `ImplicitDgrad` (a transposed convolution's forward,
/// `Graph::conv_transpose2d`: `add(y, reshape(b, [C, 1, 1]))`) that nothing else reads, adds it
/// in the GEMM's store instead (`ImplicitDgrad::bias`, the bias `[C]` a third input), and a relu
/// that is its only reader, with or without the bias (`ImplicitDgrad::relu`): a decoder layer's transposed
/// convolution, bias and relu as one kernel where they took two and a pass over the image.
/// The add (then the relu) node becomes the GEMM, so its readers keep their input.
pub(crate) fn bias_into_implicit_dgrad(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut dropped = Vec::new();
    // the GEMM `y` folded into node `id` at `pos`, where nothing between them writes its inputs
    let fold = |nodes: &[Node], order: &[NodeId], y: NodeId, pos: usize| {
        let Op::ImplicitDgrad(c) = nodes[y.0].op else {
            return None;
        };
        let y_pos = order.iter().position(|&o| o == y)?;
        let alone = !targets.contains(&y) && readers(nodes, order, y) == 1;
        let clear = !nodes[y.0]
            .inputs
            .iter()
            .any(|&i| written_between(nodes, order, i, y_pos, pos));
        (alone && clear).then_some(c)
    };
    for pos in 0..order.len() {
        let id = order[pos];
        let n = &nodes[id.0];
        match n.op {
            Op::Binary(crate::ops::binary::BinaryOp::Add) => {
                for k in 0..2 {
                    let (y, r) = (n.inputs[k], n.inputs[1 - k]);
                    let Some(c) = fold(nodes, order, y, pos).filter(|c| !c.bias && !c.relu) else {
                        continue;
                    };
                    // a bias along the channels alone: (.., C, 1, 1) of C elements
                    let rd = nodes[r.0].shape.dims();
                    let ch = c.geom.channels;
                    let per_channel = (3..=4).contains(&rd.len())
                        && rd[rd.len() - 3] == ch
                        && rd.iter().product::<usize>() == ch;
                    let (_, b) = under_reshapes(nodes, r);
                    if !per_channel || nodes[y.0].shape != n.shape || nodes[b.0].dtype != n.dtype {
                        continue;
                    }
                    let mut inputs = nodes[y.0].inputs.clone();
                    inputs.push(b);
                    let node = &mut nodes[id.0];
                    node.op = Op::ImplicitDgrad(ImplicitDgrad { bias: true, ..c });
                    node.inputs = inputs;
                    dropped.push(y);
                    break;
                }
            }
            Op::Unary(crate::ops::unary::UnaryOp::Relu) => {
                let y = n.inputs[0];
                let Some(c) = fold(nodes, order, y, pos).filter(|c| !c.relu) else {
                    continue;
                };
                let inputs = nodes[y.0].inputs.clone();
                let node = &mut nodes[id.0];
                node.op = Op::ImplicitDgrad(ImplicitDgrad { relu: true, ..c });
                node.inputs = inputs;
                dropped.push(y);
            }
            _ => {}
        }
    }
    order.retain(|id| !dropped.contains(id));
}

/// The kernel of a node on this adapter: generated where a generator covers it, else the op's
/// kernel from `shaders/`; `None` for sources and views. `in_dtypes` are the inputs' element
/// types, `dtype` the node's: nodes touching f16 take [`select_f16`].
pub(crate) fn select(
    op: &Op,
    inputs: &[&Shape],
    in_dtypes: &[DType],
    out: &Shape,
    dtype: DType,
    ch: &Choice,
) -> Option<(KernelSpec, Option<Generated>)> {
    if let Op::AxisCopy(a) = op {
        if a.strided || a.view_offset(inputs[0], out, dtype).is_some() {
            // a view (`Op::view_of`): no kernel
            return None;
        }
    }
    if matches!(op, Op::Permute(p) if p.in_place) {
        // a view its readers read in place (`OperandRows::swap`)
        return None;
    }
    if let Op::OptimGroup(o) = op {
        // f32 parameters and states; gradients f32, or f16 where a cast was folded in
        let sizes: Vec<usize> = (0..o.members).map(|j| inputs[o.grad(j)].numel()).collect();
        let grads: Vec<DType> = (0..o.members).map(|j| in_dtypes[o.grad(j)]).collect();
        let epilogue = o
            .scale_from
            .as_ref()
            .and_then(|r| r.epilogue.as_ref())
            .map(|e| {
                // its inputs: the sum, then the reduction node's others (bound from 2 on)
                let mut shapes: Vec<&Shape> = inputs[2..1 + o.scale_inputs].to_vec();
                let one = Shape(vec![1]);
                shapes.insert(e.reduced, &one);
                elementwise::epilogue(&e.program, e.reduced, &shapes, &one, 2, DType::F32, None)
            });
        let scale = match &o.scale_from {
            Some(_) => crate::codegen::optim::Scale::Sum {
                partials: inputs[1].numel(),
                epilogue: epilogue.as_ref(),
            },
            None => crate::codegen::optim::Scale::Read,
        };
        let g = crate::codegen::optim::group_kernel(o, &sizes, &grads, scale);
        return Some((g.spec.clone(), Some(g)));
    }
    if let Op::EmaGroup(e) = op {
        let sizes: Vec<usize> = inputs[1..=e.members].iter().map(|s| s.numel()).collect();
        let g = crate::codegen::optim::ema_group(e, &sizes);
        return Some((g.spec.clone(), Some(g)));
    }
    if let Op::AccumulateGroup(a) = op {
        let sizes: Vec<usize> = inputs[..a.members].iter().map(|s| s.numel()).collect();
        let g = crate::codegen::optim::accumulate_group(a, &sizes, &in_dtypes[..a.members]);
        return Some((g.spec.clone(), Some(g)));
    }
    if let Op::SumSquares(s) = op {
        let members = s.members(inputs.len());
        let sizes: Vec<usize> = inputs[..members].iter().map(|s| s.numel()).collect();
        let g = crate::codegen::reduce_group::sum_squares_kernel(s, &sizes, &in_dtypes[..members]);
        return Some((g.spec.clone(), Some(g)));
    }
    // (a program rounding inputs to f16 computes with f16 values whatever it stores)
    let rounds = matches!(op, Op::Fused(f) if !f.rounded.is_empty());
    if dtype == DType::F16 || in_dtypes.contains(&DType::F16) || rounds {
        return select_f16(op, inputs, in_dtypes, out, dtype, ch);
    }
    match op {
        Op::MatMul(mm) => {
            let d = mm
                .dims(inputs[0], inputs[1])
                .expect("shape checked at build time");
            // `row_sums_in_products` sets them only on products that run tiled
            let tiled_only = |other: &str| {
                assert!(!mm.row_sums, "row sums on the {other} kernel");
                assert!(
                    !mm.tiled_only(),
                    "operand dropout or strided rows on the {other} kernel"
                );
            };
            if uses_coop(&d, ch) {
                tiled_only("tensor-core");
                let g = crate::codegen::coop::kernel(
                    mm,
                    &d,
                    DType::F32,
                    cores(ch),
                    coop_config(&d, ch, DType::F32),
                );
                return Some((g.spec.clone(), Some(g)));
            }
            if uses_gemv(&d, ch) {
                tiled_only("skinny-product");
                let g = gemm::gemv_kernel(mm, &d, None, DType::F32);
                return Some((g.spec.clone(), Some(g)));
            }
            match gemm_config(&d, ch) {
                Some(mut cfg) => {
                    cfg.split = 1;
                    let g = gemm::kernel(mm, &d, &cfg);
                    Some((g.spec.clone(), Some(g)))
                }
                None => {
                    tiled_only("portable");
                    op.kernel(inputs, out, ch.target).map(|k| (k, None))
                }
            }
        }
        Op::MatMulPartial(p) => {
            let g = p.kernel(inputs[0], inputs[1]);
            Some((g.spec.clone(), Some(g)))
        }
        Op::ImplicitGemm(c) => {
            let cols = c.cols_shape(inputs[1]);
            let d = c
                .product
                .dims(inputs[0], &cols)
                .expect("shape checked at build time");
            if c.partial.is_none() && uses_coop(&d, ch) {
                assert!(!c.product.row_sums, "row sums on the tensor-core kernel");
                let g = crate::codegen::coop::kernel_with(
                    &c.product,
                    &d,
                    DType::F32,
                    conv_operands(c),
                    cores(ch),
                    None,
                    coop_config(&d, ch, DType::F32),
                );
                return Some((g.spec.clone(), Some(g)));
            }
            let cfg = match c.partial {
                Some(cfg) => cfg,
                None => {
                    let mut cfg = gemm_config(&d, ch)?;
                    cfg.split = 1;
                    cfg
                }
            };
            let (ho, wo) = c.geom.out_hw();
            let nchw = c.nchw.then_some(ho * wo);
            let g = gemm::kernel_with(&c.product, &d, &cfg, Some(c.geom), nchw, None, DType::F32);
            Some((g.spec.clone(), Some(g)))
        }
        Op::MatMulEpilogue(e) => {
            let d = e
                .product
                .dims(inputs[0], inputs[1])
                .expect("shape checked at build time");
            let np = e.product_inputs();
            let mut shapes: Vec<&Shape> = inputs[e.program_inputs(inputs.len())].to_vec();
            shapes.insert(e.product_input, out);
            let keep = e.keep.then_some(DType::F32);
            let epi = elementwise::epilogue(
                &e.program,
                e.product_input,
                &shapes,
                out,
                np,
                DType::F32,
                keep,
            );
            let transposed = e.transposed_store();
            assert!(
                !(e.product.tiled_only() || transposed.is_some())
                    || runs_tiled(&d, dtype, in_dtypes, ch),
                "operand dropout, strided rows or a transposed store off the tiled kernel"
            );
            let g = if uses_coop(&d, ch) {
                crate::codegen::coop::kernel_with(
                    &e.product,
                    &d,
                    DType::F32,
                    crate::codegen::coop::Operands::Matrices,
                    cores(ch),
                    Some(&epi),
                    coop_config(&d, ch, DType::F32),
                )
            } else if uses_gemv(&d, ch) {
                gemm::gemv_kernel(&e.product, &d, Some(&epi), DType::F32)
            } else {
                let mut cfg = gemm_config(&d, ch)?;
                cfg.split = 1;
                let epi = Some(&epi);
                gemm::kernel_with(&e.product, &d, &cfg, None, transposed, epi, DType::F32)
            };
            Some((g.spec.clone(), Some(g)))
        }
        Op::ReducePrologue(r) => {
            let spec = r.reduce.kernel(&r.input_shape);
            let g = match &r.epilogue {
                None => elementwise::reduce_with_prologue(
                    &r.program,
                    inputs,
                    r.program_shape(),
                    spec,
                    DType::F32,
                ),
                Some(e) => {
                    // the epilogue's inputs: the reduction's result, then the node's others
                    let mut shapes: Vec<&Shape> = inputs[e.prologue_inputs..].to_vec();
                    shapes.insert(e.reduced, out);
                    let epi = elementwise::epilogue(
                        &e.program,
                        e.reduced,
                        &shapes,
                        out,
                        e.prologue_inputs,
                        DType::F32,
                        None,
                    );
                    if r.program.steps.is_empty() {
                        elementwise::reduce_with_epilogue(inputs[0], spec, &epi)
                    } else {
                        elementwise::reduce_with_prologue_and_epilogue(
                            &r.program,
                            &inputs[..e.prologue_inputs],
                            r.program_shape(),
                            spec,
                            &e.program,
                            &epi,
                        )
                    }
                }
            };
            Some((g.spec.clone(), Some(g)))
        }
        Op::ImplicitDgrad(c) => {
            let d = c.dims(inputs[0], out);
            if uses_coop(&d, ch) {
                let g = crate::codegen::coop::kernel_with(
                    &c.gemm(),
                    &d,
                    DType::F32,
                    crate::codegen::coop::Operands::Dgrad(c.geom),
                    cores(ch),
                    None,
                    coop_config(&d, ch, DType::F32),
                );
                return Some((g.spec.clone(), Some(g)));
            }
            let cfg = gemm_config(&d, ch)?;
            let g = gemm::dgrad_kernel_with(&c.gemm(), c.geom, &d, &cfg, DType::F32);
            Some((g.spec.clone(), Some(g)))
        }
        Op::Fused(f) => {
            let g = elementwise::kernel(f, inputs, out, DType::F32);
            Some((g.spec.clone(), Some(g)))
        }
        Op::Cast(_) => {
            let g = elementwise::cast_kernel(out, in_dtypes[0], dtype);
            Some((g.spec.clone(), Some(g)))
        }
        _ => op.kernel(inputs, out, ch.target).map(|k| (k, None)),
    }
}

/// Whether the tensor-core kernel runs on the matrix units or emulates them (a test path).
fn cores(ch: &Choice) -> crate::codegen::coop::Cores {
    crate::codegen::coop::Cores::of(ch.target)
}

/// How the tensor-core kernel reads an implicit-GEMM convolution's operands.
fn conv_operands(c: &ImplicitGemm) -> crate::codegen::coop::Operands {
    let (ho, wo) = c.geom.out_hw();
    crate::codegen::coop::Operands::Im2col {
        geom: c.geom,
        nchw: c.nchw.then_some(ho * wo),
    }
}

/// The GEMM configuration of an f16 product: as for f32 (f16 halves the operand traffic but
/// tiles stay f32 in workgroup memory), the model's choice where the policy names none.
fn gemm_config_f16(d: &ProductDims, ch: &Choice) -> GemmConfig {
    let mut cfg = gemm_config(d, ch)
        .or_else(|| gemm::choose(d.m, d.n, d.k, d.batch.numel(), ch.target))
        .unwrap_or(gemm::SMALLEST);
    cfg.split = 1;
    cfg
}

/// Kernels of nodes that read or write f16: every one generated, storing f16 and computing in
/// f32. Products run on tensor cores where the adapter has them (f16 inputs need no precision
/// flag), else the tiled family; elementwise ops, transposes and broadcasts run as
/// (step-less) fused programs; reductions as `reduce.wgsl` with f16 loads and stores.
fn select_f16(
    op: &Op,
    inputs: &[&Shape],
    in_dtypes: &[DType],
    out: &Shape,
    dtype: DType,
    ch: &Choice,
) -> Option<(KernelSpec, Option<Generated>)> {
    // operands read as stored: f16, or f32 rounded on load where a cast was folded in
    let storage = |n_operands: usize| crate::codegen::Storage {
        a: in_dtypes[0],
        b: in_dtypes[1],
        bias: if n_operands > 2 { in_dtypes[2] } else { dtype },
        out: dtype,
    };
    let single = |op: StepOp| Fused {
        steps: vec![Step {
            op,
            args: (0..inputs.len()).map(Operand::Input).collect(),
            shape: out.clone(),
        }],
        permuted: Vec::new(),
        gathered: Vec::new(),
        rounded: Vec::new(),
    };
    let g = match op {
        Op::Reshape | Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => return None,
        Op::Cast(_) => elementwise::cast_kernel(out, in_dtypes[0], dtype),
        Op::Unary(u) => elementwise::kernel(&single(StepOp::Unary(*u)), inputs, out, dtype),
        Op::Binary(b) => elementwise::kernel(&single(StepOp::Binary(*b)), inputs, out, dtype),
        // stored as its inputs (f32 or f16, but for indices, seeds and inputs rounded on load:
        // f16 values), its result as `dtype`: a cast done by the program's kernel
        // (`fuse::fuse_casts`)
        Op::Fused(f) => {
            let values: Vec<DType> = (0..inputs.len())
                .filter(|&k| !f.always_f32(k) && !f.rounds(k))
                .map(|k| in_dtypes[k])
                .collect();
            let from = match (values.first(), f.rounded.is_empty()) {
                (Some(&d), _) => d,
                (None, true) => dtype,
                (None, false) => DType::F16,
            };
            assert!(
                values.iter().all(|&d| d == from),
                "a fused program's inputs share one type"
            );
            assert!(
                f.rounded.is_empty() || from == DType::F16,
                "inputs rounded to f16 in a program of f16 values"
            );
            elementwise::kernel_from(f, inputs, out, from, dtype)
        }
        Op::Permute(p) => {
            let read = PermutedRead {
                input: 0,
                in_dims: inputs[0].dims().to_vec(),
                perm: p.perm.clone(),
                shape: out.clone(),
            };
            // (an f16 input's copy may store f32: `casts_into_producers`)
            elementwise::copy_kernel(inputs[0], out, Some(read), in_dtypes[0], dtype)
        }
        Op::Expand(_) => elementwise::copy_kernel(inputs[0], out, None, in_dtypes[0], dtype),
        Op::Reduce(r) => elementwise::reduce_with_prologue(
            &Fused::identity(),
            inputs,
            inputs[0],
            r.kernel(inputs[0]),
            dtype,
        ),
        Op::ReducePrologue(r) => {
            // `fuse::fuse_reduce_epilogue` gives epilogues to f32 reductions only
            assert!(r.epilogue.is_none(), "a reduction epilogue in f16");
            elementwise::reduce_with_prologue(
                &r.program,
                inputs,
                r.program_shape(),
                r.reduce.kernel(&r.input_shape),
                dtype,
            )
        }
        Op::MatMul(mm) => {
            let d = mm
                .dims(inputs[0], inputs[1])
                .expect("shape checked at build time");
            let st = storage(2 + (mm.bias != crate::ops::matmul::Bias::None) as usize);
            let tiled = runs_tiled(&d, dtype, in_dtypes, ch);
            assert!(tiled || !mm.row_sums, "row sums off the tiled kernel");
            assert!(
                tiled || !mm.tiled_only(),
                "operand dropout or strided rows off the tiled kernel"
            );
            if ch.coop_f16 && crate::codegen::coop::applies(&d) {
                crate::codegen::coop::kernel(mm, &d, st, cores(ch), coop_config(&d, ch, DType::F16))
            } else if uses_gemv(&d, ch) {
                gemm::gemv_kernel(mm, &d, None, st)
            } else {
                let cfg = gemm_config_f16(&d, ch);
                gemm::kernel_with(mm, &d, &cfg, None, None, None, st)
            }
        }
        Op::MatMulEpilogue(e) => {
            let d = e
                .product
                .dims(inputs[0], inputs[1])
                .expect("shape checked at build time");
            let np = e.product_inputs();
            let mut shapes: Vec<&Shape> = inputs[e.program_inputs(inputs.len())].to_vec();
            shapes.insert(e.product_input, out);
            // the kept product in its own type
            let keep = e.keep.then(|| in_dtypes[in_dtypes.len() - 1]);
            let epi =
                elementwise::epilogue(&e.program, e.product_input, &shapes, out, np, dtype, keep);
            let transposed = e.transposed_store();
            assert!(
                !(e.product.tiled_only() || transposed.is_some())
                    || runs_tiled(&d, dtype, in_dtypes, ch),
                "operand dropout, strided rows or a transposed store off the tiled kernel"
            );
            // the operands', bias's and result's types (the seeds after them are f32)
            let storage =
                |_| storage(2 + (e.product.bias != crate::ops::matmul::Bias::None) as usize);
            if ch.coop_f16 && crate::codegen::coop::applies(&d) {
                crate::codegen::coop::kernel_with(
                    &e.product,
                    &d,
                    storage(np),
                    crate::codegen::coop::Operands::Matrices,
                    cores(ch),
                    Some(&epi),
                    coop_config(&d, ch, DType::F16),
                )
            } else if uses_gemv(&d, ch) {
                gemm::gemv_kernel(&e.product, &d, Some(&epi), storage(np))
            } else {
                let cfg = gemm_config_f16(&d, ch);
                let (epi, st) = (Some(&epi), storage(np));
                gemm::kernel_with(&e.product, &d, &cfg, None, transposed, epi, st)
            }
        }
        Op::ImplicitGemm(c) => {
            let cols = c.cols_shape(inputs[1]);
            let d = c
                .product
                .dims(inputs[0], &cols)
                .expect("shape checked at build time");
            let st = storage(inputs.len());
            if ch.coop_f16 && crate::codegen::coop::applies(&d) {
                assert!(!c.product.row_sums, "row sums on the tensor-core kernel");
                crate::codegen::coop::kernel_with(
                    &c.product,
                    &d,
                    st,
                    conv_operands(c),
                    cores(ch),
                    None,
                    coop_config(&d, ch, DType::F16),
                )
            } else {
                let cfg = gemm_config_f16(&d, ch);
                let (ho, wo) = c.geom.out_hw();
                let nchw = c.nchw.then_some(ho * wo);
                gemm::kernel_with(&c.product, &d, &cfg, Some(c.geom), nchw, None, st)
            }
        }
        Op::ImplicitDgrad(c) => {
            let d = c.dims(inputs[0], out);
            if ch.coop_f16 && crate::codegen::coop::applies(&d) {
                crate::codegen::coop::kernel_with(
                    &c.gemm(),
                    &d,
                    storage(2 + c.bias as usize),
                    crate::codegen::coop::Operands::Dgrad(c.geom),
                    cores(ch),
                    None,
                    coop_config(&d, ch, DType::F16),
                )
            } else {
                let cfg = gemm_config_f16(&d, ch);
                gemm::dgrad_kernel_with(&c.gemm(), c.geom, &d, &cfg, storage(2 + c.bias as usize))
            }
        }
        // the others are hand-written kernels with a storage block: their f16 variants (the
        // graph's dtype rule lets only those families see f16; `f16_kernel` names a miss),
        // reading f32 where a cast was folded in
        other => {
            let rounded: Vec<&str> = other
                .rounded_f16_inputs()
                .iter()
                .filter(|(k, _)| in_dtypes.get(*k) == Some(&DType::F32))
                .map(|&(_, name)| name)
                .collect();
            // an f32 result of f16 values: its cast folded in (`casts_into_producers`), or a
            // normalization's kept with its statistics (`stats_inside_normalization`); not
            // for ops whose f32 results the kernels always store so (a loss, statistics)
            let f32_results =
                dtype == DType::F32 && !matches!(other.result_dtype(in_dtypes), Ok(DType::F32));
            crate::codegen::storage::f16_kernel(
                other.kernel(inputs, out, ch.target)?,
                &rounded,
                f32_results,
            )
        }
    };
    Some((g.spec.clone(), Some(g)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::liveness::reachable;
    use crate::graph::Graph;
    use crate::ops::conv::Conv2dOpts;
    use crate::ops::optim::OptimKind;

    /// `pass` over the nodes and order of `g` for `targets`, with the choices of a discrete GPU
    /// (automatic GEMMs, no tensor cores).
    fn on_discrete(
        g: &Graph,
        targets: &[NodeId],
        pass: impl FnOnce(&mut Vec<Node>, &mut Vec<NodeId>, &Choice),
    ) -> (Vec<Node>, Vec<NodeId>) {
        let mut nodes = g.nodes();
        let mut order = reachable(&nodes, targets);
        let target = Target::discrete();
        let tuned = HashMap::new();
        let ch = Choice {
            target: &target,
            policy: GemmPolicy::Auto,
            coop: false,
            coop_f16: false,
            coop_fixed: None,
            coop_default: CoopConfig::PLAIN,
            tuned: &tuned,
            coop_tuned: &HashMap::new(),
        };
        pass(&mut nodes, &mut order, &ch);
        (nodes, order)
    }

    /// The nodes and order of `g` for `targets` after `implicit_im2col` on a discrete GPU.
    fn lowered(g: &Graph, targets: &[NodeId]) -> (Vec<Node>, Vec<NodeId>) {
        on_discrete(g, targets, |nodes, order, ch| {
            implicit_im2col(nodes, order, targets, ch)
        })
    }

    /// A training plan's attention writes its log-sum-exps for the backward's statistics kernel
    /// (whose profiled work drops to none), and the plan gives the forward's buffer room for
    /// them; an f16 attention keeps recomputing them.
    #[test]
    fn attention_backward_reads_the_forwards_log_sum_exps() {
        for dtype in [DType::F32, DType::F16] {
            let g = Graph::new();
            let qkv = g.cast(g.input("qkv", [2, 5, 3, 2, 4]), dtype).unwrap();
            let y = g.attention_packed(qkv, None, true, None).unwrap();
            let loss = g.sum_all(g.cast(y, DType::F32).unwrap()).unwrap();
            let dqkv = g.grad(loss, &[qkv]).unwrap()[0];
            let mut nodes = g.nodes();
            let order = reachable(&nodes, &[dqkv]);
            attention_lse(&mut nodes, &order);
            let find = |stats: bool| {
                order.iter().copied().find(|id| match &nodes[id.0].op {
                    Op::Attention(_) => !stats,
                    Op::AttentionGrad(a) => {
                        stats && a.part == crate::ops::attention::GradPart::Stats
                    }
                    _ => false,
                })
            };
            let (f, s) = (find(false).unwrap(), find(true).unwrap());
            let (Op::Attention(a), Op::AttentionGrad(sg)) = (&nodes[f.0].op, &nodes[s.0].op) else {
                unreachable!()
            };
            let f32 = dtype == DType::F32;
            assert_eq!((a.lse, sg.attention.lse), (f32, f32), "{dtype}");
            // 2 batches x 2 heads x 5 rows of log-sum-exps past the output
            let extra = crate::exec::liveness::storage_bytes(&nodes, f)
                - dtype.buffer_bytes(nodes[f.0].shape.numel());
            assert_eq!(extra, if f32 { 4 * 20 } else { 0 });
            let shapes: Vec<&Shape> = nodes[s.0]
                .inputs
                .iter()
                .map(|i| &nodes[i.0].shape)
                .collect();
            let flops = nodes[s.0].op.cost(&shapes, &nodes[s.0].shape).0;
            assert_eq!(flops == 0.0, f32);
        }
    }

    #[test]
    fn common_subexpressions_collapse_but_not_across_updates() {
        let g = Graph::new();
        let x = g.input("x", [3, 4]);
        let p = g.param("p", [3, 4]);
        // the same chain twice: both collapse into the first
        let a = g.sum(g.mul(x, p).unwrap(), 0, false).unwrap();
        let b = g.sum(g.mul(x, p).unwrap(), 0, false).unwrap();
        let y = g.add(a, b).unwrap();
        // p updated in place, then the same product again: it reads the new p, so it stays
        let (hyper, scale) = (g.input("h", [16]), g.input("s", [1]));
        let grad = g.input("g", [3, 4]);
        let step = g
            .optim_step(OptimKind::Sgd, hyper, scale, grad, p, &[])
            .unwrap();
        let after = g.mul(x, p).unwrap();
        let targets = [y, step, after];
        let mut nodes = g.nodes();
        let mut order = reachable(&nodes, &targets);
        // run the update before `after`, as a plan would
        order.retain(|&id| id != after);
        order.push(after);
        let before = order.len();
        common_subexpressions(&mut nodes, &mut order, &targets);
        assert_eq!(order.len(), before - 2, "the second mul and sum went");
        assert_eq!(nodes[y.0].inputs, vec![a, a]);
        assert!(
            order.contains(&after),
            "a read after the update is not the same value"
        );
    }

    /// The lowering of `targets` on a discrete GPU, every pass, fusion on.
    fn lowered_fully(g: &Graph, targets: &[NodeId]) -> (Vec<Node>, Vec<NodeId>) {
        on_discrete(g, targets, |nodes, order, ch| {
            lower(nodes, order, targets, targets, ch, true)
        })
    }

    /// A linear layer's bias gradient is the row sums its weight gradient's product writes (a
    /// view placed right after it), not a reduction; a sum read before the product stays one.
    #[test]
    fn bias_gradients_are_row_sums_of_the_weight_gradients_product() {
        use crate::ops::matmul::Bias;
        let g = Graph::new();
        let x = g.input("x", [40, 24]);
        let w = g.param("w", [16, 24]);
        let b = g.param("b", [16]);
        let y = g
            .matmul_fused(x, w, false, true, Some((b, Bias::Cols)), true)
            .unwrap();
        let grads = g.grad(g.sum_all(y).unwrap(), &[w, b]).unwrap();
        let (nodes, order) = lowered_fully(&g, &grads);
        assert!(!order
            .iter()
            .any(|id| matches!(nodes[id.0].op, Op::Reduce(_))));
        let s = order
            .iter()
            .position(|id| matches!(nodes[id.0].op, Op::RowSums(_)))
            .expect("the bias gradient is a view of row sums");
        let p = nodes[order[s].0].inputs[0];
        assert!(matches!(nodes[p.0].op, Op::MatMul(mm) if mm.row_sums && mm.trans_a));
        assert_eq!(order[s - 1], p, "right after its product");
        assert_eq!(
            crate::exec::liveness::storage_offset(&nodes, order[s]),
            4 * crate::ops::matmul::row_sums_offset(16, 24) as u64
        );

        // read (by `t`) before the weight gradient's product: a reduction of its own
        let g = Graph::new();
        let dy = g.input("dy", [40, 16]);
        let x = g.input("x", [40, 24]);
        let db = g.sum_to(dy, &crate::tensor::Shape(vec![16])).unwrap();
        let t = g.mul_scalar(db, 2.0).unwrap();
        let dw = g.matmul_t(dy, x, true, false).unwrap();
        let (nodes, order) = lowered_fully(&g, &[t, dw]);
        assert!(order
            .iter()
            .any(|id| matches!(nodes[id.0].op, Op::Reduce(_))));
        assert!(!order
            .iter()
            .any(|id| matches!(nodes[id.0].op, Op::RowSums(_))));
    }

    /// Evaluates `outputs` (and the graph's state updates) on the CPU twins of the graph's nodes
    /// and of the nodes lowered for a discrete GPU (fusion on), `feeds` giving every input and
    /// parameter by name, and checks that the outputs and the parameters written in place agree
    /// (within f32 reductions' tolerance: the lowered twins sum in their kernels' order).
    /// Returns the lowered nodes and order.
    fn evaluates_as_the_graph(
        g: &Graph,
        outputs: &[NodeId],
        feeds: &[(&str, crate::tensor::Tensor)],
    ) -> (Vec<Node>, Vec<NodeId>) {
        evaluates_with_effects(g, outputs, &[], feeds)
    }

    /// [`evaluates_as_the_graph`], `effects` run too (a training step's updates: compiled, not
    /// read back).
    fn evaluates_with_effects(
        g: &Graph,
        outputs: &[NodeId],
        effects: &[NodeId],
        feeds: &[(&str, crate::tensor::Tensor)],
    ) -> (Vec<Node>, Vec<NodeId>) {
        use crate::tensor::Tensor;
        let mut targets = outputs.to_vec();
        targets.extend(effects);
        targets.extend(g.state_updates());
        let run = |nodes: &[Node], order: &[NodeId]| {
            let mut stored: HashMap<String, Tensor> = HashMap::new();
            let feed = |_: NodeId, n: &Node| -> crate::Result<Tensor> {
                match &n.op {
                    Op::Input { name } | Op::Param { name, .. } => Ok(feeds
                        .iter()
                        .find(|(f, _)| f == name)
                        .unwrap_or_else(|| panic!("no feed {name}"))
                        .1
                        .clone()),
                    Op::Const { value } => Ok((**value).clone()),
                    _ => unreachable!("only sources are fed"),
                }
            };
            let values = crate::cpu::evaluate(nodes, order, feed, |name, t| {
                stored.insert(name.to_string(), t);
                Ok(())
            })
            .unwrap();
            (values, stored)
        };
        let nodes = g.nodes();
        let (want, want_stored) = run(&nodes, &reachable(&nodes, &targets));
        let (lowered, order) = on_discrete(g, &targets, |nodes, order, ch| {
            lower(nodes, order, outputs, &targets, ch, true)
        });
        let (got, got_stored) = run(&lowered, &order);
        let close = |what: &str, a: &Tensor, b: &Tensor| {
            assert_eq!(a.shape(), b.shape(), "{what}");
            for (k, (&x, &y)) in a.data().iter().zip(b.data()).enumerate() {
                let ok = (x - y).abs() as f64 <= 1e-5 + 1e-4 * y.abs() as f64;
                assert!(ok || (x.is_nan() && y.is_nan()), "{what}[{k}]: {x} vs {y}");
            }
        };
        for &o in outputs {
            let (a, b) = (got[o.0].as_ref(), want[o.0].as_ref());
            close(
                &format!("node {}", o.0),
                a.expect("lowered"),
                b.expect("graph"),
            );
        }
        assert_eq!(got_stored.len(), want_stored.len());
        for (name, t) in &want_stored {
            close(name, &got_stored[name], t);
        }
        (lowered, order)
    }

    /// The CPU twins of this session's lowered ops (batch norm statistics merged from blocks,
    /// moving running statistics in the statistics and normalization kernels; products reading
    /// operands through dropout, with row sums and split along K; the relu mask inside a
    /// max-pooling backward, both layouts; an LSTM backward reading its gradient's window;
    /// per-row cross-entropy) evaluate as the graph they replace.
    #[test]
    fn lowered_programs_evaluate_as_their_graphs() {
        use crate::ops::matmul::Bias;
        use crate::ops::norm::RunningStats;
        use crate::tensor::Tensor;
        let has = |nodes: &[Node], order: &[NodeId], pick: &dyn Fn(&Op) -> bool| {
            order.iter().any(|id| pick(&nodes[id.0].op))
        };
        let rand = |s: &[usize], seed: u64| Tensor::rand_uniform(s.to_vec(), -1.0, 1.0, seed);
        // batch norms: blocks and a merge, a statistics kernel, statistics inside the
        // normalization; each moving its running statistics
        for shape in [[1usize, 2, 131, 131], [2, 2, 48, 48], [2, 2, 5, 5]] {
            let g = Graph::new();
            let x = g.input("x", shape);
            let running = RunningStats {
                mean: g.param("m", [2]),
                var: g.param("v", [2]),
                momentum: 0.1,
            };
            let affine = (g.param("w", [2]), g.param("b", [2]));
            let y = g
                .batch_norm(x, Some(affine), Some(running), true, 1e-5)
                .unwrap();
            let loss = g
                .sum_all(g.mul(y, g.constant(rand(&shape, 2))).unwrap())
                .unwrap();
            let mut outs = vec![y];
            outs.extend(g.grad(loss, &[x, affine.0, affine.1]).unwrap());
            let feeds = [
                ("x", Tensor::rand_uniform(shape.to_vec(), -1.0, 5.0, 1)),
                ("m", rand(&[2], 3)),
                ("v", Tensor::rand_uniform(vec![2], 1.0, 3.0, 4)),
                ("w", rand(&[2], 5)),
                ("b", rand(&[2], 6)),
            ];
            let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
            let moving = |op: &Op| match op {
                Op::GroupStats(s) => s.running.is_some(),
                Op::MergeStats(m) => m.running.is_some(),
                Op::NormalizeStats(n) => n.running.is_some(),
                _ => false,
            };
            assert!(has(&nodes, &order, &moving), "{shape:?}");
        }
        // a feed-forward block with dropout, its weight gradients split along K at 2,048 rows
        for (rows, e, h) in [(32usize, 16usize, 64usize), (2048, 12, 20)] {
            let g = Graph::new();
            let x = g.input("x", [rows, e]);
            let (w1, b1) = (g.input("w1", [h, e]), g.input("b1", [h]));
            let (w2, b2) = (g.input("w2", [e, h]), g.input("b2", [e]));
            let s = g.input("seed", [1]);
            let hid = g
                .matmul_fused(x, w1, false, true, Some((b1, Bias::Cols)), true)
                .unwrap();
            let hid = g.dropout(hid, 0.3, s, 1).unwrap();
            let y = g
                .matmul_fused(hid, w2, false, true, Some((b2, Bias::Cols)), false)
                .unwrap();
            let y = g.add(x, g.dropout(y, 0.2, s, 2).unwrap()).unwrap();
            let loss = g
                .sum_all(g.mul(y, g.constant(rand(&[rows, e], 7))).unwrap())
                .unwrap();
            let mut outs = vec![y];
            outs.extend(g.grad(loss, &[x, w1, b1, w2, b2]).unwrap());
            let feeds = [
                ("x", rand(&[rows, e], 8)),
                ("w1", rand(&[h, e], 9)),
                ("b1", rand(&[h], 10)),
                ("w2", rand(&[e, h], 11)),
                ("b2", rand(&[e], 12)),
                ("seed", Tensor::new([1], vec![77.0]).unwrap()),
            ];
            let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
            let dropped = |op: &Op| match op {
                Op::MatMul(m) => m.drop_a.is_some() || m.drop_b.is_some(),
                Op::MatMulEpilogue(e) => e.product.drop_a.is_some(),
                Op::MatMulPartial(p) => p.product.drop_a.is_some(),
                _ => false,
            };
            assert!(has(&nodes, &order, &dropped), "{rows}");
            let masked_sums = |op: &Op| matches!(op, Op::RowSums(r) if r.1.is_some());
            assert!(has(&nodes, &order, &masked_sums), "{rows}");
        }
        // relu then max pooling, after a convolution (its GEMM layout) and alone (NCHW)
        for conv in [true, false] {
            let g = Graph::new();
            let x = g.input("x", [2, 3, 9, 9]);
            let (w, b) = (g.input("w", [4, 3, 3, 3]), g.input("b", [4]));
            let h = match conv {
                true => g
                    .conv2d_fused(x, w, Some(b), Conv2dOpts::default(), true)
                    .unwrap(),
                false => g.relu(x).unwrap(),
            };
            let y = g.max_pool2d(h, (2, 2), (2, 2), (0, 0)).unwrap();
            let loss = g
                .sum_all(g.mul(y, g.constant(rand(&g.shape(y).0, 13))).unwrap())
                .unwrap();
            let outs = g
                .grad(loss, &[x, w, b][..if conv { 3 } else { 1 }])
                .unwrap();
            let feeds = [
                ("x", rand(&[2, 3, 9, 9], 14)),
                ("w", rand(&[4, 3, 3, 3], 15)),
                ("b", rand(&[4], 16)),
            ];
            let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
            let masked = |op: &Op| matches!(op, Op::MaxPoolReluBackward(p) if p.cn == conv);
            assert!(has(&nodes, &order, &masked), "conv {conv}");
        }
        // a convolution, relu, flatten and linear layer (the MNIST CNN's head): the linear
        // layer's input gradient stored transposed, into the convolution's layout, through the
        // relu's gradient
        let g = Graph::new();
        let x = g.input("x", [9, 2, 5, 5]);
        let (w, b) = (g.input("w", [3, 2, 3, 3]), g.input("b", [3]));
        let w2 = g.input("w2", [4, 27]);
        let h = g
            .conv2d_fused(x, w, Some(b), Conv2dOpts::default(), true)
            .unwrap();
        let y = g
            .matmul_t(g.reshape(h, &[9, 27]).unwrap(), w2, false, true)
            .unwrap();
        let loss = g
            .sum_all(g.mul(y, g.constant(rand(&[9, 4], 17))).unwrap())
            .unwrap();
        let outs = g.grad(loss, &[x, w, b, w2]).unwrap();
        let feeds = [
            ("x", rand(&[9, 2, 5, 5], 18)),
            ("w", rand(&[3, 2, 3, 3], 19)),
            ("b", rand(&[3], 20)),
            ("w2", rand(&[4, 27], 21)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let transposed =
            |op: &Op| matches!(op, Op::MatMulEpilogue(e) if e.transposed_store() == Some(9));
        assert!(has(&nodes, &order, &transposed));
        // a batch norm's relu inside its normalization (statistics of their own, and inside
        // it, viewed by the backward past the fused output); after a convolution, its input
        // gradient stored channels first
        for shape in [[2usize, 3, 9, 9], [2, 3, 2, 2]] {
            let g = Graph::new();
            let x = g.input("x", shape);
            let affine = (g.input("w", [3]), g.input("b", [3]));
            let y = g.batch_norm(x, Some(affine), None, true, 1e-5).unwrap();
            let r = g.relu(g.reshape(y, &[2, 3, -1]).unwrap()).unwrap();
            let loss = g
                .sum_all(g.mul(r, g.constant(rand(&g.shape(r).0, 30))).unwrap())
                .unwrap();
            let mut outs = vec![r];
            outs.extend(g.grad(loss, &[x, affine.0, affine.1]).unwrap());
            let feeds = [
                ("x", Tensor::rand_uniform(shape.to_vec(), -1.0, 5.0, 31)),
                ("w", rand(&[3], 32)),
                ("b", rand(&[3], 33)),
            ];
            let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
            let fused = |op: &Op| match op {
                Op::Normalize(n) => n.relu,
                Op::NormalizeStats(s) => s.norm.relu,
                _ => false,
            };
            assert!(has(&nodes, &order, &fused), "{shape:?}");
        }
        let g = Graph::new();
        let x = g.input("x", [2, 3, 9, 9]);
        let cw = g.input("cw", [4, 3, 3, 3]);
        let h = g
            .conv2d_fused(x, cw, None, Conv2dOpts::default(), false)
            .unwrap();
        let affine = (g.input("w", [4]), g.input("b", [4]));
        let y = g
            .relu(g.batch_norm(h, Some(affine), None, true, 1e-5).unwrap())
            .unwrap();
        let loss = g
            .sum_all(g.mul(y, g.constant(rand(&g.shape(y).0, 34))).unwrap())
            .unwrap();
        let outs = g.grad(loss, &[x, cw, affine.0, affine.1]).unwrap();
        let feeds = [
            ("x", rand(&[2, 3, 9, 9], 35)),
            ("cw", rand(&[4, 3, 3, 3], 36)),
            ("w", rand(&[4], 37)),
            ("b", rand(&[4], 38)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let first = |op: &Op| matches!(op, Op::NormalizeAffineBackward(n) if n.channels_first);
        assert!(has(&nodes, &order, &first));
        // broadcast reads instead of expands: a unary step and a dropout on one (the twin
        // expands first), an MSE gradient's single value
        let g = Graph::new();
        let x = g.input("x", [4, 1, 5]);
        let s = g.input("seed", [1]);
        let wide = Shape(vec![4, 3, 5]);
        let u = g.tanh(g.expand(x, &wide).unwrap()).unwrap();
        let x2 = g.input("x2", [4, 1, 5]);
        let d = g.dropout(g.expand(x2, &wide).unwrap(), 0.4, s, 3).unwrap();
        let t = g.input("t", [6, 2]);
        let p = g.input("p", [6, 2]);
        let dp = g.grad(g.mse_loss(p, t).unwrap(), &[p]).unwrap()[0];
        let feeds = [
            ("x", rand(&[4, 1, 5], 26)),
            ("x2", rand(&[4, 1, 5], 29)),
            ("seed", Tensor::new([1], vec![5.0]).unwrap()),
            ("t", rand(&[6, 2], 27)),
            ("p", rand(&[6, 2], 28)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &[u, d, dp], &feeds);
        let expands = |op: &Op| matches!(op, Op::Expand(_));
        assert!(!has(&nodes, &order, &expands));
        // casts to f16 rounded on load (broadcast, and through a transpose), transposes running
        // the chains and casts they alone read
        let g = Graph::new();
        let half = |name: &str, s: &[usize]| g.cast(g.input(name, s.to_vec()), DType::F16).unwrap();
        let sum = g.add(half("y", &[6, 5]), half("b", &[5])).unwrap();
        let t = g.transpose(half("x", &[6, 5]), 0, 1).unwrap();
        let chain = g.mul(half("x2", &[6, 5]), half("y2", &[6, 5])).unwrap();
        // (one step: a fused chain of f16 values rounds only its result, unlike the graph)
        let tc = g.transpose(chain, 0, 1).unwrap();
        let feeds = ["y", "b", "x", "x2", "y2"]
            .map(|n| (n, rand(if n == "b" { &[5] } else { &[6, 5] }, 40)));
        let (nodes, order) = evaluates_as_the_graph(&g, &[sum, t, tc], &feeds);
        let casts = |op: &Op| matches!(op, Op::Cast(_));
        assert!(!has(&nodes, &order, &casts));
        assert_eq!(
            order
                .iter()
                .filter(|id| matches!(nodes[id.0].op, Op::Fused(_)))
                .count(),
            3
        );
        // a position table's gradient adding the batch's blocks itself
        let g = Graph::new();
        let pos = g.input("pos", [4]);
        let table = g.input("table", [6, 3]);
        let x = g.input("x", [5, 4, 3]);
        let y = g.add(x, g.embedding(pos, table).unwrap()).unwrap();
        let loss = g
            .sum_all(g.mul(y, g.constant(rand(&[5, 4, 3], 41))).unwrap())
            .unwrap();
        let dt = g.grad(loss, &[table]).unwrap()[0];
        let positions = Tensor::new([4], vec![0.0, 2.0, 1.0, 2.0]).unwrap();
        let feeds = [
            ("pos", positions),
            ("table", rand(&[6, 3], 42)),
            ("x", rand(&[5, 4, 3], 43)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &[dt], &feeds);
        let blocks = |op: &Op| matches!(op, Op::EmbeddingBackward(e) if e.repeat == 5);
        assert!(has(&nodes, &order, &blocks));
        // a large table's gradient reading the list of its rows' lookups (and the batch's
        // blocks), invalid and repeated ids among them
        let (v, n) = (4200, 1500);
        let g = Graph::new();
        let pos = g.input("pos", [n]);
        let table = g.input("table", [v, 3]);
        let x = g.input("x", [2, n, 3]);
        let y = g.add(x, g.embedding(pos, table).unwrap()).unwrap();
        let loss = g
            .sum_all(g.mul(y, g.constant(rand(&[2, n, 3], 47))).unwrap())
            .unwrap();
        let dt = g.grad(loss, &[table]).unwrap()[0];
        let ids = (0..n)
            .map(|k| match k % 10 {
                3 => -1.0,
                4 => v as f32,
                5 => 0.5,
                _ => (k * 7919 % (v + 1) / 2) as f32,
            })
            .collect();
        let feeds = [
            ("pos", Tensor::new([n], ids).unwrap()),
            ("table", rand(&[v, 3], 48)),
            ("x", rand(&[2, n, 3], 49)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &[dt], &feeds);
        let listed = |op: &Op| matches!(op, Op::EmbeddingBackward(e) if e.repeat == 2 && e.sorted);
        assert!(has(&nodes, &order, &listed));
        assert!(has(&nodes, &order, &|op: &Op| matches!(
            op,
            Op::EmbeddingRows(_)
        )));
        // an encoder-decoder: the decoder's `dh0 | dc0` go back into the encoder as one narrow,
        // the encoder's backward's window of its state gradient
        let (t, b, i, h) = (3, 2, 2, 3);
        let g = Graph::new();
        let x = g.input("x", [t, b, i]);
        let y = g.input("y", [t, b, i]);
        let w = |name: &str, rows: usize, cols: usize| g.input(name, [rows, cols]);
        let (w_ih, w_hh, v_ih, v_hh) = (
            w("w_ih", 4 * h, i),
            w("w_hh", 4 * h, h),
            w("v_ih", 4 * h, i),
            w("v_hh", 4 * h, h),
        );
        let bias = g.input("bias", [4 * h]);
        let zeros = g.constant(Tensor::zeros([b, h]));
        let (_, hn, cn) = g
            .lstm_layer(x, w_ih, w_hh, bias, bias, zeros, zeros, None, false)
            .unwrap();
        let (out, _, _) = g
            .lstm_layer(y, v_ih, v_hh, bias, bias, hn, cn, None, false)
            .unwrap();
        let loss = g
            .sum_all(g.mul(out, g.constant(rand(&[t, b, h], 50))).unwrap())
            .unwrap();
        let grads = g.grad(loss, &[x, w_hh]).unwrap();
        let feeds = [
            ("x", rand(&[t, b, i], 51)),
            ("y", rand(&[t, b, i], 52)),
            ("w_ih", rand(&[4 * h, i], 53)),
            ("w_hh", rand(&[4 * h, h], 54)),
            ("v_ih", rand(&[4 * h, i], 55)),
            ("v_hh", rand(&[4 * h, h], 56)),
            ("bias", rand(&[4 * h], 57)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &grads, &feeds);
        let window = |op: &Op| matches!(op, Op::LstmBackward(l) if l.dp_window.is_some_and(|w| w.width == 2 * h));
        assert!(has(&nodes, &order, &window));
        // two disjoint pads summed: one copy with a gap of zeros
        let g = Graph::new();
        let x = g.input("x", [2, 9]);
        let part = |start: usize, len: usize, seed: u64| {
            let p = g.narrow(x, 1, start, len).unwrap();
            let r = g.constant(rand(&[2, len], seed));
            g.sum_all(g.mul(p, r).unwrap()).unwrap()
        };
        let loss = g.add(part(1, 3, 44), part(6, 2, 45)).unwrap();
        let dx = g.grad(loss, &[x]).unwrap()[0];
        let (nodes, order) = evaluates_as_the_graph(&g, &[dx], &[("x", rand(&[2, 9], 46))]);
        let two = |op: &Op| matches!(op, Op::AxisCopy(a) if a.b_start.is_some());
        assert!(has(&nodes, &order, &two));
        // a clipped training step, clipping and not: the update groups compute the coefficient
        // from the partial sums of squares
        for max_norm in [0.05f32, 1e3] {
            let g = Graph::new();
            let x = g.input("x", [6, 4]);
            let w1 = g.param("w1", [5, 4]);
            let w2 = g.param("w2", [3, 5]);
            let y = g
                .matmul_t(
                    g.tanh(g.matmul_t(x, w1, false, true).unwrap()).unwrap(),
                    w2,
                    false,
                    true,
                )
                .unwrap();
            let loss = g.sum_all(g.square(y).unwrap()).unwrap();
            // (SGD: two members fit the 8 bindings of WebGPU's minimum beside hyper, the
            // partial sums and the clipping's constant)
            let mut opt = crate::nn::Optimizer::sgd(0.1).clip_grad_norm(max_norm);
            let updates = opt.minimize(&g, loss, &[w1, w2]).unwrap();
            let feeds = [
                ("x", rand(&[6, 4], 22)),
                ("w1", rand(&[5, 4], 23)),
                ("w2", rand(&[3, 5], 24)),
                ("optim.hyper", opt.next_hyper()),
            ];
            let (nodes, order) = evaluates_with_effects(&g, &[loss], &updates, &feeds);
            let computed = |op: &Op| matches!(op, Op::OptimGroup(o) if o.scale_from.is_some());
            assert!(has(&nodes, &order, &computed), "max norm {max_norm}");
            let reduced = |op: &Op| matches!(op, Op::ReducePrologue(r) if r.epilogue.is_some());
            assert!(!has(&nodes, &order, &reduced), "max norm {max_norm}");
        }
        // an LSTM whose loss reads the last h
        let (t, b, i, h) = (4usize, 3usize, 2usize, 5usize);
        let g = Graph::new();
        let x = g.input("x", [t, b, i]);
        let (w_ih, w_hh) = (g.input("w_ih", [4 * h, i]), g.input("w_hh", [4 * h, h]));
        let (b_ih, b_hh) = (g.input("b_ih", [4 * h]), g.input("b_hh", [4 * h]));
        let (h0, c0) = (g.input("h0", [b, h]), g.input("c0", [b, h]));
        let (_, hn, _) = g
            .lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, None, false)
            .unwrap();
        let loss = g
            .sum_all(g.mul(hn, g.constant(rand(&[b, h], 17))).unwrap())
            .unwrap();
        let outs = g.grad(loss, &[x, w_ih, w_hh, b_ih, h0, c0]).unwrap();
        let feeds = [
            ("x", rand(&[t, b, i], 18)),
            ("w_ih", rand(&[4 * h, i], 19)),
            ("w_hh", rand(&[4 * h, h], 20)),
            ("b_ih", rand(&[4 * h], 21)),
            ("b_hh", rand(&[4 * h], 22)),
            ("h0", rand(&[b, h], 23)),
            ("c0", rand(&[b, h], 24)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let windowed = |op: &Op| matches!(op, Op::LstmBackward(l) if l.dp_window.is_some());
        assert!(has(&nodes, &order, &windowed));
        // cross-entropy over more logits than one workgroup folds
        let (n, c) = (9usize, 30_011usize);
        let g = Graph::new();
        let logits = g.input("x", [n, c]);
        let labels = g.input("y", [n]);
        let loss = g.cross_entropy(logits, labels).unwrap();
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &[logits]).unwrap());
        let feeds = [
            ("x", Tensor::rand_uniform(vec![n, c], -4.0, 4.0, 25)),
            (
                "y",
                Tensor::new([n], (0..n).map(|k| (k * 3331 % c) as f32).collect()).unwrap(),
            ),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let rows = |op: &Op| matches!(op, Op::CrossEntropyRows(_));
        assert!(has(&nodes, &order, &rows));
        // gradient clipping's coefficient from a sum of squares, inside the sum's kernel
        let g = Graph::new();
        let (a, b) = (g.input("a", [9, 5]), g.input("b", [3]));
        let norm = g.sqrt(g.sum_squares(&[a, b]).unwrap()).unwrap();
        let coef = g
            .rdiv_scalar(g.add_scalar(norm, 1e-6).unwrap(), 0.5)
            .unwrap();
        let y = g.minimum(coef, g.constant(Tensor::full([1], 1.0))).unwrap();
        let feeds = [("a", rand(&[9, 5], 29)), ("b", rand(&[3], 30))];
        let (nodes, order) = evaluates_as_the_graph(&g, &[y], &feeds);
        let epilogue = |op: &Op| matches!(op, Op::ReducePrologue(r) if r.epilogue.is_some());
        assert!(has(&nodes, &order, &epilogue));
        // a small loss computing its gradient too, a bad label among them
        let (n, c) = (5usize, 7usize);
        let g = Graph::new();
        let logits = g.input("x", [n, c]);
        let loss = g.cross_entropy(logits, g.input("y", [n])).unwrap();
        let mut outs = vec![loss];
        outs.extend(g.grad(loss, &[logits]).unwrap());
        let feeds = [
            ("x", rand(&[n, c], 28)),
            ("y", Tensor::new([n], vec![0., 6., 3., 7., 2.]).unwrap()),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let with_grad = |op: &Op| matches!(op, Op::CrossEntropy(c) if c.with_grad);
        assert!(has(&nodes, &order, &with_grad));
        // token and position lookups (a bad index among them), summed, scaled and cast to f16:
        // one fused program reading both tables
        let g = Graph::new();
        let (ids, positions) = (g.input("ids", [2, 3]), g.input("positions", [3]));
        let tok = g.embedding(ids, g.param("tok", [5, 4])).unwrap();
        let pos = g.embedding(positions, g.param("pos", [3, 4])).unwrap();
        let x = g.mul_scalar(g.add(tok, pos).unwrap(), 0.5).unwrap();
        let y = g.cast(x, DType::F16).unwrap();
        let feeds = [
            (
                "ids",
                Tensor::new([2, 3], vec![0., 4., 2., 5., 1., 3.]).unwrap(),
            ),
            ("positions", Tensor::new([3], vec![0., 1., 2.]).unwrap()),
            ("tok", rand(&[5, 4], 26)),
            ("pos", rand(&[3, 4], 27)),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &[y], &feeds);
        let gathered = |op: &Op| matches!(op, Op::Fused(f) if f.gathered.len() == 2);
        assert!(has(&nodes, &order, &gathered));
        let looked_up = |op: &Op| matches!(op, Op::Embedding(_) | Op::Cast(_));
        assert!(!has(&nodes, &order, &looked_up));
        // layer norms' backward in one kernel with their parameters' sums: whole and in blocks
        // of rows, with and without a residual connection around them
        for (rows, residual) in [(6usize, false), (6, true), (1100, true)] {
            let g = Graph::new();
            let x = g.input("x", [rows, 5]);
            let (w, b) = (g.input("w", [5]), g.input("b", [5]));
            let h = g.layer_norm(x, 1, Some((w, b)), 1e-5).unwrap();
            let h = g.tanh(h).unwrap();
            let y = if residual { g.add(x, h).unwrap() } else { h };
            let loss = g
                .sum_all(g.mul(y, g.constant(rand(&[rows, 5], 31))).unwrap())
                .unwrap();
            let outs = g.grad(loss, &[x, w, b]).unwrap();
            let feeds = [
                ("x", Tensor::rand_uniform(vec![rows, 5], -2.0, 3.0, 32)),
                ("w", rand(&[5], 33)),
                ("b", rand(&[5], 34)),
            ];
            let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
            let merged = |op: &Op| matches!(op, Op::NormalizeBackward(n) if n.sums && n.residual == residual);
            assert!(has(&nodes, &order, &merged), "{rows} {residual}");
            let sums_kernel = |op: &Op| matches!(op, Op::GroupSums(_));
            assert!(!has(&nodes, &order, &sums_kernel), "{rows} {residual}");
        }
        // a feed-forward layer's GELU after its product, whose gradient reads the product: the
        // epilogue's kernel stores it (its reshape and its readers placed after the kernel)
        let g = Graph::new();
        let x = g.input("x", [2, 3, 4]);
        let (w, b) = (g.input("w", [6, 4]), g.input("b", [6]));
        let rows = g.reshape(x, &[6, 4]).unwrap();
        let u = g
            .matmul_fused(rows, w, false, true, Some((b, Bias::Cols)), false)
            .unwrap();
        let y = g
            .dropout(
                g.gelu(g.reshape(u, &[2, 3, 6]).unwrap()).unwrap(),
                0.3,
                g.input("s", [1]),
                4,
            )
            .unwrap();
        let loss = g
            .sum_all(g.mul(y, g.constant(rand(&[2, 3, 6], 35))).unwrap())
            .unwrap();
        let mut outs = vec![y];
        outs.extend(g.grad(loss, &[x, w, b]).unwrap());
        let feeds = [
            ("x", rand(&[2, 3, 4], 36)),
            ("w", rand(&[6, 4], 37)),
            ("b", rand(&[6], 38)),
            ("s", Tensor::new([1], vec![12.0]).unwrap()),
        ];
        let (nodes, order) = evaluates_as_the_graph(&g, &outs, &feeds);
        let kept = |op: &Op| matches!(op, Op::MatMulEpilogue(e) if e.keep);
        assert!(has(&nodes, &order, &kept));
    }

    /// A training batch norm's statistics kernel moves the running statistics itself (no
    /// `running_update` kernel): the merge of blocks where channels hold more than 16,384
    /// elements, the statistics kernel where more than 4,096, else the normalization; asked
    /// for as an output, the update keeps its kernel.
    #[test]
    fn batch_norm_statistics_move_the_running_ones() {
        use crate::ops::norm::RunningStats;
        // (shape, blocks of statistics: 0 for none, inside the normalization)
        for (shape, blocks) in [
            ([2usize, 4, 100, 99], 3usize),
            ([2, 4, 50, 50], 1),
            ([2, 4, 20, 20], 0),
        ] {
            let g = Graph::new();
            let x = g.input("x", shape);
            let running = RunningStats {
                mean: g.param("m", [4]),
                var: g.param("v", [4]),
                momentum: 0.1,
            };
            let affine = (g.param("w", [4]), g.param("b", [4]));
            let y = g
                .batch_norm(x, Some(affine), Some(running), true, 1e-5)
                .unwrap();
            let mut targets = vec![y];
            targets.extend(g.state_updates());
            for asked in [false, true] {
                let outputs = if asked { &targets[..] } else { &targets[..1] };
                let (nodes, order) = on_discrete(&g, &targets, |nodes, order, ch| {
                    lower(nodes, order, outputs, &targets, ch, true)
                });
                let ops: Vec<&Op> = order.iter().map(|id| &nodes[id.0].op).collect();
                let updates = ops
                    .iter()
                    .filter(|o| matches!(o, Op::RunningUpdate(_)))
                    .count();
                assert_eq!(
                    updates, asked as usize,
                    "{shape:?}, asked {asked}: {ops:#?}"
                );
                let moving = ops.iter().any(|o| match o {
                    Op::GroupStats(s) => s.running.is_some() && s.blocks == 1,
                    Op::MergeStats(m) => m.running.is_some(),
                    Op::NormalizeStats(n) => n.running.is_some(),
                    _ => false,
                });
                assert_eq!(moving, !asked, "{shape:?}: {ops:#?}");
                let stats = ops
                    .iter()
                    .filter_map(|o| match o {
                        Op::GroupStats(s) => Some(s.blocks),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                assert_eq!(stats, blocks, "{shape:?}: {ops:#?}");
            }
        }
    }

    #[test]
    fn training_convolutions_store_nchw_and_the_mask_reads_it_transposed() {
        let g = Graph::new();
        let x = g.input("x", [2, 3, 8, 8]);
        let w = g.param("w", [4, 3, 3, 3]);
        let b = g.param("b", [4]);
        let y = g
            .conv2d_fused(x, w, Some(b), Conv2dOpts::default(), true)
            .unwrap();
        let loss = g
            .sum_all(g.max_pool2d(y, (2, 2), (2, 2), (0, 0)).unwrap())
            .unwrap();
        let grads = g.grad(loss, &[w, b]).unwrap();
        let (nodes, order) = lowered_fully(&g, &grads);
        let nchw = order
            .iter()
            .filter(|id| matches!(nodes[id.0].op, Op::ImplicitGemm(c) if c.nchw))
            .count();
        assert_eq!(nchw, 1, "the forward product stores NCHW");
        // no permute kernel is left: the relu mask reads the NCHW result through a folded read,
        // which after a max pooling its backward does itself, storing the GEMM layout
        let permutes = order
            .iter()
            .filter(|id| matches!(nodes[id.0].op, Op::Permute(_)))
            .count();
        assert_eq!(permutes, 0);
        assert!(order.iter().any(|id| matches!(
            &nodes[id.0].op,
            Op::MaxPoolReluBackward(p) if p.cn
        )));
        // without the pooling: a fused kernel reads the NCHW result transposed
        let loss = g.sum_all(g.mul_scalar(y, 2.0).unwrap()).unwrap();
        let grads = g.grad(loss, &[w, b]).unwrap();
        let (nodes, order) = lowered_fully(&g, &grads);
        assert!(order.iter().any(|id| matches!(
            &nodes[id.0].op,
            Op::Fused(f) if !f.permuted.is_empty()
        )));
    }

    #[test]
    fn casts_of_operands_fold_into_f16_products() {
        use crate::ops::matmul::Bias;
        use crate::tensor::DType;
        let g = Graph::new();
        let x = g.input_as("x", [4, 6], DType::F16);
        let w = g.param("w", [3, 2, 1, 3]);
        let b = g.param("b", [3]);
        // a reshape of a cast weight (as a convolution's), a cast bias that relu reads too
        let w16 = g.reshape(g.cast(w, DType::F16).unwrap(), &[3, 6]).unwrap();
        let b16 = g.cast(b, DType::F16).unwrap();
        let y = g
            .matmul_fused(x, w16, false, true, Some((b16, Bias::Cols)), false)
            .unwrap();
        let also = g.relu(b16).unwrap();
        let mut nodes = g.nodes();
        let mut order = reachable(&nodes, &[y, also]);
        fold_operand_casts(&mut nodes, &mut order, &[y, also]);
        let ins = nodes[y.0].inputs.clone();
        assert_eq!(ins[0], x, "x is f16 already");
        // the weight: a new f32 view of w itself
        assert!(matches!(nodes[ins[1].0].op, Op::Reshape));
        assert_eq!(nodes[ins[1].0].inputs, vec![w]);
        assert_eq!(nodes[ins[1].0].dtype, DType::F32);
        assert_eq!(ins[2], b, "the bias read in f32");
        // the weight's cast and its f16 view are gone; the bias's cast stays for relu
        let casts_of_w = order
            .iter()
            .filter(|id| matches!(nodes[id.0].op, Op::Cast(_)) && nodes[id.0].inputs == [w])
            .count();
        assert_eq!(casts_of_w, 0);
        assert!(!order.contains(&w16));
        assert!(order.contains(&b16));
    }

    #[test]
    fn casts_of_constants_and_of_norm_inputs_fold() {
        use crate::tensor::{DType, Tensor};
        let g = Graph::new();
        let x = g.input_as("x", [2, 3], DType::F16);
        let zeros = g.constant(Tensor::full([2, 3], 0.1));
        let z16 = g.cast(zeros, DType::F16).unwrap();
        let y = g.add(x, z16).unwrap();
        // a norm over an f16 tensor widened to f32 first
        let norm = g.sum_squares(&[g.cast(y, DType::F32).unwrap()]).unwrap();
        let mut nodes = g.nodes();
        let mut order = reachable(&nodes, &[y, norm]);
        fold_constant_casts(&mut nodes, &mut order, &[y, norm]);
        fold_operand_casts(&mut nodes, &mut order, &[y, norm]);
        // the constant's cast is an f16 constant, rounded; the f32 constant is gone
        match &nodes[z16.0].op {
            Op::Const { value } => assert_eq!(value.data()[0], DType::F16.round(0.1)),
            other => panic!("{}", other.name()),
        }
        assert_eq!(nodes[z16.0].dtype, DType::F16);
        assert!(!order.contains(&zeros));
        // the sum of squares reads y (f16) itself; the widening cast is dropped
        let partials = order
            .iter()
            .find(|id| matches!(nodes[id.0].op, Op::SumSquares(_)))
            .copied()
            .expect("the partial sums");
        assert_eq!(nodes[partials.0].inputs, vec![y]);
        assert!(!order.iter().any(|id| matches!(nodes[id.0].op, Op::Cast(_))));
    }

    #[test]
    fn a_micro_batchs_accumulations_become_one_group() {
        use crate::ops::optim::AccumulateGroup;
        let g = Graph::new();
        let mut accs = Vec::new();
        for k in 0..5 {
            let acc = g.param(&format!("acc{k}"), [k + 1]);
            let grad = g.input(&format!("g{k}"), [k + 1]);
            // the last one scaled otherwise: a bucket of its own
            let scale = if k == 4 { 0.25 } else { 0.5 };
            accs.push(g.accumulate(acc, grad, false, scale).unwrap());
        }
        let nodes0 = g.nodes();
        let order0 = reachable(&nodes0, &accs);
        let (mut nodes, mut order) = (nodes0.clone(), order0.clone());
        group_accumulations(&mut nodes, &mut order, &[], 64);
        let host = accs[3];
        let Op::AccumulateGroup(a) = nodes[host.0].op else {
            panic!("the last member hosts the group: {:?}", nodes[host.0].op);
        };
        assert_eq!(
            a,
            AccumulateGroup {
                members: 4,
                first: false,
                scale: 0.5
            }
        );
        for m in &accs[..3] {
            assert!(!order.contains(m), "members leave the plan");
        }
        assert!(matches!(nodes[accs[4].0].op, Op::Accumulate(_)));
        // [grads.., accumulators..]
        assert_eq!(nodes[host.0].inputs[2], nodes0[accs[2].0].inputs[0]);
        assert_eq!(nodes[host.0].inputs[4 + 2], nodes0[accs[2].0].inputs[1]);
        // its value: the last accumulator, which it writes in place
        assert_eq!(
            nodes[host.0]
                .op
                .view_of(&[], &nodes[host.0].shape, DType::F32),
            Some(7)
        );
        // 6 bindings: three per kernel; the fourth alone
        let (mut nodes, mut order) = (nodes0.clone(), order0.clone());
        group_accumulations(&mut nodes, &mut order, &[], 6);
        assert!(matches!(
            nodes[accs[2].0].op,
            Op::AccumulateGroup(AccumulateGroup { members: 3, .. })
        ));
        assert!(matches!(nodes[accs[3].0].op, Op::Accumulate(_)));
        // one read back stays alone
        let (mut nodes, mut order) = (nodes0.clone(), order0);
        group_accumulations(&mut nodes, &mut order, &[accs[1]], 64);
        assert!(matches!(
            nodes[accs[3].0].op,
            Op::AccumulateGroup(AccumulateGroup { members: 3, .. })
        ));
        assert!(matches!(nodes[accs[1].0].op, Op::Accumulate(_)));
        // read after the group (a cycle's last micro-batch: the updates read the sums), the
        // members become views of their accumulators just after it; one read before the
        // group's place stays alone
        let early = g.neg(accs[0]).unwrap();
        let late: Vec<NodeId> = accs[..4].iter().map(|&a| g.neg(a).unwrap()).collect();
        let mut wanted = late.clone();
        wanted.push(early);
        let nodes0 = g.nodes();
        let mut order = reachable(&nodes0, &wanted);
        // `early` right after its accumulation, before the others
        order.retain(|&id| id != early);
        let p = order.iter().position(|&id| id == accs[0]).unwrap();
        order.insert(p + 1, early);
        let mut nodes = nodes0.clone();
        group_accumulations(&mut nodes, &mut order, &[], 64);
        assert!(matches!(nodes[accs[0].0].op, Op::Accumulate(_)));
        assert!(matches!(
            nodes[accs[3].0].op,
            Op::AccumulateGroup(AccumulateGroup { members: 3, .. })
        ));
        let q = order.iter().position(|&id| id == accs[3]).unwrap();
        for (k, &m) in accs[1..3].iter().enumerate() {
            assert!(matches!(nodes[m.0].op, Op::Reshape));
            assert_eq!(nodes[m.0].inputs, nodes0[m.0].inputs[1..]);
            assert_eq!(order[q + 1 + k], m, "the views follow the group");
        }
    }

    #[test]
    fn a_steps_updates_become_one_group() {
        use crate::ops::optim::OptimGroup;
        let g = Graph::new();
        let (hyper, scale) = (g.input("h", [16]), g.input("s", [1]));
        let other_hyper = g.input("h2", [16]);
        let mut updates = Vec::new();
        for k in 0..5 {
            let p = g.param(&format!("p{k}"), [k + 1]);
            let grad = g.input(&format!("g{k}"), [k + 1]);
            let h = if k == 4 { other_hyper } else { hyper };
            updates.push(
                g.optim_step(OptimKind::Sgd, h, scale, grad, p, &[])
                    .unwrap(),
            );
        }
        let nodes0 = g.nodes();
        let order0 = reachable(&nodes0, &updates);
        // plenty of bindings: p0..p3 share hyper and scale, p4 does not
        let (mut nodes, mut order) = (nodes0.clone(), order0.clone());
        group_optimizer_updates(&mut nodes, &mut order, &[], 64);
        let group = updates[3];
        let Op::OptimGroup(o) = nodes[group.0].op.clone() else {
            panic!("the last member hosts the group: {:?}", nodes[group.0].op);
        };
        assert_eq!(o, OptimGroup::new(OptimKind::Sgd, 4));
        for u in &updates[..3] {
            assert!(!order.contains(u), "members leave the plan");
        }
        assert!(order.contains(&updates[4]) && matches!(nodes[updates[4].0].op, Op::OptimStep(_)));
        // [hyper, scale, grads.., params..]
        assert_eq!(nodes[group.0].inputs.len(), 2 + 4 * 2);
        assert_eq!(
            nodes[group.0].inputs[o.param(2)],
            nodes0[updates[2].0].inputs[3]
        );
        // 8 bindings: three SGD members per kernel
        let (mut nodes, mut order) = (nodes0.clone(), order0.clone());
        group_optimizer_updates(&mut nodes, &mut order, &[], 8);
        assert!(matches!(
            nodes[updates[2].0].op,
            Op::OptimGroup(OptimGroup { members: 3, .. })
        ));
        assert!(
            matches!(nodes[updates[3].0].op, Op::OptimStep(_)),
            "a group of one stays"
        );
        // an update read back stays alone
        let (mut nodes, mut order) = (nodes0.clone(), order0.clone());
        group_optimizer_updates(&mut nodes, &mut order, &[updates[3]], 64);
        assert!(matches!(
            nodes[updates[2].0].op,
            Op::OptimGroup(OptimGroup { members: 3, .. })
        ));
        assert!(matches!(nodes[updates[3].0].op, Op::OptimStep(_)));
    }

    #[test]
    fn products_read_the_image_instead_of_im2col() {
        let g = Graph::new();
        let x = g.param("x", [1, 1, 4, 4]);
        let cols = g.im2col(x, (3, 3), Conv2dOpts::default()).unwrap();
        let w = g.input("w", [2, 9]);
        let y = g.matmul(w, cols).unwrap();
        let (nodes, order) = lowered(&g, &[y]);
        assert!(!order.contains(&cols));
        assert!(matches!(nodes[y.0].op, Op::ImplicitGemm(_)));
        assert_eq!(nodes[y.0].inputs, vec![w, x]);
        // a requested column matrix stays
        let (nodes, order) = lowered(&g, &[y, cols]);
        assert!(order.contains(&cols));
        assert!(matches!(nodes[y.0].op, Op::MatMul(_)));
    }

    #[test]
    fn no_image_read_moves_past_an_in_place_update() {
        let g = Graph::new();
        let x = g.param("x", [1, 1, 4, 4]);
        let cols = g.im2col(x, (3, 3), Conv2dOpts::default()).unwrap();
        let (hyper, scale) = (g.input("h", [16]), g.input("s", [1]));
        let grad = g.input("g", [1, 1, 4, 4]);
        let step = g
            .optim_step(OptimKind::Sgd, hyper, scale, grad, x, &[])
            .unwrap();
        let w = g.input("w", [2, 9]);
        let y = g.matmul(w, cols).unwrap();
        // the product would read x after the update wrote it: the columns stay
        let (nodes, order) = lowered(&g, &[y, step]);
        assert!(order.contains(&cols));
        assert!(matches!(nodes[y.0].op, Op::MatMul(_)));
    }
}
