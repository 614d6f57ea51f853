//! A VM's image directory: listing, choosing the image to restore, retention
//! and merging of incremental layers.
//!
//! # Layout of the directory
//!
//! One file per committed image, `<created_ms>-<id>.rimg` (see [`crate::format`]),
//! its verdict `<created_ms>-<id>.verdict` once background verification has
//! run ([`Verdict`]: what [`ImageStore::latest_verified`] trusts instead of
//! reading memory; retention removes it with its image), plus
//! `.tmp-<id>-<pid>` files of writers in progress. A temporary file whose
//! writer is gone (no such process, or older than a day) is a crash leftover;
//! [`ImageStore::open`] removes it. Writers and the store must run in the same
//! pid namespace for that test to hold.
//!
//! # Order
//!
//! Images are ordered by `created_unix_ms` (when their state was captured),
//! then an incremental layer before a full image of the same time (a merge
//! result supersedes the layer it was made from), then by file name. Images
//! whose header cannot be read take the time in their file name.
//!
//! # Chains
//!
//! An incremental layer names its parent. A full image written by
//! [`ImageStore::merge`] records the layer whose state it holds
//! (`merged_from`), and stands in for that layer: when a layer's parent has
//! such a merged image, the chain goes through the merged image (and ends
//! there), else through the parent itself. So a VMM may go on layering on its
//! last image while the store merges in the background, and a restore never
//! walks a long chain. A *chain* is a full image plus the layers that resolve
//! to it.
//!
//! Merging a chain into a full image costs what the guest touched. While
//! the chain's layers together are small beside its full image,
//! [`ImageStore::compact`] writes them into one *compacted layer* instead:
//! an incremental image on the full image that also records `merged_from`
//! and stands in for its layer the same way (a full image merged from the
//! same layer is preferred). So the background work of a VM that keeps
//! rewriting a working set follows the working set, not its memory.
//! Retention counts a compacted layer, with the raw layers on it, as a chain
//! of its own, and keeps the full image under it.
//!
//! # Concurrency
//!
//! The store holds no lock and caches nothing: each call reads the directory
//! afresh. Writers only ever add files (atomic rename), retention and crash
//! cleanup only remove them, so a listing may miss an image committed while it
//! ran, never see half a one. Callers pass the ids in use to
//! [`ImageStore::retain`] so that an image being restored is never deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::format::{
    self, CommittedImage, Header, ImageId, ImageKind, ImageReader, ImageWriter, PageRun, ReadError,
    RegionPlan, SectionKind, WriteError, COPY_CHUNK, IMAGE_EXTENSION, PAGE_SIZE, TEMP_PREFIX,
};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `keep` was 0, which would leave nothing to fail over to.
    #[error("an image store must keep at least 1 consistency image chain")]
    ZeroKeep,
    /// The directory could not be created.
    #[error("cannot create image directory {}", dir.display())]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory could not be listed.
    #[error("cannot list image directory {}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file could not be removed.
    #[error("cannot remove {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A verdict could not be recorded.
    #[error("cannot record the verdict {}", path.display())]
    Verdict {
        /// The verdict file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The directory could not be synced after removals.
    #[error("cannot sync image directory {}", dir.display())]
    SyncDir {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `merge` was given an image that is not an incremental layer.
    #[error("image {id} is a {kind} image, not an incremental layer: there is nothing to merge")]
    NotALayer {
        /// The image.
        id: ImageId,
        /// Its kind.
        kind: &'static str,
    },
    /// The layer's chain back to a full image is broken.
    #[error("cannot merge layer {id}: {reason}")]
    BrokenChain {
        /// The layer.
        id: ImageId,
        /// Which link is missing or bad, and why.
        reason: String,
    },
    /// An image of the chain has memory regions unlike its base's.
    #[error(
        "cannot merge layer {id}: image {other} has other memory regions than its base {base}"
    )]
    RegionMismatch {
        /// The layer.
        id: ImageId,
        /// The image that differs.
        other: ImageId,
        /// The chain's full image.
        base: ImageId,
    },
    /// A source image failed while its pages were copied.
    #[error("cannot merge layer {id}")]
    MergeRead {
        /// The layer.
        id: ImageId,
        /// The read that failed.
        #[source]
        source: ReadError,
    },
    /// The merged image could not be written.
    #[error("cannot merge layer {id}")]
    MergeWrite {
        /// The layer.
        id: ImageId,
        /// The write that failed.
        #[source]
        source: WriteError,
    },
}

/// Whether an image checked out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum ImageStatus {
    /// Header and sections (and, for [`ImageStore::verify_all`], memory and
    /// chain) verify.
    Ok,
    /// Why not, naming the section.
    Bad(String),
}

impl fmt::Display for ImageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageStatus::Ok => f.write_str("ok"),
            ImageStatus::Bad(reason) => write!(f, "BAD: {reason}"),
        }
    }
}

/// One image file of a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageEntry {
    /// The file.
    pub path: PathBuf,
    /// Its id (from the header, else from the file name).
    pub id: Option<ImageId>,
    /// Its kind, if the header is readable.
    pub kind: Option<ImageKind>,
    /// For a merged full image, the layer it stands for.
    pub merged_from: Option<ImageId>,
    /// When its state was captured (from the header, else the file name).
    pub created_unix_ms: Option<u64>,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub bytes_on_disk: u64,
    /// File length, holes included.
    pub file_len: u64,
    /// Whether it verified.
    pub status: ImageStatus,
}

impl ImageEntry {
    /// Column headings matching the [`Display`](fmt::Display) rows.
    pub const HEADINGS: &'static str = "CREATED (UTC)            ID                                KIND         PARENT                                ON DISK       LENGTH  STATUS";

    /// The parent of an incremental layer.
    pub fn parent(&self) -> Option<ImageId> {
        self.kind.and_then(|k| k.parent())
    }
}

impl fmt::Display for ImageEntry {
    /// One row of `images list`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let created = self
            .created_unix_ms
            .map_or_else(|| "-".to_owned(), |ms| format::UtcTime(ms).to_string());
        let id = self.id.map_or_else(|| "-".to_owned(), |i| i.to_string());
        let kind = match (self.kind, self.merged_from) {
            (Some(ImageKind::Full), Some(_)) => "full(merged)",
            (Some(ImageKind::Incremental { .. }), Some(_)) => "compacted",
            (Some(k), _) => k.name(),
            (None, _) => "?",
        };
        let parent = self
            .parent()
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        write!(
            f,
            "{created:<24} {id:<33} {kind:<12} {parent:<33} {:>10} {:>12}  {}",
            Bytes(self.bytes_on_disk),
            Bytes(self.file_len),
            self.status
        )
    }
}

/// An image passed over by [`ImageStore::latest_good`] or
/// [`ImageStore::boot_image`], and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// Its id, if known.
    pub id: Option<ImageId>,
    /// Why it was passed over (the error chain, naming the section).
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skipped {}: {}", self.path.display(), self.reason)
    }
}

/// The outcome of choosing an image: the image (if any is good) and the newer
/// ones passed over, newest first. Both matter most when no image is good.
#[derive(Debug)]
pub struct Selection {
    /// The chosen image, verified (header, sections, memory, chain).
    pub image: Option<ImageReader>,
    /// Newer candidates that failed, newest first.
    pub skipped: Vec<Skipped>,
}

/// What background verification found of one image: its header, its
/// sections and every present page of its memory (a layer alone: its chain
/// is judged by the verdicts of its members). Kept beside the image as
/// `<created_ms>-<id>.verdict`, written once the image is committed and
/// again by a scrub, so that a failover can trust an image without reading
/// its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Verdict {
    /// The image's id.
    pub id: String,
    /// Whether everything verified.
    pub good: bool,
    /// Why not, naming the section.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was checked (unix ms).
    pub checked_unix_ms: u64,
}

/// The extension of verdict files.
pub const VERDICT_EXTENSION: &str = "verdict";

/// The verdict file of `image`.
pub fn verdict_path(image: &Path) -> PathBuf {
    image.with_extension(VERDICT_EXTENSION)
}

/// The newest image whose verdict, and its chain's, is good: what
/// [`ImageStore::latest_verified`] found.
#[derive(Debug)]
pub struct VerifiedSelection {
    /// The chosen image (header and sections checked, memory trusted by its
    /// verdicts, not read).
    pub image: Option<ImageReader>,
    /// Newer images whose verdict (or a chain member's) is bad, newest first.
    pub skipped: Vec<Skipped>,
    /// Newer images not verified yet, newest first.
    pub unverified: Vec<PathBuf>,
}

/// A chain's standing by verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Standing {
    Good,
    Unverified,
    Bad(String),
}

