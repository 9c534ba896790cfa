//! Rigs shared by the fuzz targets: each drives a product crate the way a
//! hostile guest, frontend or migration stream would, and checks the
//! invariants the target states (with `assert!`, so a broken invariant is a
//! crash libFuzzer records).

pub mod net;
pub mod state;
