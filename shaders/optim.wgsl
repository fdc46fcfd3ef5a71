// optim.wgsl: fused optimizer updates, in place, with torch.optim's exact arithmetic.
// One kernel per parameter tensor (the plan compiler merges a step's updates into one generated
// kernel, src/codegen/optim.rs, which calls the same per-element functions: the block between
// the `shared:` markers); hyperparameters that change between steps (learning rate,
// bias corrections, first-step flag) come in a small storage buffer fed with each run, so a
// schedule never recompiles anything.
//
// Every update multiplies its gradient by scale[0] * hyper[HYPER_GRAD_SCALE] and changes nothing
// where hyper[HYPER_SKIP] is nonzero: dynamic loss scaling's unscaling and skipped steps, which
// the `grad_scaler` entry writes into the hyper vector the updates then read (the host feeds
// 1 and 0).
//
// Bindings (group 0); the entry point decides how many are used:
//   0  hyper   storage, read        [16] see HYPER_* below (src/ops/optim.rs, Hyper::to_vec)
//   1  scale   storage, read        [1]  gradient scale (global-norm clipping; 1 without);
//                                        `grad_scaler`: the scaled gradients' sum of squares
//   2  grad    storage, read        [N]
//   3  param   storage, read_write  [N] updated in place
//   4  state1  storage, read_write  [N] momentum buffer (sgd_momentum), exp_avg (adam),
//                                       square_avg (rmsprop*) or sum (adagrad)
//   5  state2  storage, read_write  [N] exp_avg_sq (adam), momentum_buffer
//                                       (rmsprop_momentum, rmsprop_centered_momentum) or
//                                       grad_avg (rmsprop_centered)
//   6  state3  storage, read_write  [N] grad_avg (rmsprop_centered_momentum)
//   `grad_scaler`: 2 scaler (read_write) [8] its state, updated in place (SCALER_* below);
//                  3 hyper_out (read_write) [16] the hyper vector the updates read
//   `accumulate`: 0 micro_grad (read) [N] a micro-batch's gradient; 1 accumulator
//                 (read_write) [N], updated in place
//   `ema_update`: 0 hyper (read) [16]; 1 averaged (read) [N] a parameter after its update;
//                 2 ema (read_write) [N] its exponential moving average, updated in place
// Entries: `sgd` (bindings 0-3), `sgd_momentum` (0-4), `adam` (0-5), `rmsprop` (0-4),
//          `rmsprop_momentum` and `rmsprop_centered` (0-5), `rmsprop_centered_momentum` (0-6),
//          `adagrad` (0-4), `grad_scaler` (0-3),
//          `ema_update` (0-2: ema = averaged on the first step (hyper's flag), else
//          ema + EMA_WEIGHT * (averaged - ema), EMA_WEIGHT = 1 - decay: torch's lerp),
//          `accumulate` (0-1: accumulator = (FIRST ? 0 : accumulator) + ACC_SCALE * micro_grad,
//          gradient accumulation over micro-batches).
// Overrides: N elements; NESTEROV (sgd_momentum); DECOUPLED (adam: AdamW's decoupled decay);
//            `grad_scaler`: GROWTH, BACKOFF, INTERVAL (GradScaler's growth_factor,
//            backoff_factor, growth_interval), CLIP and MAX_NORM (clip_grad_norm_ of the
//            unscaled gradients), PARTIALS (0: binding 1 holds the sum of squares; else it
//            holds this many partial sums, added up in order), CYCLED_BETA1 (a schedule cycles
//            Adam's beta1: its bias correction is 1 - beta1^t with this step's beta1).
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded into (x <= 65535, y); one element
//           per thread; `grad_scaler` one workgroup of one thread.

