//! One LSTM layer (PyTorch gates i, f, g, o) as a fused recurrent kernel and its fused backward
//! through time. Kernel: `shaders/lstm.wgsl`. While H allows (see `sequence_threads`) one
//! dispatch runs the whole sequence (workgroups own batch rows, which never exchange data, so
//! workgroup barriers between steps suffice); otherwise one dispatch per step.
//!
//! `LstmForward`: inputs `xw [T, B, 4H]` (the input projection of every step plus both biases,
//! one matmul done before), `w_hh [4H, H]`, `h0 [B, H]`, `c0 [B, H]`, `lengths [B]`, `w_hh^T
//! [H, 4H]` (what the step kernel reads: coalesced) -> packed state `P [T, B, 6H]` (h | c | i |
//! f | g | o). Steps at `t >= lengths[b]` carry the state.
//! `LstmBackward`: `P, w_hh, h0, c0, lengths, dP` -> `Q [T + 1, B, 7H]` (pre-activation gate
//! gradients | dc | dh | h_prev per step, h_prev the state the step started from; dh0 | dc0 in
//! the last row). The recurrent weight's gradient is one tiled matmul over all steps,
//! `dgates^T h_prev`, built in the graph; it reads both operands out of Q in place.

use super::{groups, KernelSpec, Op};
use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::tensor::{Shape, Tensor};

/// The forward recurrence of one layer and direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LstmForward {
    pub reverse: bool,
    pub state: InitialState,
}

/// Where a recurrence's kernels read its initial state (LSTM, GRU and RNN, forward and
/// backward): `h0` (`c0`) row `b` at element `offset + b * ld` of its binding, where the plan
/// compiler found it to be a narrow of a wider tensor's last axis (`exec::lower::
/// strided_operands`: a decoder starting from its encoder's last `h` and `c`, columns of the
/// encoder's `[T, B, 6H]` states), which is then never copied; `None`: rows of `H` from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InitialState {
    pub h0: Option<super::matmul::OperandRows>,
    pub c0: Option<super::matmul::OperandRows>,
}

impl InitialState {
    /// The kernels' override constants (`h0_at`, `c0_at` in their shaders).
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut k = Vec::new();
        for (rows, ld, off) in [(self.h0, "H0_LD", "H0_OFF"), (self.c0, "C0_LD", "C0_OFF")] {
            if let Some(r) = rows {
                k.push((ld, r.ld as f64));
                k.push((off, r.offset as f64));
            }
        }
        k
    }
}

/// Backward through time of [`LstmForward`]. With `dp_window` (made by the plan compiler,
/// `exec::lower::pads_into_lstm_backward`) its gradient input is only that window of `dP`, the
/// rest zeros. `state` as [`LstmForward`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LstmBackward {
    pub reverse: bool,
    pub dp_window: Option<DpWindow>,
    pub state: InitialState,
}

/// The part of a recurrence's packed state gradient `dP [T, B, W]` that is not zero (LSTM,
/// GRU and RNN backward), steps `t0 .. t0 + steps` and columns `c0 .. c0 + width` of every
/// batch row, given as a tensor `[steps, B, width]` (a classifier reading the last step's `h`
/// gives `[1, B, H]` at `(T - 1, 0)`). With `rows` (set by the plan compiler,
/// `exec::lower::strided_operands`, where that tensor is a narrow of a wider one's last axis:
/// a decoder's `dh0 | dc0` going back into its encoder; `swapped_operands`, where it swaps a
/// tensor's two leading axes: a batch-first output's gradient), the kernel reads the window's
/// rows in place from the wider or swapped tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DpWindow {
    pub t0: usize,
    pub steps: usize,
    pub c0: usize,
    pub width: usize,
    pub rows: Option<super::matmul::OperandRows>,
}

impl DpWindow {
    /// `dP [t, b, w]` from a backward kernel's gradient input: itself without a window, else
    /// the window's values with zeros around them.
    pub(crate) fn dense(
        window: Option<DpWindow>,
        dp: &Tensor,
        (t, b, w): (usize, usize, usize),
    ) -> Vec<f32> {
        let Some(win) = window else {
            return dp.data().to_vec();
        };
        let mut dense = vec![0f32; t * b * w];
        for (k, &v) in dp.data().iter().enumerate() {
            let (row, col) = (k / win.width, k % win.width);
            let (s, r) = (row / b, row % b);
            dense[((win.t0 + s) * b + r) * w + win.c0 + col] = v;
        }
        dense
    }

