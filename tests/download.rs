//! The downloader against an HTTP server on 127.0.0.1 serving the shared files, a truncated
//! body and a file with the wrong checksum.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{data_dir, scratch_dir};
use mep::data::download::{DownloadProgress, Downloader, NoProgress, sha256_file};
use mep::data::{
    self, Archive, Checksum, DataError, DataLocator, DatasetSpec, FileSpec, LoadOptions, Source,
};

/// What the test server answers for a path.
#[derive(Clone)]
enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// 200 announcing `len` bytes, then only the given prefix and a closed connection.
    Truncated { body: Vec<u8>, announced: usize },
}

/// Serves `routes` on 127.0.0.1 for the life of the test process; returns the base URL.
/// Unknown paths get 404. Each connection is handled on its own thread and closed after one
/// response; the server only ever talks to loopback clients.
fn serve(routes: HashMap<String, Reply>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = Arc::new(routes);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let routes = Arc::clone(&routes);
            thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .to_string();
                let (status, body, announced) = match routes.get(&path) {
                    Some(Reply::Body(b)) => ("200 OK", b.clone(), b.len()),
                    Some(Reply::Truncated { body, announced }) => {
                        ("200 OK", body.clone(), *announced)
                    }
                    None => ("404 Not Found", b"not found".to_vec(), 9),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {announced}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
                let _ = stream.flush();
            });
        }
    });
    format!("http://{addr}/")
}

fn no_temp_files(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".part")),
        Err(_) => true,
    }
}

/// The shared MNIST files, as a catalogue entry whose checksums are those of the shared copies
/// (they were re-compressed, so they differ from the original archives'), computed with
/// sha256sum when the test was written.
fn shared_mnist_spec(mirror: &str) -> DatasetSpec {
    let mut spec = data::find("mnist").unwrap();
    let sums = [
        "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
        "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
        "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
        "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
    ];
    let files: Vec<FileSpec> = spec
        .files()
        .iter()
        .zip(sums)
        .map(|(f, s)| FileSpec {
            sha256: s.into(),
            ..f.clone()
        })
        .collect();
    spec.source = Source::Idx {
        mirrors: vec![mirror.into()],
        files,
    };
    spec
}

fn mnist_routes() -> HashMap<String, Reply> {
    let dir = data_dir().join("mnist");
    data::find("mnist")
        .unwrap()
        .files()
        .iter()
        .map(|f| {
            (
                format!("/{}", f.file_name),
                Reply::Body(std::fs::read(dir.join(&f.file_name)).unwrap()),
            )
        })
        .collect()
}

/// Records the progress callbacks.
#[derive(Default)]
struct Recorder {
    starts: Vec<(String, Option<u64>)>,
    bytes: u64,
    finishes: usize,
}

impl DownloadProgress for Recorder {
    fn start(&mut self, url: &str, total: Option<u64>) {
        self.starts.push((url.to_string(), total));
    }
    fn advance(&mut self, bytes: u64) {
        self.bytes += bytes;
    }
    fn finish(&mut self) {
        self.finishes += 1;
    }
}

#[test]
fn progress_reports_the_size_and_every_byte() {
    let labels = std::fs::read(data_dir().join("mnist/train-labels-idx1-ubyte.gz")).unwrap();
    let base = serve(HashMap::from([(
        "/l.gz".to_string(),
        Reply::Body(labels.clone()),
    )]));
    let dest = scratch_dir("dl-progress").join("l.gz");
    let mut rec = Recorder::default();
    Downloader::default()
        .fetch_file(
            &format!("{base}l.gz"),
            "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
            &dest,
            &mut rec,
        )
        .unwrap();
    assert_eq!(
        rec.starts,
        vec![(format!("{base}l.gz"), Some(labels.len() as u64))]
    );
    assert_eq!(rec.bytes, labels.len() as u64);
    assert_eq!(rec.finishes, 1);
}

#[test]
fn fetches_a_whole_data_set_that_then_loads() {
    let base = serve(mnist_routes());
    let root = scratch_dir("dl-full");
    let spec = shared_mnist_spec(&base);
    let dir = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut NoProgress)
        .unwrap();
    assert_eq!(dir, root.join("mnist"));
    for f in spec.files() {
        assert_eq!(sha256_file(&dir.join(&f.file_name)).unwrap(), f.sha256);
    }
    assert!(no_temp_files(&dir));
    let ds = data::load(
        "mnist",
        &DataLocator::new(None, None, Some(root)),
        &LoadOptions::default(),
        0,
    )
    .unwrap();
    assert_eq!(ds.train.len(), 60_000);
    assert_eq!(&ds.test.labels()[..5], &[7, 2, 1, 0, 4]);
}

