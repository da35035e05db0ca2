// Package h1 is the proxy fast path's HTTP/1.1 parser: request and
// response heads parsed in place into spans of the caller's buffer, and
// chunked framing followed through a stream that is passed on unchanged.
// It does no I/O and allocates nothing; the engines in package proxy read
// and write, and decide what to do with what it finds.
//
// The hand-written HTTP/1.1 fast path parses only what a proxy needs and
// copies everything else byte for byte. Why by hand: the goal is to be at
// least as fast as nginx on the same machine, and no maintained Go library
// gets there — measured with wrk (scripts/bench proxy), net/http's
// ReverseProxy costs twice nginx's CPU per request and a bare fasthttp
// HostClient proxy about 1.1×; this path, which never materialises a
// request or response object, costs about what nginx does. Whatever it does not understand
// exactly (HTTP/1.0, chunked or large request bodies, Expect, Upgrade,
// CONNECT, obsolete line folding, bare LF, very many headers) goes to the
// fasthttp path instead, which answers it as before.
package h1

import (
	"bytes"
	"errors"
	"strings"
)

// MaxHeaders is the most header lines a head may have.
const MaxHeaders = 64

// Span is a [start, end) range of a head buffer.
type Span struct{ Start, End int }

// Request is a parsed request head. Spans index the connection's buffer.
type Request struct {
	HeadEnd       int // bytes of the head including the blank line
	Method        Span
	Target        Span
	Host          Span // Host header value; End == 0 when absent
	ContentLength int64
	ConnClose     bool
	ConnTokens    bool // Connection names headers to drop
	Conn          Span // Connection header value
	Hop           bool // some header must be dropped
	IdemKey       bool
	HasXFP        bool
	NumXFF        int
	XFF           [4]Span
	NumHeaders    int
	Names, Vals   [MaxHeaders]Span
	Drop          [MaxHeaders]bool
}

// ErrSlow says the request needs the fasthttp path.
var ErrSlow = errors.New("h1: request needs the general path")

// ErrIncomplete says more bytes are needed.
var ErrIncomplete = errors.New("h1: head incomplete")

func isTokenByte(c byte) bool {
	return c > ' ' && c < 0x7f && !bytes.ContainsRune([]byte("\"(),/:;<=>?@[\\]{}"), rune(c))
}

var tokenTable = func() (t [256]bool) {
	for c := 0; c < 256; c++ {
		t[c] = isTokenByte(byte(c))
	}
	return
}()

