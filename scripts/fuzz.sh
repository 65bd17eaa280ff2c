#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time and prints the
# executions and findings of each. Run it by hand; CI does not run it.
#
#   scripts/fuzz.sh [SECONDS]
#
# SECONDS is the run time of each target (default 60). Environment:
#   FUZZ_TARGETS    targets to run, separated by spaces (default: all five)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer: address (default) or none, which
#                   runs faster but misses memory errors in unsafe code
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). cargo-fuzz passes nightly
# flags to rustc, so the script sets RUSTC_BOOTSTRAP=1 and builds with the
# stable toolchain. All targets are built once and then run from that build,
# so edits made to the tree during the run do not change what is tested.
# The corpus grows in fuzz/corpus/TARGET and is reused by later runs. An
# input that crashes, times out (10 s) or runs out of memory (2 GiB) is saved
# in fuzz/artifacts/TARGET. Replay one with
#   RUSTC_BOOTSTRAP=1 cargo +stable fuzz run TARGET fuzz/artifacts/TARGET/FILE
# and print it as the target reads it with
#   RUSTC_BOOTSTRAP=1 cargo +stable fuzz fmt TARGET fuzz/artifacts/TARGET/FILE
# The exit status is 1 when any target had a finding or failed to run.
set -euo pipefail

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]; SECONDS must be a positive whole number, got '$seconds'" >&2
    exit 2
fi
targets=${FUZZ_TARGETS:-command_lines data_reader command_parser classifier engine_replies}
sanitizer=${FUZZ_SANITIZER:-address}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if ! cargo fuzz --version > /dev/null 2>&1; then
    echo "cargo-fuzz is not installed; install it with: cargo install cargo-fuzz" >&2
    exit 2
fi

export RUSTC_BOOTSTRAP=1
logs=$(mktemp -d /tmp/sendguard-fuzz.XXXXXX)

# Prints the libFuzzer options of one target.
target_options() {
    case $1 in
        command_parser) echo "-dict=fuzz/dictionaries/smtp.dict -max_len=1024" ;;
        command_lines | data_reader) echo "-dict=fuzz/dictionaries/smtp.dict -max_len=8192" ;;
        classifier) echo "-dict=fuzz/dictionaries/mime.dict -max_len=65536" ;;
        engine_replies) echo "-max_len=4096" ;;
        *)
            echo "unknown fuzz target '$1'; the targets are in fuzz/fuzz_targets" >&2
            return 1
            ;;
    esac
}

# Prints the seed directories of one target, if it has any.
target_seeds() {
    if [[ -d fuzz/seeds/$1 ]]; then
        echo "fuzz/seeds/$1"
    fi
}

# Counts the files that libFuzzer saved for one target.
count_artifacts() {
    local dir=fuzz/artifacts/$1
    if [[ -d $dir ]]; then
        find "$dir" -type f | wc -l
    else
        echo 0
    fi
}

echo "building the fuzz targets (sanitizer: $sanitizer)"
cargo +stable fuzz build -s "$sanitizer" > "$logs/build.log" 2>&1 || {
    echo "build failed; see $logs/build.log" >&2
    tail -n 30 "$logs/build.log" >&2
    exit 2
}
host=$(rustc +stable -vV | sed -n 's/^host: //p')
bin_dir=fuzz/target/$host/release
# cargo-fuzz sets this for its address sanitizer builds.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

printf '%-16s %12s %10s %9s  %s\n' target executions exec/s findings log
findings_total=0
failed=0
for target in $targets; do
    options=$(target_options "$target")
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    before=$(count_artifacts "$target")
    log=$logs/$target.log
    # shellcheck disable=SC2046,SC2086 # the options and seeds are lists of words
    "$bin_dir/$target" -artifact_prefix="fuzz/artifacts/$target/" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 $options \
        "fuzz/corpus/$target" $(target_seeds "$target") > "$log" 2>&1 || true

    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    after=$(count_artifacts "$target")
    findings=$((after - before))
    findings_total=$((findings_total + findings))
    printf '%-16s %12s %10s %9s  %s\n' "$target" "${executions:-?}" "${rate:-?}" "$findings" "$log"
    if ((findings > 0)); then
        grep -m 5 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|Test unit written to' "$log" |
            sed 's/^/    /'
    elif [[ -z $executions ]]; then
        echo "    $target did not run to the end; the last lines of its log:"
        tail -n 5 "$log" | sed 's/^/    /'
        failed=$((failed + 1))
    fi
done

if ((findings_total > 0)); then
    echo "$findings_total finding(s); the inputs are in fuzz/artifacts"
    exit 1
fi
if ((failed > 0)); then
    echo "$failed target(s) failed to run"
    exit 1
fi
echo "no findings"
