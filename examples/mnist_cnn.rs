//! Trains the CNN of the seeds on MNIST and reports test accuracy: Conv 32 3x3 relu -> MaxPool 2 ->
//! Conv 64 3x3 relu -> MaxPool 2 -> Conv 64 3x3 relu -> Flatten -> Dense 64 relu -> Dense 10,
//! Adam (lr 1e-3), cross-entropy, batch 64. Each training step is one plan run (forward, backward
//! and Adam update in one submission); the loss is read back every 20 steps.
//!
//! Expected: >= 97% on the 1,000 bundled test digits within 10 epochs of the 8,000 bundled
//! training digits (PyTorch, same architecture and recipe: 96.6-97.4% over three seeds).
//!
//!     cargo run --release --example mnist_cnn                        # 10 epochs, bundled digits
//!     cargo run --release --example mnist_cnn -- --limit 2000 --epochs 3   # under a minute on lavapipe
//!     cargo run --release --example mnist_cnn -- --eval checkpoints/mnist_cnn.safetensors --data DIR
//!     cargo run --release --example mnist_cnn -- --backend cpu --limit 500 --epochs 1
//!     cargo run --release --example mnist_cnn -- --f16 --limit 2000 --epochs 3   # mixed precision
//!     cargo run --release --example mnist_cnn -- --batch-norm --limit 2000 --epochs 3
//!     cargo run --release --example mnist_cnn -- --accumulate 2 --limit 2000 --epochs 3
//!     cargo run --release --example mnist_cnn -- --ema 0.9 --limit 2000 --epochs 3
//!
//! With `--f16` (adapters with SHADER_F16) the convolutions, pooling and dense layers run on f16
//! activations from f32 parameters cast in the graph; the loss, the gradients that reach the
//! parameters and Adam stay f32, as under `torch.autocast`, and the loss is scaled dynamically
//! as by `torch.amp.GradScaler` (each epoch's line gives the scale and the steps skipped for
//! gradients that overflowed f16). Expected: about the f32 run's accuracy (`--limit 2000
//! --epochs 3`: 72.0%, 84.6%, 86.9%, two steps skipped at the initial scale of 65536, 25
//! dispatches; f32 73.0%, 85.6%, 87.7%).
//!
//! With `--batch-norm` a BatchNorm2d (`bn1`..`bn3`, PyTorch's defaults) sits between each
//! convolution and its relu: training steps normalize with the batch's statistics and move the
//! running ones in the same submission; test accuracy is measured in evaluation mode, with the
//! running statistics (`kiln::models::mnist_cnn_bn` is the same network, for `kiln-serve
//! --model mnist_cnn_bn`). Expected: faster convergence; `--batch-norm --limit 2000 --epochs 3`
//! reached 73.3%, 94.3%, 96.4% on lavapipe (without: 73.0%, 85.6%, 87.7%), its step 38
//! dispatches (24 without); with `--f16` too: 74.2%, 94.6%, 96.4%, 40 dispatches (loss
//! scaling's two more; no step skipped).
//!
//! With `--accumulate K` each Adam step accumulates the gradients of K micro-batches of
//! batch / K digits (torch's `(loss / K).backward()` K times, then `step()`): the same
//! updates as whole batches, in less memory. Expected: the accuracy of whole batches;
//! `--accumulate 2 --limit 2000 --epochs 3`: 73.0%, 85.6%, 87.7% (as without), a
//! micro-batch 24 dispatches and the last of a step 26 (a micro-batch's accumulations one
//! kernel), peak 10.3 and 11.0 MB (19.9 MB for batches of 64).
//!
//! `--one-cycle` runs torch's OneCycleLR with `--lr` as its peak (Adam's beta1 cycled too), and
//! `--label-smoothing E` smooths the cross-entropy's target (in the fused loss kernel: 24
//! dispatches, as without).
//! Expected (`--limit 2000 --epochs 3`): `--one-cycle --lr 3e-3` 74.9%, 90.3%, 92.3%;
//! `--label-smoothing 0.1` 74.2%, 87.1%, 89.6% (plain: 73.0%, 85.6%, 87.7%). Test accuracy is
//! counted on the device (`argmax` against the labels, one number read back per batch).
//!
//! `--ema D` keeps torch's `AveragedModel` EMA of the weights (`Optimizer::ema`, one kernel for
//! all ten in the step's plan: 25 dispatches) and reports the test accuracy with the averaged
//! weights too. Expected (`--limit 2000 --epochs 3 --ema 0.9`): 73.0%, 85.6%, 87.7% trained
//! (as without), 66.2%, 85.4%, 89.1% averaged (the average lags early, then leads).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use kiln::data::mnist::{self, Mnist, Split};
use kiln::graph::{Conv2dOpts, CrossEntropyOpts};
use kiln::nn::{
    checkpoint, BatchNorm, Conv2d, GradScaler, Init, Linear, Optimizer, Schedule, TrainStep,
};
use kiln::{DType, Device, Graph, NodeId, Plan};

