"""pyproject.toml: the packages a non-editable install (the Docker image, a wheel) ships.

An editable install maps the source folders and hides a package missing from the
explicit list; a wheel silently leaves it out and the server fails at import. This
compares the list with the folders that hold an ``__init__.py``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_package_is_in_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = setuptools["package-dir"]
    found = set()
    for name, folder in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    for package in listed:  # data-only ones (static) have no __init__.py, but a folder
        root = max((name for name in roots if package.startswith(name)), key=len)
        tail = package.removeprefix(root).strip(".").split(".")
        assert (ROOT / roots[root]).joinpath(*filter(None, tail)).is_dir(), package
