//! Edge refinement: the model's mask snapped to the photo's own edges, and the true colour of
//! the subject recovered where it is semi-transparent, so a cutout laid on a new background
//! keeps neither a soft ramp nor a halo of the old background.
//!
//! 1. **Edge-aware upsampling** (the fast guided filter, He and Sun 2015). At a working
//!    resolution (long side at most [`WORK_SIDE`]), the colour guided filter fits, in every
//!    window, alpha as an affine function of the photo's RGB. Those coefficients, averaged
//!    and interpolated to the output size, are applied to the full-resolution photo, so the
//!    edge follows the photo's pixels instead of the mask's bilinear ramp.
//! 2. **Foreground colour** (multi-level foreground estimation, Germer et al. 2020). At the
//!    working resolution, F and B are solved coarse to fine so that `I = alpha*F + (1-alpha)*B`
//!    with smooth F and B. At the output size each pixel then solves the same two-colour
//!    equation with the interpolated F and B as its prior.
//!
//! Both touch only the *band*: output pixels whose working-resolution neighbourhood holds a
//! mask value that is neither 0 nor 1. Everything else keeps the model's mask and the photo's
//! colour. Every sweep is ordered so that the result does not depend on the thread count.

use rayon::prelude::*;

/// Long side of the working resolution.
pub const WORK_SIDE: u32 = 768;

/// Bytes the refinement of an output of `pixels` needs beyond the cutout's own buffers: its
/// working-resolution planes (at most 32 f32 values a working pixel alive at once).
pub fn working_bytes(pixels: u64) -> u64 {
    32 * 4 * pixels.min(WORK_SIDE as u64 * WORK_SIDE as u64)
}

/// The settings of one refinement.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Guided filter window radius, in working-resolution pixels.
    pub radius: usize,
    /// Guided filter regularisation (larger: closer to the model's mask).
    pub eps: f32,
    /// Mask values (0..1) at or below `certain` and at or above `1 - certain` count as
    /// certain background and foreground: their colours are the two sides' colours, and the
    /// band is what lies between them.
    pub certain: f32,
    /// Mask values whose distance from 0 or 1 is at least `trust_from` let the colour estimate
    /// decide alone; closer to certain, it is trusted proportionally less.
    pub trust_from: f32,
    /// Foreground estimation: the smoothness weight, and how much alpha's gradient adds to it.
    pub fb: FbSettings,
    /// The prior's weight in the full-resolution foreground step.
    pub prior: f32,
    /// Colour distance (0..1 per channel) between the nearby foreground and background at
    /// which the colour estimate of alpha gets half the weight (the guided filter the rest).
    pub sigma: f32,
    /// How far the band reaches beyond the uncertain working pixels, in working pixels.
    pub reach: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            radius: 4,
            eps: 1e-3,
            certain: 0.01,
            trust_from: 0.05,
            fb: FbSettings::default(),
            prior: 0.02,
            sigma: 0.05,
            reach: 5,
        }
    }
}

/// Multi-level foreground estimation's settings (Germer et al.'s defaults).
#[derive(Debug, Clone, Copy)]
pub struct FbSettings {
    pub regularization: f32,
    pub gradient_weight: f32,
    /// Iterations on levels of at most `small_size` pixels, and on the larger ones.
    pub small_iterations: usize,
    pub big_iterations: usize,
    pub small_size: usize,
}

impl Default for FbSettings {
    fn default() -> FbSettings {
        FbSettings {
            regularization: 5e-3,
            gradient_weight: 1.0,
            small_iterations: 10,
            big_iterations: 2,
            small_size: 32 * 32,
        }
    }
}

/// One f32 plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    pub w: usize,
    pub h: usize,
    pub v: Vec<f32>,
}

impl Plane {
    pub fn new(w: usize, h: usize) -> Plane {
        Plane { w, h, v: vec![0.0; w * h] }
    }

    pub fn from_fn(w: usize, h: usize, f: impl Fn(usize, usize) -> f32) -> Plane {
        let mut p = Plane::new(w, h);
        for y in 0..h {
            for x in 0..w {
                p.v[y * w + x] = f(x, y);
            }
        }
        p
    }

