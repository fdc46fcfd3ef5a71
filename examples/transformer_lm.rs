//! A character-level transformer language model (GPT-style) over a text file (`--text PATH`;
//! without it, the crate's README.md, built in). Token (`tok`) and learned position (`pos`)
//! embeddings of `--d-model` (default 64), `--layers` (default 2) pre-norm
//! `nn::TransformerEncoderLayer`s (`layers.{i}`, `--heads` 4, feed-forward 4 x d_model, GELU,
//! dropout 0.1) with causal self-attention (the fused attention kernel), a final layer norm
//! (`ln_f`) and a Linear head (`head`) predict the next character at every position of windows
//! of `--seq` characters (default 64); cross-entropy over all `seq * batch` predictions, AdamW
//! (lr 3e-3, weight decay 0.01) with gradients clipped to a global norm of 1.0. An epoch is one
//! pass over the text in non-overlapping windows (phase and order shuffled each epoch, seeded).
//!
//! Each epoch prints the training loss and a sample: a decoding plan (compiled once) fed one
//! character per run, each layer's keys and values kept in its cache
//! (`nn::MultiheadAttention::apply_cached`), drawing the next character from
//! `softmax(logits / --temperature)`; with `--top-k K` among the K most likely characters only
//! (`Graph::topk` in the decoding plan: K values and positions read back, not the logits); with
//! `--top-p P` among the fewest most likely whose probability adds up to P (nucleus sampling,
//! on the device: `Graph::sort` of the logits, their softmax at the temperature and its
//! `cumsum`, the characters past the nucleus masked to -inf; with `--top-k` too, the nucleus
//! of the K).
//!
//! Expected: on the built-in README (about 20,000 characters, 88 distinct, 19 steps of 16
//! windows per epoch when this was measured; the numbers move a little as the README changes)
//! the training loss falls from ln(88) = 4.48 nats per character to 3.61 in epoch 1, 2.67 in
//! epoch 10, 2.42 in 20, 2.14 in 30 and 1.87 after the 40 default epochs (seed 0, lavapipe),
//! and the samples go from noise to README words ("kernel", "group", "adapters"); a transformer
//! this small learns more slowly per step than `char_lm`'s LSTM at first. On a 2-core machine
//! without a GPU an epoch takes about 16 s (0.85 s per step). Weights go to `checkpoints/transformer_lm.safetensors`
//! with torch's names (`layers.0.self_attn.in_proj_weight`, ...) and `vocab` (Unicode code
//! points as f32).
//!
//! `--f16` runs the layers in mixed precision (f16 activations; f32 parameters, loss and
//! AdamW) with dynamic loss scaling (`GradScaler`, torch's defaults: a logit's gradient, about
//! 1 / (tokens x vocabulary), is below f16's smallest value without it): the same first
//! epochs' losses (3.4968, 3.0420 on this README), 57 dispatches a step (f32: 56).
//!
//!     cargo run --release --example transformer_lm -- [--text FILE] [--backend gpu|cpu] [--epochs 40] [--f16]

#[path = "common/mod.rs"]
mod common;

use std::path::PathBuf;

use clap::Parser;
use common::{Backend, Corpus, Failure};
use kiln::nn::{
    Embedding, FeedForwardAct, GradScaler, Init, Layer, LayerNorm, Linear, Optimizer, TrainStep,
    TransformerEncoderLayer,
};
use kiln::{DType, Graph, NodeId, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The text used without `--text`.
const BUILT_IN: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));

#[derive(Parser, Debug)]
#[command(
    about = "Train a character-level transformer language model on a text file and sample from it"
)]
struct Args {
    /// Where to train (default: Device::new(), which honours KILN_BACKEND).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Passes over the text.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Seeds the initial weights, the windows, dropout and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the trained weights (safetensors).
    #[arg(long, default_value = "checkpoints/transformer_lm.safetensors")]
    save: PathBuf,
    /// The text to model (UTF-8); default: the crate's README.md.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Characters per window (the context length).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    seq: u32,
    /// Width of the embeddings and of every layer.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    d_model: u32,
    /// Attention heads (must divide --d-model).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    heads: u32,
    /// Transformer layers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    layers: u32,
    /// Dropout in training (attention probabilities, after each block, in the feed-forward).
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Windows per training step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// AdamW's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Characters sampled after each epoch.
    #[arg(long, default_value_t = 200)]
    sample_len: u32,
    /// Sampling temperature (0: always the most likely character).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the K most likely characters only (top-k sampling: `Graph::topk` on the
    /// device, K values and positions read back instead of the vocabulary's logits; 0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample within the nucleus: the fewest most likely characters whose probabilities (at
    /// the temperature) add up to P (top-p sampling, on the device; 1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Read the training loss back every N steps (each read waits for the device).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    log_every: u32,
    /// Mixed precision: the layers on f16 activations (f32 parameters, embeddings, loss and
    /// AdamW; the decoding caches f16), on adapters with SHADER_F16.
    #[arg(long)]
    f16: bool,
}

