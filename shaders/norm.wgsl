// norm.wgsl: batch and layer normalization's kernels (src/ops/norm.rs). A tensor is viewed as
// (OUTER, GROUPS, INNER); group g holds the OUTER * INNER elements (o, g, i), at index
// (o * GROUPS + g) * INNER + i: a batch norm's channel of (N, C, S) (OUTER = N, INNER = S), a
// layer norm's row of (1, R, D).
//
//   group_stats         stats[g] = mean of group g, stats[GROUPS + g] = mean of (x - mean)^2
//                       (biased; two passes); with BLOCKS > 1 the same for each block of
//                       BLOCK_LEN elements of every group (BLOCKS x 2 rows)          (GroupStats)
//   merge_stats         each group's mean and variance from its blocks' (BLOCKS x 2 rows):
//                       mean = sum(n_b mean_b) / N, var = sum(n_b (var_b + (mean_b - mean)^2))
//                       / N (Chan et al.'s merge; N elements per group)             (MergeStats)
//   group_stats_running, merge_stats_running
//                       the same (whole groups), also moving the running statistics in place as
//                       running_update2 would from the statistics they write
//                                                           (GroupStats, MergeStats: running)
//   normalize           out = (x - mean[g]) / sqrt(var[g] + EPS)                     (Normalize)
//   normalize_affine    out = normalize(x) * weight[a] + bias[a], a = g, or with AFFINE_INNER
//                       the element's INNER position (a layer norm's feature) (Normalize, affine)
//                       (both, and stats_normalize(_affine)(_running): then max(out, 0) with
//                       RELU, a relu the plan compiler fused)
//   stats_normalize(_affine)
//                       group_stats and normalize(_affine) in one kernel: each group's threads
//                       compute its statistics, write them past the output (at STATS_OFF, in
//                       f32 precision: st_*_f32, whose output is f32 in f32 graphs and where
//                       the plan compiler stores an f16 graph's result as f32; not with
//                       WRITE_STATS false: nothing reads them) and normalize its
//                       elements; for groups of a few thousand elements at most (a layer
//                       norm's rows)                                         (NormalizeStats)
//   stats_normalize_affine_running
//                       stats_normalize_affine that also moves the running statistics in place
//                       as running_update2 would              (NormalizeStats, running)
//   normalize_backward  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), per group,
//                       rstd = 1 / sqrt(var[g] + EPS): the gradient through the group's own
//                       statistics                                          (NormalizeBackward)
//   group_sums          sums[g] = sum(dy), sums[SUMS_ROW + g] = sum(dy xhat) over group g, xhat
//                       recomputed from x: the affine form's bias and weight gradients; rows
//                       of SUMS_ROW (GROUPS rounded up to 128, zeros after) so that the second
//                       row is a view at an aligned offset; with BLOCKS > 1 each block of
//                       BLOCK_LEN elements of every group writes its own two rows of partial
//                       sums (BLOCKS x 2 rows), which a reduction adds up         (GroupSums)
//   normalize_affine_backward
//                       dx = weight[g] rstd (dy - sums[g] / n - xhat sums[SUMS_ROW + g] / n),
//                       elementwise (n = OUTER * INNER); with CHANNELS_FIRST stored as
//                       (GROUPS, OUTER, INNER), a convolution's layout (NormalizeAffineBackward)
//   inner_sums          sums[c] = sum(dy), sums[SUMS_ROW + c] = sum(dy xhat) over the elements
//                       at INNER position c of every group, xhat recomputed from x: a layer
//                       norm's bias and weight gradients (rows of SUMS_ROW, INNER rounded up
//                       to 128, zeros after); with BLOCKS > 1 each block of BLOCK_ROWS rows
//                       writes its own two rows of partial sums (BLOCKS x 2 rows), which a
//                       reduction adds up                                (GroupSums, inner)
//   normalize_weighted_backward
//                       normalize_backward of dxhat = dy * weight[c] (c: INNER position), xhat
//                       recomputed from x: a layer norm's input gradient through its
//                       features' scale                          (NormalizeBackward, weighted)
//   normalize_weighted_backward_add
//                       the same plus res: the gradient arriving through a residual connection
//                       around the layer norm                  (NormalizeBackward, residual)
//   normalize_weighted_backward(_add)_sums
//                       normalize_weighted_backward(_add) and, in workgroups after its own,
//                       inner_sums of the same dy, x and statistics into the sums binding: a
//                       layer norm's whole backward in one kernel     (NormalizeBackward, sums)
//   running_update      running0 = (1 - MOMENTUM) running0 + MOMENTUM (SCALE0 value[0..N]), in
//                       place; running_update2 also running1 from value[N..2N] with SCALE1
//                                                                           (RunningUpdate)
//
// Bindings (group 0), inputs read, the output read_write:
//   group_stats:         0 x [OUTER*GROUPS*INNER]   1 stats [BLOCKS*2*GROUPS] (per block: means,
//                        then variances)
//   merge_stats:         0 block_stats [BLOCKS*2*GROUPS]   1 stats [2*GROUPS]
//   group_stats_running: 0 x [..]   1 running0 [GROUPS]   2 running1 [GROUPS]   3 stats [2*GROUPS]
//   merge_stats_running: 0 block_stats [..]   1 running0   2 running1   3 stats [2*GROUPS]
//   normalize:           0 x [..]   1 stats [2*GROUPS]   2 out [..]
//   normalize_affine:    0 x [..]   1 stats [2*GROUPS]   2 weight [GROUPS]   3 bias [GROUPS]
//                        4 out [..]
//   stats_normalize:     0 x [..]   1 out [STATS_OFF + 2*GROUPS]: the result, then the stats
//   stats_normalize_affine:
//                        0 x [..]   1 weight   2 bias   3 out [STATS_OFF + 2*GROUPS]
//   stats_normalize_affine_running:
//                        0 x   1 weight   2 bias   3 running0 [GROUPS]   4 running1 [GROUPS]
//                        5 out [STATS_OFF + 2*GROUPS]
//   normalize_backward:  0 dxhat [..]   1 xhat [..]   2 stats [2*GROUPS]   3 dx [..]
//   group_sums:          0 dy [..]   1 x [..]   2 stats [2*GROUPS]   3 sums [BLOCKS*2*SUMS_ROW]
//   inner_sums:          0 dy [..]   1 x [..]   2 stats [2*GROUPS]   3 sums [BLOCKS*2*SUMS_ROW]
//   normalize_weighted_backward:
//                        0 dy [..]   1 x [..]   2 stats [2*GROUPS]   3 weight [INNER]   4 dx [..]
//   normalize_weighted_backward_add:
//                        0 dy   1 x   2 stats   3 weight   4 res [..]   5 dx [..]
//   normalize_weighted_backward_sums:
//                        0 dy   1 x   2 stats   3 weight   4 sums [BLOCKS*2*SUMS_ROW]   5 dx
//   normalize_weighted_backward_add_sums:
//                        0 dy   1 x   2 stats   3 weight   4 res   5 sums [..]   6 dx [..]
//   normalize_affine_backward:
//                        0 dy [..]   1 x [..]   2 stats [2*GROUPS]   3 weight [GROUPS]
//                        4 sums [2*SUMS_ROW]   5 dx [..]
//   running_update(2):   0 value [N] ([2N])   1 running0 [N]   (2 running1 [N]): parameters,
//                        updated in place
// Overrides: OUTER, GROUPS, INNER, EPS; TPG (threads per group, a power of two <= 256); N,
//            MOMENTUM, SCALE0, SCALE1 (running_update; N is merge_stats' elements per group);
//            AFFINE_INNER (normalize_affine); RELU (normalize(_affine), stats_normalize*);
//            CHANNELS_FIRST (normalize_affine_backward);
//            SUMS_ROW (group_sums, inner_sums, normalize_affine_backward, *_sums); BLOCKS,
//            BLOCK_LEN (group_stats, merge_stats, group_sums: blocks of each group and their
//            elements; inner_sums, *_sums: blocks of rows and their rows); STATS_OFF, WRITE_STATS
//            (stats_normalize: the element count rounded up to 128; whether to write them).
// Dispatch: group_stats, stats_normalize(_affine), normalize_backward, group_sums: TPG
//           threads per group (group_stats, group_sums: per group and block), 256 / TPG groups
//           per workgroup of 256 threads (ceil(GROUPS * TPG / 256) workgroups, folded into
//           (x <= 65535, y)), f32 partial sums per thread reduced in workgroup memory within
//           each group's TPG threads (the host gives large groups, a batch norm's channels,
//           the whole workgroup, and small ones, a layer norm's rows, a few threads);
//           normalize_weighted_backward(_add) as normalize_backward; normalize(_affine),
//           normalize_affine_backward and running_update: one thread per element, ceil(n / 256)
//           (merge_stats: one thread per group, ceil(GROUPS / 256))
//           workgroups, folded likewise (group_sums: SUMS_ROW groups, the padding's without
//           elements; times BLOCKS); inner_sums: a workgroup per 64 positions of a row and
//           block of rows (ceil(SUMS_ROW / 64) * BLOCKS), 4 lanes of 64 threads striding over
//           the block's rows, the lanes' sums added in workgroup memory;
//           normalize_weighted_backward(_add)_sums: normalize_weighted_backward's workgroups
//           (ceil(GROUPS * TPG / 256)), then inner_sums' (the grid folded as one).

