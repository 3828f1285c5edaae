"""LoRA against full fine-tuning on SmolLM2-135M, and packed against padded batches for every architecture packing
supports: peak memory and time per step, side by side.

    python benchmarks/bench_lora.py                       # both tables: ≈10 minutes on 2 idle CPU cores
    python benchmarks/bench_lora.py --only lora --steps 6 --batch-size 8
    python benchmarks/bench_lora.py --only lora --gradient-checkpointing    # both runs without stored activations
    python benchmarks/bench_lora.py --only packing
    python benchmarks/bench_lora.py --only gguf --repo OLDER_CHECKOUT      # the GGUF load peak, before/after
    python benchmarks/bench_lora.py --only stored                          # what one LoRA step stores for backward

1. LORA. SmolLM2-135M-Instruct (`smollm2-135m`, dequantised once into a plain save_pretrained copy under
   --workdir, so that no measured run pays for the GGUF read), β-DPO as configs/smollm2_hh_lora.yaml runs it
   (α = 0.6, ρ = 0.2), on HH-format pairs (bench_vs_trl.make_hh_pairs), fp32, AdamW. Two runs, each
   `python betadpo.py` in its own fresh process, in one invocation: full fine-tuning (a frozen reference model
   beside the policy, as a user gets it) and LoRA with r = 16 on every linear layer (the reference = the policy
   with its adapters off). Reported: the process's peak RSS (bench_vs_trl.launch: the launcher's wait4), split into
   the peaks while loading and while training (RSS sampled every 50 ms; the boundary is the run's config.yaml,
   written just before the loop), the median time of a step after the first (metrics.jsonl), and the trainable
   parameters. --model gguf loads SmolLM2 from its GGUF file, as users do, instead of the plain copy.
2. PACKING. For each architecture of PACKED_MODEL_TYPES (plumbing/fast_logps.py), a random model of the small Llama's
   shape (hidden 256, 4 layers, 4 heads, vocabulary 8,192) and one batch of 16 pairs with lengths spread like HH's
   (32–256 tokens, right-padded): forward + backward of betadpo.sequence_logps, packed (the fast path) and with
   packing switched off (the fast path otherwise), median of --repeats after one warm-up, in this process.
3. GGUF. One process loads SmolLM2's GGUF file twice with plumbing.models.load_model, dropping the first model
   before the second: peak RSS after each, and CPU seconds; in --repo (e.g. an older commit's checkout) and here.
4. STORED. What autograd stores for backward in one LoRA step of table 1's first batch (SmolLM2, r = 16, all
   linear, packed, the adapters-off reference pass included), in this process: distinct storages caught by a
   saved-tensor hook, the parameters' own left out, summed by the module that stored them; once with
   transformers' own modules (repeat_kv, autograd's SwiGLU) and once as load_model builds the model
   (plumbing/models.py's store_less_for_backward); and whether the two give the same log-probs.
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
    model = str(workdir / "model") if a.model == "copy" else "smollm2-135m"
    rows = bench.make_hh_pairs(a.batch_size * (a.steps + 1) + 8, seed=0)
    train, held_out = workdir / "train.jsonl", workdir / "eval.jsonl"
    bench.write_jsonl(train, rows[8:])
    bench.write_jsonl(held_out, rows[:8])
    common = ["--config", "configs/smollm2_hh_lora.yaml", "--model.name_or_path", model,
              "--data.dataset", str(train), "--data.eval_dataset", str(held_out), "--data.chat_template", "off",
              "--data.max_length", "256", "--data.max_prompt_length", "128", "--train.batch_size", str(a.batch_size),
              "--train.max_steps", str(a.steps), "--train.save_every", str(a.steps), "--train.eval_every", "0",
              "--train.warmup_steps", "0", "--model.lora_merge_final", "false",
              "--train.gradient_checkpointing", str(a.gradient_checkpointing).lower()]
    variants = {"full fine-tuning": ["--model.lora_r", "0", "--train.lr", "1e-6"],
                "LoRA r=16, all linear": ["--model.lora_r", "16"]}
    lines = [f"SmolLM2-135M ({meta['params'] / 1e6:.0f}M parameters), β-DPO, fp32, batch {a.batch_size} pairs, "
             f"{a.steps} steps ({a.threads} threads)"
             f"{', gradient checkpointing in both runs' if a.gradient_checkpointing else ''}", "",
             "| | trainable parameters | peak RSS (MiB) | loading | training | time per step (s, median of steps 2…) | reference |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, extra in variants.items():
        out = workdir / "out" / name.split()[0].lower()
        shutil.rmtree(out, ignore_errors=True)
        print(f"[lora] {name} …", flush=True)
        run = launch_in_phases([sys.executable, "betadpo.py", *common, "--train.output_dir", str(out), *extra], workdir / f"{out.name}.log",
                               a.threads, out / "config.yaml")
        if run["rc"] != 0:
            raise SystemExit(f"benchmark: {name} failed; see {workdir / f'{out.name}.log'}")
        steps = bench.read_ours(out)["dt"]
        log = (workdir / f"{out.name}.log").read_text()
        trainable = next((line.split("LoRA: ")[1].split(" of ")[0] for line in log.splitlines() if line.startswith("LoRA: ")), f"{meta['params']:,}")
        reference = "the policy, adapters off" if "LoRA" in name else "a second model"
        lines.append(f"| {name} | {trainable} | {run['rss_mib']:.0f} | {run['load_mib']:.0f} | {run['train_mib']:.0f} | "
                     f"{statistics.median(steps[1:]):.2f} | {reference} |")
    return lines


def launch_in_phases(cmd: list[str], log: Path, threads: int, loaded: Path) -> dict:
    """bench.launch's measured process, its RSS sampled every 50 ms and split at the moment `loaded` appears
    (betadpo.py writes the run's config.yaml once the models, optimizer and data are ready, just before the
    loop): → exit code, peak RSS of the whole process (wait4, MiB) and the sampled peaks while loading and while
    training (MiB)."""
    import threading

    import psutil

    peaks, done, me = {"load_mib": 0.0, "train_mib": 0.0}, threading.Event(), psutil.Process()

    def sample():
        while not done.is_set():
            for proc in me.children(recursive=True):  # the launcher, and its child running betadpo.py
                try:
                    if "betadpo.py" in proc.cmdline():
                        phase = "train_mib" if loaded.exists() else "load_mib"
                        peaks[phase] = max(peaks[phase], proc.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = bench.launch(cmd, log, threads)
    finally:
        done.set()
        sampler.join()
    return {**run, **peaks}


# One process that loads SmolLM2's GGUF file twice, the first model dropped before the second: its peak RSS after each
# (the first: the load's own peak; the second: that plus whatever a load keeps for the next one)
GGUF_LOADS = ("import resource, sys, time; sys.path.insert(0, '.'); from plumbing.models import load_model; t = time.process_time(); "
              "peaks = [(load_model('smollm2-135m'), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)[1] for _ in range(2)]; "
              "print('GGUF', *peaks, time.process_time() - t)")


def gguf_table(a) -> list[str]:
    """The GGUF load peak: `GGUF_LOADS` in the checkout --repo (another commit, for before/after) and in this one."""
    import subprocess

    lines = ["SmolLM2-135M's GGUF file dequantised to fp32 by plumbing.models.load_model, twice in one process (the first model "
             "dropped before the second)", "", "| checkout | peak RSS after one load (MiB) | after the second (MiB) | CPU s (both) |",
             "|---|---:|---:|---:|"]
    for repo in dict.fromkeys([Path(a.repo).resolve(), REPO]):
        run = subprocess.run([sys.executable, "-c", GGUF_LOADS], cwd=repo, capture_output=True, text=True, env=bench.child_env(a.threads))
        found = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("GGUF ")]
        if run.returncode != 0 or not found:
            raise SystemExit(f"benchmark: loading the GGUF file in {repo} failed:\n{run.stderr[-2000:]}")
        policy, both, cpu = map(float, found[0])
        lines.append(f"| {repo} | {policy:.0f} | {both:.0f} | {cpu:.1f} |")
    return lines


def stored_table(a, workdir: Path) -> list[str]:
    """Table 4: bytes autograd stores for backward in one LoRA step, by module, without and with
    store_less_for_backward, and the log-probs of both (the same numbers, or the table says they differ)."""
    import collections

    import torch

    torch.set_num_threads(a.threads)
    import betadpo
    from plumbing import lora, models
    from plumbing.config import ModelArgs
    from plumbing.data import collate_pairs, tokenize_pairs

    bench.build_real_model_dir("smollm2-135m", workdir / "model")
    tok = models.load_tokenizer(str(workdir / "model"))
    rows = bench.make_hh_pairs(a.batch_size * (a.steps + 1) + 8, seed=0)[8 : 8 + a.batch_size]
    batch = collate_pairs(tokenize_pairs(tok, rows, 256, 128), tok.pad_token_id)
    lora_cfg = ModelArgs(name_or_path=str(workdir / "model"), lora_r=16, lora_alpha=32.0)
    store_less = models.store_less_for_backward
    results = {}
    for name in ("transformers' modules", "store_less_for_backward"):
        models.store_less_for_backward = store_less if "less" in name else (lambda model: None)
        os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)  # store_less_for_backward sets it (no CUDA)
        torch.manual_seed(0)
        policy = lora.add_adapters(models.load_model(str(workdir / "model")), lora_cfg, "bench").train()
        params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
        where, stored = [], {}
        hooks = [m.register_forward_pre_hook(lambda m, args, n=n: where.append(n)) for n, m in policy.named_modules()]
        hooks += [m.register_forward_hook(lambda m, args, out: [where.pop(), None][1]) for m in policy.modules()]  # None: output kept

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and ptr not in stored:
                kind = next((k for k in ("lora_", "layernorm", "self_attn", "mlp") if where and k in where[-1]), "other")
                stored[ptr] = (kind, t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps = betadpo.pair_logps(policy, lora.AdaptersOff(policy), batch, "fused")
        (logps.policy_chosen - logps.policy_rejected).sum().backward()
        for h in hooks:
            h.remove()
        by_kind = collections.Counter()
        for kind, nbytes in stored.values():
            by_kind[kind] += nbytes / 2**20
        results[name] = (by_kind, logps.policy_chosen.detach(), logps.ref_chosen)
        print(f"[stored] {name}: {sum(by_kind.values()):.0f} MiB", flush=True)
        del policy, logps
    models.store_less_for_backward = store_less
    (old, old_lp, old_ref), (new, new_lp, new_ref) = results.values()
    same = "bit for bit the same" if torch.equal(old_lp, new_lp) and torch.equal(old_ref, new_ref) else \
        f"DIFFERENT (max |Δ| {(old_lp - new_lp).abs().max().item():.2e})"
    kinds = ("lora_", "layernorm", "self_attn", "mlp", "other")  # the innermost module; lora_: an adapted Linear's input
    lines = [f"One LoRA step of {a.batch_size} pairs (SmolLM2, r = 16, all linear, packed, fp32, {a.threads} threads): "
             f"MiB stored for backward, by the module that stored it; log-probs {same}", "",
             "| modules | " + " | ".join(kinds) + " | total |", "|---|" + "---:|" * (len(kinds) + 1)]
    for name, (by_kind, _, _) in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_kind[k]:.0f}" for k in kinds) + f" | {sum(by_kind.values()):.0f} |")
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
    p.add_argument("--only", choices=["lora", "packing", "gguf", "stored"], default=None)
    p.add_argument("--repo", default=str(REPO), help="gguf table: another checkout to load the file with as well (before/after)")
    p.add_argument("--steps", type=int, default=4, help="LoRA table: optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="LoRA table: pairs per step")
    p.add_argument("--repeats", type=int, default=3, help="packing table: timed passes per cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", choices=["copy", "gguf"], default="copy",
                   help="LoRA table: SmolLM2 from a plain save_pretrained copy (no GGUF read measured), or from its GGUF file as users load it")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="LoRA table: both runs recompute each layer's activations in the backward pass "
                        "(train.gradient_checkpointing): what is left of either peak without them")
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
    if a.only in (None, "gguf"):
        body += gguf_table(a) + [""]
    if a.only in (None, "stored"):
        body += stored_table(a, workdir) + [""]
    report = "\n".join(head + body + [f"load average after: {os.getloadavg()[0]:.1f}"])
    print("\n" + report)
    (workdir / "report.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
