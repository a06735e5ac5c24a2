# syntax=docker/dockerfile:1
#
# outbox-relay container image.
#
#   docker build -t outbox-relay:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm -e OUTBOX_RELAY_POSTGRES__URL=... \
#     -e OUTBOX_RELAY_SINK__KAFKA__BROKERS=... -p 9187:9187 outbox-relay:0.1.0
#
# The image runs `outbox-relay run` as uid 10001 with JSON logs and the HTTP
# endpoints (/metrics, /healthz, /readyz) on 0.0.0.0:9187. Mount your own
# configuration over /etc/outbox-relay/outbox-relay.toml (see deploy/README.md).
# The `demo` subcommand needs PostgreSQL server binaries and is not supported
# in this image.

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------
# Build stage
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build

# librdkafka is compiled from source by rdkafka-sys (its configure script and
# make); the `ssl` feature needs the OpenSSL headers; libz-sys links the
# system zlib (zlib1g-dev) dynamically; zstd is bundled. Most of these are in
# the rust image already; listing them keeps the build honest if it changes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config make zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# 1) Dependencies only: manifest, lock file and a stub source for every target
#    Cargo.toml declares. This layer is rebuilt only when Cargo.toml or
#    Cargo.lock change, so editing src/ does not recompile librdkafka.
COPY Cargo.toml Cargo.lock ./
COPY deploy/docker/stub-targets.sh /usr/local/bin/stub-targets
RUN sh /usr/local/bin/stub-targets \
 && cargo build --release --locked --bin outbox-relay \
 && rm -rf src

# 2) The relay itself. The migrations in sql/ are compiled in (include_str!).
#    touch: COPY keeps the files' original mtimes, which can be older than the
#    stub build; without it cargo could consider the stub binary up to date.
COPY src ./src
COPY sql ./sql
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bin outbox-relay \
 && mkdir -p /out \
 && objcopy --strip-debug target/release/outbox-relay /out/outbox-relay \
 && /out/outbox-relay --version

# ---------------------------------------------------------------------------
# Runtime stage
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional-outbox relay: Postgres outbox table to Kafka, at least once, in per-aggregate order" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="debian:bookworm-slim"

# The binary links libssl.so.3/libcrypto.so.3 (libssl3), libz.so.1 (zlib1g),
# libgcc_s.so.1 (libgcc-s1) and glibc (libc6); the last three are in the base
# image. ca-certificates lets TLS to Kafka and Postgres verify public CAs.
# .ci/validate-deploy checks this list against `ldd` of the release binary.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outbox-relay \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin outbox-relay

COPY --from=build /out/outbox-relay /usr/local/bin/outbox-relay
# A default configuration so the image starts with environment variables
# alone; a ConfigMap or bind mount replaces it.
COPY config/outbox-relay.toml /etc/outbox-relay/outbox-relay.toml

ENV OUTBOX_RELAY_CONFIG=/etc/outbox-relay/outbox-relay.toml \
    OUTBOX_RELAY_HTTP__LISTEN=0.0.0.0:9187 \
    OUTBOX_RELAY_LOG__FORMAT=json

USER 10001:10001
EXPOSE 9187
# The relay handles SIGTERM itself (stop claiming, drain up to
# shutdown.drain_timeout, exit 0); give it that long plus a margin before
# SIGKILL (docker stop -t 45, Kubernetes terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
# No HEALTHCHECK: the image has no HTTP client; orchestrators probe /healthz
# and /readyz on port 9187 directly.
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
