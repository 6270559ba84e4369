//! HTTP ingest into the durable embedded bus: batched NDJSON of ~300-byte events posted
//! over several keep-alive connections to a Digame server in its own process, which
//! answers only after the batch is fsynced.
//!
//! The server is this same executable re-run as `serve-child` (the `digame serve` code
//! path: `digame_api::Server`), so its CPU time can be read from `/proc` apart from the
//! load generator's. The figure per core is events per server CPU-second.
//!
//! With `--kafka HOST:PORT` the server publishes to Kafka instead, and the same payloads
//! are then pushed by a plain rdkafka producer (same settings, same batching: 5,000 records
//! awaited together, as one HTTP request is) for comparison; the ratio is the overhead of
//! HTTP, validation and re-encoding.
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-ingest -- --seconds 10
//! cargo run --release -p digame-benchmarks --bin bench-ingest -- --kafka 127.0.0.1:19092
//! ```

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use digame_benchmarks::{
    event_id_offsets, ndjson_bodies, process_cpu, quantile, stamp_event_ids, thousands,
};

/// The allocator: the pipeline and ingest allocate many small, short-lived strings, which
/// glibc's malloc serves markedly slower.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "bench-key-0123456789abcdef";

#[derive(Parser)]
#[command(about = "HTTP ingest → durable bus throughput")]
struct Cli {
    #[command(subcommand)]
    child: Option<Child>,
    /// Measured duration in seconds (after a one-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Events per request.
    #[arg(long, default_value_t = 5000)]
    batch: usize,
    /// Distinct people the events belong to.
    #[arg(long, default_value_t = 1000)]
    users: u64,
    /// Also run the feature pipeline in the server (as `digame serve` does).
    #[arg(long)]
    pipeline: bool,
    /// Publish to this Kafka bootstrap address instead of the embedded log.
    #[arg(long)]
    kafka: Option<String>,
    /// Turn the cross-request idempotency index off (`ingest.idempotency_index = false`).
    #[arg(long)]
    no_idempotency_index: bool,
}

#[derive(Subcommand)]
enum Child {
    /// Internal: run the server and print its address.
    #[command(hide = true)]
    ServeChild {
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long)]
        pipeline: bool,
        #[arg(long)]
        bus: Option<String>,
        #[arg(long)]
        no_idempotency_index: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.child {
        Some(Child::ServeChild {
            data_dir,
            pipeline,
            bus,
            no_idempotency_index,
        }) => serve_child(data_dir, pipeline, bus, !no_idempotency_index),
        None => run(cli),
    }
}

