# ms2mg container images. Two targets (docs/image.md):
#   converter  `ms2mg` with CPU torch; the image the conversion Jobs run          docker build --target converter .
#   operator   `ms2mg-operator` (kopf); no torch, no numpy; the chart's Deployment  docker build --target operator .
# Both run as uid/gid 10001, need no shell at runtime and write only to /tmp (mount an emptyDir / tmpfs there and
# run with a read-only root filesystem).
#
# Build arguments:
#   BASE             any Debian-like image with python3 (3.11, like the lock files) and the venv module.
#                    CI has no registry access and passes a debootstrap-made base (scripts/image/make-base.sh).
#   TORCH_SPEC       the converter's torch, installed alone (--no-deps) from TORCH_INDEX_URL. The +cpu local
#                    version makes a wrong index (e.g. PyPI, whose Linux wheels are the multi-GB CUDA build) fail
#                    instead of succeeding; the build also checks torch.version.cuda is None.
#   TORCH_INDEX_URL  the PyTorch CPU index (only that index is used for torch). CI, which cannot reach it, serves
#                    its local CPU wheel on 127.0.0.1 instead (scripts/image/build.sh).
#   VERSION, REVISION, CREATED  OCI labels (build.sh passes the git commit and its date)
# Every other Python dependency is pinned in scripts/image/requirements-*.txt (made by scripts/image/lock.sh from
# pyproject.toml) and installed with --no-deps. The *-app stages then install ms2mg[EXTRA] with --no-index and run
# `pip check`, so a lock that misses or contradicts a dependency in pyproject.toml fails the build.
# Stages are ordered so that the legacy builder (DOCKER_BUILDKIT=0, which builds every stage up to --target)
# never builds the torch stages for `--target operator`.

ARG BASE=python:3.11-slim

# ---- tools: pinned pip + setuptools in their own venv. They install into the runtime venvs through
#      `pip --python`, so those venvs never contain pip, and they build the ms2mg wheel.
FROM ${BASE} AS tools
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
RUN python3 -m venv /opt/tools \
 && /opt/tools/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
      "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---- wheel: the ms2mg wheel (both packages, both console scripts); the only stage that sees the source
FROM tools AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY converter converter
COPY operator operator
RUN /opt/tools/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

# ---- operator-deps: /venv with the locked operator dependencies (a layer that only changes with the lock).
#      kubernetes/aio (68 MB: the client's asyncio twin, kubernetes>=35) is removed: nothing imports it (kopf talks
#      to the API with aiohttp; ms2mg_operator uses the sync `kubernetes.client`).
FROM tools AS operator-deps
COPY scripts/image/requirements-operator.txt /tmp/requirements.txt
RUN python3 -m venv --without-pip /venv \
 && /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-deps --require-virtualenv \
      -r /tmp/requirements.txt \
 && rm -rf /venv/lib/python3*/site-packages/kubernetes/aio

# ---- operator-app: ms2mg itself as a small overlay of /venv (--prefix /overlay). Then, in this stage's own /venv
#      (thrown away): install ms2mg[operator] with --no-index, which fails if the lock lacks a dependency of the
#      extra, `pip check`, and the imports.
FROM operator-deps AS operator-app
COPY --from=wheel /dist /dist
RUN /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-deps --prefix /overlay /dist/*.whl \
 && /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-index --find-links /dist \
      "ms2mg[operator]" \
 && /opt/tools/bin/pip --python /venv/bin/python check \
 && /venv/bin/python -c "import kopf, ms2mg_operator.handlers" \
 && ! /venv/bin/python -c "import numpy" 2>/dev/null \
 && ! /venv/bin/python -c "import torch" 2>/dev/null

# ---- runtime: what both images share: the base plus an unprivileged user; nothing writable but /tmp
FROM ${BASE} AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin ms2mg
ENV PATH="/venv/bin:${PATH}" \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /tmp
USER 10001:10001

# ---- operator image
FROM runtime AS operator
COPY --from=operator-deps /venv /venv
COPY --from=operator-app /overlay /venv
ENTRYPOINT ["ms2mg-operator"]
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="ms2mg-operator" \
      org.opencontainers.image.description="ms2mg Kubernetes operator (kopf): runs MindFormers-to-Megatron-LM checkpoint conversions as Jobs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"

# ---- converter-deps: /venv with CPU torch (its own layer: ~0.6 GB, changes only with TORCH_SPEC) + the lock.
#      Removed from torch (~0.15 GB), never opened by `import torch` or anything ms2mg does: the C++ test binaries
#      (torch/test, torch/bin/test_*) and the C++ headers (torch/include, only for building C++ extensions or
#      torch.compile code generation).
FROM tools AS converter-deps
ARG TORCH_SPEC="torch==2.13.0+cpu"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN python3 -m venv --without-pip /venv \
 && /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-deps --require-virtualenv \
      --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
 && rm -rf /venv/lib/python3*/site-packages/torch/test /venv/lib/python3*/site-packages/torch/include \
      /venv/lib/python3*/site-packages/torch/bin/test_*
COPY scripts/image/requirements-converter.txt /tmp/requirements.txt
RUN /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-deps --require-virtualenv \
      -r /tmp/requirements.txt

# ---- converter-app: as operator-app, for ms2mg[converter]
FROM converter-deps AS converter-app
COPY --from=wheel /dist /dist
RUN /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-deps --prefix /overlay /dist/*.whl \
 && /opt/tools/bin/pip --python /venv/bin/python install --no-cache-dir --no-index --find-links /dist \
      "ms2mg[converter]" \
 && /opt/tools/bin/pip --python /venv/bin/python check \
 && /venv/bin/python -c "import ml_dtypes, numpy, safetensors, torch, ms2mg_converter.cli.main" \
 && /venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"

# ---- converter image (the default target)
FROM runtime AS converter
COPY --from=converter-deps /venv /venv
COPY --from=converter-app /overlay /venv
ENTRYPOINT ["ms2mg"]
CMD ["--help"]
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG TORCH_SPEC="torch==2.13.0+cpu"
LABEL org.opencontainers.image.title="ms2mg-converter" \
      org.opencontainers.image.description="ms2mg: converts MindSpore Transformers (MindFormers) safetensors checkpoints into Megatron-LM checkpoints (CPU torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      io.ms2mg.torch="${TORCH_SPEC}"
