//! Signature checks: pure functions over signatures already fetched from the registry.

pub mod attest;
pub mod bundle;
pub mod cache;
pub mod cosign;
pub mod keyless;
pub mod keys;
pub mod rekor;
pub mod trust_root;
pub mod tsa;
pub mod tuf;
pub mod x509;
