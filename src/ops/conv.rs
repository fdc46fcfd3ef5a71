//! 2-D convolution on NCHW tensors (as `torch.nn.functional.conv2d`), in one group built as a
//! graph composition that reuses the tiled matmul kernel:
//!
//! ```text
//! cols = im2col(x)                      [C*kh*kw, N*Ho*Wo]   (zeros where the window is in the padding)
//! y    = reshape(w, [O, C*kh*kw]) x cols [O, N*Ho*Wo]       (one large matmul for the whole batch)
//! y    = permute(reshape(y, [O, N, Ho*Wo]), [1, 0, 2]) -> [N, O, Ho, Wo] (+ reshape(bias, [O, 1, 1]))
//! ```
//!
//! `im2col` and `col2im` are adjoint linear maps, so each is the other's backward rule, and the
//! gradients of conv2d (input, weight, bias) follow from those of matmul, reshape and add.
//! The plan compiler runs the products reading `im2col` and `col2im` of a product as implicit
//! GEMMs (`ImplicitGemm`, `ImplicitDgrad`), so the column matrix is never stored.
//!
//! A convolution in groups (`groups > 1`, depthwise where `groups = C`) runs direct kernels
//! instead, one per pass ([`GroupedConv2d`]: the forward, the input and the weight gradient,
//! each the others' adjoint). A transposed convolution (`conv_transpose2d`) is the input
//! gradient of the convolution it transposes: `col2im(w^T x)` in one group, the grouped input
//! gradient pass in more. Kernels: `shaders/conv.wgsl`.

use super::{groups, KernelSpec};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Stride, padding and dilation of a 2-D convolution, each as (height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dOpts {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
}

impl Default for Conv2dOpts {
    /// Stride 1, no padding, dilation 1.
    fn default() -> Self {
        Conv2dOpts {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        }
    }
}

/// The geometry shared by `im2col` and `col2im`: the image's channels and extents, the kernel
/// extents and the convolution options. The batch size comes from the node's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ColGeometry {
    /// Image channels C.
    pub channels: usize,
    /// Image extents (H, W).
    pub image: (usize, usize),
    /// Kernel extents (kh, kw).
    pub kernel: (usize, usize),
    pub opts: Conv2dOpts,
}

impl ColGeometry {
    /// Checks the geometry of sliding a `kernel` over the image `x` ([N, C, H, W]); `op` names the
    /// caller in errors.
    pub fn new(
        op: &'static str,
        x: &Shape,
        kernel: (usize, usize),
        opts: Conv2dOpts,
    ) -> Result<ColGeometry> {
        if x.rank() != 4 {
            return Err(shape_err(
                op,
                format!(
                    "input {x}: expected rank 4 (N, C, H, W), got rank {}",
                    x.rank()
                ),
            ));
        }
        let d = x.dims();
        let g = ColGeometry {
            channels: d[1],
            image: (d[2], d[3]),
            kernel,
            opts,
        };
        g.check(op, &format!("input {x}"))?;
        Ok(g)
    }

    /// Checks strides, dilations and that the dilated kernel fits in the padded image; `what`
    /// describes the operands in the error.
    fn check(&self, op: &'static str, what: &str) -> Result<()> {
        let o = &self.opts;
        if o.stride.0 == 0 || o.stride.1 == 0 || o.dilation.0 == 0 || o.dilation.1 == 0 {
            return Err(shape_err(
                op,
                format!(
                    "{what}: stride {:?} and dilation {:?} must be positive",
                    o.stride, o.dilation
                ),
            ));
        }
        let (kh, kw) = self.kernel;
        if kh == 0 || kw == 0 {
            return Err(shape_err(
                op,
                format!("{what}: kernel {kh}x{kw} must be non-empty"),
            ));
        }
        let (eh, ew) = self.dilated_kernel();
        let (ph, pw) = self.padded();
        if eh > ph || ew > pw {
            return Err(shape_err(
                op,
                format!(
                    "{what}: kernel {kh}x{kw} (dilated {eh}x{ew}) is larger than the padded input {ph}x{pw}"
                ),
            ));
        }
        Ok(())
    }

    /// Extents of the kernel's footprint, dilation included.
    fn dilated_kernel(&self) -> (usize, usize) {
        let d = self.opts.dilation;
        (d.0 * (self.kernel.0 - 1) + 1, d.1 * (self.kernel.1 - 1) + 1)
    }

