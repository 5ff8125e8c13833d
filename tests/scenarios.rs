//! The engine acceptance scenarios of shared/scenarios.md, one test per scenario, named
//! after its number. Replica ids are random, so "A2" below means "the version A's put
//! returned", and "a fresh B version" means B's id with a tick above B's previous one.
//!
//! The scenarios live in `scenarios/body.rs`; here every session runs directly between
//! two replicas' folders. `hub_scenarios.rs` runs the same scenarios through a hub.

mod common;

/// How every `Net` of the scenarios runs its sessions.
const ROUTE: common::Route = common::Route::Direct;

include!("scenarios/body.rs");
