#!/usr/bin/env bash
# Measures paramd against the machine's memory bandwidth, torch's own AdamW,
# a minimal Python parameter server and raw TCP loopback, and prints a table
# of ratios. Every ratio compares two things measured in this run, pairs
# alternating, so a noisy machine moves both sides together.
#
#   bench/compare.sh            # the whole table (about 10 minutes)
#   REPEAT=1 bench/compare.sh   # one pass instead of three
#
# Installs what it needs: a virtualenv in bench/.venv (torch, grpcio, numpy
# from bench/requirements.txt) and release builds of paramd and paramctl.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEAT=${REPEAT:-3}
OUT=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$OUT"
}
trap cleanup EXIT

if [ ! -x bench/.venv/bin/python ]; then
    python3 -m venv bench/.venv
fi
bench/.venv/bin/pip install -q -r bench/requirements.txt
PY=bench/.venv/bin/python
cargo build -q --release -p paramd -p paramd-client
cargo bench -q -p paramd --bench kernels --no-run 2>/dev/null
PARAMD=target/release/paramd
PARAMCTL=target/release/paramctl

# Starts paramd on ports the OS picks; prints its gRPC URL.
start_paramd() {
    local log=$OUT/paramd.$RANDOM.log
    PARAMD_LOG=info $PARAMD --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do
        if grep -q "paramd serving" "$log"; then
            sed -n 's/.*grpc=\([0-9.:]*\).*/http:\/\/\1/p' "$log" | head -1
            return
        fi
        sleep 0.1
    done
    echo "paramd did not start: $(cat "$log")" >&2
    exit 1
}
start_pyps() {
    local log=$OUT/pyps.log
    $PY bench/pyps.py --port 0 >"$log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 300); do
        if grep -q LISTENING "$log"; then
            echo "127.0.0.1:$(awk '/LISTENING/ {print $2}' "$log")"
            return
        fi
        sleep 0.1
    done
    echo "pyps did not start: $(cat "$log")" >&2
    exit 1
}

kernels() { cargo bench -q -p paramd --bench kernels -- --json --params 16777216 --tensors "$1" 2>/dev/null; }
torch_adamw() { $PY bench/torch_adamw.py --params 16777216 --tensors "$1" --mode "$2"; }

URL=$(start_paramd)
PYPS=$(start_pyps)
echo "paramd at $URL, Python parameter server at $PYPS; $REPEAT passes" >&2

for pass in $(seq "$REPEAT"); do
    echo "pass $pass of $REPEAT" >&2
    for t in 1 200; do
        kernels $t | sed "s/^/kernel $t /" >>"$OUT/results"
        torch_adamw $t fused | sed "s/^/torch_fused $t /" >>"$OUT/results"
        torch_adamw $t default | sed "s/^/torch_default $t /" >>"$OUT/results"
    done
    $PARAMCTL --server "$URL" bench --workers 2 --params 16777216 --tensors 20 --optimizer adamw --clip 1.0 --rounds 8 --json \
        | sed "s/^/round_paramd 20 /" >>"$OUT/results"
    $PY bench/pyps_load.py --server "$PYPS" --workers 2 --params 16777216 --tensors 20 --rounds 5 --max-norm 1.0 \
        | sed "s/^/round_pyps 20 /" >>"$OUT/results"
    $PARAMCTL --server "$URL" bench --workers 2 --params 16777216 --tensors 2000 --optimizer adamw --clip 1.0 --rounds 8 --json \
        | sed "s/^/round_paramd 2000 /" >>"$OUT/results"
    for n in 1048576 16777216; do
        $PARAMCTL --server "$URL" bench --workers 1 --params $n --tensors 1 --optimizer sgd --rounds 10 --json \
            | sed "s/^/push $n /" >>"$OUT/results"
    done
    $PARAMCTL bench-tcp --bytes 67108864 --repeat 10 --json | sed "s/^/tcp 0 /" >>"$OUT/results"
done

# Peak memory needs a fresh process: its high-water mark is for life.
URL=$(start_paramd)
$PARAMCTL --server "$URL" bench --workers 2 --params 100000000 --tensors 20 --optimizer adamw --rounds 2 --json \
    | sed "s/^/rss 0 /" >>"$OUT/results"

$PY - "$OUT/results" <<'EOF'
import json, statistics, sys

