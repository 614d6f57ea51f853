#!/usr/bin/env bash
# Fetch Debian's cloud kernel (the package that linux-image-cloud-amd64 depends
# on) with apt, and extract from it:
#   $OUT/vmlinuz   the original bzImage (for bzImage-loading tests)
#   $OUT/vmlinux   the uncompressed x86-64 ELF kernel (for the boot-to-banner test)
#   $OUT/VERSION   the Debian package version
#   $OUT/modules/  irqbypass.ko, kvm.ko, kvm-amd.ko of the same kernel (the
#                  nested real-KVM test tier loads them in its L1 guest)
#
# Usage: scripts/fetch-linux-kernel.sh [OUT_DIR]   (default: <repo>/.cache/linux)
#
# Idempotent: if $OUT/vmlinux is already a complete x86-64 ELF and the
# modules are there, it prints its path and exits. Every file is written under a temporary name and renamed into
# place; vmlinux is renamed last, so its presence implies the other two.
# Prints the vmlinux path on success; on failure one "error:" line on stderr
# and a non-zero exit status.

set -Eeuo pipefail

PROG=fetch-linux-kernel
META_PKG=linux-image-cloud-amd64

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}
trap 'die "unexpected failure (line $LINENO): $BASH_COMMAND"' ERR

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
OUT=${1:-$REPO_ROOT/.cache/linux}

# Run a command as root: directly if we are root, else through sudo if present.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        return 1
    fi
}

# Read an unsigned little-endian integer of $3 bytes at offset $2 of file $1.
rd_uint() {
    local v
    v=$(od -An -v --endian=little -j "$2" -N "$3" -t "u$3" "$1" 2>/dev/null | tr -d ' \n')
    [ -n "$v" ] || return 1
    printf '%s' "$v"
}

# True if $1 is a complete x86-64 little-endian ELF executable: magic, class,
# data encoding, e_machine == EM_X86_64, and every PT_LOAD segment and the
# section-header table lie inside the file (so a truncated decompression of a
# valid header is rejected).
is_x86_64_elf() {
    local f=$1 size magic phoff phentsize phnum shoff shentsize shnum i ph ptype poff pfsz
    [ -f "$f" ] || return 1
    size=$(stat -c %s "$f" 2>/dev/null) || return 1
    [ "$size" -ge 64 ] || return 1
    magic=$(od -An -v -N 6 -t x1 "$f" | tr -d ' \n')
    [ "$magic" = "7f454c460201" ] || return 1        # \177ELF, ELFCLASS64, ELFDATA2LSB
    [ "$(rd_uint "$f" 18 2)" = 62 ] || return 1        # e_machine == EM_X86_64
    phoff=$(rd_uint "$f" 32 8) || return 1
    shoff=$(rd_uint "$f" 40 8) || return 1
    phentsize=$(rd_uint "$f" 54 2) || return 1
    phnum=$(rd_uint "$f" 56 2) || return 1
    shentsize=$(rd_uint "$f" 58 2) || return 1
    shnum=$(rd_uint "$f" 60 2) || return 1
    [ "$phnum" -gt 0 ] && [ "$phentsize" -ge 56 ] || return 1
    [ $((phoff + phnum * phentsize)) -le "$size" ] || return 1
    if [ "$shnum" -gt 0 ]; then
        [ $((shoff + shnum * shentsize)) -le "$size" ] || return 1
    fi
    for ((i = 0; i < phnum; i++)); do
        ph=$((phoff + i * phentsize))
        ptype=$(rd_uint "$f" "$ph" 4) || return 1
        [ "$ptype" = 1 ] || continue                    # PT_LOAD
        poff=$(rd_uint "$f" $((ph + 8)) 8) || return 1
        pfsz=$(rd_uint "$f" $((ph + 32)) 8) || return 1
        [ $((poff + pfsz)) -le "$size" ] || return 1
    done
    return 0
}

# ---------------------------------------------------------------- fast path
KVM_MODULES=(virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko)
have_modules() {
    local m
    for m in "${KVM_MODULES[@]}"; do
        [ -s "$OUT/modules/$(basename "$m")" ] || return 1
    done
}
if is_x86_64_elf "$OUT/vmlinux" && have_modules; then
    (cd "$OUT" && printf '%s/vmlinux\n' "$(pwd)")
    exit 0
fi

# Create the output directory first, so that a bad OUT fails before the download.
mkdir -p "$OUT" 2>/dev/null && [ -w "$OUT" ] || die "cannot create or write to output directory $OUT"
OUT=$(cd "$OUT" && pwd)

