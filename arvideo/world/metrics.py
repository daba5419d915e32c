"""Analytic shapes-world metrics (world-spec.md, "Metrics"): no network, no download.

Every number here is the spec's, for 64 x 64 frames. Frames of another size are scored with
the pixel-count thresholds (expected areas, the 20-pixel spurious mass) scaled by H * W / 64^2
and the 3-pixel smoothness step scaled by the linear size, so an upsampled world video scores
like the original.
"""

from __future__ import annotations

import math

import numpy as np

from arvideo.errors import ArvideoError
from arvideo.world.captions import OBJECT_COLOURS, SceneSpec, parse_caption

METRICS: tuple[str, ...] = (
    "adherence",
    "spurious",
    "persistence",
    "smoothness",
    "background",
    "flicker",
)
CLASSIFY_DISTANCE = 40.0  # RGB distance beyond which a pixel is unclassified
PRESENT_BOUNDS = (0.4, 2.5)  # present(o, f) := 0.4 A <= mass <= 2.5 A
SPURIOUS_MASS = 20  # pixels of a non-caption object colour that make a frame spurious
SMOOTH_STEP = 3.0  # px a present object's centroid may move between consecutive frames
PERSISTENCE_FRACTION = 0.1  # first / last 10% of frames
PERSISTENCE_EPS = 0.01
BACKGROUND_SCALE = 40.0
_REF_SIZE = 64
_FLICKER_CHUNK = 256  # frame pairs differenced at once

WORLD_REFERENCE: dict[str, str] = {
    "adherence": "0.97 (min 0.84)",
    "spurious": "0.0",
    "persistence": "0.98 (min 0.88)",
    "smoothness": ">= 0.997",
    "background": ">= 0.998",
    "flicker": "0.99",
}


class MetricsError(ArvideoError, ValueError):
    """A video or a score table cannot be scored as given."""


def expected_area(shape: str, radius: float) -> float:
    """A(shape, r) in pixels: circle pi r^2, square 4 r^2, triangle (3 sqrt 3 / 4) r^2."""
    if shape == "circle":
        return math.pi * radius**2
    if shape == "square":
        return 4.0 * radius**2
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0 * radius**2
    raise MetricsError(f"unknown shape {shape!r}: use circle, square or triangle")


