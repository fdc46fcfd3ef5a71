//! Optimizers with torch.optim's update rules (SGD with momentum, dampening, Nesterov and weight
//! decay; Adam; AdamW; RMSprop, centered and with momentum; Adagrad), learning-rate schedules (step, multi-step, cosine, linear, polynomial, exponential; linear
//! warmup), clipping by global gradient norm and dynamic loss scaling for mixed precision
//! ([`GradScaler`]). `minimize` appends the backward pass and one fused in-place update kernel
//! per parameter to a graph; `hyper` gives the small per-step input (learning rate, bias
//! corrections) so that schedules never recompile.

use crate::error::{Error, Result};
use crate::graph::{Graph, NodeId};
use crate::ops::optim::{
    powi_by_squaring, Hyper, OptimKind, ScalerStep, HYPER_LEN, SCALER_STATE_LEN,
};
use crate::ops::Op;
use crate::tensor::Tensor;

/// Name of the per-step hyperparameter input.
pub const HYPER_INPUT: &str = "optim.hyper";

/// The update rule and its constants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)`.
    Sgd {
        momentum: f32,
        dampening: f32,
        weight_decay: f32,
        nesterov: bool,
    },
    /// `torch.optim.Adam(lr, betas, eps, weight_decay)`.
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    /// `torch.optim.AdamW(lr, betas, eps, weight_decay)`.
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    /// `torch.optim.RMSprop(lr, alpha, eps, weight_decay, momentum, centered)`.
    Rmsprop {
        alpha: f32,
        eps: f32,
        weight_decay: f32,
        momentum: f32,
        centered: bool,
    },
    /// `torch.optim.Adagrad(lr, lr_decay, weight_decay, initial_accumulator_value, eps)`.
    Adagrad {
        lr_decay: f32,
        weight_decay: f32,
        initial_accumulator_value: f32,
        eps: f32,
    },
}

/// The names of parameter nodes `params`, or an error naming one that is not.
pub(crate) fn param_names(g: &Graph, params: &[NodeId]) -> Result<Vec<String>> {
    let nodes = g.nodes();
    params
        .iter()
        .map(|p| match &nodes[p.0].op {
            Op::Param { name, .. } => Ok(name.clone()),
            other => Err(Error::Param(format!(
                "minimize: node {} is a {}, not a parameter",
                p.0,
                other.name()
            ))),
        })
        .collect()
}

/// How the learning rate evolves with the step count `t` (starting at 0).
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant,
    /// `StepLR`: `lr * gamma^floor(t / step_size)`.
    Step {
        step_size: u64,
        gamma: f32,
    },
    /// `CosineAnnealingLR`: `eta_min + (lr - eta_min)(1 + cos(pi t / t_max)) / 2`.
    Cosine {
        t_max: u64,
        eta_min: f32,
    },
    /// `LinearLR`: `lr` times a factor moving linearly from `start_factor` to `end_factor`
    /// over `total_iters` steps, then staying there (a transformer's linear decay: `1.0`, `0.0`).
    Linear {
        start_factor: f32,
        end_factor: f32,
        total_iters: u64,
    },
    /// `MultiStepLR(milestones, gamma)`: `lr * gamma^k`, `k` the milestones at or before `t`
    /// (a ResNet's decay at epochs 30, 60 and 90, counted in steps).
    MultiStep {
        milestones: Vec<u64>,
        gamma: f32,
    },
    /// `PolynomialLR(total_iters, power)`: `lr * (1 - min(t, total_iters) / total_iters)^power`
    /// (DeepLab's "poly" decay).
    Polynomial {
        total_iters: u64,
        power: f32,
    },
    /// `ExponentialLR`: `lr * gamma^t`.
    Exponential {
        gamma: f32,
    },
    /// `CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`: cosine annealing from `lr` to
    /// `eta_min` over `t_0` steps, then again over `t_0 * t_mult`, and so on.
    CosineWarmRestarts {
        t_0: u64,
        t_mult: u64,
        eta_min: f32,
    },
    /// `OneCycleLR(max_lr=lr, total_steps, pct_start, anneal_strategy="cos", div_factor,
    /// final_div_factor)` (torch's defaults: 0.3, 25, 1e4): cosine from `lr / div_factor` up to
    /// `lr` over the first `pct_start` of the steps, then down to `lr / div_factor /
    /// final_div_factor`. With `cycle_momentum` `(base, max)` (torch's default `(0.85, 0.95)`)
    /// SGD's momentum or Adam's `beta1` moves the other way, from `max` down to `base` and back
    /// (SGD and RMSprop then keep a momentum buffer, as torch's; Adagrad has none to cycle).
    /// Adam's bias correction takes the current `beta1`'s power, as torch's, under dynamic loss
    /// scaling too (where the scaler kernel counts the steps taken).
    OneCycle {
        total_steps: u64,
        pct_start: f32,
        div_factor: f32,
        final_div_factor: f32,
        cycle_momentum: Option<(f32, f32)>,
    },
}