override N: u32 = 1u;
override NESTEROV: bool = false;
override DECOUPLED: bool = false;
override GROWTH: f32 = 2.0;
override BACKOFF: f32 = 0.5;
override INTERVAL: f32 = 2000.0;
override CLIP: bool = false;
override MAX_NORM: f32 = 1.0;
override PARTIALS: u32 = 0u;
override CYCLED_BETA1: bool = false;
override FIRST: bool = false;
override ACC_SCALE: f32 = 1.0;
override EMA_WEIGHT: f32 = 0.0;
const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> hyper: array<f32>;
@group(0) @binding(1) var<storage, read> scale: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read_write> state1: array<f32>;
@group(0) @binding(5) var<storage, read_write> state2: array<f32>;
@group(0) @binding(6) var<storage, read_write> state3: array<f32>;
@group(0) @binding(2) var<storage, read_write> scaler: array<f32>;
@group(0) @binding(3) var<storage, read_write> hyper_out: array<f32>;
@group(0) @binding(0) var<storage, read> micro_grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> accumulator: array<f32>;
@group(0) @binding(1) var<storage, read> averaged: array<f32>;
@group(0) @binding(2) var<storage, read_write> ema: array<f32>;

// shared: begin optim_math
const HYPER_LR: u32 = 0u;
const HYPER_WEIGHT_DECAY: u32 = 1u;
const HYPER_MOMENTUM: u32 = 2u;
const HYPER_DAMPENING: u32 = 3u;
const HYPER_FIRST_STEP: u32 = 4u;
const HYPER_BETA1: u32 = 5u;
const HYPER_BETA2: u32 = 6u;
const HYPER_EPS: u32 = 7u;
const HYPER_BIAS_CORRECTION1: u32 = 8u;
const HYPER_BIAS_CORRECTION2_SQRT: u32 = 9u;
const HYPER_GRAD_SCALE: u32 = 10u;
const HYPER_SKIP: u32 = 11u;
const HYPER_ALPHA: u32 = 12u;
const HYPER_CLIP_VALUE: u32 = 13u;

// The factor an update multiplies its gradient by: clipping's `clip` (scale[0]) and dynamic loss
// scaling's unscaling.
fn step_scale(clip: f32) -> f32 {
    return clip * hyper[HYPER_GRAD_SCALE];
}

// The gradient an update takes: scaled (clipping's coefficient, loss scaling's unscaling),
// then clamped to [-c, c] where hyper[HYPER_CLIP_VALUE] = c is set (clip_grad_value_).
fn scaled_grad(gr: f32, sc: f32) -> f32 {
    let g = gr * sc;
    let c = hyper[HYPER_CLIP_VALUE];
    if c > 0.0 {
        return clamp(g, -c, c);
    }
    return g;
}

// Whether dynamic loss scaling skips this step (a gradient was not finite).
fn skipped() -> bool {
    return hyper[HYPER_SKIP] != 0.0;
}

// One element's update from its parameter value p, gradient gr and the gradient scale sc (and
// states); every optimizer kernel binds `hyper` at 0 and defines NESTEROV and DECOUPLED.

fn sgd_update(p: f32, gr: f32, sc: f32) -> f32 {
    let g = scaled_grad(gr, sc) + hyper[HYPER_WEIGHT_DECAY] * p;
    return p - hyper[HYPER_LR] * g;
}

// returns (param, momentum_buffer)
fn sgd_momentum_update(p: f32, gr: f32, sc: f32, buf: f32) -> vec2<f32> {
    var g = scaled_grad(gr, sc) + hyper[HYPER_WEIGHT_DECAY] * p;
    let mu = hyper[HYPER_MOMENTUM];
    // torch: the buffer starts as the first gradient, undamped
    var b = g;
    if hyper[HYPER_FIRST_STEP] == 0.0 {
        b = mu * buf + (1.0 - hyper[HYPER_DAMPENING]) * g;
    }
    if NESTEROV {
        g = g + mu * b;
    } else {
        g = b;
    }
    return vec2<f32>(p - hyper[HYPER_LR] * g, b);
}

// returns (param, exp_avg, exp_avg_sq)
fn adam_update(p0: f32, gr: f32, sc: f32, m0: f32, v0: f32) -> vec3<f32> {
    let lr = hyper[HYPER_LR];
    let wd = hyper[HYPER_WEIGHT_DECAY];
    var p = p0;
    var g = scaled_grad(gr, sc);
    if DECOUPLED {
        p = p * (1.0 - lr * wd);
    } else {
        g = g + wd * p;
    }
    let b1 = hyper[HYPER_BETA1];
    let b2 = hyper[HYPER_BETA2];
    let m = b1 * m0 + (1.0 - b1) * g;
    let v = b2 * v0 + (1.0 - b2) * g * g;
    let step_size = lr / hyper[HYPER_BIAS_CORRECTION1];
    let denom = sqrt(v) / hyper[HYPER_BIAS_CORRECTION2_SQRT] + hyper[HYPER_EPS];
    return vec3<f32>(p - step_size * m / denom, m, v);
}

