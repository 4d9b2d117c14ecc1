//! UTC calendar windows: hour, day and month, plus the civil-date arithmetic behind them.
//!
//! A window is named by an index (hours, days or months since 1970-01) so that account state can
//! tell in O(1) whether a stored counter still belongs to the current window.

use super::Millis;

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;

/// The end of the range windows are kept for: 10000-01-01T00:00:00Z (credits expire at the
/// latest on the last second of 9999). Stored state that names a window outside
/// `0..=Window::last_index()` is refused, which keeps every window and date computation on it
/// far from overflowing.
pub(crate) const LAST_MS: Millis = 253_402_300_800_000;

/// The three calendar windows a limit can be counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    Hour,
    Day,
    Month,
}

/// Days since 1970-01-01 to the civil date (year, month 1..=12, day 1..=31).
/// Howard Hinnant's algorithm, exact for the whole proleptic Gregorian calendar.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// The civil date (year, month 1..=12, day 1..=31) to days since 1970-01-01.
pub(crate) fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Window {
    /// The index of the window that contains `now` (hours, days or months since the epoch).
    pub(crate) fn index(self, now: Millis) -> i64 {
        match self {
            Window::Hour => now.div_euclid(MS_PER_HOUR),
            Window::Day => now.div_euclid(MS_PER_DAY),
            Window::Month => {
                let (y, m, _) = civil_from_days(now.div_euclid(MS_PER_DAY));
                (y - 1970) * 12 + i64::from(m) - 1
            }
        }
    }

    /// When the window with this index starts, in ms since the epoch.
    pub(crate) fn start_of(self, index: i64) -> Millis {
        match self {
            Window::Hour => index.saturating_mul(MS_PER_HOUR),
            Window::Day => index.saturating_mul(MS_PER_DAY),
            Window::Month => {
                let year = 1970 + index.div_euclid(12);
                let month = index.rem_euclid(12) as u32 + 1;
                days_from_civil(year, month, 1).saturating_mul(MS_PER_DAY)
            }
        }
    }

    /// The index of the window that holds the last instant before `LAST_MS`.
    pub(crate) fn last_index(self) -> i64 {
        self.index(LAST_MS - 1)
    }

    /// When the window that contains `now` ends (the first ms of the next one).
    pub(crate) fn end(self, now: Millis) -> Millis {
        self.start_of(self.index(now) + 1)
    }
}

/// Whole seconds from `now` until `at`, rounded up, never negative.
pub(crate) fn seconds_until(now: Millis, at: Millis) -> i64 {
    let ms = at.saturating_sub(now).max(0);
    (ms + 999) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64) -> Millis {
        (days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s) * 1000
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn day_rolls_over_at_utc_midnight() {
        let last = ms(2026, 11, 28, 23, 59, 59) + 999;
        assert_eq!(Window::Day.index(last) + 1, Window::Day.index(last + 1));
        assert_eq!(Window::Day.end(last), last + 1);
        assert_eq!(
            seconds_until(ms(2026, 11, 28, 23, 59, 0), Window::Day.end(last)),
            60
        );
    }

    #[test]
    fn month_ends_on_its_last_second() {
        let last_second = ms(2026, 1, 31, 23, 59, 59);
        assert_eq!(Window::Month.end(last_second), ms(2026, 2, 1, 0, 0, 0));
        assert_eq!(
            seconds_until(last_second, Window::Month.end(last_second)),
            1
        );
        assert_eq!(
            Window::Month.index(last_second) + 1,
            Window::Month.index(last_second + 1000)
        );
        // December rolls into the next year.
        assert_eq!(
            Window::Month.end(ms(2026, 12, 15, 0, 0, 0)),
            ms(2027, 1, 1, 0, 0, 0)
        );
    }

    #[test]
    fn leap_years_have_their_29th_of_february() {
        assert_eq!(
            Window::Month.end(ms(2028, 2, 10, 0, 0, 0)),
            ms(2028, 3, 1, 0, 0, 0)
        );
        assert_eq!(civil_from_days(days_from_civil(2028, 2, 29)), (2028, 2, 29));
        // 2100 is not a leap year, 2000 was.
        assert_eq!(
            Window::Month.end(ms(2100, 2, 10, 0, 0, 0)),
            ms(2100, 3, 1, 0, 0, 0)
        );
        assert_eq!(
            days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 1),
            28
        );
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 1),
            29
        );
    }

    #[test]
    fn hour_window_and_retry_after() {
        let t = ms(2026, 6, 1, 10, 30, 0) + 1;
        assert_eq!(Window::Hour.end(t), ms(2026, 6, 1, 11, 0, 0));
        assert_eq!(seconds_until(t, Window::Hour.end(t)), 1800);
        assert_eq!(seconds_until(10, 5), 0);
    }

    #[test]
    fn month_start_matches_index() {
        for (y, m) in [(1970, 1), (1999, 12), (2024, 2), (2026, 11)] {
            let t = ms(y, m, 3, 4, 5, 6);
            let i = Window::Month.index(t);
            assert_eq!(Window::Month.start_of(i), ms(y, m, 1, 0, 0, 0));
        }
    }
}
