package sidecar

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func noEnv(string) string { return "" }

func TestParseArgs(t *testing.T) {
	dir := t.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := file("good.hcl", "dns = \"127.0.0.1:8653\"\nconsul = [\"127.0.0.1:8500\", \"127.0.0.2:8500\"]\nupstream = [\"users=127.0.0.1:9191\"]\nmax_stale = \"2s\"\n")
	badAttr := file("bad.hcl", "dns = \"127.0.0.1:8653\"\nbogus = 1\n")
	badSyntax := file("syntax.hcl", "dns = \n")
	badDur := file("dur.hcl", "max_stale = \"soon\"\n")
	gw := file("gw.hcl", "gateway = \"127.0.0.30:8080\"\ngateway_tls = \"127.0.0.30:8443\"\nroutes_prefix = \"team/\"\n")
	fb := file("fb.hcl", "fallback \"inventory\" {\n  body = \"Stock status unavailable\"\n  content_type = \"text/plain\"\n  on = [\"breaker-open\", \"timeout\"]\n}\n")
	drain := file("drain.hcl", "drain_timeout = \"30s\"\n")
	svcTTL := file("svcttl.hcl", "dns_service_ttl = { \"Users\" = \"-1s\" }\n")
	badCause := file("cause.hcl", "fallback \"inventory\" {\n  on = [\"sometimes\"]\n}\n")
	ups := file("ups.hcl", `upstream = ["db=127.0.0.1:5432/tcp"]
upstream "Users" {
  listen          = "127.0.0.1:9192"
  lb              = "rr"
  try_timeout     = "1s"
  request_timeout = "3s"
  retries         = -1
  eject_after     = 3
  eject_time      = "10s"
  slow_call       = "500ms"
  max_requests    = 100
  failure_rate    = 0
  window          = "20s"
  open_time       = "5s"
}
upstream "inventory" {
  retries = 1
}
`)
	upsBad := file("upsbad.hcl", "upstream \"users\" {\n  retries = 1\n}\n\nupstream \"inventory\" {\n  retries = 20\n}\n")
	upsDur := file("upsdur.hcl", "upstream \"users\" {\n  try_timeout = \"soon\"\n}\n")
	upsTwice := file("upstwice.hcl", "upstream = [\"users=127.0.0.1:9191\"]\nupstream \"users\" {\n  listen = \"127.0.0.1:9192\"\n}\n")
	upsLB := file("upslb.hcl", "upstream \"users\" {\n  lb = \"random\"\n}\n")
	upsAttr := file("upsattr.hcl", "upstream \"users\" {\n  timeout = \"1s\"\n}\n")

	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
		check   func(t *testing.T, c Config)
	}{
		{name: "defaults", check: func(t *testing.T, c Config) {
			if c.Admin != "127.0.0.1:19001" || c.Catalog.Addresses[0] != "127.0.0.1:8500" || c.DNS.Domain != "consul." {
				t.Errorf("defaults: %+v", c)
			}
		}},
		{name: "env", env: map[string]string{"CONSUL_HTTP_ADDR": "127.0.0.9:8500", "CONSUL_HTTP_TOKEN": "s3cret"}, check: func(t *testing.T, c Config) {
			if c.Catalog.Addresses[0] != "127.0.0.9:8500" || c.Catalog.Token != "s3cret" {
				t.Errorf("env not applied: %+v", c)
			}
		}},
		{name: "repeatable flag replaces default", args: []string{"-consul", "127.0.0.2:8500", "-consul", "127.0.0.3:8500"}, check: func(t *testing.T, c Config) {
			if strings.Join(c.Catalog.Addresses, ",") != "127.0.0.2:8500,127.0.0.3:8500" {
				t.Errorf("consul = %v", c.Catalog.Addresses)
			}
		}},
		{name: "file", args: []string{"-config", good}, check: func(t *testing.T, c Config) {
			if c.DNS.Addr != "127.0.0.1:8653" || len(c.Catalog.Addresses) != 2 || upstreamString(c.Proxy.Upstreams[0]) != "users=127.0.0.1:9191" || c.Catalog.MaxStale.String() != "2s" {
				t.Errorf("file not applied: %+v", c)
			}
		}},
		{name: "flag wins over file", args: []string{"-config", good, "-dns", "127.0.0.1:9999"}, check: func(t *testing.T, c Config) {
			if c.DNS.Addr != "127.0.0.1:9999" {
				t.Errorf("dns = %q", c.DNS.Addr)
			}
		}},
		{name: "DNS rate limit", args: []string{"-dns-rate-limit", "50", "-dns-rate-burst", "200"}, check: func(t *testing.T, c Config) {
			if c.DNS.RateLimit != 50 || c.DNS.RateBurst != 200 {
				t.Errorf("rate limit %v burst %d", c.DNS.RateLimit, c.DNS.RateBurst)
			}
		}},
		{name: "negative DNS TTL", args: []string{"-dns-ttl", "-1s"}, wantErr: "must not be negative"},
		{name: "negative DNS rate limit", args: []string{"-dns-rate-limit", "-1"}, wantErr: "-dns-rate-limit -1: must not be negative (0: no limit)"},
		{name: "bad balancer", args: []string{"-lb", "random"}, wantErr: `-lb "random": proxy: unknown balancer`},
		{name: "negative service TTL names the attribute", args: []string{"-config", svcTTL}, wantErr: `dns_service_ttl ["users"] -1s: must not be negative`},
		{name: "flag without value", args: []string{"-dns"}, wantErr: "flag needs an argument: -dns"},
		{name: "unknown flag", args: []string{"-frob"}, wantErr: "flag provided but not defined: -frob"},
		{name: "stray argument", args: []string{"users"}, wantErr: `unexpected argument "users"`},
		{name: "bad address", args: []string{"-dns", "8653"}, wantErr: `-dns "8653": want HOST:PORT`},
		{name: "bad watch", args: []string{"-watch", "some"}, wantErr: `-watch "some"`},
		{name: "watch list needs services", args: []string{"-watch", "list"}, wantErr: "-watch-service none: the list mode"},
		{name: "missing file", args: []string{"-config", filepath.Join(dir, "nope.hcl")}, wantErr: "no such file"},
		{name: "unknown attribute names file and line", args: []string{"-config", badAttr}, wantErr: "bad.hcl:2,1: Unsupported argument"},
		{name: "syntax error names file and line", args: []string{"-config", badSyntax}, wantErr: "syntax.hcl:1,"},
		{name: "bad duration names file and line", args: []string{"-config", badDur}, wantErr: "dur.hcl:1,1: max_stale"},

		{name: "upstream blocks", args: []string{"-config", ups}, check: func(t *testing.T, c Config) {
			if strings.Join(upstreamStrings(c.Proxy.Upstreams), " ") != "db=127.0.0.1:5432/tcp users=127.0.0.1:9192" {
				t.Errorf("upstream listeners %v", c.Proxy.Upstreams)
			}
			u := c.UpstreamSettings["users"]
			if u.Listen != "127.0.0.1:9192" || u.Balancer != "rr" || u.TryTimeout != time.Second || u.ReqTimeout != 3*time.Second ||
				*u.Retries != -1 || *u.EjectAfter != 3 || u.EjectTime != 10*time.Second || u.SlowCall != 500*time.Millisecond ||
				*u.MaxRequests != 100 || *u.FailureRate != 0 || u.Window != 20*time.Second || u.OpenTime != 5*time.Second {
				t.Errorf("users: %+v", u)
			}
			if inv := c.UpstreamSettings["inventory"]; *inv.Retries != 1 || inv.Listen != "" {
				t.Errorf("inventory: %+v", inv)
			}
		}},
		{name: "upstream flag replaces the file's listeners", args: []string{"-config", ups, "-upstream", "x=127.0.0.1:9300"}, check: func(t *testing.T, c Config) {
			if strings.Join(upstreamStrings(c.Proxy.Upstreams), " ") != "x=127.0.0.1:9300" || c.UpstreamSettings["users"].TryTimeout != time.Second {
				t.Errorf("upstreams %v, settings %v", c.Proxy.Upstreams, c.UpstreamSettings)
			}
		}},
		{name: "upstream block out of range names file and line", args: []string{"-config", upsBad}, wantErr: `upsbad.hcl:5: upstream "inventory": retries 20: want -1 (none) to 10`},
		{name: "upstream block bad duration", args: []string{"-config", upsDur}, wantErr: `upsdur.hcl:1: upstream "users": try_timeout: time: invalid duration`},
		{name: "upstream listener twice", args: []string{"-config", upsTwice}, wantErr: `upstream "users": listen is set, and the upstream list has a listener for it too`},
		{name: "upstream block bad balancer", args: []string{"-config", upsLB}, wantErr: `upslb.hcl:1: upstream "users": lb:`},
		{name: "upstream block unknown attribute", args: []string{"-config", upsAttr}, wantErr: `upsattr.hcl:2,3: Unsupported argument`},
		{name: "gateway flags", args: []string{"-gateway", "127.0.0.30:8080", "-gateway-tls", "127.0.0.30:8443"}, check: func(t *testing.T, c Config) {
			if c.Gateway.Addr != "127.0.0.30:8080" || c.Gateway.TLSAddr != "127.0.0.30:8443" || c.Gateway.Prefix != "attache/" {
				t.Errorf("gateway flags: %q %q %q", c.Gateway.Addr, c.Gateway.TLSAddr, c.Gateway.Prefix)
			}
		}},
		{name: "gateway file", args: []string{"-config", gw}, check: func(t *testing.T, c Config) {
			if c.Gateway.Addr != "127.0.0.30:8080" || c.Gateway.TLSAddr != "127.0.0.30:8443" || c.Gateway.Prefix != "team/" {
				t.Errorf("gateway file: %q %q %q", c.Gateway.Addr, c.Gateway.TLSAddr, c.Gateway.Prefix)
			}
		}},
		{name: "bad gateway address", args: []string{"-gateway", "8080"}, wantErr: `-gateway "8080": want HOST:PORT`},
		{name: "fallback", args: []string{"-config", fb}, check: func(t *testing.T, c Config) {
			f := c.Proxy.Fallbacks["inventory"]
			if f.Status != 200 || f.Body != "Stock status unavailable" || f.ContentType != "text/plain" || strings.Join(f.On, ",") != "breaker-open,timeout" {
				t.Errorf("fallback = %+v", f)
			}
		}},
		{name: "fallback cause", args: []string{"-config", badCause}, wantErr: `unknown cause "sometimes"`},
		{name: "drain timeout default", check: func(t *testing.T, c Config) {
			if c.Proxy.ShutdownGraceTime != 10*time.Second {
				t.Errorf("drain timeout = %v, want 10s", c.Proxy.ShutdownGraceTime)
			}
		}},
		{name: "drain timeout file", args: []string{"-config", drain}, check: func(t *testing.T, c Config) {
			if c.Proxy.ShutdownGraceTime != 30*time.Second {
				t.Errorf("drain timeout = %v, want 30s", c.Proxy.ShutdownGraceTime)
			}
		}},
		{name: "drain timeout flag", args: []string{"-drain-timeout", "2s"}, check: func(t *testing.T, c Config) {
			if c.Proxy.ShutdownGraceTime != 2*time.Second {
				t.Errorf("drain timeout = %v, want 2s", c.Proxy.ShutdownGraceTime)
			}
		}},
		{name: "access log defaults", check: func(t *testing.T, c Config) {
			if c.AccessLog != "stdout" || c.Proxy.AccessLogAll || c.Proxy.AccessLogSample != 1 {
				t.Errorf("access log %q all %v sample %v", c.AccessLog, c.Proxy.AccessLogAll, c.Proxy.AccessLogSample)
			}
		}},
		{name: "access log flags", args: []string{"-access-log", "/tmp/x.log", "-access-log-all", "-access-log-sample", "0.25"}, check: func(t *testing.T, c Config) {
			if c.AccessLog != "/tmp/x.log" || !c.Proxy.AccessLogAll || c.Proxy.AccessLogSample != 0.25 {
				t.Errorf("access log %q all %v sample %v", c.AccessLog, c.Proxy.AccessLogAll, c.Proxy.AccessLogSample)
			}
		}},
		{name: "access log sample above 1", args: []string{"-access-log-sample", "2"}, wantErr: "-access-log-sample 2: want a fraction"},
		{name: "drain timeout zero", args: []string{"-drain-timeout", "0s"}, wantErr: "-drain-timeout must be positive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := func(k string) string { return tt.env[k] }
			c, err := ParseArgs(tt.args, DefaultConfig(env), &strings.Builder{})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
}

func TestParseServices(t *testing.T) {
	tests := []struct {
		name, src, wantErr string
		wantIDs            []string
	}{
		{name: "two services", src: `
service {
  name = "users"
  id   = "users-1"
  port = 8081
  tags = ["v1"]
  meta = { version = "1" }
  weight = 3
  check {
    http     = "http://127.0.0.1:8081/health"
    interval = "1s"
  }
}
service {
  name = "inventory"
  port = 8082
  check { tcp = "127.0.0.1:8082" }
}`, wantIDs: []string{"users-1", "inventory"}},
		{name: "no service", src: `# nothing`, wantErr: "no service block"},
		{name: "missing port", src: `service { name = "x" }`, wantErr: `svc.hcl:1,11: Missing required argument: The argument "port" is required`},
		{name: "bad port", src: `service {
  name = "x"
  port = 70000
}`, wantErr: "port 70000 is not a TCP port"},
		{name: "check without kind", src: `service {
  name = "x"
  port = 1
  check { interval = "1s" }
}`, wantErr: `needs http = "http://ADDR/health"`},
		{name: "bad interval", src: `service {
  name = "x"
  port = 1
  check {
    tcp      = "127.0.0.1:1"
    interval = "often"
  }
}`, wantErr: `interval "often"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			regs, err := parseServices("svc.hcl", []byte(tt.src))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var ids []string
			for _, r := range regs {
				ids = append(ids, r.ID)
			}
			if strings.Join(ids, ",") != strings.Join(tt.wantIDs, ",") {
				t.Fatalf("ids = %v, want %v", ids, tt.wantIDs)
			}
		})
	}
}

// FuzzConfigFile feeds arbitrary bytes to the config and service file parsers:
// they must return an error or a value, never panic.
func FuzzConfigFile(f *testing.F) {
	f.Add([]byte("dns = \"127.0.0.1:8653\"\nconsul = [\"a:1\"]\n"))
	f.Add([]byte("service {\n name = \"x\"\n port = 1\n check { http = \"http://x\" }\n}\n"))
	f.Add([]byte("max_stale = \"1s\"\nwatch = \"all\"\n"))
	f.Fuzz(func(t *testing.T, src []byte) {
		c := DefaultConfig(noEnv)
		_ = c.decodeHCL("fuzz.hcl", src)
		_, _ = parseServices("fuzz.hcl", src)
	})
}
