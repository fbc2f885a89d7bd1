//! The decoder set: membership by key, in-flight counts, health and the circuit breaker's
//! consecutive-failure counts. The one owner of that state; policies read a [`FleetView`].
use crate::error::{Result, RouterError};
use crate::policy::FleetView;

/// Stable identity of a member. A key removed and added again gets a new id, so a request
/// acquired on the old member never releases the new one.
pub type WorkerId = u64;

#[derive(Debug, Clone)]
pub struct Fleet {
    // Struct of arrays, in member order, so policies get contiguous slices.
    ids: Vec<WorkerId>,
    keys: Vec<String>,
    loads: Vec<i64>,
    healthy: Vec<bool>,
    failures: Vec<u32>,
    /// Removed members with requests still in flight: (id, in-flight count).
    retired: Vec<(WorkerId, i64)>,
    next_id: WorkerId,
    breaker_failures: u32,
}

impl Fleet {
    /// Members with ids `0..keys.len()`; `breaker_failures` consecutive failures take a member out.
    pub fn new<S: AsRef<str>>(keys: &[S], breaker_failures: u32) -> Result<Self> {
        if breaker_failures == 0 {
            return Err(RouterError::Invalid { arg: "breaker_failures", reason: "must be >= 1".into() });
        }
        let mut fleet = Self {
            ids: Vec::new(),
            keys: Vec::new(),
            loads: Vec::new(),
            healthy: Vec::new(),
            failures: Vec::new(),
            retired: Vec::new(),
            next_id: 0,
            breaker_failures,
        };
        for k in keys {
            fleet.add(k.as_ref(), true)?;
        }
        Ok(fleet)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn ids(&self) -> &[WorkerId] {
        &self.ids
    }
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
    pub fn loads(&self) -> &[i64] {
        &self.loads
    }
    pub fn healthy(&self) -> &[bool] {
        &self.healthy
    }
    pub fn failures(&self) -> &[u32] {
        &self.failures
    }
    pub fn breaker_failures(&self) -> u32 {
        self.breaker_failures
    }
    pub fn view(&self) -> FleetView<'_> {
        FleetView { loads: &self.loads, healthy: &self.healthy }
    }

    pub fn position(&self, id: WorkerId) -> Result<usize> {
        self.ids.iter().position(|&i| i == id).ok_or(RouterError::UnknownWorker(id))
    }
    pub fn position_of_key(&self, key: &str) -> Option<usize> {
        self.keys.iter().position(|k| k == key)
    }

