"""Order statistics of score vectors, batched over ``B``, bit-compatible with NumPy.

Several official codes move scores to NumPy for a percentile (LLaVA-PruMerge's IQR outlier rule). These functions
reproduce ``np.percentile``'s default ``"linear"`` method (Hyndman & Fan type 7) in torch, in the same float
arithmetic: the interpolation runs in the data's dtype (float32 for float32/fp16/bf16 inputs, as NumPy on a float32
array with a Python-scalar ``q``), so thresholds match bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["iqr_outlier_fraction", "percentile"]


def _as_stats_dtype(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def percentile(x: Tensor, q: float, mask: Tensor | None = None) -> Tensor:
    """``np.percentile(x[b][mask[b]], q)`` for every row: ``x [B, N]`` -> ``[B]``.

    Linear interpolation between the two order statistics around the virtual index ``(n - 1) * q / 100`` (computed
    in float64), with NumPy's lerp: ``a + (b - a) * g`` for ``g < 0.5`` and ``b - (b - a) * (1 - g)`` otherwise,
    evaluated in the values' dtype. ``mask [B, N]`` (True = use) allows a different count per row; every row needs
    one value. Half-precision inputs are upcast to float32 first (as ``.float().numpy()``).
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape [B, N], got {tuple(x.shape)}")
    if not 0.0 <= float(q) <= 100.0:
        raise ValueError(f"q must be a percentage in [0, 100], got {q!r}")
    x = _as_stats_dtype(x)
    if mask is None:
        n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        s = x.sort(dim=-1).values
    else:
        n = mask.sum(-1)
        s = x.masked_fill(~mask, float("inf")).sort(dim=-1).values
    vi = (n - 1).double() * (float(q) / 100.0)
    lo = vi.floor()
    gamma = vi - lo
    last = (n - 1)[:, None]
    lo_i = lo.long()[:, None].clamp(min=0).minimum(last)
    hi_i = (lo_i + 1).minimum(last)
    a = s.gather(1, lo_i).squeeze(1)
    b = s.gather(1, hi_i).squeeze(1)
    diff = b - a
    low = a + diff * gamma.to(x.dtype)
    high = b - diff * (1.0 - gamma).to(x.dtype)
    return torch.where(gamma >= 0.5, high, low)


def iqr_outlier_fraction(x: Tensor, mask: Tensor | None = None, *, whisker: float = 1.5,
                         pooled: bool = False) -> tuple[Tensor, Tensor]:
    """Tukey's upper-fence outliers: values above ``Q3 + whisker * (Q3 - Q1)``, per row of ``x [B, N]``.

    Quartiles are :func:`percentile` (NumPy-linear) over the row's valid values (``mask [B, N]``). With
    ``pooled=True`` the statistic is taken once over every valid value of the batch flattened together (the
    LLaVA-PruMerge official code does this; it makes a sample's result depend on its batch) and each row gets the
    batch totals.

    Returns ``(count [B] long, fraction [B] float64)`` with ``fraction = count / n`` (the pooled count over the pooled
    size when ``pooled``), computed in float64 as Python's ``len(...) / len(...)``.
    """
    x = _as_stats_dtype(x)
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    if pooled:
        flat = x.reshape(1, -1)
        fmask = valid.reshape(1, -1)
        count, fraction = iqr_outlier_fraction(flat, fmask, whisker=whisker, pooled=False)
        b = x.shape[0]
        return count.expand(b).clone(), fraction.expand(b).clone()
    q1 = percentile(x, 25.0, valid)
    q3 = percentile(x, 75.0, valid)
    fence = q3 + (q3 - q1) * torch.tensor(whisker, dtype=x.dtype, device=x.device)
    count = ((x > fence[:, None]) & valid).sum(-1)
    return count, count.double() / valid.sum(-1).double()
