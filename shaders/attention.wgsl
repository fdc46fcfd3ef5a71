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
//            BQ (query rows per workgroup), BK (keys per tile): the host sizes them so that the
//            workgroup arrays (4 * (BQ*D + BK*max(D+1, DV) + BQ*BK + BQ*DV + 3*BQ) bytes) fit.
// Dispatch: BH * ceil(LQ / BQ) workgroups of 64 threads, folded by the host into (x <= 65535, y);
//           workgroup w owns rows [(w % QB) * BQ, +BQ) of slice w / QB (QB = ceil(LQ / BQ)).
//           Per tile of BK keys: the threads share the BQ x BK dot products, one thread per row
//           moves the row's running maximum and sum and turns scores into probabilities, then
//           the threads share the BQ x DV output accumulators (kept in workgroup memory).
//           Keys are staged with a row stride of D + 1 (no bank conflicts between the
//           threads of one row); with CAUSAL, tiles past a block's last row are skipped.

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
// `generated:` markers; the mask stays f32.
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

// The block's queries, pre-scaled by SCALE (BQ rows of D).
var<workgroup> q_s: array<f32, BQ * D>;
// One tile of keys (BK rows of stride D + 1), then of values (BK rows of DV).
var<workgroup> kv_s: array<f32, BK * max(D + 1u, DV)>;
// The tile's scores, then its probabilities (BQ rows of BK).
var<workgroup> s_s: array<f32, BQ * BK>;
// The output accumulators (BQ rows of DV), scaled by the rows' running sums at the end.
var<workgroup> o_s: array<f32, BQ * DV>;
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

    for (var e = lid; e < BQ * D; e = e + WG) {
        let i = q0 + e / D;
        var x = 0.0;
        if i < LQ {
            x = ld_q((bh * LQ + i) * D + e % D) * SCALE;
        }
        q_s[e] = x;
    }
    for (var e = lid; e < BQ * DV; e = e + WG) {
        o_s[e] = 0.0;
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
        // the previous tile's values are no longer read
        workgroupBarrier();
        for (var e = lid; e < BK * D; e = e + WG) {
            let j = e / D;
            let c = e - j * D;
            var x = 0.0;
            if k0 + j < LK {
                x = ld_k((bh * LK + k0 + j) * D + c);
            }
            kv_s[j * (D + 1u) + c] = x;
        }
        workgroupBarrier();
        for (var e = lid; e < BQ * BK; e = e + WG) {
            let r = e / BK;
            let j = e - r * BK;
            var s = 0.0;
            for (var c = 0u; c < D; c = c + 1u) {
                s = s + q_s[r * D + c] * kv_s[j * (D + 1u) + c];
            }
            if HAS_MASK && allowed(q0 + r, k0 + j) {
                s = s + mask[mask_base + (q0 + r) * MS_ROW + (k0 + j) * MS_COL];
            }
            s_s[e] = s;
        }
        workgroupBarrier();
        // the values replace the keys while one thread per row turns its scores into
        // probabilities
        for (var e = lid; e < BK * DV; e = e + WG) {
            let j = e / DV;
            var x = 0.0;
            if k0 + j < LK {
                x = ld_v((bh * LK + k0) * DV + e);
            }
            kv_s[e] = x;
        }
        if lid < BQ {
            let r = lid;
            let m_old = row_m[r];
            var m_new = m_old;
            for (var j = 0u; j < BK; j = j + 1u) {
                if allowed(q0 + r, k0 + j) {
                    m_new = max(m_new, s_s[r * BK + j]);
                }
            }
            // the row's sum normalizes before dropout (torch drops the probabilities)
            var sum = 0.0;
            for (var j = 0u; j < BK; j = j + 1u) {
                var p = 0.0;
                if allowed(q0 + r, k0 + j) {
                    p = exp(s_s[r * BK + j] - m_new);
                }
                sum = sum + p;
                if HAS_DROPOUT {
                    let at = ((bh * LQ + q0 + r) * LK + k0 + j) ^ drop_key;
                    p = select(0.0, p * DROP_SCALE, hash(at) >= DROP_THRESHOLD);
                }
                s_s[r * BK + j] = p;
            }
            let alpha = exp(m_old - m_new);
            row_m[r] = m_new;
            row_l[r] = row_l[r] * alpha + sum;
            row_a[r] = alpha;
        }
        workgroupBarrier();
        for (var e = lid; e < BQ * DV; e = e + WG) {
            let r = e / DV;
            let c = e - r * DV;
            var acc = o_s[e] * row_a[r];
            for (var j = 0u; j < BK; j = j + 1u) {
                acc = acc + s_s[r * BK + j] * kv_s[j * DV + c];
            }
            o_s[e] = acc;
        }
    }
    workgroupBarrier();
    for (var e = lid; e < BQ * DV; e = e + WG) {
        let i = q0 + e / DV;
        if i < LQ {
            st_out((bh * LQ + q0) * DV + e, o_s[e] / row_l[e / DV]);
        }
    }
}
