//! Fused optimizer updates (SGD with momentum, Nesterov and weight decay; Adam; AdamW; RMSprop,
//! centered and with momentum; Adagrad), applied in place to a parameter and its state on the
//! device, with torch.optim's arithmetic.
//! Kernel: `shaders/optim.wgsl`.
//!
//! An update is a graph node with inputs `[hyper, scale, grad, param, state..]`; it writes the
//! parameter and state buffers in place and has no buffer of its own (its value is the updated
//! parameter). `hyper` is a small input fed every step (learning rate, bias corrections), so
//! schedules never recompile.
//!
//! Dynamic loss scaling (`torch.amp.GradScaler`) is [`ScalerStep`]: one thread that reads the
//! sum of squares of the scaled gradients and the scaler's state (a parameter: the scale, its
//! growth tracker, the optimizer's own step count) and writes the `hyper` the updates read: the
//! unscaling factor (with clipping's coefficient), a skip flag where a gradient is not finite
//! (every update then leaves its parameter and states as they are, as torch skips
//! `optimizer.step()`), and the bias corrections and first-step flag of the steps taken, not
//! skipped, as torch's optimizers count them. It moves the scale as `GradScaler.update` does,
//! on the device: no readback decides anything.

use super::{groups, KernelSpec};
use crate::tensor::{Shape, Tensor};

/// Length of the hyperparameter vector.
pub const HYPER_LEN: usize = 16;
/// Index in the hyperparameter vector of the factor every gradient is multiplied by (with the
/// clipping coefficient): 1 as the host feeds it, `1 / scale` times clipping's coefficient as
/// [`ScalerStep`] writes it.
pub const HYPER_GRAD_SCALE: usize = 10;
/// Index in the hyperparameter vector of the skip flag: nonzero where [`ScalerStep`] found a
/// gradient that is not finite (the updates then change nothing).
pub const HYPER_SKIP: usize = 11;
/// Index in the hyperparameter vector of RMSprop's `alpha` (its square average's decay).
pub const HYPER_ALPHA: usize = 12;
/// Index in the hyperparameter vector of the value gradients are clamped to (0: none).
pub const HYPER_CLIP_VALUE: usize = 13;
/// Length of a [`ScalerStep`]'s state: `[scale, growth_tracker, steps, s1, s2, 0, 0, 0]`, where
/// `steps` counts the steps taken (not skipped) and `s1`, `s2` are `sum_{k < steps} beta^k` of
/// the two betas (`1 - beta^t = (1 - beta) s`, exact in f32 where `beta^t` is not).
pub const SCALER_STATE_LEN: usize = 8;

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimKind {
    /// Plain SGD (inputs: hyper, scale, grad, param).
    Sgd,
    /// SGD with a momentum buffer (inputs: .., param, momentum_buffer).
    SgdMomentum { nesterov: bool },
    /// Adam, or AdamW when `decoupled` (inputs: .., param, exp_avg, exp_avg_sq).
    Adam { decoupled: bool },
    /// RMSprop (inputs: .., param, square_avg, then momentum_buffer with `momentum`, then
    /// grad_avg when `centered`).
    Rmsprop { centered: bool, momentum: bool },
    /// Adagrad (inputs: .., param, sum).
    Adagrad,
}

impl OptimKind {
    /// Number of state tensors kept per parameter.
    pub fn n_states(&self) -> usize {
        match self {
            OptimKind::Sgd => 0,
            OptimKind::SgdMomentum { .. } => 1,
            OptimKind::Adam { .. } => 2,
            OptimKind::Rmsprop { centered, momentum } => {
                1 + *momentum as usize + *centered as usize
            }
            OptimKind::Adagrad => 1,
        }
    }
    /// Names of the state tensors, PyTorch's state keys.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            OptimKind::Sgd => &[],
            OptimKind::SgdMomentum { .. } => &["momentum_buffer"],
            OptimKind::Adam { .. } => &["exp_avg", "exp_avg_sq"],
            OptimKind::Rmsprop { centered, momentum } => match (momentum, centered) {
                (false, false) => &["square_avg"],
                (true, false) => &["square_avg", "momentum_buffer"],
                (false, true) => &["square_avg", "grad_avg"],
                (true, true) => &["square_avg", "momentum_buffer", "grad_avg"],
            },
            OptimKind::Adagrad => &["sum"],
        }
    }

    /// Name in reports.
    fn name(&self) -> &'static str {
        match self {
            OptimKind::Sgd => "sgd",
            OptimKind::SgdMomentum { .. } => "sgd_momentum",
            OptimKind::Adam { decoupled: false } => "adam",
            OptimKind::Adam { decoupled: true } => "adamw",
            OptimKind::Rmsprop { .. } => "rmsprop",
            OptimKind::Adagrad => "adagrad",
        }
    }
}

