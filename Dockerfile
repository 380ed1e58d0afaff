# tidald images. CPU (default) on Debian 12 slim:
#   docker build -t tidald:cpu .
# CUDA on NVIDIA's CUDA runtime base matching the toolkit (nvcc 13):
#   docker build --build-arg VARIANT=cuda -t tidald:cuda .
# The build steps are the project's own make targets (deps-build, all), the same commands
# `make test` exercises; tests/deploy/check_dockerfile.sh checks this file against the tree.
ARG VARIANT=cpu
ARG CUDA_VERSION=13.0.0

# ---- build stages ----------------------------------------------------------
FROM debian:12-slim AS build-cpu
RUN apt-get update && apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04 AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends make ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM build-${VARIANT} AS build
ARG VARIANT
WORKDIR /src
COPY Makefile ./
RUN make deps-build
COPY base/ base/
COPY engine/ engine/
COPY kvcache/ kvcache/
COPY sched/ sched/
COPY api/ api/
COPY config/ config/
COPY server/ server/
COPY tools/ tools/
RUN make all CUDA=$([ "$VARIANT" = cuda ] && echo 1 || echo 0) \
    && mkdir -p build/lib && if [ -f build/libtidald-cuda.so ]; then cp build/libtidald-cuda.so build/lib/; fi

# ---- runtime stages --------------------------------------------------------
FROM debian:12-slim AS runtime-cpu
RUN apt-get update && apt-get install -y --no-install-recommends libuv1 libcjson1 curl \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime-cuda
RUN apt-get update && apt-get install -y --no-install-recommends libuv1t64 libcjson1 curl \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-${VARIANT}
RUN useradd --system --uid 10001 --no-create-home tidald && mkdir -p /models
COPY --from=build /src/build/tidald /usr/local/bin/tidald
# the CUDA backend (cuda variant only; the directory is empty for cpu), found by tidald at
# ../lib/tidald/ from its own path and loaded only when a GPU is present
COPY --from=build /src/build/lib/ /usr/local/lib/tidald/
USER 10001
ENV TIDALD_HOST=0.0.0.0 \
    TIDALD_PORT=8080 \
    TIDALD_MODEL=/models/model.gguf \
    TIDALD_DRAIN_TIMEOUT_S=30
VOLUME /models
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${TIDALD_PORT}/health" || exit 1
ENTRYPOINT ["/usr/local/bin/tidald"]
CMD ["serve"]