// ParseRequest parses the request head at the start of b. It returns
// ErrIncomplete when b holds no complete head and ErrSlow when the
// request must take the general path.
func ParseRequest(b []byte, r *Request) error {
	*r = Request{ContentLength: -1}
	// request line
	eol := bytes.IndexByte(b, '\n')
	if eol < 0 {
		return ErrIncomplete
	}
	if eol < 1 || b[eol-1] != '\r' {
		return ErrSlow
	}
	line := b[:eol-1]
	sp1 := bytes.IndexByte(line, ' ')
	if sp1 <= 0 {
		return ErrSlow
	}
	for _, c := range line[:sp1] {
		if !tokenTable[c] {
			return ErrSlow
		}
	}
	rest := line[sp1+1:]
	sp2 := bytes.IndexByte(rest, ' ')
	if sp2 <= 0 || string(rest[sp2+1:]) != "HTTP/1.1" {
		return ErrSlow
	}
	for _, c := range rest[:sp2] {
		if c <= ' ' || c >= 0x7f {
			return ErrSlow
		}
	}
	if !TargetForm(rest[:sp2], false) {
		return ErrSlow // the general path judges it
	}
	r.Method = Span{0, sp1}
	r.Target = Span{sp1 + 1, sp1 + 1 + sp2}
	if string(b[r.Method.Start:r.Method.End]) == "CONNECT" {
		return ErrSlow
	}
	i := eol + 1
	for {
		eol := bytes.IndexByte(b[i:], '\n')
		if eol < 0 {
			return ErrIncomplete
		}
		eol += i
		if eol == i || b[eol-1] != '\r' {
			return ErrSlow
		}
		if eol == i+1 { // blank line
			r.HeadEnd = eol + 1
			break
		}
		line := b[i : eol-1]
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return ErrSlow
		}
		for _, c := range line[:colon] {
			if !tokenTable[c] {
				return ErrSlow
			}
		}
		vs, ve := colon+1, len(line)
		for vs < ve && (line[vs] == ' ' || line[vs] == '\t') {
			vs++
		}
		for ve > vs && (line[ve-1] == ' ' || line[ve-1] == '\t') {
			ve--
		}
		for _, c := range line[vs:ve] {
			if c < ' ' && c != '\t' || c == 0x7f {
				return ErrSlow
			}
		}
		if r.NumHeaders == MaxHeaders {
			return ErrSlow
		}
		k := r.NumHeaders
		r.NumHeaders++
		r.Names[k] = Span{i, i + colon}
		r.Vals[k] = Span{i + vs, i + ve}
		name, val := line[:colon], line[vs:ve]
		switch len(name) {
		case 2:
			if bytes.EqualFold(name, []byte("TE")) {
				r.Drop[k], r.Hop = true, true
			}
		case 4:
			if bytes.EqualFold(name, []byte("Host")) {
				if r.Host.End != 0 {
					return ErrSlow
				}
				r.Host = r.Vals[k]
			}
		case 6:
			if bytes.EqualFold(name, []byte("Expect")) {
				return ErrSlow
			}
		case 7:
			if bytes.EqualFold(name, []byte("Upgrade")) {
				return ErrSlow
			}
			if bytes.EqualFold(name, []byte("Trailer")) {
				r.Drop[k], r.Hop = true, true
			}
		case 10:
			if bytes.EqualFold(name, []byte("Connection")) {
				if r.Conn.End != 0 {
					return ErrSlow
				}
				r.Conn = r.Vals[k]
				r.Drop[k], r.Hop = true, true
			} else if bytes.EqualFold(name, []byte("Keep-Alive")) {
				r.Drop[k], r.Hop = true, true
			}
		case 14:
			if bytes.EqualFold(name, []byte("Content-Length")) {
				if r.ContentLength >= 0 || len(val) == 0 || len(val) > 15 {
					return ErrSlow
				}
				var n int64
				for _, c := range val {
					if c < '0' || c > '9' {
						return ErrSlow
					}
					n = n*10 + int64(c-'0')
				}
				r.ContentLength = n
			}
		case 15:
			if bytes.EqualFold(name, []byte("X-Forwarded-For")) {
				if r.NumXFF == len(r.XFF) {
					return ErrSlow
				}
				r.XFF[r.NumXFF] = r.Vals[k]
				r.NumXFF++
				r.Drop[k] = true
			}
			if bytes.EqualFold(name, []byte("Idempotency-Key")) && len(val) > 0 {
				r.IdemKey = true
			}
		case 16:
			if bytes.EqualFold(name, []byte("Proxy-Connection")) {
				r.Drop[k], r.Hop = true, true
			}
		case 17:
			if bytes.EqualFold(name, []byte("Transfer-Encoding")) {
				return ErrSlow
			}
			if bytes.EqualFold(name, []byte("X-Forwarded-Proto")) {
				r.HasXFP = true
			}
		case 18:
			if bytes.EqualFold(name, []byte("Proxy-Authenticate")) {
				r.Drop[k], r.Hop = true, true
			}
		case 19:
			if bytes.EqualFold(name, []byte("Proxy-Authorization")) {
				r.Drop[k], r.Hop = true, true
			}
		}
		i = eol + 1
	}
	if r.Host.End == 0 {
		return ErrSlow
	}
	if r.Conn.End != 0 {
		for _, tok := range bytes.Split(b[r.Conn.Start:r.Conn.End], []byte(",")) {
			tok = bytes.TrimSpace(tok)
			switch {
			case len(tok) == 0 || bytes.EqualFold(tok, []byte("keep-alive")):
			case bytes.EqualFold(tok, []byte("close")):
				r.ConnClose = true
			case bytes.EqualFold(tok, []byte("upgrade")):
				return ErrSlow
			case FramingHeader(tok):
				// Never dropped: the body sent on is framed by it.
			default:
				r.ConnTokens = true
				for k := 0; k < r.NumHeaders; k++ {
					if bytes.EqualFold(b[r.Names[k].Start:r.Names[k].End], tok) {
						r.Drop[k] = true
					}
				}
			}
		}
	}
	return nil
}

