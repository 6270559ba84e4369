//! The parameters behind every behavioral feature: a tenant's settings (category and
//! productivity rules, timeouts, rates, redaction) and each person's profile (time zone,
//! working hours, manager, team, goals). What each one means, and its default, is in
//! `docs/features.md`.
//!
//! Both are plain data validated here ([`TenantSettings::validate`],
//! [`PersonProfile::validate`]) so that the API refuses a bad rule with a precise message
//! before it reaches a pipeline. [`params_version`] fingerprints the effective parameters;
//! every feature row carries it, so a reader can tell which rules produced a value and a
//! replay with unchanged rules writes the same version.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Which attribute of an activity a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RuleField {
    App,
    Title,
    Url,
    Project,
}

/// Collaboration channel of an application, for F4's chat and email time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Chat,
    Email,
}

/// Maps matching activity to a category; `level` overrides the category's level for the
/// matched activity only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategoryRule {
    #[serde(default = "default_field")]
    pub field: RuleField,
    /// Regular expression (Rust `regex` syntax), matched case-insensitively anywhere in
    /// the field.
    pub pattern: String,
    pub category: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
}

fn default_field() -> RuleField {
    RuleField::App
}

/// A category and its productivity level, −2 (very distracting) … +2 (very productive).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategoryLevel {
    pub name: String,
    pub level: i8,
}

/// Rewrites a title or URL at ingest, before the event reaches the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redaction {
    pub field: RuleField,
    pub pattern: String,
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_replacement() -> String {
    "[redacted]".into()
}

/// Per-tenant parameters of the features. Every field has a default, so `{}` is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// Categories and their levels; a category named by a rule but not listed is level 0.
    pub categories: Vec<CategoryLevel>,
    /// Category rules, first match wins (after the person's own rules).
    pub rules: Vec<CategoryRule>,
    /// Input idle time under which a person still counts as present (s).
    pub afk_timeout_secs: u32,
    /// Longest gap between editor heartbeats credited as coding (s), 60–14400.
    pub keystroke_timeout_secs: u32,
    /// Applications whose focus counts as presence even without input (regex on app).
    pub always_active_apps: Vec<String>,
    /// Cost of one attendee-hour of meetings.
    pub meeting_cost_per_hour: f64,
    /// Estimated time per sent chat message when no chat-app focus is known (s).
    pub chat_secs_per_message: u32,
    /// Estimated time per sent email when no mail-app focus is known (s).
    pub email_secs_per_email: u32,
    /// Categories whose continuous active time counts as deep work (F6).
    pub focus_categories: Vec<String>,
    /// Shortest continuous block counted as deep work (s).
    pub deep_work_min_secs: u32,
    /// Productive minutes that make a day an active day.
    pub active_day_productive_minutes: u32,
    /// Smallest group whose aggregates are shown (k-anonymity).
    pub min_group_size: u32,
    /// Title/URL redaction applied at ingest.
    pub redactions: Vec<Redaction>,
}

impl Default for TenantSettings {
    fn default() -> Self {
        TenantSettings {
            categories: default_categories(),
            rules: default_rules(),
            afk_timeout_secs: 180,
            keystroke_timeout_secs: 900,
            always_active_apps: Vec::new(),
            meeting_cost_per_hour: 75.0,
            chat_secs_per_message: 30,
            email_secs_per_email: 300,
            focus_categories: vec![
                "development".into(),
                "documentation".into(),
                "design".into(),
            ],
            deep_work_min_secs: 1800,
            active_day_productive_minutes: 60,
            min_group_size: 5,
            redactions: Vec::new(),
        }
    }
}

fn default_categories() -> Vec<CategoryLevel> {
    [
        ("development", 2),
        ("documentation", 1),
        ("design", 1),
        ("communication", 0),
        ("browsing", 0),
        ("uncategorized", 0),
        ("entertainment", -2),
        ("social", -2),
    ]
    .into_iter()
    .map(|(name, level)| CategoryLevel {
        name: name.into(),
        level,
    })
    .collect()
}

