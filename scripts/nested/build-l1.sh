#!/usr/bin/env bash
# Builds the initramfs of the nested real-KVM tier's L1 guest (see
# tests/nested.rs): busybox (Debian's busybox-static), the KVM modules of
# Debian's cloud kernel (from scripts/fetch-linux-kernel.sh), an /init script,
# and programs to run inside with the shared libraries they need.
#
# Usage: scripts/nested/build-l1.sh [--no-modules] OUT.cpio INIT [FILE...]
#   INIT     becomes /init (a busybox sh script)
#   FILE...  each is copied to /bin/<its name>; an executable one with its
#            libraries (ldd) at the same paths as on this host
#   --no-modules  leave the KVM modules out (an L2 guest's initramfs)
#
# The archive is an uncompressed newc cpio: decompressing in an emulated L1
# costs more than reading a bigger file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

die() {
    echo "build-l1: error: $*" >&2
    exit 1
}
MODULES_WANTED=1
if [ "${1:-}" = --no-modules ]; then
    MODULES_WANTED=0
    shift
fi
[ $# -ge 2 ] || die "usage: $0 [--no-modules] OUT.cpio INIT [FILE...]"
OUT=$1
INIT=$2
shift 2
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && [[ "$(ldd "$BUSYBOX" 2>&1)" == *"not a dynamic executable"* ]] ||
    die "$BUSYBOX is missing or not static: install busybox-static (scripts/setup.sh does)"
MODULES=.cache/linux/modules
if [ "$MODULES_WANTED" = 1 ]; then
    for m in irqbypass kvm kvm-amd; do
        [ -s "$MODULES/$m.ko" ] || die "$MODULES/$m.ko missing: run scripts/fetch-linux-kernel.sh"
    done
fi
command -v cpio >/dev/null || die "cpio not found: install cpio (scripts/setup.sh does)"

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/relive-l1.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/relive-modules}
cp "$BUSYBOX" "$ROOT/bin/busybox"
[ "$MODULES_WANTED" = 0 ] || cp "$MODULES"/{irqbypass,kvm,kvm-amd}.ko "$ROOT/lib/relive-modules/"
install -m 0755 "$INIT" "$ROOT/init"

copy_with_libs() {
    local file=$1 lib
    if [ ! -x "$file" ]; then
        cp "$file" "$ROOT/bin/$(basename "$file")"
        return
    fi
    install -m 0755 "$file" "$ROOT/bin/$(basename "$file")"
    # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
    for lib in $(ldd "$file" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$ROOT$lib" ] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done
}
for f in "$@"; do
    [ -f "$f" ] || die "$f is not a file"
    copy_with_libs "$f"
done
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet) >"$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
