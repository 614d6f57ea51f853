//! Errors of writing and reading an image.

use super::*;

/// Why an image could not be written. The temporary file is gone by the time
/// the caller sees one of these; existing images are untouched.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The temporary file could not be created.
    #[error("cannot create a temporary image file in {}", dir.display())]
    Create {
        /// Target directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A write, sync or rename failed (a full disk, an I/O error).
    #[error("cannot write {what} to {}", path.display())]
    Io {
        /// The file being written.
        path: PathBuf,
        /// What was being written ("section vm-state", "memory region 0x0 pages 0+16").
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A section payload is over the decode limit.
    #[error("section {section} of {} is {len} bytes, over the {limit}-byte limit", path.display())]
    SectionTooLarge {
        /// The file being written.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Its length.
        len: u64,
        /// [`SECTION_SIZE_LIMIT`].
        limit: u64,
    },
    /// The caller asked for something the format does not allow.
    #[error("cannot write {}: {reason}", path.display())]
    Invalid {
        /// The file being written.
        path: PathBuf,
        /// What is wrong ("section config added twice").
        reason: String,
    },
    /// An earlier call failed, so the writer was abandoned.
    #[error("the writer of {} failed earlier and was abandoned; start a new image", path.display())]
    Abandoned {
        /// The temporary file that was removed.
        path: PathBuf,
    },
}

/// Why an image could not be read or verified. Every message names the file
/// and, where one is to blame, the section.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The OS refused a read.
    #[error("cannot read image {}", path.display())]
    Io {
        /// The image file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the magic.
    #[error("{} is not a relive image (no RELIVEIM magic)", path.display())]
    NotAnImage {
        /// The file.
        path: PathBuf,
    },
    /// The file ends inside the header.
    #[error("image {} is truncated inside its header ({file_len} of {header_len} bytes)", path.display())]
    TruncatedHeader {
        /// The image file.
        path: PathBuf,
        /// Its length.
        file_len: u64,
        /// The header's length.
        header_len: u64,
    },
    /// The header's checksum does not match its bytes.
    #[error("image {} has a corrupt header: checksum {stored:#010x} stored, {computed:#010x} computed", path.display())]
    HeaderChecksum {
        /// The image file.
        path: PathBuf,
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The header is intact but describes something impossible.
    #[error("image {} has a corrupt header: {reason}", path.display())]
    CorruptHeader {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer relive.
    #[error("image {} has format version {found}, this relive reads up to version {supported}: upgrade relive to use it", path.display())]
    NewerVersion {
        /// The image file.
        path: PathBuf,
        /// Its format version.
        found: u32,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// A required section of a kind this version does not know.
    #[error("image {} has a required section of kind {code} that this relive does not know: upgrade relive to use it", path.display())]
    UnknownSection {
        /// The image file.
        path: PathBuf,
        /// The section's kind code.
        code: u32,
    },
    /// A section this crate decodes has a newer version than it reads.
    #[error("image {} has a {section} section of version {found}, this relive reads up to version {supported}: upgrade relive to use it", path.display())]
    NewerSection {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Its version.
        found: u32,
        /// The newest this crate reads.
        supported: u32,
    },
    /// A section the image's kind requires is absent.
    #[error("image {} has no {section} section", path.display())]
    MissingSection {
        /// The image file.
        path: PathBuf,
        /// The missing section.
        section: SectionKind,
    },
    /// A non-memory section claims more than the decode limit.
    #[error("image {} is corrupt: its {section} section claims {length} bytes, over the {limit}-byte limit", path.display())]
    SectionTooLarge {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// The length it claims.
        length: u64,
        /// [`SECTION_SIZE_LIMIT`].
        limit: u64,
    },
    /// The file ends before a section does.
    #[error("image {} is truncated: its {section} section ends at byte {end} but the file has {file_len} bytes", path.display())]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// The first section (in file order) cut short.
        section: SectionKind,
        /// Where the section should end.
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A section's bytes do not match its checksum.
    #[error("image {} is corrupt: checksum mismatch in its {section} section ({stored:#010x} stored, {computed:#010x} computed)", path.display())]
    Checksum {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// Checksum in the table.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// A section's checksum matches but its content is impossible.
    #[error("image {} is corrupt: its {section} section is invalid: {reason}", path.display())]
    CorruptSection {
        /// The image file.
        path: PathBuf,
        /// The section.
        section: SectionKind,
        /// What is wrong.
        reason: String,
    },
}

impl ReadError {
    /// The section the error blames, if it blames one.
    pub fn section(&self) -> Option<SectionKind> {
        match self {
            ReadError::NewerSection { section, .. }
            | ReadError::MissingSection { section, .. }
            | ReadError::SectionTooLarge { section, .. }
            | ReadError::Truncated { section, .. }
            | ReadError::Checksum { section, .. }
            | ReadError::CorruptSection { section, .. } => Some(*section),
            _ => None,
        }
    }

    /// True when the header itself is missing, foreign, damaged or impossible.
    pub fn is_header(&self) -> bool {
        matches!(
            self,
            ReadError::NotAnImage { .. }
                | ReadError::TruncatedHeader { .. }
                | ReadError::HeaderChecksum { .. }
                | ReadError::CorruptHeader { .. }
        )
    }
}
