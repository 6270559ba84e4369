//! Validation rules for incoming events: required fields per kind, size limits and clock
//! skew. Pure functions; the caller supplies "now" and the tenant's horizon so the rules are
//! deterministic under test.

use std::fmt;

use crate::event::{ActivityEvent, EventKind, SCHEMA_VERSION};
use crate::time::EventTime;

/// Longest accepted `duration_ms`: one day.
pub const MAX_DURATION_MS: u64 = 86_400_000;
pub const MAX_USER_ID_BYTES: usize = 128;
pub const MAX_SOURCE_BYTES: usize = 64;
pub const MAX_TITLE_BYTES: usize = 1024;
pub const MAX_URL_BYTES: usize = 2048;
pub const MAX_SHORT_ATTR_BYTES: usize = 256;
pub const MAX_PARTICIPANTS: usize = 256;
pub const MAX_PROPERTIES_BYTES: usize = 16 * 1024;

/// Time bounds an event's timestamp must fall in.
#[derive(Clone, Copy, Debug)]
pub struct TimePolicy {
    /// The server's current time.
    pub now: EventTime,
    /// How far in the future an event may start (clock skew allowance), ms.
    pub max_future_ms: i64,
    /// How far in the past an event may start (the tenant's horizon), ms.
    pub horizon_ms: i64,
}

impl TimePolicy {
    /// One hour of future skew, the given horizon in days.
    pub fn new(now: EventTime, horizon_days: u32) -> Self {
        TimePolicy {
            now,
            max_future_ms: EventTime::HOUR,
            horizon_ms: i64::from(horizon_days) * EventTime::DAY,
        }
    }
}

/// Everything wrong with one event, each problem naming its field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub problems: Vec<Problem>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// JSON path of the offending field, e.g. `attributes.app`.
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, field: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            field,
            message: message.into(),
        });
    }

    fn text(&mut self, field: &'static str, value: &str, max: usize, required: bool) {
        if required && value.trim().is_empty() {
            self.fail(field, "must not be empty");
        }
        if value.len() > max {
            self.fail(
                field,
                format!("is {} bytes; the limit is {max} bytes", value.len()),
            );
        }
        if value.chars().any(char::is_control) {
            self.fail(field, "must not contain control characters");
        }
    }

    fn opt_text(&mut self, field: &'static str, value: &Option<String>, max: usize) {
        if let Some(v) = value {
            self.text(field, v, max, false);
        }
    }

    fn require(&mut self, field: &'static str, value: &Option<String>, kind: EventKind) {
        if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
            self.fail(field, format!("is required for kind `{}`", kind.as_str()));
        }
    }

    fn status_in(
        &mut self,
        value: &Option<String>,
        allowed: &[&str],
        kind: EventKind,
        required: bool,
    ) {
        match value.as_deref() {
            None if required => self.fail(
                "attributes.status",
                format!(
                    "is required for kind `{}`; one of {}",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            ),
            Some(v) if !allowed.contains(&v) => self.fail(
                "attributes.status",
                format!(
                    "`{v}` is not valid for kind `{}`; use one of {}",
                    kind.as_str(),
                    allowed.join(", ")
                ),
            ),
            _ => {}
        }
    }
}

