//! Layers with PyTorch parameter names and layouts: `Linear` (weight `[out, in]`), `Conv2d`
//! (weight `[O, C, kh, kw]`), dropout. A layer names its parameters `<name>.weight` and
//! `<name>.bias`, creates them with PyTorch's default initialisation the first time, and can be
//! applied in several graphs (a training and an evaluation graph share its parameters on the device).

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::ops::conv::Conv2dOpts;
use crate::ops::matmul::Bias;
use crate::tensor::Tensor;

/// A fully connected layer, `y = x W^T + b`, `x (N, in) -> y (N, out)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    weight_init: crate::Tensor,
    bias_init: crate::Tensor,
}

impl Linear {
    /// A layer named `name` (parameters `name.weight [out, in]`, `name.bias [out]`).
    pub fn new(name: &str, in_features: usize, out_features: usize, init: &mut Init) -> Linear {
        Linear {
            name: name.to_string(),
            in_features,
            out_features,
            weight_init: init.torch_default([out_features, in_features], in_features),
            bias_init: init.torch_default([out_features], in_features),
        }
    }

    /// [`Linear::new`] with a zero bias (torch's `MultiheadAttention.out_proj`).
    pub fn with_zero_bias(
        name: &str,
        in_features: usize,
        out_features: usize,
        init: &mut Init,
    ) -> Linear {
        let mut l = Linear::new(name, in_features, out_features, init);
        l.bias_init = crate::Tensor::zeros([out_features]);
        l
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        weight_and_bias_names(&self.name)
    }

    /// Applies the layer in `g`; returns the output and the parameter nodes `[weight, bias]`.
    /// The product runs in `x`'s element type: for an f16 `x` the (f32) parameters are cast to
    /// f16 in the graph, as under PyTorch's autocast, and their gradients come back f32.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        self.apply_with(g, x, false)
    }

    /// `relu(apply(x))` as one kernel (bias and relu in the matmul's epilogue).
    pub fn apply_relu(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        self.apply_with(g, x, true)
    }

    fn apply_with(&self, g: &Graph, x: NodeId, relu: bool) -> Result<(NodeId, [NodeId; 2])> {
        let ([w, b], [wc, bc]) = weight_and_bias(
            g,
            &self.name,
            &self.weight_init,
            &self.bias_init,
            g.dtype(x),
        )?;
        let y = g.matmul_fused(x, wc, false, true, Some((bc, Bias::Cols)), relu)?;
        Ok((y, [w, b]))
    }
}

/// A 2-D convolution over `(N, C, H, W)`, weight `[O, C / groups, kh, kw]`, bias `[O]`
/// (`torch.nn.Conv2d`); `apply_relu` runs the bias and relu in the convolution's kernel.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub name: String,
    pub opts: Conv2dOpts,
    /// Channel groups (1: every output channel reads every input channel; `in_channels`:
    /// depthwise).
    pub groups: usize,
    weight_init: crate::Tensor,
    bias_init: crate::Tensor,
}

impl Conv2d {
    /// A layer named `name` with `out` filters of `kernel` over `in_channels` channels.
    pub fn new(
        name: &str,
        in_channels: usize,
        out: usize,
        kernel: (usize, usize),
        opts: Conv2dOpts,
        init: &mut Init,
    ) -> Conv2d {
        let fan_in = in_channels * kernel.0 * kernel.1;
        Conv2d {
            name: name.to_string(),
            opts,
            groups: 1,
            weight_init: init.torch_default([out, in_channels, kernel.0, kernel.1], fan_in),
            bias_init: init.torch_default([out], fan_in),
        }
    }

