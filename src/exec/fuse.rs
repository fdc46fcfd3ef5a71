//! Elementwise fusion, a lowering pass run before buffers are planned: a chain (a tree, really) of
//! unary and binary nodes becomes one `Op::Fused` node computed by one generated kernel
//! (`codegen::elementwise`), so its intermediates are neither written nor read back.
//!
//! A group grows from its root (the last node, which keeps its id and shape: it still computes the
//! same tensor) towards its inputs. An input node joins the group when it is elementwise, read by
//! no node of the plan but members of the group (once or more, by one member or several: a
//! group is a DAG, each value computed once, as `a` in Huber's `m (a - 0.5 m)`, `m = min(a, d)`),
//! not a plan target (output or effect), and not a view's root (a view reading it would be a
//! consumer outside the group). A reshape of
//! the root's element count is the same elements in the same order, so the group reads through
//! it when it is the node's only reader (the reshape leaves the plan with the node; a linear
//! layer's gradient on (B, L, E) is a reshape of a `[B*L, E]` product); other views are not fused
//! through. Interior nodes leave `order`; the root's inputs become the group's external inputs,
//! each once.
//!
//! After the groups: transposes ([`fold_permutes`]), embedding lookups ([`fold_embeddings`]),
//! broadcasts ([`fold_expands`]) and casts of f32 values to f16 ([`fold_casts`]) only a group
//! reads are read by its kernel, a transpose runs the group it alone reads
//! ([`programs_into_permutes`]), reductions and products take groups as prologues and
//! epilogues, and a cast of a group's result is stored by its kernel ([`fuse_casts`]).

use crate::codegen::elementwise::MAX_INPUTS;
use crate::graph::{Node, NodeId};
use crate::ops::fused::{Fused, GatheredRead, Operand, PermutedRead, Step, StepOp};
use crate::ops::reduce::ReducePrologue;
use crate::ops::Op;
use crate::tensor::DType;

use super::liveness::storage_root;
use super::lower::readers;

/// Steps a fused kernel holds at most, to keep generated modules small.
const MAX_STEPS: usize = 64;

/// The node's op as a fusable step, or `None`.
fn step_op(n: &Node) -> Option<StepOp> {
    if n.shape.numel() == 0 {
        return None;
    }
    match n.op {
        // a non-finite scalar has no WGSL literal; such a node runs on its own
        Op::Unary(u) if u.scalars().iter().all(|s| s.is_finite()) => Some(StepOp::Unary(u)),
        Op::Binary(b) => Some(StepOp::Binary(b)),
        // its seed is read as f32 in kernels storing f16 (`Fused::input_dtype`)
        Op::Dropout(d) => Some(StepOp::Dropout(d)),
        _ => None,
    }
}

/// The elementwise program a node computes: its own if fused, a one-step program for a fusable
/// unary or binary node, else `None`.
pub(crate) fn program_of(n: &Node) -> Option<Fused> {
    match (&n.op, step_op(n)) {
        (Op::Fused(f), _) => Some(f.clone()),
        (_, Some(op)) => Some(Fused {
            steps: vec![Step {
                op,
                args: (0..n.inputs.len()).map(Operand::Input).collect(),
                shape: n.shape.clone(),
            }],
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        }),
        _ => None,
    }
}

