"""How the task programs end: a failure is one or two readable lines on stderr and exit status 1.

``--debug`` on the command line, or ``PACNET_DEBUG=1`` in the environment, shows the traceback
instead. Ctrl-C ends with status 130 and one line.

Example (the last lines of a task program's ``main.py``)::

    if __name__ == '__main__':
        sys.exit(run_cli(main, 'task_jointUpsampling.main'))
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["DEBUG_ENV", "ArgumentParser", "add_common_arguments", "check_common_args", "parse_checked",
           "debug_requested", "error_lines", "run_cli"]

DEBUG_ENV = "PACNET_DEBUG"
_MAX_LINE = 300


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are two lines (the error, a pointer to --help), not the
    whole usage text; the exit status stays argparse's 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n  (see --help)\n")


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is among the arguments or ``$PACNET_DEBUG`` is set to a true value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def error_lines(err: BaseException) -> list[str]:
    """The first two lines of an exception's message, shortened; the type name when it is bare."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    if not text or isinstance(err, (AssertionError, IndexError, KeyError, AttributeError, TypeError,
                                    EOFError, ZeroDivisionError, RuntimeError)):
        lines[0] = f"{type(err).__name__}: {lines[0]}" if text else lines[0]
    shown = [line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..." for line in lines[:2]]
    if len(lines) > 2:
        shown[-1] += f" (+{len(lines) - 2} more lines)"
    return shown


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], prog: str,
            argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` and turn any exception into two short stderr lines and an exit status.

    Returns:
        0 on success, 1 on an error, 130 on Ctrl-C (argparse's own exits, e.g. status 2 for a bad
        flag, pass through unchanged).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if debug_requested(argv):
            main(argv)
            return 0
        try:
            main(argv)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 (this is the program's last line of defence)
            lines = error_lines(err)
            hint = f"(--debug or {DEBUG_ENV}=1 shows the traceback)"
            print(f"{prog}: error: {lines[0]}", file=sys.stderr)
            print(f"  {lines[1]} {hint}" if len(lines) > 1 else f"  {hint}", file=sys.stderr)
            return 1
        return 0
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before the interpreter exits: left to the exit handlers, the
    communication threads can be torn down in the wrong order and abort the process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# The flags both task programs share (the 2019 programs had them all but --device, --num-threads, --non-strict,
# --debug and --save-format). Each task passes its own 2019 defaults; ``help`` overrides per-task help texts.
def add_common_arguments(parser: argparse.ArgumentParser, defaults: dict, help: Optional[dict] = None) -> None:
    """Declare the shared flags on ``parser`` with the task's ``defaults`` (a dict of dest -> default)."""
    texts = {
        'data_root': 'where data is found or downloaded',
        'exp_root': 'output folder (config.json, logs, snapshots, images)',
        'download': 'download the dataset if it is missing (checksum-verified)',
        'load_weights': 'state_dict to start from, loaded strictly: a path, URL or registry name (an error when '
                        '--exp-root holds snapshots to resume: add --overwrite to start afresh from it)',
        'model': 'model name', 'dataset': 'dataset',
        'num_data_worker': 'DataLoader worker processes',
        'device': "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (under torchrun: cuda:<LOCAL_RANK>)",
        'num_threads': 'CPU threads of torch (0: torch default); 1 is much faster on a busy machine',
        'val_ratio': 'fraction of the training images held out as val',
        'train_split': "'' = the dataset's training split", 'test_split': "'' = the dataset's test split",
        'batch_size': 'training batch size (per process under torchrun)',
        'test_batch_size': 'test batch size (per process under torchrun)',
        'train_crop': 'training crop size', 'epochs': '0 = test only', 'loss': 'training loss',
        'lr': 'learning rate', 'lr_steps': 'epochs from which lr is multiplied by a further 0.1 (epoch e trains with '
                                           'lr * 0.1 ** (number of steps <= e), as in 2019)',
        'weight_decay': 'weight decay', 'momentum': 'SGD momentum',
        'seed': 'seeds Python, NumPy and torch; -1: a random 32-bit seed (printed, saved in config.json)',
        'overwrite': 'train afresh: delete existing snapshots, restart the logs (refused when --load-weights names '
                     'one of those snapshots; a test-only run deletes nothing)',
        'print_interval': 'batches between printed lines', 'log_interval': 'batches between train.log rows',
        'test_interval': 'epochs between tests (the last epoch always)',
        'snapshot_interval': 'epochs between snapshots (the last epoch always)',
        'non_strict': '--load-weights: load the tensors that fit and list the rest (default: any mismatch is an '
                      'error)',
        'debug': f'show the traceback of an error (or set {DEBUG_ENV}=1); without it an error is a short message',
        'save_format': 'format of the weights_epoch_<n> snapshots (pth: torch.save, as in 2019; safetensors needs '
                       'the safetensors package); both load with --load-weights and resume',
        **(help or {})}
    types = dict(data_root=str, exp_root=str, load_weights=str, model=str, dataset=str, num_data_worker=int,
                 device=str, num_threads=int, val_ratio=float, train_split=str, test_split=str, batch_size=int,
                 test_batch_size=int, train_crop=int, epochs=int, loss=str, lr=float, weight_decay=float,
                 momentum=float, seed=int, print_interval=int, log_interval=int, test_interval=int,
                 snapshot_interval=int, save_format=str, optimizer=str)
    choices = dict(optimizer=('Adam', 'SGD'), save_format=('pth', 'safetensors'))
    for dest in ('data_root', 'exp_root', 'download', 'load_weights', 'model', 'dataset', 'num_data_worker',
                 'device', 'num_threads', 'val_ratio', 'train_split', 'test_split', 'batch_size', 'test_batch_size',
                 'train_crop', 'epochs', 'optimizer', 'loss', 'lr', 'lr_steps', 'weight_decay', 'momentum', 'seed',
                 'overwrite', 'print_interval', 'log_interval', 'test_interval', 'snapshot_interval', 'non_strict',
                 'debug', 'save_format'):
        flag = '--' + dest.replace('_', '-')
        extra = {'choices': defaults.get(f'{dest}_choices', choices.get(dest))} \
            if f'{dest}_choices' in defaults or dest in choices else {}
        if dest in ('download', 'overwrite', 'non_strict', 'debug'):
            parser.add_argument(flag, action='store_true', default=False, help=texts[dest])
        elif dest == 'lr_steps':
            parser.add_argument(flag, type=int, nargs='+', default=None, help=texts[dest])
        else:
            parser.add_argument(flag, type=types[dest], default=defaults[dest], help=texts.get(dest), **extra)


def check_common_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag for a bad value of a shared flag."""
    for name in ('batch_size', 'test_batch_size', 'print_interval', 'log_interval', 'test_interval'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('epochs', 'num_data_worker', 'num_threads', 'snapshot_interval'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    for name, strict in (('lr', True), ('weight_decay', False), ('momentum', False)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ValueError(f'--{name.replace("_", "-")} must be a finite number {">" if strict else ">="} 0, '
                             f'got {value}')
    if not (math.isfinite(args.val_ratio) and 0 <= args.val_ratio < 1):
        raise ValueError(f'--val-ratio must be in [0, 1), got {args.val_ratio}')
    if not -1 <= args.seed < 2 ** 32:
        raise ValueError(f'--seed must be -1 (a random seed) or in [0, 2**32), got {args.seed}')
    if any(step < 1 for step in args.lr_steps or ()):
        raise ValueError(f'--lr-steps must be epochs >= 1, got {args.lr_steps}')
    try:
        import weights
        weights.check_save_format(args.save_format)
    except ImportError as err:
        raise ValueError(f'--save-format: {err}') from None


def parse_checked(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                  check: Callable[[argparse.Namespace], None]) -> argparse.Namespace:
    """Parse ``argv`` and run ``check`` (which calls :func:`check_common_args`); its ValueError becomes
    ``parser.error`` (two lines, exit status 2)."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        parser.error(str(err))
    return args