    /// Extents of the padded image.
    fn padded(&self) -> (usize, usize) {
        let p = self.opts.padding;
        (self.image.0 + 2 * p.0, self.image.1 + 2 * p.1)
    }

    /// Output extents (Ho, Wo): `(H + 2p - d(k - 1) - 1) / s + 1`.
    pub fn out_hw(&self) -> (usize, usize) {
        let (eh, ew) = self.dilated_kernel();
        let (ph, pw) = self.padded();
        let s = self.opts.stride;
        ((ph - eh) / s.0 + 1, (pw - ew) / s.1 + 1)
    }

    /// Rows of the column matrix: C * kh * kw.
    pub fn rows(&self) -> usize {
        self.channels * self.kernel.0 * self.kernel.1
    }

    /// Shape of the column matrix for a batch of `n`: [C*kh*kw, N*Ho*Wo]. The batch sits in the
    /// columns so that the convolution is one large matmul `W [O, C*kh*kw] x cols`, and the
    /// weight gradient `dY [O, N*Ho*Wo] x cols^T` another, with no batch sum.
    pub fn cols_shape(&self, n: usize) -> Shape {
        let (ho, wo) = self.out_hw();
        Shape(vec![self.rows(), n * ho * wo])
    }

    /// The batch size of a column matrix of this geometry.
    fn batch_of(&self, cols: &Shape) -> usize {
        let (ho, wo) = self.out_hw();
        cols.dims()[1] / (ho * wo).max(1)
    }

    /// Shape of the image for a batch of `n`: [N, C, H, W].
    pub fn image_shape(&self, n: usize) -> Shape {
        Shape(vec![n, self.channels, self.image.0, self.image.1])
    }

    /// Shape rule of `col2im`: `cols` must be [C*kh*kw, N*Ho*Wo] for this geometry; gives the image.
    pub fn col2im_infer(&self, cols: &Shape) -> Result<Shape> {
        let what = format!(
            "columns {cols} for image [C={}, H={}, W={}] and kernel {}x{}",
            self.channels, self.image.0, self.image.1, self.kernel.0, self.kernel.1
        );
        self.check("col2im", &what)?;
        if cols.rank() != 2 {
            return Err(shape_err(
                "col2im",
                format!("{what}: expected rank 2, got rank {}", cols.rank()),
            ));
        }
        let n = self.batch_of(cols).max(1);
        let want = self.cols_shape(n);
        if cols != &want {
            return Err(shape_err(
                "col2im",
                format!("{what}: expected shape {want}"),
            ));
        }
        Ok(self.image_shape(n))
    }

    /// The override constants shared by both kernels.
    fn constants(&self, n: usize) -> Vec<(&'static str, f64)> {
        let (ho, wo) = self.out_hw();
        let o = &self.opts;
        [
            ("N", n),
            ("C", self.channels),
            ("H", self.image.0),
            ("W", self.image.1),
            ("KH", self.kernel.0),
            ("KW", self.kernel.1),
            ("SH", o.stride.0),
            ("SW", o.stride.1),
            ("PH", o.padding.0),
            ("PW", o.padding.1),
            ("DH", o.dilation.0),
            ("DW", o.dilation.1),
            ("HO", ho),
            ("WO", wo),
        ]
        .into_iter()
        .map(|(k, v)| (k, v as f64))
        .collect()
    }

    /// Image coordinate read by kernel offset `k` of output position `o` along one axis, or `None`
    /// in the padding.
    fn source(
        o: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dil: usize,
        extent: usize,
    ) -> Option<usize> {
        let p = o * stride + k * dil;
        (p >= pad && p - pad < extent).then(|| p - pad)
    }

    /// CPU reference of `im2col`: `cols[n, (c*kh + i)*kw + j, oh*Wo + ow] =
    /// x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]`, zero in the padding.
    pub fn im2col_cpu(&self, x: &Tensor, out: &Shape) -> Tensor {
        let n = x.dims()[0];
        let (c, (h, w), (kh, kw)) = (self.channels, self.image, self.kernel);
        let (ho, wo) = self.out_hw();
        let o = &self.opts;
        let xd = x.data();
        let mut data = Vec::with_capacity(out.numel());
        for ch in 0..c {
            for i in 0..kh {
                for j in 0..kw {
                    for b in 0..n {
                        for oh in 0..ho {
                            let ih = Self::source(oh, i, o.stride.0, o.padding.0, o.dilation.0, h);
                            for ow in 0..wo {
                                let iw =
                                    Self::source(ow, j, o.stride.1, o.padding.1, o.dilation.1, w);
                                data.push(match (ih, iw) {
                                    (Some(ih), Some(iw)) => xd[((b * c + ch) * h + ih) * w + iw],
                                    _ => 0.0,
                                });
                            }
                        }
                    }
                }
            }
        }
        Tensor::new(out.clone(), data).expect("im2col shape")
    }

