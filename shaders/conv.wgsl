// conv.wgsl: im2col and col2im for 2-D convolution on NCHW tensors (as torch's unfold and fold).
// conv2d is a graph composition: im2col gathers every receptive field into a column matrix, the
// tiled matmul kernel (matmul.wgsl) multiplies the weight [O, C*KH*KW] with it, and col2im, the
// adjoint of im2col, carries gradients back onto the image.
//
// Shapes: image [N, C, H, W]; cols [C*KH*KW, N*HO*WO], row (c*KH + i)*KW + j, column
//         (n*HO + oh)*WO + ow: the batch sits in the columns, so that conv2d is one large matmul;
//         HO = (H + 2*PH - DH*(KH - 1) - 1) / SH + 1, WO likewise;
//         cols[(c, i, j), (n, oh, ow)] = image[n, c, oh*SH - PH + i*DH, ow*SW - PW + j*DW],
//         zero where that falls in the padding.
//
// Bindings (group 0), the same for both entry points:
//   0  src  storage, read        im2col: the image [N, C, H, W]; col2im: the columns
//   1  out  storage, read_write  im2col: the columns [C*KH*KW, N*HO*WO]; col2im: the image
// Overrides: N, C, H, W (image), KH, KW (kernel), SH, SW (stride), PH, PW (padding),
//            DH, DW (dilation), HO, WO (output extents).
// Dispatch: ceil(total / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one output element per thread, threads past total return (total = N*C*KH*KW*HO*WO
//           for im2col, N*C*H*W for col2im). col2im is a gather: each image element sums, over the
//           KH*KW kernel positions, the column entry (if any) that read it; no atomics.

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
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// generated: begin storage
@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
fn ld_src(i: u32) -> f32 { return src[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
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
