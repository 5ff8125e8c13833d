//! The datasource contract (src/stores/datasource.rs), checked once for every store: the
//! same test runs against CSV, JSON Lines, SQLite, sled and PostgreSQL, each seeded with
//! the same tiny data in its own native format (written by hand, not by the store under
//! test), so a store's reader is checked against files it did not write.
//!
//! PostgreSQL tests need the server that scripts/test starts (`KNIT_TEST_PG`); each
//! works in a fresh schema of its own, dropped at its end, so they run in parallel.
//!
//! Entities of every fixture:
//! - `people`, key `id`: (1, Ada, 36), (2, Alan, 41), (3, Grace, no age).
//! - `visits`, key `(person_id, day)`: (1, mon, first), (1, tue, second), (2, mon, third).

mod common;

use std::fs;
use std::path::Path;

use common::TestResult;
use knit::{
    CsvSource, Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, JsonlSource,
    PostgresSource, Row, RowOutcome, SledSource, SqliteSource, TrackingAnchor, Value,
};
use tempfile::TempDir;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Csv,
    Jsonl,
    Sqlite,
    Sled,
    Postgres,
}

impl Kind {
    /// Whether this store can be tested here: PostgreSQL needs a server (see
    /// `common::pg_conninfo`, which says why a test is skipped).
    fn available(self) -> bool {
        self != Kind::Postgres || common::pg_conninfo().is_some()
    }
}

/// A seeded store and the folder that holds it.
struct Fixture {
    kind: Kind,
    dir: TempDir,
    store: Box<dyn Datasource>,
    /// PostgreSQL's schema; last, so that it is dropped after the store's connection.
    schema: Option<PgSchema>,
}

const NAME: &str = "src";

fn seed_files(dir: &Path, kind: Kind) -> std::io::Result<()> {
    match kind {
        Kind::Csv => {
            fs::write(
                dir.join("people.csv"),
                "id,name,age\n1,Ada,36\n2,Alan,41\n3,Grace,\n",
            )?;
            fs::write(
                dir.join("visits.csv"),
                "person_id,day,note\n1,mon,first\n1,tue,second\n2,mon,third\n",
            )
        }
        Kind::Jsonl => {
            // Grace's line lacks `age` altogether: absent reads as null.
            fs::write(
                dir.join("people.jsonl"),
                concat!(
                    "{\"id\":1,\"name\":\"Ada\",\"age\":36}\n",
                    "{\"id\":2,\"name\":\"Alan\",\"age\":41}\n",
                    "{\"id\":3,\"name\":\"Grace\"}\n",
                ),
            )?;
            fs::write(
                dir.join("visits.jsonl"),
                concat!(
                    "{\"person_id\":1,\"day\":\"mon\",\"note\":\"first\"}\n",
                    "{\"person_id\":1,\"day\":\"tue\",\"note\":\"second\"}\n",
                    "{\"person_id\":2,\"day\":\"mon\",\"note\":\"third\"}\n",
                ),
            )
        }
        Kind::Sqlite => unreachable!("SQLite is seeded through SQL"),
        Kind::Sled => unreachable!("sled is seeded through raw sled writes"),
        Kind::Postgres => unreachable!("PostgreSQL is seeded through SQL"),
    }
}

/// A fresh PostgreSQL schema of one test, dropped when the test ends, passed or failed.
struct PgSchema {
    conninfo: String,
    name: String,
}

impl PgSchema {
    fn create() -> Result<Self, Box<dyn std::error::Error>> {
        let conninfo = common::pg_conninfo().ok_or("KNIT_TEST_PG is not set")?;
        let name = format!("knit_test_{}", uuid::Uuid::new_v4().simple());
        ::postgres::Client::connect(&conninfo, ::postgres::NoTls)?
            .batch_execute(&format!("CREATE SCHEMA \"{name}\""))?;
        Ok(Self { conninfo, name })
    }

    /// A connection of its own whose unqualified names are the schema's.
    fn client(&self) -> Result<::postgres::Client, Box<dyn std::error::Error>> {
        let mut client = ::postgres::Client::connect(&self.conninfo, ::postgres::NoTls)?;
        client.batch_execute(&format!("SET search_path TO \"{}\"", self.name))?;
        Ok(client)
    }

    fn connect(&self) -> Result<PostgresSource, DatasourceError> {
        PostgresSource::connect(NAME, &self.conninfo, Some(&self.name))
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let dropped = ::postgres::Client::connect(&self.conninfo, ::postgres::NoTls).and_then(
            |mut client| {
                client.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name))
            },
        );
        if let Err(e) = dropped {
            eprintln!("could not drop test schema {}: {e}", self.name);
        }
    }
}

/// The fixture's tables in PostgreSQL, with types of several widths (int4, int2) that
/// all read as `Int`.
fn seed_postgres(schema: &PgSchema) -> Result<(), Box<dyn std::error::Error>> {
    schema.client()?.batch_execute(
        "CREATE TABLE people (
             id integer PRIMARY KEY,
             name text NOT NULL,
             age smallint CHECK (age >= 0)
         );
         CREATE TABLE visits (
             person_id integer NOT NULL,
             day text NOT NULL,
             note text,
             PRIMARY KEY (person_id, day)
         );
         INSERT INTO people VALUES (1, 'Ada', 36), (2, 'Alan', 41), (3, 'Grace', NULL);
         INSERT INTO visits VALUES (1, 'mon', 'first'), (1, 'tue', 'second'), (2, 'mon', 'third');",
    )?;
    Ok(())
}

fn seed_sqlite(path: &Path) -> rusqlite::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "CREATE TABLE people (
             id INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             age INTEGER CHECK (age >= 0)
         );
         CREATE TABLE visits (
             person_id INTEGER NOT NULL,
             day TEXT NOT NULL,
             note TEXT,
             PRIMARY KEY (person_id, day)
         );
         INSERT INTO people VALUES (1, 'Ada', 36), (2, 'Alan', 41), (3, 'Grace', NULL);
         INSERT INTO visits VALUES (1, 'mon', 'first'), (1, 'tue', 'second'), (2, 'mon', 'third');",
    )
}

/// A row value laid out as src/stores/sled_source.rs documents it (the variant order is
/// the format), so the sled fixture is written without the store's own encoder.
#[derive(serde::Serialize)]
#[allow(
    dead_code,
    reason = "the variants the fixture does not write keep the others' indices"
)]
enum SledValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

/// A row record: format byte 1, then the bincode list of (field, value) pairs.
fn sled_record(fields: &[(&str, SledValue)]) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let mut record = vec![1];
    record.extend(bincode::serde::encode_to_vec(
        fields,
        bincode::config::standard(),
    )?);
    Ok(record)
}

/// An int key value: big-endian with the sign bit flipped.
fn sled_int(i: i64) -> Vec<u8> {
    let mut bytes = i.to_be_bytes();
    bytes[0] ^= 0x80;
    bytes.to_vec()
}

/// A text key value: its bytes, then 0x00 0x00 (the fixture's texts hold no NUL, which
/// would be escaped as 0x00 0xFF).
fn sled_text(s: &str) -> Vec<u8> {
    [s.as_bytes(), &[0, 0]].concat()
}

fn sled_field(name: &str, field_type: FieldType, nullable: bool) -> FieldInfo {
    FieldInfo {
        name: name.to_string(),
        field_type,
        nullable,
    }
}

/// `people` as the sled fixture declares it (the same as the SQLite table).
fn sled_people() -> Vec<FieldInfo> {
    vec![
        sled_field("id", FieldType::Int, false),
        sled_field("name", FieldType::Text, false),
        sled_field("age", FieldType::Int, true),
    ]
}

/// A raw sled record under its key, as a tree of the fixture holds it.
type SledEntry = (Vec<u8>, Vec<u8>);

/// Writes each tree's records with raw sled writes, then opens the folder with the store
/// and declares `people` (and `visits` when it was written) through `create_entity`,
/// the store's one way to declare an entity.
fn sled_seeded(
    path: &Path,
    trees: &[(&str, Vec<SledEntry>)],
) -> Result<SledSource, Box<dyn std::error::Error>> {
    // `::sled`: the contract's `mod sled` below shadows the crate's name.
    let db = ::sled::open(path)?;
    for (entity, records) in trees {
        let tree = db.open_tree(format!("entity:{entity}"))?;
        for (key, record) in records {
            tree.insert(key.as_slice(), record.as_slice())?;
        }
    }
    db.flush()?;
    drop(db);
    let mut store = SledSource::open(NAME, path)?;
    store.create_entity("people", &sled_people(), &keys(&["id"]))?;
    if trees.iter().any(|(entity, _)| *entity == "visits") {
        let visits = [
            sled_field("person_id", FieldType::Int, false),
            sled_field("day", FieldType::Text, false),
            sled_field("note", FieldType::Text, true),
        ];
        store.create_entity("visits", &visits, &keys(&["person_id", "day"]))?;
    }
    Ok(store)
}

fn sled_person(
    id: i64,
    name: &str,
    age: Option<i64>,
) -> Result<SledEntry, bincode::error::EncodeError> {
    let mut fields = vec![
        ("id", SledValue::Int(id)),
        ("name", SledValue::Text(name.into())),
    ];
    // Grace's record leaves `age` out altogether: a missing nullable field reads as null.
    if let Some(age) = age {
        fields.push(("age", SledValue::Int(age)));
    }
    Ok((sled_int(id), sled_record(&fields)?))
}

fn seed_sled(path: &Path) -> Result<SledSource, Box<dyn std::error::Error>> {
    let people = vec![
        sled_person(1, "Ada", Some(36))?,
        sled_person(2, "Alan", Some(41))?,
        sled_person(3, "Grace", None)?,
    ];
    let mut visits = Vec::new();
    for (person_id, day, note) in [
        (1, "mon", "first"),
        (1, "tue", "second"),
        (2, "mon", "third"),
    ] {
        let record = sled_record(&[
            ("person_id", SledValue::Int(person_id)),
            ("day", SledValue::Text(day.into())),
            ("note", SledValue::Text(note.into())),
        ])?;
        visits.push(([sled_int(person_id), sled_text(day)].concat(), record));
    }
    sled_seeded(path, &[("people", people), ("visits", visits)])
}

