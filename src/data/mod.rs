//! Data: IDX and CIFAR-10 binary files, the catalogue of named data sets, lookup on disk, verified downloads and
//! mini-batching.

pub mod augment;
pub mod batch;
pub mod catalog;
pub mod cifar;
pub mod dataset;
pub mod download;
mod error;
pub mod idx;
pub mod locate;
mod stream;
pub mod unpack;

pub use augment::Augment;
pub use batch::{Batch, Batcher, epoch_order, one_hot_into};
pub use catalog::{Archive, Checksum, DatasetSpec, FileRole, FileSpec, Source, catalog, find};
pub use dataset::{Dataset, LoadOptions, Normalization, Split, load};
pub use error::DataError;
pub use locate::{DATA_DIR_ENV, DataLocator, LocatedFiles};
