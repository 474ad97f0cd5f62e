"""The text-conditioned side of the generator stage, shared by every text-to-image generator: prompts
(WordPiece ids, padding, truncation with a warning, caption dropout), sampling from prompts, guidance
at scale 0, the errors of mismatched conditions, generators built on two tokenizers, and the
trainer / sampling CLI with --prompt (with the toy text generator of tests/toy_generator.py)."""

import warnings

import pytest
import torch

import models
from models import generator as gen_registry
from models import text
from models.generator import Prompts, encode_prompts
from models.sample import main as sample_main, read_scene
from models.train import main as train_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toys(monkeypatch_module):
    monkeypatch_module.setitem(gen_registry.GENERATORS, "toy_text", ("toy_generator", "vqvae"))
    monkeypatch_module.setitem(gen_registry.GENERATORS, "toy_pair", ("toy_generator", "vqvae", "vqvae"))
    monkeypatch_module.setitem(gen_registry.GENERATORS, "toy", ("toy_generator", "vqvae"))


@pytest.fixture(scope="module")
def text_run(toys, tokenizer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    assert train_main(["toy_text", "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out", str(out),
                       "--no-progress", "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def text_model(text_run):
    return models.load("toy_text", text_run)


# ---------------------------------------------------------------- prompts

def test_prompts_are_cls_words_sep_then_padding():
    p = encode_prompts(["a red circle", ""], 8)
    tok = text.tokenizer()
    assert p.ids.shape == (2, 8) and p.ids.dtype == torch.int64 and p.mask.dtype == torch.bool
    assert text.words(p.ids[0][p.mask[0]]) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert p.ids[1, :2].tolist() == [tok.cls_id, tok.sep_id] and p.mask.sum(1).tolist() == [5, 2]
    assert (p.ids[~p.mask] == tok.pad_id).all() and tok.pad_id == 0


def test_a_long_prompt_is_truncated_with_a_warning_that_says_so():
    long = "a red circle and a blue triangle and a green rectangle"
    with pytest.warns(UserWarning, match=r"prompt 'a red circle and .* is 14 WordPiece tokens .* reads 6: "
                                         r"truncated to 'a red circle and'"):
        p = encode_prompts([long, "a red circle"], 6)
    assert text.words(p.ids[0]) == ["[CLS]", "a", "red", "circle", "and", "[SEP]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(["a red circle"], 5)  # 5 tokens: fits


def test_caption_dropout_in_training_only(text_model):
    batch = {"caption": ["a red circle"] * 400, "image": torch.zeros(400, 3, 4, 4)}
    text_model.cfg.text_dropout = 0.25
    try:
        text_model.train()
        torch.manual_seed(0)
        dropped = sum(t == "" for t in text_model.prompts(batch).texts)
        assert 60 < dropped < 140  # 100 expected
        text_model.eval()
        assert all(t == "a red circle" for t in text_model.prompts(batch).texts)
    finally:
        text_model.cfg.text_dropout = 0.1
        text_model.eval()


# ---------------------------------------------------------------- sampling

def test_sampling_from_prompts_is_deterministic_and_guidance_0_is_unconditional(text_model):
    a = text_model.sample(6, prompt="a red circle", seed=3)
    assert a.prompts == ["a red circle"] * 6 and a.labels is None and a.images.shape == (6, 3, 16, 16)
    assert torch.equal(a.ids, text_model.sample(6, prompt="a red circle", seed=3).ids)
    assert not torch.equal(a.ids, text_model.sample(6, prompt="a blue square", seed=3).ids)
    uncond = text_model.sample(6, prompt="", seed=3)
    assert torch.equal(text_model.sample(6, seed=3).ids, uncond.ids)  # no prompt: the empty one
    assert torch.equal(text_model.sample(6, prompt="a red circle", seed=3, cfg=0.0).ids, uncond.ids)
    assert torch.equal(text_model.sample(6, prompt="a red circle", seed=3, cfg=1.0).ids, a.ids)
    per_sample = text_model.sample(2, prompt=["a red circle", ""], seed=3)
    assert per_sample.prompts == ["a red circle", ""]


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=3), "conditioned on text: pass prompt="),
    (dict(prompt=["a", "b", "c"]), "3 prompts for 2 samples"),
    (dict(prompt=7), "prompt must be a string or a list of strings"),
    (dict(prompt="a", scene=torch.zeros(16, 16, dtype=torch.long)), "does not read scene maps"),
    (dict(prompt="a", steps=4), "only parallel decoders"),
])
def test_bad_text_sampling_requests(text_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_model.sample(2, **kwargs)


def test_a_class_generator_refuses_a_prompt(toys, tokenizer_run):
    from toy_generator import Toy, ToyConfig
    toy = Toy(ToyConfig(), models.checkpoint.load_model("vqvae", tokenizer_run))
    with pytest.raises(ValueError, match="conditioned on class labels, not text"):
        toy.sample(2, prompt="a red circle")


# ---------------------------------------------------------------- trainer and CLI

def test_text_run_trains_evaluates_and_samples_from_the_cli(text_run, toys, tmp_path, capsys):
    assert (text_run / "samples.png").is_file() and (text_run / "eval.json").is_file()
    png = tmp_path / "g.png"
    assert sample_main(["toy_text", "--ckpt", str(text_run), "--prompt", "a red circle", "--n", "4",
                        "--out", str(png)]) == 0
    assert png.is_file() and "4 samples of 1 prompt(s)" in capsys.readouterr().out
    assert sample_main(["toy_text", "--ckpt", str(text_run), "--prompt", "a red circle", "a blue square",
                        "--n", "3", "--out", str(png)]) == 2
    assert "2 prompts for 3 samples" in capsys.readouterr().err
    assert sample_main(["toy_text", "--ckpt", str(text_run), "--class", "1", "--out", str(png)]) == 2
    assert "conditioned on text" in capsys.readouterr().err


def test_text_generator_needs_captions(toys, tokenizer_run, tmp_path, capsys):
    assert train_main(["toy_text", "--stage", "generator", "--tokenizer", str(tokenizer_run), "--data", "faces",
                       "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "data set 'faces' has no captions" in capsys.readouterr().err


def test_a_generator_on_two_tokenizers(toys, tokenizer_run, tmp_path, capsys):
    out = tmp_path / "pair"
    assert train_main(["toy_pair", "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out", str(out),
                       "--no-progress"]) == 2
    assert "built on 2 tokenizer(s) (vqvae, vqvae): give one run folder for each" in capsys.readouterr().err
    assert train_main(["toy_pair", "--stage", "generator", "--tokenizer", str(tokenizer_run), str(tokenizer_run),
                       "--out", str(out), "--no-progress"]) == 0
    assert models.checkpoint.read_run_config(out)["tokenizer"] == [str(tokenizer_run.resolve())] * 2
    model = models.load("toy_pair", out)
    assert len(model.tokenizers) == 2 and model.tokenizers[0] is model.tokenizer
    assert not any(p.requires_grad for t in model.tokenizers for p in t.parameters())
    assert set(model.state_dict()) == {"table.weight"}


def test_read_scene_png_and_npy(tmp_path):
    from PIL import Image
    import numpy as np
    ids = np.zeros((8, 8), dtype=np.uint8)
    ids[2:5, 3:6] = 2
    Image.fromarray(ids, mode="L").save(tmp_path / "s.png")
    np.save(tmp_path / "s.npy", ids.astype(np.int32))
    for name in ("s.png", "s.npy"):
        scene = read_scene(str(tmp_path / name))
        assert scene.dtype == torch.int64 and torch.equal(scene, torch.from_numpy(ids.astype(np.int64)))
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel PNG"):
        read_scene(str(tmp_path / "rgb.png"))


def test_prompts_cat():
    a, b = encode_prompts(["a"], 4), encode_prompts(["", "b"], 4)
    both = a.cat(b)
    assert isinstance(both, Prompts) and len(both) == 3 and both.ids.shape == (3, 4) and both.texts == ["a", "", "b"]
