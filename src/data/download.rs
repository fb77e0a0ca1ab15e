//! Verified, atomic downloads of data-set files.
//!
//! A file is streamed into a temporary file beside its destination while its SHA-256 is
//! computed; only when the whole body arrived and the checksum matches is the temporary file
//! renamed into place. Any failure removes the temporary file, so a failed or partial download
//! never leaves a file that a later run could mistake for data.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::DataError;
use super::catalog::{self, Archive, Checksum, DatasetSpec, FileSpec, Source};

/// Receives progress of a download; the library never prints, the caller shows a bar.
pub trait DownloadProgress {
    /// A download of `url` starts; `total` is its size when the server sent one.
    fn start(&mut self, url: &str, total: Option<u64>);
    /// `bytes` more bytes arrived.
    fn advance(&mut self, bytes: u64);
    /// The download ended (successfully or not).
    fn finish(&mut self);
}

/// Progress sink that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl DownloadProgress for NoProgress {
    fn start(&mut self, _: &str, _: Option<u64>) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// Downloads files over HTTP(S) with timeouts.
#[derive(Debug, Clone)]
pub struct Downloader {
    agent: ureq::Agent,
}

/// How long a download may go without receiving a byte before it fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for Downloader {
    /// 30 s to connect, [`STALL_TIMEOUT`] without a byte, an hour in all (a server that
    /// accepts and never answers fails after 30 s, not after the whole budget).
    fn default() -> Self {
        Self::with_timeouts(
            Duration::from_secs(30),
            STALL_TIMEOUT,
            Duration::from_secs(3600),
        )
    }
}

impl Downloader {
    /// A downloader with a connection timeout and a timeout for each whole request (and
    /// the default [`STALL_TIMEOUT`] between bytes).
    pub fn new(connect: Duration, total: Duration) -> Self {
        Self::with_timeouts(connect, STALL_TIMEOUT.min(total), total)
    }

