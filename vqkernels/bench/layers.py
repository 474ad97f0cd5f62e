"""The layer suite: one training step (forward, backward, codebook update) of each vqkernels.nn
quantizer layer against vector-quantize-pytorch's layer of the same configuration, started from the
same state on the same input, in one process. Part of ``python -m vqkernels.bench``; on its own:

    python -m vqkernels.bench.layers [--quick] [--device cuda] [--repeats 20] [--budget 2]
    python -m vqkernels.bench.layers --sweep [--quick]    # the token sweep instead of the layer table

Each case has its tokens per sample (``seq``) and the batch of the layer table (``batch``; quick
runs use a quarter of it, at least 1). The token sweep (:func:`run_sweep`) times every case at
SWEEP_TOKENS tokens a step (batch = tokens // seq; quick: the first size only), ours against
theirs and against the layer's shell (:class:`Shell`: the step with its quantizer taken out), time only.

Timing: :func:`vqkernels.bench.harness.time_calls`; memory: peak RSS growth of one step on the CPU,
the CUDA allocator's peak growth on a GPU.
"""

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..nn import (FSP, FSQ, LFQ, BinaryMapper, EvoLFQ, HierarchicalVQ, LatentQuantize, ResidualFSQ, ResidualLFQ,
                  ResidualSimVQ, ResidualVQ, SimVQ, VectorQuantize)
from . import report
from .harness import THREADS, log, peak_mib, require, time_calls

LFQ_MEMORY_LIMIT = 6 << 30  # bytes: vector-quantize-pytorch's LFQ is not run when it would need more
SWEEP_TOKENS = (1024, 16 * 1024)  # tokens a step in the token sweep (quick: the first only)
SWEEP_TARGET = 5.0  # speedup over vector-quantize-pytorch the sweep checks at every size (issue 15)


