"""sync_codebook: two processes on the gloo backend keep bit-identical codebooks, equal to one
process that sees the concatenated batch (EMA, k-means init and dead-code restart)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vq_helpers import vqkernels  # noqa: F401  (loads the ops, quietly without the extension)

WORLD = 2
STEPS = 5
ROWS = 48  # per rank and step


def _leave():
    """Every rank reaches the end before either closes its connections (a rank that tears down while its peer
    still reads aborts the peer under load)."""
    dist.barrier()
    dist.destroy_process_group()


def _make(sync):
    from vqkernels.nn import ResidualVQ, VectorQuantize
    torch.manual_seed(0)
    vq = VectorQuantize(dim=6, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=1.5,
                        decay=0.7, rotation_trick=False, sync_codebook=sync)
    rvq = ResidualVQ(dim=6, num_quantizers=2, codebook_size=8, threshold_ema_dead_code=1.0, decay=0.7,
                     rotation_trick=False, sync_codebook=sync)
    return vq, rvq


def _batches():
    g = torch.Generator().manual_seed(1)  # data from its own generator: the global RNG is the modules'
    return [torch.randn(WORLD, ROWS, 6, generator=g) * (1 + s) for s in range(STEPS)]


def _run(vq, rvq, batches):
    vq.train()
    rvq.train()
    for x in batches:
        vq(x)
        rvq(x)
    return {"vq." + k: v.clone() for k, v in vq.state_dict().items()} | \
        {"rvq." + k: v.clone() for k, v in rvq.state_dict().items()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        vq, rvq = _make(sync=True)
        assert vq._codebook.sync
        local = [x[rank:rank + 1] for x in _batches()]
        state = _run(vq, rvq, local)
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _leave()


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), f"ranks differ in {k}"
    # one process, the concatenated batches (rank 0's rows first), rank 0's random state
    vq, rvq = _make(sync=False)
    single = _run(vq, rvq, [x.reshape(1, WORLD * ROWS, 6) for x in _batches()])
    for k, v in single.items():
        torch.testing.assert_close(states[0][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # dead codes really were restarted and k-means really ran during these steps
    assert not bool((single["vq._codebook.cluster_size"] == 1.0).all())


def _affine(sync):
    from vqkernels.nn import VectorQuantize
    torch.manual_seed(0)
    return VectorQuantize(dim=6, codebook_size=16, affine_param=True, decay=0.7, rotation_trick=False,
                          sync_codebook=sync, sync_affine_param=sync)


def _affine_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        vq = _affine(sync=True).train()
        for x in _batches():
            vq(x[rank:rank + 1])
        torch.save({k: v.clone() for k, v in vq.state_dict().items()}, os.path.join(out_dir, f"affine{rank}.pt"))
    finally:
        _leave()


def test_sync_affine_param_takes_the_batch_statistics_of_every_rank(tmp_path):
    """sync_affine_param: the running batch mean and variance of two ranks are those of one process seeing both
    ranks' rows (and with sync_codebook the codebooks follow)."""
    mp.spawn(_affine_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"affine{r}.pt") for r in range(WORLD)]
    single = _affine(sync=False).train()
    for x in _batches():
        single(x.reshape(1, WORLD * ROWS, 6))
    for k, v in single.state_dict().items():
        for state in states:
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _local_kmeans(sync):
    from vqkernels.nn import VectorQuantize
    torch.manual_seed(0)
    return VectorQuantize(dim=6, codebook_size=16, kmeans_init=True, kmeans_iters=3, ema_update=False,
                          rotation_trick=False, sync_codebook=sync, sync_kmeans=False)


def _local_kmeans_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        vq = _local_kmeans(sync=True).train()
        vq(_batches()[0][rank:rank + 1])
        torch.save(vq.codebook.clone(), os.path.join(out_dir, f"kmeans{rank}.pt"))
    finally:
        _leave()


def test_sync_kmeans_false_initialises_each_rank_from_its_own_rows(tmp_path):
    """sync_kmeans=False (with sync_codebook): k-means init runs on each rank's rows alone, as one process on
    that rank's batch, so the ranks' codebooks differ (vector-quantize-pytorch's meaning)."""
    mp.spawn(_local_kmeans_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    codebooks = [torch.load(tmp_path / f"kmeans{r}.pt") for r in range(WORLD)]
    assert not torch.equal(codebooks[0], codebooks[1])
    for rank, codebook in enumerate(codebooks):
        single = _local_kmeans(sync=False).train()
        single(_batches()[0][rank:rank + 1])
        torch.testing.assert_close(codebook, single.codebook)