/// The per-step values an update reads; laid out as `shaders/optim.wgsl`'s HYPER_* indices.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Hyper {
    pub lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    pub dampening: f32,
    /// True on the first step (SGD's momentum buffer starts as the gradient).
    pub first_step: bool,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - beta1^t`
    pub bias_correction1: f32,
    /// `sqrt(1 - beta2^t)`
    pub bias_correction2_sqrt: f32,
    /// RMSprop's `alpha`.
    pub alpha: f32,
    /// `clip_grad_value_`'s bound on each (unscaled) gradient element; 0: none.
    pub clip_value: f32,
}

impl Hyper {
    /// The vector fed to the `hyper` input.
    pub fn to_tensor(&self) -> Tensor {
        let mut v = vec![0f32; HYPER_LEN];
        v[0] = self.lr;
        v[1] = self.weight_decay;
        v[2] = self.momentum;
        v[3] = self.dampening;
        v[4] = self.first_step as u8 as f32;
        v[5] = self.beta1;
        v[6] = self.beta2;
        v[7] = self.eps;
        v[8] = self.bias_correction1;
        v[9] = self.bias_correction2_sqrt;
        v[HYPER_GRAD_SCALE] = 1.0;
        v[HYPER_ALPHA] = self.alpha;
        v[HYPER_CLIP_VALUE] = self.clip_value;
        Tensor::new([HYPER_LEN], v).expect("hyper length")
    }

    fn from_tensor(t: &Tensor) -> Hyper {
        let v = t.data();
        Hyper {
            lr: v[0],
            weight_decay: v[1],
            momentum: v[2],
            dampening: v[3],
            first_step: v[4] != 0.0,
            beta1: v[5],
            beta2: v[6],
            eps: v[7],
            bias_correction1: v[8],
            bias_correction2_sqrt: v[9],
            alpha: v[HYPER_ALPHA],
            clip_value: v[HYPER_CLIP_VALUE],
        }
    }

    /// The gradient an update takes, from the scaled one: clamped to `clip_value` where set,
    /// as the kernels' `scaled_grad`.
    fn scaled_grad(&self, g: f32) -> f32 {
        match self.clip_value > 0.0 {
            true => g.clamp(-self.clip_value, self.clip_value),
            false => g,
        }
    }
}

/// One parameter's in-place update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimStep {
    pub kind: OptimKind,
}

impl OptimStep {
    /// Name in reports.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// CPU reference, in f32 as the kernel (the same operations in the same order):
    /// returns the new parameter followed by the new states.
    pub fn cpu_update(&self, inputs: &[&Tensor]) -> Vec<Tensor> {
        let h = Hyper::from_tensor(inputs[0]);
        // a step that dynamic loss scaling skips changes nothing
        if inputs[0].data()[HYPER_SKIP] != 0.0 {
            return inputs[3..].iter().map(|&t| t.clone()).collect();
        }
        let scale = inputs[1].data()[0] * inputs[0].data()[HYPER_GRAD_SCALE];
        let (grad, param) = (inputs[2].data(), inputs[3].data());
        let n = param.len();
        let mut p_out = vec![0f32; n];
        let ns = self.kind.n_states();
        let mut states: Vec<Vec<f32>> = inputs[4..4 + ns]
            .iter()
            .map(|t| t.data().to_vec())
            .collect();
        for i in 0..n {
            let p = param[i];
            match self.kind {
                OptimKind::Sgd => {
                    let g = h.scaled_grad(grad[i] * scale) + h.weight_decay * p;
                    p_out[i] = p - h.lr * g;
                }
                OptimKind::SgdMomentum { nesterov } => {
                    let mut g = h.scaled_grad(grad[i] * scale) + h.weight_decay * p;
                    let b = if h.first_step {
                        g
                    } else {
                        h.momentum * inputs[4].data()[i] + (1.0 - h.dampening) * g
                    };
                    states[0][i] = b;
                    g = if nesterov { g + h.momentum * b } else { b };
                    p_out[i] = p - h.lr * g;
                }
                OptimKind::Adam { decoupled } => {
                    let mut p = p;
                    let mut g = h.scaled_grad(grad[i] * scale);
                    if decoupled {
                        p *= 1.0 - h.lr * h.weight_decay;
                    } else {
                        g += h.weight_decay * p;
                    }
                    let m = h.beta1 * inputs[4].data()[i] + (1.0 - h.beta1) * g;
                    let v = h.beta2 * inputs[5].data()[i] + (1.0 - h.beta2) * g * g;
                    states[0][i] = m;
                    states[1][i] = v;
                    let step_size = h.lr / h.bias_correction1;
                    let denom = v.sqrt() / h.bias_correction2_sqrt + h.eps;
                    p_out[i] = p - step_size * m / denom;
                }
                OptimKind::Rmsprop { centered, momentum } => {
                    let g = h.scaled_grad(grad[i] * scale) + h.weight_decay * p;
                    let a = h.alpha;
                    let sq = a * states[0][i] + (1.0 - a) * g * g;
                    states[0][i] = sq;
                    let avg = if centered {
                        let ga0 = states[ns - 1][i];
                        // torch: grad_avg.lerp_(grad, 1 - alpha)
                        let ga = ga0 + (1.0 - a) * (g - ga0);
                        states[ns - 1][i] = ga;
                        (sq - ga * ga).sqrt() + h.eps
                    } else {
                        sq.sqrt() + h.eps
                    };
                    p_out[i] = if momentum {
                        let b = h.momentum * states[1][i] + g / avg;
                        states[1][i] = b;
                        p - h.lr * b
                    } else {
                        p - h.lr * (g / avg)
                    };
                }
                OptimKind::Adagrad => {
                    let g = h.scaled_grad(grad[i] * scale) + h.weight_decay * p;
                    let s = states[0][i] + g * g;
                    states[0][i] = s;
                    p_out[i] = p - h.lr * (g / (s.sqrt() + h.eps));
                }
            }
        }
        let shape = inputs[3].shape().clone();
        let mut out = vec![Tensor::new(shape.clone(), p_out).expect("param shape")];
        for s in states {
            out.push(Tensor::new(shape.clone(), s).expect("state shape"));
        }
        out
    }

    /// Kernel: one thread per element.
    pub fn kernel(&self, param: &Shape) -> KernelSpec {
        let (entry, flag) = match self.kind {
            OptimKind::Sgd => ("sgd", None),
            OptimKind::SgdMomentum { nesterov } => ("sgd_momentum", Some(("NESTEROV", nesterov))),
            OptimKind::Adam { decoupled } => ("adam", Some(("DECOUPLED", decoupled))),
            // an entry per set of states bound (the flags are its constants)
            OptimKind::Rmsprop { centered, momentum } => match (momentum, centered) {
                (false, false) => ("rmsprop", None),
                (true, false) => ("rmsprop_momentum", None),
                (false, true) => ("rmsprop_centered", None),
                (true, true) => ("rmsprop_centered_momentum", None),
            },
            OptimKind::Adagrad => ("adagrad", None),
        };
        let mut constants = vec![("N", param.numel() as f64)];
        if let Some((name, on)) = flag {
            constants.push((name, on as u8 as f64));
        }
        KernelSpec {
            family: "optim",
            entry,
            constants,
            workgroups: groups(param.numel(), 256),
        }
    }
}

/// Several parameters' in-place updates of one kind as one kernel (`codegen::optim`), made by
/// the plan compiler from a step's `OptimStep` nodes that share their `hyper` and `scale`:
/// one dispatch instead of one per parameter. Inputs: `[hyper, scale (or what makes it:
/// `scale_from`), grad_0 .. grad_{k-1}, param_0, states_0.., param_1, states_1.., ..]` (the
/// read-only ones first, then the ones written in place); like an update, no buffer of its
/// own: its value is `param_0`.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimGroup {
    pub kind: OptimKind,
    /// Parameters updated.
    pub members: usize,
    /// Inputs that make the gradient scale: 1 (`scale` itself) unless `scale_from`.
    pub scale_inputs: usize,
    /// Where the kernel computes the scale itself: the small reduction (with its epilogue)
    /// that made it, run by every thread over its input, which is bound in the scale's place,
    /// its epilogue's other inputs after it (`scale_inputs` in all). Gradient clipping's
    /// coefficient from the partial sums of squares: one kernel fewer per step
    /// (`exec::lower::group_optimizer_updates`).
    pub scale_from: Option<super::reduce::ReducePrologue>,
}

impl OptimGroup {
    /// Name in reports.
    pub fn name(&self) -> &'static str {
        match self.kind {
            OptimKind::Sgd => "sgd_group",
            OptimKind::SgdMomentum { .. } => "sgd_momentum_group",
            OptimKind::Adam { decoupled: false } => "adam_group",
            OptimKind::Adam { decoupled: true } => "adamw_group",
            OptimKind::Rmsprop { .. } => "rmsprop_group",
            OptimKind::Adagrad => "adagrad_group",
        }
    }

    /// A group of `members` updates reading their scale.
    pub fn new(kind: OptimKind, members: usize) -> OptimGroup {
        OptimGroup {
            kind,
            members,
            scale_inputs: 1,
            scale_from: None,
        }
    }

    /// Input index of member `j`'s gradient.
    pub fn grad(&self, j: usize) -> usize {
        1 + self.scale_inputs + j
    }

    /// Input index of member `j`'s parameter (its states follow it).
    pub fn param(&self, j: usize) -> usize {
        1 + self.scale_inputs + self.members + j * (1 + self.kind.n_states())
    }

    /// Bindings the kernel takes for `members` parameters of `kind`, its scale made of
    /// `scale_inputs` inputs.
    pub fn bindings(kind: OptimKind, members: usize, scale_inputs: usize) -> usize {
        1 + scale_inputs + members * (2 + kind.n_states())
    }

    /// Member `j`'s inputs in `OptimStep`'s order: `[hyper, scale, grad, param, states..]`,
    /// `scale` given.
    pub fn member_inputs<T: Copy>(&self, inputs: &[T], scale: T, j: usize) -> Vec<T> {
        let p = self.param(j);
        let mut v = vec![inputs[0], scale, inputs[self.grad(j)]];
        v.extend_from_slice(&inputs[p..p + 1 + self.kind.n_states()]);
        v
    }

    /// CPU reference: the scale (computed as its reduction's twin computes it, or read), then
    /// every member's update (`OptimStep::cpu_update`), in member order.
    pub fn cpu_update(&self, inputs: &[&Tensor]) -> Vec<Vec<Tensor>> {
        let step = OptimStep { kind: self.kind };
        let scale = match &self.scale_from {
            Some(r) => r.cpu(&inputs[1..1 + self.scale_inputs], &Shape(vec![1])),
            None => inputs[1].clone(),
        };
        (0..self.members)
            .map(|j| step.cpu_update(&self.member_inputs(inputs, &scale, j)))
            .collect()
    }
}

