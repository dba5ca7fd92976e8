# DistillService on a CUDA 12 runtime: CuPy on the GPU when the container has
# one (docker run --gpus all), NumPy on the CPU otherwise.
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
RUN pip install ".[gpu]" && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home distill
USER distill
WORKDIR /home/distill

EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["distill-probe", "--target", "127.0.0.1:50051"]

ENTRYPOINT ["distill-server", "--host", "0.0.0.0", "--device", "auto"]
