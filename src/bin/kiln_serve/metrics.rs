//! Counters for `GET /metrics`: predict requests by outcome, predictions served, plan runs per
//! batch-size bucket, and latency percentiles over a bounded window of recent requests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

/// How many of the most recent successful predict requests the latency percentiles cover.
pub const LATENCY_WINDOW: usize = 4096;

/// Shared by the HTTP handlers (requests) and the worker (plan runs).
pub struct Metrics {
    inner: Mutex<Inner>,
}

struct Inner {
    requests: u64,
    client_errors: u64,
    server_errors: u64,
    rejected: u64,
    predictions: u64,
    runs: u64,
    run_inputs: u64,
    padded: u64,
    /// `(bucket size, plan runs)` for every bucket, in increasing size.
    histogram: Vec<(usize, u64)>,
    /// Latencies in ms of the last [`LATENCY_WINDOW`] successful predict requests.
    latencies: VecDeque<f64>,
}

impl Metrics {
    /// Empty counters for plans of the given batch-size buckets.
    pub fn new(buckets: &[usize]) -> Metrics {
        Metrics {
            inner: Mutex::new(Inner {
                requests: 0,
                client_errors: 0,
                server_errors: 0,
                rejected: 0,
                predictions: 0,
                runs: 0,
                run_inputs: 0,
                padded: 0,
                histogram: buckets.iter().map(|&b| (b, 0)).collect(),
                latencies: VecDeque::with_capacity(LATENCY_WINDOW),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // counters stay meaningful even if a holder panicked
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One answered predict request: its status, how many predictions it returned and how long
    /// it took (the latency window holds successful requests only).
    pub fn record_request(&self, status: StatusCode, predictions: usize, latency: Duration) {
        let mut m = self.lock();
        m.requests += 1;
        if status.is_success() {
            m.predictions += predictions as u64;
            if m.latencies.len() == LATENCY_WINDOW {
                m.latencies.pop_front();
            }
            m.latencies.push_back(latency.as_secs_f64() * 1e3);
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            m.rejected += 1;
        } else if status.is_client_error() {
            m.client_errors += 1;
        } else {
            m.server_errors += 1;
        }
    }

    /// One plan run of `bucket` rows, `inputs` of them real (the rest zero padding).
    pub fn record_run(&self, bucket: usize, inputs: usize) {
        let mut m = self.lock();
        m.runs += 1;
        m.run_inputs += inputs as u64;
        m.padded += bucket.saturating_sub(inputs) as u64;
        match m.histogram.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, n)) => *n += 1,
            None => m.histogram.push((bucket, 1)),
        }
    }

    /// The JSON document `GET /metrics` answers (queue depth and capacity given by the caller).
    pub fn snapshot(&self, queue_depth: usize, queue_capacity: usize) -> Value {
        let m = self.lock();
        let mut lat: Vec<f64> = m.latencies.iter().copied().collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Value {
            if lat.is_empty() {
                return Value::Null;
            }
            // nearest rank
            let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
            json!(lat[rank - 1])
        };
        let histogram: Vec<Value> = m
            .histogram
            .iter()
            .map(|&(b, n)| json!({"batch_size": b, "runs": n}))
            .collect();
        json!({
            "requests": m.requests,
            "errors": m.client_errors + m.server_errors + m.rejected,
            "client_errors": m.client_errors,
            "server_errors": m.server_errors,
            "rejected_queue_full": m.rejected,
            "predictions": m.predictions,
            "queue": {"depth": queue_depth, "capacity": queue_capacity},
            "batches": {
                "runs": m.runs,
                "inputs": m.run_inputs,
                "padding": m.padded,
                "mean_inputs_per_run": if m.runs == 0 { 0.0 } else { m.run_inputs as f64 / m.runs as f64 },
                "histogram": histogram,
            },
            "latency_ms": {
                "window": lat.len(),
                "p50": pct(0.50),
                "p90": pct(0.90),
                "p99": pct(0.99),
            },
        })
    }
}
