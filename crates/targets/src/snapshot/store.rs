//! The exception store of one snapshot on its COW device: which origin chunks it holds
//! and where, allocation of new exceptions, and their commit.
//!
//! - **Persistent** (`P`): the layout of [`dmrep_formats::cow`]. Opening reads the
//!   header (formatting a device without one), scans the metadata blocks, and writes the
//!   header with the next generation before anything else is written. A commit makes
//!   the data chunks durable (sync), then writes the metadata blocks naming them, then
//!   syncs again; only then does the caller write the origin or acknowledge a snapshot
//!   write. Concurrent commits are grouped: one leader writes every entry that is ready
//!   (two syncs for the lot) while the others wait for it.
//! - **Transient** (`N`): the map is kept in memory only, the whole device holds data
//!   chunks (no header, no metadata). Nothing survives a restart: the snapshot then
//!   starts again equal to the origin as it is at load time.
//!
//! Entries are committed in allocation order: a writer whose exception was allocated
//! after another one's waits for that one's data before its own entry is written, so
//! that a metadata block never names a chunk whose data is not durable.
//!
//! A store that fills up or whose device fails becomes invalid: the state is written to
//! the header (persistent), and every later use fails with an error that names the COW
//! device and says why.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;

use dmrep_core::BlockBackend;
use dmrep_formats::cow::{self, BlockId, Exception, Header, Layout, ScanEnd, State, ENTRIES_PER_BLOCK, SECTOR};
use parking_lot::{Condvar, Mutex};

/// Why a store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("COW device {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("COW device {path}: damaged header: {source}")]
    Header {
        path: String,
        #[source]
        source: cow::DecodeError,
    },
    #[error(
        "COW device {path} holds a snapshot of chunk size {found} sectors, the table asks for {want} \
         (zero its first sector to start a new snapshot on it)"
    )]
    ChunkSize { path: String, found: u64, want: u64 },
    #[error("COW device {path} is too small: {bytes} bytes hold no exception of {chunk} bytes (header and metadata need chunks too)")]
    TooSmall { path: String, bytes: u64, chunk: u64 },
}

/// Why a store is invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// No room for another exception.
    Full,
    /// An I/O error on the COW device (or the origin, during a copy-out).
    Failed(String),
    /// Found invalid on open (it filled up or failed before).
    Loaded,
}

/// The mutable part of a store, under one lock.
struct Inner {
    /// Origin chunk -> COW chunk, for every exception allocated (committed or not).
    map: HashMap<u64, u64>,
    /// Every exception in allocation order: exception `n` is `list[n]`.
    list: Vec<Exception>,
    /// Exceptions allocated whose data is not written yet.
    not_ready: BTreeSet<u64>,
    /// Exceptions `0..committed` are durable in the metadata.
    committed: u64,
    /// A leader is writing metadata now.
    committing: bool,
    invalid: Option<Invalid>,
    /// The invalid state is in the header, durable (or there is no header: transient).
    invalid_durable: bool,
}

/// The exception store of one snapshot.
pub struct Store {
    cow: Arc<dyn BlockBackend>,
    path: String,
    layout: Layout,
    persistent: bool,
    /// Exceptions the device has room for.
    capacity: u64,
    /// The header as last written (persistent); its state is rewritten on invalidation.
    header: Mutex<Option<Header>>,
    inner: Mutex<Inner>,
    /// Signalled when a commit ends or the store becomes invalid.
    changed: Condvar,
}

