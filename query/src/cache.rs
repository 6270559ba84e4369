//! The person-read cache: each cached person's feature values of one granularity, kept up
//! to date by the pipeline's features stream, so that a read of a person's features is a
//! lookup and not a plan and scan of the store.
//!
//! What it owns and guarantees:
//! - **Complete from a point on.** A cached person holds every stored value of the
//!   granularity whose window starts at or after its `covered_from` (the first UTC midnight
//!   `query.cache_days` before it was read), the latest revision per window, feature and
//!   breakdown. Reads starting earlier, or with the cache off, go to the store.
//! - **Kept current, not invalidated.** Every value the pipeline writes is published on
//!   the features stream after it is durable in the store; [`FeatureCache::apply`] merges
//!   it (highest revision wins, so order and repeats do not matter). A value arriving while
//!   the person is being read from the store is held and merged when the read lands, so a
//!   value durable before the read is in the read and one durable after it comes through
//!   the stream: nothing falls between the two.
//! - **One store read per person at a time.** Concurrent misses for the same person wait
//!   for the one read in flight; if that read fails or its request goes away, the next
//!   waiter reads.
//! - **Bounded.** At most `query.cache_cells` values; past it the people read least
//!   recently are dropped. A person is read from the store again after
//!   `query.cache_ttl_secs`, bounding how stale a value can be should a change ever
//!   bypass the stream. `digame_read_cache_cells` shows how many values it holds.
//! - **Rendered once per change.** The answer to a (range) request is serialized once
//!   per version of the person's values and served as bytes with its ETag until a value
//!   in the person changes.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use digame_infra::telemetry::metrics;
use digame_schemas::{EventTime, FeatureRow, Granularity};
use tokio::sync::watch;

use crate::FeatureCell;

/// A cached answer: the JSON body, its ETag, and its gzip form once someone asked.
#[derive(Debug)]
pub struct Rendered {
    pub json: Bytes,
    /// Strong entity tag (quoted), from the body's content.
    pub etag: String,
    /// The body gzip-compressed, made on first request by whoever serves it.
    pub gzip: OnceLock<Bytes>,
}

impl Rendered {
    pub fn new(json: Vec<u8>) -> Rendered {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        json.hash(&mut h);
        Rendered {
            etag: format!("\"{:016x}-{:x}\"", h.finish(), json.len()),
            json: Bytes::from(json),
            gzip: OnceLock::new(),
        }
    }
}

/// (window start, feature, breakdown): one value of a person.
type CellKey = (i64, String, String);

/// One person's values of one granularity.
struct Slot {
    /// Values with windows starting at or after this (ms) are all here, once `ready`.
    covered_from: i64,
    cells: BTreeMap<CellKey, FeatureCell>,
    ready: bool,
    filled_at: Instant,
    /// Set while a store read is in flight: waiters watch it turn `true`.
    filling: Option<watch::Sender<bool>>,
    /// Values that came through the stream while the read was in flight.
    pending: Vec<FeatureCell>,
    /// Answers rendered from the current values: (from, to) → body.
    rendered: Vec<(i64, i64, Arc<Rendered>)>,
    /// Changes whenever the values do (a tick of the cache's clock).
    version: u64,
    last_used: u64,
}

impl Slot {
    fn merge(&mut self, c: FeatureCell) -> bool {
        if c.window_start.0 < self.covered_from {
            return false;
        }
        let key = (c.window_start.0, c.feature.clone(), c.dimension.clone());
        match self.cells.get(&key) {
            Some(old) if old.revision >= c.revision => false,
            _ => {
                self.cells.insert(key, c);
                true
            }
        }
    }
}

/// `tenant:user` (the bus's partition key) → the person's slots by granularity.
type People = HashMap<String, Vec<(Granularity, Slot)>>;

struct Inner {
    people: People,
    cells: usize,
    clock: u64,
}

/// What a lookup found.
pub enum Lookup<'a> {
    /// The answer, as it stands.
    Hit(Arc<Rendered>),
    /// The person's values, to render an answer from (then [`FeatureCache::keep`] it).
    Cells(Vec<FeatureCell>, u64),
    /// Another request is reading this person: wait on it, then look again.
    Wait(watch::Receiver<bool>),
    /// Read the person's values from `from` (ms) on and hand them to [`Fill::finish`].
    Fill(Fill<'a>),
}

