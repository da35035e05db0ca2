package h2

// FuzzAgainstNetHTTP: differential fuzzing of this package's server against
// golang.org/x/net/http2's (net/http's HTTP/2 server), the strict reference.
//
// The fuzz input is decoded into a short sequence of client frames
// (decodeSteps), valid and invalid, written once into bytes. The same bytes
// are replayed to each server over a net.Pipe, and what each server writes
// back is reduced to an outcome per stream (answered with a status and a
// body, or not) and one for the connection (did it survive). The two must
// agree.
//
// Timing. Both servers run handlers on goroutines of their own, so what a
// server answers can depend on when the next frame arrives (a handler that
// has not answered yet when a later bad frame tears the connection down).
// To compare behaviour and not scheduling, the client waits, after every
// frame that does not leave a header block open, until the server is
// settled: it has acknowledged a PING sent after the frame (so it has acted
// on every frame before it) and every stream the client opened is either
// over on the wire, or provably stuck waiting for the client (its handler
// blocked reading a body the client has not finished, or its answer blocked
// on a flow-control window the client has not opened). The PINGs are part
// of the bytes generated once, so both servers see identical input.

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

const (
	maxFuzzSteps = 16
	// settleCap bounds one wait for a server to settle. A server settles
	// in well under a millisecond; the cap is only reached when something
	// hangs, and then the outcome says so.
	settleCap = 750 * time.Millisecond
	labelName = "x-seq" // the harness's label of a request, to find its handler
	stopPing  = 1 << 30 // the number of the PING sent where a sequence is cut short
)

// Tables the fuzz input picks from, by index (modulo their length).
var (
	fzStreamIDs  = []uint32{1, 3, 5, 7, 1, 3, 2, 0, 9, 11}
	fzWindowIDs  = []uint32{0, 1, 3, 0, 5, 2, 7}
	fzMethods    = []string{"GET", "POST", "HEAD", "CONNECT", "PUT", "", "get", "OPTIONS"}
	fzDataLens   = []int{0, 1, 5, 20, 100, 1000}
	fzResetCodes = []http2.ErrCode{http2.ErrCodeNo, http2.ErrCodeProtocol, http2.ErrCodeCancel, 0xff}
	fzIncrements = []uint32{0, 1, 1000, 65535, 1<<31 - 1, 1 << 30}
	fzSettings   = []http2.Setting{
		{ID: http2.SettingHeaderTableSize, Val: 0},
		{ID: http2.SettingEnablePush, Val: 1},
		{ID: http2.SettingEnablePush, Val: 2},
		{ID: http2.SettingMaxConcurrentStreams, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: 0},
		{ID: http2.SettingInitialWindowSize, Val: 1},
		{ID: http2.SettingInitialWindowSize, Val: 1 << 31},
		{ID: http2.SettingInitialWindowSize, Val: 1<<31 - 1},
		{ID: http2.SettingMaxFrameSize, Val: 16383},
		{ID: http2.SettingMaxFrameSize, Val: 1 << 24},
		{ID: http2.SettingMaxFrameSize, Val: 16384},
		{ID: http2.SettingMaxHeaderListSize, Val: 100},
		{ID: http2.SettingEnableConnectProtocol, Val: 1},
		{ID: 0x99, Val: 5},
		{ID: http2.SettingInitialWindowSize, Val: 65535},
	}
)

// fzMutations change a request's header list (pseudo-header fields first,
// then the regular ones, as built by requestFields).
var fzMutations = []func([]hpack.HeaderField) []hpack.HeaderField{
	func(h []hpack.HeaderField) []hpack.HeaderField { return dropField(h, ":method") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return dropField(h, ":path") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return dropField(h, ":scheme") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return dropField(h, ":authority") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return insertPseudo(h, ":path", "/q") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return insertPseudo(h, ":method", "GET") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "*") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "relative") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "/a?b") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "/%zz") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "http://h.example/x") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":scheme", "ftp") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":authority", "user@example.com") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":authority", "") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "host", "other.example") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return insertPseudo(h, ":protocol", "websocket") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, ":method", "GET") }, // after regular ones
	func(h []hpack.HeaderField) []hpack.HeaderField { return insertPseudo(h, ":foo", "bar") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "X-Upper", "1") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "connection", "close") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "te", "gzip") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "te", "trailers") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "transfer-encoding", "chunked") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "upgrade", "h2c") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "content-length", "0") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "content-length", "5") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "content-length", "20") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "content-length", "abc") },
	func(h []hpack.HeaderField) []hpack.HeaderField {
		return addField(addField(h, "content-length", "5"), "content-length", "5")
	},
	func(h []hpack.HeaderField) []hpack.HeaderField {
		return addField(addField(h, "cookie", "a=1"), "cookie", "b=2")
	},
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "expect", "100-continue") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "trailer", "x-t") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "a b", "1") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "x-v", "a\x00b") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "", "x") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "x-a", "1") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "accept", "text/plain") },
	func(h []hpack.HeaderField) []hpack.HeaderField {
		return addField(dropField(h, ":authority"), "host", "host.example")
	},
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":authority", "exa mple.com") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":method", "CONNECT") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "proxy-connection", "keep-alive") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":path", "/a#frag") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return setField(h, ":authority", "[::1]:8080") },
	func(h []hpack.HeaderField) []hpack.HeaderField {
		return addField(h, "x-big", strings.Repeat("b", 3000))
	},
	func(h []hpack.HeaderField) []hpack.HeaderField { return insertPseudo(h, ":status", "200") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "content-length", "-1") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "keep-alive", "timeout=5") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "x-a", " padded ") },
	func(h []hpack.HeaderField) []hpack.HeaderField { return addField(h, "host", "") },
}

// fzTrailers are the header lists of a HEADERS frame on a stream the
// client has open (trailers).
var fzTrailers = [][]hpack.HeaderField{
	{{Name: "x-t", Value: "v"}},
	{{Name: "x-t", Value: "v"}, {Name: "x-u", Value: "w"}},
	{{Name: ":path", Value: "/t"}},
	{{Name: "content-length", Value: "1"}},
	{},
	{{Name: "X-T", Value: "v"}},
	{{Name: "transfer-encoding", Value: "chunked"}},
}

