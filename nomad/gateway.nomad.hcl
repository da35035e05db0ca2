# attache in gateway mode on the gateway nodes (node class "gateway"), as a
# system job: the node's one sidecar, with the API gateway's listeners (the
# seed's nginx: HTTP :8080, HTTPS :8443). attache.nomad.hcl leaves these nodes
# out. Routes come from the control service (control.nomad.hcl).
#
#   nomad job run nomad/gateway.nomad.hcl
#   attache routes apply -f deploy/routes.hcl
#
# TLS: the route document's gateway { tls { cert = FILE key = FILE } } names
# the certificate files; a relative name is taken from the task's working
# directory. With -var tls_from_nomad_var=true the templates below render
# secrets/gateway.crt and secrets/gateway.key from the Nomad variable
# nomad/jobs/attache-gateway (keys cert and key, PEM), so the document names
# cert = "secrets/gateway.crt", key = "secrets/gateway.key". attache looks at
# the files every second and takes a renewed certificate without a restart.
#
# Checked with `nomad job validate` (v1.6.1) by nomad/nomad_test.go; not run
# there (a dev agent has one node: it runs attache.nomad.hcl's sidecar).

variable "attache_binary" {
  type    = string
  default = "/usr/local/bin/attache"
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

variable "node_class" {
  type    = string
  default = "gateway"
}

variable "consul_addr" {
  type    = string
  default = "127.0.0.1:8500"
}

variable "http_port" {
  type    = number
  default = 8080
}

variable "https_port" {
  type    = number
  default = 8443
}

variable "dns_port" {
  type    = number
  default = 8653
}

variable "admin_port" {
  type    = number
  default = 19001
}

variable "tls_from_nomad_var" {
  type    = bool
  default = false
}

job "attache-gateway" {
  type        = "system"
  datacenters = var.datacenters
  priority    = 90

  update {
    max_parallel     = 1
    stagger          = "30s"
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "gateway" {
    constraint {
      attribute = "${node.class}"
      value     = var.node_class
    }
    constraint {
      attribute = "${attr.consul.version}"
      operator  = "is_set"
    }

    network {
      mode = "host"
      port "http" {
        static = var.http_port
      }
      port "https" {
        static = var.https_port
      }
      port "dns" {
        static = var.dns_port
      }
      port "admin" {
        static = var.admin_port
      }
    }

    restart {
      attempts = 10
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    # The last-known-good catalog view and route table (routes.json) survive
    # job updates on the node, so a new gateway serves before Consul answers.
    ephemeral_disk {
      sticky  = true
      migrate = false
      size    = 100
    }

    task "attache" {
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
        for_each = var.tls_from_nomad_var ? ["cert", "key"] : []
        content {
          data        = "{{ with nomadVar \"nomad/jobs/attache-gateway\" }}{{ .${template.value} }}{{ end }}"
          destination = "secrets/gateway.${template.value == "cert" ? "crt" : "key"}"
          perms       = "0600"
          # attache reloads the files itself: no signal, no restart.
          change_mode = "noop"
        }
      }

      config {
        command = var.attache_artifact == "" ? var.attache_binary : "local/attache"
        # The gateway's listeners and the sidecar's on the node's address
        # (NOMAD_ADDR_<port>), its data in the allocation directory.
        args = [
          "sidecar",
          "-node", "${attr.unique.consul.name}",
          "-consul", var.consul_addr,
          "-gateway", "${NOMAD_ADDR_http}",
          "-gateway-tls", "${NOMAD_ADDR_https}",
          "-dns", "${NOMAD_ADDR_dns}",
          # Loopback (host network): the local agent checks /healthz there. On
          # the node's address (${NOMAD_ADDR_admin}) the admin API would need
          # ATTACHE_ADMIN_TOKEN (see attache.nomad.hcl).
          "-admin", "127.0.0.1:${NOMAD_PORT_admin}",
          "-data-dir", "${NOMAD_ALLOC_DIR}/data/attache",
          # Every service in the view, so that a service's own route (its
          # meta attache-route) joins the table.
          "-watch", "all",
          "-log-json",
        ]
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      resources {
        cpu    = 500
        memory = 256
      }

      logs {
        max_files     = 5
        max_file_size = 10
      }
    }
  }
}
