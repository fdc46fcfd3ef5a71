// pool.wgsl: max_pool2d and avg_pool2d on NCHW tensors and their backward, as torch in floor or
// ceil mode (the host sizes HO, WO; a ceil-mode last window may reach past the padded input):
// avg divides by the window clipped to the padded input (COUNT_PAD, torch's count_include_pad:
// KH*KW in floor mode) or by the input elements it covers, max skips the padding and takes the
// first maximum in row-major window order; the padding is at most half the kernel and every
// window starts inside the input or its left padding, so every window holds an input element.
//
// Shapes: x, dx [N, C, H, W]; y, dy [N, C, HO, WO], HO = (H + 2*PH - KH) / SH + 1, WO likewise.
//         Window (oh, ow) covers padded rows oh*SH .. oh*SH + KH - 1 (input row = padded row - PH)
//         and padded columns ow*SW .. ow*SW + KW - 1.
//
//         adaptive_avg_pool: y [N, C, HO, WO] from x [N, C, H, W], output (oh, ow) the mean of
//         rows floor(oh*H/HO) .. ceil((oh+1)*H/HO) - 1 and the columns likewise (any extents);
//         adaptive_max_pool: the first maximum of the same windows.
//
// Bindings (group 0). Entry points with one input (max_pool, avg_pool, avg_pool_backward,
// adaptive_avg_pool, adaptive_avg_pool_backward, adaptive_max_pool):
//   0  a    storage, read        forward: x; backward: dy
//   1  out  storage, read_write  forward: y; backward: dx
// max_pool_backward, max_pool_backward_relu, adaptive_max_pool_backward, two inputs:
//   0  a    storage, read        x
//   1  dy   storage, read        [N, C, HO, WO]
//   2  dx   storage, read_write  [N, C, H, W]; max_pool_backward_relu: dx where x > 0, else 0
//                                (a relu's gradient mask: x is its output), stored as
//                                [C, N, H*W] with CN_OUT (a convolution's GEMM layout)
// `out` and `dy` share binding 1: naga validates bindings per entry point and no entry point uses
// both (wgpu keeps only the chosen entry point's globals when it specialises a pipeline).
// Overrides: N, C, H, W (input), HO, WO (output), KH, KW (kernel), SH, SW (stride), PH, PW (padding)
//            (the adaptive entry points take N, C, H, W, HO, WO only);
//            CN_OUT (max_pool_backward_relu's layout); COUNT_PAD (avg's divisor).
// Dispatch: ceil(total / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one output element per thread, threads past total return (total = N*C*HO*WO forward,
//           N*C*H*W backward). The backward entry points are gathers: each input element loops over
//           the windows that cover it (recomputing each window's argmax for max); no atomics.

