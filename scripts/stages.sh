# Sourced by scripts/findings.sh and scripts/seeds.sh after they set LOG: `run NAME CMD...` times
# a command into $LOG (stage, seconds, command) and skips it when NAME is already there, so a
# study resumes where it stopped.
[[ -f "$LOG" ]] || printf "stage\tseconds\tcommand\n" > "$LOG"
run() {
  local name=$1; shift
  if grep -q "^$name	" "$LOG"; then echo "skip $name (done)"; return; fi
  echo; echo "=== $name ($(date -u +%H:%M:%S)): $*"
  local t0; t0=$(date +%s)
  "$@"
  printf "%s\t%s\t%s\n" "$name" "$(( $(date +%s) - t0 ))" "$*" >> "$LOG"
}
