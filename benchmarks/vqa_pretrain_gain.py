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

SIZES = ["model.vision_depth=2", "model.text_depth=4", "model.fusion_layer=2", "batch_size=16"]


def run(quick: bool = False, patients: int | None = None, pretrain_steps: int | None = None,
        finetune_steps: int | None = None, workdir: str | None = None, finetune_lr: float = 5e-4):
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

    pt = load_config("configs/mumc_pretrain.py:tiny", SIZES + [
        f"data.corpus={root / 'corpus'}", f"total_steps={pretrain_steps}", "log_every=50",
        f"ckpt_every={pretrain_steps}"])
    # One WordPiece for all three runs, from the captions and the training questions/answers (as a
    # bert-base vocabulary covers both): a caption-only vocabulary splits "yes"/"no" into letters.
    tokenizer = root / "tokenizer"
    if not tokenizer.is_dir():
        vqa_cfg = load_config("configs/mumc_vqa.py:tiny", [f"data.root={root / 'vqa'}"])
        BertTokenizer.train(mumc_pretrain.training_texts(pt) + mumc_vqa.vqa_texts(vqa_cfg), str(tokenizer),
                            vocab_size=1000)
    pt.data.tokenizer = str(tokenizer)
    t = time.time()
    pt_summary = mumc_pretrain.train(pt, root / "pretrain")
    pretrain_s = time.time() - t

    results, rows = {}, []
    for name, init in (("from pretraining", str(root / "pretrain")), ("from scratch", "")):
        cfg = load_config("configs/mumc_vqa.py:tiny", SIZES + [
            f"data.root={root / 'vqa'}", f"total_steps={finetune_steps}", f"eval_every={max(1, finetune_steps // 4)}",
            f"ckpt_every={finetune_steps}", "log_every=50", f"init_from={init}"]
            + [f"data.tokenizer={tokenizer}", f"optim.lr={finetune_lr}"])
        wd = root / ("vqa_" + name.replace(" ", "_"))
        t = time.time()
        summary = mumc_vqa.train(cfg, wd)
        seconds = time.time() - t
        acc = mumc_vqa.evaluate(cfg, wd, "test")
        results[name] = {"test": acc, "best_val": summary["best_metric"], "best_step": summary["best_step"],
                         "seconds": seconds}
        rows.append(Row(f"mumc/echo-vqa finetune {finetune_steps} steps", name, seconds / finetune_steps,
                        cfg.batch_size * finetune_steps / seconds,
                        note=f"test acc {100 * acc['test_overall']:.1f} (open {100 * acc['test_open']:.1f}, "
                             f"closed {100 * acc['test_closed']:.1f}); val {100 * summary['best_metric']:.1f}"))
    extra = {"vqa_pretrain_gain": {"patients": patients, "pretrain_steps": pretrain_steps, "finetune_lr": finetune_lr,
                                   "finetune_steps": finetune_steps, "pretrain_s": pretrain_s,
                                   "pretrain_last": pt_summary["last_train"], **results}}
    return rows, extra


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--patients", type=int)
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--finetune-steps", type=int)
    p.add_argument("--workdir")
    a = p.parse_args()
    rows, extra = run(a.quick, a.patients, a.pretrain_steps, a.finetune_steps, a.workdir)
    for r in rows:
        print(r)
    print(json.dumps(extra, indent=1, default=str))