fn fixture(kind: Kind) -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut schema = None;
    let store: Box<dyn Datasource> = match kind {
        Kind::Csv => {
            seed_files(dir.path(), kind)?;
            Box::new(CsvSource::open(NAME, dir.path())?)
        }
        Kind::Jsonl => {
            seed_files(dir.path(), kind)?;
            Box::new(JsonlSource::open(NAME, dir.path())?)
        }
        Kind::Sqlite => {
            let path = dir.path().join("db.sqlite");
            seed_sqlite(&path)?;
            Box::new(SqliteSource::open(NAME, &path)?)
        }
        Kind::Sled => Box::new(seed_sled(&dir.path().join("db.sled"))?),
        Kind::Postgres => {
            let created = PgSchema::create()?;
            seed_postgres(&created)?;
            let store = created.connect()?;
            schema = Some(created);
            Box::new(store)
        }
    };
    Ok(Fixture {
        kind,
        dir,
        store,
        schema,
    })
}

impl Fixture {
    /// What this store reads back for a value written or seeded: CSV holds text only.
    fn stored(&self, value: Value) -> Value {
        match (self.kind, value) {
            (Kind::Csv, Value::Null) => Value::Null,
            (Kind::Csv, value) => Value::Text(value.to_text()),
            (_, value) => value,
        }
    }

    fn row(&self, fields: &[(&str, Value)]) -> Row {
        fields
            .iter()
            .map(|(f, v)| (f.to_string(), self.stored(v.clone())))
            .collect()
    }

    fn person(&self, id: i64, name: &str, age: Option<i64>) -> Row {
        self.row(&[
            ("id", Value::Int(id)),
            ("name", text(name)),
            ("age", age.map_or(Value::Null, Value::Int)),
        ])
    }

    fn visit(&self, person_id: i64, day: &str, note: &str) -> Row {
        self.row(&[
            ("person_id", Value::Int(person_id)),
            ("day", text(day)),
            ("note", text(note)),
        ])
    }

    /// Every row of `entity`, sorted by key so that stores may scan in any order.
    fn rows(&mut self, entity: &str) -> Result<Vec<Row>, DatasourceError> {
        let mut rows = self.rows_in_scan_order(entity)?;
        rows.sort_by_key(|r| {
            ["id", "person_id", "day"]
                .iter()
                .filter_map(|f| r.get(*f).map(Value::to_string))
                .collect::<Vec<_>>()
        });
        Ok(rows)
    }

    fn rows_in_scan_order(&mut self, entity: &str) -> Result<Vec<Row>, DatasourceError> {
        let mut rows = Vec::new();
        self.store.scan(entity, &mut |row| {
            rows.push(row);
            Ok(())
        })?;
        Ok(rows)
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[&str],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.store.upsert(entity, &keys(key), rows)
    }

    fn delete(
        &mut self,
        entity: &str,
        key: &[&str],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.store.delete(entity, &keys(key), rows)
    }

    /// Runs `sql` through a connection of its own, as another program would.
    fn other_writer(&self, sql: &str) -> TestResult {
        match (self.kind, &self.schema) {
            (Kind::Sqlite, _) => {
                rusqlite::Connection::open(self.dir.path().join("db.sqlite"))?.execute_batch(sql)?
            }
            (Kind::Postgres, Some(schema)) => schema.client()?.batch_execute(sql)?,
            (kind, _) => return Err(format!("{kind:?} takes no SQL").into()),
        }
        Ok(())
    }

    /// The keys `tracked_changes` reports from `since`, and the anchor it returns.
    fn changes(
        &mut self,
        entity: &str,
        key: &[&str],
        since: TrackingAnchor,
        lookback_ms: i64,
    ) -> Result<(Vec<Row>, TrackingAnchor), DatasourceError> {
        let mut changed = Vec::new();
        let anchor =
            self.store
                .tracked_changes(entity, &keys(key), since, lookback_ms, &mut |row| {
                    changed.push(row);
                    Ok(())
                })?;
        Ok((changed, anchor))
    }

    fn file(&self, entity: &str) -> std::path::PathBuf {
        let extension = if self.kind == Kind::Csv {
            "csv"
        } else {
            "jsonl"
        };
        self.dir.path().join(format!("{entity}.{extension}"))
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn keys(key: &[&str]) -> Vec<String> {
    key.iter().map(|k| k.to_string()).collect()
}

fn written(n: usize) -> Vec<RowOutcome> {
    vec![RowOutcome::Written; n]
}

fn refused_reason(outcome: &RowOutcome) -> Option<&str> {
    match outcome {
        RowOutcome::Refused { reason } => Some(reason),
        RowOutcome::Written => None,
    }
}

// ----------------------------------------------------------------------------------------
// The contract, for every store.
// ----------------------------------------------------------------------------------------

fn entities_lists_every_entity(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    assert_eq!(fx.store.entities()?, ["people", "visits"]);
    assert_eq!(fx.store.name(), NAME);
    Ok(())
}

fn scan_returns_every_row_once_with_all_fields(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let expected = vec![
        fx.person(1, "Ada", Some(36)),
        fx.person(2, "Alan", Some(41)),
        // Grace has no age: the field is still there, as Null.
        fx.person(3, "Grace", None),
    ];
    assert_eq!(fx.rows("people")?, expected);
    let visits = vec![
        fx.visit(1, "mon", "first"),
        fx.visit(1, "tue", "second"),
        fx.visit(2, "mon", "third"),
    ];
    assert_eq!(fx.rows("visits")?, visits);
    Ok(())
}

fn upsert_inserts_new_rows_and_replaces_existing_by_key(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let rows = [
        fx.person(2, "Alan Turing", Some(42)),
        fx.person(4, "Edsger", Some(72)),
    ];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(2));
    let expected = vec![
        fx.person(1, "Ada", Some(36)),
        fx.person(2, "Alan Turing", Some(42)),
        fx.person(3, "Grace", None),
        fx.person(4, "Edsger", Some(72)),
    ];
    assert_eq!(fx.rows("people")?, expected);
    Ok(())
}

fn upsert_new_of_rows_that_are_there_already_updates_them(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // `upsert_new` is a hint (rows a sync brings for the first time), not a promise:
    // a store that tries a plain insert first must still update the rows it finds,
    // write the new ones, and refuse exactly the rows its constraints refuse.
    let mut rows = vec![
        fx.person(5, "Barbara", None),
        fx.person(2, "Alan Turing", Some(42)),
        fx.person(6, "Frances", Some(80)),
    ];
    if matches!(kind, Kind::Sqlite | Kind::Postgres) {
        rows.push(fx.person(8, "Minus", Some(-1)));
    }
    let outcomes = fx.store.upsert_new("people", &keys(&["id"]), &rows)?;
    assert_eq!(outcomes[..3], written(3));
    if matches!(kind, Kind::Sqlite | Kind::Postgres) {
        assert!(refused_reason(&outcomes[3]).is_some(), "{outcomes:?}");
    }
    let expected = vec![
        fx.person(1, "Ada", Some(36)),
        fx.person(2, "Alan Turing", Some(42)),
        fx.person(3, "Grace", None),
        fx.person(5, "Barbara", None),
        fx.person(6, "Frances", Some(80)),
    ];
    assert_eq!(fx.rows("people")?, expected);
    // All of them new: the plain insert takes them.
    let rows = [fx.person(10, "Hedy", Some(40)), fx.person(11, "Joan", None)];
    assert_eq!(
        fx.store.upsert_new("people", &keys(&["id"]), &rows)?,
        written(2)
    );
    assert_eq!(fx.rows("people")?.len(), 7);
    Ok(())
}

fn upsert_by_composite_key_matches_all_key_fields(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // (1, tue) exists and changes; (2, tue) shares each key field with some row but
    // matches none as a whole, so it is new.
    let rows = [fx.visit(1, "tue", "changed"), fx.visit(2, "tue", "new")];
    assert_eq!(
        fx.upsert("visits", &["person_id", "day"], &rows)?,
        written(2)
    );
    let expected = vec![
        fx.visit(1, "mon", "first"),
        fx.visit(1, "tue", "changed"),
        fx.visit(2, "mon", "third"),
        fx.visit(2, "tue", "new"),
    ];
    assert_eq!(fx.rows("visits")?, expected);
    Ok(())
}

fn upsert_twice_leaves_the_same_rows(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // Replaying a write after a crash must not duplicate or change anything.
    let rows = [
        fx.person(1, "Ada King", Some(36)),
        fx.person(5, "Barbara", None),
    ];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(2));
    let once = fx.rows("people")?;
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(2));
    assert_eq!(fx.rows("people")?, once);
    assert_eq!(once.len(), 4);
    assert_eq!(once[0], fx.person(1, "Ada King", Some(36)));
    Ok(())
}

fn upsert_sets_only_the_fields_a_row_carries(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // A mapped sync may write a subset of the fields: the others keep their values on
    // an update and are null on an insert.
    let rows = [
        fx.row(&[("id", Value::Int(1)), ("age", Value::Int(37))]),
        fx.row(&[("id", Value::Int(6)), ("name", text("Barbara"))]),
        fx.row(&[("id", Value::Int(2)), ("age", Value::Null)]),
    ];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(3));
    let expected = vec![
        fx.person(1, "Ada", Some(37)),
        fx.person(2, "Alan", None),
        fx.person(3, "Grace", None),
        fx.person(6, "Barbara", None),
    ];
    assert_eq!(fx.rows("people")?, expected);
    Ok(())
}

