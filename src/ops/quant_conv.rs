//! int8 convolution: u8 activations times s8 weights (one scale per output channel), summed
//! exactly in i32, swapped in for the same convolutions as [`DirectConv`](super::DirectConv)
//! (stride 1, with the concatenation or max pool in front and the Relu and residual addition
//! after).
//!
//! - **Input.** Each task copies the input rows its band needs, quantising the f32 values as it
//!   copies (`q = clamp(round_ties_even(v / scale) + zero, 0, 255)`, with the padding taps as
//!   `zero`), four channels to a 32-bit word per pixel: the layout the 4-way dot products read.
//!   Concatenations and 2x2 max pools are read through, as the f32 kernel does.
//! - **Sums.** Every kernel computes the same integer `sum((q - zero) * w)` over input channel and
//!   tap, exactly (no saturating instruction anywhere), so every path gives the same sums:
//!   - `Vnni512`: `vpdpbusd` on 16 pixels x 4 channels per instruction;
//!   - `AvxVnni`: the same on 8 pixels (AVX-VNNI);
//!   - `Avx2`: bytes widened to i16 and `vpmaddwd` (no `vpmaddubsw`, which saturates);
//!   - `NeonDot`: `sdot` by lane (the copy holds `q - 128` as s8, corrected for in the sums);
//!   - `Neon`: `smull` of s8 into i16 and pairwise widening adds into i32 (Cortex-A72);
//!   - `Scalar`: plain loops, for CPUs with none of these.
//! - **Concatenations.** Each concatenated input keeps its own range and its own weight scales
//!   (per output channel and input): its channels start a new group of four in the copy, the
//!   kernels sum it on its own, and the inputs' sums meet in f32.
//! - **Weights.** s8 per output channel (and input), with the step of least squared error
//!   between max/127 and half of it, quantised at load from the shipped model file.
//! - **Requantisation.** One fixed order of f32 operations on every path, never fused: per
//!   input `(sum - zero * wsum) as f32 * (scale * wscale)`, added input by input, then the bias,
//!   the Relu, the residual. So the outputs, and the masks, are bit-identical across
//!   instruction sets and architectures.
//!
//! - **Activations between int8 layers.** A layer (or resize) whose every reader is an int8
//!   layer reading it with the same parameters stores its output quantised with them (after
//!   the Relu and residual, exactly as the readers would have): bytes, or 16-bit words for
//!   16-bit readers. The readers copy them as they are: a quarter (or half) of the memory and
//!   bandwidth, and the same results bit for bit. Other outputs stay f32, and their readers
//!   quantise as they copy.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::direct_conv::{Band, Geometry, WEIGHT_BUDGET};

/// One convolved input as the operator receives it: f32 values, or values already quantised
/// with this input's [`Source`] (bytes for 8 bits, words for 16; the output of the layer before,
/// see [`stored_activations`]). Also the residual: f32, or 16-bit words when it arrives stored.
///
/// [`stored_activations`]: super::stored_activations
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
    U16(&'a [u16]),
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::F32(v) => v.len(),
            Input::U8(v) => v.len(),
            Input::U16(v) => v.len(),
        }
    }
}

/// Where tasks store: the output's first element (f32, or u8 or u16 when the layer's output is
/// stored quantised, as `output_quant` says) and the residual added in the store, if any (f32,
/// or u16 when `residual_quant` says it arrives stored).
pub(crate) struct Out {
    base: *mut u8,
    residual: *const u8,
}

// SAFETY: tasks write disjoint rows of the output through it, and the tensors outlive `run`.
unsafe impl Sync for Out {}

/// The output buffer of [`QuantConv::run`].
pub(crate) enum Output<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
    U16(&'a mut [u16]),
}

/// Activation quantisation: `real = scale * (q - zero)`, `q` in 0..=255.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quant {
    pub scale: f32,
    pub zero: u8,
}

impl Quant {
    /// The parameters that cover `[lo, hi]` (widened to include 0, which must be exact: it is
    /// the padding).
    pub fn covering(lo: f32, hi: f32) -> Quant {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
        let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as u8;
        Quant { scale, zero }
    }

    /// `v` quantised: the one definition every path follows (clamped before rounding, so
    /// infinities and NaN land on an end of the range the same way everywhere).
    #[inline(always)]
    pub fn quantise(inverse: f32, zero: i32, v: f32) -> u8 {
        quantise_byte(inverse, zero, 255, 0, v)
    }
}

/// 16-bit activation quantisation, for the layers 8 bits cost too much fidelity:
/// `real = scale * (q - zero)`, `q` in 0..=65535. The copy holds it as two bytes, each summed
/// by the int8 kernels as if it were an input of its own (high byte with 256 times the step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quant16 {
    pub scale: f32,
    pub zero: u16,
}

impl Quant16 {
    /// The parameters that cover `[lo, hi]` (widened to include 0, which stays exact).
    pub fn covering(lo: f32, hi: f32) -> Quant16 {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = if hi > lo { (hi - lo) / 65535.0 } else { 1.0 };
        let zero = (-lo / scale).round_ties_even().clamp(0.0, 65535.0) as u16;
        Quant16 { scale, zero }
    }

    /// The real value of `q`: `(q - zero) * scale`, one integer subtraction and one rounding
    /// multiply on every path.
    #[inline(always)]
    pub fn dequantise(self, q: u16) -> f32 {
        (q as i32 - self.zero as i32) as f32 * self.scale
    }
}

/// How one input of a convolution is quantised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    Bits8(Quant),
    Bits16(Quant16),
}

/// One byte of an input as the copy holds it: the input's values quantised with `scale` and
/// `zero` to `0..=max` (255 or 65535), then the byte at bit `shift` (0 or 8).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Part {
    input: usize,
    scale: f32,
    zero: i32,
    max: i32,
    shift: u32,
}

impl Part {
    /// The parts of `source`, input `input`: one for 8 bits, the high then the low byte for 16.
    fn of(input: usize, source: Source) -> Vec<Part> {
        match source {
            Source::Bits8(q) => vec![Part {
                input,
                scale: q.scale,
                zero: q.zero as i32,
                max: 255,
                shift: 0,
            }],
            Source::Bits16(q) => [8, 0]
                .map(|shift| Part {
                    input,
                    scale: q.scale,
                    zero: q.zero as i32,
                    max: 65535,
                    shift,
                })
                .to_vec(),
        }
    }

    /// The byte the padding (a real 0) holds.
    fn zero_byte(&self) -> u8 {
        ((self.zero >> self.shift) & 255) as u8
    }

    /// The real step of one unit of this byte.
    fn step(&self) -> f32 {
        self.scale * (1u32 << self.shift) as f32
    }
}

/// `v` quantised to `0..=max` with `inverse` (1 / scale) and `zero`, then the byte at `shift`:
/// the one definition every path follows (clamped before rounding, so infinities and NaN land
/// on an end of the range the same way everywhere).
#[inline(always)]
fn quantise_byte(inverse: f32, zero: i32, max: i32, shift: u32, v: f32) -> u8 {
    ((quantise_value(inverse, zero, max, v) >> shift) & 255) as u8
}

/// `v` quantised to `0..=max` with `inverse` (1 / scale) and `zero`, whole. The rounding is
/// [`round_small`]'s (`round_ties_even` for the clamped values), which compiles to plain
/// vector adds everywhere instead of a libm call per value on the baseline x86-64.
#[inline(always)]
fn quantise_value(inverse: f32, zero: i32, max: i32, v: f32) -> i32 {
    let limit = (max + 1) as f32;
    let t = (v * inverse).max(-limit).min(limit);
    (round_small(t) as i32 + zero).clamp(0, max)
}

impl Source {
    /// `(inverse, zero, max)`: what quantises a value for this input.
    fn params(self) -> (f32, i32, i32) {
        match self {
            Source::Bits8(q) => (1.0 / q.scale, q.zero as i32, 255),
            Source::Bits16(q) => (1.0 / q.scale, q.zero as i32, 65535),
        }
    }

    /// `v` quantised as the copy quantises it, whole (before it is split into bytes).
    #[inline(always)]
    pub fn quantise(self, v: f32) -> u16 {
        let (inverse, zero, max) = self.params();
        quantise_value(inverse, zero, max, v) as u16
    }

    /// Writes `values` quantised into `out`: bytes (u8) for 8 bits, words (u16) for 16; 16 at a
    /// time where `avx512` (the caller checked the CPU has AVX-512F).
    #[inline(always)]
    pub(crate) fn quantise_into<T: StoredValue>(self, values: &[f32], out: &mut [T], avx512: bool) {
        let (inverse, zero, max) = self.params();
        assert_eq!(max as usize, (1usize << (8 * size_of::<T>())) - 1, "the element fits the range");
        quantise_slice(inverse, zero, max, values, out, avx512)
    }
}

/// A stored activation's element: u8 or u16.
pub(crate) trait StoredValue: Copy {
    fn from_quantised(q: i32) -> Self;
}

impl StoredValue for u8 {
    fn from_quantised(q: i32) -> u8 {
        q as u8
    }
}

impl StoredValue for u16 {
    fn from_quantised(q: i32) -> u16 {
        q as u16
    }
}

/// `values` quantised to `0..=max` into `out` (u8 or u16), value by value with
/// [`quantise_value`], or 16 at a time with the same operations where `avx512` (the caller
/// checked the CPU has AVX-512F).
#[inline(always)]
fn quantise_slice<T: StoredValue>(inverse: f32, zero: i32, max: i32, values: &[f32], out: &mut [T], avx512: bool) {
    assert_eq!(values.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller checked the features; the function writes only `out`'s elements.
        unsafe { quantise_slice_avx512(inverse, zero, max, values, out) };
        return;
    }
    let _ = avx512;
    for (o, &v) in out.iter_mut().zip(values) {
        *o = T::from_quantised(quantise_value(inverse, zero, max, v));
    }
}

