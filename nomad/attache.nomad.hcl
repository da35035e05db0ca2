# attache sidecar on every Nomad client node, as a system job (raw_exec or
# exec). The Docker variant over the attache image is attache-docker.nomad.hcl.
#
#   nomad job run nomad/attache.nomad.hcl                        # binary at /usr/local/bin/attache
#   nomad job run -var 'attache_artifact=https://HOST/attache_linux_amd64.tar.gz' \
#                 -var 'attache_artifact_checksum=sha256:...' nomad/attache.nomad.hcl
#
# Assumptions (see deploy/README.md):
#   - every client node runs a Consul client agent, reachable from the host at
#     var.consul_addr (127.0.0.1:8500 by default: the agent's default client
#     address); the job only lands on nodes where Nomad fingerprinted Consul;
#   - the attache binary is installed on each node at var.attache_binary, or
#     fetched by Nomad from var.attache_artifact (a .tar.gz holding "attache");
#   - the raw_exec driver is enabled on the clients (plugin "raw_exec" {
#     config { enabled = true } }), or set driver = "exec" (Linux, root).
# The sidecar registers itself (service "attache", checked via /healthz) and
# the local services of its -service files with the node's agent, so this job
# has no Nomad service block. Nodes of class var.gateway_node_class are left
# to gateway.nomad.hcl (one sidecar per node, in gateway mode there).
#
# Run for real by nomad/nomad_test.go (Nomad v1.6.1 -dev, raw_exec, the
# binary as an artifact over HTTP).

variable "attache_binary" {
  type        = string
  default     = "/usr/local/bin/attache"
  description = "Absolute path of the attache binary on every client node (when attache_artifact is empty)."
}

variable "attache_artifact" {
  type        = string
  default     = ""
  description = "URL of a .tar.gz holding the attache binary; when set, Nomad fetches it into the task's local/ and runs local/attache."
}

variable "attache_artifact_checksum" {
  type        = string
  default     = ""
  description = "The artifact's checksum, e.g. sha256:HEX (recommended: Nomad refuses a download that does not match)."
}

variable "driver" {
  type        = string
  default     = "raw_exec"
  description = "Task driver: raw_exec (no isolation) or exec (chroot + cgroups)."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "gateway_node_class" {
  type        = string
  default     = "gateway"
  description = "Nodes of this class run gateway.nomad.hcl's sidecar instead."
}

variable "consul_addr" {
  type        = string
  default     = "127.0.0.1:8500"
  description = "The node-local Consul agent's HTTP address."
}

variable "dns_port" {
  type    = number
  default = 8653
}

variable "admin_port" {
  type    = number
  default = 19001
}

variable "service_files" {
  type        = list(string)
  default     = []
  description = "Absolute paths of -service files on the nodes (local services to register)."
}

variable "extra_args" {
  type        = list(string)
  default     = []
  description = "More sidecar flags, e.g. [\"-http-proxy\", \"127.0.0.1:15001\", \"-upstream\", \"users=127.0.0.1:9191\"]."
}

job "attache" {
  type        = "system"
  datacenters = var.datacenters
  # Infrastructure: place it before ordinary jobs and let it preempt them.
  priority = 90

  # One node at a time, so a bad release never takes down every sidecar.
  update {
    max_parallel     = 1
    stagger          = "30s"
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "sidecar" {
    # Only where Nomad found a Consul agent (the Consul fingerprint sets these).
    constraint {
      attribute = "${attr.consul.version}"
      operator  = "is_set"
    }
    constraint {
      attribute = "${node.class}"
      operator  = "!="
      value     = var.gateway_node_class
    }

    # Host networking: the sidecar serves the node's own apps on the node's
    # address. Static ports reserve them so no other allocation takes them.
    network {
      mode = "host"
      port "dns" {
        static = var.dns_port
      }
      port "admin" {
        static = var.admin_port
      }
    }

    # A sidecar should come back, not give up: keep restarting with a delay
    # (system jobs are never rescheduled elsewhere; they belong to the node).
    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    # Keep the last-known-good catalog snapshot across job updates on the
    # same node (best effort), so a new sidecar can answer before Consul does.
    ephemeral_disk {
      sticky  = true
      migrate = false
      size    = 100
    }

    task "attache" {
      driver = var.driver

      # Fetched into local/ when attache_artifact is set (none otherwise).
      dynamic "artifact" {
        for_each = var.attache_artifact == "" ? [] : [var.attache_artifact]
        content {
          source      = artifact.value
          destination = "local/"
          dynamic "options" {
            for_each = var.attache_artifact_checksum == "" ? [] : [var.attache_artifact_checksum]
            content {
              checksum = options.value
            }
          }
        }
      }

      config {
        command = var.attache_artifact == "" ? var.attache_binary : "local/attache"
        args = concat(
          [
            "sidecar",
            # Runtime values, interpolated by Nomad on the node:
            # the Consul agent's node name as Nomad fingerprinted it, the
            # reserved ports on the node's address, the allocation directory.
            "-node", "${attr.unique.consul.name}",
            "-consul", var.consul_addr,
            "-dns", "${NOMAD_ADDR_dns}",
            # Loopback: the local agent checks /healthz there. On the node's
            # address (${NOMAD_ADDR_admin}) the admin API needs a token:
            # render ATTACHE_ADMIN_TOKEN as CONSUL_HTTP_TOKEN below.
            "-admin", "127.0.0.1:${NOMAD_PORT_admin}",
            "-data-dir", "${NOMAD_ALLOC_DIR}/data/attache",
            "-log-json",
          ],
          flatten([for f in var.service_files : ["-service", f]]),
          var.extra_args,
        )
      }

      # attache stops on SIGTERM or SIGINT, deregistering its services; give
      # it time to do so before Nomad sends SIGKILL.
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      # CONSUL_HTTP_TOKEN / CONSUL_HTTP_ADDR are read by attache too; with ACLs
      # on, render the token from a Nomad variable, e.g.:
      # template {
      #   data        = "CONSUL_HTTP_TOKEN={{ with nomadVar \"nomad/jobs/attache\" }}{{ .consul_token }}{{ end }}"
      #   destination = "secrets/consul.env"
      #   env         = true
      # }

      resources {
        cpu    = 200 # MHz
        memory = 128 # MB
      }

      logs {
        max_files     = 5
        max_file_size = 10
      }
    }
  }
}
