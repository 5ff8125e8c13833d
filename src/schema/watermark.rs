//! The Incremental anchor ("watermark") of one side of a schema, and the time text it
//! needs.
//!
//! Invariants:
//! - The anchor is stored in the side's metadata store and commits in the same atomic
//!   commit as the local versions of the changes it was read with: after a crash the
//!   anchor never runs ahead of what was recorded, so no change is skipped.
//! - A watermark comes from the source's own data (the highest modified-at value read,
//!   or the tracking table's sequence and clock), never from the host's clock, so a
//!   skewed host reads the same rows.
//! - The next read starts *at* the watermark (inclusive) minus the lookback: rows read
//!   twice are compared with the stored units and produce nothing, so overlap costs a
//!   little reading and never a duplicate.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::stores::{at_or_above, TrackingAnchor, Value};

use super::table::{decode_value, encode_value};

/// Where the last Incremental read of a side stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum Anchor {
    /// The store's tracking table (triggers).
    Tracking(TrackingAnchor),
    /// The highest value of the modified-at column read so far.
    ModifiedAt(Value),
}

const TAG_TRACKING: u8 = 1;
const TAG_MODIFIED_AT: u8 = 2;

impl Anchor {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Anchor::Tracking(t) => {
                let mut out = vec![TAG_TRACKING];
                out.extend_from_slice(&t.sequence.to_le_bytes());
                out.extend_from_slice(&t.time_ms.to_le_bytes());
                out
            }
            Anchor::ModifiedAt(v) => {
                let mut out = vec![TAG_MODIFIED_AT];
                out.extend_from_slice(&encode_value(v));
                out
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Anchor, String> {
        match bytes.split_first() {
            Some((&TAG_TRACKING, rest)) if rest.len() == 16 => {
                let (a, b) = rest.split_at(8);
                let number = |part: &[u8]| {
                    part.try_into()
                        .map(i64::from_le_bytes)
                        .map_err(|_| "a tracking anchor is 16 bytes".to_string())
                };
                Ok(Anchor::Tracking(TrackingAnchor {
                    sequence: number(a)?,
                    time_ms: number(b)?,
                }))
            }
            Some((&TAG_MODIFIED_AT, rest)) => decode_value(rest).map(Anchor::ModifiedAt),
            _ => Err("not a change-detection anchor".into()),
        }
    }

    /// The later of two modified-at watermarks (a tracking anchor is simply replaced).
    pub fn max_value(current: Option<Value>, seen: &Value) -> Option<Value> {
        if seen.is_null() {
            return current;
        }
        match current {
            Some(c) if at_or_above(&c, seen) => Some(c),
            _ => Some(seen.clone()),
        }
    }
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anchor::Tracking(t) => write!(f, "sequence {}", t.sequence),
            Anchor::ModifiedAt(v) => write!(f, "{}", v.to_text()),
        }
    }
}

/// Where an Incremental read over a modified-at column starts: the watermark minus
/// the lookback. Numbers subtract directly (the column's own units); timestamps
/// (`YYYY-MM-DD HH:MM:SS`, `T` or space, optional fraction and zone suffix, as the
/// column writes them) subtract seconds and keep their own format, so the store
/// compares like with like. Anything else reads from the watermark itself.
pub fn lower_bound(watermark: &Value, lookback: u64) -> Value {
    let back = i64::try_from(lookback).unwrap_or(i64::MAX);
    match watermark {
        Value::Int(i) => Value::Int(i.saturating_sub(back)),
        Value::Float(x) => Value::Float(x - back as f64),
        Value::Text(t) => match parse_stamp(t) {
            Some(stamp) if lookback > 0 => {
                Value::Text(stamp.with_seconds(stamp.seconds.saturating_sub(back)))
            }
            _ => watermark.clone(),
        },
        other => other.clone(),
    }
}

/// The host's clock as UTC text, `YYYY-MM-DDTHH:MM:SSZ`: what a soft delete writes
/// into a text tombstone column.
pub fn utc_now_text() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let (date, time) = civil(secs);
    format!("{date}T{time}Z")
}

/// A parsed timestamp: seconds since the epoch, and the text around the seconds part
/// (separator, fraction, zone) to write a shifted one the same way.
struct Stamp<'a> {
    seconds: i64,
    separator: char,
    tail: &'a str,
}

impl Stamp<'_> {
    fn with_seconds(&self, seconds: i64) -> String {
        let (date, time) = civil(seconds);
        format!("{date}{}{time}{}", self.separator, self.tail)
    }
}

fn parse_stamp(text: &str) -> Option<Stamp<'_>> {
    let b = text.as_bytes();
    if b.len() < 19 || !text.is_char_boundary(19) {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let separator = match b[10] {
        b'T' => 'T',
        b' ' => ' ',
        _ => return None,
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(Stamp {
        seconds: days * 86_400 + hour * 3_600 + minute * 60 + second,
        separator,
        tail: &text[19..],
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` and `HH:MM:SS` of seconds since the epoch.
fn civil(seconds: i64) -> (String, String) {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!(
            "{:02}:{:02}:{:02}",
            rest / 3_600,
            rest % 3_600 / 60,
            rest % 60
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lookback_keeps_the_column_format() {
        let back = |text: &str, secs| lower_bound(&Value::Text(text.into()), secs);
        assert_eq!(
            back("2024-03-01 00:05:00", 600),
            Value::Text("2024-02-29 23:55:00".into())
        );
        assert_eq!(
            back("2024-01-01T00:00:00.250Z", 1),
            Value::Text("2023-12-31T23:59:59.250Z".into())
        );
        assert_eq!(
            back("2024-06-01 12:00:00+00", 3_600),
            Value::Text("2024-06-01 11:00:00+00".into())
        );
        // Not a timestamp: read from the watermark itself.
        assert_eq!(back("v17", 600), Value::Text("v17".into()));
        assert_eq!(lower_bound(&Value::Int(1_000), 300), Value::Int(700));
    }

    #[test]
    fn anchors_round_trip_and_garbage_is_an_error() {
        for anchor in [
            Anchor::Tracking(TrackingAnchor {
                sequence: 42,
                time_ms: -7,
            }),
            Anchor::ModifiedAt(Value::Text("2024-01-01 00:00:00".into())),
            Anchor::ModifiedAt(Value::Int(9)),
        ] {
            assert_eq!(Anchor::decode(&anchor.encode()), Ok(anchor));
        }
        assert!(Anchor::decode(&[]).is_err());
        assert!(Anchor::decode(&[TAG_TRACKING, 1, 2]).is_err());
    }

    proptest! {
        #[test]
        fn civil_and_days_agree(seconds in -10_000_000_000i64..10_000_000_000) {
            let (date, time) = civil(seconds);
            let text = format!("{date} {time}");
            let stamp = parse_stamp(&text).map(|s| s.seconds);
            prop_assert_eq!(stamp, Some(seconds));
        }
    }
}
