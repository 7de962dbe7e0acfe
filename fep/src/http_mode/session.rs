//! Sessions: from a client's request to the start path until its request
//! to the end path (or `session_idle_timeout_s` without a request), its
//! requests stay on the back end that served the start. The client carries
//! the session's random id in a cookie; the back end is kept here, so a
//! client cannot pick its back end by forging a cookie.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::transfer_table::BackendId;

#[derive(Debug)]
pub struct Sessions {
    by_id: Mutex<HashMap<u128, Entry>>,
    max: usize,
    idle: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    backend: BackendId,
    last: Instant,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        Sessions {
            by_id: Mutex::new(HashMap::new()),
            max,
            idle,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u128, Entry>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session on `backend`; `None` when the table is full even
    /// after dropping the expired ones.
    pub fn start(&self, backend: BackendId, now: Instant) -> Option<u128> {
        let mut map = self.map();
        if map.len() >= self.max {
            map.retain(|_, e| now.duration_since(e.last) < self.idle);
            if map.len() >= self.max {
                return None;
            }
        }
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the OS random source works");
        let id = u128::from_ne_bytes(id);
        map.insert(id, Entry { backend, last: now });
        Some(id)
    }

    /// The back end of a live session, marking it used.
    pub fn touch(&self, id: u128, now: Instant) -> Option<BackendId> {
        let mut map = self.map();
        let e = map.get_mut(&id)?;
        if now.duration_since(e.last) >= self.idle {
            map.remove(&id);
            return None;
        }
        e.last = now;
        Some(e.backend)
    }

    /// Ends a session; whether it was live.
    pub fn end(&self, id: u128) -> bool {
        self.map().remove(&id).is_some()
    }

    /// Drops sessions idle too long; how many remain.
    pub fn expire(&self, now: Instant) -> usize {
        let mut map = self.map();
        map.retain(|_, e| now.duration_since(e.last) < self.idle);
        map.len()
    }

    /// Live sessions per back end slot.
    pub fn per_backend(&self, backends: usize) -> Vec<u64> {
        let mut out = vec![0; backends];
        for e in self.map().values() {
            if let Some(n) = out.get_mut(usize::from(e.backend)) {
                *n += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_keeps_its_back_end_until_ended_or_idle() {
        let t0 = Instant::now();
        let s = Sessions::new(2, Duration::from_secs(10));
        let a = s.start(3, t0).unwrap();
        assert_eq!(s.touch(a, t0 + Duration::from_secs(9)), Some(3));
        assert_eq!(
            s.touch(a, t0 + Duration::from_secs(18)),
            Some(3),
            "touched at 9 s"
        );
        assert_eq!(s.touch(a, t0 + Duration::from_secs(29)), None, "idle 11 s");
        let b = s.start(1, t0).unwrap();
        assert!(s.end(b));
        assert!(!s.end(b));
        assert_eq!(s.touch(b, t0), None);
    }

    #[test]
    fn a_full_table_refuses_until_sessions_expire() {
        let t0 = Instant::now();
        let s = Sessions::new(2, Duration::from_secs(10));
        s.start(0, t0).unwrap();
        s.start(1, t0).unwrap();
        assert_eq!(s.start(0, t0 + Duration::from_secs(1)), None);
        assert_eq!(s.per_backend(2), vec![1, 1]);
        assert!(s.start(0, t0 + Duration::from_secs(11)).is_some());
        assert_eq!(s.expire(t0 + Duration::from_secs(11)), 1);
    }
}
