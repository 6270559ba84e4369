//! The metadata store: tenants, accounts, roles, keys, tokens and the audit log
//! ([`identity`]), tenant settings, person profiles and background jobs. SQLite (embedded
//! default, `<data_dir>/meta.db`) or PostgreSQL (`postgres://…`), through `sqlx`'s
//! driver-neutral `Any` pool: one set of queries and one test suite for both.
//!
//! What it guarantees:
//! - **Versioned schema.** Migrations under `infra/migrations/meta/` are embedded in the
//!   binary and applied on open (and by `digame migrate`); `sqlx` records each with its
//!   checksum and refuses a database whose applied migrations were edited afterwards.
//!   The migrations are portable SQL; what cannot be (the triggers that make the audit
//!   log append-only) is applied per backend right after them.
//! - **Changes in commit order.** Every write of settings or a profile takes the next
//!   value of one revision counter inside its own transaction. Writers serialize on that
//!   counter row, so revisions commit in increasing order and a reader that remembers the
//!   last revision it saw ([`MetaStore::changes_since`]) never misses a change.
//! - **Validated content.** Settings and profiles are validated before they are stored,
//!   so whatever a pipeline reads back compiles.
//! - **Bound parameters.** Every value reaches SQL as a bound parameter (`$1`, …; `?` in
//!   the generated multi-row statements on SQLite), never by concatenation.

pub mod identity;
pub mod ids;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;

use digame_schemas::profile::{PersonProfile, TenantSettings};
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

pub use digame_config::redact_url;
pub use digame_schemas::profile::Changes;
pub use ids::IdIndex;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/meta");

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(
        "metadata store URL `{0}`: use `sqlite://` (the default, <data_dir>/meta.db), `sqlite:///path/to/meta.db` or `postgres://user:password@host:port/database`"
    )]
    BadUrl(String),
    #[error("cannot open the metadata store at {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("metadata store migration failed: {0}")]
    Migrate(String),
    #[error("metadata store query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
    /// A uniqueness rule refused the write (taken email, tenant id, …).
    #[error("{0}")]
    Conflict(String),
    #[error("stored {what} cannot be read ({reason}); rewrite it through the API")]
    Corrupt { what: String, reason: String },
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// A stored value with the revision that wrote it.
#[derive(Clone, Debug, Serialize)]
pub struct Stored<T> {
    #[serde(flatten)]
    pub value: T,
    pub revision: i64,
    pub updated_at: i64,
}

/// State of a background job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            other => return Err(format!("unknown job state `{other}`")),
        })
    }
}

/// A background job and its progress (`done` of `total` units).
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub job_id: String,
    pub tenant_id: String,
    pub kind: String,
    pub spec: serde_json::Value,
    pub state: JobState,
    pub done: i64,
    pub total: i64,
    pub message: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Which database a [`MetaStore`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One request's client event ids to claim, for [`MetaStore::claim_event_id_sets`].
#[derive(Debug, Clone, Copy)]
pub struct EventIdClaims<'a> {
    pub tenant: &'a str,
    /// (event_id, content digest), ids distinct.
    pub claims: &'a [(String, i64)],
    /// When the ids are first seen (Unix ms), for pruning.
    pub now_ms: i64,
}

/// The metadata store.
#[derive(Clone, Debug)]
pub struct MetaStore {
    pool: AnyPool,
    backend: Backend,
}

fn now_ms() -> i64 {
    digame_schemas::EventTime::now().0
}

/// Creates `path` empty with mode 0600 unless it exists (an empty file is a new SQLite
/// database); an existing file keeps the mode its owner gave it.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The SQLite file a `meta.url` names: `sqlite://` is `<data_dir>/meta.db`.
pub fn sqlite_path(url: &str, data_dir: &Path) -> Result<std::path::PathBuf> {
    match url.strip_prefix("sqlite://") {
        Some("") => Ok(data_dir.join("meta.db")),
        Some(path) if !path.contains('?') => Ok(path.into()),
        _ => Err(MetaError::BadUrl(url.into())),
    }
}

impl MetaStore {
    /// Opens (creating when missing) the store of `url` and applies pending migrations.
    pub async fn open(url: &str, data_dir: &Path) -> Result<Self> {
        Self::open_with(url, data_dir, None).await
    }

