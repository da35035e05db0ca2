# Shared by the scripts: paths and small process helpers. Source it; do not run it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.bin"
RUN="$ROOT/.run"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# running NAME: is the process recorded in .run/pids/NAME.pid alive?
running() {
	local pidf="$RUN/pids/$1.pid" pid
	[[ -f $pidf ]] || return 1
	pid=$(<"$pidf")
	[[ -n $pid && -d /proc/$pid ]] || return 1
	# A recycled pid would run something else: check it is one of ours.
	grep -qa -e "$BIN/" "/proc/$pid/cmdline" 2>/dev/null
}

# start NAME CMD...: start CMD in the background in its own session, logging
# to .run/logs/NAME.log, unless NAME already runs.
start() {
	local name=$1; shift
	mkdir -p "$RUN/pids" "$RUN/logs"
	if running "$name"; then
		printf '    %-16s already running (pid %s)\n' "$name" "$(<"$RUN/pids/$name.pid")" >&2
		return 0
	fi
	setsid "$@" >>"$RUN/logs/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/pids/$name.pid"
	printf '    %-16s started (pid %s)\n' "$name" "$!" >&2
}

# wait_for WHAT SECONDS CMD...: retry CMD until it succeeds or time runs out.
wait_for() {
	local what=$1 secs=$2; shift 2
	local deadline=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what (logs in .run/logs/)"
		sleep 0.2
	done
}
