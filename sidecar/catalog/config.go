package catalog

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/hashicorp/go-hclog"
	"github.com/prometheus/client_golang/prometheus"

	"attache/internal/fielderr"
)

// Mode says which services the watcher follows.
type Mode string

const (
	// ModeOnDemand watches the services named in Config.Services from the
	// start, and any other service the first time Want asks for it; a watch
	// that nobody asked for during Config.IdleTimeout stops. The default.
	ModeOnDemand Mode = "on-demand"
	// ModeAll watches every service in the catalog.
	ModeAll Mode = "all"
	// ModeList watches exactly the services named in Config.Services.
	ModeList Mode = "list"
)

// ParseMode parses "all", "list" or "on-demand" ("" means on-demand).
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case "":
		return ModeOnDemand, nil
	case ModeAll, ModeList, ModeOnDemand:
		return m, nil
	}
	return "", fmt.Errorf("catalog: unknown watch mode %q (want all, list or on-demand)", s)
}

// Config configures a Watcher. DefaultConfig returns the defaults; ApplyEnv
// fills unset fields from the CONSUL_* environment variables the way the
// consul CLI does. NewWatcher never reads the environment itself.
type Config struct {
	// Addresses of Consul HTTP APIs (host:port or a URL such as
	// https://host:8501); several give failover: on an error the watcher
	// moves on to the next. Default 127.0.0.1:8500.
	Addresses []string
	// Token is the ACL token sent with every query (default none; note that
	// consul/api itself falls back to CONSUL_HTTP_TOKEN when it is empty).
	Token string
	// TokenFile, when set, is read for the token instead (CONSUL_HTTP_TOKEN_FILE).
	TokenFile string
	// TLS configures HTTPS (CA, client certificate and key, server name).
	TLS api.TLSConfig
	// SSL makes addresses given without a scheme use https (CONSUL_HTTP_SSL).
	SSL bool
	// Datacenter to watch; empty means the agent's own.
	Datacenter string
	// Wait is the blocking query's wait time (default 5m; Consul adds up to
	// Wait/16 of jitter and caps it at 10m).
	Wait time.Duration
	// Stale lets any server answer (consistency mode "stale") instead of the
	// leader (the default mode). Fresher reads come from the leader; stale
	// spreads the load over the servers but lags up to a Raft heartbeat.
	Stale bool
	// Streaming leaves near=_agent out of the health queries. A client
	// agent answers blocking /v1/health/service queries from its streaming
	// backend unless near is set; that backend follows whichever server the
	// agent subscribed to, up to a Raft heartbeat (~100ms) behind the
	// leader. The watcher holds no blocking query per service, so this only
	// touches stale mode's catch-up fetches. Default false.
	Streaming bool
	// MaxStale, with Stale, is the largest X-Consul-LastContact accepted
	// from a follower; an answer staler than this is asked again of the
	// leader. 0 accepts any.
	MaxStale time.Duration
	// IncludeWarning keeps instances whose checks are warning (default:
	// passing only).
	IncludeWarning bool
	// Mode selects the services watched (default ModeOnDemand).
	Mode Mode
	// Services is the allow list (ModeList) or the services always watched
	// (ModeOnDemand). Ignored by ModeAll.
	Services []string
	// IdleTimeout stops an on-demand watch nobody asked for in this long
	// (default 10m).
	IdleTimeout time.Duration
	// DataDir keeps the last-known-good snapshot (empty: no disk).
	DataDir string
	// SaveInterval is the least time between two writes of the snapshot to
	// disk (default 3s).
	SaveInterval time.Duration
	// MinInterval rate-limits each loop: after a burst of 4 queries in a
	// row, one query per MinInterval, plus up to a fifth of it as jitter
	// (default 100ms). It never delays delivering an answer, and a loop that
	// is woken rarely is never slowed by it.
	MinInterval time.Duration
	// RetryBase and RetryMax bound the exponential backoff after errors
	// (defaults 250ms and 30s; each wait has jitter).
	RetryBase, RetryMax time.Duration
	// RequestTimeout is how long beyond the blocking wait (Wait + Wait/16)
	// a query may take before it is abandoned as hung; a non-blocking first
	// query gets RequestTimeout alone (default 10s).
	RequestTimeout time.Duration
	// MaxConns bounds the connections to each Consul address, for every
	// query together (blocking ones, fetches, and registration through
	// Client): default 8, at least 6. Four are held by the blocking queries
	// (service list, critical and warning checks, nodes), one is kept for
	// registration and the coordinates, and the rest fetch changed services
	// side by side.
	MaxConns int
	// ProbeInterval: while queries fail, the watcher asks the agent for the
	// Raft leader (a cheap query that no ACL guards) this often, and the
	// moment it answers after failing, every query backing off is retried
	// at once: an agent that was down or cut off is followed again within
	// about ProbeInterval of its answering, however long the backoff had
	// grown (default 500ms; negative disables).
	ProbeInterval time.Duration
	// CoordInterval is the least time between two fetches of the network
	// coordinates (default 10s; negative disables coordinates).
	CoordInterval time.Duration
	// Node is this node's name in Consul, the origin for RTT estimates.
	Node string
	// Logger receives the watcher's logs (named "catalog"); default none.
	Logger hclog.Logger
	// Registerer receives the watcher's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// DefaultConfig returns the defaults documented on Config.
func DefaultConfig() Config {
	return Config{
		Addresses:      []string{"127.0.0.1:8500"},
		Wait:           5 * time.Minute,
		Mode:           ModeOnDemand,
		IdleTimeout:    10 * time.Minute,
		SaveInterval:   3 * time.Second,
		MinInterval:    100 * time.Millisecond,
		RetryBase:      250 * time.Millisecond,
		RetryMax:       30 * time.Second,
		RequestTimeout: 10 * time.Second,
		CoordInterval:  10 * time.Second,
		MaxConns:       8,
		ProbeInterval:  500 * time.Millisecond,
	}
}

// longPolls is how many blocking queries the watcher holds at once.
const longPolls = 4

// minConns is the least MaxConns: the long polls, one fetch, one spare
// for registration.
const minConns = longPolls + 2

// ConfigFromEnv returns DefaultConfig with ApplyEnv(getenv) applied; pass
// os.Getenv.
func ConfigFromEnv(getenv func(string) string) Config {
	c := DefaultConfig()
	c.ApplyEnv(getenv)
	return c
}

// ApplyEnv sets what the CONSUL_* environment variables say, as the consul
// CLI reads them: CONSUL_HTTP_ADDR (replaces the default address; never an
// explicitly configured list), CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE,
// CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY,
// CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY.
// Fields already set (non-empty) are kept. getenv is usually os.Getenv.
func (c *Config) ApplyEnv(getenv func(string) string) {
	if v := getenv("CONSUL_HTTP_ADDR"); v != "" && (len(c.Addresses) == 0 || reflect.DeepEqual(c.Addresses, DefaultConfig().Addresses)) {
		c.Addresses = []string{v}
	}
	if c.Token == "" {
		c.Token = getenv("CONSUL_HTTP_TOKEN")
	}
	if c.Token == "" && c.TokenFile == "" {
		c.TokenFile = getenv("CONSUL_HTTP_TOKEN_FILE")
	}
	set := func(dst *string, env string) {
		if *dst == "" {
			*dst = getenv(env)
		}
	}
	set(&c.TLS.CAFile, "CONSUL_CACERT")
	set(&c.TLS.CAPath, "CONSUL_CAPATH")
	set(&c.TLS.CertFile, "CONSUL_CLIENT_CERT")
	set(&c.TLS.KeyFile, "CONSUL_CLIENT_KEY")
	set(&c.TLS.Address, "CONSUL_TLS_SERVER_NAME")
	if b, ok := envBool(getenv("CONSUL_HTTP_SSL")); ok && b {
		c.SSL = true
	}
	if b, ok := envBool(getenv("CONSUL_HTTP_SSL_VERIFY")); ok && !b {
		c.TLS.InsecureSkipVerify = true
	}
}

func envBool(s string) (bool, bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "1", "t", "true", "yes", "on":
		return true, true
	case "0", "f", "false", "no", "off":
		return false, true
	}
	return false, false
}

