//! Roles and permissions: the catalogue every authorization decision is made from.
//!
//! Permissions are granular (`area:action[:scope]`); roles are fixed sets of them, ordered
//! so that each role above holds everything of the roles below it:
//!
//! ```text
//! platform_admin ⊃ tenant_admin ⊃ analyst ⊃ manager ⊃ member
//!                  tenant_admin ⊃ ingestion_agent
//! ```
//!
//! - `member`: a person using their own twin. Reads their own person-level data only.
//! - `manager`: a member who also sees the aggregates of the people they manage (or of
//!   their team), under k-anonymity — never a report's person-level data.
//! - `analyst`: reads the tenant's data for analysis: any person's features, styles,
//!   read-only SQL, dashboards, models, exports. Cannot change who has access.
//! - `tenant_admin`: runs the tenant: accounts, keys, settings, profiles, deletion and
//!   retention, recompute jobs, the audit log. Holds every tenant permission.
//! - `platform_admin`: operates the platform: creates tenants (and their first admin),
//!   and is a tenant admin of its own tenant. It does not read other tenants' data.
//! - `ingestion_agent`: what collector and connector keys act as: sends events, nothing
//!   else (it is below tenant_admin, beside the people roles).
//!
//! A permission is a bit in [`Permissions`], so checks on the request path are one AND.

use serde::Serialize;

macro_rules! permissions {
    ($($variant:ident = $name:literal: $doc:literal,)*) => {
        /// One granular permission.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Permission { $(#[doc = $doc] $variant,)* }

        impl Permission {
            /// Every permission, in declaration order.
            pub const ALL: &'static [Permission] = &[$(Permission::$variant,)*];

            /// The permission's name (`events:write`).
            pub fn name(self) -> &'static str {
                match self { $(Permission::$variant => $name,)* }
            }

            /// What the permission allows.
            pub fn description(self) -> &'static str {
                match self { $(Permission::$variant => $doc,)* }
            }
        }
    };
}

permissions! {
    EventsWrite = "events:write": "send activity events to the ingest endpoints",
    FeaturesReadSelf = "features:read:self": "read one's own person-level features and views",
    FeaturesReadTeam = "features:read:team": "read aggregates of the people one manages or one's team (k-anonymous)",
    FeaturesReadTenant = "features:read:tenant": "read any person's features and any group's aggregates in the tenant",
    SqlQuery = "sql:query": "run read-only SQL over the tenant's data",
    DashboardsRead = "dashboards:read": "view dashboards",
    DashboardsWrite = "dashboards:write": "create, change and delete dashboards",
    ModelsRead = "models:read": "view models and their predictions",
    ModelsWrite = "models:write": "train, configure and retire models",
    ExportsRead = "exports:read": "download finished exports",
    ExportsCreate = "exports:create": "start exports of the tenant's data",
    ProfilesRead = "profiles:read": "read anyone's person profile (team, manager, zone, hours)",
    ProfilesWrite = "profiles:write": "change person profiles",
    SettingsRead = "settings:read": "read the tenant's settings",
    SettingsWrite = "settings:write": "change the tenant's settings",
    UsersRead = "users:read": "list and view accounts",
    UsersWrite = "users:write": "create accounts, change roles, disable accounts",
    KeysRead = "keys:read": "list API keys (never their secrets)",
    KeysWrite = "keys:write": "create and revoke API keys",
    AuditRead = "audit:read": "read the audit log",
    DataDelete = "data:delete": "delete a person's data and apply retention",
    JobsRun = "jobs:run": "start background jobs (recompute)",
    JobsRead = "jobs:read": "follow background jobs",
    AccountSelf = "account:self": "see one's own identity, change one's password, sign out",
    TenantsRead = "tenants:read": "list the platform's tenants",
    TenantsWrite = "tenants:write": "create tenants and their first administrator",
}

/// A set of permissions (one bit each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u64);

impl Permissions {
    pub const fn of(list: &[Permission]) -> Permissions {
        let mut bits = 0u64;
        let mut i = 0;
        while i < list.len() {
            bits |= 1 << list[i] as u8;
            i += 1;
        }
        Permissions(bits)
    }

    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & (1 << p as u8) != 0
    }

    /// Whether every permission of `other` is in `self`.
    pub fn includes(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    /// The permissions in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }
}

use Permission::*;

