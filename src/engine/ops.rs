//! Faster versions of the tract 0.23 operators that cost the most outside its matrix kernels,
//! swapped in after `into_optimized()`:
//! - bilinear `Resize`, which tract runs on one thread with two intermediate copies (10-15% of
//!   IS-Net's wall time at 2 threads): [`PlaneResize`] splits it by image plane over tract's own
//!   thread pool and writes each output value once; with AVX-512, 16 outputs of a row at a time
//!   from one load and two lane permutations (2-2.5x faster than one at a time; AVX-512's
//!   gathers were slower than scalar code on this Zen 4);
//! - the lazy im2col that feeds every 3x3 convolution's matrix product, which gathers each value
//!   with its own indexed load (a quarter of the CPU time), and the zero `Pad` tract copies the
//!   input into first: [`RowIm2col`] moves runs of consecutive pixels and writes the padding
//!   taps as zeros itself.
//!
//! Both compute exactly what tract's own operators compute (same taps, same weights, same order
//! of operations), so outputs are bit-identical; the model tests check it on both models.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};
use tract_onnx::tract_core::ops::nn::resize::{AxisPlan, Interpolator, Resize};

/// Replaces each node for which `build` gives an operator and the outlet it reads with that
/// operator (keeping the node's name), in one patch. Returns how many nodes were replaced.
fn swap_nodes(
    model: &mut TypedModel,
    name: &str,
    mut build: impl FnMut(&TypedModel, &TypedNode) -> TractResult<Option<(Box<dyn TypedOp>, OutletId)>>,
) -> TractResult<usize> {
    let mut patch = TypedModelPatch::new(name);
    let mut replaced = 0;
    for node in &model.nodes {
        let Some((op, source)) = build(model, node)? else {
            continue;
        };
        let input = patch.tap_model(model, source)?;
        let wire = patch.wire_node(&node.name, op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(node.id, 0), wire)?;
        replaced += 1;
    }
    patch.apply(model)?;
    Ok(replaced)
}

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

/// Concrete NCHW f32 shape of an outlet, or None.
pub(super) fn nchw_f32(fact: &TypedFact) -> Option<[usize; 4]> {
    if fact.datum_type != f32::datum_type() {
        return None;
    }
    let shape = fact.shape.as_concrete()?;
    <[usize; 4]>::try_from(shape).ok()
}

/// Runs `f(0..n)`, on tract's thread pool when it has one.
pub(super) fn par_for(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(|| (0..n).into_par_iter().for_each(f)),
        _ => (0..n).for_each(f),
    }
}

/// Runs `f(plane_index, plane)` over the `planes` equal chunks of `out`, on tract's thread pool
/// when it has one.
fn for_each_plane(out: &mut [f32], plane_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(|| {
            out.par_chunks_mut(plane_len)
                .enumerate()
                .for_each(|(i, plane)| f(i, plane))
        }),
        _ => out.chunks_mut(plane_len).enumerate().for_each(|(i, plane)| f(i, plane)),
    }
}

/// Linear resize of the two spatial axes of an NCHW f32 tensor, with tract's axis plans.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneResize {
    input: [usize; 4],
    output: [usize; 4],
    rows: Arc<Taps>,
    cols: Arc<Taps>,
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
        let vector = super::conv::avx512();
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
        }))
    }

    fn run(&self, src: &[f32], dst: &mut [f32]) -> TractResult<()> {
        let [_, _, ih, iw] = self.input;
        let [_, _, oh, ow] = self.output;
        ensure!(src.len() == self.input.iter().product::<usize>());
        for_each_plane(dst, oh * ow, |p, plane| {
            let src = &src[p * ih * iw..][..ih * iw];
            // Height first, then width: tract's axis order, so the rounding is the same.
            let mut row = vec![0f32; iw];
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
                self.columns(&row, out_row);
            }
        });
        Ok(())
    }

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
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every element (each plane
        // completely) before the tensor is read.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output)? };
        self.run(
            view.as_slice::<f32>()?,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
        )?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PlaneResize {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output)))
    }

    as_op!();
}

