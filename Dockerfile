# One image for the three services; entrypoint `rlhf-online`. (Issue 6 hardens and lints this.)
ARG PYTHON_IMAGE=python:3.11-slim
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC
ARG TORCH_INDEX
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index by default (override TORCH_INDEX for a CUDA build)
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY rlhf_online ./rlhf_online
COPY services ./services
RUN pip install --no-cache-dir .
# Provision the default model at build time so pods never download at run time.
RUN rlhf-online model fetch --data-dir /opt/rlhf/data

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /opt/rlhf /opt/rlhf
ENV PATH=/opt/venv/bin:$PATH \
    RLHF_DATA_DIR=/opt/rlhf/data \
    RLHF_BASE_MODEL=/opt/rlhf/data/models/smollm2-135m-instruct \
    HF_HUB_OFFLINE=1
USER 10001
EXPOSE 50051 50052 50053 9091
ENTRYPOINT ["rlhf-online"]
CMD ["serve", "generation"]
