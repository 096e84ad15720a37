//! Where the process's memory comes from.
//!
//! An inference allocates and frees a few hundred MB of activation tensors (IS-Net: tens of MB
//! each). From glibc's heap they fragment it: the daemon's resident memory crept from 480 to
//! 704 MB over its first requests, for ~330 MB actually live. So blocks of [`BIG`] and more are
//! mapped straight from the kernel, huge-page backed where the kernel allows it on request.
//!
//! A fresh mapping costs page faults and the kernel zeroing every page (8-16% of an inference's
//! CPU time). So a freed big block is kept and handed out again for the next request of exactly
//! its size (tensors of a model come in a handful of sizes), as long as the blocks kept plus
//! those in use stay within the most that was ever in use at once: resident memory never peaks
//! higher than without the cache. [`release_cached`] unmaps what is kept: after a model load
//! (whose temporary weights would otherwise set the high-water mark) and, in the daemon, after a
//! quiet spell ([`release_when_idle`]).
//!
//! Everything smaller stays on glibc's heap, tuned in `main.rs` never to be trimmed.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of this size and up get their own mapping.
pub const BIG: usize = 4 << 20;

/// The process allocator: big blocks mapped on their own, the rest from `System`.
pub struct Allocator;

#[cfg(target_os = "linux")]
mod big {
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};

    /// Freed blocks kept at most.
    const SLOTS: usize = 64;

    /// Bytes of big blocks in use, the most there ever were (since the last release), and the
    /// freed blocks kept as (address, size).
    struct Kept {
        live: usize,
        peak: usize,
        kept: usize,
        slots: [(usize, usize); SLOTS],
        used: usize,
    }

    // std's Mutex is a futex on Linux: it never allocates, so the allocator may hold it.
    static KEPT: Mutex<Kept> = Mutex::new(Kept {
        live: 0,
        peak: 0,
        kept: 0,
        slots: [(0, 0); SLOTS],
        used: 0,
    });

    /// Big allocations so far, for the idle check.
    pub static TAKEN: AtomicUsize = AtomicUsize::new(0);

    fn kept() -> MutexGuard<'static, Kept> {
        // Nothing panics while the lock is held; a poisoned lock's data is consistent.
        KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    impl Kept {
        /// Unmaps kept blocks, most recently kept first, until in use plus kept fits `limit`.
        fn shrink_to(&mut self, limit: usize) {
            while self.used > 0 && self.live + self.kept > limit {
                self.used -= 1;
                let (p, size) = self.slots[self.used];
                self.kept -= size;
                // SAFETY: a kept block is a whole mapping from `map` that nothing else uses.
                unsafe { unmap(p as *mut u8, size) };
            }
        }
    }

    /// A block of `size` bytes: a kept one of that size, or a fresh (zeroed) mapping, and which.
    pub unsafe fn take(size: usize) -> (*mut u8, bool) {
        TAKEN.fetch_add(1, Ordering::Relaxed);
        let mut k = kept();
        if let Some(i) = k.slots[..k.used].iter().position(|s| s.1 == size) {
            let (p, _) = k.slots[i];
            k.used -= 1;
            let last = k.used;
            k.slots[i] = k.slots[last];
            k.kept -= size;
            k.live += size;
            return (p as *mut u8, false);
        }
        k.live += size;
        k.peak = k.peak.max(k.live);
        let peak = k.peak;
        k.shrink_to(peak);
        drop(k);
        // SAFETY: a fresh mapping touches no existing memory.
        let p = unsafe { map(size) };
        if p.is_null() {
            kept().live -= size;
        }
        (p, true)
    }

    /// Keeps the block `p` of `size` bytes for reuse; unmaps it when there is no slot free.
    pub unsafe fn give(p: *mut u8, size: usize) {
        let mut k = kept();
        k.live -= size;
        if k.used < SLOTS {
            let used = k.used;
            k.slots[used] = (p as usize, size);
            k.used += 1;
            k.kept += size;
        } else {
            drop(k);
            // SAFETY: the caller gives up `p`, a whole mapping from `map`.
            unsafe { unmap(p, size) };
        }
    }

    /// Unmaps every kept block; the high-water mark restarts from what is in use now.
    pub fn release() {
        let mut k = kept();
        k.shrink_to(0);
        k.peak = k.live;
    }

    /// Bytes kept for reuse.
    pub fn kept_bytes() -> usize {
        kept().kept
    }

    /// A zeroed private mapping of `size` bytes, huge-page backed where the kernel agrees.
    pub unsafe fn map(size: usize) -> *mut u8 {
        // SAFETY: an anonymous private mapping touches no existing memory.
        unsafe {
            let p = libc::mmap(
                null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return null_mut();
            }
            // Advice only: without transparent huge pages this fails and changes nothing.
            libc::madvise(p, size, libc::MADV_HUGEPAGE);
            p.cast()
        }
    }

    pub unsafe fn unmap(p: *mut u8, size: usize) {
        // SAFETY: `p` and `size` are those of one live mapping from `map`.
        unsafe {
            libc::munmap(p.cast(), size);
        }
    }

    pub unsafe fn remap(p: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: `p` and `old` are those of one live mapping from `map`.
        unsafe {
            let q = libc::mremap(p.cast(), old, new, libc::MREMAP_MAYMOVE);
            if q == libc::MAP_FAILED {
                return null_mut();
            }
            let mut k = kept();
            k.live = k.live + new - old;
            k.peak = k.peak.max(k.live);
            q.cast()
        }
    }
}

