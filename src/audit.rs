//! The audit log: exactly one JSON line per decision, a product output of its own (not the
//! debug log). Lines go to a file with size-based rotation and, optionally, to stdout (the
//! journal under systemd). A line is written whole under one lock, so rotation never splits or
//! drops a line; a line the disk has no room for is cut off again, never left half-written.
//! A failed write is counted (`pullgate_audit_write_errors_total`), shown by `/readyz`, and
//! by default turns an allow into a deny ([`AuditFailure`]).

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

/// What happens to a decision whose audit line cannot be written (`--audit-failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AuditFailure {
    /// An allow in an enforced namespace becomes a deny naming the audit failure (the default):
    /// nothing runs that the record does not show. Exempt namespaces keep pulling, so the node
    /// can still be repaired.
    #[default]
    Deny,
    /// The decision stands; the failure is only counted and reported by `/readyz`.
    Allow,
}

/// Opens `path` for appending without following a symlink: a link planted at the audit path
/// (to `/etc/shadow`, say) is an error, never a file pullgate appends to.
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
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
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Rotating {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    /// `audit.log` → `audit.log.1` → … → `audit.log.<keep>` (dropped). Renames move links,
    /// never their targets.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..self.keep).rev() {
            if numbered(n).symlink_metadata().is_ok() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// Appends `line` (newline-terminated) whole or not at all. It is one `write` on an
    /// `O_APPEND` file; when the disk fills part-way, the part written is cut off again, so
    /// the file never holds half a line and the next line starts on a line of its own.
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let written = match self.file.write(line) {
            Ok(n) => n,
            Err(e) => {
                self.resync();
                return Err(e);
            }
        };
        if written == line.len() {
            self.size += line.len() as u64;
            return Ok(());
        }
        // A short write to a regular file: the disk (or quota) is full.
        let end = self.file.metadata().map(|m| m.len());
        let cut = match end {
            Ok(end) => self.file.set_len(end.saturating_sub(written as u64)),
            Err(e) => Err(e),
        };
        if cut.is_err() {
            // Cannot cut: end the fragment so that it stands alone as an unparseable line
            // rather than prefixing the next one.
            let _ = self.file.write(b"\n");
        }
        self.resync();
        Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!(
                "only {written} of {} bytes could be written (disk full?); the partial line was {}",
                line.len(),
                if cut.is_ok() {
                    "removed"
                } else {
                    "ended with a newline"
                }
            ),
        ))
    }

    fn resync(&mut self) {
        if let Ok(m) = self.file.metadata() {
            self.size = m.len();
        }
    }
}

/// Where lines go; shared with the blocking threads that write them.
struct Sinks {
    file: Option<Mutex<Rotating>>,
    stdout: bool,
}

impl Sinks {
    /// Writes one serialized line to every sink; the first failure is returned (the other
    /// sinks are still written).
    fn write(&self, text: &[u8]) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(file) = &self.file {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = file.write_line(text) {
                result = Err(format!("{}: {e}", file.path.display()));
            }
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(text).and_then(|()| out.flush()) {
                result = result.and(Err(format!("stdout: {e}")));
            }
        }
        result
    }
}

/// The audit sink shared by every front door.
pub struct AuditLog {
    sinks: Arc<Sinks>,
    /// Every decision passes here once, so it is counted here.
    metrics: Option<Arc<Metrics>>,
    on_failure: AuditFailure,
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
            sinks: Arc::new(Sinks { file, stdout }),
            metrics: None,
            on_failure: AuditFailure::default(),
        })
    }

    /// A sink that writes nothing (one-shot commands print their decision instead).
    pub fn silent() -> AuditLog {
        AuditLog {
            sinks: Arc::new(Sinks {
                file: None,
                stdout: false,
            }),
            metrics: None,
            on_failure: AuditFailure::Allow,
        }
    }

    /// Also counts each recorded decision, and each failed write, in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> AuditLog {
        self.metrics = Some(metrics);
        self
    }

    /// What happens to a decision whose line cannot be written.
    pub fn with_failure_policy(mut self, on_failure: AuditFailure) -> AuditLog {
        self.on_failure = on_failure;
        self
    }

    pub fn failure_policy(&self) -> AuditFailure {
        self.on_failure
    }

    /// Writes one line on this thread. `Err` says why the line is not (wholly) recorded; the
    /// failure is logged and counted.
    pub fn record(&self, line: &AuditLine<'_>) -> Result<(), String> {
        let text = self.prepare(line)?;
        let result = self.sinks.write(&text);
        self.written(result)
    }

    /// [`AuditLog::record`] with the write on a blocking thread, so that a slow disk or a
    /// stalled journal never holds a runtime worker (and every RPC behind it).
    pub async fn record_async(&self, line: &AuditLine<'_>) -> Result<(), String> {
        let text = self.prepare(line)?;
        if self.sinks.file.is_none() && !self.sinks.stdout {
            return Ok(());
        }
        let sinks = self.sinks.clone();
        let result = tokio::task::spawn_blocking(move || sinks.write(&text))
            .await
            .unwrap_or_else(|e| Err(format!("the audit writer failed: {e}")));
        self.written(result)
    }

    fn prepare(&self, line: &AuditLine<'_>) -> Result<Vec<u8>, String> {
        if let Some(metrics) = &self.metrics {
            metrics.observe(line);
        }
        let mut text = serde_json::to_vec(line).map_err(|e| {
            let e = format!("cannot serialize audit line: {e}");
            self.written(Err(e.clone())).err().unwrap_or(e)
        })?;
        text.push(b'\n');
        Ok(text)
    }

    fn written(&self, result: Result<(), String>) -> Result<(), String> {
        if self.sinks.file.is_none() && !self.sinks.stdout {
            return result;
        }
        if let Some(metrics) = &self.metrics {
            metrics.audit_written(result.as_ref().map(|_| ()).map_err(String::as_str));
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write audit line");
        }
        result
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
            let _ = log.record(&AuditLine::new(
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
