# Prometheus or Alertmanager from Debian bookworm's packages, for the local cluster's
# monitoring stack (kube-prometheus-stack), where no image can be pulled.
# `gitops-bootstrap prepare --provider local` builds it offline with buildah:
#
#   PACKAGE=prometheus             PROGRAM=prometheus               (2.42)
#   PACKAGE=prometheus-alertmanager PROGRAM=prometheus-alertmanager (0.25)
#
# The operator starts these containers with arguments only, so the program is the
# image's entrypoint, as in the upstream images; it also sets the user (the chart's
# securityContext), and mounts the data and configuration directories.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
ARG PACKAGE
ARG PROGRAM
# policy-rc.d: the packages' postinst would start a service; there is none in an image.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends "${PACKAGE}" \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && ln -s "/usr/bin/${PROGRAM}" /usr/local/bin/entrypoint
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/entrypoint"]
