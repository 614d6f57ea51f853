//! Image ids, image kinds and section kinds.

use super::*;

/// A unique image id: 16 bytes in the UUIDv7 layout (48-bit Unix ms timestamp,
/// then random bits), printed as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ImageId(pub [u8; 16]);

impl ImageId {
    /// The all-zero id, meaning "none" in the header.
    pub const ZERO: ImageId = ImageId([0; 16]);

    /// A fresh id: time-ordered prefix, random suffix.
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        // RandomState is seeded from the OS's randomness once per thread and
        // differs per instance: two 64-bit random words without a file read.
        let state = RandomState::new();
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u128(now.as_nanos());
        h.write_u32(std::process::id());
        let a = h.finish();
        h.write_u64(a);
        let b = h.finish();
        let mut bytes = [0u8; 16];
        let ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6..8].copy_from_slice(&a.to_le_bytes()[..2]);
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        bytes[6] = 0x70 | (bytes[6] & 0x0f);
        bytes[8] = 0x80 | (bytes[8] & 0x3f);
        ImageId(bytes)
    }

    /// True for [`ImageId::ZERO`].
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    pub(super) fn nonzero(self) -> Option<Self> {
        (!self.is_zero()).then_some(self)
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({self})")
    }
}

/// An image id that is not 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an image id (32 hex digits)")]
pub struct ParseIdError {
    /// The text that failed to parse.
    pub text: String,
}

impl FromStr for ImageId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError { text: s.to_owned() };
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(ImageId(out))
    }
}

impl Serialize for ImageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageKind {
    /// A consistency image holding the whole VM.
    Full,
    /// A consistency image holding only what changed since `parent`.
    Incremental {
        /// The image this layer applies to.
        parent: ImageId,
    },
    /// A boot image: the clean start (optionally a snapshot taken at `ready`).
    Boot,
}

impl ImageKind {
    /// The header's `kind` code.
    pub fn code(&self) -> u32 {
        match self {
            ImageKind::Full => 1,
            ImageKind::Incremental { .. } => 2,
            ImageKind::Boot => 3,
        }
    }

    /// `full`, `incremental` or `boot`.
    pub fn name(&self) -> &'static str {
        match self {
            ImageKind::Full => "full",
            ImageKind::Incremental { .. } => "incremental",
            ImageKind::Boot => "boot",
        }
    }

    /// Full and incremental images are consistency images; boot images not.
    pub fn is_consistency(&self) -> bool {
        !matches!(self, ImageKind::Boot)
    }

    /// The parent of an incremental layer.
    pub fn parent(&self) -> Option<ImageId> {
        match self {
            ImageKind::Incremental { parent } => Some(*parent),
            _ => None,
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageKind::Incremental { parent } => write!(f, "incremental on {parent}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The sections this version of the format knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SectionKind {
    /// VM configuration (JSON, defined by the VMM).
    Config,
    /// Host resource limits re-applied on restore (JSON).
    Limits,
    /// vCPU and VM state (JSON).
    VmState,
    /// Device state (JSON).
    DeviceState,
    /// Application status the guest last reported (JSON).
    AppStatus,
    /// Guest memory layout: regions and present page runs (binary).
    MemoryMap,
    /// Guest pages (binary, page-aligned, sparse).
    Memory,
}

impl SectionKind {
    /// Every known kind, in code order.
    pub const ALL: [SectionKind; 7] = [
        SectionKind::Config,
        SectionKind::Limits,
        SectionKind::VmState,
        SectionKind::DeviceState,
        SectionKind::AppStatus,
        SectionKind::MemoryMap,
        SectionKind::Memory,
    ];

    /// The table's `kind` code.
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Config => 1,
            SectionKind::Limits => 2,
            SectionKind::VmState => 3,
            SectionKind::DeviceState => 4,
            SectionKind::AppStatus => 5,
            SectionKind::MemoryMap => 6,
            SectionKind::Memory => 7,
        }
    }

    /// The kind with this code, if this version knows it.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// Short name used in messages (`vm-state`).
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Config => "config",
            SectionKind::Limits => "limits",
            SectionKind::VmState => "vm-state",
            SectionKind::DeviceState => "device-state",
            SectionKind::AppStatus => "app-status",
            SectionKind::MemoryMap => "memory-map",
            SectionKind::Memory => "memory",
        }
    }

    pub(super) fn is_memory(self) -> bool {
        matches!(self, SectionKind::Memory | SectionKind::MemoryMap)
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
