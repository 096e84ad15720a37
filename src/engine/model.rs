//! Loading a segmentation model with tract: fix the input fact, pick the one output we use,
//! choose the numeric precision, optimise once, and share the plan.

use std::path::Path;
use std::sync::{Mutex, Once};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::knobs::KnobScope;
use tract_onnx::tract_hir::infer::Factoid;

use crate::ops::calibration::{Histogram, Table};
use crate::ops::direct_conv::DirectConv;
use crate::ops::{self, Isa, QIsa};
use super::{EngineError, Pipeline};

type Plan = Arc<TypedSimplePlan>;
type PlanState = TypedSimpleState;

/// Numeric precision the optimised plan computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// int8 for a model whose calibration table (`models/int8/`) meets the fidelity bound,
    /// else f32. f16 on ARMv8.2+ FP16 cores was only seen under emulation, where u2netp's mask
    /// landed just outside the fidelity bound (1.007/255 against 1.0), so it stays an explicit
    /// choice.
    Auto,
    F32,
    F16,
    /// Convolutions in int8 (u8 activations, s8 weights), with the ranges of the model's
    /// calibration table; the layers the table keeps in f32 and everything else in f32.
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Makes tract's matrix products fan out over `threads` cores, so a single image in flight uses
/// the whole machine. Process-wide; the first call wins.
pub fn use_threads(threads: usize) {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if threads > 1 {
            multithread::set_default_executor(multithread::Executor::multithread(threads));
        } else {
            // Parallel code outside tract's pool (see `on_pool`) then stays on one thread too.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(1).build_global();
        }
    });
}

/// Runs `f` on the inference threads when there are several, so the parallel iterators in it
/// (resizes, PNG bands) use those threads and no others.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match multithread::current_tract_executor() {
        multithread::Executor::MultiThread(pool) => pool.install(f),
        _ => f(),
    }
}

/// Which operators replace tract's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ops {
    /// tract's operators only.
    Tract,
    /// Our im2col and resize only (what runs on CPUs without AVX-512).
    #[cfg(test)]
    SameResults,
    /// All of ours, including the direct convolution on `isa` (when this CPU has it), and for
    /// int8 the int8 convolution on the fastest kernel this CPU has.
    Ours(Option<Isa>),
    /// All of ours, the int8 convolutions on `QIsa`; the bool: whether outputs read only by
    /// int8 layers are stored as bytes (as `Ours` does) or left f32.
    #[cfg(test)]
    Int8(QIsa, Option<Isa>, bool),
}

/// An optimised, runnable model, shared by every job: the plan is behind an `Arc`, and its run
/// state is recycled between inferences instead of rebuilt.
pub struct Model {
    plan: Plan,
    pipeline: Pipeline,
    precision: Precision,
    /// The one run state (with its scratch buffers), recycled between inferences. Holding its
    /// lock is what makes inferences take turns: each already uses every core, and a second
    /// one at the same time would only double the activation memory (IS-Net: ~220 MB) and
    /// slow both down.
    state: Mutex<Option<PlanState>>,
    /// Run states built so far (1 unless a run failed).
    spawned: std::sync::atomic::AtomicUsize,
}

impl Model {
    /// Loads `path`. With `pipeline` unset, it is told from the model's declared input size.
    pub fn load(path: &Path, pipeline: Option<Pipeline>, precision: Precision) -> Result<Model, EngineError> {
        let model = Self::build(path, pipeline, precision, Ops::Ours(Isa::chosen()));
        // Loading passes through ~200 MB (IS-Net) of parsed, widened and repacked weights that
        // are freed by now; the allocator is tuned never to give memory back on its own
        // (main.rs), so hand these pages back, here and between the load's steps. The big
        // blocks kept for reuse too: the load's temporaries are not what the inferences need,
        // and would set the cache's high-water mark.
        crate::memory::give_back();
        model
    }

    /// `load`, with a choice of which of our operators replace tract's (for the tests that
    /// compare them).
    fn build(path: &Path, pipeline: Option<Pipeline>, precision: Precision, ops: Ops) -> Result<Model, EngineError> {
        Self::build_with(path, pipeline, precision, ops, None)
    }

