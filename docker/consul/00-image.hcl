# Baked into the attache-consul image as /consul/config/00-image.hcl; the
# compose file mounts more files beside it (10-agent.hcl, 20-server.hcl).
data_dir             = "/consul/data"
disable_update_check = true
