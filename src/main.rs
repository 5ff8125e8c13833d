/// The allocator of the knit binary. A sync makes and frees many small buffers on
/// several threads at once (rows, units, sled pages), and glibc's malloc took about a
/// quarter of the main thread's time in a schema sync's change detection; with
/// mimalloc the initial sync of 100,000 rows takes about 10 % less time (median of
/// nine runs, docs/benchmarks.md). A program that uses knit as a library chooses its
/// own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    knit::run_cli()
}
