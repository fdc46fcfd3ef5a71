//! One GRU layer (PyTorch gates r, z, n) and one vanilla tanh RNN layer (`torch.nn.RNN`), each as a
//! fused recurrent kernel and a fused backward through time, each one dispatch for the whole
//! sequence where H allows (see `lstm::sequence_threads`), else one per time step. Kernel:
//! `shaders/gru.wgsl`.
//!
//! `GruForward`: inputs `xw [T, B, 3H]` (the input projection `x W_ih^T + b_ih` of every step, one
//! matmul done before), `w_hh [3H, H]`, `b_hh [3H]`, `h0 [B, H]`, `lengths [B]`, `w_hh^T [H, 3H]`
//! (what the step kernel reads, coalesced) -> packed state
//! `P [T, B, 5H]` (h | r | z | n | hn, with `hn = W_hn h + b_hn`). Steps at `t >= lengths[b]`
//! carry the state. `GruBackward`: `P, w_hh, b_hh, h0, lengths, dP` -> `Q [T + 1, B, 8H]`
//! (da_r | da_z | da_n | dh | da_r | da_z | dhn | h_prev per step, h_prev the state the step
//! started from; dh0 in the last row). The recurrent weight and bias gradients are one tiled
//! matmul and a column sum over all steps, built in the graph (`b_hh` needs its own gradient
//! because `b_hn` sits inside `r * (W_hn h + b_hn)`); the product reads `da_r | da_z | dhn`
//! (hence the copies of da_r and da_z) and h_prev out of Q in place.
//!
//! `RnnForward`: `xw [T, B, H]`, `w_hh [H, H]`, `b_hh [H]`, `h0 [B, H]`, `lengths [B]`, `w_hh^T` ->
//! `P [T, B, H]` (h). `RnnBackward`: the same inputs as the GRU's -> `Q [T + 1, B, 3H]`
//! (da | dh | h_prev; dh0 in the last row).
//!
//! Only the `h` part of `dP` is read: the gate parts of `P` are internal (the layer builders
//! expose `h` alone).

use super::lstm::{DpWindow, InitialState};
use super::{KernelSpec, Op};
use crate::error::{shape_err, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// Which recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cell {
    Gru,
    Rnn,
}

impl Cell {
    /// Op name of the forward recurrence.
    pub fn name(self) -> &'static str {
        match self {
            Cell::Gru => "gru",
            Cell::Rnn => "rnn",
        }
    }

    /// Gate blocks of `W_hh` (rows = gates * H).
    pub fn gates(self) -> usize {
        match self {
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }

    /// Row width of the packed state, in units of H.
    fn p_width(self) -> usize {
        match self {
            Cell::Gru => 5,
            Cell::Rnn => 1,
        }
    }

    /// Row width of the packed gradient, in units of H.
    fn q_width(self) -> usize {
        match self {
            Cell::Gru => 8,
            Cell::Rnn => 3,
        }
    }

    /// Where dh sits in a row of the packed gradient, in units of H.
    fn dh_col(self) -> usize {
        match self {
            Cell::Gru => 3,
            Cell::Rnn => 1,
        }
    }

    /// Where the gradient of `W_hh h + b_hh` starts in a row of the packed gradient (G*H
    /// wide), in units of H; `h_prev` is the last H.
    fn recurrent_col(self) -> usize {
        match self {
            Cell::Gru => 4,
            Cell::Rnn => 0,
        }
    }

    /// The forward recurrence's op (what the layer builders add).
    pub(crate) fn forward_op(self, reverse: bool) -> Op {
        match self {
            Cell::Gru => Op::GruForward(GruForward {
                reverse,
                state: InitialState::default(),
            }),
            Cell::Rnn => Op::RnnForward(RnnForward {
                reverse,
                state: InitialState::default(),
            }),
        }
    }

    fn backward_op(self, reverse: bool) -> Op {
        match self {
            Cell::Gru => Op::GruBackward(GruBackward {
                reverse,
                dp_window: None,
                state: InitialState::default(),
            }),
            Cell::Rnn => Op::RnnBackward(RnnBackward {
                reverse,
                dp_window: None,
                state: InitialState::default(),
            }),
        }
    }
}

/// The GRU forward recurrence of one layer and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GruForward {
    pub reverse: bool,
    /// Where its kernels read `h0` (`lstm::InitialState`; `c0` unused).
    pub state: InitialState,
}

/// Backward through time of [`GruForward`]; `dp_window` as `LstmBackward`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GruBackward {
    pub reverse: bool,
    pub dp_window: Option<DpWindow>,
    pub state: InitialState,
}

/// The tanh RNN forward recurrence of one layer and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RnnForward {
    pub reverse: bool,
    /// As [`GruForward::state`].
    pub state: InitialState,
}

