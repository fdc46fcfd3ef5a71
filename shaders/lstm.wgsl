// lstm.wgsl: one LSTM layer (PyTorch gate order i, f, g, o), fused per time step (or over the
// whole sequence, below), and its backward through time. The input projection
// x W_ih^T + b_ih + b_hh for all steps is one matmul done before (`xw`); each step adds the
// recurrent projection h W_hh^T, applies the gates and writes h_t and c_t. Sequences shorter
// than T (lengths[b]) carry their state over the padding.
//
// Packed state P [T, B, 6H], per (t, b): h | c | i | f | g | o (gate activations, for backward).
// Packed gradient Q [T + 1, B, 7H], rows t < T: dgates (pre-activation, 4H) | dc_t | dh_t |
// h_prev (the state step t started from: h0 or the h of the step before it in processing
// order, which the recurrent weight's gradient reads in place); row T: dh0 | dc0 | 0.
//
// Bindings (group 0), by entry point.
// Entry `lstm_forward` (dispatched T times, step s = 0..T-1; t = s, or T-1-s when REVERSE):
//   0  step     uniform, dynamic offset  vec4<u32>, x = s
//   1  xw       storage, read            [T, B, 4H]
//   2  whh      storage, read            [4H, H]
//   3  h0       storage, read            [B, H]
//   4  c0       storage, read            [B, H]
//   5  lengths  storage, read            [B] whole numbers in [1, T]
//   6  whh_t    storage, read            [H, 4H], w_hh transposed (coalesced reads per step)
//   7  p        storage, read_write      [T, B, 6H]
// Entry `lstm_backward` (dispatched T + 1 times: the steps in reverse order, then s = T writes
// dh0, dc0):
//   0 step; 1 p (read) [T, B, 6H]; 2 whh; 3 h0; 4 c0; 5 lengths; 6 dp (read) [T, B, 6H], or
//   only its window [DP_TL, B, DP_CL] at (DP_T0, DP_C0), zeros around it (the pads of the
//   gradient of part of P, folded in by the plan compiler; the window's row r starts at
//   element DP_OFF + r * DP_LD of the binding: rows of a wider tensor read in place where the
//   plan compiler says); 7 q (read_write) [T + 1, B, 7H]
// f16 variant (`lstm_f16`, generated from the storage block): every tensor f16 but the f32
// lengths; each step computes in f32 (the whole-sequence kernels keep the state in f32 registers).
// Overrides: T, B, H, REVERSE; DP_T0, DP_TL, DP_C0, DP_CL (dp's window: all of it by default),
//            DP_LD, DP_OFF (its rows: DP_CL apart from 0 by default), DP_SWAP_P, DP_SWAP_Q
//            (its rows those of a (P, Q, ..) tensor with its leading axes swapped; 1: not);
//            H0_LD, H0_OFF, C0_LD, C0_OFF: h0's (c0's) row b starts at element OFF + b * LD of
//            its binding (a narrow of a wider tensor's last axis read in place: a decoder
//            starting from its encoder's states; rows of H from 0 by default).
// Dispatch: ceil(B * H / 256) workgroups per step, one thread per (b, j), folded into
//           (x <= 65535, y). The recurrent weight's gradient is a tiled matmul in the graph.

override T: u32 = 1u;
override B: u32 = 1u;
override H: u32 = 1u;
override REVERSE: bool = false;
override DP_T0: u32 = 0u;
override DP_TL: u32 = T;
override DP_C0: u32 = 0u;
override DP_CL: u32 = 6u * H;
override DP_LD: u32 = DP_CL;
override DP_OFF: u32 = 0u;
override DP_SWAP_P: u32 = 1u;
override DP_SWAP_Q: u32 = 1u;
override H0_LD: u32 = H;
override H0_OFF: u32 = 0u;
override C0_LD: u32 = H;
override C0_OFF: u32 = 0u;
const WG: u32 = 256u;

// Element (b, j) of the initial state in its binding.
fn h0_at(b: u32, j: u32) -> u32 {
    return H0_OFF + b * H0_LD + j;
}
fn c0_at(b: u32, j: u32) -> u32 {
    return C0_OFF + b * C0_LD + j;
}