# ---------------------------------------------------------------- tools
for t in apt-get apt-cache dpkg-deb od tr grep tail head stat mktemp; do
    command -v "$t" >/dev/null 2>&1 || die "required tool '$t' not found (this script needs a Debian-like system with apt)"
done

# Decompressor tools (as in the kernel's scripts/extract-vmlinux) and the
# Debian package that provides each one.
declare -A TOOL_PKG=([gzip]=gzip [xz]=xz-utils [lz4]=lz4 [zstd]=zstd [bzip2]=bzip2 [lzop]=lzop)
missing_pkgs=()
for t in gzip xz lz4 zstd; do
    command -v "$t" >/dev/null 2>&1 || missing_pkgs+=("${TOOL_PKG[$t]}")
done

APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" -eq 0 ] || return 0
    as_root apt-get update -qq >"$WORK/apt-update.log" 2>&1 ||
        die "'apt-get update' failed (not root and no sudo?): $(tail -n 1 "$WORK/apt-update.log" 2>/dev/null)"
    APT_UPDATED=1
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
TMP_FILES=()
cleanup() {
    rm -rf "$WORK"
    [ "${#TMP_FILES[@]}" -eq 0 ] || rm -rf "${TMP_FILES[@]}"
}
trap cleanup EXIT

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >"$WORK/apt-install.log" 2>&1; then
        apt_update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >"$WORK/apt-install.log" 2>&1 ||
            echo "$PROG: warning: could not install ${missing_pkgs[*]}; continuing with the decompressors present" >&2
    fi
fi

# ---------------------------------------------------------------- resolve package
# The meta package depends on exactly one versioned image package, e.g.
# linux-image-6.1.0-48-cloud-amd64.
resolve_pkg() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$META_PKG" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[^ <>]*\).*/\1/p' | head -n 1
}
PKG=$(resolve_pkg || true)
if [ -z "$PKG" ]; then
    apt_update
    PKG=$(resolve_pkg || true)
fi
[ -n "$PKG" ] || die "cannot resolve the kernel package that $META_PKG depends on (apt-cache depends $META_PKG found no linux-image-* dependency)"

# ---------------------------------------------------------------- download
# Run apt-get download inside $WORK. As root apt drops privileges to _apt for
# the download, which cannot write into a 0700 mktemp directory: use a
# world-writable subdirectory for the download only.
DL="$WORK/dl"
mkdir -p "$DL" && chmod 0777 "$DL"
download() {
    (cd "$DL" && apt-get download -q "$PKG" >"$WORK/apt-download.log" 2>&1)
}
if ! download; then
    # The local index may be stale (the .deb rotated out of the mirror).
    apt_update
    download || die "'apt-get download $PKG' failed: $(grep -v '^ *$' "$WORK/apt-download.log" | tail -n 1)"