/// Backward through time of [`RnnForward`]; `dp_window` as `LstmBackward`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RnnBackward {
    pub reverse: bool,
    pub dp_window: Option<DpWindow>,
    pub state: InitialState,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `(T, B, H)` from the packed state's shape.
fn dims(cell: Cell, p: &Shape) -> (usize, usize, usize) {
    (p.dims()[0], p.dims()[1], p.dims()[2] / cell.p_width())
}

/// Time index of forward step `s`.
fn time_of(s: usize, t: usize, reverse: bool) -> usize {
    if reverse {
        t - 1 - s
    } else {
        s
    }
}

/// Shape rule of the forward recurrence: `xw (T, B, G*H)`, `w_hh (G*H, H)`, `b_hh (G*H)`,
/// `h0 (B, H)`, `lengths (B)` -> the packed state.
pub fn infer(
    cell: Cell,
    xw: &Shape,
    whh: &Shape,
    bhh: &Shape,
    h0: &Shape,
    lengths: &Shape,
) -> Result<Shape> {
    let gh = match cell {
        Cell::Gru => "3H",
        Cell::Rnn => "H",
    };
    let bad = || {
        shape_err(
            cell.name(),
            format!(
                "xw {xw}, w_hh {whh}, b_hh {bhh}, h0 {h0}, lengths {lengths}: expected xw (T, B, {gh}), w_hh ({gh}, H), b_hh ({gh}), h0 (B, H), lengths (B)"
            ),
        )
    };
    if xw.rank() != 3 || whh.rank() != 2 {
        return Err(bad());
    }
    let (t, b, xg) = (xw.dims()[0], xw.dims()[1], xw.dims()[2]);
    let h = whh.dims()[1];
    let g = cell.gates() * h;
    if xg != g
        || whh.dims()[0] != g
        || bhh.dims() != [g]
        || h0.dims() != [b, h]
        || lengths.dims() != [b]
    {
        return Err(bad());
    }
    Ok(Shape(vec![t, b, cell.p_width() * h]))
}

/// CPU reference of the forward recurrence (f64 inside each step).
fn forward_cpu(cell: Cell, reverse: bool, x: &[&Tensor], out: &Shape) -> Tensor {
    let (xw, whh, bhh, h0, len) = (
        x[0].data(),
        x[1].data(),
        x[2].data(),
        x[3].data(),
        x[4].data(),
    );
    let (tt, bb, h) = dims(cell, out);
    let pw = cell.p_width() * h;
    let xwid = cell.gates() * h;
    let mut p = vec![0f32; out.numel()];
    for s in 0..tt {
        let t = time_of(s, tt, reverse);
        for b in 0..bb {
            let hprev: Vec<f32> = if s == 0 {
                h0[b * h..(b + 1) * h].to_vec()
            } else {
                let r = (time_of(s - 1, tt, reverse) * bb + b) * pw;
                p[r..r + h].to_vec()
            };
            let r = (t * bb + b) * pw;
            if t as f32 >= len[b] {
                // padding: carry the state, gates stay zero
                p[r..r + h].copy_from_slice(&hprev);
                continue;
            }
            // row k of W_hh h + b_hh
            let rec = |k: usize| -> f64 {
                bhh[k] as f64
                    + (0..h)
                        .map(|m| whh[k * h + m] as f64 * hprev[m] as f64)
                        .sum::<f64>()
            };
            let xo = (t * bb + b) * xwid;
            for j in 0..h {
                match cell {
                    Cell::Gru => {
                        let gr = sigmoid(xw[xo + j] as f64 + rec(j));
                        let gz = sigmoid(xw[xo + h + j] as f64 + rec(h + j));
                        let hn = rec(2 * h + j);
                        let n = (xw[xo + 2 * h + j] as f64 + gr * hn).tanh();
                        p[r + j] = ((1.0 - gz) * n + gz * hprev[j] as f64) as f32;
                        p[r + h + j] = gr as f32;
                        p[r + 2 * h + j] = gz as f32;
                        p[r + 3 * h + j] = n as f32;
                        p[r + 4 * h + j] = hn as f32;
                    }
                    Cell::Rnn => {
                        p[r + j] = (xw[xo + j] as f64 + rec(j)).tanh() as f32;
                    }
                }
            }
        }
    }
    Tensor::new(out.clone(), p).expect("packed state")
}

