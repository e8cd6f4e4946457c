"""Machinery for families whose images have several views (tiles / crops), each encoded by the tower on its own.

Used by InternVL, Idefics3 / SmolVLM (through :class:`MultiViewAdapter`), LLaVA-OneVision and, for the pieces that
are not view-specific (:func:`stack_reductions`, :func:`fold_rows`), LLaVA-NeXT and Qwen2-VL.

* **Per-view keep.** ``keep`` stays per image and is split over its views; two documented rules:
  :func:`split_even` (InternVL, Idefics3: ``k // V`` each, one more to the first ``k % V`` views) and
  :func:`split_proportional` (LLaVA-OneVision: in proportion to each view's tokens, largest remainder). A ratio
  applies to every view unchanged. LLaVA-NeXT splits with :func:`vtoken.ops.crops.apportion` (its own rule, see
  :mod:`vtoken.models.llava_next`).
* **Running.** :func:`reduce_views` runs a method pipeline on the views, one :func:`~vtoken.models.pipeline.run_steps`
  per group of views with the same counts; a view whose count is 0 keeps nothing.
* **Folding.** :func:`fold_views` turns the per-view reduction ``[R, K]`` into one row per image, view ``v``'s token
  ``i`` at ``v * n + i``; ``extras["views"]`` keeps the per-view reduction, ``extras["view_image"]`` /
  ``extras["view_position"]`` place its rows.
* **Pixel shuffle.** :func:`block_mean` averages per-patch signals over the ``s x s`` block of patches that one
  shuffled token holds (InternVL, Idefics3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..core import Reduction, gather_rows, reduction_from_indices
from .base import ClsTowerAdapter, Images
from .pipeline import Step, fold_rows, run_steps, stack_reductions

# ---------------------------------------------------------------------------------------------------------------
# pixel-shuffle grids
# ---------------------------------------------------------------------------------------------------------------


def block_mean(x: Tensor, side: int, scale: int, dim: int = 1) -> Tensor:
    """Average the ``scale x scale`` blocks of a raster ``side x side`` token axis.

    ``x`` has ``side ** 2`` entries at ``dim`` (row-major patches); the result has ``(side // scale) ** 2`` entries
    there, block ``(i, j)`` (patch rows ``i*s .. i*s+s-1``, cols ``j*s .. j*s+s-1``) at ``i * (side // scale) + j``:
    the layout of the pixel shuffle of InternVL and Idefics3.
    """
    g = side // scale
    x = x.movedim(dim, -1)
    lead = x.shape[:-1]
    out = x.reshape(*lead, g, scale, g, scale).mean(dim=(-3, -1)).reshape(*lead, g * g)
    return out.movedim(-1, dim)


# ---------------------------------------------------------------------------------------------------------------
# keep split over views
# ---------------------------------------------------------------------------------------------------------------


def split_even(keep: Any, views: Tensor, position: Tensor) -> Tensor | None:
    """Per-view counts ``[R]`` of an ``int`` per-image ``keep`` over ``views [R]`` views (``position [R]``: index of
    the view in its image): ``k // V``, plus one for the first ``k % V`` views in prompt order (so an image keeps
    exactly ``k``; with ``k < V`` the last views get 0 and are dropped whole). ``None`` for a ratio (applied to every
    view)."""
    if isinstance(keep, Tensor) and keep.numel() == 1:
        keep = keep.item()
    if isinstance(keep, bool) or not isinstance(keep, int):
        return None
    return keep // views + (position < keep % views).long()


def split_proportional(keep: int, weight: Tensor, image: Tensor, n_images: int) -> Tensor:
    """Per-view counts ``[R]`` of an ``int`` per-image ``keep`` in proportion to ``weight [R]`` (each view's tokens;
    ``image [R]`` its image, non-decreasing): largest remainder in exact integer arithmetic, ties to the earlier view;
    an image's counts sum to ``min(keep, its total weight)``."""
    total = torch.zeros(n_images, dtype=torch.long, device=weight.device).index_add_(0, image, weight)
    k = total.clamp(max=keep)
    num = k[image] * weight
    den = total[image].clamp(min=1)
    base, rem = num // den, num % den
    extra = k - torch.zeros_like(k).index_add_(0, image, base)
    order = torch.sort(-rem, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]  # by image, then remainder desc, then view order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    per_image = torch.bincount(image, minlength=n_images)
    rank = rank - (per_image.cumsum(0) - per_image)[image]  # rank within the image
    return base + (rank < extra[image]).long()


# ---------------------------------------------------------------------------------------------------------------
# stacking and folding reductions
# ---------------------------------------------------------------------------------------------------------------


def fold_views(red: Reduction, image: Tensor, position: Tensor, n_images: int, n: int) -> Reduction:
    """Per-view reduction ``[R, K]`` (indices into each view's ``n`` tokens) -> one row per image ``[I, K']``.

    ``image [R]`` (non-decreasing) and ``position [R]`` place each view; an image's outputs are its views' outputs in
    view order, view ``v``'s index ``i`` becoming ``v * n + i``. ``assign`` (``[I, V_max * n]``) and ``sizes`` follow.
    """
    src = position[:, None] * n + torch.arange(n, device=position.device)[None, :]
    extras = {"steps": red.extras.get("steps", []), "views": red, "view_image": image, "view_position": position}
    return fold_rows(red, image, src, n_images, (int(position.max()) + 1) * n, extras)


def reduce_views(steps: Sequence[Step], shares: Sequence[Tensor | None], views: Images, signals: dict[str, Any],
                 exact: Tensor | None = None) -> Reduction:
    """Run ``steps`` on every view (``views.tokens [R, n, C]``, optional ``views.mask [R, n]``) -> a per-view
    :class:`Reduction` ``[R, K]``.

    Step ``i`` keeps ``shares[i][r]`` tokens of view ``r`` (``[R]`` counts, e.g. :func:`split_even`), or its own
    ``keep`` where ``shares[i]`` is ``None`` (a ratio, applied to every view). Views with the same counts run in one
    :func:`~vtoken.models.pipeline.run_steps` (a handful of groups); a view whose count is 0 in some step, or that has
    no valid token, keeps nothing. Signals with a leading dim ``R`` are cut to a group's rows; ``exact [R, n, D]``
    (optional) is the model's own LLM-space value of each view token (``run_steps``' ``exact``).
    """
    r = views.columns.shape[0]
    if not steps:  # only llm-stage methods: every view token, in the LLM space
        own = None if exact is None else (lambda index, valid: gather_rows(exact, index, valid))
        red = run_steps([], views.tokens, signals, views.project, views.space, mask=views.mask, exact=own)
        return red if bool(red.mask.all()) else reduction_from_indices(red.tokens, red.indices)  # valid tokens first
    table = torch.stack([s if s is not None else torch.full_like(views.sample, -1) for s in shares], dim=1)
    run = (table != 0).all(1)
    if views.mask is not None:
        run &= views.mask.any(1)
    keys, group = torch.unique(table, dim=0, return_inverse=True)
    parts: list[tuple[Tensor, Reduction | None]] = []
    for g in range(keys.shape[0]):  # one run per distinct split (a handful: views per image x remainder)
        rows = ((group == g) & run).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        group_steps = [step if share is None else replace(step, keep=int(keys[g, i]))
                       for i, (step, share) in enumerate(zip(steps, shares, strict=True))]
        sig = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == r else v
               for k, v in signals.items()}
        mask = None if views.mask is None else views.mask[rows]
        own = None if exact is None else (lambda index, valid, ex=exact[rows]: gather_rows(ex, index, valid))
        parts.append((rows, run_steps(group_steps, views.tokens[rows], sig, views.project, views.space, mask=mask,
                                      exact=own)))
    if len(parts) == 1 and bool(run.all()):
        return parts[0][1]
    return stack_reductions(parts, r)


