// optim.wgsl: fused optimizer updates, in place, with torch.optim's exact arithmetic.
// One kernel per parameter tensor (the plan compiler merges a step's updates into one generated
// kernel, src/codegen/optim.rs, which calls the same per-element functions: the block between
// the `shared:` markers); hyperparameters that change between steps (learning rate,
// bias corrections, first-step flag) come in a small storage buffer fed with each run, so a
// schedule never recompiles anything.
//
// Bindings (group 0); the entry point decides how many are used:
//   0  hyper   storage, read        [16] see HYPER_* below (src/ops/optim.rs, Hyper::to_vec)
//   1  scale   storage, read        [1]  gradient scale (global-norm clipping; 1 without)
//   2  grad    storage, read        [N]
//   3  param   storage, read_write  [N] updated in place
//   4  state1  storage, read_write  [N] momentum buffer (sgd_momentum) or exp_avg (adam)
//   5  state2  storage, read_write  [N] exp_avg_sq (adam)
// Entries: `sgd` (bindings 0-3), `sgd_momentum` (0-4), `adam` (0-5).
// Overrides: N elements; NESTEROV (sgd_momentum); DECOUPLED (adam: AdamW's decoupled decay).
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded into (x <= 65535, y); one element
//           per thread.

override N: u32 = 1u;
override NESTEROV: bool = false;
override DECOUPLED: bool = false;
const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> hyper: array<f32>;
@group(0) @binding(1) var<storage, read> scale: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> param: array<f32>;
@group(0) @binding(4) var<storage, read_write> state1: array<f32>;
@group(0) @binding(5) var<storage, read_write> state2: array<f32>;

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

// One element's update from its parameter value p, gradient gr and the gradient scale sc (and
// states); every optimizer kernel binds `hyper` at 0 and defines NESTEROV and DECOUPLED.

fn sgd_update(p: f32, gr: f32, sc: f32) -> f32 {
    let g = gr * sc + hyper[HYPER_WEIGHT_DECAY] * p;
    return p - hyper[HYPER_LR] * g;
}

// returns (param, momentum_buffer)
fn sgd_momentum_update(p: f32, gr: f32, sc: f32, buf: f32) -> vec2<f32> {
    var g = gr * sc + hyper[HYPER_WEIGHT_DECAY] * p;
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
    var g = gr * sc;
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
    if i >= N {
        return;
    }
    param[i] = sgd_update(param[i], grad[i], scale[0]);
}

@compute @workgroup_size(256)
fn sgd_momentum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= N {
        return;
    }
    let r = sgd_momentum_update(param[i], grad[i], scale[0], state1[i]);
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
    if i >= N {
        return;
    }
    let r = adam_update(param[i], grad[i], scale[0], state1[i], state2[i]);
    param[i] = r.x;
    state1[i] = r.y;
    state2[i] = r.z;
}
