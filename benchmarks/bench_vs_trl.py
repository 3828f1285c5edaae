"""Throughput, memory and exactness of our `betadpo.py` loop against TRL's `DPOTrainer` (stock and its fast path)
and a naive PyTorch loop, on a small random Llama or on a real checkpoint.

    pip install -r requirements-bench.txt                           # requirements.txt + TRL (benchmark-only)
    python benchmarks/bench_vs_trl.py                               # small Llama, vocab 16k: ≈15 minutes on 2 idle CPU cores
    python benchmarks/bench_vs_trl.py --model smollm2-135m          # SmolLM2-135M's shapes and tokenizer, HH-format text: ≈30 min
    python benchmarks/bench_vs_trl.py --model smollm2-135m --data experiments/data/hh-harmless-base-test.jsonl.gz \
        --columns ours,ours_unshared,trlfast --settings live       # real HH rows (max_length 512), prefix sharing on/off
    python benchmarks/bench_vs_trl.py --memory                      # peak memory over sequence length × vocabulary: ≈15 min
    python benchmarks/bench_vs_trl.py --memory --memory-vocabs 92544 --memory-lengths 256   # one row: ≈3 min
    python benchmarks/bench_vs_trl.py --model smollm2-135m --batch-size 8 --profile   # where our step's time goes: ≈2 min
    python benchmarks/bench_vs_trl.py --model smollm2-135m --batch-size 4 --steps 3 --settings live --columns ours,ours_logits,trlfast,naive
    python benchmarks/bench_vs_trl.py --model smollm2-135m --batch-size 8 --profile --cpu_kernels avx2   # on torch's AVX2 kernels
    python benchmarks/bench_vs_trl.py --model smollm2-135m --batch-size 8 --kernel-ab 6 --threads 1   # fused LM head vs logits kernel
    python benchmarks/bench_vs_trl.py --model smollm2-135m --data experiments/data/hh-harmless-base-test.jsonl.gz --batch-size 4 --sharing-ab 6 --threads 1
    python benchmarks/bench_vs_trl.py --model smollm2-135m --data experiments/data/hh-harmless-base-test.jsonl.gz --work 2,4,8
    python benchmarks/bench_vs_trl.py --ab 8                        # β-DPO machinery vs plain DPO: 8 ABBA pairs, then alone: ≈9 min
    python benchmarks/bench_vs_trl.py --quick                       # smoke test, ≈2 minutes
    python benchmarks/bench_vs_trl.py --steps 20 --repeats 5 --batch-size 8 --threads 2

What it does, top to bottom:

1. ASSETS. Builds once, under `--workdir` (default runs/bench/<preset>): a word-level tokenizer with a real-sized
   vocabulary (the log-softmax over the vocabulary is where a DPO step's memory goes) and a randomly initialised
   Llama saved with `save_pretrained`; or with `--model`, a plain copy of that checkpoint (a GGUF file is
   dequantised once) and its own tokenizer. Every invocation writes a deterministic preference data set of
   prompt/chosen/rejected strings as .jsonl (our `data.dataset` accepts it as is): Zipf-distributed words, or
   with `--model` HH-format dialogues ("\\n\\nHuman: … \\n\\nAssistant:") of English sentences.
2. RUNS. Each measured run is its own fresh subprocess with the same environment and the same number of
   threads, so its peak RSS is that process's own. One round runs, in a rotating order: ours / ours with the
   logits kernel / TRL / TRL (fast path) / naive with the reference model live, the same five with reference
   log-probs precomputed, and (small model) ours with the β-DPO machinery switched on. `--repeats` rounds;
   medians reported. `--columns` and `--settings` run a subset.
   Ours (no prefix sharing): betadpo.py with `--train.prefix_sharing false`: each pair's prompt in its chosen and
   in its rejected row, packed; ours (the default) runs each pair as one sequence, prompt + chosen + rejected.
   Ours (logits kernel): betadpo.py with `--train.logps fast`, i.e. the LM head's logits and then token_logps, as before
   the fused LM head (plumbing/fused_head.py, `--train.logps fused`, the default); everything else the same.
   TRL (fast path): TRL 1.16 restricts its LM head to the completion positions only where its Triton kernels run
   (trl/trainer/utils.py asks `_use_triton(device)`: CUDA or XPU). On a CPU it scores every position, prompt and
   padding included. The fast-path column sets `trl.trainer.utils._use_triton = lambda device: True` in TRL's
   process, so the CPU takes the path a GPU takes, with TRL's torch fallback of the same chunked kernel. Its
   log-probs and losses are checked against ours like every other column's. The headline ratio is against
   whichever TRL column is faster.
3. SAME WORK. All train the same model on the same batches in the same order (TRL's sampler is made
   sequential over a file written in our loop's order), AdamW (lr, betas, eps, no weight decay; the fused
   kernel in ours and TRL, torch's default in naive), constant lr (no warm-up), gradient clipping, fp32,
   dropout off, gradient accumulation 1, no gradient checkpointing, no evaluation or checkpoint inside the timed
   steps, and the same loss (the batch mean of −log σ(β·M)). TRL and naive pad every sequence of a step to its
   longest (right); ours packs them into fewer rows (betadpo.py's packing: the same log-probs). No sequence is
   truncated (the limits are above the longest pair), and every run's token ids are prompt, then response, then
   EOS, no BOS, no chat template: TRL's tokenized data set is compared with our `data.tokenize_pairs` id for id.
   Hence the per-step losses must agree to 1e-5 and the per-step policy log-probs to a relative 1e-4
   (LOGP_TOLERANCE); the benchmark fails if they do not.
4. TABLES (markdown, paste into docs/PERFORMANCE.md): time per step, pairs/s, tokens/s, peak RSS (and above the
   implementation's imports alone), counted model FLOP/s and MFU, executed FLOP/s and its utilisation, the
   ratio to the faster TRL column; then (small model) a paired A/B of β-DPO's filter/statistics/gathers/learnable
   scale against plain DPO. `--memory` instead prints peak memory at a fixed number of tokens per step over
   sequence lengths 128/256/512 × vocabularies 16k/49k/92k, ours (fused LM head) vs ours (logits kernel) vs TRL
   (fast path). Every table names the CPU and torch's CPU kernel set (`--cpu_kernels`: ATEN_CPU_CAPABILITY).

How things are measured:
- timings are only meaningful on an otherwise idle machine: with the cores shared, the threads of a step wait
  for each other and a step can take 10-20× longer. The load average and the GEMM peak before and after the
  runs are printed with the tables; a busy machine gets a warning.
- time per step: median over the steps after the first WARMUP_STEPS. Ours: its own clock in metrics.jsonl
  (dt = pairs / pairs_per_s: batch assembly → forward/backward → clip → optimizer step → logging sync). TRL:
  the interval between consecutive `on_step_end` callbacks (the same work plus TRL's own logging). Naive: the
  same window as ours. Throughput = pairs (tokens) of the measured steps / their summed time.
- tokens = non-padding tokens (prompt + response + EOS, chosen and rejected).
- counted model FLOPs (PaLM convention, real tokens only, no recomputation): a forward pass over a sequence of
  t tokens costs 2·N·t + 4·L·d·t² (N = weights of the matmuls incl. the LM head, L layers, width d; the second
  term is attention's QKᵀ and AV, each 2·t²·d per layer), a training forward+backward 3× that; the live
  reference adds one forward, a precomputed one nothing inside the step. Every column is credited the same
  count, so MFU = counted FLOP/s ÷ the GEMM peak restates the throughput ratio between columns.
- executed FLOPs (executed_step_flops): what each column's matmuls really run — the model body over every row
  × T position it is given (padding included; ours over its packed rows) and the LM head over the positions it
  scores (ours and TRL's fast path: response positions; stock TRL and naive: every position), backward 2×
  forward, and for the LM heads that recompute their logits in backward (ours' fused head, both TRL columns'
  chunked head) 3× forward. It shows where each column's time goes; elementwise work (softmax, TRL's entropy
  and top-1 metrics over the full vocabulary) is not in it.
- GEMM peak: GEMM_SAMPLES timings of GEMM_REPS fp32 2048×2048 `torch.matmul`s with the same threads, in a fresh
  process before and after the runs; median and max are printed, MFU is stated against the max.
- peak RSS: `ru_maxrss` of the measured process, from `wait4`. Linux carries a process's peak RSS over fork
  and exec into the new program's `ru_maxrss`, so a process forked from this one (which has torch loaded)
  would report at least our own peak; each measured process is therefore started by a minimal launcher
  (RSS_LAUNCHER, ≈13 MiB), which reports its child's peak. "Above its imports" subtracts the peak RSS of a
  process that only imports that implementation's modules (TRL and datasets weigh more than ours).
- "process wall" is the whole subprocess: imports, model loading, tokenization, reference precomputation,
  training, the final `save_pretrained` of the policy (all). Ours also writes a resumable checkpoint
  (optimizer state included) and evaluates the --batch-size held-out pairs once at the end: it cannot skip
  either. It shows start-up and precomputation overheads the per-step numbers leave out. "process CPU time" is
  the same process's user + system time (`wait4`): on a machine shared with other work, wall times stretch
  with the waiting, CPU times much less (with one thread per run, none of it is spent spinning at barriers).

Internal: `bench_vs_trl.py _child {trl,naive,gemm,imports} JOB.json` is how the benchmark starts its own measured
subprocesses; it is not meant to be called by hand.
"""

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------
# Fixed settings of every run (the same for ours, TRL and naive)
# --------------------------------------------------------------------------------------------------------
LR = 1e-4  # AdamW, betas (0.9, 0.999), eps 1e-8, no weight decay, constant (no warm-up)
BETA = 0.1  # β₀ of DPO
MAX_GRAD_NORM = 1.0  # gradient clipping, in all three
SEED = 0
LOSS_TOLERANCE = 1e-5  # the first steps' losses must agree this well (absolute): it is the same math
LOGP_TOLERANCE = 1e-4  # ... and the policy's log-probs this well (relative); one token more or less is ~1e-2.
# (1e-5 until TRL's chunked LM head met SmolLM2's 30 fp32 layers: its log-probs differ from ours and the naive
# loop's by 1.1e-5 relative there, while ours and naive agree to 2e-7 and TRL's two columns to 2e-7.)
LOSS_STEPS = 5  # how many first steps the comparison covers
GEMM_SAMPLES, GEMM_REPS = 7, 4  # the GEMM peak: 7 timings of 4 matmuls, before and after the runs


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model and data sizes. The default keeps compute (matmuls, log-softmax) dominant over Python overhead
    while a full run stays ≈10 minutes on 2 cores; `--quick` is a smoke test of the same pipeline."""

    name: str
    vocab: int  # tokenizer/model vocabulary (a real size: the LM head and log-softmax scale with it)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    prompt_tokens: tuple  # (min, max) words of a prompt
    response_tokens: tuple  # (min, max) words of a response (EOS comes on top)
    steps: int  # default --steps
    repeats: int  # default --repeats
    batch_size: int  # default --batch-size (pairs per step)


DEFAULT = Preset("default", vocab=16384, hidden=384, layers=4, intermediate=1024, heads=6,
                 prompt_tokens=(32, 64), response_tokens=(32, 112), steps=8, repeats=3, batch_size=8)
QUICK = Preset("quick", vocab=2048, hidden=64, layers=2, intermediate=128, heads=2,
               prompt_tokens=(8, 16), response_tokens=(8, 24), steps=4, repeats=1, batch_size=4)
# --model: the sizes come from the checkpoint and the lengths from the text (make_hh_pairs); only the run lengths here.
REAL = Preset("real", vocab=0, hidden=0, layers=0, intermediate=0, heads=0, prompt_tokens=(0, 0), response_tokens=(0, 0),
              steps=4, repeats=2, batch_size=4)


def warmup_steps(steps: int) -> int:
    """Leading steps left out of the timings (allocator warm-up, first-touch of weights)."""
    return 2 if steps >= 6 else 1


# ========================================================================================================
# 1. ASSETS: tokenizer + model (built once), preference pairs (written every run, deterministic)
# ========================================================================================================
RESERVED_TOKENS = ["<pad>", "<eos>", "<unk>"]


def build_model_dir(preset: Preset, path: Path) -> dict:
    """Tokenizer and random-init Llama, saved like a hub checkpoint; returns the sizes the FLOP count needs.
    Reused when it exists and was built for the same model sizes."""
    shape = {k: getattr(preset, k) for k in ("vocab", "hidden", "layers", "intermediate", "heads")}
    meta_file = path / "bench_meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("shape") == shape:
        return json.loads(meta_file.read_text())
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Word-level tokenizer: words "w0", "w1", ... split on whitespace; special tokens are split out before
    # that, so TRL's "response<eos>" strings give the same ids as our response ids + [EOS]. No BOS and no
    # post-processor: neither side adds anything but the EOS after the response (checked in main()).
    vocab = {s: i for i, s in enumerate(RESERVED_TOKENS + [f"w{i}" for i in range(preset.vocab - len(RESERVED_TOKENS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=True, attention_dropout=0.0,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # N for the FLOP count: every matmul weight, the (tied) LM head included once; the embedding lookup is free.
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    meta = {"params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul,
            "layers": preset.layers, "hidden": preset.hidden, "vocab": preset.vocab, "shape": shape,
            "name": "Llama (random init, tied embeddings)"}
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return meta


def build_real_model_dir(name: str, path: Path) -> dict:
    """--model: a plain copy of a real checkpoint (plumbing.models.load_model: a GGUF file is read and dequantised once here,
    not in every measured run) with its tokenizer; returns the sizes the FLOP count needs."""
    meta_file = path / "bench_meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("source") == name:
        return json.loads(meta_file.read_text())
    import torch

    sys.path.insert(0, str(REPO))
    from plumbing.models import load_model, load_tokenizer

    print(f"[setup] reading {name} (once) → {path}", flush=True)
    model = load_model(name)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(name).save_pretrained(tmp)
    cfg = model.config
    head = model.get_output_embeddings().weight
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # the tied head once
    meta = {"params": sum(p.numel() for p in model.parameters()), "matmul_params": matmul, "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size, "vocab": head.shape[0], "source": name, "name": f"{name} ({cfg.model_type})"}
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return meta


SENTENCES = [  # --model's text: English sentences of different lengths, drawn at random into HH-format dialogues
    "Could you tell me more about how that works?", "I am not sure I understand the question.",
    "The weather has been unusually warm this week, and the rivers are low.", "Many people find it helpful to write things down.",
    "There are several ways to approach this problem, and each has its own costs.", "It depends on what you want to achieve.",
    "Cooking rice well takes patience and the right amount of water.", "Exercise is good for both body and mind.",
    "The library opens at nine in the morning and closes at six.", "Learning a new language can take years of practice.",
    "Sure.", "Thanks!", "What do you mean by that?", "Here is a short summary of the main points.",
    "First, measure the room; then buy the paint, the brushes and the tape.", "No, that is not what I asked.",
    "The train was late again, so I missed the beginning of the meeting.", "Please explain it step by step.",
]


def make_hh_pairs(n: int, seed: int) -> list[dict]:
    """--model: prompt/chosen/rejected in Anthropic HH's raw format ("\\n\\nHuman: … \\n\\nAssistant:"), one to
    three turns, responses of 1–6 sentences: mixed lengths, so batches carry padding as real HH batches do."""
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(SENTENCES) for _ in range(k))

    rows = []
    for _ in range(n):
        turns = rng.randint(1, 3)
        prompt = "".join(f"\n\nHuman: {text(rng.randint(1, 4))}\n\nAssistant: {text(rng.randint(1, 3))}" for _ in range(turns - 1))
        prompt += f"\n\nHuman: {text(rng.randint(1, 4))}\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": " " + text(rng.randint(1, 6)), "rejected": " " + text(rng.randint(1, 6))})
    return rows


def read_pair_rows(path: Path) -> list[dict]:
    """--data: real rows, .jsonl or .jsonl.gz, as prompt/chosen/rejected strings in file order. Rows with a
    `prompt` are taken as they are; Anthropic HH rows ({"chosen", "rejected"}: whole dialogues) are split at their
    last "\n\nAssistant:" (plumbing.data_shapes.split_hh) into the whole dialogue before it, in HH's raw format, and
    the two last responses; rows whose two dialogues differ before it, or with an empty response, are skipped (as
    the loader does). The responses keep their leading space, so that prompt + response split where the prompt ends
    (make_pairs says why that matters to TRL)."""
    import gzip

    sys.path.insert(0, str(REPO))
    from plumbing.data_shapes import split_hh

    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
        raw = [json.loads(line) for line in f if line.strip()]
    rows = []
    for r in raw:
        if "prompt" in r:
            rows.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
            continue
        (prompt, chosen), (other, rejected) = split_hh(r["chosen"]), split_hh(r["rejected"])
        if prompt == other and chosen.strip() and rejected.strip():
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def real_pairs(path: Path, tokenizer, n: int, max_length: int) -> tuple[list[dict], dict]:
    """The first n rows of --data whose pair fits in max_length tokens (prompt + the longer response + EOS), in file
    order: no row is cut (every implementation then scores the same tokens), and the ones that would be are
    counted. → (rows, their statistics over the whole file)."""
    import hashlib

    sys.path.insert(0, str(REPO))
    from plumbing.data import tokenize_pairs

    rows = read_pair_rows(path)
    ids = tokenize_pairs(tokenizer, rows, 10**6, 10**6 - 1)
    fits = [len(p) + max(len(c), len(r)) <= max_length for p, c, r in ids]
    if sum(fits) < n:
        raise SystemExit(f"benchmark: --data {path} has {sum(fits)} pairs within {max_length} tokens, the run needs {n}")
    chosen = [r for r, ok in zip(rows, fits) if ok][:n]
    k = len(ids)
    stats = {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "pairs": k,
             "too_long": k - sum(fits), "prompt": sum(len(p) for p, _, _ in ids) / k,
             "chosen": sum(len(c) for _, c, _ in ids) / k, "rejected": sum(len(r) for _, _, r in ids) / k}
    return chosen, stats


def make_pairs(n: int, preset: Preset, seed: int) -> list[dict]:
    """Prompt/chosen/rejected strings of Zipf-distributed words (like text: a few words are frequent)."""
    rng = random.Random(seed)
    words = preset.vocab - len(RESERVED_TOKENS)
    cum, total = [], 0.0
    for rank in range(words):
        total += 1.0 / (rank + 1) ** 1.1
        cum.append(total)

    def text(length_range, lead=""):
        k = rng.randint(*length_range)
        return lead + " ".join(f"w{i}" for i in rng.choices(range(words), cum_weights=cum, k=k))

    # Responses begin with a space: TRL tokenizes prompt + response as one string, which must split exactly
    # where the prompt ends (ours tokenizes the two apart).
    return [{"prompt": text(preset.prompt_tokens), "chosen": text(preset.response_tokens, " "),
             "rejected": text(preset.response_tokens, " ")} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ========================================================================================================
# 2. RUNS: one subprocess each; ours is `python betadpo.py`, TRL / naive / GEMM are `_child` entries below
# ========================================================================================================
def child_env(threads: int) -> dict:
    """Identical environment for every measured process: thread counts, offline, no progress bars."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1", WANDB_MODE="disabled")