/// A store read this caller owes the cache; dropped unfinished, it lets the next waiter
/// read instead.
pub struct Fill<'a> {
    cache: &'a FeatureCache,
    key: String,
    granularity: Granularity,
    pub from: EventTime,
    done: bool,
}

impl Fill<'_> {
    /// Takes in the store's values of the person (all windows from `self.from` on).
    pub fn finish(mut self, cells: Vec<FeatureCell>) {
        self.done = true;
        let mut inner = self.cache.lock();
        let Inner {
            people,
            cells: count,
            clock,
        } = &mut *inner;
        let Some(slot) = slot_mut(people, &self.key, self.granularity) else {
            return;
        };
        let before = slot.cells.len();
        slot.cells.clear();
        for c in cells.into_iter().chain(std::mem::take(&mut slot.pending)) {
            slot.merge(c);
        }
        *count = *count + slot.cells.len() - before;
        slot.ready = true;
        slot.filled_at = Instant::now();
        slot.rendered.clear();
        *clock += 1;
        slot.version = *clock;
        if let Some(tx) = slot.filling.take() {
            let _ = tx.send(true);
        }
        drop(inner);
        self.cache.evict();
    }
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = self.cache.lock();
        if let Some(slot) = slot_mut(&mut inner.people, &self.key, self.granularity) {
            slot.pending.clear();
            if let Some(tx) = slot.filling.take() {
                let _ = tx.send(true);
            }
        }
    }
}

fn slot_mut<'p>(people: &'p mut People, key: &str, g: Granularity) -> Option<&'p mut Slot> {
    people
        .get_mut(key)?
        .iter_mut()
        .find(|(sg, _)| *sg == g)
        .map(|(_, s)| s)
}

/// See the module docs.
pub struct FeatureCache {
    inner: Mutex<Inner>,
    max_cells: usize,
    days: i64,
    ttl: Duration,
}

impl FeatureCache {
    pub fn new(max_cells: usize, days: u32, ttl: Duration) -> FeatureCache {
        FeatureCache {
            inner: Mutex::new(Inner {
                people: HashMap::new(),
                cells: 0,
                clock: 0,
            }),
            max_cells,
            days: i64::from(days),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every mutation is a
        // complete insert or removal), so a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a person read now starts covering: `cache_days` UTC midnights ago.
    pub fn horizon(&self, now: EventTime) -> EventTime {
        EventTime((now.0.div_euclid(EventTime::DAY) - self.days) * EventTime::DAY)
    }

    /// Values held now, over every person.
    pub fn cells(&self) -> usize {
        self.lock().cells
    }

    /// Looks up a person's answer for `[from, to)`.
    pub fn lookup(
        &self,
        tenant: &str,
        user: &str,
        granularity: Granularity,
        (from, to): (EventTime, EventTime),
        now: EventTime,
        rendered_ok: bool,
    ) -> Lookup<'_> {
        let key = digame_schemas::partition_key(tenant, user);
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let horizon = self.horizon(now).0;
        let slots = inner.people.entry(key.clone()).or_default();
        let slot = match slots.iter_mut().position(|(g, _)| *g == granularity) {
            Some(i) => &mut slots[i].1,
            None => {
                slots.push((
                    granularity,
                    Slot {
                        covered_from: horizon,
                        cells: BTreeMap::new(),
                        ready: false,
                        filled_at: Instant::now(),
                        filling: None,
                        pending: Vec::new(),
                        rendered: Vec::new(),
                        version: 0,
                        last_used: clock,
                    },
                ));
                &mut slots.last_mut().expect("just pushed").1
            }
        };
        slot.last_used = clock;
        if let Some(tx) = &slot.filling {
            return Lookup::Wait(tx.subscribe());
        }
        let fresh = slot.filled_at.elapsed() < self.ttl;
        if slot.ready && fresh && slot.covered_from <= from.0 {
            if let Some((_, _, r)) = slot
                .rendered
                .iter()
                .find(|(f, t, _)| rendered_ok && *f == from.0 && *t == to.0)
            {
                return Lookup::Hit(r.clone());
            }
            let cells = slot
                .cells
                .range((from.0, String::new(), String::new())..)
                .take_while(|(k, _)| k.0 < to.0)
                .map(|(_, c)| c.clone())
                .collect();
            return Lookup::Cells(cells, slot.version);
        }
        // Read (again) from the store, covering from today's horizon.
        slot.ready = false;
        slot.covered_from = horizon.min(from.0);
        slot.pending.clear();
        slot.filling = Some(watch::channel(false).0);
        Lookup::Fill(Fill {
            cache: self,
            key,
            granularity,
            from: EventTime(slot.covered_from),
            done: false,
        })
    }

    /// Keeps an answer rendered from [`Lookup::Cells`] of version `seen`, unless a value
    /// changed since (then the next request renders again).
    pub fn keep(
        &self,
        tenant: &str,
        user: &str,
        granularity: Granularity,
        (from, to): (EventTime, EventTime),
        seen: u64,
        rendered: Arc<Rendered>,
    ) {
        let key = digame_schemas::partition_key(tenant, user);
        let mut inner = self.lock();
        if let Some(slot) = slot_mut(&mut inner.people, &key, granularity)
            && slot.ready
            && slot.version == seen
        {
            // Few ranges per person are asked for (the default week, a month); the oldest
            // answer goes first.
            if slot.rendered.len() >= 8 {
                slot.rendered.remove(0);
            }
            slot.rendered.push((from.0, to.0, rendered));
        }
    }

    /// Whether values of the people with these partition keys are wanted (cached or being
    /// read), under one lock for a whole poll: the stream's records of anyone else are
    /// skipped without being decoded.
    pub fn wanted<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) -> Vec<bool> {
        let inner = self.lock();
        keys.into_iter()
            .map(|key| std::str::from_utf8(key).is_ok_and(|k| inner.people.contains_key(k)))
            .collect()
    }

