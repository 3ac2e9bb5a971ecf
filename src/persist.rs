//! The optional state file (`--state.file`): the devices of every address,
//! so a restarted exporter does not forget every phone (and page everyone)
//! while OnSIP has no way to tell it who is online.
//!
//! Written atomically (temporary file in the same directory, fsync, rename,
//! fsync of the directory), rate-limited by the caller, and once more on
//! shutdown. Loaded at start, dropping devices whose registration expired in
//! the meantime. A corrupt file is reported, moved aside (never overwritten)
//! and ignored: the exporter starts empty rather than not at all.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::stanza::{Registration, SipAddress};
use crate::state::Fleet;

/// Bumped when the format changes incompatibly.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub version: u32,
    /// When it was written, Unix seconds.
    pub saved_at: f64,
    pub addresses: Vec<AddressRecord>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddressRecord {
    /// `user@domain`.
    pub address: String,
    #[serde(default)]
    pub watched: bool,
    #[serde(default)]
    pub last_change: Option<f64>,
    #[serde(default)]
    pub devices: Vec<DeviceRecord>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    pub id: String,
    #[serde(default)]
    pub contact: String,
    #[serde(default)]
    pub received: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub expires: Option<i64>,
    pub first_seen: f64,
    pub last_seen: f64,
}

/// What loading did.
#[derive(Debug, Default, PartialEq)]
pub struct Restored {
    pub addresses: usize,
    pub devices: usize,
    /// Devices whose registration expired (plus grace) while we were down.
    pub expired: usize,
    /// Records that could not be read (bad address).
    pub skipped: usize,
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a state file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, this exporter reads {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Copies the fleet into the file format (call under the lock).
pub fn capture(fleet: &Fleet, now: f64) -> StateFile {
    let mut addresses = Vec::with_capacity(fleet.address_count());
    fleet.for_each_address(|domain, user, state| {
        addresses.push(AddressRecord {
            address: format!("{user}@{domain}"),
            watched: state.watched,
            last_change: state.last_change,
            devices: state
                .devices
                .iter()
                .map(|(id, d)| DeviceRecord {
                    id: id.to_string(),
                    contact: d.registration.contact.clone(),
                    received: d.registration.received.clone(),
                    device: d.registration.device.clone(),
                    expires: d.registration.expires,
                    first_seen: d.first_seen,
                    last_seen: d.last_seen,
                })
                .collect(),
        });
    });
    StateFile {
        version: FORMAT_VERSION,
        saved_at: now,
        addresses,
    }
}

/// Puts a loaded file into `fleet`, dropping devices that expired (plus
/// the fleet's grace) by `now`.
pub fn restore(file: StateFile, fleet: &mut Fleet, now: f64) -> Restored {
    let deadline = now as i64 - fleet.limits().expiry_grace_seconds;
    let mut restored = Restored::default();
    for record in file.addresses {
        let Ok(address) = SipAddress::parse(&record.address) else {
            restored.skipped += 1;
            continue;
        };
        let mut devices = Vec::with_capacity(record.devices.len());
        for d in record.devices {
            if d.expires.is_some_and(|e| e < deadline) {
                restored.expired += 1;
                continue;
            }
            devices.push((
                Arc::from(d.id),
                Registration {
                    contact: d.contact,
                    received: d.received,
                    device: d.device,
                    expires: d.expires,
                },
                d.first_seen,
                d.last_seen,
            ));
        }
        restored.addresses += 1;
        restored.devices += devices.len();
        fleet.restore(&address, record.watched, record.last_change, devices);
    }
    restored
}

/// Reads the file; `Ok(None)` when there is none yet.
pub fn read(path: &Path) -> Result<Option<StateFile>, LoadError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LoadError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let parsed: StateFile =
        serde_json::from_reader(BufReader::new(file)).map_err(|source| LoadError::Corrupt {
            path: path.to_owned(),
            source,
        })?;
    if parsed.version != FORMAT_VERSION {
        return Err(LoadError::Version {
            path: path.to_owned(),
            found: parsed.version,
        });
    }
    Ok(Some(parsed))
}

/// Moves an unusable file aside (`<name>.corrupt`) so it is kept for a
/// person to look at and never overwritten.
pub fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside)?;
    Ok(aside)
}

/// Writes the file atomically: a reader (or a crash) sees the old file or
/// the new one, never half of one.
pub fn write_atomic(path: &Path, state: &StateFile) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "state".into());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut writer = BufWriter::with_capacity(256 * 1024, file);
        serde_json::to_writer(&mut writer, state).map_err(io::Error::other)?;
        writer.flush()?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is synced.
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::PubsubEvent;
    use crate::state::Limits;

    fn fleet_with(expires: &[Option<i64>]) -> Fleet {
        let mut fleet = Fleet::new(Limits {
            expiry_grace_seconds: 60,
            ..Limits::default()
        });
        fleet.set_watched(&[SipAddress::new("idle", "d.com")]);
        for (i, e) in expires.iter().enumerate() {
            fleet.apply(
                &PubsubEvent::Publish {
                    address: SipAddress::new("a", "d.com"),
                    item_id: Arc::from(format!("id-{i}")),
                    registration: Registration {
                        contact: "sip:a@192.0.2.1".into(),
                        received: "sip:198.51.100.1:5060".into(),
                        device: "Phone \"1\"".into(),
                        expires: *e,
                    },
                },
                100.0,
            );
        }
        fleet
    }

    #[test]
    fn round_trip_through_a_file_drops_expired_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let before = fleet_with(&[Some(1_000), Some(5_000), None]);
        write_atomic(&path, &capture(&before, 200.0)).expect("write");
        let loaded = read(&path).expect("read").expect("present");
        let mut after = Fleet::new(before.limits().clone());
        let restored = restore(loaded, &mut after, 2_000.0);
        assert_eq!(
            restored,
            Restored {
                addresses: 2,
                devices: 2,
                expired: 1,
                skipped: 0
            }
        );
        let a = after.address(&SipAddress::new("a", "d.com")).expect("a");
        assert!(a.devices.contains_key("id-1") && a.devices.contains_key("id-2"));
        assert_eq!(a.devices["id-1"].registration.device, "Phone \"1\"");
        assert!(after
            .address(&SipAddress::new("idle", "d.com"))
            .is_some_and(|s| s.watched));
        assert_eq!(after.device_count(), 2);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn missing_corrupt_and_foreign_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert!(read(&path).expect("missing is fine").is_none());
        fs::write(&path, "{\"version\": 1, \"saved_at\": 1, \"addr").expect("write");
        assert!(matches!(read(&path), Err(LoadError::Corrupt { .. })));
        let aside = move_aside(&path).expect("moved");
        assert!(aside.ends_with("state.json.corrupt") && !path.exists());
        fs::write(
            &path,
            "{\"version\": 7, \"saved_at\": 1, \"addresses\": []}",
        )
        .expect("write");
        assert!(matches!(
            read(&path),
            Err(LoadError::Version { found: 7, .. })
        ));
    }
}