/// What tract's `LazyIm2col` for one convolution needs to know, taken from the `Conv` node
/// before code generation (the nodes that replace it keep the convolution's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

/// The geometry of every plain 2-D f32 convolution in a decluttered model, by node name.
pub fn conv_geometries(model: &TypedModel) -> HashMap<String, ConvGeometry> {
    use tract_onnx::tract_core::ops::cnn::Conv;
    use tract_onnx::tract_core::ops::nn::DataFormat;
    model
        .nodes
        .iter()
        .filter_map(|node| {
            let conv = node.op_as::<Conv>()?;
            let spec = &conv.pool_spec;
            if conv.group != 1
                || conv.q_params.is_some()
                || spec.data_format != DataFormat::NCHW
                || spec.kernel_shape.len() != 2
            {
                return None;
            }
            let geometry = ConvGeometry {
                kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
                stride: [spec.stride(0), spec.stride(1)],
                dilation: [spec.dilation(0), spec.dilation(1)],
            };
            Some((node.name.clone(), geometry))
        })
        .collect()
}

/// Replaces tract's `LazyIm2col` nodes (one per im2col convolution), and the zero `Pad` tract
/// puts in front of each, with one [`RowIm2col`]. It packs the same panels straight from the
/// unpadded input: each run of consecutive input pixels is one move instead of one indexed load
/// per value, and taps that fall in the padding are written as zeros, so the padded copy of the
/// input (up to 67 MB for IS-Net) is never made. Nodes whose geometry is unknown or does not
/// reproduce tract's K and N are left alone.
pub fn faster_im2col(model: &mut TypedModel, geometries: &HashMap<String, ConvGeometry>) -> TractResult<usize> {
    use tract_linalg::pack::PackedFormat;
    use tract_onnx::tract_core::ops::matmul::pack::DynPackedExoticFact;
    let replaced = swap_nodes(model, "row im2col", |model, node| {
        if node.op.name() != "LazyIm2col" {
            return Ok(None);
        }
        let Some(geometry) = node
            .name
            .strip_suffix(".lazyIm2col")
            .and_then(|conv| geometries.get(conv))
        else {
            return Ok(None);
        };
        let output = model.outlet_fact(OutletId::new(node.id, 0))?;
        let Some(packed) = output
            .exotic_fact
            .as_ref()
            .and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            return Ok(None);
        };
        let Some(packer) = packed.packers.first().and_then(|p| p.downcast_ref::<PackedFormat>()) else {
            return Ok(None);
        };
        if packed.packers.len() != 1
            || output.shape.as_concrete() != Some(&[1, 1][..])
            || packer.dt != f32::datum_type()
        {
            return Ok(None);
        }
        // Read through tract's zero Pad when it only feeds this convolution.
        let mut source = node.inputs[0];
        let mut pads = [(0, 0); 2];
        let producer = model.node(source.node);
        if let Some(pad) = producer.op_as::<Pad>()
            && let PadMode::Constant(value) = &pad.mode
            && value.cast_to_scalar::<f32>()? == 0.0
            && pad.pads.len() == 4
            && pad.pads[..2] == [(0, 0), (0, 0)]
            && producer.outputs[0].successors.len() == 1
        {
            source = producer.inputs[0];
            pads = [pad.pads[2], pad.pads[3]];
        }
        let Some(input) = nchw_f32(model.outlet_fact(source)?) else {
            return Ok(None);
        };
        let Some(params) = RowIm2colParams::new(input, pads, *geometry, packer.clone()) else {
            return Ok(None);
        };
        if packed.k != params.k().to_dim() || packed.mn != params.n().to_dim() {
            return Ok(None);
        }
        let op = RowIm2col {
            params: Arc::new(params),
            fact: output.clone(),
        };
        Ok(Some((Box::new(op) as _, source)))
    })?;
    // The Pads the im2cols read through are dead now.
    model.compact()?;
    Ok(replaced)
}

