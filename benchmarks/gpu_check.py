"""The checks a first GPU should run (benchmarks/gpu_check.sh calls this), with no internet: a random model of
InternLM2-7B's width (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 92,544) but 4 layers, saved
with save_pretrained, and the built-in sort task's tokenizer and data (token ids stay below the vocabulary).

    python benchmarks/gpu_check.py            # on one GPU: ≈10 minutes
    python benchmarks/gpu_check.py --cpu      # the same logic, tiny, on CPU processes (tests/test_scale.py runs it)

1. fast vs plain log-probs (train.logps: fused vs plain) under bf16 autocast, 2 × 2,048 tokens: values and gradients.
2. A plain one-process run of betadpo.py, 2 steps (bf16 on the GPU): the baseline.
3. FSDP2 (configs/accelerate/fsdp.yaml, 1 process on the GPU; --cpu: 2 CPU processes through
   tests/fsdp_launch.py): 1 step, then the same command with 2 steps resumes from its checkpoint. Steps 1 and 2
   must agree with the plain run's (DDP-vs-FSDP agreement, and an exact resume).
4. train.precompute_ref: step 1 must agree with the plain run's (same reference numbers, cached).
5. eval.py on the FSDP run's final/ against the starting model.
Each prints its peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS) and time per step. Any
disagreement beyond the tolerance stops with exit code 1.
"""

import argparse
import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def probe(argv):
    """The launched script: report this process's peak memory at exit, then run argv[0] with argv[1:]."""
    import runpy

    atexit.register(lambda: print(f"\nPEAK rank {os.environ.get('RANK', '0')} {peak_bytes()}", flush=True))
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    runpy.run_path(argv[0], run_name="__main__")


def build(path: Path, cpu: bool):
    from plumbing import sort_task
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = sort_task.build_tokenizer()
    shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512) if cpu else \
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=92544)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=1e6,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, shape


