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

# wrk_row LABEL URL PIDS [PEER_PIDS]: run wrk and print "LABEL rps p99_ms
# cpu_s_per_10k peer_cpu_s_per_10k" (the CPU of PIDS and of PEER_PIDS, say
# the backend behind a proxy; 0 without them).
# WRK_WARMUP (wrk arguments, e.g. "-t2 -c64 -d2s") runs first, unmeasured, when set.
WRK_ARGS=${WRK_ARGS:--t2 -c64 -d6s}
wrk_row() {
	local label=$1 url=$2 pids=$3 peers=${4:-} out before after pbefore=0 pafter=0
	if [[ -n ${WRK_WARMUP:-} ]]; then wrk $WRK_WARMUP "$url" >/dev/null 2>&1; fi
	before=$(cpu_ticks $pids)
	[[ -z $peers ]] || pbefore=$(cpu_ticks $peers)
	out=$(wrk $WRK_ARGS --latency "$url")
	after=$(cpu_ticks $pids)
	[[ -z $peers ]] || pafter=$(cpu_ticks $peers)
	echo "$out" | awk -v label="$label" -v ticks=$((after - before)) -v pticks=$((pafter - pbefore)) -v hz="$(getconf CLK_TCK)" '
		function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
		/^ +99%/ { p99 = ms($2) }
		/^Requests\/sec/ { rps = $2 }
		/requests in/ { n = $1 }
		END { printf "%s %.0f %.2f %.3f %.3f\n", label, rps, p99, (n > 0 ? ticks/hz / n * 10000 : 0), (n > 0 ? pticks/hz / n * 10000 : 0) }'
}

# median_rows: reads "LABEL rps p99 cpu peer_cpu" lines (several per label)
# and prints one line per label, in first-seen order, with the median of
# each column.
median_rows() {
	awk '{ if (!($1 in n)) order[++k] = $1; i = ++n[$1]; r[$1, i] = $2; p[$1, i] = $3; c[$1, i] = $4; q[$1, i] = $5 + 0 }
	function med(a, l, m,   v, i, j, t) {
		for (i = 1; i <= m; i++) v[i] = a[l, i]
		for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
		return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
	}
	END { for (x = 1; x <= k; x++) { l = order[x]; printf "%s %.0f %.2f %.3f %.3f\n", l, med(r, l, n[l]), med(p, l, n[l]), med(c, l, n[l]), med(q, l, n[l]) } }'
}

# rss_kb PIDS...: the summed VmRSS (kB) of the processes.
rss_kb() {
	local t=0 p
	for p in "$@"; do
		[[ -r /proc/$p/status ]] && t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status")))
	done
	echo "$t"
}

# idle_row LABEL ADDR HOST PIDS...: IDLE keep-alive clients ($BENCH/idleconns)
# each make one request to ADDR (Host: HOST, path /users/) and stay open;
# prints a table row: RSS of PIDS before and with them, KiB per idle
# client, and the requests/s of wrk $WRK_ARGS to /users/ meanwhile (the
# median of IDLE_WRK_ROUNDS, 3, runs). IDLE_TLS=1: over TLS (HTTP/1.1).
idle_row() {
	local label=$1 addr=$2 host=$3 before after rps line scheme=http tlsflag="" i
	shift 3
	if [[ ${IDLE_TLS:-} == 1 ]]; then scheme=https tlsflag=-tls; fi
	sleep 1
	before=$(rss_kb "$@")
	coproc IDLEC { exec "$BENCH/idleconns" -addr "$addr" -n "$IDLE" -host "$host" $tlsflag 2>&1; }
	local cpid=$IDLEC_PID
	if ! read -r line <&"${IDLEC[0]}" || [[ $line != ready* ]]; then
		echo "| $label | failed: $line | | |"
		kill "$cpid" 2>/dev/null || true
		wait "$cpid" 2>/dev/null || true
		return
	fi
	sleep 2
	after=$(rss_kb "$@")
	rps=$(for ((i = 0; i < ${IDLE_WRK_ROUNDS:-3}; i++)); do
		wrk $WRK_ARGS -H "Host: $host" "$scheme://$addr/users/" | awk '/^Requests\/sec/ {print $2}'
	done | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
	exec {IDLEC[1]}>&-
	wait "$cpid" 2>/dev/null || true
	awk -v l="$label" -v b="$before" -v a="$after" -v n="$IDLE" -v r="$rps" \
		'BEGIN { printf "| %s | %.0f | %.0f | %.2f | %.0f |\n", l, b/1024, a/1024, (a-b)/n, r }'
}
