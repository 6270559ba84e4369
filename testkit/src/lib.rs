//! Test helpers: run the real `digame` binary as a child process on a free loopback port
//! with its own data directory, and talk to it over HTTP.
//!
//! The process is killed when the handle drops, so a failing test never leaves a server
//! behind.

pub mod golden;
pub mod reconstruct;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::process::{Child, Command};

/// Milliseconds since the Unix epoch of `YYYY-MM-DD` + `HH:MM` in UTC.
pub fn utc_ms(date: chrono::NaiveDate, hh: u32, mm: u32) -> i64 {
    date.and_hms_opt(hh, mm, 0)
        .expect("valid time of day")
        .and_utc()
        .timestamp_millis()
}

/// An ephemeral port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Which event bus a test runs on. Test bodies are written once and run per bus.
#[derive(Clone, Debug)]
pub enum Bus {
    Embedded,
    /// A real Kafka-protocol broker at this bootstrap address, with topics and consumer
    /// groups under a prefix unique to the test.
    Kafka {
        bootstrap: String,
        prefix: String,
    },
}

impl Bus {
    /// The broker `infra/scripts/test` started (`TEST_KAFKA_BOOTSTRAP`), with a fresh topic
    /// prefix. Fails, never skips, when there is none.
    pub fn kafka() -> Bus {
        let bootstrap = std::env::var("TEST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
            panic!(
                "TEST_KAFKA_BOOTSTRAP is not set: this test needs a Kafka-protocol broker. \
                 Run the tests with infra/scripts/test (it starts one), or start one with \
                 `infra/scripts/kafka start DIR` and export TEST_KAFKA_BOOTSTRAP=127.0.0.1:19092"
            )
        });
        let prefix = format!("t{}.", uuid_like());
        Bus::Kafka { bootstrap, prefix }
    }

    /// Environment that selects this bus in `digame serve`.
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Bus::Embedded => Vec::new(),
            Bus::Kafka { bootstrap, prefix } => vec![
                ("DIGAME_BUS__URL".into(), format!("kafka://{bootstrap}")),
                ("DIGAME_BUS__TOPIC_PREFIX".into(), prefix.clone()),
            ],
        }
    }
}

/// The ClickHouse server `infra/scripts/test` started (`TEST_CLICKHOUSE_URL`,
/// `TEST_CLICKHOUSE_PASSWORD`), with a database name unique to the test.
#[derive(Clone, Debug)]
pub struct TestClickHouse {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub password: String,
    pub database: String,
}

impl TestClickHouse {
    /// Fails, never skips, when no server is configured.
    pub fn from_env() -> TestClickHouse {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: this test needs a ClickHouse server. Run the tests with \
                     infra/scripts/test (it starts one), or start one with \
                     `infra/scripts/clickhouse start DIR` and export TEST_CLICKHOUSE_URL and \
                     TEST_CLICKHOUSE_PASSWORD (from DIR/password)"
                )
            })
        };
        TestClickHouse {
            url: var("TEST_CLICKHOUSE_URL"),
            password: var("TEST_CLICKHOUSE_PASSWORD"),
            database: format!("t{}", uuid_like()),
        }
    }

    /// `host:port` of the HTTP interface.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Environment that selects this server and database as the store of `digame`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "DIGAME_STORE__URL".into(),
                format!("clickhouse://{}/{}", self.addr(), self.database),
            ),
            (
                "DIGAME_STORE__CLICKHOUSE__PASSWORD".into(),
                self.password.clone(),
            ),
        ]
    }
}

/// A database of the test's own on the PostgreSQL server `infra/scripts/test` started
/// (`TEST_POSTGRES_URL`, a `postgres://user:password@127.0.0.1:port/postgres` URL); returns
/// its URL. Fails, never skips, when no server is configured.
pub async fn postgres_database() -> String {
    use sqlx::Connection;
    let base = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_POSTGRES_URL is not set: this test needs a PostgreSQL server. Run the tests \
             with infra/scripts/test (it starts one), or start one with \
             `infra/scripts/postgres start DIR` and export TEST_POSTGRES_URL=$(cat DIR/url)"
        )
    });
    let name = format!("t{}", uuid_like());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to TEST_POSTGRES_URL: {e}"));
    // The name is generated above (letters and digits), never input.
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create the test database");
    let (server, _) = base.rsplit_once('/').expect("URL ends with /database");
    format!("{server}/{name}")
}

/// A server of a test's own, run by one of the project's scripts (`infra/scripts/kafka`,
/// `infra/scripts/clickhouse`) with its data in `dir`; stopped (by pid) when dropped, even
/// when an assertion fails.
pub struct ScriptServer {
    script: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
}

impl ScriptServer {
    /// Starts `infra/scripts/<name> start DIR PORT`.
    pub fn start(name: &str, dir: &Path, port: u16) -> ScriptServer {
        let s = ScriptServer {
            script: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../infra/scripts")
                .join(name),
            dir: dir.to_path_buf(),
            port,
        };
        s.run("start");
        s
    }

