package catalog

import "github.com/hashicorp/consul/api"

// Client returns the consul/api client the watcher uses for its i-th Consul
// address (with the same token and TLS settings), for other talk to that
// agent such as registration.
func (w *Watcher) Client(i int) (*api.Client, error) {
	return w.clients[i%len(w.clients)], nil
}
