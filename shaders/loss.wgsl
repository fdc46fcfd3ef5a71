// loss.wgsl: softmax cross-entropy with integer class labels, fused and numerically stable
// (log-sum-exp with the row maximum subtracted), mean over the batch, as
// torch.nn.functional.cross_entropy(logits, labels); and its backward.
//
// Bindings (group 0), entry `cross_entropy`:
//   0  logits  storage, read        [N, C]
//   1  labels  storage, read        [N] class indices stored as f32
//   2  out     storage, read_write  [1] mean loss
// Entry `cross_entropy_rows` (large losses, a mean after it): as `cross_entropy` but
//   2  out     storage, read_write  [N] each row's loss
// Bindings (group 0), entries `cross_entropy_backward`, `cross_entropy_backward_rows`:
//   0  logits  storage, read        [N, C]
//   1  labels  storage, read        [N]
//   2  dy      storage, read        [1] gradient of the loss
//   3  dx      storage, read_write  [N, C] (softmax(logits) - onehot(labels)) * dy / N
// Entry `cross_entropy_with_grad` (small losses in training): both at once, bindings as the
//   backward's but for
//   3  both    storage, read_write  f32: the mean loss at 0, the gradient [N, C] from GRAD_OFF on
// Entry `cross_entropy_rows_with_grad` (large losses in training): as `cross_entropy_rows` and
//   `cross_entropy_backward_rows` at once, bindings as `cross_entropy_with_grad`'s: each row's
//   loss in both[0..N], the gradient from GRAD_OFF on
//   (f32 in the f16 variant too: the products that read an f16 graph's gradient round it to
//   f16 as they load it, the value an f16 store would hold).
// f16 variant (`loss_f16`, generated from the storage block): logits and dx f16, computed in
// f32; labels, the loss, dy and `both` stay f32.
// Overrides: N rows, C classes; TPR threads per row (the *_rows entries, a power of two <= 256);
//            GRAD_OFF (cross_entropy_with_grad: where the gradient starts, past the loss).
// A label that is not an integer in [0, C) gives NaN.
// torch's options (the rows entries and the backwards, ops::loss::RowOptions): IGNORE_ON 1: a
//   row whose label is IGNORE has loss 0 and gradient 0; SMOOTHING e: the loss against the
//   target (1 - e) onehot + e / C; WEIGHTED: class weights, bound after the labels (labels
//   [N + C]: the N labels, then the C weights), a row's loss (1 - e) w[y] (lse - x[y]) +
//   e / C sum_c w[c] (lse - x[c]). DY_MODE (the backwards): 0 every row's gradient is
//   dy[0] / N (the mean); 1 dy is [N], a gradient per row (the loss per row's backward); 2 it
//   is dy[0] (that backward under a sum).
// Dispatch: `cross_entropy`, `cross_entropy_with_grad`: 1 workgroup of 256 threads; each thread
//           folds rows i, i + 256, .. (with_grad: and writes their gradients) and a tree in
//           workgroup memory sums the row losses.
//           `cross_entropy_backward`: ceil(N / 256) workgroups, folded into (x <= 65535, y);
//           one thread per row. `cross_entropy_rows`, `cross_entropy_backward_rows`,
//           `cross_entropy_rows_with_grad`: ceil(N * TPR / 256) workgroups (folded likewise), TPR
//           threads per row striding over its classes, each thread's maximum and sum of
//           exponentials (one pass, rescaled as the maximum grows) reduced in workgroup memory.

override N: u32 = 1u;
override C: u32 = 1u;
override TPR: u32 = 1u;
override GRAD_OFF: u32 = 0u;
override IGNORE_ON: u32 = 0u;
override IGNORE: f32 = 0.0;
override SMOOTHING: f32 = 0.0;
override DY_MODE: u32 = 0u;
override WEIGHTED: bool = false;
const WG: u32 = 256u;

// generated: begin storage
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<f32>; // always f32
@group(0) @binding(2) var<storage, read_write> out: array<f32>; // always f32
@group(0) @binding(2) var<storage, read> dy: array<f32>; // always f32
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<storage, read_write> both: array<f32>; // always f32
fn ld_logits(i: u32) -> f32 { return logits[i]; }
fn st_dx(i: u32, v: f32) { dx[i] = v; }
// generated: end storage

var<workgroup> part: array<f32, 256>;

fn row_max(base: u32) -> f32 {
    var m = ld_logits(base);
    for (var c = 1u; c < C; c = c + 1u) {
        m = max(m, ld_logits(base + c));
    }
    return m;
}

fn row_sum_exp(base: u32, m: f32) -> f32 {
    var s = 0.0;
    for (var c = 0u; c < C; c = c + 1u) {
        s = s + exp(ld_logits(base + c) - m);
    }
    return s;
}

// A quiet NaN made at run time (a constant NaN is a shader-creation error in WGSL).
fn nan() -> f32 {
    var bits = 0x7fc00000u;
    return bitcast<f32>(bits);
}

