// attention.wgsl: scaled dot-product attention, out = softmax(q k^T * SCALE + mask) v, as
// torch.nn.functional.scaled_dot_product_attention (src/ops/attention.rs), computed in one pass
// over the keys with an online softmax (FlashAttention): the (LQ, LK) score matrix is never
// stored, a workgroup keeps BQ rows of it, one tile of BK keys at a time. Its gradients come
// from three more kernels that never store it either (FlashAttention-2's backward, with dQ in
// a kernel of its own instead of atomics): attention_stats, attention_dkv, attention_dq.
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
//   0  q     storage, read        [BH, LQ, D] (as laid out below)
//   1  k     storage, read        [BH, LK, D]
//   2  v     storage, read        [BH, LK, DV]
//   3  mask  storage, read        additive f32 scores, read only with HAS_MASK: element (bh, i, j)
//                                 at (bh / HEADS) * MS_OUTER + (bh % HEADS) * MS_HEAD + i * MS_ROW
//                                 + j * MS_COL (stride 0 along broadcast axes); a [1] zero without
//   4  seed  storage, read        [1] the dropout seed, a whole number read as u32 (read only with
//                                 HAS_DROPOUT; a [1] zero without)
//   5  out   storage, read_write  [BH, LQ, DV]
//
//   attention   with WRITE_LSE also out[LSE_OFF + bh * LQ + i] = lse_i (below), past the output
//               (LSE_OFF = BH * LQ * DV: the plan gives its buffer room for them)
//   attention_stats  per query row i of each slice: stats[bh * LQ + i] = lse_i, the log of the
//                    softmax's denominator (max_j s_ij + log sum_j exp(s_ij - max_j s_ij)), and
//                    stats[(BH + bh) * LQ + i] = delta_i = sum_c dy[i, c] y[i, c]; with
//                    LSE_GIVEN lse_i is read from y[LSE_OFF + bh * LQ + i], where the forward
//                    wrote it, instead of recomputing the scores
//   attention_dkv    per key j: dk[j] = sum_i ds_ij q[i] * SCALE, dv[j] = sum_i pd_ij dy[i], with
//                    p_ij = exp(s_ij - lse_i), pd_ij = p_ij * keep_ij (the forward's dropout:
//                    DROP_SCALE or 0, 1 without dropout), dp_ij = (dy[i] . v[j]) * keep_ij and
//                    ds_ij = p_ij (dp_ij - delta_i) (softmax's backward: delta_i = sum_j p_ij
//                    dp_ij = dy[i] . y[i]); written as grad = [dk (BH, LK, D) | dv (BH, LK, DV)]
//   attention_dq     per query i: dq[i] = sum_j ds_ij k[j] * SCALE, written as grad (BH, LQ, D)
// Bindings of the backward kernels (group 0): 0 q, 1 k, 2 v, 3 mask, 4 seed as above (the stats
// kernel does not read v and seed), then
//   5  y         storage, read        [BH, LQ, DV] the forward's output
//   6  dy        storage, read        [BH, LQ, DV] its gradient
//   7  stats     storage, read_write  [2, BH, LQ] f32 (attention_stats: lse, then delta)
//   7  stats_in  storage, read        the same, read by attention_dkv and attention_dq
//   8  grad      storage, read_write  dk and dv, or dq
// Operand layouts: row i of slice bh of q starts at element Q_OFF + q_at(bh, i), q_at(bh, i) =
//   (bh / NH) * Q_SN + (bh % NH) * Q_SH + i * Q_SR; likewise K_ for k, V_ for v and O_ for out,
//   y and dy (features contiguous). Contiguous (*, L, D) slices: NH 1, Q_SN LQ * D, Q_SH 0,
//   Q_SR D. Self-attention's packed qkv (N, L, 3, H, D) (ops::attention::Layout::Packed): NH H,
//   Q_SN L * 3HD, Q_SH D, Q_SR 3HD, offsets 0, HD and 2HD for q, k, v; out (N, L, H, D). The
//   gradients are written with q's, k's and v's strides from GQ_OFF, GK_OFF and GV_OFF (contiguous:
//   dk at 0 and dv at BH * LK * D of grad; packed: one (N, L, 3, H, D) tensor, where
//   attention_dkv also zeroes dq's rows (ZERO_DQ; LQ = LK) and attention_dq then writes them in
//   place).
// Overrides: BH, LQ, LK, D, DV, SCALE, CAUSAL, HAS_MASK, HEADS, MS_OUTER, MS_HEAD, MS_ROW, MS_COL;
//            NH, Q_OFF, Q_SN, Q_SH, Q_SR (and K_, V_, O_), GQ_OFF, GK_OFF, GV_OFF, ZERO_DQ;
//            WRITE_LSE (attention), LSE_GIVEN (attention_stats), LSE_OFF;
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
//           Backward kernels: 64 threads each. attention_stats and attention_dq: a workgroup per
//           BQ query rows (as the forward), looping over tiles of BK keys; attention_dkv: a
//           workgroup per BK keys (BH * ceil(LK / BK) workgroups), looping over tiles of BQ
//           queries (with CAUSAL from the first tile with a row >= its first key). Their tiles
//           are row-major arrays of vec4 (4 features of a row; rows padded with zeros to D4 or
//           DV4 vectors), multiplied in 4 x 4 blocks as mat4x4 (the block of 4 rows at feature
//           vector cb, as columns, is the block transposed), so every 4 x 4 x 4 step is 8 vec4
//           loads for 64 multiply-adds. A block of 4 queries x 4 keys has its scores and their
//           gradients in one thread's registers: probabilities come from the stored lse, so
//           there is no row pass. Workgroup bytes (D4, DV4 = vectors per row, ceil(D / 4) and
//           ceil(DV / 4); K4 = BK / 4): attention_stats 16 * (BQ*D4 + BK*D4 +
//           BQ*K4) + 12*BQ; attention_dq 16 * (2*BQ*D4 + BQ*DV4 + BK*D4 + BK*DV4 + BQ*K4) +
//           8*BQ; attention_dkv 16 * (BQ*D4 + BQ*DV4 + 2*BK*D4 + 2*BK*DV4 + 2*BQ*K4) + 8*BQ.

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
override NH: u32 = 1u;
override Q_OFF: u32 = 0u;
override Q_SN: u32 = LQ * D;
override Q_SH: u32 = 0u;
override Q_SR: u32 = D;
override K_OFF: u32 = 0u;
override K_SN: u32 = LK * D;
override K_SH: u32 = 0u;
override K_SR: u32 = D;
override V_OFF: u32 = 0u;
override V_SN: u32 = LK * DV;
override V_SH: u32 = 0u;
override V_SR: u32 = DV;
override O_SN: u32 = LQ * DV;
override O_SH: u32 = 0u;
override O_SR: u32 = DV;
override GQ_OFF: u32 = 0u;
override GK_OFF: u32 = 0u;
override GV_OFF: u32 = BH * LK * D;
override ZERO_DQ: bool = false;
override WRITE_LSE: bool = false;
override LSE_GIVEN: bool = false;
override LSE_OFF: u32 = BH * LQ * DV;