// returns (param, square_avg, momentum_buffer, grad_avg): torch.optim.RMSprop; the buffer and
// the average of gradients come back as given where `momentum` or `centered` is off (each
// caller passes constants, so the branches fold)
fn rmsprop_update(
    p: f32,
    gr: f32,
    sc: f32,
    sq0: f32,
    buf0: f32,
    ga0: f32,
    momentum: bool,
    centered: bool,
) -> vec4<f32> {
    let g = scaled_grad(gr, sc) + hyper[HYPER_WEIGHT_DECAY] * p;
    let a = hyper[HYPER_ALPHA];
    let sq = a * sq0 + (1.0 - a) * g * g;
    var ga = ga0;
    var avg = sqrt(sq) + hyper[HYPER_EPS];
    if centered {
        // torch: grad_avg.lerp_(grad, 1 - alpha); square_avg - grad_avg^2 under the root
        ga = ga0 + (1.0 - a) * (g - ga0);
        avg = sqrt(sq - ga * ga) + hyper[HYPER_EPS];
    }
    var buf = buf0;
    var np = p - hyper[HYPER_LR] * (g / avg);
    if momentum {
        buf = hyper[HYPER_MOMENTUM] * buf0 + g / avg;
        np = p - hyper[HYPER_LR] * buf;
    }
    return vec4<f32>(np, sq, buf, ga);
}

// returns (param, sum): torch.optim.Adagrad, the learning rate's decay in hyper[HYPER_LR]
fn adagrad_update(p: f32, gr: f32, sc: f32, s0: f32) -> vec2<f32> {
    let g = scaled_grad(gr, sc) + hyper[HYPER_WEIGHT_DECAY] * p;
    let s = s0 + g * g;
    return vec2<f32>(p - hyper[HYPER_LR] * (g / (sqrt(s) + hyper[HYPER_EPS])), s);
}
// shared: end optim_math

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

@compute @workgroup_size(256)
fn sgd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    param[i] = sgd_update(param[i], grad[i], step_scale(scale[0]));
}

@compute @workgroup_size(256)
fn sgd_momentum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = sgd_momentum_update(param[i], grad[i], step_scale(scale[0]), state1[i]);
    param[i] = r.x;
    state1[i] = r.y;
}

@compute @workgroup_size(256)
fn adam(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = adam_update(param[i], grad[i], step_scale(scale[0]), state1[i], state2[i]);
    param[i] = r.x;
    state1[i] = r.y;
    state2[i] = r.z;
}

@compute @workgroup_size(256)
fn rmsprop(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = rmsprop_update(param[i], grad[i], step_scale(scale[0]), state1[i], 0.0, 0.0, false, false);
    param[i] = r.x;
    state1[i] = r.y;
}

@compute @workgroup_size(256)
fn rmsprop_momentum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = rmsprop_update(param[i], grad[i], step_scale(scale[0]), state1[i], state2[i], 0.0, true, false);
    param[i] = r.x;
    state1[i] = r.y;
    state2[i] = r.z;
}

@compute @workgroup_size(256)
fn rmsprop_centered(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = rmsprop_update(param[i], grad[i], step_scale(scale[0]), state1[i], 0.0, state2[i], false, true);
    param[i] = r.x;
    state1[i] = r.y;
    state2[i] = r.w;
}

@compute @workgroup_size(256)
fn rmsprop_centered_momentum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = rmsprop_update(param[i], grad[i], step_scale(scale[0]), state1[i], state2[i], state3[i], true, true);
    param[i] = r.x;
    state1[i] = r.y;
    state2[i] = r.z;
    state3[i] = r.w;
}

@compute @workgroup_size(256)
fn adagrad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N || skipped() {
        return;
    }
    let r = adagrad_update(param[i], grad[i], step_scale(scale[0]), state1[i]);
    param[i] = r.x;
    state1[i] = r.y;
}

