//! The model worker: one thread owns the [`Device`] and the compiled plans. It takes a request
//! from the bounded queue, gathers more until it holds `max_batch` inputs or the batch window
//! (counted from the first request's arrival) has passed, runs them together through the plan of
//! the smallest batch-size bucket that fits (zero padding the rest), and answers each request
//! with its own rows.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::nn::{checkpoint, Sequential};
use kiln::{Device, Graph, Plan, Tensor};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::{BackendChoice, ModelKind, CLASSES, PIXELS};

/// What a request gets back from the worker: `n * CLASSES` probabilities, or the error message.
pub type Reply = Result<Vec<f32>, String>;

/// A predict request for the worker.
pub struct Job {
    /// `n` images of [`PIXELS`] values each, row-major.
    pub inputs: Vec<f32>,
    pub n: usize,
    pub reply: oneshot::Sender<Reply>,
    /// When the request was queued (the batch window counts from the first one's).
    pub enqueued: Instant,
}

/// How the worker is set up.
pub struct Config {
    pub model: ModelKind,
    pub checkpoint: PathBuf,
    pub backend: BackendChoice,
    pub max_batch: usize,
    pub window: Duration,
    pub batching: bool,
    /// Testing only: a batch holding an input whose first value equals this is fed to its plan
    /// with a malformed input tensor, so that the plan run fails (the 500 path).
    pub fault_marker: Option<f32>,
    /// The activations' type: f16 runs the model in mixed precision (`--f16`).
    pub dtype: kiln::DType,
}

/// What the worker reports once the model is loaded and its plans compiled.
pub struct Ready {
    pub device: String,
    pub buckets: Vec<usize>,
}

/// The batch-size buckets: powers of two below `max_batch`, then `max_batch` itself.
pub fn buckets(max_batch: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b < max_batch)
        .collect();
    v.push(max_batch);
    v
}