// Whether row i's label is the ignored one.
fn ignored(i: u32) -> bool {
    return IGNORE_ON != 0u && labels[i] == IGNORE;
}

// Class c's weight: labels[N + c] with WEIGHTED (the labels input holds the N labels, then the
// C weights), else 1.
fn class_weight(c: u32) -> f32 {
    if WEIGHTED {
        return labels[N + c];
    }
    return 1.0;
}

// The weights' sum W (C without weights), by a loop over the classes (the one-thread-per-row
// backward's few; the row entries sum them with their statistics).
fn weight_sum() -> f32 {
    if !WEIGHTED {
        return f32(C);
    }
    var s = 0.0;
    for (var c = 0u; c < C; c = c + 1u) {
        s = s + class_weight(c);
    }
    return s;
}

// The gradient of row i for class c (label class k, probability p, W the weights' sum): (p -
// target) times the row's share of dy, weighted: p ((1 - e) w[k] + e W / C) - (1 - e) w[k]
// [c = k] - e w[c] / C; 0 for an ignored row, NaN for the whole row of a bad label.
fn class_gradient(i: u32, p: f32, c: u32, k: u32, sw: f32) -> f32 {
    if ignored(i) {
        return 0.0;
    }
    // (a branch, not a select: dy has one element unless DY_MODE is 1)
    var scale = dy[0];
    if DY_MODE == 0u {
        scale = scale / f32(N);
    } else if DY_MODE == 1u {
        scale = dy[i];
    }
    if WEIGHTED {
        var wy = 1.0;
        if k < C {
            wy = class_weight(k);
        }
        let coef = (1.0 - SMOOTHING) * wy + SMOOTHING * sw / f32(C);
        let aim = (1.0 - SMOOTHING) * wy * select(0.0, 1.0, c == k)
            + SMOOTHING * class_weight(c) / f32(C);
        return (p * coef - aim) * scale + select(0.0, nan(), k >= C);
    }
    let aim = (1.0 - SMOOTHING) * select(0.0, 1.0, c == k) + SMOOTHING / f32(C);
    return (p - aim) * scale + select(0.0, nan(), k >= C);
}

// The label as a class index, or C when it is not an integer in [0, C).
fn class_of(i: u32) -> u32 {
    let l = labels[i];
    if l >= 0.0 && l < f32(C) && l == floor(l) {
        return u32(l);
    }
    return C;
}

// The loss of the row at `base` from its log-sum-exp, label class k < C: lse - x[k], or with
// smoothing e, (1 - e) (lse - x[k]) + e (lse - mean(x)) (the one-workgroup entries; the row
// entries sum the logits with their statistics).
fn smoothed_loss(lse: f32, base: u32, k: u32) -> f32 {
    let nll = lse - ld_logits(base + k);
    if SMOOTHING == 0.0 {
        return nll;
    }
    var sx = 0.0;
    for (var c = 0u; c < C; c = c + 1u) {
        sx = sx + ld_logits(base + c);
    }
    return (1.0 - SMOOTHING) * nll + SMOOTHING * (lse - sx / f32(C));
}

@compute @workgroup_size(256)
fn cross_entropy(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < N; i = i + WG) {
        let base = i * C;
        let m = row_max(base);
        let lse = m + log(row_sum_exp(base, m));
        let k = class_of(i);
        if k < C {
            acc = acc + smoothed_loss(lse, base, k);
        } else {
            acc = acc + nan();
        }
    }
    mean_loss(lid, acc);
    if lid == 0u {
        out[0] = part[0] / f32(N);
    }
}

// The mean of the row losses the threads hold, in workgroup memory: the result in part[0].
fn mean_loss(lid: u32, acc: f32) {
    part[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part[lid] = part[lid] + part[lid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn cross_entropy_with_grad(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < N; i = i + WG) {
        let base = i * C;
        let m = row_max(base);
        let sum = row_sum_exp(base, m);
        let k = class_of(i);
        if k < C {
            acc = acc + smoothed_loss(m + log(sum), base, k);
        } else {
            acc = acc + nan();
        }
        // as cross_entropy_backward
        let inv = 1.0 / sum;
        for (var c = 0u; c < C; c = c + 1u) {
            let p = exp(ld_logits(base + c) - m) * inv;
            both[GRAD_OFF + base + c] = class_gradient(i, p, c, k, f32(C));
        }
    }
    mean_loss(lid, acc);
    if lid == 0u {
        both[0] = part[0] / f32(N);
    }
}

@compute @workgroup_size(256)
fn cross_entropy_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    let base = i * C;
    let m = row_max(base);
    let inv = 1.0 / row_sum_exp(base, m);
    let k = class_of(i);
    let sw = weight_sum();
    for (var c = 0u; c < C; c = c + 1u) {
        let p = exp(ld_logits(base + c) - m) * inv;
        st_dx(base + c, class_gradient(i, p, c, k, sw));
    }
}

// The maximum (or sum) of `v` over the TPR threads of this thread's row, seen by each of them.
// Every thread of the workgroup calls it (it has barriers).
fn row_reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    let t = lid % TPR;
    for (var s = TPR / 2u; s > 0u; s = s / 2u) {
        if t < s {
            let o = part[lid + s];
            part[lid] = select(part[lid] + o, max(part[lid], o), is_max);
        }
        workgroupBarrier();
    }
    let r = part[lid - t];
    workgroupBarrier();
    return r;
}