# Runs argv[2:] and writes its peak RSS (KiB) and CPU time (s) to argv[1]. Started with `python -I -S`: no site
# packages, so the floor it passes on to the measured process (see the module docstring) is ≈13 MiB, not our own peak.
RSS_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def launch(cmd: list[str], log: Path, threads: int) -> dict:
    """Run one measured process; → exit code, wall and CPU seconds, peak RSS (MiB) of that process alone."""
    rss_file = log.with_suffix(".rss")
    rss_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call([sys.executable, "-I", "-S", "-c", RSS_LAUNCHER, str(rss_file), *cmd],
                             cwd=REPO, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0  # includes the launcher's start, a few ms
    rss, cpu = (float(x) for x in rss_file.read_text().split()) if rss_file.exists() else (float("nan"),) * 2
    return {"rc": rc, "wall": wall, "rss_mib": rss / 1024, "cpu_s": cpu}


def ours_command(bench: dict, out: Path, precompute: bool, extra: list[str], fused: bool = True) -> list[str]:
    """Our loop, exactly as a user runs it: plain DPO (α = 0, ρ = 0) unless `extra` switches β-DPO on.
    fused=False: the same with `--train.logps fast`, the logits path (LM head, then token_logps)."""
    cmd = [sys.executable, "betadpo.py", "--train.logps", "fused" if fused else "fast",
           "--model.name_or_path", bench["model_dir"], "--data.dataset", bench["train_file"],
           "--data.eval_dataset", bench["eval_file"], "--eval.batch_size", str(bench["batch_size"]),
           "--data.max_length", str(bench["max_length"]), "--data.max_prompt_length", str(bench["max_prompt_length"]),
           "--loss.type", "dpo", "--loss.beta", str(BETA), "--loss.alpha", "0", "--loss.filter_ratio", "0",
           "--train.batch_size", str(bench["batch_size"]), "--train.grad_accum", "1", "--train.lr", str(LR),
           "--train.optimizer", "adamw", "--train.weight_decay", "0", "--train.warmup_steps", "0",
           "--train.max_grad_norm", str(MAX_GRAD_NORM), "--train.max_steps", str(bench["steps"]),
           "--train.seed", str(SEED), "--train.save_every", str(bench["steps"]), "--train.eval_every", "0",
           "--train.mixed_precision", "no", "--model.dtype", "float32", "--train.output_dir", str(out),
           "--data.chat_template", "off",  # the text as it is, as TRL and naive get it
           # A cache inside the run's own (fresh) output dir: every run precomputes, as TRL and naive do.
           "--train.ref_cache_dir", str(out / "ref_cache")]
    if precompute:
        cmd += ["--train.precompute_ref", "true"]
    return cmd + extra  # later flags override earlier ones


def read_ours(out: Path) -> dict:
    """Per-step numbers from our metrics.jsonl (training rows only)."""
    sys.path.insert(0, str(REPO))
    from plumbing.metrics import read_metrics

    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"]
    return {"loss": [r["loss"] for r in rows], "dt": [r["pairs"] / r["pairs_per_s"] for r in rows],
            "logps_chosen": [r["logps/chosen"] for r in rows], "logps_rejected": [r["logps/rejected"] for r in rows],
            "tokens": [r["tokens_per_s"] * r["pairs"] / r["pairs_per_s"] for r in rows], "kept": [r["kept"] for r in rows]}


def child_trl(spec: dict) -> dict:
    """TRL's DPOTrainer, with every default that would change the work set to match ours (TRL 1.x names).
    spec["fast"]: TRL's fast path (see the module docstring): its LM head on completion tokens only, as TRL
    itself does on CUDA/XPU. Its log-probs are the same numbers (main() checks them against ours)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if spec.get("fast"):
        import trl.trainer.utils

        # trl/trainer/utils.py scores only the valid (completion) positions when `_use_triton(device)` is true,
        # which TRL 1.16 ties to CUDA/XPU. The Triton kernels themselves are looked up in trl/kernels, whose own
        # `_use_triton` this leaves alone: the CPU keeps TRL's torch fallback of the same chunked computation.
        trl.trainer.utils._use_triton = lambda device: True

    result = {"loss": [], "dt": [], "logps_chosen": [], "logps_rejected": []}

    class Record(TrainerCallback):
        """Step time = interval between step ends (the first step: from its beginning); losses from the log."""

        last = None

        def on_step_begin(self, args, state, control, **kw):
            self.last = self.last or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            result["dt"].append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # logging_steps=1: one row per optimizer step, that step's loss (unrounded)
                result["loss"].append(logs["loss"])
                result["logps_chosen"].append(logs["logps/chosen"])
                result["logps_rejected"].append(logs["logps/rejected"])

    rows = [json.loads(line) for line in Path(spec["trl_train_file"]).read_text().splitlines()]
    train = datasets.Dataset.from_list(rows)  # prompt / chosen / rejected strings, in our loop's batch order
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=spec["out"], report_to="none", use_cpu=True, seed=SEED, disable_tqdm=True,
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=spec["steps"],
        train_sampling_strategy="sequential",  # the file is already in our loop's order
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        # transformers' default AdamW, fused like ours (the naive loop keeps torch's plain AdamW, as a bare loop would)
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=MAX_GRAD_NORM,
        bf16=False, fp16=False, activation_checkpointing=False,  # TRL defaults to bf16 and checkpointing: ours does neither
        logging_steps=1, save_strategy="no", eval_strategy="no",
        beta=BETA, loss_type=["sigmoid"],  # per-pair −log σ(β·M), averaged over the batch: our plain DPO loss
        max_length=spec["max_length"],  # above every pair: nothing truncated
        padding_free=False, pad_to_multiple_of=None,  # right-padded to the batch's longest sequence, like ours
        precompute_ref_log_probs=spec["precompute"], precompute_ref_batch_size=spec["batch_size"],
    )
    # A TRL release that changed what these names mean would otherwise be timed doing different work.
    assert not (args.bf16 or args.fp16 or args.gradient_checkpointing or args.padding_free), args
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[Record()])
    ds = trainer.train_dataset  # TRL's own tokenization, compared with ours by main()
    result["ids"] = [list(t) for t in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    trainer.train()
    trainer.save_model()  # like ours and naive: the trained policy ends up on disk
    return result


def child_naive(spec: dict) -> dict:
    """A bare DPO loop: full log_softmax over the vocabulary, reference live (or precomputed once up front)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).train()  # (no dropout in it)

    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # prompt ids, then response ids + EOS, for chosen and rejected (tokenized once, before training)
    data = [(ids(r["prompt"]), ids(r["chosen"]) + [tok.eos_token_id], ids(r["rejected"]) + [tok.eos_token_id]) for r in rows]

    def collate(idx):  # rows [0, B) chosen, [B, 2B) rejected, right-padded to the longest
        seqs = [(data[i][0], data[i][1]) for i in idx] + [(data[i][0], data[i][2]) for i in idx]
        T = max(len(p) + len(r) for p, r in seqs)
        ids, mask, resp = (torch.zeros(len(seqs), T, dtype=torch.long) for _ in range(3))
        for i, (p, r) in enumerate(seqs):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
            resp[i, len(p) : len(p) + len(r)] = 1
        return ids, mask, resp

    def logps(model, ids, mask, resp):  # Σ log π(y_t | …) over response tokens
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        return (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * resp[:, 1:]).sum(-1)

    reference, ref_cache = None, {}
    if spec["precompute"]:  # the policy *is* the reference before its first step: no second model needed
        with torch.no_grad():
            for j, idx in enumerate(spec["order"]):
                ref_cache[j] = logps(policy, *collate(idx))
    else:
        reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    result = {"loss": [], "dt": [], "logps_chosen": [], "logps_rejected": []}
    for j, idx in enumerate(spec["order"]):
        t0 = time.perf_counter()
        ids, mask, resp = collate(idx)
        pol = logps(policy, ids, mask, resp)
        if reference is None:
            ref = ref_cache[j]
        else:
            with torch.no_grad():
                ref = logps(reference, ids, mask, resp)
        B = len(idx)
        margin = (pol[:B] - ref[:B]) - (pol[B:] - ref[B:])
        loss = -F.logsigmoid(BETA * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["loss"].append(loss.item())
        result["dt"].append(time.perf_counter() - t0)
        result["logps_chosen"].append(pol[:B].mean().item())
        result["logps_rejected"].append(pol[B:].mean().item())
    policy.save_pretrained(spec["out"])
    return result


def child_gemm(spec: dict) -> dict:
    """The machine's fp32 matmul FLOP/s with the benchmark's thread count: the ceiling MFU is measured against.
    GEMM_SAMPLES samples of GEMM_REPS 2048² matmuls each; main() reports their median and max over all samples."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    samples = []
    for _ in range(GEMM_SAMPLES):
        t0 = time.perf_counter()
        for _ in range(GEMM_REPS):
            a @ b
        samples.append(2 * n**3 * GEMM_REPS / (time.perf_counter() - t0))
    return {"samples": samples}


def child_imports(spec: dict) -> dict:
    """Only the imports of one implementation: its peak RSS is the floor under that implementation's peak."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (every implementation's loaders)

    if spec["which"] == "ours":  # betadpo.py and what it imports on the way to its first step
        sys.path.insert(0, str(REPO))
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
        import simple_parsing  # noqa: F401
        import tqdm.auto  # noqa: F401

        import betadpo  # noqa: F401
    elif spec["which"] == "trl":
        import datasets  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401
    return {}