    /// The mean over the `(2r+1)²` window around each pixel, clipped to the image (the
    /// divisor is the number of pixels inside it).
    pub fn box_mean(&self, r: usize) -> Plane {
        let (w, h) = (self.w, self.h);
        // Rows: a running sum.
        let mut rows = vec![0f32; w * h];
        for (src, dst) in self.v.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
            let mut sum: f32 = src[..r.min(w - 1) + 1].iter().sum();
            for x in 0..w {
                let n = (x + r).min(w - 1) + 1 - x.saturating_sub(r);
                dst[x] = sum / n as f32;
                if x + r + 1 < w {
                    sum += src[x + r + 1];
                }
                if x >= r {
                    sum -= src[x - r];
                }
            }
        }
        // Columns: a running row of sums (sums of row means; the column count divides).
        let mut out = vec![0f32; w * h];
        let mut acc = vec![0f32; w];
        for row in rows.chunks_exact(w).take(r.min(h - 1) + 1) {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
        for y in 0..h {
            let n = ((y + r).min(h - 1) + 1 - y.saturating_sub(r)) as f32;
            out[y * w..][..w].iter_mut().zip(&acc).for_each(|(o, a)| *o = a / n);
            if y + r + 1 < h {
                acc.iter_mut().zip(&rows[(y + r + 1) * w..][..w]).for_each(|(a, v)| *a += v);
            }
            if y >= r {
                acc.iter_mut().zip(&rows[(y - r) * w..][..w]).for_each(|(a, v)| *a -= v);
            }
        }
        Plane { w, h, v: out }
    }

