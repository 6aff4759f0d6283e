//! Printing answers: dmsetup-like text, or JSON with `--json`.

use anyhow::Result;
use dmrep_formats::control::{DeviceInfo, DeviceState, DeviceStatus, DeviceTable, PROTOCOL_VERSION};

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn state_word(s: DeviceState) -> &'static str {
    match s {
        DeviceState::Active => "ACTIVE",
        DeviceState::Suspended => "SUSPENDED",
        DeviceState::Unavailable => "UNAVAILABLE",
    }
}

pub fn print_version(daemon: Option<(String, u32)>, as_json: bool) {
    let cli = env!("CARGO_PKG_VERSION");
    if as_json {
        let v = serde_json::json!({
            "cli": cli,
            "daemon": daemon.as_ref().map(|d| d.0.clone()),
            "protocol": PROTOCOL_VERSION,
            "daemon_protocol": daemon.as_ref().map(|d| d.1),
        });
        println!("{v}");
        return;
    }
    println!("CLI version:      {cli}");
    match daemon {
        Some((d, p)) => {
            println!("Daemon version:   {d}");
            println!("Control protocol: {p}");
        }
        None => println!("Daemon version:   (not reachable)"),
    }
}

pub fn print_list(devs: &[DeviceInfo], as_json: bool) -> Result<()> {
    if as_json {
        return json(&devs);
    }
    if devs.is_empty() {
        println!("No devices found");
    }
    for d in devs {
        let ro = if d.read_only { ", read-only" } else { "" };
        match &d.reason {
            Some(why) => println!("{}\t(unavailable: {why})", d.name),
            None => println!("{}\t({} sectors, {}{ro})", d.name, d.size_sectors, state_word(d.state).to_lowercase()),
        }
    }
    Ok(())
}

pub fn print_infos(devs: &[DeviceInfo], as_json: bool) -> Result<()> {
    if as_json {
        return json(&devs);
    }
    for (i, d) in devs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let tables = match (d.live_table, d.inactive_table) {
            (true, true) => "LIVE & INACTIVE",
            (true, false) => "LIVE",
            (false, true) => "INACTIVE",
            (false, false) => "NONE",
        };
        println!("Name:              {}", d.name);
        println!("State:             {}{}", state_word(d.state), if d.read_only { " (READ-ONLY)" } else { "" });
        if let Some(why) = &d.reason {
            println!("Reason:            {why}");
        }
        println!("Tables present:    {tables}");
        println!("Open count:        {}", d.open_count);
        println!("Number of targets: {}", d.segments);
        println!("Size:              {} sectors ({} bytes)", d.size_sectors, d.size_bytes);
        println!("UUID:              {}", d.uuid);
    }
    Ok(())
}

pub fn print_tables(tables: &[DeviceTable], as_json: bool) -> Result<()> {
    if as_json {
        return json(&tables);
    }
    let single = tables.len() == 1;
    for t in tables {
        for line in t.table.lines() {
            if single {
                println!("{line}");
            } else {
                println!("{}: {line}", t.name);
            }
        }
    }
    Ok(())
}

pub fn print_statuses(devs: &[DeviceStatus], as_json: bool) -> Result<()> {
    if as_json {
        return json(&devs);
    }
    let single = devs.len() == 1;
    for d in devs {
        let prefix = if single { String::new() } else { format!("{}: ", d.name) };
        if let Some(why) = &d.reason {
            println!("{prefix}(unavailable: {why})");
        } else if d.segments.is_empty() {
            println!("{prefix}(no table) {}", state_word(d.state));
        }
        for s in &d.segments {
            let line = if s.line.is_empty() { String::new() } else { format!(" {}", s.line) };
            println!("{prefix}{} {} {}{line}", s.start, s.len, s.target);
        }
    }
    Ok(())
}
