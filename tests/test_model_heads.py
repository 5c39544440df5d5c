"""GMC / SVFR / SigRL heads: shapes, the label graph, chunking equivalence, zero-shot start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backend.features import EncodedImages
from backend.settings import Settings, get_settings
from backend.model.cooccurrence import CooccurrenceStats
from backend.model.gmc import GMC, build_label_graph
from backend.model.sigrl import SigRL, label_graph
from backend.model.svfr import SVFR
from backend.model.zeroshot import zero_shot_logits

MODEL = Settings().model  # the heads' defaults (configs/default.yaml)
FIT_ROWS = Settings().train.projection_fit_rows

D, P, NATIVE = 32, 9, 48  # aligned width, locations, native width


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _trained_like(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter away from its (partly zero) initial value, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def test_cooccurrence_counts_by_name_and_alignment():
    stats = CooccurrenceStats.from_label_sets([["a", "b"], ["a", "b", "c"], ["a"], []])
    assert stats.n_images == 3 and stats.counts == {"a": 3, "b": 2, "c": 1}
    P = stats.conditional(["a", "b", "new"])  # P[i, j] = P(j | i)
    assert P[0, 1].item() == pytest.approx(2 / 3) and P[1, 0].item() == pytest.approx(1.0)
    assert P[2].abs().sum() == 0 and P[:, 2].abs().sum() == 0  # a label never annotated
    again = CooccurrenceStats.from_json(stats.to_json())
    assert again == stats
    npmi = stats.npmi(["a", "b", "c", "new"])
    assert npmi.shape == (4, 4) and npmi[3].abs().sum() == 0 and (npmi.abs() <= 1).all()
    with pytest.raises(ValueError):
        CooccurrenceStats.from_json({"n_images": 1, "counts": {"a": 5}, "pairs": []})


def test_ml_gcn_reweighting_and_text_edges_by_hand():
    # Three labels; P(j|i): a→b 0.8, b→a 0.5, c unseen. τ = 0.4, p = 0.2, no text blend.
    cond = torch.tensor([[0.0, 0.8, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    H = torch.eye(3)
    graph = build_label_graph(H, cond, torch.zeros(3, 3), tau=0.4, p=0.2, text_blend=0.0, max_neighbours=8)
    W = graph.weights
    assert W[0, 1].item() == pytest.approx(0.2) and W[0, 0].item() == pytest.approx(0.8)
    assert W[2, 2].item() == pytest.approx(1.0) and W[2, :2].abs().sum() == 0  # no edge from counts
    assert graph.edge_index.shape == (2, 9)  # all pairs including self loops (C ≤ max_neighbours + 1)
    # With text similarity blended in, the unseen label joins through its text neighbours.
    H2 = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]), dim=-1)
    g2 = build_label_graph(H2, cond, torch.zeros(3, 3), tau=0.4, p=0.2, text_blend=0.5, max_neighbours=8)
    assert (g2.weights[2, :2] > 0).all()
    assert g2.weights[2, 1] > g2.weights[2, 0]  # cos(c, b) = 0.96 > cos(c, a) = 0.8
    # edge attributes: (blended weight, P(j|i), cosine) of edge j → i
    src, dst = g2.edge_index
    k = ((src == 1) & (dst == 0)).nonzero().item()
    assert g2.edge_attr[k, 1].item() == pytest.approx(0.8)
    assert g2.edge_attr[k, 2].item() == pytest.approx(float(H2[0] @ H2[1]))


def test_graph_keeps_the_strongest_sources_for_large_label_sets():
    C = 50
    H = _unit(C, D)
    graph = build_label_graph(H, torch.zeros(C, C), torch.zeros(C, C), tau=0.4, p=0.2, text_blend=1.0,
                              max_neighbours=5)
    assert graph.edge_index.shape == (2, C * 6)
    dst = graph.edge_index[1]
    assert torch.equal(torch.bincount(dst, minlength=C), torch.full((C,), 6))


def test_gmc_shapes_and_identity_at_start():
    C = 7
    H = _unit(C, D)
    graph = build_label_graph(H, torch.zeros(C, C), torch.zeros(C, C), tau=0.4, p=0.2, text_blend=0.5,
                              max_neighbours=4)
    gmc = GMC(D, hidden=8, heads=4, dropout=0.3).eval()
    out = gmc(H, graph)
    assert out.shape == (C, D)
    assert torch.allclose(out, H, atol=1e-6)  # gate 0: the text embeddings unchanged
    _trained_like(gmc)
    out = gmc(H, graph)
    assert not torch.allclose(out, H, atol=1e-3)
    assert torch.allclose(out.norm(dim=-1), torch.ones(C), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_svfr_chunked_equals_unchunked_including_gradients(chunk):
    B, C = 5, 11
    g, l, U = _unit(B, D, seed=1), _unit(B, P, D, seed=2), _unit(C, D, seed=3)
    svfr = _trained_like(SVFR(D, attn_dim=8, top_k=3, global_weight=0.6, recon_temperature=10.0, chunk_size=64), seed=4)

    def run(chunk_size):
        svfr.zero_grad()
        l_ = l.clone().requires_grad_(True)
        U_ = U.clone().requires_grad_(True)
        out = svfr(g, l_, U_, target=l, chunk_size=chunk_size)
        (out.similarity.pow(2).sum() + out.reconstruction_loss).backward()
        grads = {n: p.grad.clone() for n, p in svfr.named_parameters()}
        return out, l_.grad, U_.grad, grads

    full, gl_full, gu_full, gp_full = run(C)
    part, gl_part, gu_part, gp_part = run(chunk)
    assert full.similarity.shape == (B, C)
    assert torch.allclose(full.similarity, part.similarity, atol=1e-6)
    assert torch.allclose(full.reconstruction_loss, part.reconstruction_loss, atol=1e-6)
    assert torch.allclose(gl_full, gl_part, atol=1e-6) and torch.allclose(gu_full, gu_part, atol=1e-6)
    for name in gp_full:
        assert torch.allclose(gp_full[name], gp_part[name], atol=1e-5), name


def _stats():
    return CooccurrenceStats.from_label_sets([["l0", "l1"], ["l1", "l2"], ["l0", "l1", "l3"]])


def _batch(B, seed, native=True):
    """Aligned features with (native=True) separate native features of width NATIVE."""
    g, l = _unit(B, D, seed=seed), _unit(B, P, D, seed=seed + 100)
    if not native:
        return EncodedImages.aligned_only(g, l)
    gen = torch.Generator().manual_seed(seed + 200)
    nl = torch.randn(B, P, NATIVE, generator=gen).relu()
    return EncodedImages(nl.mean(1), nl, g, l)


@pytest.mark.parametrize("native", [True, False])
def test_fresh_sigrl_is_the_zero_shot_model(native):
    """Native features of another width (packaged backbone) or none (aligned, open_clip):
    either way the fresh heads are exactly the zero-shot model, known labels included."""
    cfg = MODEL.with_changes(adapter_hidden=16, gat_hidden=8, attn_dim=8, global_weight=0.6, local_top_k=3,
                        native_local_rank=8)
    C = 6
    names = [f"l{i}" for i in range(C)]
    H, batch = _unit(C, D, seed=5), _batch(4, 6, native)
    model = SigRL(D, cfg, zero_shot_scale=14.0, zero_shot_bias=0.6, native_dim=NATIVE if native else D)
    model.fit_feature_stats(batch, FIT_ROWS)
    model.eval()
    graph = label_graph(_stats(), names, H, cfg)
    out = model(batch, H, graph)
    expected = zero_shot_logits(batch.global_, batch.local, H, global_weight=0.6, top_k=3, scale=14.0, bias=0.6)
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert torch.allclose(out.visual_logits, out.logits)
    known = torch.tensor([[1.0, 1, 0, 0, 0, 0]] * 4)
    assert torch.allclose(model(batch, H, graph, known).logits, expected, atol=1e-5)  # untrained expert: off
    # Shrinking a fresh model towards zero-shot changes nothing either.
    model.heads_weight.fill_(0.5)
    assert torch.allclose(model(batch, H, graph).logits, expected, atol=1e-5)


def test_sigrl_shapes_chunking_and_known_labels():
    cfg = MODEL.with_changes(adapter_hidden=16, gat_hidden=8, attn_dim=8, chunk_size=2)
    C = 5
    names = [f"l{i}" for i in range(C)]
    H, batch = _unit(C, D, seed=8), _batch(3, 9)
    model = _trained_like(SigRL(D, cfg, 14.0, 0.6, native_dim=NATIVE), seed=11).eval()
    model.known_active.fill_(1.0)
    graph = label_graph(_stats(), names, H, cfg)
    known = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]])
    out = model(batch, H, graph, known)
    assert out.logits.shape == out.visual_logits.shape == (3, C)
    assert out.label_embeddings.shape == (C, D)
    unchunked = model(batch, H, graph, known, chunk_size=C)
    assert torch.allclose(out.logits, unchunked.logits, atol=1e-5)
    # No known label: exactly the visual logits. Known labels move the others' logits.
    assert torch.allclose(out.logits[1], out.visual_logits[1])
    assert not torch.allclose(out.logits[0], out.visual_logits[0])
    # The known-label term, by hand from the counts (3 images: {l0,l1}, {l1,l2}, {l0,l1,l3}):
    # the co-occurrence expert u_c = b + mean_j S[j, c] + γ_cond · mean_j P(c | j)
    # + γ_lift · log mean_j P̂(c | j), with P̂(c | j) = (M_jc + P̂(c)) / (N_j + 1) and
    # P̂(c) = (N_c + 1) / (n + 2), moves the visual logit by u_c − logit P̂(c); not for l4 (no counts).
    S = model.known_matrix(out.label_embeddings, graph)
    assert torch.allclose(S.diagonal(), torch.zeros(C))
    M, N, n = graph.pairs, graph.counts, 3.0
    assert N.tolist() == [2, 3, 1, 1, 0] and M[0, 1] == 2 and M[1, 2] == 1

    def expert(M, N, n):
        cond = (M[0] / N[0] + M[1] / N[1]) / 2
        prior = (N + 1) / (n + 2)
        smooth = ((M[0] + prior) / (N[0] + 1) + (M[1] + prior) / (N[1] + 1)) / 2
        return model.cooc_bias + (S[0] + S[1]) / 2 + model.gamma_cond * cond + model.gamma_lift * torch.log(smooth)

    u = expert(M, N, n)
    assert torch.allclose(out.cooc_logits[2], u, atol=1e-5)
    prior = (N + 1) / (n + 2)
    expected = (u - torch.logit(prior)) * torch.tensor([1.0, 1, 1, 1, 0])
    assert torch.allclose(out.logits[2] - out.visual_logits[2], expected, atol=1e-5)
    # Leave-one-out in training: with the image's own labels as targets, its co-occurrences
    # are taken out of the counts (image 3 = {l0, l1, l3}, known {l0, l1}).
    y = torch.tensor([[1.0, 1, 0, 1, 0]])
    loo = model.cooc_logits(known[2:3], S, graph, targets=y)
    u2 = expert(M - torch.outer(y[0], y[0]), N - y[0], 2.0)
    off = torch.tensor([False, False, True, True, True])  # the known labels' own columns are not used
    assert torch.allclose(loo[0][off], u2[off], atol=1e-5)
    assert loo[0, 3] < u[3]  # l3's only co-occurrence was this very image
    # The co-occurrence part follows P(c | j): l1 supports l0 (P = 2/3) more than l4 (P = 0).
    assert graph.cond[1, 0] > graph.cond[1, 4] == 0


@pytest.mark.parametrize("native", [True, False])
def test_features_reduced_once_score_as_the_features_themselves(native):
    """Training reduces the native features by the projections' fixed part once; the heads
    score the reduced batch (and its sub-batches, which stay reduced) as the original one —
    known labels, SVFR's reconstruction loss and labels without annotations included."""
    from backend.model.projection import ReducedImages

    cfg = MODEL.with_changes(adapter_hidden=16, gat_hidden=8, attn_dim=8, native_local_rank=6,
                             unseen_raw_weight=0.5)
    C = 5
    names = [f"l{i}" for i in range(C)]
    H, batch = _unit(C, D, seed=30), _batch(6, 31, native=native)
    model = SigRL(D, cfg, 14.0, 0.6, native_dim=NATIVE if native else D)
    model.fit_feature_stats(batch, FIT_ROWS)
    model = _trained_like(model, seed=32).eval()
    model.known_active.fill_(1.0)
    graph = label_graph(_stats(), names, H, cfg)  # l4 has no annotations: scored as unseen
    known = torch.tensor([[1.0, 0, 0, 0, 0]] * 3 + [[0.0] * C] * 3)
    reduced = model.reduce_native(batch, Settings().scoring.batch_size)
    assert isinstance(reduced, ReducedImages) and isinstance(reduced[1:4], ReducedImages)
    assert reduced.native_local.shape == (6, P, 6)
    assert model.reduce_native(reduced, 1) is reduced
    for sub in (slice(None), slice(1, 4)):
        want, got = model(batch[sub], H, graph, known[sub]), model(reduced[sub], H, graph, known[sub])
        for a, b in ((want.logits, got.logits), (want.visual_logits, got.visual_logits),
                     (want.reconstruction_loss, got.reconstruction_loss)):
            assert torch.allclose(a, b, atol=1e-5)