/// The widest panel (kernel column count) `RowIm2colParams::pack` handles.
const MAX_PANEL: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RowIm2colParams {
    /// The (unpadded) input shape, `[1, C, H, W]`.
    input: [usize; 4],
    /// Zeros before the first row and column.
    pad: [usize; 2],
    /// Output rows and columns.
    out: [usize; 2],
    stride: [usize; 2],
    packer: tract_linalg::pack::PackedFormat,
    /// Per K row, in tract's order (channel, kernel row, kernel column): the channel's offset
    /// in the input and the tap's row and column offset from an output pixel's anchor.
    taps: Vec<(isize, isize, isize)>,
}

impl RowIm2colParams {
    fn new(
        input: [usize; 4],
        pads: [(usize, usize); 2],
        g: ConvGeometry,
        packer: tract_linalg::pack::PackedFormat,
    ) -> Option<RowIm2colParams> {
        let [n, c, h, w] = input;
        let padded = [h + pads[0].0 + pads[0].1, w + pads[1].0 + pads[1].1];
        let span = |axis: usize| g.dilation[axis] * (g.kernel[axis].max(1) - 1) + 1;
        if n != 1
            || packer.r > MAX_PANEL
            || g.kernel.contains(&0)
            || g.stride.contains(&0)
            || padded[0] < span(0)
            || padded[1] < span(1)
        {
            return None;
        }
        let out = [0, 1].map(|a| (padded[a] - span(a)) / g.stride[a] + 1);
        let mut taps = Vec::with_capacity(c * g.kernel[0] * g.kernel[1]);
        for ch in 0..c {
            for ky in 0..g.kernel[0] {
                for kx in 0..g.kernel[1] {
                    taps.push((
                        (ch * h * w) as isize,
                        (ky * g.dilation[0]) as isize,
                        (kx * g.dilation[1]) as isize,
                    ));
                }
            }
        }
        Some(RowIm2colParams {
            input,
            pad: [pads[0].0, pads[1].0],
            out,
            stride: g.stride,
            packer,
            taps,
        })
    }

    fn k(&self) -> usize {
        self.taps.len()
    }

    fn n(&self) -> usize {
        self.out[0] * self.out[1]
    }

    /// Where output pixel `i` reads its (0, 0) tap, in unpadded input coordinates.
    fn anchor(&self, i: usize) -> (isize, isize) {
        let (oy, ox) = (i / self.out[1], i % self.out[1]);
        (
            (oy * self.stride[0]) as isize - self.pad[0] as isize,
            (ox * self.stride[1]) as isize - self.pad[1] as isize,
        )
    }

    /// The input value at (`y`, `x`) of the channel starting at `c`; zero in the padding.
    #[inline(always)]
    fn tap(&self, src: &[f32], c: isize, y: isize, x: isize) -> f32 {
        let [_, _, h, w] = self.input.map(|d| d as isize);
        if (0..h).contains(&y) && (0..w).contains(&x) {
            src[(c + y * w + x) as usize]
        } else {
            0.0
        }
    }

    /// Writes panel `panel` (output pixels `panel*r ..`, k-outer: `dst[k*r + j]`) from `src`.
    fn pack(&self, src: &[f32], panel: usize, dst: &mut [f32]) {
        let r = self.packer.r;
        let [_, _, h, w] = self.input.map(|d| d as isize);
        let first = panel * r;
        let count = r.min(self.n() - first);
        let (ay, ax) = self.anchor(first);
        // A full panel inside one output row of a stride-1 convolution reads `r` consecutive
        // pixels for every tap.
        if count == r && self.stride[1] == 1 && first % self.out[1] + r <= self.out[1] {
            for ((c, dy, dx), out) in self.taps.iter().zip(dst.chunks_exact_mut(r)) {
                let (y, x) = (ay + dy, ax + dx);
                if y < 0 || y >= h {
                    out.fill(0.0);
                } else if x >= 0 && x + r as isize <= w {
                    let start = (c + y * w + x) as usize;
                    prefetch(src, start + PREFETCH_AHEAD);
                    copy_run(&src[start..start + r], out);
                } else {
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = self.tap(src, *c, y, x + j as isize);
                    }
                }
            }
            return;
        }
        let mut anchors = [(0isize, 0isize); MAX_PANEL];
        for (j, a) in anchors[..count].iter_mut().enumerate() {
            *a = self.anchor(first + j);
        }
        for ((c, dy, dx), out) in self.taps.iter().zip(dst.chunks_exact_mut(r)) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = anchors[..count]
                    .get(j)
                    .map_or(0.0, |&(ay, ax)| self.tap(src, *c, ay + dy, ax + dx));
            }
        }
    }
}

