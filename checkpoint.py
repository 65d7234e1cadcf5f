"""Checkpoints and run folders: what train.py writes, how a run resumes exactly, and how runs never mix.

OUT/checkpoint-{step}/ is a Hugging Face model folder in the compute dtype (a LoRA run: the adapters in
PEFT's layout, and in its last checkpoint merged/, the merged model) plus train_state/ (fp32 weights and
AdamW, by torch.distributed.checkpoint), trainer_state.pt (step, schedule, RNG, counters, config) and
train_config.json. A checkpoint is written as .tmp, fsynced and renamed, so a complete copy of every saved
step is always on disk; a fresh run refuses a folder that holds another run, --resume one made with other
settings; resuming reads every pickle as plain data only. The disk a run needs is checked at its start.
docs/training.md has the layout, the order of the waits between processes, and the safety rules.
"""

import io
import json
import os
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

import model as M

# Config fields a resumed run may change: where the run folder is, where and how often it logs and
# saves, how long it runs, how it splits the batch in memory, and what it is evaluated on. Any other
# difference (model, data, group size, lr, seed, ...) would silently make the second half of the run
# another experiment, so --resume refuses it.
MAY_CHANGE_ON_RESUME = {"out", "max_steps", "save_every", "keep_last", "resume", "overwrite", "log_samples",
                        "max_bad_fraction", "eval_data", "eval_samples", "eval_every", "micro_batch", "gradient_checkpointing",
                        "audio_dir", "cache_dir", "plan", "gpus", "gpu_mem", "dist_timeout_minutes"}
RUN_FILES = ("metrics.jsonl", "samples.jsonl")  # what a run writes besides its checkpoints


# -----------------------------------------------------------------------------
# What is in a run folder

def step_of(path):
    """The step of a folder named checkpoint-{step}, else None (checkpoint-7.tmp, checkpoint-7.old, logs)."""
    prefix, _, step = Path(path).name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def complete(out):
    """Complete checkpoints in OUT, oldest first: a checkpoint-{step} folder with its trainer_state.pt,
    which save() writes last."""
    found = [(step_of(p), p) for p in Path(out).glob("checkpoint-*") if step_of(p) is not None]
    return [p for step, p in sorted(found) if (p / "trainer_state.pt").exists()]


def tidy(out):
    """Clear what a crash mid-save left behind (rank 0, before anything reads the folder): a .tmp folder
    is an unfinished save; an .old folder is a complete checkpoint whose replacement may not have
    arrived, so it goes back in place unless the replacement is complete."""
    for tmp in Path(out).glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp)
    for old in Path(out).glob("checkpoint-*.old"):
        final = old.with_suffix("")
        if (final / "trainer_state.pt").exists():
            shutil.rmtree(old)
        else:
            shutil.rmtree(final, ignore_errors=True)
            old.rename(final)


def check_run_folder(cfg, defaults):
    """What to do with OUT, decided the same way on every rank: the checkpoint to resume from, or None
    for a fresh run. Raises UsageError where a run would mix with another one."""
    out = Path(cfg.out)
    done = complete(out)
    logged = any((out / f).exists() and (out / f).stat().st_size for f in RUN_FILES)
    if cfg.resume and cfg.overwrite:
        raise M.UsageError("--resume and --overwrite contradict each other: give one")
    if cfg.resume:
        if not done:
            raise M.UsageError(f"--resume: no checkpoint in {out} (start without --resume, or check --out)")
        check_same_run(done[-1], asdict(cfg), defaults)
        return done[-1]
    if (done or logged) and not cfg.overwrite:
        newest = f"its newest checkpoint is step {step_of(done[-1])}" if done else "no checkpoint yet"
        raise M.UsageError(f"--out {out} already holds a run ({newest}): --resume continues it, --overwrite "
                           f"starts over (deleting it), or choose another --out")
    return None


def check_same_run(path, current, defaults):
    """--resume continues only the run it was: every field outside MAY_CHANGE_ON_RESUME must match."""
    saved = json.loads((path / "train_config.json").read_text())
    differ = [k for k in current if k not in MAY_CHANGE_ON_RESUME and saved.get(k, defaults[k]) != current[k]]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {current[k]} (the run has {saved.get(k, defaults[k])})"
                          for k in differ)
        raise M.UsageError(f"--resume: {path} was made with other settings: {flags}; resume with the run's "
                           f"settings, or start a new run in another --out")


def wipe(out):
    """--overwrite: delete what a run wrote in OUT (checkpoints, logs, a curriculum's pass rates), nothing else."""
    for p in [*Path(out).glob("checkpoint-*"), Path(out) / "pass_rates.parts"]:
        shutil.rmtree(p, ignore_errors=True)
    for f in (*RUN_FILES, "pass_rates.json"):
        (Path(out) / f).unlink(missing_ok=True)


def prune(out, keep_last):
    """Keep the newest keep_last (>= 1) checkpoints, and checkpoint-0 (the starting policy)."""
    for p in complete(out)[:-keep_last]:
        if step_of(p) != 0:
            shutil.rmtree(p)