    /// Bilinear sample at (x, y) in this plane's pixel coordinates (centres at integers),
    /// clamped to the edge.
    #[inline]
    pub fn sample(&self, x: f32, y: f32) -> f32 {
        let x = x.clamp(0.0, (self.w - 1) as f32);
        let y = y.clamp(0.0, (self.h - 1) as f32);
        let (x0, y0) = (x as usize, y as usize);
        let (x1, y1) = ((x0 + 1).min(self.w - 1), (y0 + 1).min(self.h - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let row0 = &self.v[y0 * self.w..];
        let row1 = &self.v[y1 * self.w..];
        let top = row0[x0] + (row0[x1] - row0[x0]) * fx;
        let bottom = row1[x0] + (row1[x1] - row1[x0]) * fx;
        top + (bottom - top) * fy
    }

    fn map2(&self, other: &Plane, f: impl Fn(f32, f32) -> f32 + Sync) -> Plane {
        Plane {
            w: self.w,
            h: self.h,
            v: self.v.iter().zip(&other.v).map(|(&a, &b)| f(a, b)).collect(),
        }
    }
}

/// An RGB image as three planes with values in 0..1.
#[derive(Debug, Clone)]
pub struct Rgb(pub [Plane; 3]);

impl Rgb {
    pub fn from_u8(rgb: &[u8], w: usize, h: usize) -> Rgb {
        Rgb(std::array::from_fn(|c| Plane {
            w,
            h,
            v: rgb.chunks_exact(3).map(|p| p[c] as f32 / 255.0).collect(),
        }))
    }

    fn w(&self) -> usize {
        self.0[0].w
    }

    fn h(&self) -> usize {
        self.0[0].h
    }
}

/// The guided filter's window-averaged coefficients: alpha ≈ `a · I + b`.
pub struct Coefficients {
    pub a: [Plane; 3],
    pub b: Plane,
}

/// The colour guided filter of `p` guided by `guide` (He, Sun and Tang 2010), up to the
/// window-averaged coefficients.
pub fn guided_coefficients(guide: &Rgb, p: &Plane, r: usize, eps: f32) -> Coefficients {
    let [i0, i1, i2] = &guide.0;
    // The 13 window means, computed in parallel (each product is made and dropped in its task).
    let pairs: [(&Plane, Option<&Plane>); 13] = [
        (i0, None),
        (i1, None),
        (i2, None),
        (p, None),
        (i0, Some(p)),
        (i1, Some(p)),
        (i2, Some(p)),
        (i0, Some(i0)),
        (i0, Some(i1)),
        (i0, Some(i2)),
        (i1, Some(i1)),
        (i1, Some(i2)),
        (i2, Some(i2)),
    ];
    let m: Vec<Plane> = pairs
        .par_iter()
        .map(|&(x, y)| match y {
            None => x.box_mean(r),
            Some(y) => x.map2(y, |a, b| a * b).box_mean(r),
        })
        .collect();
    let (w, h) = (p.w, p.h);
    let mut a = [Plane::new(w, h), Plane::new(w, h), Plane::new(w, h)];
    let mut b = Plane::new(w, h);
    for k in 0..w * h {
        let mi = [m[0].v[k], m[1].v[k], m[2].v[k]];
        let mp = m[3].v[k];
        let cov = [m[4].v[k] - mi[0] * mp, m[5].v[k] - mi[1] * mp, m[6].v[k] - mi[2] * mp];
        // The guide's covariance in the window, regularised (symmetric 3x3).
        let s00 = m[7].v[k] - mi[0] * mi[0] + eps;
        let s01 = m[8].v[k] - mi[0] * mi[1];
        let s02 = m[9].v[k] - mi[0] * mi[2];
        let s11 = m[10].v[k] - mi[1] * mi[1] + eps;
        let s12 = m[11].v[k] - mi[1] * mi[2];
        let s22 = m[12].v[k] - mi[2] * mi[2] + eps;
        // Its inverse by cofactors.
        let c00 = s11 * s22 - s12 * s12;
        let c01 = s02 * s12 - s01 * s22;
        let c02 = s01 * s12 - s02 * s11;
        let c11 = s00 * s22 - s02 * s02;
        let c12 = s01 * s02 - s00 * s12;
        let c22 = s00 * s11 - s01 * s01;
        let det = s00 * c00 + s01 * c01 + s02 * c02;
        let inv = if det.abs() > 1e-12 { 1.0 / det } else { 0.0 };
        let ak = [
            (c00 * cov[0] + c01 * cov[1] + c02 * cov[2]) * inv,
            (c01 * cov[0] + c11 * cov[1] + c12 * cov[2]) * inv,
            (c02 * cov[0] + c12 * cov[1] + c22 * cov[2]) * inv,
        ];
        for c in 0..3 {
            a[c].v[k] = ak[c];
        }
        b.v[k] = mp - ak[0] * mi[0] - ak[1] * mi[1] - ak[2] * mi[2];
    }
    drop(m);
    let mut means: Vec<Plane> = [&a[0], &a[1], &a[2], &b].par_iter().map(|x| x.box_mean(r)).collect();
    let b = means.pop().unwrap();
    let a2 = means.pop().unwrap();
    let a1 = means.pop().unwrap();
    let a0 = means.pop().unwrap();
    Coefficients { a: [a0, a1, a2], b }
}

impl Coefficients {
    /// The filter's output at the coefficients' own resolution.
    pub fn filter(&self, guide: &Rgb) -> Plane {
        let mut out = Plane::new(guide.w(), guide.h());
        for k in 0..out.v.len() {
            out.v[k] = self.a[0].v[k] * guide.0[0].v[k]
                + self.a[1].v[k] * guide.0[1].v[k]
                + self.a[2].v[k] * guide.0[2].v[k]
                + self.b.v[k];
        }
        out
    }

    /// The output at (x, y) of the working plane's coordinates, for a full-resolution pixel of
    /// colour `rgb` (0..1).
    #[inline]
    pub fn at_full(&self, x: f32, y: f32, rgb: [f32; 3]) -> f32 {
        self.a[0].sample(x, y) * rgb[0]
            + self.a[1].sample(x, y) * rgb[1]
            + self.a[2].sample(x, y) * rgb[2]
            + self.b.sample(x, y)
    }
}

/// Solves `I = alpha*F + (1-alpha)*B` for smooth F and B, coarse to fine (Germer et al. 2020,
/// "Fast Multi-Level Foreground Estimation"). Each level's sweeps update the pixels of one
/// checkerboard colour from those of the other, so the result does not depend on the order
/// or the number of threads. Returns (F, B).
pub fn estimate_fb(image: &Rgb, alpha: &Plane, s: &FbSettings) -> (Rgb, Rgb) {
    let (w0, h0) = (image.w(), image.h());
    let levels = (w0.max(h0) as f32).log2().ceil().max(0.0) as u32;
    let mean = |c: usize| image.0[c].v.iter().sum::<f32>() / image.0[c].v.len() as f32;
    let (m0, m1, m2) = (mean(0), mean(1), mean(2));
    // Each pixel's F and B side by side, and its colour and alpha: one cache line's worth of
    // neighbours per read.
    let mut fb: Vec<[f32; 6]> = vec![[m0, m1, m2, m0, m1, m2]];
    let mut next: Vec<[f32; 6]> = Vec::new();
    let full: Vec<[f32; 4]> = (0..w0 * h0)
        .map(|k| [image.0[0].v[k], image.0[1].v[k], image.0[2].v[k], alpha.v[k]])
        .collect();
    let (mut pw, mut ph) = (1usize, 1usize);
    for level in 0..=levels {
        let t = if levels == 0 { 1.0 } else { level as f32 / levels as f32 };
        let w = ((w0 as f32).powf(t).round() as usize).clamp(1, w0);
        let h = ((h0 as f32).powf(t).round() as usize).clamp(1, h0);
        let small;
        let px: &[[f32; 4]] = if (w, h) == (w0, h0) {
            &full
        } else {
            small = nearest(&full, (w0, h0), (w, h));
            &small
        };
        fb = nearest(&fb, (pw, ph), (w, h));
        next.resize(w * h, [0.0; 6]);
        (pw, ph) = (w, h);
        let iterations = if w * h <= s.small_size { s.small_iterations } else { s.big_iterations };
        for _ in 0..iterations {
            for parity in 0..2 {
                half_sweep(px, &fb, &mut next, (w, h), parity, s);
                std::mem::swap(&mut fb, &mut next);
            }
        }
    }
    drop((next, full));
    let plane = |c: usize| Plane { w: w0, h: h0, v: fb.iter().map(|p| p[c]).collect() };
    (Rgb([plane(0), plane(1), plane(2)]), Rgb([plane(3), plane(4), plane(5)]))
}

/// Writes into `next` the pixels with `(x + y) % 2 == parity` updated from their four
/// neighbours in `cur` (all of the other colour), and the others as they were.
fn half_sweep(
    px: &[[f32; 4]],
    cur: &[[f32; 6]],
    next: &mut [[f32; 6]],
    (w, h): (usize, usize),
    parity: usize,
    s: &FbSettings,
) {
    next.par_chunks_exact_mut(w).enumerate().for_each(|(y, out)| {
        let row = y * w;
        out.copy_from_slice(&cur[row..row + w]);
        let mut x = (y + parity) % 2;
        while x < w {
            let k = row + x;
            let [i0, i1, i2, a0] = px[k];
            let a1 = 1.0 - a0;
            let mut b00 = a0 * a0;
            let b01 = a0 * a1;
            let mut b11 = a1 * a1;
            let mut r = [a0 * i0, a0 * i1, a0 * i2, a1 * i0, a1 * i1, a1 * i2];
            // Four neighbours, clamped at the border (there the pixel itself, as it was).
            for n in [
                if x > 0 { k - 1 } else { k },
                if x + 1 < w { k + 1 } else { k },
                if y > 0 { k - w } else { k },
                if y + 1 < h { k + w } else { k },
            ] {
                let da = s.regularization + s.gradient_weight * (a0 - px[n][3]).abs();
                b00 += da;
                b11 += da;
                let q = &cur[n];
                for c in 0..6 {
                    r[c] += da * q[c];
                }
            }
            let inv = 1.0 / (b00 * b11 - b01 * b01);
            let v = &mut out[x];
            for c in 0..3 {
                v[c] = ((b11 * r[c] - b01 * r[3 + c]) * inv).clamp(0.0, 1.0);
                v[3 + c] = ((b00 * r[3 + c] - b01 * r[c]) * inv).clamp(0.0, 1.0);
            }
            x += 2;
        }
    });
}

/// Fills every pixel of `image` with the colour of the nearest pixels where `weight` is 1,
/// keeping those (the push-pull of normalised convolution: a pyramid of weighted 2x2 means,
/// then each level's holes filled from the coarser one). Used for the smooth colour fields of
/// the certain foreground and background.
pub fn fill(image: &Rgb, weight: &Plane) -> Rgb {
    let (w, h) = (image.w(), image.h());
    if w <= 1 && h <= 1 || weight.v.iter().all(|&x| x <= 0.0) {
        let total: f32 = weight.v.iter().sum();
        return Rgb(std::array::from_fn(|c| {
            let mean = if total > 0.0 {
                image.0[c].v.iter().zip(&weight.v).map(|(v, k)| v * k).sum::<f32>() / total
            } else {
                0.5
            };
            Plane { w, h, v: vec![mean; w * h] }
        }));
    }
    let (w2, h2) = (w.div_ceil(2), h.div_ceil(2));
    let mut cw = Plane::new(w2, h2);
    let mut cv: [Plane; 3] = std::array::from_fn(|_| Plane::new(w2, h2));
    for y in 0..h {
        for x in 0..w {
            let k = y * w + x;
            let j = (y / 2) * w2 + x / 2;
            cw.v[j] += weight.v[k];
            for c in 0..3 {
                cv[c].v[j] += image.0[c].v[k] * weight.v[k];
            }
        }
    }
    for j in 0..w2 * h2 {
        if cw.v[j] > 0.0 {
            for c in 0..3 {
                cv[c].v[j] /= cw.v[j];
            }
            cw.v[j] = cw.v[j].min(1.0);
        }
    }
    let coarse = fill(&Rgb(cv), &cw);
    // Each pixel: its own colour where it is certain, else the coarser level's, bilinearly.
    let columns: Vec<(usize, usize, f32)> = (0..w).map(|x| split((x as f32 + 0.5) / 2.0 - 0.5, w2)).collect();
    let mut out: [Plane; 3] = std::array::from_fn(|_| Plane::new(w, h));
    for y in 0..h {
        let (y0, y1, fy) = split((y as f32 + 0.5) / 2.0 - 0.5, h2);
        for (x, &(x0, x1, fx)) in columns.iter().enumerate() {
            let k = y * w + x;
            let t = weight.v[k].min(1.0);
            for c in 0..3 {
                let q = &coarse.0[c].v;
                let top = q[y0 * w2 + x0] + (q[y0 * w2 + x1] - q[y0 * w2 + x0]) * fx;
                let bottom = q[y1 * w2 + x0] + (q[y1 * w2 + x1] - q[y1 * w2 + x0]) * fx;
                let up = top + (bottom - top) * fy;
                out[c].v[k] = t * image.0[c].v[k] + (1.0 - t) * up;
            }
        }
    }
    Rgb(out)
}

/// A coordinate `v` on an axis of `n` samples (centres at integers) as the two samples to
/// interpolate between and the second one's weight, clamped to the axis.
#[inline]
fn split(v: f32, n: usize) -> (usize, usize, f32) {
    let v = v.clamp(0.0, (n - 1) as f32);
    let i = (v as usize).min(n.saturating_sub(2));
    (i, (i + 1).min(n - 1), v - i as f32)
}

/// Nearest-neighbour resize of one plane (pixel centres aligned).
pub fn nearest<T: Copy>(src: &[T], (sw, sh): (usize, usize), (dw, dh): (usize, usize)) -> Vec<T> {
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        let sy = (((y as f32 + 0.5) * sh as f32 / dh as f32) as usize).min(sh - 1);
        for x in 0..dw {
            let sx = (((x as f32 + 0.5) * sw as f32 / dw as f32) as usize).min(sw - 1);
            out.push(src[sy * sw + sx]);
        }
    }
    out
}

/// Solves one pixel's two-colour equation for (F, B) given priors for both (all 0..1).
#[inline]
pub fn solve_pixel(alpha: f32, i: [f32; 3], fp: [f32; 3], bp: [f32; 3], prior: f32) -> [f32; 3] {
    let a0 = alpha;
    let a1 = 1.0 - alpha;
    let b00 = a0 * a0 + prior;
    let b01 = a0 * a1;
    let b11 = a1 * a1 + prior;
    let inv = 1.0 / (b00 * b11 - b01 * b01);
    std::array::from_fn(|c| {
        let rf = a0 * i[c] + prior * fp[c];
        let rb = a1 * i[c] + prior * bp[c];
        ((b11 * rf - b01 * rb) * inv).clamp(0.0, 1.0)
    })
}

/// Alpha for a pixel of colour `i` (0..1) where the model said `model`, from the guided filter's
/// output `smooth` and the nearby certain foreground and background colours `fg` and `bg`:
/// where the two colours differ, alpha is where `i` lies on the line between them, trusted by
/// their distance and by how unsure the model was; the guided filter decides the rest.
#[inline]
fn blend_alpha(i: [f32; 3], model: f32, smooth: f32, fg: [f32; 3], bg: [f32; 3], s: &Settings) -> f32 {
    let (mut n2, mut dot) = (0f32, 0f32);
    for c in 0..3 {
        let d = fg[c] - bg[c];
        n2 += d * d;
        dot += (i[c] - bg[c]) * d;
    }
    let smooth = smooth.clamp(0.0, 1.0);
    if n2 <= 1e-6 {
        return smooth;
    }
    let unsure = (model.min(1.0 - model) / s.trust_from).min(1.0);
    let trust = unsure * n2 / (n2 + s.sigma * s.sigma);
    trust * (dot / n2).clamp(0.0, 1.0) + (1.0 - trust) * smooth
}

/// What a full-resolution pixel needs from the working resolution, interleaved so that one
/// bilinear sample reads four neighbouring cells: the guided filter's coefficients (a, b),
/// the certain foreground and background colours, and the estimated F and B.
const CELL: usize = 16;

/// A value in 0..1 as a byte, rounded (without `f32::round`, a library call on baseline x86-64).
#[inline]
fn to_u8(v: f32) -> u8 {
    (v * 255.0 + 0.5) as u8
}

fn lerp_cell(a: &[f32], b: &[f32], t: f32, out: &mut [f32]) {
    for k in 0..CELL {
        out[k] = a[k] + (b[k] - a[k]) * t;
    }
}

/// Refines `mask` (one byte per pixel) against `rgb` (three bytes per pixel), both `w`x`h`, in
/// place: the mask's edge band follows the photo, and, when `rgb` is to be shown, the colour of
/// every semi-transparent pixel becomes the estimated foreground. Returns how many pixels were
/// in the band.
pub fn refine(rgb: &mut [u8], mask: &mut [u8], (w, h): (u32, u32), recolour: bool, s: &Settings) -> usize {
    let (w, h) = (w as usize, h as usize);
    if w < 2 || h < 2 {
        return 0;
    }
    let scale = (WORK_SIDE as f32 / w.max(h) as f32).min(1.0);
    let (lw, lh) = (
        ((w as f32 * scale).round() as usize).max(1),
        ((h as f32 * scale).round() as usize).max(1),
    );
    let small = |src: &[u8], pixel| -> Vec<u8> {
        if (lw, lh) == (w, h) {
            src.to_vec()
        } else {
            super::resize::convolve(
                src,
                (w as u32, h as u32),
                pixel,
                (lw as u32, lh as u32),
                fast_image_resize::FilterType::Box,
            )
        }
    };
    let guide = Rgb::from_u8(&small(rgb, fast_image_resize::PixelType::U8x3), lw, lh);
    let p = Plane {
        w: lw,
        h: lh,
        v: small(mask, fast_image_resize::PixelType::U8).iter().map(|&m| m as f32 / 255.0).collect(),
    };
    // The band: within the filter's reach of an uncertain working pixel.
    let uncertain = Plane {
        w: lw,
        h: lh,
        v: p.v.iter().map(|&v| if v > s.certain && v < 1.0 - s.certain { 1.0 } else { 0.0 }).collect(),
    }
    .box_mean(s.reach);
    // (At least one uncertain pixel in the window: half of one pixel's share, since the
    // running sums leave rounding residue where there is none.)
    let one = 0.5 / ((2 * s.reach + 1) * (2 * s.reach + 1)) as f32;
    let band: Vec<bool> = uncertain.v.iter().map(|&v| v > one).collect();
    drop(uncertain);
    let any_band = band.iter().any(|&b| b);
    if !any_band && !recolour {
        return 0;
    }
    let coef = guided_coefficients(&guide, &p, s.radius, s.eps);
    // The colours of the certain foreground and background, spread over the band.
    let certain = |keep: &dyn Fn(f32) -> bool| Plane {
        w: lw,
        h: lh,
        v: p.v.iter().map(|&v| if keep(v) { 1.0 } else { 0.0 }).collect(),
    };
    let fg = fill(&guide, &certain(&|v| v >= 1.0 - s.certain));
    let bg = fill(&guide, &certain(&|v| v <= s.certain));
    let at = |planes: &[Plane; 3], k: usize| [planes[0].v[k], planes[1].v[k], planes[2].v[k]];
    // Alpha at the working resolution, for the foreground estimate.
    let alpha = Plane {
        w: lw,
        h: lh,
        v: (0..lw * lh)
            .map(|k| {
                if !band[k] {
                    return p.v[k];
                }
                let i = at(&guide.0, k);
                let smooth = coef.a[0].v[k] * i[0] + coef.a[1].v[k] * i[1] + coef.a[2].v[k] * i[2] + coef.b.v[k];
                blend_alpha(i, p.v[k], smooth, at(&fg.0, k), at(&bg.0, k), s)
            })
            .collect(),
    };
    drop(p);
    // (A mask alone needs no foreground colour: its cells' F and B are left unread.)
    let estimated = recolour.then(|| estimate_fb(&guide, &alpha, &s.fb));
    let (f, b) = estimated.as_ref().map_or((&fg, &bg), |(f, b)| (f, b));
    drop((guide, alpha));
    let mut cells = vec![0f32; lw * lh * CELL];
    for (k, cell) in cells.chunks_exact_mut(CELL).enumerate() {
        cell[..3].copy_from_slice(&[coef.a[0].v[k], coef.a[1].v[k], coef.a[2].v[k]]);
        cell[3] = coef.b.v[k];
        cell[4..7].copy_from_slice(&at(&fg.0, k));
        cell[7..10].copy_from_slice(&at(&bg.0, k));
        cell[10..13].copy_from_slice(&at(&f.0, k));
        cell[13..16].copy_from_slice(&at(&b.0, k));
    }
    drop((coef, fg, bg, estimated));
    // Full resolution. Each output pixel's position in working pixels (centres at integers),
    // split into the left cell and the weight of the right one; and its nearest cell.
    let (sx, sy) = (lw as f32 / w as f32, lh as f32 / h as f32);
    let columns: Vec<(usize, f32, usize)> = (0..w)
        .map(|x| {
            let (x0, _, fx) = split((x as f32 + 0.5) * sx - 0.5, lw);
            (x0, fx, (((x as f32 + 0.5) * sx) as usize).min(lw - 1))
        })
        .collect();
    let prior = s.prior;
    let (lo, hi) = (to_u8(s.certain), to_u8(1.0 - s.certain));
    let total = mask.par_chunks_exact_mut(w)
        .zip(rgb.par_chunks_exact_mut(w * 3))
        .enumerate()
        .map_init(
            // A thread's blend of two working rows, and for each cell the output row it was
            // last blended for.
            || (vec![0f32; lw * CELL], vec![usize::MAX; lw]),
            |(row, blended), (y, (mrow, crow))| {
            let (y0, y1, fy) = split((y as f32 + 0.5) * sy - 0.5, lh);
            let cy = (((y as f32 + 0.5) * sy) as usize).min(lh - 1);
            // The two working rows, blended for this output row where a pixel needs them.
            let mut blend = |x: usize, row: &mut [f32]| {
                if blended[x] != y {
                    blended[x] = y;
                    lerp_cell(
                        &cells[(y0 * lw + x) * CELL..][..CELL],
                        &cells[(y1 * lw + x) * CELL..][..CELL],
                        fy,
                        &mut row[x * CELL..][..CELL],
                    );
                }
            };
            let mut v = [0f32; CELL];
            let mut n = 0;
            for x in 0..w {
                let (x0, fx, cx) = columns[x];
                let in_band = band[cy * lw + cx];
                let m = mrow[x];
                if !in_band {
                    // Outside the band the model was sure: what it left of the other side
                    // (a faint haze, a foreground at 99%) goes.
                    if m <= lo {
                        mrow[x] = 0;
                        continue;
                    }
                    if m >= hi {
                        mrow[x] = 255;
                        continue;
                    }
                    if !recolour {
                        continue;
                    }
                }
                let x1 = (x0 + 1).min(lw - 1);
                blend(x0, row);
                blend(x1, row);
                lerp_cell(&row[x0 * CELL..][..CELL], &row[x1 * CELL..][..CELL], fx, &mut v);
                let px = &mut crow[x * 3..x * 3 + 3];
                let i = [px[0] as f32 / 255.0, px[1] as f32 / 255.0, px[2] as f32 / 255.0];
                let mut a = m as f32 / 255.0;
                if in_band {
                    n += 1;
                    let smooth = v[0] * i[0] + v[1] * i[1] + v[2] * i[2] + v[3];
                    a = blend_alpha(i, a, smooth, [v[4], v[5], v[6]], [v[7], v[8], v[9]], s);
                    mrow[x] = to_u8(a);
                }
                let m = mrow[x];
                if recolour && m != 0 && m != 255 {
                    let fg = solve_pixel(m as f32 / 255.0, i, [v[10], v[11], v[12]], [v[13], v[14], v[15]], prior);
                    for c in 0..3 {
                        px[c] = to_u8(fg[c]);
                    }
                }
            }
            n
            },
        )
        .sum::<usize>();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, tol: f32) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn box_mean_matches_a_direct_sum_with_clipped_windows() {
        let p = Plane::from_fn(7, 5, |x, y| (x * 3 + y * 11 % 7) as f32);
        let r = 2;
        let m = p.box_mean(r);
        for y in 0..5usize {
            for x in 0..7usize {
                let (mut sum, mut n) = (0.0, 0.0);
                for yy in y.saturating_sub(r)..=(y + r).min(4) {
                    for xx in x.saturating_sub(r)..=(x + r).min(6) {
                        sum += p.v[yy * 7 + xx];
                        n += 1.0;
                    }
                }
                assert!(close(m.v[y * 7 + x], sum / n, 1e-4), "({x},{y})");
            }
        }
    }

