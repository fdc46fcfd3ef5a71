// embedding.wgsl: embedding lookup (torch.nn.functional.embedding) and its weight gradient.
// Indices are whole numbers stored as f32; an index that is not an integer in [0, V) gives a row
// of NaN (the read index is clamped first, so nothing is read out of bounds).
//
// Entry `embedding`: out[i, e] = weight[indices[i], e].
// Entry `embedding_backward`: dw[v, e] = sum over i with indices[i] == v of dy[i, e], summed in
// index order (deterministic, no float atomics); with REPEAT > 1, dy holds REPEAT blocks of N
// rows and each adds in (dy[b * N + i, e] for b in order: a lookup broadcast over a batch).
// A workgroup owns row v and 256 of its columns: it scans the indices 256 at a time (one read
// per thread), counts the chunk's matches and, where there are any, lists their positions in
// order (a prefix sum over the workgroup), then each thread adds its column of those rows of dy. Work: V * ceil(E / 256) * N index reads plus one
// read of dy per used row and column, not V * E * N.
// Entries for large tables (the plan compiler's choice, `exec::lower::sorted_embedding_backward`),
// where every row's workgroups scanning every index would be most of the work:
// `embedding_rows` lists each row's occurrences once, a stable counting sort in one workgroup:
// sorted = [ends (V) | list (N)], whole numbers stored as f32 (exact below 2^24): row v's
// positions, in index order, are list[ends[v - 1] .. ends[v]] (ends[-1] = 0); -1 after the
// valid indices' positions. Work: N * 256 comparisons in workgroup memory, V + N stores.
// `embedding_backward_sorted`: as `embedding_backward` (same sums in the same order), reading
// row v's positions from that list (bound as `indices`) instead of scanning: N + V * E reads.
//
// Bindings
// `embedding`:           0 indices (read) [N]; 1 weight (read) [V, E]; 2 out (read_write) [N, E]
// `embedding_backward`:  0 indices (read) [N]; 1 dy (read) [REPEAT * N, E]; 2 dw (read_write)
//                        [V, E]
// `embedding_rows`:      0 indices (read) [N]; 1 sorted (read_write, as u32 atomics) [V + N]
// `embedding_backward_sorted`: 0 indices (read: `embedding_rows`' sorted) [V + N]; 1 dy (read)
//                        [REPEAT * N, E]; 2 dw (read_write) [V, E]
// f16 variant (`embedding_f16`, generated from the storage block): weight, out, dy and dw f16,
// computed (and the gradient accumulated) in f32; indices stay f32.
// Overrides: N (number of indices), V (rows of the table), E (embedding width), REPEAT (blocks
// of dy, 1 by default).
// Dispatch: `embedding` ceil(N * E / 256) workgroups, one thread per output element;
//           `embedding_backward` (and `embedding_backward_sorted` for E > 128) V * ceil(E / 256)
//           workgroups, workgroup w owns row w / ceil(E / 256), columns
//           (w % ceil(E / 256)) * 256 + thread; `embedding_backward_sorted` for E <= 128:
//           ceil(V / P) workgroups of P = floor(256 / E) rows, thread t row w * P + t / E,
//           column t % E; all folded into (x <= 65535, y); `embedding_rows` one workgroup.

override N: u32 = 1u;
override V: u32 = 1u;
override E: u32 = 1u;
override REPEAT: u32 = 1u;
const WG: u32 = 256u;