// FramingHeader says whether a header named in Connection frames the
// message (or routes it): such a header is never dropped, whatever
// Connection says, so that the bytes passed on stay framed the same way.
func FramingHeader(name []byte) bool {
	switch len(name) {
	case 4:
		return bytes.EqualFold(name, []byte("Host"))
	case 14:
		return bytes.EqualFold(name, []byte("Content-Length"))
	case 17:
		return bytes.EqualFold(name, []byte("Transfer-Encoding"))
	}
	return false
}

// AppendPath appends the origin-form path to send on: "/" for an empty
// one, and "/" before a query that starts it ("http://svc?q=1").
func AppendPath(out, b []byte, path Span) []byte {
	if path.Start == path.End || b[path.Start] == '?' {
		out = append(out, '/')
	}
	return append(out, b[path.Start:path.End]...)
}

// Authority returns the host of an absolute-form target ("" span when the
// target is in origin-form) and the origin-form path to send on.
func (r *Request) Authority(b []byte) (host, path Span) {
	t := b[r.Target.Start:r.Target.End]
	if len(t) > 7 && t[0] != '/' && bytes.EqualFold(t[:7], []byte("http://")) {
		at, end := authorityBounds(t[7:])
		hs, he := r.Target.Start+7+at+1, r.Target.Start+7+end
		return Span{hs, he}, Span{he, r.Target.End}
	}
	return Span{}, r.Target
}

// AbsAuthority is the host (and port) of an absolute-form target, without
// userinfo; nil for any other form.
func AbsAuthority(uri []byte) []byte {
	if len(uri) <= 7 || !bytes.EqualFold(uri[:7], []byte("http://")) {
		return nil
	}
	at, end := authorityBounds(uri[7:])
	return uri[7+at+1 : 7+end]
}

// authorityBounds finds the authority at the start of rest (what follows
// "http://"): it ends at end (the first "/", "?" or "#", or rest's end),
// and its host starts after at, the last "@" before end (-1 without
// userinfo: userinfo is no part of the host, RFC 9110 §4.2.4).
func authorityBounds(rest []byte) (at, end int) {
	end = len(rest)
	if i := bytes.IndexAny(rest, "/?#"); i >= 0 {
		end = i
	}
	return bytes.LastIndexByte(rest[:end], '@'), end
}

// Response is a parsed response head.
type Response struct {
	HeadEnd          int
	Status           int
	Reason           Span // after the status code, including the leading space
	ContentLength    int64
	Chunked          bool
	TE               bool // Transfer-Encoding present
	HasContentLength bool // Content-Length present
	Close            bool // the instance closes the connection after this answer
	Hop              bool // a header must be dropped
	Conn             Span
	NumHeaders       int
	Names            [MaxHeaders]Span
	LineStart        [MaxHeaders]int
	Drop             [MaxHeaders]bool
}

// ErrBadResponse says an answer is not one a strict client takes.
var ErrBadResponse = errors.New("malformed response from instance")

