package proxy

import (
	"strings"
	"testing"
)

func TestParseUpstream(t *testing.T) {
	tests := []struct {
		in      string
		want    Upstream
		wantErr string
	}{
		{in: "inventory=127.0.0.1:9191", want: Upstream{Name: "inventory", Addr: "127.0.0.1:9191", Protocol: ProtoHTTP}},
		{in: "Inventory=127.0.0.1:9191/tcp", want: Upstream{Name: "inventory", Addr: "127.0.0.1:9191", Protocol: ProtoTCP}},
		{in: "grpc-svc=127.0.0.1:9000/h2c", want: Upstream{Name: "grpc-svc", Addr: "127.0.0.1:9000", Protocol: ProtoHTTP2}},
		{in: "users=[::1]:9191,lb=rr", want: Upstream{Name: "users", Addr: "[::1]:9191", Protocol: ProtoHTTP, Balancer: RoundRobin}},
		{in: "users=localhost:0/http,lb=nearest", want: Upstream{Name: "users", Addr: "localhost:0", Protocol: ProtoHTTP, Balancer: Nearest}},
		{in: "inventory", wantErr: "missing '='"},
		{in: "=127.0.0.1:1", wantErr: "empty service name"},
		{in: "inv entory=127.0.0.1:1", wantErr: "character"},
		{in: "inventory=", wantErr: "empty address"},
		{in: "inventory=127.0.0.1", wantErr: "missing port"},
		{in: "inventory=:9191", wantErr: "no host"},
		{in: "inventory=example.org:80", wantErr: "IP address or localhost"},
		{in: "inventory=127.0.0.1:99999", wantErr: "port must be"},
		{in: "inventory=127.0.0.1:http", wantErr: "port must be"},
		{in: "inventory=127.0.0.1:80/udp", wantErr: "unknown protocol"},
		{in: "inventory=127.0.0.1:80,lb=fastest", wantErr: "unknown balancer"},
		{in: "inventory=127.0.0.1:80,color=red", wantErr: "unknown option"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseUpstream(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tc.wantErr)
				}
				if !strings.Contains(err.Error(), "NAME=HOST:PORT") {
					t.Fatalf("error %q does not say what is expected", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			again, err := ParseUpstream(got.String())
			if err != nil || again != got {
				t.Fatalf("String() %q does not round-trip: %+v %v", got.String(), again, err)
			}
		})
	}
}

func FuzzParseUpstream(f *testing.F) {
	for _, s := range []string{"inventory=127.0.0.1:9191", "db=[::1]:5432/tcp,lb=rr", "a=b", "=", "x=1.2.3.4:5/http2,lb=weighted,lb=nearest"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseUpstream(s)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "proxy: bad upstream") {
				t.Fatalf("error without context: %v", err)
			}
			return
		}
		if checkServiceName(u.Name) != nil || checkListenAddr(u.Addr) != nil {
			t.Fatalf("accepted bad upstream %+v from %q", u, s)
		}
		again, err := ParseUpstream(u.String())
		if err != nil || again != u {
			t.Fatalf("round trip of %q: %+v %v", u.String(), again, err)
		}
	})
}

func TestServiceFromHost(t *testing.T) {
	tests := []struct {
		host, want string
		ok         bool
	}{
		{"inventory", "inventory", true},
		{"Inventory:8080", "inventory", true},
		{"inventory.service.consul", "inventory", true},
		{"inventory.service.consul.", "inventory", true},
		{"inventory.service.dc1.consul", "inventory", true},
		{"inventory.service.consul:80", "inventory", true},
		{"v1.inventory.service.consul", "", false},
		{"inventory.node.consul", "", false},
		{"example.org", "", false},
		{"127.0.0.1:9191", "", false},
		{"[::1]:80", "", false},
		{"", "", false},
		{"in ventory", "", false},
	}
	for _, tc := range tests {
		got, ok := serviceFromHost(tc.host, "consul")
		if got != tc.want || ok != tc.ok {
			t.Errorf("serviceFromHost(%q) = %q, %v; want %q, %v", tc.host, got, ok, tc.want, tc.ok)
		}
	}
}

func FuzzServiceFromHost(f *testing.F) {
	for _, s := range []string{"inventory", "a.service.consul", "x.service.dc.consul:1", "[::1]:1", "..."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		name, ok := serviceFromHost(s, "consul")
		if ok && checkServiceName(name) != nil {
			t.Fatalf("%q gave bad name %q", s, name)
		}
	})
}