// fzMalformed are frames the Framer's Write methods would not write:
// wrong lengths, wrong streams, bad padding (type, flags, stream, payload).
var fzMalformed = []struct {
	typ     http2.FrameType
	flags   http2.Flags
	stream  uint32
	payload []byte
}{
	{http2.FrameSettings, 0, 0, []byte{0, 1, 0, 0, 0}},
	{http2.FrameSettings, 0, 1, nil},
	{http2.FrameSettings, http2.FlagSettingsAck, 0, []byte{0, 4, 0, 0, 0, 0}},
	{http2.FramePing, 0, 0, []byte("1234567")},
	{http2.FramePing, 0, 1, []byte("12345678")},
	{http2.FrameWindowUpdate, 0, 0, []byte{0, 0, 1}},
	{http2.FrameRSTStream, 0, 1, []byte{0, 0, 0}},
	{http2.FrameRSTStream, 0, 0, []byte{0, 0, 0, 8}},
	{http2.FramePriority, 0, 1, []byte{0, 0, 0, 3}},
	{http2.FrameData, 0, 0, []byte("x")},
	{http2.FrameData, http2.FlagDataPadded, 1, []byte{10}},
	{http2.FrameHeaders, http2.FlagHeadersPadded | http2.FlagHeadersEndHeaders, 1, []byte{20, 0x82}},
	{http2.FrameGoAway, 0, 0, []byte{0, 0, 0, 0}},
	{http2.FramePushPromise, http2.FlagPushPromiseEndHeaders, 1, []byte{0, 0, 0, 2, 0x82}},
	{http2.FrameContinuation, http2.FlagContinuationEndHeaders, 1, []byte{0x82}},
	{http2.FrameData, 0, 1, make([]byte, 16385)},
	{http2.FrameWindowUpdate, 0, 1, []byte{0x80, 0, 0, 1}},                                                      // reserved bit set
	{http2.FrameHeaders, http2.FlagHeadersEndHeaders | http2.FlagHeadersEndStream, 1, []byte{0xff, 0xff, 0xff}}, // bad HPACK
}

func dropField(h []hpack.HeaderField, name string) []hpack.HeaderField {
	return slices.DeleteFunc(h, func(f hpack.HeaderField) bool { return f.Name == name })
}

func setField(h []hpack.HeaderField, name, value string) []hpack.HeaderField {
	for i := range h {
		if h[i].Name == name {
			h[i].Value = value
			return h
		}
	}
	return insertPseudo(h, name, value)
}

func addField(h []hpack.HeaderField, name, value string) []hpack.HeaderField {
	return append(h, hpack.HeaderField{Name: name, Value: value})
}

// insertPseudo adds a field after the pseudo-header fields.
func insertPseudo(h []hpack.HeaderField, name, value string) []hpack.HeaderField {
	i := 0
	for i < len(h) && strings.HasPrefix(h[i].Name, ":") {
		i++
	}
	return slices.Insert(h, i, hpack.HeaderField{Name: name, Value: value})
}

// fuzzInput reads the fuzz input a byte at a time: zeros once it is over.
type fuzzInput struct {
	b []byte
	i int
}

func (in *fuzzInput) more() bool { return in.i < len(in.b) }

func (in *fuzzInput) next() int {
	if in.i >= len(in.b) {
		return 0
	}
	in.i++
	return int(in.b[in.i-1])
}

func pick[T any](in *fuzzInput, table []T) T { return table[in.next()%len(table)] }

// step is some bytes for the client to write, then, if sync, wait for the
// server to settle (the PING at the end of the bytes acknowledged).
type step struct {
	b    []byte
	desc string
	sync bool
	ping uint32 // the sync PING's number

	// What the step does, for the settle conditions.
	open    uint32 // a HEADERS that opens stream open, labelled label
	label   int
	dataOn  uint32 // DATA on stream dataOn, of n payload bytes
	n       int
	ends    uint32 // the client's END_STREAM (or RST_STREAM) on stream ends
	reset   uint32 // the client's RST_STREAM
	goAway  bool
	initWin int64 // SETTINGS_INITIAL_WINDOW_SIZE (valid), -1: none
	winOn   uint32
	winInc  int64 // WINDOW_UPDATE on winOn (0: the connection)
}

// Op codes of the fuzz input (its first byte per step, modulo opCount).
const (
	opHeaders = iota
	opHeaders2
	opData
	opData2
	opReset
	opWindow
	opSettings
	opPing
	opPriority
	opGoAway
	opUnknown
	opMalformed
	opTrailers
	opContinuation
	opCount
)

// Flags of a HEADERS op.
const (
	hfEndStream = 1 << iota
	hfSplit     // in a HEADERS and a CONTINUATION
	hfNoEnd     // no END_HEADERS on the last fragment: a header block left open
	hfSelfDep   // PRIORITY on itself
	hfPadded
)

