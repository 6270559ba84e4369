//! Event time: a UTC instant with millisecond precision.
//!
//! On the wire an instant is either an RFC 3339 string (any offset; converted to UTC and
//! truncated to the millisecond) or an integer number of milliseconds since the Unix epoch.
//! It is always written back as RFC 3339 in UTC with exactly three fractional digits, so the
//! encoding round-trips and sorts lexically.

use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime(pub i64);

/// Earliest accepted instant (1970-01-01) and latest (year 9999), so every value converts
/// to a calendar date without overflow.
const MIN_MS: i64 = 0;
const MAX_MS: i64 = 253_402_300_799_999;

impl EventTime {
    pub const MINUTE: i64 = 60_000;
    pub const HOUR: i64 = 3_600_000;
    pub const DAY: i64 = 86_400_000;

    /// The current wall-clock instant.
    pub fn now() -> Self {
        EventTime(Utc::now().timestamp_millis())
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    /// Converts to a chrono instant; every value built by this module is in range.
    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(self.0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// Parses RFC 3339 text, truncating to the millisecond.
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        if let Some(t) = Self::parse_canonical(text) {
            return Ok(t);
        }
        let parsed = DateTime::parse_from_rfc3339(text).map_err(|e| {
            format!("`{text}` is not an RFC 3339 timestamp ({e}); use e.g. 2026-11-24T09:30:00Z")
        })?;
        Self::from_millis(parsed.timestamp_millis())
    }

    /// The form this module writes (`YYYY-MM-DDTHH:MM:SS.mmmZ`), read by position: every
    /// event on the bus carries two such stamps, and this skips the general parser. Any
    /// other text (offsets, other precisions, anything invalid) returns `None` and goes
    /// to the general parser, which also words the errors.
    fn parse_canonical(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        if b.len() != 24
            || (b[4], b[7], b[10], b[13], b[16], b[19], b[23])
                != (b'-', b'-', b'T', b':', b':', b'.', b'Z')
        {
            return None;
        }
        let num = |from: usize, to: usize| -> Option<u32> {
            b[from..to].iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        let date = chrono::NaiveDate::from_ymd_opt(
            i32::try_from(num(0, 4)?).ok()?,
            num(5, 7)?,
            num(8, 10)?,
        )?;
        let (h, m, sec, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
        // A leap second (60) is left to the general parser.
        if sec > 59 {
            return None;
        }
        let at = date
            .and_hms_milli_opt(h, m, sec, ms)?
            .and_utc()
            .timestamp_millis();
        Self::from_millis(at).ok()
    }

    /// Accepts epoch milliseconds inside the supported range.
    pub fn from_millis(ms: i64) -> Result<Self, String> {
        if (MIN_MS..=MAX_MS).contains(&ms) {
            Ok(EventTime(ms))
        } else {
            Err(format!(
                "{ms} is outside the supported range of epoch milliseconds ({MIN_MS}..={MAX_MS})"
            ))
        }
    }

    pub fn to_rfc3339(self) -> String {
        self.to_datetime()
            .to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// A half-open span of event time, `[from, to)`: what every read by time range takes.
/// [`TimeRange::new`] refuses an empty span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimeRange {
    pub from: EventTime,
    pub to: EventTime,
}

impl TimeRange {
    /// The span `[from, to)`; `None` unless `from` is before `to`.
    pub fn new(from: EventTime, to: EventTime) -> Option<Self> {
        (from < to).then_some(TimeRange { from, to })
    }

    /// The span's length in milliseconds.
    pub fn len_ms(&self) -> i64 {
        self.to.0 - self.from.0
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for EventTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for EventTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TimeVisitor;
        impl Visitor<'_> for TimeVisitor {
            type Value = EventTime;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp string or epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventTime, E> {
                EventTime::parse_rfc3339(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EventTime, E> {
                EventTime::from_millis(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EventTime, E> {
                let ms = i64::try_from(v).map_err(|_| E::custom("epoch milliseconds overflow"))?;
                EventTime::from_millis(ms).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<EventTime, E> {
                if v.fract() == 0.0 && v.is_finite() {
                    EventTime::from_millis(v as i64).map_err(E::custom)
                } else {
                    Err(E::custom(
                        "epoch milliseconds must be a whole number (seconds are not accepted)",
                    ))
                }
            }
        }
        d.deserialize_any(TimeVisitor)
    }
}

impl JsonSchema for EventTime {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EventTime".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": ["string", "integer"],
            "format": "date-time",
            "description": "UTC instant: RFC 3339 text (any offset) or epoch milliseconds; stored with millisecond precision"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_range_is_never_empty() {
        let (a, b) = (EventTime(1_000), EventTime(5_000));
        assert_eq!(TimeRange::new(b, a), None);
        assert_eq!(TimeRange::new(a, a), None);
        let r = TimeRange::new(a, b).unwrap();
        assert_eq!((r.from, r.to, r.len_ms()), (a, b, 4_000));
    }

    proptest::proptest! {
        /// The positional reader agrees with chrono on every canonical stamp and on
        /// near-misses (which it must hand over rather than misread).
        #[test]
        fn canonical_stamps_parse_as_chrono_does(ms in MIN_MS..=MAX_MS, cut in 0usize..24, c in 0u8..128) {
            let text = EventTime(ms).to_rfc3339();
            proptest::prop_assert_eq!(EventTime::parse_canonical(&text), Some(EventTime(ms)));
            let mut bent = text.into_bytes();
            bent[cut] = c;
            if let Ok(bent) = String::from_utf8(bent) {
                let general = DateTime::parse_from_rfc3339(&bent)
                    .ok()
                    .and_then(|d| EventTime::from_millis(d.timestamp_millis()).ok());
                if let Some(fast) = EventTime::parse_canonical(&bent) {
                    proptest::prop_assert_eq!(Some(fast), general, "{}", bent);
                }
                proptest::prop_assert_eq!(EventTime::parse_rfc3339(&bent).ok(), general);
            }
        }
    }

    #[test]
    fn parses_both_encodings_to_the_same_instant() {
        let a: EventTime = serde_json::from_str("\"2026-11-24T10:30:00.123+01:00\"").unwrap();
        let b: EventTime = serde_json::from_str("1795512600123").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_rfc3339(), "2026-11-24T09:30:00.123Z");
    }

    #[test]
    fn truncates_sub_millisecond_digits() {
        let t: EventTime = serde_json::from_str("\"2026-11-24T09:30:00.123999Z\"").unwrap();
        assert_eq!(t.0 % 1000, 123);
    }

    #[test]
    fn rejects_fractional_and_out_of_range_numbers() {
        assert!(serde_json::from_str::<EventTime>("1.5").is_err());
        assert!(serde_json::from_str::<EventTime>("-1").is_err());
        let err = serde_json::from_str::<EventTime>("\"yesterday\"").unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }
}
