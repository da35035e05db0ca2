# /etc/attache/attache.hcl — example configuration of the attache sidecar
# (attache sidecar -config FILE). Attribute names are the flag names with
# underscores; repeatable flags are lists. A flag on the command line wins over
# this file; this file wins over CONSUL_HTTP_ADDR / CONSUL_HTTP_TOKEN.
# `attache sidecar -h` lists every option.

# This node's name in Consul (default: the host name, as Consul's own default).
node = "node1"

# The node-local Consul agent; more addresses are tried in order on failure.
consul = ["127.0.0.1:8500"]

# Last-known-good catalog snapshot: systemd's StateDirectory=attache.
data_dir = "/var/lib/attache"

# DNS for *.service.consul, from memory. Use this node's address (not
# 127.0.0.1) only when other hosts or containers must query it: whoever
# reaches it reads the catalog (the sidecar logs a warning).
dns        = "127.0.0.1:8653"
dns_domain = "consul."
# Names outside the domain go to these (default: /etc/resolv.conf).
# recursor = ["10.0.0.2:53"]

# Admin endpoints (/healthz, /readyz, /metrics, /v1/...). The sidecar registers
# itself in Consul as service "attache" at this address, checked by the local
# agent through /healthz. Loopback by default: on the node's address (for a
# Prometheus elsewhere) every endpoint but /healthz and /readyz needs a token,
# and the sidecar refuses to start without one (README, "Who may reach which
# listener"); keep it out of this file: ATTACHE_ADMIN_TOKEN in the unit's
# EnvironmentFile.
admin = "127.0.0.1:19001"
# admin = "10.0.0.21:19001"   # with ATTACHE_ADMIN_TOKEN set

# Outbound calls of this node's apps: an HTTP proxy and per-service listeners.
# Keep them on loopback: anyone who reaches them can call into the mesh.
# http_proxy = "127.0.0.1:15001"
# upstream   = ["users=127.0.0.1:9191", "inventory=127.0.0.1:9192"]

# Gateway mode (the API gateway node only).
# gateway     = "10.0.0.30:8080"
# gateway_tls = "10.0.0.30:8443"

# Local services to register with the agent (see the README's service files).
service = ["/etc/attache/services.hcl"]

# Which services to keep in memory: on-demand (first asked), all, or list.
watch         = "on-demand"
watch_service = ["users", "inventory"]

# Answers and caching.
dns_ttl          = "0s"
dns_negative_ttl = "0s"
dns_nearest      = false
# dns_service_ttl = { "users" = "5s", "db-*" = "1s" }

log_level = "info"
log_json  = true
