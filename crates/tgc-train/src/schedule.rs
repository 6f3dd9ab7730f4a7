//! Learning-rate schedule: linear warm-up, then cosine decay.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Linear warm-up then cosine decay to `min_lr`, indexed by the 0-based optimiser step
/// about to be taken:
///
/// ```text
/// step < warmup_steps:  lr = base_lr * (f + (1 - f) * step / warmup_steps)      f = warmup_start_factor
/// otherwise:            p  = min(1, (step - warmup_steps) / (total_steps - warmup_steps))
///                       lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2
/// ```
///
/// With the default `warmup_start_factor = 0` this is the Hugging Face
/// `get_cosine_schedule_with_warmup` shape floored at `min_lr`: the first step has lr 0
/// (AdamW still updates its moments, so the step is not wasted entirely). Steps past
/// `total_steps` keep `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Peak learning rate, reached at `warmup_steps`.
    pub base_lr: f64,
    /// Number of warm-up steps (0: start the cosine at once).
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `min_lr`.
    pub total_steps: u64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warm-up starts at `warmup_start_factor * base_lr` (0 <= f <= 1).
    #[serde(default)]
    pub warmup_start_factor: f64,
}

impl WarmupCosine {
    /// A schedule starting its warm-up from 0; checked with [`validate`](Self::validate).
    pub fn new(base_lr: f64, warmup_steps: u64, total_steps: u64, min_lr: f64) -> Result<Self> {
        let s = Self {
            base_lr,
            warmup_steps,
            total_steps,
            min_lr,
            warmup_start_factor: 0.0,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks `0 <= min_lr <= base_lr` (finite), `warmup_steps <= total_steps` and
    /// `0 <= warmup_start_factor <= 1`.
    pub fn validate(&self) -> Result<()> {
        let ok = self.base_lr.is_finite()
            && self.min_lr.is_finite()
            && self.min_lr >= 0.0
            && self.min_lr <= self.base_lr
            && self.warmup_steps <= self.total_steps
            && (0.0..=1.0).contains(&self.warmup_start_factor);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "schedule needs 0 <= min_lr <= base_lr, warmup_steps <= total_steps, 0 <= warmup_start_factor <= 1: {self:?}"
            )))
        }
    }

    /// The learning rate for optimiser step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            let f = self.warmup_start_factor;
            return self.base_lr * (f + (1.0 - f) * step as f64 / self.warmup_steps as f64);
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps);
        let progress = if span == 0 {
            1.0
        } else {
            ((step - self.warmup_steps) as f64 / span as f64).min(1.0)
        };
        self.min_lr
            + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
