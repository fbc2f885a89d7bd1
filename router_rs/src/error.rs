use thiserror::Error;

/// Every way a routing call can be refused. Messages name the offending argument so the
/// Python side can surface them verbatim as `ValueError`s.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RouterError {
    #[error("{arg}: expected shape {expected}, got {got}")]
    Shape { arg: &'static str, expected: String, got: String },
    #[error("{arg}: contains a non-finite value (NaN or inf) at flat index {index}")]
    NonFinite { arg: &'static str, index: usize },
    #[error("{arg}: contains a negative value {value} at flat index {index}")]
    Negative { arg: &'static str, index: usize, value: f64 },
    #[error("{arg}: {reason}")]
    Invalid { arg: &'static str, reason: String },
    #[error("tau: must be finite and >= 0, got {0}")]
    Tau(f64),
    #[error("workers: at least one decode worker is required")]
    NoWorkers,
    #[error("all {0} decode workers are unhealthy; nothing can be chosen")]
    AllUnhealthy(usize),
    #[error("worker: no worker with id {0} (out of range: removed, or never added)")]
    UnknownWorker(u64),
    #[error("worker: a worker with key {0:?} is already a member")]
    DuplicateKey(String),
    #[error("worker: {0:?} is the last worker; add another before removing it")]
    LastWorker(String),
    #[error("worker: release of worker {0} whose in-flight count is already 0")]
    ReleaseUnderflow(u64),
    #[error("centroids: fitted for members {expected:?} but the members are now {actual:?}; refit")]
    StaleMembership { expected: Vec<u64>, actual: Vec<u64> },
    #[error("policy: unknown policy {0:?} (expected one of: eldr, rr, random, jsq, p2c)")]
    UnknownPolicy(String),
    #[error("{0}: this policy has no centroids (only the eldr policy uses them)")]
    NoLocality(&'static str),
}

pub type Result<T> = std::result::Result<T, RouterError>;
