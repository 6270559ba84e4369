//! Window assignment in a person's local time zone.
//!
//! Windows are half-open UTC intervals `[start, end)` whose boundaries fall on local clock
//! hours and local midnights. A local day is 23, 24 or 25 hours long around DST changes,
//! and a repeated local hour (DST end) yields two distinct hour windows. When a zone skips
//! midnight, the day starts at the first instant that exists.

use chrono::{Datelike, Days, NaiveDate, NaiveTime, TimeZone, Timelike};
use chrono_tz::Tz;

/// Milliseconds in an hour.
const HOUR: i64 = 3_600_000;

/// Parses an IANA zone name.
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("`{name}` is not an IANA time zone name (e.g. Europe/Berlin)"))
}

fn local(tz: Tz, t: i64) -> chrono::DateTime<Tz> {
    tz.timestamp_millis_opt(t)
        .single()
        .expect("every UTC instant maps to exactly one local time")
}

/// The local clock hour containing `t`.
pub fn hour_window(tz: Tz, t: i64) -> (i64, i64) {
    let l = local(tz, t);
    // The local hour starts `minutes:seconds.millis` before `t`. This is exact wherever
    // UTC offsets change by whole hours (every zone but Lord Howe Island, whose 30-minute
    // DST shift makes one hour a year 30 minutes off).
    let into_hour = i64::from(l.minute()) * 60_000
        + i64::from(l.second()) * 1000
        + i64::from(l.timestamp_subsec_millis());
    let start = t - into_hour;
    (start, start + HOUR)
}

/// First instant of local date `date`.
pub fn local_midnight(tz: Tz, date: NaiveDate) -> i64 {
    local_instant(tz, date, NaiveTime::MIN)
}

/// The instant the local clock shows `time` on `date`; when that time does not exist (a
/// DST gap), the first instant after the gap; when it exists twice, the earlier.
pub fn local_instant(tz: Tz, date: NaiveDate, mut time: NaiveTime) -> i64 {
    // Gaps are at most a couple of hours (usually one, starting exactly at midnight).
    for _ in 0..(4 * 3) {
        if let Some(dt) = tz.from_local_datetime(&date.and_time(time)).earliest() {
            return dt.timestamp_millis();
        }
        // The time does not exist on this date (a DST gap): try later in 15-minute steps.
        time += chrono::Duration::minutes(15);
    }
    tz.from_utc_datetime(&date.and_time(NaiveTime::MIN))
        .timestamp_millis()
}

/// The local date of instant `t`.
pub fn local_date(tz: Tz, t: i64) -> NaiveDate {
    local(tz, t).date_naive()
}

/// Working-hours intervals of the local day `day` for a schedule (weekdays Monday first,
/// minutes after local midnight), and whether the day is a working day.
pub fn work_intervals(
    tz: Tz,
    day: (i64, i64),
    work_days: &[bool; 7],
    start_min: u32,
    end_min: u32,
) -> (Vec<(i64, i64)>, bool) {
    let date = local_date(tz, day.0);
    if !work_days[date.weekday().num_days_from_monday() as usize] {
        return (Vec::new(), false);
    }
    let at = |min: u32| {
        if min >= 24 * 60 {
            day.1
        } else {
            let time = NaiveTime::from_hms_opt(min / 60, min % 60, 0).expect("minutes < 1440");
            local_instant(tz, date, time).clamp(day.0, day.1)
        }
    };
    let (s, e) = (at(start_min), at(end_min));
    (if e > s { vec![(s, e)] } else { Vec::new() }, true)
}

/// The local week (Monday 00:00 to the next Monday 00:00) containing `t`.
pub fn week_window(tz: Tz, t: i64) -> (i64, i64) {
    let date = local_date(tz, t);
    let monday = date - Days::new(u64::from(date.weekday().num_days_from_monday()));
    (
        local_midnight(tz, monday),
        local_midnight(tz, monday + Days::new(7)),
    )
}

/// The local day containing `t`.
pub fn day_window(tz: Tz, t: i64) -> (i64, i64) {
    let date = local(tz, t).date_naive();
    let next = date
        .checked_add_days(Days::new(1))
        .expect("dates before year 9999");
    (local_midnight(tz, date), local_midnight(tz, next))
}

/// Every local day overlapping `[start, end)`; at least the day containing `start`.
pub fn days_overlapping(tz: Tz, start: i64, end: i64) -> Vec<(i64, i64)> {
    days_from(tz, day_window(tz, start), end).collect()
}

