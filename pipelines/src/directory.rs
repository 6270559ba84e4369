//! Where the operators get each person's parameters: tenant settings and person profiles,
//! compiled once per change into shared [`PersonParams`].
//!
//! The directory is filled by whoever owns the metadata (the runtime refreshes it from the
//! metadata store; tests and benchmarks set it directly). Every change bumps
//! [`Directory::generation`], so people holding compiled parameters know to look again;
//! compiled parameters are cached per tenant and per person until the next change.

use std::collections::HashMap;
use std::sync::Arc;

use digame_schemas::profile::{PersonProfile, TenantSettings};

use crate::rules::{PersonParams, Rules};

#[derive(Clone)]
struct Tenant {
    settings: TenantSettings,
    rules: Arc<Rules>,
}

/// Tenant settings and person profiles, with compiled parameters cached.
#[derive(Clone)]
pub struct Directory {
    default_timezone: String,
    defaults: Tenant,
    tenants: HashMap<String, Tenant>,
    profiles: HashMap<(String, String), PersonProfile>,
    compiled: HashMap<(String, String), Arc<PersonParams>>,
    generation: u64,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("tenants", &self.tenants.len())
            .field("profiles", &self.profiles.len())
            .field("generation", &self.generation)
            .finish()
    }
}

impl Directory {
    pub fn new(default_timezone: &str) -> Result<Self, String> {
        crate::window::parse_tz(default_timezone)?;
        let settings = TenantSettings::default();
        let rules = Arc::new(Rules::new(&settings, &[])?);
        Ok(Directory {
            default_timezone: default_timezone.into(),
            defaults: Tenant { settings, rules },
            tenants: HashMap::new(),
            profiles: HashMap::new(),
            compiled: HashMap::new(),
            generation: 1,
        })
    }

    /// Bumped by every change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Replaces a tenant's settings (validated and compiled here).
    pub fn set_settings(&mut self, tenant: &str, settings: TenantSettings) -> Result<(), String> {
        settings.validate()?;
        let rules = Arc::new(Rules::new(&settings, &[])?);
        self.tenants
            .insert(tenant.into(), Tenant { settings, rules });
        self.compiled.retain(|(t, _), _| t != tenant);
        self.generation += 1;
        Ok(())
    }

    /// Replaces a person's profile.
    pub fn set_profile(
        &mut self,
        tenant: &str,
        user: &str,
        profile: PersonProfile,
    ) -> Result<(), String> {
        profile.validate()?;
        if let Some(tz) = &profile.timezone {
            crate::window::parse_tz(tz)?;
        }
        let key = (tenant.to_string(), user.to_string());
        self.compiled.remove(&key);
        self.profiles.insert(key, profile);
        self.generation += 1;
        Ok(())
    }

    pub fn profile(&self, tenant: &str, user: &str) -> Option<&PersonProfile> {
        self.profiles.get(&(tenant.to_string(), user.to_string()))
    }

    pub fn settings(&self, tenant: &str) -> &TenantSettings {
        &self.tenants.get(tenant).unwrap_or(&self.defaults).settings
    }

    /// The compiled parameters of a person (defaults where nothing is set).
    pub fn params(&mut self, tenant: &str, user: &str) -> Arc<PersonParams> {
        let key = (tenant.to_string(), user.to_string());
        if let Some(p) = self.compiled.get(&key) {
            return p.clone();
        }
        let t = self.tenants.get(tenant).unwrap_or(&self.defaults);
        let default_profile = PersonProfile::default();
        let profile = self.profiles.get(&key).unwrap_or(&default_profile);
        // Both inputs were validated when set, so compiling cannot fail; the defaults
        // stand in should it ever.
        let p = PersonParams::new(&t.settings, &t.rules, profile, &self.default_timezone)
            .or_else(|_| PersonParams::new(&t.settings, &t.rules, &default_profile, "UTC"))
            .expect("default parameters compile");
        let p = Arc::new(p);
        self.compiled.insert(key, p.clone());
        p
    }
}
