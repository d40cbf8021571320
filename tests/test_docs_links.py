"""The documentation's links resolve: every relative Markdown link in the README and docs/ (and the other READMEs)
points at a file or folder of the repository, and a `#fragment` at a heading of its target. No file cites a design
document that lives outside the repository."""
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SKIP_DIRS = {".git", ".venv", "build", "dist", "results", "__pycache__", ".pytest_cache", ".benchmarks"}
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _files(suffixes):
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if path.is_file() and path.suffix in suffixes and not any(
                part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            yield path


MARKDOWN = list(_files({".md"}))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set:
    out, seen = set(), {}
    for line in _FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_matches_github():
    assert slug("Defaults and TRL 1.16") == "defaults-and-trl-116"
    assert slug("On a GPU: `python -m bench gpu`") == "on-a-gpu-python--m-bench-gpu"
    assert slug("Loss, CPU quick sweep (2026-11-28)") == "loss-cpu-quick-sweep-2026-11-28"


def test_the_docs_exist():
    names = {p.relative_to(REPO).as_posix() for p in MARKDOWN}
    for page in ("README.md", "docs/README.md", "docs/design.md", "docs/trainer.md", "docs/integrations.md",
                 "docs/scaling.md", "docs/benchmarks.md", "docs/results.md"):
        assert page in names, f"{page} is missing"


@pytest.mark.parametrize("md", MARKDOWN, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(md):
    text = _FENCE.sub("", md.read_text())
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        where, _, fragment = target.partition("#")
        dest = (md.parent / where).resolve() if where else md
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(REPO) if REPO in dest.parents else dest})")
        elif REPO != dest and REPO not in dest.parents:
            broken.append(f"{target} (outside the repository)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.relative_to(REPO)})")
    assert not broken, f"{md.relative_to(REPO)}: " + "; ".join(broken)


def test_nothing_cites_the_outside_design_document():
    outside = ("DESIGN" + ".md", "../" + "shared", "/work/" + "shared")
    me = Path(__file__).resolve()
    hits = [f"{p.relative_to(REPO)}: {s}" for p in _files({".py", ".md", ".toml", ".cpp", ".yaml", ".txt", ".cfg"})
            if p.resolve() != me for s in outside if s in p.read_text(errors="replace")]
    assert not hits, "cites a file outside the repository: " + "; ".join(hits)
