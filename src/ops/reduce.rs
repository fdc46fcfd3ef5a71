//! Reductions over one axis: sum, mean, max, min (as `torch.sum/mean/amax/amin(x, dim,
//! keepdim)`), and the index of the maximum or minimum (`torch.argmax/argmin`: the first one on
//! ties, as an f32 whole number). Kernel: `shaders/reduce.wgsl`.

use super::KernelSpec;
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// How values along the axis combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
    /// The index of the maximum along the axis (the first on ties), as f32; no gradient.
    ArgMax,
    /// The index of the minimum along the axis (the first on ties), as f32; no gradient.
    ArgMin,
}

impl ReduceKind {
    /// Whether the result is an index (no gradient flows through it).
    pub fn is_index(&self) -> bool {
        matches!(self, ReduceKind::ArgMax | ReduceKind::ArgMin)
    }
}

/// A reduction of `axis` (already resolved to be non-negative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reduce {
    pub kind: ReduceKind,
    pub axis: usize,
    pub keepdim: bool,
}

/// `(outer, len, inner)`: the shape viewed as three axes around `axis`.
pub fn split_at_axis(s: &Shape, axis: usize) -> (usize, usize, usize) {
    let d = s.dims();
    (
        d[..axis].iter().product(),
        d[axis],
        d[axis + 1..].iter().product(),
    )
}

impl Reduce {
    /// Name in errors and reports.
    pub fn name(&self) -> &'static str {
        match self.kind {
            ReduceKind::Sum => "sum",
            ReduceKind::Mean => "mean",
            ReduceKind::Max => "max",
            ReduceKind::Min => "min",
            ReduceKind::ArgMax => "argmax",
            ReduceKind::ArgMin => "argmin",
        }
    }

    /// Shape rule: the axis is dropped, or kept with extent 1.
    pub fn infer(&self, a: &Shape) -> Result<Shape> {
        let mut d = a.dims().to_vec();
        if self.keepdim {
            d[self.axis] = 1;
        } else {
            d.remove(self.axis);
        }
        Ok(Shape(d))
    }

    /// CPU reference, accumulating in f64.
    pub fn cpu(&self, a: &Tensor, out: &Shape) -> Tensor {
        let (outer, len, inner) = split_at_axis(a.shape(), self.axis);
        let mut data = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let vals = (0..len).map(|j| a.data()[(o * len + j) * inner + i] as f64);
                // the first index whose value beats every earlier one
                let arg = |better: fn(f64, f64) -> bool| {
                    let mut best = (0, f64::NAN);
                    for (j, v) in vals.clone().enumerate() {
                        if j == 0 || better(v, best.1) {
                            best = (j, v);
                        }
                    }
                    best.0 as f64
                };
                let r = match self.kind {
                    ReduceKind::Sum => vals.sum(),
                    ReduceKind::Mean => vals.sum::<f64>() / len as f64,
                    ReduceKind::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                    ReduceKind::Min => vals.fold(f64::INFINITY, f64::min),
                    ReduceKind::ArgMax => arg(|v, b| v > b),
                    ReduceKind::ArgMin => arg(|v, b| v < b),
                };
                data.push(r as f32);
            }
        }
        Tensor::new(out.clone(), data).expect("reduced shape")
    }

    /// Kernel: one workgroup per output value; or, when the reduced values are far apart in
    /// memory (a large inner extent, as when summing over a batch axis), one thread per output
    /// so that neighbouring threads read neighbouring addresses.
    pub fn kernel(&self, a: &Shape) -> KernelSpec {
        let (outer, len, inner) = split_at_axis(a, self.axis);
        let op = match self.kind {
            ReduceKind::Sum => 0,
            ReduceKind::Mean => 1,
            ReduceKind::Max | ReduceKind::ArgMax => 2,
            ReduceKind::Min | ReduceKind::ArgMin => 3,
        };
        let columns = inner >= 64;
        let entry = match (self.kind.is_index(), columns) {
            (false, false) => "main",
            (false, true) => "columns",
            (true, false) => "arg_main",
            (true, true) => "arg_columns",
        };
        KernelSpec {
            family: "reduce",
            entry,
            constants: vec![
                ("LEN", len as f64),
                ("INNER", inner as f64),
                ("ROWS", (outer * inner) as f64),
                ("OP", op as f64),
            ],
            workgroups: if columns {
                super::groups(outer * inner, 64)
            } else {
                (outer * inner) as u64
            },
        }
    }

    /// Backward: sum spreads `dy` over the axis, mean spreads `dy / len`, max (min) sends `dy`
    /// to the maxima (minima; split evenly between ties, as `torch.amax`); an index has no
    /// gradient (`None`).
    pub fn backward(&self, g: &Graph, x: NodeId, y: NodeId, dy: NodeId) -> Result<Option<NodeId>> {
        if self.kind.is_index() {
            return Ok(None);
        }
        let xs = g.shape(x);
        let mut keep: Vec<isize> = xs.dims().iter().map(|&d| d as isize).collect();
        keep[self.axis] = 1;
        let dy_keep = g.reshape(dy, &keep)?;
        match self.kind {
            ReduceKind::Sum => g.expand(dy_keep, &xs),
            ReduceKind::Mean => g.div_scalar(g.expand(dy_keep, &xs)?, xs.dims()[self.axis] as f32),
            ReduceKind::Max | ReduceKind::Min => {
                let y_keep = g.reshape(y, &keep)?;
                let mask = g.binary(super::binary::BinaryOp::Equal, x, y_keep)?;
                let count = g.sum(mask, self.axis as isize, true)?;
                g.mul(dy_keep, g.div(mask, count)?)
            }
            ReduceKind::ArgMax | ReduceKind::ArgMin => unreachable!("returned above"),
        }
        .map(Some)
    }
}

