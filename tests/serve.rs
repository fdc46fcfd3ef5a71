//! `kiln-serve` end to end: the binary runs as a child process on 127.0.0.1 with a port the OS
//! picks (it prints `listening on ADDR`), on the CPU backend, serving a checkpoint this test
//! writes from freshly initialised parameters. Every answer is checked against one-at-a-time
//! inference of the same input in this process (on the CPU reference). Loopback only; every loop
//! is bounded and every socket has a timeout, so the tests stop by themselves.
//!
//! `KILN_SERVE_TEST_BACKEND=gpu|auto` serves on a GPU instead (no GPU needed by default).

#![cfg(feature = "serve")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln::nn::{checkpoint, Sequential};
use kiln::{Device, Graph, Plan, Tensor};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_kiln-serve");
const PIXELS: usize = 784;
const CLASSES: usize = 10;
/// Socket read/write timeout: a request that hangs fails the test instead of blocking it.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Probabilities from the server and from one-at-a-time inference agree this closely.
const TOL: f64 = 1e-5;

/// The backend the servers run on: `KILN_SERVE_TEST_BACKEND`, default `cpu`.
fn backend() -> String {
    std::env::var("KILN_SERVE_TEST_BACKEND").unwrap_or_else(|_| "cpu".into())
}

/// The tests start servers and measure throughput: one at a time on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn model(name: &str, seed: u64) -> Sequential {
    match name {
        "mlp" => kiln::models::mnist_mlp(seed),
        "mnist_cnn" => kiln::models::mnist_cnn(seed),
        "mnist_cnn_bn" => kiln::models::mnist_cnn_bn(seed),
        other => panic!("no model {other}"),
    }
}

/// A plan for softmax probabilities of `batch` images on `dev` (parameters created on compile).
fn prob_plan(dev: &Device, m: &Sequential, batch: usize) -> Plan {
    let g = Graph::new();
    let x = g.input("x", [batch, 1, 28, 28]);
    let (logits, _) = m.apply(&g, x, false).unwrap();
    let p = g.softmax(logits, -1).unwrap();
    dev.compile(&g, &[p]).unwrap()
}

