//! Gradient checks: every op's backward rule (CPU reference) against central differences, and the
//! GPU gradients against the CPU gradients.

mod common;

use common::{gradcheck, rand, random_projection};
use kiln::ops::TOL_REDUCTION;
use kiln::{Graph, Tensor};

#[test]
fn unary_gradients() {
    let x_vals = Tensor::rand_uniform(vec![3, 7], -2.0, 2.0, 1);
    let p_vals = Tensor::rand_uniform(vec![3, 7], 0.2, 3.0, 2);
    type Build = fn(&Graph, kiln::NodeId, kiln::NodeId) -> kiln::NodeId;
    let cases: Vec<(&str, Build)> = vec![
        ("neg", |g, x, _| g.neg(x).unwrap()),
        ("exp", |g, x, _| g.exp(x).unwrap()),
        ("log", |g, _, p| g.log(p).unwrap()),
        ("sqrt", |g, _, p| g.sqrt(p).unwrap()),
        ("relu", |g, x, _| g.relu(x).unwrap()),
        ("sigmoid", |g, x, _| g.sigmoid(x).unwrap()),
        ("tanh", |g, x, _| g.tanh(x).unwrap()),
        ("gelu", |g, x, _| g.gelu(x).unwrap()),
        ("silu", |g, x, _| g.silu(x).unwrap()),
        ("softplus", |g, x, _| g.softplus(x).unwrap()),
        ("abs", |g, x, _| g.abs(x).unwrap()),
        ("square", |g, x, _| g.square(x).unwrap()),
        ("scalars", |g, x, _| {
            g.div_scalar(
                g.rsub_scalar(
                    g.mul_scalar(g.add_scalar(x, 0.5).unwrap(), 3.0).unwrap(),
                    1.0,
                )
                .unwrap(),
                4.0,
            )
            .unwrap()
        }),
        ("rdiv", |g, _, p| g.rdiv_scalar(p, 2.0).unwrap()),
        ("pow", |g, _, p| g.pow_scalar(p, 1.7).unwrap()),
        ("leaky_relu", |g, x, _| g.leaky_relu(x, 0.2).unwrap()),
        ("leaky_relu negative slope", |g, x, _| {
            g.leaky_relu(x, -0.3).unwrap()
        }),
        ("elu", |g, x, _| g.elu(x, 1.0).unwrap()),
        ("elu negative alpha", |g, x, _| g.elu(x, -0.5).unwrap()),
        ("selu", |g, x, _| g.selu(x).unwrap()),
        ("clamp", |g, x, _| g.clamp(x, -1.2, 0.7).unwrap()),
        ("hardtanh", |g, x, _| g.hardtanh(x, -0.8, 1.1).unwrap()),
        // scaled so that the inputs reach past relu6's 6 and hardswish's -3 and 3
        ("relu6", |g, x, _| {
            g.relu6(g.mul_scalar(x, 3.3).unwrap()).unwrap()
        }),
        ("hardsigmoid", |g, x, _| {
            g.hardsigmoid(g.mul_scalar(x, 2.1).unwrap()).unwrap()
        }),
        ("hardswish", |g, x, _| {
            g.hardswish(g.mul_scalar(x, 2.1).unwrap()).unwrap()
        }),
        ("mish", |g, x, _| g.mish(x).unwrap()),
        ("gelu_tanh", |g, x, _| g.gelu_tanh(x).unwrap()),
        ("log_sigmoid", |g, x, _| g.log_sigmoid(x).unwrap()),
        ("softsign", |g, x, _| g.softsign(x).unwrap()),
        ("sin", |g, x, _| g.sin(x).unwrap()),
        ("cos", |g, x, _| g.cos(x).unwrap()),
        ("erf", |g, x, _| g.erf(x).unwrap()),
        ("expm1", |g, x, _| g.expm1(x).unwrap()),
        ("rsqrt", |g, _, p| g.rsqrt(p).unwrap()),
        ("log1p", |g, _, p| g.log1p(p).unwrap()),
    ];
    for (name, build) in cases {
        let g = Graph::new();
        let x = g.input("x", [3, 7]);
        let p = g.input("p", [3, 7]);
        let y = build(&g, x, p);
        let loss = random_projection(&g, y, 3);
        gradcheck(
            name,
            &g,
            loss,
            &[("x", x), ("p", p)],
            &[("x", &x_vals), ("p", &p_vals)],
            21,
            TOL_REDUCTION,
        );
    }
}

