//! Opening a sled folder, shared by the metadata store and the sled datasource.
//!
//! Invariants:
//! - Nothing here creates a database as a side effect of a check: `files_present` tells
//!   an existing folder from an empty or missing one without opening it.
//! - A folder locked by another handle is retried for `LOCK_WAIT`, then reported as in
//!   use: sled 0.34 releases its lock from background threads a moment after the last
//!   handle drops (sled issue #1289), so a close followed at once by an open can find it
//!   still held, while a folder held by a live handle stays locked.
//! - sled may panic while recovering a damaged log; that becomes an error, not a panic.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long an open waits for sled's folder lock.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Why a sled folder did not open.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Another handle (this process or another) holds the folder.
    InUse,
    /// sled reports corruption, or panicked while recovering its log.
    Damaged(String),
    Other(sled::Error),
}

/// sled writes `conf` and `db` into every folder it opens; without both there is no
/// database to open.
pub(crate) fn files_present(path: &Path) -> bool {
    path.join("conf").is_file() && path.join("db").is_file()
}

/// Opens (or creates) the sled database in `path`, waiting out a lock for `LOCK_WAIT`.
pub(crate) fn open(path: &Path) -> Result<sled::Db, OpenError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match open_once(path) {
            Err(OpenError::InUse) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn open_once(path: &Path) -> Result<sled::Db, OpenError> {
    let config = sled::Config::new().path(path);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(sled::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.to_string().contains("could not acquire lock") =>
        {
            Err(OpenError::InUse)
        }
        Ok(Err(sled::Error::Corruption { .. })) => {
            Err(OpenError::Damaged("sled reports corruption".into()))
        }
        Ok(Err(e)) => Err(OpenError::Other(e)),
        Err(_) => Err(OpenError::Damaged("sled could not recover the log".into())),
    }
}
