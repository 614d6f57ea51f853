//! The image store's background work for one VMM: verifying each committed
//! image (the verdict a failover trusts instead of reading memory), merging
//! long chains, retention, and scrubbing old verdicts. One thread, started
//! on first use, works through a queue; none of it is on a checkpoint's or a
//! failover's path.
//!
//! The queue coalesces what only matters once: a newer merge replaces one
//! still waiting (it covers the older layer's state), a newer retention
//! replaces one still waiting, one search for unverified images is enough. Every verification runs (each image needs its
//! verdict); one of an image removed meanwhile is skipped.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relive_images::format::{ImageId, ImageReader};
use relive_images::store::ImageStore;

/// A verdict older than this is checked again (one image per retention).
pub const SCRUB_AFTER: Duration = Duration::from_secs(600);

/// Work for the store's thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Verify a committed image and record its verdict.
    Verify(PathBuf),
    /// Merge a layer's chain into a full image, or compact its layers into
    /// one ([`ImageStore::compact`]), then verify the result.
    Merge(PathBuf),
    /// Apply retention, keeping these images and their chains.
    Retain(Vec<ImageId>),
    /// Verify every image that has no verdict, newest first: those whose
    /// verification a killed VMM never finished. Until they have one, a
    /// failover cannot trust them (nor layers on them) without reading them.
    VerifyMissing,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The queue and its thread.
pub struct Housekeeper {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    /// Joined only by tests: a VMM never waits for its housekeeping.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Housekeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Housekeeper").finish_non_exhaustive()
    }
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Housekeeper {
    /// Starts the thread working on `store`.
    pub fn start(store: Arc<ImageStore>) -> std::io::Result<Housekeeper> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let worker = queue.clone();
        let thread = std::thread::Builder::new()
            .name("image-store".into())
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::ImageStore);
                run(&store, &worker)
            })?;
        Ok(Housekeeper {
            queue,
            thread: Some(thread),
        })
    }

    /// Queues `job` (see the module docs for what is coalesced).
    pub fn push(&self, job: Job) {
        let (q, wake) = &*self.queue;
        let mut q = lock(q);
        match &job {
            Job::Merge(_) => q.jobs.retain(|j| !matches!(j, Job::Merge(_))),
            Job::Retain(_) => q.jobs.retain(|j| !matches!(j, Job::Retain(_))),
            Job::VerifyMissing => q.jobs.retain(|j| *j != Job::VerifyMissing),
            Job::Verify(_) => {}
        }
        q.jobs.push_back(job);
        wake.notify_one();
    }

    /// Waits until every queued job is done (tests).
    #[cfg(test)]
    pub fn drain(mut self) {
        self.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn close(&self) {
        let (q, wake) = &*self.queue;
        lock(q).closed = true;
        wake.notify_one();
    }
}

impl Drop for Housekeeper {
    /// The thread finishes what is queued and ends; nobody waits for it (a
    /// VMM that exits leaves the rest to the next one's retention and scrub).
    fn drop(&mut self) {
        self.close();
    }
}

