fn main() -> std::process::ExitCode {
    if let Some(code) = nspawn::sandbox::maybe_run_child() {
        return code;
    }
    std::process::ExitCode::SUCCESS
}