#[derive(Parser, Debug)]
#[command(about = "Train (or evaluate) the MNIST CNN with kiln")]
struct Args {
    /// gpu, cpu, or auto (KILN_BACKEND, else the best GPU)
    #[arg(long, default_value = "auto")]
    backend: String,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N training digits only
    #[arg(long)]
    limit: Option<usize>,
    /// Folder with train-/t10k- IDX files (raw or .gz); default: the bundled data/mnist
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where to save the trained parameters [default: checkpoints/mnist_cnn.safetensors, or
    /// mnist_cnn_bn.safetensors with --batch-norm]
    #[arg(long)]
    save: Option<PathBuf>,
    /// Evaluate this checkpoint instead of training
    #[arg(long)]
    eval: Option<PathBuf>,
    /// With --eval: an IDX image file (instead of the t10k file in --data)
    #[arg(long)]
    images: Option<PathBuf>,
    /// With --eval: an IDX label file
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Mixed precision: f16 activations and products, f32 parameters, loss and optimizer
    #[arg(long)]
    f16: bool,
    /// A BatchNorm2d after each convolution (bn1..bn3), before its relu
    #[arg(long)]
    batch_norm: bool,
    /// Gradient accumulation: each optimizer step over K micro-batches of batch / K digits
    #[arg(long, default_value_t = 1, value_name = "K")]
    accumulate: usize,
    /// Label smoothing of the cross-entropy (torch's `label_smoothing`)
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// OneCycleLR over the whole run, --lr its peak (torch's defaults: 30% rising from lr / 25,
    /// Adam's beta1 cycled between 0.95 and 0.85)
    #[arg(long)]
    one_cycle: bool,
    /// Keep an exponential moving average of the weights with this decay (torch's
    /// AveragedModel EMA) and report the test accuracy with the averaged weights too
    #[arg(long, value_name = "DECAY")]
    ema: Option<f32>,
}

/// The model's layers (parameters are created on the device the first time a graph uses them).
struct Cnn {
    /// The activations' element type (the layers follow their input's).
    dtype: DType,
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    /// With --batch-norm: one per convolution, between it and its relu.
    bn: Option<[BatchNorm; 3]>,
    fc1: Linear,
    fc2: Linear,
}

impl Cnn {
    fn new(seed: u64, dtype: DType, batch_norm: bool) -> Cnn {
        let mut init = Init::new(seed);
        let o = Conv2dOpts::default();
        Cnn {
            dtype,
            conv1: Conv2d::new("conv1", 1, 32, (3, 3), o, &mut init),
            conv2: Conv2d::new("conv2", 32, 64, (3, 3), o, &mut init),
            conv3: Conv2d::new("conv3", 64, 64, (3, 3), o, &mut init),
            bn: batch_norm.then(|| {
                [("bn1", 32), ("bn2", 64), ("bn3", 64)].map(|(n, c)| BatchNorm::new(n, c))
            }),
            fc1: Linear::new("fc1", 64 * 3 * 3, 64, &mut init),
            fc2: Linear::new("fc2", 64, 10, &mut init),
        }
    }

    fn param_names(&self) -> Vec<String> {
        [&self.conv1, &self.conv2, &self.conv3]
            .iter()
            .flat_map(|c| c.param_names())
            .chain(self.bn.iter().flatten().flat_map(|b| b.param_names()))
            .chain(self.fc1.param_names())
            .chain(self.fc2.param_names())
            .collect()
    }