/// Second derivatives of the activations whose backward rules are differentiable again (torch's
/// double backward): the derivative ops' own rules against central differences of the gradient.
#[test]
fn activation_second_derivatives() {
    let x_vals = Tensor::rand_uniform(vec![3, 7], -4.0, 4.0, 5);
    type Build = fn(&Graph, kiln::NodeId) -> kiln::NodeId;
    let cases: Vec<(&str, Build)> = vec![
        ("elu", |g, x| g.elu(x, 0.7).unwrap()),
        ("hardswish", |g, x| g.hardswish(x).unwrap()),
        ("leaky_relu", |g, x| g.leaky_relu(x, 0.2).unwrap()),
    ];
    for (name, build) in cases {
        let g = Graph::new();
        let x = g.input("x", [3, 7]);
        let loss = random_projection(&g, build(&g, x), 8);
        let dx = g.grad(loss, &[x]).unwrap()[0];
        // a second loss on the gradient, differentiated again
        let loss2 = random_projection(&g, g.square(dx).unwrap(), 9);
        gradcheck(
            &format!("{name} second derivative"),
            &g,
            loss2,
            &[("x", x)],
            &[("x", &x_vals)],
            21,
            TOL_REDUCTION,
        );
    }
    // mish's derivative has no rule of its own: an error, not a wrong number
    let g = Graph::new();
    let x = g.input("x", [4]);
    let dx = g
        .grad(g.sum_all(g.mish(x).unwrap()).unwrap(), &[x])
        .unwrap()[0];
    let err = g.grad(g.sum_all(dx).unwrap(), &[x]).unwrap_err();
    assert!(err.to_string().contains("mish"), "{err}");
}

#[test]
fn binary_gradients_with_broadcasting() {
    for (sa, sb) in [
        (vec![4, 5], vec![4, 5]),
        (vec![2, 3, 4], vec![4]),
        (vec![3, 1], vec![1, 5]),
    ] {
        for op in ["add", "sub", "mul", "div", "maximum", "minimum"] {
            let g = Graph::new();
            let a = g.input("a", sa.clone());
            let b = g.input("b", sb.clone());
            let y = match op {
                "add" => g.add(a, b),
                "sub" => g.sub(a, b),
                "mul" => g.mul(a, b),
                "div" => g.div(a, b),
                "maximum" => g.maximum(a, b),
                _ => g.minimum(a, b),
            }
            .unwrap();
            let loss = random_projection(&g, y, 4);
            let av = rand(&sa, 5);
            // b away from zero for div, and away from a for max/min (no ties within the step)
            let bv = Tensor::rand_uniform(sb.clone(), 1.5, 2.5, 6);
            gradcheck(
                &format!("{op} {sa:?} {sb:?}"),
                &g,
                loss,
                &[("a", a), ("b", b)],
                &[("a", &av), ("b", &bv)],
                12,
                TOL_REDUCTION,
            );
        }
    }
}

