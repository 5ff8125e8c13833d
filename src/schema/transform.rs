//! Field transforms, written as text in the schema file (`SPLIT(1)`, `DATE("%d/%m/%Y",
//! "%Y-%m-%d")`) and applied to one value of a row on its way to the other side.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::SchemaError;
use crate::{FieldType, Value};

/// A transform of one field value (or, for `JOIN`, of several source values).
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// The `index`-th part (from 0) of the text split by `separator`; `Null` when the
    /// text has fewer parts.
    Split {
        index: usize,
        separator: String,
    },
    /// The non-null values of several source fields, as text, joined by `separator`: the
    /// inverse of splitting one field into several with `SPLIT(0)`, `SPLIT(1)`, ...
    Join {
        separator: String,
    },
    Upper,
    Lower,
    Trim,
    /// Replaces `Null` with the value; leaves every other value alone.
    Default(Value),
    Int,
    Float,
    Text,
    Bool,
    /// Reads text as a date-time in `input` format and writes it in `output` format.
    /// Tokens: `%Y %m %d %H %M %S %%`; a component the input lacks reads as its least
    /// value (month and day 1, times 0, year 1970).
    Date {
        input: String,
        output: String,
    },
}

/// Why a transform refused one row's value. Its text is the row's failure reason.
#[derive(Clone, Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum TransformError {
    #[error("cannot convert '{value}' to {target}")]
    Convert { value: String, target: &'static str },
    #[error("cannot convert '{value}' to date {format:?}")]
    Date { value: String, format: String },
    #[error("{transform} takes one value, {given} given")]
    Arity { transform: String, given: usize },
}

impl Transform {
    /// Parses transform text. Names are case-insensitive; the error names the column
    /// (in characters, from 1) and the text.
    pub fn parse(text: &str) -> Result<Transform, SchemaError> {
        Parser::new(text).transform()
    }

    /// Applies the transform to one value.
    pub fn apply(&self, value: &Value) -> Result<Value, TransformError> {
        let convert_error = |target| TransformError::Convert {
            value: value.to_text(),
            target,
        };
        if value.is_null() {
            return Ok(match self {
                Transform::Default(d) => d.clone(),
                _ => Value::Null,
            });
        }
        Ok(match (self, value) {
            (Transform::Split { index, separator }, v) => v
                .to_text()
                .split(separator.as_str())
                .nth(*index)
                .map_or(Value::Null, |part| Value::Text(part.to_string())),
            (Transform::Join { .. }, v) => Value::Text(v.to_text()),
            (Transform::Upper, Value::Text(s)) => Value::Text(s.to_uppercase()),
            (Transform::Lower, Value::Text(s)) => Value::Text(s.to_lowercase()),
            (Transform::Trim, Value::Text(s)) => Value::Text(s.trim().to_string()),
            (Transform::Upper | Transform::Lower | Transform::Trim | Transform::Default(_), v) => {
                v.clone()
            }
            (Transform::Int, v) => Value::Int(to_int(v).ok_or_else(|| convert_error("int"))?),
            (Transform::Float, v) => {
                Value::Float(to_float(v).ok_or_else(|| convert_error("float"))?)
            }
            (Transform::Bool, v) => Value::Bool(to_bool(v).ok_or_else(|| convert_error("bool"))?),
            (Transform::Text, v) => Value::Text(v.to_text()),
            (Transform::Date { input, output }, v) => {
                let text = v.to_text();
                match DateTime::parse(&text, input) {
                    Some(dt) => Value::Text(dt.format(output)),
                    None => {
                        return Err(TransformError::Date {
                            value: text,
                            format: input.clone(),
                        })
                    }
                }
            }
        })
    }

    /// Applies the transform to the values of a mapping's source fields, in order.
    /// `JOIN` joins the non-null ones (all null gives `Null`); every other transform
    /// takes exactly one.
    pub fn apply_many(&self, values: &[Value]) -> Result<Value, TransformError> {
        match (self, values) {
            (Transform::Join { separator }, _) => {
                let parts: Vec<String> = values
                    .iter()
                    .filter(|v| !v.is_null())
                    .map(Value::to_text)
                    .collect();
                Ok(if parts.is_empty() {
                    Value::Null
                } else {
                    Value::Text(parts.join(separator))
                })
            }
            (_, [one]) => self.apply(one),
            _ => Err(TransformError::Arity {
                transform: self.to_string(),
                given: values.len(),
            }),
        }
    }