/// How far ahead of a run (in values) the next panels' reads are announced. Each panel reads one
/// short run from every (channel, tap) row - hundreds of rows, more streams than the hardware
/// prefetchers follow - so without it nearly every run waits on memory.
const PREFETCH_AHEAD: usize = 32;

/// Hints that `data[at]` will be read soon; nothing on targets without a stable prefetch.
#[inline(always)]
fn prefetch(data: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = data.get(at) {
        // SAFETY: a prefetch of a valid address has no effect on memory.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(v as *const f32 as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at);
}

/// `out.copy_from_slice(run)`, with the common panel widths as fixed-size moves.
#[inline(always)]
fn copy_run(run: &[f32], out: &mut [f32]) {
    fn fixed<const R: usize>(run: &[f32], out: &mut [f32]) {
        let run: &[f32; R] = run.try_into().expect("run length");
        let out: &mut [f32; R] = out.try_into().expect("run length");
        *out = *run;
    }
    match out.len() {
        6 => fixed::<6>(run, out),
        8 => fixed::<8>(run, out),
        12 => fixed::<12>(run, out),
        16 => fixed::<16>(run, out),
        _ => out.copy_from_slice(run),
    }
}

/// Its own input format, not `PackedFormat`: tract's matrix product then walks the output
/// column-panel first and packs each input panel once for all weight rows, as for its own lazy
/// im2col.
impl tract_linalg::mmm::MMMInputFormat for RowIm2colParams {
    fn prepare_tensor(&self, _t: &Tensor, _k_axis: usize, _mn_axis: usize) -> TractResult<Tensor> {
        bail!("RowIm2col is built by its operator only")
    }

    fn prepare_one_view(
        &self,
        _t: &TensorView,
        _k_axis: usize,
        _mn_axis: usize,
    ) -> TractResult<Box<dyn tract_linalg::mmm::MMMInputValue>> {
        bail!("RowIm2col is built by its operator only")
    }

    fn precursor(&self) -> tract_linalg::WeightType {
        self.packer.precursor()
    }

    fn r(&self) -> usize {
        self.packer.r
    }

    fn k_alignment(&self) -> usize {
        1
    }

    fn mem_size(&self, k: TDim, mn: TDim) -> TDim {
        k * mn * self.packer.dt.size_of()
    }

    fn extract_at_mn_f16(&self, _: &tract_linalg::mmm::EagerPackedInput, _: usize, _: &mut [f16]) -> TractResult<()> {
        bail!("RowIm2col values are only read as panels")
    }

    fn extract_at_mn_f32(&self, _: &tract_linalg::mmm::EagerPackedInput, _: usize, _: &mut [f32]) -> TractResult<()> {
        bail!("RowIm2col values are only read as panels")
    }
}

impl ExoticFact for RowIm2colParams {
    fn buffer_sizes(&self) -> TVec<TDim> {
        tvec!(tract_linalg::mmm::MMMInputFormat::mem_size(
            self,
            self.k().to_dim(),
            self.n().to_dim()
        ))
    }
}

impl std::fmt::Display for RowIm2colParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RowIm2col")
    }
}

#[derive(Debug, Clone)]
struct RowIm2col {
    params: Arc<RowIm2colParams>,
    fact: TypedFact,
}