/// `quantise_slice` 16 values at a time: multiply, clamp to +-(max + 1) with NaN to the low end,
/// round to nearest even, add the zero point, clamp to 0..=max, narrow (as `quantise_value`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn quantise_slice_avx512<T: StoredValue>(inverse: f32, zero: i32, max: i32, values: &[f32], out: &mut [T]) {
    use std::arch::x86_64::*;
    let n = values.len().min(out.len());
    // SAFETY: loads and stores are masked to the first `n` elements of both slices.
    unsafe {
        let limit = (max + 1) as f32;
        let (low, high) = (_mm512_set1_ps(-limit), _mm512_set1_ps(limit));
        let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(max));
        let (inv, z) = (_mm512_set1_ps(inverse), _mm512_set1_epi32(zero));
        for x0 in (0..n).step_by(16) {
            let lanes = mask16(n - x0);
            let v = _mm512_maskz_loadu_ps(lanes, values.as_ptr().add(x0));
            let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), low), high);
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(t), z);
            let q = _mm512_min_epi32(_mm512_max_epi32(q, floor), ceil);
            let at = out.as_mut_ptr().add(x0);
            if size_of::<T>() == 1 {
                _mm512_mask_cvtepi32_storeu_epi8(at.cast(), lanes, q);
            } else {
                _mm512_mask_cvtepi32_storeu_epi16(at.cast(), lanes, q);
            }
        }
    }
}


/// The instruction set an int8 convolution runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QIsa {
    Vnni512,
    AvxVnni,
    Avx2,
    NeonDot,
    Neon,
    Scalar,
}

/// Pixels per vector, output channels and vectors per tile, and vectors per tile of a single
/// channel, per instruction set.
const VNNI512: Shape = Shape {
    lanes: 16,
    t: 8,
    n: 3,
    single: 8,
};
const AVXVNNI: Shape = Shape {
    lanes: 8,
    t: 6,
    n: 2,
    single: 6,
};
const AVX2: Shape = Shape {
    lanes: 8,
    t: 6,
    n: 1,
    single: 6,
};
const NEONDOT: Shape = Shape {
    lanes: 4,
    t: 8,
    n: 3,
    single: 8,
};
const NEON: Shape = Shape {
    lanes: 4,
    t: 4,
    n: 2,
    single: 8,
};
const SCALAR: Shape = Shape {
    lanes: 4,
    t: 4,
    n: 1,
    single: 4,
};

#[derive(Debug, Clone, Copy)]
struct Shape {
    lanes: usize,
    t: usize,
    n: usize,
    single: usize,
}

impl QIsa {
    /// Every instruction set there is a kernel for, fastest first.
    pub const ALL: [QIsa; 6] = [
        QIsa::Vnni512,
        QIsa::AvxVnni,
        QIsa::Avx2,
        QIsa::NeonDot,
        QIsa::Neon,
        QIsa::Scalar,
    ];

    fn shape(self) -> Shape {
        match self {
            QIsa::Vnni512 => VNNI512,
            QIsa::AvxVnni => AVXVNNI,
            QIsa::Avx2 => AVX2,
            QIsa::NeonDot => NEONDOT,
            QIsa::Neon => NEON,
            QIsa::Scalar => SCALAR,
        }
    }

    /// Whether the input copy holds `q - 128` as s8 (the aarch64 kernels multiply s8 by s8)
    /// rather than `q` as u8.
    fn signed(self) -> bool {
        matches!(self, QIsa::NeonDot | QIsa::Neon)
    }

    /// Lower-case name, as `REMOVEBGD_INT8_KERNEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            QIsa::Vnni512 => "vnni512",
            QIsa::AvxVnni => "avxvnni",
            QIsa::Avx2 => "avx2",
            QIsa::NeonDot => "neondot",
            QIsa::Neon => "neon",
            QIsa::Scalar => "scalar",
        }
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            QIsa::Vnni512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            QIsa::AvxVnni => {
                std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            QIsa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "aarch64")]
            QIsa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "aarch64")]
            QIsa::Neon => true,
            QIsa::Scalar => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel this CPU runs; `REMOVEBGD_INT8_KERNEL` (a [`QIsa::name`]) picks
    /// another, to compare them, when the CPU has it.
    pub fn chosen() -> QIsa {
        let wanted = std::env::var("REMOVEBGD_INT8_KERNEL").unwrap_or_default();
        QIsa::ALL
            .into_iter()
            .filter(|k| k.supported())
            .find(|k| wanted.is_empty() || k.name() == wanted)
            .or_else(|| QIsa::ALL.into_iter().find(|k| k.supported()))
            .unwrap_or(QIsa::Scalar)
    }
}

/// Packed weights: [tile][group of 4 input channels][tap][tile channel][4], zero past C and M;
/// as i16 for the AVX2 kernel, which multiplies 16-bit values.
#[derive(Debug, PartialEq)]
enum Packed {
    I8(Vec<i8>),
    I16(Vec<i16>),
}

/// A stride-1 convolution on int8 values (see the module comment).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConv {
    isa: QIsa,
    geometry: Geometry,
    /// Per input (concatenated in `geometry.channels`' order): how it is quantised.
    sources: Vec<Source>,
    /// What the copy holds, in order: each input's byte (two for a 16-bit input). Each part
    /// starts a new group of four channels in the copy and has its own integer sum.
    parts: Vec<Part>,
    /// Per part, its first group of four channels in the copy; then the total.
    group_starts: Vec<usize>,
    /// Per part, its first group of four channels in a tile's weights; then the total. A
    /// 16-bit input's two bytes read the same weights (packed once, not twice).
    weight_starts: Vec<usize>,
    band: Band,
    /// Per tap (ky, kx): its byte offset in a group's copy.
    tap_offsets: Vec<usize>,
    tile_channels: usize,
    weights: Arc<Packed>,
    /// Per part, then per output channel (`[part * M + o]`): what turns the kernel's sum
    /// into `sum((q - zero) * w)`, and the f32 factor (input scale times weight scale).
    correction: Arc<Vec<i32>>,
    factor: Arc<Vec<f32>>,
    /// Per output channel.
    bias: Arc<Vec<f32>>,
    /// Per convolved input: whether it arrives quantised with its `sources` entry (by the layer
    /// that made it: bytes for 8 bits, words for 16) instead of f32.
    stored_inputs: Vec<bool>,
    /// When set, the output is stored quantised with it (after the Relu and the residual), for
    /// int8 layers that read it with this same quantisation.
    output_quant: Option<Source>,
    /// When set, the residual is rounded to 16 bits with it (its 16-bit convolution readers'
    /// quantisation) before it is added, so that it can arrive stored as 16-bit words.
    residual_quant: Option<Quant16>,
    /// Whether the residual arrives stored, as 16-bit words (with `residual_quant`).
    stored_residual: bool,
}

impl Eq for QuantConv {}

/// `round_ties_even` for |x| < 2^22, without a libm call on CPUs with no rounding instruction
/// (the baseline x86-64): adding 1.5 * 2^23 leaves no fraction bits, so IEEE addition rounds to
/// the nearest integer, ties to even, as `round_ties_even` does.
#[inline(always)]
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// One output channel's (or one input's part of it) weights quantised symmetrically to s8
/// (-127..=127) into `q`; returns the step, the one with the least squared error.
fn quantise_row(row: &[f32], q: &mut [i8]) -> f32 {
    let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
    let quantise = |v: f32, scale: f32| round_small((v / scale).clamp(-127.0, 127.0));
    // The step with the least squared error, from max/127 down to half of it: a few large
    // weights would otherwise set a coarse step for all the others. The first of equal errors
    // wins, in this order.
    let error = |scale: f32| -> f64 {
        row.iter()
            .map(|&v| (quantise(v, scale) * scale - v) as f64)
            .map(|e| e * e)
            .sum()
    };
    let scale = if max > 0.0 && max.is_finite() {
        let mut best = (f64::INFINITY, 1.0);
        for k in (50..=100).rev() {
            let scale = max * k as f32 / (100.0 * 127.0);
            let e = error(scale);
            if e < best.0 {
                best = (e, scale);
            }
        }
        best.1
    } else {
        1.0
    };
    for (q, &v) in q.iter_mut().zip(row) {
        *q = quantise(v, scale) as i8;
    }
    scale
}

/// [`quantise_row`] with one scale per output channel and per input: `weights` is
/// [M][C][taps], `channels` the inputs' channel counts. Returns the values ([M][C][taps]) and
/// the scales (`[input * M + o]`).
pub fn quantise_weights_by_input(weights: &[f32], m: usize, channels: &[usize], taps: usize) -> (Vec<i8>, Vec<f32>) {
    use rayon::prelude::*;
    let c: usize = channels.iter().sum();
    let mut q = vec![0i8; weights.len()];
    // Per output channel, its inputs' steps; the channels in parallel (this is most of a
    // model's load time).
    let per_output: Vec<Vec<f32>> = weights
        .par_chunks_exact(c * taps)
        .zip(q.par_chunks_exact_mut(c * taps))
        .map(|(row, q)| {
            let mut first = 0;
            channels
                .iter()
                .map(|&n| {
                    let range = first * taps..(first + n) * taps;
                    first += n;
                    quantise_row(&row[range.clone()], &mut q[range])
                })
                .collect()
        })
        .collect();
    let mut scales = vec![0f32; channels.len() * m];
    for (o, steps) in per_output.iter().enumerate() {
        for (s, &step) in steps.iter().enumerate() {
            scales[s * m + o] = step;
        }
    }
    (q, scales)
}

