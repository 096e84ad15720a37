//! Wiring: turn configuration into running parts (model, engine, database, jobs, HTTP server),
//! spawn the background tasks and stop them in order.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock;
use crate::config::{EngineArgs, ModelStoreArgs, ServeSettings};
use crate::engine::{Engine, OutputFormat, Pipeline, use_threads};
use crate::fetch::{FetchLimits, FetchPolicy, ImageFetcher, local_addresses};
use crate::http;
use crate::jobs::{self, Jobs};
use crate::mqtt;
use crate::provision::{self, Fetcher};
use crate::store::{SCOPES, Store};
use crate::systemd::{self, Notifier};

impl ModelStoreArgs {
    pub fn fetcher(&self) -> Fetcher {
        Fetcher {
            mirror: self.mirror.clone(),
            ..Fetcher::new(&self.models_dir)
        }
    }
}

/// A model file ready to load, and its pipeline when the manifest knows it.
pub struct ResolvedModel {
    pub path: PathBuf,
    pub pipeline: Option<Pipeline>,
    pub label: String,
}

/// `--model NAME|PATH`: a manifest name is installed on first use; anything else must be a file.
pub fn resolve_model(args: &EngineArgs) -> Result<ResolvedModel> {
    // A board configured with a retired name keeps running, on its replacement.
    let name = match provision::replacement(&args.model) {
        Some(new) => {
            tracing::warn!(
                retired = %args.model,
                model = new,
                "model {:?} is retired; running {new:?} instead (set model = {new:?})",
                args.model
            );
            new
        }
        None => args.model.as_str(),
    };
    if let Some(spec) = provision::find(name) {
        let path = args
            .store
            .fetcher()
            .ensure(spec)
            .with_context(|| format!("installing model {}", spec.name))?;
        return Ok(ResolvedModel {
            path,
            pipeline: Some(spec.pipeline),
            label: spec.name.clone(),
        });
    }
    let path = PathBuf::from(&args.model);
    if !path.is_file() {
        let known: Vec<_> = provision::manifest().iter().map(|s| s.name.as_str()).collect();
        bail!(
            "--model {:?} is neither a known model ({}) nor an existing file",
            args.model,
            known.join(", ")
        );
    }
    Ok(ResolvedModel {
        label: path.display().to_string(),
        path,
        pipeline: None,
    })
}

