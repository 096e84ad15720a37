//! The model's operators: our kernels for tract's plan, and the surgery that swaps them in.
//!
//! - [`direct_conv`]: stride-1 f32 convolutions computed straight from the input rows, with the
//!   concatenation or max pool before them and the Relu and residual addition after them;
//! - [`resize`]: bilinear `Resize` split by image plane;
//! - [`quant_conv`]: the same convolutions in int8, with ranges from [`calibration`];
//! - [`sigmoid`]: a logistic function with the same bits on every CPU, for the int8 plans;
//! - [`im2col`]: the packing in front of tract's own matrix products, from runs of pixels;
//! - [`strided_conv`]: the int8 plans' f32 convolutions with a stride (IS-Net's first), whose
//!   output can be stored quantised.
//!
//! The f32 operators compute exactly what tract's own operators compute (same taps, same weights,
//! same order of operations), so outputs are bit-identical to tract's; the model tests check it
//! on both models. The int8 convolutions compute exact integer sums and one fixed order of float
//! operations on every instruction set, so their outputs are bit-identical across CPUs. The image pipeline around the model (codecs, pre/post-processing) is `engine`'s.

pub mod calibration;
pub mod direct_conv;
pub mod im2col;
pub mod quant_conv;
pub mod resize;
pub mod sigmoid;
pub mod strided_conv;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::ensure;

pub use direct_conv::{Isa, direct_convs};
pub use quant_conv::QIsa;
pub use im2col::{conv_geometries, faster_im2col};
pub use resize::{PlaneResize, parallel_resize};
pub use sigmoid::portable_sigmoids;

/// Replaces each node for which `build` gives an operator and the outlet it reads with that
/// operator (keeping the node's name), in one patch. Returns how many nodes were replaced.
pub(crate) fn swap_nodes(
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

/// Concrete NCHW f32 shape of an outlet, or None.
pub(crate) fn nchw_f32(fact: &TypedFact) -> Option<[usize; 4]> {
    if fact.datum_type != f32::datum_type() {
        return None;
    }
    let shape = fact.shape.as_concrete()?;
    <[usize; 4]>::try_from(shape).ok()
}

/// `source` split into the concatenated inputs of `channels` channels, each `plane` values a
/// channel (for the kernel tests).
#[cfg(test)]
pub(crate) fn split_inputs<'a>(source: &'a [f32], channels: &[usize], plane: usize) -> Vec<&'a [f32]> {
    let mut rest = source;
    channels
        .iter()
        .map(|n| {
            let (part, tail) = rest.split_at(n * plane);
            rest = tail;
            part
        })
        .collect()
}

/// Runs `f(0..n)`, on tract's thread pool when it has one.
pub(crate) fn par_for(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(|| (0..n).into_par_iter().for_each(f)),
        _ => (0..n).for_each(f),
    }
}

