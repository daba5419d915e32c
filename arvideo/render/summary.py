"""The batch summary: a table of every job's result, then each failure's full reason."""
from __future__ import annotations

from .job import JobResult


def summary_table(results: list[JobResult]) -> str:
    """A plain-text table of the batch, then one line per failure with its full reason."""
    from ..memory import format_size

    show_peak = any(r.peak_bytes for r in results)
    head = ["job", "status", "frames", "time", *(["peak memory"] if show_peak else []), "output / reason"]
    rows = []
    for r in results:
        status = "ok" if r.ok else "FAILED"
        if r.ok and r.resumed_from:
            status = f"ok (resumed at {r.resumed_from})"
        where = ", ".join(r.outputs) if r.ok else f"{r.error_type}: {r.reason}"
        if len(where) > 90:
            where = where[:87] + "..."
        rows.append([r.name, status, f"{r.frames}/{r.total_frames}", f"{r.seconds:.1f} s",
                     *([format_size(r.peak_bytes) if r.peak_bytes else "-"] if show_peak else []), where])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [head] + rows]
    ok = sum(r.ok for r in results)
    lines.append(f"{len(results)} jobs: {ok} done, {len(results) - ok} failed")
    for r in results:
        if not r.ok:
            kept = f" (kept: {', '.join(r.left)})" if r.left else " (no output written)"
            lines.append(f"failed: {r.name}: {r.error_type}: {r.reason}{kept}")
    return "\n".join(lines)
