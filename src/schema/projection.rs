//! How one side of a schema reads units from its rows and writes rows from its units.
//!
//! Units are named by the destination's fields on both sides, so the two replicas of a
//! schema exchange the same items. The destination side reads and writes them as they
//! are; the source side computes each unit from its mapping's source field(s) and
//! transformation, and writes back (Bidirectional) through the inverse: a unit read
//! through `INT` is written back through `TEXT`; the units `SPLIT(0)`, `SPLIT(1)`, ... of
//! one source field join back into it in index order; a unit that `JOIN`s several
//! source fields splits back into them.

use std::collections::BTreeMap;

use crate::stores::{Row, Value};

use super::{Filter, SyncSchema, Transform};

/// One unit: computed from `fields` of the row, through `transform` if any.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitRule {
    pub unit: String,
    pub fields: Vec<String>,
    pub transform: Option<Transform>,
}

/// Why a row could not be read as units: the field at fault and the reason (scenario
/// D1's `cannot convert 'x' to int`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitError {
    pub field: String,
    pub reason: String,
}

/// The units of one side of a schema, and the filters a row must pass to be synced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Projection {
    pub units: Vec<UnitRule>,
    /// Combined with AND; a row that fails them is treated as absent, so one that stops
    /// matching leaves the other side and one that starts matching arrives there.
    pub filters: Vec<Filter>,
}

impl Projection {
    /// Every field as a unit of the same name, no filter.
    pub fn identity(fields: &[String]) -> Projection {
        Projection {
            units: fields
                .iter()
                .map(|f| UnitRule {
                    unit: f.clone(),
                    fields: vec![f.clone()],
                    transform: None,
                })
                .collect(),
            filters: Vec::new(),
        }
    }

    /// The source side of `schema`: its mappings and filters, plus the key fields
    /// (source `key[i]` as the unit named by destination `key[i]`).
    pub fn source_side(schema: &SyncSchema) -> Projection {
        let mut units: Vec<UnitRule> = schema
            .source
            .key
            .iter()
            .zip(&schema.destination.key)
            .map(|(source, destination)| UnitRule {
                unit: destination.clone(),
                fields: vec![source.clone()],
                transform: None,
            })
            .collect();
        for mapping in &schema.mappings {
            if units.iter().any(|u| u.unit == mapping.destination) {
                continue;
            }
            units.push(UnitRule {
                unit: mapping.destination.clone(),
                fields: mapping.source.clone(),
                transform: mapping.transform.clone(),
            });
        }
        Projection {
            units,
            filters: schema.filters.clone(),
        }
    }

    /// The destination side of `schema`: its key and mapped fields, as they are.
    pub fn destination_side(schema: &SyncSchema) -> Projection {
        let mut fields: Vec<String> = schema.destination.key.clone();
        for mapping in &schema.mappings {
            if !fields.contains(&mapping.destination) {
                fields.push(mapping.destination.clone());
            }
        }
        Projection::identity(&fields)
    }

    pub fn matches(&self, row: &Row) -> bool {
        self.filters.iter().all(|f| f.matches(row))
    }

    /// The units of a row, in rule order.
    pub fn read(&self, row: &Row) -> Result<Vec<(String, Value)>, UnitError> {
        let mut out = Vec::with_capacity(self.units.len());
        for rule in &self.units {
            let values: Vec<Value> = rule
                .fields
                .iter()
                .map(|f| row.get(f).cloned().unwrap_or(Value::Null))
                .collect();
            let value = match &rule.transform {
                None => values.into_iter().next().unwrap_or(Value::Null),
                Some(t) => t.apply_many(&values).map_err(|e| UnitError {
                    field: rule.fields.join(", "),
                    reason: e.to_string(),
                })?,
            };
            out.push((rule.unit.clone(), value));
        }
        Ok(out)
    }

    /// The row fields to write from `units` (unit name → value; a unit missing from the
    /// map leaves the fields it comes from alone).
    pub fn write(&self, units: &BTreeMap<String, Value>) -> Result<Row, UnitError> {
        self.write_plan().write(units.clone())
    }

    /// How units become row fields, worked out once for many rows.
    pub(crate) fn write_plan(&self) -> WritePlan {
        let mut steps = Vec::new();
        // Source fields read by exactly one single-field rule, or split into several.
        let mut by_field: BTreeMap<&str, Vec<&UnitRule>> = BTreeMap::new();
        for rule in &self.units {
            if let [field] = rule.fields.as_slice() {
                by_field.entry(field.as_str()).or_default().push(rule);
                continue;
            }
            // A unit that joined several fields splits back into them.
            let separator = match &rule.transform {
                Some(Transform::Join { separator }) => Ok(separator.clone()),
                _ => Err(UnitError {
                    field: rule.fields.join(", "),
                    reason: "several source fields need JOIN to be written back".into(),
                }),
            };
            steps.push(WriteStep::SplitBack {
                unit: rule.unit.clone(),
                fields: rule.fields.clone(),
                separator,
            });
        }
        for (field, rules) in by_field {
            let cannot = |reason: String| UnitError {
                field: field.to_string(),
                reason,
            };
            steps.push(match rules.as_slice() {
                [rule] => WriteStep::One {
                    field: field.to_string(),
                    unit: rule.unit.clone(),
                    back: match &rule.transform {
                        None | Some(Transform::Split { .. }) => Ok(None),
                        Some(t) => t.inverse().map(Some).ok_or_else(|| {
                            cannot(format!("{t} has no inverse to write the field back"))
                        }),
                    },
                },
                several => {
                    // SPLIT(0), SPLIT(1), ... of one field: joined back in index order.
                    let mut parts: Vec<(usize, &str, &String)> = Vec::new();
                    let mut not_split = false;
                    for rule in several {
                        match &rule.transform {
                            Some(Transform::Split { index, separator }) => {
                                parts.push((*index, separator, &rule.unit))
                            }
                            _ => not_split = true,
                        }
                    }
                    parts.sort();
                    WriteStep::JoinParts {
                        field: field.to_string(),
                        parts: if not_split {
                            Err(cannot(
                                "a field read by several units must be SPLIT into them".into(),
                            ))
                        } else {
                            Ok((
                                parts[0].1.to_string(),
                                parts.iter().map(|(_, _, unit)| (*unit).clone()).collect(),
                            ))
                        },
                    }
                }
            });
        }
        WritePlan { steps }
    }
}