def check_logps(model, shape, cpu: bool):
    """1. fast vs plain log-probs and their gradients, under bf16 autocast."""
    import torch

    import betadpo

    device = "cpu" if cpu else "cuda"
    model = model.to(device)
    T = 64 if cpu else 2048
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape["vocab_size"], (2, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "prompt_lens": torch.full((2,), T // 4)}
    batch = {k: v.to(device) for k, v in batch.items()}
    out = {}
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logp = betadpo.sequence_logps(model, batch, "fused" if fast else "plain", prompt_rows=1)
        (logp["sum"].sum() + logp["prompt"].sum()).backward()
        if not cpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        out[fast] = (logp["sum"].detach().float(), grads)
        print(f"log-probs {'fast ' if fast else 'plain'}: {dt:.2f} s, peak {peak_bytes() / 2**30:.2f} GiB", flush=True)
    (v0, g0), (v1, g1) = out[False], out[True]
    value_err = ((v1 - v0).abs() / v0.abs().clamp(min=1)).max().item()
    grad_err = ((g1 - g0).norm() / g0.norm()).item()
    print(f"log-probs fast vs plain: max relative value difference {value_err:.2e}, gradient ‖Δ‖/‖g‖ {grad_err:.2e}")
    # bf16 matmuls: the two paths round differently (the fast one sums per chunk); a logic error is O(1).
    if value_err > 2e-2 or grad_err > 5e-2:
        raise SystemExit("fast and plain log-probs disagree beyond bf16 rounding")
    model.to("cpu")


def run(cmd, what: str, cpu: bool, env_extra=None):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    t0 = time.perf_counter()
    cmd = list(map(str, cmd))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed ({result.returncode}): {' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    peaks = [int(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("PEAK rank")]
    print(f"{what}: {time.perf_counter() - t0:.0f} s wall, peak {max(peaks, default=0) / 2**30:.2f} GiB per process", flush=True)
    return result


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split", "train") == "train"]


def agree(a: dict, b: dict, what: str, rel: float):
    for key in ("loss", "beta", "kept", "margin_mean", "grad_norm"):
        x, y = a[key], b[key]
        if abs(x - y) > rel * max(abs(x), abs(y)) + 1e-4:
            raise SystemExit(f"{what}: {key} {x} vs {y} (tolerance {rel})")
    print(f"{what}: loss, beta, kept, margin_mean, grad_norm agree (rel {rel}); step time "
          f"{a['pairs'] / a['pairs_per_s']:.2f} s vs {b['pairs'] / b['pairs_per_s']:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny, on CPU processes (CI)")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--probe", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        return probe(args.probe)
    cpu = args.cpu
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no GPU visible (torch.cuda.is_available() is False); --cpu runs the tiny CPU version")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir = work / "model"
    model, shape = build(model_dir, cpu)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {shape}", flush=True)
    check_logps(model, shape, cpu)
    del model
    me = [sys.executable, str(Path(__file__).resolve()), "--probe"]
    common = ["--config", "configs/sort.yaml", "--model.name_or_path", model_dir, "--data.num_train", 64, "--data.eval_size", 4,
              "--eval.batch_size", 2, "--train.batch_size", 4, "--train.grad_accum", 2, "--train.lr", 1e-4, "--train.warmup_steps", 0,
              "--loss.alpha", 0.6, "--loss.filter_ratio", 0.25, "--train.save_every", 1, "--train.eval_every", 0,
              "--train.mixed_precision", "no" if cpu else "bf16", "--train.ref_cache_dir", work / "ref_cache",
              "--data.max_length", 64 if cpu else 1024, "--data.max_prompt_length", 32 if cpu else 512,
              "--model.dtype", "float64" if cpu else "float32"]  # CPU: float64, so that agreement is exact
    common = list(map(str, common))
    plain = work / "plain"
    run([*me, "betadpo.py", *common, "--train.output_dir", str(plain), "--train.max_steps", "2"], "2. plain run, 2 steps", cpu)
    fsdp = work / "fsdp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                "--num_processes", "2" if cpu else "1", "--main_process_port", str(29500 + os.getpid() % 500)]
    target = [str(ROOT / "tests" / "fsdp_launch.py")] if cpu else []  # CPU: accelerate's FSDP2 path on gloo processes
    fsdp_cmd = [*launcher, *me[1:], *target, "betadpo.py", *common, "--train.output_dir", str(fsdp)]
    run([*fsdp_cmd, "--train.max_steps", "1"], "3. FSDP2 run, step 1", cpu)
    resumed = run([*fsdp_cmd, "--train.max_steps", "2"], "3. FSDP2 run resumed, step 2", cpu)
    if "resumed from" not in resumed.stdout:
        raise SystemExit("3. the second FSDP2 launch did not resume from its checkpoint")
    rel = 1e-6 if cpu else 2e-2  # CPU: float64; GPU: bf16 forwards and another reduction order
    a, b = train_rows(plain), train_rows(fsdp)
    agree(a[0], b[0], "3. step 1, plain vs FSDP2", rel)
    agree(a[1], b[1], "3. step 2 (after resume), plain vs FSDP2", rel)
    pre = work / "precompute"
    run([*me, "betadpo.py", *common, "--train.output_dir", str(pre), "--train.max_steps", "1", "--train.precompute_ref", "true"],
        "4. precompute_ref, step 1", cpu)
    agree(a[0], train_rows(pre)[0], "4. step 1, live vs precomputed reference", rel)
    evaluated = run([*me, "eval.py", *common, "--eval.policy", str(fsdp / "final"), "--eval.reference", str(model_dir),
                     "--eval.output_dir", str(work / "eval"), "--eval.num_prompts", 4, "--eval.samples_per_prompt", 2,
                     "--eval.max_new_tokens", 8], "5. eval.py", cpu)
    metrics = json.loads((work / "eval" / "eval.json").read_text())["metrics"]
    print(f"5. eval.py: pref_accuracy {metrics['pref_accuracy']:.3f}, kl_seq {metrics['kl_seq']:.4f}")
    print(f"all checks passed ({work})")
    del evaluated


if __name__ == "__main__":
    main()
