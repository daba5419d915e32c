"""Writing measured tables into the docs: one marked section of a Markdown file, replaced in place."""
from __future__ import annotations

import re
from pathlib import Path


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
