// matmul.wgsl: batched matrix product out[z] = op(a[z]) x op(b[z]), op = identity or transpose.
//
// Epilogue: out = relu?(op(a) x op(b) + bias?), the bias per row [M] or per column [N] and
// broadcast over the batch, so a Linear or Conv layer with its activation is one kernel.
//
// Bindings (group 0), entry `main`:
//   0  a    storage, read        [batch.., M, K] (TA: [batch.., K, M])
//   1  b    storage, read        [batch.., K, N] (TB: [batch.., N, K])
//   2  out  storage, read_write  [batch.., M, N], contiguous
// Entry `main_bias`: 0 a, 1 b, 2 bias (read) [M] (BIAS_ROWS) or [N], 3 out_b (read_write).
// Entry `splitk_sum`: 0 a = partial sums (read) [SUM_SLICES, batch.., M, N], 1 sum_out
//   (read_write) [batch.., M, N]; `splitk_sum_bias`: 0 partials, 1 b = bias, 2 out. They add up
//   the slices of a split-K product (codegen/matmul.rs) and apply the epilogue; SUM_LEN =
//   batch * M * N; one thread per output element, ceil(SUM_LEN / 256) workgroups (folded).
// Overrides: M, N, K; TA, TB transpose flags; the output batch shape left-padded to rank 4 as
//            BD0..BD3 (BD0 implicit); SA0..SA3 / SB0..SB3 element strides of a's and b's
//            matrices per batch axis (0 where that operand broadcasts);
//            TILES_M = ceil(M / 64), TILES_N = ceil(N / 64), TOTAL = TILES_M * TILES_N * batch;
//            RELU applies max(x, 0) to the result; BIAS_ROWS puts the bias along M (else N).
// Dispatch: TOTAL workgroups of 256 threads (16 x 16), folded by the host into (x <= 65535, y).
//           Workgroup w computes the 64x64 output tile (w / TILES_N % TILES_M, w % TILES_N) of
//           batch w / (TILES_M * TILES_N); each thread a 4x4 block held in four vec4 registers.
//           K advances in steps of 16 through two 16x64 workgroup tiles.

override M: u32 = 1u;
override N: u32 = 1u;
override K: u32 = 1u;
override TA: bool = false;
override TB: bool = false;
override TILES_M: u32 = 1u;
override TILES_N: u32 = 1u;
override TOTAL: u32 = 1u;
override BD1: u32 = 1u;
override BD2: u32 = 1u;
override BD3: u32 = 1u;
override SA0: u32 = 0u;
override SA1: u32 = 0u;
override SA2: u32 = 0u;
override SA3: u32 = 0u;
override SB0: u32 = 0u;
override SB1: u32 = 0u;
override SB2: u32 = 0u;
override SB3: u32 = 0u;
override RELU: bool = false;
override BIAS_ROWS: bool = false;
override SUM_SLICES: u32 = 1u;
override SUM_LEN: u32 = 1u;

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> out_b: array<f32>;
@group(0) @binding(1) var<storage, read_write> sum_out: array<f32>;

// As[kk * TM + mm] = op(a)[row0 + mm, k0 + kk]; Bs[kk * TN + nn] = op(b)[k0 + kk, col0 + nn]
var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;

// The 4x4 block of results one thread holds: rows r0..r0+3, columns c0..c0+3 of batch obase.
struct Block {
    acc0: vec4<f32>,
    acc1: vec4<f32>,
    acc2: vec4<f32>,
    acc3: vec4<f32>,
    obase: u32,
    r0: u32,
    c0: u32,
}

fn activate(v: vec4<f32>) -> vec4<f32> {
    return select(v, max(v, vec4<f32>(0.0)), RELU);
}

fn store4(obase: u32, r: u32, c: u32, v: vec4<f32>) {
    if r >= M {
        return;
    }
    let o = obase + r * N + c;
    let y = activate(v);
    if c < N { out[o] = y.x; }
    if c + 1u < N { out[o + 1u] = y.y; }
    if c + 2u < N { out[o + 2u] = y.z; }
    if c + 3u < N { out[o + 3u] = y.w; }
}