CHILDREN = {"trl": child_trl, "naive": child_naive, "gemm": child_gemm, "imports": child_imports}


def run_child(kind: str, spec: dict, workdir: Path, tag: str) -> dict:
    spec_file, result_file = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_file.write_text(json.dumps({**spec, "result": str(result_file)}))
    result_file.unlink(missing_ok=True)
    proc = launch([sys.executable, str(Path(__file__).resolve()), "_child", kind, str(spec_file)], workdir / f"{tag}.log", spec["threads"])
    if proc["rc"] == 0:
        proc.update(json.loads(result_file.read_text()))
    return proc


def failure_reason(log: Path) -> str:
    """One line saying why a run failed, for the table cell."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return f"failed ({lines[-1][:80] if lines else 'no output'}; see {log})"


# ========================================================================================================
# 3. FLOPs (counted and executed) and the summary of one run
# ========================================================================================================
def step_shape(step_ids: list[tuple], pack_layout, row_width: int) -> dict:
    """One step's batch as each implementation lays it out: 2B sequences (chosen rows, then rejected) padded to
    the longest, T; ours without prefix sharing packs them into `packed_rows` rows of `packed_width` ≤ row_width·T,
    and ours (prefix sharing, the default) packs B sequences prompt + chosen + rejected into `shared_rows` rows of
    `shared_width`, exactly as plumbing.fast_logps.pack_plan does (pack_layout, PACK_ROW_WIDTH, pair_sequences)."""
    lengths = [len(p) + len(c) for p, c, _ in step_ids] + [len(p) + len(r) for p, _, r in step_ids]
    shared = [len(p) + len(c) + len(r) for p, c, r in step_ids]  # each prompt once
    T = max(lengths)
    place, shared_place = pack_layout(lengths, row_width * T), pack_layout(shared, row_width * T)
    return {"lengths": lengths, "T": T, "rows": len(lengths), "packed_rows": 1 + max(r for r, _ in place),
            "packed_width": max(o + L for (_, o), L in zip(place, lengths)), "shared_lengths": shared,
            "shared_rows": 1 + max(r for r, _ in shared_place),
            "shared_width": max(o + L for (_, o), L in zip(shared_place, shared)),
            "response": sum(len(c) + len(r) for _, c, r in step_ids),  # positions predicting a response token (EOS incl.)
            "prompt": sum(len(p) - 1 for p, _, _ in step_ids)}  # chosen rows' prompt tokens after the first


def fwd_flops(t: int, meta: dict) -> float:
    """Counted (PaLM convention): one forward pass over t real tokens, matmuls (2 FLOPs per weight per token, the LM
    head included) + attention scores and mixing (QKᵀ and AV, 2·t²·d each per layer)."""
    return 2 * meta["matmul_params"] * t + 4 * meta["layers"] * meta["hidden"] * t * t


def counted_step_flops(shape: dict, meta: dict, live_ref: bool) -> float:
    """Model FLOPs of a step: forward + backward = 3 forwards for the policy, 1 forward for a live reference."""
    return sum((3 + live_ref) * fwd_flops(t, meta) for t in shape["lengths"])


def executed_step_flops(impl: str, shape: dict, meta: dict, live_ref: bool, ppl: bool = False) -> float:
    """What an implementation's matmuls actually run in a step, padding and LM-head rows included:
    - the model body over every position it is given: rows × width (attention over width² per row: padded
      rows of T, or our packed rows, each pair's prompt once with prefix sharing (ours, ours_logits; not
      ours_unshared), whose attention mask keeps sequences apart but is not skipped);
    - the LM head (V·d weights) over the positions it scores: ours and TRL's fast path the response
      positions only (+ the chosen prompts for ours with ppl_scale); stock TRL and naive every position.
    Backward = 2× forward for each, except the LM heads that recompute their logits in backward: ours (fused
    head, plumbing/fused_head.py) and both TRL columns (TRL's chunked LM head), 3× forward for the policy's LM
    head (ours_logits keeps the softmax instead). Elementwise work (log-softmax, entropy, …) is not counted."""
    d, L, head = meta["hidden"], meta["layers"], meta["vocab"] * meta["hidden"]
    rows, width = ((shape["packed_rows"], shape["packed_width"]) if impl == "ours_unshared" else
                   (shape["shared_rows"], shape["shared_width"]) if impl.startswith("ours") else (shape["rows"], shape["T"]))
    body = rows * width * 2 * (meta["matmul_params"] - head) + rows * 4 * L * d * width**2
    scored = shape["response"] if impl in ("ours", "ours_unshared", "ours_logits", "trlfast") else shape["rows"] * shape["T"]
    head_passes = 4 if impl in ("ours", "ours_unshared", "trl", "trlfast") else 3  # forward + (recompute) + the two gradient matmuls
    policy = 3 * body + head_passes * 2 * head * (scored + (shape["prompt"] if ppl else 0))
    return policy + (body + 2 * head * scored if live_ref else 0)


def summarize_run(run: dict, bench: dict, meta: dict, impl: str, live_ref: bool, ppl: bool) -> dict:
    """Per-run numbers over the measured steps (after the warm-up ones)."""
    w = warmup_steps(bench["steps"])
    dts = run["dt"][w:]
    shapes = bench["shapes"][w:]
    total = sum(dts)
    return {
        "step_s": statistics.median(dts),
        "pairs_s": bench["batch_size"] * len(dts) / total,
        "tokens_s": sum(sum(s["lengths"]) for s in shapes) / total,
        "gflops_s": sum(counted_step_flops(s, meta, live_ref) for s in shapes) / total / 1e9,
        "exec_gflops_s": sum(executed_step_flops(impl, s, meta, live_ref, ppl) for s in shapes) / total / 1e9,
        "rss_mib": run["rss_mib"],
        "wall_s": run["wall"],
        "cpu_s": run["cpu_s"],
    }


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def worst_diff(xs: list[dict], ys: list[dict], keys: tuple, k: int, relative: bool) -> float:
    """max over every pair of runs, every key and the first k steps of |x − y| (÷ |y| if relative)."""
    return max(abs(a - b) / (abs(b) if relative else 1.0)
               for x in xs for y in ys for key in keys for a, b in zip(x[key][:k], y[key][:k]))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (Student t quantiles for n ≤ 11, else 2.0)."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, float("nan")
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 11: 2.23}.get(n, 2.0)
    return m, t * statistics.stdev(values) / n**0.5


def git_commit() -> str:
    """The commit the benchmarked code is at (+ "-dirty" with uncommitted changes to tracked files)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """The CPU, its cores, and torch's CPU kernel set (the children inherit ATEN_CPU_CAPABILITY from this process)."""
    import torch

    return f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor() or "unknown")


