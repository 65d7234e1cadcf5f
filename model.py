"""Qwen2-Audio and Qwen2.5-Omni's thinker: loading, sharding with FSDP2, samples into model inputs, tiny copies.

Two bases, one code path. Qwen2-Audio-7B-Instruct (the default; R1-AQA's base) is a Whisper-style audio
encoder, a linear projector and a Qwen2-7B language model. Qwen2.5-Omni-7B's "thinker" (the text-generating
half of the Omni model; later audio RL records on MMAU start from it) is the same layout: an audio encoder
that ends in its own projection, a vision tower, and a Qwen2.5-7B language model with multimodal RoPE.
Both put the audio embeddings in place of `<|AUDIO|>` tokens and have `model.model` (-> hidden states) and
`model.lm_head`, which is all grpo.py calls. What differs is a small record per family (`Family`,
`FAMILIES`), detected from config.json's model_type: the classes, the tokens, the vision tower audio
never uses (dropped before sharding and never loaded), the feature padding the Omni encoder never reads,
and the `<|AUDIO|>` count the Omni model does not check.

`load()` opens a local model folder in one process; `sharded_load()` builds the model on the meta device,
shards it over all processes and fills the shards from rank 0 (training). `unsharded()` keeps the weights
gathered for a rollout. `build_tiny()` writes a tiny random copy of either family from scratch, without a
model hub: a small byte-level BPE tokenizer with the real special tokens and chat template, a Whisper
feature extractor and a small random config of the real classes. Everything else runs the same code.

    python model.py --out tiny-model                  # build the tiny Qwen2-Audio into a directory
    python model.py --out tiny-omni --family omni     # the tiny Qwen2.5-Omni thinker
    python model.py --params-7b                       # count the 7B parameters on the meta device
"""