impl Schedule {
    /// torch's checks of the schedule's arguments where a bad one would make the learning
    /// rate NaN: an error naming it.
    fn check(&self) -> Result<()> {
        let ok = match *self {
            Schedule::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
                cycle_momentum,
            } => {
                total_steps > 0
                    && (0.0..=1.0).contains(&pct_start)
                    && div_factor > 0.0
                    && final_div_factor > 0.0
                    && cycle_momentum.is_none_or(|(b, m)| b.is_finite() && m.is_finite())
            }
            _ => true,
        };
        match ok {
            true => Ok(()),
            false => Err(Error::Param(format!(
                "minimize: OneCycle needs total_steps > 0, pct_start in [0, 1], positive \
                 div factors and finite momenta, got {self:?}"
            ))),
        }
    }

    /// `OneCycleLR` with torch's defaults over `total_steps` (momentum cycled in (0.85, 0.95)).
    pub fn one_cycle(total_steps: u64) -> Schedule {
        Schedule::OneCycle {
            total_steps,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            cycle_momentum: Some((0.85, 0.95)),
        }
    }
}

/// torch's `_annealing_cos`: from `start` at `pct` 0 to `end` at 1 along a half cosine.
fn annealing_cos(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * ((std::f64::consts::PI * pct).cos() + 1.0)
}

/// `OneCycleLR`'s phase at step `t` of `total` (`pct_start` of them rising): `(pct, rising)`,
/// how far through its phase it is (torch's phases end at steps `pct_start * total - 1` and
/// `total - 1`).
fn one_cycle_phase(t: u64, total: u64, pct_start: f32) -> (f64, bool) {
    let end_up = pct_start as f64 * total as f64 - 1.0;
    let t = t.min(total.saturating_sub(1)) as f64;
    if t <= end_up {
        (t / end_up, true)
    } else {
        let end = total as f64 - 1.0;
        ((t - end_up) / (end - end_up), false)
    }
}

/// Whether a [`Plateau`]'s metric improves downwards (a loss) or upwards (an accuracy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlateauMode {
    Min,
    Max,
}

/// `torch.optim.lr_scheduler.ReduceLROnPlateau` (its defaults from [`Plateau::default`]):
/// after `patience` evaluations in a row without improvement the optimizer's learning rate is
/// multiplied by `factor` (not below `min_lr`), then `cooldown` evaluations pass before bad
/// ones count again. An improvement beats the best so far by `threshold`, relative
/// (`best * (1 - threshold)` in min mode) or absolute (`threshold_abs`). It changes
/// [`Optimizer::lr`], the base rate the schedule scales, between steps: the learning rate
/// reaches the plan in the hyperparameter input, so nothing is compiled again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plateau {
    pub mode: PlateauMode,
    pub factor: f32,
    pub patience: u32,
    pub threshold: f64,
    pub threshold_abs: bool,
    pub cooldown: u32,
    pub min_lr: f32,
    /// A reduction smaller than this is not made (torch's `eps`).
    pub eps: f32,
    /// The best metric so far (none before the first: any beats it, whatever the mode).
    best: Option<f64>,
    bad: u32,
    cooling: u32,
}

impl Default for Plateau {
    fn default() -> Self {
        Plateau {
            mode: PlateauMode::Min,
            factor: 0.1,
            patience: 10,
            threshold: 1e-4,
            threshold_abs: false,
            cooldown: 0,
            min_lr: 0.0,
            eps: 1e-8,
            best: None,
            bad: 0,
            cooling: 0,
        }
    }
}

impl Plateau {
    /// Torch's defaults in `mode` (`factor` 0.1, `patience` 10, relative `threshold` 1e-4).
    pub fn new(mode: PlateauMode) -> Self {
        Plateau {
            mode,
            ..Default::default()
        }
    }

