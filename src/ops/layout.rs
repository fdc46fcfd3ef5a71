//! Layout ops: permute/transpose and expand (one strided gather kernel, `shaders/layout.wgsl`),
//! reshape (a view: same buffer, no kernel, no copy), and their backward rules.

use super::binary::broadcast_strides;
use super::{groups, pad_left, KernelSpec, MAX_RANK};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{DType, Shape, Tensor};

/// The strided-gather CPU reference and kernel shared by permute and expand: output element at
/// coordinates `c` reads input element `sum(c[i] * strides[i])`.
fn gather_cpu(a: &Tensor, strides: &[usize], out: &Shape) -> Tensor {
    let dims = out.dims();
    let mut coord = vec![0usize; dims.len()];
    let mut data = Vec::with_capacity(out.numel());
    for _ in 0..out.numel() {
        let src: usize = coord.iter().zip(strides).map(|(c, s)| c * s).sum();
        data.push(a.data()[src]);
        for ax in (0..dims.len()).rev() {
            coord[ax] += 1;
            if coord[ax] < dims[ax] {
                break;
            }
            coord[ax] = 0;
        }
    }
    Tensor::new(out.clone(), data).expect("gathered shape")
}

fn gather_kernel(strides: &[usize], out: &Shape) -> KernelSpec {
    let (d, s) = pad_left(out.dims(), strides);
    const DN: [&str; MAX_RANK] = ["D0", "D1", "D2", "D3", "D4", "D5"];
    const SN: [&str; MAX_RANK] = ["S0", "S1", "S2", "S3", "S4", "S5"];
    let mut constants = vec![("N", out.numel() as f64)];
    for i in 0..MAX_RANK {
        if i > 0 {
            constants.push((DN[i], d[i] as f64));
        }
        constants.push((SN[i], s[i] as f64));
    }
    KernelSpec {
        family: "layout",
        entry: "gather",
        constants,
        workgroups: groups(out.numel(), 256),
    }
}

/// Reorders axes: output axis `i` is input axis `perm[i]` (as `torch.permute`). `in_place`
/// (set by the plan compiler, `exec::lower::swapped_operands`, where only products read a swap
/// of a tensor's two leading axes): a view without a kernel, bound as its input, whose readers
/// read its rows in place (`OperandRows::swap`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permute {
    pub perm: Vec<usize>,
    pub in_place: bool,
}

impl Permute {
    /// Shape rule: `perm` must be a permutation of `0..rank`.
    pub fn infer(&self, a: &Shape) -> Result<Shape> {
        let mut seen = vec![false; a.rank()];
        if self.perm.len() != a.rank() {
            return Err(shape_err(
                "permute",
                format!(
                    "{a}: permutation {:?} has {} axes, the tensor {}",
                    self.perm,
                    self.perm.len(),
                    a.rank()
                ),
            ));
        }
        for &p in &self.perm {
            if p >= a.rank() || seen[p] {
                return Err(shape_err(
                    "permute",
                    format!(
                        "{a}: {:?} is not a permutation of the axes 0..{}",
                        self.perm,
                        a.rank()
                    ),
                ));
            }
            seen[p] = true;
        }
        if a.rank() > MAX_RANK {
            return Err(shape_err(
                "permute",
                format!("{a}: rank above the supported {MAX_RANK}"),
            ));
        }
        Ok(Shape(self.perm.iter().map(|&p| a.dims()[p]).collect()))
    }

    /// The input's element stride along each output axis.
    fn gather_strides(&self, a: &Shape) -> Vec<usize> {
        let s = a.strides();
        self.perm.iter().map(|&p| s[p]).collect()
    }

    /// CPU reference.
    pub fn cpu(&self, a: &Tensor, out: &Shape) -> Tensor {
        gather_cpu(a, &self.gather_strides(a.shape()), out)
    }

    /// Kernel: one thread per output element.
    pub fn kernel(&self, a: &Shape, out: &Shape) -> KernelSpec {
        gather_kernel(&self.gather_strides(a), out)
    }

    /// Backward: the inverse permutation of the gradient.
    pub fn backward(&self, g: &Graph, dy: NodeId) -> Result<NodeId> {
        let mut inv = vec![0; self.perm.len()];
        for (i, &p) in self.perm.iter().enumerate() {
            inv[p] = i;
        }
        g.permute(dy, &inv)
    }
}

/// Broadcasts a tensor to a larger shape (as `torch.Tensor.expand`), materialising the copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Expand;

impl Expand {
    /// CPU reference.
    pub fn cpu(&self, a: &Tensor, out: &Shape) -> Tensor {
        gather_cpu(a, &broadcast_strides(a.shape(), out), out)
    }

    /// Kernel: one thread per output element, stride 0 on broadcast axes.
    pub fn kernel(&self, a: &Shape, out: &Shape) -> KernelSpec {
        gather_kernel(&broadcast_strides(a, out), out)
    }
}