/// The model's layers, applied alike in the training and the sampling graph.
struct Model {
    tok: Embedding,
    pos: Embedding,
    layers: Vec<TransformerEncoderLayer>,
    ln_f: LayerNorm,
    head: Linear,
    /// The layers' activation type.
    dtype: DType,
}

impl Model {
    /// Logits `(batch * seq, V)` for token indices `x (batch, seq)` and positions `(seq)`.
    /// With `decode`, `x (1, 1)` is the token at `positions[0]` and each layer attends to its
    /// key/value cache of `window` rows through `decode.1`, the `(1, window)` mask.
    fn apply(
        &self,
        g: &Graph,
        x: NodeId,
        positions: NodeId,
        train: bool,
        decode: Option<(usize, NodeId)>,
    ) -> kiln::Result<(NodeId, Vec<NodeId>)> {
        let mut params = Vec::new();
        let (t, p) = self.tok.apply_layer(g, x, train)?;
        params.extend(p);
        let (ps, p) = self.pos.apply_layer(g, positions, train)?;
        params.extend(p);
        let mut h = g.cast(g.add(t, ps)?, self.dtype)?;
        for layer in &self.layers {
            let (y, p) = match decode {
                Some((window, mask)) => layer.apply_cached(g, h, positions, window, mask)?,
                None => layer.apply(g, h, None, true, train)?,
            };
            params.extend(p);
            h = y;
        }
        let (h, p) = self.ln_f.apply(g, h)?;
        params.extend(p);
        let d = g.shape(h).dims().to_vec();
        let flat = g.reshape(h, &[(d[0] * d[1]) as isize, d[2] as isize])?;
        let (logits, p) = self.head.apply(g, flat)?;
        params.extend(p);
        Ok((logits, params))
    }

    fn param_names(&self) -> Vec<String> {
        let mut names = self.tok.param_names();
        names.extend(self.pos.param_names());
        for l in &self.layers {
            names.extend(l.param_names());
        }
        names.extend(self.ln_f.param_names());
        names.extend(self.head.param_names());
        names
    }
}