    /// Runs `start` or `stop` again (to restart the server mid-test).
    pub fn run(&self, action: &str) {
        let out = std::process::Command::new(&self.script)
            .arg(action)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.script.display()));
        assert!(
            out.status.success(),
            "{} {action}: {}",
            self.script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ScriptServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// 16 hex digits from the clock and process id; unique enough for test names.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:016x}",
        (nanos as u64) ^ (u64::from(std::process::id()) << 40)
    )
}

/// A running `digame serve`.
pub struct DigameProcess {
    bin: PathBuf,
    /// `serve` or `pipeline`.
    command: &'static str,
    data_dir: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    child: Option<Child>,
}

impl DigameProcess {
    /// Starts `bin serve` on a free port with `data_dir` and extra environment, and waits
    /// until `/healthz` answers.
    pub async fn start(bin: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(bin, data_dir, env, &Bus::Embedded).await
    }

    /// As [`DigameProcess::start`], on `bus`.
    pub async fn start_on(
        bin: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
        bus: &Bus,
    ) -> Result<Self> {
        Self::start_command(bin, "serve", data_dir, env, bus).await
    }

    /// `bin serve` on `bus` and, when given, the ClickHouse store (else the embedded one).
    pub async fn start_backends(
        bin: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
        bus: &Bus,
        store: Option<&TestClickHouse>,
    ) -> Result<Self> {
        let store_env = store.map(TestClickHouse::env).unwrap_or_default();
        let mut all: Vec<(&str, &str)> = env.to_vec();
        all.extend(store_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Self::start_command(bin, "serve", data_dir, &all, bus).await
    }

    /// Starts `bin <command>` (`serve` or `pipeline`) on `bus`.
    pub async fn start_command(
        bin: &Path,
        command: &'static str,
        data_dir: &Path,
        env: &[(&str, &str)],
        bus: &Bus,
    ) -> Result<Self> {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(bus.env())
            .collect();
        provision_readers(&mut env);
        let mut p = DigameProcess {
            bin: bin.to_path_buf(),
            command,
            data_dir: data_dir.to_path_buf(),
            env,
            port: free_port(),
            child: None,
        };
        p.spawn().await?;
        Ok(p)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(self.command)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            // Warnings only, unless the run asks for more (`TEST_DIGAME_LOG=info` shows
            // what each server did, e.g. its consumer group's rebalances).
            .env(
                "DIGAME_LOG_LEVEL",
                std::env::var("TEST_DIGAME_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("spawn digame")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            // `Connection: close`: the probe leaves no idle connection behind to count
            // against the server's connection limits.
            if let Ok(r) = http
                .get(format!("{}/healthz", self.url()))
                .header("connection", "close")
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("digame exited during start-up: {status}");
            }
            if Instant::now() > deadline {
                bail!("digame did not answer /healthz within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:43121`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client using `key` as its bearer credential.
    /// The value of Prometheus sample `name` (with its labels, e.g.
    /// `digame_pipeline_events_total{result="processed"}`), 0 when absent.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url()))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .sum())
    }

    /// A client sending events with `key`. Ingestion keys may only send, so when `key`
    /// is one of the server's configured ingestion keys the client reads (features, SQL,
    /// views) with the service key [`provision_readers`] gave the same tenant; any other
    /// key is used for everything.
    pub fn client(&self, key: &str) -> Client {
        let mut client = self.key_client(key);
        let is_ingest = self.env.iter().any(|(k, v)| {
            k == "DIGAME_INGEST_KEYS"
                && v.split(',')
                    .any(|pair| pair.rsplit_once(':').is_some_and(|(k, _)| k == key))
        });
        if is_ingest {
            client.reader = reader_key(key);
        }
        client
    }

    /// A client using `key` for every request, whatever the key may do.
    pub fn key_client(&self, key: &str) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: self.url(),
            key: key.to_string(),
            reader: key.to_string(),
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = child.id().context("already reaped")?;
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await??)
    }

    /// Starts again on the same data directory and port.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("still running; kill or terminate first");
        }
        self.spawn().await
    }
}

/// The tenant-admin service key the harness provisions beside ingestion key `key`.
pub fn reader_key(key: &str) -> String {
    format!("reader-{key}")
}

/// Adds to `DIGAME_ADMIN_KEYS` a reader key ([`reader_key`]) of the same tenant for each
/// entry of `DIGAME_INGEST_KEYS`, so tests that read back what they sent can.
fn provision_readers(env: &mut Vec<(String, String)>) {
    let readers: Vec<String> = env
        .iter()
        .filter(|(k, _)| k == "DIGAME_INGEST_KEYS")
        .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|pair| {
            let (key, tenant) = pair.trim().rsplit_once(':')?;
            Some(format!("{}:{tenant}", reader_key(key)))
        })
        .collect();
    if readers.is_empty() {
        return;
    }
    match env.iter_mut().find(|(k, _)| k == "DIGAME_ADMIN_KEYS") {
        Some((_, v)) => {
            for r in readers {
                v.push(',');
                v.push_str(&r);
            }
        }
        None => env.push(("DIGAME_ADMIN_KEYS".into(), readers.join(","))),
    }
}

