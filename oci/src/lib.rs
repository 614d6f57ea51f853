//! relive's container images: an OCI image flattened into an initramfs.
//!
//! [`build`] reads an image, applies its layers in order into one root
//! filesystem ([`tree`]), adds the guest agent as `/init` and the image's
//! run configuration as `/.relive/config.json`, and writes a newc cpio
//! archive (optionally gzip or zstd compressed: Debian's cloud kernel
//! unpacks both) that a microVM boots as its initrd. The root filesystem
//! then lives in guest RAM: a consistency image of guest memory is the
//! whole container, files included.
//!
//! # Inputs
//!
//! - an **OCI image layout** directory (`oci-layout`, `index.json`,
//!   `blobs/`), as `skopeo copy docker://IMAGE oci:DIR` writes it;
//! - an **OCI archive** or a **`docker save`** tarball (plain or gzip),
//!   unpacked into a scratch directory beside the output first;
//! - a **root directory** (a plain tree), with the entrypoint given on the
//!   command line.
//!
//! For an index the manifest for `linux/amd64` is chosen (nested indexes
//! followed); an image for another platform is refused. Every blob is
//! checked against its descriptor's size and sha256 digest, and every
//! layer's uncompressed stream against the config's `diff_ids` (the only
//! check a `docker save` archive offers). Nothing is fetched: there is no
//! registry client (copy the image locally with `skopeo copy` or
//! `docker save` first).
//!
//! # `/.relive/config.json`
//!
//! What the agent runs, merged from the image config and the overrides:
//!
//! ```json
//! {"entrypoint":["/bin/app"],"cmd":["--port","80"],"env":["PATH=/usr/bin:/bin"],"working_dir":"/srv","user":"1000:1000"}
//! ```
//!
//! `--entrypoint` replaces the image's entrypoint and clears its cmd (as
//! `docker run --entrypoint` does) unless `--cmd` is given too; `--env
//! KEY=VALUE` replaces or adds one variable.
//!
//! # Output
//!
//! Written to a temporary file beside the output, synced, then renamed:
//! on any error nothing is left at the output path. The same input gives
//! the same bytes (paths sorted, mtimes 0, inodes numbered in order, the
//! gzip header without time or name).

pub mod source;
pub mod tree;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use source::SourceError;
use tree::{Kind, Node, Tree};

/// How the archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain newc cpio.
    None,
    /// gzip (level 6, no time or name in the header).
    Gzip,
    /// zstd (level 3).
    Zstd,
}

