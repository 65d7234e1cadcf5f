"""One group laid open: a checkpoint samples G completions of one training question, and every number of
its GRPO loss is printed: each completion's rewards and advantage, and each token's probability under the
policy and the reference, the ratio, the KL term and its share of the loss. Every number comes from
grpo.py's own functions; the shares are grpo_loss's terms, and they sum to its value (checked here).
With one update per rollout the ratio is exactly 1; --num-iterations 2 takes one AdamW step on this group's
loss and shows a second pass, where it is not and the clip can bind.
    python -m workshop.inspect runs/demo/checkpoint-600 [--question 3] [--num-iterations 2] [--tokens 4]
The reference is the run's checkpoint-0 when CHECKPOINT is a checkpoint-N beside one, else CHECKPOINT.
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import grpo
import model as M
import reward

PROMPT = "answer"  # R1-AQA's training prompt, and the one reward.score checks the format of
CLIP = 0.2         # R1-AQA's clip range (train.py's --clip-low / --clip-high)
TOP_K = 50         # train.py's default --top-k (its --top-p is 1: off)


def parse_args(argv=None):
    """The flags; a value out of range is a UsageError naming its flag."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the policy: a model folder, e.g. a run's checkpoint-N")
    p.add_argument("--reference", default=None, help="the reference model folder (default: see above)")
    p.add_argument("--data", default="runs/synthetic/train.jsonl", help="training questions (the demo's by default)")
    p.add_argument("--question", type=int, default=0, help="which question of --data (0 = the first)")
    p.add_argument("--group-size", type=int, default=8, help="completions sampled (G)")
    p.add_argument("--seed", type=int, default=0, help="seeds the group's sampler")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also divides the logits)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest completion")
    p.add_argument("--beta", type=float, default=0.1, help="KL weight (the demo's 0.1); 0: no reference")
    p.add_argument("--num-iterations", type=int, default=1, help="passes over the group, one AdamW step between two")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW's learning rate for --num-iterations > 1 (the demo's; 1e-2 binds the clip more)")
    p.add_argument("--tokens", type=int, default=0, help="tokens shown per completion (0 = all)")
    args = p.parse_args(argv)
    for ok, flag, rule in ((args.group_size >= 2, "--group-size", "must be >= 2"),
                           (args.temperature > 0, "--temperature", "must be > 0"),
                           (args.max_new_tokens >= 1, "--max-new-tokens", "must be >= 1"),
                           (args.beta >= 0, "--beta", "must be >= 0"), (args.lr > 0, "--lr", "must be > 0"),
                           (args.num_iterations >= 1, "--num-iterations", "must be >= 1"),
                           (args.tokens >= 0, "--tokens", "must be >= 0"),
                           (args.question >= 0, "--question", "must be >= 0")):
        if not ok:
            raise M.UsageError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: {rule}")
    return args


def reference_dir(checkpoint, given=None):
    """--reference if given; else the run's checkpoint-0 beside a checkpoint-N, else the checkpoint itself."""
    if given is not None:
        return M.check_model_dir(given, "--reference")
    checkpoint = Path(checkpoint)
    first = checkpoint.parent / "checkpoint-0"
    if re.fullmatch(r"checkpoint-\d+", checkpoint.name) and (first / "config.json").is_file():
        return first
    return checkpoint


def load_question(path, index):
    """The index-th question of a question file and its decoded audio; a UsageError naming what is wrong."""
    try:
        samples = data.read_samples(path)
    except data.DataError as e:
        hint = "" if Path(path).exists() else " (`python train.py` builds the demo's task in runs/synthetic/)"
        raise M.UsageError(f"--data {e}{hint}") from None
    if index >= len(samples):
        raise M.UsageError(f"--question {index}: {path} has {len(samples)} questions (0 to {len(samples) - 1})")
    try:
        return samples[index], data.load_audio(samples[index].audio_path)
    except data.AudioError as e:
        raise M.UsageError(f"--question {index}: {e}") from None


@dataclass
class Group:
    """One question's group, sampled and scored."""
    sample: data.Sample
    rollout: grpo.Rollout
    texts: list                # G decoded completions, special tokens skipped
    rewards: list              # G reward.Reward
    advantages: torch.Tensor   # [G] grpo.group_advantages of the totals


def sample_group(policy, processor, sample, audio, args):
    """G completions of the question by grpo.generate_groups, as train.py samples them (top-k 50), scored
    by reward.score with the answer prompt, and their advantages by grpo.group_advantages."""
    tok = processor.tokenizer
    batch = M.collate(processor, [sample], [audio], PROMPT)
    generators = grpo.prompt_generators(args.seed, 0, [args.question])
    rollout = grpo.generate_groups(policy, batch, generators, args.group_size, args.max_new_tokens,
                                   M.end_token_ids(tok), tok.pad_token_id,
                                   M.suppressed_token_ids(tok, policy.config.text_config.vocab_size),
                                   args.temperature, TOP_K)
    texts = tok.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    rewards = [reward.score(t, sample.answer, PROMPT) for t in texts]
    totals = torch.tensor([r.total for r in rewards])                      # [G]
    return Group(sample, rollout, texts, rewards, grpo.group_advantages(totals, args.group_size))


