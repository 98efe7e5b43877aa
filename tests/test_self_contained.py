"""The repository is self-contained: everything a reader or contributor needs is inside it.

- No file refers to a path outside the repository (a folder shared beside it, a house-plan file
  or a GPU harness script that a clone does not have), to the project's issue tracker by number,
  or to the Rust engine kvlab mirrors by a nickname a reader cannot look up: it is ferrum, named
  in docs/design.md.
- Every relative link in a Markdown file or a notebook's Markdown cell, and every ``docs/….md``
  path mentioned anywhere, names a file that exists, and its ``#section`` a heading of that file.

Files are the ones git tracks plus new ones it does not ignore, this one included (its patterns
are written so that they do not match themselves). Notebooks are read cell by cell (sources and
text outputs; images are skipped: their base64 is not text anyone reads).
"""
from __future__ import annotations

import json
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Rules a line must not break: (what it means, pattern).
OUTSIDE = [
    ("a path outside the repository", re.compile(r"\.\./shared|shared[/]gpu")),
    ("the house plan a clone does not have (use docs/design.md)",
     re.compile(r"\bDESIGN(\.md\b| ?§)")),
    ("a GPU harness that is not part of the repository", re.compile(r"\.gpu/run\.sh")),
    # a number after the word, with or without a hash, two or more ("issues N and M"), a hash
    # number in brackets or after a closing verb; not the verb ("v3 issues 4 loads")
    ("an issue number", re.compile(r"\b[Ii]ssues? #\d+|\b[Ii]ssue \d+(?:['’]s\b|[).,;:]|$)"
                                   r"|\b[Ii]ssues \d+(?:, \d+)*,? and \d+\b(?! \w*loads?\b)"
                                   r"|\(#\d+(?:[),;]| and\b)"
                                   r"|\b(?:[Ff]ix(?:es|ed)?|[Cc]loses?|[Rr]esolves?) #\d+")),
]
JARGON = [
    ("'the seed' for the engine kvlab mirrors: say ferrum",
     re.compile(r"\bseed[ ]engine\b|\bseed['’]s\b|\(the \"seed\"\)|\bseed[ _]map\b"
                r"|\bseeds?_bars?\b|\bseed[_]api\b")),
]
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w./-])((?:\.\./)?docs/[\w./-]+?\.md)(#[\w-]+)?")


@lru_cache(maxsize=None)
def repo_files() -> tuple[Path, ...]:
    """Tracked files and untracked ones git does not ignore (a new file is checked before it is
    committed)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the file list comes from git")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return tuple(sorted(ROOT / p for p in set(out.split("\0")) if p and (ROOT / p).is_file()))


def _notebook_text(path: Path) -> list[tuple[str, str]]:
    """(kind, text) per notebook cell: its source, and each text output."""
    parts = []
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        parts.append((f"cell {i} {cell['cell_type']}", "".join(cell["source"])))
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain") or ""
            parts.append((f"cell {i} output", "".join(text)))
    return parts


@lru_cache(maxsize=None)
def text_of(path: Path) -> tuple[tuple[str, str], ...]:
    """The readable text of a file as (where, text) parts; empty for a binary file."""
    if path.suffix == ".ipynb":
        return tuple(_notebook_text(path))
    raw = path.read_bytes()
    if b"\0" in raw:
        return ()
    try:
        return (("", raw.decode("utf-8")),)
    except UnicodeDecodeError:
        return ()


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if root in path.parents else str(path)


def hits(rules, files, root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        for where, text in text_of(path):
            for n, line in enumerate(text.splitlines(), 1):
                for meaning, pattern in rules:
                    if pattern.search(line):
                        loc = f"{_name(path, root)}:{where + ' ' if where else ''}line {n}"
                        found.append(f"{loc}: {meaning}: {line.strip()[:120]}")
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    parts = text_of(path) if path.suffix in (".md", ".ipynb") else ()
    return {slug(m.group(1)) for _, text in parts
            for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def link_problems(files, root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        markdown = path.suffix == ".md"
        for where, text in text_of(path):
            in_markdown = markdown or where.endswith("markdown")
            targets = []
            if in_markdown:  # relative links, resolved from the file's folder
                prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
                for m in MARKDOWN_LINK.finditer(prose):  # code is not a link: `k[g, b](args)`
                    target = m.group(1)
                    if not re.match(r"[a-z]+:|mailto:|/", target):
                        targets.append((target, path.parent))
            for m in DOCS_PATH.finditer(text):  # a docs page named in prose or code
                base = path.parent if m.group(1).startswith("../") else root
                targets.append((m.group(1) + (m.group(2) or ""), base))
            for target, base in targets:
                file_part, _, anchor = target.partition("#")
                dest = (base / file_part).resolve() if file_part else path
                loc = f"{_name(path, root)}{' ' + where if where else ''}"
                if not dest.exists() or root not in (dest, *dest.parents):
                    problems.append(f"{loc}: {target}: no such file in the repository")
                elif anchor and anchor not in anchors(dest):
                    problems.append(f"{loc}: {target}: {dest.name} has no heading #{anchor}")
    return sorted(set(problems))


def _files(notebooks: bool) -> list[Path]:
    return [p for p in repo_files() if (p.suffix == ".ipynb") == notebooks]


def test_the_file_list_is_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p in repo_files()}
    assert {"README.md", "docs/design.md", "pyproject.toml"} <= names
    assert not any(n.startswith(".venv/") for n in names)


def test_no_reference_outside_the_repository():
    found = hits(OUTSIDE, _files(notebooks=False))
    assert not found, "\n".join(found)


def test_notebooks_make_no_reference_outside_the_repository():
    found = hits(OUTSIDE, _files(notebooks=True))
    assert not found, "\n".join(found)


def test_the_mirrored_engine_is_called_ferrum():
    found = hits(JARGON, repo_files())
    assert not found, "\n".join(found)


def test_links_to_files_and_sections_resolve():
    problems = link_problems(repo_files())
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """Each rule fires on a line that breaks it, and a broken link or section is reported."""
    bad = tmp_path / "bad.md"
    plan, harness = "DESIGN" + ".md", ".gpu/" + "run.sh"  # split: this file is checked too
    bad.write_text(f"see ../{'shared'}/{plan} §4\nas {plan[:6]} §6 says\nrun bash {harness}\n"
                   f"issue #{9}'s targets\nper issue {9}\n(#{4}, tests)\nthe seed {'engine'}\n"
                   f"as issues {18} and {19} asked\nthis fixes #{7}\n"
                   "[gone](missing.md) [no such section](bad.md#nowhere)\n# A heading\n"
                   "[fine](bad.md#a-heading) `kernel[grid, block](args...)`\n")
    assert len(hits(OUTSIDE, [bad])) == 9  # line 1 breaks two rules
    assert len(hits(JARGON, [bad])) == 1
    ok = tmp_path / "ok.md"
    ok.write_text("random seed=0, hex #555555, ROCm PR #50, block #3, issues are welcome,\n"
                  "one load where v3 issues 4 or 8, a warp may issue 2 loads, v2 issues 2 and "
                  "4 loads\n")
    assert not hits(OUTSIDE + JARGON, [ok])
    problems = link_problems([bad], root=tmp_path)
    assert any("missing.md: no such file" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert not any("#a-heading" in p or "args" in p for p in problems)
    outside = link_problems([bad], root=tmp_path / "sub")  # bad.md itself lies outside that root
    assert any("no such file in the repository" in p for p in outside)