override OUTER: u32 = 1u;
override GROUPS: u32 = 1u;
override INNER: u32 = 1u;
override EPS: f32 = 1e-5;
override N: u32 = 1u;
override MOMENTUM: f32 = 0.1;
override SCALE0: f32 = 1.0;
override SCALE1: f32 = 1.0;
override TPG: u32 = 256u;
override AFFINE_INNER: bool = false;
override RELU: bool = false;
override CHANNELS_FIRST: bool = false;
override SUMS_ROW: u32 = GROUPS;
override STATS_OFF: u32 = 0u;
override WRITE_STATS: bool = true;
override BLOCKS: u32 = 1u;
override BLOCK_LEN: u32 = 4294967295u;
const WG: u32 = 256u;
// Groups per workgroup.
override GPW: u32 = WG / TPG;

// Each entry point uses the bindings of its line in the table above. Tensors (x, dy, the
// outputs) are read and written through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant (f16 tensors, mixed precision) by rewriting the block between the `generated:`
// markers; statistics, weights, biases and running averages stay f32.
// generated: begin storage
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(0) var<storage, read> dxhat: array<f32>;
@group(0) @binding(0) var<storage, read> value: array<f32>; // always f32
@group(0) @binding(1) var<storage, read_write> stats_out: array<f32>; // always f32
@group(0) @binding(1) var<storage, read> stats: array<f32>; // always f32
@group(0) @binding(1) var<storage, read> xhat: array<f32>;
@group(0) @binding(1) var<storage, read_write> running0: array<f32>; // always f32
@group(0) @binding(2) var<storage, read_write> normalized: array<f32>;
@group(0) @binding(2) var<storage, read> stats2: array<f32>; // always f32
@group(0) @binding(2) var<storage, read_write> running1: array<f32>; // always f32
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(2) var<storage, read> weight2: array<f32>; // always f32
@group(0) @binding(3) var<storage, read> bias3: array<f32>; // always f32
@group(0) @binding(4) var<storage, read_write> affine_out: array<f32>;
@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> x1: array<f32>;
@group(0) @binding(3) var<storage, read_write> sums_out: array<f32>; // always f32
@group(0) @binding(3) var<storage, read> weight3: array<f32>; // always f32
@group(0) @binding(4) var<storage, read> sums: array<f32>; // always f32
@group(0) @binding(5) var<storage, read_write> dx5: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx4: array<f32>;
@group(0) @binding(1) var<storage, read_write> normalized1: array<f32>;
@group(0) @binding(1) var<storage, read> weight1: array<f32>; // always f32
@group(0) @binding(2) var<storage, read> bias2: array<f32>; // always f32
@group(0) @binding(3) var<storage, read_write> affine_out3: array<f32>;
@group(0) @binding(4) var<storage, read> res4: array<f32>;
@group(0) @binding(3) var<storage, read_write> running3: array<f32>; // always f32
@group(0) @binding(4) var<storage, read_write> running4: array<f32>; // always f32
@group(0) @binding(5) var<storage, read_write> affine_out5: array<f32>;
@group(0) @binding(0) var<storage, read> block_stats: array<f32>; // always f32
@group(0) @binding(3) var<storage, read_write> stats_out3: array<f32>; // always f32
@group(0) @binding(4) var<storage, read_write> sums_out4: array<f32>; // always f32
@group(0) @binding(5) var<storage, read_write> sums_out5: array<f32>; // always f32
@group(0) @binding(6) var<storage, read_write> dx6: array<f32>;
fn ld_x(i: u32) -> f32 { return x[i]; }
fn ld_dxhat(i: u32) -> f32 { return dxhat[i]; }
fn ld_xhat(i: u32) -> f32 { return xhat[i]; }
fn ld_dy(i: u32) -> f32 { return dy[i]; }
fn ld_x1(i: u32) -> f32 { return x1[i]; }
fn ld_res4(i: u32) -> f32 { return res4[i]; }
fn st_normalized(i: u32, v: f32) { normalized[i] = v; }
fn st_dx(i: u32, v: f32) { dx[i] = v; }
fn st_affine_out(i: u32, v: f32) { affine_out[i] = v; }
fn st_dx5(i: u32, v: f32) { dx5[i] = v; }
fn st_dx4(i: u32, v: f32) { dx4[i] = v; }
fn st_dx6(i: u32, v: f32) { dx6[i] = v; }
fn st_normalized1(i: u32, v: f32) { normalized1[i] = v; }
fn st_affine_out3(i: u32, v: f32) { affine_out3[i] = v; }
fn st_affine_out5(i: u32, v: f32) { affine_out5[i] = v; }
fn st_normalized1_f32(i: u32, v: f32) { normalized1[i] = v; }
fn st_affine_out3_f32(i: u32, v: f32) { affine_out3[i] = v; }
fn st_affine_out5_f32(i: u32, v: f32) { affine_out5[i] = v; }
// generated: end storage

