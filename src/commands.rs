//! The dmsetup-like subcommands: each sends one control request and prints the answer.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dmrep_control::client::Client;
use dmrep_formats::control::{Request, Response};

use crate::output;
use crate::Command;

/// Read a table from `--table`, a file, or stdin (`-`).
fn table_text(file: Option<PathBuf>, text: Option<String>) -> Result<String> {
    match (file, text) {
        (_, Some(t)) => Ok(t),
        (Some(p), None) if p.as_os_str() == "-" => read_stdin(),
        (Some(p), None) => std::fs::read_to_string(&p).with_context(|| format!("reading table file {}", p.display())),
        (None, None) => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                bail!("no table given: pass a table file, `-` for standard input, or --table TEXT");
            }
            read_stdin()
        }
    }
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading table from standard input")?;
    Ok(s)
}

pub fn run(cmd: Command, control: Option<PathBuf>) -> Result<()> {
    let (request, json) = match cmd {
        Command::Create { name, table_file, table, uuid } => {
            (Request::Create { name, table: table_text(table_file, table)?, uuid }, false)
        }
        Command::Load { name, table_file, table } => {
            (Request::Load { name, table: table_text(table_file, table)? }, false)
        }
        Command::Clear { name } => (Request::Clear { name }, false),
        Command::Suspend { name } => (Request::Suspend { name }, false),
        Command::Resume { name } => (Request::Resume { name }, false),
        Command::Remove { name, force } => (Request::Remove { name, force }, false),
        Command::Rename { name, new_name } => (Request::Rename { name, new_name }, false),
        Command::Status { name, json } => (Request::Status { name }, json),
        Command::Table { name, inactive, json } => (Request::Table { name, inactive }, json),
        Command::Info { name, json } => (Request::Info { name }, json),
        Command::Ls { json } => (Request::List, json),
        Command::Message { name, sector, message } => (Request::Message { name, sector, args: message }, false),
        Command::Version { json } => (Request::Version, json),
        Command::Daemon(_) | Command::Demo(_) | Command::Log(_) => unreachable!("handled in main"),
    };
    let is_list = matches!(request, Request::List);
    let path = dmrep_control::control_path(control);
    let mut client = match Client::connect(&path) {
        Ok(c) => c,
        Err(e) if matches!(request, Request::Version) => {
            // The CLI's own version is still worth printing.
            output::print_version(None, json);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let response = client.call(request)?;
    match response {
        Response::Error { message } => bail!("{message}"),
        Response::Ok => Ok(()),
        Response::Reply { text } => {
            if !text.is_empty() {
                println!("{text}");
            }
            Ok(())
        }
        Response::Version { daemon, protocol } => {
            output::print_version(Some((daemon, protocol)), json);
            Ok(())
        }
        Response::Infos { devices } if is_list => output::print_list(&devices, json),
        Response::Infos { devices } => output::print_infos(&devices, json),
        Response::Tables { tables } => output::print_tables(&tables, json),
        Response::Statuses { devices } => output::print_statuses(&devices, json),
    }
}

/// `dmrep log dump|check`: read-only inspection of a replication log.
pub fn log(cmd: crate::LogCommand) -> Result<()> {
    let (args, check) = match cmd {
        crate::LogCommand::Dump(a) => (a, false),
        crate::LogCommand::Check(a) => (a, true),
    };
    let backend = dmrep_core::FileBackend::open_read_only(&args.path)
        .with_context(|| format!("opening {}", args.path.display()))?;
    let dump = dmrep_targets::replicator::log::inspect(&backend, args.start * 512)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&dump)?);
    } else if check {
        match (&dump.error, &dump.truncated) {
            (Some(e), _) => println!("{}: not a usable log: {e}", args.path.display()),
            (None, Some(t)) => println!(
                "{}: {} good entries, next seq {}; recovery would truncate: {t}",
                args.path.display(),
                dump.entries,
                dump.next_seq.unwrap_or(0)
            ),
            (None, None) => println!(
                "{}: clean: {} entries, {} bytes in use, next seq {}",
                args.path.display(),
                dump.entries,
                dump.used_bytes,
                dump.next_seq.unwrap_or(0)
            ),
        }
    } else {
        print!("{dump}");
    }
    if check && !dump.is_clean() {
        bail!("log {} needs recovery (see above)", args.path.display());
    }
    Ok(())
}
