//! 2-D max and average pooling on NCHW tensors and their backward ops, as
//! `torch.nn.functional.max_pool2d` / `avg_pool2d`, in floor or ceil mode ([`Pool2d::ceil_mode`]:
//! a last window that starts inside the input may reach past the padding); average pooling
//! counts the padding or not ([`Pool2d::count_include_pad`]: it divides by the window clipped
//! to the padded input, which is kh*kw in floor mode, or by the input elements it covers), max
//! pooling ignores it, and the padding may be at most half the kernel. The backward ops are gathers: each input element
//! sums the gradient of every window that reads it (max: every window whose argmax it is, the
//! first maximum in row-major window order, as torch). Adaptive average pooling
//! ([`AdaptiveAvgPool2d`]) averages windows that tile the input into a given output size.
//! Kernels: `shaders/pool.wgsl`.

use super::{groups, KernelSpec};
use crate::error::{shape_err, Error, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Window geometry of a 2-D pooling, each pair as (height, width), and torch's options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2d {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    /// torch's `ceil_mode`: the output extents round up (a partial last window, which must
    /// start inside the input or its left padding), where the default floor mode drops it.
    pub ceil_mode: bool,
    /// torch's `count_include_pad` (average pooling; default true): divide by the window
    /// clipped to the padded input rather than by the input elements it covers.
    pub count_include_pad: bool,
}

/// Output extents of a window sweep along one axis, as torch's `pooling_output_shape`.
fn out_len(len: usize, k: usize, s: usize, p: usize, ceil: bool) -> usize {
    let span = len + 2 * p - k;
    let out = if ceil { span.div_ceil(s) } else { span / s } + 1;
    // the last window must start inside the input or the left padding
    if ceil && (out - 1) * s >= len + p {
        return out - 1;
    }
    out
}

impl Pool2d {
    /// A pooling of `kernel` with `stride` and `padding` in torch's default modes (floor,
    /// counting the padding).
    pub fn new(kernel: (usize, usize), stride: (usize, usize), padding: (usize, usize)) -> Self {
        Pool2d {
            kernel,
            stride,
            padding,
            ceil_mode: false,
            count_include_pad: true,
        }
    }

    /// With torch's `ceil_mode`.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }

    /// With torch's `count_include_pad` (average pooling).
    pub fn count_include_pad(mut self, on: bool) -> Self {
        self.count_include_pad = on;
        self
    }

    /// The divisor of average window (oh, ow) over an input of (h, w), as torch's: the window
    /// clipped to the padded input with `count_include_pad`, else the input elements it covers.
    fn avg_divisor(&self, h: usize, w: usize, oh: usize, ow: usize) -> f64 {
        let axis = |o: usize, s: usize, k: usize, p: usize, len: usize| {
            let a = o * s;
            match self.count_include_pad {
                true => (a + k).min(len + 2 * p) - a,
                false => (a + k).min(p + len) - a.max(p),
            }
        };
        let rows = axis(oh, self.stride.0, self.kernel.0, self.padding.0, h);
        let cols = axis(ow, self.stride.1, self.kernel.1, self.padding.1, w);
        (rows * cols) as f64
    }

    /// Shape rule: input [N, C, H, W] -> [N, C, Ho, Wo], `Ho = (H + 2*ph - kh) / sh + 1`; `op` names
    /// the caller in errors.
    pub fn infer(&self, op: &'static str, x: &Shape) -> Result<Shape> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let what = format!("input {x}, kernel {k:?}, stride {s:?}, padding {p:?}");
        if x.rank() != 4 {
            return Err(shape_err(
                op,
                format!(
                    "{what}: expected rank 4 (N, C, H, W), got rank {}",
                    x.rank()
                ),
            ));
        }
        if k.0 == 0 || k.1 == 0 || s.0 == 0 || s.1 == 0 {
            return Err(shape_err(
                op,
                format!("{what}: kernel and stride must be positive"),
            ));
        }
        if p.0 > k.0 / 2 || p.1 > k.1 / 2 {
            return Err(shape_err(
                op,
                format!("{what}: padding must be at most half the kernel"),
            ));
        }
        let (h, w) = (x.dims()[2], x.dims()[3]);
        if k.0 > h + 2 * p.0 || k.1 > w + 2 * p.1 {
            return Err(shape_err(
                op,
                format!(
                    "{what}: the kernel is larger than the padded input {}x{}",
                    h + 2 * p.0,
                    w + 2 * p.1
                ),
            ));
        }
        let (ho, wo) = self.out_hw(h, w);
        Ok(Shape(vec![x.dims()[0], x.dims()[1], ho, wo]))
    }

    /// Output extents (Ho, Wo) for an input of (h, w).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let ceil = self.ceil_mode;
        (
            out_len(h, self.kernel.0, self.stride.0, self.padding.0, ceil),
            out_len(w, self.kernel.1, self.stride.1, self.padding.1, ceil),
        )
    }

    /// The image positions (within an [H, W] plane, row-major window order) of window (oh, ow),
    /// padding skipped.
    fn window(&self, h: usize, w: usize, oh: usize, ow: usize) -> impl Iterator<Item = usize> {
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        (0..kh)
            .filter_map(move |i| {
                let hp = oh * sh + i;
                (hp >= ph && hp - ph < h).then(|| hp - ph)
            })
            .flat_map(move |ih| {
                (0..kw).filter_map(move |j| {
                    let wp = ow * sw + j;
                    (wp >= pw && wp - pw < w).then(|| ih * w + wp - pw)
                })
            })
    }

    /// Position within the plane of the first maximum of window (oh, ow).
    fn argmax(&self, plane: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> usize {
        let mut best: Option<(usize, f32)> = None;
        for p in self.window(h, w, oh, ow) {
            let v = plane[p];
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((p, v));
            }
        }
        best.expect("padding <= kernel / 2 leaves every window an element")
            .0
    }

    /// Visits every window of every plane of an input of shape `x` ([N, C, H, W]) with the plane's
    /// index, the plane's extents and the window's linear output index.
    fn for_each_window(&self, x: &Shape, mut f: impl FnMut(usize, usize, usize, usize)) {
        let d = x.dims();
        let (h, w) = (d[2], d[3]);
        let (ho, wo) = self.out_hw(h, w);
        for plane in 0..d[0] * d[1] {
            for oh in 0..ho {
                for ow in 0..wo {
                    f(plane, oh, ow, (plane * ho + oh) * wo + ow);
                }
            }
        }
    }

    /// CPU reference of max pooling.
    pub fn max_cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let (h, w) = (x.dims()[2], x.dims()[3]);
        let mut data = vec![0f32; out.numel()];
        self.for_each_window(x.shape(), |plane, oh, ow, o| {
            let p = &x.data()[plane * h * w..(plane + 1) * h * w];
            data[o] = p[self.argmax(p, h, w, oh, ow)];
        });
        Tensor::new(out.clone(), data).expect("max_pool2d shape")
    }

    /// CPU reference of average pooling (f64 sums, divided as torch's).
    pub fn avg_cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let (h, w) = (x.dims()[2], x.dims()[3]);
        let mut data = vec![0f32; out.numel()];
        self.for_each_window(x.shape(), |plane, oh, ow, o| {
            let p = &x.data()[plane * h * w..(plane + 1) * h * w];
            let s: f64 = self.window(h, w, oh, ow).map(|i| p[i] as f64).sum();
            data[o] = (s / self.avg_divisor(h, w, oh, ow)) as f32;
        });
        Tensor::new(out.clone(), data).expect("avg_pool2d shape")
    }

    /// CPU reference of the max-pooling backward: `dx` gets each window's `dy` at its argmax.
    pub fn max_backward_cpu(&self, x: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let (h, w) = (x.dims()[2], x.dims()[3]);
        let mut acc = vec![0f64; out.numel()];
        self.for_each_window(x.shape(), |plane, oh, ow, o| {
            let p = &x.data()[plane * h * w..(plane + 1) * h * w];
            acc[plane * h * w + self.argmax(p, h, w, oh, ow)] += dy.data()[o] as f64;
        });
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect())
            .expect("max_pool2d_backward shape")
    }

    /// The override constants of every pooling kernel, for an input of shape `x`.
    fn constants(&self, x: &Shape) -> Vec<(&'static str, f64)> {
        let d = x.dims();
        let (ho, wo) = self.out_hw(d[2], d[3]);
        [
            ("N", d[0]),
            ("C", d[1]),
            ("H", d[2]),
            ("W", d[3]),
            ("HO", ho),
            ("WO", wo),
            ("KH", self.kernel.0),
            ("KW", self.kernel.1),
            ("SH", self.stride.0),
            ("SW", self.stride.1),
            ("PH", self.padding.0),
            ("PW", self.padding.1),
            ("COUNT_PAD", self.count_include_pad as usize),
        ]
        .into_iter()
        .map(|(k, v)| (k, v as f64))
        .collect()
    }

    /// Kernel of a forward pooling (`entry` = "max_pool" or "avg_pool"): one thread per output.
    pub fn kernel(&self, entry: &'static str, x: &Shape, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "pool",
            entry,
            constants: self.constants(x),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Kernel of the max-pooling backward (inputs x and dy): one thread per input element.
    pub fn max_backward_kernel(&self, x: &Shape) -> KernelSpec {
        KernelSpec {
            family: "pool",
            entry: "max_pool_backward",
            constants: self.constants(x),
            workgroups: groups(x.numel(), 256),
        }
    }

    /// Shape rule of the backward ops: `dy` must have the pooled shape of `x`.
    pub fn check_dy(&self, op: &'static str, x: &Shape, dy: &Shape) -> Result<()> {
        let want = self.infer(op, x)?;
        if &want != dy {
            return Err(shape_err(
                op,
                format!("input {x} pools to {want}, the gradient has shape {dy}"),
            ));
        }
        Ok(())
    }

    /// Backward of max pooling.
    pub fn max_backward(&self, g: &Graph, x: NodeId, dy: NodeId) -> Result<NodeId> {
        g.max_pool2d_backward(x, dy, *self)
    }

    /// Backward of average pooling.
    pub fn avg_backward(&self, g: &Graph, x: NodeId, dy: NodeId) -> Result<NodeId> {
        let d = g.shape(x);
        g.avg_pool2d_backward(dy, (d.dims()[2], d.dims()[3]), *self)
    }
}