/// A VM's image directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    keep: usize,
}

impl ImageStore {
    /// Opens (creating it if needed) the image directory `dir`, keeping the
    /// newest `keep` consistency chains on [`retain`](Self::retain). Removes
    /// temporary files left by crashed writers.
    pub fn open(dir: &Path, keep: usize) -> Result<Self, StoreError> {
        if keep == 0 {
            return Err(StoreError::ZeroKeep);
        }
        crate::private::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        let store = ImageStore {
            dir: dir.to_owned(),
            keep,
        };
        let mut removed = false;
        for entry in store.read_dir()? {
            let name = entry.file_name();
            let is_temp = name.to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX));
            let path = entry.path();
            if is_temp && format::temp_is_stale(&path) {
                match fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(StoreError::Remove { path, source }),
                }
            }
        }
        if removed {
            store.sync()?;
        }
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many consistency chains [`retain`](Self::retain) keeps.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// Every `*.rimg` file, oldest first, with its header fields and whether
    /// its header and non-memory sections verify (memory is not read: see
    /// [`verify_all`](Self::verify_all)).
    pub fn list(&self) -> Result<Vec<ImageEntry>, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        Ok(cat
            .files
            .iter()
            .map(|f| {
                let status = match &f.header {
                    Err(reason) => ImageStatus::Bad(reason.clone()),
                    Ok(_) => match ImageReader::open(&f.path) {
                        Ok(_) => ImageStatus::Ok,
                        Err(e) => ImageStatus::Bad(describe(&e)),
                    },
                };
                f.entry(status)
            })
            .collect())
    }

    /// Like [`list`](Self::list), but also reads and checks every image's
    /// memory and, for layers, their chain back to a full image.
    pub fn verify_all(&self) -> Result<Vec<ImageEntry>, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        let mut check = Checker::new(&cat);
        Ok((0..cat.files.len())
            .map(|i| {
                let status = match check.good(i, 0) {
                    Ok(()) => ImageStatus::Ok,
                    Err(reason) => ImageStatus::Bad(reason),
                };
                cat.files[i].entry(status)
            })
            .collect())
    }

    /// The recorded verdict of `image`, if one is recorded for this very
    /// image (same id).
    pub fn verdict(&self, image: &Path) -> Option<Verdict> {
        let bytes = fs::read(verdict_path(image)).ok()?;
        let verdict: Verdict = serde_json::from_slice(&bytes).ok()?;
        let id = ImageReader::read_header(image).ok()?.id;
        (verdict.id == id.to_string()).then_some(verdict)
    }

    /// Verifies `image` (header, sections, every present page) and records
    /// the verdict beside it (written, fsynced, renamed into place). A
    /// failure to record is an error; the verdict itself is the answer.
    pub fn verify(&self, image: &Path) -> Result<Verdict, StoreError> {
        let checked = ImageReader::open(image).and_then(|r| {
            r.verify_memory()?;
            Ok(r.id())
        });
        let id = match &checked {
            Ok(id) => id.to_string(),
            Err(_) => ImageReader::read_header(image)
                .map(|h| h.id.to_string())
                .unwrap_or_default(),
        };
        let verdict = Verdict {
            id,
            good: checked.is_ok(),
            reason: checked.err().map(|e| describe(&e)),
            checked_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let path = verdict_path(image);
        let tmp = path.with_extension("verdict-new");
        let bytes = serde_json::to_vec(&verdict).unwrap_or_default();
        let written = crate::private::create_file(&tmp)
            .and_then(|mut f| {
                io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Verdict { path, source });
        }
        Ok(verdict)
    }

    /// The newest consistency image that background verification found
    /// good, with every image of its chain: a failover takes it without
    /// reading guest memory. Newer images with a bad verdict are `skipped`,
    /// newer ones not verified yet are `unverified` (a caller with nothing
    /// verified may fall back to [`latest_good`](Self::latest_good), which
    /// reads them).
    pub fn latest_verified(&self) -> Result<VerifiedSelection, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        let mut memo: HashMap<usize, Standing> = HashMap::new();
        let mut skipped = Vec::new();
        let mut unverified = Vec::new();
        for (i, f) in cat.files.iter().enumerate().rev() {
            match &f.header {
                Ok(h) if h.kind.is_consistency() => {}
                _ => continue,
            }
            match self.standing(&cat, i, &mut memo, 0) {
                Standing::Good => match ImageReader::open(&f.path) {
                    Ok(reader) => {
                        return Ok(VerifiedSelection {
                            image: Some(reader),
                            skipped,
                            unverified,
                        })
                    }
                    Err(e) => skipped.push(Skipped {
                        path: f.path.clone(),
                        id: f.id(),
                        reason: describe(&e),
                    }),
                },
                Standing::Bad(reason) => skipped.push(Skipped {
                    path: f.path.clone(),
                    id: f.id(),
                    reason,
                }),
                Standing::Unverified => unverified.push(f.path.clone()),
            }
        }
        Ok(VerifiedSelection {
            image: None,
            skipped,
            unverified,
        })
    }

    /// Image `i`'s standing by its verdict and, for a layer, its parent's:
    /// the first parent candidate that stands good makes it good.
    fn standing(
        &self,
        cat: &Catalog,
        i: usize,
        memo: &mut HashMap<usize, Standing>,
        depth: usize,
    ) -> Standing {
        if let Some(s) = memo.get(&i) {
            return s.clone();
        }
        if depth > cat.files.len() {
            return Standing::Bad("its chain of parents loops".into());
        }
        let f = &cat.files[i];
        let own = match self.verdict(&f.path) {
            None => Standing::Unverified,
            Some(v) if !v.good => Standing::Bad(format!(
                "background verification failed: {}",
                v.reason.unwrap_or_default()
            )),
            Some(_) => Standing::Good,
        };
        let standing = match (&own, f.header.as_ref().map(|h| h.kind)) {
            (Standing::Good, Ok(ImageKind::Incremental { parent })) => {
                let mut result = Standing::Bad(format!("its parent {parent} is missing"));
                for c in cat.parent_candidates(parent) {
                    match self.standing(cat, c, memo, depth + 1) {
                        Standing::Good => {
                            result = Standing::Good;
                            break;
                        }
                        Standing::Unverified => result = Standing::Unverified,
                        Standing::Bad(reason) if !matches!(result, Standing::Unverified) => {
                            result = Standing::Bad(format!("its parent {parent} is bad: {reason}"));
                        }
                        Standing::Bad(_) => {}
                    }
                }
                result
            }
            _ => own,
        };
        memo.insert(i, standing.clone());
        standing
    }

    /// The chain `image` resolves to, by headers alone (no page is read):
    /// its full image first, then each layer up to `image` itself. A layer's
    /// parent resolves to a full image merged from it when there is one
    /// (which ends the chain there), else to the parent itself.
    pub fn chain(&self, image: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        let name = image.file_name();
        let Some(start) = cat.files.iter().position(|f| f.path.file_name() == name) else {
            return Err(StoreError::BrokenChain {
                id: ImageReader::read_header(image)
                    .map(|h| h.id)
                    .unwrap_or_else(|_| ImageId::generate()),
                reason: format!("{} is not in {}", image.display(), self.dir.display()),
            });
        };
        let mut out = vec![start];
        let mut cur = start;
        while let Ok(Header {
            kind: ImageKind::Incremental { parent },
            id,
            ..
        }) = &cat.files[cur].header
        {
            let next = cat
                .parent_candidates(*parent)
                .into_iter()
                .find(|&c| cat.root_by_header(c, 0).is_some())
                .ok_or_else(|| StoreError::BrokenChain {
                    id: *id,
                    reason: format!(
                        "its parent {parent} is missing or does not reach a full image"
                    ),
                })?;
            if out.contains(&next) || out.len() > cat.files.len() {
                return Err(StoreError::BrokenChain {
                    id: *id,
                    reason: "its chain of parents loops".into(),
                });
            }
            out.push(next);
            cur = next;
        }
        out.reverse();
        Ok(out.into_iter().map(|i| cat.files[i].path.clone()).collect())
    }

    /// The path of the image with this id, if the store has it.
    pub fn find(&self, id: ImageId) -> Result<Option<PathBuf>, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        Ok(cat.by_id.get(&id).map(|&i| cat.files[i].path.clone()))
    }

    /// The newest consistency image that verifies completely: header,
    /// sections, memory and, for a layer, every image of its chain back to a
    /// full image. A layer chosen here can be restored through its chain or,
    /// better, [`merge`](Self::merge)d first.
    pub fn latest_good(&self) -> Result<Selection, StoreError> {
        self.pick(|kind| kind.is_consistency(), true)
    }

    /// The newest boot image that verifies completely.
    pub fn boot_image(&self) -> Result<Selection, StoreError> {
        self.pick(|kind| !kind.is_consistency(), false)
    }

    fn pick(
        &self,
        wanted: impl Fn(&ImageKind) -> bool,
        report_unreadable: bool,
    ) -> Result<Selection, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        let mut check = Checker::new(&cat);
        let mut skipped = Vec::new();
        for (i, f) in cat.files.iter().enumerate().rev() {
            match &f.header {
                Ok(h) if !wanted(&h.kind) => continue,
                Err(_) if !report_unreadable => continue,
                _ => {}
            }
            match check.good(i, 0) {
                Ok(()) => {
                    return Ok(Selection {
                        image: check.take_reader(i),
                        skipped,
                    })
                }
                Err(reason) => skipped.push(Skipped {
                    path: f.path.clone(),
                    id: f.id(),
                    reason,
                }),
            }
        }
        Ok(Selection {
            image: None,
            skipped,
        })
    }

    /// Deletes old images: keeps the newest `keep` consistency chains (a full
    /// image or a compacted layer, and the raw layers that resolve to it,
    /// count as one), everything a kept image depends on (a compacted
    /// layer's full image), every image in `in_use` and everything it
    /// depends on, and every boot image. Files whose header is unreadable
    /// and layers whose chain is broken are deleted only once they are older
    /// than every kept chain. Returns the deleted paths.
    pub fn retain(&self, in_use: &[ImageId]) -> Result<Vec<PathBuf>, StoreError> {
        let cat = Catalog::scan(&self.dir)?;
        let n = cat.files.len();
        let anchors: Vec<Option<usize>> = (0..n).map(|i| cat.anchor(i, 0)).collect();
        let mut chains: BTreeMap<usize, usize> = BTreeMap::new(); // anchor -> newest member
        for (i, anchor) in anchors.iter().enumerate() {
            if let Some(a) = anchor {
                let newest = chains.entry(*a).or_insert(i);
                *newest = (*newest).max(i);
            }
        }
        let mut by_recency: Vec<(usize, usize)> = chains.into_iter().map(|(a, m)| (m, a)).collect();
        by_recency.sort_unstable_by(|a, b| b.cmp(a));
        let kept_anchors: BTreeSet<usize> =
            by_recency.iter().take(self.keep).map(|&(_, a)| a).collect();
        let oldest_kept = kept_anchors.iter().copied().min();

        let mut keep = vec![false; n];
        for i in 0..n {
            let f = &cat.files[i];
            keep[i] = match (&f.header, anchors[i]) {
                (Ok(h), _) if !h.kind.is_consistency() => true,
                (Ok(_), Some(a)) => kept_anchors.contains(&a),
                // Unreadable or orphaned: kept while not older than every kept chain.
                _ => oldest_kept.is_none_or(|oldest| i > oldest),
            };
        }
        for i in 0..n {
            if keep[i] && anchors[i].is_some() {
                cat.mark_dependencies(i, &mut keep, 0);
            }
        }
        for id in in_use {
            for i in (0..n).filter(|&i| cat.files[i].id() == Some(*id)) {
                cat.mark_dependencies(i, &mut keep, 0);
            }
        }

        let mut deleted = Vec::new();
        for (f, kept) in cat.files.iter().zip(&keep) {
            if *kept {
                continue;
            }
            let _ = fs::remove_file(verdict_path(&f.path));
            match fs::remove_file(&f.path) {
                Ok(()) => deleted.push(f.path.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Remove {
                        path: f.path.clone(),
                        source,
                    })
                }
            }
        }
        // Verdicts of images removed by others (a discard after a failure).
        for entry in self.read_dir()? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == VERDICT_EXTENSION)
                && !path.with_extension(IMAGE_EXTENSION).exists()
            {
                let _ = fs::remove_file(&path);
            }
        }
        if !deleted.is_empty() {
            self.sync()?;
        }
        Ok(deleted)
    }

    /// Writes a new full image holding the state of `layer`: its chain's full
    /// image with every layer up to `layer` applied in order (a later layer's
    /// pages win), and `layer`'s non-memory sections (unknown optional ones
    /// are dropped). Every source is verified first, so corruption is never
    /// carried into the result. The new image takes `layer`'s creation time
    /// and records it in `merged_from`, so it supersedes `layer` and layers
    /// on `layer` resolve to it. Each present page is read and written once.
    pub fn merge(&self, layer: &ImageReader) -> Result<CommittedImage, StoreError> {
        let chain = self.verified_chain(layer)?;
        let chain: Vec<&ImageReader> = chain.iter().chain(std::iter::once(layer)).collect();
        write_merged(&self.dir, &chain, 0)
    }

    /// Shortens `layer`'s chain in the background at a cost that follows
    /// what the guest dirtied, not what it touched: while the layers of the
    /// chain together hold fewer than half as many pages as its full image
    /// ([`COMPACT_BELOW`]), they are compacted into one layer on that full
    /// image (an incremental image with `merged_from` = `layer`, which
    /// supersedes `layer` as a merged full image would); otherwise, or when
    /// there is only one layer, the chain is [`merge`](Self::merge)d into a
    /// new full image. Either way each byte written is one the chain's
    /// layers hold, plus, for a full merge, the base they have grown to
    /// rival, so the base is rewritten only after at least half its size
    /// was dirtied.
    pub fn compact(&self, layer: &ImageReader) -> Result<Compaction, StoreError> {
        let owned = self.verified_chain(layer)?;
        let chain: Vec<&ImageReader> = owned.iter().chain(std::iter::once(layer)).collect();
        let pages =
            |r: &&ImageReader| -> u64 { r.memory_map().iter().map(|m| m.present_pages()).sum() };
        let base_pages = pages(&chain[0]);
        let delta_pages: u64 = merge_plan(&chain, 1)
            .iter()
            .map(|(plan, _)| plan.present.iter().map(|r| r.count).sum::<u64>())
            .sum();
        let full = chain.len() <= 2
            || delta_pages.saturating_mul(COMPACT_BELOW.1)
                >= base_pages.saturating_mul(COMPACT_BELOW.0);
        Ok(Compaction {
            image: write_merged(&self.dir, &chain, if full { 0 } else { 1 })?,
            full,
            base_pages,
            delta_pages,
        })
    }

    /// The verified chain of `layer` without `layer` itself, full image
    /// first, every member's memory checked and its regions shaped like the
    /// base's.
    fn verified_chain(&self, layer: &ImageReader) -> Result<Vec<ImageReader>, StoreError> {
        let id = layer.id();
        let ImageKind::Incremental { parent } = layer.kind() else {
            return Err(StoreError::NotALayer {
                id,
                kind: layer.kind().name(),
            });
        };
        let broken = |reason| StoreError::BrokenChain { id, reason };
        layer
            .verify_memory()
            .map_err(|e| broken(format!("the layer itself is bad: {}", describe(&e))))?;
        let cat = Catalog::scan(&self.dir)?;
        let mut check = Checker::new(&cat);
        let first = check.resolve(parent, 0).map_err(broken)?;
        let mut indices = check.chain(first).map_err(broken)?;
        indices.reverse(); // full image first
        let mut owned: Vec<ImageReader> = Vec::with_capacity(indices.len());
        for i in indices {
            match check.take_reader(i) {
                Some(r) => owned.push(r),
                None => return Err(broken(format!("{} vanished", cat.files[i].path.display()))),
            }
        }
        let shape = |r: &ImageReader| -> Vec<(u64, u64)> {
            r.memory_map()
                .iter()
                .map(|m| (m.guest_addr, m.len))
                .collect()
        };
        let base = &owned[0];
        for r in owned[1..].iter().chain(std::iter::once(layer)) {
            if shape(r) != shape(base) {
                return Err(StoreError::RegionMismatch {
                    id,
                    other: r.id(),
                    base: base.id(),
                });
            }
        }
        Ok(owned)
    }

    fn read_dir(&self) -> Result<Vec<fs::DirEntry>, StoreError> {
        let err = |source| StoreError::ReadDir {
            dir: self.dir.clone(),
            source,
        };
        fs::read_dir(&self.dir)
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)
    }

    fn sync(&self) -> Result<(), StoreError> {
        format::sync_dir(&self.dir).map_err(|source| StoreError::SyncDir {
            dir: self.dir.clone(),
            source,
        })
    }
}

