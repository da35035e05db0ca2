# /etc/attache/services.hcl — example -service file: the node's local
# services, registered with its Consul agent by the sidecar (and deregistered
# when it stops).
service {
  name = "users"
  id   = "users-1"
  port = 8081 # no address: Consul uses the node's address
  tags = ["v1"]
  meta = { version = "1" }
  check {
    http     = "http://127.0.0.1:8081/health"
    interval = "2s"
    timeout  = "1s"
  }
}