    /// The model in int8 with `table` instead of the embedded one (to calibrate and measure).
    pub fn load_with_table(path: &Path, pipeline: Pipeline, table: Table) -> Result<Model, EngineError> {
        Self::build_with(path, Some(pipeline), Precision::Int8, Ops::Ours(Isa::chosen()), Some(table))
    }

    /// The f32 model run on each of `inputs` (preprocessed): per convolution our kernels take
    /// over (by node name), a histogram of the values it convolves.
    pub fn calibrate(
        path: &Path,
        pipeline: Pipeline,
        inputs: impl IntoIterator<Item = Vec<f32>>,
    ) -> Result<std::collections::BTreeMap<String, Vec<Histogram>>, EngineError> {
        let model = Self::build(path, Some(pipeline), Precision::F32, Ops::Ours(Isa::chosen()))?;
        let fail = |e: TractError| EngineError::Inference(format!("{e:#}"));
        let mut state = model.plan.spawn().map_err(fail)?;
        let mut histograms = std::collections::BTreeMap::<String, Vec<Histogram>>::new();
        let s = pipeline.input_size() as usize;
        for input in inputs {
            let tensor: Tensor = tract_ndarray::Array4::from_shape_vec((1, 3, s, s), input)
                .map_err(|e| EngineError::Inference(format!("input tensor: {e}")))?
                .into();
            state
                .run_plan_with_eval(tvec!(tensor.into_tvalue()), |ctx, op_state, node, inputs| {
                    if let Some(conv) = node.op_as::<DirectConv>() {
                        conv.observe(&inputs, histograms.entry(node.name.clone()).or_default())?;
                    }
                    tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs)
                })
                .map_err(fail)?;
        }
        if histograms.is_empty() {
            return Err(EngineError::Model(
                "calibration needs the f32 direct convolutions (AVX2, AVX-512 or NEON); this CPU has none".into(),
            ));
        }
        Ok(histograms)
    }

    fn build_with(
        path: &Path,
        pipeline: Option<Pipeline>,
        precision: Precision,
        ops: Ops,
        table: Option<Table>,
    ) -> Result<Model, EngineError> {
        let fail = |stage: &str, e: TractError| EngineError::Model(format!("{}: {stage}: {e:#}", path.display()));
        let mut model = tract_onnx::onnx().model_for_path(path).map_err(|e| fail("parse", e))?;
        // The file's bytes and its decoded protobuf are gone: hand their pages back before the
        // weights are converted.
        crate::memory::give_back();
        let pipeline = match pipeline {
            Some(p) => p,
            None => detect_pipeline(&model).ok_or_else(|| {
                EngineError::Model(format!(
                    "{}: cannot tell the model's pipeline from its input shape; expected 1x3x1024x1024 (IS-Net) or 1x3x320x320 (U^2-Net)",
                    path.display()
                ))
            })?,
        };
        let s = pipeline.input_size() as usize;
        model
            .set_input_fact(0, f32::fact([1, 3, s, s]).into())
            .map_err(|e| fail("input fact", e))?;
        // IS-Net exports a dozen side outputs; computing only the final mask saves ~5%.
        let outputs = model.output_outlets().map_err(|e| fail("outputs", e))?.to_vec();
        let wanted = outputs
            .iter()
            .copied()
            .find(|o| model.node(o.node).name == "output" || model.outlet_label(*o) == Some("output"))
            .unwrap_or(outputs[0]);
        model
            .select_output_outlets(&[wanted])
            .map_err(|e| fail("select output", e))?;

        let mut typed = model.into_typed().map_err(|e| fail("typing", e))?;
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let table = match table {
            Some(table) => Some(table),
            None => Table::for_model(size).map_err(EngineError::Model)?,
        }
        .filter(|t| !t.layers.is_empty());
        let precision = match precision {
            Precision::Auto if table.as_ref().is_some_and(|t| t.auto) => Precision::Int8,
            Precision::Auto => Precision::F32,
            Precision::Int8 if table.is_none() => {
                return Err(EngineError::Model(format!(
                    "{}: no int8 calibration table for this model file (models/int8/ has them for the manifest's models); use --precision f32",
                    path.display()
                )));
            }
            other => other,
        };
        let (from, to) = if precision == Precision::F16 {
            (f32::datum_type(), f16::datum_type())
        } else {
            (f16::datum_type(), f32::datum_type())
        };
        // Stored f16 (IS-Net medium) runs emulated and slow on x86: widen it before optimising.
        if typed_uses(&typed, from) {
            typed
                .transform(&FloatPrecisionTranslator::new(from, to))
                .map_err(|e| fail("precision", e))?;
        }
        // tract's own convolutions read constants; ours read through the casts (folded after
        // they went in, so the weights they pack are never held in f16 and f32 at once).
        if ops == Ops::Tract {
            fold_const_casts(&mut typed).map_err(|e| fail("fold casts", e))?;
        }
        // im2col + matmul beats tract's direct spatial convolution on these nets (SOURCES.md: 11.3 s -> 7.65 s).
        let scope = KnobScope::new([("TRACT_DISABLE_DIRECT_SPATIAL", "true")]).map_err(|e| fail("knobs", e))?;
        // `into_optimized()` in two steps: the direct convolutions go in, and the remaining
        // convolutions' geometry is read, between them.
        let (geometries, direct, stored) = scope
            .enter(|| {
                typed.declutter()?;
                let int8 = table.as_ref().filter(|_| precision == Precision::Int8);
                let (direct, stored) = match (ops, int8) {
                    (Ops::Ours(isa), Some(table)) => {
                        (ops::quant_convs(&mut typed, table, QIsa::chosen(), int8_f32(isa))?.0, true)
                    }
                    #[cfg(test)]
                    (Ops::Int8(qisa, isa, stored), Some(table)) => (ops::quant_convs(&mut typed, table, qisa, isa)?.0, stored),
                    (Ops::Ours(isa), None) => (ops::direct_convs(&mut typed, isa)?, false),
                    _ => Default::default(),
                };

                fold_const_casts(&mut typed)?;
                let geometries = ops::conv_geometries(&typed);
                typed.optimize()?;
                Ok((geometries, direct, stored))
            })
            .map_err(|e| fail("optimise", e))?;
        if ops != Ops::Tract {
            let im2col = ops::faster_im2col(&mut typed, &geometries).map_err(|e| fail("row im2col", e))?;
            let resize = ops::parallel_resize(&mut typed).map_err(|e| fail("parallel resize", e))?;
            // int8 masks are promised byte for byte the same on every CPU; tract's sigmoid
            // kernels differ by architecture.
            if precision == Precision::Int8 {
                ops::portable_sigmoids(&mut typed).map_err(|e| fail("portable sigmoid", e))?;
            }
            // `REMOVEBGD_STORED_ACTIVATIONS=off` leaves them f32, to measure one against the other.
            // (The residuals' rounding to 16 bits goes in either way.)
            if precision == Precision::Int8 {
                let store = stored && std::env::var("REMOVEBGD_STORED_ACTIVATIONS").as_deref() != Ok("off");
                let (outputs, saved) =
                    ops::stored_activations(&mut typed, store).map_err(|e| fail("stored activations", e))?;
                tracing::debug!(outputs, saved_mib = saved >> 20, "activations stored quantised");
            }
            tracing::debug!(
                direct_convs = direct.convs,
                concats_read_in_place = direct.concats,
                residuals_added_in_place = direct.residuals,
                im2col,
                resize,
                "own operators swapped in"
            );
        }
        let plan = typed.into_runnable().map_err(|e| fail("plan", e))?;
        Ok(Model {
            plan,
            pipeline,
            precision,
            state: Mutex::new(None),
            spawned: Default::default(),
        })
    }

    pub fn pipeline(&self) -> Pipeline {
        self.pipeline
    }

    /// The precision it runs in (never `Auto`).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs one preprocessed NCHW input; returns the output probabilities (`input_size()`² values).
    pub fn infer(&self, input: Vec<f32>) -> Result<Vec<f32>, EngineError> {
        let s = self.pipeline.input_size() as usize;
        let fail = |e: TractError| EngineError::Inference(format!("{e:#}"));
        let tensor: Tensor = tract_ndarray::Array4::from_shape_vec((1, 3, s, s), input)
            .map_err(|e| EngineError::Inference(format!("input tensor: {e}")))?
            .into();
        // With f16 precision the translator retyped the model's input to f16 as well.
        let input_type = self.plan.model().input_fact(0).map_err(fail)?.datum_type;
        let tensor = if tensor.datum_type() == input_type {
            tensor
        } else {
            tensor.cast_to_dt(input_type).map_err(fail)?.into_owned()
        };
        let result = {
            // A panic mid-run leaves nothing half-updated that a fresh state would not replace.
            let mut slot = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.is_none() {
                *slot = Some(self.plan.spawn().map_err(fail)?);
                self.spawned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let state = slot.as_mut().expect("filled above");
            let result = state.run(tvec!(tensor.into_tvalue()));
            if result.is_err() {
                *slot = None;
            }
            result
        };
        let out = result.map_err(fail)?.remove(0);
        let out = out.cast_to::<f32>().map_err(fail)?;
        let view = out.try_as_plain_ram().map_err(fail)?;
        let values = view.as_slice::<f32>().map_err(fail)?;
        if values.len() != s * s {
            return Err(EngineError::Inference(format!(
                "unexpected output shape {:?}",
                out.shape()
            )));
        }
        Ok(values.to_vec())
    }
}

