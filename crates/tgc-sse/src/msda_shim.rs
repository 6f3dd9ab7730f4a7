//! Temporary stand-in for `tgc_msda::MsDeformAttnConfig` while building without the
//! `msda` feature (same fields and defaults as the agreed API).

use serde::{Deserialize, Serialize};

/// Configuration of the MSDeformAttn encoder (mirror of `tgc_msda::MsDeformAttnConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MsDeformAttnConfig {
    /// Model width.
    pub d_model: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Feature levels.
    pub n_levels: usize,
    /// Sampling points per head and level.
    pub n_points: usize,
    /// Encoder layers.
    pub n_layers: usize,
    /// FFN hidden width.
    pub ffn_dim: usize,
    /// Dropout probability.
    pub dropout: f64,
}

impl Default for MsDeformAttnConfig {
    fn default() -> Self {
        Self {
            d_model: 256,
            n_heads: 8,
            n_levels: 3,
            n_points: 4,
            n_layers: 6,
            ffn_dim: 1024,
            dropout: 0.1,
        }
    }
}