fn main() -> Result<(), Failure> {
    let args = Args::parse();
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(format!("--lr must be a finite number > 0, got {}", args.lr).into());
    }
    if !(0.0..1.0).contains(&args.dropout) {
        return Err(format!("--dropout must be in [0, 1), got {}", args.dropout).into());
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        return Err(format!(
            "--temperature must be a finite number >= 0, got {}",
            args.temperature
        )
        .into());
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(format!("--top-p must be in (0, 1], got {}", args.top_p).into());
    }
    let corpus = Corpus::load(args.text.as_deref(), BUILT_IN)?;
    let (ids, v) = (&corpus.ids, corpus.vocab.len());
    let (seq, batch, e) = (
        args.seq as usize,
        args.batch_size as usize,
        args.d_model as usize,
    );
    corpus.check_windows(seq, batch)?;
    let dev = common::device(args.backend)?;

    let mut init = Init::new(args.seed);
    let layers = (0..args.layers)
        .map(|i| {
            let mut l = TransformerEncoderLayer::new(
                &format!("layers.{i}"),
                e,
                args.heads as usize,
                4 * e,
                &mut init,
            )?
            .with_dropout(args.dropout);
            l.norm_first = true;
            l.activation = FeedForwardAct::Gelu;
            Ok(l)
        })
        .collect::<kiln::Result<Vec<_>>>()?;
    let model = Model {
        tok: Embedding::new("tok", v, e, &mut init),
        pos: Embedding::new("pos", seq, e, &mut init),
        layers,
        ln_f: LayerNorm::new("ln_f", &[e]),
        head: Linear::new("head", e, v, &mut init),
        dtype: if args.f16 { DType::F16 } else { DType::F32 },
    };
    let positions = Tensor::new([seq], (0..seq).map(|i| i as f32).collect())?;

    // training: every next-character prediction of a batch of windows
    let g = Graph::new();
    let x = g.input("x", [batch, seq]);
    let pos = g.input("positions", [seq]);
    let y = g.input("y", [batch * seq]);
    let (logits, params) = model.apply(&g, x, pos, true, None)?;
    let loss = g.cross_entropy(logits, y)?;
    let mut optimizer = Optimizer::adamw(args.lr, 0.01).clip_grad_norm(1.0);
    if args.f16 {
        // mixed precision's small f16 gradients (a logit's is about 1 / (tokens x vocabulary)):
        // dynamic loss scaling, as torch.amp.GradScaler
        optimizer = optimizer.grad_scaler(GradScaler::default());
    }
    let mut train = TrainStep::new(
        &dev,
        &g,
        loss,
        &params,
        optimizer,
        args.seed.wrapping_add(2),
    )?;
    println!("training plan: {}", train.plan().info());

    // sampling: one token per run, dropout off, each layer's keys and values kept in its
    // cache of `seq` rows (nn::MultiheadAttention::apply_cached); when the window is full the
    // last half of it is fed again from position 0 (the position embeddings end at `seq`)
    let g = Graph::new();
    let sx = g.input("x", [1, 1]);
    let spos = g.input("positions", [1]);
    let smask = g.input("mask", [1, seq]);
    let (slogits, _) = model.apply(&g, sx, spos, false, Some((seq, smask)))?;
    // with --top-k: the k largest logits and their characters, in order; with --top-p the
    // logits sorted and those past the nucleus at -inf
    let mut outputs = match (args.top_k, args.top_p < 1.0) {
        (0, false) => vec![slogits],
        (0, true) => {
            let (values, positions) = g.sort(slogits, -1, true)?;
            vec![values, positions]
        }
        (k, _) => {
            let (values, positions) = g.topk(slogits, k.min(v), -1, true)?;
            vec![values, positions]
        }
    };
    if args.top_p < 1.0 && args.temperature > 0.0 {
        // a character stays while the probability of those before it is at most P (the first
        // always does), as Hugging Face's TopPLogitsWarper
        let probs = g.softmax(g.mul_scalar(outputs[0], 1.0 / args.temperature)?, -1)?;
        let before = g.sub(g.cumsum(probs, -1)?, probs)?;
        let past = g.gt(before, g.constant(Tensor::full([1], args.top_p)))?;
        outputs[0] = g.masked_fill(outputs[0], past, f32::NEG_INFINITY)?;
    }
    let mut sample_plan = dev.compile(&g, &outputs)?;
    println!("sampling plan (one token): {}", sample_plan.info());
    let mut sample_rng = StdRng::seed_from_u64(args.seed.wrapping_add(7));
    let mut sample = |rng: &mut StdRng| -> kiln::Result<String> {
        let mut context = vec![ids[0]];
        // the tokens the caches hold, in order, and the next one's logits
        let mut cached: Vec<usize> = Vec::new();
        // the next token's logits, or with --top-k the k largest and their characters
        let mut feed = |token: usize, cached: &mut Vec<usize>| -> kiln::Result<Vec<Tensor>> {
            let p = cached.len();
            let out = sample_plan.run(&[
                ("x", &Tensor::new([1, 1], vec![token as f32])?),
                ("positions", &Tensor::new([1], vec![p as f32])?),
                ("mask", &kiln::nn::decode_mask(p, 1, seq)),
            ])?;
            cached.push(token);
            Ok(out)
        };
        let mut logits = feed(ids[0], &mut cached)?;
        for _ in 0..args.sample_len {
            let pick = common::sample_logits(logits[0].data(), args.temperature, rng);
            let next = match logits.get(1) {
                Some(positions) => positions.data()[pick] as usize,
                None => pick,
            };
            context.push(next);
            if cached.len() == seq {
                let keep = cached[seq / 2..].to_vec();
                cached.clear();
                for t in keep {
                    feed(t, &mut cached)?;
                }
            }
            logits = feed(next, &mut cached)?;
        }
        Ok(corpus.text(&context))
    };

    let schedule = common::LmSchedule {
        epochs: args.epochs,
        seq,
        batch,
        log_every: args.log_every as usize,
        temperature: args.temperature,
        seed: args.seed.wrapping_add(1),
    };
    common::train_lm(
        &mut train,
        &corpus,
        &schedule,
        |idx| {
            let b = idx.len();
            let mut xs = vec![0f32; b * seq];
            let mut ys = vec![0f32; b * seq];
            for (k, &s) in idx.iter().enumerate() {
                for t in 0..seq {
                    xs[k * seq + t] = ids[s + t] as f32;
                    ys[k * seq + t] = ids[s + t + 1] as f32;
                }
            }
            Ok(vec![
                ("x", Tensor::new([b, seq], xs)?),
                ("positions", positions.clone()),
                ("y", Tensor::new([b * seq], ys)?),
            ])
        },
        || sample(&mut sample_rng),
    )?;
    corpus.save(&dev, &model.param_names(), &args.save)?;
    Ok(())
}
