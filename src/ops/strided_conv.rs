//! `StridedConv`: the convolutions with a stride above 1 that the int8 plans keep in f32
//! (IS-Net's `conv_in`: 3 input channels, 3x3, stride 2, 64 x 512² out), computed so that
//! their output can be stored quantised for the int8 layer that reads it.
//!
//! tract's own convolution writes IS-Net's largest f32 tensor (64 MiB), and at the next layer
//! that tensor is live beside that layer's output: the int8 plan's memory peak. This one
//! computes output row by row and can store each row quantised (16-bit words for a 16-bit
//! reader; [`stored_activations`](super::stored_activations) decides), so that tensor is never
//! f32. Its arithmetic is one fixed order of separate multiplies and adds (bias first, then
//! channel by channel and tap by tap), the same on every CPU, so the int8 plans' masks stay the
//! same bytes on x86 and ARM; its vector width changes nothing but speed.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::direct_conv::ConvShape;
use super::quant_conv::{RowsOut, Source, stored_fact, stored_rows_output};

/// A group-1 NCHW f32 convolution with any stride, its bias added (see the module comment).
#[derive(Debug, Clone, PartialEq)]
pub struct StridedConv {
    shape: ConvShape,
    /// [M][C][KH][KW].
    weights: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    /// When set, the output is stored quantised with it.
    output_quant: Option<Source>,
}

impl Eq for StridedConv {}

/// Each output row's taps of one channel, gathered: `[C * KH * KW][OW]`, then the rows of
/// sums, `[M][OW]`.
struct Scratch {
    taps: Vec<f32>,
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> =
        const { std::cell::RefCell::new(Scratch { taps: Vec::new(), sums: Vec::new() }) };
}

impl StridedConv {
    pub(crate) fn new(shape: ConvShape, weights: Vec<f32>, bias: Vec<f32>) -> StridedConv {
        let [_, c, _, _] = shape.input;
        let [_, m, _, _] = shape.output;
        assert_eq!(weights.len(), m * c * shape.kernel[0] * shape.kernel[1]);
        assert_eq!(bias.len(), m);
        StridedConv {
            shape,
            weights: Arc::new(weights),
            bias: Arc::new(bias),
            output_quant: None,
        }
    }

    /// This convolution with its output stored quantised with `quant`.
    pub(crate) fn with_stored_output(mut self, quant: Source) -> StridedConv {
        self.output_quant = Some(quant);
        self
    }

    /// Output row `y`, all channels, into `sums` (`[M][OW]`).
    #[inline(always)]
    fn row(&self, input: &[f32], y: usize, scratch: &mut Scratch) {
        let ConvShape {
            input: [_, c, h, w],
            output: [_, m, _, ow],
            kernel: [kh, kw],
            stride: [sy, sx],
            dilation: [dy, dx],
            pad: [py, px],
        } = self.shape;
        let taps = c * kh * kw;
        scratch.taps.resize(taps * ow, 0.0);
        scratch.sums.resize(m * ow, 0.0);
        for (t, row) in scratch.taps.chunks_exact_mut(ow).enumerate() {
            let (ch, ky, kx) = (t / (kh * kw), (t / kw) % kh, t % kw);
            let iy = (y * sy + ky * dy).wrapping_sub(py);
            let plane = &input[ch * h * w..][..h * w];
            for (x, v) in row.iter_mut().enumerate() {
                let ix = (x * sx + kx * dx).wrapping_sub(px);
                *v = if iy < h && ix < w { plane[iy * w + ix] } else { 0.0 };
            }
        }
        for (o, sums) in scratch.sums.chunks_exact_mut(ow).enumerate() {
            sums.fill(self.bias[o]);
            let weights = &self.weights[o * taps..][..taps];
            for (&k, row) in weights.iter().zip(scratch.taps.chunks_exact(ow)) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += k * v;
                }
            }
        }
    }

    /// Every output row, each handed to `store(channel, y, values)`, rows in parallel.
    fn run_rows(&self, input: &[f32], store: impl Fn(usize, usize, &[f32]) + Sync) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(op: &StridedConv, input: &[f32], y: usize, scratch: &mut Scratch) {
            op.row(input, y, scratch)
        }
        #[cfg(target_arch = "x86_64")]
        let wide = std::arch::is_x86_feature_detected!("avx2");
        let [_, _, oh, ow] = self.shape.output;
        super::par_for(oh, |y| {
            SCRATCH.with(|scratch| {
                let scratch = &mut *scratch.borrow_mut();
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: the CPU has AVX2 (checked above).
                    unsafe { avx2(self, input, y, scratch) };
                } else {
                    self.row(input, y, scratch);
                }
                #[cfg(not(target_arch = "x86_64"))]
                self.row(input, y, scratch);
                for (o, sums) in scratch.sums.chunks_exact(ow).enumerate() {
                    store(o, y, sums);
                }
            })
        });
    }

}