    #[test]
    fn a_constant_region_passes_through_the_filter_unchanged() {
        let guide = Rgb(std::array::from_fn(|c| Plane::from_fn(16, 12, |x, y| ((x * 7 + y * 3 + c * 5) % 11) as f32 / 10.0)));
        let p = Plane::from_fn(16, 12, |_, _| 0.7);
        let q = guided_coefficients(&guide, &p, 3, 1e-3).filter(&guide);
        assert!(q.v.iter().all(|&v| close(v, 0.7, 1e-4)), "{:?}", &q.v[..8]);
    }

    #[test]
    fn a_mask_that_follows_the_guides_edge_stays_sharp() {
        // A step in the photo and the same step in the mask: an edge-preserving filter keeps
        // it (a plain box filter of the same radius would spread it over 9 pixels).
        let (w, h) = (24, 8);
        let guide = Rgb(std::array::from_fn(|c| Plane::from_fn(w, h, |x, _| if x < 10 { 0.1 + 0.1 * c as f32 } else { 0.9 })));
        let p = Plane::from_fn(w, h, |x, _| if x < 10 { 0.0 } else { 1.0 });
        let co = guided_coefficients(&guide, &p, 4, 1e-4);
        let q = co.filter(&guide);
        let blurred = p.box_mean(4);
        for x in 0..w {
            assert!(close(q.v[x], p.v[x], 0.02), "({x}): {}", q.v[x]);
        }
        assert!(close(blurred.v[9], 4.0 / 9.0, 1e-5));
        // And a soft ramp in a flat photo is left a ramp: alpha follows the mask where the
        // photo has no edge to follow.
        let flat = Rgb(std::array::from_fn(|_| Plane::from_fn(w, h, |_, _| 0.5)));
        let ramp = Plane::from_fn(w, h, |x, _| x as f32 / (w - 1) as f32);
        let q = guided_coefficients(&flat, &ramp, 4, 1e-4).filter(&flat);
        // (Away from the border, where the clipped windows' means are not on the ramp.)
        for x in 8..w - 8 {
            assert!(close(q.v[x], ramp.v[x], 1e-3), "({x}): {}", q.v[x]);
        }
    }

