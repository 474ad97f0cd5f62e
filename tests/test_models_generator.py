"""The generator stage shared by every generator: models.sampling, models.transformer's cache and
masks, the trainer's --stage generator, models.load / models.sample and their errors (with a toy
generator, tests/toy_generator.py, over a tiny vqvae tokenizer trained for two steps)."""

import json
import math

import pytest
import torch

import models
from models import generator as gen_registry
from models.checkpoint import read_weights, latest_checkpoint
from models.sample import main as sample_main
from models.sampling import (KVCache, SamplingConfig, block_causal_mask, check_labels, confidence_remask,
                             drop_labels, filter_logits, guidance_scale, guide, mask_ratio, sample_logits)
from models.train import Trainer, build_run_config, main as train_main
from models.transformer import Transformer

torch.set_num_threads(1)


# ---------------------------------------------------------------- sampling

def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    # sorted: 0.5, 0.3, 0.15, 0.05; cumulative before each: 0, 0.5, 0.8, 0.95
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_sampling_follows_the_filtered_distribution_and_the_seed():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).expand(20000, 4)
    draw = sample_logits(logits, torch.Generator().manual_seed(0), temperature=0.5, top_k=3)
    freq = torch.bincount(draw, minlength=4).float() / draw.numel()
    want = filter_logits(logits[:1] / 0.5, top_k=3).softmax(-1)[0]
    assert (freq - want).abs().max() < 0.015 and freq[2] == 0
    again = sample_logits(logits, torch.Generator().manual_seed(0), temperature=0.5, top_k=3)
    other = sample_logits(logits, torch.Generator().manual_seed(1), temperature=0.5, top_k=3)
    assert torch.equal(draw, again) and not torch.equal(draw, other)
    assert torch.equal(sample_logits(logits[:3], None, temperature=0), torch.tensor([3, 3, 3]))


def test_guidance_weights_and_schedules():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(guide(cond, uncond, 0.0), uncond) and torch.equal(guide(cond, uncond, 1.0), cond)
    assert torch.allclose(guide(cond, uncond, 3.0), torch.tensor([3.0, 7.0]))
    assert guidance_scale(4.0, "constant", 0.3) == 4.0
    assert guidance_scale(4.0, "linear", 0.0) == 1.0 and guidance_scale(4.0, "linear", 1.0) == 4.0
    assert guidance_scale(0.0, "constant", 0.7) == 0.0


def test_label_dropout_and_label_checks():
    labels = torch.tensor([0, 1, -1, 2] * 500)
    dropped = drop_labels(labels, 3, 0.25, torch.Generator().manual_seed(0))
    assert (dropped[labels == -1] == 3).all()
    known = labels >= 0
    share = (dropped[known] == 3).float().mean().item()
    assert 0.2 < share < 0.3 and ((dropped[known] == labels[known]) | (dropped[known] == 3)).all()
    assert torch.equal(drop_labels(labels, 3, 0.0), torch.where(labels < 0, 3, labels))
    assert check_labels(None, 5, 3, "cpu").tolist() == [0, 1, 2, 0, 1]
    assert check_labels(2, 3, 3, "cpu").tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="class id 3 out of range"):
        check_labels([0, 3], 2, 3, "cpu")
    with pytest.raises(ValueError, match="class id -1 out of range"):
        check_labels(-1, 2, 3, "cpu")
    with pytest.raises(ValueError, match="unconditional"):
        check_labels(1, 2, 0, "cpu")
    with pytest.raises(ValueError, match="2 class labels for 3 samples"):
        check_labels([0, 1], 3, 3, "cpu")


