//! Liveness and buffer reuse: which tensors are alive at each step of a plan, and a greedy
//! assignment of tensors to a small set of buffers ("slots") so that tensors whose lifetimes do not
//! overlap share storage. Pure functions, tested without a GPU.

use std::collections::HashMap;

use crate::graph::{Node, NodeId};

/// The nodes needed to compute `outputs`, in topological (index) order.
pub fn reachable(nodes: &[Node], outputs: &[NodeId]) -> Vec<NodeId> {
    let mut keep = vec![false; nodes.len()];
    let mut stack: Vec<NodeId> = outputs.to_vec();
    while let Some(id) = stack.pop() {
        if !keep[id.0] {
            keep[id.0] = true;
            stack.extend(nodes[id.0].inputs.iter().copied());
        }
    }
    (0..nodes.len()).filter(|&i| keep[i]).map(NodeId).collect()
}

/// The node whose storage `id` uses: itself, or for a view (reshape, in-place update) the
/// storage of the input it views.
pub fn storage_root(nodes: &[Node], mut id: NodeId) -> NodeId {
    while let Some(k) = view_of(nodes, id) {
        id = nodes[id.0].inputs[k];
    }
    id
}

/// Where `id`'s value starts in the storage of [`storage_root`], in bytes (a narrow viewing a
/// contiguous run of its input starts past its offset).
pub fn storage_offset(nodes: &[Node], mut id: NodeId) -> u64 {
    let mut bytes = 0;
    while let Some(k) = view_of(nodes, id) {
        let n = &nodes[id.0];
        bytes +=
            n.dtype
                .buffer_bytes(n.op.view_offset(&input_shapes(nodes, id), &n.shape, n.dtype));
        id = n.inputs[k];
    }
    bytes
}

/// Bytes of the storage a computed node owns: its elements and the scratch its kernel writes
/// past them ([`crate::ops::Op::scratch`]).
pub fn storage_bytes(nodes: &[Node], id: NodeId) -> u64 {
    let n = &nodes[id.0];
    let scratch = n.op.scratch(&input_shapes(nodes, id), &n.shape);
    n.dtype.buffer_bytes(n.shape.numel() + scratch)
}

/// The shapes of a node's inputs.
fn input_shapes(nodes: &[Node], id: NodeId) -> Vec<&crate::tensor::Shape> {
    nodes[id.0]
        .inputs
        .iter()
        .map(|i| &nodes[i.0].shape)
        .collect()
}

/// `Op::view_of` of a node, from its inputs' shapes.
pub fn view_of(nodes: &[Node], id: NodeId) -> Option<usize> {
    let n = &nodes[id.0];
    n.op.view_of(&input_shapes(nodes, id), &n.shape, n.dtype)
}

/// One computed tensor's lifetime in plan steps: written at `def`, last read at `last`
/// (`usize::MAX` for plan outputs, which must survive the run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub def: usize,
    pub last: usize,
    pub bytes: u64,
}

/// Lifetimes of the computed (non-source, non-view) tensors among `order`, keyed by node.
/// Views extend their root's lifetime to their own last use.
pub fn lifetimes(nodes: &[Node], order: &[NodeId], outputs: &[NodeId]) -> Vec<(NodeId, Lifetime)> {
    let step: HashMap<NodeId, usize> = order.iter().enumerate().map(|(s, &id)| (id, s)).collect();
    let mut life: HashMap<NodeId, Lifetime> = HashMap::new();
    for &id in order {
        let n = &nodes[id.0];
        if n.op.is_source() || view_of(nodes, id).is_some() {
            continue;
        }
        let s = step[&id];
        life.insert(
            id,
            Lifetime {
                def: s,
                last: s,
                bytes: storage_bytes(nodes, id),
            },
        );
    }
    for &id in order {
        let s = step[&id];
        for &inp in &nodes[id.0].inputs {
            if let Some(l) = life.get_mut(&storage_root(nodes, inp)) {
                l.last = l.last.max(s);
            }
        }
    }
    for &o in outputs {
        if let Some(l) = life.get_mut(&storage_root(nodes, o)) {
            l.last = usize::MAX;
        }
    }
    let mut v: Vec<(NodeId, Lifetime)> = life.into_iter().collect();
    v.sort_by_key(|(id, l)| (l.def, *id));
    v
}