import argparse
import copy
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import (
    GenerationConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2TokenizerFast,
    WhisperFeatureExtractor,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # one line per checkpoint load is noise in a training log

import lora as L
from data import SAMPLE_RATE, Sample, build_prompt

# Both end a completion: <|im_end|> closes the assistant turn, <|endoftext|> is also the pad token.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The real Qwen2 special tokens, in their real order (ids 151643.. in the 7B tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
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


# -----------------------------------------------------------------------------
# The two families

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


@dataclass(frozen=True)
class Family:
    """What differs between the two bases. Everything else (sharding, GRPO, LoRA, checkpoints) is one path."""
    name: str
    model_types: tuple        # config.json model_type values: the model itself, or a whole model that holds it
    model_class: type         # the text-generating model (from_pretrained takes it out of a whole model's folder)
    config_class: type        # its config, also read out of a whole model's config.json
    processor_class: type
    projector: str            # the linear from the audio encoder's width to the language model's
    special_tokens: tuple     # the tokenizer's added tokens, in the real model's order
    named_tokens: dict        # tokenizer attributes its processor reads ({}: none)
    chat_template: str | None = None  # for the tiny copy (None: the processor class's own)
    frozen: tuple = ()        # parameters that never get a gradient: kept out of training (and of AdamW's state)
    unused: tuple = ()        # submodules audio never runs: dropped before sharding, their weights never loaded
    trims_features: bool = False  # the encoder reads only the real frames, so padding past the longest clip can go
    checks_audio_tokens: bool = False  # the model does not check the <|AUDIO|> count against the audio: we do


# Qwen2-Audio's Whisper position table is a fixed sinusoid stored as a parameter; the class freezes it,
# from_pretrained unfreezes it.
QWEN2_AUDIO = Family("Qwen2-Audio", ("qwen2_audio",), Qwen2AudioForConditionalGeneration, Qwen2AudioConfig,
                     Qwen2AudioProcessor, "model.multi_modal_projector", SPECIAL_TOKENS, {},
                     frozen=("model.audio_tower.embed_positions",))
# Qwen2.5-Omni: the whole model's folder (thinker, talker, token2wav) or a thinker's alone. The feature
# extractor pads every clip to 300 s, but the encoder reads only the real frames (in windows of 2 s), and
# its masked_scatter takes the audio embeddings without checking that the prompt has as many <|AUDIO|>.
# The encoder's audio_bos_eos_token embedding is in no forward: with no gradient ever, AdamW would keep
# no state for it, and a resumed run would look for that state in the checkpoint.
OMNI = Family("Qwen2.5-Omni", ("qwen2_5_omni", "qwen2_5_omni_thinker"), Qwen2_5OmniThinkerForConditionalGeneration,
              Qwen2_5OmniThinkerConfig, OmniAudioProcessor, "model.audio_tower.proj", OMNI_SPECIAL_TOKENS,
              OMNI_NAMED_TOKENS, OMNI_CHAT_TEMPLATE, frozen=("model.audio_tower.audio_bos_eos_token",),
              unused=("model.visual",), trims_features=True, checks_audio_tokens=True)
FAMILIES = {"qwen2-audio": QWEN2_AUDIO, "omni": OMNI}
# --model names of the tiny models built offline (train.py), and the family each one is
TINY_MODELS = {"tiny": "qwen2-audio", "tiny-omni": "omni"}


def family_of(path):
    """The family of a model folder (its config.json's model_type) or of a LoRA checkpoint's base model."""
    path = Path(adapter_base(path) or path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise ValueError(f"{path}: config.json has model_type {model_type!r}, not one of {MODEL_TYPES}")
    return family


def family_of_config(config):
    return next(f for f in FAMILIES.values() if isinstance(config, f.config_class))


def family_of_processor(processor):
    return next(f for f in FAMILIES.values() if isinstance(processor, f.processor_class))


# -----------------------------------------------------------------------------
# Processes and devices

def init_distributed(always=False, timeout=None):
    """Join the torchrun process group: CUDA + nccl when a GPU is present, else CPU + gloo.
    Returns (rank, world_size, device). Without torchrun there is no group unless `always`, which
    makes a one-process group so that training runs the same sharded code on 1 process as on 8.
    timeout (a timedelta): how long a rank may wait in one collective before the group aborts
    (NCCL's watchdog); None leaves torch's default (10 minutes for nccl, 30 for gloo)."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None, timeout=timeout)
        elif always:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


# A host wait's timeout: a rank that dies is stopped by torchrun together with the others, so this only ends
# a hang; it must outlast any difference between ranks' long uneven work (the curriculum's pre-pass).
HOST_WAIT = timedelta(hours=24)


def wait_for_all():
    """A barrier on the host, for the end of long uneven work that no collective interrupts (the curriculum's
    pre-pass: hours of decoding, which ranks finish minutes apart). On a GPU dist.barrier() is a NCCL
    collective, which NCCL's watchdog aborts once a rank has waited in it longer than the process group's
    timeout; this one runs in a gloo group made for the wait, whose timeout is HOST_WAIT."""
    group = dist.new_group(backend="gloo", timeout=HOST_WAIT)
    dist.barrier(group=group)
    dist.destroy_process_group(group)


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


class UsageError(Exception):
    """A wrong flag, path or file, found before any work starts. run_main shows it as one line."""


def run_main(main, argv=None):
    """Run a script's main(argv). A UsageError becomes one line on stderr and exit status 2, with no
    traceback; under torchrun every rank finds the same error by itself and only rank 0 prints it."""
    try:
        return main(argv)
    except UsageError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2) from None


# -----------------------------------------------------------------------------
# Loading

MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)  # config.json model_type values we train


def check_model_dir(path, flag="--model"):
    """Recognise a model folder before anything is loaded: it exists, has a config.json whose
    model_type this project trains, and has weights. Otherwise a UsageError naming the folder."""
    path, what = Path(path), "give a local Qwen2-Audio folder, a checkpoint-N that train.py wrote, or `tiny`"
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: {'not a folder' if path.exists() else 'no such folder'} ({what})")
    if adapter_base(path) is not None:  # a LoRA checkpoint: its adapters, and the model they adapt
        check_model_dir(adapter_base(path), f"{flag} {path}: its adapter_config.json names a base model, but")
        return path
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {path}: no config.json in this folder, so it is not a model folder ({what})")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"{flag} {config}: not a JSON object ({e})") from None
    if model_type not in MODEL_TYPES:
        raise UsageError(f"{flag} {path}: config.json has model_type {model_type!r}, but this project trains "
                         f"{' or '.join(MODEL_TYPES)} (Qwen2-Audio-7B-Instruct, Qwen2.5-Omni-7B or its thinker)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise UsageError(f"{flag} {path}: config.json but no weights (*.safetensors) in this folder")
    return path

def load(path, dtype=torch.bfloat16, device="cpu", gradient_checkpointing=False):
    """Open a local model folder of either family on `device` in `dtype`. Returns (model, processor); the
    tokenizer pads on the left. The weights are read in the checkpoint's own dtype, which leaves them
    views of the memory-mapped file (no copy; processes on one machine share the OS page cache), then
    moved and cast one tensor at a time: no process ever holds a full copy in host memory unless
    `device` is the CPU. The result equals from_pretrained(path, dtype=dtype) moved to `device`, less
    the parts audio never uses (Omni's vision tower)."""
    family = family_of(path)
    model = read_pretrained(family, adapter_base(path) or path, dtype="auto")
    if adapter_base(path) is not None:
        merge_adapters(model, path)
    model.to(device=device, dtype=dtype)
    reset_rotary(model, device)  # from_pretrained keeps the rotary frequencies in fp32; .to(dtype) rounded them
    for config in (model.config, *(getattr(model.config, k) for k in model.config.sub_configs)):
        config.dtype = dtype  # as from_pretrained(dtype=...) records it
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, load_processor(path)


def read_pretrained(family, path, **kwargs):
    """from_pretrained of the family's class, without the submodules audio never uses. A checkpoint that
    train.py wrote holds none of their weights: from_pretrained would report each one as missing (and
    initialise it), so its report is kept quiet and any OTHER missing weight stops here by name.
    Adapter files beside the weights are left out (without_adapter_files)."""
    with without_adapter_files(path) as folder:
        if not family.unused:
            return for_audio(family.model_class.from_pretrained(folder, **kwargs), family)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = family.model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(tuple(f"{u}." for u in family.unused)))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} weights of the {family.name} model, "
                         f"e.g. {', '.join(missing[:3])}")
    return for_audio(model, family)


