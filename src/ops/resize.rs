//! Bilinear `Resize`, which tract runs on one thread with two intermediate copies (10-15% of
//! IS-Net's wall time at 2 threads): [`PlaneResize`] splits it by image plane over tract's own
//! thread pool and writes each output value once; with AVX-512, 16 outputs of a row at a time
//! from one load and two lane permutations (2-2.5x faster than one at a time; AVX-512's
//! gathers were slower than scalar code on this Zen 4). Bit-identical to tract's.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::resize::{AxisPlan, Interpolator, Resize};

use super::quant_conv::{RowsOut, Source, stored_fact, stored_rows_output};
use super::{for_each_plane, nchw_f32, swap_nodes};

/// Replaces every f32 NCHW Resize (linear, no extrapolation) in `model` with [`PlaneResize`].
/// Returns how many nodes were replaced.
pub fn parallel_resize(model: &mut TypedModel) -> TractResult<usize> {
    swap_nodes(model, "parallel resize", |model, node| {
        let Some(resize) = node.op_as::<Resize>() else {
            return Ok(None);
        };
        Ok(PlaneResize::for_node(model, node, resize)?.map(|op| (Box::new(op) as _, node.inputs[0])))
    })
}

/// Linear resize of the two spatial axes of an NCHW f32 tensor, with tract's axis plans.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneResize {
    input: [usize; 4],
    output: [usize; 4],
    rows: Arc<Taps>,
    cols: Arc<Taps>,
    /// When set, the output is stored quantised with it, for the int8 convolutions that read it
    /// so (see [`stored_activations`](super::stored_activations)).
    output_quant: Option<Source>,
}

/// For each output index along one axis: the two source indices and their weights.
#[derive(Debug, PartialEq)]
struct Taps {
    index: Vec<[usize; 2]>,
    weight: Vec<[f32; 2]>,
    /// The same per block of 16 outputs, for the vector column pass: the first source index of
    /// the block (None when its taps span more than 16 sources, or the CPU has no AVX-512), then
    /// per output (padded to whole blocks) the two taps relative to it and the two weights.
    blocks: Vec<Option<usize>>,
    offsets: [Vec<i32>; 2],
    weights: [Vec<f32>; 2],
}

/// Outputs per block in the vector column pass, and sources it can reach from one load.
const BLOCK: usize = 16;

impl Taps {
    /// None unless every output reads a window of two in-range taps.
    fn from_plan(plan: &AxisPlan) -> Option<Taps> {
        if plan.window != 2 || plan.extrapolated.iter().any(|e| *e) {
            return None;
        }
        let index = plan.indices.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        let weight = plan.weights.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        Some(Taps::new(index, weight))
    }

    /// The identity along an axis that is not resized.
    fn identity(len: usize) -> Taps {
        Taps::new((0..len).map(|i| [i, i]).collect(), vec![[1.0, 0.0]; len])
    }

    fn new(index: Vec<[usize; 2]>, weight: Vec<[f32; 2]>) -> Taps {
        let padded = index.len().next_multiple_of(BLOCK);
        let mut blocks = Vec::new();
        let mut offsets = [vec![0; padded], vec![0; padded]];
        let mut weights = [vec![0.0; padded], vec![0.0; padded]];
        let vector = super::avx512();
        for (b, block) in index.chunks(BLOCK).enumerate() {
            let low = block.iter().flatten().min().copied().unwrap_or(0);
            let high = block.iter().flatten().max().copied().unwrap_or(0);
            let fits = vector && high - low < BLOCK;
            blocks.push(fits.then_some(low));
            for (i, taps) in block.iter().enumerate() {
                for k in 0..2 {
                    offsets[k][b * BLOCK + i] = if fits { (taps[k] - low) as i32 } else { 0 };
                    weights[k][b * BLOCK + i] = weight[b * BLOCK + i][k];
                }
            }
        }
        Taps {
            index,
            weight,
            blocks,
            offsets,
            weights,
        }
    }
}

/// tract's `resample_axis`: starts from 0 and adds `w * s` for each non-zero weight in order.
#[inline(always)]
fn blend(w: [f32; 2], a: f32, b: f32) -> f32 {
    let mut v = 0.0;
    if w[0] != 0.0 {
        v += w[0] * a;
    }
    if w[1] != 0.0 {
        v += w[1] * b;
    }
    v
}

impl Eq for PlaneResize {}