    /// The transform that undoes this one, if there is one: `INT`↔`TEXT`, `FLOAT` and
    /// `BOOL` → `TEXT`, `DATE(a, b)`↔`DATE(b, a)`, `SPLIT(n, sep)` → `JOIN(sep)` (the
    /// destination fields split from one source field join back into it). `UPPER`,
    /// `LOWER`, `TRIM` and `DEFAULT` lose information and have none. `JOIN` has no
    /// one-value inverse: a mapping that joins sources `a, b` is undone by `SPLIT(0)`
    /// into `a` and `SPLIT(1)` into `b`, which validation accepts as such.
    pub fn inverse(&self) -> Option<Transform> {
        match self {
            Transform::Split { separator, .. } => Some(Transform::Join {
                separator: separator.clone(),
            }),
            Transform::Int => Some(Transform::Text),
            Transform::Text => Some(Transform::Int),
            Transform::Float | Transform::Bool => Some(Transform::Text),
            Transform::Date { input, output } => Some(Transform::Date {
                input: output.clone(),
                output: input.clone(),
            }),
            Transform::Join { .. }
            | Transform::Upper
            | Transform::Lower
            | Transform::Trim
            | Transform::Default(_) => None,
        }
    }

    /// The type of the value this transform produces from a field of type `input`.
    pub fn output_type(&self, input: FieldType) -> FieldType {
        match self {
            Transform::Split { .. }
            | Transform::Join { .. }
            | Transform::Text
            | Transform::Date { .. } => FieldType::Text,
            Transform::Upper | Transform::Lower | Transform::Trim | Transform::Default(_) => input,
            Transform::Int => FieldType::Int,
            Transform::Float => FieldType::Float,
            Transform::Bool => FieldType::Bool,
        }
    }

    /// The conversion that produces a value of `target` type.
    pub fn conversion_to(target: FieldType) -> Transform {
        match target {
            FieldType::Bool => Transform::Bool,
            FieldType::Int => Transform::Int,
            FieldType::Float => Transform::Float,
            FieldType::Text => Transform::Text,
        }
    }
}

fn to_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Bool(b) => Some(i64::from(*b)),
        // 2^63 as f64 is exact; below it, an integral float converts without loss.
        #[allow(clippy::cast_possible_truncation)]
        Value::Float(f)
            if f.fract() == 0.0
                && *f >= -9.223_372_036_854_776e18
                && *f < 9.223_372_036_854_776e18 =>
        {
            Some(*f as i64)
        }
        Value::Text(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn to_float(v: &Value) -> Option<f64> {
    match v {
        Value::Float(f) => Some(*f),
        // Integers beyond 2^53 round to the nearest float, as every SQL store does.
        #[allow(clippy::cast_precision_loss)]
        Value::Int(i) => Some(*i as f64),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::Text(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        Value::Null => None,
    }
}

fn to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Int(0) => Some(false),
        Value::Int(1) => Some(true),
        Value::Text(s) => match s.trim().to_lowercase().as_str() {
            "true" | "t" | "yes" | "1" => Some(true),
            "false" | "f" | "no" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transform::Split { index, separator } if separator == " " => {
                write!(f, "SPLIT({index})")
            }
            Transform::Split { index, separator } => {
                write!(f, "SPLIT({index}, {})", quote(separator))
            }
            Transform::Join { separator } => write!(f, "JOIN({})", quote(separator)),
            Transform::Upper => f.write_str("UPPER"),
            Transform::Lower => f.write_str("LOWER"),
            Transform::Trim => f.write_str("TRIM"),
            Transform::Default(v) => write!(f, "DEFAULT({})", literal(v)),
            Transform::Int => f.write_str("INT"),
            Transform::Float => f.write_str("FLOAT"),
            Transform::Text => f.write_str("TEXT"),
            Transform::Bool => f.write_str("BOOL"),
            Transform::Date { input, output } => {
                write!(f, "DATE({}, {})", quote(input), quote(output))
            }
        }
    }
}

