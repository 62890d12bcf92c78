//! The parent's config file: the persistent instance definitions (JSON), read
//! at start and rewritten (atomically) when a persistent instance is created,
//! re-weighted or removed.
//!
//! A file the parent cannot trust (not JSON, an unknown type, a bad UUID or
//! weight, a UUID twice) stops the parent at start with a sentence naming the
//! entry: the parent never writes such a file, so someone edited it and should
//! look. A definition that is valid but does not fit (the parent started with
//! less VRAM than before) is kept, listed as not made, and written back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{control, types, ParentError, MAX_WEIGHT};

/// One persistent instance.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub uuid: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub weight: u32,
}

/// The file as it is on disk.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    instances: Vec<Definition>,
}

fn invalid(path: &Path, reason: String) -> ParentError {
    ParentError::Config {
        path: path.to_owned(),
        reason,
    }
}

/// The definitions in `path` (none when it does not exist yet), checked.
pub fn load(path: &Path) -> Result<Vec<Definition>, ParentError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ParentError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file: ConfigFile =
        serde_json::from_slice(&bytes).map_err(|e| invalid(path, e.to_string()))?;
    let mut seen = BTreeSet::new();
    let mut defs = Vec::with_capacity(file.instances.len());
    for d in file.instances {
        let uuid = control::canonical_uuid(&d.uuid)
            .ok_or_else(|| invalid(path, format!("{:?} is not a UUID", d.uuid)))?;
        if types::find(&d.type_name).is_none() {
            return Err(invalid(
                path,
                format!("instance {uuid}: unknown type {:?}", d.type_name),
            ));
        }
        if !(1..=MAX_WEIGHT).contains(&d.weight) {
            return Err(invalid(
                path,
                format!(
                    "instance {uuid}: weight {} is not 1 to {MAX_WEIGHT}",
                    d.weight
                ),
            ));
        }
        if !seen.insert(uuid.clone()) {
            return Err(invalid(path, format!("instance {uuid} is defined twice")));
        }
        defs.push(Definition { uuid, ..d });
    }
    Ok(defs)
}

/// Replaces `path` with `defs` (written beside it, then renamed over it).
pub fn store(path: &Path, defs: Vec<Definition>) -> Result<(), ParentError> {
    let text = serde_json::to_vec_pretty(&ConfigFile { instances: defs })
        .map_err(|e| invalid(path, e.to_string()))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| ParentError::Io { path: p, source }
    };
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "0b8f2a54-1c3d-4e5f-8a9b-0c1d2e3f4a5b";

    fn def(uuid: &str, t: &str, weight: u32) -> Definition {
        Definition {
            uuid: uuid.into(),
            type_name: t.into(),
            weight,
        }
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = std::env::temp_dir().join(format!("umdev-vgpu-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("instances.json");
        let _ = std::fs::remove_file(&path);
        assert_eq!(load(&path).unwrap(), vec![]);
        let defs = vec![def(U, "vgpu-16m", 3)];
        store(&path, defs.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), defs);
        // Upper-case UUIDs (hand-written) come back canonical.
        std::fs::write(
            &path,
            format!(
                r#"{{"instances":[{{"uuid":"{}","type":"vgpu-64m","weight":1}}]}}"#,
                U.to_uppercase()
            ),
        )
        .unwrap();
        assert_eq!(load(&path).unwrap(), vec![def(U, "vgpu-64m", 1)]);
        for (text, want) in [
            ("{", "EOF"),
            (
                r#"{"instances":[{"uuid":"x","type":"vgpu-16m","weight":1}]}"#,
                "not a UUID",
            ),
            (
                &format!(r#"{{"instances":[{{"uuid":"{U}","type":"vgpu-9g","weight":1}}]}}"#),
                "unknown type",
            ),
            (
                &format!(r#"{{"instances":[{{"uuid":"{U}","type":"vgpu-16m","weight":0}}]}}"#),
                "weight 0",
            ),
            (
                &format!(
                    r#"{{"instances":[{{"uuid":"{U}","type":"vgpu-16m","weight":1}},{{"uuid":"{U}","type":"vgpu-16m","weight":2}}]}}"#
                ),
                "defined twice",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = load(&path).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("instances.json"),
                "{text}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