pub fn threads(args: &EngineArgs) -> usize {
    args.threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Resolves, loads and optimises the model; sets tract's thread count first. `reserved` is
/// memory the caller holds outside the engine (the daemon's request bodies), kept out of what
/// images may use.
pub fn load_engine(args: &EngineArgs, reserved: u64) -> Result<Engine> {
    use_threads(threads(args));
    let model = resolve_model(args)?;
    let started = std::time::Instant::now();
    let mut engine = Engine::load(&model.path, model.pipeline, args.precision, args.max_pixels)?;
    tracing::info!(
        model = %model.label,
        pipeline = ?engine.model().pipeline(),
        precision = %engine.model().precision(),
        threads = threads(args),
        load_ms = started.elapsed().as_millis() as u64,
        "model ready"
    );
    bound_memory(&mut engine, args, reserved);
    Ok(engine)
}

/// Memory for the heap, stacks and buffers that are neither the model nor images.
const HEADROOM: u64 = 32 << 20;
/// Images may always use this much, whatever the limit: below it nothing useful fits.
const MIN_IMAGE_MEMORY: u64 = 10_000_000;

/// Gives the images in flight what the memory limit leaves after the loaded model (the
/// resident set now), its working set, `reserved` and some headroom.
fn bound_memory(engine: &mut Engine, args: &EngineArgs, reserved: u64) {
    let held = crate::memory::status_bytes("VmRSS").unwrap_or(0);
    let limit = match args.memory_limit_mb {
        Some(mb) => mb.saturating_mul(1_000_000),
        None => match crate::memory::available(held) {
            Some(bytes) => bytes,
            None => return,
        },
    };
    let needed = held + engine.model().pipeline().working_set() + reserved + HEADROOM;
    let images = limit.saturating_sub(needed);
    let mb = |b: u64| b / 1_000_000;
    if images < MIN_IMAGE_MEMORY {
        tracing::warn!(
            limit_mb = mb(limit),
            model_mb = mb(needed),
            "the memory limit barely holds the model: images get {} MB anyway and the process \
             may run out of memory; give it more or use a smaller model",
            mb(MIN_IMAGE_MEMORY)
        );
    }
    engine.bound_memory(images.max(MIN_IMAGE_MEMORY));
    let (png, webp) = (
        engine.max_pixels(OutputFormat::Png),
        engine.max_pixels(OutputFormat::Webp),
    );
    tracing::info!(
        limit_mb = mb(limit),
        images_mb = mb(engine.image_memory()),
        max_pixels_png = png,
        max_pixels_webp = webp,
        "memory bound"
    );
    if webp < args.max_pixels {
        tracing::warn!(
            "the memory limit caps photos at {png} pixels for PNG output and {webp} for WebP \
             (max_pixels is {}); larger ones get image_too_large: raise memory_limit_mb or free \
             memory to accept them",
            args.max_pixels
        );
    }
}

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "removebgd.db";
/// Result files inside the data directory.
pub const RESULTS_DIR: &str = "results";
/// Images of queued MQTT jobs inside the data directory.
pub const INBOX_DIR: &str = "inbox";
/// How long without a new inference before the daemon unmaps the activation blocks it keeps
/// for reuse (`memory.rs`): long enough to span a kiosk's back-to-back shots.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs the daemon until SIGINT/SIGTERM, then drains within `drain_timeout`.
pub fn serve(settings: ServeSettings) -> Result<()> {
    let systemd = Notifier::from_env().map(Arc::new);
    let status = |s: &str| {
        if let Some(n) = &systemd {
            n.status(s);
        }
    };
    status("opening the database");
    let results_dir = settings.data_dir.join(RESULTS_DIR);
    let inbox_dir = settings.data_dir.join(INBOX_DIR);
    for dir in [&results_dir, &inbox_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let db_path = settings.data_dir.join(DATABASE_FILE);
    let store = Store::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
    bootstrap(&store, &settings)?;
    status(&format!("loading model {}", settings.engine.model));
    // Request bodies are held in memory while they arrive and wait.
    let bodies = (http::MAX_CONCURRENT_UPLOADS * http::PROCESS_BODY_LIMIT
        + http::MAX_CONCURRENT_SMALL_UPLOADS * http::BATCH_BODY_LIMIT) as u64;
    let engine = Arc::new(load_engine(&settings.engine, bodies)?);
    // Between bursts of requests, hand the activation blocks kept for reuse back to the board.
    crate::memory::release_when_idle(IDLE_RELEASE).context("starting the memory release thread")?;

    let mut own = local_addresses();
    if !settings.listen.ip().is_unspecified() {
        own.push(settings.listen.ip());
    }
    let fetcher = ImageFetcher::new(
        FetchPolicy::new(settings.fetch_allow.clone(), settings.fetch_deny.clone(), own),
        FetchLimits::default(),
    )?;
    let store_handle = store.clone();
    let model_label = settings.engine.model.clone();
    let precision = engine.model().precision().name().to_owned();
    let jobs = Jobs::new(
        engine,
        settings.workers,
        store,
        fetcher,
        jobs::Settings {
            results_dir,
            inbox_dir,
            result_ttl: settings.result_ttl,
            results_max_bytes: settings.results_max_bytes,
            results_min_keep: settings.results_min_keep,
            min_free_disk: settings.min_free_disk,
            refine: settings.refine,
        },
    );
    let mqtt_account = match &settings.mqtt {
        Some(m) => Some(
            store_handle
                .account_by_name(&m.account)
                .with_context(|| format!("mqtt_account {:?}", m.account))?
                .id,
        ),
        None => None,
    };
    let rembg = match &settings.rembg {
        Some(r) => Some(http::RembgApi {
            account_id: store_handle
                .account_by_name(&r.account)
                .with_context(|| format!("rembg_account {:?}", r.account))?
                .id,
            require_key: r.require_key,
        }),
        None => None,
    };
    let link = Arc::new(crate::metrics::LinkState::default());
    let connections = within_fd_limit(settings.connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("removebgd-io")
        .build()?;
    runtime.block_on(async move {
        jobs.recover().await?;
        // Cancelled on SIGTERM/SIGINT: no new queued work starts, /readyz says so.
        let draining = CancellationToken::new();
        let queue_runs = TaskTracker::new();
        let queue = tokio::spawn(jobs.clone().run_queue(draining.clone(), queue_runs.clone()));
        let sweeper = tokio::spawn(jobs.clone().sweep_forever(settings.sweep_interval));
        let listener = http::serve::bind(settings.listen).with_context(|| format!("listening on {}", settings.listen))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "listening");
        // Derived from the bound address: with port 0 the kernel chose the port.
        let fallback = fallback_url(bound);
        let state = http::AppState {
            jobs: jobs.clone(),
            in_flight: Arc::new(http::InFlight::default()),
            rate: Arc::new(http::RateLimiter::new(settings.rate_limit, settings.rate_burst)),
            polls: Arc::new(http::PollLimiter::new(settings.batch_poll_interval)),
            uploads: Arc::new(tokio::sync::Semaphore::new(http::MAX_CONCURRENT_UPLOADS)),
            small_uploads: Arc::new(tokio::sync::Semaphore::new(http::MAX_CONCURRENT_SMALL_UPLOADS)),
            public_url: settings.public_url.clone(),
            fallback_url: fallback.clone(),
            model: model_label.clone(),
            precision: precision.clone(),
            requests: Arc::new(http::RequestMetrics::default()),
            mqtt: Arc::clone(&link),
            draining: draining.clone(),
            rembg,
            connections,
            conn_stats: Arc::new(http::serve::ConnMetrics::default()),
            body_deadline: http::BodyDeadline {
                grace: settings.body_timeout,
                min_rate: settings.body_min_rate,
            },
        };

        let stop = CancellationToken::new();
        let mqtt = match (&settings.mqtt, mqtt_account) {
            (Some(m), Some(account_id)) => Some(mqtt::start(
                m,
                mqtt::MqttContext {
                    jobs: jobs.clone(),
                    account_id,
                    base_url: settings.public_url.clone().unwrap_or(fallback),
                    model: model_label.clone(),
                    precision: precision.clone(),
                    link,
                },
                stop.clone(),
            )),
            _ => None,
        };
        // Installed before READY=1: a stop right after start must drain, not kill.
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let watchdog = systemd
            .clone()
            .zip(systemd::watchdog_interval())
            .map(|(notifier, every)| tokio::spawn(watchdog(notifier, jobs.clone(), every)));
        let ready = format!("serving on {bound} with model {model_label} ({precision})");
        if let Some(n) = &systemd {
            n.ready(&ready);
        }
        let signal = {
            let draining = draining.clone();
            async move {
                stop_signal(term).await;
                draining.cancel();
            }
        };
        tokio::spawn(signal);
        // The server keeps accepting while the daemon drains: /readyz answers 503 and new API
        // requests 503 `shutting_down` (see http::error::drain_gate), instead of refused
        // connections. It stops once the work in flight is done.
        let server_stop = CancellationToken::new();
        let in_flight = state.in_flight.clone();
        let conn_stats = state.conn_stats.clone();
        let server = http::serve::serve(listener, http::router(state), connections, conn_stats, server_stop.clone());
        let mut server = tokio::spawn(server);
        tokio::select! {
            biased;
            _ = draining.cancelled() => {}
            ended = &mut server => {
                ended.context("the HTTP server task")?;
                bail!("the HTTP server stopped on its own");
            }
        }
        if let Some(n) = &systemd {
            n.stopping("draining requests and jobs in flight");
        }
        let deadline = tokio::time::Instant::now() + settings.drain_timeout;
        tracing::info!(
            deadline_s = settings.drain_timeout.as_secs(),
            "stop requested; finishing requests and jobs in flight, queued work stays for the next start"
        );
        queue_runs.close();
        let pool_jobs = jobs.clone();
        let drained = tokio::time::timeout_at(deadline, async {
            in_flight.wait_idle().await;
            queue_runs.wait().await;
            // Images whose client went away are still finished, stored and charged.
            pool_jobs.requests_done().await;
        })
        .await
        .is_ok();
        // Idle connections close now; a response still being written is finished first.
        server_stop.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut server).await;
        if !drained {
            tracing::warn!(
                "drain deadline passed with work in flight; it is settled at the next start (batch items run again, single requests are marked interrupted)"
            );
        }
        queue.abort();
        sweeper.abort();
        if let Some(w) = watchdog {
            w.abort();
        }
        stop.cancel();
        if let Some(task) = mqtt {
            // The MQTT node publishes `offline` and disconnects; bounded like everything else.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let _ = tokio::time::timeout(left.max(std::time::Duration::from_secs(2)), task).await;
        }
        tracing::info!("stopped");
        if !drained {
            // Inference threads are still busy with work the deadline cut short; leave without
            // waiting for them (everything they would record is settled at the next start).
            std::process::exit(0);
        }
        Ok(())
    })
}

/// Descriptors kept for everything but client connections: the database, result files, the
/// model, image fetches, MQTT.
const FD_RESERVE: u64 = 256;

/// `max_connections`, lowered (with a warning) to leave [`FD_RESERVE`] descriptors under the
/// process's limit, which is first raised to its hard limit: at the cap new connections get a
/// 503, not an accept error.
fn within_fd_limit(mut limits: http::serve::ConnLimits) -> http::serve::ConnLimits {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return limits;
    }
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    let room = (r.rlim_cur as u64).saturating_sub(FD_RESERVE).max(16) as usize;
    if limits.max_connections > room {
        tracing::warn!(
            max_connections = limits.max_connections,
            fd_limit = r.rlim_cur as u64,
            lowered_to = room,
            "max_connections is above the file descriptor limit less {FD_RESERVE}; lowered"
        );
        limits.max_connections = room;
    }
    limits
}