/// Fuses the elementwise groups among `order`; `targets` (outputs and effects) keep their
/// values. Groups of one node stay as they are.
pub(crate) fn fuse_elementwise(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    const NONE: usize = usize::MAX;
    let mut pos = vec![NONE; nodes.len()];
    for (p, id) in order.iter().enumerate() {
        pos[id.0] = p;
    }
    // consumers among the plan's nodes, each listed once however often it reads the node
    let mut consumers: Vec<Vec<NodeId>> = vec![Vec::new(); nodes.len()];
    for &id in order.iter() {
        let ins = &nodes[id.0].inputs;
        for (k, i) in ins.iter().enumerate() {
            if !ins[..k].contains(i) {
                consumers[i.0].push(id);
            }
        }
    }
    let mut target = vec![false; nodes.len()];
    for t in targets {
        target[t.0] = true;
    }
    // in-place writes (optimizer updates): (plan step, storage written). A fused kernel reads its
    // inputs at the root's step, later than the interior nodes did, so no such write may fall
    // between an interior node and the root on storage the node reads.
    let mut writes: Vec<(usize, NodeId)> = Vec::new();
    for (p, id) in order.iter().enumerate() {
        let n = &nodes[id.0];
        let (rw_from, _) = n.op.binding_mode(n.inputs.len());
        for &i in &n.inputs[rw_from..] {
            writes.push((p, storage_root(nodes, i)));
        }
    }

    let mut done = vec![false; nodes.len()];
    let mut removed = vec![false; nodes.len()];
    for &root in order.iter().rev() {
        if done[root.0] || step_op(&nodes[root.0]).is_none() {
            continue;
        }
        done[root.0] = true;
        let root_pos = pos[root.0];
        let numel = nodes[root.0].shape.numel();
        let mut members = vec![root];
        // reshapes read through, each with the member it reshapes
        let mut aliases: Vec<(NodeId, NodeId)> = Vec::new();
        let mut frontier = vec![root];
        while let Some(m) = frontier.pop() {
            for &input in &nodes[m.0].inputs {
                // a chain of full-size reshapes, each read by nothing else, and the node under it
                let mut chain = Vec::new();
                let mut c = input;
                while matches!(nodes[c.0].op, Op::Reshape)
                    && nodes[c.0].shape.numel() == numel
                    && consumers[c.0].len() == 1
                    && !target[c.0]
                    && pos[c.0] != NONE
                {
                    chain.push(c);
                    c = nodes[c.0].inputs[0];
                }
                let joins = !members.contains(&c)
                    && !done[c.0]
                    && pos[c.0] != NONE
                    && !target[c.0]
                    // every reader a member (one read through reshapes: that one alone); a
                    // node read by a member not yet joined is seen again when that one joins
                    && match chain.is_empty() {
                        true => consumers[c.0].iter().all(|r| members.contains(r)),
                        false => consumers[c.0].len() == 1,
                    }
                    && members.len() < MAX_STEPS
                    && step_op(&nodes[c.0]).is_some()
                    // one storage type per program (an f32 chain computing an f16 graph's
                    // dropout seed stays apart)
                    && nodes[c.0].dtype == nodes[root.0].dtype
                    // dropout's mask is keyed by its own element index: the root's (the same
                    // when the counts agree: broadcasting and reshapes keep the order)
                    && (!matches!(nodes[c.0].op, Op::Dropout(_))
                        || nodes[c.0].shape.numel() == numel)
                    && !nodes[c.0].inputs.iter().any(|&i| {
                        let r = storage_root(nodes, i);
                        writes
                            .iter()
                            .any(|&(p, w)| w == r && p > pos[c.0] && p < root_pos)
                    });
                if !joins {
                    continue;
                }
                members.push(c);
                let before = aliases.len();
                aliases.extend(chain.iter().map(|&r| (r, c)));
                if externals(nodes, &members, &aliases).len() > MAX_INPUTS {
                    members.pop();
                    aliases.truncate(before);
                    continue;
                }
                done[c.0] = true;
                frontier.push(c);
            }
        }
        if members.len() < 2 {
            continue;
        }
        members.sort_by_key(|m| pos[m.0]);
        let inputs = externals(nodes, &members, &aliases);
        let steps = members
            .iter()
            .map(|m| {
                let n = &nodes[m.0];
                let args = n
                    .inputs
                    .iter()
                    .map(
                        |i| match members.iter().position(|x| *x == resolve(&aliases, *i)) {
                            Some(j) => Operand::Step(j),
                            None => Operand::Input(
                                inputs.iter().position(|x| x == i).expect("an external"),
                            ),
                        },
                    )
                    .collect();
                Step {
                    op: step_op(n).expect("members are elementwise"),
                    args,
                    shape: n.shape.clone(),
                }
            })
            .collect();
        for m in &members[..members.len() - 1] {
            removed[m.0] = true;
        }
        for (r, _) in &aliases {
            removed[r.0] = true;
        }
        let n = &mut nodes[root.0];
        n.op = Op::Fused(Fused {
            steps,
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        });
        n.inputs = inputs;
    }
    order.retain(|id| !removed[id.0]);
}

