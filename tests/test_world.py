"""The shapes world: generator, caption grammar and metrics against world-spec.md."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from arvideo.errors import PromptError
from arvideo.world import (
    BACKGROUNDS,
    METRICS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    VOCABULARY,
    WORLD_REFERENCE,
    MetricsError,
    ObjectSpec,
    SceneSpec,
    World,
    format_caption,
    format_table,
    mean_scores,
    parse_caption,
    sample_scene_spec,
    sample_world,
    score_video,
    step,
)
from arvideo.world.metrics import _classify

MEANS_SEEDS = 30
MEANS_FRAMES = 480  # the spec's reference length


@pytest.fixture(scope="module")
def world_scores() -> list[dict[str, float]]:
    """Scores of sample_world(0..29), 480 frames each (the spec's reference used 60 seeds)."""
    rows = []
    for seed in range(MEANS_SEEDS):
        world = sample_world(seed)
        rows.append(score_video(world.clip(0, MEANS_FRAMES), world.spec.caption))
    return rows


# --- metrics on the world itself ---------------------------------------------------------


def test_every_single_object_video_scores_adherence_exactly_one():
    # Every shape x size x background, colours cycling through all 8; the hardest case (small
    # triangle, dim colour on navy) keeps >= 0.58 A of mass, well above the 0.4 A bound.
    combos = list(itertools.product(SHAPES, SIZES, BACKGROUNDS))
    colours = list(OBJECT_COLOURS)
    for i, (shape, size, background) in enumerate(combos):
        spec = SceneSpec((ObjectSpec(shape, size, colours[i % len(colours)]),), background)
        scores = score_video(World(spec, 100 + i).clip(0, 120), spec)
        assert scores["adherence"] == 1.0, spec.caption
        assert scores["spurious"] == 0.0, spec.caption
        assert scores["smoothness"] == 1.0, spec.caption
        assert scores["persistence"] == 1.0, spec.caption


def test_world_means_over_30_seeds_land_in_spec_ranges(world_scores):
    means = mean_scores(world_scores)
    # Spec: adherence mean 0.97 over 60 seeds. Per-video spread is ~0.03 (occlusion only), so
    # the mean of 30 seeds has a standard error ~0.006: +-0.02 is about 3 standard errors.
    assert means["adherence"] == pytest.approx(0.97, abs=0.02)
    # Spec min 0.84 over its 60 seeds; how much occlusion a seed draws varies, hence 0.8.
    assert min(s["adherence"] for s in world_scores) >= 0.8
    assert all(s["spurious"] == 0.0 for s in world_scores)
    # Spec 0.98 mean; nothing decays, only occlusion differs between the first and last 48
    # frames, which moves single videos (min here 0.83) but not the mean below 0.95.
    assert means["persistence"] >= 0.95
    assert means["smoothness"] >= 0.997
    assert min(s["smoothness"] for s in world_scores) >= 0.99
    assert min(s["background"] for s in world_scores) >= 0.998
    # Spec "about 0.99": the mean frame difference is set by object speed, area and contrast.
    assert means["flicker"] == pytest.approx(0.99, abs=0.005)


def test_world_means_table_lists_runs_and_the_world_reference(world_scores):
    table = format_table([("world generator", mean_scores(world_scores))])
    lines = table.splitlines()
    assert lines[0] == "| run | " + " | ".join(METRICS) + " |"
    assert lines[2].startswith("| world generator | 0.97")
    assert lines[-1] == "| world | " + " | ".join(WORLD_REFERENCE[m] for m in METRICS) + " |"
    assert len(format_table([("a", world_scores[0])], reference=False).splitlines()) == 3


# --- each metric drops when its property is broken -----------------------------------------

BROKEN_CAPTION = "a medium red circle and a large blue square on a navy background"
BROKEN_SEED = 6  # the two objects never overlap in the first 96 frames
BROKEN_FRAMES = 96


@pytest.fixture(scope="module")
def intact() -> tuple[SceneSpec, np.ndarray, dict[str, float]]:
    spec = parse_caption(BROKEN_CAPTION)
    video = World(spec, BROKEN_SEED).clip(0, BROKEN_FRAMES)
    return spec, video, score_video(video, spec)


def test_intact_two_object_video_scores_perfect_baseline(intact):
    _, _, scores = intact
    assert scores["adherence"] == 1.0
    assert scores["spurious"] == 0.0
    assert scores["persistence"] == 1.0
    assert scores["smoothness"] == 1.0
    assert scores["background"] >= 0.999
    assert scores["flicker"] >= 0.99


def test_object_removed_half_way_drops_adherence_and_persistence(intact):
    spec, video, _ = intact
    # Objects draw their start state in caption order, so dropping the last object leaves
    # the first one exactly where it was.
    alone = World(SceneSpec(spec.objects[:1], spec.background), BROKEN_SEED)
    half = BROKEN_FRAMES // 2
    broken = np.concatenate([video[:half], alone.clip(half, BROKEN_FRAMES - half)])
    scores = score_video(broken, spec)
    assert scores["adherence"] == 0.75  # square missing in half of the frames
    assert scores["persistence"] == pytest.approx((0.5 + 0.01) / (1.0 + 0.01), abs=1e-12)
    assert scores["spurious"] == 0.0


def test_colour_change_raises_spurious_and_drops_adherence(intact):
    spec, video, _ = intact
    recoloured = SceneSpec((spec.objects[0], ObjectSpec("square", "large", "green")), "navy")
    half = BROKEN_FRAMES // 2
    broken = np.concatenate([video[:half], World(recoloured, BROKEN_SEED).clip(half, half)])
    scores = score_video(broken, spec)
    assert scores["spurious"] == 0.5  # a large green square (324 px) in the second half
    assert scores["adherence"] == 0.75


def test_teleporting_objects_drop_smoothness_only(intact):
    spec, _, _ = intact
    world = World(spec, BROKEN_SEED)
    # Every frame jumps 37 frames ahead: objects move 22-67 px between shown frames, except
    # where a wall bounce folds the jump back near its start.
    teleports = np.stack([world.frame(37 * k) for k in range(BROKEN_FRAMES)])
    scores = score_video(teleports, spec)
    assert scores["smoothness"] < 0.2
    assert scores["spurious"] == 0.0 and scores["background"] >= 0.999


def test_background_shift_drops_background_metric(intact):
    spec, video, _ = intact
    # +20 on every channel keeps background pixels within the 40 classification distance
    # (20 sqrt 3 = 34.6), so they are still classified and their mean is 20 off: 1 - 20/40.
    shifted = (video.astype(np.int16) + 20).clip(0, 255).astype(np.uint8)
    scores = score_video(shifted, spec)
    assert scores["background"] == pytest.approx(0.5, abs=0.01)


def test_inverting_alternate_frames_drops_flicker(intact):
    spec, video, base = intact
    flickering = video.copy()
    flickering[1::2] = 255 - flickering[1::2]
    scores = score_video(flickering, spec)
    assert base["flicker"] >= 0.99
    assert scores["flicker"] < 0.6


def test_classification_marks_blends_farther_than_40_as_unclassified():
    palette = np.array([(0, 0, 0), *OBJECT_COLOURS.values()])
    pixels = np.array([[[[0, 0, 0], [230, 40, 40], [115, 20, 20], [30, 20, 20]]]], np.uint8)
    # black, red, a 50% red/black blend (118 from both), black + (30, 20, 20) (41.2).
    assert _classify(pixels, palette).tolist() == [[[0, 1, 9, 9]]]
    near = np.array([[[[23, 23, 23]]]], np.uint8)  # distance 39.8 from black
    assert _classify(near, palette).tolist() == [[[0]]]


def test_no_object_present_in_consecutive_frames_scores_smoothness_zero():
    spec = parse_caption("a small red circle on a black background")
    empty = np.zeros((10, 64, 64, 3), np.uint8)
    scores = score_video(empty, spec)
    assert scores["smoothness"] == 0.0
    assert scores["adherence"] == 0.0
    assert scores["background"] == 1.0
    assert scores["flicker"] == 1.0


def test_mean_scores_averages_rows_and_bad_inputs_raise_metrics_error():
    rows = [dict.fromkeys(METRICS, 1.0), dict.fromkeys(METRICS, 0.5)]
    assert mean_scores(rows) == dict.fromkeys(METRICS, 0.75)
    with pytest.raises(MetricsError, match="at least one row"):
        mean_scores([])
    spec = parse_caption("a small red circle on a black background")
    with pytest.raises(MetricsError, match="uint8"):
        score_video(np.zeros((4, 64, 64, 3), np.float32), spec)
    with pytest.raises(MetricsError, match="at least 2 frames"):
        score_video(np.zeros((1, 64, 64, 3), np.uint8), spec)


# --- captions --------------------------------------------------------------------------


def test_caption_round_trip_is_canonical_for_300_sampled_specs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = sample_scene_spec(rng)
        caption = format_caption(spec)
        assert parse_caption(caption) == spec
        assert format_caption(parse_caption(caption)) == caption == spec.caption
        assert set(caption.replace(",", " , ").split()) <= set(VOCABULARY)


def test_sampled_specs_follow_the_spec_distribution():
    rng = np.random.default_rng(1)
    specs = [sample_scene_spec(rng) for _ in range(3000)]
    counts = np.bincount([len(s.objects) for s in specs], minlength=4)[1:] / len(specs)
    # Uniform over 3 choices with n = 3000: standard error 0.009, so +-0.04 is > 4 sigma.
    assert counts == pytest.approx([1 / 3] * 3, abs=0.04)
    backgrounds = [sum(s.background == b for s in specs) / len(specs) for b in BACKGROUNDS]
    assert backgrounds == pytest.approx([1 / 3] * 3, abs=0.04)
    assert all(len({o.colour for o in s.objects}) == len(s.objects) for s in specs)
    objects = [o for s in specs for o in s.objects]
    shapes = [sum(o.shape == sh for o in objects) / len(objects) for sh in SHAPES]
    assert shapes == pytest.approx([1 / 3] * 3, abs=0.04)


def test_parse_accepts_an_capitals_and_extra_whitespace():
    spec = parse_caption(
        "  An SMALL Red circle ,a large BLUE square   and\tan medium white Triangle "
        " on AN gray  background  "
    )
    assert spec.caption == (
        "a small red circle, a large blue square and a medium white triangle "
        "on a gray background"
    )
    assert [o.radius for o in spec.objects] == [5, 9, 7]


def test_parse_error_names_the_first_offending_word_and_lists_vocabulary():
    with pytest.raises(PromptError) as err:
        parse_caption("a small purple circle on a gray background")
    message = str(err.value)
    assert "'purple'" in message and "word 3" in message and "character 9" in message
    assert "object colour" in message and "magenta" in message
    assert "Vocabulary: a, and, background, black, blue, circle, cyan, gray, green" in message


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("a red small circle on a gray background", "'red' (word 2"),
        ("a small red circle, a large blue square on a gray background", "'on' (word 10"),
        ("a small red circle and a large blue square and a small green square on a "
         "gray background", "'and' (word 10"),
        ("a small red circle on a gray", "the end of the prompt"),
        ("a small red circle on a white background", "'white' (word 7"),
        ("a small red circle on a gray background.", "'background.' (word 8"),
        ("", "an empty prompt"),
    ],
)
def test_parse_error_points_at_the_first_bad_token(prompt, named):
    with pytest.raises(PromptError, match="cannot parse prompt") as err:
        parse_caption(prompt)
    assert named in str(err.value)


