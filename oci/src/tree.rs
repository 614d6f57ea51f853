//! The container's root filesystem, in memory: layers applied in order,
//! then written out as one newc cpio archive.
//!
//! Paths are kept relative to the root (`bin/sh`, never `/bin/sh` or
//! `./bin/sh`), in a sorted map, so a parent always comes before its
//! children and the archive's order depends on the names only.
//!
//! # Applying a layer (the OCI image spec's "changesets")
//!
//! - an entry replaces what was at its path (a directory over a directory
//!   keeps the children; anything else over a directory removes them);
//! - `.wh.NAME` removes `NAME` (and what is under it) of the layers below;
//! - `.wh..wh..opq` in a directory removes everything the layers below put
//!   in it (entries of the same layer stay);
//! - parents missing from the layer are created (`0755`, root);
//! - a hard link gets its target's contents and joins its target's link
//!   group: the two share an inode in the archive, and the link keeps the
//!   data even if a later layer removes the target.
//!
//! Refused, naming the layer and the entry: a path with `..`, and a path
//! that goes through a symbolic link (a layer with `etc -> /` then
//! `etc/passwd` writes outside the root when unpacked on a disk). Symbolic
//! links themselves may point anywhere, absolute targets included: they
//! are only followed inside the guest, whose root is this tree.
//!
//! # The archive
//!
//! Entries in path order, `.` first; inode numbers counted from 1 in that
//! order (a link group shares its first member's, which carries the data;
//! later members are empty, as the kernel's unpacker links them); every
//! mtime 0; modes, owners and device numbers as the layers gave them. The
//! same tree gives the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file: its contents and its link group.
    File {
        /// The bytes.
        data: Arc<[u8]>,
        /// Files with the same group are hard links of one another.
        group: u64,
    },
    /// A symbolic link and its target (never followed here).
    Symlink(String),
    /// A character device.
    Char {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    Block {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One path of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: Kind,
    /// Permission bits (with setuid, setgid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The layer that put it there (0 for the first).
    layer: usize,
}

impl Node {
    /// A node of `kind` owned by root.
    pub fn new(kind: Kind, mode: u32) -> Node {
        Node {
            kind,
            mode: mode & 0o7777,
            uid: 0,
            gid: 0,
            layer: usize::MAX,
        }
    }
}

/// A layer's entry that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The entry's path leaves the root.
    #[error(
        "entry {path:?} climbs out of the root with `..`: the layer is malformed or malicious"
    )]
    Escapes {
        /// The path as the layer has it.
        path: String,
    },
    /// The entry's path goes through a symbolic link.
    #[error(
        "entry {path:?} goes through the symbolic link {link:?} -> {target:?}: unpacked on a disk it would land outside the root"
    )]
    ThroughSymlink {
        /// The path as the layer has it.
        path: String,
        /// The symbolic link on its way.
        link: String,
        /// Where that link points.
        target: String,
    },
    /// The entry's path goes through a file that is not a directory.
    #[error("entry {path:?} needs {parent:?} to be a directory, and it is not")]
    NotADirectory {
        /// The path.
        path: String,
        /// The parent that is not a directory.
        parent: String,
    },
    /// A hard link whose target is not a regular file of the tree.
    #[error(
        "hard link {path:?} -> {target:?}: the target is not a regular file of the image so far"
    )]
    BadHardLink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// A name that is not UTF-8 (the archive keeps names as UTF-8 here).
    #[error("entry name {name:?} is not UTF-8")]
    NotUtf8 {
        /// The name, lossily.
        name: String,
    },
    /// A file larger than a newc archive holds (4 GiB).
    #[error("file {path:?} is {size} bytes: a cpio (newc) entry holds at most 4 GiB")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The tar stream is broken (or its decompression, or its digest check).
    #[error("cannot read the layer")]
    Read(#[source] io::Error),
}

/// The root filesystem being built.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
    next_group: u64,
}

