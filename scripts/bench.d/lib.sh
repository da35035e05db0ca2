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

# h2load_row LABEL URL PIDS [PEER_PIDS]: as wrk_row, over HTTP/2 with
# h2load $H2LOAD_ARGS (p99 from its per-request log).
h2load_row() {
	local label=$1 url=$2 pids=$3 peers=${4:-} out before after pbefore=0 pafter=0 log
	log=$(mktemp)
	if [[ -n ${WRK_WARMUP:-} ]]; then h2load -t1 -c32 -m4 -D2 "$url" >/dev/null 2>&1; fi
	before=$(cpu_ticks $pids)
	[[ -z $peers ]] || pbefore=$(cpu_ticks $peers)
	out=$(h2load ${H2LOAD_ARGS:--t1 -c64 -m4 -D5} --log-file="$log" "$url")
	after=$(cpu_ticks $pids)
	[[ -z $peers ]] || pafter=$(cpu_ticks $peers)
	local p99
	p99=$(awk '$2 == 200 { print $3 }' "$log" | sort -n | awk '{ v[NR] = $1 } END { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.2f", v[i] / 1000 }')
	rm -f "$log"
	echo "$out" | awk -v label="$label" -v p99="$p99" -v ticks=$((after - before)) -v pticks=$((pafter - pbefore)) -v hz="$(getconf CLK_TCK)" '
		/^finished in/ { rps = $4 }
		/^requests:/ { n = $8 }
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

# idle_open NAME ADDR HOST: IDLE keep-alive clients ($BENCH/idleconns) each
# make one request to ADDR (Host: HOST, path /users/; over TLS with
# IDLE_TLS=1) and stay open until idle_close NAME; returns once they are
# all open (false, with the reason on stdout, when they could not be).
idle_open() {
	local name=$1 addr=$2 host=$3 f="$BENCH/idle-$$-$1" i
	local tlsflag=""
	[[ ${IDLE_TLS:-} == 1 ]] && tlsflag=-tls
	[[ ${IDLE_H2:-} == 1 ]] && tlsflag+=" -h2"
	rm -f "$f.in" "$f.out"
	mkfifo "$f.in"
	exec {IDLE_FD}<>"$f.in"
	eval "IDLE_FD_$name=$IDLE_FD"
	IDLE_FDS="${IDLE_FDS:-} $IDLE_FD"
	# The client holds no write end of any set's pipe (its own included):
	# each set hangs up when idle_close closes the shell's.
	local closes="" x
	for x in $IDLE_FDS; do closes+=" $x>&-"; done
	eval "\"\$BENCH/idleconns\" -addr \"\$addr\" -n \"\$IDLE\" -host \"\$host\" $tlsflag <\"\$f.in\" >\"\$f.out\" 2>&1 $closes &"
	eval "IDLE_PID_$name=$!"
	for ((i = 0; i < 1200; i++)); do
		grep -q '^ready' "$f.out" 2>/dev/null && return 0
		kill -0 "$!" 2>/dev/null || break
		sleep 0.1
	done
	cat "$f.out"
	return 1
}

# idle_close NAME: the clients of idle_open NAME hang up.
idle_close() {
	local fd pid
	eval "fd=\$IDLE_FD_$1 pid=\$IDLE_PID_$1"
	exec {fd}>&-
	IDLE_FDS=$(echo " ${IDLE_FDS:-} " | sed "s/ $fd / /")
	wait "$pid" 2>/dev/null || true
	rm -f "$BENCH/idle-$$-$1.in" "$BENCH/idle-$$-$1.out"
}

# idle_rows LABEL ADDR HOST "PIDS" [LABEL ADDR HOST "PIDS"]...: for each
# target in turn, IDLE idle clients (idle_open), the earlier ones held
# still; a table row for each: RSS of its PIDS just before and with its
# clients, KiB per idle client, and the requests/s of wrk $WRK_ARGS to
# /users/ while all of them are held open: the median of
# IDLE_WRK_ROUNDS (3) runs each, the targets taking turns in an order
# rotated each round, so that all see the same machine. (Two targets in
# one process: the second's growth is on top of the first's clients.)
idle_rows() {
	local -a label addr host pids before after rps
	local n=0 i r k scheme=http
	[[ ${IDLE_TLS:-} == 1 ]] && scheme=https
	while (($# >= 4)); do
		label[n]=$1 addr[n]=$2 host[n]=$3 pids[n]=$4 rps[n]=""
		n=$((n + 1))
		shift 4
	done
	sleep 1
	for ((i = 0; i < n; i++)); do
		before[i]=$(rss_kb ${pids[i]})
		if ! idle_open "T$i" "${addr[i]}" "${host[i]}"; then
			echo "| ${label[i]} | failed | | | |"
			for ((k = 0; k <= i; k++)); do idle_close "T$k"; done
			return
		fi
		sleep 2
		after[i]=$(rss_kb ${pids[i]})
	done
	for ((r = 0; r < ${IDLE_WRK_ROUNDS:-3}; r++)); do
		for ((k = 0; k < n; k++)); do
			i=$(((k + r) % n))
			rps[i]+="$(wrk $WRK_ARGS -H "Host: ${host[i]}" "$scheme://${addr[i]}/users/" | awk '/^Requests\/sec/ {print $2}') "
		done
	done
	for ((i = 0; i < n; i++)); do idle_close "T$i"; done
	for ((i = 0; i < n; i++)); do
		echo "${rps[i]}" | tr ' ' '\n' | grep . | sort -n | awk -v l="${label[i]}" -v b="${before[i]}" -v a="${after[i]}" -v n="$IDLE" \
			'{ v[NR] = $1 } END { printf "| %s | %.0f | %.0f | %.2f | %.0f |\n", l, b/1024, a/1024, (a-b)/n, (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
	done
}