    /// The factor the learning rate is multiplied by (torch: 0.1).
    pub fn factor(mut self, f: f32) -> Self {
        self.factor = f;
        self
    }
    /// Evaluations without improvement tolerated (torch: 10).
    pub fn patience(mut self, n: u32) -> Self {
        self.patience = n;
        self
    }
    /// The improvement that counts: relative (`abs` false, torch's `"rel"`) or absolute.
    pub fn threshold(mut self, t: f64, abs: bool) -> Self {
        self.threshold = t;
        self.threshold_abs = abs;
        self
    }
    /// Evaluations after a reduction before bad ones count again (torch: 0).
    pub fn cooldown(mut self, n: u32) -> Self {
        self.cooldown = n;
        self
    }
    /// The learning rate's floor (torch: 0).
    pub fn min_lr(mut self, lr: f32) -> Self {
        self.min_lr = lr;
        self
    }

    /// The best metric so far (torch's starting value, the mode's worst, before the first).
    pub fn best(&self) -> f64 {
        self.best.unwrap_or(match self.mode {
            PlateauMode::Min => f64::INFINITY,
            PlateauMode::Max => f64::NEG_INFINITY,
        })
    }

    fn improves(&self, v: f64) -> bool {
        let Some(best) = self.best else {
            return true;
        };
        let t = self.threshold;
        match (self.mode, self.threshold_abs) {
            (PlateauMode::Min, false) => v < best * (1.0 - t),
            (PlateauMode::Min, true) => v < best - t,
            (PlateauMode::Max, false) => v > best * (1.0 + t),
            (PlateauMode::Max, true) => v > best + t,
        }
    }

    /// Takes one evaluation's metric, reducing `opt`'s learning rate where it has stopped
    /// improving; returns whether it did. An error where `factor` is not in `[0, 1)` (torch's
    /// check) or the metric is NaN.
    pub fn step(&mut self, metric: f64, opt: &mut Optimizer) -> Result<bool> {
        if !(0.0..1.0).contains(&self.factor) {
            return Err(Error::Param(format!(
                "Plateau: factor should be < 1.0 and >= 0, got {}",
                self.factor
            )));
        }
        if metric.is_nan() {
            return Err(Error::Param("Plateau: the metric is NaN".into()));
        }
        if self.improves(metric) {
            self.best = Some(metric);
            self.bad = 0;
        } else {
            self.bad += 1;
        }
        if self.cooling > 0 {
            self.cooling -= 1;
            self.bad = 0;
        }
        if self.bad <= self.patience {
            return Ok(false);
        }
        self.cooling = self.cooldown;
        self.bad = 0;
        let new = (opt.lr * self.factor).max(self.min_lr);
        let reduced = opt.lr - new > self.eps;
        if reduced {
            opt.lr = new;
        }
        Ok(reduced)
    }
}

/// Dynamic loss scaling, as `torch.amp.GradScaler` (its defaults): the loss is multiplied by a
/// scale before the backward pass, so that small f16 gradients do not flush to zero, and the
/// gradients divided by it before clipping and the update; a step whose gradients are not all
/// finite is skipped (parameters and optimizer states unchanged, the optimizer's step count
/// not advanced) and the scale multiplied by `backoff_factor`; after `growth_interval` steps in
/// a row without one, by `growth_factor`. All of it on the device, in the step's one
/// submission: the scale and its counters are a parameter, `optim.grad_scaler.<first
/// parameter>` `[scale, growth_tracker, steps, ..]`, saved with checkpoints
/// ([`crate::nn::TrainStep::scaler_state`] reads it). One difference from torch: the check
/// reads the scaled gradients' sum of squares, which also overflows where finite gradients
/// reach about 1e19 together; such a step is skipped and the scale backs off too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScaler {
    pub init_scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
}

impl GradScaler {
    /// Name of the scaler's state parameter in a model whose first trained parameter is
    /// `first`.
    pub fn state_name(first: &str) -> String {
        format!("optim.grad_scaler.{first}")
    }
}

/// What a [`GradScaler`]'s state says (`TrainStep::scaler_state`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerState {
    /// The scale the next step multiplies its loss by (torch: `scaler.get_scale()`).
    pub scale: f32,
    /// Steps in a row without a skip since the scale last moved.
    pub growth_tracker: u32,
    /// Steps the optimizer took (not skipped).
    pub steps_taken: u64,
}

