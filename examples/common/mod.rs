//! Shared by the training examples (`linear_regression`, `logistic_regression`, `mlp`,
//! `sequential_mnist`, `seq2seq`, `char_lm`, `transformer_lm`): the `--backend` choice, an
//! error type that prints its message, seeded Gaussian samples, the epoch loop over a
//! [`TrainStep`] with an indicatif progress bar, evaluation plans compiled once for a fixed
//! batch size (plus one for the remainder), checkpoint saving, the language models' text
//! ([`Corpus`]) and reports, and small host-side helpers for reading logits back (argmax,
//! negative log-likelihood, one-hot rows, temperature sampling).
#![allow(dead_code)]

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kiln::nn::TrainStep;
use kiln::{Device, Graph, NodeId, Plan, Tensor};
use rand::Rng;

/// Where to train: `--backend gpu|cpu`; without the flag, `Device::new()` (KILN_BACKEND applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// A wgpu adapter (`Device::gpu()`), an error when there is none.
    Gpu,
    /// The CPU reference backend (`Device::cpu()`).
    Cpu,
}

/// The device asked for, with a line saying which it is.
pub fn device(backend: Option<Backend>) -> kiln::Result<Device> {
    let dev = match backend {
        Some(Backend::Gpu) => Device::gpu()?,
        Some(Backend::Cpu) => Device::cpu(),
        None => Device::new()?,
    };
    println!("device: {}", dev.describe());
    Ok(dev)
}