def test_duplicate_colours_are_rejected_with_the_colour_named():
    with pytest.raises(PromptError, match="colour 'red' is used by objects 1 and 2; each object "
                       "must have a distinct colour"):
        parse_caption("a small red circle and a large red square on a gray background")
    with pytest.raises(PromptError, match="distinct colour"):
        SceneSpec((ObjectSpec("circle", "small", "red"),) * 2, "gray")


def test_vocabulary_is_sorted_and_covers_exactly_the_grammar():
    assert list(VOCABULARY) == sorted(VOCABULARY)
    expected = {",", "a", "and", "on", "background", *SHAPES, *SIZES, *OBJECT_COLOURS,
                *BACKGROUNDS}
    assert set(VOCABULARY) == expected and len(VOCABULARY) == 22


# --- generator -----------------------------------------------------------------------------


def test_same_seed_gives_identical_frames_and_different_seeds_differ():
    a, b = sample_world(7), sample_world(7)
    assert a.spec == b.spec
    assert np.array_equal(a.clip(0, 32), b.clip(0, 32))
    assert not np.array_equal(a.clip(0, 32), sample_world(8).clip(0, 32))


def test_frame_random_access_equals_streaming_and_clip():
    world = sample_world(3)
    stream = world.frames()
    streamed = np.stack([next(stream) for _ in range(40)])
    assert np.array_equal(np.stack([world.frame(i) for i in reversed(range(40))])[::-1], streamed)
    assert np.array_equal(world.clip(10, 20), streamed[10:30])
    later = world.frames(start=1000)
    assert np.array_equal(next(later), world.frame(1000))
    assert world.clip(0, 5).shape == (5, 64, 64, 3) and streamed.dtype == np.uint8


