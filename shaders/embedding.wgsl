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
//
// Bindings
// `embedding`:           0 indices (read) [N]; 1 weight (read) [V, E]; 2 out (read_write) [N, E]
// `embedding_backward`:  0 indices (read) [N]; 1 dy (read) [REPEAT * N, E]; 2 dw (read_write)
//                        [V, E]
// f16 variant (`embedding_f16`, generated from the storage block): weight, out, dy and dw f16,
// computed (and the gradient accumulated) in f32; indices stay f32.
// Overrides: N (number of indices), V (rows of the table), E (embedding width), REPEAT (blocks
// of dy, 1 by default).
// Dispatch: `embedding` ceil(N * E / 256) workgroups, one thread per output element;
//           `embedding_backward` V * ceil(E / 256) workgroups, workgroup w owns row w / ceil(E / 256),
//           columns (w % ceil(E / 256)) * 256 + thread; both folded into (x <= 65535, y).

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

// The chunk's matches: their count, then an inclusive prefix sum of the match flags and the
// matching positions in index order.
var<workgroup> hits: atomic<u32>;
var<workgroup> rank: array<u32, 256>;
var<workgroup> rows: array<u32, 256>;

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
        rank[lid] = select(0u, 1u, hit);
        workgroupBarrier();
        for (var s = 1u; s < WG; s = s * 2u) {
            var add = 0u;
            if lid >= s {
                add = rank[lid - s];
            }
            workgroupBarrier();
            rank[lid] = rank[lid] + add;
            workgroupBarrier();
        }
        if hit {
            rows[rank[lid] - 1u] = i;
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
