package sidecar

import (
	"embed"
	"html/template"
	"net"
	"net/http"
	"sort"
	"strconv"
	"time"

	dto "github.com/prometheus/client_model/go"

	"attache/sidecar/breaker"
	"attache/sidecar/gateway"
)

//go:embed web/status.html
var webFS embed.FS

var statusTmpl = template.Must(template.New("status.html").Funcs(template.FuncMap{
	"age": func(d time.Duration) string { return d.Round(time.Second).String() },
	"pct": func(f float64) float64 { return 100 * f },
	"val": func(f *float64) float64 { return *f },
	"ts": func(t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		return t.UTC().Format(time.RFC3339)
	},
}).ParseFS(webFS, "web/status.html"))

// statusPage is what `/` on the admin address shows. Every number on it
// comes from /metrics (the proxy and DNS counters, read back from the
// registry) or a /v1/... endpoint (the view, the breakers, the routes).
type statusPage struct {
	Node, Admin string
	Now         time.Time
	Ready       bool
	Reasons     []string
	Catalog     struct {
		Connected bool
		Address   string
		LastError string
		Contact   time.Time
		Age       time.Duration
		Stale     bool
		Version   uint64
	}
	Services  []serviceRow
	Breakers  []breaker.ServiceState
	Listeners []listenerRow
	Upstreams []countRow
	Gateway   *gateway.RoutesView
	DNS       *countRow
	Window    float64                           // seconds the rates are over (a minute, less just after start)
	DNSQPS    *float64                          // DNS queries/s over the window
	AccessLog *struct{ Lines, Dropped float64 } // nil without an access log
}

type serviceRow struct {
	Name      string
	Instances []instanceRow
}

type instanceRow struct {
	ID, Node, Addr, Health string
	Ejected                bool
}

type listenerRow struct {
	Kind, Name, Addr string
	Conns            float64 // attache_proxy_client_connections
}

// countRow is one counter family's total and errors for one label value.
type countRow struct {
	Name          string
	Total, Errors float64
	ByClass       []classCount
	Rate          *upstreamStats // the last minute's (/v1/stats); nil: none yet
	classes       map[string]float64
}

type classCount struct {
	Class string
	N     float64
}

func (s *Sidecar) statusPage(w http.ResponseWriter, r *http.Request) {
	p := statusPage{Node: s.cfg.Node, Admin: s.cfg.Admin, Now: time.Now().UTC()}
	cfg := s.Config() // with what reloads changed
	p.Reasons = s.notReady()
	p.Ready = len(p.Reasons) == 0
	st := s.watcher.Status()
	c := &p.Catalog
	c.Connected, c.Address, c.LastError, c.Contact, c.Stale, c.Version = st.Connected, st.Address, st.LastError, st.LastContact, st.Stale, st.Version
	c.Age = st.DataAge
	if snap := s.watcher.Load(); snap != nil {
		for _, svc := range snap.Services {
			row := serviceRow{Name: svc.Name}
			for _, in := range svc.Instances {
				row.Instances = append(row.Instances, instanceRow{ID: in.ID, Node: in.Node, Health: in.Status,
					Addr: addrPort(in.Address, in.Port), Ejected: s.breakers.Ejected(svc.Name, in.ID)})
			}
			p.Services = append(p.Services, row)
		}
		sort.Slice(p.Services, func(i, j int) bool { return p.Services[i].Name < p.Services[j].Name })
	}
	p.Breakers = s.breakers.State()
	if s.gateway != nil {
		v := s.gateway.View()
		p.Gateway = &v
	}

	fams, _ := s.metrics.Gather()
	byName := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		byName[f.GetName()] = f
	}
	conns := map[string]float64{}
	for _, m := range byName["attache_proxy_client_connections"].GetMetric() {
		conns[label(m, "listener")] = m.GetGauge().GetValue()
	}
	for _, up := range cfg.Proxy.Upstreams {
		p.Listeners = append(p.Listeners, listenerRow{Kind: "upstream " + up.Protocol, Name: up.Name, Addr: up.Addr, Conns: conns[up.Name]})
	}
	if cfg.Proxy.HTTPProxyAddr != "" {
		p.Listeners = append(p.Listeners, listenerRow{Kind: "http proxy", Name: "http-proxy", Addr: cfg.Proxy.HTTPProxyAddr, Conns: conns["http-proxy"]})
	}
	if cfg.Gateway.Addr != "" {
		p.Listeners = append(p.Listeners, listenerRow{Kind: "gateway", Name: "gateway-http", Addr: cfg.Gateway.Addr, Conns: conns["gateway-http"]})
	}
	if cfg.Gateway.TLSAddr != "" {
		p.Listeners = append(p.Listeners, listenerRow{Kind: "gateway (TLS)", Name: "gateway-https", Addr: cfg.Gateway.TLSAddr, Conns: conns["gateway-https"]})
	}
	if cfg.DNS.Addr != "" {
		p.Listeners = append(p.Listeners, listenerRow{Kind: "dns", Name: "dns", Addr: cfg.DNS.Addr})
	}
	// attache_proxy_requests_total{upstream, result}: errors are the
	// answers the proxy could not get (5xx, error, breaker_open, ...).
	ups := map[string]*countRow{}
	for _, m := range byName["attache_proxy_requests_total"].GetMetric() {
		name, class := label(m, "upstream"), label(m, "result")
		add(ups, name, class, m.GetCounter().GetValue(), isErrorClass(class))
	}
	p.Upstreams = rows(ups)
	rates := s.stats.stats(s.dns != nil)
	p.Window, p.DNSQPS = rates.WindowSeconds, rates.DNSQPS
	for i := range p.Upstreams {
		for j := range rates.Upstreams {
			if rates.Upstreams[j].Name == p.Upstreams[i].Name {
				p.Upstreams[i].Rate = &rates.Upstreams[j]
			}
		}
	}
	if f := byName["attache_proxy_access_log_lines_total"]; f != nil {
		p.AccessLog = &struct{ Lines, Dropped float64 }{}
		for _, m := range f.GetMetric() {
			p.AccessLog.Lines += m.GetCounter().GetValue()
		}
		for _, m := range byName["attache_proxy_access_log_dropped_total"].GetMetric() {
			p.AccessLog.Dropped += m.GetCounter().GetValue()
		}
	}
	if s.dns != nil {
		d := map[string]*countRow{}
		for _, m := range byName["attache_dns_queries_total"].GetMetric() {
			rc := label(m, "rcode")
			add(d, "dns", rc, m.GetCounter().GetValue(), rc == "SERVFAIL")
		}
		if rs := rows(d); len(rs) == 1 {
			p.DNS = &rs[0]
		} else {
			p.DNS = &countRow{Name: "dns"}
		}
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if err := statusTmpl.Execute(w, &p); err != nil {
		s.log.Warn("status page", "error", err)
	}
}

func add(rows map[string]*countRow, name, class string, v float64, isErr bool) {
	r := rows[name]
	if r == nil {
		r = &countRow{Name: name, classes: map[string]float64{}}
		rows[name] = r
	}
	r.Total += v
	if isErr {
		r.Errors += v
	}
	r.classes[class] += v
}

func rows(m map[string]*countRow) []countRow {
	var out []countRow
	for _, r := range m {
		for c, n := range r.classes {
			if n > 0 {
				r.ByClass = append(r.ByClass, classCount{c, n})
			}
		}
		sort.Slice(r.ByClass, func(i, j int) bool { return r.ByClass[i].Class < r.ByClass[j].Class })
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func addrPort(host string, port int) string {
	return net.JoinHostPort(host, strconv.Itoa(port))
}