// decodeSteps turns the fuzz input into the client's frames: the preface,
// then at most maxFuzzSteps frames, each followed by a sync PING unless it
// leaves a header block open.
func decodeSteps(data []byte) []step {
	in := &fuzzInput{b: data}
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	fr.AllowIllegalWrites = true
	var hbuf bytes.Buffer
	enc := hpack.NewEncoder(&hbuf)
	encode := func(fields []hpack.HeaderField) []byte {
		hbuf.Reset()
		for _, f := range fields {
			_ = enc.WriteField(f)
		}
		return bytes.Clone(hbuf.Bytes())
	}

	buf.WriteString(http2.ClientPreface)
	_ = fr.WriteSettings()
	_ = fr.WriteSettingsAck() // the server's SETTINGS (it sends one)
	steps := []step{{b: bytes.Clone(buf.Bytes()), desc: "preface", initWin: -1}}

	open := map[uint32]bool{} // streams the client has open
	labels := 0
	pings := uint32(0)
	inBlock := false // a header block is open: only CONTINUATION may follow
	goAway := false  // the client sent GOAWAY
	lastOpened := uint32(0)
	for len(steps) <= maxFuzzSteps && in.more() {
		buf.Reset()
		st := step{initWin: -1}
		op := in.next() % opCount
		blockOpen := false
		switch op {
		case opHeaders, opHeaders2, opTrailers:
			id := pick(in, fzStreamIDs)
			var fields []hpack.HeaderField
			if open[id] || op == opTrailers {
				fields = slices.Clone(pick(in, fzTrailers))
				st.desc = fmt.Sprintf("HEADERS(trailers) %d %q", id, fields)
			} else {
				method := pick(in, fzMethods)
				fields = requestFields(method)
				labels++
				fields = append(fields, hpack.HeaderField{Name: labelName, Value: strconv.Itoa(labels)})
				for range in.next() % 4 {
					fields = pick(in, fzMutations)(fields)
				}
				st.open, st.label = id, labels
				st.desc = fmt.Sprintf("HEADERS %d %q", id, fields)
			}
			flags := in.next()
			block := encode(fields)
			p := http2.HeadersFrameParam{StreamID: id, EndStream: flags&hfEndStream != 0}
			if flags&hfSelfDep != 0 {
				p.Priority = http2.PriorityParam{StreamDep: id, Weight: 15}
			}
			if flags&hfPadded != 0 {
				p.PadLength = 3
			}
			frag := block
			if flags&hfSplit != 0 && len(block) > 1 {
				frag = block[:len(block)/2]
			}
			p.BlockFragment = frag
			p.EndHeaders = len(frag) == len(block) && flags&hfNoEnd == 0
			_ = fr.WriteHeaders(p)
			if len(frag) < len(block) {
				_ = fr.WriteContinuation(id, flags&hfNoEnd == 0, block[len(frag):])
			}
			blockOpen = flags&hfNoEnd != 0
			st.desc += fmt.Sprintf(" flags=%#x", flags)
			if p.EndStream {
				st.ends = id
			}
			if st.open != 0 && !p.EndStream {
				open[id] = true
			}
			if p.EndStream {
				delete(open, id)
			}
		case opData, opData2:
			id := pick(in, fzStreamIDs)
			n := pick(in, fzDataLens)
			flags := in.next()
			payload := make([]byte, n)
			for i := range payload {
				payload[i] = 'a' + byte(i%26)
			}
			end := flags&1 != 0
			if flags&2 != 0 {
				_ = fr.WriteDataPadded(id, end, payload, make([]byte, 7))
			} else {
				_ = fr.WriteData(id, end, payload)
			}
			st.desc = fmt.Sprintf("DATA %d len=%d flags=%#x", id, n, flags)
			st.dataOn, st.n = id, n
			if end {
				st.ends = id
				delete(open, id)
			}
		case opReset:
			id := pick(in, fzStreamIDs)
			code := pick(in, fzResetCodes)
			_ = fr.WriteRSTStream(id, code)
			st.desc = fmt.Sprintf("RST_STREAM %d %v", id, code)
			st.ends, st.reset = id, id
			delete(open, id)
		case opWindow:
			id := pick(in, fzWindowIDs)
			inc := pick(in, fzIncrements)
			_ = fr.WriteWindowUpdate(id, inc)
			st.desc = fmt.Sprintf("WINDOW_UPDATE %d +%d", id, inc)
			st.winOn, st.winInc = id, int64(inc)
		case opSettings:
			var set []http2.Setting
			switch in.next() % 4 {
			case 0:
				_ = fr.WriteSettingsAck()
				st.desc = "SETTINGS ack"
			case 1:
				set = []http2.Setting{pick(in, fzSettings)}
			case 2:
				set = []http2.Setting{pick(in, fzSettings), pick(in, fzSettings)}
				if set[0].ID == set[1].ID {
					// Not compared: RFC 9113 6.5.3 has repeated
					// settings applied in order (ours), net/http
					// refuses them (a connection error).
					set = set[:1]
				}
			default:
				set = []http2.Setting{}
			}
			if set != nil {
				_ = fr.WriteSettings(set...)
				st.desc = fmt.Sprintf("SETTINGS %v", set)
				for _, s := range set {
					if s.ID == http2.SettingInitialWindowSize && s.Val <= 1<<31-1 {
						st.initWin = int64(s.Val)
					}
				}
			}
		case opPing:
			ack := in.next()%2 == 1
			_ = fr.WritePing(ack, [8]byte{'f', 'u', 'z', 'z'})
			st.desc = fmt.Sprintf("PING ack=%v", ack)
		case opPriority:
			id := pick(in, fzStreamIDs)
			var dep uint32
			switch in.next() % 3 {
			case 0:
				dep = id
			case 1:
				dep = 0
			default:
				dep = id + 2
			}
			_ = fr.WritePriority(id, http2.PriorityParam{StreamDep: dep, Weight: 7})
			st.desc = fmt.Sprintf("PRIORITY %d dep=%d", id, dep)
		case opGoAway:
			code := pick(in, fzResetCodes)
			_ = fr.WriteGoAway(0, code, nil)
			st.desc = fmt.Sprintf("GOAWAY %v", code)
			st.goAway = true
		case opUnknown:
			id := pick(in, fzStreamIDs)
			_ = fr.WriteRawFrame(0x20+http2.FrameType(in.next()%4), http2.Flags(in.next()), id, []byte("??"))
			st.desc = fmt.Sprintf("unknown frame on %d", id)
		case opMalformed:
			m := pick(in, fzMalformed)
			_ = fr.WriteRawFrame(m.typ, m.flags, m.stream, m.payload)
			st.desc = fmt.Sprintf("malformed %v flags=%#x stream=%d len=%d", m.typ, m.flags, m.stream, len(m.payload))
			blockOpen = m.typ == http2.FrameHeaders && m.flags&http2.FlagHeadersEndHeaders == 0
		case opContinuation:
			id := pick(in, fzStreamIDs)
			end := in.next()%2 == 0
			_ = fr.WriteContinuation(id, end, encode([]hpack.HeaderField{{Name: "x-c", Value: "1"}}))
			st.desc = fmt.Sprintf("CONTINUATION %d end=%v", id, end)
			blockOpen = inBlock && !end
		}
		if b := buf.Bytes(); goAway && len(b) >= 9 && http2.FrameType(b[3]) != http2.FrameHeaders &&
			binary.BigEndian.Uint32(b[5:9])&(1<<31-1) > lastOpened {
			// After its GOAWAY the client is done with streams above
			// those it opened: net/http, which answers with a GOAWAY
			// of its own, ignores frames on them (RFC 9113 6.8), ours
			// takes them as it would without the GOAWAY (DATA on an
			// idle stream is a connection error). Not compared: the
			// sequence ends here.
			break
		}
		if st.goAway {
			goAway = true
		}
		if st.open != 0 && !goAway {
			lastOpened = max(lastOpened, st.open)
		}
		inBlock = blockOpen
		if !inBlock {
			pings++
			_ = fr.WritePing(false, syncPing(pings))
			st.sync, st.ping = true, pings
		}
		st.b = bytes.Clone(buf.Bytes())
		steps = append(steps, st)
	}
	if inBlock {
		// A header block left open at the end gets a PING too, so that
		// the outcome is taken once the server has acted on what it
		// has: a PING in a header block is a connection error.
		buf.Reset()
		pings++
		_ = fr.WritePing(false, syncPing(pings))
		steps = append(steps, step{b: bytes.Clone(buf.Bytes()), desc: "PING", sync: true, ping: pings, initWin: -1})
	}
	return steps
}

