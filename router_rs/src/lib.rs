//! ELDR decode routing core: the decoder set, request signatures, unit centroids and their
//! certified fixed-point copy, the locality-band policy and load-only baselines, behind one
//! stateful [`Router`]. No Python here; see `router_rs/python`.
pub mod centroids;
pub mod error;
pub mod fleet;
pub mod kernel;
pub mod model;
pub mod policy;
pub mod router;
pub mod signature;

pub use centroids::Centroids;
pub use error::{Result, RouterError};
pub use fleet::WorkerId;
pub use kernel::quant::Precision;
pub use model::{LocalityModel, Scores, Signal};
pub use router::{time_select, Member, Receipt, Router, DEFAULT_BREAKER_FAILURES};
pub use signature::{CountValue, SignatureSpec};
