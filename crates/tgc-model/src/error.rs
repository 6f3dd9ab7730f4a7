use std::path::PathBuf;

/// Errors of the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A required file is missing.
    #[error("missing file {path}: {hint}")]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What the file is and how to get it.
        hint: String,
    },
    /// Weights in a file do not fit the architecture.
    #[error("weights {path}: {source}")]
    Weights {
        /// The weight file.
        path: PathBuf,
        /// What did not fit.
        source: candle_core::Error,
    },
    /// A configuration is invalid or does not match.
    #[error("config: {0}")]
    Config(String),
    /// Tokenisation failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad input to the model.
    #[error("input: {0}")]
    Input(String),
    /// A device name that is unknown, not compiled in, or has no hardware behind it.
    #[error("device: {0}")]
    Device(String),
}

/// Result type of the model crate.
pub type Result<T> = std::result::Result<T, Error>;