# ---------------------------------------------------------------------------------------------------------------
# views in the prompt
# ---------------------------------------------------------------------------------------------------------------


def group_views(views: Images, image: Tensor) -> Images:
    """Per-view :class:`Images` (``R`` rows of ``n`` tokens) and ``image [R]`` (non-decreasing image index of each view)
    -> :class:`Images` with one row per image (its views concatenated, padded), holding the views in ``extra``.
    Returns ``views`` itself when every image has a single view."""
    r, n = views.columns.shape
    n_images = int(image.max()) + 1 if r else 0
    if n_images == r:
        return views
    dev = views.columns.device
    per_image = torch.bincount(image, minlength=n_images)
    first = per_image.cumsum(0) - per_image
    position = torch.arange(r, device=dev) - first[image]
    v_max = int(per_image.max())
    tokens = views.tokens.new_zeros(n_images, v_max, n, views.tokens.shape[-1])
    tokens[image, position] = views.tokens
    columns = torch.full((n_images, v_max, n), -1, dtype=torch.long, device=dev)
    columns[image, position] = views.columns
    sample = views.sample[first]
    mask = (torch.arange(v_max, device=dev)[None, :] < per_image[:, None])[:, :, None].expand(-1, -1, n)
    extra = {"views": views, "view_image": image, "view_position": position, "view_count": per_image[image]}
    return Images(tokens.reshape(n_images, v_max * n, -1), columns.reshape(n_images, -1), sample, None,
                  views.project, views.space, mask.reshape(n_images, -1), extra)