@group(0) @binding(0) var<uniform> step: vec4<u32>;
// generated: begin storage
@group(0) @binding(1) var<storage, read> xw: array<f32>;
@group(0) @binding(2) var<storage, read> whh: array<f32>;
@group(0) @binding(3) var<storage, read> h0: array<f32>;
@group(0) @binding(4) var<storage, read> c0: array<f32>;
@group(0) @binding(5) var<storage, read> lengths: array<f32>; // always f32
@group(0) @binding(6) var<storage, read> whh_t: array<f32>;
@group(0) @binding(7) var<storage, read_write> p: array<f32>;
@group(0) @binding(1) var<storage, read> p_in: array<f32>;
@group(0) @binding(6) var<storage, read> dp: array<f32>;
@group(0) @binding(7) var<storage, read_write> q: array<f32>;
fn ld_xw(i: u32) -> f32 { return xw[i]; }
fn ld_whh(i: u32) -> f32 { return whh[i]; }
fn ld_h0(i: u32) -> f32 { return h0[i]; }
fn ld_c0(i: u32) -> f32 { return c0[i]; }
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

// Element `col` of row (t, b) of dP: read from the window the graph computed, 0 around it.
fn dp_at(t: u32, b: u32, col: u32) -> f32 {
    if t < DP_T0 || t >= DP_T0 + DP_TL || col < DP_C0 || col >= DP_C0 + DP_CL {
        return 0.0;
    }
    return ld_dp(DP_OFF + dp_row((t - DP_T0) * B + b) * DP_LD + col - DP_C0);
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

// Time index of forward step s, and of the step before / after it in processing order.
fn time_of(s: u32) -> u32 {
    return select(s, T - 1u - s, REVERSE);
}

fn row(t: u32, b: u32) -> u32 {
    return (t * B + b) * 6u * H;
}

// Start of row (t, b) of Q.
fn qrow(t: u32, b: u32) -> u32 {
    return (t * B + b) * 7u * H;
}

@compute @workgroup_size(256)
fn lstm_forward(
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
    let first = s == 0u;
    let tp = time_of(max(s, 1u) - 1u);
    let c_prev = select(ld_p(row(tp, b) + H + j), ld_c0(c0_at(b, j)), first);
    let r = row(t, b);
    if f32(t) >= lengths[b] {
        // padding: carry the state, no gates
        st_p(r + j, select(ld_p(row(tp, b) + j), ld_h0(h0_at(b, j)), first));
        st_p(r + H + j, c_prev);
        st_p(r + 2u * H + j, 0.0);
        st_p(r + 3u * H + j, 0.0);
        st_p(r + 4u * H + j, 0.0);
        st_p(r + 5u * H + j, 0.0);
        return;
    }
    let x = (t * B + b) * 4u * H;
    var a_i = ld_xw(x + j);
    var a_f = ld_xw(x + H + j);
    var a_g = ld_xw(x + 2u * H + j);
    var a_o = ld_xw(x + 3u * H + j);
    let hp = row(tp, b);
    for (var m = 0u; m < H; m = m + 1u) {
        let h = select(ld_p(hp + m), ld_h0(h0_at(b, m)), first);
        let w = m * 4u * H + j;
        a_i = a_i + h * ld_whh_t(w);
        a_f = a_f + h * ld_whh_t(w + H);
        a_g = a_g + h * ld_whh_t(w + 2u * H);
        a_o = a_o + h * ld_whh_t(w + 3u * H);
    }
    let gi = sigmoid(a_i);
    let gf = sigmoid(a_f);
    let gg = tanh_safe(a_g);
    let go = sigmoid(a_o);
    let c = gf * c_prev + gi * gg;
    st_p(r + j, go * tanh_safe(c));
    st_p(r + H + j, c);
    st_p(r + 2u * H + j, gi);
    st_p(r + 3u * H + j, gf);
    st_p(r + 4u * H + j, gg);
    st_p(r + 5u * H + j, go);
}

// Gradient reaching the state before time t from step t (already computed): through the gates
// when t was a real step, straight through when it was padding.
fn dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = qrow(t, b);
    if f32(t) >= lengths[b] {
        return ld_q(r + 5u * H + j);
    }
    // one accumulator per gate: four independent chains instead of one 4H long
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var m = 0u; m < H; m = m + 1u) {
        a0 = a0 + ld_q(r + m) * ld_whh(m * H + j);
        a1 = a1 + ld_q(r + H + m) * ld_whh((H + m) * H + j);
        a2 = a2 + ld_q(r + 2u * H + m) * ld_whh((2u * H + m) * H + j);
        a3 = a3 + ld_q(r + 3u * H + m) * ld_whh((3u * H + m) * H + j);
    }
    return (a0 + a1) + (a2 + a3);
}

fn dc_before(t: u32, b: u32, j: u32) -> f32 {
    let dc = ld_q(qrow(t, b) + 4u * H + j);
    if f32(t) >= lengths[b] {
        return dc;
    }
    return dc * ld_p_in(row(t, b) + 3u * H + j);
}

