// index.wgsl: picking elements by index along an axis (torch.gather, torch.index_select) and
// its adjoint (scatter_add_ / index_add_ into zeros), the cumulative sum along an axis
// (torch.cumsum, or from the end: its backward), and the positions of the J largest (or
// smallest) elements of each row (torch.topk's indices, sorted; torch.sort's with J = K): J
// passes over the row for a few, else a sort of the rows (sorted blocks, then merges).
//
// Shapes, around the axis: x, dx [OUTER, K, INNER]; out, dy [OUTER, J, INNER].
//   `gather`: out[o, j, i] = x[o, ids[o, j, i], i] (ids [OUTER, J, INNER]) or, with SELECT,
//             x[o, ids[j], i] (ids [J]: index_select). Indices are whole numbers stored as f32;
//             one that is not an integer in [0, K) gives NaN (the read index is clamped first,
//             so nothing is read out of bounds).
//   `gather_backward`: dx[o, k, i] = sum over j with grad_ids[o, j, i] == k (SELECT:
//             grad_ids[j] == k) of dy[o, j, i], summed in j order (deterministic, no atomics).
//   `cumsum_lines`, `cumsum_rows`: sums[o, k, i] = x[o, 0, i] + .. + x[o, k, i] (REVERSE:
//             x[o, k, i] + .. + x[o, K - 1, i]), accumulated in f32.
//   `topk` (INNER = 1: rows of x [OUTER, K]): picks[o, r] = the position of the r-th element of
//             row o in top-k order: the larger value first (the smaller without LARGEST), NaN
//             above every number, the lower position first among equals (a strict order, so
//             each round's pick is the first element after the previous one).
//   `sort_blocks` (rows of x [OUTER, K]): pairs[o, k] = (value, position as f32) with each
//             block of BLOCK elements (a power of two, <= 1024) sorted in top-k order;
//             `sort_blocks_last` (one block holds the row): picks[o, j] its first J positions.
//   `merge_runs`: merged = runs [OUTER, K, 2] with each pair of sorted runs of RUN merged
//             into one of 2 RUN; `merge_runs_last` (2 RUN >= K): picks[o, j] the first J
//             positions of the merged row.
//
// Bindings (group 0)
//   `gather`:          0 x (read) [OUTER, K, INNER]; 1 ids (read) [OUTER, J, INNER] or [J];
//                      2 out (read_write) [OUTER, J, INNER]
//   `gather_backward`: 0 grad_ids (read) as ids; 1 dy (read) [OUTER, J, INNER];
//                      2 dx (read_write) [OUTER, K, INNER]
//   `cumsum_lines`, `cumsum_rows`: 0 x (read) [OUTER, K, INNER]; 1 sums (read_write) the same
//   `topk`:            0 x (read) [OUTER, K]; 1 picks (read_write) [OUTER, J] positions as f32
//   `sort_blocks`:     0 x (read) [OUTER, K]; 1 pairs (read_write) [OUTER, K, 2]
//   `merge_runs`:      0 runs (read) [OUTER, K, 2]; 1 merged (read_write) [OUTER, K, 2]
//   `sort_blocks_last`, `merge_runs_last`: as these, with 1 picks [OUTER, J] instead
// f16 variant (`index_f16`, generated from the storage block): x, out, dy, dx and sums f16,
// computed in f32; the indices (ids, grad_ids, picks) and the sort's pairs stay f32.
// Overrides: OUTER, K, J, INNER (extents); SELECT (ids is [J]); REVERSE (sum from the end);
//            LARGEST (topk and the sort: the largest first); BLOCK (sort_blocks' block);
//            RUN (merge_runs' run).
// Dispatch: `gather` ceil(OUTER * J * INNER / 256) workgroups, one thread per output element;
//           `gather_backward` ceil(OUTER * K * INNER / 256), one thread per dx element looping
//           over its J candidates; `cumsum_lines` (INNER > 1) ceil(OUTER * INNER / 256), one
//           thread per line (o, i) walking k (neighbouring threads read neighbouring
//           elements); `cumsum_rows` (INNER == 1) OUTER workgroups, one per row: chunks of 256
//           scanned in workgroup memory, each adding the carry of the chunks before it;
//           `topk` OUTER workgroups, one per row: J rounds, each a strided pass over the row
//           (the first element after the previous pick, per thread) and a tree over the
//           workgroup (J * K / 256 reads per thread); `sort_blocks`
//           ceil(OUTER * ceil(K / BLOCK) / (1024 / BLOCK)) workgroups, each sorting 1024 / BLOCK
//           blocks side by side (short rows share a workgroup): a bitonic network over 1024
//           slots in workgroup memory with stages up to BLOCK (slots past a row are sentinels,
//           after everything), 512 compare-exchanges per stage, a barrier between stages; `merge_runs` ceil(OUTER * K / 256), one thread
//           per element: its place is its place in its run plus a binary search in the run
//           it merges with. All folded into (x <= 65535, y).

