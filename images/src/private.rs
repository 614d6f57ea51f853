//! Owner-only files and directories: what relive writes holds guest memory
//! (images), what the guest printed (consoles) and what happened (events,
//! records), so nobody but its owner may read it, whatever the umask.
//!
//! Files are created `0600` and directories `0700`; a umask can only take
//! bits away, so these modes hold under any umask. [`tighten_dir`] narrows a
//! directory made by an older relive or by hand. [`refuse_writable_by_others`]
//! is the check a restore makes: an image that another user can write is an
//! image another user can put code into the guest with.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file relive creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory relive creates.
pub const DIR_MODE: u32 = 0o700;

/// `OpenOptions` whose `create` makes an owner-only file.
pub fn open_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates an owner-only file, truncating one that exists (like
/// [`File::create`]).
pub fn create_file(path: &Path) -> io::Result<File> {
    open_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// Creates `dir` and its missing parents owner-only (existing ones are left
/// as they are: see [`tighten_dir`]).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Narrows `dir` to owner-only if group or others have any access to it;
/// returns the mode it had when it changed it.
pub fn tighten_dir(dir: &Path) -> io::Result<Option<u32>> {
    let mode = std::fs::metadata(dir)?.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(dir, Permissions::from_mode(mode & 0o7700))?;
    Ok(Some(mode))
}

/// An image that someone besides its owner may write.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is writable by {who} (mode {mode:04o}): whoever can write it decides what the restored \
     guest runs; run `chmod go-w {}` if its contents are trusted",
    path.display(),
    path.display()
)]
pub struct WritableByOthers {
    /// The file.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
    /// `group`, `others` or `group and others`.
    pub who: &'static str,
}

/// Refuses `file` (opened from `path`) when group or others may write it.
pub fn refuse_writable_by_others(file: &File, path: &Path) -> Result<(), RestoreCheckError> {
    let mode = file
        .metadata()
        .map_err(|source| RestoreCheckError::Stat {
            path: path.to_owned(),
            source,
        })?
        .mode()
        & 0o7777;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "group",
        (false, true) => "others",
        (true, true) => "group and others",
    };
    Err(RestoreCheckError::Writable(WritableByOthers {
        path: path.to_owned(),
        mode,
        who,
    }))
}

/// Why an image may not be restored from.
#[derive(Debug, thiserror::Error)]
pub enum RestoreCheckError {
    /// Others may write it.
    #[error(transparent)]
    Writable(WritableByOthers),
    /// Its metadata could not be read.
    #[error("cannot stat {}", path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::test_support::TempDir;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn created_files_and_directories_are_owner_only_and_wide_ones_are_tightened() {
        let root = TempDir::new("private");
        let dir = root.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&root.path().join("a")), DIR_MODE);
        let f = dir.join("f");
        create_file(&f).unwrap();
        assert_eq!(mode(&f), FILE_MODE);

        let wide = root.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(tighten_dir(&wide).unwrap(), Some(0o755));
        assert_eq!(mode(&wide), 0o700);
        assert_eq!(tighten_dir(&wide).unwrap(), None);
    }

    #[test]
    fn an_image_others_can_write_is_refused_naming_the_file_and_the_fix() {
        let root = TempDir::new("private-writable");
        let f = root.path().join("img.rimg");
        create_file(&f).unwrap();
        let open = || File::open(&f).unwrap();
        refuse_writable_by_others(&open(), &f).unwrap();
        // Readable by others is a confidentiality matter, not a refusal.
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        refuse_writable_by_others(&open(), &f).unwrap();
        for (m, who) in [
            (0o664, "group"),
            (0o646, "others"),
            (0o666, "group and others"),
        ] {
            std::fs::set_permissions(&f, Permissions::from_mode(m)).unwrap();
            let e = refuse_writable_by_others(&open(), &f)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&f.display().to_string()), "{e}");
            assert!(
                e.contains(&format!("writable by {who} (mode {m:04o})")),
                "{e}"
            );
            assert!(e.contains("chmod go-w"), "{e}");
        }
    }
}
