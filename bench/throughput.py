"""Benchmark (not a test; not run in CI): training throughput of lorasweep's loop against a minimal
hand-written diffusers + peft loop (bench/reference_loop.py), same model, data, batch, resolution, dtype.

Every (configuration, loop) pair runs in a fresh child process (``--child``), so its peak RSS is that loop's
alone and neither loop inherits the other's warm caches or allocator state. In each child: ``--warmup``
steps are excluded, then ``--steps`` steps are timed between the end of the last warm-up step and the end
of the last step (lorasweep's step-0 and final validation, latent caching and model loading lie outside).
Both loops read the loss back every step (lorasweep with ``training.log_every_n_steps=1``, the reference as
diffusers' script does), so a step's end is its true end on CUDA too.

Models:
  tiny  the embedded tiny SD-1.x model (built once under $LORASWEEP_CACHE_DIR), 64 px, batch 2 and 4.
  sd15  SD-1.5's full architecture with random weights (bench/sd15_arch.py), 256 px, batch 1, fp32 on the
        CPU: the setting of the issue's kohya reference figure; targets ≤ 5.0 s/step, ≤ 6 GiB peak RSS,
        ≤ 3.5 s/step with latent caching, and lorasweep/reference ≥ 1.0 everywhere.
Both: LoRA dim 4 (tiny: the default 8) on the UNet's and text encoder's attention projections
(``network.target=attention``, the modules diffusers' script adapts), AdamW, constant lr, grad-norm clip 1.

On a machine shared with other work, ``--repeats N`` runs every child N times, alternating the loops, and
keeps each one's fastest run; ``--threads 1`` makes the figures far steadier there (the "ls/ref CPU" column,
CPU time per step, is steadier than wall time too). ``--override KEY=VALUE ...`` passes lorasweep config
overrides (e.g. ``training.channels_last=false``) to see what a setting costs.

Prints a table and writes bench/results/throughput-<model>-<device>.json (or ``--json PATH``).

    python bench/throughput.py --model tiny [--repeats 3]
    nice -n 10 python bench/throughput.py --model sd15                    # ~15 min on 2 CPU cores
    python bench/throughput.py --model sd15 --device cuda --resolution 512 --batch 1 4 --precision fp16 bf16

Imports: torch, diffusers, transformers, peft, accelerate and lorasweep (with hydra/omegaconf) only; the
table is plain text. Needs no network (children run with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LOOPS = ("lorasweep", "reference")
#: The issue's CPU targets for the sd15 setting (256 px, batch 1, fp32, LoRA dim 4 on UNet + text encoder).
TARGET_S_PER_STEP = {False: 5.0, True: 3.5}  # by cache_latents
TARGET_RSS_GIB = 6.0
TARGET_RATIO = 1.0


@dataclass(frozen=True)
class Spec:
    """One child run: a loop in one configuration."""

    model: str
    loop: str
    device: str
    resolution: int
    batch: int
    precision: str
    cache_latents: bool
    warmup: int
    steps: int
    dim: int
    seed: int
    target: str
    cast_base: bool
    threads: int | None = None
    overrides: tuple[str, ...] = ()
    spawn_time: float = 0.0

    @property
    def row(self) -> tuple[int, str, bool]:
        return self.batch, self.precision, self.cache_latents


# ------------------------------------------------------------------------------------------------------------
# child


def _overrides(spec: Spec) -> list[str]:
    """lorasweep's config for the spec (Hydra override grammar). Validation runs only at step 0 and at the
    end (outside the timed window), on one timestep, so it costs little start-up time; sampling is off."""
    out = [f"training.max_steps={spec.warmup + spec.steps}", f"training.batch_size={spec.batch}",
           f"training.device={spec.device}", f"training.seed={spec.seed}", "training.log_every_n_steps=1",
           f"data.resolution={spec.resolution}", f"data.cache_latents={str(spec.cache_latents).lower()}",
           f"network.dim={spec.dim}", f"network.target={spec.target}", f"precision.mixed={MIXED[spec.precision]}",
           "sampling.enabled=false", "validation.every_n_steps=null", "validation.timesteps=[500]",
           "validation.repeats=1", "tracking.enabled=false"]
    if spec.model == "sd15":  # kohya's bucket sides around the training resolution (conf/data/folder.yaml at 512)
        step = 64 if spec.resolution % 64 == 0 else 8
        out += [f"data.buckets.min_side={max(step, spec.resolution // 2)}",
                f"data.buckets.max_side={2 * spec.resolution}", f"data.buckets.step={step}"]
    return [*out, *spec.overrides]


def _items(tc: Any) -> tuple[list[Any], list[Any]]:
    """Training and validation items as ``lorasweep train`` splits them (``lorasweep.job.preflight``, whose
    module is not imported here: it pulls in the console/tracking stack the GPU machine may lack)."""
    from lorasweep.config.paths import cache_root
    from lorasweep.data.dataset import scan_folder, split_validation
    from lorasweep.data.synthetic import write_concept_dataset

    if tc.data.train_dir:
        root = Path(tc.data.train_dir).expanduser()
    else:  # lorasweep.job.SYNTHETIC_DIR
        root = write_concept_dataset(cache_root(tc.model.cache_dir) / "data" / "synthetic-zorb")
    return split_validation(scan_folder(root, tc.data.caption_extension).items, tc.validation.split,
                            tc.validation.seed)


class _BenchRecorder:
    """lorasweep's ``Recorder``: step ends go to the clock, the loop's own throughput figure is kept."""

    def __init__(self, clock: Any, milestones: dict[str, float], spawn_time: float, base: Any) -> None:
        self.clock = clock
        self.milestones = milestones
        self.spawn_time = spawn_time
        self.base = base
        self.reported_steps_per_s: dict[int, float] = {}
        self.lora_modules = 0

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if "throughput/steps_per_s" in values:
            self.reported_steps_per_s[step] = values["throughput/steps_per_s"]

    def samples(self, step: int, samples: list[Any]) -> None:
        pass

    def progress(self, step: int, total: int, loss: float | None) -> None:
        self.clock.mark(step, loss)
        if step in (0, 1):
            self.milestones[f"step{step}_done" if step else "training_starts"] = time.time() - self.spawn_time
        if step == 1:  # while training: the loop takes its LoRA off the base when it returns
            self.lora_modules = _lora_modules(self.base.unet, self.base.text_encoder)

    def snapshot(self, epoch: int, step: int, tensors: dict[str, Any], plan: Any, *, by_step: bool = False) -> None:
        pass


def _patch_loader_timing(waits: list[tuple[float, float]]) -> None:
    """Time every batch fetch of lorasweep's loop (the loop logs no data-wait figure of its own)."""
    from lorasweep.data.loader import TrainData

    original = TrainData.loader

    class Timed:
        def __init__(self, loader: Any) -> None:
            self.loader = loader

        def __iter__(self) -> Any:
            iterator = iter(self.loader)
            while True:
                start = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                waits.append((start, time.perf_counter()))
                yield item

    def loader(self: TrainData, epoch: int, *, start_batch: int = 0) -> Any:
        return Timed(original(self, epoch, start_batch=start_batch))

    TrainData.loader = loader  # type: ignore[method-assign]


