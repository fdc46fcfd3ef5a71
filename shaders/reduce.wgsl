// reduce.wgsl: sum, mean, max or min over one axis, or the index of the max or min. The input is viewed as [OUTER, LEN, INNER] with the
// reduced axis in the middle; the output is [OUTER, INNER] (ROWS = OUTER * INNER values).
//
// Bindings (group 0):
//   0  a    storage, read        [OUTER, LEN, INNER] input
//   1  out  storage, read_write  [OUTER, INNER] output
// Overrides: LEN, INNER, ROWS; OP: 0 sum, 1 mean, 2 max, 3 min (entries `arg_*`: 2 the index
//            of the maximum, 3 of the minimum, the first on ties, stored as an f32).
// Every input value goes through `load`: src/codegen/elementwise.rs generates variants of this file
// whose `load` computes a fused elementwise program (the blocks between the `generated:` markers
// are replaced), so that e.g. sum(x * x) reads x once and writes nothing in between, and whose
// bindings, `load` and `store` read and write f16 storage for f16 tensors.
// Dispatch, entry `main`: ROWS workgroups of 64 threads, folded by the host into (x <= 65535, y).
//           Workgroup r reduces output r: each thread folds a strided share of the LEN values,
//           then a tree in workgroup memory combines the 64 partial results.
//           Entry `columns` (chosen when INNER is large, e.g. summing a batch axis): ceil(ROWS / 64)
//           workgroups, one thread per output looping over LEN; neighbouring threads read
//           neighbouring addresses. `arg_main` and `arg_columns`: the same geometry, each value
//           carried with its index.

override LEN: u32 = 1u;
override INNER: u32 = 1u;
override ROWS: u32 = 1u;
override OP: u32 = 0u;
const WG: u32 = 64u;

// generated: begin bindings
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
// generated: end bindings

// generated: begin load
fn load(i: u32) -> f32 {
    return a[i];
}
// generated: end load

// generated: begin store
fn store(i: u32, v: f32) {
    out[i] = v;
}
// generated: end store

var<workgroup> part: array<f32, 64>;
var<workgroup> part_index: array<u32, 64>;

fn combine(x: f32, y: f32) -> f32 {
    if OP == 2u {
        return max(x, y);
    }
    if OP == 3u {
        return min(x, y);
    }
    return x + y;
}

// Whether value v at index i beats w at j: larger (OP 2) or smaller (OP 3), the first index on
// ties, as torch.argmax and argmin.
fn beats(v: f32, i: u32, w: f32, j: u32) -> bool {
    if v == w {
        return i < j;
    }
    return select((w > v), (v > w), OP == 2u);
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= ROWS {
        return;
    }
    let base = (row / INNER) * LEN * INNER + row % INNER;
    // max and min start from a real element so that threads without a share hold a neutral value
    var acc = select(0.0, load(base), OP >= 2u);
    for (var j = lid; j < LEN; j = j + WG) {
        acc = combine(acc, load(base + j * INNER));
    }
    part[lid] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part[lid] = combine(part[lid], part[lid + s]);
        }
        workgroupBarrier();
    }
    if lid == 0u {
        var r = part[0];
        if OP == 1u {
            r = r / f32(LEN);
        }
        store(row, r);
    }
}

@compute @workgroup_size(64)
fn columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wid.y * nwg.x + wid.x) * WG + lid;
    if row >= ROWS {
        return;
    }
    let base = (row / INNER) * LEN * INNER + row % INNER;
    var acc = load(base);
    for (var j = 1u; j < LEN; j = j + 1u) {
        acc = combine(acc, load(base + j * INNER));
    }
    if OP == 1u {
        acc = acc / f32(LEN);
    }
    store(row, acc);
}

@compute @workgroup_size(64)
fn arg_main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.y * nwg.x + wid.x;
    if row >= ROWS {
        return;
    }
    let base = (row / INNER) * LEN * INNER + row % INNER;
    // element 0 is every thread's first candidate (threads without a share keep it)
    var best = load(base);
    var at = 0u;
    for (var j = lid; j < LEN; j = j + WG) {
        let v = load(base + j * INNER);
        if beats(v, j, best, at) {
            best = v;
            at = j;
        }
    }
    part[lid] = best;
    part_index[lid] = at;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s && beats(part[lid + s], part_index[lid + s], part[lid], part_index[lid]) {
            part[lid] = part[lid + s];
            part_index[lid] = part_index[lid + s];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        store(row, f32(part_index[0]));
    }
}

@compute @workgroup_size(64)
fn arg_columns(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wid.y * nwg.x + wid.x) * WG + lid;
    if row >= ROWS {
        return;
    }
    let base = (row / INNER) * LEN * INNER + row % INNER;
    var best = load(base);
    var at = 0u;
    for (var j = 1u; j < LEN; j = j + 1u) {
        let v = load(base + j * INNER);
        if beats(v, j, best, at) {
            best = v;
            at = j;
        }
    }
    store(row, f32(at));
}
