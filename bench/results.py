"""bench/RESULTS.md: one `## title` section per benchmark, replaced in place by the script that measured it."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `## title` section of a markdown file, leaving the other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = f"## {title}\n"
    if head in text:
        before, rest = text.split(head, 1)
        after = rest[rest.find("\n## ") :] if "\n## " in rest else ""
        text = before + head + "\n" + body.strip() + "\n" + after
    else:
        text = text.rstrip() + "\n\n" + head + "\n" + body.strip() + "\n"
    path.write_text(text)
