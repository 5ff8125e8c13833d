mod allocator;

fn main() -> std::process::ExitCode {
    allocator::keep_freed_memory();
    knit::run_cli()
}

#[cfg(test)]
mod tests {
    use crate::allocator::{keep_freed_memory, KEEP_FREED_MS, PURGE_DELAY};

    fn purge_delay() -> std::os::raw::c_long {
        // SAFETY: reads one integer from mimalloc's table of options.
        unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
    }

    /// Run as a child process with `MIMALLOC_PURGE_DELAY=4321`: option 15 must be the one
    /// that variable sets.
    #[test]
    fn option_15_is_the_one_mimalloc_purge_delay_sets() {
        if std::env::var_os("KNIT_ALLOCATOR_CHILD").is_some() {
            assert_eq!(purge_delay(), 4321);
            keep_freed_memory();
            assert_eq!(purge_delay(), 4321, "the environment's value stays");
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::option_15_is_the_one_mimalloc_purge_delay_sets",
            ])
            .env("KNIT_ALLOCATOR_CHILD", "1")
            .env("MIMALLOC_PURGE_DELAY", "4321")
            .status()
            .unwrap();
        assert!(status.success(), "the child test failed: {status}");
    }

    #[test]
    fn without_the_environment_freed_memory_is_kept_ten_seconds() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        keep_freed_memory();
        assert_eq!(purge_delay(), KEEP_FREED_MS);
    }
}
