//! Configuration: one serde tree, layered defaults → TOML file → environment → flags.
//!
//! Environment variables are `DIGAME_` followed by the field path in upper case with `__`
//! between levels (`DIGAME_PIPELINE__ALLOWED_LATENESS_SECS=600`); the common ones also
//! have short forms: `DIGAME_LISTEN`, `DIGAME_DATA_DIR`, `DIGAME_INGEST_KEYS`. Unknown keys
//! are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use digame_telemetry::LogFormat;

/// Everything `digame serve` can be told.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// Directory holding the embedded bus, store and checkpoints.
    pub data_dir: PathBuf,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Default log filter when `RUST_LOG` is unset.
    pub log_level: String,
    pub ingest: IngestConfig,
    pub bus: BusConfig,
    pub pipeline: PipelineConfig,
    pub store: StoreConfig,
    pub query: QueryConfig,
    pub admin: AdminConfig,
    pub meta: MetaConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub http: HttpConfig,
}

/// Accounts and tokens.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Access-token signing keys, `kid:secret` pairs (`DIGAME_AUTH__JWT_KEYS`); the first
    /// signs, all verify (rotation: put the new key first, drop the old one after
    /// `access_ttl_secs`). Secrets of at least 32 characters. Empty: one is generated
    /// into `<data_dir>/jwt.keys` on first start (fine for one node; give every node the
    /// same keys when there are several).
    pub jwt_keys: JwtKeys,
    /// Lifetime of an access token.
    pub access_ttl_secs: u64,
    /// Lifetime of a refresh token (each refresh issues a new one).
    pub refresh_ttl_secs: u64,
    /// Lifetime of a password-reset token.
    pub reset_ttl_secs: u64,
    /// Where password-reset messages are delivered: `file` (one file per message under
    /// `<data_dir>/outbox`, readable by the operator only) or `log` (the log says a reset
    /// was issued and for whom, never the token: for deployments with a mail relay
    /// reading the outbox elsewhere).
    pub notifier: String,
    /// Email of the first platform admin, created on first start or by `digame init`.
    pub bootstrap_email: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_keys: JwtKeys::default(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 86_400,
            reset_ttl_secs: 1_800,
            notifier: "file".into(),
            bootstrap_email: "admin@digame.local".into(),
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_keys", &self.jwt_keys)
            .field("access_ttl_secs", &self.access_ttl_secs)
            .field("refresh_ttl_secs", &self.refresh_ttl_secs)
            .field("reset_ttl_secs", &self.reset_ttl_secs)
            .field("notifier", &self.notifier)
            .field("bootstrap_email", &self.bootstrap_email)
            .finish()
    }
}

/// Token signing keys, `kid` → secret in order. `Debug` shows only the kids.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JwtKeys(pub Vec<(String, String)>);

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| format!("{k}:<redacted>")))
            .finish()
    }
}

impl JwtKeys {
    /// Parses `kid1:secret1,kid2:secret2`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, pair) in text.split(',').map(str::trim).enumerate() {
            if pair.is_empty() {
                continue;
            }
            let (kid, secret) = pair.split_once(':').ok_or_else(|| {
                format!(
                    "auth.jwt_keys entry {} has no `kid:` part; write kid:secret",
                    i + 1
                )
            })?;
            if kid.is_empty()
                || !kid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "auth.jwt_keys entry {}: the kid must be letters, digits, - or _",
                    i + 1
                ));
            }
            if secret.len() < 32 {
                return Err(format!(
                    "auth.jwt_keys entry {} (kid {kid}): the secret is shorter than 32 characters; use a long random one",
                    i + 1
                ));
            }
            if keys.iter().any(|(k, _): &(String, String)| k == kid) {
                return Err(format!("auth.jwt_keys: kid {kid} appears twice"));
            }
            keys.push((kid.to_string(), secret.to_string()));
        }
        Ok(JwtKeys(keys))
    }
}

impl Serialize for JwtKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self
            .0
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",");
        text.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JwtKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        JwtKeys::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// A token bucket: `per_period` tokens per period (second, or minute for sign-in), at
/// most `burst` saved up.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_period: u32,
    pub burst: u32,
}

