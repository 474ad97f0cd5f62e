"""VAR's next-scale prediction transformer (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable
Image Generation via Next-Scale Prediction"), FoundationVision/VAR ``models/var.py`` (``VAR``),
``models/basic_var.py`` (``SelfAttention``, ``FFN``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead``) and
``models/helpers.py`` (``DropPath``, ``sample_with_top_k_top_p_``): the generator of the ``var_vqvae``
tokenizer's multi-scale codes (system ``var``).

The sequence is every scale's token map, small to large (sides ``patch_nums``, the tokenizer's
``v_patch_nums``; ``L = sum(pn ** 2)`` positions, the tokenizer's ``encode`` order). Scale 0's input is the
start token ``class_emb(label) + pos_start``; scale k > 0's input is ``word_embed`` of the running f_hat
of scales < k area-downsampled to scale k's side (the quantizer's ``idxBl_to_var_input`` in training,
``get_next_autoregressive_input`` when sampling); every position adds ``lvl_embed(its scale) +
pos_1LC``. Attention is block-causal by scale (``attn_bias_for_masking``: a position sees every position
of its own and earlier scales), so each scale's tokens are predicted together from the coarser scales.
Blocks are VAR's ``AdaLNSelfAttn``: a LayerNorm without affine parameters whose scale / shift and the
residual gates come from the class embedding (``ada_lin`` = SiLU + Linear(D, 6C), or with ``shared_aln``
one ``shared_ada_lin`` for all blocks plus a per-block ``ada_gss``); attention with a fused bias-free
``mat_qkv`` plus ``q_bias`` / ``v_bias`` (the key bias a zero buffer ``zero_k_bias``), with
``attn_l2_norm`` l2-normalised queries and keys and a learned per-head logit scale ``exp(scale_mul_1H11)``
clamped at 100 (else VAR's scale ``0.25 / sqrt(head_dim)``); FFN fc1 / GELU(tanh) / fc2; stochastic depth
rising linearly to ``drop_path_rate``. The head is ``AdaLNBeforeHead`` (``head_nm``) and ``head``. The
initialisation is VAR's ``init_weights`` (truncated normals of std ``sqrt(1 / (3 C))`` for ``init_std < 0``,
``head`` times ``init_head``, the ada_lin gates times ``init_adaln_gamma`` and the rest times
``init_adaln``, ``proj`` and ``fc2`` divided by ``sqrt(2 depth)``), called at construction as
``build_vae_var`` does.

The parameter and buffer names, shapes and their order are VAR's: the ``base`` preset on the
``var_vqvae`` base tokenizer is VAR-d16 (``build_vae_var(depth=16)``: width 1024, 16 heads, 1000 classes,
``attn_l2_norm``, Cvae 32, V 4096, 10 scales; 310.3M parameters), whose state_dict (220 entries, the
persistent buffers ``lvl_1L``, ``attn_bias_for_masking`` and every ``zero_k_bias`` included) is that of
the original model built on the meta device, entry for entry in order and shape; VAR's
``demo_sample.ipynb`` loads its released ``var_d16.pth`` into that model with ``strict=True``, so the
checkpoint loads here strictly too. Built with the same seed, the original and this module start with
identical weights (the same initialisation in the same order). Checked against the original loaded with
this module's weights (by hand: the tests cannot import VAR's code): the teacher-forced logits agree to 1e-6
and ``autoregressive_infer_cfg`` draws the same tokens as :meth:`VAR.generate` under the same seed, with
guidance, top-k and top-p.

Training: VAR's loss, the cross-entropy of every position's logits against the tokenizer's code, mean
over the L positions (VAR's ``loss_weight = 1 / L``, ``label_smooth`` 0 by default); ``tail_nll`` (VAR's
``Lt``) is the last scale's. Labels are dropped to the null class ``num_classes`` with probability
``class_dropout`` (VAR's ``cond_drop_rate`` 0.1).

Sampling is VAR's ``autoregressive_infer_cfg``: one scale per step with a key / value cache
(:class:`models.sampling.KVCache`; a scale's queries attend to the cached keys of every earlier scale and
to their own), the sampled codes added into f_hat by the quantizer's ``get_next_autoregressive_input``,
which also gives the next scale's input. ``use_cache=False`` recomputes the whole prefix under the
block-causal mask at every scale (the same tokens). Classifier-free guidance runs the class and the null
class in one doubled batch, as VAR (always guided) does. VAR's ``cfg`` is our ``w - 1``: VAR mixes
``(1 + t) cond - t uncond`` with ``t = cfg * si / (num_scales - 1)``, which is :func:`models.sampling.guide`
with ``guidance_scale(w, "linear", si / (num_scales - 1))`` and ``w = 1 + cfg`` (VAR's FID setting cfg 1.5
is ``cfg=2.5, cfg_schedule="linear"`` here). Top-k / top-p are :func:`models.sampling.filter_logits`,
which keeps the same tokens as VAR's ``sample_with_top_k_top_p_`` (top-k: logits below the k-th largest
removed, ties kept; top-p: a token is kept when the probability of the tokens ranked above it is below p,
VAR's ascending cumulative sum ``> 1 - p``, up to rounding; VAR's ``top_p = 0`` is our ``top_p = 1``, off).

Deviations: a temperature (VAR has none: temperature 1) and the ``constant`` guidance schedule are ours;
``cfg=None`` runs the conditional batch alone (VAR always runs both halves); VAR's ``more_smooth`` (Gumbel
softmax visualisation, not used for its FID) and progressive training (``prog_si``) are not implemented;
label dropout happens in training only (VAR's ``forward`` also drops labels in evaluation); attention is
``F.scaled_dot_product_attention`` (VAR: flash-attn / xformers when installed, the same maths); the
sampler returns codes (VAR's returns the decoded image). The trainer's AdamW decays every parameter (VAR
exempts the position, level and ada_gss / scale_mul parameters and biases from weight decay) and its lr
schedule is a cosine (VAR: linear ``lin0``). An unconditional model (``num_classes = 0``) keeps one class
embedding row, the null class, for every sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.nn import MultiScaleVQ

from . import Preset
from .config import DataConfig, TrainConfig, check_fields
from .generator import ConditionConfig, Generator
from .sampling import KVCache, SamplingConfig, block_causal_mask, guidance_scale, guide, sample_logits, with_null_labels
from .tokenizer import StepOutput, Tokenizer


@dataclass
class VARConfig(ConditionConfig):
    """VAR's constructor arguments (its names; defaults: ``build_vae_var(depth=16)``, VAR-d16) and the
    ``init_weights`` multipliers. ``patch_nums``, Cvae and V are the tokenizer's."""
    depth: int = 16                 # blocks (build_vae_var: heads = depth, width = 64 * depth)
    embed_dim: int = 1024           # C = D, the width and the condition width
    num_heads: int = 16
    mlp_ratio: float = 4.0          # FFN hidden = round(embed_dim * mlp_ratio)
    drop_rate: float = 0.0          # dropout after attn.proj and the FFN
    attn_drop_rate: float = 0.0     # dropout of the attention weights
    drop_path_rate: float = 0.0     # stochastic depth of the last block (linear from 0); build_vae_var: 0.1 * depth / 24
    norm_eps: float = 1e-6          # the LayerNorms' eps
    shared_aln: bool = False        # one shared_ada_lin for all blocks, plus ada_gss per block
    attn_l2_norm: bool = True       # l2-normalised q, k with a learned per-head scale (build_vae_var: True)
    init_adaln: float = 0.5         # ada_lin scale / shift rows (and head_nm's) times this
    init_adaln_gamma: float = 1e-5  # ada_lin gate rows times this (VAR-d16's training command: 1e-3)
    init_head: float = 0.02         # head weight times this (< 0: left as initialised)
    init_std: float = -1.0          # linear / embedding std (< 0: sqrt(1 / (3 C)))