    /// CPU reference of `col2im`: every image element is the sum (f64) of the column entries that
    /// `im2col` would copy it to.
    pub fn col2im_cpu(&self, cols: &Tensor, out: &Shape) -> Tensor {
        let n = self.batch_of(cols.shape());
        let (c, (h, w), (kh, kw)) = (self.channels, self.image, self.kernel);
        let (ho, wo) = self.out_hw();
        let l = ho * wo;
        let o = &self.opts;
        let cd = cols.data();
        let mut acc = vec![0f64; out.numel()];
        for b in 0..n {
            for ch in 0..c {
                for i in 0..kh {
                    for j in 0..kw {
                        let row = (ch * kh + i) * kw + j;
                        for oh in 0..ho {
                            let Some(ih) =
                                Self::source(oh, i, o.stride.0, o.padding.0, o.dilation.0, h)
                            else {
                                continue;
                            };
                            for ow in 0..wo {
                                let Some(iw) =
                                    Self::source(ow, j, o.stride.1, o.padding.1, o.dilation.1, w)
                                else {
                                    continue;
                                };
                                acc[((b * c + ch) * h + ih) * w + iw] +=
                                    cd[(row * n + b) * l + oh * wo + ow] as f64;
                            }
                        }
                    }
                }
            }
        }
        Tensor::new(out.clone(), acc.into_iter().map(|v| v as f32).collect()).expect("col2im shape")
    }

    /// Kernel of `im2col`: one thread per column-matrix element.
    pub fn im2col_kernel(&self, x: &Shape, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "conv",
            entry: "im2col",
            constants: self.constants(x.dims()[0]),
            workgroups: groups(out.numel(), 256),
        }
    }

    /// Kernel of `col2im`: one thread per image element, gathering over the kernel positions.
    pub fn col2im_kernel(&self, cols: &Shape, out: &Shape) -> KernelSpec {
        KernelSpec {
            family: "conv",
            entry: "col2im",
            constants: self.constants(self.batch_of(cols)),
            workgroups: groups(out.numel(), 256),
        }
    }
}

/// `im2col`: gathers every receptive field of an image into a column matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Im2col(pub ColGeometry);

/// `col2im`: the adjoint of [`Im2col`], summing each column entry back onto the image element it
/// was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Col2im(pub ColGeometry);

impl Im2col {
    /// Backward: `col2im` of the gradient.
    pub fn backward(&self, g: &Graph, dy: NodeId) -> Result<NodeId> {
        g.col2im(dy, self.0)
    }
}

impl Col2im {
    /// Backward: `im2col` of the gradient.
    pub fn backward(&self, g: &Graph, dy: NodeId) -> Result<NodeId> {
        g.im2col(dy, self.0.kernel, self.0.opts)
    }
}

/// Checks the operands of `conv2d`: input [N, C, H, W], weight [O, C, kh, kw], bias `[O]`; gives the
/// im2col geometry.
pub fn conv2d_geometry(
    x: &Shape,
    w: &Shape,
    bias: Option<&Shape>,
    opts: Conv2dOpts,
) -> Result<ColGeometry> {
    let what = format!("input {x} and weight {w}");
    if x.rank() != 4 {
        return Err(shape_err(
            "conv2d",
            format!(
                "{what}: the input must have rank 4 (N, C, H, W), it has rank {}",
                x.rank()
            ),
        ));
    }
    if w.rank() != 4 {
        return Err(shape_err(
            "conv2d",
            format!(
                "{what}: the weight must have rank 4 (O, C, kh, kw), it has rank {}",
                w.rank()
            ),
        ));
    }
    let (c, wc) = (x.dims()[1], w.dims()[1]);
    if c != wc {
        return Err(shape_err(
            "conv2d",
            format!("{what}: input channels {c} and {wc} differ"),
        ));
    }
    if let Some(b) = bias {
        if b.dims() != [w.dims()[0]] {
            return Err(shape_err(
                "conv2d",
                format!(
                    "weight {w} and bias {b}: the bias must have shape [{}]",
                    w.dims()[0]
                ),
            ));
        }
    }
    let geom = ColGeometry {
        channels: c,
        image: (x.dims()[2], x.dims()[3]),
        kernel: (w.dims()[2], w.dims()[3]),
        opts,
    };
    geom.check("conv2d", &what)?;
    Ok(geom)
}