// Element offsets of row i of slice bh (see the layouts above).
fn q_at(bh: u32, i: u32) -> u32 {
    return (bh / NH) * Q_SN + (bh % NH) * Q_SH + i * Q_SR;
}
fn k_at(bh: u32, j: u32) -> u32 {
    return (bh / NH) * K_SN + (bh % NH) * K_SH + j * K_SR;
}
fn v_at(bh: u32, j: u32) -> u32 {
    return (bh / NH) * V_SN + (bh % NH) * V_SH + j * V_SR;
}
fn o_at(bh: u32, i: u32) -> u32 {
    return (bh / NH) * O_SN + (bh % NH) * O_SH + i * O_SR;
}
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
@group(0) @binding(5) var<storage, read> y: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<f32>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>; // always f32
@group(0) @binding(7) var<storage, read> stats_in: array<f32>; // always f32
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;
fn ld_q(i: u32) -> f32 { return q[i]; }
fn ld_k(i: u32) -> f32 { return k[i]; }
fn ld_v(i: u32) -> f32 { return v[i]; }
fn st_out(i: u32, v: f32) { out[i] = v; }
fn ld_y(i: u32) -> f32 { return y[i]; }
fn ld_dy(i: u32) -> f32 { return dy[i]; }
fn st_grad(i: u32, v: f32) { grad[i] = v; }
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
        let at = Q_OFF + q_at(bh, i) + c;
        if i < LQ {
            x.x = ld_q(at);
        }
        if i + 1u < LQ {
            x.y = ld_q(at + Q_SR);
        }
        if i + 2u < LQ {
            x.z = ld_q(at + 2u * Q_SR);
        }
        if i + 3u < LQ {
            x.w = ld_q(at + 3u * Q_SR);
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
            let at = K_OFF + k_at(bh, j) + c;
            if j < LK {
                x.x = ld_k(at);
            }
            if j + 1u < LK {
                x.y = ld_k(at + K_SR);
            }
            if j + 2u < LK {
                x.z = ld_k(at + 2u * K_SR);
            }
            if j + 3u < LK {
                x.w = ld_k(at + 3u * K_SR);
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
            let at = V_OFF + v_at(bh, k0 + j) + c;
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
            st_out(o_at(bh, q0 + r) + c, o_acc[r * DV4 + c / 4u][c % 4u] / row_l[r]);
        }
    }
    if WRITE_LSE && lid < BQ && q0 + lid < LQ {
        // as attention_stats computes it (-inf for a row with no key allowed)
        st_out(LSE_OFF + bh * LQ + q0 + lid, row_m[lid] + log(row_l[lid]));
    }
}

