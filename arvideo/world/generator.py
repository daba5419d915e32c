"""Shapes-world video generator: seeded, unbounded, random access (world-spec.md, "Objects").

Coordinates are in pixels of the 64 x 64 frame with pixel j's centre at coordinate j, so the
frame spans [-0.5, 63.5] and the wall band [r, 63 - r] keeps every object inside with the same
half-pixel margin on both sides; a rendered object's centroid in pixel indices is its centre.
The 4x supersampled grid (256 x 256) has sub-pixel i's centre at (i + 0.5) / 4 - 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import count

import numpy as np

from arvideo.errors import ConfigError
from arvideo.world.captions import OBJECT_COLOURS, ObjectSpec, SceneSpec, sample_scene_spec

FPS = 16
SIZE = 64
SUPERSAMPLE = 4
SPEED_RANGE = (0.6, 1.8)  # px / frame
_HI = SIZE - 1  # the band is [r, 63 - r]
_SUB = SIZE * SUPERSAMPLE
_SQRT3_2 = math.sqrt(3.0) / 2.0
# Output pixel of each sub-pixel: [256, 256] -> index into the flattened 64 x 64 frame.
_BLOCK = (np.arange(_SUB)[:, None] // SUPERSAMPLE) * SIZE + np.arange(_SUB)[None, :] // SUPERSAMPLE


@dataclass
class ObjectState:
    """One object's centre (x right, y down, in frame pixels) and velocity (px / frame)."""

    spec: ObjectSpec
    x: float
    y: float
    vx: float
    vy: float


def _reflect(p: float, v: float, lo: float, hi: float) -> tuple[float, float]:
    while p < lo or p > hi:  # one pass suffices for speeds below the band width
        p, v = (2 * lo - p, -v) if p < lo else (2 * hi - p, -v)
    return p, v


def step(state: ObjectState) -> ObjectState:
    """Advance one frame as the spec says: move, then mirror back into the band and flip."""
    r = state.spec.radius
    x, vx = _reflect(state.x + state.vx, state.vx, r, _HI - r)
    y, vy = _reflect(state.y + state.vy, state.vy, r, _HI - r)
    return replace(state, x=x, y=y, vx=vx, vy=vy)


