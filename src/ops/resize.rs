//! Resizing NCHW images to a given size, as `torch.nn.functional.interpolate(x, size=(Ho, Wo),
//! mode=..)`, or by a scale factor (`scale_factor=..`: the sampling then at `1 / scale`
//! without aligned corners, as torch's): nearest (torch's `"nearest"`: output `o` reads input `floor(o * in / out)`) and
//! bilinear (`align_corners` false: output `o` samples input coordinate
//! `max((o + 0.5) * in / out - 0.5, 0)`; true: `o * (in - 1) / (out - 1)`), with torch's f32
//! index arithmetic, so both pick the same pixels and weights. The backward is a gather: each
//! input element sums, over the outputs that read it, the output's gradient times its weight.
//! Kernels: `shaders/resize.wgsl`.

use super::{groups, KernelSpec};
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// How an output pixel samples the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    /// The input pixel `floor(o * in / out)` (torch's `"nearest"`).
    Nearest,
    /// The four input pixels around the sampled coordinate, weighted by distance (torch's
    /// `"bilinear"`); `align_corners` maps the corner pixels' centres onto each other.
    Bilinear { align_corners: bool },
}

/// A resize of `(H, W)` images to `(Ho, Wo)`: the forward (`x (N, C, H, W) -> (N, C, Ho, Wo)`)
/// or, as `Op::Resize2dBackward`, its adjoint (`dy (N, C, Ho, Wo) -> dx (N, C, H, W)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resize2d {
    pub mode: ResizeMode,
    /// Input extents (H, W).
    pub input: (usize, usize),
    /// Output extents (Ho, Wo).
    pub output: (usize, usize),
    /// torch's `scale_factor` (H, W) as f64 bits, where given: the index arithmetic then
    /// samples at `1 / scale` (torch's `compute_scales_value`), not `in / out` (without
    /// `align_corners`).
    pub scale_factor: Option<(u64, u64)>,
}

/// Input taps of one output coordinate along an axis: `(i0, i1, l0, l1)`, the value
/// `l0 * x[i0] + l1 * x[i1]` (nearest: `l1 = 0`).
type Taps = (usize, usize, f32, f32);

impl Resize2d {
    /// The f32 scale of axis `axis` (0: H, 1: W), as torch's `area_pixel_compute_scale`
    /// computes it: from the sizes, or from the scale factor given.
    fn scale(&self, axis: usize) -> f32 {
        let (len, out) = self.extents(axis);
        match self.mode {
            ResizeMode::Bilinear {
                align_corners: true,
            } => {
                if out > 1 {
                    (len - 1) as f32 / (out - 1) as f32
                } else {
                    0.0
                }
            }
            _ => match self.scale_factor {
                // torch: static_cast<float>(1.0 / scale), the division in double
                Some(s) => {
                    let s = f64::from_bits(if axis == 0 { s.0 } else { s.1 });
                    (1.0 / s) as f32
                }
                None => len as f32 / out as f32,
            },
        }
    }

    /// `(in, out)` extents of axis `axis` (0: H, 1: W).
    fn extents(&self, axis: usize) -> (usize, usize) {
        match axis {
            0 => (self.input.0, self.output.0),
            _ => (self.input.1, self.output.1),
        }
    }

    /// The taps of output coordinate `o` along axis `axis`.
    fn taps(&self, o: usize, axis: usize) -> Taps {
        let len = self.extents(axis).0;
        let scale = self.scale(axis);
        match self.mode {
            ResizeMode::Nearest => {
                let i = ((o as f32 * scale).floor() as usize).min(len - 1);
                (i, i, 1.0, 0.0)
            }
            ResizeMode::Bilinear { align_corners } => {
                let src = if align_corners {
                    scale * o as f32
                } else {
                    (scale * (o as f32 + 0.5) - 0.5).max(0.0)
                };
                let i0 = (src as usize).min(len - 1);
                let i1 = if i0 < len - 1 { i0 + 1 } else { i0 };
                let l1 = src - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            }
        }
    }

    /// Shape rule of the forward: `x` must be `(N, C, H, W)` with this op's input extents and
    /// the output extents positive; gives `(N, C, Ho, Wo)`.
    pub fn infer(&self, x: &Shape) -> Result<Shape> {
        super::image_to("interpolate", "input", x, self.input, self.output)
    }