def gemm_peak(threads: int, workdir: Path, tag: str) -> list[float]:
    """FLOP/s samples of the fp32 2048² matmul in a fresh process (child_gemm)."""
    run = run_child("gemm", {"threads": threads}, workdir, tag)
    if run["rc"] != 0:
        raise SystemExit(f"benchmark: the GEMM probe failed: {failure_reason(workdir / f'{tag}.log')}")
    return run["samples"]


def import_floors(threads: int, workdir: Path) -> dict:
    """Peak RSS (MiB) of a process that only imports each implementation's modules."""
    floors = {}
    for which in ("ours", "trl", "naive"):
        run = run_child("imports", {"threads": threads, "which": which}, workdir, f"imports-{which}")
        floors[which] = run["rss_mib"] if run["rc"] == 0 else float("nan")
    return floors


# ========================================================================================================
# 4. MAIN: assets → alternating rounds → tables
# ========================================================================================================
IMPLS = ("ours", "ours_unshared", "ours_logits", "trl", "trlfast", "naive")
LABELS = {"ours": "ours", "ours_unshared": "ours (no prefix sharing)", "ours_logits": "ours (logits kernel)", "trl": "TRL",
          "trlfast": "TRL (fast path)", "naive": "naive"}
UNSHARED_FLAGS = ["--train.prefix_sharing", "false"]  # ours_unshared: each pair's prompt in both of its rows
BETADPO_FLAGS = ["--loss.alpha", "0.6", "--loss.filter_ratio", "0.2"]
SCALE_FLAGS = BETADPO_FLAGS + ["--loss.learn_scale", "true", "--loss.ppl_scale", "true"]


def run_variant(name: str, impl: str, live: bool, extra: list, bench: dict, workdir: Path, tag: str, threads: int) -> dict:
    """One measured run of one implementation → its numbers (rc ≠ 0 on failure)."""
    out = workdir / "out" / tag
    shutil.rmtree(out, ignore_errors=True)  # a fresh output dir: our loop would otherwise resume
    if impl.startswith("ours"):
        extra = [*(extra or []), *(UNSHARED_FLAGS if impl == "ours_unshared" else [])]
        run = launch(ours_command(bench, out, not live, extra, fused=impl != "ours_logits"), workdir / f"{tag}.log", threads)
        if run["rc"] == 0:
            run.update(read_ours(out))
            shutil.copy(out / "metrics.jsonl", workdir / f"{tag}.metrics.jsonl")
    else:
        spec = {**bench, "precompute": not live, "out": str(out), "fast": impl == "trlfast"}
        run = run_child("naive" if impl == "naive" else "trl", spec, workdir, tag)
    shutil.rmtree(out, ignore_errors=True)  # our checkpoint and final/ take ~16 bytes per parameter
    return run


