# Alertmanager (0.25) from Debian bookworm's package, for the local cluster's monitoring
# stack (kube-prometheus-stack), where no image can be pulled. `gitops-bootstrap prepare
# --provider local` builds it with buildah.
#
# The operator starts the container with arguments only, so the program is the image's
# entrypoint, as in the upstream image; it also sets the user (the chart's
# securityContext), and mounts the data and configuration directories.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
# policy-rc.d: the package's postinst would start a service; there is none in an image.
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends prometheus-alertmanager \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && ln -s /usr/bin/prometheus-alertmanager /usr/local/bin/entrypoint
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/entrypoint"]