/// Folds transposes into elementwise kernels: where an elementwise node (fused or single) reads
/// `reshape*(permute(x))` of its own element count and nothing else reads the permute or those
/// reshapes, the kernel reads `x` through the permutation (`PermutedRead`) and the permute's copy
/// leaves the plan. (A convolution's backward turns NCHW gradients into its column layout this
/// way before the relu mask.)
pub(crate) fn fold_permutes(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    fold_reads(nodes, order, targets, |nodes, node, _, k, e, v| {
        let Op::Permute(p) = &nodes[v.0].op else {
            return None;
        };
        if nodes[e.0].shape.numel() != node.shape.numel() {
            return None;
        }
        let src = nodes[v.0].inputs[0];
        Some(Fold::Permuted(PermutedRead {
            input: k,
            in_dims: nodes[src.0].shape.dims().to_vec(),
            perm: p.perm.clone(),
            shape: nodes[e.0].shape.clone(),
        }))
    });
}

/// Transposes run the elementwise program they alone read: where a permute's input is an
/// elementwise node (fused or single, every step and input at its shape) or a cast that nothing
/// else reads, the permute's kernel computes the program, reading its inputs through the
/// permutation, and the producer's kernel and its pass over memory go. (A mixed-precision
/// LSTM's `cast(w_hh)^T`, read by its recurrence, is one kernel.)
pub(crate) fn programs_into_permutes(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let Op::Permute(perm) = &nodes[id.0].op else {
            continue;
        };
        let p = nodes[id.0].inputs[0];
        let pn = &nodes[p.0];
        let program = match &pn.op {
            Op::Cast(_) => Some(Fused::identity()),
            _ => program_of(pn),
        };
        let Some(mut program) = program else {
            continue;
        };
        let p_pos = order.iter().position(|&o| o == p).unwrap_or(pos);
        let plain = program.permuted.is_empty()
            && program.gathered.is_empty()
            && program.rounded.is_empty()
            && !program.has_dropout()
            && program.steps.iter().all(|s| s.shape == pn.shape)
            && pn.inputs.iter().all(|&x| nodes[x.0].shape == pn.shape);
        if !plain
            || targets.contains(&p)
            || readers(nodes, order, p) != 1
            || pn
                .inputs
                .iter()
                .any(|&x| super::lower::written_between(nodes, order, x, p_pos, pos))
        {
            continue;
        }
        let shape = nodes[id.0].shape.clone();
        for s in &mut program.steps {
            s.shape = shape.clone();
        }
        program.permuted = (0..pn.inputs.len())
            .map(|k| PermutedRead {
                input: k,
                in_dims: pn.shape.dims().to_vec(),
                perm: perm.perm.clone(),
                shape: shape.clone(),
            })
            .collect();
        let inputs = pn.inputs.clone();
        let node = &mut nodes[id.0];
        node.op = Op::Fused(program);
        node.inputs = inputs;
        dropped.push(p);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Elementwise kernels of f16 values read f32 tensors that a cast only rounds for them: where an
/// input of such a node is `cast(x, f16)` of an f32 `x` that nothing else reads, the kernel
/// reads `x` and rounds each element on load (`Fused::rounded`: the value the cast stores) and
/// the cast leaves the plan. A mixed-precision LSTM's biases added to its input projection (in
/// the product's epilogue) are read as the f32 parameters they are.
pub(crate) fn fold_casts(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    fold_reads(nodes, order, targets, |nodes, _, program, k, e, v| {
        let Op::Cast(c) = nodes[v.0].op else {
            return None;
        };
        let x = nodes[v.0].inputs[0];
        (e == v
            && c.to == DType::F16
            && nodes[x.0].dtype == DType::F32
            && program.gathered_read(k).is_none()
            && !program.always_f32(k))
        .then_some(Fold::Rounded)
    });
}

/// Elementwise kernels broadcast what an `expand` only copies for them: where an input of an
/// elementwise node (fused or single) is `expand(x)` at the node's own shape, or
/// `reshape*(expand(x))` of a single-element `x`, and nothing else reads the expand or those
/// reshapes, the kernel reads `x` with stride 0 along the broadcast axes and the expand's copy
/// leaves the plan (the backward of a mean or sum: an MSE loss's gradient, a global average
/// pooling's). After the other fusions: products and reductions take no such program.
pub(crate) fn fold_expands(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    fold_reads(nodes, order, targets, |nodes, node, program, k, e, v| {
        if !matches!(nodes[v.0].op, Op::Expand(_))
            || program.permuted_read(k).is_some()
            || program.gathered_read(k).is_some()
            || program.always_f32(k)
        {
            return None;
        }
        // read at the node's shape with the expand's broadcast, or a single value
        let src = nodes[v.0].inputs[0];
        let whole = nodes[e.0].shape.numel() == node.shape.numel();
        (whole && ((e == v && nodes[v.0].shape == node.shape) || nodes[src.0].shape.numel() == 1))
            .then_some(Fold::Plain)
    });
}

/// How an elementwise kernel reads the input under a node [`fold_reads`] folds.
enum Fold {
    /// As it is (with the broadcast its shape gives).
    Plain,
    /// Through a transpose.
    Permuted(PermutedRead),
    /// Rounded to f16 on load.
    Rounded,
}

/// The common part of [`fold_permutes`], [`fold_expands`] and [`fold_casts`]: for each input
/// `k` of an elementwise node that the node reads once, `e` = `reshape*(v)`,
/// `pick(nodes, node, program, k, e, v)` says whether the kernel reads `v`'s input instead
/// (`Some`, with how it reads it). The reshapes and `v` must be read by this node alone, and
/// nothing may write that input in place in between; they leave the plan.
fn fold_reads(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
    pick: impl Fn(&[Node], &Node, &Fused, usize, NodeId, NodeId) -> Option<Fold>,
) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let n = &nodes[id.0];
        let Some(mut program) = program_of(n) else {
            continue;
        };
        let readers = |x: NodeId| {
            order
                .iter()
                .filter(|r| !dropped.contains(r) && nodes[r.0].inputs.contains(&x))
                .count()
        };
        let mut folds = Vec::new();
        for (k, &e) in n.inputs.iter().enumerate() {
            if n.inputs.iter().filter(|&&i| i == e).count() != 1 {
                continue;
            }
            let (mut chain, v) = super::lower::under_reshapes(nodes, e);
            let Some(read) = pick(nodes, n, &program, k, e, v) else {
                continue;
            };
            chain.push(v);
            let src = nodes[v.0].inputs[0];
            let v_pos = order.iter().position(|&o| o == v).unwrap_or(pos);
            if chain
                .iter()
                .any(|&c| targets.contains(&c) || readers(c) != 1)
                || super::lower::written_between(nodes, order, src, v_pos, pos)
            {
                continue;
            }
            folds.push((k, read, src, chain));
        }
        if folds.is_empty() {
            continue;
        }
        let mut inputs = n.inputs.clone();
        for (k, read, src, chain) in folds {
            match read {
                Fold::Plain => {}
                Fold::Permuted(p) => program.permuted.push(p),
                Fold::Rounded => program.rounded.push(k),
            }
            inputs[k] = src;
            dropped.extend(chain);
        }
        let node = &mut nodes[id.0];
        node.op = Op::Fused(program);
        node.inputs = inputs;
    }
    order.retain(|id| !dropped.contains(id));
}