@compute @workgroup_size(256)
fn lstm_backward(
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
        let t0 = time_of(0u);
        let out = qrow(T, b);
        let dh0 = dh_before(t0, b, j);
        let dc0 = dc_before(t0, b, j);
        st_q(out + j, dh0);
        st_q(out + H + j, dc0);
        for (var col = 2u; col < 7u; col = col + 1u) {
            st_q(out + col * H + j, 0.0);
        }
        return;
    }
    // backward step k handles forward step s = T-1-k
    let s = T - 1u - k;
    let t = time_of(s);
    let r = row(t, b);
    let rq = qrow(t, b);
    var dh = dp_at(t, b, j);
    var dc = dp_at(t, b, H + j);
    if k > 0u {
        let tn = time_of(s + 1u);
        dh = dh + dh_before(tn, b, j);
        dc = dc + dc_before(tn, b, j);
    }
    let first = s == 0u;
    let tp = time_of(max(s, 1u) - 1u);
    st_q(rq + 6u * H + j, select(ld_p_in(row(tp, b) + j), ld_h0(h0_at(b, j)), first));
    if f32(t) >= lengths[b] {
        st_q(rq + j, 0.0);
        st_q(rq + H + j, 0.0);
        st_q(rq + 2u * H + j, 0.0);
        st_q(rq + 3u * H + j, 0.0);
        st_q(rq + 4u * H + j, dc);
        st_q(rq + 5u * H + j, dh);
        return;
    }
    let c_prev = select(ld_p_in(row(tp, b) + H + j), ld_c0(c0_at(b, j)), first);
    let c = ld_p_in(r + H + j);
    let gi = ld_p_in(r + 2u * H + j);
    let gf = ld_p_in(r + 3u * H + j);
    let gg = ld_p_in(r + 4u * H + j);
    let go = ld_p_in(r + 5u * H + j);
    let tc = tanh_safe(c);
    dc = dc + dh * go * (1.0 - tc * tc);
    st_q(rq + j, dc * gg * gi * (1.0 - gi));
    st_q(rq + H + j, dc * c_prev * gf * (1.0 - gf));
    st_q(rq + 2u * H + j, dc * gi * (1.0 - gg * gg));
    st_q(rq + 3u * H + j, dh * tc * go * (1.0 - go));
    st_q(rq + 4u * H + j, dc);
    st_q(rq + 5u * H + j, dh);
}

// ---- whole-sequence kernels: one dispatch per layer and direction ----
// Batch rows never exchange data, so a workgroup can run its rows through all T steps with only
// workgroup barriers between steps: no dispatch per step. Each workgroup owns 4 batch rows
// b0..b0+3 (one vec4 lane per row; lanes past B stay idle); thread j owns cell j of the four
// rows and keeps h and c in registers; h_prev (or the step's gate gradients) is shared through
// workgroup memory, sized by SEQ_WG (forward: SEQ_WG vec4s; backward: 4 SEQ_WG vec4s, 16 KB at
// H = 256, WebGPU's guaranteed minimum). Used where src/ops/lstm.rs's `whole_sequence` says (H
// within the adapter's threads per workgroup and workgroup memory, and beyond 256 only where
// the ceil(B / 4) workgroups fill the adapter), else the per-step kernels above.
// Entry `lstm_forward_seq`: bindings as `lstm_forward` (binding 0 unused, offset 0);
// Entry `lstm_backward_seq`: bindings as `lstm_backward`.
// Overrides: T, B, H, REVERSE, SEQ_WG (threads per workgroup, >= H).
// Dispatch: ceil(B / 4) workgroups of SEQ_WG threads, folded into (x <= 65535, y).

override SEQ_WG: u32 = 64u;

// h_prev of the 4 rows, [m] = vec4(rows)
var<workgroup> h_rows: array<vec4<f32>, SEQ_WG>;
// the step's pre-activation gate gradients of the 4 rows, [k * H + m]
var<workgroup> g_rows: array<vec4<f32>, 4u * SEQ_WG>;

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