rows = {}
for line in open(sys.argv[1]):
    kind, arg, doc = line.split(" ", 2)
    rows.setdefault((kind, int(arg)), []).append(json.loads(doc))

def med(kind, arg, key, pick=None):
    docs = [d for d in rows.get((kind, arg), []) if pick is None or pick(d)]
    return statistics.median(d[key] for d in docs)

def kernel(t, name):
    return med("kernel", t, "step_seconds_median", lambda d: d["kernel"] == name)

table = []
def row(what, value, target, ok):
    table.append((what, f"{value:.2f}", target, "yes" if ok else "NO"))

for t in (1, 200):
    ours = kernel(t, "adamw")
    fused = med("torch_fused", t, "step_seconds_median")
    default = med("torch_default", t, "step_seconds_median")
    row(f"AdamW update vs torch fused AdamW ({t} tensor{'s' if t > 1 else ''}, speed ratio)", fused / ours, ">= 0.9", fused / ours >= 0.9)
    row(f"AdamW update vs torch default ({t} tensor{'s' if t > 1 else ''}, speed ratio)", default / ours, ">= 3", default / ours >= 3)
r = kernel(1, "adamw") / kernel(200, "adamw")
row("200-tensor update vs one-tensor update (speed ratio)", r, ">= 0.7", r >= 0.7)
r = kernel(1, "adamw_clip") / kernel(1, "adamw")
row("clipping + AdamW vs AdamW alone (time ratio)", r, "<= 1.2", r <= 1.2)
vs_triad = med("kernel", 1, "vs_triad", lambda d: d["kernel"] == "adamw")
row("AdamW update vs the triad's bandwidth (bandwidth ratio)", vs_triad, "(info)", True)
ours = med("round_paramd", 20, "round_seconds_p50")
py = med("round_pyps", 20, "round_seconds_median")
row("synchronous round: Python PS time / paramd time", py / ours, ">= 3", py / ours >= 3)
tcp = med("tcp", 0, "gbps_median")
p64 = med("push", 16777216, "push_gbps")
p4 = med("push", 1048576, "push_gbps")
row("64 MiB push vs raw TCP loopback (throughput ratio)", p64 / tcp, ">= 0.5", p64 / tcp >= 0.5)
row("64 MiB push rate vs 4 MiB push rate", p64 / p4, ">= 0.8", p64 / p4 >= 0.8)
r = med("round_paramd", 2000, "round_seconds_p50") / ours
row("round time, 2,000 tensors vs 20 (time ratio)", r, "<= 1.5", r <= 1.5)
rss = rows[("rss", 0)][0]
r = rss["server_peak_rss_bytes"] / rss["model_bytes"]
row("server peak RSS vs params + state + one gradient (100M AdamW)", r, "<= 1.25", r <= 1.25)

print("| measure | ratio | target | met |")
print("| --- | --- | --- | --- |")
for r in table:
    print("| " + " | ".join(r) + " |")
print()
print(f"raw figures: paramd AdamW 16M {kernel(1, 'adamw') * 1e3:.1f} ms/step, torch fused {med('torch_fused', 1, 'step_seconds_median') * 1e3:.1f} ms, "
      f"torch default {med('torch_default', 1, 'step_seconds_median') * 1e3:.1f} ms; round paramd {ours * 1e3:.0f} ms, Python PS {py * 1e3:.0f} ms; "
      f"push 64 MiB {p64:.2f} GB/s, 4 MiB {p4:.2f} GB/s, raw TCP {tcp:.2f} GB/s; peak RSS {rss['server_peak_rss_bytes'] / 2**20:.0f} MiB "
      f"for {rss['model_bytes'] / 2**20:.0f} MiB of model")
EOF

# The Python client and the user's whole step, each pair measured in one run:
# paramd.Client's 64 MiB push and pull beside raw TCP (bench/client_io.py),
# and a training step of 2 ranks on torch DDP beside the same on paramd
# (bench/step.py). They need the paramd package, which client/python/ci/venv.sh
# installs with torch (in the target directory, as the tests use it); each
# starts its own paramd from target/release.
PYC=$(client/python/ci/venv.sh)
$PYC bench/client_io.py --tensors 1,20 --repeat $((REPEAT * 5))
$PYC bench/step.py --repeat "$REPEAT"
