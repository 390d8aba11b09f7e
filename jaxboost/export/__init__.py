"""Trained jaxboost models out, in the layouts the PyTorch originals load (one file per model)."""


def open_vl_seg(workdir, model_name: str):
    """A `jaxboost convert` folder (model.json) or a trained `model_name` run (its best checkpoint) ->
    (flax module, variables)."""
    from pathlib import Path
    path = Path(workdir)
    if (path / "model.json").is_file():
        from jaxboost.convert.clip import load_converted
        return load_converted(str(path))
    from jaxboost.train import runs, vl_seg
    from jaxboost.train import workdir as workdir_lib
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: neither a converted folder (model.json) nor a run (config.json)")
    config = workdir_lib.read_config(path)
    if config.get("model_name") != model_name:
        raise ValueError(f"{path}/config.json: a {config.get('model_name')!r} run, not {model_name}")
    run = runs.open_run(path, config, prefer="best")
    return run.task.model, vl_seg.model_variables(run.state)
