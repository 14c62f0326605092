"""GPU benchmarks (needs a CUDA GPU; about 5-8 minutes on one H100/H200):

    python benchmarks/gpu.py [--compile] [--json gpu.json] [--skip-recsys]

1. GPT-2 small (124M, random init) language-model training: bf16 autocast, SDPA attention, fused
   AdamW, optional ``torch.compile``, optional gradient accumulation. Reports tokens/s and MFU =
   6 * N * tokens/s / peak dense bf16 FLOP/s (H100/H200: 989 TFLOP/s), and the same with the
   attention term (6N + 12 * layers * width * sequence length per token, as nanoGPT counts it).
2. The recommender on the GPU: the Ray Train loop with ``train.use_gpu=true`` (1 worker) vs the
   plain PyTorch loop on the same GPU, same model/batch/data (MovieLens-100k, ``ml100k_tiny.yaml``);
   exact top-k with seen masking on the GPU (torch, tiled) at 1M items.
3. The demo config (``ml100k.yaml``: SmolLM2-135M-Instruct, frozen) as one GPU nightly, per-stage times.
4. ``ml100k_smollm2_tuned.yaml``: the same LM fine-tuned on its top 4 blocks with the strength (WiSE-FT
   alpha) scanned after training, as one GPU nightly: stage times, holdout, perplexities, the alpha curve.

Without CUDA it prints why and exits with status 2; the CPU benchmarks are benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import ray
import torch

from recsys_core.config import load_config
from recsys_core.pipeline import Run
from recsys_core.serve.retrieval import topk_excluding
from recsys_core.train.trainer import run_train

SECTIONS = ("gpt2", "recsys", "tiny_nightly", "demo", "tuned")
# Dense bf16 peak FLOP/s by device name (no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "A10": 125e12, "4090": 165e12}


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpt2_mfu(batch: int, seq: int, steps: int, warmup: int, accum: int, compile_: bool, peak: float | None,
             device: str = "cuda", size: dict[str, int] | None = None) -> dict[str, Any]:
    """Train GPT-2 (small unless ``size``) from random init on random tokens; tokens/s over ``steps`` timed steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    conf = GPT2Config(n_positions=seq, attn_implementation="sdpa", **(size or {}))  # default: 12 x 768, 12 heads
    model = GPT2LMHeadModel(conf).to(device)
    n_params = sum(p.numel() for p in model.parameters())  # tied input/output embedding counted once
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=device == "cuda")
    step_fn = torch.compile(model) if compile_ else model
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> float:
        for _ in range(accum):
            x = torch.randint(0, conf.vocab_size, (batch, seq + 1), device=device, generator=gen)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = step_fn(input_ids=x[:, :-1], labels=x[:, 1:]).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) * accum

    t = time.time()
    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        step()
    sync(device)
    warm_s = time.time() - t
    t = time.time()
    for _ in range(steps):
        last = step()
    sync(device)
    dt = time.time() - t
    tokens_s = steps * accum * batch * seq / dt
    flops_6n = 6 * n_params * tokens_s
    flops_attn = (6 * n_params + 12 * conf.n_layer * conf.n_embd * seq) * tokens_s
    return {"params": n_params, "batch": batch, "seq": seq, "grad_accum": accum, "compile": compile_,
            "steps": steps, "warmup_s": warm_s, "step_ms": 1000 * dt / steps, "tokens_per_s": tokens_s,
            "mfu_6n": flops_6n / peak if peak else None, "mfu_with_attention": flops_attn / peak if peak else None,
            "peak_flops": peak, "final_loss": last,
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def recsys_on_gpu(epochs: int) -> dict[str, Any]:
    """Ray Train (use_gpu, 1 worker) vs the plain loop on the GPU, and GPU exact top-k at 1M items."""
    from bench_train import plain_loop, throughput

    import jobs.prepare

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as root:
        cfg = load_config(str(benchlib.REPO / "jobs" / "configs" / "ml100k_tiny.yaml"),
                          [f"storage.root={root}", f"train.epochs={epochs}", f"train.patience={epochs}",
                           "train.use_gpu=true", "train.num_workers=1"])
        jobs.prepare.main(cfg=cfg, run_date="2026-11-27", force=True)
        run = Run(cfg, "2026-11-27")
        t = time.time()
        fit = run_train(cfg, run.prepared, str(Path(root) / "gpu_1worker"))
        out["ray_fit_s"] = time.time() - t
        ray.shutdown()
        plain = plain_loop(cfg, run.prepared, epochs, threads=cfg.train.threads_per_worker, device="cuda")
        r, p = throughput(fit["history"], 1), throughput(plain, 1)
        out.update(ray_1w=r, plain=p, train_ray_vs_plain_gpu=r["samples_per_s"] / p["samples_per_s"])

    g = torch.Generator(device="cuda").manual_seed(0)
    items = torch.randn(1_000_000, 64, device="cuda", generator=g)
    users = torch.randn(65_536, 64, device="cuda", generator=g)
    rng = np.random.default_rng(0)
    seen = [rng.choice(1_000_000, size=30, replace=False) for _ in range(len(users))]
    topk_excluding(users[:1024], items, seen[:1024], 50, chunk=4096, tile_bytes=1 << 30)  # warm-up
    torch.cuda.synchronize()
    t = time.time()
    topk_excluding(users, items, seen, 50, chunk=4096, tile_bytes=1 << 30)
    torch.cuda.synchronize()
    out["topk_1m_items_users_per_s"] = len(users) / (time.time() - t)
    return out


def demo_on_gpu(config: str = "ml100k.yaml", overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """A shipped ML-100k config as one nightly with ``train.use_gpu=true``: per-stage wall times, the holdout,
    and the guard. ``ml100k.yaml`` (the demo: SmolLM2-135M-Instruct frozen; its LM feature pass is part of
    train), ``ml100k_smollm2_tuned.yaml`` (the same LM fine-tuned on its top blocks, the strength scanned)
    or ``ml100k_tiny.yaml`` (random-init towers: the whole GPU path end to end, no LM to fetch)."""
    import jobs.nightly

    with tempfile.TemporaryDirectory(prefix="bench-gpu-demo-") as root:
        cfg = load_config(str(benchlib.REPO / "jobs" / "configs" / config),
                          [f"storage.root={root}", "train.use_gpu=true", "train.num_workers=1", *overrides])
        out = jobs.nightly.main(cfg=cfg, run_date="2026-11-27", force=True)
        ray.shutdown()
    guard = out["train"].get("guard") or {}
    return {"config": config, "overrides": list(overrides), "stage_s": {s: round(r.get("wall_s", 0.0), 1) for s, r in out.items() if isinstance(r, dict)},
            "holdout": {k: v for k, v in out["evaluate"]["metrics"]["model"].items() if "_ci_" not in k},
            "guard": {k: guard.get(k) for k in ("ppl_general_before", "ppl_general_after", "ppl_items_before",
                                                "ppl_items_after", "passed", "strength")},
            "explain": out["explain"].get("reason")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--compile", action="store_true", help="torch.compile the GPT-2 model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--epochs", type=int, default=3, help="recommender training epochs (per loop)")
    p.add_argument("--skip-recsys", action="store_true", help="only the GPT-2 MFU benchmark")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, of {','.join(SECTIONS)} (--skip-recsys: gpt2 alone)")
    p.add_argument("--tiny-epochs", type=int, default=15, help="epochs of the tiny_nightly section")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the demo and tuned sections (repeatable), e.g. train.epochs=20")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="check the GPT-2 code path on the CPU with a 2-layer model (no numbers worth reporting)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.smoke_cpu:
        res = gpt2_mfu(2, 64, 2, warmup=1, accum=2, compile_=a.compile, peak=None, device="cpu",
                       size={"n_layer": 2, "n_embd": 64, "n_head": 2})
        print(f"CPU smoke run: {res['tokens_per_s']:.0f} tokens/s, loss {res['final_loss']:.2f}, "
              f"{res['params']:,} parameters")
        return
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured. "
              "The CPU benchmarks are benchmarks/run_all.py.", file=sys.stderr)
        sys.exit(2)
    sections = ["gpt2"] if a.skip_recsys else [x for x in a.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: {unknown} unknown; choose from {list(SECTIONS)}")
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, a.peak_tflops)
    t0 = time.time()
    out: dict[str, Any] = {"device": name, "sections": sections}
    if "gpt2" in sections:
        res = gpt2_mfu(a.batch, a.seq, a.steps, warmup=5 if a.compile else 3, accum=a.accum, compile_=a.compile,
                       peak=peak)
        mfu = "n/a (unknown GPU: pass --peak-tflops)" if res["mfu_6n"] is None else f"{res['mfu_6n']:.1%}"
        print(benchlib.table(
            f"GPT-2 small (124M) training on {name}: bf16 autocast, SDPA, fused AdamW"
            + (", torch.compile" if a.compile else ""),
            ["batch x seq", "grad accum", "ms/step", "tokens/s", "MFU (6N)", "MFU (6N + attention)", "max mem GiB"],
            [[f"{a.batch} x {a.seq}", a.accum, res["step_ms"], res["tokens_per_s"], mfu,
              "n/a" if res["mfu_with_attention"] is None else f"{res['mfu_with_attention']:.1%}",
              res["max_memory_gib"]]]), flush=True)
        out.update(gpt2=res, gpt2_mfu=res["mfu_6n"])
        benchlib.write_json(a.json, out)  # after each section: a run stopped later keeps what it measured
    if "recsys" in sections:
        rec = recsys_on_gpu(a.epochs)
        print(benchlib.table(
            f"Recommender on {name}: MovieLens-100k step loop (epochs 2-{a.epochs}) and exact top-50 at 1M items",
            ["measurement", "value"],
            [["plain loop samples/s", rec["plain"]["samples_per_s"]],
             ["Ray Train (use_gpu, 1 worker) samples/s", rec["ray_1w"]["samples_per_s"]],
             ["Ray / plain", rec["train_ray_vs_plain_gpu"]],
             ["exact top-50 over 1M items, 30 seen masked, users/s", rec["topk_1m_items_users_per_s"]]]), flush=True)
        out.update(recsys=rec, train_ray_vs_plain_gpu=rec["train_ray_vs_plain_gpu"])
        benchlib.write_json(a.json, out)
    for section, config, title, overrides in (
            ("tiny_nightly", "ml100k_tiny.yaml", f"random-init tiny towers, {a.tiny_epochs} epochs",
             (f"train.epochs={a.tiny_epochs}", f"train.patience={a.tiny_epochs}")),
            ("demo", "ml100k.yaml", "SmolLM2 frozen", tuple(a.set)),
            ("tuned", "ml100k_smollm2_tuned.yaml", "SmolLM2 fine-tuned on its top 4 blocks, strength scanned",
             tuple(a.set))):
        if section in sections:
            res = demo_on_gpu(config, overrides)
            print(benchlib.table(f"The nightly (jobs/configs/{config}, {title}) on {name}", ["stage", "wall s"],
                                 [[k, v] for k, v in res["stage_s"].items()]), flush=True)
            print(f"holdout: {res['holdout']}\nguard: {res['guard']}\nexplain: {res['explain']}", flush=True)
            out[section] = res
            benchlib.write_json(a.json, out)
    out["wall_s"] = time.time() - t0
    benchlib.write_json(a.json, out)


if __name__ == "__main__":
    benchlib.setup_env()
    main()
