//! The `knit` binary: argument parsing and printing over the library, nothing more.
//!
//! Architecture invariant: no sync logic lives here. Every replica command opens replicas
//! with `Replica::open`/`create`, calls one library operation, flushes if it wrote, and
//! prints; every schema command (`run`, `schema ...`, `history`) goes through one
//! `SyncManager`. Defaults for people (direction, policy, batch size, where datasources
//! and state live) are picked here, as style rule 7 asks.
//!
//! Exit status: 0 success; 1 a negative answer (`get`/`del` of a key that is not live,
//! `demo` replicas that did not converge or edits that did not cross, a `run` schema
//! that did not end `success`, a `schema validate` that found problems); 2 any error,
//! usage errors included (clap's code for those). grep and diff split their codes the
//! same way, so a script can tell "no" from "broken".
//!
//! Every error prints exactly one line, `knit: <message>`, on stderr. Library messages
//! already name the folder for metadata errors; other errors get the folder in front.

mod bench;
mod commands;
mod demo;
mod run;
mod schema_cmd;
mod serve;
mod shop_demo;
mod sim;
mod sync;

use std::fmt::Display;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{Parser, Subcommand, ValueEnum};

use crate::model::{ItemId, MAX_CHANGES_PER_BATCH};
use crate::stores::Replica;
use crate::sync::{ConflictPolicy, Direction};

#[derive(Parser, Debug)]
#[command(
    name = "knit",
    version,
    about = "knit: knowledge-based replication of key-value replicas and datasources",
    after_help = "Exit status: 0 success; 1 KEY is not live (get, del), a schema did not \
                  succeed (run), problems found (schema validate) or the demo did not \
                  converge; 2 an error (the message names the file, folder or flag)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing the clap fields would only obscure them"
)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a replica in DIR and print its id
    Init { dir: PathBuf },
    /// Set KEY to VALUE (a new local version)
    Put {
        dir: PathBuf,
        key: String,
        #[arg(allow_hyphen_values = true)]
        value: String,
    },
    /// Print the value of KEY; exit 1 if it is not live
    Get { dir: PathBuf, key: String },
    /// Delete KEY (it leaves a tombstone); exit 1 if it is not live
    Del { dir: PathBuf, key: String },
    /// List live items, one "KEY<TAB>VALUE" line each, sorted by key
    Ls { dir: PathBuf },
    /// Sync a replica with another folder or with a hub's hosted replica
    /// (http://HOST:PORT/replicas/NAME; the bearer token comes from KNIT_TOKEN)
    Sync {
        local: PathBuf,
        remote: PathBuf,
        #[arg(long, value_enum, default_value_t = DirectionArg::UploadAndDownload)]
        direction: DirectionArg,
        #[arg(long, value_enum, default_value_t = PolicyArg::LastWriterWins)]
        policy: PolicyArg,
        /// Most changes per batch
        #[arg(long, value_name = "N", default_value_t = 1000, value_parser = parse_batch_size)]
        batch_size: usize,
        /// Print the statistics as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Run a hub serving hosted replicas over HTTP until Ctrl-C
    Serve {
        /// The hub's config file (listen address, data folder, replicas, tokens)
        #[arg(long, value_name = "HUB.toml")]
        config: PathBuf,
    },
    /// Show the replica's id, tick, items, tombstones and knowledge
    Status {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List saved conflicts
    Conflicts { dir: PathBuf },
    /// Settle the saved conflict of KEY
    Resolve {
        dir: PathBuf,
        key: String,
        #[arg(long, value_enum)]
        take: TakeArg,
    },
    /// Remove tombstones older than DURATION (30s, 15m, 2h, 7d, 0s)
    Gc {
        dir: PathBuf,
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        older_than: u64,
    },
    /// Continue a replica under a new id (after restoring it from an old copy)
    Rekey { dir: PathBuf },
    /// Run the end-to-end benchmark
    Bench {
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        #[arg(long, default_value_t = 100)]
        changes: usize,
        #[arg(long)]
        json: bool,
    },
    /// Run a schema file's schemas: validate each, sync it, print what it did
    Run {
        #[command(flatten)]
        place: schema_cmd::Place,
        /// Run only this schema (repeat for several, run in the order given)
        #[arg(long = "schema", value_name = "ID")]
        schemas: Vec<String>,
        /// Run again every DURATION (30s, 5m, 1h, or seconds) until Ctrl-C
        #[arg(long, value_name = "DURATION", value_parser = run::parse_every)]
        every: Option<std::time::Duration>,
        /// One JSON object per schema and run
        #[arg(long)]
        json: bool,
    },
    /// Add, change, list, check or auto-map the schemas of a schema file
    #[command(subcommand)]
    Schema(schema_cmd::SchemaCommand),
    /// The recorded runs of a schema file's schemas, then their failed rows
    History {
        #[command(flatten)]
        place: schema_cmd::Place,
        /// Only this schema's runs
        #[arg(long = "schema", value_name = "ID")]
        id: Option<String>,
        /// One JSON object per run
        #[arg(long)]
        json: bool,
    },
    /// A SQLite table and a CSV export kept in step (--engine: three replicas converge)
    Demo {
        /// Where to put the demo's files (default: a new folder in the temp dir)
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The engine demo: three key-value replicas instead of the shop example
        #[arg(long)]
        engine: bool,
    },
    /// Run a simulation scenario (TOML) over real replicas; exit 1 on a violation
    Sim(sim::SimCommand),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DirectionArg {
    Upload,
    Download,
    UploadAndDownload,
    DownloadAndUpload,
}

impl From<DirectionArg> for Direction {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Upload => Direction::Upload,
            DirectionArg::Download => Direction::Download,
            DirectionArg::UploadAndDownload => Direction::UploadAndDownload,
            DirectionArg::DownloadAndUpload => Direction::DownloadAndUpload,
        }
    }
}

