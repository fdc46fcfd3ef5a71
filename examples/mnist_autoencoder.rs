//! A convolutional autoencoder on MNIST: each digit is squeezed through a 32 x 7 x 7 code and
//! rebuilt. The encoder is a strided convolution and a depthwise-separable block (a depthwise
//! 3x3 convolution, `groups = 16`, then a pointwise 1x1 one, as MobileNet's); the decoder two
//! transposed convolutions that double the extents (`ConvTranspose2d(.., 4, stride=2,
//! padding=1)`, as DCGAN's generator):
//!
//! ```text
//! x (B, 1, 28, 28) -> enc1 Conv 16 3x3 /2 relu -> (B, 16, 14, 14)
//!                  -> enc2 depthwise 3x3 /2 relu -> (B, 16, 7, 7) -> enc3 Conv 32 1x1 relu
//!                  -> dec1 ConvTranspose 16 4x4 x2 relu -> (B, 16, 14, 14)
//!                  -> dec2 ConvTranspose 1 4x4 x2 -> logits (B, 1, 28, 28)
//! ```
//!
//! trained with Adam (lr 1e-2), batches of 64, per-pixel binary cross-entropy on logits against
//! the digit itself (pixels in [0, 1]). Each step is one plan run (forward, backward, update).
//! Every epoch prints the training loss, the test loss and, for scale, the test loss of
//! predicting every digit as the training set's mean image; at the end one test digit and its
//! reconstruction are drawn in text.
//!
//! Expected: the test loss falls below 0.10 within 3 epochs of 2,000 digits and the
//! reconstruction is recognisably the digit (`--limit 2000 --epochs 3` on lavapipe: test loss
//! 0.1699, 0.1150, 0.0960 against the mean image's 0.2633, 33 dispatches per step, peak 6.7 MB
//! (35 and 6.9 MB before the transposed convolutions' bias and relu ran in their GEMMs);
//! the default 5 epochs of all 8,000 digits: 0.0841, 0.0721, 0.0704, 0.0693, 0.0680).
//!
//!     cargo run --release --example mnist_autoencoder -- [--epochs 5] [--limit N] [--backend cpu]

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use clap::Parser;
use common::{Backend, EvalPlans, Failure};
use kiln::data::mnist::Mnist;
use kiln::graph::Conv2dOpts;
use kiln::nn::{Conv2d, ConvTranspose2d, Init, Optimizer, TrainStep};
use kiln::ops::conv::ConvTranspose2dOpts;
use kiln::{Graph, NodeId, Tensor};

/// Evaluation batch size.
const EVAL_BATCH: usize = 500;
/// The test loss the recipe should pass within 3 epochs of 2,000 digits.
const TARGET: f64 = 0.10;

#[derive(Parser, Debug)]
#[command(
    about = "Train a convolutional autoencoder on MNIST (depthwise and transposed convolutions)"
)]
struct Args {
    /// Where to train (default: Device::new(), which honours KILN_BACKEND).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Passes over the training digits.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Seeds the initial weights and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder with the MNIST IDX files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"))]
    data: PathBuf,
    /// Train on the first N training digits only.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// Training batch size.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 1e-2)]
    lr: f32,
    /// Where to write the trained weights (safetensors).
    #[arg(long, default_value = "checkpoints/mnist_autoencoder.safetensors")]
    save: PathBuf,
}

/// The network's layers, with torch's names and initialisation.
struct Autoencoder {
    enc1: Conv2d,
    enc2: Conv2d,
    enc3: Conv2d,
    dec1: ConvTranspose2d,
    dec2: ConvTranspose2d,
}

impl Autoencoder {
    fn new(seed: u64) -> kiln::Result<Autoencoder> {
        let mut init = Init::new(seed);
        let down = Conv2dOpts {
            stride: (2, 2),
            padding: (1, 1),
            ..Default::default()
        };
        let up = ConvTranspose2dOpts {
            stride: (2, 2),
            padding: (1, 1),
            ..Default::default()
        };
        Ok(Autoencoder {
            enc1: Conv2d::new("enc1", 1, 16, (3, 3), down, &mut init),
            enc2: Conv2d::grouped("enc2", 16, 16, (3, 3), down, 16, &mut init)?,
            enc3: Conv2d::new("enc3", 16, 32, (1, 1), Conv2dOpts::default(), &mut init),
            dec1: ConvTranspose2d::new("dec1", 32, 16, (4, 4), up, 1, &mut init)?,
            dec2: ConvTranspose2d::new("dec2", 16, 1, (4, 4), up, 1, &mut init)?,
        })
    }

    /// The reconstruction's logits `(B, 1, 28, 28)` of digits `x (B, 1, 28, 28)`, and the
    /// parameter nodes.
    fn forward(&self, g: &Graph, x: NodeId) -> kiln::Result<(NodeId, Vec<NodeId>)> {
        let mut params = Vec::new();
        let (h, p) = self.enc1.apply_relu(g, x)?;
        params.extend(p);
        let (h, p) = self.enc2.apply_relu(g, h)?;
        params.extend(p);
        let (code, p) = self.enc3.apply_relu(g, h)?;
        params.extend(p);
        let (h, p) = self.dec1.apply(g, code)?;
        params.extend(p);
        let (logits, p) = self.dec2.apply(g, g.relu(h)?)?;
        params.extend(p);
        Ok((logits, params))
    }

