//! The option values every front end shares: colours, gradients, crop margins, regions of
//! interest, positions and scales (`engine`), and the request's format, size, colour and boolean
//! fields (`jobs::request`). The input, as text, goes to every parser.
//!
//! Properties: no panic; what is accepted lies in its documented range; each value's `Display`
//! (used in logs, `config print` and stored jobs) parses back to the same value; and the request
//! fields ignore ASCII case and surrounding spaces, as documented.
#![no_main]

use libfuzzer_sys::fuzz_target;
use removebgd::engine::layout::{Length, parse_scale};
use removebgd::engine::{BgColor, Gradient, Margin, Position, Roi};
use removebgd::jobs::request::{bg_color, boolean, output_format, output_size};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn length_ok(l: Length) -> bool {
    match l {
        Length::Px(v) | Length::Percent(v) => v.is_finite() && v >= 0.0,
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    a: &Result<T, removebgd::jobs::JobError>,
    b: &Result<T, removebgd::jobs::JobError>,
) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a.code() == b.code(),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };

    if let Ok(c) = s.parse::<BgColor>() {
        assert_eq!(c.to_string().parse::<BgColor>(), Ok(c), "{s:?}");
    }
    if let Ok(g) = s.parse::<Gradient>() {
        assert!(g.angle_deg.is_finite());
        assert!((2..=16).contains(&g.stops.len()), "{g:?}");
        assert!(g.stops.windows(2).all(|w| w[0].0 <= w[1].0), "stops go back: {g:?}");
        assert!(g.stops.iter().all(|(at, _)| (0.0..=1.0).contains(at)), "{g:?}");
        let again: Gradient = g
            .to_string()
            .parse()
            .unwrap_or_else(|e| panic!("{g} does not parse: {e}"));
        assert_eq!(again.angle_deg, g.angle_deg);
        assert_eq!(again.stops.len(), g.stops.len());
        for ((a, ca), (b, cb)) in again.stops.iter().zip(&g.stops) {
            assert_eq!(ca, cb);
            assert!((a - b).abs() <= 1e-6, "{g} -> {again}");
        }
    }
    if let Ok(m) = s.parse::<Margin>() {
        assert!([m.top, m.right, m.bottom, m.left].into_iter().all(length_ok), "{m:?}");
        assert_eq!(m.to_string().parse::<Margin>(), Ok(m));
    }
    if let Ok(r) = s.parse::<Roi>() {
        assert!(r.0.into_iter().all(length_ok), "{r:?}");
        assert_eq!(r.to_string().parse::<Roi>(), Ok(r));
    }
    if let Ok(p) = s.parse::<Position>() {
        match p {
            Position::Original => assert_eq!(p.to_string().parse::<Position>(), Ok(p)),
            Position::At(x, y) => {
                assert!((0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y), "{p:?}");
                match p.to_string().parse::<Position>() {
                    Ok(Position::At(x2, y2)) => assert!(close(x, x2) && close(y, y2), "{p} -> {x2} {y2}"),
                    other => panic!("{p} parses as {other:?}"),
                }
            }
        }
    }
    if let Ok(Some(v)) = parse_scale(s) {
        assert!((0.1..=1.0).contains(&v), "scale {v}");
        let again = parse_scale(&format!("{}%", v * 100.0));
        assert!(matches!(again, Ok(Some(w)) if close(v, w)), "{v} -> {again:?}");
    }

    let upper = s.to_ascii_uppercase();
    let padded = format!(" {s}\t");
    for v in [&upper, &padded] {
        assert!(same(&output_format(Some(s)), &output_format(Some(v))), "{s:?} / {v:?}");
        assert!(same(&output_size(Some(s)), &output_size(Some(v))), "{s:?} / {v:?}");
        assert!(same(&boolean("crop", s), &boolean("crop", v)), "{s:?} / {v:?}");
    }
    assert!(same(&bg_color(Some(s)), &bg_color(Some(&padded))), "{s:?}");
    if let Ok(Some(c)) = bg_color(Some(s)) {
        assert_eq!(s.trim().parse::<BgColor>(), Ok(c));
    }
});
