//! `removebgd models list|fetch|calibrate`.

use anyhow::Result;

use crate::config::ModelsCommand;
use crate::provision::{self, DEFAULT_MODEL};

pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List(store) => {
            let fetcher = store.fetcher();
            println!("{:<11} {:<9} {:>7}  {:<7} DESCRIPTION", "NAME", "STATE", "MB", "INPUT");
            for spec in provision::manifest() {
                let state = if fetcher.installed(spec).is_some() {
                    "installed"
                } else {
                    "-"
                };
                let default = if spec.name == DEFAULT_MODEL { " [default]" } else { "" };
                println!(
                    "{:<11} {:<9} {:>7.1}  {:<7} {}{default}\n{:<31} source: {}; licence: {}",
                    spec.name,
                    state,
                    spec.size as f64 / 1e6,
                    format!("{0}x{0}", spec.input_size),
                    spec.description,
                    "",
                    spec.source,
                    spec.licence
                );
            }
            println!("models directory: {}", store.models_dir.display());
            Ok(())
        }
        ModelsCommand::Fetch { names, all, store } => {
            let specs = if all {
                provision::manifest().iter().collect()
            } else if names.is_empty() {
                vec![provision::lookup(DEFAULT_MODEL)?]
            } else {
                names
                    .iter()
                    .map(|n| provision::lookup(n))
                    .collect::<Result<Vec<_>, _>>()?
            };
            let fetcher = store.fetcher();
            for spec in specs {
                let path = fetcher.fetch(spec)?;
                println!("{} -> {} (sha256 verified)", spec.name, path.display());
            }
            Ok(())
        }
        ModelsCommand::Calibrate(args) => super::calibrate::run(args),
    }
}
