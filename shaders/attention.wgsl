// attention.wgsl: scaled dot-product attention, out = softmax(q k^T * SCALE + mask) v, as
// torch.nn.functional.scaled_dot_product_attention (src/ops/attention.rs), computed in one pass
// over the keys with an online softmax (FlashAttention): the (LQ, LK) score matrix is never
// stored, a workgroup keeps BQ rows of it, one tile of BK keys at a time.
//
//   attention   for each of the BH (batch, head) slices: out[i] = sum_j p_ij v[j],
//               p_ij = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij),
//               s_ij = SCALE q[i] . k[j] + mask(i, j); with CAUSAL only keys j <= i count
//               (top-left aligned, as torch's is_causal); with HAS_DROPOUT each p_ij is then
//               dropped as dropout.wgsl drops element (bh * LQ + i) * LK + j of (BH, LQ, LK)
//               with the seed and DROP_SALT (kept ones scaled by DROP_SCALE): the mask the
//               graph's dropout op recomputes in the backward pass
//
// Bindings (group 0):
//   0  q     storage, read        [BH, LQ, D]
//   1  k     storage, read        [BH, LK, D]
//   2  v     storage, read        [BH, LK, DV]
//   3  mask  storage, read        additive f32 scores, read only with HAS_MASK: element (bh, i, j)
//                                 at (bh / HEADS) * MS_OUTER + (bh % HEADS) * MS_HEAD + i * MS_ROW
//                                 + j * MS_COL (stride 0 along broadcast axes); a [1] zero without
//   4  seed  storage, read        [1] the dropout seed, a whole number read as u32 (read only with
//                                 HAS_DROPOUT; a [1] zero without)
//   5  out   storage, read_write  [BH, LQ, DV]
// Overrides: BH, LQ, LK, D, DV, SCALE, CAUSAL, HAS_MASK, HEADS, MS_OUTER, MS_HEAD, MS_ROW, MS_COL;
//            HAS_DROPOUT, DROP_THRESHOLD, DROP_SCALE, DROP_SALT (as dropout.wgsl's);
//            BQ (query rows per workgroup), BK (keys per tile), both multiples of 4: the host
//            sizes them so that the workgroup arrays (4 * (BQ*D + BK*max(D, DV4) + BQ*BK +
//            BQ*DV4 + 3*BQ) bytes, DV4 = DV rounded up to a multiple of 4) fit.
// Dispatch: BH * ceil(LQ / BQ) workgroups of 64 threads, folded by the host into (x <= 65535, y);
//           workgroup w owns rows [(w % QB) * BQ, +BQ) of slice w / QB (QB = ceil(LQ / BQ)).
//           Per tile of BK keys: the threads share the BQ x BK scores in blocks of 4 rows x 4
//           keys (queries and keys staged transposed, so each step of the dot products is two
//           vec4 loads for 16 multiply-adds), one thread per row adds the mask, moves the row's
//           running maximum and sum and turns scores into probabilities, then the threads share
//           the BQ x DV output accumulators (in workgroup memory) in blocks of 4 rows x 4
//           columns (probabilities stored transposed: again two vec4 loads for 16
//           multiply-adds). With CAUSAL, tiles past a block's last row are skipped.

override BH: u32 = 1u;
override LQ: u32 = 1u;
override LK: u32 = 1u;
override D: u32 = 1u;
override DV: u32 = 1u;
override SCALE: f32 = 1.0;
override CAUSAL: bool = false;
override HAS_MASK: bool = false;
override HEADS: u32 = 1u;
override MS_OUTER: u32 = 0u;
override MS_HEAD: u32 = 0u;
override MS_ROW: u32 = 0u;
override MS_COL: u32 = 0u;
override HAS_DROPOUT: bool = false;
override DROP_THRESHOLD: u32 = 0u;
override DROP_SCALE: f32 = 1.0;
override DROP_SALT: u32 = 0u;
override BQ: u32 = 16u;
override BK: u32 = 16u;
const WG: u32 = 64u;

