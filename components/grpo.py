"""Component: `apr grpo`, in this step's process or as a Kubernetes Job with SGLang beside it."""

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def grpo(preset: str, overrides: list, launcher: str, run_id: str, store: str,
         s3_endpoint: str, namespace: str, train_image: str, sglang_image: str,
         timeout_s: float, sft_model: dsl.Input[dsl.Model], data: dsl.Input[dsl.Dataset],
         model: dsl.Output[dsl.Model], metrics: dsl.Output[dsl.Metrics]):
    """GRPO from the SFT model.

    launcher "job" (the cluster): a Job whose pod holds the trainer and SGLang as a native
    sidecar, launched, streamed and cleaned up from this CPU step (released KFP cannot declare
    a sidecar). launcher "local" (kfp.local, a laptop): the trainer runs here and starts
    `apr engine serve` as its rollout server.
    """
    import json
    import logging
    import os
    import shutil

    from apr.config import load
    from apr.stages import grpo as stage

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per rollout request
    overrides = [str(o) for o in overrides]
    config = load(stage.GRPOConfig, preset, stage.SECTION, overrides)
    if launcher == "job":
        from apr.cluster.grpo_job import run_grpo_job
        from apr.cluster.jobs import job_name
        from apr.storage import S3Settings

        settings = S3Settings.from_env(endpoint=s3_endpoint)  # credentials: the step's Secret
        fields = {"name": job_name(run_id), "namespace": namespace,
                  "trainer_image": train_image, "sglang_image": sglang_image,
                  "s3_endpoint": s3_endpoint or settings.url}
        args = ["--config", preset, *[a for o in overrides for a in ("--set", o)]]
        summary = run_grpo_job(fields, sft_model.path, data.path, store, args, model.path,
                               settings=settings, timeout_s=timeout_s)
    elif launcher == "local":
        run_dir = os.path.join(os.path.dirname(model.path) or ".", "grpo-run")
        result = stage.run(config, sft_model.path, data.path, run_dir, resume=True,
                           progress=False)
        shutil.rmtree(model.path, ignore_errors=True)
        shutil.copytree(result.model_dir, model.path)
        summary = json.loads(open(os.path.join(run_dir, "grpo.json")).read())
    else:
        raise ValueError(f"launcher {launcher!r}: choose job or local")
    model.metadata.update({"stage": "grpo", "preset": preset, "steps": summary["steps"]})
    metrics.log_metric("steps", summary["steps"])
    for key in ("initial_val_accuracy", "val_accuracy"):
        if summary.get(key) is not None:
            metrics.log_metric(key, summary[key])