override N: u32 = 1u;
override C: u32 = 1u;
override H: u32 = 1u;
override W: u32 = 1u;
override HO: u32 = 1u;
override WO: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override CN_OUT: bool = false;
override COUNT_PAD: bool = true;
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
fn ld_a(i: u32) -> f32 { return a[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_dy(i: u32) -> f32 { return dy[i]; }
fn st_dx(i: u32, v: f32) { dx[i] = v; }
// generated: end storage

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

// Position within its [H, W] plane (which starts at `plane` in `a`) of the first maximum of
// rows h0..h1 - 1 and columns w0..w1 - 1 (at least one of each), in row-major order.
fn first_max(plane: u32, h0: u32, h1: u32, w0: u32, w1: u32) -> u32 {
    var best = 0.0;
    var at = 0u;
    var found = false;
    for (var h = h0; h < h1; h = h + 1u) {
        for (var w = w0; w < w1; w = w + 1u) {
            let v = ld_a(plane + h * W + w);
            if !found || v > best {
                best = v;
                at = h * W + w;
                found = true;
            }
        }
    }
    return at;
}

// The first maximum of window (oh, ow): its rows and columns inside the input (the padding
// skipped; every window starts inside the input or its left padding, so it holds some).
fn window_argmax(plane: u32, oh: u32, ow: u32) -> u32 {
    let hs = oh * SH;
    let ws = ow * SW;
    let h0 = max(hs, PH) - PH;
    let w0 = max(ws, PW) - PW;
    return first_max(plane, h0, min(hs + KH, PH + H) - PH, w0, min(ws + KW, PW + W) - PW);
}

// Sum of `a` over window (oh, ow) of the plane starting at `plane`, padding skipped (it adds 0).
fn window_sum(plane: u32, oh: u32, ow: u32) -> f32 {
    var s = 0.0;
    for (var i = 0u; i < KH; i = i + 1u) {
        let hp = oh * SH + i;
        if hp < PH || hp - PH >= H {
            continue;
        }
        for (var j = 0u; j < KW; j = j + 1u) {
            let wp = ow * SW + j;
            if wp < PW || wp - PW >= W {
                continue;
            }
            s = s + ld_a(plane + (hp - PH) * W + (wp - PW));
        }
    }
    return s;
}

// The divisor of average window (oh, ow), as torch's: with COUNT_PAD the window clipped to the
// padded input (KH * KW in floor mode), else the input elements it covers (at least one).
fn avg_divisor(oh: u32, ow: u32) -> f32 {
    let h0 = oh * SH;
    let w0 = ow * SW;
    if COUNT_PAD {
        return f32((min(h0 + KH, H + 2u * PH) - h0) * (min(w0 + KW, W + 2u * PW) - w0));
    }
    return f32((min(h0 + KH, PH + H) - max(h0, PH)) * (min(w0 + KW, PW + W) - max(w0, PW)));
}

// The windows covering padded coordinate `p` along an axis: first and one past the last.
fn covering(p: u32, k: u32, s: u32, n_out: u32) -> vec2<u32> {
    var lo = 0u;
    if p + 1u > k {
        lo = (p + 1u - k + s - 1u) / s;
    }
    let hi = min(p / s + 1u, n_out);
    return vec2<u32>(lo, hi);
}

@compute @workgroup_size(256)
fn max_pool(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * HO * WO {
        return;
    }
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let plane = (idx / (WO * HO)) * H * W;
    st_out(idx, ld_a(plane + window_argmax(plane, oh, ow)));
}

@compute @workgroup_size(256)
fn avg_pool(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * HO * WO {
        return;
    }
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let plane = (idx / (WO * HO)) * H * W;
    st_out(idx, window_sum(plane, oh, ow) / avg_divisor(oh, ow));
}

@compute @workgroup_size(256)
fn max_pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    st_dx(idx, max_gradient(idx / (W * H), h, w));
}

// dx of element (h, w) of plane nc: the dy of every window whose argmax it is.
fn max_gradient(nc: u32, h: u32, w: u32) -> f32 {
    let plane = nc * H * W;
    let here = h * W + w;
    let rows = covering(h + PH, KH, SH, HO);
    let cols = covering(w + PW, KW, SW, WO);
    var acc = 0.0;
    for (var oh = rows.x; oh < rows.y; oh = oh + 1u) {
        for (var ow = cols.x; ow < cols.y; ow = ow + 1u) {
            if window_argmax(plane, oh, ow) == here {
                acc = acc + ld_dy((nc * HO + oh) * WO + ow);
            }
        }
    }
    return acc;
}

@compute @workgroup_size(256)
fn max_pool_backward_relu(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * H * W {
        return;
    }
    let hw = idx % (H * W);
    let nc = idx / (W * H);
    let g = select(0.0, max_gradient(nc, hw / W, hw % W), ld_a(idx) > 0.0);
    // (n, c, hw) at (c, n, hw) with CN_OUT
    let cn = ((nc % C) * N + nc / C) * H * W + hw;
    st_dx(select(idx, cn, CN_OUT), g);
}

@compute @workgroup_size(256)
fn avg_pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let nc = idx / (W * H);
    let rows = covering(h + PH, KH, SH, HO);
    let cols = covering(w + PW, KW, SW, WO);
    var acc = 0.0;
    for (var oh = rows.x; oh < rows.y; oh = oh + 1u) {
        for (var ow = cols.x; ow < cols.y; ow = ow + 1u) {
            acc = acc + ld_a((nc * HO + oh) * WO + ow) / avg_divisor(oh, ow);
        }
    }
    st_out(idx, acc);
}

