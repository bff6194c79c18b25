#!/usr/bin/env bash
# Run the default test suite against the NEWEST releases of hgf's dependencies, i.e. what a fresh
# `pip install -e ".[all]"` without constraints.txt gets today. Early warning for upstream releases
# that break hgf; see docs/DEPENDENCIES.md.
#
#   scripts/test_newest.sh [OUTDIR]
#
# Makes a throwaway venv, installs torch==$TORCH_VERSION (default 2.13.0) first, then
# `pip install -U -e ".[all]"` with no constraint but torch's, and runs
#   python -m pytest -q -m "not slow and not gpu"
# OUTDIR (default: a new temporary folder) receives versions.txt (pip freeze of the resolved set),
# pytest.log (the suite's output) and summary.txt (date, Python, pytest's closing line). The venv is
# deleted at the end unless KEEP_VENV=1. Exits with pytest's status.
#
# torch stays pinned: `pip install torch==2.13.0` finds the CPU wheel, while an unpinned upgrade would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OUT=${1:-$(mktemp -d -t hgf-newest.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d -t hgf-newest-venv.XXXXXX)
cleanup() { if [ "${KEEP_VENV:-0}" = 1 ]; then echo "venv kept: $WORK/venv"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION"
echo "torch==$TORCH_VERSION" > "$WORK/torch.txt"
python -m pip install -q -U -e ".[all]" -c "$WORK/torch.txt"
python -m pip freeze --exclude-editable | grep -v '^#' > "$OUT/versions.txt"

set +e
python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
{
    echo "date: $(date -u +%Y-%m-%d)"
    echo "python: $(python -c 'import platform; print(platform.python_version())')"
    echo "pytest exit status: $rc"
    echo "result: $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "versions: $OUT/versions.txt, log: $OUT/pytest.log"
exit "$rc"
