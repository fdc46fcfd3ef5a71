//! Batched matrix product with optional transposed operands and broadcast batch axes
//! (as `torch.matmul` on tensors of rank >= 2). Kernel: `shaders/matmul.wgsl`.

use super::binary::{broadcast_shapes, broadcast_strides};
use super::{groups, KernelSpec};
use crate::codegen::{self, matmul::GemmConfig, Generated};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};
use std::borrow::Cow;

/// Most batch axes the kernel addresses.
pub const MAX_BATCH_RANK: usize = 4;

/// `out = relu?(op(a) x op(b) + bias?)`, where `op` transposes the last two axes when its flag is
/// set; the optional bias (a third input) runs along the rows or the columns of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MatMul {
    pub trans_a: bool,
    pub trans_b: bool,
    pub bias: Bias,
    pub relu: bool,
    /// The kernel also writes the row sums of `op(a)` over K (`[M]`) past the result, at
    /// [`row_sums_offset`]: set by the plan compiler where a bias gradient sums the operand that
    /// the weight gradient's product reads (`exec::lower::row_sums_in_products`), so that the
    /// sum is not a kernel of its own. Unbatched products only.
    pub row_sums: bool,
    /// Operand `a` is read through inverted dropout (its seed an input after the bias): set by
    /// the plan compiler where only products read a dropout's result
    /// (`exec::lower::dropout_into_products`), so that the masked tensor is never stored.
    pub drop_a: Option<OperandDropout>,
    /// The same for operand `b` (its seed after `a`'s).
    pub drop_b: Option<OperandDropout>,
    /// Operand `a` is read in place from rows of the tensor it narrows (set by the plan
    /// compiler, `exec::lower::strided_operands`, where only products read a narrow of a last
    /// axis: an LSTM's last `h`, its gate gradients), so that the narrow is never copied.
    pub rows_a: Option<OperandRows>,
    /// The same for operand `b`.
    pub rows_b: Option<OperandRows>,
}

/// Where a product reads an operand whose contiguous axis is part of each row of a larger
/// tensor (`MatMul::rows_a`, `rows_b`): row `r` of the operand's storage starts at element
/// `offset + r * ld` of the binding (the narrowed tensor's), not at `r` times its own length.
/// With `swap = Some((p, q))` the operand's rows are those of a `(p, q, ..)` tensor with its
/// two leading axes swapped (a batch-first sequence read time-major), read in place: row `r`
/// is the binding's row `(r % p) * q + r / p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OperandRows {
    pub ld: u32,
    pub offset: u32,
    pub swap: Option<(u32, u32)>,
}

/// A dropout (`ops::dropout::Dropout`) that a product applies to an operand as it loads it,
/// keyed by the element's index in the operand's storage as the dropout kernel keys its
/// output: `p` as bits, so that products stay `Eq` and `Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OperandDropout {
    pub p_bits: u32,
    pub salt: u32,
}

impl OperandDropout {
    pub fn of(d: &super::dropout::Dropout) -> OperandDropout {
        OperandDropout {
            p_bits: d.p.to_bits(),
            salt: d.salt,
        }
    }

    pub fn dropout(&self) -> super::dropout::Dropout {
        super::dropout::Dropout {
            p: f32::from_bits(self.p_bits),
            salt: self.salt,
        }
    }

    /// `x` through the dropout under `seed`, or `x` itself without one.
    pub fn apply<'a>(
        drop: Option<OperandDropout>,
        x: &'a Tensor,
        seed: Option<&Tensor>,
    ) -> Cow<'a, Tensor> {
        match (drop, seed) {
            (Some(d), Some(s)) => Cow::Owned(d.dropout().cpu(x, s)),
            _ => Cow::Borrowed(x),
        }
    }

    /// The kernel's override constants for operand `name` (`A` or `B`).
    pub fn constants(&self, name: &str) -> [(&'static str, f64); 3] {
        let d = self.dropout();
        let pick = |a: &'static str, b: &'static str| if name == "A" { a } else { b };
        [
            (
                pick("DROP_A_THRESHOLD", "DROP_B_THRESHOLD"),
                d.threshold() as f64,
            ),
            (pick("DROP_A_SCALE", "DROP_B_SCALE"), d.scale() as f64),
            (pick("DROP_A_SALT", "DROP_B_SALT"), d.salt as f64),
        ]
    }
}