@dataclass
class Pass:
    """One pass of grpo_loss over the group; per token [G, T], 0 (False) off the mask."""
    logp: torch.Tensor         # log-prob under the policy now
    old_logp: torch.Tensor     # ... under the policy that sampled (logp itself on the first pass)
    ref_logp: torch.Tensor | None  # ... under the reference (None with beta 0)
    ratio: torch.Tensor        # exp(logp - old_logp)
    kl: torch.Tensor           # grpo.k3_kl(logp, ref_logp)
    share: torch.Tensor        # the token's share of the loss: all of them sum to loss
    clipped: torch.Tensor      # bool: grpo.clipped_surrogate's clip binds
    loss: float                # grpo.grpo_loss's value
    metrics: dict              # grpo.grpo_loss's metrics


def token_shares(logp, old_logp, ref_logp, advantages, mask, beta, clip=CLIP):
    """grpo_loss taken apart by its own pieces: a token's share is (clipped_surrogate + beta * k3_kl) / its
    completion's length / N, so the shares sum to grpo_loss (mean of per-sequence means). Returns the
    ratio, the KL, the shares and where the clip binds, [N, T] each, 0 / False off the mask."""
    m = mask.float()                                                       # [N, T]
    ratio = torch.exp(logp - old_logp)                                     # [N, T] as grpo_loss forms it
    surrogate, binds = grpo.clipped_surrogate(ratio, advantages, clip, clip)  # [N, T], [N, T]
    kl = grpo.k3_kl(logp, ref_logp) if beta != 0 else torch.zeros_like(logp)  # [N, T]
    share = (surrogate + beta * kl) * m / m.sum(1, keepdim=True).clamp(min=1) / m.size(0)  # [N, T]
    return ratio * m, kl * m, share, binds & mask


def loss_pass(logp, old_logp, ref_logp, group, beta):
    """grpo.grpo_loss on the group (its graph kept for a step), and the Pass it lays open."""
    mask = group.rollout.mask
    loss, metrics = grpo.grpo_loss(logp, old_logp, ref_logp, group.advantages, mask, beta=beta, clip=CLIP)
    d = lambda x: None if x is None else x.detach()
    ratio, kl, share, clipped = token_shares(d(logp), old_logp, d(ref_logp), group.advantages, mask, beta)
    torch.testing.assert_close(share.sum(), loss.detach(), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"the token shares do not sum to grpo_loss: {m}")
    return loss, Pass(d(logp), old_logp, d(ref_logp), ratio, kl, share, clipped, loss.item(), metrics)


def lay_open(policy, processor, reference, sample, audio, args):
    """Sample the group with the policy and run --num-iterations passes of grpo_loss over it, one AdamW step
    on the group's loss between two passes. Pass 1's old_logp is its own logp.detach() (train.py with one
    update per rollout: the ratio is exactly 1); later passes keep pass 1's, as train.py does with more.
    reference: a frozen model, or None with beta 0. Changes the policy's weights when num_iterations > 1."""
    group = sample_group(policy.eval(), processor, sample, audio, args)
    pad_id, rollout, temperature = processor.tokenizer.pad_token_id, group.rollout, args.temperature
    suppress = M.suppressed_token_ids(processor.tokenizer, policy.config.text_config.vocab_size)  # as training
    logprobs = lambda model: grpo.completion_logprobs(model, rollout, pad_id, temperature, suppress)  # [G, T]
    with torch.no_grad():
        ref_logp = logprobs(reference) if args.beta else None
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    passes = []
    for i in range(args.num_iterations):
        logp = logprobs(policy)  # [G, T] with grad
        loss, laid_open = loss_pass(logp, passes[0].logp if passes else logp.detach(), ref_logp, group, args.beta)
        passes.append(laid_open)
        if i + 1 < args.num_iterations:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return group, passes


# -----------------------------------------------------------------------------
# The screen

def group_table(group):
    """One line per completion: its rewards, advantage, length and text."""
    r, lengths = group.rewards, group.rollout.mask.sum(1).tolist()
    lines = [" #  accuracy format total advantage tokens  completion"]
    for i, text in enumerate(group.texts):
        shown = repr(text) if len(repr(text)) <= 48 else repr(text)[:45] + "..."
        lines.append(f"{i:>2} {r[i].accuracy:>9.0f} {r[i].format:>6.0f} {r[i].total:>5.0f} "
                     f"{group.advantages[i].item():>+9.3f} {lengths[i]:>6}  {shown}")
    totals = torch.tensor([x.total for x in r])
    lines.append(f"advantage = (total - group mean {totals.mean():.3f}) / (group std {totals.std():.3f} + 1e-4)"
                 + ("   all equal: every advantage is 0, only the KL trains" if totals.std() == 0 else ""))
    return lines