/// Elementwise kernels do embedding lookups themselves: where an input of an elementwise node
/// (fused or single) is an `embedding` that nothing else reads, the kernel reads the table row
/// its index names (`GatheredRead`; the indices become an input of their own) and the lookup
/// leaves the plan. A transformer's `tok[ids] + pos[positions]` is one kernel instead of three
/// (with [`fuse_casts`], also its cast to f16 activations).
pub(crate) fn fold_embeddings(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let n = &nodes[id.0];
        let Some(mut program) = program_of(n) else {
            continue;
        };
        let readers = |x: NodeId| {
            order
                .iter()
                .filter(|r| !dropped.contains(r) && nodes[r.0].inputs.contains(&x))
                .count()
        };
        let mut inputs = n.inputs.clone();
        let mut folded = Vec::new();
        for (k, &e) in n.inputs.iter().enumerate() {
            if !matches!(nodes[e.0].op, Op::Embedding(_))
                || n.inputs.iter().filter(|&&i| i == e).count() != 1
                || targets.contains(&e)
                || readers(e) != 1
                || inputs.len() >= MAX_INPUTS
                || program.permuted_read(k).is_some()
                || program.always_f32(k)
            {
                continue;
            }
            let (indices, table) = (nodes[e.0].inputs[0], nodes[e.0].inputs[1]);
            let dims = nodes[table.0].shape.dims();
            let e_pos = order.iter().position(|&o| o == e).unwrap_or(pos);
            if dims[0] == 0
                || [indices, table]
                    .iter()
                    .any(|&t| super::lower::written_between(nodes, order, t, e_pos, pos))
            {
                continue;
            }
            program.gathered.push(GatheredRead {
                input: k,
                indices: inputs.len(),
                rows: dims[0],
                width: dims[1],
                shape: nodes[e.0].shape.clone(),
            });
            inputs[k] = table;
            inputs.push(indices);
            folded.push(e);
        }
        if folded.is_empty() {
            continue;
        }
        dropped.extend(folded);
        let node = &mut nodes[id.0];
        node.op = Op::Fused(program);
        node.inputs = inputs;
    }
    order.retain(|id| !dropped.contains(id));
}

