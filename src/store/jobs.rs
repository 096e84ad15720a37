//! Jobs (one image each) and batches. A job's credit is reserved when the job is recorded and
//! settled in the same transaction that records its outcome, so a credit is never lost or
//! charged twice, whatever happens in between.

use rusqlite::{OptionalExtension, Row, Transaction, params};

use super::accounts::{ledger, reserve};
use super::{Result, Store, StoreError};
use crate::clock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> JobStatus {
        match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            _ => JobStatus::Failed,
        }
    }
}

/// A job about to run now (single request): options as the API spells them.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub account_id: i64,
    pub source: &'static str,
    pub client_ref: Option<String>,
    pub image_url: Option<String>,
    pub output_format: String,
    pub output_size: String,
    pub bg_color: Option<String>,
    /// The full options as JSON, when the three columns above do not say it all.
    pub options: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewBatchItem {
    pub job_id: String,
    pub client_ref: Option<String>,
    /// The image's URL, or
    pub url: Option<String>,
    /// its uploaded bytes, already written under the inbox.
    pub input_file: Option<String>,
}

/// Where the answer to a queued job goes (MQTT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
}

/// A job to queue now and run later (MQTT): recorded, with its credit reserved, before the
/// submitter is acknowledged.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub job: NewJob,
    /// Identifies the submission; a second one with the same key is a duplicate.
    pub dedupe_key: String,
    pub reply: Reply,
    /// The inline image, stored under the data directory's inbox.
    pub input_file: Option<String>,
}

/// A queued job handed to a runner.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: String,
    pub account_id: i64,
    pub batch_id: Option<String>,
    pub source: String,
    pub client_ref: Option<String>,
    pub image_url: Option<String>,
    pub input_file: Option<String>,
    pub output_format: String,
    pub output_size: String,
    pub bg_color: Option<String>,
    pub options: Option<String>,
    pub reply: Reply,
}

/// A successful outcome to record.
#[derive(Debug, Clone)]
pub struct Finished {
    pub width: u32,
    pub height: u32,
    pub file: String,
    pub content_type: String,
    pub bytes: u64,
    pub expires_at: i64,
    /// The subject's box: left, top, width, height.
    pub foreground: Option<[u32; 4]>,
}

#[derive(Debug, Clone)]
pub struct BatchItem {
    pub job_id: String,
    pub client_ref: Option<String>,
    pub status: JobStatus,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub result_file: Option<String>,
    pub expires_at: Option<i64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The subject's box: left, top, width, height.
    pub foreground: Option<[u32; 4]>,
}

#[derive(Debug, Clone)]
pub struct BatchView {
    pub id: String,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub created_at: i64,
    pub items: Vec<BatchItem>,
}

impl BatchView {
    pub fn finished(&self) -> bool {
        self.completed + self.failed == self.total
    }
}

/// The end state of a finished job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed {
        file: String,
        width: u32,
        height: u32,
        expires_at: i64,
    },
    Failed {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    Duplicate { id: String, status: JobStatus },
}

/// What start-up recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Queued jobs (batch items, MQTT submissions) that were running when the process stopped,
    /// queued again.
    pub requeued: usize,
    /// Single requests whose client and input are gone; failed, their credit released.
    pub abandoned: usize,
}

fn insert_job(
    tx: &Transaction,
    j: &NewJob,
    status: JobStatus,
    batch: Option<(&str, usize)>,
    now: i64,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO jobs (id, account_id, batch_id, position, client_ref, source, image_url, output_format,
                           output_size, bg_color, status, reserved, created_at, options)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1, ?12, ?13)",
        params![
            j.id,
            j.account_id,
            batch.map(|b| b.0),
            batch.map(|b| b.1 as i64),
            j.client_ref,
            j.source,
            j.image_url,
            j.output_format,
            j.output_size,
            j.bg_color,
            status.as_str(),
            now,
            j.options
        ],
    )
}

fn parse_box(s: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = s.split(',').map(|n| n.parse().ok()).collect::<Option<_>>()?;
    v.try_into().ok()
}

fn held_credit(tx: &Transaction, job: &str) -> Result<(i64, bool)> {
    tx.query_row(
        "SELECT account_id, reserved FROM jobs WHERE id = ?1 AND status IN ('queued', 'running')",
        [job],
        |r| Ok((r.get(0)?, r.get::<_, i64>(1)? == 1)),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("job {job} is not in progress")))
}

