"""Qwen2-Audio for training: loading, sharding with FSDP2, samples into model inputs, greedy decoding.

Qwen2-Audio-7B-Instruct (R1-AQA's base) is a Whisper-style audio encoder, a linear projector and a
Qwen2-7B language model; grpo.py calls only its two halves, `model.model` (-> hidden states) and
`model.lm_head`. `load()` opens a local model folder in one process; `sharded_load()` builds the model
on the meta device, shards it over all processes and fills the shards from rank 0 (training);
`unsharded()` keeps the weights gathered for a rollout. What differs between bases is a small `Family`
record: Qwen2-Audio's is here, Qwen2.5-Omni's comes from recipes/omni.py when a config.json names it.
LoRA plugs in through an `adapters` object (recipes/lora.py) at loading and saving.
"""

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
from transformers import GenerationConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # one line per checkpoint load is noise in a training log

from data import SAMPLE_RATE, Sample, build_prompt

# Both end a completion: <|im_end|> closes the assistant turn, <|endoftext|> is also the pad token.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# The real Qwen2 special tokens, in their real order (ids 151643.. in the 7B tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


# -----------------------------------------------------------------------------
# The two families

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
    input_checks: tuple = ()  # forward pre-hooks on model.model for what the model itself does not check


# Qwen2-Audio's Whisper position table is a fixed sinusoid stored as a parameter; the class freezes it,
# from_pretrained unfreezes it.
QWEN2_AUDIO = Family("Qwen2-Audio", ("qwen2_audio",), Qwen2AudioForConditionalGeneration, Qwen2AudioConfig,
                     Qwen2AudioProcessor, "model.multi_modal_projector", SPECIAL_TOKENS, {},
                     frozen=("model.audio_tower.embed_positions",))


def family_of(path):
    """The family of a model folder, by its config.json's model_type (a LoRA checkpoint: of its base)."""
    path = Path(adapter_base(path) or path)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type in QWEN2_AUDIO.model_types:
        return QWEN2_AUDIO
    return other_family(lambda f: model_type in f.model_types, f"{path}: config.json has model_type {model_type!r}")


def family_of_config(config):
    if isinstance(config, QWEN2_AUDIO.config_class):
        return QWEN2_AUDIO
    return other_family(lambda f: isinstance(config, f.config_class), f"a {type(config).__name__}")


def family_of_processor(processor):
    if isinstance(processor, QWEN2_AUDIO.processor_class):
        return QWEN2_AUDIO
    return other_family(lambda f: isinstance(processor, f.processor_class), f"a {type(processor).__name__}")


def other_family(matches, what):
    """A base beyond R1-AQA's: Qwen2.5-Omni's thinker, whose record is in recipes/omni.py."""
    try:
        from recipes import omni  # an extra, imported only for a model that is not Qwen2-Audio
    except ModuleNotFoundError:
        raise UsageError(f"{what}: only Qwen2-Audio is built in; Qwen2.5-Omni needs recipes/omni.py, which "
                         f"this copy of the project does not have") from None
    if not matches(omni.OMNI):
        raise UsageError(f"{what}, but this project trains Qwen2-Audio ({', '.join(QWEN2_AUDIO.model_types)}) "
                         f"or Qwen2.5-Omni ({', '.join(omni.OMNI.model_types)})")
    return omni.OMNI


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
        json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UsageError(f"{flag} {config}: not a JSON object ({e})") from None
    try:
        family_of(path)
    except UsageError as e:
        raise UsageError(f"{flag} {e}") from None
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
    keys), the parameters that never get a gradient are frozen, and the family's checks of the inputs
    run before every forward."""
    for name in family.frozen:
        model.get_submodule(name).requires_grad_(False)
    for name in family.unused:
        parent, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent), child)
    for hook in family.input_checks:
        model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def adapter_base(path):
    """The base model folder of a LoRA checkpoint (adapters in PEFT's layout and no model weights beside
    them: every checkpoint of a LoRA run), else None. A folder with both is a LoRA run's last checkpoint
    as this project wrote it before merged/: its weights already hold the adapters, so it is a model."""
    path = Path(path)
    if (path / "config.json").exists() or not (path / "adapter_config.json").exists():
        return None
    return Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])


def merge_adapters(model, folder):
    """Fold the LoRA adapters saved in folder into the model's weights (recipes/lora.py)."""
    from recipes import lora  # an extra: only a LoRA checkpoint gets here
    lora.merge_saved(model, folder)


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