// ---- backward ------------------------------------------------------------------------------

override D4: u32 = (D + 3u) / 4u;

// Tiles of the backward kernels, row-major vec4: [row * D4 + cb] holds features 4cb .. 4cb + 3.
// Queries (pre-scaled by SCALE) and the output's gradient for BQ rows.
var<workgroup> b_q: array<vec4<f32>, BQ * D4>;
var<workgroup> b_dy: array<vec4<f32>, BQ * DV4>;
// Keys and values for BK rows.
var<workgroup> b_k: array<vec4<f32>, BK * D4>;
var<workgroup> b_v: array<vec4<f32>, BK * DV4>;
// Per query row of the tile, keys in vectors ([r * K4 + jb]: keys 4jb .. 4jb + 3 of row r):
// ds (attention_stats keeps the scores here), and the dropped probabilities pd.
var<workgroup> b_ds: array<vec4<f32>, BQ * K4>;
var<workgroup> b_pd: array<vec4<f32>, BQ * K4>;
// Accumulators, row-major as the tiles: dk and dv of the workgroup's keys, dq of its queries.
var<workgroup> acc_k: array<vec4<f32>, BK * D4>;
var<workgroup> acc_v: array<vec4<f32>, BK * DV4>;
var<workgroup> acc_q: array<vec4<f32>, BQ * D4>;
// lse_i and delta_i of the tile's query rows.
var<workgroup> row_lse: array<f32, BQ>;
var<workgroup> row_delta: array<f32, BQ>;

// The workgroup's slice and what follows from it (set first by each backward kernel).
var<private> s_bh: u32;
var<private> s_mask: u32;
var<private> s_drop: u32;

fn enter_slice(bh: u32) {
    s_bh = bh;
    s_mask = (bh / HEADS) * MS_OUTER + (bh % HEADS) * MS_HEAD;
    s_drop = 0u;
    if HAS_DROPOUT {
        s_drop = hash(u32(seed[0]) ^ hash(DROP_SALT));
    }
}

// Element i of q, k, v or dy (`which` 0 to 3: a constant at every call, so compilers fold the
// switch away).
fn ld_operand(which: u32, i: u32) -> f32 {
    switch which {
        case 0u: { return ld_q(i); }
        case 1u: { return ld_k(i); }
        case 2u: { return ld_v(i); }
        default: { return ld_dy(i); }
    }
}
// Features c .. c + 3 of a row of that operand starting at element `at` (zeros past the row's
// width: D for q and k, DV for v and dy).
fn row4(which: u32, at: u32, c: u32) -> vec4<f32> {
    let width = select(D, DV, which >= 2u);
    var x = vec4<f32>(0.0);
    if c < width { x.x = ld_operand(which, at + c); }
    if c + 1u < width { x.y = ld_operand(which, at + c + 1u); }
    if c + 2u < width { x.z = ld_operand(which, at + c + 2u); }
    if c + 3u < width { x.w = ld_operand(which, at + c + 3u); }
    return x;
}

