"""Read a Dockerfile into stages and replay one build target's recipe without a Docker daemon.

`parse_dockerfile` understands what docker/Dockerfile uses: global ARGs, ``FROM x AS name``
(with ``${ARG}`` in the image), ARG, ENV (``k=v`` pairs, ``$VAR``/``${VAR}`` expansion), WORKDIR,
COPY (``--from``, ``--chown``), RUN (shell form, ``--mount=type=bind,from=...``), USER, EXPOSE,
exec-form CMD / ENTRYPOINT and HEALTHCHECK ... CMD [...]. Anything else raises, so a new
instruction in the Dockerfile is noticed here instead of silently skipped.

`Replay` maps the image's filesystem onto a host folder: container paths under `IMAGE_DIRS` become
``<root>/<path>``; any other absolute path in a replayed command is an error. The base image's
Python is the test interpreter's (its bin folder is on PATH).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Top-level folders the Dockerfiles create or fill; the replay redirects them under its root.
IMAGE_DIRS = ("opt", "src", "wheels", "nonexistent")
# RUN commands that change the (host) system rather than the image's files are not replayed.
SYSTEM_COMMANDS = ("useradd", "groupadd", "apt-get")

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_IMAGE_PATH = re.compile(r"(?<![\w.:/])/(" + "|".join(IMAGE_DIRS) + r")(?=/|\b)")


class DockerfileError(ValueError):
    """A Dockerfile this module cannot read; names the line."""


@dataclass
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction text) with continuations joined and comments dropped."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        lines.append((start, " ".join(part.strip() for part in pending if part.strip())))
        pending = []
    if pending:
        raise DockerfileError(f"line {start}: the file ends inside a continued instruction")
    return lines


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    flags = {}
    while args.startswith("--"):
        token, _, args = args.partition(" ")
        key, _, value = token[2:].partition("=")
        flags[key] = value
        args = args.lstrip()
    return flags, args


def expand(value: str, env: dict[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` from `env` (unknown names expand to ""), as Docker does for ENV."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def parse_dockerfile(text: str, build_args: dict[str, str] | None = None) -> list[Stage]:
    """The stages of a Dockerfile, with global ARGs (and `build_args`) substituted in FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, instruction in _logical_lines(text):
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        flags, args = _split_flags(rest.strip())
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(expand(words[0], global_args), name))
        elif keyword == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = (build_args or {}).get(key, default)
        elif keyword in {
            "ARG", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "CMD", "ENTRYPOINT",
            "HEALTHCHECK", "VOLUME",
        }:  # fmt: skip
            stages[-1].instructions.append(Instruction(keyword, flags, args, line))
        else:
            raise DockerfileError(f"line {line}: {keyword} is not understood by this replay")
    return stages