/// The local days from `first` (a day window) on, until one reaches `end`; for callers
/// that already know the first day.
pub fn days_from(tz: Tz, first: (i64, i64), end: i64) -> impl Iterator<Item = (i64, i64)> {
    std::iter::successors(Some(first), move |&(_, day_end)| {
        (day_end < end).then(|| day_window(tz, day_end))
    })
}

/// The hour windows of a day, in order, tiling it exactly.
pub fn hours_of_day(tz: Tz, day: (i64, i64)) -> Vec<(i64, i64)> {
    let mut out = Vec::with_capacity(25);
    let mut t = day.0;
    while t < day.1 {
        let (start, end) = hour_window(tz, t);
        let clipped = (start.max(day.0), end.min(day.1));
        out.push(clipped);
        t = clipped.1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn berlin_spring_forward_day_has_23_hours() {
        let tz = parse_tz("Europe/Berlin").unwrap();
        let day = day_window(tz, ms("2026-03-29T12:00:00+02:00"));
        assert_eq!(
            day,
            (
                ms("2026-03-29T00:00:00+01:00"),
                ms("2026-03-30T00:00:00+02:00")
            )
        );
        assert_eq!(hours_of_day(tz, day).len(), 23);
    }

    #[test]
    fn berlin_fall_back_day_has_25_hours_and_two_2am_hours() {
        let tz = parse_tz("Europe/Berlin").unwrap();
        let day = day_window(tz, ms("2026-10-25T12:00:00+01:00"));
        let hours = hours_of_day(tz, day);
        assert_eq!(hours.len(), 25);
        let first_two = hour_window(tz, ms("2026-10-25T02:30:00+02:00"));
        let second_two = hour_window(tz, ms("2026-10-25T02:30:00+01:00"));
        assert_eq!(
            first_two,
            (
                ms("2026-10-25T02:00:00+02:00"),
                ms("2026-10-25T03:00:00+02:00")
            )
        );
        assert_eq!(
            second_two,
            (
                ms("2026-10-25T02:00:00+01:00"),
                ms("2026-10-25T03:00:00+01:00")
            )
        );
    }

    #[test]
    fn half_hour_zone_hours_start_at_local_full_hours() {
        let tz = parse_tz("Asia/Kolkata").unwrap();
        let w = hour_window(tz, ms("2026-11-24T10:45:00+05:30"));
        assert_eq!(
            w,
            (
                ms("2026-11-24T10:00:00+05:30"),
                ms("2026-11-24T11:00:00+05:30")
            )
        );
    }

    #[test]
    fn a_span_across_midnight_touches_two_days() {
        let tz = parse_tz("America/New_York").unwrap();
        let days = days_overlapping(
            tz,
            ms("2026-11-24T23:30:00-05:00"),
            ms("2026-11-25T00:30:00-05:00"),
        );
        assert_eq!(days.len(), 2);
        assert_eq!(days[1].0, ms("2026-11-25T00:00:00-05:00"));
    }

    const ZONES: [&str; 5] = [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Asia/Kolkata",
        "America/Santiago",
    ];

    proptest! {
        #[test]
        fn windows_contain_their_instant_and_tile_the_day(
            t in 0i64..4_102_444_800_000, zone in 0usize..ZONES.len()
        ) {
            let tz = parse_tz(ZONES[zone]).unwrap();
            let (hs, he) = hour_window(tz, t);
            prop_assert!(hs <= t && t < he);
            prop_assert_eq!(he - hs, HOUR);
            let (ds, de) = day_window(tz, t);
            prop_assert!(ds <= t && t < de);
            prop_assert!((22 * HOUR..=26 * HOUR).contains(&(de - ds)));
            let hours = hours_of_day(tz, (ds, de));
            prop_assert_eq!(hours.first().unwrap().0, ds);
            prop_assert_eq!(hours.last().unwrap().1, de);
            for pair in hours.windows(2) {
                prop_assert_eq!(pair[0].1, pair[1].0);
            }
            // The hour containing t is one of the day's hours (clipped to the day).
            prop_assert!(hours.iter().any(|h| h.0 <= t && t < h.1));
            // Assignment is stable: any instant of a window maps back to that window.
            prop_assert_eq!(day_window(tz, de - 1), (ds, de));
            prop_assert_eq!(hour_window(tz, he - 1).0, hs);
        }
    }
}