var<workgroup> partial: array<vec2<f32>, 256>;

// Index of element e (0 <= e < OUTER * INNER) of group g.
fn at(g: u32, e: u32) -> u32 {
    let o = e / INNER;
    return (o * GROUPS + g) * INNER + (e - o * INNER);
}

// The sum of `v` (both components) over the TPG threads of this thread's group, seen by each
// of them. Every thread of the workgroup calls it (it has barriers).
fn group_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
    partial[lid] = v;
    workgroupBarrier();
    let t = lid % TPG;
    for (var s = TPG / 2u; s > 0u; s = s / 2u) {
        if t < s {
            partial[lid] = partial[lid] + partial[lid + s];
        }
        workgroupBarrier();
    }
    let total = partial[lid - t];
    workgroupBarrier();
    return total;
}

// The workgroup's index in the (folded) grid.
fn workgroup_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// This thread's group (may be >= GROUPS in the last workgroup) and its elements, `count` from
// the group's element `first`: none past the last group, whose threads take part in the
// barriers only.
struct Lane {
    g: u32,
    t: u32,
    first: u32,
    count: u32,
}
fn lane(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Lane {
    let g = workgroup_index(wid, nwg) * GPW + lid / TPG;
    return Lane(g, lid % TPG, 0u, select(0u, OUTER * INNER, g < GROUPS));
}

// Workgroups per block of a split kernel: its GROUPS (or `groups`) at GPW per workgroup.
fn per_block(groups: u32) -> u32 {
    return (groups + GPW - 1u) / GPW;
}

// As `lane`, in the blocks of BLOCK_LEN elements of every group: the workgroups of the first
// block, then the next block's (per_block(GROUPS) each).
fn block_lane(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> Lane {
    let w = workgroup_index(wid, nwg);
    let block = w / per_block(GROUPS);
    let g = (w % per_block(GROUPS)) * GPW + lid / TPG;
    let n = OUTER * INNER;
    let first = min(block * BLOCK_LEN, n);
    return Lane(g, lid % TPG, first, select(0u, min(n - first, BLOCK_LEN), g < GROUPS));
}

// The group of element i of (OUTER, GROUPS, INNER).
fn group_at(i: u32) -> u32 {
    return (i / INNER) % GROUPS;
}

// Element i of x normalized by its group's statistics (the entries binding stats at 1).
fn normalized_x(i: u32) -> f32 {
    let g = group_at(i);
    return (ld_x(i) - stats[g]) / sqrt(stats[GROUPS + g] + EPS);
}

// The mean and biased variance of this lane's group, seen by each of its threads. Every thread
// of the workgroup calls it (barriers). Two passes: the squared deviations from the mean, not
// E[x^2] - E[x]^2, which cancels.
fn lane_stats(l: Lane, lid: u32) -> vec2<f32> {
    let n = f32(max(l.count, 1u));
    var s = 0.0;
    for (var e = l.t; e < l.count; e = e + TPG) {
        s = s + ld_x(at(l.g, l.first + e));
    }
    let m = group_sum(lid, vec2<f32>(s, 0.0)).x / n;
    s = 0.0;
    for (var e = l.t; e < l.count; e = e + TPG) {
        let d = ld_x(at(l.g, l.first + e)) - m;
        s = s + d * d;
    }
    return vec2<f32>(m, group_sum(lid, vec2<f32>(s, 0.0)).x / n);
}

@compute @workgroup_size(256)
fn group_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) >= per_block(GROUPS) * BLOCKS {
        return;
    }
    let l = block_lane(wid, nwg, lid);
    let s = lane_stats(l, lid);
    if l.t == 0u && l.count > 0u {
        let row = l.first / BLOCK_LEN * 2u * GROUPS;
        stats_out[row + l.g] = s.x;
        stats_out[row + GROUPS + l.g] = s.y;
    }
}