#[test]
fn falls_back_to_the_next_mirror() {
    let good = serve(mnist_routes());
    let empty = serve(HashMap::new());
    let root = scratch_dir("dl-mirrors");
    let spec = shared_mnist_spec(&good);
    let mirrors = vec![empty, good];
    Downloader::default()
        .fetch_dataset(&spec, Some(&mirrors), &root, &mut NoProgress)
        .unwrap();
    assert!(root.join("mnist/t10k-labels-idx1-ubyte.gz").is_file());
}

#[test]
fn truncated_body_wrong_checksum_and_404_leave_nothing_behind() {
    let labels = std::fs::read(data_dir().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    let sum = "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920";
    let mut tampered = labels.clone();
    tampered[100] ^= 0x55;
    let base = serve(HashMap::from([
        ("/good".to_string(), Reply::Body(labels.clone())),
        (
            "/short".to_string(),
            Reply::Truncated {
                body: labels[..1000].to_vec(),
                announced: labels.len(),
            },
        ),
        ("/tampered".to_string(), Reply::Body(tampered)),
    ]));
    let dir = scratch_dir("dl-bad");
    let dest = dir.join("t10k-labels-idx1-ubyte.gz");
    let dl = Downloader::default();

    match dl
        .fetch_file(&format!("{base}short"), sum, &dest, &mut NoProgress)
        .unwrap_err()
    {
        DataError::Download { url, reason } => {
            assert!(url.ends_with("/short"));
            assert!(
                reason.contains("1000") || reason.contains("connection"),
                "{reason}"
            );
        }
        other => panic!("expected Download error, got {other:?}"),
    }
    assert!(!dest.exists() && no_temp_files(&dir));

    match dl
        .fetch_file(&format!("{base}tampered"), sum, &dest, &mut NoProgress)
        .unwrap_err()
    {
        DataError::Checksum {
            expected, actual, ..
        } => {
            assert_eq!(expected, sum);
            assert_ne!(actual, sum);
        }
        other => panic!("expected Checksum error, got {other:?}"),
    }
    assert!(!dest.exists() && no_temp_files(&dir));

    match dl
        .fetch_file(&format!("{base}missing"), sum, &dest, &mut NoProgress)
        .unwrap_err()
    {
        DataError::Download { reason, .. } => assert!(reason.contains("404"), "{reason}"),
        other => panic!("expected Download error, got {other:?}"),
    }
    assert!(!dest.exists() && no_temp_files(&dir));

    // A failed download does not disturb a file already in place.
    dl.fetch_file(&format!("{base}good"), sum, &dest, &mut NoProgress)
        .unwrap();
    assert!(
        dl.fetch_file(&format!("{base}tampered"), sum, &dest, &mut NoProgress)
            .is_err()
    );
    assert_eq!(std::fs::read(&dest).unwrap(), labels);
}

#[test]
fn unreachable_server_is_a_download_error() {
    // Bind then drop a listener so the port is (almost certainly) closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = scratch_dir("dl-refused");
    let dest = dir.join("x.gz");
    let err = Downloader::new(Duration::from_secs(2), Duration::from_secs(5))
        .fetch_file(
            &format!("http://127.0.0.1:{port}/x.gz"),
            "00",
            &dest,
            &mut NoProgress,
        )
        .unwrap_err();
    assert!(matches!(err, DataError::Download { .. }), "{err:?}");
    assert!(!dest.exists() && no_temp_files(&dir));
}

#[test]
fn a_derived_set_fetches_its_base_set() {
    // The server holds the shared MNIST copies, whose checksums differ from the catalogue's
    // original archives: fetching permuted-mnist must ask for MNIST's first file and reject it.
    let base = serve(mnist_routes());
    let root = scratch_dir("dl-derived");
    let spec = data::find("permuted-mnist").unwrap();
    let err = Downloader::default()
        .fetch_dataset(&spec, Some(&[base]), &root, &mut NoProgress)
        .unwrap_err();
    match err {
        DataError::Checksum { url, .. } => {
            assert!(url.ends_with("/train-images-idx3-ubyte.gz"), "{url}")
        }
        other => panic!("expected a checksum error on MNIST's file, got {other:?}"),
    }
    assert!(no_temp_files(&root.join("mnist")));
}

#[test]
fn built_in_sets_cannot_be_fetched() {
    let spec = data::find("xor").unwrap();
    let err = Downloader::default()
        .fetch_dataset(&spec, None, &scratch_dir("dl-xor"), &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, DataError::NotDownloadable(_)));
}

