//! The schema file (scenarios D2, D9 and D12): TOML people edit, saved atomically,
//! loaded strictly, every problem reported with schema id, path, value and suggestion.

mod common;

use std::fs;
use std::path::Path;

use common::TestResult;
use knit::{
    ConflictRule, Endpoint, EntityInfo, FieldInfo, FieldType, Filter, FilterValue, Mapping,
    OnMissing, Operator, RunStatus, SchemaError, SchemaSet, SyncDirection, SyncSchema, SyncType,
    Transform, Value,
};
use proptest::prelude::*;

fn endpoint(datasource: &str, entity: &str, key: &[&str]) -> Endpoint {
    Endpoint::new(datasource, entity, key)
}

/// A schema with every feature: SPLIT, JOIN, DATE and INT transforms, filters with
/// BETWEEN, IN and IS NULL, soft delete, a watermark-era last sync and a status.
fn full_schema() -> Result<SyncSchema, Box<dyn std::error::Error>> {
    let mut schema = SyncSchema::new(
        "customers",
        endpoint("crm", "people", &["id"]),
        endpoint("laptop", "customers", &["customer_id"]),
    );
    schema.mappings = vec![
        Mapping::new("id", "customer_id", None),
        Mapping::new(
            "full_name",
            "first_name",
            Some(Transform::parse("SPLIT(0)")?),
        ),
        Mapping::new(
            "full_name",
            "last_name",
            Some(Transform::parse("SPLIT(1)")?),
        ),
        Mapping::new("age", "age", Some(Transform::parse("INT")?)),
        Mapping::new(
            "born",
            "birthday",
            Some(Transform::parse(r#"DATE("%d/%m/%Y", "%Y-%m-%d")"#)?),
        ),
        Mapping {
            source: vec!["street".into(), "city".into()],
            destination: "address".into(),
            transform: Some(Transform::parse(r#"JOIN(", ")"#)?),
        },
    ];
    schema.filters = vec![
        Filter::new(
            "region",
            Operator::Eq,
            FilterValue::One(Value::Text("EU".into())),
        ),
        Filter::new(
            "created_at",
            Operator::Between,
            FilterValue::Many(vec![
                Value::Text("2024-01-01".into()),
                Value::Text("2024-12-31".into()),
            ]),
        ),
        Filter::new(
            "score",
            Operator::In,
            FilterValue::Many(vec![Value::Int(1), Value::Float(2.5)]),
        ),
        Filter::new("deleted_at", Operator::IsNull, FilterValue::None),
    ];
    schema.sync_type = SyncType::Incremental;
    schema.direction = SyncDirection::Bidirectional;
    schema.conflict = ConflictRule::LastWriterWins;
    schema.on_missing = OnMissing::SoftDelete {
        field: "is_deleted".into(),
    };
    schema.allow_mass_delete = true;
    schema.mass_delete_threshold_percent = 25;
    schema.max_errors = Some(3);
    schema.last_sync = Some("2024-03-05T07:08:09.123Z".into());
    schema.status = RunStatus::Partial;
    schema.status_message = "1 row failed: \"age\" = 'x'".into();
    Ok(schema)
}

#[test]
fn d12_save_load_save_is_byte_identical() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (first, second) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    let set = SchemaSet {
        schemas: vec![full_schema()?],
    };
    set.save(&first)?;
    let loaded = SchemaSet::load(&first)?;
    assert_eq!(loaded, set);
    loaded.save(&second)?;
    assert_eq!(fs::read(&first)?, fs::read(&second)?);
    // Enum values are written in snake_case, transforms and operators as their text.
    let text = fs::read_to_string(&first)?;
    for line in [
        r#"sync_type = "incremental""#,
        r#"direction = "bidirectional""#,
        r#"conflict = "last_writer_wins""#,
        r#"on_missing = "soft_delete""#,
        r#"transform = "SPLIT(1)""#,
        r#"operator = "BETWEEN""#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    Ok(())
}

#[test]
fn d12_a_hand_written_file_with_defaults_loads() -> TestResult {
    let text = r#"
[[schema]]
id = "customers"

[schema.source]
datasource = "crm"
entity = "people"
key = "id"

[schema.destination]
datasource = "laptop"
entity = "customers"
key = ["customer_id"]

[[schema.mappings]]
source = "id"
destination = "customer_id"

[[schema.filters]]
field = "created_at"
operator = "between"
value = [2024-01-01T00:00:00Z, "2024-12-31T00:00:00Z"]
"#;
    let set = SchemaSet::from_toml(text)?;
    let schema = &set.schemas[0];
    assert_eq!(schema.source.key, ["id"]);
    assert_eq!(schema.sync_type, SyncType::Full);
    assert_eq!(schema.direction, SyncDirection::SourceToDestination);
    assert_eq!(schema.conflict, ConflictRule::SourceWins);
    assert_eq!(schema.on_missing, OnMissing::Delete);
    assert_eq!(schema.status, RunStatus::Never);
    assert_eq!(schema.mass_delete_threshold_percent, 10);
    // A bare TOML date-time reads as the same text as a quoted one.
    assert_eq!(
        schema.filters[0].value,
        FilterValue::Many(vec![
            Value::Text("2024-01-01T00:00:00Z".into()),
            Value::Text("2024-12-31T00:00:00Z".into()),
        ])
    );
    Ok(())
}

#[test]
fn d12_corrupt_file_gives_line_and_column_never_an_empty_list() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("schemas.toml");
    fs::write(
        &path,
        "[[schema]]\nid = \"customers\"\nsync_type = \"full\n",
    )?;
    match SchemaSet::load(&path) {
        Err(SchemaError::Syntax { line, column, .. }) => {
            // toml points just past the string that never closes.
            assert_eq!((line, column), (3, 18));
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    // A missing file is an error too, not an empty set.
    let missing = SchemaSet::load(&dir.path().join("absent.toml"));
    assert!(
        matches!(missing, Err(SchemaError::Io { .. })),
        "{missing:?}"
    );
    Ok(())
}

#[test]
fn d12_unknown_field_is_rejected_with_its_name_and_place() -> TestResult {
    let mut text = SchemaSet {
        schemas: vec![full_schema()?],
    }
    .to_toml()?;
    text = text.replacen("direction = ", "direktion = ", 1);
    let line_of_typo = text
        .lines()
        .position(|l| l.starts_with("direktion"))
        .map(|i| i + 1);
    match SchemaSet::from_toml(&text) {
        Err(SchemaError::Syntax {
            line,
            column,
            message,
            ..
        }) => {
            assert!(message.contains("direktion"), "{message}");
            assert_eq!(Some(line), line_of_typo);
            assert_eq!(column, 1);
        }
        other => panic!("expected the unknown key to be rejected, got {other:?}"),
    }
    Ok(())
}

/// D9's file: a typo in a mapping source, in the destination key, in the sync type and
/// a direction that does not exist; plus two sources onto one destination column.
const D9: &str = r#"
[[schema]]
id = "customers"
sync_type = "Incremantal"
direction = "OneWay"

[schema.source]
datasource = "crm"
entity = "people"
key = ["id"]

[schema.destination]
datasource = "laptop"
entity = "customers"
key = ["customer_idd"]

[[schema.mappings]]
source = "id"
destination = "customer_id"

[[schema.mappings]]
source = "fulname"
destination = "first_name"

[[schema.mappings]]
source = "region"
destination = "first_name"

[[schema.mappings]]
source = "full_name"
destination = "first_name"
"#;

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

fn d9_entities(endpoint: &Endpoint) -> Option<EntityInfo> {
    match endpoint.entity.as_str() {
        "people" => Some(entity(
            "people",
            &[
                ("id", FieldType::Int),
                ("full_name", FieldType::Text),
                ("region", FieldType::Text),
            ],
        )),
        "customers" => Some(entity(
            "customers",
            &[
                ("customer_id", FieldType::Int),
                ("first_name", FieldType::Text),
            ],
        )),
        _ => None,
    }
}

#[test]
fn d9_all_four_errors_are_reported_with_suggestions() -> TestResult {
    let problems = SchemaSet::check_toml(D9, d9_entities);
    let seen: Vec<_> = problems
        .iter()
        .map(|p| {
            (
                p.location(),
                p.value().to_string(),
                p.suggestion().map(str::to_string),
            )
        })
        .collect();
    let expected = [
        (
            "customers.sync_type",
            "Incremantal",
            r#"did you mean "incremental"?"#,
        ),
        (
            "customers.direction",
            "OneWay",
            r#"did you mean "source_to_destination"?"#,
        ),
        (
            "customers.destination.key[0]",
            "customer_idd",
            r#"did you mean "customer_id"?"#,
        ),
        (
            "customers.mappings[1].source",
            "fulname",
            r#"did you mean "full_name"?"#,
        ),
    ];
    for (location, value, suggestion) in expected {
        let found = seen
            .iter()
            .any(|(l, v, s)| l == location && v == value && s.as_deref() == Some(suggestion));
        assert!(
            found,
            "{location} = {value:?} ({suggestion}) not in {seen:#?}"
        );
    }
    // Three mappings onto first_name: one problem, not two.
    let duplicates: Vec<_> = problems
        .iter()
        .filter(|p| matches!(p, SchemaError::DuplicateDestination { .. }))
        .collect();
    assert_eq!(duplicates.len(), 1, "{problems:#?}");
    assert!(matches!(
        duplicates[0],
        SchemaError::DuplicateDestination { mappings, .. } if mappings == &[1, 2, 3]
    ));
    assert_eq!(problems.len(), 5, "{problems:#?}");
    // Loading the file for a run refuses it, naming the file-level problems.
    match SchemaSet::from_toml(D9) {
        Err(SchemaError::Invalid { problems, .. }) => {
            let paths: Vec<_> = problems.iter().map(SchemaError::location).collect();
            assert_eq!(paths, ["customers.sync_type", "customers.direction"]);
        }
        other => panic!("expected the file to be refused, got {other:?}"),
    }
    Ok(())
}

#[test]
fn d2_unknown_operator_in_a_file_has_the_scenario_text() -> TestResult {
    let text = D9
        .replace("Incremantal", "full")
        .replace("OneWay", "source_to_destination")
        + "\n[[schema.filters]]\nfield = \"region\"\noperator = \"=~\"\nvalue = \"EU\"\n";
    match SchemaSet::from_toml(&text) {
        Err(SchemaError::Invalid { problems, .. }) => {
            let texts: Vec<_> = problems.iter().map(ToString::to_string).collect();
            assert_eq!(
                texts,
                [r#"customers.filters[0].operator: unknown operator "=~""#]
            );
        }
        other => panic!("expected the operator to be refused, got {other:?}"),
    }
    Ok(())
}

#[test]
fn bad_transform_text_names_schema_path_and_column() -> TestResult {
    let text = D9
        .replace("Incremantal", "full")
        .replace("OneWay", "source_to_destination")
        .replace(
            "source = \"region\"\ndestination = \"first_name\"",
            "source = \"region\"\ndestination = \"first_name\"\ntransform = \"SPLIT(a)\"",
        );
    let problems = SchemaSet::check_toml(&text, d9_entities);
    let bad: Vec<_> = problems
        .iter()
        .filter(|p| matches!(p, SchemaError::BadTransform { .. }))
        .collect();
    assert_eq!(bad.len(), 1, "{problems:#?}");
    assert_eq!(bad[0].location(), "customers.mappings[2].transform");
    assert_eq!(bad[0].value(), "SPLIT(a)");
    assert!(bad[0].to_string().contains("column 7"), "{}", bad[0]);
    Ok(())
}

#[test]
fn d12_a_crash_before_rename_leaves_the_old_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("schemas.toml");
    let old = SchemaSet {
        schemas: vec![full_schema()?],
    };
    old.save(&path)?;
    // A save that died after writing part of the temporary file: the stray .tmp is
    // all that is left of it.
    let tmp = dir.path().join("schemas.toml.tmp");
    fs::write(&tmp, "[[schema]]\nid = \"half")?;
    assert_eq!(SchemaSet::load(&path)?, old);
    // The next save goes through and leaves no temporary file behind.
    let mut new = old.clone();
    new.schemas[0].status = RunStatus::Success;
    new.save(&path)?;
    assert_eq!(SchemaSet::load(&path)?, new);
    assert!(!Path::new(&tmp).exists());
    Ok(())
}

// Small generators: a handful of names, every enum value, every transform kind.
fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z_]{0,4}"
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,6}|[\"\\\\\n\t' #=\\[]{0,4}"
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        text().prop_map(Value::Text),
    ]
}

fn transform() -> impl Strategy<Value = Transform> {
    prop_oneof![
        (
            0usize..3,
            text().prop_filter("non-empty", |s| !s.is_empty())
        )
            .prop_map(|(index, separator)| Transform::Split { index, separator }),
        text().prop_map(|separator| Transform::Join { separator }),
        Just(Transform::Upper),
        Just(Transform::Trim),
        prop_oneof![Just(Value::Null), scalar()].prop_map(Transform::Default),
        Just(Transform::Int),
        Just(Transform::Text),
        Just(Transform::Bool),
        ("%[YmdHMS]-%[YmdHMS]", "%[YmdHMS]/%[YmdHMS]")
            .prop_map(|(input, output)| Transform::Date { input, output }),
    ]
}

fn mapping() -> impl Strategy<Value = Mapping> {
    (
        prop::collection::vec(name(), 1..3),
        name(),
        prop::option::of(transform()),
    )
        .prop_map(|(source, destination, transform)| Mapping {
            source,
            destination,
            transform,
        })
}

fn filter() -> impl Strategy<Value = Filter> {
    let value = prop_oneof![
        Just(FilterValue::None),
        scalar().prop_map(FilterValue::One),
        prop::collection::vec(scalar(), 0..3).prop_map(FilterValue::Many),
    ];
    (name(), prop::sample::select(Operator::ALL.to_vec()), value)
        .prop_map(|(field, operator, value)| Filter::new(field, operator, value))
}

fn timestamp() -> impl Strategy<Value = String> {
    (
        2000u32..2100,
        1u32..13,
        1u32..29,
        0u32..24,
        0u32..60,
        0u32..60,
        prop::option::of(0u32..1000),
    )
        .prop_map(|(y, mo, d, h, mi, s, ms)| {
            let fraction = ms.map_or(String::new(), |ms| format!(".{ms:03}"));
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{fraction}Z")
        })
}

fn schema() -> impl Strategy<Value = SyncSchema> {
    let endpoint = || {
        (
            name(),
            name(),
            prop::collection::vec(name(), 1..3),
            prop::option::of(name()),
            prop::option::of(name()),
        )
            .prop_map(
                |(datasource, entity, key, modified_at, deleted_field)| Endpoint {
                    datasource,
                    entity,
                    key,
                    modified_at,
                    deleted_field,
                },
            )
    };
    let enums = (
        prop::sample::select(vec![SyncType::Full, SyncType::Incremental]),
        prop::sample::select(vec![
            SyncDirection::SourceToDestination,
            SyncDirection::DestinationToSource,
            SyncDirection::Bidirectional,
        ]),
        prop::sample::select(vec![
            ConflictRule::SourceWins,
            ConflictRule::DestinationWins,
            ConflictRule::LastWriterWins,
            ConflictRule::Manual,
        ]),
        prop::sample::select(vec![
            RunStatus::Never,
            RunStatus::Success,
            RunStatus::Partial,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Interrupted,
        ]),
        prop::option::of(name()),
    );
    let knobs = (
        any::<bool>(),
        0u8..=100,
        prop::option::of(any::<u32>()),
        prop::option::of(timestamp()),
        text(),
        (1u32..=10_000, any::<u32>()),
    );
    (
        name(),
        endpoint(),
        endpoint(),
        prop::collection::vec(mapping(), 0..4),
        prop::collection::vec(filter(), 0..3),
        enums,
        knobs,
    )
        .prop_map(
            |(id, source, destination, mappings, filters, enums, knobs)| {
                let (sync_type, direction, conflict, status, soft_delete) = enums;
                let (
                    allow_mass_delete,
                    threshold,
                    max_errors,
                    last_sync,
                    status_message,
                    (batch_size, lookback),
                ) = knobs;
                SyncSchema {
                    id,
                    source,
                    destination,
                    mappings,
                    filters,
                    sync_type,
                    direction,
                    conflict,
                    on_missing: soft_delete
                        .map_or(OnMissing::Delete, |field| OnMissing::SoftDelete { field }),
                    allow_mass_delete,
                    mass_delete_threshold_percent: threshold,
                    max_errors,
                    batch_size,
                    lookback: u64::from(lookback),
                    last_sync,
                    status,
                    status_message,
                }
            },
        )
}

fn schema_set() -> impl Strategy<Value = SchemaSet> {
    prop::collection::vec(schema(), 0..3).prop_map(|mut schemas| {
        // Ids are unique within a file.
        for (i, s) in schemas.iter_mut().enumerate() {
            s.id = format!("{}{i}", s.id);
        }
        SchemaSet { schemas }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn d12_load_of_save_is_the_schema_set(set in schema_set()) {
        let text = set.to_toml().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let loaded = SchemaSet::from_toml(&text)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&loaded, &set);
        let again = loaded.to_toml().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(again, text);
    }
}