/// Runs `f(plane_index, plane)` over the `planes` equal chunks of `out`, on tract's thread pool
/// when it has one.
pub(crate) fn for_each_plane<T: Send>(out: &mut [T], plane_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
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

/// Replaces each convolution `table` has an int8 entry for with a [`QuantConv`] on `qisa`, and
/// the others with a [`DirectConv`] on `isa` (when there is one). Fails when the table names a
/// convolution the model does not have: it was made for another model.
///
/// [`QuantConv`]: quant_conv::QuantConv
/// [`DirectConv`]: direct_conv::DirectConv
pub fn quant_convs(
    model: &mut TypedModel,
    table: &calibration::Table,
    qisa: QIsa,
    isa: Option<Isa>,
) -> TractResult<(direct_conv::Replaced, usize)> {
    let mut quantised = 0;
    let isa = isa.filter(|k| k.supported());
    let replaced = direct_conv::replace_convs(model, |name, spec| match table.layers.get(name) {
        Some(layer) if layer.int8 && layer.scale.len() == spec.geometry.channels.len() => {
            quantised += 1;
            Some(Box::new(quant_conv::QuantConv::new(
                qisa,
                spec.geometry,
                spec.weights,
                spec.bias,
                &layer.quant(),
            )))
        }
        _ => isa.map(|isa| Box::new(direct_conv::DirectConv::new(isa, spec.geometry, spec.weights, spec.bias)) as _),
    })?;
    // The strided convolutions (IS-Net's first) stay f32, computed so that their output can be
    // stored quantised.
    strided_conv::strided_convs(model)?;
    let wanted = table.layers.values().filter(|l| l.int8).count();
    ensure!(
        quantised == wanted,
        "the int8 calibration table names {wanted} convolutions, {quantised} of them found in this model"
    );
    Ok((replaced, quantised))
}

/// Stores quantised the outputs of the int8 convolutions, strided convolutions and resizes whose every reader is an
/// int8 convolution reading them with one and the same quantisation (through a max pool or
/// concatenation or not; never a model output): bytes for 8-bit readers, 16-bit words for 16-bit
/// ones. Those readers then copy the stored values instead of quantising f32. An output that is
/// also a convolution's residual is stored only for 16-bit readers: the residual is then rounded
/// to those 16 bits before it is added, whether `store` or not, so that the results do not
/// depend on `store` by a bit (the writer quantises exactly as the readers would). With `store`
/// false only that rounding is set (for measuring, and for the tests that compare both). Returns
/// how many outputs it stores and their f32 bytes saved.
pub fn stored_activations(model: &mut TypedModel, store: bool) -> TractResult<(usize, usize)> {
    use quant_conv::{QuantConv, Source};
    use strided_conv::StridedConv;
    let outputs = model.output_outlets()?.to_vec();
    let mut chosen = vec![];
    for node in &model.nodes {
        let writer = node.op_is::<QuantConv>() || node.op_is::<PlaneResize>() || node.op_is::<StridedConv>();
        if !writer || outputs.contains(&OutletId::new(node.id, 0)) {
            continue;
        }
        let readers = &node.outputs[0].successors;
        // The convolved readers' one quantisation; residual readers take it too when it is
        // 16 bits (a step of 1/65535 of the range is lost in the addition's own rounding
        // nearly everywhere; 8 bits would not be).
        let mut quant: Option<Source> = None;
        let mut residual = false;
        let agreed = readers.iter().all(|r| {
            let Some(conv) = model.node(r.node).op_as::<QuantConv>() else {
                return false;
            };
            if conv.is_residual(r.slot) {
                residual = true;
                return true;
            }
            match conv.source(r.slot) {
                Some(q) if quant.is_none_or(|p| p == q) => {
                    quant = Some(q);
                    true
                }
                _ => false,
            }
        });
        match quant {
            Some(q @ Source::Bits16(_)) if agreed => chosen.push((node.id, q, readers.clone())),
            Some(q @ Source::Bits8(_)) if agreed && !residual => chosen.push((node.id, q, readers.clone())),
            _ => {}
        }
    }
    let mut saved = 0;
    for (id, quant, readers) in &chosen {
        for reader in readers {
            let node = &mut model.nodes[reader.node];
            let conv = node.op_as::<QuantConv>().expect("chosen above").clone();
            node.op = Box::new(match (quant, store) {
                (Source::Bits16(q), _) if conv.is_residual(reader.slot) => {
                    let conv = conv.with_residual_quant(*q);
                    if store { conv.with_stored_residual() } else { conv }
                }
                (_, true) => conv.with_stored_input(reader.slot),
                (_, false) => conv,
            });
        }
        if !store {
            continue;
        }
        let node = &mut model.nodes[*id];
        let op: Box<dyn TypedOp> = if let Some(conv) = node.op_as::<QuantConv>() {
            Box::new(conv.clone().with_stored_output(*quant))
        } else if let Some(conv) = node.op_as::<StridedConv>() {
            Box::new(conv.clone().with_stored_output(*quant))
        } else {
            Box::new(node.op_as::<PlaneResize>().expect("chosen above").clone().with_stored_output(*quant))
        };
        let fact = op.output_facts(&[])?.remove(0);
        let values: usize = fact.shape.as_concrete().map_or(0, |s| s.iter().product());
        saved += values * (4 - fact.datum_type.size_of());
        node.outputs[0].fact = fact;
        node.op = op;
    }
    Ok((if store { chosen.len() } else { 0 }, saved))
}

/// Whether this CPU has AVX-512F.
pub fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
