package fielderr

import (
	"errors"
	"fmt"
	"testing"
)

func TestAll(t *testing.T) {
	other := errors.New("other")
	err := fmt.Errorf("dns: %w", errors.Join(New("Addr", "%q: want HOST:PORT", "x"), other, New("NodeTTL", "-1s: must not be negative")))
	fields, others := All(err)
	if len(fields) != 2 || fields[0].Field != "Addr" || fields[1].Error() != "NodeTTL -1s: must not be negative" {
		t.Errorf("fields %v", fields)
	}
	if len(others) != 1 || others[0] != other {
		t.Errorf("others %v", others)
	}
	if f, o := All(nil); f != nil || o != nil {
		t.Errorf("nil: %v %v", f, o)
	}
}
