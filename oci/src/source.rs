//! Reading an image: an OCI layout directory, an OCI or `docker save`
//! tarball, or a root directory (see the crate documentation).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use sha2::{Digest as _, Sha256};

use crate::tree::{self, Kind, LayerError, Node, Tree};
use crate::RunConfig;

/// Reading the image failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The input is not there.
    #[error("{path} does not exist: give an OCI layout directory, an OCI or `docker save` tarball, or a root directory (no registry is reached: `skopeo copy docker://IMAGE oci:DIR` or `docker save IMAGE -o IMAGE.tar` first)")]
    Missing {
        /// The input.
        path: PathBuf,
    },
    /// A file of the image could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A JSON document of the image does not parse.
    #[error("{path} is not a valid {what}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What it should be.
        what: &'static str,
        /// The parser's words.
        reason: String,
    },
    /// A blob the image refers to is missing.
    #[error("blob {digest} is missing ({path}): the layout is incomplete; copy the image again")]
    MissingBlob {
        /// Its digest.
        digest: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// A blob's content does not match its digest (or size).
    #[error("blob {path} does not match its descriptor: expected {expected}, found {found}: the image is corrupt; copy it again")]
    DigestMismatch {
        /// The blob.
        path: PathBuf,
        /// What the descriptor says.
        expected: String,
        /// What the content is.
        found: String,
    },
    /// A digest algorithm other than sha256.
    #[error("digest {digest}: only sha256 digests are supported")]
    Algorithm {
        /// The digest.
        digest: String,
    },
    /// No manifest for linux/amd64.
    #[error("{path} has no image for linux/amd64 (it has: {found}): relive runs x86_64 microVMs; pull the amd64 variant (`skopeo copy --override-arch amd64 ...`)")]
    NotAmd64 {
        /// The index or config.
        path: PathBuf,
        /// The platforms it has.
        found: String,
    },
    /// A layer could not be applied.
    #[error("layer {index} ({digest}) of {image}")]
    Layer {
        /// The image.
        image: PathBuf,
        /// Which layer, from 1.
        index: usize,
        /// Its digest or path.
        digest: String,
        /// Why.
        #[source]
        source: Box<LayerError>,
    },
    /// A tarball's entry would land outside the scratch directory.
    #[error("{path}: the archive's entry {entry:?} would land outside the directory it is unpacked into: the archive is malformed or malicious")]
    UnsafeArchive {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
    },
    /// The tarball is neither an OCI archive nor a `docker save` one.
    #[error("{path} is a tarball with neither `oci-layout` nor `manifest.json` at its top: not an OCI or `docker save` archive")]
    UnknownArchive {
        /// The archive.
        path: PathBuf,
    },
}