/// A product whose `b` operand is `im2col(x)` read straight from the image `x` (implicit GEMM):
/// the plan compiler makes it from `matmul(w, im2col(x))` (the forward convolution) and
/// `matmul_t(dy, im2col(x), false, true)` (the weight gradient) when the column matrix has no
/// other reader, so that `[C*kh*kw, N*Ho*Wo]` is never stored. Inputs: `a`, `x` `[N, C, H, W]`,
/// and the bias where the product has one. With `partial`, the split-K partial sums
/// `[slices, M, N]` of that configuration (see `matmul::MatMulPartial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImplicitGemm {
    pub product: crate::ops::matmul::MatMul,
    pub geom: ColGeometry,
    pub partial: Option<crate::codegen::matmul::GemmConfig>,
    /// The result `[O, N*Ho*Wo]` stored as `[N, O, Ho*Wo]` (a forward convolution's output in
    /// NCHW, where the permute after the product was folded in; never with `partial`).
    pub nchw: bool,
}

impl ImplicitGemm {
    /// The column matrix's shape for the image `x`.
    pub fn cols_shape(&self, x: &Shape) -> Shape {
        self.geom.cols_shape(x.dims()[0])
    }

    /// CPU reference: the column matrix built, then the product (or its partial sums).
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let cols_shape = self.cols_shape(inputs[1].shape());
        let cols = self.geom.im2col_cpu(inputs[1], &cols_shape);
        match self.partial {
            None if self.nchw => {
                // the product [O, N*HW], then its [O, N, HW] -> [N, O, HW] permute
                let (n, o, hw) = (out.dims()[0], out.dims()[1], out.dims()[2]);
                let flat = Shape(vec![o, n * hw]);
                let y = self
                    .product
                    .cpu(inputs[0], &cols, inputs.get(2).copied(), &flat);
                let yd = y.data();
                let mut data = vec![0f32; out.numel()];
                for b in 0..n {
                    for c in 0..o {
                        let src = &yd[c * n * hw + b * hw..c * n * hw + (b + 1) * hw];
                        data[(b * o + c) * hw..(b * o + c + 1) * hw].copy_from_slice(src);
                    }
                }
                Tensor::new(out.clone(), data).expect("nchw shape")
            }
            None => self
                .product
                .cpu(inputs[0], &cols, inputs.get(2).copied(), out),
            Some(config) => crate::ops::matmul::MatMulPartial {
                product: self.product,
                config,
            }
            .cpu(&[inputs[0], &cols], out),
        }
    }
}

/// The input gradient of a convolution as one implicit GEMM: `col2im(w^T x dy)` with neither the
/// product `[C*kh*kw, N*Ho*Wo]` stored nor a `col2im` pass. The plan compiler makes it from a
/// `col2im` whose input is that product and has no other reader. Inputs: the weight
/// `[O, C*kh*kw]` and the output gradient `[O, N*Ho*Wo]`; output: the image `[N, C, H, W]`.
/// As a transposed convolution's forward, a per-channel `bias [C]` (a third input) and a relu
/// may follow in the GEMM's store (`exec::lower::bias_into_implicit_dgrad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImplicitDgrad {
    pub geom: ColGeometry,
    pub bias: bool,
    pub relu: bool,
}

impl ImplicitDgrad {
    /// The product `w^T x dy` it stands for.
    pub fn product() -> crate::ops::matmul::MatMul {
        crate::ops::matmul::MatMul {
            trans_a: true,
            ..Default::default()
        }
    }

    /// The GEMM it runs: M = C, N = batch*H*W, K = O*kh*kw.
    pub fn dims(&self, w: &Shape, out: &Shape) -> crate::ops::matmul::ProductDims {
        crate::ops::matmul::ProductDims {
            m: self.geom.channels,
            n: out.numel() / self.geom.channels.max(1),
            k: w.dims()[0] * self.geom.kernel.0 * self.geom.kernel.1,
            a_batch: Shape(vec![]),
            b_batch: Shape(vec![]),
            batch: Shape(vec![]),
        }
    }

