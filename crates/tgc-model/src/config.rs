//! [`TgcConfig`]: the whole model's configuration, its presets and ablation switches.

use serde::{Deserialize, Serialize};
use tgc_clip::ClipConfig;
use tgc_date::DateConfig;
use tgc_decoder::DecoderConfig;
use tgc_sse::{MsDeformAttnConfig, SseConfig, SseMode};
use tgc_vlcm::{VlcmConfig, VlcmVariant};

use crate::{Error, Result};

/// Which frozen text tower encodes the prompts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextTower {
    /// CLIP's own text tower (the paper). Pooling at the EOS token.
    #[default]
    Clip,
    /// A BERT-family encoder from a folder with `config.json`, `model.safetensors` and
    /// `tokenizer.json` (e.g. all-MiniLM-L6-v2 from `weights/fetch_minilm.sh`). Pooling is
    /// the masked mean. `hidden` must equal the encoder's width; it sets `D_t`.
    Bert {
        /// Folder of the encoder's files.
        dir: String,
        /// Width of the encoder's token states (384 for MiniLM-L6).
        hidden: usize,
    },
}

/// Which prompts reach the model (the paper's Table 5 rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextMode {
    /// Primary and auxiliary prompts fused by DATE (the paper's model).
    #[default]
    Fused,
    /// The primary prompt only; DATE is not built ("no DATE", "main only").
    MainOnly,
    /// The auxiliary prompt only; DATE is not built.
    AuxOnly,
    /// Primary and auxiliary sentences concatenated into one prompt; DATE is not built
    /// (the "LLM-expanded" row).
    Concatenated,
}

impl TextMode {
    /// Whether this mode runs DATE.
    pub fn uses_date(self) -> bool {
        self == TextMode::Fused
    }
}

/// Which parameters of CLIP's vision tower train (the paper's Table 4 encoder rows).
///
/// The text tower always stays frozen. With anything but `Frozen`, [`crate::TgcNet`]
/// holds a trainable copy of the vision tower, initialised from the loaded weights,
/// whose trained parameters are `Var`s under the prefix `clip_vision.`; image features
/// then come from that tower on every forward (they can no longer be cached).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipFinetune {
    /// The paper's model: CLIP frozen, its features computable once and cached.
    #[default]
    Frozen,
    /// Every layer's `self_attn.q_proj` and `v_proj` (weight and bias) train; the rest
    /// of the tower is frozen ("ViT q,v fine-tune").
    QueryValue,
    /// Every vision-tower parameter trains ("ViT full fine-tune"): patch, class and
    /// position embeddings, pre-LN, all blocks, and the post-LN and visual projection
    /// when the decoder's CLIP cost channel uses them (`decoder.use_clip_cost`;
    /// otherwise they do not reach the output and stay frozen).
    Full,
}

impl ClipFinetune {
    /// Whether any CLIP parameter trains.
    pub fn is_trainable(self) -> bool {
        self != ClipFinetune::Frozen
    }

    /// The config name: `frozen`, `query_value` or `full`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClipFinetune::Frozen => "frozen",
            ClipFinetune::QueryValue => "query_value",
            ClipFinetune::Full => "full",
        }
    }
}

impl std::fmt::Display for ClipFinetune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configuration of [`crate::TgcNet`]. Every ablation of the paper is a change here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TgcConfig {
    /// Name of the preset this came from (informational).
    pub preset: String,
    /// Frozen CLIP towers.
    pub clip: ClipConfig,
    /// Frozen text tower for the prompts.
    pub text_tower: TextTower,
    /// Input size of the CLIP vision tower (`S_c`).
    pub clip_size: usize,
    /// Input size of the CNN branch (`S_n = 32 * S_c / patch`).
    pub cnn_size: usize,
    /// Side of the output logits (the label size).
    pub label_size: usize,
    /// Token length of every prompt (77 for CLIP).
    pub max_text_len: usize,
    /// SSE (its `mode` is the encoder ablation).
    pub sse: SseConfig,
    /// DATE (used when `text_mode` is `fused`).
    pub date: DateConfig,
    /// Which prompts reach the model.
    pub text_mode: TextMode,
    /// VLCM (its `variant` is the alignment ablation).
    pub vlcm: VlcmConfig,
    /// CAT-Seg decoder.
    pub decoder: DecoderConfig,
    /// Replace every prompt by the empty string: the image-only baseline that shows how
    /// much the text carries.
    pub image_only: bool,
    /// Which CLIP vision-tower parameters train (encoder ablation; `frozen` in the
    /// paper's model).
    #[serde(default)]
    pub clip_finetune: ClipFinetune,
}

impl Default for TgcConfig {
    fn default() -> Self {
        Self::paper()
    }
}