/// Dynamic loss scaling's work between the backward pass and the updates, as
/// `torch.amp.GradScaler`'s `unscale_`, its check for gradients that are not finite, and
/// `update`, in one thread (see the module docs). Inputs: `[hyper (16), sumsq (1), state (8,
/// a parameter written in place)]`, `sumsq` the sum of squares of the scaled gradients (not
/// finite exactly where one of them is not, or where it overflows f32 itself: then the scale
/// backs off too). Output: the `hyper` the updates read (16).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalerStep {
    /// The scale's factor after `growth_interval` steps in a row without a skip (torch: 2).
    pub growth_factor: f32,
    /// The scale's factor after a skipped step (torch: 0.5).
    pub backoff_factor: f32,
    /// Steps in a row without a skip before the scale grows (torch: 2000).
    pub growth_interval: u32,
    /// `clip_grad_norm_(max_norm)` of the unscaled gradients, where set.
    pub max_norm: Option<f32>,
    /// Where the plan compiler binds the partial sums of squares in `sumsq`'s place, how many
    /// the kernel adds up itself (0: `sumsq` is the sum; `exec::lower::partials_into_grad_scaler`).
    pub partials: usize,
    /// Whether the schedule cycles Adam's `beta1` (`OneCycleLR`'s `cycle_momentum`): the bias
    /// correction is then `1 - beta1^t` with this step's `beta1`, as torch's, where a fixed
    /// `beta1` keeps the running sum (exact in f32).
    pub cycled_beta1: bool,
}

