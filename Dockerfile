# syntax=docker/dockerfile:1
# The serving image: Ray 2.60, PyTorch and this package (with its generated gRPC stubs), run as
# a non-root user. KubeRay starts it with its own `ray start` command (k8s/); locally:
#   docker build -t baichuan-audio/serve:dev .
#   docker run --gpus all baichuan-audio/serve:dev baichuan-audio --help
# Every version comes from pyproject.toml (`pip install .`): nothing is pinned here except the
# build requirements, which repeat pyproject's [build-system] (tests/k8s/test_image.py checks).
# PyTorch's wheel carries its own CUDA libraries; the CUDA runtime base supplies the driver
# compatibility layer. To build against another CUDA wheel variant, pass PyTorch's index with
# --build-arg PIP_EXTRA_INDEX_URL=...

# CUDA 13: the CUDA build of torch 2.11 from the default index (needs an NVIDIA driver >= 580).
ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu22.04

# --------------------------------------------------------------------------- build
FROM ${CUDA_BASE} AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
RUN pip install -q "setuptools>=68" wheel "grpcio-tools==1.85.1" \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -q -r /tmp/requirements.txt
COPY . .
# Non-editable: the package and the stubs generated from proto/ land in site-packages.
RUN pip install -q --no-build-isolation --no-deps . \
 && baichuan-audio --help > /dev/null

# --------------------------------------------------------------------------- runtime
FROM ${CUDA_BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter only: no compilers, no headers.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
COPY --from=build /opt/venv /opt/venv
# HOME and /tmp are the only places written at run time (Ray's session files, caches); the pods
# mount emptyDirs there so the root filesystem can stay read-only.
ENV PATH=/opt/venv/bin:$PATH HOME=/home/ray PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
USER 1000:1000
WORKDIR /home/ray
CMD ["baichuan-audio", "--help"]
