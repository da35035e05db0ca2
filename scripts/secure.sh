# The -secure parts of scripts/up: certificates, ACL bootstrap, tokens.
# Source it after lib.sh (scripts/up does); do not run it. Everything lands
# in .run/secure/ ($SEC): tls/ (the CA, a certificate per agent, a client
# certificate), tokens/ (one file per token, mode 600), acl/ (the policies
# as created), env (for `source`), mode (marks a secure cluster).

SEC=${SEC:-$RUN/secure}
# The HashiCorp environment every client of the secure cluster gets.
CONSUL_TLS_ENV=(CONSUL_CACERT="$SEC/tls/ca.pem" CONSUL_CLIENT_CERT="$SEC/tls/client.pem" CONSUL_CLIENT_KEY="$SEC/tls/client-key.pem")
# Never a token from the caller's environment: each process gets its own
# file, and CONSUL_HTTP_TOKEN would win over it.
unset CONSUL_HTTP_TOKEN

# cert NAME SAN: a key and a certificate signed by the CA, for serving and
# for client authentication.
cert() {
	local name=$1 san=$2 d=$SEC/tls
	[[ -s $d/$name.pem ]] && return 0
	openssl ecparam -name prime256v1 -genkey -noout -out "$d/$name-key.pem" 2>/dev/null
	openssl req -new -key "$d/$name-key.pem" -subj "/CN=$name" -out "$d/$name.csr" 2>/dev/null
	printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' "$san" >"$d/$name.ext"
	openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.pem" -CAkey "$d/ca-key.pem" -CAcreateserial -days 30 -sha256 \
		-extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null || die "openssl: certificate of $name"
	rm -f "$d/$name.csr" "$d/$name.ext"
	chmod 600 "$d/$name-key.pem"
}

# make_certs: the CA and every certificate, once.
make_certs() {
	say "making a CA and certificates (.run/secure/tls/)"
	mkdir -p "$SEC/tls" "$SEC/tokens" "$SEC/acl"
	chmod 700 "$SEC/tokens"
	touch "$SEC/mode"
	if [[ ! -s $SEC/tls/ca.pem ]]; then
		openssl ecparam -name prime256v1 -genkey -noout -out "$SEC/tls/ca-key.pem" 2>/dev/null
		chmod 600 "$SEC/tls/ca-key.pem"
		openssl req -x509 -new -key "$SEC/tls/ca-key.pem" -sha256 -days 30 -subj "/CN=attache local cluster CA" \
			-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
			-out "$SEC/tls/ca.pem" 2>/dev/null || die "openssl: the CA"
	fi
	local s n
	for s in "${SERVERS[@]}"; do cert "${s%%:*}" "IP:${s#*:},IP:127.0.0.1,DNS:server.dc1.consul,DNS:localhost"; done
	for n in "${NODES[@]}"; do cert "${n%%:*}" "IP:${n#*:},IP:127.0.0.1,DNS:client.dc1.consul,DNS:localhost"; done
	cert client "IP:127.0.0.1,DNS:localhost"
	cat >"$SEC/env" <<ENV
# source .run/secure/env: the consul CLI (and consul/api programs) against the secure cluster,
# with the management token.
export CONSUL_HTTP_ADDR=https://127.0.0.11:8501
export CONSUL_CACERT=$SEC/tls/ca.pem
export CONSUL_CLIENT_CERT=$SEC/tls/client.pem
export CONSUL_CLIENT_KEY=$SEC/tls/client-key.pem
export CONSUL_HTTP_TOKEN_FILE=$SEC/tokens/management
unset CONSUL_HTTP_TOKEN
ENV
}

# secure_consul_config NAME: the ACL and TLS settings of an agent's config
# (its ports block gets HTTP_PORTS below).
secure_consul_config() {
	local name=$1
	cat <<HCL
acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true   # agent tokens set by scripts/up survive restarts
}
tls {
  defaults {
    ca_file   = "$SEC/tls/ca.pem"
    cert_file = "$SEC/tls/$name.pem"
    key_file  = "$SEC/tls/$name-key.pem"
  }
  https {
    verify_incoming = true
  }
}
HCL
}
HTTP_PORTS=$'\n  http     = -1\n  https    = 8501'