def pass_notes(group, passes, args):
    """What each pass's ratio and clip did, and the loss: the sum of the shares."""
    first, mask = passes[0], group.rollout.mask
    lines = [f"pass 1: loss {first.loss:+.6f} = the sum of the token shares (grpo.grpo_loss). The ratio is exactly 1 "
             "on every token:", "  with one update per rollout old_logp is logp.detach(), so the clip never binds. A "
             "token's share is", "  (-A + beta KL)/n/N (n: its completion's tokens); the -A/n/N sum to -mean(A) = 0, so "
             "the loss is the KL part,", "  but each token's gradient is -A/n/N grad log p + beta/n/N grad KL."]
    for i, p in enumerate(passes[1:], 2):
        on = p.ratio[mask]                                                 # [tokens]
        lines += [f"pass {i} (after {i - 1} AdamW step{'s' * (i > 2)}, lr {args.lr:g}): loss {p.loss:+.6f}, ratio "
                  f"{on.min():.4f} to {on.max():.4f}; the clip binds (*) where", f"  A > 0 and ratio > {1 + CLIP:g} "
                  f"or A < 0 and ratio < {1 - CLIP:g}: on {int(p.clipped.sum())} of {int(p.metrics['tokens'])} tokens"]
    return lines


def token_lines(group, p, tokenizer, i, limit, show_old):
    """Completion i's tokens in pass p, one a line (show_old: with p_old); past the limit, one line for the rest."""
    n = int(group.rollout.mask[i].sum())
    prob = lambda x, j: "-" if x is None else f"{x[i, j].exp():.4f}"
    lines = [f"completion {i}  A {group.advantages[i]:+.3f}  {n} tokens  shares {p.share[i].sum():+.6f}"]
    for j in range(n if limit == 0 else min(n, limit)):
        text = repr(tokenizer.decode([int(group.rollout.completion_ids[i, j])]))
        old = f"{prob(p.old_logp, j):>8}" if show_old else ""
        lines.append(f"  {j:>3} {text:<16} {prob(p.logp, j):>8}{old} {prob(p.ref_logp, j):>8} {p.ratio[i, j]:>7.4f} "
                     f"{p.kl[i, j]:>9.6f} {p.share[i, j]:>+10.6f}{' *' if p.clipped[i, j] else ''}")
    if limit and n > limit:
        lines.append(f"  ... {n - limit} more tokens, shares {p.share[i, limit:].sum():+.6f}")
    return lines


def render(group, passes, tokenizer, args, header=()):
    """The whole screen: the header, the group, the passes, and the last pass token by token (a completion
    with the same tokens as an earlier one has the same numbers: one line)."""
    s, last, ids, mask = group.sample, passes[-1], group.rollout.completion_ids, group.rollout.mask
    lines = [*header, f"question {args.question}: {s.question} {s.choices}   answer: {s.answer!r}", ""]
    lines += group_table(group) + [""] + pass_notes(group, passes, args) + [""]
    old = f"{'p_old':>8}" if len(passes) > 1 else ""
    lines += [f"pass {len(passes)}, token by token (share: the token's term of the loss)",
              f"  {'#':>3} {'token':<16} {'p_policy':>8}{old} {'p_ref':>8} {'ratio':>7} {'KL (k3)':>9} {'share':>10}"]
    first = {}
    for i in range(len(group.texts)):
        k = first.setdefault(tuple(ids[i][mask[i]].tolist()), i)
        lines += token_lines(group, last, tokenizer, i, args.tokens, len(passes) > 1) if k == i else \
            [f"completion {i}  the same tokens as completion {k}, the same numbers"]
    return "\n".join(lines)


def main(argv=None):
    """Load the policy (and the reference, unless it is the policy's own folder), lay the group open, print."""
    args = parse_args(argv)
    policy_dir = M.check_model_dir(args.checkpoint, "CHECKPOINT")
    ref_dir = reference_dir(policy_dir, args.reference)
    sample, audio = load_question(args.data, args.question)
    policy, processor = M.load(policy_dir, dtype=torch.float32)
    reference = None
    if args.beta:  # the reference's log-probs are taken before any step, so the policy itself can serve
        same = Path(ref_dir).resolve() == Path(policy_dir).resolve()
        reference = policy if same else M.load(ref_dir, dtype=torch.float32)[0].eval()
    group, passes = lay_open(policy, processor, reference, sample, audio, args)
    header = [f"policy {policy_dir}   reference {ref_dir if args.beta else '- (beta 0)'}",
              f"G {args.group_size}, beta {args.beta:g}, clip {CLIP}, temperature {args.temperature:g}, "
              f"top-k {TOP_K}, seed {args.seed}, --data {args.data}"]
    print(render(group, passes, processor.tokenizer, args, header))


if __name__ == "__main__":
    M.run_main(main)