impl QuantConv {
    /// `sources` has one [`Source`] per input (concatenated in `geometry.channels`' order).
    /// Inputs with different ranges keep their own steps and their own weight scales: each
    /// input's channels start a new group of four in the copy (a 16-bit input's two bytes
    /// each), the kernels sum each part separately, and the sums meet in f32 (one fixed order:
    /// first part's term, plus the next's, ..., plus the bias).
    pub(crate) fn new(isa: QIsa, geometry: Geometry, weights: &[f32], bias: Vec<f32>, sources: &[Source]) -> QuantConv {
        assert_eq!(sources.len(), geometry.channels.len(), "one range per input");
        let m = geometry.output[1];
        let c: usize = geometry.channels.iter().sum();
        let parts: Vec<Part> = sources.iter().enumerate().flat_map(|(s, &q)| Part::of(s, q)).collect();
        let mut group_starts = vec![0];
        for p in &parts {
            group_starts.push(group_starts.last().unwrap() + geometry.channels[p.input].div_ceil(4));
        }
        let groups = *group_starts.last().unwrap();
        // A 16-bit input's low byte (the part after its high byte) shares the high byte's weights.
        let mut weight_starts = Vec::with_capacity(parts.len() + 1);
        let mut total = 0;
        for (k, p) in parts.iter().enumerate() {
            if k > 0 && parts[k - 1].input == p.input {
                weight_starts.push(weight_starts[k - 1]);
            } else {
                weight_starts.push(total);
                total += geometry.channels[p.input].div_ceil(4);
            }
        }
        weight_starts.push(total);
        let weight_groups = *weight_starts.last().unwrap();
        // Each part reads its groups' weights inside a tile's (what `vectors` relies on).
        for k in 0..parts.len() {
            assert!(weight_starts[k] + group_starts[k + 1] - group_starts[k] <= weight_groups);
        }
        let [kh, kw] = geometry.kernel;
        let taps = kh * kw;
        let Shape {
            lanes: vl,
            t: mt,
            n: nv,
            ..
        } = isa.shape();
        let tc = if m < mt { 1 } else { mt };
        let (q, scales) = quantise_weights_by_input(weights, m, &geometry.channels, taps);
        let mut packed = vec![0i8; m.div_ceil(tc) * weight_groups * taps * tc * 4];
        let offset = if isa.signed() { 128 } else { 0 };
        let mut correction = vec![0i32; parts.len() * m];
        let first: Vec<usize> = geometry
            .channels
            .iter()
            .scan(0, |a, n| {
                *a += n;
                Some(*a - n)
            })
            .collect();
        for (o, per_out) in q.chunks_exact(c * taps).enumerate() {
            for (k, part) in parts.iter().enumerate() {
                let n = geometry.channels[part.input];
                let per_in = &per_out[first[part.input] * taps..][..n * taps];
                for (i, per_tap) in per_in.chunks_exact(taps).enumerate() {
                    let at = weight_starts[k] * 4 + i;
                    for (t, &v) in per_tap.iter().enumerate() {
                        packed[((((o / tc) * weight_groups + at / 4) * taps + t) * tc + o % tc) * 4 + at % 4] = v;
                        correction[k * m + o] += (offset - part.zero_byte() as i32) * v as i32;
                    }
                }
            }
        }
        let scales = &scales;
        let factor = parts
            .iter()
            .flat_map(|p| (0..m).map(move |o| p.step() * scales[p.input * m + o]))
            .collect();
        let weights = match isa {
            QIsa::Avx2 => Packed::I16(packed.iter().map(|&v| v as i16).collect()),
            _ => Packed::I8(packed),
        };

        // As the f32 kernel plans its bands, a copied value being four channels' bytes.
        let band = Band::plan(&geometry, groups, vl, nv);
        let tap_offsets = band.tap_offsets(&geometry).iter().map(|t| 4 * t).collect();
        QuantConv {
            isa,
            geometry,
            sources: sources.to_vec(),
            parts,
            group_starts,
            weight_starts,
            band,
            tap_offsets,
            tile_channels: tc,
            weights: Arc::new(weights),
            correction: Arc::new(correction),
            factor: Arc::new(factor),
            bias: Arc::new(bias),
            stored_inputs: vec![false; sources.len()],
            output_quant: None,
            residual_quant: None,
            stored_residual: false,
        }
    }

    /// How convolved input `input` is quantised (None for the residual).
    pub(crate) fn source(&self, input: usize) -> Option<Source> {
        self.sources.get(input).copied()
    }

    /// Whether input slot `slot` is the residual.
    pub(crate) fn is_residual(&self, slot: usize) -> bool {
        self.geometry.residual && slot == self.geometry.channels.len()
    }

    /// This convolution with input `input` read already quantised with its source.
    pub(crate) fn with_stored_input(mut self, input: usize) -> QuantConv {
        self.stored_inputs[input] = true;
        self
    }

    /// This convolution with its output stored quantised with `quant`.
    pub(crate) fn with_stored_output(mut self, quant: Source) -> QuantConv {
        self.output_quant = Some(quant);
        self
    }

    /// This convolution with its residual rounded to 16 bits with `quant` before it is added.
    pub(crate) fn with_residual_quant(mut self, quant: Quant16) -> QuantConv {
        assert!(self.geometry.residual, "a residual to round");
        self.residual_quant = Some(quant);
        self
    }

    /// This convolution with its residual read as 16-bit words, stored with its `residual_quant`.
    pub(crate) fn with_stored_residual(mut self) -> QuantConv {
        assert!(self.residual_quant.is_some(), "the residual's quantisation");
        self.stored_residual = true;
        self
    }

    /// The output's fact: u8 or u16 when it is stored quantised, else f32.
    fn output_fact(&self) -> TypedFact {
        stored_fact(self.output_quant, self.geometry.output)
    }

    /// Computes the output from the convolved inputs (f32, or stored quantised as
    /// `stored_inputs` says) and the residual, if any.
    fn run(&self, inputs: &[Input], residual: Option<Input>, output: Output) {
        let [_, _, oh, _] = self.geometry.output;
        let len: usize = self.geometry.output.iter().product();
        assert_eq!(inputs.len(), self.geometry.channels.len());
        for (i, input) in inputs.iter().enumerate() {
            let want = match (self.stored_inputs[i], self.sources[i]) {
                (false, _) => matches!(input, Input::F32(_)),
                (true, Source::Bits8(_)) => matches!(input, Input::U8(_)),
                (true, Source::Bits16(_)) => matches!(input, Input::U16(_)),
            };
            assert!(want, "input {i}'s type");
        }
        assert_eq!(residual.is_some(), self.geometry.residual);
        // f32, or 16-bit words when it arrives stored.
        let residual = match residual {
            None => std::ptr::null(),
            Some(r) => {
                assert_eq!(r.len(), len);
                match (r, self.stored_residual) {
                    (Input::F32(r), false) => r.as_ptr().cast(),
                    (Input::U16(r), true) => r.as_ptr().cast(),
                    _ => panic!("the residual's type"),
                }
            }
        };
        let (base, values, fits) = match output {
            Output::F32(v) => (v.as_mut_ptr().cast(), v.len(), self.output_quant.is_none()),
            Output::U8(v) => (v.as_mut_ptr(), v.len(), matches!(self.output_quant, Some(Source::Bits8(_)))),
            Output::U16(v) => (v.as_mut_ptr().cast(), v.len(), matches!(self.output_quant, Some(Source::Bits16(_)))),
        };
        assert!(values == len && fits, "the output's length and type");
        let out = Out { base, residual };
        super::par_for(oh.div_ceil(self.band.rows_out), |task| {
            SCRATCH.with(|scratch| {
                let rows = &mut *scratch.borrow_mut();
                let y0 = task * self.band.rows_out;
                // SAFETY: the features were checked when this instruction set was chosen.
                unsafe { self.fill_fast(inputs, rows, y0) };
                // SAFETY: a `QuantConv` is built only for a supported instruction set; the copy
                // was sized and filled for this band; tasks write disjoint output rows.
                unsafe {
                    match self.isa {
                        #[cfg(target_arch = "x86_64")]
                        QIsa::Vnni512 => self.band_vnni512(rows, &out, y0),
                        #[cfg(target_arch = "x86_64")]
                        QIsa::AvxVnni => self.band_avxvnni(rows, &out, y0),
                        #[cfg(target_arch = "x86_64")]
                        QIsa::Avx2 => self.band_avx2(rows, &out, y0),
                        #[cfg(target_arch = "aarch64")]
                        QIsa::NeonDot => self.band_neondot(rows, &out, y0),
                        #[cfg(target_arch = "aarch64")]
                        QIsa::Neon => self.band_neon(rows, &out, y0),
                        QIsa::Scalar => self.band_scalar(rows, &out, y0),
                        #[allow(unreachable_patterns)]
                        other => unreachable!("{other:?} is not supported here, so never built"),
                    }
                }
            })
        });
    }

