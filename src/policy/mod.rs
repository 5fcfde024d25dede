//! ClusterImagePolicy model: types, loading, validation, glob matching and evaluation.

pub mod eval;
pub mod glob;
pub mod load;
pub mod matching;
pub mod object;
pub mod rego;
pub mod remote;
pub mod snapshot;
pub mod source;
pub mod tuf_source;
pub mod types;
pub mod validate;

pub use snapshot::Snapshot;
