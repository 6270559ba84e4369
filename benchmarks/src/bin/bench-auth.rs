//! What authentication and the security layers add to a request: p50/p99 latency of a
//! cached features read (a precomputed week of hourly features, ~40 KB of JSON) served
//! over HTTP on loopback, once bare and once behind the production stack — request id,
//! tracing, CORS, security headers, body limit, and the `authorize` middleware with its
//! route-table lookup, HS256 access-token verification, revocation check and rate-limit
//! charge. Same handler, same client, requests one after another on a kept-alive
//! connection, alternating in blocks so drift hits both sides alike.
//!
//! ```text
//! cargo run --release -p digame-benchmarks --bin bench-auth -- --requests 20000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::Method;
use axum::routing::get;
use clap::Parser;
use digame_api::auth::tokens::{Claims, TokenKeys};
use digame_api::auth::{Access, AccessTable, Auth, Gate, authorize, rbac::Permission};
use digame_infra::config::{Config, IngestKeys, LimitsConfig, Rate};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Latency the security layers add to a cached features read")]
struct Args {
    /// Requests per side.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
}

const PATH: &str = "/v1/users/{user}/features";

/// A week of hourly windows with a dozen features each, as the features route answers.
fn cached_body() -> bytes::Bytes {
    let windows: Vec<_> = (0..168)
        .map(|h| {
            let features: serde_json::Map<_, _> = (0..12)
                .map(|f| (format!("f{f:02}"), serde_json::json!(h as f64 * 0.5 + f as f64)))
                .collect();
            serde_json::json!({"window_start": 1_795_000_000_000i64 + h * 3_600_000, "features": features})
        })
        .collect();
    serde_json::to_vec(
        &serde_json::json!({"user_id": "u1", "granularity": "hour", "windows": windows}),
    )
    .expect("json")
    .into()
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, app).await.expect("serve");
    });
    format!("http://{addr}/v1/users/u1/features")
}

async fn time_block(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    n: usize,
    out: &mut Vec<Duration>,
) {
    for _ in 0..n {
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let started = Instant::now();
        let resp = req.send().await.expect("request");
        assert!(resp.status().is_success(), "{}", resp.status());
        let _ = resp.bytes().await.expect("body");
        out.push(started.elapsed());
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = cached_body();
    let handler = {
        let body = body.clone();
        move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }
    };
    let bare = serve(Router::new().route(PATH, get(handler.clone()))).await;

    let dir = digame_benchmarks::scratch_dir()?;
    let meta = digame_infra::meta::MetaStore::open("sqlite://", dir.path()).await?;
    let keys = vec![(
        "bench".to_string(),
        "bench-signing-secret-of-32-bytes-or-more".to_string(),
    )];
    let tokens = TokenKeys::new(&keys, 900).map_err(anyhow::Error::msg)?;
    let token = tokens.issue(
        Claims::new("acct", "acme", "member", Some("u1"), "s1"),
        chrono::Utc::now().timestamp(),
    );
    // Limits high enough that the benchmark measures the check, not refusals.
    let wide = Rate {
        per_period: 1_000_000,
        burst: 1_000_000,
    };
    let limits = LimitsConfig {
        per_key: wide.clone(),
        per_account: wide.clone(),
        per_tenant: wide.clone(),
        login: wide,
    };
    let config = Config::default();
    let auth = Auth::new(
        tokens,
        config.auth.clone(),
        &limits,
        &IngestKeys::default(),
        &IngestKeys::default(),
    );
    let mut table = AccessTable::new();
    table.insert(
        PATH.to_string(),
        vec![(Method::GET, Access::Requires(Permission::FeaturesReadSelf))],
    );
    let gate = Gate {
        auth: Arc::new(auth),
        audit: digame_api::auth::audit::AuditLog::start(meta).0,
        table: Arc::new(table),
    };
    let secured = digame_api::security_layers(
        Router::new()
            .route(PATH, get(handler))
            .layer(axum::middleware::from_fn_with_state(gate, authorize)),
        &config,
    );
    let secured = serve(secured).await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()?;
    // Warm both paths (connections, allocator, caches).
    let mut sink = Vec::new();
    time_block(&client, &bare, None, 2_000, &mut sink).await;
    time_block(&client, &secured, Some(&token), 2_000, &mut sink).await;
    let (mut plain, mut authed) = (
        Vec::with_capacity(args.requests),
        Vec::with_capacity(args.requests),
    );
    let block = 1_000;
    for _ in 0..args.requests.div_ceil(block) {
        time_block(&client, &bare, None, block, &mut plain).await;
        time_block(&client, &secured, Some(&token), block, &mut authed).await;
    }
    plain.sort();
    authed.sort();
    println!(
        "cached features read ({} bytes), {} requests per side, loopback HTTP/1.1 keep-alive",
        body.len(),
        plain.len()
    );
    println!(
        "  without auth:  p50 {:>7.1} µs   p99 {:>7.1} µs",
        pct(&plain, 0.50),
        pct(&plain, 0.99)
    );
    println!(
        "  with auth:     p50 {:>7.1} µs   p99 {:>7.1} µs",
        pct(&authed, 0.50),
        pct(&authed, 0.99)
    );
    println!(
        "  added:         p50 {:>7.1} µs   p99 {:>7.1} µs",
        pct(&authed, 0.50) - pct(&plain, 0.50),
        pct(&authed, 0.99) - pct(&plain, 0.99)
    );
    Ok(())
}
