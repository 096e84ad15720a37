//! Wiring: turn configuration into running parts (model resolution, the engine, worker pool).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::config::{EngineArgs, ModelStoreArgs};
use crate::engine::{Engine, Pipeline, use_threads};
use crate::provision::{self, Fetcher};

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
    if let Some(spec) = provision::find(&args.model) {
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

/// Resolves, loads and optimises the model; sets tract's thread count first.
pub fn load_engine(args: &EngineArgs) -> Result<Engine> {
    use_threads(threads(args));
    let model = resolve_model(args)?;
    let started = std::time::Instant::now();
    let engine = Engine::load(&model.path, model.pipeline, args.precision, args.max_pixels)?;
    tracing::info!(
        model = %model.label,
        pipeline = ?engine.model().pipeline(),
        precision = ?engine.model().precision(),
        threads = threads(args),
        load_ms = started.elapsed().as_millis() as u64,
        "model ready"
    );
    Ok(engine)
}
