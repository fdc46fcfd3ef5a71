//! Normalization layers with PyTorch's names, defaults and state: [`BatchNorm`]
//! (`torch.nn.BatchNorm1d` / `BatchNorm2d` / `BatchNorm3d`: one type, any `(N, C, *)` input),
//! [`LayerNorm`] and [`GroupNorm`] (with [`GroupNorm::instance`] for `InstanceNorm*d`). Their
//! arithmetic is `ops::norm`'s.
//!
//! A batch norm's state_dict names are PyTorch's: `<name>.weight`, `<name>.bias`,
//! `<name>.running_mean`, `<name>.running_var` (PyTorch's `num_batches_tracked` counter is not
//! kept: it only matters for `momentum=None`, and `load_state_dict` fills it in when absent).
//! The running statistics are parameters on the device that no optimizer touches: a training
//! graph moves them in place in the same submission as the step, an evaluation graph reads them.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::nn::layers::Layer;
use crate::ops::norm::RunningStats;
use crate::tensor::Tensor;

/// Batch normalization over axis 1 of `(N, C, *)`: `y = (x - mean) / sqrt(var + eps) * weight +
/// bias` per channel, with the batch's statistics in training graphs (which update the running
/// ones in place) and the running statistics in evaluation graphs.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    pub name: String,
    pub num_features: usize,
    /// Added to the variance (PyTorch's default 1e-5).
    pub eps: f32,
    /// Weight of the newest batch in the running statistics (default 0.1).
    pub momentum: f32,
    /// Learnable `weight` (ones) and `bias` (zeros) (default true).
    pub affine: bool,
    /// Keep running statistics (default true); without them evaluation graphs normalize with the
    /// batch's statistics too, as PyTorch does.
    pub track_running_stats: bool,
}

impl BatchNorm {
    /// `torch.nn.BatchNorm2d(num_features)` (or 1d / 3d: the input's rank decides) named `name`.
    pub fn new(name: &str, num_features: usize) -> BatchNorm {
        BatchNorm {
            name: name.to_string(),
            num_features,
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
            track_running_stats: true,
        }
    }

    /// The state_dict names: `weight`, `bias` (if affine), `running_mean`, `running_var` (if
    /// tracked), prefixed by the layer's name.
    pub fn param_names(&self) -> Vec<String> {
        let mut v = affine_names(&self.name, self.affine);
        if self.track_running_stats {
            v.extend(["running_mean", "running_var"].map(|s| format!("{}.{s}", self.name)));
        }
        v
    }

    /// Applies the layer to `x (N, C, *)` in training (`train`) or evaluation mode; returns the
    /// output (`x`'s shape and type) and the trainable parameters (`[weight, bias]`, or none).
    pub fn apply(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        let c = self.num_features;
        let param = |s: &str, t: Tensor| g.param_init(&format!("{}.{s}", self.name), t);
        let affine = affine_params(g, &self.name, self.affine, &[c]);
        let running = self.track_running_stats.then(|| RunningStats {
            mean: param("running_mean", Tensor::zeros([c])),
            var: param("running_var", Tensor::full([c], 1.0)),
            momentum: self.momentum,
        });
        let training = train || !self.track_running_stats;
        let y = g.batch_norm(x, affine, running, training, self.eps)?;
        Ok((y, affine.map(|(w, b)| vec![w, b]).unwrap_or_default()))
    }
}

impl Layer for BatchNorm {
    fn apply_layer(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x, train)
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// Layer normalization over the trailing `normalized_shape` axes (`torch.nn.LayerNorm`): each
/// leading index's values get mean 0 and variance 1, then an elementwise `weight` (ones) and
/// `bias` (zeros) of shape `normalized_shape`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub name: String,
    pub normalized_shape: Vec<usize>,
    /// Added to the variance (default 1e-5).
    pub eps: f32,
    /// Learnable `weight` and `bias` (default true).
    pub elementwise_affine: bool,
}

impl LayerNorm {
    /// `torch.nn.LayerNorm(normalized_shape)` named `name`.
    pub fn new(name: &str, normalized_shape: &[usize]) -> LayerNorm {
        LayerNorm {
            name: name.to_string(),
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
            elementwise_affine: true,
        }
    }

    /// `<name>.weight`, `<name>.bias` (if affine).
    pub fn param_names(&self) -> Vec<String> {
        affine_names(&self.name, self.elementwise_affine)
    }

    /// Applies the layer to `x (*, normalized_shape)`; returns the output and the trainable
    /// parameters. A shape error names `layer_norm` when `x` does not end in `normalized_shape`.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, Vec<NodeId>)> {
        let shape = self.normalized_shape.clone();
        let k = check_trailing(g, "layer_norm", x, &shape)?;
        let affine = affine_params(g, &self.name, self.elementwise_affine, &shape);
        let y = g.layer_norm(x, k, affine, self.eps)?;
        Ok((y, affine.map(|(w, b)| vec![w, b]).unwrap_or_default()))
    }
}

