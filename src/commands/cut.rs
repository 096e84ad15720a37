//! `removebgd cut INPUT... -o OUT`: files or folders in, cutouts out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::CutArgs;
use crate::engine::{Background, Channels, CutOptions, Engine, Layout, OutputFormat, Pool};

const INPUT_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// One image to process and where its result goes.
#[derive(Debug, PartialEq)]
struct Job {
    input: PathBuf,
    output: PathBuf,
}

/// What the run did; the process exits non-zero when `failed` is not empty.
pub struct Summary {
    pub written: usize,
    pub failed: Vec<(PathBuf, String)>,
}

pub fn run(args: CutArgs) -> Result<Summary> {
    let inputs = collect_inputs(&args.inputs)?;
    let (jobs, format) = plan(&inputs, &args.output, args.format)?;
    let engine = Arc::new(crate::app::load_engine(&args.engine, 0)?);
    let background = match (args.bg_color, &args.bg_gradient, &args.bg_image) {
        (Some(c), _, _) => Some(Background::Color(c)),
        (_, Some(g), _) => Some(Background::Gradient(g.clone())),
        (_, _, Some(path)) => Some(Background::Image(Arc::new(
            std::fs::read(path).with_context(|| format!("reading the background {}", path.display()))?,
        ))),
        _ => None,
    };
    let opts = Arc::new(CutOptions {
        format,
        size: args.size,
        background,
        channels: if args.mask_only { Channels::Alpha } else { Channels::Rgba },
        roi: args.roi,
        layout: Layout {
            crop: args.crop,
            scale: args.scale,
            position: args.position,
        },
        refine: args.refine,
    });
    let pool = Pool::new(args.jobs);
    let started = Instant::now();

    let bar = if jobs.len() > 1 {
        let bar = ProgressBar::new(jobs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images, {elapsed} elapsed, ~{eta} left {msg}")
                .expect("valid progress template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let pending: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let (engine, opts) = (Arc::clone(&engine), Arc::clone(&opts));
            let input = job.input.clone();
            let done = pool.submit(move || process(&engine, &opts, &job));
            (input, done)
        })
        .collect();
    let mut summary = Summary {
        written: 0,
        failed: Vec::new(),
    };
    for (input, done) in pending {
        let result = done.wait().map_err(anyhow::Error::from).and_then(|r| r);
        match result {
            Ok(()) => summary.written += 1,
            Err(e) => {
                bar.suspend(|| eprintln!("{}: {e:#}", input.display()));
                summary.failed.push((input, format!("{e:#}")));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!(
        "{} written, {} failed in {:.1} s",
        summary.written,
        summary.failed.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

fn process(engine: &Engine, opts: &CutOptions, job: &Job) -> Result<()> {
    let bytes = std::fs::read(&job.input).context("reading")?;
    let cutout = engine.cut(&bytes, opts)?;
    // `auto` picks the format per image; the name follows it.
    let output = match opts.format {
        OutputFormat::Auto => job.output.with_extension(cutout.format.extension()),
        _ => job.output.clone(),
    };
    write_atomically(&output, &cutout.bytes)
}

/// Writes through a temporary file beside `path`, so a failure never leaves a partial output.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".removebgd-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes).context("writing")?;
    // Temporary files are private (0600); a cutout is an ordinary file.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .context("setting permissions")?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Expands folders (one level, image extensions only, sorted) and keeps files as given.
fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("reading folder {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && has_extension(p, &INPUT_EXTENSIONS))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{} holds no .jpg, .jpeg, .png or .webp files", input.display());
            }
            out.extend(found);
        } else if input.is_file() {
            out.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    Ok(out)
}

fn has_extension(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn format_of(p: &Path) -> Option<OutputFormat> {
    match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "png" => Some(OutputFormat::Png),
        "webp" => Some(OutputFormat::Webp),
        "jpg" | "jpeg" => Some(OutputFormat::Jpg),
        "zip" => Some(OutputFormat::Zip),
        _ => None,
    }
}

/// Decides each output path and the format. `-o` is a file when there is exactly one input and
/// it ends in .png, .webp, .jpg, .jpeg or .zip; otherwise it is a folder, created if missing.
fn plan(inputs: &[PathBuf], output: &Path, format: Option<OutputFormat>) -> Result<(Vec<Job>, OutputFormat)> {
    if let (true, Some(ext_format)) = (inputs.len() == 1 && !output.is_dir(), format_of(output)) {
        if let Some(f) = format.filter(|&f| f != ext_format) {
            bail!(
                "--format {} contradicts the output file name {}",
                f.extension(),
                output.display()
            );
        }
        return Ok((
            vec![Job {
                input: inputs[0].clone(),
                output: output.to_path_buf(),
            }],
            ext_format,
        ));
    }
    if output.is_file() {
        bail!(
            "{} is a file; with several inputs -o must be a folder",
            output.display()
        );
    }
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let format = format.unwrap_or_default();
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    let mut jobs = Vec::with_capacity(inputs.len());
    for input in inputs {
        let stem = input.file_stem().context("input without a file name")?;
        let out = output.join(stem).with_extension(format.extension());
        if let Some(first) = seen.insert(out.clone(), input) {
            bail!(
                "{} and {} would both be written to {}",
                first.display(),
                input.display(),
                out.display()
            );
        }
        jobs.push(Job {
            input: input.clone(),
            output: out,
        });
    }
    Ok((jobs, format))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_input_and_an_image_name_means_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.webp");
        let (jobs, f) = plan(&[PathBuf::from("a/b.jpg")], &out, None).unwrap();
        assert_eq!(f, OutputFormat::Webp);
        assert_eq!(
            jobs,
            vec![Job {
                input: "a/b.jpg".into(),
                output: out.clone()
            }]
        );
        assert!(plan(&[PathBuf::from("a/b.jpg")], &out, Some(OutputFormat::Png)).is_err());
        assert!(!out.exists(), "planning writes nothing");
    }

    #[test]
    fn several_inputs_go_into_a_created_folder() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/folder");
        let inputs = [PathBuf::from("p/a.jpg"), PathBuf::from("q/b.png")];
        let (jobs, f) = plan(&inputs, &out, Some(OutputFormat::Webp)).unwrap();
        assert_eq!(f, OutputFormat::Webp);
        assert!(out.is_dir());
        assert_eq!(jobs[1].output, out.join("b.webp"));
    }

    #[test]
    fn colliding_stems_are_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = [PathBuf::from("p/a.jpg"), PathBuf::from("q/a.png")];
        let err = plan(&inputs, dir.path(), None).unwrap_err().to_string();
        assert!(err.contains("would both be written"), "{err}");
    }

    #[test]
    fn folders_expand_to_their_images_only() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b.JPG", "a.png", "notes.txt", "c.webp"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let got = collect_inputs(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<_> = got.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, vec!["a.png", "b.JPG", "c.webp"]);
        assert!(collect_inputs(&[dir.path().join("missing.jpg")]).is_err());
    }
}
