//! `knit serve --config HUB.toml`: runs the hub until Ctrl-C or SIGTERM, then shuts it
//! down gracefully (in-flight batches finish, open sessions roll back, replicas flush).

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

use super::{CliResult, Failure};
use crate::hub::{HubConfig, RunningHub};

pub(super) fn serve(config_path: &Path, out: &mut dyn Write) -> CliResult {
    let config = HubConfig::load(config_path).map_err(|e| Failure::Error(e.to_string()))?;
    let replicas = config.replicas.join(", ");
    let (tx, rx) = mpsc::channel::<()>();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .map_err(|e| Failure::Error(format!("cannot install the Ctrl-C handler: {e}")))?;
    let hub = RunningHub::start(config).map_err(|e| Failure::Error(e.to_string()))?;
    writeln!(
        out,
        "knit hub listening on http://{} (replicas: {}); status page at /, metrics at /metrics",
        hub.addr(),
        if replicas.is_empty() {
            "none"
        } else {
            &replicas
        }
    )?;
    out.flush()?;
    let _ = rx.recv();
    eprintln!("knit serve: stopping: letting in-flight requests finish");
    hub.shutdown().map_err(|e| Failure::Error(e.to_string()))
}
