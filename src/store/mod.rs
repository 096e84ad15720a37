//! Every piece of durable state in one SQLite file: accounts and their credit ledger, API keys
//! (hashed), jobs and batches, stored results and their expiry. Synchronous by design: async
//! callers run these methods on blocking threads. The daemon and the admin CLI may open the
//! same file at once (WAL, busy timeout, `BEGIN IMMEDIATE` for every write).

mod accounts;
mod jobs;
mod keys;
mod results;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

pub use accounts::{Account, Quota};
pub use jobs::{
    BatchItem, BatchView, ClaimedJob, Enqueued, Finished, JobStatus, NewBatchItem, NewJob, Outcome, QueuedJob,
    Recovery, Reply,
};
pub use keys::{CreatedKey, KeyInfo, KeyRecord, SCOPES};
pub use results::StoredResult;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("not enough credits: {needed} needed, {available} remaining")]
    NoCredits { needed: i64, available: i64 },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Schema versions, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("schema_v1.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
];

/// A handle to the database; clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Keep the -wal and -shm files when the last connection closes. Otherwise the next
        // open recreates them, and on a full data disk that fails: the daemon could not even
        // start to say so (found by tests/faults.rs).
        let mut persist: std::ffi::c_int = 1;
        // SAFETY: a valid open connection, the "main" schema, and an int the call reads.
        unsafe {
            rusqlite::ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
                (&mut persist as *mut std::ffi::c_int).cast(),
            );
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Credits and jobs must survive a power cut, not just a crash; commits are few per second.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn)?;
        Ok(Store {
            path: Arc::from(path),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back on drop).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in a write transaction, committed only if `f` succeeds.
    fn write<T>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Checks that the database answers and accepts writes.
    /// Whether the database file (and its WAL) may still be written, as the kernel decides for
    /// a new open: read-only mounts, the immutable attribute and permissions all count. The open
    /// connection keeps the access it started with, so it cannot tell; opening the file again
    /// is no good either (SQLite reuses its open descriptors, and closing one drops the
    /// process's locks), hence access(2).
    pub fn writable(&self) -> Result<bool> {
        use std::os::unix::ffi::OsStrExt;
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        for path in [self.path.as_os_str(), wal.as_os_str()] {
            let c = std::ffi::CString::new(path.as_bytes()).map_err(|e| StoreError::Invalid(e.to_string()))?;
            // SAFETY: `c` is a valid NUL-terminated path.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::NotFound && path == wal.as_os_str() {
                    continue;
                }
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn ping(&self) -> Result<()> {
        self.write(|tx| {
            tx.execute("UPDATE meta SET value = value WHERE key = 'schema'", [])?;
            Ok(())
        })
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if done > MIGRATIONS.len() {
        return Err(StoreError::Invalid(format!(
            "the database has schema version {done}, newer than this removebgd knows ({}); upgrade removebgd",
            MIGRATIONS.len()
        )));
    }
    if done == MIGRATIONS.len() {
        // Nothing written: opening must work on a full disk too.
        return Ok(());
    }
    for sql in &MIGRATIONS[done..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.commit()?;
    Ok(())
}

/// `bytes` random bytes from the OS as lowercase hex: unguessable ids and key secrets.
pub fn token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    crate::digest::hex(&buf)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::Store;

    /// A store in a fresh temporary directory (kept alive by the returned guard).
    pub fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("removebgd.db")).unwrap();
        (store, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_data_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path).unwrap();
        store.create_account("shop", "Pro", 5, 1, 0).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.accounts().unwrap().len(), 1);
        store.ping().unwrap();
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        Store::open(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer"), "{err}");
    }

    #[test]
    fn tokens_are_hex_and_distinct() {
        let a = token(16);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, token(16));
    }
}
