# Builds the `pgrelay` binary. The sqlx offline data in .sqlx/ lets the build
# check its queries without a database.
FROM rust:1.95-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
COPY Cargo.toml Cargo.lock build.rs sqlx.toml ./
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
USER nobody
ENV PGRELAY_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["pgrelay"]
CMD ["serve"]
