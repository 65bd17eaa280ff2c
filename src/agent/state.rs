//! The agent's state file: the last event id handled on the event stream,
//! the scan requests not yet finished and the last scan's result. It lets
//! a restarted agent resume its stream where it stopped, run the scans
//! requested while it was down or scanning, and keep reporting an infected
//! result.

use super::scan::ScanOutcome;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// File name of the state inside systemd's `StateDirectory`.
pub const STATE_FILE_NAME: &str = "state.json";

/// A scan the server requested that has not finished yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingScan {
    /// Id of the `scan_requested` notice.
    pub notice: i64,
    /// The notice's body, as the server sent it.
    pub body: Value,
}

/// The contents of the state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// Id of the last event handled on the device's event stream.
    #[serde(default)]
    pub stream_position: Option<i64>,
    /// Scan requests received but not finished, oldest first.
    #[serde(default)]
    pub pending_scans: Vec<PendingScan>,
    /// The outcome of the last scan that finished.
    #[serde(default)]
    pub last_scan: Option<ScanOutcome>,
}

/// Reads the state at `path`. A missing file is an empty state.
///
/// # Errors
/// When the file cannot be read or is not a valid state.
pub fn read(path: &Path) -> Result<AgentState, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(AgentState::default());
        }
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    serde_json::from_str(&text)
        .map_err(|error| format!("{} is not a valid agent state: {error}", path.display()))
}

/// Writes `state` to `path` atomically: to a temporary file in the same
/// directory with mode 0600, flushed to disk, then renamed over `path`.
/// A crash leaves either the old or the new file, never a partial one.
///
/// # Errors
/// When the temporary file cannot be written or renamed.
pub fn write(path: &Path, state: &AgentState) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = serde_json::to_vec_pretty(state)
        .map_err(|error| format!("cannot encode the agent state: {error}"))?;
    let mut temporary_name = path.file_name().unwrap_or_default().to_os_string();
    temporary_name.push(".tmp");
    let temporary = path.with_file_name(temporary_name);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(format!("cannot write {}: {error}", path.display()));
    }
    // The rename is durable only once the directory is flushed too.
    if let Some(directory) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        && let Ok(directory) = std::fs::File::open(directory)
    {
        let _ = directory.sync_all();
    }
    Ok(())
}

/// The state in memory, written to its file after every change.
pub struct StateFile {
    path: Option<PathBuf>,
    state: Mutex<AgentState>,
}

impl StateFile {
    /// Loads the state from `path`, or keeps it in memory only when `path`
    /// is `None`. A file that cannot be read or is not valid is logged with
    /// its path. The agent then starts with an empty state, and the next
    /// change replaces the file.
    pub fn load(path: Option<PathBuf>) -> StateFile {
        let state = match &path {
            None => AgentState::default(),
            Some(path) => match read(path) {
                Ok(state) => state,
                Err(error) => {
                    tracing::error!(%error, path = %path.display(),
                        "cannot load the agent state; starting without it, so scan requests \
                         stored while the agent was down are missed and the last scan's result \
                         is forgotten");
                    AgentState::default()
                }
            },
        };
        StateFile {
            path,
            state: Mutex::new(state),
        }
    }

    /// Returns a copy of the current state.
    pub fn get(&self) -> AgentState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Applies `change` and writes the state when `change` returns true.
    /// A failed write is logged, and the state in memory keeps the change.
    fn update(&self, change: impl FnOnce(&mut AgentState) -> bool) {
        let mut state = self.lock();
        if !change(&mut state) {
            return;
        }
        let Some(path) = &self.path else {
            return;
        };
        // The lock is held while writing, so two writes never interleave
        // and the file always ends with the newest state.
        if let Err(error) = write(path, &state) {
            tracing::error!(%error, path = %path.display(),
                "cannot save the agent state; a restart may miss scan requests or forget the last scan's result");
        }
    }

    /// Records `id` as the last event handled.
    pub fn set_stream_position(&self, id: i64) {
        self.update(|state| {
            let changed = state.stream_position != Some(id);
            state.stream_position = Some(id);
            changed
        });
    }

    /// Records a scan request and moves the stream position to its event
    /// id. Returns false, changing nothing, when the request is at or
    /// before the stream position, because it is then pending or done
    /// already (a resumed stream can deliver an event twice).
    pub fn add_pending_scan(&self, scan: PendingScan) -> bool {
        let mut added = false;
        self.update(|state| {
            if state
                .stream_position
                .is_some_and(|position| scan.notice <= position)
            {
                return false;
            }
            state.stream_position = Some(scan.notice);
            state.pending_scans.push(scan);
            added = true;
            true
        });
        added
    }

