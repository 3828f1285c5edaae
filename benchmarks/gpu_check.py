"""The checks a first GPU should run (benchmarks/gpu_check.sh calls this), with no internet: a random model of
InternLM2-7B's width (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 92,544) but 4 layers, saved
with save_pretrained, and the built-in sort task's tokenizer and data (token ids stay below the vocabulary).

    python benchmarks/gpu_check.py            # on one GPU (meant to take ≤ 8 minutes; not yet run on a GPU)
    python benchmarks/gpu_check.py --cpu      # the same logic, tiny, on CPU processes (tests/test_scale.py runs it)

0. Measurements, in this process, of one training micro-batch through betadpo.py's own functions (pair_logps of
   policy and reference, betadpo_loss, backward): 4 pairs = 8 sequences of 1,024 tokens in bf16 autocast, plain
   (the model on the GPU) and FSDP2 on 1 process (fully_shard per decoder layer and the root, bf16 parameters,
   fp32 reduce, as accelerate's FSDP2 path shards it; the reference sharded in bf16). Each prints tokens/s, the
   model's TFLOP/s (model FLOPs: below), MFU against the detected GPU's dense bf16 peak (--peak_tflops for a
   GPU not in GPU_BF16_TFLOPS), and peak allocated and reserved memory; then
   - the sync check: one more micro-batch under torch.cuda.set_sync_debug_mode("error"): the first operation
     that makes the host wait for the GPU raises, and is printed with where it happened (or "no host syncs");
   - the precision check: the GPU's bf16-autocast response log-prob sums of one pair against the same model in
     fp32 on the CPU: the largest difference, in nats per response token (bf16 rounding gives ~1e-2; a logic
     error O(1): more than 0.1 stops the check with exit 1).
   --cpu: the same code on the CPU (FSDP2 on a 1-process gloo group), but no MFU (no peak to compare with), no
   sync check (it needs CUDA), and "device" = the CPU under bf16 autocast.
1. fast vs plain log-probs (train.logps: fused vs plain) under bf16 autocast, 2 × 2,048 tokens: values and gradients.
2. A plain one-process run of betadpo.py, 2 steps (bf16 on the GPU): the baseline.
3. FSDP2 (configs/accelerate/fsdp.yaml, 1 process on the GPU; --cpu: 1 CPU process, as on the GPU, through
   tests/fsdp_launch.py; 2 processes are tests/test_fsdp.py's): 1 step, then the same command with 2 steps
   resumes from its checkpoint. Steps 1 and 2 must agree with the plain run's (plain-vs-FSDP2 agreement,
   and an exact resume).
4. train.precompute_ref: step 1 must agree with the plain run's (same reference numbers, cached).
5. eval.py on the FSDP run's final/ against the starting model.
Each prints its peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak RSS) and time per step. Any
disagreement beyond the tolerance stops with exit code 1. --cpu runs the one-process stages 2, 4 and 5 in its own
process (run_here: the same scripts' __main__, without an interpreter's start-up per stage); only the FSDP2
launches of 3 start processes.

Model FLOPs of one micro-batch (what the math needs, not what the kernels execute): a forward costs 2 FLOPs per
matmul weight per token (the LM head on the scored response positions only) plus causal attention, 2·L·h·T² per
sequence of T tokens; the policy's backward twice its forward; the reference one forward: 4 forwards in all.
(The fused LM head also recomputes its forward in backward; that is executed work, not model FLOPs.)
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


# Dense bf16 tensor-core peaks, TFLOP/s, by the name torch.cuda.get_device_name reports (NVIDIA's data sheets;
# the SXM parts; first match wins).
GPU_BF16_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
                   ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0))


def gpu_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in GPU_BF16_TFLOPS if key in name), None)


def model_flops(model, batch) -> float:
    """Model FLOPs of one training micro-batch of `batch` (policy forward + backward, reference forward)."""
    import torch

    c = model.config
    V, h = c.vocab_size, c.hidden_size
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) - 2 * V * h  # body (not embed, head)
    tokens = batch["attention_mask"].sum().item()
    scored = (batch["labels"][:, 1:] != -100).sum().item()
    lengths = batch["attention_mask"].sum(-1).to(torch.float64)
    forward = 2 * matmul * tokens + 2 * V * h * scored + 2 * c.num_hidden_layers * h * (lengths**2).sum().item()
    return 4 * forward


def random_pairs(vocab: int, pairs: int, length: int, seed: int = 0) -> list:
    """Token-id pairs (prompt, chosen, rejected): prompt length/4, chosen to `length`, rejected a little shorter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731  (0–2: the tokenizer's specials)
    p = length // 4
    return [(ids(p), ids(length - p), ids(length - p - 16 * (i + 1))) for i in range(pairs)]


def micro_batch(policy, reference, batch, device: str):
    """One training micro-batch as betadpo.py's loop runs it on one process: the pairs' log-probs under bf16
    autocast, β-DPO's loss of the calibration batch (this process's pairs are all of it), backward."""
    import torch

    import betadpo

    loss_cfg = betadpo.LossArgs(alpha=0.6, filter_ratio=0.25)  # the 7B config's β-DPO
    state = betadpo.BetaDPOState(loss_cfg, 0, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        stats = betadpo.pair_logps(policy, reference, batch, "fused")  # train.logps's default
        losses, kept, _ = betadpo.betadpo_loss(stats, state, loss_cfg, True)  # one process: its pairs are the batch
        loss = betadpo.process_share(losses, kept, 0, 1)
    loss.backward()
    return stats


def measure(model, what: str, reference, batch, device: str, peak_tflops, repeats: int):
    """Time `repeats` micro-batches after one warm-up → prints tokens/s, TFLOP/s, MFU, peak memory."""
    import torch

    cuda = device == "cuda"
    micro_batch(model, reference, batch, device)  # warm-up: kernels chosen, buffers allocated
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        stats = micro_batch(model, reference, batch, device)
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    flops = model_flops(model, batch)
    tflops = flops / dt / 1e12
    mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "n/a (no peak known: --peak_tflops)"
    memory = (f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB"
              if cuda else f"peak RSS of this process {peak_bytes() / 2**30:.2f} GiB")
    tokens = batch["attention_mask"].sum().item()
    print(f"0. {what}: {dt:.3f} s per micro-batch ({tokens} tokens), {tokens / dt:,.0f} tokens/s, model {tflops:.3g} TFLOP/s, "
          f"MFU {mfu}; {memory}; log-prob sums {stats.policy_chosen.dtype}", flush=True)


def sync_check(model, reference, batch):
    """One micro-batch under torch.cuda.set_sync_debug_mode("error"): every operation that would make the host wait
    for the GPU (.item(), .tolist(), nonzero, boolean-mask indexing, a blocking copy) raises instead."""
    import traceback

    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        micro_batch(model, reference, batch, "cuda")
        verdict = "no host syncs in forward, loss and backward"
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if str(ROOT) in f.filename]
        where = f"{Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
        verdict = f"a host sync at {where} ({str(e).splitlines()[0]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)
    print(f"0. sync check (set_sync_debug_mode error, one training micro-batch): {verdict}", flush=True)


def precision_check(model, cpu_model, batch, device: str):
    """The device's bf16-autocast response log-prob sums against fp32 on the CPU, same weights, same batch."""
    import torch

    import betadpo

    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        low = betadpo.sequence_logps(model, {k: v.to(device) for k, v in batch.items()}, "fused")["sum"].double().cpu()
    with torch.no_grad():
        exact = betadpo.sequence_logps(cpu_model.float(), batch, "plain")["sum"].double()
    tokens = (batch["labels"][:, 1:] != -100).sum(-1).double()
    per_token = ((low - exact).abs() / tokens).max().item()
    print(f"0. precision: {device} bf16 autocast vs CPU fp32 log-prob sums of {len(tokens)} sequences "
          f"({int(tokens.min())}–{int(tokens.max())} response tokens, sums ≈ {exact.mean().item():.0f} nats): largest "
          f"|Δ| {(low - exact).abs().max().item():.3f} nats, {per_token:.2e} nats per token", flush=True)
    if per_token > 0.1:
        raise SystemExit("the device's log-probs disagree with the fp32 CPU recomputation beyond bf16 rounding")


def fsdp2_one_process(model, device: str):
    """`model` sharded by torch's FSDP2 on a 1-process group: each decoder layer, then the root, bf16 parameters in
    forward, fp32 gradient reduce (what accelerate's fsdp2_prepare_model does with configs/accelerate/fsdp.yaml)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    mesh = init_device_mesh(device, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def measurements(model_dir: Path, cpu: bool, peak_tflops):
    """0. plain and FSDP2 micro-batches, the sync check, the precision check (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from plumbing import fast_logps
    from plumbing.data import collate_pairs

    device = "cpu" if cpu else "cuda"
    if not cpu:
        name = torch.cuda.get_device_name()
        peak_tflops = peak_tflops or gpu_peak_tflops(name)
        print(f"0. GPU: {name}, dense bf16 peak {peak_tflops or 'unknown'} TFLOP/s", flush=True)
    load = lambda dtype: AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)  # noqa: E731
    model = load(torch.float32)
    pairs, length = (2, 64) if cpu else (4, 1024)
    # as betadpo.py's loop: pinned, non_blocking copies, the host copy kept to plan the packing (no read-back)
    batch = fast_logps.to_device(collate_pairs(random_pairs(model.config.vocab_size, pairs, length), 0), device)
    repeats = 2 if cpu else 5
    policy, reference = model.to(device), load(torch.float32).to(device).requires_grad_(False).eval()  # as betadpo.py: fp32 reference
    measure(policy, "plain, bf16 autocast", reference, batch, device, peak_tflops, repeats)
    if not cpu:
        sync_check(policy, reference, batch)
    one_pair = collate_pairs(random_pairs(model.config.vocab_size, 1, length, seed=1), 0)
    precision_check(policy, load(torch.float32), one_pair, device)
    del policy, reference, model
    if not cpu:
        torch.cuda.empty_cache()
    policy = fsdp2_one_process(load(torch.float32).to(device), device)
    reference = fsdp2_one_process(load(torch.bfloat16).to(device).requires_grad_(False).eval(), device)  # frozen_dtype: bf16
    measure(policy, "FSDP2 (1 process), bf16 parameters, fp32 reduce", reference, batch, device, peak_tflops, repeats)
    if not cpu:
        sync_check(policy, reference, batch)
    del policy, reference
    import torch.distributed as dist

    dist.destroy_process_group()
    if not cpu:
        torch.cuda.empty_cache()


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


def run_here(argv, what: str):
    """--cpu: a one-process stage (`python SCRIPT ARGS`) in this process, through runpy as the probe runs it: no
    interpreter start-up and imports (~4 CPU-seconds of torch and transformers per stage, most of a tiny run).
    The stage's own output is kept and shown only if it fails; accelerate's process-wide state is reset after it,
    so that the next stage builds its own Accelerator. The GPU keeps `run` (a fresh process: its own peak memory)."""
    import contextlib
    import io
    import runpy

    from accelerate.state import AcceleratorState, GradientState

    argv = list(map(str, argv))
    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    os.environ.update({"TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "true"})
    sys.argv, output, code = argv, io.StringIO(), 0
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except SystemExit as stopped:  # main_guard's exit codes
        code = stopped.code if isinstance(stopped.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if code != 0:
        raise SystemExit(f"{what} failed ({code}): {' '.join(argv)}\n{output.getvalue()[-3000:]}")
    print(f"{what}: {time.perf_counter() - t0:.0f} s wall, in this process "
          f"(peak RSS so far {peak_bytes() / 2**30:.2f} GiB)", flush=True)


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
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in GPU_BF16_TFLOPS")
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
    measurements(model_dir, cpu, args.peak_tflops)
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
    one_process = run_here if cpu else (lambda argv, what: run([*me, *argv], what, cpu))  # stages 2, 4 and 5
    plain = work / "plain"
    one_process(["betadpo.py", *common, "--train.output_dir", str(plain), "--train.max_steps", "2"],
                "2. plain run, 2 steps")
    fsdp = work / "fsdp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
                "--num_processes", "1", "--main_process_port", str(29500 + os.getpid() % 500)]
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
    one_process(["betadpo.py", *common, "--train.output_dir", str(pre), "--train.max_steps", "1",
                 "--train.precompute_ref", "true"], "4. precompute_ref, step 1")
    agree(a[0], train_rows(pre)[0], "4. step 1, live vs precomputed reference", rel)
    one_process(["eval.py", *common, "--eval.policy", str(fsdp / "final"), "--eval.reference", str(model_dir),
                 "--eval.output_dir", str(work / "eval"), "--eval.num_prompts", 4, "--eval.samples_per_prompt", 2,
                 "--eval.max_new_tokens", 8], "5. eval.py")
    metrics = json.loads((work / "eval" / "eval.json").read_text())["metrics"]
    print(f"5. eval.py: pref_accuracy {metrics['pref_accuracy']:.3f}, kl_seq {metrics['kl_seq']:.4f}")
    print(f"all checks passed ({work})")


if __name__ == "__main__":
    main()
