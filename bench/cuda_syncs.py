"""Device check (not a test; needs CUDA): which host-device synchronisations lorasweep's training loop makes.

Trains the embedded tiny model for ``--steps`` steps on CUDA with PyTorch's sync debug mode on and attributes
every synchronisation it reports to lorasweep's source lines. The loop should synchronise only where it
reads the loss back (every ``training.log_every_n_steps``), besides the setup (latent caching, validation
data) and the validations, which lie outside the steps.

    python bench/cuda_syncs.py [--steps 20] [--log-every 5] [--override data.cache_latents=false ...]
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Recorder:
    """lorasweep's ``Recorder`` that keeps only the step the loop has reached."""

    def __init__(self) -> None:
        self.step: int | None = None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.step = step

    def samples(self, step: int, samples: list[Any]) -> None:
        pass

    def snapshot(self, *args: Any, **kwargs: Any) -> None:
        pass

    def progress(self, step: int, total: int, loss: float | None) -> None:
        self.step = step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch

    from lorasweep.app import compose
    from lorasweep.models.loading import load_base_model, quiet_libraries
    from lorasweep.training.loop import train
    from throughput import _items

    tc = compose([f"training.max_steps={args.steps}", "training.batch_size=4", "training.device=cuda",
                  f"training.log_every_n_steps={args.log_every}", "validation.every_n_steps=null",
                  "validation.repeats=1", "sampling.enabled=false", "tracking.enabled=false",
                  *args.override]).train_config()
    train_items, val_items = _items(tc)
    quiet_libraries()
    base = load_base_model(tc.model)
    recorder = _Recorder()
    sites: collections.Counter[str] = collections.Counter()
    steps: dict[str, set[int | None]] = collections.defaultdict(set)

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "lorasweep/" in f.filename]
        site = " <- ".join(f"{f.filename.split('src/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[site] += 1
        steps[site].add(recorder.step)

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        train(tc, base, train_items, val_items, recorder)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"{args.steps} steps, loss read every {args.log_every}, overrides {args.override}: "
          f"{sum(sites.values())} synchronisations")
    for site, count in sites.most_common():
        seen = sorted(s for s in steps[site] if s is not None)
        print(f"{count:5d}  last step reported before them: {seen}{' and before step 0' if None in steps[site] else ''}"
              f"\n       {site or '(outside lorasweep)'}")


if __name__ == "__main__":
    main()
