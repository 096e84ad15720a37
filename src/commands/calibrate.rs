//! `removebgd models calibrate`: a model's int8 calibration table from calibration photos.
//!
//! The photos alone teach the wrong ranges (few have a salient subject, so the model is never
//! confident on them); composites help: each photo with a clear subject is cut out with the f32
//! model's own mask and pasted onto the other photos at two scales and positions.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::CalibrateArgs;
use crate::engine::{Model, Pipeline, Precision, image_io, use_threads};
use crate::ops::calibration::{Layer, Table};
use crate::provision;

/// A photo is a subject when its f32 mask covers this share of it (mean alpha).
const SUBJECT: std::ops::Range<f64> = 0.05..0.7;
/// Side of the square composites.
const COMPOSITE: u32 = 768;

pub fn run(args: CalibrateArgs) -> Result<()> {
    let spec = provision::lookup(&args.name)?;
    let path = args.store.fetcher().ensure(spec)?;
    let pipeline = spec.pipeline;
    use_threads(if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    });
    let photos = load_photos(&args.photos)?;
    let f32_model = Model::load(&path, Some(pipeline), Precision::F32)?;
    let masks: Vec<Vec<u8>> = photos
        .iter()
        .map(|p| mask(&f32_model, pipeline, p))
        .collect::<Result<_>>()?;
    let mut inputs: Vec<image::RgbImage> = photos.clone();
    let (subjects, textures): (Vec<usize>, Vec<usize>) = (0..photos.len()).partition(|&i| {
        let mean = masks[i].iter().map(|&v| v as f64).sum::<f64>() / masks[i].len() as f64 / 255.0;
        SUBJECT.contains(&mean)
    });
    for (n, &s) in subjects.iter().enumerate() {
        for k in 0..2 {
            let t = textures[(2 * n + k) % textures.len().max(1)];
            let scale = [0.9, 0.55][k];
            let at = [(0.05, 0.05), (0.4, 0.3)][k];
            inputs.push(composite(&photos[s], &masks[s], &photos[t], scale, at));
        }
    }
    eprintln!(
        "calibrating {} on {} photos ({} subjects) and {} composites",
        args.name,
        photos.len(),
        subjects.len(),
        inputs.len() - photos.len()
    );
    let preprocessed: Vec<Vec<f32>> = inputs
        .iter()
        .map(|im| pipeline.preprocess(im.as_raw(), im.dimensions()))
        .collect();
    let histograms = Model::calibrate(&path, pipeline, preprocessed.iter().cloned())?;
    for (option, names) in [("--keep-f32", &args.keep_f32), ("--wide", &args.wide)] {
        for name in names {
            if !histograms.contains_key(name) {
                bail!("{option} {name}: no such convolution in {}", args.name);
            }
        }
    }
    let layers: BTreeMap<String, Layer> = histograms
        .iter()
        .map(|(name, h)| {
            let mut layer = Layer::new(h, args.method, !args.keep_f32.contains(name));
            layer.wide = layer.int8 && args.wide.contains(name);
            (name.clone(), layer)
        })
        .collect();
    let sha256 = spec.sha256.clone();
    let table = Table {
        sha256,
        size: spec.size,
        auto: args.auto,
        notes: format!(
            "removebgd models calibrate {}: {} photos from {} and {} composites; ranges: {:?}; {} of {} convolutions in int8 ({} of them with 16-bit inputs)",
            args.name,
            photos.len(),
            args.photos.display(),
            inputs.len() - photos.len(),
            args.method,
            layers.values().filter(|l| l.int8).count(),
            layers.len(),
            layers.values().filter(|l| l.wide).count()
        ),
        layers,
    };

    // What int8 does to these inputs' masks (the fidelity photos are the tests' business).
    let reference: Vec<Vec<u8>> = preprocessed
        .iter()
        .map(|x| f32_model.infer(x.clone()).map(|o| to_levels(pipeline, &o)))
        .collect::<Result<_, _>>()?;
    let int8 = Model::load_with_table(&path, pipeline, table.clone())?;
    let change = mask_change(&int8, pipeline, &preprocessed, &reference)?;
    eprintln!("int8 against f32 on the calibration inputs: mean |diff| {change:.3}/255 (model resolution)");

    if args.sensitivity {
        // Every fourth input: a layer alone moves the mask far less than all of them, and the
        // ranking is what matters.
        let sample: Vec<Vec<f32>> = preprocessed.iter().step_by(4).cloned().collect();
        let reference: Vec<Vec<u8>> = reference.iter().step_by(4).cloned().collect();
        let (preprocessed, reference) = (&sample, &reference);
        println!("layer\tmask change alone in int8 (mean |diff|, 8-bit levels, {} inputs)", sample.len());
        let mut rows = Vec::new();
        for name in table.layers.keys() {
            let mut one = table.clone();
            for (n, l) in one.layers.iter_mut() {
                l.int8 = n == name;
            }
            let model = Model::load_with_table(&path, pipeline, one)?;
            let change = mask_change(&model, pipeline, preprocessed, reference)?;
            println!("{name}\t{change:.4}");
            rows.push((change, name.clone()));
        }
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("most sensitive first:");
        for (change, name) in rows.iter().take(15) {
            println!("  {change:.4}  {name}");
        }
    }

    let out = args
        .out
        .unwrap_or_else(|| Path::new("models/int8").join(format!("{}.toml", args.name)));
    let header = format!(
        "# int8 calibration table for {} ({}), made by `removebgd models calibrate`; embedded at build time.\n",
        args.name, spec.file
    );
    std::fs::write(&out, header + &table.to_toml()).with_context(|| format!("writing {}", out.display()))?;
    println!("{} -> {}", args.name, out.display());
    Ok(())
}

