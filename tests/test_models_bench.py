"""models/bench.py: each baseline-swapped model is our model (same eval-mode loss and codes, same
first-step loss), the swap leaves none of our kernels, a wrong baseline is caught, the quantizer clock
times the quantizer and nothing else, and the CLI rewrites only its section of RESULTS.md."""

import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vector_quantize_pytorch as vqp
import vqkernels
from vqkernels.bench import plain
from vqkernels.nn import GumbelQuantize, VectorQuantize

from models import bench
from models.config import TrainConfig
from models.dvae import DVAE, DVAEConfig
from models.hqvae import HQVAEConfig
from models.rqvae import RQVAE, RQVAEConfig
from models.tokenizer import StepOutput, Tokenizer
from models.var_vqvae import VarVQVAE, VarVQVAEConfig
from models.vqvae import VQVAE, VQVAEConfig

torch.set_num_threads(1)
TRAIN = TrainConfig(lr=1e-3, grad_clip=1.0)


def batch(resolution=16, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1,
            "label": torch.full((n,), -1), "caption": [""] * n}


class ToyGumbel(Tokenizer):
    """A conv, taming's GumbelQuantize (this module's name, swapped by the bench), a conv;
    ``also_vq``: the features also go through vqkernels.vq_quantize, which has no baseline."""

    def __init__(self, also_vq=False):
        super().__init__(None)
        self.enc = nn.Conv2d(3, 8, 4, stride=4)
        self.quantize = GumbelQuantize(8, 8, n_embed=32, kl_weight=1e-2)
        self.dec = nn.ConvTranspose2d(8, 3, 4, stride=4)
        self.also_vq = also_vq

    def training_step(self, batch, step):
        x = batch["image"]
        h = self.enc(x)
        z_q, diff, (_, _, ids) = self.quantize(h)
        if self.also_vq:
            rows = h.permute(0, 2, 3, 1).reshape(-1, 8)
            diff = diff + vqkernels.vq_quantize(rows, self.quantize.embed.weight)[2]
        recon = self.dec(z_q)
        return StepOutput(loss=F.mse_loss(recon, x) + diff, recon=recon, indices={"codes": ids})


class ToyFrozen(Tokenizer):
    """A conv, VectorQuantize on a frozen word table (LQAE's and SPAE's layer: the table is not in the
    state_dict), a conv."""

    def __init__(self, cosine):
        super().__init__(None)
        table = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
        self.enc = nn.Conv2d(3, 8, 4, stride=4)
        self.quantize = VectorQuantize(8, 50, frozen_codebook=table, use_cosine_sim=cosine, rotation_trick=False,
                                       accept_image_fmap=True)
        self.dec = nn.ConvTranspose2d(8, 3, 4, stride=4)

    def training_step(self, batch, step):
        x = batch["image"]
        z_q, ids, loss = self.quantize(self.enc(x))
        recon = self.dec(z_q)
        return StepOutput(loss=F.mse_loss(recon, x) + loss, recon=recon, indices={"codes": ids})


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cosine"])
def test_frozen_table_baseline_is_our_model(cosine):
    result, sides = bench.first_step(lambda: ToyFrozen(cosine), batch(), TRAIN, step=5, namespaces=_namespaces())
    assert sides is not None, result.note
    assert result.eval_difference <= 1e-5 and result.agreement == 1.0 and result.train_difference <= 1e-5
    assert isinstance(sides[1].model.quantize, vqp.VectorQuantize) and sides[1].model.quantize.freeze_codebook


def _namespaces():
    return bench.model_namespaces() + [sys.modules[__name__]]


CASES = {
    "VectorQuantize": (lambda: VQVAE(VQVAEConfig(resolution=16, hidden=16, res_channels=8, num_res_blocks=1,
                                                 embed_dim=4, codebook_size=64, ema=True)), vqp.VectorQuantize),
    "VectorQuantizer": (lambda: VQVAE(VQVAEConfig(resolution=16, hidden=16, res_channels=8, num_res_blocks=1,
                                                  embed_dim=4, codebook_size=64)), plain.PlainVectorQuantizer),
    "ResidualVQ": (lambda: RQVAE(RQVAEConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), z_channels=8, embed_dim=8,
                                             codebook_size=64, depth=2, threshold_ema_dead_code=0.0)),
                   vqp.ResidualVQ),
    "gumbel_quantize": (lambda: DVAE(DVAEConfig(resolution=16, group_count=2, n_hid=16, n_blk_per_group=1, n_init=8,
                                                vocab_size=64)), None),
    "MultiScaleVQ": (lambda: VarVQVAE(VarVQVAEConfig(resolution=16, vocab_size=64, z_channels=8, ch=16,
                                                     ch_mult=(1, 2, 2), v_patch_nums=(1, 2, 4))),
                     plain.PlainMultiScaleVQ),
    "GumbelQuantize": (ToyGumbel, plain.PlainGumbelQuantize),
}