/// The f32 kernel for the layers an int8 model keeps in f32: the chosen one, or on aarch64 the
/// NEON one even when not asked for, since its results are the x86 kernels' bit for bit and
/// tract's own NEON kernels' are not known to be.
fn int8_f32(isa: Option<Isa>) -> Option<Isa> {
    isa.or_else(|| (cfg!(target_arch = "aarch64") && Isa::Neon.supported()).then_some(Isa::Neon))
}

/// Replaces every float `Cast` of a float `Const` (the translator leaves each stored f16 weight
/// as `Const(f16) -> Cast(f32)`) with one `Const` of the cast value. tract's own constant folding
/// refuses a fold whose output exceeds max(input, `CONST_FOLD_MEM_BUDGET` = 4 MiB), so every f16
/// weight over 2 MiB (18 in IS-Net medium) would otherwise be widened again on every inference.
/// `cast_to_dt` is what `Cast::eval` runs, so results are bit-identical; the orphaned f16
/// constants are pruned by `into_optimized()`.
///
/// The casts are folded a few MB at a time, each batch's orphaned constants dropped before the
/// next: folded all at once, IS-Net's 88 MB of f16 and 176 MB of f32 weights were all held at
/// the same moment, the largest part of the daemon's peak memory.
fn fold_const_casts(model: &mut TypedModel) -> TractResult<()> {
    const BATCH: usize = 8 << 20;
    loop {
        let mut patch = TypedModelPatch::new("fold casts of constants");
        let mut folded_bytes = 0;
        for node in &model.nodes {
            let Some((to, val)) = ops::direct_conv::float_cast_of_constant(model, node) else {
                continue;
            };
            let folded = val.cast_to_dt(to)?.into_owned();
            folded_bytes += folded.len() * folded.datum_type().size_of();
            let wire = patch.add_const(format!("{}.folded", node.name), folded)?;
            patch.shunt_outside(model, OutletId::new(node.id, 0), wire)?;
            if folded_bytes >= BATCH {
                break;
            }
        }
        if folded_bytes == 0 {
            return Ok(());
        }
        patch.apply(model)?;
        // Drops the casts and the constants they read, now that nothing reads them, and hands
        // their pages back.
        model.compact()?;
        crate::memory::give_back();
    }
}

