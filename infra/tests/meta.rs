//! The metadata store on a real SQLite file: migrations, settings and profiles with
//! their revisions, change following, jobs, and refusal of invalid content.

use digame_infra::meta::{JobState, MetaError, MetaStore};
use digame_schemas::profile::{PersonProfile, TenantSettings};

fn profile(team: &str, tz: &str) -> PersonProfile {
    PersonProfile {
        timezone: Some(tz.into()),
        team: Some(team.into()),
        ..PersonProfile::default()
    }
}

#[tokio::test]
async fn settings_and_profiles_round_trip_and_changes_follow_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    assert!(dir.path().join("meta.db").exists());
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
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    assert_eq!(meta.migrate().await.unwrap(), vec![1, 2]);
    assert_eq!(meta.changes_since(0).await.unwrap().revision, 4);
}

#[tokio::test]
async fn invalid_settings_and_profiles_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
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
    let err = MetaStore::open("postgres://x", dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::BadUrl(_)), "{err}");
}

#[tokio::test]
async fn jobs_record_progress_and_are_tenant_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
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

#[tokio::test]
async fn released_groups_are_recorded_once_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let meta = MetaStore::open("sqlite://", dir.path()).await.unwrap();
    let group: std::collections::BTreeSet<String> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    meta.record_released_group("acme", &group).await.unwrap();
    meta.record_released_group("acme", &group).await.unwrap();
    assert_eq!(meta.released_groups("acme").await.unwrap(), vec![group]);
    assert!(meta.released_groups("globex").await.unwrap().is_empty());
}
