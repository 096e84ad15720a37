//! Wall-clock helpers on Unix seconds (UTC): RFC 3339 text, calendar months for credit periods,
//! and short durations like `30d` for key expiry and result lifetimes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `2026-04-01T12:00:00Z`, the form the API shows.
pub fn rfc3339(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The first period boundary strictly after `t`: midnight UTC on `reset_day` (1-28) of this or
/// the next month.
pub fn next_reset(t: i64, reset_day: u32) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(86_400));
    let this_month = days_from_civil(y, m, reset_day) * 86_400;
    if this_month > t {
        return this_month;
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(ny, nm, reset_day) * 86_400
}

/// The boundary one month after `boundary` (itself a reset instant for `reset_day`).
pub fn month_after(boundary: i64, reset_day: u32) -> i64 {
    next_reset(boundary, reset_day)
}

/// `90s`, `15m`, `12h`, `30d`, `2w`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s, 15m, 12h, 30d or 2w"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use s, m, h, d or w)")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// The text `parse_duration` reads back as `d` (whole seconds), in the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, scale) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= scale && secs.is_multiple_of(scale) {
            return format!("{}{unit}", secs / scale);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, hms: i64) -> i64 {
        days_from_civil(y, m, d) * 86_400 + hms
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_775_044_800), "2026-04-01T12:00:00Z");
    }

    #[test]
    fn civil_round_trips_over_centuries() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn next_reset_is_strictly_after_and_rolls_over_the_year() {
        assert_eq!(next_reset(at(2026, 3, 31, 100), 1), at(2026, 4, 1, 0));
        assert_eq!(next_reset(at(2026, 4, 1, 0), 1), at(2026, 5, 1, 0));
        assert_eq!(next_reset(at(2026, 3, 10, 5), 15), at(2026, 3, 15, 0));
        assert_eq!(next_reset(at(2026, 12, 20, 0), 15), at(2027, 1, 15, 0));
        assert_eq!(month_after(at(2026, 1, 28, 0), 28), at(2026, 2, 28, 0));
    }

    #[test]
    fn parses_durations_and_rejects_nonsense() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("3 months").is_err());
        assert!(parse_duration("99999999999999999999w").is_err());
    }

    #[test]
    fn formatted_durations_parse_back() {
        for secs in [0, 1, 59, 60, 90, 3600, 5400, 86_400, 604_800, 1_209_600 + 1] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{secs}");
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