/// Request rate limits (429 + `Retry-After` when exceeded).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per second of one API key.
    pub per_key: Rate,
    /// Requests per second of one signed-in account.
    pub per_account: Rate,
    /// Requests per second of a whole tenant (keys and accounts together).
    pub per_tenant: Rate,
    /// Sign-in attempts per minute, per address and per client IP.
    pub login: Rate,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            per_key: Rate {
                per_period: 500,
                burst: 1000,
            },
            per_account: Rate {
                per_period: 50,
                burst: 100,
            },
            per_tenant: Rate {
                per_period: 5000,
                burst: 10_000,
            },
            login: Rate {
                per_period: 10,
                burst: 10,
            },
        }
    }
}

/// HTTP behaviour shared by every route.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Browser origins allowed to call the API (`https://dash.example.com`); empty: no
    /// cross-origin access.
    pub cors_origins: Vec<String>,
    /// Open connections served in full (0: the process's open-file limit less 256, at
    /// most 16,384).
    pub max_connections: usize,
    /// Connections beyond `max_connections` that may still reach the health, metrics and
    /// ingest routes; everything else on them is answered 503. Past these, a new
    /// connection gets a 503 and is closed at once.
    pub reserved_connections: usize,
    /// A connection that has not sent a complete request head within this many seconds
    /// (a slow client, or an idle keep-alive connection) is closed.
    pub header_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            cors_origins: Vec::new(),
            max_connections: 0,
            reserved_connections: 64,
            header_timeout_secs: 10,
        }
    }
}

/// Where control-plane metadata (tenants, accounts, keys, audit, settings, profiles,
/// jobs) is kept.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {
    /// `sqlite://` (`<data_dir>/meta.db`), `sqlite:///path/to/meta.db`, or
    /// `postgres://user:password@host:port/database` (`DIGAME_META__URL`). The password is
    /// never printed.
    pub url: String,
    /// How often pipelines and ingest look for changed settings and profiles (ms).
    pub refresh_ms: u64,
}

impl fmt::Debug for MetaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaConfig")
            .field("url", &redact_url(&self.url))
            .field("refresh_ms", &self.refresh_ms)
            .finish()
    }
}

impl Default for MetaConfig {
    fn default() -> Self {
        MetaConfig {
            url: "sqlite://".into(),
            refresh_ms: 1000,
        }
    }
}

/// Service keys for automation that administers a tenant.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Service keys, `key:tenant` pairs like ingest keys (`DIGAME_ADMIN__KEYS`): each acts
    /// as a `tenant_admin` of its tenant. For deployments that provision from config;
    /// keys created through the API (`POST /v1/keys`) are the usual way.
    pub keys: IngestKeys,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            ingest: IngestConfig::default(),
            bus: BusConfig::default(),
            pipeline: PipelineConfig::default(),
            store: StoreConfig::default(),
            query: QueryConfig::default(),
            admin: AdminConfig::default(),
            meta: MetaConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// Limits and credentials of the HTTP collector.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Ingestion keys from config and their tenants: `key1:tenant-a,key2:tenant-b` or a
    /// table `{ key1 = "tenant-a" }`; each acts as an `ingestion_agent` of its tenant.
    /// Keys created through the API (`POST /v1/keys`, stored hashed) are the usual way.
    pub keys: IngestKeys,
    /// Largest request body accepted, as sent (compressed or not).
    pub max_body_bytes: usize,
    /// Largest body after gzip decompression (guards against gzip bombs).
    pub max_decompressed_bytes: usize,
    /// Most events in one request.
    pub max_events_per_request: usize,
    /// Largest single event, as JSON text.
    pub max_event_bytes: usize,
    /// Oldest accepted event time, in days before now, unless the tenant overrides it.
    pub horizon_days: u32,
    /// Per-tenant horizon overrides, in days.
    pub tenant_horizon_days: BTreeMap<String, u32>,
    /// Claim client event ids in the metadata store before answering, so the same id for
    /// a different event is refused in any later request too (within one request it always
    /// is). On by default; turning it off trades that guarantee for ingest throughput
    /// (`bench-ingest` measures both).
    pub idempotency_index: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            keys: IngestKeys::default(),
            max_body_bytes: 5 << 20,
            max_decompressed_bytes: 20 << 20,
            max_events_per_request: 10_000,
            max_event_bytes: 64 << 10,
            horizon_days: 30,
            tenant_horizon_days: BTreeMap::new(),
            idempotency_index: true,
        }
    }
}

