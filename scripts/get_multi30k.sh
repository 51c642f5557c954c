#!/usr/bin/env bash
# Fill data/multi30k/ with Multi30k (train, val, test_2016_flickr; .en/.de, and .fr/.cs where the
# source has them, gzip).
#   scripts/get_multi30k.sh            download from the Multi30k dataset's public repository
#   scripts/get_multi30k.sh DIR        link the files from a local copy in DIR instead
set -euo pipefail
dest="$(cd "$(dirname "$0")/.." && pwd)/data/multi30k"
mkdir -p "$dest"
files="train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz"
more="train.fr.gz val.fr.gz test_2016_flickr.fr.gz train.cs.gz val.cs.gz test_2016_flickr.cs.gz"  # optional
got=""
if [ $# -ge 1 ]; then
  src="$(cd "$1" && pwd)"
  for f in $files; do
    [ -f "$src/$f" ] || { echo "get_multi30k.sh: $src/$f not found" >&2; exit 1; }
  done
  for f in $files $more; do
    if [ -f "$src/$f" ]; then ln -sf "$src/$f" "$dest/$f"; got="$got $f"; fi
  done
else
  url="https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
  for f in $files; do
    curl -fsSL "$url/$f" -o "$dest/$f.part" && mv "$dest/$f.part" "$dest/$f" \
      || { echo "get_multi30k.sh: could not download $url/$f" >&2; exit 1; }
    got="$got $f"
  done
  for f in $more; do
    if curl -fsSL "$url/$f" -o "$dest/$f.part"; then mv "$dest/$f.part" "$dest/$f"; got="$got $f"; else rm -f "$dest/$f.part"; fi
  done
fi
for f in $got; do printf '%8d %s\n' "$(gzip -cd "$dest/$f" | wc -l)" "data/multi30k/$f"; done
