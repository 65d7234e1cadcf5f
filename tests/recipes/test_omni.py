"""The second base, Qwen2.5-Omni-7B's thinker (recipes/omni.py), through the same code as Qwen2-Audio:
family detection, the prompt, the audio-only processor, a release-layout checkpoint, the meta build's
position table, the <|AUDIO|> count check, the engine's two GRPO tricks (forked-cache decoding, packed
log-probs) and grpo.py's plain versions, LoRA, the 7B's size, and one process against two.

Run: python -m pytest -q tests/recipes/test_omni.py
"""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig

import grpo
import model as M
from conftest import pitch_samples, quick_args
from data import build_prompt
from engine import packed, sampler
from recipes import lora as L
from recipes import omni as O
from test_distributed import assert_same_run, max_weight_diff, one_process, resume_a_copy, two_processes
from test_grpo import naive_logprobs
from tools import plan
from workshop.demo import build_tiny

# The audio-only prompt of Qwen2.5-Omni's released chat template (checked against the reference notes):
# the default system turn, no "Audio 1: " before the audio and no newline between the audio and the text.
OMNI_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|audio_bos|><|AUDIO|><|audio_eos|>{text}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    """A tiny Qwen2.5-Omni thinker with a 10 s feature window; its folder holds the (tiny) vision tower."""
    return build_tiny(tmp_path_factory.mktemp("omni") / "model", seed=0, window_seconds=10, family="omni")


@pytest.fixture(scope="module")
def omni(omni_dir):
    """(model, processor) in fp32 and eval mode. Tests must not change its weights."""
    model, processor = M.load(omni_dir, dtype=torch.float32)
    return model.eval(), processor


