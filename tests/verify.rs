//! Verify mode compares every node of a GPU run with the CPU reference.

mod common;

use common::{gpu, rand};
use kiln::{Graph, Tensor};

#[test]
fn verify_reports_every_node() {
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [6, 10]);
    let w = g.param_init("verify.w", rand(&[10, 4], 1));
    let h = g.matmul(x, w).unwrap();
    let r = g.reshape(h, &[24]).unwrap();
    let t = g.tanh(r).unwrap();
    let s = g.softmax(t, 0).unwrap();
    let report = dev.verify(&g, &[s], &[("x", &rand(&[6, 10], 2))]).unwrap();
    println!("{report}");
    assert!(report.ok(), "{report}");
    let ops: Vec<&str> = report.nodes.iter().map(|n| n.op).collect();
    assert_eq!(ops, ["matmul", "reshape", "tanh", "softmax"]);
    assert!(report.nodes.iter().all(|n| n.local_violation <= 1.0));
    assert!(report.to_string().contains("all nodes within tolerance"));
}

#[test]
fn verify_names_the_first_divergent_node() {
    let Some(dev) = gpu() else { return };
    // 1e8 followed by 4095 ones: exact ops first, then a sum whose f32 tree on the GPU drops ones
    // that the f64 reference keeps (1e8 + 4032 against 1e8 + 4096, rel. 6e-7). Within the sum's
    // own tolerance (rtol 1e-4) that passes; at tolerance zero verify must blame the sum and no
    // node before it.
    let g = Graph::new();
    let x = g.input("x", [4096]);
    let a = g.mul_scalar(x, 1.0).unwrap();
    let b = g.add_scalar(a, 0.0).unwrap();
    let s = g.sum(b, 0, false).unwrap();
    let mut v = vec![1.0f32; 4096];
    v[0] = 1e8;
    let xs = Tensor::new([4096], v).unwrap();
    assert!(dev.verify(&g, &[s], &[("x", &xs)]).unwrap().ok());
    let report = dev
        .verify_with(&g, &[s], &[("x", &xs)], Some((0.0, 0.0)))
        .unwrap();
    println!("{report}");
    assert_eq!(report.first_divergent, Some(s), "{report}");
    assert!(report.nodes[0].ok && report.nodes[1].ok);
    assert!(report
        .to_string()
        .contains(&format!("first node beyond tolerance: {}", s.0)));
}

#[test]
fn verify_needs_a_gpu_device() {
    let g = Graph::new();
    let x = g.input("x", [1]);
    let y = g.exp(x).unwrap();
    assert!(kiln::Device::cpu()
        .verify(&g, &[y], &[("x", &Tensor::zeros([1]))])
        .is_err());
}

/// Verify also runs the outputs through the plan compiled for them alone, where the plan compiler
/// rewrites (implicit-GEMM convolution and its gradients, split-K, fused elementwise chains), and
/// compares them with the node-by-node run.
#[test]
fn verify_checks_the_lowered_plan_too() {
    use kiln::graph::Conv2dOpts;
    let Some(dev) = gpu() else { return };
    let g = Graph::new();
    let x = g.input("x", [2, 3, 9, 9]);
    let w = g.param_init("verify.conv.w", rand(&[4, 3, 3, 3], 3));
    let b = g.param_init("verify.conv.b", rand(&[4], 4));
    let opts = Conv2dOpts {
        padding: (1, 1),
        ..Default::default()
    };
    let y = g.conv2d_fused(x, w, Some(b), opts, true).unwrap();
    let z = g
        .mul_scalar(g.add_scalar(g.tanh(y).unwrap(), 1.0).unwrap(), 0.5)
        .unwrap();
    let loss = g.mean_all(z).unwrap();
    let grads = g.grad(loss, &[x, w, b]).unwrap();
    let mut outs = vec![loss];
    outs.extend(&grads);
    let report = dev
        .verify(&g, &outs, &[("x", &rand(&[2, 3, 9, 9], 5))])
        .unwrap();
    println!("{report}");
    assert!(report.ok(), "{report}");
    assert_eq!(report.plan_outputs.len(), outs.len());
    assert!(report.to_string().contains("lowered"));
}
