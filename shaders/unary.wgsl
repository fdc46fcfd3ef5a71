// unary.wgsl: elementwise functions of one tensor, out[i] = f(a[i]).
//
// Bindings (group 0):
//   0  a    storage, read        [N] input
//   1  out  storage, read_write  [N] output
// Overrides: N element count; OP selects f (codes in src/ops/unary.rs, UnaryOp::code);
//            ALPHA the scalar operand of the scalar ops.
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one element per thread; threads past N return.
// The functions between the `shared:` markers are pure and copied verbatim into generated fused
// kernels (src/codegen/elementwise.rs), so each formula lives here only.

override N: u32 = 1u;
override OP: u32 = 0u;
override ALPHA: f32 = 0.0;
const WG: u32 = 256u;

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

// shared: begin unary_op
// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7); WGSL has no erf.
fn erf_approx(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * abs(x));
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * exp(-x * x);
    return select(y, -y, x < 0.0);
}

// f selected by `op` (UnaryOp::code); `alpha` is the scalar operand of the scalar ops.
fn unary_op(op: u32, x: f32, alpha: f32) -> f32 {
    switch op {
        case 0u: { return -x; }
        case 1u: { return exp(x); }
        case 2u: { return log(x); }
        case 3u: { return sqrt(x); }
        case 4u: { return max(x, 0.0); }
        // sigmoid: exp(-x) overflows to inf for x < -88, giving exactly 0 as it should.
        case 5u: { return 1.0 / (1.0 + exp(-x)); }
        // tanh is 1 in f32 beyond |x| = 10; the clamp keeps drivers' exp-based tanh from inf/inf.
        case 6u: { return tanh(clamp(x, -10.0, 10.0)); }
        // exact (erf) GELU, as torch.nn.GELU()
        case 7u: { return 0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752)); }
        case 8u: { return x + alpha; }
        case 9u: { return x * alpha; }
        case 10u: { return alpha - x; }
        case 11u: { return x / alpha; }
        case 12u: { return alpha / x; }
        case 13u: { return pow(x, alpha); }
        case 14u: { return abs(x); }
        case 15u: { return x * x; }
        case 16u: { return sign(x); }
        // softplus, stable for large |x|; log(1 + t) loses t below 1e-7 but stays within rtol
        case 17u: { return max(x, 0.0) + log(1.0 + exp(-abs(x))); }
        // silu (swish): x * sigmoid(x), 0 for x < -88 as sigmoid is
        case 18u: { return x / (1.0 + exp(-x)); }
        default: { return x; }
    }
}
// shared: end unary_op

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
    out[i] = unary_op(OP, a[i], ALPHA);
}
