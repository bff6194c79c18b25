#!/usr/bin/env bash
# Run the default test suite in a throwaway venv against the newest or the lowest allowed releases of
# hgf's dependencies (docs/DEPENDENCIES.md):
#
#   scripts/test_versions.sh newest [OUTDIR]   what `pip install -U -e ".[all]"` without
#                                               constraints.txt gets today: early warning for
#                                               upstream releases that break hgf
#   scripts/test_versions.sh lowest [OUTDIR]   the lower bounds of pyproject.toml
#                                               (constraints-lowest.txt): keeps them honest
#
# Installs torch==$TORCH_VERSION (default 2.13.0) first, then hgf with all extras, then runs
#   python -m pytest -q -m "not slow and not gpu"
# OUTDIR (default: a new temporary folder) receives versions.txt (pip freeze of the resolved set;
# for `newest`, usable as constraints.txt), pytest.log (the suite's output) and summary.txt (date,
# mode, Python, pytest's closing line). The venv is deleted at the end unless KEEP_VENV=1. Exits
# with pytest's status.
#
# torch stays pinned in both modes: `pip install torch==2.13.0` finds the CPU wheel, while an
# unpinned upgrade would pull a multi-GB CUDA build.
set -euo pipefail
MODE=${1:-}
case "$MODE" in
    newest | lowest) ;;
    *) echo "usage: scripts/test_versions.sh newest|lowest [OUTDIR]" >&2; exit 2 ;;
esac
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
OUT=${2:-$(mktemp -d -t "hgf-$MODE.XXXXXX")}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
WORK=$(mktemp -d -t "hgf-$MODE-venv.XXXXXX")
cleanup() { if [ "${KEEP_VENV:-0}" = 1 ]; then echo "venv kept: $WORK/venv"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION"
if [ "$MODE" = newest ]; then
    echo "torch==$TORCH_VERSION" > "$WORK/torch.txt"
    python -m pip install -q -U -e ".[all]" -c "$WORK/torch.txt"
else
    python -m pip install -q -e ".[all]" -c constraints-lowest.txt
fi
# Local labels dropped (torch==2.13.0+cpu -> torch==2.13.0), so the file works as a constraints file.
python -m pip freeze --exclude-editable | grep -v '^#' | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/' > "$OUT/versions.txt"

set +e
python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
{
    echo "date: $(date -u +%Y-%m-%d)"
    echo "mode: $MODE"
    echo "python: $(python -c 'import platform; print(platform.python_version())')"
    echo "pytest exit status: $rc"
    echo "result: $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -1)"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
echo "versions: $OUT/versions.txt, log: $OUT/pytest.log"
exit "$rc"