// requestFields is a valid request's header list for method.
func requestFields(method string) []hpack.HeaderField {
	if method == "CONNECT" {
		return []hpack.HeaderField{{Name: ":method", Value: method}, {Name: ":authority", Value: "example.com:443"}}
	}
	return []hpack.HeaderField{
		{Name: ":method", Value: method}, {Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: "example.com"}, {Name: ":path", Value: "/p"},
	}
}

func syncPing(n uint32) [8]byte {
	var d [8]byte
	copy(d[:], "SYNC")
	binary.BigEndian.PutUint32(d[4:], n)
	return d
}

// handlerState is what a labelled request's handler is doing.
type handlerState struct {
	started, inRead, done bool
	read                  int
	readErr               bool // the body ended in an error
}

// observer gathers one server's output and its handlers' states.
type observer struct {
	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every change
	handlers map[int]*handlerState
	holds    func(id uint32) bool // the server holds stream id (nil: not known)
	running  int                  // handlers not yet returned

	streams  map[uint64]*streamOutcome // by skey
	gen      map[uint32]int            // each stream's opening: the output is its
	pingAcks uint32                    // the highest sync PING acknowledged
	goAway   *http2.GoAwayFrame
	closed   bool           // EOF or an error reading the server's output
	readErr  error          // why the output ended (unparsable, EOF)
	dataSent map[uint32]int // DATA the server sent on each stream (flow-controlled bytes)
	log      []string
}

type streamOutcome struct {
	status   int
	body     []byte
	ended    bool // END_STREAM after a final status
	reset    bool // RST_STREAM before that
	rstAfter bool // RST_STREAM after the answer (the client had not ended its side)
	code     http2.ErrCode
	headered bool
}

func newObserver() *observer {
	return &observer{changed: make(chan struct{}), handlers: map[int]*handlerState{},
		streams: map[uint64]*streamOutcome{}, gen: map[uint32]int{}, dataSent: map[uint32]int{}}
}

// notifyLocked wakes the waiters; mu held.
func (o *observer) notifyLocked() {
	close(o.changed)
	o.changed = make(chan struct{})
}

func (o *observer) handler(label int, f func(*handlerState)) {
	o.mu.Lock()
	hs := o.handlers[label]
	if hs == nil {
		hs = &handlerState{}
		o.handlers[label] = hs
	}
	f(hs)
	o.notifyLocked()
	o.mu.Unlock()
}

// echoHandler answers each request with what the server made of it:
// deterministic, and only what both servers must agree on.
func (o *observer) echoHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		label, _ := strconv.Atoi(r.Header.Get(labelName))
		o.mu.Lock()
		o.running++
		o.mu.Unlock()
		defer func() {
			o.handler(label, func(hs *handlerState) { hs.done, hs.inRead = true, false })
			o.mu.Lock()
			o.running--
			o.notifyLocked()
			o.mu.Unlock()
		}()
		o.handler(label, func(hs *handlerState) { hs.started = true })
		sum := sha256.New()
		n := 0
		var rerr error
		buf := make([]byte, 512)
		for n < 1<<20 {
			o.handler(label, func(hs *handlerState) { hs.inRead = true })
			m, err := r.Body.Read(buf)
			sum.Write(buf[:m])
			n += m
			o.handler(label, func(hs *handlerState) { hs.inRead, hs.read = false, n })
			if err != nil {
				if err != io.EOF {
					rerr = err
					o.handler(label, func(hs *handlerState) { hs.readErr = true })
				}
				break
			}
		}
		var b strings.Builder
		fmt.Fprintf(&b, "method=%q uri=%q host=%q cl=%d n=%d sum=%x readerr=%v\n",
			r.Method, r.URL.RequestURI(), r.Host, r.ContentLength, n, sum.Sum(nil)[:8], rerr != nil)
		writeHeader(&b, "h", r.Header)
		writeHeader(&b, "t", r.Trailer)
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, b.String())
	})
}

func writeHeader(b *strings.Builder, prefix string, h http.Header) {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(b, "%s %s=%q\n", prefix, k, h[k])
	}
}