impl IngestConfig {
    /// The longest horizon of any tenant: how far back the pipeline must be able to
    /// reopen a day.
    pub fn longest_horizon_days(&self) -> u32 {
        self.tenant_horizon_days
            .values()
            .copied()
            .fold(self.horizon_days, u32::max)
    }

    pub fn horizon_days_for(&self, tenant: &str) -> u32 {
        self.tenant_horizon_days
            .get(tenant)
            .copied()
            .unwrap_or(self.horizon_days)
    }
}

/// Ingestion keys → tenant. Never printed: `Debug` shows only the tenants.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IngestKeys(pub BTreeMap<String, String>);

impl fmt::Debug for IngestKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.values().map(|t| format!("<redacted>:{t}")))
            .finish()
    }
}

impl IngestKeys {
    /// Parses `key1:tenant-a,key2:tenant-b`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for (i, pair) in text.split(',').map(str::trim).enumerate() {
            if pair.is_empty() {
                continue;
            }
            let (key, tenant) = pair.rsplit_once(':').ok_or_else(|| {
                format!(
                    "ingest key entry {} has no `:tenant` part; write key:tenant",
                    i + 1
                )
            })?;
            if key.len() < 16 {
                return Err(format!(
                    "ingest key entry {} is shorter than 16 characters; use a long random key",
                    i + 1
                ));
            }
            digame_schemas::validate::validate_tenant_id(tenant)?;
            keys.insert(key.to_string(), tenant.to_string());
        }
        Ok(IngestKeys(keys))
    }

    pub fn tenant_of(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl Serialize for IngestKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for IngestKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(BTreeMap<String, String>),
        }
        match Form::deserialize(d)? {
            Form::Text(text) => IngestKeys::parse(&text).map_err(de::Error::custom),
            Form::Table(map) => {
                let text = map
                    .iter()
                    .map(|(k, t)| format!("{k}:{t}"))
                    .collect::<Vec<_>>()
                    .join(",");
                IngestKeys::parse(&text).map_err(de::Error::custom)
            }
        }
    }
}

/// Which bus to use and how the embedded log behaves.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `file://` (embedded log under `<data_dir>/bus`), `file:///path`, or
    /// `kafka://host:port[,host:port…]`.
    pub url: String,
    /// Partitions per topic; fixed once the log (or Kafka topic) exists.
    pub partitions: u32,
    /// Kafka: prefix of topic and consumer-group names.
    pub topic_prefix: String,
    /// Kafka: replication factor of the topics Digame creates.
    pub replication: i32,
    /// Kafka: how long a record may wait for the broker's acknowledgement, in ms.
    pub delivery_timeout_ms: u64,
    /// Kafka: extra librdkafka properties (security, tuning), e.g.
    /// `{ "security.protocol" = "SASL_SSL" }`. Values of keys naming a password, secret
    /// or key are never printed.
    pub kafka: KafkaProperties,
    /// Size at which a log segment is sealed.
    pub segment_bytes: u64,
    /// Per-partition size above which old segments are deleted.
    pub retention_bytes: u64,
    /// Age after which sealed segments are deleted, in hours.
    pub retention_hours: u64,
    /// Append requests queued for the writer before publishers wait.
    pub queue_capacity: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            url: "file://".into(),
            partitions: 8,
            topic_prefix: "digame.".into(),
            replication: 1,
            delivery_timeout_ms: 30_000,
            kafka: KafkaProperties::default(),
            segment_bytes: 64 << 20,
            retention_bytes: 8 << 30,
            retention_hours: 7 * 24,
            queue_capacity: 1024,
        }
    }
}

/// librdkafka properties; `Debug` redacts secrets.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |k: &str| ["password", "secret", "key"].iter().any(|s| k.contains(s));
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if secret(k) { "<redacted>" } else { v.as_str() })),
            )
            .finish()
    }
}

/// The bus a configuration selects.
#[derive(Clone, Debug, PartialEq)]
pub enum BusBackend {
    /// The embedded log in this directory.
    Embedded(PathBuf),
    /// Kafka at these bootstrap servers.
    Kafka { brokers: String },
}

