#!/usr/bin/env bash
# From a fresh clone to a trained English->German model, its test translations and their BLEU:
# makes .venv and installs mtrain (scripts/install.sh), gets Multi30k (scripts/get_multi30k.sh),
# trains configs/multi30k_en_de.yaml for a short budget, translates test_2016_flickr and scores it.
# Each step that is already done is skipped, so running it again is cheap.
#   scripts/quickstart.sh [--minutes N] [--data DIR] [--torch auto|cpu|cuda] [--run DIR] [-- FIT_OPTIONS]
#     --minutes N   training budget [10]; the config's own is 60 (about 40 BLEU on a 2-core CPU)
#     --data DIR    link Multi30k's .gz files from DIR instead of downloading them
#     --torch       which PyTorch build to install (scripts/install.sh --help) [auto]
#     --run DIR     run directory [runs/quickstart-Nmin: each budget its own run]
#     after --       more options for `mtrain fit`, e.g. -- --set train.precision=fp32
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
minutes=10 data="" torch_choice=auto run=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="${2:?--minutes needs a number}"; shift 2 ;;
    --data) data="${2:?--data needs a folder}"; shift 2 ;;
    --torch) torch_choice="${2:?--torch needs auto, cpu or cuda}"; shift 2 ;;
    --run) run="${2:?--run needs a folder}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$minutes" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "quickstart.sh: --minutes $minutes: expected a number" >&2; exit 2; }
run="${run:-runs/quickstart-${minutes}min}"  # another budget is another run, not the last one's model

echo "== 1/4 install"
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import mtrain, torch, sacrebleu, sentencepiece' 2>/dev/null; then
  . .venv/bin/activate
  echo "mtrain is installed in .venv ($(python -m mtrain --version))"
else
  . scripts/install.sh --torch "$torch_choice"
fi

echo "== 2/4 data"
bash scripts/get_multi30k.sh ${data:+"$data"}

echo "== 3/4 train ($minutes minutes)"
fit=(mtrain fit configs/multi30k_en_de.yaml -o "$run" --set "train.max_time=${minutes}m" "$@")
if [ -f "$run/final.pt" ]; then
  echo "already trained: $run/final.pt (--run DIR trains another)"
elif [ -f "$run/last.pt" ]; then
  "${fit[@]}" --resume           # an interrupted quickstart continues where it stopped
else
  [ ! -e "$run" ] || fit+=(--overwrite)   # a run stopped before its first checkpoint: only its own files go
  "${fit[@]}"
fi

echo "== 4/4 translate and score test_2016_flickr"
hyp="$run/test_2016_flickr.hyp.de"
mtrain translate -c "$run/final.pt" -i data/multi30k/test_2016_flickr.en.gz -o "$hyp"
bleu="$(mtrain score --ref data/multi30k/test_2016_flickr.de.gz --metrics bleu "$hyp")"
echo "$bleu"
echo "model: $run/final.pt   translations: $hyp"
echo "next: . .venv/bin/activate; mtrain translate -c $run/final.pt   (type English, get German)"