// read reduces the server's output (c) to outcomes, until it ends or
// cannot be parsed.
func (o *observer) read(c net.Conn) {
	fr := http2.NewFramer(nil, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = 1 << 20
	for {
		f, err := fr.ReadFrame()
		o.mu.Lock()
		if err != nil {
			var se http2.StreamError
			if !errors.As(err, &se) {
				o.closed, o.readErr = true, err
				o.notifyLocked()
				o.mu.Unlock()
				return
			}
			o.log = append(o.log, "unparsable frame: "+err.Error())
			o.mu.Unlock()
			continue
		}
		o.frameLocked(f)
		o.notifyLocked()
		o.mu.Unlock()
	}
}

func (o *observer) stream(id uint32) *streamOutcome {
	k := skey(id, o.gen[id])
	so := o.streams[k]
	if so == nil {
		so = &streamOutcome{}
		o.streams[k] = so
	}
	return so
}

func (o *observer) frameLocked(f http2.Frame) {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		so := o.stream(f.StreamID)
		if so.ended || so.reset {
			return
		}
		if !so.headered {
			st, _ := strconv.Atoi(f.PseudoValue("status"))
			if st >= 200 {
				so.status, so.headered = st, true
			}
		}
		if so.headered && f.StreamEnded() {
			so.ended = true
		}
	case *http2.DataFrame:
		o.dataSent[f.StreamID] += int(f.Length)
		so := o.stream(f.StreamID)
		if so.ended || so.reset {
			return
		}
		so.body = append(so.body, f.Data()...)
		if f.StreamEnded() {
			so.ended = true
		}
	case *http2.RSTStreamFrame:
		so := o.stream(f.StreamID)
		o.log = append(o.log, fmt.Sprintf("RST_STREAM %d %v", f.StreamID, f.ErrCode))
		if so.ended {
			so.rstAfter = true
		} else if !so.reset {
			so.reset, so.code = true, f.ErrCode
		}
	case *http2.GoAwayFrame:
		o.log = append(o.log, fmt.Sprintf("GOAWAY last=%d %v", f.LastStreamID, f.ErrCode))
		if o.goAway == nil || o.goAway.ErrCode == http2.ErrCodeNo {
			g := *f
			o.goAway = &g
		}
	case *http2.PingFrame:
		if f.IsAck() && string(f.Data[:4]) == "SYNC" {
			o.pingAcks = max(o.pingAcks, binary.BigEndian.Uint32(f.Data[4:]))
		}
	}
}

// dead: the server ended the connection (with an error; a GOAWAY without
// one lets the streams it covers finish).
func (o *observer) deadLocked() bool {
	return o.closed || o.goAway != nil && o.goAway.ErrCode != http2.ErrCodeNo
}

// sent is what the client has sent so far, for the settle conditions.
type sent struct {
	opened   map[int]uint64 // label: its stream (skey)
	gens     map[uint32]int // openings of each stream id
	data     map[uint32]int // payload bytes sent on each stream
	ended    map[uint32]bool
	resets   map[uint32]bool
	goAway   bool
	lateOpen map[int]bool // opened after the client's GOAWAY
	initWin  int64
	connInc  int64
	inc      map[uint32]int64
}

func newSent() *sent {
	return &sent{opened: map[int]uint64{}, gens: map[uint32]int{}, data: map[uint32]int{}, ended: map[uint32]bool{},
		resets: map[uint32]bool{}, lateOpen: map[int]bool{}, initWin: 65535, inc: map[uint32]int64{}}
}

func (cl *sent) apply(st step) {
	if st.label != 0 {
		// A stream id opened again (after a HEADERS refused before it
		// opened anything) is a stream of its own.
		id := st.open
		cl.gens[id]++
		cl.opened[st.label] = skey(id, cl.gens[id])
		delete(cl.data, id)
		delete(cl.ended, id)
		delete(cl.resets, id)
		delete(cl.inc, id)
		if cl.goAway {
			cl.lateOpen[st.label] = true
		}
	}
	cl.data[st.dataOn] += st.n
	if st.ends != 0 {
		cl.ended[st.ends] = true
	}
	if st.reset != 0 {
		cl.resets[st.reset] = true
	}
	cl.goAway = cl.goAway || st.goAway
	if st.initWin >= 0 {
		cl.initWin = st.initWin
	}
	if st.winInc > 0 {
		if st.winOn == 0 {
			cl.connInc += st.winInc
		} else {
			cl.inc[st.winOn] += st.winInc
		}
	}
}

// settledLocked: the server has acted on everything up to sync PING ping
// and each stream the client opened is over or waits for the client.
func (o *observer) settledLocked(cl *sent, ping uint32) bool {
	if o.deadLocked() {
		return true
	}
	if o.pingAcks < ping {
		return false
	}
	for label, k := range cl.opened {
		id := uint32(k)
		if so := o.streams[k]; so != nil && so.reset {
			continue // over on the wire
		}
		if so := o.streams[k]; so != nil && so.ended {
			// Answered. What the server does with a frame that comes
			// next on this stream depends on whether it has closed the
			// stream yet (STREAM_CLOSED while it holds it, a connection
			// error once it has forgotten it): wait for that. To a
			// client that has not ended its side both send RST_STREAM
			// (NO_ERROR, RFC 9113 8.1) once the stream is closed; for
			// the others, net/http has closed the stream before it
			// flushes the END_STREAM, and ours is asked (holds).
			if !cl.ended[id] && !so.rstAfter || o.holds != nil && o.holds(id) {
				return false
			}
			continue
		}
		if g := o.goAway; g != nil && g.LastStreamID < id {
			continue // not served, as the server's GOAWAY says
		}
		if cl.lateOpen[label] || cl.resets[id] {
			// After the client's GOAWAY a new stream may be ignored;
			// one the client reset ends at the server's pace, with no
			// answer to wait for.
			continue
		}
		hs := o.handlers[label]
		so := o.streams[k]
		if hs == nil && (so == nil || !so.headered) {
			return false // its handler has not started yet
		}
		if hs != nil && hs.inRead && !cl.ended[id] && hs.read == cl.data[id] {
			continue // waits for a body the client has not sent
		}
		if (hs == nil || hs.done) && so != nil && so.headered {
			// The answer (ours, or the server's own: a 400, a 431)
			// has its HEADERS out and waits for a window the client
			// has not opened (both servers send the HEADERS before
			// they wait; an answer without a body does not wait).
			conn := 65535 + cl.connInc - sumInts(o.dataSent)
			strm := cl.initWin + cl.inc[id] - int64(o.dataSent[id])
			if conn <= 0 || strm <= 0 {
				continue
			}
		}
		return false
	}
	return true
}

// skey is a stream's key: its id and which opening of that id it is.
func skey(id uint32, gen int) uint64 { return uint64(gen)<<32 | uint64(id) }

func sumInts(m map[uint32]int) int64 {
	var n int64
	for _, v := range m {
		n += int64(v)
	}
	return n
}

