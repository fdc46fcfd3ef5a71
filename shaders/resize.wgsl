// resize.wgsl: resizing NCHW images as torch.nn.functional.interpolate(x, size=(HO, WO), mode=..)
// with nearest or bilinear sampling (align_corners either way), and its backward.
//
// Shapes: x, dx [PLANES = N*C, H, W]; y, dy [PLANES, HO, WO].
//         Along each axis (in -> out extents, SCALE its f32 scale as torch computes it from the
//         sizes: in / out, or (in - 1) / (out - 1) with ALIGN), output o reads
//         nearest:  input min(floor(o * SCALE), in - 1);
//         bilinear: src = o * SCALE (ALIGN) or max((o + 0.5) * SCALE - 0.5, 0), i0 = floor(src),
//                   i1 = min(i0 + 1, in - 1), weights 1 - (src - i0) and src - i0; an output is
//                   the weighted sum of its four taps (all four, zero weights too, as torch).
//
// Bindings (group 0), the same for both entry points:
//   0  src  storage, read        resize: x; resize_backward: dy
//   1  out  storage, read_write  resize: y; resize_backward: dx
// Overrides: PLANES, H, W, HO, WO (extents), BILINEAR, ALIGN (mode), SCALE_H, SCALE_W (scales).
// Dispatch: ceil(total / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one output element per thread, threads past total return (total = PLANES*HO*WO for
//           resize, PLANES*H*W for resize_backward). resize_backward is a gather: each input
//           element loops over the outputs whose taps may reach it along each axis (a window
//           a little wider than in / out's reach, each candidate checked with the forward's own
//           index arithmetic) and adds their gradients times its weights; no atomics.

override PLANES: u32 = 1u;
override H: u32 = 1u;
override W: u32 = 1u;
override HO: u32 = 1u;
override WO: u32 = 1u;
override BILINEAR: bool = false;
override ALIGN: bool = false;
override SCALE_H: f32 = 1.0;
override SCALE_W: f32 = 1.0;
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
fn ld_src(i: u32) -> f32 { return src[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
// generated: end storage

// The taps of output coordinate `o` along an axis of `len` inputs: (i0, i1) and their weights.
struct Taps {
    i0: u32,
    i1: u32,
    l0: f32,
    l1: f32,
}

fn taps(o: u32, len: u32, scale: f32) -> Taps {
    if !BILINEAR {
        let i = min(u32(floor(f32(o) * scale)), len - 1u);
        return Taps(i, i, 1.0, 0.0);
    }
    var s = scale * f32(o);
    if !ALIGN {
        s = max(scale * (f32(o) + 0.5) - 0.5, 0.0);
    }
    let i0 = min(u32(s), len - 1u);
    let i1 = select(i0, i0 + 1u, i0 < len - 1u);
    let l1 = s - f32(i0);
    return Taps(i0, i1, 1.0 - l1, l1);
}

// The weight with which output coordinate `o` reads input `i` along an axis (0: not at all; both
// taps add where they coincide).
fn weight(o: u32, i: u32, len: u32, scale: f32) -> f32 {
    let t = taps(o, len, scale);
    if !BILINEAR {
        return select(0.0, 1.0, t.i0 == i);
    }
    return select(0.0, t.l0, t.i0 == i) + select(0.0, t.l1, t.i1 == i);
}

// The outputs along an axis (first, one past the last) whose taps may reach input `i`: the
// outputs sampling within two inputs of it, widened by one on each side.
fn reach(i: u32, len: u32, n_out: u32, scale: f32) -> vec2<u32> {
    if scale <= 0.0 {
        return vec2<u32>(0u, n_out);
    }
    let lo = (f32(i) - 2.0) / scale - 1.0;
    let hi = (f32(i) + 2.0) / scale + 2.0;
    return vec2<u32>(u32(max(lo, 0.0)), u32(min(hi, f32(n_out))));
}

@compute @workgroup_size(256)
fn resize(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= PLANES * HO * WO {
        return;
    }
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let plane = (idx / (WO * HO)) * H * W;
    let r = taps(oh, H, SCALE_H);
    let c = taps(ow, W, SCALE_W);
    if !BILINEAR {
        st_out(idx, ld_src(plane + r.i0 * W + c.i0));
        return;
    }
    // torch's order: rows' weights outside the columns'
    let top = c.l0 * ld_src(plane + r.i0 * W + c.i0) + c.l1 * ld_src(plane + r.i0 * W + c.i1);
    let bottom = c.l0 * ld_src(plane + r.i1 * W + c.i0) + c.l1 * ld_src(plane + r.i1 * W + c.i1);
    st_out(idx, r.l0 * top + r.l1 * bottom);
}

@compute @workgroup_size(256)
fn resize_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= PLANES * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let plane = (idx / (W * H)) * HO * WO;
    let rows = reach(h, H, HO, SCALE_H);
    let cols = reach(w, W, WO, SCALE_W);
    var acc = 0.0;
    for (var oh = rows.x; oh < rows.y; oh = oh + 1u) {
        let lh = weight(oh, h, H, SCALE_H);
        if lh == 0.0 {
            continue;
        }
        for (var ow = cols.x; ow < cols.y; ow = ow + 1u) {
            let lw = weight(ow, w, W, SCALE_W);
            if lw != 0.0 {
                acc = acc + lh * lw * ld_src(plane + oh * WO + ow);
            }
        }
    }
    st_out(idx, acc);
}
