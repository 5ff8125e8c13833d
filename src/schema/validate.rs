//! Validation of one schema against its two entities (the pure part: reaching the
//! datasources and describing the entities is the caller's).

use std::collections::BTreeMap;

use super::suggest::did_you_mean;
use super::{OnMissing, SchemaError, SyncDirection, SyncSchema, Transform};
use crate::{EntityInfo, FieldInfo, FieldType};

/// Every problem of `schema` given the fields of its source and destination entities;
/// empty when the schema is valid. Reports all problems, each once, in schema order.
pub fn validate(
    schema: &SyncSchema,
    source: &EntityInfo,
    destination: &EntityInfo,
) -> Vec<SchemaError> {
    let mut check = Check {
        schema: &schema.id,
        problems: Vec::new(),
    };
    check.keys(schema, source, destination);
    check.mappings(schema, source, destination);
    for (i, filter) in schema.filters.iter().enumerate() {
        let problems = filter.validate(source, &schema.id, &format!("filters[{i}]"));
        check.problems.extend(problems);
    }
    if let OnMissing::SoftDelete { field } = &schema.on_missing {
        if let Some(info) = check.field(destination, field, "soft_delete_field") {
            if info.field_type != FieldType::Bool {
                check.problems.push(SchemaError::IncompatibleType {
                    schema: schema.id.clone(),
                    path: "soft_delete_field".into(),
                    value: field.clone(),
                    from: FieldType::Bool,
                    to: info.field_type,
                    suggestion: Some("name a bool field of the destination".into()),
                });
            }
        }
    }
    if schema.mass_delete_threshold_percent > 100 {
        check.problems.push(SchemaError::InvalidValue {
            schema: schema.id.clone(),
            path: "mass_delete_threshold_percent".into(),
            value: schema.mass_delete_threshold_percent.to_string(),
            reason: "a percentage from 0 to 100".into(),
            suggestion: None,
        });
    }
    check.problems
}

struct Check<'a> {
    schema: &'a str,
    problems: Vec<SchemaError>,
}

