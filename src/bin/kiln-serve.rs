//! `kiln-serve`: an MNIST model as an HTTP service, with dynamic batching.
//!
//!     kiln-serve --model mnist_cnn|mnist_cnn_bn|mlp --checkpoint PATH [--addr 127.0.0.1:8080]
//!                [--backend gpu|cpu|auto] [--max-batch 64] [--batch-window-ms 2] [--queue 1024]
//!                [--no-batching]
//!
//! It loads the safetensors checkpoint (the parameter names of `kiln::models::mnist_cnn`,
//! `mnist_cnn_bn`, with its batch norms' running statistics, or `mnist_mlp`), prints `listening on ADDR` on stdout once it accepts connections
//! (`--addr 127.0.0.1:0` asks the OS for a port), and answers:
//!
//! - `POST /v1/predict` with `{"input": IMAGE}` or `{"inputs": [IMAGE, ...]}`, an IMAGE being 784
//!   numbers or 28 rows of 28 numbers: `{"predictions": [{"probabilities": [10 floats], "class":
//!   k}, ...]}`, in the order of the inputs. Bad input is a 4xx with `{"error": "..."}` (400 for
//!   malformed JSON, wrong sizes, non-numbers, values that are not finite f32s, an empty list;
//!   413 for a body over 4 MiB or more than `--max-batch * 16` inputs); a full queue is a 503 with
//!   `Retry-After: 1`; a failed model run is a 500 with the error, and the server keeps serving.
//! - `GET /health`: `{"status": "ok", "model": ..., "device": ..., ...}` (503 if the worker
//!   stopped or the device was lost).
//! - `GET /metrics`: predict requests (`requests`, `errors` = `client_errors` + `server_errors` +
//!   `rejected_queue_full`), `predictions` served, the queue's depth, plan runs per batch-size
//!   bucket (`batches.histogram`: a run of 5 inputs counts under bucket 8), and `latency_ms`
//!   p50/p90/p99 over the last 4,096 successful predict requests.
//!
//! One worker thread owns the device and the plans (one per batch-size bucket: 1, 2, 4, ... up to
//! `--max-batch`, compiled at start). Requests wait in a bounded queue (`--queue`); the worker
//! takes the first, gathers more until it holds `--max-batch` inputs or `--batch-window-ms` has
//! passed since the first arrived, runs them as one zero-padded batch and answers each request
//! with its rows. `--no-batching` runs every request alone.

#[path = "kiln_serve/http.rs"]
mod http;
#[path = "kiln_serve/metrics.rs"]
mod metrics;
#[path = "kiln_serve/worker.rs"]
mod worker;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kiln::nn::Sequential;

/// Side of an MNIST image.
pub const SIDE: usize = 28;
/// Values per image.
pub const PIXELS: usize = SIDE * SIDE;
/// Classes the models predict.
pub const CLASSES: usize = 10;
/// A request may hold at most this many times `--max-batch` inputs.
const MAX_INPUTS_PER_BATCH: usize = 16;

/// Which network to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// The CNN of examples/mnist_cnn.rs (conv1..conv3, fc1, fc2).
    #[value(name = "mnist_cnn")]
    MnistCnn,
    /// The MLP of examples/mlp.rs (fc1, fc2, fc3).
    #[value(name = "mlp", alias = "mnist_mlp")]
    Mlp,
    /// The CNN of examples/mnist_cnn.rs --batch-norm (conv1..conv3, bn1..bn3, fc1, fc2).
    #[value(name = "mnist_cnn_bn")]
    MnistCnnBn,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::MnistCnn => "mnist_cnn",
            ModelKind::Mlp => "mlp",
            ModelKind::MnistCnnBn => "mnist_cnn_bn",
        }
    }
    /// The layers (their initial values are replaced by the checkpoint's).
    pub fn build(self) -> Sequential {
        match self {
            ModelKind::MnistCnn => kiln::models::mnist_cnn(0),
            ModelKind::Mlp => kiln::models::mnist_mlp(0),
            ModelKind::MnistCnnBn => kiln::models::mnist_cnn_bn(0),
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// A wgpu adapter (an error if there is none).
    Gpu,
    /// The CPU reference backend.
    Cpu,
    /// KILN_BACKEND if set, else the best GPU.
    Auto,
}

impl BackendChoice {
    pub fn name(self) -> &'static str {
        match self {
            BackendChoice::Gpu => "gpu",
            BackendChoice::Cpu => "cpu",
            BackendChoice::Auto => "auto",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "kiln-serve",
    about = "Serve an MNIST model over HTTP with dynamic batching (POST /v1/predict, GET /health, GET /metrics)"
)]
struct Args {
    /// The network the checkpoint holds.
    #[arg(long, value_enum)]
    model: ModelKind,
    /// A safetensors checkpoint with the model's parameters (e.g. from the examples).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendChoice,
    /// Most inputs run together in one plan run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_batch: u32,
    /// How long the worker waits for more requests after the first of a batch arrived.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    batch_window_ms: u64,
    /// Requests that may wait for the worker; beyond that, 503 with Retry-After.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    queue: u32,
    /// Run every request alone.
    #[arg(long)]
    no_batching: bool,
    /// Mixed precision: f16 activations, products and convolutions (tensor cores where the
    /// adapter has them; the f32 weights rounded as they are read), probabilities in f32.
    #[arg(long)]
    f16: bool,
    /// Testing only: a batch holding an input whose first value equals this fails its plan run.
    #[arg(long, hide = true, allow_negative_numbers = true)]
    inject_fault_marker: Option<f32>,
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("kiln-serve: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let max_batch = args.max_batch as usize;
    let queue = args.queue as usize;
    let batching = !args.no_batching;
    let metrics = Arc::new(metrics::Metrics::new(&worker::buckets(max_batch)));
    let healthy = Arc::new(AtomicBool::new(true));
    let (tx, rx) = tokio::sync::mpsc::channel(queue);
    let cfg = worker::Config {
        model: args.model,
        checkpoint: args.checkpoint.clone(),
        backend: args.backend,
        max_batch,
        window: Duration::from_millis(args.batch_window_ms),
        batching,
        fault_marker: args.inject_fault_marker,
        dtype: if args.f16 {
            kiln::DType::F16
        } else {
            kiln::DType::F32
        },
    };
    let (ready, worker) = worker::spawn(cfg, rx, metrics.clone(), healthy.clone())?;
    println!(
        "model {} from {} on {}; batch buckets {:?}, {}",
        args.model.name(),
        args.checkpoint.display(),
        ready.device,
        ready.buckets,
        if batching {
            format!("batching window {} ms", args.batch_window_ms)
        } else {
            "batching off".to_string()
        }
    );
    let state = Arc::new(http::AppState {
        tx,
        metrics,
        model: args.model.name(),
        device: ready.device,
        backend: args.backend.name(),
        max_batch,
        max_inputs: max_batch * MAX_INPUTS_PER_BATCH,
        queue,
        batching,
        window_ms: args.batch_window_ms,
        healthy,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| format!("serving: {e}"))
    })?;
    // the router (and with it the queue's sender) is gone: the worker drains and stops
    drop(rt);
    let _ = worker.join();
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("kiln-serve: shutting down");
}
