"""Train stage: Ray Train ``TorchTrainer`` (DDP) fine-tuning the GPT-2 towers on next-item prediction.

Each step embeds the step's candidate items (all items for ``full_softmax``; batch items plus
uniform negatives for ``sampled_softmax``). Item text embeddings come from a per-epoch cache, and
the items that are positives in this step (up to ``text_items_per_step``) are re-embedded with
gradients, so the text tower trains at a cost independent of the catalog size.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from recsys_core import storage
from recsys_core.config import NightlyConfig, from_dict
from recsys_core.data import PreparedPaths
from recsys_core.guard import (GuardTerms, apply_lora, corpus_ids, guard_report, guard_terms, needs_replay,
                               read_corpus, replay_len, replay_windows)
from recsys_core.losses import expected_log_q, get_loss
from recsys_core.metrics import per_user_metrics
from recsys_core.model import TwoTower, build_two_tower, load_checkpoint, save_model_folder, unwrap
from recsys_core.retrieval import topk_excluding
from recsys_core.text import pad_token_lists

log = logging.getLogger(__name__)
VAL_METRIC = "val_ndcg10"
STATE = "train_state.pt"
PAD = 0


# ----------------------------------------------------------------------------- data on a worker


@dataclass
class ItemTensors:
    tokens: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T)
    prob: torch.Tensor  # (N,) training popularity, for logQ
    known: torch.Tensor  # (N,) bool: the item occurs in training

    @staticmethod
    def load(items_uri: str) -> "ItemTensors":
        t = storage.read_table(items_uri, columns=["input_ids", "train_count"])
        ids, mask = pad_token_lists(t["input_ids"].to_pylist(), pad_id=PAD)
        counts = t["train_count"].to_numpy().astype(np.float64)
        prob = torch.from_numpy((counts + 1.0) / (counts + 1.0).sum()).float()
        return ItemTensors(torch.from_numpy(ids), torch.from_numpy(mask), prob, torch.from_numpy(counts > 0))

    def to(self, device: torch.device) -> "ItemTensors":
        return ItemTensors(self.tokens.to(device), self.mask.to(device), self.prob.to(device), self.known.to(device))


def collate(batch: dict[str, np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq, mask = pad_token_lists(list(batch["input"]), PAD, length)  # (B, L)
    tgt, _ = pad_token_lists(list(batch["target"]), PAD, length)
    return torch.from_numpy(seq), torch.from_numpy(tgt), torch.from_numpy(mask)


# ----------------------------------------------------------------------------- objective


class Objective(nn.Module):
    """Wraps the model so DDP sees one forward per step: (sequences, targets, mask[, replay]) -> loss.

    Loss = recommendation loss + lm_weight * LM NLL on replay text + item_lm_weight * LM NLL on item text
    + kl_weight * KL(ref || model) on replay text."""

    def __init__(self, model: TwoTower, loss: str, num_negatives: int, text_items_per_step: int,
                 guard: GuardTerms | None = None):
        super().__init__()
        self.model = model
        self.loss_name = loss
        self.loss_fn = get_loss(loss)
        self.num_negatives = num_negatives
        self.text_items_per_step = text_items_per_step
        self.guard = guard or GuardTerms()
        self.parts: dict[str, torch.Tensor] = {}  # last step's loss terms, detached (for logging)

    def forward(self, seq: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor, items: ItemTensors,
                text_cache: torch.Tensor, replay: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        n = text_cache.size(0)
        valid = mask.bool()  # (B, L)
        if self.loss_name == "full_softmax":
            cand = torch.arange(n, device=seq.device)
        else:
            neg = torch.randint(0, n, (self.num_negatives,), device=seq.device)
            cand = torch.unique(torch.cat([seq[valid], tgt[valid], neg]))
        remap = torch.full((n,), -1, dtype=torch.long, device=seq.device)
        remap[cand] = torch.arange(cand.numel(), device=seq.device)

        fresh = torch.unique(tgt[valid])
        if fresh.numel() > self.text_items_per_step:
            fresh = fresh[torch.randperm(fresh.numel(), device=seq.device)[: self.text_items_per_step]]
        fresh_hidden = m.item_tower.hidden(items.tokens[fresh], items.mask[fresh])  # (F, T, H)
        fresh_text = m.item_tower.embed_hidden(fresh_hidden, items.mask[fresh])  # (F, D)
        text = text_cache[cand].index_put((remap[fresh],), fresh_text.to(text_cache.dtype))  # (C, D)
        table = m.item_embeddings(text, cand)  # (C, D)

        states = m.user_states(table, remap[seq].clamp_min(0), mask)  # (B, L, D)
        pos = remap[tgt[valid]]  # (M,)
        log_q = None
        if self.loss_name != "full_softmax":
            log_q = expected_log_q(cand, items.prob, int(valid.sum()), self.num_negatives)
        loss = self.loss_fn(states[valid], table, pos, m.temperature, log_q)
        self.parts = {"rec_loss": loss.detach()}
        if self.guard.active:
            extra, parts = self.guard.loss(m.item_tower, fresh, fresh_hidden, items.tokens, items.mask, replay)
            self.parts.update(parts)
            loss = loss + extra
        return loss

@torch.no_grad()
def text_table(model: TwoTower, items: ItemTensors, batch_size: int = 512) -> torch.Tensor:
    """(N, D) text embeddings of every item, dropout off."""
    was = model.training
    model.eval()
    out = [model.item_tower.text_embed(items.tokens[s:s + batch_size], items.mask[s:s + batch_size])
           for s in range(0, items.tokens.size(0), batch_size)]
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def user_vectors(model: TwoTower, table: torch.Tensor, histories: list[np.ndarray], max_len: int,
                 batch_size: int = 512) -> torch.Tensor:
    """(U, D) user vectors from the last ``max_len`` items of each history."""
    was = model.training
    model.eval()
    dev = table.device
    out = []
    for s in range(0, len(histories), batch_size):
        seq, mask = pad_token_lists(histories[s:s + batch_size], PAD, max_len)
        out.append(model.last_state(table, torch.from_numpy(seq).to(dev), torch.from_numpy(mask).to(dev)))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, table.size(1), device=dev)


def evaluate_histories(model: TwoTower, items: ItemTensors, histories: list[np.ndarray], targets: np.ndarray,
                       max_len: int, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """Mean ranking metrics for next-item targets given histories (seen items excluded)."""
    from recsys_core.model import encode_items

    table = encode_items(model, items.tokens, items.mask)
    users = user_vectors(model, table, histories, max_len)
    ranked, _ = topk_excluding(users, table, histories, max(ks))
    return {k: float(v.mean()) for k, v in per_user_metrics(ranked, targets, ks).items()}


def load_split(users_uri: str, which: str, max_users: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, list[Any]]:
    """Histories and targets of the leave-one-out split: ``val`` (train -> items[-2]) or ``test``."""
    t = storage.read_table(users_uri, columns=["user_id", "items"])
    idx = np.arange(t.num_rows)
    if max_users is not None and t.num_rows > max_users:
        idx = np.sort(np.random.default_rng(seed).choice(t.num_rows, max_users, replace=False))
        t = t.take(idx)
    seqs = t["items"].to_pylist()
    cut = 2 if which == "val" else 1
    hist = [np.asarray(s[:-cut], dtype=np.int64) for s in seqs]
    tgt = np.asarray([s[-cut] for s in seqs], dtype=np.int64)
    return hist, tgt, t["user_id"].to_pylist()


# ----------------------------------------------------------------------------- the loop on each worker


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        p = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def initial_model(cfg: NightlyConfig, n_items: int, init_from: str | None) -> TwoTower:
    """Fresh (pretrained/named-size) or warm-started weights, with LoRA adapters when configured."""
    if init_from:
        model, _ = load_checkpoint(init_from)
    else:
        model = build_two_tower(cfg.model, n_items, cfg.train.temperature, cfg.train.learn_temperature)
    if cfg.guard.lora.enabled:
        model.item_tower.backbone = apply_lora(model.item_tower.backbone, cfg.guard.lora)
        if model.item_tower.lm_head is not None:
            model.item_tower.lm_head.requires_grad_(False)
    elif model.item_tower.lm_head is not None:
        model.item_tower.lm_head.requires_grad_(cfg.guard.lm_weight > 0)  # DDP: no unused trainables
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: NightlyConfig = from_dict(NightlyConfig, config["cfg"])
    tc = cfg.train
    torch.set_num_threads(tc.threads_per_worker)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    np.random.seed(tc.seed + rank)
    device = ray.train.torch.get_device()
    paths = PreparedPaths(config["prepared"])

    items = ItemTensors.load(paths.items).to(device)
    n_items = items.tokens.size(0)
    torch.manual_seed(tc.seed)  # identical init on every rank
    model = initial_model(cfg, n_items, config.get("init_from"))
    torch.manual_seed(tc.seed + rank)  # per-rank randomness (dropout, negatives) after the shared init
    model.log_temperature.requires_grad_(tc.learn_temperature)
    model.item_tower.id_known.copy_(items.known.float())  # items never trained are text-only
    model.to(device)
    guard, replay_stream = guard_terms(cfg.guard, model.item_tower, n_items, config.get("replay_ids"), device)
    replay_gen = torch.Generator().manual_seed(tc.seed + 7919 * rank)

    opt = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, fused=device.type == "cuda",
                            foreach=device.type != "cuda")
    steps_per_epoch = max(1, math.ceil(config["n_examples"] / (world * tc.batch_size)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, steps_per_epoch * tc.epochs))

    start_epoch, best, since_best, history = 0, -1.0, 0, []
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
        log.info("resumed from checkpoint at epoch %d", start_epoch)

    objective = ray.train.torch.prepare_model(Objective(model, tc.loss, tc.num_negatives, tc.text_items_per_step,
                                                        guard))
    inner: Objective = unwrap(objective)
    val = load_split(paths.users, "val", tc.val_users, tc.seed) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        cache = text_table(model, items)
        losses, samples, parts = [], 0, {}
        bar = None
        if rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=steps_per_epoch, desc=f"train epoch {epoch}", leave=False, mininterval=2)
        for batch in shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * tc.batch_size, local_shuffle_seed=tc.seed + epoch):
            if not losses:
                t_steps = time.time()  # the step loop's clock starts at the first batch
            seq, tgt, mask = (x.to(device) for x in collate(batch, cfg.model.max_seq_len))
            samples += seq.size(0)
            replay = None
            if replay_stream is not None:
                replay = replay_windows(replay_stream, cfg.guard.replay_batch_size,
                                        replay_len(cfg.guard, model.item_tower), replay_gen).to(device)
            losses.append(train_step(objective, opt, sched, model.parameters(), tc.grad_clip, autocast,
                                     seq, tgt, mask, items, cache, replay))
            for k, v in inner.parts.items():
                parts.setdefault(k, []).append(float(v))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        step_s = time.time() - t_steps if losses else 0.0

        flag = torch.zeros(2, dtype=torch.float64, device=device)  # NCCL needs device tensors
        if rank == 0:
            vm = evaluate_histories(unwrap(model), items, val[0], val[1], cfg.model.max_seq_len)
            flag[0] = vm["ndcg@10"]
            flag[1] = vm["recall@10"]
        if world > 1 and dist.is_initialized():
            dist.broadcast(flag, src=0)
        ndcg, recall = float(flag[0]), float(flag[1])
        improved = ndcg > best
        best, since_best = (ndcg, 0) if improved else (best, since_best + 1)
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   VAL_METRIC: ndcg, "val_recall10": recall, "epoch_s": time.time() - t0,
                   "lr": sched.get_last_lr()[0], "best_val_ndcg10": best,
                   "step_s": step_s, "samples_per_worker": samples, "steps": len(losses),
                   **{k: float(np.mean(v)) for k, v in parts.items()}}
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = save_model_folder(model, d, metrics)
                torch.save({**state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch,
                            "best": best, "since_best": since_best, "history": json.dumps(history)},
                           os.path.join(d, STATE))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                log.info("epoch %d loss %.4f val ndcg@10 %.4f recall@10 %.4f (%.1fs)",
                         epoch, metrics["train_loss"], ndcg, recall, metrics["epoch_s"])
            ray.train.report(metrics, checkpoint=checkpoint)
        if since_best >= tc.patience:
            break


# ----------------------------------------------------------------------------- driver side


def run_train(cfg: NightlyConfig, prepared: PreparedPaths, run_dir: str, init_from: str | None = None,
              fresh: bool = False) -> dict[str, Any]:
    """Fit with Ray Train; returns the best checkpoint's URI, its metrics, the per-epoch history and the
    generation guard's record. ``fresh`` discards an earlier attempt's checkpoints (``--force``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from recsys_core.data import examples_dataset

    train_ds, n_examples = examples_dataset(prepared.train_examples, cfg.train)
    replay_ids = None
    if needs_replay(cfg.guard):
        from recsys_core.text import load_tokenizer

        replay_ids = corpus_ids(read_corpus(cfg.guard.replay_corpus, "replay"), load_tokenizer(cfg.model.tokenizer))
    spath, sfs = storage.ray_location(storage.join(run_dir, "ray_train"))
    # Ray Train resumes a run of the same name from its latest checkpoint (a crashed driver's rerun);
    # the name carries the training config, so a rerun with another config starts afresh.
    import hashlib

    ident = json.dumps([asdict(cfg.model), asdict(cfg.train), asdict(cfg.guard), prepared.root, init_from],
                       sort_keys=True, default=str)
    name = "train-" + hashlib.sha256(ident.encode()).hexdigest()[:12]
    if fresh and storage.exists(storage.join(run_dir, "ray_train", name)):
        storage.delete(storage.join(run_dir, "ray_train", name))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": asdict(cfg), "prepared": prepared.root, "n_examples": n_examples,
                           "init_from": init_from, "replay_ids": replay_ids},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
        run_config=RunConfig(
            name=name, storage_path=spath, storage_filesystem=sfs,
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=VAL_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][VAL_METRIC])
    uri = ("s3://" + best_ckpt.path) if storage.is_s3(run_dir) else best_ckpt.path
    guard = guard_report(cfg, prepared.items, uri)
    log.info(guard["message"])
    return {"checkpoint": uri, "metrics": best_metrics, "history": _history(result, run_dir), "guard": guard}


def _history(result: Any, run_dir: str) -> list[dict[str, Any]]:
    """Per-epoch metrics of the whole run, from the latest checkpoint's training state.

    (``result.metrics_dataframe`` only holds the epochs whose checkpoints were retained.)"""
    import io

    latest = result.checkpoint
    uri = ("s3://" + latest.path) if storage.is_s3(run_dir) else latest.path
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE))), weights_only=True)
    return json.loads(state["history"])