    #[test]
    fn the_estimator_recovers_known_foreground_and_background() {
        // Known F (a smooth red-to-orange) over known B (green), mixed by a soft alpha.
        let (w, h) = (32, 24);
        let f_true = |x: usize, _y: usize| [0.9, 0.2 + 0.3 * x as f32 / w as f32, 0.1];
        let b_true = [0.1, 0.8, 0.2];
        let alpha = Plane::from_fn(w, h, |x, _| ((x as f32 - 8.0) / 16.0).clamp(0.0, 1.0));
        let image = Rgb(std::array::from_fn(|c| {
            Plane::from_fn(w, h, |x, y| {
                let a = alpha.v[y * w + x];
                a * f_true(x, y)[c] + (1.0 - a) * b_true[c]
            })
        }));
        let (f, b) = estimate_fb(&image, &alpha, &FbSettings::default());
        for y in 0..h {
            for x in 0..w {
                let a = alpha.v[y * w + x];
                for c in 0..3 {
                    // The blend is reproduced everywhere.
                    let i = image.0[c].v[y * w + x];
                    let again = a * f.0[c].v[y * w + x] + (1.0 - a) * b.0[c].v[y * w + x];
                    assert!(close(again, i, 0.01), "({x},{y}) c{c}: {again} for {i}");
                    // F is only determined where alpha > 0, B where alpha < 1; where one
                    // dominates the other is mostly smoothness.
                    if a > 0.4 {
                        let got = f.0[c].v[y * w + x];
                        assert!(close(got, f_true(x, y)[c], 0.06), "F ({x},{y}) c{c}: {got} for {}", f_true(x, y)[c]);
                    }
                    if a < 0.6 {
                        let got = b.0[c].v[y * w + x];
                        assert!(close(got, b_true[c], 0.06), "B ({x},{y}) c{c}: {got} for {}", b_true[c]);
                    }
                }
            }
        }
    }

