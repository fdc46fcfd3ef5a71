//! A fused chain of elementwise ops: a small SSA program of unary and (broadcasting) binary steps
//! over the chain's external inputs, made by the plan compiler (`exec::fuse`) so that the chain
//! runs as one generated kernel (`codegen::elementwise`) instead of one kernel per op, without
//! writing its intermediates to memory. Fusion happens after autodiff: a fused node has no
//! gradient rule.

use super::binary::BinaryOp;
use super::unary::UnaryOp;
use crate::tensor::{DType, Shape, Tensor};

/// The op of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// Operands `x` and the `[1]` seed; the step's element index keys the mask, so the fuser
    /// takes it only at the program's own shape.
    Dropout(super::dropout::Dropout),
}

impl StepOp {
    /// The op's name, as the unfused node would report it.
    pub fn name(&self) -> &'static str {
        match self {
            StepOp::Unary(u) => u.name(),
            StepOp::Binary(b) => b.name(),
            StepOp::Dropout(_) => "dropout",
        }
    }

    /// Operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            StepOp::Unary(_) => 1,
            StepOp::Binary(_) | StepOp::Dropout(_) => 2,
        }
    }
}

/// Where a step's operand comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// The fused node's input `k` (its `k`-th binding).
    Input(usize),
    /// The value of an earlier step.
    Step(usize),
}

/// One step: `op` applied to `args`, giving a tensor of `shape` (the shape of the node it
/// replaces; it broadcasts to the fused node's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub op: StepOp,
    pub args: Vec<Operand>,
    pub shape: Shape,
}

/// An input read through a transpose folded into the kernel: the node bound is the permute's
/// input (`in_dims`, contiguous), and the program sees `permute(input, perm)` reshaped to
/// `shape` (same element count), as the graph's permute and reshapes computed it.
#[derive(Debug, Clone, PartialEq)]
pub struct PermutedRead {
    pub input: usize,
    pub in_dims: Vec<usize>,
    pub perm: Vec<usize>,
    pub shape: Shape,
}

impl PermutedRead {
    /// Extents of the permuted tensor: `in_dims[perm[j]]`.
    pub fn out_dims(&self) -> Vec<usize> {
        self.perm.iter().map(|&p| self.in_dims[p]).collect()
    }

    /// Element stride in the input of each permuted axis.
    pub fn strides(&self) -> Vec<usize> {
        let mut inner = vec![1usize; self.in_dims.len()];
        for a in (0..self.in_dims.len().saturating_sub(1)).rev() {
            inner[a] = inner[a + 1] * self.in_dims[a + 1];
        }
        self.perm.iter().map(|&p| inner[p]).collect()
    }

    /// The input's element read for element `i` of the program's view.
    pub fn source(&self, i: usize) -> usize {
        let (dims, strides) = (self.out_dims(), self.strides());
        let mut r = i;
        let mut at = 0;
        for j in (0..dims.len()).rev() {
            at += (r % dims[j]) * strides[j];
            r /= dims[j];
        }
        at
    }
}

/// An input read through an embedding lookup folded into the kernel
/// (`exec::fuse::fold_embeddings`): the node bound as input `input` is the table `(rows,
/// width)`, input `indices` its indices (whole numbers stored as f32, read by no step), and
/// the program sees `embedding(indices, table)` of `shape` (`(indices.., width)`) as the
/// graph's op computed it ([`super::embedding::Embedding`]: a row of NaN for an index that is
/// not an integer in `[0, rows)`).
#[derive(Debug, Clone, PartialEq)]
pub struct GatheredRead {
    pub input: usize,
    pub indices: usize,
    pub rows: usize,
    pub width: usize,
    pub shape: Shape,
}

/// A fused elementwise program; its value is the last step's.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// In evaluation order; operands refer only to inputs and earlier steps.
    pub steps: Vec<Step>,
    /// Inputs read through a folded transpose (the others are read as they are).
    pub permuted: Vec<PermutedRead>,
    /// Inputs read through a folded embedding lookup.
    pub gathered: Vec<GatheredRead>,
    /// Inputs read through a folded cast to f16 (`exec::fuse::fold_casts`): stored as f32 in a
    /// kernel whose other values are f16, each rounded to f16 on load (the value the cast
    /// stores), so that mixed precision's f32 parameters need no cast kernel.
    pub rounded: Vec<usize>,
}

impl Fused {
    /// The program without steps: its value is its input 0 (a copy, a cast, a transpose read).
    pub fn identity() -> Fused {
        Fused {
            steps: Vec::new(),
            permuted: Vec::new(),
            gathered: Vec::new(),
            rounded: Vec::new(),
        }
    }

    /// What was fused, in evaluation order: `mul,add,relu` (`copy` without steps).
    pub fn describe(&self) -> String {
        if self.steps.is_empty() {
            return "copy".to_string();
        }
        self.steps
            .iter()
            .map(|s| s.op.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether a step drops elements (the kernel then needs the dropout hash).
    pub fn has_dropout(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.op, StepOp::Dropout(_)))
    }

