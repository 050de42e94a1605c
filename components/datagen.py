"""Components: `apr datagen`, in parts over a ParallelFor of CPU pods, and the plan of parts."""

from typing import List

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen_parts(parts: int) -> List[str]:
    """The parts of a dataset written by `parts` pods ("0/N" .. "N-1/N"), for a ParallelFor."""
    from apr.config import InputError

    if parts < 1:
        raise InputError(f"datagen_parts={parts}: give 1 or more (the pods writing the traces)")
    return [f"{i}/{parts}" for i in range(parts)]


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen(preset: str, overrides: list, data: dsl.Output[dsl.Dataset], part: str = ""):
    """The problems, SoS+ and APR traces and the tokenizer, written to the `data` artifact;
    with `part` "I/N", part I of N of them, which `datagen_merge` joins into the dataset."""
    import shutil

    from apr.config import load
    from apr.stages import datagen as stage

    config = load(stage.DatagenConfig, preset, stage.SECTION, [str(o) for o in overrides])
    shutil.rmtree(data.path, ignore_errors=True)  # KFP may create the path; datagen wants it new
    stage.run(config, data.path, progress=False, part=stage.Part.parse(part) if part else None)