    #[test]
    fn the_estimate_does_not_depend_on_the_thread_count() {
        let (w, h) = (40, 30);
        let alpha = Plane::from_fn(w, h, |x, y| (((x + y) as f32 - 30.0) / 20.0).clamp(0.0, 1.0));
        let image = Rgb(std::array::from_fn(|c| Plane::from_fn(w, h, |x, y| ((x * 13 + y * 7 + c * 29) % 17) as f32 / 16.0)));
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| estimate_fb(&image, &alpha, &FbSettings::default()))
        };
        let (f1, b1) = run(1);
        let (f3, b3) = run(3);
        for c in 0..3 {
            assert_eq!(f1.0[c], f3.0[c]);
            assert_eq!(b1.0[c], b3.0[c]);
        }
    }

    #[test]
    fn the_pixel_solve_returns_f_where_the_blend_is_exact() {
        let (fc, bc, a) = ([0.8, 0.3, 0.1], [0.0, 1.0, 0.0], 0.4f32);
        let i: [f32; 3] = std::array::from_fn(|c| a * fc[c] + (1.0 - a) * bc[c]);
        let got = solve_pixel(a, i, fc, bc, 0.02);
        for c in 0..3 {
            assert!(close(got[c], fc[c], 1e-3), "{got:?}");
        }
        // An opaque pixel is its own colour, whatever the priors say.
        let got = solve_pixel(1.0, [0.2, 0.4, 0.6], [0.9, 0.9, 0.9], [0.0; 3], 0.02);
        for (c, want) in [0.2, 0.4, 0.6].into_iter().enumerate() {
            assert!(close(got[c], want, 0.02), "{got:?}");
        }
    }

    #[test]
    fn refine_removes_a_green_fringe_and_sharpens_the_edge() {
        // A red disc on green, its mask a blurred, slightly too large disc: the band's colours
        // must lose the green, and the mask must follow the disc.
        let (w, h) = (120usize, 90usize);
        let (cx, cy, r) = (60.0f32, 45.0f32, 25.0f32);
        let cover = |x: usize, y: usize| {
            let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
            (r + 0.5 - d).clamp(0.0, 1.0)
        };
        let mut rgb = Vec::new();
        let mut mask = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let a = cover(x, y);
                rgb.extend([(a * 220.0 + (1.0 - a) * 20.0) as u8, (a * 30.0 + (1.0 - a) * 200.0) as u8, 30]);
                let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
                mask.push((((r + 3.0 - d) / 6.0).clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
        let err = |m: &[u8]| -> f32 {
            (0..w * h).map(|k| (m[k] as f32 / 255.0 - cover(k % w, k / w)).abs()).sum::<f32>()
        };
        let before = err(&mask);
        let n = refine(&mut rgb, &mut mask, (w as u32, h as u32), true, &Settings::default());
        assert!(n > 0);
        let after = err(&mask);
        // At least 40% less (the goal the quality benchmark holds the real pipeline to).
        assert!(after < before * 0.6, "alpha error {before} -> {after}");
        for k in 0..w * h {
            if mask[k] > 25 {
                let g = rgb[k * 3 + 1];
                assert!(g < 80, "pixel {k} (alpha {}) keeps green {g}", mask[k]);
            }
        }
    }
}
