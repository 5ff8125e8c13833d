//! The status page at `/`: hosted replicas with a knowledge summary and their saved
//! conflicts, open sessions, and the most recent finished sessions.
//!
//! The page costs what the hub holds in memory plus each replica's saved conflicts: it
//! never scans items, so it stays cheap on a large hub. Everything shown is escaped;
//! token values are never shown (sessions name the token by its config name).

use std::fmt::Write;

use super::server::{now_ms, HubState};

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(then_ms: u64) -> String {
    let secs = now_ms().saturating_sub(then_ms) / 1000;
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

pub(super) fn render(hub: &HubState) -> String {
    let mut html = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>knit hub</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;\
         padding:.3em .6em;text-align:left}code{font-size:90%}</style></head><body>\n\
         <h1>knit hub</h1>\n<h2>Replicas</h2>\n<table id=\"replicas\"><tr><th>name</th>\
         <th>id</th><th>tick</th><th>knows replicas</th><th>exceptions</th>\
         <th>saved conflicts</th><th>session</th></tr>\n",
    );
    let mut conflicts_html = String::new();
    for hosted in hub.replicas.values() {
        let mut state = hosted.lock();
        // With shared storage another hub process may have committed since.
        let reload = if hub.leases.is_some() && state.slot.is_none() {
            state
                .replica
                .reload()
                .err()
                .map(|e| format!(" (stale: {e})"))
        } else {
            None
        };
        let replica = &state.replica;
        let knowledge = replica.knowledge();
        let saved = replica.saved_conflicts();
        let saved_count = saved
            .as_ref()
            .map_or_else(|e| format!("error: {e}"), |s| s.len().to_string());
        let session = state.slot.as_ref().map_or_else(
            || "idle".to_string(),
            |s| format!("{} as {} for {}", s.token(), s.role().as_str(), s.peer()),
        );
        let _ = writeln!(
            html,
            "<tr class=\"replica\"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&format!("{}{}", hosted.name, reload.unwrap_or_default())),
            replica.id(),
            replica.tick(),
            knowledge.replicas().len(),
            knowledge.exception_count(),
            escape(&saved_count),
            escape(&session)
        );
        for conflict in saved.iter().flatten() {
            let _ = writeln!(
                conflicts_html,
                "<tr class=\"conflict\"><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
                escape(&hosted.name),
                escape(&String::from_utf8_lossy(conflict.remote.item.as_bytes())),
                format_args!(
                    "{}:{}",
                    conflict.remote.version.replica, conflict.remote.version.tick
                )
            );
        }
    }
    html.push_str("</table>\n<h2>Saved conflicts</h2>\n");
    if conflicts_html.is_empty() {
        html.push_str("<p id=\"no-conflicts\">none</p>\n");
    } else {
        html.push_str(
            "<table id=\"conflicts\"><tr><th>replica</th><th>item</th><th>remote version</th></tr>\n",
        );
        html.push_str(&conflicts_html);
        html.push_str("</table>\n");
    }
    html.push_str(
        "<h2>Recent sessions</h2>\n<table id=\"sessions\"><tr><th>replica</th><th>token</th>\
         <th>peer</th><th>hub as</th><th>ended</th><th>took</th><th>changes</th>\
         <th>conflicts</th><th>outcome</th></tr>\n",
    );
    let recent = hub.recent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for s in recent.iter().rev() {
        let _ = writeln!(
            html,
            "<tr class=\"session\"><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td>\
             <td>{}</td><td>{} ms</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&s.replica),
            escape(&s.token),
            s.peer,
            s.role.as_str(),
            ago(s.ended_ms),
            s.ended_ms.saturating_sub(s.started_ms),
            s.changes,
            s.conflicts,
            s.outcome
        );
    }
    html.push_str("</table>\n<p><a href=\"/metrics\">metrics</a></p>\n</body></html>\n");
    html
}