    fn param_names(&self) -> Vec<String> {
        [&self.enc1, &self.enc2, &self.enc3]
            .iter()
            .flat_map(|c| c.param_names())
            .chain(
                [&self.dec1, &self.dec2]
                    .iter()
                    .flat_map(|d| d.param_names()),
            )
            .collect()
    }
}

/// Mean binary cross-entropy of logits `z` against pixels `p`: `softplus(z) - z p`, as
/// `binary_cross_entropy_with_logits` computes it.
fn bce(z: f32, p: f32) -> f64 {
    let z = f64::from(z);
    z.max(0.0) + (-z.abs()).exp().ln_1p() - z * f64::from(p)
}

/// The mean test loss of the reconstructions, and the logits of the first test digit.
fn test_loss(eval: &mut EvalPlans, set: &Mnist) -> kiln::Result<(f64, Vec<f32>)> {
    let (mut sum, mut first) = (0.0f64, Vec::new());
    eval.run(
        |r| {
            let idx: Vec<usize> = r.collect();
            Ok(vec![("x", set.batch(&idx).0)])
        },
        |r, out| {
            let px = &set.images[r.start * 784..r.end * 784];
            sum += out[0]
                .data()
                .iter()
                .zip(px)
                .map(|(&z, &p)| bce(z, p))
                .sum::<f64>();
            if r.start == 0 {
                first = out[0].data()[..784].to_vec();
            }
        },
    )?;
    Ok((sum / (set.n * 784) as f64, first))
}

/// A 28 x 28 image in text, two pixels per character row (rows 2k and 2k + 1 averaged).
fn draw(pixels: &[f32]) -> Vec<String> {
    (0..14)
        .map(|r| {
            (0..28)
                .map(|c| {
                    let v = (pixels[2 * r * 28 + c] + pixels[(2 * r + 1) * 28 + c]) / 2.0;
                    [' ', '.', ':', '+', '#'][((v * 4.99) as usize).min(4)]
                })
                .collect()
        })
        .collect()
}

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(format!("--lr must be a finite number > 0, got {}", args.lr).into());
    }
    let batch = args.batch_size as usize;
    let (train_set, test_set) =
        common::load_mnist(&args.data, args.limit.map(|n| n as usize), batch)?;
    let dev = common::device(args.backend)?;
    let model = Autoencoder::new(args.seed)?;

    // training: reconstruct, BCE against the input, backward and Adam in one plan
    let g = Graph::new();
    let x = g.input("x", [batch, 1, 28, 28]);
    let (logits, params) = model.forward(&g, x)?;
    let loss = g.bce_with_logits(logits, x)?;
    let mut train = TrainStep::new(&dev, &g, loss, &params, Optimizer::adam(args.lr), args.seed)?;
    println!("training plan: {}", train.plan().info());

    let mut eval = EvalPlans::new(&dev, test_set.n, EVAL_BATCH, |b| {
        let g = Graph::new();
        let x = g.input("x", [b, 1, 28, 28]);
        let (logits, _) = model.forward(&g, x)?;
        Ok((g, vec![logits]))
    })?;

    // the loss of predicting the training set's mean image for every test digit
    let mut mean = vec![0f64; 784];
    for img in train_set.images.chunks_exact(784) {
        for (m, &p) in mean.iter_mut().zip(img) {
            *m += f64::from(p) / train_set.n as f64;
        }
    }
    let logit = |m: f64| {
        let m = m.clamp(1e-6, 1.0 - 1e-6);
        (m / (1.0 - m)).ln() as f32
    };
    let baseline = test_set
        .images
        .chunks_exact(784)
        .flat_map(|img| img.iter().zip(&mean).map(|(&p, &m)| bce(logit(m), p)))
        .sum::<f64>()
        / (test_set.n * 784) as f64;

    let mut shuffle = Init::new(args.seed.wrapping_add(1));
    let (mut last, mut reached) = (Vec::new(), None);
    for epoch in 1..=args.epochs {
        let t0 = std::time::Instant::now();
        let order = shuffle.permutation(train_set.n);
        let label = format!("epoch {epoch}/{}", args.epochs);
        let running = common::train_epoch(&mut train, &order, batch, 25, &label, |idx| {
            Ok(vec![("x", train_set.batch(idx).0)])
        })?;
        let secs = t0.elapsed().as_secs_f64();
        let (test, first) = test_loss(&mut eval, &test_set)?;
        if test < TARGET && reached.is_none() {
            reached = Some(epoch);
        }
        println!(
            "epoch {epoch}/{}: train loss {running:.4}, test loss {test:.4} (mean image \
             {baseline:.4}), {secs:.1} s training",
            args.epochs
        );
        last = first;
    }
    match reached {
        Some(e) => println!("test loss below {TARGET} at epoch {e}"),
        None => println!("test loss not below {TARGET} in {} epochs", args.epochs),
    }
    let recon: Vec<f32> = last.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
    let digit = Tensor::new([784], test_set.images[..784].to_vec())?;
    println!(
        "first test digit (a {}) and its reconstruction:",
        test_set.labels[0]
    );
    for (a, b) in draw(digit.data()).iter().zip(draw(&recon)) {
        println!("  |{a}|   |{b}|");
    }
    common::save_checkpoint(&dev, &model.param_names(), &args.save)?;
    Ok(())
}
