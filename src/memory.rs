//! Where the process's memory comes from.
//!
//! An inference allocates and frees a few hundred MB of activation tensors (IS-Net: tens of MB
//! each). From glibc's heap they fragment it: the daemon's resident memory crept from 480 to
//! 704 MB over its first requests, for ~330 MB actually live. So blocks of [`BIG`] and more are
//! mapped straight from the kernel and unmapped when freed, and resident memory follows what is
//! live. A fresh mapping has to be faulted in, which costs some speed: huge pages (where the
//! kernel allows them on request) make that a few faults per tensor instead of thousands.
//! Everything smaller stays on glibc's heap, tuned in `main.rs` never to be trimmed.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of this size and up get their own mapping.
pub const BIG: usize = 4 << 20;

/// The process allocator: big blocks mapped on their own, the rest from `System`.
pub struct Allocator;

#[cfg(target_os = "linux")]
mod big {
    use std::ptr::null_mut;

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
            if q == libc::MAP_FAILED { null_mut() } else { q.cast() }
        }
    }
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
            return unsafe { big::map(layout.size()) };
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        #[cfg(target_os = "linux")]
        if is_big(&layout) {
            // Fresh anonymous mappings are zero already.
            return unsafe { big::map(layout.size()) };
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        #[cfg(target_os = "linux")]
        if is_big(&layout) {
            return unsafe { big::unmap(ptr, layout.size()) };
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

    /// Big blocks come back usable, zeroed when asked, keep their contents across growing and
    /// shrinking (across the size boundary too), and are returned to the kernel when freed.
    #[test]
    fn big_blocks_are_mapped_and_unmapped() {
        let a = Allocator;
        // Whether a mapping of exactly `len` bytes starts at `p` (the odd size keeps other
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
            let size = (64 << 20) + 3 * 4096;
            let layout = Layout::from_size_align(size, 64).unwrap();
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            let block = std::slice::from_raw_parts_mut(p, size);
            assert!(block.iter().all(|b| *b == 0));
            block.fill(7);
            assert!(mapped(p, size), "a big block is its own mapping");
            a.dealloc(p, layout);
            assert!(!mapped(p, size), "freeing it gives it back to the kernel");

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
        }
    }
}
