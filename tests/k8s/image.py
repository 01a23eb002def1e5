"""The Dockerfile read without a daemon: its stages, what each installs, who the last one runs as."""
from __future__ import annotations

import io
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
# Packages that put a compiler or headers in an image.
COMPILERS = re.compile(r"^(gcc|g\+\+|cpp|clang|build-essential|cmake|make|ninja-build|.*-dev|cuda-nvcc.*)$")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def stages(dockerfile: str | None = None) -> list[Stage]:
    from dockerfile_parse import DockerfileParser

    text = dockerfile if dockerfile is not None else (ROOT / "Dockerfile").read_text()
    # In memory: without a fileobj the parser reads and writes ./Dockerfile.
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    out: list[Stage] = []
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            words = ins["value"].split()
            out.append(Stage(words[2] if len(words) > 2 else str(len(out)), words[0]))
        elif out:
            out[-1].instructions.append((ins["instruction"], ins["value"]))
    return out


def commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at the shell's && || ; | (quotes respected)."""
    lexer = shlex.shlex(run.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append([])
        else:
            out[-1].append(token)
    return [c for c in out if c]


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` in a stage."""
    out = []
    for run in stage.values("RUN"):
        for words in commands(run):
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    out.append(words[i + 2:])
    return out


def apt_packages(stage: Stage) -> list[str]:
    out = []
    for run in stage.values("RUN"):
        for words in commands(run):
            if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
                out += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned_requirements() -> dict[str, Requirement]:
    """name -> requirement, of pyproject's build requirements and dependencies."""
    data = pyproject()
    reqs = [*data["build-system"]["requires"], *data["project"]["dependencies"]]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def console_scripts() -> dict[str, str]:
    return dict(pyproject()["project"]["scripts"])