def test_unseen_labels_lose_the_evidence_their_trained_neighbours_explain():
    """unseen_explain_away: an unseen label's score moves by −β Σ_j a_uj (z_j − z_j^aligned)
    over the trained labels j (a: the graph's edge weights into u, normalised); trained
    labels keep their scores; β = 0 is the plain unseen path."""
    C = 5
    names = [f"l{i}" for i in range(C)]
    H, batch = _unit(C, D, seed=50), _batch(4, 51)
    base = MODEL.with_changes(adapter_hidden=16, gat_hidden=8, attn_dim=8, native_local_rank=6,
                              unseen_explain_away=0.0)
    plain = SigRL(D, base, 14.0, 0.6, native_dim=NATIVE)
    plain.fit_feature_stats(batch, FIT_ROWS)
    plain = _trained_like(plain, seed=52).eval()
    explaining = SigRL(D, base.with_changes(unseen_explain_away=0.5), 14.0, 0.6, native_dim=NATIVE).eval()
    explaining.load_state_dict(plain.state_dict())
    graph = label_graph(_stats(), names, H, base)  # l4: no annotations
    seen = graph.seen
    assert seen.tolist() == [True, True, True, True, False]
    with torch.no_grad():
        want, got = plain(batch, H, graph).visual_logits, explaining(batch, H, graph).visual_logits
        Hh = plain.label_embeddings(H, graph)
        trained, _ = plain.visual(batch, Hh)
        aligned, _ = plain.visual(batch, Hh, adapt=False)
    assert torch.allclose(got[:, :4], want[:, :4], atol=1e-6)
    a = graph.weights[4, :4] / graph.weights[4, :4].sum()
    assert (a > 0).any()
    shift = -0.5 * ((trained - aligned)[:, :4] @ a) * plain.zs_scale / base.logit_scale  # at the output scale
    assert torch.allclose(got[:, 4] - want[:, 4], shift, atol=1e-5)
    assert not torch.allclose(got[:, 4], want[:, 4])


