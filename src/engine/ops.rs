//! Data-movement operators that tract 0.23 runs on one thread: bilinear `Resize` and the zero
//! `Pad` its im2col convolutions insert. On IS-Net they are ~20% of the wall time at 2 threads
//! while the matrix products wait. After `into_optimized()`, `parallelise` swaps each one for a
//! version that splits the work by image plane over tract's own thread pool and writes every
//! output element once, without tract's intermediate copies. Arithmetic is the same (tract's
//! own axis plans, the same order of operations), so outputs are bit-identical.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};
use tract_onnx::tract_core::ops::nn::resize::{AxisPlan, Interpolator, Resize};

/// Replaces every f32 NCHW Resize (linear, no extrapolation) and zero Pad over H and W in
/// `model` with its parallel version. Returns how many nodes were replaced.
pub fn parallelise(model: &mut TypedModel) -> TractResult<usize> {
    let mut patch = TypedModelPatch::new("parallel resize and pad");
    let mut replaced = 0;
    for node in &model.nodes {
        let op: Option<Box<dyn TypedOp>> = if let Some(resize) = node.op_as::<Resize>() {
            PlaneResize::for_node(model, node, resize)?.map(|op| Box::new(op) as _)
        } else if let Some(pad) = node.op_as::<Pad>() {
            PlanePad::for_node(model, node, pad)?.map(|op| Box::new(op) as _)
        } else {
            None
        };
        let Some(op) = op else { continue };
        let input = patch.tap_model(model, node.inputs[0])?;
        let wire = patch.wire_node(&node.name, op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(node.id, 0), wire)?;
        replaced += 1;
    }
    patch.apply(model)?;
    Ok(replaced)
}

/// Concrete NCHW f32 shape of an outlet, or None.
fn nchw_f32(fact: &TypedFact) -> Option<[usize; 4]> {
    if fact.datum_type != f32::datum_type() {
        return None;
    }
    let shape = fact.shape.as_concrete()?;
    <[usize; 4]>::try_from(shape).ok()
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

fn output_tensor(shape: [usize; 4], fill: impl Fn(&mut [f32]) -> TractResult<()>) -> TractResult<TVec<TValue>> {
    // SAFETY: f32 has no invalid bit patterns, and both operators write every element before
    // the tensor is read (each plane is filled completely by `fill`).
    let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
    {
        let mut view = out.try_as_plain_ram_mut()?;
        fill(view.as_slice_mut::<f32>()?)?;
    }
    Ok(tvec!(out.into_tvalue()))
}

/// Linear resize of the two spatial axes of an NCHW f32 tensor, with tract's axis plans.
#[derive(Debug, Clone)]
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
}

impl Taps {
    /// None unless every output reads a window of two in-range taps.
    fn from_plan(plan: &AxisPlan) -> Option<Taps> {
        if plan.window != 2 || plan.extrapolated.iter().any(|e| *e) {
            return None;
        }
        let index = plan.indices.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        let weight = plan.weights.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
        Some(Taps { index, weight })
    }

    /// The identity along an axis that is not resized.
    fn identity(len: usize) -> Taps {
        Taps {
            index: (0..len).map(|i| [i, i]).collect(),
            weight: vec![[1.0, 0.0]; len],
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

impl PartialEq for PlaneResize {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.output == other.output && self.rows == other.rows && self.cols == other.cols
    }
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
                let w = self.rows.weight[y];
                let (a, b) = (&src[r0 * iw..][..iw], &src[r1 * iw..][..iw]);
                for ((t, &a), &b) in row.iter_mut().zip(a).zip(b) {
                    *t = blend(w, a, b);
                }
                for ((o, &[c0, c1]), &w) in out_row.iter_mut().zip(&self.cols.index).zip(&self.cols.weight) {
                    *o = blend(w, row[c0], row[c1]);
                }
            }
        });
        Ok(())
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
        let src = view.as_slice::<f32>()?;
        output_tensor(self.output, |dst| self.run(src, dst))
    }
}

impl TypedOp for PlaneResize {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output)))
    }

    as_op!();
}

/// Zero padding of the two spatial axes of an NCHW f32 tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlanePad {
    input: [usize; 4],
    /// (before, after) for H, then W.
    pads: [(usize, usize); 2],
}

impl PlanePad {
    fn for_node(model: &TypedModel, node: &TypedNode, pad: &Pad) -> TractResult<Option<PlanePad>> {
        let PadMode::Constant(value) = &pad.mode else {
            return Ok(None);
        };
        if value.cast_to_scalar::<f32>()? != 0.0
            || pad.pads.len() != 4
            || pad.pads[0] != (0, 0)
            || pad.pads[1] != (0, 0)
        {
            return Ok(None);
        }
        let Some(input) = nchw_f32(model.outlet_fact(node.inputs[0])?) else {
            return Ok(None);
        };
        Ok(Some(PlanePad {
            input,
            pads: [pad.pads[2], pad.pads[3]],
        }))
    }

