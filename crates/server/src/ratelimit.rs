//! Request rate limits per user and per API or session token (issue 13,
//! point 5), checked by the `UserAuth` extractor once the token is known
//! to be valid, so only real users and tokens ever get a bucket.
//!
//! Key design decision: `governor`'s keyed GCRA limiters, in memory, per
//! replica (like the login throttle, docs/SECURITY.md): a flood is refused
//! before it reaches the handler and costs no database write. Memory stays
//! bounded: keys are valid tokens and users only, and buckets that are full
//! again are dropped (`retain_recent`) at most once a minute. Agents'
//! protocol calls authenticate with `AgentToken` and are not limited here:
//! the server paces them (heartbeat interval, long-polls, leases).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How often the limiters forget buckets that are full again.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// One limit: a sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained.
    pub per_second: NonZeroU32,
    /// Requests accepted at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// The limits the server runs with; `None` turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub per_user: Option<Rate>,
    pub per_token: Option<Rate>,
}

impl RateLimits {
    /// A limit from its two settings: 0 requests per second turns it off;
    /// the burst is at least 1.
    pub fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second)?,
            burst: NonZeroU32::new(burst.max(1))?,
        })
    }
}

/// A request over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `user` or `token`: the metric label, also named in the message.
    pub limit: &'static str,
    /// When the next request would be accepted.
    pub retry_after: Duration,
}

/// The keyed limiters of one server.
#[derive(Debug)]
pub struct Limiter {
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    per_token: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
    started: Instant,
    /// Milliseconds after `started` of the last sweep.
    last_sweep: AtomicU64,
}

fn keyed(rate: Option<Rate>) -> Option<DefaultKeyedRateLimiter<String>> {
    rate.map(|r| RateLimiter::keyed(Quota::per_second(r.per_second).allow_burst(r.burst)))
}

impl Limiter {
    pub fn new(limits: RateLimits) -> Limiter {
        Limiter {
            per_user: keyed(limits.per_user),
            per_token: keyed(limits.per_token),
            clock: DefaultClock::default(),
            started: Instant::now(),
            last_sweep: AtomicU64::new(0),
        }
    }

    /// Counts one request of `user` (its id) with `token` (its hash); the
    /// token's limit is checked first, and a refused request counts
    /// against nothing else.
    pub fn check(&self, user: &str, token: &str) -> Result<(), Limited> {
        self.sweep_now_and_then();
        for (limit, limiter, key) in [
            ("token", &self.per_token, token),
            ("user", &self.per_user, user),
        ] {
            let Some(limiter) = limiter else { continue };
            // The key is cloned only for a bucket that does not exist yet
            // inside governor; a String key keeps the map simple.
            if let Err(not_until) = limiter.check_key(&key.to_owned()) {
                return Err(Limited {
                    limit,
                    retry_after: not_until.wait_time_from(self.clock.now()),
                });
            }
        }
        Ok(())
    }

    /// Buckets held (for tests: memory stays bounded).
    pub fn len(&self) -> usize {
        self.per_user.as_ref().map_or(0, |l| l.len())
            + self.per_token.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops buckets that are full again (a key that comes back starts
    /// full, so nothing changes for it), at most once per `SWEEP_EVERY`.
    fn sweep_now_and_then(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY.as_millis() as u64 {
            return;
        }
        if self
            .last_sweep
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        self.sweep();
    }

    /// Drops every bucket that is full again.
    pub fn sweep(&self) {
        for limiter in [&self.per_user, &self.per_token].into_iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits(user: (u32, u32), token: (u32, u32)) -> RateLimits {
        RateLimits {
            per_user: RateLimits::rate(user.0, user.1),
            per_token: RateLimits::rate(token.0, token.1),
        }
    }

    #[test]
    fn a_token_over_its_burst_is_refused_with_a_wait() {
        let l = Limiter::new(limits((1000, 1000), (1, 3)));
        for _ in 0..3 {
            l.check("u1", "t1").unwrap();
        }
        let refused = l.check("u1", "t1").unwrap_err();
        assert_eq!(refused.limit, "token");
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_secs(1));
        // Another token of the same user, and another user, go on.
        l.check("u1", "t2").unwrap();
        l.check("u2", "t3").unwrap();
    }

    #[test]
    fn a_user_is_limited_across_its_tokens() {
        let l = Limiter::new(limits((1, 2), (1000, 1000)));
        l.check("u1", "t1").unwrap();
        l.check("u1", "t2").unwrap();
        assert_eq!(l.check("u1", "t3").unwrap_err().limit, "user");
        l.check("u2", "t4").unwrap();
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let l = Limiter::new(limits((0, 0), (0, 5)));
        for _ in 0..10_000 {
            l.check("u1", "t1").unwrap();
        }
        assert!(l.is_empty());
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let l = Limiter::new(limits((1000, 1000), (1000, 1000)));
        for i in 0..100 {
            l.check(&format!("u{i}"), &format!("t{i}")).unwrap();
        }
        assert_eq!(l.len(), 200);
        std::thread::sleep(Duration::from_millis(50));
        l.sweep();
        assert_eq!(l.len(), 0);
    }
}
