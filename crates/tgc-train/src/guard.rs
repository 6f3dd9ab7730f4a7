//! Run guards: stop on a non-finite loss with a message that says where.

use std::fmt::Display;

use crate::error::{Error, Result};

/// Returns an error naming `step` and the batch's sample ids if `loss` is NaN or
/// infinite. Call it on every step's loss before `backward()`, so a diverging run stops
/// at once instead of writing NaN weights into the next checkpoint.
pub fn check_finite<S: Display>(loss: f64, step: u64, batch_ids: &[S]) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    let batch = batch_ids
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::NonFiniteLoss {
        value: loss,
        step,
        batch,
    })
}
