"""TEST-ONLY oracles: slow, written-out versions of the network's fast operations, to check them against."""
from __future__ import annotations

import torch


def explicit_reference(value: torch.Tensor, shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Loop version: bilinear interpolation written out by hand (pixel centres at +0.5, zeros outside)."""
    bsz, _, heads, dh = value.shape
    _, nq, _, levels, points, _ = locations.shape
    out = torch.zeros(bsz, nq, heads, dh, dtype=value.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].reshape(bsz, h, w, heads, dh)
        start += h * w
        for b in range(bsz):
            for q in range(nq):
                for m in range(heads):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = torch.floor(x), torch.floor(y)
                        acc = torch.zeros(dh, dtype=value.dtype)
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = int(x0) + dx, int(y0) + dy
                                wx = (x - x0) if dx else (1 - (x - x0))
                                wy = (y - y0) if dy else (1 - (y - y0))
                                if 0 <= xi < w and 0 <= yi < h:
                                    acc = acc + wx * wy * v[b, yi, xi, m]
                        out[b, q, m] = out[b, q, m] + weights[b, q, m, lvl, p] * acc
    return out.reshape(bsz, nq, heads * dh)
