//! The metadata store on both backends — a real SQLite file and a real PostgreSQL server
//! (started by `infra/scripts/test`) — with one body per test: migrations, settings and
//! profiles with their revisions, change following, jobs, refusal of invalid content, and
//! the identity records (tenants, accounts, sessions, keys, resets, audit).

use std::path::Path;

use digame_infra::meta::identity::{
    AccountChange, ApiKeyRecord, AuditQuery, AuditRecord, NewAccount, RefreshOutcome, digest,
};
use digame_infra::meta::{JobState, MetaError, MetaStore};

/// Runs each named body (`async fn(url, dir)`) once on SQLite and once on PostgreSQL.
macro_rules! on_both_backends {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                super::$body("sqlite://".into(), dir.path()).await;
            }
            #[tokio::test]
            async fn postgres() {
                let dir = tempfile::tempdir().unwrap();
                super::$body(digame_testkit::postgres_database().await, dir.path()).await;
            }
        }
    )*};
}

on_both_backends!(
    settings_and_profiles_round_trip_and_changes_follow_commit_order,
    invalid_settings_and_profiles_are_refused_with_the_field_named,
    jobs_record_progress_and_are_tenant_scoped,
    released_groups_are_recorded_once_per_tenant,
    accounts_are_unique_by_email_and_tenant_scoped,
    refresh_tokens_rotate_once_and_reuse_revokes_the_family,
    api_keys_are_stored_as_digests_and_followed,
    password_resets_are_single_use_and_expire,
    audit_log_is_append_only_and_tenant_scoped,
    event_ids_name_one_event_per_tenant,
    read_invalidations_follow_in_commit_order,
);
use digame_schemas::profile::{PersonProfile, TenantSettings};

/// The SQLite file holds password hashes and key digests: a new one is its owner's alone;
/// one its owner made keeps their mode.
#[cfg(unix)]
#[tokio::test]
async fn a_new_sqlite_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    meta.create_tenant("acme", "Acme").await.unwrap();
    assert_eq!(mode(&dir.path().join("meta.db")), 0o600);
    for side in ["meta.db-wal", "meta.db-shm"] {
        let p = dir.path().join(side);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{side}");
        }
    }

    let own = dir.path().join("shared.db");
    std::fs::write(&own, b"").unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o640)).unwrap();
    let url = format!("sqlite://{}", own.display());
    MetaStore::open(&url, dir.path()).await.unwrap();
    assert_eq!(mode(&own), 0o640);
}

fn profile(team: &str, tz: &str) -> PersonProfile {
    PersonProfile {
        timezone: Some(tz.into()),
        team: Some(team.into()),
        ..PersonProfile::default()
    }
}

