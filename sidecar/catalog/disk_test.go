package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/serf/coordinate"
)

func sampleSnapshot() *Snapshot {
	c := coordinate.NewCoordinate(coordinate.DefaultConfig())
	return &Snapshot{
		Version: 4, Index: 42, Datacenter: "dc1", Updated: time.Now().UTC().Truncate(time.Second),
		Services: map[string]*Service{"web": {Name: "Web", Index: 42, Instances: []Instance{{ID: "w1", Service: "Web", Node: "n1", Address: "10.0.0.1", Port: 80, Weight: 1, Status: "passing"}}}},
		Nodes:    map[string]*Node{"n1": {Name: "n1", Address: "10.0.0.1", Datacenter: "dc1"}},
		Coords:   map[string]*coordinate.Coordinate{"n1": c},
		Known:    map[string]bool{"web": true},
	}
}

func TestSaveAndReadSnapshot(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := readSnapshot(dir); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("no file: %v", err)
	}
	s := sampleSnapshot()
	contact := time.Now().Add(-time.Minute).UTC().Truncate(time.Millisecond)
	if err := saveSnapshot(dir, s, contact); err != nil {
		t.Fatal(err)
	}
	got, gotContact, err := readSnapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Stale || !gotContact.Equal(contact) || got.Index != 42 || !same(ids(got, "web"), "w1") || got.Nodes["n1"] == nil || got.Coords["n1"] == nil || !got.Known["web"] {
		t.Fatalf("round trip: %+v contact %v", got, gotContact)
	}
	// No temporary files are left behind.
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("files left: %v", entries)
	}
}

func TestDecodeSnapshotRejectsBadFiles(t *testing.T) {
	for _, tc := range []struct{ name, in string }{
		{"empty", ""},
		{"not json", "garbage"},
		{"wrong format", `{"format": 99, "snapshot": {}}`},
		{"no snapshot", `{"format": 1}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := decodeSnapshot([]byte(tc.in)); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	s, _, err := decodeSnapshot([]byte(`{"format":1,"snapshot":{"services":{"WEB":{"name":"web"},"x":null},"coords":{"n":{"Vec":[]}},"known":{"":true}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if svc, ok := s.Service("web"); !ok || svc.Instances == nil || len(s.Services) != 1 || len(s.Coords) != 0 || len(s.Known) != 0 || s.Nodes == nil {
		t.Fatalf("sanitize: %+v", s)
	}
}

func FuzzDecodeSnapshot(f *testing.F) {
	b, _ := json.Marshal(diskFile{Format: snapshotFormat, Snapshot: sampleSnapshot()})
	f.Add(b)
	f.Add([]byte(`{"format":1,"snapshot":{"services":{"web":{"name":"web","instances":[{"id":"a"}]}}}}`))
	f.Add([]byte(`{"format":1,"snapshot":{"coords":{"n":{"Vec":[1,2],"Error":1}}}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, _, err := decodeSnapshot(data)
		if err != nil {
			return
		}
		if s.Services == nil || s.Nodes == nil || s.Coords == nil || s.Known == nil || !s.Stale {
			t.Fatalf("decoded snapshot not usable: %+v", s)
		}
		for _, svc := range s.Services {
			if svc == nil || svc.Instances == nil {
				t.Fatal("nil service or instances")
			}
		}
		for n := range s.Coords {
			s.RTT(n, n)
		}
	})
}

// TestLastKnownGood: a watcher saves what Consul said; a new one started
// while Consul is unreachable serves it marked stale, with its age; when
// Consul answers again the view catches up and is no longer stale.
func TestLastKnownGood(t *testing.T) {
	dir := t.TempDir()
	f := newFake(t)
	f.register("web", "web1", "node1", "", 80, api.HealthPassing)
	cfg := testConfig(f.addr())
	cfg.Mode = ModeOnDemand
	cfg.DataDir = dir
	cfg.SaveInterval = 20 * time.Millisecond
	{
		w, err := NewWatcher(cfg)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
		if s := w.Want(wctx, "web"); !same(ids(s, "web"), "web1") {
			t.Fatalf("want: %v", ids(s, "web"))
		}
		wcancel()
		cancel()
		<-done
	}
	// Consul is now "down": an address where nothing listens.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := l.Addr().String()
	l.Close()
	cfg2 := cfg
	cfg2.Addresses = []string{down, f.addr()}
	f.setFault(func(w http.ResponseWriter, r *http.Request) bool { return failAll(w) })
	w := runWatcher(t, cfg2)
	s := w.Load()
	if !s.Stale || !same(ids(s, "web"), "web1") || !w.Ready() {
		t.Fatalf("not served from disk: stale=%v %v", s.Stale, ids(s, "web"))
	}
	time.Sleep(50 * time.Millisecond)
	if st := w.Status(); !st.Stale || st.Connected || st.DataAge <= 0 {
		t.Fatalf("status while down: %+v", st)
	}
	// Consul comes back with a change made meanwhile.
	f.register("web", "web2", "node1", "", 80, api.HealthPassing)
	f.setFault(nil)
	s = waitFor(t, w, 10*time.Second, "catch up", func(s *Snapshot) bool { return !s.Stale && same(ids(s, "web"), "web1", "web2") })
	if st := w.Status(); st.Stale || !st.Connected || st.DataAge != 0 {
		t.Fatalf("status after catching up: %+v", st)
	}
	// And the new state reaches the disk.
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, _, err := readSnapshot(dir)
		if err == nil && same(ids(d, "web"), "web1", "web2") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("disk not updated: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCorruptSavedSnapshotIsIgnored(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, SnapshotFile), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig("127.0.0.1:1")
	cfg.DataDir = dir
	w, err := NewWatcher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s := w.Load(); s.Stale || len(s.Services) != 0 || w.Ready() {
		t.Fatalf("corrupt file served: %+v", s)
	}
}

func TestNearestFirst(t *testing.T) {
	cfg := coordinate.DefaultConfig()
	at := func(x float64) *coordinate.Coordinate {
		c := coordinate.NewCoordinate(cfg)
		c.Vec[0] = x
		return c
	}
	s := &Snapshot{Coords: map[string]*coordinate.Coordinate{"me": at(0), "near": at(0.001), "far": at(0.1)}}
	in := []Instance{{ID: "1", Node: "far"}, {ID: "2", Node: "unknown"}, {ID: "3", Node: "near"}, {ID: "4", Node: "me"}}
	var got string
	for _, i := range s.NearestFirst("ME", in) {
		got += i.ID
	}
	if got != "4312" {
		t.Fatalf("order %s", got)
	}
	if d, ok := s.RTT("me", "far"); !ok || d < 50*time.Millisecond {
		t.Fatalf("rtt %v %v", d, ok)
	}
	got = ""
	for _, i := range s.NearestFirst("stranger", in) {
		got += i.ID
	}
	if got != "1234" || in[0].ID != "1" {
		t.Fatalf("unknown origin reordered: %s", got)
	}
}

// failAll answers like an unreachable leader would (500).
func failAll(w http.ResponseWriter) bool {
	http.Error(w, "No cluster leader", http.StatusInternalServerError)
	return true
}
