"""Refresh the tables embedded in README.md and docs/*.md from the files they come from.

    python scripts/sync_docs.py           # rewrite every stale block in place
    python scripts/sync_docs.py --check   # change nothing; exit 1 listing stale blocks

An embedded table is a block

    <!-- table: results/tables/digits.md -->
    ...the file's content, verbatim...
    <!-- /table -->

whose path is relative to the repository root (in docs/*.md too). After `make_tables.py` (or any script that writes
such a file) regenerates a table, this one command makes every page that shows it show the new content;
`tests/test_docs.py` fails while a block differs from its file. A block whose file does not exist is reported and
left as it is, and the exit status is 1 in both modes.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OPEN = re.compile(r"^<!-- table: (?P<path>\S+) -->[ \t]*$", re.MULTILINE)
CLOSE = "<!-- /table -->"


@dataclass
class Block:
    doc: Path          # the page holding the block
    path: str          # the embedded file, relative to the repository root
    start: int         # offset of the first character of the block's content (after the opening line)
    end: int           # offset of the closing marker
    content: str       # what the block holds now
    line: int          # 1-based line of the opening marker

    @property
    def source(self) -> Path:
        return ROOT / self.path


def _name(doc: Path) -> str:
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else str(doc)


def pages(root: Path = ROOT) -> list[Path]:
    """The pages whose blocks are kept in sync: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def file_text(path: Path) -> str:
    """What a block holding ``path`` must contain: the file's text, ending with one newline."""
    text = path.read_text(encoding="utf-8")
    return text if text.endswith("\n") else text + "\n"


def blocks(doc: Path) -> tuple[list[Block], list[str]]:
    """The embedded blocks of one page, and the problems that make a block unreadable (an opening marker without
    its closing one)."""
    text = doc.read_text(encoding="utf-8")
    found: list[Block] = []
    problems: list[str] = []
    for m in OPEN.finditer(text):
        start = m.end() + 1 if text[m.end():m.end() + 1] == "\n" else m.end()
        line = text.count("\n", 0, m.start()) + 1
        end = text.find("\n" + CLOSE, m.end())
        nxt = OPEN.search(text, m.end())
        if end < 0 or (nxt is not None and nxt.start() < end):
            problems.append(f"{_name(doc)}:{line}: '<!-- table: {m['path']} -->' has no '{CLOSE}' line")
            continue
        end += 1  # the closing marker starts after the newline
        found.append(Block(doc, m["path"], start, end, text[start:end], line))
    return found, problems


def check(root_pages: list[Path] | None = None) -> list[str]:
    """Every problem: blocks that differ from their file, blocks whose file is missing, unterminated blocks."""
    problems: list[str] = []
    for doc in root_pages or pages():
        found, bad = blocks(doc)
        problems += bad
        for b in found:
            where = f"{_name(doc)}:{b.line}"
            if not b.source.is_file():
                problems.append(f"{where}: embeds {b.path}, which does not exist")
            elif b.content != file_text(b.source):
                problems.append(f"{where}: the block of {b.path} differs from the file (python scripts/sync_docs.py)")
    return problems


def sync(root_pages: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """Rewrite stale blocks in place. Returns (what was updated, what could not be)."""
    updated: list[str] = []
    problems: list[str] = []
    for doc in root_pages or pages():
        found, bad = blocks(doc)
        problems += bad
        text = doc.read_text(encoding="utf-8")
        # back to front, so earlier offsets stay valid
        for b in sorted(found, key=lambda b: b.start, reverse=True):
            where = f"{_name(doc)}:{b.line}"
            if not b.source.is_file():
                problems.append(f"{where}: embeds {b.path}, which does not exist (left as it is)")
                continue
            new = file_text(b.source)
            if b.content != new:
                text = text[:b.start] + new + text[b.end:]
                updated.append(f"{where}: {b.path}")
        if any(u.startswith(f"{_name(doc)}:") for u in updated):
            doc.write_text(text, encoding="utf-8")
    return updated, problems


def main(argv: list[str] | None = None) -> int:
    head, tail = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=head, epilog=tail, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale or missing")
    args = ap.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(p)
        if not problems:
            print("every embedded table equals its file")
        return 1 if problems else 0
    updated, problems = sync()
    for u in updated:
        print(f"updated {u}")
    for p in problems:
        print(p, file=sys.stderr)
    if not updated and not problems:
        print("every embedded table already equals its file")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