    /// [`open`](Self::open) with one connection: for a task that is the store's only
    /// user of a table and wants no pool between it and the database.
    pub async fn open_single(url: &str, data_dir: &Path) -> Result<Self> {
        Self::open_with(url, data_dir, Some(1)).await
    }

    async fn open_with(url: &str, data_dir: &Path, connections: Option<u32>) -> Result<Self> {
        install_default_drivers();
        let shown = redact_url(url);
        let open_error = |e: sqlx::Error| MetaError::Open {
            url: shown.clone(),
            reason: e.to_string(),
        };
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = AnyPoolOptions::new()
                .max_connections(connections.unwrap_or(16))
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(open_error)?;
            MetaStore {
                pool,
                backend: Backend::Postgres,
            }
        } else {
            let path = sqlite_path(url, data_dir).map_err(|_| MetaError::BadUrl(shown.clone()))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| MetaError::Open {
                    url: shown.clone(),
                    reason: format!("{}: {e}", dir.display()),
                })?;
            }
            // The file holds password hashes, key digests and the audit log: create it
            // readable by its owner only (SQLite gives its WAL and SHM files the same mode).
            create_private(&path).map_err(|e| MetaError::Open {
                url: shown.clone(),
                reason: format!("{}: {e}", path.display()),
            })?;
            // sqlx opens SQLite in WAL mode with a 5 s busy timeout.
            let conn = format!("sqlite://{}?mode=rwc", path.display());
            let pool = AnyPoolOptions::new()
                .max_connections(connections.unwrap_or(4))
                .connect(&conn)
                .await
                .map_err(open_error)?;
            MetaStore {
                pool,
                backend: Backend::Sqlite,
            }
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// `rows` parenthesised groups of `width` bind markers, `(…), (…)`, numbered from
    /// `first` on PostgreSQL (`$1`, `$2` …) and anonymous on SQLite (`?`, bound in order):
    /// SQLite finds a numbered marker's name by scanning a list, so binding a statement of
    /// thousands of `$N` markers takes quadratic time (it held ingest to ~36k events/s).
    fn markers(&self, first: usize, rows: usize, width: usize) -> String {
        let mut out = String::with_capacity(rows * width * 7);
        let mut n = first;
        for r in 0..rows {
            out.push_str(if r == 0 { "(" } else { ", (" });
            for c in 0..width {
                if c > 0 {
                    out.push_str(", ");
                }
                match self.backend {
                    Backend::Sqlite => out.push('?'),
                    Backend::Postgres => {
                        out.push('$');
                        out.push_str(&n.to_string());
                    }
                }
                n += 1;
            }
            out.push(')');
        }
        out
    }

    /// Applies the migrations not yet applied; returns the versions now applied.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| MetaError::Migrate(e.to_string()))?;
        self.append_only_triggers()
            .await
            .map_err(|e| MetaError::Migrate(format!("append-only audit log: {e}")))?;
        Ok(MIGRATOR.iter().map(|m| m.version).collect())
    }

    /// Takes the next revision inside `tx`; holds the counter row until commit.
    async fn next_revision(conn: &mut sqlx::AnyConnection) -> Result<i64> {
        let row =
            sqlx::query("UPDATE meta_revision SET value = value + 1 WHERE id = 1 RETURNING value")
                .fetch_one(&mut *conn)
                .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// The tenant's stored settings, if any were set.
    pub async fn settings(&self, tenant: &str) -> Result<Option<Stored<TenantSettings>>> {
        let row = sqlx::query(
            "SELECT settings, revision, updated_at FROM tenant_settings WHERE tenant_id = $1",
        )
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| stored(&r, || format!("settings of {tenant}")))
            .transpose()
    }

    /// Validates and stores a tenant's settings.
    pub async fn put_settings(
        &self,
        tenant: &str,
        settings: &TenantSettings,
    ) -> Result<Stored<TenantSettings>> {
        settings.validate().map_err(MetaError::Invalid)?;
        let json = serde_json::to_string(settings).expect("settings serialize");
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "INSERT INTO tenant_settings (tenant_id, settings, revision, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id) DO UPDATE SET settings = excluded.settings,
               revision = excluded.revision, updated_at = excluded.updated_at",
        )
        .bind(tenant)
        .bind(&json)
        .bind(revision)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Stored {
            value: settings.clone(),
            revision,
            updated_at: now,
        })
    }

    /// A person's stored profile, if one was set.
    pub async fn profile(&self, tenant: &str, user: &str) -> Result<Option<Stored<PersonProfile>>> {
        let row = sqlx::query(
            "SELECT profile, revision, updated_at FROM person_profiles WHERE tenant_id = $1 AND user_id = $2",
        )
        .bind(tenant)
        .bind(user)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| stored(&r, || format!("profile of {tenant}/{user}")))
            .transpose()
    }

    /// Validates and stores a person's profile.
    pub async fn put_profile(
        &self,
        tenant: &str,
        user: &str,
        profile: &PersonProfile,
    ) -> Result<Stored<PersonProfile>> {
        profile.validate().map_err(MetaError::Invalid)?;
        if let Some(tz) = &profile.timezone {
            tz.parse::<chrono_tz::Tz>().map_err(|_| {
                MetaError::Invalid(format!(
                    "timezone `{tz}` is not an IANA time zone name (e.g. Europe/Berlin)"
                ))
            })?;
        }
        let json = serde_json::to_string(profile).expect("profiles serialize");
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "INSERT INTO person_profiles (tenant_id, user_id, profile, team, manager, revision, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, user_id) DO UPDATE SET profile = excluded.profile,
               team = excluded.team, manager = excluded.manager,
               revision = excluded.revision, updated_at = excluded.updated_at",
        )
        .bind(tenant)
        .bind(user)
        .bind(&json)
        .bind(profile.team.clone())
        .bind(profile.manager.clone())
        .bind(revision)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Stored {
            value: profile.clone(),
            revision,
            updated_at: now,
        })
    }

    /// Every profile of a tenant, by user id.
    pub async fn profiles(&self, tenant: &str) -> Result<Vec<(String, PersonProfile)>> {
        let rows = sqlx::query(
            "SELECT user_id, profile FROM person_profiles WHERE tenant_id = $1 ORDER BY user_id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let user: String = r.try_get(0)?;
                let profile = decode(&r.try_get::<String, _>(1)?, || {
                    format!("profile of {tenant}/{user}")
                })?;
                Ok((user, profile))
            })
            .collect()
    }

    /// Claims client event ids for the events they name: `claims` are (event_id, content
    /// digest), ids distinct. Answers, per claim, the digest the id already names when
    /// that differs (the id was used for another event: refuse this one), `None` when the
    /// id is new or names the same event (a retry). Atomic per id: of two concurrent
    /// claims with different digests, exactly one wins.
    pub async fn claim_event_ids(
        &self,
        tenant: &str,
        claims: &[(String, i64)],
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>> {
        let mut answers = self
            .claim_event_id_sets(&[EventIdClaims {
                tenant,
                claims,
                now_ms,
            }])
            .await?;
        Ok(answers.pop().unwrap_or_default())
    }

    /// [`claim_event_ids`](Self::claim_event_ids) for several requests in one transaction
    /// (one commit for all), in order: a later set sees the ids an earlier one claimed.
    /// New ids cost one statement per thousand; only ids already present are read back.
    pub async fn claim_event_id_sets(
        &self,
        sets: &[EventIdClaims<'_>],
    ) -> Result<Vec<Vec<Option<i64>>>> {
        // Two parameters a row; SQLite allows 32766 per statement.
        const CHUNK: usize = 4000;
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(sets.len());
        for set in sets {
            let mut known: HashMap<String, i64> = HashMap::new();
            for chunk in set.claims.chunks(CHUNK) {
                // The tenant and the time are bound once; the ids and digests row by row.
                let sql = format!(
                    "INSERT INTO event_ids (tenant_id, event_id, digest, first_seen) \
                     SELECT {}, v.column1, v.column2, {} FROM (VALUES {}) AS v WHERE true \
                     ON CONFLICT (tenant_id, event_id) DO NOTHING",
                    self.markers(1, 1, 1),
                    self.markers(2, 1, 1),
                    self.markers(3, chunk.len(), 2)
                );
                let mut q = sqlx::query(&sql).bind(set.tenant).bind(set.now_ms);
                for (id, digest) in chunk {
                    q = q.bind(id.as_str()).bind(*digest);
                }
                let inserted = q.execute(&mut *tx).await?.rows_affected();
                if inserted == chunk.len() as u64 {
                    continue;
                }
                // Some ids were present already: a retry (same digest) or a reuse
                // (another). Rare, so the whole chunk is read back.
                let sql = format!(
                    "SELECT event_id, digest FROM event_ids WHERE tenant_id = {} AND event_id IN {}",
                    self.markers(1, 1, 1),
                    self.markers(2, 1, chunk.len())
                );
                let mut q = sqlx::query(&sql).bind(set.tenant);
                for (id, _) in chunk {
                    q = q.bind(id.as_str());
                }
                for row in q.fetch_all(&mut *tx).await? {
                    known.insert(row.try_get(0)?, row.try_get(1)?);
                }
            }
            out.push(
                set.claims
                    .iter()
                    .map(|(id, digest)| known.get(id).filter(|d| *d != digest).copied())
                    .collect(),
            );
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Forgets event ids first seen before `before_ms` (older than any tenant's horizon).
    pub async fn prune_event_ids(&self, before_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM event_ids WHERE first_seen < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The people whose profile names `team` (or, with `by_manager`, whose manager is
    /// `name`), sorted.
    pub async fn members(&self, tenant: &str, name: &str, by_manager: bool) -> Result<Vec<String>> {
        // The column is chosen here, never from input; the value is bound.
        let sql = if by_manager {
            "SELECT user_id FROM person_profiles WHERE tenant_id = $1 AND manager = $2 ORDER BY user_id"
        } else {
            "SELECT user_id FROM person_profiles WHERE tenant_id = $1 AND team = $2 ORDER BY user_id"
        };
        let rows = sqlx::query(sql)
            .bind(tenant)
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(MetaError::from))
            .collect()
    }

    /// Records that `tenant`'s stored values changed under the read caches: one person's
    /// (`Some(user)`, their data was deleted) or any of the tenant's (`None`, retention).
    /// Every API node forgets them (see [`Self::invalidations_since`]). Prunes records
    /// older than a day in the same transaction.
    pub async fn record_invalidation(&self, tenant: &str, user: Option<&str>) -> Result<i64> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let revision = Self::next_revision(&mut tx).await?;
        sqlx::query(
            "INSERT INTO read_invalidations (revision, tenant_id, user_id, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(revision)
        .bind(tenant)
        .bind(user)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM read_invalidations WHERE created_at < $1")
            .bind(now - 86_400_000)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// Invalidations recorded after `revision`, in commit order, as `(tenant, user)`
    /// (`None`: the whole tenant), and the newest revision seen.
    pub async fn invalidations_since(
        &self,
        revision: i64,
    ) -> Result<(Vec<(String, Option<String>)>, i64)> {
        self.changes_after(
            "SELECT tenant_id, user_id, revision FROM read_invalidations WHERE revision > $1 ORDER BY revision",
            revision,
            2,
            |r| Ok((r.try_get(0)?, r.try_get(1)?)),
        )
        .await
    }

    /// Settings and profiles written after `revision` (0: everything).
    pub async fn changes_since(&self, revision: i64) -> Result<Changes> {
        let mut changes = Changes {
            revision,
            ..Changes::default()
        };
        let rows = sqlx::query(
            "SELECT tenant_id, settings, revision FROM tenant_settings WHERE revision > $1 ORDER BY revision",
        )
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
            let tenant: String = r.try_get(0)?;
            let settings = decode(&r.try_get::<String, _>(1)?, || {
                format!("settings of {tenant}")
            })?;
            changes.revision = changes.revision.max(r.try_get(2)?);
            changes.settings.push((tenant, settings));
        }
        let rows = sqlx::query(
            "SELECT tenant_id, user_id, profile, revision FROM person_profiles WHERE revision > $1 ORDER BY revision",
        )
        .bind(revision)
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
            let tenant: String = r.try_get(0)?;
            let user: String = r.try_get(1)?;
            let profile = decode(&r.try_get::<String, _>(2)?, || {
                format!("profile of {tenant}/{user}")
            })?;
            changes.revision = changes.revision.max(r.try_get(3)?);
            changes.profiles.push((tenant, user, profile));
        }
        Ok(changes)
    }

    /// Records a new queued job; returns its id.
    pub async fn create_job(
        &self,
        tenant: &str,
        kind: &str,
        spec: &serde_json::Value,
    ) -> Result<String> {
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO jobs (job_id, tenant_id, kind, spec, state, done, total, message, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'queued', 0, 0, '', $5, $5)",
        )
        .bind(&id)
        .bind(tenant)
        .bind(kind)
        .bind(spec.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Records a job's progress.
    pub async fn update_job(
        &self,
        job_id: &str,
        state: JobState,
        done: i64,
        total: i64,
        message: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = $1, done = $2, total = $3, message = $4, updated_at = $5 WHERE job_id = $6",
        )
        .bind(state.as_str())
        .bind(done)
        .bind(total)
        .bind(message)
        .bind(now_ms())
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Decides whether `members` may be shown for the windows in `[from, to)` and, if
    /// `check` allows it against the groups already shown for overlapping windows,
    /// records the release: one transaction, serialized per tenant on its lock row, so
    /// two API nodes deciding at once see each other's releases. `Ok(Err(_))` is the
    /// check's refusal (nothing recorded).
    pub async fn release_group<E>(
        &self,
        tenant: &str,
        members: &BTreeSet<String>,
        (from_ms, to_ms): (i64, i64),
        check: impl FnOnce(&[BTreeSet<String>]) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<(), E>> {
        use sha2::Digest;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO group_release_locks (tenant_id, decisions) VALUES ($1, 1) \
             ON CONFLICT (tenant_id) DO UPDATE SET decisions = group_release_locks.decisions + 1",
        )
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT members FROM released_groups WHERE tenant_id = $1 AND from_ms < $2 AND to_ms > $3",
        )
        .bind(tenant)
        .bind(to_ms)
        .bind(from_ms)
        .fetch_all(&mut *tx)
        .await?;
        let released = rows
            .iter()
            .map(|r| {
                decode(&r.try_get::<String, _>(0)?, || {
                    format!("a released group of {tenant}")
                })
            })
            .collect::<Result<Vec<BTreeSet<String>>>>()?;
        if let Err(refused) = check(&released) {
            tx.rollback().await?;
            return Ok(Err(refused));
        }
        let json = serde_json::to_string(members).expect("sets serialize");
        let hash = format!("{:x}", sha2::Sha256::digest(json.as_bytes()));
        sqlx::query(
            "INSERT INTO released_groups (tenant_id, members_hash, members, released_at, from_ms, to_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, members_hash) DO UPDATE SET \
             from_ms = CASE WHEN excluded.from_ms < released_groups.from_ms THEN excluded.from_ms ELSE released_groups.from_ms END, \
             to_ms = CASE WHEN excluded.to_ms > released_groups.to_ms THEN excluded.to_ms ELSE released_groups.to_ms END",
        )
        .bind(tenant)
        .bind(hash)
        .bind(json)
        .bind(now_ms())
        .bind(from_ms)
        .bind(to_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// Marks jobs left queued or running by a previous process as failed; returns how many.
    pub async fn fail_unfinished_jobs(&self) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE jobs SET state = 'failed', message = $1, updated_at = $2 \
             WHERE state IN ('queued', 'running')",
        )
        .bind("interrupted by a restart of the server; submit the job again")
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// One of the tenant's jobs (another tenant's id reads as absent).
    pub async fn job(&self, tenant: &str, job_id: &str) -> Result<Option<Job>> {
        let row = sqlx::query(
            "SELECT job_id, tenant_id, kind, spec, state, done, total, message, created_at, updated_at
             FROM jobs WHERE tenant_id = $1 AND job_id = $2",
        )
        .bind(tenant)
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let spec: String = r.try_get(3)?;
            let state: String = r.try_get(4)?;
            Ok(Job {
                job_id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                kind: r.try_get(2)?,
                spec: decode(&spec, || format!("spec of job {job_id}"))?,
                state: state.parse().map_err(|reason| MetaError::Corrupt {
                    what: format!("state of job {job_id}"),
                    reason,
                })?,
                done: r.try_get(5)?,
                total: r.try_get(6)?,
                message: r.try_get(7)?,
                created_at: r.try_get(8)?,
                updated_at: r.try_get(9)?,
            })
        })
        .transpose()
    }
}

/// A `(json, revision, updated_at)` row as a stored value.
fn stored<T: serde::de::DeserializeOwned>(
    row: &sqlx::any::AnyRow,
    what: impl Fn() -> String,
) -> Result<Stored<T>> {
    Ok(Stored {
        value: decode(&row.try_get::<String, _>(0)?, what)?,
        revision: row.try_get(1)?,
        updated_at: row.try_get(2)?,
    })
}

fn decode<T: serde::de::DeserializeOwned>(json: &str, what: impl Fn() -> String) -> Result<T> {
    serde_json::from_str(json).map_err(|e| MetaError::Corrupt {
        what: what(),
        reason: e.to_string(),
    })
}
