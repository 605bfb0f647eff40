"""The documentation stays true to the repository: links resolve, embedded tables equal their files, numbers
quoted next to a results file are in it, and the README stays a front page.

* every relative link (and image) in README.md, docs/*.md, conf/experiment/README.md and baselines/*/UPSTREAM.md
  names an existing file, and a ``#anchor`` names a heading of the target page (GitHub's slug rules);
* every ``<!-- table: <path> -->`` ... ``<!-- /table -->`` block holds the current content of <path>
  (``python scripts/sync_docs.py`` rewrites them);
* in every paragraph (blank-line separated, outside code blocks and embedded tables) that links a results file
  (a text file under results/: tables, bench, records, the rotation study, the cross-check), every decimal number
  appears in one of the files the paragraph links, as written or as the file's number rounded to the decimals
  quoted (28.93 for 28.934). Versions such as 2.13.0 are not numbers here;
* README.md is at most 20,000 bytes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("sync_docs", ROOT / "scripts/sync_docs.py")
sync_docs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("sync_docs", sync_docs)
_spec.loader.exec_module(sync_docs)

README_MAX_BYTES = 20_000

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "conf/experiment/README.md",
         *sorted(ROOT.glob("baselines/*/UPSTREAM.md"))]
IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
EMBEDDED = re.compile(r"^<!-- table: \S+ -->[ \t]*\n.*?^<!-- /table -->[ \t]*$", re.MULTILINE | re.DOTALL)
NUMBER = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])")
ANY_NUMBER = re.compile(r"\d+(?:\.\d+)?")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
#: linked files whose numbers a paragraph quotes: text files under results/
RESULTS_TEXT = {".md", ".csv", ".json", ".tex", ".txt"}


def without_code(text: str) -> str:
    """The page with fenced code blocks blanked (line count kept, so paragraphs stay apart)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def prose(text: str) -> str:
    """The page as prose: no code blocks, no embedded tables (checked against their files), no HTML comments."""
    return COMMENT.sub("", EMBEDDED.sub("", without_code(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _, - and spaces kept),
    spaces to hyphens."""
    heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = re.sub(r"<[^>]+>", "", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_code(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(text: str) -> list[str]:
    """Link targets of a piece of prose (inline code removed first: a link there is an example, not a link)."""
    return [m[2] for m in LINK.finditer(INLINE_CODE.sub("", text))]


def local_target(page: Path, target: str) -> tuple[Path | None, str]:
    """(the file a relative link names, its #anchor); (None, '') for URLs."""
    if not target or SCHEME.match(target):
        return None, ""
    path, _, anchor = target.partition("#")
    return (page.parent / path).resolve() if path else page, anchor


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_relative_links_resolve(page):
    bad = []
    text = prose(page.read_text(encoding="utf-8"))
    for target in links(text):
        path, anchor = local_target(page, target)
        if path is None:
            continue
        if not path.is_file():
            bad.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading '#{anchor}' in {path.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_embedded_tables_equal_their_files():
    problems = sync_docs.check()
    assert not problems, "\n".join(problems) + "\n(refresh with: python scripts/sync_docs.py)"


def _rounds_to(quoted: str, candidates: list[float]) -> bool:
    decimals = len(quoted.split(".")[1])
    value, tol = float(quoted), 0.5 * 10 ** -decimals * (1 + 1e-9)
    return any(abs(c - value) <= tol for c in candidates)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_numbers_quoted_from_results_files_are_in_them(page):
    bad = []
    cache: dict[Path, list[float]] = {}
    for para in re.split(r"\n[ \t]*\n", prose(page.read_text(encoding="utf-8"))):
        files = []
        for target in links(para):
            path, _ = local_target(page, target)
            if path is not None and path.is_file() and path != page:
                files.append(path)
        results = [f for f in files if f.suffix in RESULTS_TEXT and (ROOT / "results") in f.parents]
        if not results:
            continue
        candidates: list[float] = []
        for f in files:
            if f not in cache:
                try:
                    cache[f] = [float(x) for x in ANY_NUMBER.findall(f.read_text(encoding="utf-8"))]
                except UnicodeDecodeError:  # an image: nothing to quote from
                    cache[f] = []
            candidates += cache[f]
        words = re.sub(r"\]\([^)]*\)", "]", para)  # link targets are paths, not quoted numbers
        missing = sorted({n for n in NUMBER.findall(words) if not _rounds_to(n, candidates)}, key=float)
        if missing:
            names = ", ".join(str(f.relative_to(ROOT)) for f in files)
            bad.append(f"{', '.join(missing)} not in {names}:\n    {para.strip()[:300]}")
    assert not bad, f"{page.relative_to(ROOT)}: numbers that the linked files do not hold:\n" + "\n".join(bad)


def test_readme_is_a_front_page():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes (at most {README_MAX_BYTES:,}): move depth to docs/"


def test_sync_docs_rewrites_a_stale_block_and_reports_a_missing_file(tmp_path):
    source = "results/tables/digits_cost.md"
    page = tmp_path / "page.md"
    page.write_text(f"intro\n\n<!-- table: {source} -->\n| stale |\n<!-- /table -->\n\n"
                    "<!-- table: results/tables/no_such_table.md -->\nplaceholder\n<!-- /table -->\nend\n")
    problems = sync_docs.check([page])
    assert any("differs from the file" in p for p in problems) and any("does not exist" in p for p in problems)
    updated, problems = sync_docs.sync([page])
    assert len(updated) == 1 and len(problems) == 1
    text = page.read_text()
    assert f"<!-- table: {source} -->\n{(ROOT / source).read_text()}<!-- /table -->\n" in text
    assert "placeholder" in text and text.startswith("intro\n") and text.endswith("end\n")
    assert [p for p in sync_docs.check([page]) if "differs" in p] == []
    page.write_text(f"<!-- table: {source} -->\nno closing marker\n")
    assert "has no '<!-- /table -->' line" in sync_docs.check([page])[0]
