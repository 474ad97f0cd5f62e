# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv in the repo root if missing,
# installs the dependencies and builds vqkernels in place (editable). CUDA sources are
# compiled too when a GPU is visible or VQK_BUILD_CUDA=1 (see setup.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
export VQK_REQUIRE_EXTENSION=1  # a compile error fails the set-up instead of falling back
python -m pip install -q "torch>=2.4" numpy ninja "setuptools>=64" wheel
python -m pip install -q --no-build-isolation -e ".[test${VQK_EXTRAS:+,$VQK_EXTRAS}]"