    /// The product the kernel runs: [`Self::product`] with the bias per row (channel) and the
    /// relu after it where the node has them.
    pub fn gemm(&self) -> crate::ops::matmul::MatMul {
        crate::ops::matmul::MatMul {
            bias: match self.bias {
                true => crate::ops::matmul::Bias::Rows,
                false => crate::ops::matmul::Bias::None,
            },
            relu: self.relu,
            ..Self::product()
        }
    }

    /// CPU reference: the product, then `col2im`, then the bias and the relu.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let (w, dy) = (inputs[0], inputs[1]);
        let mm = Self::product();
        let cols_shape = mm
            .infer(w.shape(), dy.shape())
            .expect("checked when lowered");
        let cols = mm.cpu(w, dy, None, &cols_shape);
        let mut y = self.geom.col2im_cpu(&cols, out);
        if self.bias || self.relu {
            let hw = self.geom.image.0 * self.geom.image.1;
            let c = self.geom.channels;
            for (i, v) in y.data_mut().iter_mut().enumerate() {
                if self.bias {
                    *v += inputs[2].data()[i / hw % c];
                }
                if self.relu {
                    *v = v.max(0.0);
                }
            }
        }
        y
    }
}

/// Which product of a grouped convolution a [`GroupedConv2d`] node computes. All three are
/// bilinear in their two inputs, so each one's gradients are the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvPass {
    /// Inputs `x [N, C, H, W]` and `w [O, C/G, kh, kw]`; output `y [N, O, Ho, Wo]`.
    Forward,
    /// Inputs `dy [N, O, Ho, Wo]` and `w`; output `dx [N, C, H, W]`.
    InputGrad,
    /// Inputs `x` and `dy`; output `dw [O, C/G, kh, kw]`.
    WeightGrad,
}

/// A convolution in `groups` groups (`torch.nn.functional.conv2d(.., groups=G)`): input
/// channels `c` of group `g = c / (C/G)` meet the output channels `g*O/G .. (g+1)*O/G` only;
/// `G = C` with `O = m*C` is a depthwise convolution (channel multiplier `m`). Runs as direct
/// kernels (`shaders/conv.wgsl` `grouped_conv*`), not as GEMMs: a group's product is small
/// (`O/G` rows, `C/G*kh*kw` deep) where the weights are few, and the implicit GEMM would be
/// `G` thin products. `groups = 1` convolutions run as implicit GEMMs instead
/// (`Graph::conv2d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupedConv2d {
    /// The input image's channels C, extents, the kernel and the options.
    pub geom: ColGeometry,
    pub groups: usize,
    /// Output channels O.
    pub out_channels: usize,
    pub pass: ConvPass,
    /// The forward's relu, applied in its kernel after the bias (a third input `[O]` where
    /// there is one): a layer's bias and activation without a kernel of their own.
    pub relu: bool,
}

impl GroupedConv2d {
    /// Input channels per group, C / G.
    pub fn channels_per_group(&self) -> usize {
        self.geom.channels / self.groups
    }

    /// The weight's shape `[O, C/G, kh, kw]`.
    pub fn weight_shape(&self) -> Shape {
        let (kh, kw) = self.geom.kernel;
        Shape(vec![self.out_channels, self.channels_per_group(), kh, kw])
    }

    /// The output's shape `[N, O, Ho, Wo]` for a batch of `n`.
    pub fn output_shape(&self, n: usize) -> Shape {
        let (ho, wo) = self.geom.out_hw();
        Shape(vec![n, self.out_channels, ho, wo])
    }

    /// The same convolution computing `pass` (without an activation).
    pub fn with_pass(&self, pass: ConvPass) -> GroupedConv2d {
        GroupedConv2d {
            pass,
            relu: false,
            ..*self
        }
    }

