package control

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"attache/control/routes"
)

// Client calls the control service's API (the `attache routes` CLI).
type Client struct {
	URL   string // e.g. http://127.0.0.1:9500
	Token string // bearer token, "" for none
	HTTP  *http.Client
}

// NewClient returns a client with a 30 s timeout per call.
func NewClient(baseURL, token string) *Client {
	return &Client{URL: strings.TrimRight(baseURL, "/"), Token: token, HTTP: &http.Client{Timeout: 30 * time.Second}}
}

// RefusedError is an answer that refuses the request (4xx): an invalid
// document, a conflict, no such version, a missing token.
type RefusedError struct {
	Status int
	APIError
}

func (e *RefusedError) Error() string {
	var b strings.Builder
	b.WriteString(e.APIError.Error)
	for _, p := range e.Problems {
		b.WriteString("\n  " + p.String())
	}
	return b.String()
}

func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, rd)
	if err != nil {
		return fmt.Errorf("control client: %w", err)
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return fmt.Errorf("control client: is the control service running at %s? %w", c.URL, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("control client: reading the answer: %w", err)
	}
	if resp.StatusCode >= 300 {
		var ae APIError
		if json.Unmarshal(data, &ae) != nil || ae.Error == "" {
			ae.Error = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(data)))
		}
		if resp.StatusCode >= 400 && resp.StatusCode < 500 {
			return &RefusedError{Status: resp.StatusCode, APIError: ae}
		}
		return fmt.Errorf("control client: %s", ae.Error)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("control client: the answer is not what was expected: %w", err)
	}
	return nil
}

func docPath(op, name string, expect *uint64) string {
	q := url.Values{"name": {name}}
	if expect != nil {
		q.Set("expect", strconv.FormatUint(*expect, 10))
	}
	return "/v1/routes/" + op + "?" + q.Encode()
}

// Validate asks the service to validate a document (and check its services' health).
func (c *Client) Validate(ctx context.Context, name string, src []byte) (*ValidateResult, error) {
	var out ValidateResult
	return &out, c.do(ctx, http.MethodPost, docPath("validate", name, nil), src, &out)
}

// Diff compares a document with the current version.
func (c *Client) Diff(ctx context.Context, name string, src []byte) (*DiffResult, error) {
	var out DiffResult
	return &out, c.do(ctx, http.MethodPost, docPath("diff", name, nil), src, &out)
}

// Apply makes a document current; expect, when not nil, is the version the
// change is based on.
func (c *Client) Apply(ctx context.Context, name string, src []byte, expect *uint64) (*Result, error) {
	var out Result
	return &out, c.do(ctx, http.MethodPost, docPath("apply", name, expect), src, &out)
}

// Rollback makes a copy of version n current; expect as for Apply.
func (c *Client) Rollback(ctx context.Context, n uint64, expect *uint64) (*Result, error) {
	body, _ := json.Marshal(RollbackRequest{Version: n})
	path := "/v1/routes/rollback"
	if expect != nil {
		path += "?expect=" + strconv.FormatUint(*expect, 10)
	}
	var out Result
	return &out, c.do(ctx, http.MethodPost, path, body, &out)
}

// Get returns version n, 0 for the current one.
func (c *Client) Get(ctx context.Context, n uint64) (*routes.Version, error) {
	path := "/v1/routes/current"
	if n > 0 {
		path = "/v1/routes/versions/" + strconv.FormatUint(n, 10)
	}
	var out routes.Version
	return &out, c.do(ctx, http.MethodGet, path, nil, &out)
}

// History lists the stored versions, newest first.
func (c *Client) History(ctx context.Context) (*HistoryResult, error) {
	var out HistoryResult
	return &out, c.do(ctx, http.MethodGet, "/v1/routes/history", nil, &out)
}

// Status lists the gateways' applied versions.
func (c *Client) Status(ctx context.Context) (*StatusResult, error) {
	var out StatusResult
	return &out, c.do(ctx, http.MethodGet, "/v1/routes/status", nil, &out)
}
