# The three Consul servers (in addition to agent.hcl).
server           = true
bootstrap_expect = 3

ui_config {
  enabled = true
}