/// The max-pooling backward of `x [N, C, H, W]` (a relu's output) and `dy`, times the relu's
/// gradient mask: `dx` where `x > 0`, else 0 (`relu_grad(max_pool2d_backward(x, dy), x)`, made
/// by the plan compiler: `exec::lower::relu_mask_into_max_pool_backward`). With `cn` the
/// result is stored as `[C, N, H*W]` (the `[C, N*H*W]` operand a convolution's weight and input
/// gradient products read), without: `[N, C, H, W]`. Inputs `x`, `dy`; one kernel where the
/// backward, the mask and the transpose took two and a tensor between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaxPoolReluBackward {
    pub pool: Pool2d,
    pub cn: bool,
}

impl MaxPoolReluBackward {
    /// CPU reference: the backward, the mask, then the layout; `out` is the node's shape.
    pub fn cpu(&self, x: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let dx = self.pool.max_backward_cpu(x, dy, x.shape());
        let d = x.dims();
        let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
        let mut data = vec![0f32; dx.numel()];
        for (i, (&g, &v)) in dx.data().iter().zip(x.data()).enumerate() {
            let at = match self.cn {
                true => ((i / hw % c) * n + i / (c * hw)) * hw + i % hw,
                false => i,
            };
            data[at] = if v > 0.0 { g } else { 0.0 };
        }
        Tensor::new(out.clone(), data).expect("the node's element count")
    }

