// conv.wgsl: im2col and col2im for 2-D convolution on NCHW tensors (as torch's unfold and fold),
// and the direct kernels of convolutions in groups.
// conv2d is a graph composition: im2col gathers every receptive field into a column matrix, the
// tiled matmul kernel (matmul.wgsl) multiplies the weight [O, C*KH*KW] with it, and col2im, the
// adjoint of im2col, carries gradients back onto the image. A convolution in G groups (depthwise:
// G = C) runs grouped_conv, and its gradients grouped_conv_input_grad and grouped_conv_weight_grad.
//
// Shapes: image [N, C, H, W]; cols [C*KH*KW, N*HO*WO], row (c*KH + i)*KW + j, column
//         (n*HO + oh)*WO + ow: the batch sits in the columns, so that conv2d is one large matmul;
//         HO = (H + 2*PH - DH*(KH - 1) - 1) / SH + 1, WO likewise;
//         cols[(c, i, j), (n, oh, ow)] = image[n, c, oh*SH - PH + i*DH, ow*SW - PW + j*DW],
//         zero where that falls in the padding.
//
//         Grouped: x [N, C, H, W], w [O, C/G, KH, KW], y [N, O, HO, WO]; output channel o belongs
//         to group g = o / (O/G), which reads input channels g*(C/G) .. (g+1)*(C/G) - 1:
//         y[n, o, oh, ow] = sum over c < C/G, i, j of
//                           x[n, g*(C/G) + c, oh*SH - PH + i*DH, ow*SW - PW + j*DW] * w[o, c, i, j].
//
// Bindings (group 0). im2col and col2im:
//   0  src   storage, read        im2col: the image [N, C, H, W]; col2im: the columns
//   1  out   storage, read_write  im2col: the columns [C*KH*KW, N*HO*WO]; col2im: the image
// grouped_conv (x, w -> y), grouped_conv_input_grad (dy, w -> dx), grouped_conv_weight_grad
// (x, dy -> dw):
//   0  src   storage, read        x; dy; x
//   1  opnd  storage, read        w; w; dy
//   2  res   storage, read_write  y; dx; dw
// grouped_conv_bias (x, w, bias -> y): 0 src x, 1 opnd w, 2 bias [O] (read), 3 biased y.
// `out` and `opnd` share binding 1, `res` and `bias` binding 2: naga validates bindings per
// entry point and no entry point uses both.
// Overrides: N, C, H, W (image), KH, KW (kernel), SH, SW (stride), PH, PW (padding),
//            DH, DW (dilation), HO, WO (output extents); G (groups), O (output channels), RELU
//            (the forward entry points' activation).
// Dispatch: ceil(total / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one output element per thread, threads past total return (total = N*C*KH*KW*HO*WO
//           for im2col, N*C*H*W for col2im and grouped_conv_input_grad, N*O*HO*WO for
//           grouped_conv). col2im and grouped_conv_input_grad are gathers: each image element
//           sums, over the KH*KW kernel positions, the entries (if any) that read it; no atomics.
//           grouped_conv_weight_grad: one workgroup of 256 per block of TAPS = 4 weight taps of
//           one kernel row (O*(C/G)*KH*ceil(KW/4), folded likewise), its threads striding over
//           the N*HO*WO output positions (each output gradient read once for the block), then
//           a tree sum per tap in workgroup memory.