    /// `fill`, compiled for the vector instructions of this convolution's kernel, so that its
    /// rounding and conversions are single instructions (the baseline x86-64 has no rounding
    /// instruction and calls libm for each value).
    unsafe fn fill_fast(&self, inputs: &[Input], scratch: &mut Vec<u8>, y0: usize) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn avx512(op: &QuantConv, inputs: &[Input], scratch: &mut Vec<u8>, y0: usize) {
            op.fill(inputs, scratch, y0)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(op: &QuantConv, inputs: &[Input], scratch: &mut Vec<u8>, y0: usize) {
            op.fill(inputs, scratch, y0)
        }
        // SAFETY: the caller guarantees the kernel's features, which include these. (Not an
        // unsafe call on aarch64, where only the portable fill is left.)
        #[allow(unused_unsafe)]
        unsafe {
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                QIsa::Vnni512 => avx512(self, inputs, scratch, y0),
                #[cfg(target_arch = "x86_64")]
                QIsa::AvxVnni | QIsa::Avx2 => avx2(self, inputs, scratch, y0),
                _ => self.fill(inputs, scratch, y0),
            }
        }
    }

    /// Copies and quantises the input rows output rows `y0..` need into `scratch`: per group of
    /// four channels, per row, per pixel one 32-bit word of the four channels' values. Inputs
    /// that arrive as bytes are already quantised (with this part's parameters): they are
    /// copied, and pooled as bytes (quantisation is monotonic, so the maximum of the bytes is
    /// the byte of the maximum).
    #[inline(always)]
    fn fill(&self, inputs: &[Input], scratch: &mut Vec<u8>, y0: usize) {
        let g = &self.geometry;
        let w = g.input[1];
        let groups = self.groups();
        let group_len = self.band.channel_len * 4;
        if scratch.len() < groups * group_len {
            scratch.resize(groups * group_len, 0);
        }
        let flip: u8 = if self.isa.signed() { 0x80 } else { 0 };
        let flips = u32::from_ne_bytes([flip; 4]);
        let mut copies = scratch.chunks_exact_mut(group_len);
        for part in &self.parts {
            match inputs[part.input] {
                Input::F32(values) => {
                    let quant = (1.0 / part.scale, part.zero, part.max, part.shift);
                    self.fill_part(values, part, flips, &mut copies, y0, |rows, dst| {
                        #[cfg(target_arch = "x86_64")]
                        if self.isa == QIsa::Vnni512 {
                            // SAFETY: the kernel's features include AVX-512F and BW.
                            unsafe { quantise_quads_avx512(rows, g.pooled, w, quant, flips, dst) };
                            return;
                        }
                        quantise_quads(rows, g.pooled, w, quant, flips, dst)
                    })
                }
                Input::U8(bytes) => self.fill_part(bytes, part, flips, &mut copies, y0, |rows, dst| {
                    stored_quads(rows, g.pooled, w, part.zero_byte(), flips, dst, |v| v)
                }),
                Input::U16(words) => self.fill_part(words, part, flips, &mut copies, y0, |rows, dst| {
                    stored_quads(rows, g.pooled, w, part.zero_byte(), flips, dst, |v| (v >> part.shift) as u8)
                }),
            }
        }
    }

    /// `fill` for one part: its channels in groups of four (the last padded with its zero
    /// point), each row through `quads(the four channels' rows, the row's words)`.
    #[inline(always)]
    fn fill_part<'a, 'b, T>(
        &self,
        values: &[T],
        part: &Part,
        flips: u32,
        copies: &mut impl Iterator<Item = &'b mut [u8]>,
        y0: usize,
        quads: impl Fn([Option<&[T]>; 4], &mut [u32]),
    ) {
        let g = &self.geometry;
        let [h, w] = g.input;
        let b = self.band;
        let scale = if g.pooled { 2 } else { 1 };
        let plane = scale * h * scale * w;
        let padding = u32::from_le_bytes([part.zero_byte(); 4]) ^ flips;
        for channels in values.chunks(4 * plane) {
            let copy = copies.next().expect("the copy has every part's groups");
            for r in 0..b.rows {
                let row = &mut copy[r * b.row_len * 4..][..b.row_len * 4];
                let words = bytemuck_words(row);
                let iy = (y0 + r * b.image_step).checked_sub(g.pad[0]).filter(|y| *y < h);
                let Some(iy) = iy else {
                    words.fill(padding);
                    continue;
                };
                words[..g.pad[1]].fill(padding);
                words[g.pad[1] + w..].fill(padding);
                let dst = &mut words[g.pad[1]..][..w];
                let rows: [Option<&[T]>; 4] = std::array::from_fn(|i| {
                    channels
                        .get(i * plane..(i + 1) * plane)
                        .map(|p| &p[scale * iy * scale * w..][..scale * scale * w])
                });
                quads(rows, dst);
            }
        }
    }

    /// Output rows `y0..y0 + rows_out` (fewer at the bottom) tile by tile, with
    /// `tile(T, N, weights, tile index, first vector)` as the f32 kernel does.
    #[inline(always)]
    fn band<W: Copy, const VL: usize, const MT: usize, const NT: usize, const SINGLE: usize>(
        &self,
        weights: &[W],
        y0: usize,
        mut tile: impl FnMut(usize, usize, &[W], usize, usize),
    ) {
        let [_, m, oh, ow] = self.geometry.output;
        let per_row = ow.div_ceil(VL);
        let vectors = per_row * self.band.rows_out.min(oh - y0);
        let tc = self.tile_channels;
        let tiles = m.div_ceil(tc);
        let tile_weights = self.weight_groups() * self.tap_offsets.len() * tc * 4;
        let group = (WEIGHT_BUDGET / (tile_weights * size_of::<W>())).clamp(1, tiles);
        for first in (0..tiles).step_by(group) {
            let end = (first + group).min(tiles);
            let per_tile = if tc == MT { NT } else { SINGLE };
            for v in (0..vectors).step_by(per_tile) {
                let n = (vectors - v).min(per_tile);
                for t in first..end {
                    let w = &weights[t * tile_weights..][..tile_weights];
                    if tc == MT || n == SINGLE {
                        tile(tc, n, w, t, v);
                    } else {
                        (v..v + n).for_each(|v| tile(1, 1, w, t, v));
                    }
                }
            }
        }
    }

    fn weights_i8(&self) -> &[i8] {
        match &*self.weights {
            Packed::I8(w) => w,
            Packed::I16(_) => unreachable!("i8 weights are packed for every kernel but AVX2's"),
        }
    }

    /// For a tile of `T` channels by the `N` vectors from band vector `v`: each vector's byte
    /// offset in a group's copy, its first output in a plane, and how many of its `VL` pixels
    /// are inside the row. Checks that every load stays inside the copy and every weight read
    /// inside `weights`.
    #[inline(always)]
    fn vectors<const VL: usize, const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: usize,
        y0: usize,
        v: usize,
    ) -> ([usize; N], [usize; N], [usize; N]) {
        let [_, _, _, ow] = self.geometry.output;
        let groups = self.groups();
        let last_tap = *self.tap_offsets.last().expect("a kernel has taps");
        let per_row = ow.div_ceil(VL);
        let mut base = [0usize; N];
        let mut at = [0usize; N];
        let mut lanes = [0usize; N];
        for j in 0..N {
            let (r, x) = ((v + j) / per_row, ((v + j) % per_row) * VL);
            base[j] = (r * self.band.row_len + x) * 4;
            at[j] = (y0 + r) * ow + x;
            lanes[j] = (ow - x).min(VL);
        }
        assert!((groups - 1) * self.band.channel_len * 4 + base[N - 1] + last_tap + VL * 4 <= scratch.len());
        assert_eq!(weights, self.weight_groups() * self.tap_offsets.len() * T * 4);
        (base, at, lanes)
    }

    /// Groups of four channels in the copy (each part's channels start a new one).
    fn groups(&self) -> usize {
        *self.group_starts.last().expect("one start per input and the total")
    }

    /// Groups of four channels' weights in a tile (a 16-bit input's two bytes share theirs).
    fn weight_groups(&self) -> usize {
        *self.weight_starts.last().expect("one start per part and the total")
    }

    /// Where part `part`'s weights start in a tile of `T` channels, in weights.
    #[inline(always)]
    fn weight_start<const T: usize>(&self, part: usize) -> usize {
        self.weight_starts[part] * self.tap_offsets.len() * T * 4
    }

    /// Adds part `s`'s term for output channel `o` and one vector to `partial`: `sums` are the
    /// kernel's integer sums over that part's groups. The first part's term starts the sum.
    /// The order every path shares: `(sum + correction) as f32 * factor`, added part by part.
    #[inline(always)]
    fn term<const VL: usize>(&self, s: usize, o: usize, sums: [i32; VL], partial: &mut [f32; VL]) {
        let k = s * self.geometry.output[1] + o;
        let (correction, factor) = (self.correction[k], self.factor[k]);
        for l in 0..VL {
            let t = sums[l].wrapping_add(correction) as f32 * factor;
            partial[l] = if s == 0 { t } else { partial[l] + t };
        }
    }

    /// Adds part `part`'s terms for a tile's `T` output channels by `N` vectors to `partial`;
    /// `sums(i, j)` gives the kernel's integer sums for channel `i` and vector `j`.
    #[inline(always)]
    fn terms<const VL: usize, const T: usize, const N: usize>(
        &self,
        part: usize,
        tile: usize,
        partial: &mut [[[f32; VL]; N]; T],
        sums: impl Fn(usize, usize) -> [i32; VL],
    ) {
        let m = self.geometry.output[1];
        for (i, partial) in partial.iter_mut().enumerate() {
            let o = tile * T + i;
            if o >= m {
                break;
            }
            for (j, partial) in partial.iter_mut().enumerate() {
                self.term::<VL>(part, o, sums(i, j), partial);
            }
        }
    }

    /// Stores a tile's `T` output channels by `N` vectors (the `lanes[j]` pixels of each inside
    /// the row, from output `at[j]` of the plane): the parts' terms plus the bias, then the
    /// Relu, then the residual. The requantisation every path shares.
    #[inline(always)]
    unsafe fn store_tile<const VL: usize, const T: usize, const N: usize>(
        &self,
        out: &Out,
        tile: usize,
        at: [usize; N],
        lanes: [usize; N],
        partial: &[[[f32; VL]; N]; T],
    ) {
        let [_, m, oh, ow] = self.geometry.output;
        for (i, partial) in partial.iter().enumerate() {
            let o = tile * T + i;
            if o >= m {
                break;
            }
            let bias = self.bias[o];
            for j in 0..N {
                let mut r = [0f32; VL];
                for l in 0..VL {
                    r[l] = partial[j][l] + bias;
                    if self.geometry.relu {
                        r[l] = if r[l] > 0.0 { r[l] } else { 0.0 };
                    }
                }
                let (offset, n) = (o * oh * ow + at[j], lanes[j]);
                // SAFETY: lanes `at..at + n` are inside one output row, which only this task
                // writes, and inside the residual of the same shape.
                unsafe {
                    match (self.geometry.residual, self.residual_quant, self.stored_residual) {
                        (false, ..) => {}
                        (true, None, _) => {
                            let add = std::slice::from_raw_parts(out.residual.cast::<f32>().add(offset), n);
                            for l in 0..n {
                                r[l] += add[l];
                            }
                        }
                        (true, Some(q), false) => {
                            let add = std::slice::from_raw_parts(out.residual.cast::<f32>().add(offset), n);
                            for l in 0..n {
                                r[l] += q.dequantise(Source::Bits16(q).quantise(add[l]));
                            }
                        }
                        (true, Some(q), true) => {
                            let add = std::slice::from_raw_parts(out.residual.cast::<u16>().add(offset), n);
                            for l in 0..n {
                                r[l] += q.dequantise(add[l]);
                            }
                        }
                    }
                    // The VNNI-512 kernel's features include AVX-512F.
                    let avx512 = cfg!(target_arch = "x86_64") && self.isa == QIsa::Vnni512;
                    match self.output_quant {
                        None => std::slice::from_raw_parts_mut(out.base.cast::<f32>().add(offset), n).copy_from_slice(&r[..n]),
                        Some(q @ Source::Bits8(_)) => {
                            q.quantise_into(&r[..n], std::slice::from_raw_parts_mut(out.base.add(offset), n), avx512)
                        }
                        Some(q @ Source::Bits16(_)) => q.quantise_into(
                            &r[..n],
                            std::slice::from_raw_parts_mut(out.base.cast::<u16>().add(offset), n),
                            avx512,
                        ),
                    }
                }
            }
        }
    }

    unsafe fn band_scalar(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = SCALAR;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        self.band::<i8, { S.lanes }, { S.t }, { S.n }, { S.single }>(self.weights_i8(), y0, |tc, n, w, tile, v| {
            // SAFETY: as for this function.
            unsafe {
                match (tc, n) {
                    (T, _) => self.tile_scalar::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_scalar::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_scalar::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    /// Plain loops over the u8 copy (never the signed one).
    #[inline(always)]
    unsafe fn tile_scalar<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i8],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        const VL: usize = SCALAR.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let mut partial = [[[0f32; VL]; N]; T];
        for part in 0..self.parts.len() {
            let mut w = weights[self.weight_start::<T>(part)..].chunks_exact(4);
            let mut acc = [[[0i32; VL]; N]; T];
            for g in self.group_starts[part]..self.group_starts[part + 1] {
                let copy = &scratch[g * self.band.channel_len * 4..];
                for &off in &self.tap_offsets {
                    for acc in acc.iter_mut() {
                        let k = w.next().expect("sized by `vectors`");
                        for j in 0..N {
                            for l in 0..VL {
                                let x = &copy[base[j] + off + 4 * l..][..4];
                                acc[j][l] += (0..4).map(|i| x[i] as i32 * k[i] as i32).sum::<i32>();
                            }
                        }
                    }
                }
            }
            self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| acc[i][j]);
        }
        // SAFETY: as for this function.
        unsafe { self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial) };
    }
}

