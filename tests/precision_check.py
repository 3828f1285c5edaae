"""Test-only (tests/test_precision.py): the dtype and value of betadpo's sequence log-prob sums in the DDP × 2 and
FSDP2 × 2 cells of {one process, DDP × 2, FSDP2 × 2} × {fp32, bf16} × {tiny Llama, SmolLM2}; activation
checkpointing under FSDP2 × 2 against none; and a bf16 FSDP2 betadpo.py run. All in ONE 2-process launch (under
tests/fsdp_launch.py, so that FSDP2 really runs on gloo): each cell builds its Accelerator afresh through
plumbing.distributed.make_accelerator (the code under test), with ACCELERATE_USE_FSDP off for the DDP cells. The
test runs the one-process cells in its own process with the same functions.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_launch.py \
        tests/precision_check.py TINY_MODEL SMOLLM2_MODEL ROWS.jsonl [--eval EVAL FLAGS...] [--gc] [--run BETADPO FLAGS...]

Both ranks score the same whole batch, so every cell's sums compare directly with the one-process cell's. The main
process prints one JSON line per cell: {"cell": "fsdp2/bf16/smollm2/policy", "dtype": ..., "sum": [...],
"tokens": [...]}; with --eval, eval.py's metrics under DDP, {"cell": "eval/ddp/bf16", "metrics": {...}} (and fp32);
with --gc also {"cell": "gc/on", "losses": [...]} (and gc/off) for 3 bf16 optimizer steps of
β-DPO under FSDP2.
"""

import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: betadpo, plumbing

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, fsdp2_prepare_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import betadpo
from plumbing.config import DataArgs, parse_config
from plumbing.data import collate_pairs, load_pairs, tokenize_pairs
from plumbing.distributed import make_accelerator, settle_collectives, shard_frozen

PAIRS = 2  # pairs per batch: 4 sequences


def batches(tiny: str, smollm2: str, rows_file: str) -> dict:
    """{model name: (path, collated batch)}: sort-task pairs for the tiny Llama, real UltraFeedback rows for
    SmolLM2 (rendered by its chat template, cut to 64 tokens)."""
    tok = AutoTokenizer.from_pretrained(tiny)
    sort_pairs = tokenize_pairs(tok, load_pairs(DataArgs(eval_size=0, num_train=PAIRS), "train", tok), 64, 32)
    tok = AutoTokenizer.from_pretrained(smollm2)
    rows = load_pairs(DataArgs(dataset=rows_file, eval_size=0), "train", tok)[:PAIRS]
    real_pairs = tokenize_pairs(tok, rows, 48, 32)
    return {"tiny": (tiny, collate_pairs(sort_pairs, 0)), "smollm2": (smollm2, collate_pairs(real_pairs, tok.pad_token_id))}


def reset_accelerate(fsdp: bool):
    """accelerate keeps its state in process-wide singletons: reset them (the process group stays), so that the
    next Accelerator is a DDP one (fsdp False) or an FSDP2 one (through tests/fsdp_launch.py)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:  # tests/fsdp_launch.py set it
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU  # it sets it again if fsdp
    os.environ["ACCELERATE_USE_FSDP"] = "true" if fsdp else "false"


def fresh_accelerator(mixed_precision: str, fsdp: bool):
    """A new Accelerator of train.mixed_precision under DDP (fsdp False) or FSDP2, made by make_accelerator."""
    reset_accelerate(fsdp)
    train = SimpleNamespace(mixed_precision=mixed_precision, fsdp_reduce_dtype="fp32", dist_timeout_min=10)
    return make_accelerator(SimpleNamespace(train=train))


def score(accelerator, model, batch: dict, role: str) -> dict:
    """sequence_logps of `batch` as betadpo.py computes them: the policy prepared (accelerate's autocast
    wrapper; sharded first under FSDP2), with gradients; the reference frozen (shard_frozen) under autocast."""
    model = copy.deepcopy(model)
    if role == "policy":
        if accelerator.is_fsdp2:
            model = fsdp2_prepare_model(accelerator, model)
        model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))  # FSDP2 wants both
        with accelerator.autocast():
            out = betadpo.sequence_logps(model, batch, "fused")  # with its graph, as the loss gets it
    else:
        model = shard_frozen(accelerator, model.requires_grad_(False).eval())
        with torch.no_grad(), accelerator.autocast():
            out = betadpo.sequence_logps(model, batch, "fused")
    return {"dtype": str(out["sum"].dtype), "sum": out["sum"].detach().double().tolist(),
            "tokens": (batch["labels"][:, 1:] != -100).sum(-1).tolist()}


def gc_losses(accelerator, model, batch: dict, checkpointing: bool) -> list[float]:
    """3 optimizer steps of β-DPO (the loss of betadpo.py, reference log-probs given) under FSDP2 with
    activation checkpointing on or off → the losses."""
    model = copy.deepcopy(model).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = fsdp2_prepare_model(accelerator, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    cfg = betadpo.LossArgs(alpha=0.6, filter_ratio=0.25)
    state = betadpo.BetaDPOState(cfg, seed=0, device=accelerator.device)
    B = batch["input_ids"].shape[0] // 2
    batch = {**batch, **{k: torch.full((B,), -20.0) for k in betadpo.REF_FIELDS}}  # a fixed reference
    losses = []
    for _ in range(3):
        with accelerator.autocast():
            stats = betadpo.pair_logps(model, None, batch, "fused")
            per_pair, kept, _ = betadpo.betadpo_loss(stats, state, cfg, True)  # ℓ_i (N,), kept (N,)
            loss = betadpo.process_share(per_pair, kept, 0, 1)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def logit_scale(model, batch: dict) -> list[float]:
    """Σ_t max_v |z_{t,v}| over each row's response positions, from the fp32 logits: the scale of the precision
    budget (docs/ALGORITHM.md, Precision)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T−1, V)
    return (logits.abs().amax(-1) * (batch["labels"][:, 1:] != -100)).sum(-1).double().tolist()


