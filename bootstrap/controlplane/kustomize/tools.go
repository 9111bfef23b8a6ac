//go:build tools

// kustomize is its own module's main package, built as `go build
// sigs.k8s.io/kustomize/kustomize/v5`; this import only keeps it required in go.mod.
package tools

import _ "sigs.k8s.io/kustomize/kustomize/v5"