fn serve_child(
    data_dir: std::path::PathBuf,
    pipeline: bool,
    bus: Option<String>,
    idempotency_index: bool,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut config = digame_infra::config::Config {
            data_dir,
            listen: "127.0.0.1:0".parse()?,
            ..Default::default()
        };
        config.ingest.keys = digame_infra::config::IngestKeys::parse(&format!("{KEY}:bench"))
            .map_err(anyhow::Error::msg)?;
        config.pipeline.enabled = pipeline;
        config.ingest.idempotency_index = idempotency_index;
        if let Some(url) = bus {
            config.bus.url = url;
            config.bus.topic_prefix = format!("bench{}.", std::process::id());
        }
        let server = digame_api::Server::start(config).await?;
        println!("listening {}", server.addr);
        // Runs until the parent closes stdin.
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin()
                .read_line(&mut sink)
                .map(|n| n > 0)
                .unwrap_or(false)
            {}
        })
        .await?;
        server.shutdown().await;
        Ok(())
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let data = digame_benchmarks::scratch_dir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve-child", "--data-dir"])
        .arg(data.path())
        .args(cli.pipeline.then_some("--pipeline"))
        .args(cli.no_idempotency_index.then_some("--no-idempotency-index"))
        .args(
            cli.kafka
                .iter()
                .flat_map(|k| ["--bus".to_string(), format!("kafka://{k}")]),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the server process")?;
    let pid = child.id();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("child stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("server did not start: {line:?}"))?
        .to_string();

    // Bodies are built before the clock starts; each request sends a copy with its own
    // round of event ids, so every event is new to the server (not a retry).
    let base_ms = chrono::Utc::now().timestamp_millis() - 6 * 3_600_000;
    let bodies_n = 64;
    let (bodies, mean_size) = ndjson_bodies(bodies_n, cli.batch, cli.users, base_ms);
    let bodies: Arc<Vec<bytes::Bytes>> =
        Arc::new(bodies.into_iter().map(bytes::Bytes::from).collect());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(load(&cli, &addr, bodies.clone(), pid));
    drop(child.stdin.take());
    let _ = child.wait();
    let r = result?;

    let secs = r.elapsed.as_secs_f64();
    let eps = r.events as f64 / secs;
    let server_cores = r.server_cpu.as_secs_f64() / secs;
    let per_core = r.events as f64 / r.server_cpu.as_secs_f64().max(1e-9);
    let mut lat = r.latencies;
    println!(
        "ingest: HTTP NDJSON -> {}, pipeline {}, idempotency index {}",
        match &cli.kafka {
            Some(k) => format!("Kafka at {k} (acks=all before 2xx)"),
            None => "embedded log bus (fsync before 2xx)".into(),
        },
        if cli.pipeline { "on" } else { "off" },
        if cli.no_idempotency_index {
            "off"
        } else {
            "on"
        }
    );
    println!(
        "  load          {} events in {secs:.1} s; {mean_size:.0} B/event, {} events/request, {} connections, {} people",
        thousands(r.events as f64),
        cli.batch,
        cli.connections,
        cli.users
    );
    println!(
        "  throughput    {} events/s ({:.1} MB/s of request bodies)",
        thousands(eps),
        eps * mean_size / 1e6
    );
    println!(
        "  server CPU    {server_cores:.2} cores busy -> {} events per CPU-second (per core)",
        thousands(per_core)
    );
    println!(
        "  load gen CPU  {:.2} cores (same machine)",
        r.client_cpu.as_secs_f64() / secs
    );
    println!(
        "  request       p50 {:.1} ms, p99 {:.1} ms ({} requests)",
        quantile(&mut lat, 0.5).as_secs_f64() * 1e3,
        quantile(&mut lat, 0.99).as_secs_f64() * 1e3,
        lat.len()
    );
    if r.pipeline_events > 0.0 {
        println!(
            "  pipeline      {} events/s consumed and processed meanwhile",
            thousands(r.pipeline_events / secs)
        );
    }
    if let Some(bootstrap) = &cli.kafka {
        // The same topic the server wrote to (created by it, with its partitions).
        let topic = format!("bench{pid}.events");
        let plain = rt.block_on(plain_producer(&cli, bootstrap, &topic, &bodies))?;
        println!(
            "  plain rdkafka {} events/s, same payloads and producer settings, {} in flight",
            thousands(plain),
            cli.connections
        );
        println!(
            "  ratio         {:.2} (HTTP ingest / plain producer)",
            eps / plain
        );
    }
    Ok(())
}

/// Key and payload of one record.
type KeyedRecord = (Vec<u8>, bytes::Bytes);

/// Events/s of a bare rdkafka producer sending the NDJSON lines of `bodies` as records
/// (keyed tenant:user), `batch` at a time awaited together, `connections` batches in
/// flight, for the same duration.
async fn plain_producer(
    cli: &Cli,
    bootstrap: &str,
    topic: &str,
    bodies: &[bytes::Bytes],
) -> anyhow::Result<f64> {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = topic.to_string();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.messages", "500000")
        .set("partitioner", "murmur2_random")
        .create()?;
    // Records as the collector would publish them: one event each, keyed by person.
    let batches: Arc<Vec<Vec<KeyedRecord>>> = Arc::new(
        bodies
            .iter()
            .map(|body| {
                body.split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(|line| {
                        let v: serde_json::Value =
                            serde_json::from_slice(line).expect("bench bodies are JSON");
                        let key = format!("bench:{}", v["user_id"].as_str().unwrap_or(""));
                        (key.into_bytes(), body.slice_ref(line))
                    })
                    .collect()
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..cli.connections {
        let (producer, topic, batches) = (producer.clone(), topic.clone(), batches.clone());
        let (stop, sent) = (stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let batch = &batches[i % batches.len()];
                i += 7;
                let mut pending = Vec::with_capacity(batch.len());
                for (key, payload) in batch {
                    let rec = FutureRecord::to(&topic).key(key).payload(payload.as_ref());
                    match producer.send_result(rec) {
                        Ok(f) => pending.push(f),
                        Err((e, _)) => anyhow::bail!("produce: {e}"),
                    }
                }
                for f in futures::future::join_all(pending).await {
                    match f {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => anyhow::bail!("delivery failed: {e}"),
                        Err(_) => anyhow::bail!("delivery canceled"),
                    }
                }
                sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(cli.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in tasks {
        t.await??;
    }
    Ok(sent.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

struct LoadResult {
    events: u64,
    elapsed: Duration,
    server_cpu: Duration,
    client_cpu: Duration,
    latencies: Vec<Duration>,
    /// Events the server's pipeline took during the measurement.
    pipeline_events: f64,
}

/// Sum of the pipeline's event counters on the server's `/metrics`.
async fn pipeline_events(http: &reqwest::Client, addr: &str) -> f64 {
    let Ok(resp) = http.get(format!("http://{addr}/metrics")).send().await else {
        return 0.0;
    };
    resp.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("digame_pipeline_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn load(
    cli: &Cli,
    addr: &str,
    bodies: Arc<Vec<bytes::Bytes>>,
    pid: u32,
) -> anyhow::Result<LoadResult> {
    let url = format!("http://{addr}/v1/events");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cli.connections)
        .build()?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    // Requests sent so far: request n sends body n % len with id round n / len.
    let sent = Arc::new(AtomicUsize::new(0));
    let offsets: Arc<Vec<Vec<usize>>> =
        Arc::new(bodies.iter().map(|b| event_id_offsets(b)).collect());
    let mut tasks = Vec::new();
    for _ in 0..cli.connections {
        let (http, url, bodies) = (http.clone(), url.clone(), bodies.clone());
        let (measuring, stop, events) = (measuring.clone(), stop.clone(), events.clone());
        let (offsets, sent) = (offsets.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let which = n % bodies.len();
                let mut body = bodies[which].to_vec();
                stamp_event_ids(&mut body, &offsets[which], (n / bodies.len()) as u32);
                let started = Instant::now();
                let resp = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await?;
                let status = resp.status();
                let reply: serde_json::Value = resp.json().await?;
                if status != 200 || reply["rejected"].as_array().is_some_and(|r| !r.is_empty()) {
                    bail!("ingest answered {status}: {reply}");
                }
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed());
                    events.fetch_add(reply["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            }
            Ok(latencies)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (server0, client0) = (process_cpu(pid)?, process_cpu(std::process::id())?);
    let pipeline0 = pipeline_events(&http, addr).await;
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(cli.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let (server1, client1) = (process_cpu(pid)?, process_cpu(std::process::id())?);
    let pipeline1 = pipeline_events(&http, addr).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(LoadResult {
        events: events.load(Ordering::Relaxed),
        elapsed,
        server_cpu: server1 - server0,
        client_cpu: client1 - client0,
        latencies,
        pipeline_events: pipeline1 - pipeline0,
    })
}
