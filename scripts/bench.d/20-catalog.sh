#!/usr/bin/env bash
# Catalog watcher: propagation of health changes (the watcher's View, the
# attache sidecar's DNS, a raw consul/api blocking query in both consistency
# modes, Consul's own DNS on the client agent) and, with 1,000 services × 10
# instances, every name answering, the connections to the agent (counted from
# /proc), health changes against raw blocking queries, bytes and CPU per
# change, RSS. bench/catalog/main.go does the work: it starts its own
# three-server Consul cluster and a client agent (at Consul's default
# per-client connection limit) on loopback.
# Environment: CATALOG_BENCH_ARGS adds flags, e.g. "-changes 50 -window 10s".
set -euo pipefail
cd "$(dirname "$0")/../.."

[[ -x .bin/consul ]] || { echo "## Catalog"; echo; echo "skipped: .bin/consul is missing (run scripts/build)"; exit 0; }
mkdir -p .bench
bin="$(mktemp -d)"
trap 'rm -rf "$bin" .bench/catalog-cluster' EXIT
go build -o "$bin/catalog-bench" ./bench/catalog
# shellcheck disable=SC2086
timeout 420 "$bin/catalog-bench" -scenario all -consul-bin .bin/consul -attache .bin/attache \
	-dir .bench/catalog-cluster ${CATALOG_BENCH_ARGS:-}
