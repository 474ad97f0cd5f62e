#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh), builds, checks the Python and C++ style, and runs the whole test suite on
# both cores.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m vqkernels.info
python -m ruff check .  # lint: pyproject.toml's [tool.ruff]
clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*  # C++ / CUDA style: .clang-format
python -m pytest tests -n 2 -q -p no:cacheprovider "$@"