# secret: the SecretID of the JSON on stdin.
secret() { sed -n 's/^ *"SecretID": *"\([^"]*\)".*/\1/p' | head -1; }

# bootstrap_acl: bootstrap once (the management token in tokens/management),
# then give every agent its token: a node identity, as Consul's documentation
# advises, set with `consul acl set-agent-token` (persisted by the agent).
bootstrap_acl() {
	say "bootstrapping ACLs"
	# The script's own consul CLI calls from here on (the agents, started
	# before, do not inherit it).
	export "${CONSUL_TLS_ENV[@]}" CONSUL_HTTP_TOKEN_FILE="$SEC/tokens/management"
	if [[ ! -s $SEC/tokens/management ]]; then
		local out deadline=$((SECONDS + 60))
		# Right after an election the ACL system may not be ready yet.
		until out=$(CONSUL_HTTP_TOKEN_FILE= "$BIN/consul" acl bootstrap -http-addr="$HTTP_ADDR" -format=json 2>&1); do
			((SECONDS < deadline)) || die "ACL bootstrap failed: $out"
			sleep 0.5
		done
		(umask 077 && secret <<<"$out" >"$SEC/tokens/management")
		[[ -s $SEC/tokens/management ]] || die "ACL bootstrap: no SecretID in: $out"
	fi
	local a name ip tok
	for a in "${SERVERS[@]}" "${NODES[@]}"; do
		name=${a%%:*} ip=${a#*:} tok=$SEC/tokens/agent-$name
		if [[ ! -s $tok ]]; then
			(umask 077 && "$BIN/consul" acl token create -http-addr="$HTTP_ADDR" -description "agent $name" \
				-node-identity "$name:dc1" -format=json | secret >"$tok")
			[[ -s $tok ]] || die "could not create the agent token of $name"
		fi
		# (the agent may still be starting)
		wait_for "the agent token of $name set" 60 "$BIN/consul" acl set-agent-token -http-addr="https://$ip:8501" agent "$(<"$tok")"
	done
}

# token NAME RULES-FILE: a policy named NAME from the file and a token holding
# only it, in tokens/NAME (once).
token() {
	local name=$1 rules=$2
	local tok=$SEC/tokens/$name
	[[ -s $tok ]] && return 0
	"$BIN/consul" acl policy create -http-addr="$HTTP_ADDR" -name "$name" -rules "@$rules" >/dev/null ||
		die "could not create the policy $name"
	(umask 077 && "$BIN/consul" acl token create -http-addr="$HTTP_ADDR" -description "$name" \
		-policy-name "$name" -format=json | secret >"$tok")
	[[ -s $tok ]] || die "could not create the token $name"
}

# sidecar_token NODE SERVICE-FILE: the README's sidecar policy, with a write
# rule for each service the node's file registers; the gateway node gets
# the README's gateway rules too (for -gateway).
sidecar_token() {
	local node=$1 file=$2 svc
	local f=$SEC/acl/sidecar-$node.hcl
	cat >"$f" <<'HCL'
node_prefix "" {
  policy = "read"
}
service_prefix "" {
  policy = "read"
}
service "attache" {
  policy = "write"
}
HCL
	for svc in $(sed -n 's/^ *name *= *"\([^"]*\)".*/\1/p' "$file" 2>/dev/null | sort -u); do
		printf 'service "%s" {\n  policy = "write"\n}\n' "$svc" >>"$f"
	done
	if [[ $node == gateway ]]; then
		cat >>"$f" <<HCL
service "attache-gateway" {
  policy = "write"
}
key_prefix "attache/routes/" {
  policy = "read"
}
key "attache/routes/applied/$node" {
  policy = "write"
}
HCL
	fi
	token "sidecar-$node" "$f"
}

# control_token: the README's control policy.
control_token() {
	cat >"$SEC/acl/control.hcl" <<'HCL'
key_prefix "attache/routes/" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
HCL
	token control "$SEC/acl/control.hcl"
}
