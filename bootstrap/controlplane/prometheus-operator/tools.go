//go:build tools

// The monitoring stack's operator and the config reloader it runs beside Prometheus and
// Alertmanager are prometheus-operator's own main packages, built as `go build
// github.com/prometheus-operator/prometheus-operator/cmd/operator` (and
// …/cmd/prometheus-config-reloader); these imports only keep them required in go.mod.
package tools

import (
	_ "github.com/prometheus-operator/prometheus-operator/cmd/operator"
	_ "github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader"
)