// running_update2 of group g from its new statistics s (mean, variance).
fn move_running(g: u32, s: vec2<f32>) {
    running0[g] = (1.0 - MOMENTUM) * running0[g] + MOMENTUM * (SCALE0 * s.x);
    running1[g] = (1.0 - MOMENTUM) * running1[g] + MOMENTUM * (SCALE1 * s.y);
}

@compute @workgroup_size(256)
fn group_stats_running(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let s = lane_stats(l, lid);
    if l.t == 0u && l.count > 0u {
        stats_out3[l.g] = s.x;
        stats_out3[GROUPS + l.g] = s.y;
        move_running(l.g, s);
    }
}

// Group g's mean and variance from its blocks': each block weighs its elements' share of the
// group's N.
fn merged_stats(g: u32) -> vec2<f32> {
    var mean = 0.0;
    for (var b = 0u; b < BLOCKS; b = b + 1u) {
        let first = min(b * BLOCK_LEN, N);
        let share = f32(min(N - first, BLOCK_LEN)) / f32(N);
        mean = mean + share * block_stats[b * 2u * GROUPS + g];
    }
    var var_ = 0.0;
    for (var b = 0u; b < BLOCKS; b = b + 1u) {
        let first = min(b * BLOCK_LEN, N);
        let share = f32(min(N - first, BLOCK_LEN)) / f32(N);
        let d = block_stats[b * 2u * GROUPS + g] - mean;
        var_ = var_ + share * (block_stats[(b * 2u + 1u) * GROUPS + g] + d * d);
    }
    return vec2<f32>(mean, var_);
}

