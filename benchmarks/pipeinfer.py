"""PipeInfer against plain pipelined decoding and synchronous speculative decoding, executed on CPU ranks with
SmolLM2-135M, the simulated timeline beside each measured number.

    python -m benchmarks.pipeinfer [--stages 2 3] [--delays-ms 2 20] [--tokens 64] [--repeats 2]
                                   [--draft ngram:1] [--n-draft 4] [--cutoff 0.3] [--depth 2] [--widths 1]

For each number of target stages S (ranks 0 .. S-1, rank S the drafter) and each emulated hop delay (added to
every message: stage to stage, last stage to the head, head to drafter and back, cancellations), one request at a
time on text prompts: plain (S ranks), sync and PipeInfer (S + 1) at each tree width of ``--widths``. Runs are
repeated ``--repeats`` times in alternating order; each cell is the median over repeats and requests, and
``noise`` the largest relative spread of a mode's ITL between repeats. Generation speed: tokens/s of one request
after its first token (1 / ITL). Every run's tokens are checked against plain decoding's (``lossless``).

Simulated (``exegpt.spec_sim``): the same head on a discrete-event timeline priced with what the executed runs of
that (S, delay) measured: each stage's seconds as a straight line in a run's tokens (fitted on the speculative
runs), the median hop, the drafter's seconds per token, and the acceptance model (greedy agreement rate and the
drafter's stop rate at the cutoff, and the siblings' rescue rate) pooled over the speculative runs.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from exegpt import Workload, evaluate_schedule
from exegpt.policies.pipeinfer import PipeInferSchedule
from exegpt.spec_sim import Acceptance, SpecCosts, SpecOptions, simulate_request

PROMPTS = (
    "The history of the city of Rome begins in the eighth century BC, when",
    "Photosynthesis is the process by which green plants use sunlight to",
    "To install the package, first make sure that Python 3 is available, then",
    "The main difference between a list and a tuple in Python is that",
)
MODES = ("plain", "sync", "pipeinfer")


def requests(tokens: int, n: int):
    """A short warm-up request (its numbers are left out), then ``n`` text prompts through SmolLM2's tokenizer,
    ``tokens`` tokens each to generate."""
    from runner.requests import Request
    from runner.weights import load_model

    _, _, tok = load_model("smollm2", layers=(0, 0), head=False)
    warm = Request(0, tuple(tok.encode(PROMPTS[-1])), 8)
    return (warm,) + tuple(Request(i + 1, tuple(tok.encode(p)), tokens) for i, p in enumerate(PROMPTS[:n]))


def configs(widths) -> list[tuple[str, int]]:
    """(mode, tree width) of every column: plain once, sync and PipeInfer at each width."""
    return [("plain", 1)] + [(m, w) for w in widths for m in MODES[1:]]


def plans(stages: int, delay_s: float, args, w: Workload) -> dict:
    out = {}
    for mode, width in configs(args.widths):
        n = stages + (mode != "plain")
        s = PipeInferSchedule(mode, stages, n, n_draft=args.n_draft, cutoff=args.cutoff, depth=args.depth,
                              draft=args.draft, link_delay_s=delay_s, width=width)
        out[mode, width] = evaluate_schedule(s, w, model="smollm2-135m", devices=f"{n}xA40")
    return out


def itl_ttft(rep) -> tuple[list[float], list[float]]:
    itl, ttft = [], []
    for r in rep.requests[1:]:  # after the warm-up
        itl.append((r.finish_s - r.first_token_s) / max(1, r.num_generated - 1))
        ttft.append(r.first_token_s - r.encode_start_s)
    return itl, ttft


def measured_costs(reps: dict, delay_s: float, stages: int) -> tuple[SpecCosts, Acceptance]:
    """The timeline's prices from every executed run of one (S, delay): each stage's line fitted on all their
    decode runs together (seconds on a run's padded tokens), the median hop, the drafter's seconds per token; the
    acceptance model of the speculative runs (the followed branch's agreement, the stops of the trunks, and the
    siblings' rescues per sibling tried, pooled over widths and repeats)."""
    from runner.spec_head import fit_line

    runs = [r.speculation for c in reps for r in reps[c]]
    fits = [fit_line(np.sum([sp["stage_sums"][s] for sp in runs], axis=0)) for s in range(stages)]
    hop = float(np.median([sp["hop_s"] for sp in runs])) if stages > 1 else delay_s
    layers = tuple(max(1, st["layers"] // max(1, st["runs"])) for st in runs[0]["stages"])
    spec = [r.speculation for c in reps if c[0] != "plain" for r in reps[c]]
    draft_tok = float(np.median([sp["draft_tok_s"] for sp in spec]))
    costs = SpecCosts(tuple(f[0] for f in fits), tuple(f[1] for f in fits), layers, hop, draft_tok_s=draft_tok)
    verified = sum(sp["verified"] for sp in spec)
    trunk = sum(sp["accepted"] - sp["rescued"] for sp in spec)
    tries, rescued = sum(sp["sibling_tries"] for sp in spec), sum(sp["rescued"] for sp in spec)
    stops = float(np.mean([sp["stop_p"] for sp in spec]))
    return costs, Acceptance(trunk / verified if verified else 0.0, stops, rescued / tries if tries else 0.0)


def simulated(costs: SpecCosts, acc: Acceptance, args, reqs, draws: int = 8) -> dict:
    out = {}
    for mode, width in configs(args.widths):
        rng = np.random.default_rng(0)  # the same draws for every column
        itl, ttft = [], []
        for _ in range(draws):
            for r in reqs[1:]:
                tl = simulate_request(costs, acc, SpecOptions(mode, args.n_draft, args.depth, width), r.input_len,
                                      r.output_len, rng)
                itl.append((tl.token_s[-1] - tl.token_s[0]) / (len(tl.token_s) - 1))
                ttft.append(tl.ttft_s)
        out[mode, width] = (float(np.median(itl)), float(np.median(ttft)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--delays-ms", type=float, nargs="+", default=[2.0, 20.0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft", default="ngram:1")
    ap.add_argument("--n-draft", type=int, default=4)
    ap.add_argument("--cutoff", type=float, default=0.3)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--widths", type=int, nargs="+", default=[1], help="tree widths of sync and PipeInfer")
    args = ap.parse_args()

    from runner.run import run_plans

    reqs = requests(args.tokens, args.requests)
    w = Workload.truncated_normal(input=(20, 4, 32), output=(args.tokens, 1, args.tokens + 1))
    print(f"SmolLM2-135M fp32, one thread a rank; {len(reqs) - 1} text prompts x {args.tokens} tokens; draft "
          f"{args.draft}, k={args.n_draft}, cutoff {args.cutoff}, depth {args.depth}; median of {args.repeats} "
          f"alternating repeats")
    head = (f"{'S':>2} {'hop ms':>6} {'mode':>9} {'w':>1} | {'ITL ms':>13} {'tok/s':>6} {'TTFT ms':>13} | "
            f"{'x plain':>11} {'x sync':>11} {'x w=1':>11} | {'accept':>6} {'rescued':>7} {'cancel':>6} "
            f"{'copies':>6} {'noise':>5}")
    print(head + "\n" + "-" * len(head))
    cols = configs(args.widths)
    for stages in args.stages:
        for delay_ms in args.delays_ms:
            ps = plans(stages, delay_ms / 1e3, args, w)
            reps = {c: [] for c in cols}
            for i in range(args.repeats):
                for c in (cols if i % 2 == 0 else cols[::-1]):  # one launch a column: plain has S ranks, others S + 1
                    reps[c] += run_plans([ps[c]], "smollm2", requests=reqs, timeout_s=1800, keep_tokens=True)
            ref = {r.id: r.tokens for r in reps["plain", 1][0].requests}
            lossless = all({r.id: r.tokens for r in rep.requests} == ref for c in cols for rep in reps[c])
            costs, acc = measured_costs(reps, delay_ms / 1e3, stages)
            sim = simulated(costs, acc, args, reqs)
            meas = {}
            for c in cols:
                per = [itl_ttft(r) for r in reps[c]]
                itl = float(np.median([x for p in per for x in p[0]]))
                ttft = float(np.median([x for p in per for x in p[1]]))
                rep_itl = [float(np.median(p[0])) for p in per]
                noise = (max(rep_itl) - min(rep_itl)) / itl if len(rep_itl) > 1 else math.nan
                meas[c] = (itl, ttft, noise)
            sync1 = ("sync", min(args.widths))
            for c in cols:
                itl, ttft, noise = meas[c]
                sp = [r.speculation for r in reps[c]]
                one = (c[0], min(args.widths)) if c[0] != "plain" else c
                ratio = [(meas[k][0] / itl, sim[k][0] / sim[c][0]) for k in (("plain", 1), sync1, one)]
                acc_s = resc = canc = cop = "-"
                if c[0] != "plain":
                    acc_s = f"{sum(s['accepted'] for s in sp) / max(1, sum(s['verified'] for s in sp)):.2f}"
                    resc = f"{sum(s['rescued'] for s in sp)}/{sum(s['fork_misses'] for s in sp)}"
                    canc, cop = f"{sum(s['cancelled'] for s in sp)}", f"{sum(s['copies'] for s in sp)}"
                cells = " ".join(f"{a:4.2f} / {b:4.2f}" for a, b in ratio)
                print(f"{stages:>2} {delay_ms:>6g} {c[0]:>9} {c[1]:>1} | {itl * 1e3:6.1f} / {sim[c][0] * 1e3:5.1f} "
                      f"{1 / itl:6.1f} {ttft * 1e3:6.0f} / {sim[c][1] * 1e3:5.0f} | {cells} | "
                      f"{acc_s:>6} {resc:>7} {canc:>6} {cop:>6} {noise:5.2f}")
            lines = ", ".join(f"{b * 1e3:.1f} + {t * 1e3:.2f}/tok ms"
                              for b, t in zip(costs.stage_base_s, costs.stage_tok_s))
            print(f"   measured: hop {costs.hop_s * 1e3:.2f} ms, stage s = {lines}, draft "
                  f"{costs.draft_tok_s * 1e3:.2f} ms/tok, alpha {acc.alpha:.2f}, stop {acc.stop_p:.2f}, rescue "
                  f"{acc.rescue:.2f}; tokens equal plain decoding's: {lossless}")
    print("cells: measured / simulated; accept: committed draft tokens per verified position (rescues included);"
          " rescued: rejected first tokens a sibling rescued / first tokens the trunk missed (over the repeats)")


if __name__ == "__main__":
    main()
