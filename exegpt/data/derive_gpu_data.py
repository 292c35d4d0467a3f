"""Derive the compact GPU measurements shipped in ``exegpt/data/gpu/`` from Vidur's profiling CSVs.

Usage::

    python exegpt/data/derive_gpu_data.py [--src /work/shared/data/gpu-profiles] [--out exegpt/data/gpu]

Writes one ``<gpu>.json.gz`` per GPU (a100, h100, a40) and ``network.json.gz``. All times in
**seconds** (the CSVs are in milliseconds), rounded to 0.1 us. Then writes ``fit_validation.json``:
the leave-one-model-out error of ``exegpt.gpu_data``'s calibrated model (quoted in the provenance of
every gpu-data profile; ``tests/exegpt/test_gpu_data.py`` checks that it still holds).

Compute: for each measured model and TP degree, per num_tokens, the median of every token-level op
of one transformer layer (``ops``) and ``layer_s``, the per-layer sum. The ops are Vidur's
``GPTBlock`` shard (``vidur/profiling/mlp/mlp_impl.py``): input_layernorm, attn_pre_proj (QKV),
attn_rope, attn_post_proj (O), post_attention_layernorm, mlp_up_proj (gate+up), mlp_act,
mlp_down_proj and add. Vidur times only the second residual add of the block, so ``layer_s`` counts
``add`` twice (one per residual). ``emb`` (the token embedding) is stored apart: it belongs to the
embedding / LM-head kernel, not to a layer. Rows that repeat a (num_tokens, tp) key are merged by
the median. Attention kernels are not in the data (they are modelled, see ``exegpt/gpu_data.py``).

Network: per topology, all-reduce seconds per (num_workers, devices_per_node, bytes) and send/recv
seconds per (devices_per_node, bytes), medians. ``size`` in the CSVs is bytes (fp16 buffers of
size/2 elements; e.g. 64 MiB at the top of the sweep).

The data are derived from the Vidur project (microsoft/vidur, MIT): see exegpt/data/ATTRIBUTION.md.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median

GPUS = ("a100", "h100", "a40")
MODELS = {  # exegpt name -> Vidur's org/model folder
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
}
LAYER_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
ADD_COUNT = 2  # two residual adds per layer; Vidur times one
TOPOLOGIES = ("a100_dgx", "a100_pairwise_nvlink", "h100_dgx", "h100_pairwise_nvlink", "a40_pairwise_nvlink")
SOURCE = "microsoft/vidur data/profiling (MIT)"


def _s(ms: float) -> float:
    """Milliseconds -> seconds, rounded to 0.1 us."""
    return round(ms * 1e-3, 7)


def derive_compute(src: Path, gpu: str) -> dict:
    models = {}
    for name, folder in MODELS.items():
        path = src / "compute" / gpu / folder / "mlp.csv"
        with path.open() as f:
            rows = list(csv.DictReader(f))
        first = rows[0]
        shape = {"n_head": int(first["n_head"]), "n_kv_head": int(first["n_kv_head"]),
                 "n_embd": int(first["n_embd"]), "n_expanded_embd": int(first["n_expanded_embd"]),
                 "vocab_size": int(first["vocab_size"]), "use_gated_mlp": first["use_gated_mlp"] == "True"}
        groups = defaultdict(list)
        for r in rows:
            groups[(int(r["num_tensor_parallel_workers"]), int(r["num_tokens"]))].append(r)
        per_tp = {}
        for tp in sorted({k[0] for k in groups}):
            tokens = sorted(n for (t, n) in groups if t == tp)
            ops = {op: [] for op in ("emb",) + LAYER_OPS}
            for n in tokens:
                for op in ops:
                    ops[op].append(median(float(r[f"time_stats.{op}.median"]) for r in groups[(tp, n)]))
            layer = [sum(ops[op][i] for op in LAYER_OPS) + (ADD_COUNT - 1) * ops["add"][i]
                     for i in range(len(tokens))]
            per_tp[str(tp)] = {"num_tokens": tokens, "layer_s": [_s(v) for v in layer],
                               "ops": {op: [_s(v) for v in vals] for op, vals in ops.items()}}
        models[name] = {"vidur_model": folder, "shape": shape, "tp": per_tp}
    return {"gpu": gpu, "units": "seconds", "source": SOURCE, "layer_ops": list(LAYER_OPS),
            "add_count": ADD_COUNT, "models": models}


def _series(path: Path, key: tuple[str, ...]) -> dict:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    col = f"time_stats.{rows[0]['collective']}.median"
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[tuple(int(r[k]) for k in key)][int(r["size"])].append(float(r[col]))
    out = []
    for k, by_size in sorted(groups.items()):
        sizes = sorted(by_size)
        out.append({**dict(zip(key, k)), "bytes": sizes, "seconds": [_s(median(by_size[s])) for s in sizes]})
    return out


def derive_network(src: Path) -> dict:
    topo = {}
    for name in TOPOLOGIES:
        folder = src / "network" / name
        entry = {}
        if (folder / "all_reduce.csv").exists():
            entry["all_reduce"] = _series(folder / "all_reduce.csv", ("num_workers", "devices_per_node"))
        if (folder / "send_recv.csv").exists():
            entry["send_recv"] = _series(folder / "send_recv.csv", ("devices_per_node",))
        topo[name] = entry
    return {"units": "seconds", "size_units": "bytes", "source": SOURCE, "topologies": topo}


def _write(obj: dict, path: Path) -> int:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    # mtime=0: byte-identical output for identical input (reviewable diffs).
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    return path.stat().st_size


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent  # exegpt/data
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=here.parents[2] / "shared" / "data" / "gpu-profiles",
                   help="the Vidur gpu-profiles folder (default: ../shared/data/gpu-profiles beside the repository)")
    p.add_argument("--out", type=Path, default=here / "gpu")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for gpu in GPUS:
        total += _write(derive_compute(args.src, gpu), args.out / f"{gpu}.json.gz")
    total += _write(derive_network(args.src), args.out / "network.json.gz")
    print(f"wrote {len(GPUS) + 1} files, {total / 1024:.0f} KiB, to {args.out}")
    if args.out.resolve() == (here / "exegpt" / "data" / "gpu").resolve():
        write_validation(here, args.out / "fit_validation.json")


def write_validation(root: Path, path: Path) -> None:
    sys.path.insert(0, str(root))  # the tool runs from a checkout, not an installed package
    from exegpt import gpu_data

    gpu_data.load_gpu.cache_clear()
    out = {"what": "relative error of the per-layer dense time of a measured model predicted by the "
                   "calibrated model fitted without it, over all its (tp, num_tokens) points"}
    for gpu in GPUS:
        out[gpu] = {m: gpu_data.holdout_error(gpu, m) for m in MODELS}
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    worst = {gpu: max(v["median"] for v in out[gpu].values()) for gpu in GPUS}
    print(f"wrote {path.name}: worst held-out median relative error per GPU {worst}")


if __name__ == "__main__":
    main()
