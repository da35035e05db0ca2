// Command gateway measures how long a route document takes from its write
// to the Consul KV store (a routes.Version and the current pointer, in one
// transaction, as the control service writes them) until every gateway has
// applied it (routes/applied/<node> holds the version). It prints
// "apply p50_ms p99_ms max_ms count".
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"attache/control/routes"
)

func main() {
	addr := flag.String("consul", "127.0.0.1:8500", "Consul HTTP address")
	prefix := flag.String("prefix", "attache/", "KV prefix of the routes")
	nodes := flag.String("nodes", "", "comma-separated gateway node names to wait for")
	docFile := flag.String("doc", "", "route document to apply")
	n := flag.Int("n", 50, "applies")
	flag.Parse()
	if err := run(*addr, *prefix, strings.Split(*nodes, ","), *docFile, *n); err != nil {
		fmt.Fprintln(os.Stderr, "bench gateway:", err)
		os.Exit(1)
	}
}

func run(addr, prefix string, nodes []string, docFile string, n int) error {
	doc, err := os.ReadFile(docFile)
	if err != nil {
		return err
	}
	c, err := api.NewClient(&api.Config{Address: addr})
	if err != nil {
		return err
	}
	kv := c.KV()
	v := uint64(time.Now().Unix()) // above any version an earlier run wrote
	var took []time.Duration
	for i := 0; i < n; i++ {
		v++
		val, _ := json.Marshal(routes.Version{Number: v, Created: time.Now().UTC(), Source: "bench", Document: string(doc)})
		ops := api.TxnOps{
			&api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: fmt.Sprintf("%sroutes/versions/%d", prefix, v), Value: val}},
			&api.TxnOp{KV: &api.KVTxnOp{Verb: api.KVSet, Key: prefix + "routes/current", Value: []byte(strconv.FormatUint(v, 10))}},
		}
		start := time.Now()
		ok, resp, _, err := c.Txn().Txn(ops, nil)
		if err != nil || !ok {
			return fmt.Errorf("apply %d: %v %v", v, err, resp)
		}
		var index uint64
		for {
			pairs, meta, err := kv.List(prefix+"routes/applied/", &api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second})
			if err != nil {
				return err
			}
			index = meta.LastIndex
			if all(pairs, prefix, nodes, v) {
				break
			}
			if time.Since(start) > 30*time.Second {
				return fmt.Errorf("version %d not applied by every gateway within 30 s", v)
			}
		}
		took = append(took, time.Since(start))
		time.Sleep(20 * time.Millisecond)
	}
	sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	p := func(q float64) time.Duration { return took[min(int(q*float64(len(took))), len(took)-1)] }
	fmt.Printf("apply %.1f %.1f %.1f %d\n", ms(p(0.5)), ms(p(0.99)), ms(took[len(took)-1]), len(took))
	return nil
}

func all(pairs api.KVPairs, prefix string, nodes []string, v uint64) bool {
	got := map[string]uint64{}
	for _, p := range pairs {
		var a routes.Applied
		if json.Unmarshal(p.Value, &a) == nil {
			got[strings.TrimPrefix(p.Key, prefix+"routes/applied/")] = a.Version
		}
	}
	for _, n := range nodes {
		if got[n] != v {
			return false
		}
	}
	return true
}
