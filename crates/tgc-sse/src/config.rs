//! Configuration of the SSE: [`SseConfig`] and the ablation switch [`SseMode`].

use serde::{Deserialize, Serialize};

use crate::{Error, MsDeformAttnConfig, Result};

/// Which branches the SSE uses: the paper's encoder ablation.
///
/// Serialised in snake case (`"full"`, `"clip_only"`, `"cnn_only"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SseMode {
    /// The paper's SSE: CNN pyramid, CLIP fusion at 1/32, MSDeformAttn refinement.
    #[default]
    Full,
    /// The "no SSE / ViT-only frozen" row: no CNN and no MSDeformAttn.
    /// `F_V^1/32 = LN(P_V(F_clip))`; `F_V^1/16` and `F_V^1/8` come from it through learned
    /// `ConvTranspose2d(D, D, 2, 2)` upsamplings (x2, then x2 again), as CAT-Seg upsamples
    /// CLIP features for its decoder.
    ClipOnly,
    /// The "CNN-only" row: CNN pyramid and MSDeformAttn without CLIP:
    /// `F_fused = LN(P_C(F_cnn^1/32))`.
    CnnOnly,
}

impl SseMode {
    /// Whether this mode runs the CNN branch (and hence the MSDeformAttn encoder).
    pub fn uses_cnn(self) -> bool {
        matches!(self, SseMode::Full | SseMode::CnnOnly)
    }

    /// Whether this mode consumes CLIP patch tokens.
    pub fn uses_clip(self) -> bool {
        matches!(self, SseMode::Full | SseMode::ClipOnly)
    }
}

/// Configuration of the [`crate::Sse`]. `Default` is the paper preset (ViT-L/14 at 336 px,
/// CNN at 768 px, `D = 256`, 6 MSDeformAttn layers); [`SseConfig::cpu`] is the CPU preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SseConfig {
    /// Which branches to use (ablation switch).
    pub mode: SseMode,
    /// Channels of the CNN input image (3).
    pub in_channels: usize,
    /// CNN channel widths at 1/8, 1/16 and 1/32 (`C_8, C_16, C_32`).
    pub cnn_channels: [usize; 3],
    /// Width of the stem (a 4x4 stride-4 patchify convolution and a 3x3 convolution at
    /// 1/4).
    pub stem_channels: usize,
    /// Residual blocks (two 3x3 convolutions each) after the 2x2 stride-2 convolution of each
    /// stage (1/8, 1/16, 1/32).
    pub cnn_blocks: [usize; 3],
    /// Width `D_v` of the CLIP patch tokens (1024 for ViT-L/14).
    pub clip_dim: usize,
    /// Model width `D` of the pyramid (the MSDeformAttn `d_model`).
    pub d_model: usize,
    /// The MSDeformAttn encoder; its `d_model` must equal [`SseConfig::d_model`] and its
    /// `n_levels` must be 3.
    pub msda: MsDeformAttnConfig,
    /// Group count of the GroupNorms; a layer with `c` channels uses `gcd(c, norm_groups)`
    /// groups (32 as in Deformable DETR's input projections).
    pub norm_groups: usize,
    /// Epsilon of every GroupNorm and LayerNorm.
    pub eps: f64,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            mode: SseMode::Full,
            in_channels: 3,
            cnn_channels: [64, 128, 256],
            stem_channels: 32,
            cnn_blocks: [1, 1, 0],
            clip_dim: 1024,
            d_model: 256,
            msda: MsDeformAttnConfig::default(),
            norm_groups: 32,
            eps: 1e-5,
        }
    }
}

impl SseConfig {
    /// The paper preset (same as `Default`).
    pub fn paper() -> Self {
        Self::default()
    }

    /// The CPU preset: TinyCLIP-ViT-8M-16 geometry (`D_v = 256`, 14x14 grid at 224 px, so
    /// the CNN runs at 448 px), `D = 128`, 3 MSDeformAttn layers with 4 heads and FFN 512,
    /// and a narrower CNN.
    pub fn cpu() -> Self {
        Self {
            mode: SseMode::Full,
            in_channels: 3,
            cnn_channels: [32, 64, 128],
            stem_channels: 16,
            cnn_blocks: [1, 1, 0],
            clip_dim: 256,
            d_model: 128,
            msda: MsDeformAttnConfig {
                d_model: 128,
                n_heads: 4,
                n_layers: 3,
                ffn_dim: 512,
                ..MsDeformAttnConfig::default()
            },
            norm_groups: 32,
            eps: 1e-5,
        }
    }

    /// Returns the same configuration with another [`SseMode`].
    pub fn with_mode(mut self, mode: SseMode) -> Self {
        self.mode = mode;
        self
    }

    /// Checks the widths for consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.in_channels == 0 || self.stem_channels == 0 || self.cnn_channels.contains(&0) {
            return bad(format!(
                "in_channels {}, stem_channels {} and cnn_channels {:?} must be non-zero",
                self.in_channels, self.stem_channels, self.cnn_channels
            ));
        }
        if self.clip_dim == 0 || self.d_model == 0 || self.norm_groups == 0 {
            return bad(format!(
                "clip_dim {}, d_model {} and norm_groups {} must be non-zero",
                self.clip_dim, self.d_model, self.norm_groups
            ));
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad(format!("eps must be positive, got {}", self.eps));
        }
        if self.mode.uses_cnn() {
            if self.msda.d_model != self.d_model {
                return bad(format!(
                    "msda.d_model {} must equal d_model {}",
                    self.msda.d_model, self.d_model
                ));
            }
            if self.msda.n_levels != 3 {
                return bad(format!(
                    "msda.n_levels must be 3 (1/8, 1/16, 1/32), got {}",
                    self.msda.n_levels
                ));
            }
        }
        Ok(())
    }
}

/// Group count for a GroupNorm over `channels` channels: `gcd(channels, norm_groups)`.
pub(crate) fn groups_for(channels: usize, norm_groups: usize) -> usize {
    let (mut a, mut b) = (channels, norm_groups);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}