/// CPU reference of backward through time, the same recurrence as the kernel (f64 throughout).
fn backward_cpu(
    cell: Cell,
    reverse: bool,
    window: Option<DpWindow>,
    x: &[&Tensor],
    out: &Shape,
) -> Tensor {
    let (tt, bb, h) = dims(cell, x[0].shape());
    let dp = DpWindow::dense(window, x[5], (tt, bb, cell.p_width() * h));
    let (p, whh, h0, len, dp) = (x[0].data(), x[1].data(), x[3].data(), x[4].data(), &dp);
    let pw = cell.p_width() * h;
    let qw = cell.q_width() * h;
    let ng = cell.gates() * h;
    let (dh_col, rec_col, hprev_col) = (cell.dh_col() * h, cell.recurrent_col() * h, qw - h);
    let mut q = vec![0f64; out.numel()];
    let masked = |t: usize, b: usize| t as f32 >= len[b];
    // gradient reaching the state before time t from step t (already computed)
    let dh_before = |q: &Vec<f64>, t: usize, b: usize, j: usize| -> f64 {
        let r = (t * bb + b) * qw;
        let dh = q[r + dh_col + j];
        if masked(t, b) {
            return dh;
        }
        let direct = match cell {
            Cell::Gru => dh * p[(t * bb + b) * pw + 2 * h + j] as f64,
            Cell::Rnn => 0.0,
        };
        direct
            + (0..ng)
                .map(|k| q[r + rec_col + k] * whh[k * h + j] as f64)
                .sum::<f64>()
    };
    for k in 0..tt {
        let s = tt - 1 - k;
        let t = time_of(s, tt, reverse);
        for b in 0..bb {
            let pr = (t * bb + b) * pw;
            let mut vals = vec![0f64; qw];
            for j in 0..h {
                let mut dh = dp[pr + j] as f64;
                if k > 0 {
                    dh += dh_before(&q, time_of(s + 1, tt, reverse), b, j);
                }
                let hprev = if s == 0 {
                    h0[b * h + j]
                } else {
                    p[(time_of(s - 1, tt, reverse) * bb + b) * pw + j]
                } as f64;
                vals[dh_col + j] = dh;
                vals[hprev_col + j] = hprev;
                if masked(t, b) {
                    continue;
                }
                match cell {
                    Cell::Gru => {
                        let (gr, gz, n, hn) = (
                            p[pr + h + j] as f64,
                            p[pr + 2 * h + j] as f64,
                            p[pr + 3 * h + j] as f64,
                            p[pr + 4 * h + j] as f64,
                        );
                        let da_n = dh * (1.0 - gz) * (1.0 - n * n);
                        vals[j] = da_n * hn * gr * (1.0 - gr);
                        vals[h + j] = dh * (hprev - n) * gz * (1.0 - gz);
                        vals[2 * h + j] = da_n;
                        vals[rec_col + j] = vals[j];
                        vals[rec_col + h + j] = vals[h + j];
                        vals[rec_col + 2 * h + j] = da_n * gr;
                    }
                    Cell::Rnn => {
                        let y = p[pr + j] as f64;
                        vals[j] = dh * (1.0 - y * y);
                    }
                }
            }
            let r = (t * bb + b) * qw;
            q[r..r + qw].copy_from_slice(&vals);
        }
    }
    let t0 = time_of(0, tt, reverse);
    for b in 0..bb {
        let out_row = (tt * bb + b) * qw;
        for j in 0..h {
            q[out_row + j] = dh_before(&q, t0, b, j);
        }
    }
    Tensor::new(out.clone(), q.into_iter().map(|v| v as f32).collect()).expect("packed gradient")
}

/// The recurrent kernel over packed state `p`: whole sequence in one dispatch where H allows,
/// else one dispatch per step (`entries`: per step, whole sequence).
fn recurrent_kernel(
    cell: Cell,
    reverse: bool,
    p: &Shape,
    entries: (&'static str, &'static str),
    target: &crate::codegen::Target,
) -> KernelSpec {
    let (t, b, h) = dims(cell, p);
    super::lstm::recurrent_kernel("gru", entries, (t, b, h), reverse, target)
}