impl ScalerState {
    /// Reads a state parameter's values.
    pub fn from_tensor(t: &Tensor) -> Result<ScalerState> {
        match t.data() {
            [scale, tracker, steps, ..] if t.numel() == SCALER_STATE_LEN => Ok(ScalerState {
                scale: *scale,
                growth_tracker: *tracker as u32,
                steps_taken: *steps as u64,
            }),
            _ => Err(Error::Param(format!(
                "a grad scaler's state has {SCALER_STATE_LEN} elements, got {}",
                t.shape()
            ))),
        }
    }
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// An optimizer: rule, base learning rate, schedule, optional linear warmup, clipping and loss
/// scaling.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub rule: Rule,
    pub lr: f32,
    pub schedule: Schedule,
    /// Steps of linear warmup from `lr / warmup` (`LinearLR`-style, start factor `1/warmup`).
    pub warmup: u64,
    /// Clip gradients so that their global L2 norm is at most this (`clip_grad_norm_`).
    pub clip_norm: Option<f32>,
    /// Dynamic loss scaling (mixed precision), where set.
    pub grad_scaler: Option<GradScaler>,
    /// Clamp each gradient element to `[-v, v]` (`clip_grad_value_`, of the unscaled
    /// gradients, after clipping by norm where both are set), inside the update kernels.
    pub clip_value: Option<f32>,
    /// Keep an exponential moving average of each parameter with this decay (see
    /// [`Optimizer::ema`]), where set.
    pub ema: Option<f32>,
    step: u64,
}

