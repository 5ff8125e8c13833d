fn main() -> std::process::ExitCode {
    knit::run_cli()
}
