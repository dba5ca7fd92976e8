# DistillService on CUDA 12. CuPy computes on the GPU when the container has
# one (docker run --gpus all); NumPy on the CPU otherwise.
#
# Stage 1 builds wheels of the server (distill-service[gpu]: the server and
# CuPy) and their dependencies; stage 2 is the slim CUDA runtime with only
# those wheels installed, run as a non-root user.

# cupy-cuda12x loads the CUDA 12 libraries of the base image (its wheels are
# built for CUDA 12.x), so the two are chosen together. CuPy compiles kernels
# (the engine's among them) at run time with the base image's NVRTC, and
# those that use float16 include the toolkit's cuda_fp16.h, which a runtime
# image lacks and CuPy no longer ships for CUDA 12.2 and later: the headers
# come from the nvidia-cuda-runtime-cu12 wheel of the base image's CUDA
# version. This is the only place the pins are written; both stages install
# under the same constraints. Override them together, e.g.
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg CUDA_HEADERS_VERSION=12.8.90 --build-arg CUPY_VERSION=13.6.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
ARG CUDA_HEADERS_VERSION=12.6.77
ARG CUPY_VERSION=13.6.0

FROM python:3.12-slim AS build
ARG CUPY_VERSION
ARG CUDA_HEADERS_VERSION
WORKDIR /src
RUN printf "cupy-cuda12x==%s\nnvidia-cuda-runtime-cu12==%s\n" "${CUPY_VERSION}" "${CUDA_HEADERS_VERSION}" > /constraints.txt
COPY pyproject.toml README.md ./
COPY core ./core
COPY client ./client
COPY server ./server
RUN pip wheel --no-cache-dir --constraint /constraints.txt --wheel-dir /wheels ".[gpu]" nvidia-cuda-runtime-cu12

FROM ${CUDA_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CUPY_CACHE_DIR=/tmp/cupy \
    DISTILL_HOST=0.0.0.0 \
    DISTILL_PORT=50051 \
    DISTILL_DEVICE=auto \
    DISTILL_METRICS_PORT=9090
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
COPY --from=build /wheels /wheels
COPY --from=build /constraints.txt /constraints.txt
RUN pip install --no-cache-dir --no-index --find-links /wheels --constraint /constraints.txt \
        "distill-service[gpu]" nvidia-cuda-runtime-cu12 \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 distill \
    && useradd --system --uid 10001 --gid 10001 --no-create-home distill
USER 10001:10001

EXPOSE 50051 9090
# distill-probe reads the server's own settings: DISTILL_PORT (and
# DISTILL_HOST), and with DISTILL_TLS_CERT set it checks over TLS (see
# docs/deployment.md). Exec form: no shell, and `docker run -e` settings
# reach the probe as they reach the server.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["distill-probe"]
# Settings come from DISTILL_* variables (above, or docker run -e ...) or flags.
ENTRYPOINT ["distill-server"]