    fn output(&self) -> [usize; 4] {
        let [n, c, h, w] = self.input;
        let [(top, bottom), (left, right)] = self.pads;
        [n, c, h + top + bottom, w + left + right]
    }

    fn run(&self, src: &[f32], dst: &mut [f32]) -> TractResult<()> {
        let [_, _, ih, iw] = self.input;
        let [_, _, oh, ow] = self.output();
        let [(top, _), (left, _)] = self.pads;
        ensure!(src.len() == self.input.iter().product::<usize>());
        for_each_plane(dst, oh * ow, |p, plane| {
            let src = &src[p * ih * iw..][..ih * iw];
            let (head, rest) = plane.split_at_mut(top * ow);
            head.fill(0.0);
            let (body, tail) = rest.split_at_mut(ih * ow);
            tail.fill(0.0);
            for (out_row, in_row) in body.chunks_exact_mut(ow).zip(src.chunks_exact(iw)) {
                let (l, r) = out_row.split_at_mut(left);
                l.fill(0.0);
                let (mid, r) = r.split_at_mut(iw);
                mid.copy_from_slice(in_row);
                r.fill(0.0);
            }
        });
        Ok(())
    }
}

impl Op for PlanePad {
    fn name(&self) -> StaticName {
        "PlanePad".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} pads {:?}", self.input, self.pads)])
    }

    op_as_typed_op!();
}

impl EvalOp for PlanePad {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let src = view.as_slice::<f32>()?;
        output_tensor(self.output(), |dst| self.run(src, dst))
    }
}

impl TypedOp for PlanePad {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.output())))
    }

    as_op!();
}

/// What tract's `LazyIm2col` for one convolution needs to know, taken from the `Conv` node
/// before code generation (the node that replaces it keeps the convolution's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

