package sidecar

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// TestHelpGolden pins `attache sidecar -h`: the flags, their order, their
// usage text and the defaults shown (users' scripts and habits).
func TestHelpGolden(t *testing.T) {
	defaults := DefaultConfig(noEnv)
	defaults.Node = "node1" // the host's name otherwise
	var out bytes.Buffer
	if _, err := ParseArgs([]string{"-h"}, defaults, &out); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	golden := filepath.Join("testdata", "help.golden")
	if *update {
		if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), want) {
		t.Errorf("-h output differs from %s (go test -run TestHelpGolden -update rewrites it, if the change is meant):\n%s", golden, out.String())
	}
}