// settle waits until the server has settled (settledLocked) or settleCap,
// a third of it after a GOAWAY of the server's (as write). It looks again
// at every change it is told of, and every millisecond for what it is not
// told of (holds).
func (o *observer) settle(cl *sent, ping uint32) bool {
	start := time.Now()
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		o.mu.Lock()
		ok, ch := o.settledLocked(cl, ping), o.changed
		limit := settleCap
		if o.goAway != nil {
			limit = settleCap / 3
		}
		o.mu.Unlock()
		if ok {
			return true
		}
		if time.Since(start) > limit {
			return false
		}
		select {
		case <-ch:
		case <-tick.C:
		}
	}
}

// write writes b to c, and gives up when the server ends the connection
// with an error (net/http then stops reading) or after settleCap. After a
// GOAWAY without error the wait is shorter: net/http, draining, may meet a
// connection error it has no GOAWAY left to announce (it sent one), stop
// reading, and close the connection only a second later.
func (o *observer) write(c net.Conn, b []byte) error {
	o.mu.Lock()
	draining := o.goAway != nil
	o.mu.Unlock()
	if draining {
		_ = c.SetWriteDeadline(time.Now().Add(settleCap / 3))
	} else {
		_ = c.SetWriteDeadline(time.Now().Add(settleCap))
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(b)
		done <- err
	}()
	for {
		o.mu.Lock()
		dead, ch := o.deadLocked(), o.changed
		o.mu.Unlock()
		if dead {
			_ = c.SetWriteDeadline(time.Now())
			return <-done
		}
		select {
		case err := <-done:
			return err
		case <-ch:
		}
	}
}

// A server under test: serve serves a connection, holds (if not nil) tells
// whether the server still holds a stream.
type serverUnderTest func(http.Handler) (serve func(net.Conn), holds func(uint32) bool)

func ours(h http.Handler) (func(net.Conn), func(uint32) bool) {
	s := &Server{Handler: h}
	holds := func(id uint32) bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for c := range s.conns {
			c.mu.Lock()
			_, ok := c.streams[id]
			c.mu.Unlock()
			if ok {
				return true
			}
		}
		return false
	}
	return s.ServeConn, holds
}

// netHTTP is the reference, configured as ours is where that shows
// on the wire (streams, windows, the frame size, the header list limit).
func netHTTP(h http.Handler) (func(net.Conn), func(uint32) bool) {
	s := &http2.Server{MaxConcurrentStreams: defaultMaxStreams, MaxUploadBufferPerStream: streamWindow,
		MaxUploadBufferPerConnection: connWindow, MaxReadFrameSize: readFrame}
	opts := &http2.ServeConnOpts{Handler: h,
		BaseConfig: &http.Server{MaxHeaderBytes: defaultMaxHeader, ErrorLog: log.New(io.Discard, "", 0)}}
	return func(nc net.Conn) { s.ServeConn(nc, opts) }, nil
}

// result is one server's outcome.
type result struct {
	streams   map[uint64]streamOutcome // by skey
	goAway    *http2.GoAwayFrame
	closed    bool
	unsettled []string        // steps after which the server did not settle within settleCap
	readErr   map[uint64]bool // streams whose handler's body read failed
	log       []string
}

// dead: the connection ended with an error (or was closed).
func (r *result) dead() bool {
	return r.closed || r.goAway != nil && r.goAway.ErrCode != http2.ErrCodeNo
}

func (r *result) conn() string {
	switch {
	case r.goAway != nil:
		return fmt.Sprintf("GOAWAY %v last=%d (closed=%v)", r.goAway.ErrCode, r.goAway.LastStreamID, r.closed)
	case r.closed:
		return "closed"
	}
	return "alive"
}

// run replays steps to a server (serve) over a net.Pipe. mustEnd: the
// server's goroutines must end once the connection is closed (ours; net/http
// takes its time, up to a second after a GOAWAY).
func run(steps []step, sut serverUnderTest, mustEnd bool) (*result, error) {
	cc, sc := net.Pipe()
	o := newObserver()
	serve, holds := sut(o.echoHandler())
	o.holds = holds
	served := make(chan struct{})
	go func() {
		defer close(served)
		serve(sc)
	}()
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		o.read(cc)
	}()
	cl := newSent()
	res := &result{}
	synced := true // the server has settled after the last step written
	for _, st := range steps {
		o.mu.Lock()
		dead := o.deadLocked()
		o.mu.Unlock()
		if dead {
			break // net/http discards what follows an error; ours has closed
		}
		if len(st.b) >= 9 && http2.FrameType(st.b[3]) == http2.FrameHeaders {
			id := binary.BigEndian.Uint32(st.b[5:9]) & (1<<31 - 1)
			o.mu.Lock()
			so := o.streams[skey(id, o.gen[id])]
			o.mu.Unlock()
			if so != nil && (so.reset || so.headered) {
				// A HEADERS on a stream the server reset or answered
				// (a 400 of net/http's is a reset of ours): ours ignores
				// it (RFC 9113 5.1, frames the client sent before it
				// learnt of the reset), net/http takes it for a stream
				// gone (a connection error). Not compared: the
				// sequence ends here, in both runs (the reset is in
				// both, or the comparison says so).
				res.log = append(res.log, "stopped before "+st.desc)
				if !synced {
					// The server has not been seen acting on the
					// steps since the last sync (a header block
					// left open): a PING (the same in both runs; in
					// a header block, a connection error) and wait.
					var b bytes.Buffer
					_ = http2.NewFramer(&b, nil).WritePing(false, syncPing(stopPing))
					if o.write(cc, b.Bytes()) == nil && !o.settle(cl, stopPing) {
						res.unsettled = append(res.unsettled, "PING at the stop")
					}
				}
				break
			}
		}
		synced = st.sync
		cl.apply(st)
		if st.label != 0 { // before the server can answer it
			o.mu.Lock()
			o.gen[st.open] = cl.gens[st.open]
			delete(o.dataSent, st.open)
			o.mu.Unlock()
		}
		if err := o.write(cc, st.b); err != nil {
			res.log = append(res.log, fmt.Sprintf("write %s: %v", st.desc, err))
			// The server closed the connection (it did not just stop
			// reading): what it wrote before (a GOAWAY) may still be in
			// the reader's hands.
			o.mu.Lock()
			dead := o.deadLocked()
			o.mu.Unlock()
			if !dead && !errors.Is(err, os.ErrDeadlineExceeded) {
				select {
				case <-readDone:
				case <-time.After(settleCap):
				}
			}
			break
		}

		if st.sync && !o.settle(cl, st.ping) {
			res.unsettled = append(res.unsettled, st.desc)
			o.mu.Lock()
			draining := o.goAway != nil
			o.mu.Unlock()
			if draining {
				break // net/http has stopped after a connection error (see write)
			}
		}
	}
	o.mu.Lock()
	res.streams = map[uint64]streamOutcome{}
	for k, so := range o.streams {
		res.streams[k] = *so
	}
	res.goAway, res.closed = o.goAway, o.closed
	res.readErr = map[uint64]bool{}
	for label, hs := range o.handlers {
		if k, ok := cl.opened[label]; ok && hs.readErr {
			res.readErr[k] = true
		}
	}
	res.log = append(res.log, o.log...)
	o.mu.Unlock()

	_ = cc.Close()
	<-readDone
	if !mustEnd {
		return res, nil
	}
	// Every handler must end once the connection is gone: one that does
	// not is a leak (bounded generously: this is not a timing check).
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	select {
	case <-served:
	case <-deadline.C:
		return res, errors.New("ServeConn did not return after the connection closed")
	}
	for {
		o.mu.Lock()
		running, ch := o.running, o.changed
		o.mu.Unlock()
		if running == 0 {
			return res, nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return res, fmt.Errorf("%d handlers still running after the connection closed", running)
		}
	}
}

