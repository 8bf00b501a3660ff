//! A third-party monitor built only on vibee-sdk: every request event as one JSON object per
//! line, appended to a file. Configuration: the file's path.
//!
//! A line: `{"event":"token","seq":4294967296,"step":3,"token":17,"count":3,"detail":""}`;
//! `event` is one of admitted, token, finished, failed, flagged.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};

use vibee_sdk::{Event, EventKind, Monitor, PanicPolicy};

struct JsonLines {
    out: LineWriter<File>,
}

impl JsonLines {
    fn new(config: &str) -> Result<Self, String> {
        let path = config.trim();
        if path.is_empty() {
            return Err(
                "jsonl-monitor's configuration is the path of the file to append to".into(),
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        Ok(Self {
            out: LineWriter::new(file),
        })
    }
}

impl Monitor for JsonLines {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), String> {
        let kind = match event.kind {
            EventKind::Admitted => "admitted",
            EventKind::Token => "token",
            EventKind::Finished => "finished",
            EventKind::Failed => "failed",
            EventKind::Flagged => "flagged",
        };
        let line = serde_json::json!({
            "event": kind,
            "seq": event.seq,
            "step": event.step,
            "token": event.token,
            "count": event.count,
            "detail": event.detail.as_str(),
        });
        writeln!(self.out, "{line}").map_err(|e| format!("cannot write the event log: {e}"))
    }
}

vibee_sdk::export_plugin! {
    name: "jsonl-monitor",
    spec: "v2640",
    family: "observability",
    summary: "Appends every request event (admitted, token, finished, failed, flagged) to a JSON-lines file",
    on_panic: PanicPolicy::SkipPlugin,
    conformance: include_str!("../conformance.ron"),
    monitor: JsonLines::new,
}
