"""What one optimizer step does: GRPO's (the default) or supervised fine-tuning's, and the held-out score.

A GRPO step, read top to bottom: sample_groups (a rollout of G completions per prompt, scored with
R1-AQA's rewards; with dynamic sampling, more rounds until enough groups are informative), the
group-relative advantages, the frozen reference's log-probs, then optimizer_step (the
clipped-surrogate + KL loss of grpo.py over every micro-batch, normalised by the global batch, one
AdamW step). An SFT step (sft_step) takes the same questions and trains on the correct answer;
the format-only warm start is the same supervised step with random answers. All the math is in
grpo.py; this file moves the data, the model and the processes around it: each process works on
its share of the global batch (batches.py), and every number that normalises or decides something
is summed over all processes first, so one process computes what two do.

train.py builds the Run and calls these in its loop.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import attention
import batches as B
import data
import evaluate
import grpo
import lora as L
import model as M
import reward

WARM_START_BATCH = 16  # questions per warm-start step, all processes together


def reward_weights(cfg):
    """(accuracy weight, format weight) from --reward-weights, or None if it does not parse."""
    try:
        weights = tuple(float(w) for w in cfg.reward_weights.split(","))
    except ValueError:
        return None
    return weights if len(weights) == 2 and min(weights) >= 0 else None



# -----------------------------------------------------------------------------
# One GRPO step

@dataclass
class Run:
    """Everything a step needs, built once."""
    cfg: object  # train.Config
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # a frozen copy; None with beta 0, or with LoRA (the adapters are switched off)
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train: list
    device: torch.device
    end_ids: list
    pad_id: int
    suppress_ids: list
    counts: dict  # samples seen and unreadable, on this rank
    base: Path  # the model folder the policy was loaded from
    lora: L.LoRASettings | None = None
    pass_rates: list | None = None  # the curriculum's, per training question
    flex_failed: bool = False  # FlexAttention's kernel failed: the dense mask for the rest of the run


@dataclass
class Group:
    """One micro-batch of rollouts with its scores."""
    rollout: grpo.Rollout
    samples: list
    completions: list          # N decoded texts
    rewards: torch.Tensor      # [N]
    accuracy: torch.Tensor     # [N]
    format: torch.Tensor       # [N]
    valid: torch.Tensor        # [N] bool, False = unreadable audio (never trained on)
    lengths: torch.Tensor      # [N] completion tokens, up to and including the first end token
    advantages: torch.Tensor | None = None  # [N]
    ref_logp: torch.Tensor | None = None  # [N, T]
    old_logp: torch.Tensor | None = None  # [N, T]
    # [N] bool, True = in the batch: counted in the loss's scale and in the batch std. The readable rows
    # (valid) until dynamic sampling drops a group. A truncated completion under --mask-truncated stays
    # counted though its mask (what is trained on) is empty, as in TRL.
    counted: torch.Tensor | None = None

    def __post_init__(self):
        if self.counted is None:
            self.counted = self.valid.clone()


def rollout(run, step, positions, samples):
    """Sample and score this rank's groups, micro-batch by micro-batch, with the weights gathered once."""
    cfg, groups = run.cfg, []
    run.policy.eval()  # generation must not run with gradient checkpointing (it would drop the KV cache)
    with M.unsharded(run.policy):
        for pos, batch in zip(B.chunks(positions, cfg.micro_batch), B.chunks(samples, cfg.micro_batch)):
            audios, ok = B.read_audio(batch, cfg.downmix, run.counts)
            inputs = collate(run, batch, audios)
            gens = grpo.prompt_generators(cfg.seed, step, pos, run.device)
            r = grpo.generate_groups(run.policy, inputs, gens, cfg.group_size,
                                     cfg.max_new_tokens, run.end_ids, run.pad_id, run.suppress_ids,
                                     cfg.temperature, cfg.top_k, cfg.top_p)
            groups.append(score(run, r, batch, ok))
    return groups


