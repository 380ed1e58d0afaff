# tidald CPU image. Build steps are the project's own make targets, so CI runs
# the same commands. (The CUDA variant and the server entrypoint arrive with
# their issues.)
FROM debian:12-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY Makefile ./
RUN make deps
COPY . .
RUN make all

FROM debian:12-slim
RUN useradd --system --uid 10001 tidald
COPY --from=build /src/build/tidald /usr/local/bin/tidald
USER tidald
VOLUME /models
ENTRYPOINT ["/usr/local/bin/tidald"]
CMD ["--help"]
