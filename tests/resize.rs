//! Resizing (`Graph::interpolate`, torch's `interpolate` with `size`): torch's outputs on
//! hand-worked examples, the GPU against the CPU reference on up-, down- and uneven resizes
//! (outputs poisoned with NaN), the backward as the forward's adjoint, gradient checks, f16,
//! shape errors.

mod common;

use common::{check_gpu_vs_cpu, gradcheck, rand, random_projection};
use kiln::ops::resize::{Resize2d, ResizeMode};
use kiln::ops::TOL_REDUCTION;
use kiln::{DType, Device, Graph, Tensor};

const NEAREST: ResizeMode = ResizeMode::Nearest;
const BILINEAR: ResizeMode = ResizeMode::Bilinear {
    align_corners: false,
};
const ALIGNED: ResizeMode = ResizeMode::Bilinear {
    align_corners: true,
};

fn cpu_resize(x: &Tensor, size: (usize, usize), mode: ResizeMode) -> Tensor {
    let g = Graph::new();
    let xi = g.input("x", x.shape().clone());
    let y = g.interpolate(xi, size, mode).unwrap();
    Device::cpu()
        .compile(&g, &[y])
        .unwrap()
        .run(&[("x", x)])
        .unwrap()
        .remove(0)
}

/// torch 2.x: `F.interpolate(torch.tensor([[[[1., 2.], [3., 4.]]]]), size=.., mode=..)`.
#[test]
fn interpolate_matches_torch_on_hand_worked_examples() {
    let x = Tensor::new([1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    #[rustfmt::skip]
    let cases: [((usize, usize), ResizeMode, Vec<f32>); 5] = [
        ((4, 4), BILINEAR, vec![
            1.0, 1.25, 1.75, 2.0,
            1.5, 1.75, 2.25, 2.5,
            2.5, 2.75, 3.25, 3.5,
            3.0, 3.25, 3.75, 4.0,
        ]),
        ((3, 3), ALIGNED, vec![1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0]),
        ((4, 4), NEAREST, vec![
            1.0, 1.0, 2.0, 2.0,
            1.0, 1.0, 2.0, 2.0,
            3.0, 3.0, 4.0, 4.0,
            3.0, 3.0, 4.0, 4.0,
        ]),
        // 2 -> 3 nearest: floor(o * 2 / 3) = 0, 0, 1
        ((3, 3), NEAREST, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0]),
        // one output: the mean of the four (bilinear, not aligned), the corner (aligned)
        ((1, 1), BILINEAR, vec![2.5]),
    ];
    for (size, mode, want) in cases {
        let got = cpu_resize(&x, size, mode);
        let want = Tensor::new([1, 1, size.0, size.1], want).unwrap();
        common::assert_close(&format!("{size:?} {mode:?}"), &got, &want, 1e-6, 1e-6);
    }
    let corner = cpu_resize(&x, (1, 1), ALIGNED);
    assert_eq!(corner.data(), &[1.0]);
    // 4 -> 3 bilinear (not aligned): src = (o + 0.5) * 4 / 3 - 0.5 = 0.1667, 1.5, 2.8333
    let row = Tensor::new([1, 1, 1, 4], vec![0.0, 10.0, 20.0, 30.0]).unwrap();
    let got = cpu_resize(&row, (1, 3), BILINEAR);
    let want = Tensor::new([1, 1, 1, 3], vec![5.0 / 3.0, 15.0, 85.0 / 3.0]).unwrap();
    common::assert_close("4 -> 3", &got, &want, 1e-5, 1e-5);
}

/// (N, C, H, W), output size.
const CASES: &[([usize; 4], (usize, usize))] = &[
    ([2, 3, 4, 5], (8, 10)),    // 2x up
    ([1, 2, 7, 5], (3, 11)),    // down and up, uneven
    ([1, 1, 1, 1], (5, 3)),     // one pixel spread
    ([2, 2, 9, 13], (1, 1)),    // to one pixel
    ([1, 4, 16, 16], (5, 7)),   // down by more than 2
    ([3, 1, 6, 6], (6, 6)),     // the same size
    ([2, 8, 17, 19], (33, 40)), // more than one workgroup, past 2x
];

const MODES: [ResizeMode; 3] = [NEAREST, BILINEAR, ALIGNED];

#[test]
fn interpolate_gpu_matches_cpu() {
    for (k, &(xs, size)) in CASES.iter().enumerate() {
        for mode in MODES {
            let g = Graph::new();
            let x = g.input("x", xs);
            let y = g.interpolate(x, size, mode).unwrap();
            let loss = random_projection(&g, y, 10 + k as u64);
            let dx = g.grad(loss, &[x]).unwrap()[0];
            let xv = rand(&xs, 20 + k as u64);
            check_gpu_vs_cpu(
                &format!("interpolate {xs:?} -> {size:?} {mode:?}"),
                &g,
                &[y, dx],
                &[("x", &xv)],
                TOL_REDUCTION,
            );
        }
    }
}

/// `<interpolate(x), y> = <x, interpolate_backward(y)>` on the CPU reference (a scatter) and
/// on the GPU (a gather over the outputs each input may reach).
#[test]
fn interpolate_backward_is_the_adjoint() {
    for (k, &(xs, size)) in CASES.iter().enumerate() {
        for mode in MODES {
            let g = Graph::new();
            let x = g.input("x", xs);
            let y = g.interpolate(x, size, mode).unwrap();
            let r = Resize2d {
                mode,
                input: (xs[2], xs[3]),
                output: size,
                scale_factor: None,
            };
            let z = g.input("z", g.shape(y));
            let back = g.interpolate_backward(z, r).unwrap();
            let (xv, zv) = (
                rand(&xs, 30 + k as u64),
                rand(g.shape(y).dims(), 40 + k as u64),
            );
            let devices = common::devices();
            for dev in devices {
                let out = dev
                    .compile(&g, &[y, back])
                    .unwrap()
                    .run(&[("x", &xv), ("z", &zv)])
                    .unwrap();
                let (lhs, rhs) = (common::dot(&out[0], &zv), common::dot(&xv, &out[1]));
                assert!(
                    (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
                    "{xs:?} -> {size:?} {mode:?} on {:?}: {lhs} vs {rhs}",
                    dev.kind()
                );
            }
        }
    }
}

#[test]
fn interpolate_gradients() {
    for (k, &(xs, size)) in CASES.iter().take(4).enumerate() {
        for mode in MODES {
            let g = Graph::new();
            let x = g.input("x", xs);
            let y = g.interpolate(x, size, mode).unwrap();
            // squared, so that the backward of the backward runs too
            let dx = g.grad(random_projection(&g, y, 50), &[x]).unwrap()[0];
            let loss = g
                .add(
                    random_projection(&g, g.square(y).unwrap(), 51),
                    random_projection(&g, dx, 52),
                )
                .unwrap();
            let xv = rand(&xs, 60 + k as u64);
            gradcheck(
                &format!("interpolate {xs:?} -> {size:?} {mode:?}"),
                &g,
                loss,
                &[("x", x)],
                &[("x", &xv)],
                16,
                TOL_REDUCTION,
            );
        }
    }
}

/// f16 images resize in f16 (computed in f32, rounded on store): the GPU against the CPU
/// reference, and both near the f32 result.
#[test]
fn interpolate_in_f16() {
    let Some(dev) = common::gpu() else { return };
    if !dev.features().contains(wgpu::Features::SHADER_F16) {
        return;
    }
    for mode in MODES {
        let g = Graph::new();
        let x = g.input_as("x", [2, 3, 5, 6], DType::F16);
        let y = g.interpolate(x, (9, 4), mode).unwrap();
        assert_eq!(g.dtype(y), DType::F16);
        let loss = g
            .sum_all(g.cast(g.square(y).unwrap(), DType::F32).unwrap())
            .unwrap();
        let dx = g.grad(loss, &[x]).unwrap()[0];
        let xv = rand(&[2, 3, 5, 6], 70);
        check_gpu_vs_cpu(
            &format!("f16 {mode:?}"),
            &g,
            &[y, dx],
            &[("x", &xv)],
            kiln::ops::TOL_F16,
        );
        let want = cpu_resize(&xv, (9, 4), mode);
        let got = dev
            .compile(&g, &[g.cast(y, DType::F32).unwrap()])
            .unwrap()
            .run(&[("x", &xv)])
            .unwrap();
        common::assert_close(
            &format!("f16 against f32 {mode:?}"),
            &got[0],
            &want,
            2e-3,
            2e-3,
        );
    }
}

#[test]
fn interpolate_shape_errors() {
    let g = Graph::new();
    let x = g.input("x", [2, 3, 4]);
    let e = g.interpolate(x, (8, 8), BILINEAR).unwrap_err();
    assert!(
        e.to_string()
            .contains("interpolate: input [2, 3, 4]: expected rank 4"),
        "{e}"
    );
    let x = g.input("x4", [1, 2, 4, 4]);
    let e = g.interpolate(x, (0, 8), NEAREST).unwrap_err();
    assert!(
        e.to_string().contains("the extents must be positive"),
        "{e}"
    );
    let r = Resize2d {
        mode: NEAREST,
        input: (4, 4),
        output: (8, 8),
        scale_factor: None,
    };
    let wrong = g.input("dy", [1, 2, 8, 7]);
    let e = g.interpolate_backward(wrong, r).unwrap_err();
    assert!(e.to_string().contains("expected (N, C, 8, 8)"), "{e}");
}

/// A decoder block as `nn::Sequential` (upsample x2, bilinear, then a 3x3 convolution; a
/// transposed convolution in another): shapes and values as the graph ops give them, and the
/// whole chain on the GPU against the CPU reference with its parameters' gradients.
#[test]
fn decoder_blocks_in_sequential() {
    use kiln::graph::Conv2dOpts;
    use kiln::nn::{Act, Conv2d, ConvTranspose2d, Init, Sequential};
    use kiln::ops::conv::ConvTranspose2dOpts;
    let mut init = Init::new(3);
    let pad = Conv2dOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let up = ConvTranspose2dOpts {
        stride: (2, 2),
        padding: (1, 1),
        ..Default::default()
    };
    let net = Sequential::new()
        .act(Act::Upsample(2, BILINEAR))
        .layer(Conv2d::new("conv", 4, 3, (3, 3), pad, &mut init))
        .act(Act::Relu)
        .layer(ConvTranspose2d::new("deconv", 3, 2, (4, 4), up, 1, &mut init).unwrap());
    assert_eq!(
        net.param_names(),
        ["conv.weight", "conv.bias", "deconv.weight", "deconv.bias"]
    );
    let g = Graph::new();
    let x = g.input("x", [2, 4, 3, 5]);
    let (y, params) = net.apply(&g, x, true).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 2, 12, 20]);
    let mut outs = vec![y];
    outs.extend(g.grad(random_projection(&g, y, 80), &params).unwrap());
    let xv = rand(&[2, 4, 3, 5], 81);
    check_gpu_vs_cpu("decoder block", &g, &outs, &[("x", &xv)], TOL_REDUCTION);
    // node by node: every resize, product, col2im and gradient within its tolerance
    if let Some(dev) = common::gpu() {
        let report = dev.verify(&g, &outs, &[("x", &xv)]).unwrap();
        assert!(report.ok(), "{report}");
    }
    let flat = g.input("flat", [2, 4, 3]);
    let e = Sequential::new()
        .act(Act::Upsample(2, NEAREST))
        .apply(&g, flat, false)
        .unwrap_err();
    assert!(e.to_string().contains("Upsample: input [2, 4, 3]"), "{e}");
}

