//go:build tools

// helm is its own module's main package, built as `go build helm.sh/helm/v3/cmd/helm`;
// this import only keeps it required in go.mod.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
