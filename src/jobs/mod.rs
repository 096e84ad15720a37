//! The use cases: process one image, run batch items, sweep expired results. Knows nothing of
//! HTTP or MQTT. Every job is recorded (and its credit reserved) before work starts and
//! settled in one transaction after, so credits are never lost or charged twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::clock;
use serde::{Deserialize, Serialize};

use crate::engine::{
    Background, BgColor, BoxPx, Channels, CutOptions, Engine, EngineError, Gradient, Layout, Refine, OutputFormat, OutputSize,
    Pool, Roi,
};
use crate::fetch::{FetchError, ImageFetcher};
use crate::store::{self, ClaimedJob, Enqueued, Finished, NewBatchItem, NewJob, QueuedJob, Reply, Store, StoreError};

mod events;
pub mod rembg;
pub mod removebg;
pub mod request;

pub use events::{JobEvent, JobMeta, Stats};

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request itself is wrong (bad option, missing or doubled image, bad base64 ...).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The image is over the size limit.
    #[error("{0}")]
    TooLarge(String),
    #[error("not enough credits: {needed} needed, {available} remaining")]
    NoCredits { needed: i64, available: i64 },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    NotFound(String),
    /// No room for the result: the results cap or the disk's reserve would be crossed.
    #[error("{0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoCredits { needed, available } => JobError::NoCredits { needed, available },
            StoreError::NotFound(m) => JobError::NotFound(m),
            StoreError::Sqlite(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) => {
                JobError::Storage("the data disk is full (database); try again later".into())
            }
            other => JobError::Internal(other.to_string()),
        }
    }
}

impl JobError {
    /// Stable machine-readable code, shared by every front end.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Invalid { code, .. } => code,
            JobError::TooLarge(_) => "payload_too_large",
            JobError::NoCredits { .. } => "insufficient_credits",
            JobError::Fetch(FetchError::TooLarge { .. }) => "payload_too_large",
            JobError::Fetch(e) => e.code(),
            JobError::Engine(EngineError::Image(e)) => e.code(),
            JobError::Engine(EngineError::Invalid { code, .. }) => code,
            JobError::Engine(_) | JobError::Internal(_) => "internal_error",
            JobError::NotFound(_) => "not_found",
            JobError::Storage(_) => "insufficient_storage",
        }
    }
}

/// Where the image comes from.
pub enum Source {
    Bytes(Vec<u8>),
    Url(String),
}

impl std::fmt::Debug for Source {
    // Never the image bytes: they would flood any log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Source::Url(u) => f.debug_tuple("Url").field(u).finish(),
        }
    }
}

/// What the cutout is laid over, as the front end gave it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bg {
    Color(BgColor),
    Gradient(Gradient),
    /// A photo fetched (under the fetch policy) when the job runs.
    ImageUrl(String),
    /// An uploaded photo (remove.bg's `bg_image_file`): only for a request answered at once,
    /// never queued.
    #[serde(skip)]
    ImageBytes(Arc<Vec<u8>>),
}

/// Output options, as validated by the front end. Queued jobs keep them as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Options {
    pub format: OutputFormat,
    pub size: OutputSize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<Bg>,
    #[serde(default)]
    pub channels: Channels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roi: Option<Roi>,
    #[serde(default)]
    pub layout: Layout,
    /// None: the node's default (`refine` in its settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refine: Option<Refine>,
}

impl Options {
    /// The engine's options, with a background photo already in hand.
    fn cut(&self, bg_image: Option<Arc<Vec<u8>>>, default_refine: Refine) -> CutOptions {
        CutOptions {
            format: self.format,
            size: self.size,
            background: match (&self.background, bg_image) {
                (Some(Bg::Color(c)), _) => Some(Background::Color(*c)),
                (Some(Bg::Gradient(g)), _) => Some(Background::Gradient(g.clone())),
                (Some(Bg::ImageBytes(b)), _) => Some(Background::Image(Arc::clone(b))),
                (Some(Bg::ImageUrl(_)), Some(b)) => Some(Background::Image(b)),
                (Some(Bg::ImageUrl(_)), None) | (None, _) => None,
            },
            channels: self.channels,
            roi: self.roi,
            layout: self.layout,
            refine: self.refine.unwrap_or(default_refine),
        }
    }