    /// Appends a member; its index is the old length.
    pub fn add(&mut self, key: &str, healthy: bool) -> Result<WorkerId> {
        if self.position_of_key(key).is_some() {
            return Err(RouterError::DuplicateKey(key.to_string()));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ids.push(id);
        self.keys.push(key.to_string());
        self.loads.push(0);
        self.healthy.push(healthy);
        self.failures.push(0);
        Ok(id)
    }

    /// Removes a member (later indices shift down by one); returns its old index and key. Its
    /// requests in flight stay counted as retired until released.
    pub fn remove(&mut self, id: WorkerId) -> Result<(usize, String)> {
        let i = self.position(id)?;
        if self.len() == 1 {
            return Err(RouterError::LastWorker(self.keys[i].clone()));
        }
        if self.loads[i] > 0 {
            self.retired.push((id, self.loads[i]));
        }
        self.ids.remove(i);
        self.loads.remove(i);
        self.healthy.remove(i);
        self.failures.remove(i);
        Ok((i, self.keys.remove(i)))
    }

    pub fn acquire_at(&mut self, index: usize) -> WorkerId {
        self.loads[index] += 1;
        self.ids[index]
    }

    /// In-flight requests of member (or removed member) `id`.
    pub fn in_flight(&self, id: WorkerId) -> i64 {
        match self.position(id) {
            Ok(i) => self.loads[i],
            Err(_) => self.retired.iter().find(|(r, _)| *r == id).map_or(0, |(_, n)| *n),
        }
    }

    /// Ends one request on `id`: `Ok(false)` when it is no longer a member (only its retired
    /// count drops); refuses (never wraps) below zero.
    pub fn release(&mut self, id: WorkerId) -> Result<bool> {
        let Ok(i) = self.position(id) else {
            let Some(r) = self.retired.iter().position(|(r, _)| *r == id) else {
                return Err(RouterError::UnknownWorker(id));
            };
            self.retired[r].1 -= 1;
            if self.retired[r].1 == 0 {
                self.retired.swap_remove(r);
            }
            return Ok(false);
        };
        if self.loads[i] == 0 {
            return Err(RouterError::ReleaseUnderflow(id));
        }
        self.loads[i] -= 1;
        Ok(true)
    }

    /// Sets health by hand (an unreachable decoder, an operator); returns whether it changed.
    pub fn set_healthy(&mut self, id: WorkerId, healthy: bool) -> Result<bool> {
        let i = self.position(id)?;
        let changed = self.healthy[i] != healthy;
        self.healthy[i] = healthy;
        Ok(changed)
    }

    /// One breaker observation (a health check, or a request that broke after it was accepted):
    /// a success resets the count and puts the member back (the half-open probe passed);
    /// `breaker_failures` failures in a row take it out. Returns the new health when it changed.
    pub fn report(&mut self, id: WorkerId, ok: bool) -> Result<Option<bool>> {
        let i = self.position(id)?;
        let before = self.healthy[i];
        if ok {
            self.failures[i] = 0;
            self.healthy[i] = true;
        } else {
            self.failures[i] = self.failures[i].saturating_add(1);
            if self.failures[i] >= self.breaker_failures {
                self.healthy[i] = false;
            }
        }
        Ok((self.healthy[i] != before).then_some(self.healthy[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_reused_and_removal_shifts_indices() {
        let mut f = Fleet::new(&["a", "b", "c"], 3).unwrap();
        assert_eq!(f.ids(), &[0, 1, 2]);
        f.acquire_at(2);
        assert_eq!(f.remove(1).unwrap(), (1, "b".to_string()));
        assert_eq!((f.ids(), f.loads()), (&[0, 2][..], &[0, 1][..]));
        let b = f.add("b", true).unwrap();
        assert_eq!(b, 3);
        assert_eq!(f.in_flight(1), 0);
        assert_eq!(f.release(1), Err(RouterError::UnknownWorker(1)), "nothing was in flight there");
        assert_eq!(f.release(2), Ok(true));
        assert_eq!(f.release(2), Err(RouterError::ReleaseUnderflow(2)));
        assert_eq!(f.add("a", true), Err(RouterError::DuplicateKey("a".into())));
    }

    #[test]
    fn a_removed_members_requests_drain_as_retired() {
        let mut f = Fleet::new(&["a", "b"], 3).unwrap();
        f.acquire_at(0);
        f.acquire_at(0);
        f.remove(0).unwrap();
        assert_eq!((f.in_flight(0), f.loads()), (2, &[0][..]));
        assert_eq!(f.release(0), Ok(false));
        assert_eq!(f.release(0), Ok(false));
        assert_eq!(f.in_flight(0), 0);
        assert_eq!(f.release(0), Err(RouterError::UnknownWorker(0)));
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_closes_on_success() {
        let mut f = Fleet::new(&["a"], 3).unwrap();
        assert_eq!(f.report(0, false), Ok(None));
        assert_eq!(f.report(0, true), Ok(None), "a success resets the count");
        assert_eq!(f.report(0, false), Ok(None));
        assert_eq!(f.report(0, false), Ok(None));
        assert_eq!(f.report(0, false), Ok(Some(false)));
        assert_eq!(f.failures(), &[3]);
        assert_eq!(f.report(0, true), Ok(Some(true)));
        assert_eq!(f.remove(0), Err(RouterError::LastWorker("a".into())));
        assert!(Fleet::new(&["a"], 0).is_err());
    }
}
