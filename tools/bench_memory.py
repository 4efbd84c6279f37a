"""Peak memory of one emulator training step, with and without gradient checkpointing.

Each setting runs in a fresh process. The step's peak is the resident-set high-water mark during
forward + backward minus the resident set just before it (the model, its gradients from a warm-up
step and the batch are already there), so it measures what checkpointing is meant to cut: the
activations kept for backward.

    python tools/bench_memory.py --layers 12 --hidden 768 --seq 128 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(layers: int, hidden: int, seq: int, batch: int, checkpointing: bool) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from icot.models import Emulator
    from icot.models.decoder import set_gradient_checkpointing

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=hidden, n_head=max(hidden // 64, 1), n_positions=max(seq, 128),
                        vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    emulator = Emulator(GPT2LMHeadModel(config)).train()
    set_gradient_checkpointing(emulator.decoder, checkpointing)
    ids = torch.randint(1, config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    first_sep = torch.randint(seq // 4, seq // 2, (batch,))
    target = torch.randn(batch, layers, hidden)

    def step():
        loss = emulator.loss(emulator(ids, mask, first_sep), target)["loss"]
        loss.backward()

    step()  # warm-up: gradients and allocator pools exist before the measured step
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM, the peak resident set
    before = rss_kib("VmRSS")
    step()
    peak = rss_kib("VmHWM")
    return {"checkpointing": checkpointing, "step_peak_mib": (peak - before) / 1024,
            "process_peak_mib": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.layers, args.hidden, args.seq, args.batch, args.child == "on")
        print(json.dumps(result))
        return
    results = {}
    for setting in ("off", "on"):
        command = [sys.executable, __file__, "--child", setting, "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--seq", str(args.seq), "--batch", str(args.batch)]
        # Large blocks straight from mmap and back on free: the resident set then follows live
        # tensors instead of glibc's cached arenas, so before/peak measure what the step holds.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        results[setting] = json.loads(output.strip().splitlines()[-1])
    off, on = results["off"]["step_peak_mib"], results["on"]["step_peak_mib"]
    print(f"emulator step, {args.layers} layers x {args.hidden}, seq {args.seq}, batch {args.batch}")
    print(f"  without checkpointing: step peak {off:8.1f} MiB (process peak {results['off']['process_peak_mib']:.1f} MiB)")
    print(f"  with checkpointing:    step peak {on:8.1f} MiB (process peak {results['on']['process_peak_mib']:.1f} MiB)")
    print(f"  ratio with/without: {on / off:.3f}  (reduction {100 * (1 - on / off):.1f}%)")


if __name__ == "__main__":
    main()