/// An image, read.
pub struct Image {
    /// What the input was.
    pub kind: &'static str,
    /// The root filesystem.
    pub tree: Tree,
    /// Layers applied.
    pub layers: usize,
    /// The run configuration of the image config.
    pub run: RunConfig,
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the image at `path`; a tarball is unpacked into a scratch
/// directory under `scratch_parent`, removed afterwards.
pub fn load(path: &Path, scratch_parent: &Path) -> Result<Image, SourceError> {
    let meta = std::fs::metadata(path).map_err(|_| SourceError::Missing {
        path: path.to_path_buf(),
    })?;
    if meta.is_dir() {
        if path.join("oci-layout").exists() {
            return load_layout(path, "OCI layout");
        }
        if path.join("manifest.json").exists() && !path.join("etc").exists() {
            return load_docker(path, "docker save directory");
        }
        return load_rootfs(path);
    }
    let scratch = Scratch::create(scratch_parent)?;
    unpack_archive(path, &scratch.0)?;
    if scratch.0.join("oci-layout").exists() {
        load_layout(&scratch.0, "OCI archive")
    } else if scratch.0.join("manifest.json").exists() {
        load_docker(&scratch.0, "docker save archive")
    } else {
        Err(SourceError::UnknownArchive {
            path: path.to_path_buf(),
        })
    }
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create(parent: &Path) -> Result<Scratch, SourceError> {
        let dir = parent.join(format!(".relive-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(read_err(&dir))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A reader of a file that may be gzip-compressed (by its magic).
fn maybe_gunzip(path: &Path) -> Result<Box<dyn Read>, SourceError> {
    let mut file = BufReader::new(File::open(path).map_err(read_err(path))?);
    let magic = {
        use io::BufRead;
        file.fill_buf()
            .map_err(read_err(path))?
            .get(..2)
            .map(<[u8]>::to_vec)
    };
    Ok(if magic.as_deref() == Some(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Unpacks an image tarball's files (blobs and JSON documents: regular
/// files and directories only) into `dir`, refusing entries that leave it.
fn unpack_archive(path: &Path, dir: &Path) -> Result<(), SourceError> {
    let mut archive = tar::Archive::new(maybe_gunzip(path)?);
    for entry in archive.entries().map_err(read_err(path))? {
        let mut entry = entry.map_err(read_err(path))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let relative = tree::normalize(&name).map_err(|_| SourceError::UnsafeArchive {
            path: path.to_path_buf(),
            entry: name.clone(),
        })?;
        if relative.is_empty() {
            continue;
        }
        let target = dir.join(&relative);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(read_err(&target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(read_err(parent))?;
                }
                let mut out = File::create(&target).map_err(read_err(&target))?;
                io::copy(&mut entry, &mut out).map_err(read_err(&target))?;
            }
            // An image archive holds files; links in it are not followed.
            _ => {}
        }
    }
    Ok(())
}

/// sha256 of everything read through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    len: u64,
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
            len: 0,
        }
    }

    /// Reads what is left (a tar stream ends before its padding), then
    /// gives `sha256:<hex>` and the length.
    fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("sha256:{:x}", self.hash.finalize()), self.len))
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// The path of blob `digest` in layout `dir`.
fn blob_path(dir: &Path, digest: &oci_spec::image::Digest) -> Result<PathBuf, SourceError> {
    if !matches!(digest.algorithm(), oci_spec::image::DigestAlgorithm::Sha256) {
        return Err(SourceError::Algorithm {
            digest: digest.to_string(),
        });
    }
    let path = dir.join("blobs").join("sha256").join(digest.digest());
    if !path.is_file() {
        return Err(SourceError::MissingBlob {
            digest: digest.to_string(),
            path,
        });
    }
    Ok(path)
}

/// A small blob (a JSON document), checked against its descriptor.
fn read_blob(dir: &Path, descriptor: &Descriptor) -> Result<(PathBuf, Vec<u8>), SourceError> {
    let path = blob_path(dir, descriptor.digest())?;
    let bytes = std::fs::read(&path).map_err(read_err(&path))?;
    let found = format!("sha256:{:x}", Sha256::digest(&bytes));
    if found != descriptor.digest().to_string() || bytes.len() as u64 != descriptor.size() {
        return Err(SourceError::DigestMismatch {
            path,
            expected: format!("{} ({} bytes)", descriptor.digest(), descriptor.size()),
            found: format!("{found} ({} bytes)", bytes.len()),
        });
    }
    Ok((path, bytes))
}

fn json<T>(
    path: &Path,
    what: &'static str,
    parse: impl FnOnce() -> Result<T, oci_spec::OciSpecError>,
) -> Result<T, SourceError> {
    parse().map_err(|e| SourceError::Json {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    })
}

fn platform_name(d: &Descriptor) -> String {
    d.platform().as_ref().map_or_else(
        || "unspecified".to_string(),
        |p| format!("{}/{}", p.os(), p.architecture()),
    )
}

/// The linux/amd64 manifest of the layout at `dir`, following nested indexes.
fn choose_manifest(dir: &Path) -> Result<ImageManifest, SourceError> {
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(read_err(&index_path))?;
    let mut index = json(&index_path, "OCI image index", || {
        ImageIndex::from_reader(&bytes[..])
    })?;
    let mut at = index_path;
    loop {
        let manifests = index.manifests();
        let wanted = |d: &&Descriptor| {
            d.platform()
                .as_ref()
                .is_none_or(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
        };
        let Some(chosen) = manifests
            .iter()
            .find(|d| d.platform().is_some() && wanted(d))
            .or_else(|| manifests.iter().find(wanted))
        else {
            return Err(SourceError::NotAmd64 {
                path: at,
                found: manifests
                    .iter()
                    .map(platform_name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let (path, bytes) = read_blob(dir, chosen)?;
        if *chosen.media_type() == MediaType::ImageIndex {
            index = json(&path, "OCI image index", || {
                ImageIndex::from_reader(&bytes[..])
            })?;
            at = path;
            continue;
        }
        return json(&path, "OCI image manifest", || {
            ImageManifest::from_reader(&bytes[..])
        });
    }
}

fn run_config(config: &ImageConfiguration) -> RunConfig {
    let Some(c) = config.config() else {
        return RunConfig::default();
    };
    RunConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    }
}

fn check_platform(path: &Path, config: &ImageConfiguration) -> Result<(), SourceError> {
    if *config.os() != Os::Linux || *config.architecture() != Arch::Amd64 {
        return Err(SourceError::NotAmd64 {
            path: path.to_path_buf(),
            found: format!("{}/{}", config.os(), config.architecture()),
        });
    }
    Ok(())
}

/// The decompressing reader a layer's media type (or its magic) calls for.
fn layer_reader<'a, R: Read + 'a>(
    media_type: &str,
    mut inner: BufReader<R>,
) -> io::Result<Box<dyn Read + 'a>> {
    use io::BufRead;
    let magic = inner
        .fill_buf()?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let gzip = media_type.ends_with("gzip") || magic.starts_with(&[0x1f, 0x8b]);
    let zstd = media_type.ends_with("zstd") || magic == [0x28, 0xb5, 0x2f, 0xfd];
    Ok(if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(inner))
    } else if zstd {
        Box::new(zstd::Decoder::with_buffer(inner)?)
    } else {
        Box::new(inner)
    })
}

/// Applies the layer in file `path` as layer `index` (from 0): checks the
/// file's digest and size (when the descriptor gives them) and the
/// uncompressed stream's against `diff_id`.
#[allow(clippy::too_many_arguments)]
fn apply_layer_file(
    tree: &mut Tree,
    image: &Path,
    path: &Path,
    index: usize,
    media_type: &str,
    expected: Option<(&str, u64)>,
    diff_id: Option<&str>,
    name: &str,
) -> Result<(), SourceError> {
    let layer_err = |source| SourceError::Layer {
        image: image.to_path_buf(),
        index: index + 1,
        digest: name.to_string(),
        source: Box::new(source),
    };
    let file = File::open(path).map_err(read_err(path))?;
    let mut compressed = Hashing::new(file);
    let (applied, plain) = {
        let reader = layer_reader(
            media_type,
            BufReader::with_capacity(1 << 20, &mut compressed),
        )
        .map_err(|e| layer_err(LayerError::Read(e)))?;
        let mut plain = Hashing::new(reader);
        let applied = tree.apply_layer(&mut plain, index);
        let plain = plain.finish();
        (applied, plain)
    };
    let (digest, len) = compressed.finish().map_err(read_err(path))?;
    if let Some((want, size)) = expected {
        if digest != want || len != size {
            return Err(SourceError::DigestMismatch {
                path: path.to_path_buf(),
                expected: format!("{want} ({size} bytes)"),
                found: format!("{digest} ({len} bytes)"),
            });
        }
    }
    applied.map_err(layer_err)?;
    let (plain_digest, _) = plain.map_err(|e| layer_err(LayerError::Read(e)))?;
    if let Some(want) = diff_id {
        if plain_digest != want {
            return Err(SourceError::DigestMismatch {
                path: path.to_path_buf(),
                expected: format!("diff_id {want}"),
                found: format!("{plain_digest} uncompressed"),
            });
        }
    }
    Ok(())
}

fn load_layout(dir: &Path, kind: &'static str) -> Result<Image, SourceError> {
    let manifest = choose_manifest(dir)?;
    let (config_path, config_bytes) = read_blob(dir, manifest.config())?;
    let config = json(&config_path, "OCI image config", || {
        ImageConfiguration::from_reader(&config_bytes[..])
    })?;
    check_platform(&config_path, &config)?;
    let diff_ids = config.rootfs().diff_ids();
    let mut tree = Tree::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let path = blob_path(dir, layer.digest())?;
        let digest = layer.digest().to_string();
        apply_layer_file(
            &mut tree,
            dir,
            &path,
            i,
            layer.media_type().as_ref(),
            Some((&digest, layer.size())),
            diff_ids.get(i).map(String::as_str),
            &digest,
        )?;
    }
    Ok(Image {
        kind,
        tree,
        layers: manifest.layers().len(),
        run: run_config(&config),
    })
}

/// One image of a `docker save` `manifest.json`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

fn load_docker(dir: &Path, kind: &'static str) -> Result<Image, SourceError> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).map_err(read_err(&path))?;
    let manifests: Vec<DockerManifest> =
        serde_json::from_slice(&bytes).map_err(|e| SourceError::Json {
            path: path.clone(),
            what: "docker save manifest",
            reason: e.to_string(),
        })?;
    let mut found = Vec::new();
    for m in &manifests {
        let config_path = dir.join(tree::normalize(&m.config).unwrap_or_default());
        let config_bytes = std::fs::read(&config_path).map_err(|_| SourceError::MissingBlob {
            digest: m.config.clone(),
            path: config_path.clone(),
        })?;
        let config = json(&config_path, "image config", || {
            ImageConfiguration::from_reader(&config_bytes[..])
        })?;
        if check_platform(&config_path, &config).is_err() {
            found.push(format!("{}/{}", config.os(), config.architecture()));
            continue;
        }
        let diff_ids = config.rootfs().diff_ids();
        let mut tree = Tree::new();
        for (i, layer) in m.layers.iter().enumerate() {
            let layer_path = dir.join(tree::normalize(layer).unwrap_or_default());
            if !layer_path.is_file() {
                return Err(SourceError::MissingBlob {
                    digest: layer.clone(),
                    path: layer_path,
                });
            }
            // A docker archive names layers by path: the config's diff_ids
            // are what checks them.
            apply_layer_file(
                &mut tree,
                dir,
                &layer_path,
                i,
                "",
                None,
                diff_ids.get(i).map(String::as_str),
                layer,
            )?;
        }
        return Ok(Image {
            kind,
            tree,
            layers: m.layers.len(),
            run: run_config(&config),
        });
    }
    Err(SourceError::NotAmd64 {
        path,
        found: found.join(", "),
    })
}

/// A plain root directory: every file as the host has it (modes, owners,
/// links, device numbers), symbolic links not followed.
fn load_rootfs(dir: &Path) -> Result<Image, SourceError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rootfs_err = |source| SourceError::Layer {
        image: dir.to_path_buf(),
        index: 1,
        digest: "root directory".into(),
        source: Box::new(source),
    };
    let mut tree = Tree::new();
    // (inode, device) -> path of its first name, for hard links.
    let mut seen: std::collections::HashMap<(u64, u64), String> = std::collections::HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut paths = Vec::new();
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).map_err(read_err(&at))? {
            let entry = entry.map_err(read_err(&at))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(read_err(&path))?;
            if meta.is_dir() {
                stack.push(path.clone());
            }
            paths.push((path, meta));
        }
    }
    // Sorted, so parents come first and the result does not depend on the
    // order the directory lists.
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, meta) in paths {
        let relative = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let ft = meta.file_type();
        let rdev = meta.rdev();
        let (major, minor) = (
            ((rdev >> 8) & 0xfff) as u32 | ((rdev >> 32) & !0xfff) as u32,
            (rdev & 0xff) as u32 | ((rdev >> 12) & !0xff) as u32,
        );
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).map_err(read_err(&path))?;
            Kind::Symlink(target.to_string_lossy().into_owned())
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = seen.get(&(meta.ino(), meta.dev())) {
                    if let Some(node) = tree.get(first) {
                        let node = node.clone();
                        tree.insert(&relative, node, 0).map_err(rootfs_err)?;
                        continue;
                    }
                }
                seen.insert((meta.ino(), meta.dev()), relative.clone());
            }
            Kind::File {
                data: std::fs::read(&path).map_err(read_err(&path))?.into(),
                group: 0,
            }
        } else if ft.is_char_device() {
            Kind::Char { major, minor }
        } else if ft.is_block_device() {
            Kind::Block { major, minor }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            // Sockets do not survive an archive.
            continue;
        };
        let mut node = Node::new(kind, meta.mode());
        node.uid = meta.uid();
        node.gid = meta.gid();
        tree.insert(&relative, node, 0).map_err(rootfs_err)?;
    }
    Ok(Image {
        kind: "root directory",
        tree,
        layers: 1,
        run: RunConfig::default(),
    })
}
