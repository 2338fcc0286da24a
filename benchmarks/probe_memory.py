"""Peak memory of probe fitting: read step by step (``icm.io.activations.StepStack``) vs all at
once.

Writes synthetic stores of one width group (``--sites`` sites of ``--width`` channels) for
each (samples, steps) of the grid, then fits one pair's probes in a fresh process per run,
the way ``fit_probes`` does, and reports the peak resident memory of the fit above the
process's memory before it (sampled every 2 ms), and the store's read throughput. Goal (issue 12):
the streamed peak does not grow with the number of steps.

    python benchmarks/probe_memory.py                       # 8 sites x 1280, N 250/500, 10/40 steps
    python benchmarks/probe_memory.py --sites 16 --samples 500 1000 --steps 10 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, samples: int, steps: int, sites: int, width: int) -> list[str]:
    """A store of ``sites`` planted-signal sites, written in batches of 100 samples."""
    from icm.generation.samples import plan_samples
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter

    rng = np.random.default_rng(0)
    names = [f"down_blocks.2.attentions.0.transformer_blocks.{k}.attn1" for k in range(sites)]
    plan = plan_samples(["a photo of a person"], samples, base_seed=0)
    with ActivationStoreWriter(path, plan, {}, chunk_samples=128) as writer:
        for start in range(0, samples, 100):
            n = min(100, samples - start)
            label = np.arange(start, start + n) % 2
            acts = {}
            for name in names:
                x = rng.standard_normal((n, steps, width)).astype(np.float32)
                x[:, :, 0] += (2 * label - 1)[:, None] * np.linspace(0, 2, steps)
                acts[name] = x
            writer.write(CapturedBatch(acts, np.linspace(999, 1, steps)))
    return names


def _rss_mb() -> float:
    """Resident set size now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Samples the RSS every 2 ms on a thread: the peak of a block above its start."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.start, self.peak, self._stop = _rss_mb(), 0.0, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mb())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def above_start(self) -> float:
        return self.peak - self.start


def _fit(store: str, names: list[str], mode: str, out) -> None:
    import torch  # noqa: F401  (imports count in the baseline, not in the peak)

    from icm.io.activations import StepStack, read_sites
    from icm.probing.probes import Pair, fit_pair

    samples = StepStack([store], names).shape[0]
    labels = np.where(np.arange(samples) % 2, "b", "a")
    start = time.perf_counter()
    with PeakRSS() as memory:
        if mode == "streamed":
            activations = StepStack([store], names)
        else:
            activations = read_sites([store], names)[1]
        fit_pair(activations, labels, Pair("a", "b"))
    out.put((memory.above_start, time.perf_counter() - start))


def measure(store: Path, names: list[str], mode: str) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_fit, args=(str(store), names, mode, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def read_throughput(store: Path, names: list[str]) -> float:
    """MB/s reading every step of every site once, as the streamed fit does."""
    from icm.io.activations import StepStack

    stack = StepStack([str(store)], names)
    start = time.perf_counter()
    nbytes = sum(stack.step(t).nbytes for t in range(stack.shape[2]))
    return nbytes / 1e6 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--samples", type=int, nargs="+", default=[250, 500])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    args = parser.parse_args()
    print(f"{args.sites} sites of width {args.width}")
    print("| samples | steps | data | streamed peak | all-at-once peak | streamed fit | read |")
    print("|---|---|---|---|---|---|---|")
    for samples in args.samples:
        for steps in args.steps:
            folder = Path(tempfile.mkdtemp(prefix="probe-memory-"))
            try:
                names = write_store(folder / "s.zarr", samples, steps, args.sites, args.width)
                data = samples * steps * args.sites * args.width * 4 / 1e6
                streamed, seconds = measure(folder / "s.zarr", names, "streamed")
                eager, _ = measure(folder / "s.zarr", names, "eager")
                speed = read_throughput(folder / "s.zarr", names)
                print(f"| {samples} | {steps} | {data:.0f} MB | {streamed:.0f} MB | "
                      f"{eager:.0f} MB | {seconds:.1f} s | {speed:.0f} MB/s |", flush=True)
            finally:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
