"""Training only the top k blocks of a Llama, on cached outputs of the frozen blocks below (the real-data study).

A *split* model directory is an ordinary `save_pretrained` directory of a Llama with only the top k decoder blocks
(and the final norm and LM head), plus `lower_cache.json`, which names the file holding h_{L−k}, the output of the
frozen lower L−k blocks, for every token sequence the model will be asked to score (keyed by its token ids).
`load_model(dir)` (plumbing/models.py) returns it as a `LowerCachedLlama`: its forward looks up h_{L−k} of each
sequence in the batch and runs the top blocks on it (transformers' `inputs_embeds`).

Exact, not an approximation: a decoder block sees only the hidden states below it and the positions (rotary
embeddings are computed from position_ids, not from the layer), so top_k(h_{L−k}) is the whole model's output up
to floating-point summation order (tests/test_real_data.py checks the log-probs against the whole model).

Why: on 2 CPU cores the forward pass through SmolLM2's 30 blocks is most of a training step, and with the lower
blocks frozen their output is the same in every run of a study. Computed once per data set (`make_split`), it
makes a run's step ~3× cheaper. The embedding matrix (tied to the LM head in SmolLM2) is frozen too: its weight
gradient would cost as much as the top blocks' and move every token's input representation.

What it cannot do: score a sequence that is not in the cache (so no sampling: the study measures KL on held-out
responses), or run the lower blocks (they are not in the directory).
"""

import json
import shutil
from pathlib import Path

import torch

from plumbing.errors import UserError

LOWER_CACHE = "lower_cache.json"  # in a split directory: {"states": file, "lower_layers": L−k, "source": ...}


def is_split(name: str) -> bool:
    return (Path(name) / LOWER_CACHE).is_file()


def sequence_key(ids) -> bytes:
    """The cache key of one token sequence: its ids as int32 bytes."""
    return torch.as_tensor(ids, dtype=torch.int32).numpy().tobytes()


@torch.no_grad()
def lower_states(model, sequences: list[list[int]], lower_layers: int, batch_size: int = 16) -> dict:
    """h_{L−k} (after the first `lower_layers` blocks) of each sequence by the whole model → {key: (len, H) tensor}.
    Right-padded batches: a causal model's states at real positions do not see the padding after them."""
    states = {}
    todo = sorted({sequence_key(s): s for s in sequences}.items(), key=lambda kv: len(kv[1]))  # similar lengths together
    for i in range(0, len(todo), batch_size):
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
    the tokenizer, and h_{L−k} of every sequence in `sequences` (states.pt). → out."""
    from transformers import LlamaForCausalLM

    L = model.config.num_hidden_layers
    if not 0 < top_layers < L:
        raise UserError(f"top_layers must be in [1, {L - 1}] for a model of {L} blocks, got {top_layers}")
    states = lower_states(model, sequences, L - top_layers, batch_size)
    config = model.config.to_dict()
    config.update(num_hidden_layers=top_layers, layer_types=None)
    top = LlamaForCausalLM(type(model.config).from_dict(config)).to(model.dtype)
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
    torch.save(states, tmp / "states.pt")
    (tmp / LOWER_CACHE).write_text(json.dumps({"states": str((out / "states.pt").resolve()), "lower_layers": L - top_layers,
                                               "top_layers": top_layers, "sequences": len(states)}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


_STATES: dict = {}  # states file → its dict, loaded once per process (eval loads policy and reference from one file)


def load(name: str, dtype) -> torch.nn.Module:
    """A split directory → LowerCachedLlama with its cached states; the embedding / LM head frozen."""
    from transformers import LlamaForCausalLM

    class LowerCachedLlama(LlamaForCausalLM):
        """The top blocks of a Llama; `forward(input_ids=...)` runs them on the cached h_{L−k} of each sequence."""

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
            if input_ids is not None:
                inputs_embeds = lookup(self.lower_states, input_ids, attention_mask, position_ids, self.dtype)
            return super().forward(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

        def save_pretrained(self, directory, **kwargs):
            super().save_pretrained(directory, **kwargs)
            (Path(directory) / LOWER_CACHE).write_text(json.dumps(self.lower_cache, indent=2) + "\n")

    info = json.loads((Path(name) / LOWER_CACHE).read_text())
    if info["states"] not in _STATES:
        if not Path(info["states"]).is_file():
            raise UserError(f"{name}: its cached lower-block states {info['states']} are missing (rebuild the split)")
        _STATES.clear()
        _STATES[info["states"]] = torch.load(info["states"])
    model = LowerCachedLlama.from_pretrained(name, dtype=dtype)
    model.lower_states, model.lower_cache = _STATES[info["states"]], info
    model.get_input_embeddings().weight.requires_grad_(False)  # tied to the LM head: both frozen
    return model


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
