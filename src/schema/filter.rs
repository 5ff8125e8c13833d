//! Row filters: `field operator value`, combined with AND by the caller. Filters name
//! fields of the source entity and decide which of its rows the destination holds.

use std::cmp::Ordering;
use std::fmt;

use super::suggest::did_you_mean;
use super::SchemaError;
use crate::{EntityInfo, FieldType, Row, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Like,
    In,
    Between,
    IsNull,
    IsNotNull,
}

impl Operator {
    pub const ALL: [Operator; 11] = [
        Operator::Eq,
        Operator::Ne,
        Operator::Lt,
        Operator::Le,
        Operator::Gt,
        Operator::Ge,
        Operator::Like,
        Operator::In,
        Operator::Between,
        Operator::IsNull,
        Operator::IsNotNull,
    ];

    /// The operator as the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Eq => "=",
            Operator::Ne => "!=",
            Operator::Lt => "<",
            Operator::Le => "<=",
            Operator::Gt => ">",
            Operator::Ge => ">=",
            Operator::Like => "LIKE",
            Operator::In => "IN",
            Operator::Between => "BETWEEN",
            Operator::IsNull => "IS NULL",
            Operator::IsNotNull => "IS NOT NULL",
        }
    }

    /// Parses an operator; words are case-insensitive and may be spaced freely
    /// (`is  not null`). Anything else is an unknown operator, with no guess: an
    /// operator is too short for a did-you-mean to be trusted (`=~` is one edit from
    /// `=`, `!=`, `<=` and `>=`).
    pub fn parse(text: &str) -> Result<Operator, SchemaError> {
        let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Operator::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(&words))
            .ok_or_else(|| SchemaError::UnknownOperator {
                schema: String::new(),
                path: String::new(),
                value: text.to_string(),
                suggestion: None,
            })
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The right-hand side of a filter: nothing (`IS NULL`), one value (`=`, `LIKE`), or a
/// list (`IN`, and `BETWEEN low, high`).
#[derive(Clone, Debug, PartialEq)]
pub enum FilterValue {
    None,
    One(Value),
    Many(Vec<Value>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    pub field: String,
    pub operator: Operator,
    pub value: FilterValue,
}

impl Filter {
    pub fn new(field: impl Into<String>, operator: Operator, value: FilterValue) -> Filter {
        Filter {
            field: field.into(),
            operator,
            value,
        }
    }

    /// Whether the row passes, with SQL's rules: a missing field is `Null`, and any
    /// comparison with `Null` is false (only `IS NULL` holds for it).
    pub fn matches(&self, row: &Row) -> bool {
        let field = row.get(&self.field).unwrap_or(&Value::Null);
        let ordering = |other: &Value| compare(field, other);
        match (self.operator, &self.value) {
            (Operator::IsNull, _) => field.is_null(),
            (Operator::IsNotNull, _) => !field.is_null(),
            (Operator::Eq, FilterValue::One(v)) => ordering(v) == Some(Ordering::Equal),
            (Operator::Ne, FilterValue::One(v)) => {
                ordering(v).is_some_and(|o| o != Ordering::Equal)
            }
            (Operator::Lt, FilterValue::One(v)) => ordering(v) == Some(Ordering::Less),
            (Operator::Le, FilterValue::One(v)) => {
                ordering(v).is_some_and(|o| o != Ordering::Greater)
            }
            (Operator::Gt, FilterValue::One(v)) => ordering(v) == Some(Ordering::Greater),
            (Operator::Ge, FilterValue::One(v)) => ordering(v).is_some_and(|o| o != Ordering::Less),
            (Operator::Like, FilterValue::One(Value::Text(pattern))) => match field {
                Value::Text(s) => like(s, pattern),
                _ => false,
            },
            (Operator::In, FilterValue::Many(list)) => {
                list.iter().any(|v| ordering(v) == Some(Ordering::Equal))
            }
            (Operator::Between, FilterValue::Many(bounds)) => match bounds.as_slice() {
                [low, high] => {
                    ordering(low).is_some_and(|o| o != Ordering::Less)
                        && ordering(high).is_some_and(|o| o != Ordering::Greater)
                }
                _ => false,
            },
            // A value of the wrong shape matches nothing; validation reports it.
            _ => false,
        }
    }