    /// Kernel: one thread per element of `x`, as the plain backward's.
    pub fn kernel(&self, x: &Shape) -> KernelSpec {
        let mut k = self.pool.max_backward_kernel(x);
        k.entry = "max_pool_backward_relu";
        k.constants.push(("CN_OUT", self.cn as u32 as f64));
        k
    }
}

/// The backward of average pooling: input `dy` [N, C, Ho, Wo] -> `dx` [N, C, H, W], every input
/// element gathering `dy` over the window's divisor from each window that covers it. It needs the input extents,
/// which the pooled shape does not determine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AvgPool2dBackward {
    pub pool: Pool2d,
    /// Input extents (H, W).
    pub input: (usize, usize),
}

impl AvgPool2dBackward {
    /// Shape rule: `dy` must be the pooled shape of [N, C, H, W]; gives that input shape.
    pub fn infer(&self, dy: &Shape) -> Result<Shape> {
        let op = "avg_pool2d_backward";
        if dy.rank() != 4 {
            return Err(shape_err(
                op,
                format!(
                    "gradient {dy}: expected rank 4 (N, C, Ho, Wo), got rank {}",
                    dy.rank()
                ),
            ));
        }
        let x = Shape(vec![dy.dims()[0], dy.dims()[1], self.input.0, self.input.1]);
        self.pool.check_dy(op, &x, dy)?;
        Ok(x)
    }