/// What a failed example prints: `Error: <message>` (as `main`'s error), exit status 1.
pub struct Failure(String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<kiln::Error> for Failure {
    fn from(e: kiln::Error) -> Self {
        Failure(e.to_string())
    }
}

impl From<String> for Failure {
    fn from(msg: String) -> Self {
        Failure(msg)
    }
}

impl From<&str> for Failure {
    fn from(msg: &str) -> Self {
        Failure(msg.to_string())
    }
}

/// A sample of the standard normal distribution (Box-Muller).
pub fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln is finite
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Inputs of a plan run by name, owned (a batch built on the host).
pub type Feed = Vec<(&'static str, Tensor)>;

fn borrow(feed: &Feed) -> Vec<(&str, &Tensor)> {
    feed.iter().map(|(n, t)| (*n, t)).collect()
}

/// One epoch of training: steps over `order` in batches of `batch` (a last partial batch is
/// dropped: the training plan has a fixed batch size, and the order is reshuffled every epoch),
/// reading the loss back every `log_every` steps and at the last step. Shows a progress bar with
/// the running loss (the mean of the losses read back so far) and returns that mean.
pub fn train_epoch(
    step: &mut TrainStep,
    order: &[usize],
    batch: usize,
    log_every: usize,
    label: &str,
    mut make_batch: impl FnMut(&[usize]) -> kiln::Result<Feed>,
) -> kiln::Result<f32> {
    let steps = order.len() / batch.max(1);
    if steps == 0 {
        return Err(kiln::Error::Input(format!(
            "{} training examples do not fill one batch of {batch}",
            order.len()
        )));
    }
    let bar = progress_bar(steps as u64, label);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, idx) in order.chunks_exact(batch).enumerate() {
        let feed = make_batch(idx)?;
        let want = (i + 1) % log_every.max(1) == 0 || i + 1 == steps;
        if let Some(loss) = step.step(&borrow(&feed), want)? {
            if !loss.is_finite() {
                bar.finish_and_clear();
                return Err(kiln::Error::Input(format!(
                    "the loss is {loss} at step {} of {label}: training diverged",
                    i + 1
                )));
            }
            sum += f64::from(loss);
            count += 1;
            bar.set_message(format!("loss {:.4}", sum / count as f64));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok((sum / count.max(1) as f64) as f32)
}

/// With dynamic loss scaling: `, loss scale S (k of n steps skipped)` (a readback, after an
/// epoch); else nothing.
pub fn scaler_note(step: &TrainStep) -> kiln::Result<String> {
    Ok(match step.scaler_state()? {
        Some(s) => {
            let n = step.optimizer().steps();
            format!(
                ", loss scale {} ({} of {n} steps skipped)",
                s.scale,
                n.saturating_sub(s.steps_taken)
            )
        }
        None => String::new(),
    })
}

/// A bar of `len` steps labelled `label`, with the running loss as its message.
pub fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ({elapsed_precise}, eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let bar = ProgressBar::new(len)
        .with_style(style)
        .with_prefix(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Evaluation plans over a set of `n` examples, compiled once: one for batches of `batch` and,
/// when `batch` does not divide `n`, one for the remainder, so that every example is evaluated
/// exactly once with nothing padded or dropped.
pub struct EvalPlans {
    n: usize,
    batch: usize,
    full: Plan,
    rest: Option<Plan>,
}

impl EvalPlans {
    /// `build(b)` gives the evaluation graph for a batch of `b` and the outputs to read back.
    pub fn new(
        dev: &Device,
        n: usize,
        batch: usize,
        build: impl Fn(usize) -> kiln::Result<(Graph, Vec<NodeId>)>,
    ) -> kiln::Result<EvalPlans> {
        if n == 0 {
            return Err(kiln::Error::Input("the evaluation set is empty".into()));
        }
        let batch = batch.clamp(1, n);
        let compile = |b: usize| -> kiln::Result<Plan> {
            let (g, outs) = build(b)?;
            dev.compile(&g, &outs)
        };
        let full = compile(batch)?;
        let rest = match n % batch {
            0 => None,
            r => Some(compile(r)?),
        };
        Ok(EvalPlans {
            n,
            batch,
            full,
            rest,
        })
    }

    /// Runs over examples `0..n` in order: `feed(range)` gives the inputs for the examples in
    /// `range`, `sink(range, outputs)` receives what the plan read back for them.
    pub fn run(
        &mut self,
        mut feed: impl FnMut(Range<usize>) -> kiln::Result<Feed>,
        mut sink: impl FnMut(Range<usize>, &[Tensor]),
    ) -> kiln::Result<()> {
        let mut start = 0;
        while start < self.n {
            let end = (start + self.batch).min(self.n);
            let plan = if end - start == self.batch {
                &mut self.full
            } else {
                self.rest
                    .as_mut()
                    .ok_or_else(|| kiln::Error::Input("no plan for the last batch".into()))?
            };
            let inputs = feed(start..end)?;
            let out = plan.run(&borrow(&inputs))?;
            sink(start..end, &out);
            start = end;
        }
        Ok(())
    }
}

/// Saves the named parameters of `dev` to a safetensors file at `path`, creating its folder.
pub fn save_checkpoint(dev: &Device, names: &[String], path: &Path) -> kiln::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| kiln::Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    kiln::nn::checkpoint::save(dev, &names, path)?;
    println!("saved {} to {}", names.join(", "), path.display());
    Ok(())
}

/// The index of the largest value of `row` (the first one on ties; 0 for an empty row).
pub fn argmax(row: &[f32]) -> usize {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (k, &v) in row.iter().enumerate() {
        if v > max {
            (best, max) = (k, v);
        }
    }
    best
}

/// `-log softmax(row)[label]`, computed stably in f64 (the cross-entropy of one row of logits).
pub fn nll(row: &[f32], label: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let lse = f64::from(max)
        + row
            .iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln();
    lse - f64::from(row[label])
}

/// Sets `data[row * width + index] = 1` (a one-hot row of a `(rows, width)` block); the caller
/// starts from zeros.
pub fn set_one_hot(data: &mut [f32], row: usize, width: usize, index: usize) {
    data[row * width + index] = 1.0;
}

/// A sample from `softmax(row / temperature)` drawn with `rng` (the argmax when
/// `temperature <= 0`).
pub fn sample_logits(row: &[f32], temperature: f32, rng: &mut impl Rng) -> usize {
    if temperature <= 0.0 || row.is_empty() {
        return argmax(row);
    }
    let t = f64::from(temperature);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let weights: Vec<f64> = row
        .iter()
        .map(|&v| (f64::from(v - max) / t).exp())
        .collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (k, w) in weights.iter().enumerate() {
        if u < *w {
            return k;
        }
        u -= w;
    }
    row.len() - 1
}

/// Test loss (mean NLL) and accuracy of a 10-class MNIST model over a whole set.
pub fn mnist_evaluate(
    eval: &mut EvalPlans,
    set: &kiln::data::mnist::Mnist,
) -> kiln::Result<(f64, f64)> {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    eval.run(
        |r| {
            let idx: Vec<usize> = r.collect();
            Ok(vec![("x", set.batch(&idx).0)])
        },
        |r, out| {
            for (row, &label) in out[0].data().chunks_exact(10).zip(&set.labels[r]) {
                loss += nll(row, usize::from(label));
                correct += usize::from(argmax(row) == usize::from(label));
            }
        },
    )?;
    Ok((loss / set.n as f64, correct as f64 / set.n as f64))
}

/// Everything `mnist_fit` needs: the compiled step and evaluation plans, the data and the recipe.
pub struct MnistFit<'a> {
    pub train: &'a mut kiln::nn::TrainStep,
    pub eval: &'a mut EvalPlans,
    pub train_set: &'a kiln::data::mnist::Mnist,
    pub test_set: &'a kiln::data::mnist::Mnist,
    pub batch: usize,
    pub log_every: usize,
    pub epochs: usize,
    pub seed: u64,
    /// The test accuracy the example should reach (reported, not enforced).
    pub target: f64,
}

/// The MNIST training loop shared by the classifiers: shuffle each epoch (seeded), train, test,
/// print per-epoch loss, accuracy and time, and say whether and when `target` was reached.
pub fn mnist_fit(f: MnistFit<'_>) -> kiln::Result<()> {
    let steps = f.train_set.n / f.batch;
    let mut shuffle = kiln::nn::Init::new(f.seed.wrapping_add(1));
    let (mut best, mut reached) = (0.0f64, None);
    let mut train_secs = Vec::new();
    for epoch in 1..=f.epochs {
        let t0 = std::time::Instant::now();
        let order = shuffle.permutation(f.train_set.n);
        let label = format!("epoch {epoch}/{}", f.epochs);
        let running = train_epoch(f.train, &order, f.batch, f.log_every, &label, |idx| {
            let (x, y) = f.train_set.batch(idx);
            Ok(vec![("x", x), ("y", y)])
        })?;
        let t_train = t0.elapsed().as_secs_f64();
        let (test_loss, acc) = mnist_evaluate(f.eval, f.test_set)?;
        let t_all = t0.elapsed().as_secs_f64();
        train_secs.push(t_train);
        best = best.max(acc);
        if acc >= f.target && reached.is_none() {
            reached = Some(epoch);
        }
        println!(
            "epoch {epoch:>2}/{}: train loss {running:.4}, test loss {test_loss:.4}, \
             test acc {:.2}% ({t_train:.2} s training, {:.2} s test)",
            f.epochs,
            100.0 * acc,
            t_all - t_train
        );
    }
    let mean_secs = train_secs.iter().sum::<f64>() / train_secs.len().max(1) as f64;
    println!(
        "{mean_secs:.2} s per epoch of training on average ({:.1} ms per step)",
        1e3 * mean_secs / steps.max(1) as f64
    );
    match reached {
        Some(e) => println!(
            "reached {:.0}% test accuracy at epoch {e} (best {:.2}%)",
            100.0 * f.target,
            100.0 * best
        ),
        None => println!(
            "did not reach {:.0}% test accuracy in {} epoch{} (best {:.2}%)",
            100.0 * f.target,
            f.epochs,
            if f.epochs == 1 { "" } else { "s" },
            100.0 * best
        ),
    }
    Ok(())
}

/// Loads the MNIST train and test splits from `dir` (the first `limit` training digits when
/// given), checks they are 28x28 digits that fill at least one batch, and prints what was loaded.
pub fn load_mnist(
    dir: &Path,
    limit: Option<usize>,
    batch: usize,
) -> Result<(kiln::data::mnist::Mnist, kiln::data::mnist::Mnist), Failure> {
    use kiln::data::mnist::{load_split, Split};
    let mut train_set = load_split(dir, Split::Train)?;
    if let Some(n) = limit {
        train_set = train_set.limit(n);
    }
    let test_set = load_split(dir, Split::Test)?;
    for (name, set) in [("training", &train_set), ("test", &test_set)] {
        if set.n == 0 || (set.rows, set.cols) != (28, 28) {
            return Err(format!(
                "the {name} set in {} has {} images of {}x{} pixels; the model reads 28x28 digits",
                dir.display(),
                set.n,
                set.rows,
                set.cols
            )
            .into());
        }
    }
    if train_set.n < batch {
        return Err(format!(
            "{} training digits do not fill one batch of {batch} (lower --batch-size or raise --limit)",
            train_set.n
        )
        .into());
    }
    println!(
        "MNIST from {}: {} training digits ({} steps of {batch} per epoch{}), {} test digits",
        dir.display(),
        train_set.n,
        train_set.n / batch,
        match train_set.n % batch {
            0 => String::new(),
            r => format!(", {r} left out in turn"),
        },
        test_set.n
    );
    Ok((train_set, test_set))
}

/// A text for the character-level language models (`char_lm`, `transformer_lm`): its
/// characters as indices into its sorted vocabulary, cut into windows of `seq` characters whose
/// phase and order change every epoch.
pub struct Corpus {
    /// Where the text came from, for messages.
    pub source: String,
    /// The distinct characters, sorted.
    pub vocab: Vec<char>,
    /// The text as vocabulary indices.
    pub ids: Vec<usize>,
}

impl Corpus {
    /// The text at `path`, or `built_in` (named `the built-in README.md`) without one.
    pub fn load(path: Option<&Path>, built_in: &str) -> Result<Corpus, Failure> {
        let (source, text) = match path {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --text {}: {e}", path.display()))?,
            ),
            None => ("the built-in README.md".to_string(), built_in.to_string()),
        };
        let chars: Vec<char> = text.chars().collect();
        let mut vocab = chars.clone();
        vocab.sort_unstable();
        vocab.dedup();
        let ids = chars
            .iter()
            .map(|&c| vocab.binary_search(&c).expect("in vocab"))
            .collect();
        Ok(Corpus { source, vocab, ids })
    }

    /// The vocabulary index of `c`, if the text has it.
    pub fn index(&self, c: char) -> Option<usize> {
        self.vocab.binary_search(&c).ok()
    }

    /// Whole windows of `seq` characters (each with its next character) from offset `phase`.
    pub fn windows(&self, seq: usize, phase: usize) -> usize {
        self.ids.len().saturating_sub(1 + phase) / seq
    }

    /// Checks that every phase fills a batch of `batch` windows; prints the corpus's summary
    /// with the training steps per epoch.
    pub fn check_windows(&self, seq: usize, batch: usize) -> Result<(), Failure> {
        if self.windows(seq, seq - 1) < batch {
            return Err(format!(
                "{} has {} characters: too few for a batch of {batch} windows of {seq} \
                 (lower --batch-size or --seq, or use a longer --text)",
                self.source,
                self.ids.len()
            )
            .into());
        }
        let steps = self.windows(seq, 0) / batch;
        println!(
            "{}: {} characters, vocabulary of {}, windows of {seq} ({steps} steps of {batch} per epoch)",
            self.source,
            self.ids.len(),
            self.vocab.len()
        );
        Ok(())
    }

    /// An epoch's window starts: a random phase, then the windows in a random order.
    pub fn epoch_starts(&self, seq: usize, shuffle: &mut kiln::nn::Init) -> Vec<usize> {
        let phase = (shuffle.next_u32() as usize) % seq;
        let starts: Vec<usize> = (0..self.windows(seq, phase))
            .map(|k| phase + k * seq)
            .collect();
        shuffle
            .permutation(starts.len())
            .into_iter()
            .map(|k| starts[k])
            .collect()
    }

    /// The characters of `ids`.
    pub fn text(&self, ids: &[usize]) -> String {
        ids.iter().map(|&i| self.vocab[i]).collect()
    }

    /// Saves the named parameters with `vocab`, the vocabulary as Unicode code points (f32).
    pub fn save(&self, dev: &Device, names: &[String], path: &Path) -> kiln::Result<()> {
        let codes: Vec<f32> = self.vocab.iter().map(|&c| c as u32 as f32).collect();
        dev.set_param("vocab", &Tensor::new([self.vocab.len()], codes)?)?;
        let mut names = names.to_vec();
        names.push("vocab".to_string());
        save_checkpoint(dev, &names, path)
    }
}

/// How a language model trains: epochs of `batch` windows of `seq` characters, the loss read
/// back every `log_every` steps, samples drawn at `temperature`.
pub struct LmSchedule {
    pub epochs: u32,
    pub seq: usize,
    pub batch: usize,
    pub log_every: usize,
    pub temperature: f32,
    /// Seeds the windows' phases and order.
    pub seed: u64,
}

/// Trains a character-level language model for `schedule.epochs` epochs over `corpus`
/// (`make_batch` turns window starts into the step's feeds), printing each epoch's loss with a
/// sample from `sample`, then the mean time per epoch and step.
pub fn train_lm(
    step: &mut TrainStep,
    corpus: &Corpus,
    schedule: &LmSchedule,
    mut make_batch: impl FnMut(&[usize]) -> kiln::Result<Feed>,
    mut sample: impl FnMut() -> kiln::Result<String>,
) -> kiln::Result<()> {
    let LmSchedule {
        epochs, seq, batch, ..
    } = *schedule;
    let mut shuffle = kiln::nn::Init::new(schedule.seed);
    let mut train_secs = Vec::new();
    let mut first_loss = None;
    for epoch in 1..=epochs {
        let t0 = std::time::Instant::now();
        let order = corpus.epoch_starts(seq, &mut shuffle);
        let label = format!("epoch {epoch}/{epochs}");
        let loss = train_epoch(
            step,
            &order,
            batch,
            schedule.log_every,
            &label,
            &mut make_batch,
        )?;
        let t_train = t0.elapsed().as_secs_f64();
        train_secs.push(t_train);
        first_loss.get_or_insert(loss);
        let text = sample()?;
        println!(
            "epoch {epoch:>2}/{epochs}: train loss {loss:.4} ({:.3} bits/char) ({t_train:.1} s training, {:.1} s sampling){}",
            loss / std::f32::consts::LN_2,
            t0.elapsed().as_secs_f64() - t_train,
            scaler_note(step)?
        );
        println!(
            "--- sample (temperature {}) ---\n{text}\n---",
            schedule.temperature
        );
    }
    let steps = corpus.windows(seq, 0) / batch.max(1);
    let mean_secs = train_secs.iter().sum::<f64>() / train_secs.len().max(1) as f64;
    println!(
        "{:.1} s per epoch of training on average ({:.0} ms per step); loss {:.4} in the first epoch, ln(V) = {:.4}",
        mean_secs,
        1e3 * mean_secs / steps.max(1) as f64,
        first_loss.unwrap_or(f32::NAN),
        (corpus.vocab.len() as f32).ln()
    );
    Ok(())
}
