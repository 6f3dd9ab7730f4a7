//! AdamW with checkpointable state, and global-norm gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private, so a run could not be resumed exactly;
//! this one exposes them as named tensors ([`AdamW::state_tensors`] /
//! [`AdamW::load_state`]). The update is PyTorch's `torch.optim.AdamW` (default,
//! non-amsgrad, non-fused path):
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)                 (decoupled weight decay)
//! m <- beta1 * m + (1 - beta1) * g
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! where `t` counts the steps in which that variable received a gradient (PyTorch keeps
//! one step count per parameter too). Moments live in each variable's dtype and device, as in
//! PyTorch: train in f32 (f16/bf16 moments lose precision).

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Storage, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Hyper-parameters of [`AdamW`]. `Default` gives the paper's QaTa-COV19 learning rate
/// (2e-5; MosMedData+ uses 5e-4, abdominal CT 2e-4) and weight decay 1e-4.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Base learning rate (the schedule's peak). [`AdamW::step`] takes the current lr.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the bias-corrected `sqrt(v)`.
    pub eps: f64,
    /// Decoupled weight decay, applied as `p -= lr * weight_decay * p`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

impl AdamWConfig {
    /// Checks that every hyper-parameter is finite and in range.
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "AdamW config out of range (need lr >= 0, 0 <= beta < 1, eps > 0, weight_decay >= 0): {self:?}"
            )))
        }
    }
}

/// What one [`AdamW::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Number of `step` calls so far, this one included.
    pub step: u64,
    /// The learning rate used.
    pub lr: f64,
    /// How many variables were updated.
    pub updated: usize,
    /// Variables that had no gradient and were skipped. A non-empty list usually means a
    /// detached branch or an op without a backward pass: the loop should treat it as an error.
    pub missing_grads: Vec<String>,
}

/// Moments of one variable.
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// Steps in which this variable had a gradient.
    t: u64,
}

/// AdamW over a fixed list of named trainable [`Var`]s, with serialisable state.
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    steps: u64,
    fused_cpu: bool,
}

/// Prefix of every key written by [`AdamW::state_tensors`].
pub const STATE_PREFIX: &str = "optim.";

fn key_m(name: &str) -> String {
    format!("{STATE_PREFIX}m.{name}")
}
fn key_v(name: &str) -> String {
    format!("{STATE_PREFIX}v.{name}")
}
fn key_t(name: &str) -> String {
    format!("{STATE_PREFIX}t.{name}")
}
/// Key of the global step counter in [`AdamW::state_tensors`].
pub const STEPS_KEY: &str = "optim.steps";

