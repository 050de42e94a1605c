"""Component: `apr sft` (APR or SoS+ traces)."""

from kfp import dsl

from apr.cluster.defaults import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(preset: str, traces: str, overrides: list, store: str, s3_endpoint: str,
        data: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model],
        metrics: dsl.Output[dsl.Metrics], gpus: int = 1):
    """Train from scratch on `traces` ("apr" or "sos"); the model directory is the artifact.
    With `gpus` > 1, torchrun runs `apr sft` in one process per GPU (data parallel).

    With an s3:// `store`, checkpoints are mirrored under `store`/sft-runs/KEY, KEY naming the
    inputs (the data artifact and the config): a retried step resumes from there, and the
    step stays a function of its inputs, so KFP's cache still applies. Beyond one node, the
    pipeline's SFT is a Trainer TrainJob instead (`apr.cluster.trainjob`)."""
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
    if gpus > 1:
        from apr.train.launch import sft_args, torchrun_here

        env = {**os.environ, **({"S3_ENDPOINT": s3_endpoint} if s3_endpoint else {})}
        subprocess.run(torchrun_here(sft_args(preset, overrides, data.path, run_dir, mirror),
                                     gpus), check=True, env=env)
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
