//! Attention layers with PyTorch's names and layouts, batch first: `MultiheadAttention`
//! (`torch.nn.MultiheadAttention(E, H, batch_first=True)`, with a key/value cache for
//! decoding), `TransformerEncoderLayer` and `TransformerDecoderLayer`
//! (`torch.nn.Transformer{Encoder,Decoder}Layer(..., batch_first=True)`), over the attention
//! kernels: self-attention reads its one projection packed ([`Graph::attention_packed`]),
//! cross-attention its three in the tokens layout ([`Graph::attention_tokens`]), so no heads are
//! permuted or copied; decoding keeps its caches as `(N, H, max_len, E / H)`
//! ([`Graph::attention`]).
//!
//! A causal layer trained one step, then fed one token at a time through its key/value cache
//! (the CPU reference here; `Device::new()` picks the GPU):
//!
//! ```
//! # fn main() -> kiln::Result<()> {
//! use kiln::nn::{decode_mask, Init, Optimizer, TrainStep, TransformerEncoderLayer};
//! use kiln::{Device, Graph, Tensor};
//! let dev = Device::cpu();
//! let (n, l, e) = (2, 6, 8);
//! let layer = TransformerEncoderLayer::new("enc", e, 2, 16, &mut Init::new(0))?;
//!
//! // training: the whole sequence, causal, dropout on
//! let g = Graph::new();
//! let x = g.input("x", [n, l, e]);
//! let (y, params) = layer.apply(&g, x, None, true, true)?;
//! let loss = g.mse_loss(y, g.input("target", [n, l, e]))?;
//! let mut step = TrainStep::new(&dev, &g, loss, &params, Optimizer::adamw(1e-3, 0.01), 0)?;
//! let xs = Tensor::rand_uniform([n, l, e], -1.0, 1.0, 1);
//! let loss = step.step(&[("x", &xs), ("target", &xs)], true)?;
//! assert!(loss.is_some_and(f32::is_finite));
//!
//! // decoding: one token per run, keys and values kept on the device
//! let g = Graph::new();
//! let x = g.input("x", [n, 1, e]);
//! let (pos, mask) = (g.input("pos", [1]), g.input("mask", [1, l]));
//! let (y, _) = layer.apply_cached(&g, x, pos, l, mask)?;
//! let mut decode = dev.compile(&g, &[y])?;
//! for p in 0..l {
//!     let token = Tensor::rand_uniform([n, 1, e], -1.0, 1.0, 2 + p as u64);
//!     let position = Tensor::new([1], vec![p as f32])?;
//!     let out = decode.run(&[("x", &token), ("pos", &position), ("mask", &decode_mask(p, 1, l))])?;
//!     assert_eq!(out[0].dims(), &[n, 1, e]);
//! }
//! # Ok(()) }
//! ```

use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::nn::layers::{dropout, dropout_seed, Layer, Linear};
use crate::nn::norm::LayerNorm;
use crate::ops::matmul::Bias;
use crate::tensor::Tensor;

/// Multi-head attention over `(N, L, E)` sequences: `query` projected by the first `E` rows of
/// `in_proj_weight [3E, E]`, `key` by the next, `value` by the last (plus `in_proj_bias [3E]`),
/// split into `num_heads` heads of `E / num_heads`, each attended by
/// [`Graph::attention`], the heads concatenated and projected by `out_proj` (a [`Linear`]
/// `E -> E`). Initialisation as torch: `in_proj_weight` Xavier-uniform, biases zero,
/// `out_proj.weight` Linear's default.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    pub name: String,
    pub embed_dim: usize,
    pub num_heads: usize,
    /// Dropout on the attention probabilities in training graphs (torch's `dropout`, default
    /// 0), inside the fused kernel ([`Graph::attention_dropout`]).
    pub dropout: f32,
    in_proj_init: Tensor,
    out_proj: Linear,
}