    /// CPU reference: `dx` gets each window's `dy` over its divisor on every element of the
    /// window (f64 sums).
    pub fn cpu(&self, dy: &Tensor, out: &Shape) -> Tensor {
        let (h, w) = self.input;
        let mut acc = vec![0f64; out.numel()];
        self.pool.for_each_window(out, |plane, oh, ow, o| {
            let share = dy.data()[o] as f64 / self.pool.avg_divisor(h, w, oh, ow);
            for p in self.pool.window(h, w, oh, ow) {
                acc[plane * h * w + p] += share;
            }
        });
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect())
            .expect("avg_pool2d_backward shape")
    }

    /// Kernel: one thread per input element.
    pub fn kernel(&self, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "pool",
            entry: "avg_pool_backward",
            constants: self.pool.constants(out),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Backward (with respect to `dy`): this op is linear and the adjoint of average pooling.
    pub fn backward(&self, g: &Graph, ddx: NodeId) -> Result<NodeId> {
        g.avg_pool2d_with(ddx, self.pool)
    }
}

/// The max-pooling backward is piecewise linear in `dy` with a gather at the argmax as its adjoint,
/// an op kiln does not have: second derivatives through max pooling are refused.
pub fn max_backward_backward() -> Error {
    Error::Unsupported(
        "the second derivative of max_pool2d (backward of max_pool2d_backward)".into(),
    )
}

/// The window geometry of adaptive pooling, average ([`AdaptiveAvgPool2d`], its name for
/// average pooling) or max (`Op::AdaptiveMaxPool2d`). Adaptive average pooling
/// (`torch.nn.functional.adaptive_avg_pool2d`): `(N, C, H, W)` to
/// `(N, C, Ho, Wo)`, output `(oh, ow)` the mean of input rows `floor(oh*H/Ho) ..
/// ceil((oh+1)*H/Ho)` and the columns likewise (windows of different sizes where Ho does not
/// divide H; `(1, 1)` is global average pooling). As `Op::AdaptiveAvgPool2dBackward`, its
/// adjoint from `dy (N, C, Ho, Wo)`: each input element gathers `dy / area` of the windows
/// that hold it. Kernels: `shaders/pool.wgsl` `adaptive_avg_pool*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdaptivePool2d {
    /// Input extents (H, W).
    pub input: (usize, usize),
    /// Output extents (Ho, Wo).
    pub output: (usize, usize),
}

/// [`AdaptivePool2d`] as adaptive average pooling's op names it.
pub type AdaptiveAvgPool2d = AdaptivePool2d;

impl AdaptivePool2d {
    /// The input window of output `o` along an axis of `len` inputs and `out` outputs.
    fn window(o: usize, len: usize, out: usize) -> std::ops::Range<usize> {
        (o * len / out)..((o + 1) * len).div_ceil(out)
    }

    /// Shape rule of the forward: `x (N, C, H, W)` with this op's input extents, the output's
    /// positive.
    pub fn infer(&self, x: &Shape) -> Result<Shape> {
        self.infer_as("adaptive_avg_pool2d", x)
    }

    /// [`Self::infer`] for the op `op` names in errors.
    pub fn infer_as(&self, op: &'static str, x: &Shape) -> Result<Shape> {
        super::image_to(op, "input", x, self.input, self.output)
    }

    /// Shape rule of the backward: `dy` the forward's output for some `(N, C)`.
    pub fn infer_backward(&self, dy: &Shape) -> Result<Shape> {
        let op = "adaptive_avg_pool2d_backward";
        super::image_to(op, "gradient", dy, self.output, self.input)
    }

    /// Visits every (output index, input index, 1 / window area) of `planes` planes.
    fn for_each(&self, planes: usize, mut f: impl FnMut(usize, usize, f64)) {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        for p in 0..planes {
            for oh in 0..ho {
                let rows = Self::window(oh, h, ho);
                for ow in 0..wo {
                    let cols = Self::window(ow, w, wo);
                    let area = (rows.len() * cols.len()) as f64;
                    let o = (p * ho + oh) * wo + ow;
                    for ih in rows.clone() {
                        for iw in cols.clone() {
                            f(o, (p * h + ih) * w + iw, 1.0 / area);
                        }
                    }
                }
            }
        }
    }

