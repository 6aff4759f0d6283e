//! `dmrep`: the command line. `dmrep daemon` runs the device-mapper daemon; every other
//! subcommand talks to it over the control socket, like dmsetup talks to the kernel.

mod commands;
mod demo;
mod events;
mod output;
mod roles;
mod run_daemon;
mod snapshot;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// User-space device-mapper with a write-ordered block replicator, served over NBD.
#[derive(Parser, Debug)]
#[command(name = "dmrep", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Control socket of the daemon [default: $DMREP_CONTROL, else /run/dmrep/control.sock]
    #[arg(long, global = true, value_name = "SOCKET")]
    control: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: holds the devices, serves them over NBD, answers the CLI.
    Daemon(run_daemon::DaemonArgs),
    /// Certificates for site links: a CA for your sites, then one certificate per site.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Create a device and activate TABLE (a file, `-` for stdin, or --table TEXT).
    Create {
        /// The device (and NBD export) name: letters, digits and . _ + -
        name: String,
        /// Table file, or `-` for standard input.
        table_file: Option<PathBuf>,
        /// The table itself, e.g. "0 2048 linear /srv/disk0 0".
        #[arg(long, conflicts_with = "table_file")]
        table: Option<String>,
        /// UUID to give the device (default: generated): 1-128 characters, no control
        /// characters, not used by another device.
        #[arg(long)]
        uuid: Option<String>,
        /// Refuse writes (EPERM) and export the device read-only over NBD. Kept across
        /// daemon restarts.
        #[arg(long)]
        readonly: bool,
    },
    /// Load TABLE as the device's inactive table; `resume` makes it active.
    Load {
        /// The device.
        name: String,
        /// Table file, or `-` for standard input.
        table_file: Option<PathBuf>,
        /// The table itself.
        #[arg(long, conflicts_with = "table_file")]
        table: Option<String>,
    },
    /// Drop the device's inactive table.
    Clear {
        /// The device.
        name: String,
    },
    /// Hold new I/O and wait for in-flight I/O to finish. Nothing is failed.
    ///
    /// If in-flight requests do not finish within --timeout (a target holds them, e.g.
    /// writes waiting for a synchronous SLINK that is down), the suspend gives up: the
    /// device is active again and the command fails saying how many are still held.
    Suspend {
        /// The device.
        name: String,
        /// Seconds to wait for in-flight I/O, fractions allowed [default: 10]
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Swap in a loaded table (if any) and let I/O flow again.
    ///
    /// Swapping needs the device quiet: a device not suspended yet is suspended first,
    /// waiting at most --timeout for in-flight I/O (else the old table stays active and
    /// the new one loaded). On an unavailable device (not restored at start-up), tries to
    /// bring it back.
    Resume {
        /// The device.
        name: String,
        /// Seconds to wait for in-flight I/O before a swap, fractions allowed [default: 10]
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Remove a device. Refused while an NBD client has it open, unless --force.
    ///
    /// Requests the device's targets still hold (writes waiting for a synchronous SLINK
    /// that is down) fail with ESHUTDOWN after a 3 s grace period, also while a suspend
    /// waits for them. An unavailable device (not restored at start-up) is forgotten.
    Remove {
        /// The device.
        name: String,
        /// Remove even if open: clients' further requests fail.
        #[arg(long, short)]
        force: bool,
    },
    /// Rename a device (its NBD export name changes with it).
    Rename {
        /// The device.
        name: String,
        /// Its new name.
        new_name: String,
    },
    /// Show the status of each segment of one device or all.
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print the table of one device or all, in a form `create` accepts back.
    Table {
        name: Option<String>,
        /// The loaded, not yet active table.
        #[arg(long)]
        inactive: bool,
        #[arg(long)]
        json: bool,
    },
    /// State, open count, segments, size and UUID of one device or all (an unavailable
    /// device, not restored at start-up, with the reason).
    Info {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List devices, unavailable ones (recorded, not restored at start-up) included.
    Ls {
        #[arg(long)]
        json: bool,
        /// Show stacks: each device with the devices it uses (`/dev/mapper/NAME` in its
        /// table, a replicator-dev's control device) below it.
        #[arg(long, conflicts_with = "json")]
        tree: bool,
    },
    /// Send a message to the target of the segment holding SECTOR.
    ///
    /// Messages of a replicator control device (e.g. `dmrep message r0 0 slink 1 pause`):
    ///   slink <nr> policy <synchronous|asynchronous>[+stall]
    ///   slink <nr> fallbehind ios=<n>|size=<n>[k|m|g|t]|timeout=<n>[ms|s|m|h]
    ///   slink <nr> pause | slink <nr> resume
    ///   slink <nr> resync-rate <bytes per second, 0 = unlimited>
    ///   stop | start            (pause / resume shipping to every SLINK but 0)
    ///   statistics on|off|reset
    #[command(verbatim_doc_comment)]
    Message {
        /// The device.
        name: String,
        /// A sector inside the segment whose target gets the message (0 for a
        /// one-segment device).
        sector: u64,
        /// The message words.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        message: Vec<String>,
    },
    /// Block until a replicated group is in sync, showing progress.
    ///
    /// In sync: every SLINK in ordered mode with nothing outstanding (with --resync: only
    /// until every resync has ended). Progress is a bar on a terminal, a line per second
    /// otherwise. Exit status 1 on --timeout.
    Wait {
        /// A replicator control device or one of its replicator-dev devices.
        name: String,
        /// Only wait for resynchronisation to end (not for the log backlog to drain).
        #[arg(long)]
        resync: bool,
        /// Give up after this many seconds (exit status 1).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Print the daemon's state, then every change as it happens (like drbdsetup events2).
    ///
    /// One line per event: `<exists|create|change|destroy> <group|slink|device|site>
    /// key:value...`. First the current state as `exists` lines, ending with `exists -`;
    /// then (without --now) every change: devices created and removed, SLINK mode changes
    /// (synchronous, asynchronous, forced_synchronous, dirty), up and down with the
    /// reason, resync start, progress and end, role and generation changes, fencing,
    /// split brain, log full, errors. A reader that falls more than 4096 events behind is
    /// told how many it lost (`change - lost:N`).
    #[command(verbatim_doc_comment)]
    Events {
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Compare a group's devices with an SLINK's copy, region by region, while writes go on.
    ///
    /// Checksums both sides (a remote site computes its own: no data crosses the link),
    /// with progress and ETA; regions written during the verify are checked again, never
    /// reported as false mismatches. Exit status 1 when regions differ, unless --fix,
    /// which marks them dirty so that the SLINK's resync copies them.
    Verify {
        /// The group (its replicator control device).
        group: String,
        /// The SLINK whose copy is compared.
        #[arg(long)]
        slink: u16,
        /// Read at most this many bytes per second on each side.
        #[arg(long, value_name = "BYTES/S")]
        rate: Option<u64>,
        /// Mark the regions that differ dirty: the resync copies them.
        #[arg(long)]
        fix: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, generated from this CLI, to standard output.
    ///
    /// e.g. `dmrep completions bash > /etc/bash_completion.d/dmrep`,
    /// `dmrep completions zsh > "${fpath[1]}/_dmrep"`,
    /// `dmrep completions fish > ~/.config/fish/completions/dmrep.fish`.
    Completions { shell: clap_complete::Shell },
    /// Versions of this CLI, the daemon and the control protocol.
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Inspect a replication log offline (read-only; the daemon need not run).
    #[command(subcommand)]
    Log(LogCommand),
    /// Run the built-in demonstration: files, a daemon, devices, served until Ctrl-C.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Roles(roles::RoleCommand),
    /// Group-consistent snapshots at a site: create, ls, delete.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Print the superblocks and every entry, and where recovery would stop.
    Dump(LogArgs),
    /// Check a log: exit 0 if it is valid with nothing to truncate, 1 otherwise.
    Check(LogArgs),
}

#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// The log's device or file.
    pub path: PathBuf,
    /// Where the log starts on it, in sectors (the table's <start_sector>).
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PkiCommand {
    /// Create the sites' CA in DIR (ca.crt, ca.key). Keep ca.key off the sites: it
    /// issues certificates, no daemon needs it.
    Init {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Issue SITE's certificate (DIR/SITE.crt, DIR/SITE.key) from the CA in DIR. Give
    /// each site ca.crt and its own two files (`dmrep daemon --site-name SITE --tls-dir`).
    Issue {
        dir: PathBuf,
        /// The site name: 1-63 of a-z, 0-9 and -, as `site=` names it in tables.
        site: String,
        #[arg(long)]
        json: bool,
    },
}

fn pki(cmd: PkiCommand) -> anyhow::Result<()> {
    let (paths, json) = match cmd {
        PkiCommand::Init { dir, json } => (dmrep_site::pki::init(&dir)?, json),
        PkiCommand::Issue { dir, site, json } => (dmrep_site::pki::issue(&dir, &site)?, json),
    };
    if json {
        println!("{}", serde_json::json!({"cert": paths.cert, "key": paths.key}));
    } else {
        println!("wrote {} and {} (private key, mode 0600)", paths.cert.display(), paths.key.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon(args) => run_daemon::run(args, cli.control),
        Command::Demo(args) => demo::run(args),
        Command::Pki(cmd) => pki(cmd),
        Command::Log(cmd) => commands::log(cmd),
        Command::Roles(cmd) => roles::run(cmd, cli.control),
        Command::Snapshot(cmd) => snapshot::run(cmd, cli.control),
        Command::Events { now, json } => events::run(cli.control, now, json),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "dmrep",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Verify { group, slink, rate, fix, json } => verify::run(cli.control, &group, slink, rate, fix, json),
        Command::Wait { name, resync, timeout } => commands::wait(cli.control, &name, resync, timeout),
        other => commands::run(other, cli.control),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmrep: {e:#}");
            ExitCode::FAILURE
        }
    }
}