    /// The storage type of input `k` in a kernel storing the others as `dtype`: f32 for
    /// dropout seeds, gathered reads' indices (always f32, also in f16 graphs) and inputs read
    /// through a folded cast, else `dtype`.
    pub fn input_dtype(&self, k: usize, dtype: DType) -> DType {
        if self.always_f32(k) || self.rounds(k) {
            DType::F32
        } else {
            dtype
        }
    }

    /// Whether input `k` is a dropout seed or a gathered read's indices: f32 whatever the
    /// program's values are stored as.
    pub fn always_f32(&self, k: usize) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.op, StepOp::Dropout(_)) && s.args[1] == Operand::Input(k))
            || self.gathered.iter().any(|g| g.indices == k)
    }

    /// Whether input `k` is stored as f32 and rounded to f16 on load (a folded cast).
    pub fn rounds(&self, k: usize) -> bool {
        self.rounded.contains(&k)
    }

    /// How input `k` is read, if through a folded embedding lookup.
    pub fn gathered_read(&self, k: usize) -> Option<&GatheredRead> {
        self.gathered.iter().find(|g| g.input == k)
    }

    /// Whether input `k` is only a gathered read's indices (no step reads it as a value).
    pub fn only_indices(&self, k: usize) -> bool {
        self.gathered.iter().any(|g| g.indices == k)
            && !self
                .steps
                .iter()
                .any(|s| s.args.contains(&Operand::Input(k)))
    }

    /// How input `k` is read, if through a folded transpose.
    pub fn permuted_read(&self, k: usize) -> Option<&PermutedRead> {
        self.permuted.iter().find(|p| p.input == k)
    }

    /// CPU reference: the steps one by one with the unfused ops' own twins, at each step's own
    /// shape, so that the result is exactly the unfused graph's. An operand with as many
    /// elements as its step but another shape was read through a reshape: it is taken at the
    /// step's shape, as the graph's reshape gave it.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        // folded transposes first, as the graph's permute computed them
        let views: Vec<Tensor> = self
            .permuted
            .iter()
            .map(|p| {
                let src = inputs[p.input].data();
                let data = (0..p.shape.numel()).map(|i| src[p.source(i)]).collect();
                Tensor::new(p.shape.clone(), data).expect("a permuted view")
            })
            .collect();
        // and folded lookups, as the graph's embedding computed them
        let lookups: Vec<Tensor> = self
            .gathered
            .iter()
            .map(|g| {
                super::embedding::Embedding::default().cpu(
                    inputs[g.indices],
                    inputs[g.input],
                    &g.shape,
                )
            })
            .collect();
        let inputs: Vec<&Tensor> = (0..inputs.len())
            .map(|k| {
                match (
                    self.permuted.iter().position(|p| p.input == k),
                    self.gathered.iter().position(|g| g.input == k),
                ) {
                    (Some(j), _) => &views[j],
                    (None, Some(j)) => &lookups[j],
                    (None, None) => inputs[k],
                }
            })
            .collect();
        // and folded casts, as the graph's cast to f16 stored them
        let rounded: Vec<Tensor> = self
            .rounded
            .iter()
            .map(|&k| inputs[k].clone().rounded(DType::F16))
            .collect();
        let inputs: Vec<&Tensor> = (0..inputs.len())
            .map(|k| match self.rounded.iter().position(|&r| r == k) {
                Some(j) => &rounded[j],
                None => inputs[k],
            })
            .collect();
        if self.steps.is_empty() {
            // a copy (a cast, a transpose): input 0 as the node's shape
            let data = inputs[0].data().to_vec();
            return Tensor::new(out.clone(), data).expect("a copy keeps the element count");
        }
        let mut values: Vec<Tensor> = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            let v = {
                let args: Vec<std::borrow::Cow<Tensor>> = s
                    .args
                    .iter()
                    .map(|a| {
                        let t = match *a {
                            Operand::Input(i) => inputs[i],
                            Operand::Step(j) => &values[j],
                        };
                        if t.shape() != &s.shape && t.numel() == s.shape.numel() {
                            let data = t.data().to_vec();
                            std::borrow::Cow::Owned(
                                Tensor::new(s.shape.clone(), data).expect("same element count"),
                            )
                        } else if t.numel() < s.shape.numel() && !matches!(s.op, StepOp::Binary(_))
                        {
                            // a broadcast input (a folded expand) of a unary step or a dropout
                            // (keyed by the element index): at the step's shape first; binary
                            // steps broadcast themselves
                            std::borrow::Cow::Owned(super::layout::Expand.cpu(t, &s.shape))
                        } else {
                            std::borrow::Cow::Borrowed(t)
                        }
                    })
                    .collect();
                match s.op {
                    StepOp::Unary(u) => u.cpu(&args[0]),
                    StepOp::Binary(b) => b.cpu(&args[0], &args[1], &s.shape),
                    StepOp::Dropout(d) => d.cpu(&args[0], &args[1]),
                }
            };
            values.push(v);
        }
        let last = values.pop().expect("a fused program has steps");
        debug_assert_eq!(last.shape(), out, "the last step computes the fused node");
        last
    }
}