/// Shape rule of reshape: the same element count; at most one extent may be `-1` (inferred).
pub fn reshape_infer(a: &Shape, target: &[isize]) -> Result<Shape> {
    let mut infer_at = None;
    let mut known = 1usize;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => infer_at = Some(i),
            d if d > 0 => known *= d as usize,
            _ => {
                return Err(shape_err(
                    "reshape",
                    format!("{a} -> {target:?}: extents must be positive, with at most one -1"),
                ))
            }
        }
    }
    let mut out: Vec<usize> = target.iter().map(|&d| d.max(1) as usize).collect();
    if let Some(i) = infer_at {
        if !a.numel().is_multiple_of(known) {
            return Err(shape_err(
                "reshape",
                format!(
                    "{a} -> {target:?}: {} elements do not divide into {known}",
                    a.numel()
                ),
            ));
        }
        out[i] = a.numel() / known;
    }
    let out = Shape(out);
    if out.numel() != a.numel() {
        return Err(shape_err(
            "reshape",
            format!(
                "{a} -> {out}: {} elements cannot become {}",
                a.numel(),
                out.numel()
            ),
        ));
    }
    Ok(out)
}

/// Element offsets a view may start at, in any element type: 128 elements are 256 bytes of f16
/// (512 of f32), and WebGPU's `minStorageBufferOffsetAlignment` is at most 256 bytes on every
/// adapter. Where kernels write past their output for a view to read (a product's row sums,
/// normalization statistics and sums), they pad to this.
pub const VIEW_ALIGN: usize = 128;

/// Bytes a view's binding offset is a multiple of: WebGPU's largest
/// `minStorageBufferOffsetAlignment`.
pub const VIEW_ALIGN_BYTES: usize = 256;

/// Element offsets a view of `dtype` elements may start at: [`VIEW_ALIGN_BYTES`] of them (64
/// f32 elements, 128 f16).
pub fn view_align(dtype: DType) -> usize {
    VIEW_ALIGN_BYTES / dtype.size()
}

/// Copies along one axis with an offset: narrow (a slice), pad (zeros around), concat (two
/// inputs). Output position `c` along `axis` reads input `a` at `c - a_start` when in range,
/// else input `b` (if any) at `c - b_start`, else 0. Kernel: `layout.wgsl`, `axis_copy1/2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AxisCopy {
    pub axis: usize,
    pub a_start: isize,
    pub b_start: Option<isize>,
    /// A narrow of the last axis that only products read, in place from the rows of its input
    /// (`MatMul::rows_a`, `rows_b`; set by `exec::lower::strided_operands`): a view without a
    /// kernel, bound as its input.
    pub strided: bool,
}

