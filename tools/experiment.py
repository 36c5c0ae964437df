"""The experiment harness shared by the task programs: one training loop, one resume policy, one checkpoint
format, and distributed training under ``torchrun``.

A task program declares its flags (the common ones come from :func:`tools.cli.add_common_arguments`), then
hands :func:`run` a :class:`Task`: the model, the data, the loss of a batch and the sums a test reduces to.
The harness does the rest:

* seeding (``--seed -1``: a random 32-bit seed, printed and saved), device and ``--num-threads``;
* which snapshot to resume or test (:func:`plan_run`), ``--load-weights`` (an error when snapshots exist:
  ``--overwrite`` starts afresh from it) and strict weight loading;
* checkpoints ``weights_epoch_<n>.<fmt>`` (a plain state_dict, as the released weights) plus a training
  state ``{epoch, model, optimizer, scheduler, rng}`` written first (:func:`tools.runtime.save_checkpoint`);
* the 2019 learning-rate schedule: epoch ``e`` trains with ``lr * 0.1 ** (number of --lr-steps <= e)``;
* ``train.log`` / ``test.log`` (CSV, resumed without duplicate rows), ``log.png``, ``config.json``;
* under ``torchrun``: DistributedDataParallel (NCCL on CUDA, gloo on CPU), a ``DistributedSampler`` for
  training, the test set split without padding and its sums reduced, rank 0 as the only writer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from tools.runtime import (CheckpointError, CsvLog, find_snapshots, load_checkpoint_state, remove_stale_temp_files,
                           resolve_device, save_checkpoint, seed_everything, write_bytes_atomic)

__all__ = ['Task', 'Plan', 'RunResult', 'Distributed', 'setup_distributed', 'resolve_seed', 'lr_schedule',
           'make_scheduler', 'plan_run', 'run', 'shard_indices', 'weights_digest', 'is_writer']

SNAPSHOT_PREFIX = 'weights_epoch_'


# ---------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: world size 1 and rank 0 without torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = 'auto') -> tuple[Distributed, torch.device]:
    """Join the process group when torchrun started this process (``WORLD_SIZE`` > 1 in the environment).

    Returns (place, device): on CUDA each process takes ``cuda:<LOCAL_RANK>`` and NCCL, on CPU gloo.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return Distributed(), resolve_device(device_name)
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Distributed(rank, world_size, local_rank), device


def is_writer() -> bool:
    """True in a plain run and on rank 0 of a torchrun job: the process that writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard_indices(length: int, place: Distributed) -> list[int]:
    """The test samples of one rank: every ``world_size``-th, no padding (so reduced sums count each once)."""
    return list(range(place.rank, length, place.world_size))


class _ShardSampler(Sampler):
    def __init__(self, length: int, place: Distributed):
        self.indices = shard_indices(length, place)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names, dtypes, shapes and values (the same on any device)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)}'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def check_same_weights(model: nn.Module, place: Distributed) -> str:
    """Compare the ranks' weights digests (DDP keeps replicas equal: a difference is a bug, not noise)."""
    digest = weights_digest(model.state_dict())
    digests = [None] * place.world_size
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f'the ranks ended with different weights (digests {sorted(set(digests))})')
    if place.is_writer:
        print(f'all {place.world_size} ranks hold the same weights (sha256 {digest})')
    return digest


