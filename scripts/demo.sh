#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh), builds, and runs the main job: a quick benchmark of the
# vqkernels ops against naive PyTorch on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m vqkernels.info
python -m vqkernels.bench --quick "$@"