/// Stream-processor behaviour.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Run the feature pipeline in this process. Off for ingest-only nodes, whose events
    /// are processed by pipeline workers elsewhere.
    pub enabled: bool,
    /// How long after its end a window stays provisional, by the person's newest event
    /// time or by the wall clock, whichever passes first; then it is marked final. Later
    /// events still count: they revise the final window.
    pub allowed_lateness_secs: u64,
    /// Final days within this many days of a person's newest event keep their activities
    /// in memory, so late events revise them without reading the store; older days are
    /// reopened from the stored raw events.
    pub hold_days: u32,
    /// A final day that events just reached stays in memory at least this many seconds,
    /// so a backfill spread over several polls reads the store once.
    pub hold_touched_secs: u64,
    /// At most this many person-days are held by `hold_touched_secs` at once (a burst
    /// backfill would otherwise hold all it touches); past it they leave memory at the next
    /// flush and later events for them reopen them from the store.
    pub max_touched_days: usize,
    /// Heartbeats with identical data at most this far apart are merged (ActivityWatch's
    /// pulsetime), in milliseconds.
    pub pulsetime_ms: u64,
    /// Gaps of at most this many milliseconds between not-AFK intervals are filled.
    pub presence_flood_ms: u64,
    /// How often changed windows are written to the store, in milliseconds.
    pub flush_interval_ms: u64,
    /// How often state and offsets are checkpointed, in milliseconds.
    pub checkpoint_interval_ms: u64,
    /// Time zone for people without a profile (IANA name).
    pub default_timezone: String,
    /// Records taken from the bus per poll.
    pub poll_batch: usize,
    /// `/readyz` reports not ready when more records than this wait unprocessed.
    pub max_ready_lag: u64,
    /// `/readyz` reports a partition stalled, and not ready, once its records have waited
    /// this long without the pipeline advancing on it.
    pub stall_after_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            enabled: true,
            allowed_lateness_secs: 900,
            hold_days: 2,
            hold_touched_secs: 300,
            max_touched_days: 20_000,
            pulsetime_ms: 2_000,
            presence_flood_ms: 5_000,
            flush_interval_ms: 500,
            checkpoint_interval_ms: 5_000,
            default_timezone: "UTC".into(),
            poll_batch: 10_000,
            max_ready_lag: 1_000_000,
            stall_after_secs: 30,
        }
    }
}

/// Which store to use and how the embedded one is maintained.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `file://` (Parquet under `<data_dir>/store`), `file:///path`, or
    /// `clickhouse://host:port/database` (the HTTP interface).
    pub url: String,
    /// A partition with at least this many files is compacted.
    pub compaction_min_files: usize,
    /// Seconds between compaction passes.
    pub compaction_interval_secs: u64,
    /// ClickHouse settings, used when `url` is `clickhouse://`.
    pub clickhouse: ClickHouseConfig,
    /// Days of data each tenant keeps (`[store.retention_days] acme = 365`), applied by
    /// `digame retention` and `POST /v1/retention` when they are not given a number.
    pub retention_days: BTreeMap<String, u32>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "file://".into(),
            compaction_min_files: 8,
            compaction_interval_secs: 30,
            clickhouse: ClickHouseConfig::default(),
            retention_days: BTreeMap::new(),
        }
    }
}

/// How Digame talks to ClickHouse.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    pub user: String,
    /// Never printed. Prefer `DIGAME_STORE__CLICKHOUSE__PASSWORD` to a file.
    pub password: String,
    /// Cluster mode: the cluster name of the servers' `remote_servers`; tables become
    /// `Replicated*` local tables with `Distributed` tables over them.
    pub cluster: Option<String>,
    /// Apply pending migrations at start-up (otherwise `digame migrate` does).
    pub migrate_on_start: bool,
    /// Most rows in one INSERT.
    pub batch_rows: usize,
    /// Most encoded bytes in one INSERT (approximate, measured on the rows' JSON form).
    pub batch_bytes: usize,
    /// INSERTs in flight at once.
    pub max_concurrent_inserts: usize,
    /// Attempts of an INSERT that fails for a transient reason before the write fails
    /// (the pipeline then retries the whole write later).
    pub insert_attempts: u32,
    /// Longest an INSERT or query may take, in seconds.
    pub timeout_secs: u64,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            user: "default".into(),
            password: String::new(),
            cluster: None,
            migrate_on_start: true,
            batch_rows: 100_000,
            batch_bytes: 64 << 20,
            max_concurrent_inserts: 4,
            insert_attempts: 5,
            timeout_secs: 30,
        }
    }
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("cluster", &self.cluster)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("batch_rows", &self.batch_rows)
            .field("batch_bytes", &self.batch_bytes)
            .field("max_concurrent_inserts", &self.max_concurrent_inserts)
            .field("insert_attempts", &self.insert_attempts)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

