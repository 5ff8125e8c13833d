//! The metadata store on PostgreSQL: every hosted replica's records in one table, so
//! several hub processes can serve one dataset.
//!
//! ```sql
//! knit_metadata (replica text, key bytea, value bytea, primary key (replica, key))
//! knit_leases   (replica text primary key, session bytea, holder text, expires_at timestamptz)
//! ```
//!
//! Invariants:
//! - A batch is one transaction: all of its writes or none (PostgreSQL's atomic commit
//!   replaces sled's atomic batch); a committed transaction is durable, so `flush` has
//!   nothing left to do.
//! - `bytea` compares bytewise, so ranges scan in the same order as sled's.
//! - Fencing: a backend whose fence is set writes only while the lease row of its
//!   replica still names the fence's session, checked under `FOR UPDATE` inside the
//!   batch's transaction. A process whose lease another process took over therefore
//!   cannot commit, and a takeover waits for a commit in flight to finish.

use std::ops::Bound;
use std::sync::Mutex;

use postgres::{Client, Config, NoTls};

use super::backend::{owned, Backend, BackendError, Bytes, Lookup, Scan, WriteBatch};
use super::MetadataError;

/// The advisory lock key that serialises creating knit's tables ("knit" in ASCII).
const SCHEMA_LOCK: i64 = 0x6b6e_6974;

/// Rows read per round trip of a range scan.
const PAGE: i64 = 512;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS knit_metadata (
        replica text NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (replica, key)
    );
    CREATE TABLE IF NOT EXISTS knit_leases (
        replica text PRIMARY KEY,
        session bytea NOT NULL,
        holder text NOT NULL,
        expires_at timestamptz NOT NULL
    );";

/// Opens a connection and creates knit's tables if they are missing (concurrent
/// creators are serialised by an advisory lock: `CREATE TABLE IF NOT EXISTS` alone
/// races on PostgreSQL's catalog).
pub fn connect(conninfo: &str) -> Result<Client, BackendError> {
    let config: Config = conninfo.parse()?;
    let mut client = config.connect(NoTls)?;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    tx.batch_execute(SCHEMA)?;
    tx.commit()?;
    Ok(client)
}

/// One replica's records in the shared table.
pub struct PostgresBackend {
    client: Mutex<Client>,
    replica: String,
    location: String,
    fence: Mutex<Option<Vec<u8>>>,
}

