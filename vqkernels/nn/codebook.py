"""The codebook state shared by the quantizer layers: EMA statistics, k-means init and
dead-code restart, all on the vqkernels ops, with no host synchronisation.

The buffers carry vector-quantize-pytorch's names and shapes (``initted``, ``cluster_size``
[H, K], ``embed_avg`` [H, K, D], ``embed`` [H, K, D]), so its checkpoints load.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import _dist

COSINE_EPS = 1e-6  # l2-normalisation eps of the cosine codebooks (vector-quantize-pytorch's)


def draw_rows(num_rows, num, generator_device, sync=False):
    """``num`` random row indices in [0, num_rows): without replacement when there are enough
    rows, else with. Under ``sync`` rank 0 draws and every rank receives its draw."""
    if num_rows >= num:
        sel = torch.randperm(num_rows, device=generator_device)[:num]
    else:
        sel = torch.randint(0, num_rows, (num,), device=generator_device)
    return _dist.broadcast_from_rank0(sel) if sync else sel


def kmeans(samples, num_clusters, num_iters=10, metric="l2", sync=False):
    """Lloyd's k-means: assignment with :func:`vqkernels.nearest_code`, means with the EMA
    scatter (:func:`vqkernels.ema_update_` at decay 0). Starts from random samples; a cluster
    left empty keeps its mean. With ``metric="cosine"`` the means are l2-normalised.

    Returns ``(means [num_clusters, D], counts [num_clusters])``, counts of the last assignment.
    Under ``sync`` the samples are expected to be the same on every rank (see _dist.gather_rows).
    """
    if samples.shape[0] == 0:
        raise ValueError("vqkernels.nn.kmeans: needs at least one sample")
    samples = samples.detach().float()
    means = samples[draw_rows(samples.shape[0], num_clusters, samples.device, sync)]
    counts = samples.new_zeros(num_clusters)
    sums = samples.new_zeros(num_clusters, samples.shape[1])
    scratch = torch.empty_like(sums)
    for _ in range(num_iters):
        indices, _ = ops.nearest_code(samples, means, metric)
        counts.zero_()
        sums.zero_()
        ops.ema_update_(scratch, counts, sums, samples, indices, 0.0, 0.0)  # scratch = sums / counts
        new = F.normalize(scratch, dim=-1, eps=COSINE_EPS) if metric == "cosine" else scratch
        means = torch.where((counts > 0).unsqueeze(1), new, means)
    return means, counts


def _uniform_init(*shape):
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


class Codebook(nn.Module):
    """``num_codebooks`` codebooks of ``codebook_size`` codes of size ``dim``, with their EMA state."""

    def __init__(self, dim, codebook_size, num_codebooks=1, kmeans_init=False, kmeans_iters=10, decay=0.8,
                 eps=1e-5, threshold_ema_dead_code=0, learnable_codebook=False, ema_update=True,
                 use_cosine_sim=False, sync=False, frozen=None):
        super().__init__()
        if frozen is not None:
            embed = frozen.detach().float().reshape(num_codebooks, codebook_size, dim).clone()
        elif kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = _uniform_init(num_codebooks, codebook_size, dim)
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1, eps=COSINE_EPS)
        self.codebook_size, self.num_codebooks, self.dim = codebook_size, num_codebooks, dim
        self.kmeans_iters, self.decay, self.eps = kmeans_iters, decay, eps
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.learnable_codebook, self.ema_update = learnable_codebook, ema_update
        self.use_cosine_sim, self.sync, self.frozen = use_cosine_sim, sync, frozen is not None
        self.metric = "cosine" if use_cosine_sim else "l2"
        initted = frozen is not None or not kmeans_init
        self.register_buffer("initted", torch.tensor(initted))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        # A frozen table is the caller's (e.g. a language model's word embeddings): it is neither
        # updated nor saved in checkpoints, and has no EMA sums.
        self.register_buffer("embed_avg", embed.new_empty(0) if self.frozen else embed.clone(),
                             persistent=not self.frozen)
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed, persistent=not self.frozen)
        # Python mirror of `initted`, so the training path never reads a tensor on the host.
        self._initted = initted

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)

    @property
    def needs_init(self):
        return not self._initted

    @property
    def tracks_statistics(self):
        """Whether training steps update cluster_size / embed_avg (EMA, or for dead-code restart)."""
        return not self.frozen and (self.ema_update or self.threshold_ema_dead_code > 0)

    def transform_input(self, x):
        return F.normalize(x, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else x

    @torch.no_grad()
    def init_embed_(self, rows):
        """k-means init from the rows of each codebook (a list of [M, D] tensors)."""
        for h, samples in enumerate(rows):
            if self.sync:
                samples = _dist.gather_rows(samples.detach().float())
            means, counts = kmeans(samples, self.codebook_size, self.kmeans_iters, self.metric, self.sync)
            self.cluster_size[h].copy_(counts)
            self.embed_avg[h].copy_(means * counts.unsqueeze(1))
            # decay 1 with no rows: statistics kept, codebook recomputed from them (smoothed means)
            empty = samples.new_empty(0, samples.shape[1]).float()
            ops.ema_update_(self.embed[h], self.cluster_size[h], self.embed_avg[h], empty,
                            torch.empty(0, dtype=torch.int64, device=samples.device), 1.0, self.eps)
            if self.use_cosine_sim:
                self.embed[h].copy_(F.normalize(self.embed[h], dim=-1, eps=COSINE_EPS))
        self.initted.fill_(True)
        self._initted = True

    @torch.no_grad()
    def update_(self, h, rows, indices):
        """One training step of codebook ``h`` from its rows [M, D] and their codes [M]:
        the EMA update (or only the statistics, when the codebook is learned by gradient),
        then dead-code restart."""
        if not self.tracks_statistics:
            return
        rows = rows.detach().float()
        if self.sync:  # every rank updates from the rows of all ranks: identical codebooks
            rows, indices = _dist.gather_rows(rows), _dist.gather_rows(indices)
        target = torch.empty_like(self.embed_avg[h])
        ops.ema_update_(target, self.cluster_size[h], self.embed_avg[h], rows, indices, self.decay, self.eps)
        if self.ema_update:
            codes = F.normalize(target, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else target
        else:
            codes = self.embed[h].detach()
        if self.threshold_ema_dead_code > 0 and rows.shape[0] > 0:
            codes = self._restart_dead_codes(h, rows, codes)
        self._set_codes(h, codes)

    def _restart_dead_codes(self, h, rows, codes):
        """Codes whose EMA count fell below ``threshold_ema_dead_code`` take random rows of the
        batch (their statistics restart at the threshold); returns the new codes of codebook h."""
        rows = self.transform_input(rows)
        sampled = rows[draw_rows(rows.shape[0], self.codebook_size, rows.device, self.sync)]
        dead = self.cluster_size[h] < self.threshold_ema_dead_code
        reset = float(self.threshold_ema_dead_code)
        self.cluster_size[h].copy_(torch.where(dead, torch.full_like(self.cluster_size[h], reset),
                                               self.cluster_size[h]))
        self.embed_avg[h].copy_(torch.where(dead.unsqueeze(1), sampled * reset, self.embed_avg[h]))
        return torch.where(dead.unsqueeze(1), sampled, codes)

    def _set_codes(self, h, codes):
        """Installs new codes for codebook h. A buffer codebook is replaced by a new tensor, never
        written in place: the step's backward still holds the old one (in eager mode, and under
        torch.compile, whose partitioner may re-read that input in the backward). A learned
        codebook (a Parameter) is written in place; its layer hands the ops a copy."""
        codes = codes.to(self.embed.dtype)
        if isinstance(self.embed, nn.Parameter):
            self.embed[h].copy_(codes)
        else:
            self.embed = torch.cat([self.embed[:h], codes.unsqueeze(0), self.embed[h + 1:]])
