mod cli;

fn main() -> std::process::ExitCode {
    // The sandbox's re-exec'd helper must take over before any thread starts
    // (unshare(CLONE_NEWUSER) fails in a multi-threaded process).
    if let Some(code) = nspawn::sandbox::maybe_run_child() {
        return code;
    }
    cli::main()
}