def cells(layout: str, launched: bool, models: dict):
    """(cell name, result) of every cell of this process layout: fp32 and bf16; the tiny Llama as policy and as
    reference, SmolLM2 as policy (the reference's path is the tiny one's: shard_frozen, autocast), in fp32 in one
    process only (saving two forwards of 135M parameters per launch)."""
    for precision in ("no", "bf16"):
        accelerator = fresh_accelerator(precision, layout == "fsdp2")
        assert accelerator.is_fsdp2 == (layout == "fsdp2") and (accelerator.num_processes == 2) == launched
        for name, (model, batch) in models.items():
            if name == "smollm2" and precision == "no" and launched:  # fp32 DDP/FSDP2 = one process: the tiny model shows it
                continue
            for role in ("policy", "reference") if name == "tiny" else ("policy",):
                yield f"{layout}/{'fp32' if precision == 'no' else precision}/{name}/{role}", score(accelerator, model, batch, role)


def eval_cells(layout: str, launched: bool, eval_flags: list[str]):
    """eval.py's evaluate (its scoring and sampling, under train.mixed_precision) with fp32 and bf16 → (cell name,
    {"metrics": its metrics}) each."""
    import eval as evaluation

    for precision in ("no", "bf16"):
        accelerator = fresh_accelerator(precision, layout == "fsdp2")
        assert (accelerator.num_processes == 2) == launched
        cfg = parse_config(evaluation.Config, [*eval_flags, "--train.mixed_precision", precision])
        metrics = evaluation.evaluate(cfg, accelerator)["metrics"]
        yield f"eval/{layout}/{'fp32' if precision == 'no' else precision}", {"metrics": metrics}


def main():
    """Launched: the DDP and FSDP2 cells, with --eval eval.py's (its flags follow), with --fused-head the fused LM
    head under FSDP2 (fused_head_fsdp_check.check), with --gc the checkpointing losses, and after --run the flags of
    a betadpo.py run made last, under FSDP2 (it ends the process group)."""
    args, run = (sys.argv[1 : sys.argv.index("--run")], sys.argv[sys.argv.index("--run") + 1 :]) if "--run" in sys.argv else (sys.argv[1:], None)
    tiny, smollm2, rows_file = args[:3]
    models = {name: (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), batch)
              for name, (path, batch) in batches(tiny, smollm2, rows_file).items()}
    accelerator = None
    for layout in ("ddp", "fsdp2"):
        for name, cell in cells(layout, True, models):
            if PartialState().is_main_process:
                print(json.dumps({"cell": name, **cell}), flush=True)
    if "--eval" in args:  # eval.py's flags follow, up to --gc or --run
        end = min((args.index(flag) for flag in ("--fused-head", "--gc") if flag in args), default=None)
        for layout in ("ddp", "fsdp2"):
            for name, cell in eval_cells(layout, True, args[args.index("--eval") + 1 : end]):
                if PartialState().is_main_process:
                    print(json.dumps({"cell": name, **cell}), flush=True)
    if "--fused-head" in args:  # tests/fused_head_fsdp_check.py's comparison, on this launch's processes
        import fused_head_fsdp_check

        fused_head_fsdp_check.check(fresh_accelerator("no", True))
    if "--gc" in args:
        accelerator = fresh_accelerator("bf16", True)
        for on in (False, True):
            losses = gc_losses(accelerator, models["tiny"][0], models["tiny"][1], on)
            if accelerator.is_main_process:
                print(json.dumps({"cell": f"gc/{'on' if on else 'off'}", "losses": losses}), flush=True)
    if run:
        reset_accelerate(fsdp=True)
        betadpo.train_policy(parse_config(betadpo.Config, run))  # ends with end_processes
        return
    PartialState().wait_for_everyone()
    settle_collectives()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
