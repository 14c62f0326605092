"""The training loop: one step and one epoch function, shared by the Ray Train worker and every harness."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from recsys_core.config import NightlyConfig, from_dict
from recsys_core.data.features import read_features, standardise
from recsys_core.data.prepare import PreparedPaths
from recsys_core.data.split import load_split
from recsys_core.eval.holdout import evaluate_histories
from recsys_core.model.checkpoint import cpu_state, load_checkpoint, save_model_folder
from recsys_core.model.towers import TwoTower, build_two_tower, text_table, unwrap
from recsys_core.runtime import quiet_train_worker
from recsys_core.train.ema import WeightAverage
from recsys_core.train.guard import apply_lora, guard_terms, replay_len, replay_windows
from recsys_core.train.objective import ItemTensors, Objective, collate

log = logging.getLogger(__name__)

VAL_METRIC = "val_ndcg10"
STATE = "train_state.pt"
T = TypeVar("T")


def steps_per_epoch(n_examples: int, world: int, batch_size: int) -> int:
    """The optimisation steps every rank runs each epoch: ``floor(n / (world * batch))``, at least 1.

    Ray Train's ``streaming_split(equal=True)`` gives each rank ``floor(n / world)`` rows, but not the
    same blocks, and ``iter_batches(local_shuffle_buffer_size=...)`` yields short batches at block
    boundaries mid-stream (ray-project/ray#66085): ranks would run different step counts and hang in
    DDP's all-reduce. Every rank yields at least ``ceil(rows / batch)`` batches, at least this cap."""
    if n_examples < world:
        raise ValueError(f"{n_examples} training examples cannot feed train.num_workers={world} workers")
    return max(1, n_examples // (world * batch_size))


def capped_batches(batches: Iterable[T], steps: int, rank: int) -> Iterator[T]:
    """Exactly ``steps`` batches of ``batches`` (the rest of the epoch's shard is left unread, and the
    source iterator is closed); a shard that ends before the cap is an error naming both counts."""
    it = iter(batches)
    n = 0
    try:
        while n < steps:
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"rank {rank}: the training shard ended after {n} batches, before the "
                                   f"common {steps} steps per epoch") from None
            n += 1
            yield batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def gather_steps(steps: int, world: int, device: torch.device) -> list[int]:
    """Every rank's step count this epoch (rank order), for the epoch's metrics."""
    if world == 1 or not dist.is_initialized():
        return [steps]
    mine = torch.tensor([steps], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def initial_model(cfg: NightlyConfig, n_items: int, init_from: str | None,
                  text_features: torch.Tensor | None = None) -> TwoTower:
    """Fresh (pretrained/named-size) or warm-started weights, with LoRA adapters when configured; a frozen
    item tower reads ``text_features`` (N, H), today's catalog's (``data.features``)."""
    if init_from:
        model, _ = load_checkpoint(init_from)
        if model.item_tower.frozen and text_features is not None:
            model.item_tower.text_features.copy_(text_features)
    else:
        model = build_two_tower(cfg.model, n_items, cfg.train.temperature, cfg.train.learn_temperature,
                                text_features)
    if model.item_tower.frozen:
        return model
    top = cfg.model.item_tower.train_top_layers
    if cfg.guard.lora.enabled:
        model.item_tower.backbone = apply_lora(model.item_tower.backbone, cfg.guard.lora, top)
        if model.item_tower.lm_head is not None:
            model.item_tower.lm_head.requires_grad_(False)
    elif model.item_tower.lm_head is not None:
        model.item_tower.lm_head.requires_grad_(cfg.guard.lm_weight > 0)  # DDP: no unused trainables
    model.item_tower.train_top_layers(top)  # k > 0: the blocks below the top k (and embeddings) frozen
    return model


def param_groups(model: TwoTower, tc: Any) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; the item tower's language-model body (or its LoRA
    adapters) at ``train.item_backbone_lr`` when set (pretrained bodies want a smaller step)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            body = n.startswith("item_tower.backbone.") and tc.item_backbone_lr is not None
            groups.setdefault((body, p.dim() >= 2), []).append(p)
    return [{"params": ps, "weight_decay": tc.weight_decay if matrix else 0.0,
             "lr": tc.item_backbone_lr if body else tc.lr} for (body, matrix), ps in sorted(groups.items())]


def train_step(objective: nn.Module, opt: torch.optim.Optimizer, sched: Any, params: Any, grad_clip: float,
               autocast: Any, *inputs: Any) -> float:
    """One optimisation step (forward under ``autocast``, backward, clip, step, schedule); the loss."""
    with autocast:
        loss = objective(*inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    if sched is not None:
        sched.step()
    return float(loss.detach())


@dataclass
class EpochStats:
    """What one pass of :func:`run_epoch` did."""

    losses: list[float] = field(default_factory=list)  # total loss per step
    samples: int = 0  # sequences seen
    step_s: float = 0.0  # the step loop's wall time, from the first batch's arrival to the last step
    parts: dict[str, list[float]] = field(default_factory=dict)  # loss terms per step (Objective.parts)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")

    def mean_parts(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.parts.items()}


def run_epoch(objective: nn.Module, opt: torch.optim.Optimizer, sched: Any, params: Any, grad_clip: float,
              autocast: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], items: ItemTensors,
              text_cache: torch.Tensor, *, replay: Callable[[], torch.Tensor] | None = None,
              max_steps: int | None = None, max_seconds: float | None = None,
              on_step: Callable[[EpochStats], None] | None = None) -> EpochStats:
    """The one epoch loop (the Ray Train worker, the benchmarks' plain loops and harnesses): a
    :func:`train_step` per ``(seq, tgt, mask)`` batch (each (B, L), on the model's device) against the
    epoch's item text cache (N, D), with ``replay()`` windows when the guard replays text. Stops after
    ``max_steps`` steps, or after ``max_seconds`` of steps (at least 3), when given."""
    stats, inner, t_steps = EpochStats(), unwrap(objective), None
    params = list(params)  # a generator (model.parameters()) would be spent by the first step's clip
    for seq, tgt, mask in batches:
        if t_steps is None:
            t_steps = time.time()  # the step loop's clock starts at the first batch
        stats.samples += seq.size(0)
        stats.losses.append(train_step(objective, opt, sched, params, grad_clip, autocast, seq, tgt, mask, items,
                                       text_cache, replay() if replay is not None else None))
        for k, v in inner.parts.items():
            stats.parts.setdefault(k, []).append(float(v))
        if on_step is not None:
            on_step(stats)
        if (max_steps and stats.steps >= max_steps) or (
                max_seconds and stats.steps >= 3 and time.time() - t_steps > max_seconds):
            break
    stats.step_s = time.time() - t_steps if t_steps is not None else 0.0
    return stats


def averaged(ema: WeightAverage | None) -> AbstractContextManager[None]:
    """The model's weight average in place while the block runs (``train.ema_decay``), or its own weights."""
    return ema.applied() if ema is not None else nullcontext()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: NightlyConfig = from_dict(NightlyConfig, config["cfg"])
    tc = cfg.train
    quiet = config.get("quiet", False)
    if quiet:
        quiet_train_worker()
    torch.set_num_threads(tc.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    np.random.seed(tc.seed + rank)
    device = ray.train.torch.get_device()
    paths = PreparedPaths(config["prepared"])
    # The refit on every event: a fixed number of epochs (the selected run's), no validation (its
    # targets are in the training data), the last epoch kept.
    refit_epochs = config.get("refit_epochs")

    items = ItemTensors.load(paths.items, "event_count" if refit_epochs else "train_count").to(device)
    n_items = items.tokens.size(0)
    torch.manual_seed(tc.seed)  # identical init on every rank
    feats = config.get("features")
    feats = torch.from_numpy(standardise(read_features(feats))) if feats else None  # (N, H), frozen item LM
    model = initial_model(cfg, n_items, config.get("init_from"), feats)
    torch.manual_seed(tc.seed + rank)  # per-rank randomness (dropout, negatives) after the shared init
    model.log_temperature.requires_grad_(tc.learn_temperature)
    model.item_tower.id_known.copy_(items.known.float())  # items never trained are text-only
    model.to(device)
    if model.item_tower.first_trained:  # top-k-layer training: the frozen lower blocks' output, once
        t_cache = time.time()
        model.item_tower.cache_lower(items.tokens, items.mask)
        log.info("item LM: blocks below %d frozen; their output for %d item texts cached in %.1fs",
                 model.item_tower.first_trained, n_items, time.time() - t_cache)
    guard, replay_stream = guard_terms(cfg.guard, model.item_tower, n_items, config.get("replay_ids"), device)
    replay_gen = torch.Generator().manual_seed(tc.seed + 7919 * rank)

    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, fused=device.type == "cuda",
                            foreach=device.type != "cuda")
    steps = steps_per_epoch(config["n_examples"], world, tc.batch_size)  # the same on every rank
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, steps * tc.epochs))

    start_epoch, best, since_best, history = 0, -1.0, 0, []
    ema = WeightAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None  # validated and saved in place of the weights
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a worker failure
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), weights_only=True, map_location="cpu")
            if "model" in state:  # LoRA: the unmerged weights (the folder's weights are merged)
                model.load_state_dict(state["model"])
            else:
                resumed, _ = load_checkpoint(d)
                model.load_state_dict(resumed.state_dict())
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch, best, since_best = state["epoch"] + 1, state["best"], state["since_best"]
            history = json.loads(state["history"])
            if ema is not None and "ema" in state:
                ema.load_state_dict(state["ema"])
        log.info("resumed from checkpoint at epoch %d", start_epoch)

    objective = ray.train.torch.prepare_model(Objective(model, tc.loss, tc.num_negatives, tc.text_items_per_step,
                                                        guard))
    val = load_split(paths.users, "val", tc.val_users, tc.seed) if rank == 0 and not refit_epochs else None
    shard = ray.train.get_dataset_shard("train")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    for epoch in range(start_epoch, refit_epochs or tc.epochs):  # the lr schedule spans tc.epochs either way
        t0 = time.time()
        cache = text_table(model, items.tokens, items.mask)
        bar = (tqdm(total=steps, desc=f"train epoch {epoch}", leave=False, mininterval=2, disable=quiet)
               if rank == 0 else None)
        batches = ((x.to(device) for x in collate(b, cfg.model.max_seq_len))
                   for b in capped_batches(shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy",
                                                              local_shuffle_buffer_size=4 * tc.batch_size,
                                                              local_shuffle_seed=tc.seed + epoch), steps, rank))
        replay = None
        if replay_stream is not None:
            replay = lambda: replay_windows(replay_stream, cfg.guard.replay_batch_size,  # noqa: E731
                                            replay_len(cfg.guard, model.item_tower), replay_gen).to(device)

        def on_step(_: EpochStats) -> None:
            if ema is not None:
                ema.update()
            if bar is not None:
                bar.update(1)

        ep = run_epoch(objective, opt, sched, model.parameters(), tc.grad_clip, autocast, batches, items, cache,
                       replay=replay, on_step=on_step)
        if bar is not None:
            bar.close()
        steps_per_rank = gather_steps(ep.steps, world, device)

        flag = torch.full((2,), float("nan"), dtype=torch.float64, device=device)  # NCCL needs device tensors
        if val is not None:
            with averaged(ema):
                vm = evaluate_histories(unwrap(model), items.tokens, items.mask, val[0], val[1], cfg.model.max_seq_len)
            flag[0] = vm["ndcg@10"]
            flag[1] = vm["recall@10"]
        if world > 1 and dist.is_initialized():
            dist.broadcast(flag, src=0)
        ndcg, recall = float(flag[0]), float(flag[1])
        improved = ndcg > best
        best, since_best = (ndcg, 0) if improved else (best, since_best + 1)
        metrics = {"epoch": epoch, "train_loss": ep.mean_loss, "epoch_s": time.time() - t0,
                   "lr": sched.get_last_lr()[0], "step_s": ep.step_s, "samples_per_worker": ep.samples,
                   "steps": ep.steps, "steps_per_rank": steps_per_rank, **ep.mean_parts()}
        if not refit_epochs:
            metrics.update({VAL_METRIC: ndcg, "val_recall10": recall, "best_val_ndcg10": best})
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                with averaged(ema):
                    state = save_model_folder(model, d, metrics)
                if ema is not None:  # resuming continues from the raw weights, not the saved average
                    state = {"model": cpu_state(model), "ema": ema.state_dict()}
                torch.save({**state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                            "best": best, "since_best": since_best, "history": json.dumps(history)},
                           os.path.join(d, STATE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                log.info("%s %d loss %.4f val ndcg@10 %.4f recall@10 %.4f (%.1fs)", "refit epoch" if refit_epochs
                         else "epoch", epoch, metrics["train_loss"], ndcg, recall, metrics["epoch_s"])
            ray.train.report(metrics, checkpoint=checkpoint)
        if since_best >= tc.patience and not refit_epochs:
            break
