//! Snapshot freshness: whether the policy set in force reflects its source right now, and since
//! when. `/readyz` answers from it and the `pullgate_snapshot_*` metrics export it.
//!
//! *Fresh*: the last look at the source (a policy-dir poll, or every API watch) succeeded and
//! its content is in force. *Stale*: the node enforces an older set (the last good one, or the
//! one persisted on disk) because the source is unreachable or its latest change was invalid.
//! Stale is never "open": the older set is still enforced.

use std::sync::Mutex;

use jiff::Timestamp;
use serde::Serialize;

/// One reading of the freshness state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Freshness {
    pub fresh: bool,
    /// When the current state (fresh or stale) began.
    pub since: Timestamp,
    /// When the policy set in force was last confirmed against its source.
    pub last_sync: Option<Timestamp>,
    /// Why the set is stale; `None` when fresh.
    pub reason: Option<String>,
}

/// A shared, updatable [`Freshness`].
#[derive(Debug)]
pub struct FreshnessCell(Mutex<Freshness>);

impl FreshnessCell {
    /// Starts stale: nothing has been confirmed against the source yet.
    pub fn stale(reason: impl Into<String>) -> FreshnessCell {
        FreshnessCell(Mutex::new(Freshness {
            fresh: false,
            since: Timestamp::now(),
            last_sync: None,
            reason: Some(reason.into()),
        }))
    }

    /// Starts fresh (a source read successfully at start).
    pub fn fresh() -> FreshnessCell {
        let now = Timestamp::now();
        FreshnessCell(Mutex::new(Freshness {
            fresh: true,
            since: now,
            last_sync: Some(now),
            reason: None,
        }))
    }

    pub fn get(&self) -> Freshness {
        self.lock().clone()
    }

    /// The source was read and its content is in force.
    pub fn synced(&self) {
        let now = Timestamp::now();
        let mut f = self.lock();
        if !f.fresh {
            f.fresh = true;
            f.since = now;
            f.reason = None;
        }
        f.last_sync = Some(now);
    }

    /// The source was looked at and has not changed: a fresh state stays fresh with a new
    /// sync time; a stale one (its content refused) stays stale.
    pub fn confirmed(&self) {
        let mut f = self.lock();
        if f.fresh {
            f.last_sync = Some(Timestamp::now());
        }
    }

    /// The source could not be read, or its content was refused. The first reason of a stale
    /// period is kept: it is usually the cause; later ones are its echoes.
    pub fn stale_because(&self, reason: impl Into<String>) {
        let mut f = self.lock();
        if f.fresh {
            f.fresh = false;
            f.since = Timestamp::now();
            f.reason = Some(reason.into());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Freshness> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_keep_since_and_first_reason() {
        let cell = FreshnessCell::stale("not synced yet");
        let start = cell.get();
        assert!(!start.fresh);
        assert_eq!(start.last_sync, None);
        assert_eq!(start.reason.as_deref(), Some("not synced yet"));

        cell.synced();
        let fresh = cell.get();
        assert!(fresh.fresh);
        assert!(fresh.since >= start.since);
        assert_eq!(fresh.last_sync, Some(fresh.since));
        assert_eq!(fresh.reason, None);

        cell.synced();
        assert_eq!(
            cell.get().since,
            fresh.since,
            "a fresh period keeps its start"
        );

        cell.stale_because("watch ClusterImagePolicy: connection refused");
        cell.stale_because("watch Namespace: connection refused");
        let stale = cell.get();
        assert!(!stale.fresh);
        assert_eq!(
            stale.reason.as_deref(),
            Some("watch ClusterImagePolicy: connection refused")
        );
        assert!(
            stale.last_sync >= fresh.last_sync,
            "going stale keeps the last sync time"
        );
        assert!(stale.last_sync.is_some());
    }
}