// Stage queries q0 .. q0 + BQ - 1 of the slice (scaled); rows past LQ are zeros.
fn stage_queries(lid: u32, q0: u32) {
    for (var e = lid; e < BQ * D4; e = e + WG) {
        let r = e / D4;
        var x = vec4<f32>(0.0);
        if q0 + r < LQ {
            x = row4(0u, Q_OFF + q_at(s_bh, q0 + r), 4u * (e - r * D4)) * SCALE;
        }
        b_q[e] = x;
    }
}
// Stage the same rows' output gradients, lse and delta.
fn stage_query_grads(lid: u32, q0: u32) {
    for (var e = lid; e < BQ * DV4; e = e + WG) {
        let r = e / DV4;
        var x = vec4<f32>(0.0);
        if q0 + r < LQ {
            x = row4(3u, o_at(s_bh, q0 + r), 4u * (e - r * DV4));
        }
        b_dy[e] = x;
    }
    if lid < BQ {
        var lse = 0.0;
        var delta = 0.0;
        if q0 + lid < LQ {
            lse = stats_in[s_bh * LQ + q0 + lid];
            delta = stats_in[(BH + s_bh) * LQ + q0 + lid];
        }
        row_lse[lid] = lse;
        row_delta[lid] = delta;
    }
}
// Stage keys k0 .. k0 + BK - 1 of the slice; rows past LK are zeros.
fn stage_keys(lid: u32, k0: u32) {
    for (var e = lid; e < BK * D4; e = e + WG) {
        let j = e / D4;
        var x = vec4<f32>(0.0);
        if k0 + j < LK {
            x = row4(1u, K_OFF + k_at(s_bh, k0 + j), 4u * (e - j * D4));
        }
        b_k[e] = x;
    }
}
// Stage the same keys' values.
fn stage_values(lid: u32, k0: u32) {
    for (var e = lid; e < BK * DV4; e = e + WG) {
        let j = e / DV4;
        var x = vec4<f32>(0.0);
        if k0 + j < LK {
            x = row4(2u, V_OFF + v_at(s_bh, k0 + j), 4u * (e - j * DV4));
        }
        b_v[e] = x;
    }
}

// 4 rows from r0 at vector cb of a tile, as the columns of a matrix: the 4 x 4 block transposed.
fn m_q(r0: u32, cb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_q[r0 * D4 + cb], b_q[(r0 + 1u) * D4 + cb], b_q[(r0 + 2u) * D4 + cb],
        b_q[(r0 + 3u) * D4 + cb]);
}
fn m_k(r0: u32, cb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_k[r0 * D4 + cb], b_k[(r0 + 1u) * D4 + cb], b_k[(r0 + 2u) * D4 + cb],
        b_k[(r0 + 3u) * D4 + cb]);
}
fn m_v(r0: u32, cb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_v[r0 * DV4 + cb], b_v[(r0 + 1u) * DV4 + cb],
        b_v[(r0 + 2u) * DV4 + cb], b_v[(r0 + 3u) * DV4 + cb]);
}
fn m_dy(r0: u32, cb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_dy[r0 * DV4 + cb], b_dy[(r0 + 1u) * DV4 + cb],
        b_dy[(r0 + 2u) * DV4 + cb], b_dy[(r0 + 3u) * DV4 + cb]);
}
fn m_ds(r0: u32, jb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_ds[r0 * K4 + jb], b_ds[(r0 + 1u) * K4 + jb], b_ds[(r0 + 2u) * K4 + jb],
        b_ds[(r0 + 3u) * K4 + jb]);
}
fn m_pd(r0: u32, jb: u32) -> mat4x4<f32> {
    return mat4x4<f32>(b_pd[r0 * K4 + jb], b_pd[(r0 + 1u) * K4 + jb], b_pd[(r0 + 2u) * K4 + jb],
        b_pd[(r0 + 3u) * K4 + jb]);
}

// Scores of tile rows 4rb .. 4rb + 3 with keys 4jb .. 4jb + 3: column r holds row 4rb + r's
// four (q . k * SCALE, before the mask).
fn scores_t(rb: u32, jb: u32) -> mat4x4<f32> {
    var s = mat4x4<f32>();
    for (var cb = 0u; cb < D4; cb = cb + 1u) {
        s = s + transpose(m_k(4u * jb, cb)) * m_q(4u * rb, cb);
    }
    return s;
}
// The same block of dy . v (the dropped probabilities' gradient).
fn dprobs_t(rb: u32, jb: u32) -> mat4x4<f32> {
    var s = mat4x4<f32>();
    for (var cb = 0u; cb < DV4; cb = cb + 1u) {
        s = s + transpose(m_v(4u * jb, cb)) * m_dy(4u * rb, cb);
    }
    return s;
}

