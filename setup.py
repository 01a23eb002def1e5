"""Generates the gRPC stubs from proto/ at build/install time (they are never committed)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    import sys
    sys.path.insert(0, str(ROOT))
    from services.common.protogen import generate
    generate(ROOT)


class BuildPyWithStubs(build_py):
    def run(self):
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