impl Store {
    /// Records a job that starts now and reserves its credit; `NoCredits` records nothing.
    pub fn start_job(&self, job: &NewJob) -> Result<()> {
        let now = clock::now();
        self.write(|tx| {
            reserve(tx, job.account_id, 1, &job.id)?;
            insert_job(tx, job, JobStatus::Running, None, now)?;
            Ok(())
        })
    }

    /// Records a batch and all its items, reserving one credit per item, or nothing at all.
    pub fn create_batch(&self, batch_id: &str, template: &NewJob, items: &[NewBatchItem]) -> Result<i64> {
        let now = clock::now();
        self.write(|tx| {
            reserve(tx, template.account_id, items.len() as i64, batch_id)?;
            tx.execute(
                "INSERT INTO batches (id, account_id, total, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![batch_id, template.account_id, items.len() as i64, now],
            )?;
            for (pos, item) in items.iter().enumerate() {
                let job = NewJob {
                    id: item.job_id.clone(),
                    client_ref: item.client_ref.clone(),
                    image_url: item.url.clone(),
                    ..template.clone()
                };
                insert_job(tx, &job, JobStatus::Queued, Some((batch_id, pos)), now)?;
                if let Some(file) = &item.input_file {
                    tx.execute(
                        "UPDATE jobs SET input_file = ?2 WHERE id = ?1",
                        params![item.job_id, file],
                    )?;
                }
            }
            Ok(now)
        })
    }

    /// Marks the oldest queued job running and returns it. Oldest by insertion (rowid), not by
    /// `created_at`: batches submitted within the same second run in the order they came, and a
    /// board whose clock steps back (no RTC until NTP) does not reorder its queue.
    pub fn claim_next(&self) -> Result<Option<ClaimedJob>> {
        self.write(|tx| {
            let job = tx
                .query_row(
                    "SELECT id, account_id, batch_id, source, client_ref, image_url, input_file, output_format,
                            output_size, bg_color, reply_topic, correlation, options FROM jobs
                     WHERE status = 'queued' ORDER BY rowid LIMIT 1",
                    [],
                    |r| {
                        Ok(ClaimedJob {
                            id: r.get(0)?,
                            account_id: r.get(1)?,
                            batch_id: r.get(2)?,
                            source: r.get(3)?,
                            client_ref: r.get(4)?,
                            image_url: r.get(5)?,
                            input_file: r.get(6)?,
                            output_format: r.get(7)?,
                            output_size: r.get(8)?,
                            bg_color: r.get(9)?,
                            options: r.get(12)?,
                            reply: Reply {
                                topic: r.get(10)?,
                                correlation: r.get(11)?,
                            },
                        })
                    },
                )
                .optional()?;
            if let Some(j) = &job {
                tx.execute("UPDATE jobs SET status = 'running' WHERE id = ?1", [&j.id])?;
            }
            Ok(job)
        })
    }