    /// Checks the filter against the source entity: the field exists, the value has the
    /// operator's shape and the field's type. `path` is `filters[i]`.
    pub fn validate(&self, entity: &EntityInfo, schema: &str, path: &str) -> Vec<SchemaError> {
        let mut problems = Vec::new();
        let Some(field) = entity.field(&self.field) else {
            problems.push(SchemaError::UnknownField {
                schema: schema.to_string(),
                path: format!("{path}.field"),
                value: self.field.clone(),
                entity: entity.name.clone(),
                suggestion: did_you_mean(
                    &self.field,
                    entity.fields.iter().map(|f| f.name.as_str()),
                ),
            });
            return problems;
        };
        let mut invalid = |reason: String, suggestion: Option<String>| {
            problems.push(SchemaError::InvalidValue {
                schema: schema.to_string(),
                path: format!("{path}.value"),
                value: value_text(&self.value),
                reason,
                suggestion,
            })
        };
        let values: &[Value] = match (self.operator, &self.value) {
            (Operator::IsNull | Operator::IsNotNull, FilterValue::None) => &[],
            (Operator::IsNull | Operator::IsNotNull, _) => {
                invalid(format!("{} takes no value", self.operator), None);
                &[]
            }
            (Operator::In, FilterValue::Many(list)) if !list.is_empty() => list,
            (Operator::In, _) => {
                invalid("IN takes a non-empty list".into(), None);
                &[]
            }
            (Operator::Between, FilterValue::Many(list)) if list.len() == 2 => list,
            (Operator::Between, _) => {
                invalid(
                    "BETWEEN takes a list of two values, [low, high]".into(),
                    None,
                );
                &[]
            }
            (_, FilterValue::One(v)) => std::slice::from_ref(v),
            (op, _) => {
                invalid(format!("{op} takes one value"), None);
                &[]
            }
        };
        if self.operator == Operator::Like && field.field_type != FieldType::Text {
            // One problem: the value's type would only repeat it.
            invalid(
                format!(
                    "LIKE needs a text field; {:?} is {}",
                    field.name, field.field_type
                ),
                None,
            );
            return problems;
        }
        for value in values {
            let fits = match (value, field.field_type) {
                (Value::Null, _) => false,
                (Value::Int(_) | Value::Float(_), FieldType::Int | FieldType::Float) => true,
                (Value::Bool(_), FieldType::Bool) | (Value::Text(_), FieldType::Text) => true,
                _ => false,
            };
            if !fits {
                let reason = if value.is_null() {
                    "compare with null by IS NULL".to_string()
                } else {
                    format!("field {:?} is {}", field.name, field.field_type)
                };
                invalid(reason, None);
            }
        }
        problems
    }
}

/// A filter value as error messages show it.
fn value_text(value: &FilterValue) -> String {
    match value {
        FilterValue::None => String::new(),
        FilterValue::One(v) => v.to_string(),
        FilterValue::Many(list) => format!(
            "[{}]",
            list.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// SQL-like ordering: `None` when either side is null or the types do not compare.
/// Integers and floats compare as numbers (an `Int` against a `Float` exactly, without
/// rounding the integer).
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Float(x), Value::Float(y)) => x.partial_cmp(y),
        (Value::Int(i), Value::Float(f)) => int_float(*i, *f),
        (Value::Float(f), Value::Int(i)) => int_float(*i, *f).map(Ordering::reverse),
        (Value::Text(x), Value::Text(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Compares an integer with a float exactly (casting the integer would round above 2^53).
fn int_float(i: i64, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Out of i64's range the float decides alone; 2^63 is exact as an f64.
    if f >= 9.223_372_036_854_776e18 {
        return Some(Ordering::Less);
    }
    if f < -9.223_372_036_854_776e18 {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    // In range and integral, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    let whole = floor as i64;
    match i.cmp(&whole) {
        Ordering::Equal if f > floor => Some(Ordering::Less),
        other => Some(other),
    }
}

/// SQL `LIKE`: `%` matches any run of characters, `_` exactly one; case-sensitive.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    // `reach[j]`: the pattern prefix read so far matches `text[..j]`.
    let mut reach = vec![false; text.len() + 1];
    reach[0] = true;
    for p in pattern {
        let mut next = vec![false; text.len() + 1];
        for j in 0..=text.len() {
            next[j] = match p {
                '%' => reach[j] || (j > 0 && next[j - 1]),
                '_' => j > 0 && reach[j - 1],
                c => j > 0 && reach[j - 1] && text[j - 1] == c,
            };
        }
        reach = next;
    }
    reach[text.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FieldInfo;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn one(field: &str, op: Operator, v: Value) -> Filter {
        Filter::new(field, op, FilterValue::One(v))
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn customers() -> EntityInfo {
        let field = |name: &str, field_type| FieldInfo {
            name: name.into(),
            field_type,
            nullable: true,
        };
        EntityInfo {
            name: "customers".into(),
            fields: vec![
                field("id", FieldType::Int),
                field("region", FieldType::Text),
                field("created_at", FieldType::Text),
                field("score", FieldType::Float),
            ],
        }
    }

    #[test]
    fn d2_equality_and_between_filter_rows() {
        let eu = one("region", Operator::Eq, text("EU"));
        let window = Filter::new(
            "created_at",
            Operator::Between,
            FilterValue::Many(vec![text("2024-01-01"), text("2024-12-31")]),
        );
        let inside = row(&[("region", text("EU")), ("created_at", text("2024-06-01"))]);
        let late = row(&[("region", text("EU")), ("created_at", text("2025-01-01"))]);
        let us = row(&[("region", text("US")), ("created_at", text("2024-06-01"))]);
        let keep = |r: &Row| eu.matches(r) && window.matches(r);
        assert!(keep(&inside));
        assert!(!keep(&late));
        assert!(!keep(&us));
        // Bounds are inclusive.
        assert!(window.matches(&row(&[("created_at", text("2024-12-31"))])));
    }

    #[test]
    fn comparisons_with_null_are_false() {
        let null_region = row(&[("region", Value::Null)]);
        for op in [
            Operator::Eq,
            Operator::Ne,
            Operator::Lt,
            Operator::Le,
            Operator::Gt,
            Operator::Ge,
            Operator::Like,
        ] {
            assert!(!one("region", op, text("EU")).matches(&null_region), "{op}");
            // A missing field reads as null too.
            assert!(!one("region", op, text("EU")).matches(&Row::new()), "{op}");
        }
        let is_null = Filter::new("region", Operator::IsNull, FilterValue::None);
        assert!(is_null.matches(&null_region));
        assert!(is_null.matches(&Row::new()));
        assert!(!is_null.matches(&row(&[("region", text("EU"))])));
        let not_null = Filter::new("region", Operator::IsNotNull, FilterValue::None);
        assert!(!not_null.matches(&null_region));
        assert!(not_null.matches(&row(&[("region", text(""))])));
    }

    #[test]
    fn numbers_compare_numerically_text_lexically() {
        let score = |v: Value| row(&[("score", v)]);
        assert!(one("score", Operator::Gt, Value::Int(9)).matches(&score(Value::Int(10))));
        assert!(one("score", Operator::Gt, Value::Float(9.5)).matches(&score(Value::Int(10))));
        assert!(one("score", Operator::Eq, Value::Int(2)).matches(&score(Value::Float(2.0))));
        assert!(one("score", Operator::Lt, Value::Float(2.5)).matches(&score(Value::Int(2))));
        assert!(!one("score", Operator::Lt, Value::Float(2.0)).matches(&score(Value::Int(2))));
        // 2^53 + 1 is not equal to the float 2^53, although casting would say so.
        let big = score(Value::Int(9_007_199_254_740_993));
        assert!(one("score", Operator::Gt, Value::Float(9_007_199_254_740_992.0)).matches(&big));
        // Lexical: "10" sorts before "9" as text.
        assert!(one("region", Operator::Lt, text("9")).matches(&row(&[("region", text("10"))])));
        // Different types do not compare.
        assert!(!one("score", Operator::Eq, text("10")).matches(&score(Value::Int(10))));
        assert!(one("score", Operator::Ne, Value::Int(3)).matches(&score(Value::Int(4))));
        assert!(one("score", Operator::Le, Value::Int(4)).matches(&score(Value::Int(4))));
        assert!(one("score", Operator::Ge, Value::Int(4)).matches(&score(Value::Int(4))));
    }

    #[test]
    fn like_and_in() {
        let name = |s: &str| row(&[("region", text(s))]);
        let like_pattern = |p: &str| one("region", Operator::Like, text(p));
        assert!(like_pattern("E%").matches(&name("EU-west")));
        assert!(like_pattern("%west").matches(&name("EU-west")));
        assert!(like_pattern("E_-%").matches(&name("EU-west")));
        assert!(like_pattern("%").matches(&name("")));
        assert!(!like_pattern("_").matches(&name("")));
        assert!(!like_pattern("e%").matches(&name("EU")));
        assert!(like_pattern("a%b%c").matches(&name("aXbYbc")));
        let within = Filter::new(
            "region",
            Operator::In,
            FilterValue::Many(vec![text("EU"), text("UK")]),
        );
        assert!(within.matches(&name("UK")));
        assert!(!within.matches(&name("US")));
    }

    #[test]
    fn d2_unknown_operator_text() {
        let error = Operator::parse("=~").map_err(|e| e.at("customers", "filters[0].operator"));
        assert_eq!(
            error.map_err(|e| e.to_string()),
            Err(r#"customers.filters[0].operator: unknown operator "=~""#.to_string())
        );
        assert_eq!(
            Operator::parse("is  not NULL").ok(),
            Some(Operator::IsNotNull)
        );
        assert_eq!(Operator::parse("between").ok(), Some(Operator::Between));
        for op in Operator::ALL {
            assert_eq!(Operator::parse(op.as_str()).ok(), Some(op));
        }
    }

    #[test]
    fn d2_unknown_field_suggests_a_near_name() {
        let problems = one("regoin", Operator::Eq, text("EU")).validate(
            &customers(),
            "customers",
            "filters[0]",
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].location(), "customers.filters[0].field");
        assert_eq!(problems[0].value(), "regoin");
        assert_eq!(problems[0].suggestion(), Some(r#"did you mean "region"?"#));
        let far =
            one("birthday", Operator::Eq, text("x")).validate(&customers(), "c", "filters[1]");
        assert_eq!(far.len(), 1);
        assert_eq!(far[0].suggestion(), None);
    }

    #[test]
    fn value_shapes_and_types_are_checked() {
        let entity = customers();
        let check = |f: Filter| f.validate(&entity, "customers", "filters[0]").len();
        assert_eq!(check(one("id", Operator::Gt, Value::Float(1.5))), 0);
        assert_eq!(check(one("id", Operator::Eq, text("1"))), 1);
        assert_eq!(check(one("id", Operator::Like, text("1%"))), 1);
        assert_eq!(check(one("region", Operator::Between, text("A"))), 1);
        assert_eq!(
            check(Filter::new(
                "region",
                Operator::Between,
                FilterValue::Many(vec![text("A"), text("B")])
            )),
            0
        );
        assert_eq!(
            check(Filter::new(
                "region",
                Operator::In,
                FilterValue::Many(vec![])
            )),
            1
        );
        assert_eq!(
            check(Filter::new(
                "region",
                Operator::IsNull,
                FilterValue::One(text("x"))
            )),
            1
        );
        assert_eq!(check(one("region", Operator::Eq, Value::Null)), 1);
    }
}
