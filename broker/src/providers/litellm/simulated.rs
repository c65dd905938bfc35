//! An in-process stand-in for LiteLLM, for `botcreds serve --dev`: no network, keys that look
//! real and are NOT accepted by any LiteLLM proxy.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::distr::{Alphanumeric, SampleString};
use time::OffsetDateTime;

use super::{
    GenerateKey, GeneratedKey, KeyInfo, LitellmApi, LitellmError, LitellmStats, StatsCounters,
};
use crate::clock::SharedClock;
use crate::secret::{Secret, sha256_hex};

/// The base URL the simulated proxy reports; nothing listens there.
pub const SIMULATED_LITELLM_URL: &str = "http://litellm.simulated.invalid:4000";

/// A simulated LiteLLM proxy: remembers the keys it minted (by hash) until deleted.
pub struct SimulatedLitellm {
    clock: SharedClock,
    keys: Mutex<HashMap<String, Minted>>,
    stats: StatsCounters,
}

struct Minted {
    alias: String,
    expires: OffsetDateTime,
}

impl std::fmt::Debug for SimulatedLitellm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedLitellm").finish_non_exhaustive()
    }
}

impl SimulatedLitellm {
    pub fn new(clock: SharedClock) -> SimulatedLitellm {
        tracing::warn!(
            "LITELLM IS SIMULATED: virtual keys from this broker are fake and NOT accepted by any \
             LiteLLM proxy (development mode only; configure [litellm] for real keys)"
        );
        SimulatedLitellm {
            clock,
            keys: Mutex::new(HashMap::new()),
            stats: StatsCounters::default(),
        }
    }

    /// How many minted keys are neither deleted nor expired.
    pub fn live_keys(&self) -> usize {
        let now = self.clock.now();
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.values().filter(|k| k.expires > now).count()
    }
}

#[async_trait::async_trait]
impl LitellmApi for SimulatedLitellm {
    async fn generate(&self, request: &GenerateKey) -> Result<GeneratedKey, LitellmError> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.values().any(|k| k.alias == request.key_alias) {
            self.stats.call(false);
            return Err(LitellmError::Upstream {
                status: 400,
                message: format!(
                    "Key with alias '{}' already exists. Unique key aliases across all keys are \
                     required.",
                    request.key_alias
                ),
            });
        }
        // "sim" marks the key as simulated for anyone who finds it in a config file.
        let key = Secret::new(format!(
            "sk-sim-{}",
            Alphanumeric.sample_string(&mut rand::rng(), 22)
        ));
        let token_hash = sha256_hex(key.expose().as_bytes());
        let secs = i64::try_from(request.duration_secs).unwrap_or(i64::MAX / 2);
        let expires = self.clock.now() + time::Duration::seconds(secs);
        keys.insert(
            token_hash.clone(),
            Minted {
                alias: request.key_alias.clone(),
                expires,
            },
        );
        self.stats.call(true);
        self.stats.generated();
        Ok(GeneratedKey {
            key,
            token_hash,
            expires: Some(expires),
        })
    }

    async fn delete(&self, token_hash: &str) -> Result<bool, LitellmError> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let found = keys.remove(token_hash).is_some();
        self.stats.call(found);
        if found {
            self.stats.deleted();
        }
        Ok(found)
    }

    async fn info(&self, token_hash: &str) -> Result<Option<KeyInfo>, LitellmError> {
        let now = self.clock.now();
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        self.stats.call(true);
        Ok(keys.get(token_hash).map(|k| KeyInfo {
            status: if k.expires > now { "active" } else { "expired" }.to_string(),
            spend: 0.0,
            expires: Some(k.expires),
            key_alias: Some(k.alias.clone()),
        }))
    }

    fn base_url(&self) -> &str {
        SIMULATED_LITELLM_URL
    }

    fn stats(&self) -> LitellmStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::OffsetClock;

    #[tokio::test]
    async fn mints_deletes_and_refuses_duplicate_aliases() {
        let clock = OffsetClock::default();
        let sim = SimulatedLitellm::new(Arc::new(clock.clone()));
        let ask = GenerateKey {
            key_alias: "a".into(),
            duration_secs: 60,
            models: vec![],
            max_budget: 1.0,
            budget_duration: None,
            rpm_limit: 1,
            metadata: serde_json::json!({}),
        };
        let k = sim.generate(&ask).await.unwrap();
        assert!(k.key.expose().starts_with("sk-sim-"));
        assert_eq!(k.token_hash, sha256_hex(k.key.expose().as_bytes()));
        assert!(sim.generate(&ask).await.is_err());
        assert_eq!(
            sim.info(&k.token_hash).await.unwrap().unwrap().status,
            "active"
        );
        clock.advance(61);
        assert_eq!(sim.live_keys(), 0);
        assert!(sim.delete(&k.token_hash).await.unwrap());
        assert!(!sim.delete(&k.token_hash).await.unwrap());
        assert_eq!(sim.info(&k.token_hash).await.unwrap(), None);
    }
}
