package routes

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEExamples parses every HCL example holding a route or gateway
// block in the READMEs and the example document, so the documentation
// cannot drift from the parser.
func TestREADMEExamples(t *testing.T) {
	block := regexp.MustCompile("(?s)```hcl\n(.*?)```")
	for _, file := range []string{"README.md", "../../README.md", "../../deploy/routes.hcl"} {
		src, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		examples := []string{string(src)}
		if strings.HasSuffix(file, ".md") {
			examples = nil
			for _, m := range block.FindAllStringSubmatch(string(src), -1) {
				if strings.Contains(m[1], "route \"") || strings.HasPrefix(m[1], "gateway {") {
					examples = append(examples, m[1])
				}
			}
			if len(examples) == 0 {
				t.Errorf("%s: no route example found", file)
			}
		}
		for _, ex := range examples {
			if _, err := Parse(file, []byte(ex)); err != nil {
				t.Errorf("%s: example does not parse: %v\n%s", file, err, ex)
			}
		}
	}
}