impl Check<'_> {
    /// The field, or `None` after reporting it unknown with a did-you-mean.
    fn field<'e>(
        &mut self,
        entity: &'e EntityInfo,
        name: &str,
        path: &str,
    ) -> Option<&'e FieldInfo> {
        let found = entity.field(name);
        if found.is_none() {
            self.problems.push(SchemaError::UnknownField {
                schema: self.schema.to_string(),
                path: path.to_string(),
                value: name.to_string(),
                entity: entity.name.clone(),
                suggestion: did_you_mean(name, entity.fields.iter().map(|f| f.name.as_str())),
            });
        }
        found
    }

    fn bad_key(&mut self, path: &str, value: &str, reason: String, suggestion: Option<String>) {
        self.problems.push(SchemaError::BadKey {
            schema: self.schema.to_string(),
            path: path.to_string(),
            value: value.to_string(),
            reason,
            suggestion,
        });
    }

    fn keys(&mut self, schema: &SyncSchema, source: &EntityInfo, destination: &EntityInfo) {
        for (side, endpoint, entity) in [
            ("source", &schema.source, source),
            ("destination", &schema.destination, destination),
        ] {
            if endpoint.key.is_empty() {
                self.bad_key(
                    &format!("{side}.key"),
                    "",
                    "a schema needs at least one key field on each side".into(),
                    None,
                );
            }
            for (i, name) in endpoint.key.iter().enumerate() {
                self.field(entity, name, &format!("{side}.key[{i}]"));
            }
        }
        if schema.source.key.len() != schema.destination.key.len() {
            self.bad_key(
                "destination.key",
                &schema.destination.key.join(", "),
                format!(
                    "{} key field(s) here for {} in the source; key[i] pairs with key[i]",
                    schema.destination.key.len(),
                    schema.source.key.len()
                ),
                None,
            );
        }
        // A destination row is found by its key, so every key field must be written.
        for (i, name) in schema.destination.key.iter().enumerate() {
            let written = schema.mappings.iter().any(|m| &m.destination == name);
            if destination.field(name).is_some() && !written {
                let source_key = schema.source.key.get(i);
                self.bad_key(
                    &format!("destination.key[{i}]"),
                    name,
                    "no mapping writes this key field".into(),
                    source_key.map(|s| format!("add a mapping {s} -> {name}")),
                );
            }
        }
    }

    fn mappings(&mut self, schema: &SyncSchema, source: &EntityInfo, destination: &EntityInfo) {
        let mut writers: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, mapping) in schema.mappings.iter().enumerate() {
            let path = format!("mappings[{i}]");
            writers.entry(&mapping.destination).or_default().push(i);
            let joins = matches!(mapping.transform, Some(Transform::Join { .. }));
            if mapping.source.is_empty() {
                self.problems.push(SchemaError::InvalidValue {
                    schema: self.schema.to_string(),
                    path: format!("{path}.source"),
                    value: String::new(),
                    reason: "a mapping needs a source field".into(),
                    suggestion: None,
                });
            }
            if mapping.source.len() > 1 && !joins {
                self.problems.push(SchemaError::InvalidValue {
                    schema: self.schema.to_string(),
                    path: format!("{path}.source"),
                    value: mapping.source.join(", "),
                    reason: "several source fields make one value only through JOIN".into(),
                    suggestion: Some("add transform = 'JOIN(\" \")'".into()),
                });
            }
            let mut source_types = Vec::new();
            for (j, name) in mapping.source.iter().enumerate() {
                let field_path = if mapping.source.len() == 1 {
                    format!("{path}.source")
                } else {
                    format!("{path}.source[{j}]")
                };
                if let Some(info) = self.field(source, name, &field_path) {
                    source_types.push(info.field_type);
                }
            }
            let target = self.field(
                destination,
                &mapping.destination,
                &format!("{path}.destination"),
            );
            // Types are checked only when every field is known, so a typo is one problem.
            if let (Some(target), true) = (target, source_types.len() == mapping.source.len()) {
                if let Some(&first) = source_types.first() {
                    let produced = match &mapping.transform {
                        Some(t) => t.output_type(first),
                        None => first,
                    };
                    if !fits(produced, target.field_type) {
                        self.problems.push(SchemaError::IncompatibleType {
                            schema: self.schema.to_string(),
                            path: format!("{path}.destination"),
                            value: mapping.destination.clone(),
                            from: produced,
                            to: target.field_type,
                            suggestion: Some(format!(
                                "add transform = \"{}\"",
                                Transform::conversion_to(target.field_type)
                            )),
                        });
                    }
                }
            }
            if schema.direction == SyncDirection::Bidirectional {
                if let Some(t) = &mapping.transform {
                    // A JOIN of several sources is undone by SPLIT(0), SPLIT(1), ...
                    let invertible = t.inverse().is_some() || (joins && !mapping.source.is_empty());
                    if !invertible {
                        self.problems.push(SchemaError::NoInverse {
                            schema: self.schema.to_string(),
                            path: format!("{path}.transform"),
                            value: t.to_string(),
                            field: mapping.destination.clone(),
                            suggestion: Some(
                                "drop the transform, or make the schema source_to_destination"
                                    .into(),
                            ),
                        });
                    }
                }
            }
        }
        for (field, indexes) in writers {
            if indexes.len() > 1 {
                self.problems.push(SchemaError::DuplicateDestination {
                    schema: self.schema.to_string(),
                    path: format!("mappings[{}].destination", indexes[1]),
                    value: field.to_string(),
                    mappings: indexes,
                    suggestion: Some(
                        "map several sources with one mapping: source = [..] and JOIN".into(),
                    ),
                });
            }
        }
    }
}

