//! Compiled parameters of one person: their tenant's category rules (with the person's own
//! rules in front), levels, channels, schedule, goals and thresholds, ready for the
//! operators. Built once per parameter change and shared (`Arc`) by every person it
//! applies to.
//!
//! Classification: rules are tried in order — the person's, then the tenant's — and the
//! first whose pattern matches its field (case-insensitively, anywhere) decides the
//! category; a rule's `level` overrides its category's level for that activity only.
//! Unmatched activity is `uncategorized` at level 0.

use std::sync::Arc;

use chrono_tz::Tz;
use digame_schemas::profile::{
    CategoryRule, Channel, PersonProfile, RuleField, TenantSettings, WEEKDAYS, parse_clock,
};
use regex::{Regex, RegexBuilder};

use crate::window::parse_tz;

/// Category name whose switches count as `to_communication` (F8).
pub const COMMUNICATION: &str = "communication";
pub const UNCATEGORIZED: &str = "uncategorized";

/// What the rules say about one activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// Index into [`Rules::category_name`].
    pub category: u16,
    pub level: i8,
    pub channel: Option<Channel>,
}

struct Rule {
    field: RuleField,
    regex: Regex,
    category: u16,
    level: Option<i8>,
    channel: Option<Channel>,
}

/// Compiled category rules.
pub struct Rules {
    rules: Vec<Rule>,
    /// Category names and their levels; index 0 is `uncategorized`.
    categories: Vec<(String, i8)>,
    focus: Vec<bool>,
    always_active: Option<Regex>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.rules.len())
            .field("categories", &self.categories)
            .finish()
    }
}

fn compile(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("`{pattern}`: {e}"))
}

impl Rules {
    /// Compiles the person's rules followed by the tenant's.
    pub fn new(settings: &TenantSettings, person_rules: &[CategoryRule]) -> Result<Self, String> {
        let mut categories: Vec<(String, i8)> = vec![(UNCATEGORIZED.into(), 0)];
        for c in &settings.categories {
            match categories.iter_mut().find(|(n, _)| *n == c.name) {
                Some(existing) => existing.1 = c.level,
                None => categories.push((c.name.clone(), c.level)),
            }
        }
        let mut rules = Vec::new();
        for r in person_rules.iter().chain(&settings.rules) {
            let category = match categories.iter().position(|(n, _)| *n == r.category) {
                Some(i) => i,
                None => {
                    categories.push((r.category.clone(), 0));
                    categories.len() - 1
                }
            };
            rules.push(Rule {
                field: r.field,
                regex: compile(&r.pattern)?,
                category: category as u16,
                level: r.level,
                channel: r.channel,
            });
        }
        let focus = categories
            .iter()
            .map(|(n, _)| settings.focus_categories.contains(n))
            .collect();
        let always_active = if settings.always_active_apps.is_empty() {
            None
        } else {
            Some(compile(&settings.always_active_apps.join("|"))?)
        };
        Ok(Rules {
            rules,
            categories,
            focus,
            always_active,
        })
    }

    /// Classifies an activity by its attributes.
    pub fn classify(
        &self,
        app: Option<&str>,
        title: Option<&str>,
        url: Option<&str>,
        project: Option<&str>,
    ) -> Class {
        for r in &self.rules {
            let text = match r.field {
                RuleField::App => app,
                RuleField::Title => title,
                RuleField::Url => url,
                RuleField::Project => project,
            };
            if text.is_some_and(|t| r.regex.is_match(t)) {
                return Class {
                    category: r.category,
                    level: r.level.unwrap_or(self.categories[r.category as usize].1),
                    channel: r.channel,
                };
            }
        }
        Class {
            category: 0,
            level: self.categories[0].1,
            channel: None,
        }
    }

    /// Whether any rule looks beyond the application name (then classification depends on
    /// title, URL and project too, and cannot be cached per application).
    pub fn uses_other_fields(&self) -> bool {
        self.rules.iter().any(|r| r.field != RuleField::App)
    }

    /// Index of a category by name (`uncategorized` when unknown).
    pub fn category_index(&self, name: &str) -> u16 {
        self.categories
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or(0) as u16
    }

    pub fn category_name(&self, i: u16) -> &str {
        &self.categories[i as usize].0
    }

    /// The category's own level (not a rule's override).
    pub fn category_level(&self, i: u16) -> i8 {
        self.categories[i as usize].1
    }

    pub fn is_focus_category(&self, i: u16) -> bool {
        self.focus[i as usize]
    }

    pub fn is_always_active(&self, app: &str) -> bool {
        self.always_active.as_ref().is_some_and(|r| r.is_match(app))
    }
}

/// Everything the operators need to know about one person, compiled.
#[derive(Debug)]
pub struct PersonParams {
    pub tz: Tz,
    pub timezone: String,
    pub rules: Arc<Rules>,
    /// Monday first.
    pub work_days: [bool; 7],
    /// Local minutes after midnight.
    pub work_start_min: u32,
    pub work_end_min: u32,
    pub manager: Option<String>,
    pub team: Option<String>,
    pub productive_goal_ms: i64,
    pub focus_goal_ms: i64,
    pub afk_timeout_ms: i64,
    pub keystroke_timeout_ms: i64,
    pub meeting_cost_per_hour: f64,
    pub chat_ms_per_message: i64,
    pub email_ms_per_email: i64,
    pub deep_work_min_ms: i64,
    pub active_day_productive_ms: i64,
    pub implausible_workday: bool,
    /// [`digame_schemas::params_version`] of the inputs.
    pub version: u64,
}