/// The geometry of every plain 2-D f32 convolution in a decluttered model, by node name.
pub fn conv_geometries(model: &TypedModel) -> std::collections::HashMap<String, ConvGeometry> {
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

/// Replaces tract's `LazyIm2col` nodes (one per im2col convolution) with [`RowIm2col`], which
/// packs the same panels but copies each run of consecutive input pixels in one move instead of
/// one indexed load per value. Nodes whose geometry is unknown or does not reproduce tract's
/// K and N are left alone.
pub fn faster_im2col(
    model: &mut TypedModel,
    geometries: &std::collections::HashMap<String, ConvGeometry>,
) -> TractResult<usize> {
    use tract_linalg::pack::PackedFormat;
    use tract_onnx::tract_core::ops::matmul::pack::DynPackedExoticFact;
    let mut patch = TypedModelPatch::new("row im2col");
    let mut replaced = 0;
    for node in &model.nodes {
        if node.op.name() != "LazyIm2col" {
            continue;
        }
        let Some(geometry) = node
            .name
            .strip_suffix(".lazyIm2col")
            .and_then(|conv| geometries.get(conv))
        else {
            continue;
        };
        let Some(input) = nchw_f32(model.outlet_fact(node.inputs[0])?) else {
            continue;
        };
        let output = model.outlet_fact(OutletId::new(node.id, 0))?;
        let Some(packed) = output
            .exotic_fact
            .as_ref()
            .and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            continue;
        };
        let [Some(packer)] = [packed.packers.first().and_then(|p| p.downcast_ref::<PackedFormat>())] else {
            continue;
        };
        if packed.packers.len() != 1
            || output.shape.as_concrete() != Some(&[1, 1][..])
            || packer.dt != f32::datum_type()
        {
            continue;
        }
        let Some(params) = RowIm2colParams::new(input, *geometry, packer.clone()) else {
            continue;
        };
        if packed.k != params.k_offsets.len().to_dim() || packed.mn != params.n_offsets.len().to_dim() {
            continue;
        }
        let op = RowIm2col {
            params: Arc::new(params),
            fact: output.clone(),
        };
        let input = patch.tap_model(model, node.inputs[0])?;
        let wire = patch.wire_node(&node.name, op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(node.id, 0), wire)?;
        replaced += 1;
    }
    patch.apply(model)?;
    Ok(replaced)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RowIm2colParams {
    /// The input shape the offsets were computed for.
    input: [usize; 4],
    packer: tract_linalg::pack::PackedFormat,
    /// Offset, in f32 values, of each (channel, ky, kx) tap from an output pixel's anchor.
    k_offsets: Vec<isize>,
    /// Offset of each output pixel's anchor in the (already padded) input.
    n_offsets: Vec<isize>,
    /// Per panel of `packer.r` output pixels: whether they read consecutive input pixels.
    consecutive: Vec<bool>,
}

impl RowIm2colParams {
    /// tract's layout: K runs over channels, then kernel rows, then kernel columns; N over
    /// output rows, then columns, of a valid (unpadded) convolution of `input`.
    fn new(input: [usize; 4], g: ConvGeometry, packer: tract_linalg::pack::PackedFormat) -> Option<RowIm2colParams> {
        let [n, c, h, w] = input;
        let span = |axis: usize| g.dilation[axis] * (g.kernel[axis] - 1) + 1;
        if n != 1 || h < span(0) || w < span(1) || g.kernel.contains(&0) || g.stride.contains(&0) {
            return None;
        }
        let (oh, ow) = ((h - span(0)) / g.stride[0] + 1, (w - span(1)) / g.stride[1] + 1);
        let mut k_offsets = Vec::with_capacity(c * g.kernel[0] * g.kernel[1]);
        for ch in 0..c {
            for ky in 0..g.kernel[0] {
                for kx in 0..g.kernel[1] {
                    k_offsets.push((ch * h * w + ky * g.dilation[0] * w + kx * g.dilation[1]) as isize);
                }
            }
        }
        let n_offsets: Vec<isize> = (0..oh)
            .flat_map(|y| (0..ow).map(move |x| (y * g.stride[0] * w + x * g.stride[1]) as isize))
            .collect();
        let consecutive = n_offsets
            .chunks(packer.r)
            .map(|p| p.len() == packer.r && p.windows(2).all(|w| w[1] == w[0] + 1))
            .collect();
        Some(RowIm2colParams {
            input,
            packer,
            k_offsets,
            n_offsets,
            consecutive,
        })
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
        tvec!((self.k_offsets.len() * self.n_offsets.len() * self.packer.dt.size_of()).to_dim())
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
            "k={} n={} r={}",
            p.k_offsets.len(),
            p.n_offsets.len(),
            p.packer.r
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
        write!(
            f,
            "RowIm2col(k={}, n={})",
            self.params.k_offsets.len(),
            self.params.n_offsets.len()
        )
    }
}

/// Copies `R` consecutive values from `src` to `dst` for every offset in `k_offsets`.
///
/// # Safety
/// Every `src + offset .. + R` must be inside the input and `dst` must hold `k_offsets.len() * R`.
unsafe fn copy_runs<const R: usize>(src: *const f32, k_offsets: &[isize], dst: *mut f32) {
    for (i, &k) in k_offsets.iter().enumerate() {
        // SAFETY: per the contract above.
        unsafe {
            let run = std::ptr::read_unaligned(src.offset(k) as *const [f32; R]);
            std::ptr::write_unaligned(dst.add(i * R) as *mut [f32; R], run);
        }
    }
}

impl tract_linalg::mmm::MMMInputValue for RowIm2colInput {
    fn format(&self) -> &dyn tract_linalg::mmm::MMMInputFormat {
        &*self.params
    }

    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        Some(self.params.packer.single_panel_layout(self.params.k_offsets.len(), 4))
    }

    /// Panel `i`: for each K row, the `r` values of output pixels `i*r ..`; the tail of a short
    /// last panel is zero.
    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let p = &*self.params;
        let r = p.packer.r;
        let dst = buffer.context("RowIm2col needs a panel buffer")? as *mut f32;
        let pixels = p.n_offsets.get(i * r..).context("panel out of range")?;
        let pixels = &pixels[..pixels.len().min(r)];
        let src = self.tensor.try_as_plain_ram()?.as_slice::<f32>()?.as_ptr();
        // SAFETY: the offsets were built for this input's shape (checked in eval) and each tap of
        // a valid convolution stays inside it; and the buffer holds a single panel of
        // k * r values as laid out by `single_panel_layout`.
        unsafe {
            if p.consecutive[i] {
                let src = src.offset(pixels[0]);
                match r {
                    6 => copy_runs::<6>(src, &p.k_offsets, dst),
                    8 => copy_runs::<8>(src, &p.k_offsets, dst),
                    12 => copy_runs::<12>(src, &p.k_offsets, dst),
                    16 => copy_runs::<16>(src, &p.k_offsets, dst),
                    _ => {
                        for (kk, &k) in p.k_offsets.iter().enumerate() {
                            std::ptr::copy_nonoverlapping(src.offset(k), dst.add(kk * r), r);
                        }
                    }
                }
            } else {
                for (kk, &k) in p.k_offsets.iter().enumerate() {
                    let row = src.offset(k);
                    let out = dst.add(kk * r);
                    for (j, &n) in pixels.iter().enumerate() {
                        *out.add(j) = *row.offset(n);
                    }
                    for j in pixels.len()..r {
                        *out.add(j) = 0.0;
                    }
                }
            }
        }
        Ok(dst as *const u8)
    }

    fn mn(&self) -> usize {
        self.params.n_offsets.len()
    }

    fn k(&self) -> usize {
        self.params.k_offsets.len()
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
