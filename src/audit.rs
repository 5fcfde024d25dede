//! The audit log: exactly one JSON line per decision, a product output of its own (not the
//! debug log). Lines go to a file with size-based rotation and, optionally, to stdout (the
//! journal under systemd). A line is written whole under one lock, so rotation never splits or
//! drops a line.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::metrics::Metrics;
use crate::policy::eval::{Decision, Verdict};

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    CriPull,
    CriCreate,
    Admission,
    Cli,
}

/// One authority's result, flattened for searching.
#[derive(Debug, Serialize)]
pub struct AuthorityLine<'a> {
    pub policy: &'a str,
    pub authority: &'a str,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// The audit line schema (documented in the README).
#[derive(Debug, Serialize)]
pub struct AuditLine<'a> {
    pub time: String,
    pub source: Source,
    pub node: &'a str,
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
    pub image: &'a str,
    pub digest: Option<&'a str>,
    pub verdict: Verdict,
    pub enforced: bool,
    pub policies: Vec<&'a str>,
    pub authorities: Vec<AuthorityLine<'a>>,
    pub reasons: &'a [String],
    pub cache_hit: bool,
    pub latency_ms: f64,
}

impl<'a> AuditLine<'a> {
    pub fn new(
        source: Source,
        node: &'a str,
        pod: Option<&'a str>,
        decision: &'a Decision,
        cache_hit: bool,
        latency: std::time::Duration,
    ) -> AuditLine<'a> {
        AuditLine {
            time: jiff::Timestamp::now().to_string(),
            source,
            node,
            namespace: decision.namespace.as_deref(),
            pod,
            image: &decision.image,
            digest: decision.digest.as_deref(),
            verdict: decision.verdict,
            enforced: decision.enforced,
            policies: decision.policies.iter().map(|p| p.name.as_str()).collect(),
            authorities: decision
                .policies
                .iter()
                .flat_map(|p| {
                    p.authorities.iter().map(move |a| AuthorityLine {
                        policy: &p.name,
                        authority: &a.name,
                        passed: a.passed,
                        reason: a.reason.as_deref(),
                    })
                })
                .collect(),
            reasons: &decision.reasons,
            cache_hit,
            latency_ms: latency.as_secs_f64() * 1000.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

struct Rotating {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl Rotating {
    fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Rotating> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// `audit.log` → `audit.log.1` → … → `audit.log.<keep>` (dropped).
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..self.keep).rev() {
            if numbered(n).exists() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// The audit sink shared by every front door.
pub struct AuditLog {
    file: Option<Mutex<Rotating>>,
    stdout: bool,
    /// Every decision passes here once, so it is counted here.
    metrics: Option<Arc<Metrics>>,
}

impl AuditLog {
    /// `path`: the audit file (rotated past `max_bytes`, `keep` old files kept).
    pub fn open(
        path: Option<&Path>,
        max_bytes: u64,
        keep: usize,
        stdout: bool,
    ) -> Result<AuditLog, AuditError> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                Rotating::open(p, max_bytes, keep.max(1)).map_err(|source| AuditError {
                    path: p.to_path_buf(),
                    source,
                })?,
            )),
            None => None,
        };
        Ok(AuditLog {
            file,
            stdout,
            metrics: None,
        })
    }

    /// A sink that writes nothing (one-shot commands print their decision instead).
    pub fn silent() -> AuditLog {
        AuditLog {
            file: None,
            stdout: false,
            metrics: None,
        }
    }

    /// Also counts each recorded decision in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> AuditLog {
        self.metrics = Some(metrics);
        self
    }

    /// Writes one line. A failing disk must not stop decisions: the error goes to the debug log.
    pub fn record(&self, line: &AuditLine<'_>) {
        if let Some(metrics) = &self.metrics {
            metrics.observe(line);
        }
        let mut text = match serde_json::to_vec(line) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize audit line");
                return;
            }
        };
        text.push(b'\n');
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = file.write_line(&text) {
                tracing::error!(error = %e, path = %file.path.display(), "cannot write audit line");
            }
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&text);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_every_line_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Some(&path), 300, 3, false).unwrap();
        let decision = Decision::new(&"ghcr.io/a/b:1".parse().unwrap(), Some("ns"), true);
        for _ in 0..20 {
            log.record(&AuditLine::new(
                Source::Cli,
                "node-1",
                None,
                &decision,
                false,
                std::time::Duration::from_millis(1),
            ));
        }
        let mut lines = 0;
        for name in ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["image"], "ghcr.io/a/b:1");
                assert_eq!(v["source"], "cli");
                lines += 1;
            }
        }
        assert!(!dir.path().join("audit.log.4").exists());
        // Each line is about 280 bytes, so every file holds one: 4 files, 4 lines kept.
        assert_eq!(lines, 4);
    }
}