def test_observed_auc_is_the_mean_roc_auc_of_labels_with_both_classes():
    from sklearn.metrics import roc_auc_score

    from worker.training.fit import observed_auc

    gen = torch.Generator().manual_seed(40)
    z = torch.randn(40, 6, generator=gen).round(decimals=1)  # ties, averaged as roc_auc_score does
    y = (torch.rand(40, 6, generator=gen) < 0.3).float()
    y[:, 0], y[:, 1] = 0.0, 1.0  # no positive / no negative: skipped
    want = [roc_auc_score(y[:, c].numpy(), z[:, c].numpy()) for c in range(2, 6)]
    assert observed_auc(z, y) == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert observed_auc(z[:, :2], y[:, :2]) != observed_auc(z[:, :2], y[:, :2])  # NaN: nothing to rank


def test_every_parameter_is_label_independent():
    """No per-label rows: the same weights score 3 or 300 labels."""
    cfg = MODEL.with_changes(adapter_hidden=16, gat_hidden=8, attn_dim=8, chunk_size=64, max_neighbours=8)
    model = SigRL(D, cfg, 14.0, 0.6, native_dim=NATIVE).eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    batch = _batch(2, 12)
    for C in (3, 300):
        H = _unit(C, D, seed=C)
        graph = label_graph(CooccurrenceStats(), [f"x{i}" for i in range(C)], H, cfg)
        assert model(batch, H, graph).logits.shape == (2, C)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes


def test_a_fresh_model_serves_exactly_the_zero_shot_probabilities_on_real_photos(runtime):
    """Real packaged features (native 1280-d + text-aligned) of real photos: the untrained
    heads, served through the predictor with the identity calibration, give the zero-shot
    predictor's probabilities — without and with known labels."""
    from backend.model.checkpoint import TrainedModel
    from backend.model.serving import SigRLPredictor
    from tests.helpers.photos import PHOTOS, photo

    feats = runtime.features_for([str(photo(n)) for n in PHOTOS])
    labels = ["dog", "bicycle", "truck", "horse", "person", "kite", "giraffe", "bird"]
    space = runtime.label_space(labels)
    bb = runtime.backbone
    module = SigRL(bb.dim, MODEL, bb.zero_shot_scale, bb.zero_shot_bias, bb.native_dim)
    from backend.features import stack_all

    module.fit_feature_stats(stack_all(feats), FIT_ROWS)
    stats = CooccurrenceStats.from_label_sets([["dog", "bicycle"], ["horse", "person"], ["dog", "truck"]])
    predictor = SigRLPredictor.from_settings(TrainedModel(module, labels, stats, {"name": bb.name}), runtime.settings)
    expected = runtime.zero_shot(feats, space)
    assert torch.allclose(predictor.probabilities(feats, space), expected, atol=1e-5)
    known = [["dog"], ["horse", "person"]] + [[]] * (len(feats) - 2)
    assert torch.allclose(predictor.probabilities(feats, space, known), expected, atol=1e-5)


