"""Run state at a tick boundary: what a killed run needs to continue exactly where it was."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .caching.base import BackboneProbe
from .chunk import Chunk
from .errors import ConfigError
from .kvstore import KVStore


@dataclass
class Run:
    """The live state of a KV-mode run (owned by the engine while it streams)."""

    chunks: dict[int, Chunk]
    store: KVStore
    next_tick: int = 0
    probe: BackboneProbe | None = None  # shared by every chunk's policy context; never carries the model

    def snapshot(self, fingerprint: str, emitted_frames: int, model_calls: int, decoder: dict | None,
                 pending: list[tuple[int, torch.Tensor]] = ()) -> RunState:
        """A deep copy on the CPU, safe to keep while the run goes on."""
        store = copy.copy(self.store)
        store.keys = [k[:, :, : store.committed].cpu().clone() for k in self.store.keys]
        store.values = [v[:, :, : store.committed].cpu().clone() for v in self.store.values]
        store.segments = list(self.store.segments)
        chunks = {}
        for i, c in self.chunks.items():
            chunks[i] = copy.deepcopy(Chunk(
                c.index, c.frame_start, c.frame_end, c.latents.cpu(), c.sampler_state, c.policy, c.step, None,
                [(k.cpu(), v.cpu()) for k, v in c.kv] if c.kv else None,
                c.guidance.to("cpu") if c.guidance is not None else None,
            ))
        return RunState(fingerprint, emitted_frames, model_calls, decoder,
                        Run(chunks, store, self.next_tick, self.probe), [(i, x.cpu().clone()) for i, x in pending])


@dataclass
class RunState:
    """A resumable snapshot; `save`/`load` put it on disk atomically."""

    fingerprint: str
    emitted_frames: int
    model_calls: int
    decoder: dict | None
    run: Run = field(repr=False)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list, repr=False)  # finished, not yet handed out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(self, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def load(path: str | Path) -> RunState:
        try:
            state = torch.load(path, weights_only=False)
        except Exception as exc:
            raise ConfigError(f"cannot read run state {path}: {exc}; delete it to start over") from exc
        if not isinstance(state, RunState):
            raise ConfigError(f"{path} is not an arvideo run state; delete it to start over")
        store = state.run.store
        # re-grow the saved (trimmed) K/V to the store's working capacity
        trimmed_keys, trimmed_values = store.keys, store.values
        cap = max(store.committed + store.scratch, (store.budget or 0) + 1, store.committed + 1)
        store._alloc(cap, trimmed_keys[0].dtype, trimmed_keys[0].device)
        for layer in range(store.num_layers):
            store.keys[layer][:, :, : store.committed] = trimmed_keys[layer]
            store.values[layer][:, :, : store.committed] = trimmed_values[layer]
        return state


def request_fingerprint(resolved: Any, model_path: Any) -> str:
    """Hash of everything that determines the frames (not the device or progress settings)."""
    cfg = asdict(resolved.cfg)
    for key in ("device", "attention", "decode_ahead"):
        cfg.pop(key, None)
    if not cfg.get("sections"):  # keys added with prompt sections: states saved before them stay valid
        cfg.pop("sections", None)
        cfg.get("kv", {}).pop("section_sink", None)
    if cfg.get("kv", {}).get("evict_unit") == "token":  # added in session 14; its default hashes as before
        cfg["kv"].pop("evict_unit")
    blob = json.dumps({"cfg": cfg, "model": str(model_path)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
