"""Train a small autoregressive transformer on GQ token shards (next-token prediction over the flattened grid).

    python examples/train_ar.py --shards OUTPUT --steps 300
    torchrun --nproc_per_node=2 examples/train_ar.py --shards s3://bucket/tokens --steps 300   # DDP (gloo on CPU)
    torchrun --nproc_per_node=2 examples/train_ar.py --shards IMAGENET LAION --weights 0.7 0.3 --checkpoint ck.pt
    python examples/train_ar.py --shards IMAGENET LAION --weights 0.7 0.3 --checkpoint ck.pt --resume  # 1 rank now

It shows the reading side of the pipeline end to end: TokenDataset (or TokenMixture, for several ``--shards``) splits
one global sample order over ranks and workers (``drop_last`` under DDP so every rank runs the same number of steps),
batches are int64 ``[B, G*h*w]``, and ``--checkpoint``/``--resume`` save and restore the model, the optimizer and the
exact position in the data. The data state is a position in the global order, so a run resumes with another number
of ranks or ``--num-workers``.
Token grids of real models are long (16x32x32 for 256 px); ``--max-len`` keeps a prefix so the demo stays CPU-sized.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from gq_pipeline.dataset import TokenDataset, TokenLoader  # noqa: E402
from gq_pipeline.mixture import TokenMixture  # noqa: E402


class TinyGPT(nn.Module):
    """Decoder-only transformer: token + position embeddings, causal self-attention, a linear head over the codebook."""

    def __init__(self, vocab: int, max_len: int, d_model: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.bos = vocab  # one extra id starts every sequence
        self.tok = nn.Embedding(vocab + 1, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab] predicting ``tokens[:, i]`` from ``tokens[:, :i]``."""
        b, n = tokens.shape
        x = torch.cat([torch.full((b, 1), self.bos, dtype=tokens.dtype, device=tokens.device), tokens[:, :-1]], 1)
        h = self.tok(x) + self.pos(torch.arange(n, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, nargs="+",
                   help="gq tokenize output(s) (local path or fsspec URL); several are mixed by --weights")
    p.add_argument("--weights", type=float, nargs="*", help="mixture weights, one per --shards (default: equal)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=256, help="train on the first N tokens of each grid")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=0, help="codebook size when the shards do not record it")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint", help="save model/optimizer/data state here at the end")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if ddp else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    # rank/world_size come from torch.distributed; drop_last gives every rank the same number of batches
    if len(args.shards) == 1:
        data = TokenDataset(args.shards[0], seed=args.seed, batch_size=args.batch_size, flatten=True, drop_last=ddp)
    else:
        weights = args.weights or [1.0] * len(args.shards)
        sources = [TokenDataset(url, seed=args.seed + i, flatten=True) for i, url in enumerate(args.shards)]
        data = TokenMixture(sources, weights, seed=args.seed, batch_size=args.batch_size, drop_last=ddp)
    loader = TokenLoader(data, num_workers=args.num_workers)
    vocab = data.codebook_size or args.vocab
    if not vocab:
        raise SystemExit("the shards do not record their codebook size: pass --vocab")
    model = TinyGPT(vocab, args.max_len, args.d_model, args.layers, args.heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict([json.loads(s) for s in ckpt["data"]])  # every saved rank's state: checked to agree
        step = ckpt["step"]
    net = nn.parallel.DistributedDataParallel(model) if ddp else model

    losses = []
    if len(loader) == 0:
        raise SystemExit(f"rank {rank} has no samples: an epoch holds {data.num_samples}")
    while step < args.steps:  # epochs; a restored state starts inside its epoch
        for batch in loader:
            tokens = batch["tokens"][:, : args.max_len].to(device)
            logits = net(tokens)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(f"step {step:5d}  epoch {data.epoch}  loss {loss.item():.4f}  "
                      f"(uniform: {math.log(vocab):.2f})", flush=True)
            if step >= args.steps:
                break
        else:
            data.set_epoch(data.epoch + 1)

    if args.checkpoint:
        states = [json.dumps(loader.state_dict())]
        if ddp:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, json.dumps(loader.state_dict()))
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "data": states, "step": step},
                       args.checkpoint)
    if rank == 0 and losses:
        k = max(1, min(5, len(losses) // 4))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        state = loader.state_dict()
        print(json.dumps({"steps": step, "first_loss": first, "last_loss": last, "world_size": data.world_size,
                          "epoch": state["epoch"], "position": state["position"]}), flush=True)
    if ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
