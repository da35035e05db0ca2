# The gateway's routes, equivalent to the seed's nginx block:
#
#   location /users/     { proxy_pass http://user_service; ... }
#   location /inventory/ { proxy_pass http://inventory_service; }
#
# scripts/up applies this document (`attache routes apply -f deploy/routes.hcl`);
# applying it again changes nothing. The reference of every field is in the
# README ("Routes and the control service") and control/routes/README.md.
#
# TLS (nginx's `listen 443 ssl http2` with ssl_certificate) is the gateway
# block: scripts/up makes a local CA and this certificate for the gateway
# node (relative names are taken from the gateway's working directory, the
# repository for scripts/up), so `curl --cacert .run/tls/ca.crt
# https://127.0.0.30:8443/users/1` answers over HTTP/2. Elsewhere, name your
# own files, e.g. cert = "/etc/attache/tls/gateway.pem".

gateway {
  tls {
    cert = ".run/tls/gateway.crt"
    key  = ".run/tls/gateway.key"
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