@compute @workgroup_size(256)
fn merge_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = workgroup_index(wid, nwg) * WG + lid;
    if g >= GROUPS {
        return;
    }
    let s = merged_stats(g);
    stats_out[g] = s.x;
    stats_out[GROUPS + g] = s.y;
}

@compute @workgroup_size(256)
fn merge_stats_running(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = workgroup_index(wid, nwg) * WG + lid;
    if g >= GROUPS {
        return;
    }
    let s = merged_stats(g);
    stats_out3[g] = s.x;
    stats_out3[GROUPS + g] = s.y;
    move_running(g, s);
}

@compute @workgroup_size(256)
fn stats_normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let s = lane_stats(l, lid);
    let d = sqrt(s.y + EPS);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let i = at(l.g, e);
        st_normalized1(i, relu_if((ld_x(i) - s.x) / d));
    }
    if WRITE_STATS && l.t == 0u && l.count > 0u {
        st_normalized1_f32(STATS_OFF + l.g, s.x);
        st_normalized1_f32(STATS_OFF + GROUPS + l.g, s.y);
    }
}

@compute @workgroup_size(256)
fn stats_normalize_affine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let s = lane_stats(l, lid);
    let d = sqrt(s.y + EPS);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let i = at(l.g, e);
        let a = select(l.g, i % INNER, AFFINE_INNER);
        st_affine_out3(i, relu_if((ld_x(i) - s.x) / d * weight1[a] + bias2[a]));
    }
    if WRITE_STATS && l.t == 0u && l.count > 0u {
        st_affine_out3_f32(STATS_OFF + l.g, s.x);
        st_affine_out3_f32(STATS_OFF + GROUPS + l.g, s.y);
    }
}

