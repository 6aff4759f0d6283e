//! The dmsetup-like CLI against a real daemon: create, ls, info, table round trip,
//! rename, message, remove, `--json` of every read-only command, `$DMREP_CONTROL`,
//! and `demo --no-wait`.

mod common;

use std::process::Stdio;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn create_ls_info_table_rename_message_remove() {
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 16 * MIB);
    let b = d.make_file_s("b.img", 8 * MIB);

    assert!(d.names().is_empty(), "a fresh daemon has no devices");
    assert!(d.cli_ok(&["ls"]).contains("No devices"), "plain ls of an empty daemon");

    // --table form.
    d.create("lin", &format!("0 16384 linear {a} 0"));
    // Table file form, with a comment, a continuation line and odd spacing.
    let tf = d.path("striped.table");
    std::fs::write(&tf, format!("# two stripes of 64 KiB chunks\n0   32768 striped 2 128 \\\n   {a} 16384   {b} 0\n"))
        .unwrap();
    d.cli_ok(&["create", "str", tf.to_str().unwrap()]);
    // Standard input form.
    let mut c = d.cli_cmd(&["create", "zer", "-"]);
    c.stdin(Stdio::piped());
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"0 2048 zero\n2048 2048 error\n").unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "create from stdin: {}", show(&o));

    let mut names = d.names();
    names.sort();
    assert_eq!(names, ["lin", "str", "zer"]);
    let plain = d.cli_ok(&["ls"]);
    for n in ["lin", "str", "zer"] {
        assert!(plain.contains(n), "plain ls lists {n}: {plain}");
    }

    // info --json fields.
    let i = d.info("str");
    assert_eq!(i["name"], "str");
    assert_eq!(i["state"], "active");
    assert_eq!(i["open_count"], 0);
    assert_eq!(i["segments"], 1);
    assert_eq!(i["size_sectors"], 32768);
    assert_eq!(i["size_bytes"], 32768 * 512);
    assert_eq!(i["live_table"], true);
    assert_eq!(i["inactive_table"], false);
    assert!(!i["uuid"].as_str().unwrap().is_empty());
    let z = d.info("zer");
    assert_eq!(z["segments"], 2);
    assert_eq!(z["size_sectors"], 4096);
    // Each device has its own UUID.
    assert_ne!(i["uuid"], d.info("lin")["uuid"]);
    // Plain info names the device and its size.
    let plain = d.cli_ok(&["info", "str"]);
    assert!(plain.contains("str") && plain.contains("32768"), "{plain}");

    // Table: canonical form, fed back to create, gives the same table.
    let t = d.cli_ok(&["table", "str"]);
    assert_eq!(t.trim(), format!("0 32768 striped 2 128 {a} 16384 {b} 0"));
    // (The source goes first: two devices may not use the same bytes of a file. The copy
    // then takes the source's name back.)
    for (src, copy) in [("str", "str2"), ("zer", "zer2"), ("lin", "lin2")] {
        let t = d.cli_ok(&["table", src]);
        let size = d.info(src)["size_sectors"].clone();
        let f = d.path(&format!("{copy}.table"));
        std::fs::write(&f, &t).unwrap();
        d.cli_ok(&["remove", src]);
        d.cli_ok(&["create", copy, f.to_str().unwrap()]);
        assert_eq!(d.cli_ok(&["table", copy]), t, "table of {copy} (created from `table {src}`)");
        assert_eq!(d.info(copy)["size_sectors"], size);
        d.cli_ok(&["rename", copy, src]);
    }
    // A two-segment table keeps its two lines.
    let zt = d.cli_ok(&["table", "zer"]);
    assert_eq!(zt.lines().collect::<Vec<_>>(), ["0 2048 zero", "2048 2048 error"]);

    // Rename: the old name is gone, the new one has the same UUID and table.
    let uuid = d.info("lin")["uuid"].clone();
    d.cli_ok(&["rename", "lin", "lin-renamed"]);
    assert!(!d.names().contains(&"lin".to_string()));
    assert_eq!(d.info("lin-renamed")["uuid"], uuid);
    assert_eq!(d.cli_ok(&["table", "lin-renamed"]).trim(), format!("0 16384 linear {a} 0"));
    let e = d.cli_err(&["info", "lin"]);
    assert!(e.contains("lin") && e.contains("not found"), "{e}");
    // Rename onto an existing name is refused and changes nothing.
    let e = d.cli_err(&["rename", "str", "zer"]);
    assert!(e.contains("zer") && e.contains("exists"), "{e}");
    assert!(d.names().contains(&"str".to_string()));

    // Message: linear/striped/zero take none; the error names the problem.
    let e = d.cli_err(&["message", "str", "0", "hello"]);
    assert!(e.contains("message"), "{e}");
    let e = d.cli_err(&["message", "lin-renamed", "0", "x", "y"]);
    assert!(e.contains("message"), "{e}");
    // A sector past the end has no segment.
    let e = d.cli_err(&["message", "str", "99999999", "hello"]);
    assert!(e.contains("99999999") || e.contains("segment"), "{e}");

    // Remove.
    d.cli_ok(&["remove", "zer"]);
    let mut names = d.names();
    names.sort();
    assert_eq!(names, ["lin-renamed", "str"]);
    let e = d.cli_err(&["remove", "zer"]);
    assert!(e.contains("not found"), "{e}");
}