fn run(store: &ImageStore, queue: &(Mutex<Queue>, Condvar)) {
    let (q, wake) = queue;
    loop {
        let job = {
            let mut guard = lock(q);
            loop {
                if let Some(job) = guard.jobs.pop_front() {
                    break job;
                }
                if guard.closed {
                    return;
                }
                guard = wake
                    .wait(guard)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        match job {
            Job::Verify(path) => verify(store, &path),
            Job::Merge(layer) => {
                match ImageReader::open(&layer)
                    .map_err(|e| e.to_string())
                    .and_then(|r| {
                        store
                            .compact(&r)
                            .map_err(|e| relive_control::error_chain(&e))
                    }) {
                    Ok(c) => {
                        tracing::info!(
                            image = %c.image.id,
                            full = c.full,
                            base_pages = c.base_pages,
                            delta_pages = c.delta_pages,
                            "merged an image chain"
                        );
                        verify(store, &c.image.path);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot merge the image chain"),
                }
            }
            Job::VerifyMissing => verify_missing(store),
            Job::Retain(in_use) => {
                if let Err(e) = store.retain(&in_use) {
                    tracing::warn!(error = %relive_control::error_chain(&e), "image retention failed");
                }
                scrub_one(store);
            }
        }
    }
}

fn verify(store: &ImageStore, path: &std::path::Path) {
    if !path.exists() {
        return;
    }
    match store.verify(path) {
        Ok(v) if v.good => tracing::debug!(image = %path.display(), "image verified"),
        Ok(v) => tracing::warn!(
            image = %path.display(),
            reason = v.reason.as_deref().unwrap_or(""),
            "image failed verification: failovers will pass it over"
        ),
        Err(e) => {
            tracing::warn!(error = %relive_control::error_chain(&e), "cannot record a verdict")
        }
    }
}

/// Verifies each image of the store that has no verdict, newest first.
fn verify_missing(store: &ImageStore) {
    let Ok(entries) = store.list() else {
        return;
    };
    for e in entries.iter().rev() {
        if store.verdict(&e.path).is_none() {
            verify(store, &e.path);
        }
    }
}

/// Checks again the image whose verdict is the oldest, if it is older than
/// [`SCRUB_AFTER`].
fn scrub_one(store: &ImageStore) {
    let Ok(entries) = store.list() else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let stale = entries
        .iter()
        .filter_map(|e| Some((store.verdict(&e.path)?.checked_unix_ms, &e.path)))
        .filter(|(at, _)| now.saturating_sub(*at) > SCRUB_AFTER.as_millis() as u64)
        .min_by_key(|(at, _)| *at);
    if let Some((_, path)) = stale {
        verify(store, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relive_images::format::{ImageKind, ImageWriter, MemoryRegionSource, PageRun};
    use relive_images::store::verdict_path;

    fn image(
        store: &ImageStore,
        kind: ImageKind,
        fill: u8,
    ) -> relive_images::format::CommittedImage {
        let mem = vec![fill; 8 * 4096];
        let mut w = ImageWriter::create(store.dir(), kind).unwrap();
        w.add_memory(&[MemoryRegionSource {
            guest_addr: 0,
            bytes: &mem,
            present: vec![PageRun {
                first_page: 0,
                count: 8,
            }],
        }])
        .unwrap();
        w.commit().unwrap()
    }

    #[test]
    fn every_committed_image_gets_a_verdict_and_a_merge_is_verified_too() {
        let dir = std::env::temp_dir().join(format!("relive-housekeeping-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(ImageStore::open(&dir, 2).unwrap());
        let full = image(&store, ImageKind::Full, 1);
        let layer = image(&store, ImageKind::Incremental { parent: full.id }, 2);
        let h = Housekeeper::start(store.clone()).unwrap();
        h.push(Job::Verify(full.path.clone()));
        h.push(Job::Verify(layer.path.clone()));
        h.push(Job::Merge(layer.path.clone()));
        h.push(Job::Retain(vec![layer.id]));
        // A removed image is skipped, not an error.
        h.push(Job::Verify(dir.join("0000000000000-gone.rimg")));
        h.drain();
        for img in [&full, &layer] {
            let v = store.verdict(&img.path).expect("a verdict");
            assert!(v.good, "{v:?}");
        }
        let merged = store
            .list()
            .unwrap()
            .into_iter()
            .find(|e| e.merged_from == Some(layer.id))
            .expect("the layer was merged");
        assert!(store.verdict(&merged.path).is_some_and(|v| v.good));
        assert!(verdict_path(&merged.path).exists());
        let chosen = store.latest_verified().unwrap();
        assert_eq!(chosen.image.map(|r| r.id()), Some(merged.id.unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Images a killed VMM never verified get their verdict from the next
    /// one, so that failover can trust them (and the layers on them)
    /// without reading them.
    #[test]
    fn images_left_without_a_verdict_are_verified() {
        let dir = std::env::temp_dir().join(format!(
            "relive-housekeeping-missing-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(ImageStore::open(&dir, 3).unwrap());
        let full = image(&store, ImageKind::Full, 1);
        let layer = image(&store, ImageKind::Incremental { parent: full.id }, 2);
        // Nothing verified: a failover would have to read them.
        assert!(store.latest_verified().unwrap().image.is_none());
        let h = Housekeeper::start(store.clone()).unwrap();
        h.push(Job::VerifyMissing);
        h.push(Job::VerifyMissing); // coalesced or not, each verdict is written once more at most
        h.drain();
        for img in [&full, &layer] {
            assert!(
                store.verdict(&img.path).is_some_and(|v| v.good),
                "{}",
                img.path.display()
            );
        }
        let chosen = store.latest_verified().unwrap();
        assert_eq!(chosen.image.map(|r| r.id()), Some(layer.id));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