// compare returns how ours differs from the reference, "" if it does not.
//
// Tolerances, and why:
//   - Error codes (RST_STREAM's, GOAWAY's) are not compared, only whether a
//     stream was answered and whether the connection survived: RFC 9113
//     lets an endpoint choose among codes, and they are reported in the
//     message.
//   - Only a 200 answer's body is compared (it is the echo of what the
//     handler saw); the text of an error page the server itself wrote (a
//     400, a 431) is not the contract, its status is.
//   - After the client's GOAWAY, whether the connection stays open is not
//     compared: the server may close it once its streams are done (RFC
//     9113 6.8), net/http lingers a second, ours closes at once.
//   - A request whose body does not add up to its Content-Length: ours
//     resets the stream (RFC 9113 8.1.1: malformed, a stream error of type
//     PROTOCOL_ERROR), net/http runs the handler with a body that ends in
//     an error (when END_STREAM comes short of it). Ours is the RFC's, and
//     what a proxy needs (no forwarding of a malformed request): a reset of
//     ours against an answer whose handler saw a body error is accepted.
//   - A request with a connection-specific field (or TE other than
//     "trailers"): ours resets the stream (RFC 9113 8.2.2: malformed, a
//     stream error), net/http answers 400 with a handler of its own. Our
//     handler never answers 400, so a 400 of net/http's against a reset of
//     ours is that case, and accepted.
//   - A stream not answered may have been reset, ignored (a GOAWAY covers
//     it), cut by the connection's end, or still wait for the client;
//     reset and waiting are told apart only while both connections are
//     alive (once one is gone, its streams are gone too), and not for
//     streams above those opened before the client's GOAWAY: net/http
//     answers that GOAWAY with its own and then ignores frames on them
//     (RFC 9113 6.8 allows it), ours acts on them (a PRIORITY on itself
//     resets such a stream).
//
// clientGoAway: the client sent GOAWAY; lastOpened: the highest stream it
// had opened by then.
func compare(ours, ref *result, clientGoAway bool, lastOpened uint32) string {
	var diffs []string
	keys := map[uint64]bool{}
	for k := range ours.streams {
		keys[k] = true
	}
	for k := range ref.streams {
		keys[k] = true
	}
	sorted := make([]uint64, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	slices.Sort(sorted)
	bothAlive := !ours.dead() && !ref.dead()
	for _, k := range sorted {
		id := uint32(k)
		name := fmt.Sprint(id)
		if k>>32 > 1 {
			name += fmt.Sprintf(" (opening %d)", k>>32)
		}
		a, b := ours.streams[k], ref.streams[k]
		switch {
		case a.reset && b.ended && ref.readErr[k]:
		case a.reset && b.headered && b.status == http.StatusBadRequest: // ended, or waiting for a window
		case a.ended != b.ended:
			diffs = append(diffs, fmt.Sprintf("stream %s: ours %s, net/http %s", name, a.String(), b.String()))
		case a.ended && a.status != b.status:
			diffs = append(diffs, fmt.Sprintf("stream %s: status %d, net/http %d", name, a.status, b.status))
		case a.ended && a.status == http.StatusOK && !bytes.Equal(a.body, b.body):
			diffs = append(diffs, fmt.Sprintf("stream %s: body\n%s\nnet/http's\n%s", name, a.body, b.body))
		case !a.ended && bothAlive && a.reset != b.reset && !(clientGoAway && id > lastOpened):
			diffs = append(diffs, fmt.Sprintf("stream %s: ours %s, net/http %s", name, a.String(), b.String()))
		}
	}
	if !clientGoAway && ours.dead() != ref.dead() {
		diffs = append(diffs, fmt.Sprintf("connection: ours %s, net/http %s", ours.conn(), ref.conn()))
	}
	return strings.Join(diffs, "\n")
}

func (so streamOutcome) String() string {
	switch {
	case so.ended:
		return fmt.Sprintf("answered %d (%d bytes)", so.status, len(so.body))
	case so.reset:
		return fmt.Sprintf("reset %v", so.code)
	case so.headered:
		return fmt.Sprintf("%d, answer unfinished", so.status)
	}
	return "not answered"
}

func FuzzAgainstNetHTTP(f *testing.F) {
	for _, s := range diffSeeds {
		f.Add(bytes.Join(s, nil))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		steps := decodeSteps(data)
		ours, err := run(steps, ours, true)
		if err != nil {
			t.Fatalf("ours: %v\n%s", err, describe(steps))
		}
		ref, err := run(steps, netHTTP, false)
		if err != nil {
			t.Fatalf("net/http: %v\n%s", err, describe(steps))
		}
		if len(ours.unsettled)+len(ref.unsettled) > 0 {
			t.Logf("not settled within %v: ours after %q, net/http after %q", settleCap, ours.unsettled, ref.unsettled)
		}
		clientGoAway, lastOpened := false, uint32(0)
		for _, st := range steps {
			clientGoAway = clientGoAway || st.goAway
			if !clientGoAway && st.label != 0 {
				lastOpened = max(lastOpened, st.open)
			}
		}
		if d := compare(ours, ref, clientGoAway, lastOpened); d != "" {
			t.Errorf("%s\nthe client sent:\n%s\nours: %s, %q, unsettled after %q\nnet/http: %s, %q, unsettled after %q",
				d, describe(steps), ours.conn(), ours.log, ours.unsettled, ref.conn(), ref.log, ref.unsettled)
		}
	})
}

