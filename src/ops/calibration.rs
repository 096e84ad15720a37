//! int8 activation ranges: histograms of each convolution's input, gathered while the f32 model
//! runs on calibration photos, and the range chosen from them; the table `models/int8/` keeps
//! per model and the binary embeds.
//!
//! Ranges are not the observed min and max: one outlier would stretch the step for every other
//! value (see `tests/fixtures/calibration/README.md`). Each range is the observed one shrunk by
//! the factor that minimises the expected squared quantisation error over the histogram
//! (clipping error beyond the range, step²/12 inside it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::quant_conv::{Quant, Quant16, Source};

/// Bins of a histogram: enough for a 256-level choice to be made at sub-step resolution.
const BINS: usize = 4096;

/// Values seen, binned over `[-range, range]`; the range doubles (merging bins in pairs) when a
/// value falls outside.
#[derive(Debug, Clone)]
pub struct Histogram {
    bins: Vec<u64>,
    range: f32,
    min: f32,
    max: f32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bins: vec![0; BINS],
            range: 0.0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl Histogram {
    pub fn add(&mut self, values: impl IntoIterator<Item = f32>) {
        for v in values {
            if !v.is_finite() {
                continue;
            }
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            if self.range == 0.0 {
                self.range = v.abs().max(1e-6);
            }
            while v.abs() > self.range {
                self.grow();
            }
            let at = ((v + self.range) / (2.0 * self.range) * BINS as f32) as usize;
            self.bins[at.min(BINS - 1)] += 1;
        }
    }

    /// Doubles the range: old bin `i` lands in new bin `BINS/4 + i/2`.
    fn grow(&mut self) {
        let mut bins = vec![0; BINS];
        for (i, &n) in self.bins.iter().enumerate() {
            bins[BINS / 4 + i / 2] += n;
        }
        self.bins = bins;
        self.range *= 2.0;
    }

    /// Bin centres with their counts.
    fn centres(&self) -> impl Iterator<Item = (f32, f64)> + '_ {
        let width = 2.0 * self.range / BINS as f32;
        self.bins
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(move |(i, &n)| (-self.range + (i as f32 + 0.5) * width, n as f64))
    }

    /// Expected squared error of quantising the values with `q`.
    fn error(&self, q: Quant) -> f64 {
        let lo = q.scale as f64 * -(q.zero as f64);
        let hi = lo + 255.0 * q.scale as f64;
        let inside = (q.scale as f64).powi(2) / 12.0;
        self.centres()
            .map(|(v, n)| {
                let v = v as f64;
                n * if v < lo {
                    (lo - v).powi(2)
                } else if v > hi {
                    (v - hi).powi(2)
                } else {
                    inside
                }
            })
            .sum()
    }

    /// The range `method` picks.
    pub fn choose(&self, method: Method) -> Quant {
        if self.min > self.max {
            return Quant::covering(0.0, 1.0);
        }
        match method {
            Method::MinMax => Quant::covering(self.min, self.max),
            // The observed range, shrunk by the factor (1 down to 1/64) with the least error.
            Method::Mse => (0..=180)
                .map(|i| 0.977f32.powi(i))
                .map(|f| Quant::covering(self.min * f, self.max * f))
                .min_by(|a, b| self.error(*a).total_cmp(&self.error(*b)))
                .expect("candidates"),
            Method::Percentile => {
                let total: u64 = self.bins.iter().sum();
                let tail = (total as f64 * 1e-4) as u64;
                let width = 2.0 * self.range / BINS as f32;
                let (mut seen, mut lo) = (0, 0);
                while lo < BINS - 1 && seen + self.bins[lo] <= tail {
                    seen += self.bins[lo];
                    lo += 1;
                }
                let (mut seen, mut hi) = (0, BINS - 1);
                while hi > 0 && seen + self.bins[hi] <= tail {
                    seen += self.bins[hi];
                    hi -= 1;
                }
                let edge = |i: usize| -self.range + i as f32 * width;
                Quant::covering(edge(lo).max(self.min), edge(hi + 1).min(self.max))
            }
        }
    }

    pub fn observed(&self) -> (f32, f32) {
        (self.min, self.max)
    }
}

/// How a range is chosen from a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The observed minimum and maximum: one outlier sets the step for every value.
    #[value(name = "minmax", alias = "min-max")]
    MinMax,
    /// The 0.01% and 99.99% points.
    Percentile,
    /// The observed range shrunk by the factor with the least expected squared error.
    Mse,
}

/// One convolution's entry: per input (a concatenation has several), its range; and whether it
/// runs in int8.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub scale: Vec<f32>,
    pub zero: Vec<u8>,
    /// What the calibration photos showed.
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    /// false: the layer stays f32 (it costs too much fidelity in int8).
    pub int8: bool,
    /// true: its inputs are quantised to 16 bits over the observed range (two bytes, each summed
    /// by the int8 kernels: twice an int8 layer's work, for a layer 8 bits cost too much).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wide: bool,
}

