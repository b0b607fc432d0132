#!/usr/bin/env bash
# Quick start 2: set up, then run the test suite on the compiled extension (fails on the fallback).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
export PME_REQUIRE_COMPILED=1
exec "$VPY" -m pytest -q -p no:logging "$@"