def all_reduce_sums(sums: dict[str, torch.Tensor], place: Distributed,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Sum every tensor of ``sums`` over the ranks (float64 on the communication device)."""
    if not place.enabled:
        return sums
    reduced = {}
    for name, value in sums.items():
        tensor = torch.as_tensor(value, dtype=torch.float64).to(device)
        dist.all_reduce(tensor)
        reduced[name] = tensor.cpu()
    return reduced


# ---------------------------------------------------------------------------------------------- seeding, lr
def resolve_seed(seed: int, place: Distributed = Distributed()) -> int:
    """``seed``, or for -1 a random seed in [0, 2**32) (the same on every rank)."""
    if seed >= 0:
        return seed
    value = torch.tensor(int.from_bytes(os.urandom(4), 'little'), dtype=torch.int64)
    if place.enabled:
        dist.broadcast(value, 0)
    return int(value)


def lr_schedule(lr: float, lr_steps: Sequence[int] | None, epochs: int) -> list[float]:
    """The learning rate of epochs 1..epochs: ``lr * 0.1 ** (number of lr_steps <= e)`` (both 2019 programs)."""
    return [lr * 0.1 ** sum(step <= epoch for step in lr_steps or ()) for epoch in range(1, epochs + 1)]


def make_scheduler(optimizer: torch.optim.Optimizer, lr_steps: Sequence[int] | None):
    """MultiStepLR stepped after each epoch. The 2019 programs stepped it before each epoch; milestones shifted by
    one give the same lr per epoch (:func:`lr_schedule`) without PyTorch's order warning."""
    milestones = sorted(m - 1 for m in (lr_steps or []))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def rng_states() -> dict:
    """Python, NumPy and torch RNG states as types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'python': random.getstate(), 'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss),
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states['python'])
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if states.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


# ---------------------------------------------------------------------------------------------- the task
class Task:
    """What a task program supplies. Subclasses set the attributes and override the methods below."""
    train_columns: Sequence[str] = ()
    train_formats: Sequence[str] = ()
    test_columns: Sequence[str] = ()
    test_formats: Sequence[str] = ()
    measures: Sequence[str] = ()  # plotted in log.png next to the loss
    state_prefixes: Sequence[str] = ('state_epoch_',)  # every training-state file name a snapshot may have
    drop_last: bool = False  # drop a last partial training batch (when there is more than one batch)
    place: Distributed = Distributed()  # set by run()
    device: torch.device = torch.device('cpu')  # set by run()
    worker_init_fn: Optional[Callable[[int], None]] = None

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def state_prefix(self) -> str:
        """The training-state file name of this run's snapshots: ``<prefix><epoch>.pth``."""
        return self.state_prefixes[0]

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def has_initial_weights(self, model: nn.Module) -> bool:
        """True when the untrained model is meaningful to test (e.g. hand-set or parameter-free)."""
        return False

    def check_plan(self, plan: 'Plan') -> None:
        """Task-specific checks of the run's plan (raise ValueError)."""

    def load_weights(self, model: nn.Module, spec: str, strict: bool) -> None:
        raise NotImplementedError

    def load_snapshot(self, model: nn.Module, path: Path, epoch: int) -> None:
        self.load_weights(model, str(path), strict=True)

    def snapshot_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def train_set(self, epoch: int) -> Dataset:
        """The training set of ``epoch``; return the same object to keep it (and its loader) across epochs."""
        raise NotImplementedError

    def test_set(self) -> Dataset:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """(loss, output) of one training batch."""
        raise NotImplementedError

    def train_meter(self, epoch: int, lr: float, batches: int) -> 'TrainMeter':
        raise NotImplementedError

    def test_sums(self, model: nn.Module, loader: DataLoader, desc: str, save_images: int) -> dict[str, Any]:
        """Sums over this process's test samples (summed over the ranks before :meth:`test_result`)."""
        raise NotImplementedError

    def test_result(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The measures (a dict with 'loss') from the reduced sums."""
        raise NotImplementedError

    def test_row(self, epoch: int, lr: float, result: dict[str, Any]) -> list:
        raise NotImplementedError

    def report(self, epoch: int | None, result: dict[str, Any]) -> None:
        raise NotImplementedError

    def num_images(self, test_only: bool) -> int:
        """How many test samples to write as images at the final test."""
        return 0


class TrainMeter:
    """Accumulates one epoch's training batches into train.log rows (supplied by the task)."""

    def update(self, loss: torch.Tensor, output: Any, batch: Any, seconds: float, data_seconds: float) -> None:
        raise NotImplementedError

    def row(self, progress: float) -> list:
        raise NotImplementedError

    def summary(self) -> str:
        return ''


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Plan:
    """What a run will do, decided (and checked) before any work starts."""
    epochs: int  # the epochs to reach (0 for a model without trainable parameters)
    last_epoch: int  # the epoch the run starts from
    resume_from: int | None  # the snapshot to load, if any

    @property
    def test_only(self) -> bool:
        return self.epochs <= self.last_epoch


def snapshot_files(exp_root: Path, state_prefixes: Iterable[str]) -> list[Path]:
    """The weights and state files of every snapshot in ``exp_root``."""
    found = [*find_snapshots(exp_root, SNAPSHOT_PREFIX).values()]
    for prefix in state_prefixes:
        found += find_snapshots(exp_root, prefix).values()
    return sorted({same for path in found for same in (path.with_suffix('.pth'), path.with_suffix('.safetensors'))
                   if same.is_file()})


def plan_run(args: argparse.Namespace, task: Task, model: nn.Module) -> Plan:
    """Check what the flags ask of ``--exp-root`` before any work: the snapshot to resume or test, that its training
    state matches, that --overwrite spares --load-weights, and that there are weights to test.

    Training resumes from the latest snapshot not beyond --epochs; a test-only run tests the latest snapshot unless
    --load-weights is given. A snapshot beyond --epochs (and none at --epochs) is an error: the run would truncate
    that later training's logs. --load-weights in a folder with snapshots to resume is an error (--overwrite)."""
    exp_root = Path(args.exp_root)
    trainable = bool(task.parameters(model))
    epochs = args.epochs if trainable else 0
    if epochs > 0 and args.overwrite and args.load_weights and os.path.isfile(args.load_weights):
        if any(os.path.samefile(args.load_weights, p) for p in snapshot_files(exp_root, task.state_prefixes)):
            raise ValueError(f'--overwrite would delete {args.load_weights}, the file --load-weights names; copy it '
                             f'out of {exp_root} first (or use another --exp-root)')
    # --overwrite starts training afresh; a test-only run deletes nothing, so it still sees the snapshots
    snapshots = {} if args.overwrite and epochs > 0 else find_snapshots(exp_root, SNAPSHOT_PREFIX)
    if epochs == 0:
        plan = Plan(0, 0, max(snapshots) if snapshots and not args.load_weights else None)
    else:
        later = [e for e in snapshots if e > epochs]
        if later and epochs not in snapshots:
            raise ValueError(f'--epochs {epochs}: {exp_root} holds snapshots of later epochs '
                             f'({", ".join(map(str, later))}) and none of epoch {epochs}; continuing would truncate '
                             f'their logs. Test one with --epochs 0 (the latest) or --epochs {max(later)}, or start '
                             'afresh with --overwrite')
        done = [e for e in snapshots if e <= epochs]
        if done and args.load_weights:
            raise ValueError(f'--load-weights {args.load_weights!r}: {exp_root} already holds snapshots to resume '
                             'from; pass --overwrite to start a fresh run from these weights')
        plan = Plan(epochs, max(done, default=0), max(done) if done else None)
    task.check_plan(plan)
    if plan.resume_from is not None and not plan.test_only:
        load_state(exp_root, task, plan.resume_from)  # fails now, not after the first test, when the state is bad
    if plan.epochs == 0 and trainable and plan.resume_from is None and not args.load_weights \
            and not task.has_initial_weights(model):
        raise ValueError(f'{args.model}: nothing to test: no snapshot in {exp_root} and no --load-weights '
                         '(train with --epochs N, or pass --load-weights)')
    return plan


def state_path(exp_root: Path, task: Task, epoch: int) -> Path:
    return exp_root / f'{task.state_prefix()}{epoch}.pth'


def load_state(exp_root: Path, task: Task, epoch: int) -> dict:
    """The training state of snapshot ``epoch``; a 2019-style optimizer file holds the optimizer state itself."""
    try:
        state = load_checkpoint_state(find_snapshots(exp_root, SNAPSHOT_PREFIX)[epoch],
                                      state_path(exp_root, task, epoch))
    except CheckpointError as err:
        raise ValueError(f'cannot resume: {err}. Test it with --epochs {epoch}, start from it with --load-weights '
                         f'<a copy> --overwrite, or start afresh with --overwrite') from None
    return state if 'optimizer' in state else {'optimizer': state}


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    model: nn.Module
    result: dict[str, Any]  # the last test's measures (and 'loss')
    epoch: int
    trained: bool
    train_seconds: float = 0.0
    plan: Plan | None = None
    extras: dict = field(default_factory=dict)


def make_optimizer(args: argparse.Namespace, params: list) -> torch.optim.Optimizer:
    if not params:
        raise ValueError(f'model {args.model!r} has no trainable parameters; it can only be tested (--epochs 0)')
    if args.optimizer == 'Adam':
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == 'SGD':
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    raise ValueError(f"--optimizer: {args.optimizer!r} is not supported; expected 'Adam' or 'SGD'")


def make_loader(task: Task, dataset: Dataset, batch_size: int, train: bool, place: Distributed,
                device: torch.device, seed: int, epoch: int = 0) -> DataLoader:
    """Shuffled (per rank, DistributedSampler) for training; split without padding for testing."""
    workers = task.args.num_data_worker
    options = dict(num_workers=workers, pin_memory=device.type == 'cuda', worker_init_fn=task.worker_init_fn)
    if train:
        drop_last = task.drop_last and len(dataset) // place.world_size > batch_size
        if place.enabled:
            sampler = torch.utils.data.DistributedSampler(dataset, place.world_size, place.rank, shuffle=True,
                                                          seed=seed)
            sampler.set_epoch(epoch)
            return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, **options)
        return DataLoader(dataset, batch_size, shuffle=True, drop_last=drop_last, **options)
    sampler = _ShardSampler(len(dataset), place) if place.enabled else None
    return DataLoader(dataset, batch_size, shuffle=False, sampler=sampler, **options)


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, loader: DataLoader, place: Distributed, device: torch.device,
             desc: str = 'test', save_images: int = 0) -> dict[str, Any]:
    """The test measures over the whole test set (every rank's shard), on a fork of the RNG: testing never
    changes the random stream of training (a resumed run, which starts with a test, repeats an uninterrupted one)."""
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        model.eval()
        sums = task.test_sums(model, loader, desc, save_images if place.is_writer else 0)
    return task.test_result(all_reduce_sums(sums, place, device))


