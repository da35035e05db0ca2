#!/usr/bin/env bash
# DNS: attache's DNS vs a bare miekg/dns responder vs Consul's DNS on a client
# agent, measured with dnsperf in one run (bench/dns/main.go does the work:
# it starts its own one-server Consul cluster and client agent on loopback).
# Environment: DNS_BENCH_ARGS adds flags, e.g. "-duration 10s"
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v dnsperf >/dev/null; then
	echo "## DNS"
	echo
	echo "skipped: dnsperf is not installed (apt-get install dnsperf)"
	exit 0
fi
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/dns-bench" ./bench/dns
# shellcheck disable=SC2086
timeout 300 "$bin/dns-bench" -consul .bin/consul ${DNS_BENCH_ARGS:-}
