// gru.wgsl: one GRU layer (PyTorch gate order r, z, n) and one vanilla tanh RNN layer
// (torch.nn.RNN, nonlinearity tanh), each fused per time step (or over the whole sequence, below),
// and their backward through time.
// The input projection x W_ih^T + b_ih of all steps is one matmul done before (`xw`); each step
// adds the recurrent projection W_hh h + b_hh. The gradients of W_hh and b_hh are a tiled matmul
// and a sum over all steps, built in the graph; they read their operands out of Q in place.
// Sequences shorter than T (lengths[b]) carry their state over the padding.
//
// GRU:  r = sigmoid(xw_r + W_hr h + b_hr), z = sigmoid(xw_z + W_hz h + b_hz),
//       hn = W_hn h + b_hn, n = tanh(xw_n + r * hn), h' = (1 - z) * n + z * h.
//   Packed state P [T, B, 5H], per (t, b): h | r | z | n | hn (zeros past the gates when padded).
//   Packed gradient Q [T + 1, B, 8H], rows t < T: da_r | da_z | da_n | dh_t | da_r | da_z | dhn |
//   h_prev, where da_* are pre-activation gradients (da_r | da_z | da_n is the gradient of xw),
//   dhn that of hn (da_r | da_z | dhn, that of W_hh h + b_hh, is what the recurrent weight's
//   gradient reads, hence the copies) and h_prev the state step t started from; row T: dh0 | 0.
// RNN:  h' = tanh(xw + W_hh h + b_hh).
//   Packed state P [T, B, H] (h). Packed gradient Q [T + 1, B, 3H], rows t < T: da | dh_t |
//   h_prev; row T: dh0 | 0 | 0.
//
// Bindings (the same for both cells; step index from the uniform, t = s, or T-1-s when REVERSE)
// Entries `gru_forward`, `rnn_forward` (dispatched T times, step s = 0..T-1):
//   0  step     uniform, dynamic offset  vec4<u32>, x = s
//   1  xw       storage, read            [T, B, 3H] (GRU) / [T, B, H] (RNN)
//   2  whh      storage, read            [3H, H] / [H, H]
//   3  bhh      storage, read            [3H] / [H]
//   4  h0       storage, read            [B, H]
//   5  lengths  storage, read            [B] whole numbers in [0, T]
//   6  whh_t    storage, read            [H, 3H] / [H, H], w_hh transposed (coalesced reads)
//   7  p        storage, read_write      P
// Entries `gru_backward`, `rnn_backward` (dispatched T + 1 times: the steps in reverse order, then
// k = T writes dh0):
//   0 step; 1 p (read) P; 2 whh; 3 bhh (unused); 4 h0; 5 lengths; 6 dp (read) dP, P's shape,
//   or only its window [DP_TL, B, DP_CL] at (DP_T0, DP_C0), zeros around it (the pads of the
//   gradient of part of P, folded in by the plan compiler); 7 q (read_write) Q
// f16 variant (`gru_f16`, generated from the storage block): every tensor f16 but the f32
// lengths; each step computes in f32 (the whole-sequence kernels keep the state in f32 registers).
// Overrides: T, B, H, REVERSE; DP_T0, DP_TL, DP_C0, DP_CL (dp's window; 0 extents: all of it),
//            DP_LD, DP_OFF (its row r starts at element DP_OFF + r * DP_LD of the binding:
//            rows of a wider tensor read in place; DP_LD 0: rows of the window's width),
//            DP_SWAP_P, DP_SWAP_Q (its rows those of a (P, Q, ..) tensor with its leading axes
//            swapped; 1: not);
//            H0_LD, H0_OFF: h0's row b starts at element H0_OFF + b * H0_LD of its binding (a
//            narrow of a wider tensor's last axis read in place; rows of H from 0 by default).
// Dispatch: ceil(B * H / 256) workgroups per step, one thread per (b, j), folded into
//           (x <= 65535, y).

