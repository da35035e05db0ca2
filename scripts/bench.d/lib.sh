# Helpers for the benchmark parts. Source it.
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
BENCH="$ROOT/.bench"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# bg CMD...: run CMD in the background, stopped when the part ends.
bg() { "$@" >>"$BENCH/$(basename "$1").log" 2>&1 & PIDS+=($!); }

# cpu_ticks PID...: user+system clock ticks used so far by these processes and their children.
cpu_ticks() {
	local t=0 p
	for p in "$@"; do
		[[ -r /proc/$p/stat ]] || continue
		t=$((t + $(awk '{print $14+$15+$16+$17}' "/proc/$p/stat")))
	done
	echo "$t"
}

# pids_of PATTERN: pids whose command line matches, with their children
# (nginx's workers, say).
pids_of() {
	local p
	for p in $(pgrep -f "$1"); do echo "$p $(pgrep -P "$p")"; done | tr '\n' ' '
}

# wrk_row LABEL URL PIDS: run wrk and print "LABEL rps p99_ms cpu_s_per_10k".
WRK_ARGS=${WRK_ARGS:--t2 -c64 -d10s}
wrk_row() {
	local label=$1 url=$2 pids=$3 out before after
	wrk $WRK_ARGS --latency "$url" >/dev/null 2>&1 # warm-up (keepalive pools, JIT-free but caches)
	before=$(cpu_ticks $pids)
	out=$(wrk $WRK_ARGS --latency "$url")
	after=$(cpu_ticks $pids)
	echo "$out" | awk -v label="$label" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
		function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
		/^ +99%/ { p99 = ms($2) }
		/^Requests\/sec/ { rps = $2 }
		/requests in/ { n = $1 }
		END { printf "%s %.0f %.2f %.3f\n", label, rps, p99, (n > 0 ? ticks/hz / n * 10000 : 0) }'
}