    /// Queues a job with its credit reserved. A submission seen before (same dedupe key) is not
    /// queued again: the existing job's id and status come back instead.
    pub fn enqueue_job(&self, q: &QueuedJob) -> Result<Enqueued> {
        let now = clock::now();
        self.write(|tx| {
            let seen = tx
                .query_row(
                    "SELECT id, status FROM jobs WHERE dedupe_key = ?1",
                    [&q.dedupe_key],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?;
            if let Some((id, status)) = seen {
                return Ok(Enqueued::Duplicate {
                    id,
                    status: JobStatus::parse(&status),
                });
            }
            reserve(tx, q.job.account_id, 1, &q.job.id)?;
            insert_job(tx, &q.job, JobStatus::Queued, None, now)?;
            tx.execute(
                "UPDATE jobs SET dedupe_key = ?2, reply_topic = ?3, correlation = ?4, input_file = ?5 WHERE id = ?1",
                params![q.job.id, q.dedupe_key, q.reply.topic, q.reply.correlation, q.input_file],
            )?;
            Ok(Enqueued::Queued)
        })
    }

    /// Records success: the job is completed, its credit charged, its result registered.
    pub fn complete_job(&self, job: &str, done: &Finished) -> Result<()> {
        let now = clock::now();
        self.write(|tx| {
            let (account, reserved) = held_credit(tx, job)?;
            ledger(tx, account, "charge", 1, if reserved { -1 } else { 0 }, Some(job), None)?;
            tx.execute(
                "UPDATE jobs SET status = 'completed', reserved = 0, width = ?2, height = ?3, result_file = ?4,
                                 expires_at = ?5, finished_at = ?6, foreground = ?7 WHERE id = ?1",
                params![
                    job,
                    done.width,
                    done.height,
                    done.file,
                    done.expires_at,
                    now,
                    done.foreground.map(|[l, t, w, h]| format!("{l},{t},{w},{h}"))
                ],
            )?;
            tx.execute(
                "INSERT INTO results (file, job_id, content_type, bytes, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![done.file, job, done.content_type, done.bytes as i64, done.expires_at],
            )?;
            finish_batch_if_done(tx, job, now)
        })
    }

    /// Records failure: the job is failed and its reserved credit released.
    pub fn fail_job(&self, job: &str, code: &str, message: &str) -> Result<()> {
        let now = clock::now();
        self.write(|tx| {
            let (account, reserved) = held_credit(tx, job)?;
            if reserved {
                ledger(tx, account, "release", 0, -1, Some(job), Some(code))?;
            }
            tx.execute(
                "UPDATE jobs SET status = 'failed', reserved = 0, error_code = ?2, error_message = ?3, finished_at = ?4
                 WHERE id = ?1",
                params![job, code, message, now],
            )?;
            finish_batch_if_done(tx, job, now)
        })
    }

    /// At start-up, before any work: running queued jobs go back to the queue; HTTP requests
    /// that were in flight cannot be answered any more, so they fail and release their credit.
    pub fn recover(&self) -> Result<Recovery> {
        let abandoned: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare(
                "SELECT id FROM jobs WHERE batch_id IS NULL AND source = 'http' AND status IN ('queued', 'running')",
            )?;
            stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
        };
        for id in &abandoned {
            self.fail_job(id, "interrupted", "removebgd stopped while processing this image")?;
        }
        let requeued = self.write(|tx| {
            Ok(tx.execute(
                "UPDATE jobs SET status = 'queued' WHERE (batch_id IS NOT NULL OR source != 'http') AND status = 'running'",
                [],
            )?)
        })?;
        Ok(Recovery {
            requeued,
            abandoned: abandoned.len(),
        })
    }

