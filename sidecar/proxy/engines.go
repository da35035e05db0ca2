package proxy

// Engines chooses which wire engines serve HTTP/1.x connections. The zero
// value is what a production proxy runs (event loops on Linux, the
// goroutine fast path, fasthttp for what neither takes); the rest exists
// to compare engines in benchmarks (bench/proxy -no-loop, -no-fast) and
// tests (-noloop), so it is not part of Config: New takes it as an Option.
type Engines struct {
	// NoEventLoops serves the fast path from a goroutine per connection
	// from the start, as off Linux.
	NoEventLoops bool
	// NoFastPath serves every HTTP/1.x request with fasthttp (no event
	// loops either: they serve the fast path).
	NoFastPath bool
}

// An Option changes how New builds a proxy beyond its Config.
type Option func(*Proxy)

// WithEngines sets the wire engines (for benchmarks and tests).
func WithEngines(e Engines) Option {
	return func(p *Proxy) { p.eng = e }
}
