#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh), builds, and runs the main job: trains a tiny VQ-VAE image
# tokenizer on photo crops through the vqkernels ops (about two minutes on 2 CPU cores, with a
# progress bar), prints its held-out PSNR and codebook usage, writes the grid of originals vs
# reconstructions, then runs the quick benchmark of the ops and layers against naive PyTorch
# and vector-quantize-pytorch. Extra arguments go to the trainer (e.g. --steps 3000).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m vqkernels.info
OUT=runs/demo
rm -rf "$OUT"
python -m models.train vqvae --preset tiny --data photos --out "$OUT" "$@"
echo "reconstruction grid (odd rows: held-out originals, even rows: reconstructions): $OUT/recon.png"
python -m vqkernels.bench --quick
