# Tether's container image: build with the official Rust image, run on Debian slim.
#
#   docker build -t tether:latest .
#   docker run --rm -p 8080:8080 -v "$PWD/my.yaml:/etc/tether/tether.yaml:ro" tether:latest
#
# The image holds conf/tether.yaml as /etc/tether/tether.yaml; it listens on loopback, so mount
# your own config there (deploy/kubernetes/ mounts a ConfigMap). tests/e2e/image.rs checks
# this file against the repository (sources, config, commands, health check path); no image is
# built by the tests or CI here.

FROM rust:1-bookworm AS build
# cmake: Pingora builds zlib-ng from source (the same need as scripts/setup.sh).
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
RUN cargo build --release --locked --bin tether

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tether
COPY --from=build /src/target/release/tether /usr/local/bin/tether
COPY conf/tether.yaml conf/tether.schema.json /etc/tether/
USER tether
EXPOSE 8080 9901
# The admin listener's liveness path; `tether probe` exits 0 on a 200 (the slim base has no
# curl). It assumes the admin listener on port 9901 with /healthz reachable without a token
# (loopback, or listed in admin.public).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["tether", "probe", "http://127.0.0.1:9901/healthz"]
ENTRYPOINT ["tether"]
CMD ["run", "-c", "/etc/tether/tether.yaml"]
