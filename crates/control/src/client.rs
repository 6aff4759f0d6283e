//! The CLI's side of the control socket.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use dmrep_formats::control::{decode_response, encode, FrameError, Request, RequestFrame, Response, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the dmrep daemon at {path}: {source} (is `dmrep daemon` running? set --control or $DMREP_CONTROL)")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the daemon closed the connection without answering")]
    Closed,
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        let s = UnixStream::connect(path)
            .map_err(|e| ClientError::Connect { path: path.display().to_string(), source: e })?;
        Ok(Client { writer: s.try_clone()?, reader: BufReader::new(s) })
    }

    /// Send one request and wait for its answer.
    pub fn call(&mut self, request: Request) -> Result<Response, ClientError> {
        self.writer.write_all(&encode(&RequestFrame { version: PROTOCOL_VERSION, request }))?;
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(decode_response(line.strip_suffix(b"\n").unwrap_or(&line))?)
    }
}
