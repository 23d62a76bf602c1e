# syntax=docker/dockerfile:1
#
# lameduck container image.
#
#   docker build -t lameduck:dev .
#   docker run --rm -p 8000:8000 -p 9901:9901 lameduck:dev demo   # proxy + built-in sample app
#
# The image holds one static path, /lameduck, so the same image serves as the
# sidecar (`/lameduck [FLAGS]`), as the drain hook (`/lameduck drain ...`) and
# as the example upstream (`/lameduck demo-app --listen 127.0.0.1:8080`).
# See docs/kubernetes.md.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------
# Build stage. Debian 12 (bookworm) on both sides, so the glibc the binary is
# linked against is the one the distroless cc-debian12 runtime ships.
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# .dockerignore keeps target/, .git/, bench/.tools/, charts/ and deploy/ out
# of the context, so this copies only what the build reads.
COPY . .
# The cache mounts keep the crates.io download cache and target/ between
# builds (BuildKit, the default builder since Docker 23). target/ is a cache
# mount, so the binary is copied out of it inside the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lameduck \
 && install -m 0755 target/release/lameduck /lameduck

# ---------------------------------------------------------------------------
# Runtime stage: no shell, no package manager; glibc, libgcc and CA certs only.
FROM ${RUNTIME_IMAGE}
COPY --from=builder /lameduck /lameduck
# 65532 is distroless's `nonroot` user. It is given by number because the
# kubelet can only enforce `runAsNonRoot: true` for a numeric image user
# ("image has non-numeric user (nonroot), cannot verify user is non-root").
USER 65532:65532
# 8000: proxy listener (--listen). 9901: admin (--admin-listen): /ready, /live,
# /metrics, /drained, /status, POST /drain (loopback only).
EXPOSE 8000 9901
ENTRYPOINT ["/lameduck"]