@compute @workgroup_size(256)
fn stats_normalize_affine_running(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let s = lane_stats(l, lid);
    let d = sqrt(s.y + EPS);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let i = at(l.g, e);
        let a = select(l.g, i % INNER, AFFINE_INNER);
        st_affine_out5(i, relu_if((ld_x(i) - s.x) / d * weight1[a] + bias2[a]));
    }
    if l.t == 0u && l.count > 0u {
        if WRITE_STATS {
            st_affine_out5_f32(STATS_OFF + l.g, s.x);
            st_affine_out5_f32(STATS_OFF + GROUPS + l.g, s.y);
        }
        running3[l.g] = (1.0 - MOMENTUM) * running3[l.g] + MOMENTUM * (SCALE0 * s.x);
        running4[l.g] = (1.0 - MOMENTUM) * running4[l.g] + MOMENTUM * (SCALE1 * s.y);
    }
}

@compute @workgroup_size(256)
fn normalize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + lid;
    if i >= OUTER * GROUPS * INNER {
        return;
    }
    st_normalized(i, relu_if(normalized_x(i)));
}

// max(v, 0) where the plan compiler fused the relu after a normalization (RELU), as
// unary.wgsl's relu computes it.
fn relu_if(v: f32) -> f32 {
    return select(v, max(v, 0.0), RELU);
}

@compute @workgroup_size(256)
fn normalize_affine(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + lid;
    if i >= OUTER * GROUPS * INNER {
        return;
    }
    let a = select(group_at(i), i % INNER, AFFINE_INNER);
    st_affine_out(i, relu_if(normalized_x(i) * weight2[a] + bias3[a]));
}