def _check_config(cfg: VARConfig) -> None:
    name = type(cfg).__name__
    check_fields(cfg, at_least=dict.fromkeys(("depth", "embed_dim", "num_heads"), 1))
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"{name}: embed_dim ({cfg.embed_dim}) must be a multiple of num_heads ({cfg.num_heads})")
    if not cfg.mlp_ratio > 0:
        raise ValueError(f"{name}: mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise ValueError(f"{name}: {key} must be in [0, 1), got {getattr(cfg, key)}")
    if not cfg.norm_eps > 0:
        raise ValueError(f"{name}: norm_eps must be > 0, got {cfg.norm_eps}")


def _quantizer(tokenizer: Tokenizer) -> MultiScaleVQ:
    """The tokenizer's multi-scale quantizer (a ``var_vqvae`` tokenizer's ``quantize``)."""
    quant = getattr(tokenizer, "quantize", None)
    if not isinstance(quant, MultiScaleVQ):
        raise ValueError(f"tokenizer: VAR models a multi-scale VQ tokenizer (var_vqvae, whose quantize is a "
                         f"MultiScaleVQ), got {type(tokenizer).__name__}")
    return quant


# ---------------------------------------------------------------- VAR's blocks (models/basic_var.py)

class DropPath(nn.Module):
    """Stochastic depth (timm's, as VAR's helpers): in training each sample's branch is zeroed with
    probability ``p`` and the survivors scaled by ``1 / (1 - p)``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)


class FFN(nn.Module):
    """``fc2(GELU_tanh(fc1(x)))`` and dropout (VAR's ``FFN`` without the fused flash-attn MLP)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SelfAttention(nn.Module):
    """VAR's attention: ``mat_qkv`` without bias plus the bias ``[q_bias, zero_k_bias, v_bias]``; with
    ``attn_l2_norm`` q and k are l2-normalised, q times ``exp(min(scale_mul_1H11, log 100))`` per head and
    the softmax scale is 1, else the scale is ``0.25 / sqrt(head_dim)``. ``attn_bias``: an additive mask
    [1, 1, T, S] or None; with ``cache`` the new keys (after normalisation) and values are appended to
    layer ``layer``'s and the queries attend to all of them."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                    # [B, H, T, head_dim] each
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class AdaLNSelfAttn(nn.Module):
    """VAR's block: ``x + gamma1 * attn(LN(x) (1 + scale1) + shift1)`` then ``x + gamma2 * ffn(LN(x)
    (1 + scale2) + shift2)`` (both branches through stochastic depth), the six [B, 1, C] modulations from
    ``ada_lin(cond)`` or, with ``shared_aln``, ``ada_gss + cond`` (cond already ``shared_ada_lin``'s
    [B, 1, 6, C]). The LayerNorm has no affine parameters."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float, attn_drop: float, drop_path: float,
                 norm_eps: float, shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.C = dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(dim, heads, attn_drop, drop, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: Optional[torch.Tensor],
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        mods = self.ada_gss + cond if self.shared_aln else self.ada_lin(cond).view(-1, 1, 6, self.C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, attn_bias, cache, layer) * gamma1)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """``LN(x) (1 + scale) + shift`` with (scale, shift) from ``ada_lin(cond)`` (SiLU + Linear(D, 2C))."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):
    """``shared_aln``'s one modulation layer: Linear(D, 6C) viewed [B, 1, 6, C]."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


# ---------------------------------------------------------------- the generator

class VAR(Generator):
    """VAR over a ``var_vqvae`` tokenizer's scales (see the module docstring); ``forward_logits`` is VAR's
    teacher-forced ``forward`` without its label dropout."""

    config_cls = VARConfig

    def __init__(self, cfg: VARConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        _check_config(cfg)
        quant = _quantizer(tokenizer)
        self.patch_nums = tuple(quant.v_patch_nums)
        self.Cvae, self.V = quant.Cvae, quant.vocab_size
        self.C = self.D = cfg.embed_dim
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.depth = cfg.depth

        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, self.C)     # row num_classes: the null class
        nn.init.trunc_normal_(self.class_emb.weight, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        self.pos_1LC = nn.Parameter(torch.cat([nn.init.trunc_normal_(torch.empty(1, pn * pn, self.C), std=init_std)
                                               for pn in self.patch_nums], dim=1))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * self.C)) if cfg.shared_aln
                               else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(self.C, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop_rate, dpr[i],
                          cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm) for i in range(cfg.depth))

        # the scale of every position and the block-causal training mask (0: may attend, -inf: masked)
        device = self.pos_1LC.device
        sizes = [pn * pn for pn in self.patch_nums]
        self.register_buffer("lvl_1L", torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)]).view(1, self.L))
        allowed = block_causal_mask(sizes, "cpu")
        bias = torch.zeros(allowed.shape, device="cpu").masked_fill(~allowed, float("-inf")).view(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", bias.to(device))

        self.head_nm = AdaLNBeforeHead(self.C, self.D, cfg.norm_eps)
        self.head = nn.Linear(self.C, self.V)
        self.init_weights(cfg.init_adaln, cfg.init_adaln_gamma, cfg.init_head, cfg.init_std)

    def init_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float, init_std: float) -> None:
        """VAR's ``init_weights``: truncated-normal linear and embedding weights (std ``init_std``, or
        ``sqrt(1 / (3 C))`` when negative), zero biases; then the head, the adaLN layers and the residual
        projections scaled. ``pos_start`` / ``pos_1LC`` keep their construction init, as in VAR."""
        if init_std < 0:
            init_std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        with torch.no_grad():
            if init_head >= 0:
                self.head.weight.mul_(init_head)
                self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
                if block.shared_aln:
                    block.ada_gss[:, :, 2:].mul_(init_adaln)
                    block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
                else:
                    lin = block.ada_lin[-1]
                    lin.weight[2 * self.C:].mul_(init_adaln)
                    lin.weight[:2 * self.C].mul_(init_adaln_gamma)
                    lin.bias.zero_()

    # ---- the network
    def class_labels(self, labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """int64 [n]: the labels, or the null class ``num_classes`` for all when ``labels`` is None."""
        if labels is None:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=self.pos_1LC.device)
        return labels.long()

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: Optional[torch.Tensor],
                   cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits [B, T, V] of the inputs ``x`` [B, T, C] under the class embeddings ``cond`` [B, C]
        (VAR's block loop and ``get_logits``)."""
        cond_blocks = self.shared_ada_lin(cond)
        if attn_bias is not None:
            attn_bias = attn_bias.to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cond_blocks, attn_bias, cache, i)
        return self.head(self.head_nm(x, cond))

    def forward_logits(self, labels: torch.Tensor, x_BLCv_wo_first_l: Optional[torch.Tensor]) -> torch.Tensor:
        """VAR's teacher-forced forward: logits [B, L, V] of every scale's codes from the class ids
        ``labels`` [B] (the null class included) and ``x_BLCv_wo_first_l`` [B, L - first_l, Cvae], the
        quantizer's ``idxBl_to_var_input`` of the codes (None for a single scale)."""
        cond = self.class_emb(labels)
        x = cond[:, None].expand(-1, self.first_l, -1) + self.pos_start
        if x_BLCv_wo_first_l is not None:
            x = torch.cat([x, self.word_embed(x_BLCv_wo_first_l.to(x.dtype))], dim=1)
        x = x + self.lvl_embed(self.lvl_1L) + self.pos_1LC
        return self.run_blocks(x, cond, self.attn_bias_for_masking)

    def teacher_inputs(self, gt_BL: torch.Tensor) -> Optional[torch.Tensor]:
        """The quantizer's ``idxBl_to_var_input`` of codes [B, L] in ``encode`` order."""
        with torch.no_grad():
            ms_idx_Bl = list(gt_BL.split([pn * pn for pn in self.patch_nums], dim=1))
            return self.tokenizer.quantize.idxBl_to_var_input(ms_idx_Bl)

    # ---- training
    def training_step(self, batch: Dict, step: int) -> StepOutput:
        gt_BL = self.tokens(batch)
        labels = self.class_labels(self.labels(batch), gt_BL.shape[0])
        logits = self.forward_logits(labels, self.teacher_inputs(gt_BL))
        loss = F.cross_entropy(logits.reshape(-1, self.V), gt_BL.reshape(-1))
        last = self.patch_nums[-1] ** 2
        with torch.no_grad():
            tail = F.cross_entropy(logits[:, -last:].reshape(-1, self.V), gt_BL[:, -last:].reshape(-1))
            accuracy = (logits.argmax(-1) == gt_BL).float().mean()
        return StepOutput(loss=loss, recon=None, logs={"nll": loss.detach(), "tail_nll": tail, "accuracy": accuracy})

    # ---- sampling
    @torch.no_grad()
    def generate(self, n: int, labels: Optional[torch.Tensor], params: SamplingConfig,
                 generator: torch.Generator) -> torch.Tensor:
        """Codes [n, L] (``encode``'s order) drawn scale by scale (VAR's ``autoregressive_infer_cfg``)."""
        guided = params.cfg is not None
        labels = self.class_labels(labels, n)
        cond = self.class_emb(with_null_labels(labels, self.num_classes) if guided else labels)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x_new = cond[:, None].expand(-1, self.first_l, -1) + self.pos_start + lvl_pos[:, :self.first_l]
        quant: MultiScaleVQ = self.tokenizer.quantize
        last = self.patch_nums[-1]
        f_hat = quant.embedding.weight.new_zeros(n, self.Cvae, last, last)
        cache = KVCache(self.depth) if params.use_cache else None
        inputs: List[torch.Tensor] = []                   # every scale's input so far (the uncached path)
        out: List[torch.Tensor] = []
        num_scales, end = len(self.patch_nums), 0
        for si, pn in enumerate(self.patch_nums):
            begin, end = end, end + pn * pn
            if cache is not None:
                logits = self.run_blocks(x_new, cond, None, cache)
            else:
                inputs.append(x_new)
                mask = self.attn_bias_for_masking[:, :, :end, :end]
                logits = self.run_blocks(torch.cat(inputs, dim=1), cond, mask)[:, begin:]
            if guided:
                c, u = logits.float().chunk(2)
                logits = guide(c, u, guidance_scale(params.cfg, params.cfg_schedule, si / max(num_scales - 1, 1)))
            idx_Bl = sample_logits(logits, generator, params.temperature, params.top_k, params.top_p)
            out.append(idx_Bl)
            h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(n, self.Cvae, pn, pn)
            f_hat, next_map = quant.get_next_autoregressive_input(si, num_scales, f_hat, h_BChw)
            if si != num_scales - 1:
                nxt = self.patch_nums[si + 1] ** 2
                x_new = (self.word_embed(next_map.view(n, self.Cvae, -1).transpose(1, 2).to(cond.dtype))
                         + lvl_pos[:, end:end + nxt])
                if guided:
                    x_new = x_new.repeat(2, 1, 1)
        return torch.cat(out, dim=1)