    /// A layer of `out` filters over `in_channels` channels in `groups` groups
    /// (`torch.nn.Conv2d(.., groups=G)`: weight `[out, in_channels / G, kh, kw]`, torch's
    /// initialisation from that fan-in); `groups = in_channels` is a depthwise convolution.
    /// The groups must divide both channel counts.
    pub fn grouped(
        name: &str,
        in_channels: usize,
        out: usize,
        kernel: (usize, usize),
        opts: Conv2dOpts,
        groups: usize,
        init: &mut Init,
    ) -> Result<Conv2d> {
        check_groups("Conv2d", name, groups, in_channels, out)?;
        let cg = in_channels / groups;
        let fan_in = cg * kernel.0 * kernel.1;
        Ok(Conv2d {
            name: name.to_string(),
            opts,
            groups,
            weight_init: init.torch_default([out, cg, kernel.0, kernel.1], fan_in),
            bias_init: init.torch_default([out], fan_in),
        })
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        weight_and_bias_names(&self.name)
    }

    /// Applies the layer in `g`; returns the output and the parameter nodes `[weight, bias]`.
    /// Like [`Linear::apply`], it runs in `x`'s element type (f32 parameters cast for f16).
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        self.apply_with(g, x, false)
    }

    /// `relu(apply(x))`, the bias and relu fused into the convolution's matmul.
    pub fn apply_relu(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        self.apply_with(g, x, true)
    }

    fn apply_with(&self, g: &Graph, x: NodeId, relu: bool) -> Result<(NodeId, [NodeId; 2])> {
        let ([w, b], [wc, bc]) = weight_and_bias(
            g,
            &self.name,
            &self.weight_init,
            &self.bias_init,
            g.dtype(x),
        )?;
        let y = g.conv2d_grouped_fused(x, wc, Some(bc), self.opts, self.groups, relu)?;
        Ok((y, [w, b]))
    }
}

/// A 1-D convolution over `(N, C, L)` (`torch.nn.Conv1d`): weight `[O, C / groups, k]`, bias
/// `[O]`, torch's initialisation (fan-in `C / groups * k`); runs as [`Graph::conv1d`].
#[derive(Debug, Clone)]
pub struct Conv1d {
    pub name: String,
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
    weight_init: crate::Tensor,
    bias_init: crate::Tensor,
}

impl Conv1d {
    /// A layer named `name` of `out` filters of width `kernel` over `in_channels` channels in
    /// `groups` groups (1: dense), with `stride`, `padding` and `dilation` (torch's order);
    /// the groups must divide both channel counts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        in_channels: usize,
        out: usize,
        kernel: usize,
        (stride, padding, dilation): (usize, usize, usize),
        groups: usize,
        init: &mut Init,
    ) -> Result<Conv1d> {
        check_groups("Conv1d", name, groups, in_channels, out)?;
        let cg = in_channels / groups;
        let fan_in = cg * kernel;
        Ok(Conv1d {
            name: name.to_string(),
            stride,
            padding,
            dilation,
            groups,
            weight_init: init.torch_default([out, cg, kernel], fan_in),
            bias_init: init.torch_default([out], fan_in),
        })
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        weight_and_bias_names(&self.name)
    }

    /// Applies the layer in `g`; returns the output `(N, O, Lo)` and the parameter nodes
    /// `[weight, bias]`. Runs in `x`'s element type (f32 parameters cast for f16).
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        let ([w, b], [wc, bc]) = weight_and_bias(
            g,
            &self.name,
            &self.weight_init,
            &self.bias_init,
            g.dtype(x),
        )?;
        let y = g.conv1d(
            x,
            wc,
            Some(bc),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )?;
        Ok((y, [w, b]))
    }
}

impl Layer for Conv1d {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// A transposed 2-D convolution over `(N, Cin, H, W)` (`torch.nn.ConvTranspose2d`): weight
/// `[Cin, Cout / groups, kh, kw]`, bias `[Cout]`, torch's initialisation (fan-in
/// `Cout / groups * kh * kw`, as torch computes it from the weight's second axis).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    pub name: String,
    pub opts: crate::ops::conv::ConvTranspose2dOpts,
    pub groups: usize,
    weight_init: crate::Tensor,
    bias_init: crate::Tensor,
}