def checkpoint_bytes(policy, lora, dtype_bytes, optimizer=True, merged=False):
    """One checkpoint folder: train_state/'s fp32 weights (LoRA: the adapters) and, once AdamW has stepped, its
    two fp32 moments of what trains; the Hugging Face weights in the compute dtype (LoRA: the adapters in
    fp32, and in the last checkpoint the merged model too). The config and tokenizer files are not counted."""
    total = sum(p.numel() for p in policy.parameters())                  # a DTensor's numel is the whole one's
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    moments = 2 * trained * 4 if optimizer else 0
    if lora:
        return trained * 4 + moments + trained * 4 + ((total - trained) * dtype_bytes if merged else 0)
    return total * 4 + moments + total * dtype_bytes


def saves(max_steps, save_every, start=0):
    """Checkpoints steps start+1 .. max_steps write: every save_every-th step, and the last."""
    return 0 if max_steps <= start else max_steps // save_every - start // save_every + (max_steps % save_every != 0)


def check_disk(run, resume_from):
    """Stop before anything is written if the checkpoints this run keeps at once cannot fit where --out is: a
    save writes a new one before pruning the oldest (keep_last + 1 at the peak), plus checkpoint-0 if it is
    still to come. Rank 0 measures the free space and every rank decides on its figure. Returns the bytes."""
    cfg, lora = run.cfg, run.recipe.adapters is not None
    start = step_of(resume_from) if resume_from else 0
    kept = len([p for p in complete(cfg.out) if step_of(p) != 0]) if resume_from else 0
    first = resume_from is None and bool(cfg.warm_start_steps or run.recipe.before_training)
    size = lambda **kw: checkpoint_bytes(run.policy, lora, getattr(torch, cfg.dtype).itemsize, **kw)
    at_once = min(saves(cfg.max_steps, cfg.save_every, start), cfg.keep_last + 1 - min(kept, cfg.keep_last))
    zero = size(optimizer=False, merged=cfg.max_steps == 0) if first else 0
    need = zero + ((at_once - 1) * size() + size(merged=True) if at_once else 0)
    free = torch.tensor([shutil.disk_usage(cfg.out).free if dist.get_rank() == 0 else 0], dtype=torch.float64,
                        device=run.device)
    dist.broadcast(free, src=0)
    if need > free.item():
        raise M.UsageError(f"--out {cfg.out}: the run needs about {need / 1e9:.1f} GB for its checkpoints "
                           f"({at_once} at once{' and checkpoint-0' if first else ''}) but {free.item() / 1e9:.1f} GB "
                           f"are free there: free some space, lower --keep-last, or choose another --out")
    return need


# -----------------------------------------------------------------------------
# Saving and loading