def is_present(mass: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """present(o, f) := 0.4 A <= m <= 2.5 A, for masses [..., O] against expected areas [O]."""
    return (mass >= PRESENT_BOUNDS[0] * areas) & (mass <= PRESENT_BOUNDS[1] * areas)


def object_masses(frames: np.ndarray, caption: str | SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the pixel mass of each captioned object's colour, and the objects' expected areas.

    Returns (mass [F, O] float, areas [O]) for frames uint8 [F, H, W, 3], with the areas scaled to
    the frame size as `score_video` scales them; `is_present(mass, areas)` is its present(o, f).
    """
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    frames = np.asarray(frames)
    num_frames, height, width, _ = frames.shape
    labels = _classify(frames, _palette(spec)).reshape(num_frames, -1)
    mass = np.stack([(labels == label).sum(axis=1) for label in _object_labels(spec)], axis=1)
    return mass.astype(np.float64), _expected_areas(spec, height, width)


def _palette(spec: SceneSpec) -> np.ndarray:
    """The classification palette: the caption's background (label 0), then the 8 object colours (1..8)."""
    return np.array([spec.background_rgb] + list(OBJECT_COLOURS.values()))


def _object_labels(spec: SceneSpec) -> list[int]:
    colour_names = list(OBJECT_COLOURS)
    return [1 + colour_names.index(o.colour) for o in spec.objects]


def _expected_areas(spec: SceneSpec, height: int, width: int) -> np.ndarray:
    """Each captioned object's expected area in pixels, scaled from 64 x 64 to the frame size."""
    return np.array([expected_area(o.shape, o.radius) for o in spec.objects]) * height * width / _REF_SIZE**2


def _classify(frames: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Nearest palette index per pixel, len(palette) where the distance exceeds 40: [F, H, W]."""
    # A video holds few distinct colours: classify each distinct colour once, then map back.
    key = (
        (frames[..., 0].astype(np.int32) << 16)
        | (frames[..., 1].astype(np.int32) << 8)
        | frames[..., 2].astype(np.int32)
    ).ravel()
    colours = np.unique(key)  # sorted
    rgb = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], axis=1)
    d2 = ((rgb[:, None, :] - palette[None, :, :].astype(np.int64)) ** 2).sum(axis=2)
    nearest = d2.argmin(axis=1)
    far = d2[np.arange(len(colours)), nearest] > CLASSIFY_DISTANCE**2
    colour_label = np.where(far, len(palette), nearest)
    return colour_label[np.searchsorted(colours, key)].reshape(frames.shape[:3])


def score_video(frames: np.ndarray, caption: str | SceneSpec) -> dict[str, float]:
    """Score a video uint8 [F, H, W, 3] (F >= 2) against its caption.

    Returns adherence, spurious, persistence, smoothness, background and flicker as the spec
    defines them. Smoothness is 0.0 when no object is present in two consecutive frames (no
    evidence of smooth motion); a frame with no background-classified pixel scores 0.0 on
    background; the first / last 10% of frames are the first / last max(1, F // 10).
    """
    spec = parse_caption(caption) if isinstance(caption, str) else caption
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MetricsError(
            f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}: "
            "convert with (x * 255).round().clip(0, 255).astype(np.uint8) and channels last"
        )
    num_frames, height, width, _ = frames.shape
    if num_frames < 2:
        raise MetricsError(f"scoring needs at least 2 frames (motion, flicker), got {num_frames}")
    area_scale = height * width / _REF_SIZE**2
    step_scale = math.sqrt(area_scale)

    palette = _palette(spec)
    labels = _classify(frames, palette)  # 0 background, 1..8 object colours, 9 unclassified
    num_labels = len(palette) + 1

    # Per-frame mass and centroid of every label in one pass.
    frame_ids = np.broadcast_to(np.arange(num_frames)[:, None, None], labels.shape)
    keys = (frame_ids * num_labels + labels).ravel()
    size = num_frames * num_labels
    mass = np.bincount(keys, minlength=size).reshape(num_frames, num_labels)
    ys, xs = np.mgrid[0:height, 0:width]
    sum_x = np.bincount(keys, weights=np.broadcast_to(xs, labels.shape).ravel(), minlength=size)
    sum_y = np.bincount(keys, weights=np.broadcast_to(ys, labels.shape).ravel(), minlength=size)
    safe = np.maximum(mass, 1)
    cx = sum_x.reshape(num_frames, num_labels) / safe
    cy = sum_y.reshape(num_frames, num_labels) / safe

    captioned = _object_labels(spec)
    areas = _expected_areas(spec, height, width)
    obj_mass = mass[:, captioned]  # [F, O]
    present = is_present(obj_mass, areas)

    adherence = float(present.mean())

    others = [k for k in range(1, len(palette)) if k not in captioned]
    spurious = float((mass[:, others] > SPURIOUS_MASS * area_scale).any(axis=1).mean())

    edge = max(1, int(num_frames * PERSISTENCE_FRACTION))
    a_first = float(present[:edge].mean())
    a_last = float(present[-edge:].mean())
    persistence = min(1.0, (a_last + PERSISTENCE_EPS) / (a_first + PERSISTENCE_EPS))

    both = present[1:] & present[:-1]  # [F - 1, O]
    moved = np.hypot(np.diff(cx[:, captioned], axis=0), np.diff(cy[:, captioned], axis=0))
    pairs = int(both.sum())
    smooth = int((both & (moved <= SMOOTH_STEP * step_scale)).sum())
    smoothness = smooth / pairs if pairs else 0.0

    bg = labels == 0
    bg_count = bg.sum(axis=(1, 2))
    bg_sum = (frames * bg[..., None]).sum(axis=(1, 2), dtype=np.int64)  # [F, 3]
    bg_mean = bg_sum / np.maximum(bg_count, 1)[:, None]
    error = np.abs(bg_mean - np.array(spec.background_rgb)).mean(axis=1)
    per_frame = np.where(bg_count > 0, 1.0 - np.minimum(1.0, error / BACKGROUND_SCALE), 0.0)
    background = float(per_frame.mean())

    diffs = np.empty(num_frames - 1)
    for a in range(0, num_frames - 1, _FLICKER_CHUNK):  # chunks bound the int16 copy
        part = frames[a : a + _FLICKER_CHUNK + 1].astype(np.int16)
        diffs[a : a + len(part) - 1] = np.abs(np.diff(part, axis=0)).mean(axis=(1, 2, 3))
    flicker = float(((255.0 - diffs) / 255.0).mean())

    return {
        "adherence": adherence,
        "spurious": spurious,
        "persistence": persistence,
        "smoothness": smoothness,
        "background": background,
        "flicker": flicker,
    }


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over rows (every row needs every metric)."""
    if not rows:
        raise MetricsError("mean_scores needs at least one row of scores")
    for i, row in enumerate(rows):
        missing = [m for m in METRICS if m not in row]
        if missing:
            raise MetricsError(f"row {i} lacks {', '.join(missing)}: pass rows from score_video")
    return {m: float(np.mean([row[m] for row in rows])) for m in METRICS}


def paired_difference(a: list[dict[str, float]], b: list[dict[str, float]], metric: str) -> dict[str, float]:
    """Paired comparison of two runs over the same videos (row i of `a` and of `b` score the same
    caption and seed): mean of a - b, its standard error over videos, and how many videos score
    higher / lower under `a`. Per-caption spread is large in this world, so comparisons are read
    against the standard error, never from the means alone."""
    if len(a) != len(b) or len(a) < 2:
        raise MetricsError(f"paired_difference needs two equally long lists of at least 2 rows (got {len(a)} and {len(b)})")
    d = np.array([x[metric] - y[metric] for x, y in zip(a, b)], dtype=np.float64)
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "higher": int((d > 0).sum()), "lower": int((d < 0).sum())}


def format_table(rows: list[tuple[str, dict[str, float]]], reference: bool = True) -> str:
    """Markdown table of named score rows, with the world's own figures as a last row."""
    lines = [
        "| run | " + " | ".join(METRICS) + " |",
        "| --- |" + " --- |" * len(METRICS),
    ]
    for name, scores in rows:
        cells = [f"{scores[m]:.3f}" if m in scores else "-" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if reference:
        lines.append("| world | " + " | ".join(WORLD_REFERENCE[m] for m in METRICS) + " |")
    return "\n".join(lines)
