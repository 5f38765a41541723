//! Login throttling. A password check is expensive on purpose (argon2id:
//! 19 MiB and tens of milliseconds), so a client that has not logged in
//! must not be able to start as many as it likes:
//!
//! - at most `concurrency` checks run at once, each in a block of memory
//!   kept for the next one (hashing memory is `concurrency` × 19 MiB,
//!   allocated once), and at most `QUEUE_PER_SLOT` × `concurrency` more
//!   wait; beyond that the answer is 503 at once;
//! - every attempt counts as a failure per account and per client address
//!   (an IPv6 address by its /64) until it succeeds; at the threshold the
//!   account or the address is locked out for the lockout period, during
//!   which every attempt — the right password included — gets 429 with
//!   Retry-After and no check;
//! - each map holds at most `MAX_TRACKED` keys, evicting ended periods
//!   first, then the unlocked key seen least recently.
//!
//! Key design decision: the counts live in this server's memory. Another
//! replica counts on its own (an attacker gets the threshold once per
//! replica) and a restart forgets them; in exchange a flood never reaches
//! the database.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use argon2::Block;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Attempts that may wait for a hashing slot, per slot.
pub const QUEUE_PER_SLOT: usize = 4;

/// Keys each map (accounts, addresses) tracks at most.
pub const MAX_TRACKED: usize = 10_000;

/// Retry-After of an account or address whose attempts in flight already
/// reach the threshold (none of them has failed yet).
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

/// The limits, from the server's configuration.
#[derive(Debug, Clone)]
pub struct LoginLimits {
    /// Password checks run at once.
    pub concurrency: usize,
    /// Failures per account, within `lockout`, that lock it out.
    pub max_failures: u32,
    /// Failures per client address, within `lockout`, that lock it out.
    pub max_failures_per_address: u32,
    /// How long failures are counted, and how long a lockout lasts.
    pub lockout: Duration,
}

/// Why an attempt was refused before its password was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The account or the address is locked out (or its attempts in flight
    /// reach the threshold): 429.
    Locked { retry_after: Duration },
    /// Every hashing slot and queue place is taken: 503.
    Busy,
}

/// A lockout that an attempt's failure started, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lockout {
    Account(String),
    Address(IpAddr),
}

/// The throttle every login goes through; one per server.
#[derive(Debug)]
pub struct LoginGuard {
    hashing: Arc<Semaphore>,
    admission: Arc<Semaphore>,
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
    counts: Mutex<Counts>,
}

#[derive(Debug)]
struct Counts {
    accounts: Tracker<String>,
    addresses: Tracker<IpAddr>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key of a client address: an IPv6 client usually holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl LoginGuard {
    pub fn new(limits: &LoginLimits) -> LoginGuard {
        let slots = limits.concurrency.max(1);
        LoginGuard {
            hashing: Arc::new(Semaphore::new(slots)),
            admission: Arc::new(Semaphore::new(slots * (1 + QUEUE_PER_SLOT))),
            memory: Arc::new(Mutex::new(Vec::new())),
            counts: Mutex::new(Counts {
                accounts: Tracker::new(limits.max_failures, limits.lockout, MAX_TRACKED),
                addresses: Tracker::new(
                    limits.max_failures_per_address,
                    limits.lockout,
                    MAX_TRACKED,
                ),
            }),
        }
    }

    /// Admits an attempt on `account` from `address`, counted as a failure
    /// of both until `Attempt::finish` says it succeeded.
    pub fn begin(
        self: &Arc<Self>,
        account: &str,
        address: IpAddr,
        now: Instant,
    ) -> Result<Attempt, Refused> {
        let address = address_key(address);
        let mut counts = lock(&self.counts);
        let waits = [
            counts.accounts.check(account, now),
            counts.addresses.check(&address, now),
        ];
        if let Some(retry_after) = waits.into_iter().flatten().max() {
            return Err(Refused::Locked { retry_after });
        }
        let admitted = self
            .admission
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        counts.accounts.count(account.to_owned(), now);
        counts.addresses.count(address, now);
        Ok(Attempt {
            guard: self.clone(),
            account: account.to_owned(),
            address,
            _admitted: admitted,
            finished: false,
        })
    }

    /// Keys tracked now (accounts, addresses).
    pub fn tracked(&self) -> (usize, usize) {
        let counts = lock(&self.counts);
        (counts.accounts.keys(), counts.addresses.keys())
    }
}

/// An admitted login attempt. Dropped unfinished (the client went away
/// during the check), it counts as a failure.
#[derive(Debug)]
pub struct Attempt {
    guard: Arc<LoginGuard>,
    account: String,
    address: IpAddr,
    _admitted: OwnedSemaphorePermit,
    finished: bool,
}

impl Attempt {
    /// Checks `password` against `hash` (`None`: against `stand_in()`, so
    /// that an unknown name costs what a known one does) in one of the
    /// hashing slots, waiting for one in the bounded queue. The slot is
    /// held until the check ends, even if the client goes away meanwhile.
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
        stand_in: fn() -> String,
    ) -> Result<bool, String> {
        let slot = self
            .guard
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let memory = self.guard.memory.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            // At most one block per slot: only a slot's holder takes one.
            let hash = hash.unwrap_or_else(stand_in);
            let mut block = lock(&memory).pop().unwrap_or_default();
            let ok = crate::auth::verify_password_in(&password, &hash, &mut block);
            lock(&memory).push(block);
            ok
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Records the outcome; returns the lockouts a failure started.
    pub fn finish(mut self, succeeded: bool) -> Vec<Lockout> {
        self.finished = true;
        self.record(succeeded, Instant::now())
    }

    /// Takes the attempt back, as if it never was (the server, not the
    /// client, failed: a database error must not lock anyone out).
    pub fn abandon(mut self) {
        self.finished = true;
        let mut counts = lock(&self.guard.counts);
        counts.accounts.uncount(&self.account, false);
        counts.addresses.uncount(&self.address, false);
    }

    fn record(&self, succeeded: bool, now: Instant) -> Vec<Lockout> {
        let mut counts = lock(&self.guard.counts);
        let mut started = Vec::new();
        if succeeded {
            // A success clears the account's count, but only takes this
            // attempt back from the address's: one account an attacker
            // owns must not reset the count of an address that sprays.
            counts.accounts.uncount(&self.account, true);
            counts.addresses.uncount(&self.address, false);
        } else {
            if counts.accounts.failed(&self.account, now) {
                started.push(Lockout::Account(self.account.clone()));
            }
            if counts.addresses.failed(&self.address, now) {
                started.push(Lockout::Address(self.address));
            }
        }
        started
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            for lockout in self.record(false, Instant::now()) {
                tracing::warn!(?lockout, "login lockout started (the client went away)");
            }
        }
    }
}