/// Layers are compacted into one while, together, they hold fewer pages
/// than `COMPACT_BELOW.0 / COMPACT_BELOW.1` of their full image's.
pub const COMPACT_BELOW: (u64, u64) = (1, 2);

/// What [`ImageStore::compact`] wrote.
#[derive(Debug)]
pub struct Compaction {
    /// The new image: a full image, or one layer on the chain's full image.
    pub image: CommittedImage,
    /// Whether it is a full image.
    pub full: bool,
    /// Present pages of the chain's full image.
    pub base_pages: u64,
    /// Present pages of the chain's layers together.
    pub delta_pages: u64,
}

/// Writes the state of `chain`'s last image (a layer, its chain before it,
/// full image first) from `chain[from..]`: with `from` 0 a full image, with
/// `from` 1 a layer on `chain[0]` holding every page the layers hold. Either
/// takes the layer's creation time, non-memory sections and id as
/// `merged_from`.
fn write_merged(
    dir: &Path,
    chain: &[&ImageReader],
    from: usize,
) -> Result<CommittedImage, StoreError> {
    let layer = chain[chain.len() - 1];
    let id = layer.id();
    let kind = if from == 0 {
        ImageKind::Full
    } else {
        ImageKind::Incremental {
            parent: chain[0].id(),
        }
    };
    let (plans, segments): (Vec<RegionPlan>, Vec<Vec<Seg>>) =
        merge_plan(chain, from).into_iter().unzip();
    let werr = |source| StoreError::MergeWrite { id, source };
    let rerr = |source| StoreError::MergeRead { id, source };
    let created = layer.header().created_unix_ms;
    let mut w = ImageWriter::create_with(dir, kind, created, Some(id)).map_err(werr)?;
    for e in &layer.header().sections {
        let Some(kind) = e
            .kind()
            .filter(|k| !matches!(k, SectionKind::Memory | SectionKind::MemoryMap))
        else {
            continue;
        };
        let payload = layer.section(kind).unwrap_or_default();
        w.push_section(e.code, e.version, e.flags, payload)
            .map_err(werr)?;
    }
    w.begin_memory(plans).map_err(werr)?;
    let mut buf = Vec::new();
    for (ri, segs) in segments.iter().enumerate() {
        for s in segs {
            let src = &chain[s.src];
            let layout = &src.memory_map()[ri];
            let mut at = s.start * PAGE_SIZE;
            let end = s.end * PAGE_SIZE;
            while at < end {
                let n = (end - at).min(COPY_CHUNK as u64) as usize;
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                src.read_memory(layout, at, &mut buf[..n]).map_err(rerr)?;
                w.write_memory(ri, at, &buf[..n]).map_err(werr)?;
                at += n as u64;
            }
        }
    }
    w.end_memory().map_err(werr)?;
    w.commit().map_err(werr)
}

