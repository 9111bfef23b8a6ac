//go:build tools

// The local node's dynamic volume provisioner is local-path-provisioner's own main
// package, built as `go build github.com/rancher/local-path-provisioner`; this import
// only keeps it required in go.mod.
package tools

import _ "github.com/rancher/local-path-provisioner"