    /// Shape rule of the backward: `dy` must be the forward's output for some `(N, C)`.
    pub fn infer_backward(&self, dy: &Shape) -> Result<Shape> {
        super::image_to(
            "interpolate_backward",
            "gradient",
            dy,
            self.output,
            self.input,
        )
    }

    /// Visits every (output position, input position, weight) of the resize of `planes`
    /// planes: the forward reads, the backward adds, along these (bilinear: all four taps, as
    /// torch, zero weights too; nearest: the one pixel).
    fn for_each_tap(&self, planes: usize, mut f: impl FnMut(usize, usize, f32)) {
        let nearest = self.mode == ResizeMode::Nearest;
        let ((h, w), (ho, wo)) = (self.input, self.output);
        let rows: Vec<Taps> = (0..ho).map(|o| self.taps(o, 0)).collect();
        let cols: Vec<Taps> = (0..wo).map(|o| self.taps(o, 1)).collect();
        for p in 0..planes {
            for (oh, &(h0, h1, lh0, lh1)) in rows.iter().enumerate() {
                for (ow, &(w0, w1, lw0, lw1)) in cols.iter().enumerate() {
                    let o = (p * ho + oh) * wo + ow;
                    for (ih, lh) in [(h0, lh0), (h1, lh1)] {
                        for (iw, lw) in [(w0, lw0), (w1, lw1)] {
                            if !nearest || (lh != 0.0 && lw != 0.0) {
                                f(o, (p * h + ih) * w + iw, lh * lw);
                            }
                        }
                    }
                }
            }
        }
    }

    /// CPU reference of the forward (f64 sums of the taps).
    pub fn cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let planes = x.dims()[0] * x.dims()[1];
        let mut acc = vec![0f64; out.numel()];
        self.for_each_tap(planes, |o, i, l| {
            acc[o] += f64::from(l) * f64::from(x.data()[i]);
        });
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect()).expect("resize shape")
    }

    /// CPU reference of the backward: every output's gradient scattered onto its taps (f64).
    pub fn backward_cpu(&self, dy: &Tensor, out: &Shape) -> Tensor {
        let planes = dy.dims()[0] * dy.dims()[1];
        let mut acc = vec![0f64; out.numel()];
        self.for_each_tap(planes, |o, i, l| {
            acc[i] += f64::from(l) * f64::from(dy.data()[o]);
        });
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect())
            .expect("resize backward shape")
    }

    /// The override constants of both kernels for `planes` = N * C planes.
    fn constants(&self, planes: usize) -> Vec<(&'static str, f64)> {
        let ((h, w), (ho, wo)) = (self.input, self.output);
        let (bilinear, align) = match self.mode {
            ResizeMode::Nearest => (false, false),
            ResizeMode::Bilinear { align_corners } => (true, align_corners),
        };
        vec![
            ("PLANES", planes as f64),
            ("H", h as f64),
            ("W", w as f64),
            ("HO", ho as f64),
            ("WO", wo as f64),
            ("BILINEAR", bilinear as u8 as f64),
            ("ALIGN", align as u8 as f64),
            ("SCALE_H", f64::from(self.scale(0))),
            ("SCALE_W", f64::from(self.scale(1))),
        ]
    }

    /// Kernel of the forward: one thread per output element.
    pub fn kernel(&self, x: &Shape, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "resize",
            entry: "resize",
            constants: self.constants(x.dims()[0] * x.dims()[1]),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Kernel of the backward: one thread per input element, gathering.
    pub fn backward_kernel(&self, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "resize",
            entry: "resize_backward",
            constants: self.constants(out.dims()[0] * out.dims()[1]),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Backward of the forward: the gather of `dy`.
    pub fn backward(&self, g: &Graph, dy: NodeId) -> Result<NodeId> {
        g.interpolate_backward(dy, *self)
    }

    /// Backward of the backward (a linear map whose adjoint is the forward).
    pub fn backward_backward(&self, g: &Graph, ddx: NodeId) -> Result<NodeId> {
        g.interpolate(ddx, self.output, self.mode)
    }
}