// Element `col` of row (t, b) of a [T, B, width] buffer for the 4 rows (0 past B).
fn xw4(t: u32, b0: u32, col: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    let w = 4u * H;
    if b0 < B { v.x = ld_xw((t * B + b0) * w + col); }
    if b0 + 1u < B { v.y = ld_xw((t * B + b0 + 1u) * w + col); }
    if b0 + 2u < B { v.z = ld_xw((t * B + b0 + 2u) * w + col); }
    if b0 + 3u < B { v.w = ld_xw((t * B + b0 + 3u) * w + col); }
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

fn c0_4(b0: u32, j: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = ld_c0(c0_at(b0, j)); }
    if b0 + 1u < B { v.y = ld_c0(c0_at(b0 + 1u, j)); }
    if b0 + 2u < B { v.z = ld_c0(c0_at(b0 + 2u, j)); }
    if b0 + 3u < B { v.w = ld_c0(c0_at(b0 + 3u, j)); }
    return v;
}

// Writes h | c | i | f | g | o of cell j of row (t, b).
fn put_state(t: u32, b: u32, j: u32, h: f32, c: f32, g: vec4<f32>) {
    if b >= B {
        return;
    }
    let r = row(t, b);
    st_p(r + j, h);
    st_p(r + H + j, c);
    st_p(r + 2u * H + j, g.x);
    st_p(r + 3u * H + j, g.y);
    st_p(r + 4u * H + j, g.z);
    st_p(r + 5u * H + j, g.w);
}

@compute @workgroup_size(SEQ_WG)
fn lstm_forward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    let jj = min(j, H - 1u);
    var h = h0_4(b0, jj);
    var c = c0_4(b0, jj);
    for (var s = 0u; s < T; s = s + 1u) {
        let t = time_of(s);
        if cell {
            h_rows[j] = h;
        }
        workgroupBarrier();
        if cell {
            let x = 4u * H;
            var a_i = xw4(t, b0, j);
            var a_f = xw4(t, b0, H + j);
            var a_g = xw4(t, b0, 2u * H + j);
            var a_o = xw4(t, b0, 3u * H + j);
            for (var m = 0u; m < H; m = m + 1u) {
                let hm = h_rows[m];
                let w = m * x + j;
                a_i = a_i + hm * ld_whh_t(w);
                a_f = a_f + hm * ld_whh_t(w + H);
                a_g = a_g + hm * ld_whh_t(w + 2u * H);
                a_o = a_o + hm * ld_whh_t(w + 3u * H);
            }
            let live = live4(t, b0);
            let zero = vec4<f32>(0.0);
            let gi = select(zero, 1.0 / (1.0 + exp(-a_i)), live);
            let gf = select(zero, 1.0 / (1.0 + exp(-a_f)), live);
            let gg = select(zero, tanh(clamp(a_g, vec4<f32>(-10.0), vec4<f32>(10.0))), live);
            let go = select(zero, 1.0 / (1.0 + exp(-a_o)), live);
            let c_new = gf * c + gi * gg;
            // padded steps carry the state
            c = select(c, c_new, live);
            h = select(h, go * tanh(clamp(c_new, vec4<f32>(-10.0), vec4<f32>(10.0))), live);
            put_state(t, b0, j, h.x, c.x, vec4<f32>(gi.x, gf.x, gg.x, go.x));
            put_state(t, b0 + 1u, j, h.y, c.y, vec4<f32>(gi.y, gf.y, gg.y, go.y));
            put_state(t, b0 + 2u, j, h.z, c.z, vec4<f32>(gi.z, gf.z, gg.z, go.z));
            put_state(t, b0 + 3u, j, h.w, c.w, vec4<f32>(gi.w, gf.w, gg.w, go.w));
        }
        workgroupBarrier();
    }
}

// Element `col` of row (t, b) of P (read during backward) for the 4 rows (0 past B).
fn p4(t: u32, b0: u32, col: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = ld_p_in(row(t, b0) + col); }
    if b0 + 1u < B { v.y = ld_p_in(row(t, b0 + 1u) + col); }
    if b0 + 2u < B { v.z = ld_p_in(row(t, b0 + 2u) + col); }
    if b0 + 3u < B { v.w = ld_p_in(row(t, b0 + 3u) + col); }
    return v;
}

fn dp4(t: u32, b0: u32, col: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if b0 < B { v.x = dp_at(t, b0, col); }
    if b0 + 1u < B { v.y = dp_at(t, b0 + 1u, col); }
    if b0 + 2u < B { v.z = dp_at(t, b0 + 2u, col); }
    if b0 + 3u < B { v.w = dp_at(t, b0 + 3u, col); }
    return v;
}

