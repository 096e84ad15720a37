//! The lazy im2col that feeds tract's matrix product for each convolution it keeps, which
//! gathers each value with its own indexed load (a quarter of the CPU time), and the zero `Pad`
//! tract copies the input into first: [`RowIm2col`] moves runs of consecutive pixels and writes
//! the padding taps as zeros itself. Bit-identical to tract's.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};

use super::{nchw_f32, swap_nodes};

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