@compute @workgroup_size(256)
fn group_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // the workgroups of one block of every group's elements, then the next block's
    let w = workgroup_index(wid, nwg);
    if w >= per_block(SUMS_ROW) * BLOCKS {
        return;
    }
    let block = w / per_block(SUMS_ROW);
    let g = (w % per_block(SUMS_ROW)) * GPW + lid / TPG;
    let t = lid % TPG;
    let n = OUTER * INNER;
    let first = min(block * BLOCK_LEN, n);
    let count = select(0u, min(n - first, BLOCK_LEN), g < GROUPS);
    var s = vec2<f32>(0.0, 0.0);
    if g < GROUPS {
        let mean = stats2[g];
        let rstd = 1.0 / sqrt(stats2[GROUPS + g] + EPS);
        for (var e = t; e < count; e = e + TPG) {
            let k = at(g, first + e);
            let d = ld_dy(k);
            s = s + vec2<f32>(d, d * ((ld_x1(k) - mean) * rstd));
        }
    }
    let total = group_sum(lid, s);
    // the rows' padding (groups GROUPS .. SUMS_ROW, no elements) gets zeros
    if t == 0u && g < SUMS_ROW {
        let at = block * 2u * SUMS_ROW + g;
        sums_out[at] = total.x;
        sums_out[at + SUMS_ROW] = total.y;
    }
}

@compute @workgroup_size(256)
fn normalize_affine_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + lid;
    if i >= OUTER * GROUPS * INNER {
        return;
    }
    let g = group_at(i);
    let n = f32(OUTER * INNER);
    let rstd = 1.0 / sqrt(stats2[GROUPS + g] + EPS);
    let xh = (ld_x1(i) - stats2[g]) * rstd;
    let dx = weight3[g] * rstd * (ld_dy(i) - sums[g] / n - xh * (sums[SUMS_ROW + g] / n));
    st_dx5(select(i, channels_first_index(i), CHANNELS_FIRST), dx);
}

// Where element i = (o, g, r) of (OUTER, GROUPS, INNER) lives in (GROUPS, OUTER, INNER).
fn channels_first_index(i: u32) -> u32 {
    let r = i % INNER;
    let g = (i / INNER) % GROUPS;
    let o = i / (INNER * GROUPS);
    return (g * OUTER + o) * INNER + r;
}

@compute @workgroup_size(256)
fn normalize_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    var s = vec2<f32>(0.0, 0.0);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        let d = ld_dxhat(k);
        s = s + vec2<f32>(d, d * ld_xhat(k));
    }
    let means = group_sum(lid, s) / f32(OUTER * INNER);
    if l.count > 0u {
        let rstd = 1.0 / sqrt(stats2[GROUPS + l.g] + EPS);
        for (var e = l.t; e < l.count; e = e + TPG) {
            let k = at(l.g, e);
            st_dx(k, rstd * (ld_dxhat(k) - means.x - ld_xhat(k) * means.y));
        }
    }
}

// What a lane's group's weighted backward needs: its mean and rstd, and the group means of
// dxhat = dy * weight and of dxhat * xhat. Every thread of the workgroup calls it (barriers).
struct Weighted {
    mean: f32,
    rstd: f32,
    means: vec2<f32>,
}
fn weighted_means(l: Lane, lid: u32) -> Weighted {
    var mean = 0.0;
    var rstd = 0.0;
    if l.count > 0u {
        mean = stats2[l.g];
        rstd = 1.0 / sqrt(stats2[GROUPS + l.g] + EPS);
    }
    var s = vec2<f32>(0.0, 0.0);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        let d = ld_dy(k) * weight3[k % INNER];
        s = s + vec2<f32>(d, d * ((ld_x1(k) - mean) * rstd));
    }
    return Weighted(mean, rstd, group_sum(lid, s) / f32(OUTER * INNER));
}

// Element k's gradient from its group's `weighted_means`.
fn weighted_dx(k: u32, w: Weighted) -> f32 {
    let d = ld_dy(k) * weight3[k % INNER];
    let xh = (ld_x1(k) - w.mean) * w.rstd;
    return w.rstd * (d - w.means.x - xh * w.means.y);
}

@compute @workgroup_size(256)
fn normalize_weighted_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let w = weighted_means(l, lid);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        st_dx4(k, weighted_dx(k, w));
    }
}

@compute @workgroup_size(256)
fn normalize_weighted_backward_add(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if workgroup_index(wid, nwg) * GPW >= GROUPS {
        return;
    }
    let l = lane(wid, nwg, lid);
    let w = weighted_means(l, lid);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        st_dx5(k, weighted_dx(k, w) + ld_res4(k));
    }
}