impl PartialEq for RowIm2col {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params
    }
}
impl Eq for RowIm2col {}

impl Op for RowIm2col {
    fn name(&self) -> StaticName {
        "RowIm2col".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let p = &self.params;
        Ok(vec![format!(
            "k={} n={} r={} pad={:?}",
            p.k(),
            p.n(),
            p.packer.r,
            p.pad
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for RowIm2col {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let tensor = args_1!(inputs);
        ensure!(
            tensor.datum_type() == f32::datum_type() && tensor.shape() == self.params.input,
            "RowIm2col built for f32 {:?}, given {:?} {:?}",
            self.params.input,
            tensor.datum_type(),
            tensor.shape()
        );
        let value = RowIm2colInput {
            tensor,
            params: self.params.clone(),
        };
        let storage = tract_linalg::mmm::PackedMatrixStorage::new_batched(&[1, 1], tvec!(Box::new(value) as _));
        Ok(tvec!(storage.into_tensor(f32::datum_type()).into_tvalue()))
    }
}

impl TypedOp for RowIm2col {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.fact.clone()))
    }

    as_op!();
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RowIm2colInput {
    tensor: TValue,
    params: Arc<RowIm2colParams>,
}

impl std::hash::Hash for RowIm2colInput {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.tensor.as_bytes(), &self.params).hash(state);
    }
}

impl std::fmt::Display for RowIm2colInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RowIm2col(k={}, n={})", self.params.k(), self.params.n())
    }
}

impl tract_linalg::mmm::MMMInputValue for RowIm2colInput {
    fn format(&self) -> &dyn tract_linalg::mmm::MMMInputFormat {
        &*self.params
    }

    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        Some(self.params.packer.single_panel_layout(self.params.k(), 4))
    }

    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let p = &*self.params;
        ensure!(i * p.packer.r < p.n(), "panel {i} out of range");
        let buffer = buffer.context("RowIm2col needs a panel buffer")?;
        ensure!(buffer as usize % std::mem::align_of::<f32>() == 0);
        // SAFETY: tract hands each panel call a buffer laid out by `scratch_panel_buffer_layout`
        // (at least k * r values, aligned), used by nobody else until the kernel has read it.
        let dst = unsafe { std::slice::from_raw_parts_mut(buffer as *mut f32, p.k() * p.packer.r) };
        p.pack(self.tensor.try_as_plain_ram()?.as_slice::<f32>()?, i, dst);
        Ok(buffer as *const u8)
    }

    fn mn(&self) -> usize {
        self.params.n()
    }

    fn k(&self) -> usize {
        self.params.k()
    }

    fn exotic_fact(&self) -> &dyn ExoticFact {
        &*self.params
    }

    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        bail!("RowIm2col values are only read as panels")
    }

    fn extract_at_mn_f32(&self, _mn: usize, _slice: &mut [f32]) -> TractResult<()> {
        bail!("RowIm2col values are only read as panels")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector column pass gives `blend`'s results bit for bit: upscaling by 2 (every block
    /// permuted, the last one partial), by 32 (IS-Net's side outputs), and downscaling by 4
    /// (taps too far apart for one load, so the scalar path).
    #[test]
    fn columns_match_blend_for_every_block_kind() {
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
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
                to > from && super::super::conv::avx512(),
                "{from} -> {to}: blocks {:?}",
                cols.blocks
            );
            let op = PlaneResize {
                input: [1, 1, 1, from],
                output: [1, 1, 1, to],
                rows: Arc::new(Taps::identity(1)),
                cols: Arc::new(cols),
            };
            let row: Vec<f32> = (0..from).map(|_| next()).collect();
            let mut out = vec![f32::NAN; to];
            op.columns(&row, &mut out);
            for (x, o) in out.iter().enumerate() {
                let [a, b] = index[x];
                let want = blend(weight[x], row[a], row[b]);
                assert_eq!(o.to_bits(), want.to_bits(), "{from} -> {to}, output {x}");
            }
        }
    }
}