/// The steps that turn a side's units into row fields (see [`Projection::write`]).
#[derive(Clone, Debug)]
pub(crate) struct WritePlan {
    steps: Vec<WriteStep>,
}

#[derive(Clone, Debug)]
enum WriteStep {
    /// A unit that joined several fields splits back into them (`Err`: it was not
    /// joined by JOIN, so it cannot be).
    SplitBack {
        unit: String,
        fields: Vec<String>,
        separator: Result<String, UnitError>,
    },
    /// One field from one unit, as it is (`None`) or through the inverse of its
    /// transformation (`Err`: there is none).
    One {
        field: String,
        unit: String,
        back: Result<Option<Transform>, UnitError>,
    },
    /// One field from its SPLIT parts: the separator and the units in index order.
    JoinParts {
        field: String,
        parts: Result<(String, Vec<String>), UnitError>,
    },
}

impl WritePlan {
    /// The row fields of `units`, whose values move into the row where a unit is
    /// written once.
    pub(crate) fn write(&self, mut units: BTreeMap<String, Value>) -> Result<Row, UnitError> {
        let mut row = Row::new();
        for step in &self.steps {
            match step {
                WriteStep::SplitBack {
                    unit,
                    fields,
                    separator,
                } => {
                    let Some(value) = units.get(unit) else {
                        continue;
                    };
                    let separator = separator.as_ref().map_err(Clone::clone)?;
                    let text = value.to_text();
                    let mut parts = text.split(separator.as_str());
                    for field in fields {
                        let part = parts
                            .next()
                            .map_or(Value::Null, |p| Value::Text(p.to_string()));
                        row.insert(field.clone(), part);
                    }
                }
                WriteStep::One { field, unit, back } => {
                    let back = match units.get(unit) {
                        None => continue,
                        Some(_) => back.as_ref().map_err(Clone::clone)?,
                    };
                    // A unit read by one single-field rule is written once: it moves.
                    let Some(value) = units.remove(unit) else {
                        continue;
                    };
                    let value = match back {
                        None => value,
                        Some(t) => t.apply(&value).map_err(|e| UnitError {
                            field: field.clone(),
                            reason: e.to_string(),
                        })?,
                    };
                    row.insert(field.clone(), value);
                }
                WriteStep::JoinParts { field, parts } => {
                    let (separator, parts) = parts.as_ref().map_err(Clone::clone)?;
                    if !units.contains_key(&parts[0]) {
                        continue;
                    }
                    let values: Vec<Value> = parts
                        .iter()
                        .map(|unit| units.get(unit).cloned().unwrap_or(Value::Null))
                        .collect();
                    let joined = Transform::Join {
                        separator: separator.clone(),
                    }
                    .apply_many(&values)
                    .map_err(|e| UnitError {
                        field: field.clone(),
                        reason: e.to_string(),
                    })?;
                    row.insert(field.clone(), joined);
                }
            }
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn split_name() -> Projection {
        Projection {
            units: vec![
                UnitRule {
                    unit: "first_name".into(),
                    fields: vec!["full_name".into()],
                    transform: Some(Transform::parse("SPLIT(0)").expect("valid")),
                },
                UnitRule {
                    unit: "last_name".into(),
                    fields: vec!["full_name".into()],
                    transform: Some(Transform::parse("SPLIT(1)").expect("valid")),
                },
                UnitRule {
                    unit: "age".into(),
                    fields: vec!["age".into()],
                    transform: Some(Transform::Int),
                },
            ],
            filters: Vec::new(),
        }
    }

    #[test]
    fn a_split_field_reads_as_units_and_joins_back() {
        let p = split_name();
        let row: Row = [
            ("full_name".to_string(), text("Ada Lovelace")),
            ("age".to_string(), text("36")),
        ]
        .into();
        let units = p.read(&row).expect("readable");
        assert_eq!(
            units,
            [
                ("first_name".to_string(), text("Ada")),
                ("last_name".to_string(), text("Lovelace")),
                ("age".to_string(), Value::Int(36)),
            ]
        );
        let back = p.write(&units.into_iter().collect()).expect("writable");
        assert_eq!(back, row);
    }

    #[test]
    fn a_failed_conversion_names_the_field_and_the_value() {
        let row: Row = [
            ("full_name".to_string(), text("Plato")),
            ("age".to_string(), text("x")),
        ]
        .into();
        let err = split_name().read(&row).expect_err("x is no int");
        assert_eq!(err.field, "age");
        assert_eq!(err.reason, "cannot convert 'x' to int");
    }
}
