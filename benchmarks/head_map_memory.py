"""Peak memory of head relevance at SDXL's head count, on synthetic maps of the real shapes.

SDXL's 70 cross-attention sites hold 1,300 heads (10 at width 640, 20 at width 1,280, heads
of 64 channels); at 1,024 px their maps are 64 x 64 (width 640) and 32 x 32 (width 1,280).
Each stage runs in its own process on random maps of those shapes for ``--images`` images
of two word slots, the masks at the image size; the peak resident memory of the process is
reported beside the memory of its input maps. The oracle segments heads at the image size,
a block of ``ORACLE_BLOCK_BYTES`` at a time; all at once it would hold images x heads x
H x W floats (``--images 4``: 1,300 x 4 x 1,024^2 x 4 bytes, about 20 GiB, before the
boolean masks).

    .venv/bin/python benchmarks/head_map_memory.py            # every stage, 4 images
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

STAGES = ("oracle", "agreement", "concentration", "scorer")
HEAD_CHANNELS = 64


def sdxl_maps(images: int, resolution: int = 1024, seed: int = 0) -> dict[str, np.ndarray]:
    """(images, heads, 2 words, y, x) float32 maps for every attn2 site of full-size SDXL."""
    from icm.models.configs import sdxl_unet_config
    from icm.models.meta import denoiser_on_meta, site_table

    rng = np.random.default_rng(seed)
    latent = resolution // 8
    maps = {}
    for row in site_table(denoiser_on_meta(sdxl_unet_config())):
        if row["kind"] != "attn2":
            continue
        side = latent // (2 if row["width"] == 640 else 4)
        heads = row["width"] // HEAD_CHANNELS
        maps[row["site"]] = rng.random((images, heads, 2, side, side), dtype=np.float32)
    return maps


def run(stage: str, images: int, resolution: int) -> dict[str, float]:
    from icm.head_maps.evaluation import WordScorer
    from icm.head_maps.relevance import agreement, concentration, oracle_iou

    maps = sdxl_maps(images, resolution)
    heads = sum(m.shape[1] for m in maps.values())
    masks = np.zeros((images, resolution, resolution), dtype=bool)
    masks[:, resolution // 4: resolution // 2, resolution // 4: resolution // 2] = True
    start = time.perf_counter()
    if stage == "oracle":
        oracle_iou(maps, 0, masks)
    elif stage == "agreement":
        agreement(maps, 0)
    elif stage == "concentration":
        concentration(maps, 0)
    else:
        WordScorer(maps, 0, masks).ious(None, 0.4)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    inputs = sum(m.nbytes for m in maps.values()) / 2**30
    return {"stage": stage, "heads": heads, "sites": len(maps), "images": images,
            "inputs_gib": inputs, "peak_gib": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--stage", choices=STAGES, help="run one stage in this process")
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run(args.stage, args.images, args.resolution)))
        return
    print("| stage | sites | heads | images | input maps | peak resident | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for stage in STAGES:
        done = subprocess.run([sys.executable, __file__, "--stage", stage, "--images",
                               str(args.images), "--resolution", str(args.resolution)],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {row['stage']} | {row['sites']} | {row['heads']:,} | {row['images']} | "
              f"{row['inputs_gib']:.2f} GiB | {row['peak_gib']:.2f} GiB | "
              f"{row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
