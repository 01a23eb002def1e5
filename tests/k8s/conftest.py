"""The rendered objects of each kustomization."""
from __future__ import annotations

import pytest

from tests.k8s.manifests import KUSTOMIZATIONS, Doc, render


@pytest.fixture(params=KUSTOMIZATIONS)
def docs(request) -> list[Doc]:
    return render(request.param)