// inner_sums' work for its workgroup w (0 <= w < ceil(SUMS_ROW / 64) * BLOCKS): the sums of
// dy and dy xhat over the block's rows at position c of each row, found by the threads of the
// first lane (lid < 64, `store`) for the caller to store at `at` and `at + SUMS_ROW` (zeros
// for the rows' padding, c = INNER .. SUMS_ROW). Every thread of the workgroup calls it
// (barrier); w is the same for all of them.
struct ColumnSums {
    at: u32,
    total: vec2<f32>,
    store: bool,
}
fn column_sums(w: u32, lid: u32) -> ColumnSums {
    let columns = (SUMS_ROW + 63u) / 64u;
    if w >= columns * BLOCKS {
        return ColumnSums(0u, vec2<f32>(0.0, 0.0), false);
    }
    let block = w / columns;
    let c = (w % columns) * 64u + lid % 64u;
    let lane4 = lid / 64u;
    let rows = OUTER * GROUPS;
    let first = min(block * BLOCK_LEN, rows);
    let end = min(rows, first + min(BLOCK_LEN, rows));
    var s = vec2<f32>(0.0, 0.0);
    if c < INNER {
        for (var r = first + lane4; r < end; r = r + 4u) {
            let g = r % GROUPS;
            let k = r * INNER + c;
            let d = ld_dy(k);
            s = s + vec2<f32>(d, d * ((ld_x1(k) - stats2[g]) / sqrt(stats2[GROUPS + g] + EPS)));
        }
    }
    partial[lid] = s;
    workgroupBarrier();
    var total = vec2<f32>(0.0, 0.0);
    if lane4 == 0u {
        total = partial[lid] + partial[lid + 64u] + partial[lid + 128u] + partial[lid + 192u];
    }
    return ColumnSums(block * 2u * SUMS_ROW + c, total, lane4 == 0u && c < SUMS_ROW);
}

@compute @workgroup_size(256)
fn inner_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let s = column_sums(workgroup_index(wid, nwg), lid);
    if s.store {
        sums_out[s.at] = s.total.x;
        sums_out[s.at + SUMS_ROW] = s.total.y;
    }
}

@compute @workgroup_size(256)
fn normalize_weighted_backward_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // the groups' workgroups first, then inner_sums'
    let w = workgroup_index(wid, nwg);
    if w >= per_block(GROUPS) {
        let s = column_sums(w - per_block(GROUPS), lid);
        if s.store {
            sums_out4[s.at] = s.total.x;
            sums_out4[s.at + SUMS_ROW] = s.total.y;
        }
        return;
    }
    let l = lane(wid, nwg, lid);
    let wm = weighted_means(l, lid);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        st_dx5(k, weighted_dx(k, wm));
    }
}

@compute @workgroup_size(256)
fn normalize_weighted_backward_add_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = workgroup_index(wid, nwg);
    if w >= per_block(GROUPS) {
        let s = column_sums(w - per_block(GROUPS), lid);
        if s.store {
            sums_out5[s.at] = s.total.x;
            sums_out5[s.at + SUMS_ROW] = s.total.y;
        }
        return;
    }
    let l = lane(wid, nwg, lid);
    let wm = weighted_means(l, lid);
    for (var e = l.t; e < l.count; e = e + TPG) {
        let k = at(l.g, e);
        st_dx6(k, weighted_dx(k, wm) + ld_res4(k));
    }
}

@compute @workgroup_size(256)
fn running_update(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + lid;
    if i >= N {
        return;
    }
    running0[i] = (1.0 - MOMENTUM) * running0[i] + MOMENTUM * (SCALE0 * value[i]);
}

@compute @workgroup_size(256)
fn running_update2(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = workgroup_index(wid, nwg) * WG + lid;
    if i >= N {
        return;
    }
    move_running(i, vec2<f32>(value[i], value[N + i]));
}