    /// [`Self::wanted`] for one key.
    pub fn wants(&self, key: &[u8]) -> bool {
        self.wanted([key])[0]
    }

    /// Merges values written by the pipeline (or a recomputation).
    pub fn apply(&self, rows: &[FeatureRow]) {
        let mut inner = self.lock();
        let Inner {
            people,
            cells,
            clock,
        } = &mut *inner;
        for row in rows {
            let key = digame_schemas::partition_key(&row.tenant_id, &row.user_id);
            let Some(slot) = slot_mut(people, &key, row.granularity) else {
                continue;
            };
            let cell = FeatureCell::from(row);
            if slot.filling.is_some() {
                slot.pending.push(cell);
                continue;
            }
            let before = slot.cells.len();
            if slot.merge(cell) {
                *cells = *cells + slot.cells.len() - before;
                slot.rendered.clear();
                // A render begun before this change must not be kept.
                *clock += 1;
                slot.version = *clock;
            }
        }
        drop(inner);
        self.evict();
    }

    /// Forgets a tenant's people (all of them, or one): after a deletion.
    pub fn forget(&self, tenant: &str, user: Option<&str>) {
        let mut inner = self.lock();
        let prefix = format!("{tenant}:");
        let Inner { people, cells, .. } = &mut *inner;
        people.retain(|k, slots| {
            let gone = match user {
                Some(u) => k.strip_prefix(&prefix) == Some(u),
                None => k.starts_with(&prefix),
            };
            if gone {
                *cells -= slots.iter().map(|(_, s)| s.cells.len()).sum::<usize>();
                // A read in flight finishes into nothing; its waiters read again.
                for (_, s) in slots.iter_mut() {
                    if let Some(tx) = s.filling.take() {
                        let _ = tx.send(true);
                    }
                }
            }
            !gone
        });
        drop(inner);
        self.evict();
    }

    /// Drops the people read least recently until the cache is under 90 % of its bound,
    /// and publishes how many values it holds (called after every change of size).
    fn evict(&self) {
        let mut inner = self.lock();
        if inner.cells <= self.max_cells {
            metrics().read_cache_cells.set(inner.cells as i64);
            return;
        }
        let mut by_age: Vec<(u64, String)> = inner
            .people
            .iter()
            .filter(|(_, slots)| slots.iter().all(|(_, s)| s.filling.is_none()))
            .map(|(k, slots)| {
                let used = slots.iter().map(|(_, s)| s.last_used).max().unwrap_or(0);
                (used, k.clone())
            })
            .collect();
        by_age.sort_unstable();
        let target = self.max_cells / 10 * 9;
        for (_, key) in by_age {
            if inner.cells <= target {
                break;
            }
            if let Some(slots) = inner.people.remove(&key) {
                inner.cells -= slots.iter().map(|(_, s)| s.cells.len()).sum::<usize>();
            }
        }
        metrics().read_cache_cells.set(inner.cells as i64);
    }
}