// Every global read and write of q, k, v and out goes through ld_*/st_*: src/codegen/storage.rs
// generates the f16 variant of this file (f16 tensors) by rewriting the block between the
// `generated:` markers; the mask and the seed stay f32.
// generated: begin storage
@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>; // always f32
@group(0) @binding(4) var<storage, read> seed: array<f32>; // always f32
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
fn ld_q(i: u32) -> f32 { return q[i]; }
fn ld_k(i: u32) -> f32 { return k[i]; }
fn ld_v(i: u32) -> f32 { return v[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
// generated: end storage

// Row blocks (of 4 queries), key blocks (of 4 keys) and column blocks (of 4 output features).
override Q4: u32 = BQ / 4u;
override K4: u32 = BK / 4u;
override DV4: u32 = (DV + 3u) / 4u;

// The block's queries, pre-scaled by SCALE, transposed: element [c * Q4 + b] holds feature c
// of rows 4b .. 4b + 3.
var<workgroup> q_t: array<vec4<f32>, D * Q4>;
// One tile of keys, transposed ([c * BK / 4 + b]: feature c of keys 4b .. 4b + 3); then of
// values, row-major ([j * DV4 + b]: features 4b .. 4b + 3 of key j).
var<workgroup> kv: array<vec4<f32>, BK * max(D, 4u * DV4) / 4u>;
// The tile's scores, then its probabilities, transposed ([j * BQ + r]: key j of row r). Scalar:
// one thread per row writes them, and no two threads write parts of one vector.
var<workgroup> p_t: array<f32, BK * BQ>;
// The output accumulators ([r * DV4 + b]: features 4b .. 4b + 3 of row r), divided by the
// rows' running sums at the end.
var<workgroup> o_acc: array<vec4<f32>, BQ * DV4>;
// Per row: running maximum, running sum, the factor this tile rescales the accumulators by.
var<workgroup> row_m: array<f32, BQ>;
var<workgroup> row_l: array<f32, BQ>;
var<workgroup> row_a: array<f32, BQ>;

// lowbias32 (Chris Wellons), as dropout.wgsl.
fn hash(v: u32) -> u32 {
    var h = v;
    h = h ^ (h >> 16u);
    h = h * 0x7feb352du;
    h = h ^ (h >> 15u);
    h = h * 0x846ca68bu;
    h = h ^ (h >> 16u);
    return h;
}

// Whether query i may attend key j (both in range).
fn allowed(i: u32, j: u32) -> bool {
    return j < LK && i < LQ && (!CAUSAL || j <= i);
}

@compute @workgroup_size(64)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qb_count = (LQ + BQ - 1u) / BQ;
    let w = wid.y * nwg.x + wid.x;
    if w >= BH * qb_count {
        return;
    }
    let bh = w / qb_count;
    let q0 = (w % qb_count) * BQ;
    let mask_base = (bh / HEADS) * MS_OUTER + (bh % HEADS) * MS_HEAD;
    var drop_key = 0u;
    if HAS_DROPOUT {
        drop_key = hash(u32(seed[0]) ^ hash(DROP_SALT));
    }

    // each thread writes whole vectors (4 rows of one feature), reading along the features
    for (var e = lid; e < Q4 * D; e = e + WG) {
        let rb = e / D;
        let c = e - rb * D;
        var x = vec4<f32>(0.0);
        let i = q0 + 4u * rb;
        let at = (bh * LQ + i) * D + c;
        if i < LQ {
            x.x = ld_q(at);
        }
        if i + 1u < LQ {
            x.y = ld_q(at + D);
        }
        if i + 2u < LQ {
            x.z = ld_q(at + 2u * D);
        }
        if i + 3u < LQ {
            x.w = ld_q(at + 3u * D);
        }
        q_t[c * Q4 + rb] = x * SCALE;
    }
    for (var e = lid; e < BQ * DV4; e = e + WG) {
        o_acc[e] = vec4<f32>(0.0);
    }
    if lid < BQ {
        row_m[lid] = -3.0e38;
        row_l[lid] = 0.0;
    }

    var k_end = LK;
    if CAUSAL {
        k_end = min(LK, q0 + BQ);
    }
    for (var k0 = 0u; k0 < k_end; k0 = k0 + BK) {
        // the previous tile's values and probabilities are no longer read
        workgroupBarrier();
        for (var e = lid; e < K4 * D; e = e + WG) {
            let jb = e / D;
            let c = e - jb * D;
            var x = vec4<f32>(0.0);
            let j = k0 + 4u * jb;
            let at = (bh * LK + j) * D + c;
            if j < LK {
                x.x = ld_k(at);
            }
            if j + 1u < LK {
                x.y = ld_k(at + D);
            }
            if j + 2u < LK {
                x.z = ld_k(at + 2u * D);
            }
            if j + 3u < LK {
                x.w = ld_k(at + 3u * D);
            }
            kv[c * K4 + jb] = x;
        }
        workgroupBarrier();
        // scores in blocks of 4 rows x 4 keys
        for (var e = lid; e < Q4 * K4; e = e + WG) {
            let rb = e / K4;
            let jb = e - rb * K4;
            var s0 = vec4<f32>(0.0);
            var s1 = vec4<f32>(0.0);
            var s2 = vec4<f32>(0.0);
            var s3 = vec4<f32>(0.0);
            for (var c = 0u; c < D; c = c + 1u) {
                let qv = q_t[c * Q4 + rb];
                let kk = kv[c * K4 + jb];
                s0 = s0 + qv.x * kk;
                s1 = s1 + qv.y * kk;
                s2 = s2 + qv.z * kk;
                s3 = s3 + qv.w * kk;
            }
            let at = 4u * (jb * BQ + rb);
            p_t[at] = s0.x;
            p_t[at + 1u] = s1.x;
            p_t[at + 2u] = s2.x;
            p_t[at + 3u] = s3.x;
            p_t[at + BQ] = s0.y;
            p_t[at + BQ + 1u] = s1.y;
            p_t[at + BQ + 2u] = s2.y;
            p_t[at + BQ + 3u] = s3.y;
            p_t[at + 2u * BQ] = s0.z;
            p_t[at + 2u * BQ + 1u] = s1.z;
            p_t[at + 2u * BQ + 2u] = s2.z;
            p_t[at + 2u * BQ + 3u] = s3.z;
            p_t[at + 3u * BQ] = s0.w;
            p_t[at + 3u * BQ + 1u] = s1.w;
            p_t[at + 3u * BQ + 2u] = s2.w;
            p_t[at + 3u * BQ + 3u] = s3.w;
        }
        workgroupBarrier();
        // the values replace the keys while one thread per row turns its scores into
        // probabilities
        for (var e = lid; e < BK * DV4; e = e + WG) {
            let j = e / DV4;
            let c = 4u * (e - j * DV4);
            var x = vec4<f32>(0.0);
            let at = (bh * LK + k0 + j) * DV + c;
            if k0 + j < LK {
                x.x = ld_v(at);
                if c + 1u < DV {
                    x.y = ld_v(at + 1u);
                }
                if c + 2u < DV {
                    x.z = ld_v(at + 2u);
                }
                if c + 3u < DV {
                    x.w = ld_v(at + 3u);
                }
            }
            kv[e] = x;
        }
        if lid < BQ {
            let r = lid;
            let i = q0 + r;
            let m_old = row_m[r];
            var m_new = m_old;
            for (var j = 0u; j < BK; j = j + 1u) {
                if allowed(i, k0 + j) {
                    var s = p_t[j * BQ + r];
                    if HAS_MASK {
                        s = s + mask[mask_base + i * MS_ROW + (k0 + j) * MS_COL];
                        p_t[j * BQ + r] = s;
                    }
                    m_new = max(m_new, s);
                }
            }
            // the row's sum normalizes before dropout (torch drops the probabilities)
            var sum = 0.0;
            for (var j = 0u; j < BK; j = j + 1u) {
                var p = 0.0;
                if allowed(i, k0 + j) {
                    p = exp(p_t[j * BQ + r] - m_new);
                }
                sum = sum + p;
                if HAS_DROPOUT {
                    let at = ((bh * LQ + i) * LK + k0 + j) ^ drop_key;
                    p = select(0.0, p * DROP_SCALE, hash(at) >= DROP_THRESHOLD);
                }
                p_t[j * BQ + r] = p;
            }
            let alpha = exp(m_old - m_new);
            row_m[r] = m_new;
            row_l[r] = row_l[r] * alpha + sum;
            row_a[r] = alpha;
        }
        workgroupBarrier();
        // accumulators in blocks of 4 rows x 4 features
        for (var e = lid; e < Q4 * DV4; e = e + WG) {
            let rb = e / DV4;
            let cb = e - rb * DV4;
            let at = 4u * rb * DV4 + cb;
            var o0 = o_acc[at] * row_a[4u * rb];
            var o1 = o_acc[at + DV4] * row_a[4u * rb + 1u];
            var o2 = o_acc[at + 2u * DV4] * row_a[4u * rb + 2u];
            var o3 = o_acc[at + 3u * DV4] * row_a[4u * rb + 3u];
            for (var j = 0u; j < BK; j = j + 1u) {
                let p = vec4<f32>(
                    p_t[j * BQ + 4u * rb],
                    p_t[j * BQ + 4u * rb + 1u],
                    p_t[j * BQ + 4u * rb + 2u],
                    p_t[j * BQ + 4u * rb + 3u],
                );
                let vv = kv[j * DV4 + cb];
                o0 = o0 + p.x * vv;
                o1 = o1 + p.y * vv;
                o2 = o2 + p.z * vv;
                o3 = o3 + p.w * vv;
            }
            o_acc[at] = o0;
            o_acc[at + DV4] = o1;
            o_acc[at + 2u * DV4] = o2;
            o_acc[at + 3u * DV4] = o3;
        }
    }
    workgroupBarrier();
    for (var e = lid; e < BQ * DV; e = e + WG) {
        let r = e / DV;
        let c = e - r * DV;
        if q0 + r < LQ {
            st_out((bh * LQ + q0 + r) * DV + c, o_acc[r * DV4 + c / 4u][c % 4u] / row_l[r]);
        }
    }
}
