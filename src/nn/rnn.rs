//! Recurrent layers with PyTorch's parameter names and layouts, so torch weights load through
//! safetensors: `<name>.weight_ih_l{k}[_reverse] [G*H, I]`, `weight_hh_l{k} [G*H, H]`,
//! `bias_ih_l{k}`, `bias_hh_l{k} [G*H]`, G = 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (tanh
//! RNN); input `(T, B, I)`, or `(B, T, I)` with [`Recurrent::batch_first`] (torch's
//! `batch_first=True`). And `Embedding` (`<name>.weight [V, E]`).

use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::nn::layers::Layer;
use crate::tensor::Tensor;

/// Which recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Lstm,
    Gru,
    /// `torch.nn.RNN` with tanh.
    Rnn,
}

impl Cell {
    fn gates(self) -> usize {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }
    fn op(self) -> &'static str {
        match self {
            Cell::Lstm => "lstm",
            Cell::Gru => "gru",
            Cell::Rnn => "rnn",
        }
    }
}

/// A multi-layer, optionally bidirectional recurrent network (`torch.nn.LSTM`, `GRU`, `RNN`).
#[derive(Debug, Clone)]
pub struct Recurrent {
    pub cell: Cell,
    pub name: String,
    pub input_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub bidirectional: bool,
    /// Input `(B, T, I)` and output `(B, T, D * H)` (torch's `batch_first=True`; `h_n` and
    /// `c_n` stay `(layers * D, B, H)`). The swaps to and from the recurrences' time-major
    /// layout cost no copy where products read them (the input projection, a classifier over
    /// every step: `exec::lower::swapped_operands`).
    pub batch_first: bool,
    /// torch's `dropout`: in training graphs ([`Recurrent::apply_train`]), dropout with this
    /// probability on the outputs of every layer but the last.
    pub dropout: f32,
    inits: Vec<(String, Tensor)>,
}

/// `torch.nn.LSTM`.
pub type Lstm = Recurrent;

/// What a recurrent network returns.
#[derive(Debug, Clone)]
pub struct RecurrentOutput {
    /// All top-layer `h_t`: `(T, B, D * H)`, D = 2 when bidirectional (`(B, T, D * H)` batch
    /// first).
    pub output: NodeId,
    /// Final hidden state of every layer and direction: `(layers * D, B, H)`.
    pub h_n: NodeId,
    /// Final cell state (LSTM only; equal to `h_n` for GRU and RNN): `(layers * D, B, H)`.
    pub c_n: NodeId,
    /// The parameter nodes, in `param_names` order.
    pub params: Vec<NodeId>,
}

/// The LSTM's output.
pub type LstmOutput = RecurrentOutput;

impl Recurrent {
    /// An LSTM named `name`, initialised as torch: every weight and bias `U(-1/sqrt H, 1/sqrt H)`.
    pub fn new(
        name: &str,
        input_size: usize,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        init: &mut Init,
    ) -> Self {
        Self::with_cell(
            Cell::Lstm,
            name,
            input_size,
            hidden,
            layers,
            bidirectional,
            init,
        )
    }

    /// A GRU (gates r, z, n), initialised as torch.
    pub fn gru(
        name: &str,
        input_size: usize,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        init: &mut Init,
    ) -> Self {
        Self::with_cell(
            Cell::Gru,
            name,
            input_size,
            hidden,
            layers,
            bidirectional,
            init,
        )
    }

    /// A tanh RNN, initialised as torch.
    pub fn rnn(
        name: &str,
        input_size: usize,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        init: &mut Init,
    ) -> Self {
        Self::with_cell(
            Cell::Rnn,
            name,
            input_size,
            hidden,
            layers,
            bidirectional,
            init,
        )
    }