const MEMBER: Permissions = Permissions::of(&[FeaturesReadSelf, DashboardsRead, AccountSelf]);
const MANAGER: Permissions = MEMBER.union(Permissions::of(&[FeaturesReadTeam, ModelsRead]));
const ANALYST: Permissions = MANAGER.union(Permissions::of(&[
    FeaturesReadTenant,
    SqlQuery,
    DashboardsWrite,
    ModelsWrite,
    ExportsRead,
    ExportsCreate,
    ProfilesRead,
    SettingsRead,
    JobsRead,
]));
const INGESTION_AGENT: Permissions = Permissions::of(&[EventsWrite]);
const TENANT_ADMIN: Permissions = ANALYST.union(INGESTION_AGENT).union(Permissions::of(&[
    ProfilesWrite,
    SettingsWrite,
    UsersRead,
    UsersWrite,
    KeysRead,
    KeysWrite,
    AuditRead,
    DataDelete,
    JobsRun,
]));
const PLATFORM_ADMIN: Permissions =
    TENANT_ADMIN.union(Permissions::of(&[TenantsRead, TenantsWrite]));

/// The six roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    Analyst,
    Manager,
    Member,
    IngestionAgent,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::PlatformAdmin,
        Role::TenantAdmin,
        Role::Analyst,
        Role::Manager,
        Role::Member,
        Role::IngestionAgent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Analyst => "analyst",
            Role::Manager => "manager",
            Role::Member => "member",
            Role::IngestionAgent => "ingestion_agent",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }

    pub fn permissions(self) -> Permissions {
        match self {
            Role::PlatformAdmin => PLATFORM_ADMIN,
            Role::TenantAdmin => TENANT_ADMIN,
            Role::Analyst => ANALYST,
            Role::Manager => MANAGER,
            Role::Member => MEMBER,
            Role::IngestionAgent => INGESTION_AGENT,
        }
    }

    /// Whether a holder of `self` may hand out `other` (to an account or a key): only
    /// roles whose permissions it holds itself, so nobody can raise their own access.
    pub fn may_grant(self, other: Role) -> bool {
        self.permissions().includes(other.permissions())
    }

    /// Position in the hierarchy, 0 the highest (for the stored catalogue).
    pub fn rank(self) -> i32 {
        Role::ALL.iter().position(|r| *r == self).unwrap_or(0) as i32
    }

    pub fn description(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "operates the platform: tenants and their first admins",
            Role::TenantAdmin => "runs a tenant: accounts, keys, settings, deletion, audit",
            Role::Analyst => "analyses the tenant's data: any person, SQL, dashboards, models",
            Role::Manager => "sees k-anonymous aggregates of the people they manage",
            Role::Member => "sees their own person-level data",
            Role::IngestionAgent => "collectors and connectors: sends events only",
        }
    }
}

/// The catalogue in the form the metadata store keeps a copy of.
pub fn catalogue() -> (
    Vec<digame_infra::meta::identity::RoleEntry>,
    Vec<(&'static str, &'static str)>,
) {
    let roles = Role::ALL
        .iter()
        .map(|r| digame_infra::meta::identity::RoleEntry {
            role: r.name(),
            rank: r.rank(),
            description: r.description(),
            permissions: r.permissions().iter().map(Permission::name).collect(),
        })
        .collect();
    let permissions = Permission::ALL
        .iter()
        .map(|p| (p.name(), p.description()))
        .collect();
    (roles, permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_twenty_plus_permissions_with_distinct_names() {
        assert!(Permission::ALL.len() >= 20);
        let names: std::collections::BTreeSet<_> =
            Permission::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), Permission::ALL.len());
        assert!(Permission::ALL.len() <= 64, "Permissions is a u64 bitset");
    }

    #[test]
    fn roles_form_the_documented_hierarchy() {
        use Role::*;
        let above = |hi: Role, lo: Role| {
            hi.permissions().includes(lo.permissions()) && hi.permissions() != lo.permissions()
        };
        assert!(above(PlatformAdmin, TenantAdmin));
        assert!(above(TenantAdmin, Analyst));
        assert!(above(Analyst, Manager));
        assert!(above(Manager, Member));
        assert!(above(TenantAdmin, IngestionAgent));
        // The agent branch and the people branch do not overlap.
        assert!(!IngestionAgent.permissions().includes(Member.permissions()));
        assert!(!Member.permissions().contains(Permission::EventsWrite));
        // Hand-checked specifics of the privacy rules.
        assert!(
            !Manager
                .permissions()
                .contains(Permission::FeaturesReadTenant)
        );
        assert!(!Analyst.permissions().contains(Permission::UsersWrite));
        assert!(!TenantAdmin.permissions().contains(Permission::TenantsWrite));
        assert_eq!(
            IngestionAgent.permissions().iter().collect::<Vec<_>>(),
            [Permission::EventsWrite]
        );
        assert!(TenantAdmin.may_grant(Analyst) && !TenantAdmin.may_grant(PlatformAdmin));
        assert!(!Manager.may_grant(IngestionAgent));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.name()), Some(r));
        }
    }
}