fn delete_removes_rows_by_key_and_absent_keys_are_fine(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let gone = [
        fx.row(&[("id", Value::Int(2))]),
        fx.row(&[("id", Value::Int(99))]),
    ];
    assert_eq!(fx.delete("people", &["id"], &gone)?, written(2));
    let expected = vec![fx.person(1, "Ada", Some(36)), fx.person(3, "Grace", None)];
    assert_eq!(fx.rows("people")?, expected);
    // Deleting again is the same no-op as deleting an absent key.
    assert_eq!(fx.delete("people", &["id"], &gone)?, written(2));
    assert_eq!(fx.rows("people")?, expected);
    Ok(())
}

fn delete_by_composite_key_matches_all_key_fields(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let gone = [
        fx.row(&[("person_id", Value::Int(1)), ("day", text("mon"))]),
        fx.row(&[("person_id", Value::Int(2)), ("day", text("tue"))]),
    ];
    assert_eq!(
        fx.delete("visits", &["person_id", "day"], &gone)?,
        written(2)
    );
    let expected = vec![fx.visit(1, "tue", "second"), fx.visit(2, "mon", "third")];
    assert_eq!(fx.rows("visits")?, expected);
    Ok(())
}

fn refused_row_does_not_stop_the_others(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let mut rows = vec![
        fx.person(4, "Edsger", Some(72)),
        // A field the entity does not have.
        fx.row(&[("id", Value::Int(5)), ("nickname", text("x"))]),
        fx.person(6, "Barbara", None),
        // A null key cannot be matched by a later replay, so no store accepts it.
        fx.row(&[("id", Value::Null), ("name", text("Nobody"))]),
    ];
    if matches!(kind, Kind::Sqlite | Kind::Postgres) {
        // The database's own constraints: NOT NULL on name, CHECK (age >= 0).
        rows.push(fx.row(&[("id", Value::Int(7)), ("name", Value::Null)]));
        rows.push(fx.person(8, "Minus", Some(-1)));
    }
    rows.push(fx.person(9, "Last", Some(1)));
    let outcomes = fx.upsert("people", &["id"], &rows)?;
    assert_eq!(outcomes.len(), rows.len());
    let reasons: Vec<Option<&str>> = outcomes.iter().map(refused_reason).collect();
    assert_eq!(reasons[0], None);
    assert!(
        reasons[1].is_some_and(|r| r.contains("nickname")),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], None);
    assert!(
        reasons[3].is_some_and(|r| r.contains("\"id\"")),
        "{reasons:?}"
    );
    if kind == Kind::Sqlite {
        assert!(
            reasons[4].is_some_and(|r| r.contains("NOT NULL constraint failed")),
            "{reasons:?}"
        );
        assert!(
            reasons[5].is_some_and(|r| r.contains("CHECK constraint failed")),
            "{reasons:?}"
        );
    }
    if kind == Kind::Postgres {
        assert!(
            reasons[4].is_some_and(|r| r.contains("violates not-null constraint")),
            "{reasons:?}"
        );
        assert!(
            reasons[5].is_some_and(|r| r.contains("violates check constraint")),
            "{reasons:?}"
        );
    }
    assert_eq!(*reasons.last().ok_or("no outcome")?, None);
    let expected = vec![
        fx.person(1, "Ada", Some(36)),
        fx.person(2, "Alan", Some(41)),
        fx.person(3, "Grace", None),
        fx.person(4, "Edsger", Some(72)),
        fx.person(6, "Barbara", None),
        fx.person(9, "Last", Some(1)),
    ];
    assert_eq!(fx.rows("people")?, expected);
    Ok(())
}

fn describe_lists_fields_and_types(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let field = |name: &str, field_type, nullable| FieldInfo {
        name: name.to_string(),
        field_type,
        nullable,
    };
    let fields = match kind {
        // CSV knows text only, and nothing forbids an empty cell.
        Kind::Csv => vec![
            field("id", FieldType::Text, true),
            field("name", FieldType::Text, true),
            field("age", FieldType::Text, true),
        ],
        // JSON Lines infers types from values and sorts fields by name.
        Kind::Jsonl => vec![
            field("age", FieldType::Int, true),
            field("id", FieldType::Int, true),
            field("name", FieldType::Text, true),
        ],
        // int4 and int2 read as Int too.
        Kind::Sqlite | Kind::Postgres => vec![
            field("id", FieldType::Int, false),
            field("name", FieldType::Text, false),
            field("age", FieldType::Int, true),
        ],
        // sled reads its declaration back, exactly.
        Kind::Sled => sled_people(),
    };
    let expected = EntityInfo {
        name: "people".into(),
        fields,
    };
    assert_eq!(fx.store.describe("people")?, expected);
    Ok(())
}

fn missing_entity_is_no_such_entity_naming_datasource_and_entity(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let check = |missing: &str, result: Result<(), DatasourceError>| match result {
        Err(e @ DatasourceError::NoSuchEntity { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(NAME) && message.contains(missing),
                "{message}"
            );
            if let DatasourceError::NoSuchEntity { datasource, entity } = e {
                assert_eq!((datasource.as_str(), entity.as_str()), (NAME, missing));
            }
        }
        other => panic!("expected NoSuchEntity, got {other:?}"),
    };
    let key = keys(&["id"]);
    let row = fx.person(1, "Ada", None);
    check("ghosts", fx.store.describe("ghosts").map(|_| ()));
    check("ghosts", fx.store.scan("ghosts", &mut |_| Ok(())));
    check(
        "ghosts",
        fx.store
            .upsert("ghosts", &key, std::slice::from_ref(&row))
            .map(|_| ()),
    );
    check(
        "ghosts",
        fx.store.delete("ghosts", &key, &[row]).map(|_| ()),
    );
    // A name that is a path is no entity either, even when the path exists.
    check("../people", fx.store.scan("../people", &mut |_| Ok(())));
    Ok(())
}

fn key_field_not_in_entity_is_no_such_field(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let row = fx.person(1, "Ada", Some(36));
    match fx.upsert("people", &["ident"], &[row]) {
        Err(DatasourceError::NoSuchField {
            datasource,
            entity,
            field,
        }) => assert_eq!(
            (datasource.as_str(), entity.as_str(), field.as_str()),
            (NAME, "people", "ident")
        ),
        other => panic!("expected NoSuchField, got {other:?}"),
    }
    assert_eq!(fx.rows("people")?.len(), 3);
    Ok(())
}

fn unicode_quotes_commas_and_newlines_round_trip(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let awkward = [
        "Zoë, \"the\" café",
        "two\nlines, and a \r\n too",
        "  leading and trailing  ",
        "日本語 🚀 ,\"",
    ];
    let rows: Vec<Row> = awkward
        .iter()
        .enumerate()
        .map(|(i, s)| fx.visit(3, &format!("day{i} «{s}»"), s))
        .collect();
    assert_eq!(
        fx.upsert("visits", &["person_id", "day"], &rows)?,
        written(4)
    );
    let read: Vec<Row> = fx
        .rows("visits")?
        .into_iter()
        .filter(|r| r["person_id"] == fx.stored(Value::Int(3)))
        .collect();
    assert_eq!(read, rows);
    // Matching by such a key works too: the upsert replays as a no-op.
    assert_eq!(
        fx.upsert("visits", &["person_id", "day"], &rows)?,
        written(4)
    );
    assert_eq!(fx.rows("visits")?.len(), 3 + awkward.len());
    Ok(())
}

fn read_keys_returns_exactly_the_asked_rows(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let read = |fx: &mut Fixture, entity: &str, key: &[&str], asked: &[Row]| {
        let mut rows = Vec::new();
        fx.store.read_keys(entity, &keys(key), asked, &mut |row| {
            rows.push(row);
            Ok(())
        })?;
        // In key order, as `Fixture::rows` sorts: stores may visit in any order.
        rows.sort_by_key(|r| {
            ["id", "person_id", "day"]
                .iter()
                .filter_map(|f| r.get(*f).map(Value::to_string))
                .collect::<Vec<_>>()
        });
        Ok::<_, DatasourceError>(rows)
    };
    // An absent key is skipped, a key asked twice comes once.
    let asked = [
        fx.row(&[("id", Value::Int(2))]),
        fx.row(&[("id", Value::Int(99))]),
        fx.row(&[("id", Value::Int(1))]),
        fx.row(&[("id", Value::Int(2))]),
    ];
    let expected = vec![
        fx.person(1, "Ada", Some(36)),
        fx.person(2, "Alan", Some(41)),
    ];
    assert_eq!(read(&mut fx, "people", &["id"], &asked)?, expected);
    // A composite key matches on every field: (2, tue) shares each with some row.
    let asked = [
        fx.row(&[("person_id", Value::Int(1)), ("day", text("tue"))]),
        fx.row(&[("person_id", Value::Int(2)), ("day", text("tue"))]),
        fx.row(&[("person_id", Value::Int(2)), ("day", text("mon"))]),
    ];
    let expected = vec![fx.visit(1, "tue", "second"), fx.visit(2, "mon", "third")];
    assert_eq!(
        read(&mut fx, "visits", &["person_id", "day"], &asked)?,
        expected
    );
    assert_eq!(read(&mut fx, "people", &["id"], &[])?, Vec::<Row>::new());
    Ok(())
}

fn scan_since_is_inclusive(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let since = |fx: &mut Fixture, lower: i64| {
        let mut ids = Vec::new();
        fx.store
            .scan_since("people", "age", &fx.stored(Value::Int(lower)), &mut |row| {
                ids.push(row["id"].to_text());
                Ok(())
            })?;
        ids.sort();
        Ok::<_, DatasourceError>(ids)
    };
    // 41 is Alan's age exactly: the bound is inclusive. Grace's null age never counts.
    assert_eq!(since(&mut fx, 41)?, ["2"]);
    assert_eq!(since(&mut fx, 36)?, ["1", "2"]);
    assert_eq!(since(&mut fx, 42)?, Vec::<String>::new());
    Ok(())
}