impl From<&FeatureRow> for FeatureCell {
    fn from(r: &FeatureRow) -> FeatureCell {
        FeatureCell {
            window_start: r.window_start,
            window_end: r.window_end,
            timezone: r.timezone.to_string(),
            feature: r.feature.to_string(),
            dimension: r.dimension.clone(),
            value: r.value,
            is_final: r.is_final,
            revision: r.revision,
            final_revision: r.final_revision,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = EventTime::DAY;
    /// 2026-11-30T00:00:00Z.
    const NOW: EventTime = EventTime(1_764_460_800_000);

    fn row(user: &str, day: i64, feature: &str, value: f64, revision: i64) -> FeatureRow {
        FeatureRow {
            tenant_id: "acme".into(),
            user_id: user.into(),
            granularity: Granularity::Day,
            window_start: EventTime(NOW.0 + day * DAY),
            window_end: EventTime(NOW.0 + (day + 1) * DAY),
            timezone: "UTC".into(),
            feature: feature.to_string().into(),
            dimension: String::new(),
            value,
            feature_version: 1,
            params_version: 0,
            is_final: false,
            revision,
            final_revision: 0,
        }
    }

    fn cache() -> FeatureCache {
        FeatureCache::new(1000, 7, Duration::from_secs(3600))
    }

    const WEEK: (EventTime, EventTime) = (EventTime(NOW.0 - 6 * DAY), EventTime(NOW.0 + 2 * DAY));

    fn look<'a>(c: &'a FeatureCache, user: &str) -> Lookup<'a> {
        c.lookup("acme", user, Granularity::Day, WEEK, NOW, true)
    }

    /// (day offset, feature, value) of a lookup that must answer from values.
    fn values(l: Lookup<'_>) -> Vec<(i64, String, f64)> {
        match l {
            Lookup::Cells(cells, _) => cells
                .into_iter()
                .map(|c| ((c.window_start.0 - NOW.0) / DAY, c.feature, c.value))
                .collect(),
            _ => panic!("expected values"),
        }
    }

    #[test]
    fn a_fill_merges_what_the_stream_brought_meanwhile_by_revision() {
        let c = cache();
        assert!(!c.wants(b"acme:ana"));
        let Lookup::Fill(fill) = look(&c, "ana") else {
            panic!("first read fills")
        };
        assert_eq!(fill.from, EventTime(NOW.0 - 7 * DAY));
        assert!(c.wants(b"acme:ana"));
        // While the store read is in flight: a newer value of day 0, an older one of
        // day -1, a value of someone not cached (ignored).
        c.apply(&[
            row("ana", 0, "active_seconds", 300.0, 20),
            row("ana", -1, "active_seconds", 1.0, 5),
            row("bob", 0, "active_seconds", 9.0, 99),
        ]);
        let Lookup::Wait(mut done) = look(&c, "ana") else {
            panic!("a second read waits")
        };
        assert!(!*done.borrow_and_update());
        fill.finish(
            [
                row("ana", 0, "active_seconds", 100.0, 10),
                row("ana", -1, "active_seconds", 50.0, 10),
                row("ana", 1, "meetings", 2.0, 10),
            ]
            .iter()
            .map(FeatureCell::from)
            .collect(),
        );
        assert!(*done.borrow_and_update());
        assert_eq!(
            values(look(&c, "ana")),
            [
                (-1, "active_seconds".into(), 50.0),
                (0, "active_seconds".into(), 300.0),
                (1, "meetings".into(), 2.0),
            ]
        );
        assert_eq!(c.cells(), 3);
        assert!(!c.wants(b"acme:bob"));
        // After the fill, the stream's values merge in directly, whatever their order.
        c.apply(&[
            row("ana", 1, "meetings", 4.0, 12),
            row("ana", 1, "meetings", 3.0, 11),
        ]);
        assert_eq!(values(look(&c, "ana"))[2], (1, "meetings".into(), 4.0));
    }

