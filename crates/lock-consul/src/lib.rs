//! # lock-consul: distlock over Consul
//!
//! (docs are written below)

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod api;
mod backend;
mod config;

pub use backend::ConsulBackend;
pub use config::{
    ConsulConfig, ConsulConfigBuilder, DEFAULT_LOCK_DELAY, DEFAULT_PORT,
    DEFAULT_PREFIX, DEFAULT_SESSION_TTL, DEFAULT_SESSION_TTL_MIN, MAX_LOCK_DELAY, MAX_SESSION_TTL, SessionBehavior,
};

/// The backend's name in errors, traces and capabilities.
pub const BACKEND: &str = "consul";
