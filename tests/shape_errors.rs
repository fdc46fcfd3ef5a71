//! Shape errors are raised when a node is added and name the op and the shapes. No GPU needed.

use kiln::{Error, Graph};

fn msg(e: Error) -> String {
    assert!(
        matches!(e, Error::Shape { .. }),
        "expected a shape error, got {e:?}"
    );
    e.to_string()
}

#[test]
fn matmul_inner_dimensions() {
    let g = Graph::new();
    let a = g.input("a", [3, 4]);
    let b = g.input("b", [5, 6]);
    assert_eq!(
        msg(g.matmul(a, b).unwrap_err()),
        "matmul: [3, 4] x [5, 6]: inner dimensions 4 and 5 differ"
    );
    let v = g.input("v", [4]);
    assert!(msg(g.matmul(a, v).unwrap_err()).contains("rank >= 2"));
    let c = g.input("c", [2, 4, 6]);
    let d = g.input("d", [3, 6, 2]);
    assert!(msg(g.matmul(c, d).unwrap_err()).contains("batch axes [2] and [3] do not broadcast"));
    assert!(msg(g.matmul_t(a, b, false, true).unwrap_err())
        .contains("[3, 4] x [5, 6]^T: inner dimensions 4 and 6 differ"));
}

#[test]
fn broadcasting() {
    let g = Graph::new();
    let a = g.input("a", [2, 3]);
    let b = g.input("b", [4]);
    let e = msg(g.add(a, b).unwrap_err());
    assert!(e.starts_with("add: [2, 3] and [4] do not broadcast"), "{e}");
    assert!(msg(g.mul(a, g.input("c", [3, 3])).unwrap_err()).starts_with("mul: "));
}

#[test]
fn axes_and_layout() {
    let g = Graph::new();
    let x = g.input("x", [2, 3]);
    assert_eq!(
        msg(g.softmax(x, 2).unwrap_err()),
        "softmax: axis 2 is out of range for shape [2, 3]"
    );
    assert!(msg(g.sum(x, -3, false).unwrap_err()).starts_with("sum: axis -3"));
    assert!(msg(g.permute(x, &[0, 0]).unwrap_err()).contains("not a permutation"));
    assert!(msg(g.permute(x, &[0]).unwrap_err()).contains("has 1 axes"));
    assert!(msg(g.reshape(x, &[4, 2]).unwrap_err()).contains("6 elements cannot become 8"));
    assert!(msg(g.reshape(x, &[-1, -1]).unwrap_err()).starts_with("reshape"));
    assert!(msg(g.reshape(x, &[4, -1]).unwrap_err()).contains("do not divide"));
    assert!(msg(g.add_scalar(x, f32::NAN).unwrap_err()).contains("finite"));
}

#[test]
fn compile_time_errors_are_errors() {
    let dev = kiln::Device::cpu();
    let g = Graph::new();
    let x = g.input("x", [0, 3]);
    let y = g.relu(x).unwrap();
    assert!(dev
        .compile(&g, &[y])
        .err()
        .unwrap()
        .to_string()
        .contains("zero-sized"));

    let g = Graph::new();
    let a = g.input("x", [2]);
    let b = g.input("x", [2]);
    let y = g.add(a, b).unwrap();
    assert!(matches!(dev.compile(&g, &[y]), Err(Error::Input(_))));

    let g = Graph::new();
    let w = g.param_init("w", kiln::Tensor::zeros([2, 2]));
    let y = g.relu(w).unwrap();
    dev.compile(&g, &[y]).unwrap();
    let g2 = Graph::new();
    let w2 = g2.param("w", [3]);
    let e = dev.compile(&g2, &[w2]).err().unwrap();
    assert!(matches!(e, Error::Param(_)), "{e}");
}

#[test]
fn tensor_construction() {
    assert!(matches!(
        kiln::Tensor::new([2, 2], vec![1.0; 3]),
        Err(Error::Tensor(_))
    ));
}