    /// Checks the grouped convolution of `x [N, C, H, W]` with `w [O, C/G, kh, kw]` (and a
    /// bias `[O]`): `G` divides C and O.
    pub fn new(
        x: &Shape,
        w: &Shape,
        bias: Option<&Shape>,
        opts: Conv2dOpts,
        groups: usize,
    ) -> Result<GroupedConv2d> {
        let op = "conv2d";
        let what = format!("input {x}, weight {w} and {groups} groups");
        if x.rank() != 4 || w.rank() != 4 {
            return Err(shape_err(
                op,
                format!("{what}: input (N, C, H, W) and weight (O, C/groups, kh, kw) have rank 4"),
            ));
        }
        let (c, o) = (x.dims()[1], w.dims()[0]);
        if groups == 0 || !c.is_multiple_of(groups) || !o.is_multiple_of(groups) {
            return Err(shape_err(
                op,
                format!("{what}: the groups must divide the input channels {c} and the output channels {o}"),
            ));
        }
        if w.dims()[1] != c / groups {
            return Err(shape_err(
                op,
                format!(
                    "{what}: the weight must have {} = {c} / {groups} input channels, it has {}",
                    c / groups,
                    w.dims()[1]
                ),
            ));
        }
        if let Some(b) = bias {
            if b.dims() != [o] {
                return Err(shape_err(
                    op,
                    format!("weight {w} and bias {b}: the bias must have shape [{o}]"),
                ));
            }
        }
        let geom = ColGeometry {
            channels: c,
            image: (x.dims()[2], x.dims()[3]),
            kernel: (w.dims()[2], w.dims()[3]),
            opts,
        };
        geom.check(op, &what)?;
        Ok(GroupedConv2d {
            geom,
            groups,
            out_channels: o,
            pass: ConvPass::Forward,
            relu: false,
        })
    }

    /// The expected shapes of the two inputs and the output of this pass, for a batch of `n`.
    fn shapes(&self, n: usize) -> [Shape; 3] {
        let (x, w, y) = (
            self.geom.image_shape(n),
            self.weight_shape(),
            self.output_shape(n),
        );
        match self.pass {
            ConvPass::Forward => [x, w, y],
            ConvPass::InputGrad => [y, w, x],
            ConvPass::WeightGrad => [x, y, w],
        }
    }

    /// Shape rule: the inputs must be this pass's operands (the batch from the first), and a
    /// forward's bias, where there is one, `[O]`.
    pub fn infer(&self, a: &Shape, b: &Shape, bias: Option<&Shape>) -> Result<Shape> {
        let n = a.dims().first().copied().unwrap_or(0);
        let [wa, wb, out] = self.shapes(n);
        if a != &wa || b != &wb {
            return Err(shape_err(
                self.name(),
                format!("operands {a} and {b}: expected {wa} and {wb}"),
            ));
        }
        if let Some(s) = bias {
            if self.pass != ConvPass::Forward || s.dims() != [self.out_channels] {
                return Err(shape_err(
                    self.name(),
                    format!(
                        "bias {s}: only the forward takes one, [{}]",
                        self.out_channels
                    ),
                ));
            }
        }
        if self.relu && self.pass != ConvPass::Forward {
            return Err(shape_err(self.name(), "only the forward applies a relu"));
        }
        Ok(out)
    }

