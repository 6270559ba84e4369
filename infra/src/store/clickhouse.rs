//! The store on ClickHouse, through the official `clickhouse` crate over HTTP.
//!
//! Owns the schema migrations and the sink. Tables come from
//! [`digame_schemas::clickhouse::tables`]; a migration's statements are generated from them
//! and checksummed, so a record type that changes after its migration was applied is
//! caught (`migrate` refuses, naming the migration) instead of drifting silently.
//!
//! Sink guarantees: `write` returns `Ok` only when every row is in ClickHouse (or, for a
//! row ClickHouse rejects, in `dead_letters` with the reason). Rows go as RowBinary
//! INSERTs, split into batches bounded by rows and bytes, a few in flight at once.
//! Transient failures (network, timeouts, overload, a restarting server) are retried with
//! exponential backoff; when the attempts run out the write fails and the caller retries it
//! later without advancing its offsets. A batch ClickHouse refuses for its data is bisected
//! until the offending rows are found: they go to `dead_letters`, their batch-mates land.
//! Replays are harmless: the tables replace rows with equal keys.
//!
//! Works with ClickHouse 18.16 and current releases: no features newer than 18.16, and the
//! client's schema validation (which needs a newer server) is off; a unit test checks the
//! row types against the derived schema instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use clickhouse::{Client, Row};
use digame_schemas::clickhouse::{ClusterSpec, Engine, TableSpec, tables};
use digame_schemas::{ActivityEvent, DeadLetter, EventTime, FeatureRow};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::{
    Deletion, DeletionReport, Result, StoreBatch, StoreError, StoreSink, StoreStatus, Table,
};
use crate::config::ClickHouseConfig;
use crate::telemetry::metrics;

/// Where and how to reach ClickHouse.
#[derive(Clone, Debug)]
pub struct ClickHouseSettings {
    /// `http://host:port`.
    pub url: String,
    pub database: String,
    pub config: ClickHouseConfig,
}

fn query_err(e: clickhouse::error::Error) -> StoreError {
    StoreError::Query(format!("clickhouse: {e}"))
}

impl ClickHouseSettings {
    /// A client for this server and database.
    pub fn client(&self) -> Client {
        let mut c = Client::default()
            .with_url(&self.url)
            .with_user(&self.config.user)
            .with_database(&self.database)
            // 18.16 lacks the setting the crate's schema validation uses.
            .with_validation(false);
        if !self.config.password.is_empty() {
            c = c.with_password(&self.config.password);
        }
        c
    }

    /// A client without a database (to create it).
    fn server_client(&self) -> Client {
        let mut c = Client::default()
            .with_url(&self.url)
            .with_user(&self.config.user)
            .with_validation(false);
        if !self.config.password.is_empty() {
            c = c.with_password(&self.config.password);
        }
        c
    }

    fn cluster(&self) -> Option<ClusterSpec> {
        self.config
            .cluster
            .as_ref()
            .map(|name| ClusterSpec { name: name.clone() })
    }
}

// ---------------------------------------------------------------------------------------
// Migrations

/// One forward-only schema change.
#[derive(Clone, Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: Vec<String>,
}