// This thread's row (N or more past the last: no classes, barriers only), its first class and
// the row's maximum logit and sum of exponentials.
struct RowStats {
    row: u32,
    first: u32,
    count: u32,
    m: f32,
    s: f32,
    // the sum of the row's logits (label smoothing's; 0 without)
    sx: f32,
    // with WEIGHTED and smoothing: the weights' sum and the weighted sum of the row's logits
    // (else C and 0)
    sw: f32,
    swx: f32,
}

fn row_stats(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> RowStats {
    let row = (wid.y * nwg.x + wid.x) * (WG / TPR) + lid / TPR;
    let t = lid % TPR;
    let count = select(0u, C, row < N);
    let base = row * C;
    // one pass: each thread's maximum and its sum of exponentials relative to it, rescaled
    // when the maximum grows (a row of 50,000 logits is read once, not twice)
    var m = -3.4028235e38;
    var s = 0.0;
    var sx = 0.0;
    var sw = 0.0;
    var swx = 0.0;
    for (var c = t; c < count; c = c + TPR) {
        let x = ld_logits(base + c);
        sx = sx + x;
        if WEIGHTED && SMOOTHING != 0.0 {
            let w = class_weight(c);
            sw = sw + w;
            swx = swx + w * x;
        }
        if x > m {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s = s + exp(x - m);
        }
    }
    let row_m = row_reduce(lid, m, true);
    s = row_reduce(lid, s * exp(m - row_m), false);
    if SMOOTHING != 0.0 {
        sx = row_reduce(lid, sx, false);
    }
    if WEIGHTED && SMOOTHING != 0.0 {
        sw = row_reduce(lid, sw, false);
        swx = row_reduce(lid, swx, false);
    } else {
        sw = f32(C);
    }
    return RowStats(row, t, count, row_m, s, sx, sw, swx);
}

// The loss of the row of `r`, whose label is class k (NaN for a bad label: k = C; 0 for an
// ignored row; with smoothing e, (1 - e) (lse - x[k]) + e (lse - mean(x))).
fn row_loss(r: RowStats, k: u32) -> f32 {
    if ignored(r.row) {
        return 0.0;
    }
    if k < C {
        let lse = r.m + log(r.s);
        let nll = lse - ld_logits(r.row * C + k);
        if WEIGHTED {
            // (1 - e) w[k] nll + e / C (W lse - sum_c w[c] x[c])
            let wy = class_weight(k);
            if SMOOTHING != 0.0 {
                return (1.0 - SMOOTHING) * wy * nll + SMOOTHING * (r.sw * lse - r.swx) / f32(C);
            }
            return wy * nll;
        }
        if SMOOTHING != 0.0 {
            return (1.0 - SMOOTHING) * nll + SMOOTHING * (lse - r.sx / f32(C));
        }
        return nll;
    }
    return nan();
}

// The gradient for class c of the row of `r` (label class k), as class_gradient.
fn row_gradient(r: RowStats, k: u32, c: u32) -> f32 {
    let p = exp(ld_logits(r.row * C + c) - r.m) / r.s;
    return class_gradient(r.row, p, c, k, r.sw);
}

@compute @workgroup_size(256)
fn cross_entropy_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = row_stats(wid, nwg, lid);
    if r.first == 0u && r.count > 0u {
        out[r.row] = row_loss(r, class_of(r.row));
    }
}

// Each row's loss at both[row] and its gradient at both[GRAD_OFF + ..], as
// `cross_entropy_backward_rows` writes it: the row read once for its statistics, once for its
// gradient.
@compute @workgroup_size(256)
fn cross_entropy_rows_with_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = row_stats(wid, nwg, lid);
    if r.count == 0u {
        return;
    }
    let k = class_of(r.row);
    if r.first == 0u {
        both[r.row] = row_loss(r, k);
    }
    for (var c = r.first; c < C; c = c + TPR) {
        both[GRAD_OFF + r.row * C + c] = row_gradient(r, k, c);
    }
}

@compute @workgroup_size(256)
fn cross_entropy_backward_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = row_stats(wid, nwg, lid);
    if r.count == 0u {
        return;
    }
    let k = class_of(r.row);
    for (var c = r.first; c < C; c = c + TPR) {
        st_dx(r.row * C + c, row_gradient(r, k, c));
    }
}
