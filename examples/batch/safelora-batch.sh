#!/usr/bin/env bash
# Score every adapter in a folder through one alignment profile, N adapters at a time.
#
#   safelora-batch.sh [-j N] [-g N] [--runner auto|parallel|xargs] ADAPTERS_DIR PROFILE OUT_DIR \
#       [-- SAFELORA_SCORE_OPTIONS...]
#
# Every folder directly under ADAPTERS_DIR that holds an adapter_config.json is one job: a
# `safelora score` process that reads that adapter and the profile, nothing else, and writes
# OUT_DIR/NAME.json (the report), OUT_DIR/NAME.junit.xml, OUT_DIR/NAME.log (its stderr) and
# OUT_DIR/NAME.exit (its exit code). Jobs run on GNU parallel when it is installed, else on
# xargs -P. An adapter whose report is already in OUT_DIR is not scored again (rerun after an
# interruption and only the rest is done).
#
#   -j N       jobs at once (default: the number of CPUs)
#   -g N       the gate: an adapter fails when more than N modules would be projected (default 0)
#   --runner   force GNU parallel or xargs (default: parallel if installed)
#   -- ...     more `safelora score` options (e.g. --select threshold --threshold 0.35)
#
# Exit code: 0 when every adapter passed, 1 when some failed the gate and none failed otherwise,
# else the exit code of the first adapter (by name) that could not be scored. A summary line per
# adapter goes to stderr.
set -euo pipefail

if [[ "${1:-}" == "--one" ]]; then  # one job: called by parallel/xargs with the adapter folder
    adapter=$2
    name=$(basename -- "$adapter")
    base="$SAFELORA_BATCH_OUT/$name"
    code=0
    safelora score "$adapter" --profile "$SAFELORA_BATCH_PROFILE" \
        --fail-if-projected "$SAFELORA_BATCH_GATE" --json --quiet --force \
        --junit "$base.junit.xml" "${@:3}" > "$base.json.part" 2> "$base.log" || code=$?
    if [[ $code -le 1 ]]; then
        mv -f -- "$base.json.part" "$base.json"  # a report only for a finished run (0 or 1)
    else
        rm -f -- "$base.json.part"
    fi
    echo "$code" > "$base.exit"
    exit 0  # the summary judges; a failed job must not stop the others
fi

usage() {
    echo "usage: safelora-batch.sh [-j N] [-g N] [--runner auto|parallel|xargs]" \
        "ADAPTERS_DIR PROFILE OUT_DIR [-- SAFELORA_SCORE_OPTIONS...]" >&2
    exit 2
}
jobs=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
gate=0
runner=auto
while [[ $# -gt 0 ]]; do
    case $1 in
        -j) jobs=${2:?-j needs a number}; shift 2 ;;
        -g) gate=${2:?-g needs a number}; shift 2 ;;
        --runner) runner=${2:?--runner needs parallel or xargs}; shift 2 ;;
        -h|--help) usage ;;
        --) break ;;
        -*) echo "safelora-batch: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 3 ]] || usage
adapters_dir=$1 profile=$2 out=$3
shift 3
[[ "${1:-}" == "--" ]] && shift
[[ -d "$adapters_dir" ]] || { echo "safelora-batch: $adapters_dir is not a folder" >&2; exit 2; }
[[ -f "$profile" ]] || { echo "safelora-batch: profile $profile not found" >&2; exit 2; }
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "safelora-batch: -j $jobs is not a number" >&2; exit 2; }
[[ "$gate" =~ ^[0-9]+$ ]] || { echo "safelora-batch: -g $gate is not a number" >&2; exit 2; }
if [[ $runner == auto ]]; then
    runner=xargs
    # GNU parallel, not moreutils' parallel of the same name
    [[ "$(parallel --version 2>/dev/null || true)" == *"GNU parallel"* ]] && runner=parallel
fi
if [[ $runner != parallel && $runner != xargs ]]; then
    echo "safelora-batch: --runner $runner is not parallel or xargs" >&2
    exit 2
fi
mkdir -p -- "$out"
export SAFELORA_BATCH_OUT=$out SAFELORA_BATCH_PROFILE=$profile SAFELORA_BATCH_GATE=$gate

# NUL-separated, sorted adapter folders without a finished report
todo() {
    find "$adapters_dir" -mindepth 2 -maxdepth 2 -name adapter_config.json -print0 \
        | sort -z | while IFS= read -r -d '' config; do
            folder=$(dirname -- "$config")
            [[ -f "$out/$(basename -- "$folder").json" ]] || printf '%s\0' "$folder"
        done
}
case $runner in
    parallel) todo | parallel --will-cite -0 -q -j "$jobs" bash "$0" --one {} "$@" ;;
    xargs) todo | xargs -0 -r -P "$jobs" -I{} bash "$0" --one {} "$@" ;;
esac

status=0 passed=0 failed=0 errors=0
while IFS= read -r -d '' config; do
    name=$(basename -- "$(dirname -- "$config")")
    code=$(cat -- "$out/$name.exit" 2>/dev/null || echo 70)  # no .exit: the job never finished
    case $code in
        0) passed=$((passed + 1)); echo "$name: passed" >&2 ;;
        1) failed=$((failed + 1)); echo "$name: gate failed (see $out/$name.json)" >&2
           [[ $status -eq 0 ]] && status=1 ;;
        *) errors=$((errors + 1)); echo "$name: error, exit $code (see $out/$name.log)" >&2
           [[ $status -le 1 ]] && status=$code ;;
    esac
done < <(find "$adapters_dir" -mindepth 2 -maxdepth 2 -name adapter_config.json -print0 | sort -z)
echo "safelora-batch: $passed passed, $failed failed the gate, $errors could not be scored" >&2
exit "$status"
