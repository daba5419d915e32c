"""Every output format round-trips its frames; the mp4 survives SIGKILL mid-run."""

import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import pytest

from arvideo.errors import ConfigError
from arvideo.sinks import GifSink, Mp4Sink, MultiSink, NpySink, PngDirSink, PreviewSink, open_sink

REPO = Path(__file__).resolve().parents[1]


def smooth_video(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    """uint8 [n, h, w, 3]: slow sinusoids that move a little each frame (every frame distinct)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = [
        np.stack(
            [
                128 + 90 * np.sin(x / 14 + t / 4),
                128 + 90 * np.cos(y / 13 - t / 5),
                128 + 70 * np.sin((x + y) / 20 + t / 6),
            ],
            axis=-1,
        )
        for t in range(n)
    ]
    return np.stack(frames).round().astype(np.uint8)


def decode_mp4(path: Path) -> tuple[np.ndarray, list[float]]:
    with av.open(str(path)) as container:
        decoded = [(f.to_ndarray(format="rgb24"), f.time) for f in container.decode(video=0)]
    if not decoded:
        return np.zeros((0, 0, 0, 3), np.uint8), []
    return np.stack([d[0] for d in decoded]), [d[1] for d in decoded]


def test_mp4_round_trip_frame_count_fps_and_error(tmp_path):
    frames = smooth_video(20)
    path = tmp_path / "sub" / "out.mp4"
    sink = open_sink(path, fps=16)
    for chunk in np.array_split(frames, [1, 5, 12]):
        sink.write(chunk)
    sink.close()
    sink.close()  # idempotent

    decoded, times = decode_mp4(path)
    assert decoded.shape == frames.shape
    # CRF 18 + 4:2:0 chroma on a smooth pattern: a few levels of error at most on average.
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(16)
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.codec_context.name == "h264"
    assert times == pytest.approx([i / 16 for i in range(20)], abs=1e-6)


def test_mp4_non_integer_fps_is_exact(tmp_path):
    path = tmp_path / "ntsc.mp4"
    with Mp4Sink(path, Fraction(24000, 1001)) as sink:
        sink.write(smooth_video(6))
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(24000, 1001)


def test_mp4_odd_size_is_padded_by_one_pixel(tmp_path):
    frames = smooth_video(3, h=63, w=65)
    path = tmp_path / "odd.mp4"
    with Mp4Sink(path, 16) as sink:
        sink.write(frames)
    decoded, _ = decode_mp4(path)
    assert decoded.shape == (3, 64, 66, 3)
    assert np.abs(decoded[:, :63, :65].astype(int) - frames).mean() < 3.0


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_sinks import smooth_video
    from arvideo.sinks import open_sink
    sink = open_sink({path!r}, fps=16)
    frames = smooth_video({n})
    for chunk in np.array_split(frames, 4):
        sink.write(chunk)
    print("WRITTEN", flush=True)
    time.sleep(60)
    """
)


def test_mp4_killed_with_sigkill_keeps_all_but_the_newest_frame(tmp_path):
    n = 17
    path = tmp_path / "crash.mp4"
    script = CRASH_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), path=str(path), n=n)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    decoded, times = decode_mp4(path)
    # ffmpeg's mp4 muxer closes a fragment when the next frame arrives: only the newest
    # frame can be missing (see arvideo/sinks/mp4.py).
    assert decoded.shape[0] == n - 1
    assert np.abs(decoded.astype(int) - smooth_video(n)[: n - 1]).mean() < 3.0
    assert times == pytest.approx([i / 16 for i in range(n - 1)], abs=1e-6)


def test_npy_is_exact_and_valid_while_growing(tmp_path):
    frames = smooth_video(7, h=10, w=12)
    path = tmp_path / "a" / "frames.npy"
    sink = open_sink(path, fps=16)
    sink.write(frames[:3])
    np.testing.assert_array_equal(np.load(path), frames[:3])  # valid mid-stream
    sink.write(frames[3:4])
    np.testing.assert_array_equal(np.load(path), frames[:4])
    sink.write(frames[4:])
    sink.close()
    loaded = np.load(path)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, frames)
    np.testing.assert_array_equal(np.load(path, mmap_mode="r"), frames)


def test_png_directory_is_exact_and_numbered_from_zero(tmp_path):
    frames = smooth_video(5, h=8, w=6)
    directory = tmp_path / "frames"
    sink = open_sink(str(directory) + "/", fps=16)
    assert isinstance(sink, PngDirSink)
    sink.write(frames[:2])
    sink.write(frames[2:])
    sink.close()
    names = sorted(p.name for p in directory.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(5)]
    np.testing.assert_array_equal(np.stack([iio.imread(directory / n) for n in names]), frames)


def test_gif_round_trip_loops_and_appears_only_on_close(tmp_path):
    frames = smooth_video(6, h=32, w=32)
    path = tmp_path / "out.gif"
    sink = open_sink(path, fps=10)
    assert isinstance(sink, GifSink)
    sink.write(frames[:2])
    sink.write(frames[2:])
    assert not path.exists()
    sink.close()
    assert path.exists() and not sink.partial_path.exists()
    decoded = iio.imread(path, index=None, plugin="pillow", mode="RGB")
    assert decoded.shape == frames.shape
    # 256-colour palette per frame: small average error on a smooth pattern.
    assert np.abs(decoded.astype(int) - frames).mean() < 4.0
    meta = iio.immeta(path, plugin="pillow")
    assert meta["loop"] == 0 and meta["duration"] == 100


def test_preview_holds_the_newest_frame(tmp_path):
    frames = smooth_video(4, h=8, w=8)
    path = tmp_path / "preview.png"
    sink = PreviewSink(path)
    sink.write(frames[:3])
    np.testing.assert_array_equal(iio.imread(path), frames[2])
    sink.write(frames[3:])
    np.testing.assert_array_equal(iio.imread(path), frames[3])
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no temp file left


def test_multisink_fans_out_to_every_sink(tmp_path):
    frames = smooth_video(3, h=8, w=8)
    sinks = [NpySink(tmp_path / "a.npy"), PngDirSink(tmp_path / "png"), PreviewSink(tmp_path / "p.png")]
    with MultiSink(sinks) as sink:
        sink.write(frames)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), frames)
    assert len(list((tmp_path / "png").iterdir())) == 3
    np.testing.assert_array_equal(iio.imread(tmp_path / "p.png"), frames[-1])


def test_open_sink_picks_png_dir_for_existing_dir_and_no_suffix(tmp_path):
    assert isinstance(open_sink(tmp_path, fps=16), PngDirSink)
    assert isinstance(open_sink(tmp_path / "frames", fps=16), PngDirSink)
    assert isinstance(open_sink(tmp_path / "x.MP4", fps=16), Mp4Sink)


def test_unknown_suffix_names_the_supported_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        open_sink(tmp_path / "out.avi", fps=16)
    message = str(err.value)
    for suffix in (".mp4", ".gif", ".npy", "directory"):
        assert suffix in message


def test_frames_of_a_new_size_or_wrong_dtype_are_rejected(tmp_path):
    sink = NpySink(tmp_path / "a.npy")
    sink.write(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="8x8"):
        sink.write(np.zeros((1, 8, 10, 3), np.uint8))
    with pytest.raises(ConfigError, match="uint8"):
        sink.write(np.zeros((1, 8, 8, 3), np.float32))
    sink.close()
    with pytest.raises(ConfigError, match="closed"):
        sink.write(np.zeros((1, 8, 8, 3), np.uint8))
