"""README.md runs as written: its examples are executed against a real `labelgrid up`.

The fenced blocks of README.md are read in order:

- ```sh / ```bash / ```python blocks run one after another in one temporary folder (each
  python block in a fresh interpreter, each shell block under `bash -e -o pipefail`), with the
  venv's bin/ first on PATH, against a stack this module starts with `labelgrid up` on free
  loopback ports. The README's address `127.0.0.1:8000` is replaced with that stack's address
  (the only rewrite), and LABELGRID_URL (http://127.0.0.1:PORT) and LABELGRID_TARGET
  (127.0.0.1:PORT) are exported. A failing block fails its own test, named after its line.
- A block preceded by `<!-- not-run: why -->` is not executed; test_not_run_blocks_are_checked_elsewhere
  checks what it names another way (make targets, repo paths, `checked by` tests, docker build
  arguments against the Dockerfile, helm commands rendered and validated with their values).
- ```text / ```yaml / ```json / ... blocks are output and configuration, never run; a fence
  without a language is refused, so that nothing is run or skipped by accident.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.labelgrid_up import UP, Stack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN = {"sh": "bash", "bash": "bash", "python": "python"}
# The fixed address the README's examples use, and what replaces it in the test.
README_ADDRESS = "127.0.0.1:8000"
BLOCK_TIMEOUT_S = 120  # the slowest block (infer and a 1-epoch train start on CPU) takes a few seconds
FENCE = re.compile(r"^(`{3,})([\w+-]*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<why>.*?)\s*-->\s*$")
CHECKED_BY = re.compile(r"checked by (?P<path>tests/[\w/.-]+\.py)(?:::(?P<name>\w+))?")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence in README.md
    lang: str
    code: str
    not_run: str | None  # the marker's reason, when the block is marked not-run

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.not_run is None

    def __str__(self) -> str:
        return f"README.md:{self.line}:{self.lang or 'no-language'}"


def readme_blocks(text: str) -> list[Block]:
    """Every top-level fenced block of a Markdown text, with its line and not-run marker."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        fence = FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        start, ticks, lang = index, fence[1], fence[2]
        end = start + 1
        while end < len(lines) and lines[end].rstrip() != ticks:
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md:{start + 1}: fence never closed")
        before = next((lines[i].strip() for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(before)
        blocks.append(
            Block(start + 1, lang, "\n".join(lines[start + 1 : end]) + "\n", marker["why"] if marker else None)
        )
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
RUNNABLE = [block for block in BLOCKS if block.runs]
NOT_RUN_BLOCKS = [block for block in BLOCKS if block.not_run is not None]


# -- the structure of the README's blocks --------------------------------------------------


def test_every_fence_says_what_it_is() -> None:
    """A fence without a language would be neither run nor visibly skipped."""
    untyped = [str(block) for block in BLOCKS if not block.lang]
    assert untyped == [], f"give these fences a language (```text for output): {untyped}"


def test_the_first_examples_are_run() -> None:
    """The examples a newcomer tries first are among the executed blocks."""
    code = "".join(block.code for block in RUNNABLE)
    assert "MONAILabelClient(" in code and "from labelgrid.client import" in code
    assert re.search(r"^labelgrid \w+", code, re.M), "the labelgrid CLI examples"


def test_not_run_markers_say_why() -> None:
    for block in NOT_RUN_BLOCKS:
        assert len(block.not_run or "") >= 10, f"{block}: say why the block is not run"
        assert block.lang in RUN, f"{block}: only sh/bash/python blocks need a not-run marker"


# -- the runnable blocks, against a real stack ---------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`labelgrid up` with the sample studies, as `make run` starts it, on free ports."""
    running = start_stack(tmp_path_factory.mktemp("readme-stack"))
    yield running
    stop_stack(running)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one folder every block runs in (files one block writes, the next one reads)."""
    return tmp_path_factory.mktemp("readme-examples")


def for_stack(code: str, stack: Stack) -> str:
    return code.replace(README_ADDRESS, f"127.0.0.1:{stack.port}")


def block_env(stack: Stack) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LABELGRID_", "PYTEST_"))}
    env |= {
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(venv_bin).parent),
        "LABELGRID_URL": stack.url,
        "LABELGRID_TARGET": f"127.0.0.1:{stack.port}",
        "PYTHONUNBUFFERED": "1",
    }
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_readme_block_runs(block: Block, stack: Stack, folder: Path, tmp_path: Path) -> None:
    code = for_stack(block.code, stack)
    script = tmp_path / ("block.py" if RUN[block.lang] == "python" else "block.sh")
    script.write_text(code)
    argv = (
        [sys.executable, str(script)] if RUN[block.lang] == "python" else ["bash", "-e", "-o", "pipefail", str(script)]
    )
    try:
        done = subprocess.run(
            argv, cwd=folder, env=block_env(stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        output = expired.output or ""
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        pytest.fail(f"{block} did not finish in {BLOCK_TIMEOUT_S} s:\n{code}\n--- output ---\n{output[-4000:]}")
    print(f"--- {block} ---\n{done.stdout}")  # shown with -rP, or with the failure
    if done.returncode != 0:
        pytest.fail(
            f"{block} exited with {done.returncode}:\n{code}\n--- output ---\n{done.stdout[-4000:]}"
            f"\n--- labelgrid up (last lines) ---\n{stack.text()[-3000:]}"
        )


def test_make_run_is_labelgrid_up_with_the_sample_studies() -> None:
    """What the README says `make run` does, from what make would run (`make -n`, nothing runs)."""
    # Run as a top-level make even inside `make test`: a parent make's MAKELEVEL / MAKEFLAGS would
    # make this one print "Leaving directory" lines (and pass on the parent's flags).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "run"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stdout
    last = planned.stdout.strip().splitlines()[-1]
    assert re.search(r"/labelgrid up --studies var/studies --sample-studies --port 8000$", last), last


def test_the_up_line_is_what_labelgrid_prints(stack: Stack) -> None:
    """The README quotes the line `labelgrid up` prints when it is ready ("..." elides)."""
    quoted = [block for block in BLOCKS if block.lang == "text" and block.code.lstrip().startswith(UP)]
    assert quoted, "the README quotes labelgrid up's ready line"
    for block in quoted:
        line = for_stack(block.code.strip(), stack)
        pattern = ".*?".join(re.escape(part) for part in line.split("..."))
        assert re.search(pattern, stack.text()), f"{block}: labelgrid up printed:\n{stack.text()[-2000:]}"


# -- the blocks that are not run, checked another way --------------------------------------


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def commands(code: str) -> list[list[str]]:
    """The block's shell commands as argv lists (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    found = []
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if words:
            found.append(words)
    return found


def helm_values(words: list[str]) -> dict[str, Any]:
    """The values a `helm install|upgrade` command line gives: -f files, then --set in order."""
    values: dict[str, Any] = {}
    for flag, value in itertools.pairwise(words):
        if flag in ("-f", "--values"):
            path = ROOT / value
            assert path.is_file(), f"helm -f {value}: no such file"
            merge(values, yaml.safe_load(path.read_text()) or {})
        elif flag == "--set":
            for assignment in value.split(","):
                key, _, raw = assignment.partition("=")
                nested: dict[str, Any] = {}
                node = nested
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = yaml.safe_load(raw) if raw else ""
                merge(values, nested)
    return values


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def set_keys(words: list[str]) -> list[str]:
    return [
        assignment.partition("=")[0]
        for flag, value in itertools.pairwise(words)
        if flag == "--set"
        for assignment in value.split(",")
    ]


def has_key(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dockerfile_args() -> tuple[set[str], set[str]]:
    """ARG names and stage names of the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text()
    args = set(re.findall(r"^ARG\s+(\w+)", text, re.M))
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+([\w.-]+)", text, re.M | re.I))
    return args, stages


REPO_PATH = re.compile(r"^(?:clients|k8s|scripts|bench|services|gateway|apps|protos|sdk|tests)/[\w./-]*$")


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=str)
def test_not_run_blocks_are_checked_elsewhere(block: Block) -> None:
    """What a block that is not run names exists and is exercised: make targets, repo files,
    the test its marker names, docker build arguments, and helm commands (linted, rendered and
    validated with exactly the values they pass, as tests/helm does for ci/*.yaml)."""
    why = block.not_run or ""
    for match in CHECKED_BY.finditer(why):
        test_file = ROOT / match["path"]
        assert test_file.is_file(), f"{block}: {match['path']} does not exist"
        if match["name"]:
            assert re.search(rf"^(?:async )?def {match['name']}\b", test_file.read_text(), re.M), (
                f"{block}: no {match['name']} in {match['path']}"
            )
    targets = make_targets()
    for words in commands(block.code):
        if words[0] == "make":
            missing = [word for word in words[1:] if "=" not in word and word not in targets]
            assert missing == [], f"{block}: no make target {missing}"
        for word in words:
            if REPO_PATH.match(word) and "*" not in word and "$" not in word:
                assert (ROOT / word).exists(), f"{block}: {word} does not exist"
        if words[:2] == ["docker", "build"]:
            args, stages = dockerfile_args()
            for flag, value in itertools.pairwise(words):
                if flag == "--build-arg":
                    name, _, chosen = value.partition("=")
                    assert name in args, f"{block}: the Dockerfile has no ARG {name}"
                    if name == "FLAVOR":
                        assert f"base-{chosen}" in stages, f"{block}: no base-{chosen} stage"
        if words[0] == "helm" and words[1:2] and words[1] in ("install", "upgrade", "template"):
            check_helm_command(block, words)


def check_helm_command(block: Block, words: list[str]) -> None:
    import helm_python as helm  # dev dependencies: a missing one fails, never skips
    import kubernetes_validate

    from tests.fixtures.chart import CHART, CRD_KINDS, KUBE_VERSIONS, NAMESPACE, RELEASE

    chart_arg = words[3] if words[1] in ("install", "upgrade") else words[2]
    assert (ROOT / chart_arg).resolve() == CHART, f"{block}: {chart_arg} is not the chart"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    unknown = [key for key in set_keys(words) if not has_key(defaults, key)]
    assert unknown == [], f"{block}: --set of keys values.yaml does not have: {unknown}"
    values = helm_values(words)  # an upgrade's --reuse-values: rendered on the chart's defaults
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], f"{block}: helm lint of {' '.join(words)}: {report}"
    loaded = helm.Chart.load(CHART)
    try:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    finally:
        loaded.close()
    docs = [
        doc
        for path, text in manifests.items()
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    assert docs, f"{block}: {' '.join(words)} rendered nothing"
    for doc in docs:
        key = json.dumps(doc, sort_keys=True)
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS or key in VALIDATED:
            continue  # the commands share most objects: each distinct one is validated once
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        VALIDATED.add(key)


VALIDATED: set[str] = set()


# -- the "Tried with" table ------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match[1]


def test_tried_with_names_what_the_tests_use() -> None:
    """Every `package` version in the table is the one installed (npm: the one package.json
    pins), every test it names exists, and the Kubernetes versions are the ones tests/helm validates."""
    import importlib.metadata

    from tests.fixtures.chart import KUBE_VERSIONS

    rows = [line for line in readme_section("Tried with").splitlines() if line.startswith("| ") and "---" not in line][
        1:
    ]
    assert len(rows) >= 5, rows
    npm = json.loads((ROOT / "clients" / "node" / "package.json").read_text())
    npm_versions = {**npm.get("dependencies", {}), **npm.get("devDependencies", {})}
    checked = 0
    for row in rows:
        for name, version in re.findall(r"`(@?[\w./-]+)` (\d+(?:\.\d+)+)", row):
            if name.startswith("@"):
                pinned = {v.lstrip("^~=") for k, v in npm_versions.items() if k.startswith(name + "/")}
                assert pinned == {version}, f"{row}: package.json pins {name}/* at {pinned}"
            else:
                installed = importlib.metadata.version(name)
                assert installed.split("+")[0] == version, f"{row}: {name} {installed} is installed"
            checked += 1
        for path in re.findall(r"`(tests/[\w/.-]+\.py)`", row):
            assert (ROOT / path).is_file(), f"{row}: {path} does not exist"
        if row.startswith("| Kubernetes"):
            assert all(version in row for version in KUBE_VERSIONS), row
    assert checked >= 5


# -- claims about what the stack serves ----------------------------------------------------


def test_what_info_lists_is_what_the_readme_names(stack: Stack) -> None:
    """The app's models, trainers, strategies and scoring methods as /info/ lists them: each is
    named in the README, and the README's list of the sample app's models names only real ones."""
    import httpx

    info = httpx.get(f"{stack.url}/info/", timeout=30).json()
    text = README.read_text()
    named = set(re.findall(r"`([\w-]+)`", text))
    for key in ("models", "strategies", "scoring"):
        missing = sorted(set(info[key]) - named)
        assert missing == [], f"/info/ lists {key} the README never names: {missing}"
    architecture = readme_section("Architecture")
    missing_trainers = sorted(name for name in info["trainers"] if name not in text)
    assert missing_trainers == [], f"trainers the README never names: {missing_trainers}"
    [apps_row] = [line for line in architecture.splitlines() if line.startswith("| `apps/`")]
    claimed = set(re.findall(r"`(\w+)`", apps_row.split("`apps/radiology` has", 1)[1].split(" and ", 1)[0]))
    assert claimed and claimed <= set(info["models"]), (
        f"the apps/ row names {claimed}, /info/ lists {sorted(info['models'])}"
    )


def test_every_dependency_is_named_in_the_readme() -> None:
    """RULES: say in the README which library you chose and why; a dependency in pyproject.toml
    that the README never names (its "Libraries we chose" table, usually) is an unexplained one."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    text = README.read_text().lower()
    names = {re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}
    missing = sorted(name for name in names if name not in text)
    assert missing == [], f"dependencies the README never names (add them to 'Libraries we chose, and why'): {missing}"


def test_not_built_yet_is_what_answers_501(stack: Stack) -> None:
    """The README's "Not built yet" routes are exactly the gateway's placeholders, and each answers 501."""
    import httpx

    spec = httpx.get(f"{stack.url}/openapi.json", timeout=30).json()
    placeholders = {
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if operation.get("summary") == "Not available yet in labelgrid"
    }
    listed = set(re.findall(r"`((?:GET|POST|PUT|DELETE) /[^`]*)`", readme_section("Not built yet")))
    assert listed == placeholders, (
        f"README lists {sorted(listed)}; the gateway's placeholders are {sorted(placeholders)}"
    )
    for route in sorted(listed):
        method, path = route.split(" ", 1)
        answer = httpx.request(method, stack.url + re.sub(r"\{\w+\}", "segmentation", path), timeout=30)
        assert answer.status_code == 501, f"{route}: {answer.status_code} {answer.text[:200]}"
        assert "not available yet in labelgrid" in answer.json()["detail"]
