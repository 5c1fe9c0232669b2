# Builds the `pgrelay` binary. The sqlx offline data in .sqlx/ lets the build
# check its queries without a database.
FROM rust:1.95-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
COPY Cargo.toml Cargo.lock build.rs sqlx.toml ./
# Dependencies first, in a layer of their own: a change to pgrelay's sources
# rebuilds only pgrelay.
RUN mkdir -p src migrations \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin pgrelay \
 && rm -rf src target/release/.fingerprint/pgrelay-* target/release/deps/pgrelay-* target/release/deps/libpgrelay-*
COPY .sqlx .sqlx
COPY migrations migrations
COPY src src
# The JavaScript client, served at /client.js (compiled in).
COPY clients/js/src clients/js/src
RUN cargo build --release --locked --bin pgrelay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
# nobody, by number: Kubernetes' runAsNonRoot checks a numeric user.
USER 65534:65534
ENV PGRELAY_LISTEN=0.0.0.0:8080
EXPOSE 8080
# Ready: registered, heartbeating, listening (`/readyz`, through the binary:
# the slim image has no curl).
HEALTHCHECK --interval=5s --timeout=6s --start-period=10s --retries=3 CMD ["pgrelay", "health"]
ENTRYPOINT ["pgrelay"]
CMD ["serve"]
