//! Direct convolution for stride-1 2-D f32 convolutions on x86-64 CPUs with AVX-512 or AVX2 and
//! FMA (and, when asked for, aarch64's NEON), swapped in for tract's im2col + matrix product
//! before tract optimises the model.
//!
//! tract 0.23 runs these convolutions as im2col panels fed to a 16x12 matrix kernel; on IS-Net
//! that reaches about 55% of the cores' FMA peak. [`DirectConv`] instead reads each input row
//! straight from a small per-thread copy of the rows it needs (zero-padded, so there are no edge
//! cases in the inner loop) and keeps 8 output channels x 48 pixels in 24 vector accumulators,
//! which lands at 85-100% of peak on IS-Net's layers (numbers in the README). With AVX2 (16
//! registers of 8 lanes) a tile is 6 output channels x 16 pixels in 12 accumulators, written as
//! plain arrays that the compiler turns into the same vector code (see [`Isa`]).
//!
//! It also takes over the operators around most of these convolutions:
//! - the channel `Concat` in front of it, when the convolution is its only reader: the
//!   convolution reads the concatenated tensors in place, so the concatenation (64 MB per copy at
//!   IS-Net's 512² stage) is never built;
//! - the 2x2 `MaxPool` in front of it, when it is the pool's only reader: the rows are pooled
//!   while they are copied, so the pooled tensor is never built;
//! - the `Relu` after it, applied as each output value is stored;
//! - the residual `Add` after that (U2-Net's and IS-Net's blocks end with one), when the sum is
//!   the convolution's only reader: the other term is added as each value is stored, so the
//!   convolution's own output (64 MB at IS-Net's 512² stage) is never built either.
//!
//! Each output is the same sequence of multiply-adds as in tract's kernels (over input channel,
//! then kernel row, then kernel column, from zero, bias added last), so results are bit-identical
//! to tract's; the model tests check it on both models.

// Each architecture builds only its own kernels (the others' constants and helpers go unused);
// on an architecture with none, `Isa::chosen()` is None and nothing below is ever built.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, MaxPool};
use tract_onnx::tract_core::ops::nn::DataFormat;

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::nchw_f32;

/// Output channels x vectors per tile, one accumulator each: with AVX-512, 8 x 3 = 24 of the 32
/// registers; with AVX2, 6 x 2 = 12 of the 16 (the compiler spilled a 4 x 3 tile's).
/// Lanes per vector: consecutive output pixels of one row.
const AVX512_LANES: usize = 16;
const AVX2_LANES: usize = 8;
const NEON_LANES: usize = 4;
const AVX512_T: usize = 8;
const AVX512_N: usize = 3;
const AVX2_T: usize = 6;
const AVX2_N: usize = 2;
const NEON_T: usize = 8;
const NEON_N: usize = 3;
/// Vectors per tile when a tile has one output channel (the side outputs' convolutions).
const AVX512_SINGLE: usize = 8;
const AVX2_SINGLE: usize = 6;
#[cfg(target_arch = "aarch64")]
const NEON_SINGLE: usize = 8;
/// Weights of the output-channel tiles used together, kept under a quarter of a typical L2.
pub(crate) const WEIGHT_BUDGET: usize = 256 * 1024;
/// A task's copy of its input rows, kept with the weights within a typical 1 MB L2 (unless one
/// output row alone needs more).
const BAND_BUDGET: usize = 768 * 1024;

/// The instruction set, and so the vector code, a [`DirectConv`] runs.
///
/// - `Avx512`: intrinsics, 16 lanes, tiles of 8 output channels x 3 vectors (or 8 vectors of
///   one channel).
/// - `Avx2`: 8 lanes, tiles of 6 output channels x 2 vectors (or 6 vectors of one). The tile is
///   written with arrays and `mul_add` in a function compiled for AVX2 and FMA, which the
///   compiler turns into 256-bit loads and fused multiply-adds; each output is still one chain
///   of fused multiply-adds in tract's order, so the results are tract's bit for bit.
/// - `Neon` (aarch64, opt-in): the same arrays at 4 lanes, tiles of 8 x 3 in 24 of the 32
///   registers. Checked under emulation only: whether it beats tract's hand-written NEON
///   kernels on a real board is not measured, so it runs only when asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Neon,
}

impl Isa {
    /// Every instruction set there is a kernel for, fastest first.
    #[cfg(test)]
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Neon];

    /// Lanes per vector: consecutive output pixels of one row.
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => AVX512_LANES,
            Isa::Avx2 => AVX2_LANES,
            Isa::Neon => NEON_LANES,
        }
    }

    /// Output channels (one broadcast weight each) and vectors per tile.
    fn tile(self) -> [usize; 2] {
        match self {
            Isa::Avx512 => [AVX512_T, AVX512_N],
            Isa::Avx2 => [AVX2_T, AVX2_N],
            Isa::Neon => [NEON_T, NEON_N],
        }
    }

    /// Whether it is a kernel for this build's architecture.
    #[cfg(test)]
    fn native(self) -> bool {
        matches!(self, Isa::Neon) == cfg!(target_arch = "aarch64")
    }

    /// Whether this CPU runs it.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            // Every aarch64 CPU has NEON with fused multiply-add.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The kernel for this CPU, the fastest it supports: None leaves tract's convolutions in
    /// place. `REMOVEBGD_DIRECT_CONV` (`avx512`, `avx2`, `neon` or `off`) overrides it, to
    /// measure one against another; NEON runs only when named; a kernel the CPU lacks is never
    /// chosen.
    pub fn chosen() -> Option<Isa> {
        let wanted = std::env::var("REMOVEBGD_DIRECT_CONV").unwrap_or_default();
        let candidates: &[Isa] = match wanted.as_str() {
            "off" => &[],
            "avx2" => &[Isa::Avx2],
            "neon" => &[Isa::Neon],
            _ => &[Isa::Avx512, Isa::Avx2],
        };
        candidates.iter().copied().find(|k| k.supported())
    }
}