def test_closed_form_motion_equals_stepping_the_reflection_rule():
    world = sample_world(11)
    states = world.states(0)
    for index in range(1, 3001):
        states = [step(s) for s in states]
        if index % 500 == 0:
            for stepped, direct in zip(states, world.states(index)):
                # float64 rounding accumulates over the 3000 steps; 1e-9 px is far below a pixel.
                assert stepped.x == pytest.approx(direct.x, abs=1e-9)
                assert stepped.y == pytest.approx(direct.y, abs=1e-9)
                assert (stepped.vx, stepped.vy) == (direct.vx, direct.vy)


def test_start_state_and_speed_follow_the_spec():
    for seed in range(200):
        world = sample_world(seed)
        for state in world.states(0):
            r = state.spec.radius
            assert r <= state.x <= 63 - r and r <= state.y <= 63 - r
            assert 0.6 <= math.hypot(state.vx, state.vy) <= 1.8


def test_rendered_centroid_tracks_the_centre_and_stays_in_the_wall_band():
    spec = parse_caption("a large white square on a black background")
    world = World(spec, 5)
    r = spec.objects[0].radius
    video = world.clip(0, 300)
    ys, xs = np.mgrid[0:64, 0:64]
    flips = 0
    for index in range(300):
        mask = video[index].astype(int).sum(axis=2) > 3 * 122  # at least half covered
        cx, cy = xs[mask].mean(), ys[mask].mean()
        state = world.states(index)
        # Pixel j's centre is coordinate j; rounding partial edge pixels moves it < 0.5 px.
        assert abs(cx - state[0].x) < 0.5 and abs(cy - state[0].y) < 0.5
        assert r - 0.5 <= cx <= 63 - r + 0.5 and r - 0.5 <= cy <= 63 - r + 0.5
        if index and np.sign(state[0].vx) != np.sign(world.states(index - 1)[0].vx):
            flips += 1
    assert flips >= 2  # 300 frames at >= 0.6 px / frame cross the 45 px band several times


