"""Writing measured tables into the docs: one marked section of a Markdown file, replaced in place."""
from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import torch


def write_marked_section(path: Path, begin: str, end: str, text: str, header: str = "") -> None:
    """Put `text` between the `begin` and `end` marker lines of `path`, replacing what was there;
    append the section (to `header` if the file does not exist yet) when the markers are missing."""
    path = Path(path)
    doc = path.read_text() if path.is_file() else header
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def device_line() -> str:
    """`CPU <model name>, torch <version>, <n> thread(s), float32`: the machine line of a CPU benchmark table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32"


def measured_line() -> str:
    """`Measured <UTC date and time> on <device_line()>`: how a CPU benchmark table starts."""
    return f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device_line()}"