impl FromStr for Transform {
    type Err = SchemaError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Transform::parse(s)
    }
}

/// A value as transform text writes it: `null`, `true`, `36`, `1.5`, `"EU"`.
fn literal(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        // Debug keeps the `.0` of integral floats, so `1.0` reads back as a float.
        Value::Float(x) => format!("{x:?}"),
        Value::Text(s) => quote(s),
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A literal argument of a transform.
enum Arg {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Null,
}

struct Parser<'a> {
    text: &'a str,
    chars: Vec<char>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            chars: text.chars().collect(),
            at: 0,
        }
    }

    fn error_at(&self, at: usize, reason: impl Into<String>) -> SchemaError {
        SchemaError::BadTransform {
            schema: String::new(),
            path: String::new(),
            value: self.text.to_string(),
            column: at + 1,
            reason: reason.into(),
            suggestion: None,
        }
    }

    fn skip_spaces(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_spaces();
        if self.chars.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn transform(mut self) -> Result<Transform, SchemaError> {
        self.skip_spaces();
        let start = self.at;
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphabetic())
        {
            self.at += 1;
        }
        let name: String = self.chars[start..self.at].iter().collect();
        if name.is_empty() {
            return Err(self.error_at(start, "expected a transform name"));
        }
        let args_at = self.at;
        let args = if self.eat('(') {
            self.args()?
        } else {
            Vec::new()
        };
        self.skip_spaces();
        if self.at < self.chars.len() {
            return Err(self.error_at(self.at, "unexpected text after the transform"));
        }
        let upper = name.to_uppercase();
        let arity = |n: usize, shape: &str| {
            if args.len() == n {
                Ok(())
            } else {
                Err(self.error_at(args_at, format!("{upper} takes {shape}")))
            }
        };
        let text_arg = |arg: &(usize, Arg)| match &arg.1 {
            Arg::Text(s) => Ok(s.clone()),
            _ => Err(self.error_at(arg.0, "expected a quoted text")),
        };
        let transform = match upper.as_str() {
            "SPLIT" => {
                if args.is_empty() || args.len() > 2 {
                    return Err(
                        self.error_at(args_at, "SPLIT takes (index) or (index, \"separator\")")
                    );
                }
                let index = match args[0].1 {
                    Arg::Int(i) => usize::try_from(i)
                        .map_err(|_| self.error_at(args[0].0, "the index must be 0 or more"))?,
                    _ => return Err(self.error_at(args[0].0, "expected an index")),
                };
                let separator = match args.get(1) {
                    Some(arg) => text_arg(arg)?,
                    None => " ".to_string(),
                };
                if separator.is_empty() {
                    return Err(self.error_at(args[1].0, "the separator must not be empty"));
                }
                Transform::Split { index, separator }
            }
            "JOIN" => {
                arity(1, "(\"separator\")")?;
                Transform::Join {
                    separator: text_arg(&args[0])?,
                }
            }
            "DEFAULT" => {
                arity(1, "(value)")?;
                Transform::Default(match &args[0].1 {
                    Arg::Int(i) => Value::Int(*i),
                    Arg::Float(x) => Value::Float(*x),
                    Arg::Text(s) => Value::Text(s.clone()),
                    Arg::Bool(b) => Value::Bool(*b),
                    Arg::Null => Value::Null,
                })
            }
            "DATE" => {
                arity(2, "(\"input format\", \"output format\")")?;
                let input = text_arg(&args[0])?;
                let output = text_arg(&args[1])?;
                for (arg, format) in [(&args[0], &input), (&args[1], &output)] {
                    check_format(format).map_err(|reason| self.error_at(arg.0, reason))?;
                }
                Transform::Date { input, output }
            }
            "UPPER" | "LOWER" | "TRIM" | "INT" | "FLOAT" | "TEXT" | "BOOL" => {
                arity(0, "no arguments")?;
                match upper.as_str() {
                    "UPPER" => Transform::Upper,
                    "LOWER" => Transform::Lower,
                    "TRIM" => Transform::Trim,
                    "INT" => Transform::Int,
                    "FLOAT" => Transform::Float,
                    "TEXT" => Transform::Text,
                    _ => Transform::Bool,
                }
            }
            _ => {
                let names = [
                    "SPLIT", "JOIN", "UPPER", "LOWER", "TRIM", "DEFAULT", "INT", "FLOAT", "TEXT",
                    "BOOL", "DATE",
                ];
                let mut error = self.error_at(start, format!("unknown transform {name:?}"));
                if let SchemaError::BadTransform { suggestion, .. } = &mut error {
                    *suggestion = super::suggest::did_you_mean(&upper, names);
                }
                return Err(error);
            }
        };
        Ok(transform)
    }

    /// The arguments after `(`, through `)`.
    fn args(&mut self) -> Result<Vec<(usize, Arg)>, SchemaError> {
        let mut args = Vec::new();
        if self.eat(')') {
            return Ok(args);
        }
        loop {
            self.skip_spaces();
            args.push((self.at, self.arg()?));
            if self.eat(')') {
                return Ok(args);
            }
            if !self.eat(',') {
                return Err(self.error_at(self.at, "expected ',' or ')'"));
            }
        }
    }

    fn arg(&mut self) -> Result<Arg, SchemaError> {
        let start = self.at;
        match self.chars.get(self.at) {
            Some('"') => {
                self.at += 1;
                let mut s = String::new();
                loop {
                    let Some(&c) = self.chars.get(self.at) else {
                        return Err(self.error_at(start, "unterminated text"));
                    };
                    self.at += 1;
                    match c {
                        '"' => return Ok(Arg::Text(s)),
                        '\\' => s.push(self.escape()?),
                        c => s.push(c),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || *c == '-' || *c == '+' => {
                while self
                    .chars
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
                {
                    self.at += 1;
                }
                let token: String = self.chars[start..self.at].iter().collect();
                let is_float = token.contains(['.', 'e', 'E']);
                if !is_float {
                    if let Ok(i) = token.parse::<i64>() {
                        return Ok(Arg::Int(i));
                    }
                } else if let Ok(x) = token.parse::<f64>() {
                    if x.is_finite() {
                        return Ok(Arg::Float(x));
                    }
                }
                Err(self.error_at(start, format!("{token:?} is not a number")))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                while self
                    .chars
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_alphabetic())
                {
                    self.at += 1;
                }
                let word: String = self.chars[start..self.at].iter().collect();
                match word.to_lowercase().as_str() {
                    "null" => Ok(Arg::Null),
                    "true" => Ok(Arg::Bool(true)),
                    "false" => Ok(Arg::Bool(false)),
                    _ => Err(self.error_at(start, format!("expected a value, found {word:?}"))),
                }
            }
            _ => Err(self.error_at(start, "expected a value")),
        }
    }

    /// The character after a `\` in quoted text.
    fn escape(&mut self) -> Result<char, SchemaError> {
        let start = self.at - 1;
        let c = self.chars.get(self.at).copied();
        self.at += 1;
        match c {
            Some('"') => Ok('"'),
            Some('\\') => Ok('\\'),
            Some('n') => Ok('\n'),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some('u') if self.chars.get(self.at) == Some(&'{') => {
                let hex_start = self.at + 1;
                let end = self.chars[hex_start..]
                    .iter()
                    .position(|c| *c == '}')
                    .map(|p| hex_start + p)
                    .ok_or_else(|| self.error_at(start, "unterminated \\u{...}"))?;
                let hex: String = self.chars[hex_start..end].iter().collect();
                self.at = end + 1;
                u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| self.error_at(start, format!("bad escape \\u{{{hex}}}")))
            }
            _ => Err(self.error_at(start, "unknown escape")),
        }
    }
}