// Validate says what is wrong with c, each bad field as a
// *fielderr.Error (zero fields are fine: NewWatcher gives them their
// defaults). NewWatcher calls it.
func (c Config) Validate() error {
	var errs []error
	switch c.Mode {
	case "", ModeOnDemand, ModeAll, ModeList:
	default:
		errs = append(errs, fielderr.New("Mode", "%q: want on-demand, all or list", c.Mode))
	}
	if c.Mode == ModeList && len(c.Services) == 0 {
		errs = append(errs, fielderr.New("Services", "none: the list mode needs at least one service"))
	}
	if c.MaxConns != 0 && c.MaxConns < minConns {
		errs = append(errs, fielderr.New("MaxConns", "%d: too few: the watcher needs at least %d connections to Consul", c.MaxConns, minConns))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("catalog: %w", err)
	}
	return nil
}

func (c *Config) finalize() error {
	if err := c.Validate(); err != nil {
		return err
	}
	d := DefaultConfig()
	if len(c.Addresses) == 0 {
		c.Addresses = d.Addresses
	}
	if c.Wait <= 0 {
		c.Wait = d.Wait
	}
	if c.Mode == "" {
		c.Mode = d.Mode
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = d.IdleTimeout
	}
	if c.SaveInterval <= 0 {
		c.SaveInterval = d.SaveInterval
	}
	if c.MinInterval < 0 {
		c.MinInterval = 0
	}
	if c.RetryBase <= 0 {
		c.RetryBase = d.RetryBase
	}
	if c.RetryMax < c.RetryBase {
		c.RetryMax = max(d.RetryMax, c.RetryBase)
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = d.RequestTimeout
	}
	if c.CoordInterval == 0 {
		c.CoordInterval = d.CoordInterval
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = d.ProbeInterval
	}
	if c.MaxConns == 0 {
		c.MaxConns = d.MaxConns
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return nil
}