/// Where a product's row sums (`MatMul::row_sums`) start past its `[M, N]` result: the next
/// multiple of [`VIEW_ALIGN`](super::layout::VIEW_ALIGN) elements, so that they are a view at a
/// binding offset every adapter takes.
pub fn row_sums_offset(m: usize, n: usize) -> usize {
    (m * n).next_multiple_of(super::layout::VIEW_ALIGN)
}

/// Elements of a product's storage with its row sums: [`row_sums_offset`], then `M` rounded up
/// to 4 (the kernel stores them as vec4s). Also the stride of split-K's slices of such a product.
pub fn with_row_sums_len(m: usize, n: usize) -> usize {
    row_sums_offset(m, n) + m.next_multiple_of(4)
}

/// The row sums of a product's `op(a)` that its kernel writes (`MatMul::row_sums`), as a view of
/// the product's storage: a `sum` reduction of `a` made by the plan compiler. Inputs: the
/// product, then `a` (what the CPU reference reduces), then the dropout seed where the product
/// reads `a` through one (the second field, as `MatMul::drop_a`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowSums(pub super::reduce::Reduce, pub Option<OperandDropout>);

impl RowSums {
    /// Where the sums start in the product's storage (`[.., M, N]`), in elements.
    pub fn offset(&self, product: &Shape) -> usize {
        let d = product.dims();
        row_sums_offset(d[d.len() - 2], d[d.len() - 1])
    }

    /// CPU reference: the reduction of `a` (through its dropout) it replaced; `inputs` are the
    /// node's.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let a = OperandDropout::apply(self.1, inputs[1], inputs.get(2).copied());
        self.0.cpu(&a, out)
    }
}

/// Where a fused bias goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Bias {
    #[default]
    None,
    /// `[M]`: one value per row (a Conv layer's channels as `W x cols`).
    Rows,
    /// `[N]`: one value per column (a Linear layer's outputs as `x W^T`).
    Cols,
}

/// The matrix extents and batch shapes of a product.
#[derive(Debug, Clone)]
pub struct ProductDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_batch: Shape,
    pub b_batch: Shape,
    /// The output's batch shape: both operands' broadcast together.
    pub batch: Shape,
}

impl ProductDims {
    /// The batch shape left-padded to rank 4 as `BD1..BD3` (BD0 implicit) and each operand's
    /// element stride per batch axis as `SA0..SA3`, `SB0..SB3` (0 where it broadcasts).
    pub fn batch_constants(&self) -> Vec<(&'static str, f64)> {
        let (sa, sb) = MatMul::batch_strides(self);
        let pad = MAX_BATCH_RANK - self.batch.rank();
        let bd = |i: usize| {
            if i < pad {
                1
            } else {
                self.batch.dims()[i - pad]
            }
        };
        let s = |v: &Vec<usize>, i: usize| if i < pad { 0 } else { v[i - pad] };
        vec![
            ("BD1", bd(1) as f64),
            ("BD2", bd(2) as f64),
            ("BD3", bd(3) as f64),
            ("SA0", s(&sa, 0) as f64),
            ("SA1", s(&sa, 1) as f64),
            ("SA2", s(&sa, 2) as f64),
            ("SA3", s(&sa, 3) as f64),
            ("SB0", s(&sb, 0) as f64),
            ("SB1", s(&sb, 1) as f64),
            ("SB2", s(&sb, 2) as f64),
            ("SB3", s(&sb, 3) as f64),
        ]
    }
}