/// Starts the worker thread: it creates the device, loads the checkpoint and compiles one plan
/// per bucket, then serves `rx` until every sender is gone. Returns once it is ready, or the
/// message saying why it could not start.
pub fn spawn(
    cfg: Config,
    rx: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
) -> Result<(Ready, JoinHandle<()>), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("kiln-worker".into())
        .spawn(move || {
            let worker = match Worker::new(cfg, metrics, healthy) {
                Ok(w) => w,
                Err(msg) => {
                    let _ = ready_tx.send(Err(msg));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(Ready {
                device: worker.dev.describe(),
                buckets: worker.buckets.clone(),
            }));
            worker.serve(rx);
        })
        .map_err(|e| format!("cannot start the worker thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(ready)) => Ok((ready, handle)),
        Ok(Err(msg)) => Err(msg),
        Err(_) => Err("the worker thread stopped while loading the model".into()),
    }
}

struct Worker {
    dev: Device,
    model: Sequential,
    cfg: Config,
    buckets: Vec<usize>,
    plans: HashMap<usize, Plan>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
}

/// A plan computing softmax probabilities `(bucket, CLASSES)` from images `x (bucket, 1, 28, 28)`,
/// the layers on activations of `dtype` (the probabilities in f32).
fn compile(
    dev: &Device,
    model: &Sequential,
    bucket: usize,
    dtype: kiln::DType,
) -> kiln::Result<Plan> {
    let g = Graph::new();
    let x = g.input("x", [bucket, 1, 28, 28]);
    let (logits, _) = model.apply(&g, g.cast(x, dtype)?, false)?;
    let probs = g.softmax(g.cast(logits, kiln::DType::F32)?, -1)?;
    dev.compile(&g, &[probs])
}

impl Worker {
    fn new(cfg: Config, metrics: Arc<Metrics>, healthy: Arc<AtomicBool>) -> Result<Worker, String> {
        let dev = match cfg.backend {
            BackendChoice::Cpu => Ok(Device::cpu()),
            BackendChoice::Gpu => Device::gpu(),
            BackendChoice::Auto => Device::new(),
        }
        .map_err(|e| format!("no device for --backend {}: {e}", cfg.backend.name()))?;
        let model = cfg.model.build();
        let buckets = buckets(cfg.max_batch);
        let mut plans = HashMap::new();
        // The first plan creates the parameters (freshly initialised), so that loading the
        // checkpoint then checks every tensor's shape against the model's.
        let first =
            compile(&dev, &model, 1, cfg.dtype).map_err(|e| format!("compiling the model: {e}"))?;
        plans.insert(1, first);
        let names = model.param_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // kiln's message names the file
        checkpoint::load(&dev, &cfg.checkpoint, &names)
            .map_err(|e| format!("cannot load the {} checkpoint: {e}", cfg.model.name()))?;
        for &b in &buckets[1..] {
            let plan = compile(&dev, &model, b, cfg.dtype)
                .map_err(|e| format!("compiling the model for batches of {b}: {e}"))?;
            plans.insert(b, plan);
        }
        Ok(Worker {
            dev,
            model,
            cfg,
            buckets,
            plans,
            metrics,
            healthy,
        })
    }

    /// Serves jobs until the queue is closed and empty.
    fn serve(mut self, mut rx: mpsc::Receiver<Job>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("kiln-serve: the worker cannot start its timer runtime: {e}");
                return;
            }
        };
        while let Some(first) = rt.block_on(rx.recv()) {
            let deadline = first.enqueued + self.cfg.window;
            let mut rows = first.n;
            let mut jobs = vec![first];
            if self.cfg.batching {
                while rows < self.cfg.max_batch {
                    let job = match rx.try_recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            let now = Instant::now();
                            if now >= deadline {
                                None
                            } else {
                                // the timer is created inside the runtime that drives it
                                rt.block_on(async {
                                    tokio::time::timeout(deadline - now, rx.recv()).await
                                })
                                .ok()
                                .flatten()
                            }
                        }
                    };
                    let Some(job) = job else { break };
                    rows += job.n;
                    jobs.push(job);
                }
            }
            self.run_jobs(jobs);
        }
    }

    /// Runs the jobs' inputs in chunks of at most `max_batch` (one chunk unless a job is large)
    /// and answers every job; a job any of whose chunks failed gets that chunk's error.
    fn run_jobs(&mut self, jobs: Vec<Job>) {
        // a client that went away needs no answer
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        let rows: Vec<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.n).map(move |r| (j, r)))
            .collect();
        let mut outputs: Vec<Vec<f32>> = jobs
            .iter()
            .map(|j| Vec::with_capacity(j.n * CLASSES))
            .collect();
        let mut failed: Vec<Option<String>> = vec![None; jobs.len()];
        for chunk in rows.chunks(self.cfg.max_batch) {
            let bucket = self.bucket_for(chunk.len());
            let mut x = vec![0.0f32; bucket * PIXELS];
            for (k, &(j, r)) in chunk.iter().enumerate() {
                x[k * PIXELS..(k + 1) * PIXELS]
                    .copy_from_slice(&jobs[j].inputs[r * PIXELS..(r + 1) * PIXELS]);
            }
            match self.run(bucket, x, chunk.len()) {
                Ok(probs) => {
                    for (k, &(j, _)) in chunk.iter().enumerate() {
                        outputs[j].extend_from_slice(&probs[k * CLASSES..(k + 1) * CLASSES]);
                    }
                }
                Err(msg) => {
                    for &(j, _) in chunk {
                        failed[j].get_or_insert_with(|| msg.clone());
                    }
                }
            }
        }
        for ((job, out), err) in jobs.into_iter().zip(outputs).zip(failed) {
            let _ = job.reply.send(match err {
                Some(msg) => Err(msg),
                None => Ok(out),
            });
        }
    }

    /// The smallest bucket holding `n` rows (`n <= max_batch`).
    fn bucket_for(&self, n: usize) -> usize {
        self.buckets
            .iter()
            .copied()
            .find(|&b| b >= n)
            .unwrap_or(self.cfg.max_batch)
    }

    /// One plan run over `bucket` rows of which the first `used` are real; returns the
    /// probabilities of the `used` rows.
    fn run(&mut self, bucket: usize, x: Vec<f32>, used: usize) -> Result<Vec<f32>, String> {
        self.metrics.record_run(bucket, used);
        let fault = self
            .cfg
            .fault_marker
            .is_some_and(|m| (0..used).any(|k| x[k * PIXELS] == m));
        let plan = match self.plans.entry(bucket) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let plan = compile(&self.dev, &self.model, bucket, self.cfg.dtype)
                    .map_err(|e| format!("compiling the model for batches of {bucket}: {e}"))?;
                e.insert(plan)
            }
        };
        let input = if fault {
            // testing only: a tensor of the wrong shape makes the plan run fail
            Tensor::zeros([bucket + 1, 1, 28, 28])
        } else {
            Tensor::new([bucket, 1, 28, 28], x).map_err(|e| format!("building the batch: {e}"))?
        };
        let result = catch_unwind(AssertUnwindSafe(|| plan.run(&[("x", &input)])));
        let out = match result {
            Ok(Ok(mut out)) => out.swap_remove(0).into_data(),
            Ok(Err(e)) => {
                if matches!(e, kiln::Error::DeviceLost(_)) {
                    self.healthy.store(false, Ordering::Relaxed);
                }
                return Err(format!("the model run failed: {e}"));
            }
            Err(panic) => {
                // the plan may be left half-updated: compile it afresh next time
                self.plans.remove(&bucket);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                return Err(format!("the model run panicked: {what}"));
            }
        };
        let out = &out[..used * CLASSES];
        if out.iter().any(|v| !v.is_finite()) {
            return Err(
                "the model produced non-finite probabilities (check the checkpoint)".into(),
            );
        }
        Ok(out.to_vec())
    }
}