    /// The backward kernels' override constants (`dp_at` in their shaders).
    pub(crate) fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut k = vec![
            ("DP_T0", self.t0 as f64),
            ("DP_TL", self.steps as f64),
            ("DP_C0", self.c0 as f64),
            ("DP_CL", self.width as f64),
        ];
        if let Some(r) = self.rows {
            k.push(("DP_LD", r.ld as f64));
            k.push(("DP_OFF", r.offset as f64));
            if let Some((p, q)) = r.swap {
                k.push(("DP_SWAP_P", p as f64));
                k.push(("DP_SWAP_Q", q as f64));
            }
        }
        k
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `(T, B, H)` from the packed state's shape.
fn dims(p: &Shape) -> (usize, usize, usize) {
    (p.dims()[0], p.dims()[1], p.dims()[2] / 6)
}

/// Time index of forward step `s`.
fn time_of(s: usize, t: usize, reverse: bool) -> usize {
    if reverse {
        t - 1 - s
    } else {
        s
    }
}

/// Batch rows per workgroup of the whole-sequence kernels (one vec4 lane each).
pub(crate) const SEQUENCE_ROWS: usize = 4;

/// The largest hidden size H whose recurrences run as whole-sequence kernels on `target`.
/// Thread j owns cell j of its workgroup's rows, so H is at most the adapter's threads per
/// workgroup; the WGSL's workgroup arrays hold what a step shares (h_prev forward; the gate
/// gradients backward: 4 vec4s per cell for the LSTM, 64 bytes, the most of the three cells).
/// WebGPU's default limits (256 threads, 16 KiB) give 256; an H100 (1024, 48 KiB) 768;
/// lavapipe (1024, 32 KiB) 512.
pub fn sequence_limit(target: &crate::codegen::Target) -> usize {
    let threads = target.max_invocations.min(target.workgroup_storage / 64);
    (threads / 32 * 32) as usize
}

/// Whether a recurrence of batch `b` and hidden size `h` runs as whole-sequence kernels on
/// `target`: while H <= [`sequence_limit`], and beyond H = 256 only where its ceil(B / 4)
/// workgroups of H threads fill the adapter (`Target::parallel_workgroups` of 256 threads).
/// Up to 256 a step's work is small and one dispatch per step costs more than the
/// whole-sequence kernel's few workgroups lose; beyond, a step's work grows as H^2 and the
/// per-step kernels spread it over B * H threads instead of B / 4 workgroups (a batch of 64
/// makes 16: a fraction of an H100). `KILN_RNN_STEPS=1` forces the per-step kernels (for
/// comparisons).
pub fn whole_sequence(b: usize, h: usize, target: &crate::codegen::Target) -> bool {
    static PER_STEP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let per_step =
        *PER_STEP.get_or_init(|| std::env::var("KILN_RNN_STEPS").is_ok_and(|v| v == "1"));
    let fills = groups(b, SEQUENCE_ROWS) * h.next_multiple_of(32) as u64
        >= target.parallel_workgroups as u64 * 256;
    !per_step && h <= sequence_limit(target) && (h <= 256 || fills)
}

/// Threads per workgroup of the whole-sequence kernel for `(b, h)` on `target`, or `None` when
/// the per-step kernels run instead ([`whole_sequence`]).
fn sequence_threads(b: usize, h: usize, target: &crate::codegen::Target) -> Option<u32> {
    whole_sequence(b, h, target).then(|| h.next_multiple_of(32) as u32)
}

/// The recurrent kernel of `family` for `(T, B, H)`: the whole-sequence entry (`entries.1`,
/// ceil(B / 4) workgroups) when H allows, else `entries.0`, dispatched once per step
/// (one thread per (b, j)). Shared by the LSTM, GRU and RNN.
pub(crate) fn recurrent_kernel(
    family: &'static str,
    entries: (&'static str, &'static str),
    (t, b, h): (usize, usize, usize),
    reverse: bool,
    target: &crate::codegen::Target,
) -> KernelSpec {
    let mut constants = constants(t, b, h, reverse);
    match sequence_threads(b, h, target) {
        Some(threads) => {
            constants.push(("SEQ_WG", threads as f64));
            KernelSpec {
                family,
                entry: entries.1,
                constants,
                workgroups: groups(b, SEQUENCE_ROWS),
            }
        }
        None => KernelSpec {
            family,
            entry: entries.0,
            constants,
            workgroups: groups(b * h, 256),
        },
    }
}

/// Dispatches of a recurrent kernel over T steps with hidden size H: 1 for the whole-sequence
/// kernel, else one per step (and one more backward, for the initial state's gradient).
pub(crate) fn recurrent_dispatches(
    (t, b, h): (usize, usize, usize),
    backward: bool,
    target: &crate::codegen::Target,
) -> u32 {
    match sequence_threads(b, h, target) {
        Some(_) => 1,
        None => t as u32 + backward as u32,
    }
}

fn constants(t: usize, b: usize, h: usize, reverse: bool) -> Vec<(&'static str, f64)> {
    vec![
        ("T", t as f64),
        ("B", b as f64),
        ("H", h as f64),
        ("REVERSE", reverse as u8 as f64),
    ]
}

impl LstmForward {
    /// Shape rule.
    pub fn infer(
        xw: &Shape,
        whh: &Shape,
        h0: &Shape,
        c0: &Shape,
        lengths: &Shape,
    ) -> Result<Shape> {
        let bad = || {
            Error::Shape {
            op: "lstm",
            msg: format!(
                "xw {xw}, w_hh {whh}, h0 {h0}, c0 {c0}, lengths {lengths}: expected xw (T, B, 4H), w_hh (4H, H), h0 and c0 (B, H), lengths (B)"
            ),
        }
        };
        if xw.rank() != 3 || whh.rank() != 2 {
            return Err(bad());
        }
        let (t, b, h4) = (xw.dims()[0], xw.dims()[1], xw.dims()[2]);
        let h = whh.dims()[1];
        if h4 != 4 * h
            || whh.dims()[0] != 4 * h
            || h0.dims() != [b, h]
            || c0.dims() != [b, h]
            || lengths.dims() != [b]
        {
            return Err(bad());
        }
        Ok(Shape(vec![t, b, 6 * h]))
    }

