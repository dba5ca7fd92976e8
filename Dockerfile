# DistillService on CUDA 12. CuPy computes on the GPU when the container has
# one (docker run --gpus all); NumPy on the CPU otherwise.
#
# Stage 1 builds wheels of the project and its dependencies; stage 2 is the
# slim CUDA runtime with only those wheels installed, run as a non-root user.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[gpu]"

FROM ${CUDA_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CUPY_CACHE_DIR=/tmp/cupy \
    DISTILL_HOST=0.0.0.0 \
    DISTILL_DEVICE=auto \
    DISTILL_METRICS_PORT=9090
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "distill-service[gpu]" && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home distill
USER 10001

EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["distill-probe", "--target", "127.0.0.1:50051"]
# Settings come from DISTILL_* variables (above, or docker run -e ...) or flags.
ENTRYPOINT ["distill-server"]
