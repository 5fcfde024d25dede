//! pullgate: Sigstore `ClusterImagePolicy` enforcement at the node.
//!
//! The crate is one decision engine with several front doors. Policy matching and
//! evaluation ([`policy`]) are pure functions over an in-memory [`policy::Snapshot`];
//! registry access ([`registry`]) and signature checking ([`verify`]) sit at the edge.
#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod cli;
pub mod cri;
pub mod engine;
pub mod health;
pub mod image_ref;
pub mod kube;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod verify;
