package h2

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestH2Spec runs h2spec (pinned in scripts/h2spec, built into .bin/ by
// scripts/build) against the server, over h2c with prior knowledge and
// over TLS, and names every case it fails.
func TestH2Spec(t *testing.T) {
	bin := h2specBinary(t)
	for _, tc := range []struct {
		name string
		tls  bool
	}{
		{"h2c", false},
		{"tls", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := &Server{
				Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					// Reads the body first: a case that sends more on the
					// stream after its HEADERS (a bad content-length, a
					// window overflow) expects the stream still open; one
					// answered at once would be closed before they come.
					_, _ = io.Copy(io.Discard, r.Body)
					_, _ = io.WriteString(w, "ok")
				}),
				// A case that expects the connection closed waits for it
				// (h2spec's -o): keep ours well under that.
				FrameTimeout: 1500 * time.Millisecond,
			}
			ts := startServer(t, srv, tc.tls)
			_, port, _ := net.SplitHostPort(ts.addr)
			report := filepath.Join(t.TempDir(), "h2spec.xml")
			args := []string{"-h", "127.0.0.1", "-p", port, "-o", "5", "-j", report}
			if tc.tls {
				args = append(args, "-t", "-k")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, args...)
			out, err := cmd.CombinedOutput()
			if ctx.Err() != nil {
				t.Fatalf("h2spec did not finish within 2 minutes; its output:\n%s", out)
			}
			var ee *exec.ExitError
			if err != nil && !errors.As(err, &ee) {
				t.Fatalf("h2spec: %v\n%s", err, out)
			}
			failed, total, rerr := h2specFailures(report)
			if rerr != nil {
				t.Fatalf("h2spec's report: %v; its output:\n%s", rerr, out)
			}
			if total < 100 {
				t.Fatalf("h2spec ran %d cases, expected about 150; its output:\n%s", total, out)
			}
			for _, f := range failed {
				t.Errorf("h2spec %s", f)
			}
			if len(failed) == 0 && err != nil {
				t.Errorf("h2spec exited with %v and no failed case in its report; its output:\n%s", err, out)
			}
			t.Logf("h2spec: %d cases, %d failed", total, len(failed))
		})
	}
}

// h2specBinary is the repository's .bin/h2spec: the directory with go.mod,
// walking up from the package's.
func h2specBinary(t *testing.T) string {
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
		up := filepath.Dir(dir)
		if up == dir {
			t.Fatal("no go.mod above the package's directory")
		}
		dir = up
	}
	bin := filepath.Join(dir, ".bin", "h2spec")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("skipped: %s is missing (scripts/build builds it; scripts/test always does)", bin)
	}
	return bin
}

// h2spec's JUnit report: one testsuite per section, one testcase per case
// in order (the case's number is its place in the section, from 1).
type junitReport struct {
	Suites []struct {
		Package string `xml:"package,attr"`
		Cases   []struct {
			Desc  string `xml:"classname,attr"`
			Error *struct {
				Text string `xml:",innerxml"`
			} `xml:"error"`
			FailureText *struct {
				Text string `xml:",innerxml"`
			} `xml:"failure"`
		} `xml:"testcase"`
	} `xml:"testsuite"`
}

// h2specFailures lists the failed cases as "ID: description: message".
func h2specFailures(path string) (failed []string, total int, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, err
	}
	var rep junitReport
	if err := xml.Unmarshal(b, &rep); err != nil {
		return nil, 0, err
	}
	for _, s := range rep.Suites {
		for i, c := range s.Cases {
			total++
			msg := ""
			switch {
			case c.FailureText != nil:
				msg = c.FailureText.Text
			case c.Error != nil:
				msg = c.Error.Text
			default:
				continue
			}
			// The message: what h2spec expected, a line each, then what
			// it got.
			lines := strings.Split(strings.TrimSpace(xmlUnescape(msg)), "\n")
			got := lines[len(lines)-1]
			want := strings.Join(lines[:len(lines)-1], " or ")
			failed = append(failed, fmt.Sprintf("%s/%d: %s: expected %s; got %s", s.Package, i+1, c.Desc, want, got))
		}
	}
	return failed, total, nil
}

func xmlUnescape(s string) string {
	return strings.NewReplacer("&lt;", "<", "&gt;", ">", "&amp;", "&", "&#34;", `"`, "&#39;", "'", "&#xA;", "\n", "&#x9;", "\t").Replace(s)
}
