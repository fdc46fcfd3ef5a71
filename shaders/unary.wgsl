// unary.wgsl: elementwise functions of one tensor, out[i] = f(a[i]).
//
// Bindings (group 0):
//   0  a    storage, read        [N] input
//   1  out  storage, read_write  [N] output
// Overrides: N element count; OP selects f (codes in src/ops/unary.rs, UnaryOp::code);
//            ALPHA the scalar operand of the scalar ops (a leaky relu's slope, ELU's alpha,
//            clamp's lower bound), BETA clamp's upper bound.
// Dispatch: ceil(N / 256) workgroups of 256 threads, folded by the host into (x <= 65535, y);
//           one element per thread; threads past N return.
// The functions between the `shared:` markers are pure and copied verbatim into generated fused
// kernels (src/codegen/elementwise.rs), so each formula lives here only.

override N: u32 = 1u;
override OP: u32 = 0u;
override ALPHA: f32 = 0.0;
override BETA: f32 = 0.0;
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

// exp(x) - 1 without the cancellation near 0 (WGSL has no expm1): a Taylor polynomial below
// |x| = 0.1 (truncation 2e-9 relative), else exp(x) - 1 (relative error near 1e-6 at worst).
fn expm1_approx(x: f32) -> f32 {
    if abs(x) < 0.1 {
        return x * (1.0 + x * (0.5 + x * (0.16666667 + x * (0.041666668 + x * (0.008333334 + x * 0.0013888889)))));
    }
    return exp(x) - 1.0;
}

// log(1 + x) without the loss of x in 1 + x near 0 (WGSL has no log1p): below |x| = 0.1 the
// series of 2 atanh(s), s = x / (2 + x) (truncation 1e-9 relative), else log(1 + x) (relative
// error near 1e-6 at worst, at x = -0.1).
fn log1p_approx(x: f32) -> f32 {
    if abs(x) < 0.1 {
        let s = x / (2.0 + x);
        let s2 = s * s;
        return 2.0 * s * (1.0 + s2 * (0.33333334 + s2 * (0.2 + s2 * 0.14285715)));
    }
    return log(1.0 + x);
}

// tanh(sqrt(2 / pi) (x + 0.044715 x^3)), GELU's tanh approximation's factor (torch's kBeta,
// kKappa); clamped as case 6's tanh
fn gelu_tanh_t(x: f32) -> f32 {
    return tanh(clamp(0.7978845608 * (x + 0.044715 * x * x * x), -10.0, 10.0));
}

// tanh(softplus(x)), mish's factor: softplus >= 0, and tanh is 1 in f32 beyond 10
fn tanh_softplus(x: f32) -> f32 {
    return tanh(min(max(x, 0.0) + log(1.0 + exp(-abs(x))), 10.0));
}

// f selected by `op` (UnaryOp::code); `alpha` and `beta` are its scalar operands.
fn unary_op(op: u32, x: f32, alpha: f32, beta: f32) -> f32 {
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
        // leaky relu (alpha: the negative slope)
        case 19u: { return select(x * alpha, x, x > 0.0); }
        // ELU
        case 20u: { return select(alpha * expm1_approx(x), x, x > 0.0); }
        // clamp and hardtanh: min(max(x, lo), hi) as torch (hi wins where lo > hi)
        case 21u: { return min(max(x, alpha), beta); }
        // hardsigmoid and hardswish, in torch's order of operations
        case 22u: { return min(max(x + 3.0, 0.0), 6.0) / 6.0; }
        case 23u: { return x * min(max(x + 3.0, 0.0), 6.0) / 6.0; }
        case 24u: { return x * tanh_softplus(x); }
        // the derivatives the backward rules multiply by (UnaryOp::backward)
        case 25u: { return select(alpha, 1.0, x > 0.0); }
        case 26u: { return select(x + alpha, 1.0, x > 0.0); }
        case 27u: { return select(0.0, 1.0, alpha <= x && x <= beta); }
        case 28u: { return select(0.0, 1.0, alpha < x && x < beta); }
        case 29u: { return select(select(x / 3.0 + 0.5, 1.0, x > 3.0), 0.0, x < -3.0); }
        case 30u: {
            let t = tanh_softplus(x);
            return t + x / (1.0 + exp(-x)) * (1.0 - t * t);
        }
        // detach: the identity, without a gradient
        case 31u: { return x; }
        case 32u: { return sin(x); }
        case 33u: { return cos(x); }
        case 34u: { return inverseSqrt(x); }
        case 35u: { return log1p_approx(x); }
        case 36u: { return expm1_approx(x); }
        case 37u: { return floor(x); }
        case 38u: { return ceil(x); }
        // halves to even, as torch.round
        case 39u: { return round(x); }
        case 40u: { return trunc(x); }
        case 41u: { return 0.5 * x * (1.0 + gelu_tanh_t(x)); }
        case 42u: {
            let t = gelu_tanh_t(x);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608 * (1.0 + 0.134145 * x * x);
        }
        // log sigmoid: min(x, 0) - log1p(exp(-|x|)), torch's stable form
        case 43u: { return min(x, 0.0) - log1p_approx(exp(-abs(x))); }
        case 44u: { return erf_approx(x); }
        case 45u: { return x / (1.0 + abs(x)); }
        // isnan and isinf from the bits (WGSL may assume floats are neither)
        case 46u: {
            let b = bitcast<u32>(x);
            return select(0.0, 1.0, (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u);
        }
        case 47u: { return select(0.0, 1.0, (bitcast<u32>(x) & 0x7fffffffu) == 0x7f800000u); }
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
    out[i] = unary_op(OP, a[i], ALPHA, BETA);
}
