//! Linear regression: fits `y = w x + b` to 1,000 seeded points `y = 3x + noise`
//! (`x` uniform in [-1, 1], Gaussian noise of std 0.1) with one `Linear(1, 1)` layer named `fc`,
//! the mean squared error and plain SGD (lr 0.1, batch 50), reshuffling every epoch.
//!
//! Expected: the loss falls to about 0.01 (the noise variance) within a few epochs and the fitted
//! slope ends within 1% of 3 (about 3.00 +- 0.01; the least-squares fit of the same points is
//! printed beside it) and the bias near 0. The example checks the slope at the end and fails
//! otherwise. The weights are saved to `checkpoints/linear_regression.safetensors`
//! (`fc.weight`, `fc.bias`).
//!
//!     cargo run --release --example linear_regression -- [--backend gpu|cpu] [--epochs 20]

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use common::{Backend, EvalPlans, Failure};
use kiln::nn::{Init, Linear, Optimizer, TrainStep};
use kiln::{Graph, Tensor};
use rand::{Rng, SeedableRng};

/// The slope the data is drawn with.
const TRUE_SLOPE: f32 = 3.0;

#[derive(Parser, Debug)]
#[command(about = "Fit y = 3x + noise with one Linear(1, 1) layer, MSE and SGD")]
struct Args {
    /// Where to train (default: Device::new(), which honours KILN_BACKEND).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Passes over the data.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Seeds the data, the initial weights and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the trained weights (safetensors).
    #[arg(long, default_value = "checkpoints/linear_regression.safetensors")]
    save: PathBuf,
    /// Number of points.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    points: u32,
    /// Standard deviation of the noise.
    #[arg(long, default_value_t = 0.1)]
    noise: f32,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    /// Training batch size.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
}

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if !(args.noise.is_finite() && args.noise >= 0.0) {
        return Err(format!("--noise must be a finite number >= 0, got {}", args.noise).into());
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(format!("--lr must be a finite number > 0, got {}", args.lr).into());
    }
    let dev = common::device(args.backend)?;

    // the data: x uniform in [-1, 1], y = 3x + N(0, noise^2)
    let n = args.points as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let xs: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..=1.0)).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|&x| TRUE_SLOPE * x + args.noise * common::normal(&mut rng))
        .collect();
    let (ols_w, ols_b) = least_squares(&xs, &ys);
    println!(
        "{n} points y = {TRUE_SLOPE}x + N(0, {}^2); least squares: slope {ols_w:.4}, bias {ols_b:.4}",
        args.noise
    );
    // a batch of points as (len, 1) tensors
    let gather = |idx: &mut dyn Iterator<Item = usize>| -> kiln::Result<(Tensor, Tensor)> {
        let (x, y): (Vec<f32>, Vec<f32>) = idx.map(|i| (xs[i], ys[i])).unzip();
        let len = x.len();
        Ok((Tensor::new([len, 1], x)?, Tensor::new([len, 1], y)?))
    };

    // the model and its training step: forward, MSE, backward and the SGD update in one plan
    let mut init = Init::new(args.seed);
    let fc = Linear::new("fc", 1, 1, &mut init);
    let batch = (args.batch_size as usize).min(n);
    let g = Graph::new();
    let x = g.input("x", [batch, 1]);
    let y = g.input("y", [batch, 1]);
    let (pred, params) = fc.apply(&g, x)?;
    let loss = g.mse_loss(pred, y)?;
    let mut train = TrainStep::new(&dev, &g, loss, &params, Optimizer::sgd(args.lr), args.seed)?;

    // evaluation: predictions for every point, 256 at a time (plus a plan for the remainder)
    let mut eval = EvalPlans::new(&dev, n, 256, |b| {
        let g = Graph::new();
        let x = g.input("x", [b, 1]);
        let (pred, _) = fc.apply(&g, x)?;
        Ok((g, vec![pred]))
    })?;

    let mut shuffle = Init::new(args.seed.wrapping_add(1));
    let steps = n / batch;
    for epoch in 1..=args.epochs {
        let t0 = Instant::now();
        let order = shuffle.permutation(n);
        let label = format!("epoch {epoch}/{}", args.epochs);
        let running = common::train_epoch(&mut train, &order, batch, 5, &label, |idx| {
            let (x, y) = gather(&mut idx.iter().copied())?;
            Ok(vec![("x", x), ("y", y)])
        })?;
        // the full-data MSE with the weights after this epoch
        let mut sse = 0.0f64;
        eval.run(
            |r| Ok(vec![("x", gather(&mut r.clone())?.0)]),
            |r, out| {
                for (p, &t) in out[0].data().iter().zip(&ys[r]) {
                    sse += f64::from(p - t).powi(2);
                }
            },
        )?;
        let (w, b) = fitted(&dev)?;
        println!(
            "epoch {epoch:>3}/{}: train loss {running:.5} (running, {steps} steps), \
             mse {:.5}, slope {w:.4}, bias {b:+.4} ({:.2} s)",
            args.epochs,
            sse / n as f64,
            t0.elapsed().as_secs_f64()
        );
    }

    let (w, b) = fitted(&dev)?;
    println!("fitted: y = {w:.4} x {b:+.4} (least squares: {ols_w:.4} x {ols_b:+.4})");
    common::save_checkpoint(&dev, &fc.param_names(), &args.save)?;
    let rel = (w - TRUE_SLOPE).abs() / TRUE_SLOPE;
    if rel.is_nan() || rel > 0.01 {
        return Err(format!(
            "the fitted slope {w:.4} is {:.2}% away from {TRUE_SLOPE} (more than 1%)",
            100.0 * rel
        )
        .into());
    }
    println!(
        "ok: the slope is within {:.2}% of {TRUE_SLOPE} (target: 1%)",
        100.0 * rel
    );
    Ok(())
}

/// The layer's slope and bias, read back from the device.
fn fitted(dev: &kiln::Device) -> kiln::Result<(f32, f32)> {
    Ok((
        dev.param("fc.weight")?.data()[0],
        dev.param("fc.bias")?.data()[0],
    ))
}

/// The closed-form least-squares line through the points.
fn least_squares(xs: &[f32], ys: &[f32]) -> (f32, f32) {
    let n = xs.len() as f64;
    let mx = xs.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let my = ys.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (&x, &y) in xs.iter().zip(ys) {
        sxy += (f64::from(x) - mx) * (f64::from(y) - my);
        sxx += (f64::from(x) - mx).powi(2);
    }
    let w = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (w as f32, (my - w * mx) as f32)
}
