"""SimPO training step: simpo-ray (PolicyLogps + simpo_objective + AdamW) vs TRL's CPOTrainer
(loss_type="simpo") vs Liger Kernel's LigerFusedLinearSimPOLoss, same model weights, same collated
batches, same threads, same optimizer.

What is timed on each side is one optimizer step on an identical batch:
  ours: PolicyLogps(model)(batch) -> simpo_objective -> backward -> clip_grad_norm -> AdamW.step
  TRL : trainer.get_batch_loss_metrics(model, batch) -> backward -> clip_grad_norm -> AdamW.step
  Liger: decoder forward of the same concatenated batch -> LigerFusedLinearSimPOLoss(lm_head.weight,
         hidden[:, :-1], labels[:, 1:]) (chunked fused linear + loss; gamma absolute = beta x
         gamma_beta_ratio, alpha = sft_weight on its NLL term), run at its default `compiled=True`
         (torch.compile; inductor compiles C++ on this CPU) and with `compiled=False` -> backward
         -> clip_grad_norm -> AdamW.step. Needs `pip install --no-deps liger-kernel` (the `bench`
         extra); it runs on CPU without triton.
  ours compiled: as ours, with `PolicyLogps(model, compile=True)`: the per-chunk head compiled, what
                 `torch_compile` (null) does from a 32k vocabulary (true also compiles the blocks).
The untimed warm-up steps include the compilation; its cost is reported (first step's wall time).
Time per step is reported as process CPU time (`time.process_time`, 1 torch thread) - robust
to other users' jobs on a shared box, unlike wall time, which is also reported (every run).
We call TRL's own loss path (`get_batch_loss_metrics`, the function `CPOTrainer.compute_loss`
runs) instead of `trainer.train()` so that both sides see byte-identical batches and the same
optimizer; `train()` would add its own data loader, sampler order, callbacks and logging, which
are not the step. Each (implementation, model) runs in its own fresh subprocess, so peak RSS
(`ru_maxrss`) belongs to that run only; we report the absolute peak and the peak minus the RSS
after model + data + optimizer setup (what the steps themselves add: gradients and the lazily
created AdamW moments, 12 bytes/param on both sides, plus activations and log-prob buffers).

Usage: .venv/bin/python bench/step_vs_trl.py [--quick] [--sizes tiny,small,base,vocab128k]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load, machine, parser, table, write_json  # noqa: E402
from _common import peak_mb as _peak_mb, rss_mb as _rss_mb  # noqa: E402

BETA, GAMMA_BETA_RATIO, SFT_WEIGHT, LR = 2.0, 0.5, 0.5, 1e-3
BIG_VOCAB = 128256
# Each side as its users run it, and ours and Liger's both ways: Liger's chunked losses compile
# by default (`compiled=True`); ours compiles the per-chunk head (`torch_compile` from 32k tokens).
IMPLS = ("simpo_ray", "simpo_ray_compiled", "trl", "liger", "liger_compiled")



# ---- worker side (one implementation, one model, in a fresh process) --------------------------

def _model_and_batches(case: str, n_batches: int, batch_size: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from simpo_ray.bundled.models import ensure_model
    from simpo_ray.data.collate import PairCollator

    if case == "vocab128k":
        # A tiny Llama with a Llama-3-sized vocabulary: the log-prob head dominates memory.
        tok = AutoTokenizer.from_pretrained(ensure_model("tiny"))  # only for CPOTrainer's init
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=BIG_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                          tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
        gen = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(n_batches * batch_size):
            prompt = torch.randint(3, BIG_VOCAB, (16,), generator=gen).tolist()
            row = {}
            for side in ("chosen", "rejected"):
                n = int(torch.randint(8, 48, (1,), generator=gen))
                resp = torch.randint(3, BIG_VOCAB, (n,), generator=gen).tolist()
                row[f"{side}_input_ids"] = prompt + resp
                row[f"{side}_labels"] = [-100] * len(prompt) + resp
            rows.append(row)
        pad_id = 0
    else:
        from simpo_ray.bundled.task import load_split
        from simpo_ray.data.tokens import tokenize_pairs

        path = ensure_model(case)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ds = load_split("train_prefs").select(range(n_batches * batch_size))
        rows = list(tokenize_pairs(ds, tok, max_length=64, max_prompt_length=32))
        pad_id = tok.pad_token_id
    collate = PairCollator(pad_id)
    keys = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels",
            "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
    batches = []
    for i in range(n_batches):
        b = collate(rows[i * batch_size:(i + 1) * batch_size])
        batches.append({k: b[k] for k in keys})
    return model, tok, batches


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_batches = args.warmup + args.steps
    model, tok, batches = _model_and_batches(args.case, n_batches, args.batch_size)
    model.train()
    if args.impl in ("simpo_ray", "simpo_ray_compiled"):
        from simpo_ray.train.logps import PolicyLogps, simpo_objective

        # verify=True as in train.py: one extra check forward on call 1
        policy = PolicyLogps(model, compile=args.impl == "simpo_ray_compiled")

        def loss_fn(batch):
            out = policy(**batch)
            loss, metrics = simpo_objective(out, beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO,
                                            loss_type="sigmoid", sft_weight=SFT_WEIGHT)
            return loss, {k: float(v) for k, v in metrics.items()}  # as MetricWindow.add does
    elif args.impl in ("liger", "liger_compiled"):
        import torch.nn.functional as F
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

        liger = LigerFusedLinearSimPOLoss(beta=BETA, gamma=GAMMA_BETA_RATIO * BETA, alpha=SFT_WEIGHT,
                                          compute_nll_loss=True, compiled=args.impl == "liger_compiled")

        def loss_fn(batch):
            length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

            def cat(key, value):
                return torch.cat([F.pad(batch[f"{side}_{key}"], (0, length - batch[f"{side}_{key}"].shape[1]),
                                        value=value) for side in ("chosen", "rejected")])

            ids, mask, labels = cat("input_ids", 0), cat("attention_mask", 0), cat("labels", -100)
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            head = model.lm_head
            out = liger(head.weight, hidden[:, :-1], labels[:, 1:], head.bias)
            return (out[0] if isinstance(out, tuple) else out), {}
    else:
        import tempfile
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        cpo_args = CPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-cpo-"), loss_type="simpo", beta=BETA,
                             simpo_gamma=GAMMA_BETA_RATIO * BETA, cpo_alpha=SFT_WEIGHT, max_length=128,
                             per_device_train_batch_size=args.batch_size, report_to="none", use_cpu=True,
                             learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, seed=0)
        dummy = Dataset.from_dict({"prompt": ["1 2 3"] * 4, "chosen": [" 1"] * 4, "rejected": [" 2"] * 4})
        trainer = CPOTrainer(model=model, args=cpo_args, train_dataset=dummy, processing_class=tok)
        model = trainer.model
        model.train()

        def loss_fn(batch):
            return trainer.get_batch_loss_metrics(model, batch, train_eval="train")

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    setup_rss, setup_peak = _rss_mb(), _peak_mb()
    times, cpu_times, losses, tokens, first_step_s = [], [], [], [], None
    for i, batch in enumerate(batches):
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss, _ = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        losses.append(float(loss))
        if i == 0:
            first_step_s = dt  # with the compilation, where there is one
        if i >= args.warmup:
            times.append(dt)
            cpu_times.append(dc)
            tokens.append(int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))
    peak = _peak_mb()
    times_sorted = sorted(times)
    return {
        "impl": args.impl, "case": args.case, "threads": args.threads, "batch_size": args.batch_size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "vocab": model.config.vocab_size, "max_len": max(int(b["chosen_input_ids"].shape[1]) for b in batches),
        "steps_timed": len(times), "warmup": args.warmup,
        "s_per_step_mean": sum(times) / len(times), "s_per_step_median": times_sorted[len(times) // 2],
        "tokens_per_s": sum(tokens) / sum(times),
        "cpu_s_per_step_median": sorted(cpu_times)[len(cpu_times) // 2],
        "tokens_per_cpu_s": sum(tokens) / sum(cpu_times),
        "first_loss": losses[0], "last_loss": losses[-1], "first_step_s": first_step_s,
        "rss_after_setup_mb": setup_rss, "peak_during_setup_mb": setup_peak,
        "peak_rss_mb": peak, "peak_minus_setup_mb": peak - setup_rss,
        "load": load(),
    }


# ---- driver side -------------------------------------------------------------------------------

def run_case(impl: str, case: str, args) -> dict:
    steps, warmup, bs = args.steps, args.warmup, args.batch_size
    if case == "vocab128k":
        steps, bs = max(2, steps // 8), args.big_batch_size
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--case", case, "--steps", str(steps),
           "--warmup", str(warmup), "--batch-size", str(bs), "--threads", str(args.threads)]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    load_before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl}/{case} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_before"] = load_before
    return result


def main(argv=None) -> int:
    p = parser(__doc__, "step_vs_trl")
    p.add_argument("--quick", action="store_true", help="smoke check: tiny + vocab128k, few steps")
    p.add_argument("--sizes", default="tiny,small,vocab128k",
                   help="comma list of bundled sizes (tiny, small, base) and/or vocab128k")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run (vocab128k: an eighth)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (incl. PolicyLogps' verify)")
    p.add_argument("--repeats", type=int, default=2, help="runs per (impl, size), interleaved")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (cpu-tiny space: 16)")
    p.add_argument("--big-batch-size", type=int, default=4, help="pairs per step for vocab128k")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (a trial worker has 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.sizes, args.steps, args.warmup, args.repeats, args.big_batch_size = "tiny,vocab128k", 8, 1, 1, 2
    cases = [c.strip() for c in args.sizes.split(",") if c.strip()]
    info = machine()
    runs = []
    for rep in range(args.repeats):
        for case in cases:
            order = IMPLS if rep % 2 == 0 else IMPLS[::-1]  # alternate who goes first
            for impl in order:
                r = run_case(impl, case, args)
                r["repeat"] = rep
                runs.append(r)
                print(f"  {case:9s} {impl:9s} rep {rep}: {r['s_per_step_median'] * 1e3:8.1f} ms/step "
                      f"peak {r['peak_rss_mb']:.0f} MB (+{r['peak_minus_setup_mb']:.0f}) load {r['load']}",
                      file=sys.stderr, flush=True)
    summary = []
    for case in cases:
        ours = [r for r in runs if r["case"] == case and r["impl"] == "simpo_ray"]
        trl = [r for r in runs if r["case"] == case and r["impl"] == "trl"]

        def best(rs, key, fn=min):
            return fn(r[key] for r in rs)

        row = {
            "case": case, "params_m": ours[0]["params_m"], "vocab": ours[0]["vocab"],
            "batch_size": ours[0]["batch_size"], "steps_timed": ours[0]["steps_timed"], "repeats": len(ours),
            # median step of each run; across repeats, the min (least disturbed by other users' jobs)
            "ours_s_per_step": best(ours, "s_per_step_median"), "trl_s_per_step": best(trl, "s_per_step_median"),
            "ours_s_per_step_all": [r["s_per_step_median"] for r in ours],
            "trl_s_per_step_all": [r["s_per_step_median"] for r in trl],
            "ours_cpu_s_per_step": best(ours, "cpu_s_per_step_median"),
            "trl_cpu_s_per_step": best(trl, "cpu_s_per_step_median"),
            "ours_cpu_s_per_step_all": [r["cpu_s_per_step_median"] for r in ours],
            "trl_cpu_s_per_step_all": [r["cpu_s_per_step_median"] for r in trl],
            "ours_tokens_per_cpu_s": best(ours, "tokens_per_cpu_s", max),
            "trl_tokens_per_cpu_s": best(trl, "tokens_per_cpu_s", max),
            "ours_tokens_per_s": best(ours, "tokens_per_s", max), "trl_tokens_per_s": best(trl, "tokens_per_s", max),
            "ours_peak_rss_mb": best(ours, "peak_rss_mb"), "trl_peak_rss_mb": best(trl, "peak_rss_mb"),
            "ours_step_mem_mb": best(ours, "peak_minus_setup_mb"), "trl_step_mem_mb": best(trl, "peak_minus_setup_mb"),
            "ours_first_loss": ours[0]["first_loss"], "trl_first_loss": trl[0]["first_loss"],
            "first_loss_abs_diff": abs(ours[0]["first_loss"] - trl[0]["first_loss"]),
            "load": [r["load"] for r in runs if r["case"] == case],
            "impls": {impl: {"cpu_s_per_step": best(rs, "cpu_s_per_step_median"),
                             "step_mem_mb": best(rs, "peak_minus_setup_mb"),
                             "first_step_s": best(rs, "first_step_s"),
                             "first_loss_abs_diff": abs(ours[0]["first_loss"] - rs[0]["first_loss"])}
                      for impl in IMPLS if (rs := [r for r in runs if r["case"] == case and r["impl"] == impl])},
        }
        row["time_ratio_trl_over_ours"] = row["trl_s_per_step"] / row["ours_s_per_step"]
        row["cpu_ratio_trl_over_ours"] = row["trl_cpu_s_per_step"] / row["ours_cpu_s_per_step"]
        row["step_mem_ratio_trl_over_ours"] = row["trl_step_mem_mb"] / max(row["ours_step_mem_mb"], 1e-9)
        row["peak_ratio_trl_over_ours"] = row["trl_peak_rss_mb"] / row["ours_peak_rss_mb"]
        summary.append(row)
    headers = ["model", "params (M)", "vocab", "pairs/step", "ours CPU s/step", "TRL CPU s/step",
               "TRL/ours CPU", "ours tok/CPU-s", "TRL tok/CPU-s", "ours wall s/step (all runs)",
               "TRL wall s/step (all runs)", "TRL/ours wall", "grads+AdamW MB (both)", "ours step mem MB", "TRL step mem MB", "TRL/ours step mem",
               "ours peak RSS MB", "TRL peak RSS MB", "first loss ours", "first loss TRL", "|diff|", "load (1 min)"]
    rows = [[s["case"], s["params_m"], s["vocab"], s["batch_size"], s["ours_cpu_s_per_step"], s["trl_cpu_s_per_step"],
             s["cpu_ratio_trl_over_ours"], s["ours_tokens_per_cpu_s"], s["trl_tokens_per_cpu_s"],
             " / ".join(f"{v:.3g}" for v in s["ours_s_per_step_all"]),
             " / ".join(f"{v:.3g}" for v in s["trl_s_per_step_all"]), s["time_ratio_trl_over_ours"], s["params_m"] * 1e6 * 12 / 2**20, s["ours_step_mem_mb"],
             s["trl_step_mem_mb"], s["step_mem_ratio_trl_over_ours"], s["ours_peak_rss_mb"], s["trl_peak_rss_mb"],
             f"{s['ours_first_loss']:.6f}", f"{s['trl_first_loss']:.6f}", f"{s['first_loss_abs_diff']:.1e}",
             f"{min(s['load']):.1f}-{max(s['load']):.1f}"] for s in summary]
    rows.append(["GPU rows", "", "", "", "not measured (no GPU in this environment)"] + [""] * 17)
    md = table(headers, rows)
    names = {"simpo_ray": "ours", "simpo_ray_compiled": "ours compiled", "trl": "TRL",
             "liger": "Liger compiled=False", "liger_compiled": "Liger (default, compiled)"}
    peer_rows = []
    for s in summary:
        ref = s["impls"]["simpo_ray_compiled"]
        for impl, v in s["impls"].items():
            peer_rows.append([s["case"], s["vocab"], names[impl], v["cpu_s_per_step"],
                              v["cpu_s_per_step"] / ref["cpu_s_per_step"], v["step_mem_mb"],
                              v["step_mem_mb"] / max(ref["step_mem_mb"], 1e-9), v["first_step_s"],
                              f"{v['first_loss_abs_diff']:.1e}", f"{min(s['load']):.1f}-{max(s['load']):.1f}"])
    liger_md = table(["model", "vocab", "implementation", "CPU s/step", "/ ours compiled", "step mem MB",
                      "/ ours compiled", "first step s (compiles)", "|first loss - ours|", "load (1 min)"],
                     peer_rows)
    print(f"\nSimPO step vs TRL CPOTrainer(loss_type='simpo'), {args.threads} thread(s), fp32, CPU "
          f"({info['cpu_model']}, {info['cores']} cores), {info['date_utc']}")
    print(md)
    print("\nAll five side by side (ratios > 1: ours compiled is faster / smaller):")
    print(liger_md)
    bad = [s["case"] for s in summary if s["first_loss_abs_diff"] > 1e-4]
    print("first-step losses agree (|diff| <= 1e-4)" if not bad else f"WARNING: first-step losses differ for {bad}")
    out = write_json(args.out, {"benchmark": "step_vs_trl", "machine": info, "quick": args.quick,
                                "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "impl", "case")},
                                "hyperparameters": {"beta": BETA, "gamma_beta_ratio": GAMMA_BETA_RATIO,
                                                    "sft_weight": SFT_WEIGHT, "learning_rate": LR},
                                "summary": summary, "runs": runs, "markdown": md, "markdown_liger": liger_md})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