def _progress(iterable, place: Distributed, **kwargs):
    return tqdm(iterable, disable=not place.is_writer or None, dynamic_ncols=True, **kwargs)


def train_epoch(task: Task, model: nn.Module, loader: DataLoader, optimizer, epoch: int, log: CsvLog | None,
                place: Distributed) -> str:
    args = task.args
    model.train()
    meter = task.train_meter(epoch, optimizer.param_groups[0]['lr'], len(loader))
    end = time.time()
    bar = _progress(loader, place, desc=f'epoch {epoch}/{args.epochs} train', leave=False)
    for step, batch in enumerate(bar, start=1):
        data_seconds = time.time() - end
        loss, output = task.train_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.update(loss.detach(), output, batch, time.time() - end, data_seconds)
        if place.is_writer:
            bar.set_postfix(loss=f'{loss.item():.4g}')
            if step % args.print_interval == 0:
                tqdm.write(f'epoch {epoch} [{step}/{len(loader)}] loss {loss.item():.6f}')
        if (step % args.log_interval == 0 or step == len(loader)) and log is not None:
            log.write(meter.row(epoch - 1 + step / len(loader)), task.train_formats)
        end = time.time()
    return meter.summary()


def write_config(args: argparse.Namespace, exp_root: Path, **resolved: Any) -> Path:
    """``config.json``: every flag as this run resolved it (the seed drawn for --seed -1, the device, ...)."""
    config = {**{k: v for k, v in vars(args).items()}, **resolved}
    path = exp_root / 'config.json'
    write_bytes_atomic((json.dumps(config, indent=2, sort_keys=True, default=str) + '\n').encode(), path)
    return path


