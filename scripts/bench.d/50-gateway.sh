# Gateway: the API gateway beside nginx running the seed's gateway block
# (location /users/ and /inventory/, upstream keepalive 32, proxy_http_version
# 1.1, Connection "", X-Real-IP; listen ... ssl http2), the same backends, the
# same wrk settings, in one run:
#   - apply → every gateway applied: two gateway sidecars on one Consul dev
#     agent; a document written to KV as the control service writes it
#     (version + current pointer in one transaction), timed until both
#     routes/applied/<node> keys hold the version (bench/gateway);
#   - requests/s and p99 over plain HTTP and over TLS (wrk over https with
#     keep-alive: HTTP/1.1);
#   - a route with a rate limit too high to trigger beside the same route
#     without one;
#   - the memory one route's limit holds with 100,000 distinct clients.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
B1=127.0.5.1:8081 B2=127.0.5.2:8081 B3=127.0.5.3:8081 B4=127.0.5.4:8081
NGINX=127.0.5.10 NGINX2=127.0.5.11 GW1=127.0.5.12 GW2=127.0.5.13 GW3=127.0.5.14 NGINX3=127.0.5.15 CONSUL=127.0.5.20
D="$BENCH/gateway"
rm -rf "$D"
mkdir -p "$D/nginx" "$D/tls"
[[ -x $BENCH/backend ]] || go build -o "$BENCH/backend" ./bench/backend
go build -o "$BENCH/gateway-apply" ./bench/gateway

# A CA and a certificate for both nginx and the gateway.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=bench CA" \
	-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
	-keyout "$D/tls/ca.key" -out "$D/tls/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=api.bench" \
	-keyout "$D/tls/server.key" -out "$D/tls/server.csr" 2>/dev/null
openssl x509 -req -in "$D/tls/server.csr" -CA "$D/tls/ca.crt" -CAkey "$D/tls/ca.key" -CAcreateserial -days 30 \
	-extfile <(printf 'subjectAltName=IP:%s,IP:%s,DNS:api.bench\nextendedKeyUsage=serverAuth\n' "$NGINX" "$GW1") \
	-out "$D/tls/server.crt" 2>/dev/null

cat >"$D/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $D/nginx/nginx.pid;
error_log $D/nginx/error.log warn;
daemon off;
worker_rlimit_nofile 20000;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $D/nginx;
  proxy_temp_path $D/nginx;
  upstream user_service {
    server $B1;
    server $B2;
    keepalive 32;
  }
  upstream inventory_service {
    server $B3;
    server $B4;
    keepalive 32;
  }
  server {
    listen $NGINX:8080;
    listen $NGINX:8443 ssl http2;
    server_name api.bench;
    ssl_certificate $D/tls/server.crt;
    ssl_certificate_key $D/tls/server.key;
    location /users/ {
      proxy_pass http://user_service;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header Connection "";
      proxy_http_version 1.1;
    }
    location /inventory/ {
      proxy_pass http://inventory_service;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header Connection "";
      proxy_http_version 1.1;
    }
  }
}
CONF

cat >"$D/routes.hcl" <<DOC
gateway {
  tls {
    cert = "$D/tls/server.crt"
    key  = "$D/tls/server.key"
  }
}
route "users" {
  prefix  = "/users/"
  service = "users"
}
route "inventory" {
  prefix  = "/inventory/"
  service = "inventory"
}
route "limited" {
  prefix  = "/limited/"
  service = "users"
  rate_limit {
    rps = 1000000000
  }
}
DOC

bg "$BIN/consul" agent -dev -node bench-gateway -bind "$CONSUL" -client "$CONSUL" -data-dir "$D/consul" \
	-hcl 'disable_update_check = true' -hcl 'ports { grpc = -1, grpc_tls = -1 }'
