"""The ops under torch.compile: a full graph (no breaks) gives the eager results."""

import pytest
import torch

from vq_helpers import METRICS, clustered, vqkernels


def vq_step(x, codebook, ema_codebook, cluster_size, embed_sum):
    """Every op in one function: search, top-k, quantize with both losses, EMA update."""
    indices, distances = vqkernels.nearest_code(x, codebook, "l2")
    top_indices, top_distances = vqkernels.nearest_code_topk(x, codebook, 3, "cosine")
    quantized, q_indices, commit_loss, codebook_loss = vqkernels.vq_quantize(x, codebook, "l2")
    loss = (quantized * quantized).sum() + 0.25 * commit_loss + codebook_loss + 0.1 * distances.sum()
    loss = loss + 0.01 * top_distances.sum()
    vqkernels.ema_update_(ema_codebook, cluster_size, embed_sum, x.detach(), q_indices, 0.9, 1e-5)
    return loss, indices, top_indices, quantized


def run_step(fn, x64, cb64, n):
    x = x64[:n].float().requires_grad_()
    codebook = cb64.float().requires_grad_()
    ema = [cb64.float(), torch.ones(cb64.shape[0]), cb64.float() * 2]
    loss, indices, top_indices, quantized = fn(x, codebook, *ema)
    loss.backward()
    return [loss, indices, top_indices, quantized, x.grad, codebook.grad, *ema]


def test_compiled_step_matches_eager():
    """Inductor, fullgraph=True: forward, backward through both losses, in-place EMA; a second
    batch size exercises the fake kernels with a dynamic N."""
    torch._dynamo.reset()
    compiled = torch.compile(vq_step, fullgraph=True)
    x64, cb64, _ = clustered(96, 24, 8, seed=71, noise=0.5)
    for n in (96, 57):
        eager = run_step(vq_step, x64, cb64, n)
        got = run_step(compiled, x64, cb64, n)
        names = ["loss", "indices", "top_indices", "quantized", "x.grad", "codebook.grad", "ema_codebook",
                 "cluster_size", "embed_sum"]
        for name, a, b in zip(names, got, eager):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name} (N={n}): {m}")
        assert not bool((got[6] == cb64.float()).all()), "the compiled EMA update did not write the codebook"


@pytest.mark.parametrize("op", ["nearest_code", "nearest_code_topk"])
def test_aot_dispatch_with_grad(op):
    """What opcheck's test_aot_dispatch_dynamic cannot run for these ops with inputs that
    require grad (see vq_helpers.INT_FIRST_OUTPUT): AOTAutograd with dynamic shapes gives
    eager's distances and gradients, for every metric."""
    torch._dynamo.reset()
    call = {"nearest_code": lambda x, c, m: vqkernels.nearest_code(x, c, m),
            "nearest_code_topk": lambda x, c, m: vqkernels.nearest_code_topk(x, c, 2, m)}[op]

    def fn(x, codebook):
        return [call(x, codebook, metric) for metric in METRICS]

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    x64, cb64, _ = clustered(30, 11, 5, seed=72, noise=0.3)
    results = []
    for f in (fn, compiled):
        x, codebook = x64.float().requires_grad_(), cb64.float().requires_grad_()
        outs = f(x, codebook)
        total = sum(d.sum() * (i + 1) for i, (_, d) in enumerate(outs))
        total.backward()
        results.append([t for pair in outs for t in pair] + [x.grad, codebook.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