override N: u32 = 1u;
override C: u32 = 1u;
override H: u32 = 1u;
override W: u32 = 1u;
override KH: u32 = 1u;
override KW: u32 = 1u;
override SH: u32 = 1u;
override SW: u32 = 1u;
override PH: u32 = 0u;
override PW: u32 = 0u;
override DH: u32 = 1u;
override DW: u32 = 1u;
override HO: u32 = 1u;
override WO: u32 = 1u;
override G: u32 = 1u;
override O: u32 = 1u;
override RELU: bool = false;
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> opnd: array<f32>;
@group(0) @binding(2) var<storage, read_write> res: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> biased: array<f32>;
fn ld_src(i: u32) -> f32 { return src[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_opnd(i: u32) -> f32 { return opnd[i]; }
fn st_res(i: u32, v: f32) { res[i] = v; }
fn ld_bias(i: u32) -> f32 { return bias[i]; }
fn st_biased(i: u32, v: f32) { biased[i] = v; }
// generated: end storage

@compute @workgroup_size(256)
fn im2col(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    let l_len = HO * WO;
    let rows = C * KH * KW;
    if idx >= N * rows * l_len {
        return;
    }
    let l = idx % l_len;
    let n = (idx / l_len) % N;
    let row = idx / (l_len * N);
    let c = row / (KH * KW);
    let i = (row / KW) % KH;
    let j = row % KW;
    // coordinates in the padded image
    let hp = (l / WO) * SH + i * DH;
    let wp = (l % WO) * SW + j * DW;
    var v = 0.0;
    if hp >= PH && hp - PH < H && wp >= PW && wp - PW < W {
        v = ld_src(((n * C + c) * H + (hp - PH)) * W + (wp - PW));
    }
    st_out(idx, v);
}

@compute @workgroup_size(256)
fn col2im(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let nc = idx / (W * H);
    let c = nc % C;
    let n = nc / C;
    let l_len = HO * WO;
    var acc = 0.0;
    for (var i = 0u; i < KH; i = i + 1u) {
        // output row oh reads this image row through kernel row i when oh*SH = h + PH - i*DH
        let hp = h + PH;
        if hp < i * DH {
            break;
        }
        let th = hp - i * DH;
        if th % SH != 0u || th / SH >= HO {
            continue;
        }
        let oh = th / SH;
        for (var j = 0u; j < KW; j = j + 1u) {
            let wp = w + PW;
            if wp < j * DW {
                break;
            }
            let tw = wp - j * DW;
            if tw % SW != 0u || tw / SW >= WO {
                continue;
            }
            let row = (c * KH + i) * KW + j;
            acc = acc + ld_src((row * N + n) * l_len + oh * WO + tw / SW);
        }
    }
    st_out(idx, acc);
}

// The image row (or column) that kernel tap `k` of output position `o` reads along one axis, as
// padded coordinate + 1 (0: the tap falls in the padding). Stride s, padding p, dilation d, extent n.
fn tap_source(o: u32, k: u32, s: u32, p: u32, d: u32, n: u32) -> u32 {
    let q = o * s + k * d;
    if q < p || q - p >= n {
        return 0u;
    }
    return q - p + 1u;
}

// The output position (+ 1; 0: none) that reads image coordinate `x` through tap `k` along one axis.
fn tap_target(x: u32, k: u32, s: u32, p: u32, d: u32, n_out: u32) -> u32 {
    let q = x + p;
    if q < k * d {
        return 0u;
    }
    let t = q - k * d;
    if t % s != 0u || t / s >= n_out {
        return 0u;
    }
    return t / s + 1u;
}

// Output element idx of a grouped convolution, before its bias and relu.
fn grouped_conv_at(idx: u32) -> f32 {
    let ow = idx % WO;
    let oh = (idx / WO) % HO;
    let o = (idx / (WO * HO)) % O;
    let n = idx / (WO * HO * O);
    let cg = C / G;
    let first = (o / (O / G)) * cg;
    var acc = 0.0;
    for (var c = 0u; c < cg; c = c + 1u) {
        let plane = (n * C + first + c) * H;
        for (var i = 0u; i < KH; i = i + 1u) {
            let ih = tap_source(oh, i, SH, PH, DH, H);
            if ih == 0u {
                continue;
            }
            for (var j = 0u; j < KW; j = j + 1u) {
                let iw = tap_source(ow, j, SW, PW, DW, W);
                if iw == 0u {
                    continue;
                }
                let wv = ld_opnd(((o * cg + c) * KH + i) * KW + j);
                acc = acc + ld_src((plane + ih - 1u) * W + iw - 1u) * wv;
            }
        }
    }
    return acc;
}

@compute @workgroup_size(256)
fn grouped_conv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= N * O * HO * WO {
        return;
    }
    let y = grouped_conv_at(idx);
    st_res(idx, select(y, max(y, 0.0), RELU));
}

// With the bias of each output channel (binding 2), then relu where RELU: a layer's bias and
// activation in its convolution's kernel.
@compute @workgroup_size(256)
fn grouped_conv_bias(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= N * O * HO * WO {
        return;
    }
    let y = grouped_conv_at(idx) + ld_bias((idx / (WO * HO)) % O);
    st_biased(idx, select(y, max(y, 0.0), RELU));
}

@compute @workgroup_size(256)
fn grouped_conv_input_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.y * nwg.x + wid.x) * WG + lid;
    if idx >= N * C * H * W {
        return;
    }
    let w = idx % W;
    let h = (idx / W) % H;
    let ch = (idx / (W * H)) % C;
    let n = idx / (W * H * C);
    let cg = C / G;
    let og = O / G;
    let c = ch % cg;
    let first = (ch / cg) * og;
    var acc = 0.0;
    for (var i = 0u; i < KH; i = i + 1u) {
        let oh = tap_target(h, i, SH, PH, DH, HO);
        if oh == 0u {
            continue;
        }
        for (var j = 0u; j < KW; j = j + 1u) {
            let ow = tap_target(w, j, SW, PW, DW, WO);
            if ow == 0u {
                continue;
            }
            for (var f = 0u; f < og; f = f + 1u) {
                let o = first + f;
                let dy = ld_src(((n * O + o) * HO + oh - 1u) * WO + ow - 1u);
                acc = acc + dy * ld_opnd(((o * cg + c) * KH + i) * KW + j);
            }
        }
    }
    st_res(idx, acc);
}

