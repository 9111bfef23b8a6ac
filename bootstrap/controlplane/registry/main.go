// Command registry is distribution's OCI registry, with only the filesystem storage
// driver: the local node pulls its images from it on 127.0.0.1.
package main

import (
	"github.com/distribution/distribution/v3/registry"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() {
	// Execute prints its own errors and exits non-zero on them.
	_ = registry.RootCmd.Execute()
}