fi
DEB=$(ls "$DL"/*.deb 2>/dev/null | head -n 1 || true)
[ -n "$DEB" ] && [ -f "$DEB" ] || die "'apt-get download $PKG' produced no .deb file"
VERSION=$(dpkg-deb -f "$DEB" Version) || die "cannot read the Version field of $DEB"

# ---------------------------------------------------------------- unpack
dpkg-deb -x "$DEB" "$WORK/root" || die "'dpkg-deb -x' failed on $(basename "$DEB")"
VMLINUZ=$(ls "$WORK"/root/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
[ -n "$VMLINUZ" ] || die "package $PKG $VERSION contains no boot/vmlinuz-*"
[ "$(od -An -v -j 514 -N 4 -c "$VMLINUZ" | tr -d ' \n')" = HdrS ] ||
    die "$(basename "$VMLINUZ") from $PKG $VERSION is not a bzImage (no HdrS signature at 0x202)"

# ---------------------------------------------------------------- extract vmlinux
VMLINUX_TMP="$WORK/vmlinux"

# try_decomp <file> <cmd...>: decompress <file> with <cmd> into VMLINUX_TMP and
# succeed if the result is a complete x86-64 ELF. The exit status of the
# decompressor is ignored: fed the rest of the bzImage, it sees trailing
# garbage after the stream and may complain after writing the whole output.
try_decomp() {
    local in=$1
    shift
    command -v "$1" >/dev/null 2>&1 || return 1
    "$@" <"$in" >"$VMLINUX_TMP" 2>/dev/null || true
    is_x86_64_elf "$VMLINUX_TMP"
}

# Decompressor command for a compressed stream starting with these bytes.
decomp_for_magic() {
    case "$1" in
        1f8b08*) echo "gzip -dc" ;;
        fd377a585a00*) echo "xz -dc" ;;
        02214c18*) echo "lz4 -dc" ;;
        28b52ffd*) echo "zstd -dc" ;;
        425a68*) echo "bzip2 -dc" ;;
        5d000000*) echo "xz -dc --format=lzma" ;;
        894c5a*) echo "lzop -dc" ;;
        *) return 1 ;;
    esac
}

extracted=0
magic=unknown

# 1. The boot protocol (>= 2.08) says exactly where the payload is:
#    payload_offset (0x248) and payload_length (0x24c), relative to the start
#    of the protected-mode kernel at (setup_sects + 1) * 512.
setup_sects=$(rd_uint "$VMLINUZ" $((0x1f1)) 1 || echo 0)
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_off=$(rd_uint "$VMLINUZ" $((0x248)) 4 || echo 0)
payload_len=$(rd_uint "$VMLINUZ" $((0x24c)) 4 || echo 0)
if [ "$payload_len" -gt 0 ]; then
    start=$(((setup_sects + 1) * 512 + payload_off))
    tail -c +$((start + 1)) "$VMLINUZ" | head -c "$payload_len" >"$WORK/payload" || true
    magic=$(od -An -v -N 6 -t x1 "$WORK/payload" | tr -d ' \n')
    if cmd=$(decomp_for_magic "$magic"); then
        # shellcheck disable=SC2086  # $cmd is a command with options
        try_decomp "$WORK/payload" $cmd && extracted=1
    fi
fi

# 2. Fallback, as scripts/extract-vmlinux does: find every occurrence of each
#    format's magic and try to decompress from there. The "tr" maps the first
#    magic byte to a newline (and real newlines to a filler), so that
#    "grep -abo ^filler" reports the byte offset of each candidate.
try_scan() {
    local magic=$1 filler=$2 pos
    shift 2
    command -v "$1" >/dev/null 2>&1 || return 1
    for pos in $(tr "$magic\n$filler" "\n$filler=" <"$VMLINUZ" | grep -abo "^$filler" || true); do
        pos=${pos%%:*}
        tail -c +"$pos" "$VMLINUZ" >"$WORK/payload"
        try_decomp "$WORK/payload" "$@" && return 0
    done
    return 1
}
if [ "$extracted" -eq 0 ]; then
    if try_scan '\002!L\030' xxx lz4 -dc ||
        try_scan '\037\213\010' xy gzip -dc ||
        try_scan '\3757zXZ\000' abcde xz -dc ||
        try_scan '(\265/\375' xxx zstd -dc ||
        try_scan 'BZh' xy bzip2 -dc ||
        try_scan '\135\0\0\0' xxx xz -dc --format=lzma ||
        try_scan '\211\114\132' xy lzop -dc; then
        extracted=1
    fi
fi
[ "$extracted" -eq 1 ] ||
    die "no x86-64 ELF vmlinux could be decompressed from $(basename "$VMLINUZ") ($PKG $VERSION, payload magic $magic); tried lz4/gzip/xz/zstd/bzip2/lzma/lzo (installed: $(for t in lz4 gzip xz zstd bzip2 lzop; do command -v "$t" >/dev/null 2>&1 && printf '%s ' "$t"; done))"

# ---------------------------------------------------------------- install
install_file() { # <src> <dest name>
    local tmp="$OUT/.$2.tmp.$$"
    TMP_FILES+=("$tmp")
    cp -f "$1" "$tmp" || die "cannot write $tmp"
    mv -f "$tmp" "$OUT/$2" || die "cannot rename $tmp to $OUT/$2"
}
# The KVM modules of this very kernel, for the nested tier's L1.
mkdir -p "$WORK/modules"
for m in "${KVM_MODULES[@]}"; do
    found=$(ls "$WORK"/root/lib/modules/*/kernel/"$m" 2>/dev/null | head -n 1 || true)
    [ -n "$found" ] || die "package $PKG $VERSION has no module $m"
    cp -f "$found" "$WORK/modules/" || die "cannot copy $m"
done
rm -rf "$OUT/.modules.tmp.$$" && cp -r "$WORK/modules" "$OUT/.modules.tmp.$$" || die "cannot write $OUT/.modules.tmp.$$"
TMP_FILES+=("$OUT/.modules.tmp.$$")
rm -f "$OUT/vmlinux" # until it is renamed into place again, the cache is incomplete
rm -rf "$OUT/modules" && mv -f "$OUT/.modules.tmp.$$" "$OUT/modules" || die "cannot rename the modules into $OUT/modules"

printf '%s\n' "$VERSION" >"$WORK/VERSION"
install_file "$VMLINUZ" vmlinuz
install_file "$WORK/VERSION" VERSION
install_file "$VMLINUX_TMP" vmlinux # last: its presence implies the others

echo "$OUT/vmlinux"