    /// CPU reference (f64 inside each step).
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        let (xw, whh, h0, c0, len) = (
            x[0].data(),
            x[1].data(),
            x[2].data(),
            x[3].data(),
            x[4].data(),
        );
        let (tt, bb, h) = dims(out);
        let mut p = vec![0f32; out.numel()];
        let row = |t: usize, b: usize| (t * bb + b) * 6 * h;
        for s in 0..tt {
            let t = time_of(s, tt, self.reverse);
            for b in 0..bb {
                let tp = if s == 0 {
                    None
                } else {
                    Some(time_of(s - 1, tt, self.reverse))
                };
                let hprev = |m: usize, p: &Vec<f32>| {
                    tp.map(|tp| p[row(tp, b) + m]).unwrap_or(h0[b * h + m])
                };
                let cprev = |j: usize, p: &Vec<f32>| {
                    tp.map(|tp| p[row(tp, b) + h + j]).unwrap_or(c0[b * h + j])
                };
                let r = row(t, b);
                let mut newrow = vec![0f32; 6 * h];
                for j in 0..h {
                    if t as f32 >= len[b] {
                        newrow[j] = hprev(j, &p);
                        newrow[h + j] = cprev(j, &p);
                        continue;
                    }
                    let xo = (t * bb + b) * 4 * h;
                    let mut a = [0f64; 4];
                    for (k, ak) in a.iter_mut().enumerate() {
                        *ak = xw[xo + k * h + j] as f64;
                        for m in 0..h {
                            *ak += hprev(m, &p) as f64 * whh[(k * h + j) * h + m] as f64;
                        }
                    }
                    let (gi, gf, gg, go) =
                        (sigmoid(a[0]), sigmoid(a[1]), a[2].tanh(), sigmoid(a[3]));
                    let c = gf * cprev(j, &p) as f64 + gi * gg;
                    newrow[j] = (go * c.tanh()) as f32;
                    newrow[h + j] = c as f32;
                    newrow[2 * h + j] = gi as f32;
                    newrow[3 * h + j] = gf as f32;
                    newrow[4 * h + j] = gg as f32;
                    newrow[5 * h + j] = go as f32;
                }
                p[r..r + 6 * h].copy_from_slice(&newrow);
            }
        }
        Tensor::new(out.clone(), p).expect("packed state")
    }