override OUTER: u32 = 1u;
override K: u32 = 1u;
override J: u32 = 1u;
override INNER: u32 = 1u;
override SELECT: bool = false;
override REVERSE: bool = false;
override LARGEST: bool = true;
override BLOCK: u32 = 2u;
override RUN: u32 = 1u;
const WG: u32 = 256u;

// Every global read and write of a tensor goes through ld_*/st_*: src/codegen/storage.rs
// generates the f16 variant of this file by rewriting the block between the markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> ids: array<f32>; // always f32
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(0) var<storage, read> grad_ids: array<f32>; // always f32
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(1) var<storage, read_write> sums: array<f32>;
@group(0) @binding(1) var<storage, read_write> picks: array<f32>; // always f32
@group(0) @binding(1) var<storage, read_write> pairs: array<f32>; // always f32
@group(0) @binding(0) var<storage, read> runs: array<f32>; // always f32
@group(0) @binding(1) var<storage, read_write> merged: array<f32>; // always f32
fn ld_x(i: u32) -> f32 { return x[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_dy(i: u32) -> f32 { return dy[i]; }
fn st_dx(i: u32, v: f32) { dx[i] = v; }
fn st_sums(i: u32, v: f32) { sums[i] = v; }
// generated: end storage

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

// A quiet NaN made at run time (a constant NaN is a shader-creation error in WGSL).
fn nan() -> f32 {
    var bits = 0x7fc00000u;
    return bitcast<f32>(bits);
}

// Where output element (o, j, i) finds its index among `len` of them.
fn id_at(o: u32, j: u32, i: u32) -> u32 {
    if SELECT {
        return j;
    }
    return (o * J + j) * INNER + i;
}

@compute @workgroup_size(256)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= OUTER * J * INNER {
        return;
    }
    let i = e % INNER;
    let j = (e / INNER) % J;
    let o = e / (INNER * J);
    let v = ids[id_at(o, j, i)];
    let valid = v >= 0.0 && v < f32(K) && v == floor(v);
    let k = min(u32(select(0.0, v, valid)), K - 1u);
    st_out(e, select(nan(), ld_x((o * K + k) * INNER + i), valid));
}

@compute @workgroup_size(256)
fn gather_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    if e >= OUTER * K * INNER {
        return;
    }
    let i = e % INNER;
    let k = f32((e / INNER) % K);
    let o = e / (INNER * K);
    var acc = 0.0;
    for (var j = 0u; j < J; j = j + 1u) {
        if grad_ids[id_at(o, j, i)] == k {
            acc = acc + ld_dy((o * J + j) * INNER + i);
        }
    }
    st_dx(e, acc);
}

// The position of step s of a line's walk (from the end with REVERSE).
fn step_k(s: u32) -> u32 {
    return select(s, K - 1u - s, REVERSE);
}

@compute @workgroup_size(256)
fn cumsum_lines(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let line = linear_id(wid, nwg, lid);
    if line >= OUTER * INNER {
        return;
    }
    let o = line / INNER;
    let i = line % INNER;
    var acc = 0.0;
    for (var s = 0u; s < K; s = s + 1u) {
        let at = (o * K + step_k(s)) * INNER + i;
        acc = acc + ld_x(at);
        st_sums(at, acc);
    }
}

// Inclusive prefix sum of `v` over the workgroup's threads in workgroup memory (the total then
// in scan[WG - 1]); every thread calls it (barriers).
var<workgroup> scan: array<f32, 256>;
fn inclusive_scan(lid: u32, v: f32) -> f32 {
    scan[lid] = v;
    workgroupBarrier();
    for (var s = 1u; s < WG; s = s * 2u) {
        var add = 0.0;
        if lid >= s {
            add = scan[lid - s];
        }
        workgroupBarrier();
        scan[lid] = scan[lid] + add;
        workgroupBarrier();
    }
    return scan[lid];
}

