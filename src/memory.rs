//! How the long-running daemons (`agent`, `serve`) use the C library's
//! allocator during a transfer, and how they give memory back after it.
//!
//! A transfer moves one message of about 64 KiB per chunk. The MQTT
//! client reads each into a buffer of its own, which is freed once the
//! chunk is written: a steady stream of blocks of the same large size.
//! Both C libraries the device builds use serve such blocks badly by
//! default:
//! - glibc gives the top of its heap back to the kernel whenever 128 KiB
//!   are free there and serves blocks of 128 KiB or more with mmap: a brk
//!   or munmap and fresh zeroed pages for nearly every message (about 8 ms
//!   of the agent's CPU per 50 MiB, benches/transfer.rs). [`tune_allocator`]
//!   has it keep up to 4 MiB instead.
//! - musl (the static device builds) maps and unmaps every block of this
//!   size: 17 page faults and two system calls per chunk, which made the
//!   static agent spend 2.5 times the CPU of the glibc one. musl has no
//!   knob for it, so in musl builds [`BlockCache`] is the global allocator:
//!   it keeps a few freed large blocks, up to [`CACHE_BUDGET`], for the next
//!   allocation of the same size.
//!
//! [`release_free_memory`] gives it all back when a transfer ends, so an
//! idle daemon holds none of it.

// `BlockCache` is the global allocator of the musl builds only; other
// builds compile it for its unit tests.
#![cfg_attr(not(target_env = "musl"), allow(dead_code))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The allocator of the static (musl) builds: see the module docs.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: BlockCache = BlockCache::new();

/// Blocks from this size up to [`LARGEST`] are rounded up to whole pages
/// and may be cached.
const SMALLEST: usize = 32 * 1024;
const LARGEST: usize = 2 * 1024 * 1024;
const PAGE: usize = 4096;
const SLOTS: usize = 16;
/// At most this many bytes sit in the cache.
pub(crate) const CACHE_BUDGET: usize = 2 * 1024 * 1024;

/// A global allocator over [`System`] that keeps up to [`SLOTS`] freed
/// large blocks (at most [`CACHE_BUDGET`] bytes) while enabled, and hands
/// them out again for allocations of the same rounded size. Small blocks
/// and over-aligned ones go straight to `System`.
///
/// The cache sits behind a try-lock: a thread that finds it busy just uses
/// `System`, so no allocation ever waits for another.
pub(crate) struct BlockCache {
    enabled: AtomicBool,
    busy: AtomicBool,
    slots: UnsafeCell<Slots>,
}

struct Slots {
    /// (address, rounded size, alignment); address 0 is an empty slot.
    blocks: [(usize, usize, usize); SLOTS],
    bytes: usize,
}

// SAFETY: `slots` is only touched by the thread that holds `busy`.
unsafe impl Sync for BlockCache {}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub(crate) const fn new() -> BlockCache {
        BlockCache {
            enabled: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            slots: UnsafeCell::new(Slots {
                blocks: [(0, 0, 0); SLOTS],
                bytes: 0,
            }),
        }
    }

    /// Starts keeping freed large blocks (the daemons do, at start).
    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Frees every cached block; the cache stays enabled.
    pub(crate) fn flush(&self) {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: we hold `busy`.
        let slots = unsafe { &mut *self.slots.get() };
        let blocks = std::mem::replace(&mut slots.blocks, [(0, 0, 0); SLOTS]);
        slots.bytes = 0;
        self.busy.store(false, Ordering::Release);
        for (addr, size, align) in blocks {
            if addr != 0 {
                // SAFETY: cached blocks came from System with this layout.
                unsafe {
                    System.dealloc(
                        addr as *mut u8,
                        Layout::from_size_align_unchecked(size, align),
                    )
                };
            }
        }
    }

    /// Bytes held in the cache right now.
    #[cfg(test)]
    fn cached_bytes(&self) -> usize {
        self.with_slots(|s| s.bytes).unwrap_or(0)
    }

    /// Runs `f` on the slots if nobody else holds them.
    fn with_slots<T>(&self, f: impl FnOnce(&mut Slots) -> T) -> Option<T> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        // SAFETY: we hold `busy`.
        let out = f(unsafe { &mut *self.slots.get() });
        self.busy.store(false, Ordering::Release);
        Some(out)
    }
}

/// The size a block of `layout` really has, if it is one the cache deals
/// in. Depends only on the layout, so that alloc and dealloc agree.
fn rounded(layout: Layout) -> Option<usize> {
    let size = layout.size();
    if (SMALLEST..=LARGEST).contains(&size) && layout.align() <= 16 {
        Some(size.div_ceil(PAGE) * PAGE)
    } else {
        None
    }
}