/// What [`direct_convs`] replaced: convolutions, and the concatenations and residual additions
/// taken over with them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replaced {
    pub convs: usize,
    pub concats: usize,
    pub residuals: usize,
}

/// Replaces each stride-1 f32 convolution of a decluttered model (with the channel concat or max
/// pool that only feeds it, and the Relu and residual Add that only follow it) with one
/// [`DirectConv`] running on `isa`. Does nothing without one.
pub fn direct_convs(model: &mut TypedModel, isa: Option<Isa>) -> TractResult<Replaced> {
    let Some(isa) = isa.filter(|k| k.supported()) else {
        return Ok(Replaced::default());
    };
    replace_convs(model, |_, spec| Some(Box::new(DirectConv::new(isa, spec.geometry, spec.weights, spec.bias))))
}

/// A convolution matched with the operators it takes over: what it computes, before a kernel
/// packs it.
pub(crate) struct ConvSpec<'a> {
    pub geometry: Geometry,
    /// [M][C][KH][KW], C over every input in concatenation order.
    pub weights: &'a [f32],
    /// One per output channel.
    pub bias: Vec<f32>,
}

/// Matches each stride-1 f32 convolution (with its concat or pool, Relu and residual, see
/// [`direct_convs`]) and replaces it with the operator `build` makes for the convolution's node
/// name, which reads the matched inputs (the convolved ones, then the residual); a convolution
/// `build` gives nothing for is left to tract.
pub(crate) fn replace_convs(
    model: &mut TypedModel,
    mut build: impl FnMut(&str, ConvSpec) -> Option<Box<dyn TypedOp>>,
) -> TractResult<Replaced> {
    let mut replaced = Replaced::default();
    let convs: Vec<String> = model
        .nodes
        .iter()
        .filter(|n| n.op_is::<Conv>())
        .map(|n| n.name.clone())
        .collect();
    // Weights packed since the model was last compacted.
    let mut packed = 0;
    // One patch per convolution: a later one may read what an earlier one rewired.
    for name in convs {
        let id = model.node_by_name(&name)?.id;
        let Some((geometry, weights, bias, sources, last)) = match_conv(model, model.node(id))? else {
            continue;
        };
        packed += weights.len() * 4;
        let (concat, residual) = (geometry.channels.len() > 1, geometry.residual);
        let weights = weights.try_as_plain_ram()?;
        let spec = ConvSpec {
            geometry,
            weights: weights.as_slice::<f32>()?,
            bias,
        };
        let Some(op) = build(&model.node(id).name, spec) else {
            continue;
        };
        replaced.convs += 1;
        replaced.concats += usize::from(concat);
        replaced.residuals += usize::from(residual);
        let mut patch = TypedModelPatch::new("direct convolution");
        let taps = sources
            .iter()
            .map(|s| patch.tap_model(model, *s))
            .collect::<TractResult<TVec<_>>>()?;
        let wire = patch.wire_node(&model.node(id).name, op, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), wire)?;
        patch.apply(model)?;
        // The replaced convolutions' f32 weights are dropped every few MB (IS-Net's are 176 MB,
        // which would otherwise all be held with the packed ones at the end), and their pages
        // handed back.
        if packed >= 8 << 20 {
            model.compact()?;
            crate::memory::give_back();
            packed = 0;
        }
    }
    model.compact()?;
    Ok(replaced)
}

/// A convolution's shapes: `[1, C, H, W]` to `[1, M, OH, OW]` with a `kernel`, a `stride`, a
/// `dilation` and zero padding `pad` before the first row and column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConvShape {
    pub input: [usize; 4],
    pub output: [usize; 4],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub pad: [usize; 2],
}

/// A group-1 NCHW f32 convolution with constant weights and bias, as read from the model.
pub(crate) struct PlainConv {
    pub shape: ConvShape,
    /// [M][C][KH][KW], as the model holds them (f16 or f32: the caller converts them once it
    /// takes the convolution).
    pub weights: Arc<Tensor>,
    /// One per output channel.
    pub bias: Vec<f32>,
}

/// The `Conv` at `node` when it is a [`PlainConv`] (any stride), or None.
pub(crate) fn plain_conv(model: &TypedModel, node: &TypedNode) -> TractResult<Option<PlainConv>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    if conv.group != 1
        || conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || spec.kernel_shape.len() != 2
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let (Some(input @ [1, c, h, w]), Some(output @ [1, m, oh, ow])) = (
        nchw_f32(model.outlet_fact(node.inputs[0])?),
        nchw_f32(model.outlet_fact(OutletId::new(node.id, 0))?),
    ) else {
        return Ok(None);
    };
    let kernel = [spec.kernel_shape[0], spec.kernel_shape[1]];
    let padding = spec.computed_padding(&[h, w]);
    if padding[0].convoluted != oh || padding[1].convoluted != ow {
        return Ok(None);
    }
    let (Some(weights), Some(bias)) = (
        constant(model, node.inputs[1])?,
        constant(model, node.inputs[2])?,
    ) else {
        return Ok(None);
    };
    if weights.shape() != [m, c, kernel[0], kernel[1]] || !(bias.len() == m || bias.len() == 1) {
        return Ok(None);
    }
    let bias = bias.cast_to::<f32>()?;
    let bias = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let bias = if bias.len() == 1 { vec![bias[0]; m] } else { bias };
    let shape = ConvShape {
        input,
        output,
        kernel,
        stride: [spec.stride(0), spec.stride(1)],
        dilation: [spec.dilation(0), spec.dilation(1)],
        pad: [padding[0].pad_before, padding[1].pad_before],
    };
    Ok(Some(PlainConv { shape, weights, bias }))
}