/// `path` relative to the root, `..` refused, `.` and empty parts dropped.
pub fn normalize(path: &str) -> Result<String, LayerError> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(LayerError::Escapes {
                    path: path.to_string(),
                })
            }
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// The node at `path` (relative), if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Every path, in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// How many paths.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Puts `node` at `path` (relative, normalized), creating missing
    /// parents; what was there is replaced (see the module docs).
    pub fn insert(&mut self, path: &str, mut node: Node, layer: usize) -> Result<(), LayerError> {
        if path.is_empty() {
            // The root itself: only its metadata.
            return Ok(());
        }
        self.make_parents(path, path, layer)?;
        node.layer = layer;
        match (self.nodes.get(path).map(|n| &n.kind), &node.kind) {
            (Some(Kind::Dir), Kind::Dir) => {}
            (Some(Kind::Dir), _) => self.remove_under(path, usize::MAX),
            _ => {}
        }
        if let Kind::File { group, .. } = &mut node.kind {
            if *group == 0 {
                self.next_group += 1;
                *group = self.next_group;
            }
        }
        self.nodes.insert(path.to_string(), node);
        Ok(())
    }

    fn make_parents(&mut self, original: &str, path: &str, layer: usize) -> Result<(), LayerError> {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            match self.nodes.get(parent) {
                None => {
                    let mut dir = Node::new(Kind::Dir, 0o755);
                    dir.layer = layer;
                    self.nodes.insert(parent.to_string(), dir);
                }
                Some(Node {
                    kind: Kind::Dir, ..
                }) => {}
                Some(Node {
                    kind: Kind::Symlink(target),
                    ..
                }) => {
                    return Err(LayerError::ThroughSymlink {
                        path: original.to_string(),
                        link: parent.to_string(),
                        target: target.clone(),
                    })
                }
                Some(_) => {
                    return Err(LayerError::NotADirectory {
                        path: original.to_string(),
                        parent: parent.to_string(),
                    })
                }
            }
            at += i + 1;
        }
        Ok(())
    }

    /// Removes what is under `dir` (not `dir` itself) that layers below
    /// `layer` put there.
    fn remove_under(&mut self, dir: &str, layer: usize) {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .retain(|p, n| !(p.starts_with(&prefix) && p != dir && n.layer < layer));
    }

    /// Applies one layer (an uncompressed tar stream) as layer number
    /// `layer`; returns how many entries it had.
    pub fn apply_layer(&mut self, tar: impl Read, layer: usize) -> Result<usize, LayerError> {
        let mut archive = tar::Archive::new(tar);
        let mut count = 0;
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            count += 1;
            let raw = entry.path_bytes().into_owned();
            let raw = String::from_utf8(raw).map_err(|e| LayerError::NotUtf8 {
                name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            })?;
            let path = normalize(&raw)?;
            let name = path.rsplit('/').next().unwrap_or("");
            let parent = parent_of(&path).to_string();
            if name == ".wh..wh..opq" {
                self.make_parents(&raw, &path, layer)?;
                self.remove_under(&parent, layer);
                continue;
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                let victim = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                self.remove_under(&victim, layer);
                if self.nodes.get(&victim).is_some_and(|n| n.layer < layer) {
                    self.nodes.remove(&victim);
                }
                continue;
            }
            let header = entry.header();
            let mode = header.mode().map_err(LayerError::Read)?;
            let uid = u32::try_from(header.uid().map_err(LayerError::Read)?).unwrap_or(u32::MAX);
            let gid = u32::try_from(header.gid().map_err(LayerError::Read)?).unwrap_or(u32::MAX);
            let device = || -> Result<(u32, u32), LayerError> {
                let major = header
                    .device_major()
                    .map_err(LayerError::Read)?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(LayerError::Read)?
                    .unwrap_or(0);
                Ok((major, minor))
            };
            let kind = match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.size();
                    if size > u64::from(u32::MAX) {
                        return Err(LayerError::TooLarge { path, size });
                    }
                    let mut data = Vec::with_capacity(size as usize);
                    entry.read_to_end(&mut data).map_err(LayerError::Read)?;
                    Kind::File {
                        data: data.into(),
                        group: 0,
                    }
                }
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    Kind::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let target_path = normalize(&target)?;
                    match self.nodes.get(&target_path) {
                        Some(Node {
                            kind: kind @ Kind::File { .. },
                            ..
                        }) => kind.clone(),
                        _ => return Err(LayerError::BadHardLink { path: raw, target }),
                    }
                }
                tar::EntryType::Char => {
                    let (major, minor) = device()?;
                    Kind::Char { major, minor }
                }
                tar::EntryType::Block => {
                    let (major, minor) = device()?;
                    Kind::Block { major, minor }
                }
                tar::EntryType::Fifo => Kind::Fifo,
                // Extension headers are folded into the next entry by the
                // tar crate; anything else carries no file.
                _ => continue,
            };
            let node = Node {
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                layer,
            };
            self.insert(&path, node, layer)?;
        }
        Ok(count)
    }

    /// Writes the tree as a newc cpio archive (see the module docs).
    pub fn write_cpio<W: Write>(&self, out: W) -> io::Result<W> {
        use cpio::newc::{Builder, ModeFileType};
        let mut out = out;
        let root = Builder::new(".")
            .ino(1)
            .mode(0o755)
            .set_mode_file_type(ModeFileType::Directory)
            .nlink(2)
            .mtime(0);
        out = root.write(out, 0).finish()?;
        // Link group -> (its inode, members still to come).
        let mut groups: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
        for node in self.nodes.values() {
            if let Kind::File { group, .. } = node.kind {
                groups.entry(group).or_insert((0, 0)).1 += 1;
            }
        }
        let mut ino = 1u32;
        for (path, node) in &self.nodes {
            let mut builder = Builder::new(path)
                .mode(node.mode)
                .uid(node.uid)
                .gid(node.gid)
                .mtime(0)
                .nlink(1);
            let data: &[u8] = match &node.kind {
                Kind::Dir => {
                    builder = builder.set_mode_file_type(ModeFileType::Directory).nlink(2);
                    &[]
                }
                Kind::File { data, group } => {
                    builder = builder.set_mode_file_type(ModeFileType::Regular);
                    let (group_ino, members) = groups.get_mut(group).map_or((0, 1), |g| (g.0, g.1));
                    if members > 1 {
                        builder = builder.nlink(members);
                    }
                    if group_ino != 0 {
                        // A later member: same inode, no data (linked on unpack).
                        out = builder.ino(group_ino).write(out, 0).finish()?;
                        continue;
                    }
                    ino += 1;
                    if let Some(g) = groups.get_mut(group) {
                        g.0 = ino;
                    }
                    data
                }
                Kind::Symlink(target) => {
                    builder = builder.set_mode_file_type(ModeFileType::Symlink);
                    target.as_bytes()
                }
                Kind::Char { major, minor } => {
                    builder = builder
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor);
                    &[]
                }
                Kind::Block { major, minor } => {
                    builder = builder
                        .set_mode_file_type(ModeFileType::Block)
                        .rdev_major(*major)
                        .rdev_minor(*minor);
                    &[]
                }
                Kind::Fifo => {
                    builder = builder.set_mode_file_type(ModeFileType::Fifo);
                    &[]
                }
            };
            if !matches!(node.kind, Kind::File { .. }) {
                ino += 1;
            }
            let size = u32::try_from(data.len())
                .map_err(|_| io::Error::other(format!("{path}: larger than 4 GiB")))?;
            let mut writer = builder.ino(ino).write(out, size);
            writer.write_all(data)?;
            out = writer.finish()?;
        }
        cpio::newc::trailer(out)
    }
}