impl Store {
    /// Opens the store of chunk size `chunk_bytes` on `cow` (named `path` in messages):
    /// a persistent one is recovered (or formatted, on a device without a header); a
    /// transient one starts empty. `origin_bytes` goes into a new header.
    pub fn open(
        cow: Arc<dyn BlockBackend>,
        path: &str,
        chunk_bytes: u64,
        persistent: bool,
        origin_bytes: u64,
    ) -> Result<Store, StoreError> {
        let io_err = |source| StoreError::Io { path: path.to_string(), source };
        let layout = Layout::new(chunk_bytes).map_err(|e| StoreError::Header { path: path.to_string(), source: e })?;
        let capacity = if persistent { layout.capacity(cow.size()) } else { cow.size() / chunk_bytes };
        if capacity == 0 {
            return Err(StoreError::TooSmall { path: path.to_string(), bytes: cow.size(), chunk: chunk_bytes });
        }
        let mut inner = Inner {
            map: HashMap::new(),
            list: Vec::new(),
            not_ready: BTreeSet::new(),
            committed: 0,
            committing: false,
            invalid: None,
            invalid_durable: false,
        };
        let mut header = None;
        if persistent {
            let mut b = [0u8; SECTOR];
            cow.read_at(&mut b, 0).map_err(io_err)?;
            let found = Header::decode(&b).map_err(|e| StoreError::Header { path: path.to_string(), source: e })?;
            let mut h = match found {
                Some(h) if h.chunk_bytes != chunk_bytes => {
                    return Err(StoreError::ChunkSize {
                        path: path.to_string(),
                        found: h.chunk_bytes / 512,
                        want: chunk_bytes / 512,
                    })
                }
                Some(h) => h,
                None => Header {
                    state: State::Valid,
                    chunk_bytes,
                    epoch: uuid::Uuid::new_v4().as_u64_pair().0,
                    generation: 0,
                    origin_bytes,
                },
            };
            if h.state == State::Invalid {
                inner.invalid = Some(Invalid::Loaded);
                inner.invalid_durable = true;
            } else if h.generation > 0 {
                let scanned = cow::scan(&h, capacity, |off| {
                    let mut b = [0u8; SECTOR];
                    cow.read_at(&mut b, off).map(|()| b)
                })
                .map_err(io_err)?;
                if !matches!(scanned.end, ScanEnd::Partial { .. } | ScanEnd::DeviceEnd) {
                    tracing::info!(cow = path, end = ?scanned.end, "COW store: the metadata ends at an incomplete commit");
                }
                for e in &scanned.exceptions {
                    inner.map.insert(e.old_chunk, e.new_chunk);
                }
                inner.committed = scanned.exceptions.len() as u64;
                inner.list = scanned.exceptions;
            }
            // A new generation, durable before any metadata block of it is written.
            h.generation += 1;
            cow.write_at(&h.encode(), 0).map_err(io_err)?;
            cow.sync().map_err(io_err)?;
            header = Some(h);
        }
        Ok(Store {
            cow,
            path: path.to_string(),
            layout,
            persistent,
            capacity,
            header: Mutex::new(header),
            inner: Mutex::new(inner),
            changed: Condvar::new(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn cow(&self) -> &Arc<dyn BlockBackend> {
        &self.cow
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.layout.chunk_bytes
    }

    pub fn persistent(&self) -> bool {
        self.persistent
    }

    /// The error every use of an invalid store gets: names the device and the cause.
    pub fn invalid_error(&self, why: &Invalid) -> io::Error {
        let cause = match why {
            Invalid::Full => "filled up".to_string(),
            Invalid::Loaded => "filled up or failed before (its header says invalid)".to_string(),
            Invalid::Failed(e) => format!("failed: {e}"),
        };
        io::Error::other(format!("snapshot invalid: its COW device {} {cause}", self.path))
    }

    /// Why the store is invalid, if it is.
    pub fn invalid(&self) -> Option<Invalid> {
        self.inner.lock().invalid.clone()
    }

    /// `Ok` while the store is valid, else the error for users.
    pub fn check_valid(&self) -> io::Result<()> {
        match self.invalid() {
            None => Ok(()),
            Some(why) => Err(self.invalid_error(&why)),
        }
    }

    /// The COW chunk holding origin chunk `old`, if it has an exception.
    pub fn lookup(&self, old: u64) -> Option<u64> {
        self.inner.lock().map.get(&old).copied()
    }

    /// Allocates an exception for origin chunk `old` (which has none): returns its
    /// number and its COW chunk. The caller writes the chunk's data, then calls
    /// [`commit`](Self::commit) (or [`fail`](Self::fail) if the data write failed). A
    /// full store becomes invalid (see [`invalidate`](Self::invalidate)) and says so.
    pub fn allocate(&self, old: u64) -> io::Result<(u64, u64)> {
        let mut inner = self.inner.lock();
        if let Some(why) = &inner.invalid {
            return Err(self.invalid_error(why));
        }
        debug_assert!(!inner.map.contains_key(&old), "chunk {old} allocated twice");
        let n = inner.list.len() as u64;
        if n >= self.capacity {
            drop(inner);
            tracing::warn!(cow = %self.path, "snapshot COW device filled up: the snapshot is invalid");
            self.invalidate(Invalid::Full);
            return Err(self.invalid_error(&Invalid::Full));
        }
        let new = if self.persistent { self.layout.data_chunk(n) } else { n };
        inner.list.push(Exception { old_chunk: old, new_chunk: new });
        inner.map.insert(old, new);
        inner.not_ready.insert(n);
        Ok((n, new))
    }

    /// The data of exceptions `ns` is written: make them durable (with every exception
    /// allocated before them) and return when they are. Fails if the store is or
    /// becomes invalid. Transient stores return at once.
    pub fn commit(&self, ns: &[u64]) -> io::Result<()> {
        let Some(&last) = ns.iter().max() else { return self.check_valid() };
        let mut inner = self.inner.lock();
        for n in ns {
            inner.not_ready.remove(n);
        }
        if !self.persistent {
            inner.committed = inner.committed.max(last + 1);
            return match &inner.invalid {
                Some(why) => Err(self.invalid_error(why)),
                None => Ok(()),
            };
        }
        loop {
            if let Some(why) = &inner.invalid {
                return Err(self.invalid_error(why));
            }
            if inner.committed > last {
                return Ok(());
            }
            let upto = inner.not_ready.first().copied().unwrap_or(inner.list.len() as u64);
            if !inner.committing && upto > inner.committed {
                // Lead a commit of every ready entry.
                inner.committing = true;
                let from = inner.committed;
                let first_block = Layout::block_of(from);
                let start = (first_block * ENTRIES_PER_BLOCK as u64) as usize;
                let entries: Vec<Exception> = inner.list[start..upto as usize].to_vec();
                drop(inner);
                let res = self.write_metadata(first_block, &entries);
                inner = self.inner.lock();
                inner.committing = false;
                match res {
                    Ok(()) => inner.committed = upto,
                    Err(e) => {
                        drop(inner);
                        self.fail(&e);
                        inner = self.inner.lock();
                    }
                }
                self.changed.notify_all();
                continue;
            }
            self.changed.wait(&mut inner);
        }
    }

    /// Data sync, then the metadata blocks from `first_block` holding `entries` (the
    /// entries of those blocks, in order), then sync.
    fn write_metadata(&self, first_block: u64, entries: &[Exception]) -> io::Result<()> {
        let h = self.header.lock().expect("persistent store has a header");
        self.cow.sync()?;
        for (i, part) in entries.chunks(ENTRIES_PER_BLOCK).enumerate() {
            let index = first_block + i as u64;
            let id = BlockId { index, epoch: h.epoch, generation: h.generation };
            self.cow.write_at(&cow::encode_block(id, part), self.layout.block_offset(index))?;
        }
        self.cow.sync()
    }

    /// An I/O error during a copy-out or a commit: the store becomes invalid.
    pub fn fail(&self, e: &io::Error) {
        tracing::error!(cow = %self.path, "snapshot COW store failed: {e}; the snapshot is invalid");
        self.invalidate(Invalid::Failed(dmrep_core::errors::io_error_text(e)));
    }

    /// Makes the store invalid (the first cause is kept) and tries to write that to the
    /// header; [`invalid_durable`](Self::invalid_durable) says whether it is there.
    pub fn invalidate(&self, why: Invalid) {
        {
            let mut inner = self.inner.lock();
            if inner.invalid.is_none() {
                inner.invalid = Some(why);
            }
            if !self.persistent {
                inner.invalid_durable = true;
            }
        }
        self.changed.notify_all();
        let _ = self.persist_invalid();
    }

    /// Whether the store is invalid and, if persistent, its header says so durably:
    /// only then may the origin be written without a copy-out for it. Tries again to
    /// write the header if it is not yet durable.
    pub fn invalid_durable(&self) -> io::Result<bool> {
        {
            let inner = self.inner.lock();
            if inner.invalid.is_none() {
                return Ok(false);
            }
            if inner.invalid_durable {
                return Ok(true);
            }
        }
        self.persist_invalid().map(|()| true)
    }

    fn persist_invalid(&self) -> io::Result<()> {
        let mut header = self.header.lock();
        let Some(h) = header.as_mut() else { return Ok(()) };
        if self.inner.lock().invalid_durable {
            return Ok(());
        }
        let new = Header { state: State::Invalid, ..*h };
        self.cow.write_at(&new.encode(), 0)?;
        self.cow.sync()?;
        *h = new;
        self.inner.lock().invalid_durable = true;
        Ok(())
    }

    /// Exceptions allocated.
    pub fn exceptions(&self) -> u64 {
        self.inner.lock().list.len() as u64
    }

    /// Chunks of the COW device in use: header, metadata and data chunks (persistent),
    /// data chunks (transient).
    pub fn used_chunks(&self) -> u64 {
        let n = self.exceptions();
        if self.persistent {
            self.layout.chunks_used(n)
        } else {
            n
        }
    }

    /// Chunks of the COW device in use for the header and metadata.
    pub fn metadata_chunks(&self) -> u64 {
        if self.persistent {
            self.layout.metadata_chunks(self.exceptions())
        } else {
            0
        }
    }

    /// Whole chunks of the COW device.
    pub fn total_chunks(&self) -> u64 {
        self.cow.size() / self.layout.chunk_bytes
    }
}
