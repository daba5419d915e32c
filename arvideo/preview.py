"""Live previews: the newest finished frame and every in-flight chunk's predicted clean frames.

A `PreviewWriter` hangs off `Engine.stream(callback=...)`. On each tick the engine reports
the predicted clean latents x0 of every chunk that stepped; they are mapped to RGB by a
`LatentProjection`, a linear map with bias from latent channels to RGB (what FramePack and
ComfyUI's "latent2rgb" do), so a preview costs one small matrix product per chunk and no
VAE call. The projection is fitted by least squares:

- before any chunk is finished, from a throwaway decode of a few random latent frames
  (a separate `StreamingDecoder`, so the run's causal cache is untouched; 8x8 latents);
- then from every finished chunk of this very run: its clean latents and the frames the
  VAE decoded from them (average-pooled to latent resolution), which tunes the colours to
  the video being made.

Files in the preview directory, each replaced atomically (temporary name + `os.replace`):
`latest.png` (newest finished frame), `chunk_00012.png` (chunk 12's x0 latent frames side
by side, at latent resolution), `status.json` (progress, in-flight chunks and their steps).
A batch writes one such directory per job under the preview directory.

`PreviewServer` serves a page on 127.0.0.1 that polls `status.json` and swaps the images
when they change (stdlib `http.server`; no dependencies).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch

log = logging.getLogger(__name__)

STATUS = "status.json"
LATEST = "latest.png"


# -- latent -> RGB ------------------------------------------------------------------------------
class LatentProjection:
    """RGB = [x, 1] @ W for a latent pixel x (C channels); W [C + 1, 3] fitted by least squares."""

    def __init__(self, channels: int, prior_weight: float = 0.05, ridge: float = 1e-3) -> None:
        self.channels = channels
        self.prior_weight = prior_weight
        self.ridge = ridge
        self._xtx = torch.zeros(channels + 1, channels + 1, dtype=torch.float64)
        self._xty = torch.zeros(channels + 1, 3, dtype=torch.float64)
        self.weight = torch.zeros(channels + 1, 3, dtype=torch.float64)
        self.weight[-1] = 0.5  # mid grey until something is fitted
        self.samples = 0

    @classmethod
    def from_vae(cls, vae, seed: int = 0) -> LatentProjection:
        """A projection with a prior fitted to a throwaway decode of random latents."""
        from .vae import StreamingDecoder

        decoder = StreamingDecoder(vae)  # its own causal cache: the run's decoder is not touched
        channels = vae.config.z_dim
        gen = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, channels, 3, 8, 8, generator=gen)
        frames = decoder.decode(latents)
        proj = cls(channels)
        proj.observe(latents, frames, first_frame_included=True, temporal=decoder.temporal_factor,
                     weight=proj.prior_weight)
        return proj

    def observe(self, latents: torch.Tensor, frames: np.ndarray, *, first_frame_included: bool, temporal: int,
                weight: float = 1.0) -> None:
        """Adds (latent pixel, RGB) pairs: latents [1, C, f, h, w] and the frames decoded from them.

        The first latent frame of a video decodes to one frame, every later one to `temporal`
        frames; each latent frame is paired with the mean of its frames, pooled to h x w.
        """
        lat = latents[0].detach().float().cpu()  # [C, f, h, w]
        c, f, h, w = lat.shape
        rgb = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0  # [n, H, W, 3]
        if rgb.shape[0] == 0:
            return
        sy, sx = rgb.shape[1] // h, rgb.shape[2] // w
        xs, ys, pos = [], [], 0
        for j in range(f):
            count = 1 if (first_frame_included and j == 0) else temporal
            group = rgb[pos : pos + count]
            pos += count
            if group.shape[0] == 0:
                break
            mean = group.mean(0)[: h * sy, : w * sx].reshape(h, sy, w, sx, 3).mean((1, 3))  # [h, w, 3]
            xs.append(lat[:, j].permute(1, 2, 0).reshape(-1, c))
            ys.append(mean.reshape(-1, 3))
        if not xs:
            return
        x = torch.cat(xs).double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        y = torch.cat(ys).double()
        self._xtx += weight * x.T @ x
        self._xty += weight * x.T @ y
        self.samples += x.shape[0]
        eye = torch.eye(c + 1, dtype=torch.float64) * self.ridge * max(1.0, float(self._xtx.diagonal().mean()))
        self.weight = torch.linalg.solve(self._xtx + eye, self._xty)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """latents [1, C, f, h, w] -> uint8 [h, f * w, 3]: the latent frames side by side."""
        lat = latents[0].detach().float()
        w = self.weight.to(device=lat.device, dtype=torch.float32)
        rgb = torch.einsum("cfhw,cd->hfwd", lat, w[:-1]) + w[-1]  # [h, f, w, 3]
        rgb = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return rgb.reshape(rgb.shape[0], -1, 3).numpy()


# -- files ------------------------------------------------------------------------------------
def _write_png(path: Path, image: np.ndarray) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    iio.imwrite(tmp, image, plugin="pillow", extension=".png")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class PreviewWriter:
    """Keeps one job's preview directory up to date; pass `on_step` as the engine's callback."""

    def __init__(self, directory: str | Path, *, name: str, total_frames: int, steps: int,
                 projection: LatentProjection, temporal_factor: int, start_frame: int = 0,
                 interval: float = 0.2) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.total, self.steps = name, total_frames, steps
        self.projection = projection
        self.temporal = temporal_factor
        self.interval = interval
        self.frames_done = start_frame
        self._start_frame, self._t0 = start_frame, time.monotonic()
        self._last_write = -float("inf")
        self._in_flight: dict[int, int] = {}  # chunk index -> steps taken
        self._pending: dict[int, torch.Tensor] = {}  # x0 not yet written
        self._files: set[str] = set()
        self.version = 0
        self.tick = 0
        for old in self.dir.glob("chunk_*.png"):  # a previous run's chunks
            old.unlink(missing_ok=True)
        self._write_status("running")

    def on_step(self, event) -> None:
        """Engine callback: remembers each stepping chunk's x0, writes at most every `interval` s."""
        self.tick = event.tick
        for index, step, x0 in event.chunks:
            self._in_flight[index] = step + 1
            self._pending[index] = x0
        if time.monotonic() - self._last_write >= self.interval:
            self._flush()

    def on_chunk(self, chunk) -> None:
        """A finished chunk (engine FrameChunk) was written: newest frame, projection refit."""
        if chunk.frames is not None and len(chunk.frames):
            self.projection.observe(chunk.latents, chunk.frames, first_frame_included=chunk.start == 0,
                                    temporal=self.temporal)
            _write_png(self.dir / LATEST, chunk.frames[-1])
            self.frames_done = chunk.start + len(chunk.frames)
        self._in_flight.pop(chunk.index, None)
        self._pending.pop(chunk.index, None)
        self._flush()

    def finish(self, ok: bool, reason: str | None = None) -> None:
        """Final status; in-flight chunk images are removed."""
        self._in_flight.clear()
        self._pending.clear()
        self._flush(state="done" if ok else "failed", reason=reason)

    def _flush(self, state: str = "running", reason: str | None = None) -> None:
        for index, x0 in self._pending.items():
            _write_png(self.dir / f"chunk_{index:05d}.png", self.projection(x0))
            self._files.add(f"chunk_{index:05d}.png")
        self._pending.clear()
        live = {f"chunk_{i:05d}.png" for i in self._in_flight}
        for stale in self._files - live:
            (self.dir / stale).unlink(missing_ok=True)
        self._files &= live
        self._write_status(state, reason)
        self._last_write = time.monotonic()

    def _write_status(self, state: str, reason: str | None = None) -> None:
        self.version += 1
        elapsed = time.monotonic() - self._t0
        made = self.frames_done - self._start_frame
        rate = made / elapsed if elapsed > 0 and made > 0 else None
        _write_json(self.dir / STATUS, {
            "name": self.name, "state": state, "reason": reason,
            "frames_done": self.frames_done, "frames_total": self.total,
            "frames_per_second": rate,
            "eta_seconds": (self.total - self.frames_done) / rate if rate else None,
            "tick": self.tick, "steps": self.steps,
            "latest": LATEST if (self.dir / LATEST).exists() else None,
            "chunks": [{"index": i, "step": s, "image": f"chunk_{i:05d}.png"}
                       for i, s in sorted(self._in_flight.items()) if f"chunk_{i:05d}.png" in self._files],
            "version": self.version, "updated": time.time(),
        })


