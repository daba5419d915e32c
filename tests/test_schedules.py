"""Schedules: diffusers parity for diffusion forcing, step/commit invariants, laziness, validation."""
from __future__ import annotations

import ast
import importlib.util
import itertools
import math
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from arvideo.errors import ConfigError
from arvideo.schedules import (
    DiffusionForcingSchedule,
    PipelinedSchedule,
    Tick,
    build_schedule,
    timestep_index_matrix,
)

NUM_BLOCKS = (1, 2, 3, 5, 8)
STEPS = (1, 3, 4, 10)
AR_STEPS = (0, 1, 2, 3, 5, 12)
BLOCK_SIZES = (1, 2, 5)


def load_diffusers_generate_timestep_matrix():
    """The installed diffusers' `SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix`, verbatim.

    Compiled from the pipeline's source file instead of imported: importing the pipeline pulls
    in diffusers + transformers (several seconds on 2 cores); the method needs only torch/math.
    """
    package = importlib.util.find_spec("diffusers")
    path = Path(package.submodule_search_locations[0]) / "pipelines" / "skyreels_v2"
    path = path / "pipeline_skyreels_v2_diffusion_forcing.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body
               if isinstance(n, ast.ClassDef) and n.name == "SkyReelsV2DiffusionForcingPipeline")
    method = next(n for n in cls.body
                  if isinstance(n, ast.FunctionDef) and n.name == "generate_timestep_matrix")
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generate_timestep_matrix"]


GENERATE_TIMESTEP_MATRIX = load_diffusers_generate_timestep_matrix()


def diffusers_matrix(num_latent_frames, steps, ar_step, causal_block_size, num_pre_ready=0):
    """diffusers' (step_index, update_mask) at frame level; the method never uses `self`."""
    template = torch.linspace(1000, 0, steps + 1)[:-1]
    _, index, mask, _ = GENERATE_TIMESTEP_MATRIX(
        None, num_latent_frames, template, num_latent_frames, ar_step, num_pre_ready,
        causal_block_size,
    )
    return index, mask


@pytest.mark.slow
def test_compiled_generate_timestep_matrix_equals_the_pipeline_method():
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    pipe = SkyReelsV2DiffusionForcingPipeline.__new__(SkyReelsV2DiffusionForcingPipeline)
    template = torch.linspace(1000, 0, 11)[:-1]
    for frames, ar_step, block, ready in [(25, 5, 5, 0), (24, 0, 1, 0), (30, 3, 2, 4), (9, 1, 3, 3)]:
        args = (frames, template, frames, ar_step, ready, block)
        real = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(pipe, *args)
        compiled = GENERATE_TIMESTEP_MATRIX(pipe, *args)
        for a, b in zip(real[:3], compiled[:3]):
            assert torch.equal(a, b)
        assert real[3] == compiled[3]