/// `interpolate_scale` as `F.interpolate(x, scale_factor=..)`: the output `floor(in * s)`, and
/// the sampling at `1 / s` (torch's `compute_scales_value`), which for 1.7 picks other pixels
/// than the size alone (5 -> 8: output 5 reads input 2, not 3); bilinear with factors on the
/// GPU against the CPU reference, forward and gradient; a factor giving no pixel is an error.
#[test]
fn interpolate_by_scale_factor_as_torch() {
    let g = Graph::new();
    let x = g.input("x", [1, 1, 1, 5]);
    let by_scale = g.interpolate_scale(x, (1.0, 1.7), NEAREST).unwrap();
    let by_size = g.interpolate(x, (1, 8), NEAREST).unwrap();
    let xv = Tensor::new([1, 1, 1, 5], vec![0., 1., 2., 3., 4.]).unwrap();
    for dev in common::devices() {
        let got = dev
            .compile(&g, &[by_scale, by_size])
            .unwrap()
            .run(&[("x", &xv)])
            .unwrap();
        assert_eq!(got[0].data(), &[0., 0., 1., 1., 2., 2., 3., 4.]);
        assert_eq!(got[1].data(), &[0., 0., 1., 1., 2., 3., 3., 4.]);
    }
    let g = Graph::new();
    let x = g.input("x", [2, 3, 5, 7]);
    let mode = ResizeMode::Bilinear {
        align_corners: false,
    };
    let y = g.interpolate_scale(x, (1.7, 0.6), mode).unwrap();
    assert_eq!(g.shape(y).dims(), &[2, 3, 8, 4]);
    let loss = random_projection(&g, y, 3);
    let xv = rand(&[2, 3, 5, 7], 4);
    check_gpu_vs_cpu("scale 1.7 x 0.6", &g, &[y], &[("x", &xv)], TOL_REDUCTION);
    gradcheck(
        "scale 1.7 x 0.6",
        &g,
        loss,
        &[("x", x)],
        &[("x", &xv)],
        30,
        TOL_REDUCTION,
    );
    let e = g.interpolate_scale(x, (0.1, 1.0), mode).unwrap_err();
    assert!(e.to_string().contains("interpolate"), "{e}");
}