// Query i's score for key j with the mask added; `allowed(i, j)` is the caller's.
fn masked(s: f32, i: u32, j: u32) -> f32 {
    if HAS_MASK {
        return s + mask[s_mask + i * MS_ROW + j * MS_COL];
    }
    return s;
}
fn prob(s: f32, i: u32, j: u32, lse: f32) -> f32 {
    if !allowed(i, j) {
        return 0.0;
    }
    return exp(masked(s, i, j) - lse);
}
// Query i's probabilities for keys j0 .. j0 + 3 from their scores.
fn probs4(s: vec4<f32>, i: u32, j0: u32, lse: f32) -> vec4<f32> {
    return vec4<f32>(prob(s.x, i, j0, lse), prob(s.y, i, j0 + 1u, lse),
        prob(s.z, i, j0 + 2u, lse), prob(s.w, i, j0 + 3u, lse));
}
// The forward's dropout factors for query i and keys j0 .. j0 + 3 (DROP_SCALE or 0; 1 without).
fn keep(i: u32, j: u32) -> f32 {
    let at = ((s_bh * LQ + i) * LK + j) ^ s_drop;
    return select(0.0, DROP_SCALE, hash(at) >= DROP_THRESHOLD);
}
fn keeps4(i: u32, j0: u32) -> vec4<f32> {
    if !HAS_DROPOUT {
        return vec4<f32>(1.0);
    }
    return vec4<f32>(keep(i, j0), keep(i, j0 + 1u), keep(i, j0 + 2u), keep(i, j0 + 3u));
}
// ds and the dropped probabilities pd for tile row r (query i) and keys j0 .. j0 + 3, from
// their scores s and the dropped probabilities' gradient dp.
struct Grads4 {
    ds: vec4<f32>,
    pd: vec4<f32>,
}
fn grads4(s: vec4<f32>, dp: vec4<f32>, r: u32, i: u32, j0: u32) -> Grads4 {
    let p = probs4(s, i, j0, row_lse[r]);
    let kept = keeps4(i, j0);
    return Grads4(p * (dp * kept - row_delta[r]), p * kept);
}

@compute @workgroup_size(64)
fn attention_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qb_count = (LQ + BQ - 1u) / BQ;
    let w = wid.y * nwg.x + wid.x;
    if w >= BH * qb_count {
        return;
    }
    enter_slice(w / qb_count);
    let q0 = (w % qb_count) * BQ;
    if !LSE_GIVEN {
        stage_queries(lid, q0);
    }
    if lid < BQ {
        row_m[lid] = -3.0e38;
        row_l[lid] = 0.0;
        // delta: one thread per row (DV multiply-adds against the tiles' D * LK)
        var delta = 0.0;
        if q0 + lid < LQ {
            let at = o_at(s_bh, q0 + lid);
            for (var c = 0u; c < DV; c = c + 1u) {
                delta = delta + ld_dy(at + c) * ld_y(at + c);
            }
        }
        row_delta[lid] = delta;
    }
    var k_end = LK;
    if CAUSAL {
        k_end = min(LK, q0 + BQ);
    }
    if LSE_GIVEN {
        // the forward wrote lse past its output: no scores to recompute
        k_end = 0u;
    }
    for (var k0 = 0u; k0 < k_end; k0 = k0 + BK) {
        workgroupBarrier();
        stage_keys(lid, k0);
        workgroupBarrier();
        for (var e = lid; e < Q4 * K4; e = e + WG) {
            let rb = e / K4;
            let jb = e - rb * K4;
            let s = scores_t(rb, jb);
            b_ds[(4u * rb) * K4 + jb] = s[0];
            b_ds[(4u * rb + 1u) * K4 + jb] = s[1];
            b_ds[(4u * rb + 2u) * K4 + jb] = s[2];
            b_ds[(4u * rb + 3u) * K4 + jb] = s[3];
        }
        workgroupBarrier();
        // one thread per row moves its running maximum and sum (as the forward)
        if lid < BQ {
            let r = lid;
            let i = q0 + r;
            let m_old = row_m[r];
            var m_new = m_old;
            for (var jb = 0u; jb < K4; jb = jb + 1u) {
                var s4 = b_ds[r * K4 + jb];
                for (var t = 0u; t < 4u; t = t + 1u) {
                    let j = k0 + 4u * jb + t;
                    if allowed(i, j) {
                        s4[t] = masked(s4[t], i, j);
                        m_new = max(m_new, s4[t]);
                    }
                }
                b_ds[r * K4 + jb] = s4;
            }
            var sum = 0.0;
            for (var jb = 0u; jb < K4; jb = jb + 1u) {
                let s4 = b_ds[r * K4 + jb];
                for (var t = 0u; t < 4u; t = t + 1u) {
                    if allowed(i, k0 + 4u * jb + t) {
                        sum = sum + exp(s4[t] - m_new);
                    }
                }
            }
            row_l[r] = row_l[r] * exp(m_old - m_new) + sum;
            row_m[r] = m_new;
        }
    }
    workgroupBarrier();
    if lid < BQ && q0 + lid < LQ {
        // a row with no key allowed has lse -inf (log 0): its probabilities are NaN, as torch's
        var lse = row_m[lid] + log(row_l[lid]);
        if LSE_GIVEN {
            lse = ld_y(LSE_OFF + s_bh * LQ + q0 + lid);
        }
        stats[s_bh * LQ + q0 + lid] = lse;
        stats[(BH + s_bh) * LQ + q0 + lid] = row_delta[lid];
    }
}

