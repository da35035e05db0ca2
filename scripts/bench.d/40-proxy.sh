# Proxy: a trivial Go backend (two instances) called directly, through nginx
# configured like the seed's gateway block (upstream keepalive 64,
# proxy_http_version 1.1, Connection ""), haproxy, attache's upstream listener
# and attache's HTTP proxy listener — all in one run, same wrk settings.
#
# The attache rows are the real `attache sidecar` binary, its view fed by a
# Consul dev agent on 127.0.4.20 where the two instances are registered.
# ATTACHE_PROXY_CMD replaces it, e.g. with the bench/proxy program
# (".bench/attache-proxy -service users -backends ... -upstream ... -http-proxy ...",
# or its -minimal fasthttp reference proxy, for profiling). It must listen with
# upstream users on 127.0.4.12:8080 and the HTTP proxy on 127.0.4.13:8080, with
# instances 127.0.4.1:8081, 127.0.4.2:8081.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
B1=127.0.4.1:8081 B2=127.0.4.2:8081
NGINX=127.0.4.10:8080 HAPROXY=127.0.4.11:8080 UPSTREAM=127.0.4.12:8080 HTTPPROXY=127.0.4.13:8080
# The access log's cost: bench/proxy (attache's proxy over a static view)
# twice, the same but for -access-log, each with an upstream listener only.
LOGOFF=127.0.4.14:8080 LOGON=127.0.4.15:8080
mkdir -p "$BENCH/proxy-nginx" "$BENCH/proxy-haproxy"
[[ -x $BENCH/backend ]] || go build -o "$BENCH/backend" ./bench/backend
go build -o "$BENCH/attache-proxy" ./bench/proxy
CONSUL=127.0.4.20
if [[ -z ${ATTACHE_PROXY_CMD:-} ]]; then
	bg "$BIN/consul" agent -dev -node bench-proxy -bind "$CONSUL" -client "$CONSUL" -data-dir "$BENCH/proxy-consul" \
		-hcl 'disable_update_check = true' -hcl 'ports { grpc = -1, grpc_tls = -1 }'
	wait_for "consul dev agent" 30 curl -fsS "http://$CONSUL:8500/v1/status/leader"
	for b in $B1 $B2; do
		curl -fsS -X PUT "http://$CONSUL:8500/v1/agent/service/register" \
			-d "{\"Name\":\"users\",\"ID\":\"users-$b\",\"Address\":\"${b%:*}\",\"Port\":${b#*:}}"
	done
	ATTACHE_PROXY_CMD="env ${ATTACHE_ENV:-} $BIN/attache sidecar -node bench-proxy -consul $CONSUL:8500 -admin $CONSUL:19001 -watch-service users -upstream users=$UPSTREAM -http-proxy $HTTPPROXY -log-level warn"
fi

cat >"$BENCH/proxy-nginx/nginx.conf" <<CONF
worker_processes 2;
worker_rlimit_nofile 20000;
pid $BENCH/proxy-nginx/nginx.pid;
error_log $BENCH/proxy-nginx/error.log warn;
daemon off;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $BENCH/proxy-nginx;
  proxy_temp_path $BENCH/proxy-nginx;
  upstream user_service {
    server $B1;
    server $B2;
    keepalive 64;
  }
  server {
    listen $NGINX;
    location /users/ {
      proxy_pass http://user_service;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header Connection "";
      proxy_http_version 1.1;
    }
  }
}
CONF
cat >"$BENCH/proxy-haproxy/haproxy.cfg" <<CONF
global
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind $HAPROXY
  default_backend users
backend users
  balance roundrobin
  server u1 $B1
  server u2 $B2
CONF

bg "$BENCH/backend" -listen "$B1,$B2"
bg nginx -c "$BENCH/proxy-nginx/nginx.conf"
bg haproxy -f "$BENCH/proxy-haproxy/haproxy.cfg"
# shellcheck disable=SC2086
bg $ATTACHE_PROXY_CMD
ATTACHE_PID=${PIDS[-1]}
bg "$BENCH/attache-proxy" -backends "$B1,$B2" -upstream "$LOGOFF" -http-proxy ""
LOGOFF_PID=${PIDS[-1]}
: >"$BENCH/proxy-access.log"
bg "$BENCH/attache-proxy" -backends "$B1,$B2" -upstream "$LOGON" -http-proxy "" -access-log "$BENCH/proxy-access.log"
LOGON_PID=${PIDS[-1]}
wait_for "backend" 10 curl -fsS "http://$B1/users/"
wait_for "nginx" 10 curl -fsS "http://$NGINX/users/"
wait_for "haproxy" 10 curl -fsS "http://$HAPROXY/users/"
wait_for "attache upstream listener" 20 curl -fsS "http://$UPSTREAM/users/"
wait_for "attache http proxy" 20 curl -fsS -x "http://$HTTPPROXY" http://users.service.consul/users/
wait_for "bench/proxy, access log off" 10 curl -fsS "http://$LOGOFF/users/"
wait_for "bench/proxy, access log on" 10 curl -fsS "http://$LOGON/users/"

