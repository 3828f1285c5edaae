"""A training micro-batch makes the host wait for the device nowhere in our code (issue: a step with no host syncs),
checked on a CPU with plumbing/host_sync.py, which records the ops that would sync on a GPU. In process, tiny Llama."""

import pytest
import torch

import betadpo
from plumbing import fast_logps
from plumbing.config import DataArgs
from plumbing.data import collate_pairs, load_pairs, tokenize_pairs
from plumbing.fused_head import LMHeadGivesLogps
from plumbing.host_sync import host_syncs, on_host

# The one sync left, inside transformers (5.x), once per packed forward: masking_utils.find_packed_sequence_indices
# asks whether the rows hold several sequences, `(mask[:, -1] == 0).all()` read by the host. Not ours to change.
TRANSFORMERS_PACKED_CHECK = "transformers/masking_utils.py"


def test_the_detector_sees_each_kind_of_sync_forward_and_backward():
    x = torch.arange(6.0).requires_grad_(True)
    with host_syncs() as found:
        x.sum().item()
        x.detach().tolist()
        bool(x[0] > 0)
        (x > 2).nonzero()
        y = x[x > 2]  # boolean-mask indexing: forward, and its backward's index_put
        y.sum().backward()
        x[torch.tensor([1, 2])].sum()  # integer indexing: no sync
        with on_host():  # work declared to be on host tensors: not recorded
            x.detach().tolist()
    assert [what for what, _ in found] == ["item()/bool()/int()", "tolist()", "item()/bool()/int()", "nonzero()",
                                           "boolean-mask indexing", "boolean-mask indexing"]
    assert all(where.startswith("tests/test_host_sync.py") for _, where in found)


@pytest.mark.parametrize("logps", ["fused", "fast"])
def test_a_training_micro_batch_has_no_host_syncs_in_our_code(tiny_model, monkeypatch, logps):
    """As betadpo.py's loop runs it: the collated batch copied by fast_logps.to_device, policy and reference
    log-probs with β(x)'s prompt perplexity (packed; through the fused LM head or the logits path), the β-DPO loss
    with its filter, backward (the fused head's included). Fails on the code before: tolist() of the lengths,
    boolean-mask indexing in the packing, `logits_to_keep` and the fused head's backward, nonzero() there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = tokenize_pairs(tok, load_pairs(DataArgs(eval_size=0, num_train=4), "train", tok), 64, 32)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).train()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval().requires_grad_(False)
    cfg = betadpo.LossArgs(alpha=0.6, filter_ratio=0.25, ppl_scale=True, learn_scale=True)
    state = betadpo.BetaDPOState(cfg, 0, "cpu")
    batch = fast_logps.to_device(collate_pairs(pairs, tok.pad_token_id), "cpu")
    calls = []
    give_logps = LMHeadGivesLogps.give_logps
    monkeypatch.setattr(LMHeadGivesLogps, "give_logps", lambda self, *a: calls.append(1) or give_logps(self, *a))
    with host_syncs() as found:
        stats = betadpo.pair_logps(policy, reference, batch, logps, with_ppl=True)
        losses, kept, _ = betadpo.betadpo_loss(stats, state, cfg, True)  # one process: its pairs are the batch
        betadpo.process_share(losses, kept, 0, 1).backward()
    assert len(calls) == (2 if logps == "fused" else 0) and kept.sum() == 3  # the paths meant, the filter on
    ours = [f for f in found if TRANSFORMERS_PACKED_CHECK not in f[1]]
    assert not ours, ours
    assert len(found) <= 2  # transformers' check: once per forward (policy, reference)
    assert policy.get_output_embeddings().weight.grad.abs().sum() > 0 and state.c.grad is not None

