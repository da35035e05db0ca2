package sidecar

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"attache/sidecar/catalog"
	"attache/sidecar/proxy"
)

// TestEveryFlagLands: each flag, given on the command line, and each
// config file attribute, given in a file, lands in the component field it
// always set (as the sidecar's New hands the component its Config). A flag
// added without a row here fails the test.
func TestEveryFlagLands(t *testing.T) {
	tests := []struct {
		flag string   // the flag; the attribute is the same with '_'
		args []string // the flag's values on the command line (repeated)
		hcl  string   // the attribute's value in a config file
		got  func(c Config) any
		want any
	}{
		{"node", []string{"n7"}, `"n7"`, func(c Config) any { return c.Node }, "n7"},
		{"consul", []string{"127.0.0.7:8500", "127.0.0.8:8500"}, `["127.0.0.7:8500", "127.0.0.8:8500"]`, func(c Config) any { return c.Catalog.Addresses }, []string{"127.0.0.7:8500", "127.0.0.8:8500"}},
		{"token", []string{"t0k"}, `"t0k"`, func(c Config) any { return c.Catalog.Token }, "t0k"},
		{"data-dir", []string{"/var/lib/x"}, `"/var/lib/x"`, func(c Config) any { return c.DataDir }, "/var/lib/x"},
		{"dns", []string{"127.0.0.1:8600"}, `"127.0.0.1:8600"`, func(c Config) any { return c.DNS.Addr }, "127.0.0.1:8600"},
		{"dns-domain", []string{"example."}, `"example."`, func(c Config) any { return c.DNS.Domain }, "example."},
		{"recursor", []string{"1.1.1.1:53", "8.8.8.8:53"}, `["1.1.1.1:53", "8.8.8.8:53"]`, func(c Config) any { return c.DNS.Recursors }, []string{"1.1.1.1:53", "8.8.8.8:53"}},
		{"admin", []string{"127.0.0.1:19100"}, `"127.0.0.1:19100"`, func(c Config) any { return c.Admin }, "127.0.0.1:19100"},
		{"admin-token", []string{"adm"}, `"adm"`, func(c Config) any { return c.AdminToken }, "adm"},
		{"upstream", []string{"users=127.0.0.1:9191", "db=127.0.0.1:5432/tcp,lb=rr"}, `["users=127.0.0.1:9191", "db=127.0.0.1:5432/tcp,lb=rr"]`,
			func(c Config) any { return c.Proxy.Upstreams },
			[]proxy.Upstream{{Name: "users", Addr: "127.0.0.1:9191", Protocol: proxy.ProtoHTTP}, {Name: "db", Addr: "127.0.0.1:5432", Protocol: proxy.ProtoTCP, Balancer: proxy.RoundRobin}}},
		{"http-proxy", []string{"127.0.0.1:15001"}, `"127.0.0.1:15001"`, func(c Config) any { return c.Proxy.HTTPProxyAddr }, "127.0.0.1:15001"},
		{"gateway", []string{"127.0.0.1:8080"}, `"127.0.0.1:8080"`, func(c Config) any { return c.Gateway.Addr }, "127.0.0.1:8080"},
		{"gateway-tls", []string{"127.0.0.1:8443"}, `"127.0.0.1:8443"`, func(c Config) any { return c.Gateway.TLSAddr }, "127.0.0.1:8443"},
		{"routes-prefix", []string{"team/"}, `"team/"`, func(c Config) any { return c.Gateway.Prefix }, "team/"},
		{"service", []string{"a.hcl", "b.hcl"}, `["a.hcl", "b.hcl"]`, func(c Config) any { return c.ServiceFiles }, []string{"a.hcl", "b.hcl"}},
		{"watch", []string{"all"}, `"all"`, func(c Config) any { return c.Catalog.Mode }, catalog.ModeAll},
		{"watch-service", []string{"users", "db"}, `["users", "db"]`, func(c Config) any { return c.Catalog.Services }, []string{"users", "db"}},
		{"watch-idle", []string{"3m"}, `"3m"`, func(c Config) any { return c.Catalog.IdleTimeout }, 3 * time.Minute},
		{"watch-streaming", []string{"true"}, `true`, func(c Config) any { return c.Catalog.Streaming }, true},
		{"stale", []string{"true"}, `true`, func(c Config) any { return c.Catalog.Stale }, true},
		{"max-stale", []string{"4s"}, `"4s"`, func(c Config) any { return c.Catalog.MaxStale }, 4 * time.Second},
		{"warning", []string{"true"}, `true`, func(c Config) any { return c.Catalog.IncludeWarning }, true},
		{"dns-ttl", []string{"7s"}, `"7s"`, func(c Config) any { return c.DNS.DefaultServiceTTL }, 7 * time.Second},
		{"dns-node-ttl", []string{"8s"}, `"8s"`, func(c Config) any { return c.DNS.NodeTTL }, 8 * time.Second},
		{"dns-negative-ttl", []string{"9s"}, `"9s"`, func(c Config) any { return c.DNS.NegativeTTL }, 9 * time.Second},
		{"dns-nearest", []string{"true"}, `true`, func(c Config) any { return c.DNS.Nearest }, true},
		{"dns-ejections", []string{"false"}, `false`, func(c Config) any { return c.DNS.HonourEjections }, false},
		{"dns-service-ttl", nil, `{ "Users" = "3s", "db*" = "1s" }`, func(c Config) any { return c.DNS.ServiceTTL }, map[string]time.Duration{"users": 3 * time.Second, "db*": time.Second}},
		{"dns-rate-limit", []string{"50.5"}, `50.5`, func(c Config) any { return c.DNS.RateLimit }, 50.5},
		{"dns-rate-burst", []string{"200"}, `200`, func(c Config) any { return c.DNS.RateBurst }, 200},
		{"lb", []string{"round-robin"}, `"round-robin"`, func(c Config) any { return c.Proxy.Balancer }, proxy.RoundRobin},
		{"try-timeout", []string{"1500ms"}, `"1500ms"`, func(c Config) any { return c.Proxy.TryTimeout }, 1500 * time.Millisecond},
		{"request-timeout", []string{"20s"}, `"20s"`, func(c Config) any { return c.Proxy.RequestTimeout }, 20 * time.Second},
		{"retries", []string{"3"}, `3`, func(c Config) any { return [2]any{c.Proxy.MaxRetries, c.Proxy.NoRetries} }, [2]any{3, false}},
		{"client-idle-timeout", []string{"90s"}, `"90s"`, func(c Config) any { return c.Proxy.IdleTimeout }, 90 * time.Second},
		{"header-timeout", []string{"4s"}, `"4s"`, func(c Config) any { return c.Proxy.HeaderTimeout }, 4 * time.Second},
		{"body-timeout", []string{"6s"}, `"6s"`, func(c Config) any { return c.Proxy.BodyTimeout }, 6 * time.Second},
		{"max-client-conns", []string{"100"}, `100`, func(c Config) any { return c.Proxy.MaxClientConns }, 100},
		{"drain-timeout", []string{"30s"}, `"30s"`, func(c Config) any { return c.Proxy.ShutdownGraceTime }, 30 * time.Second},
		{"access-log", []string{"off"}, `"off"`, func(c Config) any { return c.AccessLog }, "off"},
		{"access-log-all", []string{"true"}, `true`, func(c Config) any { return c.Proxy.AccessLogAll }, true},
		{"access-log-sample", []string{"0.25"}, `0.25`, func(c Config) any { return c.Proxy.AccessLogSample }, 0.25},
		{"eject-after", []string{"9"}, `9`, func(c Config) any { return [2]any{c.Breaker.ConsecutiveFailures, c.Breaker.NoEjection} }, [2]any{9, false}},
		{"eject-time", []string{"45s"}, `"45s"`, func(c Config) any { return c.Breaker.BaseEjectionTime }, 45 * time.Second},
		{"slow-call", []string{"3s"}, `"3s"`, func(c Config) any { return c.Breaker.SlowCallDuration }, 3 * time.Second},
		{"max-requests", []string{"64"}, `64`, func(c Config) any { return [2]any{c.Breaker.MaxRequests, c.Breaker.NoRequestLimit} }, [2]any{64, false}},
		{"log-level", []string{"debug"}, `"debug"`, func(c Config) any { return c.LogLevel }, "debug"},
		{"log-json", []string{"true"}, `true`, func(c Config) any { return c.LogJSON }, true},
		{"print-config", []string{"true"}, "", func(c Config) any { return c.PrintConfig }, true},

		// The spellings of "none", and aliases.
		{"retries", []string{"-1"}, `-1`, func(c Config) any { return c.Proxy.NoRetries }, true},
		{"retries", []string{"0"}, `0`, func(c Config) any { return c.Proxy.NoRetries }, true},
		{"retries", []string{"20"}, `20`, func(c Config) any { return c.Proxy.MaxRetries }, proxy.MostRetries},
		{"eject-after", []string{"-1"}, `-1`, func(c Config) any { return c.Breaker.NoEjection }, true},
		{"eject-after", []string{"0"}, `0`, func(c Config) any { return c.Breaker.NoEjection }, true},
		{"max-requests", []string{"-1"}, `-1`, func(c Config) any { return c.Breaker.NoRequestLimit }, true},
		{"max-requests", []string{"0"}, `0`, func(c Config) any { return c.Breaker.NoRequestLimit }, true},
		{"lb", []string{"rr"}, `"rr"`, func(c Config) any { return c.Proxy.Balancer }, proxy.RoundRobin},
	}
	covered := map[string]bool{"config": true}
	dir := t.TempDir()
	for _, tt := range tests {
		covered[tt.flag] = true
		if tt.args != nil {
			var args []string
			for _, v := range tt.args {
				args = append(args, "-"+tt.flag+"="+v)
			}
			if tt.flag == "watch" && tt.want == catalog.ModeList {
				args = append(args, "-watch-service", "x")
			}
			c, err := ParseArgs(args, DefaultConfig(noEnv), io.Discard)
			if err != nil {
				t.Errorf("%v: %v", args, err)
			} else if got := tt.got(c); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("%v: got %#v, want %#v", args, got, tt.want)
			}
		}
		if tt.hcl != "" {
			attr := strings.ReplaceAll(tt.flag, "-", "_")
			p := filepath.Join(dir, attr+".hcl")
			if err := os.WriteFile(p, []byte(attr+" = "+tt.hcl+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			c, err := ParseArgs([]string{"-config", p}, DefaultConfig(noEnv), io.Discard)
			if err != nil {
				t.Errorf("%s = %s: %v", attr, tt.hcl, err)
			} else if got := tt.got(c); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("%s = %s: got %#v, want %#v", attr, tt.hcl, got, tt.want)
			}
		}
	}
	var file string
	c := DefaultConfig(noEnv)
	c.flags("attache sidecar", &file).VisitAll(func(f *flag.Flag) {
		if !covered[f.Name] {
			t.Errorf("flag -%s has no row in this test", f.Name)
		}
	})
	for _, a := range fileSchema().Attributes {
		if !covered[strings.ReplaceAll(a.Name, "_", "-")] {
			t.Errorf("attribute %s has no row in this test", a.Name)
		}
	}
}