@pytest.fixture(scope="module")
def release_dir(omni_dir, tmp_path_factory):
    """omni_dir laid out as Qwen2.5-Omni-7B is released: the config of the whole Omni model (thinker, talker,
    token2wav), the thinker's weights under thinker.* beside talker.* and token2wav.* weights, and the
    processor as preprocessor_config.json (the Whisper settings next to image-processor ones) and
    chat_template.json, with no processor_config.json."""
    out = tmp_path_factory.mktemp("release")
    weights = {f"thinker.{k}": v for k, v in load_file(omni_dir / "model.safetensors").items()}
    weights |= {"talker.codec_head.weight": torch.randn(8, 4), "token2wav.code2wav_dit_model.proj.weight": torch.randn(3)}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    Qwen2_5OmniConfig(thinker_config=Qwen2_5OmniThinkerConfig.from_pretrained(omni_dir).to_dict()).save_pretrained(out)
    processor = M.load_processor(omni_dir)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    features = processor.feature_extractor.to_dict() | {"processor_class": "Qwen2_5OmniProcessor",
                                                        "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps(features))
    return out


def logits(model, processor, n=3):
    with torch.no_grad():
        return model(**M.collate(processor, *pitch_samples(n))).logits


def test_the_family_comes_from_config_json(omni_dir, release_dir, tiny_dir, tmp_path):
    """A thinker folder (model_type qwen2_5_omni_thinker) and a whole Omni folder (qwen2_5_omni) are
    Qwen2.5-Omni, the tiny Qwen2-Audio is Qwen2-Audio; another model_type is refused with the types we train."""
    assert M.check_model_dir(omni_dir) == omni_dir and M.check_model_dir(release_dir) == release_dir
    assert json.loads((release_dir / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    assert M.family_of(omni_dir) is M.family_of(release_dir) is O.OMNI and M.family_of(tiny_dir) is M.QWEN2_AUDIO
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni_talker"}))
    with pytest.raises(M.UsageError, match=r"model_type 'qwen2_5_omni_talker', but this project trains Qwen2-Audio "
                                           r"\(qwen2_audio\) or Qwen2\.5-Omni \(qwen2_5_omni, qwen2_5_omni_thinker\)"):
        M.check_model_dir(tmp_path)


def test_each_family_renders_its_own_prompt(omni, tiny):
    """Omni's rendering has no "Audio 1: " and no newline after the audio; a system prompt replaces the
    default system turn in both families, and None keeps the default."""
    text = build_prompt("Who is speaking?", ["Man", "Woman", "Child", "Robot"])
    assert M.chat_text(omni[1], text) == OMNI_TEMPLATE.format(text=text)
    for _, processor in (omni, tiny):
        default = M.chat_text(processor, text)
        assert M.chat_text(processor, text, system_prompt=None) == default
        custom = M.chat_text(processor, text, system_prompt="Answer briefly.")
        assert custom == default.replace("You are a helpful assistant.", "Answer briefly.")


def test_placeholders_and_features_trimmed_to_the_longest_clip(omni):
    """25 <|AUDIO|> per second (1 s: 100 frames -> 50 -> 25), the features cut from the 10 s window (1000
    frames) to the longest clip (3 s: 300), and the logits exactly those of the untrimmed batch."""
    model, processor = omni
    samples, audios = pitch_samples(3)  # 1 s, 2 s, 3 s
    batch = M.collate(processor, samples, audios)
    assert (batch["input_ids"] == processor.audio_token_id).sum(1).tolist() == [25, 50, 75]
    assert batch["input_features"].shape == (3, 128, 300) and batch["feature_attention_mask"].sum(1).tolist() == [100, 200, 300]
    texts = [M.chat_text(processor, build_prompt(s.question, s.choices, "answer")) for s in samples]
    full = processor(text=texts, audio=audios, sampling_rate=16000, return_tensors="pt", padding=True)
    assert full["input_features"].shape == (3, 128, 1000)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**full).logits)


def test_the_processor_saves_and_reloads(omni, tmp_path):
    """save_pretrained (as every checkpoint calls it) writes the audio parts, and they reload into the
    same batches, template and named tokens, with no image or video processor."""
    _, processor = omni
    processor.save_pretrained(tmp_path)
    again = O.OmniAudioProcessor.from_pretrained(tmp_path)
    assert again.chat_template == processor.chat_template and again.tokenizer.audio_token == "<|AUDIO|>"
    assert not hasattr(again, "image_processor") and not hasattr(again, "video_processor")
    a, b = (M.collate(p, *pitch_samples(2)) for p in (processor, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_release_layout_loads_as_the_thinker(omni, release_dir):
    """The whole Omni model's folder (thinker.* next to talker.* and token2wav.*) opens as the thinker alone:
    the same logits bit for bit, without the vision tower, and its processor builds the same batch."""
    model, processor = omni
    released, released_processor = M.load(release_dir, dtype=torch.float32)
    assert not hasattr(released.model, "visual") and not hasattr(model.model, "visual")
    a, b = (M.collate(p, *pitch_samples(2)) for p in (processor, released_processor))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(released.eval(), released_processor), logits(model, processor))


@pytest.mark.parametrize("folder", ["omni_dir", "release_dir"])
def test_the_position_table_is_right_after_a_meta_build(folder, omni, request):
    """sharded_load builds on the meta device, where the audio encoder's sinusoid table (a non-persistent
    buffer, no state dict fills it) comes out as garbage: it is recomputed, so the sharded model (one
    process, fp32) gives from_pretrained's logits exactly. A wrong table moves them by far more."""
    model, processor = omni
    expected = logits(model, processor)
    M.init_distributed(always=True)
    try:
        policy = M.sharded_load(request.getfixturevalue(folder)).eval()
        assert not hasattr(policy.model, "visual")
        with M.unsharded(policy):
            assert torch.equal(logits(policy, processor), expected)
            table = policy.model.audio_tower.positional_embedding
            table.positional_embedding = torch.zeros_like(table.positional_embedding)
            assert (logits(policy, processor) - expected).abs().max() > 0.1
    finally:
        dist.destroy_process_group()


def test_a_wrong_audio_token_count_stops(omni):
    """The model itself would take one <|AUDIO|> too few or too many silently; the hook stops the forward
    with an error that names the batch row and both counts."""
    model, processor = omni
    batch = M.collate(processor, *pitch_samples(2))  # rows of 25 and 50 placeholders
    audio, ids = processor.audio_token_id, batch["input_ids"]
    first = (ids[1] == audio).nonzero()[0].item()
    for replace_at, token, n in ((first, 0, 49), (first - 1, audio, 51)):  # drop one, then add one before the run
        wrong = ids.clone()
        wrong[1, replace_at] = token
        with pytest.raises(ValueError, match=f"batch row 1: the prompt has {n} <.AUDIO.> tokens but its audio "
                                             f"gives 50 embeddings"):
            model(**{**batch, "input_ids": wrong})


def rollout(omni, n_prompts, G, max_new_tokens, generate=sampler.generate_groups, **sampling):
    model, processor = omni
    tok = processor.tokenizer
    batch = M.collate(processor, *pitch_samples(n_prompts))
    return generate(model, batch, grpo.prompt_generators(0, 0, range(n_prompts)), G, max_new_tokens,
                    M.end_token_ids(tok), tok.pad_token_id,
                    M.suppressed_token_ids(tok, model.config.text_config.vocab_size), **sampling)


def test_forked_cache_decoding_equals_generate(omni):
    """Prefill once, fork the cache G ways, decode with explicit 1-D positions (engine.sampler, greedy)
    = HF generate with the thinker's own multimodal positions, token for token, on a left-padded batch;
    and so does grpo.py's plain sampler (each prompt repeated G times, Hugging Face's growing cache)."""
    model, processor = omni
    tok = processor.tokenizer
    batch = M.collate(processor, *pitch_samples(3))
    ref = model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=M.end_token_ids(tok),
                         pad_token_id=tok.pad_token_id,
                         suppress_tokens=M.suppressed_token_ids(tok, model.config.text_config.vocab_size))
    ref = ref[:, batch["input_ids"].shape[1]:]
    assert len(set(map(tuple, ref.tolist()))) > 1  # the rows differ: the audio reaches the tokens
    for generate in (sampler.generate_groups, grpo.generate_groups):
        ours = rollout(omni, 3, 2, 12, generate, top_k=1)
        assert torch.equal(ours.completion_ids[0::2], ours.completion_ids[1::2])
        assert torch.equal(ours.completion_ids[0::2, :ref.shape[1]], ref), generate.__module__


def test_packed_logprobs_equal_separate_forwards(omni):
    """One packed forward per group (engine.packed: 4-D mask, restarted 1-D positions) = G separate
    forwards through the thinker's own forward, to 1e-5 in fp32, over completions of several lengths (the
    random model seldom ends a completion, so the mask cuts them at 3 to 10 tokens); and so do grpo.py's
    plain log-probs (each completion after its prompt, one row each)."""
    model, _ = omni
    r = rollout(omni, 3, 4, 10)
    r.mask &= torch.arange(10) < torch.arange(12)[:, None] % 8 + 3                # [12, 10] lengths 3..10
    assert len(set(r.mask.sum(1).tolist())) == 8
    with torch.no_grad():
        naive = naive_logprobs(model, r)
        for logprobs in (packed.completion_logprobs, grpo.completion_logprobs):
            got = logprobs(model, r, pad_id=0)
            assert (got - naive).abs().max() <= 1e-5 and (got[~r.mask] == 0).all(), logprobs.__module__


def test_fresh_lora_adapters_are_the_base_thinker(omni, omni_dir):
    """lora.apply_lora finds the thinker's language-model and audio-encoder linears by the same names as
    Qwen2-Audio's (2 decoder layers x 7, 2 encoder layers x 6, lm_head), and fresh adapters (B = 0) give
    the base model's logits bit for bit."""
    base, processor = omni
    model, _ = M.load(omni_dir, dtype=torch.float32)
    names = L.apply_lora(model, 4, 8.0, targets=L.LM_TARGETS + ("lm_head",), audio=True)
    model.load_state_dict(L.init_adapters(model, 0), strict=False)
    assert len(names) == 2 * 7 + 2 * 6 + 1 and sum(".audio_tower." in n for n in names) == 12
    assert torch.equal(logits(model.eval(), processor), logits(base, processor))


def test_the_7b_thinker_on_meta():
    """The built-in 7B thinker config has the parameters the released model has (reference notes): 8.932B
    with the vision tower (text 7.071B, lm_head 0.545B, audio 0.640B, vision 0.677B), 8.255B as trained,
    without it; plan.py counts it and --model omni-7b plans it."""
    config = plan.config_7b("omni")
    with torch.device("meta"):
        whole = O.OMNI.model_class(config)
    count = lambda m: sum(p.numel() for p in m.parameters())
    parts = [whole.model.language_model, whole.lm_head, whole.model.audio_tower, whole.model.visual]
    assert [round(count(m) / 1e9, 3) for m in [whole, *parts]] == [8.932, 7.071, 0.545, 0.640, 0.677]
    assert count(whole.lm_head) == 152064 * 3584
    counts, _ = plan.count_model(plan.load_config("omni-7b"))
    assert counts["total"] == plan.PARAMS_OMNI_7B == count(whole) - count(whole.model.visual) == 8_255_263_744
    assert counts["projector"] == 1280 * 3584 + 3584  # the encoder's own projection to the LM width


@pytest.fixture(scope="module")
def omni_warm(omni_dir, pitch_task, tmp_path_factory):
    """The tiny thinker after a short format warm start, so that rewards differ within groups."""
    out = tmp_path_factory.mktemp("omni_warm")
    one_process(quick_args(omni_dir, pitch_task, out, "--max-steps", "0", "--warm-start-steps", "15",
                           "--warm-start-lr", "1e-2"))
    return out / "checkpoint-0"


def test_two_processes_match_one_and_resume_is_exact(omni_warm, pitch_task, tmp_path):
    """train.py with --model an Omni folder: 2 GRPO steps on 2 processes (torchrun, FSDP2) give the same
    completions, KL and grad norms as 1 process, and weights within 1e-5; the run resumed from its
    checkpoint-1 ends bit for bit as the uninterrupted one (AdamW's state holds every trained weight:
    the encoder's unused audio_bos_eos_token is frozen); the checkpoint reopens without the vision tower."""
    args = lambda out: quick_args(omni_warm, pitch_task, out, "--lr", "1e-2", "--save-every", "1")
    one_process(args(tmp_path / "one"))
    two_processes(args(tmp_path / "two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=2)
    history = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert min(r["grad_norm"] for r in history) > 0  # the policy had something to learn
    resume_a_copy(tmp_path / "one", tmp_path / "resumed", 1, args(tmp_path / "resumed"))
    assert max_weight_diff(tmp_path / "one" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2") == 0.0
    model, _ = M.load(tmp_path / "one" / "checkpoint-2", dtype=torch.float32)
    saved = load_file(Path(tmp_path / "one" / "checkpoint-2" / "model.safetensors"))
    assert not any("visual" in k for k in saved) and len(saved) == len(model.state_dict())
