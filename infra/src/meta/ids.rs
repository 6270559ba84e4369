//! The idempotency index's one writer: claims client event ids in the metadata store
//! with group commit.
//!
//! Every request with client-given ids claims them before it is answered. Concurrent
//! requests claiming through separate connections would serialize on SQLite's write lock
//! and sleep in its busy handler (seconds at the tail under load), and each would pay its
//! own commit. Instead one task takes the claims of every request waiting (up to
//! [`MAX_GROUP_CLAIMS`]) and commits them in one transaction, in arrival order, so a later
//! request sees the ids an earlier one claimed. The queue is bounded: when it is full, a
//! request waits for room (backpressure), it is never dropped.
//!
//! The writer runs on its own thread, with its own single-threaded runtime and its own
//! connection: every acknowledgement waits on it, so it must not queue for an async
//! worker behind requests that are parsing large bodies.

use std::path::Path;

use super::{EventIdClaims, MetaError, MetaStore};
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the writer at most.
const QUEUE: usize = 256;
/// Claims one transaction takes at most (a request's claims are never split).
pub const MAX_GROUP_CLAIMS: usize = 50_000;

/// What a claim answers: per id, the digest it already names when that differs.
type Answer = Result<Vec<Option<i64>>, String>;

struct Pending {
    tenant: String,
    claims: Vec<(String, i64)>,
    now_ms: i64,
    answer: oneshot::Sender<Answer>,
}

/// A handle to the writer; cheap to clone. The writer stops when the last handle drops.
#[derive(Clone)]
pub struct IdIndex {
    requests: mpsc::Sender<Pending>,
}

impl IdIndex {
    /// Opens the metadata store of `url` on the writer's own thread and starts the
    /// writer there; answers once the store is open.
    pub async fn open(url: &str, data_dir: &Path) -> Result<Self, MetaError> {
        let (requests, rx) = mpsc::channel(QUEUE);
        let (opened, is_open) = oneshot::channel();
        let shown = super::redact_url(url);
        let failed = |reason: String| MetaError::Open {
            url: shown.clone(),
            reason,
        };
        let (url, data_dir) = (url.to_string(), data_dir.to_path_buf());
        std::thread::Builder::new()
            .name("event-id-index".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = opened.send(Err(format!(
                            "the idempotency index cannot start its runtime: {e}"
                        )));
                        return;
                    }
                };
                rt.block_on(async move {
                    match MetaStore::open_single(&url, &data_dir).await {
                        Ok(meta) => {
                            let _ = opened.send(Ok(()));
                            writer(meta, rx).await;
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e.to_string()));
                        }
                    }
                });
            })
            .map_err(|e| {
                failed(format!(
                    "the idempotency index cannot start its thread: {e}"
                ))
            })?;
        is_open
            .await
            .map_err(|_| failed("the idempotency index stopped while opening".into()))?
            .map_err(failed)?;
        Ok(IdIndex { requests })
    }

    /// Claims `claims` ((event id, digest), ids distinct) for `tenant`: per claim, the
    /// digest the id already names when that differs (refuse), `None` when it is new or
    /// names the same event. Durable when it answers. The error says why the index could
    /// not answer.
    pub async fn claim(
        &self,
        tenant: &str,
        claims: Vec<(String, i64)>,
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>, String> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            tenant: tenant.to_string(),
            claims,
            now_ms,
            answer,
        };
        self.requests
            .send(pending)
            .await
            .map_err(|_| "the index writer has stopped".to_string())?;
        answered
            .await
            .map_err(|_| "the index writer stopped before answering".to_string())?
    }
}

async fn writer(meta: MetaStore, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut claims = first.claims.len();
        let mut group = vec![first];
        while claims < MAX_GROUP_CLAIMS {
            match rx.try_recv() {
                Ok(next) => {
                    claims += next.claims.len();
                    group.push(next);
                }
                Err(_) => break,
            }
        }
        let sets: Vec<EventIdClaims<'_>> = group
            .iter()
            .map(|p| EventIdClaims {
                tenant: &p.tenant,
                claims: &p.claims,
                now_ms: p.now_ms,
            })
            .collect();
        match meta.claim_event_id_sets(&sets).await {
            Ok(answers) => {
                for (pending, answer) in group.into_iter().zip(answers) {
                    // A request that gave up waiting has nobody to answer.
                    let _ = pending.answer.send(Ok(answer));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = group.len(), "could not claim event ids");
                let reason = e.to_string();
                for pending in group {
                    let _ = pending.answer.send(Err(reason.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent requests through one writer: each id goes to the first request that
    /// claims it, whatever the grouping; the others see that request's digest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_of_one_id_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let index = IdIndex::open("sqlite://", dir.path()).await.unwrap();
        // 32 requests claim the same 100 ids, each with its own digest (request number).
        let tasks: Vec<_> = (0..32i64)
            .map(|r| {
                let index = index.clone();
                tokio::spawn(async move {
                    let claims = (0..100).map(|i| (format!("id{i}"), r)).collect();
                    (r, index.claim("acme", claims, 1_000).await.unwrap())
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut named = std::collections::HashSet::new();
        for t in tasks {
            let (r, answers) = t.await.unwrap();
            if answers.iter().all(Option::is_none) {
                winners.push(r);
            } else {
                // Refused for every id, always naming one and the same other digest.
                assert!(answers.iter().all(|a| a.is_some() && *a == answers[0]));
                named.insert(answers[0].unwrap());
            }
        }
        assert_eq!(winners.len(), 1, "exactly one request wins: {winners:?}");
        assert_eq!(named.into_iter().collect::<Vec<_>>(), winners);
        // A retry of the winner's ids is no refusal.
        let retry = (0..100).map(|i| (format!("id{i}"), winners[0])).collect();
        let again = index.claim("acme", retry, 2_000).await.unwrap();
        assert!(again.iter().all(Option::is_none));
    }
}