#[test]
fn rename_changes_the_export_name() {
    require!("nbdinfo", "qemu-io");
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    d.create("old", &format!("0 8192 linear {a} 0"));
    qemu_io_ok(&d.uri("old"), &["write -P 0x3c 0 64k"]);
    d.cli_ok(&["rename", "old", "new"]);
    let list = run_ok(std::process::Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd+unix://?socket={}", d.nbd.display()),
    ]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["new"], "{list}");
    qemu_io_ok(&d.uri("new"), &["read -P 0x3c 0 64k"]);
    let o = qemu_io(&d.uri("old"), &["read 0 4k"]);
    assert!(!o.status.success(), "the old export name must be gone: {}", show(&o));
}

#[test]
fn json_outputs_parse_with_expected_fields() {
    let d = Daemon::start();
    let a = d.make_file_s("a.img", 4 * MIB);
    let b = d.make_file_s("b.img", 4 * MIB);
    d.create("j0", &format!("0 2048 linear {a} 0\n2048 4096 striped 2 8 {a} 2048 {b} 0"));
    d.create("j1", "0 100 zero");

    let v = d.json(&["version"]);
    assert!(v["cli"].is_string(), "{v}");
    assert!(v["daemon"].is_string(), "version --json has the daemon's version: {v}");
    assert!(v["protocol"].is_u64(), "{v}");
    assert_eq!(v["protocol"], v["daemon_protocol"], "{v}");

    let ls = d.json(&["ls"]);
    let ls = ls.as_array().unwrap();
    assert_eq!(ls.len(), 2);
    for dev in ls {
        for f in ["name", "uuid", "state", "open_count", "segments", "size_bytes", "size_sectors"] {
            assert!(!dev[f].is_null(), "ls --json entry lacks {f}: {dev}");
        }
    }

    let info = d.json(&["info"]);
    assert_eq!(info.as_array().unwrap().len(), 2, "info without a name shows all: {info}");
    let j0 = d.info("j0");
    assert_eq!(j0["segments"], 2);
    assert_eq!(j0["size_sectors"], 6144);
    assert_eq!(j0["size_bytes"], 6144 * 512);

    let st = d.json(&["status", "j0"]);
    let st = &st.as_array().unwrap()[0];
    assert_eq!(st["name"], "j0");
    assert_eq!(st["state"], "active");
    let segs = st["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[0]["start"], 0);
    assert_eq!(segs[0]["len"], 2048);
    assert_eq!(segs[0]["target"], "linear");
    assert_eq!(segs[1]["start"], 2048);
    assert_eq!(segs[1]["len"], 4096);
    assert_eq!(segs[1]["target"], "striped");
    assert_eq!(segs[1]["detail"]["stripes"], 2);
    assert_eq!(segs[1]["detail"]["chunk_sectors"], 8);
    assert!(segs[1]["line"].is_string());
    let all = d.json(&["status"]);
    assert_eq!(all.as_array().unwrap().len(), 2);

    let t = d.json(&["table", "j0"]);
    let t = &t.as_array().unwrap()[0];
    assert_eq!(t["name"], "j0");
    assert_eq!(
        t["table"].as_str().unwrap().trim(),
        format!("0 2048 linear {a} 0\n2048 4096 striped 2 8 {a} 2048 {b} 0")
    );
    // The inactive table is empty until something is loaded.
    let ti = d.json(&["table", "j1", "--inactive"]);
    assert_eq!(ti[0]["table"].as_str().unwrap().trim(), "");
    d.cli_ok(&["load", "j1", "--table", "0 200 zero"]);
    let ti = d.json(&["table", "j1", "--inactive"]);
    assert_eq!(ti[0]["table"].as_str().unwrap().trim(), "0 200 zero");
    assert_eq!(d.info("j1")["inactive_table"], true);
    d.cli_ok(&["clear", "j1"]);
    assert_eq!(d.info("j1")["inactive_table"], false);
    assert_eq!(d.info("j1")["size_sectors"], 100, "clear leaves the live table alone");
}

#[test]
fn control_socket_from_environment() {
    let d = Daemon::start();
    d.create("e0", "0 8 zero");
    let o = run(std::process::Command::new(BIN).args(["ls", "--json"]).env("DMREP_CONTROL", &d.control));
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["name"], "e0");
    // A control socket nobody listens on: one-line error naming the socket.
    let o = run(std::process::Command::new(BIN).args(["ls"]).env("DMREP_CONTROL", d.path("nobody.sock")));
    let e = check_one_line_error("ls on a dead socket", &o);
    assert!(e.contains("nobody.sock"), "{e}");
}

