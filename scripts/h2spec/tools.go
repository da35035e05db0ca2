//go:build tools

// Package tools pins h2spec (v2.2.1), the HTTP/2 conformance checker that
// the h2 package's TestH2Spec runs against attache's HTTP/2 server.
// scripts/build builds it into .bin/h2spec with
// "go build github.com/summerwind/h2spec/cmd/h2spec" from this module, so
// attache's main module never depends on it.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