/// `x^n` by repeated squaring, as Rust's `f32::powi` (compiler-builtins' `__powisf2`) and
/// `shaders/optim.wgsl`'s `powi`: the host's and the scaler kernel's bias corrections agree.
pub fn powi_by_squaring(mut x: f32, mut n: u32) -> f32 {
    let mut r = 1.0f32;
    loop {
        if n & 1 != 0 {
            r *= x;
        }
        n >>= 1;
        if n == 0 {
            return r;
        }
        x *= x;
    }
}

/// Whether `x` is finite, from its bits (WGSL may assume floats are finite; bits are bits).
fn finite(x: f32) -> bool {
    x.to_bits() & 0x7f80_0000 != 0x7f80_0000
}

impl ScalerStep {
    /// CPU reference, in f32 as the kernel: the hyperparameters the updates read, then the
    /// state after the step.
    pub fn cpu(&self, hyper: &Tensor, sumsq: &Tensor, state: &Tensor) -> (Tensor, Tensor) {
        let mut h = hyper.data().to_vec();
        let mut st = state.data().to_vec();
        let sumsq = match self.partials {
            0 => sumsq.data()[0],
            p => sumsq.data()[..p].iter().sum(),
        };
        let found = !finite(sumsq);
        let scale = st[0];
        // torch: `scale.double().reciprocal().float()`
        let inv = (1.0 / scale as f64) as f32;
        let coef = match self.max_norm {
            Some(max_norm) => (max_norm / (sumsq.sqrt() * inv + 1e-6)).min(1.0),
            None => 1.0,
        };
        let (b1, b2) = (h[5], h[6]);
        let (s1, s2) = (1.0 + b1 * st[3], 1.0 + b2 * st[4]);
        h[4] = (st[2] == 0.0) as u8 as f32;
        h[8] = match self.cycled_beta1 {
            true => 1.0 - powi_by_squaring(b1, st[2] as u32 + 1),
            false => (1.0 - b1) * s1,
        };
        h[9] = ((1.0 - b2) * s2).sqrt();
        h[HYPER_GRAD_SCALE] = coef * inv;
        h[HYPER_SKIP] = found as u8 as f32;
        if found {
            st[0] = scale * self.backoff_factor;
            st[1] = 0.0;
        } else {
            st[2] += 1.0;
            st[3] = s1;
            st[4] = s2;
            let tracker = st[1] + 1.0;
            if tracker >= self.growth_interval as f32 {
                let grown = scale * self.growth_factor;
                if finite(grown) {
                    st[0] = grown;
                }
                st[1] = 0.0;
            } else {
                st[1] = tracker;
            }
        }
        (
            Tensor::new([HYPER_LEN], h).expect("hyper length"),
            Tensor::new([SCALER_STATE_LEN], st).expect("state length"),
        )
    }

