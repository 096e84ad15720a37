//! A logistic sigmoid that gives the same bits on every CPU: [`PortableSigmoid`].
//!
//! tract's own `Sigmoid` runs a kernel per architecture (its x86 FMA kernel, its aarch64 NEON
//! kernel), and the two round differently, so the same logits gave masks one level apart in a
//! few pixels on x86 and under qemu-aarch64. The int8 plans promise the same mask bytes on both,
//! so they swap in this one: plain multiplies, adds and one division, in one order written out
//! below. Rust never contracts `a * b + c` into a fused multiply-add, and vectorising keeps each
//! lane's IEEE operations, so every target computes the same value.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::Sigmoid;

use super::swap_nodes;

/// Replaces every f32 `Sigmoid` in `model` with [`PortableSigmoid`]. Returns how many.
pub fn portable_sigmoids(model: &mut TypedModel) -> TractResult<usize> {
    swap_nodes(model, "portable sigmoid", |model, node| {
        let Some(ew) = node.op_as::<ElementWiseOp>() else {
            return Ok(None);
        };
        if !ew.0.is::<Sigmoid>() || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
            return Ok(None);
        }
        Ok(Some((Box::new(PortableSigmoid) as _, node.inputs[0])))
    })
}

/// `e^x` for `x` in [-87.5, 0]: `x = n ln 2 + r` with |r| <= ln 2 / 2, a degree-7 polynomial
/// for `e^r` (Cephes' `expf` coefficients, relative error ~1e-7), and `2^n` put into the exponent
/// bits (a normal number: n >= -127 + 1 on this domain).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, the first part exact in few bits, so `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and taking away 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = (p * (r * r) + r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `1 / (1 + e^-x)`, from `t = e^-|x|` so nothing overflows: `1 / (1 + t)` for x >= 0 and
/// `t / (1 + t)` below. |x| beyond 87.5 counts as 87.5 (the result is 1, or below 1e-38).
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let t = exp_nonpositive(-(x.abs().min(87.5)));
    let d = 1.0 + t;
    if x >= 0.0 { 1.0 / d } else { t / d }
}

/// The logistic function, elementwise on an f32 tensor of any shape, with [`sigmoid`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortableSigmoid;

impl PortableSigmoid {
    fn run(&self, xs: &mut [f32]) {
        for x in xs {
            *x = sigmoid(*x);
        }
    }
}

impl Op for PortableSigmoid {
    fn name(&self) -> StaticName {
        "PortableSigmoid".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PortableSigmoid {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // In place: the input is usually this op's alone, so no copy is made.
        let mut out = args_1!(inputs).into_tensor();
        self.run(out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PortableSigmoid {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within a few units in the last place of the float64 logistic from -87 to 87 (past
    /// where an 8-bit mask saturates both ways); exact at 0, saturating beyond, and symmetric.
    #[test]
    fn matches_the_logistic_function() {
        let mut worst = 0f64;
        for i in -1_000_000..=1_000_000 {
            let x = i as f32 * 8.7e-5;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            worst = worst.max((sigmoid(x) as f64 - want).abs() / ulp);
        }
        assert!(worst <= 4.0, "worst error {worst} ulp");
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(1e30), 1.0);
        assert_eq!(sigmoid(f32::INFINITY), 1.0);
        assert!(sigmoid(-1e30) >= 0.0 && sigmoid(-1e30) < 1e-37);
        for x in [0.3f32, 2.5, 11.0] {
            assert!((sigmoid(x) as f64 + sigmoid(-x) as f64 - 1.0).abs() < 1e-7);
        }
    }

    /// Each value depends on its own input only: the vectorised loop gives the scalar
    /// function's bits, whatever the slice length and alignment.
    #[test]
    fn eval_is_the_scalar_function() {
        let xs: Vec<f32> = (0..1037).map(|i| (i as f32 * 0.731).sin() * 12.0).collect();
        let mut out = xs.clone();
        PortableSigmoid.run(&mut out);
        for (o, x) in out.iter().zip(&xs) {
            assert_eq!(o.to_bits(), sigmoid(*x).to_bits());
        }
    }
}
