"""HellaSwag scoring speed: gpt2lab's evaluator vs a plain batched loop over transformers' GPT2LMHeadModel.

Both score the same examples with the same (random, seeded) weights of the chosen size, the way
lm-evaluation-harness does: the summed log-probability of each ending's tokens after the context.

  gpt2lab             `gpt2lab.evals.benchmarks.eval_multiple_choice`: an example's context and its four endings
                      packed in one sequence (block mask), the LM head only where a token is scored
  gpt2lab unpacked    (--ablation) the same code with every ending in a sequence of its own
  transformers        GPT2LMHeadModel (sdpa attention): each (context + ending) a row, right-padded with
                      an attention mask, full logits, log-softmax, gather: the straightforward loop

Batch size counts examples for all three (transformers' batch holds 4 rows per example). After one
untimed warm-up pass of each, the configurations run interleaved --repeat times and the best time of
each is reported; the full-set estimate extrapolates to HellaSwag's 10,042 examples. The
implementations must agree (same predictions, log-probabilities within --tolerance), or the
script exits with status 1.

    python bench/evaluate.py                                   # gpt2, 200 examples, batch 1 8 32
    python bench/evaluate.py --n 64 --batch-sizes 1 16 --repeat 2 --json bench-eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from gpt2lab.evals import benchmarks as ev
from gpt2lab.evals import scoring
from gpt2lab.evals.data import load_hellaswag
from gpt2lab.model.config import GPTConfig
from gpt2lab.model.gpt import GPT
from gpt2lab.tokenizer import get_tokenizer
from gpt2lab.train.plan import count_params

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_name, hf_twin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = 10_042  # examples in HellaSwag's validation set


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def requests_for(tok, examples) -> list[scoring.Request]:
    out = []
    for ex in examples:
        pairs = [scoring.encode_pair(tok, ex.context, " " + c) for c in ex.choices]
        out.append(scoring.Request(pairs[0][0], [cont for _, cont in pairs]))
    return out


def run_gpt2lab(model, tok, examples, batch_size) -> list[list[float]]:
    res = ev.eval_multiple_choice(model, tok, examples, "hellaswag", batch_size=batch_size)
    return [r["scores"] for r in res.records]


def run_unpacked(model, tok, examples, batch_size) -> list[list[float]]:
    reqs = requests_for(tok, examples)
    single = [scoring.Request(r.context, [c]) for r in reqs for c in r.continuations]
    scores = scoring.score_requests(model, single, batch_size=4 * batch_size)
    flat = iter(s[0].logprob for s in scores)
    return [[next(flat) for _ in r.continuations] for r in reqs]


@torch.inference_mode()
def run_hf(hf, tok, examples, batch_size) -> list[list[float]]:
    L = hf.config.n_positions
    reqs = requests_for(tok, examples)
    out = []
    for s in range(0, len(reqs), batch_size):
        rows = []  # (input ids, continuation ids)
        for r in reqs[s:s + batch_size]:
            for cont in r.continuations:
                whole = (list(r.context) + list(cont))[-(L + 1):]
                rows.append((whole[:-1], cont))
        T = max(len(inp) for inp, _ in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (inp, _) in enumerate(rows):
            ids[i, :len(inp)] = torch.tensor(inp)
            mask[i, :len(inp)] = 1
        logp = hf(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        lps = []
        for i, (inp, cont) in enumerate(rows):
            at = torch.arange(len(inp) - len(cont), len(inp))
            lps.append(logp[i, at, torch.tensor(cont)].sum().item())
        for k in range(0, len(lps), 4):
            out.append(lps[k:k + 4])
    return out


def predictions(examples, scores) -> tuple[list[int], list[int]]:
    acc = [max(range(len(s)), key=s.__getitem__) for s in scores]
    norm = [max(range(len(s)), key=lambda k, s=s, ex=ex: s[k] / max(len(ex.choices[k]), 1))
            for s, ex in zip(scores, examples)]
    return acc, norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="model preset (default gpt2, 124M)")
    p.add_argument("--n", type=int, default=200, help="HellaSwag examples to score (default 200)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the best is reported")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "eval" / "hellaswag_val.jsonl.gz"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ablation", action="store_true", help="also time gpt2lab without packing")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |log-prob difference| allowed")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.model)).eval()
    tok = get_tokenizer("gpt2")
    examples = load_hellaswag(args.data, args.n)
    impls = {"gpt2lab": lambda exs, b: run_gpt2lab(model, tok, exs, b)}
    if args.ablation:
        impls["gpt2lab unpacked"] = lambda exs, b: run_unpacked(model, tok, exs, b)
    if not args.no_hf:
        hf = hf_twin(model)
        impls["transformers"] = lambda exs, b: run_hf(hf, tok, exs, b)

    print(f"HellaSwag, {args.model} ({count_params(model) / 1e6:.0f}M params, random weights), "
          f"{len(examples)} examples, CPU: {machine()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    header = f"{'implementation':<18} {'batch':>5} {'seconds':>9} {'examples/s':>11} {'full 10,042':>12}"
    print(header)
    print("-" * len(header))
    # warm up: a first pass through the large buffers of the biggest batch leaves the process (the
    # allocator's state) several times faster at small batches; measuring from a cold start would
    # mostly reward whatever runs second
    warm = max(args.batch_sizes)
    for fn in impls.values():
        fn(examples[:2 * warm], warm)
    best: dict[tuple[str, int], float] = {}
    scores = {}
    for _ in range(args.repeat):
        for b in args.batch_sizes:
            for name, fn in impls.items():  # interleaved, so that a change of load hits all alike
                start = time.perf_counter()
                out = fn(examples, b)
                took = time.perf_counter() - start
                best[name, b] = min(best.get((name, b), float("inf")), took)
                scores.setdefault(name, out)
    rows = []
    for name in impls:
        for b in args.batch_sizes:
            rate = len(examples) / best[name, b]
            full = FULL / rate
            rows.append({"implementation": name, "batch_size": b, "seconds": best[name, b],
                         "examples_per_s": rate, "full_set_minutes": full / 60})
            print(f"{name:<18} {b:>5} {best[name, b]:>9.2f} {rate:>11.2f} {full / 60:>10.1f} min")
    print(f"load average after: {os.getloadavg()[0]:.2f}")

    ok = True
    ref = scores["gpt2lab"]
    ref_pred = predictions(examples, ref)
    checks = {}
    for name, other in scores.items():
        if name == "gpt2lab":
            continue
        diff = max(abs(a - b) for sa, sb in zip(ref, other) for a, b in zip(sa, sb))
        same = predictions(examples, other) == ref_pred
        checks[name] = {"max_abs_logprob_diff": diff, "same_predictions": same}
        print(f"gpt2lab vs {name}: max |log-prob difference| {diff:.2e}, "
              f"same acc/acc_norm predictions: {same}")
        ok &= same and diff <= args.tolerance
    acc = sum(p == ex.label for p, ex in zip(ref_pred[0], examples)) / len(examples)
    acc_norm = sum(p == ex.label for p, ex in zip(ref_pred[1], examples)) / len(examples)
    print(f"acc {acc:.4f}, acc_norm {acc_norm:.4f} (random weights: chance is 0.25)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "examples": len(examples), "machine": machine(), "results": rows,
            "agreement": checks, "acc": acc, "acc_norm": acc_norm}, indent=2) + "\n")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