/// The built-in rules: common applications by name.
fn default_rules() -> Vec<CategoryRule> {
    let rule = |pattern: &str, category: &str, channel: Option<Channel>| CategoryRule {
        field: RuleField::App,
        pattern: pattern.into(),
        category: category.into(),
        level: None,
        channel,
    };
    vec![
        rule(
            "code|intellij|idea|pycharm|goland|clion|rider|webstorm|vim|emacs|xcode|android studio|sublime|zed|terminal|iterm|alacritty|kitty|konsole|wezterm",
            "development",
            None,
        ),
        rule(
            "slack|teams|mattermost|telegram|signal|whatsapp",
            "communication",
            Some(Channel::Chat),
        ),
        rule(
            "outlook|thunderbird|mail",
            "communication",
            Some(Channel::Email),
        ),
        rule("zoom|meet|webex", "communication", None),
        rule(
            "word|docs|notion|confluence|obsidian|libreoffice|excel|sheets|powerpoint|keynote|jira|linear",
            "documentation",
            None,
        ),
        rule(
            "figma|sketch|photoshop|illustrator|inkscape|gimp",
            "design",
            None,
        ),
        rule(
            "youtube|netflix|spotify|steam|twitch|games",
            "entertainment",
            None,
        ),
        rule(
            "twitter|facebook|instagram|reddit|tiktok|discord",
            "social",
            None,
        ),
        rule(
            "firefox|chrome|chromium|safari|edge|brave|opera",
            "browsing",
            None,
        ),
    ]
}

/// Daily goals for F13.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Goals {
    pub productive_hours: f64,
    pub focus_hours: f64,
}

impl Default for Goals {
    fn default() -> Self {
        Goals {
            productive_hours: 6.0,
            focus_hours: 3.0,
        }
    }
}

/// One person's profile. Every field has a default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PersonProfile {
    /// IANA time zone; `None` uses the pipeline's default zone.
    pub timezone: Option<String>,
    /// Working days, `mon` … `sun`.
    pub work_days: Vec<String>,
    /// Start and end of working hours, local `HH:MM`.
    pub work_start: String,
    pub work_end: String,
    /// Pseudonymous id of the person's manager (F12).
    pub manager: Option<String>,
    pub team: Option<String>,
    pub goals: Goals,
    /// The person's own category rules, tried before the tenant's.
    pub rules: Vec<CategoryRule>,
}

impl Default for PersonProfile {
    fn default() -> Self {
        PersonProfile {
            timezone: None,
            work_days: ["mon", "tue", "wed", "thu", "fri"]
                .map(String::from)
                .to_vec(),
            work_start: "08:00".into(),
            work_end: "17:00".into(),
            manager: None,
            team: None,
            goals: Goals::default(),
            rules: Vec::new(),
        }
    }
}

pub const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Parses `HH:MM` (00:00–24:00) into minutes after midnight.
pub fn parse_clock(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

fn check_regex(path: &str, pattern: &str) -> Result<(), String> {
    // Validation lives here (the crate does no I/O, but compiling a pattern is pure) so
    // the API can name the bad rule.
    regex_syntax::Parser::new()
        .parse(pattern)
        .map(|_| ())
        .map_err(|e| format!("{path}: `{pattern}` is not a valid regular expression: {e}"))
}

fn check_rules(prefix: &str, rules: &[CategoryRule]) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        let path = format!("{prefix}[{i}]");
        check_regex(&format!("{path}.pattern"), &r.pattern)?;
        if r.category.trim().is_empty() || r.category.len() > 64 {
            return Err(format!("{path}.category must be 1–64 characters"));
        }
        if let Some(l) = r.level
            && !(-2..=2).contains(&l)
        {
            return Err(format!("{path}.level is {l}; levels run from -2 to 2"));
        }
    }
    Ok(())
}

impl TenantSettings {
    /// Checks every field; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        for (i, c) in self.categories.iter().enumerate() {
            if !(-2..=2).contains(&c.level) {
                return Err(format!(
                    "categories[{i}].level is {}; levels run from -2 to 2",
                    c.level
                ));
            }
        }
        check_rules("rules", &self.rules)?;
        for (i, p) in self.always_active_apps.iter().enumerate() {
            check_regex(&format!("always_active_apps[{i}]"), p)?;
        }
        for (i, r) in self.redactions.iter().enumerate() {
            check_regex(&format!("redactions[{i}].pattern"), &r.pattern)?;
            if !matches!(r.field, RuleField::Title | RuleField::Url) {
                return Err(format!("redactions[{i}].field must be `title` or `url`"));
            }
        }
        if !(60..=14_400).contains(&self.keystroke_timeout_secs) {
            return Err(format!(
                "keystroke_timeout_secs is {}; it must be 60–14400 (1–240 min)",
                self.keystroke_timeout_secs
            ));
        }
        if !(1..=3600).contains(&self.afk_timeout_secs) {
            return Err(format!(
                "afk_timeout_secs is {}; it must be 1–3600",
                self.afk_timeout_secs
            ));
        }
        if !(self.meeting_cost_per_hour.is_finite() && self.meeting_cost_per_hour >= 0.0) {
            return Err("meeting_cost_per_hour must be a non-negative number".into());
        }
        if self.min_group_size < 2 {
            return Err(format!(
                "min_group_size is {}; it must be at least 2",
                self.min_group_size
            ));
        }
        Ok(())
    }
}