override T: u32 = 1u;
override B: u32 = 1u;
override H: u32 = 1u;
override REVERSE: bool = false;
override DP_T0: u32 = 0u;
override DP_TL: u32 = 0u;
override DP_C0: u32 = 0u;
override DP_CL: u32 = 0u;
override DP_LD: u32 = 0u;
override DP_OFF: u32 = 0u;
override DP_SWAP_P: u32 = 1u;
override DP_SWAP_Q: u32 = 1u;
override H0_LD: u32 = H;
override H0_OFF: u32 = 0u;

// Element (b, j) of the initial state in its binding.
fn h0_at(b: u32, j: u32) -> u32 {
    return H0_OFF + b * H0_LD + j;
}
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> step: vec4<u32>;
// generated: begin storage
@group(0) @binding(1) var<storage, read> xw: array<f32>;
@group(0) @binding(2) var<storage, read> whh: array<f32>;
@group(0) @binding(3) var<storage, read> bhh: array<f32>;
@group(0) @binding(4) var<storage, read> h0: array<f32>;
@group(0) @binding(5) var<storage, read> lengths: array<f32>; // always f32
@group(0) @binding(6) var<storage, read> whh_t: array<f32>;
@group(0) @binding(7) var<storage, read_write> p: array<f32>;
@group(0) @binding(1) var<storage, read> p_in: array<f32>;
@group(0) @binding(6) var<storage, read> dp: array<f32>;
@group(0) @binding(7) var<storage, read_write> q: array<f32>;
fn ld_xw(i: u32) -> f32 { return xw[i]; }
fn ld_whh(i: u32) -> f32 { return whh[i]; }
fn ld_bhh(i: u32) -> f32 { return bhh[i]; }
fn ld_h0(i: u32) -> f32 { return h0[i]; }
fn ld_whh_t(i: u32) -> f32 { return whh_t[i]; }
fn ld_p(i: u32) -> f32 { return p[i]; }
fn st_p(i: u32, v: f32) { p[i] = v; }
fn ld_p_in(i: u32) -> f32 { return p_in[i]; }
fn ld_dp(i: u32) -> f32 { return dp[i]; }
fn ld_q(i: u32) -> f32 { return q[i]; }
fn st_q(i: u32, v: f32) { q[i] = v; }
// generated: end storage

// The binding's row of the window's row r: r, or with DP_SWAP_P > 1 the row of a
// (DP_SWAP_P, DP_SWAP_Q, ..) tensor whose two leading axes the window swaps (a batch-first
// gradient read in place). (DP_SWAP_P is 1, not 0, when there is no swap: a divisor that
// constants make 0 fails the pipeline's creation.)
fn dp_row(r: u32) -> u32 {
    if DP_SWAP_P == 1u {
        return r;
    }
    return (r % DP_SWAP_P) * DP_SWAP_Q + r / DP_SWAP_P;
}