impl Migration {
    /// SHA-256 of the statements, hex.
    pub fn checksum(&self) -> String {
        let mut h = Sha256::new();
        for s in &self.statements {
            h.update(s.as_bytes());
            h.update(b"\n;\n");
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }
}

/// The migrations of this build, in order.
pub fn migrations(database: &str, cluster: Option<&ClusterSpec>) -> Vec<Migration> {
    // Each migration is derived from the tables as they stood at its version, so adding a
    // field to a record never edits an applied migration.
    let specs: Vec<TableSpec> = tables().iter().map(|t| t.as_of(1)).collect();
    let mut create = Vec::new();
    for spec in &specs {
        create.push(spec.create_sql(database, cluster));
        if let Some(c) = cluster {
            create.push(spec.distributed_sql(database, c));
        }
    }
    vec![
        Migration {
            version: 1,
            name: "tables",
            statements: create,
        },
        Migration {
            version: 2,
            name: "events_hourly rollup",
            statements: vec![events_hourly_sql(database, cluster)],
        },
        Migration {
            version: 3,
            name: "latest views for SQL",
            statements: Table::ALL
                .into_iter()
                .map(|t| latest_view_sql(database, t, cluster, 3))
                .collect(),
        },
        Migration {
            version: 4,
            name: "features.params_version",
            statements: add_column_statements(database, cluster, "features", "params_version", 4),
        },
        Migration {
            version: 5,
            name: "features.final_revision",
            statements: add_column_statements(database, cluster, "features", "final_revision", 5),
        },
    ]
}

/// Adds a column of [`digame_schemas::clickhouse::ADDED_COLUMNS`] and rebuilds the table's
/// latest view to include it.
fn add_column_statements(
    database: &str,
    cluster: Option<&ClusterSpec>,
    table: &str,
    column: &str,
    version: u32,
) -> Vec<String> {
    let spec = spec(table).expect("a known table").as_of(version);
    let mut out = spec.add_column_sql(database, column, cluster);
    if let Some(t) = Table::ALL.into_iter().find(|t| t.name() == table) {
        let on_cluster = cluster
            .map(|c| format!(" ON CLUSTER `{}`", c.name))
            .unwrap_or_default();
        out.push(format!(
            "DROP TABLE IF EXISTS `{database}`.`{}`{on_cluster}",
            latest_view(t)
        ));
        out.push(latest_view_sql(database, t, cluster, version));
    }
    out
}

/// Name of the view that reads `table` as SQL sees it: the latest row per key.
pub fn latest_view(table: Table) -> String {
    format!("{}_latest", table.name())
}

/// The view `POST /v1/sql` reads instead of `table`: the record's columns (timestamps at
/// second precision), the `date` column the embedded store derives from its path, one row
/// per key (`FINAL`).
fn latest_view_sql(
    database: &str,
    table: Table,
    cluster: Option<&ClusterSpec>,
    version: u32,
) -> String {
    let spec = spec(table.name())
        .expect("every store table has a ClickHouse spec")
        .as_of(version);
    let on_cluster = cluster
        .map(|c| format!(" ON CLUSTER `{}`", c.name))
        .unwrap_or_default();
    let columns: Vec<String> = spec
        .layout
        .columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .collect();
    let fin = match spec.engine {
        Engine::MergeTree => "",
        Engine::Replacing { .. } => " FINAL",
    };
    format!(
        "CREATE VIEW IF NOT EXISTS `{database}`.`{view}`{on_cluster} AS SELECT {}, \
         toString(toDate(`{}`)) AS `date` FROM `{database}`.`{}`{fin}",
        columns.join(", "),
        table.time_column(),
        table.name(),
        view = latest_view(table),
    )
}

/// Events per tenant, hour, kind and source, for dashboards. A materialized view keeps
/// distinct-event states (`uniqExactState(event_id)`), so a replayed event inserted twice
/// still counts once; read with `uniqExactMerge(events)`.
fn events_hourly_sql(database: &str, cluster: Option<&ClusterSpec>) -> String {
    let on_cluster = cluster
        .map(|c| format!(" ON CLUSTER `{}`", c.name))
        .unwrap_or_default();
    let (engine, source) = match cluster {
        None => ("AggregatingMergeTree()".to_string(), "events".to_string()),
        Some(_) => (
            format!(
                "ReplicatedAggregatingMergeTree('/clickhouse/tables/{{shard}}/{database}/events_hourly', '{{replica}}')"
            ),
            "events_local".to_string(),
        ),
    };
    format!(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS `{database}`.`events_hourly`{on_cluster}\n\
         ENGINE = {engine}\n\
         PARTITION BY toYYYYMM(`hour`)\n\
         ORDER BY (`tenant_id`, `hour`, `kind`, `source`)\n\
         POPULATE AS SELECT `tenant_id`, toStartOfHour(`timestamp`) AS `hour`, `kind`, `source`,\n\
         uniqExactState(`event_id`) AS `events`, uniqExactState(`user_id`) AS `people`\n\
         FROM `{database}`.`{source}` GROUP BY `tenant_id`, `hour`, `kind`, `source`"
    )
}

#[derive(Row, Serialize, Deserialize)]
struct AppliedMigration {
    version: u32,
    name: String,
    checksum: String,
    applied_at: u32,
}

/// What `migrate` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MigrationReport {
    /// Versions applied now.
    pub applied: Vec<u32>,
    /// Versions already applied before.
    pub unchanged: Vec<u32>,
}