def _fold(
    p0: np.ndarray, v: np.ndarray, t: int, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closed form of `step` applied t times: reflection between walls is a triangle wave of
    the unfolded coordinate, so any frame costs O(1) and frame(i) never depends on history."""
    span = hi - lo
    w = np.mod(p0 - lo + v * t, 2 * span)
    inside = w <= span
    return lo + np.where(inside, w, 2 * span - w), np.where(inside, v, -v)


def _sub_coords(lo: float, hi: float) -> tuple[int, int]:
    """Sub-pixel index range [a, b) whose centres can fall in [lo, hi] (frame units)."""
    a = math.floor(SUPERSAMPLE * (lo + 0.5) - 0.5)
    b = math.ceil(SUPERSAMPLE * (hi + 0.5) - 0.5) + 1
    return max(a, 0), min(b, _SUB)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Hard-edged inclusion of sub-pixel centres at offsets (dx, dy) from the object's centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Equilateral, pointing up (y grows down), circumradius r: inside the three edges, each at
    # distance r / 2 from the centre along its outward normal (0, 1), (+-sqrt3/2, -1/2).
    half = r / 2
    return (
        (dy <= half)
        & (_SQRT3_2 * dx - 0.5 * dy <= half)
        & (-_SQRT3_2 * dx - 0.5 * dy <= half)
    )


class World:
    """A seeded shapes-world video of unbounded length."""

    spec: SceneSpec
    seed: int

    def __init__(self, spec: SceneSpec, seed: int):
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"world seed must be a non-negative integer, got {seed!r}")
        self.spec = spec
        self.seed = int(seed)
        # A stream distinct from the one sample_world uses for the spec, so that positions are
        # not correlated with the object count and shapes drawn from the same seed.
        rng = np.random.default_rng([self.seed, 1])
        radii = np.array([o.radius for o in spec.objects], dtype=np.float64)
        x0, y0, vx0, vy0 = [], [], [], []
        for r in radii:
            x0.append(rng.uniform(r, _HI - r))
            y0.append(rng.uniform(r, _HI - r))
            speed = rng.uniform(*SPEED_RANGE)
            angle = rng.uniform(0.0, 2.0 * math.pi)
            vx0.append(speed * math.cos(angle))
            vy0.append(speed * math.sin(angle))
        self._lo = radii
        self._hi = _HI - radii
        self._x0, self._y0 = np.array(x0), np.array(y0)
        self._vx0, self._vy0 = np.array(vx0), np.array(vy0)
        # Palette index 0 is the background, k is object k (caption order, later drawn on top).
        self._lut = np.array(
            [spec.background_rgb] + [OBJECT_COLOURS[o.colour] for o in spec.objects],
            dtype=np.int64,
        )
        self._block_keys = _BLOCK * len(self._lut)

    def states(self, index: int) -> list[ObjectState]:
        """Object states at frame `index` (frame 0 shows the initial positions)."""
        index = self._check_index(index)
        x, vx = _fold(self._x0, self._vx0, index, self._lo, self._hi)
        y, vy = _fold(self._y0, self._vy0, index, self._lo, self._hi)
        return [
            ObjectState(o, float(x[k]), float(y[k]), float(vx[k]), float(vy[k]))
            for k, o in enumerate(self.spec.objects)
        ]

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` as uint8 [64, 64, 3]; any index, in any order."""
        labels = np.zeros((_SUB, _SUB), dtype=np.int64)  # [256, 256] palette index
        for k, state in enumerate(self.states(index), start=1):
            r = float(state.spec.radius)
            ya, yb = _sub_coords(state.y - r, state.y + r)
            xa, xb = _sub_coords(state.x - r, state.x + r)
            dy = ((np.arange(ya, yb) + 0.5) / SUPERSAMPLE - 0.5 - state.y)[:, None]
            dx = ((np.arange(xa, xb) + 0.5) / SUPERSAMPLE - 0.5 - state.x)[None, :]
            window = labels[ya:yb, xa:xb]
            window[_shape_mask(state.spec.shape, dx, dy, r)] = k
        # Box average as counts of each palette index per output pixel, times the palette.
        keys = (self._block_keys + labels).ravel()
        counts = np.bincount(keys, minlength=SIZE * SIZE * len(self._lut))
        rgb = counts.reshape(SIZE, SIZE, len(self._lut)) @ self._lut  # [64, 64, 3] sums of 16
        n = SUPERSAMPLE * SUPERSAMPLE
        return ((rgb + n // 2) // n).astype(np.uint8)  # rounded half up

    def frames(self, start: int = 0) -> Iterator[np.ndarray]:
        """Stream frames start, start + 1, ... forever, in O(1) memory."""
        start = self._check_index(start)
        for index in count(start):
            yield self.frame(index)

    def clip(self, start: int, num_frames: int) -> np.ndarray:
        """Frames [start, start + num_frames) as uint8 [num_frames, 64, 64, 3]."""
        start = self._check_index(start)
        if num_frames < 0:
            raise ConfigError(f"num_frames must be >= 0, got {num_frames}")
        out = np.empty((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
        for i in range(num_frames):
            out[i] = self.frame(start + i)
        return out

    @staticmethod
    def _check_index(index: int) -> int:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ConfigError(f"frame index must be a non-negative integer, got {index!r}")
        return int(index)

    def __repr__(self) -> str:
        return f"World({self.spec.caption!r}, seed={self.seed})"


def sample_world(seed: int) -> World:
    """A world whose spec is drawn with sample_scene_spec from `seed`, then World(spec, seed)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"world seed must be a non-negative integer, got {seed!r}")
    return World(sample_scene_spec(np.random.default_rng(int(seed))), int(seed))
