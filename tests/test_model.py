"""model.py: the tiny offline Qwen2-Audio, the chat rendering and the batch the processor builds."""

import json

import pytest
import torch

import model as M
from conftest import pitch_samples
from data import build_prompt
from tools.plan import config_7b
from workshop.demo import build_tiny

# The recipe's rendered prompt, with {text} the R1-AQA user text.
TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{text}<|im_end|>\n<|im_start|>assistant\n")


def test_chat_text_is_the_recipe_template(tiny):
    """The processor's chat template renders exactly the R1-AQA prompt, default system prompt included."""
    _, processor = tiny
    text = build_prompt("Who is speaking?", ["Man", "Woman", "Child", "Robot"])
    assert M.chat_text(processor, text) == TEMPLATE.format(text=text)


def test_audio_placeholders_match_audio_length(tiny):
    """The processor expands <|AUDIO|> into one placeholder per 40 ms of audio (25 per second):
    1 s -> 100 mel frames -> conv stride 2 -> 50 -> pool 2 -> 25 embeddings."""
    _, processor = tiny
    samples, audios = pitch_samples(3)  # 1 s, 2 s, 3 s
    batch = M.collate(processor, samples, audios)
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert (batch["input_ids"] == audio_id).sum(1).tolist() == [25, 50, 75]
    assert batch["input_features"].shape == (3, 128, 1000)  # always the full 10 s window
    assert batch["feature_attention_mask"].sum(1).tolist() == [100, 200, 300]


def test_batch_is_left_padded(tiny):
    """Shorter prompts are padded on the left, so every row's last token is the generation point."""
    _, processor = tiny
    batch = M.collate(processor, *pitch_samples(2))  # 1 s and 2 s clips: 25 placeholders apart
    assert batch["attention_mask"][0, :25].sum() == 0 and batch["attention_mask"][:, -1].all()
    assert processor.tokenizer.decode(batch["input_ids"][0, -2:]) == "assistant\n"


def test_tiny_model_is_deterministic_and_reloads(tmp_path, tiny_dir):
    """The same seed builds the same weights, and load() reads back what build_tiny wrote."""
    a, _ = M.load(build_tiny(tmp_path / "a", seed=0), dtype=torch.float32)
    b, _ = M.load(tiny_dir, dtype=torch.float32)
    assert list(a.state_dict()) == list(b.state_dict())  # zip below would stop at the shorter one silently
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_load_defaults_to_bf16_and_left_padding(tiny_dir):
    """load() computes in bf16 unless told otherwise, and the tokenizer pads on the left."""
    model, processor = M.load(tiny_dir)
    assert model.dtype == torch.bfloat16
    assert processor.tokenizer.padding_side == "left"


def test_tokenizer_covers_answers_and_specials(tiny):
    """Answers are a few tokens (not bytes), and the special tokens are single tokens."""
    _, processor = tiny
    tok = processor.tokenizer
    assert len(tok.tokenize("<answer>very low</answer>")) <= 8
    for special in M.SPECIAL_TOKENS:
        assert tok.tokenize(special) == [special]
    assert tok.decode(tok("<answer>very high</answer>")["input_ids"]) == "<answer>very high</answer>"


def test_suppressed_tokens_are_the_non_end_specials(tiny):
    """Sampling may end a turn but must never emit audio or chat-structure tokens."""
    model, processor = tiny
    tok = processor.tokenizer
    suppressed = M.suppressed_token_ids(tok, model.config.text_config.vocab_size)
    names = set(tok.convert_ids_to_tokens(suppressed))
    assert names == {"<|im_start|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"}
    assert not set(M.end_token_ids(tok)) & set(suppressed)


def test_7b_architecture_on_meta():
    """The built-in 7B config has the real parameter count: 8,397,094,912."""
    meta = M.meta_model(config_7b())
    assert sum(p.numel() for p in meta.parameters()) == 8_397_094_912
    assert sum(p.numel() for p in meta.lm_head.parameters()) == 4096 * 156032


@pytest.mark.parametrize("setup, problem", [
    ("missing", "no such folder (give a local Qwen2-Audio folder"),
    ("file", "not a folder"),
    ("empty", "no config.json in this folder"),
    ("badjson", "not a JSON object"),
    ("llama", "config.json has model_type 'llama', but this project trains Qwen2-Audio (qwen2_audio)"),
    ("noweights", "config.json but no weights"),
])
def test_model_folder_is_recognised_before_loading(tmp_path, setup, problem):
    """A path that is not a Qwen2-Audio folder stops with a UsageError that names the path and the problem."""
    path = tmp_path / setup
    if setup == "file":
        path.write_text("x")
    elif setup != "missing":
        path.mkdir()
    config = {"badjson": "{", "llama": json.dumps({"model_type": "llama"}),
              "noweights": json.dumps({"model_type": "qwen2_audio"})}.get(setup)
    if config:
        (path / "config.json").write_text(config)
        if setup == "llama":
            (path / "model.safetensors").write_text("")
    with pytest.raises(M.UsageError) as e:
        M.check_model_dir(path)
    assert str(path) in str(e.value) and problem in str(e.value)


def test_a_real_model_folder_passes(tiny_dir):
    """The tiny model's folder is recognised as it is."""
    assert M.check_model_dir(tiny_dir) == tiny_dir
