"""The codebook state shared by the quantizer layers: EMA statistics, k-means init and
dead-code restart, all on the vqkernels ops, with no host synchronisation.

The buffers carry vector-quantize-pytorch's names and shapes (``initted``, ``cluster_size``
[H, K], ``embed_avg`` [H, K, D], ``embed`` [H, K, D]), so its checkpoints load.
"""

import functools

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


def float32_statistics(method):
    """Runs a Codebook method with its EMA statistics in float32 when the layer was cast to float16 / bfloat16
    (the EMA kernel keeps them in float32 or float64), writing the results back in the buffers' dtype."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.cluster_size.dtype in (torch.float32, torch.float64):
            return method(self, *args, **kwargs)
        low = self.cluster_size, self.embed_avg
        self.cluster_size, self.embed_avg = low[0].float(), low[1].float()
        try:
            return method(self, *args, **kwargs)
        finally:
            low[0].copy_(self.cluster_size)
            low[1].copy_(self.embed_avg)
            self.cluster_size, self.embed_avg = low
    return run


def _uniform_init(*shape):
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


class Codebook(nn.Module):
    """``num_codebooks`` codebooks of ``codebook_size`` codes of size ``dim``, with their EMA state."""

    def __init__(self, dim, codebook_size, num_codebooks=1, kmeans_init=False, kmeans_iters=10, decay=0.8,
                 eps=1e-5, threshold_ema_dead_code=0, learnable_codebook=False, ema_update=True,
                 use_cosine_sim=False, sync=False, frozen=None, manual_ema_update=False, sync_kmeans=True):
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
        self.manual_ema_update = manual_ema_update
        self.affine = False  # see enable_affine
        self._pending = {}  # codebook -> summed (counts [K], sums [K, D]) of accum_ema_update steps
        self.use_cosine_sim, self.sync, self.frozen = use_cosine_sim, sync, frozen is not None
        # k-means init and dead-code restart from every rank's rows (else each rank's own, vector-quantize-pytorch's
        # sync_kmeans=False: the codebooks then differ between ranks)
        self.sync_samples = sync and sync_kmeans
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
        for name in ("batch_mean", "batch_variance"):  # an affine checkpoint's batch statistics: made room for
            if self.affine and getattr(self, name) is None and prefix + name in state_dict:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initted = bool(self.initted)
        if self.affine:
            self._affine_fresh = {name: bool(getattr(self, name + "_needs_init")) for name in self._affine_fresh}

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
    @float32_statistics
    def init_embed_(self, rows):
        """k-means init from the rows of each codebook (a list of [M, D] tensors)."""
        for h, samples in enumerate(rows):
            if self.sync_samples:
                samples = _dist.gather_rows(samples.detach().float())
            means, counts = kmeans(samples, self.codebook_size, self.kmeans_iters, self.metric, self.sync_samples)
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
    @float32_statistics
    def update_(self, h, rows, indices, valid=None, ema_update=True, weight=None, accumulate=False):
        """One training step of codebook ``h`` from its rows [M, D] and their codes [M] (-1: a row
        that counts nowhere, e.g. padding; ``valid`` [M] bool marks the rows dead codes may restart
        from, default all): the EMA statistics, then the codes from them (when ``ema_update``, this
        call's and the layer's, and the updates are not manual), then dead-code restart.

        ``weight`` ([K], or a callable of this step's sums [1, K, D] and counts [1, K] returning
        one) scales each code's EMA rate, ``(1 - decay) * weight``; ``accumulate`` adds this step's
        counts and sums to a pending total that the next non-accumulating step adds to its own
        (vector-quantize-pytorch's ``ema_update_weight`` / ``accum_ema_update``). Without these the
        whole step is one fused :func:`vqkernels.ema_update_`."""
        if not self.tracks_statistics or not (ema_update or self.threshold_ema_dead_code > 0):
            return
        rows = local_rows = rows.detach().float()
        local_valid = valid
        if self.sync:  # every rank updates from the rows of all ranks: identical codebooks
            rows, indices = _dist.gather_rows(rows), _dist.gather_rows(indices)
            valid = None if valid is None else _dist.gather_rows(valid)
        if not self.sync_samples:  # dead codes restart from this rank's rows (sync_kmeans=False)
            rows_restart, valid_restart = local_rows, local_valid
        else:
            rows_restart, valid_restart = rows, valid
        fused = weight is None and not accumulate and h not in self._pending
        target = torch.empty_like(self.embed_avg[h])
        stats_rows = self.affine_rows(h, rows) if self.affine else rows  # the statistics live in code space
        if fused:
            ops.ema_update_(target, self.cluster_size[h], self.embed_avg[h], stats_rows, indices, self.decay, self.eps)
        else:
            counts, sums = self._batch_statistics(target, stats_rows, indices)
            if accumulate:
                self._accumulate(h, counts, sums)
                return
            self._ema_step(h, counts, sums, weight)
        if self.ema_update and ema_update and not self.manual_ema_update:
            if not fused:
                target = self._codes_from_statistics(h)
            codes = F.normalize(target, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else target
        else:
            codes = None  # the codes stay as they are, unless dead ones restart
        if self.threshold_ema_dead_code > 0 and rows_restart.shape[0] > 0:
            codes = self._restart_dead_codes(h, rows_restart, self.embed[h].detach() if codes is None else codes,
                                             valid_restart)
        if codes is not None:
            self._set_codes(h, codes)

    def enable_affine(self, batch_decay, codebook_decay, sync=False):
        """vector-quantize-pytorch's ``affine_param``: running means and variances of the batch rows and of the
        codes (same buffers: ``batch_mean`` / ``batch_variance`` appear at the first forward, as there), the codes
        searched after an affine map onto the batch statistics; with ``sync`` the batch statistics are those of
        every rank's rows together (torch.distributed)."""
        self.affine, self.affine_decays, self.sync_affine = True, (batch_decay, codebook_decay), sync
        self.register_buffer("batch_mean", None)
        self.register_buffer("batch_variance", None)
        for name in ("codebook_mean", "codebook_variance"):
            self.register_buffer(name + "_needs_init", torch.tensor(True))
            self.register_buffer(name, torch.empty(self.num_codebooks, 1, self.dim))
        self._affine_fresh = {"codebook_mean": True, "codebook_variance": True}  # host mirror of the flags

    def _update_with_decay(self, name, value, decay):
        old = getattr(self, name)
        if old is None or self._affine_fresh.get(name, False):  # the first value is taken as is
            if name in self._affine_fresh:
                getattr(self, name + "_needs_init").fill_(False)
                self._affine_fresh[name] = False
            self.register_buffer(name, value.detach().clone())
            return
        self.register_buffer(name, old * decay + value.detach() * (1 - decay))

    @torch.no_grad()
    def update_affine_(self, rows, weights=None, training=True):
        """The running statistics from this step's rows (one [M, D] per codebook; ``weights`` [M] 0 / 1 keeps the
        unpadded ones) and, in training, the codes; the batch ones move in eval mode too, as theirs."""
        batch_decay, codebook_decay = self.affine_decays
        if training:
            embed = self.embed.detach().float()
            self._update_with_decay("codebook_mean", embed.mean(1, keepdim=True), codebook_decay)
            self._update_with_decay("codebook_variance", embed.var(1, unbiased=False, keepdim=True), codebook_decay)
        data = torch.stack([r.detach().float() for r in rows])  # [H, M, D]
        w = torch.ones(data.shape[1], device=data.device) if weights is None else weights
        reduce = _dist.all_reduce_sum_ if self.sync_affine else (lambda t: t)  # the batch of every rank
        count = reduce(w.sum()).clamp(min=1)
        mean = reduce((data * w[:, None]).sum(1, keepdim=True)) / count
        variance = reduce(((data - mean).square() * w[:, None]).sum(1, keepdim=True)) / count
        self._update_with_decay("batch_mean", mean, batch_decay)
        self._update_with_decay("batch_variance", variance, batch_decay)

    def _stds(self, h):
        return self.codebook_variance[h].clamp(min=1e-5).sqrt(), self.batch_variance[h].clamp(min=1e-5).sqrt()

    def affine_codes(self, h, embed):
        """Codes of codebook h mapped onto the batch statistics (what the search sees)."""
        codebook_std, batch_std = self._stds(h)
        return (embed - self.codebook_mean[h]) * (batch_std / codebook_std) + self.batch_mean[h]

    def affine_rows(self, h, rows):
        """Rows mapped into codebook h's statistics (what the EMA accumulates)."""
        codebook_std, batch_std = self._stds(h)
        return (rows - self.batch_mean[h]) * (codebook_std / batch_std) + self.codebook_mean[h]

    @torch.no_grad()
    @float32_statistics
    def expire_(self, h, rows, valid=None):
        """Dead-code restart of codebook h from ``rows`` [M, D] (the ``valid`` ones) alone, statistics unchanged
        otherwise."""
        if self.frozen or self.threshold_ema_dead_code <= 0 or rows.shape[0] == 0:
            return
        rows = rows.detach().float()
        if self.sync_samples:
            rows = _dist.gather_rows(rows)
            valid = None if valid is None else _dist.gather_rows(valid)
        self._set_codes(h, self._restart_dead_codes(h, rows, self.embed[h].detach(), valid))

    def _batch_statistics(self, scratch, rows, indices):
        """This step's counts [K] and sums [K, D] per code (the EMA kernel at decay 0)."""
        counts = rows.new_zeros(self.codebook_size)
        sums = rows.new_zeros(self.codebook_size, rows.shape[1])
        ops.ema_update_(scratch, counts, sums, rows, indices, 0.0, self.eps)
        return counts, sums

    def _accumulate(self, h, counts, sums):
        if h in self._pending:
            counts, sums = counts + self._pending[h][0], sums + self._pending[h][1]
        self._pending[h] = (counts, sums)

    def _ema_step(self, h, counts, sums, weight):
        """cluster_size / embed_avg of codebook h move towards this step's (plus pending) statistics
        at rate (1 - decay) * weight."""
        if callable(weight):  # of this step's statistics, before the pending ones join (as theirs)
            weight = weight(sums.unsqueeze(0), counts.unsqueeze(0))
        if h in self._pending:
            pending_counts, pending_sums = self._pending.pop(h)
            counts, sums = counts + pending_counts, sums + pending_sums
        rate = 1.0 - self.decay
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=counts.dtype, device=counts.device)
            if weight.dim() == 2:
                weight = weight[h] if weight.shape[0] == self.num_codebooks else weight[0]
            if weight.shape != (self.codebook_size,):
                raise ValueError(f"vqkernels.nn: ema_update_weight must be [codebook_size={self.codebook_size}] or "
                                 f"[codebooks, codebook_size], got shape {tuple(weight.shape)}")
            rate = rate * weight
        self.cluster_size[h].lerp_(counts, rate)
        self.embed_avg[h].lerp_(sums, rate.unsqueeze(-1) if torch.is_tensor(rate) else rate)

    def _codes_from_statistics(self, h):
        """Codebook h's codes from its statistics, Laplace-smoothed (the EMA kernel at decay 1 with no rows)."""
        target = torch.empty_like(self.embed_avg[h])
        ops.ema_update_(target, self.cluster_size[h], self.embed_avg[h], target.new_empty(0, self.dim),
                        torch.empty(0, dtype=torch.int64, device=target.device), 1.0, self.eps)
        return target

    @torch.no_grad()
    @float32_statistics
    def update_ema(self):
        """Recomputes every codebook from its EMA statistics (``manual_ema_update``'s explicit step)."""
        for h in range(self.num_codebooks):
            codes = self._codes_from_statistics(h)
            self._set_codes(h, F.normalize(codes, dim=-1, eps=COSINE_EPS) if self.use_cosine_sim else codes)

    def _restart_dead_codes(self, h, rows, codes, valid=None):
        """Codes whose EMA count fell below ``threshold_ema_dead_code`` take distinct random rows of
        the batch (the ``valid`` ones), their statistics restarting at the threshold; when fewer rows
        than dead codes, a random subset of the dead codes restarts and the rest wait (as
        vector-quantize-pytorch). Drawn on the device, nothing read back. Returns codebook h's new codes."""
        rows = self.transform_input(rows)
        dead = self.cluster_size[h] < self.threshold_ema_dead_code
        valid = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device) if valid is None else valid
        m, k = rows.shape[0], self.codebook_size
        # random permutations (randperm: the same draws eagerly and under torch.compile) as sort keys
        row_keys = torch.randperm(m, device=rows.device).masked_fill(~valid, m)
        code_keys = torch.randperm(k, device=rows.device).masked_fill(~dead, k)
        if self.sync_samples:
            row_keys, code_keys = _dist.broadcast_from_rank0(row_keys), _dist.broadcast_from_rank0(code_keys)
        order = row_keys.argsort()  # the valid rows first, in random order
        rank = code_keys.argsort().argsort()  # the dead codes first, in random order
        dead = dead & (rank < valid.sum())
        sampled = rows[order[rank.clamp(max=m - 1)]]
        reset = float(self.threshold_ema_dead_code)
        self.cluster_size[h].copy_(torch.where(dead, torch.full_like(self.cluster_size[h], reset),
                                               self.cluster_size[h]))
        self.embed_avg[h].copy_(torch.where(dead.unsqueeze(1), sampled * reset, self.embed_avg[h]))
        return torch.where(dead.unsqueeze(1), sampled, codes)

    def _set_codes(self, h, codes):
        """Installs new codes for codebook h. A buffer codebook is replaced by a new tensor, never
        written in place: the step's backward still holds the old one (in eager mode, and under
        torch.compile, whose partitioner may re-read that input in the backward). A learned
        codebook (a Parameter) is written in place; its layer hands the ops a copy. ``codes`` must be a
        tensor the update computed, which nothing else holds (never a view of a buffer): a single
        codebook takes it as it is (a copy of [K, D] cost about 80 us at 1024 x 128, per level and step)."""
        codes = codes.to(self.embed.dtype)
        if isinstance(self.embed, nn.Parameter):
            self.embed[h].copy_(codes)
        elif self.embed.shape[0] == 1:
            self.embed = codes.unsqueeze(0)
        else:
            self.embed = torch.cat([self.embed[:h], codes.unsqueeze(0), self.embed[h + 1:]])