fn stores_without_tracking_say_unsupported(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    if fx.store.supports_tracking() {
        assert!(matches!(kind, Kind::Sqlite | Kind::Postgres), "{kind:?}");
        return Ok(());
    }
    let key = keys(&["id"]);
    let check = |result: Result<(), DatasourceError>| match result {
        Err(DatasourceError::Unsupported {
            datasource, entity, ..
        }) => assert_eq!((datasource.as_str(), entity.as_str()), (NAME, "people")),
        other => panic!("{kind:?}: expected Unsupported, got {other:?}"),
    };
    check(fx.store.install_tracking("people", &key));
    check(fx.store.tracking_anchor("people").map(|_| ()));
    check(
        fx.store
            .tracked_changes(
                "people",
                &key,
                TrackingAnchor::default(),
                0,
                &mut |_| Ok(()),
            )
            .map(|_| ()),
    );
    Ok(())
}

// Change tracking, for the stores that support it. Writes come from a connection of
// their own (`other_writer`), as another program's would.

fn ids(values: &[i64]) -> Vec<Row> {
    values
        .iter()
        .map(|i| Row::from([("id".to_string(), Value::Int(*i))]))
        .collect()
}

/// Past the millisecond of the last write, so a read started now does not count it as
/// recorded at or after its own start.
fn next_millisecond() {
    std::thread::sleep(std::time::Duration::from_millis(5));
}

fn tracking_records_every_write_of_any_connection(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    fx.store.install_tracking("people", &keys(&["id"]))?;
    // Nothing before the install is tracked.
    let (before, _) = fx.changes("people", &["id"], TrackingAnchor::default(), 0)?;
    assert_eq!(before, []);
    fx.other_writer("INSERT INTO people VALUES (4, 'Edsger', 72)")?;
    fx.other_writer("UPDATE people SET age = 42 WHERE id = 2")?;
    fx.other_writer("DELETE FROM people WHERE id = 3")?;
    // The store's own writes are tracked like anyone's.
    fx.upsert("people", &["id"], &[fx.person(1, "Ada King", Some(36))])?;
    let (changed, anchor) = fx.changes("people", &["id"], TrackingAnchor::default(), 0)?;
    assert_eq!(changed, ids(&[4, 2, 3, 1]));
    assert!(anchor.sequence > 0, "{anchor:?}");
    // Another entity's changes are its own.
    let visits = fx.changes(
        "visits",
        &["person_id", "day"],
        TrackingAnchor::default(),
        0,
    );
    assert!(visits.is_err(), "visits is not tracked: {visits:?}");
    Ok(())
}

fn tracking_key_change_reports_the_old_key_and_the_new(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let key = ["person_id", "day"];
    fx.store.install_tracking("visits", &keys(&key))?;
    fx.other_writer("UPDATE visits SET day = 'wed' WHERE person_id = 1 AND day = 'tue'")?;
    // An update that keeps the key reports it once.
    fx.other_writer("UPDATE visits SET note = 'x' WHERE person_id = 2")?;
    let (changed, _) = fx.changes("visits", &key, TrackingAnchor::default(), 0)?;
    let visit_key = |person_id: i64, day: &str| {
        Row::from([
            ("person_id".to_string(), Value::Int(person_id)),
            ("day".to_string(), text(day)),
        ])
    };
    assert_eq!(
        changed,
        [
            visit_key(1, "tue"),
            visit_key(1, "wed"),
            visit_key(2, "mon")
        ]
    );
    Ok(())
}

fn tracking_reinstall_is_harmless(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let key = keys(&["id"]);
    fx.store.install_tracking("people", &key)?;
    fx.other_writer("UPDATE people SET age = 37 WHERE id = 1")?;
    fx.store.install_tracking("people", &key)?;
    fx.other_writer("UPDATE people SET age = 42 WHERE id = 2")?;
    // One record per write (no second trigger), and the first one was kept.
    let (changed, _) = fx.changes("people", &["id"], TrackingAnchor::default(), 0)?;
    assert_eq!(changed, ids(&[1, 2]));
    Ok(())
}

fn tracking_anchor_round_trip_reads_nothing_twice_without_lookback(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    fx.store.install_tracking("people", &keys(&["id"]))?;
    let start = fx.store.tracking_anchor("people")?;
    fx.other_writer("UPDATE people SET age = 37 WHERE id = 1")?;
    next_millisecond();
    let (first, anchor) = fx.changes("people", &["id"], start, 0)?;
    assert_eq!(first, ids(&[1]));
    assert!(anchor.sequence > start.sequence && anchor.time_ms >= start.time_ms);
    let (again, same) = fx.changes("people", &["id"], anchor, 0)?;
    assert_eq!(again, []);
    assert_eq!(same.sequence, anchor.sequence);
    fx.other_writer("DELETE FROM people WHERE id = 2")?;
    next_millisecond();
    let (next, _) = fx.changes("people", &["id"], same, 0)?;
    assert_eq!(next, ids(&[2]));
    // tracking_anchor is where a read would stop: nothing lies beyond it.
    let now = fx.store.tracking_anchor("people")?;
    next_millisecond();
    assert_eq!(fx.changes("people", &["id"], now, 0)?.0, []);
    // A lookback reads recent changes again, which the contract allows.
    let (recent, _) = fx.changes("people", &["id"], now, 60_000)?;
    assert_eq!(recent, ids(&[1, 2]));
    Ok(())
}

fn tracking_needs_install_and_known_key_fields(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    match fx.store.install_tracking("people", &keys(&["ident"])) {
        Err(DatasourceError::NoSuchField {
            datasource,
            entity,
            field,
        }) => assert_eq!(
            (datasource.as_str(), entity.as_str(), field.as_str()),
            (NAME, "people", "ident")
        ),
        other => panic!("expected NoSuchField, got {other:?}"),
    }
    assert!(matches!(
        fx.store.install_tracking("ghosts", &keys(&["id"])),
        Err(DatasourceError::NoSuchEntity { .. })
    ));
    // Reading an entity whose tracking was never installed is an error, not silence.
    match fx.changes("people", &["id"], TrackingAnchor::default(), 0) {
        Err(e) => assert!(
            e.to_string().contains(NAME) && e.to_string().contains("people"),
            "{e}"
        ),
        Ok(found) => panic!("expected an error, got {found:?}"),
    }
    assert!(fx.store.tracking_anchor("people").is_err());
    // knit's tracking table is no entity.
    fx.store.install_tracking("people", &keys(&["id"]))?;
    assert_eq!(fx.store.entities()?, ["people", "visits"]);
    Ok(())
}

fn tracking_follows_quoted_names(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // The same SQL creates the same table in SQLite and PostgreSQL.
    fx.other_writer(
        "CREATE TABLE \"odd 'name' \"\"x\"\"\" (\"the id\" INTEGER, \"it's\" TEXT, note TEXT,
         PRIMARY KEY (\"the id\", \"it's\"))",
    )?;
    let table = "odd 'name' \"x\"";
    let key = ["the id", "it's"];
    fx.store.install_tracking(table, &keys(&key))?;
    let row = fx.row(&[
        ("the id", Value::Int(1)),
        ("it's", text("a'b\"c")),
        ("note", text("n")),
    ]);
    assert_eq!(
        fx.upsert(table, &key, std::slice::from_ref(&row))?,
        written(1)
    );
    fx.other_writer("DELETE FROM \"odd 'name' \"\"x\"\"\"")?;
    let (changed, _) = fx.changes(table, &key, TrackingAnchor::default(), 0)?;
    let row_key = fx.row(&[("the id", Value::Int(1)), ("it's", text("a'b\"c"))]);
    assert_eq!(changed, [row_key.clone(), row_key]);
    Ok(())
}

macro_rules! for_each_store {
    ($kind:ident: $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() -> TestResult {
                if !super::Kind::$kind.available() {
                    return Ok(());
                }
                super::$test(super::Kind::$kind)
            }
        )*
    };
}

/// `every store:` tests run against every store; `file stores:` tests only against CSV
/// and JSON Lines, since SQLite, sled and PostgreSQL have no files to rewrite or to find
/// malformed; `tracking stores:` tests against the stores that `supports_tracking`.
/// (`postgresql`, not `postgres`, which would hide the crate of that name.)
macro_rules! contract {
    (
        every store: $($test:ident),* $(,)?;
        file stores: $($file_test:ident),* $(,)?;
        tracking stores: $($tracking_test:ident),* $(,)?
    ) => {
        mod csv {
            use super::TestResult;
            for_each_store!(Csv: $($test,)* $($file_test),*);
        }
        mod jsonl {
            use super::TestResult;
            for_each_store!(Jsonl: $($test,)* $($file_test),*);
        }
        mod sqlite {
            use super::TestResult;
            for_each_store!(Sqlite: $($test,)* $($tracking_test),*);
        }
        mod sled {
            use super::TestResult;
            for_each_store!(Sled: $($test),*);
        }
        mod postgresql {
            use super::TestResult;
            for_each_store!(Postgres: $($test,)* $($tracking_test),*);
        }
    };
}