impl Layer {
    /// From each input's histogram.
    pub fn new(histograms: &[Histogram], method: Method, int8: bool) -> Layer {
        let quant: Vec<Quant> = histograms.iter().map(|h| h.choose(method)).collect();
        Layer {
            scale: quant.iter().map(|q| q.scale).collect(),
            zero: quant.iter().map(|q| q.zero).collect(),
            min: histograms.iter().map(|h| h.observed().0).collect(),
            max: histograms.iter().map(|h| h.observed().1).collect(),
            int8,
            wide: false,
        }
    }

    /// How each input is quantised: the chosen 8-bit range, or 16 bits over the observed one.
    pub fn quant(&self) -> Vec<Source> {
        if self.wide {
            return self
                .min
                .iter()
                .zip(&self.max)
                .map(|(&lo, &hi)| Source::Bits16(Quant16::covering(lo, hi)))
                .collect();
        }
        self.scale
            .iter()
            .zip(&self.zero)
            .map(|(&scale, &zero)| Source::Bits8(Quant { scale, zero }))
            .collect()
    }
}

/// A model's calibration table (`models/int8/<model>.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Table {
    /// The model file it was made for (sha256), so a table never meets another model.
    pub sha256: String,
    /// Its size in bytes: how a loaded file finds its table without hashing it.
    pub size: u64,
    /// Whether `--precision auto` picks int8 for this model: the fidelity bound holds.
    pub auto: bool,
    /// How it was made, for the reader.
    pub notes: String,
    /// By convolution node name.
    pub layers: BTreeMap<String, Layer>,
}

/// The tables the binary carries, by model file sha256.
const TABLES: &[&str] = &[
    include_str!("../../models/int8/isnet.toml"),
    include_str!("../../models/int8/u2netp.toml"),
];

impl Table {
    /// The table for a model file of `size` bytes (the layer names then have to fit): the
    /// file `REMOVEBGD_INT8_TABLE` names when it is for that size (to try a table without a
    /// rebuild), else the embedded one. A named file that cannot be read or parsed is an error,
    /// not a silent fall-back: a run that was meant to try a table must not measure another.
    pub fn for_model(size: u64) -> Result<Option<Table>, String> {
        if let Some(path) = std::env::var_os("REMOVEBGD_INT8_TABLE") {
            let shown = std::path::Path::new(&path).display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("REMOVEBGD_INT8_TABLE={shown}: {e}"))?;
            let table = toml::from_str::<Table>(&text).map_err(|e| format!("REMOVEBGD_INT8_TABLE={shown}: {e}"))?;
            if table.size == size {
                return Ok(Some(table));
            }
            tracing::info!(path = %shown, "REMOVEBGD_INT8_TABLE is for another model file; using the embedded table");
        }
        Ok(Self::embedded(size))
    }

    /// The embedded table for a model file of `size` bytes.
    pub fn embedded(size: u64) -> Option<Table> {
        TABLES
            .iter()
            .map(|t| toml::from_str::<Table>(t).expect("embedded calibration tables parse"))
            .find(|t| t.size == size)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a table serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tables_parse() {
        for t in TABLES {
            toml::from_str::<Table>(t).unwrap();
        }
    }

    /// A far outlier stretches min/max, not the percentile range; the dense part keeps a fine
    /// step.
    #[test]
    fn an_outlier_does_not_set_the_percentile_range() {
        let mut h = Histogram::default();
        let mut seed = 1u32;
        h.add((0..200_000).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0
        }));
        h.add([1528.0]);
        assert_eq!(h.observed().1, 1528.0);
        let q = h.choose(Method::Percentile);
        let hi = 255.0 * q.scale;
        assert_eq!(q.zero, 0, "non-negative values need no negative range");
        assert!((3.5..6.0).contains(&hi), "range top {hi}");
        assert_eq!(h.choose(Method::MinMax).scale, 1528.0 / 255.0);
    }

    /// A long thin tail (as after a Relu) is clipped by the least-squared-error range, well
    /// below the maximum, and more finely stepped than min/max.
    #[test]
    fn a_long_tail_is_clipped_by_least_squares() {
        let mut h = Histogram::default();
        let mut seed = 3u32;
        h.add((0..200_000).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let u = ((seed >> 8) as f32 + 1.0) / (1u32 << 24) as f32;
            -u.ln()
        }));
        let (_, max) = h.observed();
        let hi = 255.0 * h.choose(Method::Mse).scale;
        assert!(max > 10.0 && hi < 0.9 * max && hi > 3.0, "max {max}, chosen top {hi}");
    }

    /// Values that are all well inside keep (nearly) their whole range.
    #[test]
    fn a_dense_range_is_kept() {
        let mut h = Histogram::default();
        h.add((0..=1000).map(|i| i as f32 / 1000.0 * 6.0 - 2.0));
        let q = h.choose(Method::Mse);
        let (lo, hi) = (-(q.zero as f32) * q.scale, (255.0 - q.zero as f32) * q.scale);
        assert!(lo <= -1.8 && hi >= 3.6, "[{lo}, {hi}]");
    }
}
