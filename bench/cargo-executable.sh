# Sourced by bench/run.sh and bench/pgo.sh.
# cargo_executable NAME CARGO-ARGS...: runs the cargo build command and prints the path of the
# executable it built for target NAME (a bench's path carries a hash).
cargo_executable() {
  local name=$1
  shift
  cargo "$@" --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1]
            and m.get("executable")):
        print(m["executable"])' "$name"
}
