"""Supervised fine-tuning (--algo sft) and LoRA through train.py: the SFT loss against a cross-entropy
computed independently, what an SFT and a LoRA run log and write, the LoRA reference, and the
checkpoints a LoRA run leaves (adapters every time, merged weights at the end)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen2AudioForConditionalGeneration

import data
import grpo
import lora as L
import model as M
import batches as B
import train as T
from conftest import pitch_samples, quick_args


@pytest.fixture(autouse=True)
def no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def slow_cross_entropy(model, processor, samples, audios, targets, prompt="answer"):
    """The reference: one plain forward of [prompt, target] per sample through the model's own forward
    (logits at every position), F.cross_entropy summed over the target tokens, over their number."""
    total, count = 0.0, 0
    for sample, audio, target in zip(samples, audios, targets):
        batch = M.collate(processor, [sample], [audio], prompt)
        ids = processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        seq = torch.cat([batch["input_ids"][0], ids])[None]
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), input_features=batch["input_features"],
                       feature_attention_mask=batch["feature_attention_mask"]).logits[0]
        P = batch["input_ids"].shape[1]
        total += F.cross_entropy(logits[P - 1:P - 1 + len(ids)].float(), ids, reduction="sum").item()
        count += len(ids)
    return total / count


def test_sft_loss_equals_an_independent_cross_entropy(tiny):
    """grpo.sft_loss over completion_logprobs (packed, lm_head only at target positions) = the mean
    cross-entropy of the target tokens from separate full forwards, to 1e-5 in fp32. Targets of
    different lengths (very low / high), the end token included."""
    model, processor = tiny
    samples, audios = pitch_samples(3)
    targets = [data.target_text(s.answer) + "<|im_end|>" for s in samples]
    batch = M.collate(processor, samples, audios)
    ids = processor.tokenizer(targets, add_special_tokens=False, padding="longest", padding_side="right",
                              return_tensors="pt")["input_ids"]
    tok = processor.tokenizer
    rollout = grpo.Rollout([row[m.bool()] for row, m in zip(batch["input_ids"], batch["attention_mask"])],
                           batch["input_features"], batch["feature_attention_mask"], ids,
                           grpo.completion_mask(ids, M.end_token_ids(tok)), group_size=1)
    assert len(set(rollout.mask.sum(1).tolist())) > 1
    with torch.no_grad():
        loss, m = grpo.sft_loss(grpo.completion_logprobs(model, rollout, tok.pad_token_id), rollout.mask)
    expected = slow_cross_entropy(model, processor, samples, audios, targets)
    assert abs(loss.item() - expected) < 1e-5 and abs(m["nll"].item() - expected) < 1e-5
    assert m["tokens"].item() == rollout.mask.sum().item() and m["sequences"].item() == 3


def test_sft_targets_follow_the_prompt():
    """direct: the choice itself; answer: in tags; think: refused (no reasoning to imitate)."""
    assert data.target_text("very low", "direct") == "very low"
    assert data.target_text("very low", "answer") == "<answer>very low</answer>"
    with pytest.raises(ValueError, match="no supervised target"):
        data.target_text("very low", "think")


def test_an_sft_run_logs_the_loss_it_trains_on(tiny2_dir, pitch_task, tmp_path):
    """--algo sft: step 1's logged loss is the cross-entropy of the first batch's answers under the
    starting model (computed here independently); no reference model, the SFT learning rate when none is
    given (1e-5), p(answer) in (0, 1), and the checkpoint opens with from_pretrained."""
    out = tmp_path / "sft"
    args = quick_args(tiny2_dir, pitch_task, out, "--algo", "sft", "--prompt", "direct")
    args = args[:args.index("--lr")] + args[args.index("--lr") + 2:]
    cfg, _ = T.parse_args(args)
    assert cfg.lr == 1e-5 and T.reference(cfg, tiny2_dir) is None
    T.main(args)
    first = metrics(out)[0]
    train = data.read_samples(pitch_task[0])
    batch = [train[i] for i in B.step_indices(cfg, [s.answer for s in train], 0)]
    model, processor = M.load(tiny2_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = slow_cross_entropy(model.eval(), processor, batch, [data.load_audio(s.audio_path) for s in batch],
                                      [s.answer + "<|im_end|>" for s in batch], prompt="direct")
    assert abs(first["loss"] - expected) < 1e-5
    assert 0 < first["answer_prob"] < 1 and first["lr"] == pytest.approx(1e-5 * (1 - 1 / 2))
    assert "reward" not in first and first["skipped"] == 0
    Qwen2AudioForConditionalGeneration.from_pretrained(out / "checkpoint-2")


@pytest.fixture(scope="module")
def lora_run(warm_dir, pitch_task, tmp_path_factory):
    """GRPO with LoRA rank 4 from the warm-started model: 2 steps, a checkpoint after each."""
    out = tmp_path_factory.mktemp("lora") / "run"
    T.main(quick_args(warm_dir, pitch_task, out, "--lora-rank", "4", "--save-every", "1"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def merged_by_hand(start: dict, folder) -> dict:
    """The base weights with W + (lora_alpha / r) B A for every adapted module, read straight from PEFT's
    files in the folder (keys base_model.model.<module>.lora_A.weight) and computed in float64: no
    code of lora.py or model.py, which the checkpoint itself was written and read with."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    expected = dict(start)
    adapted = [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k]
    assert len(adapted) == 2 * 7  # 7 linears in each of 2 decoder layers
    for module in adapted:
        A, B = (tensors[f"base_model.model.{module}.lora_{x}.weight"].double() for x in "AB")  # [r, in], [out, r]
        W = start[f"{module}.weight"].double()                                                # [out, in]
        expected[f"{module}.weight"] = (W + config["lora_alpha"] / config["r"] * (B @ A)).float()
    return expected


