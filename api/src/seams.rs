//! The metadata store behind the ports the pipeline and ingest define
//! ([`SettingsSource`], [`EventIds`]), so neither of them depends on the store's crate
//! (and its SQL drivers); this binary is where the two meet.

use async_trait::async_trait;
use digame_infra::meta::{IdIndex, MetaStore};
use digame_ingest::EventIds;
use digame_pipelines::runtime::SettingsSource;
use digame_schemas::profile::Changes;

/// Tenant settings and person profiles as the metadata store has them.
pub struct StoredSettings(pub MetaStore);

#[async_trait]
impl SettingsSource for StoredSettings {
    async fn changes_since(&self, revision: i64) -> Result<Changes, String> {
        self.0
            .changes_since(revision)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Client event ids claimed in the metadata store's idempotency index.
pub struct StoredEventIds(pub IdIndex);

#[async_trait]
impl EventIds for StoredEventIds {
    async fn claim(
        &self,
        tenant: &str,
        claims: Vec<(String, i64)>,
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>, String> {
        self.0.claim(tenant, claims, now_ms).await
    }
}