impl MatMul {
    pub fn dims(&self, a: &Shape, b: &Shape) -> Result<ProductDims> {
        let t = |on: bool| if on { "^T" } else { "" };
        let shapes = format!("{a}{} x {b}{}", t(self.trans_a), t(self.trans_b));
        if a.rank() < 2 || b.rank() < 2 {
            return Err(shape_err(
                "matmul",
                format!("{shapes}: both operands need rank >= 2"),
            ));
        }
        let (ra, rb) = (a.rank(), b.rank());
        let (m, ka) = if self.trans_a {
            (a.dims()[ra - 1], a.dims()[ra - 2])
        } else {
            (a.dims()[ra - 2], a.dims()[ra - 1])
        };
        let (kb, n) = if self.trans_b {
            (b.dims()[rb - 1], b.dims()[rb - 2])
        } else {
            (b.dims()[rb - 2], b.dims()[rb - 1])
        };
        if ka != kb {
            return Err(shape_err(
                "matmul",
                format!("{shapes}: inner dimensions {ka} and {kb} differ"),
            ));
        }
        let a_batch = Shape(a.dims()[..ra - 2].to_vec());
        let b_batch = Shape(b.dims()[..rb - 2].to_vec());
        let batch = broadcast_shapes("matmul", &a_batch, &b_batch).map_err(|_| {
            shape_err(
                "matmul",
                format!("{shapes}: batch axes {a_batch} and {b_batch} do not broadcast"),
            )
        })?;
        if batch.rank() > MAX_BATCH_RANK {
            return Err(shape_err(
                "matmul",
                format!(
                    "{shapes}: {} batch axes, at most {MAX_BATCH_RANK} are supported",
                    batch.rank()
                ),
            ));
        }
        Ok(ProductDims {
            m,
            n,
            k: ka,
            a_batch,
            b_batch,
            batch,
        })
    }

    /// Shape rule: `[batch.., M, K] x [batch.., K, N] -> [batch.., M, N]`, batch axes broadcast.
    pub fn infer(&self, a: &Shape, b: &Shape) -> Result<Shape> {
        let d = self.dims(a, b)?;
        let mut out = d.batch.0.clone();
        out.extend([d.m, d.n]);
        Ok(Shape(out))
    }

    /// Per-batch-axis element offsets of each operand's matrices, in the output's batch shape.
    fn batch_strides(d: &ProductDims) -> (Vec<usize>, Vec<usize>) {
        let a_mat = d.m * d.k;
        let b_mat = d.k * d.n;
        let sa = broadcast_strides(&d.a_batch, &d.batch)
            .into_iter()
            .map(|s| s * a_mat)
            .collect();
        let sb = broadcast_strides(&d.b_batch, &d.batch)
            .into_iter()
            .map(|s| s * b_mat)
            .collect();
        (sa, sb)
    }

    /// Shape rule for the fused bias: `[M]` for `Rows`, `[N]` for `Cols`.
    pub fn check_bias(&self, out: &Shape, bias: &Shape) -> Result<()> {
        let (m, n) = (out.dims()[out.rank() - 2], out.dims()[out.rank() - 1]);
        let want = match self.bias {
            Bias::None => return Ok(()),
            Bias::Rows => m,
            Bias::Cols => n,
        };
        if bias.dims() != [want] {
            return Err(shape_err(
                "matmul",
                format!("bias {bias} for a result {out}: expected [{want}]"),
            ));
        }
        Ok(())
    }

    /// Elements the kernel writes past its `slices` results of `d` (split-K partials: one
    /// region per slice): the row sums and the gap before them, where [`Self::row_sums`] is set.
    pub fn scratch(&self, d: &ProductDims, slices: usize) -> usize {
        match self.row_sums {
            true => slices * (with_row_sums_len(d.m, d.n) - d.m * d.n),
            false => 0,
        }
    }

    /// Whether the product reads an operand in a way only the generated tiled kernel's loads
    /// implement (through a dropout, or from strided rows); row sums are asserted apart.
    pub fn tiled_only(&self) -> bool {
        self.drop_a.is_some()
            || self.drop_b.is_some()
            || self.rows_a.is_some()
            || self.rows_b.is_some()
    }

    /// Inputs of the product's node: `a`, `b`, the bias if any, a seed per operand dropout.
    pub fn n_inputs(&self) -> usize {
        2 + (self.bias != Bias::None) as usize
            + self.drop_a.is_some() as usize
            + self.drop_b.is_some() as usize
    }

    /// The node's operands through their dropouts, and its bias, from its inputs (`a`, `b`, the
    /// bias, the dropouts' seeds).
    fn operands<'a>(
        &self,
        inputs: &[&'a Tensor],
    ) -> (Cow<'a, Tensor>, Cow<'a, Tensor>, Option<&'a Tensor>) {
        let mut rest = inputs[2..].iter().copied();
        let bias = (self.bias != Bias::None).then(|| rest.next()).flatten();
        let seed_a = self.drop_a.and_then(|_| rest.next());
        let seed_b = self.drop_b.and_then(|_| rest.next());
        let a = OperandDropout::apply(self.drop_a, inputs[0], seed_a);
        let b = OperandDropout::apply(self.drop_b, inputs[1], seed_b);
        (a, b, bias)
    }

