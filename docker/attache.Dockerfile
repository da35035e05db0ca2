# attache:dev — the attache sidecar/control binary and the attache-demo backend,
# on an empty (scratch) base: no shell, no package manager, nothing to pull.
#
# Built by scripts/images from a staged context (never from the repository
# root directly):
#   attache, attache-demo   static binaries from scripts/build (CGO_ENABLED=0)
#   rootfs.tar              /tmp (1777) and /var/lib/attache (owned by 65532),
#                           made with tar so ownership and modes are exact
FROM scratch
ADD rootfs.tar /
COPY attache attache-demo /bin/
# 65532 is the conventional "nonroot" id of distroless images; nothing here
# needs root (every port the sidecar uses is above 1024).
USER 65532:65532
WORKDIR /var/lib/attache
ENTRYPOINT ["/bin/attache"]
CMD ["-h"]