/// An HTTP client bound to one server: `key` sends events, `reader` does the rest.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
    reader: String,
}

/// Status and JSON body of a response (`Value::Null` when the body is not JSON).
pub type Reply = (u16, Value);

/// Asserts an error reply: its status, and that its message contains `needle`.
pub fn assert_refused((status, body): &Reply, want_status: u16, needle: &str) {
    assert_eq!(*status, want_status, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "`{needle}` not in {body}");
}

impl Client {
    async fn reply(r: reqwest::Response) -> Result<Reply> {
        let status = r.status().as_u16();
        let bytes = r.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// `POST /v1/events` with a raw NDJSON body and optional content encoding.
    pub async fn post_events_raw(&self, body: Vec<u8>, encoding: Option<&str>) -> Result<Reply> {
        self.post_raw("/v1/events", Some("application/x-ndjson"), body, encoding)
            .await
    }

    /// `POST path` with a raw body, its declared content type (none when `None`) and
    /// optional content encoding.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        encoding: Option<&str>,
    ) -> Result<Reply> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .body(body);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        Self::reply(req.send().await?).await
    }

    /// `POST /v1/events` with the given events as a JSON array.
    pub async fn post_events(&self, events: &[Value]) -> Result<Reply> {
        self.post_events_raw(serde_json::to_vec(events)?, None)
            .await
    }

    /// `POST /v1/sql`.
    pub async fn sql(&self, sql: &str) -> Result<Reply> {
        let r = self
            .http
            .post(format!("{}/v1/sql", self.base))
            .bearer_auth(&self.reader)
            .json(&serde_json::json!({ "sql": sql }))
            .send()
            .await?;
        Self::reply(r).await
    }

    /// `DELETE` a path under the base URL.
    pub async fn delete(&self, path: &str) -> Result<Reply> {
        let r = self
            .http
            .delete(format!("{}{path}", self.base))
            .bearer_auth(&self.reader)
            .send()
            .await?;
        Self::reply(r).await
    }

    /// `POST` a JSON body to a path under the base URL.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Reply> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    /// `PUT` a JSON body to a path under the base URL.
    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Reply> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    /// A JSON body sent with any method.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Reply> {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.reader)
            .json(body)
            .send()
            .await?;
        Self::reply(r).await
    }

    /// `GET` a path (with query string) under the base URL.
    pub async fn get(&self, path_and_query: &str) -> Result<Reply> {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(&self.reader)
            .send()
            .await?;
        Self::reply(r).await
    }

    /// The pipeline's notices on `/readyz` (damage it met and what it did), once there
    /// is at least one; while the server is not answering yet, it waits.
    pub async fn pipeline_notices(&self, timeout: Duration) -> Result<Vec<String>> {
        eventually(timeout, || async {
            let Ok((_, ready)) = self.get("/readyz").await else {
                return Ok(None);
            };
            let notices: Vec<String> = ready["pipeline"]["notices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect();
            Ok((!notices.is_empty()).then_some(notices))
        })
        .await
    }

    /// `GET` with extra request headers, as the server answered: status, headers and the
    /// body's bytes undecoded (for conditional requests and content encodings).
    pub async fn get_raw(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
        let mut req = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .bearer_auth(&self.reader);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        Ok((status, headers, r.bytes().await?.to_vec()))
    }

    /// Rows of a successful SQL query; fails on an error reply.
    pub async fn rows(&self, sql: &str) -> Result<Vec<Value>> {
        let (status, body) = self.sql(sql).await?;
        if status != 200 {
            bail!("SQL `{sql}` answered {status}: {body}");
        }
        Ok(body["rows"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `sql` until it returns exactly `expected`; on timeout, fails with the rows
    /// it returned last.
    pub async fn await_rows(&self, sql: &str, expected: &[Value], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows(sql).await;
            if matches!(&rows, Ok(r) if r == expected) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("`{sql}` never returned {expected:?}; last: {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Per person, the sum of the daily `event_count` feature.
pub const EVENT_COUNTS_BY_USER: &str = "SELECT user_id, sum(value) AS n FROM features \
    WHERE feature = 'event_count' AND granularity = 'day' AND dimension = '' \
    GROUP BY user_id ORDER BY user_id";

/// Polls the job at `status_url` (as `POST /v1/recompute` answers it) until it succeeds;
/// a failed job, or one not done within `timeout`, is an error.
pub async fn job_succeeded(client: &Client, status_url: &str, timeout: Duration) -> Result<Value> {
    eventually(timeout, || async {
        let (status, job) = client.get(status_url).await?;
        anyhow::ensure!(status == 200 && job["state"] != "failed", "{job}");
        Ok((job["state"] == "succeeded").then_some(job))
    })
    .await
}

/// Polls `probe` until it returns `Some`, or fails after `timeout` with the last value seen.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
