//! `dmrep snapshot create|ls|delete`: group-consistent snapshots at a site.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Subcommand;
use dmrep_control::client::Client;
use dmrep_formats::control::{GroupSnapshot, Request, Response};
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a group-consistent snapshot: every device of GROUP at one point of its history.
    ///
    /// Run at the primary. Puts a marker into the group's log; the site of SLINK N (0: this site's own devices; a local
    /// SLINK: its replicas; a site link: that site) applies up to exactly the marker, snapshots every device there, and
    /// goes on applying. The snapshots are devices named GROUP.NAME.<dev_nr> at that site, served over NBD (writable:
    /// mount them, fsck them, back them up); together they hold every write acknowledged before this command, and
    /// nothing written after it returned. At a remote site, `dmrep snapshot ls` there shows them.
    Create {
        /// The group (its replicator control device).
        group: String,
        /// The snapshot's name: 1 to 64 of A-Z a-z 0-9 _ + -
        name: String,
        /// The SLINK whose site takes it.
        #[arg(long, default_value_t = 0)]
        slink: u16,
        /// Do not wait for a snapshot at this site to be taken.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for this site's snapshot, in seconds (entries queued before the marker are applied first).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// List the group-consistent snapshots at this site.
    Ls {
        /// Only this group's.
        group: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot: its devices and copy-on-write files.
    Delete { group: String, name: String },
}

fn message(client: &mut Client, group: &str, words: Vec<String>) -> Result<Value> {
    crate::commands::message_json(client, group, words)
}

pub fn run(cmd: SnapshotCommand, control: Option<PathBuf>) -> Result<()> {
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    match cmd {
        SnapshotCommand::Create { group, name, slink, no_wait, timeout, json } => {
            let placed = message(&mut client, &group, vec!["snapshot".into(), name.clone(), slink.to_string()])?;
            let seq = placed["seq"].as_u64().unwrap_or(0);
            if let Some(site) = placed["site"].as_str() {
                if json {
                    println!("{placed}");
                } else {
                    println!(
                        "marker for snapshot {name} logged at seq {seq}: site {site} takes it when it has applied \
                         everything before it (`dmrep snapshot ls {group}` there)"
                    );
                }
                return Ok(());
            }
            if no_wait {
                if json {
                    println!("{placed}");
                } else {
                    println!("marker for snapshot {name} logged at seq {seq} (slink {slink})");
                }
                return Ok(());
            }
            let until = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
            let outcome = loop {
                let left = until.saturating_duration_since(Instant::now());
                let o = message(
                    &mut client,
                    &group,
                    vec!["snapshot-outcome".into(), name.clone(), left.as_millis().clamp(1, 1000).to_string()],
                )?;
                if !o.is_null() || left.is_zero() {
                    break o;
                }
                if !ordered(&mut client, &group, slink)? {
                    // Out of ordered mode the SLINK gets no more entries: unless it
                    // reached the marker just before (asked once more), it never will.
                    let o = message(&mut client, &group, vec!["snapshot-outcome".into(), name.clone()])?;
                    if o.is_null() {
                        bail!(
                            "snapshot {name}: slink {slink} left ordered mode (it is resyncing) before it reached \
                             the marker (seq {seq}): the snapshot is not taken; ask again once it is in sync"
                        );
                    }
                    break o;
                }
            };
            if json {
                println!("{}", serde_json::json!({"placed": placed, "outcome": outcome}));
            }
            match outcome["outcome"].as_str() {
                Some("done") => {
                    if !json {
                        println!("{}", outcome["detail"].as_str().unwrap_or_default());
                    }
                    Ok(())
                }
                Some("failed") => bail!("snapshot {name}: {}", outcome["detail"].as_str().unwrap_or_default()),
                _ => bail!(
                    "snapshot {name}: slink {slink} has not reached the marker (seq {seq}) after {timeout} s; \
                     it is taken when it does (`dmrep snapshot ls {group}`), unless the slink leaves ordered \
                     mode first (then it never is)"
                ),
            }
        }
        SnapshotCommand::Ls { group, json } => {
            let snaps = match client.call(Request::Snapshots { group })? {
                Response::Snapshots { snapshots } => snapshots,
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string(&snaps)?);
            } else {
                print_list(&snaps);
            }
            Ok(())
        }
        SnapshotCommand::Delete { group, name } => {
            match client.call(Request::SnapshotDelete { group: group.clone(), name: name.clone() })? {
                Response::Ok => {
                    println!("snapshot {name} of {group} deleted");
                    Ok(())
                }
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the daemon: {other:?}"),
            }
        }
    }
}

/// Whether SLINK `slink` of `group` is in ordered mode (from the group's status).
fn ordered(client: &mut Client, group: &str, slink: u16) -> Result<bool> {
    let devices = match client.call(Request::Status { name: Some(group.to_string()) })? {
        Response::Statuses { devices } => devices,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    };
    let slinks = devices.first().and_then(|d| d.segments.first()).map(|s| s.detail["slinks"].clone());
    Ok(slinks
        .and_then(|v| v.as_array().cloned())
        .and_then(|a| a.into_iter().find(|s| s["slink"] == slink))
        .is_none_or(|s| s["sync"]["ordered"] != false))
}

fn print_list(snaps: &[GroupSnapshot]) {
    if snaps.is_empty() {
        println!("no snapshots");
        return;
    }
    println!("{:<12} {:<16} {:>10} {:<20} {:<6} DEVICES", "GROUP", "NAME", "SEQ", "TAKEN", "SLINK");
    for s in snaps {
        let taken = format_ms(s.created_ms);
        let devs: Vec<String> =
            s.devices.iter().map(|d| format!("{} ({}, {} KiB used)", d.device, d.state, d.used_bytes / 1024)).collect();
        println!("{:<12} {:<16} {:>10} {:<20} {:<6} {}", s.group, s.name, s.seq, taken, s.slink, devs.join(", "));
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::format_ms(0), "1970-01-01 00:00:00");
        assert_eq!(super::format_ms(1_796_000_000_000), "2026-11-30 00:53:20");
    }
}