func describe(steps []step) string {
	var b strings.Builder
	for _, st := range steps {
		fmt.Fprintf(&b, "  %s\n", st.desc)
	}
	return b.String()
}

// Seeds, in decodeSteps's format: an op, then its bytes.
var diffSeeds = [][][]byte{
	// A GET.
	{{opHeaders, 0, 0, 0, hfEndStream}},
	// A POST with a body and its Content-Length, in two DATA frames.
	{{opHeaders, 0, 1, 1, 26, 0}, {opData, 0, 1, 0}, {opData, 0, 4, 0}, {opData, 0, 0, 1}},
	{{opHeaders, 0, 1, 1, 26, 0}, {opData, 0, 2, 1}},
	// Content-Length wrong: fewer bytes, more bytes.
	{{opHeaders, 0, 1, 1, 27, 0}, {opData, 0, 2, 1}},
	{{opHeaders, 0, 1, 1, 26, 0}, {opData, 0, 3, 1}},
	// Trailers, declared and not; padded DATA.
	{{opHeaders, 0, 1, 1, 32, 0}, {opData, 0, 3, 2}, {opTrailers, 0, 1, hfEndStream}},
	{{opHeaders, 0, 1, 0, 0}, {opTrailers, 0, 0, hfEndStream}},
	// A header block in a HEADERS and a CONTINUATION; one left open.
	{{opHeaders, 0, 0, 1, 36, hfEndStream | hfSplit}, {opHeaders, 1, 1, 1, 44, hfSplit}, {opData, 1, 1, 1}},
	{{opHeaders, 0, 0, 0, hfEndStream | hfNoEnd}, {opContinuation, 0, 0}},
	{{opHeaders, 0, 0, 0, hfEndStream | hfNoEnd}, {opPing, 0}},
	// Bad pseudo-header fields, bad names, userinfo, CONNECT, :protocol.
	{{opHeaders, 0, 0, 1, 0, hfEndStream}, {opHeaders, 1, 0, 2, 4, 19, hfEndStream}, {opHeaders, 2, 0, 1, 13, hfEndStream}},
	{{opHeaders, 0, 0, 1, 6, hfEndStream}, {opHeaders, 1, 0, 1, 7, hfEndStream}, {opHeaders, 2, 0, 1, 8, hfEndStream}},
	{{opHeaders, 0, 3, 0, hfEndStream}, {opHeaders, 1, 0, 1, 16, hfEndStream}, {opHeaders, 2, 3, 1, 16, hfEndStream}},
	{{opHeaders, 0, 0, 1, 17, hfEndStream}, {opHeaders, 1, 0, 1, 45, hfEndStream}},
	// Connection-specific fields, cookies, host and :authority.
	{{opHeaders, 0, 0, 2, 20, 21, hfEndStream}, {opHeaders, 1, 0, 1, 22, hfEndStream}, {opHeaders, 2, 0, 2, 30, 15, hfEndStream}},
	{{opHeaders, 0, 0, 1, 38, hfEndStream}, {opHeaders, 1, 0, 1, 39, hfEndStream}},
	{{opHeaders, 0, 0, 1, 11, hfEndStream}, {opHeaders, 1, 0, 3, 3, 15, 15, hfEndStream}, {opHeaders, 2, 0, 1, 49, hfEndStream}},
	// Expect: 100-continue.
	{{opHeaders, 0, 1, 2, 31, 26, 0}, {opData, 0, 2, 1}},
	// Flow control: windows overflowed, an increment of 0, a window of 0
	// (the answer waits for WINDOW_UPDATE).
	{{opWindow, 0, 4}},
	{{opHeaders, 0, 1, 0, 0}, {opWindow, 1, 4}, {opData, 0, 2, 1}},
	{{opHeaders, 0, 1, 0, 0}, {opWindow, 1, 0}, {opWindow, 0, 0}},
	{{opSettings, 1, 4}, {opHeaders, 0, 0, 0, hfEndStream}, {opWindow, 1, 2}, {opSettings, 1, 6}},
	// Stream ids: reused, even, lower than the last.
	{{opHeaders, 1, 0, 0, hfEndStream}, {opHeaders, 0, 0, 0, hfEndStream}},
	{{opHeaders, 6, 0, 0, hfEndStream}},
	{{opData, 2, 2, 1}},
	// Reset, GOAWAY, PRIORITY on itself, unknown and malformed frames,
	// SETTINGS ack and invalid values.
	{{opHeaders, 0, 1, 0, 0}, {opReset, 0, 2}, {opData, 0, 2, 1}},
	{{opHeaders, 0, 1, 0, 0}, {opGoAway, 0}, {opHeaders, 1, 0, 0, hfEndStream}, {opData, 0, 1, 1}},
	{{opPriority, 0, 0}, {opHeaders, 0, 0, 0, hfEndStream | hfSelfDep}},
	{{opUnknown, 0, 1, 0}, {opHeaders, 0, 0, 0, hfEndStream}, {opMalformed, 3}},
	{{opSettings, 0}, {opSettings, 2, 2, 9}, {opHeaders, 0, 0, 0, hfEndStream}},
}
