//! `dmrep verify GROUP --slink N [--rate BYTES/S] [--fix] [--json]`: compare the group's
//! devices with a site's copy while writes go on, showing progress, then the regions
//! that differ.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dmrep_control::client::Client;
use serde_json::Value;

fn ask(client: &mut Client, group: &str, words: Vec<String>) -> Result<Value> {
    crate::commands::message_json(client, group, words)
}

fn region_text(r: &Value) -> String {
    format!("device {} bytes {}..+{}", r["dev_nr"], r["offset"], r["len"])
}

pub fn run(control: Option<PathBuf>, group: &str, slink: u16, rate: Option<u64>, fix: bool, json: bool) -> Result<()> {
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    let mut words = vec!["verify".to_string(), slink.to_string()];
    if let Some(r) = rate {
        words.push(format!("rate={r}"));
    }
    if fix {
        words.push("fix".into());
    }
    ask(&mut client, group, words)?;
    let tty = std::io::stderr().is_terminal() && !json;
    let mut last_line = Instant::now();
    let st = loop {
        let st = ask(&mut client, group, vec!["verify-status".into()])?;
        let (done, total) = (st["regions_done"].as_u64().unwrap_or(0), st["regions"].as_u64().unwrap_or(0));
        let eta = st["eta_s"].as_f64().map_or("-".to_string(), |e| format!("{e:.0} s"));
        let line = format!(
            "verify slink {slink}: {done}/{total} regions, {} differ, ETA {eta}",
            st["mismatches"].as_array().map_or(0, |a| a.len())
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else if !json && last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        if st["running"] != true {
            if tty {
                eprintln!();
            }
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if json {
        println!("{st}");
    }
    if let Some(e) = st["error"].as_str() {
        bail!("verify of slink {slink} stopped: {e}");
    }
    let mismatches = st["mismatches"].as_array().cloned().unwrap_or_default();
    let skipped = st["skipped"].as_array().cloned().unwrap_or_default();
    if !json {
        println!(
            "verified {} bytes of slink {slink} in {:.1} s: {} regions differ, {} skipped (written throughout)",
            st["bytes_done"],
            st["elapsed_s"].as_f64().unwrap_or(0.0),
            mismatches.len(),
            skipped.len()
        );
        for m in &mismatches {
            println!("  differs: {}", region_text(m));
        }
        for m in &skipped {
            println!("  skipped: {}", region_text(m));
        }
        if fix && !mismatches.is_empty() {
            println!("marked dirty: the resync of slink {slink} copies them (dmrep wait {group} --resync)");
        }
    }
    if !mismatches.is_empty() && !fix {
        bail!(
            "{} regions of slink {slink} differ from the group's devices (--fix copies them again)",
            mismatches.len()
        );
    }
    Ok(())
}
