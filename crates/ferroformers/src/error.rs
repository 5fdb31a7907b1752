//! The one error type of the library: every failure says what was wrong and where.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `note`: why a task the registry knows is not available here (empty: the name is
    /// unknown).
    #[error("{}", unknown_task(.task, .note, .known))]
    UnknownTask {
        task: String,
        note: String,
        known: String,
    },

    #[error("model `{model}` not found: looked for {looked_for}")]
    ModelNotFound { model: String, looked_for: String },

    #[error("cannot download `{model}` from {endpoint}: {detail}")]
    Download {
        model: String,
        endpoint: String,
        detail: String,
    },

    #[error("`{path}` is missing: {what}")]
    MissingFile { path: PathBuf, what: String },

    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file or folder that could not be written or made (saving a trained model).
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid `{path}`: {detail}")]
    InvalidFile { path: PathBuf, detail: String },

    #[error("weights `{path}`: {detail}")]
    Weights { path: PathBuf, detail: String },

    #[error(
        "model type `{model_type}` is not supported for task `{task}` (supported: {supported})"
    )]
    UnsupportedModel {
        model_type: String,
        task: String,
        supported: String,
    },

    #[error("unknown parameter `{name}` for task `{task}`; accepted parameters: {accepted}")]
    UnknownParameter {
        task: String,
        name: String,
        accepted: String,
    },

    #[error("invalid value for parameter `{name}`: {detail}")]
    InvalidParameter { name: String, detail: String },

    #[error("invalid input #{index}: {detail}")]
    InvalidInput { index: usize, detail: String },

    /// Audio that cannot be decoded or processed (`what`: the file, the bytes, or the step).
    #[error("audio {what}: {detail}")]
    Audio { what: String, detail: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("tensor computation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Write {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid_file(path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        Error::InvalidFile {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn param(name: &str, detail: impl ToString) -> Self {
        Error::InvalidParameter {
            name: name.to_string(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn input(index: usize, detail: impl ToString) -> Self {
        Error::InvalidInput {
            index,
            detail: detail.to_string(),
        }
    }
}

/// [`Error::UnknownTask`]'s message: the task's name alone in backticks, the reason after it.
fn unknown_task(task: &str, note: &str, known: &str) -> String {
    if note.is_empty() {
        format!("unknown task `{task}`; known tasks: {known}")
    } else {
        format!("task `{task}` is not available: {note}; known tasks: {known}")
    }
}

/// The message a caught panic carries (`panic!`'s text, whether a literal or formatted), if
/// any: what a `catch_unwind` that turns a panic into an error names.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<String> {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
}