/// Unmaps the freed big blocks kept for reuse (see the module docs).
pub fn release_cached() {
    #[cfg(target_os = "linux")]
    big::release();
}

/// Hands back to the kernel what the process holds but no longer uses: the freed big blocks
/// kept for reuse, and glibc's free heap pages (which it is tuned never to trim on its own, see
/// `main.rs`). For the end of a phase whose temporaries the next one does not need (a model's
/// load steps), where they would otherwise add up to the process's peak.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
    release_cached();
}

/// Bytes of freed big blocks kept for reuse.
pub fn cached_bytes() -> usize {
    #[cfg(target_os = "linux")]
    {
        big::kept_bytes()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Starts a thread that calls [`release_cached`] once `quiet` has passed without a big
/// allocation (checked four times per period), so an idle daemon holds only its model.
pub fn release_when_idle(quiet: std::time::Duration) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    std::thread::Builder::new()
        .name("memory-release".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            let mut seen = big::TAKEN.load(Ordering::Relaxed);
            let mut since = std::time::Instant::now();
            loop {
                std::thread::sleep(quiet / 4);
                let now = big::TAKEN.load(Ordering::Relaxed);
                if now != seen {
                    (seen, since) = (now, std::time::Instant::now());
                } else if since.elapsed() >= quiet && cached_bytes() > 0 {
                    release_cached();
                }
            }
        })?;
    Ok(())
}

/// A size field of this process's /proc status (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, field)
}

/// `Field:   123 kB` from a /proc file, in bytes.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How much memory this process may use in all, `held` being what it uses now: what the system
/// has available plus `held`, and no more than the limit of its control group (systemd's
/// `MemoryMax=`, a container's memory limit) or of any group above it. `None` without /proc.
pub fn available(held: u64) -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let system = kib_field(&meminfo, "MemAvailable")?.saturating_add(held);
    let groups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limits = cgroup_limit_files(&groups, std::path::Path::new("/sys/fs/cgroup"))
        .into_iter()
        .filter_map(|f| cgroup_limit(&std::fs::read_to_string(f).ok()?));
    Some(limits.fold(system, u64::min))
}

