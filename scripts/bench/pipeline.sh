#!/usr/bin/env bash
# pipeline.sh: the pipeline benchmark (issue 12, docs/performance.md,
# "Pipelines"): N generated access-log lines (fixed seed) -> parse -> filter
# -> reduce (requests and bytes by status and path) -> jsonl, run by
# `wpool pipeline run` and by one plain lua5.4 process doing the same work
# (scripts/examples/pipeline/serial.lua), alternately, in the same run.
# The default config is access-fused.json (the three stages fused into
# the tasks of the first); --config .../access.json runs them unfused.
#   bash scripts/bench/pipeline.sh [--lines N] [--reps R] [--build-dir DIR]
#                                  [--config FILE]
# Prints wall seconds, CPU seconds (user + sys) and peak RSS of each run,
# the medians, the speed-up and RSS ratio, the ratio of the best walls, the best speed-up the CPU time
# allows on 2 idle cores (2 x serial CPU / pipeline CPU), and the
# pipeline's items/s per stage; checks that both wrote the same aggregates.
# Each repetition also times two serial scripts side by side: 2 x serial
# wall / that wall is the speed-up the machine itself gives two
# processes at that moment (its 2-core ceiling; below 2 when the VM's
# vCPUs slow each other down).
# Defaults: 1,000,000 lines, 3 repetitions, access-fused.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=build lines=1000000 reps=3 config=scripts/examples/pipeline/access-fused.json
while [ $# -gt 0 ]; do
  case "$1" in
    --lines) lines=$2; shift ;;
    --reps) reps=$2; shift ;;
    --build-dir) build=$2; shift ;;
    --config) config=$2; shift ;;
    *) echo "pipeline.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
wpool=$root/$build/wpool
[ -x "$wpool" ] || { echo "pipeline.sh: $wpool not found (bash scripts/build.sh $build)" >&2; exit 2; }
export LUA_CPATH="$root/$build/?.so;;"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ex=$root/scripts/examples/pipeline
cp "$ex/stages.lua" "$work/"
cp "$root/$config" "$work/job.json"
lua5.4 "$ex/gen_access_log.lua" "$lines" "$work/access.log"
cd "$work"
echo "lines: $lines, cores: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg)"
ser=() pip=() serm=() pipm=() serc=() pipc=() pair=() rat=()
for r in $(seq 1 "$reps"); do
  /usr/bin/time -f "%e %M %U %S" -o t.txt lua5.4 "$ex/serial.lua" access.log serial.jsonl
  read -r s sm su ss < t.txt
  sc=$(awk -v a="$su" -v b="$ss" 'BEGIN { print a + b }')
  rm -f out.jsonl dead.jsonl access.checkpoint
  /usr/bin/time -f "%e %M %U %S" -o t.txt "$wpool" pipeline run --no-progress job.json 2>log.txt
  read -r p pm pu ps < t.txt
  pc=$(awk -v a="$pu" -v b="$ps" 'BEGIN { print a + b }')
  /usr/bin/time -f "%e" -o t.txt bash -c "lua5.4 '$ex/serial.lua' access.log pair1.jsonl &
    lua5.4 '$ex/serial.lua' access.log pair2.jsonl; wait"
  read -r pw < t.txt
  echo "rep $r: serial ${s}s (cpu ${sc}s) ${sm}KB  pipeline ${p}s (cpu ${pc}s) ${pm}KB  two serials side by side ${pw}s"
  ser+=("$s") pip+=("$p") serm+=("$sm") pipm+=("$pm") serc+=("$sc") pipc+=("$pc") pair+=("$pw")
  rat+=("$(awk -v a="$s" -v b="$p" 'BEGIN { print a / b }')")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
s=$(median "${ser[@]}") p=$(median "${pip[@]}") sm=$(median "${serm[@]}") pm=$(median "${pipm[@]}")
sc=$(median "${serc[@]}") pc=$(median "${pipc[@]}")
pw=$(median "${pair[@]}") rr=$(median "${rat[@]}")
bs=$(printf '%s\n' "${ser[@]}" | sort -g | head -1) bp=$(printf '%s\n' "${pip[@]}" | sort -g | head -1)
awk -v s="$s" -v p="$p" -v sm="$sm" -v pm="$pm" -v sc="$sc" -v pc="$pc" -v bs="$bs" -v bp="$bp" \
    -v n="$reps" -v pw="$pw" -v rr="$rr" 'BEGIN {
  printf "median: serial %.2fs (cpu %.2fs) %dKB, pipeline %.2fs (cpu %.2fs) %dKB\n", s, sc, sm, p, pc, pm
  printf "speed-up %.2fx (target >= 1.7), peak RSS ratio %.2f (target <= 2)\n", s / p, pm / sm
  printf "median of the per-repetition speed-ups (serial and pipeline run back to back): %.2fx\n", rr
  printf "best of %s: serial %.2fs, pipeline %.2fs, ratio of the bests %.2fx\n", n, bs, bp, bs / bp
  printf "CPU-bound ceiling on 2 idle cores: %.2fx\n", 2 * sc / pc
  printf "the machine now: two serials side by side %.2fs, its 2-core ceiling %.2fx; pipeline / ceiling %.2f\n", pw, 2 * s / pw, (s / p) / (2 * s / pw) }'
lua5.4 - log.txt <<'LUA'
local json = require("workerpool").json
for line in io.lines(arg[1]) do
  local v = json.decode(line)
  if v and v.event == "pipeline.done" then
    for _, s in ipairs(v.stages) do
      print(string.format("  stage %-8s in %8d  out %8d  %10.0f items/s", s.stage, s["in"], s.out, s.items_per_s))
    end
  end
end
LUA
cat > canon.lua <<'LUA'
local j = require("workerpool").json
for l in io.lines(arg[1]) do
  local v = j.decode(l)
  print(string.format("%d %s %d %d", v.status, v.path, v.requests, v.bytes))
end
LUA
canon() { lua5.4 canon.lua "$1" | sort; }
if [ "$(canon serial.jsonl)" = "$(canon out.jsonl)" ]; then echo "outputs: identical aggregates"
else echo "outputs DIFFER" >&2; exit 1; fi