// ParseResponse parses the response head at the start of b; it returns
// ErrIncomplete when more bytes are needed.
func ParseResponse(b []byte, r *Response) error {
	*r = Response{ContentLength: -1}
	eol := bytes.IndexByte(b, '\n')
	if eol < 0 {
		return ErrIncomplete
	}
	if eol < 1 || b[eol-1] != '\r' {
		return ErrBadResponse // a bare LF: a client may not split lines there
	}
	line := b[:eol-1]
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return ErrBadResponse
	}
	if line[7] == '0' {
		r.Close = true
	} else if line[7] != '1' {
		return ErrBadResponse
	}
	st := 0
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return ErrBadResponse
		}
		st = st*10 + int(c-'0')
	}
	if st < 100 || len(line) > 12 && line[12] != ' ' || !fieldValue(line[12:]) {
		return ErrBadResponse
	}
	r.Status = st
	r.Reason = Span{12, len(line)}
	keepAlive := false
	i := eol + 1
	for {
		eol := bytes.IndexByte(b[i:], '\n')
		if eol < 0 {
			return ErrIncomplete
		}
		eol += i
		if eol == i || b[eol-1] != '\r' {
			return ErrBadResponse // a bare LF
		}
		line := b[i : eol-1]
		if len(line) == 0 {
			r.HeadEnd = eol + 1
			break
		}
		// As strict as the request parser (and net/http's client): a
		// header name is a token (no space before the colon, no folded
		// line), a value has no control byte but HTAB. An answer that
		// breaks this is refused whole, never passed on.
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return ErrBadResponse
		}
		for _, c := range line[:colon] {
			if !tokenTable[c] {
				return ErrBadResponse
			}
		}
		if !fieldValue(line[colon+1:]) {
			return ErrBadResponse
		}
		if r.NumHeaders == MaxHeaders {
			return ErrBadResponse
		}
		k := r.NumHeaders
		r.NumHeaders++
		r.LineStart[k] = i
		r.Names[k] = Span{i, i + colon}
		name := line[:colon]
		val := bytes.TrimSpace(line[colon+1:])
		switch len(name) {
		case 2:
			if bytes.EqualFold(name, []byte("TE")) {
				r.Drop[k], r.Hop = true, true
			}
		case 7:
			if bytes.EqualFold(name, []byte("Upgrade")) {
				r.Drop[k], r.Hop = true, true
			}
		case 10:
			if bytes.EqualFold(name, []byte("Connection")) {
				r.Drop[k], r.Hop = true, true
				for _, tok := range bytes.Split(val, []byte(",")) {
					tok = bytes.TrimSpace(tok)
					switch {
					case bytes.EqualFold(tok, []byte("close")):
						r.Close = true
					case bytes.EqualFold(tok, []byte("keep-alive")):
						keepAlive = true
					}
				}
				vs := i + colon + 1 + bytes.Index(line[colon+1:], val)
				r.Conn = Span{vs, vs + len(val)}
			} else if bytes.EqualFold(name, []byte("Keep-Alive")) {
				r.Drop[k], r.Hop = true, true
			}
		case 14:
			if bytes.EqualFold(name, []byte("Content-Length")) {
				if len(val) == 0 || len(val) > 18 {
					return ErrBadResponse
				}
				var n int64
				for _, c := range val {
					if c < '0' || c > '9' {
						return ErrBadResponse
					}
					n = n*10 + int64(c-'0')
				}
				if r.ContentLength >= 0 && r.ContentLength != n {
					return ErrBadResponse
				}
				r.ContentLength = n
				r.HasContentLength = true
			}
		case 16:
			if bytes.EqualFold(name, []byte("Proxy-Connection")) {
				r.Drop[k], r.Hop = true, true
			}
		case 17:
			if bytes.EqualFold(name, []byte("Transfer-Encoding")) {
				// Only "chunked", once, as net/http's client: another
				// coding ("gzip, chunked") would have to be decoded to
				// be framed the same way by every client.
				if r.TE || !bytes.EqualFold(val, []byte("chunked")) {
					return ErrBadResponse
				}
				r.TE, r.Chunked = true, true
			}
		case 18:
			if bytes.EqualFold(name, []byte("Proxy-Authenticate")) {
				r.Drop[k], r.Hop = true, true
			}
		}
		i = eol + 1
	}
	if line[7] == '0' && keepAlive {
		r.Close = false
	}
	if line[7] == '0' && r.TE {
		// Faulty framing (RFC 9112 §6.1): net/http's client ignores
		// Transfer-Encoding in an HTTP/1.0 answer, others do not; no
		// guessing where the answer ends.
		return ErrBadResponse
	}
	if r.TE {
		// Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
		r.ContentLength = -1
		if r.HasContentLength { // the client must not see both
			for k := 0; k < r.NumHeaders; k++ {
				if bytes.EqualFold(b[r.Names[k].Start:r.Names[k].End], []byte("Content-Length")) {
					r.Drop[k], r.Hop = true, true
				}
			}
		}
	}
	if r.Conn.End != 0 {
		for _, tok := range bytes.Split(b[r.Conn.Start:r.Conn.End], []byte(",")) {
			tok = bytes.TrimSpace(tok)
			if len(tok) == 0 || bytes.EqualFold(tok, []byte("close")) || bytes.EqualFold(tok, []byte("keep-alive")) ||
				FramingHeader(tok) {
				continue
			}
			for k := 0; k < r.NumHeaders; k++ {
				if bytes.EqualFold(b[r.Names[k].Start:r.Names[k].End], tok) {
					r.Drop[k] = true
				}
			}
		}
	}
	return nil
}

