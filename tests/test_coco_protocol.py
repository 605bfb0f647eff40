"""The COCO text-to-image protocol: its prompt file names the image of each caption, and FID's reference is those
images (scripts/make_coco_prompts.py, data.load_prompts on .jsonl, references.reference_files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orbitquant.harness.data import load_prompts
from orbitquant.harness.metrics.references import reference_files

REPO = Path(__file__).resolve().parents[1]


def _annotations(n_images: int = 20) -> dict:
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    anns = []
    for i in range(n_images):  # three captions per image, ids out of order
        for j, k in enumerate((3, 1, 2)):
            anns.append({"id": 10 * i + k, "image_id": 1000 + i, "caption": f"  image {i} caption {k}\n"})
    return {"images": images, "annotations": anns}


def test_make_coco_prompts_pairs_each_caption_with_its_image(tmp_path, capsys):
    ann = tmp_path / "captions_val2014.json"
    ann.write_text(json.dumps(_annotations()))
    out = tmp_path / "coco.jsonl"
    sys.path.insert(0, str(REPO / "scripts"))
    from make_coco_prompts import main

    args = ["--annotations", str(ann), "--out", str(out), "--n", "5", "--seed", "3"]
    assert main(args) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 5 and [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    for r in rows:  # the lowest annotation id's caption, whitespace normalised, with that image's file
        i = r["image_id"] - 1000
        assert r["caption"] == f"image {i} caption 1" and r["file_name"] == f"COCO_val2014_{1000 + i:012d}.jpg"
    assert [r["image_id"] for r in rows] != list(range(1000, 1005))  # a seeded draw, not the first files by name
    first = out.read_text()
    assert main(args) == 0 and out.read_text() == first  # deterministic
    assert main(args[:-1] + ["4"]) == 0
    assert out.read_text() != first  # another seed, another draw
    # the protocol reads the captions as prompts, FID reads the file names as its reference, in the same order
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert load_prompts(str(out)) == [r["caption"] for r in rows]
    assert reference_files(out) == [r["file_name"] for r in rows]
    assert main(args[:-4] + ["--n", "99"]) == 2 and "more than the 20 captioned images" in capsys.readouterr().err