impl TgcConfig {
    /// Parses a config from JSON (a `--config` file or a checkpoint's metadata), refusing
    /// fields this version does not know: serde's defaults would otherwise drop a typo or
    /// a field added by a newer version silently, and the model built would not be the
    /// one described. Missing fields take their defaults, as configs written before a
    /// field existed must still load.
    ///
    /// ```
    /// use tgc_model::TgcConfig;
    /// let json = serde_json::to_string(&TgcConfig::tiny()).unwrap();
    /// assert_eq!(TgcConfig::from_json(&json).unwrap(), TgcConfig::tiny());
    /// let typo = json.replacen("\"label_size\"", "\"label_sise\"", 1);
    /// let err = TgcConfig::from_json(&typo).unwrap_err().to_string();
    /// assert!(err.contains("label_sise"), "{err}");
    /// ```
    pub fn from_json(json: &str) -> Result<Self> {
        let raw: serde_json::Value =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("invalid JSON: {e}")))?;
        Self::from_json_value(raw)
    }

    /// [`TgcConfig::from_json`] on an already parsed value.
    pub fn from_json_value(raw: serde_json::Value) -> Result<Self> {
        let cfg: Self = serde_json::from_value(raw.clone())
            .map_err(|e| Error::Config(format!("not a TgcConfig: {e}")))?;
        let known = serde_json::to_value(&cfg).map_err(|e| Error::Config(e.to_string()))?;
        let unknown = unknown_fields(&raw, &known);
        if !unknown.is_empty() {
            return Err(Error::Config(format!(
                "unknown field{} {} (a typo, or a config written by a newer version of tgc)",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            )));
        }
        Ok(cfg)
    }

    /// The paper: CLIP ViT-L/14 at 336 px (24x24 grid), CNN at 768 px, D = 256, six
    /// MSDeformAttn layers, decoder hidden 128; about 10.3M trainable parameters.
    pub fn paper() -> Self {
        Self {
            preset: "paper".into(),
            clip: ClipConfig::vit_l14_336(),
            text_tower: TextTower::Clip,
            clip_size: 336,
            cnn_size: 768,
            label_size: 224,
            max_text_len: 77,
            sse: SseConfig::paper(),
            date: DateConfig::default(),
            text_mode: TextMode::Fused,
            vlcm: VlcmConfig::default(),
            decoder: DecoderConfig::default(),
            image_only: false,
            clip_finetune: ClipFinetune::Frozen,
        }
    }

    /// Trains on two CPU cores at the datasets' native 224 px: the CNN branch reads the
    /// 224 px image (pyramid 28^2, 14^2, 7^2), TinyCLIP-ViT-8M-16 reads it at 112 px so
    /// that its 7x7 token grid meets the CNN's 1/32 level (position embeddings
    /// interpolated from 14x14), D = 64, two MSDeformAttn layers (FFN 256), labels at
    /// 224 px, and the decoder's text FiLM (not in the paper: with one report per image
    /// the class attention cannot see the text, and without it the model trained from
    /// scratch ignored the reports; docs/results.md). About 0.84M trainable parameters
    /// and 8 images/s of training on two cores
    /// (`cargo run --release --example step_timing -- --preset cpu`); the first version
    /// (CNN at 448 px, D = 128, three layers) ran at 0.5-0.7 images/s. Trained from
    /// random CLIP weights it wants a learning rate around 1e-3 to 3e-3.
    pub fn cpu() -> Self {
        let d = 64;
        let sse = SseConfig::cpu();
        Self {
            preset: "cpu".into(),
            clip: ClipConfig::tinyclip_8m_16(),
            text_tower: TextTower::Clip,
            clip_size: 112,
            cnn_size: 224,
            label_size: 224,
            max_text_len: 77,
            // No dropout: every CPU result in docs/results.md was measured without it
            // (tgc_nn::dropout would now repeat and resume exactly).
            sse: SseConfig {
                cnn_channels: [24, 48, 96],
                cnn_blocks: [0, 0, 0],
                d_model: d,
                norm_groups: 8,
                msda: MsDeformAttnConfig {
                    d_model: d,
                    n_layers: 2,
                    ffn_dim: 256,
                    dropout: 0.0,
                    ..sse.msda
                },
                ..sse
            },
            date: DateConfig {
                text_dim: 256,
                heads: 4,
                dropout: 0.0,
                ..DateConfig::default()
            },
            text_mode: TextMode::Fused,
            vlcm: VlcmConfig {
                d_model: d,
                text_dim: 256,
                heads: 4,
                ..VlcmConfig::default()
            },
            decoder: DecoderConfig {
                d_model: d,
                hidden: 48,
                guidance_dim: 48,
                class_mlp: 128,
                window: 7,
                up_channels: [64, 32],
                decoder_dims: [48, 24],
                // Not in the paper: from scratch on CPU the text route does not open
                // without it (docs/results.md, QaTa-COV19 and the phantoms).
                text_film: true,
                ..DecoderConfig::default()
            },
            image_only: false,
            clip_finetune: ClipFinetune::Frozen,
        }
    }

    /// A very small model for tests and the embedded synthetic demo: the tiny CLIP
    /// (32 px, patch 8, 4x4 grid), CNN at 128 px, D = 32, two MSDeformAttn layers,
    /// labels at 64 px.
    pub fn tiny() -> Self {
        let d = 32;
        let clip = ClipConfig::tiny();
        let text_dim = clip.text.width;
        Self {
            preset: "tiny".into(),
            clip_size: clip.vision.image_size,
            cnn_size: 128,
            label_size: 64,
            max_text_len: 77,
            sse: SseConfig {
                cnn_channels: [16, 32, 32],
                stem_channels: 8,
                cnn_blocks: [0, 0, 0],
                clip_dim: clip.vision.width,
                d_model: d,
                msda: MsDeformAttnConfig {
                    d_model: d,
                    n_heads: 4,
                    n_layers: 2,
                    ffn_dim: 64,
                    dropout: 0.0,
                    ..MsDeformAttnConfig::default()
                },
                norm_groups: 8,
                ..SseConfig::cpu()
            },
            date: DateConfig {
                text_dim,
                heads: 2,
                dropout: 0.0,
                ..DateConfig::default()
            },
            text_mode: TextMode::Fused,
            vlcm: VlcmConfig {
                d_model: d,
                text_dim,
                heads: 4,
                ..VlcmConfig::default()
            },
            decoder: DecoderConfig {
                d_model: d,
                hidden: 32,
                guidance_dim: 32,
                heads: 2,
                layers: 1,
                window: 4,
                class_mlp: 64,
                f16_proj: 16,
                f8_proj: 8,
                up_channels: [32, 16],
                decoder_dims: [32, 16],
                group_norm_channels: 8,
                ..DecoderConfig::default()
            },
            image_only: false,
            clip,
            text_tower: TextTower::Clip,
            clip_finetune: ClipFinetune::Frozen,
        }
    }

    /// A preset by name: `paper`, `cpu` or `tiny`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "cpu" => Ok(Self::cpu()),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::Config(format!(
                "unknown preset {other:?} (expected paper, cpu or tiny)"
            ))),
        }
    }

    /// Width `D_t` of the prompt token states (CLIP text width or the BERT width).
    pub fn text_dim(&self) -> usize {
        match &self.text_tower {
            TextTower::Clip => self.clip.text.width,
            TextTower::Bert { hidden, .. } => *hidden,
        }
    }

    /// Sets the SSE mode (encoder ablation: `full`, `clip_only` = "no SSE / ViT-only",
    /// `cnn_only`).
    pub fn with_sse_mode(mut self, mode: SseMode) -> Self {
        self.sse.mode = mode;
        self
    }

    /// Sets which CLIP vision-tower parameters train (encoder ablation: `frozen`,
    /// `query_value` = "ViT q,v fine-tune", `full` = "ViT full fine-tune"; with
    /// `SseMode::Full` the latter is "CNN+ViT full fine-tune").
    pub fn with_clip_finetune(mut self, finetune: ClipFinetune) -> Self {
        self.clip_finetune = finetune;
        self
    }

    /// Sets the VLCM variant (alignment ablation).
    pub fn with_vlcm(mut self, variant: VlcmVariant) -> Self {
        self.vlcm.variant = variant;
        self
    }

    /// Sets the text mode (DATE ablation).
    pub fn with_text_mode(mut self, mode: TextMode) -> Self {
        self.text_mode = mode;
        self
    }

    /// Switches to a BERT-family text tower of width `hidden` in `dir`, adjusting DATE
    /// and VLCM text widths and disabling the CLIP zero-shot cost channel (it needs CLIP's
    /// text embedding).
    pub fn with_bert_text(mut self, dir: impl Into<String>, hidden: usize) -> Self {
        self.text_tower = TextTower::Bert {
            dir: dir.into(),
            hidden,
        };
        self.date.text_dim = hidden;
        self.vlcm.text_dim = hidden;
        self.decoder.use_clip_cost = false;
        self
    }

    /// Checks that the parts agree with each other; the message names the fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let v = &self.clip.vision;
        if !self.clip_size.is_multiple_of(v.patch_size) {
            return bad(format!(
                "clip_size {} is not a multiple of the CLIP patch size {}",
                self.clip_size, v.patch_size
            ));
        }
        let grid = self.clip_size / v.patch_size;
        if self.cnn_size != 32 * grid {
            return bad(format!(
                "cnn_size {} must be 32 x the CLIP grid {grid} = {} so the CNN's 1/32 grid \
                 equals CLIP's",
                self.cnn_size,
                32 * grid
            ));
        }
        if self.sse.clip_dim != v.width {
            return bad(format!(
                "sse.clip_dim {} != CLIP vision width {}",
                self.sse.clip_dim, v.width
            ));
        }
        let d = self.sse.d_model;
        if self.vlcm.d_model != d || self.decoder.d_model != d {
            return bad(format!(
                "model width mismatch: sse.d_model {d}, vlcm.d_model {}, decoder.d_model {}",
                self.vlcm.d_model, self.decoder.d_model
            ));
        }
        let dt = self.text_dim();
        if self.date.text_dim != dt || self.vlcm.text_dim != dt {
            return bad(format!(
                "text width mismatch: text tower {dt}, date.text_dim {}, vlcm.text_dim {}",
                self.date.text_dim, self.vlcm.text_dim
            ));
        }
        if self.decoder.use_clip_cost && !matches!(self.text_tower, TextTower::Clip) {
            return bad(
                "decoder.use_clip_cost needs the CLIP text tower (its text embedding); \
                 set it to false with a BERT text tower"
                    .into(),
            );
        }
        if let Some(q) = &self.decoder.quarter {
            if self.sse.mode == SseMode::ClipOnly {
                return bad(
                    "decoder.quarter needs the CNN stem's 1/4 features, but sse.mode clip_only \
                     has no CNN; remove decoder.quarter"
                        .into(),
                );
            }
            if q.in_channels != self.sse.stem_channels {
                return bad(format!(
                    "decoder.quarter.in_channels {} != sse.stem_channels {}",
                    q.in_channels, self.sse.stem_channels
                ));
            }
        }
        if let Some(hs) = &self.decoder.half {
            if self.sse.mode == SseMode::ClipOnly {
                return bad(
                    "decoder.half is guided by the CNN branch's input image, but sse.mode \
                     clip_only has no CNN; remove decoder.half"
                        .into(),
                );
            }
            if self.decoder.quarter.is_none() {
                return bad(
                    "decoder.half upsamples the output of decoder.quarter: set decoder.quarter \
                     too, or remove decoder.half"
                        .into(),
                );
            }
            if hs.in_channels != self.sse.in_channels {
                return bad(format!(
                    "decoder.half.in_channels {} != sse.in_channels {}",
                    hs.in_channels, self.sse.in_channels
                ));
            }
        }
        if self.clip_finetune.is_trainable() && self.sse.mode == SseMode::CnnOnly {
            return bad(format!(
                "clip_finetune {} needs CLIP's image features, but sse.mode cnn_only does \
                 not use them; set clip_finetune to frozen",
                self.clip_finetune
            ));
        }
        if self.label_size == 0 || self.max_text_len < 2 {
            return bad(format!(
                "label_size {} and max_text_len {} must be positive (text >= 2)",
                self.label_size, self.max_text_len
            ));
        }
        Ok(())
    }

    /// A short, stable identifier of the frozen towers and preprocessing, for the feature
    /// cache: features computed under one id are valid for every config with that id.
    pub fn frozen_id(&self, weights: &str) -> String {
        let json = serde_json::to_string(&(&self.clip, &self.text_tower, self.clip_size))
            .unwrap_or_default();
        let mut h: u64 = 0xcbf29ce484222325;
        for b in json.bytes().chain(weights.bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{}-{}-{h:016x}", self.preset, self.clip_size)
    }
}

