//! The sync manager: a schema file, the named datasources it runs against and the
//! state folder that holds each schema's metadata and run history, behind one API in
//! the spirit of BeepDM's sync manager (add, update, remove, load, save, validate,
//! auto-map, sync, history). The CLI is a thin shell over it.
//!
//! Invariants:
//! - Changes to the schema set stay in memory until `save`, which is atomic.
//! - `sync` writes the run's status, message and end time back into the schema file
//!   (re-read just before, so edits a person made during the run are kept) and
//!   records the run in the history, whatever its end.

use std::path::{Path, PathBuf};

use crate::stores::EntityInfo;
use crate::sync::CancelToken;

use super::history::{History, RunRecord, DEFAULT_RETENTION};
use super::run::{sync, Datasources, RunProgress, RunReport};
use super::{automap, validate, AutoMap, RunStatus, SchemaError, SchemaSet, SyncSchema};

/// A schema file and what it runs against.
pub struct SyncManager {
    file: PathBuf,
    schemas: SchemaSet,
    datasources: Datasources,
    state_dir: PathBuf,
}

impl SyncManager {
    /// Loads the schema file at `file` (a missing file is an empty set, to be written
    /// by the first `save`; a corrupt one is an error). Metadata and history live in
    /// `state_dir`.
    pub fn load(
        file: &Path,
        datasources: Datasources,
        state_dir: &Path,
    ) -> Result<SyncManager, SchemaError> {
        let schemas = if file.exists() {
            SchemaSet::load(file)?
        } else {
            SchemaSet::default()
        };
        Ok(SyncManager {
            file: file.to_path_buf(),
            schemas,
            datasources,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Where a schema file keeps its state unless told otherwise: `NAME.state/` beside
    /// `NAME.toml`.
    pub fn default_state_dir(file: &Path) -> PathBuf {
        let stem = file
            .file_stem()
            .map_or_else(|| "schemas".into(), |s| s.to_string_lossy().into_owned());
        file.with_file_name(format!("{stem}.state"))
    }

    pub fn schemas(&self) -> &[SyncSchema] {
        &self.schemas.schemas
    }

    pub fn datasources(&self) -> &Datasources {
        &self.datasources
    }

    pub fn schema(&self, id: &str) -> Result<&SyncSchema, SchemaError> {
        self.schemas.get(id).ok_or_else(|| self.unknown(id))
    }

    fn unknown(&self, id: &str) -> SchemaError {
        let known: Vec<&str> = self.schemas.schemas.iter().map(|s| s.id.as_str()).collect();
        SchemaError::InvalidValue {
            schema: id.to_string(),
            path: "id".into(),
            value: id.to_string(),
            reason: format!("{} has no schema with this id", self.file.display()),
            suggestion: (!known.is_empty()).then(|| format!("known: {}", known.join(", "))),
        }
    }

    /// Adds a schema; its id must be new.
    pub fn add(&mut self, schema: SyncSchema) -> Result<(), SchemaError> {
        if self.schemas.get(&schema.id).is_some() {
            return Err(SchemaError::InvalidValue {
                schema: schema.id.clone(),
                path: "id".into(),
                value: schema.id.clone(),
                reason: format!("{} already has a schema with this id", self.file.display()),
                suggestion: Some("use update, or another id".into()),
            });
        }
        self.schemas.schemas.push(schema);
        Ok(())
    }

    /// Replaces the schema with the same id.
    pub fn update(&mut self, schema: SyncSchema) -> Result<(), SchemaError> {
        let slot = self
            .schemas
            .schemas
            .iter_mut()
            .find(|s| s.id == schema.id)
            .ok_or_else(|| SchemaError::InvalidValue {
                schema: schema.id.clone(),
                path: "id".into(),
                value: schema.id.clone(),
                reason: "no schema with this id to update".into(),
                suggestion: Some("use add".into()),
            })?;
        *slot = schema;
        Ok(())
    }

    /// Removes a schema (its metadata and history stay in the state folder).
    pub fn remove(&mut self, id: &str) -> Result<SyncSchema, SchemaError> {
        let at = self
            .schemas
            .schemas
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| self.unknown(id))?;
        Ok(self.schemas.schemas.remove(at))
    }

    /// Writes the schema set to its file, atomically.
    pub fn save(&self) -> Result<(), SchemaError> {
        self.schemas.save(&self.file)
    }

    /// The entities a datasource holds (it is reachable if this works).
    pub fn validate_datasource(&self, name: &str) -> Result<Vec<String>, SchemaError> {
        Ok(self.datasources.open(name)?.entities()?)
    }

    /// An entity's fields (it exists if this works).
    pub fn validate_entity(
        &self,
        datasource: &str,
        entity: &str,
    ) -> Result<EntityInfo, SchemaError> {
        Ok(self.datasources.open(datasource)?.describe(entity)?)
    }

    /// Every problem of one schema against its datasources; empty when it can run.
    /// Reads only the datasources' descriptions.
    pub fn validate_schema(&self, id: &str) -> Vec<SchemaError> {
        let schema = match self.schema(id) {
            Ok(s) => s,
            Err(e) => return vec![e],
        };
        let source = self.validate_entity(&schema.source.datasource, &schema.source.entity);
        let destination =
            self.validate_entity(&schema.destination.datasource, &schema.destination.entity);
        match (source, destination) {
            (Ok(s), Ok(d)) => validate(schema, &s, &d),
            (s, d) => s.err().into_iter().chain(d.err()).collect(),
        }
    }

    /// Pairs the fields of a schema's two entities by name.
    pub fn automap(&self, id: &str) -> Result<AutoMap, SchemaError> {
        let schema = self.schema(id)?;
        let source = self.validate_entity(&schema.source.datasource, &schema.source.entity)?;
        let destination =
            self.validate_entity(&schema.destination.datasource, &schema.destination.entity)?;
        Ok(automap(&source, &destination))
    }

    /// Runs one schema, records it in the history and writes its status back into the
    /// schema file.
    pub fn sync(
        &mut self,
        id: &str,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&RunProgress),
    ) -> Result<RunReport, SchemaError> {
        let schema = self.schema(id)?.clone();
        let report = sync(
            &schema,
            &self.datasources,
            &self.state_dir,
            cancel,
            progress,
        );
        self.write_back(&report)?;
        Ok(report)
    }

    /// Sets the schema's status fields from a report, in memory and in the file.
    fn write_back(&mut self, report: &RunReport) -> Result<(), SchemaError> {
        let stamp = |schema: &mut SyncSchema| {
            schema.status = report.status;
            schema.status_message = report.message.clone();
            if report.status != RunStatus::Failed {
                schema.last_sync = Some(report.ended.clone());
            }
        };
        if let Some(s) = self
            .schemas
            .schemas
            .iter_mut()
            .find(|s| s.id == report.schema)
        {
            stamp(s);
        }
        // The file may have been edited during the run: change only this schema's
        // status in what is on disk now.
        let mut on_disk = if self.file.exists() {
            SchemaSet::load(&self.file)?
        } else {
            self.schemas.clone()
        };
        if let Some(s) = on_disk.schemas.iter_mut().find(|s| s.id == report.schema) {
            stamp(s);
            on_disk.save(&self.file)?;
        }
        Ok(())
    }

    /// The recorded runs of one schema, or of every schema with a history, oldest first.
    pub fn history(&self, id: Option<&str>) -> Result<Vec<RunRecord>, SchemaError> {
        let history = History::new(&self.state_dir, DEFAULT_RETENTION);
        let ids = match id {
            Some(id) => vec![id.to_string()],
            None => history.schemas()?,
        };
        let mut out = Vec::new();
        for id in ids {
            out.extend(history.list(&id)?);
        }
        out.sort_by(|a, b| a.started.cmp(&b.started));
        Ok(out)
    }
}
