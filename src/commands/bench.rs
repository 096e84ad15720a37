//! `removebgd bench IMAGE`: per-stage medians over several runs, and peak memory.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::BenchArgs;
use crate::engine::{CutOptions, Timings};

pub fn run(args: BenchArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let bytes = std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let started = Instant::now();
    let engine = crate::app::load_engine(&args.engine, 0)?;
    let load = started.elapsed();
    let loaded_rss = crate::memory::status_bytes("VmRSS");
    let opts = CutOptions {
        format: args.format,
        size: args.size,
        refine: args.refine,
        ..CutOptions::default()
    };
    let warm = engine.cut(&bytes, &opts)?;
    let runs: Vec<Timings> = (0..args.runs)
        .map(|_| engine.cut(&bytes, &opts).map(|c| c.timings))
        .collect::<Result<_, _>>()?;

    println!(
        "removebgd {} model={} pipeline={:?} precision={} threads={} image={} ({}x{} -> {} {} bytes) runs={}",
        env!("CARGO_PKG_VERSION"),
        args.engine.model,
        engine.model().pipeline(),
        engine.model().precision(),
        crate::app::threads(&args.engine),
        args.image.display(),
        warm.width,
        warm.height,
        warm.format.extension(),
        warm.bytes.len(),
        args.runs
    );
    println!("load_ms={:.0}", ms(load));
    if let Some(b) = loaded_rss {
        println!("rss_after_load_mb={:.0}", b as f64 / MIB);
    }
    let stage = |name: &str, f: fn(&Timings) -> Duration| {
        let mut v: Vec<f64> = runs.iter().map(|t| ms(f(t))).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "{name:<12} median_ms={:>8.1} min_ms={:>8.1} max_ms={:>8.1}",
            median(&v),
            v[0],
            v[v.len() - 1]
        );
    };
    stage("decode", |t| t.decode);
    stage("preprocess", |t| t.preprocess);
    stage("inference", |t| t.inference);
    stage("postprocess", |t| t.postprocess);
    stage("refine", |t| t.refine);
    stage("encode", |t| t.encode);
    stage("total", |t| t.total());
    match crate::memory::status_bytes("VmHWM") {
        Some(b) => println!("peak_rss_mb={:.0}", b as f64 / MIB),
        None => println!("peak_rss_mb=unknown"),
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

const MIB: f64 = 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(super::median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(super::median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
