#!/usr/bin/env bash
# Sets up a fresh machine and runs every test, KVM ones included.
# Tests that need /dev/kvm skip with a printed reason where it is absent;
# RELIVE_REQUIRE_KVM=1 (set by CI) turns such a skip into a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --workspace --locked
cargo test --workspace --locked -- --test-threads=2