def test_lora_checkpoints_hold_adapters_then_merged_weights(lora_run, warm_dir):
    """checkpoint-1 holds only the adapters (in PEFT's layout, naming the base) and opens through
    model.load, which merges them; the last checkpoint also holds merged weights that from_pretrained
    opens unchanged, equal to the base with its adapters merged."""
    first, last = lora_run / "checkpoint-1", lora_run / "checkpoint-2"
    assert not (first / "model.safetensors").exists() and (first / "adapter_model.safetensors").exists()
    assert json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"] == str(warm_dir.resolve())
    assert M.check_model_dir(first) == first
    merged = Qwen2AudioForConditionalGeneration.from_pretrained(last, dtype=torch.float32).state_dict()
    start = M.load(warm_dir, dtype=torch.float32)[0].state_dict()
    for checkpoint in (first, last):
        expected = merged_by_hand(start, checkpoint)
        opened = M.load(checkpoint, dtype=torch.float32)[0].state_dict()  # first: base + adapters; last: merged
        assert opened.keys() == expected.keys(), (set(opened) ^ set(expected))
        for k, v in expected.items():
            torch.testing.assert_close(opened[k], v, rtol=0, atol=1e-6)
    moved = [k for k in merged if not torch.equal(merged[k], start[k])]
    assert moved and all(any(t in k for t in L.LM_TARGETS) for k in moved)  # only adapted layers changed


def test_lora_trains_only_adapters_and_its_reference_is_the_base(lora_run):
    """The train state holds the adapters and their optimizer state, no base weight; the KL of step 1 is 0
    (the policy with fresh adapters is the base, which is the reference with adapters off) and positive
    at step 2."""
    import torch.distributed.checkpoint as dcp
    records = metrics(lora_run)
    assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0
    saved = dcp.FileSystemReader(lora_run / "checkpoint-2" / "train_state").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert len(weights) == 28 and all(L.is_adapter_key(k.removeprefix("model.")) for k in weights)
    adapters = load_file(lora_run / "checkpoint-2" / "adapter_model.safetensors")
    assert len(adapters) == 2 * 7 * 2  # A and B, 7 linears, 2 decoder layers


def test_lora_settings_that_match_nothing_stop_before_training(warm_dir, pitch_task, tmp_path):
    """A LoRA target that names no layer stops with the flag and the names there are."""
    with pytest.raises(M.UsageError, match=r"--lora-targets/--lora-rank: LoRA target 'qkv' matches no linear"):
        T.main(quick_args(warm_dir, pitch_task, tmp_path, "--lora-rank", "4", "--lora-targets", "q_proj,qkv"))