impl PersonParams {
    /// Compiles a person's parameters. `tenant_rules` is the tenant's compiled rules,
    /// reused when the person has no rules of their own.
    pub fn new(
        settings: &TenantSettings,
        tenant_rules: &Arc<Rules>,
        profile: &PersonProfile,
        default_timezone: &str,
    ) -> Result<Self, String> {
        profile.validate()?;
        let timezone = profile
            .timezone
            .clone()
            .unwrap_or_else(|| default_timezone.to_string());
        let tz = parse_tz(&timezone)?;
        let rules = if profile.rules.is_empty() {
            tenant_rules.clone()
        } else {
            Arc::new(Rules::new(settings, &profile.rules)?)
        };
        let mut work_days = [false; 7];
        for d in &profile.work_days {
            if let Some(i) = WEEKDAYS.iter().position(|w| w == d) {
                work_days[i] = true;
            }
        }
        let hours_ms = |h: f64| (h * 3_600_000.0).round() as i64;
        Ok(PersonParams {
            tz,
            timezone,
            rules,
            work_days,
            work_start_min: parse_clock(&profile.work_start).unwrap_or(480),
            work_end_min: parse_clock(&profile.work_end).unwrap_or(1020),
            manager: profile.manager.clone(),
            team: profile.team.clone(),
            productive_goal_ms: hours_ms(profile.goals.productive_hours),
            focus_goal_ms: hours_ms(profile.goals.focus_hours),
            afk_timeout_ms: i64::from(settings.afk_timeout_secs) * 1000,
            keystroke_timeout_ms: i64::from(settings.keystroke_timeout_secs) * 1000,
            meeting_cost_per_hour: settings.meeting_cost_per_hour,
            chat_ms_per_message: i64::from(settings.chat_secs_per_message) * 1000,
            email_ms_per_email: i64::from(settings.email_secs_per_email) * 1000,
            deep_work_min_ms: i64::from(settings.deep_work_min_secs) * 1000,
            active_day_productive_ms: i64::from(settings.active_day_productive_minutes) * 60_000,
            implausible_workday: profile.implausible_workday(),
            version: digame_schemas::params_version(settings, profile),
        })
    }

    /// Parameters from the defaults, in `timezone`.
    pub fn defaults(timezone: &str) -> Result<Self, String> {
        let settings = TenantSettings::default();
        let rules = Arc::new(Rules::new(&settings, &[])?);
        let profile = PersonProfile {
            timezone: Some(timezone.into()),
            ..Default::default()
        };
        Self::new(&settings, &rules, &profile, timezone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use digame_schemas::profile::CategoryRule;

    fn name(r: &Rules, app: &str) -> String {
        r.category_name(r.classify(Some(app), None, None, None).category)
            .to_string()
    }

    #[test]
    fn default_rules_place_common_apps() {
        let r = Rules::new(&TenantSettings::default(), &[]).unwrap();
        assert_eq!(name(&r, "Code"), "development");
        assert_eq!(name(&r, "Slack"), "communication");
        assert_eq!(
            r.classify(Some("Slack"), None, None, None).channel,
            Some(Channel::Chat)
        );
        assert_eq!(
            r.classify(Some("Thunderbird"), None, None, None).channel,
            Some(Channel::Email)
        );
        assert_eq!(
            r.classify(Some("YouTube Music"), None, None, None).level,
            -2
        );
        assert_eq!(name(&r, "Firefox"), "browsing");
        assert_eq!(name(&r, "Calculator"), UNCATEGORIZED);
        assert!(r.is_focus_category(r.classify(Some("vim"), None, None, None).category));
    }

    #[test]
    fn person_rules_come_first_and_rule_levels_override() {
        let settings = TenantSettings {
            rules: vec![CategoryRule {
                field: RuleField::Title,
                pattern: r"digame\.atlassian".into(),
                category: "documentation".into(),
                level: None,
                channel: None,
            }]
            .into_iter()
            .chain(TenantSettings::default().rules)
            .collect(),
            ..Default::default()
        };
        let mine = [CategoryRule {
            field: RuleField::App,
            pattern: "^youtube$".into(),
            category: "entertainment".into(),
            level: Some(1),
            channel: None,
        }];
        let r = Rules::new(&settings, &mine).unwrap();
        let yt = r.classify(Some("YouTube"), None, None, None);
        assert_eq!(
            (r.category_name(yt.category), yt.level),
            ("entertainment", 1)
        );
        // The category itself stays distracting.
        assert_eq!(r.category_level(yt.category), -2);
        let wiki = r.classify(
            Some("Firefox"),
            Some("Page - digame.atlassian.net"),
            None,
            None,
        );
        assert_eq!(r.category_name(wiki.category), "documentation");
    }
}