impl PostgresBackend {
    /// `location` names the database for messages (never a password).
    pub fn new(client: Client, replica: &str, location: String) -> Self {
        Self {
            client: Mutex::new(client),
            replica: replica.to_string(),
            location,
            fence: Mutex::new(None),
        }
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        // A panic while holding the connection leaves no half-done transaction: the
        // transaction object rolls back when it is dropped.
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the replica has any record (its replica record is written first).
    pub fn holds_replica(&self) -> Result<bool, BackendError> {
        let row = self.client().query_opt(
            "SELECT 1 FROM knit_metadata WHERE replica = $1 LIMIT 1",
            &[&self.replica],
        )?;
        Ok(row.is_some())
    }

    fn page(
        &self,
        from: &Bound<Vec<u8>>,
        to: &Bound<Vec<u8>>,
    ) -> Result<Vec<(Bytes, Bytes)>, BackendError> {
        let (lower_op, lower): (&str, &[u8]) = match from {
            Bound::Included(k) => (">=", k),
            Bound::Excluded(k) => (">", k),
            Bound::Unbounded => (">=", &[]),
        };
        let (upper_op, upper): (&str, Option<&[u8]>) = match to {
            Bound::Included(k) => ("<=", Some(k)),
            Bound::Excluded(k) => ("<", Some(k)),
            Bound::Unbounded => ("<", None),
        };
        let mut client = self.client();
        let rows = match upper {
            Some(upper) => client.query(
                &format!(
                    "SELECT key, value FROM knit_metadata WHERE replica = $1 \
                     AND key {lower_op} $2 AND key {upper_op} $3 ORDER BY key LIMIT $4"
                ),
                &[&self.replica, &lower, &upper, &PAGE],
            )?,
            None => client.query(
                &format!(
                    "SELECT key, value FROM knit_metadata WHERE replica = $1 \
                     AND key {lower_op} $2 ORDER BY key LIMIT $3"
                ),
                &[&self.replica, &lower, &PAGE],
            )?,
        };
        Ok(rows
            .into_iter()
            .map(|row| {
                let key: Vec<u8> = row.get(0);
                let value: Vec<u8> = row.get(1);
                (Bytes::from(key), Bytes::from(value))
            })
            .collect())
    }
}

impl Backend for PostgresBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, BackendError> {
        let row = self.client().query_opt(
            "SELECT value FROM knit_metadata WHERE replica = $1 AND key = $2",
            &[&self.replica, &key],
        )?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    fn last_at_or_before(
        &self,
        floor: &[u8],
        key: &[u8],
    ) -> Result<Option<(Bytes, Bytes)>, BackendError> {
        let row = self.client().query_opt(
            "SELECT key, value FROM knit_metadata WHERE replica = $1 \
             AND key >= $2 AND key <= $3 ORDER BY key DESC LIMIT 1",
            &[&self.replica, &floor, &key],
        )?;
        Ok(row.map(|r| {
            (
                Bytes::from(r.get::<_, Vec<u8>>(0)),
                Bytes::from(r.get::<_, Vec<u8>>(1)),
            )
        }))
    }

    fn get_or_last_at_or_before(
        &self,
        exact: &[u8],
        floor: &[u8],
        key: &[u8],
    ) -> Result<Lookup, BackendError> {
        let rows = self.client().query(
            "(SELECT key, value FROM knit_metadata WHERE replica = $1 AND key = $2) \
             UNION ALL \
             (SELECT key, value FROM knit_metadata WHERE replica = $1 \
              AND key >= $3 AND key <= $4 ORDER BY key DESC LIMIT 1)",
            &[&self.replica, &exact, &floor, &key],
        )?;
        let mut before = None;
        for row in rows {
            let (k, v): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
            if k == exact {
                return Ok(Lookup::Exact(Bytes::from(v)));
            }
            before = Some((Bytes::from(k), Bytes::from(v)));
        }
        Ok(before.map_or(Lookup::Nothing, |(k, v)| Lookup::Before(k, v)))
    }

    fn first_key_after(&self, key: &[u8], end: &[u8]) -> Result<Option<Bytes>, BackendError> {
        let row = self.client().query_opt(
            "SELECT key FROM knit_metadata WHERE replica = $1 \
             AND key > $2 AND key < $3 ORDER BY key LIMIT 1",
            &[&self.replica, &key, &end],
        )?;
        Ok(row.map(|r| Bytes::from(r.get::<_, Vec<u8>>(0))))
    }

