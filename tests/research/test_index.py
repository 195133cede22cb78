"""Research stays apart from the product, and research/README.md indexes all of it."""

import glob
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RESEARCH = os.path.join(ROOT, "research")


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_product_folders_hold_no_research():
    assert glob.glob(os.path.join(ROOT, "docs", "results*")) == []
    assert glob.glob(os.path.join(ROOT, "docs", "*.png")) == []
    assert len(glob.glob(os.path.join(ROOT, "jobs", "*.yaml"))) <= 6
    readme = _read("README.md")
    assert len(readme.splitlines()) <= 300
    assert "make test" in readme and "research/README.md" in readme


def test_index_names_every_config_result_and_plot():
    index = _read("research", "README.md")
    named = set(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", index, flags=re.S)))
    for path in glob.glob(os.path.join(RESEARCH, "configs", "*.yaml")):
        name = os.path.basename(path)
        short = name.removeprefix("experiment-rsicd-").removesuffix(".yaml")
        assert name in named or short in named, f"research/README.md does not list {name}"
    for path in glob.glob(os.path.join(RESEARCH, "results", "*")):
        name = os.path.basename(path)
        assert name.removeprefix("results_") in named or name in named, f"research/README.md does not list {name}"


def _anchors(page: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", _read(page), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_relative_links_of_the_research_and_product_docs_resolve():
    pages = ["README.md", "research/README.md", "research/results.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", _read(page)):
            if "://" in target:
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            if not os.path.exists(os.path.join(ROOT, path)):
                broken.append(f"{page}: {target}")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                broken.append(f"{page}: {target}#{anchor}")
    assert broken == []
