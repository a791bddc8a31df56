//! # lock-redis: distlock on Redis
//!
//! (Crate docs are written below, after the code settles.)

#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod config;
mod node;
mod pubsub;
pub mod scripts;

pub use backend::RedisBackend;
pub use config::{DEFAULT_PREFIX, Mode, NodeAddr, RedisConfig};

/// The backend name used in errors.
pub(crate) const BACKEND: &str = "redis";
