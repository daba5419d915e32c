"""The shapes world: a seeded procedural video world, its caption grammar and analytic metrics."""

from arvideo.world.captions import (
    BACKGROUNDS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    VOCABULARY,
    ObjectSpec,
    SceneSpec,
    format_caption,
    parse_caption,
    sample_scene_spec,
)
from arvideo.world.generator import FPS, SIZE, ObjectState, World, sample_world, step
from arvideo.world.metrics import (
    METRICS,
    WORLD_REFERENCE,
    MetricsError,
    expected_area,
    format_table,
    mean_scores,
    score_video,
)

__all__ = [
    "BACKGROUNDS",
    "FPS",
    "METRICS",
    "OBJECT_COLOURS",
    "SHAPES",
    "SIZE",
    "SIZES",
    "VOCABULARY",
    "WORLD_REFERENCE",
    "MetricsError",
    "ObjectSpec",
    "ObjectState",
    "SceneSpec",
    "World",
    "expected_area",
    "format_caption",
    "format_table",
    "mean_scores",
    "parse_caption",
    "sample_scene_spec",
    "sample_world",
    "score_video",
    "step",
]