// Adaptive average pooling: output (oh, ow) averages input rows floor(oh*H/HO) ..
// ceil((oh+1)*H/HO) - 1 and the columns likewise (src/ops/pool.rs, AdaptiveAvgPool2d).
fn adaptive_start(o: u32, len: u32, n_out: u32) -> u32 {
    return o * len / n_out;
}

fn adaptive_end(o: u32, len: u32, n_out: u32) -> u32 {
    return ((o + 1u) * len + n_out - 1u) / n_out;
}

@compute @workgroup_size(256)
fn adaptive_avg_pool(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * HO * WO {
        return;
    }
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let plane = (idx / (WO * HO)) * H * W;
    let h0 = adaptive_start(oh, H, HO);
    let h1 = adaptive_end(oh, H, HO);
    let w0 = adaptive_start(ow, W, WO);
    let w1 = adaptive_end(ow, W, WO);
    var s = 0.0;
    for (var h = h0; h < h1; h = h + 1u) {
        for (var w = w0; w < w1; w = w + 1u) {
            s = s + ld_a(plane + h * W + w);
        }
    }
    st_out(idx, s / f32((h1 - h0) * (w1 - w0)));
}

// Adaptive max pooling: output (oh, ow) the first maximum of its window, in row-major order.
fn adaptive_argmax(plane: u32, oh: u32, ow: u32) -> u32 {
    let h0 = adaptive_start(oh, H, HO);
    let w0 = adaptive_start(ow, W, WO);
    return first_max(plane, h0, adaptive_end(oh, H, HO), w0, adaptive_end(ow, W, WO));
}

@compute @workgroup_size(256)
fn adaptive_max_pool(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * HO * WO {
        return;
    }
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let plane = (idx / (WO * HO)) * H * W;
    st_out(idx, ld_a(plane + adaptive_argmax(plane, oh, ow)));
}

// Its adjoint (inputs x and dy): input (h, w) gathers the dy of every window that holds it
// and whose first maximum it is.
@compute @workgroup_size(256)
fn adaptive_max_pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let nc = idx / (W * H);
    let here = h * W + w;
    var acc = 0.0;
    for (var oh = h * HO / H; oh < ((h + 1u) * HO + H - 1u) / H; oh = oh + 1u) {
        for (var ow = w * WO / W; ow < ((w + 1u) * WO + W - 1u) / W; ow = ow + 1u) {
            if adaptive_argmax(nc * H * W, oh, ow) == here {
                acc = acc + ld_dy((nc * HO + oh) * WO + ow);
            }
        }
    }
    st_dx(idx, acc);
}

// The adjoint: input (h, w) gathers dy / area from outputs oh in [floor(h*HO/H),
// ceil((h+1)*HO/H)) (the windows that hold it) and the columns likewise.
@compute @workgroup_size(256)
fn adaptive_avg_pool_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = linear_index(wid, nwg, lid);
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let plane = (idx / (W * H)) * HO * WO;
    var acc = 0.0;
    for (var oh = h * HO / H; oh < ((h + 1u) * HO + H - 1u) / H; oh = oh + 1u) {
        let rows = adaptive_end(oh, H, HO) - adaptive_start(oh, H, HO);
        for (var ow = w * WO / W; ow < ((w + 1u) * WO + W - 1u) / W; ow = ow + 1u) {
            let cols = adaptive_end(ow, W, WO) - adaptive_start(ow, W, WO);
            acc = acc + ld_a(plane + oh * WO + ow) / f32(rows * cols);
        }
    }
    st_out(idx, acc);
}