/// The memory-limit files that apply to this process, from /proc/self/cgroup: its group's and
/// every ancestor's `memory.max` (cgroup v2) or `memory.limit_in_bytes` (v1's memory
/// controller), under `root`.
fn cgroup_limit_files(proc_cgroup: &str, root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (base, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            files.push(dir.join(file));
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    files
}

/// A cgroup memory limit in bytes; `None` for none (`max`, or v1's page-rounded 2^63).
fn cgroup_limit(text: &str) -> Option<u64> {
    text.trim().parse().ok().filter(|&b: &u64| b < 1 << 60)
}

/// Whether a block of `layout` gets its own mapping: big, and aligned no more than a page.
#[inline]
fn is_big(layout: &Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= BIG && layout.align() <= 4096
}

// SAFETY: big blocks are whole mappings of at least their size, page-aligned (so aligned as
// asked, see `is_big`), and only ever released by the path that made them (`is_big` of the same
// layout); everything else is `System`'s.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_big(&layout) {
            return unsafe { big::take(layout.size()).0 };
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_big(&layout) {
            // SAFETY: `take` returns null or a block of `size` writable bytes.
            return unsafe {
                let (p, fresh) = big::take(layout.size());
                // Fresh anonymous mappings are zero already.
                if !fresh && !p.is_null() {
                    std::ptr::write_bytes(p, 0, layout.size());
                }
                p
            };
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if is_big(&layout) {
            return unsafe { big::give(ptr, layout.size()) };
        }
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_big(&layout), is_big(&new)) {
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            #[cfg(target_os = "linux")]
            (true, true) => unsafe { big::remap(ptr, layout.size(), new_size) },
            _ => unsafe {
                let q = self.alloc(new);
                if !q.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                q
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    #[test]
    fn reads_kib_fields_of_proc_files() {
        let meminfo = "MemTotal:       24684092 kB\nMemFree:        22578548 kB\nMemAvailable:   24226536 kB\n";
        assert_eq!(kib_field(meminfo, "MemAvailable"), Some(24226536 * 1024));
        assert_eq!(kib_field(meminfo, "MemAvail"), None);
        assert!(status_bytes("VmRSS").is_some_and(|b| b > 1 << 20));
    }

    #[test]
    fn finds_the_limit_files_of_the_group_and_its_ancestors() {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = "0::/system.slice/removebgd.service\n";
        assert_eq!(
            cgroup_limit_files(v2, root),
            [
                "/sys/fs/cgroup/system.slice/removebgd.service/memory.max",
                "/sys/fs/cgroup/system.slice/memory.max",
                "/sys/fs/cgroup/memory.max",
            ]
            .map(PathBuf::from)
        );
        // A container sees its own group as the root.
        assert_eq!(
            cgroup_limit_files("0::/\n", root),
            [PathBuf::from("/sys/fs/cgroup/memory.max")]
        );
        let v1 = "12:cpu,cpuacct:/x\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(
            cgroup_limit_files(v1, root),
            [
                "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/docker/memory.limit_in_bytes",
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn parses_cgroup_limits() {
        assert_eq!(cgroup_limit("536870912\n"), Some(512 << 20));
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
    }

    /// Big blocks come back usable, zeroed when asked, keep their contents across growing and
    /// shrinking (across the size boundary too); freed ones are kept and reused for the same
    /// size, never beyond the most ever in use, and returned to the kernel on release.
    #[test]
    fn big_blocks_are_mapped_kept_for_reuse_and_released() {
        let a = Allocator;
        // Whether a mapping of exactly `len` bytes starts at `p` (the odd sizes keep other
        // tests' tensors from matching).
        let mapped = |p: *mut u8, len: usize| {
            std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| {
                let range = l.split_whitespace().next().unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let (start, end) = (
                    usize::from_str_radix(start, 16).unwrap(),
                    usize::from_str_radix(end, 16).unwrap(),
                );
                start == p as usize && end - start == len
            })
        };
        unsafe {
            release_cached();
            let size = (64 << 20) + 3 * 4096;
            let layout = Layout::from_size_align(size, 64).unwrap();
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            let block = std::slice::from_raw_parts_mut(p, size);
            assert!(block.iter().all(|b| *b == 0));
            block.fill(7);
            assert!(mapped(p, size), "a big block is its own mapping");
            a.dealloc(p, layout);
            assert!(mapped(p, size), "a freed block is kept");
            assert_eq!(cached_bytes(), size);

            // The next block of that size is the kept one, zeroed again when asked.
            let q = a.alloc_zeroed(layout);
            assert_eq!(q, p);
            assert!(std::slice::from_raw_parts(q, size).iter().all(|b| *b == 0));
            assert_eq!(cached_bytes(), 0);
            a.dealloc(q, layout);

            // Another size is a fresh mapping; keeping the first block as well would map more
            // than was ever in use at once, so it goes back to the kernel.
            let other = Layout::from_size_align(size + 2 * 4096, 64).unwrap();
            let r = a.alloc(other);
            assert!(!r.is_null() && r != p);
            assert!(!mapped(p, size), "the kept block was unmapped");
            assert_eq!(cached_bytes(), 0);
            std::slice::from_raw_parts_mut(r, other.size()).fill(1);
            a.dealloc(r, other);
            assert!(mapped(r, other.size()));
            release_cached();
            assert!(!mapped(r, other.size()), "release gives kept blocks back to the kernel");
            assert_eq!(cached_bytes(), 0);

            // Across the boundary and back: small -> big -> bigger -> small.
            let small = Layout::from_size_align(1000, 8).unwrap();
            let p = a.alloc(small);
            std::slice::from_raw_parts_mut(p, 1000).fill(3);
            let p = a.realloc(p, small, BIG + 10);
            let big = Layout::from_size_align(BIG + 10, 8).unwrap();
            assert!(std::slice::from_raw_parts(p, 1000).iter().all(|b| *b == 3));
            std::slice::from_raw_parts_mut(p, BIG + 10)[BIG] = 9;
            let p = a.realloc(p, big, 3 * BIG);
            let bigger = Layout::from_size_align(3 * BIG, 8).unwrap();
            assert_eq!(std::slice::from_raw_parts(p, BIG + 1)[BIG], 9);
            assert!(std::slice::from_raw_parts(p, 1000).iter().all(|b| *b == 3));
            let p = a.realloc(p, bigger, 500);
            assert!(std::slice::from_raw_parts(p, 500).iter().all(|b| *b == 3));
            a.dealloc(p, Layout::from_size_align(500, 8).unwrap());
            assert_eq!(cached_bytes(), 3 * BIG, "the grown block was kept when shrunk back");

            // The idle release: kept blocks go back once a quiet period passes with no big
            // allocation.
            release_when_idle(std::time::Duration::from_millis(50)).unwrap();
            let q = a.alloc(bigger);
            a.dealloc(q, bigger);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while cached_bytes() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert_eq!(cached_bytes(), 0);
            assert!(!mapped(q, 3 * BIG));
        }
    }
}