contract!(
    every store:
    entities_lists_every_entity,
    scan_returns_every_row_once_with_all_fields,
    upsert_inserts_new_rows_and_replaces_existing_by_key,
    upsert_by_composite_key_matches_all_key_fields,
    upsert_twice_leaves_the_same_rows,
    upsert_new_of_rows_that_are_there_already_updates_them,
    upsert_sets_only_the_fields_a_row_carries,
    delete_removes_rows_by_key_and_absent_keys_are_fine,
    delete_by_composite_key_matches_all_key_fields,
    refused_row_does_not_stop_the_others,
    describe_lists_fields_and_types,
    missing_entity_is_no_such_entity_naming_datasource_and_entity,
    key_field_not_in_entity_is_no_such_field,
    unicode_quotes_commas_and_newlines_round_trip,
    read_keys_returns_exactly_the_asked_rows,
    scan_since_is_inclusive,
    stores_without_tracking_say_unsupported;
    file stores:
    stray_tmp_file_is_ignored_and_replaced_by_the_next_write,
    rewrite_keeps_file_order_and_appends_new_rows,
    malformed_file_is_bad_row_naming_the_line;
    tracking stores:
    tracking_records_every_write_of_any_connection,
    tracking_key_change_reports_the_old_key_and_the_new,
    tracking_reinstall_is_harmless,
    tracking_anchor_round_trip_reads_nothing_twice_without_lookback,
    tracking_needs_install_and_known_key_fields,
    tracking_follows_quoted_names,
);

// The file stores' own rules.

fn stray_tmp_file_is_ignored_and_replaced_by_the_next_write(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    // A crash after the temp file was written but before the rename leaves the old
    // file whole beside a half-written temp file.
    let mut tmp = fx.file("people").into_os_string();
    tmp.push(".tmp");
    fs::write(&tmp, "id,na\u{0}garbage{\n")?;
    assert_eq!(fx.store.entities()?, ["people", "visits"]);
    let before = fx.rows("people")?;
    assert_eq!(before.len(), 3);
    assert_eq!(before[0], fx.person(1, "Ada", Some(36)));
    // The next write replaces the temp file and renames it away.
    let row = fx.person(4, "Edsger", Some(72));
    assert_eq!(
        fx.upsert("people", &["id"], std::slice::from_ref(&row))?,
        written(1)
    );
    assert!(!Path::new(&tmp).exists());
    let mut expected = before;
    expected.push(row);
    assert_eq!(fx.rows("people")?, expected);
    Ok(())
}

fn rewrite_keeps_file_order_and_appends_new_rows(kind: Kind) -> TestResult {
    let mut fx = fixture(kind)?;
    let rows = [fx.person(0, "Zero", None), fx.person(2, "Alan T", Some(41))];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(2));
    let ids: Vec<Value> = fx
        .rows_in_scan_order("people")?
        .into_iter()
        .map(|r| r["id"].clone())
        .collect();
    let expected: Vec<Value> = [1, 2, 3, 0].map(|i| fx.stored(Value::Int(i))).into();
    assert_eq!(ids, expected);
    Ok(())
}

fn malformed_file_is_bad_row_naming_the_line(kind: Kind) -> TestResult {
    let cases: Vec<(&str, &[u8], u64, &str)> = match kind {
        Kind::Sqlite => {
            unreachable!("SQLite has no files; see sqlite_blob_is_bad_row_naming_the_row")
        }
        Kind::Sled => {
            unreachable!("sled has no files; see sled_damaged_row_is_bad_row_naming_its_position")
        }
        Kind::Postgres => unreachable!("PostgreSQL has no files"),
        Kind::Csv => vec![
            ("ragged", b"id,name\n1,Ada\n2,Alan,extra\n", 3, "3 fields"),
            (
                "bad_utf8",
                b"id,name\n1,Ada\n2,Alan\n3,Gr\xffce\n",
                4,
                "UTF-8",
            ),
            ("twice", b"id,id\n1,2\n", 1, "twice"),
        ],
        Kind::Jsonl => vec![
            ("broken", b"{\"id\":1}\n{\"id\":2,\n", 2, "invalid JSON"),
            (
                "nested",
                b"{\"id\":1}\n\n{\"id\":3,\"tags\":[1]}\n",
                3,
                "\"tags\"",
            ),
            ("scalar", b"{\"id\":1}\n42\n", 2, "object"),
            ("bad_utf8", b"{\"id\":\"\xff\"}\n", 1, "invalid JSON"),
        ],
    };
    let mut fx = fixture(kind)?;
    let extension = if kind == Kind::Csv { "csv" } else { "jsonl" };
    for (entity, bytes, line, words) in cases {
        fs::write(fx.dir.path().join(format!("{entity}.{extension}")), bytes)?;
        for result in [
            fx.store.scan(entity, &mut |_| Ok(())),
            fx.store.describe(entity).map(|_| ()),
            fx.upsert(entity, &["id"], &[]).map(|_| ()),
        ] {
            match result {
                Err(DatasourceError::BadRow {
                    datasource,
                    entity: named,
                    line: at,
                    reason,
                }) => {
                    assert_eq!(
                        (datasource.as_str(), named.as_str(), at),
                        (NAME, entity, line)
                    );
                    assert!(reason.contains(words), "{entity}: {reason}");
                }
                other => panic!("{entity}: expected BadRow, got {other:?}"),
            }
        }
        // Nothing was rewritten.
        assert_eq!(
            fs::read(fx.dir.path().join(format!("{entity}.{extension}")))?,
            bytes
        );
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------
// Each store's own rules.
// ----------------------------------------------------------------------------------------

#[test]
fn csv_null_writes_an_empty_cell_and_an_empty_cell_reads_null() -> TestResult {
    let mut fx = fixture(Kind::Csv)?;
    let rows = [fx.row(&[
        ("id", Value::Int(4)),
        ("name", text("")),
        ("age", Value::Null),
    ])];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(1));
    let file = fs::read_to_string(fx.file("people"))?;
    assert!(file.ends_with("\n4,,\n"), "{file:?}");
    // The empty name came back as Null: CSV cannot tell them apart.
    let expected = fx.row(&[
        ("id", Value::Int(4)),
        ("name", Value::Null),
        ("age", Value::Null),
    ]);
    assert_eq!(fx.rows("people")?[3], expected);
    Ok(())
}

#[test]
fn csv_empty_file_takes_its_header_from_the_first_upsert() -> TestResult {
    let mut fx = fixture(Kind::Csv)?;
    fs::write(fx.dir.path().join("tags.csv"), "")?;
    assert_eq!(fx.store.describe("tags")?.fields, []);
    let row = fx.row(&[("tag", text("red")), ("id", Value::Int(1))]);
    assert_eq!(
        fx.upsert("tags", &["id"], std::slice::from_ref(&row))?,
        written(1)
    );
    assert_eq!(
        fs::read_to_string(fx.dir.path().join("tags.csv"))?,
        "id,tag\n1,red\n"
    );
    assert_eq!(fx.rows("tags")?, [row]);
    Ok(())
}

#[test]
fn jsonl_describe_infers_types_from_non_null_values() -> TestResult {
    let mut fx = fixture(Kind::Jsonl)?;
    fs::write(
        fx.dir.path().join("mixed.jsonl"),
        concat!(
            "{\"id\":1,\"n\":1,\"flag\":true,\"mix\":1,\"never\":null}\n",
            "{\"id\":2,\"n\":2.5,\"flag\":null,\"mix\":\"one\"}\n",
            "{\"id\":3,\"n\":null,\"flag\":false,\"extra\":\"x\"}\n",
        ),
    )?;
    let types: Vec<(String, FieldType)> = fx
        .store
        .describe("mixed")?
        .fields
        .into_iter()
        .map(|f| (f.name, f.field_type))
        .collect();
    let expected = [
        ("extra", FieldType::Text),
        ("flag", FieldType::Bool),
        ("id", FieldType::Int),
        ("mix", FieldType::Text),
        ("n", FieldType::Float),
        ("never", FieldType::Text),
    ]
    .map(|(n, t)| (n.to_string(), t));
    assert_eq!(types, expected);
    Ok(())
}

#[test]
fn jsonl_values_keep_their_types_and_non_finite_floats_are_refused() -> TestResult {
    let mut fx = fixture(Kind::Jsonl)?;
    let rows = [
        fx.row(&[
            ("id", Value::Int(4)),
            ("name", Value::Bool(true)),
            ("age", Value::Float(1.0)),
        ]),
        fx.row(&[("id", Value::Int(5)), ("age", Value::Float(f64::NAN))]),
    ];
    let outcomes = fx.upsert("people", &["id"], &rows)?;
    assert_eq!(outcomes[0], RowOutcome::Written);
    assert!(
        refused_reason(&outcomes[1]).is_some_and(|r| r.contains("\"age\"")),
        "{outcomes:?}"
    );
    // 1.0 stays a float, not the integer 1.
    assert_eq!(fx.rows("people")?[3], rows[0]);
    Ok(())
}

#[test]
fn sqlite_upsert_without_a_unique_key_updates_then_inserts() -> TestResult {
    let mut fx = fixture(Kind::Sqlite)?;
    let path = fx.dir.path().join("db.sqlite");
    rusqlite::Connection::open(&path)?.execute_batch(
        "CREATE TABLE tags (code TEXT, label TEXT); INSERT INTO tags VALUES ('r', 'red');",
    )?;
    let rows = [
        fx.row(&[("code", text("r")), ("label", text("rouge"))]),
        fx.row(&[("code", text("g")), ("label", text("green"))]),
        fx.row(&[("code", text("b"))]),
    ];
    for _ in 0..2 {
        assert_eq!(fx.upsert("tags", &["code"], &rows)?, written(3));
        let expected = vec![
            fx.row(&[("code", text("b")), ("label", Value::Null)]),
            fx.row(&[("code", text("g")), ("label", text("green"))]),
            fx.row(&[("code", text("r")), ("label", text("rouge"))]),
        ];
        let mut read = fx.rows("tags")?;
        read.sort_by_key(|r| r["code"].to_text());
        assert_eq!(read, expected);
    }
    Ok(())
}

#[test]
fn sqlite_identifiers_with_quotes_and_spaces_are_quoted() -> TestResult {
    let mut fx = fixture(Kind::Sqlite)?;
    let path = fx.dir.path().join("db.sqlite");
    rusqlite::Connection::open(&path)?.execute_batch(
        "CREATE TABLE \"odd \"\"name\"\"\" (\"the id\" INTEGER PRIMARY KEY, \"a;b\" TEXT, done BOOLEAN);",
    )?;
    let table = "odd \"name\"";
    assert_eq!(fx.store.entities()?, [table, "people", "visits"]);
    let row = fx.row(&[
        ("the id", Value::Int(1)),
        ("a;b", text("'); DROP TABLE people; --")),
        ("done", Value::Bool(true)),
    ]);
    assert_eq!(
        fx.upsert(table, &["the id"], std::slice::from_ref(&row))?,
        written(1)
    );
    assert_eq!(fx.rows(table)?, [row]);
    let types: Vec<FieldType> = fx
        .store
        .describe(table)?
        .fields
        .iter()
        .map(|f| f.field_type)
        .collect();
    assert_eq!(types, [FieldType::Int, FieldType::Text, FieldType::Bool]);
    assert_eq!(fx.rows("people")?.len(), 3);
    Ok(())
}

#[test]
fn sqlite_open_never_creates_a_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("missing.sqlite");
    match SqliteSource::open(NAME, &path) {
        Err(DatasourceError::Unavailable { datasource, .. }) => assert_eq!(datasource, NAME),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!path.exists());
    fs::write(
        &path,
        "not a database, just some text that is long enough to have a header",
    )?;
    assert!(matches!(
        SqliteSource::open(NAME, &path),
        Err(DatasourceError::Unavailable { .. })
    ));
    Ok(())
}

