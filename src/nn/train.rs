//! A training step as one plan: forward, backward and the optimizer update compiled together and
//! run as one submission, parameters updated in place on the device, nothing read back but the
//! loss when asked.

use crate::device::Device;
use crate::error::Result;
use crate::exec::Plan;
use crate::graph::{Graph, NodeId};
use crate::nn::init::Init;
use crate::nn::layers::DROPOUT_SEED;
use crate::nn::optim::{GradScaler, Optimizer, ScalerState, HYPER_INPUT};
use crate::tensor::Tensor;

/// A compiled training step.
pub struct TrainStep {
    plan: Plan,
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
        let updates = optimizer.minimize(g, loss, params)?;
        let plan = dev.compile_with(g, &[loss], &updates)?;
        let has_dropout = g.find_input(DROPOUT_SEED).is_some();
        let scaler_state = match (&optimizer.grad_scaler, params.first()) {
            (Some(_), Some(p)) => match &g.nodes()[p.0].op {
                crate::ops::Op::Param { name, .. } => Some(GradScaler::state_name(name)),
                _ => None,
            },
            _ => None,
        };
        Ok(TrainStep {
            plan,
            device: dev.clone(),
            scaler_state,
            optimizer,
            has_dropout,
            rng: Init::new(seed),
        })
    }

    /// One step on a batch. With `want_loss` the loss is read back (waiting for the GPU);
    /// without, the step is only submitted and `None` returned.
    pub fn step(&mut self, inputs: &[(&str, &Tensor)], want_loss: bool) -> Result<Option<f32>> {
        let hyper = self.optimizer.next_hyper();
        // dropout seeds stay below 2^24 so that f32 holds them exactly
        let seed = Tensor::full([1], (self.rng.next_u32() >> 8) as f32);
        let mut all: Vec<(&str, &Tensor)> = inputs.to_vec();
        all.push((HYPER_INPUT, &hyper));
        if self.has_dropout {
            all.push((DROPOUT_SEED, &seed));
        }
        if want_loss {
            Ok(Some(self.plan.run(&all)?[0].data()[0]))
        } else {
            self.plan.step(&all)?;
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

    /// The compiled plan (for its `info`).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The compiled plan, to turn profiling on (`Plan::set_profiling`).
    pub fn plan_mut(&mut self) -> &mut Plan {
        &mut self.plan
    }
}