#[test]
fn matmul_gradients() {
    // a batched (rank 3 and 4) times a shared b: b's gradient one product over all rows
    for (ta, tb, lead) in [
        (false, false, &[2][..]),
        (true, false, &[2]),
        (false, true, &[2]),
        (true, true, &[2]),
        (false, false, &[2, 3]),
        (false, true, &[3, 2]),
    ] {
        let (m, k, n) = (3, 5, 4);
        let sa = [lead, &if ta { [k, m] } else { [m, k] }].concat();
        let sb = if tb { vec![n, k] } else { vec![k, n] };
        let g = Graph::new();
        let a = g.input("a", sa.clone());
        let b = g.input("b", sb.clone());
        let y = g.matmul_t(a, b, ta, tb).unwrap();
        let loss = random_projection(&g, y, 7);
        gradcheck(
            &format!("matmul {sa:?} ta={ta} tb={tb}"),
            &g,
            loss,
            &[("a", a), ("b", b)],
            &[("a", &rand(&sa, 8)), ("b", &rand(&sb, 9))],
            16,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn softmax_reduce_layout_gradients() {
    let xv = Tensor::rand_uniform(vec![3, 4, 5], -2.0, 2.0, 10);
    type Build = fn(&Graph, kiln::NodeId) -> kiln::NodeId;
    let cases: Vec<(&str, Build)> = vec![
        ("softmax", |g, x| g.softmax(x, -1).unwrap()),
        ("softmax axis 1", |g, x| g.softmax(x, 1).unwrap()),
        ("log_softmax", |g, x| g.log_softmax(x, -1).unwrap()),
        ("sum", |g, x| g.sum(x, 1, false).unwrap()),
        ("mean", |g, x| g.mean(x, 0, true).unwrap()),
        ("max", |g, x| g.max(x, -1, false).unwrap()),
        ("min", |g, x| g.min(x, 1, true).unwrap()),
        ("permute", |g, x| g.permute(x, &[2, 0, 1]).unwrap()),
        ("reshape", |g, x| g.reshape(x, &[12, 5]).unwrap()),
        ("expand", |g, x| {
            g.expand(
                g.reshape(x, &[3, 4, 5, 1]).unwrap(),
                &kiln::Shape(vec![2, 3, 4, 5, 3]),
            )
            .unwrap()
        }),
        ("mean_all", |g, x| g.mean_all(x).unwrap()),
    ];
    for (name, build) in cases {
        let g = Graph::new();
        let x = g.input("x", [3, 4, 5]);
        let y = build(&g, x);
        let loss = random_projection(&g, y, 11);
        gradcheck(
            name,
            &g,
            loss,
            &[("x", x)],
            &[("x", &xv)],
            20,
            TOL_REDUCTION,
        );
    }
}

#[test]
fn shared_subexpressions_accumulate() {
    // y = x * x + exp(x): x feeds three paths
    let g = Graph::new();
    let x = g.input("x", [6]);
    let y = g.add(g.mul(x, x).unwrap(), g.exp(x).unwrap()).unwrap();
    let loss = random_projection(&g, y, 12);
    gradcheck(
        "shared",
        &g,
        loss,
        &[("x", x)],
        &[("x", &rand(&[6], 13))],
        6,
        TOL_REDUCTION,
    );
    // a parameter the loss does not use gets zeros
    let unused = g.input("u", [2]);
    let grads = g.grad(loss, &[unused]).unwrap();
    let mut plan = kiln::Device::cpu().compile(&g, &grads).unwrap();
    let out = plan
        .run(&[("x", &rand(&[6], 1)), ("u", &rand(&[2], 2))])
        .unwrap();
    assert_eq!(out[0].data(), &[0.0, 0.0]);
    assert!(
        g.grad(y, &[x]).is_err(),
        "a loss with 6 elements is refused"
    );
}

#[test]
fn narrow_concat_gradients() {
    let g = Graph::new();
    let a = g.input("a", [3, 4, 2]);
    let b = g.input("b", [3, 1, 2]);
    let y = g.concat(&[g.narrow(a, 1, 1, 2).unwrap(), b, a], 1).unwrap();
    let loss = random_projection(&g, y, 3);
    gradcheck(
        "narrow/concat",
        &g,
        loss,
        &[("a", a), ("b", b)],
        &[("a", &rand(&[3, 4, 2], 4)), ("b", &rand(&[3, 1, 2], 5))],
        24,
        TOL_REDUCTION,
    );
}

#[test]
fn fused_matmul_gradients() {
    use kiln::ops::matmul::Bias;
    for (bias, relu) in [(Bias::Cols, true), (Bias::Rows, true), (Bias::Cols, false)] {
        let g = Graph::new();
        let a = g.input("a", [2, 4, 5]);
        let b = g.input("b", [5, 3]);
        let blen = if bias == Bias::Rows { 4 } else { 3 };
        let c = g.input("c", [blen]);
        let y = g
            .matmul_fused(a, b, false, false, Some((c, bias)), relu)
            .unwrap();
        let loss = random_projection(&g, y, 8);
        // values away from relu's kink at the finite-difference step
        let av = Tensor::rand_uniform(vec![2, 4, 5], 0.2, 1.0, 9);
        let bv = rand(&[5, 3], 10);
        let cv = rand(&[blen], 11);
        gradcheck(
            &format!("fused {bias:?} relu={relu}"),
            &g,
            loss,
            &[("a", a), ("b", b), ("c", c)],
            &[("a", &av), ("b", &bv), ("c", &cv)],
            15,
            TOL_REDUCTION,
        );
    }
}

/// A module applied twice shares its parameters, as a torch module called twice does: one
/// node per parameter name, whose gradient adds both uses' (checked against the same product
/// written with one weight twice); a name declared again with another shape is an error naming
/// both.
#[test]
fn a_module_applied_twice_shares_its_weights() {
    use kiln::nn::{Init, Linear};
    let lin = Linear::new("shared", 4, 4, &mut Init::new(5));
    let g = Graph::new();
    let x = g.input("x", [3, 4]);
    let (h, p1) = lin.apply(&g, x).unwrap();
    let (y, p2) = lin.apply(&g, g.tanh(h).unwrap()).unwrap();
    assert_eq!(p1, p2, "one node per parameter");
    let loss = random_projection(&g, y, 1);
    let grads = g.grad(loss, &p1).unwrap();
    // the same function with the weight and bias read as plain parameters, each used twice
    let (w, b) = (
        g.param("shared.weight", [4, 4]),
        g.param("shared.bias", [4]),
    );
    assert_eq!([w, b], p1, "a later plain declaration is the same node too");
    let once = |v: kiln::NodeId| g.add(g.matmul_t(v, w, false, true).unwrap(), b).unwrap();
    let y2 = once(g.tanh(once(x)).unwrap());
    let loss2 = random_projection(&g, y2, 1);
    let grads2 = g.grad(loss2, &[w, b]).unwrap();
    let xv = kiln::Tensor::rand_uniform([3, 4], -1.0, 1.0, 2);
    for dev in common::devices() {
        let out = dev
            .compile(&g, &[grads[0], grads[1], grads2[0], grads2[1]])
            .unwrap()
            .run(&[("x", &xv)])
            .unwrap();
        common::assert_close("weight", &out[0], &out[2], 1e-6, 1e-5);
        common::assert_close("bias", &out[1], &out[3], 1e-6, 1e-5);
    }
    let _ = g.param("shared.weight", [4, 5]);
    let err = common::devices()[0]
        .compile(&g, &[y])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shared.weight") && err.contains("[4, 5]"),
        "{err}"
    );
}