def plot_logs(exp_root: Path, measures: Sequence[str]) -> None:
    from tools.plot_log import plot_logs as plot
    output = exp_root / 'log.png'
    plot([exp_root / 'train.log', exp_root / 'test.log'], output, plots=['loss', *measures], labels=['train', 'test'])
    print(f'wrote {output}')


def prepare(args: argparse.Namespace) -> tuple[Distributed, torch.device, int]:
    """Join torchrun's job if any, choose the device, set the threads and seed everything; (place, device, seed)."""
    place, device = setup_distributed(args.device)
    if getattr(args, 'num_threads', 0) > 0:
        torch.set_num_threads(args.num_threads)
    seed = resolve_seed(args.seed, place)
    seed_everything(seed)
    if args.seed < 0 and place.is_writer:
        print(f'seed {seed} (drawn for --seed -1)')
    return place, device, seed


def run(task: Task, place: Distributed, device: torch.device, seed: int, plan: Plan | None = None,
        model: nn.Module | None = None) -> RunResult:
    """Train and/or test ``task`` as its flags say (see the module docstring)."""
    args = task.args
    task.place, task.device = place, device
    exp_root = Path(args.exp_root)
    model = model if model is not None else task.build_model()
    plan = plan or plan_run(args, task, model)
    if args.epochs > 0 and not task.parameters(model):
        print(f'{args.model} has no trainable parameters: testing only')
    if plan.resume_from is not None:
        task.load_snapshot(model, find_snapshots(exp_root, SNAPSHOT_PREFIX)[plan.resume_from], plan.resume_from)
    elif args.load_weights:
        task.load_weights(model, args.load_weights, strict=not args.non_strict)
    model.to(device)
    test_loader = make_loader(task, task.test_set(), args.test_batch_size, False, place, device, seed)
    if plan.test_only:
        epoch = plan.resume_from if plan.resume_from is not None else plan.last_epoch
        result = evaluate(task, model, test_loader, place, device, desc=f'test {args.model}',
                          save_images=task.num_images(test_only=True))
        if place.is_writer:
            task.report(epoch, result)
        return RunResult(model, result, epoch, trained=False, plan=plan)
    return _train(task, model, plan, test_loader, place, device, seed)


