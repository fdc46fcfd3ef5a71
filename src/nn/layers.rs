//! Layers with PyTorch parameter names and layouts: `Linear` (weight `[out, in]`), `Conv2d`
//! (weight `[O, C, kh, kw]`), dropout. A layer names its parameters `<name>.weight` and
//! `<name>.bias`, creates them with PyTorch's default initialisation the first time, and can be
//! applied in several graphs (a training and an evaluation graph share its parameters on the device).

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::ops::conv::Conv2dOpts;

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

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        vec![
            format!("{}.weight", self.name),
            format!("{}.bias", self.name),
        ]
    }

    /// Applies the layer in `g`; returns the output and the parameter nodes `[weight, bias]`.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        let w = g.param_init(&format!("{}.weight", self.name), self.weight_init.clone());
        let b = g.param_init(&format!("{}.bias", self.name), self.bias_init.clone());
        let y = g.add(g.matmul_t(x, w, false, true)?, b)?;
        Ok((y, [w, b]))
    }
}

/// A 2-D convolution over `(N, C, H, W)`, weight `[O, C, kh, kw]`, bias `[O]`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub name: String,
    pub opts: Conv2dOpts,
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
            weight_init: init.torch_default([out, in_channels, kernel.0, kernel.1], fan_in),
            bias_init: init.torch_default([out], fan_in),
        }
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        vec![
            format!("{}.weight", self.name),
            format!("{}.bias", self.name),
        ]
    }

    /// Applies the layer in `g`; returns the output and the parameter nodes `[weight, bias]`.
    pub fn apply(&self, g: &Graph, x: NodeId) -> Result<(NodeId, [NodeId; 2])> {
        let w = g.param_init(&format!("{}.weight", self.name), self.weight_init.clone());
        let b = g.param_init(&format!("{}.bias", self.name), self.bias_init.clone());
        let y = g.conv2d(x, w, Some(b), self.opts)?;
        Ok((y, [w, b]))
    }
}

/// Dropout in training mode with the graph's shared seed input `dropout.seed` (created on first
/// use); feed it a new whole number every step (`nn::TrainStep` does). `salt` must differ
/// between the dropout layers of one graph.
pub fn dropout(g: &Graph, x: NodeId, p: f32, salt: u32) -> Result<NodeId> {
    let seed = g
        .find_input(DROPOUT_SEED)
        .unwrap_or_else(|| g.input(DROPOUT_SEED, [1]));
    g.dropout(x, p, seed, salt)
}

/// Name of the seed input that `dropout` layers share.
pub const DROPOUT_SEED: &str = "dropout.seed";