/// Backward rule of the forward recurrence (inputs `xw, w_hh, b_hh, h0, lengths`): the fused
/// backward-through-time kernel, then the recurrent weight and bias gradient as a matmul and a
/// sum; the input projection's gradients follow from `dxw` through the graph.
fn backward_rule(
    cell: Cell,
    reverse: bool,
    g: &Graph,
    x: &[NodeId],
    p: NodeId,
    dp: NodeId,
) -> Result<Vec<Option<NodeId>>> {
    let (t, b, h) = dims(cell, &g.shape(p));
    let ng = cell.gates() * h;
    let mut inputs = vec![p];
    inputs.extend(&x[1..5]);
    inputs.push(dp);
    let q = g.push_op(
        cell.backward_op(reverse),
        inputs,
        Shape(vec![t + 1, b, cell.q_width() * h]),
    )?;
    // da_r | da_z | da_n (GRU) or da (RNN) lead each row: the gradient of xw
    let steps = g.narrow(q, 0, 0, t)?;
    let dxw = g.narrow(steps, 2, 0, ng)?;
    // dW_hh = dgh^T h_prev (one matmul over all steps), dgh the gradient of W_hh h + b_hh:
    // da_r | da_z | dhn for the GRU (n's recurrent part sits inside r * (.)), da for the RNN;
    // db_hh = its column sums, summed as the input projection's bias gradient is (the RNN's
    // are the same sums of the same rows: one reduction)
    let rec = (cell.recurrent_col() * h, ng);
    let (dwhh, dgh) = super::lstm::recurrent_weight_grad(g, steps, rec, (cell.q_width() - 1) * h)?;
    let dbhh = g.sum_to(dgh, &Shape(vec![ng]))?;
    let last = g.narrow(q, 0, t, 1)?;
    let dh0 = g.reshape(g.narrow(last, 2, 0, h)?, &[b as isize, h as isize])?;
    // lengths and w_hh^T (the forward kernel's copy of w_hh) take no gradient here
    Ok(vec![
        Some(dxw),
        Some(dwhh),
        Some(dbhh),
        Some(dh0),
        None,
        None,
    ])
}

impl GruForward {
    /// Shape rule.
    pub fn infer(xw: &Shape, whh: &Shape, bhh: &Shape, h0: &Shape, len: &Shape) -> Result<Shape> {
        infer(Cell::Gru, xw, whh, bhh, h0, len)
    }

    /// CPU reference (f64 inside each step).
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        forward_cpu(Cell::Gru, self.reverse, x, out)
    }

    /// Kernel: one dispatch over the whole sequence where `lstm::whole_sequence` says, else T dispatches with one
    /// thread per (b, j).
    pub fn kernel(&self, out: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let mut k = recurrent_kernel(
            Cell::Gru,
            self.reverse,
            out,
            ("gru_forward", "gru_forward_seq"),
            target,
        );
        k.constants.extend(self.state.constants());
        k
    }

    /// Backward: fused backward through time, then dW_hh and db_hh.
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        p: NodeId,
        dp: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        backward_rule(Cell::Gru, self.reverse, g, x, p, dp)
    }
}

impl GruBackward {
    /// CPU reference, the same recurrence as the kernel.
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        backward_cpu(Cell::Gru, self.reverse, self.dp_window, x, out)
    }

    /// Kernel: one dispatch over the whole sequence where `lstm::whole_sequence` says, else T + 1 dispatches with
    /// one thread per (b, j).
    pub fn kernel(&self, p: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let mut k = recurrent_kernel(
            Cell::Gru,
            self.reverse,
            p,
            ("gru_backward", "gru_backward_seq"),
            target,
        );
        k.constants
            .extend(self.dp_window.iter().flat_map(|w| w.constants()));
        k.constants.extend(self.state.constants());
        k
    }
}

impl RnnForward {
    /// Shape rule.
    pub fn infer(xw: &Shape, whh: &Shape, bhh: &Shape, h0: &Shape, len: &Shape) -> Result<Shape> {
        infer(Cell::Rnn, xw, whh, bhh, h0, len)
    }

    /// CPU reference (f64 inside each step).
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        forward_cpu(Cell::Rnn, self.reverse, x, out)
    }

    /// Kernel: one dispatch over the whole sequence where `lstm::whole_sequence` says, else T dispatches with one
    /// thread per (b, j).
    pub fn kernel(&self, out: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let mut k = recurrent_kernel(
            Cell::Rnn,
            self.reverse,
            out,
            ("rnn_forward", "rnn_forward_seq"),
            target,
        );
        k.constants.extend(self.state.constants());
        k
    }

    /// Backward: fused backward through time, then dW_hh and db_hh.
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        p: NodeId,
        dp: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        backward_rule(Cell::Rnn, self.reverse, g, x, p, dp)
    }
}

impl RnnBackward {
    /// CPU reference, the same recurrence as the kernel.
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        backward_cpu(Cell::Rnn, self.reverse, self.dp_window, x, out)
    }

    /// Kernel: one dispatch over the whole sequence where `lstm::whole_sequence` says, else T + 1 dispatches with one
    /// thread per (b, j).
    pub fn kernel(&self, p: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let mut k = recurrent_kernel(
            Cell::Rnn,
            self.reverse,
            p,
            ("rnn_backward", "rnn_backward_seq"),
            target,
        );
        k.constants
            .extend(self.dp_window.iter().flat_map(|w| w.constants()));
        k.constants.extend(self.state.constants());
        k
    }
}
