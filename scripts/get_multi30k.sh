#!/usr/bin/env bash
# Fill data/multi30k/ with Multi30k En-De (train, val, test_2016_flickr; .en/.de, gzip).
#   scripts/get_multi30k.sh            download from the Multi30k dataset's public repository
#   scripts/get_multi30k.sh DIR        link the files from a local copy in DIR instead
set -euo pipefail
dest="$(cd "$(dirname "$0")/.." && pwd)/data/multi30k"
mkdir -p "$dest"
files="train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz"
if [ $# -ge 1 ]; then
  src="$(cd "$1" && pwd)"
  for f in $files; do
    [ -f "$src/$f" ] || { echo "get_multi30k.sh: $src/$f not found" >&2; exit 1; }
    ln -sf "$src/$f" "$dest/$f"
  done
else
  url="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
  for f in $files; do
    curl -fsSL "$url/$f" -o "$dest/$f.part" && mv "$dest/$f.part" "$dest/$f" \
      || { echo "get_multi30k.sh: could not download $url/$f" >&2; exit 1; }
  done
fi
for f in $files; do printf '%8d %s\n' "$(gzip -cd "$dest/$f" | wc -l)" "data/multi30k/$f"; done