    /// CPU reference of the node from its inputs (`a`, `b`, the bias, the dropouts' seeds):
    /// the operands through their dropouts, then [`Self::cpu`].
    pub fn cpu_node(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let (a, b, bias) = self.operands(inputs);
        self.cpu(&a, &b, bias, out)
    }

    /// CPU reference, accumulating in f64; then the bias and relu of the epilogue.
    pub fn cpu(&self, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, out: &Shape) -> Tensor {
        let d = self
            .dims(a.shape(), b.shape())
            .expect("shape checked at build time");
        let data = self.cpu_product(a, b, &d, 0..d.k);
        let mut t = Tensor::new(out.clone(), data).expect("matmul shape");
        // the product's own extents: `out` may be a reshape of `[batch.., M, N]` (an epilogue's)
        let (m, n) = (d.m, d.n);
        for (idx, v) in t.data_mut().iter_mut().enumerate() {
            let add = match (self.bias, bias) {
                (Bias::Rows, Some(bs)) => bs.data()[(idx / n) % m],
                (Bias::Cols, Some(bs)) => bs.data()[idx % n],
                _ => 0.0,
            };
            let y = *v + add;
            *v = if self.relu { y.max(0.0) } else { y };
        }
        t
    }

    /// The products summed over `ks` only (all of K for a plain product), `[batch.., M, N]`.
    fn cpu_product(
        &self,
        a: &Tensor,
        b: &Tensor,
        d: &ProductDims,
        ks: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let (sa, sb) = Self::batch_strides(d);
        let (m, n, k) = (d.m, d.n, d.k);
        let mut data = vec![0f32; d.batch.numel() * m * n];
        let bdims = d.batch.dims();
        let mut coord = vec![0usize; bdims.len()];
        for z in 0..d.batch.numel() {
            let abase: usize = coord.iter().zip(&sa).map(|(c, s)| c * s).sum();
            let bbase: usize = coord.iter().zip(&sb).map(|(c, s)| c * s).sum();
            let (ad, bd) = (&a.data()[abase..], &b.data()[bbase..]);
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f64;
                    for p in ks.clone() {
                        let x = if self.trans_a {
                            ad[p * m + i]
                        } else {
                            ad[i * k + p]
                        };
                        let y = if self.trans_b {
                            bd[j * k + p]
                        } else {
                            bd[p * n + j]
                        };
                        acc += x as f64 * y as f64;
                    }
                    data[z * m * n + i * n + j] = acc as f32;
                }
            }
            for ax in (0..bdims.len()).rev() {
                coord[ax] += 1;
                if coord[ax] < bdims[ax] {
                    break;
                }
                coord[ax] = 0;
            }
        }
        data
    }

    /// The portable kernel (`shaders/matmul.wgsl`): 64x64 output tiles, one workgroup each. The
    /// plan compiler prefers the generated family of `codegen::matmul` where the adapter fits it.
    pub fn kernel(&self, a: &Shape, b: &Shape, _out: &Shape) -> KernelSpec {
        let d = self.dims(a, b).expect("shape checked at build time");
        let tiles_m = groups(d.m, 64);
        let tiles_n = groups(d.n, 64);
        let total = tiles_m * tiles_n * d.batch.numel() as u64;
        let mut constants = vec![
            ("RELU", self.relu as u32 as f64),
            ("BIAS_ROWS", (self.bias == Bias::Rows) as u32 as f64),
            ("M", d.m as f64),
            ("N", d.n as f64),
            ("K", d.k as f64),
            ("TA", self.trans_a as u32 as f64),
            ("TB", self.trans_b as u32 as f64),
            ("TILES_M", tiles_m as f64),
            ("TILES_N", tiles_n as f64),
            ("TOTAL", total as f64),
        ];
        constants.extend(d.batch_constants());
        KernelSpec {
            family: "matmul",
            entry: if self.bias == Bias::None {
                "main"
            } else {
                "main_bias"
            },
            constants,
            workgroups: total,
        }
    }

    /// Backward of `Y = relu?(op(A) op(B) + bias)`: through relu with the output's sign, the
    /// bias gradient as a sum, then each operand's gradient is itself a (transposed) matmul,
    /// summed back over batch axes the operand was broadcast along.
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        y: NodeId,
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        // relu(z) > 0 exactly where z > 0, so the output decides the mask
        let dz = if self.relu {
            g.binary(super::binary::BinaryOp::ReluGrad, dy, y)?
        } else {
            dy
        };
        let plain = MatMul {
            trans_a: self.trans_a,
            trans_b: self.trans_b,
            ..Default::default()
        };
        let [da, db] = plain.product_backward(g, x[0], x[1], dz)?;
        let mut out = vec![Some(da), Some(db)];
        if self.bias != Bias::None {
            let ys = g.shape(y);
            let (m, n) = (ys.dims()[ys.rank() - 2], ys.dims()[ys.rank() - 1]);
            let dbias = match self.bias {
                Bias::Rows => g.reshape(g.sum_to(dz, &Shape(vec![m, 1]))?, &[m as isize])?,
                _ => g.sum_to(dz, &Shape(vec![n]))?,
            };
            out.push(Some(dbias));
        }
        Ok(out)
    }

    fn product_backward(&self, g: &Graph, a: NodeId, b: NodeId, dc: NodeId) -> Result<[NodeId; 2]> {
        let (da, db) = match (self.trans_a, self.trans_b) {
            (false, false) => (
                g.matmul_t(dc, b, false, true)?,
                g.matmul_t(a, dc, true, false)?,
            ),
            (false, true) => (g.matmul(dc, b)?, g.matmul_t(dc, a, true, false)?),
            (true, false) => (g.matmul_t(b, dc, false, true)?, g.matmul(a, dc)?),
            (true, true) => (
                g.matmul_t(b, dc, true, true)?,
                g.matmul_t(dc, a, true, true)?,
            ),
        };
        Ok([g.sum_to(da, &g.shape(a))?, g.sum_to(db, &g.shape(b))?])
    }
}