def score(run, r, samples, ok):
    """Rewards of every completion. Unreadable audio, and with --mask-truncated completions cut off at
    the length limit, are masked out of the loss; only unreadable audio is out of the batch's count."""
    texts = run.processor.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
    answers = [s.answer for s in samples for _ in range(r.group_size)]
    scores = [reward.score(t, a, run.cfg.prompt, *reward_weights(run.cfg)) for t, a in zip(texts, answers)]
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.float32, device=run.device)
    valid = torch.tensor(ok, device=run.device).repeat_interleave(r.group_size)  # [N]
    lengths = r.mask.sum(1)                                                  # [N]
    r.mask &= valid[:, None]                                                 # [N, T]
    if run.cfg.mask_truncated:
        r.mask = grpo.mask_truncated(r.mask, r.completion_ids, run.end_ids)  # [N, T]
    return Group(r, samples, texts, as_tensor([s.total for s in scores]), as_tensor([s.accuracy for s in scores]),
                 as_tensor([s.format for s in scores]), valid, lengths)


def sample_groups(run, step):
    """This rank's groups for the step, and (prompts sampled, groups dropped) over all ranks. With
    --dynamic-sampling R, groups whose rewards are all equal (no policy gradient) are dropped and up to
    R extra rounds of prompts are sampled, until the global batch holds prompts_per_step informative
    groups (DAPO's dynamic sampling, Yu et al., arXiv 2503.14476). Every rank decides from all-reduced
    flags, so all stop together; every round's prompts are a pure function of (seed, step, round)."""
    cfg, P, answers = run.cfg, run.cfg.prompts_per_step, [s.answer for s in run.train]
    positions = B.my_share(list(range(P)), dist.get_rank(), dist.get_world_size())
    groups, informative = [], []
    for extra in range(cfg.dynamic_sampling + 1):
        indices = B.step_indices(cfg, answers, step, extra, run.pass_rates)
        new = rollout(run, step, [extra * P + p for p in positions], [run.train[indices[p]] for p in positions])
        flags = torch.zeros(P, device=run.device)                             # [P] over all ranks
        flags[positions] = torch.cat([grpo.informative_groups(g.rewards, cfg.group_size).float() for g in new])
        groups, informative = groups + new, informative + [all_sum(flags)]
        if not cfg.dynamic_sampling or torch.cat(informative).sum() >= P:
            break
    if not cfg.dynamic_sampling:
        return groups, P, 0
    keep = torch.cat(informative).bool()                                      # [rounds * P]
    keep &= keep.cumsum(0) <= P                                               # the first P informative groups
    mine = torch.cat([keep[r * P:(r + 1) * P][positions] for r in range(len(informative))])  # this rank's prompts
    sizes = [len(g.rewards) // cfg.group_size for g in groups]                # prompts per micro-batch, by round
    for g, kept in zip(groups, mine.split(sizes)):
        rows = kept.repeat_interleave(cfg.group_size)                         # [N]
        g.rollout.mask &= rows[:, None]
        g.counted &= rows
    return groups, len(informative) * P, len(informative) * P - int(keep.sum())


def train_step(run, step):
    cfg, world = run.cfg, dist.get_world_size()
    t0 = time.time()
    sampled_groups, sampled, dropped = sample_groups(run, step)
    per_round = len(B.chunks(B.my_share(range(cfg.prompts_per_step), 0, world), cfg.micro_batch))
    stats = rollout_stats(run, sampled_groups[:per_round])  # the step's own prompts, before any is dropped
    groups = trained_groups(run, sampled_groups)
    set_advantages(run, sampled_groups)  # all: a micro-batch with nothing to train on may still count (truncated)
    with torch.no_grad():
        flex_or_dense(run, lambda: fixed_logprobs(run, groups))
    if run.ref is not None:
        M.reshard(run.ref)  # it never runs backward, which is where FSDP would free its root units
    denominator = loss_denominator(run, sampled_groups)
    run.policy.train()
    skipped = 0
    for _ in range(cfg.num_iterations):
        losses = optimizer_step(run, groups, denominator)  # the metrics of the last pass are logged
        skipped += losses["skipped"]
    stats.update(losses, skipped=skipped, prompts_sampled=sampled, groups_dropped=dropped)
    metrics = {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}
    return metrics, sample_records(run, sampled_groups, step + 1)


def fixed_logprobs(run, groups):
    """The log-probs the loss holds fixed: the reference's, and with mu > 1 the policy's as it sampled."""
    for g in groups:
        if run.cfg.beta:
            g.ref_logp = reference_logprobs(run, g.rollout)
        if run.cfg.num_iterations > 1:  # with mu = 1 it is logp.detach()
            g.old_logp = logprobs(run, run.policy, g.rollout)


def trained_groups(run, groups):
    """The micro-batches that go through the policy pass: all of them, but with dynamic sampling only
    those in which some rank trains on a completion (of a kept group, not truncated). Every rank keeps
    the same micro-batch slots, so each runs the same number of forwards and backwards (FSDP's
    collectives line up)."""
    if not run.cfg.dynamic_sampling:
        return groups
    used = all_sum(torch.stack([g.rollout.mask.any().float() for g in groups]))  # [micro-batches] over ranks
    return [g for g, n in zip(groups, used.tolist()) if n > 0]


def set_advantages(run, groups):
    """Group-relative advantages; with --advantage-scale batch, the std of every counted reward of the
    global batch (a truncated completion's too, as TRL's; summed over ranks, so one process equals two).
    Samples not trained on get 0."""
    cfg, batch_std = run.cfg, None
    trained = [g.rollout.mask.any(1) for g in groups]                                  # [N] each
    if cfg.advantage_scale == "batch":
        sums = sum(grpo.reward_sums(g.rewards[g.counted]) for g in groups)             # [3]
        batch_std = grpo.reward_std(all_sum(sums))
    for g, t in zip(groups, trained):
        g.advantages = grpo.group_advantages(g.rewards, cfg.group_size, cfg.advantage_scale, batch_std) * t


def collate(run, samples, audios):
    """The model's batch for these samples, asked the run's way (prompt, word limit, system turn)."""
    cfg = run.cfg
    return M.collate(run.processor, samples, audios, cfg.prompt, cfg.system_prompt or None,
                     cfg.think_words).to(run.device)


def reference_logprobs(run, rollout):
    """Log-probs under the frozen reference: its own sharded copy, or with LoRA the policy itself with
    its adapters switched off (the base model, with no second copy of the weights)."""
    if run.ref is not None:
        return logprobs(run, run.ref, rollout)
    with L.adapters_disabled(run.policy):
        return logprobs(run, run.policy, rollout)


def logprobs(run, model, rollout, temperature=None):
    """grpo.completion_logprobs with the run's temperature and attention: FlexAttention on a GPU, the dense
    mask on a CPU, with --dense-attention, or once FlexAttention has failed (flex_or_dense); over the
    tokens sampling can draw (not run.suppress_ids)."""
    flex = False if run.cfg.dense_attention or run.flex_failed else None
    temperature = run.cfg.temperature if temperature is None else temperature
    return grpo.completion_logprobs(model, rollout, run.pad_id, temperature, flex, suppress_ids=run.suppress_ids)


def flex_or_dense(run, passes):
    """passes(): the packed forwards (and backwards) of one step. If FlexAttention's kernel fails in them
    on any process (compiling, forward or backward), every process switches to the dense mask for the
    rest of the run and redoes the whole of passes() from zeroed gradients: a failure in a later
    micro-batch leaves earlier ones' gradients added. The verdict is all-reduced, so the processes
    redo it together and FSDP's collectives stay paired (a kernel failing on one process only, midway
    through a collective, still hangs them). Returns what passes() returns."""
    if run.cfg.dense_attention or run.flex_failed or not attention.flex_default(run.device):
        return passes()
    result, failure = None, None
    try:
        result = passes()
    except attention.KERNEL_ERRORS as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        failure = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    if not all_sum(torch.tensor([float(failure is not None)], device=run.device)).item():
        return result
    M.print0(f"FlexAttention failed ({failure or 'on another process'}); redoing the step with the dense mask, "
             f"used for the rest of the run (--dense-attention uses it from the start)")
    run.flex_failed = True
    for model in (run.policy, run.ref):
        if model is not None:
            M.reset_after_error(model)
    return passes()


def loss_denominator(run, groups):
    """Normalise by the whole global batch, not per micro-batch or per rank: its counted sequences (a
    truncated one too, as TRL's mean over rows), its trained tokens, or counted sequences x
    max_new_tokens (grpo.aggregate). FSDP averages gradients over ranks, so each rank divides by
    (global count / world size)."""
    cfg = run.cfg
    rows = sum(g.counted.sum() for g in groups)
    local = {"sequence_mean": rows, "token_mean": sum(g.rollout.mask.sum() for g in groups),
             "token_sum": rows * cfg.max_new_tokens}[cfg.loss_aggregation]
    return all_sum(torch.stack([torch.as_tensor(local, device=run.device).float()]))[0].clamp(min=1) / dist.get_world_size()


def optimizer_step(run, groups, denominator):
    """Accumulate the loss over micro-batches, clip, and step (or skip on a non-finite norm)."""
    cfg = run.cfg
    sums = flex_or_dense(run, lambda: accumulate(run, groups, denominator))
    grad_norm, finite = clip_and_step(run.policy, run.optimizer, cfg.grad_clip)
    if finite:  # a skipped update leaves the schedule where it is (as transformers' Trainer does)
        run.scheduler.step()
    kl, clip, low, high, tokens = all_sum(sums).tolist()
    tokens = max(tokens, 1)
    return {"kl": kl / tokens, "clip_frac": clip / tokens, "clip_frac_low": low / tokens,
            "clip_frac_high": high / tokens, "grad_norm": grad_norm, "skipped": int(not finite)}


def accumulate(run, groups, denominator):
    """The GRPO loss's backward, micro-batch by micro-batch; returns this rank's metric sums [5]."""
    cfg, sums = run.cfg, torch.zeros(5, device=run.device)
    for g in groups:
        logp = logprobs(run, run.policy, g.rollout)                                       # [N, T]
        old = logp.detach() if g.old_logp is None else g.old_logp
        loss, m = grpo.grpo_loss(logp, old, g.ref_logp, g.advantages, g.rollout.mask, cfg.beta, cfg.clip_low,
                                 cfg.clip_high, cfg.loss_aggregation, denominator, cfg.ratio_level)
        loss.backward()
        sums += torch.stack([m[k] * m["tokens"] for k in ("kl", "clip_frac", "clip_frac_low", "clip_frac_high")]
                            + [m["tokens"]])
    return sums


def clip_and_step(model, optimizer, max_norm):
    """Clip the accumulated gradients and step; a non-finite norm (it is global, so every rank sees the
    same value) skips the update on all ranks. Returns (grad norm, whether the step was taken)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(model), max_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item(), finite


def rollout_stats(run, groups):
    """Means over the global batch of readable samples: what the policy does, before any is dropped."""
    G = run.cfg.group_size
    rows = []
    for g in groups:
        valid = g.valid.float()                                         # [N]
        zero_std = (g.rewards.view(-1, G).std(1) == 0).float().repeat_interleave(G)  # [N]
        rows.append(torch.stack([valid, g.rewards * valid, g.accuracy * valid, g.format * valid,
                                 g.lengths * valid, zero_std * valid]).sum(1))
    n, rew, acc, fmt, length, zero = all_sum(torch.stack(rows).sum(0)).tolist()
    n = max(n, 1)
    return {"reward": rew / n, "accuracy": acc / n, "format": fmt / n, "completion_len": length / n,
            "frac_zero_std": zero / n}


def all_sum(x):
    dist.all_reduce(x)
    return x


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Supervised steps: SFT (--algo sft) and the format warm start, on the same packed forward as GRPO

def sft_step(run, step):
    """Supervised fine-tuning on the questions GRPO would see at this step: the target is the correct
    choice in the prompt's format (data.target_text), then the end token."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    indices = B.step_indices(cfg, [s.answer for s in run.train], step, pass_rates=run.pass_rates)
    batch = B.my_share([run.train[i] for i in indices], rank, world)
    targets = [data.target_text(s.answer, cfg.prompt) + M.END_TOKENS[0] for s in batch]
    run.policy.train()
    stats = supervised_step(run, run.optimizer, batch, targets, run.counts)
    if not stats["skipped"]:  # a skipped update leaves the schedule where it is
        run.scheduler.step()
    return {"step": step + 1, **stats, "lr": run.scheduler.get_last_lr()[0], "seconds": time.time() - t0}, []


def supervised_step(run, optimizer, samples, targets, counts=None):
    """One optimizer step of cross-entropy on the target texts of this rank's share of a global batch,
    micro-batch by micro-batch (as GRPO's steps, so the forwards are the same on 1 process as on 2).
    The loss is the sum of -log p over the global batch's target tokens over their number (grpo.sft_loss).
    Logged: that loss, and p(answer), the mean probability of a whole target."""
    batches = [teacher_forced(run, s, t, counts) for s, t in zip(B.chunks(samples, run.cfg.micro_batch),
                                                                 B.chunks(targets, run.cfg.micro_batch))]
    tokens = all_sum(sum(r.mask.sum() for r in batches).float()) / dist.get_world_size()
    sums = flex_or_dense(run, lambda: supervised_passes(run, batches, tokens))
    grad_norm, finite = clip_and_step(run.policy, optimizer, run.cfg.grad_clip)
    nll, prob, n = all_sum(sums).tolist()
    return {"loss": nll / max(float(tokens) * dist.get_world_size(), 1), "answer_prob": prob / max(n, 1),
            "grad_norm": grad_norm, "skipped": int(not finite)}


def supervised_passes(run, batches, tokens):
    """The cross-entropy's backward, micro-batch by micro-batch; returns this rank's metric sums [3]."""
    sums = torch.zeros(3, device=run.device)
    for r in batches:
        logp = logprobs(run, run.policy, r, temperature=1.0)                      # [B, T] targets: no temperature
        loss, m = grpo.sft_loss(logp, r.mask, tokens)
        loss.backward()
        sums += torch.stack([m["nll"] * m["tokens"], m["answer_prob"] * m["sequences"], m["sequences"]])
    return sums


def teacher_forced(run, samples, targets, counts=None):
    """A Rollout whose completions are given texts (group size 1), for supervised log-probs. A sample
    with unreadable audio keeps its place with silence and an empty mask."""
    audios, ok = B.read_audio(samples, run.cfg.downmix, counts)
    inputs = collate(run, samples, audios)
    ids = run.processor.tokenizer(targets, add_special_tokens=False, padding="longest", padding_side="right",
                                  return_tensors="pt")["input_ids"].to(run.device)
    prompts = [row[m.bool()] for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    mask = grpo.completion_mask(ids, run.end_ids) & torch.tensor(ok, device=run.device)[:, None]
    return grpo.Rollout(prompts, inputs["input_features"], inputs["feature_attention_mask"], ids, mask, group_size=1)


def warm_start(run, steps, lr, questions=()):
    """Teach a random model the answer format before RL. Format only (no questions): the training
    questions with `<answer>{a random choice}</answer>`; it then starts GRPO at chance accuracy, but
    has learned that the answer does not depend on the audio. With questions (--warm-start-data): their
    CORRECT answers, the audio encoder frozen, so the model learns to read the audio for another
    question, as a pretrained base has, and its encoder keeps what it separates (README). The questions
    and random answers are drawn for the whole global batch before each process takes its share, so
    the warm start, like everything after it, does not depend on the number of processes."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    rng, pool = np.random.default_rng(cfg.seed), questions or run.train
    frozen = [p for p in run.policy.model.audio_tower.parameters() if p.requires_grad] if questions else []
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(trainable(run.policy), lr=lr, weight_decay=0.0)
    run.policy.train()
    for _ in tqdm(range(steps), desc="warm start" + ("" if questions else " (format only)"), disable=rank != 0):
        batch = [pool[i] for i in rng.choice(len(pool), WARM_START_BATCH)]
        answers = [s.answer for s in batch] if questions else [rng.choice(s.choices) for s in batch]
        targets = [data.target_text(a, cfg.prompt) + M.END_TOKENS[0] for a in answers]
        supervised_step(run, opt, B.my_share(batch, rank, world), B.my_share(targets, rank, world))
    for p in frozen:
        p.requires_grad_(True)


@torch.no_grad()
def heldout(run, samples):
    """The held-out questions scored as evaluate.py scores a checkpoint: greedy completions from its
    generate (the checkpoint's generation settings), MMAU's string match on the first answer tag, per
    category too; plus the rate of completions in the prompt's format. The questions go in evaluate.py's
    fixed batches of --micro-batch, dealt round-robin, so every question is scored exactly once whatever the
    number of ranks; shares may differ by a batch, which is safe: inside model.unsharded a forward issues no
    collective, so ranks may decode different numbers of batches (or none)."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    run.policy.eval()
    records = []
    with M.unsharded(run.policy):
        for batch in B.chunks(list(enumerate(samples)), cfg.micro_batch)[rank::world]:
            audios, _ = B.read_audio([s for _, s in batch], cfg.downmix)
            texts = evaluate.generate(run.policy, run.processor, [s for _, s in batch], audios, cfg.prompt,
                                      cfg.max_new_tokens, cfg.system_prompt or None, cfg.think_words)
            records += [evaluate.output_record(s, evaluate.Prediction(i, t, reward.extract_answer(t)))
                        for (i, s), t in zip(batch, texts)]
    everyone = [None] * world
    dist.all_gather_object(everyone, records)
    records = [r for part in everyone for r in part]
    s = evaluate.score(records, "model_prediction")
    groups = {f"{field}={value}": t.accuracy / 100 for field, tallies in s.groups.items() for value, t in tallies.items()}
    nll = {} if cfg.prompt == "think" else {"eval_answer_nll": answer_nll(run, samples)}
    return {"eval_accuracy": s.total.accuracy / 100, "eval_format":
            sum(reward.format_reward(r["model_output"], cfg.prompt) for r in records) / max(len(records), 1),
            "eval_questions": s.total.total, "eval_groups": groups, **nll}


@torch.no_grad()
def answer_nll(run, samples):
    """The mean over questions of -log p(the correct answer's whole target | the prompt): where greedy
    accuracy stays flat, and the per-token loss is diluted by the format's easy tokens, this still moves
    (log 4 = 1.39 for a policy in format that spreads its mass evenly over four choices)."""
    cfg, rank, world = run.cfg, dist.get_rank(), dist.get_world_size()
    sums = torch.zeros(2, device=run.device)
    for batch in B.chunks(B.my_share(samples, rank, world), cfg.micro_batch):
        targets = [data.target_text(s.answer, cfg.prompt) + M.END_TOKENS[0] for s in batch]
        r = teacher_forced(run, batch, targets)
        logp = logprobs(run, run.policy, r, temperature=1.0)                   # [B, T]
        sums += torch.stack([-(logp * r.mask).sum(), r.mask.any(1).sum().float()])
    nll, n = all_sum(sums).tolist()
    return nll / max(n, 1)


def sample_records(run, groups, step):
    g = groups[0]
    return [{"step": step, "question": g.samples[i // g.rollout.group_size].question,
             "answer": g.samples[i // g.rollout.group_size].answer, "completion": g.completions[i],
             "reward": g.rewards[i].item()} for i in range(min(run.cfg.log_samples, len(g.completions)))]
