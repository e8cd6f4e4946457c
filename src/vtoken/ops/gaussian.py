"""Gaussian-kernel similarities between tokens and centres."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def multi_scale_gaussian(x: Tensor, center: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """``sum_a exp(-||x - center||^2 / (2 a))`` over the bandwidths ``a``, in the order given.

    ``x [..., C]`` and ``center`` broadcastable to it (e.g. ``[..., 1, C]``); returns ``x.shape[:-1]``. Each kernel
    is 1 at the centre and decays with the squared Euclidean distance; the sum over several bandwidths is a
    similarity in ``(0, len(bandwidths)]``, high for tokens close to the centre.
    """
    if len(bandwidths) == 0:
        raise ValueError("bandwidths must name at least one Gaussian bandwidth")
    d2 = ((x - center) ** 2).sum(-1)
    out = torch.zeros_like(d2)
    for a in bandwidths:
        out = out + torch.exp(-d2 / (2.0 * float(a)))
    return out
