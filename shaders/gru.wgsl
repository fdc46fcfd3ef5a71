// gru.wgsl: one GRU layer (PyTorch gate order r, z, n) and one vanilla tanh RNN layer
// (torch.nn.RNN, nonlinearity tanh), each fused per time step, and their backward through time.
// The input projection x W_ih^T + b_ih of all steps is one matmul done before (`xw`); each step
// adds the recurrent projection W_hh h + b_hh. The gradients of W_hh and b_hh are a tiled matmul
// and a sum over all steps, built in the graph.
// Sequences shorter than T (lengths[b]) carry their state over the padding.
//
// GRU:  r = sigmoid(xw_r + W_hr h + b_hr), z = sigmoid(xw_z + W_hz h + b_hz),
//       hn = W_hn h + b_hn, n = tanh(xw_n + r * hn), h' = (1 - z) * n + z * h.
//   Packed state P [T, B, 5H], per (t, b): h | r | z | n | hn (zeros past the gates when padded).
//   Packed gradient Q [T + 1, B, 5H], rows t < T: da_r | da_z | da_n | dhn | dh_t, where da_* are
//   pre-activation gradients (da_r, da_z, da_n is the gradient of xw) and dhn that of hn;
//   row T: dh0 | 0 | 0 | 0 | 0.
// RNN:  h' = tanh(xw + W_hh h + b_hh).
//   Packed state P [T, B, H] (h). Packed gradient Q [T + 1, B, 2H], rows t < T: da | dh_t;
//   row T: dh0 | 0.
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
//   0 step; 1 p (read) P; 2 whh; 3 bhh (unused); 4 h0; 5 lengths; 6 dp (read) dP, P's shape;
//   7 q (read_write) Q
// Overrides: T, B, H, REVERSE.
// Dispatch: ceil(B * H / 256) workgroups per step, one thread per (b, j), folded into
//           (x <= 65535, y).

override T: u32 = 1u;
override B: u32 = 1u;
override H: u32 = 1u;
override REVERSE: bool = false;
const WG: u32 = 256u;

@group(0) @binding(0) var<uniform> step: vec4<u32>;
@group(0) @binding(1) var<storage, read> xw: array<f32>;
@group(0) @binding(2) var<storage, read> whh: array<f32>;
@group(0) @binding(3) var<storage, read> bhh: array<f32>;
@group(0) @binding(4) var<storage, read> h0: array<f32>;
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
        return h0[b * H + m];
    }
    return p[(time_of(s - 1u) * B + b) * width + m];
}

// The same during the backward pass.
fn h_prev_bwd(s: u32, b: u32, m: u32, width: u32) -> f32 {
    if s == 0u {
        return h0[b * H + m];
    }
    return p_in[(time_of(s - 1u) * B + b) * width + m];
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
        p[r + j] = hj;
        p[r + H + j] = 0.0;
        p[r + 2u * H + j] = 0.0;
        p[r + 3u * H + j] = 0.0;
        p[r + 4u * H + j] = 0.0;
        return;
    }
    let x = (t * B + b) * 3u * H;
    var a_r = xw[x + j] + bhh[j];
    var a_z = xw[x + H + j] + bhh[H + j];
    var hn = bhh[2u * H + j];
    for (var m = 0u; m < H; m = m + 1u) {
        let h = h_prev_fwd(s, b, m, 5u * H);
        let w = m * 3u * H + j;
        a_r = a_r + h * whh_t[w];
        a_z = a_z + h * whh_t[w + H];
        hn = hn + h * whh_t[w + 2u * H];
    }
    let gr = sigmoid(a_r);
    let gz = sigmoid(a_z);
    let n = tanh_safe(xw[x + 2u * H + j] + gr * hn);
    p[r + j] = (1.0 - gz) * n + gz * hj;
    p[r + H + j] = gr;
    p[r + 2u * H + j] = gz;
    p[r + 3u * H + j] = n;
    p[r + 4u * H + j] = hn;
}

// Gradient reaching the state before time t from step t (already computed): through z and the
// recurrent projection when t was a real step, straight through when it was padding.
fn gru_dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = (t * B + b) * 5u * H;
    let dh = q[r + 4u * H + j];
    if masked(t, b) {
        return dh;
    }
    var acc = dh * p_in[r + 2u * H + j];
    for (var k = 0u; k < H; k = k + 1u) {
        acc = acc + q[r + k] * whh[k * H + j];
        acc = acc + q[r + H + k] * whh[(H + k) * H + j];
        acc = acc + q[r + 3u * H + k] * whh[(2u * H + k) * H + j];
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
        let out = (T * B + b) * 5u * H;
        q[out + j] = gru_dh_before(time_of(0u), b, j);
        q[out + H + j] = 0.0;
        q[out + 2u * H + j] = 0.0;
        q[out + 3u * H + j] = 0.0;
        q[out + 4u * H + j] = 0.0;
        return;
    }
    // backward step k handles forward step s = T-1-k
    let s = T - 1u - k;
    let t = time_of(s);
    let r = (t * B + b) * 5u * H;
    var dh = dp[r + j];
    if k > 0u {
        dh = dh + gru_dh_before(time_of(s + 1u), b, j);
    }
    q[r + 4u * H + j] = dh;
    if masked(t, b) {
        q[r + j] = 0.0;
        q[r + H + j] = 0.0;
        q[r + 2u * H + j] = 0.0;
        q[r + 3u * H + j] = 0.0;
        return;
    }
    let hj = h_prev_bwd(s, b, j, 5u * H);
    let gr = p_in[r + H + j];
    let gz = p_in[r + 2u * H + j];
    let n = p_in[r + 3u * H + j];
    let hn = p_in[r + 4u * H + j];
    let da_n = dh * (1.0 - gz) * (1.0 - n * n);
    q[r + j] = da_n * hn * gr * (1.0 - gr);
    q[r + H + j] = dh * (hj - n) * gz * (1.0 - gz);
    q[r + 2u * H + j] = da_n;
    q[r + 3u * H + j] = da_n * gr;
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
        p[r + j] = h_prev_fwd(s, b, j, H);
        return;
    }
    var a = xw[r + j] + bhh[j];
    for (var m = 0u; m < H; m = m + 1u) {
        a = a + h_prev_fwd(s, b, m, H) * whh_t[m * H + j];
    }
    p[r + j] = tanh_safe(a);
}

fn rnn_dh_before(t: u32, b: u32, j: u32) -> f32 {
    let r = (t * B + b) * 2u * H;
    if masked(t, b) {
        return q[r + H + j];
    }
    var acc = 0.0;
    for (var k = 0u; k < H; k = k + 1u) {
        acc = acc + q[r + k] * whh[k * H + j];
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
        let out = (T * B + b) * 2u * H;
        q[out + j] = rnn_dh_before(time_of(0u), b, j);
        q[out + H + j] = 0.0;
        return;
    }
    let s = T - 1u - k;
    let t = time_of(s);
    let r = (t * B + b) * 2u * H;
    var dh = dp[(t * B + b) * H + j];
    if k > 0u {
        dh = dh + rnn_dh_before(time_of(s + 1u), b, j);
    }
    q[r + H + j] = dh;
    if masked(t, b) {
        q[r + j] = 0.0;
        return;
    }
    let y = p_in[(t * B + b) * H + j];
    q[r + j] = dh * (1.0 - y * y);
}