fn store4_bias(obase: u32, r: u32, c: u32, v: vec4<f32>) {
    if r >= M {
        return;
    }
    var bv: vec4<f32>;
    if BIAS_ROWS {
        bv = vec4<f32>(bias[r]);
    } else {
        // clamped in range; the values past N are never stored
        bv = vec4<f32>(bias[min(c, N - 1u)], bias[min(c + 1u, N - 1u)], bias[min(c + 2u, N - 1u)], bias[min(c + 3u, N - 1u)]);
    }
    let o = obase + r * N + c;
    let y = activate(v + bv);
    if c < N { out_b[o] = y.x; }
    if c + 1u < N { out_b[o + 1u] = y.y; }
    if c + 2u < N { out_b[o + 2u] = y.z; }
    if c + 3u < N { out_b[o + 3u] = y.w; }
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.y * nwg.x + wid.x;
    if w >= TOTAL {
        return;
    }
    let t = block(w, lid);
    store4(t.obase, t.r0, t.c0, t.acc0);
    store4(t.obase, t.r0 + 1u, t.c0, t.acc1);
    store4(t.obase, t.r0 + 2u, t.c0, t.acc2);
    store4(t.obase, t.r0 + 3u, t.c0, t.acc3);
}

@compute @workgroup_size(256)
fn main_bias(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wid.y * nwg.x + wid.x;
    if w >= TOTAL {
        return;
    }
    let t = block(w, lid);
    store4_bias(t.obase, t.r0, t.c0, t.acc0);
    store4_bias(t.obase, t.r0 + 1u, t.c0, t.acc1);
    store4_bias(t.obase, t.r0 + 2u, t.c0, t.acc2);
    store4_bias(t.obase, t.r0 + 3u, t.c0, t.acc3);
}

// The tiled product for workgroup w (uniform across the workgroup: it holds barriers).
fn block(w: u32, lid: u32) -> Block {
    let tn = w % TILES_N;
    let tm = (w / TILES_N) % TILES_M;
    let z = w / (TILES_N * TILES_M);
    var r = z;
    let b3 = r % BD3; r = r / BD3;
    let b2 = r % BD2; r = r / BD2;
    let b1 = r % BD1;
    let b0 = r / BD1;
    let abase = b0 * SA0 + b1 * SA1 + b2 * SA2 + b3 * SA3;
    let bbase = b0 * SB0 + b1 * SB1 + b2 * SB2 + b3 * SB3;
    let obase = z * M * N;
    let row0 = tm * TM;
    let col0 = tn * TN;
    let tx = lid % 16u;
    let ty = lid / 16u;

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    let ntiles = (K + TK - 1u) / TK;
    for (var t = 0u; t < ntiles; t = t + 1u) {
        let k0 = t * TK;
        // Load both tiles, 4 elements per thread, with consecutive threads on consecutive
        // addresses of the operand's memory layout.
        for (var j = 0u; j < 4u; j = j + 1u) {
            let e = lid + j * 256u;
            var mm: u32;
            var kk: u32;
            if TA { kk = e / TM; mm = e % TM; } else { mm = e / TK; kk = e % TK; }
            let m = row0 + mm;
            let k = k0 + kk;
            var v = 0.0;
            if m < M && k < K {
                if TA { v = a[abase + k * M + m]; } else { v = a[abase + m * K + k]; }
            }
            As[kk * TM + mm] = v;

            var nn: u32;
            var kb: u32;
            if TB { nn = e / TK; kb = e % TK; } else { kb = e / TN; nn = e % TN; }
            let n = col0 + nn;
            let kg = k0 + kb;
            var u = 0.0;
            if n < N && kg < K {
                if TB { u = b[bbase + n * K + kg]; } else { u = b[bbase + kg * N + n]; }
            }
            Bs[kb * TN + nn] = u;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let ai = kk * TM + ty * 4u;
            let bi = kk * TN + tx * 4u;
            let av = vec4<f32>(As[ai], As[ai + 1u], As[ai + 2u], As[ai + 3u]);
            let bv = vec4<f32>(Bs[bi], Bs[bi + 1u], Bs[bi + 2u], Bs[bi + 3u]);
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
        workgroupBarrier();
    }

    return Block(acc0, acc1, acc2, acc3, obase, row0 + ty * 4u, col0 + tx * 4u);
}

// The slices of element i of a split-K product, added in order.
fn slice_sum(i: u32) -> f32 {
    var acc = 0.0;
    for (var s = 0u; s < SUM_SLICES; s = s + 1u) {
        acc = acc + a[s * SUM_LEN + i];
    }
    return acc;
}

@compute @workgroup_size(256)
fn splitk_sum(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = gid.y * nwg.x * 256u + gid.x;
    if i >= SUM_LEN {
        return;
    }
    let v = slice_sum(i);
    sum_out[i] = select(v, max(v, 0.0), RELU);
}

@compute @workgroup_size(256)
fn splitk_sum_bias(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let i = gid.y * nwg.x * 256u + gid.x;
    if i >= SUM_LEN {
        return;
    }
    let bi = select(i % N, (i / N) % M, BIAS_ROWS);
    let v = slice_sum(i) + b[bi];
    out[i] = select(v, max(v, 0.0), RELU);
}
