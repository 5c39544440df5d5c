"""SVFR — semantic visual feature reconstruction (SigRL), chunked over labels.

For every label c (embedding ``u_c`` from GMC) and image b:

1. *label-guided attention* over the P local features: ``q_c = W_q u_c``, ``k_p = W_k l_p``
   (or ``W_k`` of the adapter's hidden activation at p, which is cheaper),
   ``a_bpc = softmax_p(⟨k_p, q_c⟩ / √A)``; the label-specific visual feature is
   ``v_bc = Σ_p a_bpc l_p`` (the local features are already adapted; a value projection
   per location would cost B·P·D² for little);
2. *fusion* with the label embedding (FiLM-style, computed per label, not per image):
   ``f_bc = normalise(v_bc ⊙ (1 + γ(u_c)) + β(u_c))`` with ``γ``, ``β`` linear, zero at first;
3. *reconstruction* of the local feature map from the label-specific features:
   ``l̂_bp = Σ_c r_bpc f_bc / Σ_c r_bpc`` with ``r_bpc = a_bpc · exp(κ ⟨l_p, u_c⟩)`` — each
   location is explained by the labels that attend to it and match it. The auxiliary loss
   ``1 − cos(l̂_bp, l⁰_bp)`` asks the label features to explain the frozen features ``l⁰``;
   through it the adapted local features learn to carry the labels' semantics (SigRL's
   "semantic-guided" visual representation). The denominator is positive, so the cosine
   needs only the numerator;
4. *scores*: ``s_bc = w_g ⟨g_b, u_c⟩ + w_l · topk-mean_p ⟨l_bp, u_c⟩ + w_a ⟨f_bc, u_c⟩``
   (``w_g``, ``w_l`` start at the zero-shot mix, ``w_a`` at 0).

Labels are processed ``chunk_size`` at a time. Nothing of size B × P × C × D is ever built:
per chunk the attention and local scores are ``[B, P, c]`` and the label features
``[B, c, D]``; the reconstruction's numerator ``[B, P, D]``
accumulates across chunks. Chunked and unchunked results are the same up to float rounding
(tested, gradients included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .zeroshot import topk_mean


@dataclass
class SVFROutput:
    similarity: torch.Tensor  # [B, C]
    reconstruction_loss: torch.Tensor  # scalar


class SVFR(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        attn_dim: int,
        key_dim: int | None = None,
        top_k: int,
        global_weight: float,
        recon_temperature: float,
        chunk_size: int,
    ):
        super().__init__()
        self.top_k = top_k
        self.chunk_size = chunk_size
        self.kappa = recon_temperature
        self.scale = 1.0 / math.sqrt(attn_dim)
        self.query = nn.Linear(dim, attn_dim, bias=False)
        self.key = nn.Linear(key_dim or dim, attn_dim, bias=False)
        self.film = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.w_global = nn.Parameter(torch.tensor(float(global_weight)))
        self.w_local = nn.Parameter(torch.tensor(1.0 - float(global_weight)))
        self.w_attn = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        global_: torch.Tensor,
        local: torch.Tensor,
        labels: torch.Tensor,
        target: torch.Tensor | None = None,
        chunk_size: int | None = None,
        key_input: torch.Tensor | None = None,
    ) -> SVFROutput:
        """``global_ [B, D]``, ``local [B, P, D]`` (adapted, normalised), ``labels [C, D]``
        (normalised), ``target [B, P, D]``: the frozen local features to reconstruct;
        ``key_input [B, P, key_dim]``: what the keys are computed from (default ``local``)."""
        chunk = chunk_size or self.chunk_size
        B, P, D = local.shape
        keys = self.key(local if key_input is None else key_input)  # [B, P, A]
        numerator = local.new_zeros(B, P, D)
        s_global, s_local, s_attn = [], [], []
        for start in range(0, labels.shape[0], chunk):
            u = labels[start : start + chunk]  # [c, D]
            logits = torch.einsum("bpa,ca->bpc", keys, self.query(u)) * self.scale
            attn = logits.softmax(dim=1)  # over locations
            v = torch.einsum("bpc,bpd->bcd", attn, local)  # [B, c, D]
            gamma, beta = self.film(u).chunk(2, dim=-1)  # [c, D] each
            f = F.normalize(v * (1.0 + gamma) + beta, dim=-1)  # [B, c, D]
            match = torch.einsum("bpd,cd->bpc", local, u)  # [B, P, c]
            r = attn * torch.exp(self.kappa * (match - 1.0))  # ≤ 1: no overflow, any chunking
            numerator = numerator + torch.einsum("bpc,bcd->bpd", r, f)
            s_global.append(global_ @ u.T)
            s_local.append(topk_mean(match, self.top_k, dim=1))
            s_attn.append((f * u[None]).sum(-1))
        if target is None:
            target = local
        # cos(numerator / denominator, target) = cos(numerator, target): the denominator is > 0.
        target = target.detach()
        cos = (numerator * target).sum(-1) / (numerator.norm(dim=-1) * target.norm(dim=-1)).clamp(min=1e-12)
        recon_loss = (1.0 - cos).mean()
        similarity = (
            self.w_global * torch.cat(s_global, 1)
            + self.w_local * torch.cat(s_local, 1)
            + self.w_attn * torch.cat(s_attn, 1)
        )
        return SVFROutput(similarity, recon_loss)
