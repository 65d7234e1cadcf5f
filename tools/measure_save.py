"""The host memory of writing a checkpoint: VmHWM of each process while checkpoint.save gathers the weights.

Saving gathers the weights tensor by tensor in the compute dtype (model.gathered_state_dict), so rank 0's
host holds one copy in bf16 rather than an fp32 copy plus its cast. This measures it on a model of a few
hundred million parameters, on 1 and 2 processes. docs/training.md has the figures.
    python -m tools.measure_save
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402

MIB = 2**20


def config_148m():
    """A mid-size Qwen2-Audio: the 7B's shapes scaled down (about 148M parameters)."""
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=512, encoder_layers=6, encoder_attention_heads=8,
                          encoder_ffn_dim=2048, num_mel_bins=128, max_source_positions=500),
        text_config=dict(model_type="qwen2", vocab_size=24000, hidden_size=1024, num_hidden_layers=6,
                         num_attention_heads=16, num_key_value_heads=16, intermediate_size=2816,
                         rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False),
        audio_token_index=23999)


def rss_mib(field):
    """VmRSS or VmHWM (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def old_way(policy, folder):
    """Before: the full fp32 state on rank 0's CPU, then a bf16 copy of it, then save_pretrained."""
    full = M.full_state_dict(policy)
    if dist.get_rank() == 0:
        policy.save_pretrained(folder, state_dict={k: v.to(torch.bfloat16) for k, v in full.items()})


def new_way(policy, folder):
    """Now: each shard cast to bf16 on its device, then gathered tensor by tensor (checkpoint.save)."""
    weights = M.gathered_state_dict(policy, torch.bfloat16)
    if dist.get_rank() == 0:
        policy.save_pretrained(folder, state_dict=weights)


def measure(way, source, out):
    """Load the model sharded (fp32 masters), then save it one way; return (MiB before, peak growth)."""
    M.init_distributed(always=True)
    policy = M.sharded_load(source, param_dtype=torch.bfloat16, storage_dtype=torch.float32)
    dist.barrier()
    before = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    {"old": old_way, "new": new_way}[way](policy, out)
    dist.barrier()
    return before, rss_mib("VmHWM") - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--way", choices=["old", "new"], help="(internal) measure one way in this process")
    parser.add_argument("--source", help="(internal) the bf16 checkpoint to load")
    args = parser.parse_args()
    if args.way:
        with tempfile.TemporaryDirectory() as out:
            before, growth = measure(args.way, args.source, out)
        if dist.get_rank() == 0:
            print(json.dumps({"way": args.way, "world": dist.get_world_size(), "before_mib": round(before, 1),
                              "peak_growth_mib": round(growth, 1)}))
        dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Qwen2AudioForConditionalGeneration(config_148m()).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        print(f"{params:,} parameters; bf16 weights {params * 2 / MIB:.0f} MiB, fp32 {params * 4 / MIB:.0f} MiB")
        for nproc in (1, 2):
            for way in ("old", "new"):
                launch = [sys.executable] + ([] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                                    f"--nproc_per_node={nproc}"])
                result = subprocess.run(launch + [__file__, "--way", way, "--source", tmp], capture_output=True,
                                        text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