impl PersonProfile {
    /// Checks every field; the error names the field and what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        for d in &self.work_days {
            if !WEEKDAYS.contains(&d.as_str()) {
                return Err(format!(
                    "work_days: `{d}` is not one of mon, tue, wed, thu, fri, sat, sun"
                ));
            }
        }
        let start = parse_clock(&self.work_start)
            .ok_or_else(|| format!("work_start `{}` is not HH:MM", self.work_start))?;
        let end = parse_clock(&self.work_end)
            .ok_or_else(|| format!("work_end `{}` is not HH:MM", self.work_end))?;
        if end <= start {
            return Err(format!(
                "work_end {} must be after work_start {} (overnight schedules are not supported)",
                self.work_end, self.work_start
            ));
        }
        for (name, v) in [
            ("goals.productive_hours", self.goals.productive_hours),
            ("goals.focus_hours", self.goals.focus_hours),
        ] {
            if !(v.is_finite() && (0.0..=24.0).contains(&v)) {
                return Err(format!("{name} is {v}; it must be 0–24"));
            }
        }
        check_rules("rules", &self.rules)
    }

    /// Working minutes per work day.
    pub fn workday_minutes(&self) -> u32 {
        let start = parse_clock(&self.work_start).unwrap_or(8 * 60);
        let end = parse_clock(&self.work_end).unwrap_or(17 * 60);
        end.saturating_sub(start)
    }

    /// The data-quality flag of `docs/features.md`: a workday under 4 h or over 15 h.
    pub fn implausible_workday(&self) -> bool {
        let m = self.workday_minutes();
        !(240..=900).contains(&m)
    }
}

/// Fingerprint of the parameters a person's features were computed with.
pub fn params_version(settings: &TenantSettings, profile: &PersonProfile) -> u64 {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(settings).unwrap_or_default());
    h.update([0]);
    h.update(serde_json::to_vec(profile).unwrap_or_default());
    let d = h.finalize();
    // 53 bits, so the value survives JSON readers that hold numbers as doubles.
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_empty_json_gives_defaults() {
        let s: TenantSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(s, TenantSettings::default());
        s.validate().unwrap();
        let p: PersonProfile = serde_json::from_str("{}").unwrap();
        p.validate().unwrap();
        assert_eq!(p.workday_minutes(), 540);
        assert!(!p.implausible_workday());
    }

    #[test]
    fn bad_values_are_named() {
        let s: TenantSettings =
            serde_json::from_str(r#"{"rules":[{"pattern":"(unclosed","category":"x"}]}"#).unwrap();
        let e = s.validate().unwrap_err();
        assert!(e.starts_with("rules[0].pattern"), "{e}");
        let s = TenantSettings {
            keystroke_timeout_secs: 30,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("60–14400"));
        let p = PersonProfile {
            work_start: "18:00".into(),
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("must be after"));
        let p = PersonProfile {
            work_days: vec!["monday".into()],
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("`monday`"));
        assert!(serde_json::from_str::<PersonProfile>(r#"{"tz":"UTC"}"#).is_err());
    }

    #[test]
    fn clock_parsing() {
        assert_eq!(parse_clock("08:30"), Some(510));
        assert_eq!(parse_clock("24:00"), Some(1440));
        assert_eq!(parse_clock("24:01"), None);
        assert_eq!(parse_clock("8:30"), None);
    }

    #[test]
    fn version_follows_the_parameters() {
        let s = TenantSettings::default();
        let p = PersonProfile::default();
        let v = params_version(&s, &p);
        assert_eq!(v, params_version(&s.clone(), &p.clone()));
        let changed = TenantSettings {
            afk_timeout_secs: 120,
            ..Default::default()
        };
        assert_ne!(v, params_version(&changed, &p));
        assert!(v < (1 << 53));
    }
}

/// Tenant settings and person profiles written after some revision of the metadata store,
/// in revision order: what a pipeline applies to stay current.
#[derive(Debug, Default)]
pub struct Changes {
    /// (tenant, its settings).
    pub settings: Vec<(String, TenantSettings)>,
    /// (tenant, person, their profile).
    pub profiles: Vec<(String, String, PersonProfile)>,
    /// The newest revision included; ask for the changes after it next.
    pub revision: i64,
}
