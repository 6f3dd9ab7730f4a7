//! Best-checkpoint tracking and early stopping on a validation metric (higher is better,
//! e.g. Dice). Serialisable, so a resumed run continues with the same patience count.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What [`EarlyStopping::update`] decided for an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New best: save the best checkpoint.
    Improved,
    /// No improvement for this many epochs in a row; keep going.
    NoImprovement(u32),
    /// No improvement for `patience` epochs: stop training.
    Stop,
}

/// Early stopping on a metric where higher is better.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Epochs without improvement tolerated before [`Verdict::Stop`] (0: never stop).
    pub patience: u32,
    /// An epoch improves only if its metric exceeds the best by more than this.
    pub min_delta: f64,
    /// Best metric so far.
    pub best: Option<f64>,
    /// Epoch of the best metric.
    pub best_epoch: Option<u64>,
    /// Consecutive epochs without improvement.
    pub bad_epochs: u32,
}

impl EarlyStopping {
    /// A fresh tracker.
    pub fn new(patience: u32, min_delta: f64) -> Result<Self> {
        if !min_delta.is_finite() || min_delta < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "early stopping: min_delta must be finite and >= 0, got {min_delta}"
            )));
        }
        Ok(Self {
            patience,
            min_delta,
            best: None,
            best_epoch: None,
            bad_epochs: 0,
        })
    }

    /// Records `metric` for `epoch`. A NaN metric never improves (it counts as a bad epoch).
    pub fn update(&mut self, epoch: u64, metric: f64) -> Verdict {
        let improved = match self.best {
            _ if metric.is_nan() => false,
            None => true,
            Some(b) => metric > b + self.min_delta,
        };
        if improved {
            self.best = Some(metric);
            self.best_epoch = Some(epoch);
            self.bad_epochs = 0;
            return Verdict::Improved;
        }
        self.bad_epochs += 1;
        if self.patience > 0 && self.bad_epochs >= self.patience {
            Verdict::Stop
        } else {
            Verdict::NoImprovement(self.bad_epochs)
        }
    }

    /// The state as JSON, for checkpoint metadata.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain struct serialises")
    }

    /// The state back from [`to_json`](Self::to_json).
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::Json {
            context: "early-stopping state".into(),
            source: e,
        })
    }
}
