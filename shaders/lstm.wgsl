// lstm.wgsl: one LSTM layer (PyTorch gate order i, f, g, o), fused per time step, and its
// backward through time. The input projection x W_ih^T + b_ih + b_hh for all steps is one matmul
// done before (`xw`); each step adds the recurrent projection h W_hh^T, applies the gates and
// writes h_t and c_t. Sequences shorter than T (lengths[b]) carry their state over the padding.
//
// Packed state P [T, B, 6H], per (t, b): h | c | i | f | g | o (gate activations, for backward).
// Packed gradient Q [T + 1, B, 6H], rows t < T: dgates (pre-activation, 4H) | dc_t | dh_t;
// row T: dh0 | dc0 | 0.
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
//   0 step; 1 p (read) [T, B, 6H]; 2 whh; 3 h0; 4 c0; 5 lengths; 6 dp (read) [T, B, 6H];
//   7 q (read_write) [T + 1, B, 6H]
// Overrides: T, B, H, REVERSE.
// Dispatch: ceil(B * H / 256) workgroups per step, one thread per (b, j), folded into
//           (x <= 65535, y). The recurrent weight's gradient is a tiled matmul in the graph.

override T: u32 = 1u;
override B: u32 = 1u;
override H: u32 = 1u;
override REVERSE: bool = false;
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> step: vec4<u32>;
@group(0) @binding(1) var<storage, read> xw: array<f32>;
@group(0) @binding(2) var<storage, read> whh: array<f32>;
@group(0) @binding(3) var<storage, read> h0: array<f32>;
@group(0) @binding(4) var<storage, read> c0: array<f32>;
@group(0) @binding(5) var<storage, read> lengths: array<f32>;
@group(0) @binding(6) var<storage, read> whh_t: array<f32>;
@group(0) @binding(7) var<storage, read_write> p: array<f32>;

// backward bindings (binding 1 is P read-only there)
@group(0) @binding(1) var<storage, read> p_in: array<f32>;
@group(0) @binding(6) var<storage, read> dp: array<f32>;
@group(0) @binding(7) var<storage, read_write> q: array<f32>;

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
    let c_prev = select(p[row(tp, b) + H + j], c0[b * H + j], first);
    let r = row(t, b);
    if f32(t) >= lengths[b] {
        // padding: carry the state, no gates
        p[r + j] = select(p[row(tp, b) + j], h0[b * H + j], first);
        p[r + H + j] = c_prev;
        p[r + 2u * H + j] = 0.0;
        p[r + 3u * H + j] = 0.0;
        p[r + 4u * H + j] = 0.0;
        p[r + 5u * H + j] = 0.0;
        return;
    }
    let x = (t * B + b) * 4u * H;
    var a_i = xw[x + j];
    var a_f = xw[x + H + j];
    var a_g = xw[x + 2u * H + j];
    var a_o = xw[x + 3u * H + j];
    let hp = row(tp, b);
    for (var m = 0u; m < H; m = m + 1u) {
        let h = select(p[hp + m], h0[b * H + m], first);
        let w = m * 4u * H + j;
        a_i = a_i + h * whh_t[w];
        a_f = a_f + h * whh_t[w + H];
        a_g = a_g + h * whh_t[w + 2u * H];
        a_o = a_o + h * whh_t[w + 3u * H];
    }
    let gi = sigmoid(a_i);
    let gf = sigmoid(a_f);
    let gg = tanh_safe(a_g);
    let go = sigmoid(a_o);
    let c = gf * c_prev + gi * gg;
    p[r + j] = go * tanh_safe(c);
    p[r + H + j] = c;
    p[r + 2u * H + j] = gi;
    p[r + 3u * H + j] = gf;
    p[r + 4u * H + j] = gg;
    p[r + 5u * H + j] = go;
}

// Gradient reaching the state before time t from step t (already computed): through the gates
// when t was a real step, straight through when it was padding.
fn dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = row(t, b);
    if f32(t) >= lengths[b] {
        return q[r + 5u * H + j];
    }
    // one accumulator per gate: four independent chains instead of one 4H long
    var a0 = 0.0;
    var a1 = 0.0;
    var a2 = 0.0;
    var a3 = 0.0;
    for (var m = 0u; m < H; m = m + 1u) {
        a0 = a0 + q[r + m] * whh[m * H + j];
        a1 = a1 + q[r + H + m] * whh[(H + m) * H + j];
        a2 = a2 + q[r + 2u * H + m] * whh[(2u * H + m) * H + j];
        a3 = a3 + q[r + 3u * H + m] * whh[(3u * H + m) * H + j];
    }
    return (a0 + a1) + (a2 + a3);
}

fn dc_before(t: u32, b: u32, j: u32) -> f32 {
    let r = row(t, b);
    let dc = q[r + 4u * H + j];
    if f32(t) >= lengths[b] {
        return dc;
    }
    return dc * p_in[r + 3u * H + j];
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
        let out = (T * B + b) * 6u * H;
        q[out + j] = dh_before(t0, b, j);
        q[out + H + j] = dc_before(t0, b, j);
        return;
    }
    // backward step k handles forward step s = T-1-k
    let s = T - 1u - k;
    let t = time_of(s);
    let r = row(t, b);
    var dh = dp[r + j];
    var dc = dp[r + H + j];
    if k > 0u {
        let tn = time_of(s + 1u);
        dh = dh + dh_before(tn, b, j);
        dc = dc + dc_before(tn, b, j);
    }
    if f32(t) >= lengths[b] {
        q[r + j] = 0.0;
        q[r + H + j] = 0.0;
        q[r + 2u * H + j] = 0.0;
        q[r + 3u * H + j] = 0.0;
        q[r + 4u * H + j] = dc;
        q[r + 5u * H + j] = dh;
        return;
    }
    let first = s == 0u;
    let tp = time_of(max(s, 1u) - 1u);
    let c_prev = select(p_in[row(tp, b) + H + j], c0[b * H + j], first);
    let c = p_in[r + H + j];
    let gi = p_in[r + 2u * H + j];
    let gf = p_in[r + 3u * H + j];
    let gg = p_in[r + 4u * H + j];
    let go = p_in[r + 5u * H + j];
    let tc = tanh_safe(c);
    dc = dc + dh * go * (1.0 - tc * tc);
    q[r + j] = dc * gg * gi * (1.0 - gi);
    q[r + H + j] = dc * c_prev * gf * (1.0 - gf);
    q[r + 2u * H + j] = dc * gi * (1.0 - gg * gg);
    q[r + 3u * H + j] = dh * tc * go * (1.0 - go);
    q[r + 4u * H + j] = dc;
    q[r + 5u * H + j] = dh;
}
