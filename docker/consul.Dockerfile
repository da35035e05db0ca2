# attache-consul:1.14.8 — the pinned Consul (v1.14.8, MPL-2.0) that
# scripts/build compiles statically into .bin/consul, on a scratch base.
#
# Built by scripts/images from a staged context:
#   consul       the static binary
#   rootfs.tar   /tmp (1777), /consul/data (owned by 65532) and
#                /consul/config/00-image.hcl (data_dir, disable_update_check)
#
# Every agent started from this image reads /consul/config, so every agent has
# disable_update_check = true even when no other configuration is mounted.
FROM scratch
ADD rootfs.tar /
COPY consul /bin/consul
USER 65532:65532
# Consul's ports: 8300 server RPC, 8301/8302 serf LAN/WAN, 8500 HTTP, 8600 DNS.
EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp
ENTRYPOINT ["/bin/consul"]
CMD ["agent", "-config-dir=/consul/config"]
