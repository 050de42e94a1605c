"""Components: `apr sft` (APR or SoS+ traces) on one GPU, torchrun over several, or a
Trainer TrainJob over several nodes; and the GPUs the SFT step itself asks for."""

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE, TRAIN_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def sft_step_gpus(nodes: int, gpus: int) -> int:
    """The GPUs the SFT step requests: `gpus` on one node; none beyond (the step then only
    launches and follows the TrainJob, whose pods hold the GPUs)."""
    from apr.config import InputError

    if nodes < 1 or gpus < 1:
        raise InputError(f"sft_nodes={nodes}, sft_gpus={gpus}: give 1 or more of each")
    return gpus if nodes == 1 else 0


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(preset: str, traces: str, overrides: list, store: str, s3_endpoint: str,
        data: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model],
        metrics: dsl.Output[dsl.Metrics], gpus: int = 1, nodes: int = 1,
        run_id: str = "local", namespace: str = "kubeflow", image: str = ""):
    """Train from scratch on `traces` ("apr" or "sos"); the model directory is the artifact.

    One node: `apr sft` here, on `gpus` GPUs (torchrun, one process each, when more than
    one). With an s3:// `store`, checkpoints are mirrored under `store`/sft-runs/KEY, KEY
    naming the inputs (the data artifact, the config, the GPUs): a retried step resumes from
    there, and the step stays a function of its inputs, so KFP's cache still applies.
    `nodes` > 1: a Kubeflow Trainer TrainJob of `nodes` x `gpus` in `namespace` with `image`
    (default: the project's training image), launched and followed from here (`apr.cluster.trainjob`); its checkpoints are mirrored
    under `store`/sft-jobs/NAME, NAME from `run_id` and `traces`, so a retry resumes too."""
    import hashlib
    import os
    import shutil
    import subprocess

    from apr.config import dump, load
    from apr.stages import sft as stage
    from apr.storage import S3Settings, is_remote

    overrides = [f"traces={traces}", *[str(o) for o in overrides]]
    config = load(stage.SFTConfig, preset, stage.SECTION, overrides)
    run_dir = os.path.join(os.path.dirname(model.path) or ".", "sft-run")
    mirror, settings = None, None
    if is_remote(store):
        settings = S3Settings.from_env(endpoint=s3_endpoint)  # credentials: the step's Secret
        inputs = f"{data.uri}\n{dump(config, stage.SECTION)}" + (f"\ngpus={gpus}" * (gpus > 1))
        key = hashlib.sha256(inputs.encode()).hexdigest()  # gpus: the global batch's size
        mirror = f"{store.rstrip('/')}/sft-runs/{key[:16]}"
    if nodes > 1:
        from apr.cluster.defaults import TRAIN_IMAGE
        from apr.cluster.jobs import job_name
        from apr.cluster.trainjob import run_sft_trainjob

        if settings is None:
            raise ValueError(f"store {store!r}: a TrainJob (sft_nodes > 1) needs an s3:// store "
                             "that its pods reach")
        fields = {"name": job_name(f"{run_id}/{traces}", "apr-sft"), "namespace": namespace,
                  "image": image or TRAIN_IMAGE, "preset": preset, "overrides": tuple(overrides),
                  "nodes": nodes, "gpus_per_node": gpus,
                  "s3_endpoint": s3_endpoint or settings.url}
        run_sft_trainjob(fields, data.path, store, run_dir, settings)
        result = stage.SFTResult.read(run_dir)
    elif gpus > 1:
        from apr.train.launch import sft_args, torchrun

        env = {**os.environ, **({"S3_ENDPOINT": s3_endpoint} if s3_endpoint else {})}
        subprocess.run(torchrun(sft_args(preset, overrides, data.path, run_dir, mirror), gpus),
                       check=True, env=env)
        result = stage.SFTResult.read(run_dir)
    else:
        result = stage.run(config, data.path, run_dir, resume=True, progress=False,
                           mirror=mirror, mirror_settings=settings)
    shutil.rmtree(model.path, ignore_errors=True)
    shutil.copytree(result.model_dir, model.path)
    model.metadata.update({"traces": traces, "shape": config.shape, "steps": result.steps})
    metrics.log_metric("steps", result.steps)
    metrics.log_metric("train_loss", round(result.final_train_loss, 5))
    metrics.log_metric("val_loss", round(result.val_loss, 5))
    metrics.log_metric("train_sequences", result.train_sequences)
    metrics.log_metric("dropped_sequences", result.dropped_sequences)