// generated: begin storage
@group(0) @binding(0) var<storage, read> indices: array<f32>; // always f32
@group(0) @binding(1) var<storage, read> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
fn ld_weight(i: u32) -> f32 { return weight[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_dy(i: u32) -> f32 { return dy[i]; }
fn st_dw(i: u32, v: f32) { dw[i] = v; }
// generated: end storage
// (never f16: whole numbers, written as u32 atomics so the one workgroup can count with them)
@group(0) @binding(1) var<storage, read_write> sorted: array<atomic<u32>>;

fn linear_id(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

// A quiet NaN made at run time (a constant NaN is a shader-creation error in WGSL).
fn nan() -> f32 {
    var bits = 0x7fc00000u;
    return bitcast<f32>(bits);
}

@compute @workgroup_size(256)
fn embedding(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let id = linear_id(wid, nwg, lid);
    if id >= N * E {
        return;
    }
    let i = id / E;
    let e = id % E;
    let idx = indices[i];
    let valid = idx >= 0.0 && idx < f32(V) && idx == floor(idx);
    let row = min(u32(select(0.0, idx, valid)), V - 1u);
    st_out(id, select(nan(), ld_weight(row * E + e), valid));
}

// The chunk's matches: their count and the matching positions in index order.
var<workgroup> hits: atomic<u32>;
var<workgroup> rows: array<u32, 256>;

// Inclusive prefix sum of `v` over the workgroup's threads (a thread's own and those before
// it) in workgroup memory (the total then in scan[WG - 1]); every thread calls it (barriers).
var<workgroup> scan: array<u32, 256>;
fn inclusive_scan(lid: u32, v: u32) -> u32 {
    scan[lid] = v;
    workgroupBarrier();
    for (var s = 1u; s < WG; s = s * 2u) {
        var add = 0u;
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
fn embedding_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let chunks = (E + WG - 1u) / WG;
    let w = wid.y * nwg.x + wid.x;
    if w >= V * chunks {
        return;
    }
    let v = w / chunks;
    let e = (w % chunks) * WG + lid;
    var acc = 0.0;
    for (var i0 = 0u; i0 < N; i0 = i0 + WG) {
        let i = i0 + lid;
        let hit = i < N && indices[i] == f32(v);
        // the previous chunk's count, ranks and list are no longer read
        workgroupBarrier();
        if lid == 0u {
            atomicStore(&hits, 0u);
        }
        workgroupBarrier();
        if hit {
            atomicAdd(&hits, 1u);
        }
        // most chunks hold no occurrence of a row: skip them together
        let count = workgroupUniformLoad(&hits);
        if count == 0u {
            continue;
        }
        let rank = inclusive_scan(lid, select(0u, 1u, hit));
        if hit {
            rows[rank - 1u] = i;
        }
        workgroupBarrier();
        if e < E {
            for (var c = 0u; c < count; c = c + 1u) {
                for (var b = 0u; b < REPEAT; b = b + 1u) {
                    acc = acc + ld_dy((b * N + rows[c]) * E + e);
                }
            }
        }
    }
    if e < E {
        st_dw(v * E + e, acc);
    }
}

// The row index x names, or NONE where it is not a whole number in [0, V).
const NONE: u32 = 0xffffffffu;
fn row_of(x: f32) -> u32 {
    return select(NONE, u32(x), x >= 0.0 && x < f32(V) && x == floor(x));
}

// The rows of the chunk.
var<workgroup> chunk: array<u32, 256>;

@compute @workgroup_size(256)
fn embedding_rows(@builtin(local_invocation_index) lid: u32) {
    // 1. how often each row occurs
    for (var v = lid; v < V; v = v + WG) {
        atomicStore(&sorted[v], 0u);
    }
    storageBarrier();
    for (var i = lid; i < N; i = i + WG) {
        let r = row_of(indices[i]);
        if r != NONE {
            atomicAdd(&sorted[r], 1u);
        }
    }
    storageBarrier();
    // 2. each row's start in the list (exclusive prefix sum): thread t takes rows
    // [t * span, (t + 1) * span), then the spans' totals are scanned
    let span = (V + WG - 1u) / WG;
    let lo = min(lid * span, V);
    let hi = min(lo + span, V);
    var total = 0u;
    for (var v = lo; v < hi; v = v + 1u) {
        total = total + atomicLoad(&sorted[v]);
    }
    var start = inclusive_scan(lid, total) - total;
    let listed = scan[WG - 1u];
    for (var v = lo; v < hi; v = v + 1u) {
        let count = atomicLoad(&sorted[v]);
        atomicStore(&sorted[v], start);
        start = start + count;
    }
    storageBarrier();
    // 3. the positions, a chunk of 256 at a time: each goes after its row's earlier ones (the
    // row's cursor, then the chunk's earlier occurrences), and the row's first in the chunk
    // moves the cursor past the chunk's
    for (var i0 = 0u; i0 < N; i0 = i0 + WG) {
        let i = i0 + lid;
        var r = NONE;
        if i < N {
            r = row_of(indices[i]);
        }
        chunk[lid] = r;
        workgroupBarrier();
        var before = 0u;
        var same = 0u;
        var cursor = 0u;
        if r != NONE {
            for (var j = 0u; j < WG; j = j + 1u) {
                let hit = chunk[j] == r;
                same = same + select(0u, 1u, hit);
                before = before + select(0u, 1u, hit && j < lid);
            }
            cursor = atomicLoad(&sorted[r]);
        }
        // every cursor of the chunk is read before one moves, and the chunk's rows are read
        // before the next chunk's are written
        storageBarrier();
        workgroupBarrier();
        if r != NONE {
            atomicStore(&sorted[V + cursor + before], bitcast<u32>(f32(i)));
            if before == 0u {
                atomicStore(&sorted[r], cursor + same);
            }
        }
        storageBarrier();
    }
    // 4. the cursors are now the rows' ends; all as f32, and -1 after the list
    for (var v = lid; v < V; v = v + WG) {
        atomicStore(&sorted[v], bitcast<u32>(f32(atomicLoad(&sorted[v]))));
    }
    for (var c = listed + lid; c < N; c = c + WG) {
        atomicStore(&sorted[V + c], bitcast<u32>(-1.0));
    }
}

@compute @workgroup_size(256)
fn embedding_backward_sorted(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.y * nwg.x + wid.x;
    // rows narrower than the workgroup: several rows per workgroup, else ceil(E / 256)
    // workgroups per row
    let per = max(1u, WG / E);
    let chunks = (E + WG - 1u) / WG;
    var v = w / chunks;
    var e = (w % chunks) * WG + lid;
    if per > 1u {
        v = w * per + lid / E;
        e = lid % E;
    }
    if v >= V || e >= E || lid >= per * E {
        return;
    }
    var start = 0u;
    if v > 0u {
        start = u32(indices[v - 1u]);
    }
    let end = u32(indices[v]);
    var acc = 0.0;
    for (var c = start; c < end; c = c + 1u) {
        let i = u32(indices[V + c]);
        for (var b = 0u; b < REPEAT; b = b + 1u) {
            acc = acc + ld_dy((b * N + i) * E + e);
        }
    }
    st_dw(v * E + e, acc);
}