// Element `col` of row (t, b) of dP (rows of `width`): read from the window the graph computed
// (all of dP where DP_TL and DP_CL are 0), 0 around it.
fn dp_at(t: u32, b: u32, col: u32, width: u32) -> f32 {
    let steps = select(DP_TL, T, DP_TL == 0u);
    let cols = select(DP_CL, width, DP_CL == 0u);
    if t < DP_T0 || t >= DP_T0 + steps || col < DP_C0 || col >= DP_C0 + cols {
        return 0.0;
    }
    let row = dp_row((t - DP_T0) * B + b);
    return ld_dp(DP_OFF + row * select(DP_LD, cols, DP_LD == 0u) + col - DP_C0);
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn tanh_safe(x: f32) -> f32 {
    return tanh(clamp(x, -10.0, 10.0));
}

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

// Time index of forward step s.
fn time_of(s: u32) -> u32 {
    return select(s, T - 1u - s, REVERSE);
}

fn masked(t: u32, b: u32) -> bool {
    return f32(t) >= lengths[b];
}

// Element m of the state before forward step s, during the forward pass.
fn h_prev_fwd(s: u32, b: u32, m: u32, width: u32) -> f32 {
    if s == 0u {
        return ld_h0(h0_at(b, m));
    }
    return ld_p((time_of(s - 1u) * B + b) * width + m);
}

// The same during the backward pass.
fn h_prev_bwd(s: u32, b: u32, m: u32, width: u32) -> f32 {
    if s == 0u {
        return ld_h0(h0_at(b, m));
    }
    return ld_p_in((time_of(s - 1u) * B + b) * width + m);
}

// ---- GRU ----

@compute @workgroup_size(256)
fn gru_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_id(wid, nwg, lid);
    if id >= B * H {
        return;
    }
    let b = id / H;
    let j = id % H;
    let s = step.x;
    let t = time_of(s);
    let r = (t * B + b) * 5u * H;
    let hj = h_prev_fwd(s, b, j, 5u * H);
    if masked(t, b) {
        // padding: carry the state, no gates
        st_p(r + j, hj);
        st_p(r + H + j, 0.0);
        st_p(r + 2u * H + j, 0.0);
        st_p(r + 3u * H + j, 0.0);
        st_p(r + 4u * H + j, 0.0);
        return;
    }
    let x = (t * B + b) * 3u * H;
    var a_r = ld_xw(x + j) + ld_bhh(j);
    var a_z = ld_xw(x + H + j) + ld_bhh(H + j);
    var hn = ld_bhh(2u * H + j);
    for (var m = 0u; m < H; m = m + 1u) {
        let h = h_prev_fwd(s, b, m, 5u * H);
        let w = m * 3u * H + j;
        a_r = a_r + h * ld_whh_t(w);
        a_z = a_z + h * ld_whh_t(w + H);
        hn = hn + h * ld_whh_t(w + 2u * H);
    }
    let gr = sigmoid(a_r);
    let gz = sigmoid(a_z);
    let n = tanh_safe(ld_xw(x + 2u * H + j) + gr * hn);
    st_p(r + j, (1.0 - gz) * n + gz * hj);
    st_p(r + H + j, gr);
    st_p(r + 2u * H + j, gz);
    st_p(r + 3u * H + j, n);
    st_p(r + 4u * H + j, hn);
}

// Gradient reaching the state before time t from step t (already computed): through z and the
// recurrent projection when t was a real step, straight through when it was padding.
fn gru_dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = (t * B + b) * 8u * H;
    let dh = ld_q(r + 3u * H + j);
    if masked(t, b) {
        return dh;
    }
    var acc = dh * ld_p_in((t * B + b) * 5u * H + 2u * H + j);
    for (var k = 0u; k < H; k = k + 1u) {
        acc = acc + ld_q(r + 4u * H + k) * ld_whh(k * H + j);
        acc = acc + ld_q(r + 5u * H + k) * ld_whh((H + k) * H + j);
        acc = acc + ld_q(r + 6u * H + k) * ld_whh((2u * H + k) * H + j);
    }
    return acc;
}

@compute @workgroup_size(256)
fn gru_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_id(wid, nwg, lid);
    if id >= B * H {
        return;
    }
    let b = id / H;
    let j = id % H;
    let k = step.x;
    if k == T {
        // the gradient for the initial state, from the first forward step
        let out = (T * B + b) * 8u * H;
        let dh0 = gru_dh_before(time_of(0u), b, j);
        st_q(out + j, dh0);
        for (var col = 1u; col < 8u; col = col + 1u) {
            st_q(out + col * H + j, 0.0);
        }
        return;
    }
    // backward step k handles forward step s = T-1-k
    let s = T - 1u - k;
    let t = time_of(s);
    let r = (t * B + b) * 5u * H;
    let rq = (t * B + b) * 8u * H;
    var dh = dp_at(t, b, j, 5u * H);
    if k > 0u {
        dh = dh + gru_dh_before(time_of(s + 1u), b, j);
    }
    let hj = h_prev_bwd(s, b, j, 5u * H);
    st_q(rq + 3u * H + j, dh);
    st_q(rq + 7u * H + j, hj);
    if masked(t, b) {
        st_q(rq + j, 0.0);
        st_q(rq + H + j, 0.0);
        st_q(rq + 2u * H + j, 0.0);
        st_q(rq + 4u * H + j, 0.0);
        st_q(rq + 5u * H + j, 0.0);
        st_q(rq + 6u * H + j, 0.0);
        return;
    }
    let gr = ld_p_in(r + H + j);
    let gz = ld_p_in(r + 2u * H + j);
    let n = ld_p_in(r + 3u * H + j);
    let hn = ld_p_in(r + 4u * H + j);
    let da_n = dh * (1.0 - gz) * (1.0 - n * n);
    let da_r = da_n * hn * gr * (1.0 - gr);
    let da_z = dh * (hj - n) * gz * (1.0 - gz);
    st_q(rq + j, da_r);
    st_q(rq + H + j, da_z);
    st_q(rq + 2u * H + j, da_n);
    st_q(rq + 4u * H + j, da_r);
    st_q(rq + 5u * H + j, da_z);
    st_q(rq + 6u * H + j, da_n * gr);
}