/// Checks one event against the wire rules. `tenant_id` is not checked here: the server
/// sets it from the credential before calling this.
pub fn validate_event(ev: &ActivityEvent, time: &TimePolicy) -> Result<(), Invalid> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    if ev.schema_version != SCHEMA_VERSION {
        c.fail(
            "schema_version",
            format!(
                "version {} is not supported; this server speaks version {SCHEMA_VERSION}",
                ev.schema_version
            ),
        );
    }
    if ev.event_id.is_some_and(|id| id.is_nil()) {
        c.fail("event_id", "the nil UUID is not a valid idempotency key");
    }
    c.text("user_id", &ev.user_id, MAX_USER_ID_BYTES, true);
    c.text("source", &ev.source, MAX_SOURCE_BYTES, true);

    let ts = ev.timestamp.0;
    if ts > time.now.0 + time.max_future_ms {
        c.fail(
            "timestamp",
            format!(
                "{} is more than {} min in the future (server time {}); check the client clock",
                ev.timestamp,
                time.max_future_ms / EventTime::MINUTE,
                time.now
            ),
        );
    }
    if ts < time.now.0 - time.horizon_ms {
        c.fail(
            "timestamp",
            format!(
                "{} is older than this tenant's horizon of {} days",
                ev.timestamp,
                time.horizon_ms / EventTime::DAY
            ),
        );
    }
    if ev.duration_ms > MAX_DURATION_MS {
        c.fail(
            "duration_ms",
            format!(
                "{} exceeds the limit of {MAX_DURATION_MS} (one day); split longer activities",
                ev.duration_ms
            ),
        );
    }

    let a = &ev.attributes;
    c.opt_text("attributes.app", &a.app, MAX_SHORT_ATTR_BYTES);
    c.opt_text("attributes.title", &a.title, MAX_TITLE_BYTES);
    c.opt_text("attributes.url", &a.url, MAX_URL_BYTES);
    c.opt_text("attributes.project", &a.project, MAX_SHORT_ATTR_BYTES);
    c.opt_text("attributes.language", &a.language, MAX_SHORT_ATTR_BYTES);
    c.opt_text("attributes.branch", &a.branch, MAX_SHORT_ATTR_BYTES);
    c.opt_text("attributes.file", &a.file, MAX_TITLE_BYTES);
    c.opt_text("attributes.status", &a.status, MAX_SHORT_ATTR_BYTES);
    if a.participants.len() > MAX_PARTICIPANTS {
        c.fail(
            "attributes.participants",
            format!(
                "has {} entries; the limit is {MAX_PARTICIPANTS}",
                a.participants.len()
            ),
        );
    }
    if a.participants
        .iter()
        .any(|p| p.is_empty() || p.len() > MAX_USER_ID_BYTES)
    {
        c.fail(
            "attributes.participants",
            format!("entries must be 1..={MAX_USER_ID_BYTES} bytes"),
        );
    }
    if let Some(props) = &ev.properties {
        let raw = props.get();
        if !raw.trim_start().starts_with('{') {
            c.fail("properties", "must be a JSON object");
        }
        if raw.len() > MAX_PROPERTIES_BYTES {
            c.fail(
                "properties",
                format!(
                    "is {} bytes; the limit is {MAX_PROPERTIES_BYTES} bytes",
                    raw.len()
                ),
            );
        }
    }

    let kind = ev.kind;
    match kind {
        EventKind::WindowFocus => c.require("attributes.app", &a.app, kind),
        EventKind::Afk => c.status_in(&a.status, &["afk", "not-afk"], kind, true),
        EventKind::Meeting | EventKind::Call => {
            if ev.duration_ms == 0 {
                c.fail(
                    "duration_ms",
                    format!("must be positive for kind `{}`", kind.as_str()),
                );
            }
            c.status_in(
                &a.status,
                &["accepted", "tentative", "declined"],
                kind,
                false,
            );
        }
        EventKind::BrowserVisit => c.require("attributes.url", &a.url, kind),
        EventKind::IdeHeartbeat => {
            if a.project.is_none() && a.file.is_none() {
                c.fail(
                    "attributes.project",
                    "kind `ide_heartbeat` needs attributes.project or attributes.file",
                );
            }
        }
        EventKind::Commit | EventKind::PullRequest | EventKind::Review | EventKind::Deploy => {
            c.require("attributes.project", &a.project, kind)
        }
        EventKind::Incident => c.status_in(&a.status, &["opened", "resolved"], kind, true),
        EventKind::Message | EventKind::Email | EventKind::Ticket | EventKind::Custom => {}
    }

    if c.problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid {
            problems: c.problems,
        })
    }
}

/// A user id in a URL path: non-empty, at most the event limit, no control characters.
pub fn validate_user_id(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > MAX_USER_ID_BYTES || user.chars().any(char::is_control) {
        return Err(format!(
            "`{}` is not a user id: use 1 to {MAX_USER_ID_BYTES} bytes without control characters",
            user.escape_debug()
        ));
    }
    Ok(())
}

/// Tenant ids name directories and partitions, so they are restricted to
/// `[A-Za-z0-9_-]{1,64}`.
pub fn validate_tenant_id(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant id `{tenant}` is invalid: use 1 to 64 characters from A-Z, a-z, 0-9, '-' and '_'"
        ))
    }
}

