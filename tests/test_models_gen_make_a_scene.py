"""models.make_a_scene: the transformer over [text, scene codes, image codes] on tiny random-weight vqgan and scene
tokenizers: the vocabulary layout and logits masks per segment, the loss weights, scene maps (checked, errors
naming unknown classes, encoded into the prefix and never sampled), scene=None sampling the scene tokens,
guidance with the null text (the scene kept), editing (the text kept), the kv-cache, a tiny run through the
trainer and the sampling CLI with --scene, and the presets."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from models import scene as scene_module, vqgan
from models.dalle import WORDS
from models.generator import generator_system
from models.make_a_scene import PRESETS, MakeAScene, MakeASceneConfig
from models.sample import main as sample_main
from models.sampling import SamplingConfig, sample_logits
from models.train import Trainer, build_run_config, main as train_main

torch.set_num_threads(1)

# 16x16 images -> 4x4 image codes (K = 16) and 4x4 scene codes (K = 8); 5 scene classes; 8 text tokens
TOK = dict(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8, norm_groups=1,
           embed_dim=4, n_embed=16, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=1)
SCENE = dict(resolution=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=4, codebook_size=8)
SMALL = dict(text_length=8, text_dropout=0.0, dim=32, depth=2, heads=4, dropout=0.0)
L, NS, KS, N, K = 8, 16, 8, 16, 16
V_TEXT = WORDS + L


def _tokenizers():
    torch.manual_seed(0)
    return vqgan.VQGAN(vqgan.VQGANConfig(**TOK)), scene_module.SceneTokenizer(scene_module.SceneConfig(**SCENE))


def _mas(**changes):
    tok, st = _tokenizers()
    torch.manual_seed(1)
    m = MakeAScene(MakeASceneConfig(**{**SMALL, **changes}), tok, st).eval()
    with torch.no_grad():   # larger than the 0.02 initialisation, so that logits depend on the inputs
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m


def _map(kind=2, box=(2, 10, 3, 12)):
    s = torch.zeros(16, 16, dtype=torch.long)
    s[box[0]:box[1], box[2]:box[3]] = kind
    return s


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 3, 16, 16, generator=g) * 2 - 1,
            "caption": ["a red circle", "", "a blue triangle and a green ellipse"][:b],
            "scene": torch.stack([_map(k % 5) for k in range(1, b + 1)])}


@pytest.fixture(scope="module")
def model():
    return _mas()


def test_layout_and_logits_masks_per_segment(model):
    scene, image = model.segments
    assert (scene.name, scene.start, scene.offset, scene.size) == ("scene", L, V_TEXT, KS)
    assert (image.name, image.start, image.offset, image.size) == ("image", L + NS, V_TEXT + KS, K)
    assert model.seq_len == L + NS + N and model.total_tokens == V_TEXT + KS + K
    batch = _batch()
    seq = model.sequence(model.prompts(batch), [model.segment_tokens(batch, 1), model.segment_tokens(batch, 0)])
    with torch.no_grad():
        logits = model.logits(seq)
    ranges = [(0, V_TEXT)] * (L - 1) + [(V_TEXT, V_TEXT + KS)] * NS + [(V_TEXT + KS, V_TEXT + KS + K)] * N
    draws = sample_logits(logits.unsqueeze(0).expand(20, -1, -1, -1), torch.Generator().manual_seed(0), 2.0)
    for p, (a, z) in enumerate(ranges):
        assert torch.isfinite(logits[:, p, a:z]).all() and torch.isinf(logits[:, p, :a]).all()
        assert torch.isinf(logits[:, p, z:]).all()
        assert ((draws[..., p] >= a) & (draws[..., p] < z)).all()


def test_loss_weights_text_scene_image(model):
    batch = _batch()
    out = model.training_step(batch, 0)
    seq = model.sequence(model.prompts(batch), [model.segment_tokens(batch, 1), model.segment_tokens(batch, 0)])
    logits = model.logits(seq)
    ce = [F.cross_entropy(logits[:, a - 1:z - 1].flatten(0, 1), seq[:, a:z].flatten())
          for a, z in ((1, L), (L, L + NS), (L + NS, L + NS + N))]
    assert torch.allclose(out.loss, (ce[0] + 7 * ce[1] + 7 * ce[2]) / 15, atol=1e-5)
    assert torch.allclose(out.logs["scene_nll"], ce[1], atol=1e-5) and torch.allclose(out.logs["nll"], ce[2], atol=1e-5)
    # the scene codes come from batch["scene"] through the scene tokenizer
    st = model.scene_tokenizer
    assert torch.equal(seq[:, L:L + NS] - V_TEXT, st.encode(st.inputs(batch)).flatten(1))


def test_scene_conditioned_sampling_puts_the_scene_in_the_prefix(model):
    m = _map()
    cond = model.sampling_condition(3, None, "a red circle", m, "cpu")
    assert torch.equal(cond.scene, m.expand(3, -1, -1)) and cond.prompts.texts == ["a red circle"] * 3
    codes = model.scene_codes(m[None])
    for kwargs in (dict(), dict(cfg=3.0, top_k=5)):
        params = SamplingConfig(temperature=3.0, **kwargs).check()
        got = model.generate_tokens(3, cond, params, torch.Generator().manual_seed(0))
        assert torch.equal(got["scene"].flatten(1), codes.expand(3, -1))      # given, not sampled
        assert got["image"].shape == (3, 4, 4) and got["image"].max() < K
        cached = model.generate_tokens(3, cond, dataclasses.replace(params, use_cache=False),
                                       torch.Generator().manual_seed(0))
        assert torch.equal(cached["image"], got["image"])
    # the image depends on the map; one map per sample works
    other = _map(3, (0, 16, 0, 8))
    assert not torch.equal(model.sample(3, prompt="a red circle", scene=m, seed=1).ids,
                           model.sample(3, prompt="a red circle", scene=other, seed=1).ids)
    maps = torch.stack([m, other])
    cond = model.sampling_condition(2, None, "a red circle", maps, "cpu")
    got = model.generate_tokens(2, cond, SamplingConfig().check(), torch.Generator().manual_seed(0))
    assert torch.equal(got["scene"].flatten(1), model.scene_codes(maps))
    assert not torch.equal(model.scene_codes(maps)[0], model.scene_codes(maps)[1])
    both = model.sample(2, prompt="a red circle", scene=maps, seed=1)
    assert both.ids.shape == (2, 4, 4) and both.prompts == ["a red circle"] * 2


def test_scene_none_samples_the_scene_tokens(model):
    cond = model.sampling_condition(4, None, "a red circle", None, "cpu")
    assert cond.scene is None and cond.scene_tokens is None
    for kwargs in (dict(), dict(cfg=2.0, cfg_schedule="linear")):
        params = SamplingConfig(top_k=6, **kwargs).check()
        got = model.generate_tokens(4, cond, params, torch.Generator().manual_seed(2))
        assert got["scene"].shape == (4, 4, 4) and got["scene"].min() >= 0 and got["scene"].max() < KS
        assert len(got["scene"].unique()) > 1
        plain = model.generate_tokens(4, cond, dataclasses.replace(params, use_cache=False),
                                      torch.Generator().manual_seed(2))
        assert torch.equal(plain["scene"], got["scene"]) and torch.equal(plain["image"], got["image"])
    out = model.sample(4, prompt="a red circle", seed=2)
    assert out.ids.shape == (4, 4, 4) and out.images.shape == (4, 3, 16, 16)


def test_guidance_zero_is_the_null_text_with_the_same_scene(model):
    m = _map()
    uncond = model.sample(3, prompt="", scene=m, seed=7).ids
    assert torch.equal(model.sample(3, prompt="a red circle", scene=m, seed=7, cfg=0.0).ids, uncond)
    cond = model.sample(3, prompt="a red circle", scene=m, seed=7).ids
    assert torch.equal(model.sample(3, prompt="a red circle", scene=m, seed=7, cfg=1.0).ids, cond)
    assert not torch.equal(cond, uncond)
    # no scene: guidance 0 samples scene and image from the null text
    assert torch.equal(model.sample(3, prompt="a red circle", seed=7, cfg=0.0).ids, model.sample(3, prompt="", seed=7).ids)


def test_edit_keeps_the_text_and_changes_the_scene(model):
    m, edited = _map(), _map(4, (0, 16, 6, 16))
    original = model.sample(3, prompt=["a red circle", "a blue ellipse", ""], scene=m, seed=5, top_k=8)
    out = model.edit(original, edited, seed=5, top_k=8)
    assert out.prompts == original.prompts
    assert torch.equal(out.ids, model.sample(3, prompt=original.prompts, scene=edited, seed=5, top_k=8).ids)
    assert not torch.equal(out.ids, original.ids)
    assert torch.equal(model.edit(original, m, seed=5, top_k=8).ids, original.ids)   # unchanged map: same image
    assert model.edit("a red circle", edited).prompts == ["a red circle"]


@pytest.mark.parametrize("scene, message", [
    (torch.full((16, 16), 7), r"class id\(s\) \[7\] that the scene tokenizer does not know \(its classes: 0..4\)"),
    (torch.tensor([-1, 9, 2, 5] * 64).view(16, 16), r"class id\(s\) \[-1, 5, 9\]"),
    (torch.zeros(8, 8, dtype=torch.long), "8x8: the scene tokenizer reads 16x16"),
    (torch.zeros(16, 16), "integer class ids"),
    (torch.zeros(3, 16, 16, dtype=torch.long), "3 scene maps for 2 samples"),
    (torch.zeros(1, 2, 16, 16, dtype=torch.long), r"\[H, W\] or n maps"),
])
def test_bad_scene_maps(model, scene, message):
    with pytest.raises(ValueError, match=message):
        model.sample(2, prompt="a red circle", scene=scene)


def test_gradients_and_frozen_tokenizers():
    m = _mas(text_dropout=0.5, dropout=0.1).train()
    m.training_step(_batch(), 0).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    for t in m.tokenizers:
        assert not t.training and all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert {k.split(".")[0] for k in m.state_dict()} == {
        "text_emb", "text_pos_emb", "scene_emb", "scene_row_emb", "scene_col_emb", "image_emb", "image_row_emb",
        "image_col_emb", "transformer", "to_logits"}


def test_config_and_tokenizer_errors():
    tok, st = _tokenizers()
    with pytest.raises(ValueError, match="scene_loss_weight|loss weights"):
        MakeAScene(MakeASceneConfig(**{**SMALL, "scene_loss_weight": -1.0}), tok, st)
    with pytest.raises(ValueError, match="heads"):
        MakeAScene(MakeASceneConfig(**{**SMALL, "dim": 30}), tok, st)
    with pytest.raises(ValueError, match="scene tokenizer"):
        MakeAScene(MakeASceneConfig(**SMALL), tok, tok)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_run_trains_and_samples_with_a_scene_map(tmp_path, capsys):
    from PIL import Image
    tok_dir, scene_dir, out = tmp_path / "vqgan", tmp_path / "scene", tmp_path / "mas"
    for system, cfg, folder in (("vqgan", TOK, tok_dir), ("scene", SCENE, scene_dir)):
        sets = [f"model.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in cfg.items()] + ["data.hflip=false"]
        Trainer(build_run_config(system, None, None, sets, data="shapes", steps=2, batch_size=4), folder,
                progress=False).fit()
    assert train_main(["make_a_scene", "--stage", "generator", "--tokenizer", str(tok_dir), str(scene_dir),
                       "--out", str(out), "--steps", "3", "--batch-size", "4", "--no-progress", "--device", "cpu",
                       *sum([["--set", f"model.{k}={v}"] for k, v in SMALL.items()], [])]) == 0
    m = models.load("make_a_scene", out)
    assert isinstance(m, MakeAScene) and len(m.tokenizers) == 2
    s = m.sample(2, prompt="a red circle", scene=_map(), seed=0, cfg=2.0)
    assert s.ids.shape == (2, 4, 4) and s.images.shape == (2, 3, 16, 16) and s.prompts == ["a red circle"] * 2
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(_map().numpy().astype(np.uint8), mode="L").save(good)
    Image.fromarray(np.full((16, 16), 6, dtype=np.uint8), mode="L").save(bad)
    assert sample_main(["make_a_scene", "--ckpt", str(out), "--prompt", "a red circle", "--scene", str(good),
                        "--n", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert sample_main(["make_a_scene", "--ckpt", str(out), "--prompt", "a red circle", "--scene", str(bad),
                        "--n", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "class id(s) [6]" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:VQGANConfig", "ignore:SceneConfig")
def test_presets_shapes():
    cls, presets, tokenizer_system = generator_system("make_a_scene")
    assert cls is MakeAScene and tokenizer_system == "vqgan" and set(presets) == {"tiny", "base"}
    tiny = PRESETS["make_a_scene"]["tiny"]
    assert tiny.data.name == "shapes" and not tiny.data.hflip
    m = MakeAScene(tiny.model, vqgan.Model(vqgan.PRESETS["tiny"].model),
                   scene_module.Model(scene_module.PRESETS["tiny"].model))
    assert [s.shape for s in m.segments] == [(8, 8), (8, 8)] and [s.size for s in m.segments] == [256, 128]
    with torch.device("meta"):   # about 4B parameters (the paper) over 128 text + 16x16 scene + 16x16 image tokens
        m = MakeAScene(PRESETS["make_a_scene"]["base"].model, vqgan.Model(vqgan.PRESETS["base"].model),
                       scene_module.Model(scene_module.PRESETS["base"].model))
        assert m.seq_len == 128 + 256 + 256
        assert 3.5e9 < sum(p.numel() for p in m.parameters()) < 4.5e9