/// The `Conv` at `node` matched with what it takes over: its geometry, weights ([M][C][KH][KW])
/// and bias, the outlets it reads (the convolved ones, then the residual) and the node whose
/// output it replaces (the Relu or Add when fused); None when it does not apply.
#[allow(clippy::type_complexity)]
fn match_conv(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(Geometry, Tensor, Vec<f32>, TVec<OutletId>, usize)>> {
    let Some(plain) = plain_conv(model, node)? else {
        return Ok(None);
    };
    let PlainConv { shape, weights, bias } = plain;
    let ConvShape {
        input: [_, _, h, w],
        output,
        kernel,
        dilation,
        pad,
        stride,
    } = shape;
    if stride != [1, 1] {
        return Ok(None);
    }

    // Read the concatenated tensors directly when this convolution is the concat's only reader.
    let mut sources: TVec<OutletId> = tvec!(node.inputs[0]);
    let producer = model.node(node.inputs[0].node);
    if let Some(concat) = producer.op_as::<TypedConcat>()
        && concat.axis == 1
        && producer.outputs[0].successors.len() == 1
    {
        let parts = producer
            .inputs
            .iter()
            .map(|i| Ok(nchw_f32(model.outlet_fact(*i)?)))
            .collect::<TractResult<Vec<_>>>()?;
        if parts
            .iter()
            .all(|p| matches!(p, Some([1, _, ph, pw]) if *ph == h && *pw == w))
        {
            sources = producer.inputs.iter().copied().collect();
        }
    }
    // Or pool the input while copying it, when this convolution is the pool's only reader.
    let mut pooled = false;
    if let [source] = sources[..] {
        let producer = model.node(source.node);
        if let Some(pool) = producer.op_as::<MaxPool>()
            && producer.outputs[0].successors.len() == 1
            && is_plain_2x2_pool(pool, nchw_f32(model.outlet_fact(producer.inputs[0])?), [h, w])
        {
            sources = tvec!(producer.inputs[0]);
            pooled = true;
        }
    }
    let channels = sources
        .iter()
        .map(|s| Ok(nchw_f32(model.outlet_fact(*s)?).map_or(0, |shape| shape[1])))
        .collect::<TractResult<Vec<_>>>()?;

    let mut last = node.id;
    let mut relu = false;
    if let [succ] = &node.outputs[0].successors[..]
        && is_relu_of(model, model.node(succ.node), OutletId::new(node.id, 0))?
    {
        last = succ.node;
        relu = true;
    }
    let mut residual = false;
    if let [succ] = &model.node(last).outputs[0].successors[..]
        && let Some(other) = residual_of(model, model.node(succ.node), OutletId::new(last, 0), output)?
    {
        last = succ.node;
        residual = true;
        sources.push(other);
    }
    let geometry = Geometry {
        channels,
        input: [h, w],
        pooled,
        output,
        kernel,
        dilation,
        pad,
        relu,
        residual,
    };
    Ok(Some((geometry, weights.cast_to::<f32>()?.into_owned(), bias, sources, last)))
}

/// The value of `outlet` when it is a constant, or a float constant cast to another float type
/// (the cast is what the kernel's packing does anyway: folding IS-Net's f16 weights to f32
/// up front would hold both copies, 264 MB, at once).
fn constant(model: &TypedModel, outlet: OutletId) -> TractResult<Option<Arc<Tensor>>> {
    if let Some(k) = &model.outlet_fact(outlet)?.konst {
        return Ok(Some(k.clone()));
    }
    Ok(float_cast_of_constant(model, model.node(outlet.node)).map(|(_, val)| val.clone()))
}

/// When `node` casts a plain float constant to another float type: the type it casts to and
/// the constant's value.
pub(crate) fn float_cast_of_constant<'a>(model: &'a TypedModel, node: &TypedNode) -> Option<(DatumType, &'a Arc<Tensor>)> {
    use tract_onnx::tract_core::ops::{cast::Cast, konst::Const};
    let cast = node.op_as::<Cast>()?;
    let konst = model.node(node.inputs[0].node).op_as::<Const>()?;
    let val = konst.val();
    (konst.exotic_fact().is_none() && val.datum_type().is_float() && cast.to.is_float()).then_some((cast.to, val))
}

/// Whether `pool` is a 2x2 max pool, stride 2, no padding, from an f32 NCHW `input` of exactly
/// twice `output`'s height and width.
fn is_plain_2x2_pool(pool: &MaxPool, input: Option<[usize; 4]>, [h, w]: [usize; 2]) -> bool {
    let spec = &pool.pool_spec;
    let Some([1, _, ih, iw]) = input else {
        return false;
    };
    let padding = spec.computed_padding(&[ih, iw]);
    pool.with_index_outputs.is_none()
        && spec.data_format == DataFormat::NCHW
        && spec.kernel_shape[..] == [2, 2]
        && spec.strides()[..] == [2, 2]
        && spec.dilations().iter().all(|d| *d == 1)
        && (ih, iw) == (2 * h, 2 * w)
        && padding.iter().all(|p| p.pad_before == 0 && p.pad_after == 0)
        && (padding[0].convoluted, padding[1].convoluted) == (h, w)
}

/// The other operand when `node` is the binary operator `name` (`Max`, `Add`, ...) of `input`
/// and something else.
fn other_operand(node: &TypedNode, name: &str, input: OutletId) -> Option<OutletId> {
    if node.op_as::<TypedBinOp>()?.0.name() != name {
        return None;
    }
    match node.inputs[..] {
        [a, b] if a == input && b != input => Some(b),
        [a, b] if b == input && a != input => Some(a),
        _ => None,
    }
}

/// The other term when `node` adds `input` to an f32 tensor of the same `shape` (no broadcast).
fn residual_of(
    model: &TypedModel,
    node: &TypedNode,
    input: OutletId,
    shape: [usize; 4],
) -> TractResult<Option<OutletId>> {
    let Some(other) = other_operand(node, "Add", input) else {
        return Ok(None);
    };
    let same_shape = nchw_f32(model.outlet_fact(other)?) == Some(shape)
        && nchw_f32(model.outlet_fact(OutletId::new(node.id, 0))?) == Some(shape);
    Ok(same_shape.then_some(other))
}