// ---- vanilla tanh RNN ----

@compute @workgroup_size(256)
fn rnn_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_id(wid, nwg, lid);
    if id >= B * H {
        return;
    }
    let b = id / H;
    let j = id % H;
    let s = step.x;
    let t = time_of(s);
    let r = (t * B + b) * H;
    if masked(t, b) {
        st_p(r + j, h_prev_fwd(s, b, j, H));
        return;
    }
    var a = ld_xw(r + j) + ld_bhh(j);
    for (var m = 0u; m < H; m = m + 1u) {
        a = a + h_prev_fwd(s, b, m, H) * ld_whh_t(m * H + j);
    }
    st_p(r + j, tanh_safe(a));
}

fn rnn_dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = (t * B + b) * 3u * H;
    if masked(t, b) {
        return ld_q(r + H + j);
    }
    var acc = 0.0;
    for (var k = 0u; k < H; k = k + 1u) {
        acc = acc + ld_q(r + k) * ld_whh(k * H + j);
    }
    return acc;
}

@compute @workgroup_size(256)
fn rnn_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_id(wid, nwg, lid);
    if id >= B * H {
        return;
    }
    let b = id / H;
    let j = id % H;
    let k = step.x;
    if k == T {
        let out = (T * B + b) * 3u * H;
        let dh0 = rnn_dh_before(time_of(0u), b, j);
        st_q(out + j, dh0);
        st_q(out + H + j, 0.0);
        st_q(out + 2u * H + j, 0.0);
        return;
    }
    let s = T - 1u - k;
    let t = time_of(s);
    let r = (t * B + b) * 3u * H;
    var dh = dp_at(t, b, j, H);
    if k > 0u {
        dh = dh + rnn_dh_before(time_of(s + 1u), b, j);
    }
    st_q(r + H + j, dh);
    st_q(r + 2u * H + j, h_prev_bwd(s, b, j, H));
    if masked(t, b) {
        st_q(r + j, 0.0);
        return;
    }
    let y = ld_p_in((t * B + b) * H + j);
    st_q(r + j, dh * (1.0 - y * y));
}

// ---- whole-sequence kernels: one dispatch per layer and direction ----
// Batch rows never exchange data, so a workgroup can run its rows through all T steps with only
// workgroup barriers between steps: no dispatch per step. Each workgroup owns 4 batch rows
// b0..b0+3 (one vec4 lane per row; lanes past B stay idle); thread j owns cell j of the four
// rows and keeps h in registers; h_prev (or the step's gate gradients) is shared through
// workgroup memory, sized by SEQ_WG (backward: 3 SEQ_WG vec4s for the GRU, 12 KB at H = 256).
// Used where src/ops/lstm.rs's `whole_sequence` says, else the per-step kernels above.
// Entries `gru_forward_seq`, `rnn_forward_seq`: bindings as the per-step forward entries
// (binding 0 unused, offset 0); `gru_backward_seq`, `rnn_backward_seq`: as the backward ones.
// Overrides: T, B, H, REVERSE, SEQ_WG (threads per workgroup, >= H).
// Dispatch: ceil(B / 4) workgroups of SEQ_WG threads, folded into (x <= 65535, y).

override SEQ_WG: u32 = 64u;

// h_prev of the 4 rows, [m] = vec4(rows)
var<workgroup> h_rows: array<vec4<f32>, SEQ_WG>;
// the step's gate gradients of the 4 rows, [k * H + m]
var<workgroup> g_rows: array<vec4<f32>, 3u * SEQ_WG>;

