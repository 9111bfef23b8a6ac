// Command etcd is etcd's own server main, built from go.etcd.io/etcd/server/v3.
//
// It lives in a module of its own because k8s.io/kubernetes requires a newer etcd
// server module than the 3.6 line we run; Go's minimal version selection would
// otherwise lift it in a shared module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
