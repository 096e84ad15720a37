//! Stored result files and their expiry.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store};

#[derive(Debug, Clone)]
pub struct StoredResult {
    pub file: String,
    pub content_type: String,
    pub bytes: u64,
    pub expires_at: i64,
}

impl Store {
    /// The result named `file`, if it has not expired at `now`.
    pub fn result(&self, file: &str, now: i64) -> Result<Option<StoredResult>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT file, content_type, bytes, expires_at FROM results WHERE file = ?1 AND expires_at > ?2",
                params![file, now],
                |r| {
                    Ok(StoredResult {
                        file: r.get(0)?,
                        content_type: r.get(1)?,
                        bytes: r.get::<_, i64>(2)? as u64,
                        expires_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Files whose results expired at or before `now`.
    pub fn expired_results(&self, now: i64) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT file FROM results WHERE expires_at <= ?1 ORDER BY expires_at")?;
        let rows = stmt.query_map([now], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Forgets a result once its file is gone.
    pub fn delete_result(&self, file: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM results WHERE file = ?1", [file])?;
            Ok(())
        })
    }

    /// Whether a file in the results directory belongs to a known result.
    pub fn result_known(&self, file: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row("SELECT EXISTS(SELECT 1 FROM results WHERE file = ?1)", [file], |r| {
                r.get(0)
            })?)
    }

    /// Results finished at or before `finished_by`, as (file, bytes), in the order they should
    /// make room: soonest to expire first, then oldest.
    pub fn evictable_results(&self, finished_by: i64) -> Result<Vec<(String, u64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT r.file, r.bytes FROM results r JOIN jobs j ON j.id = r.job_id
             WHERE j.finished_at <= ?1 ORDER BY r.expires_at, j.finished_at",
        )?;
        let rows = stmt.query_map([finished_by], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (count, bytes) of stored results.
    pub fn result_totals(&self) -> Result<(i64, i64)> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM results", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?)
    }
}