def test_heads_that_learnt_nothing_useful_are_shrunk_back_to_zero_shot():
    """Small projects: the blend weight of the heads against the zero-shot model they started
    from is chosen on held-out images; heads worse than zero-shot there are not served."""
    from worker.training.fit import observed_auc
    from worker.training.train import choose_heads_weight

    cfg = MODEL.with_changes(adapter_hidden=8, gat_hidden=8, attn_dim=8, native_local_rank=8)
    C, B = 6, 60
    names = [f"l{i}" for i in range(C)]
    H = _unit(C, D, seed=20)
    gen = torch.Generator().manual_seed(21)
    Y = (torch.rand(B, C, generator=gen) < 0.3).float()
    # aligned features that point at each image's labels: zero-shot ranks them well
    g = F.normalize(Y @ H + 0.3 * torch.randn(B, D, generator=gen), dim=-1)
    l = F.normalize(g[:, None, :] + 0.3 * torch.randn(B, P, D, generator=gen), dim=-1)
    nl = torch.randn(B, P, NATIVE, generator=gen).relu()
    batch = EncodedImages(nl.mean(1), nl, g, l)
    model = SigRL(D, cfg, 14.0, 0.3, native_dim=NATIVE)
    model.fit_feature_stats(batch, FIT_ROWS)
    _trained_like(model, seed=22).eval()  # "trained" on noise
    graph = label_graph(_stats(), names, H, cfg)

    def forward(b, known, targets=None):
        out = model(b, H, graph, known)
        return out.logits, None, out.visual_logits, None

    val = torch.arange(B)
    tolerance = get_settings().train.shrink_tolerance
    w, scores = choose_heads_weight(model, forward, batch, H, Y, val, [0.0, 0.5, 1.0], torch.device("cpu"),
                                   get_settings().scoring.batch_size, tolerance)
    assert scores[0.0] > scores[1.0] + tolerance and w < 1.0
    # Within the tolerance of the best, the larger weight (the heads) is kept.
    gap = scores[0.0] - scores[1.0]
    kept, _ = choose_heads_weight(model, forward, batch, H, Y, val, [0.0, 0.5, 1.0], torch.device("cpu"),
                                  get_settings().scoring.batch_size, gap + 1e-6)
    assert kept == 1.0
    served = model(batch, H, graph).logits
    assert observed_auc(served, Y) >= scores[1.0]  # what is served is at least as good as the heads
