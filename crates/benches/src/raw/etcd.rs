//! etcd: a put-if-absent transaction on a reused lease, and a conditional
//! delete.

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use lock_core::BoxError;

use crate::targets::RawLock;

/// The raw etcd baseline.
pub struct RawEtcd {
    client: Client,
    lease: i64,
}

impl RawEtcd {
    /// Connects to `endpoint` (`http://host:port`) and grants one lease.
    pub async fn connect(endpoint: &str) -> Result<Self, BoxError> {
        let mut client = Client::connect([endpoint], None).await?;
        let lease = client.lease_grant(600, None).await?.id();
        Ok(RawEtcd { client, lease })
    }

    async fn put_if_absent(&self, key: &str, token: &str) -> Result<bool, BoxError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                token,
                Some(PutOptions::new().with_lease(self.lease)),
            )]);
        Ok(self.client.clone().txn(txn).await?.succeeded())
    }
}

#[async_trait]
impl RawLock for RawEtcd {
    fn name(&self) -> String {
        "etcd-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let token = super::token();
        if !self.put_if_absent(key, &token).await? {
            return Err("busy".into());
        }
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, token)])
            .and_then([TxnOp::delete(key, None)]);
        if !self.client.clone().txn(txn).await?.succeeded() {
            return Err("release found another owner".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.put_if_absent(key, &super::token()).await.map(|_| ())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        if self.put_if_absent(key, &super::token()).await? {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}
