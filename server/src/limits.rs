//! Per-client limits: one misbehaving or hostile address cannot take every slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts what each client address holds open, up to `max` each (0: no limit).
pub struct PerClient {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of one client; given back when dropped.
pub struct Slot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerClient {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }

    pub fn held_by(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_at_most_max_and_slots_come_back() {
        let l = PerClient::new(2);
        let a: IpAddr = "192.0.2.10".parse().unwrap();
        let b: IpAddr = "192.0.2.11".parse().unwrap();
        let s1 = l.try_acquire(a).unwrap();
        let _s2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "a third for the same client");
        assert!(l.try_acquire(b).is_some(), "another client is not affected");
        drop(s1);
        assert_eq!(l.held_by(a), 1);
        assert!(l.try_acquire(a).is_some());
        let unlimited = PerClient::new(0);
        let many: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(a).unwrap())
            .collect();
        assert_eq!(unlimited.held_by(a), 100);
        drop(many);
        assert_eq!(unlimited.held_by(a), 0);
    }
}
