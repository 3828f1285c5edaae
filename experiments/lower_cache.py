"""Training only the top k blocks of a Llama, on cached outputs of the frozen blocks below (the real-data study).

A *split* model directory is an ordinary `save_pretrained` directory of a Llama with only the top k decoder blocks
(and the final norm and LM head), whose config also names the file holding h_{L−k}, the output of the frozen
lower L−k blocks, for every token sequence the model will be asked to score (keyed by its token ids). It loads as a
`LowerCachedLlama`, whose forward looks up h_{L−k} of each sequence in the batch and runs the top blocks on it
(transformers' `inputs_embeds`).

How betadpo.py loads it without knowing of it: through transformers' own mechanism for a model class it does not
ship. `make_split` copies this file into the directory and names the class in the config's `auto_map`, so
`model.trust_remote_code: true` (BETADPO_FLAGS below) makes `AutoModelForCausalLM` import it from there;
`save_pretrained` (final/, checkpoints) copies it on. plumbing/ stays free of study code, and the study's models
are ordinary model directories.

Exact, not an approximation: a decoder block sees only the hidden states below it and the positions (rotary
embeddings are computed from position_ids, not from the layer), so top_k(h_{L−k}) is the whole model's output up
to floating-point summation order (tests/test_real_data.py checks the log-probs against the whole model).

Why: on 2 CPU cores the forward pass through SmolLM2's 30 blocks is most of a training step, and with the lower
blocks frozen their output is the same in every run of a study. Computed once per data set (`make_split`), it
makes a run's step ~3× cheaper. The embedding matrix (tied to the LM head in SmolLM2) is frozen too: its weight
gradient would cost as much as the top blocks' and move every token's input representation.

What it cannot do: score a sequence that is not in the cache (so no sampling: the study measures KL on held-out
responses), or run the lower blocks (they are not in the directory). Nor a pair as one prefix-shared sequence
(train.prefix_sharing): its rejected branch is not a sequence of the cache, so the studies train with it off
(BETADPO_FLAGS); the numbers are the same up to rounding (tests/test_prefix_sharing.py).
"""

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from plumbing.errors import UserError

# betadpo.py's flags for a split model: its class comes from the directory; each response in its own row.
BETADPO_FLAGS = ["--model.trust_remote_code", "true", "--train.prefix_sharing", "false"]
CLASS = "LowerCachedLlama"  # the class a split directory's config names (auto_map, architectures)


def is_split(directory) -> bool:
    """Whether `directory` holds a split model (its config names the cached states)."""
    config = Path(directory) / "config.json"
    return config.is_file() and "lower_states" in json.loads(config.read_text())


def sequence_key(ids) -> bytes:
    """The cache key of one token sequence: its ids as int32 bytes."""
    return torch.as_tensor(ids, dtype=torch.int32).numpy().tobytes()