def shard(model, param_dtype=None, frozen_base=False):
    """Shard with FSDP2 over all processes: each audio-encoder layer, each decoder layer, the lm_head,
    then `model.model` (embeddings, conv stem, projector, norms). grpo.py calls `model.model` and
    `model.lm_head` directly, so those two are the units that run the root's hooks. Parameters stay
    in their own dtype (fp32 master weights for the policy); param_dtype is the compute dtype, and
    gradients are reduced in fp32.
    With `frozen_base` (LoRA: only adapters train) FSDP manages only what trains: every frozen
    parameter is an ignored param, so each rank keeps the whole frozen base as it is (no sharding, no
    all-gather, no fp32 master, gradient or optimizer state). A layer with nothing to train (lm_head,
    or the encoder layers without audio adapters) stays a plain module; `model.model` is sharded even
    with nothing of its own to train, as the root whose hooks run around every layer inside it."""
    mesh = init_device_mesh(_device_type(), (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    frozen = {p for p in model.parameters() if not p.requires_grad} if frozen_base else None
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


def sharded_load(path, param_dtype=None, storage_dtype=torch.float32, gradient_checkpointing=False, adapters=None):
    """Build the model on the meta device on every rank, shard it, and fill the shards from rank 0,
    which alone reads the checkpoint: host memory holds one full copy, not one per rank.
    With `adapters` (recipes/lora.py) they are added before sharding and only they train: the frozen
    base is kept whole on every rank in the compute dtype (param_dtype, else storage_dtype), the
    adapters are sharded in fp32 and start from adapters.initial(model)."""
    device = torch.device(_device_type(), torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    base_dtype = (param_dtype or storage_dtype) if adapters else storage_dtype  # a frozen base needs no fp32 master
    family = family_of(path)
    model = meta_model(family.config_class.from_pretrained(path)).to(base_dtype)
    if adapters:
        adapters.wrap(model)  # fp32 adapters; the rest frozen
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    shard(model, param_dtype, frozen_base=adapters is not None)
    model.to_empty(device=device)
    full = {}
    if dist.get_rank() == 0:
        full = read_pretrained(family, path).state_dict()
    if adapters:
        full = broadcast_frozen(model, full) | (adapters.initial(model) if dist.get_rank() == 0 else {})
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=adapters is None))
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


def gathered_state_dict(model, dtype, keep=lambda name: False):
    """The whole model's weights in `dtype` on rank 0's CPU (other ranks get {}), gathered tensor by
    tensor: each shard is cast on its own device before the all-gather, so the host holds one copy in
    `dtype` (16.8 GB in bf16 at 7B) instead of an fp32 copy plus its cast (about 50 GB at the peak).
    keep(name): tensors kept in their own dtype (LoRA's fp32 adapters, to be merged)."""
    out = {}
    for name, tensor in get_model_state_dict(model).items():
        whole = tensor if keep(name) else tensor.to(dtype)
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


def meta_model(config):
    """The model on the meta device, as this project runs it (for_audio): shapes and parameter counts
    without memory."""
    family = family_of_config(config)
    with torch.device("meta"):
        return for_audio(family.model_class(config), family)


@torch.no_grad()
def generate(model, processor, samples: list[Sample], audios, prompt: str, max_new_tokens: int,
             system_prompt: str | None = None, think_words: int = 0) -> list[str]:
    """Greedy completions for one batch, decoded with special tokens skipped (held-out scores and
    evaluate.py). Other generation settings (e.g. a repetition penalty) come from the checkpoint, as in
    R1-AQA's test script. `model` is a plain model, or a sharded policy inside `unsharded(model)`: every
    unit is gathered, so each rank decodes alone (synced_gpus=False) and ranks may make different
    numbers of calls, or none."""
    tokenizer = processor.tokenizer
    batch = collate(processor, samples, audios, prompt, system_prompt, think_words).to(model.device)
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, synced_gpus=False,
                         eos_token_id=end_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         suppress_tokens=suppressed_token_ids(tokenizer, model.config.text_config.vocab_size))
    completions = out[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
    return processor.batch_decode(completions, skip_special_tokens=True)