    fn with_cell(
        cell: Cell,
        name: &str,
        input_size: usize,
        hidden: usize,
        layers: usize,
        bidirectional: bool,
        init: &mut Init,
    ) -> Self {
        let dirs = if bidirectional { 2 } else { 1 };
        let gh = cell.gates() * hidden;
        let bound = 1.0 / (hidden as f32).sqrt();
        let mut inits = Vec::new();
        for l in 0..layers {
            let in_l = if l == 0 { input_size } else { hidden * dirs };
            for d in 0..dirs {
                let sfx = if d == 1 { "_reverse" } else { "" };
                inits.push((
                    format!("{name}.weight_ih_l{l}{sfx}"),
                    init.uniform([gh, in_l], bound),
                ));
                inits.push((
                    format!("{name}.weight_hh_l{l}{sfx}"),
                    init.uniform([gh, hidden], bound),
                ));
                inits.push((
                    format!("{name}.bias_ih_l{l}{sfx}"),
                    init.uniform([gh], bound),
                ));
                inits.push((
                    format!("{name}.bias_hh_l{l}{sfx}"),
                    init.uniform([gh], bound),
                ));
            }
        }
        Recurrent {
            cell,
            name: name.to_string(),
            input_size,
            hidden,
            layers,
            bidirectional,
            batch_first: false,
            dropout: 0.0,
            inits,
        }
    }

    /// The same network with torch's `dropout` between its layers ([`Self::dropout`]).
    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    /// The same network taking and giving batch-first sequences ([`Self::batch_first`]).
    pub fn with_batch_first(mut self, batch_first: bool) -> Self {
        self.batch_first = batch_first;
        self
    }

