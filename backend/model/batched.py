"""Running a model over many images: in batches, on a device, outputs back on the CPU.

The one batched forward of the heads: serving (:meth:`SigRLPredictor.scores
<backend.model.serving.SigRLPredictor.scores>`), training (validation logits, calibration,
shrinkage, the zero-shot targets) and the benchmarks all score features through
:func:`in_batches`, so a batch size or a device is chosen in one place.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from ..features import EncodedImages

Output = Union[torch.Tensor, Sequence[torch.Tensor]]


def in_batches(
    fn: Callable[[EncodedImages, torch.Tensor | None], Output],
    features: EncodedImages,
    batch_size: int,
    device: str | torch.device | None = None,
    *,
    rows: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    empty: Output | None = None,
) -> Output:
    """``fn(part, known_part)`` over every image of ``features`` (only the images ``rows``
    when given, in that order), ``batch_size`` images at a time.

    ``part``: an :class:`~backend.features.EncodedImages` of up to ``batch_size`` images on
    ``device`` (left where it is when None); ``known_part``: the matching rows of ``known
    [N, C]`` (aligned with ``rows`` when given) on that device, or None. ``fn`` returns a
    tensor ``[b, ...]`` or a tuple of them; the result is that tensor (tuple) of all the
    images, float32 on the CPU, or ``empty`` when there is no image. The caller chooses the
    autograd mode (``torch.no_grad`` / ``torch.inference_mode``)."""
    n = len(rows) if rows is not None else len(features)
    outputs = []
    for start in range(0, n, batch_size):
        if rows is not None:
            part = features[rows[start : start + batch_size].to(features.global_.device)]
        else:
            part = features[start : start + batch_size]
        k = known[start : start + batch_size] if known is not None else None
        if device is not None:
            part = part.to(device)
            k = k.to(device) if k is not None else None
        out = fn(part, k)
        if isinstance(out, torch.Tensor):
            outputs.append(out.float().cpu())
        else:
            outputs.append(tuple(o.float().cpu() for o in out))
    if not outputs:
        return empty
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(torch.cat(parts) for parts in zip(*outputs))
