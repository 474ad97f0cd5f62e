#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh), builds, and runs the main job on the handwritten digits that
# scikit-learn ships: trains a tiny VAR multi-scale VQ-VAE tokenizer (stage 1), then a
# class-conditional VAR generator on its codes (stage 2), both through the vqkernels ops, with
# progress bars. The generator's run prints its held-out cross-entropy and the judge's class accuracy
# (a digits classifier trained here) and writes runs/demo/var/samples.png (a row per class,
# 0 to 9); then a guided sample grid. Extra arguments go to the generator's trainer
# (e.g. --steps 3000).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m vqkernels.info
OUT=runs/demo
rm -rf "$OUT"
python -m models.train var_vqvae --preset tiny --data digits --steps 600 --set data.hflip=false --out "$OUT/tokenizer"
python -m models.train var --stage generator --tokenizer "$OUT/tokenizer" --out "$OUT/var" --steps 500 "$@"
echo "samples, a row per class 0-9: $OUT/var/samples.png"
python -m models.sample var --ckpt "$OUT/var" --class 0 1 2 3 4 5 6 7 8 9 --n 10 --cfg 2 --cfg-schedule linear \
    --top-k 100 --columns 10 --out "$OUT/guided.png"