/// A cast of an elementwise node's result (fused or single) that nothing else reads is done by
/// that node's kernel, which then stores its result in the cast's type: the casts of mixed
/// precision between f32 sums and f16 activations cost no kernel of their own. (The program
/// computes in f32 either way; the fused node's inputs keep their type.)
pub(crate) fn fuse_casts(nodes: &mut [Node], order: &mut Vec<NodeId>, targets: &[NodeId]) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let c = order[pos];
        let Op::Cast(_) = nodes[c.0].op else {
            continue;
        };
        let p = nodes[c.0].inputs[0];
        let Some(program) = program_of(&nodes[p.0]) else {
            continue;
        };
        let p_pos = order.iter().position(|&o| o == p).unwrap_or(pos);
        if targets.contains(&p)
            || readers(nodes, order, p) != 1
            || nodes[p.0]
                .inputs
                .iter()
                .any(|&x| super::lower::written_between(nodes, order, x, p_pos, pos))
        {
            continue;
        }
        let inputs = nodes[p.0].inputs.clone();
        let node = &mut nodes[c.0];
        node.op = Op::Fused(program);
        node.inputs = inputs;
        dropped.push(p);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Reductions take their input's elementwise program as a prologue: where a reduction's input is
/// an elementwise node (fused or single) that nothing else reads, the reduction computes that
/// program inside its loads (`ReducePrologue`) and the node leaves the plan (`sum(x * x)` of
/// gradient clipping, the squared error of an MSE loss).
pub(crate) fn fuse_reduce_prologue(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let Op::Reduce(reduce) = nodes[id.0].op else {
            continue;
        };
        // the reduced tensor, or the node under a reshape of it (same element order)
        let input = nodes[id.0].inputs[0];
        let (chain, x) = super::lower::under_reshapes(nodes, input);
        let xn = &nodes[x.0];
        let Some(program) = program_of(xn) else {
            continue;
        };
        let readers = |v: NodeId| readers(nodes, order, v);
        let sole = readers(x) == 1
            && chain
                .iter()
                .all(|&c| readers(c) == 1 && !targets.contains(&c));
        let x_pos = order.iter().position(|&o| o == x).unwrap_or(pos);
        // the program's inputs are now read at the reduction's step
        let moved = xn
            .inputs
            .iter()
            .any(|&i| super::lower::written_between(nodes, order, i, x_pos, pos));
        if !sole || targets.contains(&x) || moved || xn.inputs.len() > MAX_INPUTS {
            continue;
        }
        let inputs = xn.inputs.clone();
        let input_shape = nodes[input.0].shape.clone();
        let node = &mut nodes[id.0];
        node.op = Op::ReducePrologue(ReducePrologue {
            reduce,
            program,
            input_shape,
            epilogue: None,
        });
        node.inputs = inputs;
        dropped.push(x);
        dropped.extend(chain);
    }
    order.retain(|id| !dropped.contains(id));
}

