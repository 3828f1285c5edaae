"""LoRA against full fine-tuning on SmolLM2-135M, and packed against padded batches for every architecture packing
supports: peak memory and time per step, side by side.

    python benchmarks/bench_lora.py                       # both tables: ≈10 minutes on 2 idle CPU cores
    python benchmarks/bench_lora.py --only lora --steps 6 --batch-size 8
    python benchmarks/bench_lora.py --only packing

1. LORA. SmolLM2-135M-Instruct (`smollm2-135m`, dequantised once into a plain save_pretrained copy under
   --workdir, so that no measured run pays for the GGUF read), β-DPO as configs/smollm2_hh_lora.yaml runs it
   (α = 0.6, ρ = 0.2), on HH-format pairs (bench_vs_trl.make_hh_pairs), fp32, AdamW. Two runs, each
   `python betadpo.py` in its own fresh process, in one invocation: full fine-tuning (a frozen reference model
   beside the policy, as a user gets it) and LoRA with r = 16 on every linear layer (the reference = the policy
   with its adapters off). Reported: the process's peak RSS (bench_vs_trl.launch: the launcher's wait4), the median
   time of a step after the first (metrics.jsonl), and the trainable parameters.
2. PACKING. For each architecture of PACKED_MODEL_TYPES (plumbing/fast_logps.py), a random model of the small Llama's
   shape (hidden 256, 4 layers, 4 heads, vocabulary 8,192) and one batch of 16 pairs with lengths spread like HH's
   (32–256 tokens, right-padded): forward + backward of betadpo.sequence_logps, packed (the fast path) and with
   packing switched off (the fast path otherwise), median of --repeats after one warm-up, in this process.
The machine may be shared with other work: the table prints the load average before and after, and the CPU model and
torch's kernel set (ATEN_CPU_CAPABILITY) with every number.
"""

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_vs_trl as bench  # noqa: E402  (its model copy, HH-format pairs and measured launches)

ARCH_ORDER = ("llama", "gpt_neox", "qwen2", "mistral", "gemma", "gemma2", "phi3")


def lora_table(a, workdir: Path) -> list[str]:
    meta = bench.build_real_model_dir("smollm2-135m", workdir / "model")
    rows = bench.make_hh_pairs(a.batch_size * (a.steps + 1) + 8, seed=0)
    train, held_out = workdir / "train.jsonl", workdir / "eval.jsonl"
    bench.write_jsonl(train, rows[8:])
    bench.write_jsonl(held_out, rows[:8])
    common = ["--config", "configs/smollm2_hh_lora.yaml", "--model.name_or_path", str(workdir / "model"),
              "--data.dataset", str(train), "--data.eval_dataset", str(held_out), "--data.chat_template", "off",
              "--data.max_length", "256", "--data.max_prompt_length", "128", "--train.batch_size", str(a.batch_size),
              "--train.max_steps", str(a.steps), "--train.save_every", str(a.steps), "--train.eval_every", "0",
              "--train.warmup_steps", "0", "--model.lora_merge_final", "false"]
    variants = {"full fine-tuning": ["--model.lora_r", "0", "--train.lr", "1e-6"],
                "LoRA r=16, all linear": ["--model.lora_r", "16"]}
    lines = [f"SmolLM2-135M ({meta['params'] / 1e6:.0f}M parameters), β-DPO, fp32, batch {a.batch_size} pairs, "
             f"{a.steps} steps ({a.threads} threads)", "",
             "| | trainable parameters | peak RSS (MiB) | time per step (s, median of steps 2…) | reference |", "|---|---:|---:|---:|---|"]
    for name, extra in variants.items():
        out = workdir / "out" / name.split()[0].lower()
        shutil.rmtree(out, ignore_errors=True)
        print(f"[lora] {name} …", flush=True)
        run = bench.launch([sys.executable, "betadpo.py", *common, "--train.output_dir", str(out), *extra], workdir / f"{out.name}.log", a.threads)
        if run["rc"] != 0:
            raise SystemExit(f"benchmark: {name} failed; see {workdir / f'{out.name}.log'}")
        steps = bench.read_ours(out)["dt"]
        log = (workdir / f"{out.name}.log").read_text()
        trainable = next((line.split("LoRA: ")[1].split(" of ")[0] for line in log.splitlines() if line.startswith("LoRA: ")), f"{meta['params']:,}")
        reference = "the policy, adapters off" if "LoRA" in name else "a second model"
        lines.append(f"| {name} | {trainable} | {run['rss_mib']:.0f} | {statistics.median(steps[1:]):.2f} | {reference} |")
    return lines


