//! A training step as one plan: forward, backward and the optimizer update compiled together and
//! run as one submission, parameters updated in place on the device, nothing read back but the
//! loss when asked.

use crate::device::Device;
use crate::error::Result;
use crate::exec::Plan;
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::nn::layers::DROPOUT_SEED;
use crate::nn::optim::{param_names, GradScaler, Optimizer, ScalerState, HYPER_INPUT};
use crate::tensor::Tensor;

/// A compiled training step.
pub struct TrainStep {
    /// The step that updates the parameters (with accumulation: the last micro-batch's).
    plan: Plan,
    /// With gradient accumulation: the plans of a cycle's first micro-batch and (with more than
    /// two) of the ones between, which only accumulate.
    micro: Vec<Plan>,
    /// Micro-batches per optimizer step (1: none accumulated), and where the cycle is.
    micro_steps: usize,
    micro_at: usize,
    device: Device,
    /// The loss scaler's state parameter, where the optimizer scales the loss.
    scaler_state: Option<String>,
    optimizer: Optimizer,
    has_dropout: bool,
    rng: Init,
}

impl TrainStep {
    /// Adds the backward pass and updates for `params` to `g` and compiles the whole step.
    /// `seed` seeds the dropout masks.
    pub fn new(
        dev: &Device,
        g: &Graph,
        loss: NodeId,
        params: &[NodeId],
        optimizer: Optimizer,
        seed: u64,
    ) -> Result<TrainStep> {
        Self::with_accumulation(dev, g, loss, params, optimizer, seed, 1)
    }

    /// [`TrainStep::new`] accumulating the gradients of `micro_steps` micro-batches per
    /// optimizer step, as torch's loop of `(loss / micro_steps).backward()` then
    /// `optimizer.step()`: each [`TrainStep::step`] takes one micro-batch; the first of a cycle
    /// writes its gradients (divided by `micro_steps`) into accumulators (parameters
    /// `optim.<param>.grad_accum`), the next ones add theirs, and the last adds its own and
    /// updates the parameters from the sums (clipping and loss scaling see the sum). Three
    /// plans, each one submission; a micro-batch's accumulations are one kernel (the plan
    /// compiler's `AccumulateGroup`); the step count, schedule and dropout seeds advance as
    /// torch's do.
    pub fn with_accumulation(
        dev: &Device,
        g: &Graph,
        loss: NodeId,
        params: &[NodeId],
        optimizer: Optimizer,
        seed: u64,
        micro_steps: usize,
    ) -> Result<TrainStep> {
        if micro_steps == 0 {
            return Err(crate::error::Error::Param(
                "a training step needs at least one micro-batch".into(),
            ));
        }
        let grads = optimizer.gradients(g, loss, params)?;
        let names = param_names(g, params)?;
        let mut micro = Vec::new();
        let updates = if micro_steps == 1 {
            optimizer.apply(g, params, &grads)?
        } else {
            let s = 1.0 / micro_steps as f32;
            let accs: Vec<NodeId> = params
                .iter()
                .zip(&names)
                .map(|(&p, name)| g.param(&format!("optim.{name}.grad_accum"), g.shape(p)))
                .collect();
            let accumulate = |first: bool| -> Result<Vec<NodeId>> {
                grads
                    .iter()
                    .zip(&accs)
                    .map(|(&gr, &acc)| g.accumulate(acc, gr, first, s))
                    .collect()
            };
            micro.push(dev.compile_with(g, &[loss], &accumulate(true)?)?);
            if micro_steps > 2 {
                micro.push(dev.compile_with(g, &[loss], &accumulate(false)?)?);
            }
            // the last micro-batch adds its gradients too (one kernel for all of them, as the
            // others'), and the updates read the sums from the accumulators
            optimizer.apply(g, params, &accumulate(false)?)?
        };
        let plan = dev.compile_with(g, &[loss], &updates)?;
        let has_dropout = g.find_input(DROPOUT_SEED).is_some();
        let scaler_state = match (&optimizer.grad_scaler, names.first()) {
            (Some(_), Some(first)) => Some(GradScaler::state_name(first)),
            _ => None,
        };
        Ok(TrainStep {
            plan,
            micro,
            micro_steps,
            micro_at: 0,
            device: dev.clone(),
            scaler_state,
            optimizer,
            has_dropout,
            rng: Init::new(seed),
        })
    }

    /// One step on a batch (with accumulation: on a micro-batch, the optimizer stepping after
    /// every `micro_steps`-th). With `want_loss` the loss is read back (waiting for the GPU);
    /// without, the step is only submitted and `None` returned.
    pub fn step(&mut self, inputs: &[(&str, &Tensor)], want_loss: bool) -> Result<Option<f32>> {
        let at = self.micro_at;
        self.micro_at = (at + 1) % self.micro_steps;
        let last = at + 1 == self.micro_steps;
        // the step count advances with the updates only
        let hyper = last.then(|| self.optimizer.next_hyper());
        // dropout seeds stay below 2^24 so that f32 holds them exactly
        let seed = Tensor::full([1], (self.rng.next_u32() >> 8) as f32);
        let mut all: Vec<(&str, &Tensor)> = inputs.to_vec();
        if let Some(h) = &hyper {
            all.push((HYPER_INPUT, h));
        }
        if self.has_dropout {
            all.push((DROPOUT_SEED, &seed));
        }
        let plan = match (last, at) {
            (true, _) => &mut self.plan,
            (false, 0) => &mut self.micro[0],
            (false, _) => &mut self.micro[1],
        };
        if want_loss {
            Ok(Some(plan.run(&all)?[0].data()[0]))
        } else {
            plan.step(&all)?;
            Ok(None)
        }
    }

    /// The loss scaler's state after the steps submitted so far (read back from the device,
    /// waiting for them), or `None` without loss scaling.
    pub fn scaler_state(&self) -> Result<Option<ScalerState>> {
        match &self.scaler_state {
            Some(name) => Ok(Some(ScalerState::from_tensor(&self.device.param(name)?)?)),
            None => Ok(None),
        }
    }

    /// The optimizer (its step count and schedule).
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimizer, to change its learning rate between steps (a [`crate::nn::Plateau`]).
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The compiled plan (for its `info`).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// With gradient accumulation, the plans of the micro-batches before a cycle's last (the
    /// first's, then the middle ones' where there are more than two); empty without.
    pub fn micro_plans(&self) -> &[Plan] {
        &self.micro
    }

    /// The compiled plan, to turn profiling on (`Plan::set_profiling`).
    pub fn plan_mut(&mut self) -> &mut Plan {
        &mut self.plan
    }
}
