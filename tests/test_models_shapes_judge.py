"""The shapes judge of models.eval (colour and kind of the objects of a shapes image, segmentation) and the
text-generator judging built on it (with the toy text generator of tests/toy_generator.py)."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from models import generator as gen_registry
from models.eval import (SHAPES_JUDGE_MIN_ACCURACY, _shapes_set, altered_captions, evaluate_generator,
                         first_object, format_generator_summary, judge_text_generator, judgeable, mean_iou,
                         palette_colours, shapes_judge)
from models.train import main as train_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def judged():
    """The judge (from the cache, $VQK_CACHE or ~/.cache/vqkernels, where the first call trains it: about a
    minute on one thread), its scores and the first 300 held-out scenes."""
    judge, scores = shapes_judge(32)
    holdout = _shapes_set(32, "holdout")
    cache = Path(os.environ.get("VQK_CACHE", Path.home() / ".cache" / "vqkernels"))
    return judge, scores, {k: v[:300] for k, v in holdout.items()}, cache


def test_judge_states_its_held_out_accuracy_rejection_and_iou(judged):
    judge, scores, _, _ = judged
    assert scores["images"] == 2000
    assert scores["accuracy"] >= SHAPES_JUDGE_MIN_ACCURACY
    assert scores["rejection"] >= 0.95 and scores["iou"] >= 0.75
    assert scores["per_class_iou"][0] > 0.99  # background


def test_caption_match_accepts_real_captions_and_refuses_recoloured_and_reshaped_ones(judged):
    judge, _, held, _ = judged
    images, captions = held["image"], held["caption"]
    assert judge.caption_match(images, captions).float().mean() >= SHAPES_JUDGE_MIN_ACCURACY
    wrong = altered_captions(captions)
    assert wrong[0] != captions[0] and wrong[0].split()[2:] == captions[0].split()[2:]  # colour changed only
    assert judge.caption_match(images.repeat_interleave(2, 0), wrong).float().mean() <= 0.05
    # the same images recoloured: the caption's first colour swapped for one the scene does not use
    names = list(models.data._PALETTE)
    palette = torch.tensor(list(models.data._PALETTE.values())) / 127.5 - 1
    recoloured = images.clone()
    for b, caption in enumerate(captions):
        colour, _ = first_object(caption)
        other = next(i for i in range(len(names)) if names[i] not in caption)
        mask = (palette_colours(images[b:b + 1])[0] == colour) & (held["scene"][b] > 0)
        recoloured[b][:, mask] = palette[other][:, None]
    assert judge.caption_match(recoloured, captions).float().mean() <= 0.05


def test_blank_images_noise_and_random_colour_fields_match_nothing(judged):
    judge, _, held, _ = judged
    blank = torch.ones(8, 3, 32, 32)
    assert not judge.caption_match(blank, held["caption"][:8]).any()
    assert (judge.segment(blank) == 0).all()
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(100, 3, 32, 32, generator=g) * 2 - 1
    fields = torch.nn.functional.interpolate(torch.rand(100, 3, 8, 8, generator=g) * 2 - 1, size=32, mode="bilinear")
    assert judge.caption_match(noise, held["caption"][:100]).float().mean() <= 0.02
    assert judge.caption_match(fields, held["caption"][:100]).float().mean() <= 0.02


def test_segmentation_iou_is_near_one_on_real_maps_and_low_on_blank_images(judged):
    judge, _, held, _ = judged
    iou, per_class = mean_iou(judge.segment(held["image"]), held["scene"])
    assert iou >= 0.75 and len(per_class) == 5
    assert mean_iou(held["scene"], held["scene"])[0] == 1.0
    assert mean_iou(judge.segment(torch.ones(300, 3, 32, 32)), held["scene"])[0] < 0.25


def test_caption_parsing_errors():
    assert first_object("an orange ellipse and a red circle") == (list(models.data._PALETTE).index("orange"), 4)
    for bad in ("", "a handwritten seven", "a pink circle", "a red hexagon"):
        with pytest.raises(ValueError, match="does not start with a shapes object"):
            first_object(bad)


def test_judge_is_cached(judged):
    judge, _, _, cache = judged
    files = list(cache.glob("shapes-judge-v*-r32-s0.safetensors"))
    assert len(files) == 1
    saved = load_file(str(files[0]))
    assert all(torch.equal(saved[k], v) for k, v in judge.state_dict().items())


# ---------------------------------------------------------------- judging text generators

class Identity(models.tokenizer.Tokenizer):
    """A 'tokenizer' at 32x32 that reconstructs its inputs exactly."""
    def __init__(self):
        torch.nn.Module.__init__(self)
        self.cfg = type("C", (), {"resolution": 32})()

    def reconstruct(self, x):
        return x


class Oracle(torch.nn.Module):
    """A 'generator' whose samples are the real images of the prompts, served in order (each held-out
    image ``per_caption`` times, as judge_text_generator asks); it records the scene maps it is given and
    captions every image 'A red  circle'."""
    conditioning = "text"

    def __init__(self, held, n, per_caption):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = Identity()
        self.images = held["image"][:n].repeat_interleave(per_caption, 0)
        self.captions = [c for c in held["caption"][:n] for _ in range(per_caption)]
        self.served, self.scenes = 0, []

    def sample(self, n, prompt, seed=0, scene=None, **kwargs):
        assert list(prompt) == self.captions[self.served:self.served + n]
        if scene is not None:
            self.scenes.append(scene)
        self.served += n
        return models.generator.Samples(self.images[self.served - n:self.served], None, None, prompt)

    def caption(self, images):
        return ["A red  circle"] * images.shape[0]  # compared without case and spacing


def test_judge_text_generator_scores_an_oracle(judged):
    _, scores, held, _ = judged
    oracle = Oracle(held, 40, 2)
    captions = held["caption"][:40]
    out = judge_text_generator(oracle, captions, held["scene"][:40], per_caption=2, images=held["image"][:40],
                               batch_size=16)
    judge = shapes_judge(32)[0]
    reals, maps = held["image"][:40].repeat_interleave(2, 0), held["scene"][:40].repeat_interleave(2, 0)
    assert out["samples"] == 80 and out["caption_match"] >= 0.9
    assert out["scene_iou"] == pytest.approx(mean_iou(judge.segment(reals), maps)[0]) and out["scene_iou"] > 0.6
    assert out["tokenizer_caption_match"] >= 0.9
    assert torch.equal(torch.cat(oracle.scenes), held["scene"][:40].repeat_interleave(2, 0))
    assert set(out["per_kind"]) <= {"rectangle", "circle", "triangle", "ellipse"}
    assert out["min_group_match"] == min(list(out["per_kind"].values()) + list(out["per_colour"].values()))
    assert out["caption_exact"] == sum(c == "a red circle" for c in captions) / 40
    assert out["judge_accuracy"] == scores["accuracy"] and out["fid"] >= 0
    blank = judge_text_generator(type("Blank", (Oracle,), {"sample": lambda self, n, prompt, seed=0, **k:
                                      models.generator.Samples(torch.ones(n, 3, 32, 32), None, None, prompt)})(held, 8, 1),
                                 captions[:8])
    assert blank["caption_match"] == 0.0 and "scene_iou" not in blank
    with pytest.raises(ValueError, match="does not start with a shapes object"):
        judge_text_generator(oracle, ["a handwritten seven"])


@pytest.fixture(scope="module")
def toys(monkeypatch_module):
    monkeypatch_module.setitem(gen_registry.GENERATORS, "toy_text", ("toy_generator", "vqvae"))


@pytest.fixture(scope="module")
def shapes_tokenizer(tmp_path_factory):
    """A tiny vqvae tokenizer at 32x32 (8x8 codes of 16) trained for two steps on shapes."""
    from models.train import Trainer, build_run_config
    out = tmp_path_factory.mktemp("tok32")
    sets = ["model.resolution=32", "model.hidden=8", "model.res_channels=4", "model.num_res_blocks=1",
            "model.embed_dim=4", "model.codebook_size=16", "data.hflip=false", "data.num_images=40"]
    Trainer(build_run_config("vqvae", None, None, sets, data="shapes", steps=2, batch_size=8), out,
            progress=False).fit()
    return out


def test_a_text_run_on_shapes_is_judged_by_the_trainer(judged, toys, shapes_tokenizer, tmp_path, capsys):
    import json
    out = tmp_path / "run"
    assert train_main(["toy_text", "--stage", "generator", "--tokenizer", str(shapes_tokenizer), "--out", str(out),
                       "--no-progress", "--set", "train.judge_per_class=1", "--set", "data.num_images=60"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["judge_samples"] == 6 and 0 <= result["judge_caption_match"] <= 1  # 6 held-out scenes
    assert result["judge_judge_accuracy"] >= SHAPES_JUDGE_MIN_ACCURACY and "judge_scene_iou" not in result
    printed = capsys.readouterr().out
    assert "caption match" in printed and "on held-out shapes" in printed and "classifier FID" in printed
    from models.eval import main as eval_main
    assert eval_main(["toy_text", "--ckpt", str(out), "--judge-per-class", "1"]) == 0
    assert "caption match" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["judge_samples"] == 6
    model = models.load("toy_text", out)
    assert judgeable(model, "shapes") and not judgeable(model, "digits")
    holdout = models.data.build_dataset(models.config.DataConfig(name="shapes", num_images=60), 32, "holdout")
    plain = evaluate_generator(model, holdout, judge=False)
    assert "judge_caption_match" not in plain and "caption match" not in format_generator_summary(plain)


def test_evaluate_generator_passes_scene_maps_to_a_generator_that_reads_them(judged, toys, shapes_tokenizer):
    from toy_generator import ToyText, ToyTextConfig
    given = []

    class SceneToy(ToyText):
        def sampling_condition(self, n, labels, prompt, scene, device):
            given.append(scene)
            return super().sampling_condition(n, labels, prompt, None, device)

    model = SceneToy(ToyTextConfig(), models.checkpoint.load_model("vqvae", shapes_tokenizer))
    holdout = models.data.build_dataset(models.config.DataConfig(name="shapes", num_images=100), 32, "holdout")
    result = evaluate_generator(model, holdout, batch_size=4, judge=True, judge_per_class=1)
    assert torch.equal(torch.cat(given), torch.stack([holdout[i]["scene"] for i in range(10)]))
    assert result["judge_samples"] == 10 and 0 <= result["judge_scene_iou"] <= 1
    assert "scene map IoU" in format_generator_summary(result)