    /// The `bg_color` column: the background colour, when it is one.
    pub fn bg_text(&self) -> Option<String> {
        match &self.background {
            Some(Bg::Color(c)) => Some(c.to_string()),
            _ => None,
        }
    }

    /// The options column: only when the classic columns (format, size, colour) do not say it all.
    pub fn stored(&self) -> Option<String> {
        let classic = matches!(self.background, None | Some(Bg::Color(_)))
            && self.channels == Channels::Rgba
            && self.refine.is_none()
            && self.roi.is_none()
            && self.layout.is_identity()
            && matches!(self.format, OutputFormat::Png | OutputFormat::Webp);
        if classic {
            return None;
        }
        // An uploaded background belongs to a request answered at once, which is never run
        // again from its record: the record keeps the other options, not the bytes.
        let mut record = self.clone();
        if matches!(record.background, Some(Bg::ImageBytes(_))) {
            record.background = None;
        }
        serde_json::to_string(&record).ok()
    }

    /// A queued job's options from its columns (the inverse of `bg_text` and [`Options::stored`]).
    pub fn from_stored(format: &str, size: &str, bg: Option<&str>, options: Option<&str>) -> Options {
        if let Some(opts) = options.and_then(|o| serde_json::from_str(o).ok()) {
            return opts;
        }
        Options {
            format: if format == "webp" {
                OutputFormat::Webp
            } else {
                OutputFormat::Png
            },
            size: if size == "preview" {
                OutputSize::Preview
            } else {
                OutputSize::Full
            },
            background: bg.and_then(|b| b.parse().ok()).map(Bg::Color),
            ..Options::default()
        }
    }
}

/// A finished cutout.
#[derive(Debug, Clone)]
pub struct Done {
    pub id: String,
    pub file: String,
    pub width: u32,
    pub height: u32,
    pub expires_at: i64,
    pub content_type: &'static str,
    /// The format written (`auto` resolved).
    pub format: OutputFormat,
    /// The subject's box in the result.
    pub foreground: Option<BoxPx>,
    /// The encoded image (for `return_base64`).
    pub bytes: Arc<Vec<u8>>,
}

pub struct Settings {
    pub results_dir: PathBuf,
    /// Inline images of queued jobs wait here until they have run.
    pub inbox_dir: PathBuf,
    pub result_ttl: Duration,
    /// Most bytes the result files may take together; the soonest-expiring give way first.
    pub results_max_bytes: u64,
    /// Results younger than this are never evicted to make room (their clients may not have
    /// fetched them yet).
    pub results_min_keep: Duration,
    /// Free space the data disk keeps; below it new work is refused and /readyz fails.
    pub min_free_disk: u64,
    /// The edge refinement of requests that do not choose one.
    pub refine: Refine,
}

struct Inner {
    engine: Arc<Engine>,
    pool: Pool,
    store: Store,
    fetcher: ImageFetcher,
    settings: Settings,
    queue_wakeup: Notify,
    events: broadcast::Sender<JobEvent>,
    stats: Stats,
    /// Bytes of result files written but not yet recorded in the database; held while room is
    /// made, so concurrent jobs cannot together overshoot the cap.
    space: std::sync::Mutex<u64>,
    /// Single requests' job tasks, so a drain can wait for those whose client went away.
    requests: tokio_util::task::TaskTracker,
}

/// No task started or finished for this long while one is running: the engine is stuck. Far
/// longer than any inference (isnet on 50 MP on a slow board takes well under a minute).
const STALL_LIMIT: Duration = Duration::from_secs(300);
const STALLED: &str = "the inference workers have made no progress for minutes";

/// Events a slow listener may fall behind by before it misses some (it is told how many).
const EVENT_BUFFER: usize = 1024;

/// Cheap handle to the job machinery.
#[derive(Clone)]
pub struct Jobs(Arc<Inner>);

pub fn new_id(kind: &str) -> String {
    format!("{kind}_{}", store::token(16))
}

