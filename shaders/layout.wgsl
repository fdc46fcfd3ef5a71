// layout.wgsl: permute (transpose) and expand (broadcast_to) as one strided gather,
// out[i] = a[offset(coords(i))]; expand uses stride 0 on the broadcast axes.
// Reshape needs no kernel: it shares its input's buffer.
//
// Bindings (group 0):
//   0  a    storage, read        input, read through strides S0..S5
//   1  out  storage, read_write  [D0, .., D5] output, contiguous
// Overrides: N = D0 * .. * D5; D1..D5 the output shape left-padded with 1 to rank 6;
//            S0..S5 the input's element stride along each output axis (permuted, or 0 to broadcast).
//
// write_rows (WriteRows, a cache written in place, e.g. attention's keys and values while
// decoding): value a [OUTER, ROWS, WIDTH] (N elements) into cache out2 [OUTER, CACHE_ROWS,
// WIDTH] at rows position[0] .. position[0] + ROWS of each outer slice (position a whole number,
// binding 1, always f32); rows past CACHE_ROWS are dropped. One thread per value element.
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one element per thread; threads past N return.

override N: u32 = 1u;
override D1: u32 = 1u;
override D2: u32 = 1u;
override D3: u32 = 1u;
override D4: u32 = 1u;
override D5: u32 = 1u;
override S0: u32 = 0u;
override S1: u32 = 0u;
override S2: u32 = 0u;
override S3: u32 = 0u;
override S4: u32 = 0u;
override S5: u32 = 0u;
override ROWS: u32 = 1u;
override CACHE_ROWS: u32 = 1u;
override WIDTH: u32 = 1u;
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// Entries `gather` and `axis_copy1` bind a and out; `axis_copy2` a, b and out2; `write_rows` a,
// position and out2.
// generated: begin storage
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out2: array<f32>;
@group(0) @binding(1) var<storage, read> position: array<f32>; // always f32
fn ld_a(i: u32) -> f32 { return a[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_b(i: u32) -> f32 { return b[i]; }
fn st_out2(i: u32, v: f32) { out2[i] = v; }
// generated: end storage

@compute @workgroup_size(256)
fn gather(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    var r = i;
    let c5 = r % D5; r = r / D5;
    let c4 = r % D4; r = r / D4;
    let c3 = r % D3; r = r / D3;
    let c2 = r % D2; r = r / D2;
    let c1 = r % D1; r = r / D1;
    let c0 = r;
    st_out(i, ld_a(c0 * S0 + c1 * S1 + c2 * S2 + c3 * S3 + c4 * S4 + c5 * S5));
}

// ---- axis_copy: narrow, pad and concat along one axis ----
// The output is viewed as [OUTER, AX_OUT, INNER]; output position c along the axis reads input a at
// c - A_START when that lies in [0, AX_A), else input b at c - B_START when in [0, AX_B), else 0.
// narrow: A_START = -start; pad: A_START = before; concat: A_START = 0, B_START = AX_A.
// Bindings, entry `axis_copy1`: 0 a (read), 1 out (read_write; shared binding number with `b`,
// which that entry does not use). Entry `axis_copy2`: 0 a, 1 b (read), 2 out2 (read_write).
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded into (x <= 65535, y).

override INNER: u32 = 1u;
override AX_OUT: u32 = 1u;
override AX_A: u32 = 1u;
override AX_B: u32 = 1u;
override A_START: i32 = 0;
override B_START: i32 = 0;

struct AxisPos {
    outer: u32,
    c: i32,
    inner: u32,
}

fn axis_pos(i: u32) -> AxisPos {
    return AxisPos(i / (INNER * AX_OUT), i32((i / INNER) % AX_OUT), i % INNER);
}

fn from_a(p: AxisPos) -> f32 {
    let ca = p.c - A_START;
    if ca >= 0 && ca < i32(AX_A) {
        return ld_a((p.outer * AX_A + u32(ca)) * INNER + p.inner);
    }
    return 0.0;
}

@compute @workgroup_size(256)
fn axis_copy1(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    st_out(i, from_a(axis_pos(i)));
}

@compute @workgroup_size(256)
fn axis_copy2(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    let p = axis_pos(i);
    let cb = p.c - B_START;
    if cb >= 0 && cb < i32(AX_B) {
        st_out2(i, ld_b((p.outer * AX_B + u32(cb)) * INNER + p.inner));
    } else {
        st_out2(i, from_a(p));
    }
}

@compute @workgroup_size(256)
fn write_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    let c = i % WIDTH;
    let rest = i / WIDTH;
    let row = u32(position[0]) + rest % ROWS;
    if row < CACHE_ROWS {
        st_out2(((rest / ROWS) * CACHE_ROWS + row) * WIDTH + c, ld_a(i));
    }
}