impl MultiheadAttention {
    /// `torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)` named `name`
    /// (parameters `name.in_proj_weight`, `name.in_proj_bias`, `name.out_proj.weight`,
    /// `name.out_proj.bias`). `embed_dim` must be a multiple of `num_heads`.
    pub fn new(
        name: &str,
        embed_dim: usize,
        num_heads: usize,
        init: &mut Init,
    ) -> Result<MultiheadAttention> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(shape_err(
                "multihead_attention",
                format!("embed_dim {embed_dim} is not a multiple of num_heads {num_heads}"),
            ));
        }
        let e = embed_dim;
        Ok(MultiheadAttention {
            name: name.to_string(),
            embed_dim,
            num_heads,
            dropout: 0.0,
            in_proj_init: init.xavier_uniform([3 * e, e], e, 3 * e),
            out_proj: Linear::with_zero_bias(&format!("{name}.out_proj"), e, e, init),
        })
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        let mut names = vec![
            format!("{}.in_proj_weight", self.name),
            format!("{}.in_proj_bias", self.name),
        ];
        names.extend(self.out_proj.param_names());
        names
    }

    /// Attends `query (N, L, E)` to `key (N, S, E)` and `value (N, S, E)` -> `(N, L, E)`, with
    /// an additive f32 `mask` broadcastable to `(N, H, L, S)` (a key padding mask as `(N, 1, 1,
    /// S)` with `-inf` at padded keys; an `attn_mask` as `(L, S)`) and `causal` (torch's
    /// `is_causal`). `train` turns on the probabilities' dropout. Returns the output and the
    /// parameter nodes. Self-attention (`query == key == value`) projects with one product and
    /// attends to it packed ([`Graph::attention_packed`]: no permutes of heads).
    #[allow(clippy::too_many_arguments)] // torch's forward takes as many
    pub fn apply(
        &self,
        g: &Graph,
        query: NodeId,
        key: NodeId,
        value: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let drop = (train && self.dropout > 0.0)
            .then(|| (self.dropout, dropout_seed(g), salt(&self.name, 0)));
        if query == key && key == value {
            // one product (N, L, 3E), read by the kernels as (N, L, 3, H, E / H) and written as
            // (N, L, H, E / H): no permutes or copies of heads, forward or backward
            let (qkv, params) = self.in_projection(g, query)?;
            let o = match drop {
                Some((p, seed, salt)) => {
                    g.attention_packed_dropout(qkv, mask, causal, None, p, seed, salt)?
                }
                None => g.attention_packed(qkv, mask, causal, None)?,
            };
            let d = g.shape(o).dims().to_vec();
            let o = g.reshape(o, &[d[0] as isize, d[1] as isize, self.embed_dim as isize])?;
            return self.out_projection(g, o, params);
        }
        // three products viewed as (N, L, H, E / H), read and written so by the kernels
        let ([q, k, v], params) = self.project_tokens(g, query, key, value)?;
        let o = g.attention_tokens(q, k, v, mask, causal, None, drop)?;
        let d = g.shape(o).dims().to_vec();
        let o = g.reshape(o, &[d[0] as isize, d[1] as isize, self.embed_dim as isize])?;
        self.out_projection(g, o, params)
    }

    /// Self-attention while decoding: `x (N, S, E)` holds the tokens at positions `position ..
    /// position + S` (`position` a `[1]` node fed a whole number) of `N` sequences whose earlier
    /// keys and values sit in the layer's cache, the parameters `<name>.k_cache` and
    /// `<name>.v_cache` of `(N, max_len, E)` (each row a position's heads side by side, as the
    /// in-projection gives them; in `x`'s type, f16 ones half the bytes a step reads; zeros at
    /// first; not trained, not in `param_names`). The new
    /// keys and values are written into the cache in place ([`Graph::write_rows`]) and the
    /// queries attend to the whole cache through `mask`, an additive `(S, max_len)` f32 input
    /// hiding the keys after each query ([`decode_mask`]). The attention reads the queries and
    /// the caches as `(N, L, H, E / H)` and writes the output so ([`Graph::attention_tokens`]):
    /// no permutes of heads.
    /// Feeding the tokens of a sequence one run at a time gives what [`Self::apply`] with
    /// `causal` gives for the whole sequence, at the cost of one row per token. Returns the
    /// output `(N, S, E)` and the parameter nodes.
    pub fn apply_cached(
        &self,
        g: &Graph,
        x: NodeId,
        position: NodeId,
        max_len: usize,
        mask: NodeId,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        // (N, S, 3, H, D): q, k and v are its parts, each (N, S, H, D)
        let (qkv, params) = self.in_projection(g, x)?;
        let d = g.shape(qkv).dims().to_vec();
        let (n, s, h, hd) = (d[0] as isize, d[1] as isize, d[3] as isize, d[4] as isize);
        let e = self.embed_dim as isize;
        // the caches in the activations' type: no casts between them and the projections
        let cache = |which: &str| {
            g.param_init_as(
                &format!("{}.{which}_cache", self.name),
                Tensor::zeros([d[0], max_len, self.embed_dim]),
                g.dtype(x),
            )
        };
        let part = |i: usize| g.narrow(qkv, 2, i, 1);
        let rows = |i: usize| g.reshape(part(i)?, &[n, s, e]);
        let kc = g.write_rows(cache("k"), rows(1)?, position)?;
        let vc = g.write_rows(cache("v"), rows(2)?, position)?;
        let tokens = |t: NodeId| g.reshape(t, &[n, -1, h, hd]);
        let o = g.attention_tokens(
            tokens(part(0)?)?,
            tokens(kc)?,
            tokens(vc)?,
            Some(mask),
            false,
            None,
            None,
        )?;
        let o = g.reshape(o, &[n, s, e])?;
        self.out_projection(g, o, params)
    }

    /// The projections of `query`, `key` and `value` viewed as `(N, L, H, E / H)` (three
    /// products, each with its rows of the in-projection, views of it), and the parameters
    /// `[in_proj_weight, in_proj_bias]`.
    fn project_tokens(
        &self,
        g: &Graph,
        query: NodeId,
        key: NodeId,
        value: NodeId,
    ) -> Result<([NodeId; 3], Vec<NodeId>)> {
        let (e, h) = (self.embed_dim, self.num_heads);
        let ([w, b], [wc, bc]) = self.in_params(g, [query, key, value])?;
        let project = |x: NodeId, i: usize| -> Result<NodeId> {
            let wi = g.narrow(wc, 0, i * e, e)?;
            let bi = g.narrow(bc, 0, i * e, e)?;
            let y = g.matmul_fused(x, wi, false, true, Some((bi, Bias::Cols)), false)?;
            let d = g.shape(x).dims().to_vec();
            g.reshape(
                y,
                &[d[0] as isize, d[1] as isize, h as isize, (e / h) as isize],
            )
        };
        Ok((
            [project(query, 0)?, project(key, 1)?, project(value, 2)?],
            vec![w, b],
        ))
    }

    /// The in-projection's parameters `[in_proj_weight, in_proj_bias]` and their casts to the
    /// inputs' type, after checking the inputs are `(N, L, E)`.
    fn in_params(&self, g: &Graph, inputs: [NodeId; 3]) -> Result<([NodeId; 2], [NodeId; 2])> {
        const OP: &str = "multihead_attention";
        let e = self.embed_dim;
        for x in inputs {
            let s = g.check_id(OP, x)?;
            if s.rank() != 3 || s.dims()[2] != e {
                return Err(shape_err(
                    OP,
                    format!("input {s}: expected (N, L, {e}) (batch first)"),
                ));
            }
        }
        let w = g.param_init(
            &format!("{}.in_proj_weight", self.name),
            self.in_proj_init.clone(),
        );
        let b = g.param_init(
            &format!("{}.in_proj_bias", self.name),
            Tensor::zeros([3 * e]),
        );
        let dt = g.dtype(inputs[0]);
        Ok(([w, b], [g.cast(w, dt)?, g.cast(b, dt)?]))
    }

    /// Self-attention's projections of `x (N, L, E)` as one product, viewed as the packed
    /// `(N, L, 3, H, E / H)`, and the parameters `[in_proj_weight, in_proj_bias]`.
    fn in_projection(&self, g: &Graph, x: NodeId) -> Result<(NodeId, Vec<NodeId>)> {
        let ([w, b], [wc, bc]) = self.in_params(g, [x; 3])?;
        let qkv = g.matmul_fused(x, wc, false, true, Some((bc, Bias::Cols)), false)?;
        let d = g.shape(x).dims().to_vec();
        let h = self.num_heads as isize;
        let packed = [
            d[0] as isize,
            d[1] as isize,
            3,
            h,
            (self.embed_dim / self.num_heads) as isize,
        ];
        Ok((g.reshape(qkv, &packed)?, vec![w, b]))
    }

    /// `o (N, L, E)` projected by `out_proj`; `params` gains its parameters.
    fn out_projection(
        &self,
        g: &Graph,
        o: NodeId,
        mut params: Vec<NodeId>,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let (y, p) = self.out_proj.apply(g, o)?;
        params.extend(p);
        Ok((y, params))
    }
}

