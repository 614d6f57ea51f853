#!/usr/bin/env bash
# Builds relive-agent statically (glibc's crt-static), as a microVM's /init
# needs it: there is no libc in a container image's initramfs to load it
# with. `--target` keeps the flag off the build scripts and proc-macros
# (built for the host). Prints the binary's path.
#   scripts/build-agent.sh [--debug]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=release
args=(--release)
if [ "${1:-}" = "--debug" ]; then profile=debug; args=(); fi
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --locked -p relive-agent --target "$target" "${args[@]}"
bin="target/$target/$profile/relive-agent"
if ! ldd "$bin" 2>&1 | grep -q "statically linked\|not a dynamic executable"; then
    echo "build-agent: error: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