impl Jobs {
    pub fn new(engine: Arc<Engine>, workers: usize, store: Store, fetcher: ImageFetcher, settings: Settings) -> Jobs {
        Jobs(Arc::new(Inner {
            engine,
            pool: Pool::new(workers),
            store,
            fetcher,
            settings,
            queue_wakeup: Notify::new(),
            requests: tokio_util::task::TaskTracker::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            stats: Stats::default(),
            space: std::sync::Mutex::new(0),
        }))
    }

    /// Every job's progress from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.0.events.subscribe()
    }

    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }

    fn emit(&self, event: JobEvent) {
        // No listener is fine: MQTT is optional.
        let _ = self.0.events.send(event);
    }

    pub fn engine(&self) -> &Engine {
        &self.0.engine
    }

    pub fn pool(&self) -> &Pool {
        &self.0.pool
    }

    pub fn results_dir(&self) -> &Path {
        &self.0.settings.results_dir
    }

    /// Runs a store call on a blocking thread.
    pub async fn db<T, F>(&self, f: F) -> Result<T, JobError>
    where
        F: FnOnce(&Store) -> store::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.0.store.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&store)))
            .await
            .map_err(|e| JobError::Internal(format!("database task: {e}")))?
            .map_err(JobError::from)
    }

    /// Processes one image for `account`, charging one credit on success and nothing otherwise.
    /// The work runs in its own task: a caller that goes away does not abandon a reserved credit.
    pub async fn process(
        &self,
        account: i64,
        source: Source,
        opts: Options,
        base_url: Option<String>,
    ) -> Result<Done, JobError> {
        self.check_disk().await?;
        let id = new_id("rbg");
        let job = NewJob {
            id: id.clone(),
            account_id: account,
            source: "http",
            client_ref: None,
            image_url: match &source {
                Source::Url(u) => Some(u.clone()),
                Source::Bytes(_) => None,
            },
            output_format: opts.format.extension().into(),
            output_size: opts.size.name().into(),
            bg_color: opts.bg_text(),
            options: opts.stored(),
        };
        self.db(move |s| s.start_job(&job)).await?;
        let meta = Arc::new(JobMeta {
            id: id.clone(),
            source: "http",
            base_url,
            ..JobMeta::default()
        });
        let this = self.clone();
        let span = tracing::info_span!("job", job_id = %id);
        self.0
            .requests
            .spawn(async move { this.run(meta, source, opts).await }.instrument(span))
            .await
            .map_err(|e| JobError::Internal(format!("job task: {e}")))?
    }

    /// Returns once no single request's job is running (including those whose client left).
    pub async fn requests_done(&self) {
        // Closing only lets `wait` return once the tracker is empty; a request that still
        // spawns its job afterwards (the drain gate refuses new ones) is waited for too.
        self.0.requests.close();
        self.0.requests.wait().await;
    }

    /// Records a job to run from the queue (MQTT), its credit reserved, its inline image saved
    /// and synced first: once this returns the job survives a crash. A submission already seen
    /// (same `dedupe_key`) is not queued twice.
    #[allow(clippy::too_many_arguments)]
    pub async fn enqueue(
        &self,
        account: i64,
        source: Source,
        opts: Options,
        client_ref: Option<String>,
        dedupe_key: String,
        reply: Reply,
    ) -> Result<(String, Enqueued), JobError> {
        let id = new_id("rbg");
        let (image_url, input_file) = match source {
            Source::Url(u) => (Some(u), None),
            Source::Bytes(bytes) => (None, Some(self.save_input(&id, bytes).await?)),
        };
        let q = QueuedJob {
            job: NewJob {
                id: id.clone(),
                account_id: account,
                source: "mqtt",
                client_ref,
                image_url,
                output_format: opts.format.extension().into(),
                output_size: opts.size.name().into(),
                bg_color: opts.bg_text(),
                options: opts.stored(),
            },
            dedupe_key,
            reply,
            input_file: input_file.clone(),
        };
        let outcome = self.db(move |s| s.enqueue_job(&q)).await;
        if !matches!(outcome, Ok(Enqueued::Queued))
            && let Some(name) = input_file
        {
            self.remove_inputs(&[name]);
        }
        let outcome = outcome?;
        self.0.queue_wakeup.notify_one();
        Ok((id, outcome))
    }

    /// Writes a queued job's uploaded image under the inbox and syncs it; returns its name.
    async fn save_input(&self, job_id: &str, bytes: Vec<u8>) -> Result<String, JobError> {
        let name = format!("{job_id}.img");
        let path = self.0.settings.inbox_dir.join(&name);
        let at = path.clone();
        tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
            .map_err(|e| write_error(&at, e))?;
        Ok(name)
    }

    /// Records a batch (reserving a credit per item) and wakes the runners. Each item is a URL or
    /// uploaded bytes with the caller's reference; uploads are written and synced first, and
    /// deleted again when the batch is refused.
    pub async fn submit_batch(
        &self,
        account: i64,
        items: Vec<(Source, Option<String>)>,
        opts: Options,
    ) -> Result<(String, i64), JobError> {
        let batch_id = new_id("batch");
        let template = NewJob {
            id: String::new(),
            account_id: account,
            source: "batch",
            client_ref: None,
            image_url: None,
            output_format: opts.format.extension().into(),
            output_size: opts.size.name().into(),
            bg_color: opts.bg_text(),
            options: opts.stored(),
        };
        let mut rows = Vec::with_capacity(items.len());
        let mut saved = Vec::new();
        for (source, client_ref) in items {
            let job_id = new_id("rbg");
            let (url, input_file) = match source {
                Source::Url(u) => (Some(u), None),
                Source::Bytes(bytes) => match self.save_input(&job_id, bytes).await {
                    Ok(name) => {
                        saved.push(name.clone());
                        (None, Some(name))
                    }
                    Err(e) => {
                        self.remove_inputs(&saved);
                        return Err(e);
                    }
                },
            };
            rows.push(NewBatchItem {
                job_id,
                client_ref,
                url,
                input_file,
            });
        }
        let id = batch_id.clone();
        let created = match self.db(move |s| s.create_batch(&id, &template, &rows)).await {
            Ok(created) => created,
            Err(e) => {
                self.remove_inputs(&saved);
                return Err(e);
            }
        };
        self.0.queue_wakeup.notify_one();
        Ok((batch_id, created))
    }

    fn remove_inputs(&self, names: &[String]) {
        for name in names {
            let _ = std::fs::remove_file(self.0.settings.inbox_dir.join(name));
        }
    }

    async fn run(&self, meta: Arc<JobMeta>, source: Source, opts: Options) -> Result<Done, JobError> {
        let started = std::time::Instant::now();
        self.emit(JobEvent::Processing(Arc::clone(&meta)));
        let outcome = match self.produce(&meta.id, source, opts).await {
            Ok((done, _claim)) => {
                let finished = Finished {
                    width: done.width,
                    height: done.height,
                    file: done.file.clone(),
                    content_type: done.content_type.into(),
                    bytes: done.bytes.len() as u64,
                    expires_at: done.expires_at,
                    foreground: done.foreground.map(|b| [b.left, b.top, b.width, b.height]),
                };
                let job = meta.id.clone();
                match self.db(move |s| s.complete_job(&job, &finished)).await {
                    Ok(()) => Ok(done),
                    Err(e) => {
                        tracing::error!(error = %e, "could not record a finished job");
                        let _ = std::fs::remove_file(self.results_dir().join(&done.file));
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        self.0.stats.record(outcome.is_ok(), started.elapsed());
        match &outcome {
            Ok(done) => {
                tracing::info!(width = done.width, height = done.height, "job completed");
                self.emit(JobEvent::Completed {
                    job: Arc::clone(&meta),
                    file: done.file.clone(),
                    width: done.width,
                    height: done.height,
                    expires_at: done.expires_at,
                    foreground: done.foreground.map(|b| [b.left, b.top, b.width, b.height]),
                });
            }
            Err(e) => {
                self.settle_failure(&meta.id, e).await;
                self.emit(JobEvent::Failed {
                    job: Arc::clone(&meta),
                    code: e.code(),
                    message: e.to_string(),
                });
            }
        }
        if let Some(batch) = &meta.batch_id {
            let id = batch.clone();
            match self.db(move |s| s.batch_counts(&id)).await {
                Ok((total, completed, failed)) => self.emit(JobEvent::Batch {
                    batch_id: batch.clone(),
                    total,
                    completed,
                    failed,
                }),
                Err(e) => tracing::warn!(error = %e, "could not count batch progress"),
            }
        }
        outcome
    }

    async fn settle_failure(&self, id: &str, e: &JobError) {
        let (job, code, message) = (id.to_owned(), e.code(), e.to_string());
        match &e {
            JobError::Internal(_) | JobError::Engine(EngineError::Model(_) | EngineError::Inference(_)) => {
                tracing::error!(error = %e, "job failed")
            }
            _ => tracing::info!(code, error = %e, "job failed"),
        }
        if let Err(db) = self.db(move |s| s.fail_job(&job, code, &message)).await {
            tracing::error!(error = %db, "could not record a failed job");
        }
    }

    /// Fetches if needed, cuts on the worker pool and writes the result file. The claim on
    /// disk space must be held until the result is recorded.
    async fn produce(&self, id: &str, source: Source, opts: Options) -> Result<(Done, SpaceClaim), JobError> {
        let input = match source {
            Source::Bytes(b) => b,
            Source::Url(url) => self.0.fetcher.get(&url).await?,
        };
        let bg_image = match &opts.background {
            Some(Bg::ImageUrl(url)) => Some(Arc::new(self.0.fetcher.get(url).await.map_err(|e| {
                JobError::Invalid {
                    code: "failed_bg_download",
                    message: format!("the background image could not be fetched: {e}"),
                }
            })?)),
            _ => None,
        };
        let this = self.clone();
        let id = id.to_owned();
        let ttl = self.0.settings.result_ttl;
        self.0
            .pool
            .submit(move || -> Result<(Done, SpaceClaim), JobError> {
                let cut = this.0.engine.cut(&input, &opts.cut(bg_image, this.0.settings.refine))?;
                drop(input);
                let file = format!("{id}.{}", cut.format.extension());
                let path = this.results_dir().join(&file);
                this.0.stats.inference.observe(cut.timings.inference);
                let claim = this.claim_space(cut.bytes.len() as u64)?;
                write_durably(&path, &cut.bytes).map_err(|e| write_error(&path, e))?;
                tracing::debug!(total_ms = cut.timings.total().as_millis() as u64, "cutout written");
                let done = Done {
                    id,
                    file,
                    width: cut.width,
                    height: cut.height,
                    expires_at: clock::now() + ttl.as_secs() as i64,
                    content_type: cut.format.content_type(),
                    format: cut.format,
                    foreground: cut.foreground,
                    bytes: Arc::new(cut.bytes),
                };
                Ok((done, claim))
            })
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
    }

    /// Keeps up to `workers + 1` queued items in flight (one extra so a download overlaps
    /// inference) until `stop`; the items it started run on in `running`.
    pub async fn run_queue(self, stop: CancellationToken, running: TaskTracker) {
        let slots = Arc::new(Semaphore::new(self.0.pool.workers() + 1));
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.cancelled() => return,
            };
            if stop.is_cancelled() {
                return;
            }
            let claimed = match self.db(|s| s.claim_next()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "could not read the job queue");
                    None
                }
            };
            match claimed {
                Some(job) => {
                    let this = self.clone();
                    let span = tracing::info_span!("job", job_id = %job.id, batch_id = job.batch_id.as_deref());
                    running.spawn(
                        async move {
                            this.run_claimed(job).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
                None => {
                    drop(permit);
                    // New batches notify; the timeout covers work queued by another process.
                    tokio::select! {
                        _ = tokio::time::timeout(Duration::from_secs(5), self.0.queue_wakeup.notified()) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn run_claimed(&self, job: ClaimedJob) {
        let opts = Options::from_stored(
            &job.output_format,
            &job.output_size,
            job.bg_color.as_deref(),
            job.options.as_deref(),
        );
        let inbox = job.input_file.as_ref().map(|f| self.0.settings.inbox_dir.join(f));
        let source = match (&inbox, job.image_url) {
            (Some(path), _) => match tokio::fs::read(path).await {
                Ok(bytes) => Source::Bytes(bytes),
                Err(e) => {
                    tracing::error!(error = %e, "a queued image is missing");
                    Source::Bytes(Vec::new())
                }
            },
            (None, url) => Source::Url(url.unwrap_or_default()),
        };
        let meta = Arc::new(JobMeta {
            id: job.id,
            source: match job.source.as_str() {
                "mqtt" => "mqtt",
                "batch" => "batch",
                _ => "http",
            },
            batch_id: job.batch_id,
            client_ref: job.client_ref,
            reply: job.reply,
            base_url: None,
        });
        let _ = self.run(meta, source, opts).await;
        if let Some(path) = inbox {
            let _ = tokio::fs::remove_file(path).await;
        }
    }

    /// Start-up housekeeping before serving: settle jobs the last process left, delete result
    /// files no row knows (written just before a crash).
    pub async fn recover(&self) -> Result<(), JobError> {
        let r = self.db(|s| s.recover()).await?;
        if r.requeued + r.abandoned > 0 {
            tracing::warn!(
                requeued = r.requeued,
                abandoned = r.abandoned,
                "recovered jobs from the last run"
            );
        }
        let results = self.results_dir().to_owned();
        let inbox = self.0.settings.inbox_dir.clone();
        let store = self.0.store.clone();
        let removed = tokio::task::spawn_blocking(move || -> Result<usize, JobError> {
            let results = remove_unknown(&results, |f| store.result_known(f))?;
            Ok(results + remove_unknown(&inbox, |f| store.input_pending(f))?)
        })
        .await
        .map_err(|e| JobError::Internal(e.to_string()))??;
        if removed > 0 {
            tracing::info!(removed, "deleted result and inbox files without a record");
        }
        Ok(())
    }

    /// Deletes expired results (file first, then row) and applies due monthly resets.
    pub async fn sweep(&self) -> Result<usize, JobError> {
        let now = clock::now();
        let resets = self.db(move |s| s.roll_periods(now)).await?;
        if resets > 0 {
            tracing::info!(accounts = resets, "credit period reset");
        }
        let expired = self.db(move |s| s.expired_results(now)).await?;
        let dir = self.results_dir().to_owned();
        let n = expired.len();
        for file in expired {
            match tokio::fs::remove_file(dir.join(&file)).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file, error = %e, "could not delete an expired result");
                    continue;
                }
            }
            self.db(move |s| s.delete_result(&file)).await?;
        }
        Ok(n)
    }

    /// Refuses new work while the data disk is below its free-space reserve.
    async fn check_disk(&self) -> Result<(), JobError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.disk_reserve_kept(0))
            .await
            .map_err(|e| JobError::Internal(e.to_string()))?
    }

    fn disk_reserve_kept(&self, extra: u64) -> Result<(), JobError> {
        let d =
            disk_space(self.results_dir()).map_err(|e| JobError::Internal(format!("checking free disk space: {e}")))?;
        self.reserve_kept(&d, extra)
    }

    /// Whether `extra` more bytes leave the disk's free-space reserve intact.
    fn reserve_kept(&self, d: &DiskSpace, extra: u64) -> Result<(), JobError> {
        let reserve = self.0.settings.min_free_disk;
        if d.free < reserve.saturating_add(extra) {
            return Err(JobError::Storage(format!(
                "the data disk is nearly full ({} free, {} kept in reserve); try again later",
                megabytes(d.free),
                megabytes(reserve)
            )));
        }
        Ok(())
    }

    /// Makes room for a result of `bytes` under the results cap, evicting the soonest-expiring
    /// results old enough to give way; refuses when that cannot make enough room. Runs on a
    /// blocking thread.
    fn claim_space(&self, bytes: u64) -> Result<SpaceClaim, JobError> {
        let s = &self.0.settings;
        let mut pending = self.0.space.lock().unwrap_or_else(|e| e.into_inner());
        self.disk_reserve_kept(bytes)?;
        let cap = s.results_max_bytes;
        if bytes > cap {
            return Err(JobError::Storage(format!(
                "the result ({}) is larger than the results cap ({})",
                megabytes(bytes),
                megabytes(cap)
            )));
        }
        let (_, used) = self.0.store.result_totals()?;
        let over = (used as u64 + *pending + bytes).saturating_sub(cap);
        if over > 0 {
            let keep_since = clock::now() - s.results_min_keep.as_secs() as i64;
            let mut freed = 0;
            let victims: Vec<String> = self
                .0
                .store
                .evictable_results(keep_since)?
                .into_iter()
                .take_while(|(_, b)| {
                    let take = freed < over;
                    freed += if take { *b } else { 0 };
                    take
                })
                .map(|(f, _)| f)
                .collect();
            if freed < over {
                return Err(JobError::Storage(format!(
                    "the results storage is full ({} cap) with results younger than {}s; try again later",
                    megabytes(cap),
                    s.results_min_keep.as_secs()
                )));
            }
            for file in &victims {
                match std::fs::remove_file(self.results_dir().join(file)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(JobError::Internal(format!("evicting {file}: {e}"))),
                }
                self.0.store.delete_result(file)?;
            }
            tracing::info!(
                evicted = victims.len(),
                freed_bytes = freed,
                "evicted results to stay under the cap"
            );
        }
        *pending += bytes;
        Ok(SpaceClaim {
            jobs: self.clone(),
            bytes,
        })
    }

    /// Why this node should not get traffic now (empty when ready).
    pub async fn unready_reasons(&self) -> Vec<String> {
        let this = self.clone();
        let checks = tokio::task::spawn_blocking(move || {
            let mut reasons = Vec::new();
            match this.0.store.writable() {
                Ok(true) => {}
                Ok(false) => reasons.push("the database is read-only".to_owned()),
                Err(e) => reasons.push(format!("the database cannot be opened: {e}")),
            }
            match disk_space(this.results_dir()) {
                Ok(d) if d.read_only => reasons.push("the data directory's filesystem is read-only".to_owned()),
                Ok(d) => reasons.extend(this.reserve_kept(&d, 0).err().map(|e| e.to_string())),
                Err(e) => reasons.push(format!("cannot check free disk space: {e}")),
            }
            if this.0.pool.stalled(STALL_LIMIT) {
                reasons.push(STALLED.to_owned());
            }
            reasons
        });
        match tokio::time::timeout(Duration::from_secs(5), checks).await {
            Ok(Ok(reasons)) => reasons,
            Ok(Err(e)) => vec![format!("readiness check failed: {e}")],
            Err(_) => vec!["the database or disk did not answer within 5 s".to_owned()],
        }
    }

    /// Proves the database answers writes and the workers make progress (the systemd watchdog).
    pub async fn alive(&self) -> Result<(), String> {
        if self.0.pool.stalled(STALL_LIMIT) {
            return Err(STALLED.into());
        }
        match tokio::time::timeout(Duration::from_secs(10), self.db(|s| s.ping())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("database: {e}")),
            Err(_) => Err("the database did not answer within 10 s".into()),
        }
    }

    pub async fn sweep_forever(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.sweep().await {
                tracing::error!(error = %e, "sweep failed");
            }
        }
    }
}