/// Creates the database and applies pending migrations. Re-running is a no-op. Refuses
/// when an applied migration's checksum differs from this build's.
pub async fn migrate(settings: &ClickHouseSettings) -> Result<MigrationReport> {
    let db = &settings.database;
    let cluster = settings.cluster();
    let on_cluster = cluster
        .as_ref()
        .map(|c| format!(" ON CLUSTER `{}`", c.name))
        .unwrap_or_default();
    settings
        .server_client()
        .query(&format!("CREATE DATABASE IF NOT EXISTS `{db}`{on_cluster}"))
        .execute()
        .await
        .map_err(query_err)?;
    let client = settings.client();
    client
        .query(
            "CREATE TABLE IF NOT EXISTS digame_migrations (version UInt32, name String, \
             checksum String, applied_at DateTime('UTC')) ENGINE = MergeTree() ORDER BY version",
        )
        .execute()
        .await
        .map_err(query_err)?;
    let applied: Vec<AppliedMigration> = client
        .query("SELECT ?fields FROM digame_migrations ORDER BY version")
        .fetch_all()
        .await
        .map_err(query_err)?;
    let mut report = MigrationReport::default();
    for m in migrations(db, cluster.as_ref()) {
        let sum = m.checksum();
        if let Some(done) = applied.iter().find(|a| a.version == m.version) {
            if done.checksum != sum {
                return Err(StoreError::Query(format!(
                    "ClickHouse migration {} ({}) was applied with checksum {} but this build \
                     generates {sum}: a table definition changed after it was applied; add a \
                     new migration that alters the table instead",
                    m.version, m.name, done.checksum
                )));
            }
            report.unchanged.push(m.version);
            continue;
        }
        for statement in &m.statements {
            client.query(statement).execute().await.map_err(|e| {
                StoreError::Query(format!(
                    "ClickHouse migration {} ({}) failed: {e}",
                    m.version, m.name
                ))
            })?;
        }
        let mut insert = client
            .insert::<AppliedMigration>("digame_migrations")
            .await
            .map_err(query_err)?;
        insert
            .write(&AppliedMigration {
                version: m.version,
                name: m.name.to_string(),
                checksum: sum,
                applied_at: u32::try_from(EventTime::now().0 / 1000).unwrap_or(u32::MAX),
            })
            .await
            .map_err(query_err)?;
        insert.end().await.map_err(query_err)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied ClickHouse migration"
        );
        report.applied.push(m.version);
    }
    Ok(report)
}

/// The live columns of a table, as `(name, type)`, from `system.columns`.
pub async fn live_columns(
    client: &Client,
    database: &str,
    table: &str,
) -> Result<Vec<(String, String)>> {
    #[derive(Row, Deserialize)]
    struct Col {
        name: String,
        #[serde(rename = "type")]
        ch_type: String,
    }
    let cols: Vec<Col> = client
        // In table order: 18.16 has no `position` column to sort by, and lists columns
        // in their declared order.
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(database)
        .bind(table)
        .fetch_all()
        .await
        .map_err(query_err)?;
    Ok(cols.into_iter().map(|c| (c.name, c.ch_type)).collect())
}

/// The table spec of a table name.
pub fn spec(name: &str) -> Option<TableSpec> {
    tables().into_iter().find(|t| t.name == name)
}

// ---------------------------------------------------------------------------------------
// Deletion and retention

/// `tenant_id = ? AND <what>` on a table whose time column is `time`, with its values
/// bound to `q`.
fn scoped(
    client: &Client,
    sql: &str,
    time: &str,
    tenant: &str,
    what: &Deletion<'_>,
) -> clickhouse::query::Query {
    match what {
        Deletion::Person(user) => client
            .query(&sql.replace("{cond}", "`tenant_id` = ? AND `user_id` = ?"))
            .bind(tenant)
            .bind(*user),
        Deletion::Before(t) => client
            .query(&sql.replace(
                "{cond}",
                &format!("`tenant_id` = ? AND `{time}` < toDateTime(?, 'UTC')"),
            ))
            .bind(tenant)
            .bind(t.0.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32),
    }
}

