#!/usr/bin/env bash
# Installs what relive needs on a fresh Debian machine (idempotent):
# the assembler and linker for the bundled guest, and Debian's cloud kernel
# for the Linux boot test. The Rust toolchain is expected to be installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v as >/dev/null 2>&1 || need_apt+=(binutils)
command -v ld >/dev/null 2>&1 || need_apt+=(binutils)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: error: cargo not found: install the Rust toolchain (rustup) first" >&2
    exit 1
fi
# The Linux boot test's kernel (cached in .cache/linux).
bash scripts/fetch-linux-kernel.sh >/dev/null
