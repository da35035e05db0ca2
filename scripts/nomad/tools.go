//go:build tools

// Package tools pins the HashiCorp Nomad release (v1.6.1, the last under
// MPL-2.0) that attache's Nomad test and job checks run. scripts/build-nomad
// builds it into .bin/nomad with "go build github.com/hashicorp/nomad" from
// this module, so attache's main module never depends on Nomad.
package tools

import _ "github.com/hashicorp/nomad"