#[test]
fn demo_no_wait_prints_a_uri_and_exits() {
    let dir = tempfile::Builder::new().prefix("dmrep-demo").tempdir_in("/tmp").unwrap();
    let o = run(std::process::Command::new(BIN).args(["demo", "--no-wait", "--dir"]).arg(dir.path()));
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for dev in ["r0-0", "r0-1"] {
        assert!(out.contains(&format!("nbd+unix:///{dev}?socket={}", dir.path().join("nbd.sock").display())), "{out}");
    }
    assert!(out.contains("synchronous") && out.contains("replicator"), "the demo is the replicated group: {out}");
    assert!(out.contains("nbd://127.0.0.1:"), "{out}");
}

/// A daemon start that fails after the NBD socket is bound (the TCP address is taken,
/// the control socket cannot be made) exits with the cause and leaves no socket file
/// behind (issue 8: the NBD socket stayed), also with a device restored from its state
/// directory.
#[test]
fn a_failed_daemon_start_leaves_no_socket_behind() {
    let mut d = Daemon::start();
    let a = d.make_file_s("a.img", MIB);
    d.create("lin", &format!("0 2048 linear {a} 0"));
    d.terminate();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let not_a_dir = d.make_file("plain", 0);
    let bad_control = not_a_dir.join("control.sock");
    let cases: Vec<(Vec<String>, std::path::PathBuf, String)> = vec![
        (
            vec!["--nbd-listen".into(), addr.clone()],
            d.control.clone(),
            format!("dmrep: NBD listen address {addr}: Address already in use"),
        ),
        (vec![], bad_control.clone(), format!("dmrep: control socket {}: Not a directory", bad_control.display())),
    ];
    for (extra, control, want) in cases {
        let o = run(std::process::Command::new(BIN)
            .arg("--control")
            .arg(&control)
            .arg("daemon")
            .arg("--state-dir")
            .arg(&d.state)
            .arg("--nbd-unix")
            .arg(&d.nbd)
            .args(&extra)
            .stdin(Stdio::null()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}", show(&o));
        assert!(err.contains(&want), "expected {want:?}: {}", show(&o));
        assert!(!d.nbd.exists(), "the NBD socket was left behind: {}", show(&o));
        assert!(!control.exists(), "the control socket was left behind: {}", show(&o));
    }
    // And a start that works afterwards.
    d.restart();
    assert_eq!(d.names(), ["lin"]);
}

/// Shell completions are generated from the CLI itself: every subcommand is in them, and
/// the bash script parses.
#[test]
fn completions_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ok(std::process::Command::new(BIN).args(["completions", shell]));
        for sub in ["create", "switchover", "takeover", "verify", "events", "role", "resolve"] {
            assert!(out.contains(sub), "{shell} completions lack {sub}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("dmrep.bash");
            std::fs::write(&f, &out).unwrap();
            run_ok(std::process::Command::new("bash").arg("-n").arg(&f));
        }
    }
    let o = run(std::process::Command::new(BIN).args(["completions", "tcsh"]));
    assert!(!o.status.success(), "an unknown shell is refused");
}
