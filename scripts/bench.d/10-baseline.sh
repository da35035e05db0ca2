# Baseline: a trivial Go backend called directly, through nginx configured like
# the seed's gateway block (upstream keepalive 64, proxy_http_version 1.1,
# Connection ""), and through haproxy. Later parts add attache beside them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BACKENDS="127.0.1.1:8081,127.0.1.2:8081"
mkdir -p "$BENCH/nginx" "$BENCH/haproxy"

cat >"$BENCH/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $BENCH/nginx/nginx.pid;
error_log $BENCH/nginx/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $BENCH/nginx;
  proxy_temp_path $BENCH/nginx;
  upstream user_service {
    server 127.0.1.1:8081;
    server 127.0.1.2:8081;
    keepalive 64;
  }
  server {
    listen 127.0.1.10:8080;
    location /users/ {
      proxy_pass http://user_service;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header Connection "";
      proxy_http_version 1.1;
    }
  }
}
CONF
cat >"$BENCH/haproxy/haproxy.cfg" <<CONF
global
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.1.11:8080
  default_backend users
backend users
  balance roundrobin
  server u1 127.0.1.1:8081
  server u2 127.0.1.2:8081
CONF

bg "$BENCH/backend" -listen "$BACKENDS"
bg nginx -c "$BENCH/nginx/nginx.conf"
bg haproxy -f "$BENCH/haproxy/haproxy.cfg"
wait_for "backend" 10 curl -fsS http://127.0.1.1:8081/users/
wait_for "nginx" 10 curl -fsS http://127.0.1.10:8080/users/
wait_for "haproxy" 10 curl -fsS http://127.0.1.11:8080/users/

rows=$(
	wrk_row direct http://127.0.1.1:8081/users/ "$(pids_of "$BENCH/backend")"
	wrk_row nginx http://127.0.1.10:8080/users/ "$(pids_of "nginx -c $BENCH/nginx")"
	wrk_row haproxy http://127.0.1.11:8080/users/ "$(pids_of "haproxy -f $BENCH/haproxy")"
)
echo "## HTTP baseline: direct vs nginx (seed's gateway block) vs haproxy"
echo
echo "wrk $WRK_ARGS, one run; ratio = requests/s relative to nginx; CPU = the proxy's (or backend's) CPU seconds per 10k requests."
echo
echo "| target | requests/s | ratio vs nginx | p99 ms | CPU s / 10k req |"
echo "|---|---:|---:|---:|---:|"
echo "$rows" | awk '$1=="nginx"{n=$2} {r[NR]=$0} END {for (i=1;i<=NR;i++) {split(r[i],f," "); printf "| %s | %d | %.2f× | %.2f | %.3f |\n", f[1], f[2], f[2]/n, f[3], f[4]}}'
