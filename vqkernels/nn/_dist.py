"""torch.distributed helpers of the codebook layers (``sync_codebook``).

Every rank must call the layers with the same number of rows per step (static shapes):
the sampled rows of k-means init and dead-code restart come from the rows of all ranks,
concatenated in rank order, with the random draw made on rank 0 and broadcast, so every
rank ends with the same codebook, and the one a single process would get from the
concatenated batch with rank 0's random state.
"""

import torch
import torch.distributed as dist


def distributed_ready():
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(x):
    """The rows [M, D] of every rank, concatenated in rank order (equal M on every rank)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_from_rank0(t):
    """Rank 0's ``t`` on every rank (in place); returns it."""
    dist.broadcast(t, src=0)
    return t


def all_reduce_mean_(t):
    """``t`` averaged over the ranks, in place."""
    dist.all_reduce(t)
    t.div_(dist.get_world_size())
    return t


def all_reduce_sum_(t):
    """``t`` summed over the ranks, in place."""
    dist.all_reduce(t)
    return t