/// One split-K pass of a product: slice `s` of K (`config.chunk(K)` deep) summed into
/// `out[s]`, `[slices, batch.., M, N]`. Made by the plan compiler (never by graph builders) for
/// products too small to fill the GPU but deep in K; [`SplitKSum`] adds the slices up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MatMulPartial {
    /// Transposes only: the epilogue belongs to the sum.
    pub product: MatMul,
    pub config: GemmConfig,
}

impl MatMulPartial {
    /// `[slices, batch.., M, N]`.
    pub fn infer(&self, a: &Shape, b: &Shape) -> Result<Shape> {
        let d = self.product.dims(a, b)?;
        let mut out = vec![self.config.slices(d.k) as usize];
        out.extend(self.product.infer(a, b)?.dims());
        Ok(Shape(out))
    }

    /// CPU reference: each slice's sum in f64; `inputs` are `a`, `b` and the operand dropouts'
    /// seeds.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        // the product of a split has no bias: its seeds follow the operands
        let (a, b, _) = self.product.operands(inputs);
        let (a, b) = (a.as_ref(), b.as_ref());
        let d = self
            .product
            .dims(a.shape(), b.shape())
            .expect("shape checked at build time");
        let chunk = self.config.chunk(d.k);
        let mut data = Vec::with_capacity(out.numel());
        for s in 0..self.config.slices(d.k) as usize {
            let ks = (s * chunk).min(d.k)..((s + 1) * chunk).min(d.k);
            data.extend(self.product.cpu_product(a, b, &d, ks));
        }
        Tensor::new(out.clone(), data).expect("partial shape")
    }

    /// The generated GEMM in split-K mode.
    pub fn kernel(&self, a: &Shape, b: &Shape) -> Generated {
        let d = self
            .product
            .dims(a, b)
            .expect("shape checked at build time");
        codegen::matmul::kernel(&self.product, &d, &self.config)
    }
}

/// Sum of split-K partial products `[S, batch.., M, N]` over S, then the product's epilogue:
/// `relu?(sum + bias?)`. Input 1 is the bias when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SplitKSum {
    pub bias: Bias,
    pub relu: bool,
    /// The slices carry the product's row sums (`MatMul::row_sums`): each slice is
    /// [`with_row_sums_len`] long and the sum writes that much, row sums included.
    pub row_sums: bool,
}