impl RowsOut for StridedConv {
    fn rows_into<T: Send + Sync>(&self, input: &[f32], out: &mut [T], write: impl Fn(&[f32], &mut [T]) + Sync) -> TractResult<()> {
        let [_, _, oh, ow] = self.shape.output;
        ensure!(input.len() == self.shape.input.iter().product::<usize>(), "input of {} values", input.len());
        ensure!(out.len() == self.shape.output.iter().product::<usize>());
        struct Base<T>(*mut T);
        // SAFETY: each (channel, row) is written by one task only.
        unsafe impl<T> Sync for Base<T> {}
        let base = Base(out.as_mut_ptr());
        let base = &base;
        self.run_rows(input, |o, y, sums| {
            // SAFETY: row `y` of channel `o` is inside `out` and only this call writes it.
            let row = unsafe { std::slice::from_raw_parts_mut(base.0.add((o * oh + y) * ow), ow) };
            write(sums, row);
        });
        Ok(())
    }
}

impl Op for StridedConv {
    fn name(&self) -> StaticName {
        "StridedConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} stored {:?}", self.shape, self.output_quant)])
    }

    op_as_typed_op!();
}

impl EvalOp for StridedConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let out = stored_rows_output(self, view.as_slice::<f32>()?, self.output_quant, &self.shape.output)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for StridedConv {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(stored_fact(self.output_quant, self.shape.output)))
    }

    as_op!();
}

/// Replaces the convolutions with a stride above 1 (group 1, NCHW, constant weights and bias)
/// with a [`StridedConv`]; returns how many.
pub(crate) fn strided_convs(model: &mut TypedModel) -> TractResult<usize> {
    super::swap_nodes(model, "strided convolution", |model, node| {
        let Some(conv) = super::direct_conv::plain_conv(model, node)? else {
            return Ok(None);
        };
        if conv.shape.stride == [1, 1] {
            return Ok(None);
        }
        let weights = conv.weights.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        Ok(Some((Box::new(StridedConv::new(conv.shape, weights, conv.bias)) as _, node.inputs[0])))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant_conv::{Quant, Quant16};

    /// Against the convolution written out plainly (bias, then channel by channel and tap by
    /// tap, in f64: the same sum to well within f32's rounding), on strides, dilations and
    /// paddings that reach every edge; stored outputs are the f32 output quantised.
    #[test]
    fn matches_the_plain_convolution() {
        let mut seed = 11u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (c, [h, w], m, kernel, stride, dilation, pad) in [
            (3, [33, 40], 8, [3, 3], [2, 2], [1, 1], [1, 1]),
            (2, [17, 9], 5, [3, 2], [2, 3], [1, 1], [0, 1]),
            (4, [20, 21], 3, [3, 3], [3, 2], [2, 1], [2, 0]),
        ] {
            let oh = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
            let ow = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
            let input: Vec<f32> = (0..c * h * w).map(|_| 4.0 * next()).collect();
            let weights: Vec<f32> = (0..m * c * kernel[0] * kernel[1]).map(|_| next()).collect();
            let bias: Vec<f32> = (0..m).map(|_| next()).collect();
            let shape = ConvShape {
                input: [1, c, h, w],
                output: [1, m, oh, ow],
                kernel,
                stride,
                dilation,
                pad,
            };
            let op = StridedConv::new(shape, weights.clone(), bias.clone());
            let mut got = vec![f32::NAN; m * oh * ow];
            op.rows_into(&input, &mut got, |r, o| o.copy_from_slice(r)).unwrap();
            // The plain build of a row (what CPUs without AVX2 and ARM run) gives the same bits
            // as the run (AVX2 here, when the CPU has it).
            let mut scratch = Scratch { taps: vec![], sums: vec![] };
            for y in 0..oh {
                op.row(&input, y, &mut scratch);
                for (o, sums) in scratch.sums.chunks_exact(ow).enumerate() {
                    let run = &got[(o * oh + y) * ow..][..ow];
                    assert!(sums.iter().zip(run).all(|(a, b)| a.to_bits() == b.to_bits()), "row {y} of {o}");
                }
            }
            for o in 0..m {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut want = bias[o] as f64;
                        for ch in 0..c {
                            for ky in 0..kernel[0] {
                                for kx in 0..kernel[1] {
                                    let iy = (y * stride[0] + ky * dilation[0]) as isize - pad[0] as isize;
                                    let ix = (x * stride[1] + kx * dilation[1]) as isize - pad[1] as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let k = weights[((o * c + ch) * kernel[0] + ky) * kernel[1] + kx] as f64;
                                        want += k * input[(ch * h + iy as usize) * w + ix as usize] as f64;
                                    }
                                }
                            }
                        }
                        let have = got[(o * oh + y) * ow + x] as f64;
                        assert!((have - want).abs() < 1e-5, "{c}x{h}x{w} stride {stride:?}: [{o}, {y}, {x}] = {have}, want {want}");
                    }
                }
            }
            for quant in [Source::Bits8(Quant::covering(-2.0, 1.5)), Source::Bits16(Quant16::covering(-2.0, 1.5))] {
                let stored = stored_rows_output(&op, &input, Some(quant), &[1, m, oh, ow]).unwrap();
                let view = stored.try_as_plain_ram().unwrap();
                let words: Vec<u16> = match quant {
                    Source::Bits8(_) => view.as_slice::<u8>().unwrap().iter().map(|&b| b as u16).collect(),
                    Source::Bits16(_) => view.as_slice::<u16>().unwrap().to_vec(),
                };
                for (i, &v) in got.iter().enumerate() {
                    assert_eq!(words[i], quant.quantise(v), "{quant:?} at {i}");
                }
            }
        }
    }
}
