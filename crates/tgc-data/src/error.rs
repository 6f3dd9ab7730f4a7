//! The crate error type.

use std::path::{Path, PathBuf};

/// Errors of `tgc-data`. Every variant that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with a specific file (missing, unreadable, malformed, inconsistent).
    #[error("{}: {msg}", path.display())]
    File {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error while accessing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being accessed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Invalid arguments or inconsistent in-memory data.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An error about `path`.
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