/// Reductions store their reader's elementwise program of their result: where the only reader
/// of a reduction's result (plain, or with a prologue) is an elementwise node (fused or single)
/// of the same shape, the reduction's kernel applies that program before its store
/// (`ReduceEpilogue`) and the node leaves the plan (gradient clipping's
/// `min(1, max_norm / (sqrt(sum) + eps))`; a masked mean's division by its count after the sum
/// of `x * mask`). f32 only.
pub(crate) fn fuse_reduce_epilogue(
    nodes: &mut [Node],
    order: &mut Vec<NodeId>,
    targets: &[NodeId],
) {
    use crate::ops::reduce::ReduceEpilogue;
    use crate::tensor::DType;
    let mut dropped: Vec<NodeId> = Vec::new();
    for pos in 0..order.len() {
        let id = order[pos];
        let n = &nodes[id.0];
        let Some(program) = program_of(n) else {
            continue;
        };
        let reductions: Vec<usize> = (0..n.inputs.len())
            .filter(|&k| match &nodes[n.inputs[k].0].op {
                Op::Reduce(_) => true,
                Op::ReducePrologue(p) => p.epilogue.is_none(),
                _ => false,
            })
            .collect();
        let Some(&k) = reductions.first() else {
            continue;
        };
        let r = n.inputs[k];
        // the reduction and its prologue (an identity program for a plain one)
        let (reduce, prologue, input_shape) = match &nodes[r.0].op {
            Op::Reduce(reduce) => (*reduce, Fused::identity(), None),
            Op::ReducePrologue(p) if p.epilogue.is_none() => {
                (p.reduce, p.program.clone(), Some(p.input_shape.clone()))
            }
            _ => continue,
        };
        let xs = nodes[r.0].inputs.clone();
        let r_pos = order.iter().position(|&o| o == r).unwrap_or(pos);
        let read_once = order
            .iter()
            .map(|o| nodes[o.0].inputs.iter().filter(|&&i| i == r).count())
            .sum::<usize>()
            == 1;
        let f32_only = xs.iter().all(|x| nodes[x.0].dtype == DType::F32)
            && n.dtype == DType::F32
            && n.inputs.iter().all(|i| nodes[i.0].dtype == DType::F32);
        // the prologue's inputs, the epilogue's others: one binding each, and the output
        if targets.contains(&r)
            || !read_once
            || nodes[r.0].shape != n.shape
            || !f32_only
            || program.permuted_read(k).is_some()
            || program.gathered_read(k).is_some()
            || xs.len() + n.inputs.len() - 1 > MAX_INPUTS
            || xs
                .iter()
                .any(|&x| super::lower::written_between(nodes, order, x, r_pos, pos))
        {
            continue;
        }
        let mut inputs = xs.clone();
        inputs.extend((0..n.inputs.len()).filter(|&j| j != k).map(|j| n.inputs[j]));
        let input_shape = input_shape.unwrap_or_else(|| nodes[xs[0].0].shape.clone());
        let node = &mut nodes[id.0];
        node.op = Op::ReducePrologue(ReducePrologue {
            reduce,
            program: prologue,
            input_shape,
            epilogue: Some(ReduceEpilogue {
                program,
                reduced: k,
                prologue_inputs: xs.len(),
            }),
        });
        node.inputs = inputs;
        dropped.push(r);
    }
    order.retain(|id| !dropped.contains(id));
}

/// The member a reshape read through stands for (`aliases`), or `i` itself.
fn resolve(aliases: &[(NodeId, NodeId)], i: NodeId) -> NodeId {
    aliases
        .iter()
        .find(|(r, _)| *r == i)
        .map_or(i, |&(_, member)| member)
}