    /// Parameter names in torch's state_dict order.
    pub fn param_names(&self) -> Vec<String> {
        self.inits.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Runs the network over `x (T, B, I)` (`(B, T, I)` with [`Self::batch_first`]; the output
    /// then `(B, T, D * H)`). `state` is `(h0, c0)`, each `(layers * D, B, H)`
    /// (zeros when `None`; `c0` is ignored but for the LSTM); `lengths (B)` gives each sequence's
    /// length (steps past it carry the state, so `h_n` is the state at the last real step).
    /// An f16 `x` runs the layers in f16 (parameters and states cast in the graph, their
    /// gradients back in f32), as `nn::Linear` does.
    /// The evaluation graph: no dropout ([`Self::apply_train`] for a training one).
    pub fn apply(
        &self,
        g: &Graph,
        x: NodeId,
        state: Option<(NodeId, NodeId)>,
        lengths: Option<NodeId>,
    ) -> Result<RecurrentOutput> {
        self.apply_train(g, x, state, lengths, false)
    }

    /// [`Self::apply`] in a training (`train`) or evaluation graph: in training, the outputs of
    /// every layer but the last go through dropout with probability [`Self::dropout`] (seeded
    /// by the graph's `dropout.seed` input, a salt per layer), as torch's `dropout`.
    pub fn apply_train(
        &self,
        g: &Graph,
        x: NodeId,
        state: Option<(NodeId, NodeId)>,
        lengths: Option<NodeId>,
        train: bool,
    ) -> Result<RecurrentOutput> {
        let xs = g.shape(x);
        if xs.rank() != 3 || xs.dims()[2] != self.input_size {
            let layout = if self.batch_first { "B, T" } else { "T, B" };
            return Err(shape_err(
                self.cell.op(),
                format!("input {xs}: expected ({layout}, {})", self.input_size),
            ));
        }
        let x = match self.batch_first {
            true => g.permute(x, &[1, 0, 2])?,
            false => x,
        };
        let b = g.shape(x).dims()[1];
        let h = self.hidden;
        let dirs = if self.bidirectional { 2 } else { 1 };
        let params: Vec<NodeId> = self
            .inits
            .iter()
            .map(|(n, t)| g.param_init(n, t.clone()))
            .collect();
        // the layer follows its input's type: f32 parameters and states cast to f16 for f16
        // inputs (a no-op for f32), gradients back in f32
        let dt = g.dtype(x);
        let cast_params = params
            .iter()
            .map(|&p| g.cast(p, dt))
            .collect::<Result<Vec<_>>>()?;
        let state_at = |s: NodeId, k: usize| -> Result<NodeId> {
            g.cast(
                g.reshape(g.narrow(s, 0, k, 1)?, &[b as isize, h as isize])?,
                dt,
            )
        };
        let zeros = g.cast(g.constant(Tensor::zeros([b, h])), dt)?;
        let mut input = x;
        let (mut hn, mut cn) = (Vec::new(), Vec::new());
        for l in 0..self.layers {
            let mut outs = Vec::new();
            for d in 0..dirs {
                let k = l * dirs + d;
                let p = &cast_params[4 * k..4 * k + 4];
                let (h0, c0) = match state {
                    Some((h0, c0)) => (state_at(h0, k)?, state_at(c0, k)?),
                    None => (zeros, zeros),
                };
                let rev = d == 1;
                let (hs, hl, cl) = match self.cell {
                    Cell::Lstm => {
                        g.lstm_layer(input, p[0], p[1], p[2], p[3], h0, c0, lengths, rev)?
                    }
                    Cell::Gru => {
                        let (hs, hl) =
                            g.gru_layer(input, p[0], p[1], p[2], p[3], h0, lengths, rev)?;
                        (hs, hl, hl)
                    }
                    Cell::Rnn => {
                        let (hs, hl) =
                            g.rnn_layer(input, p[0], p[1], p[2], p[3], h0, lengths, rev)?;
                        (hs, hl, hl)
                    }
                };
                outs.push(hs);
                hn.push(g.reshape(hl, &[1, b as isize, h as isize])?);
                cn.push(g.reshape(cl, &[1, b as isize, h as isize])?);
            }
            input = g.concat(&outs, 2)?;
            if train && self.dropout > 0.0 && l + 1 < self.layers {
                let salt = crate::nn::attention::salt(&self.name, l as u32);
                input = crate::nn::layers::dropout(g, input, self.dropout, salt)?;
            }
        }
        let h_n = g.concat(&hn, 0)?;
        let c_n = if self.cell == Cell::Lstm {
            g.concat(&cn, 0)?
        } else {
            h_n
        };
        let output = match self.batch_first {
            true => g.permute(input, &[1, 0, 2])?,
            false => input,
        };
        Ok(RecurrentOutput {
            output,
            h_n,
            c_n,
            params,
        })
    }
}

impl Layer for Recurrent {
    /// The top layer's outputs `(T, B, D * H)` (batch first: `(B, T, D * H)`) from zero state.
    fn apply_layer(&self, g: &Graph, x: NodeId, train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        let o = self.apply_train(g, x, None, None, train)?;
        Ok((o.output, o.params))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}

/// A lookup table `<name>.weight [V, E]` (`torch.nn.Embedding`, initialised `N(0, 1)`-like as
/// uniform with the same variance): indices of any shape (whole numbers as f32) -> `(.., E)`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    weight_init: Tensor,
    /// torch's `padding_idx`, where set: only through [`Embedding::padding_idx`], which also
    /// zeroes that row of the initial weights.
    padding_idx: Option<i64>,
}

impl Embedding {
    /// `vocab` rows of `dim` values.
    pub fn new(name: &str, vocab: usize, dim: usize, init: &mut Init) -> Self {
        // U(-sqrt 3, sqrt 3) has unit variance, as torch's N(0, 1)
        Embedding {
            name: name.to_string(),
            weight_init: init.uniform([vocab, dim], 3f32.sqrt()),
            padding_idx: None,
        }
    }

    /// torch's `padding_idx` (negative: counted from the end): that row starts at zeros and
    /// takes no gradient, so a padding token looks up zeros however long it trains.
    pub fn padding_idx(mut self, p: i64) -> Self {
        let (v, e) = (self.weight_init.dims()[0], self.weight_init.dims()[1]);
        let row = if p < 0 { p + v as i64 } else { p };
        if (0..v as i64).contains(&row) {
            let r = row as usize;
            self.weight_init.data_mut()[r * e..(r + 1) * e].fill(0.0);
        }
        // (a row out of range is the graph's error when the layer is applied)
        self.padding_idx = Some(p);
        self
    }
    /// The parameter name.
    pub fn param_names(&self) -> Vec<String> {
        vec![format!("{}.weight", self.name)]
    }
}

impl Layer for Embedding {
    fn apply_layer(&self, g: &Graph, x: NodeId, _train: bool) -> Result<(NodeId, Vec<NodeId>)> {
        let w = g.param_init(&format!("{}.weight", self.name), self.weight_init.clone());
        let y = match self.padding_idx {
            Some(p) => g.embedding_padded(x, w, p)?,
            None => g.embedding(x, w)?,
        };
        Ok((y, vec![w]))
    }
    fn names(&self) -> Vec<String> {
        self.param_names()
    }
}
