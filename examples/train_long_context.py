"""Long-context fine-tuning with ring attention over every rank, through progressive context stages.

    torchrun --nproc_per_node 2 examples/train_long_context.py                        # CPU, gloo, tiny Llama
    torchrun --nproc_per_node 8 examples/train_long_context.py --model /path/to/llama \\
        --stages 16384,65536,262144 --rope ntk --steps 200 --ckpt ckpt/                  # GPUs, NCCL

Each stage trains at one sequence length with its own RoPE: ``--rope ntk`` / ``critical`` sets the base theta
from ``ring-attn rope-plan``'s rules for that length (the model's trained length -> the stage's), ``--rope yarn``
sets YaRN scaling, ``--rope none`` keeps the model's (as does a stage within the model's trained length, whatever
the stage before it used); ``--plan FILE`` (repeatable) takes a stage from a
``ring-attn rope-plan --json`` output instead (length = its ``target``, theta = its ``ntk_theta`` or
``critical_theta`` per ``--rope``, or its ``yarn`` block). The sequence is sharded over all ranks (zigzag) by
``shard_batch``; the loss is :func:`causal_lm_loss_from_hidden` (the output embedding applied one block of tokens
at a time, so no logits tensor; :func:`causal_lm_loss` on the logits for models outside ``MODEL_FAMILIES``), so
averaged gradients equal one-process training on the whole sequence. bf16 autocast on GPU, gradient
checkpointing, a progress bar with tokens/s and loss on stderr, a checkpoint at the end of every stage and every
``--ckpt-every`` steps, and ``--resume`` from the latest one.
Data: random tokens (a smoke run); plug your own loader into ``batches()``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from ring_attn import rope_plan
from ring_attn.integrations import hf
from ring_attn.integrations.kld import Progress


def _stages(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sequence lengths (ints >= 2), got {text!r}") \
            from None
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"expected sequence lengths >= 2 (a token and the one it predicts), "
                                         f"got {text!r}")
    return lengths


def _plan_file(path: str) -> dict:
    try:
        with open(path) as fh:
            plan = json.load(fh)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{path!r} is not a readable `ring-attn rope-plan --json` file ({exc})") \
            from None
    if not isinstance(plan, dict) or not isinstance(plan.get("target"), int):
        raise argparse.ArgumentTypeError(f"{path!r} has no integer 'target': not a `ring-attn rope-plan --json` "
                                         f"output")
    return plan


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local transformers model dir (default: random tiny Llama)")
    p.add_argument("--stages", type=_stages, default="32,64", help="comma-separated sequence lengths, one per stage")
    p.add_argument("--plan", type=_plan_file, action="append", default=[],
                   help="a `ring-attn rope-plan --json` file per stage")
    p.add_argument("--rope", choices=("ntk", "critical", "yarn", "none"), default="ntk",
                   help="how each stage sets RoPE for its length (default ntk)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (global)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--layout", choices=("zigzag", "contiguous", "striped"), default="zigzag")
    p.add_argument("--ckpt", default=None, help="checkpoint directory")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: stage ends)")
    p.add_argument("--resume", action="store_true", help="resume from --ckpt/latest.pt when it exists")
    p.add_argument("--max-steps-this-run", type=int, default=0,
                   help="stop (after checkpointing) once this many steps ran in this process, e.g. to test resume")
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (the random tiny model's init is fixed)")
    args = p.parse_args(argv)
    for flag in ("steps", "batch"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("ckpt_every", "max_steps_this_run"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.resume and not args.ckpt:
        p.error("--resume needs --ckpt")
    return args


def load_model(path, device):
    import transformers

    if path is None:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                       rope_theta=10000.0)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                                  torch_dtype=torch.float32)
    return model.to(device)


def _rope_base(config):
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def stage_plans(args, config):
    """[(length, rope dict or None)] for every stage; the rope dict is ``{"rope_type", "rope_theta", ...}``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    trained = config.max_position_embeddings
    theta = _rope_base(config)
    plans = []
    if args.plan:
        plans = list(args.plan)
    else:
        for length in args.stages:
            plans.append(rope_plan.plan(head_dim, theta, trained, max(length, trained + 1)) if length > trained
                         else {"target": length})
    stages = []
    for p in plans:
        length = int(p["target"])
        if args.rope == "none" or "ntk_theta" not in p:
            rope = None
        elif args.rope == "yarn":
            y = p["yarn"]
            rope = {"rope_type": "yarn", "rope_theta": theta, "factor": y["factor"],
                    "original_max_position_embeddings": y["original_max_position_embeddings"],
                    "beta_fast": y["beta_fast"], "beta_slow": y["beta_slow"]}
        else:
            rope = {"rope_type": "default", "rope_theta": p["ntk_theta" if args.rope == "ntk" else "critical_theta"]}
        stages.append((length, rope))
    return stages