def save(run, step):
    """Write OUT/checkpoint-{step} (all ranks call): under a temporary name, fsynced, then renamed; then prune.
    Rank 0 works alone on what only it holds, while the others wait for it in a collective, each wait under
    the process group's timeout: writing the Hugging Face weights (others wait in dcp.save's first
    collective), fsyncing its own files and renaming (at the barrier), and pruning, after the barrier (in
    the next step's first collective) so that it never adds to the other two. Every rank fsyncs only the
    files it wrote: dcp's writer its train_state/ shards, rank 0 the rest."""
    cfg, rank = run.cfg, dist.get_rank()
    out = Path(cfg.out)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    folders = write_weights(run, step, tmp)
    if rank == 0:
        for folder in folders:
            run.processor.save_pretrained(folder)
    writer = dcp.FileSystemWriter(tmp / "train_state", sync_files=True)  # each rank fsyncs the shards it writes
    dcp.save(training_state(run), storage_writer=writer)
    counts = torch.tensor([run.counts["seen"], run.counts["bad"]], device=run.device)
    dist.all_reduce(counts)  # the run's totals, kept by rank 0
    seen, bad = counts.tolist()
    if rank == 0:
        torch.save({"step": step, "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "counts": {"seen": seen, "bad": bad}, "config": asdict(cfg)}, tmp / "trainer_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        publish(tmp, final)
    dist.barrier()  # the checkpoint is in place before any rank reads it (setup's reference, a resume)
    if rank == 0:
        prune(out, cfg.keep_last)


def write_weights(run, step, folder):
    """What a checkpoint's readers open: the Hugging Face model in the compute dtype, or a LoRA run's
    adapters and at its last step its merged model (recipes/lora.py). Every rank calls it: the weights are
    gathered. Returns the folders that hold a model or adapters (the processor goes beside them)."""
    dtype, adapters = getattr(torch, run.cfg.dtype), run.recipe.adapters
    if adapters is not None:
        return adapters.save(folder, run.policy, run.base, dtype, final=step == run.cfg.max_steps)
    weights = M.gathered_state_dict(run.policy, dtype)
    if dist.get_rank() == 0:
        run.policy.save_pretrained(folder, state_dict=weights)
    return [folder]


def model_state(run):
    """The weights train_state/ holds: all of them, or with LoRA the adapters alone (the base is frozen)."""
    state, adapters = get_model_state_dict(run.policy), run.recipe.adapters
    return state if adapters is None else {k: v for k, v in state.items() if adapters.trains(k)}


def training_state(run):
    """What train_state/ holds: the weights and, once it has any, the optimizer's state. A state dict of
    an optimizer that has not stepped yet would be made by taking a zero-gradient step, which starts
    AdamW's step count at 1 and puts its bias correction off by one for the whole run."""
    state = {"model": model_state(run)}
    if run.optimizer.state:
        state["optim"] = get_optimizer_state_dict(run.policy, run.optimizer)
    return state


def publish(tmp, final):
    """Make tmp the checkpoint `final` with no moment at which the step has no complete checkpoint."""
    fsync_tree(tmp, skip=tmp / "train_state")
    old = final.with_name(final.name + ".old")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(root, skip=None):
    """Push every folder under root, and every file but those in `skip` (fsynced by the processes that wrote
    them), to the disk: a kill is safe without it, a power cut is not."""
    for folder, _, files in os.walk(root):
        for name in files if Path(folder) != skip else ():
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(run, path):
    """Restore weights, optimizer (if the checkpoint has its state), scheduler and RNG; return the step.
    Every file is read as data, never as code (see "Reading a checkpoint safely" below)."""
    trainer = read_trainer_state(path / "trainer_state.pt")
    has_optim = holds_optimizer(path / "train_state")
    state = {"model": model_state(run)}
    if has_optim:
        state["optim"] = get_optimizer_state_dict(run.policy, run.optimizer)
    read_train_state(state, path / "train_state")
    set_model_state_dict(run.policy, state["model"], options=StateDictOptions(strict=run.recipe.adapters is None))
    if has_optim:
        set_optimizer_state_dict(run.policy, run.optimizer, state["optim"])
    run.scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    if dist.get_rank() == 0:
        run.counts.update(trainer["counts"])  # rank 0 carries the run's totals; others restart from 0
    return trainer["step"]


def holds_optimizer(train_state):
    """Whether a train_state/ written by save() holds optimizer state (checkpoint-0 does not)."""
    return any(key.startswith("optim") for key in read_metadata(train_state).state_dict_metadata)


# -----------------------------------------------------------------------------
# Reading a checkpoint safely. A checkpoint folder may come from elsewhere (shared, downloaded), and
# unpickling runs whatever callables a file names. What save() writes is plain data and tensors, so
# every pickle a resume reads is loaded with only those allowed, and anything else is refused by name.

# The globals of the metadata file torch.distributed.checkpoint writes (torch 2.13), besides dtypes.
# Its FileSystemReader unpickles that file with plain pickle, so read_metadata reads it first.
METADATA_GLOBALS = {*((m, p) for m in ("pathlib", "pathlib._local") for p in ("PosixPath", "WindowsPath")),
                    ("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                    *(("torch.distributed.checkpoint.metadata", name) for name in (
                        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorProperties",
                        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"))}


class MetadataUnpickler(pickle.Unpickler):
    """pickle, allowing only METADATA_GLOBALS and torch dtypes (checked before any module is imported)."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")


def refused(what, error):
    """The one-line UsageError for a pickle that names more than plain data and tensors."""
    named = re.search(r"GLOBAL (\S+)", str(error))
    holds = named.group(1) if named else str(error).strip().splitlines()[0]
    return M.UsageError(f"{what}: refused to load it: it names {holds}, which could run code; a checkpoint "
                        f"that train.py wrote holds only plain data and tensors")


def read_trainer_state(path):
    """trainer_state.pt with torch.load's weights_only=True: plain containers, numbers, strings, tensors."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None


def read_metadata(train_state):
    """train_state/.metadata (dcp's index of the tensors) through MetadataUnpickler."""
    path = Path(train_state) / ".metadata"
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None


class PlainDataPlanner(dcp.DefaultLoadPlanner):
    """dcp.load's default planner, except that a non-tensor entry (the optimizer's lr, betas, ...) must
    load with weights_only=True first: DefaultLoadPlanner.load_bytes unpickles it with weights_only=False."""

    def __init__(self, train_state):
        super().__init__()
        self.train_state = train_state

    def load_bytes(self, read_item, value):
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(f"{self.train_state} (entry {read_item.dest_index.fqn})", e) from None
        super().load_bytes(read_item, io.BytesIO(data))  # only plain data: the same objects, no code run


def read_train_state(state, train_state):
    """dcp.load(state) from train_state/, its metadata file and each non-tensor entry checked first. dcp
    gathers a rank's exception into a CheckpointException on every rank: the refusal is taken back out."""
    read_metadata(train_state)  # dcp.load unpickles the same file with plain pickle
    try:
        dcp.load(state, checkpoint_id=train_state, planner=PlainDataPlanner(train_state))
    except CheckpointException as e:
        refusal = next((exc for exc, _ in e.failures.values() if isinstance(exc, M.UsageError)), None)
        if refusal is None:
            raise
        raise refusal from None


# -----------------------------------------------------------------------------
# The run's logs

def truncate_log(path, step):
    """Drop records past `step`: a resumed run rewrites what the interrupted one logged after its checkpoint."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def append_jsonl(path, records):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
