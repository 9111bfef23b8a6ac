// Command coredns is CoreDNS with its standard plugins, the local cluster's DNS: it
// runs as a Deployment behind the kube-dns Service.
package main

import (
	_ "github.com/coredns/coredns/core/plugin"
	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