async fn settings_and_profiles_round_trip_and_changes_follow_commit_order(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    assert!(meta.settings("acme").await.unwrap().is_none());
    assert!(meta.profile("acme", "ana").await.unwrap().is_none());

    let settings = TenantSettings {
        afk_timeout_secs: 300,
        ..TenantSettings::default()
    };
    let s = meta.put_settings("acme", &settings).await.unwrap();
    assert_eq!(s.revision, 1);
    let p1 = meta
        .put_profile("acme", "ana", &profile("core", "Europe/Berlin"))
        .await
        .unwrap();
    let p2 = meta
        .put_profile("globex", "ana", &profile("ops", "America/New_York"))
        .await
        .unwrap();
    assert_eq!((p1.revision, p2.revision), (2, 3));

    let read = meta.settings("acme").await.unwrap().unwrap();
    assert_eq!(read.value, settings);
    assert_eq!(read.revision, 1);
    let ana = meta.profile("acme", "ana").await.unwrap().unwrap();
    assert_eq!(ana.value.team.as_deref(), Some("core"));
    // Same user id in another tenant is another person.
    let other = meta.profile("globex", "ana").await.unwrap().unwrap();
    assert_eq!(other.value.team.as_deref(), Some("ops"));
    assert_eq!(meta.profiles("acme").await.unwrap().len(), 1);
    assert_eq!(meta.members("acme", "core", false).await.unwrap(), ["ana"]);
    assert!(meta.members("acme", "ops", false).await.unwrap().is_empty());

    let all = meta.changes_since(0).await.unwrap();
    assert_eq!(all.revision, 3);
    assert_eq!(all.settings.len(), 1);
    assert_eq!(all.profiles.len(), 2);
    // Rewriting one profile shows exactly that profile after revision 3.
    meta.put_profile("acme", "ana", &profile("platform", "Europe/Berlin"))
        .await
        .unwrap();
    let next = meta.changes_since(all.revision).await.unwrap();
    assert_eq!(next.revision, 4);
    assert!(next.settings.is_empty());
    assert_eq!(next.profiles.len(), 1);
    assert_eq!(next.profiles[0].0, "acme");
    assert_eq!(next.profiles[0].2.team.as_deref(), Some("platform"));
    assert!(meta.changes_since(4).await.unwrap().profiles.is_empty());

    // Reopening applies nothing new and keeps everything.
    drop(meta);
    let meta = MetaStore::open(&url, dir).await.unwrap();
    assert_eq!(meta.migrate().await.unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(meta.changes_since(0).await.unwrap().revision, 4);
}

async fn invalid_settings_and_profiles_are_refused_with_the_field_named(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    let bad = TenantSettings {
        keystroke_timeout_secs: 5,
        ..TenantSettings::default()
    };
    let err = meta.put_settings("acme", &bad).await.unwrap_err();
    assert!(matches!(err, MetaError::Invalid(_)));
    assert!(
        err.to_string().contains("keystroke_timeout_secs is 5"),
        "{err}"
    );
    let err = meta
        .put_profile("acme", "ana", &profile("core", "Mars/Olympus"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("timezone `Mars/Olympus`"), "{err}");
    // Nothing was written, and no revision was spent.
    assert_eq!(meta.changes_since(0).await.unwrap().revision, 0);
    let err = MetaStore::open("mysql://x", dir).await.unwrap_err();
    assert!(matches!(err, MetaError::BadUrl(_)), "{err}");
    // A password in the URL never reaches an error message.
    let err = MetaStore::open("postgres://u:hunter2-secret@127.0.0.1:1/db", dir)
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(
        err.to_string().contains("u:<redacted>@127.0.0.1:1"),
        "{err}"
    );
}

async fn jobs_record_progress_and_are_tenant_scoped(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    let spec = serde_json::json!({"from": "2026-01-01", "to": "2026-01-08"});
    let id = meta.create_job("acme", "recompute", &spec).await.unwrap();
    let job = meta.job("acme", &id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.spec, spec);
    meta.update_job(&id, JobState::Running, 3, 7, "3 of 7 days")
        .await
        .unwrap();
    let job = meta.job("acme", &id).await.unwrap().unwrap();
    assert_eq!((job.state, job.done, job.total), (JobState::Running, 3, 7));
    assert_eq!(job.message, "3 of 7 days");
    assert!(meta.job("globex", &id).await.unwrap().is_none());
}

async fn released_groups_are_recorded_once_per_tenant(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    let set = |names: &[&str]| -> std::collections::BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    };
    let group = set(&["a", "b", "c", "d", "e"]);
    // What a check sees: the groups already shown for overlapping windows.
    let seen = std::sync::Mutex::new(Vec::new());
    let release = |g: std::collections::BTreeSet<String>, range: (i64, i64)| {
        let (meta, seen) = (&meta, &seen);
        async move {
            meta.release_group("acme", &g, range, |released| {
                *seen.lock().unwrap() = released.to_vec();
                Ok::<(), ()>(())
            })
            .await
            .unwrap()
            .unwrap();
        }
    };
    release(group.clone(), (100, 200)).await;
    release(group.clone(), (150, 300)).await;
    assert_eq!(*seen.lock().unwrap(), vec![group.clone()]);
    // The range widened to [100, 300): a release at [290, 400) overlaps it, one at
    // [300, 400) does not.
    let other = set(&["v", "w", "x", "y", "z"]);
    release(other.clone(), (300, 400)).await;
    assert!(seen.lock().unwrap().is_empty());
    release(other.clone(), (290, 400)).await;
    assert_eq!(*seen.lock().unwrap(), vec![group.clone(), other.clone()]);
    // A refusal records nothing; another tenant sees none of acme's releases.
    let refused = meta
        .release_group("acme", &set(&["q"]), (0, 1000), |_| Err("no"))
        .await
        .unwrap();
    assert_eq!(refused, Err("no"));
    let mut globex = None;
    meta.release_group("globex", &group, (0, 1000), |r| {
        globex = Some(r.len());
        Ok::<(), ()>(())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(globex, Some(0));
    let mut all = None;
    meta.release_group("acme", &group, (0, 1000), |r| {
        all = Some(r.len());
        Ok::<(), ()>(())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(all, Some(2), "the refused group was not recorded");
}

async fn event_ids_name_one_event_per_tenant(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    let claim = |id: &str, digest: i64| (id.to_string(), digest);
    // New ids, and a request repeating one for the same event: nothing to refuse.
    let got = meta
        .claim_event_ids("acme", &[claim("e1", 1), claim("e2", 2)], 1_000)
        .await
        .unwrap();
    assert_eq!(got, vec![None, None]);
    // A retry of e1, e2 reused for another event, a new e3: only e2 is refused, with
    // the digest it already names.
    let got = meta
        .claim_event_ids(
            "acme",
            &[claim("e1", 1), claim("e2", 99), claim("e3", 3)],
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(got, vec![None, Some(2), None]);
    // Ids are per tenant.
    let got = meta
        .claim_event_ids("globex", &[claim("e2", 99)], 2_000)
        .await
        .unwrap();
    assert_eq!(got, vec![None]);
    // Many at once (more than one statement's worth).
    let many: Vec<(String, i64)> = (0..2_500).map(|i| claim(&format!("m{i}"), 7)).collect();
    let got = meta.claim_event_ids("acme", &many, 3_000).await.unwrap();
    assert!(got.iter().all(Option::is_none));
    // Sent again with every third id reused for another event, and new ids between them,
    // across statement boundaries: exactly the reused ones are refused.
    let again: Vec<(String, i64)> = (0..2_500)
        .map(|i| match i % 3 {
            0 => claim(&format!("m{i}"), 8),
            1 => claim(&format!("m{i}"), 7),
            _ => claim(&format!("n{i}"), 7),
        })
        .collect();
    let got = meta.claim_event_ids("acme", &again, 3_500).await.unwrap();
    for (i, answer) in got.iter().enumerate() {
        assert_eq!(*answer, (i % 3 == 0).then_some(7), "claim {i}");
    }
    // Pruning forgets the oldest: e1 and e2 (first seen at 1 000) go, e3 stays.
    assert_eq!(meta.prune_event_ids(1_500).await.unwrap(), 2);
    let got = meta
        .claim_event_ids("acme", &[claim("e2", 50), claim("e3", 60)], 4_000)
        .await
        .unwrap();
    assert_eq!(got, vec![None, Some(3)]);
}

async fn tenants_acme_and_globex(meta: &MetaStore) {
    meta.create_tenant("acme", "Acme").await.unwrap();
    meta.create_tenant("globex", "Globex").await.unwrap();
}

fn new_account<'a>(tenant: &'a str, email: &'a str, person: Option<&'a str>) -> NewAccount<'a> {
    NewAccount {
        tenant_id: tenant,
        email,
        role: "member",
        person_id: person,
        display_name: "A Person",
    }
}

async fn accounts_are_unique_by_email_and_tenant_scoped(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    tenants_acme_and_globex(&meta).await;
    let err = meta.create_tenant("acme", "again").await.unwrap_err();
    assert!(matches!(err, MetaError::Conflict(_)), "{err}");
    assert_eq!(meta.account_count().await.unwrap(), 0);
    let ana = meta
        .create_account(
            &new_account("acme", " Ana@Example.COM ", Some("u-ana")),
            "$argon2id$x",
        )
        .await
        .unwrap();
    assert_eq!(ana.email, "ana@example.com");
    // The address is taken platform-wide, whatever its case; a person has one account.
    let err = meta
        .create_account(&new_account("globex", "ANA@example.com", None), "h")
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::Conflict(_)), "{err}");
    let err = meta
        .create_account(
            &new_account("acme", "other@example.com", Some("u-ana")),
            "h",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::Conflict(_)), "{err}");
    // The same person id in another tenant is another person.
    meta.create_account(&new_account("globex", "g@example.com", Some("u-ana")), "h")
        .await
        .unwrap();

    let (found, hash) = meta
        .account_for_login("ANA@example.com")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (found.account_id.as_str(), hash.as_str()),
        (ana.account_id.as_str(), "$argon2id$x")
    );
    assert!(
        meta.account("globex", &ana.account_id)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(meta.accounts("acme").await.unwrap().len(), 1);
    // The change feed starts with every account, in creation order.
    let (all, rev) = meta.account_changes_since(0).await.unwrap();
    let emails: Vec<&str> = all.iter().map(|a| a.email.as_str()).collect();
    assert_eq!(emails, ["ana@example.com", "g@example.com"]);
    assert!(meta.account_changes_since(rev).await.unwrap().0.is_empty());

    let change = AccountChange {
        role: Some("analyst".into()),
        disabled: Some(true),
        ..AccountChange::default()
    };
    assert!(
        meta.update_account("globex", &ana.account_id, &change)
            .await
            .unwrap()
            .is_none()
    );
    let changed = meta
        .update_account("acme", &ana.account_id, &change)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((changed.role.as_str(), changed.disabled), ("analyst", true));
    let read = meta
        .account("acme", &ana.account_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read, changed);
    // Followers see the change once, as it now is; a failed update (wrong tenant) is no change.
    let (feed, rev2) = meta.account_changes_since(rev).await.unwrap();
    assert_eq!(feed, vec![changed.clone()]);
    assert!(rev2 > rev);
    assert!(meta.account_changes_since(rev2).await.unwrap().0.is_empty());
    let enabled = meta
        .update_account(
            "acme",
            &ana.account_id,
            &AccountChange {
                disabled: Some(false),
                ..AccountChange::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!enabled.disabled);
    assert_eq!(meta.account_count().await.unwrap(), 2);
}

async fn refresh_tokens_rotate_once_and_reuse_revokes_the_family(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    tenants_acme_and_globex(&meta).await;
    let ana = meta
        .create_account(&new_account("acme", "ana@example.com", None), "h")
        .await
        .unwrap();
    let far = i64::MAX / 2;
    let family = meta.start_session(&ana, "r1", far).await.unwrap();
    let spent = meta.rotate_refresh("r1", "r2", far).await.unwrap();
    assert_eq!(
        spent,
        RefreshOutcome::Spent {
            family_id: family.clone(),
            account_id: ana.account_id.clone(),
            tenant_id: "acme".into()
        }
    );
    let (revoked, _) = meta.revoked_sessions_since(0, 0).await.unwrap();
    assert!(revoked.is_empty());
    // r1 again: a replay. The family is revoked, so r2 (the legitimate next one) is dead too.
    assert_eq!(
        meta.rotate_refresh("r1", "r3", far).await.unwrap(),
        RefreshOutcome::Reused {
            family_id: family.clone()
        }
    );
    assert_eq!(
        meta.rotate_refresh("r2", "r4", far).await.unwrap(),
        RefreshOutcome::Invalid
    );
    let (revoked, rev) = meta.revoked_sessions_since(0, 0).await.unwrap();
    assert_eq!(revoked, vec![family.clone()]);
    assert!(
        meta.revoked_sessions_since(rev, 0)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    // Unknown and expired tokens are simply invalid.
    assert_eq!(
        meta.rotate_refresh("nope", "x", far).await.unwrap(),
        RefreshOutcome::Invalid
    );
    let other = meta.start_session(&ana, "old", 1).await.unwrap();
    assert_eq!(
        meta.rotate_refresh("old", "x", far).await.unwrap(),
        RefreshOutcome::Invalid
    );
    // A password change ends every session of the account.
    let live = meta.start_session(&ana, "live", far).await.unwrap();
    meta.set_password(&ana.account_id, "h2").await.unwrap();
    let (revoked, _) = meta.revoked_sessions_since(rev, 0).await.unwrap();
    assert!(
        revoked.contains(&live) && revoked.contains(&other),
        "{revoked:?}"
    );
    assert_eq!(
        meta.rotate_refresh("live", "x", far).await.unwrap(),
        RefreshOutcome::Invalid
    );
    assert_eq!(meta.session_of_refresh("live").await.unwrap(), Some(live));
}

async fn api_keys_are_stored_as_digests_and_followed(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    tenants_acme_and_globex(&meta).await;
    let key = ApiKeyRecord {
        key_id: "k1".into(),
        tenant_id: "acme".into(),
        name: "laptop watcher".into(),
        secret_hash: digest("s3cret"),
        role: "ingestion_agent".into(),
        sources: vec!["activitywatch".into()],
        endpoints: vec!["events".into()],
        created_by: "admin".into(),
        created_at: 1,
        revoked_at: None,
    };
    meta.create_api_key(&key).await.unwrap();
    assert_eq!(meta.api_keys("acme").await.unwrap(), vec![key.clone()]);
    assert!(meta.api_keys("globex").await.unwrap().is_empty());
    let (all, rev) = meta.api_key_changes_since(0).await.unwrap();
    assert_eq!(all, vec![key.clone()]);
    assert_eq!(all[0].secret_hash, digest("s3cret"));
    assert_ne!(all[0].secret_hash, "s3cret");
    // Another tenant cannot revoke it; its own tenant can, and followers see the change.
    assert!(meta.revoke_api_key("globex", "k1").await.unwrap().is_none());
    assert!(meta.api_key_changes_since(rev).await.unwrap().0.is_empty());
    let revoked = meta.revoke_api_key("acme", "k1").await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
    let (changed, _) = meta.api_key_changes_since(rev).await.unwrap();
    assert_eq!(changed.len(), 1);
    assert!(changed[0].revoked_at.is_some());
}

async fn read_invalidations_follow_in_commit_order(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    assert_eq!(meta.invalidations_since(0).await.unwrap(), (vec![], 0));
    let first = meta.record_invalidation("acme", Some("ana")).await.unwrap();
    let second = meta.record_invalidation("globex", None).await.unwrap();
    assert!(second > first);
    let (all, rev) = meta.invalidations_since(0).await.unwrap();
    assert_eq!(
        all,
        vec![
            ("acme".to_string(), Some("ana".to_string())),
            ("globex".to_string(), None)
        ]
    );
    assert_eq!(rev, second);
    // A follower that saw the first sees only the second; one that saw both, nothing.
    let (after_first, _) = meta.invalidations_since(first).await.unwrap();
    assert_eq!(after_first, vec![("globex".to_string(), None)]);
    assert_eq!(
        meta.invalidations_since(second).await.unwrap(),
        (vec![], second)
    );
}

async fn password_resets_are_single_use_and_expire(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    tenants_acme_and_globex(&meta).await;
    let ana = meta
        .create_account(&new_account("acme", "ana@example.com", None), "h")
        .await
        .unwrap();
    meta.create_password_reset(&ana.account_id, "t1", i64::MAX / 2)
        .await
        .unwrap();
    meta.create_password_reset(&ana.account_id, "t-expired", 1)
        .await
        .unwrap();
    assert_eq!(
        meta.consume_password_reset("t1").await.unwrap(),
        Some(ana.account_id.clone())
    );
    assert_eq!(meta.consume_password_reset("t1").await.unwrap(), None);
    assert_eq!(
        meta.consume_password_reset("t-expired").await.unwrap(),
        None
    );
    assert_eq!(meta.consume_password_reset("unknown").await.unwrap(), None);
}

fn audit_record(tenant: &str, id: &str, at: i64, actor: &str, action: &str) -> AuditRecord {
    AuditRecord {
        event_id: id.into(),
        at,
        tenant_id: tenant.into(),
        actor: actor.into(),
        actor_kind: "account".into(),
        action: action.into(),
        target: "/v1/settings".into(),
        source_ip: "127.0.0.1".into(),
        request_id: "r".into(),
        outcome: 200,
        detail: String::new(),
    }
}

async fn audit_log_is_append_only_and_tenant_scoped(url: String, dir: &Path) {
    let meta = MetaStore::open(&url, dir).await.unwrap();
    let a1 = audit_record("acme", "e1", 100, "ana", "PUT /v1/settings");
    let a2 = audit_record("acme", "e2", 200, "bob", "POST /v1/keys");
    let g1 = audit_record("globex", "e3", 150, "gus", "PUT /v1/settings");
    for r in [&a1, &a2, &g1] {
        meta.append_audit(r).await.unwrap();
    }
    let q = |f: fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        };
        f(&mut q);
        q
    };
    assert_eq!(
        meta.audit("acme", &q(|_| {})).await.unwrap(),
        vec![a2.clone(), a1.clone()]
    );
    assert_eq!(
        meta.audit("globex", &q(|_| {})).await.unwrap(),
        vec![g1.clone()]
    );
    assert_eq!(
        meta.audit("acme", &q(|q| q.actor = Some("ana".into())))
            .await
            .unwrap(),
        vec![a1.clone()]
    );
    assert_eq!(
        meta.audit("acme", &q(|q| q.action_prefix = Some("POST ".into())))
            .await
            .unwrap(),
        vec![a2.clone()]
    );
    assert_eq!(
        meta.audit(
            "acme",
            &q(|q| {
                q.from = Some(101);
                q.to = Some(201)
            })
        )
        .await
        .unwrap(),
        vec![a2.clone()]
    );
    assert_eq!(
        meta.audit("acme", &q(|q| q.limit = 1)).await.unwrap(),
        vec![a2.clone()]
    );

    // The database itself refuses changes and removals, whoever connects.
    let conn_url = if url.starts_with("sqlite") {
        format!("sqlite://{}", dir.join("meta.db").display())
    } else {
        url.clone()
    };
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&conn_url).await.unwrap();
    for sql in [
        "UPDATE audit_log SET outcome = 500",
        "DELETE FROM audit_log",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(meta.audit("acme", &q(|_| {})).await.unwrap(), vec![a2, a1]);
}
