# The gateway's routes, equivalent to the seed's nginx block:
#
#   location /users/     { proxy_pass http://user_service; ... }
#   location /inventory/ { proxy_pass http://inventory_service; }
#
# scripts/up applies this document (`attache routes apply -f deploy/routes.hcl`);
# applying it again changes nothing. The reference of every field is in the
# README ("Routes and the control service") and control/routes/README.md.
#
# TLS (nginx's `listen 443 ssl http2` with ssl_certificate) is a gateway block:
#
#   gateway {
#     tls {
#       cert = "/etc/attache/tls/gateway.pem"
#       key  = "/etc/attache/tls/gateway-key.pem"
#     }
#   }

route "users" {
  prefix  = "/users/"
  service = "users"
}

route "inventory" {
  prefix  = "/inventory/"
  service = "inventory"
}