#[test]
fn a_server_that_accepts_and_never_answers_fails_at_the_stall_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept connections and hold them open without a byte.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let dir = scratch_dir("dl-stall");
    let dest = dir.join("x.gz");
    let start = std::time::Instant::now();
    let err = Downloader::with_timeouts(
        Duration::from_secs(2),
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .fetch_file(
        &format!("http://127.0.0.1:{port}/x.gz"),
        "00",
        &dest,
        &mut NoProgress,
    )
    .unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(err, DataError::Download { .. }), "{err:?}");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert!(!dest.exists() && no_temp_files(&dir));
}

/// Records of one synthetic CIFAR-10 batch file: label `(file + i) % 10`, pixel bytes drawn
/// from the file and record index.
fn cifar_records(file: usize, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * 3073);
    for i in 0..count {
        out.push(((file + i) % 10) as u8);
        out.extend((0..3072).map(|p| ((p * 7 + i * 13 + file * 31) % 256) as u8));
    }
    out
}

/// A tar.gz holding `members` (path, bytes) as regular files, as the official archive
/// holds its batch files under `cifar-10-batches-bin/`.
fn tar_gz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, bytes.as_slice())
            .unwrap();
    }
    common::gzip(&builder.into_inner().unwrap())
}

/// The six batch files of a CIFAR-10 folder, `records` records each, at their paths in the
/// official archive, plus the archive's other members.
fn cifar_members(records: usize) -> Vec<(String, Vec<u8>)> {
    let mut members: Vec<(String, Vec<u8>)> = data::cifar::TRAIN_FILES
        .iter()
        .chain([&data::cifar::TEST_FILE])
        .enumerate()
        .map(|(k, name)| {
            (
                format!("cifar-10-batches-bin/{name}"),
                cifar_records(k, records),
            )
        })
        .collect();
    members.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        b"airplane\nautomobile\n".to_vec(),
    ));
    members
}

/// The catalogue's `cifar-10`, its archive named `name` on `mirror`, with `md5` and
/// `records` per batch file.
fn cifar_spec(mirror: &str, name: &str, md5: &str, records: usize) -> DatasetSpec {
    let mut spec = data::find("cifar-10").unwrap();
    assert!(matches!(
        spec.source,
        Source::CifarBinary {
            archive: Some(_),
            ..
        }
    ));
    spec.source = Source::CifarBinary {
        records,
        archive: Some(Archive {
            mirrors: vec![mirror.to_string()],
            file_name: name.to_string(),
            checksum: Checksum::Md5(md5.to_string()),
        }),
    };
    spec.train_count = 5 * records;
    spec.test_count = records;
    spec
}

fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", md5::compute(bytes))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn the_catalogue_names_the_official_cifar_archive() {
    let spec = data::find("cifar-10").unwrap();
    let Source::CifarBinary {
        records,
        archive: Some(archive),
    } = spec.source
    else {
        panic!("cifar-10 is downloadable");
    };
    assert_eq!(records, 10_000);
    assert_eq!((spec.train_count, spec.test_count), (50_000, 10_000));
    assert_eq!(
        format!("{}{}", archive.mirrors[0], archive.file_name),
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    );
    assert_eq!(
        archive.checksum,
        Checksum::Md5("c32a1d4ab5d03f1284b67883e8d87530".into())
    );
    // The shared subset stays a local copy: it cannot be fetched.
    let subset = data::find("cifar-10-subset").unwrap();
    assert!(matches!(
        Downloader::default().fetch_dataset(
            &subset,
            None,
            &scratch_dir("dl-subset"),
            &mut NoProgress
        ),
        Err(DataError::NotDownloadable(_))
    ));
}

