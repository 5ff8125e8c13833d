use thiserror::Error;

/// Errors of the model layer: a value that breaks an invariant, or bytes that do not
/// decode into a valid value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelError {
    #[error("item id is {len} bytes long; the limit is {max}")]
    ItemIdTooLong { len: usize, max: usize },
    #[error("invalid knowledge: {0}")]
    InvalidKnowledge(String),
    #[error("invalid change batch: {0}")]
    InvalidBatch(String),
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{what} has format version {found}; this build reads version {expected}")]
    FormatVersion {
        what: &'static str,
        found: u8,
        expected: u8,
    },
}
