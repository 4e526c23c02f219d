//! Pidfiles that survive the agent restarting and cannot be fooled by pid reuse.
//!
//! A pidfile holds `PID STARTTIME`, the start time being field 22 of
//! `/proc/PID/stat`. A process with the same pid but another start time is a stranger
//! and is never signalled.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pidfile {path}: expected `PID STARTTIME`, found {found:?}")]
    Malformed { path: PathBuf, found: String },
}

/// A process we started, identified beyond its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    pub pid: i32,
    pub start_time: u64,
}

impl Tracked {
    /// Identifies a live process by pid, reading its start time.
    pub fn of(pid: i32) -> Option<Tracked> {
        let (state, start_time) = stat(pid)?;
        (state != 'Z').then_some(Tracked { pid, start_time })
    }

    /// Whether this very process still runs (not a zombie, not a reused pid).
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, st)) if state != 'Z' && st == self.start_time)
    }
}

/// Writes the pidfile atomically (temp file then rename) so a reader never sees half.
pub fn write(path: &Path, t: Tracked) -> Result<(), PidfileError> {
    let tmp = path.with_extension("pid.tmp");
    let io = |source| PidfileError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, format!("{} {}\n", t.pid, t.start_time)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a pidfile; a missing file is `Ok(None)`.
pub fn read(path: &Path) -> Result<Option<Tracked>, PidfileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PidfileError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut it = text.split_whitespace();
    let parsed = match (it.next(), it.next(), it.next()) {
        (Some(p), Some(s), None) => p.parse().ok().zip(s.parse().ok()),
        _ => None,
    };
    match parsed {
        Some((pid, start_time)) if pid > 1 => Ok(Some(Tracked { pid, start_time })),
        _ => Err(PidfileError::Malformed {
            path: path.to_path_buf(),
            found: text.chars().take(80).collect(),
        }),
    }
}

pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Whether `pid` is a live (non-zombie) process.
pub fn is_alive(pid: i32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z')
}

/// State letter and start time from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), start time is field 22: 18 fields further.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some((state, start_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        assert!(read(&p).unwrap().is_none());
        let me = Tracked::of(std::process::id() as i32).unwrap();
        write(&p, me).unwrap();
        let back = read(&p).unwrap().unwrap();
        assert_eq!(back, me);
        assert!(back.alive());
        let stranger = Tracked {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!stranger.alive());
    }

    #[test]
    fn malformed_pidfile_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.pid");
        std::fs::write(&p, "hello").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("bad.pid") && e.contains("PID STARTTIME"), "{e}");
    }
}