/// Checks that a date format uses only the known tokens.
fn check_format(format: &str) -> Result<(), String> {
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | '%') => {}
                Some(t) => return Err(format!("unknown date token %{t} in {format:?}")),
                None => return Err(format!("lone % at the end of {format:?}")),
            }
        }
    }
    Ok(())
}

/// Whether text is a UTC time as `last_sync` holds it: `YYYY-MM-DDTHH:MM:SSZ`, with an
/// optional fraction of a second (`.123Z`).
pub(crate) fn is_utc_timestamp(text: &str) -> bool {
    let Some(body) = text.strip_suffix('Z') else {
        return false;
    };
    let (seconds, fraction) = body.split_once('.').unwrap_or((body, "1"));
    seconds.len() == 19
        && (1..=9).contains(&fraction.len())
        && fraction.bytes().all(|b| b.is_ascii_digit())
        && DateTime::parse(seconds, "%Y-%m-%dT%H:%M:%S").is_some()
}

/// A date-time read by a format, its components checked.
#[derive(Debug, PartialEq)]
struct DateTime {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl DateTime {
    fn parse(text: &str, format: &str) -> Option<DateTime> {
        let mut dt = DateTime {
            year: 1970,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
        };
        let text: Vec<char> = text.chars().collect();
        let mut at = 0;
        let mut format = format.chars();
        // Reads up to `max` digits (at least `min`).
        let number = |at: &mut usize, min: usize, max: usize| -> Option<u32> {
            let start = *at;
            while *at < text.len() && *at - start < max && text[*at].is_ascii_digit() {
                *at += 1;
            }
            if *at - start < min {
                return None;
            }
            text[start..*at].iter().collect::<String>().parse().ok()
        };
        while let Some(c) = format.next() {
            if c == '%' {
                match format.next()? {
                    'Y' => dt.year = number(&mut at, 4, 4)?,
                    'm' => dt.month = number(&mut at, 1, 2)?,
                    'd' => dt.day = number(&mut at, 1, 2)?,
                    'H' => dt.hour = number(&mut at, 1, 2)?,
                    'M' => dt.minute = number(&mut at, 1, 2)?,
                    'S' => dt.second = number(&mut at, 1, 2)?,
                    '%' => {
                        (text.get(at) == Some(&'%')).then_some(())?;
                        at += 1;
                    }
                    _ => return None,
                }
            } else {
                (text.get(at) == Some(&c)).then_some(())?;
                at += 1;
            }
        }
        let days_in_month = match dt.month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if dt.year % 4 == 0 && (dt.year % 100 != 0 || dt.year % 400 == 0) => 29,
            2 => 28,
            _ => return None,
        };
        let valid = at == text.len()
            && (1..=days_in_month).contains(&dt.day)
            && dt.hour < 24
            && dt.minute < 60
            && dt.second < 60;
        valid.then_some(dt)
    }

