//! Consul: `PUT /v1/kv/<key>?acquire=<session>` and `?release=<session>`
//! with a reused session, sent with reqwest (the HTTP client under consulrs,
//! which the backend also sends with).

use async_trait::async_trait;
use lock_core::BoxError;

use crate::targets::RawLock;

/// The raw Consul baseline.
pub struct RawConsul {
    http: reqwest::Client,
    base: String,
    /// Used by `cycle` and `hold`.
    session: String,
    /// A second session for `try_held`: Consul grants a key again to the
    /// session that holds it, so a real "no" needs another session.
    other: String,
}

async fn create_session(http: &reqwest::Client, base: &str) -> Result<String, BoxError> {
    let body = r#"{"TTL": "600s", "LockDelay": "0s", "Behavior": "release"}"#;
    let resp: serde_json::Value = http
        .put(format!("{base}/v1/session/create"))
        .body(body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(resp
        .get("ID")
        .and_then(|v| v.as_str())
        .ok_or("no session ID")?
        .to_owned())
}

impl RawConsul {
    /// Connects to `base` (`http://host:port`) and creates the sessions.
    pub async fn connect(base: &str) -> Result<Self, BoxError> {
        let http = reqwest::Client::new();
        let session = create_session(&http, base).await?;
        let other = create_session(&http, base).await?;
        Ok(RawConsul {
            http,
            base: base.to_owned(),
            session,
            other,
        })
    }

    async fn put(&self, key: &str, op: &str, session: &str, token: &str) -> Result<bool, BoxError> {
        let body = self
            .http
            .put(format!("{}/v1/kv/{key}?{op}={session}", self.base))
            .body(token.to_owned())
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(body.trim() == "true")
    }
}

#[async_trait]
impl RawLock for RawConsul {
    fn name(&self) -> String {
        "consul-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let token = super::token();
        if !self.put(key, "acquire", &self.session, &token).await? {
            return Err("busy".into());
        }
        if !self.put(key, "release", &self.session, &token).await? {
            return Err("release refused".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.put(key, "acquire", &self.session, &super::token())
            .await
            .map(|_| ())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        if self
            .put(key, "acquire", &self.other, &super::token())
            .await?
        {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}
