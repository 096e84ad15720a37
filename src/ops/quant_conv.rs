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
//! - **Requantisation.** One fixed order of f32 operations on every path, never fused:
//!   `((sum - zero * wsum) as f32 * (scale * wscale)) + bias`, then the Relu, then the residual.
//!   So the outputs, and the masks, are bit-identical across instruction sets and architectures.
//!
//! The outputs stay f32: the next layer quantises with its own range as it copies.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::direct_conv::{Band, Geometry, SharedOut, WEIGHT_BUDGET};

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
        let t = (v * inverse).max(-256.0).min(256.0);
        (t.round_ties_even() as i32 + zero).clamp(0, 255) as u8
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
const VNNI512: Shape = Shape { lanes: 16, t: 8, n: 3, single: 8 };
const AVXVNNI: Shape = Shape { lanes: 8, t: 6, n: 2, single: 6 };
const AVX2: Shape = Shape { lanes: 8, t: 6, n: 1, single: 6 };
const NEONDOT: Shape = Shape { lanes: 4, t: 8, n: 3, single: 8 };
const NEON: Shape = Shape { lanes: 4, t: 4, n: 2, single: 8 };
const SCALAR: Shape = Shape { lanes: 4, t: 4, n: 1, single: 4 };

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
    /// Per input channel: how it is quantised (each concatenated input has its own range).
    inputs: Vec<Quant>,
    band: Band,
    /// Per tap (ky, kx): its byte offset in a group's copy.
    tap_offsets: Vec<usize>,
    tile_channels: usize,
    weights: Arc<Packed>,
    /// Per output channel: what turns the kernel's sum into `sum((q - zero) * w)`, the f32
    /// factor (input scale times weight scale), and the bias.
    correction: Arc<Vec<i32>>,
    factor: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
}

impl Eq for QuantConv {}

/// Per-output-channel symmetric s8 weights of `weights` ([M][K]): the values (in -127..=127)
/// and their scales.
pub fn quantise_weights(weights: &[f32], m: usize) -> (Vec<i8>, Vec<f32>) {
    let k = weights.len() / m;
    let mut q = Vec::with_capacity(weights.len());
    let mut scales = Vec::with_capacity(m);
    for row in weights.chunks_exact(k) {
        let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        q.extend(row.iter().map(|v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8));
        scales.push(scale);
    }
    (q, scales)
}