# -- server -----------------------------------------------------------------------------------------
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>arvideo preview</title>
<style>
body{font:14px system-ui,sans-serif;background:#16181d;color:#e6e6e6;margin:24px}
h1{font-size:18px;margin:0 0 16px} .job{background:#20232b;border-radius:8px;padding:14px;margin-bottom:16px}
.head{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap} .name{font-weight:600;font-size:15px}
.state{padding:1px 8px;border-radius:10px;background:#2f5d9c} .done{background:#2e7d4f} .failed{background:#9c2f2f}
.bar{height:6px;background:#333;border-radius:3px;margin:10px 0} .bar>div{height:6px;background:#4a90e2;border-radius:3px}
.row{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
img{image-rendering:pixelated;background:#000;border-radius:4px;display:block}
.latest img{width:256px} .chunk img{height:96px} .label{color:#9aa;font-size:12px;margin-top:4px}
.reason{color:#f99;margin-top:8px;white-space:pre-wrap} .muted{color:#9aa}
</style></head><body>
<h1>arvideo &middot; live preview</h1><div id="jobs"><p class="muted">waiting for a run&hellip;</p></div>
<script>
const cards = {};
function fmt(s){ if(s==null) return "–"; s=Math.round(s); return s>=60 ? Math.floor(s/60)+"m "+(s%60)+"s" : s+"s"; }
function setImg(img, url){ if(img.dataset.url===url) return; const n=new Image();
  n.onload=()=>{img.src=url; img.dataset.url=url;}; n.src=url; }
function render(job){
  let c = cards[job.path];
  if(!c){ c=document.createElement("div"); c.className="job";
    c.innerHTML='<div class="head"><span class="name"></span><span class="state"></span><span class="stats muted"></span></div>'+
      '<div class="bar"><div></div></div><div class="row"><div class="latest"><img alt="latest frame"><div class="label">newest frame</div></div>'+
      '<div class="chunks row"></div></div><div class="reason"></div>';
    cards[job.path]=c; document.getElementById("jobs").appendChild(c); }
  const q=s=>c.querySelector(s);
  q(".name").textContent=job.name; const st=q(".state"); st.textContent=job.state; st.className="state "+job.state;
  q(".stats").textContent=job.frames_done+"/"+job.frames_total+" frames · "+
    (job.frames_per_second? job.frames_per_second.toFixed(1)+" frames/s · ":"")+"time left "+fmt(job.eta_seconds);
  q(".bar>div").style.width=(100*job.frames_done/Math.max(1,job.frames_total))+"%";
  if(job.latest) setImg(q(".latest img"), "/files/"+job.path+job.latest+"?v="+job.version);
  const box=q(".chunks"); const want=job.chunks.map(k=>String(k.index));
  for(const el of [...box.children]) if(!want.includes(el.dataset.index)) el.remove();
  for(const k of job.chunks){ let el=box.querySelector('[data-index="'+k.index+'"]');
    if(!el){ el=document.createElement("div"); el.className="chunk"; el.dataset.index=k.index;
      el.innerHTML='<img alt="chunk"><div class="label"></div>'; box.appendChild(el); }
    el.querySelector(".label").textContent="chunk "+k.index+" · step "+k.step+"/"+job.steps+" (x0)";
    setImg(el.querySelector("img"), "/files/"+job.path+k.image+"?v="+job.version); }
  q(".reason").textContent=job.reason||"";
}
async function poll(){
  try{ const r=await fetch("/api/status",{cache:"no-store"}); const data=await r.json();
    if(data.jobs.length){ const p=document.querySelector("#jobs>p"); if(p) p.remove(); }
    data.jobs.forEach(render);
  }catch(e){}
  setTimeout(poll, 500);
}
poll();
</script></body></html>
"""


def collect_status(directory: str | Path) -> list[dict[str, Any]]:
    """Every job's status.json under `directory` (its own, then one level of subdirectories)."""
    root = Path(directory)
    found = []
    candidates = [root / STATUS] + sorted(root.glob(f"*/{STATUS}"))
    for path in candidates:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rel = path.parent.relative_to(root).as_posix()
        status["path"] = "" if rel == "." else rel + "/"
        found.append(status)
    return found


def _handler(root: Path):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/status":
                self._send(json.dumps({"jobs": collect_status(root)}).encode(), "application/json")
            elif path.startswith("/files/"):
                target = (root / path[len("/files/"):]).resolve()
                if root not in target.parents or target.suffix not in (".png", ".json") or not target.is_file():
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                try:
                    body = target.read_bytes()
                except OSError:  # replaced between the check and the read
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self._send(body, "image/png" if target.suffix == ".png" else "application/json")
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("preview server: " + fmt, *args)

    return Handler


class PreviewServer:
    """Serves a preview directory's page on `host:port` (port 0: any free port) from a thread."""

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        from .errors import ConfigError

        try:
            self.httpd = ThreadingHTTPServer((host, port), _handler(self.dir))
        except OSError as exc:
            raise ConfigError(f"cannot serve previews on {host}:{port}: {exc}; pick another port") from exc
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> PreviewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="arvideo-preview", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()

    def __enter__(self) -> PreviewServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