def stage_chain(stages: list[Stage], target: str) -> list[Stage]:
    """The stage named `target` and the stages it is built FROM, base first."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [by_name[target]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT (or of HEALTHCHECK's CMD)."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args.partition("CMD")[2].strip()
    try:
        value = json.loads(args)
    except json.JSONDecodeError as err:
        raise DockerfileError(
            f"line {instruction.line}: {instruction.keyword} must be exec form (a JSON array): "
            f"{args!r}"
        ) from err
    return value


def env_pairs(instruction: Instruction, env: dict[str, str]) -> dict[str, str]:
    """The variables one ENV line sets, expanded against the `env` in force before it."""
    pairs = {}
    for token in shlex.split(instruction.args):
        key, sep, value = token.partition("=")
        if not sep:
            raise DockerfileError(f"line {instruction.line}: use ENV key=value, got {token!r}")
        pairs[key] = expand(value, env)
    return pairs


@dataclass
class Replay:
    """One stage chain's files under `roots[stage]` (its fake "/"), built from `context`."""

    context: Path
    roots: dict[str, Path]
    base_path: str = "/usr/local/bin:/usr/bin:/bin"

    def host_path(self, stage: str, container_path: str) -> Path:
        return self.roots[stage] / container_path.lstrip("/")

    def map_paths(self, stage: str, text: str, mounts: dict[str, Path] | None = None) -> str:
        """Rewrite the container paths in `text` to host paths (bind mounts first)."""
        for target, source in sorted((mounts or {}).items(), key=lambda item: -len(item[0])):
            text = re.sub(rf"(?<![\w.:/]){re.escape(target)}(?=/|\b)", str(source), text)
        return _IMAGE_PATH.sub(lambda m: str(self.roots[stage] / m.group(1)), text)

    def run_stage(self, chain: list[Stage], timeout: float = 300.0) -> dict[str, str]:
        """Replay COPY / RUN / ENV / WORKDIR of `chain` into the last stage's root; returns the
        environment the stage ends with (container paths already mapped to host paths, and the
        stand-in for the base image's Python taken off PATH so nothing resolves to it)."""
        name = chain[-1].name or "final"
        self.roots[name].mkdir(parents=True, exist_ok=True)
        base_python = str(Path(sys.executable).parent)
        env = {"PATH": f"{base_python}:{self.base_path}"}
        args: dict[str, str] = {}
        workdir = "/"
        for stage in chain:
            for ins in stage.instructions:
                if ins.keyword == "ARG":
                    key, _, default = ins.args.partition("=")
                    args[key] = default
                elif ins.keyword == "ENV":
                    raw = env_pairs(ins, env)
                    env.update({k: self.map_paths(name, v) for k, v in raw.items()})
                elif ins.keyword == "WORKDIR":
                    workdir = ins.args
                    self.host_path(name, workdir).mkdir(parents=True, exist_ok=True)
                elif ins.keyword == "COPY":
                    self._copy(name, ins, workdir)
                elif ins.keyword == "RUN":
                    self._run(name, ins, workdir, {**env, **args}, timeout)
        path = [entry for entry in env["PATH"].split(":") if entry != base_python]
        return {**env, "PATH": ":".join(path)}

    def _copy(self, stage: str, ins: Instruction, workdir: str) -> None:
        *sources, dest = shlex.split(ins.args)
        if not dest.startswith("/"):
            dest = f"{workdir.rstrip('/')}/{dest}"
        from_root = self.roots[ins.flags["from"]] if "from" in ins.flags else self.context
        target = self.host_path(stage, dest)
        for source in sources:
            src = from_root / source.lstrip("/")
            if not src.exists():
                raise FileNotFoundError(
                    f"Dockerfile line {ins.line}: COPY source {source!r} is not in the build "
                    f"context (left out by .dockerignore, or missing from the repository)"
                )
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)

    def _run(
        self, stage: str, ins: Instruction, workdir: str, env: dict[str, str], timeout: float
    ) -> None:
        if ins.args.split()[0] in SYSTEM_COMMANDS:
            return
        mounts = {}
        if "mount" in ins.flags:
            spec = dict(part.split("=", 1) for part in ins.flags["mount"].split(","))
            if spec.get("type") != "bind" or "from" not in spec:
                raise DockerfileError(f"line {ins.line}: only bind mounts from a stage replay")
            mounts[spec["target"]] = self.host_path(spec["from"], spec.get("source", "/"))
        command = self.map_paths(stage, ins.args, mounts)
        # Build ARGs are environment variables of RUN, as in `docker build`.
        host_env = {**env, "HOME": str(self.host_path(stage, "/nonexistent"))}
        for key in ("PIP_CONFIG_FILE", "PIP_FIND_LINKS", "PIP_CERT", "SSL_CERT_FILE", "LANG"):
            if key in os.environ:
                host_env.setdefault(key, os.environ[key])
        result = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=self.host_path(stage, workdir),
            env=host_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"Dockerfile line {ins.line} failed ({result.returncode}): {command}\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