/// Whether `node` is `max(x, 0)` (ONNX Relu after declutter) of `input`.
fn is_relu_of(model: &TypedModel, node: &TypedNode, input: OutletId) -> TractResult<bool> {
    let Some(other) = other_operand(node, "Max", input) else {
        return Ok(false);
    };
    Ok(match &model.outlet_fact(other)?.konst {
        Some(k) if k.len() == 1 && k.datum_type().is_float() => k.cast_to_scalar::<f32>()? == 0.0,
        _ => false,
    })
}

/// What a [`DirectConv`] computes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Geometry {
    /// Channels of each input, in concatenation order.
    pub channels: Vec<usize>,
    /// Input height and width.
    pub input: [usize; 2],
    /// Whether the one input is read through a 2x2, stride-2 max pool (so it is 2H x 2W).
    pub pooled: bool,
    /// [1, M, OH, OW].
    pub output: [usize; 4],
    pub kernel: [usize; 2],
    pub dilation: [usize; 2],
    /// Zero padding before the first row and column (the after side follows from the output).
    pub pad: [usize; 2],
    pub relu: bool,
    /// Whether a tensor of the output's shape is added (after the Relu): the last input.
    pub residual: bool,
}

/// A stride-1, group-1 NCHW f32 convolution with its bias, optional Relu, and one or more inputs
/// read as one channel concatenation.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectConv {
    isa: Isa,
    geometry: Geometry,
    /// How the rows a task reads are copied.
    band: Band,
    /// Per tap (ky, kx): its offset in the input copy.
    tap_offsets: Vec<usize>,
    /// Output channels per tile: the kernel's, or 1 when the convolution has fewer.
    tile_channels: usize,
    /// Weights as [tile][input channel][tap][tile_channels], zero past M.
    weights: Arc<Weights>,
    /// One per output channel.
    bias: Arc<Vec<f32>>,
}

impl Eq for DirectConv {}

/// Packed weights, kept as f16 when every value is one (IS-Net medium ships f16 weights: 88 MB
/// instead of 176) and widened per tile group as a band uses them, which costs ~1% of the work.
#[derive(Debug, PartialEq)]
enum Weights {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Weights {
    fn new(packed: Vec<f32>) -> Weights {
        let halves: Vec<f16> = packed.iter().map(|v| f16::from_f32(*v)).collect();
        if halves
            .iter()
            .zip(&packed)
            .all(|(h, v)| h.to_f32().to_bits() == v.to_bits())
        {
            Weights::F16(halves)
        } else {
            Weights::F32(packed)
        }
    }

    /// `range` of the weights as f32, widened into `buffer` if need be.
    fn f32s<'a>(&'a self, range: std::ops::Range<usize>, buffer: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        match self {
            Weights::F32(w) => &w[range],
            Weights::F16(w) => {
                buffer.resize(range.len(), 0.0);
                w[range].convert_to_f32_slice(buffer);
                buffer
            }
        }
    }
}

/// Output rows per task; rows of the thread's input copy; image rows between copied rows;
/// copied rows between kernel rows; values per copied row; values per copied channel. A value is
/// 4 bytes: an f32, or for the int8 kernels four channels' bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Band {
    pub rows_out: usize,
    pub rows: usize,
    pub image_step: usize,
    pub ky_step: usize,
    pub row_len: usize,
    pub channel_len: usize,
}

impl Band {
    /// The band for `copies` copied channels (of 4-byte values) of `geometry`'s input, read by
    /// vectors of `vl` values in tiles of `nv`.
    ///
    /// A task covers whole tiles of vectors: rows in threes (twos for AVX2) unless a row splits
    /// into them. Taller bands copy fewer rows twice; tall images can afford them and still make
    /// dozens of tasks. But the copy must stay in the core's own L2 with room for the weights:
    /// from the shared L3 (shared with the other cores, and on a VM with other tenants) IS-Net's
    /// widest layers ran 25% slower at 2 threads. Failing that, one output row per task copies
    /// only the kernel's rows.
    pub(crate) fn plan(geometry: &Geometry, copies: usize, vl: usize, nv: usize) -> Band {
        let [_, _, oh, ow] = geometry.output;
        let (kernel, dilation) = (geometry.kernel, geometry.dilation);
        let per_row = ow.div_ceil(vl);
        let row_len = per_row * vl + dilation[1] * (kernel[1] - 1);
        let reach = dilation[0] * (kernel[0] - 1);
        let step = if per_row.is_multiple_of(nv) { 1 } else { nv };
        let fits = |rows: usize| copies * rows * row_len * 4 <= BAND_BUDGET;
        let rows_out = (1..=(oh / 48).clamp(1, 3))
            .rev()
            .map(|k| step * k)
            .find(|r| fits(r + reach))
            .unwrap_or(1)
            .min(oh);
        let (rows, image_step, ky_step) = if rows_out == 1 {
            (kernel[0], dilation[0], 1)
        } else {
            (rows_out + reach, 1, dilation[0])
        };
        let mut channel_len = rows * row_len;
        // Copied channels a multiple of 4 KiB apart would all compete for the same L1 sets.
        if channel_len.is_multiple_of(1024) {
            channel_len += vl;
        }
        Band {
            rows_out,
            rows,
            image_step,
            ky_step,
            row_len,
            channel_len,
        }
    }

    /// Per tap (ky, kx) of `geometry`'s kernel: its offset in a channel's copy, in values.
    pub(crate) fn tap_offsets(&self, geometry: &Geometry) -> Vec<usize> {
        let [kh, kw] = geometry.kernel;
        (0..kh * kw)
            .map(|t| (t / kw) * self.ky_step * self.row_len + (t % kw) * geometry.dilation[1])
            .collect()
    }
}

impl DirectConv {