@compute @workgroup_size(256)
fn cumsum_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // one row per workgroup (uniform across it: the barriers below are reached by all)
    let row = wid.y * nwg.x + wid.x;
    if row >= OUTER {
        return;
    }
    var carry = 0.0;
    for (var base = 0u; base < K; base = base + WG) {
        let s = base + lid;
        var v = 0.0;
        if s < K {
            v = ld_x(row * K + step_k(s));
        }
        let total = inclusive_scan(lid, v);
        if s < K {
            st_sums(row * K + step_k(s), carry + total);
        }
        carry = carry + scan[WG - 1u];
        workgroupBarrier();
    }
}

// Whether (a, ia) comes before (b, ib) in top-k order: the larger value first (the smaller with
// !LARGEST), NaN above every number (first with LARGEST, last without, as torch sorts it),
// the lower index first among equals. Reads NaN from the bits (WGSL may assume floats are
// not NaN).
fn is_nan(v: f32) -> bool {
    let bits = bitcast<u32>(v);
    return (bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0u;
}

fn before(a: f32, ia: u32, b: f32, ib: u32) -> bool {
    let na = is_nan(a);
    let nb = is_nan(b);
    if na && nb {
        return ia < ib;
    }
    if na || nb {
        return na == LARGEST;
    }
    if a == b {
        return ia < ib;
    }
    return select((a < b), (a > b), LARGEST);
}

var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn topk(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // one row per workgroup (uniform across it: the barriers below are reached by all)
    let row = wid.y * nwg.x + wid.x;
    if row >= OUTER {
        return;
    }
    let base = row * K;
    // the previous pick: each round takes the first element after it in top-k order
    var prev_v = 0.0;
    var prev_i = K;
    for (var r = 0u; r < J; r = r + 1u) {
        var v = 0.0;
        var vi = K;
        for (var c = lid; c < K; c = c + WG) {
            let x_c = ld_x(base + c);
            let after = prev_i == K || before(prev_v, prev_i, x_c, c);
            if after && (vi == K || before(x_c, c, v, vi)) {
                v = x_c;
                vi = c;
            }
        }
        best_v[lid] = v;
        best_i[lid] = vi;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s = s / 2u) {
            if lid < s {
                let ov = best_v[lid + s];
                let oi = best_i[lid + s];
                if oi != K && (best_i[lid] == K || before(ov, oi, best_v[lid], best_i[lid])) {
                    best_v[lid] = ov;
                    best_i[lid] = oi;
                }
            }
            workgroupBarrier();
        }
        prev_v = best_v[0];
        prev_i = best_i[0];
        if lid == 0u {
            picks[row * J + r] = f32(prev_i);
        }
        workgroupBarrier();
    }
}

// ---- sort: bitonic blocks in workgroup memory, then merges of sorted runs ----
//
// A sentinel position marks the padding of a block past the row's end: after every element.
const SENTINEL: u32 = 0xffffffffu;
var<workgroup> sort_v: array<f32, 1024>;
var<workgroup> sort_p: array<u32, 1024>;

fn before_or_pad(a: f32, ia: u32, b: f32, ib: u32) -> bool {
    if ia == SENTINEL {
        return false;
    }
    if ib == SENTINEL {
        return true;
    }
    return before(a, ia, b, ib);
}

// A workgroup sorts SLOTS / BLOCK consecutive blocks (a block: BLOCK elements of a row from
// BLOCK * blk), one per segment of BLOCK slots, so that short rows fill the workgroup.
const SLOTS: u32 = 1024u;

// The row, the position in it and whether it holds an element (1) or padding (0), of slot t
// of workgroup w.
fn slot_of(w: u32, t: u32) -> vec3<u32> {
    let blocks = (K + BLOCK - 1u) / BLOCK;
    let g = w * (SLOTS / BLOCK) + t / BLOCK;
    let row = g / blocks;
    let pos = (g % blocks) * BLOCK + t % BLOCK;
    return vec3<u32>(row, pos, u32(row < OUTER && pos < K));
}

