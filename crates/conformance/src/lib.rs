//! # conformance: one suite, every backend, real servers
//!
//! Every distlock backend must behave like the in-memory reference backend.
//! This crate states that behaviour as test cases: each case is a documented
//! `pub async fn` in [`cases`] that takes a [`Factory`] (a way to open new,
//! independent clients of one store) and panics when the backend breaks the
//! contract. [`suite!`] turns the whole list into one `#[tokio::test]` per
//! case, so each case has its own name and can be run alone:
//!
//! ```text
//! cargo test -p lock-redis fencing
//! ```
//!
//! ## Running it against a backend
//!
//! ```
//! use std::sync::Arc;
//! use conformance::Factory;
//! use lock_core::{Backend, memory::MemoryBackend};
//!
//! struct Memory(MemoryBackend);
//!
//! #[lock_core::async_trait]
//! impl Factory for Memory {
//!     async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
//!         Ok(Arc::new(self.0.clone()))     // a new client of the same store
//!     }
//! }
//!
//! async fn factory() -> Memory {
//!     Memory(MemoryBackend::new())
//! }
//!
//! conformance::suite!(factory);
//! # fn main() {}
//! ```
//!
//! ## Gating
//!
//! Cases read the backend's [`Capabilities`](lock_core::Capabilities), never
//! its name. A case that needs something the backend lacks (fair mode, a
//! fault the harness cannot inject) prints `SKIPPED <case>: <reason>` with
//! the reason from the capabilities and passes; everything else runs. A
//! factory that cannot reach its server fails every case: a missing server
//! is never a silent skip.
//!
//! ## Faults
//!
//! [`Factory::faults`] hands the suite control over the server (restart,
//! pause, resume, cut connections). Backends whose harness provides it run
//! the fault cases; others are gated with a reason.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::sync::Arc;

use lock_core::{Backend, Result};

pub mod cases;
mod support;

pub use support::{FencedRegister, Section};

/// Opens clients of the store under test.
#[lock_core::async_trait]
pub trait Factory: Send + Sync + 'static {
    /// A new client of the same store, with its own connections or session,
    /// as a second process would have.
    async fn backend(&self) -> Result<Arc<dyn Backend>>;

    /// Control over the server under test, if the harness provides it.
    fn faults(&self) -> Option<Arc<dyn Faults>> {
        None
    }
}

/// Control over the server under test, for the fault cases.
///
/// Each method returns once the fault is in place (for `restart` and
/// `resume`: once the server answers again).
#[lock_core::async_trait]
pub trait Faults: Send + Sync {
    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// data folder.
    async fn restart(&self) -> std::result::Result<(), String>;
    /// Freezes the server (SIGSTOP): it accepts nothing and answers nothing.
    async fn pause(&self) -> std::result::Result<(), String>;
    /// Thaws a paused server (SIGCONT).
    async fn resume(&self) -> std::result::Result<(), String>;
    /// Cuts every open client connection (the server keeps running).
    async fn cut_connections(&self) -> std::result::Result<(), String>;
}

/// Generates one `#[tokio::test]` per conformance case.
///
/// `$factory` is the path of an `async fn() -> impl Factory`; it is called
/// once per case. Pass `skip = [case, ...]` only for cases the backend
/// cannot pass *by design*, and say why next to the call.
#[macro_export]
macro_rules! suite {
    ($factory:path) => {
        $crate::__suite_cases!($factory;
            acquire_release_reacquire,
            try_lock_on_held_key_returns_none,
            second_client_is_excluded,
            waiter_wakes_promptly_on_release,
            wait_forever_waits_until_release,
            wait_timeout_returns_timeout_error,
            wait_timeout_leaves_nothing_behind,
            abandoned_lock_expires,
            waiter_acquires_after_holder_expires,
            extend_keeps_the_lock,
            auto_renew_keeps_the_lock,
            release_by_non_owner_changes_nothing,
            extend_by_non_owner_changes_nothing,
            double_release_reports_not_held,
            release_after_expiry_reports_lost,
            extend_after_loss_is_lock_lost,
            fencing_increases_across_holders,
            fencing_increases_across_expiry,
            fencing_increases_per_key_across_many_keys,
            guard_drop_releases,
            cancelled_acquire_leaks_nothing,
            cancelled_fair_acquire_leaks_nothing,
            cancel_racing_grant_releases_it,
            lost_fires_before_expiry_without_renewal,
            lost_fires_when_lock_is_taken_away,
            max_hold_stops_renewal,
            fifo_order_in_fair_mode,
            fair_mode_is_supported_or_typed_error,
            keys_are_independent,
            every_valid_key_round_trips,
            invalid_keys_are_rejected,
            ttl_outside_limits_is_rejected,
            inspect_reports_the_holder,
            valid_until_is_within_the_ttl,
            many_waiters_each_get_the_lock,
            concurrent_critical_sections_never_overlap,
            recovers_after_server_restart,
            lease_survives_restart_or_loss_is_reported,
            pause_longer_than_ttl_reports_loss,
            recovers_after_connections_are_cut,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_cases {
    ($factory:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let factory = $factory().await;
                $crate::cases::$case(&factory).await;
            }
        )*
    };
}
