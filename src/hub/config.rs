//! The hub's configuration file (TOML), read once at start.
//!
//! ```toml
//! listen = "127.0.0.1:7700"
//! data = "hub-data"              # relative to this file's folder (sled storage)
//! [storage]                      # optional; the default is sled folders under `data`
//! kind = "postgres"              # several hub processes may serve one database
//! conninfo_env = "KNIT_HUB_PG"   # or conninfo = "host=... dbname=..."
//! session_timeout_secs = 30      # an idle session is ended (rolled back) after this
//! request_timeout_secs = 60      # one request, body upload included
//! max_body_bytes = 67108864
//! max_batch_changes = 10000      # changes per batch, both ways
//!
//! [replicas.notes]               # hosted replica, in DATA/notes, created at start
//! conflicts = "client"           # client | source_wins | destination_wins | last_writer_wins | save
//!
//! [tokens.alice-phone]
//! token_env = "KNIT_TOKEN_ALICE" # or token = "..." in the file itself
//! read = ["notes"]
//! write = ["notes"]
//! replica_ids = ["5f0c7a8e-..."] # the replica ids this token may sync as
//! ```
//!
//! Unknown keys are errors (a misspelt `raed` would silently grant nothing). Every
//! error names the file and the key at fault; a token's value never appears in one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::protocol::MAX_BODY_BYTES;
use super::HubError;
use crate::model::{ReplicaId, MAX_CHANGES_PER_BATCH};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    data: Option<PathBuf>,
    #[serde(default)]
    storage: Option<RawStorage>,
    #[serde(default = "default_session_timeout")]
    session_timeout_secs: u64,
    #[serde(default = "default_request_timeout")]
    request_timeout_secs: u64,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_max_batch")]
    max_batch_changes: usize,
    #[serde(default)]
    replicas: BTreeMap<String, RawReplica>,
    #[serde(default)]
    tokens: BTreeMap<String, RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    kind: String,
    conninfo: Option<String>,
    conninfo_env: Option<String>,
}

/// Where hosted replicas keep their metadata and data.
#[derive(Clone)]
pub enum Storage {
    /// One sled folder per replica under the data folder (the embedded default).
    Sled,
    /// One shared PostgreSQL database: several hub processes may serve it at once.
    Postgres { conninfo: String },
}

impl std::fmt::Debug for Storage {
    // By hand: a connection string may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Sled => f.write_str("Sled"),
            Storage::Postgres { .. } => f.write_str("Postgres { conninfo: <redacted> }"),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    conflicts: Option<String>,
}

/// How a hosted replica settles conflicts in uploads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadConflicts {
    /// The policy the client asks for (the default).
    Client,
    SourceWins,
    DestinationWins,
    LastWriterWins,
    /// Keep the hub's version and save the conflict for a person to settle: it is
    /// listed on the status page and resolved with `knit resolve` on the hub's folder.
    Save,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    token: Option<String>,
    token_env: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    replica_ids: Vec<String>,
}

fn default_session_timeout() -> u64 {
    30
}
fn default_request_timeout() -> u64 {
    60
}
fn default_max_body() -> usize {
    MAX_BODY_BYTES
}
fn default_max_batch() -> usize {
    10_000
}

/// What a token may do.
#[derive(Clone)]
pub struct TokenGrant {
    /// The token's name in the config: what logs and the status page show.
    pub name: String,
    pub secret: String,
    pub read: BTreeSet<String>,
    pub write: BTreeSet<String>,
    /// The replica ids the token may present as its own and teach the hub about.
    pub replica_ids: BTreeSet<ReplicaId>,
}

impl std::fmt::Debug for TokenGrant {
    // By hand, so that printing a config never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenGrant")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .field("read", &self.read)
            .field("write", &self.write)
            .field("replica_ids", &self.replica_ids)
            .finish()
    }
}

/// A checked hub configuration.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub listen: SocketAddr,
    /// The sled folders' parent (unused with PostgreSQL storage).
    pub data: PathBuf,
    pub storage: Storage,
    pub session_timeout: Duration,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_batch_changes: usize,
    pub replicas: Vec<String>,
    /// How each hosted replica settles conflicts in uploads (absent: `Client`).
    pub upload_conflicts: BTreeMap<String, UploadConflicts>,
    pub tokens: Vec<TokenGrant>,
}

