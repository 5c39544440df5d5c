"""GMC — graph-based multi-label correlation (SigRL), over label text embeddings.

Nodes are the labels, carrying their text embeddings ``H [C, D]``. Edges join all pairs (a
label without any annotated example still joins, through text similarity), up to
``max_neighbours`` strongest sources per label so memory stays bounded for large label sets.
An edge ``j → i`` (label i gathers from label j) carries three attributes:

1. the blended weight ``w_ij = (1 − λ)·A_ij + λ·T_ij``, where ``A`` is the ML-GCN matrix built
   from the conditional probability ``P(j | i) = M_ij / N_i`` of the *observed* positives —
   binarised at τ and re-weighted with p (``A_ij = p / Σ_k B_ik`` for kept edges,
   ``A_ii = 1 − p``) — and ``T`` the same re-weighting of the positive text similarities;
2. the raw ``P(j | i)``;
3. the text cosine similarity ``cos(h_i, h_j)``.

Two GATv2 layers (torch_geometric ``GATv2Conv`` with ``edge_attr``): heads × hidden → ELU →
dropout → one head back to D. The output is a gated residual ``Ĥ = normalise(H + α·GAT(H))``
with ``α`` initialised to 0, so an untrained GMC returns the text embeddings unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LabelGraph:
    """The label graph of one label list: edges, their attributes, the pair statistics
    (``cond[j, c] = P(c | j)``, ``npmi``, the raw counts the known-label term uses) and which
    labels had annotations."""

    edge_index: torch.Tensor  # [2, E] (source j, target i)
    edge_attr: torch.Tensor  # [E, 3]
    cond: torch.Tensor  # [C, C]
    npmi: torch.Tensor  # [C, C]
    weights: torch.Tensor  # [C, C] blended weight w_ij (for reports/figures)
    pairs: torch.Tensor | None = None  # [C, C] M_ij (N_i on the diagonal)
    counts: torch.Tensor | None = None  # [C] N_i
    n_images: torch.Tensor | None = None  # scalar
    seen: torch.Tensor | None = None  # [C] bool: label has training annotations

    def to(self, device) -> "LabelGraph":
        return LabelGraph(*(t.to(device) if t is not None else None for t in (
            self.edge_index, self.edge_attr, self.cond, self.npmi, self.weights, self.pairs, self.counts,
            self.n_images, self.seen)))


def _reweight(binary: torch.Tensor, p: float) -> torch.Tensor:
    """ML-GCN re-weighting of a 0/1 (or non-negative) off-diagonal matrix."""
    C = binary.shape[0]
    off = binary.clone()
    off.fill_diagonal_(0.0)
    rows = off.sum(1, keepdim=True)
    has = rows > 0
    out = torch.where(has, p * off / rows.clamp(min=1e-12), torch.zeros_like(off))
    diag = torch.where(has.squeeze(1), torch.full((C,), 1.0 - p), torch.ones(C))
    out[range(C), range(C)] = diag
    return out


def build_label_graph(
    embeddings: torch.Tensor,
    cond: torch.Tensor,
    npmi: torch.Tensor,
    *,
    tau: float,
    p: float,
    text_blend: float,
    max_neighbours: int,
) -> LabelGraph:
    """The graph for labels with text embeddings ``[C, D]`` and ``cond[i, j] = P(j | i)``."""
    embeddings = embeddings.detach().float().cpu()
    cond = cond.float().cpu()
    C = embeddings.shape[0]
    text = embeddings @ embeddings.T
    A = _reweight((cond >= tau).float() * (cond > 0).float(), p)
    T = _reweight(text.clamp(min=0.0), p)
    W = (1.0 - text_blend) * A + text_blend * T
    # Sources kept per target i: itself plus the max_neighbours strongest others (ties by
    # text similarity, so the choice is deterministic and sensible for unseen labels).
    rank_key = W + 1e-6 * text
    rank_key.fill_diagonal_(float("inf"))
    k = min(C, max_neighbours + 1)
    sources = rank_key.topk(k, dim=1).indices  # [C, k]
    targets = torch.arange(C)[:, None].expand(C, k)
    src, dst = sources.reshape(-1), targets.reshape(-1)
    edge_index = torch.stack([src, dst])
    edge_attr = torch.stack([W[dst, src], cond[dst, src], text[dst, src]], dim=1)
    return LabelGraph(edge_index, edge_attr, cond, npmi.float().cpu(), W)


class GMC(nn.Module):
    def __init__(self, dim: int, *, hidden: int, heads: int, dropout: float):
        super().__init__()
        from torch_geometric.nn import GATv2Conv

        self.conv1 = GATv2Conv(
            dim, hidden, heads=heads, concat=True, dropout=dropout, edge_dim=3, add_self_loops=False
        )
        self.conv2 = GATv2Conv(
            hidden * heads, dim, heads=1, concat=False, dropout=dropout, edge_dim=3, add_self_loops=False
        )
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, embeddings: torch.Tensor, graph: LabelGraph) -> torch.Tensor:
        """``Ĥ [C, D]``, L2-normalised."""
        x = self.dropout(embeddings)
        x = F.elu(self.conv1(x, graph.edge_index, graph.edge_attr))
        x = self.dropout(x)
        x = self.conv2(x, graph.edge_index, graph.edge_attr)
        return F.normalize(embeddings + self.gate * x, dim=-1)
