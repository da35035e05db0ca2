package routes

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"
)

// FuzzParse: any input either parses to a document whose canonical form
// parses back to the same bytes, or is refused with a *Error; never a panic.
func FuzzParse(f *testing.F) {
	for _, s := range []string{seedDoc, fullDoc, precedenceDoc, "", "{}", `{"route": {"a": {"prefix": "/a/", "service": "a"}}}`,
		"route \"a\" {\n  prefix = \"/a/\"\n  split {\n    service = \"a\"\n    weight = 50\n  }\n}\n",
		"gateway {\n  rate_limit {\n    rps = 1e300\n  }\n}\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		d, err := Parse("fuzz.hcl", src)
		if err != nil {
			var perr *Error
			if !errors.As(err, &perr) || len(perr.Problems) == 0 {
				t.Fatalf("error %T without problems: %v", err, err)
			}
			return
		}
		enc := Encode(d)
		back, err := Parse("canonical.hcl", enc)
		if err != nil {
			t.Fatalf("canonical form refused: %v\n%s", err, enc)
		}
		if string(Encode(back)) != string(enc) {
			t.Fatalf("canonical form not stable:\n%s\n---\n%s", enc, Encode(back))
		}
		if Diff(d, back) != "" {
			t.Fatalf("diff of a document and its canonical form: %s", Diff(d, back))
		}
		tab, err := Compile(d)
		if err != nil {
			t.Fatalf("a parsed document does not compile: %v", err)
		}
		tab.Match("a.example.com", "/users/1", "GET", nil)
	})
}

// FuzzMatch: differential — Table.Match against the brute-force reference
// over random tables and requests drawn from the fuzzer's seed.
func FuzzMatch(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16})
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, seed []byte) {
		var s [16]byte
		copy(s[:], seed)
		rng := rand.New(rand.NewPCG(binary.LittleEndian.Uint64(s[:8]), binary.LittleEndian.Uint64(s[8:])))
		checkAgainstReference(t, rng, 1+rng.IntN(60), 100)
	})
}

// FuzzServiceRoutes: service meta is outside input too.
func FuzzServiceRoutes(f *testing.F) {
	for _, s := range []string{"/users/", "api.example.com/users/, /u/", "", "no-slash", "*.x.com/a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		rs, err := ServiceRoutes("svc", map[string]string{MetaKey: v})
		if err != nil {
			return
		}
		d := &Document{Routes: rs}
		if _, err := Compile(d); err != nil {
			// Two items of one service may repeat a match: Merge drops the
			// second; a single one must compile.
			merged, _ := Merge(&Document{}, map[string]map[string]string{"svc": {MetaKey: v}})
			if _, err := Compile(merged); err != nil {
				t.Fatalf("merged service routes do not compile: %v", err)
			}
		}
	})
}
