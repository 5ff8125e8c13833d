/// The allocator of the knit binary. A sync makes and frees many small buffers on
/// several threads at once (rows, units, sled pages), and glibc's malloc spent about a
/// quarter of the CPU of a schema sync on them; mimalloc makes the initial sync of
/// 100,000 rows about 20 % faster (docs/benchmarks.md). A program that uses knit as a
/// library chooses its own allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    knit::run_cli()
}
