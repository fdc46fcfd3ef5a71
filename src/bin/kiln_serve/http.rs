//! The HTTP side: routes, request parsing and validation, error responses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::worker::Job;
use crate::{CLASSES, PIXELS, SIDE};

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// Bodies larger than this are parsed on a blocking thread, off the async workers.
const PARSE_INLINE: usize = 256 * 1024;

/// What every handler shares.
pub struct AppState {
    pub tx: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    pub model: &'static str,
    pub device: String,
    pub backend: &'static str,
    pub max_batch: usize,
    /// Most inputs one request may hold (`max_batch * 16`).
    pub max_inputs: usize,
    pub queue: usize,
    pub batching: bool,
    pub window_ms: u64,
    /// Cleared by the worker when the device is lost.
    pub healthy: Arc<AtomicBool>,
}

/// The routes, with the body limit.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An error answer: its status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            msg: msg.into(),
        }
    }
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.msg }));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            (self.status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

#[derive(Serialize)]
struct Prediction {
    probabilities: Vec<f32>,
    class: usize,
}

#[derive(Serialize)]
struct PredictResponse {
    predictions: Vec<Prediction>,
}

async fn predict(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let (response, n) = match predict_inner(&st, body).await {
        Ok(predictions) => {
            let n = predictions.len();
            (Json(PredictResponse { predictions }).into_response(), n)
        }
        Err(e) => (e.into_response(), 0),
    };
    st.metrics
        .record_request(response.status(), n, t0.elapsed());
    response
}

async fn predict_inner(
    st: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Vec<Prediction>, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                r.status(),
                format!("the request body is larger than {} MiB", MAX_BODY >> 20),
            )
        } else {
            ApiError::new(
                r.status(),
                format!("cannot read the request body: {}", r.body_text()),
            )
        }
    })?;
    let max = st.max_inputs;
    let (inputs, n) = if body.len() > PARSE_INLINE {
        tokio::task::spawn_blocking(move || parse_request(&body, max))
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("parsing failed: {e}"),
                )
            })??
    } else {
        parse_request(&body, max)?
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        inputs,
        n,
        reply,
        enqueued: Instant::now(),
    };
    st.tx.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request queue is full ({} waiting); retry later",
                st.queue
            ),
        ),
        mpsc::error::TrySendError::Closed(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model worker has stopped",
        ),
    })?;
    let probs = answer
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model worker dropped the request",
            )
        })?
        .map_err(|msg| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg))?;
    Ok(probs
        .chunks_exact(CLASSES)
        .map(|p| Prediction {
            probabilities: p.to_vec(),
            class: argmax(p),
        })
        .collect())
}

/// Index of the largest value (the first, on ties).
fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .fold(0, |best, (k, &v)| if v > p[best] { k } else { best })
}

/// Parses `{"input": IMAGE}` or `{"inputs": [IMAGE, ...]}`, an IMAGE being 784 numbers or 28
/// rows of 28 numbers, into `n` images of [`PIXELS`] values.
pub fn parse_request(body: &[u8], max_inputs: usize) -> Result<(Vec<f32>, usize), ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::bad(
            "the body must be a JSON object: {\"input\": IMAGE} or {\"inputs\": [IMAGE, ...]}",
        ));
    };
    if let Some(k) = obj.keys().find(|k| *k != "input" && *k != "inputs") {
        return Err(ApiError::bad(format!(
            "unknown field {k:?}: give \"input\" or \"inputs\""
        )));
    }
    let images: Vec<(String, &Value)> = match (obj.get("input"), obj.get("inputs")) {
        (Some(x), None) => vec![("input".to_string(), x)],
        (None, Some(Value::Array(xs))) => {
            if xs.is_empty() {
                return Err(ApiError::bad("\"inputs\" is empty"));
            }
            if xs.len() > max_inputs {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{} inputs in one request; at most {max_inputs} are accepted",
                        xs.len()
                    ),
                ));
            }
            xs.iter()
                .enumerate()
                .map(|(i, x)| (format!("inputs[{i}]"), x))
                .collect()
        }
        (None, Some(_)) => return Err(ApiError::bad("\"inputs\" must be a list of images")),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad("give \"input\" or \"inputs\", not both"));
        }
        (None, None) => {
            return Err(ApiError::bad(
                "missing \"input\" (one image) or \"inputs\" (a list of images)",
            ))
        }
    };
    let mut out = Vec::with_capacity(images.len() * PIXELS);
    for (what, x) in &images {
        parse_image(what, x, &mut out)?;
    }
    Ok((out, images.len()))
}

/// Appends one image (784 numbers, or 28 rows of 28) to `out`.
fn parse_image(what: &str, x: &Value, out: &mut Vec<f32>) -> Result<(), ApiError> {
    let shape_err = |got: String| {
        ApiError::bad(format!(
            "{what} must be {PIXELS} numbers or {SIDE} rows of {SIDE} numbers; got {got}"
        ))
    };
    let Value::Array(items) = x else {
        return Err(shape_err(kind(x)));
    };
    match items.first() {
        Some(Value::Array(_)) => {
            if items.len() != SIDE {
                return Err(shape_err(format!("{} rows", items.len())));
            }
            for (r, row) in items.iter().enumerate() {
                let Value::Array(row) = row else {
                    return Err(shape_err(format!("{} as row {r}", kind(row))));
                };
                if row.len() != SIDE {
                    return Err(shape_err(format!("{} values in row {r}", row.len())));
                }
                for (c, v) in row.iter().enumerate() {
                    out.push(number(&format!("{what}[{r}][{c}]"), v)?);
                }
            }
        }
        _ => {
            if items.len() != PIXELS {
                return Err(shape_err(format!("a list of {} values", items.len())));
            }
            for (i, v) in items.iter().enumerate() {
                out.push(number(&format!("{what}[{i}]"), v)?);
            }
        }
    }
    Ok(())
}

/// A finite f32 from a JSON value.
fn number(what: &str, v: &Value) -> Result<f32, ApiError> {
    let f = v
        .as_f64()
        .ok_or_else(|| ApiError::bad(format!("{what} is {}, not a number", kind(v))))?;
    let f32v = f as f32;
    if !f32v.is_finite() {
        return Err(ApiError::bad(format!(
            "{what} = {f:e} is not a finite 32-bit float"
        )));
    }
    Ok(f32v)
}

/// A JSON value's kind, for messages.
fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(a) => format!("a list of {} values", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let worker_up = !st.tx.is_closed();
    let device_ok = st.healthy.load(Ordering::Relaxed);
    let ok = worker_up && device_ok;
    let status = if ok {
        "ok"
    } else if !worker_up {
        "worker stopped"
    } else {
        "device lost"
    };
    let body = Json(json!({
        "status": status,
        "model": st.model,
        "device": st.device,
        "backend": st.backend,
        "batching": st.batching,
        "max_batch": st.max_batch,
        "batch_window_ms": st.window_ms,
    }));
    if ok {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Json<Value> {
    let depth = st.tx.max_capacity().saturating_sub(st.tx.capacity());
    Json(st.metrics.snapshot(depth, st.queue))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint: POST /v1/predict, GET /health or GET /metrics",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: POST /v1/predict, GET /health or GET /metrics",
    )
}