    /// CPU reference of the forward: each window's f64 sum over its area.
    pub fn cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let mut acc = vec![0f64; out.numel()];
        let xd = x.data();
        let mut area = vec![0f64; out.numel()];
        self.for_each(x.dims()[0] * x.dims()[1], |o, i, inv| {
            acc[o] += f64::from(xd[i]);
            area[o] = inv;
        });
        let data = acc
            .iter()
            .zip(&area)
            .map(|(s, inv)| (s * inv) as f32)
            .collect();
        Tensor::new(out.clone(), data).expect("adaptive pool shape")
    }

    /// CPU reference of the backward: every output's gradient over its area, spread on its
    /// window (f64).
    pub fn backward_cpu(&self, dy: &Tensor, out: &Shape) -> Tensor {
        let mut acc = vec![0f64; out.numel()];
        let d = dy.data();
        self.for_each(dy.dims()[0] * dy.dims()[1], |o, i, inv| {
            acc[i] += f64::from(d[o]) * inv;
        });
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect())
            .expect("adaptive pool backward shape")
    }

    /// The override constants of both kernels for a batch of `n` images of `c` channels.
    fn constants(&self, n: usize, c: usize) -> Vec<(&'static str, f64)> {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        [
            ("N", n),
            ("C", c),
            ("H", h),
            ("W", w),
            ("HO", ho),
            ("WO", wo),
        ]
        .into_iter()
        .map(|(k, v)| (k, v as f64))
        .collect()
    }

    /// Kernel of the forward: one thread per output element.
    pub fn kernel(&self, x: &Shape, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "pool",
            entry: "adaptive_avg_pool",
            constants: self.constants(x.dims()[0], x.dims()[1]),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Kernel of the backward: one thread per input element, gathering.
    pub fn backward_kernel(&self, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "pool",
            entry: "adaptive_avg_pool_backward",
            constants: self.constants(out.dims()[0], out.dims()[1]),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Position within its `(H, W)` plane of the first maximum of window `(oh, ow)`, in
    /// row-major window order (as max pooling's).
    fn argmax(&self, plane: &[f32], oh: usize, ow: usize) -> usize {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        let mut best: Option<(usize, f32)> = None;
        for ih in Self::window(oh, h, ho) {
            for iw in Self::window(ow, w, wo) {
                let v = plane[ih * w + iw];
                if best.is_none_or(|(_, b)| v > b) {
                    best = Some((ih * w + iw, v));
                }
            }
        }
        best.expect("every adaptive window holds an element").0
    }

    /// Adaptive max pooling (`torch.nn.functional.adaptive_max_pool2d`): each window's first
    /// maximum. CPU reference.
    pub fn max_cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        let mut data = Vec::with_capacity(out.numel());
        for plane in x.data().chunks(h * w) {
            for oh in 0..ho {
                for ow in 0..wo {
                    data.push(plane[self.argmax(plane, oh, ow)]);
                }
            }
        }
        Tensor::new(out.clone(), data).expect("adaptive pool shape")
    }

    /// CPU reference of adaptive max pooling's backward: each window's `dy` at its argmax
    /// (f64 sums, as windows may overlap).
    pub fn max_backward_cpu(&self, x: &Tensor, dy: &Tensor, out: &Shape) -> Tensor {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        let mut acc = vec![0f64; out.numel()];
        for (p, plane) in x.data().chunks(h * w).enumerate() {
            for oh in 0..ho {
                for ow in 0..wo {
                    let g = dy.data()[(p * ho + oh) * wo + ow] as f64;
                    acc[p * h * w + self.argmax(plane, oh, ow)] += g;
                }
            }
        }
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect())
            .expect("adaptive pool backward shape")
    }

    /// Kernel of adaptive max pooling (one thread per output) or its backward (inputs `x`,
    /// `dy`; one thread per input element, gathering from the windows that hold it).
    pub fn max_kernel(&self, x: &Shape, backward: bool) -> KernelSpec {
        let (entry, items) = match backward {
            false => (
                "adaptive_max_pool",
                x.dims()[0] * x.dims()[1] * self.output.0 * self.output.1,
            ),
            true => ("adaptive_max_pool_backward", x.numel()),
        };
        KernelSpec {
            family: "pool",
            entry,
            constants: self.constants(x.dims()[0], x.dims()[1]),
            workgroups: groups(items, 256),
        }
    }
}
