//! Errors of the Rust core. Shape and argument errors are the caller's and become `ValueError`;
//! failures inside libtorch become `RuntimeError`.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor does not have the shape the predictor layout requires.
    #[error("{0}")]
    Shape(String),
    /// An argument has a value the routine cannot use.
    #[error("{0}")]
    Argument(String),
    /// `init` names no known strategy.
    #[error("unknown init {0:?}: choose one of preserve, mean, background, imprint")]
    UnknownInit(String),
    /// libtorch itself failed.
    #[error("libtorch: {}", .0.to_string().lines().next().unwrap_or_default())]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match err {
            Error::Torch(_) => PyRuntimeError::new_err(err.to_string()),
            _ => PyValueError::new_err(err.to_string()),
        }
    }
}