    #[test]
    fn a_rendered_answer_is_served_until_a_value_changes() {
        let c = cache();
        let Lookup::Fill(fill) = look(&c, "ana") else {
            panic!()
        };
        fill.finish(vec![FeatureCell::from(&row("ana", 0, "a", 1.0, 1))]);
        let Lookup::Cells(_, v) = look(&c, "ana") else {
            panic!()
        };
        let r = Arc::new(Rendered::new(b"{\"v\":1}".to_vec()));
        c.keep("acme", "ana", Granularity::Day, WEEK, v, r.clone());
        match look(&c, "ana") {
            Lookup::Hit(hit) => assert_eq!(hit.json, r.json),
            _ => panic!("kept answer serves"),
        }
        // Asked for values (not bytes), the cache still gives values.
        assert!(matches!(
            c.lookup("acme", "ana", Granularity::Day, WEEK, NOW, false),
            Lookup::Cells(..)
        ));
        // A change drops the answer, and an answer rendered before it is not kept.
        let Lookup::Cells(_, before) = c.lookup("acme", "ana", Granularity::Day, WEEK, NOW, false)
        else {
            panic!()
        };
        c.apply(&[row("ana", 0, "a", 2.0, 2)]);
        c.keep("acme", "ana", Granularity::Day, WEEK, before, r);
        assert_eq!(values(look(&c, "ana")), [(0, "a".into(), 2.0)]);
        // A value older than the cached one changes nothing.
        c.apply(&[row("ana", 0, "a", 7.0, 1)]);
        assert_eq!(values(look(&c, "ana")), [(0, "a".into(), 2.0)]);
    }

    #[test]
    fn an_abandoned_read_hands_over_to_the_next_waiter() {
        let c = cache();
        let Lookup::Fill(fill) = look(&c, "ana") else {
            panic!()
        };
        let Lookup::Wait(mut done) = look(&c, "ana") else {
            panic!()
        };
        drop(fill);
        assert!(*done.borrow_and_update());
        assert!(matches!(look(&c, "ana"), Lookup::Fill(_)));
    }

    #[test]
    fn stale_or_uncovered_people_are_read_again_and_deletions_forget() {
        let c = FeatureCache::new(1000, 7, Duration::from_millis(30));
        let Lookup::Fill(fill) = look(&c, "ana") else {
            panic!()
        };
        fill.finish(vec![]);
        assert!(matches!(look(&c, "ana"), Lookup::Cells(..)));
        std::thread::sleep(Duration::from_millis(40));
        let Lookup::Fill(fill) = look(&c, "ana") else {
            panic!("past the ttl, read again")
        };
        fill.finish(vec![FeatureCell::from(&row("ana", 0, "a", 1.0, 1))]);
        // A range starting before what the person covers is read again, from there.
        let earlier = (EventTime(NOW.0 - 9 * DAY), WEEK.1);
        match c.lookup("acme", "ana", Granularity::Day, earlier, NOW, true) {
            Lookup::Fill(f) => assert_eq!(f.from, earlier.0),
            _ => panic!("uncovered range reads"),
        }
        c.forget("acme", Some("ana"));
        assert!(!c.wants(b"acme:ana"));
        assert_eq!(c.cells(), 0);
    }

    #[test]
    fn the_least_recently_read_people_go_first_past_the_bound() {
        let c = FeatureCache::new(10, 7, Duration::from_secs(3600));
        for user in ["a", "b", "c"] {
            let Lookup::Fill(fill) = look(&c, user) else {
                panic!()
            };
            let cells = (0..4)
                .map(|i| FeatureCell::from(&row(user, -i, "x", 1.0, 1)))
                .collect();
            fill.finish(cells);
            // `a` is read again after every fill, so it stays.
            let _ = look(&c, "a");
        }
        assert!(c.cells() <= 9, "{}", c.cells());
        assert!(c.wants(b"acme:a"));
        assert!(!c.wants(b"acme:b"));
        assert!(c.wants(b"acme:c"));
    }
}
