package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/serf/coordinate"

	"attache/sidecar/watch"
)

// SnapshotFile is the name of the last-known-good snapshot in the data dir.
const SnapshotFile = "catalog-snapshot.json"

// snapshotFormat is the version of the file layout.
const snapshotFormat = 1

// diskFile is what saveSnapshot writes.
type diskFile struct {
	Format   int       `json:"format"`
	Saved    time.Time `json:"saved"`
	Contact  time.Time `json:"contact"` // when Consul last answered before the save
	Snapshot *Snapshot `json:"snapshot"`
}

// saveSnapshot writes s to dir/SnapshotFile atomically: a temporary file in
// the same directory, fsync, rename, fsync of the directory. A reader sees
// the old file or the new one, never a mix. contact is when Consul last
// answered (it becomes the data's age after a restart).
func saveSnapshot(dir string, s *Snapshot, contact time.Time) error {
	b, err := json.Marshal(diskFile{Format: snapshotFormat, Saved: time.Now().UTC(), Contact: contact.UTC(), Snapshot: s})
	if err != nil {
		return fmt.Errorf("catalog: encoding snapshot: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("catalog: data dir: %w", err)
	}
	f, err := os.CreateTemp(dir, SnapshotFile+".tmp-*")
	if err != nil {
		return fmt.Errorf("catalog: saving snapshot: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op after the rename
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("catalog: saving snapshot: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("catalog: saving snapshot: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("catalog: saving snapshot: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, SnapshotFile)); err != nil {
		return fmt.Errorf("catalog: saving snapshot: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // make the rename durable; not all filesystems support it
		d.Close()
	}
	return nil
}

// readSnapshot reads dir/SnapshotFile. It returns fs.ErrNotExist (wrapped)
// when there is none. The snapshot comes back marked Stale, with every map
// non-nil and entries that make no sense dropped.
func readSnapshot(dir string) (*Snapshot, time.Time, error) {
	b, err := os.ReadFile(filepath.Join(dir, SnapshotFile))
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("catalog: reading saved snapshot: %w", err)
	}
	return decodeSnapshot(b)
}

// decodeSnapshot parses a saved snapshot file (see readSnapshot).
func decodeSnapshot(b []byte) (*Snapshot, time.Time, error) {
	var f diskFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, time.Time{}, fmt.Errorf("catalog: saved snapshot is not valid JSON: %w", err)
	}
	if f.Format != snapshotFormat {
		return nil, time.Time{}, fmt.Errorf("catalog: saved snapshot has format %d, want %d", f.Format, snapshotFormat)
	}
	if f.Snapshot == nil {
		return nil, time.Time{}, errors.New("catalog: saved snapshot is empty")
	}
	s := sanitize(f.Snapshot)
	contact := f.Contact
	if contact.IsZero() {
		contact = f.Saved
	}
	return s, contact, nil
}

// sanitize rebuilds a decoded snapshot with lower-cased keys, non-nil maps
// and only entries that are usable.
func sanitize(in *Snapshot) *Snapshot {
	s := &Snapshot{
		Version:    in.Version,
		Index:      in.Index,
		Datacenter: in.Datacenter,
		Updated:    in.Updated,
		Stale:      true,
		Services:   make(map[string]*Service, len(in.Services)),
		Nodes:      make(map[string]*Node, len(in.Nodes)),
		Coords:     make(map[string]*coordinate.Coordinate, len(in.Coords)),
		Known:      make(map[string]bool, len(in.Known)),
	}
	for k, svc := range in.Services {
		if svc == nil || k == "" {
			continue
		}
		if svc.Instances == nil {
			svc.Instances = []Instance{}
		}
		s.Services[strings.ToLower(k)] = svc
	}
	for k, n := range in.Nodes {
		if n != nil && k != "" {
			s.Nodes[strings.ToLower(k)] = n
		}
	}
	for k, c := range in.Coords {
		if c != nil && k != "" && validCoord(c) {
			s.Coords[strings.ToLower(k)] = c
		}
	}
	for k, v := range in.Known {
		if v && k != "" {
			s.Known[strings.ToLower(k)] = true
		}
	}
	return s
}

func validCoord(c *coordinate.Coordinate) bool {
	if len(c.Vec) == 0 || len(c.Vec) > 64 {
		return false
	}
	for _, f := range append([]float64{c.Error, c.Adjustment, c.Height}, c.Vec...) {
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return false
		}
	}
	return true
}

// loadDisk serves the saved snapshot, marked stale, until Consul confirms it.
func (w *Watcher) loadDisk() error {
	s, contact, err := readSnapshot(w.cfg.DataDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for name, svc := range s.Services {
		if w.cfg.Mode == ModeList && !w.pinned[name] {
			delete(s.Services, name)
			continue
		}
		w.mutServicesLocked()[name] = svc
		w.fetched[name] = svc.Index // a probe confirms it if unchanged
		if w.cfg.Mode != ModeList && !w.pinned[name] && w.watches[name] == nil {
			w.addWatchLocked(name, false, false)
		}
	}
	w.nodes, w.coords, w.known = s.Nodes, s.Coords, s.Known
	if w.dc == "" {
		w.dc = s.Datacenter
	}
	w.updated = s.Updated
	w.fromDisk = true
	if !contact.IsZero() {
		w.lastContact.Store(contact.UnixNano())
	}
	w.dirty = true
	w.publishLocked()
	w.log.Info("serving the saved snapshot until Consul answers", "services", len(s.Services), "saved_contact", contact)
	return nil
}

// saver writes the view to disk after changes, at most every SaveInterval,
// and once more when Run ends.
func (w *Watcher) saver(ctx context.Context) {
	ch, cancel := w.view.Subscribe()
	defer cancel()
	var saved uint64
	var last time.Time
	save := func() {
		s := w.view.Load()
		if s.Stale || s.Version == saved {
			return // nothing new, or nothing confirmed by Consul
		}
		contact := time.Unix(0, w.lastContact.Load())
		if err := saveSnapshot(w.cfg.DataDir, s, contact); err != nil {
			w.log.Warn("could not save the snapshot", "error", err)
			w.met.errors.WithLabelValues("disk").Inc()
			return
		}
		saved, last = s.Version, time.Now()
	}
	for {
		select {
		case <-ctx.Done():
			save()
			return
		case <-ch:
		}
		if wait := w.cfg.SaveInterval - time.Since(last); wait > 0 {
			if !watch.Sleep(ctx, wait) {
				save()
				return
			}
		}
		save()
	}
}
