"""The model zoo: trains every system's ``tiny`` preset and records what each reaches.

``python -m models.zoo --stage generator [--only NAME,...] [--out runs/zoo-generators]`` does the
same for every class-conditional generator (:data:`models.generator.CLASS_GENERATORS`): each tokenizer's tiny preset
is first trained on ``digits`` (:data:`DIGITS_TOKENIZER`, once per tokenizer system, kept in the out
folder and reused), then the generator's tiny preset on its codes with the labels; the trainer's
final evaluation gives the judge's class accuracy (every class >= 80% is the target, reached plain
or with ``--cfg`` :data:`GUIDED_CFG`, each judged) and classifier FID, and the generators section of
``models/RESULTS.md`` (``<!-- generators:start -->``..``end``) gets the table and each sample grid
(``models/results/gen-<entry>.png``; record ``models/results/generators.json``).

``python -m models.zoo --stage text [--only NAME,...] [--out runs/zoo-text]`` does it for every
text-conditioned generator (:data:`models.generator.TEXT_GENERATORS`): each tokenizer system the
generators read (Make-A-Scene: ``vqgan`` and ``scene``) has its tiny preset trained once on ``shapes``
(:data:`SHAPES_TOKENIZER`; ``vqgan`` is shared by make_a_scene and muse), then each generator's tiny
preset on its codes with the captions; the trainer's final evaluation gives the shapes judge's
caption-match rate (>= 70% is the target, reached plain or with ``--cfg`` :data:`TEXT_GUIDED_CFG`, each
judged), Make-A-Scene's scene-map IoU and UniCode's captioning exact match, and the ``<!-- text:start -->``..``end`` section of ``models/RESULTS.md`` gets the table
and each sample grid (``models/results/text-<name>.png``; record ``models/results/text.json``).

``python -m models.zoo --stage tokenizer [--only NAME,...] [--out runs/zoo] [--device cpu]``
trains each entry of :data:`ENTRIES` in its own process (``python -m models.train``, so every
run is an ordinary run folder that ``models.eval`` and ``models.load`` read), then writes the
zoo section of ``models/RESULTS.md`` (between ``<!-- zoo:start -->`` and ``<!-- zoo:end -->``;
the rest of the file is kept) with the held-out numbers, the wall time, the checks against the
issue's targets, and each entry's reconstruction grid copied to ``models/results/<entry>.png``.
With ``--only``, the other entries' rows are kept from the previous run's record
(``models/results/zoo.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import SYSTEMS
from .checkpoint import read_run_config
from .generator import CLASS_GENERATORS, TEXT_GENERATORS, tokenizer_systems

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PSNR_TARGET, USAGE_TARGET = 22.0, 0.5
START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"


@dataclass(frozen=True)
class Entry:
    name: str                      # the row's name (also the run folder's and the grid's)
    system: str
    sets: Tuple[str, ...] = ()     # --set overrides on top of the tiny preset
    vq: bool = True                # held to the VQ targets (PSNR and usage)


ENTRIES: Tuple[Entry, ...] = tuple(Entry(s, s, vq=s != "vae") for s in SYSTEMS) + (
    # the tiny vqvae preset uses the EMA codebook; this is the paper's codebook loss instead
    Entry("vqvae_codebook_loss", "vqvae", ("model.ema=false", "model.dead_code_threshold=0")),
    Entry("vqgan_gumbel", "vqgan", ("model.quantizer=gumbel",)),
    # single-level VQ in the conv stack of rqvae / hqvae / var_vqvae (their f = 4 one): 8 x 8 codes of the
    # same K = 512, trained as they are, so the multi-level comparison differs only in the quantization
    Entry("rqvae_depth1_f4", "rqvae", ("model.depth=1", "model.ch_mult=[1,2,4]")),
)
# Systems held to "better than single-level VQ at the same token count and codebook size", and the
# single-level entries they are compared with.
MULTI_LEVEL = ("rqvae", "hqvae", "var_vqvae")
SINGLE_LEVEL = ("vqvae", "rqvae_depth1_f4")


GEN_START, GEN_END = "<!-- generators:start -->", "<!-- generators:end -->"
ACCURACY_TARGET = 0.8
JUDGE_PER_CLASS = 50  # samples of each class the judge scores after each generator's training
GUIDED_CFG = 2.0      # the class generators are judged again with this classifier-free guidance weight
# how every tokenizer system's tiny preset is trained for the generators: digits, no flips, 800 steps
DIGITS_TOKENIZER = ("--data", "digits", "--steps", "800", "--set", "data.hflip=false")

TEXT_START, TEXT_END = "<!-- text:start -->", "<!-- text:end -->"
CAPTION_TARGET = 0.7
TEXT_JUDGE_PER_CLASS = 30   # train.judge_per_class of the text runs: 10x this many held-out captions judged
TEXT_GUIDED_CFG = 3.0       # the text generators are judged again with this classifier-free guidance weight
# how every tokenizer system's tiny preset is trained for the text generators: shapes, no flips, the preset's steps,
# plus the system's own flags in SHAPES_TOKENIZER_EXTRA
SHAPES_TOKENIZER = ("--data", "shapes", "--set", "data.hflip=false")
SHAPES_TOKENIZER_EXTRA: Dict[str, Tuple[str, ...]] = {
    # Muse's base stage reads the codes of 16-pixel images: half the batches at 16 pixels. Judged on 200 held-out
    # images, the 16-pixel reconstructions (upsampled) then pass the shapes judge 62.5% of the time (47.5% when
    # trained on 32 pixels only; the 16-pixel originals 93%), the 32-pixel ones 95% (97%).
    "vqgan": ("--set", "data.half_resolution=0.5"),
    # DALL-E's dvae at the preset's 1800 steps loses the palette colours (reconstructions pass the judge 41.5% of
    # the time, green never); 4000 steps: 73.5% (dalle then 49.7% plain, 59.3% at cfg 3). Longer is not better:
    # 6000 steps gave 57% in the zoo (yellow lost) and dalle 51.3% at cfg 3.
    "dvae": ("--steps", "4000"),
    # LQAE at the preset's 600 steps of batch 8 reconstructs blurred, colourless shapes (35.5%); 2000 steps: 88%
    "lqae": ("--steps", "2000"),
}


def digits_tokenizer_flags(tokenizer_system: str) -> Tuple[str, ...]:
    return DIGITS_TOKENIZER


def shapes_tokenizer_flags(tokenizer_system: str) -> Tuple[str, ...]:
    return SHAPES_TOKENIZER + SHAPES_TOKENIZER_EXTRA.get(tokenizer_system, ())


def _run(cmd: List[str], name: str) -> Tuple[int, float]:
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=HERE.parent).returncode
    return code, (time.perf_counter() - t0) / 60


def _config_differs(run_dir: Path, tokenizer_system: str, flags: Sequence[str]) -> bool:
    """Whether the finished run in ``run_dir`` was trained with another model / train / data configuration than
    the tiny preset with ``flags`` gives now (a stale folder is trained again, never reused silently)."""
    from .train import build_run_config, parse_args, run_config_from_args
    planned = run_config_from_args(parse_args([tokenizer_system, "--preset", "tiny", *flags]))
    saved = build_run_config(tokenizer_system, saved=read_run_config(run_dir))  # later fields at their defaults
    return any(getattr(saved, k) != getattr(planned, k) for k in ("model", "train", "data"))


def stage_tokenizer(tokenizer_system: str, out: Path, device: str, flags: Sequence[str] = DIGITS_TOKENIZER) -> Dict:
    """The run folder of ``tokenizer_system``'s tiny preset trained with ``flags`` (digits or shapes;
    trained unless ``out`` already holds a finished one of the same configuration) and its held-out numbers."""
    run_dir = out / f"tokenizer-{tokenizer_system}"
    minutes = None
    finished = (run_dir / "eval.json").is_file()
    if finished and _config_differs(run_dir, tokenizer_system, flags):
        print(f"== tokenizer {tokenizer_system}: {run_dir} was trained with another configuration; training again",
              flush=True)
        finished = False
    if not finished:
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "models.train", tokenizer_system, "--preset", "tiny", "--out", str(run_dir),
               "--device", device, "--no-progress", *flags]
        code, minutes = _run(cmd, f"tokenizer {tokenizer_system}")
        if code != 0:
            return {"dir": run_dir, "error": f"tokenizer {tokenizer_system} exit code {code}", "minutes": minutes}
    with open(run_dir / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    return {"dir": run_dir, "minutes": minutes, "psnr": result["psnr"], "steps": result["step"]}


def train_generator_entry(name: str, out: Path, device: str, grids: Path, steps: Optional[int] = None,
                          sets: Sequence[str] = (),
                          tokenizer_flags: Callable[[str], Sequence[str]] = digits_tokenizer_flags,
                          judge_per_class: int = JUDGE_PER_CLASS, grid_prefix: str = "gen",
                          guided_cfg: Optional[float] = None) -> Dict:
    """Trains generator system ``name`` (tiny preset) on its tokenizers (each trained with
    ``tokenizer_flags(system)``, once) in child processes; returns the trainer's evaluation plus wall times
    (with ``guided_cfg``, also the judge's scores of samples guided with that weight, under ``guided``),
    and copies the sample grid into ``grids`` as ``<grid_prefix>-<name>.png``."""
    tokenizers = [(system, stage_tokenizer(system, out, device, tokenizer_flags(system))) for system in tokenizer_systems(name)]
    row = {"name": name, "tokenizer": " + ".join(system for system, _ in tokenizers),
           "tokenizer_psnr": tokenizers[0][1].get("psnr"), "tokenizer_minutes": tokenizers[0][1]["minutes"],
           "tokenizers": {system: {"psnr": tok.get("psnr"), "minutes": tok["minutes"], "steps": tok.get("steps")}
                          for system, tok in tokenizers}}
    failed = [tok["error"] for _, tok in tokenizers if "error" in tok]
    if failed:
        return dict(row, error="; ".join(failed), minutes=0.0)
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "models.train", name, "--stage", "generator",
           "--tokenizer", *(str(tok["dir"]) for _, tok in tokenizers),
           "--preset", "tiny", "--out", str(run_dir), "--device", device, "--no-progress",
           "--set", f"train.judge_per_class={judge_per_class}"]
    cmd += [a for s in sets for a in ("--set", s)] + (["--steps", str(steps)] if steps is not None else [])
    code, minutes = _run(cmd, f"generator {name}")
    if code != 0:
        return dict(row, error=f"exit code {code}", minutes=minutes)
    with open(run_dir / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    grids.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "samples.png", grids / f"{grid_prefix}-{name}.png")
    if guided_cfg is not None:
        row["guided"] = guided_judgement(name, run_dir, device, judge_per_class, guided_cfg)
    return dict(row, minutes=minutes, train_minutes=_train_minutes(run_dir), parameters=_parameters(run_dir),
                steps=result.pop("step"), **result)


def guided_judgement(name: str, run_dir: Path, device: str, judge_per_class: int, cfg: float) -> Dict:
    """The judge's scores of a trained generator's samples guided with weight ``cfg`` (``models.eval`` in a
    child process; its result in ``<run>/eval-cfg<cfg>.json``)."""
    path = run_dir / f"eval-cfg{cfg:g}.json"
    cmd = [sys.executable, "-m", "models.eval", name, "--ckpt", str(run_dir), "--device", device,
           "--judge-per-class", str(judge_per_class), "--cfg", str(cfg), "--json", str(path)]
    code, _ = _run(cmd, f"guided judgement {name}")
    if code != 0:
        return {"cfg": cfg, "error": f"exit code {code}"}
    result = json.loads(path.read_text())
    if "judge_caption_match" in result:  # a text-conditioned generator on shapes
        return {"cfg": cfg, "caption_match": result["judge_caption_match"], "min_group": result["judge_min_group"],
                "min_group_match": result["judge_min_group_match"], "scene_iou": result.get("judge_scene_iou"),
                "fid": result["judge_fid"]}
    return {"cfg": cfg, "accuracy": result["judge_accuracy"], "min_class_accuracy": result["judge_min_class_accuracy"],
            "fid": result["judge_fid"]}


def _train_minutes(run_dir: Path) -> Optional[float]:
    """Minutes from the run's start event to its last training log record (the training alone)."""
    start = end = None
    with open(run_dir / "log.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "event" and record.get("event") == "start":
                start = record["time"]
            elif record.get("kind") == "train":
                end = record["time"]
    return None if start is None or end is None else (end - start) / 60


def _met(row: Dict, key: str, guided_key: str, target: float, target_text: str) -> Optional[str]:
    """What every zoo verdict starts with: failed, not judged, met by plain samples or by guided ones (saying
    which); None when the target is missed."""
    if "error" in row:
        return "failed: " + row["error"]
    if key not in row:
        return "not judged"
    guided = row.get("guided", {}).get(guided_key)
    if row[key] >= target:
        return f"meets ({target_text})"
    if guided is not None and guided >= target:
        return f"meets with --cfg {row['guided']['cfg']:g} ({target_text})"
    return None


def _generator_verdict(row: Dict) -> str:
    met = _met(row, "judge_min_class_accuracy", "min_class_accuracy", ACCURACY_TARGET, "every class >= 80%")
    if met:
        return met
    low, guided = row["judge_min_class_accuracy"], row.get("guided", {}).get("min_class_accuracy")
    worst = min(range(10), key=lambda c: row["judge_per_class"][c])
    return f"misses: class {worst} at {low:.0%} < 80%" + (f", lowest class {guided:.0%} with --cfg "
                                                          f"{row['guided']['cfg']:g}" if guided is not None else "")


def render_generators(rows: Dict[str, Dict], device: str, real_fid: Optional[float] = None) -> str:
    lines = [GEN_START, "", "## Zoo: every tiny generator trained on digits on 2 CPU cores", "",
             f"`python -m models.zoo --stage generator` on {machine()}, device {device}. Each tokenizer system's "
             "tiny preset is trained on `digits` (800 steps), then the generator's tiny preset on its codes with "
             "the labels. The judge (`models.eval.digits_judge`, a small CNN trained on the digits training split, "
             f"held-out accuracy in the table) classifies {JUDGE_PER_CLASS} samples of each class (temperature 1, no "
             "top-k / top-p, no guidance): the target is >= 80% of every class's samples classified as that class, "
             f"with plain samples or with samples guided by `--cfg {GUIDED_CFG:g}`. "
             f"Classifier FID: Frechet distance of the judge's 64-d features, {10 * JUDGE_PER_CLASS} samples vs the "
             "180 held-out digits"
             + (f" (the training digits vs the held-out ones: {real_fid:.2f})." if real_fid is not None else ".")
             + f" The same runs are judged again on samples guided with `--cfg {GUIDED_CFG:g}` (its FID in brackets).",
             "",
             "| generator | tokenizer (held-out PSNR) | params | steps | training minutes (whole run) | held-out "
             f"bits/token | class accuracy (lowest class) | classifier FID | with --cfg {GUIDED_CFG:g} (lowest) [FID] | "
             "samples/s | judge | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, row in rows.items():
        tok = f"`{row['tokenizer']}` ({row['tokenizer_psnr']:.1f} dB)" if row.get("tokenizer_psnr") else row["tokenizer"]
        if "error" in row:
            lines.append(f"| `{name}` | {tok} | | | {row['minutes']:.1f} | | | | | | | {_generator_verdict(row)} |")
            continue
        params = f"{row['parameters'] / 1e6:.2f}M" if row.get("parameters") else "?"
        judged = "judge_accuracy" in row
        g = row.get("guided", {})
        guided = (f"{g['accuracy']:.1%} ({g['min_class_accuracy']:.0%}) [{g['fid']:.1f}]" if "accuracy" in g
                  else g.get("error", "-"))
        acc = f"{row['judge_accuracy']:.1%} ({row['judge_min_class_accuracy']:.0%})" if judged else "-"
        fid = f"{row['judge_fid']:.2f}" if judged else "-"
        speed = f"{row['judge_samples_per_s']:.1f}" if judged else "-"
        judge = f"{row['judge_judge_accuracy']:.1%}" if judged else "-"
        train = f"{row['train_minutes']:.1f} ({row['minutes']:.1f})" if row.get("train_minutes") else f"{row['minutes']:.1f}"
        lines.append(f"| `{name}` | {tok} | {params} | {row['steps']} | {train} | "
                     f"{row['bits_per_token']:.3f} | {acc} | {fid} | {guided} | {speed} | {judge} | "
                     f"{_generator_verdict(row)} |")
    lines += ["", "Sample grids (a row per class, 0 to 9):", ""]
    lines += [f"- `{name}`: ![{name}](results/gen-{name}.png)" for name, row in rows.items() if "error" not in row]
    return "\n".join(lines + ["", GEN_END])


def real_digits_fid() -> float:
    """The classifier FID of the training digits (400) against the held-out ones: the floor of the table."""
    from .eval import _judge_sets, digits_judge, frechet_distance
    judge, _ = digits_judge(32)
    train, holdout = _judge_sets(32)
    with torch.no_grad():
        return frechet_distance(judge.embed(train["image"][:400]), judge.embed(holdout["image"]))


def run_rows(args, p, record: Path, names: Sequence[str], train_one: Callable[[str], Dict]) -> Dict[str, Dict]:
    """Trains the ``--only`` entries of ``names`` (all by default) with ``train_one``, keeps the other
    rows of the previous ``record`` with ``--only``, and writes the record after each entry; returns the rows
    in order."""
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown entries {unknown}; entries: {', '.join(names)}")
    rows: Dict[str, Dict] = json.loads(record.read_text()) if only and record.exists() else {}
    record.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not only or name in only:
            rows[name] = train_one(name)
            rows = {n: rows[n] for n in names if n in rows}
            record.write_text(json.dumps(rows, indent=1), encoding="utf-8")  # after each row: a stop keeps the finished ones
    return rows


def generator_main(args, p) -> int:
    results = Path(args.results)
    record = results.parent / "results" / "generators.json"
    rows = run_rows(args, p, record, list(CLASS_GENERATORS), lambda name: train_generator_entry(
        name, Path(args.out), args.device, record.parent, args.steps, args.sets, guided_cfg=GUIDED_CFG))
    text = render_generators(rows, args.device, real_digits_fid())
    write_section(text, results, GEN_START, GEN_END)
    print(text)
    return 0 if all("error" not in r for r in rows.values()) else 1


def _text_verdict(row: Dict) -> str:
    """Met when plain or guided samples reach the caption-match target (saying which)."""
    met = _met(row, "judge_caption_match", "caption_match", CAPTION_TARGET, f">= {CAPTION_TARGET:.0%}")
    if met:
        return met
    best = max(row["judge_caption_match"], row.get("guided", {}).get("caption_match") or 0.0)
    return f"misses: {best:.0%} < {CAPTION_TARGET:.0%}"


def _guided_text(row: Dict) -> str:
    """The guided judgement's cell: caption match (lowest group) [scene IoU]."""
    g = row.get("guided", {})
    if "caption_match" not in g:
        return g.get("error", "-")
    iou = f" [IoU {g['scene_iou']:.3f}]" if g.get("scene_iou") is not None else ""
    return f"{g['caption_match']:.1%} ({g['min_group']} {g['min_group_match']:.0%}){iou}"


def _pct(row: Dict, key: str) -> str:
    return f"{row[key]:.1%}" if row.get(key) is not None else "-"


def render_text(rows: Dict[str, Dict], device: str, judge: Optional[Dict] = None) -> str:
    """The text section of RESULTS.md: a row per text-conditioned generator and its sample grid."""
    own = (f" (on the 2000 held-out scenes it accepts {judge['accuracy']:.1%} of the real captions, rejects "
           f"{judge['rejection']:.1%} of captions with a wrong colour or kind, and segments with mean IoU "
           f"{judge['iou']:.3f})" if judge else "")
    extra = ", ".join(f"`{system}` `{' '.join(flags)}`" for system, flags in SHAPES_TOKENIZER_EXTRA.items())
    lines = [TEXT_START, "", "## Zoo: every tiny text-conditioned generator trained on shapes on 2 CPU cores", "",
             f"`python -m models.zoo --stage text` on {machine()}, device {device}. Each tokenizer system's tiny preset "
             "is trained once on `shapes` (no flips, the preset's steps; `make_a_scene` reads the `vqgan` and the "
             f"`scene` tokenizers; own flags: {extra}), then the generator's tiny preset on its codes with the "
             "captions (its training minutes are the generator's alone). The judge "
             "(`models.eval.shapes_judge`: a small U-Net segmenting background / rectangle / round / triangle, round "
             "objects split into circles and ellipses by their elongation, colours read from the pixels against "
             f"the palette){own} looks at one sample for each caption of the first {10 * TEXT_JUDGE_PER_CLASS} "
             "held-out images (temperature 1, no top-k / top-p, no guidance). Caption match: the sample shows the "
             "caption's first-named (largest) object in its colour and kind (at least 1% of the pixels); target "
             f">= {CAPTION_TARGET:.0%}. Lowest group: the lowest rate over the first object's kinds and colours. "
             "Tokenizer's ceiling: the caption match of the (first) tokenizer's reconstructions of the same held-out "
             "images, the most its generator can reach. "
             "Scene IoU (Make-A-Scene, sampled with the held-out images' scene maps): mean IoU of the judge's "
             "segmentation of the samples with the maps. Captioning (UniCode): exact match of its captions of the "
             "held-out images with the real ones. Classifier FID: Frechet distance of the judge's 48-d features, "
             f"samples vs the held-out scenes. The same runs are judged again on samples guided with `--cfg "
             f"{TEXT_GUIDED_CFG:g}` (lowest group, and scene IoU where there is one).",
             "",
             "| generator | tokenizers (held-out PSNR of the first) | params | steps | training minutes (whole run) "
             "| held-out bits/token | caption match | lowest group | tokenizer's ceiling | scene IoU | captioning exact "
             f"| classifier FID | with --cfg {TEXT_GUIDED_CFG:g} | samples/s | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, row in rows.items():
        tok = (f"`{row['tokenizer']}` ({row['tokenizer_psnr']:.1f} dB)" if row.get("tokenizer_psnr")
               else f"`{row['tokenizer']}`")
        if "error" in row:
            lines.append(f"| `{name}` | {tok} | | | {row['minutes']:.1f} | | | | | | | | | | {_text_verdict(row)} |")
            continue
        params = f"{row['parameters'] / 1e6:.2f}M" if row.get("parameters") else "?"
        train = f"{row['train_minutes']:.1f} ({row['minutes']:.1f})" if row.get("train_minutes") else f"{row['minutes']:.1f}"
        judged = "judge_caption_match" in row
        low = f"{row['judge_min_group']} {row['judge_min_group_match']:.0%}" if judged else "-"
        iou = f"{row['judge_scene_iou']:.3f}" if row.get("judge_scene_iou") is not None else "-"
        fid = f"{row['judge_fid']:.2f}" if judged else "-"
        speed = f"{row['judge_samples_per_s']:.1f}" if judged else "-"
        lines.append(f"| `{name}` | {tok} | {params} | {row['steps']} | {train} | {row['bits_per_token']:.3f} | "
                     f"{_pct(row, 'judge_caption_match')} | {low} | {_pct(row, 'judge_tokenizer_caption_match')} | "
                     f"{iou} | {_pct(row, 'judge_caption_exact')} | "
                     f"{fid} | {_guided_text(row)} | {speed} | {_text_verdict(row)} |")
    lines += ["", "Sample grids (a row per held-out caption, its first eight distinct ones):", ""]
    lines += [f"- `{name}`: ![{name}](results/text-{name}.png)" for name, row in rows.items() if "error" not in row]
    return "\n".join(lines + ["", TEXT_END])


def text_main(args, p) -> int:
    """``--stage text``: every system of :data:`TEXT_GENERATORS`, on tokenizers trained on shapes."""
    from .eval import shapes_judge
    results = Path(args.results)
    record = results.parent / "results" / "text.json"
    rows = run_rows(args, p, record, list(TEXT_GENERATORS), lambda name: train_generator_entry(
        name, Path(args.out), args.device, record.parent, args.steps, args.sets, shapes_tokenizer_flags,
        TEXT_JUDGE_PER_CLASS, "text", TEXT_GUIDED_CFG))
    text = render_text(rows, args.device, shapes_judge(32)[1])
    write_section(text, results, TEXT_START, TEXT_END)
    print(text)
    return 0 if all("error" not in r for r in rows.values()) else 1


def train_entry(entry: Entry, out: Path, device: str, grids: Path, steps: Optional[int] = None,
                sets: Sequence[str] = ()) -> Dict:
    """Trains one entry in a child process; returns its eval.json plus wall time, and copies its grid
    into ``grids``."""
    run_dir = out / entry.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "models.train", entry.system, "--preset", "tiny", "--out", str(run_dir),
           "--device", device, "--no-progress"] + [a for s in (*entry.sets, *sets) for a in ("--set", s)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    print(f"== {entry.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE.parent)
    minutes = (time.perf_counter() - t0) / 60
    if proc.returncode != 0:
        return {"name": entry.name, "system": entry.system, "error": f"exit code {proc.returncode}",
                "minutes": minutes}
    with open(run_dir / "eval.json", encoding="utf-8") as f:
        result = json.load(f)
    grids.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "recon.png", grids / f"{entry.name}.png")
    return {"name": entry.name, "system": entry.system, "sets": list(entry.sets), "vq": entry.vq,
            "minutes": minutes, "parameters": _parameters(run_dir), "data": read_run_config(run_dir)["data"]["name"],
            "steps": result.pop("step"), **result}


def _parameters(run_dir: Path) -> Optional[int]:
    with open(run_dir / "log.jsonl", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "event" and record.get("event") in ("start", "resume") and "parameters" in record:
                return record["parameters"]
    return None


def _tokens(row: Dict) -> int:
    return sum((row.get("tokens_per_image") or {}).values())


def _min_usage(row: Dict) -> Optional[float]:
    levels = row.get("codebooks") or {}
    return min(c["usage"] for c in levels.values()) if levels else None


def _verdict(row: Dict) -> str:
    if "error" in row:
        return "failed: " + row["error"]
    if not row["vq"]:
        return "baseline (no codes)"
    misses = []
    if row["psnr"] < PSNR_TARGET:
        misses.append(f"PSNR {row['psnr']:.1f} < {PSNR_TARGET:.0f}")
    usage = _min_usage(row)
    if usage is not None and usage < USAGE_TARGET:
        misses.append(f"usage {usage:.0%} < {USAGE_TARGET:.0%}")
    return "meets both" if not misses else "misses: " + ", ".join(misses)


def _levels(row: Dict) -> str:
    return ", ".join(f"{k} {c['codes']}: {c['usage']:.0%} / {c['perplexity']:.0f}"
                     for k, c in (row.get("codebooks") or {}).items()) or "-"


def comparison(rows: Dict[str, Dict]) -> List[str]:
    """Multi-level tokenizers against each single-level entry: held-out PSNR at their token counts."""
    lines = []
    for base_name in SINGLE_LEVEL:
        base = rows.get(base_name)
        if not base or "error" in base:
            lines.append(f"- (`{base_name}` missing: no comparison with it)")
            continue
        for name in MULTI_LEVEL:
            row = rows.get(name)
            if not row or "error" in row:
                continue
            same_k = {c["codes"] for c in row["codebooks"].values()} == {c["codes"] for c in base["codebooks"].values()}
            better = row["psnr"] > base["psnr"]
            lines.append(f"- `{name}` {row['psnr']:.2f} dB with {_tokens(row)} tokens/image vs `{base_name}` "
                         f"{base['psnr']:.2f} dB with {_tokens(base)} tokens/image "
                         f"({'same' if same_k else 'different'} codebook size): "
                         f"{'better' if better else 'NOT better'} by {row['psnr'] - base['psnr']:+.2f} dB")
    return lines


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def render(rows: Dict[str, Dict], device: str) -> str:
    lines = [START, "", "## Zoo: every tiny tokenizer trained on 2 CPU cores", "",
             f"`python -m models.zoo --stage tokenizer` on {machine()}, device {device}; held-out split of "
             "each preset's data set (photos: 32x32 crops from held-out regions of the photos). Targets for "
             f"the VQ tokenizers: PSNR >= {PSNR_TARGET:.0f} dB and >= {USAGE_TARGET:.0%} of every codebook used.",
             "",
             "| entry | data | params | steps | minutes | tokens/img | bits/img | PSNR dB | SSIM | per level: K: "
             "usage / perplexity | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| `{name}` | | | | {row['minutes']:.1f} | | | | | | {_verdict(row)} |")
            continue
        params = f"{row['parameters'] / 1e6:.2f}M" if row.get("parameters") else "?"
        bits = f"{row['bits_per_image']:.0f}" if row.get("bits_per_image") else "-"
        lines.append(f"| `{name}` | {row['data']} | {params} | {row['steps']} | {row['minutes']:.1f} | "
                     f"{_tokens(row) or '-'} | {bits} | {row['psnr']:.2f} | {row['ssim']:.3f} | {_levels(row)} | "
                     f"{_verdict(row)} |")
    lines += ["", "Multi-level vs single-level VQ:", ""] + comparison(rows)
    lines += ["", "Reconstruction grids (odd rows: held-out originals, even rows: reconstructions):", ""]
    lines += [f"- `{name}`: ![{name}](results/{name}.png)" for name, row in rows.items() if "error" not in row]
    return "\n".join(lines + ["", END])


def write_section(text: str, path: Path = RESULTS, start: str = START, end: str = END):
    """Replaces the ``start``..``end`` section of ``path`` with ``text`` (appends it when missing)."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Model suite results\n"
    if start in old and end in old:
        new = old[:old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.zoo", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="tokenizer", choices=["tokenizer", "generator", "text"])
    p.add_argument("--only", default="", help="comma-separated entries (default: all of them)")
    p.add_argument("--out", default=None, help="runs folder (default runs/zoo, runs/zoo-generators or runs/zoo-text)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="override every preset's steps (smoke runs)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every entry (after the entry's own)")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file whose zoo section is rewritten")
    args = p.parse_args(argv)
    if args.stage == "generator":
        args.out = args.out or "runs/zoo-generators"
        return generator_main(args, p)
    if args.stage == "text":
        args.out = args.out or "runs/zoo-text"
        return text_main(args, p)
    args.out = args.out or "runs/zoo"
    results = Path(args.results)
    record = results.parent / "results" / "zoo.json"
    entries = {e.name: e for e in ENTRIES}
    rows = run_rows(args, p, record, list(entries), lambda name: train_entry(
        entries[name], Path(args.out), args.device, record.parent, args.steps, args.sets))
    write_section(render(rows, args.device), results)
    print(render(rows, args.device))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