    fn format(&self, format: &str) -> String {
        let mut out = String::new();
        let mut chars = format.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('Y') => out.push_str(&format!("{:04}", self.year)),
                Some('m') => out.push_str(&format!("{:02}", self.month)),
                Some('d') => out.push_str(&format!("{:02}", self.day)),
                Some('H') => out.push_str(&format!("{:02}", self.hour)),
                Some('M') => out.push_str(&format!("{:02}", self.minute)),
                Some('S') => out.push_str(&format!("{:02}", self.second)),
                Some(other) => {
                    out.push('%');
                    out.push(other);
                }
                None => out.push('%'),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(text: &str) -> Transform {
        match Transform::parse(text) {
            Ok(t) => t,
            Err(e) => panic!("{text}: {e}"),
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn d1_split_with_default_separator_and_out_of_range_index() -> Result<(), TransformError> {
        assert_eq!(t("SPLIT(0)").apply(&text("Ada Lovelace"))?, text("Ada"));
        assert_eq!(
            t("SPLIT(1)").apply(&text("Ada Lovelace"))?,
            text("Lovelace")
        );
        // "Plato" has one part: the last name is null, not an error.
        assert_eq!(t("SPLIT(1)").apply(&text("Plato"))?, Value::Null);
        assert_eq!(t(r#"SPLIT(1, ";")"#).apply(&text("a;b;c"))?, text("b"));
        assert_eq!(t("SPLIT(0)").apply(&Value::Null)?, Value::Null);
        Ok(())
    }

    #[test]
    fn d1_int_conversion_failure_has_the_scenario_reason() -> Result<(), TransformError> {
        assert_eq!(t("INT").apply(&text("36"))?, Value::Int(36));
        assert_eq!(t("INT").apply(&text(" 36 "))?, Value::Int(36));
        let error = t("INT").apply(&text("x")).err();
        assert_eq!(
            error.map(|e| e.to_string()).as_deref(),
            Some("cannot convert 'x' to int")
        );
        assert!(t("INT").apply(&Value::Float(1.5)).is_err());
        assert_eq!(t("INT").apply(&Value::Float(2.0))?, Value::Int(2));
        Ok(())
    }

    #[test]
    fn join_is_the_inverse_of_splits() -> Result<(), TransformError> {
        let join = t("SPLIT(0)").inverse();
        assert_eq!(join, Some(t(r#"JOIN(" ")"#)));
        let join = join.unwrap_or(Transform::Upper);
        let parts = [
            t("SPLIT(0)").apply(&text("Ada Lovelace"))?,
            t("SPLIT(1)").apply(&text("Ada Lovelace"))?,
        ];
        assert_eq!(join.apply_many(&parts)?, text("Ada Lovelace"));
        // Plato's null last name is left out, not joined as an empty part.
        assert_eq!(
            join.apply_many(&[text("Plato"), Value::Null])?,
            text("Plato")
        );
        assert_eq!(join.apply_many(&[Value::Null, Value::Null])?, Value::Null);
        assert!(t("INT").apply_many(&[text("1"), text("2")]).is_err());
        Ok(())
    }

    #[test]
    fn case_trim_default_text_bool_float() -> Result<(), TransformError> {
        assert_eq!(t("UPPER").apply(&text("eu"))?, text("EU"));
        assert_eq!(t("lower").apply(&text("EU"))?, text("eu"));
        assert_eq!(t("TRIM").apply(&text("  x "))?, text("x"));
        assert_eq!(t("UPPER").apply(&Value::Int(3))?, Value::Int(3));
        assert_eq!(t(r#"DEFAULT("n/a")"#).apply(&Value::Null)?, text("n/a"));
        assert_eq!(t("DEFAULT(0)").apply(&Value::Int(5))?, Value::Int(5));
        assert_eq!(t("TEXT").apply(&Value::Int(36))?, text("36"));
        assert_eq!(t("BOOL").apply(&text("Yes"))?, Value::Bool(true));
        assert_eq!(t("BOOL").apply(&Value::Int(0))?, Value::Bool(false));
        assert_eq!(
            t("BOOL").apply(&text("maybe")).map_err(|e| e.to_string()),
            Err("cannot convert 'maybe' to bool".to_string())
        );
        assert_eq!(t("FLOAT").apply(&text("1.5"))?, Value::Float(1.5));
        assert_eq!(t("FLOAT").apply(&Value::Int(2))?, Value::Float(2.0));
        assert!(t("FLOAT").apply(&text("NaN")).is_err());
        Ok(())
    }

    #[test]
    fn date_reformats_and_rejects_impossible_dates() -> Result<(), TransformError> {
        let to_iso = t(r#"DATE("%d/%m/%Y", "%Y-%m-%d")"#);
        assert_eq!(to_iso.apply(&text("05/03/2024"))?, text("2024-03-05"));
        assert_eq!(to_iso.apply(&text("29/02/2024"))?, text("2024-02-29"));
        assert_eq!(
            to_iso.apply(&text("29/02/2023")).map_err(|e| e.to_string()),
            Err(r#"cannot convert '29/02/2023' to date "%d/%m/%Y""#.to_string())
        );
        assert!(to_iso.apply(&text("05/03/2024 extra")).is_err());
        let back = to_iso.inverse().unwrap_or(Transform::Upper);
        assert_eq!(back.apply(&text("2024-03-05"))?, text("05/03/2024"));
        let stamp = t(r#"DATE("%Y-%m-%d %H:%M:%S", "%Y%m%dT%H%M%S")"#);
        assert_eq!(
            stamp.apply(&text("2024-03-05 07:08:09"))?,
            text("20240305T070809")
        );
        assert!(stamp.apply(&text("2024-03-05 24:00:00")).is_err());
        Ok(())
    }

    #[test]
    fn inverses_follow_the_table() {
        assert_eq!(Transform::Int.inverse(), Some(Transform::Text));
        assert_eq!(Transform::Text.inverse(), Some(Transform::Int));
        for lossy in ["UPPER", "LOWER", "TRIM", "DEFAULT(1)", r#"JOIN(",")"#] {
            assert_eq!(t(lossy).inverse(), None, "{lossy}");
        }
        assert_eq!(
            t(r#"DATE("%Y", "%d")"#).inverse(),
            Some(t(r#"DATE("%d", "%Y")"#))
        );
    }

    #[test]
    fn parse_errors_name_the_column_and_the_text() {
        let cases = [
            ("SPLIT(x)", 7, "expected a value, found \"x\""),
            (r#"SPLIT("a")"#, 7, "expected an index"),
            ("SPLT(1)", 1, "unknown transform"),
            ("SPLIT(1", 8, "expected ',' or ')'"),
            ("INT(3)", 4, "INT takes no arguments"),
            (r#"DATE("%Q", "%Y")"#, 6, "unknown date token %Q"),
            ("UPPER x", 7, "unexpected text"),
            ("SPLIT(-1)", 7, "0 or more"),
        ];
        for (text, column, reason) in cases {
            match Transform::parse(text) {
                Err(SchemaError::BadTransform {
                    value,
                    column: c,
                    reason: r,
                    ..
                }) => {
                    assert_eq!(value, text);
                    assert_eq!(c, column, "{text}: {r}");
                    assert!(r.contains(reason), "{text}: {r}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let message = Transform::parse("SPLT(1)")
            .map_err(|e| e.at("customers", "mappings[2].transform").to_string());
        assert_eq!(
            message,
            Err(r#"customers.mappings[2].transform: cannot parse transform "SPLT(1)" at column 1: unknown transform "SPLT""#.to_string())
        );
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!(t(" split( 1 , \" \" ) ").to_string(), "SPLIT(1)");
        assert_eq!(t("default(1.0)").to_string(), "DEFAULT(1.0)");
        assert_eq!(t(r#"JOIN("a\"b")"#).to_string(), r#"JOIN("a\"b")"#);
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::Float),
            any::<String>().prop_map(Value::Text),
        ]
    }

    fn any_transform() -> impl Strategy<Value = Transform> {
        let format = "(%[YmdHMS%]|[-/: T]){0,6}";
        prop_oneof![
            (0usize..5, "\\PC{1,3}|[\"\\\\\n\t]")
                .prop_map(|(index, separator)| Transform::Split { index, separator }),
            any::<String>().prop_map(|separator| Transform::Join { separator }),
            Just(Transform::Upper),
            Just(Transform::Lower),
            Just(Transform::Trim),
            any_value().prop_map(Transform::Default),
            Just(Transform::Int),
            Just(Transform::Float),
            Just(Transform::Text),
            Just(Transform::Bool),
            (format, format).prop_map(|(input, output)| Transform::Date { input, output }),
        ]
    }

    proptest! {
        #[test]
        fn parse_of_display_is_identity(transform in any_transform()) {
            prop_assert_eq!(Transform::parse(&transform.to_string()), Ok(transform));
        }

        #[test]
        fn text_then_int_is_identity(i in any::<i64>()) {
            let text = Transform::Text.apply(&Value::Int(i));
            prop_assert_eq!(text.and_then(|v| Transform::Int.apply(&v)), Ok(Value::Int(i)));
        }
    }

    proptest::proptest! {
        /// Schema files are written by people: any text must parse or fail with an
        /// error, never panic. The generator leans on the grammar's own characters.
        #[test]
        fn any_text_parses_or_fails_cleanly(text in r#"[A-Za-z(),"\\u{} 0-9%a-f.-]{0,24}"#) {
            if let Ok(t) = Transform::parse(&text) {
                proptest::prop_assert_eq!(Transform::parse(&t.to_string()).ok(), Some(t));
            }
            let _ = crate::schema::Operator::parse(&text);
        }
    }
}
