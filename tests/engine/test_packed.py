"""engine/packed.py: one packed forward per group [prompt, c_1, ..., c_G] gives the log-probs of
grpo.completion_logprobs (each completion alone after its prompt) and of the model's own forward."""

import torch

import grpo
from engine import packed
from test_grpo import naive_logprobs, rollout_for


def test_packed_logprobs_equal_the_plain_ones_and_separate_forwards(tiny):
    """3 prompts of different audio lengths (left padding), G = 4 completions of several lengths: the packed
    log-probs equal grpo.py's plain ones and G separate forwards of the model, to 1e-5 in fp32, and are 0
    where the mask is False."""
    model, _ = tiny
    rollout = rollout_for(tiny, n_prompts=3, G=4, max_new_tokens=10)
    assert len(set(rollout.mask.sum(1).tolist())) > 1, "want completions of several lengths"
    with torch.no_grad():
        fast = packed.completion_logprobs(model, rollout, pad_id=0)
        plain = grpo.completion_logprobs(model, rollout, pad_id=0)
        naive = naive_logprobs(model, rollout)
    assert (fast - plain).abs().max() <= 1e-5 and (fast - naive).abs().max() <= 1e-5
    assert (fast[~rollout.mask] == 0).all()


def test_packed_logprobs_depend_on_the_audio(tiny):
    """Other audio features give other numbers (so the equality above is not vacuous)."""
    model, _ = tiny
    rollout = rollout_for(tiny, n_prompts=1, G=2)
    with torch.no_grad():
        a = packed.completion_logprobs(model, rollout, pad_id=0)
        rollout.input_features = rollout.input_features.flip(-1)
        b = packed.completion_logprobs(model, rollout, pad_id=0)
    assert (a - b).abs().max() > 1e-3


def test_pack_groups_by_hand():
    """Prompt [7, 8], G = 2 completions [1, 2 | pad] (length 2) and [3 | pad, pad] (length 1): the row is
    [7, 8, 1, 2, 3], positions restart after the prompt [0, 1, 2, 3, 2], segments [0, 0, 1, 1, 2]; token j
    of completion 1 is predicted by flat index [1, 2] (the prompt's last state, then its own token 0), of
    completion 2 by [1] (the prompt's last state)."""
    r = grpo.Rollout([torch.tensor([7, 8])], torch.zeros(1, 1, 1), torch.ones(1, 1),
                     torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool), 2)
    p = packed.pack_groups(r, pad_id=0)
    assert p.input_ids.tolist() == [[7, 8, 1, 2, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert p.segments.tolist() == [[0, 0, 1, 1, 2]]
    assert p.source.tolist() == [[1, 2, 0], [1, 0, 0]]