    /// Records a finished scan: removes the requests in `notices` and keeps
    /// `outcome` as the last result when there is one (a scan that failed
    /// to run keeps the previous result).
    pub fn finish_scan(&self, notices: &[i64], outcome: Option<&ScanOutcome>) {
        self.update(|state| {
            state
                .pending_scans
                .retain(|pending| !notices.contains(&pending.notice));
            if let Some(outcome) = outcome {
                state.last_scan = Some(outcome.clone());
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::scan::Finding;
    use std::os::unix::fs::PermissionsExt;

    fn infected() -> ScanOutcome {
        ScanOutcome {
            findings: vec![Finding {
                path: "/home/a/invoice.exe".into(),
                signature: "Sendguard.Test.Virus".into(),
            }],
            errors: Vec::new(),
        }
    }

    #[test]
    fn state_round_trip() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(STATE_FILE_NAME);
        let file = StateFile::load(Some(path.clone()));
        assert_eq!(file.get(), AgentState::default());
        file.set_stream_position(41);
        assert!(file.add_pending_scan(PendingScan {
            notice: 42,
            body: serde_json::json!({"mailbox": "carol@example.org"}),
        }));
        file.finish_scan(&[], Some(&infected()));

        let loaded = StateFile::load(Some(path)).get();
        assert_eq!(loaded.stream_position, Some(42));
        assert_eq!(loaded.pending_scans.len(), 1);
        assert_eq!(loaded.pending_scans[0].notice, 42);
        assert_eq!(loaded.pending_scans[0].body["mailbox"], "carol@example.org");
        assert_eq!(loaded.last_scan, Some(infected()));
    }

    #[test]
    fn repeated_scan_request_ignored() {
        let file = StateFile::load(None);
        let request = PendingScan {
            notice: 7,
            body: Value::Null,
        };
        assert!(file.add_pending_scan(request.clone()));
        assert!(!file.add_pending_scan(request.clone()));
        assert_eq!(file.get().pending_scans.len(), 1);
        file.finish_scan(&[7], None);
        assert!(file.get().pending_scans.is_empty());
        assert_eq!(file.get().stream_position, Some(7));
        assert!(
            !file.add_pending_scan(request),
            "a finished request ran again"
        );
        assert!(file.get().pending_scans.is_empty());
    }

    #[test]
    fn failed_scan_keeps_last_result() {
        let file = StateFile::load(None);
        file.finish_scan(&[], Some(&infected()));
        file.finish_scan(&[], None);
        assert_eq!(file.get().last_scan, Some(infected()));
    }

    #[test]
    fn corrupt_state_starts_empty() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(STATE_FILE_NAME);
        std::fs::write(&path, "{\"stream_position\": 12, \"last_sc").expect("write");
        let error = read(&path).expect_err("truncated JSON");
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("is not a valid agent state"), "{error}");

        let file = StateFile::load(Some(path.clone()));
        assert_eq!(file.get(), AgentState::default());
        file.set_stream_position(13);
        assert_eq!(read(&path).expect("replaced").stream_position, Some(13));
    }

    #[test]
    fn unreadable_state_starts_empty() {
        let dir = tempfile::tempdir().expect("temporary directory");
        // A directory in place of the file cannot be read as one.
        let path = dir.path().join(STATE_FILE_NAME);
        std::fs::create_dir(&path).expect("create directory");
        assert!(read(&path).is_err());
        let file = StateFile::load(Some(path));
        assert_eq!(file.get(), AgentState::default());
        file.set_stream_position(5);
        assert_eq!(file.get().stream_position, Some(5));
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join(STATE_FILE_NAME);
        let long = AgentState {
            stream_position: Some(1),
            pending_scans: (0..50)
                .map(|notice| PendingScan {
                    notice,
                    body: serde_json::json!({"mailbox": "carol@example.org"}),
                })
                .collect(),
            last_scan: Some(infected()),
        };
        write(&path, &long).expect("write long state");
        let short = AgentState {
            stream_position: Some(2),
            ..AgentState::default()
        };
        write(&path, &short).expect("write short state");

        assert_eq!(read(&path).expect("read"), short);
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, [STATE_FILE_NAME], "a temporary file was left");

        // A write that fails before the rename leaves the old file whole.
        std::fs::create_dir(dir.path().join(format!("{STATE_FILE_NAME}.tmp")))
            .expect("block the temporary file");
        write(&path, &long).expect_err("the temporary file cannot be opened");
        assert_eq!(read(&path).expect("read"), short);
    }

    #[test]
    fn write_to_missing_directory_fails() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("missing").join(STATE_FILE_NAME);
        let error = write(&path, &AgentState::default()).expect_err("no directory");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}
