# Sourced by the bench scripts that drive the REST API. `start_daemon [SERVE ARGS...]` starts a
# throwaway daemon on a free loopback port with its own data directory, an account with ample
# credits and a key, and waits until it answers.
# Needs: bin, model, tmp (a scratch directory the caller removes). Sets: data, key, pid, addr.
start_daemon() {
    data=$tmp/data
    "$bin" accounts create bench --credits 1000000 --data-dir "$data" >/dev/null
    key=$("$bin" keys create --account bench --scopes removebg:images:process,removebg:quota:read \
        --data-dir "$data" 2>/dev/null | tail -n1)
    # Port 0: the kernel picks a free loopback port, which the daemon logs ("listening", addr).
    "$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --model "$model" --log-format json "$@" \
        >"$tmp/daemon.log" 2>&1 &
    pid=$!
    addr=
    for _ in $(seq 600); do   # up to 60 s: the first start may fetch and check the model
        addr=$(sed -n 's/.*"message":"listening","addr":"\([^"]*\)".*/\1/p' "$tmp/daemon.log")
        [ -n "$addr" ] && curl -sf "http://$addr/healthz" >/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/daemon.log" >&2; exit 1; }
        sleep 0.1
    done
    curl -sf "http://$addr/healthz" >/dev/null || { echo "daemon did not come up" >&2; cat "$tmp/daemon.log" >&2; exit 1; }
}