// Taps of one kernel row a weight-gradient workgroup sums at once: each output gradient is read
// once for all of them, and their sums are four variables (constant indices, no local array).
const TAPS: u32 = 4u;

var<workgroup> partial_sums: array<f32, 1024>;

// x * dy where kernel tap (i, j) of output (n, oh, ow) reads the image (0 in the padding or past
// the kernel's width); `row` is the tap's image row + 1 (0: in the padding).
fn tap_product(n: u32, ch: u32, row: u32, ow: u32, j: u32, dy: f32) -> f32 {
    if j >= KW {
        return 0.0;
    }
    let iw = tap_source(ow, j, SW, PW, DW, W);
    if iw == 0u {
        return 0.0;
    }
    return ld_src(((n * C + ch) * H + row - 1u) * W + iw - 1u) * dy;
}

@compute @workgroup_size(256)
fn grouped_conv_weight_grad(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // one block of TAPS taps of one kernel row per workgroup: uniform across its threads
    let blocks = (KW + TAPS - 1u) / TAPS;
    let e = wid.y * nwg.x + wid.x;
    let cg = C / G;
    if e >= O * cg * KH * blocks {
        return;
    }
    let j0 = (e % blocks) * TAPS;
    let i = (e / blocks) % KH;
    let c = (e / (blocks * KH)) % cg;
    let o = e / (blocks * KH * cg);
    let ch = (o / (O / G)) * cg + c;
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    for (var t = lid; t < N * HO * WO; t = t + WG) {
        let ow = t % WO;
        let oh = (t / WO) % HO;
        let n = t / (WO * HO);
        let row = tap_source(oh, i, SH, PH, DH, H);
        if row == 0u {
            continue;
        }
        let dy = ld_opnd(((n * O + o) * HO + oh) * WO + ow);
        acc0 = acc0 + tap_product(n, ch, row, ow, j0, dy);
        acc1 = acc1 + tap_product(n, ch, row, ow, j0 + 1u, dy);
        acc2 = acc2 + tap_product(n, ch, row, ow, j0 + 2u, dy);
        acc3 = acc3 + tap_product(n, ch, row, ow, j0 + 3u, dy);
    }
    partial_sums[lid] = acc0;
    partial_sums[WG + lid] = acc1;
    partial_sums[2u * WG + lid] = acc2;
    partial_sums[3u * WG + lid] = acc3;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            for (var k = 0u; k < TAPS; k = k + 1u) {
                partial_sums[k * WG + lid] = partial_sums[k * WG + lid] + partial_sums[k * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    // the block's taps past the kernel's width have no weight
    if lid < TAPS && j0 + lid < KW {
        st_res(((o * cg + c) * KH + i) * KW + j0 + lid, partial_sums[lid * WG]);
    }
}
