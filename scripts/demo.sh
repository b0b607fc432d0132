#!/usr/bin/env bash
# Quick start 1: set up, then run the end-to-end PME demo on MovieLens-100K (report in out/demo).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
exec "$VPY" -m pme demo --out out/demo "$@"