def _train(task: Task, model: nn.Module, plan: Plan, test_loader: DataLoader, place: Distributed,
           device: torch.device, seed: int) -> RunResult:
    args = task.args
    exp_root = Path(args.exp_root)
    writer = place.is_writer
    if place.enabled:
        dist.barrier()  # every rank has planned (and read the snapshots) before rank 0 changes the folder
    if writer:
        exp_root.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temp_files(exp_root):  # a training run owns its folder (a test-only run may not)
            print(f'removed {stale}, left by an interrupted write')
        if args.overwrite:
            for path in snapshot_files(exp_root, task.state_prefixes):
                path.unlink()
        write_config(args, exp_root, seed=seed, device=str(device), world_size=place.world_size)
    optimizer = make_optimizer(args, task.parameters(model))
    scheduler = make_scheduler(optimizer, args.lr_steps)
    if plan.resume_from is not None:
        _resume(task, exp_root, plan.resume_from, optimizer, scheduler, place)
    net = model
    if place.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    resume_epoch = plan.last_epoch if plan.resume_from is not None else None
    train_log = test_log = None
    if writer:
        train_log = CsvLog(exp_root / 'train.log', task.train_columns, resume_epoch=resume_epoch)
        test_log = CsvLog(exp_root / 'test.log', task.test_columns, resume_epoch=resume_epoch)
    try:
        lr = optimizer.param_groups[0]['lr']
        result = evaluate(task, model, test_loader, place, device, desc=f'test epoch {plan.last_epoch}')
        if writer:
            task.report(plan.last_epoch, result)
            if resume_epoch is None:  # a resumed log already has this row
                test_log.write(task.test_row(plan.last_epoch, lr, result), task.test_formats)
        start = time.perf_counter()
        train_set, train_loader = None, None
        for epoch in _progress(range(plan.last_epoch + 1, plan.epochs + 1), place, desc=f'train {args.model}',
                               initial=plan.last_epoch, total=plan.epochs):
            dataset = task.train_set(epoch)
            if dataset is not train_set or place.enabled:  # DistributedSampler: a new shuffle per epoch
                train_set = dataset
                train_loader = make_loader(task, dataset, args.batch_size, True, place, device, seed, epoch)
            lr = optimizer.param_groups[0]['lr']
            summary = train_epoch(task, net, train_loader, optimizer, epoch, train_log, place)
            if writer and summary:
                tqdm.write(summary)
            scheduler.step()
            if epoch % args.test_interval == 0 or epoch == plan.epochs:
                final = epoch == plan.epochs
                result = evaluate(task, model, test_loader, place, device, desc=f'test epoch {epoch}',
                                  save_images=task.num_images(test_only=False) if final else 0)
                if writer:
                    test_log.write(task.test_row(epoch, lr, result), task.test_formats)
                    task.report(epoch, result)
            if writer and ((args.snapshot_interval > 0 and epoch % args.snapshot_interval == 0)
                           or epoch == plan.epochs):
                state = {'epoch': epoch, 'model': args.model, 'optimizer': optimizer.state_dict(),
                         'scheduler': scheduler.state_dict(), 'rng': rng_states()}
                save_checkpoint(task.snapshot_weights(model), state,
                                exp_root / f'{SNAPSHOT_PREFIX}{epoch}.{args.save_format}',
                                state_path(exp_root, task, epoch))
        train_seconds = time.perf_counter() - start
    finally:
        for log in (train_log, test_log):
            if log is not None:
                log.close()
    if place.enabled:
        check_same_weights(model, place)  # also makes every rank wait for the last snapshot
    if writer:
        plot_logs(exp_root, task.measures)
    return RunResult(model, result, plan.epochs, trained=True, train_seconds=train_seconds, plan=plan)


def _resume(task: Task, exp_root: Path, epoch: int, optimizer, scheduler, place: Distributed) -> None:
    state = load_state(exp_root, task, epoch)
    optimizer.load_state_dict(state['optimizer'])
    if 'scheduler' in state:
        scheduler.load_state_dict(state['scheduler'])
    else:  # an optimizer file of the 2019 program (or of this one before the harness) holds epoch's lr: move on
        lr = lr_schedule(task.args.lr, task.args.lr_steps, epoch + 1)[-1]
        for group in optimizer.param_groups:
            group['lr'] = lr
            group.setdefault('initial_lr', task.args.lr)
        scheduler.last_epoch = epoch
        scheduler._last_lr = [lr] * len(optimizer.param_groups)
    if 'rng' in state:
        set_rng_states(state['rng'])
    if place.is_writer:
        print(f'resuming after epoch {epoch}: optimizer state loaded from {state_path(exp_root, task, epoch)}'
              + (', with the scheduler and random states' if 'rng' in state else ''))
