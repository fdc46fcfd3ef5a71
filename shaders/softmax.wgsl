// softmax.wgsl: softmax or log-softmax along one axis, numerically stable (the row maximum is
// subtracted before exp). The input is viewed as [OUTER, LEN, INNER] with the axis in the middle.
//
// Bindings (group 0):
//   0  a    storage, read        [OUTER, LEN, INNER] input
//   1  out  storage, read_write  [OUTER, LEN, INNER] output
// Overrides: LEN, INNER, ROWS = OUTER * INNER; LOG: true for log-softmax.
// Dispatch: ROWS workgroups of 64 threads, folded by the host into (x <= 65535, y). Workgroup r
//           owns one row: a tree reduction for its max, another for the sum of exp(x - max),
//           then every thread writes its strided share of the row.

override LEN: u32 = 1u;
override INNER: u32 = 1u;
override ROWS: u32 = 1u;
override LOG: bool = false;
const WG: u32 = 64u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
fn ld_a(i: u32) -> f32 { return a[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
// generated: end storage

var<workgroup> part: array<f32, 64>;

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

    var m = ld_a(base);
    for (var j = lid; j < LEN; j = j + WG) {
        m = max(m, ld_a(base + j * INNER));
    }
    part[lid] = m;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part[lid] = max(part[lid], part[lid + s]);
        }
        workgroupBarrier();
    }
    let row_max = part[0];
    workgroupBarrier();

    var sum = 0.0;
    for (var j = lid; j < LEN; j = j + WG) {
        sum = sum + exp(ld_a(base + j * INNER) - row_max);
    }
    part[lid] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            part[lid] = part[lid] + part[lid + s];
        }
        workgroupBarrier();
    }
    let total = part[0];

    let log_total = log(total);
    let inv_total = 1.0 / total;
    for (var j = lid; j < LEN; j = j + WG) {
        let x = ld_a(base + j * INNER) - row_max;
        if LOG {
            st_out(base + j * INNER, x - log_total);
        } else {
            st_out(base + j * INNER, exp(x) * inv_total);
        }
    }
}
