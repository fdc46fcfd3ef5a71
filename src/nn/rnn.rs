//! Recurrent layers with PyTorch's parameter names and layouts, so torch LSTM weights load through
//! safetensors: `<name>.weight_ih_l{k}[_reverse] [4H, I]`, `weight_hh_l{k} [4H, H]`,
//! `bias_ih_l{k}`, `bias_hh_l{k} [4H]`; gates i, f, g, o; input `(T, B, I)` (batch_first = false).

use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::nn::layers::Layer;
use crate::tensor::Tensor;

/// A (multi-layer, optionally bidirectional) LSTM, as `torch.nn.LSTM`.
#[derive(Debug, Clone)]
pub struct Lstm {
    pub name: String,
    pub input_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub bidirectional: bool,
    inits: Vec<(String, Tensor)>,
}

/// What an LSTM returns: all top-layer `h_t`, and the final states of every layer and direction.
#[derive(Debug, Clone)]
pub struct LstmOutput {
    /// `(T, B, D * H)`, D = 2 when bidirectional.
    pub output: NodeId,
    /// `(layers * D, B, H)`
    pub h_n: NodeId,
    /// `(layers * D, B, H)`
    pub c_n: NodeId,
    /// The parameter nodes, in `param_names` order.
    pub params: Vec<NodeId>,
}

impl Lstm {
    /// A layer named `name`, initialised as torch: every weight and bias `U(-1/sqrt H, 1/sqrt H)`.
    pub fn new(
        name: &str,
        input_size: usize,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        init: &mut Init,
    ) -> Lstm {
        let dirs = if bidirectional { 2 } else { 1 };
        let bound = 1.0 / (hidden as f32).sqrt();
        let mut inits = Vec::new();
        for l in 0..layers {
            let in_l = if l == 0 { input_size } else { hidden * dirs };
            for d in 0..dirs {
                let sfx = if d == 1 { "_reverse" } else { "" };
                inits.push((
                    format!("{name}.weight_ih_l{l}{sfx}"),
                    init.uniform([4 * hidden, in_l], bound),
                ));
                inits.push((
                    format!("{name}.weight_hh_l{l}{sfx}"),
                    init.uniform([4 * hidden, hidden], bound),
                ));
                inits.push((
                    format!("{name}.bias_ih_l{l}{sfx}"),
                    init.uniform([4 * hidden], bound),
                ));
                inits.push((
                    format!("{name}.bias_hh_l{l}{sfx}"),
                    init.uniform([4 * hidden], bound),
                ));
            }
        }
        Lstm {
            name: name.to_string(),
            input_size,
            hidden,
            layers,
            bidirectional,
            inits,
        }
    }

    /// Parameter names in torch's state_dict order.
    pub fn param_names(&self) -> Vec<String> {
        self.inits.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Runs the LSTM over `x (T, B, I)`. `state` is `(h0, c0)`, each `(layers * D, B, H)`
    /// (zeros when `None`); `lengths (B)` gives each sequence's length (steps past it carry the
    /// state, so `h_n` is the state at the last real step).
    pub fn apply(
        &self,
        g: &Graph,
        x: NodeId,
        state: Option<(NodeId, NodeId)>,
        lengths: Option<NodeId>,
    ) -> Result<LstmOutput> {
        let xs = g.shape(x);
        if xs.rank() != 3 || xs.dims()[2] != self.input_size {
            return Err(shape_err(
                "lstm",
                format!("input {xs}: expected (T, B, {})", self.input_size),
            ));
        }
        let (b, h) = (xs.dims()[1], self.hidden);
        let dirs = if self.bidirectional { 2 } else { 1 };
        let params: Vec<NodeId> = self
            .inits
            .iter()
            .map(|(n, t)| g.param_init(n, t.clone()))
            .collect();
        let state_at = |s: NodeId, k: usize| -> Result<NodeId> {
            g.reshape(g.narrow(s, 0, k, 1)?, &[b as isize, h as isize])
        };
        let zeros = g.constant(Tensor::zeros([b, h]));
        let mut input = x;
        let (mut hn, mut cn) = (Vec::new(), Vec::new());
        for l in 0..self.layers {
            let mut outs = Vec::new();
            for d in 0..dirs {
                let k = l * dirs + d;
                let p = &params[4 * k..4 * k + 4];
                let (h0, c0) = match state {
                    Some((h0, c0)) => (state_at(h0, k)?, state_at(c0, k)?),
                    None => (zeros, zeros),
                };
                let (hs, hl, cl) =
                    g.lstm_layer(input, p[0], p[1], p[2], p[3], h0, c0, lengths, d == 1)?;
                outs.push(hs);
                hn.push(g.reshape(hl, &[1, b as isize, h as isize])?);
                cn.push(g.reshape(cl, &[1, b as isize, h as isize])?);
            }
            input = g.concat(&outs, 2)?;
        }
        Ok(LstmOutput {
            output: input,
            h_n: g.concat(&hn, 0)?,
            c_n: g.concat(&cn, 0)?,
            params,
        })
    }
}

impl Layer for Lstm {
    /// The top layer's outputs `(T, B, D * H)` from zero state.
    fn apply_layer(&self, g: &Graph, x: NodeId) -> Result<(NodeId, Vec<NodeId>)> {
        let o = self.apply(g, x, None, None)?;
        Ok((o.output, o.params))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}
