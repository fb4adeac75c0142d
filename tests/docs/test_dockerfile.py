"""The Dockerfile, checked without Docker (no daemon on our machines): the README's `docker build`
lines are not run, so this is what stands for them.

The instructions are read (continuation lines joined, heredoc bodies skipped), then:
- every COPY source from the build context exists and is not excluded by .dockerignore;
- the build context the builder stage copies is rebuilt in a temporary folder, exactly as the
  COPY lines lay it out, and `pip wheel .` is run there: the wheel must hold every module of the
  editable install (services, gateway, apps, the generated stubs and the SDK `labelgrid.client`,
  which `labelgrid up` imports), so `pip install .` in the image installs a working labelgrid;
- the FLAVOR build argument has a base stage per value the README uses, and the entry point
  names only commands pyproject.toml installs.
(hadolint 2.15 cannot parse COPY heredocs, so it is not used.)
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"

pytestmark = pytest.mark.timeout(300)


def instructions() -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) of the Dockerfile; heredoc bodies are left out."""
    lines = DOCKERFILE.read_text().splitlines()
    found: list[tuple[int, str, str]] = []
    index = 0
    while index < len(lines):
        start, text = index, lines[index]
        index += 1
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        while text.endswith("\\") and index < len(lines):
            following = lines[index]
            index += 1
            if following.lstrip().startswith("#"):
                continue
            text = text[:-1] + " " + following.strip()
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?", text)
        if heredoc:
            while index < len(lines) and lines[index].strip() != heredoc[1]:
                index += 1
            index += 1
        keyword, _, rest = text.strip().partition(" ")
        found.append((start + 1, keyword.upper(), rest.strip()))
    return found


def copies() -> list[tuple[int, list[str], str]]:
    """(line, sources, destination) of the COPY instructions from the build context."""
    result = []
    for line, keyword, rest in instructions():
        if keyword != "COPY":
            continue
        words = rest.split()
        if any(word.startswith("--from") for word in words) or any(word.startswith("<<") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        result.append((line, paths[:-1], paths[-1]))
    return result


def ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_copy_sources_exist_and_reach_the_build() -> None:
    assert copies(), "the Dockerfile copies nothing from the context"
    for line, sources, _ in copies():
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile:{line}: COPY {source}: no such path"
            assert not ignored(source), f"Dockerfile:{line}: COPY {source}, but .dockerignore excludes it"


def test_pip_install_in_the_image_gets_every_module(tmp_path: Path) -> None:
    """The builder's `pip install .`, on the context its COPY lines make, builds a complete wheel."""
    workdir = "/src"
    context = tmp_path / "src"
    context.mkdir()
    for _, sources, dest in copies():
        for source in sources:
            target = context / dest.removeprefix(workdir).lstrip("/").removeprefix("./") if dest != "./" else context
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                destination = target / origin.name if dest.endswith("/") else target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
        cwd=context, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
    )  # fmt: skip
    assert built.returncode == 0, f"pip wheel . on the image's build context failed:\n{built.stdout[-4000:]}"
    [wheel] = (tmp_path / "dist").glob("labelgrid-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}

    sources = {"services": "services", "gateway": "gateway", "apps": "apps",
               "sdk/labelgrid/client": "labelgrid/client", "protos/gen/python/labelgrid": "labelgrid"}  # fmt: skip
    expected = {
        f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, package in sources.items()
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts and "tests" not in path.relative_to(ROOT).parts
    }
    assert "labelgrid/client/cli.py" in expected
    assert sorted(expected - in_wheel) == [], "modules of labelgrid that the image would not have"


def test_flavors_and_entry_point_commands() -> None:
    text = DOCKERFILE.read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+([\w.-]+)", text, re.M | re.I))
    assert {"base-cpu", "base-cuda"} <= stages
    assert re.search(r"^ARG FLAVOR=cpu$", text, re.M)
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    named = set(re.findall(r"\b(labelgrid(?:-[a-z]+)?)\b", text.split("COPY --chmod=0755", 1)[1].split("\nEOF", 1)[0]))
    named.discard("labelgrid-entrypoint")
    assert named and named <= scripts, (
        f"the entry point runs commands pyproject.toml does not install: {named - scripts}"
    )