def _lora_modules(*modules: Any) -> int:
    return sum(1 for m in modules for name, _ in m.named_modules() if name.endswith(".lora_A"))


def run_child(spec: Spec) -> dict[str, Any]:
    milestones: dict[str, float] = {}
    import torch

    from _measure import StepClock, machine_info
    from lorasweep.app import compose
    from lorasweep.models.loading import load_base_model, quiet_libraries
    from lorasweep.training.loop import train
    from reference_loop import lorasweep_batches, train_reference
    from sd15_arch import build_sd15_base

    milestones["imported"] = time.time() - spec.spawn_time
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    tc = compose(_overrides(spec)).train_config()
    train_items, val_items = _items(tc)
    milestones["data_ready"] = time.time() - spec.spawn_time
    quiet_libraries()
    base = load_base_model(tc.model) if spec.model == "tiny" else build_sd15_base(seed=spec.seed, device=device)
    milestones["model_ready"] = time.time() - spec.spawn_time
    clock = StepClock(device, spec.warmup)
    out: dict[str, Any] = {"spec": asdict(spec), "machine": machine_info(device)}
    if spec.loop == "lorasweep":
        waits: list[tuple[float, float]] = []
        _patch_loader_timing(waits)
        recorder = _BenchRecorder(clock, milestones, spec.spawn_time, base)
        train(tc, base, train_items, val_items, recorder)
        summary = clock.summary(spec.batch)
        summary["lora_modules"] = recorder.lora_modules
        w0, w1, _, _ = clock.window()
        wait = sum(end - start for start, end in waits if w0 < end <= w1)
        reported = [v for s, v in recorder.reported_steps_per_s.items() if s > spec.warmup]
        summary.update(data_wait_share=wait / (w1 - w0),
                       loop_reported_steps_per_s=len(reported) / sum(1 / v for v in reported) if reported else None)
    else:
        batches = lorasweep_batches(train_items, tc.data, seed=tc.training.seed, batch_size=spec.batch,
                                    count=spec.warmup + spec.steps)
        milestones["batches_ready"] = time.time() - spec.spawn_time
        n_modules = train_reference(base, batches, clock, dim=tc.network.dim, alpha=tc.network.effective_alpha,
                        lr=tc.optimizer.lr, weight_decay=tc.optimizer.weight_decay,
                        max_grad_norm=tc.training.max_grad_norm, seed=tc.training.seed, device=device,
                        mixed=MIXED[spec.precision], cache_latents=spec.cache_latents,
                        cast_base=spec.cast_base, target=spec.target,
                        allow_tf32=bool(getattr(tc.precision, "tf32", False)))
        summary = clock.summary(spec.batch)
        summary.update(data_wait_share=0.0, lora_modules=n_modules)  # batches in memory: its best case
    out.update(summary, milestones=milestones)
    return out