impl AdamW {
    /// Creates the optimiser over `vars` (trainable ones only: frozen weights must not be
    /// `Var`s). Names must be unique; variables must be floating point.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                return Err(Error::InvalidArgument(format!(
                    "AdamW: variable name `{name}` given twice"
                )));
            }
            if !var.dtype().is_float() {
                return Err(Error::InvalidArgument(format!(
                    "AdamW: variable `{name}` has dtype {:?}, not a float",
                    var.dtype()
                )));
            }
            let m = var.as_tensor().zeros_like()?;
            let v = var.as_tensor().zeros_like()?;
            slots.push(Slot {
                name,
                var,
                m,
                v,
                t: 0,
            });
        }
        Ok(Self {
            config,
            slots,
            steps: 0,
            fused_cpu: true,
        })
    }

    /// Creates the optimiser over every variable of a `VarMap`, in name order.
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: AdamWConfig) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::OptimState("VarMap mutex poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(vars, config)
    }

    /// Chooses the update kernel for contiguous f32 CPU variables: fused (default; one
    /// in-place pass per tensor, no allocation) or composed of tensor ops (the path every
    /// other dtype and device takes). Both follow PyTorch to float rounding; they are not
    /// bitwise identical to each other, so keep the choice fixed within a run.
    pub fn with_fused_cpu(mut self, fused: bool) -> Self {
        self.fused_cpu = fused;
        self
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of [`step`](Self::step) calls so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The optimised variables, in order, with their names.
    pub fn vars(&self) -> Vec<(&str, &Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.as_str(), &s.var))
            .collect()
    }

    /// [`clip_grad_norm`] over this optimiser's variables.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let vars: Vec<&Var> = self.slots.iter().map(|s| &s.var).collect();
        clip_grad_norm(grads, &vars, max_norm)
    }

    /// Applies one AdamW update with learning rate `lr` (from the schedule) to every
    /// variable that has a gradient in `grads`; variables without one are left untouched
    /// (moments and step count too) and listed in [`StepStats::missing_grads`].
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "AdamW::step: learning rate {lr} is not a finite non-negative number"
            )));
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.config;
        let mut missing = Vec::new();
        let mut updated = 0;
        for slot in self.slots.iter_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                missing.push(slot.name.clone());
                continue;
            };
            let g = g.to_dtype(slot.var.dtype())?;
            slot.t += 1;
            let t = slot.t as i32;
            let bias_correction1 = 1.0 - beta1.powi(t);
            let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
            let step_size = lr / bias_correction1;
            let p = slot.var.as_tensor();
            let fused = self.fused_cpu
                && p.device().is_cpu()
                && p.dtype() == DType::F32
                && p.is_contiguous()
                && slot.m.is_contiguous()
                && slot.v.is_contiguous();
            if fused {
                let g = g.contiguous()?;
                slot.m.inplace_op2(
                    &g,
                    &MomentUpdate {
                        beta: beta1,
                        square: false,
                    },
                )?;
                slot.v.inplace_op2(
                    &g,
                    &MomentUpdate {
                        beta: beta2,
                        square: true,
                    },
                )?;
                p.inplace_op3(
                    &slot.m,
                    &slot.v,
                    &ParamUpdate {
                        decay: 1.0 - lr * weight_decay,
                        step_size,
                        bias_correction2_sqrt,
                        eps,
                    },
                )?;
            } else {
                let m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
                let v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let p = if weight_decay != 0.0 {
                    (p * (1.0 - lr * weight_decay))?
                } else {
                    p.clone()
                };
                let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
                let p = (p - (m.div(&denom)? * step_size)?)?;
                slot.var.set(&p)?;
                slot.m = m;
                slot.v = v;
            }
            updated += 1;
        }
        self.steps += 1;
        Ok(StepStats {
            step: self.steps,
            lr,
            updated,
            missing_grads: missing,
        })
    }

    /// A snapshot (copies) of the optimiser state as named tensors, for a checkpoint: `optim.m.<var>`,
    /// `optim.v.<var>` (same shape and dtype as the variable), `optim.t.<var>` (i64
    /// scalar, that variable's step count) and `optim.steps` (i64 scalar).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(3 * self.slots.len() + 1);
        let dev = self
            .slots
            .first()
            .map(|s| s.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        for s in &self.slots {
            // Copies: the fused update writes the moments in place, and a snapshot must not
            // change under the caller's feet.
            out.insert(key_m(&s.name), s.m.copy()?);
            out.insert(key_v(&s.name), s.v.copy()?);
            out.insert(key_t(&s.name), Tensor::new(s.t as i64, s.var.device())?);
        }
        out.insert(STEPS_KEY.to_string(), Tensor::new(self.steps as i64, &dev)?);
        Ok(out)
    }

    /// Restores the state written by [`state_tensors`](Self::state_tensors). `tensors`
    /// may hold other entries (model weights of the same checkpoint); entries under
    /// `optim.` must match this optimiser's variables exactly (no missing, no unknown
    /// variable, same shapes and dtypes), so a changed parameter set is an error.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut known: HashSet<String> = HashSet::new();
        known.insert(STEPS_KEY.to_string());
        let fetch = |key: &str| -> Result<&Tensor> {
            tensors
                .get(key)
                .ok_or_else(|| Error::OptimState(format!("missing tensor `{key}`")))
        };
        let scalar = |t: &Tensor, key: &str| -> Result<u64> {
            let v: i64 = t
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?
                .first()
                .copied()
                .ok_or_else(|| Error::OptimState(format!("`{key}` is empty")))?;
            u64::try_from(v).map_err(|_| Error::OptimState(format!("`{key}` is negative: {v}")))
        };
        let mut new_state = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let (km, kv, kt) = (key_m(&s.name), key_v(&s.name), key_t(&s.name));
            let mut moments = Vec::with_capacity(2);
            for key in [&km, &kv] {
                let x = fetch(key)?;
                if x.dims() != s.var.dims() || x.dtype() != s.var.dtype() {
                    return Err(Error::OptimState(format!(
                        "`{key}` is {:?} {:?}, variable `{}` is {:?} {:?}",
                        x.dims(),
                        x.dtype(),
                        s.name,
                        s.var.dims(),
                        s.var.dtype()
                    )));
                }
                // A private copy: the fused update writes it in place.
                moments.push(x.to_device(s.var.device())?.copy()?);
            }
            let t = scalar(fetch(&kt)?, &kt)?;
            let v = moments.pop().expect("two moments");
            let m = moments.pop().expect("two moments");
            new_state.push((m, v, t));
            known.extend([km, kv, kt]);
        }
        let steps = scalar(fetch(STEPS_KEY)?, STEPS_KEY)?;
        let mut unknown: Vec<&String> = tensors
            .keys()
            .filter(|k| k.starts_with(STATE_PREFIX) && !known.contains(*k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::OptimState(format!(
                "state for variables this optimiser does not have: {unknown:?}"
            )));
        }
        for (slot, (m, v, t)) in self.slots.iter_mut().zip(new_state) {
            slot.m = m;
            slot.v = v;
            slot.t = t;
        }
        self.steps = steps;
        Ok(())
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
        _ => candle_core::bail!("adamw fused update: {what} must be contiguous f32"),
    }
}

fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
        _ => candle_core::bail!("adamw fused update: destination must be contiguous f32"),
    }
}

/// In place: `m <- m + (1 - beta) (g - m)` (torch's `lerp_`), or with `square`
/// `v <- beta v + (1 - beta) g^2` (torch's `mul_` + `addcmul_`), in f32 as torch does.
struct MomentUpdate {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> candle_core::Result<()> {
        let m = contiguous_f32_mut(dst, dst_l)?;
        let g = contiguous_f32(g, g_l, "gradient")?;
        if m.len() != g.len() {
            candle_core::bail!(
                "adamw fused update: {} moments vs {} grads",
                m.len(),
                g.len()
            );
        }
        let (beta, w) = (self.beta as f32, (1.0 - self.beta) as f32);
        if self.square {
            m.iter_mut()
                .zip(g)
                .for_each(|(v, &g)| *v = *v * beta + w * g * g);
        } else {
            m.iter_mut().zip(g).for_each(|(m, &g)| *m += w * (g - *m));
        }
        Ok(())
    }
}

/// In place: `p <- p (1 - lr wd) - step_size m / (sqrt(v) / sqrt(bc2) + eps)`.
struct ParamUpdate {
    decay: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
    eps: f64,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let p = contiguous_f32_mut(dst, dst_l)?;
        let m = contiguous_f32(m, m_l, "first moment")?;
        let v = contiguous_f32(v, v_l, "second moment")?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adamw fused update: parameter and moment sizes differ");
        }
        let decay = self.decay as f32;
        let neg_step = -self.step_size as f32;
        let bc2 = self.bias_correction2_sqrt as f32;
        let eps = self.eps as f32;
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt() / bc2 + eps;
            *p = *p * decay + neg_step * (m / denom);
        }
        Ok(())
    }
}

fn sum_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 {
        let (storage, layout) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(d)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(d[a..b].iter().map(|&x| (x as f64) * (x as f64)).sum());
        }
    }
    Ok(g.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Scales the gradients of `vars` in `grads` so that their global L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`: `coef = max_norm / (norm + 1e-6)`,
/// applied only when `coef < 1`. Returns the norm before clipping. Variables without a
/// gradient are ignored. The norm is accumulated in f64.
///
/// If the norm is NaN or infinite the gradients are left as they are and the norm is
/// returned, so that the loop can stop on it (see [`crate::guard::check_finite`]).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[&Var], max_norm: f64) -> Result<f64> {
    if !max_norm.is_finite() || max_norm <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "clip_grad_norm: max_norm must be finite and > 0, got {max_norm}"
        )));
    }
    let mut sq = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sq += sum_squares(g)?;
        }
    }
    let total = sq.sqrt();
    if !total.is_finite() {
        return Ok(total);
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(total)
}
