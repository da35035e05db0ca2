# attache sidecar on every Nomad client node, as a system job over the
# attache image (the Docker variant of attache.nomad.hcl; same ports, same
# flags). The image is the local one scripts/images builds (attache:dev, FROM
# scratch): load it on every node (docker save | docker load) or push it to
# your registry and set -var image=REGISTRY/attache:TAG.
#
#   nomad job run nomad/attache-docker.nomad.hcl
#
# Host networking, so the sidecar listens on the node's address and reaches
# the node's Consul agent at 127.0.0.1:8500 like the raw_exec variant. The
# docker driver must be enabled on the clients (it is by default when Docker
# runs there).
#
# Run for real by nomad/nomad_test.go where the dev agent has the docker
# driver and the image exists; `nomad job validate` (v1.6.1) always.

variable "image" {
  type    = string
  default = "attache:dev"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "gateway_node_class" {
  type    = string
  default = "gateway"
}

variable "consul_addr" {
  type    = string
  default = "127.0.0.1:8500"
}

variable "dns_port" {
  type    = number
  default = 8653
}

variable "admin_port" {
  type    = number
  default = 19001
}

variable "extra_args" {
  type    = list(string)
  default = []
}

job "attache" {
  type        = "system"
  datacenters = var.datacenters
  priority    = 90

  update {
    max_parallel     = 1
    stagger          = "30s"
    min_healthy_time = "10s"
    healthy_deadline = "2m"
  }

  group "sidecar" {
    constraint {
      attribute = "${attr.consul.version}"
      operator  = "is_set"
    }
    constraint {
      attribute = "${node.class}"
      operator  = "!="
      value     = var.gateway_node_class
    }

    network {
      mode = "host"
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

    ephemeral_disk {
      sticky  = true
      migrate = false
      size    = 100
    }

    task "attache" {
      driver = "docker"

      config {
        image = var.image
        # A local image: never pull it (a scratch image built on the node).
        force_pull   = false
        network_mode = "host"
        # The image's entrypoint is /bin/attache.
        args = concat(
          [
            "sidecar",
            "-node", "${attr.unique.consul.name}",
            "-consul", var.consul_addr,
            "-dns", "${NOMAD_ADDR_dns}",
            # Loopback (host network): the local agent checks /healthz there. On
            # the node's address (${NOMAD_ADDR_admin}) the admin API would need
            # ATTACHE_ADMIN_TOKEN (see attache.nomad.hcl).
            "-admin", "127.0.0.1:${NOMAD_PORT_admin}",
            # NOMAD_ALLOC_DIR is /alloc inside the container.
            "-data-dir", "${NOMAD_ALLOC_DIR}/data/attache",
            "-log-json",
          ],
          var.extra_args,
        )
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      resources {
        cpu    = 200
        memory = 128
      }

      # Within the 100 MB ephemeral disk (Nomad's default, 10 x 10 MB, is not).
      logs {
        max_files     = 5
        max_file_size = 10
      }
    }
  }
}