# Idle keep-alive clients: IDLE_CLIENTS (10,000) connections each make one
# request and stay open, idle; the row is the proxy's RSS growth per client
# (nginx: master and workers), then the requests/s of wrk -c64 while they
# are held open. It runs before the load rounds, on fresh processes (after
# them, memory the rounds freed would hide part of the growth), and is
# printed last.
idle_table() {
	IDLE=${IDLE_CLIENTS:-10000}
	if ((IDLE > 0)) && (($(ulimit -n) > IDLE + 1000)); then
		go build -o "$BENCH/idleconns" ./bench/idleconns
		echo
		echo "Idle keep-alive clients: $IDLE connections that each made one request, held open while wrk $WRK_ARGS runs beside them"
		echo "(nginx's and the upstream listener's held at once, wrk taking turns between them, medians of ${IDLE_WRK_ROUNDS:-3} runs; the HTTP proxy row comes"
		echo "after them in the same process, which reuses the memory the upstream row's clients left: read its growth as a lower bound):"
		echo
		echo "| target | RSS before MiB | RSS with them MiB | KiB per idle client | requests/s meanwhile |"
		echo "|---|---:|---:|---:|---:|"
		idle_rows nginx "$NGINX" users "$(pids_of "nginx -c $BENCH/proxy-nginx")" attache-upstream "$UPSTREAM" users "$ATTACHE_PID"
		idle_rows attache-http-proxy "$HTTPPROXY" users.service.consul "$ATTACHE_PID"
	else
		echo
		echo "(idle clients skipped: ulimit -n $(ulimit -n) is too low for IDLE_CLIENTS=$IDLE)"
	fi
}
idle_out=$(idle_table)

# wrk has no proxy mode: the HTTP proxy row sends origin-form requests with
# the service's name as Host, which the proxy listener accepts as well.
echo 'wrk.headers["Host"] = "users.service.consul"' >"$BENCH/proxy-host.lua"
proxy_row() {
	local save=$WRK_ARGS
	WRK_ARGS="$WRK_ARGS -s $BENCH/proxy-host.lua"
	wrk_row "$@"
	WRK_ARGS=$save
}

