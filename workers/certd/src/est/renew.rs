//! When an EST identity certificate is renewed (spec certd.md §6.4): the deadline and retry
//! period from `[cert_issuance.est.identity_auto_renew]`, and the registered credentials.

use crate::config::{AutoRenew, RenewalPolicy};

/// One registered EST identity: its cert and key IDs, the cert ID whose URL and auth are used
/// to renew it, and its schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub cert: String,
    pub pk: String,
    /// URL and auth are resolved as for this cert ID (spec §6.4 step 5).
    pub lookup: String,
    /// SHA-256 of the leaf's DER when registered or last renewed: a different file on disk is
    /// not renewed (someone replaced it).
    pub leaf_hash: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
    /// Unix time of the next attempt.
    pub next: i64,
    /// Seconds between failed attempts.
    pub retry: i64,
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The renewal deadline of a cert valid from `nb` to `na`.
pub fn deadline(policy: &AutoRenew, nb: i64, na: i64) -> i64 {
    let life = na - nb;
    match policy.threshold {
        RenewalPolicy::Percent(p) => na - (life - life * p as i64 / 100),
        RenewalPolicy::Seconds(t) => na - t as i64,
    }
}

/// Seconds between attempts (at least 1).
pub fn retry_period(policy: &AutoRenew, nb: i64, na: i64) -> i64 {
    let life = na - nb;
    let r = match policy.retry {
        RenewalPolicy::Percent(p) => life * p as i64 / 100,
        RenewalPolicy::Seconds(t) => t as i64,
    };
    r.max(1)
}

/// Whether a cert valid from `nb` to `na` is due at `now`.
pub fn should_renew(policy: &AutoRenew, nb: i64, na: i64, now: i64) -> bool {
    if nb >= na || now >= na {
        return true;
    }
    match policy.threshold {
        RenewalPolicy::Percent(p) => (now - nb) * 100 / (na - nb) >= p as i64,
        RenewalPolicy::Seconds(t) => na - now <= t as i64,
    }
}

/// The first attempt for a cert valid from `nb` to `na`, registered or renewed at `now`.
pub fn schedule(policy: &AutoRenew, nb: i64, na: i64, now: i64) -> i64 {
    if should_renew(policy, nb, na, now) {
        now
    } else {
        deadline(policy, nb, na).max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(threshold: RenewalPolicy, retry: RenewalPolicy) -> AutoRenew {
        AutoRenew { rotate_key: true, threshold, retry }
    }

    #[test]
    fn percentages_and_times() {
        let p = policy(RenewalPolicy::Percent(80), RenewalPolicy::Percent(4));
        assert_eq!(deadline(&p, 1000, 2000), 1800);
        assert_eq!(retry_period(&p, 1000, 2000), 40);
        assert!(!should_renew(&p, 1000, 2000, 1799));
        assert!(should_renew(&p, 1000, 2000, 1800));
        assert_eq!(schedule(&p, 1000, 2000, 1500), 1800);
        assert_eq!(schedule(&p, 1000, 2000, 1900), 1900);
        let t = policy(RenewalPolicy::Seconds(300), RenewalPolicy::Seconds(60));
        assert_eq!(deadline(&t, 0, 1000), 700);
        assert_eq!(retry_period(&t, 0, 1000), 60);
        assert!(should_renew(&t, 0, 1000, 700));
        assert!(!should_renew(&t, 0, 1000, 699));
        // invalid and expired certs are due; the retry period is at least one second
        assert!(should_renew(&p, 5, 5, 0));
        assert!(should_renew(&p, 0, 10, 10));
        assert_eq!(retry_period(&p, 0, 10), 1);
    }
}
