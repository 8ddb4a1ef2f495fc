"""The README is what a newcomer reads first: short, its two commands the ones CI runs, every link and every
path it names real, and its tree table naming every package of spin_mega/."""

from __future__ import annotations

import re

from tests.support import REPO

README = (REPO / "README.md").read_text()


def test_readme_is_short_and_opens_with_the_demo_and_test_commands():
    assert len(README.splitlines()) <= 200
    commands = re.findall(r"^bash scripts/install\.sh && (.+)$", README, flags=re.M)
    assert commands[:2] == [".venv/bin/spin-mega demo --workdir spin-mega-demo", ".venv/bin/python -m pytest -q -p no:cacheprovider"]
    # CI runs the README's test command verbatim.
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("bash scripts/install.sh && " + commands[1])


def test_every_link_and_path_the_readme_names_exists():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links, "the README links its documents"
    missing = [link for link in links if not link.startswith("http") and not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    # Paths in backticks that look like repository paths (a folder or a file with a known suffix).
    named = {p for p in re.findall(r"`([\w./-]+(?:/|\.py|\.md|\.sh|\.yaml|\.json))`", README)
             if not p.startswith(("spin-mega-demo", "runs/", "iter_", "/"))}
    roots = [REPO, REPO / "spin_mega", REPO / "configs", REPO / "benchmarks" / "results"]
    unknown = sorted(p for p in named if not any((root / p).exists() for root in roots))
    assert not unknown, f"README names paths that do not exist: {unknown}"


def test_the_tree_table_names_every_package_of_spin_mega():
    tree = README[README.index("## Tree"):]
    packages = sorted(p.name for p in (REPO / "spin_mega").iterdir()
                      if p.is_dir() and (p / "__init__.py").exists() and p.name != "configs")
    absent = [name for name in packages if f"{name}/" not in tree]
    assert not absent, f"the README's tree table leaves out spin_mega/{absent}"