@compute @workgroup_size(64)
fn attention_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let kb_count = (LK + BK - 1u) / BK;
    let w = wid.y * nwg.x + wid.x;
    if w >= BH * kb_count {
        return;
    }
    enter_slice(w / kb_count);
    let k0 = (w % kb_count) * BK;
    stage_keys(lid, k0);
    stage_values(lid, k0);
    for (var e = lid; e < BK * D4; e = e + WG) {
        acc_k[e] = vec4<f32>(0.0);
    }
    for (var e = lid; e < BK * DV4; e = e + WG) {
        acc_v[e] = vec4<f32>(0.0);
    }
    var q_start = 0u;
    if CAUSAL {
        // rows before the first key attend none of the block's keys
        q_start = (k0 / BQ) * BQ;
    }
    for (var q0 = q_start; q0 < LQ; q0 = q0 + BQ) {
        // the previous tile's rows, ds and pd are no longer read
        workgroupBarrier();
        stage_queries(lid, q0);
        stage_query_grads(lid, q0);
        workgroupBarrier();
        for (var e = lid; e < Q4 * K4; e = e + WG) {
            let rb = e / K4;
            let jb = e - rb * K4;
            let s = scores_t(rb, jb);
            let dp = dprobs_t(rb, jb);
            let r = 4u * rb;
            let i = q0 + r;
            let j0 = k0 + 4u * jb;
            let g0 = grads4(s[0], dp[0], r, i, j0);
            let g1 = grads4(s[1], dp[1], r + 1u, i + 1u, j0);
            let g2 = grads4(s[2], dp[2], r + 2u, i + 2u, j0);
            let g3 = grads4(s[3], dp[3], r + 3u, i + 3u, j0);
            b_ds[r * K4 + jb] = g0.ds;
            b_ds[(r + 1u) * K4 + jb] = g1.ds;
            b_ds[(r + 2u) * K4 + jb] = g2.ds;
            b_ds[(r + 3u) * K4 + jb] = g3.ds;
            b_pd[r * K4 + jb] = g0.pd;
            b_pd[(r + 1u) * K4 + jb] = g1.pd;
            b_pd[(r + 2u) * K4 + jb] = g2.pd;
            b_pd[(r + 3u) * K4 + jb] = g3.pd;
        }
        workgroupBarrier();
        // dk += ds^T q (q scaled), dv += pd^T dy, in blocks of 4 keys x 4 features
        for (var e = lid; e < K4 * D4; e = e + WG) {
            let jb = e / D4;
            let cb = e - jb * D4;
            let at = 4u * jb * D4 + cb;
            var acc = mat4x4<f32>(acc_k[at], acc_k[at + D4], acc_k[at + 2u * D4],
                acc_k[at + 3u * D4]);
            for (var rb = 0u; rb < Q4; rb = rb + 1u) {
                acc = acc + m_q(4u * rb, cb) * transpose(m_ds(4u * rb, jb));
            }
            acc_k[at] = acc[0];
            acc_k[at + D4] = acc[1];
            acc_k[at + 2u * D4] = acc[2];
            acc_k[at + 3u * D4] = acc[3];
        }
        for (var e = lid; e < K4 * DV4; e = e + WG) {
            let jb = e / DV4;
            let cb = e - jb * DV4;
            let at = 4u * jb * DV4 + cb;
            var acc = mat4x4<f32>(acc_v[at], acc_v[at + DV4], acc_v[at + 2u * DV4],
                acc_v[at + 3u * DV4]);
            for (var rb = 0u; rb < Q4; rb = rb + 1u) {
                acc = acc + m_dy(4u * rb, cb) * transpose(m_pd(4u * rb, jb));
            }
            acc_v[at] = acc[0];
            acc_v[at + DV4] = acc[1];
            acc_v[at + 2u * DV4] = acc[2];
            acc_v[at + 3u * DV4] = acc[3];
        }
    }
    workgroupBarrier();
    for (var e = lid; e < BK * D; e = e + WG) {
        let j = e / D;
        let c = e - j * D;
        if k0 + j < LK {
            st_grad(GK_OFF + k_at(s_bh, k0 + j) + c, acc_k[j * D4 + c / 4u][c % 4u]);
            if ZERO_DQ {
                // packed gradients: the same rows of dq (LQ = LK), which attention_dq writes next
                st_grad(GQ_OFF + q_at(s_bh, k0 + j) + c, 0.0);
            }
        }
    }
    for (var e = lid; e < BK * DV; e = e + WG) {
        let j = e / DV;
        let c = e - j * DV;
        if k0 + j < LK {
            st_grad(GV_OFF + v_at(s_bh, k0 + j) + c, acc_v[j * DV4 + c / 4u][c % 4u]);
        }
    }
}

