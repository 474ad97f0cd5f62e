"""The contract every tokenizer in models.SYSTEMS keeps (models/tokenizer.py), checked on each
system's tiny preset with a few real items of the preset's own data set."""

import dataclasses

import pytest
import torch

import models
from models.data import build_dataset, collate

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=models.SYSTEMS)
def tiny(request):
    """(system name, model in train mode, a batch of 2 of the preset's data) with a fixed seed."""
    name = request.param
    preset = models.system(name).PRESETS["tiny"]
    torch.manual_seed(0)
    model = models.system(name).Model(preset.model)
    data = build_dataset(dataclasses.replace(preset.data, num_images=8), preset.model.resolution, "train")
    batch = collate([data[i] for i in range(2)])
    return name, model.train(), batch


def _generator_params(model):
    disc = {id(p) for p in model.discriminator_parameters()}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in disc]


def test_every_system_has_tiny_and_base_presets():
    for name in models.SYSTEMS:
        mod = models.system(name)
        assert {"tiny", "base"} <= set(mod.PRESETS), name
        for preset in mod.PRESETS.values():
            assert isinstance(preset, models.Preset)
            assert isinstance(preset.model, mod.Model.config_cls)


def test_training_step_losses_finite_and_gradients_reach_every_generator_parameter(tiny):
    name, model, batch = tiny
    model.zero_grad(set_to_none=True)
    out = model(batch, step=0)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), name
    x = model.inputs(batch)
    assert out.recon.shape == x.shape
    assert all(torch.isfinite(v).all() for v in out.logs.values()), out.logs
    out.loss.backward()
    params = _generator_params(model)
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{name}: no gradient reached {missing}"
    bad = [n for n, p in params if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"
    zero = [n for n, p in params if not p.grad.any()]
    assert len(zero) <= len(params) // 10, f"{name}: all-zero gradients in {zero}"


def test_indices_match_codebook_sizes(tiny):
    name, model, batch = tiny
    out = model(batch, step=0)
    sizes = model.codebook_sizes()
    assert set(out.indices) == set(sizes), name
    for level, ids in out.indices.items():
        assert ids.dtype == torch.int64 and ids.shape[0] == batch["image"].shape[0], (name, level, ids.shape)
        assert ids.numel() > 0 and int(ids.min()) >= 0 and int(ids.max()) < sizes[level], (name, level)


def test_encode_decode_round_trip(tiny):
    name, model, batch = tiny
    model.eval()
    try:
        x = model.inputs(batch)
        with torch.no_grad():
            ids = model.encode(x)
            for t in ids if isinstance(ids, (tuple, list)) else (ids,):
                assert t.shape[0] == x.shape[0], name
            y = model.decode(ids)
            assert y.shape == x.shape and torch.isfinite(y).all(), name
            torch.testing.assert_close(model.reconstruct(x), y)
            rgb = model.to_rgb(y)
            assert rgb.shape == (x.shape[0], 3, *x.shape[2:]) and rgb.min() >= -1 and rgb.max() <= 1
    finally:
        model.train()


def test_eval_forward_is_deterministic(tiny):
    name, model, batch = tiny
    model.eval()
    try:
        x = model.inputs(batch)
        with torch.no_grad():
            a, b = model.reconstruct(x), model.reconstruct(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        model.train()


@pytest.mark.parametrize("name", models.SYSTEMS)
def test_resolution_the_model_cannot_take_is_a_clear_error(name):
    cfg = models.system(name).PRESETS["tiny"].model
    with pytest.raises(ValueError, match="resolution"):
        models.system(name).Model(dataclasses.replace(cfg, resolution=cfg.resolution + 1))


def test_state_dict_round_trip_gives_the_same_model(tiny):
    name, model, batch = tiny
    torch.manual_seed(1)
    other = type(model)(model.cfg).eval()
    other.load_state_dict(model.state_dict())
    model.eval()
    try:
        x = model.inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(other.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
    finally:
        model.train()


BAD_FIELDS = (("beta", -0.5), ("decay", 1.0), ("codebook_size", 0), ("n_embed", 0), ("vocab_size", 0),
              ("embed_dim", 0), ("ch", 0), ("ch_mult", ()), ("in_channels", 0), ("depth", 0))


@pytest.mark.parametrize("name", models.SYSTEMS)
def test_out_of_range_fields_are_errors_naming_the_field(name):
    """Every common field a system's config has is range-checked at construction, the error naming it."""
    cfg = models.system(name).PRESETS["tiny"].model
    fields = {f.name for f in dataclasses.fields(cfg)}
    checked = [(key, value) for key, value in BAD_FIELDS if key in fields]
    assert checked, f"{name}: none of the common fields"
    for key, value in checked:
        with pytest.raises(ValueError, match=key), torch.device("meta"):
            models.system(name).Model(dataclasses.replace(cfg, **{key: value}))
