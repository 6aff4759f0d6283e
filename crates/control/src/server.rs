//! The control socket: a Unix stream socket, mode 0600, one thread per client.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use dmrep_formats::control::{decode_request, encode, Response, ResponseFrame, MAX_FRAME, PROTOCOL_VERSION};
use tracing::{debug, warn};

use crate::daemon::Daemon;

pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

/// Make the directory holding a socket, private to its owner if we create it.
pub fn prepare_socket_dir(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

/// Remove a socket file left by a dead process; refuse if something still listens.
pub fn clear_stale_socket(path: &Path) -> io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use: another dmrep daemon is running", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

impl ControlServer {
    /// Bind the socket (mode 0600) and serve requests on background threads.
    pub fn start(daemon: Arc<Daemon>, path: &Path) -> io::Result<Self> {
        prepare_socket_dir(path)?;
        clear_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        // The socket file is ours from here: gone again if the start fails.
        let undo = |e: io::Error| {
            let _ = std::fs::remove_file(path);
            e
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(undo)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let spawned = thread::Builder::new().name("control-accept".into()).spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                match conn {
                    Ok(s) => {
                        let d = daemon.clone();
                        let _ = thread::Builder::new().name("control".into()).spawn(move || serve(d, s));
                    }
                    Err(e) => warn!("control accept: {e}"),
                }
            }
        });
        spawned.map_err(undo)?;
        Ok(ControlServer { path: path.to_path_buf(), stop })
    }

    /// Stop accepting and remove the socket file.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path); // wake the accept loop
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(daemon: Arc<Daemon>, stream: UnixStream) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_FRAME as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!("control read: {e}");
                return;
            }
        }
        let too_long = line.len() > MAX_FRAME;
        let response = if too_long {
            Response::Error { message: format!("control frame longer than {MAX_FRAME} bytes") }
        } else {
            match decode_request(line.strip_suffix(b"\n").unwrap_or(&line)) {
                Ok(req) => daemon.handle(req),
                Err(e) => Response::Error { message: e.to_string() },
            }
        };
        if writer.write_all(&encode(&ResponseFrame { version: PROTOCOL_VERSION, response })).is_err() || too_long {
            return;
        }
    }
}

use std::io::Read as _;