/// Writes one row of quads: pixel `x` gets the four channels' quantised bytes at `x` (of their
/// 2x2 maximum when `pooled`; `quantise_byte` with the four parameters), a missing channel the
/// zero point's byte, all XORed with `flips`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quantise_quads(
    rows: [Option<&[f32]>; 4],
    pooled: bool,
    w: usize,
    (inverse, zero, max, shift): (f32, i32, i32, u32),
    flips: u32,
    dst: &mut [u32],
) {
    let mut bytes = [[0u8; 64]; 4];
    for x0 in (0..w).step_by(64) {
        let n = (w - x0).min(64);
        for (c, row) in rows.iter().enumerate() {
            let Some(row) = row else {
                bytes[c][..n].fill(((zero >> shift) & 255) as u8);
                continue;
            };
            if pooled {
                let (above, below) = row.split_at(2 * w);
                for x in 0..n {
                    let i = 2 * (x0 + x);
                    // tract's order of comparisons, from f32::MIN, as the f32 kernel.
                    let v = f32::MIN.max(above[i]).max(above[i + 1]).max(below[i]).max(below[i + 1]);
                    bytes[c][x] = quantise_byte(inverse, zero, max, shift, v);
                }
            } else {
                for (b, &v) in bytes[c][..n].iter_mut().zip(&row[x0..x0 + n]) {
                    *b = quantise_byte(inverse, zero, max, shift, v);
                }
            }
        }
        for (x, d) in dst[x0..x0 + n].iter_mut().enumerate() {
            *d = u32::from_le_bytes([bytes[0][x], bytes[1][x], bytes[2][x], bytes[3][x]]) ^ flips;
        }
    }
}

/// Writes one row of quads from inputs already quantised (bytes, or 16-bit words): pixel `x`
/// gets the four channels' `byte` of the value at `x` (of their 2x2 maximum when `pooled`:
/// quantisation is monotonic, so the maximum of the quantised values is the quantised
/// maximum), a missing channel `zero`, all XORed with `flips`.
#[inline(always)]
fn stored_quads<T: Copy + Ord>(
    rows: [Option<&[T]>; 4],
    pooled: bool,
    w: usize,
    zero: u8,
    flips: u32,
    dst: &mut [u32],
    byte: impl Fn(T) -> u8,
) {
    let dst = &mut dst[..w];
    dst.fill(flips);
    for (c, row) in rows.iter().enumerate() {
        let shift = 8 * c as u32;
        match row {
            None => dst.iter_mut().for_each(|d| *d ^= (zero as u32) << shift),
            Some(row) if pooled => {
                let (above, below) = row.split_at(2 * w);
                let (above, below) = (&above[..2 * w], &below[..2 * w]);
                for (x, d) in dst.iter_mut().enumerate() {
                    let i = 2 * x;
                    *d ^= (byte(above[i].max(above[i + 1]).max(below[i]).max(below[i + 1])) as u32) << shift;
                }
            }
            Some(row) => {
                for (d, &v) in dst.iter_mut().zip(&row[..w]) {
                    *d ^= (byte(v) as u32) << shift;
                }
            }
        }
    }
}

/// `quantise_quads` 16 pixels at a time: the same operations in the same order (multiply,
/// clamp to +-(max + 1) with NaN to the low end, round to nearest even, add the zero point,
/// clamp to 0..=max, take the byte at `shift`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn quantise_quads_avx512(
    rows: [Option<&[f32]>; 4],
    pooled: bool,
    w: usize,
    (inverse, zero, max, shift): (f32, i32, i32, u32),
    flips: u32,
    dst: &mut [u32],
) {
    use std::arch::x86_64::*;
    assert!(dst.len() >= w);
    for row in rows.iter().flatten() {
        assert!(row.len() >= if pooled { 4 * w } else { w });
    }
    // SAFETY: loads and stores are masked to the `w` pixels of rows checked above.
    unsafe {
        let limit = (max + 1) as f32;
        let (low, high) = (_mm512_set1_ps(-limit), _mm512_set1_ps(limit));
        let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(max));
        let (inv, z) = (_mm512_set1_ps(inverse), _mm512_set1_epi32(zero));
        let (by, byte) = (_mm512_set1_epi32(shift as i32), _mm512_set1_epi32(255));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let flip = _mm512_set1_epi32(flips as i32);
        for x0 in (0..w).step_by(16) {
            let n = (w - x0).min(16);
            let lanes = mask16(n);
            let mut word = flip;
            for (c, row) in rows.iter().enumerate() {
                let q = match row {
                    None => z,
                    Some(row) => {
                        let v = if pooled {
                            // Pixels x0.. of the pooled row: 2x2 maxima of 2n source columns
                            // of the two rows.
                            let first = mask16(2 * n);
                            let second = mask16((2 * n).saturating_sub(16));
                            let pair = |r: usize| {
                                let at = row.as_ptr().add(r * 2 * w + 2 * x0);
                                let a = _mm512_maskz_loadu_ps(first, at);
                                let b = _mm512_maskz_loadu_ps(second, at.add(16));
                                _mm512_max_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
                            };
                            _mm512_max_ps(pair(0), pair(1))
                        } else {
                            _mm512_maskz_loadu_ps(lanes, row.as_ptr().add(x0))
                        };
                        let t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), low), high);
                        let q = _mm512_add_epi32(_mm512_cvtps_epi32(t), z);
                        _mm512_min_epi32(_mm512_max_epi32(q, floor), ceil)
                    }
                };
                let q = _mm512_and_si512(_mm512_srlv_epi32(q, by), byte);
                word = _mm512_xor_si512(word, _mm512_sllv_epi32(q, _mm512_set1_epi32(8 * c as i32)));
            }
            _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(x0).cast(), lanes, word);
        }
    }
}

/// The first `k` of 16 lanes (all for 16 or more).
#[cfg(target_arch = "x86_64")]
fn mask16(k: usize) -> u16 {
    if k >= 16 { u16::MAX } else { (1u16 << k) - 1 }
}

/// `bytes` (a copy row, 4-byte aligned by construction) as 32-bit words.
fn bytemuck_words(bytes: &mut [u8]) -> &mut [u32] {
    // SAFETY: u32 has no invalid bit patterns; align_to_mut puts only whole aligned words in
    // the middle part, and the scratch buffer's rows start at multiples of 4 bytes of a
    // buffer the allocator aligned.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u32>() };
    assert!(head.is_empty() && tail.is_empty(), "copy rows are whole aligned words");
    words
}