/// Bytes of result files written but not yet recorded; released when dropped.
struct SpaceClaim {
    jobs: Jobs,
    bytes: u64,
}

impl Drop for SpaceClaim {
    fn drop(&mut self) {
        let mut pending = self.jobs.0.space.lock().unwrap_or_else(|e| e.into_inner());
        *pending = pending.saturating_sub(self.bytes);
    }
}

/// Free space on a filesystem, and whether it is mounted read-only.
pub struct DiskSpace {
    pub free: u64,
    pub read_only: bool,
}

pub fn disk_space(path: &Path) -> std::io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(DiskSpace {
        free: st.f_bavail as u64 * st.f_frsize as u64,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Deletes the files in `dir` that `known` does not claim; returns how many.
fn remove_unknown(dir: &Path, known: impl Fn(&str) -> store::Result<bool>) -> Result<usize, JobError> {
    let io = |e: std::io::Error| JobError::Internal(format!("{}: {e}", dir.display()));
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !known(&name)? {
            std::fs::remove_file(entry.path()).map_err(io)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes, syncs and renames into place, then syncs the directory: the file survives a power cut.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        // A full disk must not keep the part that fitted.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// A file the daemon could not write: out of space is the documented 507, anything else ours.
fn write_error(path: &Path, e: std::io::Error) -> JobError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.kind() == std::io::ErrorKind::QuotaExceeded {
        return JobError::Storage(format!("the data disk is full ({e}); try again later"));
    }
    JobError::Internal(format!("writing {}: {e}", path.display()))
}