/// An account's email address, trimmed and lowercased, or why it is not one: a local part
/// of 1 to 64 characters (letters, digits and ``!#$%&'*+/=?^_`{|}~.-``, no leading,
/// trailing or doubled dot), one `@`, and a domain of at least two labels (letters, digits
/// and inner hyphens, 1 to 63 each); 254 characters at most. Quoted local parts and
/// address literals are not accepted.
pub fn normalize_email(email: &str) -> Result<String, String> {
    let email = email.trim().to_lowercase();
    let refuse = |why: &str| {
        Err(format!(
            "`{}` is not an email address: {why}",
            email.chars().take(80).collect::<String>()
        ))
    };
    if email.len() > 254 {
        return refuse("it is longer than 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return refuse("it has no `@`");
    };
    if domain.contains('@') {
        return refuse("it has more than one `@`");
    }
    const SPECIAL: &str = "!#$%&'*+/=?^_`{|}~.-";
    if local.is_empty() || local.len() > 64 {
        return refuse("the part before `@` must have 1 to 64 characters");
    }
    if !local
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || SPECIAL.contains(c))
        || local.starts_with('.')
        || local.ends_with('.')
        || local.contains("..")
    {
        return refuse("the part before `@` has a character or dot that is not allowed");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return refuse("the domain needs at least two labels, such as `example.com`");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !labels.iter().all(|l| label_ok(l)) {
        return refuse("each domain label needs 1 to 63 letters, digits or inner hyphens");
    }
    Ok(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_normalized_or_refused_with_the_reason() {
        assert_eq!(
            normalize_email("  Ana.Lima+work@Acme.Example ").unwrap(),
            "ana.lima+work@acme.example"
        );
        assert!(normalize_email("admin@digame.local").is_ok());
        for (bad, why) in [
            ("not-an-address", "no `@`"),
            ("a@b@example.com", "more than one `@`"),
            ("@example.com", "1 to 64"),
            ("a..b@example.com", "not allowed"),
            ("a b@example.com", "not allowed"),
            ("ana@localhost", "two labels"),
            ("ana@-acme.example", "inner hyphens"),
            ("ana@acme..example", "inner hyphens"),
        ] {
            let err = normalize_email(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let long = format!("{}@example.com", "a".repeat(65));
        assert!(normalize_email(&long).unwrap_err().contains("1 to 64"));
    }

    const NOW: EventTime = EventTime(1_795_512_600_000); // 2026-11-24T09:30:00Z

    fn policy() -> TimePolicy {
        TimePolicy::new(NOW, 30)
    }

    fn parse(json: &str) -> ActivityEvent {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_valid_focus_event_passes() {
        let ev = parse(
            r#"{"user_id":"u","source":"aw","kind":"window_focus","timestamp":"2026-11-24T09:00:00Z","duration_ms":5000,"attributes":{"app":"Code"}}"#,
        );
        assert_eq!(validate_event(&ev, &policy()), Ok(()));
    }

    #[test]
    fn focus_without_app_names_the_field_and_kind() {
        let ev = parse(
            r#"{"user_id":"u","source":"aw","kind":"window_focus","timestamp":"2026-11-24T09:00:00Z"}"#,
        );
        let err = validate_event(&ev, &policy()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "attributes.app: is required for kind `window_focus`"
        );
    }

    #[test]
    fn clock_skew_both_ways() {
        let future = parse(
            r#"{"user_id":"u","source":"s","kind":"message","timestamp":"2026-11-24T10:31:00Z"}"#,
        );
        let err = validate_event(&future, &policy()).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "timestamp: 2026-11-24T10:31:00.000Z is more than 60 min in the future"
            ),
            "{err}"
        );
        let just_inside = parse(
            r#"{"user_id":"u","source":"s","kind":"message","timestamp":"2026-11-24T10:30:00Z"}"#,
        );
        assert!(validate_event(&just_inside, &policy()).is_ok());
        let old = parse(
            r#"{"user_id":"u","source":"s","kind":"message","timestamp":"2026-10-01T00:00:00Z"}"#,
        );
        let err = validate_event(&old, &policy()).unwrap_err().to_string();
        assert!(
            err.contains("older than this tenant's horizon of 30 days"),
            "{err}"
        );
    }

    #[test]
    fn afk_status_is_checked_and_all_problems_are_listed() {
        let ev = parse(
            r#"{"user_id":"","source":"aw","kind":"afk","timestamp":"2026-11-24T09:00:00Z","attributes":{"status":"away"}}"#,
        );
        let err = validate_event(&ev, &policy()).unwrap_err();
        assert_eq!(err.problems.len(), 2);
        assert_eq!(
            err.to_string(),
            "user_id: must not be empty; attributes.status: `away` is not valid for kind `afk`; use one of afk, not-afk"
        );
    }

    #[test]
    fn sizes_are_limited() {
        let title = "t".repeat(MAX_TITLE_BYTES + 1);
        let json = format!(
            r#"{{"user_id":"u","source":"s","kind":"window_focus","timestamp":"2026-11-24T09:00:00Z","attributes":{{"app":"x","title":"{title}"}}}}"#
        );
        let err = validate_event(&parse(&json), &policy())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "attributes.title: is 1025 bytes; the limit is 1024 bytes"
        );
    }

    #[test]
    fn tenant_ids_are_path_safe() {
        assert!(validate_tenant_id("acme-01_x").is_ok());
        assert!(validate_tenant_id("../etc").is_err());
        assert!(validate_tenant_id("").is_err());
    }
}