#[cfg(target_arch = "x86_64")]
impl QuantConv {
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn band_vnni512(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = VNNI512;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        self.band::<i8, { S.lanes }, { S.t }, { S.n }, { S.single }>(self.weights_i8(), y0, |tc, n, w, tile, v| {
            // SAFETY: the caller guarantees the features.
            unsafe {
                match (tc, n) {
                    (T, 3) => self.tile_vnni512::<{ S.t }, 3>(scratch, w, out, tile, y0, v),
                    (T, 2) => self.tile_vnni512::<{ S.t }, 2>(scratch, w, out, tile, y0, v),
                    (T, _) => self.tile_vnni512::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_vnni512::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_vnni512::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile_vnni512<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i8],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = VNNI512.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let w0 = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut partial = [[[0f32; VL]; N]; T];
            for part in 0..self.parts.len() {
                let mut w = w0.add(self.weight_start::<T>(part));
                let mut acc = [[_mm512_setzero_si512(); N]; T];
                for g in self.group_starts[part]..self.group_starts[part + 1] {
                    let copy = s.add(g * self.band.channel_len * 4);
                    for &off in &self.tap_offsets {
                        let mut x = [_mm512_setzero_si512(); N];
                        for j in 0..N {
                            x[j] = _mm512_loadu_si512(copy.add(base[j] + off).cast());
                        }
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let k = _mm512_set1_epi32(w.add(4 * i).cast::<i32>().read_unaligned());
                            for j in 0..N {
                                acc[j] = _mm512_dpbusd_epi32(acc[j], x[j], k);
                            }
                        }
                        w = w.add(4 * T);
                    }
                }
                self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| {
                    std::mem::transmute::<__m512i, [i32; VL]>(acc[i][j])
                });
            }
            self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial);
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn band_avxvnni(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = AVXVNNI;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        self.band::<i8, { S.lanes }, { S.t }, { S.n }, { S.single }>(self.weights_i8(), y0, |tc, n, w, tile, v| {
            // SAFETY: the caller guarantees the features.
            unsafe {
                match (tc, n) {
                    (T, 2) => self.tile_avxvnni::<{ S.t }, 2>(scratch, w, out, tile, y0, v),
                    (T, _) => self.tile_avxvnni::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_avxvnni::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_avxvnni::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn tile_avxvnni<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i8],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = AVXVNNI.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let w0 = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut partial = [[[0f32; VL]; N]; T];
            for part in 0..self.parts.len() {
                let mut w = w0.add(self.weight_start::<T>(part));
                let mut acc = [[_mm256_setzero_si256(); N]; T];
                for g in self.group_starts[part]..self.group_starts[part + 1] {
                    let copy = s.add(g * self.band.channel_len * 4);
                    for &off in &self.tap_offsets {
                        let mut x = [_mm256_setzero_si256(); N];
                        for j in 0..N {
                            x[j] = _mm256_loadu_si256(copy.add(base[j] + off).cast());
                        }
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let k = _mm256_set1_epi32(w.add(4 * i).cast::<i32>().read_unaligned());
                            for j in 0..N {
                                acc[j] = _mm256_dpbusd_avx_epi32(acc[j], x[j], k);
                            }
                        }
                        w = w.add(4 * T);
                    }
                }
                self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| {
                    std::mem::transmute::<__m256i, [i32; VL]>(acc[i][j])
                });
            }
            self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial);
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn band_avx2(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = AVX2;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        let Packed::I16(weights) = &*self.weights else {
            unreachable!("AVX2 weights are packed as i16")
        };
        self.band::<i16, { S.lanes }, { S.t }, { S.n }, { S.single }>(weights, y0, |tc, n, w, tile, v| {
            // SAFETY: the caller guarantees the features.
            unsafe {
                match (tc, n) {
                    (T, _) => self.tile_avx2::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_avx2::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_avx2::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    /// Each vector of 8 pixels is two halves of 4: 16 bytes widened to 16 i16, multiplied by
    /// the channel's four weights and added in pairs (`vpmaddwd`), so each i32 lane holds half
    /// a pixel's sum until the two halves are added at the end.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn tile_avx2<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i16],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = AVX2.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let w0 = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut partial = [[[0f32; VL]; N]; T];
            for part in 0..self.parts.len() {
                let mut w = w0.add(self.weight_start::<T>(part));
                let mut acc = [[[_mm256_setzero_si256(); 2]; N]; T];
                for g in self.group_starts[part]..self.group_starts[part + 1] {
                    let copy = s.add(g * self.band.channel_len * 4);
                    for &off in &self.tap_offsets {
                        let mut x = [[_mm256_setzero_si256(); 2]; N];
                        for j in 0..N {
                            for (h, x) in x[j].iter_mut().enumerate() {
                                *x = _mm256_cvtepu8_epi16(_mm_loadu_si128(copy.add(base[j] + off + 16 * h).cast()));
                            }
                        }
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let k = _mm256_set1_epi64x(w.add(4 * i).cast::<i64>().read_unaligned());
                            for j in 0..N {
                                for h in 0..2 {
                                    acc[j][h] = _mm256_add_epi32(acc[j][h], _mm256_madd_epi16(x[j][h], k));
                                }
                            }
                        }
                        w = w.add(4 * T);
                    }
                }
                self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| {
                    std::mem::transmute::<__m256i, [i32; VL]>(_mm256_permute4x64_epi64::<0b11_01_10_00>(
                        _mm256_hadd_epi32(acc[i][j][0], acc[i][j][1]),
                    ))
                });
            }
            self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial);
        }
    }
}

#[cfg(target_arch = "aarch64")]
impl QuantConv {
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn band_neondot(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = NEONDOT;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        self.band::<i8, { S.lanes }, { S.t }, { S.n }, { S.single }>(self.weights_i8(), y0, |tc, n, w, tile, v| {
            // SAFETY: the caller guarantees the features.
            unsafe {
                match (tc, n) {
                    (T, 3) => self.tile_neondot::<{ S.t }, 3>(scratch, w, out, tile, y0, v),
                    (T, 2) => self.tile_neondot::<{ S.t }, 2>(scratch, w, out, tile, y0, v),
                    (T, _) => self.tile_neondot::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_neondot::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_neondot::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    /// `sdot` by lane: one 16-byte load holds four output channels' weights for one group and
    /// tap, and each multiplies a vector of 4 pixels x 4 channels. Written as inline assembly:
    /// Rust's dot-product intrinsics are not stable.
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    unsafe fn tile_neondot<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i8],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::aarch64::*;
        const VL: usize = NEONDOT.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let w0 = weights.as_ptr();
        /// acc += x . (lane L of k), four bytes at a time.
        macro_rules! sdot {
            ($acc:expr, $x:expr, $k:expr, $lane:literal) => {
                std::arch::asm!(
                    concat!("sdot {acc:v}.4s, {x:v}.16b, {k:v}.4b[", $lane, "]"),
                    acc = inout(vreg) $acc,
                    x = in(vreg) $x,
                    k = in(vreg_low16) $k,
                    options(pure, nomem, nostack, preserves_flags)
                )
            };
        }
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut partial = [[[0f32; VL]; N]; T];
            for part in 0..self.parts.len() {
                let mut w = w0.add(self.weight_start::<T>(part));
                let mut acc = [[vdupq_n_s32(0); N]; T];
                for g in self.group_starts[part]..self.group_starts[part + 1] {
                    let copy = s.add(g * self.band.channel_len * 4);
                    for &off in &self.tap_offsets {
                        let mut x = [vdupq_n_s8(0); N];
                        for j in 0..N {
                            x[j] = vld1q_s8(copy.add(base[j] + off).cast());
                        }
                        if T == 1 {
                            let k = vreinterpretq_s8_s32(vld1q_dup_s32(w.cast()));
                            for j in 0..N {
                                sdot!(acc[0][j], x[j], k, "0");
                            }
                        } else {
                            for q in 0..T / 4 {
                                let k = vld1q_s8(w.add(16 * q));
                                for j in 0..N {
                                    sdot!(acc[4 * q][j], x[j], k, "0");
                                    sdot!(acc[4 * q + 1][j], x[j], k, "1");
                                    sdot!(acc[4 * q + 2][j], x[j], k, "2");
                                    sdot!(acc[4 * q + 3][j], x[j], k, "3");
                                }
                            }
                        }
                        w = w.add(4 * T);
                    }
                }
                self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| {
                    std::mem::transmute::<int32x4_t, [i32; VL]>(acc[i][j])
                });
            }
            self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial);
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn band_neon(&self, scratch: &[u8], out: &Out, y0: usize) {
        const S: Shape = NEON;
        const T: usize = S.t;
        const SINGLE: usize = S.single;
        self.band::<i8, { S.lanes }, { S.t }, { S.n }, { S.single }>(self.weights_i8(), y0, |tc, n, w, tile, v| {
            // SAFETY: the caller guarantees the features.
            unsafe {
                match (tc, n) {
                    (T, 2) => self.tile_neon::<{ S.t }, 2>(scratch, w, out, tile, y0, v),
                    (T, _) => self.tile_neon::<{ S.t }, 1>(scratch, w, out, tile, y0, v),
                    (_, SINGLE) => self.tile_neon::<1, { S.single }>(scratch, w, out, tile, y0, v),
                    _ => self.tile_neon::<1, 1>(scratch, w, out, tile, y0, v),
                }
            }
        })
    }

    /// Without dot products: `smull` multiplies 8 s8 pairs into i16 (at most 128 * 127, exact),
    /// `sadalp` adds neighbouring products into i32 lanes. Each i32 lane then holds half a
    /// pixel's sum (two of its four channels) until the halves are added at the end.
    #[target_feature(enable = "neon")]
    #[inline]
    unsafe fn tile_neon<const T: usize, const N: usize>(
        &self,
        scratch: &[u8],
        weights: &[i8],
        out: &Out,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::aarch64::*;
        const VL: usize = NEON.lanes;
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let w0 = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; NEON is part of aarch64.
        unsafe {
            let mut partial = [[[0f32; VL]; N]; T];
            for part in 0..self.parts.len() {
                let mut w = w0.add(self.weight_start::<T>(part));
                let mut acc = [[[vdupq_n_s32(0); 2]; N]; T];
                for g in self.group_starts[part]..self.group_starts[part + 1] {
                    let copy = s.add(g * self.band.channel_len * 4);
                    for &off in &self.tap_offsets {
                        let mut x = [vdupq_n_s8(0); N];
                        for j in 0..N {
                            x[j] = vld1q_s8(copy.add(base[j] + off).cast());
                        }
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let k = vreinterpretq_s8_s32(vld1q_dup_s32(w.add(4 * i).cast()));
                            for j in 0..N {
                                acc[j][0] = vpadalq_s16(acc[j][0], vmull_s8(vget_low_s8(x[j]), vget_low_s8(k)));
                                acc[j][1] = vpadalq_s16(acc[j][1], vmull_high_s8(x[j], k));
                            }
                        }
                        w = w.add(4 * T);
                    }
                }
                self.terms::<VL, T, N>(part, tile, &mut partial, |i, j| {
                    std::mem::transmute::<int32x4_t, [i32; VL]>(vpaddq_s32(acc[i][j][0], acc[i][j][1]))
                });
            }
            self.store_tile::<VL, T, N>(out, tile, at, lanes, &partial);
        }
    }
}

/// The fact of an activation stored quantised with `quant` (u8 or u16), or f32 (None).
pub(crate) fn stored_fact(quant: Option<Source>, shape: [usize; 4]) -> TypedFact {
    match quant {
        None => f32::fact(shape),
        Some(Source::Bits8(_)) => u8::fact(shape),
        Some(Source::Bits16(_)) => u16::fact(shape),
    }
}

/// An operator that makes its output row by row in f32, so that each row can be stored as it
/// is made: copied, or quantised with the output's [`Source`] (see [`stored_rows_output`]).
pub(crate) trait RowsOut {
    /// Every output row of `input`, each written into its place in `out` (the whole output) by
    /// `write(values, out_row)`.
    fn rows_into<T: Send + Sync>(&self, input: &[f32], out: &mut [T], write: impl Fn(&[f32], &mut [T]) + Sync)
    -> TractResult<()>;
}

/// `op`'s output of `shape` for `input`: f32, or stored quantised with `quant` (bytes or words).
pub(crate) fn stored_rows_output(op: &impl RowsOut, input: &[f32], quant: Option<Source>, shape: &[usize]) -> TractResult<Tensor> {
    let avx512 = super::avx512();
    // SAFETY (each): the element type has no invalid bit patterns, and `rows_into` writes every
    // row before the tensor is read.
    Ok(match quant {
        None => {
            let mut out = unsafe { Tensor::uninitialized::<f32>(shape)? };
            op.rows_into(input, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?, |r, o| o.copy_from_slice(r))?;
            out
        }
        Some(q @ Source::Bits8(_)) => {
            let mut out = unsafe { Tensor::uninitialized::<u8>(shape)? };
            op.rows_into(input, out.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?, |r, o| q.quantise_into(r, o, avx512))?;
            out
        }
        Some(q @ Source::Bits16(_)) => {
            let mut out = unsafe { Tensor::uninitialized::<u16>(shape)? };
            op.rows_into(input, out.try_as_plain_ram_mut()?.as_slice_mut::<u16>()?, |r, o| q.quantise_into(r, o, avx512))?;
            out
        }
    })
}

thread_local! {
    /// Each thread's quantised copy of the rows its current band reads.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Op for QuantConv {
    fn name(&self) -> StaticName {
        "QuantConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} {:?} -> {:?} kernel {:?} dilation {:?} relu {} residual {} inputs {:?} stored in {:?} out {:?} residual {:?} {}",
            self.isa,
            self.geometry.channels,
            self.geometry.output,
            self.geometry.kernel,
            self.geometry.dilation,
            self.geometry.relu,
            self.geometry.residual,
            self.sources,
            self.stored_inputs,
            self.output_quant,
            self.residual_quant,
            self.stored_residual
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        ensure!(inputs.len() == g.channels.len() + usize::from(g.residual));
        let [h, w] = g.input;
        let views = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let (convolved, residual) = views.split_at(g.channels.len());
        let convolved = convolved
            .iter()
            .zip(self.stored_inputs.iter().zip(&self.sources))
            .map(|(v, (&stored, source))| {
                Ok(match (stored, source) {
                    (false, _) => Input::F32(v.as_slice::<f32>()?),
                    (true, Source::Bits8(_)) => Input::U8(v.as_slice::<u8>()?),
                    (true, Source::Bits16(_)) => Input::U16(v.as_slice::<u16>()?),
                })
            })
            .collect::<TractResult<Vec<_>>>()?;
        let residual = match (residual.first(), self.stored_residual) {
            (None, _) => None,
            (Some(v), false) => Some(Input::F32(v.as_slice::<f32>()?)),
            (Some(v), true) => Some(Input::U16(v.as_slice::<u16>()?)),
        };
        let scale = if g.pooled { 4 } else { 1 };
        let len = g.output.iter().product::<usize>();
        if let Some(r) = residual {
            ensure!(r.len() == len, "residual of {} values", r.len());
        }
        for (s, c) in convolved.iter().zip(&g.channels) {
            ensure!(
                s.len() == scale * c * h * w,
                "input of {} values, expected {}",
                s.len(),
                scale * c * h * w
            );
        }
        let out = match self.output_quant {
            None => {
                // SAFETY: f32 has no invalid bit patterns, and `run` writes every element.
                let mut out = unsafe { Tensor::uninitialized::<f32>(&g.output)? };
                self.run(&convolved, residual, Output::F32(out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?));
                out
            }
            Some(Source::Bits8(_)) => {
                // SAFETY: as above, for u8.
                let mut out = unsafe { Tensor::uninitialized::<u8>(&g.output)? };
                self.run(&convolved, residual, Output::U8(out.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?));
                out
            }
            Some(Source::Bits16(_)) => {
                // SAFETY: as above, for u16.
                let mut out = unsafe { Tensor::uninitialized::<u16>(&g.output)? };
                self.run(&convolved, residual, Output::U16(out.try_as_plain_ram_mut()?.as_slice_mut::<u16>()?));
                out
            }
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_fact()))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain integer convolution every kernel must reproduce: the input quantised value by
    /// value, `sum((q - zero) * w)` in i64 over channel and tap (zero padding is `q = zero`),
    /// then the shared requantisation.
    #[allow(clippy::too_many_arguments)]
    fn reference(op: &QuantConv, input: &[f32], weights: &[f32], bias: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
        let g = &op.geometry;
        let c: usize = g.channels.iter().sum();
        let [h, w] = g.input;
        let [_, m, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let [dy, dx] = g.dilation;
        let [py, px] = g.pad;
        let plane = h * w;
        // Each input channel's input.
        let source: Vec<usize> = g
            .channels
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| std::iter::repeat_n(s, n))
            .collect();
        // Per input: its quantised values' range (255 or 65535), step and zero point.
        let format: Vec<(i32, f32, i32)> = op
            .sources
            .iter()
            .map(|s| match *s {
                Source::Bits8(q) => (255, q.scale, q.zero as i32),
                Source::Bits16(q) => (65535, q.scale, q.zero as i32),
            })
            .collect();
        let q: Vec<i32> = input
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let (max, scale, zero) = format[source[i / plane]];
                let limit = (max + 1) as f32;
                ((v * (1.0 / scale)).max(-limit).min(limit).round_ties_even() as i32 + zero).clamp(0, max)
            })
            .collect();
        // The terms each input's sum splits into: (shift, mask) of its quantised values, and
        // the step of one unit: one for 8 bits; the high and the low byte for 16.
        let terms = |s: usize| -> Vec<(u32, i32, f32)> {
            let (max, scale, _) = format[s];
            if max == 255 {
                vec![(0, 255, scale)]
            } else {
                vec![(8, 255, 256.0 * scale), (0, 255, scale)]
            }
        };
        // The weights as the operator quantises them: per output channel and input.
        let (qw, scales) = quantise_weights_by_input(weights, m, &g.channels, kh * kw);
        let mut out = vec![0f32; m * oh * ow];
        for o in 0..m {
            for y in 0..oh {
                for x in 0..ow {
                    // Input by input, term by term, in order, then the bias.
                    let mut r = 0f32;
                    let mut first = true;
                    for s in 0..g.channels.len() {
                        for (shift, mask, step) in terms(s) {
                            let mut sum = 0i64;
                            for i in (0..c).filter(|&i| source[i] == s) {
                                for ky in 0..kh {
                                    for kx in 0..kw {
                                        let iy = (y + ky * dy) as isize - py as isize;
                                        let ix = (x + kx * dx) as isize - px as isize;
                                        let zero = format[s].2;
                                        let v = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                            zero
                                        } else {
                                            q[(i * h + iy as usize) * w + ix as usize]
                                        };
                                        let v = ((v >> shift) & mask) - ((zero >> shift) & mask);
                                        sum += (v * qw[((o * c + i) * kh + ky) * kw + kx] as i32) as i64;
                                    }
                                }
                            }
                            let t = sum as i32 as f32 * (step * scales[s * m + o]);
                            r = if first { t } else { r + t };
                            first = false;
                        }
                    }
                    r += bias[o];
                    if g.relu {
                        r = if r > 0.0 { r } else { 0.0 };
                    }
                    if let Some(add) = residual {
                        r += add[(o * oh + y) * ow + x];
                    }
                    out[(o * oh + y) * ow + x] = r;
                }
            }
        }
        out
    }

