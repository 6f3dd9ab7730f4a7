//! An exponential moving average of the trainable weights (Polyak averaging).
//!
//! A short run at a high learning rate ends at weights that jump around a good region;
//! their running average usually sits nearer its middle and validates better and more
//! steadily from epoch to epoch. [`WeightEma`] keeps that average beside the weights:
//! after every optimiser step each shadow tensor becomes
//! `shadow = d * shadow + (1 - d) * weight`, with `d = min(decay, (1 + n) / (10 + n))`
//! for the `n`-th update (`n` from 0), so the first updates follow the fast-moving weights
//! closely instead of remembering the random initialisation for thousands of steps.
//!
//! The trainer ([`crate::TrainConfig::ema_decay`]) validates and saves the averaged
//! weights, so `best.safetensors` holds what was validated and loads like any checkpoint.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use tgc_train::WeightEma;
//!
//! # fn main() -> tgc_train::Result<()> {
//! let w = Var::from_tensor(&Tensor::new(&[0f32, 0.0], &Device::Cpu)?)?;
//! let vars = vec![("w".to_string(), w.clone())];
//! let mut ema = WeightEma::new(&vars, 0.9)?;
//! w.set(&Tensor::new(&[1f32, 2.0], &Device::Cpu)?)?;
//! ema.update(&vars)?;
//! // First update: d = min(0.9, 1 / 10) = 0.1, so the shadow is 0.9 * the new weights.
//! assert_eq!(ema.shadow()[0].1.to_vec1::<f32>()?, vec![0.9, 1.8]);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// Checkpoint key prefix of the raw (trained, not averaged) weights when a checkpoint's
/// model tensors hold the average: `train.<name>`.
pub const RAW_WEIGHT_PREFIX: &str = "train.";
/// Checkpoint key of the number of averaging updates (i64 scalar).
pub const EMA_UPDATES_KEY: &str = "ema.updates";

/// The running average of a set of variables (same names, shapes and order).
#[derive(Clone, Debug)]
pub struct WeightEma {
    decay: f64,
    updates: u64,
    shadow: Vec<(String, Tensor)>,
}

impl WeightEma {
    /// Starts the average at the variables' current values. `decay` must lie in (0, 1).
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(decay.is_finite() && decay > 0.0 && decay < 1.0) {
            return Err(Error::InvalidArgument(format!(
                "ema_decay must lie strictly between 0 and 1 (0 in the config turns the \
                 average off), got {decay}"
            )));
        }
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), snapshot(v)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
        })
    }

    /// The configured decay.
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Averaging updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The decay the `n`-th update (from 0) uses: `min(decay, (1 + n) / (10 + n))`.
    pub fn decay_at(&self, n: u64) -> f64 {
        self.decay.min((1.0 + n as f64) / (10.0 + n as f64))
    }

    /// The averaged tensors, by variable name, in the variables' order.
    pub fn shadow(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// Folds the variables' current values into the average.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        self.check_names(vars)?;
        let d = self.decay_at(self.updates);
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            // Detached: a shadow derived from the variable would keep every earlier
            // step's tensors alive through the autograd graph.
            let w = v.as_tensor().detach();
            *s = (s.affine(d, 0.0)? + w.affine(1.0 - d, 0.0)?)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// Writes the average into the variables and returns copies of the values they held.
    pub fn swap_in(&self, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
        self.check_names(vars)?;
        let mut raw = Vec::with_capacity(vars.len());
        for ((_, s), (_, v)) in self.shadow.iter().zip(vars) {
            raw.push(snapshot(v)?);
            v.set(s)?;
        }
        Ok(raw)
    }

    /// Checkpoint tensors: the average under the variables' own names (what a model
    /// loading the checkpoint gets), the raw weights under `train.<name>`, and
    /// [`EMA_UPDATES_KEY`].
    pub fn checkpoint_tensors(&self, vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
        self.check_names(vars)?;
        let mut out = HashMap::with_capacity(2 * vars.len() + 1);
        for ((name, s), (_, v)) in self.shadow.iter().zip(vars) {
            out.insert(name.clone(), s.copy()?);
            out.insert(format!("{RAW_WEIGHT_PREFIX}{name}"), snapshot(v)?);
        }
        let dev = vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert(
            EMA_UPDATES_KEY.to_string(),
            Tensor::new(self.updates as i64, &dev)?,
        );
        Ok(out)
    }

    /// Restores the state [`checkpoint_tensors`](Self::checkpoint_tensors) wrote: the
    /// average from the variables' names, the raw weights into the variables.
    pub fn load_checkpoint_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        vars: &[(String, Var)],
    ) -> Result<()> {
        self.check_names(vars)?;
        let missing = |key: &str| {
            Error::InvalidArgument(format!(
                "the checkpoint has no `{key}`: it was written without the weight average \
                 (ema_decay 0), so a run with ema_decay > 0 cannot resume from it"
            ))
        };
        let updates = tensors
            .get(EMA_UPDATES_KEY)
            .ok_or_else(|| missing(EMA_UPDATES_KEY))?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let updates = match updates.as_slice() {
            [u] if *u >= 0 => *u as u64,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "`{EMA_UPDATES_KEY}` must be one non-negative integer, got {updates:?}"
                )))
            }
        };
        let mut shadow = Vec::with_capacity(vars.len());
        let mut raw = Vec::with_capacity(vars.len());
        for (name, v) in vars {
            let raw_key = format!("{RAW_WEIGHT_PREFIX}{name}");
            for key in [name, &raw_key] {
                let t = tensors.get(key).ok_or_else(|| missing(key))?;
                if t.dims() != v.dims() {
                    return Err(Error::InvalidArgument(format!(
                        "checkpoint tensor `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        v.dims()
                    )));
                }
            }
            shadow.push((name.clone(), tensors[name].to_dtype(v.dtype())?.copy()?));
            raw.push(tensors[&raw_key].to_dtype(v.dtype())?);
        }
        for ((_, v), r) in vars.iter().zip(&raw) {
            v.set(r)?;
        }
        self.shadow = shadow;
        self.updates = updates;
        Ok(())
    }

    /// Whether the shadow tensors carry no autograd history (they never should: one
    /// would keep every step's tensors alive).
    pub fn is_detached(&self) -> bool {
        self.shadow.iter().all(|(_, s)| !s.track_op())
    }

    fn check_names(&self, vars: &[(String, Var)]) -> Result<()> {
        let same = vars.len() == self.shadow.len()
            && vars.iter().zip(&self.shadow).all(|((a, _), (b, _))| a == b);
        if same {
            Ok(())
        } else {
            Err(Error::InvalidArgument(
                "the weight average was built for another set of variables".into(),
            ))
        }
    }
}

/// A private copy of a variable's value with no autograd history: the fused optimiser
/// updates variables in place, and a history would chain every step's tensors together.
fn snapshot(v: &Var) -> Result<Tensor> {
    Ok(v.as_tensor().detach().copy()?)
}
