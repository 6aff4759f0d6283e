//! Follow-the-sun commands: `dmrep role`, `switchover`, `takeover`, `resolve`. Each sends
//! one message to the group's control device and prints its JSON answer for people (or
//! as it is, with --json).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use dmrep_control::client::Client;
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum RoleCommand {
    /// Show this site's role for GROUP, its generation and lineage, and its peers.
    Role {
        /// The group (its replicator control device).
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover to another site (run at the primary).
    ///
    /// Hold writes, drain the log to SITE, make SITE the primary of a new generation, then follow it. Nothing is copied; the
    /// other secondaries follow the new primary. Prints how long writes were held. Any
    /// failure before SITE confirms rolls back: this site stays primary, writes released.
    Switchover {
        group: String,
        /// The secondary site to hand the group to.
        #[arg(long)]
        to: String,
        /// Longest time to drain the log to SITE, in seconds (writes are held meanwhile).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Take over as primary (run at a secondary whose primary is gone).
    ///
    /// Apply everything received, become primary of a new generation, accept writes. The old primary is fenced when
    /// it returns and fails back copying only the regions that differ.
    Takeover {
        group: String,
        /// Take over even though the primary is connected, or the devices are
        /// mid-resync (then they are not write-order consistent).
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resolve a split brain at the losing site.
    ///
    /// Its writes since the split are discarded; when the winning primary next connects, only the regions either side
    /// wrote since the split are copied.
    Resolve {
        group: String,
        /// Required: say explicitly that this site's writes since the split go.
        #[arg(long)]
        discard_local: bool,
    },
}

fn ask(control: Option<PathBuf>, group: &str, words: Vec<String>) -> Result<String> {
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    crate::commands::message_text(&mut client, group, words)
}

fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("the daemon's answer is not JSON: {text}"))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn run(cmd: RoleCommand, control: Option<PathBuf>) -> Result<()> {
    match cmd {
        RoleCommand::Role { group, json } => {
            let text = ask(control, &group, vec!["role".into()])?;
            if json {
                println!("{text}");
                return Ok(());
            }
            let v = parse(&text)?;
            println!("Group:        {group}");
            println!("Role:         {}", s(&v["role"]));
            println!("Generation:   {}", s(&v["generation"]));
            let lineage: Vec<String> = v["lineage"]
                .as_array()
                .map(|a| a.iter().map(|g| format!("{} (from seq {})", s(&g["generation"]), s(&g["start"]))).collect())
                .unwrap_or_default();
            println!("Lineage:      {}", lineage.join(" -> "));
            println!("Received:     {}   Applied: {}", s(&v["received"]), s(&v["applied"]));
            if !v["fenced"].is_null() {
                println!("FENCED:       {} (writes are refused)", s(&v["fenced"]));
            }
            if !v["split_brain"].is_null() {
                println!("SPLIT BRAIN:  {}", s(&v["split_brain"]));
                println!("              resolve at the losing site: dmrep resolve {group} --discard-local");
            }
            if v["inconsistent"].as_bool() == Some(true) {
                println!("Inconsistent: the devices are being resynchronised (not write-order consistent)");
            }
            for p in v["peers"].as_array().into_iter().flatten() {
                println!(
                    "Peer:         {} (slink {}) {}{}{}",
                    s(&p["site"]),
                    s(&p["slink"]),
                    s(&p["role"]),
                    if p["connected"].as_bool() == Some(true) { ", connected" } else { ", not connected" },
                    match p["last_error"].as_str() {
                        Some(e) if p["connected"].as_bool() != Some(true) => format!(" ({e})"),
                        _ => String::new(),
                    }
                );
            }
        }
        RoleCommand::Switchover { group, to, timeout, json } => {
            if !timeout.is_finite() || timeout <= 0.0 {
                bail!("--timeout: expected a positive number of seconds, found {timeout}");
            }
            let text = ask(control, &group, vec!["switchover".into(), to.clone(), timeout.to_string()])?;
            if json {
                println!("{text}");
                return Ok(());
            }
            let v = parse(&text)?;
            println!(
                "switched over: {to} is the primary of generation {} (from seq {}); writes were held {:.1} ms \
                 (draining {:.1} ms)",
                s(&v["generation"]),
                s(&v["start"]),
                v["held_ms"].as_f64().unwrap_or(0.0),
                v["drain_ms"].as_f64().unwrap_or(0.0)
            );
            if let Some(b) = v["behind"].as_array().filter(|b| !b.is_empty()) {
                let names: Vec<String> = b.iter().map(s).collect();
                println!("not drained (they catch up from the new primary): {}", names.join(", "));
            }
        }
        RoleCommand::Takeover { group, force, json } => {
            let mut words = vec!["takeover".to_string()];
            if force {
                words.push("force".into());
            }
            let text = ask(control, &group, words)?;
            if json {
                println!("{text}");
                return Ok(());
            }
            let v = parse(&text)?;
            println!(
                "took over: primary of generation {} from seq {} in {:.1} ms; entries the old primary had \
                 and this site did not: {}",
                s(&v["generation"]),
                s(&v["start"]),
                v["took_ms"].as_f64().unwrap_or(0.0),
                s(&v["lost_entries"])
            );
        }
        RoleCommand::Resolve { group, discard_local } => {
            if !discard_local {
                bail!("say which side loses: --discard-local (run it at the site whose writes since the split go)");
            }
            println!("{}", ask(control, &group, vec!["resolve".into(), "discard-local".into()])?);
        }
    }
    Ok(())
}