#[test]
fn fetches_and_unpacks_cifar_which_then_loads() {
    let members = cifar_members(3);
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(p, b)| (p.as_str(), b.clone()))
        .collect();
    let archive = tar_gz(&refs);
    let base = serve(HashMap::from([(
        "/cifar.tar.gz".to_string(),
        Reply::Body(archive.clone()),
    )]));
    let root = scratch_dir("dl-cifar");
    let spec = cifar_spec(&base, "cifar.tar.gz", &md5_hex(&archive), 3);
    let mut rec = Recorder::default();
    let dir = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut rec)
        .unwrap();
    assert_eq!(dir, root.join("cifar-10"));
    assert_eq!(rec.bytes, archive.len() as u64);
    // The six batch files, byte for byte; the archive and its other members are gone.
    assert_eq!(
        files_in(&dir),
        [
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
            "test_batch.bin"
        ]
    );
    for (path, bytes) in &members[..6] {
        let name = path.rsplit('/').next().unwrap();
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
    let (train, test) = DataLocator::new(None, None, Some(root.clone()))
        .locate_cifar(&spec)
        .unwrap();
    let ds =
        data::dataset::load_cifar(&spec, &train, &test, 3, data::Normalization::UnitRange).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (15, 3));
    // Test file k = 5: labels (5 + i) % 10.
    assert_eq!(ds.test.labels(), &[5, 6, 7]);
    // A second fetch finds the files and downloads nothing.
    let mut again = Recorder::default();
    Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut again)
        .unwrap();
    assert!(again.starts.is_empty());
}

#[test]
fn a_damaged_or_incomplete_cifar_archive_leaves_no_batch_file() {
    let members = cifar_members(2);
    let refs: Vec<(&str, Vec<u8>)> = members
        .iter()
        .map(|(p, b)| (p.as_str(), b.clone()))
        .collect();
    let whole = tar_gz(&refs);
    // No test batch.
    let incomplete = tar_gz(&refs[..5]);
    // The gzip stream cut in the middle (its checksum is the cut bytes', so only
    // unpacking can notice).
    let cut = whole[..whole.len() / 2].to_vec();
    let base = serve(HashMap::from([
        ("/incomplete".to_string(), Reply::Body(incomplete.clone())),
        ("/cut".to_string(), Reply::Body(cut.clone())),
        ("/whole".to_string(), Reply::Body(whole.clone())),
    ]));
    let batch_files = |dir: &Path| {
        files_in(dir)
            .into_iter()
            .filter(|n| n.contains(".bin"))
            .collect::<Vec<_>>()
    };

    let root = scratch_dir("dl-cifar-incomplete");
    let spec = cifar_spec(&base, "incomplete", &md5_hex(&incomplete), 2);
    let err = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut NoProgress)
        .unwrap_err();
    assert!(
        matches!(&err, DataError::Corrupt { reason, .. } if reason.contains("no test_batch.bin")),
        "{err}"
    );
    assert!(batch_files(&root.join("cifar-10")).is_empty());

    let root = scratch_dir("dl-cifar-cut");
    let spec = cifar_spec(&base, "cut", &md5_hex(&cut), 2);
    let err = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut NoProgress)
        .unwrap_err();
    assert!(matches!(err, DataError::Corrupt { .. }), "{err}");
    assert!(batch_files(&root.join("cifar-10")).is_empty());

    // A wrong MD5: named as such, and nothing is kept, not even the archive.
    let root = scratch_dir("dl-cifar-md5");
    let spec = cifar_spec(&base, "whole", &md5_hex(b"something else"), 2);
    let err = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut NoProgress)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            DataError::Checksum {
                algorithm: "md5",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("expected md5"), "{err}");
    assert!(files_in(&root.join("cifar-10")).is_empty());
}

#[test]
fn archive_paths_never_choose_where_files_go() {
    // A member that climbs out of the folder is taken by its base name into the data set's
    // folder, never written where its path points.
    let mut members = cifar_members(2);
    members[0].0 = "../../escaped/data_batch_1.bin".into();
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in &members {
        let mut header = tar::Header::new_old();
        // Written into the header's raw name field: tar's own path setter refuses `..`.
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    let archive = common::gzip(&builder.into_inner().unwrap());
    let base = serve(HashMap::from([(
        "/a".to_string(),
        Reply::Body(archive.clone()),
    )]));
    let root = scratch_dir("dl-cifar-escape").join("deep");
    let spec = cifar_spec(&base, "a", &md5_hex(&archive), 2);
    let dir = Downloader::default()
        .fetch_dataset(&spec, None, &root, &mut NoProgress)
        .unwrap();
    assert_eq!(
        std::fs::read(dir.join("data_batch_1.bin")).unwrap(),
        members[0].1
    );
    assert!(!root.join("../escaped").exists());
    assert!(!root.join("../../escaped").exists());
}