impl PlaneResize {
    fn for_node(model: &TypedModel, node: &TypedNode, resize: &Resize) -> TractResult<Option<PlaneResize>> {
        if !matches!(resize.interpolator, Interpolator::Linear) {
            return Ok(None);
        }
        let facts = model.node_input_facts(node.id)?;
        let Some(input) = nchw_f32(facts[0]) else {
            return Ok(None);
        };
        let Some(output) = nchw_f32(model.outlet_fact(OutletId::new(node.id, 0))?) else {
            return Ok(None);
        };
        if input[..2] != output[..2] {
            return Ok(None);
        }
        // The scale tract's eval would use: the constant scales input when it has one per axis,
        // else output / input.
        let given: Option<Vec<f32>> = match resize.optional_scales_input.and_then(|ix| facts.get(ix)) {
            Some(f) => match &f.konst {
                Some(k) if k.len() == 4 => Some(k.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()),
                Some(_) => None,
                None => return Ok(None),
            },
            None => None,
        };
        let scale = |axis: usize| {
            given
                .as_ref()
                .map_or(output[axis] as f32 / input[axis] as f32, |s| s[axis])
        };
        let taps = |axis: usize| {
            if input[axis] == output[axis] && scale(axis) == 1.0 {
                Some(Taps::identity(output[axis]))
            } else {
                Taps::from_plan(&resize.plan_axis(scale(axis), input[axis], output[axis]))
            }
        };
        let (Some(rows), Some(cols)) = (taps(2), taps(3)) else {
            return Ok(None);
        };
        Ok(Some(PlaneResize {
            input,
            output,
            rows: Arc::new(rows),
            cols: Arc::new(cols),
            output_quant: None,
        }))
    }

    /// This resize with its output stored quantised with `quant`.
    pub(crate) fn with_stored_output(mut self, quant: Source) -> PlaneResize {
        self.output_quant = Some(quant);
        self
    }

    #[cfg(test)]
    fn run(&self, src: &[f32], dst: &mut [f32]) -> TractResult<()> {
        self.rows_into(src, dst, |row, out| out.copy_from_slice(row))
    }
}

impl RowsOut for PlaneResize {
    fn rows_into<T: Send + Sync>(&self, src: &[f32], dst: &mut [T], store: impl Fn(&[f32], &mut [T]) + Sync) -> TractResult<()> {
        let [_, _, ih, iw] = self.input;
        let [_, _, oh, ow] = self.output;
        ensure!(src.len() == self.input.iter().product::<usize>());
        ensure!(dst.len() == self.output.iter().product::<usize>());
        for_each_plane(dst, oh * ow, |p, plane| {
            let src = &src[p * ih * iw..][..ih * iw];
            // Height first, then width: tract's axis order, so the rounding is the same.
            let mut row = vec![0f32; iw];
            let mut resized = vec![0f32; ow];
            for (y, out_row) in plane.chunks_exact_mut(ow).enumerate() {
                let [r0, r1] = self.rows.index[y];
                let (a, b) = (&src[r0 * iw..][..iw], &src[r1 * iw..][..iw]);
                // `blend` with this row's weights, its branches taken once per row.
                let [w0, w1] = self.rows.weight[y];
                let pairs = row.iter_mut().zip(a).zip(b);
                match (w0 != 0.0, w1 != 0.0) {
                    (true, true) => pairs.for_each(|((t, &a), &b)| *t = (0.0 + w0 * a) + w1 * b),
                    (true, false) => pairs.for_each(|((t, &a), _)| *t = 0.0 + w0 * a),
                    (false, true) => pairs.for_each(|((t, _), &b)| *t = 0.0 + w1 * b),
                    (false, false) => row.fill(0.0),
                }
                self.columns(&row, &mut resized);
                store(&resized, out_row);
            }
        });
        Ok(())
    }
}

impl PlaneResize {
    /// One output row from a row already resized in height.
    fn columns(&self, row: &[f32], out: &mut [f32]) {
        let cols = &*self.cols;
        for ((out, block), first) in out.chunks_mut(BLOCK).zip(&cols.blocks).zip((0..).step_by(BLOCK)) {
            match *block {
                // SAFETY: blocks are planned only where AVX-512F is present (`Taps::new`); `low`
                // and the offsets come from this axis' taps.
                #[cfg(target_arch = "x86_64")]
                Some(low) => unsafe { columns_avx512(cols, row, low, first, out) },
                _ => {
                    let taps = cols.index[first..].iter().zip(&cols.weight[first..]);
                    for (o, (&[c0, c1], &w)) in out.iter_mut().zip(taps) {
                        *o = blend(w, row[c0], row[c1]);
                    }
                }
            }
        }
    }
}

