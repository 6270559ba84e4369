//! Metrics and logs.
//!
//! Every metric lives in one registry owned by [`Metrics`], reachable through
//! [`metrics()`]; names follow `digame_<area>_<noun>_<unit|total>`. Logs go through
//! `tracing`, as text or JSON lines depending on configuration.

use std::sync::LazyLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All of Digame's Prometheus metrics.
pub struct Metrics {
    pub registry: Registry,
    pub ingest_requests: IntCounterVec,
    pub ingest_events: IntCounterVec,
    /// Reconciliation per tenant: accepted and rejected at ingest, counted (in order or
    /// late), duplicate and undecodable in the pipeline.
    pub tenant_events: IntCounterVec,
    pub ingest_request_seconds: Histogram,
    pub ingest_body_bytes: IntCounter,
    pub bus_appended_records: IntCounterVec,
    pub bus_appended_bytes: IntCounterVec,
    pub bus_fsync_seconds: Histogram,
    pub bus_segments_deleted: IntCounterVec,
    pub bus_quarantined_bytes: IntCounterVec,
    pub bus_lost_records: IntCounterVec,
    pub pipeline_events: IntCounterVec,
    pub pipeline_lag_records: IntGaugeVec,
    /// Per partition of the events stream: records acknowledged and not yet processed.
    pub pipeline_partition_behind: IntGaugeVec,
    /// Per partition: seconds since it last made progress while records waited (0 while
    /// caught up); past `pipeline.stall_after_secs` the partition is stalled.
    pub pipeline_partition_waiting: IntGaugeVec,
    /// Checkpoints that failed their checksum or did not decode, moved aside.
    pub pipeline_checkpoints_quarantined: IntCounterVec,
    pub pipeline_rows_emitted: IntCounter,
    pub pipeline_checkpoint_seconds: Histogram,
    pub pipeline_reopen_seconds: Histogram,
    pub pipeline_open_users: IntGauge,
    pub store_rows_written: IntCounterVec,
    pub store_files_written: IntCounterVec,
    pub store_compactions: IntCounterVec,
    pub store_quarantined_files: IntCounterVec,
    pub store_insert_bisections: IntCounterVec,
    pub query_requests: IntCounterVec,
    pub query_seconds: HistogramVec,
    /// Person reads by how the read cache answered: `hit` (a rendered answer), `render`
    /// (cached values, rendered now), `fill` (read from the store into the cache),
    /// `store` (a range the cache does not cover).
    pub read_cache: IntCounterVec,
    /// Values held by the person-read cache.
    pub read_cache_cells: IntGauge,
    /// Audit records that could not be written (should stay 0; alert on it).
    pub audit_failures: IntCounter,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let ingest_body_bytes = IntCounter::new(
            "digame_ingest_body_bytes_total",
            "Bytes of request bodies received by ingest, before decompression",
        )
        .expect("valid metric");
        r.register(Box::new(ingest_body_bytes.clone()))
            .expect("unique metric");
        let pipeline_lag_records = IntGaugeVec::new(
            Opts::new(
                "digame_pipeline_lag_records",
                "Records on the bus not yet processed by the pipeline",
            ),
            &["topic"],
        )
        .expect("valid metric");
        r.register(Box::new(pipeline_lag_records.clone()))
            .expect("unique metric");
        let pipeline_rows_emitted = IntCounter::new(
            "digame_pipeline_rows_emitted_total",
            "Feature rows emitted by the pipeline (each revision counts)",
        )
        .expect("valid metric");
        r.register(Box::new(pipeline_rows_emitted.clone()))
            .expect("unique metric");
        let pipeline_open_users = IntGauge::new(
            "digame_pipeline_open_users",
            "People with open windows held in pipeline state",
        )
        .expect("valid metric");
        r.register(Box::new(pipeline_open_users.clone()))
            .expect("unique metric");
        let read_cache_cells = IntGauge::new(
            "digame_read_cache_cells",
            "Feature values held by the person-read cache",
        )
        .expect("valid metric");
        r.register(Box::new(read_cache_cells.clone()))
            .expect("unique metric");
        let query_seconds = HistogramVec::new(
            HistogramOpts::new("digame_query_duration_seconds", "Query latency by endpoint")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )
        .expect("valid metric");
        r.register(Box::new(query_seconds.clone()))
            .expect("unique metric");
        Metrics {
            ingest_requests: counter_vec(
                &r,
                "digame_ingest_requests_total",
                "Ingest requests by HTTP status",
                &["status"],
            ),
            ingest_events: counter_vec(
                &r,
                "digame_ingest_events_total",
                "Events received by ingest, by result (accepted, rejected)",
                &["result"],
            ),
            tenant_events: counter_vec(
                &r,
                "digame_tenant_events_total",
                "Events per tenant by outcome: accepted or rejected by ingest; counted, duplicate or undecodable in the pipeline. accepted - counted - duplicate is what the pipeline has yet to count",
                &["tenant", "outcome"],
            ),
            ingest_request_seconds: histogram(
                &r,
                "digame_ingest_request_duration_seconds",
                "Time from request start to durable acknowledgement",
                LATENCY_BUCKETS.to_vec(),
            ),
            ingest_body_bytes,
            bus_appended_records: counter_vec(
                &r,
                "digame_bus_appended_records_total",
                "Records appended to the bus",
                &["topic"],
            ),
            bus_appended_bytes: counter_vec(
                &r,
                "digame_bus_appended_bytes_total",
                "Bytes appended to the bus, framing included",
                &["topic"],
            ),
            bus_fsync_seconds: histogram(
                &r,
                "digame_bus_fsync_duration_seconds",
                "Duration of one group commit (write and fsync)",
                LATENCY_BUCKETS.to_vec(),
            ),
            bus_segments_deleted: counter_vec(
                &r,
                "digame_bus_segments_deleted_total",
                "Log segments removed by retention",
                &["topic"],
            ),
            bus_quarantined_bytes: counter_vec(
                &r,
                "digame_bus_quarantined_bytes_total",
                "Damaged bytes of the embedded log moved aside (records after them are kept)",
                &["topic", "partition"],
            ),
            bus_lost_records: counter_vec(
                &r,
                "digame_bus_lost_records_total",
                "Records of the embedded log lost to damage, by whether a consumer group had processed them before (fate: processed, unprocessed)",
                &["topic", "partition", "fate"],
            ),
            pipeline_events: counter_vec(
                &r,
                "digame_pipeline_events_total",
                "Events seen by the pipeline by result (processed: counted in order; late: counted, revising windows that may be final; duplicate; undecodable)",
                &["result"],
            ),
            pipeline_lag_records,
            pipeline_partition_behind: gauge_vec(
                &r,
                "digame_pipeline_partition_behind_records",
                "Records of an events partition acknowledged and not yet processed",
                &["partition"],
            ),
            pipeline_partition_waiting: gauge_vec(
                &r,
                "digame_pipeline_partition_waiting_seconds",
                "Seconds an events partition has had records waiting without progress (0 while caught up)",
                &["partition"],
            ),
            pipeline_checkpoints_quarantined: counter_vec(
                &r,
                "digame_pipeline_checkpoints_quarantined_total",
                "Pipeline checkpoints that failed their checksum or did not decode, moved aside (the partition is rebuilt from the bus)",
                &["partition"],
            ),
            pipeline_rows_emitted,
            pipeline_checkpoint_seconds: histogram(
                &r,
                "digame_pipeline_checkpoint_duration_seconds",
                "Time to flush outputs and write one checkpoint",
                LATENCY_BUCKETS.to_vec(),
            ),
            pipeline_reopen_seconds: histogram(
                &r,
                "digame_pipeline_reopen_duration_seconds",
                "Time to read one person's stored events and rebuild their reopened days",
                LATENCY_BUCKETS.to_vec(),
            ),
            pipeline_open_users,
            audit_failures: {
                let c = IntCounter::new(
                    "digame_audit_write_failures_total",
                    "Audit records that could not be written",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            store_rows_written: counter_vec(
                &r,
                "digame_store_rows_written_total",
                "Rows written to the store by table",
                &["table"],
            ),
            store_files_written: counter_vec(
                &r,
                "digame_store_files_written_total",
                "Parquet files written by table",
                &["table"],
            ),
            store_compactions: counter_vec(
                &r,
                "digame_store_compactions_total",
                "Partitions compacted by table",
                &["table"],
            ),
            store_quarantined_files: counter_vec(
                &r,
                "digame_store_quarantined_files_total",
                "Damaged Parquet files moved out of the store's tables, by table",
                &["table"],
            ),
            store_insert_bisections: counter_vec(
                &r,
                "digame_store_insert_bisections_total",
                "ClickHouse batches split in two to isolate rows the server refused, by table",
                &["table"],
            ),
            query_requests: counter_vec(
                &r,
                "digame_query_requests_total",
                "Query requests by endpoint and outcome",
                &["endpoint", "outcome"],
            ),
            query_seconds,
            read_cache: counter_vec(
                &r,
                "digame_read_cache_total",
                "Person reads by how the read cache answered (hit, render, fill, store)",
                &["outcome"],
            ),
            read_cache_cells,
            registry: r,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default level.
pub fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_by_convention() {
        let m = metrics();
        m.ingest_events.with_label_values(&["accepted"]).inc();
        let text = m.render();
        assert!(text.contains("digame_ingest_events_total{result=\"accepted\"}"));
        for family in m.registry.gather() {
            assert!(family.name().starts_with("digame_"), "{}", family.name());
        }
    }
}
