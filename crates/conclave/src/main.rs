//! `conclave`: one binary for the server, its operator tools and its clients. This crate only
//! parses arguments and calls into the library crates.

mod admin;
mod chat;
mod cli;
mod client;
mod doctor;
mod install;
mod logs;
mod monitor;
mod progress;
mod serve;
mod user;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("conclave: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<std::process::ExitCode> {
    use cli::Command;
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Fingerprint(args) => serve::fingerprint(args),
        Command::User(args) => user::run(args),
        Command::Client(args) => serve::client(args),
        Command::Chat(args) => chat::run(args),
        Command::Logs(args) => logs::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Monitor(args) => monitor::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Bench(args) => Ok(conclave_bench::run(args)?),
        Command::Completions { shell } => install::completions(shell),
        Command::Man { dir } => install::man_pages(&dir),
    }
}