    /// The op's name in errors and plans.
    pub fn name(&self) -> &'static str {
        match self.pass {
            ConvPass::Forward => "grouped_conv2d",
            ConvPass::InputGrad => "grouped_conv2d_input_grad",
            ConvPass::WeightGrad => "grouped_conv2d_weight_grad",
        }
    }

    /// The batch size of this pass's inputs.
    fn batch(a: &Shape) -> usize {
        a.dims()[0]
    }

    /// CPU reference of every pass: each (output element, input channel of its group, tap)
    /// product added up in f64 where the pass's output keeps it; then the forward's bias (the
    /// third input, where there is one) and relu.
    pub fn cpu(&self, inputs: &[&Tensor], out: &Shape) -> Tensor {
        let (a, b) = (inputs[0], inputs[1]);
        let n = Self::batch(a.shape());
        let (c, (h, w), (kh, kw)) = (self.geom.channels, self.geom.image, self.geom.kernel);
        let (ho, wo) = self.geom.out_hw();
        let (oc, cg) = (self.out_channels, self.channels_per_group());
        let og = oc / self.groups;
        let o = &self.geom.opts;
        let mut acc = vec![0f64; out.numel()];
        let (ad, bd) = (a.data(), b.data());
        for bn in 0..n {
            for f in 0..oc {
                let grp = f / og;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let yi = ((bn * oc + f) * ho + oh) * wo + ow;
                        for ci in 0..cg {
                            let ch = grp * cg + ci;
                            for i in 0..kh {
                                let Some(ih) = ColGeometry::source(
                                    oh,
                                    i,
                                    o.stride.0,
                                    o.padding.0,
                                    o.dilation.0,
                                    h,
                                ) else {
                                    continue;
                                };
                                for j in 0..kw {
                                    let Some(iw) = ColGeometry::source(
                                        ow,
                                        j,
                                        o.stride.1,
                                        o.padding.1,
                                        o.dilation.1,
                                        w,
                                    ) else {
                                        continue;
                                    };
                                    let xi = ((bn * c + ch) * h + ih) * w + iw;
                                    let wi = ((f * cg + ci) * kh + i) * kw + j;
                                    match self.pass {
                                        ConvPass::Forward => {
                                            acc[yi] += ad[xi] as f64 * bd[wi] as f64
                                        }
                                        ConvPass::InputGrad => {
                                            acc[xi] += ad[yi] as f64 * bd[wi] as f64
                                        }
                                        ConvPass::WeightGrad => {
                                            acc[wi] += ad[xi] as f64 * bd[yi] as f64
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let plane = ho * wo;
        let data = acc
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v + inputs
                    .get(2)
                    .map_or(0.0, |b| f64::from(b.data()[i / plane % oc]));
                let v = v as f32;
                if self.relu {
                    v.max(0.0)
                } else {
                    v
                }
            })
            .collect();
        Tensor::new(out.clone(), data).expect("grouped conv2d shape")
    }

    /// Multiply-adds of every pass: one per (output element, input channel of its group, tap),
    /// padding included.
    pub fn flops(&self, n: usize) -> f64 {
        let (kh, kw) = self.geom.kernel;
        2.0 * (self.output_shape(n).numel() * self.channels_per_group() * kh * kw) as f64
    }

    /// Kernel of this pass: one thread per output element (forward, input gradient), a
    /// workgroup of 256 per four taps of a kernel row summing over the batch and positions
    /// (weight gradient).
    pub fn kernel(&self, inputs: &[&Shape], out: &Shape) -> KernelSpec {
        let mut constants = self.geom.constants(Self::batch(inputs[0]));
        constants.push(("G", self.groups as f64));
        constants.push(("O", self.out_channels as f64));
        constants.push(("RELU", self.relu as u8 as f64));
        let (entry, workgroups) = match self.pass {
            ConvPass::Forward if inputs.len() == 3 => {
                ("grouped_conv_bias", groups(out.numel(), 256))
            }
            ConvPass::Forward => ("grouped_conv", groups(out.numel(), 256)),
            ConvPass::InputGrad => ("grouped_conv_input_grad", groups(out.numel(), 256)),
            // a workgroup per block of 4 taps of a kernel row (`TAPS` in the shader)
            ConvPass::WeightGrad => {
                let (kh, kw) = self.geom.kernel;
                let rows = self.out_channels * self.channels_per_group() * kh;
                ("grouped_conv_weight_grad", (rows * kw.div_ceil(4)) as u64)
            }
        };
        KernelSpec {
            family: "conv",
            entry,
            constants,
            workgroups,
        }
    }

    /// Backward: the gradients of this pass's inputs from the gradient `dy` of its output `y`
    /// (each pass is bilinear: its adjoints are the other two passes; a forward's relu masks
    /// `dy` by the output's sign first, and its bias takes the sum of the masked gradient).
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        y: NodeId,
        dy: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        let (a, b) = (x[0], x[1]);
        let run = |pass: ConvPass, p: NodeId, q: NodeId| {
            g.grouped_conv_pass(self.with_pass(pass), p, q, None)
        };
        // relu(z) > 0 exactly where z > 0, so the output decides the mask
        let dz = match self.relu {
            true => g.binary(super::binary::BinaryOp::ReluGrad, dy, y)?,
            false => dy,
        };
        Ok(match self.pass {
            // y = x * w (+ bias): dx = conv^T(dy, w), dw = dW(x, dy), dbias = sum of dy
            ConvPass::Forward => {
                let mut grads = vec![
                    Some(run(ConvPass::InputGrad, dz, b)?),
                    Some(run(ConvPass::WeightGrad, a, dz)?),
                ];
                if x.len() == 3 {
                    let o = self.out_channels;
                    let sums = g.sum_to(dz, &Shape(vec![o, 1, 1]))?;
                    grads.push(Some(g.reshape(sums, &[o as isize])?));
                }
                grads
            }
            // dx = conv^T(dy, w): d(dy) = conv(ddx, w), dw = dW(ddx, dy)
            ConvPass::InputGrad => vec![
                Some(run(ConvPass::Forward, dz, b)?),
                Some(run(ConvPass::WeightGrad, dz, a)?),
            ],
            // dw = dW(x, dy): dx = conv^T(dy, ddw), d(dy) = conv(x, ddw)
            ConvPass::WeightGrad => vec![
                Some(run(ConvPass::InputGrad, b, dz)?),
                Some(run(ConvPass::Forward, a, dz)?),
            ],
        })
    }
}

/// Stride, padding, output padding and dilation of a transposed convolution, each as (height,
/// width) (`torch.nn.functional.conv_transpose2d`'s arguments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTranspose2dOpts {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    /// Rows and columns added at the bottom and right of the output (less than the stride):
    /// which of the input extents a strided convolution maps to the same output the
    /// transposed one gives back.
    pub output_padding: (usize, usize),
    pub dilation: (usize, usize),
}

impl Default for ConvTranspose2dOpts {
    /// Stride 1, no padding, no output padding, dilation 1.
    fn default() -> Self {
        ConvTranspose2dOpts {
            stride: (1, 1),
            padding: (0, 0),
            output_padding: (0, 0),
            dilation: (1, 1),
        }
    }
}

/// The transposed convolution of `x [N, Cin, H, W]` with `w [Cin, Cout/G, kh, kw]` in `groups`
/// groups: the adjoint of the convolution of an image `[N, Cout, Ho, Wo]` with that weight
/// (`Ho = (H - 1)*sh - 2*ph + dh*(kh - 1) + oph + 1`), as the geometry of that convolution and
/// the grouped pass that computes it (the convolution's input gradient). Checks the operands.
pub fn conv_transpose2d_geometry(
    x: &Shape,
    w: &Shape,
    bias: Option<&Shape>,
    opts: ConvTranspose2dOpts,
    groups: usize,
) -> Result<GroupedConv2d> {
    let op = "conv_transpose2d";
    let what = format!("input {x}, weight {w} and {groups} groups");
    if x.rank() != 4 || w.rank() != 4 {
        return Err(shape_err(
            op,
            format!(
                "{what}: input (N, Cin, H, W) and weight (Cin, Cout/groups, kh, kw) have rank 4"
            ),
        ));
    }
    let (cin, h, wd) = (x.dims()[1], x.dims()[2], x.dims()[3]);
    if w.dims()[0] != cin {
        return Err(shape_err(
            op,
            format!(
                "{what}: the weight must have {cin} input channels, it has {}",
                w.dims()[0]
            ),
        ));
    }
    if groups == 0 || !cin.is_multiple_of(groups) {
        return Err(shape_err(
            op,
            format!("{what}: the groups must divide the input channels {cin}"),
        ));
    }
    let cout = w.dims()[1] * groups;
    if let Some(b) = bias {
        if b.dims() != [cout] {
            return Err(shape_err(
                op,
                format!("weight {w} and bias {b}: the bias must have shape [{cout}]"),
            ));
        }
    }
    let (s, p, o, d) = (
        opts.stride,
        opts.padding,
        opts.output_padding,
        opts.dilation,
    );
    if s.0 == 0 || s.1 == 0 || d.0 == 0 || d.1 == 0 || w.dims()[2] == 0 || w.dims()[3] == 0 {
        return Err(shape_err(
            op,
            format!("{what}: stride {s:?}, dilation {d:?} and kernel must be positive"),
        ));
    }
    if o.0 >= s.0 || o.1 >= s.1 {
        return Err(shape_err(
            op,
            format!("{what}: output padding {o:?} must be smaller than the stride {s:?}"),
        ));
    }
    if h == 0 || wd == 0 {
        return Err(shape_err(
            op,
            format!("{what}: the input's extents must be positive"),
        ));
    }
    let (kh, kw) = (w.dims()[2], w.dims()[3]);
    let full =
        |len: usize, s: usize, d: usize, k: usize, o: usize| (len - 1) * s + d * (k - 1) + o + 1;
    let (fh, fw) = (full(h, s.0, d.0, kh, o.0), full(wd, s.1, d.1, kw, o.1));
    if fh <= 2 * p.0 || fw <= 2 * p.1 {
        return Err(shape_err(
            op,
            format!("{what}: padding {p:?} leaves no output of the {fh}x{fw} the kernel covers"),
        ));
    }
    let geom = ColGeometry {
        channels: cout,
        image: (fh - 2 * p.0, fw - 2 * p.1),
        kernel: (kh, kw),
        opts: Conv2dOpts {
            stride: s,
            padding: p,
            dilation: d,
        },
    };
    geom.check(op, &what)?;
    debug_assert_eq!(geom.out_hw(), (h, wd), "output padding below the stride");
    Ok(GroupedConv2d {
        geom,
        groups,
        out_channels: cin,
        pass: ConvPass::InputGrad,
        relu: false,
    })
}