impl QuantConv {
    /// `sources` has one [`Quant`] per input (concatenated in `geometry.channels`' order).
    /// Inputs with different ranges keep their own steps: each channel's weights are scaled by
    /// its input's step over the largest step before they are quantised, so one integer sum
    /// and one factor per output channel still hold.
    pub(crate) fn new(isa: QIsa, geometry: Geometry, weights: &[f32], bias: Vec<f32>, sources: &[Quant]) -> QuantConv {
        assert_eq!(sources.len(), geometry.channels.len(), "one range per input");
        let m = geometry.output[1];
        let c: usize = geometry.channels.iter().sum();
        let groups = c.div_ceil(4);
        let [kh, kw] = geometry.kernel;
        let taps = kh * kw;
        let Shape { lanes: vl, t: mt, n: nv, .. } = isa.shape();
        let tc = if m < mt { 1 } else { mt };
        let inputs: Vec<Quant> = geometry
            .channels
            .iter()
            .zip(sources)
            .flat_map(|(&n, &q)| std::iter::repeat_n(q, n))
            .collect();
        let step = sources.iter().fold(0f32, |a, q| a.max(q.scale));
        let folded: Vec<f32> = weights
            .chunks_exact(taps)
            .enumerate()
            .flat_map(|(i, per_in)| {
                let ratio = inputs[i % c].scale / step;
                per_in.iter().map(move |w| if ratio == 1.0 { *w } else { w * ratio })
            })
            .collect();
        let (q, scales) = quantise_weights(&folded, m);
        let mut packed = vec![0i8; m.div_ceil(tc) * groups * taps * tc * 4];
        let offset = if isa.signed() { 128 } else { 0 };
        let mut correction = vec![0i32; m];
        for (o, per_out) in q.chunks_exact(c * taps).enumerate() {
            for (i, per_in) in per_out.chunks_exact(taps).enumerate() {
                for (t, &v) in per_in.iter().enumerate() {
                    packed[((((o / tc) * groups + i / 4) * taps + t) * tc + o % tc) * 4 + i % 4] = v;
                    correction[o] += (offset - inputs[i].zero as i32) * v as i32;
                }
            }
        }
        let factor = scales.iter().map(|s| step * s).collect();
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
            inputs,
            band,
            tap_offsets,
            tile_channels: tc,
            weights: Arc::new(weights),
            correction: Arc::new(correction),
            factor: Arc::new(factor),
            bias: Arc::new(bias),
        }
    }

    /// Computes the output from the inputs (the convolved ones, then the residual if any).
    fn run(&self, inputs: &[&[f32]], out: &mut [f32]) {
        let [_, _, oh, _] = self.geometry.output;
        let (inputs, residual) = if self.geometry.residual {
            let (last, convolved) = inputs.split_last().expect("the residual is an input");
            assert_eq!(last.len(), out.len());
            (convolved, last.as_ptr())
        } else {
            (inputs, std::ptr::null())
        };
        let out = SharedOut(out.as_mut_ptr(), residual);
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
    unsafe fn fill_fast(&self, inputs: &[&[f32]], scratch: &mut Vec<u8>, y0: usize) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw")]
        unsafe fn avx512(op: &QuantConv, inputs: &[&[f32]], scratch: &mut Vec<u8>, y0: usize) {
            op.fill(inputs, scratch, y0)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(op: &QuantConv, inputs: &[&[f32]], scratch: &mut Vec<u8>, y0: usize) {
            op.fill(inputs, scratch, y0)
        }
        // SAFETY: the caller guarantees the kernel's features, which include these.
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
    /// four channels, per row, per pixel one 32-bit word of the four channels' values.
    #[inline(always)]
    fn fill(&self, inputs: &[&[f32]], scratch: &mut Vec<u8>, y0: usize) {
        let g = &self.geometry;
        let [h, w] = g.input;
        let b = self.band;
        let scale = if g.pooled { 2 } else { 1 };
        let plane = scale * h * scale * w;
        let mut planes: Vec<&[f32]> = Vec::with_capacity(g.channels.iter().sum());
        for input in inputs {
            planes.extend(input.chunks_exact(plane));
        }
        let groups = planes.len().div_ceil(4);
        let group_len = b.channel_len * 4;
        if scratch.len() < groups * group_len {
            scratch.resize(groups * group_len, 0);
        }
        let flip: u8 = if self.isa.signed() { 0x80 } else { 0 };
        let flips = u32::from_ne_bytes([flip; 4]);
        for (group, copy) in scratch.chunks_exact_mut(group_len).take(groups).enumerate() {
            let channels = &planes[group * 4..planes.len().min(group * 4 + 4)];
            // Per channel of the group; channels past the last hold the zero point of the last.
            let quant: [Quant; 4] = std::array::from_fn(|i| self.inputs[(group * 4 + i).min(planes.len() - 1)]);
            let padding = u32::from_le_bytes(quant.map(|q| q.zero)) ^ flips;
            let inverse = quant.map(|q| 1.0 / q.scale);
            let zero = quant.map(|q| q.zero as i32);
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
                let rows: [Option<&[f32]>; 4] =
                    std::array::from_fn(|i| channels.get(i).map(|p| &p[scale * iy * scale * w..][..scale * scale * w]));
                #[cfg(target_arch = "x86_64")]
                if self.isa == QIsa::Vnni512 {
                    // SAFETY: the kernel's features include AVX-512F and BW.
                    unsafe { quantise_quads_avx512(rows, g.pooled, w, inverse, zero, flips, dst) };
                    continue;
                }
                quantise_quads(rows, g.pooled, w, inverse, zero, flips, dst);
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
        let c: usize = self.geometry.channels.iter().sum();
        let per_row = ow.div_ceil(VL);
        let vectors = per_row * self.band.rows_out.min(oh - y0);
        let tc = self.tile_channels;
        let tiles = m.div_ceil(tc);
        let tile_weights = c.div_ceil(4) * self.tap_offsets.len() * tc * 4;
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
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
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
        assert_eq!(weights, groups * self.tap_offsets.len() * T * 4);
        (base, at, lanes)
    }

    /// Stores output channel `o` for one vector: `sums` are the kernel's, `n` of them inside the
    /// row, from output `at` of the plane. The requantisation every path shares.
    #[inline(always)]
    unsafe fn store<const VL: usize>(&self, out: &SharedOut, o: usize, at: usize, n: usize, sums: [i32; VL]) {
        let [_, _, oh, ow] = self.geometry.output;
        let (correction, factor, bias) = (self.correction[o], self.factor[o], self.bias[o]);
        let mut r = [0f32; VL];
        for l in 0..VL {
            r[l] = sums[l].wrapping_add(correction) as f32 * factor + bias;
            if self.geometry.relu {
                r[l] = if r[l] > 0.0 { r[l] } else { 0.0 };
            }
        }
        let offset = o * oh * ow + at;
        // SAFETY: lanes `at..at + n` are inside one output row, which only this task writes,
        // and inside the residual of the same shape.
        unsafe {
            if self.geometry.residual {
                let add = std::slice::from_raw_parts(out.1.add(offset), n);
                for l in 0..n {
                    r[l] += add[l];
                }
            }
            std::slice::from_raw_parts_mut(out.0.add(offset), n).copy_from_slice(&r[..n]);
        }
    }

    unsafe fn band_scalar(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        const VL: usize = SCALAR.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let mut acc = [[[0i32; VL]; N]; T];
        let mut w = weights.chunks_exact(4);
        for g in 0..groups {
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
        for (i, acc) in acc.iter().enumerate() {
            let o = tile * T + i;
            if o >= m {
                break;
            }
            for j in 0..N {
                // SAFETY: as for this function.
                unsafe { self.store::<VL>(out, o, at[j], lanes[j], acc[j]) };
            }
        }
    }
}

/// Writes one row of quads: pixel `x` gets the four channels' quantised values at `x` (their
/// 2x2 maximum when `pooled`), a missing channel the zero point, all XORed with `flips`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn quantise_quads(
    rows: [Option<&[f32]>; 4],
    pooled: bool,
    w: usize,
    inverse: [f32; 4],
    zero: [i32; 4],
    flips: u32,
    dst: &mut [u32],
) {
    let mut bytes = [[0u8; 64]; 4];
    for x0 in (0..w).step_by(64) {
        let n = (w - x0).min(64);
        for (c, row) in rows.iter().enumerate() {
            let (inverse, zero) = (inverse[c], zero[c]);
            let Some(row) = row else {
                bytes[c][..n].fill(zero as u8);
                continue;
            };
            if pooled {
                let (above, below) = row.split_at(2 * w);
                for x in 0..n {
                    let i = 2 * (x0 + x);
                    // tract's order of comparisons, from f32::MIN, as the f32 kernel.
                    let v = f32::MIN.max(above[i]).max(above[i + 1]).max(below[i]).max(below[i + 1]);
                    bytes[c][x] = Quant::quantise(inverse, zero, v);
                }
            } else {
                for (b, &v) in bytes[c][..n].iter_mut().zip(&row[x0..x0 + n]) {
                    *b = Quant::quantise(inverse, zero, v);
                }
            }
        }
        for (x, d) in dst[x0..x0 + n].iter_mut().enumerate() {
            *d = u32::from_le_bytes([bytes[0][x], bytes[1][x], bytes[2][x], bytes[3][x]]) ^ flips;
        }
    }
}

/// `quantise_quads` 16 pixels at a time: the same operations in the same order (multiply,
/// clamp to +-256 with NaN to -256, round to nearest even, add the zero point, clamp to 0..=255).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn quantise_quads_avx512(
    rows: [Option<&[f32]>; 4],
    pooled: bool,
    w: usize,
    inverse: [f32; 4],
    zero: [i32; 4],
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
        let (low, high) = (_mm512_set1_ps(-256.0), _mm512_set1_ps(256.0));
        let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let flip = _mm512_set1_epi32(flips as i32);
        for x0 in (0..w).step_by(16) {
            let n = (w - x0).min(16);
            let lanes = mask16(n);
            let mut word = flip;
            for (c, row) in rows.iter().enumerate() {
                let (inv, z) = (_mm512_set1_ps(inverse[c]), _mm512_set1_epi32(zero[c]));
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
    unsafe fn band_vnni512(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = VNNI512.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); N]; T];
            for g in 0..groups {
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
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                for j in 0..N {
                    self.store::<VL>(out, o, at[j], lanes[j], std::mem::transmute::<__m512i, [i32; VL]>(acc[j]));
                }
            }
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn band_avxvnni(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = AVXVNNI.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut acc = [[_mm256_setzero_si256(); N]; T];
            for g in 0..groups {
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
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                for j in 0..N {
                    self.store::<VL>(out, o, at[j], lanes[j], std::mem::transmute::<__m256i, [i32; VL]>(acc[j]));
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn band_avx2(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        const VL: usize = AVX2.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees the features.
        unsafe {
            let mut acc = [[[_mm256_setzero_si256(); 2]; N]; T];
            for g in 0..groups {
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
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                for j in 0..N {
                    // [p0 p1 p4 p5 | p2 p3 p6 p7] -> p0..p7.
                    let sums = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(acc[j][0], acc[j][1]));
                    self.store::<VL>(out, o, at[j], lanes[j], std::mem::transmute::<__m256i, [i32; VL]>(sums));
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
impl QuantConv {
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn band_neondot(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::aarch64::*;
        const VL: usize = NEONDOT.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
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
            let mut acc = [[vdupq_n_s32(0); N]; T];
            for g in 0..groups {
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
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                for j in 0..N {
                    self.store::<VL>(out, o, at[j], lanes[j], std::mem::transmute::<int32x4_t, [i32; VL]>(acc[j]));
                }
            }
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn band_neon(&self, scratch: &[u8], out: &SharedOut, y0: usize) {
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
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::aarch64::*;
        const VL: usize = NEON.lanes;
        let m = self.geometry.output[1];
        let groups = self.geometry.channels.iter().sum::<usize>().div_ceil(4);
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights.len(), y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; NEON is part of aarch64.
        unsafe {
            let mut acc = [[[vdupq_n_s32(0); 2]; N]; T];
            for g in 0..groups {
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
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                for j in 0..N {
                    let sums = vpaddq_s32(acc[j][0], acc[j][1]);
                    self.store::<VL>(out, o, at[j], lanes[j], std::mem::transmute::<int32x4_t, [i32; VL]>(sums));
                }
            }
        }
    }
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
            "{:?} {:?} -> {:?} kernel {:?} dilation {:?} relu {} residual {} first input {:?}",
            self.isa,
            self.geometry.channels,
            self.geometry.output,
            self.geometry.kernel,
            self.geometry.dilation,
            self.geometry.relu,
            self.geometry.residual,
            self.inputs[0]
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
        let slices = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        let scale = if g.pooled { 4 } else { 1 };
        if g.residual {
            let len = slices.last().map_or(0, |s| s.len());
            ensure!(len == g.output.iter().product::<usize>(), "residual of {len} values");
        }
        for (s, c) in slices.iter().zip(&g.channels) {
            ensure!(s.len() == scale * c * h * w, "input of {} values, expected {}", s.len(), scale * c * h * w);
        }
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every element.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&g.output)? };
        self.run(&slices, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.geometry.output)))
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
        let q: Vec<i32> = input
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let quant = op.inputs[i / plane];
                Quant::quantise(1.0 / quant.scale, quant.zero as i32, v) as i32
            })
            .collect();
        // The weights as the operator folds them: scaled by the input's step over the largest.
        let step = op.inputs.iter().fold(0f32, |a, q| a.max(q.scale));
        let taps = kh * kw;
        let folded: Vec<f32> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let ratio = op.inputs[(i / taps) % c].scale / step;
                if ratio == 1.0 { w } else { w * ratio }
            })
            .collect();
        let (qw, scales) = quantise_weights(&folded, m);
        let mut out = vec![0f32; m * oh * ow];
        for o in 0..m {
            for y in 0..oh {
                for x in 0..ow {
                    let mut s = 0i64;
                    for i in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y + ky * dy) as isize - py as isize;
                                let ix = (x + kx * dx) as isize - px as isize;
                                let zero = op.inputs[i].zero as i32;
                                let v = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    zero
                                } else {
                                    q[(i * h + iy as usize) * w + ix as usize]
                                };
                                s += ((v - zero) * qw[((o * c + i) * kh + ky) * kw + kx] as i32) as i64;
                            }
                        }
                    }
                    let mut r = s as i32 as f32 * (step * scales[o]) + bias[o];
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
    /// counts that are not a multiple of 4 and groups spanning two concatenated inputs,
    /// dilation, uneven padding, a max pool read through, a residual, rows that overflow an i16
    /// pair), on every instruction set this CPU has: bit for bit against the plain reference.
    #[test]
    fn every_kernel_matches_the_plain_integer_convolution() {
        let isas: Vec<QIsa> = QIsa::ALL.into_iter().filter(|i| i.supported()).collect();
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
            // Each input its own range (a concatenation's parts differ).
            let quant: Vec<Quant> = (0..channels.len())
                .map(|i| Quant::covering(-0.4 + 0.3 * i as f32, 1.3 - 0.4 * i as f32))
                .collect();
            let mut want = None;
            for &isa in &isas {
                let op = QuantConv::new(isa, geometry.clone(), &weights, bias.clone(), &quant);
                let want = want.get_or_insert_with(|| reference(&op, &input, &weights, &bias, residual.then_some(&added[..])));
                let mut parts: Vec<&[f32]> = {
                    let mut rest = &source[..];
                    channels
                        .iter()
                        .map(|n| {
                            let (part, tail) = rest.split_at(n * scale * h * scale * w);
                            rest = tail;
                            part
                        })
                        .collect()
                };
                if residual {
                    parts.push(&added);
                }
                let mut out = vec![f32::NAN; m * oh * ow];
                op.run(&parts, &mut out);
                let differing = out.iter().zip(want.iter()).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differing, 0, "case {number} on {isa:?}: {differing} of {} outputs differ", out.len());
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