impl Optimizer {
    fn with(rule: Rule, lr: f32) -> Self {
        Optimizer {
            rule,
            lr,
            schedule: Schedule::Constant,
            warmup: 0,
            clip_norm: None,
            grad_scaler: None,
            clip_value: None,
            ema: None,
            step: 0,
        }
    }
    /// Plain SGD.
    pub fn sgd(lr: f32) -> Self {
        Self::with(
            Rule::Sgd {
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
            lr,
        )
    }
    /// SGD with momentum (and Nesterov when asked).
    pub fn sgd_momentum(lr: f32, momentum: f32, nesterov: bool) -> Self {
        Self::with(
            Rule::Sgd {
                momentum,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov,
            },
            lr,
        )
    }
    /// Adam with torch's defaults (betas 0.9, 0.999; eps 1e-8).
    pub fn adam(lr: f32) -> Self {
        Self::with(
            Rule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            lr,
        )
    }
    /// AdamW with torch's defaults (betas 0.9, 0.999; eps 1e-8) and this weight decay.
    pub fn adamw(lr: f32, weight_decay: f32) -> Self {
        Self::with(
            Rule::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay,
            },
            lr,
        )
    }
    /// RMSprop with torch's defaults (alpha 0.99, eps 1e-8, no momentum, not centered).
    pub fn rmsprop(lr: f32) -> Self {
        Self::with(
            Rule::Rmsprop {
                alpha: 0.99,
                eps: 1e-8,
                weight_decay: 0.0,
                momentum: 0.0,
                centered: false,
            },
            lr,
        )
    }
    /// Adagrad with torch's defaults (no learning-rate decay, accumulators from 0, eps 1e-10).
    pub fn adagrad(lr: f32) -> Self {
        Self::with(
            Rule::Adagrad {
                lr_decay: 0.0,
                weight_decay: 0.0,
                initial_accumulator_value: 0.0,
                eps: 1e-10,
            },
            lr,
        )
    }
    /// Sets L2 weight decay (SGD, Adam, RMSprop, Adagrad) or decoupled decay (AdamW).
    pub fn weight_decay(mut self, wd: f32) -> Self {
        match &mut self.rule {
            Rule::Sgd { weight_decay, .. }
            | Rule::Adam { weight_decay, .. }
            | Rule::AdamW { weight_decay, .. }
            | Rule::Rmsprop { weight_decay, .. }
            | Rule::Adagrad { weight_decay, .. } => *weight_decay = wd,
        }
        self
    }
    /// Sets SGD's and RMSprop's momentum (0: none).
    pub fn momentum(mut self, m: f32) -> Self {
        if let Rule::Sgd { momentum, .. } | Rule::Rmsprop { momentum, .. } = &mut self.rule {
            *momentum = m;
        }
        self
    }
    /// Sets RMSprop's `alpha` (its square average's decay; torch's default 0.99).
    pub fn alpha(mut self, a: f32) -> Self {
        if let Rule::Rmsprop { alpha, .. } = &mut self.rule {
            *alpha = a;
        }
        self
    }
    /// Makes RMSprop centered (the gradient's variance, not its second moment, under the root).
    pub fn centered(mut self, on: bool) -> Self {
        if let Rule::Rmsprop { centered, .. } = &mut self.rule {
            *centered = on;
        }
        self
    }
    /// Sets Adagrad's `lr_decay` (the learning rate at step t is `lr / (1 + t lr_decay)`) and
    /// `initial_accumulator_value`.
    pub fn adagrad_options(mut self, decay: f32, initial: f32) -> Self {
        if let Rule::Adagrad {
            lr_decay,
            initial_accumulator_value,
            ..
        } = &mut self.rule
        {
            (*lr_decay, *initial_accumulator_value) = (decay, initial);
        }
        self
    }
    /// Sets Adam's and AdamW's `betas` (the decay rates of the gradient's first and second
    /// moments; torch's default `(0.9, 0.999)`).
    pub fn betas(mut self, b1: f32, b2: f32) -> Self {
        if let Rule::Adam { beta1, beta2, .. } | Rule::AdamW { beta1, beta2, .. } = &mut self.rule {
            (*beta1, *beta2) = (b1, b2);
        }
        self
    }
    /// Sets Adam's, AdamW's, RMSprop's and Adagrad's `eps` (added to the denominator's square
    /// root; torch's default 1e-8, Adagrad's 1e-10).
    pub fn eps(mut self, e: f32) -> Self {
        if let Rule::Adam { eps, .. }
        | Rule::AdamW { eps, .. }
        | Rule::Rmsprop { eps, .. }
        | Rule::Adagrad { eps, .. } = &mut self.rule
        {
            *eps = e;
        }
        self
    }
    /// Sets SGD's dampening.
    pub fn dampening(mut self, d: f32) -> Self {
        if let Rule::Sgd { dampening, .. } = &mut self.rule {
            *dampening = d;
        }
        self
    }
    /// Sets the schedule.
    pub fn schedule(mut self, s: Schedule) -> Self {
        self.schedule = s;
        self
    }
    /// Sets linear warmup steps.
    pub fn warmup(mut self, steps: u64) -> Self {
        self.warmup = steps;
        self
    }
    /// Clips gradients by global norm.
    pub fn clip_grad_norm(mut self, max_norm: f32) -> Self {
        self.clip_norm = Some(max_norm);
        self
    }
    /// Clamps each gradient element to `[-v, v]` (`clip_grad_value_`; `v > 0`): the update
    /// kernels clamp what they read, no kernel of its own.
    pub fn clip_grad_value(mut self, v: f32) -> Self {
        self.clip_value = Some(v);
        self
    }
    /// Scales the loss dynamically (see [`GradScaler`]; `GradScaler::default()` is torch's).
    pub fn grad_scaler(mut self, s: GradScaler) -> Self {
        self.grad_scaler = Some(s);
        self
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Keeps an exponential moving average of every parameter, as torch's
    /// `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))` with
    /// `update_parameters` after each `optimizer.step()`: the parameter's copy after the first
    /// step, then `ema + (1 - decay) (p - ema)` after each (with a loss scaler, after each step
    /// taken: a skipped first step copies again). The averages are parameters named
    /// [`Optimizer::ema_name`], saved with the others by `checkpoint::save_all`; one kernel
    /// for all of them, in the step's plan. Evaluate with them by giving a model's parameters
    /// their values (`Device::set_param`).
    pub fn ema(mut self, decay: f32) -> Self {
        self.ema = Some(decay);
        self
    }

    /// The name of parameter `param`'s moving average ([`Optimizer::ema`]).
    pub fn ema_name(param: &str) -> String {
        format!("ema.{param}")
    }

    /// Sets the step count (after loading a checkpoint).
    pub fn set_steps(&mut self, t: u64) {
        self.step = t;
    }

    fn kind(&self) -> OptimKind {
        // a cycled momentum (OneCycleLR's) is never 0: torch's SGD and RMSprop keep a buffer
        let cycled = self.momentum_at(0).is_some();
        match self.rule {
            Rule::Sgd {
                momentum, nesterov, ..
            } if momentum != 0.0 || cycled => OptimKind::SgdMomentum { nesterov },
            Rule::Sgd { .. } => OptimKind::Sgd,
            Rule::Adam { .. } => OptimKind::Adam { decoupled: false },
            Rule::AdamW { .. } => OptimKind::Adam { decoupled: true },
            Rule::Rmsprop {
                momentum, centered, ..
            } => OptimKind::Rmsprop {
                centered,
                momentum: momentum != 0.0 || cycled,
            },
            Rule::Adagrad { .. } => OptimKind::Adagrad,
        }
    }

    /// The learning rate at step `t` (0-based) after schedule and warmup.
    pub fn lr_at(&self, t: u64) -> f32 {
        let base = match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Step { step_size, gamma } => {
                self.lr * gamma.powi((t / step_size.max(1)) as i32)
            }
            Schedule::Cosine { t_max, eta_min } => {
                let tt = t.min(t_max) as f64 / t_max.max(1) as f64;
                (eta_min as f64
                    + (self.lr - eta_min) as f64 * (1.0 + (std::f64::consts::PI * tt).cos()) / 2.0)
                    as f32
            }
            Schedule::Linear {
                start_factor,
                end_factor,
                total_iters,
            } => {
                let done = t.min(total_iters) as f64 / total_iters.max(1) as f64;
                let factor = start_factor as f64 + (end_factor - start_factor) as f64 * done;
                (self.lr as f64 * factor) as f32
            }
            Schedule::MultiStep {
                ref milestones,
                gamma,
            } => {
                // torch counts a milestone listed twice twice
                let passed = milestones.iter().filter(|&&m| m <= t).count();
                (self.lr as f64 * (gamma as f64).powi(passed as i32)) as f32
            }
            Schedule::Polynomial { total_iters, power } => {
                let done = t.min(total_iters) as f64 / total_iters.max(1) as f64;
                (self.lr as f64 * (1.0 - done).powf(power as f64)) as f32
            }
            Schedule::Exponential { gamma } => {
                (self.lr as f64 * (gamma as f64).powf(t as f64)) as f32
            }
            Schedule::CosineWarmRestarts {
                t_0,
                t_mult,
                eta_min,
            } => {
                // the restart t falls in: periods t_0, t_0 t_mult, t_0 t_mult^2, ..
                let (mut start, mut period) = (0u64, t_0.max(1));
                while t >= start + period {
                    start += period;
                    period = period.saturating_mul(t_mult.max(1));
                }
                let cur = (t - start) as f64 / period as f64;
                (eta_min as f64
                    + (self.lr - eta_min) as f64 * (1.0 + (std::f64::consts::PI * cur).cos()) / 2.0)
                    as f32
            }
            Schedule::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
                ..
            } => {
                let initial = self.lr as f64 / div_factor as f64;
                let min = initial / final_div_factor as f64;
                match one_cycle_phase(t, total_steps, pct_start) {
                    (pct, true) => annealing_cos(initial, self.lr as f64, pct) as f32,
                    (pct, false) => annealing_cos(self.lr as f64, min, pct) as f32,
                }
            }
        };
        if self.warmup > 0 && t < self.warmup {
            base * (t + 1) as f32 / self.warmup as f32
        } else {
            base
        }
    }

    /// Appends to `g` the gradients of `loss` for `params` (parameter nodes), optional clipping,
    /// loss scaling, and one in-place update per parameter; returns the update nodes (compile
    /// them as effects: `Device::compile_with(g, &[loss], &updates)`). State tensors are
    /// parameters named `optim.<param>.<state>` (torch's state keys: `exp_avg`, `exp_avg_sq`,
    /// `momentum_buffer`, `square_avg`, `grad_avg`, `sum`)
    /// and `optim.grad_scaler.<first param>`, saved with checkpoints.
    pub fn minimize(&self, g: &Graph, loss: NodeId, params: &[NodeId]) -> Result<Vec<NodeId>> {
        let grads = self.gradients(g, loss, params)?;
        self.apply(g, params, &grads)
    }

    /// The first half of [`Optimizer::minimize`]: the gradients of `loss` for `params`, of the
    /// loss times the scale where the loss is scaled (its state parameter made here).
    pub fn gradients(&self, g: &Graph, loss: NodeId, params: &[NodeId]) -> Result<Vec<NodeId>> {
        let names = param_names(g, params)?;
        let Some(scaler) = self.grad_scaler else {
            return g.grad(loss, params);
        };
        let Some(first) = names.first() else {
            return Err(Error::Param("minimize: no parameters".into()));
        };
        // torch's checks, and a scale f32 holds
        let GradScaler {
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
        } = scaler;
        let valid = init_scale.is_finite()
            && init_scale > 0.0
            && growth_factor.is_finite()
            && growth_factor > 1.0
            && backoff_factor > 0.0
            && backoff_factor < 1.0
            && growth_interval > 0;
        if !valid {
            return Err(Error::Param(format!(
                "minimize: a grad scaler needs a finite init_scale > 0, a finite \
                 growth_factor > 1, a backoff_factor in (0, 1) and a growth_interval > 0, \
                 got {scaler:?}"
            )));
        }
        let mut init = vec![0.0; SCALER_STATE_LEN];
        init[0] = scaler.init_scale;
        let state = g.param_init(
            &GradScaler::state_name(first),
            Tensor::new([SCALER_STATE_LEN], init)?,
        );
        // the scale as the loss's shape (one element, a view of the state) seeds the backward
        // pass: the gradients of the scaled loss
        let dims: Vec<isize> = g.shape(loss).dims().iter().map(|&d| d as isize).collect();
        let scale = g.reshape(g.narrow(state, 0, 0, 1)?, &dims)?;
        g.grad_with_seed(loss, Some(scale), params)
    }

    /// The second half of [`Optimizer::minimize`]: clipping, loss scaling's unscaling and skip,
    /// and one in-place update per parameter from `grads` (as [`Optimizer::gradients`] gives
    /// them, or sums of them over micro-batches); returns the update nodes.
    pub fn apply(&self, g: &Graph, params: &[NodeId], grads: &[NodeId]) -> Result<Vec<NodeId>> {
        let names = param_names(g, params)?;
        self.schedule.check()?;
        if let Some(v) = self.clip_value.filter(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::Param(format!(
                "minimize: clip_grad_value needs a finite bound > 0, got {v}"
            )));
        }
        if grads.len() != params.len() {
            return Err(Error::Param(format!(
                "minimize: {} gradients for {} parameters",
                grads.len(),
                params.len()
            )));
        }
        let hyper = g
            .find_input(HYPER_INPUT)
            .unwrap_or_else(|| g.input(HYPER_INPUT, [HYPER_LEN]));
        if let Some(scaler) = self.grad_scaler {
            let Some(first) = names.first() else {
                return Err(Error::Param("minimize: no parameters".into()));
            };
            let Some(state) = g.find_param(&GradScaler::state_name(first)) else {
                return Err(Error::Param(
                    "minimize: the gradients of a scaled loss come from Optimizer::gradients"
                        .into(),
                ));
            };
            let step = ScalerStep {
                growth_factor: scaler.growth_factor,
                backoff_factor: scaler.backoff_factor,
                growth_interval: scaler.growth_interval,
                max_norm: self.clip_norm,
                partials: 0,
                cycled_beta1: self.momentum_at(0).is_some()
                    && matches!(self.rule, Rule::Adam { .. } | Rule::AdamW { .. }),
            };
            let hyper = g.grad_scaler(step, hyper, g.sum_squares(grads)?, state)?;
            // unscaling and clipping are the scaler's: the updates' own scale is 1
            let one = g.constant(Tensor::full([1], 1.0));
            return self.updates(g, hyper, one, params, grads, &names);
        }
        let scale = match self.clip_norm {
            None => g.constant(Tensor::full([1], 1.0)),
            Some(max_norm) => {
                // coefficient = min(1, max_norm / (norm + 1e-6)), as clip_grad_norm_
                if grads.is_empty() {
                    return Err(Error::Param("minimize: no parameters".into()));
                }
                // one multi-tensor kernel of partial sums, one reduction
                let norm = g.sqrt(g.sum_squares(grads)?)?;
                let coef = g.rdiv_scalar(g.add_scalar(norm, 1e-6)?, max_norm)?;
                g.minimum(coef, g.constant(Tensor::full([1], 1.0)))?
            }
        };
        self.updates(g, hyper, scale, params, grads, &names)
    }

    /// One in-place update per parameter, reading `hyper` and the gradient scale `scale`.
    fn updates(
        &self,
        g: &Graph,
        hyper: NodeId,
        scale: NodeId,
        params: &[NodeId],
        grads: &[NodeId],
        names: &[String],
    ) -> Result<Vec<NodeId>> {
        let kind = self.kind();
        // torch's states start at 0 but Adagrad's sums, at initial_accumulator_value
        let start = match self.rule {
            Rule::Adagrad {
                initial_accumulator_value: v,
                ..
            } if v != 0.0 => Some(v),
            _ => None,
        };
        let mut updates = Vec::new();
        for ((&p, &gr), name) in params.iter().zip(grads).zip(names) {
            let shape = g.shape(p);
            let states: Vec<NodeId> = kind
                .state_names()
                .iter()
                .map(|s| {
                    let name = format!("optim.{name}.{s}");
                    match start {
                        Some(v) => g.param_init(&name, Tensor::full(shape.clone(), v)),
                        None => g.param(&name, shape.clone()),
                    }
                })
                .collect();
            updates.push(g.optim_step(kind, hyper, scale, gr, p, &states)?);
        }
        if let Some(decay) = self.ema {
            // after every update: each average reads its parameter's new value
            let n = updates.len();
            for (k, name) in names.iter().enumerate() {
                let ema = g.param(&Self::ema_name(name), g.shape(params[k]));
                updates.push(g.ema_update(hyper, updates[k], ema, decay)?);
            }
            debug_assert_eq!(updates.len(), 2 * n);
        }
        Ok(updates)
    }

    /// SGD's momentum or Adam's `beta1` at step `t` where the schedule cycles it
    /// ([`Schedule::OneCycle`]), else `None` (the rule's own).
    pub fn momentum_at(&self, t: u64) -> Option<f32> {
        let Schedule::OneCycle {
            total_steps,
            pct_start,
            cycle_momentum: Some((base, max)),
            ..
        } = self.schedule
        else {
            return None;
        };
        let m = match one_cycle_phase(t, total_steps, pct_start) {
            (pct, true) => annealing_cos(max as f64, base as f64, pct),
            (pct, false) => annealing_cos(base as f64, max as f64, pct),
        };
        Some(m as f32)
    }

    /// The hyperparameter vector for the next step, advancing the step count.
    pub fn next_hyper(&mut self) -> Tensor {
        let t = self.step;
        self.step += 1;
        let lr = self.lr_at(t);
        let mut rule = self.rule;
        if let Some(m) = self.momentum_at(t) {
            match &mut rule {
                Rule::Sgd { momentum, .. } | Rule::Rmsprop { momentum, .. } => *momentum = m,
                Rule::Adam { beta1, .. } | Rule::AdamW { beta1, .. } => *beta1 = m,
                Rule::Adagrad { .. } => {}
            }
        }
        let tp = (t + 1).min(u32::MAX as u64) as u32;
        let h = match rule {
            Rule::Sgd {
                momentum,
                dampening,
                weight_decay,
                ..
            } => Hyper {
                lr,
                weight_decay,
                momentum,
                dampening,
                first_step: t == 0,
                ..Default::default()
            },
            Rule::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            }
            | Rule::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => Hyper {
                lr,
                weight_decay,
                beta1,
                beta2,
                eps,
                bias_correction1: 1.0 - powi_by_squaring(beta1, tp),
                bias_correction2_sqrt: (1.0 - powi_by_squaring(beta2, tp)).sqrt(),
                ..Default::default()
            },
            Rule::Rmsprop {
                alpha,
                eps,
                weight_decay,
                momentum,
                ..
            } => Hyper {
                lr,
                weight_decay,
                momentum,
                eps,
                alpha,
                ..Default::default()
            },
            // torch: clr = lr / (1 + (step - 1) lr_decay), step counted from 1
            Rule::Adagrad {
                lr_decay,
                weight_decay,
                eps,
                ..
            } => Hyper {
                lr: lr / (1.0 + t as f32 * lr_decay),
                weight_decay,
                eps,
                ..Default::default()
            },
        };
        Hyper {
            clip_value: self.clip_value.unwrap_or(0.0),
            // (SGD's momentum buffer and the moving averages start from it)
            first_step: t == 0,
            ..h
        }
        .to_tensor()
    }
}