    fn range(&self, from: Bound<&[u8]>, to: Bound<&[u8]>) -> Scan<'_> {
        let to = owned(to);
        let mut from = owned(from);
        let mut buffered = std::collections::VecDeque::new();
        let mut done = false;
        Box::new(std::iter::from_fn(move || {
            if buffered.is_empty() && !done {
                match self.page(&from, &to) {
                    Ok(rows) => {
                        done = (rows.len() as i64) < PAGE;
                        if let Some((last, _)) = rows.last() {
                            from = Bound::Excluded(last.to_vec());
                        }
                        buffered.extend(rows);
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                }
            }
            buffered.pop_front().map(Ok)
        }))
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let fence = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut puts_k: Vec<Vec<u8>> = Vec::new();
        let mut puts_v: Vec<Vec<u8>> = Vec::new();
        let mut removes: Vec<Vec<u8>> = Vec::new();
        for (key, value) in batch.into_writes() {
            match value {
                Some(v) => {
                    puts_k.push(key);
                    puts_v.push(v.to_vec());
                }
                None => removes.push(key),
            }
        }
        let mut client = self.client();
        let mut tx = client.transaction()?;
        if let Some(session) = fence {
            let held = tx.query_opt(
                "SELECT 1 FROM knit_leases WHERE replica = $1 AND session = $2 FOR UPDATE",
                &[&self.replica, &session],
            )?;
            if held.is_none() {
                return Err(format!(
                    "replica {}: this process's lease was taken over by another hub \
                     process; the batch was not written",
                    self.replica
                )
                .into());
            }
        }
        if !removes.is_empty() {
            tx.execute(
                "DELETE FROM knit_metadata WHERE replica = $1 AND key = ANY($2)",
                &[&self.replica, &removes],
            )?;
        }
        if !puts_k.is_empty() {
            tx.execute(
                "INSERT INTO knit_metadata (replica, key, value) \
                 SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v) \
                 ON CONFLICT (replica, key) DO UPDATE SET value = excluded.value",
                &[&self.replica, &puts_k, &puts_v],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn set_fence(&self, session: Option<Vec<u8>>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = session;
    }
}

/// Leases that give one hub process a hosted replica for the length of a session.
/// A lease row per replica: taken when free or expired, renewed by every request of
/// the session, deleted at its end. Its own connection, so that taking or renewing a
/// lease never waits behind a batch in flight on the replica's connection.
pub struct Leases {
    client: Mutex<Client>,
}

impl Leases {
    pub fn new(client: Client) -> Self {
        Self {
            client: Mutex::new(client),
        }
    }

    /// Connects (creating knit's tables if they are missing).
    pub fn connect(conninfo: &str) -> Result<Self, MetadataError> {
        Ok(Self::new(
            connect(conninfo).map_err(|e| lease_error("(connecting)", e))?,
        ))
    }

    /// Takes the replica's lease for `session` unless another holder's lease is still
    /// running; true when taken. Expired leases are taken over.
    pub fn acquire(
        &self,
        replica: &str,
        session: &[u8],
        holder: &str,
        ttl_secs: u64,
    ) -> Result<bool, MetadataError> {
        let ttl = ttl_secs as f64;
        let row = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .query_opt(
                "INSERT INTO knit_leases (replica, session, holder, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
             ON CONFLICT (replica) DO UPDATE \
               SET session = excluded.session, holder = excluded.holder, \
                   expires_at = excluded.expires_at \
               WHERE knit_leases.expires_at < now() \
             RETURNING 1",
                &[&replica, &session, &holder, &ttl],
            )
            .map_err(|e| lease_error(replica, Box::new(e)))?;
        Ok(row.is_some())
    }

    /// Extends the lease of `session`; false when it is no longer this session's.
    pub fn renew(
        &self,
        replica: &str,
        session: &[u8],
        ttl_secs: u64,
    ) -> Result<bool, MetadataError> {
        let ttl = ttl_secs as f64;
        let n = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute(
                "UPDATE knit_leases SET expires_at = now() + make_interval(secs => $3) \
             WHERE replica = $1 AND session = $2",
                &[&replica, &session, &ttl],
            )
            .map_err(|e| lease_error(replica, Box::new(e)))?;
        Ok(n == 1)
    }

    /// Gives the lease up (a no-op when another session holds it by now).
    pub fn release(&self, replica: &str, session: &[u8]) -> Result<(), MetadataError> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute(
                "DELETE FROM knit_leases WHERE replica = $1 AND session = $2",
                &[&replica, &session],
            )
            .map_err(|e| lease_error(replica, Box::new(e)))?;
        Ok(())
    }
}

fn lease_error(replica: &str, source: BackendError) -> MetadataError {
    MetadataError::Storage {
        path: format!("PostgreSQL lease of replica {replica}").into(),
        source,
    }
}