fn quad_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.y * nwg.x + wid.x) * 4u;
}

// Which of the 4 rows exist and run a real step at time t.
fn live4(t: u32, b0: u32) -> vec4<bool> {
    let tf = f32(t);
    return vec4<bool>(
        b0 < B && tf < lengths[min(b0, B - 1u)],
        b0 + 1u < B && tf < lengths[min(b0 + 1u, B - 1u)],
        b0 + 2u < B && tf < lengths[min(b0 + 2u, B - 1u)],
        b0 + 3u < B && tf < lengths[min(b0 + 3u, B - 1u)],
    );
}

// Element `col` of row (t, b) of a [T, B, width] buffer, for the 4 rows (0 past B).
fn xw4(t: u32, b0: u32, col: u32, width: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = ld_xw((t * B + b0) * width + col); }
    if b0 + 1u < B { v.y = ld_xw((t * B + b0 + 1u) * width + col); }
    if b0 + 2u < B { v.z = ld_xw((t * B + b0 + 2u) * width + col); }
    if b0 + 3u < B { v.w = ld_xw((t * B + b0 + 3u) * width + col); }
    return v;
}

fn p4(t: u32, b0: u32, col: u32, width: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = ld_p_in((t * B + b0) * width + col); }
    if b0 + 1u < B { v.y = ld_p_in((t * B + b0 + 1u) * width + col); }
    if b0 + 2u < B { v.z = ld_p_in((t * B + b0 + 2u) * width + col); }
    if b0 + 3u < B { v.w = ld_p_in((t * B + b0 + 3u) * width + col); }
    return v;
}

fn dp4(t: u32, b0: u32, col: u32, width: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = dp_at(t, b0, col, width); }
    if b0 + 1u < B { v.y = dp_at(t, b0 + 1u, col, width); }
    if b0 + 2u < B { v.z = dp_at(t, b0 + 2u, col, width); }
    if b0 + 3u < B { v.w = dp_at(t, b0 + 3u, col, width); }
    return v;
}

fn h0_4(b0: u32, j: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = ld_h0(h0_at(b0, j)); }
    if b0 + 1u < B { v.y = ld_h0(h0_at(b0 + 1u, j)); }
    if b0 + 2u < B { v.z = ld_h0(h0_at(b0 + 2u, j)); }
    if b0 + 3u < B { v.w = ld_h0(h0_at(b0 + 3u, j)); }
    return v;
}

fn tanh4(x: vec4<f32>) -> vec4<f32> {
    return tanh(clamp(x, vec4<f32>(-10.0), vec4<f32>(10.0)));
}

fn sigmoid4(x: vec4<f32>) -> vec4<f32> {
    return 1.0 / (1.0 + exp(-x));
}

// GRU: writes h | r | z | n | hn of cell j of row (t, b).
fn gru_put_state(t: u32, b: u32, j: u32, h: f32, g: vec4<f32>) {
    if b >= B {
        return;
    }
    let r = (t * B + b) * 5u * H;
    st_p(r + j, h);
    st_p(r + H + j, g.x);
    st_p(r + 2u * H + j, g.y);
    st_p(r + 3u * H + j, g.z);
    st_p(r + 4u * H + j, g.w);
}

// GRU: writes da_r | da_z | da_n | dh | da_r | da_z | dhn | h_prev of cell j of row t (< T) of
// Q (g = da_r, da_z, da_n, dhn), or dh0 | 0 (t = T).
fn gru_put_grad(t: u32, b: u32, j: u32, g: vec4<f32>, dh: f32, h_prev: f32) {
    if b >= B {
        return;
    }
    let r = (t * B + b) * 8u * H;
    if t == T {
        st_q(r + j, dh);
        for (var col = 1u; col < 8u; col = col + 1u) {
            st_q(r + col * H + j, 0.0);
        }
        return;
    }
    st_q(r + j, g.x);
    st_q(r + H + j, g.y);
    st_q(r + 2u * H + j, g.z);
    st_q(r + 3u * H + j, dh);
    st_q(r + 4u * H + j, g.x);
    st_q(r + 5u * H + j, g.y);
    st_q(r + 6u * H + j, g.w);
    st_q(r + 7u * H + j, h_prev);
}