async fn stop_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Pings systemd's watchdog at half its interval while the database answers writes and the
/// workers make progress; a hung daemon stops pinging and systemd restarts it.
async fn watchdog(notifier: Arc<Notifier>, jobs: jobs::Jobs, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tick.tick().await;
        match jobs.alive().await {
            Ok(()) => notifier.watchdog(),
            Err(why) => tracing::error!(error = %why, "health check failed; withholding the watchdog ping"),
        }
    }
}

/// `result_url` base when neither --public-url nor a Host header says better.
fn fallback_url(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        local_addresses()
            .into_iter()
            .find(|a| a.is_ipv4() && !a.is_loopback())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
    } else {
        listen.ip()
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// First start on an empty database: a default account and one key with every scope, shown once.
fn bootstrap(store: &Store, settings: &ServeSettings) -> Result<()> {
    if !store.accounts()?.is_empty() {
        return Ok(());
    }
    let now = clock::now();
    store.create_account(DEFAULT_ACCOUNT, "Local", DEFAULT_CREDITS, 1, now)?;
    let scopes: Vec<String> = SCOPES.iter().map(|s| s.to_string()).collect();
    let key = store.create_key(DEFAULT_ACCOUNT, &scopes, None, now)?;
    let port = settings.listen.port();
    if crate::telemetry::under_journald() {
        // Under systemd stdout is the journal, which keeps everything: hand the key over in a
        // file only the service user (and root) can read.
        let path = settings.data_dir.join(INITIAL_KEY_FILE);
        write_private(&path, &format!("{}\n", key.key)).with_context(|| format!("writing {}", path.display()))?;
        println!(
            "First start: created account {DEFAULT_ACCOUNT:?} and an API key with every scope; the key is in {} \
             (readable by the service user and root only). Copy it somewhere safe and delete the file.",
            path.display()
        );
        return Ok(());
    }
    // Straight to stdout, never through the log: the key must not end up in log files.
    println!(
        "\nFirst start: created account {DEFAULT_ACCOUNT:?} ({DEFAULT_CREDITS} credits a month) and an API key with \
         every scope.\nIt is shown only this once; `removebgd keys create` makes more.\n\n    {}\n\nTry it:\n    \
         curl -s http://127.0.0.1:{port}/v1/removebg/quota -H \"Authorization: Bearer {}\"\n",
        key.key, key.key
    );
    Ok(())
}

/// Where the first key goes when stdout is the journal.
pub const INITIAL_KEY_FILE: &str = "initial-api-key";

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

const DEFAULT_ACCOUNT: &str = "default";
const DEFAULT_CREDITS: i64 = 10_000;
