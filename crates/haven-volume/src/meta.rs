//! A replica's metadata, kept beside its backing file: generation ids, epoch, role, disk
//! state and one dirty bitmap per peer. Saved by write-to-temp, fsync, rename, so a crash
//! leaves either the old or the new version.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const META_FILE: &str = "meta.json";
pub const DATA_FILE: &str = "data.img";
/// How many earlier generation ids are remembered; enough to find a common ancestor
/// across a few promotions and disconnects.
const HISTORY_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid volume metadata: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}` is invalid: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("{path}: a volume already exists here; refusing to overwrite it")]
    Exists { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Identifies the volume; every replica of it carries the same id.
    pub volume: String,
    pub node: String,
    pub size: u64,
    pub region_size: u64,
    pub current_gen: u64,
    /// Earlier generation ids, newest first.
    pub history: Vec<u64>,
    /// The newest epoch this replica has seen; primaries with an older one are refused.
    pub epoch: u64,
    /// Persisted so a restart can tell that it crashed while primary.
    pub role: Role,
    pub disk: DiskState,
    /// Wall-clock milliseconds of the last promotion (for discard-younger-primary).
    pub promoted_at_ms: u64,
    /// Set when the process died while primary: writes in flight then may exist here and
    /// nowhere else, so the next sync with any peer must be a full one.
    pub crashed_primary: bool,
    /// Regions written while each peer was away, by peer name. Stored as ranges: a
    /// long sequential write while a peer is away is one entry, not thousands.
    #[serde(with = "ranges_by_peer")]
    pub dirty: BTreeMap<String, BTreeSet<u64>>,
}

/// Half-open ranges `[start, end)` covering `set`, in order.
pub fn to_ranges(set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &r in set {
        match out.last_mut() {
            Some((_, end)) if *end == r => *end = r + 1,
            _ => out.push((r, r + 1)),
        }
    }
    out
}

/// The set covered by `ranges`, refusing ranges that exceed `limit` regions in total
/// (so a corrupt or hostile input cannot make us allocate without bound).
pub fn from_ranges(ranges: &[(u64, u64)], limit: u64) -> Result<BTreeSet<u64>, String> {
    let mut set = BTreeSet::new();
    for &(a, b) in ranges {
        if a >= b || b > limit {
            return Err(format!(
                "range [{a}, {b}) is empty or beyond the {limit} regions"
            ));
        }
        set.extend(a..b);
    }
    Ok(set)
}

mod ranges_by_peer {
    use super::{from_ranges, to_ranges};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::{BTreeMap, BTreeSet};

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, BTreeSet<u64>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let r: BTreeMap<&String, Vec<(u64, u64)>> =
            m.iter().map(|(k, v)| (k, to_ranges(v))).collect();
        r.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, BTreeSet<u64>>, D::Error> {
        let r: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::deserialize(d)?;
        // The exact bound is checked by `Meta::validate`; this one only stops a huge
        // range from being expanded (2^32 regions of 4 KiB is 16 TiB).
        r.into_iter()
            .map(|(k, v)| {
                from_ranges(&v, 1 << 32)
                    .map(|s| (k.clone(), s))
                    .map_err(|e| serde::de::Error::custom(format!("dirty.{k}: {e}")))
            })
            .collect()
    }
}

pub fn random_u64() -> u64 {
    // RandomState is seeded from the OS per process; mixing in time and pid keeps two
    // hashers created in the same process apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

impl Meta {
    pub fn new(volume: &str, node: &str, size: u64, region_size: u64, initial: bool) -> Meta {
        Meta {
            volume: volume.to_owned(),
            node: node.to_owned(),
            size,
            region_size,
            current_gen: if initial { random_u64() } else { 0 },
            history: Vec::new(),
            epoch: 0,
            role: Role::Secondary,
            disk: if initial {
                DiskState::UpToDate
            } else {
                DiskState::Inconsistent
            },
            promoted_at_ms: 0,
            crashed_primary: false,
            dirty: BTreeMap::new(),
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(META_FILE)
    }

    pub fn load(dir: &Path) -> Result<Meta, MetaError> {
        let path = Meta::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|source| MetaError::Io {
            path: path.clone(),
            source,
        })?;
        let meta: Meta = serde_json::from_str(&text).map_err(|source| MetaError::Parse {
            path: path.clone(),
            source,
        })?;
        meta.validate(&path)?;
        Ok(meta)
    }

    fn validate(&self, path: &Path) -> Result<(), MetaError> {
        let bad = |field, reason: String| MetaError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        };
        if self.region_size == 0 || !self.region_size.is_power_of_two() {
            return Err(bad(
                "region_size",
                format!("{} must be a power of two", self.region_size),
            ));
        }
        if self.size == 0 {
            return Err(bad("size", "must be greater than zero".into()));
        }
        if self.node.is_empty() {
            return Err(bad("node", "must not be empty".into()));
        }
        let regions = self.regions();
        for (peer, set) in &self.dirty {
            if let Some(r) = set.iter().next_back().filter(|r| **r >= regions) {
                return Err(bad(
                    "dirty",
                    format!("region {r} for peer {peer} is beyond the {regions} regions"),
                ));
            }
        }
        Ok(())
    }

    pub fn save(&self, dir: &Path) -> Result<(), MetaError> {
        let path = Meta::path(dir);
        let tmp = dir.join(format!("{META_FILE}.tmp"));
        let io = |source, p: &Path| MetaError::Io {
            path: p.to_owned(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|source| MetaError::Parse {
            path: path.clone(),
            source,
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, &tmp))?;
        f.write_all(&text).map_err(|e| io(e, &tmp))?;
        f.sync_all().map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(e, &path))?;
        // The rename itself must reach the disk before we rely on it.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub fn regions(&self) -> u64 {
        self.size.div_ceil(self.region_size)
    }

    /// Starts a new generation: the data from now on differs from the old one.
    pub fn rotate_gen(&mut self) {
        if self.current_gen != 0 {
            self.history.insert(0, self.current_gen);
            self.history.truncate(HISTORY_LEN);
        }
        self.current_gen = random_u64();
    }

    /// Adopts a peer's generation after syncing from it or on its announcement.
    pub fn adopt_gen(&mut self, current: u64, history: &[u64]) {
        self.current_gen = current;
        self.history = history.iter().copied().take(HISTORY_LEN).collect();
    }

    /// Marks `[offset, offset+len)` dirty for `peer`; returns whether a new bit was set
    /// (only then must the metadata be saved).
    pub fn mark_dirty(&mut self, peer: &str, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let first = offset / self.region_size;
        let last = (offset.saturating_add(len) - 1) / self.region_size;
        let top = self.regions().saturating_sub(1);
        let set = self.dirty.entry(peer.to_owned()).or_default();
        let mut added = false;
        for r in first..=last.min(top) {
            added |= set.insert(r);
        }
        added
    }

    pub fn dirty_count(&self, peer: &str) -> u64 {
        self.dirty.get(peer).map_or(0, |s| s.len() as u64)
    }
}

/// A size in bytes, or with a K/M/G/T suffix (binary units), as the CLI and the
/// cluster's `volume` resource class take it.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use bytes or a number with K, M, G or T"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Creates a new replica in `dir`: a sparse backing file of `size` bytes and metadata.
/// `initial` marks this replica's data as the authoritative starting point (UpToDate);
/// other replicas start Inconsistent and get a full sync.
pub fn create(
    dir: &Path,
    volume: &str,
    node: &str,
    size: u64,
    region_size: u64,
    initial: bool,
) -> Result<Meta, MetaError> {
    let meta = Meta::new(volume, node, size, region_size, initial);
    let path = Meta::path(dir);
    meta.validate(&path)?;
    if path.exists() {
        return Err(MetaError::Exists { path });
    }
    std::fs::create_dir_all(dir).map_err(|source| MetaError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let data = dir.join(DATA_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&data)
        .map_err(|source| MetaError::Io {
            path: data.clone(),
            source,
        })?;
    f.set_len(size).map_err(|source| MetaError::Io {
        path: data.clone(),
        source,
    })?;
    meta.save(dir)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_save_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let mut m = create(d.path(), "v1", "a", 1 << 20, 65536, true).unwrap();
        assert_eq!(m.disk, DiskState::UpToDate);
        assert!(m.mark_dirty("b", 65535, 2));
        assert!(!m.mark_dirty("b", 65536, 1));
        m.save(d.path()).unwrap();
        let back = Meta::load(d.path()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.dirty["b"].iter().copied().collect::<Vec<_>>(), [0, 1]);
        let text = std::fs::read_to_string(Meta::path(d.path())).unwrap();
        assert!(text.contains("[\n        0,\n        2\n      ]"), "{text}");
        assert!(matches!(
            create(d.path(), "v1", "a", 1 << 20, 65536, true),
            Err(MetaError::Exists { .. })
        ));
    }

    #[test]
    fn invalid_metadata_names_the_field() {
        let d = tempfile::tempdir().unwrap();
        let mut m = Meta::new("v", "a", 1 << 20, 65536, true);
        m.region_size = 3000;
        m.save(d.path()).unwrap();
        let e = Meta::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("region_size") && e.contains("power of two"),
            "{e}"
        );
        std::fs::write(Meta::path(d.path()), "{").unwrap();
        let e = Meta::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("meta.json"), "{e}");
    }

    #[test]
    fn ranges_round_trip_and_refuse_nonsense() {
        let set: BTreeSet<u64> = [1, 2, 3, 7, 9, 10].into_iter().collect();
        let r = to_ranges(&set);
        assert_eq!(r, vec![(1, 4), (7, 8), (9, 11)]);
        assert_eq!(from_ranges(&r, 11).unwrap(), set);
        assert!(from_ranges(&[(5, 5)], 10).is_err());
        assert!(from_ranges(&[(0, 11)], 10).is_err());
    }

    #[test]
    fn rotation_keeps_history_bounded() {
        let mut m = Meta::new("v", "a", 4096, 4096, true);
        let first = m.current_gen;
        for _ in 0..40 {
            m.rotate_gen();
        }
        assert_eq!(m.history.len(), HISTORY_LEN);
        assert!(!m.history.contains(&first));
        assert_ne!(m.current_gen, m.history[0]);
    }
}