    /// Kernel: `shaders/optim.wgsl`'s `grad_scaler`, one thread.
    pub fn kernel(&self) -> KernelSpec {
        KernelSpec {
            family: "optim",
            entry: "grad_scaler",
            constants: vec![
                ("GROWTH", self.growth_factor as f64),
                ("BACKOFF", self.backoff_factor as f64),
                ("INTERVAL", self.growth_interval as f64),
                ("CLIP", self.max_norm.is_some() as u8 as f64),
                ("MAX_NORM", self.max_norm.unwrap_or(0.0) as f64),
                ("PARTIALS", self.partials as f64),
                ("CYCLED_BETA1", self.cycled_beta1 as u8 as f64),
            ],
            workgroups: 1,
        }
    }
}

/// Gradient accumulation over micro-batches (`nn::TrainStep::with_accumulation`):
/// `acc := (first ? 0 : acc) + scale * g` in place on the accumulator `acc` (a parameter), as
/// torch's `backward()` adds into `.grad` over the micro-batches of a loss divided by their
/// count. Inputs `[g, acc]` (f32, one shape); no buffer of its own (its value is `acc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulate {
    /// Whether this is a cycle's first micro-batch: `acc` is overwritten, not added to.
    pub first: bool,
    pub scale: f32,
}

