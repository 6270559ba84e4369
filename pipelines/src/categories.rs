//! Built-in activity categories and productivity levels (−2 very distracting … +2 very
//! productive), used until a tenant defines its own rules.
//!
//! Matching is a case-insensitive substring test on the application name, first rule wins;
//! anything unmatched is `uncategorized` at level 0.

/// A category and its productivity level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Category {
    pub name: &'static str,
    pub level: i8,
}

impl Category {
    /// Labels that count as distraction in context-switch types.
    pub fn is_distraction(self) -> bool {
        self.level < 0
    }

    pub fn is_communication(self) -> bool {
        self.name == COMMUNICATION
    }
}

pub const COMMUNICATION: &str = "communication";

const RULES: &[(&[&str], Category)] = &[
    (
        &[
            "code",
            "intellij",
            "idea",
            "pycharm",
            "goland",
            "clion",
            "rider",
            "webstorm",
            "vim",
            "emacs",
            "xcode",
            "android studio",
            "sublime",
            "zed",
            "terminal",
            "iterm",
            "alacritty",
            "kitty",
            "konsole",
            "wezterm",
        ],
        Category {
            name: "development",
            level: 2,
        },
    ),
    (
        &[
            "slack",
            "teams",
            "zoom",
            "meet",
            "outlook",
            "thunderbird",
            "mail",
            "mattermost",
            "telegram",
            "signal",
            "whatsapp",
            "webex",
        ],
        Category {
            name: COMMUNICATION,
            level: 0,
        },
    ),
    (
        &[
            "word",
            "docs",
            "notion",
            "confluence",
            "obsidian",
            "libreoffice",
            "excel",
            "sheets",
            "powerpoint",
            "keynote",
            "jira",
            "linear",
        ],
        Category {
            name: "documentation",
            level: 1,
        },
    ),
    (
        &[
            "figma",
            "sketch",
            "photoshop",
            "illustrator",
            "inkscape",
            "gimp",
        ],
        Category {
            name: "design",
            level: 1,
        },
    ),
    (
        &["youtube", "netflix", "spotify", "steam", "twitch", "games"],
        Category {
            name: "entertainment",
            level: -2,
        },
    ),
    (
        &[
            "twitter",
            "facebook",
            "instagram",
            "reddit",
            "tiktok",
            "discord",
        ],
        Category {
            name: "social",
            level: -2,
        },
    ),
    (
        &[
            "firefox", "chrome", "chromium", "safari", "edge", "brave", "opera",
        ],
        Category {
            name: "browsing",
            level: 0,
        },
    ),
];

pub const UNCATEGORIZED: Category = Category {
    name: "uncategorized",
    level: 0,
};

/// The category of an application.
pub fn categorize(app: &str) -> Category {
    let lower = app.to_lowercase();
    RULES
        .iter()
        .find(|(patterns, _)| patterns.iter().any(|p| lower.contains(p)))
        .map(|(_, c)| *c)
        .unwrap_or(UNCATEGORIZED)
}

/// Looks a category up by name (for labels stored as names).
pub fn by_name(name: &str) -> Category {
    RULES
        .iter()
        .map(|(_, c)| *c)
        .find(|c| c.name == name)
        .unwrap_or(UNCATEGORIZED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_apps_land_where_expected() {
        assert_eq!(categorize("Code").name, "development");
        assert_eq!(categorize("Slack").name, "communication");
        assert_eq!(categorize("YouTube Music").level, -2);
        assert_eq!(categorize("Firefox").name, "browsing");
        assert_eq!(categorize("Calculator"), UNCATEGORIZED);
        assert!(by_name("social").is_distraction());
    }
}
