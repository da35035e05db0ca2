package routes

import (
	"fmt"
	"strings"

	"github.com/hashicorp/hcl/v2/hclwrite"
)

// Diff describes how b differs from a, route by route, in lines a person can
// read:
//
//   - route "orders" (added)
//   - route "legacy" (removed)
//     ~ route "users"
//   - service = "users"
//   - service = "users-v2"
//     ~ gateway
//     ...
//     ~ order: users, inventory -> inventory, users
//
// Unchanged routes are not listed. Diff returns "" when the documents mean
// the same (a nil document is an empty one).
func Diff(a, b *Document) string {
	if a == nil {
		a = &Document{}
	}
	if b == nil {
		b = &Document{}
	}
	var out strings.Builder
	ga, gb := gatewayLines(a), gatewayLines(b)
	if ga != gb {
		out.WriteString("~ gateway\n")
		writeLineDiff(&out, splitLines(ga), splitLines(gb))
	}
	ra, rb := routeTexts(a), routeTexts(b)
	for _, r := range b.Routes {
		old, ok := ra[r.Name]
		switch {
		case !ok:
			fmt.Fprintf(&out, "+ route %q (added)\n", r.Name)
			for _, l := range splitLines(rb[r.Name]) {
				fmt.Fprintf(&out, "    + %s\n", l)
			}
		case old != rb[r.Name]:
			fmt.Fprintf(&out, "~ route %q\n", r.Name)
			writeLineDiff(&out, splitLines(old), splitLines(rb[r.Name]))
		}
	}
	for _, r := range a.Routes {
		if _, ok := rb[r.Name]; !ok {
			fmt.Fprintf(&out, "- route %q (removed)\n", r.Name)
		}
	}
	// Order matters for routes of equal precedence otherwise: say when the
	// routes both documents keep changed places.
	var oa, ob []string
	for _, r := range a.Routes {
		if _, ok := rb[r.Name]; ok {
			oa = append(oa, r.Name)
		}
	}
	for _, r := range b.Routes {
		if _, ok := ra[r.Name]; ok {
			ob = append(ob, r.Name)
		}
	}
	if strings.Join(oa, "\x00") != strings.Join(ob, "\x00") {
		fmt.Fprintf(&out, "~ order: %s -> %s\n", strings.Join(oa, ", "), strings.Join(ob, ", "))
	}
	return out.String()
}

func gatewayLines(d *Document) string {
	g := &Document{Gateway: d.Gateway}
	return strings.TrimSpace(string(Encode(g)))
}

// routeTexts returns each route's canonical block body by name.
func routeTexts(d *Document) map[string]string {
	m := make(map[string]string, len(d.Routes))
	for i := range d.Routes {
		f := hclwrite.NewEmptyFile()
		encodeRoute(f.Body(), &d.Routes[i])
		lines := splitLines(string(hclwrite.Format(f.Bytes())))
		if len(lines) >= 2 { // drop `route "x" {` and `}`
			lines = lines[1 : len(lines)-1]
		}
		for i, l := range lines {
			lines[i] = strings.TrimPrefix(l, "  ")
		}
		m[d.Routes[i].Name] = strings.Join(lines, "\n")
	}
	return m
}

func splitLines(s string) []string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return nil
	}
	lines := strings.Split(s, "\n")
	for i, l := range lines {
		// hclwrite aligns the = signs of a block; drop the alignment so a
		// longer neighbour does not show a line as changed.
		rest := strings.TrimLeft(l, " ")
		lines[i] = l[:len(l)-len(rest)] + strings.Join(strings.Fields(rest), " ")
	}
	return lines
}

// writeLineDiff writes a line diff (longest common subsequence) of two short
// texts, changed lines only, each indented.
func writeLineDiff(out *strings.Builder, a, b []string) {
	// lcs[i][j] is the LCS length of a[i:] and b[j:].
	lcs := make([][]int, len(a)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(b)+1)
	}
	for i := len(a) - 1; i >= 0; i-- {
		for j := len(b) - 1; j >= 0; j-- {
			if a[i] == b[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	i, j := 0, 0
	for i < len(a) || j < len(b) {
		switch {
		case i < len(a) && j < len(b) && a[i] == b[j]:
			i++
			j++
		case i < len(a) && (j == len(b) || lcs[i+1][j] >= lcs[i][j+1]):
			fmt.Fprintf(out, "    - %s\n", a[i])
			i++
		default:
			fmt.Fprintf(out, "    + %s\n", b[j])
			j++
		}
	}
}