/// For each region of `chain[from..]` (a chain, full image first): the
/// merged region (its present pages the union of theirs, regions shaped as
/// `chain[0]`'s) and which image supplies each run.
fn merge_plan(chain: &[&ImageReader], from: usize) -> Vec<(RegionPlan, Vec<Seg>)> {
    let (Some(base), Some(first)) = (chain.first(), chain.get(from)) else {
        return Vec::new();
    };
    base.memory_map()
        .iter()
        .enumerate()
        .map(|(ri, region)| {
            let mut segs: Vec<Seg> = first.memory_map()[ri]
                .present
                .iter()
                .map(|r| Seg {
                    start: r.first_page,
                    end: r.end(),
                    src: from,
                })
                .collect();
            for (src, img) in chain.iter().enumerate().skip(from + 1) {
                segs = overlay(&segs, &img.memory_map()[ri].present, src);
            }
            let mut present: Vec<PageRun> = Vec::new();
            for s in &segs {
                match present.last_mut() {
                    Some(last) if last.end() == s.start => last.count += s.end - s.start,
                    _ => present.push(PageRun {
                        first_page: s.start,
                        count: s.end - s.start,
                    }),
                }
            }
            let plan = RegionPlan {
                guest_addr: region.guest_addr,
                len: region.len,
                present,
            };
            (plan, segs)
        })
        .collect()
}

/// A run of pages `start..end` of one region, supplied by chain image `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seg {
    start: u64,
    end: u64,
    src: usize,
}

/// Lays `top` (from image `src`) over `below`: pages in `top` come from
/// `src`, the rest keep their source. Both inputs ascending and disjoint;
/// linear in their lengths.
fn overlay(below: &[Seg], top: &[PageRun], src: usize) -> Vec<Seg> {
    let mut out = Vec::with_capacity(below.len() + top.len());
    let mut rest = below.iter().copied();
    let mut cur = rest.next();
    for run in top {
        let (start, end) = (run.first_page, run.end());
        while let Some(s) = cur {
            if s.start >= end {
                break;
            }
            if s.start < start {
                out.push(Seg {
                    end: s.end.min(start),
                    ..s
                });
            }
            if s.end > end {
                cur = Some(Seg { start: end, ..s });
                break;
            }
            cur = rest.next();
        }
        out.push(Seg { start, end, src });
    }
    out.extend(cur);
    out.extend(rest);
    out
}

/// One `*.rimg` file as found in the directory.
struct FileInfo {
    path: PathBuf,
    name: String,
    name_ms: Option<u64>,
    name_id: Option<ImageId>,
    file_len: u64,
    bytes_on_disk: u64,
    header: Result<Header, String>,
}

impl FileInfo {
    fn id(&self) -> Option<ImageId> {
        self.header.as_ref().ok().map(|h| h.id).or(self.name_id)
    }

    fn entry(&self, status: ImageStatus) -> ImageEntry {
        let h = self.header.as_ref().ok();
        ImageEntry {
            path: self.path.clone(),
            id: self.id(),
            kind: h.map(|h| h.kind),
            merged_from: h.and_then(|h| h.merged_from),
            created_unix_ms: h.map(|h| h.created_unix_ms).or(self.name_ms),
            bytes_on_disk: self.bytes_on_disk,
            file_len: self.file_len,
            status,
        }
    }

    fn order_key(&self) -> (u64, u8, &str) {
        let h = self.header.as_ref().ok();
        let created = h.map(|h| h.created_unix_ms).or(self.name_ms).unwrap_or(0);
        let rank = match h.map(|h| (h.kind, h.merged_from.is_some())) {
            Some((ImageKind::Incremental { .. }, false)) => 0,
            Some((ImageKind::Incremental { .. }, true)) => 1,
            _ => 2,
        };
        (created, rank, &self.name)
    }
}

/// The directory's images, oldest first, with indexes by id.
struct Catalog {
    files: Vec<FileInfo>,
    by_id: HashMap<ImageId, usize>,
    /// Layer id -> the images merged from it (full images first, then
    /// compacted layers; newest first).
    merged: HashMap<ImageId, Vec<usize>>,
}