@contextmanager
def without_adapter_files(path):
    """The folder from_pretrained should open for `path`: path itself, or where it holds a model's weights
    AND adapter files, a temporary folder of links to all its other files. With PEFT installed,
    from_pretrained attaches the adapters it finds beside the weights; the only such folder this project
    reads is the last checkpoint of a LoRA run written before the merged model moved to merged/, whose
    weights already hold the adapters, so attaching them again would give W + 2 (alpha/r) B A."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        yield path
        return
    with tempfile.TemporaryDirectory() as view:
        for f in path.iterdir():
            if not f.name.startswith("adapter_"):
                (Path(view) / f.name).symlink_to(f.resolve())
        yield Path(view)


def for_audio(model, family):
    """The model as this project runs it: the submodules audio never runs are deleted (Omni's vision tower:
    0.68B parameters at 7B; audio-only logits are unchanged, and a full state dict then has none of their
    keys), the parameters that never get a gradient are frozen, and where the model does not check the
    <|AUDIO|> count against the audio, a hook does."""
    for name in family.frozen:
        model.get_submodule(name).requires_grad_(False)
    for name in family.unused:
        parent, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent), child)
    if family.checks_audio_tokens:
        model.model.register_forward_pre_hook(check_audio_tokens, with_kwargs=True)
    return model


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


def adapter_base(path):
    """The base model folder of a LoRA checkpoint (adapters in PEFT's layout and no model weights beside
    them: every checkpoint of a LoRA run), else None. A folder with both is a LoRA run's last checkpoint
    as this project wrote it before merged/: its weights already hold the adapters, so it is a model."""
    path = Path(path)
    if (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    return Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])


def merge_adapters(model, folder):
    """Fold the LoRA adapters saved in folder into the model's weights: W + alpha / r * B A."""
    adapters, settings = L.load_adapters(folder)
    model.load_state_dict(L.merged_state_dict({**model.state_dict(), **adapters}, settings))


