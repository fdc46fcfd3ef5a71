//! Ready-made model definitions, as [`Sequential`] chains with PyTorch parameter names, so that a
//! checkpoint written by the examples (or by `torch.save_file(model.state_dict())` of the same
//! architecture) loads into them by name with [`crate::nn::checkpoint::load`] and
//! [`Sequential::param_names`].
//!
//! Both produce logits `(B, 10)`; add `g.softmax(logits, -1)` for probabilities. Each function
//! draws its initial parameters from [`Init::new(seed)`](Init::new) in the same order as the
//! corresponding example, so the same seed gives the same initial weights.
//!
//! ```no_run
//! # fn main() -> kiln::Result<()> {
//! use std::path::Path;
//! let dev = kiln::Device::new()?;
//! let model = kiln::models::mnist_cnn(0);
//! let g = kiln::Graph::new();
//! let x = g.input("x", [8, 1, 28, 28]);
//! let (logits, _) = model.apply(&g, x, false)?; // evaluation graph: dropout off
//! let probs = g.softmax(logits, -1)?;
//! let mut plan = dev.compile(&g, &[probs])?; // creates the parameters on the device
//! let names = model.param_names();
//! let names: Vec<&str> = names.iter().map(String::as_str).collect();
//! kiln::nn::checkpoint::load(&dev, Path::new("checkpoints/mnist_cnn.safetensors"), &names)?;
//! let out = plan.run(&[("x", &kiln::Tensor::zeros([8, 1, 28, 28]))])?;
//! assert_eq!(out[0].dims(), &[8, 10]);
//! # Ok(()) }
//! ```

use crate::graph::Conv2dOpts;
use crate::nn::{Act, BatchNorm, Conv2d, Init, Linear, Sequential};

/// The MNIST CNN of `examples/mnist_cnn.rs`: images `(B, 1, 28, 28)` to logits `(B, 10)`.
///
/// Conv 32 3x3 (`conv1`) -> ReLU -> MaxPool 2 -> Conv 64 3x3 (`conv2`) -> ReLU -> MaxPool 2 ->
/// Conv 64 3x3 (`conv3`) -> ReLU -> Flatten (576) -> Linear 64 (`fc1`) -> ReLU -> Linear 10
/// (`fc2`); unpadded, stride-1 convolutions. Parameters `conv1.weight [32, 1, 3, 3]`,
/// `conv1.bias [32]`, `conv2.weight [64, 32, 3, 3]`, `conv2.bias`, `conv3.weight [64, 64, 3, 3]`,
/// `conv3.bias`, `fc1.weight [64, 576]`, `fc1.bias`, `fc2.weight [10, 64]`, `fc2.bias`, with
/// PyTorch's default initialisation drawn from `seed` in that order (as the example does).
pub fn mnist_cnn(seed: u64) -> Sequential {
    cnn(seed, false)
}

/// The MNIST CNN of `examples/mnist_cnn.rs --batch-norm`: [`mnist_cnn`] with a BatchNorm2d
/// (`bn1`, `bn2`, `bn3`: weight, bias, running_mean, running_var) between each convolution and
/// its relu. Evaluation graphs (`apply(.., false)`) normalize with the running statistics.
pub fn mnist_cnn_bn(seed: u64) -> Sequential {
    cnn(seed, true)
}

/// The MNIST CNN, with a batch norm after each convolution when `batch_norm`.
fn cnn(seed: u64, batch_norm: bool) -> Sequential {
    let mut init = Init::new(seed);
    let o = Conv2dOpts::default();
    let conv1 = Conv2d::new("conv1", 1, 32, (3, 3), o, &mut init);
    let conv2 = Conv2d::new("conv2", 32, 64, (3, 3), o, &mut init);
    let conv3 = Conv2d::new("conv3", 64, 64, (3, 3), o, &mut init);
    let fc1 = Linear::new("fc1", 64 * 3 * 3, 64, &mut init);
    let fc2 = Linear::new("fc2", 64, 10, &mut init);
    let conv_relu = |s: Sequential, conv: Conv2d, bn: (&str, usize)| {
        let s = s.layer(conv);
        let s = if batch_norm {
            s.layer(BatchNorm::new(bn.0, bn.1))
        } else {
            s
        };
        s.act(Act::Relu)
    };
    let s = conv_relu(Sequential::new(), conv1, ("bn1", 32)) // (B, 32, 26, 26)
        .act(Act::MaxPool(2)); // (B, 32, 13, 13)
    let s = conv_relu(s, conv2, ("bn2", 64)) // (B, 64, 11, 11)
        .act(Act::MaxPool(2)); // (B, 64, 5, 5)
    conv_relu(s, conv3, ("bn3", 64)) // (B, 64, 3, 3)
        .act(Act::Flatten) // (B, 576)
        .layer(fc1)
        .act(Act::Relu)
        .layer(fc2)
}

