# Local services of node1, registered with node1's Consul agent by the attache
# sidecar (-service). No address: Consul uses the node's address, the agent
# container's private compose address. The checks run in the agent, which
# shares its network namespace with the demo containers, so 127.0.0.1 works.
service {
  name = "users"
  id   = "users-1"
  port = 8081
  tags = ["demo"]
  meta = { instance = "users-1" }
  check {
    http     = "http://127.0.0.1:8081/health"
    interval = "1s"
    timeout  = "1s"
  }
}

service {
  name = "inventory"
  id   = "inventory-1"
  port = 8082
  tags = ["demo"]
  meta = { instance = "inventory-1" }
  check {
    http     = "http://127.0.0.1:8082/health"
    interval = "1s"
    timeout  = "1s"
  }
}
