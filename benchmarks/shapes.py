"""Benchmark shape presets. A shape is one CARAFE call: features (N, C, H, W), kernel k, groups G,
scale s; its id reads like the tests' (N2-C256-H44-W44-k5-g1-s2).

    cares   the CARes-UNet decoder's four upsamplers at batch 4 and a 256x256 input
    fpn     an FPN level at batch 2
    misc    one odd-sized map (not a multiple of any tile size)
    target  the CPU target shape (benchmarks/carafe.py reports the targets on it)
    tiny    CI: seconds on two cores; keeps the suite from rotting
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

__all__ = ["Shape", "PRESETS", "parse_shapes"]


@dataclass(frozen=True)
class Shape:
    N: int
    C: int
    H: int
    W: int
    k: int = 5
    G: int = 1
    s: int = 2

    @property
    def id(self) -> str:
        return f"N{self.N}-C{self.C}-H{self.H}-W{self.W}-k{self.k}-g{self.G}-s{self.s}"

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H * self.s, self.W * self.s)

    def second_shape(self, fused: bool) -> tuple[int, int, int, int]:
        """masks (N, G*k*k, H*s, W*s) or, fused, logits (N, G*k*k*s*s, H, W)."""
        k2 = self.G * self.k * self.k
        if fused:
            return (self.N, k2 * self.s * self.s, self.H, self.W)
        return (self.N, k2, self.H * self.s, self.W * self.s)

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, list[Shape]] = {
    "cares": [Shape(4, 1024, 16, 16), Shape(4, 512, 32, 32), Shape(4, 256, 64, 64), Shape(4, 128, 128, 128)],
    "fpn": [Shape(2, 256, 128, 128)],
    "misc": [Shape(1, 256, 120, 120)],
    "target": [Shape(2, 256, 44, 44)],
    "tiny": [Shape(2, 16, 8, 8), Shape(1, 8, 5, 7, k=3, G=2, s=3)],
    # the README's table per CPU model: the decoder's compute-bound sizes and the target shape
    "per-cpu": [Shape(2, 256, 44, 44), Shape(4, 1024, 16, 16), Shape(4, 256, 64, 64), Shape(4, 128, 128, 128)],
}

_SHAPE_RE = re.compile(r"^N(\d+)-C(\d+)-H(\d+)-W(\d+)(?:-k(\d+))?(?:-g(\d+))?(?:-s(\d+))?$")


def parse_shapes(spec: str) -> list[tuple[str, Shape]]:
    """Comma-separated preset names and/or explicit ids ("N2-C256-H44-W44-k5-g1-s2"; k, g, s optional)
    -> [(preset name or "custom", Shape)], in order, without duplicates."""
    result: list[tuple[str, Shape]] = []
    seen: set[Shape] = set()
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item in PRESETS:
            shapes = [(item, shape) for shape in PRESETS[item]]
        else:
            match = _SHAPE_RE.match(item)
            if match is None:
                raise ValueError(f"unknown shape preset or id {item!r}; presets: {', '.join(PRESETS)}; "
                                 "or an id like N2-C256-H44-W44-k5-g1-s2")
            N, C, H, W, k, G, s = (int(v) if v is not None else None for v in match.groups())
            shapes = [("custom", Shape(N, C, H, W, k or 5, G or 1, s or 2))]
        for preset, shape in shapes:
            if shape not in seen:
                seen.add(shape)
                result.append((preset, shape))
    return result
