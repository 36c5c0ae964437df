"""Training steps next to busy neighbours: how much PacJointUpsample slows down against the plain-convolution DJIF.

    python bench/bench_busy.py                       # x4, batch 4 of 64x64 crops (the README demo), 2 busy jobs
    python bench/bench_busy.py --factor 8 --crop 128 --busy 1

One training step = forward, MSE loss, backward and an Adam step, with torch's default threads (--threads). Each
model is timed in a fresh subprocess (median of --steps steps after two warm-up steps), first alone and then while
--busy other processes multiply --busy-size matrices in a loop with torch's default threads. The busy processes
are started and stopped by this script, and end by themselves in any case once every measurement could have
timed out (--timeout).
Printed: each model's slowdown (busy time / alone time) and the ratio of PAC's slowdown to DJIF's (the project's
target: at most 1.25). "Alone" means without this script's busy processes: the load average shows what else ran.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import DEFAULT_IMPL, IMPLS, median_time, run_worker, set_pac_impl, set_threads

MODELS = ("PacJointUpsample", "DJIF")
BUSY_SCRIPT = """
import sys, time, torch
size, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
a = torch.randn(size, size)
print('ready', flush=True)
while time.monotonic() < deadline:
    a = torch.tanh(a @ a)
"""


def _worker(model: str, impl: str, factor: int, batch: int, crop: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from task_jointUpsampling.models import create_model

    result = {"threads": set_threads(threads)}
    torch.manual_seed(0)
    net = create_model(model, factor)
    set_pac_impl(net, impl)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    low = torch.rand(batch, 1, crop // factor, crop // factor)
    guide, target = torch.rand(batch, 3, crop, crop), torch.rand(batch, 1, crop, crop)

    def train_step():
        optimizer.zero_grad()
        F.mse_loss(net(low, guide), target).backward()
        optimizer.step()

    result["seconds"] = median_time(train_step, steps, warmup=2)
    return result


def _start_busy(count: int, size: int, timeout: float) -> list:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT, str(size), str(timeout)], stdout=subprocess.PIPE,
                              text=True) for _ in range(count)]
    for proc in procs:
        proc.stdout.readline()  # 'ready': torch imported, the loop starts
    return procs


def _stop_busy(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)
        proc.stdout.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per measurement (median)")
    parser.add_argument("--impl", default=DEFAULT_IMPL, choices=list(IMPLS), help="PAC implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the trained model (0: default)")
    parser.add_argument("--busy", type=int, default=2, help="number of busy processes")
    parser.add_argument("--busy-size", type=int, default=1024, help="side of the busy processes' matrices")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a measurement is abandoned")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model, impl, factor, batch, crop, steps, threads = args.worker
        print(json.dumps(_worker(model, impl, *map(int, (factor, batch, crop, steps, threads)))))
        return

    import torch

    def measure(model):
        return run_worker(__file__, (model, args.impl, args.factor, args.batch, args.crop, args.steps, args.threads),
                          timeout=args.timeout)

    print(f"torch {torch.__version__}, one training step (forward, backward, Adam) of x{args.factor} joint "
          f"upsampling, batch {args.batch} of {args.crop}x{args.crop}, PAC impl {args.impl}; {args.busy} busy "
          f"process(es) multiplying {args.busy_size}x{args.busy_size} matrices")
    load_alone = os.getloadavg()[0]
    alone = {model: measure(model) for model in MODELS}
    busy = _start_busy(args.busy, args.busy_size, len(MODELS) * args.timeout + 60)
    try:
        loaded = {model: measure(model) for model in MODELS}
        load_busy = os.getloadavg()[0]
    finally:
        _stop_busy(busy)
    print(f"load average: {load_alone:.2f} before the alone runs, {load_busy:.2f} at the end of the busy runs")
    header = f"{'model':<18}{'threads':>8}{'alone s/step':>14}{'busy s/step':>13}{'slowdown':>10}"
    print(header)
    print("-" * len(header))
    slowdown = {}
    for model in MODELS:
        a, b = alone[model], loaded[model]
        cells = [f"{r['seconds']:.3f}" if "seconds" in r else "failed" for r in (a, b)]
        if "seconds" in a and "seconds" in b:
            slowdown[model] = b["seconds"] / a["seconds"]
        print(f"{model:<18}{a.get('threads', ''):>8}{cells[0]:>14}{cells[1]:>13}"
              f"{f'{slowdown[model]:.2f}x' if model in slowdown else '':>10}")
        for r in (a, b):
            if "error" in r:
                print(f"  {r['error']}")
    if len(slowdown) == 2:
        print(f"PAC slowdown / DJIF slowdown: {slowdown['PacJointUpsample'] / slowdown['DJIF']:.2f} "
              f"(target: at most 1.25)")


if __name__ == "__main__":
    main()
