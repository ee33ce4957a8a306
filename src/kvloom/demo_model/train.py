"""``python -m kvloom.demo_model.train``: train the demo model on 2 CPU cores.

Builds the tokenizer from the corpus's training split (or takes the one of ``--init``), then trains a
Llama-shaped model (~5M parameters) in up to three phases:

1. ``--repeat-steps`` of ``data.repeat_batch`` (a random span, then the span again): copying at a fixed
   offset, learned from nothing in a few hundred steps;
2. ``--induction-steps`` of ``data.induction_row`` (chunks copied from random earlier places): copying
   by content, the induction heads that answering from a passage and quoting a request into a tool
   call need. From nothing they stayed at chance for 450 steps; from a model that has learned the
   chats they formed in ~300;
3. ``--steps`` of generated chats with the loss on the assistant's replies only, following a
   curriculum (copying and key-value lookups first, then the full mix), with
   ``--induction-rows-later`` rows of the ``--beside`` lesson in every step: without them the chats
   unlearn the lesson within 300 steps.

The shipped model is two runs: the first from nothing with the fixed-offset lesson, the second from
its checkpoint (``--init``) with the induction lesson; ``docs/demo-model.md`` has both commands. Every
``--eval-every`` steps it prints the held-out loss, the held-out accuracy of the induction lesson, and
per task how many held-out replies the model would write exactly under greedy decoding
(teacher-forced argmax equal to every reply token: the same thing, at the cost of one forward). The
result is a Hugging Face checkpoint directory (float16 safetensors, tokenizer, chat template,
generation config) plus ``training_log.json``.

Seeded: the same arguments give the same examples in the same order; the weights also depend on the
machine's floating-point reductions (thread count, CPU kind).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvloom.demo_model.corpus import TASKS, generate
from kvloom.demo_model.data import batches, collate, encode, induction_batch, repeat_batch, stream
from kvloom.demo_model.tokenizer import train_tokenizer

WARMUP_MIX = {"copy": 4.0, "lookup": 4.0, "qa": 1.0, "json": 0.5, "tool_call": 0.5}
MIDDLE_MIX = {"copy": 2.0, "lookup": 2.0, "qa": 2.0, "summary": 0.5, "json": 1.0, "tool_call": 1.0, "tool_loop": 0.5,
              "code_edit": 0.5, "structured": 0.3, "story": 0.3, "fact": 0.3}
FINAL_MIX = {"copy": 0.5, "lookup": 0.7, "qa": 2.0, "summary": 0.6, "code_edit": 1.0, "tool_call": 2.0,
             "tool_loop": 1.5, "tool_none": 0.6, "structured": 0.8, "json": 1.5, "story": 0.4, "fact": 0.4}


def curriculum(progress: float) -> dict[str, float]:
    """The task mix at ``progress`` (0..1 of the chat phase): copying first, then everything."""
    if progress < 0.1:
        return WARMUP_MIX
    if progress < 0.25:
        return MIDDLE_MIX
    return FINAL_MIX


def _masked_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over the positions ``mask`` selects (``collate``'s shifted mask), and the
    ``[B, T-1, vocab]`` logits that predicted tokens ``1..T-1``."""
    logits = model(input_ids=ids).logits[:, :-1]
    m = mask[:, :-1]
    loss_tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="none").view_as(m)
    return (loss_tok * m).sum() / m.sum().clamp(min=1), logits