wait_for "consul dev agent" 30 curl -fsS "http://$CONSUL:8500/v1/status/leader"
for s in users:$B1 users:$B2 inventory:$B3 inventory:$B4; do
	name=${s%%:*} b=${s#*:}
	curl -fsS -X PUT "http://$CONSUL:8500/v1/agent/service/register" \
		-d "{\"Name\":\"$name\",\"ID\":\"$name-$b\",\"Address\":\"${b%:*}\",\"Port\":${b#*:}}"
done
bg "$BENCH/backend" -listen "$B1,$B2,$B3,$B4"
bg nginx -c "$D/nginx/nginx.conf"
for g in 1 2 3; do
	ip=$GW1
	((g == 2)) && ip=$GW2
	((g == 3)) && ip=$GW3
	bg "$BIN/attache" sidecar -node "bench-gw$g" -consul "$CONSUL:8500" -admin "$ip:19001" -data-dir "$D/gw$g" \
		-gateway "$ip:8080" -gateway-tls "$ip:8443" -log-level warn -access-log off # as nginx: access_log off
done
ATTACHE_PID=$(pgrep -f "attache sidecar -node bench-gw1 ")
"$BENCH/gateway-apply" -consul "$CONSUL:8500" -nodes bench-gw1,bench-gw2,bench-gw3 -doc "$D/routes.hcl" -n 1 >/dev/null
wait_for "backend" 10 curl -fsS "http://$B1/users/"
wait_for "nginx" 10 curl -fsS "http://$NGINX:8080/users/"
wait_for "attache gateway" 20 curl -fsS "http://$GW1:8080/users/1"
wait_for "attache gateway over TLS" 20 curl -fsS --cacert "$D/tls/ca.crt" "https://$GW1:8443/users/1"
wait_for "second gateway over TLS" 20 curl -fsSk "https://$GW2:8443/users/1"
wait_for "third gateway over TLS" 20 curl -fsSk "https://$GW3:8443/users/1"

# Idle keep-alive clients on fresh processes, before the load rounds (as in
# the proxy part): IDLE_CLIENTS (10,000) connections to /users/ each make
# one request and stay open; RSS growth per client, nginx (master and
# workers, the seed's block) against the gateway's plain listener, then a
# second nginx (the same block on NGINX2) against the second gateway's TLS
# listener (HTTP/1.1 by ALPN), both fresh.
IDLE=${IDLE_CLIENTS:-10000}
WRK_ARGS=${WRK_ARGS:--t2 -c64 -d6s}
idle_out=""
if ((IDLE > 0)) && (($(ulimit -n) > IDLE + 1000)); then
	go build -o "$BENCH/idleconns" ./bench/idleconns
	idle_out=$(
		echo "| target | RSS before MiB | RSS with them MiB | KiB per idle client | requests/s meanwhile |"
		echo "|---|---:|---:|---:|---:|"
		idle_rows nginx "$NGINX:8080" users "$(pids_of "nginx -c $D/nginx/")" attache-gateway "$GW1:8080" users "$ATTACHE_PID"
		mkdir -p "$D/nginx2"
		sed "s|$NGINX:|$NGINX2:|g; s|$D/nginx/nginx.pid|$D/nginx2/nginx.pid|" "$D/nginx/nginx.conf" >"$D/nginx2/nginx.conf"
		nginx -c "$D/nginx2/nginx.conf" >>"$BENCH/nginx.log" 2>&1 &
		n2=$!
		wait_for "second nginx" 10 curl -fsS "http://$NGINX2:8080/users/" >/dev/null
		IDLE_TLS=1 idle_rows nginx-tls "$NGINX2:8443" users "$(pids_of "nginx -c $D/nginx2/")" attache-gateway-tls "$GW2:8443" users "$(pgrep -f "attache sidecar -node bench-gw2 ")"
		kill "$n2"
		wait "$n2" 2>/dev/null || true
		mkdir -p "$D/nginx3"
		sed "s|$NGINX:|$NGINX3:|g; s|$D/nginx/nginx.pid|$D/nginx3/nginx.pid|" "$D/nginx/nginx.conf" >"$D/nginx3/nginx.conf"
		nginx -c "$D/nginx3/nginx.conf" >>"$BENCH/nginx.log" 2>&1 &
		n3=$!
		wait_for "third nginx" 10 curl -fsS "http://$NGINX3:8080/users/" >/dev/null
		IDLE_TLS=1 IDLE_H2=1 idle_rows nginx-h2 "$NGINX3:8443" users "$(pids_of "nginx -c $D/nginx3/")" attache-gateway-h2 "$GW3:8443" users "$(pgrep -f "attache sidecar -node bench-gw3 ")"
		kill "$n3"
		wait "$n3" 2>/dev/null || true
	)
fi

APPLY=$("$BENCH/gateway-apply" -consul "$CONSUL:8500" -nodes bench-gw1,bench-gw2 -doc "$D/routes.hcl" -n "${APPLIES:-60}")

ROUNDS=${ROUNDS:-3}
BACKEND_PIDS=$(pids_of "$BENCH/backend")
NGINX_PIDS=$(pids_of "nginx -c $D/nginx")
measure() {
	case $1 in
	nginx) wrk_row nginx "http://$NGINX:8080/users/1" "$NGINX_PIDS" "$BACKEND_PIDS" ;;
	attache-gateway) wrk_row attache-gateway "http://$GW1:8080/users/1" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	nginx-tls) wrk_row nginx-tls "https://$NGINX:8443/users/1" "$NGINX_PIDS" "$BACKEND_PIDS" ;;
	attache-gateway-tls) wrk_row attache-gateway-tls "https://$GW1:8443/users/1" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	attache-gateway-limited) wrk_row attache-gateway-limited "http://$GW1:8080/limited/1" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	nginx-h2) h2load_row nginx-h2 "https://$NGINX:8443/users/1" "$NGINX_PIDS" "$BACKEND_PIDS" ;;
	attache-gateway-h2) h2load_row attache-gateway-h2 "https://$GW1:8443/users/1" "$ATTACHE_PID" "$BACKEND_PIDS" ;;
	esac
}
# HTTP/2 rows with h2load (Debian: nghttp2-client), when it is there.
H2_TARGETS=""
command -v h2load >/dev/null && H2_TARGETS="nginx-h2 attache-gateway-h2"
TARGETS=(${GATEWAY_TARGETS:-nginx attache-gateway nginx-tls attache-gateway-tls attache-gateway-limited $H2_TARGETS})
raw=$(
	for t in "${TARGETS[@]}"; do WRK_WARMUP="-t2 -c64 -d2s" measure "$t" >/dev/null; done
	for ((r = 0; r < ROUNDS; r++)); do
		for ((i = 0; i < ${#TARGETS[@]}; i++)); do
			measure "${TARGETS[(i + r) % ${#TARGETS[@]}]}"
		done
	done
)
rows=$(echo "$raw" | median_rows | awk -v order="${TARGETS[*]}" 'BEGIN { n = split(order, o, " ") } { line[$1] = $0 } END { for (i = 1; i <= n; i++) if (o[i] in line) print line[o[i]] }')
MEM=$(cd "$ROOT" && ATTACHE_SKIP_CLUSTER=1 go test -count=1 -run 'TestLimiterMemory$' -v ./sidecar/gateway 2>&1 | sed -n 's/.*100,000 clients: //p')

echo "## Gateway: attache's API gateway vs nginx with the seed's gateway block"
echo
echo "$APPLY" | awk '{ printf "Apply → every gateway applied (two gateways, %d applies written to KV as the control service writes them): p50 %s ms, p99 %s ms, max %s ms (goal: p99 ≤ 100 ms).\n", $5, $2, $3, $4 }'
echo
echo "wrk $WRK_ARGS to /users/1 (two instances of a trivial Go backend behind each); medians of $ROUNDS rounds in one run, the order rotated each round;"
echo "ratio = requests/s relative to nginx on the same protocol (plain rows to nginx, TLS rows to nginx-tls, HTTP/2 rows (h2load ${H2LOAD_ARGS:--t1 -c64 -m4 -D5}) to nginx-h2; the limited row to attache-gateway);"
echo "CPU = the proxy's CPU seconds per 10k requests; backend CPU = the Go backend's. Goals: plain ≥ 1.0× with p99 ≤ 1.2×, TLS ≥ 0.8×, limited ≥ 0.95×."
echo
echo "| target | requests/s | ratio | p99 ms | p99 ratio | CPU s / 10k req | backend CPU s / 10k req |"
echo "|---|---:|---:|---:|---:|---:|---:|"
echo "$rows" | awk '{ r[$1] = $2; p[$1] = $3; line[NR] = $0 }
	END {
		for (i = 1; i <= NR; i++) {
			split(line[i], f, " "); ref = "nginx"
			if (f[1] ~ /tls$/) ref = "nginx-tls"
			if (f[1] ~ /h2$/) ref = "nginx-h2"
			if (f[1] == "attache-gateway-limited") ref = "attache-gateway"
			printf "| %s | %d | %.2f× | %.2f | %.2f× | %.3f | %.3f |\n", f[1], f[2], (r[ref] > 0 ? f[2] / r[ref] : 0), f[3], (p[ref] > 0 ? f[3] / p[ref] : 0), f[4], f[5]
		}
	}'
echo
echo "Rate-limit state with 100,000 distinct clients on one route: $MEM (Go heap, measured by TestLimiterMemory)."
if [[ -n $idle_out ]]; then
	echo
	echo "Idle keep-alive clients: $IDLE connections that each made one request, held open while wrk $WRK_ARGS runs beside them (fresh processes;"
	echo "each pair's clients held at once, wrk taking turns between the two, medians of ${IDLE_WRK_ROUNDS:-3} runs; TLS rows: HTTP/1.1 over TLS, another nginx and the second gateway; h2 rows: HTTP/2 over TLS by ALPN, a third nginx and a third gateway):"
	echo
	echo "$idle_out"
else
	echo
	echo "(idle clients skipped: ulimit -n $(ulimit -n) is too low for IDLE_CLIENTS=$IDLE)"
fi
