"""Speed and peak memory of PacCRF message passing on CPU, against plain-convolution message passing.

Set-up: 5 mean-field steps, two 5x5 '4d' kernels (dilations 1 and 2), 21 x 256 x 256 unaries, batch 1.
Cases:
  (a) default          PacCRF, pac.py's lean path (native_impl=False)
  (b) checkpoint       PacCRF(checkpoint_steps=True)
  (c) native           PacCRF(native_impl=True), plain autograd through unfold
  (d) conv             the same CRF loop with 'na' kernels: plain nn.Conv2d(21, 21, 5) messages

Every measurement runs in a fresh subprocess.
- Time: --rounds subprocesses per case, the cases interleaved so that a changing machine load affects
  all of them alike. A subprocess times --repeats runs (forward with autograd recording, and forward +
  backward) and keeps the median; the table shows the median over rounds.
- Memory: peak RSS = ru_maxrss of the subprocess minus its ru_maxrss after imports, inputs, model and a
  small warm-up run, i.e. the peak extra resident memory of forward + backward. It is measured twice:
  "RSS" in the timing subprocesses (glibc's default malloc, what a user sees; freed blocks may stay in
  the process) and "live" in a separate subprocess run with MALLOC_MMAP_THRESHOLD_=131072, so that every
  tensor larger than 128 KiB is mapped on allocation and returned to the OS on free, and the peak RSS
  tracks the peak of live memory (it slows allocation down, so that subprocess is not timed).
By default torch runs on one thread (--threads 1): on a shared machine that gives stable numbers;
--threads 0 keeps torch's default.

Usage:
    python bench/bench_crf.py                # all cases, prints a table (about 5 minutes)
    python bench/bench_crf.py --size 128     # smaller, quicker
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CASES = {
    'default': '(a) PacCRF default (lean)',
    'checkpoint': '(b) checkpoint_steps=True',
    'native': '(c) native_impl=True',
    'conv': '(d) plain nn.Conv2d messages',
}
DILATIONS = (1, 2)
LIVE_MEMORY_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'}


def build_crf(case: str, classes: int, steps: int):
    from paccrf import PacCRF
    compat = 'na' if case == 'conv' else '4d'
    kernels = [dict(kernel_size=5, dilation=d, compat_type=compat, spatial_filter=False) for d in DILATIONS]
    return PacCRF(classes, steps, pairwise_kernels=kernels, native_impl=case == 'native',
                  checkpoint_steps=case == 'checkpoint')


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def run_case(case: str, size: int, classes: int, steps: int, repeats: int, threads: int) -> dict:
    """Measure one case in this process (called in a fresh subprocess)."""
    import torch
    from paccrf import create_YXRGB
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    crf = build_crf(case, classes, steps)

    def make_inputs(n):
        unary = torch.randn(1, classes, n, n, requires_grad=True)
        feats = create_YXRGB(torch.rand(1, 3, n, n) * 255, yx_scale=100.0, rgb_scale=30.0)
        return unary, feats, torch.randn(1, classes, n, n)

    def forward_backward(unary, feats, seed):
        (crf(unary, feats) * seed).sum().backward()

    forward_backward(*make_inputs(32))  # warm-up: lazy imports and allocator set-up outside the peak
    unary, feats, seed = make_inputs(size)
    crf.zero_grad()
    baseline = max_rss_mb()
    forward_times, total_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = crf(unary, feats)
        forward_times.append(time.perf_counter() - start)
        del out
        unary.grad = None
        start = time.perf_counter()
        forward_backward(unary, feats, seed)
        total_times.append(time.perf_counter() - start)
    return dict(forward_s=statistics.median(forward_times), fwd_bwd_s=statistics.median(total_times),
                peak_mb=max_rss_mb() - baseline, threads=torch.get_num_threads())


def run_in_subprocess(case: str, args: argparse.Namespace, live_memory: bool = False) -> dict:
    cmd = [sys.executable, __file__, '--case', case, '--size', str(args.size), '--classes', str(args.classes),
           '--steps', str(args.steps), '--repeats', '1' if live_memory else str(args.repeats),
           '--threads', str(args.threads)]
    env = {**os.environ, **LIVE_MEMORY_ENV} if live_memory else None
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratio(value: float, reference: float) -> str:
    return f'{value / reference:.2f}' if reference > 0 else 'n/a'


def print_table(results: dict, args: argparse.Namespace) -> None:
    ref = results['conv']
    print(f'PacCRF CPU benchmark: {args.steps} mean-field steps, two 5x5 kernels (dilations {DILATIONS}), '
          f'{args.classes}x{args.size}x{args.size} unaries, batch 1, {int(ref["threads"])} thread(s); times: median of '
          f'{args.rounds} rounds x {args.repeats} runs; load average before / after: {args.load[0]:.2f} / '
          f'{args.load[1]:.2f}')
    print('memory: peak extra RSS of forward + backward over a fresh subprocess\'s baseline (ru_maxrss); '
          '"RSS" with glibc\'s default malloc, "live" with MALLOC_MMAP_THRESHOLD_=131072 (tracks live tensors)')
    header = (f'{"case":30s} {"fwd s":>7s} {"fwd+bwd s":>9s} {"RSS MB":>7s} {"live MB":>7s} | {"fwd/(d)":>7s} '
              f'{"fwd+bwd/(d)":>11s} {"RSS/(d)":>7s} {"live/(d)":>8s}')
    print(header)
    print('-' * len(header))
    for case, label in CASES.items():
        if case not in results:
            continue
        r = results[case]
        print(f'{label:30s} {r["forward_s"]:7.3f} {r["fwd_bwd_s"]:9.3f} {r["peak_mb"]:7.1f} {r["live_mb"]:7.1f} | '
              f'{ratio(r["forward_s"], ref["forward_s"]):>7s} {ratio(r["fwd_bwd_s"], ref["fwd_bwd_s"]):>11s} '
              f'{ratio(r["peak_mb"], ref["peak_mb"]):>7s} {ratio(r["live_mb"], ref["live_mb"]):>8s}')
    for case in ('default', 'checkpoint'):
        if case in results:
            r = results[case]
            print(f'targets for {CASES[case]}: fwd+bwd within 3x of (d): {ratio(r["fwd_bwd_s"], ref["fwd_bwd_s"])}x; '
                  f'memory under 300 MB: RSS {r["peak_mb"]:.0f} MB, live {r["live_mb"]:.0f} MB')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--case', choices=sorted(CASES), help='run one case in this process, print JSON')
    parser.add_argument('--cases', nargs='+', choices=sorted(CASES), default=list(CASES),
                        help='cases to run (conv is always run: it is the reference of the ratios)')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--classes', type=int, default=21)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=2, help='timed runs per subprocess')
    parser.add_argument('--rounds', type=int, default=2, help='timing subprocesses per case, interleaved')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.classes, args.steps, args.repeats, args.threads)))
        return
    from tqdm import tqdm
    load_before = os.getloadavg()[0]
    cases = list(dict.fromkeys(['conv'] + args.cases))
    runs = {case: [] for case in cases}
    live = {}
    with tqdm(total=len(cases) * (args.rounds + 1), desc='subprocesses') as bar:
        for _ in range(args.rounds):
            for case in cases:
                runs[case].append(run_in_subprocess(case, args))
                bar.update()
        for case in cases:
            live[case] = run_in_subprocess(case, args, live_memory=True)['peak_mb']
            bar.update()
    args.load = (load_before, os.getloadavg()[0])
    results = {case: {**{key: statistics.median(run[key] for run in case_runs) for key in case_runs[0]},
                      'live_mb': live[case]} for case, case_runs in runs.items()}
    print_table(results, args)


if __name__ == '__main__':
    main()
