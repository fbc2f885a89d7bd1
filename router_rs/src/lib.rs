//! ELDR decode routing core: request signatures, unit centroids, the locality-band policy and
//! load-only baselines, behind one stateful [`Router`]. No Python here; see `router_rs/python`.
pub mod centroids;
pub mod error;
pub mod policy;
pub mod router;
pub mod signature;

pub use centroids::Centroids;
pub use error::{Result, RouterError};
pub use router::{time_select, LocalityModel, Receipt, Router, Signal};
pub use signature::{CountValue, SignatureSpec};
