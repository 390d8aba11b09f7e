"""Does MUMC pretraining help VQA? On the phantom (no download): tiny MUMC pretraining on the corpus captions
(P6/P7), then echo-VQA finetuning from it and from scratch with the same steps, batch, learning rate,
tokenizer (one WordPiece trained on the captions and the training questions/answers) and seed; strict
exact-match accuracy on the echo-VQA test split, model selected on validation. `python -m benchmarks.vqa_pretrain_gain [--quick]` or `jaxboost bench --cases ...`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Row

BATCH = 16
SIZES = ["model.vision_depth=2", "model.text_depth=4", "model.fusion_layer=2", f"batch_size={BATCH}"]


def run(quick: bool = False, patients: int | None = None, pretrain_steps: int | None = None,
        finetune_steps: int | None = None, workdir: str | None = None, finetune_lr: float = 5e-4,
        seeds: tuple[int, ...] = (0,)):
    """Per seed (the seed of pretraining and of both finetunes): pretrain, finetune from it and from
    scratch. Rows give the mean over seeds; the JSON every seed."""
    import numpy as np
    from jaxboost.config import load_config
    from jaxboost.data import corpus as corpus_lib, echo_vqa, phantom
    from jaxboost.data.tokenize_bert import BertTokenizer
    from jaxboost.train import mumc_pretrain, mumc_vqa
    patients = patients or (10 if quick else 40)
    pretrain_steps = pretrain_steps or (150 if quick else 1500)
    finetune_steps = finetune_steps or (100 if quick else 600)
    root = Path(workdir or tempfile.mkdtemp(prefix="vqa_gain_"))
    ph = phantom.write_phantom(root / "phantom", patients=patients, seed=0, size=(32, 32))
    if not (root / "corpus").is_dir():
        items, info = corpus_lib.camus_items(ph, size=32, source="phantom")
        corpus_lib.build_corpus(items, root / "corpus", size=32, source="phantom", source_info=info)
    if not (root / "vqa").is_dir():
        echo_vqa.build_echo_vqa(root / "corpus", root / "vqa")

    def pretrain_config(seed):
        return load_config("configs/mumc_pretrain.py:tiny", SIZES + [
            f"data.corpus={root / 'corpus'}", f"total_steps={pretrain_steps}", "log_every=50",
            f"ckpt_every={pretrain_steps}", f"seed={seed}"])
    # One WordPiece for all runs, from the captions and the training questions/answers (as a
    # bert-base vocabulary covers both): a caption-only vocabulary splits "yes"/"no" into letters.
    tokenizer = root / "tokenizer"
    if not tokenizer.is_dir():
        vqa_cfg = load_config("configs/mumc_vqa.py:tiny", [f"data.root={root / 'vqa'}"])
        BertTokenizer.train(mumc_pretrain.training_texts(pretrain_config(0)) + mumc_vqa.vqa_texts(vqa_cfg),
                            str(tokenizer), vocab_size=1000)

    per_seed = {}
    for seed in seeds:
        pt = pretrain_config(seed)
        pt.data.tokenizer = str(tokenizer)
        t = time.time()
        pt_summary = mumc_pretrain.train(pt, root / f"pretrain_s{seed}")
        results = {"pretrain_s": time.time() - t, "pretrain_last": pt_summary["last_train"]}
        for name, init in (("from pretraining", str(root / f"pretrain_s{seed}")), ("from scratch", "")):
            cfg = load_config("configs/mumc_vqa.py:tiny", SIZES + [
                f"data.root={root / 'vqa'}", f"total_steps={finetune_steps}",
                f"eval_every={max(1, finetune_steps // 4)}", f"ckpt_every={finetune_steps}", "log_every=50",
                f"init_from={init}", f"data.tokenizer={tokenizer}", f"optim.lr={finetune_lr}", f"seed={seed}"])
            wd = root / ("vqa_" + name.replace(" ", "_") + f"_s{seed}")
            t = time.time()
            summary = mumc_vqa.train(cfg, wd)
            seconds = time.time() - t
            results[name] = {"test": mumc_vqa.evaluate(cfg, wd, "test"), "best_val": summary["best_metric"],
                             "best_step": summary["best_step"], "seconds": seconds}
        per_seed[seed] = results

    rows = []
    for name in ("from pretraining", "from scratch"):
        acc = lambda key: 100 * np.array([per_seed[s][name]["test"][key] for s in seeds])
        overall, open_, closed = acc("test/overall"), acc("test/open"), acc("test/closed")
        seconds = float(np.mean([per_seed[s][name]["seconds"] for s in seeds]))
        span = lambda a: f"{a.mean():.1f}" + (f" [{a.min():.1f}-{a.max():.1f}]" if len(a) > 1 else "")
        rows.append(Row(f"mumc/echo-vqa finetune {finetune_steps} steps", name, seconds / finetune_steps,
                        BATCH * finetune_steps / seconds,
                        note=f"test acc {span(overall)} (open {span(open_)}, closed {span(closed)}), "
                             f"{len(seeds)} seed(s)"))
    extra = {"vqa_pretrain_gain": {"patients": patients, "pretrain_steps": pretrain_steps, "finetune_lr": finetune_lr,
                                   "finetune_steps": finetune_steps, "seeds": list(seeds),
                                   "per_seed": {str(k): v for k, v in per_seed.items()}}}
    return rows, extra


def seed_list(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2) (argparse names the flag and the value when this raises)."""
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--patients", type=int)
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--seeds", default=(0,), type=seed_list,
                   help="comma-separated integers; each seeds pretraining and both finetunes")
    p.add_argument("--workdir")
    a = p.parse_args()
    rows, extra = run(a.quick, a.patients, a.pretrain_steps, a.finetune_steps, a.workdir,
                      seeds=a.seeds)
    for r in rows:
        print(r)
    print(json.dumps(extra, indent=1, default=str))