    /// A downloader with a connection timeout, a stall timeout (the longest wait for any
    /// byte, headers or body) and a timeout for each whole request.
    pub fn with_timeouts(connect: Duration, stall: Duration, total: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(connect))
            .timeout_per_read(Some(stall))
            .timeout_global(Some(total))
            .build();
        Self {
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// Downloads `url` to `dest`, checking that its SHA-256 is `sha256` (lower-case hex).
    ///
    /// On success `dest` holds exactly the verified bytes; on failure `dest` is untouched and
    /// no temporary file remains.
    pub fn fetch_file(
        &self,
        url: &str,
        sha256: &str,
        dest: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<(), DataError> {
        self.fetch_verified(url, &Checksum::Sha256(sha256.to_string()), dest, progress)
    }

    /// Downloads `url` to `dest`, checking its digest against `checksum`, with
    /// [`Downloader::fetch_file`]'s guarantees.
    pub fn fetch_verified(
        &self,
        url: &str,
        checksum: &Checksum,
        dest: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<(), DataError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let tmp = temp_path(dest);
        let result = self.fetch_to_temp(url, checksum, &tmp, progress);
        progress.finish();
        match result {
            Ok(()) => fs::rename(&tmp, dest).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                DataError::io(dest, e)
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn fetch_to_temp(
        &self,
        url: &str,
        checksum: &Checksum,
        tmp: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<(), DataError> {
        let download_error = |reason: String| DataError::Download {
            url: url.to_string(),
            reason,
        };
        let mut response = self
            .agent
            .get(url)
            .call()
            .map_err(|e| download_error(e.to_string()))?;
        let total = response.body().content_length();
        progress.start(url, total);

        let mut out = File::create(tmp).map_err(|e| DataError::io(tmp, e))?;
        let mut reader = response.body_mut().as_reader();
        let mut hasher = Hasher::new(checksum);
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(download_error(format!(
                        "connection failed after {received} bytes: {e}"
                    )));
                }
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| DataError::io(tmp, e))?;
            received += n as u64;
            progress.advance(n as u64);
        }
        if let Some(total) = total
            && received != total
        {
            return Err(download_error(format!(
                "body truncated: received {received} of {total} bytes"
            )));
        }
        out.sync_all().map_err(|e| DataError::io(tmp, e))?;
        let actual = hasher.finish();
        if !actual.eq_ignore_ascii_case(checksum.hex()) {
            return Err(DataError::Checksum {
                url: url.to_string(),
                algorithm: checksum.algorithm(),
                expected: checksum.hex().to_string(),
                actual,
            });
        }
        Ok(())
    }

    /// Fetches every file of `spec` into `root/<name>/`, trying each mirror in turn (the
    /// catalogue's, or `mirrors` when given). Files already present with the right checksum
    /// are kept. A derived set fetches the set it is computed from; an archived set (CIFAR-10)
    /// fetches its archive, unpacks its batch files
    /// and removes it. Returns the directory that now holds the files.
    pub fn fetch_dataset(
        &self,
        spec: &DatasetSpec,
        mirrors: Option<&[String]>,
        root: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<PathBuf, DataError> {
        let (catalogue_mirrors, files) = match &spec.source {
            Source::Idx { mirrors, files } => (mirrors, files),
            Source::Derived { from } => {
                return self.fetch_dataset(&catalog::find(from)?, mirrors, root, progress);
            }
            Source::CifarBinary {
                archive: Some(archive),
                ..
            } => return self.fetch_cifar(spec, archive, mirrors, root, progress),
            Source::BuiltIn | Source::CifarBinary { archive: None, .. } => {
                return Err(DataError::NotDownloadable(spec.name.clone()));
            }
        };
        let mirrors = mirrors.unwrap_or(catalogue_mirrors);
        let dir = root.join(&spec.name);
        for file in files {
            let dest = dir.join(&file.file_name);
            if dest.is_file() && sha256_file(&dest)?.eq_ignore_ascii_case(&file.sha256) {
                continue;
            }
            self.fetch_from_mirrors(mirrors, file, &dest, progress)?;
        }
        Ok(dir)
    }

    fn fetch_cifar(
        &self,
        spec: &DatasetSpec,
        archive: &Archive,
        mirrors: Option<&[String]>,
        root: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<PathBuf, DataError> {
        let dir = root.join(&spec.name);
        if super::locate::locate_cifar_in(root, spec).is_some() {
            return Ok(dir);
        }
        let path = dir.join(&archive.file_name);
        let present = path.is_file()
            && Hasher::file(&archive.checksum, &path)?.eq_ignore_ascii_case(archive.checksum.hex());
        if !present {
            let mut last = None;
            for base in mirrors.unwrap_or(&archive.mirrors) {
                let url = join_url(base, &archive.file_name);
                match self.fetch_verified(&url, &archive.checksum, &path, progress) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
        }
        super::unpack::unpack_cifar(&path, &dir)?;
        fs::remove_file(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(dir)
    }

    fn fetch_from_mirrors(
        &self,
        mirrors: &[String],
        file: &FileSpec,
        dest: &Path,
        progress: &mut dyn DownloadProgress,
    ) -> Result<(), DataError> {
        let mut last = None;
        for base in mirrors {
            let url = join_url(base, &file.file_name);
            match self.fetch_file(&url, &file.sha256, dest, progress) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DataError::Download {
            url: file.file_name.clone(),
            reason: "no mirror configured".into(),
        }))
    }
}

/// SHA-256 of a file on disk, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, DataError> {
    Hasher::file(&Checksum::Sha256(String::new()), path)
}

/// A running digest of the algorithm a [`Checksum`] names.
enum Hasher {
    Sha256(Sha256),
    Md5(md5::Context),
}

impl Hasher {
    fn new(checksum: &Checksum) -> Self {
        match checksum {
            Checksum::Sha256(_) => Self::Sha256(Sha256::new()),
            Checksum::Md5(_) => Self::Md5(md5::Context::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Md5(h) => h.consume(bytes),
        }
    }

    fn finish(self) -> String {
        match self {
            Self::Sha256(h) => hex(&h.finalize()),
            Self::Md5(h) => hex(&h.finalize().0),
        }
    }

    /// The digest of a file on disk, in `checksum`'s algorithm, lower-case hex.
    fn file(checksum: &Checksum, path: &Path) -> Result<String, DataError> {
        let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut hasher = Self::new(checksum);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match file.read(&mut buf) {
                Ok(0) => return Ok(hasher.finish()),
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(DataError::io(path, e)),
            }
        }
    }
}

fn join_url(base: &str, file: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{file}")
    } else {
        format!("{base}/{file}")
    }
}

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.part-{}", std::process::id()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
