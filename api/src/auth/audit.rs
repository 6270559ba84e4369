//! The audit writer: audit records leave the request path and are written in batches.
//!
//! What it owns and guarantees:
//! - **Off the request path.** A request hands its record to a bounded queue and goes on;
//!   one task writes what has queued in one transaction (up to [`BATCH`] records), so a
//!   burst of audited reads costs one write, not one metadata round trip each.
//! - **Durable before it is read.** Reading the audit log first asks the writer to flush:
//!   the flush is queued behind every record sent before it and answers once they are
//!   written, so a caller sees every request that completed before its read.
//! - **Bounded, never dropped.** When the queue is full a request waits for room (the
//!   queue holds [`QUEUE`] records); a failed write is retried once and then logged and
//!   counted (`digame_audit_failures_total`), never hidden.
//! - A crash loses at most the records still queued (less than a batch interval's worth:
//!   the writer writes as soon as records arrive, batching only what queued meanwhile).

use digame_infra::meta::MetaStore;
use digame_infra::meta::identity::AuditRecord;
use tokio::sync::{mpsc, oneshot};

/// Records written in one transaction at most.
pub const BATCH: usize = 512;
/// Records queued at most.
pub const QUEUE: usize = 8192;

enum Msg {
    Record(Box<AuditRecord>),
    Flush(oneshot::Sender<()>),
}

/// Where requests send their audit records (cheap to clone).
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
}

impl AuditLog {
    /// Starts the writer over `meta`; it ends when every [`AuditLog`] is dropped, after
    /// writing what was queued.
    pub fn start(meta: MetaStore) -> (AuditLog, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (AuditLog { tx }, tokio::spawn(write(meta, rx)))
    }

    /// Queues a record (waiting for room when the queue is full).
    pub async fn record(&self, record: AuditRecord) {
        if let Err(mpsc::error::SendError(Msg::Record(r))) =
            self.tx.send(Msg::Record(Box::new(record))).await
        {
            digame_infra::telemetry::metrics().audit_failures.inc();
            tracing::error!(action = %r.action, actor = %r.actor, "the audit writer has stopped; a record was not written");
        }
    }

    /// Returns once every record queued before this call is written.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

async fn write(meta: MetaStore, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Take what queued meanwhile, up to a batch.
        while let Some(msg) = next {
            match msg {
                Msg::Record(r) => batch.push(*r),
                Msg::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() {
            let mut result = meta.append_audits(&batch).await;
            if result.is_err() {
                result = meta.append_audits(&batch).await;
            }
            if let Err(e) = result {
                let m = digame_infra::telemetry::metrics();
                m.audit_failures.inc_by(batch.len() as u64);
                tracing::error!(error = %e, records = batch.len(), "could not write audit records");
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
