"""Supervised warm-start: train the policy on prompt → chosen response before preference training.

Launch:

    python sft.py --config configs/sort_sft.yaml
    accelerate launch sft.py --config configs/sort_sft.yaml
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 sft.py --config configs/sort_sft.yaml

The loss is the mean negative log-likelihood of the response tokens only (prompt tokens are masked):

    L_SFT = −(1/|y|) Σ_t log π_θ(y_t | x, y_<t),   averaged over all response tokens of the global batch

On the built-in task (`data.dataset: sort`) with `model.name_or_path: tiny`, it builds the character
tokenizer and a tiny Llama from scratch, trains on deliberately imperfect demonstrations, and prints the
held-out exact-match rate at the end: a competent but imperfect policy for β-DPO to improve on.
`final/` is a plain `save_pretrained` model + tokenizer: pass it to betadpo.py as `model.name_or_path`.

Optimizer, checkpoints, resume and the final save are betadpo.py's (shared in plumbing/): re-running the same
command resumes from the newest intact checkpoint, a finished run is not retrained, and a NaN stops the run.
"""

import plumbing.host_allocator  # noqa: F401  (first: glibc malloc set up before torch loads; docs/SCALING.md)
import time
from pathlib import Path

import torch

from plumbing import lora, sort_task
from plumbing.checkpoints import load_checkpoint, resume_point, save_checkpoint, save_final
from plumbing.config import SFTConfig, parse_config
from plumbing.data import collate, load_sft, micro_batch_indices, tokenize, training_examples
from plumbing.distributed import end_processes, load_on_main, main_first
from plumbing.errors import UserError
from plumbing.fast_logps import plain_token_logps, token_logps
from plumbing.inputs import fingerprint_inputs
from plumbing.launch import start_run
from plumbing.metrics import Progress, open_run
from plumbing.models import generate, load_model, load_tokenizer, set_attn_implementation
from plumbing.optim import StepCount, make_optimizer, make_scheduler, no_sync_unless_last, optimizer_step
from plumbing.stopping import main_guard