/// The MNIST multilayer perceptron of `examples/mlp.rs`: inputs `(B, 784)` or images
/// `(B, 1, 28, 28)` (flattened first) to logits `(B, 10)`.
///
/// Flatten -> Linear 64 (`fc1`) -> ReLU -> Dropout 0.5 (salt 1) -> Linear 64 (`fc2`) -> ReLU ->
/// Dropout 0.5 (salt 2) -> Linear 10 (`fc3`). Dropout acts in training graphs only
/// (`apply(.., train = true)`, seeded by the graph's `dropout.seed` input) and is the identity in
/// evaluation graphs. Parameters `fc1.weight [64, 784]`, `fc1.bias`, `fc2.weight [64, 64]`,
/// `fc2.bias`, `fc3.weight [10, 64]`, `fc3.bias`, with PyTorch's default initialisation drawn
/// from `seed` in that order (as the example does).
pub fn mnist_mlp(seed: u64) -> Sequential {
    let mut init = Init::new(seed);
    let fc1 = Linear::new("fc1", 784, 64, &mut init);
    let fc2 = Linear::new("fc2", 64, 64, &mut init);
    let fc3 = Linear::new("fc3", 64, 10, &mut init);
    Sequential::new()
        .act(Act::Flatten) // (B, 784)
        .layer(fc1)
        .act(Act::Relu)
        .act(Act::Dropout(0.5, 1))
        .layer(fc2)
        .act(Act::Relu)
        .act(Act::Dropout(0.5, 2))
        .layer(fc3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Device, Graph, NodeId, Tensor};

    #[test]
    fn shapes_and_names() {
        // (model, state_dict names, trainable parameters): running statistics are not trained
        for (model, names, trained) in [
            (mnist_cnn(0), 10usize, 10usize),
            (mnist_mlp(0), 6, 6),
            (mnist_cnn_bn(0), 22, 16),
        ] {
            let dev = Device::cpu(); // they all name a layer fc1, with different shapes
            assert_eq!(model.param_names().len(), names);
            for train in [false, true] {
                let g = Graph::new();
                let x = g.input("x", [2, 1, 28, 28]);
                let (y, params) = model.apply(&g, x, train).unwrap();
                assert_eq!(g.shape(y).dims(), &[2, 10]);
                assert_eq!(params.len(), trained);
                dev.compile(&g, &[y]).unwrap();
            }
        }
        let g = Graph::new();
        let x = g.input("x", [3, 784]);
        let (y, _) = mnist_mlp(0).apply(&g, x, true).unwrap();
        assert_eq!(g.shape(y).dims(), &[3, 10]);
    }

    /// Runs `forward` on a fixed batch on a fresh CPU device; returns the logits and the
    /// parameters it created, by name.
    fn run(names: &[String], forward: impl Fn(&Graph, NodeId) -> NodeId) -> (Tensor, Vec<Tensor>) {
        let dev = Device::cpu();
        let g = Graph::new();
        let x = g.input("x", [3, 1, 28, 28]);
        let y = forward(&g, x);
        let xs = Tensor::rand_uniform([3, 1, 28, 28], 0.0, 1.0, 42);
        let out = dev.compile(&g, &[y]).unwrap().run(&[("x", &xs)]).unwrap();
        let params = names.iter().map(|n| dev.param(n).unwrap()).collect();
        (out.into_iter().next().unwrap(), params)
    }

    /// The same layers, initial values and forward pass as `examples/mnist_cnn.rs` and
    /// `examples/mlp.rs`, written out op by op as the examples do.
    #[test]
    fn same_as_the_examples() {
        let seed = 3;
        let cnn = mnist_cnn(seed);
        let names = cnn.param_names();
        let (got, got_p) = run(&names, |g, x| cnn.apply(g, x, false).unwrap().0);
        let mut init = Init::new(seed);
        let o = Conv2dOpts::default();
        let c1 = Conv2d::new("conv1", 1, 32, (3, 3), o, &mut init);
        let c2 = Conv2d::new("conv2", 32, 64, (3, 3), o, &mut init);
        let c3 = Conv2d::new("conv3", 64, 64, (3, 3), o, &mut init);
        let f1 = Linear::new("fc1", 576, 64, &mut init);
        let f2 = Linear::new("fc2", 64, 10, &mut init);
        let (want, want_p) = run(&names, |g, x| {
            let pool = |h| g.max_pool2d(h, (2, 2), (2, 2), (0, 0)).unwrap();
            let h = pool(g.relu(c1.apply(g, x).unwrap().0).unwrap());
            let h = pool(g.relu(c2.apply(g, h).unwrap().0).unwrap());
            let h = g
                .flatten(g.relu(c3.apply(g, h).unwrap().0).unwrap())
                .unwrap();
            let h = g.relu(f1.apply(g, h).unwrap().0).unwrap();
            f2.apply(g, h).unwrap().0
        });
        assert_eq!(got.data(), want.data());
        assert_eq!(got_p, want_p);

        let mlp = mnist_mlp(seed);
        let names = mlp.param_names();
        let (got, got_p) = run(&names, |g, x| mlp.apply(g, x, false).unwrap().0);
        let mut init = Init::new(seed);
        let f1 = Linear::new("fc1", 784, 64, &mut init);
        let f2 = Linear::new("fc2", 64, 64, &mut init);
        let f3 = Linear::new("fc3", 64, 10, &mut init);
        let (want, want_p) = run(&names, |g, x| {
            let h = g.reshape(x, &[3, 784]).unwrap();
            let h = g.relu(f1.apply(g, h).unwrap().0).unwrap();
            let h = g.relu(f2.apply(g, h).unwrap().0).unwrap();
            f3.apply(g, h).unwrap().0
        });
        assert_eq!(got.data(), want.data());
        assert_eq!(got_p, want_p);
    }
}