#[test]
fn sqlite_blob_is_bad_row_naming_the_row() -> TestResult {
    let mut fx = fixture(Kind::Sqlite)?;
    let path = fx.dir.path().join("db.sqlite");
    rusqlite::Connection::open(&path)?
        .execute_batch("UPDATE people SET name = x'00ff' WHERE id = 2;")?;
    match fx.rows_in_scan_order("people") {
        Err(DatasourceError::BadRow { line, reason, .. }) => {
            assert_eq!(line, 2);
            assert!(reason.contains("\"name\""), "{reason}");
        }
        other => panic!("expected BadRow, got {other:?}"),
    }
    Ok(())
}

#[test]
fn sqlite_tracked_keys_come_back_exactly_and_find_their_rows() -> TestResult {
    // SQLite's JSON writes a real with 15 digits, which would turn 0.1 + 0.2 into 0.3:
    // a key that no longer matches its row is a change lost. The triggers keep SQLite's
    // exact literal instead.
    let mut fx = fixture(Kind::Sqlite)?;
    fx.other_writer("CREATE TABLE m (x REAL, label TEXT, PRIMARY KEY (x, label))")?;
    let key = ["x", "label"];
    fx.store.install_tracking("m", &keys(&key))?;
    fx.other_writer("INSERT INTO m VALUES (0.1 + 0.2, 'it''s'), (1e300, 'NULL'), (-2.5e-300, '')")?;
    let (changed, _) = fx.changes("m", &key, TrackingAnchor::default(), 0)?;
    let expected = [(0.1 + 0.2, "it's"), (1e300, "NULL"), (-2.5e-300, "")]
        .map(|(x, label)| fx.row(&[("x", Value::Float(x)), ("label", text(label))]));
    assert_eq!(changed, expected);
    let mut found = 0;
    fx.store.read_keys("m", &keys(&key), &changed, &mut |_| {
        found += 1;
        Ok(())
    })?;
    assert_eq!(found, 3);
    Ok(())
}

#[test]
fn file_stores_refuse_a_folder_that_does_not_exist() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope");
    assert!(matches!(
        CsvSource::open(NAME, &missing),
        Err(DatasourceError::Unavailable { .. })
    ));
    assert!(matches!(
        JsonlSource::open(NAME, &missing),
        Err(DatasourceError::Unavailable { .. })
    ));
    Ok(())
}

// PostgreSQL's own rules (src/stores/postgres_source.rs).

/// A seeded PostgreSQL fixture, or `None` (and a line saying the test was skipped) when
/// no server was given.
fn postgres_fixture() -> Result<Option<Fixture>, Box<dyn std::error::Error>> {
    if !Kind::Postgres.available() {
        return Ok(None);
    }
    fixture(Kind::Postgres).map(Some)
}

fn pg_schema(fx: &Fixture) -> Result<&PgSchema, &'static str> {
    fx.schema
        .as_ref()
        .ok_or("a PostgreSQL fixture has a schema")
}

#[test]
fn postgres_lookback_catches_a_transaction_that_commits_after_a_read() -> TestResult {
    // PostgreSQL takes a sequence number when a row is written, not when its
    // transaction commits: T1 takes A's number, T2 takes a higher one for B and commits
    // first, and a read in between sees B and moves its anchor past A's number. Only the
    // lookback of the next read finds A.
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    fx.store.install_tracking("people", &keys(&["id"]))?;
    let start = fx.store.tracking_anchor("people")?;
    let mut slow = pg_schema(&fx)?.client()?;
    let mut t1 = slow.transaction()?;
    t1.batch_execute("UPDATE people SET age = 37 WHERE id = 1")?;
    fx.other_writer("UPDATE people SET age = 42 WHERE id = 2")?;
    next_millisecond();
    let (first, anchor) = fx.changes("people", &["id"], start, 0)?;
    assert_eq!(first, ids(&[2]));
    t1.commit()?;
    // A's number is below B's: in sequence order A comes first...
    let (all, _) = fx.changes("people", &["id"], TrackingAnchor::default(), 0)?;
    assert_eq!(all, ids(&[1, 2]));
    // ...so a read after the anchor without a lookback would lose A for good,
    let (missed, _) = fx.changes("people", &["id"], anchor, 0)?;
    assert_eq!(missed, []);
    // and the lookback brings it back (with B again, which is harmless).
    let (caught, _) = fx.changes("people", &["id"], anchor, 60_000)?;
    assert_eq!(caught, ids(&[1, 2]));
    Ok(())
}

