//! The `digame` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use digame_api::simulate::{self, SimulationSpec, generate};
use digame_api::{Role, Server};
use digame_infra::config::Config;
use digame_infra::telemetry::init_logging;
use futures::StreamExt;
use serde::Serialize;

/// The allocator: the pipeline and ingest allocate many small, short-lived strings, which
/// glibc's malloc serves markedly slower.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Digame: real-time workplace analytics.
#[derive(Parser)]
#[command(name = "digame", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process on the embedded bus and store.
    Serve(ServeArgs),
    /// Run a pipeline worker on a shared bus (Kafka); workers of one deployment form a
    /// consumer group and split the partitions.
    Pipeline(ServeArgs),
    /// Send realistic synthetic activity to a running server.
    Simulate(SimulateArgs),
    /// Create (when missing) or describe the Kafka topics of `--bus kafka://…`.
    #[command(subcommand)]
    Topics(TopicsAction),
    /// Apply the pending schema migrations of the metadata store and of the
    /// `--store clickhouse://…` database (re-running is a no-op), print what was applied,
    /// and exit.
    Migrate(ServeArgs),
    /// Delete every row of one person from the ClickHouse store (a privacy request) and
    /// print what was removed per table.
    DeletePerson(DeletePersonArgs),
    /// Delete a tenant's rows older than `--keep-days` from the ClickHouse store and print
    /// what was removed per table.
    Retention(RetentionArgs),
    /// Print the JSON Schema of the wire event.
    Schema,
    /// Print the effective configuration as TOML (secrets redacted) and exit.
    Config(ServeArgs),
    /// Check every segment of the embedded log and every Parquet file of the embedded
    /// store, read-only, and print a JSON report; exits 2 when something is damaged. For a
    /// stopped server or a backup.
    Scrub(ServeArgs),
    /// Copy the embedded data (metadata, checkpoints, store, bus) of a running or stopped
    /// server into a new directory, consistently, with a manifest of checksums; print a
    /// summary. Kafka, ClickHouse and PostgreSQL are named as skipped.
    Backup(BackupArgs),
    /// Verify a backup and bring it back into the configured data directory, which must
    /// hold no data yet; then scrub the result. Start `serve` on it to replay the rest.
    Restore(RestoreArgs),
    /// Prepare the metadata store: apply migrations, store the role catalogue and, on a
    /// fresh installation, create the tenant `default`, its first platform admin (password
    /// from DIGAME_ADMIN_PASSWORD, else generated) and an ingestion key, shown once.
    Init(ServeArgs),
    /// Set a new password for an account of the metadata store (by default the first
    /// admin, `auth.bootstrap_email`): from DIGAME_ADMIN_PASSWORD, else generated and
    /// printed once. Every session of the account is revoked. For an owner who lost the
    /// password printed at first start.
    ResetPassword(ResetPasswordArgs),
}

#[derive(clap::Args)]
struct ResetPasswordArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The account's email [default: auth.bootstrap_email, the first admin].
    #[arg(long)]
    email: Option<String>,
}

/// Flags of `serve`; each also comes from the config file and `DIGAME_*` variables.
#[derive(clap::Args, Serialize)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "DIGAME_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080; env DIGAME_LISTEN].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./data; env DIGAME_DATA_DIR].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Event bus: file:// (embedded) or kafka://host:port[,host:port…] [env DIGAME_BUS__URL].
    #[arg(long)]
    #[serde(skip)]
    bus: Option<String>,
    /// Store: file:// (embedded Parquet) or clickhouse://host:port/database (HTTP port)
    /// [env DIGAME_STORE__URL].
    #[arg(long)]
    #[serde(skip)]
    store: Option<String>,
    /// Log format: text or json [env DIGAME_LOG_FORMAT].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create the topics that do not exist yet (partitions, replication, retention from
    /// the configuration), then describe them.
    Create(ServeArgs),
    /// Show each topic's partitions and retained records.
    Describe(ServeArgs),
}

#[derive(clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Directory to create the backup in (must not exist or be empty).
    #[arg(long)]
    to: PathBuf,
}

#[derive(clap::Args)]
struct RestoreArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Directory of a finished backup.
    #[arg(long)]
    from: PathBuf,
}

#[derive(clap::Args)]
struct DeletePersonArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The person's tenant.
    #[arg(long)]
    tenant: String,
    /// The person's pseudonymous id.
    #[arg(long)]
    user: String,
}

