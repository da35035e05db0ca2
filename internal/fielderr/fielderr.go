// Package fielderr is the error a component's Config.Validate gives for one
// bad field. It names the field as Go spells it, so that a caller that
// binds fields to flags or config file attributes (the sidecar) can name
// those instead; the message says what is wrong and what to give.
package fielderr

import (
	"errors"
	"fmt"
)

// Error is one bad field of a Config.
type Error struct {
	Field string // the Config field, e.g. "TryTimeout"
	Msg   string // the value and what is wanted, e.g. `"8653": want HOST:PORT`
}

func (e *Error) Error() string { return e.Field + " " + e.Msg }

// New returns an *Error for field.
func New(field, format string, args ...any) error {
	return &Error{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// All returns every *Error in err's tree (errors.Join, %w), in order, and
// the errors of the tree that are not one (nil, nil for a nil err).
func All(err error) (fields []*Error, others []error) {
	var walk func(error)
	walk = func(err error) {
		var fe *Error
		switch e := err.(type) {
		case nil:
		case *Error:
			fields = append(fields, e)
		case interface{ Unwrap() []error }:
			for _, c := range e.Unwrap() {
				walk(c)
			}
		default:
			if errors.As(err, &fe) {
				walk(errors.Unwrap(err))
				return
			}
			others = append(others, err)
		}
	}
	walk(err)
	return fields, others
}
