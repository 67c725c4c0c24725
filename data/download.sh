#!/usr/bin/env bash
# Downloads Tiny Shakespeare (Karpathy's char-rnn data set, 1,115,394 bytes) to data/tinyshakespeare.txt.
#
#   data/download.sh [OUTPUT]        default OUTPUT: tinyshakespeare.txt next to this script
#
# The file is fetched with curl (or wget) into a temporary file, its size is checked, and only then is it moved
# into place, so an interrupted download never leaves a half file behind. Set DSV3_TINYSHAKESPEARE_URL to use a
# mirror. Exits 0 when the file is there (already or now), non-zero with an explanation otherwise.
set -euo pipefail

url="${DSV3_TINYSHAKESPEARE_URL:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt}"
expected_bytes=1115394
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$script_dir/tinyshakespeare.txt}"

size_of() { wc -c < "$1" | tr -d ' '; }

if [ -f "$out" ]; then
    if [ "$(size_of "$out")" -eq "$expected_bytes" ]; then
        echo "download.sh: $out is already there ($expected_bytes bytes)"
        exit 0
    fi
    echo "download.sh: $out has $(size_of "$out") bytes, expected $expected_bytes; downloading it again"
fi

how_by_hand() {
    cat >&2 <<EOF
download.sh: could not download Tiny Shakespeare: $1
  URL:       $url
  Are you offline, or behind a proxy? To get the file by hand, on a machine with internet access run
      curl -L -o tinyshakespeare.txt $url
  and copy it to $out (it must be exactly $expected_bytes bytes).
  Without it, the examples can still train on the built-in synthetic corpus
  (build/prepare_data --synthetic 1000000 --vocab 256 --out-dir data).
EOF
    exit 1
}

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT

if command -v curl > /dev/null 2>&1; then
    log="$(curl --fail --silent --show-error --location --connect-timeout 15 --max-time 120 --retry 2 \
        --output "$tmp" "$url" 2>&1)" || how_by_hand "curl failed: ${log##*$'\n'}"  # last line: retries repeat it
elif command -v wget > /dev/null 2>&1; then
    log="$(wget --no-verbose --timeout=15 --tries=3 --output-document="$tmp" "$url" 2>&1)" ||
        how_by_hand "wget failed with exit status $? (4 = network failure)${log:+: ${log##*$'\n'}}"
else
    how_by_hand "neither curl nor wget is installed"
fi

got="$(size_of "$tmp")"
if [ "$got" -ne "$expected_bytes" ]; then
    how_by_hand "the downloaded file has $got bytes, expected $expected_bytes (a proxy error page?)"
fi
mv -f "$tmp" "$out"
trap - EXIT
echo "download.sh: wrote $out ($expected_bytes bytes)"
