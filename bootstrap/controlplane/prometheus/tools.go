//go:build tools

// Prometheus, the monitoring stack's server, built as `go build
// github.com/prometheus/prometheus/cmd/prometheus` (Debian's package leaves out the
// Kubernetes service discovery the operator's configuration needs); this import only
// keeps it required in go.mod.
package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