@pytest.mark.parametrize("bad, match", [(dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
                                        (dict(top_k=-1), "top_k"), (dict(temperature=-0.1), "temperature"),
                                        (dict(cfg_schedule="cosine"), "cfg_schedule"), (dict(steps=0), "steps"),
                                        (dict(mask_schedule="square"), "mask_schedule"),
                                        (dict(cfg=float("nan")), "cfg")])
def test_bad_sampling_requests(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**bad).check()


def test_mask_schedules():
    for name in ("cosine", "arccos", "linear"):
        r = mask_ratio(name, torch.linspace(0, 1, 11))
        assert r[0] == 1 and abs(r[-1]) < 1e-12 and (r[1:] <= r[:-1]).all()
    assert abs(mask_ratio("cosine", 0.5) - math.cos(math.pi / 4)) < 1e-12
    assert abs(mask_ratio("arccos", 0.5) - math.acos(0.5) / (math.pi / 2)) < 1e-12


def test_confidence_remask_never_remasks_known_tokens():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        unknown = torch.rand(4, 16, generator=g) < 0.6
        unknown[:, 0] = True
        logp = -torch.rand(4, 16, generator=g) * 5
        n_mask = torch.randint(0, 16, (4,), generator=g)
        mask = confidence_remask(logp, unknown, n_mask, 2.0, g)
        assert not (mask & ~unknown).any()
        assert torch.equal(mask.sum(-1), torch.minimum(n_mask, unknown.sum(-1) - 1))
    # without noise the least confident are re-masked
    unknown = torch.ones(1, 4, dtype=torch.bool)
    mask = confidence_remask(torch.tensor([[-0.1, -3.0, -0.5, -2.0]]), unknown, torch.tensor([2]), 0.0, None)
    assert mask.tolist() == [[False, True, False, True]]


# ---------------------------------------------------------------- transformer masks and cache

def test_causal_transformer_logits_ignore_later_tokens_and_the_cache_matches():
    torch.manual_seed(0)
    net = Transformer(16, 2, 4).eval()
    x = torch.randn(2, 10, 16)
    full = net(x, causal=True)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 16)
    changed = net(y, causal=True)
    assert torch.allclose(full[:, :6], changed[:, :6], atol=1e-6) and not torch.allclose(full[:, 6:], changed[:, 6:])
    cache = net.new_cache()
    steps = [net(x[:, :3], causal=True, cache=cache)] + [net(x[:, t:t + 1], causal=True, cache=cache)
                                                          for t in range(3, 10)]
    assert cache.length == 10
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_block_causal_mask_by_scale():
    m = block_causal_mask([1, 2, 3], "cpu")
    assert m.shape == (6, 6)
    assert m[0].tolist() == [True, False, False, False, False, False]
    assert m[1].tolist() == m[2].tolist() == [True, True, True, False, False, False]
    assert m[5].all()
    torch.manual_seed(0)
    net = Transformer(8, 1, 2).eval()
    x = torch.randn(1, 6, 8)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 3, 8)
    assert torch.allclose(net(x, mask=m)[:, :3], net(y, mask=m)[:, :3], atol=1e-6)
    assert not torch.allclose(net(x, mask=m)[:, 3:], net(y, mask=m)[:, 3:])