/// The store a configuration selects.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreBackend {
    /// The embedded Parquet store in this directory.
    Embedded(PathBuf),
    /// ClickHouse's HTTP interface at `http://host:port`, this database.
    ClickHouse { url: String, database: String },
}

/// Query limits: what one SQL request may cost. Every limit refuses or stops the one query
/// that reaches it, never the process.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Most rows one SQL request returns; more are cut and flagged `truncated`.
    pub max_rows: usize,
    /// Most bytes of result data one SQL request returns; more are cut and flagged
    /// `truncated`.
    pub max_result_bytes: usize,
    /// Longest a query may run, in seconds; then it is stopped.
    pub timeout_secs: u64,
    /// Longest SQL text, in bytes.
    pub max_sql_bytes: usize,
    /// Deepest nesting of expressions and set operations (`1+1+…`, `a OR b OR …`,
    /// `UNION ALL` chains, subqueries) a query may have.
    pub max_depth: usize,
    /// Largest single value a string function may build (`repeat`, `lpad`, `rpad`), bytes.
    pub max_value_bytes: usize,
    /// Memory one query's operators may hold (sorts, joins, aggregates), bytes.
    pub max_memory_bytes: usize,
    /// Queries one tenant may run at once; more are answered 429 with `Retry-After`.
    pub max_concurrent_per_tenant: usize,
    /// Queries all tenants together may run at once.
    pub max_concurrent: usize,
    /// Threads of the query executor, separate from the ones serving ingest and the
    /// pipeline (0: half the cores, at least one).
    pub threads: usize,
    /// Feature values the person-read cache holds at most (about 150 bytes each); 0 turns
    /// the cache off, so every person read scans the store.
    pub cache_cells: usize,
    /// Days before today (UTC) the cache covers; reads starting earlier go to the store.
    pub cache_days: u32,
    /// Longest a cached person is served before it is read from the store again, seconds:
    /// a bound on staleness should a change ever bypass the features stream.
    pub cache_ttl_secs: u64,
    /// Person reads that miss the cache and may wait for the store at once; more are
    /// answered 503 with `Retry-After`.
    pub max_store_reads: usize,
    /// Most people one group view covers (`users=`, a team, a manager's reports); a
    /// larger group is refused with 400 before any member's data is read, since a view
    /// reads every member's windows or events.
    pub max_group_members: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_rows: 10_000,
            max_result_bytes: 16 << 20,
            timeout_secs: 30,
            max_sql_bytes: 64 << 10,
            max_depth: 256,
            max_value_bytes: 64 << 10,
            max_memory_bytes: 512 << 20,
            max_concurrent_per_tenant: 2,
            max_concurrent: 4,
            threads: 0,
            cache_cells: 2_000_000,
            cache_days: 35,
            cache_ttl_secs: 300,
            max_store_reads: 8,
            max_group_members: 500,
        }
    }
}