def as_block_rows(frame_level: torch.Tensor, causal_block_size: int) -> torch.Tensor:
    """Frame-level rows -> block-level rows, checking every frame of a block agrees."""
    rows, frames = frame_level.shape
    blocks = frame_level.reshape(rows, frames // causal_block_size, causal_block_size)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))
    return blocks[..., 0]


def all_schedules():
    """A spread of DF sync/async and pipelined settings, some with a short last chunk."""
    yield DiffusionForcingSchedule(7, 3, causal_block_size=3)
    yield DiffusionForcingSchedule(23, 4, causal_block_size=5, ar_step=1)
    yield DiffusionForcingSchedule(23, 10, causal_block_size=2, ar_step=3)
    yield DiffusionForcingSchedule(9, 3, causal_block_size=1, ar_step=12)
    yield DiffusionForcingSchedule(17, 5, causal_block_size=2, ar_step=0, window_blocks=3)
    yield DiffusionForcingSchedule(16, 4, causal_block_size=4, ar_step=0, window_blocks=2)
    yield DiffusionForcingSchedule(40, 10, causal_block_size=1, ar_step=3, window_blocks=4)
    yield PipelinedSchedule(31, 8, chunk_frames=6, window_size=4)
    yield PipelinedSchedule(12, 4, chunk_frames=6, window_size=4)
    yield PipelinedSchedule(50, 6, chunk_frames=3, window_size=2)
    yield PipelinedSchedule(5, 3, chunk_frames=1, window_size=1)


SCHEDULES = list(all_schedules())


@pytest.mark.parametrize(("steps", "ar_step"), list(itertools.product(STEPS, AR_STEPS)))
def test_df_rows_equal_diffusers_step_index_and_update_mask(steps, ar_step):
    for num_blocks, block in itertools.product(NUM_BLOCKS, BLOCK_SIZES):
        index, mask = diffusers_matrix(num_blocks * block, steps, ar_step, block)
        index, mask = as_block_rows(index, block), as_block_rows(mask, block)
        schedule = DiffusionForcingSchedule(num_blocks * block, steps, block, ar_step)

        rows = torch.tensor(list(schedule.value_rows()))
        assert torch.equal(rows, index), (num_blocks, block)
        assert torch.equal(timestep_index_matrix(num_blocks, steps, ar_step), index)
        assert schedule.num_ticks == len(index)

        ticks = list(schedule.ticks())
        assert len(ticks) == len(index)
        for tick, row, row_mask in zip(ticks, index, mask):
            assert [c for c, _ in tick.active] == row_mask.nonzero().flatten().tolist()
            assert [k for _, k in tick.active] == [int(row[c]) - 1 for c, _ in tick.active]


@pytest.mark.parametrize("ar_step", AR_STEPS)
def test_timestep_index_matrix_equals_diffusers_with_pre_ready_blocks(ar_step):
    for num_blocks, steps, block in itertools.product((3, 5, 8), (3, 4), (1, 2)):
        for ready in range(num_blocks + 1):
            ours = timestep_index_matrix(num_blocks, steps, ar_step, ready)
            if ready == num_blocks:  # diffusers stacks an empty row list and raises
                with pytest.raises(RuntimeError, match="non-empty"):
                    diffusers_matrix(num_blocks * block, steps, ar_step, block, ready * block)
                assert ours.shape == (0, num_blocks)
                continue
            index, _ = diffusers_matrix(num_blocks * block, steps, ar_step, block, ready * block)
            assert torch.equal(ours, as_block_rows(index, block))


def test_non_divisible_frame_count_keeps_the_short_last_chunk():
    schedule = DiffusionForcingSchedule(7, 4, causal_block_size=3, ar_step=1)
    assert schedule.num_chunks == 3
    assert [schedule.chunk_frames(i) for i in range(3)] == [(0, 3), (3, 6), (6, 7)]
    # diffusers drops frame 6; its rows for the two full blocks are our rows' leading columns.
    index, _ = diffusers_matrix(7, 4, 1, 3)
    rows = torch.tensor(list(schedule.value_rows()))
    assert torch.equal(rows[: len(index), :2], as_block_rows(index[:, :6], 3))
    assert index.shape[1] == 6 and rows.shape == (len(index) + 1, 3)
    pipelined = PipelinedSchedule(31, 8, chunk_frames=6, window_size=4)
    assert pipelined.chunk_frames(pipelined.num_chunks - 1) == (30, 31)
    for s in SCHEDULES:
        covered = [f for i in range(s.num_chunks) for f in range(*s.chunk_frames(i))]
        assert covered == list(range(s.num_latent_frames))
        stepped = {c for tick in s.ticks() for c, _ in tick.active}
        assert stepped == set(range(s.num_chunks))


def step_log(ticks: list[Tick]) -> dict[int, list[tuple[int, int]]]:
    """chunk -> [(tick, k), ...] in tick order."""
    log: dict[int, list[tuple[int, int]]] = {}
    for t, tick in enumerate(ticks):
        chunks = [c for c, _ in tick.active]
        assert chunks == sorted(set(chunks))  # ordered, at most one step per chunk per tick
        for c, k in tick.active:
            log.setdefault(c, []).append((t, k))
    return log


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_every_chunk_takes_steps_0_to_last_in_order_one_per_tick(schedule):
    ticks = list(schedule.ticks())
    log = step_log(ticks)
    assert sorted(log) == list(range(schedule.num_chunks))
    for entries in log.values():
        assert [k for _, k in entries] == list(range(schedule.steps))
        start = entries[0][0]
        assert [t for t, _ in entries] == list(range(start, start + schedule.steps))
    assert len(ticks) == schedule.num_ticks
    assert all(tick.active for tick in ticks)
    assert max(len(t.active) + len(t.commit) for t in ticks) <= schedule.max_in_flight


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_commit_once_on_the_tick_after_last_step_before_later_chunks_step(schedule):
    ticks = list(schedule.ticks())
    log = step_log(ticks)
    commits = [c for tick in ticks for c in tick.commit]
    assert len(commits) == len(set(commits))
    commit_tick = {c: t for t, tick in enumerate(ticks) for c in tick.commit}
    final = len(ticks) - 1
    for c, entries in log.items():
        last = entries[-1][0]
        if last == final:
            assert c not in commit_tick
            continue
        assert commit_tick[c] == last + 1
        for later, later_entries in log.items():
            if later > c:
                assert all(t >= commit_tick[c] for t, _ in later_entries if t > last)
    for _t, tick in enumerate(ticks):
        assert list(tick.commit) == sorted(tick.commit)
        assert not set(tick.commit) & {c for c, _ in tick.active}


@pytest.mark.parametrize(("steps", "window_size", "chunks"), [(8, 4, 9), (12, 4, 3), (6, 2, 7), (4, 1, 5)])
def test_pipelined_window_bounds_in_flight_and_staggers_entry(steps, window_size, chunks):
    schedule = PipelinedSchedule(chunks * 6 - 2, steps, chunk_frames=6, window_size=window_size)
    ticks = list(schedule.ticks())
    log = step_log(ticks)
    assert max(len(t.active) for t in ticks) == min(window_size, chunks)
    for c, entries in log.items():
        assert entries[0][0] == c * steps // window_size == schedule.entry_tick(c)
    assert len(ticks) == steps // window_size * (chunks + window_size - 1)


def test_async_df_in_flight_count_reaches_max_in_flight_on_long_videos():
    for steps, ar_step in itertools.product((1, 3, 4, 10), (1, 2, 3, 5, 12)):
        schedule = DiffusionForcingSchedule(40, steps, ar_step=ar_step)
        peak = max(len(t.active) + len(t.commit) for t in schedule.ticks())
        assert peak == schedule.max_in_flight, (steps, ar_step)


@pytest.mark.parametrize(
    "schedule",
    [
        DiffusionForcingSchedule(10**6, 30, causal_block_size=1, ar_step=5, window_blocks=8),
        DiffusionForcingSchedule(5 * 10**6, 4, causal_block_size=5, ar_step=1),
        DiffusionForcingSchedule(10**6, 30, causal_block_size=1, ar_step=0, window_blocks=4),
        PipelinedSchedule(6 * 10**6, 32, chunk_frames=6, window_size=4),
    ],
    ids=repr,
)
def test_million_chunk_schedule_yields_first_100_ticks_fast_and_bounded(schedule):
    assert schedule.num_chunks == 10**6
    begin = time.perf_counter()
    ticks = list(itertools.islice(schedule.ticks(), 100))
    elapsed = time.perf_counter() - begin
    assert len(ticks) == 100
    assert elapsed < 0.5
    assert max(len(t.active) + len(t.commit) for t in ticks) <= schedule.max_in_flight <= 9
    # Memory: no per-chunk state; an O(num_chunks) list would cost several MB.
    tracemalloc.start()
    for _ in itertools.islice(schedule.ticks(), 100):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024


def test_sync_df_windows_bound_active_chunks_and_commit_the_previous_window():
    schedule = DiffusionForcingSchedule(10, 3, window_blocks=4)
    ticks = list(schedule.ticks())
    assert len(ticks) == 9 == schedule.num_ticks
    assert max(len(t.active) for t in ticks) == 4
    assert schedule.max_in_flight == 8
    assert [t.commit for t in ticks] == [(), (), (), (0, 1, 2, 3), (), (), (4, 5, 6, 7), (), ()]
    assert ticks[3].active == ((4, 0), (5, 0), (6, 0), (7, 0))
    assert ticks[8].active == ((8, 2), (9, 2))


def test_build_schedule_by_name_and_unknown_names_list_the_valid_ones():
    df = build_schedule("diffusion-forcing", num_latent_frames=25, steps=30, causal_block_size=5, ar_step=5)
    assert df == DiffusionForcingSchedule(25, 30, 5, 5)
    assert build_schedule("pipelined", num_latent_frames=12, steps=8).num_chunks == 2
    with pytest.raises(ConfigError, match="diffusion-forcing, pipelined"):
        build_schedule("magi")
    with pytest.raises(ConfigError, match="does not take window_blocks"):
        build_schedule("pipelined", num_latent_frames=12, steps=8, window_blocks=2)
    with pytest.raises(ConfigError, match="needs steps"):
        build_schedule("pipelined", num_latent_frames=12)


def test_invalid_settings_raise_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"set ar_step >= 3"):
        DiffusionForcingSchedule(40, 10, ar_step=2, window_blocks=4)
    with pytest.raises(ConfigError, match=r"set ar_step >= 5"):
        DiffusionForcingSchedule(85, 30, causal_block_size=5, ar_step=4, window_blocks=6)
    # Fits in one window, or synchronous windows: no ar_step minimum.
    assert DiffusionForcingSchedule(20, 10, ar_step=1, window_blocks=20).num_chunks == 20
    assert DiffusionForcingSchedule(40, 10, ar_step=0, window_blocks=4).max_in_flight == 8
    for kwargs, name in [
        (dict(num_latent_frames=0, steps=4), "num_latent_frames must be an integer >= 1"),
        (dict(num_latent_frames=4, steps=0), "steps must be an integer >= 1"),
        (dict(num_latent_frames=4, steps=4, causal_block_size=0), "causal_block_size must be an integer >= 1"),
        (dict(num_latent_frames=4, steps=4, ar_step=-1), "ar_step must be an integer >= 0"),
        (dict(num_latent_frames=4, steps=4, window_blocks=0), "window_blocks must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=name):
            DiffusionForcingSchedule(**kwargs)
    with pytest.raises(ConfigError, match=r"multiples of 4, e.g. 28 or 32"):
        PipelinedSchedule(24, 30, window_size=4)
    with pytest.raises(ConfigError, match=r"multiples of 4, e.g. 4$"):
        PipelinedSchedule(24, 3, window_size=4)
    with pytest.raises(ConfigError, match="chunk_frames must be an integer >= 1"):
        PipelinedSchedule(24, 8, chunk_frames=0)
    with pytest.raises(IndexError):
        PipelinedSchedule(24, 8).chunk_frames(4)
