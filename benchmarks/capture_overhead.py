"""Generation time with and without activation capture, as a ratio measured in one run.

The model is the full-size SD1.5 architecture with random weights (built offline), so the
hook count (32 sites) and tensor sizes are those of the real model; weights do not change the
cost. Runs alternate plain / captured to cancel drift; the ratio is of the medians.

    python benchmarks/capture_overhead.py                      # CPU: 128 px, 4 steps
    python benchmarks/capture_overhead.py --device cuda --resolution 512 --steps 20 --batch 8
    python benchmarks/capture_overhead.py --model tiny-flux    # a family's tiny replica
    python benchmarks/capture_overhead.py --capture head-maps  # per-head maps of 2 words

``--capture head-maps`` times per-head word maps (``icm.hooks.head_maps``) of two words at every
``attn2`` site instead, and reports the summed maps' bytes per image.

``--model`` picks the full-size SD1.5 architecture (default) or a tiny replica of another
family (``tiny-sdxl``, ``tiny-sana``, ``tiny-flux``: every site of the family's kinds, at
the replica's size, so the ratio there is an upper bound dominated by hook overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from icm.hooks.capture import capture_activations
from icm.hooks.head_maps import capture_head_maps
from icm.models.tiny import build_sd15_pipeline
from icm.models.tiny_flux import build_tiny_flux
from icm.models.tiny_sana import build_tiny_sana
from icm.models.tiny_sdxl import build_tiny_sdxl

#: --model: (builder, call keywords); tiny replicas run at their own size.
MODELS = {
    "sd15-full": (lambda: build_sd15_pipeline("full", seed=0), {}),
    "tiny-sdxl": (build_tiny_sdxl, {"size": 32}),
    "tiny-sana": (build_tiny_sana, {"size": 32, "use_resolution_binning": False,
                                    "complex_human_instruction": None,
                                    "max_sequence_length": 16}),
    "tiny-flux": (build_tiny_flux, {"size": 16, "max_sequence_length": 16}),
}


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--model", default="sd15-full", choices=sorted(MODELS))
    parser.add_argument("--capture", default="activations", choices=["activations", "head-maps"],
                        help="what is captured: token-mean activations of every site, or the "
                             "per-head maps of two words at every attn2 site")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float16 if args.device == "cuda" else torch.float32

    build, extra = MODELS[args.model]
    pipe = build().to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a person"] * args.batch
    size = args.resolution if args.model == "sd15-full" else extra.pop("size")

    def generate() -> None:
        generator = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
        pipe(prompts, num_inference_steps=args.steps, height=size, width=size,
             generator=generator, output_type="np", **extra)

    map_bytes: list[int] = []

    def generate_captured() -> None:
        if args.capture == "head-maps":
            with capture_head_maps(pipe, prompts, ["photo", "person"]) as maps:
                generate()
                batch = maps.pop()  # includes the one device-to-host copy per batch
            map_bytes[:] = [sum(m.nbytes for m in batch.maps.values()) // args.batch]
            return
        with capture_activations(pipe) as cap:
            generate()
            cap.pop()  # includes the one device-to-host copy per batch

    generate(), generate_captured()  # warm-up: allocator, kernels, caches
    plain, captured = [], []
    for i in range(args.repeats):
        order = [(plain, generate), (captured, generate_captured)]
        for times, fn in order if i % 2 == 0 else order[::-1]:
            times.append(timed(fn, args.device))
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads}",
        "dtype": str(dtype).removeprefix("torch."),
        "model": args.model,
        "capture": args.capture,
        "resolution": size,
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "plain_median_s": statistics.median(plain),
        "capture_median_s": statistics.median(captured),
        "torch": torch.__version__,
    }
    result["ratio"] = result["capture_median_s"] / result["plain_median_s"]
    if map_bytes:
        result["map_bytes_per_image"] = map_bytes[0]
    print(json.dumps(result, indent=2))
    label = args.model + (" (head maps, 2 words)" if args.capture == "head-maps" else "")
    print(f"| {label} | {result['device']} | {result['dtype']} | {size} px, {args.steps} steps, "
          f"batch {args.batch} | {result['plain_median_s']:.3f} s | "
          f"{result['capture_median_s']:.3f} s | {result['ratio']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
