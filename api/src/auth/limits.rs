//! Rate limits: token buckets (GCRA, `governor`) per API key, per account, per tenant, and
//! for sign-in attempts per address and per client IP.
//!
//! A request is charged to its key or account and to its tenant; the first bucket that is
//! empty answers 429 with `Retry-After` (whole seconds, rounded up). Buckets of keys not
//! seen for a while are dropped by [`Limiter::shrink`], so memory stays bounded by the
//! number of recently active callers.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use digame_infra::config::{LimitsConfig, Rate};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which bucket ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    Key,
    Account,
    Tenant,
    Login,
}

impl Bucket {
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Key => "API key",
            Bucket::Account => "account",
            Bucket::Tenant => "tenant",
            Bucket::Login => "sign-in attempts",
        }
    }
}

/// A refusal: which bucket, and when to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub bucket: Bucket,
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds to wait, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
    }
}

fn quota(rate: &Rate, per: Duration) -> Quota {
    let burst = NonZeroU32::new(rate.burst.max(1)).expect("max(1) is non-zero");
    let n = rate.per_period.max(1);
    // One token every per/n, at most `burst` saved up.
    Quota::with_period(per / n)
        .expect("a positive period")
        .allow_burst(burst)
}

/// Every bucket of the server.
pub struct Limiter {
    clock: DefaultClock,
    // Callers and tenants are keyed by the principal's shared strings: charging a
    // request clones two `Arc`s, not two strings.
    key: DefaultKeyedRateLimiter<Arc<str>>,
    account: DefaultKeyedRateLimiter<Arc<str>>,
    tenant: DefaultKeyedRateLimiter<Arc<str>>,
    login: DefaultKeyedRateLimiter<Arc<str>>,
    login_ip: DefaultKeyedRateLimiter<Arc<str>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    pub fn new(config: &LimitsConfig) -> Limiter {
        let sec = Duration::from_secs(1);
        Limiter {
            clock: DefaultClock::default(),
            key: RateLimiter::keyed(quota(&config.per_key, sec)),
            account: RateLimiter::keyed(quota(&config.per_account, sec)),
            tenant: RateLimiter::keyed(quota(&config.per_tenant, sec)),
            login: RateLimiter::keyed(quota(&config.login, Duration::from_secs(60))),
            // One address may front many people (an office NAT): ten times the per-email
            // allowance, still far below what guessing needs.
            login_ip: RateLimiter::keyed(quota(
                &Rate {
                    per_period: config.login.per_period.saturating_mul(10),
                    burst: config.login.burst.saturating_mul(10),
                },
                Duration::from_secs(60),
            )),
        }
    }

    fn check(
        &self,
        limiter: &DefaultKeyedRateLimiter<Arc<str>>,
        bucket: Bucket,
        key: &Arc<str>,
    ) -> Result<(), Limited> {
        limiter.check_key(key).map_err(|not_until| Limited {
            bucket,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Charges one request of a caller (`is_key`: an API key, else an account) of
    /// `tenant`.
    pub fn charge(
        &self,
        caller: &Arc<str>,
        is_key: bool,
        tenant: &Arc<str>,
    ) -> Result<(), Limited> {
        if is_key {
            self.check(&self.key, Bucket::Key, caller)?;
        } else {
            self.check(&self.account, Bucket::Account, caller)?;
        }
        self.check(&self.tenant, Bucket::Tenant, tenant)
    }

    /// Charges one sign-in attempt for `email` and one for the client address (which
    /// may make ten times as many).
    pub fn charge_login(&self, email: &str, ip: &str) -> Result<(), Limited> {
        self.check(&self.login, Bucket::Login, &Arc::from(email))?;
        self.check(&self.login_ip, Bucket::Login, &Arc::from(ip))
    }

    /// Drops the buckets that are full again (callers not seen recently).
    pub fn shrink(&self) {
        for l in [
            &self.key,
            &self.account,
            &self.tenant,
            &self.login,
            &self.login_ip,
        ] {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            per_key: Rate {
                per_period: 100,
                burst: 3,
            },
            per_account: Rate {
                per_period: 100,
                burst: 2,
            },
            per_tenant: Rate {
                per_period: 100,
                burst: 4,
            },
            login: Rate {
                per_period: 5,
                burst: 5,
            },
        }
    }

    #[test]
    fn buckets_empty_in_order_and_say_when_to_retry() {
        let l = Limiter::new(&config());
        assert!(l.charge(&"ana".into(), false, &"acme".into()).is_ok());
        assert!(l.charge(&"ana".into(), false, &"acme".into()).is_ok());
        let refused = l.charge(&"ana".into(), false, &"acme".into()).unwrap_err();
        assert_eq!(refused.bucket, Bucket::Account);
        assert!(refused.retry_after <= Duration::from_millis(10));
        assert_eq!(refused.retry_after_secs(), 1);
        // Another account of the tenant still has its own bucket, until the tenant's
        // (4, two spent above) is empty.
        assert!(l.charge(&"bob".into(), false, &"acme".into()).is_ok());
        assert!(l.charge(&"bob".into(), false, &"acme".into()).is_ok());
        assert_eq!(
            l.charge(&"cy".into(), false, &"acme".into())
                .unwrap_err()
                .bucket,
            Bucket::Tenant
        );
        // Other tenants are unaffected.
        assert!(l.charge(&"cy".into(), false, &"globex".into()).is_ok());
    }

    #[test]
    fn sign_in_attempts_are_limited_per_address_and_per_client() {
        let l = Limiter::new(&config());
        for _ in 0..5 {
            l.charge_login("ana@acme.example", "10.0.0.1").unwrap();
        }
        let refused = l.charge_login("ana@acme.example", "10.0.0.2").unwrap_err();
        assert_eq!(refused.bucket, Bucket::Login);
        // 5 per minute: the next token comes 12 s after the burst was spent.
        assert!(refused.retry_after_secs() > 10 && refused.retry_after_secs() <= 12);
        // One client trying many addresses runs out too, after ten times as many (50).
        for i in 0..45 {
            l.charge_login(&format!("u{i}@acme.example"), "10.0.0.1")
                .unwrap();
        }
        assert!(l.charge_login("bob@acme.example", "10.0.0.1").is_err());
        l.shrink();
    }
}
