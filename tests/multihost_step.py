"""One train step of tiny CLIPSeg and tiny MUMC pretraining on a ('data',) mesh over every global device,
saved by process 0 for tests/test_multihost_models.py. Run as one process with 4 devices, or as 2
jax.distributed processes x 2 devices (JAXBOOST_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set).

    python tests/multihost_step.py CORPUS WORKDIR OUT.npz

WORKDIR holds the tokenizers and the global batches (clipseg_batch.npz, mumc_batch.npz) the test wrote;
every process reads the same whole batch and places only its own devices' rows."""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxboost import parallel
from jaxboost.config import load_config
from jaxboost.train import mumc_pretrain, optim, vl_seg

SIZE = 32
# SGD at lr 1 without clipping: the new params are init - gradient, so comparing them compares gradients.
CLIPSEG = [f"data.size={SIZE}", f"model.vision_image_size={SIZE}", "batch_size=8", "num_epochs=1",
           "model.freeze_encoders=False", "optim.name=sgd", "optim.lr=1.0", "optim.grad_clip=0.0"]
MUMC = ["model.vision_depth=1", "model.text_depth=2", "model.fusion_layer=1", "model.vision_width=32",
        "model.text_width=32", "model.vision_mlp_dim=64", "model.text_mlp_dim=64", "model.vision_heads=2",
        "model.text_heads=2", "batch_size=8", "data.tokenizer_vocab_size=200", "model.embed_dim=16",
        "queue_size=16", "optim.warmup_steps=0", "momentum=0.9", "alpha_ramp_epochs=0.2", "data.augment=False",
        "total_steps=10", "optim.name=sgd", "optim.lr=1.0"]


def clipseg_config(corpus):
    return load_config("configs/clipseg.py:tiny", CLIPSEG + [f"data.corpus={corpus}"])


def mumc_config(corpus):
    return load_config("configs/mumc_pretrain.py:tiny", MUMC + [f"data.corpus={corpus}"])


def _gather(tree):
    """Global (possibly not fully addressable) arrays -> numpy on every host."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def _step(abstract, create, step_fn, batch, mesh, step=None):
    shardings = parallel.shardings_for(abstract, mesh)
    state = create(shardings)
    if step is not None:
        state = state.replace(step=jnp.asarray(step, jnp.int32))
    state, metrics = jax.jit(step_fn, out_shardings=(shardings, None))(
        state, parallel.shard_global_batch(mesh, batch))
    return _gather(metrics), _gather(state.params), _gather(state.extra)


def _flat(prefix, tree):
    return {f"{prefix}/{parallel._path_str(p)}": np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(corpus: str, workdir: str, out: str) -> None:
    parallel.initialize_distributed()
    mesh = parallel.make_mesh(-1, 1)  # every global device on 'data': batch rows cross the process boundary
    workdir = Path(workdir)
    saved = {"device_count": np.int32(jax.device_count()), "process_count": np.int32(jax.process_count())}

    task = vl_seg.make_task(clipseg_config(corpus), workdir / "clipseg")
    batch = dict(np.load(workdir / "clipseg_batch.npz"))
    metrics, params, _ = _step(task.abstract_state(), task.create_state, task.step_fn, batch, mesh)
    saved |= {f"clipseg/{k}": v for k, v in metrics.items()} | _flat("clipseg/params", params)

    config = mumc_config(corpus)
    tokenizer = mumc_pretrain.get_tokenizer(config, workdir / "mumc")
    model = mumc_pretrain.build_model(config, tokenizer.vocab_size)
    tx = optim.make_optimizer(config, 10, 4)
    init_fn = mumc_pretrain.make_init_fn(config, model, tx)
    step_fn = mumc_pretrain.make_step_fn(config, model, tx, tokenizer, epoch_steps=4)
    batch = dict(np.load(workdir / "mumc_batch.npz"))
    metrics, params, extra = _step(jax.eval_shape(init_fn), lambda sh: jax.jit(init_fn, out_shardings=sh)(),
                                   step_fn, batch, mesh, step=5)  # step 5: alpha > 0, distillation on
    saved |= {f"mumc/{k}": v for k, v in metrics.items()}
    saved |= _flat("mumc/params", params) | _flat("mumc/extra", extra)

    if parallel.is_main_process():
        np.savez(out, **saved)


if __name__ == "__main__":
    main(*sys.argv[1:])