def placeholder_views(mask: Tensor, n: int, family: str) -> tuple[Tensor, Tensor, Tensor]:
    """Split the placeholder positions ``mask [B, L]`` into views of ``n`` tokens (row-major, the order in which the
    model scatters features): ``columns [R, n]``, ``sample [R]`` and ``run_start [R]`` (True where a view opens a
    maximal run of placeholders)."""
    total = int(mask.sum())
    if total % n:
        raise ValueError(f"{family} adapter: the prompt has {total} image tokens, not a multiple of {n} per view")
    rows, cols = mask.nonzero(as_tuple=True)
    rows, cols = rows.reshape(-1, n), cols.reshape(-1, n)
    if not bool((rows == rows[:, :1]).all()):
        raise ValueError(f"{family} adapter: a sample's image tokens are not a multiple of {n} tokens per view")
    first = cols[:, 0]
    prev = torch.where(first > 0, mask[rows[:, 0], (first - 1).clamp(min=0)], torch.zeros_like(first, dtype=torch.bool))
    return cols, rows[:, 0], ~prev


# ---------------------------------------------------------------------------------------------------------------
# the adapter base of the pixel-shuffle, multi-view families
# ---------------------------------------------------------------------------------------------------------------

class MultiViewAdapter(ClsTowerAdapter):
    """Families whose images may have several views (tiles), each encoded by the tower on its own (``encode`` returns
    :func:`group_views`' images): signals are computed per view, methods run per view with the per-image ``keep``
    split evenly over the views (:func:`split_even`), and the result is folded back to one row per image
    (:func:`fold_views`)."""

    @property
    def select_layer(self) -> int:  # type: ignore[override]
        """LLaVA's select layer ``-2`` in a spec marked ``feature_layer`` is the layer this family's projector reads."""
        return self.default_layer

    def collect_signals(self, images: Images, kw: dict[str, Any]) -> dict[str, Any]:
        return super().collect_signals(images.extra.get("views", images), kw)

    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        views = images.extra.get("views")
        if views is None:
            return super().reduce_images(images, signals)
        image, position, count = images.extra["view_image"], images.extra["view_position"], images.extra["view_count"]
        shares = [split_even(step.keep, count, position) for step in self.steps]
        red = reduce_views(self.steps, shares, views, signals)
        return fold_views(red, image, position, images.columns.shape[0], views.columns.shape[1])
