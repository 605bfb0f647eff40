"""The COCO text-to-image protocol's prompt file: N val2014 images drawn with a seed, one caption each, with the
file name of each caption's image -- so the FID reference is the images of the captions generated.

    python scripts/make_coco_prompts.py --annotations annotations/captions_val2014.json \
        --out data/coco/val2014_5k.jsonl [--n 5000] [--seed 0]

Input: COCO's caption annotations (``captions_val2014.json`` of the 2014 train/val annotations archive). Output:
JSON lines ``{"caption", "file_name", "image_id"}``, read by the ``coco_fid_clip`` protocol as its prompts and by its
FID as ``reference_files`` (the reference images are ``<val2014 folder>/<file_name>``). The selection: image ids
sorted, ``random.Random(seed).sample`` of N of them, kept in sorted order; each image's caption is its lowest
annotation id's (deterministic: the same file on every machine for the same annotations, N and seed).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def select(annotations: dict, n: int, seed: int) -> list[dict]:
    """N images (seeded sample of the sorted ids), one caption each (the lowest annotation id), sorted by id."""
    files = {im["id"]: im["file_name"] for im in annotations["images"]}
    first: dict[int, dict] = {}
    for a in annotations["annotations"]:
        if a["image_id"] in files and (a["image_id"] not in first or a["id"] < first[a["image_id"]]["id"]):
            first[a["image_id"]] = a
    ids = sorted(first)
    if n > len(ids):
        raise ValueError(f"--n {n} is more than the {len(ids)} captioned images in the annotations")
    chosen = sorted(random.Random(seed).sample(ids, n))
    return [{"caption": " ".join(first[i]["caption"].split()), "file_name": files[i], "image_id": i} for i in chosen]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--annotations", required=True, help="COCO captions_val2014.json")
    ap.add_argument("--out", required=True, help="the .jsonl to write (e.g. data/coco/val2014_5k.jsonl)")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = Path(args.annotations)
    if not path.is_file():
        print(f"error: {path} not found; it is in COCO's 2014 annotations archive (annotations_trainval2014.zip)",
              file=sys.stderr)
        return 2
    try:
        rows = select(json.loads(path.read_text()), args.n, args.seed)
    except (ValueError, KeyError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    from orbitquant.quant.atomic import atomic_write

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(Path(args.out), lambda f: f.write(text.encode()))
    print(f"{args.out}: {len(rows)} captions of {len(rows)} val2014 images (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
