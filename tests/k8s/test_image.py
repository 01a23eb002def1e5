"""The image (Dockerfile, .dockerignore) checked without a Docker daemon."""
from __future__ import annotations

import fnmatch
import importlib
import re

import pytest
from packaging.requirements import Requirement

from tests.k8s import image
from tests.k8s.manifests import KUSTOMIZATIONS, containers, pod_templates, render

pytest.importorskip("dockerfile_parse")


def _requirement_args(args: list[str]) -> list[Requirement]:
    out = []
    for a in args:
        if a.startswith((".", "-")) or a.endswith((".txt", ".toml")) or "/" in a:  # options, paths
            continue
        out.append(Requirement(a))
    return out


def check_pins(stages: list[image.Stage], makefile: str) -> None:
    """Whatever the Dockerfile (and the Makefile) names with a version, pyproject.toml names the
    same way: pyproject is the one source of the pins."""
    pins = image.pinned_requirements()
    named = [(f"Dockerfile stage {s.name}", r) for s in stages for args in image.pip_installs(s)
             for r in _requirement_args(args)]
    for line in (ln for ln in makefile.splitlines() if "pip install" in ln):
        for args in image.pip_installs(image.Stage("Makefile", "", [("RUN", line.replace("$(PY) -m pip", "pip"))])):
            named += [("Makefile", r) for r in _requirement_args(args)]
    assert named, "found no pip requirements in the Dockerfile or the Makefile"
    for where, req in named:
        if not req.specifier and req.name.lower() not in pins:
            continue  # an unversioned build tool (wheel)
        assert req.name.lower() in pins, f"{where} installs {req}, which pyproject.toml does not list"
        assert str(req.specifier) == str(pins[req.name.lower()].specifier), \
            f"{where} installs {req}; pyproject.toml says {pins[req.name.lower()]}"


def check_project_install(stages: list[image.Stage]) -> None:
    """The project itself is installed non-editable (with its stubs) from the build context,
    and its dependencies come from pyproject.toml."""
    installs = [args for s in stages for args in image.pip_installs(s)]
    project = [a for a in installs if any(x == "." or x.startswith(".[") for x in a)]
    assert project, "the Dockerfile never runs `pip install .`"
    for args in project:
        assert not {"-e", "--editable"} & set(args), "the image must not install the project editable"
    text = "\n".join(v for s in stages for v in s.values("RUN"))
    assert "pyproject.toml" in text or any("--no-deps" not in a for a in project), \
        "the dependencies are installed from neither pyproject.toml nor `pip install .`"


def check_runtime_stage(stages: list[image.Stage], scripts: dict[str, str]) -> None:
    """The last stage: several stages, a non-root user, no compilers, and what it runs exists."""
    assert len(stages) >= 2, "the Dockerfile must be multi-stage (build, then runtime)"
    final = stages[-1]
    users = final.values("USER")
    assert users, f"stage {final.name} sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"stage {final.name} runs as {users[-1]}"
    compilers = [p for p in image.apt_packages(final) if image.COMPILERS.match(p)]
    assert not compilers, f"stage {final.name} installs compilers or headers: {compilers}"
    assert not image.pip_installs(final), f"stage {final.name} runs pip: install in the build stage"
    assert "devel" not in final.base, f"stage {final.name} starts from a devel image {final.base}"
    env = " ".join(final.values("ENV"))
    venv_bins = re.findall(r"PATH=([^:\s]+)", env)
    assert venv_bins, f"stage {final.name} does not put the installed scripts on PATH"
    copied = " ".join(final.values("COPY"))
    assert venv_bins[0].rsplit("/bin", 1)[0] in copied, \
        f"stage {final.name} puts {venv_bins[0]} on PATH but copies no environment there"
    cmd = (final.values("ENTRYPOINT") or final.values("CMD"))[-1]
    program = re.findall(r'"([^"]+)"', cmd)[0] if cmd.startswith("[") else cmd.split()[0]
    assert program in scripts, f"stage {final.name} runs {program!r}, not a console script of pyproject"


def check_dockerignore(ignore: str, stages: list[image.Stage]) -> None:
    """The build context leaves out the venv and git, and keeps what the build copies."""
    patterns = [p.strip() for p in ignore.splitlines() if p.strip() and not p.startswith("#")]
    for must in (".git", ".venv"):
        assert must in patterns, f".dockerignore must leave out {must}"
    for copy in (v for s in stages for v in s.values("COPY") if not v.startswith("--from")):
        for src in copy.split()[:-1]:
            src = src.rstrip("/")
            if src == ".":
                continue
            hit = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(src, p)]
            assert not hit, f".dockerignore pattern {hit[0]!r} leaves out {src}, which the Dockerfile copies"


def test_dockerfile_pins_match_pyproject():
    check_pins(image.stages(), (image.ROOT / "Makefile").read_text())


def test_dockerfile_installs_the_project():
    check_project_install(image.stages())


def test_runtime_stage_is_lean_and_non_root():
    check_runtime_stage(image.stages(), image.console_scripts())


def test_dockerignore():
    check_dockerignore((image.ROOT / ".dockerignore").read_text(), image.stages())


def test_console_scripts_resolve():
    for name, target in image.console_scripts().items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), f"{name} -> {target}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifest_commands_exist(kustomization):
    """A command a pod of the project's image runs is one of the image's console scripts."""
    scripts = image.console_scripts()
    for where, tpl in pod_templates(render(kustomization)):
        for c in containers(tpl["spec"]):
            if "baichuan-audio" in c["image"] and c.get("command"):
                assert c["command"][0] in scripts, f"{where} {c['name']} runs {c['command'][0]!r}"


# --------------------------------------------------------------------------- the checks fail



def _with(line: str, where: str = "build") -> list[image.Stage]:
    text = (image.ROOT / "Dockerfile").read_text()
    if where == "build":
        text = text.replace("FROM ${CUDA_BASE} AS runtime", line + "FROM ${CUDA_BASE} AS runtime")
    else:
        text += line
    return image.stages(text)


def test_checks_catch_a_wrong_pin_and_an_editable_install():
    makefile = (image.ROOT / "Makefile").read_text()
    with pytest.raises(AssertionError, match="torch"):
        check_pins(_with('RUN pip install "torch==2.10.0"\n'), makefile)
    with pytest.raises(AssertionError, match="grpcio-tools"):
        check_pins(image.stages(), makefile.replace("grpcio-tools==1.85.1", "grpcio-tools==1.80.0"))
    with pytest.raises(AssertionError, match="editable"):
        check_project_install(_with("RUN pip install -e .\n"))


@pytest.mark.parametrize("line, match", [
    ("USER root\n", "runs as root"),
    ("RUN apt-get install -y gcc\n", "compilers"),
    ('CMD ["baichuan-audio-server"]\n', "not a console script"),
])
def test_checks_catch_a_bad_runtime_stage(line, match):
    with pytest.raises(AssertionError, match=match):
        check_runtime_stage(_with(line, "runtime"), image.console_scripts())


def test_checks_catch_a_bad_dockerignore():
    with pytest.raises(AssertionError, match="proto"):
        check_dockerignore(".git\n.venv\nproto\n", image.stages())
    with pytest.raises(AssertionError, match=".venv"):
        check_dockerignore(".git\n", image.stages())
