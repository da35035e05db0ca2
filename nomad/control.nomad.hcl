# attache control service (the routes API) as a Nomad service job. It keeps
# nothing on disk: the routes live in Consul's KV store, so any node with a
# Consul agent can run it, and more than one may (they share the KV).
#
#   nomad var put nomad/jobs/attache-control api_token="$(openssl rand -hex 24)"
#   nomad job run nomad/control.nomad.hcl
#   ATTACHE_CONTROL=http://ADDR:9500 ATTACHE_CONTROL_TOKEN=... attache routes apply -f deploy/routes.hcl
#
# Nomad registers it in Consul as service "attache-control" (HTTP check of
# /healthz), so `dig @SIDECAR attache-control.service.consul SRV` finds it.
# It listens on the node's address (NOMAD_ADDR_http), off loopback, where
# attache requires a bearer token: the template below renders
# ATTACHE_CONTROL_TOKEN from the Nomad variable nomad/jobs/attache-control
# (key api_token; the allocation waits until it exists). With a node address
# on loopback (a dev agent), -var token_from_nomad_var=false runs it without.
#
# Run for real by nomad/nomad_test.go (Nomad v1.6.1 -dev, raw_exec).

variable "attache_binary" {
  type        = string
  default     = "/usr/local/bin/attache"
  description = "Absolute path of the attache binary on the node (when attache_artifact is empty)."
}

variable "attache_artifact" {
  type        = string
  default     = ""
  description = "URL of a .tar.gz holding the attache binary; when set, it is fetched into local/."
}

variable "attache_artifact_checksum" {
  type    = string
  default = ""
}

variable "driver" {
  type    = string
  default = "raw_exec"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "consul_addr" {
  type        = string
  default     = "127.0.0.1:8500"
  description = "The node-local Consul agent's HTTP address."
}

variable "port" {
  type    = number
  default = 9500
}

variable "token_from_nomad_var" {
  type        = bool
  default     = true
  description = "Render ATTACHE_CONTROL_TOKEN from the Nomad variable nomad/jobs/attache-control (api_token)."
}

job "attache-control" {
  type        = "service"
  datacenters = var.datacenters

  group "control" {
    count = 1

    constraint {
      attribute = "${attr.consul.version}"
      operator  = "is_set"
    }

    network {
      mode = "host"
      port "http" {
        static = var.port
      }
    }

    service {
      name     = "attache-control"
      provider = "consul"
      port     = "http"
      check {
        type     = "http"
        path     = "/healthz"
        interval = "5s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 5
      interval = "2m"
      delay    = "5s"
      mode     = "delay"
    }

    task "control" {
      driver = var.driver

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

      dynamic "template" {
        for_each = var.token_from_nomad_var ? ["token"] : []
        content {
          data        = "ATTACHE_CONTROL_TOKEN={{ with nomadVar \"nomad/jobs/attache-control\" }}{{ .api_token }}{{ end }}"
          destination = "secrets/control.env"
          env         = true
        }
      }

      config {
        command = var.attache_artifact == "" ? var.attache_binary : "local/attache"
        # NOMAD_ADDR_http: the reserved port on the node's address.
        args = ["control", "-listen", "${NOMAD_ADDR_http}", "-consul", var.consul_addr]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "10s"

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
