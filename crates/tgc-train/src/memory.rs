//! Allocator setting for training binaries that use mimalloc as the global allocator.
//!
//! A training step allocates and frees the same few hundred megabytes of activations and
//! gradients every 0.2-0.3 s. mimalloc returns freed memory to the OS after its
//! `purge_delay` (1 s in the bundled v3), with transparent huge pages allowed, so the next
//! steps fault the memory back in and the kernel zeroes it 2 MiB at a time: `perf record`
//! on `step_timing` with the `q4-big` config put 14% of the samples in the kernel's
//! `clear_page_erms` under `do_huge_pmd_anonymous_page`. Never purging keeps the memory
//! mapped (the resident size stays at the step's peak, which training reaches anyway on
//! every step) and removes most of that: 5.5% left, from the first steps' growth.
//!
//! Measured in the same session, alternating the binary's default against
//! `MIMALLOC_PURGE_DELAY=1000` (docs/results.md, "CPU training speed").

use std::os::raw::c_long;

/// Index of `mi_option_purge_delay` in the `mi_option_t` enum of the mimalloc bundled
/// with `libmimalloc-sys` 0.1.49 (pinned in the workspace). `libmimalloc-sys` names the
/// options around it but not this one; a test checks the index against mimalloc's own
/// parsing of `MIMALLOC_PURGE_DELAY`.
pub const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (`purge_delay = -1`), unless
/// the `MIMALLOC_PURGE_DELAY` environment variable is set, which then wins (so
/// `MIMALLOC_PURGE_DELAY=1000` restores mimalloc's default for a comparison). Returns
/// the purge delay now in effect, in milliseconds (-1: never).
///
/// Meant for binaries whose global allocator is `mimalloc::MiMalloc` (this workspace's
/// training examples and the `tgc` CLI); elsewhere it only sets an option of an
/// allocator nobody uses. Call it first thing in `main`; it may be called again.
///
/// ```
/// let delay = tgc_train::retain_freed_memory();
/// if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
///     assert_eq!(delay, -1);
/// }
/// assert_eq!(delay, tgc_train::memory::purge_delay());
/// ```
pub fn retain_freed_memory() -> i64 {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an integer in mimalloc's option table;
        // the index is a valid option of the pinned version.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1 as c_long) };
    }
    purge_delay()
}

/// mimalloc's purge delay in milliseconds as it stands (-1: never purge).
pub fn purge_delay() -> i64 {
    // SAFETY: reads an entry of mimalloc's option table (initialising it from the
    // environment on first use); the index is a valid option of the pinned version.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}