// Sorts each segment of workgroup w's slots into sort_v/sort_p in top-k order: a bitonic
// network over SLOTS slots whose stages go up to BLOCK (a power of two, at most 1024), so each
// segment sorts on its own; slots past a row hold sentinels, after everything. Every thread of
// the workgroup calls it (barriers).
fn sort_segments(w: u32, lid: u32) {
    for (var t = lid; t < SLOTS; t = t + WG) {
        let s = slot_of(w, t);
        if s.z == 1u {
            sort_v[t] = ld_x(s.x * K + s.y);
            sort_p[t] = s.y;
        } else {
            sort_v[t] = 0.0;
            sort_p[t] = SENTINEL;
        }
    }
    workgroupBarrier();
    for (var size = 2u; size <= BLOCK; size = size * 2u) {
        for (var stride = size / 2u; stride > 0u; stride = stride / 2u) {
            for (var t = lid; t < SLOTS / 2u; t = t + WG) {
                // the pair (i, i + stride) of compare-exchange t; ascending where bit `size`
                // of i is clear, so that each stage merges bitonic sequences of `size`, and
                // all ascending at the last (each segment's own final merge)
                let i = 2u * stride * (t / stride) + t % stride;
                let j = i + stride;
                let ascending = (i & size) == 0u || size == BLOCK;
                let vi = sort_v[i];
                let pi = sort_p[i];
                let vj = sort_v[j];
                let pj = sort_p[j];
                if before_or_pad(vi, pi, vj, pj) != ascending {
                    sort_v[i] = vj;
                    sort_p[i] = pj;
                    sort_v[j] = vi;
                    sort_p[j] = pi;
                }
            }
            workgroupBarrier();
        }
    }
}

// This workgroup's index (uniform across it: the barriers in sort_segments are reached by all).
fn sort_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

@compute @workgroup_size(256)
fn sort_blocks(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = sort_workgroup(wid, nwg);
    sort_segments(w, lid);
    for (var t = lid; t < SLOTS; t = t + WG) {
        let s = slot_of(w, t);
        if s.z == 1u {
            let at = s.x * K + s.y;
            pairs[2u * at] = sort_v[t];
            pairs[2u * at + 1u] = f32(sort_p[t]);
        }
    }
}

@compute @workgroup_size(256)
fn sort_blocks_last(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = sort_workgroup(wid, nwg);
    sort_segments(w, lid);
    // one block per row: each row's first J positions
    for (var t = lid; t < SLOTS; t = t + WG) {
        let s = slot_of(w, t);
        if s.z == 1u && s.y < J {
            picks[s.x * J + s.y] = f32(sort_p[t]);
        }
    }
}

// Where element e of the runs (pairs of sorted runs of RUN elements along each row) goes in
// their merge: its place in its run plus the count of the other run's elements before it (a
// binary search; the order is strict, so the places are distinct). x: row, y: the place in
// the row, z: 1 for a thread past the last element.
fn merge_place(e: u32) -> vec3<u32> {
    if e >= OUTER * K {
        return vec3<u32>(0u, 0u, 1u);
    }
    let row = e / K;
    let i = e % K;
    let r = i / RUN;
    let v = runs[2u * e];
    let p = u32(runs[2u * e + 1u]);
    let other = (r ^ 1u) * RUN;
    var lo = 0u;
    if other < K {
        var hi = min(RUN, K - other);
        while lo < hi {
            let mid = (lo + hi) / 2u;
            let at = row * K + other + mid;
            if before(runs[2u * at], u32(runs[2u * at + 1u]), v, p) {
                lo = mid + 1u;
            } else {
                hi = mid;
            }
        }
    }
    return vec3<u32>(row, (r & ~1u) * RUN + (i - r * RUN) + lo, 0u);
}

@compute @workgroup_size(256)
fn merge_runs(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    let m = merge_place(e);
    if m.z == 1u {
        return;
    }
    let to = m.x * K + m.y;
    merged[2u * to] = runs[2u * e];
    merged[2u * to + 1u] = runs[2u * e + 1u];
}

@compute @workgroup_size(256)
fn merge_runs_last(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = linear_id(wid, nwg, lid);
    let m = merge_place(e);
    if m.z == 1u || m.y >= J {
        return;
    }
    picks[m.x * J + m.y] = runs[2u * e + 1u];
}
