//! Where data sets live on disk: `--data-dir`, then `MEP_DATA_DIR`, then the per-user cache.

use std::path::{Path, PathBuf};

use super::DataError;
use super::catalog::{DatasetSpec, FileRole};

/// Environment variable naming a directory of data sets (one sub-directory per set).
pub const DATA_DIR_ENV: &str = "MEP_DATA_DIR";

/// The ordered list of directories searched for data sets.
///
/// A data set `NAME` is found in the first directory `D` for which `D/NAME/` holds all of its
/// files, each either gzipped (the catalogue name) or already unpacked (the name without `.gz`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataLocator {
    explicit: Option<PathBuf>,
    env: Option<PathBuf>,
    cache: Option<PathBuf>,
}

/// The files of one IDX data set as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedFiles {
    /// The directory that holds them (`<root>/<name>`).
    pub dir: PathBuf,
    /// Training images.
    pub train_images: PathBuf,
    /// Training labels.
    pub train_labels: PathBuf,
    /// Test images.
    pub test_images: PathBuf,
    /// Test labels.
    pub test_labels: PathBuf,
}

impl DataLocator {
    /// Lookup order from an optional `--data-dir`, the `MEP_DATA_DIR` variable and the user's
    /// cache directory (`<cache>/mep/data`).
    pub fn from_env(data_dir: Option<PathBuf>) -> Self {
        Self {
            explicit: data_dir,
            env: std::env::var_os(DATA_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            cache: default_cache_dir(),
        }
    }

    /// A locator with exactly these three places (any may be absent); for tests and embedding.
    pub fn new(explicit: Option<PathBuf>, env: Option<PathBuf>, cache: Option<PathBuf>) -> Self {
        Self {
            explicit,
            env,
            cache,
        }
    }

    /// The directories searched, in order.
    pub fn search_dirs(&self) -> Vec<PathBuf> {
        [&self.explicit, &self.env, &self.cache]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Where `mep data fetch` writes: the per-user cache directory.
    pub fn download_dir(&self) -> Result<PathBuf, DataError> {
        self.cache.clone().ok_or(DataError::NoCacheDir)
    }

    /// Finds the files of an IDX data set, or says where it looked.
    pub fn locate(&self, spec: &DatasetSpec) -> Result<LocatedFiles, DataError> {
        let searched = self.search_dirs();
        for root in &searched {
            check_regular(root, spec)?;
            if let Some(found) = locate_in(root, spec) {
                return Ok(found);
            }
        }
        let file = spec
            .files()
            .first()
            .map(|f| f.file_name.clone())
            .unwrap_or_default();
        Err(DataError::Missing {
            dataset: spec.name.clone(),
            file,
            searched: searched.iter().map(|d| d.join(&spec.name)).collect(),
        })
    }
}

/// The batch files of a CIFAR-10 folder under `root/<name>/`: the training batches in
/// order and the test batch (each raw or gzipped), if all are there.
pub fn locate_cifar_in(root: &Path, spec: &DatasetSpec) -> Option<(Vec<PathBuf>, PathBuf)> {
    let dir = root.join(&spec.name);
    let find = |name: &str| -> Option<PathBuf> {
        let gz = dir.join(format!("{name}.gz"));
        if gz.is_file() {
            return Some(gz);
        }
        let raw = dir.join(name);
        raw.is_file().then_some(raw)
    };
    let train = super::cifar::TRAIN_FILES
        .iter()
        .map(|f| find(f))
        .collect::<Option<Vec<_>>>()?;
    Some((train, find(super::cifar::TEST_FILE)?))
}

impl DataLocator {
    /// Finds a CIFAR-10 folder's batch files, or says where it looked.
    pub fn locate_cifar(&self, spec: &DatasetSpec) -> Result<(Vec<PathBuf>, PathBuf), DataError> {
        let searched = self.search_dirs();
        for root in &searched {
            let dir = root.join(&spec.name);
            for f in super::cifar::TRAIN_FILES
                .iter()
                .chain([&super::cifar::TEST_FILE])
            {
                for path in [dir.join(f), dir.join(format!("{f}.gz"))] {
                    if path.exists() && !path.is_file() {
                        return Err(DataError::corrupt(
                            &path,
                            "is not a regular file (a directory, FIFO or device)".to_string(),
                        ));
                    }
                }
            }
            if let Some(found) = locate_cifar_in(root, spec) {
                return Ok(found);
            }
        }
        Err(DataError::Missing {
            dataset: spec.name.clone(),
            file: super::cifar::TEST_FILE.into(),
            searched: searched.iter().map(|d| d.join(&spec.name)).collect(),
        })
    }
}

/// A data file's name that exists but is not a regular file (a directory, a FIFO, a
/// device) is an error, not a reason to read another copy from a later directory.
fn check_regular(root: &Path, spec: &DatasetSpec) -> Result<(), DataError> {
    let dir = root.join(&spec.name);
    for f in spec.files() {
        for path in [
            dir.join(&f.file_name),
            dir.join(f.file_name.trim_end_matches(".gz")),
        ] {
            if path.exists() && !path.is_file() {
                return Err(DataError::corrupt(
                    &path,
                    "is not a regular file (a directory, FIFO or device)".to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// The data set's files under `root/<name>/`, if all are there.
pub fn locate_in(root: &Path, spec: &DatasetSpec) -> Option<LocatedFiles> {
    let dir = root.join(&spec.name);
    let find = |role: FileRole| -> Option<PathBuf> {
        let name = &spec.file(role)?.file_name;
        let gz = dir.join(name);
        if gz.is_file() {
            return Some(gz);
        }
        let raw = dir.join(name.trim_end_matches(".gz"));
        raw.is_file().then_some(raw)
    };
    Some(LocatedFiles {
        train_images: find(FileRole::TrainImages)?,
        train_labels: find(FileRole::TrainLabels)?,
        test_images: find(FileRole::TestImages)?,
        test_labels: find(FileRole::TestLabels)?,
        dir,
    })
}

fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("mep").join("data"))
}