/// Dotted paths (in backticks) of the object keys in `raw` that are absent from `known`,
/// the same config after a deserialise-serialise round trip: the fields serde's defaults
/// dropped. Explicit nulls are skipped, as an `Option` field this version knows
/// serialises as null and one it does not know disappears. Works for any config struct
/// without `deny_unknown_fields` ([`TgcConfig`], `TrainConfig`, ...).
///
/// ```
/// let raw = serde_json::json!({"a": 1, "b": {"c": 2, "typo": 3}, "gone": null});
/// let known = serde_json::json!({"a": 1, "b": {"c": 2}});
/// assert_eq!(tgc_model::unknown_fields(&raw, &known), vec!["`b.typo`".to_string()]);
/// ```
pub fn unknown_fields(raw: &serde_json::Value, known: &serde_json::Value) -> Vec<String> {
    fn walk(p: &str, raw: &serde_json::Value, known: &serde_json::Value, out: &mut Vec<String>) {
        let (serde_json::Value::Object(r), serde_json::Value::Object(k)) = (raw, known) else {
            return;
        };
        for (key, v) in r {
            let q = if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            };
            match k.get(key) {
                Some(kv) => walk(&q, v, kv, out),
                None if !v.is_null() => out.push(format!("`{q}`")),
                None => {}
            }
        }
    }
    let mut out = vec![];
    walk("", raw, known, &mut out);
    out
}