@compute @workgroup_size(SEQ_WG)
fn gru_forward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    var h = h0_4(b0, min(j, H - 1u));
    let zero = vec4<f32>(0.0);
    for (var s = 0u; s < T; s = s + 1u) {
        let t = time_of(s);
        if cell {
            h_rows[j] = h;
        }
        workgroupBarrier();
        if cell {
            let x = 3u * H;
            var a_r = xw4(t, b0, j, x) + ld_bhh(j);
            var a_z = xw4(t, b0, H + j, x) + ld_bhh(H + j);
            var hn = vec4<f32>(ld_bhh(2u * H + j));
            for (var m = 0u; m < H; m = m + 1u) {
                let hm = h_rows[m];
                let w = m * x + j;
                a_r = a_r + hm * ld_whh_t(w);
                a_z = a_z + hm * ld_whh_t(w + H);
                hn = hn + hm * ld_whh_t(w + 2u * H);
            }
            let live = live4(t, b0);
            let gr = sigmoid4(a_r);
            let gz = sigmoid4(a_z);
            let n = tanh4(xw4(t, b0, 2u * H + j, x) + gr * hn);
            // padded steps carry the state and write no gates
            h = select(h, (1.0 - gz) * n + gz * h, live);
            let r4 = select(zero, gr, live);
            let z4 = select(zero, gz, live);
            let n4 = select(zero, n, live);
            let hn4 = select(zero, hn, live);
            gru_put_state(t, b0, j, h.x, vec4<f32>(r4.x, z4.x, n4.x, hn4.x));
            gru_put_state(t, b0 + 1u, j, h.y, vec4<f32>(r4.y, z4.y, n4.y, hn4.y));
            gru_put_state(t, b0 + 2u, j, h.z, vec4<f32>(r4.z, z4.z, n4.z, hn4.z));
            gru_put_state(t, b0 + 3u, j, h.w, vec4<f32>(r4.w, z4.w, n4.w, hn4.w));
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(SEQ_WG)
fn gru_backward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    let zero = vec4<f32>(0.0);
    // gradient reaching the state before the step processed last
    var dh_next = zero;
    for (var k = 0u; k < T; k = k + 1u) {
        let s = T - 1u - k;
        let t = time_of(s);
        let live = live4(t, b0);
        var dh = zero;
        var gz = zero;
        if cell {
            let w = 5u * H;
            dh = dp4(t, b0, j, w) + dh_next;
            var h_prev = h0_4(b0, j);
            if s > 0u {
                h_prev = p4(time_of(s - 1u), b0, j, w);
            }
            let gr = p4(t, b0, H + j, w);
            gz = p4(t, b0, 2u * H + j, w);
            let n = p4(t, b0, 3u * H + j, w);
            let hn = p4(t, b0, 4u * H + j, w);
            let da_n = dh * (1.0 - gz) * (1.0 - n * n);
            let d_r = select(zero, da_n * hn * gr * (1.0 - gr), live);
            let d_z = select(zero, dh * (h_prev - n) * gz * (1.0 - gz), live);
            let d_n = select(zero, da_n, live);
            let d_hn = select(zero, da_n * gr, live);
            g_rows[j] = d_r;
            g_rows[H + j] = d_z;
            g_rows[2u * H + j] = d_hn;
            let hp = h_prev;
            gru_put_grad(t, b0, j, vec4<f32>(d_r.x, d_z.x, d_n.x, d_hn.x), dh.x, hp.x);
            gru_put_grad(t, b0 + 1u, j, vec4<f32>(d_r.y, d_z.y, d_n.y, d_hn.y), dh.y, hp.y);
            gru_put_grad(t, b0 + 2u, j, vec4<f32>(d_r.z, d_z.z, d_n.z, d_hn.z), dh.z, hp.z);
            gru_put_grad(t, b0 + 3u, j, vec4<f32>(d_r.w, d_z.w, d_n.w, d_hn.w), dh.w, hp.w);
        }
        workgroupBarrier();
        if cell {
            // through z and the recurrent projection for real steps, straight through for padding
            var a0 = dh * gz;
            var a1 = zero;
            var a2 = zero;
            for (var m = 0u; m < H; m = m + 1u) {
                a0 = a0 + g_rows[m] * ld_whh(m * H + j);
                a1 = a1 + g_rows[H + m] * ld_whh((H + m) * H + j);
                a2 = a2 + g_rows[2u * H + m] * ld_whh((2u * H + m) * H + j);
            }
            dh_next = select(dh, a0 + a1 + a2, live);
        }
        workgroupBarrier();
    }
    if cell {
        gru_put_grad(T, b0, j, zero, dh_next.x, 0.0);
        gru_put_grad(T, b0 + 1u, j, zero, dh_next.y, 0.0);
        gru_put_grad(T, b0 + 2u, j, zero, dh_next.z, 0.0);
        gru_put_grad(T, b0 + 3u, j, zero, dh_next.w, 0.0);
    }
}

// RNN: writes h of cell j of row (t, b).
fn rnn_put_state(t: u32, b: u32, j: u32, h: f32) {
    if b < B {
        st_p((t * B + b) * H + j, h);
    }
}

// RNN: writes da | dh | h_prev of cell j of row t (< T) of Q, or dh0 | 0 | 0 (t = T, da = dh0
// there).
fn rnn_put_grad(t: u32, b: u32, j: u32, da: f32, dh: f32, h_prev: f32) {
    if b < B {
        let r = (t * B + b) * 3u * H;
        st_q(r + j, da);
        st_q(r + H + j, dh);
        st_q(r + 2u * H + j, h_prev);
    }
}

@compute @workgroup_size(SEQ_WG)
fn rnn_forward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    var h = h0_4(b0, min(j, H - 1u));
    for (var s = 0u; s < T; s = s + 1u) {
        let t = time_of(s);
        if cell {
            h_rows[j] = h;
        }
        workgroupBarrier();
        if cell {
            var a = xw4(t, b0, j, H) + ld_bhh(j);
            for (var m = 0u; m < H; m = m + 1u) {
                a = a + h_rows[m] * ld_whh_t(m * H + j);
            }
            h = select(h, tanh4(a), live4(t, b0));
            rnn_put_state(t, b0, j, h.x);
            rnn_put_state(t, b0 + 1u, j, h.y);
            rnn_put_state(t, b0 + 2u, j, h.z);
            rnn_put_state(t, b0 + 3u, j, h.w);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(SEQ_WG)
fn rnn_backward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    let zero = vec4<f32>(0.0);
    var dh_next = zero;
    for (var k = 0u; k < T; k = k + 1u) {
        let s = T - 1u - k;
        let t = time_of(s);
        let live = live4(t, b0);
        var dh = zero;
        if cell {
            dh = dp4(t, b0, j, H) + dh_next;
            let y = p4(t, b0, j, H);
            let da = select(zero, dh * (1.0 - y * y), live);
            g_rows[j] = da;
            var hp = h0_4(b0, j);
            if s > 0u {
                hp = p4(time_of(s - 1u), b0, j, H);
            }
            rnn_put_grad(t, b0, j, da.x, dh.x, hp.x);
            rnn_put_grad(t, b0 + 1u, j, da.y, dh.y, hp.y);
            rnn_put_grad(t, b0 + 2u, j, da.z, dh.z, hp.z);
            rnn_put_grad(t, b0 + 3u, j, da.w, dh.w, hp.w);
        }
        workgroupBarrier();
        if cell {
            var acc = zero;
            for (var m = 0u; m < H; m = m + 1u) {
                acc = acc + g_rows[m] * ld_whh(m * H + j);
            }
            dh_next = select(dh, acc, live);
        }
        workgroupBarrier();
    }
    if cell {
        rnn_put_grad(T, b0, j, dh_next.x, 0.0, 0.0);
        rnn_put_grad(T, b0 + 1u, j, dh_next.y, 0.0, 0.0);
        rnn_put_grad(T, b0 + 2u, j, dh_next.z, 0.0, 0.0);
        rnn_put_grad(T, b0 + 3u, j, dh_next.w, 0.0, 0.0);
    }
}