#[derive(clap::Args)]
struct RetentionArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The tenant whose old data goes.
    #[arg(long)]
    tenant: String,
    /// Days of data kept; older rows are deleted [default: the tenant's
    /// `store.retention_days`].
    #[arg(long)]
    keep_days: Option<u32>,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Ingestion key (as for `Authorization: Bearer`), as printed by the first start or
    /// created with `POST /v1/keys`.
    #[arg(long, env = "DIGAME_KEY")]
    key: String,
    /// Number of people.
    #[arg(long, default_value_t = 20)]
    people: usize,
    /// Number of days, ending today.
    #[arg(long, default_value_t = 7)]
    days: u32,
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Generate up to this instant (RFC 3339, e.g. 2026-11-29T21:00:00Z) instead of now:
    /// the same seed and instant give the same events whenever the command runs. The
    /// server's `ingest.horizon_days` must reach back to the first day.
    #[arg(long, value_parser = parse_instant)]
    until: Option<i64>,
    /// Events per request.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

/// What `backup` and `restore` print: the manifest without its file list.
fn backup_summary(m: &digame_infra::backup::Manifest) -> serde_json::Value {
    serde_json::json!({
        "files": m.files.len(),
        "bytes": m.files.iter().map(|f| f.bytes).sum::<u64>(),
        "started_ms": m.started_ms,
        "finished_ms": m.finished_ms,
        "store_files_replaced": m.store_files_replaced,
        "skipped": m.skipped,
    })
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref(), args)
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    if let Some(url) = &args.bus {
        config.bus.url = url.clone();
    }
    if let Some(url) = &args.store {
        config.store.url = url.clone();
    }
    config
        .bus_backend()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    config
        .store_backend()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Pipeline(args) => pipeline(args).await,
        Command::Topics(action) => topics(action).await,
        Command::Migrate(args) => migrate(args).await,
        Command::DeletePerson(args) => {
            let what = digame_infra::store::Deletion::Person(&args.user);
            delete(&args.serve, &args.tenant, what).await
        }
        Command::Retention(args) => {
            let config = load_config(&args.serve)?;
            let days = retention_days(&config, &args.tenant, args.keep_days)?;
            let cutoff = digame_schemas::EventTime(
                digame_schemas::EventTime::now().0 - i64::from(days) * 86_400_000,
            );
            let what = digame_infra::store::Deletion::Before(cutoff);
            delete(&args.serve, &args.tenant, what).await
        }
        Command::Simulate(args) => simulate(args).await,
        Command::Scrub(args) => {
            let config = load_config(&args)?;
            let (bus, store) = (config.bus_dir(), config.store_dir());
            let report = tokio::task::spawn_blocking(move || {
                let bus = bus.unwrap_or_default();
                let store = store.unwrap_or_default();
                digame_infra::scrub::scrub(&bus, &store)
            })
            .await??;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.clean() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Backup(args) => {
            let config = load_config(&args.serve)?;
            let layout = digame_infra::backup::Layout::of(&config)
                .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
            let manifest = digame_infra::backup::backup(&layout, &args.to).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&backup_summary(&manifest))?
            );
            Ok(())
        }
        Command::Restore(args) => {
            let config = load_config(&args.serve)?;
            let layout = digame_infra::backup::Layout::of(&config)
                .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
            let from = args.from.clone();
            let (manifest, report) = tokio::task::spawn_blocking(move || {
                let manifest = digame_infra::backup::restore(&from, &layout)?;
                let report = digame_infra::scrub::scrub(
                    layout.bus.as_deref().unwrap_or(Path::new("")),
                    layout.store.as_deref().unwrap_or(Path::new("")),
                )?;
                anyhow::Ok((manifest, report))
            })
            .await??;
            let mut out = backup_summary(&manifest);
            out["scrub"] = serde_json::to_value(&report)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            if !report.clean() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&digame_schemas::event_json_schema())?
            );
            Ok(())
        }
        Command::Init(args) => {
            let config = load_config(&args)?;
            init_logging(config.log_format, &config.log_level);
            let meta =
                digame_infra::meta::MetaStore::open(&config.meta.url, &config.data_dir).await?;
            let done = digame_api::auth::handlers::bootstrap(
                &meta,
                &config.auth,
                std::env::var("DIGAME_ADMIN_PASSWORD").ok(),
            )
            .await?;
            match done {
                Some(b) => print_bootstrap(&b),
                None => println!(
                    "already initialized: accounts exist in {}; roles and permissions are up to date",
                    digame_infra::meta::redact_url(&config.meta.url)
                ),
            }
            Ok(())
        }
        Command::ResetPassword(args) => {
            let config = load_config(&args.serve)?;
            init_logging(config.log_format, &config.log_level);
            let meta =
                digame_infra::meta::MetaStore::open(&config.meta.url, &config.data_dir).await?;
            let email = args
                .email
                .unwrap_or_else(|| config.auth.bootstrap_email.clone());
            let given = std::env::var("DIGAME_ADMIN_PASSWORD").ok();
            let generated =
                digame_api::auth::handlers::reset_password(&meta, &email, given).await?;
            println!("Password of {email} replaced; its sessions are revoked.");
            match generated {
                Some(p) => println!("  new password: {p}   (shown only now)"),
                None => println!("  new password: as set in DIGAME_ADMIN_PASSWORD"),
            }
            Ok(())
        }
        Command::Config(args) => {
            let cfg = load_config(&args)?;
            // TOML, so what it prints can be saved as a config file and edited.
            print!("{}", cfg.to_redacted_toml().map_err(anyhow::Error::msg)?);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    init_logging(config.log_format, &config.log_level);
    let mut server = Server::start(config).await?;
    if let Some(b) = server.bootstrapped.take() {
        print_bootstrap(&b);
    }
    run_until_signal(server, "digame listening on").await
}