#[test]
fn postgres_unreachable_server_is_unavailable_and_hides_the_password() -> TestResult {
    // Port 1 of loopback: nothing listens there, so this needs no server.
    let conninfo = "host=127.0.0.1 port=1 user=knit password=hunter2-secret dbname=knit_test";
    match PostgresSource::connect(NAME, conninfo, None) {
        Err(e @ DatasourceError::Unavailable { .. }) => {
            let message = e.to_string();
            assert!(message.contains(NAME), "{message}");
            assert!(message.contains("port=1"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
            assert!(!format!("{e:?}").contains("hunter2"), "{e:?}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    Ok(())
}

#[test]
fn postgres_missing_schema_is_unavailable() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    match PostgresSource::connect(NAME, &conninfo, Some("knit_no_such_schema")) {
        Err(e @ DatasourceError::Unavailable { .. }) => {
            assert!(e.to_string().contains("knit_no_such_schema"), "{e}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    Ok(())
}

#[test]
fn postgres_default_schema_is_public() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let table = format!("public_{}", uuid::Uuid::new_v4().simple());
    let mut admin = ::postgres::Client::connect(&conninfo, ::postgres::NoTls)?;
    admin.batch_execute(&format!(
        "CREATE TABLE public.\"{table}\" (id int PRIMARY KEY)"
    ))?;
    let listed = PostgresSource::connect(NAME, &conninfo, None).and_then(|mut s| s.entities());
    admin.batch_execute(&format!("DROP TABLE public.\"{table}\""))?;
    assert!(listed?.contains(&table));
    Ok(())
}

#[test]
fn postgres_types_map_and_values_convert_as_the_column_takes_them() -> TestResult {
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    fx.other_writer(
        "CREATE TABLE typed (
             id int8 PRIMARY KEY, small int2, f4 float4, num numeric(6, 2), flag bool,
             at timestamp, at_tz timestamptz, code varchar(3), uid uuid
         );
         INSERT INTO typed VALUES (1, 7, 1.5, 3.10, true, '2024-05-01 10:00:00',
             '2024-05-01 10:00:00+02', 'abc', '00000000-0000-0000-0000-00000000000a');",
    )?;
    let types: Vec<FieldType> = fx
        .store
        .describe("typed")?
        .fields
        .iter()
        .map(|f| f.field_type)
        .collect();
    use FieldType::{Bool, Float, Int, Text};
    assert_eq!(
        types,
        [Int, Int, Float, Float, Bool, Text, Text, Text, Text]
    );
    // PostgreSQL stores every value as it is given: a row is its fields.
    let row = |fields: &[(&str, Value)]| -> Row {
        fields
            .iter()
            .map(|(f, v)| (f.to_string(), v.clone()))
            .collect()
    };
    let seeded = row(&[
        ("id", Value::Int(1)),
        ("small", Value::Int(7)),
        ("f4", Value::Float(1.5)),
        ("num", Value::Float(3.1)),
        ("flag", Value::Bool(true)),
        // Timestamps read as text, in ISO form, a timestamptz in UTC.
        ("at", text("2024-05-01 10:00:00")),
        ("at_tz", text("2024-05-01 08:00:00+00")),
        ("code", text("abc")),
        ("uid", text("00000000-0000-0000-0000-00000000000a")),
    ]);
    assert_eq!(fx.rows("typed")?, [seeded]);
    let rows = [
        // Text that is a number goes into a number column, as SQLite's affinity takes it.
        row(&[("id", Value::Int(2)), ("small", text("36"))]),
        row(&[("id", Value::Int(3)), ("small", text("x"))]),
        row(&[("id", Value::Int(4)), ("small", Value::Float(1.5))]),
        row(&[("id", Value::Int(5)), ("small", Value::Float(40.0))]),
        row(&[("id", Value::Int(6)), ("small", Value::Bool(true))]),
        row(&[("id", Value::Int(7)), ("small", Value::Int(70_000))]),
        // Too long for varchar(3): refused, not cut.
        row(&[("id", Value::Int(8)), ("code", text("abcd"))]),
        row(&[("id", Value::Int(9)), ("at", text("2024-06-01T12:30:00"))]),
        row(&[("id", Value::Int(10)), ("flag", text("no"))]),
    ];
    let outcomes = fx.upsert("typed", &["id"], &rows)?;
    let reasons: Vec<Option<&str>> = outcomes.iter().map(refused_reason).collect();
    assert_eq!(reasons[0], None);
    assert!(
        reasons[1].is_some_and(|r| r.contains("invalid input syntax")),
        "{reasons:?}"
    );
    assert!(
        reasons[2].is_some_and(|r| r.contains("invalid input syntax")),
        "{reasons:?}"
    );
    assert_eq!(reasons[3..5], [None, None]);
    assert!(
        reasons[5].is_some_and(|r| r.contains("out of range")),
        "{reasons:?}"
    );
    assert!(
        reasons[6].is_some_and(|r| r.contains("too long")),
        "{reasons:?}"
    );
    assert_eq!(reasons[7..], [None, None]);
    let read: Vec<(String, String)> = fx
        .rows("typed")?
        .into_iter()
        .skip(1)
        .map(|r| {
            (
                r["id"].to_text(),
                format!("{} {} {}", r["small"], r["at"], r["flag"]),
            )
        })
        .collect();
    let expected = [
        ("10", "null null false"),
        ("2", "36 null null"),
        ("5", "40 null null"),
        ("6", "1 null null"),
        ("9", "null \"2024-06-01 12:30:00\" null"),
    ]
    .map(|(id, rest)| (id.to_string(), rest.to_string()));
    assert_eq!(read, expected);
    Ok(())
}

#[test]
fn postgres_whole_rows_go_typed_or_as_text_and_read_back_the_same() -> TestResult {
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    fx.other_writer(
        "CREATE TABLE typed (
             id int8 PRIMARY KEY, small int2, f8 float8, f4 float4, num numeric(8, 3),
             flag bool, at timestamp, code varchar(3)
         );",
    )?;
    let row = |id: i64, small: Value, f8: Value, num: Value, flag: Value, code: &str| -> Row {
        [
            ("id", Value::Int(id)),
            ("small", small),
            ("f8", f8),
            ("f4", Value::Float(0.5)),
            ("num", num),
            ("flag", flag),
            ("at", text("2024-05-01 10:00:00")),
            ("code", text(code)),
        ]
        .into_iter()
        .map(|(f, v)| (f.to_string(), v))
        .collect()
    };
    // Every row carries every column, so they go as one statement of arrays: typed
    // where each value is of the column's own type, as text where one is not (the
    // text "12" in a smallint column) or where a typed cast could round (numeric).
    let rows = [
        row(
            1,
            Value::Int(5),
            Value::Float(0.1),
            Value::Float(1.125),
            Value::Bool(false),
            "abc",
        ),
        row(
            2,
            Value::Null,
            Value::Float(-1234.5),
            text("7.5"),
            Value::Null,
            "d",
        ),
    ];
    let store = &mut fx.store;
    assert_eq!(
        store.upsert_new("typed", &keys(&["id"]), &rows)?,
        written(2)
    );
    let mixed = [
        row(
            1,
            text("12"),
            Value::Int(3),
            Value::Float(2.0),
            Value::Bool(true),
            "xyz",
        ),
        row(
            3,
            Value::Int(-7),
            Value::Null,
            Value::Int(4),
            Value::Bool(true),
            "",
        ),
    ];
    assert_eq!(fx.upsert("typed", &["id"], &mixed)?, written(2));
    let read: Vec<String> = fx
        .rows("typed")?
        .into_iter()
        .map(|r| {
            ["id", "small", "f8", "f4", "num", "flag", "at", "code"]
                .map(|f| r[f].to_text())
                .join("|")
        })
        .collect();
    assert_eq!(
        read,
        [
            "1|12|3|0.5|2|true|2024-05-01 10:00:00|xyz",
            "2||-1234.5|0.5|7.5||2024-05-01 10:00:00|d",
            "3|-7||0.5|4|true|2024-05-01 10:00:00|",
        ]
    );
    Ok(())
}

#[test]
fn postgres_a_write_after_the_table_changed_reads_it_again() -> TestResult {
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    let kathleen = fx.person(7, "Kathleen", Some(30));
    assert_eq!(fx.upsert("people", &["id"], &[kathleen])?, written(1));
    // Writes reuse the table's description while they succeed; this one meets the
    // dropped column and fails whole, and the next reads the table again, so it
    // refuses exactly the row that names the column and writes the other.
    fx.other_writer("ALTER TABLE people DROP COLUMN age")?;
    let mary = fx.person(8, "Mary", Some(50));
    let stale = fx.upsert("people", &["id"], std::slice::from_ref(&mary));
    assert!(stale.is_err(), "{stale:?}");
    let ida = fx.row(&[("id", Value::Int(9)), ("name", text("Ida"))]);
    let outcomes = fx.upsert("people", &["id"], &[mary, ida])?;
    assert!(
        refused_reason(&outcomes[0]).is_some_and(|r| r.contains("age")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], RowOutcome::Written);
    Ok(())
}

#[test]
fn postgres_upsert_without_a_unique_key_updates_then_inserts() -> TestResult {
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    fx.other_writer(
        "CREATE TABLE tags (code text, label text); INSERT INTO tags VALUES ('r', 'red');",
    )?;
    let rows = [
        fx.row(&[("code", text("r")), ("label", text("rouge"))]),
        fx.row(&[("code", text("g")), ("label", text("green"))]),
        fx.row(&[("code", text("b"))]),
    ];
    for _ in 0..2 {
        assert_eq!(fx.upsert("tags", &["code"], &rows)?, written(3));
        let expected = vec![
            fx.row(&[("code", text("b")), ("label", Value::Null)]),
            fx.row(&[("code", text("g")), ("label", text("green"))]),
            fx.row(&[("code", text("r")), ("label", text("rouge"))]),
        ];
        let mut read = fx.rows("tags")?;
        read.sort_by_key(|r| r["code"].to_text());
        assert_eq!(read, expected);
    }
    Ok(())
}

#[test]
fn postgres_identifiers_with_quotes_and_spaces_are_quoted() -> TestResult {
    let Some(mut fx) = postgres_fixture()? else {
        return Ok(());
    };
    fx.other_writer(
        "CREATE TABLE \"odd \"\"name\"\"\" (\"the id\" integer PRIMARY KEY, \"a;b\" text, done boolean);
         CREATE TABLE \"KNIT_private\" (id integer);",
    )?;
    let table = "odd \"name\"";
    // knit_ tables, in any case, are knit's own.
    assert_eq!(fx.store.entities()?, [table, "people", "visits"]);
    let row = fx.row(&[
        ("the id", Value::Int(1)),
        ("a;b", text("'); DROP TABLE people; --")),
        ("done", Value::Bool(true)),
    ]);
    assert_eq!(
        fx.upsert(table, &["the id"], std::slice::from_ref(&row))?,
        written(1)
    );
    assert_eq!(fx.rows(table)?, [row]);
    assert_eq!(fx.rows("people")?.len(), 3);
    assert!(matches!(
        fx.store.scan("KNIT_private", &mut |_| Ok(())),
        Err(DatasourceError::NoSuchEntity { .. })
    ));
    Ok(())
}

#[test]
fn postgres_lost_connection_is_unavailable() -> TestResult {
    let Some(fx) = postgres_fixture()? else {
        return Ok(());
    };
    let schema = pg_schema(&fx)?;
    // A name of its own, so that only this store's connection is ended.
    let application = format!("knit_{}", uuid::Uuid::new_v4().simple());
    let conninfo = format!("{} application_name={application}", schema.conninfo);
    let mut store = PostgresSource::connect(NAME, &conninfo, Some(&schema.name))?;
    // Another session ends the store's connection, as a server restart would.
    let ended = schema.client()?.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = $1",
        &[&application],
    )?;
    assert_eq!(ended.try_get::<_, i64>(0)?, 1);
    match store.scan("people", &mut |_| Ok(())) {
        Err(DatasourceError::Unavailable { datasource, .. }) => assert_eq!(datasource, NAME),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    Ok(())
}

// sled's own rules (src/stores/sled_source.rs).

fn sled_store() -> Result<(TempDir, SledSource), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = seed_sled(&dir.path().join("db.sled"))?;
    Ok((dir, store))
}

fn readings() -> Vec<FieldInfo> {
    vec![
        sled_field("id", FieldType::Int, false),
        sled_field("at", FieldType::Float, true),
        sled_field("ok", FieldType::Bool, true),
        sled_field("label", FieldType::Text, true),
    ]
}

fn unsupported_what(result: Result<(), DatasourceError>) -> String {
    match result {
        Err(DatasourceError::Unsupported { what, .. }) => what,
        other => format!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn sled_describe_is_the_declaration_and_redeclaring_it_is_a_no_op() -> TestResult {
    let (_dir, mut store) = sled_store()?;
    let id = keys(&["id"]);
    store.create_entity("readings", &readings(), &id)?;
    let expected = EntityInfo {
        name: "readings".into(),
        fields: readings(),
    };
    assert_eq!(store.describe("readings")?, expected);
    assert_eq!(store.entities()?, ["people", "readings", "visits"]);
    store.create_entity("readings", &readings(), &id)?;
    let mut other = readings();
    other[3].nullable = false;
    let what = unsupported_what(store.create_entity("readings", &other, &id));
    assert!(what.contains("second declaration"), "{what}");
    assert_eq!(store.describe("readings")?, expected);
    let what = unsupported_what(store.create_entity("loose", &readings(), &keys(&["at"])));
    assert!(what.contains("nullable key field \"at\""), "{what}");
    match store.create_entity("loose", &readings(), &keys(&["nope"])) {
        Err(DatasourceError::NoSuchField { field, .. }) => assert_eq!(field, "nope"),
        other => panic!("expected NoSuchField, got {other:?}"),
    }
    assert_eq!(store.entities()?, ["people", "readings", "visits"]);
    Ok(())
}

#[test]
fn sled_values_fit_their_declared_types_or_are_refused() -> TestResult {
    let (_dir, mut store) = sled_store()?;
    let id = keys(&["id"]);
    store.create_entity("readings", &readings(), &id)?;
    let row = |fields: &[(&str, Value)]| -> Row {
        fields
            .iter()
            .map(|(f, v)| (f.to_string(), v.clone()))
            .collect()
    };
    let rows = [
        // An int goes into a float field that holds it exactly, any value into text.
        row(&[("id", Value::Int(1)), ("at", Value::Int(2))]),
        row(&[
            ("id", Value::Int(2)),
            ("ok", Value::Bool(true)),
            ("label", Value::Int(7)),
        ]),
        row(&[("id", Value::Int(3)), ("at", Value::Int((1 << 53) + 1))]),
        row(&[("id", Value::Int(4)), ("ok", text("true"))]),
        row(&[("id", text("5"))]),
        row(&[("id", Value::Int(6)), ("at", Value::Float(f64::NAN))]),
    ];
    let outcomes = store.upsert("readings", &id, &rows)?;
    let reasons: Vec<Option<&str>> = outcomes.iter().map(refused_reason).collect();
    assert_eq!((reasons[0], reasons[1], reasons[5]), (None, None, None));
    assert!(
        reasons[2].is_some_and(|r| r.contains("\"at\"")),
        "{reasons:?}"
    );
    assert!(
        reasons[3].is_some_and(|r| r.contains("\"ok\"") && r.contains("bool")),
        "{reasons:?}"
    );
    assert!(
        reasons[4].is_some_and(|r| r.contains("\"id\"")),
        "{reasons:?}"
    );
    let mut read = Vec::new();
    store.scan("readings", &mut |r| {
        read.push(r);
        Ok(())
    })?;
    assert_eq!(read.len(), 3);
    assert_eq!(read[0]["at"], Value::Float(2.0));
    assert_eq!(read[1]["label"], text("7"));
    assert!(matches!(read[2]["at"], Value::Float(f) if f.is_nan()));
    // NOT NULL holds for an insert that leaves the field out and for an update that
    // clears it; text that looks like a number is still text.
    let rows = [
        row(&[("id", Value::Int(7)), ("age", Value::Int(1))]),
        row(&[("id", Value::Int(1)), ("name", Value::Null)]),
        row(&[("id", Value::Int(1)), ("age", text("36"))]),
    ];
    let outcomes = store.upsert("people", &id, &rows)?;
    for (outcome, words) in outcomes.iter().zip(["\"name\"", "\"name\"", "\"age\""]) {
        assert!(
            refused_reason(outcome).is_some_and(|r| r.contains(words)),
            "{outcomes:?}"
        );
    }
    let mut people = 0;
    store.scan("people", &mut |_| {
        people += 1;
        Ok(())
    })?;
    assert_eq!(people, 3);
    Ok(())
}

#[test]
fn sled_rows_come_in_key_order_and_survive_reopening() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db.sled");
    let mut fx = Fixture {
        kind: Kind::Sled,
        store: Box::new(seed_sled(&path)?),
        dir,
        schema: None,
    };
    let rows = [
        fx.person(10, "Ten", None),
        fx.person(-5, "Minus", None),
        fx.person(0, "Zero", None),
    ];
    assert_eq!(fx.upsert("people", &["id"], &rows)?, written(3));
    // Days whose order a naive encoding gets wrong: a prefix, and an embedded NUL.
    let days = ["b", "ab", "a\u{0}", "a"];
    let rows: Vec<Row> = days.iter().map(|d| fx.visit(-1, d, "n")).collect();
    assert_eq!(
        fx.upsert("visits", &["person_id", "day"], &rows)?,
        written(4)
    );
    let scanned = |fx: &mut Fixture| -> Result<(Vec<Value>, Vec<Value>), DatasourceError> {
        let ids = fx.rows_in_scan_order("people")?;
        let visits = fx.rows_in_scan_order("visits")?;
        Ok((
            ids.into_iter().map(|r| r["id"].clone()).collect(),
            visits
                .into_iter()
                .map(|r| r["day"].clone())
                .take(4)
                .collect(),
        ))
    };
    let expected = (
        [-5, 0, 1, 2, 3, 10].map(Value::Int).to_vec(),
        ["a", "a\u{0}", "ab", "b"].map(text).to_vec(),
    );
    assert_eq!(scanned(&mut fx)?, expected);
    // Each call flushed: a new handle, opened once the first is gone, reads the same.
    let Fixture {
        kind,
        dir,
        store,
        schema,
    } = fx;
    drop(store);
    let mut fx = Fixture {
        kind,
        dir,
        store: Box::new(SledSource::open(NAME, &path)?),
        schema,
    };
    assert_eq!(scanned(&mut fx)?, expected);
    Ok(())
}

#[test]
fn sled_key_other_than_the_declared_one_is_unsupported_and_read_keys_looks_up() -> TestResult {
    let (_dir, mut store) = sled_store()?;
    let row: Row = [("name".to_string(), text("Ada"))].into();
    let what = unsupported_what(
        store
            .upsert("people", &keys(&["name"]), std::slice::from_ref(&row))
            .map(|_| ()),
    );
    assert!(what.contains("(name)") && what.contains("(id)"), "{what}");
    let id = |v: Value| -> Row { [("id".to_string(), v)].into() };
    let wanted = [
        id(Value::Int(3)),
        id(Value::Int(1)),
        id(Value::Int(1)),
        id(Value::Int(99)),
        id(text("x")),
        Row::new(),
    ];
    let mut found = Vec::new();
    store.read_keys("people", &keys(&["id"]), &wanted, &mut |r| {
        found.push(r["name"].clone());
        Ok(())
    })?;
    assert_eq!(found, [text("Ada"), text("Grace")]);
    Ok(())
}

#[test]
fn sled_damaged_row_is_bad_row_naming_its_position() -> TestResult {
    let good = |id| sled_person(id, "Ok", None);
    let record = |fields: &[(&str, SledValue)]| sled_record(fields);
    let mut trailing = record(&[
        ("id", SledValue::Int(2)),
        ("name", SledValue::Text("B".into())),
    ])?;
    trailing.push(0);
    let mut other_format = good(2)?.1;
    other_format[0] = 9;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", vec![1, 0xFF, 0xFF, 0xFF], "does not decode"),
        ("empty", Vec::new(), "empty record"),
        ("format", other_format, "format 9"),
        ("trailing", trailing, "1 trailing bytes"),
        (
            "type",
            record(&[("id", SledValue::Int(2)), ("name", SledValue::Int(7))])?,
            "\"name\" holds a value of type int",
        ),
        (
            "undeclared",
            record(&[
                ("id", SledValue::Int(2)),
                ("name", SledValue::Text("B".into())),
                ("nickname", SledValue::Null),
            ])?,
            "\"nickname\"",
        ),
        (
            "not null",
            record(&[("id", SledValue::Int(2))])?,
            "\"name\" is NOT NULL",
        ),
        ("misfiled", good(5)?.1, "key"),
    ];
    for (case, bad, words) in cases {
        let dir = tempfile::tempdir()?;
        let rows = vec![good(1)?, (sled_int(2), bad), good(3)?];
        let mut store = sled_seeded(&dir.path().join("db.sled"), &[("people", rows)])?;
        let id = keys(&["id"]);
        let two: Row = [("id".to_string(), Value::Int(2))].into();
        let mut seen = 0;
        let results = [
            store.scan("people", &mut |_| {
                seen += 1;
                Ok(())
            }),
            store
                .upsert("people", &id, std::slice::from_ref(&two))
                .map(|_| ()),
            store.read_keys("people", &id, std::slice::from_ref(&two), &mut |_| Ok(())),
        ];
        // The scan stopped at the damaged row, after visiting the one before it.
        assert_eq!(seen, 1, "{case}");
        for result in results {
            match result {
                Err(DatasourceError::BadRow {
                    datasource,
                    entity,
                    line,
                    reason,
                }) => {
                    assert_eq!(
                        (datasource.as_str(), entity.as_str(), line),
                        (NAME, "people", 2)
                    );
                    assert!(reason.contains(words), "{case}: {reason}");
                }
                other => panic!("{case}: expected BadRow, got {other:?}"),
            }
        }
    }
    Ok(())
}

#[test]
fn sled_open_never_creates_a_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing");
    match SledSource::open(NAME, &missing) {
        Err(DatasourceError::Unavailable { datasource, reason }) => {
            assert_eq!(datasource, NAME);
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(!missing.exists());
    // A folder that exists but holds no database is no empty source either.
    assert!(matches!(
        SledSource::open(NAME, dir.path()),
        Err(DatasourceError::Unavailable { .. })
    ));
    assert_eq!(fs::read_dir(dir.path())?.count(), 0);
    let path = dir.path().join("new");
    let mut store = SledSource::create(NAME, &path)?;
    assert_eq!(store.entities()?, Vec::<String>::new());
    drop(store);
    match SledSource::create(NAME, &path) {
        Err(DatasourceError::Unavailable { reason, .. }) => {
            assert!(reason.contains("already holds"), "{reason}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let mut store = SledSource::open(NAME, &path)?;
    assert_eq!(store.entities()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn sled_second_handle_is_refused_not_left_waiting() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db.sled");
    let first = SledSource::create(NAME, &path)?;
    let started = std::time::Instant::now();
    match SledSource::open(NAME, &path) {
        Err(DatasourceError::Unavailable { datasource, reason }) => {
            assert_eq!(datasource, NAME);
            assert!(reason.contains("in use"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    // Once the first handle is gone, the folder opens again.
    drop(first);
    SledSource::open(NAME, &path)?;
    Ok(())
}