/// A key padding mask for sequences of `lengths` padded to `s` keys: `(N, 1, 1, s)` additive,
/// 0 at the first `lengths[b]` keys of sequence `b`, `-inf` after (torch's `key_padding_mask`
/// as the additive mask [`MultiheadAttention::apply`] takes). A length of 0 hides every key and
/// gives NaN rows, as torch does.
pub fn padding_mask(lengths: &[usize], s: usize) -> Tensor {
    let data = lengths
        .iter()
        .flat_map(|&len| (0..s).map(move |j| if j < len { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::new([lengths.len(), 1, 1, s], data).expect("N * s values")
}

/// The additive mask of [`MultiheadAttention::apply_cached`] for `s` new tokens at `position`
/// in a cache of `max_len` rows: `(s, max_len)`, 0 where key `j <= position + i`, `-inf` after.
pub fn decode_mask(position: usize, s: usize, max_len: usize) -> Tensor {
    let data = (0..s * max_len)
        .map(|e| {
            if e % max_len <= position + e / max_len {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::new([s, max_len], data).expect("s * max_len values")
}

/// A distinct dropout salt per layer name and site.
pub(crate) fn salt(name: &str, site: u32) -> u32 {
    // FNV-1a
    let mut h: u32 = 0x811c_9dc5;
    for byte in name.bytes().chain(site.to_le_bytes()) {
        h = (h ^ byte as u32).wrapping_mul(0x0100_0193);
    }
    h
}

/// Activation between a transformer layer's two linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardAct {
    Relu,
    Gelu,
    /// GELU's tanh approximation (`activation=nn.GELU(approximate="tanh")`, GPT-2's).
    GeluTanh,
}

/// `torch.nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout,
/// batch_first=True)` over `(N, L, E)`: self-attention (`self_attn`), then a feed-forward
/// block `linear2(dropout(act(linear1(x))))`, each with a residual connection and a layer norm
/// (`norm1`, `norm2`): after the residual (default, `norm_first = false`) or before the block
/// (`norm_first = true`, the pre-norm form of GPT-style decoders). Dropout (`dropout`, default
/// 0.1 as torch) on the attention probabilities, after each block and inside the feed-forward
/// block, in training graphs only.
#[derive(Debug, Clone)]
pub struct TransformerEncoderLayer {
    pub name: String,
    pub self_attn: MultiheadAttention,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub dropout: f32,
    pub activation: FeedForwardAct,
    pub norm_first: bool,
}

impl TransformerEncoderLayer {
    /// A layer named `name` with torch's defaults (dropout 0.1, relu, post-norm, eps 1e-5);
    /// parameter names as torch's (`name.self_attn.in_proj_weight`, `name.linear1.weight`,
    /// `name.norm1.weight`, ...).
    pub fn new(
        name: &str,
        d_model: usize,
        nhead: usize,
        dim_feedforward: usize,
        init: &mut Init,
    ) -> Result<TransformerEncoderLayer> {
        let mut self_attn =
            MultiheadAttention::new(&format!("{name}.self_attn"), d_model, nhead, init)?;
        self_attn.dropout = 0.1;
        Ok(TransformerEncoderLayer {
            name: name.to_string(),
            self_attn,
            linear1: Linear::new(&format!("{name}.linear1"), d_model, dim_feedforward, init),
            linear2: Linear::new(&format!("{name}.linear2"), dim_feedforward, d_model, init),
            norm1: LayerNorm::new(&format!("{name}.norm1"), &[d_model]),
            norm2: LayerNorm::new(&format!("{name}.norm2"), &[d_model]),
            dropout: 0.1,
            activation: FeedForwardAct::Relu,
            norm_first: false,
        })
    }

    /// Sets the dropout of every site (the attention probabilities' too).
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self.self_attn.dropout = p;
        self
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        let mut names = self.self_attn.param_names();
        for l in [&self.linear1, &self.linear2] {
            names.extend(l.param_names());
        }
        for n in [&self.norm1, &self.norm2] {
            names.extend(n.param_names());
        }
        names
    }

    /// Applies the layer to `x (N, L, E)` with the attention's additive `mask` and `causal`
    /// flag (see [`MultiheadAttention::apply`]); `train` turns dropout on. Returns the output
    /// and the parameter nodes.
    pub fn apply(
        &self,
        g: &Graph,
        x: NodeId,
        mask: Option<NodeId>,
        causal: bool,
        train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let attend = |a: NodeId| self.self_attn.apply(g, a, a, a, mask, causal, train);
        self.forward(g, x, &attend, train)
    }

    /// The layer while decoding (evaluation, no dropout): `x (N, S, E)` holds the tokens at
    /// `position ..` of sequences whose earlier tokens' keys and values sit in the attention's
    /// cache (see [`MultiheadAttention::apply_cached`], `mask` from [`decode_mask`]). Feeding a
    /// sequence's tokens one run at a time gives what [`Self::apply`] with `causal` gives for
    /// the whole sequence.
    pub fn apply_cached(
        &self,
        g: &Graph,
        x: NodeId,
        position: NodeId,
        max_len: usize,
        mask: NodeId,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let attend = |a: NodeId| self.self_attn.apply_cached(g, a, position, max_len, mask);
        self.forward(g, x, &attend, false)
    }

    /// The residual blocks around `attend` (the self-attention) and the feed-forward block.
    fn forward(
        &self,
        g: &Graph,
        x: NodeId,
        attend: &dyn Fn(NodeId) -> Result<(NodeId, Vec<NodeId>)>,
        train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let mut b = Blocks::new(g, &self.name, self.dropout, train);
        let nf = self.norm_first;
        let x = b.residual(x, &self.norm1, nf, 1, &mut |b, a| b.keep(attend(a)?))?;
        let ff =
            |b: &mut Blocks, a| b.feed_forward(a, &self.linear1, &self.linear2, self.activation);
        let y = b.residual(x, &self.norm2, nf, 3, &mut |b, a| ff(b, a))?;
        Ok((y, b.params))
    }
}

/// `torch.nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout,
/// batch_first=True)` over `tgt (N, T, E)` and the encoder's `memory (N, S, E)`:
/// self-attention (`self_attn`), cross-attention to the memory (`multihead_attn`), then the
/// feed-forward block, each with a residual connection and a layer norm (`norm1`, `norm2`,
/// `norm3`; after the residual, or before the block with `norm_first`). Dropout (default 0.1)
/// as [`TransformerEncoderLayer`]'s.
#[derive(Debug, Clone)]
pub struct TransformerDecoderLayer {
    pub name: String,
    pub self_attn: MultiheadAttention,
    pub multihead_attn: MultiheadAttention,
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub norm3: LayerNorm,
    pub dropout: f32,
    pub activation: FeedForwardAct,
    pub norm_first: bool,
}

impl TransformerDecoderLayer {
    /// A layer named `name` with torch's defaults (dropout 0.1, relu, post-norm, eps 1e-5) and
    /// torch's parameter names (`name.self_attn.in_proj_weight`,
    /// `name.multihead_attn.out_proj.weight`, `name.norm3.bias`, ...).
    pub fn new(
        name: &str,
        d_model: usize,
        nhead: usize,
        dim_feedforward: usize,
        init: &mut Init,
    ) -> Result<TransformerDecoderLayer> {
        let attn = |what: &str, init: &mut Init| -> Result<MultiheadAttention> {
            let mut a = MultiheadAttention::new(&format!("{name}.{what}"), d_model, nhead, init)?;
            a.dropout = 0.1;
            Ok(a)
        };
        Ok(TransformerDecoderLayer {
            name: name.to_string(),
            self_attn: attn("self_attn", init)?,
            multihead_attn: attn("multihead_attn", init)?,
            linear1: Linear::new(&format!("{name}.linear1"), d_model, dim_feedforward, init),
            linear2: Linear::new(&format!("{name}.linear2"), dim_feedforward, d_model, init),
            norm1: LayerNorm::new(&format!("{name}.norm1"), &[d_model]),
            norm2: LayerNorm::new(&format!("{name}.norm2"), &[d_model]),
            norm3: LayerNorm::new(&format!("{name}.norm3"), &[d_model]),
            dropout: 0.1,
            activation: FeedForwardAct::Relu,
            norm_first: false,
        })
    }

    /// Sets the dropout of every site (both attentions' probabilities too).
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self.self_attn.dropout = p;
        self.multihead_attn.dropout = p;
        self
    }

    /// The parameter names, as in a PyTorch state_dict.
    pub fn param_names(&self) -> Vec<String> {
        let mut names = self.self_attn.param_names();
        names.extend(self.multihead_attn.param_names());
        for l in [&self.linear1, &self.linear2] {
            names.extend(l.param_names());
        }
        for n in [&self.norm1, &self.norm2, &self.norm3] {
            names.extend(n.param_names());
        }
        names
    }

    /// Applies the layer to `tgt (N, T, E)` attending to `memory (N, S, E)`: `tgt_mask` and
    /// `causal` for the self-attention (torch's `tgt_mask`, `tgt_is_causal`), `memory_mask` for
    /// the cross-attention (additive f32, broadcastable to `(N, H, T, S)`: a memory key padding
    /// mask as `(N, 1, 1, S)`); `train` turns dropout on. Returns the output and the parameter
    /// nodes.
    #[allow(clippy::too_many_arguments)] // torch's forward takes as many
    pub fn apply(
        &self,
        g: &Graph,
        tgt: NodeId,
        memory: NodeId,
        tgt_mask: Option<NodeId>,
        causal: bool,
        memory_mask: Option<NodeId>,
        train: bool,
    ) -> Result<(NodeId, Vec<NodeId>)> {
        let mut b = Blocks::new(g, &self.name, self.dropout, train);
        let nf = self.norm_first;
        let sa = &self.self_attn;
        let ca = &self.multihead_attn;
        let x = b.residual(tgt, &self.norm1, nf, 1, &mut |b, a| {
            b.keep(sa.apply(g, a, a, a, tgt_mask, causal, train)?)
        })?;
        let x = b.residual(x, &self.norm2, nf, 4, &mut |b, a| {
            b.keep(ca.apply(g, a, memory, memory, memory_mask, false, train)?)
        })?;
        let y = b.residual(x, &self.norm3, nf, 3, &mut |b, a| {
            b.feed_forward(a, &self.linear1, &self.linear2, self.activation)
        })?;
        Ok((y, b.params))
    }
}

/// Builds a transformer layer's residual blocks, collecting their parameters.
struct Blocks<'a> {
    g: &'a Graph,
    /// The layer's name: its dropout salts.
    name: &'a str,
    /// Dropout after each block and inside the feed-forward block, in training graphs.
    dropout: f32,
    train: bool,
    params: Vec<NodeId>,
}

impl<'a> Blocks<'a> {
    fn new(g: &'a Graph, name: &'a str, dropout: f32, train: bool) -> Self {
        Blocks {
            g,
            name,
            dropout,
            train,
            params: Vec::new(),
        }
    }

    /// A sublayer's output, its parameters kept.
    fn keep(&mut self, (y, p): (NodeId, Vec<NodeId>)) -> Result<NodeId> {
        self.params.extend(p);
        Ok(y)
    }

    /// Dropout at `site` (a salt per site) in training graphs.
    fn drop(&self, y: NodeId, site: u32) -> Result<NodeId> {
        if self.train && self.dropout > 0.0 {
            dropout(self.g, y, self.dropout, salt(self.name, site))
        } else {
            Ok(y)
        }
    }

    /// `x + drop(f(norm(x)))` with `norm_first`, else `norm(x + drop(f(x)))`.
    fn residual(
        &mut self,
        x: NodeId,
        norm: &LayerNorm,
        norm_first: bool,
        site: u32,
        f: &mut dyn FnMut(&mut Self, NodeId) -> Result<NodeId>,
    ) -> Result<NodeId> {
        let g = self.g;
        if norm_first {
            let a = self.keep(norm.apply(g, x)?)?;
            let y = f(self, a)?;
            g.add(x, self.drop(y, site)?)
        } else {
            let y = f(self, x)?;
            let s = g.add(x, self.drop(y, site)?)?;
            self.keep(norm.apply(g, s)?)
        }
    }

    /// `linear2(drop(act(linear1(x))))` (the relu fused into linear1's product).
    fn feed_forward(
        &mut self,
        x: NodeId,
        linear1: &Linear,
        linear2: &Linear,
        act: FeedForwardAct,
    ) -> Result<NodeId> {
        let g = self.g;
        let h = match act {
            FeedForwardAct::Relu => {
                let (y, p) = linear1.apply_relu(g, x)?;
                self.keep((y, p.to_vec()))?
            }
            FeedForwardAct::Gelu => {
                let (y, p) = linear1.apply(g, x)?;
                g.gelu(self.keep((y, p.to_vec()))?)?
            }
            FeedForwardAct::GeluTanh => {
                let (y, p) = linear1.apply(g, x)?;
                g.gelu_tanh(self.keep((y, p.to_vec()))?)?
            }
        };
        let h = self.drop(h, 2)?;
        let (y, p) = linear2.apply(g, h)?;
        self.keep((y, p.to_vec()))
    }
}

impl Layer for TransformerEncoderLayer {
    /// Without a mask, not causal.
    fn apply_layer(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        self.apply(g, x, None, false, train)
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}
