"""Screenshot the live preview page in headless Chromium (for docs/preview.png).

Generates two short videos part way (so chunks are still in flight, each showing its
predicted clean frames), serves their preview directory with `PreviewServer`, and has
Chromium render the page:

    python scripts/screenshot_preview.py                      # embedded model, or the tiny random one
    python scripts/screenshot_preview.py --model DIR --out docs/preview.png

Needs Chromium (Debian: `apt-get install -y chromium`).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JOBS = [("blue-square", "a large blue square on a gray background", 3),
        ("red-circle-and-cyan-triangle", "a small red circle and a medium cyan triangle on a navy background", 5)]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def make_previews(model: str | None, root: Path, frames: int, stop_after: int, size: int | None) -> None:
    """Runs each job until `stop_after` chunks are finished, leaving its preview mid-run."""
    from arvideo.config import build_config
    from arvideo.engine import Engine
    from arvideo.preview import LatentProjection, PreviewWriter

    engine = Engine.from_folder(model)
    for name, prompt, seed in JOBS:
        overrides = ["schedule.ar_step=5", "schedule.window_blocks=4"] + ([f"height={size}", f"width={size}"] if size else [])
        cfg = build_config(prompt=prompt, frames=frames, seed=seed, overrides=overrides)
        r = engine.resolve(cfg)
        writer = PreviewWriter(root / name, name=name, total_frames=r.cfg.frames, steps=r.steps,
                               projection=LatentProjection.from_vae(engine.model.vae),
                               temporal_factor=engine.model.temporal_factor, interval=0.0)
        for n, chunk in enumerate(engine.stream(cfg, callback=writer.on_step), start=1):
            writer.on_chunk(chunk)
            if n == stop_after:
                break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded, else a tiny random model)")
    parser.add_argument("--out", default=str(REPO / "docs" / "preview.png"))
    parser.add_argument("--frames", type=int, default=161)
    parser.add_argument("--stop-after", type=int, default=6, help="finished chunks before the page is captured")
    parser.add_argument("--size", type=int, default=None, help="height and width (default: the model's)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--window", default="1280,760")
    args = parser.parse_args()
    if not args.chromium:
        parser.error("Chromium not found: apt-get install -y chromium, or pass --chromium PATH")

    from arvideo.model import EMBEDDED_MODEL
    from arvideo.preview import PreviewServer

    with tempfile.TemporaryDirectory(prefix="arvideo-shot-") as tmp:
        tmp = Path(tmp)
        model, size = args.model, args.size
        if model is None and not EMBEDDED_MODEL.is_dir():
            from tests.tiny import save_tiny_model_folder

            model = str(save_tiny_model_folder(tmp / "tiny"))
            size = size or 64
            print("embedded model not found: using the tiny random model (its frames are noise)", file=sys.stderr)
        make_previews(model, tmp / "preview", args.frames, args.stop_after, size)
        with PreviewServer(tmp / "preview", port=0) as server:
            cmd = [args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium'}",
                   f"--window-size={args.window}", "--virtual-time-budget=4000",
                   f"--screenshot={Path(args.out).resolve()}", server.url]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not Path(args.out).exists():
        print(proc.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
