//! Title and URL redaction at ingest: each tenant's `redactions` patterns rewrite window
//! titles and URLs before an event reaches the bus, so the redacted text is never stored,
//! published or processed.
//!
//! Patterns are matched case-insensitively; every match is replaced (`$1` and named groups
//! work in the replacement). Tenants without rules pay one map lookup per request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use digame_schemas::ActivityEvent;
use digame_schemas::profile::{Redaction, RuleField};
use regex::{Regex, RegexBuilder};

/// One tenant's compiled redaction rules.
#[derive(Debug)]
pub struct Redactor {
    title: Vec<(Regex, String)>,
    url: Vec<(Regex, String)>,
}

impl Redactor {
    /// Compiles `rules`; the error names the failing rule.
    pub fn new(rules: &[Redaction]) -> Result<Self, String> {
        let mut r = Redactor {
            title: Vec::new(),
            url: Vec::new(),
        };
        for (i, rule) in rules.iter().enumerate() {
            let re = RegexBuilder::new(&rule.pattern)
                .case_insensitive(true)
                .build()
                .map_err(|e| format!("redactions[{i}].pattern: {e}"))?;
            let list = match rule.field {
                RuleField::Title => &mut r.title,
                RuleField::Url => &mut r.url,
                other => {
                    return Err(format!(
                        "redactions[{i}].field `{other:?}` cannot be redacted; use title or url"
                    ));
                }
            };
            list.push((re, rule.replacement.clone()));
        }
        Ok(r)
    }

    pub fn is_empty(&self) -> bool {
        self.title.is_empty() && self.url.is_empty()
    }

    /// Rewrites the event's title and URL in place.
    pub fn apply(&self, ev: &mut ActivityEvent) {
        rewrite(&mut ev.attributes.title, &self.title);
        rewrite(&mut ev.attributes.url, &self.url);
    }
}

fn rewrite(field: &mut Option<String>, rules: &[(Regex, String)]) {
    let Some(text) = field else { return };
    for (re, replacement) in rules {
        if let std::borrow::Cow::Owned(new) = re.replace_all(text, replacement.as_str()) {
            *text = new;
        }
    }
}

/// Every tenant's redactor, replaced as settings change.
#[derive(Debug, Default)]
pub struct Redactions {
    by_tenant: RwLock<HashMap<String, Arc<Redactor>>>,
}

impl Redactions {
    /// Installs a tenant's rules (none: redaction off for the tenant).
    pub fn set(&self, tenant: &str, rules: &[Redaction]) -> Result<(), String> {
        let redactor = Redactor::new(rules)?;
        let mut map = self.by_tenant.write().unwrap_or_else(|e| e.into_inner());
        if redactor.is_empty() {
            map.remove(tenant);
        } else {
            map.insert(tenant.to_string(), Arc::new(redactor));
        }
        Ok(())
    }

    pub fn get(&self, tenant: &str) -> Option<Arc<Redactor>> {
        let map = self.by_tenant.read().unwrap_or_else(|e| e.into_inner());
        map.get(tenant).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(title: &str, url: &str) -> ActivityEvent {
        serde_json::from_value(serde_json::json!({
            "user_id": "ana", "source": "t", "kind": "window_focus",
            "timestamp": 0, "attributes": {"app": "Chrome", "title": title, "url": url}
        }))
        .unwrap()
    }

    #[test]
    fn titles_and_urls_are_rewritten_case_insensitively() {
        let r = Redactor::new(&[
            Redaction {
                field: RuleField::Title,
                pattern: r"[\w.]+@[\w.]+".into(),
                replacement: "[email]".into(),
            },
            Redaction {
                field: RuleField::Url,
                pattern: r"(https://[^/]+)/.*".into(),
                replacement: "$1/…".into(),
            },
            Redaction {
                field: RuleField::Title,
                pattern: "SECRET PROJECT".into(),
                replacement: "[redacted]".into(),
            },
        ])
        .unwrap();
        let mut ev = event(
            "Mail to bob@example.com about the secret project",
            "https://mail.example.com/inbox/123?q=x",
        );
        r.apply(&mut ev);
        assert_eq!(
            ev.attributes.title.as_deref(),
            Some("Mail to [email] about the [redacted]")
        );
        assert_eq!(
            ev.attributes.url.as_deref(),
            Some("https://mail.example.com/…")
        );
        assert_eq!(ev.attributes.app.as_deref(), Some("Chrome"));
    }

    #[test]
    fn rules_are_installed_and_removed_per_tenant() {
        let all = Redactions::default();
        let rule = Redaction {
            field: RuleField::Title,
            pattern: "x".into(),
            replacement: "y".into(),
        };
        all.set("acme", std::slice::from_ref(&rule)).unwrap();
        assert!(all.get("acme").is_some());
        assert!(all.get("globex").is_none());
        all.set("acme", &[]).unwrap();
        assert!(all.get("acme").is_none());
        let bad = Redaction {
            pattern: "(".into(),
            ..rule
        };
        let err = all.set("acme", &[bad]).unwrap_err();
        assert!(err.starts_with("redactions[0].pattern:"), "{err}");
    }
}
