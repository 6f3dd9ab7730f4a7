//! The crate's error type.

use std::path::PathBuf;

/// Errors of the training primitives. Messages name the file, tensor or step concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read, written, synced or renamed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("writing", "reading", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A checkpoint file does not exist.
    #[error("checkpoint {0} not found")]
    CheckpointMissing(PathBuf),

    /// A checkpoint file exists but cannot be parsed (truncated write, foreign file, ...).
    #[error("checkpoint {path} is truncated or corrupt: {reason}")]
    CheckpointCorrupt {
        /// The checkpoint file.
        path: PathBuf,
        /// What the safetensors parser reported.
        reason: String,
    },

    /// A checkpoint was written with another format version (or without one).
    #[error("checkpoint {path} has format version {found}, this build reads version {expected}")]
    FormatVersion {
        /// The checkpoint file.
        path: PathBuf,
        /// The version found in the metadata (`"none"` when absent).
        found: String,
        /// The version this build writes and reads.
        expected: String,
    },

    /// A metadata entry is missing or cannot be parsed.
    #[error("checkpoint metadata `{key}`: {reason}")]
    Metadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A checkpoint was trained with a different model/training config.
    #[error("checkpoint from another config (checkpoint vs current): {0}")]
    ConfigMismatch(String),

    /// The loss became NaN or infinite.
    #[error("non-finite loss {value} at step {step} (batch: {batch})")]
    NonFiniteLoss {
        /// The offending loss value.
        value: f64,
        /// The optimiser step at which it happened.
        step: u64,
        /// The sample ids of the batch, comma separated.
        batch: String,
    },

    /// Optimiser state does not fit the optimiser's variables.
    #[error("optimiser state: {0}")]
    OptimState(String),

    /// A hyper-parameter or argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// JSON (de)serialisation failed.
    #[error("JSON error in {context}: {source}")]
    Json {
        /// Where (file and line, or the value concerned).
        context: String,
        /// The underlying error.
        source: serde_json::Error,
    },

    /// A dataset, loader, metric or feature-cache error (names the file).
    #[error("data: {0}")]
    Data(Box<tgc_data::Error>),

    /// A model error (config, weights, input).
    #[error("model: {0}")]
    Model(Box<tgc_model::Error>),

    /// Drawing or encoding an image failed.
    #[error("image {path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl From<tgc_data::Error> for Error {
    fn from(e: tgc_data::Error) -> Self {
        Error::Data(Box::new(e))
    }
}

impl From<tgc_model::Error> for Error {
    fn from(e: tgc_model::Error) -> Self {
        Error::Model(Box::new(e))
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