impl Layer for LayerNorm {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x)
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// Root-mean-square normalization over the trailing `normalized_shape` axes
/// (`torch.nn.RMSNorm`, as in LLaMA-style transformers): `x / sqrt(mean(x^2) + eps)`, then an
/// elementwise `weight` (ones) of shape `normalized_shape`; no bias, no mean subtracted.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub name: String,
    pub normalized_shape: Vec<usize>,
    /// Added to the mean square; `None` (torch's default) is the machine epsilon of the input's
    /// element type.
    pub eps: Option<f32>,
    /// A learnable `weight` (default true).
    pub elementwise_affine: bool,
}

impl RmsNorm {
    /// `torch.nn.RMSNorm(normalized_shape)` named `name`.
    pub fn new(name: &str, normalized_shape: &[usize]) -> RmsNorm {
        RmsNorm {
            name: name.to_string(),
            normalized_shape: normalized_shape.to_vec(),
            eps: None,
            elementwise_affine: true,
        }
    }

    /// `<name>.weight` (if affine).
    pub fn param_names(&self) -> Vec<String> {
        if self.elementwise_affine {
            vec![format!("{}.weight", self.name)]
        } else {
            Vec::new()
        }
    }

    /// Applies the layer to `x (*, normalized_shape)`; returns the output and the trainable
    /// parameters. A shape error names `rms_norm` when `x` does not end in `normalized_shape`.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, Vec<NodeId>)> {
        let shape = self.normalized_shape.clone();
        let k = check_trailing(g, "rms_norm", x, &shape)?;
        let w = self.elementwise_affine.then(|| {
            g.param_init(
                &format!("{}.weight", self.name),
                Tensor::full(shape.clone(), 1.0),
            )
        });
        let y = g.rms_norm(x, k, w, self.eps)?;
        Ok((y, w.into_iter().collect()))
    }
}

impl Layer for RmsNorm {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x)
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// Group normalization (`torch.nn.GroupNorm(num_groups, num_channels)`): each sample's channels
/// in `num_groups` groups normalized by the group's own statistics (in training and evaluation
/// alike), then a per-channel `weight` (ones) and `bias` (zeros).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub name: String,
    pub num_groups: usize,
    pub num_channels: usize,
    /// Added to the variance (default 1e-5).
    pub eps: f32,
    /// Learnable `weight` and `bias` (default true).
    pub affine: bool,
}

impl GroupNorm {
    /// `torch.nn.GroupNorm(num_groups, num_channels)` named `name`.
    pub fn new(name: &str, num_groups: usize, num_channels: usize) -> GroupNorm {
        GroupNorm {
            name: name.to_string(),
            num_groups,
            num_channels,
            eps: 1e-5,
            affine: true,
        }
    }

    /// `torch.nn.InstanceNorm2d(num_features)` (or 1d / 3d) without running statistics (PyTorch's
    /// default): a group per channel, no `weight` or `bias` (`affine` may be turned on).
    pub fn instance(name: &str, num_features: usize) -> GroupNorm {
        GroupNorm {
            affine: false,
            ..GroupNorm::new(name, num_features, num_features)
        }
    }

    /// `<name>.weight`, `<name>.bias` (if affine).
    pub fn param_names(&self) -> Vec<String> {
        affine_names(&self.name, self.affine)
    }

    /// Applies the layer to `x (N, num_channels, *)`; returns the output and the trainable
    /// parameters.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, Vec<NodeId>)> {
        let c = self.num_channels;
        let shape = g.check_id("group_norm", x)?;
        if shape.dims().get(1) != Some(&c) {
            return Err(crate::error::shape_err(
                "group_norm",
                format!("input {shape} does not have {c} channels (axis 1)"),
            ));
        }
        let affine = affine_params(g, &self.name, self.affine, &[c]);
        let y = g.group_norm(x, self.num_groups, affine, self.eps)?;
        Ok((y, affine.map(|(w, b)| vec![w, b]).unwrap_or_default()))
    }
}

impl Layer for GroupNorm {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x)
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// `<name>.weight` and `<name>.bias` where the layer is affine.
/// The number of `normalized` axes, after checking that `x` ends in them; else a shape error
/// naming `op`.
fn check_trailing(g: &Graph, op: &'static str, x: NodeId, normalized: &[usize]) -> Result<usize> {
    let dims = g.check_id(op, x)?.dims().to_vec();
    let k = normalized.len();
    if k == 0 || dims.len() < k || dims[dims.len() - k..] != normalized[..] {
        return Err(crate::error::shape_err(
            op,
            format!(
                "input {} does not end in the normalized shape {normalized:?}",
                g.shape(x)
            ),
        ));
    }
    Ok(k)
}

fn affine_names(name: &str, affine: bool) -> Vec<String> {
    if affine {
        vec![format!("{name}.weight"), format!("{name}.bias")]
    } else {
        Vec::new()
    }
}

/// The parameters `<name>.weight` (ones) and `<name>.bias` (zeros) of `shape` where the layer
/// is affine.
fn affine_params(g: &Graph, name: &str, affine: bool, shape: &[usize]) -> Option<(NodeId, NodeId)> {
    affine.then(|| {
        (
            g.param_init(&format!("{name}.weight"), Tensor::full(shape.to_vec(), 1.0)),
            g.param_init(&format!("{name}.bias"), Tensor::zeros(shape.to_vec())),
        )
    })
}
