"""Component: `apr sft` (APR or SoS+ traces)."""

from kfp import dsl

from apr.cluster.defaults import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(preset: str, traces: str, overrides: list, store: str, s3_endpoint: str,
        data: dsl.Input[dsl.Dataset], model: dsl.Output[dsl.Model],
        metrics: dsl.Output[dsl.Metrics]):
    """Train from scratch on `traces` ("apr" or "sos"); the model directory is the artifact.

    With an s3:// `store`, checkpoints are mirrored under `store`/sft-runs/KEY, KEY naming the
    inputs (the data artifact and the config): a retried step resumes from there, and the
    step stays a function of its inputs, so KFP's cache still applies."""
    import hashlib
    import os
    import shutil

    from apr.config import dump, load
    from apr.stages import sft as stage
    from apr.storage import S3Settings, is_remote

    config = load(stage.SFTConfig, preset, stage.SECTION,
                  [f"traces={traces}", *[str(o) for o in overrides]])
    run_dir = os.path.join(os.path.dirname(model.path) or ".", "sft-run")
    mirror, settings = None, None
    if is_remote(store):
        settings = S3Settings.from_env(endpoint=s3_endpoint)  # credentials: the step's Secret
        key = hashlib.sha256(f"{data.uri}\n{dump(config, stage.SECTION)}".encode()).hexdigest()
        mirror = f"{store.rstrip('/')}/sft-runs/{key[:16]}"
    result = stage.run(config, data.path, run_dir, resume=True, progress=False, mirror=mirror,
                       mirror_settings=settings)
    shutil.rmtree(model.path, ignore_errors=True)
    shutil.copytree(result.model_dir, model.path)
    model.metadata.update({"traces": traces, "shape": config.shape, "steps": result.steps})
    metrics.log_metric("steps", result.steps)
    metrics.log_metric("train_loss", round(result.final_train_loss, 5))
    metrics.log_metric("val_loss", round(result.val_loss, 5))
    metrics.log_metric("train_sequences", result.train_sequences)
    metrics.log_metric("dropped_sequences", result.dropped_sequences)
