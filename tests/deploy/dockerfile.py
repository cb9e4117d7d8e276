"""A small reader of this project's Dockerfile: stages and their instructions, as data.

Enough of the Dockerfile syntax for the file we ship (line continuations, comments, JSON and
shell forms, ``ARG`` defaults, ``${VAR}`` and ``$VAR`` in ``ENV``); anything else it meets is
an error, so a new instruction is noticed rather than skipped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

KNOWN = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "CMD"}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class Stage:
    name: str | None
    base: str
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    steps: list[tuple[str, str]] = field(default_factory=list)  # (instruction, rest)
    user: str | None = None
    expose: list[str] = field(default_factory=list)
    healthcheck: list[str] | None = None
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None


def instructions(text: str) -> list[tuple[str, str]]:
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        logical.append((word.upper(), rest.strip()))
        current = ""
    return logical


def expand(value: str, known: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: known.get(m.group(1) or m.group(2), ""), value)


def parse(path: Path, base_env: dict[str, str] | None = None) -> list[Stage]:
    """``base_env``: the environment an external base image sets (e.g. its PATH)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for word, rest in instructions(path.read_text()):
        if word not in KNOWN:
            raise ValueError(f"{path}: instruction {word} is not understood by this reader")
        if word == "ARG":
            name, _, default = rest.partition("=")
            target = stages[-1].args if stages else global_args
            target[name] = json.loads(default) if default.startswith('"') else default
        elif word == "FROM":
            parts = rest.split()
            base = expand(parts[0], global_args)
            parent = next((s for s in stages if s.name == base), None)
            stage = Stage(parts[2] if len(parts) > 2 else None, base, env=dict(base_env or {}))
            if parent is not None:
                stage.args, stage.env = dict(parent.args), dict(parent.env)
                stage.steps = list(parent.steps)
            stages.append(stage)
        else:
            stage = stages[-1]
            if word == "ENV":
                for item in shlex.split(rest):
                    name, _, value = item.partition("=")
                    stage.env[name] = expand(value, {**stage.args, **stage.env})
            elif word == "USER":
                stage.user = rest
            elif word == "EXPOSE":
                stage.expose.extend(rest.split())
            elif word == "HEALTHCHECK":
                options, _, command = rest.partition("CMD ")
                stage.healthcheck = json.loads(command)
                stage.healthcheck_options = dict(
                    option.removeprefix("--").split("=", 1) for option in options.split())
            elif word == "CMD":
                stage.cmd = json.loads(rest)
            else:
                stage.steps.append((word, rest))
    return stages


def context_files(root: Path) -> list[str]:
    """The files of ``root`` that ``.dockerignore`` lets into the build context."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.removeprefix("!").removeprefix("/")))
    def included(name: str) -> bool:
        verdict = True
        for negated, pattern in rules:
            if _matches(pattern, name):
                verdict = negated
        return verdict

    def may_hold_included(name: str) -> bool:
        return included(name) or any(
            negated and pattern.startswith(name + "/") for negated, pattern in rules)

    kept = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder).relative_to(root).as_posix()
        prefix = "" if here == "." else here + "/"
        dirs[:] = [d for d in dirs if d != ".git" and may_hold_included(prefix + d)]
        kept.extend(prefix + f for f in files if included(prefix + f))
    return sorted(kept)


def _matches(pattern: str, name: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = name.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        tail = pattern.removeprefix("**/")
        return any(fnmatch.fnmatchcase(part, tail) for part in parts)
    return any(fnmatch.fnmatchcase(prefix, pattern) and prefix.count("/") == pattern.count("/")
               for prefix in prefixes)