/// A reduction whose input is a fused elementwise program's result, computed inside the
/// reduction's loads (made by the plan compiler: `sum(x * x)` reads `x` once), and whose result
/// may go through another program before it is stored (`epilogue`: the scale of gradient
/// clipping from the sum of squares). Inputs: the program's (one, `x`, for a program without
/// steps), then the epilogue's others.
#[derive(Debug, Clone, PartialEq)]
pub struct ReducePrologue {
    pub reduce: Reduce,
    pub program: super::fused::Fused,
    /// The reduction's input: the program's result, or a reshape of it (same element order).
    pub input_shape: Shape,
    pub epilogue: Option<ReduceEpilogue>,
}

/// A fused elementwise program applied to a reduction's result (`exec::fuse::
/// fuse_reduce_epilogue`): its input `reduced` is that result, of the program's own shape; the
/// others are the node's inputs after the prologue's `prologue_inputs`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReduceEpilogue {
    pub program: super::fused::Fused,
    pub reduced: usize,
    pub prologue_inputs: usize,
}

impl ReducePrologue {
    /// The shape the program computes (the input's, for a program without steps).
    pub fn program_shape(&self) -> &Shape {
        self.program
            .steps
            .last()
            .map_or(&self.input_shape, |s| &s.shape)
    }

    /// CPU reference: the program, then the reduction, then the epilogue.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let np = self
            .epilogue
            .as_ref()
            .map_or(inputs.len(), |e| e.prologue_inputs);
        let x = match self.program.steps.is_empty() {
            true => inputs[0].clone(),
            false => self.program.cpu(&inputs[..np], self.program_shape()),
        };
        let x = Tensor::new(self.input_shape.clone(), x.data().to_vec()).expect("a reshape");
        let reduced = self.reduce.cpu(&x, out);
        match &self.epilogue {
            None => reduced,
            Some(e) => {
                let mut ins: Vec<&Tensor> = inputs[np..].to_vec();
                ins.insert(e.reduced, &reduced);
                e.program.cpu(&ins, out)
            }
        }
    }
}

/// Elements per workgroup (and per partial sum) of [`SumSquares`].
pub const SUM_SQUARES_CHUNK: usize = 4096;

/// Tensors per [`SumSquares`] node: WebGPU guarantees 8 storage buffers per kernel, and the
/// partial sums take one.
pub const SUM_SQUARES_MEMBERS: usize = 7;

/// Partial sums of squares of several tensors in one kernel: `x_0 .. x_{k-1}` (any shapes, f32
/// or f16) -> `(total)`: from `offset`, `W = sum_j ceil(n_j / SUM_SQUARES_CHUNK)` entries, one
/// per chunk of each tensor in order, the sum of its elements' squares. More than
/// [`SUM_SQUARES_MEMBERS`] tensors take a chain of nodes writing one buffer: the first writes
/// its sums from 0 and zeros after them, each next one (`chained`: the previous node is its
/// last input, written in place) its own from its offset, so that one reduction adds them all
/// up (`Graph::sum_squares`: the squared global norm of gradient clipping) instead of a copy
/// per part to concatenate them. Kernel: generated per member sizes by `codegen::reduce_group`
/// (WGSL cannot index bindings at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SumSquares {
    pub offset: usize,
    pub total: usize,
    pub chained: bool,
}

impl SumSquares {
    /// Partial sums of members of these shapes: `ceil(n / SUM_SQUARES_CHUNK)` each.
    pub fn partials(xs: &[Shape]) -> usize {
        xs.iter()
            .map(|s| s.numel().div_ceil(SUM_SQUARES_CHUNK))
            .sum()
    }