fn load_photos(dir: &Path) -> Result<Vec<image::RgbImage>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("no photos in {}", dir.display());
    }
    paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(image_io::decode(&bytes, crate::engine::DEFAULT_MAX_PIXELS)
                .with_context(|| format!("decoding {}", p.display()))?
                .rgb)
        })
        .collect()
}

/// The f32 model's 8-bit mask of `photo` at its own size.
fn mask(model: &Model, pipeline: Pipeline, photo: &image::RgbImage) -> Result<Vec<u8>> {
    let out = model.infer(pipeline.preprocess(photo.as_raw(), photo.dimensions()))?;
    Ok(pipeline.postprocess(&out, photo.dimensions()))
}

/// The model output as 8-bit levels at model resolution (u2netp's min-max stretch included).
fn to_levels(pipeline: Pipeline, out: &[f32]) -> Vec<u8> {
    let s = pipeline.input_size();
    pipeline.postprocess(out, (s, s))
}

/// Mean |diff| in 8-bit levels between `model`'s masks of `inputs` and `reference`.
fn mask_change(model: &Model, pipeline: Pipeline, inputs: &[Vec<f32>], reference: &[Vec<u8>]) -> Result<f64> {
    let mut total = 0.0;
    for (x, want) in inputs.iter().zip(reference) {
        let got = to_levels(pipeline, &model.infer(x.clone())?);
        total += got
            .iter()
            .zip(want)
            .map(|(&a, &b)| (a as i32 - b as i32).unsigned_abs() as f64)
            .sum::<f64>()
            / got.len() as f64;
    }
    Ok(total / inputs.len() as f64)
}

/// `subject` (with its mask) scaled by `scale` and pasted at `at` (fractions of the frame) onto
/// `texture`, both in a square frame.
fn composite(subject: &image::RgbImage, mask: &[u8], texture: &image::RgbImage, scale: f64, at: (f64, f64)) -> image::RgbImage {
    use image::imageops::{FilterType, resize};
    let mut frame = resize(texture, COMPOSITE, COMPOSITE, FilterType::Triangle);
    let (w, h) = subject.dimensions();
    let fit = scale * COMPOSITE as f64 / w.max(h) as f64;
    let (sw, sh) = (((w as f64 * fit) as u32).max(1), ((h as f64 * fit) as u32).max(1));
    let small = resize(subject, sw, sh, FilterType::Triangle);
    let alpha = image::GrayImage::from_raw(w, h, mask.to_vec()).expect("mask of the photo's size");
    let alpha = resize(&alpha, sw, sh, FilterType::Triangle);
    let (x0, y0) = (
        ((COMPOSITE - sw.min(COMPOSITE)) as f64 * at.0 / 0.45).min((COMPOSITE - sw.min(COMPOSITE)) as f64) as u32,
        ((COMPOSITE - sh.min(COMPOSITE)) as f64 * at.1 / 0.45).min((COMPOSITE - sh.min(COMPOSITE)) as f64) as u32,
    );
    for y in 0..sh.min(COMPOSITE - y0) {
        for x in 0..sw.min(COMPOSITE - x0) {
            let a = alpha.get_pixel(x, y)[0] as f32 / 255.0;
            let s = small.get_pixel(x, y);
            let d = frame.get_pixel_mut(x0 + x, y0 + y);
            for c in 0..3 {
                d[c] = (a * s[c] as f32 + (1.0 - a) * d[c] as f32).round() as u8;
            }
        }
    }
    frame
}