def sft_loss(model, batch: dict, total_tokens, num_processes: int, logps: str) -> torch.Tensor:
    """(P / #response tokens of the global batch) · Σ −log π over this process's response tokens, so that
    DDP's gradient average equals the token-mean over the global batch on any number of processes.
    logps: train.logps. plain: a whole fp32 log-softmax; fast and fused: the token_logps kernel on the padded
    batch's logits. (Packing and the fused LM head, which betadpo.py's fast paths add, are not used here: they
    would change the warm start's floating-point results, and with them every number downstream.)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    label_logps = plain_token_logps if logps == "plain" else token_logps
    logp = label_logps(logits[:, :-1], batch["labels"][:, 1:])  # (B, T−1), 0 on masked labels
    return -logp.sum() * num_processes / total_tokens


def exact_match(model, tokenizer, rows: list[dict], cfg: SFTConfig, batch_size: int = 256) -> float:
    """Greedy completions of held-out prompts; fraction exactly equal to the sorted list."""
    hits = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = [p for p, _ in tokenize(tokenizer, [r["prompt"] for r in chunk], [""] * len(chunk),
                                          cfg.data.max_length, cfg.data.max_prompt_length)]
        outs = generate(model, prompts, cfg.eval.max_new_tokens, 0.0, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        hits += sum(sort_task.gold_reward(r["prompt"], text) == 1.0 for r, text in zip(chunk, texts))
    return hits / len(rows)


def main():
    from accelerate.utils import fsdp2_prepare_model

    # ---- config ---------------------------------------------------------------------------------------
    cfg = parse_config(SFTConfig)
    # ---- accelerator, launch and config checks, seed --------------------------------------------------
    accelerator = start_run(cfg)
    P, rank = accelerator.num_processes, accelerator.process_index
    out = Path(cfg.train.output_dir)
    # ---- data -----------------------------------------------------------------------------------------
    from_scratch = cfg.model.name_or_path == "tiny"
    # Rank 0 first: a hub tokenizer (or data set, inside training_examples) is downloaded once, then read from the
    # cache.
    hub_tokenizer = lambda: load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)  # noqa: E731
    tokenizer = sort_task.build_tokenizer() if from_scratch else main_first(accelerator, hub_tokenizer)
    # (prompt, response) ids; prints the data summary
    examples = training_examples(cfg.data, tokenizer, accelerator.is_main_process)
    if examples is None:  # data.preview N printed the first N examples: stop before anything is written
        return
    micro = cfg.train.batch_size // cfg.train.grad_accum
    steps_per_epoch = len(examples) // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"data: {len(examples)} SFT examples is fewer than train.batch_size={cfg.train.batch_size}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    lengths = tuple(len(p) + len(r) for p, r in examples) if cfg.train.group_by_length else None
    inputs = fingerprint_inputs(cfg, tokenizer, train=examples)  # pinned in inputs.json: a resume must use the same
    # the newest intact checkpoint (refused if the inputs changed), or a finished run
    ckpt, finished = resume_point(accelerator, out, total_steps, inputs, cfg.train.allow_changed_inputs)
    if finished:
        return
    # ---- model ----------------------------------------------------------------------------------------
    if from_scratch:
        model = sort_task.build_tiny_llama(len(tokenizer), cfg.model.tiny_hidden_size, cfg.model.tiny_layers,
                                           cfg.train.seed, tokenizer.pad_token_id, tokenizer.eos_token_id)
        set_attn_implementation(model, cfg.model.attn_implementation)
    else:  # under FSDP2 only the main process reads the weights; the others build the model on the meta device
        model_cfg = cfg.model
        model = load_on_main(accelerator, lambda: load_model(model_cfg.name_or_path, model_cfg.dtype,
                                                             model_cfg.trust_remote_code,
                                                             attn_implementation=model_cfg.attn_implementation))
    model = lora.add_adapters(model, cfg.model, cfg.model.name_or_path)  # model.lora_r > 0: train adapters only
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if accelerator.is_fsdp2:  # sharded first (the main process's weights sent out), so the optimizer holds the shards
        model = fsdp2_prepare_model(accelerator, model)
    # ---- optimizer ------------------------------------------------------------------------------------
    optimizer = make_optimizer(cfg.train, model.parameters(), accelerator.device)
    scheduler = make_scheduler(optimizer, cfg.train.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = StepCount()
    accelerator.register_for_checkpointing(scheduler, progress)
    # ---- resume ---------------------------------------------------------------------------------------
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt, progress)
    log = open_run(cfg, accelerator, progress.step, inputs)  # config.yaml, metrics.jsonl (later rows dropped), wandb
    # ---- loop -----------------------------------------------------------------------------------------
    model.train()
    report = Progress("SFT", total_steps, progress.step, accelerator.is_main_process, cfg.log.progress_every)
    while progress.step < total_steps:
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=accelerator.device)
        for k in range(cfg.train.grad_accum):
            j = progress.step * cfg.train.grad_accum + k  # global micro-batch number
            idx = micro_batch_indices(j, len(examples), micro, steps_per_epoch * cfg.train.grad_accum, cfg.train.seed,
                                      lengths)
            mine = idx[rank * (micro // P) : (rank + 1) * (micro // P)]
            total_tokens = sum(len(examples[i][1]) for i in idx)  # response tokens of the global micro-batch
            batch = collate([examples[i] for i in mine], tokenizer.pad_token_id)
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            with no_sync_unless_last(accelerator, model, k, cfg.train.grad_accum), accelerator.autocast():
                loss = sft_loss(model, batch, total_tokens, P, cfg.train.logps)
                accelerator.backward(loss / cfg.train.grad_accum)
            step_loss += loss.detach() / cfg.train.grad_accum
        grad_norm, lr = optimizer_step(accelerator, model, optimizer, scheduler, cfg.train.max_grad_norm)
        progress.step += 1
        # ---- logging (one host sync per step) ---------------------------------------------------------
        row = {"loss": accelerator.reduce(step_loss, reduction="sum") / P}
        if grad_norm is not None:  # None: fp16's loss scaler skipped this step
            row["grad_norm"] = grad_norm
        values = dict(zip(row, torch.stack([v.float() for v in row.values()]).tolist()))
        log.write({"step": progress.step, **values, "lr": lr,
                   "pairs_per_s": cfg.train.batch_size / (time.perf_counter() - t0)})  # stops on NaN/inf
        report.step(loss=values["loss"])
        if progress.step % cfg.train.save_every == 0 or progress.step == total_steps:
            save_checkpoint(accelerator, out, progress.step, model.parameters())
    report.close()
    # ---- save -----------------------------------------------------------------------------------------
    # final/ gathers the model on the main process: first free the optimizer state (the last checkpoint holds it),
    # to lower that host peak, as betadpo.py does (SCALING.md)
    optimizer.state.clear()
    save_final(accelerator, model, tokenizer, out, progress.step,
               merge_lora=cfg.model.lora_merge_final)  # LoRA: the adapter
    if accelerator.is_main_process:
        print(f"model: {out / 'final'}")
        if cfg.data.dataset == "sort":
            held_out = load_sft(cfg.data, "eval")
            # a plain copy: FSDP's sharded forward would hang
            final = lora.load_trained(str(out / "final"), "float32", False, "final/")
            matched = exact_match(final, tokenizer, held_out, cfg)
            print(f"held-out exact match (greedy, {len(held_out)} prompts): {matched:.1%}")
    end_processes(accelerator)  # wait for all, let the collectives settle, destroy the process group


if __name__ == "__main__":
    main_guard(main)