    /// Shape rule: 1 to [`SUM_SQUARES_MEMBERS`] members whose sums fit from `offset` into
    /// `(total)`.
    pub fn infer(&self, xs: &[Shape]) -> Result<Shape> {
        let err = |why: String| Err(crate::error::shape_err("sum_squares", why));
        if xs.is_empty() || xs.len() > SUM_SQUARES_MEMBERS {
            return err(format!(
                "{} tensors: expected 1 to {SUM_SQUARES_MEMBERS} per node",
                xs.len()
            ));
        }
        let end = self.offset + Self::partials(xs);
        if end > self.total {
            return err(format!("sums up to {end} past the buffer's {}", self.total));
        }
        Ok(Shape(vec![self.total]))
    }

    /// Tensors summed (the inputs but the chain's previous node).
    pub fn members(&self, n_inputs: usize) -> usize {
        n_inputs - self.chained as usize
    }

    /// Backward: member j's gradient is `2 x_j` times the gradient of each of its chunks'
    /// sums, repeated over the chunk (expand, then cut to the member's length); the chain's
    /// previous node gets `dy` as it is (its entries here were zeros, constants it ignores).
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        let mut start = self.offset;
        let mut grads = Vec::new();
        for &xj in &x[..self.members(x.len())] {
            let s = g.shape(xj);
            let (n, chunks) = (s.numel(), s.numel().div_ceil(SUM_SQUARES_CHUNK));
            if n == 0 {
                grads.push(None);
                continue;
            }
            let d = g.reshape(g.narrow(dy, 0, start, chunks)?, &[chunks as isize, 1])?;
            let d = g.expand(d, &Shape(vec![chunks, SUM_SQUARES_CHUNK]))?;
            let d = g.narrow(g.reshape(d, &[-1])?, 0, 0, n)?;
            let dims: Vec<isize> = s.dims().iter().map(|&v| v as isize).collect();
            grads.push(Some(g.mul(g.mul_scalar(xj, 2.0)?, g.reshape(d, &dims)?)?));
            start += chunks;
        }
        if self.chained {
            grads.push(Some(dy));
        }
        Ok(grads)
    }

    /// CPU reference: each chunk's sum in f64, written from `offset` into zeros (or into a
    /// copy of the chain's previous node).
    pub fn cpu(&self, xs: &[&Tensor], out: &Shape) -> Tensor {
        let members = self.members(xs.len());
        let mut data = match self.chained {
            true => xs[members].data().to_vec(),
            false => vec![0f32; out.numel()],
        };
        let sums = xs[..members].iter().flat_map(|x| {
            x.data()
                .chunks(SUM_SQUARES_CHUNK)
                .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32)
        });
        for (d, s) in data[self.offset..].iter_mut().zip(sums) {
            *d = s;
        }
        Tensor::new(out.clone(), data).expect("one sum per chunk")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Op;

    /// The partial sums' gradient reaches each member's elements through its own chunk: with a
    /// different weight per partial sum, d(sum_w weight_w * partial_w) / dx = 2 x weight_chunk.
    #[test]
    fn sum_squares_gradient_follows_the_chunks() {
        let g = Graph::new();
        let sizes = [3usize, 4097, 10];
        let xs: Vec<NodeId> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| g.input(&format!("x{j}"), [n]))
            .collect();
        let partials = g
            .push_op(
                Op::SumSquares(SumSquares {
                    offset: 0,
                    total: 4,
                    chained: false,
                }),
                xs.clone(),
                Shape(vec![4]),
            )
            .unwrap();
        // partial sums: x0 (1 chunk), x1 (2 chunks), x2 (1 chunk)
        let weights = Tensor::new([4], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let loss = g
            .sum_all(g.mul(partials, g.constant(weights)).unwrap())
            .unwrap();
        let grads = g.grad(loss, &xs).unwrap();
        let vals: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(j, &n)| Tensor::rand_uniform([n], -1.0, 1.0, j as u64))
            .collect();
        let names: Vec<String> = (0..3).map(|j| format!("x{j}")).collect();
        let feeds: Vec<(&str, &Tensor)> = names.iter().map(|s| s.as_str()).zip(&vals).collect();
        let out = crate::Device::cpu()
            .compile(&g, &grads)
            .unwrap()
            .run(&feeds)
            .unwrap();
        let weight_of = |j: usize, i: usize| match j {
            0 => 1.0,
            1 if i < SUM_SQUARES_CHUNK => 2.0,
            1 => 3.0,
            _ => 4.0,
        };
        for (j, (got, x)) in out.iter().zip(&vals).enumerate() {
            for (i, (&d, &v)) in got.data().iter().zip(x.data()).enumerate() {
                let want = 2.0 * v * weight_of(j, i);
                assert!((d - want).abs() <= 1e-6, "x{j}[{i}]: {d} != {want}");
            }
        }
    }
}