// fieldValue says whether v may stand in a header value or a reason
// phrase: no control byte but HTAB (RFC 9110 §5.5).
func fieldValue(v []byte) bool {
	for _, c := range v {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// HasBody says whether the answer to a request with this method carries a
// body (RFC 9112 §6.3).
func (r *Response) HasBody(head bool) bool {
	return !head && r.Status >= 200 && r.Status != 204 && r.Status != 304
}

// ChunkScan follows chunked framing (RFC 9112 §7.1) through a byte stream
// that is passed on unchanged, to find where the body ends.
type ChunkScan struct {
	state  int
	size   int64
	digits int
	line   int
}

const (
	csSize = iota
	csBWS
	csExt
	csSizeLF
	csData
	csDataCR
	csDataLF
	csTrailerStart
	csTrailerLine
	csTrailerLF
	csEndLF
	csDone
)

// ErrBadChunk says a chunked body is malformed.
var ErrBadChunk = errors.New("malformed chunked body from instance")

// Scan consumes p and returns how many bytes of it belong to the body, and
// whether the body ended there.
func (s *ChunkScan) Scan(p []byte) (int, bool, error) {
	i := 0
	for i < len(p) {
		c := p[i]
		switch s.state {
		case csSize:
			switch {
			case c >= '0' && c <= '9':
				s.size = s.size<<4 | int64(c-'0')
			case c >= 'a' && c <= 'f':
				s.size = s.size<<4 | int64(c-'a'+10)
			case c >= 'A' && c <= 'F':
				s.size = s.size<<4 | int64(c-'A'+10)
			case c == ';' || c == ' ' || c == '\t':
				if s.digits == 0 {
					return i, false, ErrBadChunk
				}
				s.state = csExt
				if c != ';' {
					s.state = csBWS
				}
				i++
				continue
			case c == '\r':
				if s.digits == 0 {
					return i, false, ErrBadChunk
				}
				s.state = csSizeLF
				i++
				continue
			default:
				return i, false, ErrBadChunk
			}
			s.digits++
			if s.digits > 12 {
				return i, false, ErrBadChunk
			}
		case csBWS: // blanks after the size: only the line's end may follow (net/http takes no blank before ";")
			switch c {
			case ' ', '\t':
				if s.line++; s.line > 4096 {
					return i, false, ErrBadChunk
				}
			case '\r':
				s.state = csSizeLF
			default:
				return i, false, ErrBadChunk
			}
		case csExt:
			if c == '\r' {
				s.state = csSizeLF
			} else if c == '\n' {
				return i, false, ErrBadChunk
			} else if s.line++; s.line > 4096 {
				return i, false, ErrBadChunk
			}
		case csSizeLF:
			if c != '\n' {
				return i, false, ErrBadChunk
			}
			s.line = 0
			if s.size == 0 {
				s.state = csTrailerStart
			} else {
				s.state = csData
			}
		case csData:
			n := int64(len(p) - i)
			if n > s.size {
				n = s.size
			}
			s.size -= n
			i += int(n)
			if s.size == 0 {
				s.state = csDataCR
			}
			continue
		case csDataCR:
			if c != '\r' {
				return i, false, ErrBadChunk
			}
			s.state = csDataLF
		case csDataLF:
			if c != '\n' {
				return i, false, ErrBadChunk
			}
			s.state, s.size, s.digits = csSize, 0, 0
		case csTrailerStart:
			if c == '\r' {
				s.state = csEndLF
			} else if c == '\n' {
				return i, false, ErrBadChunk // a bare LF: no guessing where the body ends
			} else {
				s.state = csTrailerLine
				s.line = 1
			}
		case csTrailerLine:
			if c == '\r' {
				s.state = csTrailerLF
			} else if c == '\n' {
				return i, false, ErrBadChunk
			} else if s.line++; s.line > 8192 {
				return i, false, ErrBadChunk
			}
		case csTrailerLF:
			if c != '\n' {
				return i, false, ErrBadChunk
			}
			s.state = csTrailerStart
		case csEndLF:
			if c != '\n' {
				return i, false, ErrBadChunk
			}
			s.state = csDone
			return i + 1, true, nil
		}
		i++
	}
	return i, false, nil
}

// TargetForm says whether a request target is one a proxy passes on:
// origin-form ("/path") or absolute-form ("http://host/path"), with every
// "%" starting an escape (RFC 3986 §2.1), or, for OPTIONS, "*" (RFC 9112
// §3.2).
func TargetForm(uri []byte, options bool) bool {
	switch {
	case len(uri) == 0:
		return false
	case uri[0] == '/', len(uri) > 7 && bytes.EqualFold(uri[:7], []byte("http://")):
		if uri[0] != '/' && !validAuthority(uri[7:]) {
			return false
		}
		for i := bytes.IndexByte(uri, '%'); i >= 0; i = bytes.IndexByte(uri, '%') {
			if i+2 >= len(uri) || !isHex(uri[i+1]) || !isHex(uri[i+2]) {
				return false
			}
			uri = uri[i+3:]
		}
		return true
	}
	return options && string(uri) == "*"
}

// validAuthority says whether the authority at the start of rest (up to
// "/", "?" or "#") is one a strict URI parser takes (RFC 3986 §3.2, and
// what net/url refuses is refused here too): userinfo of unreserved and
// sub-delims characters, ":" and "@"; a reg-name of unreserved and
// sub-delims characters or a bracketed IPv6 literal of hex digits, ":"
// and "."; an optional port of digits. Percent-escapes are not taken in an
// authority at all (stricter than net/url, and never needed for a
// service's host name).
func validAuthority(rest []byte) bool {
	at, end := authorityBounds(rest)
	for _, c := range rest[:max(at, 0)] {
		if !regNameByte(c) && c != ':' && c != '@' {
			return false
		}
	}
	a := rest[at+1 : end]
	var port []byte
	if len(a) > 0 && a[0] == '[' {
		j := bytes.IndexByte(a, ']')
		if j < 0 {
			return false
		}
		for _, c := range a[1:j] {
			if !isHex(c) && c != ':' && c != '.' {
				return false
			}
		}
		switch rest := a[j+1:]; {
		case len(rest) == 0:
		case rest[0] == ':':
			port = rest[1:]
		default:
			return false
		}
	} else {
		if j := bytes.LastIndexByte(a, ':'); j >= 0 {
			a, port = a[:j], a[j+1:]
		}
		for _, c := range a {
			if !regNameByte(c) {
				return false
			}
		}
	}
	for _, c := range port {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// regNameByte says whether c may stand in a reg-name unescaped: unreserved
// or sub-delims (RFC 3986 §3.2.2).
func regNameByte(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("-._~!$&'()*+,;=", c) >= 0
}

// isHex says whether c is a hexadecimal digit.
func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}