def load_processor(path):
    """The family's processor; its tokenizer pads on the left (batched generation appends on the right)."""
    processor = family_of(path).processor_class.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return processor


def end_token_ids(tokenizer):
    """Token ids that end a completion (<|im_end|>, <|endoftext|>)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]


def suppressed_token_ids(tokenizer, vocab_size):
    """Ids a completion must never contain: every special token except the end tokens, and the
    rows of the embedding beyond the tokenizer. A sampled <|AUDIO|> would break the next forward."""
    ends = set(end_token_ids(tokenizer))
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    special |= set(tokenizer.added_tokens_decoder)  # <|AUDIO|> and friends are added tokens
    return sorted((special - ends) | set(range(len(tokenizer), vocab_size)))


# -----------------------------------------------------------------------------
# Sharding (FSDP2)

def shard(model, param_dtype=None, lora=False):
    """Shard with FSDP2 over all processes: each audio-encoder layer, each decoder layer, the lm_head,
    then `model.model` (embeddings, conv stem, projector, norms). grpo.py calls `model.model` and
    `model.lm_head` directly, so those two are the units that run the root's hooks. Parameters stay
    in their own dtype (fp32 master weights for the policy); param_dtype is the compute dtype, and
    gradients are reduced in fp32.
    With `lora` (the model went through lora.apply_lora) FSDP manages only what trains: every frozen
    parameter is an ignored param, so each rank keeps the whole frozen base as it is (no sharding, no
    all-gather, no fp32 master, gradient or optimizer state). A layer with nothing to train (lm_head,
    or the encoder layers without audio adapters) stays a plain module; `model.model` is sharded even
    with nothing of its own to train, as the root whose hooks run around every layer inside it."""
    mesh = init_device_mesh(_device_type(), (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    frozen = {p for p in model.parameters() if not p.requires_grad} if lora else None
    trains = lambda unit: frozen is None or any(p.requires_grad for p in unit.parameters())
    for layer in [*model.model.audio_tower.layers, *model.model.language_model.layers]:
        if trains(layer):
            fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    if trains(model.lm_head):
        fully_shard(model.lm_head, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    fully_shard(model.model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    return model


def fsdp_units(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model):
    """Free every gathered FSDP unit. The two root units (the trunk and lm_head) stay gathered after a
    forward until their backward frees them; a model that never runs backward (the frozen reference)
    must be resharded by hand, or it holds the trunk and lm_head whole on every GPU (1.29B parameters
    at 7B) through the rest of the step."""
    for unit in fsdp_units(model):
        unit.reshard()


def reset_after_error(model):
    """FSDP after a forward or backward that raised midway: each root unit's per-step state reset (torch's
    FSDPModule.reset_iter_state; the roots are the trunk and lm_head), and every gradient dropped,
    including those a backward left on gathered parameters of a layer whose reduce-scatter never ran
    (reset_iter_state keeps them, and the next backward would add to them)."""
    for root in (model.model, model.lm_head):
        # _is_root is private: it is None until the unit's first forward, and torch 2.13's
        # reset_iter_state fails on such a unit (nothing of it ran, so it has nothing to reset)
        if isinstance(root, FSDPModule) and root._get_fsdp_state()._is_root:
            root.reset_iter_state()
    with unsharded(model):
        model.zero_grad(set_to_none=True)  # the gathered parameters' gradients
    model.zero_grad(set_to_none=True)  # the shards'


class unsharded:
    """Context: gather every FSDP unit once, keep it gathered for the whole rollout, then reshard.
    Otherwise each decoded token would all-gather the whole model, and ranks whose decode loops stop
    at different steps would wait on each other forever. The gathers happen on entering, on every rank
    in the same order, so a rank with nothing to generate cannot leave the others waiting either."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        for unit in fsdp_units(self.model):
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        return self.model

    def __exit__(self, *exc):
        reshard(self.model)
        roots = (self.model.model, self.model.lm_head)  # roots keep their gathered weights after forward anyway
        for unit in fsdp_units(self.model):
            if unit not in roots:
                unit.set_reshard_after_forward(True, recurse=False)


