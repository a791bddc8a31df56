//! Each store's raw baseline: the minimal correct lock protocol with the
//! same client crate as the backend, and no framework around it.

pub mod consul;
pub mod etcd;
pub mod postgres;
pub mod redis;

/// A random owner value, as the real protocol needs one.
pub(crate) fn token() -> String {
    format!("{:032x}", rand::random::<u128>())
}
