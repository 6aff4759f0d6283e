//! The dmsetup-like subcommands: each sends one control request and prints the answer.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dmrep_control::client::Client;
use dmrep_formats::control::{Request, Response};

use crate::output;
use crate::Command;

/// Read a table from `--table`, a file, or stdin (`-`).
/// Send `words` to the target of sector 0 of `name` (a group's control device) and return
/// its reply text: the one way the group commands (role, snapshot, verify) talk to it.
pub fn message_text(client: &mut Client, name: &str, words: Vec<String>) -> Result<String> {
    match client.call(Request::Message { name: name.to_string(), sector: 0, args: words })? {
        Response::Reply { text } => Ok(text),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// [`message_text`] for the messages that answer JSON.
pub fn message_json(client: &mut Client, name: &str, words: Vec<String>) -> Result<serde_json::Value> {
    let text = message_text(client, name, words)?;
    serde_json::from_str(&text).with_context(|| format!("the daemon's answer is not JSON: {text}"))
}

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

/// `--timeout` seconds as milliseconds (none given: the daemon's default).
fn millis(secs: Option<f64>) -> Result<Option<u64>> {
    match secs {
        None => Ok(None),
        Some(s) if !s.is_finite() || !(0.0..=86400.0).contains(&s) => {
            bail!("--timeout: expected seconds from 0 to 86400, found {s}")
        }
        Some(s) => Ok(Some((s * 1000.0).round() as u64)),
    }
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("reading table from standard input")?;
    Ok(s)
}

pub fn run(cmd: Command, control: Option<PathBuf>) -> Result<()> {
    let (request, json) = match cmd {
        Command::Create { name, table_file, table, uuid, readonly } => {
            (Request::Create { name, table: table_text(table_file, table)?, uuid, read_only: readonly }, false)
        }
        Command::Load { name, table_file, table } => {
            (Request::Load { name, table: table_text(table_file, table)? }, false)
        }
        Command::Clear { name } => (Request::Clear { name }, false),
        Command::Suspend { name, timeout } => (Request::Suspend { name, timeout_ms: millis(timeout)? }, false),
        Command::Resume { name, timeout } => (Request::Resume { name, timeout_ms: millis(timeout)? }, false),
        Command::Remove { name, force } => (Request::Remove { name, force }, false),
        Command::Rename { name, new_name } => (Request::Rename { name, new_name }, false),
        Command::Status { name, json } => (Request::Status { name }, json),
        Command::Table { name, inactive, json } => (Request::Table { name, inactive }, json),
        Command::Info { name, json } => (Request::Info { name }, json),
        Command::Ls { tree: true, .. } => return tree(control),
        Command::Ls { json, .. } => (Request::List, json),
        Command::Message { name, sector, message } => (Request::Message { name, sector, args: message }, false),
        Command::Version { json } => (Request::Version, json),
        Command::Daemon(_)
        | Command::Demo(_)
        | Command::Pki(_)
        | Command::Log(_)
        | Command::Wait { .. }
        | Command::Roles(_)
        | Command::Snapshot(_)
        | Command::Events { .. }
        | Command::Verify { .. }
        | Command::Completions { .. } => {
            unreachable!("handled in main")
        }
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
        Response::Events { .. } => bail!("unexpected events answer"),
        Response::Snapshots { .. } => bail!("unexpected snapshots answer"),
    }
}

/// `dmrep ls --tree`: devices that no other device uses, each with what it uses below.
fn tree(control: Option<PathBuf>) -> Result<()> {
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    let Response::Tables { tables } = client.call(Request::Table { name: None, inactive: false })? else {
        bail!("unexpected answer to a table request");
    };
    let uses = |t: &str| -> Vec<String> {
        let mut u = dmrep_control::daemon::stacked_on(t);
        for line in t.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.get(2) == Some(&"replicator-dev") {
                u.extend(w.get(3).map(|s| s.to_string()));
            }
        }
        u.sort();
        u.dedup();
        u
    };
    let deps: Vec<(String, Vec<String>)> = tables.iter().map(|t| (t.name.clone(), uses(&t.table))).collect();
    let used: std::collections::BTreeSet<&String> = deps.iter().flat_map(|(_, u)| u).collect();
    fn show(name: &str, deps: &[(String, Vec<String>)], prefix: &str, depth: usize) {
        let kids = deps.iter().find(|(n, _)| n == name).map(|(_, u)| u.clone()).unwrap_or_default();
        for (i, k) in kids.iter().enumerate() {
            let last = i + 1 == kids.len();
            println!("{prefix}{}{k}", if last { "└─" } else { "├─" });
            if depth < 16 {
                show(k, deps, &format!("{prefix}{}", if last { "  " } else { "│ " }), depth + 1);
            }
        }
    }
    if deps.is_empty() {
        println!("No devices found");
    }
    for (name, _) in deps.iter().filter(|(n, _)| !used.contains(n)) {
        println!("{name}");
        show(name, &deps, " ", 0);
    }
    Ok(())
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

/// The status detail of the replicator segment of `name`, following a replicator-dev
/// to its control device.
fn group_detail(client: &mut Client, name: &str) -> Result<serde_json::Value> {
    let mut name = name.to_string();
    for _ in 0..2 {
        let devices = match client.call(Request::Status { name: Some(name.clone()) })? {
            Response::Statuses { devices } => devices,
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer to status: {other:?}"),
        };
        if let Some(why) = devices.first().and_then(|d| d.reason.as_ref()) {
            bail!("device {name} is unavailable: {why}");
        }
        let seg = devices.first().and_then(|d| d.segments.first()).context("device has no table")?;
        match seg.target.as_str() {
            "replicator" => return Ok(seg.detail.clone()),
            "replicator-dev" => name = seg.detail["group"].as_str().context("no group in status")?.to_string(),
            other => bail!("{name} is a {other} device, not part of a replicated group"),
        }
    }
    bail!("{name}: cannot find its replicator control device")
}

/// `dmrep wait`: poll the group's status until it is in sync.
pub fn wait(control: Option<PathBuf>, name: &str, resync_only: bool, timeout: Option<u64>) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    let start = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_print = std::time::Instant::now() - std::time::Duration::from_secs(10);
    loop {
        let d = group_detail(&mut client, name)?;
        let slinks = d["slinks"].as_array().cloned().unwrap_or_default();
        let (mut dirty, mut regions, mut outstanding, mut rate, mut unordered) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut eta: Option<u64> = None;
        for s in &slinks {
            let sy = &s["sync"];
            if sy["ordered"].as_bool() == Some(false) {
                unordered += 1;
                dirty += sy["dirty_regions"].as_u64().unwrap_or(0);
                regions += sy["regions"].as_u64().unwrap_or(0);
                rate += sy["rate_bytes_per_s"].as_u64().unwrap_or(0);
                if let Some(e) = sy["eta_s"].as_u64() {
                    eta = Some(eta.unwrap_or(0).max(e));
                }
            }
            outstanding += s["outstanding_ios"].as_u64().unwrap_or(0);
        }
        let done = unordered == 0 && (resync_only || outstanding == 0);
        let line = if unordered > 0 {
            let frac = if regions > 0 { 1.0 - dirty as f64 / regions as f64 } else { 0.0 };
            let bar: String = (0..30).map(|i| if (i as f64) < frac * 30.0 { '#' } else { '.' }).collect();
            format!(
                "resync [{bar}] {:5.1}%  {} of {} regions dirty  {:.1} MiB/s  ETA {}",
                frac * 100.0,
                dirty,
                regions,
                rate as f64 / 1048576.0,
                eta.map(|e| format!("{e}s")).unwrap_or_else(|| "?".into())
            )
        } else {
            format!("catching up: {outstanding} entries outstanding")
        };
        if tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else if done || last_print.elapsed() >= std::time::Duration::from_secs(1) {
            eprintln!("{line}");
            last_print = std::time::Instant::now();
        }
        if done {
            if tty {
                eprintln!();
            }
            println!("{name}: in sync");
            return Ok(());
        }
        if timeout.is_some_and(|t| start.elapsed().as_secs() >= t) {
            if tty {
                eprintln!();
            }
            bail!("{name}: not in sync after {}s", timeout.unwrap_or(0));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