/// A file removed when dropped (also when a test fails).
struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a checkpoint of freshly initialised parameters (seeded, so not the server's own
/// initial values), removed when the result is dropped.
fn write_checkpoint(name: &str, seed: u64) -> TempFile {
    let path = std::env::temp_dir().join(format!(
        "kiln-serve-test-{}-{name}-{seed}.safetensors",
        std::process::id()
    ));
    let dev = Device::cpu();
    let m = model(name, seed);
    prob_plan(&dev, &m, 1);
    // running statistics away from their (0, 1) start, so that serving must read them
    for (k, n) in dev.param_names().iter().enumerate() {
        let p = dev.param(n).unwrap();
        let (lo, hi) = if n.ends_with("running_var") {
            (0.5, 2.0)
        } else {
            (-0.5, 0.5)
        };
        if n.contains("running_") {
            let t = Tensor::rand_uniform(p.dims().to_vec(), lo, hi, seed * 100 + k as u64);
            dev.set_param(n, &t).unwrap();
        }
    }
    let names = m.param_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    checkpoint::save(&dev, &names, &path).unwrap();
    TempFile(path)
}

/// One-at-a-time inference of the checkpoint in this process.
struct Reference {
    plan: Plan,
}

impl Reference {
    fn new(name: &str, ckpt: &Path) -> Reference {
        let dev = Device::cpu();
        let m = model(name, 0);
        let plan = prob_plan(&dev, &m, 1);
        let names = m.param_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        checkpoint::load(&dev, ckpt, &names).unwrap();
        Reference { plan }
    }

    fn predict(&mut self, img: &[f32]) -> Vec<f32> {
        let x = Tensor::new([1, 1, 28, 28], img.to_vec()).unwrap();
        self.plan.run(&[("x", &x)]).unwrap().remove(0).into_data()
    }
}

/// A seeded image of values in [0, 1) (splitmix64).
fn image(seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x1234_5678);
    (0..PIXELS)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// The image as 28 rows of 28.
fn rows(img: &[f32]) -> Value {
    json!(img.chunks(28).map(|r| r.to_vec()).collect::<Vec<_>>())
}

/// A running `kiln-serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &str, ckpt: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["--model", model, "--checkpoint"])
            .arg(ckpt)
            .args(["--addr", "127.0.0.1:0", "--backend", &backend()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kiln-serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // reads the bound address, then keeps draining stdout until the server exits
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("kiln-serve did not print its address ({status:?})");
            }
        };
        let addr: SocketAddr = addr.parse().expect("a socket address");
        assert!(addr.ip().is_loopback(), "{addr} is not loopback");
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 client over one keep-alive connection (loopback only).
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        assert!(addr.ip().is_loopback());
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(stream),
        }
    }

    /// Sends a request; write errors are ignored (a server may answer and close before reading
    /// a too-large body) so that the answer can still be read.
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Resp> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body);
        let _ = self.reader.get_mut().write_all(&msg);
        self.read_response()
    }

    fn read_response(&mut self) -> std::io::Result<Resp> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _): &&(String, String)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if let Some(n) = find("content-length") {
            let n: usize = n.parse().map_err(|_| bad("bad content-length"))?;
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk"))?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Resp {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh connection.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Resp {
    Conn::open(addr)
        .request(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn post(addr: SocketAddr, body: &Value) -> Resp {
    http(addr, "POST", "/v1/predict", body.to_string().as_bytes())
}

fn get(addr: SocketAddr, path: &str) -> Value {
    let r = http(addr, "GET", path, b"");
    assert_eq!(
        r.status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Checks one prediction against the reference probabilities: within [`TOL`], summing to 1,
/// class = argmax.
fn check_prediction(pred: &Value, want: &[f32], what: &str) {
    let probs: Vec<f64> = pred["probabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no probabilities in {pred}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(probs.len(), CLASSES, "{what}");
    for (k, (&p, &w)) in probs.iter().zip(want).enumerate() {
        assert!(
            (p - w as f64).abs() <= TOL,
            "{what}: probability {k} is {p}, one-at-a-time inference gives {w}"
        );
    }
    let sum: f64 = probs.iter().sum();
    assert!(
        (sum - 1.0).abs() <= 1e-5,
        "{what}: probabilities sum to {sum}"
    );
    let argmax = (0..CLASSES).fold(0, |b, k| if probs[k] > probs[b] { k } else { b });
    assert_eq!(pred["class"].as_u64(), Some(argmax as u64), "{what}: class");
}

fn predictions(r: &Resp, n: usize) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let preds = v["predictions"].as_array().expect("predictions").clone();
    assert_eq!(preds.len(), n);
    preds
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[test]
fn health_metrics_and_predictions_match_one_at_a_time_inference() {
    let _g = serial();
    for name in ["mlp", "mnist_cnn", "mnist_cnn_bn"] {
        let ckpt = write_checkpoint(name, 7);
        let mut reference = Reference::new(name, &ckpt);
        let server = Server::start(name, &ckpt, &["--max-batch", "8"]);
        let addr = server.addr;

        let h = get(addr, "/health");
        assert_eq!(h["status"], "ok");
        assert_eq!(h["model"], name);
        if backend() == "cpu" {
            assert_eq!(h["device"], "CPU reference backend");
        }

        // one input, flat and as 28 rows
        let img = image(1);
        let want = reference.predict(&img);
        let p = predictions(&post(addr, &json!({ "input": img })), 1);
        check_prediction(&p[0], &want, "flat input");
        let p = predictions(&post(addr, &json!({ "input": rows(&img) })), 1);
        check_prediction(&p[0], &want, "input as rows");

        // several inputs, mixing the two forms, answered in order (11 > max batch: two runs)
        let imgs: Vec<Vec<f32>> = (10..21).map(image).collect();
        let inputs: Vec<Value> = imgs
            .iter()
            .enumerate()
            .map(|(i, x)| if i % 2 == 0 { json!(x) } else { rows(x) })
            .collect();
        let p = predictions(&post(addr, &json!({ "inputs": inputs })), imgs.len());
        for (i, x) in imgs.iter().enumerate() {
            check_prediction(&p[i], &reference.predict(x), &format!("{name} inputs[{i}]"));
        }

        let m = get(addr, "/metrics");
        assert_eq!(m["requests"], 3, "{m}");
        assert_eq!(m["errors"], 0, "{m}");
        assert_eq!(m["predictions"], 13, "{m}");
        assert_eq!(m["batches"]["inputs"], 13, "{m}");
        let hist = m["batches"]["histogram"].as_array().unwrap();
        let sizes: Vec<u64> = hist
            .iter()
            .map(|b| b["batch_size"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, [1, 2, 4, 8]);
        for k in ["p50", "p90", "p99"] {
            assert!(m["latency_ms"][k].as_f64().unwrap() > 0.0, "{m}");
        }
        println!("{name}: metrics {m}");
        drop(server);
    }
}

/// `--f16` serves both models in mixed precision: probabilities within f16 precision of the f32
/// one-at-a-time inference (absolute 2e-2), summing to 1.
#[test]
fn f16_serving_matches_f32_inference_to_f16_precision() {
    let _g = serial();
    for name in ["mlp", "mnist_cnn"] {
        let ckpt = write_checkpoint(name, 11);
        let mut reference = Reference::new(name, &ckpt);
        let server = Server::start(name, &ckpt, &["--max-batch", "4", "--f16"]);
        let imgs: Vec<Vec<f32>> = (30..36).map(image).collect();
        let inputs: Vec<Value> = imgs.iter().map(|x| json!(x)).collect();
        let p = predictions(&post(server.addr, &json!({ "inputs": inputs })), imgs.len());
        for (i, x) in imgs.iter().enumerate() {
            let want = reference.predict(x);
            let probs: Vec<f64> = p[i]["probabilities"]
                .as_array()
                .expect("probabilities")
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (k, (&got, &w)) in probs.iter().zip(&want).enumerate() {
                assert!(
                    (got - w as f64).abs() <= 2e-2,
                    "{name} input {i}: probability {k} is {got} in f16, {w} in f32"
                );
            }
            assert!((probs.iter().sum::<f64>() - 1.0).abs() <= 1e-5);
        }
        drop(server);
    }
}

#[test]
fn bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving() {
    let _g = serial();
    let ckpt = write_checkpoint("mlp", 3);
    let mut reference = Reference::new("mlp", &ckpt);
    let server = Server::start("mlp", &ckpt, &["--max-batch", "4"]);
    let addr = server.addr;
    let good = image(5);
    let mut short = good.clone();
    short.pop();
    let mut ragged = rows(&good);
    ragged[3].as_array_mut().unwrap().pop();
    let nums = |s: &str| format!("{{\"input\": [{s}{}]}}", ", 0.5".repeat(PIXELS - 1));
    let too_many: Vec<Vec<f32>> = vec![good.clone(); 4 * 16 + 1];
    // just over 4 MiB of valid JSON
    let huge = format!(
        "{{\"input\": [{}0]}}",
        "0.000000001, ".repeat(4 * 1024 * 1024 / 13 + 10)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed JSON", b"{\"input\": [1, 2,".to_vec(), 400),
        ("not JSON", b"hello".to_vec(), 400),
        ("empty body", Vec::new(), 400),
        ("not an object", b"[1, 2, 3]".to_vec(), 400),
        ("no input field", b"{}".to_vec(), 400),
        ("unknown field", br#"{"image": [1]}"#.to_vec(), 400),
        (
            "input and inputs",
            json!({"input": good, "inputs": [good]})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "783 values",
            json!({ "input": short }).to_string().into_bytes(),
            400,
        ),
        ("785 values", nums("0.5, 0.5").into_bytes(), 400),
        (
            "a ragged row",
            json!({ "input": ragged }).to_string().into_bytes(),
            400,
        ),
        (
            "27 rows",
            json!({"input": rows(&good).as_array().unwrap()[..27]})
                .to_string()
                .into_bytes(),
            400,
        ),
        ("a string value", nums("\"x\"").into_bytes(), 400),
        ("a null value", nums("null").into_bytes(), 400),
        ("NaN", nums("NaN").into_bytes(), 400),
        ("Infinity", nums("Infinity").into_bytes(), 400),
        ("1e400", nums("1e400").into_bytes(), 400),
        ("1e39 (inf as f32)", nums("1e39").into_bytes(), 400),
        ("-1e39 (inf as f32)", nums("-1e39").into_bytes(), 400),
        ("input is a number", br#"{"input": 3}"#.to_vec(), 400),
        ("empty input", br#"{"input": []}"#.to_vec(), 400),
        ("empty inputs", br#"{"inputs": []}"#.to_vec(), 400),
        ("inputs not a list", br#"{"inputs": 5}"#.to_vec(), 400),
        (
            "an empty image in inputs",
            json!({"inputs": [good, []]}).to_string().into_bytes(),
            400,
        ),
        (
            "more inputs than max batch x 16",
            json!({ "inputs": too_many }).to_string().into_bytes(),
            413,
        ),
        ("body over 4 MiB", huge.into_bytes(), 413),
    ];
    for (what, body, status) in &cases {
        let r = http(addr, "POST", "/v1/predict", body);
        assert_eq!(
            r.status,
            *status,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let msg = r.json()["error"].as_str().map(str::to_string);
        assert!(
            msg.as_deref().is_some_and(|m| !m.is_empty()),
            "{what}: no error message"
        );
        println!("{what}: {} {}", r.status, msg.unwrap());
    }
    for (method, path, status) in [
        ("GET", "/v1/predict", 405),
        ("GET", "/nope", 404),
        ("POST", "/health", 405),
    ] {
        let r = http(addr, method, path, b"");
        assert_eq!(r.status, status, "{method} {path}");
        assert!(r.json()["error"].is_string(), "{method} {path}");
    }

    // still healthy, still right; the largest request allowed (4 x 16 inputs) runs in 16 chunks
    assert_eq!(get(addr, "/health")["status"], "ok");
    let imgs: Vec<Vec<f32>> = (100..164).map(image).collect();
    let p = predictions(&post(addr, &json!({ "inputs": imgs })), 64);
    for (i, x) in imgs.iter().enumerate() {
        check_prediction(&p[i], &reference.predict(x), &format!("inputs[{i}]"));
    }
    let m = get(addr, "/metrics");
    assert_eq!(m["client_errors"], cases.len() as u64, "{m}");
    assert_eq!(m["server_errors"], 0, "{m}");
    assert_eq!(m["requests"], cases.len() as u64 + 1, "{m}");
    assert_eq!(m["predictions"], 64, "{m}");
    assert_eq!(m["batches"]["runs"], 16, "{m}");
    drop(server);
}

#[test]
fn a_failing_run_gives_500_and_the_server_keeps_serving() {
    let _g = serial();
    let ckpt = write_checkpoint("mlp", 4);
    let mut reference = Reference::new("mlp", &ckpt);
    let marker = -1234.5f32;
    let server = Server::start(
        "mlp",
        &ckpt,
        &["--inject-fault-marker", &marker.to_string()],
    );
    let addr = server.addr;
    let good = image(9);
    let mut bad = image(10);
    bad[0] = marker;
    for body in [json!({ "input": bad }), json!({ "inputs": [good, bad] })] {
        let r = post(addr, &body);
        assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains("model run failed"), "{msg}");
        println!("500: {msg}");
    }
    assert_eq!(get(addr, "/health")["status"], "ok");
    let p = predictions(&post(addr, &json!({ "input": good })), 1);
    check_prediction(&p[0], &reference.predict(&good), "after the failure");
    let m = get(addr, "/metrics");
    assert_eq!(m["server_errors"], 2, "{m}");
    assert_eq!(m["errors"], 2, "{m}");
    assert_eq!(m["predictions"], 1, "{m}");
    drop(server);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let _g = serial();
    let ckpt = write_checkpoint("mnist_cnn", 5);
    let server = Server::start(
        "mnist_cnn",
        &ckpt,
        &["--queue", "1", "--no-batching", "--max-batch", "16"],
    );
    let addr = server.addr;
    // 16 clients at once, each with 16 images: the worker runs one, one waits, the rest are
    // turned away
    let clients = 16;
    let body = Arc::new(json!({ "inputs": (0..16).map(image).collect::<Vec<_>>() }).to_string());
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (body, barrier) = (body.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                barrier.wait();
                c.request("POST", "/v1/predict", body.as_bytes()).unwrap()
            })
        })
        .collect();
    let resps: Vec<Resp> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut rejected = 0;
    for r in &resps {
        match r.status {
            200 => assert_eq!(r.json()["predictions"].as_array().unwrap().len(), 16),
            503 => {
                rejected += 1;
                assert_eq!(r.header("retry-after"), Some("1"));
                assert!(r.json()["error"]
                    .as_str()
                    .unwrap()
                    .contains("queue is full"));
            }
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    println!("burst of {clients}: {rejected} answered 503");
    assert!(rejected > 0, "no request was turned away");
    assert!(rejected < clients, "every request was turned away");
    assert_eq!(get(addr, "/health")["status"], "ok");
    let m = get(addr, "/metrics");
    assert_eq!(m["rejected_queue_full"], rejected as u64, "{m}");
    assert_eq!(m["errors"], rejected as u64, "{m}");
    drop(server);
}

/// 32 clients x 20 requests, each with its own input, against a server with batching on and
/// one with batching off: every answer must equal one-at-a-time inference of its own input.
/// Prints throughput and client-side latency percentiles.
fn load_test(name: &str, budget: Duration) {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 20;
    let started = Instant::now();
    let ckpt = write_checkpoint(name, 11);
    let mut reference = Reference::new(name, &ckpt);
    let seed = |c: usize, i: usize| (1000 * c + i) as u64 + 1_000_000;
    let want: Arc<Vec<Vec<Vec<f32>>>> = Arc::new(
        (0..CLIENTS)
            .map(|c| {
                (0..REQUESTS)
                    .map(|i| reference.predict(&image(seed(c, i))))
                    .collect()
            })
            .collect(),
    );
    for (label, extra) in [
        ("batching on (max batch 64, window 2 ms)", &[][..]),
        ("batching off", &["--no-batching"][..]),
    ] {
        let server = Server::start(name, &ckpt, extra);
        let addr = server.addr;
        let device = get(addr, "/health")["device"].as_str().unwrap().to_string();
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (barrier, want) = (barrier.clone(), want.clone());
                std::thread::spawn(move || {
                    let bodies: Vec<String> = (0..REQUESTS)
                        .map(|i| json!({ "input": image(seed(c, i)) }).to_string())
                        .collect();
                    let mut conn = Conn::open(addr);
                    barrier.wait();
                    let mut latencies = Vec::with_capacity(REQUESTS);
                    for (i, body) in bodies.iter().enumerate() {
                        let t = Instant::now();
                        let r = conn
                            .request("POST", "/v1/predict", body.as_bytes())
                            .unwrap();
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        let p = predictions(&r, 1);
                        check_prediction(&p[0], &want[c][i], &format!("client {c} request {i}"));
                    }
                    latencies
                })
            })
            .collect();
        let mut lat: Vec<f64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("a client failed"))
            .collect();
        let secs = t0.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        assert_eq!(lat.len(), CLIENTS * REQUESTS);
        let m = get(addr, "/metrics");
        println!(
            "load test {name}, {label}, {} backend ({}): {} requests from {CLIENTS} clients in \
             {secs:.2} s = {:.0} requests/s, latency p50 {:.2} ms, p99 {:.2} ms; {} plan runs, \
             {:.2} inputs per run",
            backend(),
            device,
            lat.len(),
            lat.len() as f64 / secs,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            m["batches"]["runs"],
            m["batches"]["mean_inputs_per_run"].as_f64().unwrap(),
        );
        assert_eq!(m["predictions"], (CLIENTS * REQUESTS) as u64, "{m}");
        assert_eq!(m["errors"], 0, "{m}");
        let runs = m["batches"]["runs"].as_u64().unwrap();
        if extra.is_empty() {
            assert!(
                runs < (CLIENTS * REQUESTS) as u64,
                "no batching happened: {m}"
            );
        } else {
            assert_eq!(runs, (CLIENTS * REQUESTS) as u64, "{m}");
            assert_eq!(m["batches"]["histogram"][0]["runs"], runs, "{m}");
        }
        drop(server);
        assert!(
            started.elapsed() < budget,
            "the {name} load test took over {budget:?}"
        );
    }
}

#[test]
fn load_test_mlp_batching_on_and_off() {
    let _g = serial();
    load_test("mlp", Duration::from_secs(30));
}

#[test]
fn load_test_cnn_batching_on_and_off() {
    let _g = serial();
    load_test("mnist_cnn", Duration::from_secs(60));
}

#[test]
fn a_missing_or_bad_checkpoint_exits_with_a_clear_message() {
    let _g = serial();
    let dir = std::env::temp_dir();
    let missing = dir.join(format!(
        "kiln-serve-test-{}-missing.safetensors",
        std::process::id()
    ));
    let garbage = TempFile(dir.join(format!(
        "kiln-serve-test-{}-garbage.safetensors",
        std::process::id()
    )));
    std::fs::write(&*garbage, b"this is not a checkpoint").unwrap();
    let mlp = write_checkpoint("mlp", 1);
    // the MLP's names, fc1.weight transposed
    let transposed = TempFile(dir.join(format!(
        "kiln-serve-test-{}-transposed.safetensors",
        std::process::id()
    )));
    let dev = Device::cpu();
    for (n, t) in checkpoint::read(&mlp).unwrap() {
        let t = if n == "fc1.weight" {
            Tensor::zeros([784, 64])
        } else {
            t
        };
        dev.set_param(&n, &t).unwrap();
    }
    checkpoint::save_all(&dev, &transposed).unwrap();
    let cases: [(&str, &Path, &[&str]); 4] = [
        ("mlp", &missing, &["cannot load", "missing.safetensors"]),
        ("mlp", &garbage, &["cannot load", "not a valid safetensors"]),
        ("mnist_cnn", &mlp, &["cannot load", "conv1.weight"]),
        (
            "mlp",
            &transposed,
            &["cannot load", "fc1.weight", "[784, 64]"],
        ),
    ];
    for (model, path, words) in cases {
        let out = Command::new(BIN)
            .args(["--model", model, "--checkpoint"])
            .arg(path)
            .args(["--addr", "127.0.0.1:0", "--backend", "cpu"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{model} {}: {err}",
            path.display()
        );
        for w in words {
            assert!(
                err.contains(w),
                "{model} {}: {err:?} lacks {w:?}",
                path.display()
            );
        }
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
        println!("{}", err.trim());
    }
    let out = Command::new(BIN)
        .args(["--model", "resnet", "--checkpoint"])
        .arg(&*mlp)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad --model is a usage error");
}