def sharded_load(path, param_dtype=None, storage_dtype=torch.float32, gradient_checkpointing=False, lora=None):
    """Build the model on the meta device on every rank, shard it, and fill the shards from rank 0,
    which alone reads the checkpoint: host memory holds one full copy, not one per rank.
    With `lora` (a lora.LoRASettings) the adapters are added before sharding and only they train: the
    frozen base is kept whole on every rank in the compute dtype (param_dtype, else storage_dtype),
    the adapters are sharded in fp32 and start from lora.init_adapters(model, lora.seed)."""
    device = torch.device(_device_type(), torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    base_dtype = (param_dtype or storage_dtype) if lora else storage_dtype  # a frozen base needs no fp32 master
    family = family_of(path)
    model = meta_model(family.config_class.from_pretrained(path)).to(base_dtype)
    if lora:
        L.apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, lora.audio)  # fp32 adapters
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    shard(model, param_dtype, lora=bool(lora))
    model.to_empty(device=device)
    full = {}
    if dist.get_rank() == 0:
        full = read_pretrained(family, path).state_dict()
    if lora:
        full = broadcast_frozen(model, full) | (L.init_adapters(model, lora.seed) if dist.get_rank() == 0 else {})
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=not lora))
    reset_rotary(model, device)
    if Path(path, "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


@torch.no_grad()
def sharded_copy(model, dtype):
    """A second model, sharded as `model` is, holding its weights in `dtype` (the frozen reference: the policy
    at step 0 in the compute dtype). Each rank casts its own shards on its own device: nothing is read from
    disk or sent between ranks, so the checkpoint is read once for both models. Equal to sharded_load of a
    checkpoint of `model` written in `dtype` (checkpoint.save rounds its weights the same way)."""
    device = next(model.parameters()).device
    twin = meta_model(copy.deepcopy(model.config)).to(dtype)  # its own config: attention.enable changes one
    shard(twin)
    twin.to_empty(device=device)
    source = model.state_dict()  # DTensor shards, laid out as the twin's: the same shapes on the same mesh
    for name, target in twin.state_dict().items():
        _local(target).copy_(_local(source[name]))
    reset_rotary(twin, device)
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def broadcast_frozen(model, full):
    """Fill every frozen (FSDP-ignored) parameter from rank 0's full state dict, broadcasting straight
    into each rank's own tensor, one at a time. set_model_state_dict would fill them too, but it first
    receives every replicated tensor into a new buffer and copies them in only at the end: a second
    whole base per rank. Returns what is left for set_model_state_dict: rank 0's trainable entries."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            if dist.get_rank() == 0:
                p.copy_(full.pop(name))  # cast to the compute dtype before it travels
            dist.broadcast(p, src=0)
    return full


def reset_rotary(model, device):
    """The rotary inverse frequencies, and the sinusoid position table of Omni's audio encoder, are
    non-persistent buffers: to_empty() leaves them as garbage and no state dict refills them. Recompute
    the frequencies by building a fresh rotary module, the table by the method its module builds it with."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            fresh = type(module)(module.config)
            module.inv_freq = fresh.inv_freq.to(device)
            module.original_inv_freq = fresh.original_inv_freq.to(device)
        if hasattr(module, "compute_default_singular_positional_embedding"):
            module.positional_embedding = module.compute_default_singular_positional_embedding().to(device)


def full_state_dict(model):
    """The whole model's weights on rank 0's CPU with Hugging Face names (all ranks must call)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_state_dict(model, dtype):
    """The whole model's weights in `dtype` on rank 0's CPU (other ranks get {}), gathered tensor by
    tensor: each shard is cast on its own device before the all-gather, so the host holds one copy in
    `dtype` (16.8 GB in bf16 at 7B) instead of an fp32 copy plus its cast (about 50 GB at the peak)."""
    out = {}
    for name, tensor in get_model_state_dict(model).items():
        whole = tensor if L.is_adapter_key(name) else tensor.to(dtype)  # adapters stay fp32, to be merged
        whole = whole.full_tensor() if isinstance(whole, DTensor) else whole  # a collective: every rank calls it
        if dist.get_rank() == 0:
            out[name] = whole.cpu()
    return out


def _device_type():
    return "cuda" if torch.cuda.is_available() else "cpu"


# -----------------------------------------------------------------------------
# Samples -> model inputs

def chat_text(processor, prompt, system_prompt=None):
    """The rendered chat for one user turn: audio first, then the prompt text, by the processor's own chat
    template, so each family renders its own way (Qwen2-Audio: "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    before the text; Qwen2.5-Omni: "<|audio_bos|><|AUDIO|><|audio_eos|>" right before it). system_prompt:
    a system turn of this text; None leaves the template's default ("You are a helpful assistant." in both
    families, which is what R1-AQA and Ke-Omni-R trained with)."""
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "clip"},
                                             {"type": "text", "text": prompt}]}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def collate(processor, samples: list[Sample], audios, prompt="answer", system_prompt=None, think_words=0):
    """Turn samples and their decoded audio (float32, 16 kHz) into one left-padded batch:
    input_ids, attention_mask, input_features [B, 128, frames], feature_attention_mask.
    Where the encoder reads only real frames (Omni), frames stop at the longest clip of the batch instead
    of the feature extractor's padded window: the same model output, without the padding to carry."""
    texts = [chat_text(processor, build_prompt(s.question, s.choices, prompt, think_words), system_prompt)
             for s in samples]
    batch = processor(text=texts, audio=list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
    if family_of_processor(processor).trims_features:
        frames = int(batch["feature_attention_mask"].sum(1).max())
        batch["input_features"] = batch["input_features"][:, :, :frames].contiguous()
        batch["feature_attention_mask"] = batch["feature_attention_mask"][:, :frames].contiguous()
    return batch


# -----------------------------------------------------------------------------
# Architectures

def config_7b(family="qwen2-audio"):
    """The 7B's architecture: Qwen2-Audio-7B-Instruct, or with family "omni" Qwen2.5-Omni-7B's thinker
    (the config classes' defaults are NOT these models)."""
    return {"qwen2-audio": qwen2_audio_config_7b, "omni": omni_config_7b}[family]()


def qwen2_audio_config_7b():
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=1280, encoder_layers=32,
                          encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                         rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False),
        audio_token_index=151646,
    )


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