def model_config(vocab_size: int, args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    config_cls: Any = LlamaConfig  # untyped keyword arguments
    return config_cls(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.ffn,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=[1, 4], pad_token_id=2, hidden_act="silu", head_dim=args.hidden // args.heads,
        architectures=["LlamaForCausalLM"],
    )


def heldout_set(tokenizer: Any, per_task: int, seed: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    rng = random.Random(seed)
    return {task: [encode(generate(task, rng, "heldout"), tokenizer) for _ in range(per_task)] for task in sorted(TASKS)}


@torch.no_grad()
def evaluate(model: Any, held: dict[str, list[tuple[list[int], list[int]]]], pad_id: int,
             spans: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Held-out loss per reply token, per task the fraction of replies greedy decoding writes exactly,
    and the token accuracy on held-out rows of the induction lesson (``spans``: whether the induction
    heads are still there; logged as ``span_copy_accuracy``, which in run 5's log was repeated spans)."""
    model.eval()
    total_loss, total_tokens, exact = 0.0, 0.0, {}
    ids, mask = spans
    logits = model(input_ids=ids).logits[:, :-1]
    span_accuracy = float(((logits.argmax(-1) == ids[:, 1:]).float() * mask[:, :-1]).sum() / mask[:, :-1].sum())
    for task, rows in held.items():
        hits = 0
        for start in range(0, len(rows), 16):
            ids, mask = collate(rows[start:start + 16], pad_id)
            logits = model(input_ids=ids).logits[:, :-1]
            targets, m = ids[:, 1:], mask[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="none").view_as(m)
            total_loss += float((loss * m).sum())
            total_tokens += float(m.sum())
            wrong = ((logits.argmax(-1) != targets).float() * m).sum(-1)
            hits += int((wrong == 0).sum())
        exact[task] = hits / len(rows)
    model.train()
    return {"heldout_loss": total_loss / total_tokens, "span_copy_accuracy": span_accuracy, "exact": exact}


def save(model: Any, tokenizer: Any, out: Path, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    model.float()
    tokenizer.save_pretrained(out)
    generation_config_cls: Any = GenerationConfig  # untyped constructor
    generation_config = generation_config_cls(bos_token_id=0, eos_token_id=[1, 4], pad_token_id=2)
    generation_config.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvloom.demo_model.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    parser.add_argument("--repeat-steps", type=int, default=500, help="steps of repeated random spans first")
    parser.add_argument("--induction-steps", type=int, default=0, help="then steps of chunks copied by content")
    parser.add_argument("--induction-rows", type=int, default=32, help="rows per step of either lesson")
    parser.add_argument("--steps", type=int, default=2200, help="steps on chats after the lessons")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="stop early (and still save) after this")
    parser.add_argument("--token-budget", type=int, default=3072, help="padded tokens per chat batch")
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate of the lessons")
    parser.add_argument("--chat-lr", type=float, default=8e-4, help="peak learning rate on chats (cosine to 10%%)")
    parser.add_argument("--induction-rows-later", type=int, default=8,
                        help="rows of the --beside lesson added to every chat step (0: none)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint (its tokenizer and weights) instead of from nothing")
    parser.add_argument("--beside", choices=("induction", "repeat"), default="repeat",
                        help="which lesson's rows are trained beside every chat step")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after this many chat steps (the schedule still spans --steps)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--tokenizer-examples", type=int, default=20_000, help="chats the BPE is trained on")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-per-task", type=int, default=48)
    args = parser.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_cls: Any = LlamaForCausalLM  # untyped constructor
    if args.init is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init)
        model = model_cls.from_pretrained(args.init, torch_dtype=torch.float32)
    else:
        tokenizer = train_tokenizer(args.vocab, seed=args.seed, examples=args.tokenizer_examples)
        model = model_cls(model_config(len(tokenizer), args))
    print(f"tokenizer: {len(tokenizer)} tokens ({time.perf_counter() - started:.0f} s)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    held = heldout_set(tokenizer, args.eval_per_task, args.seed + 1)
    step = 0

    def mix() -> dict[str, float]:
        return curriculum(step / args.steps)  # asked before each draw: the mix follows the run's progress

    source = stream(args.seed, "train", mix, tokenizer, args.max_len)
    data = batches(source, token_budget=args.token_budget, pool=256, pad_id=2, seed=args.seed)
    log: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "repeat": [],
                           "induction": [], "steps": [], "evals": []}
    window: list[float] = []
    tokens_seen = 0
    induction_rng = random.Random(args.seed + 2)

    def next_induction(rows: int, rng: random.Random = induction_rng) -> tuple[torch.Tensor, torch.Tensor]:
        # Ids of merged tokens only (after the 5 special and 256 byte tokens).
        return induction_batch(rng, rows, first_id=5 + 256, vocab_size=len(tokenizer), bos_id=0, pad_id=2)

    def next_repeat(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return repeat_batch(induction_rng, rows, first_id=5 + 256, vocab_size=len(tokenizer),
                            sep_id=tokenizer.encode("\n")[0], end_id=4, bos_id=0, pad_id=2)

    held_spans = next_induction(32, random.Random(args.seed + 3))
    lessons = [("repeat", i, next_repeat) for i in range(1, args.repeat_steps + 1)]
    lessons += [("induction", i, next_induction) for i in range(1, args.induction_steps + 1)]
    for n, (lesson, i, make) in enumerate(lessons, 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, n / 50)
        ids, mask = make(args.induction_rows)
        loss, logits = _masked_loss(model, ids, mask)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += int(ids.numel())
        if i % 50 == 0:
            m = mask[:, :-1]
            acc = float(((logits.argmax(-1) == ids[:, 1:]).float() * m).sum() / m.sum())
            elapsed = time.perf_counter() - started
            log[lesson].append({"step": i, "loss": loss.item(), "copy_accuracy": acc, "seconds": elapsed})
            print(f"{lesson} {i:4d}  loss {loss.item():.3f}  copy accuracy {acc:.3f}  {elapsed / 60:.1f} min",
                  flush=True)
    warmup = max(1, args.steps // 50)
    while step < args.steps:
        lr = args.chat_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, mask = next(data)
        loss = _masked_loss(model, ids, mask)[0]
        if args.induction_rows_later:  # keep the copying heads: chats alone unlearn them in a few hundred steps
            keep_ids, keep_mask = (next_induction if args.beside == "induction" else next_repeat)(
                args.induction_rows_later)
            loss = loss + _masked_loss(model, keep_ids, keep_mask)[0]
            tokens_seen += int(keep_ids.numel())
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(ids.numel())
        window.append(loss.item())
        elapsed = time.perf_counter() - started
        if step % 50 == 0:
            avg = sum(window) / len(window)
            window.clear()
            log["steps"].append({"step": step, "loss": avg, "lr": lr, "tokens": tokens_seen, "seconds": elapsed})
            print(f"step {step:5d}  loss {avg:.3f}  lr {lr:.2e}  tokens {tokens_seen / 1e6:.2f}M  {elapsed / 60:.1f} min",
                  flush=True)
        out_of_time = elapsed > args.max_minutes * 60
        stop = out_of_time or step == args.stop_after
        if step % args.eval_every == 0 or step == args.steps or stop:
            result = evaluate(model, held, 2, held_spans)
            log["evals"].append({"step": step, "seconds": elapsed, **result})
            exact = "  ".join(f"{k} {v:.2f}" for k, v in result["exact"].items())
            print(f"eval {step:5d}  heldout loss {result['heldout_loss']:.3f}  copy lesson {result['span_copy_accuracy']:.3f}"
                  f"  exact: {exact}", flush=True)
            save(model, tokenizer, args.out, torch.float16)
            (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        if stop:
            why = f"--max-minutes {args.max_minutes}" if out_of_time else f"--stop-after {args.stop_after}"
            print(f"stopping at step {step}: {why} reached", file=sys.stderr)
            break
    print(f"done: {step} steps, {tokens_seen / 1e6:.1f}M tokens, {(time.perf_counter() - started) / 60:.1f} min",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
