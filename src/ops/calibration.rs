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

use super::quant_conv::Quant;

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

    /// The observed range, shrunk by the factor (1 down to 1/64) with the least error.
    pub fn choose(&self) -> Quant {
        if self.min > self.max {
            return Quant::covering(0.0, 1.0);
        }
        (0..=180)
            .map(|i| 0.977f32.powi(i))
            .map(|f| Quant::covering(self.min * f, self.max * f))
            .min_by(|a, b| self.error(*a).total_cmp(&self.error(*b)))
            .expect("candidates")
    }

    pub fn observed(&self) -> (f32, f32) {
        (self.min, self.max)
    }
}

/// One convolution's entry: its input range, and whether it runs in int8.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub scale: f32,
    pub zero: u8,
    /// What the calibration photos showed.
    pub min: f32,
    pub max: f32,
    /// false: the layer stays f32 (it costs too much fidelity in int8).
    pub int8: bool,
}

impl Layer {
    pub fn quant(&self) -> Quant {
        Quant {
            scale: self.scale,
            zero: self.zero,
        }
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
    /// The embedded table for a model file of `size` bytes (the layer names then have to fit).
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

    /// A far outlier stretches min/max, not the chosen range; the dense part keeps a fine step.
    #[test]
    fn an_outlier_does_not_set_the_range() {
        let mut h = Histogram::default();
        let mut seed = 1u32;
        h.add((0..200_000).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0
        }));
        h.add([1528.0]);
        assert_eq!(h.observed(), (h.observed().0, 1528.0));
        let q = h.choose();
        let hi = 255.0 * q.scale;
        assert_eq!(q.zero, 0, "non-negative values need no negative range");
        assert!((3.5..6.0).contains(&hi), "range top {hi}");
    }

    /// Values that are all well inside keep (nearly) their whole range.
    #[test]
    fn a_dense_range_is_kept() {
        let mut h = Histogram::default();
        h.add((0..=1000).map(|i| i as f32 / 1000.0 * 6.0 - 2.0));
        let q = h.choose();
        let (lo, hi) = (-(q.zero as f32) * q.scale, (255.0 - q.zero as f32) * q.scale);
        assert!(lo <= -1.8 && hi >= 3.6, "[{lo}, {hi}]");
    }
}
