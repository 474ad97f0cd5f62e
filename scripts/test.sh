#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh), builds, and runs the whole test suite on both cores.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m vqkernels.info
python -m pytest tests -n 2 -q -p no:cacheprovider "$@"