MODELS = {"var": VAR}

PRESETS = {
    "var": {
        # digits on the var_vqvae tiny tokenizer: scales 1, 2, 4, 8 (85 tokens), V = 512, Cvae = 16. 1.3M
        # parameters, 0.33 s/step on one thread (about 4.2 minutes); class accuracy 96.4% under plain sampling
        # (lowest class, 8, 82%; seed 1: 96.6%, 88%), 100% with cfg=2.0 linear; 600 steps (3.3 minutes): 95.6%,
        # lowest 80%. The gates start at 1e-3 (VAR-d16's --alng) rather than build_vae_var's 1e-5.
        "tiny": Preset(model=VARConfig(num_classes=10, class_dropout=0.1, depth=4, embed_dim=128, num_heads=4,
                                       init_adaln_gamma=1e-3),
                       train=TrainConfig(steps=750, batch_size=32, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05,
                                         warmup_steps=50, min_lr_ratio=0.1, grad_clip=2.0),
                       data=DataConfig(name="digits", hflip=False)),
        # VAR-d16 on the var_vqvae base tokenizer (vae_ch160v4096z32): build_vae_var(depth=16) with
        # drop_path_rate 0.1 * 16 / 24, and VAR's README command for d16 (--bs=768 --ep=200 --alng=1e-3
        # --wpe=0.1): AdamW (0.9, 0.95), lr = tblr 1e-4 * 768 / 256, weight decay 0.05, grad clip 2,
        # warm-up ep / 50 = 4 epochs, 200 ImageNet epochs of 1669 steps, decay to 0.1 of the lr.
        # data.name: an ImageNet-style folder of class folders (1000 classes). Not trained here.
        "base": Preset(model=VARConfig(num_classes=1000, class_dropout=0.1, depth=16, embed_dim=1024, num_heads=16,
                                       drop_path_rate=0.1 * 16 / 24, init_adaln_gamma=1e-3),
                       train=TrainConfig(steps=333_800, batch_size=768, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                         warmup_steps=6676, min_lr_ratio=0.1, grad_clip=2.0),
                       data=DataConfig(name="imagenet/train")),
    },
}
