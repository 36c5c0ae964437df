"""Speed and peak memory of PacCRF message passing on CPU, against plain-convolution message passing.

Set-up: 5 mean-field steps, two 5x5 '4d' kernels (dilations 1 and 2), 21 x 256 x 256 unaries, batch 1.
Cases:
  (a) default          PacCRF, pac.py's lean path (native_impl=False)
  (b) checkpoint       PacCRF(checkpoint_steps=True)
  (c) native           PacCRF(native_impl=True), plain autograd through unfold
  (d) conv             the same CRF loop with 'na' kernels: plain nn.Conv2d(21, 21, 5) messages

Each case runs in a fresh subprocess, --rounds times, the cases interleaved so that a changing machine
load affects all of them alike. A subprocess times --repeats runs (forward with autograd recording, and
forward + backward) and keeps the median; the table shows the median over rounds. Peak memory =
ru_maxrss of the subprocess (peak resident set size) minus the ru_maxrss measured after imports,
inputs, model and a small warm-up run: the peak extra memory of the timed forward + backward runs.
By default torch runs on one thread (--threads 1): on a shared machine that gives stable numbers;
--threads 0 keeps torch's default.

Usage:
    python bench/bench_crf.py                # all cases, prints a table
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
    return dict(case=case, forward_s=statistics.median(forward_times), fwd_bwd_s=statistics.median(total_times),
                peak_mb=max_rss_mb() - baseline, baseline_mb=baseline, threads=torch.get_num_threads())


def run_in_subprocess(case: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, '--case', case, '--size', str(args.size), '--classes', str(args.classes),
           '--steps', str(args.steps), '--repeats', str(args.repeats), '--threads', str(args.threads)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results: dict, args: argparse.Namespace) -> None:
    ref = results['conv']
    print(f'PacCRF CPU benchmark: {args.steps} mean-field steps, two 5x5 kernels (dilations {DILATIONS}), '
          f'{args.classes}x{args.size}x{args.size} unaries, batch 1, {ref["threads"]} threads, '
          f'median of {args.rounds} rounds x {args.repeats} runs; load average before / after: '
          f'{args.load[0]:.2f} / {args.load[1]:.2f}')
    print('peak memory = ru_maxrss of a fresh subprocess minus its ru_maxrss after imports, inputs, model '
          'and warm-up (peak extra resident memory of forward + backward)')
    header = f'{"case":32s} {"forward s":>10s} {"fwd+bwd s":>10s} {"peak MB":>9s} {"fwd/(d)":>8s} ' \
             f'{"fwd+bwd/(d)":>12s} {"peak/(d)":>9s}'
    print(header)
    print('-' * len(header))
    for case, label in CASES.items():
        if case not in results:
            continue
        r = results[case]
        print(f'{label:32s} {r["forward_s"]:10.3f} {r["fwd_bwd_s"]:10.3f} {r["peak_mb"]:9.1f} '
              f'{r["forward_s"] / ref["forward_s"]:8.2f} {r["fwd_bwd_s"] / ref["fwd_bwd_s"]:12.2f} '
              f'{r["peak_mb"] / max(ref["peak_mb"], 1e-9):9.2f}')
    default = results.get('default')
    if default:
        print(f'targets for (a): fwd+bwd within 3x of (d): {default["fwd_bwd_s"] / ref["fwd_bwd_s"]:.2f}x; '
              f'peak under 300 MB: {default["peak_mb"]:.1f} MB (2019 code: 4.4 s and 3 GB)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--case', choices=sorted(CASES), help='run one case in this process, print JSON')
    parser.add_argument('--cases', nargs='+', choices=sorted(CASES), default=list(CASES),
                        help='cases to run (conv is always run: it is the reference of the ratios)')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--classes', type=int, default=21)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=2, help='timed runs per subprocess')
    parser.add_argument('--rounds', type=int, default=2, help='fresh subprocesses per case, interleaved')
    parser.add_argument('--threads', type=int, default=1, help='torch threads (0: torch default)')
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.classes, args.steps, args.repeats, args.threads)))
        return
    from tqdm import tqdm
    load_before = os.getloadavg()[0]
    cases = list(dict.fromkeys(['conv'] + args.cases))
    runs = {case: [] for case in cases}
    with tqdm(total=len(cases) * args.rounds, desc='subprocesses') as bar:
        for _ in range(args.rounds):
            for case in cases:
                runs[case].append(run_in_subprocess(case, args))
                bar.update()
    args.load = (load_before, os.getloadavg()[0])
    results = {case: {key: statistics.median(run[key] for run in case_runs) for key in case_runs[0]
                      if key != 'case'} for case, case_runs in runs.items()}
    print_table(results, args)


if __name__ == '__main__':
    main()
