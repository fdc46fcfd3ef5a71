//! Logistic regression: separates two seeded Gaussian blobs in the plane (class 0 around
//! (-1, 2), class 1 around (2, -1), std 1 on each axis; 1,000 training and 500 held-out points,
//! half of each class) with one `Linear(2, 1)` layer named `fc`, `bce_with_logits` and plain SGD
//! (lr 0.1, batch 50), reshuffling every epoch.
//!
//! Expected: the blobs overlap a little (the best possible boundary errs on about 1.7% of
//! points), so the training and held-out accuracies climb to about 98% within a few epochs and
//! the loss to about 0.06. The example checks that the held-out accuracy is at least 95% and fails
//! otherwise. The weights are saved to `checkpoints/logistic_regression.safetensors`
//! (`fc.weight`, `fc.bias`).
//!
//!     cargo run --release --example logistic_regression -- [--backend gpu|cpu] [--epochs 20]

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use common::{Backend, EvalPlans, Failure};
use kiln::nn::{Init, Linear, Optimizer, TrainStep};
use kiln::{Graph, Tensor};
use rand::SeedableRng;

/// The centres of the two classes.
const CENTRES: [[f32; 2]; 2] = [[-1.0, 2.0], [2.0, -1.0]];
/// The held-out accuracy the example must reach.
const TARGET: f64 = 0.95;

#[derive(Parser, Debug)]
#[command(about = "Separate two Gaussian blobs with Linear(2, 1), BCE-with-logits and SGD")]
struct Args {
    /// Where to train (default: Device::new(), which honours KILN_BACKEND).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Passes over the training points.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Seeds the data, the initial weights and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the trained weights (safetensors).
    #[arg(long, default_value = "checkpoints/logistic_regression.safetensors")]
    save: PathBuf,
    /// Training points (half of each class; the held-out set has half as many).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(2..))]
    points: u32,
    /// Standard deviation of each blob along each axis.
    #[arg(long, default_value_t = 1.0)]
    spread: f32,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// Training batch size.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
}

/// Points `(n, 2)` row-major and their classes (0.0 or 1.0).
struct Blobs {
    xy: Vec<f32>,
    label: Vec<f32>,
}

impl Blobs {
    /// `n` points, alternating classes, from `rng`.
    fn sample(n: usize, spread: f32, rng: &mut impl rand::Rng) -> Blobs {
        let mut xy = Vec::with_capacity(2 * n);
        let mut label = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % 2;
            for centre in CENTRES[c] {
                xy.push(centre + spread * common::normal(rng));
            }
            label.push(c as f32);
        }
        Blobs { xy, label }
    }

    fn len(&self) -> usize {
        self.label.len()
    }

    /// The points at `idx` as `x (B, 2)` and `y (B, 1)`.
    fn batch(&self, idx: impl Iterator<Item = usize>) -> kiln::Result<(Tensor, Tensor)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in idx {
            x.extend_from_slice(&self.xy[2 * i..2 * i + 2]);
            y.push(self.label[i]);
        }
        let b = y.len();
        Ok((Tensor::new([b, 2], x)?, Tensor::new([b, 1], y)?))
    }
}

/// Mean BCE and accuracy of a set, from the evaluation plans.
fn evaluate(eval: &mut EvalPlans, set: &Blobs) -> kiln::Result<(f64, f64)> {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    eval.run(
        |r| Ok(vec![("x", set.batch(r)?.0)]),
        |r, out| {
            for (&z, &t) in out[0].data().iter().zip(&set.label[r]) {
                let (z, t) = (f64::from(z), f64::from(t));
                // softplus(z) - z t, stable
                loss += z.max(0.0) + (-z.abs()).exp().ln_1p() - z * t;
                correct += usize::from((z > 0.0) == (t > 0.5));
            }
        },
    )?;
    let n = set.len() as f64;
    Ok((loss / n, correct as f64 / n))
}

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if !(args.spread.is_finite() && args.spread > 0.0) {
        return Err(format!("--spread must be a finite number > 0, got {}", args.spread).into());
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(format!("--lr must be a finite number > 0, got {}", args.lr).into());
    }
    let dev = common::device(args.backend)?;

    let n = args.points as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let train_set = Blobs::sample(n, args.spread, &mut rng);
    let test_set = Blobs::sample(n.div_ceil(2), args.spread, &mut rng);
    println!(
        "two blobs around {:?} and {:?}, std {}: {} training and {} held-out points",
        CENTRES[0],
        CENTRES[1],
        args.spread,
        train_set.len(),
        test_set.len()
    );

    let mut init = Init::new(args.seed);
    let fc = Linear::new("fc", 2, 1, &mut init);
    let batch = (args.batch_size as usize).min(n);
    let g = Graph::new();
    let x = g.input("x", [batch, 2]);
    let y = g.input("y", [batch, 1]);
    let (logits, params) = fc.apply(&g, x)?;
    let loss = g.bce_with_logits(logits, y)?;
    let mut train = TrainStep::new(&dev, &g, loss, &params, Optimizer::sgd(args.lr), args.seed)?;

    // evaluation: the logits, 256 points at a time (plus a plan for each set's remainder)
    let build = |b: usize| {
        let g = Graph::new();
        let x = g.input("x", [b, 2]);
        let (logits, _) = fc.apply(&g, x)?;
        Ok((g, vec![logits]))
    };
    let mut eval_train = EvalPlans::new(&dev, train_set.len(), 256, build)?;
    let mut eval_test = EvalPlans::new(&dev, test_set.len(), 256, build)?;

    let mut shuffle = Init::new(args.seed.wrapping_add(1));
    let mut test_acc = 0.0;
    for epoch in 1..=args.epochs {
        let t0 = Instant::now();
        let order = shuffle.permutation(n);
        let label = format!("epoch {epoch}/{}", args.epochs);
        let running = common::train_epoch(&mut train, &order, batch, 5, &label, |idx| {
            let (x, y) = train_set.batch(idx.iter().copied())?;
            Ok(vec![("x", x), ("y", y)])
        })?;
        let (train_loss, train_acc) = evaluate(&mut eval_train, &train_set)?;
        let (test_loss, acc) = evaluate(&mut eval_test, &test_set)?;
        test_acc = acc;
        println!(
            "epoch {epoch:>3}/{}: train loss {running:.4} (running), full-set loss {train_loss:.4}, \
             train acc {:.2}%, held-out loss {test_loss:.4}, held-out acc {:.2}% ({:.2} s)",
            args.epochs,
            100.0 * train_acc,
            100.0 * test_acc,
            t0.elapsed().as_secs_f64()
        );
    }

    let (w, b) = (dev.param("fc.weight")?, dev.param("fc.bias")?);
    let (w, b) = (w.data(), b.data()[0]);
    println!("boundary: {:.4} x1 {:+.4} x2 {b:+.4} = 0", w[0], w[1]);
    common::save_checkpoint(&dev, &fc.param_names(), &args.save)?;
    report(test_acc)
}

/// Succeeds when the held-out accuracy reaches the target.
fn report(acc: f64) -> Result<(), Failure> {
    if acc >= TARGET {
        println!(
            "ok: held-out accuracy {:.2}% >= {:.0}%",
            100.0 * acc,
            100.0 * TARGET
        );
        Ok(())
    } else {
        Err(format!(
            "held-out accuracy {:.2}% is below the target of {:.0}%",
            100.0 * acc,
            100.0 * TARGET
        )
        .into())
    }
}
