"""A plain-transformers harvest: the baseline `harvest run` is measured against, whole process.

    python pipelines/plain_harvest.py --model DIR --dataset FILE.jsonl --layer 8 --tokens 262144 \
        --context-length 128 --batch-size 8 --autocast bf16 --shard-tokens 65536 --out DIR

What a careful researcher writes without our tool, and no more: the documents tokenised in one
batched call of the fast tokenizer, joined with EOS into one stream, cut into contexts of
[BOS] + context_length - 1 tokens (as `harvest run --bos context` packs them); the model run in
batches under inference_mode and (optionally) bf16 autocast, the forward stopped at the hooked
block (a pre-hook on decoder layer `--layer` takes its input, the residual stream `resid_pre`,
and raises to skip the rest, as SAELens' stop_at_layer does); each shard of rows written as one
float16 .npy file, then fsynced (the same durability as a cache shard, without checksums,
statistics, ledger or resume). Prints one JSON line: tokens, seconds inside the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class _Stop(Exception):
    """Raised by the hook once the wanted block's input is captured."""


def contexts(texts: list[str], tokenizer, context_length: int, n_contexts: int) -> np.ndarray:
    """[n_contexts, context_length] int64: [BOS] + the next context_length - 1 stream tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream = np.fromiter((t for doc in ids for t in (*doc, sep)), dtype=np.int64)
    body = context_length - 1
    n = min(n_contexts, len(stream) // body)
    out = np.empty((n, context_length), dtype=np.int64)
    out[:, 0] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else sep
    out[:, 1:] = stream[: n * body].reshape(n, body)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True, help=".jsonl with a text field per line")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--autocast", choices=("none", "bf16"), default="bf16")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in open(args.dataset, encoding="utf-8") if line.strip()]
    ctx = args.context_length
    ids = contexts(texts, tokenizer, ctx, -(-args.tokens // ctx))
    captured: list[torch.Tensor] = []

    def take(module, inputs, kwargs):
        hidden = inputs[0] if inputs else kwargs["hidden_states"]
        captured.append(hidden.to(torch.float16))
        raise _Stop

    model.model.layers[args.layer].register_forward_pre_hook(take, with_kwargs=True)
    args.out.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, args.shard_tokens // ctx)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    loop = time.perf_counter()
    pending: list[np.ndarray] = []
    n_rows, shard = 0, 0

    def flush() -> None:
        nonlocal shard
        path = args.out / f"shard_{shard:05d}.npy"
        np.save(path, np.concatenate(pending))
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        pending.clear()
        shard += 1

    with torch.inference_mode(), autocast:
        for i in range(0, len(ids), args.batch_size):
            try:
                model(torch.from_numpy(ids[i : i + args.batch_size]), use_cache=False)
            except _Stop:
                pass
            rows = captured.pop().reshape(-1, model.config.hidden_size).numpy()
            pending.append(rows)
            n_rows += len(rows)
            if sum(len(p) for p in pending) >= per_shard * ctx:
                flush()
    if pending:
        flush()
    end = time.perf_counter()
    print(json.dumps({"tokens": n_rows, "loop_s": end - loop, "total_s": end - start, "shards": shard}))


if __name__ == "__main__":
    main()