def meta_model(config):
    """The model on the meta device, as this project runs it (for_audio): shapes and parameter counts
    without memory."""
    family = family_of_config(config)
    with torch.device("meta"):
        return for_audio(family.model_class(config), family)


# -----------------------------------------------------------------------------
# The tiny model, built offline

def _tokenizer_corpus():
    """Text the tiny BPE is trained on: the chat frame, the R1-AQA prompt, answer tags and words."""
    words = ["very low", "low", "high", "very high", "Man", "Woman", "Child", "Robot",
             "yes", "no", "one", "two", "three", "four", "speech", "music", "sound"]
    lines = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: ",
             "<|im_start|>assistant\n"]
    for q in ["What is the pitch of the tone in the audio?", "What happened in the audio?",
              "How many beeps are there?", "Is the sound loud or soft?", "Who is speaking?"]:
        lines.append(build_prompt(q, words[:4]))
        lines.append(build_prompt(q, words[4:8], "think"))
    lines += [f"<answer>{w}</answer>" for w in words] + [f"<think>{w}</think>" for w in words]
    return lines * 20


def build_tokenizer(vocab_size=512, special_tokens=SPECIAL_TOKENS, named_tokens=None):
    """A small byte-level BPE with Qwen2's special tokens, wrapped as a Qwen2 tokenizer. named_tokens:
    tokenizer attributes naming some of them (Qwen2.5-Omni's audio_token, image_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    named = {"extra_special_tokens": named_tokens} if named_tokens else {}
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, errors="replace", **named)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[1:])})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_config(tokenizer, window_seconds=10, width=64, layers=2, heads=4):
    """A small Qwen2-Audio: same classes, a few hundred thousand parameters.
    The encoder sees 50 positions per second of its mel window (100 mel frames per second, conv stride 2)."""
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=width, encoder_layers=layers,
                          encoder_attention_heads=heads, encoder_ffn_dim=2 * width, num_mel_bins=128,
                          max_source_positions=50 * window_seconds),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, intermediate_size=2 * width,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


def tiny_omni_config(tokenizer, window_seconds=10, width=64, layers=2, heads=4):
    """A small Qwen2.5-Omni thinker: the real classes and the real encoder windows (100 positions, 2 s of
    audio, whatever the clip length), RoPE sections in the real proportions (16/24/24 of 64 -> 2/3/3 of
    head_dim/2 = 8), lm_head not tied. Its vision tower is the smallest the class accepts: it is dropped."""
    head_dim, ids = width // heads, tokenizer.convert_tokens_to_ids
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=width, encoder_layers=layers, encoder_attention_heads=heads,
                          encoder_ffn_dim=2 * width, num_mel_bins=128, max_source_positions=1500, n_window=100,
                          output_dim=width),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, intermediate_size=2 * width, rms_norm_eps=1e-6,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])),
        audio_token_index=ids("<|AUDIO|>"), image_token_index=ids("<|IMAGE|>"), video_token_index=ids("<|VIDEO|>"),
        audio_start_token_id=ids("<|audio_bos|>"), audio_end_token_id=ids("<|audio_eos|>"),
        vision_start_token_id=ids("<|vision_bos|>"),
    )


TINY_CONFIGS = {"qwen2-audio": tiny_config, "omni": tiny_omni_config}


def build_tiny(out_dir, seed=0, window_seconds=10, width=64, layers=2, family="qwen2-audio"):
    """Write a tiny random model of the family (model, tokenizer, feature extractor, processor) to out_dir.
    Deterministic for a seed; `load(out_dir)` opens it like the real one. The feature extractor's window
    is window_seconds (longer clips are cut)."""
    fam = FAMILIES[family]
    tokenizer = build_tokenizer(special_tokens=fam.special_tokens, named_tokens=fam.named_tokens)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=window_seconds)
    processor = fam.processor_class(feature_extractor=features, tokenizer=tokenizer, chat_template=fam.chat_template)
    config = TINY_CONFIGS[family](tokenizer, window_seconds, width, layers)
    torch.manual_seed(seed)
    model = fam.model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_token_ids(tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def tiny(cache_dir, window_seconds=10, seed=0, family="qwen2-audio"):
    """The tiny model's directory under cache_dir, built on first use."""
    path = Path(cache_dir) / f"tiny-{family}-{window_seconds}s-seed{seed}"
    if not (path / "config.json").exists():
        build_tiny(path, seed=seed, window_seconds=window_seconds, family=family)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="build the tiny model into this directory")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2-audio", help="which base: qwen2-audio or omni")
    parser.add_argument("--window-seconds", type=int, default=10, help="mel window of the tiny model")
    parser.add_argument("--params-7b", action="store_true", help="count the 7B parameters on the meta device")
    args = parser.parse_args()
    if args.out:
        print(f"tiny model written to {build_tiny(args.out, window_seconds=args.window_seconds, family=args.family)}")
    if args.params_7b:
        fam, n = FAMILIES[args.family], sum(p.numel() for p in meta_model(config_7b(args.family)).parameters())
        print(f"{fam.name}-7B parameters{' (the thinker, without ' + ', '.join(fam.unused) + ')' if fam.unused else ''}: {n:,}")