// Writes the 7 values of cell j of row (t, b) of Q (t < T).
fn put_grad(t: u32, b: u32, j: u32, gates: vec4<f32>, dc: f32, dh: f32, h_prev: f32) {
    if b >= B {
        return;
    }
    let r = qrow(t, b);
    st_q(r + j, gates.x);
    st_q(r + H + j, gates.y);
    st_q(r + 2u * H + j, gates.z);
    st_q(r + 3u * H + j, gates.w);
    st_q(r + 4u * H + j, dc);
    st_q(r + 5u * H + j, dh);
    st_q(r + 6u * H + j, h_prev);
}

// Row T of Q for batch row b: dh0 | dc0 | 0.
fn put_initial(b: u32, j: u32, dh: f32, dc: f32) {
    if b >= B {
        return;
    }
    let r = qrow(T, b);
    st_q(r + j, dh);
    st_q(r + H + j, dc);
    for (var col = 2u; col < 7u; col = col + 1u) {
        st_q(r + col * H + j, 0.0);
    }
}

@compute @workgroup_size(SEQ_WG)
fn lstm_backward_seq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) j: u32,
) {
    let b0 = quad_of(wid, nwg);
    let cell = j < H;
    let zero = vec4<f32>(0.0);
    // gradient reaching the state before the step processed last (dh, dc)
    var dh_next = zero;
    var dc_next = zero;
    for (var k = 0u; k < T; k = k + 1u) {
        let s = T - 1u - k;
        let t = time_of(s);
        let live = live4(t, b0);
        var dc_out = zero;
        var gf = zero;
        var dh = zero;
        if cell {
            dh = dp4(t, b0, j) + dh_next;
            let dc = dp4(t, b0, H + j) + dc_next;
            var c_prev = c0_4(b0, j);
            var h_prev = h0_4(b0, j);
            if s > 0u {
                c_prev = p4(time_of(s - 1u), b0, H + j);
                h_prev = p4(time_of(s - 1u), b0, j);
            }
            let c = p4(t, b0, H + j);
            let gi = p4(t, b0, 2u * H + j);
            gf = p4(t, b0, 3u * H + j);
            let gg = p4(t, b0, 4u * H + j);
            let go = p4(t, b0, 5u * H + j);
            let tc = tanh(clamp(c, vec4<f32>(-10.0), vec4<f32>(10.0)));
            let dc2 = dc + dh * go * (1.0 - tc * tc);
            let d_i = select(zero, dc2 * gg * gi * (1.0 - gi), live);
            let d_f = select(zero, dc2 * c_prev * gf * (1.0 - gf), live);
            let d_g = select(zero, dc2 * gi * (1.0 - gg * gg), live);
            let d_o = select(zero, dh * tc * go * (1.0 - go), live);
            dc_out = select(dc, dc2, live);
            g_rows[j] = d_i;
            g_rows[H + j] = d_f;
            g_rows[2u * H + j] = d_g;
            g_rows[3u * H + j] = d_o;
            let hp = h_prev;
            put_grad(t, b0, j, vec4<f32>(d_i.x, d_f.x, d_g.x, d_o.x), dc_out.x, dh.x, hp.x);
            put_grad(t, b0 + 1u, j, vec4<f32>(d_i.y, d_f.y, d_g.y, d_o.y), dc_out.y, dh.y, hp.y);
            put_grad(t, b0 + 2u, j, vec4<f32>(d_i.z, d_f.z, d_g.z, d_o.z), dc_out.z, dh.z, hp.z);
            put_grad(t, b0 + 3u, j, vec4<f32>(d_i.w, d_f.w, d_g.w, d_o.w), dc_out.w, dh.w, hp.w);
        }
        workgroupBarrier();
        if cell {
            // through the gates for real steps, straight through for padding
            var a0 = zero;
            var a1 = zero;
            var a2 = zero;
            var a3 = zero;
            for (var m = 0u; m < H; m = m + 1u) {
                a0 = a0 + g_rows[m] * ld_whh(m * H + j);
                a1 = a1 + g_rows[H + m] * ld_whh((H + m) * H + j);
                a2 = a2 + g_rows[2u * H + m] * ld_whh((2u * H + m) * H + j);
                a3 = a3 + g_rows[3u * H + m] * ld_whh((3u * H + m) * H + j);
            }
            dh_next = select(dh, (a0 + a1) + (a2 + a3), live);
            dc_next = select(dc_out, dc_out * gf, live);
        }
        workgroupBarrier();
    }
    if cell {
        put_initial(b0, j, dh_next.x, dc_next.x);
        put_initial(b0 + 1u, j, dh_next.y, dc_next.y);
        put_initial(b0 + 2u, j, dh_next.z, dc_next.z);
        put_initial(b0 + 3u, j, dh_next.w, dc_next.w);
    }
}