def test_kv_cache_select_and_reset():
    cache = KVCache(1)
    k = torch.arange(6.0).view(3, 1, 2, 1)
    cache.update(0, k, k)
    cache.select(torch.tensor([2, 0]))
    assert torch.equal(cache.keys[0][:, 0, :, 0], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    cache.reset()
    assert cache.length == 0


# ---------------------------------------------------------------- trainer, loading, sampling CLI

@pytest.fixture(scope="module")
def toy(monkeypatch_module):
    monkeypatch_module.setitem(gen_registry.GENERATORS, "toy", ("toy_generator", "vqvae"))
    return "toy"


@pytest.fixture(scope="module")
def generator_run(toy, tokenizer_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    assert train_main([toy, "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out", str(out),
                       "--steps", "3", "--no-progress", "--device", "cpu"]) == 0
    return out


def test_generator_run_trains_evaluates_and_holds_only_the_generator(generator_run, tokenizer_run):
    cfg = models.checkpoint.read_run_config(generator_run)
    assert cfg["stage"] == "generator" and cfg["tokenizer"] == str(tokenizer_run.resolve())
    weights = read_weights(latest_checkpoint(generator_run))
    assert list(weights) == ["table.weight"]
    result = json.loads((generator_run / "eval.json").read_text())
    assert result["step"] == 3 and math.isfinite(result["nll"]) and "judge_accuracy" not in result
    assert (generator_run / "samples.png").is_file()
    logs = [json.loads(line) for line in (generator_run / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and "nll" in r for r in logs)


def test_load_gives_the_generator_with_its_tokenizer(generator_run, toy):
    g = models.load(toy, str(generator_run))
    assert not g.training and not g.tokenizer.training
    assert not any(p.requires_grad for p in g.tokenizer.parameters())
    assert all(not k.startswith("tokenizer") for k in g.state_dict())
    out = g.sample(6, [1, 2, 3, 4, 5, 6], seed=3, temperature=0.7, top_k=5)
    assert out.images.shape == (6, 3, 16, 16) and out.ids.shape == (6, 4, 4)
    assert out.ids.min() >= 0 and out.ids.max() < 16
    again = g.sample(6, [1, 2, 3, 4, 5, 6], seed=3, temperature=0.7, top_k=5)
    assert torch.equal(out.ids, again.ids) and torch.equal(out.images, again.images)
    # guidance at scale 0 is the unconditional model (the null class), with the same draws
    null = g.generate(6, torch.full((6,), 10), SamplingConfig(), torch.Generator().manual_seed(3))
    assert torch.equal(g.sample(6, [1, 2, 3, 4, 5, 6], seed=3, cfg=0.0).ids, null)


@pytest.mark.parametrize("kwargs, match", [(dict(labels=[10]), "class id 10 out of range"),
                                           (dict(top_p=0.0), "top_p"), (dict(steps=4), "steps"),
                                           (dict(labels=[-2]), "out of range")])
def test_bad_sample_requests(generator_run, toy, kwargs, match):
    g = models.load(toy, str(generator_run))
    with pytest.raises(ValueError, match=match):
        g.sample(2, **kwargs)


def test_sample_cli(generator_run, toy, tmp_path, capsys):
    png, ids = tmp_path / "grid.png", tmp_path / "ids.pt"
    assert sample_main([toy, "--ckpt", str(generator_run), "--n", "5", "--class", "7", "--top-p", "0.9",
                        "--seed", "1", "--ids", str(ids), "--out", str(png)]) == 0
    assert png.is_file() and "5 samples of classes [7]" in capsys.readouterr().out
    saved = torch.load(ids)
    assert saved["ids"].shape == (5, 4, 4) and saved["labels"].tolist() == [7] * 5
    assert sample_main([toy, "--ckpt", str(generator_run), "--class", "12", "--out", str(png)]) == 2
    assert "class id 12 out of range" in capsys.readouterr().err
    assert sample_main([toy, "--ckpt", str(generator_run), "--top-p", "1.5", "--out", str(png)]) == 2
    assert "top_p" in capsys.readouterr().err


def test_checkpoints_of_another_system_are_refused(generator_run, tokenizer_run, toy, tmp_path, capsys):
    png = str(tmp_path / "g.png")
    assert sample_main(["vqgan", "--ckpt", str(generator_run), "--out", png]) == 2
    assert "holds a run of system 'toy', not 'vqgan'" in capsys.readouterr().err
    assert sample_main(["vqvae", "--ckpt", str(tokenizer_run), "--out", png]) == 2
    assert "tokenizer run" in capsys.readouterr().err
    # a generator on a tokenizer of another system
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(gen_registry.GENERATORS, "toy_on_vqgan", ("toy_generator", "vqgan"))
        assert train_main(["toy_on_vqgan", "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out",
                           str(tmp_path / "m"), "--steps", "1", "--no-progress"]) == 2
    assert "needs a tokenizer run of system 'vqgan'" in capsys.readouterr().err
    assert train_main([toy, "--stage", "generator", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "needs --tokenizer" in capsys.readouterr().err


def test_class_count_must_match_the_data(toy, tokenizer_run, tmp_path, capsys):
    assert train_main([toy, "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "c"),
                       "--set", "model.num_classes=4", "--no-progress"]) == 2
    assert "model.num_classes is 4 but data set 'digits' has 10 classes" in capsys.readouterr().err


def test_half_resolution_is_a_tokenizer_option(toy, tokenizer_run, tmp_path, capsys):
    assert train_main([toy, "--stage", "generator", "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "h"),
                       "--set", "data.half_resolution=0.5", "--no-progress"]) == 2
    assert "data.half_resolution downsamples a tokenizer's training images, not a generator's" in capsys.readouterr().err


def test_generator_resume_continues_bit_exactly(toy, tokenizer_run, tmp_path):
    args = [toy, "--stage", "generator", "--tokenizer", str(tokenizer_run), "--steps", "4", "--no-progress",
            "--set", "train.log_every=1"]
    assert train_main(args + ["--out", str(tmp_path / "a")]) == 0
    run = build_run_config(toy, None, None, ["train.log_every=1"], stage="generator", tokenizer=str(tokenizer_run),
                           steps=4)
    Trainer(run, tmp_path / "b", progress=False).fit(until=2)
    assert train_main([toy, "--stage", "generator", "--resume", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    a = read_weights(latest_checkpoint(tmp_path / "a"))
    b = read_weights(latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gumbel_noise_is_finite_and_standard():
    from models.sampling import gumbel_noise
    g = gumbel_noise((200000,), torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - math.pi ** 2 / 6) < 0.03


def test_eval_cli_on_a_generator_run(generator_run, toy, capsys):
    from models.eval import main as eval_main
    assert eval_main([toy, "--ckpt", str(generator_run), "--judge-per-class", "0", "--max-images", "20"]) == 0
    out = capsys.readouterr().out
    assert "cross-entropy" in out and "held-out images  20" in out
    assert json.loads((generator_run / "eval.json").read_text())["images"] == 20
    elsewhere = generator_run / "eval-other.json"
    assert eval_main([toy, "--ckpt", str(generator_run), "--judge-per-class", "0", "--max-images", "10",
                      "--json", str(elsewhere)]) == 0
    assert json.loads(elsewhere.read_text())["images"] == 10
    assert json.loads((generator_run / "eval.json").read_text())["images"] == 20


def test_digits_judge_accuracy_and_classifier_fid(tmp_path):
    from models.eval import _judge_sets, digits_judge, frechet_distance
    judge, accuracy = digits_judge(32, cache_dir=str(tmp_path))
    assert accuracy >= 0.95
    again, same = digits_judge(32, cache_dir=str(tmp_path))  # from the cache
    assert same == accuracy and len(list(tmp_path.iterdir())) == 1
    train, holdout = _judge_sets(32)
    with torch.no_grad():
        real = judge.embed(holdout["image"])
        other = judge.embed(train["image"][:400])
        noise = judge.embed(torch.rand(400, 3, 32, 32) * 2 - 1)
        one_class = judge.embed(train["image"][train["label"] == 3])
    near, far, collapsed = frechet_distance(other, real), frechet_distance(noise, real), frechet_distance(one_class, real)
    assert near < 0.2 * far and near < 0.5 * collapsed