/// Result of [`assign_slots`]: the slot of each lifetime (same order) and each slot's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub slot_of: Vec<usize>,
    pub slot_bytes: Vec<u64>,
}

/// Greedy best-fit buffer reuse. Lifetimes must be sorted by `def`. A tensor written at step `s`
/// never shares a slot with a tensor read at step `s` (a kernel's output must not alias its
/// inputs), so slots are released only after the step's output has been placed.
pub fn assign_slots(lives: &[Lifetime]) -> Assignment {
    let mut slot_of = vec![usize::MAX; lives.len()];
    let mut slot_bytes: Vec<u64> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    // tensors still holding a slot, by index into `lives`
    let mut live: Vec<usize> = Vec::new();
    for (i, l) in lives.iter().enumerate() {
        // best fit: the smallest free slot that is large enough, else grow the largest free slot
        let fit = free
            .iter()
            .enumerate()
            .filter(|(_, &s)| slot_bytes[s] >= l.bytes)
            .min_by_key(|(_, &s)| slot_bytes[s])
            .map(|(k, _)| k)
            .or_else(|| {
                free.iter()
                    .enumerate()
                    .max_by_key(|(_, &s)| slot_bytes[s])
                    .map(|(k, _)| k)
            });
        let slot = match fit {
            Some(k) => free.swap_remove(k),
            None => {
                slot_bytes.push(0);
                slot_bytes.len() - 1
            }
        };
        slot_bytes[slot] = slot_bytes[slot].max(l.bytes);
        slot_of[i] = slot;
        live.push(i);
        // release every tensor whose last reader has now run
        let step = l.def;
        let next_def = lives.get(i + 1).map(|n| n.def);
        if next_def != Some(step) {
            live.retain(|&j| {
                if lives[j].last <= step {
                    free.push(slot_of[j]);
                    false
                } else {
                    true
                }
            });
        }
    }
    Assignment {
        slot_of,
        slot_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lt(def: usize, last: usize, bytes: u64) -> Lifetime {
        Lifetime { def, last, bytes }
    }

    #[test]
    fn chain_reuses_two_buffers() {
        // a -> b -> c -> d: each tensor read only by the next step
        let lives = [
            lt(0, 1, 100),
            lt(1, 2, 100),
            lt(2, 3, 100),
            lt(3, usize::MAX, 100),
        ];
        let a = assign_slots(&lives);
        assert_eq!(a.slot_bytes.len(), 2);
        for w in a.slot_of.windows(2) {
            assert_ne!(
                w[0], w[1],
                "a kernel's output must not share its input's buffer"
            );
        }
    }

    #[test]
    fn overlapping_lifetimes_never_share() {
        let lives = [
            lt(0, 3, 10),
            lt(1, 2, 20),
            lt(2, 3, 30),
            lt(3, usize::MAX, 40),
            lt(4, usize::MAX, 8),
        ];
        let a = assign_slots(&lives);
        for i in 0..lives.len() {
            for j in 0..i {
                let overlap = lives[j].last >= lives[i].def;
                if overlap {
                    assert_ne!(a.slot_of[i], a.slot_of[j], "{i} and {j} overlap");
                }
                assert!(a.slot_bytes[a.slot_of[i]] >= lives[i].bytes);
            }
        }
    }

    #[test]
    fn grows_a_free_slot_rather_than_adding_one() {
        let lives = [lt(0, 1, 10), lt(1, 2, 10), lt(2, usize::MAX, 50)];
        let a = assign_slots(&lives);
        assert_eq!(a.slot_bytes.len(), 2);
        assert_eq!(a.slot_bytes.iter().sum::<u64>(), 60);
    }
}
