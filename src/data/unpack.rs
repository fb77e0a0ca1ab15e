//! Unpacking CIFAR-10's batch files from its distribution archive (`.tar.gz`, or a plain
//! `.tar`).
//!
//! Only the six batch files are taken, by base name wherever they sit in the archive
//! (the official one keeps them under `cifar-10-batches-bin/`), and only from regular-file
//! members: no path from the archive is ever used as a destination, so a hostile archive
//! cannot write outside the data set's folder. Each file goes to a temporary name first;
//! only when every one of them was read whole are they renamed into place, so a damaged
//! or incomplete archive leaves nothing that a later run could mistake for data.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::DataError;
use super::cifar::{OFFICIAL_RECORDS, RECORD, TEST_FILE, TRAIN_FILES};
use super::stream::{open, read_error};

/// The largest batch file accepted: the official 10,000 records.
const MAX_MEMBER: u64 = (OFFICIAL_RECORDS * RECORD) as u64;

/// Extracts `data_batch_1..5.bin` and `test_batch.bin` from the archive at `archive` into
/// `dir`. Returns their paths in that order. On failure nothing is left in `dir`.
pub fn unpack_cifar(archive: &Path, dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let wanted: Vec<&str> = TRAIN_FILES.iter().copied().chain([TEST_FILE]).collect();
    let temps: Vec<PathBuf> = wanted
        .iter()
        .map(|name| dir.join(format!(".{name}.part-{}", std::process::id())))
        .collect();
    let result = extract(archive, &wanted, &temps).and_then(|()| {
        let mut done = Vec::with_capacity(wanted.len());
        for (name, tmp) in wanted.iter().zip(&temps) {
            let dest = dir.join(name);
            fs::rename(tmp, &dest).map_err(|e| DataError::io(&dest, e))?;
            done.push(dest);
        }
        Ok(done)
    });
    if result.is_err() {
        for tmp in &temps {
            let _ = fs::remove_file(tmp);
        }
    }
    result
}

/// Copies each wanted member to its temporary path; every one must be present.
fn extract(archive: &Path, wanted: &[&str], temps: &[PathBuf]) -> Result<(), DataError> {
    let (stream, _) = open(archive)?;
    let mut tar = tar::Archive::new(stream);
    let mut found = vec![false; wanted.len()];
    let entries = tar
        .entries()
        .map_err(|e| read_error(archive, "the archive", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| read_error(archive, "the archive's index", e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| read_error(archive, "a member's name", e))?
            .into_owned();
        let Some(k) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| wanted.iter().position(|w| *w == n))
        else {
            continue;
        };
        let size = entry.size();
        if size > MAX_MEMBER {
            return Err(DataError::corrupt(
                archive,
                format!(
                    "member {} is {size} bytes, more than a CIFAR-10 batch file ({MAX_MEMBER})",
                    path.display()
                ),
            ));
        }
        copy_member(&mut entry, archive, &path, &temps[k])?;
        found[k] = true;
    }
    if let Some(k) = found.iter().position(|f| !f) {
        return Err(DataError::corrupt(
            archive,
            format!("the archive holds no {}", wanted[k]),
        ));
    }
    Ok(())
}

/// Streams one member to `dest`, telling a damaged archive (corruption) from a failed
/// write (I/O on `dest`).
fn copy_member(
    member: &mut impl Read,
    archive: &Path,
    name: &Path,
    dest: &Path,
) -> Result<(), DataError> {
    let mut out = File::create(dest).map_err(|e| DataError::io(dest, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match member.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(read_error(
                    archive,
                    &format!("member {}", name.display()),
                    e,
                ));
            }
        };
        out.write_all(&buf[..n])
            .map_err(|e| DataError::io(dest, e))?;
    }
    out.sync_all().map_err(|e| DataError::io(dest, e))
}
