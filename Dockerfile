# syntax=docker/dockerfile:1
# The shipped image: the profile-guided binary (scripts/build-release), on a
# small Debian runtime, as a non-root user. One image for every role:
#   docker run shardgate proxy --config /etc/shardgate/shardgate.toml
#   docker run shardgate coordinator --config /etc/shardgate/coordinator.toml
#   docker run shardgate agent --coordinator ... --node-id ... --ip ...

FROM rust:1.95-bookworm AS build
# The profile-guided build trains the binary on real traffic: nginx, wrk and
# h2load are its upstreams and load; python3 drives it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx wrk nghttp2-client openssl python3 \
 && rm -rf /var/lib/apt/lists/*
RUN rustup component add llvm-tools
WORKDIR /src
COPY . .
RUN scripts/build-release \
 && install -m 0755 target/pgo/shardgate /usr/local/bin/shardgate

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/shardgate --create-home shardgate
COPY --from=build /usr/local/bin/shardgate /usr/local/bin/shardgate
COPY config/ /etc/shardgate/
USER 10001
# The proxy's last-known-good map cache (topology.cache_file = "auto").
ENV STATE_DIRECTORY=/var/lib/shardgate
WORKDIR /var/lib/shardgate
# Proxy, proxy admin, coordinator HTTP and gRPC.
EXPOSE 8080 9090 7400 7401
ENTRYPOINT ["/usr/local/bin/shardgate"]
# The example config and map; mount your own over /etc/shardgate.
CMD ["proxy", "--config", "/etc/shardgate/shardgate.toml", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090", "--topology", "/etc/shardgate/topology.json"]