def test_every_kind_has_a_case():
    assert sorted(CASES) == sorted(k.name for k in bench.KINDS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_baseline_is_our_model(kind):
    factory, baseline_cls = CASES[kind]
    result, sides = bench.first_step(factory, batch(), TRAIN, step=5, namespaces=_namespaces())
    assert sides is not None, result.note
    assert result.quantizers.split(" x")[0] == kind and result.note == ""
    assert result.eval_difference <= 1e-5 and result.agreement == 1.0
    assert result.train_difference <= 1e-5  # the first training step's losses
    classes = {type(m) for m in sides[1].model.modules()}
    if baseline_cls is not None:
        assert any(issubclass(c, baseline_cls) for c in classes)
    assert not any(c.__module__.startswith("vqkernels") and c.__name__ == kind for c in classes)
    recorders = []
    for side in sides:  # our model runs our kernels, the swapped one none of them
        with bench._OpRecorder() as rec:
            bench.eval_forward(side, batch(), 5, 0)
        recorders.append(rec.ops)
    assert recorders[0] and not recorders[1]
    ours_object = next(k.ours for k in bench.KINDS if k.name == kind)
    assert all(getattr(ns, kind) is ours_object for ns in _namespaces() if hasattr(ns, kind))  # names restored


def test_restarts_between_depths_are_reported():
    """vector-quantize-pytorch's shared-codebook ResidualVQ restarts dead codes after each depth: the
    same model (eval mode), a different first training step, said in the note."""
    def factory():
        return RQVAE(RQVAEConfig(resolution=16, ch=16, ch_mult=(1, 2, 2), z_channels=8, embed_dim=8,
                                 codebook_size=64, depth=3, threshold_ema_dead_code=1.0))
    result, sides = bench.first_step(factory, batch(), TRAIN, step=5, namespaces=_namespaces())
    assert sides is not None and result.eval_difference <= 1e-5
    assert result.train_difference > bench.LOSS_TOLERANCE and "codebook updates" in result.note


def test_kernels_left_in_the_baseline_are_caught():
    result, sides = bench.first_step(lambda: ToyGumbel(also_vq=True), batch(), TRAIN, step=0,
                                     namespaces=_namespaces())
    assert sides is None and result.note == ("no baseline: the swapped model still calls "
                                           "vq_quantize, vq_quantize_backward")


class WrongGumbel(plain.PlainGumbelQuantize):
    def forward(self, z, temp=None, return_logits=False):
        z_q, diff, ind = super().forward(z, temp, return_logits)
        return 1.5 * z_q, diff, ind


def test_a_different_baseline_is_not_timed():
    kind = bench.Kind(GumbelQuantize, lambda: WrongGumbel, "wrong")
    result, sides = bench.first_step(ToyGumbel, batch(), TRAIN, step=0, kinds=[kind], namespaces=_namespaces())
    assert sides is None and result.note.startswith("not the same model")


class Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


def test_clock_times_the_quantizer_and_nothing_else():
    clock = bench.QuantizerClock()
    quantize = clock.wrap("slow", lambda h: (Sleep.apply(h, 0.02, 0.03), h.detach().argmax(1)))
    x = torch.randn(4, 8, requires_grad=True)
    h = Sleep.apply(nn.Linear(8, 8)(x), 0.0, 0.2)     # an encoder with a slow backward
    z, _ = quantize(h)
    loss = Sleep.apply(nn.Linear(8, 8)(z), 0.2, 0.2).sum()  # a decoder, slow both ways
    loss.backward()
    assert clock.calls == {"slow": 1}
    assert 0.02 <= clock.forward_s < 0.2
    assert 0.05 <= clock.seconds() < 0.2


def test_size_fields_and_plan():
    assert bench.size_fields(VQVAEConfig()) == ["codebook_size"]
    assert bench.size_fields(HQVAEConfig()) == ["codebook_size_top", "codebook_size_bottom"]
    assert bench.size_fields(DVAEConfig()) == ["vocab_size"]
    planned = bench.plan(["vqvae", "lqae"], [1024, 16384])
    assert [(e.name, k) for e, k in planned] == [("vqvae", 1024), ("vqvae", 16384), ("lqae", None)]


def test_cli_rewrites_only_its_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "preset_batch", lambda data, resolution, n: batch(resolution, 2))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n<!-- zoo:start -->\nzoo table\n<!-- zoo:end -->\n\n"
                       f"{bench.START}\nold numbers\n{bench.END}\n\ntrailer\n")
    assert bench.main(["--quick", "--repeats", "1", "--systems", "vqvae", "--sizes", "32,64", "--threads", "1",
                       "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Results\n\n<!-- zoo:start -->\nzoo table\n<!-- zoo:end -->\n\n" + bench.START)
    assert text.endswith(bench.END + "\n\ntrailer\n") and "old numbers" not in text
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and rows[0].startswith("| `vqvae` | VectorQuantize")  # --quick: the first size only
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[2] == "32" and float(cells[3]) > 0 and float(cells[5]) > 0 and cells[6].endswith("x")
    ours, theirs = (float(s.rstrip("%")) for s in cells[7].split(" / "))
    assert 0 < ours < 100 and 0 < theirs < 100
    assert "CPU kernels ISA" in text and bench.START in capsys.readouterr().out
    results.unlink()  # a missing file is created; --cpu-time says so
    assert bench.main(["--quick", "--repeats", "1", "--systems", "vqvae", "--sizes", "32", "--threads", "1",
                       "--cpu-time", "--results", str(results)]) == 0
    text = results.read_text()
    assert bench.START in text and bench.END in text and "process CPU time" in text


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--systems", "vae"], ["--sizes", "0"], ["--sizes", "a,b"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