    pub(crate) fn new(isa: Isa, geometry: Geometry, weights: &[f32], bias: Vec<f32>) -> DirectConv {
        let [_, m, _, _] = geometry.output;
        let c: usize = geometry.channels.iter().sum();
        let taps = geometry.kernel[0] * geometry.kernel[1];
        let (vl, [mt, nv]) = (isa.lanes(), isa.tile());
        let tc = if m < mt { 1 } else { mt };
        let mut packed = vec![0f32; m.div_ceil(tc) * c * taps * tc];
        for (o, per_out) in weights.chunks_exact(c * taps).enumerate() {
            for (i, per_in) in per_out.chunks_exact(taps).enumerate() {
                for (t, &v) in per_in.iter().enumerate() {
                    packed[(((o / tc) * c + i) * taps + t) * tc + o % tc] = v;
                }
            }
        }
        let band = Band::plan(&geometry, c, vl, nv);
        let tap_offsets = band.tap_offsets(&geometry);
        DirectConv {
            isa,
            geometry,
            band,
            tap_offsets,
            tile_channels: tc,
            weights: Arc::new(Weights::new(packed)),
            bias: Arc::new(bias),
        }
    }

    /// Adds the values it convolves (its inputs after the max pool it reads through, not the
    /// residual) to `histograms`, one per input.
    pub fn observe(&self, inputs: &[TValue], histograms: &mut Vec<super::calibration::Histogram>) -> TractResult<()> {
        let g = &self.geometry;
        let [h, w] = g.input;
        histograms.resize_with(g.channels.len(), Default::default);
        for (input, histogram) in inputs[..g.channels.len()].iter().zip(histograms.iter_mut()) {
            let view = input.try_as_plain_ram()?;
            let values = view.as_slice::<f32>()?;
            if g.pooled {
                for plane in values.chunks_exact(4 * h * w) {
                    for y in 0..h {
                        let (above, below) = plane[4 * y * w..][..4 * w].split_at(2 * w);
                        histogram.add((0..w).map(|x| {
                            f32::MIN
                                .max(above[2 * x])
                                .max(above[2 * x + 1])
                                .max(below[2 * x])
                                .max(below[2 * x + 1])
                        }));
                    }
                }
            } else {
                histogram.add(values.iter().copied());
            }
        }
        Ok(())
    }