    /// Kernel: one dispatch over the whole sequence where [`whole_sequence`] says, else
    /// T dispatches with one thread per (b, j).
    pub fn kernel(&self, out: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let (t, b, h) = dims(out);
        let mut k = recurrent_kernel(
            "lstm",
            ("lstm_forward", "lstm_forward_seq"),
            (t, b, h),
            self.reverse,
            target,
        );
        k.constants.extend(self.state.constants());
        k
    }

    /// Backward: the fused backward-through-time kernel, then the recurrent weight gradient as
    /// one matmul; the input projection's gradients follow from `dxw` through the graph.
    pub fn backward(
        &self,
        g: &Graph,
        x: &[NodeId],
        p: NodeId,
        dp: NodeId,
    ) -> Result<Vec<Option<NodeId>>> {
        let ps = g.shape(p);
        let (t, b, h) = dims(&ps);
        let mut inputs = vec![p];
        inputs.extend(&x[1..5]);
        inputs.push(dp);
        let q = g.push_op(
            Op::LstmBackward(LstmBackward {
                reverse: self.reverse,
                dp_window: None,
                state: InitialState::default(),
            }),
            inputs,
            Shape(vec![t + 1, b, 7 * h]),
        )?;
        let steps = g.narrow(q, 0, 0, t)?;
        let dxw = g.narrow(steps, 2, 0, 4 * h)?;
        let (dwhh, _) = recurrent_weight_grad(g, steps, (0, 4 * h), 6 * h)?;
        let last = g.narrow(q, 0, t, 1)?;
        let dh0 = g.reshape(g.narrow(last, 2, 0, h)?, &[b as isize, h as isize])?;
        let dc0 = g.reshape(g.narrow(last, 2, h, h)?, &[b as isize, h as isize])?;
        // lengths and w_hh^T (a copy of w_hh for the kernel's reads) take no gradient here:
        // w_hh's whole gradient is dwhh
        Ok(vec![
            Some(dxw),
            Some(dwhh),
            Some(dh0),
            Some(dc0),
            None,
            None,
        ])
    }
}

/// The gradient of a recurrent weight, `sum over steps of dgates_t^T h_prev(t)`, as one tiled
/// matmul over all `T * B` rows of the backward kernel's packed gradient `steps (T, B, W)` (its
/// rows but the initial state's): `dgates` are its columns `gates` (start, width), `h_prev(t)`
/// (the state step t started from) its H columns from `h_prev`, which the kernel writes so
/// that no copy of the states and h0 is needed. The product reads both in place
/// (`exec::lower::strided_operands`). Returns the gradient `[width, H]` and `dgates [T*B,
/// width]`. Shared by the LSTM, GRU and RNN backward rules.
pub(crate) fn recurrent_weight_grad(
    g: &Graph,
    steps: NodeId,
    gates: (usize, usize),
    h_prev: usize,
) -> Result<(NodeId, NodeId)> {
    let s = g.shape(steps);
    let (t, b, w) = (s.dims()[0], s.dims()[1], s.dims()[2]);
    let h = w - h_prev;
    let rows = (t * b) as isize;
    let dgates = g.reshape(
        g.narrow(steps, 2, gates.0, gates.1)?,
        &[rows, gates.1 as isize],
    )?;
    let hprev = g.reshape(g.narrow(steps, 2, h_prev, h)?, &[rows, h as isize])?;
    Ok((g.matmul_t(dgates, hprev, true, false)?, dgates))
}

