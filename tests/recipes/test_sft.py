"""Supervised fine-tuning (--algo sft, recipes/sft.py) and LoRA (recipes/lora.py) through train.py: the SFT loss against a cross-entropy
computed independently, what an SFT and a LoRA run log and write, the LoRA reference, and the
checkpoints a LoRA run leaves (adapters every time, a merged model in merged/ at the end; never both in
one folder) and how PEFT, model.load and evaluate.py open them."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen2AudioForConditionalGeneration

import checkpoint as C
import config
import data
import evaluate as E
import grpo
import model as M
import reward
import train as T
from conftest import pitch_samples, quick_args
from engine import packed
from recipes import lora as L


@pytest.fixture(autouse=True)
def no_leftover_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def slow_cross_entropy(model, processor, samples, audios, targets, prompt="answer", suppress=()):
    """The reference: one plain forward of [prompt, target] per sample through the model's own forward
    (logits at every position), F.cross_entropy summed over the target tokens, over their number; the
    `suppress` ids left out of the softmax."""
    total, count = 0.0, 0
    for sample, audio, target in zip(samples, audios, targets):
        batch = M.collate(processor, [sample], [audio], prompt)
        ids = processor.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        seq = torch.cat([batch["input_ids"][0], ids])[None]
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), input_features=batch["input_features"],
                       feature_attention_mask=batch["feature_attention_mask"]).logits[0]
        logits[:, list(suppress)] = float("-inf")
        P = batch["input_ids"].shape[1]
        total += F.cross_entropy(logits[P - 1:P - 1 + len(ids)].float(), ids, reduction="sum").item()
        count += len(ids)
    return total / count


def test_sft_loss_equals_an_independent_cross_entropy(tiny):
    """grpo.sft_loss over completion_logprobs (the engine's packed ones, lm_head only at target positions,
    and grpo.py's plain ones) = the mean cross-entropy of the target tokens from separate full forwards,
    to 1e-5 in fp32. Targets of different lengths (very low / high), the end token included."""
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
    expected = slow_cross_entropy(model, processor, samples, audios, targets)
    for logprobs in (packed.completion_logprobs, grpo.completion_logprobs):
        with torch.no_grad():
            loss, m = grpo.sft_loss(logprobs(model, rollout, tok.pad_token_id), rollout.mask)
        assert abs(loss.item() - expected) < 1e-5 and abs(m["nll"].item() - expected) < 1e-5
        assert m["tokens"].item() == rollout.mask.sum().item() and m["sequences"].item() == 3


def test_sft_targets_follow_the_prompt():
    """direct: the choice itself; answer: in tags; think: refused (no reasoning to imitate) unless the caller
    gives one (the warm start's placeholder), and then in the think format that the format reward accepts."""
    assert data.target_text("very low", "direct") == "very low"
    assert data.target_text("very low", "answer") == "<answer>very low</answer>"
    with pytest.raises(ValueError, match="no supervised target"):
        data.target_text("very low", "think")
    assert data.target_text("very low", "think", "") == "<think></think><answer>very low</answer>"
    assert data.target_text("low", "think", "hm") == "<think>hm</think><answer>low</answer>"
    assert reward.score(data.target_text("low", "think", ""), "low", "think") == reward.Reward(1.0, 1.0, 2.0)
    assert data.target_text("low", "answer", "hm") == "<answer>low</answer>"  # only think has a think block


def test_an_sft_run_logs_the_loss_it_trains_on(tiny2_dir, pitch_task, tmp_path):
    """--algo sft: step 1's logged loss is the cross-entropy of the first batch's answers under the
    starting model, in the distribution sampling draws from (the suppressed tokens out of the softmax, as
    training leaves them out), computed here independently; no reference model, the SFT learning rate when none is
    given (1e-5), p(answer) in (0, 1), and the checkpoint opens with from_pretrained."""
    out = tmp_path / "sft"
    args = quick_args(tiny2_dir, pitch_task, out, "--algo", "sft", "--prompt", "direct")
    args = args[:args.index("--lr")] + args[args.index("--lr") + 2:]
    cfg, _ = config.parse_args(args)
    recipe = T.recipe_for(cfg)
    assert cfg.lr == 1e-5 and T.reference(cfg, recipe, tiny2_dir) is None
    T.main(args)
    first = metrics(out)[0]
    train = data.read_samples(pitch_task[0])
    batch = [train[i] for i in T.step_questions(cfg, recipe, train, 0)]
    model, processor = M.load(tiny2_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = slow_cross_entropy(model.eval(), processor, batch, [data.load_audio(s.audio_path) for s in batch],
                                      [s.answer + "<|im_end|>" for s in batch], prompt="direct",
                                      suppress=M.suppressed_token_ids(processor.tokenizer,
                                                                      model.config.text_config.vocab_size))
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


def test_lora_checkpoints_hold_adapters_and_the_last_a_merged_model(lora_run, warm_dir):
    """Every checkpoint holds the adapters in PEFT's layout (naming the base) and no model weights, and
    opens through model.load, which merges them onto the base; the last one also holds merged/, a plain
    Hugging Face folder that from_pretrained opens unchanged. Each equals the base with its adapters merged
    by hand (merged_by_hand, independent of the code that wrote and reads the checkpoints)."""
    first, last = lora_run / "checkpoint-1", lora_run / "checkpoint-2"
    for checkpoint in (first, last):
        assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "adapter_model.safetensors").exists()
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(warm_dir.resolve())
        assert M.check_model_dir(checkpoint) == checkpoint
    assert not (first / L.MERGED).exists() and not (last / L.MERGED / "adapter_config.json").exists()
    assert M.check_model_dir(last / L.MERGED) == last / L.MERGED
    merged = Qwen2AudioForConditionalGeneration.from_pretrained(last / L.MERGED, dtype=torch.float32).state_dict()
    start = M.load(warm_dir, dtype=torch.float32)[0].state_dict()
    for checkpoint, adapters in ((first, first), (last, last), (last / L.MERGED, last)):
        expected = merged_by_hand(start, adapters)
        opened = M.load(checkpoint, dtype=torch.float32)[0].state_dict()  # base + adapters, or (merged/) merged
        assert opened.keys() == expected.keys(), (set(opened) ^ set(expected))
        for k, v in expected.items():
            torch.testing.assert_close(opened[k], v, rtol=0, atol=1e-6)
    moved = [k for k in merged if not torch.equal(merged[k], start[k])]
    assert moved and all(any(t in k for t in L.LM_TARGETS) for k in moved)  # only adapted layers changed


def holds_model_and_adapters(folder):
    """Whether a folder holds a model (config.json, or weights other than the adapters') and an adapter
    config: from_pretrained with PEFT installed loads the weights, then adds the adapters on top."""
    folder = Path(folder)
    weights = [f for f in folder.glob("*.safetensors") if f.name != "adapter_model.safetensors"]
    model = (folder / "config.json").exists() or weights or any(folder.glob("pytorch_model*.bin"))
    return bool(model) and (folder / "adapter_config.json").exists()


def old_layout(checkpoint, out):
    """A LoRA run's last checkpoint as train.py wrote it before merged/ (the same files, one folder): the
    merged model, and beside it the adapters already merged into it."""
    shutil.copytree(checkpoint / L.MERGED, out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "train_config.json"):
        shutil.copy(checkpoint / name, out)
    shutil.copytree(checkpoint / "train_state", out / "train_state")
    return out


def test_no_folder_of_a_lora_run_holds_a_model_and_adapters(lora_run, tmp_path):
    """The rule that keeps from_pretrained from applying the adapters twice, on every folder of a LoRA run
    that saved after each step (checkpoint-1: adapters only; checkpoint-2, the last: adapters and merged/).
    The old layout is the case the rule finds."""
    folders = [Path(f) for f, _, _ in os.walk(lora_run)]
    assert [f for f in folders if holds_model_and_adapters(f)] == []
    assert [p.name for p in C.complete(lora_run)] == ["checkpoint-1", "checkpoint-2"]
    assert lora_run / "checkpoint-2" / L.MERGED in folders
    assert holds_model_and_adapters(old_layout(lora_run / "checkpoint-2", tmp_path / "old"))


def test_a_last_lora_checkpoint_in_the_old_layout_opens_as_its_merged_model(lora_run, tmp_path):
    """A folder of merged weights with adapter files beside them (the old layout) is a model folder:
    model.load gives its weights as they are, exactly merged/'s, never with the adapters added again."""
    old = old_layout(lora_run / "checkpoint-2", tmp_path / "old")
    assert M.adapter_base(old) is None and M.check_model_dir(old) == old and M.family_of(old) is M.QWEN2_AUDIO
    opened = M.load(old, dtype=torch.float32)[0].state_dict()
    merged = M.load(lora_run / "checkpoint-2" / L.MERGED, dtype=torch.float32)[0].state_dict()
    assert opened.keys() == merged.keys() and all(torch.equal(opened[k], merged[k]) for k in merged)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT's own call
def test_peft_opens_lora_checkpoints_as_model_load_does(lora_run, warm_dir, tmp_path):
    """With PEFT installed (skipped without): PeftModel.from_pretrained(base, checkpoint-N), and plain
    from_pretrained(checkpoint-N), give model.load's logits for every checkpoint, and so does
    from_pretrained of merged/ (within 4e-5 in fp32, the adapter path against merged weights; measured
    3.8e-6, where the adapters move the logits by 0.75 and 0.95). In the old layout from_pretrained adds
    the adapters to the merged weights again (measured: 0.91 off), and model.load must not."""
    peft = pytest.importorskip("peft")
    processor = M.load_processor(warm_dir)
    batch = M.collate(processor, *pitch_samples(2))

    def logits(model):
        with torch.no_grad():
            return model.eval()(**batch).logits                                         # [2, T, V]

    base = lambda: Qwen2AudioForConditionalGeneration.from_pretrained(warm_dir, dtype=torch.float32)
    before = logits(base())
    for checkpoint in (lora_run / "checkpoint-1", lora_run / "checkpoint-2"):
        expected = logits(M.load(checkpoint, dtype=torch.float32)[0])
        assert (expected - before).abs().max() > 1e-3  # the adapters changed the model
        peft_model = peft.PeftModel.from_pretrained(base(), checkpoint)
        assert (logits(peft_model) - expected).abs().max() < 4e-5
        plain = Qwen2AudioForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        assert (logits(plain) - expected).abs().max() < 4e-5
    merged = Qwen2AudioForConditionalGeneration.from_pretrained(lora_run / "checkpoint-2" / L.MERGED,
                                                                dtype=torch.float32)
    assert (logits(merged) - expected).abs().max() < 4e-5
    old = old_layout(lora_run / "checkpoint-2", tmp_path / "old")
    twice = logits(Qwen2AudioForConditionalGeneration.from_pretrained(old, dtype=torch.float32))
    assert (twice - expected).abs().max() > 0.5 * (expected - before).abs().max()  # W + 2 (alpha/r) B A
    assert (logits(M.load(old, dtype=torch.float32)[0]) - expected).abs().max() < 4e-5


def test_evaluate_scores_every_checkpoint_of_a_lora_run(lora_run, pitch_task, tmp_path, capsys):
    """evaluate.py --model RUN on a LoRA run scores each checkpoint (steps 1 and 2, by model.load: base +
    adapters) into the table; the last one's predictions equal those of its merged/ opened as a model
    folder, and those of the same checkpoint in the old layout in a run folder of its own."""
    _, test_jsonl = pitch_task
    flags = ["--data", str(test_jsonl), "--batch-size", "8", "--max-new-tokens", "6", "--dtype", "float32"]
    assert E.main(["--model", str(lora_run), "--out", str(tmp_path / "run"), *flags]) == 0
    table = json.loads((tmp_path / "run" / "table.json").read_text())
    assert [r["step"] for r in table["rows"]] == [1, 2]
    assert E.main(["--model", str(lora_run / "checkpoint-2" / L.MERGED), "--out", str(tmp_path / "merged.json"),
                   *flags]) == 0
    old_layout(lora_run / "checkpoint-2", tmp_path / "old_run" / "checkpoint-2")
    assert E.main(["--model", str(tmp_path / "old_run"), "--out", str(tmp_path / "old"), *flags]) == 0
    answers = lambda path: [r["model_prediction"] for r in json.loads(path.read_text())]
    last = answers(tmp_path / "run" / "checkpoint-2.json")
    assert len(last) == 8
    assert answers(tmp_path / "merged.json") == last == answers(tmp_path / "old" / "checkpoint-2.json")


def test_training_from_adapters_alone_is_refused(lora_run, pitch_task, tmp_path):
    """--model a LoRA checkpoint (adapters, no model) stops before anything is built, naming merged/ and
    the base model."""
    with pytest.raises(M.UsageError, match=r"LoRA adapters, not a model to train: .*checkpoint-N/merged"):
        T.main(quick_args(lora_run / "checkpoint-1", pitch_task, tmp_path))


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
