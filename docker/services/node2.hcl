# Local services of node2, registered with node2's Consul agent by the attache
# sidecar (-service). No address: Consul uses the node's address, the agent
# container's private compose address. The checks run in the agent, which
# shares its network namespace with the demo containers, so 127.0.0.1 works.
service {
  name = "users"
  id   = "users-2"
  port = 8081
  tags = ["demo"]
  meta = { instance = "users-2" }
  check {
    http     = "http://127.0.0.1:8081/health"
    interval = "1s"
    timeout  = "1s"
  }
}

service {
  name = "inventory"
  id   = "inventory-2"
  port = 8082
  tags = ["demo"]
  meta = { instance = "inventory-2" }
  check {
    http     = "http://127.0.0.1:8082/health"
    interval = "1s"
    timeout  = "1s"
  }
}
