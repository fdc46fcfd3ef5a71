//! A fused chain of elementwise ops: a small SSA program of unary and (broadcasting) binary steps
//! over the chain's external inputs, made by the plan compiler (`exec::fuse`) so that the chain
//! runs as one generated kernel (`codegen::elementwise`) instead of one kernel per op, without
//! writing its intermediates to memory. Fusion happens after autodiff: a fused node has no
//! gradient rule.

use super::binary::BinaryOp;
use super::unary::UnaryOp;
use crate::tensor::{Shape, Tensor};

/// The op of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOp {
    Unary(UnaryOp),
    Binary(BinaryOp),
}

impl StepOp {
    /// The op's name, as the unfused node would report it.
    pub fn name(&self) -> &'static str {
        match self {
            StepOp::Unary(u) => u.name(),
            StepOp::Binary(b) => b.name(),
        }
    }

    /// Operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            StepOp::Unary(_) => 1,
            StepOp::Binary(_) => 2,
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

/// A fused elementwise program; its value is the last step's.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    /// In evaluation order; operands refer only to inputs and earlier steps.
    pub steps: Vec<Step>,
}

impl Fused {
    /// What was fused, in evaluation order: `mul,add,relu`.
    pub fn describe(&self) -> String {
        self.steps
            .iter()
            .map(|s| s.op.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// CPU reference: the steps one by one with the unfused ops' own twins, at each step's own
    /// shape, so that the result is exactly the unfused graph's.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let mut values: Vec<Tensor> = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            let v = {
                let arg = |k: usize| match s.args[k] {
                    Operand::Input(i) => inputs[i],
                    Operand::Step(j) => &values[j],
                };
                match s.op {
                    StepOp::Unary(u) => u.cpu(arg(0)),
                    StepOp::Binary(b) => b.cpu(arg(0), arg(1), &s.shape),
                }
            };
            values.push(v);
        }
        let last = values.pop().expect("a fused program has steps");
        debug_assert_eq!(last.shape(), out, "the last step computes the fused node");
        last
    }
}
