"""The learned map from a backbone's native features into the label-embedding space.

:class:`NativeProjection` is the first piece of the SigRL heads (``backend/model/sigrl.py``):
it reads the backbone's native features (pooled ``[N]``, per location ``[P, N]``) through a fixed
standardisation and principal basis (:class:`FeatureNorm`, fitted once on training features)
and adds a learned, zero-initialised residual to the text-aligned features. Training applies
the fixed part once to its whole batch (:class:`ReducedImages`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import EncodedImages


class FeatureNorm(nn.Module):
    """Per-dimension standardisation with fixed statistics (set once from training data)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NativeProjection(nn.Module):
    """The learned map from a backbone's native features into the label-embedding space,
    residual on the text-aligned features it starts from:

    ``x' = normalise(x + W z + MLP(z))``, ``z = B^T std(n)``,

    with ``x [.., D]`` the aligned feature, ``n [.., N]`` the native one, ``std`` a fixed
    standardisation, ``B [N, r]`` a fixed orthonormal basis of the top-``r`` principal
    directions of the standardised training features (identity when ``rank`` is 0, or not
    fitted), ``W [D, r]`` and the MLP's last layer zero at first — so a fresh projection returns
    ``x`` and the heads start as the zero-shot model. ``W`` alone makes the heads at least a
    linear probe on the native features (its rows for label c are ``ĥ_c^T W``).
    """

    def __init__(self, native_dim: int, dim: int, *, hidden: int, dropout: float, rank: int):
        super().__init__()
        self.norm = FeatureNorm(native_dim)
        self.rank = int(rank) if 0 < rank < native_dim else 0
        width = self.rank or native_dim
        if self.rank:
            self.register_buffer("basis", torch.eye(native_dim)[:, : self.rank].clone())
        self.width = width
        self.linear = nn.Linear(width, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.hidden = hidden
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    @torch.no_grad()
    def fit(self, native: torch.Tensor, max_rows: int) -> None:
        """Standardisation statistics (and the principal basis) of training features."""
        flat = native.reshape(-1, native.shape[-1]).float()
        if flat.shape[0] > max_rows:
            flat = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]]
        self.norm.fit(flat)
        if self.rank:
            z = self.norm(flat)
            z = z - z.mean(0)
            # top-r eigenvectors of the covariance of the standardised features (the
            # principal directions; an N × N eigenproblem, cheaper than an SVD of z)
            _, vectors = torch.linalg.eigh(z.T @ z / max(1, z.shape[0] - 1))
            self.basis.copy_(vectors[:, -self.rank :].flip(1))

    def reduced(self, native: torch.Tensor) -> torch.Tensor:
        """``z [.., width]``: the standardised native features in the projection's basis."""
        z = self.norm(native)
        return z @ self.basis if self.rank else z

    def forward(self, aligned: torch.Tensor, native: torch.Tensor,
                is_reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected features ``[.., D]``, L2-normalised; the reduced native input ``z``).
        ``is_reduced``: ``native`` is already :meth:`reduced` (``[.., width]``)."""
        z = native if is_reduced else self.reduced(native)
        delta = self.linear(z)
        if self.hidden > 0:
            delta = delta + self.mlp(z)
        return F.normalize(aligned + delta, dim=-1), z


class ReducedImages(EncodedImages):
    """Image features whose native parts went through the fixed part of the projections
    (:meth:`NativeProjection.reduced`: standardisation and principal basis): ``native_global
    [B, r_g]``, ``native_local [B, P, r_l]``. The fixed part does not change while the heads
    train, so training reduces its features once (:meth:`SigRL.reduce_native`) instead of in
    every step: for the packaged backbone the per-location 1280 → 128 reduction was most of a
    step's cost, and the reduced batch is a tenth of the memory."""