// The variant names are the flag values (`source-wins`, ...), so they share a postfix.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    SourceWins,
    DestinationWins,
    LastWriterWins,
}

impl From<PolicyArg> for ConflictPolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::SourceWins => ConflictPolicy::SourceWins,
            PolicyArg::DestinationWins => ConflictPolicy::DestinationWins,
            PolicyArg::LastWriterWins => ConflictPolicy::LastWriterWins,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TakeArg {
    Local,
    Remote,
}

/// Why a command did not succeed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A negative answer, not a fault (exit 1): the key is not live, the demo diverged.
    Negative(String),
    /// Anything that went wrong (exit 2).
    Error(String),
    /// stdout was closed under us (`knit ls | head`): stop quietly.
    OutputClosed,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure::OutputClosed
        } else {
            Failure::Error(format!("cannot write output: {e}"))
        }
    }
}

type CliResult = Result<(), Failure>;

/// The last panic message, kept by the panic hook so a panic becomes one line.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Runs the `knit` command line and returns its exit status.
pub fn run() -> ExitCode {
    // The default hook prints several lines, and sled's recovery may panic inside a
    // `catch_unwind` of the metadata layer that turns it into an error: record the
    // message instead and print it only if the panic reaches us.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(format!("{message}{location}"));
        }
    }));
    let outcome = std::panic::catch_unwind(|| {
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) => return usage_error(&e),
        };
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let result = dispatch(cli.command, &mut out).and_then(|()| Ok(out.flush()?));
        match result {
            Ok(()) | Err(Failure::OutputClosed) => ExitCode::SUCCESS,
            Err(Failure::Negative(message)) => {
                eprintln!("knit: {message}");
                ExitCode::from(1)
            }
            Err(Failure::Error(message)) => {
                eprintln!("knit: {message}");
                ExitCode::from(2)
            }
        }
    });
    outcome.unwrap_or_else(|_| {
        let message = LAST_PANIC
            .lock()
            .ok()
            .and_then(|mut m| m.take())
            .unwrap_or_else(|| "panic".into());
        eprintln!("knit: internal error: {message}");
        ExitCode::from(2)
    })
}

/// Prints help and version as clap does; any other parse error as one line.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let code = u8::try_from(e.exit_code()).unwrap_or(2);
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(code);
    }
    // clap's message spans lines (the error, possible values, a tip, the usage);
    // keep everything before the usage on one line.
    let rendered = e.render().to_string();
    let line = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    eprintln!("knit: {line} (see `knit --help`)");
    ExitCode::from(code)
}