def random_model(arch: str, vocab: int):
    import torch
    import transformers

    common = dict(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                  max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    extra = {"qwen2": dict(num_key_value_heads=4), "mistral": dict(num_key_value_heads=4, sliding_window=4096),
             "gemma": dict(num_key_value_heads=4, head_dim=64), "gemma2": dict(num_key_value_heads=4, head_dim=64),
             "phi3": dict(num_key_value_heads=4)}.get(arch, {})
    name = {"llama": "Llama", "gpt_neox": "GPTNeoX", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma2", "phi3": "Phi3"}[arch]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**common, **extra))
    from plumbing.models import disable_dropout

    disable_dropout(model)
    return model.train()


def packing_table(a) -> list[str]:
    import torch

    torch.set_num_threads(a.threads)
    import betadpo
    from plumbing import fast_logps
    from plumbing.data import collate_pairs

    vocab, rng = 8192, random.Random(0)
    pairs = []
    for _ in range(16):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(16, 128))]
        pairs.append((prompt, [rng.randrange(2, vocab) for _ in range(rng.randint(16, 128))] + [1],
                      [rng.randrange(2, vocab) for _ in range(rng.randint(16, 128))] + [1]))
    batch = collate_pairs(pairs, 0)
    T, real = batch["input_ids"].shape[1], int(batch["attention_mask"].sum())
    lines = [f"16 pairs (32 sequences) of 33–257 tokens: {real:,} tokens, padded to 32 × {T} = {32 * T:,}; random models "
             f"of hidden 256, 4 layers, vocabulary 8,192; forward + backward of sequence_logps, ms, median of {a.repeats} "
             f"({a.threads} threads)", "", "| architecture | attention | padded (ms) | packed (ms) | padded / packed |", "|---|---|---:|---:|---:|"]
    packs = fast_logps.packs
    for arch in ARCH_ORDER:
        model = random_model(arch, vocab)
        times = {}
        for mode in ("padded", "packed"):
            fast_logps.packs = packs if mode == "packed" else (lambda m: False)
            samples = []
            for i in range(a.repeats + 1):
                t0 = time.perf_counter()
                out = betadpo.sequence_logps(model, batch, "fused")  # train.logps' default
                out["sum"].sum().backward()
                model.zero_grad(set_to_none=True)
                samples.append(time.perf_counter() - t0)
            times[mode] = statistics.median(samples[1:]) * 1000
        fast_logps.packs = packs
        print(f"[packing] {arch}: {times}", flush=True)
        lines.append(f"| {arch} | {model.config._attn_implementation} | {times['padded']:.0f} | {times['packed']:.0f} | "
                     f"{times['padded'] / times['packed']:.2f}× |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["lora", "packing"], default=None)
    p.add_argument("--steps", type=int, default=4, help="LoRA table: optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="LoRA table: pairs per step")
    p.add_argument("--repeats", type=int, default=3, help="packing table: timed passes per cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="runs/bench/lora")
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import subprocess

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = [f"CPU: {bench.cpu_name()}; torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"commit {commit}; load average before: {os.getloadavg()[0]:.1f}", ""]
    body = []
    if a.only in (None, "lora"):
        body += lora_table(a, workdir) + [""]
    if a.only in (None, "packing"):
        body += packing_table(a) + [""]
    report = "\n".join(head + body + [f"load average after: {os.getloadavg()[0]:.1f}"])
    print("\n" + report)
    (workdir / "report.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