@compute @workgroup_size(64)
fn attention_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let qb_count = (LQ + BQ - 1u) / BQ;
    let w = wid.y * nwg.x + wid.x;
    if w >= BH * qb_count {
        return;
    }
    enter_slice(w / qb_count);
    let q0 = (w % qb_count) * BQ;
    stage_queries(lid, q0);
    stage_query_grads(lid, q0);
    for (var e = lid; e < BQ * D4; e = e + WG) {
        acc_q[e] = vec4<f32>(0.0);
    }
    var k_end = LK;
    if CAUSAL {
        k_end = min(LK, q0 + BQ);
    }
    for (var k0 = 0u; k0 < k_end; k0 = k0 + BK) {
        workgroupBarrier();
        stage_keys(lid, k0);
        stage_values(lid, k0);
        workgroupBarrier();
        for (var e = lid; e < Q4 * K4; e = e + WG) {
            let rb = e / K4;
            let jb = e - rb * K4;
            let s = scores_t(rb, jb);
            let dp = dprobs_t(rb, jb);
            let r = 4u * rb;
            let i = q0 + r;
            let j0 = k0 + 4u * jb;
            b_ds[r * K4 + jb] = grads4(s[0], dp[0], r, i, j0).ds;
            b_ds[(r + 1u) * K4 + jb] = grads4(s[1], dp[1], r + 1u, i + 1u, j0).ds;
            b_ds[(r + 2u) * K4 + jb] = grads4(s[2], dp[2], r + 2u, i + 2u, j0).ds;
            b_ds[(r + 3u) * K4 + jb] = grads4(s[3], dp[3], r + 3u, i + 3u, j0).ds;
        }
        workgroupBarrier();
        // dq += ds k, in blocks of 4 queries x 4 features (scaled at the end)
        for (var e = lid; e < Q4 * D4; e = e + WG) {
            let rb = e / D4;
            let cb = e - rb * D4;
            let at = 4u * rb * D4 + cb;
            var acc = mat4x4<f32>(acc_q[at], acc_q[at + D4], acc_q[at + 2u * D4],
                acc_q[at + 3u * D4]);
            for (var jb = 0u; jb < K4; jb = jb + 1u) {
                acc = acc + m_k(4u * jb, cb) * m_ds(4u * rb, jb);
            }
            acc_q[at] = acc[0];
            acc_q[at + D4] = acc[1];
            acc_q[at + 2u * D4] = acc[2];
            acc_q[at + 3u * D4] = acc[3];
        }
    }
    workgroupBarrier();
    for (var e = lid; e < BQ * D; e = e + WG) {
        let r = e / D;
        let c = e - r * D;
        if q0 + r < LQ {
            st_grad(GQ_OFF + q_at(s_bh, q0 + r) + c, acc_q[r * D4 + c / 4u][c % 4u] * SCALE);
        }
    }
}
