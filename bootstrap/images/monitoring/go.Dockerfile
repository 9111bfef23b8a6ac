# One Go program of the local cluster's monitoring stack, built by `gitops-bootstrap
# prepare --provider local` from its Go module (bootstrap/controlplane/): Prometheus, the
# Prometheus Operator (`operator`), its config reloader (`prometheus-config-reloader`)
# or kube-state-metrics. The context holds the binary, statically linked.
#
# It is installed at /bin/PROGRAM, the path the upstream image has and the operator
# names when it adds the config reloader to Prometheus' pod.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
ARG PROGRAM
COPY ${PROGRAM} /usr/bin/${PROGRAM}
RUN ln -s "/usr/bin/${PROGRAM}" /usr/local/bin/entrypoint
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/entrypoint"]
