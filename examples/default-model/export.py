"""Export the trained default model in mlx-lm's format (quantized, mlx-lm ``"quantization"`` config).

Layout of ``OUT`` (what ships as ``core/default_model/``)::

    config.json  tokenizer.json  tokenizer_config.json     the glm4_moe target (mlx-lm loads it)
    model-0000i-of-0000n.safetensors  model.safetensors.index.json
                 main weights, plus the MTP layer under model.layers.{num_hidden_layers}.* in the
                 last shard (mlx-lm's glm4_moe sanitize drops those keys; moedec's mtp loader reads them)
    draft/config.json  draft/model.safetensors            the dense llama draft model
    eagle/eagle.json  eagle/eagle.safetensors             the EAGLE head (docs/eagle-head.md format)
    training.json                                          run summary (steps, losses, sizes)

Every linear/embedding/expert weight whose input width is a multiple of the group size is quantized
(affine, ``bits``); norms and routers stay float32, and so do the quantization scales, so the
model computes in float32 (exact greedy comparisons in the lossless checks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

from moedec.strategies.eagle import save_eagle_head  # noqa: E402

SHARD_BYTES = 12 << 20  # each file well under 16 MiB


def quantizable(group_size: int):
    return lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0


def quantize(module: nn.Module, bits: int, group_size: int) -> None:
    if bits:
        nn.quantize(module, group_size=group_size, bits=bits, class_predicate=quantizable(group_size))


def target_weights(target, bits: int, group_size: int) -> tuple[dict, dict]:
    """``(main weights, MTP weights)`` of the trained :class:`dm_model.Target`, quantized. The MTP
    keys are ``model.layers.{num_hidden_layers}.*`` with ``shared_head.head`` a copy of ``lm_head``."""
    quantize(target.lm, bits, group_size)
    quantize(target.mtp, bits, group_size)
    main = dict(tree_flatten(target.lm.parameters()))
    n = target.lm.args.num_hidden_layers
    mtp = {f"model.layers.{n}.{k}": v for k, v in tree_flatten(target.mtp.parameters())}
    for k, v in tree_flatten(target.lm.lm_head.parameters()):
        mtp[f"model.layers.{n}.shared_head.head.{k}"] = v
    return main, mtp


def write_shards(out: Path, main: dict, extra: dict) -> list[str]:
    """``model-*.safetensors`` of at most :data:`SHARD_BYTES` each (``extra`` in the last) + index."""
    shards: list[dict] = [{}]
    size = 0
    for k in sorted(main):
        if shards[-1] and size + main[k].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = main[k]
        size += main[k].nbytes
    extra_bytes = sum(v.nbytes for v in extra.values())
    if size + extra_bytes > SHARD_BYTES:
        shards.append({})
    shards[-1].update(extra)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, part in zip(names, shards):
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    total = sum(v.nbytes for p in shards for v in p.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names


def export(work: Path, out: Path, tokenizer_dir: Path, *, bits: int = 8, group_size: int = 64,
           max_mb: float = 25.0) -> dict:
    from train import load_trained

    target, heads, run = load_trained(work)
    params = {"target": _count(target.lm), "mtp": _count(target.mtp), "draft": _count(heads.draft),
              "eagle": _count(heads.eagle)}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    qcfg = {"group_size": group_size, "bits": bits} if bits else None

    cfg = dict(run["target_config"])
    main, mtp = target_weights(target, bits, group_size)
    if qcfg:
        cfg["quantization"] = dict(qcfg)
    save_config(cfg, out / "config.json")
    write_shards(out, main, mtp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)

    (out / "draft").mkdir()
    dcfg = dict(run["draft_config"])
    quantize(heads.draft, bits, group_size)
    if qcfg:
        dcfg["quantization"] = dict(qcfg)
    save_config(dcfg, out / "draft" / "config.json")
    mx.save_safetensors(str(out / "draft" / "model.safetensors"), dict(tree_flatten(heads.draft.parameters())),
                        metadata={"format": "mlx"})

    quantize(heads.eagle, bits, group_size)
    save_eagle_head(heads.eagle, out / "eagle")  # eagle/eagle.json + eagle/eagle.safetensors

    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    weights_mb = sum(v for k, v in sizes.items() if k.endswith(".safetensors")) / 1e6
    summary = {
        "size": run["size"], "seed": run["seed"], "reproduce": run.get("reproduce"),
        "phases": run["phases"], "device": run["device"], "mlx": run["mlx"], "python": run["python"],
        "quantization": qcfg, "weights_mb": round(weights_mb, 3), "files": sizes,
        "parameters": params,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    if weights_mb > max_mb:
        raise SystemExit(f"exported weights are {weights_mb:.1f} MB, over the {max_mb} MB limit")
    print(f"exported to {out}: {weights_mb:.2f} MB of weights ({bits or 32}-bit), "
          f"{len(sizes) + 1} files, largest {max(sizes.values()) / 2**20:.1f} MiB", flush=True)
    return summary


def _count(module: nn.Module) -> int:
    """Parameters of an unquantized module."""
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=8, choices=[0, 4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args(argv)
    export(a.work, a.out, a.tokenizer, bits=a.bits, group_size=a.group_size)


if __name__ == "__main__":
    main()