fn dispatch(command: Command, out: &mut dyn Write) -> CliResult {
    match command {
        Command::Init { dir } => commands::init(&dir, out),
        Command::Put { dir, key, value } => commands::put(&dir, &key, &value),
        Command::Get { dir, key } => commands::get(&dir, &key, out),
        Command::Del { dir, key } => commands::del(&dir, &key),
        Command::Ls { dir } => commands::ls(&dir, out),
        Command::Sync {
            local,
            remote,
            direction,
            policy,
            batch_size,
            json,
        } => sync::sync(
            &local,
            &remote,
            &sync::SyncArgs {
                direction: direction.into(),
                policy: policy.into(),
                batch_size,
                json,
            },
            out,
        ),
        Command::Serve { config } => serve::serve(&config, out),
        Command::Status { dir, json } => commands::status(&dir, json, out),
        Command::Conflicts { dir } => commands::conflicts(&dir, out),
        Command::Resolve { dir, key, take } => commands::resolve(
            &dir,
            &key,
            match take {
                TakeArg::Local => crate::stores::Take::Local,
                TakeArg::Remote => crate::stores::Take::Remote,
            },
        ),
        Command::Gc { dir, older_than } => commands::gc(&dir, older_than, out),
        Command::Rekey { dir } => commands::rekey(&dir, out),
        Command::Bench {
            items,
            changes,
            json,
        } => {
            let report = bench::run(&bench::BenchOptions { items, changes })
                .map_err(|e| Failure::Error(format!("bench: {e}")))?;
            if json {
                writeln!(out, "{}", report.to_json())?;
            } else {
                write!(out, "{}", report.table())?;
            }
            Ok(())
        }
        Command::Run {
            place,
            schemas,
            every,
            json,
        } => run::run(
            &run::RunArgs {
                place,
                schemas,
                every,
                json,
            },
            out,
        ),
        Command::Schema(command) => schema_cmd::dispatch(command, out),
        Command::History { place, id, json } => {
            schema_cmd::history(&place, id.as_deref(), json, out)
        }
        Command::Demo { dir, engine: true } => demo::demo(dir, out),
        Command::Demo { dir, engine: false } => shop_demo::demo(dir, out),
        Command::Sim(command) => sim::sim(command, out),
    }
}

/// An error about `dir`, with the folder in front unless the message names it already.
fn in_dir(dir: &Path, e: impl Display) -> Failure {
    let message = e.to_string();
    let folder = dir.display().to_string();
    if message.contains(&folder) {
        Failure::Error(message)
    } else {
        Failure::Error(format!("{folder}: {message}"))
    }
}

fn open(dir: &Path) -> Result<Replica, Failure> {
    Replica::open(dir).map_err(|e| in_dir(dir, e))
}

/// Makes a written change durable before the process exits.
fn flush(replica: &mut Replica, dir: &Path) -> CliResult {
    replica.flush().map_err(|e| in_dir(dir, e))
}

fn item_id(dir: &Path, key: &str) -> Result<ItemId, Failure> {
    ItemId::try_from(key).map_err(|e| in_dir(dir, e))
}

/// Item data as people read it: the text, or `(N bytes)` if it is not UTF-8.
fn show_value(value: Option<&[u8]>) -> String {
    match value {
        None => "(deleted)".into(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => format!("{text:?}"),
            Err(_) => format!("({} bytes)", bytes.len()),
        },
    }
}

fn parse_batch_size(text: &str) -> Result<usize, String> {
    let n: usize = text
        .parse()
        .map_err(|_| format!("expected a whole number from 1 to {MAX_CHANGES_PER_BATCH}"))?;
    if n == 0 || n > MAX_CHANGES_PER_BATCH {
        return Err(format!("must be from 1 to {MAX_CHANGES_PER_BATCH}"));
    }
    Ok(n)
}

/// `30s`, `15m`, `2h`, `7d` (and `0s`) in milliseconds.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let bad =
        || format!("expected a number followed by s, m, h or d (30s, 15m, 2h, 7d), not {text:?}");
    let split = text.len().saturating_sub(1);
    let (number, unit) = (
        text.get(..split).ok_or_else(bad)?,
        text.get(split..).ok_or_else(bad)?,
    );
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seconds_per_unit: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds_per_unit))
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| format!("{text:?} is too long a duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_a_unit() {
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("15m"), Ok(900_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        for bad in [
            "",
            "s",
            "5",
            "5x",
            "-5s",
            "1.5h",
            "5 s",
            "99999999999999999999d",
            "é",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn batch_size_is_bounded() {
        assert_eq!(parse_batch_size("1"), Ok(1));
        assert!(parse_batch_size("0").is_err());
        assert!(parse_batch_size("65537").is_err());
        assert!(parse_batch_size("ten").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