    /// Shapes that reach every path (partial vectors, one and several rows per task, tiles of
    /// 1..N vectors, output channels past the last full tile and single-channel tiles, channel
    /// counts that are not a multiple of 4, concatenated inputs of two and three ranges,
    /// dilation, uneven padding, a max pool read through, a residual, rows that overflow an i16
    /// pair), on every instruction set this CPU has: bit for bit against the plain reference.
    /// Each case runs twice: f32 in and out, and with its inputs arriving quantised (bytes, or
    /// 16-bit words) and its output stored quantised (the reference's output, quantised).
    #[test]
    fn every_kernel_matches_the_plain_integer_convolution() {
        let isas: Vec<QIsa> = QIsa::ALL.into_iter().filter(|i| i.supported()).collect();
        let arm = |i: &QIsa| matches!(i, QIsa::NeonDot | QIsa::Neon);
        for isa in QIsa::ALL
            .into_iter()
            .filter(|i| !i.supported() && *i != QIsa::Scalar && arm(i) == cfg!(target_arch = "aarch64"))
        {
            crate::test_note(&format!("the int8 {isa:?} kernel is not tested here: this CPU lacks it"));
        }
        struct Case {
            channels: &'static [usize],
            input: [usize; 2],
            pooled: bool,
            m: usize,
            kernel: [usize; 2],
            dilation: [usize; 2],
            before: [usize; 2],
            after: [usize; 2],
            relu: bool,
            residual: bool,
        }
        let case = |channels, input, m, kernel, dilation, before, after, relu| Case {
            channels,
            input,
            pooled: false,
            m,
            kernel,
            dilation,
            before,
            after,
            relu,
            residual: false,
        };
        let cases = [
            case(&[16], [48, 48], 16, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[5, 11], [20, 37], 13, [3, 3], [1, 1], [1, 1], [1, 1], false),
            case(&[3, 6], [17, 33], 9, [3, 3], [2, 2], [2, 2], [2, 2], true),
            case(&[7], [40, 64], 24, [3, 3], [8, 8], [8, 8], [8, 8], true),
            case(&[3], [9, 19], 64, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[6], [12, 50], 8, [1, 1], [1, 1], [0, 0], [0, 0], true),
            case(&[4], [10, 21], 8, [5, 3], [1, 2], [1, 0], [3, 4], false),
            case(&[9, 3], [30, 70], 1, [3, 3], [1, 1], [1, 1], [1, 1], false),
            case(&[4, 7, 2], [23, 41], 12, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[5], [7, 20], 3, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[6], [100, 40], 8, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[4], [150, 48], 16, [3, 3], [2, 2], [2, 2], [2, 2], false),
            Case {
                pooled: true,
                ..case(&[6], [21, 40], 16, [3, 3], [1, 1], [1, 1], [1, 1], true)
            },
            case(&[256], [60, 300], 8, [3, 3], [1, 1], [1, 1], [1, 1], true),
            Case {
                residual: true,
                ..case(&[8], [30, 50], 16, [3, 3], [1, 1], [1, 1], [1, 1], true)
            },
            Case {
                residual: true,
                ..case(&[3, 5], [19, 33], 10, [3, 3], [2, 2], [2, 2], [2, 2], false)
            },
        ];
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (number, case) in cases.into_iter().enumerate() {
            let Case {
                channels,
                input: [h, w],
                pooled,
                m,
                kernel,
                dilation,
                before,
                after,
                relu,
                residual,
            } = case;
            let c: usize = channels.iter().sum();
            let oh = h + before[0] + after[0] - dilation[0] * (kernel[0] - 1);
            let ow = w + before[1] + after[1] - dilation[1] * (kernel[1] - 1);
            let scale = if pooled { 2 } else { 1 };
            // Values past both ends of the range, so clamping is exercised too.
            let source: Vec<f32> = (0..c * scale * h * scale * w).map(|_| 3.0 * next() + 0.6).collect();
            let input: Vec<f32> = if pooled {
                (0..c * h * w)
                    .map(|i| {
                        let (plane, y, x) = (i / (h * w), (i / w) % h, i % w);
                        let at = |dy: usize, dx: usize| source[(plane * 2 * h + 2 * y + dy) * 2 * w + 2 * x + dx];
                        f32::MIN.max(at(0, 0)).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
                    })
                    .collect()
            } else {
                source.clone()
            };
            let weights: Vec<f32> = (0..m * c * kernel[0] * kernel[1]).map(|_| next()).collect();
            let bias: Vec<f32> = (0..m).map(|_| next()).collect();
            let added: Vec<f32> = (0..m * oh * ow).map(|_| next()).collect();
            let geometry = Geometry {
                channels: channels.to_vec(),
                input: [h, w],
                pooled,
                output: [1, m, oh, ow],
                kernel,
                dilation,
                pad: before,
                relu,
                residual,
            };
            // Each input its own range (a concatenation's parts differ); then again with every
            // other input (the first of one) in 16 bits.
            for wide in [false, true] {
                let quant: Vec<Source> = (0..channels.len())
                    .map(|i| {
                        let (lo, hi) = (-0.4 + 0.3 * i as f32, 1.3 - 0.4 * i as f32);
                        if wide && i % 2 == 0 {
                            Source::Bits16(Quant16::covering(lo, hi))
                        } else {
                            Source::Bits8(Quant::covering(lo, hi))
                        }
                    })
                    .collect();
                let mut want = None;
                // With 16-bit inputs, the residual is rounded to 16 bits too (and arrives
                // stored as 16-bit words when the inputs do).
                let residual_quant = Quant16::covering(-0.5, 0.5);
                let added16: Vec<u16> = added.iter().map(|&v| Source::Bits16(residual_quant).quantise(v)).collect();
                let added_back: Vec<f32> = added16.iter().map(|&q| residual_quant.dequantise(q)).collect();
                // The source's inputs (before any pooling), one slice each.
                let parts = super::super::split_inputs(&source, channels, scale * h * scale * w);
                // The inputs quantised as the layer before would store them.
                let stored: Vec<Vec<u16>> = parts
                    .iter()
                    .zip(&quant)
                    .map(|(part, q)| part.iter().map(|&v| q.quantise(v)).collect())
                    .collect();
                let bytes: Vec<Vec<u8>> = stored.iter().map(|s| s.iter().map(|&v| v as u8).collect()).collect();
                let out_quant = if wide {
                    Source::Bits16(Quant16::covering(-1.5, 2.5))
                } else {
                    Source::Bits8(Quant::covering(-1.5, 2.5))
                };
                let residual16 = residual && wide;
                for &isa in &isas {
                    let want = want.get_or_insert_with(|| {
                        let op = QuantConv::new(isa, geometry.clone(), &weights, bias.clone(), &quant);
                        let added = if residual16 { &added_back } else { &added };
                        reference(&op, &input, &weights, &bias, residual.then_some(&added[..]))
                    });
                    let want_stored: Vec<u16> = want.iter().map(|&v| out_quant.quantise(v)).collect();
                    // f32 in and out; then the inputs and the output (and a 16-bit residual)
                    // stored quantised.
                    for store in [false, true] {
                        let mut op = QuantConv::new(isa, geometry.clone(), &weights, bias.clone(), &quant);
                        let mut inputs: Vec<Input> = parts.iter().map(|p| Input::F32(p)).collect();
                        if residual16 {
                            op = op.with_residual_quant(residual_quant);
                            if store {
                                op = op.with_stored_residual();
                            }
                        }
                        if store {
                            op = op.with_stored_output(out_quant);
                            for (i, q) in quant.iter().enumerate() {
                                op = op.with_stored_input(i);
                                inputs[i] = match q {
                                    Source::Bits8(_) => Input::U8(&bytes[i]),
                                    Source::Bits16(_) => Input::U16(&stored[i]),
                                };
                            }
                        }
                        let residual = match (residual, residual16 && store) {
                            (false, _) => None,
                            (true, false) => Some(Input::F32(&added[..])),
                            (true, true) => Some(Input::U16(&added16[..])),
                        };
                        let differing = if store && wide {
                            let mut out = vec![0xa5a5u16; m * oh * ow];
                            op.run(&inputs, residual, Output::U16(&mut out));
                            out.iter().zip(&want_stored).filter(|(a, b)| a != b).count()
                        } else if store {
                            let mut out = vec![0xa5u8; m * oh * ow];
                            op.run(&inputs, residual, Output::U8(&mut out));
                            out.iter().zip(&want_stored).filter(|(a, b)| **a as u16 != **b).count()
                        } else {
                            let mut out = vec![f32::NAN; m * oh * ow];
                            op.run(&inputs, residual, Output::F32(&mut out));
                            out.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
                        };
                        assert_eq!(
                            differing,
                            0,
                            "case {number} (16 bits: {wide}, stored: {store}) on {isa:?}: {differing} of {} outputs differ",
                            m * oh * ow
                        );
                    }
                }
            }
        }
    }

    /// Zero is exact (the padding), the range's ends land on 0 and 255, and out-of-range,
    /// infinite and NaN values clamp the same way on every path.
    #[test]
    fn quantisation_keeps_zero_exact_and_clamps() {
        let q = Quant::covering(-1.0, 3.0);
        let inverse = 1.0 / q.scale;
        let zero = q.zero as i32;
        assert_eq!(Quant::quantise(inverse, zero, 0.0), q.zero);
        assert_eq!(Quant::quantise(inverse, zero, -1.0), 0);
        assert_eq!(Quant::quantise(inverse, zero, 3.0), 255);
        assert_eq!(Quant::quantise(inverse, zero, 1e30), 255);
        assert_eq!(Quant::quantise(inverse, zero, f32::INFINITY), 255);
        assert_eq!(Quant::quantise(inverse, zero, f32::NEG_INFINITY), 0);
        assert_eq!(Quant::quantise(inverse, zero, f32::NAN), 0);
        let relu = Quant::covering(0.0, 2.0);
        assert_eq!(relu.zero, 0);
    }
}