def prepare(a, workdir: Path, preset: Preset, steps: int, B: int) -> tuple[dict, dict, str]:
    """Model dir, data files, our tokenization, per-step shapes → (bench spec for the runs, model meta, description)."""
    sys.path.insert(0, str(REPO))
    from plumbing.data import micro_batch_indices, tokenize_pairs
    from plumbing.fast_logps import PACK_ROW_WIDTH, pack_layout
    from plumbing.models import load_tokenizer

    if a.model and a.data:
        meta = build_real_model_dir(a.model, workdir / "model")
        tokenizer = load_tokenizer(str(workdir / "model"))
        rows, stats = real_pairs(Path(a.data).resolve(), tokenizer, (steps + 1) * B, a.max_length)
        pairs, eval_pairs = rows[: steps * B], rows[steps * B :]
        max_length, max_prompt = a.max_length, a.max_length - 1  # every pair fits (real_pairs): nothing is cut
        meta = {**meta, "data": f"the first {(steps + 1) * B} pairs of `{Path(a.data).name}` (SHA-256 {stats['sha256'][:12]}…) "
                                f"within max_length {a.max_length}, raw HH text (no chat template); over all its "
                                f"{stats['pairs']} pairs: prompts {stats['prompt']:.0f}, chosen {stats['chosen']:.0f}, "
                                f"rejected {stats['rejected']:.0f} tokens on average, {stats['too_long']} longer than "
                                f"{a.max_length}"}
    elif a.model:
        meta = build_real_model_dir(a.model, workdir / "model")
        tokenizer = load_tokenizer(str(workdir / "model"))
        pairs, eval_pairs = make_hh_pairs(steps * B, seed=1), make_hh_pairs(B, seed=2)
        whole = tokenize_pairs(tokenizer, pairs + eval_pairs, 10**6, 10**6 - 1)
        max_prompt = max(len(p) for p, _, _ in whole)
        max_length = max(len(p) + max(len(c), len(r)) for p, c, r in whole)
        meta = {**meta, "data": "HH-format dialogues (1–3 turns) of English sentences in its tokenizer, raw text (no chat template)"}
    else:
        meta = build_model_dir(preset, workdir / "model")
        tokenizer = load_tokenizer(str(workdir / "model"))
        pairs, eval_pairs = make_pairs(steps * B, preset, seed=1), make_pairs(B, preset, seed=2)  # one epoch of `steps` batches
        max_prompt = preset.prompt_tokens[1]
        max_length = max_prompt + preset.response_tokens[1] + 1
        meta = {**meta, "data": f"Zipf-distributed words, prompts {preset.prompt_tokens[0]}–{preset.prompt_tokens[1]} tokens, "
                                f"responses {preset.response_tokens[0]}–{preset.response_tokens[1]} + EOS"}
    train_file, eval_file, trl_train_file = workdir / "train.jsonl", workdir / "eval.jsonl", workdir / "train_in_our_order.jsonl"
    write_jsonl(train_file, pairs)
    write_jsonl(eval_file, eval_pairs)
    # The pairs of each step, from betadpo.py itself: micro_batch_indices(step, pairs, batch, batches per epoch, seed).
    order = [micro_batch_indices(j, len(pairs), B, steps, SEED) for j in range(steps)]
    in_order = [pairs[i] for idx in order for i in idx]
    write_jsonl(trl_train_file, in_order)
    # Our tokenization of the pairs, in step order: the token counts of every step (the same for all, same
    # batches), and the ids TRL's must equal. The limits are above every pair: nothing is truncated.
    ours_ids = tokenize_pairs(tokenizer, in_order, max_length, max_prompt)  # [(prompt, chosen + EOS, rejected + EOS)]
    if ours_ids != tokenize_pairs(tokenizer, in_order, 10**6, 10**6 - 1):
        raise SystemExit(f"benchmark: a pair is longer than max_length {max_length} / max_prompt_length {max_prompt}")
    shapes = [step_shape(ours_ids[j * B : (j + 1) * B], pack_layout, PACK_ROW_WIDTH) for j in range(steps)]
    bench = {"model_dir": str(workdir / "model"), "train_file": str(train_file), "eval_file": str(eval_file),
             "trl_train_file": str(trl_train_file), "batch_size": B, "steps": steps, "threads": a.threads,
             "max_length": max_length, "max_prompt_length": max_prompt, "order": order, "shapes": shapes,
             "expected_ids": [[list(p), list(c), list(r)] for p, c, r in ours_ids]}
    tokens = sum(sum(s["lengths"]) for s in shapes)
    shared = sum(sum(s["shared_lengths"]) for s in shapes)
    positions = sum(s["rows"] * s["T"] for s in shapes)
    packed = sum(s["packed_rows"] * s["packed_width"] for s in shapes)
    shared_packed = sum(s["shared_rows"] * s["shared_width"] for s in shapes)
    n = steps * B
    what = (f"Model: {meta['name']}, {meta['params'] / 1e6:.1f}M parameters (hidden {meta['hidden']}, {meta['layers']} layers, "
            f"vocab {meta['vocab']}), fp32. Data: {meta['data']}; {steps} steps × {B} pairs, {tokens / n:.0f} "
            f"non-padding tokens per pair ({shared / n:.0f} with the prompt once); padded batches are "
            f"{100 * (1 - tokens / positions):.0f}% padding, our packed ones {100 * (1 - tokens / packed):.0f}%, our "
            f"prefix-shared ones {100 * (1 - shared / shared_packed):.0f}%. Tokens through the model body per pair "
            f"(positions, padding included): padded (TRL, naive) {positions / n:.0f}, ours without prefix sharing "
            f"{packed / n:.0f}, ours {shared_packed / n:.0f} ({packed / shared_packed:.2f}× fewer).")
    return bench, meta, what