    /// Logits `(B, 10)` (f32; f16 with `--f16`) for images `x (B, 1, 28, 28)`, and the trainable
    /// parameter nodes; `train` makes batch norms use and update the batch's statistics.
    fn forward(&self, g: &Graph, x: NodeId, train: bool) -> kiln::Result<(NodeId, Vec<NodeId>)> {
        let mut params = Vec::new();
        let x = g.cast(x, self.dtype)?;
        // conv -> relu with bias and relu fused into the matmul, or conv -> batch norm -> relu
        let mut conv_relu = |conv: &Conv2d, k: usize, h: NodeId| -> kiln::Result<NodeId> {
            Ok(match &self.bn {
                None => {
                    let (h, p) = conv.apply_relu(g, h)?;
                    params.extend(p);
                    h
                }
                Some(bn) => {
                    let (h, p) = conv.apply(g, h)?;
                    params.extend(p);
                    let (h, p) = bn[k].apply(g, h, train)?;
                    params.extend(p);
                    g.relu(h)?
                }
            })
        };
        let h = conv_relu(&self.conv1, 0, x)?; // (B, 32, 26, 26)
        let h = g.max_pool2d(h, (2, 2), (2, 2), (0, 0))?; // (B, 32, 13, 13)
        let h = conv_relu(&self.conv2, 1, h)?; // (B, 64, 11, 11)
        let h = g.max_pool2d(h, (2, 2), (2, 2), (0, 0))?; // (B, 64, 5, 5)
        let h = conv_relu(&self.conv3, 2, h)?; // (B, 64, 3, 3)
        let h = g.flatten(h)?; // (B, 576)
        let (h, p) = self.fc1.apply_relu(g, h)?;
        params.extend(p);
        let (logits, p) = self.fc2.apply(g, h)?;
        params.extend(p);
        // f16 logits go straight into the loss, which computes in f32
        Ok((logits, params))
    }
}

/// Plans that count the correct predictions in batches of `size` images on the device
/// (`argmax` of the logits against the labels): one number read back per batch.
fn eval_plan(dev: &Device, model: &Cnn, size: usize) -> kiln::Result<Plan> {
    let g = Graph::new();
    let x = g.input("x", [size, 1, 28, 28]);
    let y = g.input("y", [size]);
    let (logits, _) = model.forward(&g, x, false)?;
    let correct = g.sum_all(g.eq(g.argmax(logits, 1, false)?, y)?)?;
    dev.compile(&g, &[correct])
}

/// Accuracy on a data set, with one plan for full batches and one for the remainder.
fn accuracy(dev: &Device, model: &Cnn, data: &Mnist, batch: usize) -> kiln::Result<f64> {
    let batch = batch.min(data.n).max(1);
    let mut full = eval_plan(dev, model, batch)?;
    let rest = data.n % batch;
    let mut tail = if rest > 0 {
        Some(eval_plan(dev, model, rest)?)
    } else {
        None
    };
    let mut correct = 0usize;
    let mut start = 0;
    while start < data.n {
        let size = batch.min(data.n - start);
        let idx: Vec<usize> = (start..start + size).collect();
        let (x, y) = data.batch(&idx);
        let plan = if size == batch {
            &mut full
        } else {
            tail.as_mut().expect("remainder plan")
        };
        correct += plan.run(&[("x", &x), ("y", &y)])?[0].data()[0] as usize;
        start += size;
    }
    Ok(correct as f64 / data.n as f64)
}

/// [`accuracy`] with the moving averages of the weights (`Optimizer::ema`) in their places,
/// then the trained weights put back.
fn ema_accuracy(dev: &Device, model: &Cnn, data: &Mnist, batch: usize) -> kiln::Result<f64> {
    let mut trained = Vec::new();
    for name in model.param_names() {
        if let Ok(avg) = dev.param(&Optimizer::ema_name(&name)) {
            trained.push((name.clone(), dev.param(&name)?));
            dev.set_param(&name, &avg)?;
        }
    }
    let acc = accuracy(dev, model, data, batch);
    for (name, value) in &trained {
        dev.set_param(name, value)?;
    }
    acc
}

fn device(backend: &str) -> kiln::Result<Device> {
    match backend {
        "cpu" => Ok(Device::cpu()),
        "gpu" => Device::gpu(),
        "auto" => Device::new(),
        other => Err(kiln::Error::Unsupported(format!(
            "--backend {other}: use gpu, cpu or auto"
        ))),
    }
}

fn main() {
    env_logger::init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> kiln::Result<()> {
    let dev = device(&args.backend)?;
    println!("device: {}", dev.describe());
    let data_dir = args
        .data
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data/mnist"));
    let dtype = if args.f16 { DType::F16 } else { DType::F32 };
    let model = Cnn::new(args.seed, dtype, args.batch_norm);
    let save = args.save.clone().unwrap_or_else(|| {
        let stem = if args.batch_norm {
            "mnist_cnn_bn"
        } else {
            "mnist_cnn"
        };
        PathBuf::from(format!("checkpoints/{stem}.safetensors"))
    });

    if let Some(ckpt) = &args.eval {
        let test = match (&args.images, &args.labels) {
            (Some(i), Some(l)) => mnist::load(i, l)?,
            (None, None) => mnist::load_split(&data_dir, Split::Test)?,
            _ => {
                return Err(kiln::Error::Input(
                    "--images and --labels go together".into(),
                ))
            }
        };
        let names = model.param_names();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        checkpoint::load(&dev, ckpt, &refs)?;
        let acc = accuracy(&dev, &model, &test, 100)?;
        println!(
            "{}: accuracy {:.2}% on {} digits",
            ckpt.display(),
            acc * 100.0,
            test.n
        );
        return Ok(());
    }

    let mut train = mnist::load_split(&data_dir, Split::Train)?;
    if let Some(n) = args.limit {
        train = train.limit(n);
    }
    let test = mnist::load_split(&data_dir, Split::Test)?;
    println!("training on {} digits, testing on {}", train.n, test.n);
    if train.n < args.batch {
        return Err(kiln::Error::Input(format!(
            "{} training digits are fewer than one batch of {}",
            train.n, args.batch
        )));
    }

    let k = args.accumulate;
    if k == 0 || !args.batch.is_multiple_of(k) {
        return Err(kiln::Error::Input(format!(
            "--accumulate {k} must divide the batch of {}",
            args.batch
        )));
    }
    let micro = args.batch / k;
    let g = Graph::new();
    let x = g.input("x", [micro, 1, 28, 28]);
    let y = g.input("y", [micro]);
    let (logits, params) = model.forward(&g, x, true)?;
    let opts = CrossEntropyOpts {
        label_smoothing: args.label_smoothing,
        ..Default::default()
    };
    let loss = g.cross_entropy_with(logits, y, opts)?;
    let mut optimizer = Optimizer::adam(args.lr);
    if args.one_cycle {
        let total = (args.epochs * (train.n / args.batch)) as u64;
        optimizer = optimizer.schedule(Schedule::one_cycle(total.max(1)));
    }
    if let Some(decay) = args.ema {
        optimizer = optimizer.ema(decay);
    }
    if args.f16 {
        // mixed precision's small f16 gradients: dynamic loss scaling, as torch.amp.GradScaler
        optimizer = optimizer.grad_scaler(GradScaler::default());
    }
    let mut step = TrainStep::with_accumulation(&dev, &g, loss, &params, optimizer, args.seed, k)?;
    println!("training step plan: {}", step.plan().info());
    for plan in step.micro_plans() {
        println!("micro-batch plan: {}", plan.info());
    }

    let mut shuffle = Init::new(args.seed ^ 0x5eed);
    // the last partial batch is dropped, as drop_last=True; with --accumulate, steps are
    // micro-batches, K of them per optimizer step
    let steps_per_epoch = train.n / args.batch * k;
    let mut best = 0.0f64;
    for epoch in 1..=args.epochs {
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", args.epochs));
        let order = shuffle.permutation(train.n);
        let started = Instant::now();
        let (mut loss_sum, mut loss_count) = (0.0f64, 0usize);
        for s in 0..steps_per_epoch {
            let (xb, yb) = train.batch(&order[s * micro..(s + 1) * micro]);
            let want = s % 20 == 19 || s + 1 == steps_per_epoch;
            if let Some(l) = step.step(&[("x", &xb), ("y", &yb)], want)? {
                loss_sum += l as f64;
                loss_count += 1;
                let ips = ((s + 1) * micro) as f64 / started.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "loss {:.4} | {:.0} images/s",
                    loss_sum / loss_count as f64,
                    ips
                ));
            }
            bar.inc(1);
        }
        bar.finish();
        let secs = started.elapsed().as_secs_f64();
        let acc = accuracy(&dev, &model, &test, 100)?;
        best = best.max(acc);
        let ema = match args.ema {
            Some(_) => format!(
                " (EMA {:.2}%)",
                ema_accuracy(&dev, &model, &test, 100)? * 100.0
            ),
            None => String::new(),
        };
        println!(
            "epoch {epoch}: loss {:.4}, test accuracy {:.2}%{ema}, {:.1} s, {:.0} images/s{}",
            loss_sum / loss_count.max(1) as f64,
            acc * 100.0,
            secs,
            (steps_per_epoch * micro) as f64 / secs,
            match step.scaler_state()? {
                Some(s) => format!(
                    ", loss scale {} ({} of {} steps skipped)",
                    s.scale,
                    step.optimizer().steps() - s.steps_taken,
                    step.optimizer().steps()
                ),
                None => String::new(),
            }
        );
    }
    if let Some(dir) = save.parent() {
        std::fs::create_dir_all(dir).map_err(|e| kiln::Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
    }
    let names = model.param_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    checkpoint::save(&dev, &refs, &save)?;
    println!(
        "saved {} (best test accuracy {:.2}%)",
        save.display(),
        best * 100.0
    );
    Ok(())
}