impl Catalog {
    fn scan(dir: &Path) -> Result<Catalog, StoreError> {
        let err = |source| StoreError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Some(stem) = name.strip_suffix(&format!(".{IMAGE_EXTENSION}")) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                // Removed since the listing: not an image any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(err(source)),
            };
            let (name_ms, name_id) = match stem.split_once('-') {
                Some((ms, id)) => (ms.parse().ok(), id.parse().ok()),
                None => (None, None),
            };
            let header = ImageReader::read_header(&path).map_err(|e| describe(&e));
            files.push(FileInfo {
                path,
                name_ms,
                name_id,
                file_len: meta.len(),
                bytes_on_disk: meta.blocks() * 512,
                header,
                name,
            });
        }
        files.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let mut by_id = HashMap::new();
        let mut merged: HashMap<ImageId, Vec<usize>> = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if let Ok(h) = &f.header {
                by_id.insert(h.id, i);
                if let (true, Some(from)) = (h.kind.is_consistency(), h.merged_from) {
                    merged.entry(from).or_default().insert(0, i);
                }
            }
        }
        Ok(Catalog {
            files,
            by_id,
            merged,
        })
    }

    /// Candidates for a layer's parent, in order of preference: full images
    /// merged from it (newest first), layers compacted from it, then the
    /// parent itself.
    fn parent_candidates(&self, parent: ImageId) -> Vec<usize> {
        let mut c = self.merged.get(&parent).cloned().unwrap_or_default();
        // Files are ordered by time, then a compacted layer before a full
        // image of the same time: a stable sort puts full images first.
        c.sort_by_key(|&i| {
            !matches!(
                self.files[i].header.as_ref().map(|h| h.kind),
                Ok(ImageKind::Full)
            )
        });
        c.extend(self.by_id.get(&parent));
        // A layer applies to a consistency image; a boot image is no parent.
        c.retain(|&i| {
            self.files[i]
                .header
                .as_ref()
                .map_or(true, |h| h.kind.is_consistency())
        });
        c
    }

    /// The full image a consistency image's chain ends at, by headers alone.
    fn root_by_header(&self, i: usize, depth: usize) -> Option<usize> {
        if depth > self.files.len() {
            return None;
        }
        match self.files[i].header.as_ref().ok()?.kind {
            ImageKind::Full => Some(i),
            ImageKind::Boot => None,
            ImageKind::Incremental { parent } => self
                .parent_candidates(parent)
                .into_iter()
                .find_map(|c| self.root_by_header(c, depth + 1)),
        }
    }

    /// The image that heads the chain of consistency image `i` for
    /// retention: a full image or a compacted layer (an image merged from a
    /// layer) stands for itself, a raw layer for what its parent resolves to
    /// (the first candidate that reaches a full image). `None` for a boot
    /// image, an unreadable one and a broken chain.
    fn anchor(&self, i: usize, depth: usize) -> Option<usize> {
        if depth > self.files.len() {
            return None;
        }
        let h = self.files[i].header.as_ref().ok()?;
        match h.kind {
            ImageKind::Boot => None,
            ImageKind::Full => Some(i),
            ImageKind::Incremental { .. } if h.merged_from.is_some() => {
                self.root_by_header(i, depth).map(|_| i)
            }
            ImageKind::Incremental { parent } => self
                .parent_candidates(parent)
                .into_iter()
                .find(|&c| self.root_by_header(c, depth + 1).is_some())
                .and_then(|c| self.anchor(c, depth + 1)),
        }
    }

    /// Marks `i` and the chain it resolves to as kept: for a layer, the
    /// first parent candidate whose chain reaches a full image (a merged
    /// image stands in for its layer, so the layers before a merge are not
    /// needed), or every candidate when none does (a broken chain keeps what
    /// might still mend it).
    ///
    /// Following every candidate instead kept each raw ancestor of the
    /// newest layer: the whole history since the last restore, one image
    /// more per checkpoint for as long as the VM ran.
    fn mark_dependencies(&self, i: usize, keep: &mut [bool], depth: usize) {
        if depth > self.files.len() {
            return;
        }
        keep[i] = true;
        if let Ok(Header {
            kind: ImageKind::Incremental { parent },
            ..
        }) = &self.files[i].header
        {
            let candidates = self.parent_candidates(*parent);
            match candidates
                .iter()
                .find(|&&c| self.root_by_header(c, depth + 1).is_some())
            {
                Some(&c) => self.mark_dependencies(c, keep, depth + 1),
                None => {
                    for c in candidates {
                        self.mark_dependencies(c, keep, depth + 1);
                    }
                }
            }
        }
    }
}

/// Full verification of images and chains, each image checked at most once.
struct Checker<'a> {
    cat: &'a Catalog,
    readers: HashMap<usize, ImageReader>,
    verdicts: HashMap<usize, Result<(), String>>,
    /// For a good layer: the index its parent resolved to.
    parents: HashMap<usize, usize>,
}

impl<'a> Checker<'a> {
    fn new(cat: &'a Catalog) -> Self {
        Checker {
            cat,
            readers: HashMap::new(),
            verdicts: HashMap::new(),
            parents: HashMap::new(),
        }
    }

    /// Whether image `i` verifies: header, sections, memory, and its chain.
    fn good(&mut self, i: usize, depth: usize) -> Result<(), String> {
        if let Some(v) = self.verdicts.get(&i) {
            return v.clone();
        }
        let verdict = self.check(i, depth);
        self.verdicts.insert(i, verdict.clone());
        verdict
    }

    fn check(&mut self, i: usize, depth: usize) -> Result<(), String> {
        if depth > self.cat.files.len() {
            return Err("its chain of parents loops".into());
        }
        let f = &self.cat.files[i];
        if let Err(reason) = &f.header {
            return Err(reason.clone());
        }
        let reader = ImageReader::open(&f.path).map_err(|e| describe(&e))?;
        reader.verify_memory().map_err(|e| describe(&e))?;
        let kind = reader.kind();
        self.readers.insert(i, reader);
        if let ImageKind::Incremental { parent } = kind {
            let p = self.resolve(parent, depth + 1)?;
            self.parents.insert(i, p);
        }
        Ok(())
    }

    /// The good image a layer's `parent` id resolves to.
    fn resolve(&mut self, parent: ImageId, depth: usize) -> Result<usize, String> {
        let candidates = self.cat.parent_candidates(parent);
        let mut why = None;
        for c in candidates {
            match self.good(c, depth) {
                Ok(()) => return Ok(c),
                Err(reason) => {
                    why.get_or_insert(reason);
                }
            }
        }
        Err(match why {
            None => format!("its parent {parent} is missing"),
            Some(reason) => format!("its parent {parent} is bad: {reason}"),
        })
    }

    /// The good chain from `i` back to its full image, `i` first.
    fn chain(&mut self, i: usize) -> Result<Vec<usize>, String> {
        self.good(i, 0)?;
        let mut out = vec![i];
        let mut cur = i;
        while let Some(&p) = self.parents.get(&cur) {
            if out.contains(&p) {
                return Err("its chain of parents loops".into());
            }
            out.push(p);
            cur = p;
        }
        Ok(out)
    }

    fn take_reader(&mut self, i: usize) -> Option<ImageReader> {
        self.readers.remove(&i)
    }
}

/// An error and its sources, joined with ": ".
fn describe(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        cur = cause.source();
    }
    s
}