/// Shows what a fresh installation was given — on the terminal, never through the log
/// pipeline, and only this once.
fn print_bootstrap(b: &digame_api::auth::handlers::Bootstrapped) {
    println!("First start: created tenant `default` and its platform admin.");
    println!("  admin email:    {}", b.email);
    match &b.generated_password {
        Some(p) => println!(
            "  admin password: {p}   (shown only now; change it with POST /v1/auth/password)"
        ),
        None => println!("  admin password: as set in DIGAME_ADMIN_PASSWORD"),
    }
    println!(
        "  ingestion key:  {}   (shown only now; for collectors: Authorization: Bearer <key>)",
        b.ingest_key
    );
    let _ = std::io::stdout().flush();
}

async fn pipeline(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    init_logging(config.log_format, &config.log_level);
    let server = Server::start_role(config, Role::Pipeline).await?;
    run_until_signal(server, "digame pipeline worker; health on").await
}

async fn topics(action: TopicsAction) -> anyhow::Result<()> {
    let (TopicsAction::Create(args) | TopicsAction::Describe(args)) = &action;
    let config = load_config(args)?;
    let digame_infra::config::BusBackend::Kafka { brokers } =
        config.bus_backend().map_err(anyhow::Error::msg)?
    else {
        anyhow::bail!("`digame topics` manages Kafka topics; pass --bus kafka://host:port");
    };
    let bus = match action {
        TopicsAction::Create(_) => {
            let bus = digame_infra::bus::connect_kafka(&config, brokers).await?;
            println!("topics present (created where missing):");
            bus
        }
        TopicsAction::Describe(_) => {
            digame_infra::bus::KafkaBus::new(digame_infra::bus::kafka_settings(&config, brokers))?
        }
    };
    for t in bus.describe().await? {
        println!(
            "{:<32} partitions {:>3}   records {:>12}",
            t.name, t.partitions, t.records
        );
    }
    Ok(())
}

/// Days `tenant` keeps: `explicit`, else its configured retention.
fn retention_days(config: &Config, tenant: &str, explicit: Option<u32>) -> anyhow::Result<u32> {
    explicit
        .or_else(|| config.store.retention_days.get(tenant).copied())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no retention configured for tenant `{tenant}`; pass --keep-days N or set store.retention_days.{tenant}"
            )
        })
}

/// The ClickHouse settings of `--store`, or `None` for the embedded store.
fn clickhouse_settings(
    args: &ServeArgs,
) -> anyhow::Result<Option<digame_infra::store::clickhouse::ClickHouseSettings>> {
    let config = load_config(args)?;
    init_logging(config.log_format, &config.log_level);
    let digame_infra::config::StoreBackend::ClickHouse { url, database } =
        config.store_backend().map_err(anyhow::Error::msg)?
    else {
        return Ok(None);
    };
    Ok(Some(digame_infra::store::clickhouse::ClickHouseSettings {
        url,
        database,
        config: config.store.clickhouse.clone(),
    }))
}

async fn migrate(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let meta = digame_infra::meta::MetaStore::open(&config.meta.url, &config.data_dir).await?;
    let versions = meta.migrate().await?;
    println!(
        "metadata store {}: migrations {versions:?} applied",
        digame_infra::meta::redact_url(&config.meta.url)
    );
    let Some(settings) = clickhouse_settings(&args)? else {
        println!(
            "the embedded store needs no migrations (pass --store clickhouse://… to migrate ClickHouse)"
        );
        return Ok(());
    };
    let report = digame_infra::store::clickhouse::migrate(&settings).await?;
    println!(
        "ClickHouse {}/{}: applied {:?}, already applied {:?}",
        settings.url, settings.database, report.applied, report.unchanged
    );
    Ok(())
}