# Rounds: every target once per round, the order rotated each round, so load
# from elsewhere lands on all of them alike; the table shows the medians.
ROUNDS=${ROUNDS:-3}
WRK_ARGS=${WRK_ARGS:--t2 -c64 -d6s}
BACKEND_PIDS=$(pids_of "$BENCH/backend")
measure() {
	case $1 in
	direct) wrk_row direct "http://$B1/users/" "$BACKEND_PIDS" "$BACKEND_PIDS" ;;
	nginx) wrk_row nginx "http://$NGINX/users/" "$(pids_of "nginx -c $BENCH/proxy-nginx")" "$BACKEND_PIDS" ;;
	haproxy) wrk_row haproxy "http://$HAPROXY/users/" "$(pids_of "haproxy -f $BENCH/proxy-haproxy")" "$BACKEND_PIDS" ;;
	attache-upstream) wrk_row attache-upstream "http://$UPSTREAM/users/" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	attache-http-proxy) proxy_row attache-http-proxy "http://$HTTPPROXY/users/" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	access-log-off) wrk_row access-log-off "http://$LOGOFF/users/" "$LOGOFF_PID" "$BACKEND_PIDS" ;;
	access-log-on) wrk_row access-log-on "http://$LOGON/users/" "$LOGON_PID" "$BACKEND_PIDS" ;;
	esac
}
TARGETS=(${PROXY_TARGETS:-direct nginx haproxy attache-upstream attache-http-proxy access-log-off access-log-on})
raw=$(
	for t in "${TARGETS[@]}"; do WRK_WARMUP="-t2 -c64 -d2s" measure "$t" >/dev/null; done
	for ((r = 0; r < ROUNDS; r++)); do
		for ((i = 0; i < ${#TARGETS[@]}; i++)); do
			measure "${TARGETS[(i + r) % ${#TARGETS[@]}]}"
		done
	done
)
rows=$(echo "$raw" | median_rows | awk -v order="${TARGETS[*]}" 'BEGIN { n = split(order, o, " ") } { line[$1] = $0 } END { for (i = 1; i <= n; i++) print line[o[i]] }')
echo "## Proxy: direct vs nginx vs haproxy vs attache (upstream listener, HTTP proxy)"
echo
echo "wrk $WRK_ARGS against two instances of a trivial Go backend; medians of $ROUNDS rounds in one run (each round measures every target, the order rotated); ratio = requests/s relative to nginx;"
echo "p99 ratio = p99 relative to nginx's (goal: attache ≥ 1.0× rps with p99 ≤ 1.2×); CPU = the proxy's (for direct: the backend's) CPU seconds per 10k requests;"
echo "backend CPU = the Go backend's behind that target (wrk, proxy and backend share the machine's cores: the requests/s follow the sum)."
echo
echo "| target | requests/s | ratio vs nginx | p99 ms | p99 vs nginx | CPU s / 10k req | backend CPU s / 10k req |"
echo "|---|---:|---:|---:|---:|---:|---:|"
echo "$rows" | awk '$1=="nginx"{n=$2; p=$3} {r[NR]=$0} END {for (i=1;i<=NR;i++) {split(r[i],f," "); printf "| %s | %d | %.2f× | %.2f | %.2f× | %.3f | %.3f |\n", f[1], f[2], f[2]/n, f[3], (p>0 ? f[3]/p : 0), f[4], f[5]}}'
# The access log's cost, from the rounds' pairs (each round measures both).
echo "$raw" | awk '$1=="access-log-off"{off[++a]=$2; offc[a]=$4} $1=="access-log-on"{on[++b]=$2; onc[b]=$4}
	function med(v, m,   i, j, t) { for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }; return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2 }
	END { m = (a < b ? a : b); if (m == 0) exit; for (i = 1; i <= m; i++) { r[i] = on[i] / off[i]; c[i] = (offc[i] > 0 ? onc[i] / offc[i] : 0) }
		printf "\nAccess log cost (bench/proxy with -access-log FILE vs without, every request logged; median of %d paired rounds): %.2f× the requests/s (goal ≥ 0.95×), %.2f× the CPU per request.\n", m, med(r, m), med(c, m) }'

# The same cost with both loaded at once (wrk -t1 -c32 on each, side by
# side, ACCESS_PAIRS times): what else the machine runs then lands on both
# alike, which rounds one after the other cannot give on a busy machine
# (there, two identical proxies measured in turn differ by up to 20 %).
if [[ " ${TARGETS[*]} " == *" access-log-off "* && " ${TARGETS[*]} " == *" access-log-on "* ]]; then
	hz=$(getconf CLK_TCK)
	for ((r = 0; r < ${ACCESS_PAIRS:-6}; r++)); do
		c0=$(cpu_ticks $LOGOFF_PID) c1=$(cpu_ticks $LOGON_PID)
		wrk -t1 -c32 -d5s "http://$LOGOFF/users/" >"$BENCH/pair-off.txt" &
		w=$!
		wrk -t1 -c32 -d5s "http://$LOGON/users/" >"$BENCH/pair-on.txt"
		wait $w
		d0=$(($(cpu_ticks $LOGOFF_PID) - c0)) d1=$(($(cpu_ticks $LOGON_PID) - c1))
		n0=$(awk '/requests in/{print $1}' "$BENCH/pair-off.txt") n1=$(awk '/requests in/{print $1}' "$BENCH/pair-on.txt")
		echo "$n0 $n1 $d0 $d1"
	done | awk -v load="$(cut -d' ' -f1 /proc/loadavg)" '{ r[++m] = $2 / $1; c[m] = ($3 > 0 && $2 > 0 ? ($4 / $2) / ($3 / $1) : 0) }
		function med(v, m,   i, j, t) { for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }; return (m % 2) ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2 }
		END { if (m) printf "Loaded at once (wrk -t1 -c32 on each, side by side; median of %d pairs, load average %s): %.2f× the requests/s, %.2f× the CPU per request.\n", m, load, med(r, m), med(c, m) }'
fi

# Latency at a fixed rate (half of nginx's max above), which wrk's closed loop
# cannot show: hey with -q paces each of its workers.
if command -v hey >/dev/null; then
	rate=$(echo "$rows" | awk '$1=="nginx"{print int($2/2)}')
	workers=32
	hey_row() { # LABEL URL [HOST]
		local out
		out=$(hey -z 5s -c "$workers" -q $((rate / workers)) ${3:+-host "$3"} "$2" 2>&1)
		echo "$out" | awk -v label="$1" '
			/Requests\/sec:/ { rps = $2 }
			/ 50% in / { p50 = $3 * 1000 } / 99% in / { p99 = $3 * 1000 }
			/^[ \t]*\[[0-9]+\]/ { split($1, a, /[][]/); if (a[2] !~ /^2/) bad += $2 }
			END { printf "| %s | %.0f | %.2f | %.2f | %d |\n", label, rps, p50, p99, bad }'
	}
	echo
	echo "Latency at a fixed rate of $rate requests/s (hey -c $workers -q $((rate / workers)) -z 5s; half of nginx's max above):"
	echo
	echo "| target | requests/s | p50 ms | p99 ms | non-2xx |"
	echo "|---|---:|---:|---:|---:|"
	for t in "${TARGETS[@]}"; do
		case $t in
		nginx) hey_row nginx "http://$NGINX/users/" ;;
		haproxy) hey_row haproxy "http://$HAPROXY/users/" ;;
		attache-upstream) hey_row attache-upstream "http://$UPSTREAM/users/" ;;
		attache-http-proxy) hey_row attache-http-proxy "http://$HTTPPROXY/users/" users.service.consul ;;
		esac
	done
fi
echo "$idle_out"
