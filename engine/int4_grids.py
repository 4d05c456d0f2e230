"""Which 4-bit grid each group of 32 weights lies on: the int4 schemes' weight encoding (torch only).

    q, steps, minimums, fraction_on_grid = quantize_int4(weight)     # W ~ minimums + q * steps per group

The default pair's weights are dequantized Q4_K_M GGUF blocks: most tensors (Q4_K) are groups of 32
weights on one step and one minimum each, which these functions recover exactly (up to the float
rounding of the step); the others (Q6_K) lie on no 4-bit grid, and `int4-mixed` keeps them int8.
"""
from __future__ import annotations

import torch

INT4_GROUP_SIZE = 32
MIN_FRACTION_ON_GRID = 0.9          # int4-mixed: a layer is 4-bit when this share of its groups lie on a grid
_ON_GRID_RESIDUAL = 0.1             # a group is on its grid when every weight is within 0.1 step of a level
_GRID_SAMPLE_ROWS = 64              # int4-mixed looks at this many rows first: a layer whose sample is
_MIN_SAMPLE_ON_GRID = 0.5           # mostly off any 4-bit grid (a Q6_K tensor) goes int8 unquantized to int4
_INT4_ROWS_PER_CHUNK = 4096         # rows quantized at a time (bounds the memory of the output layer's)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w[N, K] float -> (q[N, K] int32 in [0, 15], steps[N, K/32], minimums[N, K/32], fraction on grid).

    Per group of 32 along K, w ~ min + q * s on the min/max grid (s = (max - min) / 15); a group off
    that grid also tries the grid its weights may already lie on (s = the smallest gap between
    distinct weights, stretched to a whole number of steps <= 15 between min and max) and keeps the
    better. "On grid": every weight of the group within 0.1 step of a level. (A Q4_K group whose
    levels span 0..15 takes the first; only the others pay for a sort.)
    """
    chunks = [_quantize_int4_rows(rows) for rows in weight.split(_INT4_ROWS_PER_CHUNK)]
    q, steps, minimums = (torch.cat([c[i] for c in chunks]) for i in range(3))
    fraction_on_grid = sum(c[3] for c in chunks) / (q.numel() // INT4_GROUP_SIZE)
    return q, steps, minimums, fraction_on_grid


def _quantize_int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    n, k = weight.shape
    groups = weight.float().reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)    # [N, G, 32]
    w_min = groups.amin(dim=2, keepdim=True)
    span = groups.amax(dim=2, keepdim=True) - w_min                               # [N, G, 1]
    steps = (span / 15.0).clamp(min=1e-8)                                         # the min/max grid
    residual = _grid_residual((groups - w_min) / steps)
    off = residual[..., 0] > _ON_GRID_RESIDUAL                                    # [N, G]: look for their own grid
    if off.any():           # only these pay for the sort (a Q4_K layer's groups mostly span all 16 levels)
        ordered = groups[off].sort(dim=1).values                                  # [n_off, 32]
        off_span = ordered[:, -1:] - ordered[:, :1]
        gaps = ordered.diff(dim=1)
        gaps = torch.where(gaps > off_span * 1e-3, gaps, torch.full_like(gaps, float("inf")))
        num_steps = torch.round(off_span / gaps.amin(dim=1, keepdim=True)).clamp(1, 15)  # inf gap -> 1 step
        own_steps = (off_span / num_steps).clamp(min=1e-8)
        own_residual = _grid_residual((ordered - ordered[:, :1]) / own_steps)
        is_better = own_residual < residual[off]
        steps[off] = torch.where(is_better, own_steps, steps[off])
        residual[off] = torch.where(is_better, own_residual, residual[off])
    q = torch.clamp(torch.round((groups - w_min) / steps), 0, 15).to(torch.int32).reshape(n, k)
    num_on_grid = int((residual <= _ON_GRID_RESIDUAL).sum())
    return q, steps[..., 0], w_min[..., 0], num_on_grid


def _grid_residual(levels: torch.Tensor) -> torch.Tensor:
    """[..., 32] levels -> [..., 1]: the largest distance to a whole level (inf past level 15)."""
    rounded = torch.round(levels)
    residual = (levels - rounded).abs().amax(dim=-1, keepdim=True)
    return torch.where(rounded.amax(dim=-1, keepdim=True) <= 15, residual, float("inf"))


def may_lie_on_4bit_grids(weight: torch.Tensor) -> bool:
    """A cheap look at the first rows (int4-mixed: spares quantize_int4 on half the default pair's weights)."""
    return quantize_int4(weight.detach()[:_GRID_SAMPLE_ROWS])[3] >= _MIN_SAMPLE_ON_GRID
