"""The layer suite: one training step (forward, backward, codebook update) of each vqkernels.nn
quantizer layer against vector-quantize-pytorch's layer of the same configuration, started from the
same state on the same input, in one process. Part of ``python -m vqkernels.bench``; on its own:

    python -m vqkernels.bench.layers [--quick] [--device cuda] [--repeats 20] [--budget 2]

Timing: :func:`vqkernels.bench.harness.time_calls`; memory: peak RSS growth of one step on the CPU,
the CUDA allocator's peak growth on a GPU.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from ..nn import (FSP, FSQ, LFQ, BinaryMapper, EvoLFQ, HierarchicalVQ, LatentQuantize, ResidualFSQ, ResidualLFQ,
                  ResidualSimVQ, ResidualVQ, SimVQ, VectorQuantize)
from . import report
from .harness import THREADS, log, peak_mib, require, time_calls

LFQ_MEMORY_LIMIT = 6 << 30  # bytes: vector-quantize-pytorch's LFQ is not run when it would need more


@dataclass(frozen=True)
class Case:
    name: str
    detail: str
    make: Callable  # quick -> (ours module, theirs module or None, input tensor[, forward keywords])
    target: float = 0.0  # speedup needed (0: none)
    channel_first: bool = False  # inputs [b, dim, ...] rather than [b, n, dim]


def _tokens(b, n, d, seed=0):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def _pair(ours_cls, theirs_name, **kw):
    vqp = require("vector_quantize_pytorch")
    theirs = getattr(vqp, theirs_name)(**kw)
    ours = ours_cls(**kw)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _vq(quick):
    ours, theirs = _pair(VectorQuantize, "VectorQuantize", dim=64, codebook_size=1024, decay=0.99,
                         commitment_weight=0.25)
    return ours, theirs, _tokens(4 if quick else 16, 256, 64)


def _rvq(shared):
    def make(quick):
        ours, theirs = _pair(ResidualVQ, "ResidualVQ", dim=128, num_quantizers=8, codebook_size=1024,
                             shared_codebook=shared, decay=0.99, commitment_weight=0.25)
        return ours, theirs, _tokens(2 if quick else 8, 512, 128)
    return make


def _fsq(quick):
    ours, theirs = _pair(FSQ, "FSQ", levels=[8, 8, 8, 5, 5, 5])
    return ours, theirs, _tokens(4 if quick else 16, 1024, 6)


def _lfq(bits):
    def make(quick):
        n = 256 if quick else 1024
        kw = dict(dim=bits, codebook_size=2 ** bits, entropy_loss_weight=0.1, diversity_gamma=1.0)
        if n * 2 ** bits * 4 * 6 > LFQ_MEMORY_LIMIT:
            ours, theirs = LFQ(**kw), None
        else:
            ours, theirs = _pair(LFQ, "LFQ", **kw)
        return ours, theirs, _tokens(n // 256, 256, bits)
    return make


def _residual_fsq(quick):
    ours, theirs = _pair(ResidualFSQ, "ResidualFSQ", levels=[8, 5, 5, 5], num_quantizers=4, dim=64)
    return ours, theirs, _tokens(4 if quick else 16, 256, 64)


def _residual_lfq(quick):
    ours, theirs = _pair(ResidualLFQ, "ResidualLFQ", dim=64, num_quantizers=4, codebook_size=2 ** 10)
    return ours, theirs, _tokens(4 if quick else 16, 256, 64)


def _sim_vq(residual):
    def make(quick):
        kw = dict(dim=64, codebook_size=1024)
        ours, theirs = (_pair(ResidualSimVQ, "ResidualSimVQ", num_quantizers=4, **kw) if residual
                        else _pair(SimVQ, "SimVQ", **kw))
        return ours, theirs, _tokens(4 if quick else 16, 256, 64)
    return make


def _vq_option(forward=None, **options):
    """VectorQuantize with constructor ``options`` and forward keywords ``forward(tokens)``."""
    def make(quick):
        ours, theirs = _pair(VectorQuantize, "VectorQuantize", dim=64, codebook_size=1024, decay=0.99,
                             commitment_weight=0.25, **options)
        x = _tokens(4 if quick else 16, 256, 64)
        return ours, theirs, x, ({} if forward is None else forward(x))
    return make


def _half_padded(x):
    """lens: every other sequence half padded."""
    lens = torch.full((x.shape[0],), x.shape[1])
    lens[::2] = x.shape[1] // 2
    return dict(lens=lens)


def _qinco(quick):
    ours, theirs = _pair(ResidualVQ, "ResidualVQ", dim=32, num_quantizers=3, codebook_size=256,
                         implicit_neural_codebook=True)
    return ours, theirs, _tokens(1 if quick else 2, 256, 32)


def _latent_quantize(quick):
    ours, theirs = _pair(LatentQuantize, "LatentQuantize", levels=[8, 5, 5, 5], dim=64)
    return ours, theirs, _tokens(4 if quick else 16, 64, 1024)  # channel-first: [b, dim, n]


def _hierarchical_vq(quick):
    ours, theirs = _pair(HierarchicalVQ, "HierarchicalVQ", dim=64, codebook_size=1024, scales=(1, 2, 4, 8, 16),
                         accept_image_fmap=True)
    return ours, theirs, torch.randn(4 if quick else 8, 64, 16, 16, generator=torch.Generator().manual_seed(0))


def _fsp(quick):
    ours, theirs = _pair(FSP, "FSP", levels=[8, 5, 5, 5])
    return ours, theirs, _tokens(4 if quick else 16, 1024, 4)


def _binary_mapper(quick):
    ours, theirs = _pair(BinaryMapper, "BinaryMapper", bits=8)
    return ours, theirs, _tokens(4 if quick else 16, 256, 8)


def _evo_lfq(quick):
    vqp = require("vector_quantize_pytorch")
    coder = dict(encoder=torch.nn.Linear(32, 10), decoder=torch.nn.Linear(10, 32))
    theirs = vqp.EvoLFQ(**coder, dim=10, codebook_size=2 ** 10)
    ours = EvoLFQ(**copy.deepcopy(coder), dim=10, codebook_size=2 ** 10)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, _tokens(4 if quick else 16, 256, 32)


CASES = (
    Case("VectorQuantize", "dim 64, 1024 codes", _vq, 5.0),
    Case("VectorQuantize masked", "dim 64, 1024 codes, lens (half the sequences half padded)",
         _vq_option(_half_padded)),
    Case("VectorQuantize top-4", "dim 64, 1024 codes, topk=4", _vq_option(lambda x: dict(topk=4))),
    Case("VectorQuantize sampled", "dim 64, 1024 codes, stochastic_sample_codes", _vq_option(
        stochastic_sample_codes=True)),
    Case("ResidualVQ QINCo", "implicit_neural_codebook, 3 levels x 256 codes, dim 32", _qinco),
    Case("ResidualVQ separate", "8 levels x 1024 codes, dim 128", _rvq(False), 5.0),
    Case("ResidualVQ shared", "8 levels, one 1024-code codebook, dim 128", _rvq(True), 5.0),
    Case("FSQ", "levels 8,8,8,5,5,5 (64000 codes)", _fsq),
    Case("LFQ 2^14", "14 bits", _lfq(14)),
    Case("LFQ 2^16", "16 bits", _lfq(16)),
    Case("ResidualFSQ", "4 levels of 8,5,5,5, dim 64", _residual_fsq),
    Case("ResidualLFQ", "4 levels of 2^10, dim 64", _residual_lfq),
    Case("SimVQ", "dim 64, 1024 codes", _sim_vq(False)),
    Case("ResidualSimVQ", "4 levels x 1024 codes, dim 64", _sim_vq(True)),
    Case("LatentQuantize", "levels 8,5,5,5 (1000 codes), dim 64, channel-first", _latent_quantize,
         channel_first=True),
    Case("HierarchicalVQ", "5 scales 1..16, one 1024-code codebook, dim 64, 16 x 16 maps", _hierarchical_vq,
         channel_first=True),
    Case("FSP", "levels 8,5,5,5", _fsp),
    Case("BinaryMapper", "8 bits (256 codes), one-hot output", _binary_mapper),
    Case("EvoLFQ", "linear encoder / decoder 32 <-> 10, 2^10 codes", _evo_lfq),
)


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


def run_case(case, repeats, budget, quick=False, device="cpu"):
    """One case: (its result {name, detail, ours_s, theirs_s, theirs_note, ours_mib, theirs_mib}, its targets)."""
    ours, theirs, x, *forward = case.make(quick)
    forward = forward[0] if forward else {}
    detail = f"{case.detail}, {x.shape[0]} x {x[0, 0].numel() if case.channel_first else x.shape[1]} tokens"
    fns = {"ours": _step(ours, x, device, forward)}
    if theirs is not None:
        fns["theirs"] = _step(theirs, x, device, forward)
    timed = time_calls(fns, repeats, budget)
    mib = {name: peak_mib(fn, device) for name, fn in fns.items()}
    if isinstance(timed["ours"], Exception):  # our own layer failing is an error, not a table cell
        raise timed["ours"]
    t_ours = timed["ours"][0]
    their_s, speedup, their_mib, note = _theirs(timed, mib, t_ours)
    result = dict(name=case.name, detail=detail, ours_s=t_ours, theirs_s=their_s, theirs_note=note,
                  ours_mib=mib["ours"], theirs_mib=their_mib)
    return result, _targets(case, detail, speedup, note, mib, their_mib)


def run(repeats, budget, quick=False, log=log, device="cpu"):
    """Every case: (results, target records); see :func:`run_case`."""
    results, targets = [], []
    for case in CASES:
        result, case_targets = run_case(case, repeats, budget, quick, device)
        results.append(result)
        targets += case_targets
        their_ms = result["theirs_note"] or f"{result['theirs_s'] * 1e3:.1f}"
        log(f"  {case.name}: ours {result['ours_s'] * 1e3:.1f} ms, vector-quantize-pytorch {their_ms} ms")
    return results, targets


def main(argv=None):
    import argparse

    import vqkernels

    p = argparse.ArgumentParser(prog="python -m vqkernels.bench.layers", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="smaller batches")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per method")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    results, targets = run(args.repeats, args.budget, quick=args.quick, device=args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {THREADS} threads"
    print(f"\nQuantizer layers, one training step, median ms ({where}; vqkernels serves this device with: "
          f"{vqkernels.backend('vq_quantize', args.device.split(':')[0])}):\n")
    print(report.layers_table(results))
    print()
    print(report.targets_table(targets, "configuration"))


if __name__ == "__main__":
    main()
