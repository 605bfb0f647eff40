#!/usr/bin/env bash
# Create VBench's own environment (vbench pins transformers 4.33 / numpy 1.26 / timm, which would break the main venv),
# and write the standard prompt lists the vbench protocols sample.
#
#   bash scripts/setup_vbench_env.sh [ENV_DIR] [--fetch-checkpoints[=DIMS]] [--local] [--fetch-only]
#                                                       # default ENV_DIR: .venv-vbench in the repository
#
# Then: ENV_DIR/bin/python is what the VBench metrics call (or set ORBITQUANT_VBENCH_PYTHON), and
#   ENV_DIR/prompts/all_dimension.txt  the standard suite (eval=vbench; ORBITQUANT_VBENCH_PROMPTS overrides)
#   ENV_DIR/prompts/quick.txt          4 prompts per paper dimension (eval=vbench_quick)
# VBench downloads each dimension's checkpoints (MUSIQ, LAION aesthetic head, AMT, RAFT, Tag2Text, ViCLIP, GRiT, UMT into
# $VBENCH_CACHE_DIR or ~/.cache/vbench; CLIP into ~/.cache/clip, DINO into torch.hub's cache, bert-base-uncased into the
# Hugging Face cache) on first use -- on an offline node only after the hours of sampling. On a connected machine,
#   --fetch-checkpoints[=DIMS]  downloads the missing ones now (DIMS: paper (default), all, or a comma list), with the
#                               commands `python -m orbitquant.harness.metrics.vbench_assets --fetch-commands` prints (the same table
#                               the preflight checks: run.py preflight=true lists what is still missing);
#   --local                     also puts CLIP and DINO into VBench's cache (the metrics' `local: true`);
#   --fetch-only                skips creating the environment (it must exist: the DINO/bert downloads run in it).
# Copy the caches to an offline node (same paths, or set VBENCH_CACHE_DIR / the metrics' `cache_dir`).
# Env: PYTHON (interpreter for the venv, default python3), TORCH_SPEC / TORCHVISION_SPEC (pins matching your CUDA),
#      ORBITQUANT_PYTHON (an interpreter with orbitquant installed, for --fetch-checkpoints; default .venv/bin/python).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="$ROOT/.venv-vbench"
FETCH=""
LOCAL=""
FETCH_ONLY=""
for arg in "$@"; do
  case "$arg" in
    --fetch-checkpoints) FETCH="paper" ;;
    --fetch-checkpoints=*) FETCH="${arg#--fetch-checkpoints=}" ;;
    --local) LOCAL="--local" ;;
    --fetch-only) FETCH_ONLY=1; FETCH="${FETCH:-paper}" ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) ENV_DIR="$arg" ;;
  esac
done
case "$ENV_DIR" in /*) ;; *) ENV_DIR="$PWD/$ENV_DIR" ;; esac
PY="${PYTHON:-python3}"

fetch_checkpoints() {
  local oq="${ORBITQUANT_PYTHON:-$ROOT/.venv/bin/python}" cmds
  cmds="$(cd "$ROOT" && "$oq" -W ignore::RuntimeWarning -m orbitquant.harness.metrics.vbench_assets --fetch-commands \
          --dimensions "$FETCH" --python "$ENV_DIR/bin/python" $LOCAL)"
  if [ -z "$cmds" ]; then
    echo "VBench checkpoints for $FETCH: all present"
    return
  fi
  echo "$cmds"
  bash -euxo pipefail -c "$cmds"
  echo "VBench checkpoints for $FETCH: fetched"
}

if [ -n "$FETCH_ONLY" ]; then
  fetch_checkpoints
  exit 0
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"  # the pair measured with vbench 0.1.5

"$PY" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install --upgrade pip
"$ENV_DIR/bin/pip" install "$TORCH_SPEC" "$TORCHVISION_SPEC"
"$ENV_DIR/bin/pip" install "$TORCH_SPEC" "$TORCHVISION_SPEC" vbench 'setuptools<81' imageio imageio-ffmpeg
# detectron2 is needed by the object-based dimensions (not the paper's eight); see VBench's README if you need them.

mkdir -p "$ENV_DIR/prompts"
"$ENV_DIR/bin/python" - "$ENV_DIR/prompts" <<'PYEOF'
import json, os, sys
import vbench
out = sys.argv[1]
info = json.load(open(os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")))
prompts = list(dict.fromkeys(d["prompt_en"] for d in info))
open(os.path.join(out, "all_dimension.txt"), "w").write("\n".join(prompts) + "\n")
paper = ["imaging_quality", "aesthetic_quality", "motion_smoothness", "dynamic_degree", "background_consistency",
         "subject_consistency", "scene", "overall_consistency"]
quick = []
for dim in paper:
    quick += [d["prompt_en"] for d in info if dim in d["dimension"] and d["prompt_en"] not in quick][:4]
open(os.path.join(out, "quick.txt"), "w").write("\n".join(quick) + "\n")
print(f"{len(prompts)} standard prompts, {len(quick)} quick prompts -> {out}")
PYEOF
"$ENV_DIR/bin/python" -c "import vbench; print('vbench', vbench.__file__)"
echo "VBench environment ready: $ENV_DIR/bin/python"
if [ -n "$FETCH" ]; then
  fetch_checkpoints
fi