@torch.no_grad()
def lower_states(model, sequences: list[list[int]], lower_layers: int, batch_size: int = 16) -> dict:
    """h_{L−k} (after the first `lower_layers` blocks) of each sequence by the whole model → {key: (len, H) tensor}.
    Right-padded batches: a causal model's states at real positions do not see the padding after them."""
    states = {}
    todo = sorted({sequence_key(s): s for s in sequences}.items(), key=lambda kv: len(kv[1]))  # similar lengths together
    t0, shown = time.perf_counter(), 0
    for i in range(0, len(todo), batch_size):
        if i >= shown + len(todo) / 10:  # progress about every tenth (minutes for a few thousand sequences)
            shown = i
            print(f"lower-block states: {i}/{len(todo)} sequences, {time.perf_counter() - t0:.0f} s", flush=True)
        chunk = todo[i : i + batch_size]
        T = max(len(s) for _, s in chunk)
        ids = torch.zeros((len(chunk), T), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (_, s) in enumerate(chunk):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        hidden = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[lower_layers]  # (b, T, H)
        for j, (key, s) in enumerate(chunk):
            states[key] = hidden[j, : len(s)].clone()
    return states


def make_split(model, tokenizer, sequences: list[list[int]], top_layers: int, out: Path, batch_size: int = 16) -> Path:
    """Write a split directory at `out`: the top `top_layers` blocks of `model` (a Llama) as a model of their own,
    the tokenizer, h_{L−k} of every sequence in `sequences` (states.pt) and this file (the model's class). → out."""
    L = model.config.num_hidden_layers
    if not 0 < top_layers < L:
        raise UserError(f"top_layers must be in [1, {L - 1}] for a model of {L} blocks, got {top_layers}")
    states = lower_states(model, sequences, L - top_layers, batch_size)
    config = model.config.to_dict()
    config.update(num_hidden_layers=top_layers, layer_types=None, architectures=[CLASS],
                  auto_map={"AutoModelForCausalLM": f"{Path(__file__).stem}.{CLASS}"},  # read with trust_remote_code
                  lower_states=str((out / "states.pt").resolve()), lower_layers=L - top_layers, lower_sequences=len(states))
    top = LowerCachedLlama(type(model.config).from_dict(config)).to(model.dtype)
    weights = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if index < L - top_layers:
                continue
            name = name.replace(f"model.layers.{index}.", f"model.layers.{index - (L - top_layers)}.", 1)
        weights[name] = value
    top.load_state_dict(weights)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    top.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.copyfile(__file__, tmp / Path(__file__).name)  # the class, for AutoModelForCausalLM (auto_map)
    torch.save(states, tmp / "states.pt")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


_STATES: dict = {}  # states file → its dict, loaded once per process (eval loads policy and reference from one file)


def cached_states(path: str) -> dict:
    if path not in _STATES:
        if not Path(path).is_file():
            raise UserError(f"the cached lower-block states {path} of a split model are missing (rebuild the split)")
        _STATES.clear()
        _STATES[path] = torch.load(path)
    return _STATES[path]


class LowerCachedLlama(LlamaForCausalLM):
    """The top blocks of a Llama; `forward(input_ids=...)` runs them on the cached h_{L−k} of each sequence. The
    embedding (tied to the LM head) is frozen."""

    def __init__(self, config):  # built from a config (the other processes under FSDP: plumbing/distributed.py)
        super().__init__(config)
        self.get_input_embeddings().weight.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):  # loading the weights gives the parameters requires_grad again
        model = super().from_pretrained(*args, **kwargs)
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if input_ids is not None:
            states = cached_states(self.config.lower_states)
            inputs_embeds = lookup(states, input_ids, attention_mask, position_ids, self.dtype)
        return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def lookup(states: dict, input_ids, attention_mask, position_ids, dtype) -> torch.Tensor:
    """(B, T) ids → (B, T, H) cached h_{L−k}. Sequences are found as plumbing/fast_logps.py lays them out: packed
    (position_ids restart at 0 for each sequence), right-padded (attention_mask), or one per row. Positions
    outside any sequence get zeros (their outputs are never used); a one-token segment that is not cached is
    packing's filler slot. Any other sequence missing from the cache stops the run."""
    B, T = input_ids.shape
    H = next(iter(states.values())).shape[-1]
    out = torch.zeros((B, T, H), dtype=dtype, device=input_ids.device)
    for b in range(B):
        if position_ids is not None:
            starts = (position_ids[b] == 0).nonzero()[:, 0].tolist() + [T]
            segments = list(zip(starts[:-1], starts[1:]))
        else:
            segments = [(0, int(attention_mask[b].sum()) if attention_mask is not None else T)]
        for s, e in segments:
            key = sequence_key(input_ids[b, s:e].cpu())
            if key in states:
                out[b, s:e] = states[key].to(dtype)
            elif e - s > 1:
                raise UserError(f"a sequence of {e - s} tokens is not in the cached lower-block states: a split model "
                                "scores only the sequences it was built for (no sampling, no other data)")
    return out
