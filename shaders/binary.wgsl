// binary.wgsl: elementwise ops of two tensors with NumPy broadcasting, out[i] = f(a[..], b[..]).
//
// Bindings (group 0):
//   0  a    storage, read        input, read through strides SA0..SA5
//   1  b    storage, read        input, read through strides SB0..SB5
//   2  out  storage, read_write  [D0, .., D5] output, contiguous
// Overrides: N = D0 * .. * D5; D0..D5 the output shape left-padded with 1 to rank 6;
//            SA*/SB* element strides of a and b per output axis (0 where the axis broadcasts);
//            OP selects f (codes in src/ops/binary.rs, BinaryOp::code).
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one element per thread; threads past N return.
// The function between the `shared:` markers is pure and copied verbatim into generated fused
// kernels (src/codegen/elementwise.rs), so each formula lives here only; those take erf_approx
// from unary.wgsl's shared part.

override N: u32 = 1u;
override OP: u32 = 0u;
override D1: u32 = 1u;
override D2: u32 = 1u;
override D3: u32 = 1u;
override D4: u32 = 1u;
override D5: u32 = 1u;
override SA0: u32 = 0u;
override SA1: u32 = 0u;
override SA2: u32 = 0u;
override SA3: u32 = 0u;
override SA4: u32 = 0u;
override SA5: u32 = 0u;
override SB0: u32 = 0u;
override SB1: u32 = 0u;
override SB2: u32 = 0u;
override SB3: u32 = 0u;
override SB4: u32 = 0u;
override SB5: u32 = 0u;
const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7); WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * exp(-x * x);
    return select(y, -y, x < 0.0);
}

// shared: begin binary_op
// f selected by `op` (BinaryOp::code).
fn binary_op(op: u32, x: f32, y: f32) -> f32 {
    switch op {
        case 0u: { return x + y; }
        case 1u: { return x - y; }
        case 2u: { return x * y; }
        case 3u: { return x / y; }
        case 4u: { return max(x, y); }
        case 5u: { return min(x, y); }
        case 6u: { return select(0.0, 1.0, x >= y); }
        case 7u: { return select(0.0, 1.0, x == y); }
        case 8u: { return select(0.0, x, y > 0.0); }
        case 9u: { return x * y * (1.0 - y); }
        case 10u: { return x * (1.0 - y * y); }
        case 11u: {
            let cdf = 0.5 * (1.0 + erf_approx(y * 0.70710678118654752));
            let pdf = exp(-0.5 * y * y) * 0.39894228040143268;
            return x * (cdf + y * pdf);
        }
        case 12u: { return select(0.0, x, y != 0.0); }
        default: { return x; }
    }
}
// shared: end binary_op

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
    // Decompose the output index into coordinates, innermost axis first.
    var r = i;
    let c5 = r % D5; r = r / D5;
    let c4 = r % D4; r = r / D4;
    let c3 = r % D3; r = r / D3;
    let c2 = r % D2; r = r / D2;
    let c1 = r % D1; r = r / D1;
    let c0 = r;
    let ia = c0 * SA0 + c1 * SA1 + c2 * SA2 + c3 * SA3 + c4 * SA4 + c5 * SA5;
    let ib = c0 * SB0 + c1 * SB1 + c2 * SB2 + c3 * SB3 + c4 * SB4 + c5 * SB5;
    out[i] = binary_op(OP, a[ia], b[ib]);
}