/// Failures per key within a counting period, and lockouts. Pure: the
/// caller passes the time.
#[derive(Debug)]
pub(crate) struct Tracker<K> {
    entries: HashMap<K, Entry>,
    threshold: u32,
    period: Duration,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Start of the counting period.
    since: Instant,
    locked_until: Option<Instant>,
    last: Instant,
}

impl Entry {
    fn fresh(now: Instant) -> Entry {
        Entry {
            failures: 0,
            since: now,
            locked_until: None,
            last: now,
        }
    }

    /// A lockout or counting period that has ended starts over.
    fn refresh(&mut self, now: Instant, period: Duration) {
        match self.locked_until {
            Some(until) if until <= now => *self = Entry::fresh(now),
            Some(_) => {}
            None if now.saturating_duration_since(self.since) >= period => {
                self.failures = 0;
                self.since = now;
            }
            None => {}
        }
    }
}

impl<K: Hash + Eq + Clone> Tracker<K> {
    pub(crate) fn new(threshold: u32, period: Duration, capacity: usize) -> Tracker<K> {
        Tracker {
            entries: HashMap::new(),
            threshold: threshold.max(1),
            period,
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn keys(&self) -> usize {
        self.entries.len()
    }

    /// How long `key` must wait, or `None` when it may try now.
    pub(crate) fn check<Q>(&mut self, key: &Q, now: Instant) -> Option<Duration>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entry = self.entries.get_mut(key)?;
        entry.refresh(now, self.period);
        match entry.locked_until {
            Some(until) => Some(
                until
                    .saturating_duration_since(now)
                    .max(Duration::from_secs(1)),
            ),
            None if entry.failures >= self.threshold => Some(IN_FLIGHT_RETRY),
            None => None,
        }
    }

    /// Counts an attempt as a failure until `uncount` takes it back.
    pub(crate) fn count(&mut self, key: K, now: Instant) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            self.evict(now);
        }
        let entry = self.entries.entry(key).or_insert_with(|| Entry::fresh(now));
        entry.refresh(now, self.period);
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
    }

    /// The counted attempt failed: true when this starts a lockout.
    pub(crate) fn failed<Q>(&mut self, key: &Q, now: Instant) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        entry.last = now;
        if entry.locked_until.is_none() && entry.failures >= self.threshold {
            entry.locked_until = Some(now + self.period);
            return true;
        }
        false
    }

    /// Takes a counted attempt back; `reset` clears the whole count
    /// (never a lockout already started).
    pub(crate) fn uncount<Q>(&mut self, key: &Q, reset: bool)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.locked_until.is_some() {
            entry.failures = entry.failures.saturating_sub(1);
        } else if reset || entry.failures <= 1 {
            self.entries.remove(key);
        } else {
            entry.failures -= 1;
        }
    }

    /// Makes room for one key: drops ended periods, then the unlocked key
    /// seen least recently, else the lockout that ends first.
    fn evict(&mut self, now: Instant) {
        let period = self.period;
        self.entries.retain(|_, e| {
            e.refresh(now, period);
            e.locked_until.is_some() || e.failures > 0
        });
        if self.entries.len() < self.capacity {
            return;
        }
        let victim = self
            .entries
            .iter()
            .min_by_key(|(_, e)| (e.locked_until.is_some(), e.locked_until, e.last))
            .map(|(k, _)| k.clone());
        if let Some(k) = victim {
            self.entries.remove(&k);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn failures_lock_out_for_the_period_even_the_right_password() {
        let t0 = Instant::now();
        let mut t: Tracker<String> = Tracker::new(3, MIN, 100);
        for i in 0..3 {
            assert_eq!(t.check("a", t0), None, "attempt {i}");
            t.count("a".into(), t0);
            assert_eq!(t.failed("a", t0), i == 2, "attempt {i}");
        }
        // Locked: refused without a check, whatever the password.
        assert_eq!(t.check("a", t0 + MIN / 2), Some(MIN / 2));
        assert_eq!(t.check("b", t0), None);
        // Over: a fresh start.
        assert_eq!(t.check("a", t0 + MIN), None);
        t.count("a".into(), t0 + MIN);
        assert!(!t.failed("a", t0 + MIN));
    }

    #[test]
    fn attempts_in_flight_count_until_they_succeed() {
        let t0 = Instant::now();
        let mut t: Tracker<String> = Tracker::new(2, MIN, 100);
        t.count("a".into(), t0);
        t.count("a".into(), t0);
        assert_eq!(t.check("a", t0), Some(IN_FLIGHT_RETRY));
        t.uncount("a", true);
        assert_eq!(t.check("a", t0), None);
        assert_eq!(t.keys(), 0);
    }

    #[test]
    fn an_address_success_takes_back_only_its_own_attempt() {
        let t0 = Instant::now();
        let mut t: Tracker<IpAddr> = Tracker::new(3, MIN, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..2 {
            t.count(ip, t0);
            t.failed(&ip, t0);
        }
        t.count(ip, t0);
        t.uncount(&ip, false);
        t.count(ip, t0);
        assert!(t.failed(&ip, t0));
    }

    #[test]
    fn failures_expire_after_the_period() {
        let t0 = Instant::now();
        let mut t: Tracker<String> = Tracker::new(2, MIN, 100);
        t.count("a".into(), t0);
        t.failed("a", t0);
        t.count("a".into(), t0 + MIN);
        assert!(!t.failed("a", t0 + MIN));
    }

    #[test]
    fn the_maps_stay_bounded_and_keep_lockouts() {
        let t0 = Instant::now();
        let mut t: Tracker<String> = Tracker::new(1, MIN, 3);
        t.count("locked".into(), t0);
        assert!(t.failed("locked", t0));
        for i in 0..100 {
            let now = t0 + Duration::from_millis(i);
            t.count(format!("k{i}"), now);
            t.failed(format!("k{i}").as_str(), now);
            assert!(t.keys() <= 3);
        }
        // Every other key was locked too, but the oldest lockout that
        // ends first went; the newest keys are there.
        assert!(t.check("k99", t0 + Duration::from_millis(100)).is_some());
        let mut u: Tracker<String> = Tracker::new(5, MIN, 2);
        u.count("locked".into(), t0);
        for _ in 0..4 {
            u.count("locked".into(), t0);
        }
        assert!(u.failed("locked", t0));
        for i in 0..10 {
            u.count(format!("k{i}"), t0 + Duration::from_millis(i));
        }
        assert!(
            u.check("locked", t0).is_some(),
            "a lockout outlives unlocked keys"
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(address_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn the_guard_refuses_at_once_when_every_place_is_taken() {
        let guard = Arc::new(LoginGuard::new(&LoginLimits {
            concurrency: 1,
            max_failures: 1000,
            max_failures_per_address: 1000,
            lockout: MIN,
        }));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        let held: Vec<Attempt> = (0..1 + QUEUE_PER_SLOT)
            .map(|i| guard.begin(&format!("u{i}"), ip, now).unwrap())
            .collect();
        assert_eq!(guard.begin("other", ip, now).unwrap_err(), Refused::Busy);
        for a in held {
            a.abandon();
        }
        let a = guard.begin("other", ip, now).unwrap();
        let stand_in = || "not a hash".to_owned();
        assert!(!a.verify("x".into(), None, stand_in).await.unwrap());
        assert!(a.finish(false).is_empty());
    }
}
