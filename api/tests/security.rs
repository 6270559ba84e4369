//! Identity and security end to end, through the `digame` binary, once with SQLite and
//! once with PostgreSQL as the metadata store: bootstrap, sign-in, token rotation and
//! reuse detection, sign-out, brute-force throttling, roles against every route, a
//! member's and a manager's limits, tenant isolation over every route and id, API-key
//! scopes and revocation, security headers, CORS, and the audit log.

use digame_testkit::{Client, DigameProcess, assert_refused, postgres_database};
use rand::seq::IndexedRandom;
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN_EMAIL: &str = "root@platform.example";
const ADMIN_PASSWORD: &str = "orbit cactus lantern 93 violet";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_on_sqlite_metadata() {
    security("sqlite://".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_on_postgres_metadata() {
    security(postgres_database().await).await;
}

async fn login(c: &Client, email: &str, password: &str) -> (u16, Value) {
    c.post_json(
        "/v1/auth/login",
        &json!({"email": email, "password": password}),
    )
    .await
    .unwrap()
}

/// Signs in and returns a client using the access token, and the refresh token.
async fn signed_in(server: &DigameProcess, email: &str, password: &str) -> (Client, String) {
    let (status, body) = login(&server.client("anonymous"), email, password).await;
    assert_eq!(status, 200, "{body}");
    (
        server.client(body["access_token"].as_str().unwrap()),
        body["refresh_token"].as_str().unwrap().to_string(),
    )
}

/// Creates an account through `POST /v1/accounts` (asserting 201) and returns the answer.
async fn new_account(admin: &Client, email: &str, role: &str, person: Option<&str>) -> Value {
    let (status, body) = admin
        .post_json(
            "/v1/accounts",
            &json!({"email": email, "role": role, "person_id": person}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

async fn security(meta_url: String) {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("DIGAME_META__URL", meta_url.as_str()),
        ("DIGAME_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("DIGAME_AUTH__BOOTSTRAP_EMAIL", ADMIN_EMAIL),
        ("DIGAME_LIMITS__LOGIN__PER_PERIOD", "6"),
        ("DIGAME_LIMITS__LOGIN__BURST", "6"),
        (
            "DIGAME_HTTP__CORS_ORIGINS",
            "[\"https://dash.example.com\"]",
        ),
        ("DIGAME_META__REFRESH_MS", "100"),
    ];
    let server = DigameProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        dir.path(),
        &env,
    )
    .await
    .unwrap();
    let anon = server.client("anonymous");

    // Bootstrap made a platform admin in `default`; sign in, see who we are.
    let (root, refresh1) = signed_in(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (status, me) = root.get("/v1/auth/me").await.unwrap();
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["tenant_id"], "default");
    assert_eq!(me["role"], "platform_admin");

    // Two tenants, each with a tenant admin whose password is returned once.
    let mut admins = Vec::new();
    for t in ["acme", "globex"] {
        let (status, body) = root
            .post_json(
                "/v1/tenants",
                &json!({"tenant_id": t, "name": t, "admin_email": format!("it@{t}.example")}),
            )
            .await
            .unwrap();
        assert_eq!(status, 201, "{body}");
        let pw = body["initial_password"].as_str().unwrap().to_string();
        admins.push(signed_in(&server, &format!("it@{t}.example"), &pw).await.0);
    }
    let (acme, globex) = (&admins[0], &admins[1]);
    // All or nothing: a tenant whose admin address is taken (409) or is not an address
    // (400, the reason named) is not created either; the id stays free.
    for (email, status, word) in [
        ("it@acme.example", 409, "already exists"),
        ("not-an-address", 400, "no `@`"),
    ] {
        let (got, body) = root
            .post_json(
                "/v1/tenants",
                &json!({"tenant_id": "initech", "name": "Initech", "admin_email": email}),
            )
            .await
            .unwrap();
        assert_eq!(got, status, "{body}");
        assert!(body.to_string().contains(word), "{body}");
        let (_, list) = root.get("/v1/tenants").await.unwrap();
        let ids: Vec<&str> = list["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["tenant_id"].as_str())
            .collect();
        assert!(!ids.contains(&"initech"), "{email}: {ids:?}");
    }
    // A tenant admin cannot create tenants.
    let (status, _) = acme
        .post_json(
            "/v1/tenants",
            &json!({"tenant_id": "x", "name": "x", "admin_email": "a@x.example"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 403);

    // People of acme: a manager (person m1, manages m2..m6), a member (m2), an analyst.
    let mut creds = std::collections::HashMap::new();
    for (email, role, person) in [
        ("mgr@acme.example", "manager", Some("m1")),
        ("ana@acme.example", "member", Some("m2")),
        ("bob@acme.example", "analyst", None),
    ] {
        let body = new_account(acme, email, role, person).await;
        creds.insert(
            email,
            body["initial_password"].as_str().unwrap().to_string(),
        );
    }
    // Nobody grants a role above their own.
    let (status, body) = acme
        .post_json(
            "/v1/accounts",
            &json!({"email": "x@acme.example", "role": "platform_admin"}),
        )
        .await
        .unwrap();
    assert_refused(&(status, body), 403, "cannot grant the role platform_admin");
    // A weak chosen password is refused with the reason.
    let reply = acme
        .post_json(
            "/v1/accounts",
            &json!({"email": "y@acme.example", "role": "member", "password": "password1234"}),
        )
        .await
        .unwrap();
    assert_refused(&reply, 400, "too weak");
    for p in ["m2", "m3", "m4", "m5", "m6"] {
        let (status, body) = acme
            .put_json(
                &format!("/v1/users/{p}/profile"),
                &json!({"manager": "m1", "team": "core"}),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (mgr, _) = signed_in(&server, "mgr@acme.example", &creds["mgr@acme.example"]).await;
    let (ana, _) = signed_in(&server, "ana@acme.example", &creds["ana@acme.example"]).await;
    let (bob, _) = signed_in(&server, "bob@acme.example", &creds["bob@acme.example"]).await;

    // A member reads their own features, not a colleague's; an analyst reads anyone's.
    let own = ana.get("/v1/users/m2/features").await.unwrap();
    assert_eq!(own.0, 200, "{}", own.1);
    assert_refused(
        &ana.get("/v1/users/m3/features").await.unwrap(),
        403,
        "only your own",
    );
    assert_refused(
        &ana.get("/v1/users/m3/pattern").await.unwrap(),
        403,
        "only your own",
    );
    assert_refused(
        &mgr.get("/v1/users/m3/features").await.unwrap(),
        403,
        "only your own",
    );
    assert_eq!(bob.get("/v1/users/m3/features").await.unwrap().0, 200);
    // A member cannot see group aggregates; a manager sees their reports' only.
    assert_eq!(
        ana.get("/v1/groups/features?manager=m1").await.unwrap().0,
        403
    );
    assert_eq!(
        mgr.get("/v1/groups/features?manager=m1").await.unwrap().0,
        200
    );
    assert_refused(
        &mgr.get("/v1/groups/features?users=m2,m3,m4,m5,x9")
            .await
            .unwrap(),
        403,
        "people they manage",
    );
    // SQL is for analysts.
    assert_eq!(ana.sql("SELECT 1 AS one").await.unwrap().0, 403);
    assert_eq!(bob.sql("SELECT 1 AS one").await.unwrap().0, 200);

    // Changes to an account apply to the tokens it already holds, from the next request:
    // a demoted analyst's SQL is refused, a relinked member reads the new person and not
    // the old, a disabled account is signed out.
    let mut ids = std::collections::HashMap::new();
    for (email, role, person) in [
        ("carol@acme.example", "analyst", None),
        ("dave@acme.example", "member", Some("m4")),
    ] {
        let body = new_account(acme, email, role, person).await;
        let pw = body["initial_password"].as_str().unwrap().to_string();
        let id = body["account"]["account_id"].as_str().unwrap().to_string();
        ids.insert(email, (id, signed_in(&server, email, &pw).await.0));
    }
    let patch = |email: &str, body: Value| {
        let path = format!("/v1/accounts/{}", ids[email].0);
        async move { acme.send_json(Method::PATCH, &path, &body).await.unwrap() }
    };
    let (carol, dave) = (&ids["carol@acme.example"].1, &ids["dave@acme.example"].1);
    assert_eq!(carol.sql("SELECT 1 AS one").await.unwrap().0, 200);
    let (status, body) = patch("carol@acme.example", json!({"role": "member"})).await;
    assert_eq!(status, 200, "{body}");
    assert_refused(
        &carol.sql("SELECT 1 AS one").await.unwrap(),
        403,
        "the role member does not have",
    );
    assert_eq!(carol.get("/v1/auth/me").await.unwrap().1["role"], "member");
    assert_eq!(dave.get("/v1/users/m4/features").await.unwrap().0, 200);
    let (status, body) = patch("dave@acme.example", json!({"person_id": "m5"})).await;
    assert_eq!(status, 200, "{body}");
    assert_refused(
        &dave.get("/v1/users/m4/features").await.unwrap(),
        403,
        "only your own",
    );
    assert_eq!(dave.get("/v1/users/m5/features").await.unwrap().0, 200);
    let (status, body) = patch("dave@acme.example", json!({"disabled": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_refused(&dave.get("/v1/users/m5/features").await.unwrap(), 401, "");

    // Every route: without credentials 401 (unless public); a member, lacking the
    // permission, 403. The route table is the router's, so no route escapes.
    let table = digame_api::route_table();
    assert!(table.len() >= 40, "{} routes", table.len());
    let member_perms = digame_api::auth::rbac::Role::Member.permissions();
    for (method, path, access) in &table {
        let concrete = path
            .replace("{user}", "m3")
            .replace("{account_id}", "nobody")
            .replace("{key_id}", "nokey")
            .replace("{job_id}", "nojob");
        let (status, body) = anon
            .send_json(method.as_str().parse().unwrap(), &concrete, &json!({}))
            .await
            .unwrap();
        match access {
            digame_api::auth::Access::Public => {
                assert_ne!(status, 401, "{method} {path} is public: {body}")
            }
            digame_api::auth::Access::Requires(p) => {
                assert_eq!(status, 401, "{method} {path} without credentials: {body}");
                if !member_perms.contains(*p) {
                    let (status, body) = ana
                        .send_json(method.as_str().parse().unwrap(), &concrete, &json!({}))
                        .await
                        .unwrap();
                    assert_eq!(status, 403, "{method} {path} as a member: {body}");
                }
            }
        }
    }

    // Tenant isolation: objects of globex, addressed by acme's admin through every route
    // with an id, answer exactly as ids that do not exist.
    let (_, gkey) = globex
        .post_json("/v1/keys", &json!({"name": "globex watcher"}))
        .await
        .unwrap();
    let (_, gacct) = globex
        .post_json(
            "/v1/accounts",
            &json!({"email": "gus@globex.example", "role": "member", "person_id": "g1"}),
        )
        .await
        .unwrap();
    let (_, gjob) = globex
        .post_json(
            "/v1/recompute",
            &json!({"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z"}),
        )
        .await
        .unwrap();
    let globex_ids = [
        ("{key_id}", gkey["key_id"].as_str().unwrap().to_string()),
        (
            "{account_id}",
            gacct["account"]["account_id"].as_str().unwrap().to_string(),
        ),
        ("{job_id}", gjob["job_id"].as_str().unwrap().to_string()),
    ];
    let mut rng = rand::rng();
    for (method, path, _) in table.iter().filter(|(_, p, _)| p.contains("_id}")) {
        for _ in 0..3 {
            let (param, real) = globex_ids.iter().find(|(k, _)| path.contains(k)).unwrap();
            let fake: String = (0..real.len())
                .map(|_| *b"0123456789abcdef".choose(&mut rng).unwrap() as char)
                .collect();
            let body = json!({"disabled": true});
            let m: Method = method.as_str().parse().unwrap();
            let theirs = acme
                .send_json(m.clone(), &path.replace(param, real), &body)
                .await
                .unwrap();
            let missing = acme
                .send_json(m, &path.replace(param, &fake), &body)
                .await
                .unwrap();
            assert_eq!(theirs.0, 404, "{method} {path}: {}", theirs.1);
            assert_eq!(
                theirs.1.to_string().replace(real.as_str(), "ID"),
                missing.1.to_string().replace(fake.as_str(), "ID"),
                "{method} {path}: another tenant's id must read as a missing one"
            );
        }
    }
    // Lists never show another tenant's objects; globex's key and account still work.
    let (_, keys) = acme.get("/v1/keys").await.unwrap();
    assert!(!keys.to_string().contains(gkey["key_id"].as_str().unwrap()));
    let (_, accounts) = acme.get("/v1/accounts").await.unwrap();
    assert!(!accounts.to_string().contains("globex"));
    // globex's person g1 reads as an empty series to acme (no data leaks, nothing tells).
    let (s, theirs) = bob
        .get("/v1/users/g1/features?from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z")
        .await
        .unwrap();
    let (_, nobody) = bob
        .get("/v1/users/zz/features?from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(theirs["windows"], nobody["windows"]);

    // API keys: scoped to a source, shown once, revocable at once.
    let (status, made) = acme
        .post_json("/v1/keys", &json!({"name": "aw only", "sources": ["aw"]}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().unwrap();
    assert!(key.starts_with("dgk_"));
    let (_, listed) = acme.get("/v1/keys").await.unwrap();
    assert!(
        !listed.to_string().contains(&key[20..]),
        "secrets are never listed"
    );
    let collector = server.client(key);
    let now = chrono::Utc::now().timestamp_millis();
    let events = [
        json!({"user_id": "m2", "source": "aw", "kind": "afk", "timestamp": now - 60_000, "duration_ms": 1000, "attributes": {"status": "afk"}}),
        json!({"user_id": "m2", "source": "github", "kind": "afk", "timestamp": now - 60_000, "duration_ms": 1000, "attributes": {"status": "afk"}}),
    ];
    let (status, body) = collector.post_events(&events).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    assert!(
        body["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("source `github` is not allowed")
    );
    // The key may send, nothing else.
    assert_eq!(collector.get("/v1/users/m2/features").await.unwrap().0, 403);
    let (status, _) = acme
        .delete(&format!("/v1/keys/{}", made["key_id"].as_str().unwrap()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_refused(
        &collector.post_events(&events[..1]).await.unwrap(),
        401,
        "revoked",
    );

    // A key of another role, endpoints omitted, may call what its role allows (not only
    // /v1/events), and never more.
    let (status, made) = acme
        .post_json("/v1/keys", &json!({"name": "analysis", "role": "analyst"}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["details"]["endpoints"], json!([]), "{made}");
    let analyst_key = server.key_client(made["key"].as_str().unwrap());
    assert_eq!(
        analyst_key.get("/v1/users/m2/features").await.unwrap().0,
        200
    );
    assert_eq!(analyst_key.get("/v1/keys").await.unwrap().0, 403);

    // Refresh tokens rotate; presenting a spent one revokes the session, and with it the
    // access token and the newest refresh token.
    let (status, rotated) = anon
        .post_json("/v1/auth/refresh", &json!({"refresh_token": refresh1}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{rotated}");
    let refresh2 = rotated["refresh_token"].as_str().unwrap();
    let root2 = server.client(rotated["access_token"].as_str().unwrap());
    assert_eq!(root2.get("/v1/auth/me").await.unwrap().0, 200);
    let reuse = anon
        .post_json("/v1/auth/refresh", &json!({"refresh_token": refresh1}))
        .await
        .unwrap();
    assert_refused(&reuse, 401, "already used");
    assert_refused(&root2.get("/v1/auth/me").await.unwrap(), 401, "session");
    assert_eq!(
        anon.post_json("/v1/auth/refresh", &json!({"refresh_token": refresh2}))
            .await
            .unwrap()
            .0,
        401
    );
    // Sign-out ends the session at once.
    let (root3, _) = signed_in(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(
        root3
            .post_json("/v1/auth/logout", &json!({}))
            .await
            .unwrap()
            .0,
        204
    );
    assert_eq!(root3.get("/v1/auth/me").await.unwrap().0, 401);

    // Forged and foreign tokens.
    for bad in [
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
        "a.b.c",
        "dgk_x_y",
        "plain-guess-0123456789",
    ] {
        assert_eq!(
            server.client(bad).get("/v1/auth/me").await.unwrap().0,
            401,
            "{bad}"
        );
    }

    // Bodies refused before they are read say why with the fitting status: a form post
    // where JSON is expected 415, a body over the limit 413 (neither uses up sign-ins).
    let raw = reqwest::Client::new();
    let reset = format!("{}/v1/auth/password-reset", server.url());
    let form = raw
        .post(&reset)
        .body("email=bob")
        .header("content-type", "application/x-www-form-urlencoded");
    let r = form.send().await.unwrap();
    assert_eq!(r.status(), 415);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
    let huge = format!(r#"{{"email": "{}"}}"#, "a".repeat(3 << 20));
    let r = raw
        .post(&reset)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large", "{body}");
    let long_sql = format!("SELECT 1 AS one -- {}", "x".repeat(100 << 10));
    assert_refused(&bob.sql(&long_sql).await.unwrap(), 413, "body exceeds");

    // Brute force: 6 attempts a minute per address, then 429 with Retry-After.
    let mut last = 0;
    for _ in 0..7 {
        last = login(&anon, "ana@acme.example", "wrong password guess")
            .await
            .0;
    }
    assert_eq!(last, 429);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/auth/login", server.url()))
        .json(&json!({"email": "ana@acme.example", "password": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");

    // Password reset: a single-use token through the file notifier.
    let (status, _) = anon
        .post_json(
            "/v1/auth/password-reset",
            &json!({"email": "bob@acme.example"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 202);
    let outbox: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
        .unwrap()
        .collect();
    assert_eq!(outbox.len(), 1);
    let message = std::fs::read_to_string(outbox[0].as_ref().unwrap().path()).unwrap();
    let token = message
        .lines()
        .find(|l| l.len() == 64 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap();
    let confirm = json!({"token": token, "new_password": "quartz meadow 57 tundra kite"});
    assert_eq!(
        anon.post_json("/v1/auth/password-reset/confirm", &confirm)
            .await
            .unwrap()
            .0,
        204
    );
    assert_eq!(
        anon.post_json("/v1/auth/password-reset/confirm", &confirm)
            .await
            .unwrap()
            .0,
        401
    );
    // The old session of bob ended with the password change.
    assert_eq!(bob.get("/v1/auth/me").await.unwrap().0, 401);
    assert_eq!(
        login(&anon, "bob@acme.example", "quartz meadow 57 tundra kite")
            .await
            .0,
        200
    );

    // Headers on every answer; CORS only for the allowed origin.
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", server.url()))
        .header("origin", "https://dash.example.com")
        .send()
        .await
        .unwrap();
    let h = r.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(
        h["strict-transport-security"]
            .to_str()
            .unwrap()
            .contains("max-age=")
    );
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert_eq!(h["access-control-allow-origin"], "https://dash.example.com");
    assert!(!h["x-request-id"].is_empty());
    let r = reqwest::Client::new()
        .get(format!("{}/healthz", server.url()))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // The audit log: acme's admin sees acme's actions (who, what, where, outcome), and
    // the analyst's read of m3; not globex's; members may not read it.
    let (status, audit) = acme.get("/v1/audit?limit=1000").await.unwrap();
    assert_eq!(status, 200, "{audit}");
    let records = audit["records"].as_array().unwrap();
    let has = |action: &str, outcome: i64| {
        records.iter().any(|r| {
            r["action"] == action && r["outcome"] == outcome && r["source_ip"] == "127.0.0.1"
        })
    };
    assert!(has("POST /v1/accounts", 201));
    assert!(has("POST /v1/accounts", 403));
    assert!(has("DELETE /v1/keys/{key_id}", 200));
    assert!(has("POST /v1/auth/login", 401));
    assert!(
        records
            .iter()
            .any(|r| r["detail"] == "read person-level data of m3"
                && r["action"] == "GET /v1/users/{user}/features")
    );
    assert!(records.iter().all(|r| r["tenant_id"] == "acme"));
    assert!(!audit.to_string().contains("globex watcher"));
    assert_eq!(ana.get("/v1/audit").await.unwrap().0, 403);
}

/// Runs `digame <args>` on `dir` to its end; returns whether it succeeded, and its stdout
/// and stderr.
async fn digame(args: &[&str], dir: &std::path::Path) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_digame"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("DIGAME_LOG_LEVEL", "warn")
        .env_remove("DIGAME_ADMIN_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("digame ends within 60 s")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value printed after `label` on a line of `text`, up to the next space.
fn printed<'a>(text: &'a str, label: &str) -> &'a str {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("`{label}` in {text}"))
        + label.len();
    text[at..].split_whitespace().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_start_creates_nothing_and_a_lost_password_can_be_reset() {
    let dir = tempfile::tempdir().unwrap();
    // A first start on an address already taken stops before it creates anyone.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let (ok, out, err) = digame(&["serve", "--listen", &listen], dir.path()).await;
    assert!(!ok, "{out}{err}");
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
    assert!(!out.contains("First start"), "{out}");
    drop(taken);
    // So the next start is still the first: it creates the admin and shows the password.
    let (ok, out, err) = digame(&["init"], dir.path()).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("First start"), "{out}");
    let first = printed(&out, "admin password:").to_string();

    // The owner lost it: a new one from the command line, the old one refused.
    let (ok, out, err) = digame(&["reset-password"], dir.path()).await;
    assert!(ok, "{out}{err}");
    let new = printed(&out, "new password:").to_string();
    assert_ne!(new, first);
    let (ok, _, err) = digame(
        &["reset-password", "--email", "nobody@example.com"],
        dir.path(),
    )
    .await;
    assert!(
        !ok && err.contains("no account has the email `nobody@example.com`"),
        "{err}"
    );
    let server = DigameProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_digame")),
        dir.path(),
        &[],
    )
    .await
    .unwrap();
    let anon = server.client("anonymous");
    let email = "admin@digame.local";
    assert_eq!(login(&anon, email, &first).await.0, 401);
    let (status, body) = login(&anon, email, &new).await;
    assert_eq!(status, 200, "{body}");
}