const SCALER_SCALE: u32 = 0u;
const SCALER_TRACKER: u32 = 1u;
const SCALER_STEPS: u32 = 2u;
const SCALER_S1: u32 = 3u;
const SCALER_S2: u32 = 4u;

// x^n by repeated squaring, as Rust's f32::powi (ops::optim::powi_by_squaring).
fn powi(base: f32, n0: u32) -> f32 {
    var x = base;
    var n = n0;
    var r = 1.0;
    loop {
        if (n & 1u) != 0u {
            r = r * x;
        }
        n = n >> 1u;
        if n == 0u {
            break;
        }
        x = x * x;
    }
    return r;
}

// Whether x is finite, from its bits (WGSL may assume that floats are finite).
fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

// GradScaler's unscale_, inf check and update (src/ops/optim.rs, ScalerStep::cpu, the same
// operations in the same order): the hyper vector of this step, then the state of the next.
@compute @workgroup_size(1)
fn grad_scaler() {
    var sumsq = scale[0];
    if PARTIALS > 0u {
        sumsq = 0.0;
        for (var k = 0u; k < PARTIALS; k = k + 1u) {
            sumsq = sumsq + scale[k];
        }
    }
    let found = !finite(sumsq);
    let s = scaler[SCALER_SCALE];
    let inv = 1.0 / s;
    var coef = 1.0;
    if CLIP {
        coef = min(MAX_NORM / (sqrt(sumsq) * inv + 1e-6), 1.0);
    }
    for (var k = 0u; k < 16u; k = k + 1u) {
        hyper_out[k] = hyper[k];
    }
    // the optimizer's own step count: the steps taken, not those skipped
    let b1 = hyper[HYPER_BETA1];
    let b2 = hyper[HYPER_BETA2];
    let s1 = 1.0 + b1 * scaler[SCALER_S1];
    let s2 = 1.0 + b2 * scaler[SCALER_S2];
    hyper_out[HYPER_FIRST_STEP] = select(0.0, 1.0, scaler[SCALER_STEPS] == 0.0);
    if CYCLED_BETA1 {
        hyper_out[HYPER_BIAS_CORRECTION1] = 1.0 - powi(b1, u32(scaler[SCALER_STEPS]) + 1u);
    } else {
        hyper_out[HYPER_BIAS_CORRECTION1] = (1.0 - b1) * s1;
    }
    hyper_out[HYPER_BIAS_CORRECTION2_SQRT] = sqrt((1.0 - b2) * s2);
    hyper_out[HYPER_GRAD_SCALE] = coef * inv;
    hyper_out[HYPER_SKIP] = select(0.0, 1.0, found);
    if found {
        scaler[SCALER_SCALE] = s * BACKOFF;
        scaler[SCALER_TRACKER] = 0.0;
    } else {
        scaler[SCALER_STEPS] = scaler[SCALER_STEPS] + 1.0;
        scaler[SCALER_S1] = s1;
        scaler[SCALER_S2] = s2;
        let tracker = scaler[SCALER_TRACKER] + 1.0;
        if tracker >= INTERVAL {
            let grown = s * GROWTH;
            if finite(grown) {
                scaler[SCALER_SCALE] = grown;
            }
            scaler[SCALER_TRACKER] = 0.0;
        } else {
            scaler[SCALER_TRACKER] = tracker;
        }
    }
}

// Gradient accumulation (src/ops/optim.rs, Accumulate::cpu).
@compute @workgroup_size(256)
fn accumulate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N {
        return;
    }
    let add = micro_grad[i] * ACC_SCALE;
    if FIRST {
        accumulator[i] = add;
    } else {
        accumulator[i] = accumulator[i] + add;
    }
}

// An exponential moving average of a parameter after its update (src/ops/optim.rs,
// EmaUpdate::cpu): a copy on the first step, then torch's lerp.
@compute @workgroup_size(256)
fn ema_update(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N {
        return;
    }
    let p = averaged[i];
    if hyper[HYPER_FIRST_STEP] != 0.0 {
        ema[i] = p;
    } else {
        ema[i] = ema[i] + EMA_WEIGHT * (p - ema[i]);
    }
}
