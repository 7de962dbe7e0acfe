//! A read-only map keyed by an endpoint (protocol, address, port), for the
//! transfer table's per-packet lookups: which service a VIP and port are,
//! which services a back end's endpoint serves.
//!
//! Open addressing over a power-of-two array kept at most a quarter full,
//! probed linearly from a multiplicative hash: one or two cache lines and
//! no hasher state per lookup. The keys come from the config, so no sender
//! chooses where they sit; a query walks at most the short run of occupied
//! slots at its hash.

use crate::wire::Addr;

/// (protocol, address, port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    pub protocol: u8,
}

impl Endpoint {
    pub fn new(protocol: u8, addr: Addr, port: u16) -> Self {
        Endpoint {
            addr,
            port,
            protocol,
        }
    }

    #[inline]
    fn hash(&self) -> u64 {
        let a = u128::from_ne_bytes(self.addr);
        let x = (a as u64)
            ^ ((a >> 64) as u64).rotate_left(29)
            ^ (u64::from(self.port) << 8 | u64::from(self.protocol)).rotate_left(47);
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

#[derive(Debug)]
pub struct EndpointMap<V> {
    slots: Box<[Option<(Endpoint, V)>]>,
    len: usize,
}

impl<V> Default for EndpointMap<V> {
    fn default() -> Self {
        EndpointMap::with_room(0)
    }
}

impl<V> EndpointMap<V> {
    /// An empty map with room for `n` keys at a quarter load.
    pub fn with_room(n: usize) -> Self {
        let cap = (n * 4).next_power_of_two().max(8);
        EndpointMap {
            slots: (0..cap).map(|_| None).collect(),
            len: 0,
        }
    }

    #[inline]
    fn start(&self, key: &Endpoint) -> usize {
        // The high bits of a multiplicative hash are the well-mixed ones.
        (key.hash() >> 32) as usize & (self.slots.len() - 1)
    }

    #[inline]
    pub fn get(&self, key: &Endpoint) -> Option<&V> {
        let mask = self.slots.len() - 1;
        let mut i = self.start(key);
        loop {
            match &self.slots[i] {
                Some((k, v)) if k == key => return Some(v),
                Some(_) => i = (i + 1) & mask,
                None => return None,
            }
        }
    }

    /// The value for `key`, inserted with `make` if absent; grows to stay a
    /// quarter full.
    pub fn get_or_insert_with(&mut self, key: Endpoint, make: impl FnOnce() -> V) -> &mut V {
        if (self.len + 1) * 4 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.start(&key);
        while self.slots[i].as_ref().is_some_and(|(k, _)| *k != key) {
            i = (i + 1) & mask;
        }
        if self.slots[i].is_none() {
            self.slots[i] = Some((key, make()));
            self.len += 1;
        }
        &mut self.slots[i].as_mut().expect("just filled").1
    }

    pub fn insert(&mut self, key: Endpoint, value: V) {
        let mut value = Some(value);
        let slot = self.get_or_insert_with(key, || value.take().expect("taken once"));
        if let Some(v) = value {
            *slot = v;
        }
    }

    fn grow(&mut self) {
        let old = std::mem::replace(self, EndpointMap::with_room(self.len * 2 + 1));
        for (k, v) in old.slots.into_vec().into_iter().flatten() {
            self.insert(k, v);
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &Endpoint> {
        self.slots.iter().flatten().map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(n: u32, port: u16) -> Endpoint {
        let mut addr = [0u8; 16];
        addr[12..].copy_from_slice(&n.to_be_bytes());
        Endpoint::new(6, addr, port)
    }

    #[test]
    fn finds_what_was_inserted_and_nothing_else() {
        let mut m = EndpointMap::default();
        for n in 0..1000u32 {
            m.insert(ep(n, 80), n);
        }
        m.insert(ep(7, 80), 70);
        assert!(m.slots.len() >= 4000, "stays a quarter full");
        for n in 0..1000u32 {
            let want = if n == 7 { 70 } else { n };
            assert_eq!(m.get(&ep(n, 80)), Some(&want));
            assert_eq!(m.get(&ep(n, 81)), None);
            assert_eq!(
                m.get(&Endpoint {
                    protocol: 17,
                    ..ep(n, 80)
                }),
                None
            );
        }
        assert_eq!(m.keys().count(), 1000);
        *m.get_or_insert_with(ep(1, 80), || 0) += 1;
        assert_eq!(m.get(&ep(1, 80)), Some(&2));
    }
}
