//! A counting allocator for the tests of this crate that measure memory: the system
//! allocator, counting what one thread allocates while [`measured`] runs (other threads, the
//! test harness's included, are not counted). Each test binary that uses it declares
//! `mod counting;`, which installs it as that binary's global allocator.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting what this thread allocates while [`measured`] runs.
pub struct Counting;

thread_local! {
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn active() -> bool {
    ACTIVE.try_with(Cell::get).unwrap_or(false)
}

/// `grow` more bytes live, `transient` more for the moment (a moving reallocation holds both
/// blocks), the largest block `block` bytes.
fn note(grow: isize, transient: isize, block: usize) {
    if !active() {
        return;
    }
    let live = LIVE.with(|l| {
        l.set(l.get() + grow);
        l.get()
    });
    PEAK.with(|p| p.set(p.get().max(live + transient)));
    LARGEST.with(|l| l.set(l.get().max(block)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize, 0, layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            note(layout.size() as isize, 0, layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize), 0, 0);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            let old = layout.size() as isize;
            note(new_size as isize - old, old, new_size);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What a measured call allocated: the most bytes live at once, the largest block, and what
/// was still live at its end.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// The most bytes live at once.
    pub peak: usize,
    /// The largest block.
    pub largest: usize,
    /// The bytes still live when the call returned (what its result holds, say).
    pub live: usize,
}

/// Stops counting when dropped, also when the measured call panics.
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(false));
    }
}

/// Runs `f`, counting the allocations it makes on this thread.
pub fn measured<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|l| l.set(0));
    let counted = Counted;
    ACTIVE.with(|a| a.set(true));
    let result = f();
    drop(counted);
    let usage = Usage {
        peak: PEAK.with(Cell::get).max(0) as usize,
        largest: LARGEST.with(Cell::get),
        live: LIVE.with(Cell::get).max(0) as usize,
    };
    (result, usage)
}
