//! The knit binary's allocator. The end-to-end benchmarks include this file too
//! (`#[path]`), so that their figures are the CLI's. A program that uses knit as a
//! library chooses its own allocator; the library sets none.
//!
//! - **mimalloc.** A sync makes and frees many small buffers on several threads at once
//!   (rows, units, sled pages), and glibc's malloc took about a quarter of the main
//!   thread's time in a schema sync's change detection. With mimalloc the initial sync of
//!   100,000 rows takes about 10 % less time (median of nine runs, docs/benchmarks.md).
//! - **Freed memory is kept for ten seconds** before it goes back to the system, not
//!   one (mimalloc's default). A sync frees and takes back large buffers over and over
//!   (sled's log buffers, a detection's vectors), and memory handed back and taken
//!   again costs page faults that zero it anew. One process of the datasources
//!   benchmark took 14,600–23,900 page faults with the default and 3,000 with ten
//!   seconds. In two series of nine interleaved pairs of runs, the initial sync's
//!   change detection took 34 and 40 ms less (medians of the paired differences; less
//!   in all nine pairs of the first series), the whole initial sync 14 and 109 ms less
//!   (docs/benchmarks.md). Memory a process no longer uses still
//!   goes back once it has been free for ten seconds, which matters for `knit serve`.
//!   `MIMALLOC_PURGE_DELAY` in the environment overrides this, as mimalloc documents.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`, in milliseconds. `libmimalloc-sys` does not name
/// this option; 15 is its place in mimalloc's `mi_option_e` (the same in mimalloc 2 and 3).
/// A test in main.rs checks it against the environment variable of the same option.
pub const PURGE_DELAY: std::os::raw::c_int = 15;

/// How long freed memory stays with the process before it goes back to the system.
pub const KEEP_FREED_MS: std::os::raw::c_long = 10_000;

/// Call first thing in `main`: sets the purge delay, unless the environment sets it.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one integer in mimalloc's table of options, which mimalloc reads
    // atomically; any value is valid for this option.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, KEEP_FREED_MS) };
}
