use std::process::ExitCode;

use nspawn::packer;

fn main() -> ExitCode {
    let mut argv = std::env::args();
    let argv0 = argv.next().unwrap_or_default();
    let args: Vec<String> = argv.collect();
    match args.first().map(String::as_str) {
        Some("install") => {
            let layouts = match args.get(1).map(String::as_str) {
                Some("--legacy") => vec![packer::InstallLayout::Legacy],
                Some("--modern") => vec![packer::InstallLayout::Modern],
                None => vec![packer::InstallLayout::Legacy, packer::InstallLayout::Modern],
                Some(other) => {
                    eprintln!("install: unknown option {other} (use --legacy or --modern)");
                    return ExitCode::from(2);
                }
            };
            let exe = match std::env::current_exe() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("install: locating this executable: {e}");
                    return ExitCode::from(1);
                }
            };
            match packer::install(&exe, &layouts) {
                Ok(files) => {
                    for f in files {
                        let who = if f.ends_with("packer-builder-nspawn") {
                            "for Packer 1.6.6 … 1.10 (builder type \"nspawn\")"
                        } else if f.to_string_lossy().ends_with("_SHA256SUM") {
                            "checksum of the above"
                        } else {
                            "for Packer >= 1.7 (required from 1.11)"
                        };
                        println!("installed {} {who}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        _ => packer::plugin_main(&argv0, &args, &packer::default_builders()),
    }
}