impl AxisCopy {
    /// Name in reports.
    pub fn name(&self) -> &'static str {
        match (self.b_start, self.a_start) {
            (Some(_), _) => "concat",
            (None, s) if s < 0 => "narrow",
            _ => "pad",
        }
    }

    /// Name in plan labels, which know the shapes: a copy from position 0 to something no
    /// longer than `a` is a narrow (`name` calls it a pad).
    pub fn label(&self, a: &Shape, out: &Shape) -> &'static str {
        match (self.b_start, self.a_start) {
            (None, 0) if out.dims()[self.axis] <= a.dims()[self.axis] => "narrow",
            _ => self.name(),
        }
    }

    /// Where this copy is a view: a narrow (to `out`) of an input `a` whose axes before `axis`
    /// all have extent 1 (`narrow(kv, 0, start, n)`) is a contiguous run of `a`'s memory, so the
    /// plan binds that part of `a`'s buffer instead of copying, where it starts at 0 or at a
    /// multiple of [`view_align`] elements of `dtype` (a binding offset every adapter takes).
    /// The offset in elements.
    pub fn view_offset(&self, a: &Shape, out: &Shape, dtype: DType) -> Option<usize> {
        let start = usize::try_from(-self.a_start).ok()?;
        let inner: usize = a.dims()[self.axis + 1..].iter().product();
        let offset = start * inner;
        (self.b_start.is_none()
            && start + out.dims()[self.axis] <= a.dims()[self.axis]
            && a.dims()[..self.axis].iter().all(|&d| d == 1)
            && offset.is_multiple_of(view_align(dtype)))
        .then_some(offset)
    }

    /// CPU reference.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let (outer, ax_out, inner) = super::reduce::split_at_axis(out, self.axis);
        let a = inputs[0];
        let ax_a = a.dims()[self.axis] as isize;
        let mut data = vec![0f32; out.numel()];
        for o in 0..outer {
            for c in 0..ax_out {
                for i in 0..inner {
                    let ca = c as isize - self.a_start;
                    let v = if (0..ax_a).contains(&ca) {
                        a.data()[(o * ax_a as usize + ca as usize) * inner + i]
                    } else if let (Some(bs), Some(b)) = (self.b_start, inputs.get(1)) {
                        let ax_b = b.dims()[self.axis] as isize;
                        let cb = c as isize - bs;
                        if (0..ax_b).contains(&cb) {
                            b.data()[(o * ax_b as usize + cb as usize) * inner + i]
                        } else {
                            0.0
                        }
                    } else {
                        0.0
                    };
                    data[(o * ax_out + c) * inner + i] = v;
                }
            }
        }
        Tensor::new(out.clone(), data).expect("axis copy shape")
    }

    /// Kernel: one thread per output element.
    pub fn kernel(&self, inputs: &[&Shape], out: &Shape) -> KernelSpec {
        let (_, ax_out, inner) = super::reduce::split_at_axis(out, self.axis);
        let mut constants = vec![
            ("N", out.numel() as f64),
            ("INNER", inner as f64),
            ("AX_OUT", ax_out as f64),
            ("AX_A", inputs[0].dims()[self.axis] as f64),
            ("A_START", self.a_start as f64),
        ];
        if let Some(bs) = self.b_start {
            constants.push(("AX_B", inputs[1].dims()[self.axis] as f64));
            constants.push(("B_START", bs as f64));
        }
        KernelSpec {
            family: "layout",
            entry: if self.b_start.is_some() {
                "axis_copy2"
            } else {
                "axis_copy1"
            },
            constants,
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Backward: each input's gradient is the slice of `dy` it was copied to.
    pub fn backward(&self, g: &Graph, x: &[NodeId], dy: NodeId) -> Result<Vec<Option<NodeId>>> {
        // input position p went to output p + start: its gradient reads dy there
        let mut out = vec![Some(g.narrow_raw(
            dy,
            self.axis,
            -self.a_start,
            g.shape(x[0]).dims()[self.axis],
        )?)];
        if let Some(bs) = self.b_start {
            out.push(Some(g.narrow_raw(
                dy,
                self.axis,
                -bs,
                g.shape(x[1]).dims()[self.axis],
            )?));
        }
        Ok(out)
    }
}

/// Rows of `value (*, n, W)` written in place into a cache parameter `(*, T, W)` at rows
/// `position .. position + n` of each leading index (`position` a `[1]` input, a whole number;
/// rows past `T` are dropped). Inputs `[value, position, cache]`; the node's value is the cache
/// after the write (no buffer of its own), so what reads it reads the new rows: attention's keys
/// and values while decoding one token at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WriteRows;

impl WriteRows {
    /// Shape rule: `value (*, n, W)` and `cache (*, T, W)` with the same leading axes, `n <= T`,
    /// and a one-element position.
    pub fn infer(value: &Shape, position: &Shape, cache: &Shape) -> Result<Shape> {
        let (rv, rc) = (value.rank(), cache.rank());
        let fits = rv >= 2
            && rv == rc
            && value.dims()[..rv - 2] == cache.dims()[..rc - 2]
            && value.dims()[rv - 1] == cache.dims()[rc - 1]
            && value.dims()[rv - 2] <= cache.dims()[rc - 2];
        if !fits {
            return Err(shape_err(
                "write_rows",
                format!("value {value} does not fit cache {cache}: expected (*, n, W) into (*, T, W), n <= T"),
            ));
        }
        if position.numel() != 1 {
            return Err(shape_err(
                "write_rows",
                format!("the position must have one element, its shape is {position}"),
            ));
        }
        Ok(cache.clone())
    }

    /// `(outer, n, T, W)` of checked shapes.
    fn extents(value: &Shape, cache: &Shape) -> (usize, usize, usize, usize) {
        let r = value.rank();
        let (n, w) = (value.dims()[r - 2], value.dims()[r - 1]);
        (value.numel() / (n * w), n, cache.dims()[r - 2], w)
    }

    /// CPU reference: the cache with the rows written (the position converted as WGSL's `u32()`
    /// does: truncated, negative to 0).
    pub fn cpu(&self, value: &Tensor, position: &Tensor, cache: &Tensor) -> Tensor {
        let (outer, n, t, w) = Self::extents(value.shape(), cache.shape());
        let start = position.data()[0] as u32 as usize;
        let mut data = cache.data().to_vec();
        for o in 0..outer {
            for r in (0..n).filter(|r| start + r < t) {
                let dst = (o * t + start + r) * w;
                data[dst..dst + w].copy_from_slice(&value.data()[(o * n + r) * w..][..w]);
            }
        }
        Tensor::new(cache.shape().clone(), data).expect("same shape")
    }

    /// Kernel: `write_rows` of `shaders/layout.wgsl`, one thread per value element.
    pub fn kernel(&self, value: &Shape, cache: &Shape) -> KernelSpec {
        let (_, n, t, w) = Self::extents(value, cache);
        KernelSpec {
            family: "layout",
            entry: "write_rows",
            constants: vec![
                ("N", value.numel() as f64),
                ("ROWS", n as f64),
                ("CACHE_ROWS", t as f64),
                ("WIDTH", w as f64),
            ],
            workgroups: groups(value.numel(), 256),
        }
    }
}
