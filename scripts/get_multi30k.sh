#!/usr/bin/env bash
# Fill data/multi30k/ with Multi30k (train, val, test_2016_flickr; .en/.de, and .fr/.cs where the
# source has them, gzip). Files already there are kept, so running it again does nothing.
#   scripts/get_multi30k.sh            download from the Multi30k dataset's public repository
#                                      (with Python's standard library: no curl or wget needed;
#                                      MULTI30K_URL=... names a mirror)
#   scripts/get_multi30k.sh DIR        link the files from a local copy in DIR instead
set -euo pipefail
dest="$(cd "$(dirname "$0")/.." && pwd)/data/multi30k"
files="train.en.gz train.de.gz val.en.gz val.de.gz test_2016_flickr.en.gz test_2016_flickr.de.gz"
more="train.fr.gz val.fr.gz test_2016_flickr.fr.gz train.cs.gz val.cs.gz test_2016_flickr.cs.gz"  # optional
if [ $# -ge 1 ]; then
  [ -d "$1" ] || { echo "get_multi30k.sh: $1: no such folder" >&2; exit 1; }
  src="$(cd "$1" && pwd)"
  for f in $files; do
    [ -f "$src/$f" ] || { echo "get_multi30k.sh: $src/$f not found" >&2; exit 1; }
  done
  mkdir -p "$dest"
  for f in $files $more; do
    # a link of ours is re-pointed; a file someone put there is theirs and stays
    if [ -f "$src/$f" ] && { [ -L "$dest/$f" ] || [ ! -e "$dest/$f" ]; }; then ln -sfn "$src/$f" "$dest/$f"; fi
  done
else
  mkdir -p "$dest"
  python3 - "$dest" $files -- $more <<'PY'
import os, sys, urllib.request
URL = os.environ.get("MULTI30K_URL", "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/")
dest, names = sys.argv[1], sys.argv[2:]
optional = False
for name in names:
    if name == "--":
        optional = True
        continue
    path = os.path.join(dest, name)
    if os.path.exists(path):
        continue
    try:
        with urllib.request.urlopen(URL + name, timeout=60) as answer, open(path + ".part", "wb") as out:
            out.write(answer.read())
        os.replace(path + ".part", path)
    except OSError as e:
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
        if not optional:
            reason = getattr(e, "reason", None) or e
            sys.exit(f"get_multi30k.sh: could not download {URL}{name} ({reason}); offline? "
                     "give a local copy: scripts/get_multi30k.sh DIR")
PY
fi
for f in $files $more; do
  [ -e "$dest/$f" ] && printf '%8d %s\n' "$(gzip -cd "$dest/$f" | wc -l)" "data/multi30k/$f"
done
exit 0
