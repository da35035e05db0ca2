# /etc/consul.d/consul.hcl — example Consul client agent for a node that runs
# attache (deploy/systemd/consul-agent.service). Edit the addresses.
datacenter = "dc1"
data_dir   = "/var/lib/consul"
node_name  = "node1"

# The node's own address for gossip and RPC; the HTTP API and DNS only on
# loopback, where attache (consul = ["127.0.0.1:8500"]) and the apps reach it.
bind_addr   = "10.0.0.21"
client_addr = "127.0.0.1"

# Also what makes Consul send READY=1 to systemd (Type=notify): it does so
# once this join succeeds.
retry_join = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]

disable_update_check = true