impl ConvTranspose2d {
    /// A layer named `name` mapping `in_channels` to `out` channels through `kernel` in
    /// `groups` groups (1 for a dense one); the groups must divide both channel counts.
    pub fn new(
        name: &str,
        in_channels: usize,
        out: usize,
        kernel: (usize, usize),
        opts: crate::ops::conv::ConvTranspose2dOpts,
        groups: usize,
        init: &mut Init,
    ) -> Result<ConvTranspose2d> {
        check_groups("ConvTranspose2d", name, groups, in_channels, out)?;
        let og = out / groups;
        let fan_in = og * kernel.0 * kernel.1;
        Ok(ConvTranspose2d {
            name: name.to_string(),
            opts,
            groups,
            weight_init: init.torch_default([in_channels, og, kernel.0, kernel.1], fan_in),
            bias_init: init.torch_default([out], fan_in),
        })
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        weight_and_bias_names(&self.name)
    }

    /// Applies the layer in `g`; returns the output and the parameter nodes `[weight, bias]`.
    /// Runs in `x`'s element type (f32 parameters cast for f16).
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        let ([w, b], [wc, bc]) = weight_and_bias(
            g,
            &self.name,
            &self.weight_init,
            &self.bias_init,
            g.dtype(x),
        )?;
        let y = g.conv_transpose2d(x, wc, Some(bc), self.opts, self.groups)?;
        Ok((y, [w, b]))
    }
}

impl Layer for ConvTranspose2d {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// Dropout in training mode with the graph's shared seed input `dropout.seed` (created on first
/// use); feed it a new whole number every step (`nn::TrainStep` does). `salt` must differ
/// between the dropout layers of one graph.
pub fn dropout(g: &Graph, x: NodeId, p: f32, salt: u32) -> Result<NodeId> {
    g.dropout(x, p, dropout_seed(g), salt)
}

/// The graph's shared dropout seed input `dropout.seed` `[1]`, created on first use.
pub fn dropout_seed(g: &Graph) -> NodeId {
    g.find_input(DROPOUT_SEED)
        .unwrap_or_else(|| g.input(DROPOUT_SEED, [1]))
}

/// Name of the seed input that `dropout` layers share.
pub const DROPOUT_SEED: &str = "dropout.seed";

/// Anything that maps one tensor to another inside a graph, with named parameters.
pub trait Layer {
    /// Applies the layer in a training (`train`) or evaluation graph; returns the output and the
    /// trainable parameter nodes it used. Most layers act alike in both; batch norm does not.
    fn apply_layer(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)>;
    /// The layer followed by relu; layers that can fuse the relu into their kernel override it.
    fn apply_layer_relu(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        let (y, p) = self.apply_layer(g, x, train)?;
        Ok((g.relu(y)?, p))
    }
    /// Names of its parameters, as in a PyTorch state_dict.
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `torch.nn.PReLU(num_parameters, init)`: a learnable negative slope, one shared or one per
/// channel, parameter `<name>.weight (num_parameters)` starting at `init` (torch's 0.25).
#[derive(Debug, Clone)]
pub struct PRelu {
    pub name: String,
    weight_init: Tensor,
}

impl PRelu {
    /// `num_parameters` slopes (1, or the input's channels), each starting at `init`.
    pub fn new(name: &str, num_parameters: usize, init: f32) -> Self {
        PRelu {
            name: name.to_string(),
            weight_init: Tensor::full([num_parameters.max(1)], init),
        }
    }

    pub fn param_names(&self) -> Vec<String> {
        vec![format!("{}.weight", self.name)]
    }

