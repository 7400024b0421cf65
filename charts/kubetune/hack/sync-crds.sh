#!/usr/bin/env bash
# Copy the repository's CRDs (the source of truth) into the chart. tests/chart checks the copy is identical.
set -euo pipefail
chart="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="$(cd "$chart/../.." && pwd)"
rm -f "$chart"/crds/*.yaml
cp "$repo"/crds/*.yaml "$chart/crds/"
ls "$chart/crds"