/// `blend` for the outputs `first..first + out.len()` (one block of at most 16) whose taps all
/// lie in `row[low..low + 16]`: one load, each tap picked by a permutation, each weighted term
/// added only where its weight is not zero, as `blend` does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_avx512(cols: &Taps, row: &[f32], low: usize, first: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(BLOCK);
    assert!(low < row.len() && first + BLOCK <= cols.offsets[0].len());
    let lanes = (u32::MAX >> (32 - n)) as __mmask16;
    let readable = (u32::MAX >> (32 - (row.len() - low).min(BLOCK))) as __mmask16;
    // SAFETY: the load reads only lanes inside `row`, the store only the `n` outputs, the
    // per-output arrays hold whole blocks (asserted above), and a permutation only picks lanes.
    unsafe {
        let zero = _mm512_setzero_ps();
        let source = _mm512_maskz_loadu_ps(readable, row.as_ptr().add(low));
        let a = _mm512_permutexvar_ps(_mm512_loadu_epi32(cols.offsets[0].as_ptr().add(first)), source);
        let b = _mm512_permutexvar_ps(_mm512_loadu_epi32(cols.offsets[1].as_ptr().add(first)), source);
        let w0 = _mm512_loadu_ps(cols.weights[0].as_ptr().add(first));
        let w1 = _mm512_loadu_ps(cols.weights[1].as_ptr().add(first));
        // `!=` is true for NaN in Rust: the unordered compare.
        let use0 = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(w0, zero);
        let use1 = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(w1, zero);
        let v = _mm512_maskz_add_ps(use0, zero, _mm512_mul_ps(w0, a));
        let v = _mm512_mask_add_ps(v, use1, v, _mm512_mul_ps(w1, b));
        _mm512_mask_storeu_ps(out.as_mut_ptr(), lanes, v);
    }
}

impl Op for PlaneResize {
    fn name(&self) -> StaticName {
        "PlaneResize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} -> {:?}", self.input, self.output)])
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneResize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let out = stored_rows_output(self, view.as_slice::<f32>()?, self.output_quant, &self.output)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PlaneResize {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(stored_fact(self.output_quant, self.output)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector column pass gives `blend`'s results bit for bit: upscaling by 2 (every block
    /// permuted, the last one partial), by 32 (IS-Net's side outputs), and downscaling by 4
    /// (taps too far apart for one load, so the scalar path). Stored quantised (bytes or 16-bit
    /// words, for int8 readers), each output is the f32 one quantised.
    #[test]
    fn columns_match_blend_for_every_block_kind() {
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Whether some stored byte was clamped, and some not.
        let (mut clamped, mut inside) = (false, false);
        for (from, to) in [(37, 74), (3, 96), (80, 20)] {
            // Half-pixel linear taps, clamped at the edges, as tract plans them.
            let scale = from as f32 / to as f32;
            let (index, weight): (Vec<[usize; 2]>, Vec<[f32; 2]>) = (0..to)
                .map(|x| {
                    let at = ((x as f32 + 0.5) * scale - 0.5).max(0.0);
                    let left = (at.floor() as usize).min(from - 1);
                    let frac = if left + 1 < from { at - left as f32 } else { 0.0 };
                    ([left, (left + 1).min(from - 1)], [1.0 - frac, frac])
                })
                .unzip();
            let cols = Taps::new(index.clone(), weight.clone());
            // With AVX-512, upscaling permutes every block; downscaling by 4 needs the scalar
            // path at least once. Without it, every block is scalar.
            let permuted = cols.blocks.iter().all(|b| b.is_some());
            assert_eq!(
                permuted,
                to > from && super::super::avx512(),
                "{from} -> {to}: blocks {:?}",
                cols.blocks
            );
            let op = PlaneResize {
                input: [1, 1, 1, from],
                output: [1, 1, 1, to],
                rows: Arc::new(Taps::identity(1)),
                cols: Arc::new(cols),
                output_quant: None,
            };
            let row: Vec<f32> = (0..from).map(|_| next()).collect();
            let mut out = vec![f32::NAN; to];
            op.columns(&row, &mut out);
            for (x, o) in out.iter().enumerate() {
                let [a, b] = index[x];
                let want = blend(weight[x], row[a], row[b]);
                assert_eq!(o.to_bits(), want.to_bits(), "{from} -> {to}, output {x}");
            }
            // Stored quantised (for int8 readers): each value the f32 one quantised.
            let mut f32_out = vec![f32::NAN; to];
            op.run(&row, &mut f32_out).unwrap();
            assert_eq!(f32_out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), out.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            let q8 = Source::Bits8(super::super::quant_conv::Quant::covering(-0.3, 0.4));
            let mut bytes = vec![0u8; to];
            op.rows_into(&row, &mut bytes, |r, o| q8.quantise_into(r, o, super::super::avx512())).unwrap();
            let q16 = Source::Bits16(super::super::quant_conv::Quant16::covering(-0.5, 0.2));
            let mut words = vec![0u16; to];
            op.rows_into(&row, &mut words, |r, o| q16.quantise_into(r, o, super::super::avx512())).unwrap();
            for x in 0..to {
                assert_eq!(bytes[x] as u16, q8.quantise(out[x]), "{from} -> {to}, byte {x}");
                assert_eq!(words[x], q16.quantise(out[x]), "{from} -> {to}, word {x}");
            }
            clamped |= bytes.contains(&255);
            inside |= bytes.iter().any(|&b| b < 255);
        }
        assert!(clamped && inside, "the stored values reach the range's end, and stay inside it");
    }
}
