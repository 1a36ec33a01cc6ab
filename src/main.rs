//! The one binary: the sandbox helper (re-exec), our own commands (`bootstrap`,
//! `bench`, `install`), and otherwise the Packer plugin (`describe`,
//! `start builder NAME`, or Packer 1.6.6's launch without arguments).

mod cli;

fn main() -> std::process::ExitCode {
    // The sandbox's re-exec'd helper must take over before any thread starts
    // (unshare(CLONE_NEWUSER) fails in a multi-threaded process).
    if let Some(code) = nspawn::sandbox::maybe_run_child() {
        return code;
    }
    let mut argv = std::env::args();
    let argv0 = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    if cli::is_cli_command(args.first().map(String::as_str)) {
        return cli::main();
    }
    nspawn::packer::plugin_main(&argv0, &args, &nspawn::packer::default_builders())
}