/// The inputs of `members` that are neither members nor reshapes of members read through
/// (`aliases`), each once, in order of first use.
fn externals(nodes: &[Node], members: &[NodeId], aliases: &[(NodeId, NodeId)]) -> Vec<NodeId> {
    let mut ext = Vec::new();
    for m in members {
        for &i in &nodes[m.0].inputs {
            if !members.contains(&resolve(aliases, i)) && !ext.contains(&i) {
                ext.push(i);
            }
        }
    }
    ext
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::liveness::reachable;
    use crate::graph::Graph;
    use crate::ops::binary::BinaryOp;

    /// The plan's nodes and order for `targets` after fusion.
    fn fused(g: &Graph, targets: &[NodeId]) -> (Vec<Node>, Vec<NodeId>) {
        let mut nodes = g.nodes();
        let mut order = reachable(&nodes, targets);
        fuse_elementwise(&mut nodes, &mut order, targets);
        (nodes, order)
    }

    #[test]
    fn a_chain_becomes_one_node_with_each_input_once() {
        let g = Graph::new();
        let x = g.input("x", [4, 3]);
        let b = g.input("b", [3]);
        let h = g.mul(x, x).unwrap();
        let h = g.add(h, b).unwrap();
        let y = g.relu(g.sub(h, x).unwrap()).unwrap();
        let (nodes, order) = fused(&g, &[y]);
        assert_eq!(order, vec![x, b, y]);
        let Op::Fused(f) = &nodes[y.0].op else {
            panic!("not fused: {:?}", nodes[y.0].op)
        };
        assert_eq!(f.describe(), "mul,add,sub,relu");
        assert_eq!(nodes[y.0].inputs, vec![x, b]);
        assert_eq!(f.steps[0].args, vec![Operand::Input(0), Operand::Input(0)]);
        assert_eq!(f.steps[2].args, vec![Operand::Step(1), Operand::Input(0)]);
        assert_eq!(f.steps[3].args, vec![Operand::Step(2)]);
        assert_eq!(f.steps[1].op, StepOp::Binary(BinaryOp::Add));
        assert_eq!(nodes[y.0].shape.dims(), &[4, 3]);
    }

    #[test]
    fn targets_and_outside_readers_end_groups() {
        let g = Graph::new();
        let x = g.input("x", [5]);
        let m = g.exp(g.neg(x).unwrap()).unwrap();
        let y = g.sqrt(g.abs(m).unwrap()).unwrap();
        // m requested: two groups, m's and y's
        let (nodes, order) = fused(&g, &[y, m]);
        assert_eq!(order, vec![x, m, y]);
        assert_eq!(nodes[y.0].inputs, vec![m]);
        // m read twice inside one group: a DAG, m computed once in it
        let z = g.add(y, m).unwrap();
        let (nodes, order) = fused(&g, &[z]);
        assert_eq!(order, vec![x, z]);
        assert_eq!(nodes[z.0].inputs, vec![x]);
        let Op::Fused(f) = &nodes[z.0].op else {
            panic!("not fused")
        };
        assert_eq!(f.describe(), "neg,exp,abs,sqrt,add");
        assert_eq!(f.steps[4].args, vec![Operand::Step(3), Operand::Step(1)]);
        // m read by a group and by a node outside it (a product): m's group ends at m
        let w = g.input("w", [5, 5]);
        let p = g.matmul(g.reshape(m, &[1, 5]).unwrap(), w).unwrap();
        let (nodes, order) = fused(&g, &[z, p]);
        assert!(order.contains(&m), "{order:?}");
        assert_eq!(nodes[z.0].inputs, vec![m]);
        // a node alone stays itself
        let (nodes, order) = fused(&g, &[x, g.neg(x).unwrap()]);
        assert_eq!(order.len(), 2);
        assert!(matches!(nodes[order[1].0].op, Op::Unary(_)));
    }

    #[test]
    fn full_size_reshapes_are_fused_through_other_views_and_ops_not() {
        let g = Graph::new();
        let x = g.input("x", [2, 3]);
        let e = g.exp(x).unwrap();
        let r = g.reshape(g.reshape(e, &[3, 2]).unwrap(), &[6]).unwrap();
        let n = g.neg(r).unwrap();
        let s = g.sum(n, 0, false).unwrap();
        let y = g.relu(g.mul_scalar(s, 2.0).unwrap()).unwrap();
        let (nodes, order) = fused(&g, &[y]);
        // fused(exp, neg) through both reshapes, sum, fused(mul_scalar, relu)
        assert_eq!(order, vec![x, n, s, y]);
        let Op::Fused(f) = &nodes[n.0].op else {
            panic!("not fused: {:?}", nodes[n.0].op)
        };
        assert_eq!(f.describe(), "exp,neg");
        assert_eq!(nodes[n.0].inputs, vec![x]);
        assert_eq!(f.steps[1].args, vec![Operand::Step(0)]);
        assert_eq!(nodes[y.0].inputs, vec![s]);

        // a reshape to fewer elements than the group's (a broadcast operand) stays a view, as
        // does one with a second reader
        let g = Graph::new();
        let b = g.input("b", [3]);
        let x = g.input("x", [2, 3]);
        let row = g.reshape(g.exp(b).unwrap(), &[1, 3]).unwrap();
        let y = g.add(row, x).unwrap();
        let (nodes, order) = fused(&g, &[y]);
        assert_eq!(order.len(), 5);
        assert_eq!(nodes[y.0].inputs, vec![row, x]);
        let g = Graph::new();
        let x = g.input("x", [2, 3]);
        let r = g.reshape(g.exp(x).unwrap(), &[6]).unwrap();
        let y = g.mul(g.neg(r).unwrap(), r).unwrap();
        let (nodes, order) = fused(&g, &[y]);
        assert_eq!(order.len(), 4, "x, exp, its reshape, fused(neg, mul)");
        assert_eq!(nodes[y.0].inputs, vec![r]);
    }

    /// The fused node's CPU twin takes operands read through reshapes at its steps' shapes: the
    /// lowered plan evaluates to the graph's values.
    #[test]
    fn fused_through_reshapes_evaluates_as_the_graph() {
        use crate::tensor::Tensor;
        let g = Graph::new();
        let x = g.input("x", [2, 6]);
        let y = g.input("y", [3, 4]);
        let s = g.input("s", [1]);
        let h = g.reshape(g.tanh(x).unwrap(), &[4, 3]).unwrap();
        let h = g.dropout(h, 0.5, s, 3).unwrap();
        let z = g.sub(g.reshape(h, &[3, 4]).unwrap(), y).unwrap();
        let z = g.exp(z).unwrap();
        let feed = |id: NodeId, _: &Node| -> crate::Result<Tensor> {
            Ok(if id == x {
                Tensor::new([2, 6], (0..12).map(|i| i as f32 * 0.3 - 1.0).collect())?
            } else if id == y {
                Tensor::new([3, 4], (0..12).map(|i| i as f32 * -0.1).collect())?
            } else {
                Tensor::new([1], vec![5.0])?
            })
        };
        let nodes = g.nodes();
        let order = reachable(&nodes, &[z]);
        let want = crate::cpu::evaluate(&nodes, &order, feed, |_, _| Ok(())).unwrap();
        let (fused_nodes, fused_order) = fused(&g, &[z]);
        assert_eq!(fused_order, vec![x, y, s, z]);
        let got = crate::cpu::evaluate(&fused_nodes, &fused_order, feed, |_, _| Ok(())).unwrap();
        let (a, b) = (got[z.0].as_ref().unwrap(), want[z.0].as_ref().unwrap());
        assert_eq!(a.shape(), b.shape());
        assert_eq!(a.data(), b.data());
    }

    #[test]
    fn no_read_moves_past_an_in_place_update() {
        use crate::ops::optim::OptimKind;
        let g = Graph::new();
        let w = g.param("w", [4]);
        let hyper = g.input("hyper", [16]);
        let scale = g.input("scale", [1]);
        let grad = g.input("grad", [4]);
        let a = g.mul_scalar(w, 2.0).unwrap();
        let step = g
            .optim_step(OptimKind::Sgd, hyper, scale, grad, w, &[])
            .unwrap();
        let y = g.add_scalar(a, 1.0).unwrap();
        let (nodes, order) = fused(&g, &[y, step]);
        assert!(order.contains(&a), "a reads w before the update");
        assert!(matches!(nodes[y.0].op, Op::Unary(_)));
        // built before the update, the whole chain fuses
        let g = Graph::new();
        let w = g.param("w", [4]);
        let y = g.add_scalar(g.mul_scalar(w, 2.0).unwrap(), 1.0).unwrap();
        let (hyper, scale, grad) = (g.input("h", [16]), g.input("s", [1]), g.input("g", [4]));
        let step = g
            .optim_step(OptimKind::Sgd, hyper, scale, grad, w, &[])
            .unwrap();
        let (nodes, _) = fused(&g, &[y, step]);
        assert!(matches!(nodes[y.0].op, Op::Fused(_)));
    }

    #[test]
    fn input_count_is_bounded() {
        let g = Graph::new();
        let xs: Vec<NodeId> = (0..10).map(|k| g.input(&format!("x{k}"), [3])).collect();
        let mut h = xs[0];
        for &x in &xs[1..] {
            h = g.add(h, x).unwrap();
        }
        let (nodes, order) = fused(&g, &[h]);
        for id in &order {
            assert!(nodes[id.0].inputs.len() <= MAX_INPUTS);
        }
        // 10 inputs, and 2 kernels instead of 9
        assert_eq!(order.len(), 12);
    }
}
