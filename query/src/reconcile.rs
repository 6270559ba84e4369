//! Reconciliation: does every event the store holds count in the features?
//!
//! Read from the store, so it holds across restarts and nodes: the raw events the pipeline
//! stored (one per `event_id`), what the day `event_count` features add up to, and the dead
//! letters by stage and reason. Events accepted but not yet read by the pipeline are on the
//! bus; the caller adds that from the pipeline's status. Both backends answer the same
//! statements through the tenant-scoped SQL path, so isolation is the SQL path's.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::{QueryEngine, Result};

/// One tenant's (or one person's) tally.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Raw events stored (one per person and `event_id`, as the store keeps them).
    pub stored: u64,
    /// Events counted in the day `event_count` features.
    pub counted: u64,
}

/// Dead letters of one stage and reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetterCount {
    pub stage: String,
    pub reason_code: String,
    pub count: u64,
}

/// The reconciliation of one tenant.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reconciliation {
    #[serde(flatten)]
    pub total: Tally,
    pub dead_letters: Vec<DeadLetterCount>,
    /// Per person, when asked for (sorted by user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub people: Option<Vec<PersonTally>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PersonTally {
    pub user_id: String,
    #[serde(flatten)]
    pub tally: Tally,
}

const STORED: &str = "SELECT COUNT(*) AS n FROM events";
const COUNTED: &str = "SELECT SUM(value) AS n FROM features \
     WHERE feature = 'event_count' AND dimension = '' AND granularity = 'day'";
const STORED_BY_USER: &str = "SELECT user_id, COUNT(*) AS n FROM events GROUP BY user_id";
const COUNTED_BY_USER: &str = "SELECT user_id, SUM(value) AS n FROM features \
     WHERE feature = 'event_count' AND dimension = '' AND granularity = 'day' GROUP BY user_id";
const DEAD: &str = "SELECT stage, reason_code, COUNT(*) AS n FROM dead_letters \
     GROUP BY stage, reason_code ORDER BY stage, reason_code";

/// A count in an answer row; absent (a `SUM` over no rows is null, and nulls are left out
/// of rows) is 0.
fn number(row: &Map<String, Value>, name: &str) -> u64 {
    match row.get(name) {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0).round() as u64,
        // Some engines answer large integers as text.
        Some(Value::String(s)) => s.parse::<f64>().unwrap_or(0.0).round() as u64,
        _ => 0,
    }
}

fn text(row: &Map<String, Value>, name: &str) -> String {
    row.get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl QueryEngine {
    /// The reconciliation of `tenant`; per person too when `people`.
    pub async fn reconcile(&self, tenant: &str, people: bool) -> Result<Reconciliation> {
        let one = |rows: Vec<Map<String, Value>>| rows.first().map_or(0, |r| number(r, "n"));
        let total = Tally {
            stored: one(self.sql_all(tenant, STORED).await?),
            counted: one(self.sql_all(tenant, COUNTED).await?),
        };
        let mut by_user: std::collections::BTreeMap<String, Tally> = Default::default();
        if people {
            for row in self.sql_all(tenant, STORED_BY_USER).await? {
                by_user.entry(text(&row, "user_id")).or_default().stored = number(&row, "n");
            }
            for row in self.sql_all(tenant, COUNTED_BY_USER).await? {
                by_user.entry(text(&row, "user_id")).or_default().counted = number(&row, "n");
            }
        }
        let dead_letters = self
            .sql_all(tenant, DEAD)
            .await?
            .iter()
            .map(|row| DeadLetterCount {
                stage: text(row, "stage"),
                reason_code: text(row, "reason_code"),
                count: number(row, "n"),
            })
            .collect();
        Ok(Reconciliation {
            total,
            dead_letters,
            people: people.then(|| {
                by_user
                    .into_iter()
                    .map(|(user_id, tally)| PersonTally { user_id, tally })
                    .collect()
            }),
        })
    }

    /// Every row of a fixed statement; an answer cut by the row limit is an error rather
    /// than a silently short tally.
    async fn sql_all(&self, tenant: &str, sql: &str) -> Result<Vec<Map<String, Value>>> {
        let result = self.sql(tenant, sql).await?;
        if result.truncated {
            return Err(crate::QueryError::Invalid(format!(
                "more than {} people to reconcile one by one; ask for the tenant's totals only",
                result.row_count
            )));
        }
        Ok(result.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_infra::config::QueryConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_tenant_reconciles_to_zeros() {
        // A tenant with no rows yet: the sums are null, which must read as 0, not fail.
        let dir = tempfile::tempdir().unwrap();
        let engine = QueryEngine::new(dir.path(), QueryConfig::default());
        let r = engine.reconcile("acme", true).await.unwrap();
        assert_eq!(r.total, Tally::default());
        assert!(r.dead_letters.is_empty());
        assert_eq!(r.people, Some(Vec::new()));
    }
}
