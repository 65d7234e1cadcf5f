"""Qwen2.5-Omni-7B's thinker as a second base: its Family record, an audio-only processor, its 7B config.

The thinker (the text-generating half of the Omni model; later audio RL records on MMAU start from it)
has the same layout as Qwen2-Audio: an audio encoder ending in its own projection, a vision tower (dropped:
audio never runs it), and a Qwen2.5-7B language model with multimodal RoPE. model.py imports this file
only when a config.json's model_type names Qwen2.5-Omni; everything else runs Qwen2-Audio's code path.
docs/omni.md has the recipes from the records and what differs.
"""

from transformers import Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
from transformers.processing_utils import ProcessorMixin

from model import SPECIAL_TOKENS, Family

# Qwen2.5-Omni's tokenizer adds the vision tokens (ids 151652.. in the 7B tokenizer) and names the multimodal
# tokens: its processor reads them as tokenizer attributes (tokenizer.audio_token, tokenizer.image_token_id, ...).
OMNI_SPECIAL_TOKENS = SPECIAL_TOKENS + ("<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>")
OMNI_NAMED_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                     "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                     "vision_eos_token": "<|vision_eos|>"}
# How Qwen2.5-Omni's own chat template renders system, user and assistant turns of text and audio (the
# released template also renders images and videos): a default system turn when the chat has none, and
# each audio as <|audio_bos|><|AUDIO|><|audio_eos|> with no "Audio 1: " before it and no newline after it.
# The tiny Omni carries this one; a real Omni folder carries its own.
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class OmniAudioProcessor(Qwen2_5OmniProcessor):
    """Qwen2.5-Omni's processor made of its audio parts only: the Whisper feature extractor, the tokenizer
    (with the named multimodal tokens) and the chat template. The stock one also wants an image and a
    video processor, which need torchvision or Pillow (not dependencies of this project). The text and
    audio path is Qwen2_5OmniProcessor's own; save_pretrained/from_pretrained keep exactly these parts."""

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None):
        # ProcessorMixin takes its parts from this signature; Qwen2_5OmniProcessor.__init__ would add the
        # image and video slots, so it is skipped and the token attributes it sets are set here.
        ProcessorMixin.__init__(self, feature_extractor, tokenizer, chat_template=chat_template)
        for name, token in OMNI_NAMED_TOKENS.items():  # a tokenizer that does not name them gets the real ones
            setattr(self, name, getattr(tokenizer, name, None) or token)
        for name in ("audio_token", "image_token", "video_token"):
            setattr(self, f"{name}_id", tokenizer.convert_tokens_to_ids(getattr(self, name)))

    @property
    def model_input_names(self):
        return [*self.tokenizer.model_input_names, *self.feature_extractor.model_input_names, "feature_attention_mask"]


def audio_embeddings(frames):
    """Audio embeddings the encoder makes of `frames` mel frames (100 per second): conv stride 2, then
    pooling by 2, i.e. 25 per second (1 s: 100 -> 50 -> 25)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def check_audio_tokens(module, args, kwargs):
    """Forward pre-hook on model.model: every row's <|AUDIO|> count must equal its clip's audio embeddings
    (one clip per row, as model.collate and grpo.py build batches). Omni's forward does not check it: with
    too many or too few, the embeddings land on the wrong positions, silently."""
    ids, mask = kwargs.get("input_ids"), kwargs.get("feature_attention_mask")
    if ids is None or kwargs.get("input_features") is None or mask is None:
        return  # a decode step: no audio
    tokens = (ids == module.config.audio_token_id).sum(1).tolist()                  # [B]
    wanted = audio_embeddings(mask.sum(1)).tolist()                                  # [B]
    for row, (n, want) in enumerate(zip(tokens, wanted)):
        if n != want:
            raise ValueError(f"batch row {row}: the prompt has {n} <|AUDIO|> tokens but its audio gives {want} "
                             f"embeddings (25 per second of audio); model.collate writes one per embedding")


# Qwen2.5-Omni: the whole model's folder (thinker, talker, token2wav) or a thinker's alone. The feature
# extractor pads every clip to 300 s, but the encoder reads only the real frames (in windows of 2 s), and
# its masked_scatter takes the audio embeddings without checking that the prompt has as many <|AUDIO|>.
# The encoder's audio_bos_eos_token embedding is in no forward: with no gradient ever, AdamW would keep
# no state for it, and a resumed run would look for that state in the checkpoint.
OMNI = Family("Qwen2.5-Omni", ("qwen2_5_omni", "qwen2_5_omni_thinker"), Qwen2_5OmniThinkerForConditionalGeneration,
              Qwen2_5OmniThinkerConfig, OmniAudioProcessor, "model.audio_tower.proj", OMNI_SPECIAL_TOKENS,
              OMNI_NAMED_TOKENS, OMNI_CHAT_TEMPLATE, frozen=("model.audio_tower.audio_bos_eos_token",),
              unused=("model.visual",), trims_features=True, input_checks=(check_audio_tokens,))


def omni_config_7b():
    """Qwen2.5-Omni-7B's thinker as its released config.json gives it: a 32-layer Whisper-large-sized audio
    encoder (windows of 100 positions, projected to 3584), a 1280-wide vision tower (dropped for audio),
    Qwen2.5-7B (28 layers, 3584 wide, 4 KV heads, multimodal RoPE sections 16/24/24), lm_head not tied."""
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=3584),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
        audio_token_index=151646, image_token_index=151655, video_token_index=151656, audio_start_token_id=151647,
        audio_end_token_id=151648, vision_start_token_id=151652,
    )
