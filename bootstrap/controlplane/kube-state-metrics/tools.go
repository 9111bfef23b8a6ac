//go:build tools

// kube-state-metrics, the monitoring stack's exporter of object states, is its own main
// package, built as `go build k8s.io/kube-state-metrics/v2`; this import only keeps it
// required in go.mod.
package tools

import _ "k8s.io/kube-state-metrics/v2"