// SAFETY: every block handed out is either a fresh System block of at
// least the layout's size and alignment, or a cached one that was such a
// block of the same rounded size and alignment; blocks are freed through
// System with the layout they were allocated with (the rounded size and
// the caller's alignment).
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(size) = rounded(layout) else {
            // SAFETY: as the caller's contract.
            return unsafe { System.alloc(layout) };
        };
        if self.enabled.load(Ordering::Relaxed) {
            let hit = self.with_slots(|s| {
                let slot = s
                    .blocks
                    .iter_mut()
                    .find(|&&mut (a, n, al)| a != 0 && n == size && al == layout.align())?;
                let addr = std::mem::take(slot).0;
                s.bytes -= size;
                Some(addr)
            });
            if let Some(Some(addr)) = hit {
                return addr as *mut u8;
            }
        }
        // SAFETY: size >= layout.size() > 0 and align is a power of two.
        unsafe { System.alloc(Layout::from_size_align_unchecked(size, layout.align())) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match rounded(layout) {
            // SAFETY: as `alloc`.
            Some(size) => unsafe {
                System.alloc_zeroed(Layout::from_size_align_unchecked(size, layout.align()))
            },
            // SAFETY: as the caller's contract.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(size) = rounded(layout) else {
            // SAFETY: as the caller's contract.
            return unsafe { System.dealloc(ptr, layout) };
        };
        if self.enabled.load(Ordering::Relaxed) {
            let kept = self.with_slots(|s| {
                if s.bytes + size > CACHE_BUDGET {
                    return false;
                }
                match s.blocks.iter_mut().find(|(a, _, _)| *a == 0) {
                    Some(slot) => {
                        *slot = (ptr as usize, size, layout.align());
                        s.bytes += size;
                        true
                    }
                    None => false,
                }
            });
            if kept == Some(true) {
                return;
            }
        }
        // SAFETY: the block was allocated with this rounded layout.
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align())) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size > 0 and, rounded up to
        // the alignment, no larger than isize::MAX.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (rounded(layout), rounded(new_layout)) {
            // SAFETY: neither block is one this allocator rounds.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            (Some(old), Some(new)) if old == new => ptr,
            _ => {
                // SAFETY: a fresh block, the smaller of both sizes copied,
                // then the old block freed as it was allocated.
                unsafe {
                    let fresh = self.alloc(new_layout);
                    if !fresh.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    fresh
                }
            }
        }
    }
}

/// Makes the daemon's allocator keep the large blocks of a transfer (see
/// the module docs). Called once at the start of `agent` and `serve`.
pub(crate) fn tune_allocator() {
    #[cfg(target_env = "musl")]
    ALLOCATOR.enable();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        const KEEP: std::ffi::c_int = 4 * 1024 * 1024;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt only changes glibc's malloc parameters; both
        // are documented ones with valid values.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, KEEP);
            mallopt(M_TRIM_THRESHOLD, KEEP);
        }
    }
}

/// Gives the memory the allocator keeps free back to the kernel (after a
/// transfer, see [`tune_allocator`]).
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "musl")]
    ALLOCATOR.flush();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only returns free memory to the kernel.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 8).unwrap()
    }

    #[test]
    fn a_freed_large_block_is_handed_out_again_only_while_enabled() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(65_580));
            cache.dealloc(a, layout(65_580));
            assert_eq!(cache.cached_bytes(), 0, "disabled: nothing is kept");

            cache.enable();
            let b = cache.alloc(layout(65_580));
            b.write_bytes(7, 65_580);
            cache.dealloc(b, layout(65_580));
            assert_eq!(cache.cached_bytes(), 69_632, "kept, rounded to pages");
            // Same rounded size: the same block.
            let c = cache.alloc(layout(66_000));
            assert_eq!(c, b);
            assert_eq!(cache.cached_bytes(), 0);
            // Another size: a fresh block.
            let d = cache.alloc(layout(200_000));
            assert_ne!(d, c);
            cache.dealloc(c, layout(66_000));
            cache.dealloc(d, layout(200_000));
            assert_eq!(cache.cached_bytes(), 69_632 + 200_704);
            cache.flush();
            assert_eq!(cache.cached_bytes(), 0);
        }
    }

    #[test]
    fn small_blocks_pass_through_and_the_budget_holds() {
        let cache = BlockCache::new();
        cache.enable();
        unsafe {
            let small = cache.alloc(layout(1000));
            cache.dealloc(small, layout(1000));
            assert_eq!(cache.cached_bytes(), 0);

            let blocks: Vec<*mut u8> = (0..40).map(|_| cache.alloc(layout(100_000))).collect();
            for &b in &blocks {
                cache.dealloc(b, layout(100_000));
            }
            assert!(cache.cached_bytes() <= CACHE_BUDGET);
            assert!(cache.cached_bytes() > CACHE_BUDGET / 2);
            cache.flush();
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_classes() {
        let cache = BlockCache::new();
        cache.enable();
        unsafe {
            let mut p = cache.alloc(layout(100));
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            for (old, new) in [
                (100, 40_000),
                (40_000, 40_100),
                (40_100, 300_000),
                (300_000, 50),
            ] {
                p = cache.realloc(p, layout(old), new);
                let keep = old.min(new).min(100);
                for i in 0..keep {
                    assert_eq!(*p.add(i), i as u8, "byte {i} after {old} -> {new}");
                }
            }
            cache.dealloc(p, layout(50));
            cache.flush();
        }
    }
}
