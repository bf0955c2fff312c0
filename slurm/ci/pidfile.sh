# Sourced by the harness scripts: stop a daemon by its pid file, never by name (another Slurm or
# munge on the machine is not ours). Expects log().
stop() {  # stop PIDFILE COMM: TERM, up to 10 s, then KILL, if the PID still runs COMM
  local p; p=$(cat "$1" 2>/dev/null) || return 0
  if [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ]; then
    log "stopping $2 ($p)"; kill -TERM "$p"
    for _ in $(seq 100); do [ -d /proc/$p ] || break; sleep 0.1; done
    [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ] && kill -KILL "$p"
  fi
  rm -f "$1"
}