/// What the agent runs: the image config's, with the overrides applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The program and its first arguments.
    pub entrypoint: Vec<String>,
    /// Further arguments (or the program, without an entrypoint).
    pub cmd: Vec<String>,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// The working directory (`/` when empty).
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid` (root when empty).
    pub user: String,
}

/// Changes to the image's run configuration, from the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces the entrypoint (and clears cmd unless `cmd` is given).
    pub entrypoint: Option<Vec<String>>,
    /// Replaces cmd.
    pub cmd: Option<Vec<String>>,
    /// `KEY=VALUE`, each replacing or adding one variable.
    pub env: Vec<String>,
    /// Replaces the working directory.
    pub working_dir: Option<String>,
    /// Replaces the user.
    pub user: Option<String>,
}

impl RunConfig {
    /// `self` with `o` applied.
    pub fn with(mut self, o: &Overrides) -> RunConfig {
        if let Some(entrypoint) = &o.entrypoint {
            self.entrypoint = entrypoint.clone();
            self.cmd.clear();
        }
        if let Some(cmd) = &o.cmd {
            self.cmd = cmd.clone();
        }
        for var in &o.env {
            let key = var.split('=').next().unwrap_or(var);
            self.env.retain(|e| e.split('=').next().unwrap_or(e) != key);
            self.env.push(var.clone());
        }
        if let Some(dir) = &o.working_dir {
            self.working_dir = dir.clone();
        }
        if let Some(user) = &o.user {
            self.user = user.clone();
        }
        self
    }
}

/// Everything [`build`] needs.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// An OCI layout directory, an OCI or `docker save` tarball, or a root
    /// directory.
    pub source: PathBuf,
    /// The archive to write.
    pub output: PathBuf,
    /// The guest agent binary, installed as `/init`.
    pub agent: PathBuf,
    /// Changes to the run configuration.
    pub overrides: Overrides,
    /// How to compress the archive.
    pub compression: Compression,
}

/// What [`build`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// What the input was.
    pub kind: &'static str,
    /// Layers applied (1 for a root directory).
    pub layers: usize,
    /// Paths in the archive (the agent and its config included).
    pub entries: usize,
    /// Bytes of file contents.
    pub content_bytes: u64,
    /// Bytes of the written archive.
    pub archive_bytes: u64,
    /// What the agent will run.
    pub run: RunConfig,
}

/// Building an image failed; nothing was written at the output path.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The input could not be read or is not a usable image.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The agent binary is missing.
    #[error("cannot read the agent binary {path} (build it with `cargo build --release -p relive-agent`, or give --agent PATH)")]
    Agent {
        /// Where it was looked for.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent needs a program loader the image does not have.
    #[error("the agent {path} is dynamically linked (it names the loader {interpreter}): as /init of an initramfs it must be static; build it with scripts/build-agent.sh")]
    AgentNotStatic {
        /// The agent.
        path: PathBuf,
        /// Its `PT_INTERP`.
        interpreter: String,
    },
    /// Nothing to run.
    #[error("the image has neither an entrypoint nor a cmd: give --entrypoint (and --cmd) to say what the microVM runs")]
    NothingToRun,
    /// The archive could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The output.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where the agent's configuration lies in the archive.
pub const CONFIG_PATH: &str = ".relive/config.json";

/// Builds the archive (see the crate documentation).
pub fn build(options: &BuildOptions) -> Result<BuildReport, BuildError> {
    let scratch_parent = options
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let image = source::load(&options.source, scratch_parent)?;
    let run = image.run.clone().with(&options.overrides);
    if run.entrypoint.is_empty() && run.cmd.is_empty() {
        return Err(BuildError::NothingToRun);
    }
    let mut tree = image.tree;
    let agent = std::fs::read(&options.agent).map_err(|source| BuildError::Agent {
        path: options.agent.clone(),
        source,
    })?;
    if let Some(interpreter) = elf_interpreter(&agent) {
        return Err(BuildError::AgentNotStatic {
            path: options.agent.clone(),
            interpreter,
        });
    }
    insert_file(&mut tree, "init", agent, 0o755);
    let config = serde_json::to_vec_pretty(&run).map_err(|e| BuildError::Write {
        path: options.output.clone(),
        source: io::Error::other(e),
    })?;
    insert_file(&mut tree, CONFIG_PATH, config, 0o644);
    let content_bytes = tree
        .paths()
        .filter_map(|p| match &tree.get(p)?.kind {
            Kind::File { data, .. } => Some(data.len() as u64),
            _ => None,
        })
        .sum();
    let archive_bytes = write_atomically(&options.output, |file| {
        write_compressed(&tree, file, options.compression)
    })
    .map_err(|source| BuildError::Write {
        path: options.output.clone(),
        source,
    })?;
    Ok(BuildReport {
        kind: image.kind,
        layers: image.layers,
        entries: tree.len() + 1,
        content_bytes,
        archive_bytes,
        run,
    })
}

/// The program loader (`PT_INTERP`) an ELF executable asks for; `None`
/// for a static one, or for what is not a 64-bit ELF (a script is the
/// image's business).
fn elf_interpreter(bytes: &[u8]) -> Option<String> {
    use object::read::elf::{ElfFile64, ProgramHeader};
    let elf = ElfFile64::<object::Endianness>::parse(bytes).ok()?;
    let endian = elf.endian();
    elf.elf_program_headers().iter().find_map(|ph| {
        (ph.p_type(endian) == object::elf::PT_INTERP).then(|| {
            let data = ph.data(endian, bytes).unwrap_or_default();
            String::from_utf8_lossy(data)
                .trim_end_matches('\0')
                .to_string()
        })
    })
}

fn insert_file(tree: &mut Tree, path: &str, data: Vec<u8>, mode: u32) {
    let node = Node::new(
        Kind::File {
            data: data.into(),
            group: 0,
        },
        mode,
    );
    // Our own paths: never through a symbolic link of the image (the
    // image's `.relive` or `init` are replaced whole).
    let _ = tree.insert(path, node, usize::MAX - 1);
}

fn write_compressed(
    tree: &Tree,
    file: &mut std::fs::File,
    compression: Compression,
) -> io::Result<()> {
    let out = io::BufWriter::with_capacity(1 << 20, file);
    let out = match compression {
        Compression::None => tree.write_cpio(out)?,
        Compression::Gzip => {
            let gz = flate2::GzBuilder::new()
                .mtime(0)
                .write(out, flate2::Compression::new(6));
            tree.write_cpio(gz)?.finish()?
        }
        Compression::Zstd => {
            let zst = zstd::Encoder::new(out, 3)?;
            tree.write_cpio(zst)?.finish()?
        }
    };
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .flush()
}

/// Writes `path` through a temporary file beside it, synced and renamed
/// into place only when `write` succeeded; returns the size written.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
) -> io::Result<u64> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("the output path names no file"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        write(&mut file)?;
        file.sync_all()?;
        let len = file.metadata()?.len();
        std::fs::rename(&temp, path)?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
