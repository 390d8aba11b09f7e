"""Opening a finished (or running) run: its config, task (model, tokenizer, evaluator), restored state and
step. `jaxboost eval`, synth and init_from all open runs this way."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from ml_collections import ConfigDict

from jaxboost import parallel, registry
from jaxboost.train import checkpoints as ckpt_lib
from jaxboost.train import workdir as workdir_lib
from jaxboost.train.task import Task


RUN_NAMES = {"sdm": "an SDM", "mumc_pretrain": "a MUMC pretraining"}


@dataclasses.dataclass(frozen=True)
class Run:
    workdir: Any
    config: ConfigDict
    task: Task
    state: Any
    step: int

    @property
    def sampling_params(self):
        """The params a run samples and evaluates with: the EMA copy where the run keeps one."""
        return self.state.ema_params if self.state.ema_params is not None else self.state.params


def read_run_config(workdir, config: ConfigDict | None = None, *, expect: str | None = None) -> ConfigDict:
    """WORKDIR/config.json (or `config`), refused by name when the run is not of the `expect`ed trainer."""
    config = config if config is not None else workdir_lib.read_config(workdir)
    if expect is not None and config.get("trainer") != expect:
        raise ValueError(f"{workdir}: a {config.get('trainer')!r} run ({config.get('model_name')!r} model), not "
                         f"{RUN_NAMES.get(expect, repr(expect))} run (config.json trainer must be {expect!r})")
    return config


def open_run(workdir, config: ConfigDict | None = None, *, prefer: str = "best", expect: str | None = None,
             mesh=None) -> Run:
    """`config` defaults to WORKDIR/config.json; `expect` names the trainer the caller needs (refused by
    name otherwise). The state is restored replicated on `mesh` (default: the config's)."""
    workdir = workdir_lib.resolve(workdir)
    config = read_run_config(workdir, config, expect=expect)
    mesh = mesh or parallel.mesh_from_config(config)
    task = registry.trainer(config.trainer).make_task(config, workdir, mesh=mesh, opening=True)
    replicated = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            jax.eval_shape(task.init_state))
    state, _, step = ckpt_lib.load_params(workdir, abstract, prefer=prefer)
    return Run(workdir, task.config, task, state, int(step))