async fn delete(
    args: &ServeArgs,
    tenant: &str,
    what: digame_infra::store::Deletion<'_>,
) -> anyhow::Result<()> {
    let Some(settings) = clickhouse_settings(args)? else {
        anyhow::bail!(
            "deletion and retention work on the ClickHouse store in this build; pass --store clickhouse://host:port/database"
        );
    };
    let report = digame_infra::store::clickhouse::delete(
        &settings.client(),
        tenant,
        &what,
        std::time::Duration::from_secs(300),
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Announces `server`, then drains and stops it on SIGINT or SIGTERM.
async fn run_until_signal(server: Server, banner: &str) -> anyhow::Result<()> {
    println!("{banner} http://{}", server.addr);
    let _ = std::io::stdout().flush();
    wait_for_signal().await;
    tracing::info!("shutdown requested; draining");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Writes the simulated people's profiles and waits until the pipeline uses them. `None`
/// when the key may not write profiles (an ingestion key).
async fn write_profiles(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    people: usize,
) -> anyhow::Result<Option<usize>> {
    let mut newest = 0i64;
    for i in 0..people {
        let resp = client
            .put(format!("{base}/v1/users/{}/profile", simulate::user_id(i)))
            .bearer_auth(key)
            .json(&simulate::profile_of(i, people))
            .send()
            .await?;
        let status = resp.status();
        if status == reqwest::StatusCode::FORBIDDEN {
            return Ok(None);
        }
        let body: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "writing a profile: {status}: {body}");
        newest = newest.max(body["revision"].as_i64().unwrap_or(0));
    }
    // The pipeline follows the metadata store every `meta.refresh_ms`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ready: serde_json::Value = client
            .get(format!("{base}/readyz"))
            .send()
            .await?
            .json()
            .await?;
        if ready["pipeline"]["settings_revision"].as_i64().unwrap_or(0) >= newest {
            return Ok(Some(people));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the pipeline did not take up the profiles within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// An RFC 3339 instant as milliseconds since the epoch.
fn parse_instant(text: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            format!("`{text}` is not an RFC 3339 instant ({e}); write e.g. 2026-11-29T21:00:00Z")
        })
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let key = args.key;
    let spec = SimulationSpec {
        people: args.people,
        days: args.days,
        seed: args.seed,
        until_ms: args
            .until
            .unwrap_or(digame_schemas::EventTime::now().0 - 60_000),
    };
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/').to_string();
    // Profiles first, so every day is computed in its person's zone and working hours.
    match write_profiles(&client, &base, &key, args.people).await? {
        Some(n) => println!("wrote {n} profiles (teams of 5, managers, time zones, working hours)"),
        None => println!(
            "profiles not written: this key may not write profiles; pass a tenant_admin key \
             (POST /v1/keys with \"role\": \"tenant_admin\") to give the people teams, \
             managers and time zones for the group views"
        ),
    }
    let events = generate(&spec);
    let bar = indicatif::ProgressBar::new(events.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec})",
    )?);
    let url = format!("{base}/v1/events");
    let batches: Vec<Vec<u8>> = events
        .chunks(args.batch.max(1))
        .map(|chunk| {
            let mut nd = Vec::new();
            for e in chunk {
                serde_json::to_writer(&mut nd, e).expect("json");
                nd.push(b'\n');
            }
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&nd).expect("in-memory gzip");
            gz.finish().expect("in-memory gzip")
        })
        .collect();
    let sizes: Vec<usize> = events.chunks(args.batch.max(1)).map(|c| c.len()).collect();
    let results = futures::stream::iter(batches.into_iter().zip(sizes))
        .map(|(body, n)| {
            let client = client.clone();
            let url = url.clone();
            let key = key.clone();
            let bar = bar.clone();
            async move {
                let resp = client
                    .post(&url)
                    .bearer_auth(key)
                    .header("content-type", "application/x-ndjson")
                    .header("content-encoding", "gzip")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let body: serde_json::Value = resp.json().await?;
                bar.inc(n as u64);
                anyhow::ensure!(status.is_success(), "server answered {status}: {body}");
                Ok::<_, anyhow::Error>(body)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    bar.finish();
    let mut accepted = 0u64;
    let mut rejected = 0u64;
    for r in results {
        let body = r?;
        accepted += body["accepted"].as_u64().unwrap_or(0);
        rejected += body["rejected"].as_array().map_or(0, |a| a.len() as u64);
    }
    println!(
        "sent {} events for {} people over {} days: {accepted} accepted, {rejected} rejected",
        events.len(),
        args.people,
        args.days
    );
    Ok(())
}
