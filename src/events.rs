//! `dmrep events [--now] [--json]`: the daemon's state, then every change as it happens.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use dmrep_control::client::Client;
use dmrep_formats::control::{Request, Response};
use serde_json::Value;

fn print(e: &mut Value, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    let line = e.as_object_mut().and_then(|m| m.remove("line"));
    if json {
        writeln!(out, "{e}")
    } else {
        writeln!(out, "{}", line.as_ref().and_then(|l| l.as_str()).unwrap_or_default())
    }
}

pub fn run(control: Option<PathBuf>, now: bool, json: bool) -> Result<()> {
    let mut client = Client::connect(&dmrep_control::control_path(control))?;
    let mut stdout = std::io::stdout();
    let mut ask = |after: Option<u64>, now: bool| -> Result<(Vec<Value>, u64, u64)> {
        match client.call(Request::Events { after, wait_ms: 1000, now })? {
            Response::Events { events, lost, last } => Ok((events, lost, last)),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the daemon: {other:?}"),
        }
    };
    let (mut events, _, mut last) = ask(None, true)?;
    for e in events.iter_mut() {
        print(e, json, &mut stdout)?;
    }
    stdout.flush()?;
    if now {
        return Ok(());
    }
    loop {
        let (mut events, lost, l) = ask(Some(last), false)?;
        if lost > 0 {
            let mut e = serde_json::json!({"action": "change", "object": "-", "lost": lost.to_string(),
                "line": format!("change - lost:{lost}")});
            print(&mut e, json, &mut stdout)?;
        }
        for e in events.iter_mut() {
            print(e, json, &mut stdout)?;
        }
        // A reader that went away (a closed pipe) ends here.
        stdout.flush()?;
        last = l;
    }
}