fn typed_uses(model: &TypedModel, dt: DatumType) -> bool {
    model
        .nodes
        .iter()
        .any(|n| n.outputs.iter().any(|o| o.fact.datum_type == dt))
}

fn detect_pipeline(model: &InferenceModel) -> Option<Pipeline> {
    let fact = model.input_fact(0).ok()?;
    let shape = fact.shape.concretize()?;
    let side = shape.get(2)?.to_i64().ok()?;
    [Pipeline::Isnet, Pipeline::U2netp]
        .into_iter()
        .find(|p| p.input_size() as i64 == side)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::{cast::Cast, konst::Const};

    fn mirror() -> std::path::PathBuf {
        crate::provision::checkout_models(&["u2netp", "isnet"]).unwrap()
    }

    #[test]
    fn isnet_weights_are_widened_once_at_load_not_on_every_run() {
        let m = Model::load(
            &mirror().join("isnet-medium.onnx"),
            Some(Pipeline::Isnet),
            Precision::F32,
        )
        .unwrap();
        let graph = m.plan.model();
        let casts_of_consts = graph
            .nodes
            .iter()
            .filter(|n| n.op_is::<Cast>() && graph.node(n.inputs[0].node).op_is::<Const>())
            .count();
        assert_eq!(casts_of_consts, 0);
        let f16_consts = graph
            .nodes
            .iter()
            .filter(|n| {
                n.op_as::<Const>()
                    .is_some_and(|c| c.val().datum_type() == f16::datum_type())
            })
            .count();
        assert_eq!(f16_consts, 0, "no f16 weight is left to widen at run time");
    }

    /// A smooth image with structure at every scale, so every tap weight matters.
    fn test_input(s: usize) -> Vec<f32> {
        (0..3 * s * s)
            .map(|i| {
                let (c, y, x) = (i / (s * s), (i / s) % s, i % s);
                ((x as f32 * 0.031 + c as f32).sin() * (y as f32 * 0.017).cos() * 2.0) + (x ^ y) as f32 / 512.0
            })
            .collect()
    }

    fn count(m: &Model, name: &str) -> usize {
        m.plan.model().nodes.iter().filter(|n| n.op.name() == name).count()
    }

    /// Operators whose output is stored quantised (u8 or u16).
    fn stored_outputs(m: &Model) -> usize {
        let stored = [u8::datum_type(), u16::datum_type()];
        m.plan
            .model()
            .nodes
            .iter()
            .filter(|n| n.outputs.iter().any(|o| stored.contains(&o.fact.datum_type)))
            .count()
    }

    /// Builds `file` with each of `ops` and with tract's operators only, checks each gives the
    /// same soft mask as tract bit for bit, and returns them (tract's last) for the caller's
    /// structural checks.
    fn same_mask_as_tract(file: &str, pipeline: Pipeline, ops: &[Ops]) -> Vec<Model> {
        use_threads(2);
        let path = mirror().join(file);
        let theirs = Model::build(&path, Some(pipeline), Precision::F32, Ops::Tract).unwrap();
        let s = pipeline.input_size() as usize;
        let input = test_input(s);
        let b = theirs.infer(input.clone()).unwrap();
        let mut models: Vec<Model> = ops
            .iter()
            .map(|&ops| {
                let ours = Model::build(&path, Some(pipeline), Precision::F32, ops).unwrap();
                same_mask(&ours.infer(input.clone()).unwrap(), &b, ops);
                ours
            })
            .collect();
        models.push(theirs);
        models
    }

    fn same_mask(a: &[f32], b: &[f32], ops: Ops) {
        assert_eq!(a.len(), b.len());
        let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(
            differing,
            0,
            "{ops:?}: outputs differ in {differing} of {} values",
            a.len()
        );
        let soft = a.iter().filter(|v| **v > 0.01 && **v < 0.99).count();
        assert!(
            soft > a.len() / 4,
            "a real, soft mask: {soft} of {} values in (0.01, 0.99)",
            a.len()
        );
    }

    /// The direct convolutions run the same multiply-adds in the same order as tract's matrix
    /// kernels (over input channel, then kernel row, then column, bias last), so they too must
    /// give tract's results bit for bit, on every instruction set this CPU has. `direct` is how
    /// many convolutions they take over, `concats` and `pools` how many concatenations and max
    /// pools they then read through, `residuals` how many additions they make as they store.
    fn direct_convs_match_tract(file: &str, pipeline: Pipeline, [direct, concats, pools, residuals]: [usize; 4]) {
        use tract_onnx::tract_core::ops::array::TypedConcat;
        let isas: Vec<Ops> = Isa::ALL
            .into_iter()
            .filter(|isa| isa.supported())
            .map(|isa| Ops::Ours(Some(isa)))
            .collect();
        if isas.is_empty() {
            let models = same_mask_as_tract(file, pipeline, &[Ops::Ours(Isa::chosen())]);
            assert_eq!(count(&models[0], "DirectConv"), 0);
            return;
        }
        let mut models = same_mask_as_tract(file, pipeline, &isas);
        let theirs = models.pop().expect("tract's model");
        let concat_count = |m: &Model| m.plan.model().nodes.iter().filter(|n| n.op_is::<TypedConcat>()).count();
        for ours in &models {
            assert_eq!(count(ours, "DirectConv"), direct);
            assert_eq!(count(ours, "RowIm2col") + direct, count(&theirs, "LazyIm2col"));
            assert_eq!(
                concat_count(ours) + concats,
                concat_count(&theirs),
                "concats read in place are gone"
            );
            assert_eq!(count(ours, "OptMaxPool") + pools, count(&theirs, "OptMaxPool"));
            let adding = ours
                .plan
                .model()
                .nodes
                .iter()
                .filter(|n| {
                    n.op_as::<crate::ops::direct_conv::DirectConv>()
                        .is_some_and(|c| c.adds_residual())
                })
                .count();
            assert_eq!(adding, residuals);
            assert_eq!(count(ours, "OptAddUnicast"), 0, "every addition is made in place");
        }
    }

    #[test]
    fn u2netp_direct_convs_match_tract_bit_for_bit() {
        direct_convs_match_tract("u2netp.onnx", Pipeline::U2netp, [118, 50, 33, 11]);
    }

    #[test]
    fn isnet_direct_convs_match_tract_bit_for_bit() {
        direct_convs_match_tract("isnet-medium.onnx", Pipeline::Isnet, [113, 50, 33, 11]);
    }

    /// Our im2col, Resize and Pad (all that runs without AVX-512) must give tract's own results
    /// bit for bit, on the real models.
    fn faster_ops_match_tracts_own(file: &str, pipeline: Pipeline, resizes: usize, convs: usize) {
        use crate::ops::PlaneResize;
        use tract_onnx::tract_core::ops::array::Pad;
        let [ours, theirs] = <[Model; 2]>::try_from(same_mask_as_tract(file, pipeline, &[Ops::SameResults]))
            .unwrap_or_else(|_| unreachable!("ours and tract's"));
        assert_eq!(count(&ours, "PlaneResize"), resizes, "every Resize is swapped");
        assert_eq!(count(&ours, "RowIm2col"), convs, "every im2col convolution is swapped");
        assert_eq!(count(&ours, "LazyIm2col") + count(&ours, "Resize"), 0);
        let pads = |m: &Model| m.plan.model().nodes.iter().filter(|n| n.op_is::<Pad>()).count();
        assert_eq!(pads(&ours), 0, "im2col reads through the padding");
        assert!(pads(&theirs) > 100);
        assert_eq!(count(&theirs, "RowIm2col"), 0);
        assert_eq!(count(&theirs, "LazyIm2col"), convs);
        assert!(!theirs.plan.model().nodes.iter().any(|n| n.op_is::<PlaneResize>()));
    }

    #[test]
    fn concurrent_inferences_take_turns_on_one_run_state() {
        use std::sync::atomic::Ordering;
        let m = Model::load(&mirror().join("u2netp.onnx"), Some(Pipeline::U2netp), Precision::F32).unwrap();
        let s = Pipeline::U2netp.input_size() as usize;
        let input: Vec<f32> = (0..3 * s * s).map(|i| ((i % 977) as f32 / 488.0) - 1.0).collect();
        let outputs: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|_| scope.spawn(|| (0..2).map(|_| m.infer(input.clone()).unwrap()).collect::<Vec<_>>()))
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outputs.len(), 6);
        assert!(
            outputs.iter().all(|o| o == &outputs[0]),
            "a recycled state gives the same mask"
        );
        assert_eq!(
            m.spawned.load(Ordering::Relaxed),
            1,
            "one run state (one activation set) for 6 inferences on 3 threads"
        );
    }

    /// Every int8 kernel this CPU has gives the same soft mask bit for bit (the sums are exact
    /// and the requantisation one order of float operations), with the table's layers in int8
    /// and the rest in f32; and the int8 mask is not the f32 one (int8 really ran). Storing
    /// activations quantised between int8 layers changes no bit either.
    fn int8_is_the_same_on_every_kernel(file: &str, pipeline: Pipeline, scalar: bool) {
        use_threads(2);
        let path = mirror().join(file);
        let size = std::fs::metadata(&path).unwrap().len();
        let table = Table::embedded(size).expect("an embedded table");
        let int8_layers = table.layers.values().filter(|l| l.int8).count();
        let s = pipeline.input_size() as usize;
        let input = test_input(s);
        let f32_out = Model::build(&path, Some(pipeline), Precision::F32, Ops::Ours(Isa::chosen()))
            .unwrap()
            .infer(input.clone())
            .unwrap();
        let kernels: Vec<QIsa> = QIsa::ALL
            .into_iter()
            .filter(|k| k.supported() && (scalar || *k != QIsa::Scalar))
            .collect();
        let mut first: Option<Vec<f32>> = None;
        for &qisa in &kernels {
            let m = Model::build_with(&path, Some(pipeline), Precision::Int8, Ops::Int8(qisa, Isa::chosen(), true), None).unwrap();
            assert_eq!(m.precision(), Precision::Int8);
            assert_eq!(count(&m, "QuantConv"), int8_layers, "{qisa:?}");
            let out = m.infer(input.clone()).unwrap();
            match &first {
                None => {
                    let changed = out.iter().zip(&f32_out).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert!(changed > out.len() / 10, "int8 changed only {changed} values");
                    // Activations stored quantised between int8 layers change nothing: the same
                    // mask with every activation left f32.
                    let stored = stored_outputs(&m);
                    assert!(stored > int8_layers / 4, "{stored} activations stored quantised");
                    let unstored = Model::build_with(&path, Some(pipeline), Precision::Int8, Ops::Int8(qisa, Isa::chosen(), false), None).unwrap();
                    assert_eq!(stored_outputs(&unstored), 0);
                    same_mask(&unstored.infer(input.clone()).unwrap(), &out, Ops::Int8(qisa, Isa::chosen(), false));
                    first = Some(out);
                }
                Some(want) => same_mask(&out, want, Ops::Int8(qisa, Isa::chosen(), true)),
            }
        }
    }

    /// `auto` runs int8 where the shipped table says so (IS-Net: within the fidelity bound, and
    /// bit-identical on ARM) and f32 elsewhere (u2netp: its int8 masks are far off).
    #[test]
    fn auto_precision_is_int8_for_isnet_and_f32_for_u2netp() {
        let isnet = Model::load(&mirror().join("isnet-medium.onnx"), Some(Pipeline::Isnet), Precision::Auto).unwrap();
        assert_eq!(isnet.precision(), Precision::Int8);
        assert!(count(&isnet, "QuantConv") > 0);
        let u2netp = Model::load(&mirror().join("u2netp.onnx"), Some(Pipeline::U2netp), Precision::Auto).unwrap();
        assert_eq!(u2netp.precision(), Precision::F32);
        assert_eq!(count(&u2netp, "QuantConv"), 0);
    }

    #[test]
    fn u2netp_int8_is_the_same_on_every_kernel() {
        int8_is_the_same_on_every_kernel("u2netp.onnx", Pipeline::U2netp, true);
    }

    #[test]
    fn isnet_int8_is_the_same_on_every_kernel() {
        // The plain loops take a minute on IS-Net; u2netp runs them.
        int8_is_the_same_on_every_kernel("isnet-medium.onnx", Pipeline::Isnet, false);
    }

    #[test]
    fn u2netp_with_faster_ops_matches_tract_bit_for_bit() {
        faster_ops_match_tracts_own("u2netp.onnx", Pipeline::U2netp, 38, 118);
    }

    #[test]
    fn isnet_with_faster_ops_matches_tract_bit_for_bit() {
        faster_ops_match_tracts_own("isnet-medium.onnx", Pipeline::Isnet, 34, 114);
    }
}