# ------------------------------------------------------------------------------------------------------------
# parent


def run_spec(spec: Spec, log_dir: Path) -> dict[str, Any]:
    """Run one child; its stdout/stderr go to a log file (shown on failure)."""
    spec = Spec(**{**asdict(spec), "spawn_time": time.time()})
    result_path = log_dir / f"{spec.loop}-b{spec.batch}-{spec.precision}-cache{int(spec.cache_latents)}.json"
    log_path = result_path.with_suffix(".log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(asdict(spec)),
                               "--child-out", str(result_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        print(f"  {spec.loop} {spec.row} FAILED (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"spec": asdict(spec), "error": tail}
    return json.loads(result_path.read_text())


def _pairs(specs: list[Spec]) -> list[list[Spec]]:
    """Consecutive specs of one configuration (its loops), in order."""
    groups: dict[tuple[int, str, bool], list[Spec]] = {}
    for spec in specs:
        groups.setdefault(spec.row, []).append(spec)
    return list(groups.values())


def _fastest(spec_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the best s/step (the least disturbed by other load), with every repeat's s/step kept."""
    good = [r for r in spec_runs if "error" not in r]
    if not good:
        return spec_runs[-1]
    best = dict(min(good, key=lambda r: r["s_per_step"]))
    best["repeats_s_per_step"] = [r["s_per_step"] for r in good]
    return best


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _targets(result: dict[str, Any], ratio: float | None) -> str:
    spec = result["spec"]
    marks = []
    if spec["model"] == "sd15" and spec["device"] == "cpu" and spec["loop"] == "lorasweep":
        limit = TARGET_S_PER_STEP[spec["cache_latents"]]
        marks.append(f"s/step≤{limit}:{'ok' if result['s_per_step'] <= limit else 'MISS'}")
        rss_ok = result["peak_rss_bytes"] / 2**30 <= TARGET_RSS_GIB
        marks.append(f"RSS≤{TARGET_RSS_GIB:g}GiB:{'ok' if rss_ok else 'MISS'}")
    if ratio is not None:
        marks.append(f"ratio≥{TARGET_RATIO:g}:{'ok' if ratio >= TARGET_RATIO else 'MISS'}")
    return " ".join(marks)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    from _measure import gib, plain_table

    by_row: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in results:
        s = r["spec"]
        by_row.setdefault((s["batch"], s["precision"], s["cache_latents"]), {})[s["loop"]] = r
    cuda = args.device == "cuda"
    header = ["batch/prec/cache", "loop", "s/step", "it/s", "samples/s", "CPU s/step",
              "peak CUDA GiB" if cuda else "peak RSS GiB", "data wait", "ls/ref", "ls/ref CPU", "1st step s", "targets"]
    rows, loss_lines, summary_rows = [], [], []
    for (batch, precision, cache), loops in by_row.items():
        ls, ref = loops.get("lorasweep"), loops.get("reference")
        ok = ls is not None and ref is not None and "error" not in ls and "error" not in ref
        ratio = ls["steps_per_s"] / ref["steps_per_s"] if ok else None
        cpu_ratio = ref["cpu_s_per_step"] / ls["cpu_s_per_step"] if ok else None
        for name in LOOPS:
            r = loops.get(name)
            if r is None:
                continue
            label = f"{batch}/{precision}/{'on' if cache else 'off'}"
            if "error" in r:
                rows.append([label, name, "FAILED", *[""] * (len(header) - 3)])
                continue
            memory = r.get("cuda_peak_bytes") if cuda else r["peak_rss_bytes"]
            first = r["milestones"].get("step1_done") if name == "lorasweep" else None
            rows.append([label, name, f"{r['s_per_step']:.3f}", f"{r['steps_per_s']:.2f}", f"{r['samples_per_s']:.2f}",
                         f"{r['cpu_s_per_step']:.2f}", gib(memory), f"{100 * r['data_wait_share']:.1f}%",
                         f"{ratio:.3f}" if ratio is not None and name == "lorasweep" else "",
                         f"{cpu_ratio:.3f}" if cpu_ratio is not None and name == "lorasweep" else "",
                         f"{first:.1f}" if first is not None else "", _targets(r, ratio if name == "lorasweep"
                                                                               else None)])
        if ok:
            k = max(1, min(10, len(ls["losses"]) // 3))
            loss_lines.append(
                f"  {batch}/{precision}/{'on' if cache else 'off'}: step-1 loss lorasweep {ls['losses'][0]:.5f}, "
                f"reference {ref['losses'][0]:.5f}; mean of first {k} → last {k} steps: lorasweep "
                f"{_mean(ls['losses'][:k]):.5f} → {_mean(ls['losses'][-k:]):.5f}, reference "
                f"{_mean(ref['losses'][:k]):.5f} → {_mean(ref['losses'][-k:]):.5f}")
            if ls["lora_modules"] != ref["lora_modules"]:
                loss_lines.append(f"  WARNING: LoRA modules differ: lorasweep {ls['lora_modules']}, "
                                  f"reference {ref['lora_modules']}")
            summary_rows.append({"batch": batch, "precision": precision, "cache_latents": cache,
                                 "ratio_steps_per_s": ratio, "ratio_cpu_s_per_step": cpu_ratio})
    first = next((r for r in results if "error" not in r), None)
    machine = first["machine"] if first else {}
    title = (f"Training throughput, model {args.model}, {args.resolution} px, {args.steps} timed steps after "
             f"{args.warmup} warm-up, on {machine.get('device_name') or machine.get('cpu', '?')} "
             f"({machine.get('cpu_count')} CPUs, torch {machine.get('torch')})")
    print()
    print(plain_table(title, header, rows))
    print("losses (same data, seeds, noise and timesteps; equal step-1 losses when latents are not cached):")
    print("\n".join(loss_lines))
    print("ls/ref: lorasweep's steps/s over the reference's (≥ 1 = lorasweep as fast); ls/ref CPU: the same on "
          "process CPU time per step, steadier than wall time when other work shares the cores.")
    print("data wait: lorasweep's batch fetches inside the window; the reference's batches are prepared in memory.")
    print("1st step s: lorasweep, from process start (imports, data, model, LoRA, caching, step-0 validation) to the"
          " end of step 1.")
    return {"model": args.model, "device": args.device, "resolution": args.resolution, "warmup": args.warmup,
            "steps": args.steps, "machine": machine, "ratios": summary_rows, "runs": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="px (tiny: 64, sd15: 256)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (tiny: 2 4, sd15: 1)")
    parser.add_argument("--precision", choices=tuple(MIXED), nargs="+", default=["fp32"])
    parser.add_argument("--cache", choices=("off", "on"), nargs="+", default=["off", "on"],
                        help="latent caching rows (data.cache_latents; the reference then encodes once too)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 50, sd15: 10 on cpu, 30 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (tiny: 10, sd15: 3)")
    parser.add_argument("--dim", type=int, default=None, help="LoRA rank (tiny: 8, the default run's; sd15: 4)")
    parser.add_argument("--target", choices=("attention", "kohya"), default="attention",
                        help="LoRA modules: attention projections (diffusers' script) or kohya's set")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reference-cast-base", action="store_true",
                        help="reference keeps the frozen base in the autocast dtype, as diffusers' script does "
                             "(default: float32 base + autocast, as lorasweep)")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra lorasweep config overrides (Hydra grammar), e.g. training.channels_last=false; "
                             "the reference takes lr, weight decay, clipping, seed, dim and alpha from the result")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in both loops (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every child this many times, alternating the loops; report the fastest")
    parser.add_argument("--loops", choices=LOOPS, nargs="+", default=list(LOOPS))
    parser.add_argument("--json", type=Path, default=None,
                        help="where the JSON goes (default bench/results/throughput-<model>-<device>.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    args.resolution = args.resolution or (64 if tiny else 256)
    args.batch = args.batch or ([2, 4] if tiny else [1])
    args.warmup = 10 if args.warmup is None and tiny else 3 if args.warmup is None else args.warmup
    args.steps = args.steps or (50 if tiny else 30 if args.device == "cuda" else 10)
    args.dim = args.dim or (8 if tiny else 4)
    if args.device == "cpu" and "fp16" in args.precision:
        parser.error("fp16 needs CUDA (lorasweep refuses precision.mixed=fp16 on the CPU); use bf16 or fp32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, str(HERE.parent))
        result = run_child(Spec(**json.loads(args.child)))
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    specs = [Spec(args.model, loop, args.device, args.resolution, batch, precision, cache == "on", args.warmup,
                  args.steps, args.dim, args.seed, args.target, args.reference_cast_base, args.threads,
                  tuple(args.override))
             for batch in args.batch for precision in args.precision for cache in args.cache for loop in args.loops]
    runs: dict[Spec, list[dict[str, Any]]] = {spec: [] for spec in specs}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for repeat in range(args.repeats):
            # Alternate the loops, reversing the order on every other repeat, so slow drifts in the machine's
            # load (other processes) hit both loops alike.
            order = specs if repeat % 2 == 0 else [s for pair in _pairs(specs) for s in reversed(pair)]
            for i, spec in enumerate(order, start=1):
                print(f"[{repeat + 1}.{i}/{args.repeats}.{len(specs)}] {spec.loop}: batch {spec.batch}, "
                      f"{spec.precision}, cache_latents={spec.cache_latents}", flush=True)
                started = time.perf_counter()
                runs[spec].append(run_spec(spec, Path(tmp)))
                print(f"    {time.perf_counter() - started:.0f} s", flush=True)
    results = [_fastest(spec_runs) for spec_runs in runs.values()]
    record = report(results, args)
    path = args.json or RESULTS / f"throughput-{args.model}-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