impl SplitKSum {
    /// CPU reference: the slices summed in f64, then bias and relu.
    pub fn cpu(&self, partial: &Tensor, bias: Option<&Tensor>, out: &Shape) -> Tensor {
        let len = out.numel();
        let slices = partial.shape().dims()[0];
        let (m, n) = (out.dims()[out.rank() - 2], out.dims()[out.rank() - 1]);
        let p = partial.data();
        let data = (0..len)
            .map(|i| {
                let sum: f64 = (0..slices).map(|s| p[s * len + i] as f64).sum();
                let add = match (self.bias, bias) {
                    (Bias::Rows, Some(bs)) => bs.data()[(i / n) % m],
                    (Bias::Cols, Some(bs)) => bs.data()[i % n],
                    _ => 0.0,
                };
                let y = sum as f32 + add;
                if self.relu {
                    y.max(0.0)
                } else {
                    y
                }
            })
            .collect();
        Tensor::new(out.clone(), data).expect("sum shape")
    }

    /// Elements written past the `[M, N]` result: the row sums (and the gap before them).
    pub fn scratch(&self, out: &Shape) -> usize {
        let (m, n) = (out.dims()[out.rank() - 2], out.dims()[out.rank() - 1]);
        match self.row_sums {
            true => with_row_sums_len(m, n) - m * n,
            false => 0,
        }
    }

    /// `splitk_sum` / `splitk_sum_bias` of matmul.wgsl: one thread per output element (and per
    /// row sum).
    pub fn kernel(&self, partial: &Shape, out: &Shape) -> KernelSpec {
        let (m, n) = (out.dims()[out.rank() - 2], out.dims()[out.rank() - 1]);
        let len = out.numel() + self.scratch(out);
        KernelSpec {
            family: "matmul",
            entry: if self.bias == Bias::None {
                "splitk_sum"
            } else {
                "splitk_sum_bias"
            },
            constants: vec![
                ("RELU", self.relu as u32 as f64),
                ("BIAS_ROWS", (self.bias == Bias::Rows) as u32 as f64),
                ("M", m as f64),
                ("N", n as f64),
                ("SUM_SLICES", partial.dims()[0] as f64),
                ("SUM_LEN", len as f64),
            ],
            workgroups: groups(len, 256),
        }
    }
}

/// A product and the fused elementwise program that is its only reader, as one kernel (made by
/// the plan compiler: the product's result goes through the program in registers instead of
/// through memory). Inputs: `a`, `b`, the bias when the product has one, then the program's
/// other inputs in order; the program's input `product_input` is the product. With `keep`, a
/// last input: the product's own node (`Op::Written`), which other nodes read too (the
/// pre-activation a GELU's gradient needs), bound read_write: the kernel stores the product
/// there as well as the program's result.
#[derive(Debug, Clone, PartialEq)]
pub struct MatMulEpilogue {
    pub product: MatMul,
    pub program: super::fused::Fused,
    pub product_input: usize,
    pub keep: bool,
}

impl MatMulEpilogue {
    /// Inputs that belong to the product: `a`, `b`, the bias if any and the operand dropouts'
    /// seeds.
    pub fn product_inputs(&self) -> usize {
        self.product.n_inputs()
    }

    /// Where the program reads the product transposed as `[A, B, HW] -> [B, A, HW]` (`A` the
    /// product's rows, `B * HW` its columns: a linear layer's input gradient going back to a
    /// convolution whose output was `[C, N, HW]`, read by a relu's gradient), the kernel stores
    /// each result at its transposed place (the `HW` given) and the program runs there.
    pub fn transposed_store(&self) -> Option<usize> {
        self.program
            .permuted_read(self.product_input)
            .map(|p| p.in_dims.get(2).copied().unwrap_or(1))
    }

    /// The program's inputs but the product, among the node's: from
    /// [`Self::product_inputs`] to the kept product (where there is one).
    pub fn program_inputs(&self, n_inputs: usize) -> std::ops::Range<usize> {
        self.product_inputs()..n_inputs - self.keep as usize
    }

    /// CPU reference: the product with its own epilogue, then the program.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let np = self.product_inputs();
        let y = self.product.cpu_node(&inputs[..np], out);
        let mut args: Vec<&Tensor> = inputs[self.program_inputs(inputs.len())].to_vec();
        args.insert(self.product_input, &y);
        self.program.cpu(&args, out)
    }
}