impl LstmBackward {
    /// CPU reference, the same recurrence as the kernel.
    pub fn cpu(&self, x: &[&Tensor], out: &Shape) -> Tensor {
        let (tt, bb, h) = dims(x[0].shape());
        let dp = DpWindow::dense(self.dp_window, x[5], (tt, bb, 6 * h));
        let (p, whh, h0, c0, len, dp) = (
            x[0].data(),
            x[1].data(),
            x[2].data(),
            x[3].data(),
            x[4].data(),
            &dp,
        );
        let mut q = vec![0f64; out.numel()];
        let row = |t: usize, b: usize| (t * bb + b) * 6 * h;
        let qrow = |t: usize, b: usize| (t * bb + b) * 7 * h;
        let masked = |t: usize, b: usize| t as f32 >= len[b];
        let dh_before = |q: &Vec<f64>, t: usize, b: usize, j: usize| -> f64 {
            let r = qrow(t, b);
            if masked(t, b) {
                return q[r + 5 * h + j];
            }
            (0..4 * h).map(|k| q[r + k] * whh[k * h + j] as f64).sum()
        };
        let dc_before = |q: &Vec<f64>, t: usize, b: usize, j: usize| -> f64 {
            let dc = q[qrow(t, b) + 4 * h + j];
            if masked(t, b) {
                dc
            } else {
                dc * p[row(t, b) + 3 * h + j] as f64
            }
        };
        for k in 0..tt {
            let s = tt - 1 - k;
            let t = time_of(s, tt, self.reverse);
            for b in 0..bb {
                let r = row(t, b);
                let mut vals = vec![0f64; 7 * h];
                for j in 0..h {
                    vals[6 * h + j] = if s == 0 {
                        h0[b * h + j]
                    } else {
                        p[row(time_of(s - 1, tt, self.reverse), b) + j]
                    } as f64;
                    let mut dh = dp[r + j] as f64;
                    let mut dc = dp[r + h + j] as f64;
                    if k > 0 {
                        let tn = time_of(s + 1, tt, self.reverse);
                        dh += dh_before(&q, tn, b, j);
                        dc += dc_before(&q, tn, b, j);
                    }
                    if masked(t, b) {
                        vals[4 * h + j] = dc;
                        vals[5 * h + j] = dh;
                        continue;
                    }
                    let c_prev = if s == 0 {
                        c0[b * h + j]
                    } else {
                        p[row(time_of(s - 1, tt, self.reverse), b) + h + j]
                    } as f64;
                    let c = p[r + h + j] as f64;
                    let (gi, gf, gg, go) = (
                        p[r + 2 * h + j] as f64,
                        p[r + 3 * h + j] as f64,
                        p[r + 4 * h + j] as f64,
                        p[r + 5 * h + j] as f64,
                    );
                    let tc = c.tanh();
                    dc += dh * go * (1.0 - tc * tc);
                    vals[j] = dc * gg * gi * (1.0 - gi);
                    vals[h + j] = dc * c_prev * gf * (1.0 - gf);
                    vals[2 * h + j] = dc * gi * (1.0 - gg * gg);
                    vals[3 * h + j] = dh * tc * go * (1.0 - go);
                    vals[4 * h + j] = dc;
                    vals[5 * h + j] = dh;
                }
                let rq = qrow(t, b);
                q[rq..rq + 7 * h].copy_from_slice(&vals);
            }
        }
        let t0 = time_of(0, tt, self.reverse);
        for b in 0..bb {
            let out_row = qrow(tt, b);
            for j in 0..h {
                q[out_row + j] = dh_before(&q, t0, b, j);
                q[out_row + h + j] = dc_before(&q, t0, b, j);
            }
        }
        Tensor::new(out.clone(), q.into_iter().map(|v| v as f32).collect())
            .expect("packed gradient")
    }

    /// Kernel: one dispatch over the whole sequence where [`whole_sequence`] says, else
    /// T + 1 dispatches with one thread per (b, j).
    pub fn kernel(&self, p: &Shape, target: &crate::codegen::Target) -> KernelSpec {
        let (t, b, h) = dims(p);
        let mut k = recurrent_kernel(
            "lstm",
            ("lstm_backward", "lstm_backward_seq"),
            (t, b, h),
            self.reverse,
            target,
        );
        k.constants
            .extend(self.dp_window.iter().flat_map(|w| w.constants()));
        k.constants.extend(self.state.constants());
        k
    }
}
