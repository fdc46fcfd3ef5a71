// dropout.wgsl: inverted dropout with a counter-based mask, out[i] = keep(i) ? x[i] / (1 - p) : 0.
// The mask is a pure function of (seed, SALT, i), so the backward pass applies the same kernel to
// the gradient with the same seed and gets the same mask without storing it.
//
// Bindings (group 0):
//   0  x     storage, read        [N]
//   1  seed  storage, read        [1] a whole number (fed every step), read as u32
//   2  out   storage, read_write  [N]
// Overrides: N; THRESHOLD = p * 2^32 (an element is dropped when its hash is below it);
//            SCALE = 1 / (1 - p); SALT tells the dropout layers of one graph apart.
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded into (x <= 65535, y); one element
//           per thread.

override N: u32 = 1u;
override THRESHOLD: u32 = 0u;
override SCALE: f32 = 1.0;
override SALT: u32 = 0u;
const WG: u32 = 256u;

// Every global read and write goes through ld_*/st_*: src/codegen/storage.rs generates the f16
// variant of this file (f16 tensors) by rewriting the block between the `generated:` markers.
// The seed stays f32 (a whole number up to 2^24).
// generated: begin storage
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> seed: array<f32>; // always f32
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
fn ld_x(i: u32) -> f32 { return x[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
// generated: end storage

// The op as fused elementwise kernels call it too (src/codegen/elementwise.rs copies this block).
// shared: begin dropout_op
// lowbias32 (Chris Wellons): a fast integer hash with good avalanche.
fn dropout_hash(v: u32) -> u32 {
    var h = v;
    h = h ^ (h >> 16u);
    h = h * 0x7feb352du;
    h = h ^ (h >> 15u);
    h = h * 0x846ca68bu;
    h = h ^ (h >> 16u);
    return h;
}
// Element i of a tensor under inverted dropout: 0 where the hash of i keyed by the seed and the
// salt is below `threshold`, else x * scale.
fn dropout_op(x: f32, seed: f32, i: u32, threshold: u32, scale: f32, salt: u32) -> f32 {
    let key = dropout_hash(u32(seed) ^ dropout_hash(salt));
    return select(0.0, x * scale, dropout_hash(i ^ key) >= threshold);
}
// shared: end dropout_op

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if i >= N {
        return;
    }
    st_out(i, dropout_op(ld_x(i), seed[0], i, THRESHOLD, SCALE, SALT));
}