/// Deletes rows of `tenant` from every table, waits until ClickHouse has applied the
/// deletions (they are mutations, asynchronous on the server), then rebuilds the months of
/// the `events_hourly` rollup that held the deleted events, so no trace of them stays in
/// its states. Values are bound, never spliced into SQL.
pub async fn delete(
    client: &Client,
    tenant: &str,
    what: &Deletion<'_>,
    wait: Duration,
) -> Result<DeletionReport> {
    digame_schemas::validate::validate_tenant_id(tenant).map_err(StoreError::Query)?;
    let mut report = DeletionReport::default();
    let months: Vec<u32> = scoped(
        client,
        "SELECT DISTINCT toYYYYMM(`timestamp`) FROM `events` WHERE {cond}",
        "timestamp",
        tenant,
        what,
    )
    .fetch_all()
    .await
    .map_err(query_err)?;
    for spec in tables() {
        let fin = match spec.engine {
            Engine::MergeTree => "",
            Engine::Replacing { .. } => " FINAL",
        };
        let count: u64 = scoped(
            client,
            &format!("SELECT count() FROM `{}`{fin} WHERE {{cond}}", spec.name),
            spec.partition_time,
            tenant,
            what,
        )
        .fetch_one()
        .await
        .map_err(query_err)?;
        report.rows.insert(spec.name.to_string(), count);
        if count == 0 {
            continue;
        }
        scoped(
            client,
            &format!("ALTER TABLE `{}` DELETE WHERE {{cond}}", spec.name),
            spec.partition_time,
            tenant,
            what,
        )
        .execute()
        .await
        .map_err(query_err)?;
    }
    wait_for_mutations(client, wait).await?;
    for month in months {
        // Distinct-count states deduplicate, so events arriving meanwhile (through the
        // view and through this re-aggregation) still count once.
        client
            .query("ALTER TABLE `events_hourly` DROP PARTITION ?")
            .bind(month)
            .execute()
            .await
            .map_err(query_err)?;
        client
            .query(
                "INSERT INTO `events_hourly` SELECT `tenant_id`, toStartOfHour(`timestamp`) AS `hour`, \
                 `kind`, `source`, uniqExactState(`event_id`), uniqExactState(`user_id`) \
                 FROM `events` WHERE toYYYYMM(`timestamp`) = ? \
                 GROUP BY `tenant_id`, `hour`, `kind`, `source`",
            )
            .bind(month)
            .execute()
            .await
            .map_err(query_err)?;
        report.rollup_months_rebuilt.push(month);
    }
    Ok(report)
}