def test_caption_order_draws_later_objects_on_top():
    spec = parse_caption("a large red square and a small blue circle on a black background")
    world = World(spec, 0)
    # The first frame where the small circle lies wholly inside the large square's area.
    index = next(
        i
        for i in range(20000)
        if all(abs(a - b) < 9 - 5 for a, b in zip(*[(s.x, s.y) for s in world.states(i)]))
    )
    square, circle = world.states(index)
    frame = world.frame(index)
    assert tuple(frame[round(circle.y), round(circle.x)]) == OBJECT_COLOURS["blue"]
    # The square's corner pixel on the far side from the circle stays red.
    corner_y = round(square.y) + (8 if circle.y < square.y else -8)
    corner_x = round(square.x) + (8 if circle.x < square.x else -8)
    assert tuple(frame[corner_y, corner_x]) == OBJECT_COLOURS["red"]


def test_object_masses_give_score_videos_present(intact):
    from arvideo.world.metrics import is_present, object_masses

    spec, video, _ = intact
    alone = World(SceneSpec(spec.objects[:1], spec.background), BROKEN_SEED)
    half = BROKEN_FRAMES // 2
    broken = np.concatenate([video[:half], alone.clip(half, BROKEN_FRAMES - half)])
    mass, areas = object_masses(broken, spec)
    assert mass.shape == (BROKEN_FRAMES, 2)
    present = is_present(mass, areas)
    assert present.mean() == score_video(broken, spec)["adherence"] == 0.75
    assert present[:half].all() and not present[half:, 1].any() and present[half:, 0].all()
    assert (mass[half:, 1] == 0).all()  # the removed square's colour is gone, not merely shrunk