/// Whether a value of type `from` goes into a field of type `to` without a transform:
/// the same type, an integer into a float field, or anything into a text field (every
/// value has a lossless text form, and a CSV file's fields are all text).
fn fits(from: FieldType, to: FieldType) -> bool {
    from == to || to == FieldType::Text || (from == FieldType::Int && to == FieldType::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Endpoint, Filter, FilterValue, Mapping, Operator};
    use crate::Value;

    fn entity(name: &str, fields: &[(&str, FieldType)]) -> EntityInfo {
        EntityInfo {
            name: name.into(),
            fields: fields
                .iter()
                .map(|(n, t)| FieldInfo {
                    name: n.to_string(),
                    field_type: *t,
                    nullable: true,
                })
                .collect(),
        }
    }

    /// D1's entities: S `{id, full_name, age: text}` and D `{customer_id, first_name,
    /// last_name, age: int}`.
    fn d1() -> (SyncSchema, EntityInfo, EntityInfo) {
        let source = entity(
            "people",
            &[
                ("id", FieldType::Int),
                ("full_name", FieldType::Text),
                ("age", FieldType::Text),
                ("region", FieldType::Text),
            ],
        );
        let destination = entity(
            "customers",
            &[
                ("customer_id", FieldType::Int),
                ("first_name", FieldType::Text),
                ("last_name", FieldType::Text),
                ("age", FieldType::Int),
                ("is_deleted", FieldType::Bool),
            ],
        );
        let mut schema = SyncSchema::new(
            "customers",
            Endpoint::new("s", "people", &["id"]),
            Endpoint::new("d", "customers", &["customer_id"]),
        );
        let split = |i| {
            Some(Transform::Split {
                index: i,
                separator: " ".into(),
            })
        };
        schema.mappings = vec![
            Mapping::new("id", "customer_id", None),
            Mapping::new("full_name", "first_name", split(0)),
            Mapping::new("full_name", "last_name", split(1)),
            Mapping::new("age", "age", Some(Transform::Int)),
        ];
        (schema, source, destination)
    }

    #[test]
    fn d1_schema_is_valid() {
        let (schema, source, destination) = d1();
        assert_eq!(validate(&schema, &source, &destination), vec![]);
    }

    #[test]
    fn d9_mistyped_names_are_all_reported_with_suggestions() {
        let (mut schema, source, destination) = d1();
        schema.mappings[1].source = vec!["fulname".into()];
        schema.destination.key = vec!["customer_idd".into()];
        let problems = validate(&schema, &source, &destination);
        let seen: Vec<_> = problems
            .iter()
            .map(|p| (p.location(), p.value(), p.suggestion()))
            .collect();
        assert_eq!(
            seen,
            vec![
                (
                    "customers.destination.key[0]".to_string(),
                    "customer_idd",
                    Some(r#"did you mean "customer_id"?"#)
                ),
                (
                    "customers.mappings[1].source".to_string(),
                    "fulname",
                    Some(r#"did you mean "full_name"?"#)
                ),
            ]
        );
    }

    #[test]
    fn anything_goes_into_text_without_a_conversion() {
        for from in [
            FieldType::Int,
            FieldType::Float,
            FieldType::Bool,
            FieldType::Text,
        ] {
            assert!(fits(from, FieldType::Text), "{from} into text");
        }
        assert!(!fits(FieldType::Float, FieldType::Int));
    }

    #[test]
    fn text_into_int_needs_a_conversion() {
        let (mut schema, source, destination) = d1();
        schema.mappings[3].transform = None;
        let problems = validate(&schema, &source, &destination);
        assert_eq!(problems.len(), 1);
        assert!(matches!(
            &problems[0],
            SchemaError::IncompatibleType {
                from: FieldType::Text,
                to: FieldType::Int,
                ..
            }
        ));
        assert_eq!(problems[0].location(), "customers.mappings[3].destination");
        assert_eq!(problems[0].suggestion(), Some(r#"add transform = "INT""#));
    }

    #[test]
    fn bidirectional_rejects_transforms_without_inverse_naming_the_field() {
        let (mut schema, source, destination) = d1();
        schema.direction = SyncDirection::Bidirectional;
        // SPLIT and INT have inverses: still valid.
        assert_eq!(validate(&schema, &source, &destination), vec![]);
        schema.mappings[1].transform = Some(Transform::Upper);
        let problems = validate(&schema, &source, &destination);
        assert_eq!(problems.len(), 1);
        assert!(
            matches!(&problems[0], SchemaError::NoInverse { field, .. } if field == "first_name")
        );
        assert_eq!(problems[0].location(), "customers.mappings[1].transform");
        let text = problems[0].to_string();
        assert!(
            text.contains("\"customers\"") && text.contains("\"first_name\""),
            "{text}"
        );
        // One way, the same transform is fine.
        schema.direction = SyncDirection::SourceToDestination;
        assert_eq!(validate(&schema, &source, &destination), vec![]);
    }

    #[test]
    fn join_of_several_sources_is_valid_and_invertible() {
        let (mut schema, mut source, destination) = d1();
        source.fields[1].name = "first".into();
        source.fields.push(FieldInfo {
            name: "last".into(),
            field_type: FieldType::Text,
            nullable: true,
        });
        schema.direction = SyncDirection::Bidirectional;
        schema.mappings[1] = Mapping {
            source: vec!["first".into(), "last".into()],
            destination: "first_name".into(),
            transform: Some(Transform::Join {
                separator: " ".into(),
            }),
        };
        schema.mappings.remove(2);
        assert_eq!(validate(&schema, &source, &destination), vec![]);
        // Without JOIN, two sources cannot make one value.
        schema.mappings[1].transform = None;
        let problems = validate(&schema, &source, &destination);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].location(), "customers.mappings[1].source");
    }

    #[test]
    fn d9_two_sources_onto_one_destination_is_reported_once() {
        let (mut schema, source, destination) = d1();
        schema
            .mappings
            .push(Mapping::new("region", "first_name", None));
        schema
            .mappings
            .push(Mapping::new("full_name", "first_name", None));
        let problems = validate(&schema, &source, &destination);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(matches!(
            &problems[0],
            SchemaError::DuplicateDestination { mappings, value, .. }
                if mappings == &[1, 4, 5] && value == "first_name"
        ));
    }

    #[test]
    fn keys_must_exist_match_in_length_and_be_written() {
        let (mut schema, source, destination) = d1();
        schema.source.key = vec![];
        schema.mappings.remove(0);
        let problems = validate(&schema, &source, &destination);
        let locations: Vec<_> = problems.iter().map(SchemaError::location).collect();
        assert_eq!(
            locations,
            [
                "customers.source.key",
                "customers.destination.key",
                "customers.destination.key[0]"
            ]
        );
    }

    #[test]
    fn filters_and_soft_delete_are_checked_too() {
        let (mut schema, source, destination) = d1();
        schema.filters = vec![
            Filter::new(
                "region",
                Operator::Eq,
                FilterValue::One(Value::Text("EU".into())),
            ),
            Filter::new(
                "regoin",
                Operator::Eq,
                FilterValue::One(Value::Text("EU".into())),
            ),
        ];
        schema.on_missing = OnMissing::SoftDelete {
            field: "first_name".into(),
        };
        let problems = validate(&schema, &source, &destination);
        let locations: Vec<_> = problems.iter().map(SchemaError::location).collect();
        assert_eq!(
            locations,
            ["customers.filters[1].field", "customers.soft_delete_field"]
        );
        schema.filters.remove(1);
        schema.on_missing = OnMissing::SoftDelete {
            field: "is_deleted".into(),
        };
        assert_eq!(validate(&schema, &source, &destination), vec![]);
    }
}