/// Waits until no mutation of the current database is pending.
async fn wait_for_mutations(client: &Client, wait: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let pending: u64 = client
            .query(
                "SELECT count() FROM system.mutations WHERE database = currentDatabase() \
                 AND is_done = 0",
            )
            .fetch_one()
            .await
            .map_err(query_err)?;
        if pending == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(StoreError::Query(format!(
                "ClickHouse is still applying {pending} deletions after {} s; they continue \
                 on the server (see system.mutations)",
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Rows as ClickHouse holds them (field order = column order of the derived schema; a test
// checks it).

/// A timestamp as `DateTime` seconds plus milliseconds, or why it does not fit.
fn split_time(t: EventTime, column: &str) -> Result<(u32, u16), String> {
    let secs = t.0.div_euclid(1000);
    let ms = t.0.rem_euclid(1000) as u16;
    u32::try_from(secs).map(|s| (s, ms)).map_err(|_| {
        format!("{column} {t} is outside ClickHouse's DateTime range (1970-01-01 to 2106-02-07)")
    })
}

#[derive(Row, Serialize)]
struct EventCh<'a> {
    schema_version: u16,
    event_id: String,
    tenant_id: &'a str,
    user_id: &'a str,
    source: &'a str,
    kind: &'static str,
    timestamp: u32,
    timestamp_ms: u16,
    received_at: Option<u32>,
    received_at_ms: Option<u16>,
    duration_ms: u64,
    app: Option<&'a str>,
    title: Option<&'a str>,
    url: Option<&'a str>,
    project: Option<&'a str>,
    language: Option<&'a str>,
    branch: Option<&'a str>,
    file: Option<&'a str>,
    participants: &'a [String],
    status: Option<&'a str>,
    properties: Option<&'a str>,
}

impl<'a> EventCh<'a> {
    fn from(e: &'a ActivityEvent) -> Result<Self, String> {
        let (timestamp, timestamp_ms) = split_time(e.timestamp, "timestamp")?;
        let received = e
            .received_at
            .map(|t| split_time(t, "received_at"))
            .transpose()?;
        let a = &e.attributes;
        Ok(EventCh {
            schema_version: e.schema_version,
            event_id: e.event_id.map(|u| u.to_string()).unwrap_or_default(),
            tenant_id: &e.tenant_id,
            user_id: &e.user_id,
            source: &e.source,
            kind: e.kind.as_str(),
            timestamp,
            timestamp_ms,
            received_at: received.map(|r| r.0),
            received_at_ms: received.map(|r| r.1),
            duration_ms: e.duration_ms,
            app: a.app.as_deref(),
            title: a.title.as_deref(),
            url: a.url.as_deref(),
            project: a.project.as_deref(),
            language: a.language.as_deref(),
            branch: a.branch.as_deref(),
            file: a.file.as_deref(),
            participants: &a.participants,
            status: a.status.as_deref(),
            properties: e.properties.as_ref().map(|p| p.get()),
        })
    }
}

#[derive(Row, Serialize)]
struct FeatureCh<'a> {
    tenant_id: &'a str,
    user_id: &'a str,
    granularity: &'static str,
    window_start: u32,
    window_start_ms: u16,
    window_end: u32,
    window_end_ms: u16,
    timezone: &'a str,
    feature: &'a str,
    dimension: &'a str,
    value: f64,
    feature_version: u32,
    params_version: u64,
    is_final: u8,
    revision: u64,
    final_revision: i64,
}

impl<'a> FeatureCh<'a> {
    fn from(f: &'a FeatureRow) -> Result<Self, String> {
        let (window_start, window_start_ms) = split_time(f.window_start, "window_start")?;
        let (window_end, window_end_ms) = split_time(f.window_end, "window_end")?;
        Ok(FeatureCh {
            tenant_id: &f.tenant_id,
            user_id: &f.user_id,
            granularity: f.granularity.as_str(),
            window_start,
            window_start_ms,
            window_end,
            window_end_ms,
            timezone: &f.timezone,
            feature: &f.feature,
            dimension: &f.dimension,
            value: f.value,
            feature_version: f.feature_version,
            params_version: f.params_version,
            is_final: u8::from(f.is_final),
            revision: u64::try_from(f.revision)
                .map_err(|_| format!("revision {} is negative", f.revision))?,
            final_revision: f.final_revision,
        })
    }
}

#[derive(Row, Serialize)]
struct DeadLetterCh<'a> {
    tenant_id: &'a str,
    rejected_at: u32,
    rejected_at_ms: u16,
    stage: &'a str,
    reason_code: &'a str,
    reason: &'a str,
    request_index: i64,
    event_id: Option<&'a str>,
    user_id: Option<&'a str>,
    payload: &'a str,
}

impl<'a> DeadLetterCh<'a> {
    fn from(d: &'a DeadLetter) -> Result<Self, String> {
        let (rejected_at, rejected_at_ms) = split_time(d.rejected_at, "rejected_at")?;
        Ok(DeadLetterCh {
            tenant_id: &d.tenant_id,
            rejected_at,
            rejected_at_ms,
            stage: &d.stage,
            reason_code: &d.reason_code,
            reason: &d.reason,
            request_index: d.request_index,
            event_id: d.event_id.as_deref(),
            user_id: d.user_id.as_deref(),
            payload: &d.payload,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The sink

/// ClickHouse exception codes that mean "this data is wrong", not "try again": a batch
/// failing with one of them is bisected to find the rows at fault.
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
];

/// Why an INSERT failed.
#[derive(Debug)]
enum InsertFailure {
    /// ClickHouse refused the rows themselves.
    Data(String),
    /// Anything else: worth retrying.
    Transient(String),
}

fn classify(e: clickhouse::error::Error) -> InsertFailure {
    let text = e.to_string();
    if let clickhouse::error::Error::BadResponse(body) = &e
        && let Some(code) = exception_code(body)
        && DATA_ERROR_CODES.contains(&code)
    {
        return InsertFailure::Data(text);
    }
    InsertFailure::Transient(text)
}

/// The number after `Code: ` in a ClickHouse exception text.
fn exception_code(body: &str) -> Option<u32> {
    let rest = &body[body.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The ClickHouse store.
pub struct ClickHouseStore {
    settings: ClickHouseSettings,
    client: Client,
    inserts: Arc<Semaphore>,
    healthy: AtomicBool,
    last_error: std::sync::Mutex<String>,
}

impl ClickHouseStore {
    /// Connects; applies migrations when configured to.
    pub async fn open(settings: ClickHouseSettings) -> Result<Self> {
        if settings.config.migrate_on_start {
            migrate(&settings).await?;
        }
        let client = settings.client().with_setting(
            "max_execution_time",
            settings.config.timeout_secs.to_string(),
        );
        Ok(ClickHouseStore {
            inserts: Arc::new(Semaphore::new(
                settings.config.max_concurrent_inserts.max(1),
            )),
            client,
            settings,
            healthy: AtomicBool::new(true),
            last_error: std::sync::Mutex::new(String::new()),
        })
    }

    pub fn settings(&self) -> &ClickHouseSettings {
        &self.settings
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Writes one table's rows: converts, splits into bounded batches, inserts them
    /// concurrently. Rows that cannot be stored come back as dead letters.
    async fn write_table<'r, R, T>(
        &self,
        table: &'static str,
        rows: &'r [R],
        convert: impl Fn(&'r R) -> Result<T::Value<'r>, String>,
        describe: impl Fn(&R) -> DeadLetterSeed + Sync,
    ) -> Result<Vec<DeadLetter>>
    where
        T: Row + clickhouse::RowWrite,
        T::Value<'r>: Sync,
        R: Serialize + Sync,
    {
        let mut dead = Vec::new();
        let mut ok: Vec<(usize, T::Value<'r>)> = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            match convert(r) {
                Ok(v) => ok.push((i, v)),
                Err(why) => dead.push(dead_letter(&describe(r), r, "store_unencodable", why)),
            }
        }
        let cfg = &self.settings.config;
        let mut batches: Vec<&[(usize, T::Value<'r>)]> = Vec::new();
        let mut start = 0;
        let mut bytes = 0usize;
        for i in 0..ok.len() {
            // The JSON size of the source row approximates its RowBinary size from above.
            bytes += serde_json::to_vec(&rows[ok[i].0]).map_or(256, |v| v.len());
            if i + 1 - start >= cfg.batch_rows.max(1) || bytes >= cfg.batch_bytes {
                batches.push(&ok[start..=i]);
                start = i + 1;
                bytes = 0;
            }
        }
        if start < ok.len() {
            batches.push(&ok[start..]);
        }
        let results = futures::future::join_all(
            batches
                .into_iter()
                .map(|b| self.insert_bisecting::<T>(table, b)),
        )
        .await;
        for r in results {
            for (i, why) in r? {
                let row = &rows[i];
                dead.push(dead_letter(&describe(row), row, "store_rejected", why));
            }
        }
        Ok(dead)
    }

    /// Inserts `rows`; on a data error splits them in halves until the bad rows are
    /// isolated. Returns the rejected rows' indices with ClickHouse's reason.
    async fn insert_bisecting<'r, T>(
        &self,
        table: &'static str,
        rows: &[(usize, T::Value<'r>)],
    ) -> Result<Vec<(usize, String)>>
    where
        T: Row + clickhouse::RowWrite,
        T::Value<'r>: Sync,
    {
        let mut rejected = Vec::new();
        let mut stack = vec![rows];
        while let Some(part) = stack.pop() {
            match self.insert_retrying::<T>(table, part).await? {
                None => {}
                Some(why) if part.len() == 1 => rejected.push((part[0].0, why)),
                Some(_) => {
                    metrics()
                        .store_insert_bisections
                        .with_label_values(&[table])
                        .inc();
                    let (a, b) = part.split_at(part.len() / 2);
                    stack.push(b);
                    stack.push(a);
                }
            }
        }
        Ok(rejected)
    }

    /// One INSERT, retried with backoff while failures are transient. `Ok(Some(reason))`
    /// when ClickHouse refused the data.
    async fn insert_retrying<'r, T>(
        &self,
        table: &'static str,
        rows: &[(usize, T::Value<'r>)],
    ) -> Result<Option<String>>
    where
        T: Row + clickhouse::RowWrite,
        T::Value<'r>: Sync,
    {
        let attempts = self.settings.config.insert_attempts.max(1);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let permit = self
                .inserts
                .acquire()
                .await
                .expect("semaphore never closed");
            let result = self.insert_once::<T>(table, rows).await;
            drop(permit);
            match result {
                Ok(()) => {
                    metrics()
                        .store_rows_written
                        .with_label_values(&[table])
                        .inc_by(rows.len() as u64);
                    self.set_error(None);
                    return Ok(None);
                }
                Err(InsertFailure::Data(why)) => return Ok(Some(why)),
                Err(InsertFailure::Transient(why)) => {
                    self.set_error(Some(&why));
                    if attempt >= attempts {
                        return Err(StoreError::Query(format!(
                            "inserting {} rows into ClickHouse table {table} failed {attempt} times; last error: {why}",
                            rows.len()
                        )));
                    }
                    tracing::warn!(table, attempt, error = %why, "ClickHouse insert failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
            }
        }
    }

    async fn insert_once<'r, T>(
        &self,
        table: &'static str,
        rows: &[(usize, T::Value<'r>)],
    ) -> Result<(), InsertFailure>
    where
        T: Row + clickhouse::RowWrite,
        T::Value<'r>: Sync,
    {
        let timeout = Some(Duration::from_secs(
            self.settings.config.timeout_secs.max(1),
        ));
        let mut insert = self
            .client
            .insert::<T>(table)
            .await
            .map_err(classify)?
            .with_timeouts(timeout, timeout);
        for (_, row) in rows {
            insert.write(row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }

    fn set_error(&self, error: Option<&str>) {
        self.healthy.store(error.is_none(), Ordering::Relaxed);
        if let Some(e) = error {
            *self.last_error.lock().expect("last_error lock") = e.to_string();
        }
    }
}

/// Who a dead letter is about.
struct DeadLetterSeed {
    tenant_id: String,
    user_id: Option<String>,
    event_id: Option<String>,
}

fn dead_letter<R: Serialize>(
    seed: &DeadLetterSeed,
    row: &R,
    code: &str,
    why: String,
) -> DeadLetter {
    tracing::warn!(tenant = %seed.tenant_id, code, reason = %why, "row not stored; kept as a dead letter");
    let mut payload = serde_json::to_string(row).unwrap_or_default();
    if payload.len() > 64 * 1024 {
        let mut cut = 64 * 1024;
        while !payload.is_char_boundary(cut) {
            cut -= 1;
        }
        payload.truncate(cut);
    }
    DeadLetter {
        tenant_id: seed.tenant_id.clone(),
        rejected_at: EventTime::now(),
        stage: "store".into(),
        reason_code: code.into(),
        reason: format!("{why}; the row was not stored (its payload is kept here)"),
        request_index: -1,
        event_id: seed.event_id.clone(),
        user_id: seed.user_id.clone(),
        payload,
    }
}

#[async_trait]
impl StoreSink for ClickHouseStore {
    async fn write(&self, batch: &StoreBatch) -> Result<()> {
        // Feature rows first, then the raw events they come from (see `StoreSink::write`).
        let features = self
            .write_table::<_, FeatureCh<'_>>("features", &batch.features, FeatureCh::from, |f| {
                DeadLetterSeed {
                    tenant_id: f.tenant_id.to_string(),
                    user_id: Some(f.user_id.to_string()),
                    event_id: None,
                }
            })
            .await;
        let events = self
            .write_table::<_, EventCh<'_>>("events", &batch.events, EventCh::from, |e| {
                DeadLetterSeed {
                    tenant_id: e.tenant_id.clone(),
                    user_id: Some(e.user_id.clone()),
                    event_id: e.event_id.map(|u| u.to_string()),
                }
            })
            .await;
        let mut dead = features?;
        dead.extend(events?);
        dead.extend(batch.dead_letters.iter().cloned());
        let failed = self
            .write_table::<_, DeadLetterCh<'_>>("dead_letters", &dead, DeadLetterCh::from, |d| {
                DeadLetterSeed {
                    tenant_id: d.tenant_id.clone(),
                    user_id: d.user_id.clone(),
                    event_id: d.event_id.clone(),
                }
            })
            .await?;
        if !failed.is_empty() {
            return Err(StoreError::Query(format!(
                "{} dead letters could not be stored in ClickHouse: {}",
                failed.len(),
                failed[0].reason
            )));
        }
        Ok(())
    }

    async fn delete(&self, tenant: &str, what: &Deletion<'_>) -> Result<DeletionReport> {
        delete(&self.client, tenant, what, Duration::from_secs(300)).await
    }

    fn status(&self) -> StoreStatus {
        let healthy = self.healthy.load(Ordering::Relaxed);
        StoreStatus {
            healthy,
            detail: if healthy {
                format!(
                    "clickhouse {}/{}",
                    self.settings.url, self.settings.database
                )
            } else {
                format!(
                    "clickhouse {}/{}: {}",
                    self.settings.url,
                    self.settings.database,
                    self.last_error.lock().expect("last_error lock")
                )
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(table: &str) -> Vec<String> {
        spec(table)
            .unwrap()
            .columns()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn row_types_match_the_derived_schema() {
        assert_eq!(EventCh::COLUMN_NAMES, names("events"));
        assert_eq!(FeatureCh::COLUMN_NAMES, names("features"));
        assert_eq!(DeadLetterCh::COLUMN_NAMES, names("dead_letters"));
    }

    #[test]
    fn times_split_into_seconds_and_millis() {
        assert_eq!(
            split_time(EventTime(1_700_000_000_123), "t"),
            Ok((1_700_000_000, 123))
        );
        assert_eq!(split_time(EventTime(0), "t"), Ok((0, 0)));
        let err = split_time(EventTime(-1), "timestamp").unwrap_err();
        assert!(err.contains("timestamp") && err.contains("1970"), "{err}");
    }

    #[test]
    fn exception_codes_are_read_and_classified() {
        assert_eq!(
            exception_code(
                "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero"
            ),
            Some(395)
        );
        assert_eq!(exception_code("no code"), None);
        let e = clickhouse::error::Error::BadResponse("Code: 395, e.displayText() = x".into());
        assert!(matches!(classify(e), InsertFailure::Data(_)));
        let e = clickhouse::error::Error::BadResponse("Code: 252, Too many parts".into());
        assert!(matches!(classify(e), InsertFailure::Transient(_)));
    }

    #[test]
    fn migrations_are_stable_and_checksummed() {
        let a = migrations("d", None);
        let b = migrations("d", None);
        assert_eq!(a.len(), 5);
        assert_eq!(a[0].checksum(), b[0].checksum());
        // v4 adds the column where v1's full layout would have it, then rebuilds the view.
        assert_eq!(a[3].statements.len(), 3, "{:?}", a[3].statements);
        assert!(
            a[3].statements[0]
                .starts_with("ALTER TABLE `d`.`features` ADD COLUMN `params_version` UInt64 AFTER"),
            "{}",
            a[3].statements[0]
        );
        assert_eq!(
            a[4].statements[0],
            "ALTER TABLE `d`.`features` ADD COLUMN `final_revision` Int64 AFTER `revision`"
        );
        assert_eq!(a[0].checksum().len(), 64);
        assert_ne!(a[0].checksum(), migrations("other", None)[0].checksum());
        let cluster = ClusterSpec { name: "c".into() };
        assert_eq!(migrations("d", Some(&cluster))[0].statements.len(), 10);
    }
}