    /// Whether it adds a residual to its output.
    #[cfg(test)]
    pub fn adds_residual(&self) -> bool {
        self.geometry.residual
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
                let Scratch { rows, weights } = &mut *scratch.borrow_mut();
                let y0 = task * self.band.rows_out;
                self.fill(inputs, rows, y0);
                // SAFETY: `DirectConv` exists only where its kernel is supported; the copy was
                // sized and filled for this band; tasks write disjoint output rows.
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { self.band_avx512(rows, weights, &out, y0) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { self.band_avx2(rows, weights, &out, y0) },
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => unsafe { self.band_neon(rows, weights, &out, y0) },
                    #[allow(unreachable_patterns)]
                    other => unreachable!("{other:?} is not supported here, so never built"),
                }
            })
        });
    }

    /// Copies the input rows output rows `y0..` need, zero-padded, into `scratch`.
    fn fill(&self, inputs: &[&[f32]], scratch: &mut Vec<f32>, y0: usize) {
        let [h, w] = self.geometry.input;
        let b = self.band;
        let total: usize = self.geometry.channels.iter().sum();
        if scratch.len() < total * b.channel_len {
            scratch.resize(total * b.channel_len, 0.0);
        }
        let mut dst = scratch.chunks_exact_mut(b.channel_len);
        let scale = if self.geometry.pooled { 2 } else { 1 };
        let source_w = scale * w;
        for input in inputs {
            for plane in input.chunks_exact(scale * h * source_w) {
                let channel = dst.next().expect("sized for every channel");
                for (r, row) in channel.chunks_exact_mut(b.row_len).take(b.rows).enumerate() {
                    let iy = (y0 + r * b.image_step)
                        .checked_sub(self.geometry.pad[0])
                        .filter(|y| *y < h);
                    match iy {
                        Some(iy) => {
                            row[..self.geometry.pad[1]].fill(0.0);
                            let dst = &mut row[self.geometry.pad[1]..][..w];
                            if self.geometry.pooled {
                                let above = plane[2 * iy * source_w..][..source_w].chunks_exact(2);
                                let below = plane[(2 * iy + 1) * source_w..][..source_w].chunks_exact(2);
                                // tract's order of comparisons, from f32::MIN.
                                for ((o, a), b) in dst.iter_mut().zip(above).zip(below) {
                                    *o = f32::MIN.max(a[0]).max(a[1]).max(b[0]).max(b[1]);
                                }
                            } else {
                                dst.copy_from_slice(&plane[iy * w..][..w]);
                            }
                            row[self.geometry.pad[1] + w..].fill(0.0);
                        }
                        None => row.fill(0.0),
                    }
                }
            }
        }
    }

    /// Computes output rows `y0..y0 + rows_out` (fewer at the bottom) from the filled copy,
    /// tile by tile with `tile(T, N, weights, tile index, first vector)`: T output channels
    /// (`MT` or 1) by N vectors (1..=NT, or `SINGLE` or 1 when T is 1).
    #[inline(always)]
    fn band<const VL: usize, const MT: usize, const NT: usize, const SINGLE: usize>(
        &self,
        widened: &mut Vec<f32>,
        y0: usize,
        mut tile: impl FnMut(usize, usize, &[f32], usize, usize),
    ) {
        let [_, m, oh, ow] = self.geometry.output;
        let c: usize = self.geometry.channels.iter().sum();
        let per_row = ow.div_ceil(VL);
        let vectors = per_row * self.band.rows_out.min(oh - y0);
        let tc = self.tile_channels;
        let tiles = m.div_ceil(tc);
        let tile_weights = c * self.tap_offsets.len() * tc;
        let group = (WEIGHT_BUDGET / (tile_weights * 4)).clamp(1, tiles);
        for first in (0..tiles).step_by(group) {
            let end = (first + group).min(tiles);
            let group_weights = self.weights.f32s(first * tile_weights..end * tile_weights, widened);
            let per_tile = if tc == MT { NT } else { SINGLE };
            for v in (0..vectors).step_by(per_tile) {
                let n = (vectors - v).min(per_tile);
                for t in first..end {
                    let weights = &group_weights[(t - first) * tile_weights..][..tile_weights];
                    if tc == MT || n == SINGLE {
                        tile(tc, n, weights, t, v);
                    } else {
                        (v..v + n).for_each(|v| tile(1, 1, weights, t, v));
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn band_avx512(&self, scratch: &[f32], widened: &mut Vec<f32>, out: &SharedOut, y0: usize) {
        self.band::<AVX512_LANES, AVX512_T, AVX512_N, AVX512_SINGLE>(widened, y0, |tc, n, weights, tile, v| {
            // SAFETY: the caller guarantees AVX-512F.
            unsafe {
                match (tc, n) {
                    (AVX512_T, 3) => self.tile_avx512::<AVX512_T, 3>(scratch, weights, out, tile, y0, v),
                    (AVX512_T, 2) => self.tile_avx512::<AVX512_T, 2>(scratch, weights, out, tile, y0, v),
                    (AVX512_T, _) => self.tile_avx512::<AVX512_T, 1>(scratch, weights, out, tile, y0, v),
                    (_, AVX512_SINGLE) => self.tile_avx512::<1, AVX512_SINGLE>(scratch, weights, out, tile, y0, v),
                    _ => self.tile_avx512::<1, 1>(scratch, weights, out, tile, y0, v),
                }
            }
        })
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn band_avx2(&self, scratch: &[f32], widened: &mut Vec<f32>, out: &SharedOut, y0: usize) {
        self.band::<AVX2_LANES, AVX2_T, AVX2_N, AVX2_SINGLE>(widened, y0, |tc, n, weights, tile, v| {
            // SAFETY: the caller guarantees AVX2 and FMA, which `tile_arrays` is compiled with
            // here (it is always inlined).
            unsafe {
                match (tc, n) {
                    (AVX2_T, 2) => self.tile_arrays::<AVX2_LANES, AVX2_T, 2>(scratch, weights, out, tile, y0, v),
                    (AVX2_T, _) => self.tile_arrays::<AVX2_LANES, AVX2_T, 1>(scratch, weights, out, tile, y0, v),
                    (_, AVX2_SINGLE) => {
                        self.tile_arrays::<AVX2_LANES, 1, AVX2_SINGLE>(scratch, weights, out, tile, y0, v)
                    }
                    _ => self.tile_arrays::<AVX2_LANES, 1, 1>(scratch, weights, out, tile, y0, v),
                }
            }
        })
    }

    #[cfg(target_arch = "aarch64")]
    unsafe fn band_neon(&self, scratch: &[f32], widened: &mut Vec<f32>, out: &SharedOut, y0: usize) {
        self.band::<NEON_LANES, NEON_T, NEON_N, NEON_SINGLE>(widened, y0, |tc, n, weights, tile, v| {
            // SAFETY: as for this function; NEON and FMA are part of aarch64.
            unsafe {
                match (tc, n) {
                    (NEON_T, 3) => self.tile_arrays::<NEON_LANES, NEON_T, 3>(scratch, weights, out, tile, y0, v),
                    (NEON_T, 2) => self.tile_arrays::<NEON_LANES, NEON_T, 2>(scratch, weights, out, tile, y0, v),
                    (NEON_T, _) => self.tile_arrays::<NEON_LANES, NEON_T, 1>(scratch, weights, out, tile, y0, v),
                    (_, NEON_SINGLE) => {
                        self.tile_arrays::<NEON_LANES, 1, NEON_SINGLE>(scratch, weights, out, tile, y0, v)
                    }
                    _ => self.tile_arrays::<NEON_LANES, 1, 1>(scratch, weights, out, tile, y0, v),
                }
            }
        })
    }

    /// For a tile of `T` channels by the `N` vectors from band vector `v`: where the vectors
    /// start in a channel's copy and in an output plane, and how many of their `VL` lanes are
    /// inside the row. Checks that every load the tile makes stays inside the copy and every
    /// weight it reads inside `weights`.
    #[inline(always)]
    fn vectors<const VL: usize, const T: usize, const N: usize>(
        &self,
        scratch: &[f32],
        weights: &[f32],
        y0: usize,
        v: usize,
    ) -> ([usize; N], [usize; N], [usize; N]) {
        let [_, _, _, ow] = self.geometry.output;
        let c: usize = self.geometry.channels.iter().sum();
        let last_tap = *self.tap_offsets.last().expect("a kernel has taps");
        let per_row = ow.div_ceil(VL);
        let mut base = [0usize; N];
        let mut at = [0usize; N];
        let mut lanes = [0usize; N];
        for j in 0..N {
            let (r, x) = ((v + j) / per_row, ((v + j) % per_row) * VL);
            base[j] = r * self.band.row_len + x;
            at[j] = (y0 + r) * ow + x;
            lanes[j] = (ow - x).min(VL);
        }
        assert!((c - 1) * self.band.channel_len + base[N - 1] + last_tap + VL <= scratch.len());
        assert_eq!(weights.len(), c * self.tap_offsets.len() * T);
        (base, at, lanes)
    }

    /// Output channels `tile*T..` for the `N` vectors of `VL` lanes from band vector `v`, in
    /// plain arrays: the caller's target features decide the vector code.
    #[inline(always)]
    unsafe fn tile_arrays<const VL: usize, const T: usize, const N: usize>(
        &self,
        scratch: &[f32],
        weights: &[f32],
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        let [_, m, oh, ow] = self.geometry.output;
        let c: usize = self.geometry.channels.iter().sum();
        let (base, at, lanes) = self.vectors::<VL, T, N>(scratch, weights, y0, v);
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        let mut acc = [[[0f32; VL]; N]; T];
        // SAFETY: bounds checked by `vectors`.
        unsafe {
            for ch in 0..c {
                let channel = s.add(ch * self.band.channel_len);
                for &off in &self.tap_offsets {
                    let mut x = [[0f32; VL]; N];
                    for j in 0..N {
                        x[j] = channel.add(base[j] + off).cast::<[f32; VL]>().read_unaligned();
                    }
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let k = *w.add(i);
                        for j in 0..N {
                            for l in 0..VL {
                                acc[j][l] = x[j][l].mul_add(k, acc[j][l]);
                            }
                        }
                    }
                    w = w.add(T);
                }
            }
        }
        let plane = oh * ow;
        for (i, acc) in acc.iter().enumerate() {
            let o = tile * T + i;
            if o >= m {
                break;
            }
            let bias = self.bias[o];
            for j in 0..N {
                let mut r = [0f32; VL];
                for l in 0..VL {
                    r[l] = acc[j][l] + bias;
                    if self.geometry.relu {
                        // As MAXPS(r, 0): zero for NaN and -0 too.
                        r[l] = if r[l] > 0.0 { r[l] } else { 0.0 };
                    }
                }
                let n = lanes[j];
                // SAFETY: lanes `at[j]..at[j] + n` are inside output row `(y0 + r)`, which only
                // this task writes, and inside the residual of the same shape.
                unsafe {
                    let dst = std::slice::from_raw_parts_mut(out.0.add(o * plane + at[j]), n);
                    if self.geometry.residual {
                        let add = std::slice::from_raw_parts(out.1.add(o * plane + at[j]), n);
                        for l in 0..n {
                            r[l] += add[l];
                        }
                    }
                    dst.copy_from_slice(&r[..n]);
                }
            }
        }
    }

    /// Output channels `tile*T..` for the `N` vectors from band vector `v`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile_avx512<const T: usize, const N: usize>(
        &self,
        scratch: &[f32],
        weights: &[f32],
        out: &SharedOut,
        tile: usize,
        y0: usize,
        v: usize,
    ) {
        use std::arch::x86_64::*;
        let [_, m, oh, ow] = self.geometry.output;
        let c: usize = self.geometry.channels.iter().sum();
        let (base, at, valid) = self.vectors::<AVX512_LANES, T, N>(scratch, weights, y0, v);
        let lanes = valid.map(|n| u16::MAX >> (AVX512_LANES - n));
        let s = scratch.as_ptr();
        let mut w = weights.as_ptr();
        // SAFETY: bounds checked by `vectors`; the caller guarantees AVX-512F.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; T];
            for ch in 0..c {
                let channel = s.add(ch * self.band.channel_len);
                for &off in &self.tap_offsets {
                    let mut x = [_mm512_setzero_ps(); N];
                    for j in 0..N {
                        x[j] = _mm512_loadu_ps(channel.add(base[j] + off));
                    }
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let k = _mm512_set1_ps(*w.add(i));
                        for j in 0..N {
                            acc[j] = _mm512_fmadd_ps(x[j], k, acc[j]);
                        }
                    }
                    w = w.add(T);
                }
            }
            let plane = oh * ow;
            for (i, acc) in acc.iter().enumerate() {
                let o = tile * T + i;
                if o >= m {
                    break;
                }
                let bias = _mm512_set1_ps(self.bias[o]);
                for j in 0..N {
                    let mut r = _mm512_add_ps(acc[j], bias);
                    if self.geometry.relu {
                        r = _mm512_max_ps(r, _mm512_setzero_ps());
                    }
                    if self.geometry.residual {
                        r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(lanes[j], out.1.add(o * plane + at[j])));
                    }
                    _mm512_mask_storeu_ps(out.0.add(o * plane + at[j]), lanes[j], r);
                }
            }
        }
    }
}