    /// `x (N, C, ..)` (or `(C)`) -> the same shape ([`Graph::prelu`]); returns the output and
    /// the weight node.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, NodeId)> {
        let w = g.param_init(&format!("{}.weight", self.name), self.weight_init.clone());
        Ok((g.prelu(x, w)?, w))
    }
}

impl Layer for PRelu {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x).map(|(y, w)| (y, vec![w]))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

impl Layer for Linear {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn apply_layer_relu(
        &self,
        g: &Graph,
        x: NodeId,
        _train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply_relu(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

impl Layer for Conv2d {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn apply_layer_relu(
        &self,
        g: &Graph,
        x: NodeId,
        _train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply_relu(g, x).map(|(y, p)| (y, p.to_vec()))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// A parameter-free step of a [`Sequential`]: an activation, pooling, flatten or dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    Relu,
    Sigmoid,
    Tanh,
    Gelu,
    /// GELU's tanh approximation (`torch.nn.GELU(approximate="tanh")`).
    GeluTanh,
    /// `x * sigmoid(x)` (`torch.nn.SiLU`).
    Silu,
    /// `torch.nn.LeakyReLU(negative_slope)`.
    LeakyRelu(f32),
    /// `torch.nn.ELU(alpha)`.
    Elu(f32),
    /// `torch.nn.SELU`.
    Selu,
    /// `torch.nn.ReLU6` (MobileNetV2's).
    Relu6,
    /// `torch.nn.Hardsigmoid`.
    Hardsigmoid,
    /// `torch.nn.Hardswish` (MobileNetV3's).
    Hardswish,
    /// `torch.nn.Mish`.
    Mish,
    /// `torch.nn.Softsign`.
    Softsign,
    /// `torch.nn.LogSigmoid`.
    LogSigmoid,
    Flatten,
    /// Max pooling with kernel = stride.
    MaxPool(usize),
    /// Average pooling with kernel = stride (`torch.nn.AvgPool2d(k)`).
    AvgPool(usize),
    /// Adaptive max pooling to (Ho, Wo) (`torch.nn.AdaptiveMaxPool2d`).
    AdaptiveMaxPool(usize, usize),
    /// Adaptive average pooling to (Ho, Wo) (`torch.nn.AdaptiveAvgPool2d`; `(1, 1)`: global).
    AdaptiveAvgPool(usize, usize),
    /// Upsampling by an integer factor (`torch.nn.Upsample(scale_factor=s, mode=..)`:
    /// [`Graph::interpolate`] to `(H*s, W*s)`).
    Upsample(usize, crate::ops::resize::ResizeMode),
    /// `torch.nn.PixelShuffle(r)`: `(N, C r^2, H, W)` -> `(N, C, H r, W r)`.
    PixelShuffle(usize),
    /// Dropout with this probability in training graphs, identity in evaluation graphs; the `u32`
    /// is its salt (distinct per dropout layer).
    Dropout(f32, u32),
}

/// A chain of layers applied in order (`torch.nn.Sequential`), built for training (dropout on)
/// or evaluation (dropout off).
#[derive(Default)]
pub struct Sequential {
    steps: Vec<Step>,
}

enum Step {
    Layer(Box<dyn Layer>),
    Act(Act),
}

impl Sequential {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends a layer with parameters.
    pub fn layer(mut self, l: impl Layer + 'static) -> Self {
        self.steps.push(Step::Layer(Box::new(l)));
        self
    }
    /// Appends a parameter-free step.
    pub fn act(mut self, a: Act) -> Self {
        self.steps.push(Step::Act(a));
        self
    }
    /// Every parameter name, in order.
    pub fn param_names(&self) -> Vec<String> {
        self.steps
            .iter()
            .flat_map(|s| match s {
                Step::Layer(l) => l.names(),
                Step::Act(_) => Vec::new(),
            })
            .collect()
    }
    /// Applies the chain; `train` turns dropout on and makes batch norms use (and update) the
    /// batch's statistics. Returns the output and the trainable parameter nodes.
    pub fn apply(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        let mut h = x;
        let mut params = Vec::new();
        let mut steps = self.steps.iter().peekable();
        while let Some(s) = steps.next() {
            h = match s {
                // a layer followed by relu runs as one kernel where the layer can fuse it
                Step::Layer(l) if matches!(steps.peek(), Some(Step::Act(Act::Relu))) => {
                    steps.next();
                    let (y, p) = l.apply_layer_relu(g, h, train)?;
                    params.extend(p);
                    y
                }
                Step::Layer(l) => {
                    let (y, p) = l.apply_layer(g, h, train)?;
                    params.extend(p);
                    y
                }
                Step::Act(Act::Relu) => g.relu(h)?,
                Step::Act(Act::Sigmoid) => g.sigmoid(h)?,
                Step::Act(Act::Tanh) => g.tanh(h)?,
                Step::Act(Act::Gelu) => g.gelu(h)?,
                Step::Act(Act::GeluTanh) => g.gelu_tanh(h)?,
                Step::Act(Act::Softsign) => g.softsign(h)?,
                Step::Act(Act::LogSigmoid) => g.log_sigmoid(h)?,
                Step::Act(Act::Silu) => g.silu(h)?,
                Step::Act(Act::LeakyRelu(s)) => g.leaky_relu(h, *s)?,
                Step::Act(Act::Elu(a)) => g.elu(h, *a)?,
                Step::Act(Act::Selu) => g.selu(h)?,
                Step::Act(Act::Relu6) => g.relu6(h)?,
                Step::Act(Act::Hardsigmoid) => g.hardsigmoid(h)?,
                Step::Act(Act::Hardswish) => g.hardswish(h)?,
                Step::Act(Act::Mish) => g.mish(h)?,
                Step::Act(Act::Flatten) => g.flatten(h)?,
                Step::Act(Act::PixelShuffle(r)) => g.pixel_shuffle(h, *r)?,
                Step::Act(Act::MaxPool(k)) => g.max_pool2d(h, (*k, *k), (*k, *k), (0, 0))?,
                Step::Act(Act::AvgPool(k)) => g.avg_pool2d(h, (*k, *k), (*k, *k), (0, 0))?,
                Step::Act(Act::AdaptiveAvgPool(ho, wo)) => g.adaptive_avg_pool2d(h, (*ho, *wo))?,
                Step::Act(Act::AdaptiveMaxPool(ho, wo)) => g.adaptive_max_pool2d(h, (*ho, *wo))?,
                Step::Act(Act::Upsample(s, mode)) => {
                    let d = g.shape(h);
                    if d.rank() != 4 {
                        return Err(crate::error::shape_err(
                            "Upsample",
                            format!("input {d}: expected rank 4 (N, C, H, W)"),
                        ));
                    }
                    g.interpolate(h, (d.dims()[2] * s, d.dims()[3] * s), *mode)?
                }
                Step::Act(Act::Dropout(p, salt)) if train => dropout(g, h, *p, *salt)?,
                Step::Act(Act::Dropout(..)) => h,
            };
        }
        Ok((h, params))
    }
}

/// A layer's `weight` and `bias` parameters (created from their initial values where the device
/// has none yet) and their casts to `dtype`, the activations' type (no-ops in f32):
/// `([weight, bias], [weight as dtype, bias as dtype])`.
fn weight_and_bias(
    g: &Graph,
    name: &str,
    weight_init: &crate::Tensor,
    bias_init: &crate::Tensor,
    dtype: crate::DType,
) -> Result<([NodeId; 2], [NodeId; 2])> {
    let w = g.param_init(&format!("{name}.weight"), weight_init.clone());
    let b = g.param_init(&format!("{name}.bias"), bias_init.clone());
    Ok(([w, b], [g.cast(w, dtype)?, g.cast(b, dtype)?]))
}

/// `<name>.weight` and `<name>.bias`, as in a PyTorch state_dict.
fn weight_and_bias_names(name: &str) -> Vec<String> {
    vec![format!("{name}.weight"), format!("{name}.bias")]
}

/// Checks that `groups` divides both channel counts of the `layer` (its torch class) `name`.
fn check_groups(
    layer: &'static str,
    name: &str,
    groups: usize,
    in_channels: usize,
    out: usize,
) -> Result<()> {
    if groups == 0 || !in_channels.is_multiple_of(groups) || !out.is_multiple_of(groups) {
        return Err(crate::error::shape_err(
            layer,
            format!(
                "{name}: {groups} groups must divide the input channels {in_channels} and the \
                 output channels {out}"
            ),
        ));
    }
    Ok(())
}
