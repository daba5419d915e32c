"""Decode-ahead: finished chunks are decoded on one background thread while generation goes on.

The engine's loop is: advance every chunk in flight one step, hand out what finished. Decoding a
finished chunk (the VAE) used to sit in that loop, so the next denoising step waited for it. On
a CPU neither the transformer's many small operations nor the decoder's convolutions keep both
cores busy, so running the decoder beside the transformer shortens the whole run (measured in
docs/benchmarks.md, "Decode ahead"); PyTorch releases the GIL inside its operations.

Order and results are unchanged: one worker thread decodes chunks strictly in order with the
same `StreamingDecoder`, so the frames equal the synchronous path's (tests/test_engine.py). For
resumable runs the decoder's state is captured right after each chunk's decode, so a snapshot
taken when chunk n has been handed out pairs "frames up to chunk n" with the decoder state at
that point, and every finished chunk not yet handed out travels in the snapshot as latents.
That capture is one copy of the decoder's causal cache per chunk whenever the caller asks for
snapshots (1.2 MB on the shipped model; `arvideo generate` saves its state after every chunk by
default, which needed that copy anyway); with `--state-every` > 0 some of those copies go unused.

`DecodeWorker(decoder, background=False)` decodes in the caller's thread at submit time: the
synchronous reference path.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .vae import StreamingDecoder


@dataclass
class Decoded:
    """One finished chunk, decoded: its frames and (if asked for) the decoder state after it."""

    index: int
    latents: torch.Tensor
    frames: np.ndarray
    decoder_state: dict | None


class DecodeWorker:
    """Decodes submitted chunks in submission order, on a background thread or inline."""

    def __init__(self, decoder: StreamingDecoder, *, background: bool = True, keep_state: bool = False) -> None:
        self.decoder = decoder
        self.keep_state = keep_state
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="arvideo-decode") if background else None
        self._queue: deque[tuple[int, torch.Tensor, Future]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, index: int, latents: torch.Tensor) -> None:
        if self._pool is not None:
            future = self._pool.submit(self._decode, latents)
        else:
            future = Future()
            try:
                future.set_result(self._decode(latents))
            except BaseException as exc:  # surfaces in pop(), like a background failure
                future.set_exception(exc)
        self._queue.append((index, latents, future))

    def _decode(self, latents: torch.Tensor) -> tuple[np.ndarray, dict | None]:
        frames = self.decoder.decode(latents)
        return frames, self.decoder.state() if self.keep_state else None

    def ready(self) -> bool:
        """True when the oldest submitted chunk is decoded (pop() will not wait)."""
        return bool(self._queue) and self._queue[0][2].done()

    def pop(self) -> Decoded:
        """The oldest submitted chunk, decoded (waits for it); a decode error is raised here."""
        index, latents, future = self._queue.popleft()
        frames, state = future.result()
        return Decoded(index, latents, frames, state)

    def pending(self) -> list[tuple[int, torch.Tensor]]:
        """(index, latents) of the chunks submitted and not yet popped, in order."""
        return [(index, latents) for index, latents, _ in self._queue]

    def close(self) -> None:
        """Drops what is queued and waits for a decode in progress (the decoder is then idle)."""
        for _, _, future in self._queue:
            future.cancel()
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