impl Accumulate {
    /// CPU reference, in f32 as the kernel.
    pub fn cpu(&self, g: &Tensor, acc: &Tensor) -> Tensor {
        let data = g
            .data()
            .iter()
            .zip(acc.data())
            .map(|(&g, &a)| {
                let add = g * self.scale;
                if self.first {
                    add
                } else {
                    a + add
                }
            })
            .collect();
        Tensor::new(acc.shape().clone(), data).expect("the accumulator's shape")
    }

    /// Kernel: `shaders/optim.wgsl`'s `accumulate`, one thread per element.
    pub fn kernel(&self, n: usize) -> KernelSpec {
        KernelSpec {
            family: "optim",
            entry: "accumulate",
            constants: vec![
                ("N", n as f64),
                ("FIRST", self.first as u8 as f64),
                ("ACC_SCALE", self.scale as f64),
            ],
            workgroups: groups(n, 256),
        }
    }
}

/// Several gradient accumulations of one micro-batch in one kernel (made by the plan compiler
/// from the `Accumulate` nodes that share `first` and `scale`:
/// `exec::lower::group_accumulations`). Inputs: the gradients `g_0 .. g_{k-1}`, then the
/// accumulators `acc_0 .. acc_{k-1}`, updated in place; the node's value is the last
/// accumulator (it takes the last member's place). Kernel: `codegen::optim::accumulate_group`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccumulateGroup {
    pub members: usize,
    pub first: bool,
    pub scale: f32,
}

impl AccumulateGroup {
    /// CPU reference: every member as [`Accumulate::cpu`], in order.
    pub fn cpu(&self, inputs: &[&Tensor]) -> Vec<Tensor> {
        let one = Accumulate {
            first: self.first,
            scale: self.scale,
        };
        let k = self.members;
        (0..k).map(|j| one.cpu(inputs[j], inputs[k + j])).collect()
    }
}

/// An exponential moving average of a parameter after its update, as torch's
/// `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))` and its
/// `update_parameters`: on the optimizer's first step `ema := p`, then
/// `ema := ema + (1 - decay) (p - ema)` (`torch._foreach_lerp_`), in place. Inputs `[hyper
/// (16), p, ema]`: the first step is the hyper vector's flag ([`Hyper::first_step`]); `p` is
/// the updated parameter (its update node), `ema` a parameter. Made by `nn::Optimizer::ema`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaUpdate {
    pub decay: f32,
}

impl EmaUpdate {
    /// CPU reference, in f32 as the kernel.
    pub fn cpu(&self, hyper: &Tensor, p: &Tensor, ema: &Tensor) -> Tensor {
        let first = hyper.data()[4] != 0.0;
        let w = 1.0 - self.decay;
        let data = p
            .data()
            .iter()
            .zip(ema.data())
            .map(|(&p, &e)| if first { p } else { e + w * (p - e) })
            .collect();
        Tensor::new(ema.shape().clone(), data).expect("the average's shape")
    }

    /// Kernel: `shaders/optim.wgsl`'s `ema_update`, one thread per element.
    pub fn kernel(&self, n: usize) -> KernelSpec {
        KernelSpec {
            family: "optim",
            entry: "ema_update",
            constants: vec![("N", n as f64), ("EMA_WEIGHT", (1.0 - self.decay) as f64)],
            workgroups: groups(n, 256),
        }
    }
}

/// Several [`EmaUpdate`]s of one step in one kernel (made by the plan compiler from those that
/// share `decay`: `exec::lower::group_ema_updates`). Inputs: the hyper vector, the updated
/// parameters `p_0 .. p_{k-1}`, then the averages `ema_0 .. ema_{k-1}`, updated in place; the
/// node's value is the last average. Kernel: `codegen::optim::ema_group`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaGroup {
    pub members: usize,
    pub decay: f32,
}

impl EmaGroup {
    /// CPU reference: every member as [`EmaUpdate::cpu`], in order.
    pub fn cpu(&self, inputs: &[&Tensor]) -> Vec<Tensor> {
        let one = EmaUpdate { decay: self.decay };
        let k = self.members;
        (0..k)
            .map(|j| one.cpu(inputs[0], inputs[1 + j], inputs[1 + k + j]))
            .collect()
    }
}