/// A hosted replica's name: it is a folder name and a URL path segment.
pub fn check_replica_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("replica name {name:?} must be 1 to 64 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "replica name {name:?} may hold only letters, digits, `-` and `_`"
        ));
    }
    Ok(())
}

impl HubConfig {
    /// Reads and checks `path`; environment variables named by `token_env` are read here.
    pub fn load(path: &Path) -> Result<Self, HubError> {
        let text = std::fs::read_to_string(path).map_err(|source| HubError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` looks up environment variables (tests pass their own).
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, HubError> {
        let bad = |key: &str, message: String| HubError::Config {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| HubError::Config {
            path: path.to_path_buf(),
            key: String::new(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            bad(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:7700", raw.listen),
            )
        })?;
        let storage = match raw.storage {
            None => Storage::Sled,
            Some(st) => match (st.kind.as_str(), st.conninfo, st.conninfo_env) {
                ("sled", None, None) => Storage::Sled,
                ("postgres", Some(conninfo), None) => Storage::Postgres { conninfo },
                ("postgres", None, Some(var)) => Storage::Postgres {
                    conninfo: env(&var).ok_or_else(|| {
                        bad(
                            "storage.conninfo_env",
                            format!("environment variable {var} is not set"),
                        )
                    })?,
                },
                ("postgres", _, _) => {
                    return Err(bad(
                        "storage",
                        "give exactly one of `conninfo` and `conninfo_env`".into(),
                    ))
                }
                ("sled", _, _) => {
                    return Err(bad("storage", "sled storage takes no connection".into()))
                }
                (other, _, _) => {
                    return Err(bad(
                        "storage.kind",
                        format!("{other:?} is not one of sled, postgres"),
                    ))
                }
            },
        };
        let data = match (raw.data, &storage) {
            (Some(data), _) if data.is_absolute() => data,
            (Some(data), _) => path.parent().unwrap_or(Path::new(".")).join(data),
            (None, Storage::Postgres { .. }) => PathBuf::new(),
            (None, Storage::Sled) => {
                return Err(bad(
                    "data",
                    "missing: the folder that holds the hosted replicas".into(),
                ))
            }
        };
        if raw.session_timeout_secs == 0 || raw.request_timeout_secs == 0 {
            return Err(bad(
                "session_timeout_secs",
                "timeouts must be at least one second".into(),
            ));
        }
        if raw.max_body_bytes < 1024 || raw.max_body_bytes > MAX_BODY_BYTES {
            return Err(bad(
                "max_body_bytes",
                format!("{} is outside 1024..={MAX_BODY_BYTES}", raw.max_body_bytes),
            ));
        }
        if raw.max_batch_changes == 0 || raw.max_batch_changes > MAX_CHANGES_PER_BATCH {
            return Err(bad(
                "max_batch_changes",
                format!(
                    "{} is outside 1..={MAX_CHANGES_PER_BATCH}",
                    raw.max_batch_changes
                ),
            ));
        }
        let mut replicas = Vec::new();
        let mut upload_conflicts = BTreeMap::new();
        for (name, replica) in &raw.replicas {
            check_replica_name(name).map_err(|m| bad(&format!("replicas.{name}"), m))?;
            replicas.push(name.clone());
            let policy = match replica.conflicts.as_deref() {
                None | Some("client") => UploadConflicts::Client,
                Some("source_wins") => UploadConflicts::SourceWins,
                Some("destination_wins") => UploadConflicts::DestinationWins,
                Some("last_writer_wins") => UploadConflicts::LastWriterWins,
                Some("save") => UploadConflicts::Save,
                Some(other) => {
                    return Err(bad(
                        &format!("replicas.{name}.conflicts"),
                        format!(
                            "{other:?} is not one of client, source_wins, destination_wins, \
                             last_writer_wins, save"
                        ),
                    ))
                }
            };
            upload_conflicts.insert(name.clone(), policy);
        }
        let mut tokens = Vec::new();
        let mut secrets = BTreeSet::new();
        for (name, t) in raw.tokens {
            let key = format!("tokens.{name}");
            let secret = match (t.token, t.token_env) {
                (Some(s), None) => s,
                (None, Some(var)) => env(&var).ok_or_else(|| {
                    bad(
                        &format!("{key}.token_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?,
                _ => {
                    return Err(bad(
                        &key,
                        "give exactly one of `token` and `token_env`".into(),
                    ))
                }
            };
            if secret.len() < 16 {
                return Err(bad(
                    &key,
                    "the token is shorter than 16 characters; use a long random one".into(),
                ));
            }
            if !secrets.insert(secret.clone()) {
                return Err(bad(&key, "two tokens have the same value".into()));
            }
            for (field, list) in [("read", &t.read), ("write", &t.write)] {
                if let Some(unknown) = list.iter().find(|r| !raw.replicas.contains_key(*r)) {
                    return Err(bad(
                        &format!("{key}.{field}"),
                        format!("names replica {unknown:?}, which no [replicas.*] table hosts"),
                    ));
                }
            }
            let mut replica_ids = BTreeSet::new();
            for id in &t.replica_ids {
                let parsed = ReplicaId::parse(id).ok_or_else(|| {
                    bad(
                        &format!("{key}.replica_ids"),
                        format!("{id:?} is not a replica id"),
                    )
                })?;
                replica_ids.insert(parsed);
            }
            tokens.push(TokenGrant {
                name,
                secret,
                read: t.read.into_iter().collect(),
                write: t.write.into_iter().collect(),
                replica_ids,
            });
        }
        Ok(Self {
            listen,
            data,
            storage,
            session_timeout: Duration::from_secs(raw.session_timeout_secs),
            request_timeout: Duration::from_secs(raw.request_timeout_secs),
            max_body_bytes: raw.max_body_bytes,
            max_batch_changes: raw.max_batch_changes,
            replicas,
            upload_conflicts,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
data = "hub"
[replicas.notes]
[tokens.alice]
token_env = "ALICE"
read = ["notes"]
write = ["notes"]
replica_ids = ["00000000-0000-0000-0000-000000000001"]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "ALICE").then(|| "a-long-secret-value-1".to_string())
    }

    #[test]
    fn a_config_names_replicas_tokens_and_resolves_data_beside_the_file() {
        let c = HubConfig::parse(GOOD, Path::new("/etc/knit/hub.toml"), env).unwrap();
        assert_eq!(c.data, Path::new("/etc/knit/hub"));
        assert_eq!(c.replicas, vec!["notes".to_string()]);
        assert_eq!(c.tokens[0].secret, "a-long-secret-value-1");
        assert_eq!(c.tokens[0].replica_ids.len(), 1);
    }

    #[test]
    fn every_bad_config_names_its_key_and_never_the_secret() {
        let cases = [
            (GOOD.replace("read", "raed"), "raed"),
            (
                GOOD.replace("[\"notes\"]\nwrite", "[\"todo\"]\nwrite"),
                "tokens.alice.read",
            ),
            (GOOD.replace("ALICE", "BOB"), "BOB is not set"),
            (GOOD.replace("127.0.0.1:0", "localhost"), "listen"),
            (
                GOOD.replace("-000000000001", "-xyz"),
                "tokens.alice.replica_ids",
            ),
            (
                GOOD.replace("[replicas.notes]", "[replicas.\"a/b\"]"),
                "replicas.a/b",
            ),
        ];
        for (text, needle) in cases {
            let err = HubConfig::parse(&text, Path::new("hub.toml"), env)
                .unwrap_err()
                .to_string();
            assert!(err.contains("hub.toml"), "{err}");
            assert!(err.contains(needle), "{needle}: {err}");
            assert!(!err.contains("a-long-secret"), "{err}");
        }
        let config = HubConfig::parse(GOOD, Path::new("hub.toml"), env).unwrap();
        assert!(!format!("{config:?}").contains("a-long-secret"));
        let short = GOOD.replace("token_env = \"ALICE\"", "token = \"short\"");
        let err = HubConfig::parse(&short, Path::new("hub.toml"), env).unwrap_err();
        assert!(err.to_string().contains("shorter than 16"), "{err}");
        assert!(!err.to_string().contains("\"short\""), "{err}");
    }
}
