#!/usr/bin/env bash
# Create VBench's own environment (vbench pins transformers 4.33 / numpy 1.26 / timm, which would break the main venv),
# and write the standard prompt lists the vbench protocols sample.
#
#   bash scripts/setup_vbench_env.sh [ENV_DIR]          # default ENV_DIR: .venv-vbench in the repository
#
# Then: ENV_DIR/bin/python is what the VBench metrics call (or set ORBITQUANT_VBENCH_PYTHON), and
#   ENV_DIR/prompts/all_dimension.txt  the standard suite (eval=vbench; ORBITQUANT_VBENCH_PROMPTS overrides)
#   ENV_DIR/prompts/quick.txt          4 prompts per paper dimension (eval=vbench_quick)
# VBench downloads its checkpoints (CLIP, AMT, RAFT, DINO, MUSIQ, GRiT, Tag2Text, ViCLIP) into ~/.cache/vbench on first
# use; on an offline machine copy that folder over and set the metrics' `local: true`.
# Env: PYTHON (interpreter for the venv, default python3), TORCH_SPEC / TORCHVISION_SPEC (pins matching your CUDA).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-$ROOT/.venv-vbench}"
PY="${PYTHON:-python3}"
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