/// Each thread's working copies: the input rows its current band reads, and the current tile
/// group's weights widened to f32.
struct Scratch {
    rows: Vec<f32>,
    weights: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new(Scratch { rows: Vec::new(), weights: Vec::new() }) };
}

/// The output tensor's data, written by all tasks at disjoint offsets, and the residual added
/// to it (null without one).
pub(crate) struct SharedOut(pub *mut f32, pub *const f32);
// SAFETY: tasks write disjoint rows of the output through it, and the tensor outlives `run`.
unsafe impl Sync for SharedOut {}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} -> {:?} kernel {:?} dilation {:?} relu {} residual {}",
            self.geometry.channels,
            self.geometry.output,
            self.geometry.kernel,
            self.geometry.dilation,
            self.geometry.relu,
            self.geometry.residual
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.geometry.channels.len() + usize::from(self.geometry.residual));
        let [h, w] = self.geometry.input;
        let views = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let slices = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        let scale = if self.geometry.pooled { 4 } else { 1 };
        if self.geometry.residual {
            let len = slices.last().map_or(0, |s| s.len());
            ensure!(
                len == self.geometry.output.iter().product::<usize>(),
                "residual of {len} values"
            );
        }
        for (s, c) in slices.iter().zip(&self.geometry.channels) {
            ensure!(
                s.len() == scale * c * h * w,
                "input of {} values, expected {}",
                s.len(),
                scale * c * h * w
            );
        }
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every element.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.geometry.output)? };
        self.run(&slices, out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for DirectConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(self.geometry.output)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain convolution in f64: the reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        input: &[f32],
        c: usize,
        [h, w]: [usize; 2],
        weights: &[f32],
        bias: &[f32],
        [_, m, oh, ow]: [usize; 4],
        [kh, kw]: [usize; 2],
        [dy, dx]: [usize; 2],
        [py, px]: [usize; 2],
        relu: bool,
    ) -> Vec<f32> {
        let mut out = vec![0f32; m * oh * ow];
        for o in 0..m {
            for y in 0..oh {
                for x in 0..ow {
                    let mut s = bias[o] as f64;
                    for i in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y + ky * dy) as isize - py as isize;
                                let ix = (x + kx * dx) as isize - px as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                s += input[(i * h + iy as usize) * w + ix as usize] as f64
                                    * weights[((o * c + i) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    out[(o * oh + y) * ow + x] = if relu { s.max(0.0) } else { s } as f32;
                }
            }
        }
        out
    }

    /// A task's input copy stays within the budget by taking fewer rows, down to one output
    /// row (the kernel's rows only) when even three do not fit.
    #[test]
    fn bands_shrink_to_fit_the_budget() {
        let band = |channels: usize, [h, w]: [usize; 2]| {
            let geometry = Geometry {
                channels: vec![channels],
                input: [h, w],
                pooled: false,
                output: [1, 8, h, w],
                kernel: [3, 3],
                dilation: [1, 1],
                pad: [1, 1],
                relu: false,
                residual: false,
            };
            let op = DirectConv::new(Isa::Avx512, geometry, &vec![0.5; 8 * channels * 9], vec![0.0; 8]);
            let copy = channels * op.band.channel_len * 4;
            (op.band.rows_out, op.band.rows, copy)
        };
        // 20 vectors a row: whole tiles need rows in threes.
        assert_eq!(band(16, [150, 300]), (9, 11, 16 * 11 * 306 * 4));
        let (rows_out, rows, copy) = band(64, [150, 300]);
        assert_eq!((rows_out, rows), (6, 8));
        assert!(copy <= BAND_BUDGET);
        let (rows_out, rows, copy) = band(160, [60, 300]);
        assert_eq!((rows_out, rows), (1, 3));
        assert!(copy <= BAND_BUDGET);
    }

    /// Shapes that exercise every path: partial vectors, one and three rows per task, tiles of
    /// 1-3 vectors, output channels past the last full tile, dilation, uneven padding, two inputs;
    /// on each instruction set this CPU has.
    #[test]
    fn matches_a_plain_convolution() {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.supported()).collect();
        for isa in Isa::ALL.into_iter().filter(|i| !i.supported() && i.native()) {
            crate::test_note(&format!("DirectConv's {isa:?} kernel is not tested here: this CPU lacks it"));
        }
        assert!(!isas.is_empty(), "this CPU has no instruction set DirectConv has a kernel for");
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
            case(&[8], [17, 33], 8, [3, 3], [2, 2], [2, 2], [2, 2], true),
            case(&[7], [40, 64], 24, [3, 3], [8, 8], [8, 8], [8, 8], true),
            case(&[3, 4, 2], [9, 16], 9, [3, 3], [4, 4], [4, 4], [4, 4], false),
            case(&[6], [12, 50], 8, [1, 1], [1, 1], [0, 0], [0, 0], true),
            case(&[4], [10, 21], 8, [5, 3], [1, 2], [1, 0], [3, 4], false),
            // One output channel: tiles of 8 vectors and single vectors.
            case(&[9, 3], [30, 70], 1, [3, 3], [1, 1], [1, 1], [1, 1], false),
            case(&[5], [7, 20], 3, [3, 3], [1, 1], [1, 1], [1, 1], true),
            // Taller bands (6 and 9 rows); 48 wide splits into threes of vectors.
            case(&[6], [100, 40], 8, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[4], [150, 48], 16, [3, 3], [2, 2], [2, 2], [2, 2], false),
            // Read through a 2x2 max pool.
            Case {
                pooled: true,
                ..case(&[6], [21, 40], 16, [3, 3], [1, 1], [1, 1], [1, 1], true)
            },
            // Wide and deep: bands cut to 6 rows, and to single rows, to fit the budget.
            case(&[64], [150, 300], 8, [3, 3], [1, 1], [1, 1], [1, 1], true),
            case(&[100, 60], [60, 300], 8, [3, 3], [1, 1], [1, 1], [1, 1], false),
            // A residual added after the Relu, and without one; with a concatenation.
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
        for Case {
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
        } in cases
        {
            let c: usize = channels.iter().sum();
            let oh = h + before[0] + after[0] - dilation[0] * (kernel[0] - 1);
            let ow = w + before[1] + after[1] - dilation[1] * (kernel[1] - 1);
            let output = [1, m, oh, ow];
            let scale = if pooled { 2 } else { 1 };
            let source: Vec<f32> = (0..c * scale * h * scale * w).map(|_| next()).collect();
            // What the convolution sees: the source, or its 2x2 maxima.
            let input: Vec<f32> = if pooled {
                (0..c * h * w)
                    .map(|i| {
                        let (plane, y, x) = (i / (h * w), (i / w) % h, i % w);
                        let at = |dy: usize, dx: usize| source[(plane * 2 * h + 2 * y + dy) * 2 * w + 2 * x + dx];
                        at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
                    })
                    .collect()
            } else {
                source.clone()
            };
            let weights: Vec<f32> = (0..m * c * kernel[0] * kernel[1]).map(|_| next()).collect();
            let bias: Vec<f32> = (0..m).map(|_| next()).collect();
            let geometry = Geometry {
                channels: channels.to_vec(),
                input: [h, w],
                pooled,
                output,
                kernel,
                dilation,
                pad: before,
                relu,
                residual,
            };
            for &isa in &isas {
                let op = DirectConv::new(isa, geometry.clone(), &weights, bias.clone());
                let added: Vec<f32> = (0..m * oh * ow).map(|_| next()).collect();
                let mut parts = super::super::split_inputs(&source, channels, scale * h * scale * w);
                if residual {
                    parts.push(&added);
                }
                let mut out = vec![f32::NAN; m * oh * ow];
                op.run(&parts, &mut out);
                let mut want = reference(
                    &input,
                    c,
                    [h, w],
                    &weights,
                    &bias,
                    output,
                    kernel,
                    dilation,
                    before,
                    relu,
                );
                if residual {
                    want.iter_mut().zip(&added).for_each(|(w, a)| *w += a);
                }
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, |acc, d| if d.is_nan() { f32::INFINITY } else { acc.max(d) });
                assert!(
                    worst < 1e-4,
                    "{isa:?} {channels:?} {h}x{w} M{m} k{kernel:?} d{dilation:?} residual {residual}: worst difference {worst}"
                );
            }
        }
    }
}