impl Config {
    /// The configuration as TOML a config file can hold, every secret replaced by
    /// `<redacted>` (signing secrets, passwords in URLs and settings, key strings, secret
    /// librdkafka properties), for `digame config`.
    pub fn to_redacted_toml(&self) -> Result<String, String> {
        const R: &str = "<redacted>";
        let mut c = self.clone();
        for (_, secret) in &mut c.auth.jwt_keys.0 {
            *secret = R.into();
        }
        let hide = |keys: &IngestKeys| {
            IngestKeys(
                keys.0
                    .values()
                    .enumerate()
                    .map(|(i, tenant)| (format!("{R}-{}", i + 1), tenant.clone()))
                    .collect(),
            )
        };
        c.ingest.keys = hide(&c.ingest.keys);
        c.admin.keys = hide(&c.admin.keys);
        c.meta.url = redact_url(&c.meta.url);
        c.store.url = redact_url(&c.store.url);
        c.bus.url = redact_url(&c.bus.url);
        if !c.store.clickhouse.password.is_empty() {
            c.store.clickhouse.password = R.into();
        }
        for (k, v) in &mut c.bus.kafka.0 {
            if ["password", "secret", "key"].iter().any(|s| k.contains(s)) {
                *v = R.into();
            }
        }
        toml::to_string_pretty(&c)
            .map_err(|e| format!("the configuration does not print as TOML: {e}"))
    }

    /// Layers defaults, the optional TOML file, `DIGAME_*` environment variables, and
    /// `overrides` (command-line flags, serialized with absent flags skipped).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Self, String> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig
            .merge(
                Env::prefixed("DIGAME_")
                    .ignore(&["config", "admin_password", "key"])
                    .map(|key| {
                        let key = key.as_str().to_ascii_lowercase();
                        match key.as_str() {
                            "ingest_keys" => "ingest.keys".into(),
                            "admin_keys" => "admin.keys".into(),
                            _ => key.replace("__", ".").into(),
                        }
                    }),
            )
            .merge(Serialized::defaults(overrides));
        fig.extract::<Config>().map_err(|e| {
            e.into_iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// Directory of the embedded bus.
    pub fn bus_dir(&self) -> Result<PathBuf, String> {
        local_dir(&self.bus.url, &self.data_dir, "bus")
    }

    /// The bus selected by `bus.url`.
    pub fn bus_backend(&self) -> Result<BusBackend, String> {
        let Some(rest) = self.bus.url.strip_prefix("kafka://") else {
            return self.bus_dir().map(BusBackend::Embedded);
        };
        let brokers = rest.trim_end_matches('/');
        let valid = |b: &str| {
            b.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        };
        if brokers.is_empty() || !brokers.split(',').all(valid) {
            return Err(format!(
                "bus URL `{}`: expected kafka://host:port[,host:port…]",
                self.bus.url
            ));
        }
        Ok(BusBackend::Kafka {
            brokers: brokers.to_string(),
        })
    }

    /// Directory of the embedded store.
    pub fn store_dir(&self) -> Result<PathBuf, String> {
        local_dir(&self.store.url, &self.data_dir, "store")
    }

    /// The store selected by `store.url`.
    pub fn store_backend(&self) -> Result<StoreBackend, String> {
        let Some(rest) = self.store.url.strip_prefix("clickhouse://") else {
            return self.store_dir().map(StoreBackend::Embedded);
        };
        let bad = || {
            format!(
                "store URL `{}`: expected clickhouse://host:port/database (the HTTP port, e.g. 8123)",
                self.store.url
            )
        };
        let (addr, database) = rest.split_once('/').ok_or_else(bad)?;
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        let db_ok = !database.is_empty()
            && database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !port_ok || !db_ok || addr.contains('@') {
            return Err(bad());
        }
        Ok(StoreBackend::ClickHouse {
            url: format!("http://{addr}"),
            database: database.to_string(),
        })
    }
}

/// `url` with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:<redacted>{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// `<data_dir>/pipeline`: the pipelines' checkpoints, one directory per consumer group.
pub fn pipeline_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pipeline")
}

/// `<data_dir>/jwt.keys`: token-signing keys generated on first start when none are
/// configured.
pub fn jwt_keys_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt.keys")
}