@dataclass(frozen=True)
class Case:
    name: str
    detail: str
    make: Callable  # (batch, seq) -> (ours module, theirs module or None, input tensor[, forward keywords])
    seq: int  # tokens per sample (channel-first inputs: positions per sample)
    batch: int  # samples a step in the layer table (quick: a quarter, at least 1)
    target: float = 0.0  # speedup needed (0: none)
    channel_first: bool = False  # inputs [b, dim, ...]
    draws: Callable = None  # (tokens) -> None: the random numbers the layer draws a step (theirs' stream, which
    # ours reproduces), drawn by the shell too
    out_features: int = 0  # the width of the layer's output where it is not the input's (0: the input's)

    def batch_for(self, quick):
        return max(1, self.batch // 4) if quick else self.batch

    def build(self, batch, seq=None):
        """(ours, theirs or None, input, forward keywords) at ``batch`` samples of ``seq`` tokens (default: the
        case's)."""
        ours, theirs, x, *forward = self.make(batch, seq or self.seq)
        return ours, theirs, x, (forward[0] if forward else {})


def _tokens(b, n, d, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def _pair(ours_cls, theirs_name, **kw):
    vqp = require("vector_quantize_pytorch")
    theirs = getattr(vqp, theirs_name)(**kw)
    ours = ours_cls(**kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _vq(batch, seq):
    ours, theirs = _pair(VectorQuantize, "VectorQuantize", dim=64, codebook_size=1024, decay=0.99,
                         commitment_weight=0.25)
    return ours, theirs, _tokens(batch, seq, 64)


def _rvq(shared):
    def make(batch, seq):
        ours, theirs = _pair(ResidualVQ, "ResidualVQ", dim=128, num_quantizers=8, codebook_size=1024,
                             shared_codebook=shared, decay=0.99, commitment_weight=0.25)
        return ours, theirs, _tokens(batch, seq, 128)
    return make


def _fsq(batch, seq):
    ours, theirs = _pair(FSQ, "FSQ", levels=[8, 8, 8, 5, 5, 5])
    return ours, theirs, _tokens(batch, seq, 6)


def _lfq(bits):
    def make(batch, seq):
        n = batch * seq
        kw = dict(dim=bits, codebook_size=2 ** bits, entropy_loss_weight=0.1, diversity_gamma=1.0)
        if n * 2 ** bits * 4 * 6 > LFQ_MEMORY_LIMIT:
            ours, theirs = LFQ(**kw), None
        else:
            ours, theirs = _pair(LFQ, "LFQ", **kw)
        return ours, theirs, _tokens(batch, seq, bits)
    return make


def _residual_fsq(batch, seq):
    ours, theirs = _pair(ResidualFSQ, "ResidualFSQ", levels=[8, 5, 5, 5], num_quantizers=4, dim=64)
    return ours, theirs, _tokens(batch, seq, 64)


def _residual_lfq(batch, seq):
    ours, theirs = _pair(ResidualLFQ, "ResidualLFQ", dim=64, num_quantizers=4, codebook_size=2 ** 10)
    return ours, theirs, _tokens(batch, seq, 64)


def _sim_vq(residual):
    def make(batch, seq):
        kw = dict(dim=64, codebook_size=1024)
        ours, theirs = (_pair(ResidualSimVQ, "ResidualSimVQ", num_quantizers=4, **kw) if residual
                        else _pair(SimVQ, "SimVQ", **kw))
        return ours, theirs, _tokens(batch, seq, 64)
    return make


def _vq_option(forward=None, **options):
    """VectorQuantize with constructor ``options`` and forward keywords ``forward(tokens)``."""
    def make(batch, seq):
        ours, theirs = _pair(VectorQuantize, "VectorQuantize", dim=64, codebook_size=1024, decay=0.99,
                             commitment_weight=0.25, **options)
        x = _tokens(batch, seq, 64)
        return ours, theirs, x, ({} if forward is None else forward(x))
    return make


def _half_padded(x):
    """lens: every other sequence half padded."""
    lens = torch.full((x.shape[0],), x.shape[1])
    lens[::2] = x.shape[1] // 2
    return dict(lens=lens)


def _qinco(batch, seq):
    ours, theirs = _pair(ResidualVQ, "ResidualVQ", dim=32, num_quantizers=3, codebook_size=256,
                         implicit_neural_codebook=True)
    return ours, theirs, _tokens(batch, seq, 32)


def _latent_quantize(batch, seq):
    ours, theirs = _pair(LatentQuantize, "LatentQuantize", levels=[8, 5, 5, 5], dim=64)
    return ours, theirs, _tokens(batch, 64, seq)  # channel-first: [b, dim, n]


def _hierarchical_vq(batch, seq):
    ours, theirs = _pair(HierarchicalVQ, "HierarchicalVQ", dim=64, codebook_size=1024, scales=(1, 2, 4, 8, 16),
                         accept_image_fmap=True)
    side = math.isqrt(seq)  # square maps
    return ours, theirs, torch.randn(batch, 64, side, side, generator=torch.Generator().manual_seed(0))


def _fsp(batch, seq):
    ours, theirs = _pair(FSP, "FSP", levels=[8, 5, 5, 5])
    return ours, theirs, _tokens(batch, seq, 4)


def _binary_mapper(batch, seq):
    ours, theirs = _pair(BinaryMapper, "BinaryMapper", bits=8)
    return ours, theirs, _tokens(batch, seq, 8)


def _evo_lfq(batch, seq):
    vqp = require("vector_quantize_pytorch")
    coder = dict(encoder=torch.nn.Linear(32, 10), decoder=torch.nn.Linear(10, 32))
    theirs = vqp.EvoLFQ(**coder, dim=10, codebook_size=2 ** 10)
    ours = EvoLFQ(**copy.deepcopy(coder), dim=10, codebook_size=2 ** 10)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, _tokens(batch, seq, 32)


CASES = (  # name, configuration, make, tokens per sample, batch of the layer table[, speedup target]
    Case("VectorQuantize", "dim 64, 1024 codes", _vq, 256, 16, 5.0),
    Case("VectorQuantize masked", "dim 64, 1024 codes, lens (half the sequences half padded)",
         _vq_option(_half_padded), 256, 16),
    Case("VectorQuantize top-4", "dim 64, 1024 codes, topk=4", _vq_option(lambda x: dict(topk=4)), 256, 16),
    Case("VectorQuantize sampled", "dim 64, 1024 codes, stochastic_sample_codes", _vq_option(
        stochastic_sample_codes=True), 256, 16, draws=lambda n: torch.rand(n, 1024)),
    Case("ResidualVQ QINCo", "implicit_neural_codebook, 3 levels x 256 codes, dim 32", _qinco, 256, 2),
    Case("ResidualVQ separate", "8 levels x 1024 codes, dim 128", _rvq(False), 512, 8, 5.0),
    Case("ResidualVQ shared", "8 levels, one 1024-code codebook, dim 128", _rvq(True), 512, 8, 5.0),
    Case("FSQ", "levels 8,8,8,5,5,5 (64000 codes)", _fsq, 1024, 16),
    Case("LFQ 2^14", "14 bits", _lfq(14), 256, 4),
    Case("LFQ 2^16", "16 bits", _lfq(16), 256, 4),
    Case("ResidualFSQ", "4 levels of 8,5,5,5, dim 64", _residual_fsq, 256, 16),
    Case("ResidualLFQ", "4 levels of 2^10, dim 64", _residual_lfq, 256, 16),
    Case("SimVQ", "dim 64, 1024 codes", _sim_vq(False), 256, 16),
    Case("ResidualSimVQ", "4 levels x 1024 codes, dim 64", _sim_vq(True), 256, 16),
    Case("LatentQuantize", "levels 8,5,5,5 (1000 codes), dim 64, channel-first", _latent_quantize, 1024, 16,
         channel_first=True),
    Case("HierarchicalVQ", "5 scales 1..16, one 1024-code codebook, dim 64, 16 x 16 maps", _hierarchical_vq, 256, 8,
         channel_first=True),
    Case("FSP", "levels 8,5,5,5", _fsp, 1024, 16, draws=lambda n: (torch.rand(n, 4), torch.rand(n, 4))),
    Case("BinaryMapper", "8 bits (256 codes), one-hot output", _binary_mapper, 256, 16,
         draws=lambda n: torch.full((n, 8), 0.5).bernoulli(), out_features=256),
    Case("EvoLFQ", "linear encoder / decoder 32 <-> 10, 2^10 codes", _evo_lfq, 256, 16),
)


LINEAR_MAPS = (("project_in", "project_out"), ("encoder", "decoder"))  # a layer's own maps in and out


class _Widen(torch.autograd.Function):
    """x [..., d] -> zeros [..., width]: a fresh output of the layer's width, whose backward reads the gradient once
    (its row sums), the least a layer with that output does."""

    @staticmethod
    def forward(ctx, x, width):
        ctx.features = x.shape[-1]
        return x.new_zeros(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad):
        return grad.sum(-1, keepdim=True).expand(*grad.shape[:-1], ctx.features), None


class Shell(torch.nn.Module):
    """A layer's training step with its quantizer taken out: copies of the layer's own dense maps, applied where
    the layer applies them to tensors of the same shapes. Those are its linear maps in and out (``project_in`` /
    ``project_out``, EvoLFQ's ``encoder`` / ``decoder``) back to back, and HierarchicalVQ's per-level
    convolution phi on the full map (summed over the levels, as the levels' reconstructions are); the identity
    where there are none. A channel-first input is read as the layers read it (features moved last and back).
    ``draws(tokens)``, when given, draws the random numbers the layer draws a step (the same stream as theirs,
    which ours reproduces: FSP's perturbations, the sampled codes' Gumbel noise, BinaryMapper's bits).
    ``out_features``, when given, is the width of the layer's output (BinaryMapper's one-hot): the shell ends in a
    fresh output of that width, whose backward reads the gradient once. Timed with the same step
    (objective, backward) as the layers, it is the least any implementation of the layer could cost here:
    vector-quantize-pytorch's time over the shell's bounds the speedup any quantizer could show. A lower bound:
    the shell leaves out the losses and layout copies a layer may also need."""

    def __init__(self, layer, channel_first, draws=None, out_features=0):
        super().__init__()
        maps = []
        for names in LINEAR_MAPS:
            found = [getattr(layer, name, None) for name in names]
            if all(isinstance(m, torch.nn.Linear) for m in found):
                maps = [copy.deepcopy(m) for m in found]
                break
        self.maps = torch.nn.Sequential(*maps)
        phis = [layer._phi(level) for level in range(layer.num_levels)] if hasattr(layer, "_phi") else []
        self.level_maps = torch.nn.ModuleList(copy.deepcopy(phi) for phi in phis)  # a shared phi: one copy a level
        self.channel_first, self.draws, self.out_features = channel_first, draws, out_features

    def forward(self, x, **_):
        if self.draws is not None:
            self.draws(x.numel() // x.shape[1 if self.channel_first else -1])
        if self.level_maps:  # channel-first maps [B, dim, *spatial]
            return sum(phi(x) for phi in self.level_maps)
        if self.channel_first:
            return self.maps(x.movedim(1, -1)).movedim(-1, 1)
        y = self.maps(x)
        return _Widen.apply(y, self.out_features) if self.out_features else y


def _objective(out):
    """quantized.mean() plus the layer's losses: the first output and every floating one after."""
    if isinstance(out, torch.Tensor):
        return out.mean()
    total = out[0].mean()
    for t in out[1:]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            total = total + t.sum()
    return total


def _step(module, x0, device, forward):
    module.to(device).train()
    x = x0.to(device).requires_grad_()
    forward = {k: v.to(device) if torch.is_tensor(v) else v for k, v in forward.items()}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        out = module(x, **forward)
        _objective(out).backward()
        sync()
        return out
    return step


def _theirs(timed, mib, t_ours):
    """(their seconds, speedup, their MiB, why not) from time_calls' entry "theirs" (None: not run)."""
    theirs = timed.get("theirs")
    if theirs is None:
        return None, None, None, "not run (needs > 6 GiB)"
    if isinstance(theirs, Exception):
        return None, None, None, f"failed: {type(theirs).__name__}"
    return theirs[0], theirs[0] / t_ours, mib.get("theirs"), ""


def _targets(case, detail, speedup, note, mib, their_mib):
    """The case's target records: its speedup target, LFQ 2^16's memory target (``note``: why theirs did not run)."""
    out = []
    if case.target:
        out.append(report.target(f"{case.name} training step vs vector-quantize-pytorch", detail, case.target,
                                 speedup, note))
    if case.name == "LFQ 2^16":
        frac = mib["ours"] / their_mib if their_mib else None
        out.append(report.target("LFQ 2^16 peak memory vs vector-quantize-pytorch", detail, 0.10, frac, note,
                                 unit="%", compare="<"))
    return out


def _time_case(case, batch, repeats, budget, device, memory, shell=False):
    """Times ours and theirs (and with ``shell`` the layer's :class:`Shell`) at ``batch``: (time_calls' result,
    peak MiB of each when ``memory``, else {})."""
    ours, theirs, x, forward = case.build(batch)
    fns = {"ours": _step(ours, x, device, forward)}
    if theirs is not None:
        fns["theirs"] = _step(theirs, x, device, forward)
    if shell:
        fns["shell"] = _step(Shell(ours, case.channel_first, case.draws, case.out_features), x, device, forward)
    timed = time_calls(fns, repeats, budget)
    if isinstance(timed["ours"], Exception):  # our own layer failing is an error, not a table cell
        raise timed["ours"]
    ran = [name for name in fns if not isinstance(timed[name], Exception)]
    return timed, {name: peak_mib(fns[name], device) for name in ran} if memory else {}


def run_case(case, repeats, budget, quick=False, device="cpu"):
    """One case: (its result {name, detail, ours_s, theirs_s, theirs_note, ours_mib, theirs_mib}, its targets)."""
    batch = case.batch_for(quick)
    detail = f"{case.detail}, {batch} x {case.seq} tokens"
    timed, mib = _time_case(case, batch, repeats, budget, device, memory=True)
    t_ours = timed["ours"][0]
    their_s, speedup, their_mib, note = _theirs(timed, mib, t_ours)
    result = dict(name=case.name, detail=detail, ours_s=t_ours, theirs_s=their_s, theirs_note=note,
                  ours_mib=mib["ours"], theirs_mib=their_mib)
    return result, _targets(case, detail, speedup, note, mib, their_mib)


def _log_times(label, ours_s, theirs_s, note, log):
    their_ms = note or f"{theirs_s * 1e3:.1f}"
    log(f"  {label}: ours {ours_s * 1e3:.1f} ms, vector-quantize-pytorch {their_ms} ms")


def run(repeats, budget, quick=False, log=log, device="cpu"):
    """Every case: (results, target records); see :func:`run_case`."""
    results, targets = [], []
    for case in CASES:
        result, case_targets = run_case(case, repeats, budget, quick, device)
        results.append(result)
        targets += case_targets
        _log_times(case.name, result["ours_s"], result["theirs_s"], result["theirs_note"], log)
    return results, targets


def run_sweep(repeats, budget, quick=False, log=log, device="cpu", cases=CASES, tokens=SWEEP_TOKENS):
    """Every case at each size of ``tokens`` (tokens a step; quick: the first only), batch = size // seq, time
    only, with the layer's :class:`Shell`: {tokens, target, runs: [{name, detail, seq, tokens, batch, ours_s,
    theirs_s, theirs_note, shell_s}]}."""
    sizes = tokens[:1] if quick else tokens
    runs = []
    for case in cases:
        for n in sizes:
            batch = max(1, n // case.seq)
            timed, _ = _time_case(case, batch, repeats, budget, device, memory=False, shell=True)
            their_s, _, _, note = _theirs(timed, {}, timed["ours"][0])
            runs.append(dict(name=case.name, detail=case.detail, seq=case.seq, tokens=batch * case.seq, batch=batch,
                             ours_s=timed["ours"][0], theirs_s=their_s, theirs_note=note, shell_s=timed["shell"][0]))
            _log_times(f"{case.name} at {batch} x {case.seq} tokens", timed["ours"][0], their_s, note, log)
    return dict(tokens=list(sizes), target=SWEEP_TARGET, runs=runs)


def main(argv=None):
    import argparse

    import vqkernels

    p = argparse.ArgumentParser(prog="python -m vqkernels.bench.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="smaller batches (with --sweep: 1024 tokens only)")
    p.add_argument("--sweep", action="store_true",
                   help=f"the token sweep instead of the layer table: every layer at {' and '.join(map(str, SWEEP_TOKENS))} "
                        "tokens a step, time only")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per method")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {THREADS} threads"
    serves = vqkernels.backend("vq_quantize", args.device.split(":")[0])
    if args.sweep:
        sweep = run_sweep(args.repeats, args.budget, quick=args.quick, device=args.device)
        print(f"\n{report.sweep_title(sweep)}, one training step, median ms ({where}; {serves}):\n")
        print(report.sweep_table(sweep))
        return
    results, targets = run(args.repeats, args.budget, quick=args.quick, device=args.device)
    print(f"\nQuantizer layers, one training step, median ms ({where}; vqkernels serves this device with: "
          f"{serves}):\n")
    print(report.layers_table(results))
    print()
    print(report.targets_table(targets, "configuration"))


if __name__ == "__main__":
    main()