def model_rope(config):
    """The model's own RoPE as :func:`set_rope` takes it (what a stage without a RoPE of its own trains with)."""
    params = getattr(config, "rope_parameters", None)
    if params:  # transformers 5.x
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    return {"rope_type": scaling.pop("rope_type", scaling.pop("type", "default")), "rope_theta": _rope_base(config),
            **scaling}


def set_rope(model, rope):
    """Point the model's config at ``rope`` and rebuild its rotary embedding (transformers 4.48 and 5.x); nothing
    to do when the config already says ``rope``."""
    cfg = model.config
    if rope == model_rope(cfg):
        return
    if hasattr(cfg, "rope_parameters"):  # transformers 5.x
        cfg.rope_parameters = dict(rope)
    else:
        cfg.rope_theta = rope["rope_theta"]
        cfg.rope_scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items()
                                                                       if k != "rope_theta"}
    inner = model.model
    device = next(model.parameters()).device
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg).to(device)


def batches(vocab, length, batch, seed):
    """Random token batches (the same on every rank): replace with a real loader."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        yield {"input_ids": ids, "labels": ids.clone()}


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    else:  # plain `python examples/train_long_context.py`: one rank
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = load_model(args.model, device)
    model.config.use_cache = False
    if not args.no_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    stages = stage_plans(args, model.config)
    own_rope = model_rope(model.config)  # stages without a RoPE of their own (None) train with it, resumed or not
    start_stage, start_step = 0, 0
    latest = os.path.join(args.ckpt, "latest.pt") if args.ckpt else None
    if args.resume and latest and os.path.exists(latest):
        state = torch.load(latest, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_stage, start_step = state["stage"], state["step"]
        if rank == 0:
            print(f"resumed from {latest}: stage {start_stage}, step {start_step}", flush=True)

    def save(stage, step):
        if latest is None:
            return
        if rank == 0:
            os.makedirs(args.ckpt, exist_ok=True)
            tmp = latest + ".tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "stage": stage, "step": step,
                        "rope": stages[stage][1] if stage < len(stages) else None}, tmp)
            os.replace(tmp, latest)
        dist.barrier()

    handle = hf.patch_hf(model, group=dist.group.WORLD, layout=args.layout)
    model.train()
    loss_value = float("nan")
    ran = 0
    for si in range(start_stage, len(stages)):
        length, rope = stages[si]
        rope = rope or own_rope
        set_rope(model, rope)
        data = batches(model.config.vocab_size, length, args.batch, args.seed + 1000 * si)
        first = start_step if si == start_stage else 0
        for _ in range(first):  # the same data order as an uninterrupted run
            next(data)
        bar = Progress((args.steps - first) * length * args.batch, f"stage {si} ({length} tok, "
                       f"{rope.get('rope_type', 'model')} θ={rope.get('rope_theta', _rope_base(model.config)):.4g})",
                       enabled=rank == 0)
        for step in range(first, args.steps):
            t0 = time.monotonic()
            local = hf.shard_batch(next(data), layout=args.layout)
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in local.items()
                      if k not in ("shift_labels", "num_items_in_batch")}
            labels = local["shift_labels"].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                if model.config.model_type in hf.MODEL_FAMILIES:  # the head applied per block: no logits tensor
                    hidden = model.model(**inputs).last_hidden_state
                    loss = hf.causal_lm_loss_from_hidden(model, hidden, labels, local["num_items_in_batch"],
                                                         grad_average_world=world)
                else:
                    loss = hf.causal_lm_loss(model(**inputs).logits, labels, local["num_items_in_batch"],
                                             grad_average_world=world)
            loss.backward()
            for p in model.parameters():  # data-parallel averaging (DDP does the same)
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            opt.zero_grad(set_to_none=True)
            rep = loss.detach().clone()
            dist.all_reduce(rep)
            loss_value = rep.item() / world
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at stage {si} step {step}")
            bar.update(length * args.batch, f"loss {loss_value:.4f} ({time.monotonic() - t0:.2f} s/step)")
            ran += 1
            if args.max_steps_this_run and ran == args.max_steps_this_run:
                bar.close()
                save(si, step + 1) if step + 1 < args.steps else save(si + 1, 0)
                if rank == 0:
                    print(f"stopped after {ran} steps (stage {si}, step {step + 1}); loss {loss_value!r}", flush=True)
                handle.undo()
                dist.destroy_process_group()
                return 0
            if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                save(si, step + 1)
        bar.close()
        save(si + 1, 0)
    handle.undo()
    if rank == 0:
        print(f"done: {len(stages)} stages, {ran} steps in this run, final loss {loss_value!r}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
