//! Every engine scenario of `scenarios.rs` (shared/scenarios.md), run once more with
//! each of its sessions going through a real hub on loopback: for a session, the `Net`
//! closes one of the two replicas, starts a `RunningHub` hosting its folder (under the
//! Net's manual clock), syncs the other replica with it through a `RemoteReplica`, shuts
//! the hub down and reopens the folder. The scenarios and their assertions are the same
//! text (`scenarios/body.rs`); only the route differs.
//!
//! Which side the hub hosts (see `Net::session`): the destination, so the hub applies
//! the uploads; the source instead
//! - when the session's conflict policy is application-defined: it runs in this
//!   process, so the conflicts are settled at a local destination (s09, s10, s11);
//! - when the session relays a third replica's versions, which a hub refuses to learn
//!   from a client bound to its own replica id (docs/protocol.md): C → B in s16, s17
//!   and s18, C → A in s18, A → B in s22;
//! - when the destination was built on an injected item store, which only this process
//!   can hold (s12; s15 until B is reopened).
//!
//! No scenario stays local. The two that drive internals a hub cannot host (s12's
//! failing item store, s15's destination killed while it stages a batch) keep that
//! replica here and reach its peer, the source, through the hub.

mod common;

/// How every `Net` of the scenarios runs its sessions.
const ROUTE: common::Route = common::Route::ThroughHub;

include!("scenarios/body.rs");
