"""Train the tiny Qwen3-style model in ``data/tiny_qwen3/`` (notebook 06's weights), on the CPU.

    .venv/bin/python -m kvlab.train_tiny              # ~2-3 minutes on one CPU thread

The text is generated here, not downloaded: :func:`kvlab.model.tiny_corpus` writes sentences from
a small English grammar with a fixed seed (so its provenance is this repository, and it carries
no licence but the project's). The vocabulary is :class:`kvlab.model.CharTokenizer`'s 96
characters (newline + printable ASCII). The network is Hugging Face transformers'
``Qwen3ForCausalLM`` itself, trained in float32 with AdamW; the weights are saved under Hugging
Face's Qwen3 names (``model.safetensors``, tied ``lm_head`` left out) next to kvlab's
``config.json``, so both kvlab and transformers load them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kvlab.model import CharTokenizer, ModelConfig, tiny_corpus

ROOT = Path(__file__).resolve().parents[1]  # the repository (a development tool, not for wheels)
OUT = ROOT / "data" / "tiny_qwen3"

CONFIG = ModelConfig(vocab_size=96, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import Qwen3ForCausalLM

    text = tiny_corpus()
    tok = CharTokenizer()
    data = torch.from_numpy(np.array(tok.encode(text), dtype=np.int64))
    print(f"corpus: {len(text):,} chars, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    model = Qwen3ForCausalLM(CONFIG.to_hf()).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[i:i + args.seq + 1] for i in idx.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # HF shifts: t predicts t+1
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    elapsed = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (CONFIG.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(CONFIG.to_dict(), indent=2) + "\n")
    print(f"trained {args.steps} steps in {elapsed:.0f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