    /// The batch if it belongs to `account`.
    pub fn batch(&self, account: i64, batch_id: &str) -> Result<Option<BatchView>> {
        let conn = self.conn();
        let Some((total, created_at)) = conn
            .query_row(
                "SELECT total, created_at FROM batches WHERE id = ?1 AND account_id = ?2",
                params![batch_id, account],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()?
        else {
            return Ok(None);
        };
        let mut stmt = conn.prepare(
            "SELECT id, client_ref, status, width, height, result_file, expires_at, error_code, error_message,
                    foreground
             FROM jobs WHERE batch_id = ?1 ORDER BY position",
        )?;
        let items: Vec<BatchItem> = stmt
            .query_map([batch_id], |r: &Row| {
                Ok(BatchItem {
                    job_id: r.get(0)?,
                    client_ref: r.get(1)?,
                    status: JobStatus::parse(&r.get::<_, String>(2)?),
                    width: r.get(3)?,
                    height: r.get(4)?,
                    result_file: r.get(5)?,
                    expires_at: r.get(6)?,
                    error_code: r.get(7)?,
                    error_message: r.get(8)?,
                    foreground: r.get::<_, Option<String>>(9)?.as_deref().and_then(parse_box),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let count = |s| items.iter().filter(|i| i.status == s).count() as i64;
        Ok(Some(BatchView {
            id: batch_id.to_owned(),
            total,
            completed: count(JobStatus::Completed),
            failed: count(JobStatus::Failed),
            created_at,
            items,
        }))
    }

    /// How a finished job ended; `None` while it is queued or running (or unknown).
    pub fn job_outcome(&self, id: &str) -> Result<Option<Outcome>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT status, result_file, width, height, expires_at, error_code, error_message FROM jobs
                 WHERE id = ?1 AND status IN ('completed', 'failed')",
                [id],
                |r| {
                    Ok(if r.get::<_, String>(0)? == "completed" {
                        Outcome::Completed {
                            file: r.get(1)?,
                            width: r.get(2)?,
                            height: r.get(3)?,
                            expires_at: r.get(4)?,
                        }
                    } else {
                        Outcome::Failed {
                            code: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                            message: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                        }
                    })
                },
            )
            .optional()?)
    }

    /// Whether an inbox file still belongs to a job waiting to run.
    pub fn input_pending(&self, file: &str) -> Result<bool> {
        Ok(self.conn().query_row(
            "SELECT EXISTS(SELECT 1 FROM jobs WHERE input_file = ?1 AND status IN ('queued', 'running'))",
            [file],
            |r| r.get(0),
        )?)
    }

    /// (total, completed, failed) of a batch.
    pub fn batch_counts(&self, batch_id: &str) -> Result<(i64, i64, i64)> {
        Ok(self.conn().query_row(
            "SELECT (SELECT total FROM batches WHERE id = ?1),
                    (SELECT COUNT(*) FROM jobs WHERE batch_id = ?1 AND status = 'completed'),
                    (SELECT COUNT(*) FROM jobs WHERE batch_id = ?1 AND status = 'failed')",
            [batch_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?)
    }

    /// Jobs queued for a runner.
    pub fn queued_jobs(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM jobs WHERE status = 'queued'", [], |r| r.get(0))?)
    }
}

fn finish_batch_if_done(tx: &Transaction, job: &str, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE batches SET finished_at = ?2
         WHERE id = (SELECT batch_id FROM jobs WHERE id = ?1) AND finished_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM jobs WHERE batch_id = batches.id AND status IN ('queued', 'running'))",
        params![job, now],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::store;

    fn job(id: &str, account: i64) -> NewJob {
        NewJob {
            id: id.into(),
            account_id: account,
            source: "http",
            client_ref: None,
            image_url: None,
            output_format: "png".into(),
            output_size: "full".into(),
            bg_color: None,
            options: None,
        }
    }

    fn finished(file: &str) -> Finished {
        Finished {
            width: 4,
            height: 3,
            file: file.into(),
            content_type: "image/png".into(),
            bytes: 10,
            expires_at: clock::now() + 60,
            foreground: Some([1, 0, 2, 3]),
        }
    }

    #[test]
    fn a_job_is_charged_once_and_a_failure_costs_nothing() {
        let (s, _d) = store();
        let a = s.create_account("k", "Pro", 2, 1, clock::now()).unwrap();
        s.start_job(&job("j1", a.id)).unwrap();
        s.start_job(&job("j2", a.id)).unwrap();
        assert!(matches!(
            s.start_job(&job("j3", a.id)),
            Err(StoreError::NoCredits { .. })
        ));
        s.complete_job("j1", &finished("j1.png")).unwrap();
        s.fail_job("j2", "corrupt_image", "bad").unwrap();
        assert!(s.complete_job("j1", &finished("again.png")).is_err(), "settled twice");
        assert!(s.fail_job("j2", "x", "y").is_err());
        let q = s.quota(a.id).unwrap();
        assert_eq!((q.credits_used, q.credits_remaining), (1, 1));
        assert_eq!(s.ledger_sums(a.id).unwrap(), (1, 0));
        let jobs: i64 = s
            .conn()
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(jobs, 2, "the refused job left no row");
    }

    #[test]
    fn queued_jobs_run_in_the_order_they_were_submitted() {
        let (s, _d) = store();
        let a = s.create_account("k", "Pro", 10, 1, clock::now()).unwrap();
        let items = |tag: &str| -> Vec<NewBatchItem> {
            (0..2)
                .map(|i| NewBatchItem {
                    job_id: format!("{tag}{i}"),
                    client_ref: None,
                    url: Some(format!("http://cam/{tag}{i}.jpg")),
                    input_file: None,
                })
                .collect()
        };
        // Submitted first with an id that sorts last; the second batch's clock reads earlier.
        s.create_batch("batch_zz", &job("", a.id), &items("z")).unwrap();
        s.create_batch("batch_aa", &job("", a.id), &items("a")).unwrap();
        s.conn()
            .execute("UPDATE jobs SET created_at = created_at - 60 WHERE batch_id = 'batch_aa'", [])
            .unwrap();
        let order: Vec<String> = std::iter::from_fn(|| s.claim_next().unwrap().map(|j| j.id)).collect();
        assert_eq!(order, ["z0", "z1", "a0", "a1"]);
    }

    #[test]
    fn a_batch_reserves_everything_or_nothing_and_settles_per_item() {
        let (s, _d) = store();
        let a = s.create_account("k", "Pro", 3, 1, clock::now()).unwrap();
        let items = |n: usize| -> Vec<NewBatchItem> {
            (0..n)
                .map(|i| NewBatchItem {
                    job_id: format!("b{n}-{i}"),
                    client_ref: Some(format!("ref{i}")),
                    // The middle item was uploaded (its bytes in the inbox).
                    url: (i != 1).then(|| format!("http://cam/{i}.jpg")),
                    input_file: (i == 1).then(|| format!("b{n}-{i}.img")),
                })
                .collect()
        };
        assert!(matches!(
            s.create_batch("big", &job("", a.id), &items(4)),
            Err(StoreError::NoCredits {
                needed: 4,
                available: 3
            })
        ));
        assert!(s.batch(a.id, "big").unwrap().is_none());
        s.create_batch("b", &job("", a.id), &items(3)).unwrap();
        let first = s.claim_next().unwrap().unwrap();
        assert_eq!(first.id, "b3-0");
        s.complete_job(&first.id, &finished("f0.png")).unwrap();
        assert_eq!(first.image_url.as_deref(), Some("http://cam/0.jpg"));
        assert_eq!(first.input_file, None);
        let second = s.claim_next().unwrap().unwrap();
        assert_eq!((second.image_url.as_deref(), second.input_file.as_deref()), (None, Some("b3-1.img")));
        assert!(s.input_pending("b3-1.img").unwrap(), "the upload is kept while its item waits");
        s.fail_job(&second.id, "fetch_failed", "nope").unwrap();
        assert!(!s.input_pending("b3-1.img").unwrap());
        let third = s.claim_next().unwrap().unwrap();
        assert!(s.claim_next().unwrap().is_none());
        // The process dies here; recovery queues the running item again.
        assert_eq!(
            s.recover().unwrap(),
            Recovery {
                requeued: 1,
                abandoned: 0
            }
        );
        assert_eq!(s.claim_next().unwrap().unwrap().id, third.id);
        s.complete_job(&third.id, &finished("f2.png")).unwrap();
        let v = s.batch(a.id, "b").unwrap().unwrap();
        assert_eq!((v.total, v.completed, v.failed), (3, 2, 1));
        assert!(v.finished());
        let refs: Vec<_> = v.items.iter().map(|i| i.client_ref.clone().unwrap()).collect();
        assert_eq!(refs, ["ref0", "ref1", "ref2"]);
        assert!(
            s.batch(a.id + 1, "b").unwrap().is_none(),
            "another account's batch is invisible"
        );
        assert_eq!(s.ledger_sums(a.id).unwrap(), (2, 0));
    }

    #[test]
    fn queued_jobs_are_deduplicated_and_survive_a_restart() {
        let (s, _d) = store();
        let a = s.create_account("k", "Pro", 1, 1, clock::now()).unwrap();
        let q = QueuedJob {
            job: NewJob {
                source: "mqtt",
                client_ref: Some("rig-7".into()),
                ..job("m1", a.id)
            },
            dedupe_key: "ref:rig-7".into(),
            reply: Reply {
                topic: Some("rig/answers".into()),
                correlation: Some(vec![1, 2, 3]),
            },
            input_file: Some("m1.img".into()),
        };
        assert_eq!(s.enqueue_job(&q).unwrap(), Enqueued::Queued);
        let again = QueuedJob {
            job: job("m2", a.id),
            ..q.clone()
        };
        assert_eq!(
            s.enqueue_job(&again).unwrap(),
            Enqueued::Duplicate {
                id: "m1".into(),
                status: JobStatus::Queued
            }
        );
        let other = QueuedJob {
            job: job("m3", a.id),
            dedupe_key: "ref:rig-8".into(),
            ..q.clone()
        };
        assert!(matches!(s.enqueue_job(&other), Err(StoreError::NoCredits { .. })));
        let claimed = s.claim_next().unwrap().unwrap();
        assert_eq!((claimed.id.as_str(), claimed.source.as_str()), ("m1", "mqtt"));
        assert_eq!(claimed.reply, q.reply);
        assert_eq!(claimed.input_file.as_deref(), Some("m1.img"));
        assert_eq!(
            s.recover().unwrap(),
            Recovery {
                requeued: 1,
                abandoned: 0
            }
        );
        assert_eq!(s.claim_next().unwrap().unwrap().id, "m1");
    }

    #[test]
    fn recovery_fails_interrupted_single_requests_and_releases_their_credit() {
        let (s, _d) = store();
        let a = s.create_account("k", "Pro", 1, 1, clock::now()).unwrap();
        s.start_job(&job("j1", a.id)).unwrap();
        assert_eq!(
            s.recover().unwrap(),
            Recovery {
                requeued: 0,
                abandoned: 1
            }
        );
        assert_eq!(s.quota(a.id).unwrap().credits_remaining, 1);
        assert_eq!(s.ledger_sums(a.id).unwrap(), (0, 0));
    }
}