/// A byte count in binary units.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        let text = if unit == 0 {
            format!("{} B", self.0)
        } else {
            format!("{v:.1} {}", UNITS[unit])
        };
        f.pad(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::test_support::*;
    use crate::format::{MemoryRegionSource, SECTION_OPTIONAL};

    const PAGES: u64 = 32;

    fn full(store: &ImageStore, tag: &str, mem: &[u8]) -> CommittedImage {
        write_image(
            store.dir(),
            ImageKind::Full,
            tag,
            mem,
            PageRun::nonzero(mem),
        )
    }

    fn layer(
        store: &ImageStore,
        parent: ImageId,
        tag: &str,
        mem: &[u8],
        dirty: Vec<PageRun>,
    ) -> CommittedImage {
        write_image(
            store.dir(),
            ImageKind::Incremental { parent },
            tag,
            mem,
            dirty,
        )
    }

    fn boot(store: &ImageStore) -> CommittedImage {
        let mut w = ImageWriter::create(store.dir(), ImageKind::Boot).unwrap();
        w.add_section(SectionKind::Config, 1, b"{\"boot\":true}")
            .unwrap();
        w.commit().unwrap()
    }

    fn memory_of(r: &ImageReader) -> Vec<u8> {
        let m = &r.memory_map()[0];
        let mut v = vec![0u8; m.len as usize];
        r.read_memory(m, 0, &mut v).unwrap();
        v
    }

    /// Flips a byte inside the first present page of an image's memory.
    fn corrupt_memory(path: &Path) {
        let r = ImageReader::open(path).unwrap();
        let m = &r.memory_map()[0];
        flip(
            path,
            m.file_offset + m.present[0].first_page * PAGE_SIZE + 5,
        );
    }

    fn names(paths: &[PathBuf]) -> BTreeSet<PathBuf> {
        paths.iter().cloned().collect()
    }

    #[test]
    fn open_creates_the_directory_and_removes_only_stale_temp_files() {
        let root = TempDir::new("store-open");
        let dir = root.path().join("vm1/images");
        assert!(matches!(
            ImageStore::open(&dir, 0),
            Err(StoreError::ZeroKeep)
        ));
        let store = ImageStore::open(&dir, 3).unwrap();
        assert!(dir.is_dir());
        assert_eq!(store.keep(), 3);

        let id = ImageId::generate();
        let dead = dir.join(format!("{TEMP_PREFIX}{id}-999999999"));
        let ours_unregistered = dir.join(format!("{TEMP_PREFIX}{id}-{}", std::process::id()));
        let junk = dir.join(format!("{TEMP_PREFIX}junk"));
        let live_other = dir.join(format!("{TEMP_PREFIX}{id}-1"));
        for p in [&dead, &ours_unregistered, &junk, &live_other] {
            fs::write(p, b"partial").unwrap();
        }
        let mut w = ImageWriter::create(&dir, ImageKind::Full).unwrap();
        w.add_section(SectionKind::Config, 1, b"{}").unwrap();
        let live = w.temp_path().to_owned();

        ImageStore::open(&dir, 3).unwrap();
        assert!(!dead.exists() && !ours_unregistered.exists() && !junk.exists());
        assert!(live.exists(), "a writer in progress keeps its file");
        assert!(
            live_other.exists(),
            "pid 1 is alive: its file may be in progress"
        );
        let mem = region(2, |_| 1);
        w.add_memory(&[MemoryRegionSource {
            guest_addr: 0,
            bytes: &mem,
            present: vec![run(0, 2)],
        }])
        .unwrap();
        let c = w.commit().unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.find(c.id).unwrap(), Some(c.path));
        assert_eq!(store.find(ImageId::generate()).unwrap(), None);
    }

    #[test]
    fn list_is_oldest_first_and_names_bad_sections() {
        let root = TempDir::new("store-list");
        let store = ImageStore::open(root.path(), 5).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let a = full(&store, "a", &mem);
        let b = layer(&store, a.id, "b", &mem, vec![run(3, 2)]);
        let c = boot(&store);
        let d = full(&store, "d", &mem);
        // Damage d's vm-state section and add a file that is no image at all.
        let h = ImageReader::read_header(&d.path).unwrap();
        flip(&d.path, h.section(SectionKind::VmState).unwrap().offset);
        fs::write(
            root.path().join("0000000000001-garbage.rimg"),
            b"not an image",
        )
        .unwrap();
        fs::write(root.path().join("notes.txt"), b"ignored").unwrap();

        let list = store.list().unwrap();
        let ids: Vec<_> = list.iter().map(|e| e.id).collect();
        assert_eq!(
            ids,
            vec![None, Some(a.id), Some(b.id), Some(c.id), Some(d.id)]
        );
        assert!(matches!(&list[0].status, ImageStatus::Bad(r) if r.contains("not a relive image")));
        assert_eq!(list[0].created_unix_ms, Some(1));
        assert_eq!(list[1].status, ImageStatus::Ok);
        assert_eq!(list[1].kind, Some(ImageKind::Full));
        assert_eq!(list[2].parent(), Some(a.id));
        assert_eq!(list[3].kind, Some(ImageKind::Boot));
        match &list[4].status {
            ImageStatus::Bad(reason) => assert!(reason.contains("vm-state section"), "{reason}"),
            ImageStatus::Ok => panic!("damaged image listed as ok"),
        }
        assert_eq!(list[1].file_len, a.file_len);
        assert!(list[1].bytes_on_disk > 0);
        assert!(
            list[2].bytes_on_disk < list[1].bytes_on_disk,
            "a layer is smaller"
        );
        let row = list[2].to_string();
        assert!(
            row.contains("incremental") && row.contains(&a.id.to_string()) && row.ends_with("ok"),
            "{row}"
        );
        assert!(list[4].to_string().contains("BAD: "));
        assert!(ImageEntry::HEADINGS.starts_with("CREATED"));
        let json = serde_json::to_value(&list[2]).unwrap();
        assert_eq!(json["kind"]["kind"], "incremental");
        assert_eq!(json["status"]["status"], "ok");

        // verify_all reads memory too, and follows chains.
        corrupt_memory(&a.path);
        let verified = store.verify_all().unwrap();
        assert!(matches!(&verified[1].status, ImageStatus::Bad(r) if r.contains("memory section")));
        assert!(
            matches!(&verified[2].status, ImageStatus::Bad(r) if r.contains("parent") && r.contains("memory section"))
        );
        assert_eq!(verified[3].status, ImageStatus::Ok);
    }

    #[test]
    fn latest_good_skips_a_corrupt_newest_image_and_says_why() {
        let root = TempDir::new("store-latest");
        let store = ImageStore::open(root.path(), 5).unwrap();
        let sel = store.latest_good().unwrap();
        assert!(sel.image.is_none() && sel.skipped.is_empty());

        let mem = region(PAGES, |p| p as u8 + 1);
        let a = full(&store, "a", &mem);
        let b = full(&store, "b", &mem);
        let c = full(&store, "c", &mem);
        boot(&store); // newer, but never a consistency image
        corrupt_memory(&c.path);
        flip(&b.path, 4000); // header
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.as_ref().map(ImageReader::id), Some(a.id));
        let skipped: Vec<_> = sel.skipped.iter().map(|s| s.id).collect();
        assert_eq!(skipped, vec![Some(c.id), Some(b.id)], "newest first");
        assert!(
            sel.skipped[0].reason.contains("memory section"),
            "{}",
            sel.skipped[0].reason
        );
        assert!(
            sel.skipped[1].reason.contains("header"),
            "{}",
            sel.skipped[1].reason
        );
        assert!(sel.skipped[0]
            .to_string()
            .contains(&*c.path.to_string_lossy()));

        corrupt_memory(&a.path);
        let sel = store.latest_good().unwrap();
        assert!(sel.image.is_none());
        assert_eq!(
            sel.skipped.len(),
            3,
            "the reasons survive when nothing is good"
        );
    }

    #[test]
    fn a_layer_counts_only_with_its_whole_chain() {
        let root = TempDir::new("store-chain");
        let store = ImageStore::open(root.path(), 5).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let a = full(&store, "a", &mem);
        let l1 = layer(&store, a.id, "l1", &mem, vec![run(1, 1)]);
        let l2 = layer(&store, l1.id, "l2", &mem, vec![run(2, 1)]);
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.unwrap().id(), l2.id);

        // A layer whose parent is gone is not restorable.
        let orphan = layer(&store, ImageId::generate(), "o", &mem, vec![run(0, 1)]);
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.unwrap().id(), l2.id);
        assert_eq!(sel.skipped[0].id, Some(orphan.id));
        assert!(
            sel.skipped[0].reason.contains("is missing"),
            "{}",
            sel.skipped[0].reason
        );
        fs::remove_file(&orphan.path).unwrap();

        // A bad link in the middle sends the choice back to the full image.
        let h = ImageReader::read_header(&l1.path).unwrap();
        flip(&l1.path, h.section(SectionKind::Config).unwrap().offset + 1);
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.unwrap().id(), a.id);
        let reasons: Vec<_> = sel
            .skipped
            .iter()
            .map(|s| (s.id, s.reason.clone()))
            .collect();
        assert_eq!(reasons[0].0, Some(l2.id));
        assert!(
            reasons[0].1.contains(&format!("parent {} is bad", l1.id)),
            "{}",
            reasons[0].1
        );
        assert!(reasons[0].1.contains("config section"), "{}", reasons[0].1);
        assert_eq!(reasons[1].0, Some(l1.id));
    }

    #[test]
    fn retention_keeps_n_chains_in_use_images_and_boot_images() {
        let root = TempDir::new("store-retain");
        let store = ImageStore::open(root.path(), 2).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let boot_img = boot(&store);
        let f1 = full(&store, "f1", &mem);
        let f1l = layer(&store, f1.id, "f1l", &mem, vec![run(0, 1)]);
        let f2 = full(&store, "f2", &mem);
        let f3 = full(&store, "f3", &mem);
        let f3l = layer(&store, f3.id, "f3l", &mem, vec![run(0, 1)]);
        let f4 = full(&store, "f4", &mem);
        let f4l1 = layer(&store, f4.id, "f4l1", &mem, vec![run(0, 1)]);
        let f4l2 = layer(&store, f4l1.id, "f4l2", &mem, vec![run(1, 1)]);

        // Two chains kept (f3 and f4 with their layers); f1's layer is in use,
        // so it stays and so does the full image it depends on.
        let deleted = store.retain(&[f1l.id]).unwrap();
        assert_eq!(names(&deleted), names(std::slice::from_ref(&f2.path)));
        let left: BTreeSet<_> = store.list().unwrap().into_iter().map(|e| e.path).collect();
        let expected = [&boot_img, &f1, &f1l, &f3, &f3l, &f4, &f4l1, &f4l2];
        assert_eq!(left, expected.iter().map(|c| c.path.clone()).collect());

        // Once nothing is in use, f1's chain goes; a newer chain pushes f3's out.
        let f5 = full(&store, "f5", &mem);
        let deleted = store.retain(&[]).unwrap();
        let gone = [&f1.path, &f1l.path, &f3.path, &f3l.path];
        assert_eq!(names(&deleted), gone.iter().map(|p| (*p).clone()).collect());
        let left: BTreeSet<_> = store.list().unwrap().into_iter().map(|e| e.path).collect();
        let expected = [&boot_img, &f4, &f4l1, &f4l2, &f5];
        assert_eq!(left, expected.iter().map(|c| c.path.clone()).collect());
        assert!(
            store.retain(&[]).unwrap().is_empty(),
            "retention is idempotent"
        );

        // An in-use layer keeps its whole chain even when the chain is old.
        let f6 = full(&store, "f6", &mem);
        let deleted = store.retain(&[f4l2.id]).unwrap();
        assert!(deleted.is_empty(), "{deleted:?}");
        let deleted = store.retain(&[]).unwrap();
        assert_eq!(names(&deleted), names(&[f4.path, f4l1.path, f4l2.path]));
        assert!(boot_img.path.exists() && f5.path.exists() && f6.path.exists());
    }

    /// A VM that runs for a long time after a restore: the VMM layers each
    /// image on the one before, merges every few layers and applies
    /// retention with the restored image and its newest layer in use, as
    /// `relive-vmm` does. The directory must stay bounded (it grew by one
    /// image per checkpoint when an in-use layer kept every raw ancestor).
    #[test]
    fn retention_holds_for_a_long_chain_of_merged_layers() {
        const KEEP: usize = 3;
        const MERGE_EVERY: usize = 4;
        let root = TempDir::new("store-retain-long");
        let store = ImageStore::open(root.path(), KEEP).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        boot(&store);
        let restored = full(&store, "restored", &mem);
        let mut last = restored.id;
        let mut most = 0;
        for n in 1..=60 {
            let l = layer(
                &store,
                last,
                &format!("l{n}"),
                &mem,
                vec![run(n as u64 % PAGES, 1)],
            );
            last = l.id;
            if n % MERGE_EVERY == 0 {
                store.merge(&ImageReader::open(&l.path).unwrap()).unwrap();
            }
            store.retain(&[restored.id, last]).unwrap();
            most = most.max(store.list().unwrap().len());
            // The newest state (the layer, or the full image merged from
            // it) is still the one a failover restores.
            let chosen = store.latest_good().unwrap();
            let image = chosen.image.as_ref().map(|r| r.header());
            assert!(
                image.is_some_and(|h| h.id == last || h.merged_from == Some(last)),
                "after layer {n}: {image:?}, skipped {:?}",
                chosen.skipped
            );
        }
        // The boot image, the restored image, and KEEP chains of a full image
        // and at most MERGE_EVERY layers.
        let bound = 2 + KEEP * (1 + MERGE_EVERY);
        assert!(
            most <= bound,
            "the directory held {most} images, more than {bound}"
        );
    }

    /// The guest memory `image` restores: its chain's full image with each
    /// layer's present pages laid over it, as a restore maps them.
    fn state_of(store: &ImageStore, image: &Path) -> Vec<u8> {
        let mut mem = Vec::new();
        for path in store.chain(image).unwrap() {
            let r = ImageReader::open(&path).unwrap();
            let m = &r.memory_map()[0];
            mem.resize(m.len as usize, 0);
            for run in &m.present {
                let (a, b) = (
                    (run.first_page * PAGE_SIZE) as usize,
                    (run.end() * PAGE_SIZE) as usize,
                );
                r.read_memory(m, a as u64, &mut mem[a..b]).unwrap();
            }
        }
        mem
    }

    /// Compaction writes the chain's layers (later pages winning) into one
    /// layer on its full image while they are small beside it, and a full
    /// merge once they reach half of it; every image restores the state it
    /// was taken with; the directory stays bounded and the full image under
    /// the compacted layers is kept.
    #[test]
    fn compaction_follows_the_dirtied_pages_and_merges_fully_once_they_rival_the_base() {
        const KEEP: usize = 3;
        const MERGE_EVERY: usize = 4;
        let root = TempDir::new("store-compact");
        let store = ImageStore::open(root.path(), KEEP).unwrap();
        let mut mem = region(PAGES, |p| p as u8 + 1);
        let base = full(&store, "base", &mem);
        let mut last = base.id;
        let (mut compacted, mut merged, mut most) = (0, 0, 0);
        let mut states: Vec<(ImageId, Vec<u8>)> = Vec::new();
        for n in 1..=64u64 {
            // Each layer rewrites one page, walking through memory: the
            // layers' union grows by a page per layer.
            let page = (n % PAGES) as usize;
            mem[page * PAGE_SIZE as usize..][..PAGE_SIZE as usize].fill(100 + n as u8);
            let l = layer(
                &store,
                last,
                &format!("l{n}"),
                &mem,
                vec![run(page as u64, 1)],
            );
            last = l.id;
            states.push((l.id, mem.clone()));
            if n as usize % MERGE_EVERY == 0 {
                let c = store.compact(&ImageReader::open(&l.path).unwrap()).unwrap();
                let r = ImageReader::open(&c.image.path).unwrap();
                assert_eq!(r.header().merged_from, Some(l.id));
                assert_eq!(state_of(&store, &c.image.path), mem, "after layer {n}");
                if c.full {
                    merged += 1;
                    assert_eq!(r.kind(), ImageKind::Full);
                    assert!(
                        c.delta_pages * 2 >= c.base_pages,
                        "a full merge with only {} of {} pages dirtied",
                        c.delta_pages,
                        c.base_pages
                    );
                } else {
                    compacted += 1;
                    // Only the layers' pages: the base is not rewritten.
                    assert_eq!(r.memory_map()[0].present_pages(), c.delta_pages);
                    assert!(matches!(r.kind(), ImageKind::Incremental { .. }));
                    assert!(c.delta_pages * 2 < c.base_pages);
                }
            }
            store.retain(&[last]).unwrap();
            most = most.max(store.list().unwrap().len());
            // The newest state is what a failover restores, through the
            // compacted layer once there is one.
            let chosen = store.latest_good().unwrap().image.unwrap();
            let h = chosen.header();
            assert!(
                h.id == last || h.merged_from == Some(last),
                "after layer {n}: {h:?}"
            );
            assert_eq!(state_of(&store, chosen.path()), mem, "after layer {n}");
            // Every image still in the directory restores its own state.
            for (id, state) in &states {
                if let Some(path) = store.find(*id).unwrap() {
                    assert_eq!(
                        &state_of(&store, &path),
                        state,
                        "layer {id} after layer {n}"
                    );
                }
            }
        }
        assert!(
            compacted >= 8,
            "{compacted} compactions, {merged} full merges"
        );
        assert!(merged >= 2, "{compacted} compactions, {merged} full merges");
        // KEEP chains of a head (full or compacted) and at most MERGE_EVERY
        // raw layers, plus the full image under compacted heads.
        let bound = 1 + KEEP * (1 + MERGE_EVERY);
        assert!(
            most <= bound,
            "the directory held {most} images, more than {bound}"
        );
    }

    /// Failover trusts verdicts: the newest image whose own verdict and
    /// chain are good, newer unverified or bad ones passed over and named.
    #[test]
    fn latest_verified_takes_the_newest_image_good_by_verdict_with_its_chain() {
        let root = TempDir::new("store-verdicts");
        let store = ImageStore::open(root.path(), 3).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let f = full(&store, "f", &mem);
        let l1 = layer(&store, f.id, "l1", &mem, vec![run(0, 1)]);
        let l2 = layer(&store, l1.id, "l2", &mem, vec![run(1, 1)]);
        let id = |s: &VerifiedSelection| s.image.as_ref().map(ImageReader::id);

        // Nothing verified yet: nothing to take, all three unverified.
        let none = store.latest_verified().unwrap();
        assert_eq!(id(&none), None);
        assert_eq!(
            none.unverified,
            [l2.path.clone(), l1.path.clone(), f.path.clone()]
        );

        assert!(store.verify(&f.path).unwrap().good);
        assert!(store.verify(&l1.path).unwrap().good);
        let chosen = store.latest_verified().unwrap();
        assert_eq!(id(&chosen), Some(l1.id));
        assert_eq!(chosen.unverified, std::slice::from_ref(&l2.path));

        // A layer whose own memory is bad is skipped, with the reason.
        corrupt_memory(&l2.path);
        let v = store.verify(&l2.path).unwrap();
        assert!(
            !v.good && v.reason.as_deref().is_some_and(|r| r.contains("memory")),
            "{v:?}"
        );
        let chosen = store.latest_verified().unwrap();
        assert_eq!(id(&chosen), Some(l1.id));
        assert_eq!(chosen.skipped.len(), 1);
        assert!(
            chosen.skipped[0]
                .reason
                .contains("background verification failed"),
            "{:?}",
            chosen.skipped
        );

        // A verdict of another image under this name does not count.
        fs::copy(verdict_path(&l1.path), verdict_path(&f.path)).unwrap();
        assert_eq!(store.verdict(&f.path), None);
        let chosen = store.latest_verified().unwrap();
        assert_eq!(id(&chosen), None, "l1's chain is no longer verified");

        // Retention removes verdicts with their images.
        store.verify(&f.path).unwrap();
        let f2 = full(&store, "f2", &mem);
        let f3 = full(&store, "f3", &mem);
        let f4 = full(&store, "f4", &mem);
        for img in [&f2, &f3, &f4] {
            store.verify(&img.path).unwrap();
        }
        store.retain(&[]).unwrap();
        for gone in [&f, &l1, &l2] {
            assert!(
                !gone.path.exists() && !verdict_path(&gone.path).exists(),
                "{}",
                gone.path.display()
            );
        }
        assert!(verdict_path(&f4.path).exists());
    }

    #[test]
    fn retention_deletes_broken_files_only_once_they_are_old() {
        let root = TempDir::new("store-retain-bad");
        let store = ImageStore::open(root.path(), 1).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let old_bad = root.path().join("0000000000001-garbage.rimg");
        fs::write(&old_bad, b"junk").unwrap();
        let a = full(&store, "a", &mem);
        let b = full(&store, "b", &mem);
        let newest_bad = full(&store, "c", &mem);
        fs::write(&newest_bad.path, b"RELIVEIM but nothing else").unwrap();
        let orphan = layer(&store, ImageId::generate(), "o", &mem, vec![run(0, 1)]);
        let deleted = store.retain(&[]).unwrap();
        assert_eq!(names(&deleted), names(&[old_bad, a.path]));
        assert!(b.path.exists() && newest_bad.path.exists() && orphan.path.exists());
    }

    #[test]
    fn merge_of_full_and_two_layers_is_a_full_image_with_the_layers_pages() {
        let root = TempDir::new("store-merge");
        let store = ImageStore::open(root.path(), 1).unwrap();
        // Base: pages 0..8 present (value 1), 20..24 present (value 2).
        let mut expected = vec![0u8; (PAGES * PAGE_SIZE) as usize];
        let fill = |m: &mut Vec<u8>, r: PageRun, v: u8| {
            let (a, b) = (
                (r.first_page * PAGE_SIZE) as usize,
                (r.end() * PAGE_SIZE) as usize,
            );
            m[a..b].fill(v);
        };
        let mut mem = expected.clone();
        fill(&mut mem, run(0, 8), 1);
        fill(&mut mem, run(20, 4), 2);
        let base = write_image(
            store.dir(),
            ImageKind::Full,
            "base",
            &mem,
            vec![run(0, 8), run(20, 4)],
        );
        // Layer 1 dirties 6..10 (value 3) and 30..32 (value 4).
        fill(&mut mem, run(6, 4), 3);
        fill(&mut mem, run(30, 2), 4);
        let l1 = layer(&store, base.id, "l1", &mem, vec![run(6, 4), run(30, 2)]);
        // Layer 2 dirties 2..3 and 7..8 (value 5), and 21 (value 6).
        fill(&mut mem, run(2, 1), 5);
        fill(&mut mem, run(7, 1), 5);
        fill(&mut mem, run(21, 1), 6);
        let l2 = layer(
            &store,
            l1.id,
            "l2",
            &mem,
            vec![run(2, 1), run(7, 1), run(21, 1)],
        );
        expected.copy_from_slice(&mem);

        let l2r = ImageReader::open(&l2.path).unwrap();
        let merged = store.merge(&l2r).unwrap();
        assert_eq!(merged.kind, ImageKind::Full);
        assert_eq!(merged.created_unix_ms, l2.created_unix_ms);
        let m = ImageReader::open(&merged.path).unwrap();
        m.verify_memory().unwrap();
        assert_eq!(m.kind(), ImageKind::Full);
        assert_eq!(m.header().merged_from, Some(l2.id));
        assert!(memory_of(&m) == expected, "merged memory differs");
        assert_eq!(
            m.memory_map()[0].present,
            vec![run(0, 10), run(20, 4), run(30, 2)]
        );
        for k in [
            SectionKind::Config,
            SectionKind::VmState,
            SectionKind::AppStatus,
        ] {
            assert_eq!(m.section(k), l2r.section(k), "{k}");
        }
        assert!(
            String::from_utf8_lossy(m.section(SectionKind::Config).unwrap()).contains("\"l2\"")
        );

        // The merged image supersedes l2: latest_good picks it, not the chain.
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.unwrap().id(), merged.id);
        assert!(sel.skipped.is_empty());
        assert!(matches!(
            store.merge(&m),
            Err(StoreError::NotALayer { kind: "full", .. })
        ));

        // The VMM goes on layering on l2: that layer resolves to the merged
        // image, so retention (keep 1) can drop the old chain.
        fill(&mut mem, run(31, 1), 7);
        let l3 = layer(&store, l2.id, "l3", &mem, vec![run(31, 1)]);
        let sel = store.latest_good().unwrap();
        assert_eq!(sel.image.as_ref().unwrap().id(), l3.id);
        let deleted = store.retain(&[]).unwrap();
        assert_eq!(names(&deleted), names(&[base.path, l1.path, l2.path]));
        let l3r = sel.image.unwrap();
        let merged2 = store.merge(&l3r).unwrap();
        let m2 = ImageReader::open(&merged2.path).unwrap();
        assert!(memory_of(&m2) == mem);
        m2.verify_memory().unwrap();
    }

    #[test]
    fn merge_refuses_a_corrupt_source() {
        let root = TempDir::new("store-merge-bad");
        let store = ImageStore::open(root.path(), 1).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let base = full(&store, "base", &mem);
        let l1 = layer(&store, base.id, "l1", &mem, vec![run(1, 1)]);
        corrupt_memory(&base.path);
        let r = ImageReader::open(&l1.path).unwrap();
        let err = store.merge(&r).unwrap_err();
        assert!(matches!(err, StoreError::BrokenChain { .. }), "{err:?}");
        assert!(err.to_string().contains("memory section"), "{err}");
        assert_eq!(store.list().unwrap().len(), 2, "nothing written");
        assert!(root.names().iter().all(|n| !n.starts_with(TEMP_PREFIX)));
    }

    #[test]
    fn merge_keeps_optional_sections_of_known_kinds_and_checks_regions() {
        let root = TempDir::new("store-merge-regions");
        let store = ImageStore::open(root.path(), 1).unwrap();
        let mem = region(PAGES, |p| p as u8 + 1);
        let base = full(&store, "base", &mem);
        let small = region(PAGES / 2, |_| 9);
        let mut w =
            ImageWriter::create(store.dir(), ImageKind::Incremental { parent: base.id }).unwrap();
        w.push_section(SectionKind::Limits.code(), 4, SECTION_OPTIONAL, b"{}")
            .unwrap();
        w.add_memory(&[MemoryRegionSource {
            guest_addr: 0,
            bytes: &small,
            present: vec![run(0, 1)],
        }])
        .unwrap();
        let l = w.commit().unwrap();
        let err = store
            .merge(&ImageReader::open(&l.path).unwrap())
            .unwrap_err();
        assert!(matches!(err, StoreError::RegionMismatch { .. }), "{err:?}");
    }

    #[test]
    fn overlay_lets_the_later_layer_win() {
        let seg = |start, end, src| Seg { start, end, src };
        let below = vec![seg(0, 10, 0), seg(20, 30, 0)];
        assert_eq!(overlay(&below, &[], 1), below);
        assert_eq!(
            overlay(&below, &[run(5, 20)], 1),
            vec![seg(0, 5, 0), seg(5, 25, 1), seg(25, 30, 0)]
        );
        assert_eq!(
            overlay(&below, &[run(10, 10), run(40, 1)], 2),
            vec![
                seg(0, 10, 0),
                seg(10, 20, 2),
                seg(20, 30, 0),
                seg(40, 41, 2)
            ]
        );
        assert_eq!(
            overlay(&below, &[run(0, 1), run(2, 1), run(22, 8)], 1),
            vec![
                seg(0, 1, 1),
                seg(1, 2, 0),
                seg(2, 3, 1),
                seg(3, 10, 0),
                seg(20, 22, 0),
                seg(22, 30, 1)
            ]
        );
        assert_eq!(overlay(&[], &[run(3, 2)], 4), vec![seg(3, 5, 4)]);
    }

    #[test]
    fn describe_joins_the_error_chain() {
        let err = ReadError::Io {
            path: "/x.rimg".into(),
            source: io::Error::from_raw_os_error(5),
        };
        let text = describe(&err);
        assert!(text.starts_with("cannot read image /x.rimg: "), "{text}");
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(3 << 20).to_string(), "3.0 MiB");
    }

    #[test]
    fn store_errors_name_their_subject() {
        let root = TempDir::new("store-err");
        let file = root.path().join("plain");
        fs::write(&file, b"x").unwrap();
        let err = ImageStore::open(&file.join("sub"), 1).unwrap_err();
        assert!(matches!(err, StoreError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("plain/sub"), "{err}");
    }
}