fn local_dir(url: &str, data_dir: &Path, default_sub: &str) -> Result<PathBuf, String> {
    match url.strip_prefix("file://") {
        Some("") => Ok(data_dir.join(default_sub)),
        Some(path) => Ok(PathBuf::from(path)),
        None => Err(format!(
            "unsupported backend URL `{url}`: use `file://` (embedded){}",
            if default_sub == "bus" {
                " or `kafka://host:port`"
            } else {
                " or `clickhouse://host:port/database`"
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_never_print() {
        let keys = IngestKeys::parse("0123456789abcdef:acme, fedcba9876543210:globex").unwrap();
        assert_eq!(keys.tenant_of("0123456789abcdef"), Some("acme"));
        assert_eq!(keys.tenant_of("fedcba9876543210"), Some("globex"));
        let shown = format!("{keys:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(IngestKeys::parse("short:acme").is_err());
        assert!(IngestKeys::parse("0123456789abcdef:../x").is_err());
        assert!(IngestKeys::parse("0123456789abcdef").is_err());
    }

    #[test]
    fn layers_file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digame.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[pipeline]\nallowed_lateness_secs = 60\n[ingest.keys]\n0123456789abcdef = \"acme\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&path), serde_json::json!({"data_dir": "/tmp/x"})).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.pipeline.allowed_lateness_secs, 60);
        assert_eq!(cfg.ingest.keys.tenant_of("0123456789abcdef"), Some("acme"));
        assert_eq!(cfg.bus_dir().unwrap(), PathBuf::from("/tmp/x/bus"));
        assert_eq!(
            cfg.bus_backend().unwrap(),
            BusBackend::Embedded(PathBuf::from("/tmp/x/bus"))
        );
    }

    #[test]
    fn kafka_urls_and_secret_properties() {
        let mut cfg = Config::default();
        cfg.bus.url = "kafka://127.0.0.1:9092,broker-2:9093".into();
        assert_eq!(
            cfg.bus_backend().unwrap(),
            BusBackend::Kafka {
                brokers: "127.0.0.1:9092,broker-2:9093".into()
            }
        );
        for bad in [
            "kafka://",
            "kafka://host",
            "kafka://host:port",
            "nats://x:1",
        ] {
            cfg.bus.url = bad.into();
            let err = cfg.bus_backend().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        cfg.bus
            .kafka
            .0
            .insert("sasl.password".into(), "hunter2-secret".into());
        cfg.bus
            .kafka
            .0
            .insert("security.protocol".into(), "SASL_SSL".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
    }

    #[test]
    fn clickhouse_urls_and_password() {
        let mut cfg = Config::default();
        cfg.store.url = "clickhouse://127.0.0.1:8123/digame".into();
        assert_eq!(
            cfg.store_backend().unwrap(),
            StoreBackend::ClickHouse {
                url: "http://127.0.0.1:8123".into(),
                database: "digame".into()
            }
        );
        for bad in [
            "clickhouse://host:8123",
            "clickhouse://host/db",
            "clickhouse://u:p@host:8123/db",
            "clickhouse://host:8123/db;drop",
            "postgres://host:1/db",
        ] {
            cfg.store.url = bad.into();
            let err = cfg.store_backend().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        cfg.store.clickhouse.password = "hunter2-secret".into();
        cfg.meta.url = "postgres://digame:hunter3-secret@db:5432/meta".into();
        cfg.auth.jwt_keys = JwtKeys::parse("k1:hunter4-secret-0123456789abcdefghijkl").unwrap();
        cfg.ingest.keys = IngestKeys::parse("hunter5-secret-0123456789:acme").unwrap();
        let toml = cfg.to_redacted_toml().unwrap();
        for secret in ["hunter2", "hunter3", "hunter4", "hunter5"] {
            assert!(!toml.contains(secret), "{toml}");
        }
        assert!(toml.contains("[pipeline]"), "{toml}");
        assert!(toml.contains("allowed_lateness_secs = 900"), "{toml}");
        // What it prints (without secrets to redact) loads again as a config file.
        let mut plain = Config::default();
        plain.pipeline.hold_days = 5;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, plain.to_redacted_toml().unwrap()).unwrap();
        let again = Config::load(Some(&path), serde_json::json!({})).unwrap();
        assert_eq!(again.pipeline.hold_days, 5);
        assert_eq!(format!("{again:?}"), format!("{plain:?}"));
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("hunter3"), "{shown}");
        assert!(
            shown.contains("postgres://digame:<redacted>@db:5432/meta"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("digame.toml");
        std::fs::write(&path, "[pipeline]\nalowed_lateness_secs = 60\n").unwrap();
        let err = Config::load(Some(&path), serde_json::json!({})).unwrap_err();
        assert!(err.contains("alowed_lateness_secs"), "{err}");
    }
}