def speed(a, preset: Preset):
    """The main benchmark: every implementation, live and precomputed reference, alternating rounds → tables."""
    steps, repeats, B = a.steps or preset.steps, a.repeats or preset.repeats, a.batch_size or preset.batch_size
    if steps - warmup_steps(steps) < 2 or repeats < 1 or B < 1 or a.threads < 1:
        raise SystemExit("benchmark: --steps must leave ≥ 2 timed steps (≥ 3), --repeats, --batch-size and --threads ≥ 1")
    impls = [i for i in IMPLS if i in a.columns.split(",")]
    if a.data and not a.model:
        raise SystemExit("benchmark: --data needs --model (its tokenizer and shapes)")
    settings = [s for s in ("live", "pre") if s in a.settings.split(",")]
    if not impls or not settings or not set(a.columns.split(",")) <= set(IMPLS):
        raise SystemExit(f"benchmark: --columns takes some of {','.join(IMPLS)}, --settings some of live,pre")
    started = time.perf_counter()
    load_before = os.getloadavg()
    workdir = (REPO / a.workdir / preset.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    trl_version, trl_missing = trl_status()
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f}: other processes use the CPUs, the timings will be noisy", flush=True)
    print(f"[setup] model, tokenizer and data in {workdir}", flush=True)
    bench, meta, what = prepare(a, workdir, preset, steps, B)
    peaks = gemm_peak(a.threads, workdir, "gemm-before")
    print(f"[setup] GEMM {statistics.median(peaks) / 1e9:.1f} GFLOP/s median, {max(peaks) / 1e9:.1f} max; {what}", flush=True)
    floors = import_floors(a.threads, workdir)

    # (name, implementation, reference live?, our extra flags)
    variants = [(f"{impl}/{setting}", impl, setting == "live", []) for setting in settings for impl in impls]
    if not a.model and "ours" in impls and "live" in settings:  # the A/B of the β-DPO machinery: small model, where rounds are cheap
        variants += [("ours/betadpo", "ours", True, BETADPO_FLAGS), ("ours/betadpo+scale", "ours", True, SCALE_FLAGS)]
    results = {name: [] for name, *_ in variants}  # successful runs, in round order
    errors = {}  # name → why it has no numbers
    bad = []  # exactness failures: the benchmark exits 1 after printing the tables
    if trl_missing:
        errors.update({f"{i}/{s}": trl_missing for i in ("trl", "trlfast") for s in ("live", "pre")})
    for r in range(repeats):
        shift = r % len(variants)  # rotate the order every round so no variant always runs first or last
        for name, impl, live, extra in variants[shift:] + variants[:shift]:
            if name in errors:
                continue
            tag = f"r{r}-{name.replace('/', '-')}"
            run = run_variant(name, impl, live, extra, bench, workdir, tag, a.threads)
            if run["rc"] != 0:
                errors[name] = failure_reason(workdir / f"{tag}.log")
                print(f"[round {r + 1}/{repeats}] {name:<19} {errors[name]}", flush=True)
                continue
            if "ids" in run and run.pop("ids") != bench["expected_ids"]:
                bad.append(f"{name}: TRL's token ids differ from ours (see {workdir / f'{tag}.result.json'})")
            run["summary"] = summarize_run(run, bench, meta, impl, live, extra == SCALE_FLAGS)
            run["round"] = r
            results[name].append(run)
            s = run["summary"]
            print(f"[round {r + 1}/{repeats}] {name:<19} {s['step_s']:.3f} s/step  {s['tokens_s']:7.0f} tok/s  "
                  f"RSS {s['rss_mib']:6.0f} MiB  wall {s['wall_s']:5.1f} s  loss {run['loss'][-1]:.5f}", flush=True)
    peaks_after = gemm_peak(a.threads, workdir, "gemm-after")
    peak = max(peaks + peaks_after)

    # ---- exactness: the same math on the same ids, so the same numbers -----------------------------------
    K = min(LOSS_STEPS, steps)
    agreement = {}  # setting → {"x−y": (max |Δloss|, max relative |Δ log-prob|)} over the first K steps, all rounds
    for setting in settings:
        runs = {impl: results[f"{impl}/{setting}"] for impl in impls if results[f"{impl}/{setting}"]}
        for x, y in (("ours", "trl"), ("trlfast", "trl"), ("naive", "trl"), ("ours", "naive"), ("ours", "ours_logits"),
                     ("ours", "trlfast"), ("ours", "ours_unshared"), ("ours_unshared", "trlfast")):
            if x in runs and y in runs:
                loss = worst_diff(runs[x], runs[y], ("loss",), K, relative=False)
                logp = worst_diff(runs[x], runs[y], ("logps_chosen", "logps_rejected"), K, relative=True)
                agreement.setdefault(setting, {})[f"{x}−{y}"] = (loss, logp)
                if loss > LOSS_TOLERANCE or logp > LOGP_TOLERANCE:
                    bad.append(f"{setting}: {x}−{y} |Δloss| {loss:.1e}, relative |Δlog-prob| {logp:.1e}")
    for run in results["ours/live"][:1]:  # cross-check of the token count: our metrics count them themselves
        ours_tokens, expected = sum(run["tokens"]), sum(sum(s["lengths"]) for s in bench["shapes"])
        if abs(ours_tokens - expected) > 1e-3 * expected:
            print(f"warning: our metrics count {ours_tokens:.0f} tokens, the benchmark {expected}", flush=True)

    # ---- tables -----------------------------------------------------------------------------------------
    med = {name: median_of([run["summary"] for run in runs]) for name, runs in results.items() if runs}
    for name, m in med.items():
        m["mfu"] = 100 * m["gflops_s"] * 1e9 / peak
        m["exec_util"] = 100 * m["exec_gflops_s"] * 1e9 / peak
        impl = name.split("/")[0]
        m["rss_above_imports"] = m["rss_mib"] - floors.get("trl" if impl.startswith("trl") else impl.split("_")[0], float("nan"))

    def cell(name, key, fmt):
        return fmt.format(med[name][key]) if name in med else errors.get(name, "n/a")

    def ratio(x, y, key):
        return f"{med[x][key] / med[y][key]:.2f}" if x in med and y in med else "n/a"

    rows = [("time per step (s)", "step_s", "{:.3f}"), ("pairs/s", "pairs_s", "{:.2f}"), ("tokens/s", "tokens_s", "{:.0f}"),
            ("peak RSS (MiB)", "rss_mib", "{:.0f}"), ("peak RSS above its imports (MiB)", "rss_above_imports", "{:.0f}"),
            ("counted model GFLOP/s", "gflops_s", "{:.1f}"), ("MFU (% of max GEMM)", "mfu", "{:.1f}"),
            ("executed GFLOP/s", "exec_gflops_s", "{:.1f}"), ("executed FLOP utilisation (%)", "exec_util", "{:.1f}"),
            ("process wall (s)", "wall_s", "{:.1f}"), ("process CPU time (s)", "cpu_s", "{:.1f}")]
    elapsed = time.perf_counter() - started
    print("\n## β-DPO loop vs. TRL DPOTrainer (stock and fast path) vs. naive PyTorch DPO\n")
    print(f"`python {' '.join(sys.argv)}` (commit {git_commit()})  \n"
          f"CPU: {cpu_name()}, {os.cpu_count()} cores, {a.threads} threads per run, torch's CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, TRL {trl_version or 'not installed'}, Python {platform.python_version()}  \n{what}  \n"
          f"Medians of {repeats} alternating rounds; the first {warmup_steps(steps)} step(s) of each run are not timed. "
          f"GEMM (fp32 2048² matmul, {GEMM_SAMPLES} samples before and after): before median {statistics.median(peaks) / 1e9:.1f} / max "
          f"{max(peaks) / 1e9:.1f}, after {statistics.median(peaks_after) / 1e9:.1f} / {max(peaks_after) / 1e9:.1f} GFLOP/s; "
          f"MFU is against the max, {peak / 1e9:.1f}. Imports alone: ours {floors['ours']:.0f}, TRL {floors['trl']:.0f}, "
          f"naive {floors['naive']:.0f} MiB. Load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"total {elapsed / 60:.1f} min.\n")
    titles = {"live": "reference model live (a forward pass per step)",
              "pre": "reference log-probs precomputed (ours: `--train.precompute_ref true`; TRL: `precompute_ref_log_probs=True`)"}
    for setting in settings:
        names = {impl: f"{impl}/{setting}" for impl in IMPLS}
        trls = [names[i] for i in ("trl", "trlfast") if names[i] in med]
        best = max(trls, key=lambda n: med[n]["pairs_s"]) if trls else names["trlfast"]
        ratios = [(x, y) for x, y in (("ours", best), ("ours", names["ours_unshared"]), ("ours_unshared", best),
                                      ("ours", names["ours_logits"]), ("naive", best)) if x in impls and y.split("/")[0] in impls]
        print(f"### {titles[setting]}\n")
        print("| | " + " | ".join(LABELS[i] for i in impls) + " | " + " | ".join(
            f"{LABELS[x]} / {LABELS[y.split('/')[0]]}" for x, y in ratios) + " |\n" + "|---" * (1 + len(impls) + len(ratios)) + "|")
        for label, key, fmt in rows:
            print(f"| {label} | " + " | ".join(cell(names[i], key, fmt) for i in impls)
                  + " | " + " | ".join(ratio(names[x], y, key) for x, y in ratios) + " |")
        diffs = agreement.get(setting, {})
        print(f"\nAgreement over the first {K} steps (tolerances {LOSS_TOLERANCE:g} absolute for the loss, {LOGP_TOLERANCE:g} "
              "relative for the policy's log-probs): "
              + ("; ".join(f"{k} |Δloss| {loss:.1e}, |Δlog-prob| {logp:.1e} "
                           f"{'ok' if loss <= LOSS_TOLERANCE and logp <= LOGP_TOLERANCE else 'MISMATCH'}"
                           for k, (loss, logp) in diffs.items()) or "n/a") + ".\n")
    if results.get("ours/betadpo"):
        machinery_table(results, B)
    if bad:
        print("\nNOT THE SAME WORK:\n" + "\n".join(f"- {b}" for b in bad))
        sys.exit(1)


def machinery_table(results: dict, B: int):
    """The A/B: in each round, each β-DPO variant's median step time over plain DPO's in the same round."""
    print("### Cost of the β-DPO machinery in our loop (reference live): a paired A/B over rounds\n")
    print("| our loop | median step (s) | step time / plain DPO's, same round: mean ± 95% CI | range over rounds | rounds | pairs kept per step |\n"
          "|---|---|---|---|---|---|")
    plain = {run["round"]: run["summary"]["step_s"] for run in results["ours/live"]}
    for name, label in (("ours/live", "plain DPO (`--loss.alpha 0 --loss.filter_ratio 0`)"),
                        ("ours/betadpo", "β-DPO (`--loss.alpha 0.6 --loss.filter_ratio 0.2`)"),
                        ("ours/betadpo+scale", "β-DPO + `--loss.learn_scale true --loss.ppl_scale true`")):
        runs = results.get(name) or []
        ratios = [run["summary"]["step_s"] / plain[run["round"]] for run in runs if run["round"] in plain]
        if not ratios:
            continue
        m, half = mean_ci95(ratios)
        kept = statistics.median(k for run in runs for k in run["kept"])
        print(f"| {label} | {statistics.median(run['summary']['step_s'] for run in runs):.3f} | {m:.3f} ± {half:.3f} | "
              f"{min(ratios):.3f}–{max(ratios):.3f} | {len(ratios)} | {kept:.0f} of {B} |")
    print("\nWith filtering, fewer pairs contribute gradient, but every pair still goes through the same forward and "
          "backward pass, so the ratio is the machinery's own cost. With `ppl_scale` the policy's LM head also runs on "
          "the chosen prompts (the perplexity of β(x)): that extra work is part of its ratio.\n")


def machinery_ab(a, preset: Preset):
    """--ab N: the cost of the β-DPO machinery, as N back-to-back pairs of runs, plain DPO then β-DPO and β-DPO then
    plain DPO in turn (ABBA: a machine whose speed drifts adds the same to both). Each pair gives one ratio of
    median step times; → their mean with a 95% t interval, n = N."""
    steps, B = a.steps or preset.steps, a.batch_size or preset.batch_size
    workdir = (REPO / a.workdir / preset.name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    bench, meta, what = prepare(a, workdir, preset, steps, B)
    arms = {"plain": ("ours/live", []), "betadpo": ("ours/betadpo", BETADPO_FLAGS)}
    ratios, steps_s = [], {"plain": [], "betadpo": []}
    for r in range(a.ab):
        order = ("plain", "betadpo") if r % 2 == 0 else ("betadpo", "plain")
        pair = {}
        for arm in order:
            name, extra = arms[arm]
            tag = f"ab{r}-{arm}"
            run = run_variant(name, "ours", True, extra, bench, workdir, tag, a.threads)
            if run["rc"] != 0:
                raise SystemExit(f"benchmark: {name} failed: {failure_reason(workdir / f'{tag}.log')}")
            pair[arm] = summarize_run(run, bench, meta, "ours", True, False)["step_s"]
            steps_s[arm].append(pair[arm])
        ratios.append(pair["betadpo"] / pair["plain"])
        print(f"[pair {r + 1}/{a.ab}] plain {pair['plain']:.3f} s/step, β-DPO {pair['betadpo']:.3f} s/step, ratio {ratios[-1]:.3f}", flush=True)
    m, half = mean_ci95(ratios)
    print(f"\n### β-DPO machinery vs plain DPO: {a.ab} back-to-back pairs of runs (ABBA)\n\n`python {' '.join(sys.argv)}`  \n{what}\n")
    print("| | plain DPO | β-DPO (a = 0.6, ρ = 0.2) |\n|---|---|---|")
    print(f"| median step time over runs (s) | {statistics.median(steps_s['plain']):.3f} | {statistics.median(steps_s['betadpo']):.3f} |")
    print(f"\nStep-time ratio β-DPO / plain DPO: mean {m:.3f} ± {half:.3f} (95% t interval, n = {len(ratios)} pairs), "
          f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}–{max(ratios):.3f}.")
    alone = machinery_alone(B, a.threads)
    step = statistics.median(steps_s["plain"])
    d, d_half = alone["extra_s"]
    print(f"\nThe machinery alone (`machinery_alone`, {alone['n']} alternating calls per arm, one process): `betadpo_loss` "
          f"+ its backward + the step's host sync of the summary, on {B} pairs: plain DPO {alone['plain_s'] * 1e6:.0f} µs, "
          f"β-DPO {alone['betadpo_s'] * 1e6:.0f} µs (medians); β-DPO's extra {d * 1e6:.0f} ± {d_half * 1e6:.0f} µs per step "
          f"(mean of paired differences, 95% t interval) = {100 * d / step:.4f}% ± {100 * d_half / step:.4f}% of plain "
          f"DPO's median step ({step:.3f} s).")


def machinery_alone(B: int, threads: int, n: int = 2000) -> dict:
    """The β-DPO machinery by itself, timed in this process: `betadpo_loss` (margins, moving averages, filter,
    β, loss, logged summary), the backward of its loss into the (B,) log-probs, and the loop's one host sync of
    the summary, with plain DPO's config and with β-DPO's, alternating, n times each. The model's forward and
    backward are the same operations on the same shapes in both arms, so the difference of the two is all that
    β-DPO adds to a step. → medians (s) and the mean paired difference with its 95% t interval."""
    import torch

    sys.path.insert(0, str(REPO))
    from betadpo import BetaDPOState, LossArgs, PairLogps, betadpo_loss, process_share

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    cfgs = {"plain": LossArgs(alpha=0.0, filter_ratio=0.0), "betadpo": LossArgs(alpha=0.6, filter_ratio=0.2)}
    states = {arm: BetaDPOState(cfg, 0, "cpu") for arm, cfg in cfgs.items()}

    def one_call(arm: str) -> float:
        base = {k: -100 + 5 * torch.randn(B, generator=g) for k in keys}  # summed log-probs of responses, (B,)
        logps = PairLogps(**{k: v.requires_grad_(k.startswith("policy")) for k, v in base.items()},
                          **{f"{k}_avg": base[k].detach() / 50 for k in keys}, tokens=torch.full((B,), 240.0))
        t0 = time.perf_counter()
        losses, kept, summary = betadpo_loss(logps, states[arm], cfgs[arm], True)
        process_share(losses, kept, 0, 1).backward()
        torch.stack([v.float() for v in summary.values()]).tolist()
        return time.perf_counter() - t0

    for arm in (*cfgs, *cfgs):  # warm-up
        one_call(arm)
    times = {arm: [] for arm in cfgs}
    for r in range(n):
        for arm in (("plain", "betadpo") if r % 2 == 0 else ("betadpo", "plain")):
            times[arm].append(one_call(arm))
    return {"n": n, "plain_s": statistics.median(times["plain"]), "betadpo_s": statistics.median(times["betadpo"]),
            "extra_s": mean_ci95([b - p for b, p in zip(times["betadpo"], times["plain"])])}


MEMORY_IMPLS = ("ours", "ours_logits", "trlfast")


def memory_scaling(a):
    """Peak memory of ours (fused LM head), ours (logits kernel) and TRL (fast path) at a fixed number of tokens per
    step, over sequence length and vocabulary (the three alternate within each cell)."""
    lengths, vocabs, tokens = [int(x) for x in a.memory_lengths.split(",")], [int(x) for x in a.memory_vocabs.split(",")], a.memory_tokens
    workdir = (REPO / a.workdir / "memory").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    trl_version, trl_missing = trl_status()
    print(f"command: python {' '.join(sys.argv)}", flush=True)
    floors = import_floors(a.threads, workdir)
    table, params = {}, {}
    for vocab in vocabs:
        for T in lengths:
            prompt = T // 4
            preset = dataclasses.replace(DEFAULT, name=f"v{vocab}", vocab=vocab, prompt_tokens=(prompt, prompt),
                                         response_tokens=(T - prompt - 1,) * 2)  # every sequence exactly T tokens
            B = max(1, tokens // (2 * T))
            sub = workdir / f"v{vocab}"
            sub.mkdir(exist_ok=True)
            bench, meta, _ = prepare(argparse.Namespace(**{**vars(a), "model": ""}), sub, preset, 2, B)
            params[vocab] = meta["params"]
            for impl in MEMORY_IMPLS:
                if impl == "trlfast" and trl_missing:
                    table[vocab, T, impl] = float("nan")
                    continue
                tag = f"T{T}-{impl}"
                run = run_variant(impl, impl, True, [], bench, sub, tag, a.threads)
                table[vocab, T, impl] = run["rss_mib"] - floors["trl" if impl == "trlfast" else "ours"] if run["rc"] == 0 else float("nan")
                print(f"[memory] vocab {vocab:6d}  T {T:3d}  {B:2d} pairs  {LABELS[impl]:<20} "
                      f"{'failed: ' + failure_reason(sub / f'{tag}.log') if run['rc'] else f'{table[vocab, T, impl]:6.0f} MiB above imports'}", flush=True)
    print(f"\n### Peak memory of a training step above the imports (MiB): {tokens} tokens per step, Llama hidden "
          f"{DEFAULT.hidden} × {DEFAULT.layers} layers, fp32, AdamW, live reference, 2 steps\n")
    print(f"`python {' '.join(sys.argv)}` (commit {git_commit()}); {machine()}; TRL {trl_version or 'not installed'}; "
          f"imports alone: ours {floors['ours']:.0f}, TRL {floors['trl']:.0f} MiB. Ours: the fused LM head (train.logps fused, "
          f"the default); ours (logits kernel): the LM head's logits, then token_logps. Model state: policy, its gradient, "
          f"AdamW's two moments and the live reference, 5 × 4 B per parameter, which every column holds. A full fp32 "
          f"log-softmax of one step would be {tokens} × V × 4 B (last column).\n")
    print("| vocab | tokens per sequence (pairs per step) | ours | ours (logits kernel) | TRL (fast path) | ours / TRL | "
          "logits kernel / TRL | model state | full fp32 log-softmax |\n|---|---|---|---|---|---|---|---|---|")
    for vocab in vocabs:
        for T in lengths:
            o, k, t = (table[vocab, T, impl] for impl in MEMORY_IMPLS)
            print(f"| {vocab} | {T} ({max(1, tokens // (2 * T))}) | {o:.0f} | {k:.0f} | {t:.0f} | {o / t:.2f} | {k / t:.2f} | "
                  f"{5 * 4 * params[vocab] / 2**20:.0f} | {tokens * vocab * 4 / 2**20:.0f} |")


def profile_step(a, preset: Preset):
    """--profile: where one of our training steps spends its time. One β-DPO step (a = 0.6, ρ = 0.2, live reference,
    fused AdamW) built from betadpo.py's own functions on the first --batch-size pairs, after one warm-up step,
    under torch.profiler, with the fused LM head and then with the logits kernel (train.logps fused, then fast), --repeats
    times in turn (default once); → the
    operators by self time, grouped (matmuls, attention, the log-prob kernels, ...), side by side, then each
    one's top operators."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(a.threads)
    B = a.batch_size or preset.batch_size
    workdir = (REPO / a.workdir / f"{preset.name}-profile").resolve()  # apart from a speed run's files
    workdir.mkdir(parents=True, exist_ok=True)
    bench, meta, what = prepare(a, workdir, preset, 2, B)
    from betadpo import BetaDPOState, LossArgs, betadpo_loss, pair_logps, process_share
    from plumbing.data import collate_pairs
    from plumbing.models import load_model

    policy = load_model(bench["model_dir"]).train()
    reference = load_model(bench["model_dir"]).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0, fused=True)
    cfg = LossArgs(beta=BETA, alpha=0.6, filter_ratio=0.2)
    state = BetaDPOState(cfg, SEED, "cpu")
    batch = collate_pairs([tuple(x) for x in bench["expected_ids"][:B]], 0)  # the first step's pairs

    def step(logps: str):  # one process: its pairs are the whole calibration batch
        losses, kept, _ = betadpo_loss(pair_logps(policy, reference, batch, logps), state, cfg, True)
        process_share(losses, kept, 0, 1).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    groups = {"matmuls (aten::mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
              "attention (scaled_dot_product)": ("aten::_scaled_dot_product",),
              "softmax / log-softmax / exp (the log-prob kernels' elementwise work)": ("aten::_log_softmax", "aten::_softmax", "aten::exp"),
              "optimizer (fused AdamW)": ("aten::_fused_adamw",)}
    kernels = {"fused LM head": ("_FusedLinearLogProb", "_FusedLinearLogProbBackward"),
               "logits kernel": ("_LabelLogProb", "_LabelLogProbBackward")}
    results = {}
    for name, logps in (("fused LM head", "fused"), ("logits kernel", "fast")) * (a.repeats or 1):
        step(logps)  # warm-up, and the allocator's
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(logps)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        if name not in results or wall < results[name][0]:  # the fastest of --repeats (the machine may be shared)
            results[name] = (wall, events)
    print(f"command: python {' '.join(sys.argv)} (commit {git_commit()})\n{machine()}, {a.threads} threads\n{what}\n"
          f"One step of {sum(sum(s['lengths']) for s in bench['shapes'][:1])} tokens, each kernel profiled "
          f"{a.repeats or 1} time(s) in turn after a warm-up step, the fastest shown: fused LM head {results['fused LM head'][0]:.2f} s, logits kernel "
          f"{results['logits kernel'][0]:.2f} s under the profiler.\n")
    print("| share of self CPU time (%) | " + " | ".join(results) + " |\n|---|---|---|")
    shares = {}
    for name, (_, events) in results.items():
        total = sum(e.self_cpu_time_total for e in events)
        shares[name] = {label: 100 * sum(e.self_cpu_time_total for e in events if e.key.startswith(prefixes)) / total
                        for label, prefixes in groups.items()}
        shares[name]["everything else (elementwise, copies, norms, autograd)"] = 100 - sum(shares[name].values())
        inclusive = sum(e.cpu_time_total for e in events if e.key in kernels[name])
        shares[name]["the log-prob kernel, inclusive (forward + backward; fused: LM head included)"] = 100 * inclusive / total
        syncs = [e for e in events if e.key in ("aten::_local_scalar_dense", "aten::nonzero")]
        shares[name]["host syncs (.item(), .tolist(), nonzero), inclusive"] = 100 * sum(e.cpu_time_total for e in syncs) / total
    for label in shares["fused LM head"]:
        print(f"| {label} | " + " | ".join(f"{shares[name][label]:.1f}" for name in results) + " |")
    for name, (_, events) in results.items():
        print(f"\n{name}:\n" + events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=45))


def kernel_ab(a, preset: Preset):
    """--kernel-ab N: the fused LM head against the logits kernel (train.logps fused, fast): step_ab."""
    step_ab(a, preset, a.kernel_ab, "Fused LM head vs logits kernel",
            {"fused LM head": {"logps": "fused"}, "logits kernel": {"logps": "fast"}})


def sharing_ab(a, preset: Preset):
    """--sharing-ab N: prefix sharing on against off (train.prefix_sharing), both through the fused LM head: step_ab."""
    step_ab(a, preset, a.sharing_ab, "Prefix sharing on vs off",
            {"prefix sharing": {"logps": "fused", "prefix_sharing": True},
             "no prefix sharing": {"logps": "fused", "prefix_sharing": False}})


def step_ab(a, preset: Preset, rounds: int, title: str, arms: dict):
    """Two ways of computing the log-probs (arms: label → pair_logps' keyword arguments) in one process, `rounds`
    rounds in ABBA order, on the same model and batch (a training step each: pair_logps of policy and live
    reference, DPO loss, backward, fused AdamW). Each step's wall and CPU time (this process's, all threads); on a
    shared machine the CPU time of a one-thread run (--threads 1) is the steadier measure. → medians and the mean
    paired ratio with its 95% t interval."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    B = a.batch_size or preset.batch_size
    workdir = (REPO / a.workdir / f"{preset.name}-profile").resolve()  # the profile's files: the same model and data
    workdir.mkdir(parents=True, exist_ok=True)
    bench, meta, what = prepare(a, workdir, preset, 2, B)
    from betadpo import pair_logps
    from plumbing.data import collate_pairs
    from plumbing.models import load_model

    policy = load_model(bench["model_dir"]).train()
    reference = load_model(bench["model_dir"]).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0, fused=True)
    batch = collate_pairs([tuple(x) for x in bench["expected_ids"][:B]], 0)
    first, second = arms

    def step(arm: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        s = pair_logps(policy, reference, batch, **arms[arm])
        loss = -F.logsigmoid(BETA * ((s.policy_chosen - s.ref_chosen) - (s.policy_rejected - s.ref_rejected))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    step(first), step(second)  # warm-up
    times = {first: [], second: []}
    for r in range(rounds):
        for arm in ((first, second) if r % 2 == 0 else (second, first)):
            times[arm].append(step(arm))
    print(f"\n### {title}, one process, {rounds} rounds (ABBA)\n\n`python {' '.join(sys.argv)}` "
          f"(commit {git_commit()})  \n{machine()}, {a.threads} thread(s); load average {os.getloadavg()[0]:.2f} at the end  \n{what}\n")
    print(f"| one training step | {first} (median) | {second} (median) | {first} / {second}: mean ± 95% CI (range) |\n|---|---|---|---|")
    for k, label in ((0, "wall (s)"), (1, "CPU time (s)")):
        ratios = [f[k] / g[k] for f, g in zip(times[first], times[second])]
        m, half = mean_ci95(ratios)
        print(f"| {label} | {statistics.median(t[k] for t in times[first]):.3f} | {statistics.median(t[k] for t in times[second]):.3f} | "
              f"{m:.3f} ± {half:.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")


def work_accounting(a):
    """--work B1,B2,…: no runs, the work each implementation is given, over every pair of --data within --max-length
    (in file order, in batches of B): tokens per pair (separate rows, and with each prompt once), positions through
    the model body per pair (padded rows; ours packed; ours prefix-shared), and executed TFLOP with a live reference
    (executed_step_flops) with their ratios. At equal executed-FLOP rates these ratios are the speed ratios; a
    measured ratio below one means the faster column ran its FLOPs more slowly."""
    if not (a.model and a.data):
        raise SystemExit("benchmark: --work needs --model and --data")
    sys.path.insert(0, str(REPO))
    from plumbing.data import tokenize_pairs
    from plumbing.fast_logps import PACK_ROW_WIDTH, pack_layout
    from plumbing.models import load_tokenizer

    workdir = (REPO / a.workdir / "real").resolve()
    meta = build_real_model_dir(a.model, workdir / "model")
    tokenizer = load_tokenizer(str(workdir / "model"))
    ids = [x for x in tokenize_pairs(tokenizer, read_pair_rows(Path(a.data)), 10**6, 10**6 - 1)
           if len(x[0]) + max(len(x[1]), len(x[2])) <= a.max_length]
    impls = ("ours", "ours_unshared", "trlfast", "trl")
    print(f"`python {' '.join(sys.argv)}` (commit {git_commit()}): {len(ids)} pairs of `{Path(a.data).name}` within "
          f"{a.max_length} tokens, {meta['name']}\n")
    print("| pairs per step | tokens per pair (prompt once) | body positions per pair: padded / packed / prefix-shared | "
          "executed TFLOP: " + " / ".join(LABELS[i] for i in impls) + " | TRL (fast path) / ours | "
          "ours (no prefix sharing) / ours | TRL (fast path) / ours (no prefix sharing) |\n|---|---|---|---|---|---|---|")
    for B in (int(b) for b in a.work.split(",")):
        shapes = [step_shape(ids[j : j + B], pack_layout, PACK_ROW_WIDTH) for j in range(0, len(ids) - B + 1, B)]
        n = len(shapes) * B
        flops = {i: sum(executed_step_flops(i, s, meta, True) for s in shapes) for i in impls}
        body = [sum(s[r] * s[w] for s in shapes) / n for r, w in
                (("rows", "T"), ("packed_rows", "packed_width"), ("shared_rows", "shared_width"))]
        print(f"| {B} | {sum(sum(s['lengths']) for s in shapes) / n:.0f} ({sum(sum(s['shared_lengths']) for s in shapes) / n:.0f}) | "
              + " / ".join(f"{x:.0f}" for x in body) + " | " + " / ".join(f"{flops[i] / 1e12:.0f}" for i in impls)
              + f" | {flops['trlfast'] / flops['ours']:.2f} | {flops['ours_unshared'] / flops['ours']:.2f} | "
              f"{flops['trlfast'] / flops['ours_unshared']:.2f} |")


def trl_status() -> tuple:
    try:
        import trl

        return trl.__version__, None
    except ImportError as e:
        return None, f"unavailable ({e}; pip install -r requirements-bench.txt)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {DEFAULT.steps}; quick {QUICK.steps}; --model {REAL.steps})")
    parser.add_argument("--repeats", type=int, help=f"rounds of alternating runs; medians are reported (default {DEFAULT.repeats})")
    parser.add_argument("--batch-size", type=int, help=f"preference pairs per step (default {DEFAULT.batch_size}; --model {REAL.batch_size})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every measured process (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration, ≈2 minutes")
    parser.add_argument("--model", default="", help="a real checkpoint (a local dir, a .gguf file, or smollm2-135m) and "
                        "HH-format text in its tokenizer, instead of the random small Llama")
    parser.add_argument("--data", default="", help="with --model: real preference rows (.jsonl or .jsonl.gz: prompt/chosen/"
                        "rejected, or HH dialogues), e.g. experiments/data/hh-harmless-base-test.jsonl.gz: the first pairs "
                        "that fit --max-length, in file order, instead of generated HH-format text")
    parser.add_argument("--max-length", type=int, default=512, help="--data: pairs longer than this many tokens are left out "
                        "(default 512)")
    parser.add_argument("--memory", action="store_true", help="the memory-scaling table instead (sequence length × vocabulary)")
    parser.add_argument("--memory-tokens", type=int, default=4096, help="--memory: tokens per step (default 4096)")
    parser.add_argument("--memory-vocabs", default="16384,49152,92544", help="--memory: vocabularies (default 16384,49152,92544)")
    parser.add_argument("--memory-lengths", default="128,256,512", help="--memory: tokens per sequence (default 128,256,512)")
    parser.add_argument("--columns", default=",".join(IMPLS), help=f"implementations to run (default all: {','.join(IMPLS)})")
    parser.add_argument("--settings", default="live,pre", help="reference live, precomputed, or both (default live,pre)")
    parser.add_argument("--cpu_kernels", default="default", help="x86: torch's CPU kernel set of every measured process "
                        "(ATEN_CPU_CAPABILITY: avx2, avx512, ...; default: torch picks the best the CPU has)")
    parser.add_argument("--ab", type=int, default=0, help="the β-DPO machinery's cost instead: N back-to-back pairs of "
                        "runs (plain DPO, β-DPO), small model")
    parser.add_argument("--kernel-ab", type=int, default=0, help="the fused LM head against the logits kernel instead: "
                        "N rounds of one training step each, in one process (--model's or the small model's shapes)")
    parser.add_argument("--sharing-ab", type=int, default=0, help="prefix sharing on against off instead: N rounds of one "
                        "training step each, in one process (--model's or the small model's shapes; --data's rows)")
    parser.add_argument("--work", default="", help="with --model and --data: the work accounting instead (no runs): "
                        "positions and executed FLOPs per implementation over the whole file, for these batch sizes, e.g. 2,4,8")
    parser.add_argument("--profile", action="store_true", help="where one of our steps spends its time (torch.profiler), "
                        "on --model's or the small model's first --batch-size pairs")
    parser.add_argument("--workdir", default="runs/bench", help="model, data, logs and run outputs (default runs/bench)")
    return parser


def main():
    a = build_parser().parse_args()
    if a.cpu_kernels != "default":  # before torch is imported here; every child inherits it (child_env)
        os.environ["ATEN_CPU_CAPABILITY"] = a.cpu_kernels
    if a.memory:
        memory_scaling(a)
    elif a.ab:
        machinery_ab(a, QUICK if a.quick else DEFAULT)
    elif a.profile:
        profile_step(a, REAL if a.model else QUICK if a.quick else DEFAULT)
    elif a.kernel_ab:
        kernel_ab(a, REAL if a.model else QUICK if a.quick else DEFAULT)
    elif a.work:
        work_accounting(a)
    elif a.sharing_ab:
        sharing_ab(a, REAL if a.model else QUICK if a.quick else DEFAULT)
    else:
        speed(a, REAL if a.model else QUICK if a.quick else DEFAULT)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":  # a measured subprocess started by main()
        spec = json.loads(Path(sys.argv[3]).read_text())
        Path(spec["result"]).write_text(json.dumps(CHILDREN[sys.argv[2]](spec)))
    else:
        main()