def test_diagnose_adherence_script_splits_misses_by_time_and_kind(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec_ = importlib.util.spec_from_file_location("diagnose_adherence", root / "scripts" / "diagnose_adherence.py")
    diag = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(diag)
    seed, frames = 20000, 48
    world = sample_world(seed)
    video = world.clip(0, frames).copy()
    colour = np.array(OBJECT_COLOURS[world.spec.objects[0].colour], dtype=np.uint8)
    later = video[40:]
    later[(later == colour).all(axis=-1)] = world.spec.background_rgb  # the first object vanishes from frame 40
    video[20:24, :32] = colour  # and covers the top half in frames 20-23: far above 2.5 A
    np.save(tmp_path / f"seed{seed}.npy", video)
    (tmp_path / f"seed{seed}.json").write_text(json.dumps({"caption": world.spec.caption, "seed": seed}))
    out = tmp_path / "diag.json"
    assert diag.main([str(tmp_path / f"seed{seed}.npy"), "--world", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    model, ref = res["model"]["by"], res["world"]["by"]
    n_obj = len(world.spec.objects)

    def rate(c):
        return c[0] / sum(c)

    assert rate(model["all / all"]) == pytest.approx(score_video(video, world.spec)["adherence"], abs=1e-12)
    assert rate(ref["all / all"]) == pytest.approx(score_video(world.clip(0, frames), world.spec)["adherence"])
    assert model["time / 40-79"][1] >= 8  # the vanished object: absent in each of frames 40-47
    assert model["time / 4-39"][3] >= 4 and ref["time / 4-39"][3] == 0  # too large in frames 20-23
    first = res["model"]["per_object"][0]
    assert first["object"] == "{0.size} {0.colour} {0.shape}".format(world.spec.objects[0])
    assert first["present"] == pytest.approx((frames - 8 - 4) / frames)  # all but frames 20-23 and 40-47
    assert rate(model["time / first chunk (0-3)"]) == rate(ref["time / first chunk (0-3)"])
    assert sum(model["all / all"]) == frames * n_obj

    # --vae: the world's frames through a VAE (here the tiny random one), scored the same way
    from tests.tiny import save_tiny_model_folder

    vae = save_tiny_model_folder(tmp_path / "tiny") / "vae"
    assert diag.main([str(tmp_path / f"seed{seed}.npy"), "--vae", str(vae), "--json", str(out)]) == 0
    rec = json.loads(out.read_text())["VAE reconstruction"]["by"]
    assert sum(rec["all / all"]) == 45 * n_obj  # 1 + 4k frames of the 48 go through the encoder
