# Every Consul agent of the compose cluster (servers and client agents).
# Node name and bind address come from the command line (-node, -bind).
datacenter           = "dc1"
data_dir             = "/consul/data"
disable_update_check = true
log_level            = "info"

# HTTP/DNS on every address of the container: 127.0.0.1 for the attache
# sidecar that shares the agent's network namespace, the private compose
# address for the others. Nothing of Consul is published on the host.
client_addr = "0.0.0.0"

# The servers by their compose service names (Docker's embedded DNS).
retry_join     = ["consul-server1", "consul-server2", "consul-server3"]
retry_interval = "1s"

ports {
  grpc     = -1
  grpc_tls = -1
}

performance {
  raft_multiplier = 1
}
