//! Bounding the memory that images in flight take. Each cutout holds its decoded frame, mask and
//! output for as long as it runs; with several workers, or one very large photo, those add up to
//! more than a small board has. A cutout reserves its estimated bytes here before it decodes and
//! waits while others hold too much; one that could never fit is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Bytes a cutout may reserve, and how many are reserved now.
pub struct MemoryBudget {
    capacity: u64,
    reserved: Mutex<u64>,
    freed: Condvar,
    /// Reservations that had to wait for room.
    waits: AtomicU64,
    /// The most ever reserved at once.
    peak: AtomicU64,
}

/// A reservation, returned to the budget when dropped.
pub struct Reservation<'b> {
    budget: &'b MemoryBudget,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(capacity: u64) -> MemoryBudget {
        MemoryBudget {
            capacity,
            reserved: Mutex::new(0),
            freed: Condvar::new(),
            waits: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Blocks until `bytes` fit beside the reservations held, then holds them; `None` when they
    /// exceed the whole capacity and so would never fit. Call it on a worker thread, never on
    /// the inference pool (whose threads the holders need to finish).
    pub fn reserve(&self, bytes: u64) -> Option<Reservation<'_>> {
        if bytes > self.capacity {
            return None;
        }
        let mut reserved = self.lock();
        if reserved.saturating_add(bytes) > self.capacity {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        while reserved.saturating_add(bytes) > self.capacity {
            reserved = self
                .freed
                .wait(reserved)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *reserved += bytes;
        self.peak.fetch_max(*reserved, Ordering::Relaxed);
        Some(Reservation { budget: self, bytes })
    }

    /// Bytes reserved now.
    pub fn reserved(&self) -> u64 {
        *self.lock()
    }

    /// How many reservations have had to wait for room.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // The counter is only ever added to and subtracted from whole; a poisoned one is sound.
        self.reserved.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.budget.lock() -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_what_can_never_fit_and_returns_what_is_dropped() {
        let b = MemoryBudget::new(100);
        assert!(b.reserve(101).is_none());
        let r = b.reserve(60).unwrap();
        let s = b.reserve(40).unwrap();
        assert_eq!(b.reserved(), 100);
        drop(r);
        assert_eq!(b.reserved(), 40);
        drop(s);
        assert_eq!(b.reserved(), 0);
        assert!(b.reserve(100).is_some());
    }

    #[test]
    fn a_reservation_waits_until_enough_is_returned() {
        let b = MemoryBudget::new(100);
        let first = b.reserve(70).unwrap();
        let small = b.reserve(30).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let r = b.reserve(50).unwrap();
                let seen = b.reserved();
                drop(r);
                seen
            });
            wait_for(|| b.waits() == 1);
            drop(small);
            // A broken budget would let the waiter in now (20 free beside 70 held; it needs 50).
            // The pause gives it the time to; a working one cannot, whatever the timing.
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "50 more fitted while 70 of 100 were held");
            drop(first);
            assert_eq!(waiter.join().unwrap(), 50);
        });
        assert_eq!((b.reserved(), b.waits(), b.peak()), (0, 1, 100));
    }

    fn wait_for(done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
